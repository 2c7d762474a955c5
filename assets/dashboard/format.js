// Formatting of numbers, durations and times for display ("—" for anything missing or not finite).

const intFmt = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });
const rateFmt = new Intl.NumberFormat("en-US", { maximumFractionDigits: 1, minimumFractionDigits: 1 });

/** `v` when it is a finite number, else null (chart columns want null for "no value"). */
export const num = (v) => (typeof v === "number" && isFinite(v) ? v : null);

export const fmtInt = (n) => (typeof n === "number" && isFinite(n) ? intFmt.format(n) : "—");
export const fmtRate = (n) => (typeof n === "number" && isFinite(n) ? rateFmt.format(n) : "—");
export const fmtMs = (us) => (typeof us === "number" && isFinite(us) ? (us / 1000).toFixed(2) + " ms" : "—");

export const fmtCompact = (n) => {
  if (typeof n !== "number" || !isFinite(n)) return "—";
  const a = Math.abs(n);
  if (a >= 1e9) return (n / 1e9).toFixed(1) + "G";
  if (a >= 1e6) return (n / 1e6).toFixed(1) + "M";
  if (a >= 1e3) return (n / 1e3).toFixed(1) + "k";
  return intFmt.format(n);
};

/** Seconds as "1d 02h 03m", "2h 03m 04s", "3m 04s" or "4s". */
export const fmtDuration = (s) => {
  if (typeof s !== "number" || !isFinite(s) || s < 0) return "—";
  s = Math.floor(s);
  const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600);
  const m = Math.floor((s % 3600) / 60), sec = s % 60;
  const p2 = (x) => String(x).padStart(2, "0");
  if (d > 0) return `${d}d ${p2(h)}h ${p2(m)}m`;
  if (h > 0) return `${h}h ${p2(m)}m ${p2(sec)}s`;
  if (m > 0) return `${m}m ${p2(sec)}s`;
  return `${sec}s`;
};

/** Time online as hours and minutes ("3h 05m", "12m", "<1m"). */
export const fmtHM = (ms) => {
  if (typeof ms !== "number" || !isFinite(ms) || ms < 0) return "—";
  const m = Math.floor(ms / 60000);
  if (m === 0) return ms > 0 ? "<1m" : "0m";
  const h = Math.floor(m / 60);
  return h > 0 ? `${h}h ${String(m % 60).padStart(2, "0")}m` : `${m}m`;
};

/** How long ago the instant `ms` (ms since the epoch) was: "just now", "5m ago", … */
export const fmtAgo = (ms) => {
  if (typeof ms !== "number" || !isFinite(ms)) return "—";
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 5) return "just now";
  if (s < 60) return `${s}s ago`;
  if (s < 3600) return `${Math.floor(s / 60)}m ago`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m ago`;
  return `${Math.floor(s / 86400)}d ago`;
};

export const fmtTime = (ms) => (typeof ms === "number" ? new Date(ms).toLocaleString() : "—");

const CLOCK = { hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23" };

/** A wall-clock time: "14:03:21" today, "Nov 27 23:58" before. */
export const fmtClock = (ms) => {
  if (typeof ms !== "number" || !isFinite(ms)) return "—";
  const d = new Date(ms);
  const time = d.toLocaleTimeString("en-GB", CLOCK);
  if (d.toDateString() === new Date().toDateString()) return time;
  return d.toLocaleDateString("en-US", { month: "short", day: "numeric" }) + " " + time.slice(0, 5);
};

const STATUSES = new Set(["online", "away", "busy", "offline"]);
/** A status the page knows how to draw; anything else reads as offline. */
export const statusOf = (s) => (STATUSES.has(s) ? s : "offline");
