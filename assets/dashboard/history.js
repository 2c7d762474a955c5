// The open user's history over the last 24 h: analytics (time online, sessions, by device type
// and region) and the latest events; and the "history is off" notes, here and on the replay.

import { errorText, isHistoryOff, userAnalytics, userHistory } from "./api.js";
import { $, el, setText, showNote } from "./dom.js";
import { fmtAgo, fmtClock, fmtDuration, fmtHM, fmtInt, fmtTime, num, statusOf } from "./format.js";
import { state } from "./state.js";

const HISTORY_EVENTS = 50;            // the timeline's length
const HISTORY_MIN_INTERVAL_MS = 1000; // history re-fetches: at most one a second
const HISTORY_SETTLE_MS = 300;        // let the history writer flush a change before asking
export const HISTORY_PERIODIC_MS = 30000; // open panel: time online keeps growing

// Both the replay card and the user's history say so, once the server has answered 503.
export function showHistoryOff(res) {
  state.historyOff = true;
  const detail = "server: " + errorText(res.body);
  showNote("#replay-msg", "History is off on this server, so there is nothing to replay. "
    + "Set history.backend to \"local\" (or \"scylla\") to record who was online.", "off", detail);
  $("#replay-body").hidden = true;
  $("#replay-card").classList.add("history-off");
  clearTimeout(state.replay.timer);
  state.replay.timer = 0;
  showNote("#history-msg", "History is off on this server: sessions and status changes are not recorded.",
    "off", detail);
  $("#history-body").hidden = true;
}

export function clearHistory() {
  for (const sel of ["#an-online", "#an-sessions", "#an-open"]) setText(sel, "—");
  $("#an-online").title = "";
  $("#an-device-types").replaceChildren();
  $("#an-regions").replaceChildren();
  $("#history-events").replaceChildren();
  $("#history-empty").hidden = true;
  setText("#history-count", "loading…");
  showNote("#history-msg", null);
}

/** The panel closed: drop answers on their way and the pending refresh. */
export function stopHistory() {
  state.hist.gen++;
  clearTimeout(state.hist.timer);
  state.hist.timer = 0;
}

export function scheduleHistoryRefresh() {
  const h = state.hist;
  if (h.timer || !state.detail.user) return;
  // At most one a second, and a moment after the change so the writer has stored it.
  const wait = Math.max(HISTORY_SETTLE_MS, h.lastAt + HISTORY_MIN_INTERVAL_MS - Date.now());
  h.timer = setTimeout(() => { h.timer = 0; loadHistory(); }, wait);
}

export async function loadHistory() {
  const h = state.hist;
  clearTimeout(h.timer);
  h.timer = 0;
  const user = state.detail.user;
  if (!user || !state.authed) return;
  const gen = ++h.gen;
  h.lastAt = Date.now();
  let an, ev;
  try {
    [an, ev] = await Promise.all([userAnalytics(user), userHistory(user, HISTORY_EVENTS)]);
  } catch (e) {
    if (gen === h.gen) showNote("#history-msg", "History: " + e.message, "error");
    return;
  }
  if (gen !== h.gen || state.detail.user !== user) return;
  if (isHistoryOff(an) || isHistoryOff(ev)) { showHistoryOff(isHistoryOff(an) ? an : ev); return; }
  const bad = an.status !== 200 ? an : ev.status !== 200 ? ev : null;
  if (bad) { showNote("#history-msg", `History: ${bad.status} ${errorText(bad.body)}`, "error"); return; }
  showNote("#history-msg", null);
  $("#history-body").hidden = false;
  renderAnalytics(an.body || {});
  renderTimeline(ev.body || {});
}

function barRow(name, frac, value, title) {
  const li = el("li", "bar-row");
  li.dataset.key = name;
  li.title = title;
  const bar = el("div", "bar");
  const fill = el("span");
  fill.style.width = (100 * Math.min(1, Math.max(0, frac || 0))).toFixed(1) + "%";
  bar.append(fill);
  li.append(el("span", "bar-name", name), bar, el("span", "bar-value", value));
  return li;
}

function renderAnalytics(a) {
  const online = num(a.online_ms);
  const t = $("#an-online");
  t.textContent = fmtHM(online);
  t.title = online === null ? "" : fmtDuration(online / 1000) + " with at least one session open";
  setText("#an-sessions", fmtInt(a.sessions));
  setText("#an-open", fmtInt(a.open_sessions));
  const none = () => el("li", "bar-none muted", "—");
  const types = Object.entries(a.by_device_type || {})
    .filter(([, ms]) => num(ms) !== null)
    .sort((x, y) => y[1] - x[1] || x[0].localeCompare(y[0]));
  $("#an-device-types").replaceChildren(...(types.length ? types.map(([type, ms]) =>
    barRow(type, online ? ms / online : 0, fmtHM(ms), `${type}: ${fmtDuration(ms / 1000)} online`)) : [none()]));
  const regions = Object.entries(a.sessions_by_region || {})
    .filter(([, n]) => num(n) !== null)
    .sort((x, y) => y[1] - x[1] || x[0].localeCompare(y[0]));
  const most = Math.max(1, ...regions.map(([, n]) => n));
  $("#an-regions").replaceChildren(...(regions.length ? regions.map(([region, n]) =>
    barRow(region, n / most, fmtInt(n), `${region}: ${n} session${n === 1 ? "" : "s"}`)) : [none()]));
}

const KIND_LABEL = { session_start: "session start", session_end: "session end", status: "status" };

function renderTimeline(body) {
  const events = Array.isArray(body.events) ? body.events : [];
  $("#history-events").replaceChildren(...events.map(eventRow));
  $("#history-empty").hidden = events.length > 0;
  setText("#history-count", events.length >= HISTORY_EVENTS ? `latest ${HISTORY_EVENTS}, newest first`
    : events.length ? `${events.length} event${events.length === 1 ? "" : "s"}, newest first` : "");
}

function eventRow(e) {
  const kind = KIND_LABEL[e.kind] ? e.kind : "other";
  const li = el("li", "ev ev-" + kind);
  li.dataset.kind = String(e.kind);
  const time = el("time", "ev-time", fmtClock(e.ts));
  if (typeof e.ts === "number") {
    time.dateTime = new Date(e.ts).toISOString();
    time.title = fmtTime(e.ts) + " · " + fmtAgo(e.ts);
  }
  const badge = el("span", "ev-kind", KIND_LABEL[e.kind] || String(e.kind));
  const what = el("span", "ev-what");
  const parts = [];
  if (e.kind === "status") {
    const st = statusOf(e.status);
    const s = el("span", "ev-state");
    s.append(el("span", "dot dot-" + st), el("span", "status-name", st));
    parts.push(s);
    if (e.text) parts.push(el("span", "ev-text", e.text));
    if (typeof e.devices === "number") parts.push(el("span", "muted", `${fmtInt(e.devices)} device${e.devices === 1 ? "" : "s"}`));
  } else {
    if (e.device) parts.push(el("span", "mono ev-device", e.device));
    parts.push(el("span", "ev-type", e.device_type || "other"));
    if (e.region) parts.push(el("span", "muted", e.region));
    if (e.kind === "session_end" && typeof e.started_at === "number" && typeof e.ts === "number") {
      const lasted = e.ts - e.started_at;
      parts.push(el("span", "muted", "after " + (lasted < 1000 ? "<1s" : fmtDuration(lasted / 1000))));
    }
    const groups = Array.isArray(e.groups) ? e.groups : [];
    if (groups.length) li.title = "groups: " + groups.join(", ");
  }
  parts.forEach((p, i) => { if (i) what.append(el("span", "sep", "·")); what.append(p); });
  li.append(time, badge, what);
  return li;
}
