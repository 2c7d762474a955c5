// What the /ws/admin feed pushes: `hello` (start everything), `stats` (the KPIs, the shards table
// and a series point) and `changes` (patch the user list and the open panel).

import { appendSample, ensureCharts, redrawCharts, seedSeries } from "./charts.js";
import { loadDetail, scheduleDetailRefresh } from "./detail.js";
import { $, el, setText } from "./dom.js";
import { fmtAgo, fmtCompact, fmtDuration, fmtInt, fmtMs, fmtRate } from "./format.js";
import { loadHistory, scheduleHistoryRefresh } from "./history.js";
import { loadReplay } from "./replay.js";
import { armStaleTimer, resetBackoff, setConnState } from "./socket.js";
import { state } from "./state.js";
import { applyChanges, runPageQuery } from "./users.js";

/** Every push but query replies (socket.js matches those). */
export function onFeedMessage(msg) {
  switch (msg.type) {
    case "hello": return onHello(msg);
    case "stats": return onStats(msg);
    case "changes": return onChanges(msg);
    default: return; // unknown types are ignored: the feed may grow
  }
}

function onHello(msg) {
  state.authed = true;
  resetBackoff();
  if (typeof msg.interval_ms === "number" && msg.interval_ms > 0) state.intervalMs = msg.interval_ms;
  armStaleTimer();
  setConnState("live", "live");
  $("#meta-version").textContent = msg.version ? "v" + msg.version : "";
  $("#meta-shards").textContent = fmtInt(msg.shards);
  $("#meta-admin").textContent = msg.admin || "—";
  seedSeries(Array.isArray(msg.series) ? msg.series : []);
  noteServerTime(lastSample(msg.series));
  ensureCharts();
  redrawCharts();
  const last = state.series.t.length ? lastSample(msg.series) : null;
  if (last) {
    setText("#online-count", fmtInt(last.online));
    setText("#conn-count", fmtInt(last.connections));
    setText("#handshake-rate", fmtRate(last.handshakes_per_s));
    setText("#delivery-rate", fmtRate(last.deliveries_per_s));
  }
  // The server may have restarted with history turned on or off, or sampling differently.
  state.historyOff = false;
  state.replay.sampleMs = null;
  runPageQuery();
  if (state.detail.user) { loadDetail(); loadHistory(); }
  loadReplay();
}

// Replay windows are in the server's time: its clock is what the samples carry.
function noteServerTime(sample) {
  if (sample && typeof sample.t === "number" && isFinite(sample.t)) state.serverOffsetMs = sample.t - Date.now();
}

const lastSample = (series) => (series && series.length ? series[series.length - 1] : null);

function onStats(msg) {
  if (!state.authed) return;
  setConnState("live", "live");
  const totals = msg.totals || {};
  const rates = msg.rates || {};
  // "Now" is the recent window when the server sends one; the since-start figures go in the
  // tooltip. No sample at all reads as "—", not as 0 ms.
  const lat = msg.latency_recent_us || msg.latency_us || {};
  const total = msg.latency_us || {};
  setText("#online-count", fmtInt(totals.online_users));
  setText("#conn-count", fmtInt(totals.connections));
  setText("#handshake-rate", fmtRate(rates.handshakes_per_s));
  setText("#delivery-rate", fmtRate(rates.deliveries_per_s));
  const noLat = lat.count === 0;
  setText("#latency-p50", noLat ? "—" : fmtMs(lat.p50));
  setText("#latency-p99", noLat ? "—" : fmtMs(lat.p99));
  $("#latency-p50").title = `since start: p50 ${fmtMs(total.p50)}, p90 ${fmtMs(total.p90)} (${fmtInt(total.count)} samples)`;
  $("#latency-p99").title = `since start: p99 ${fmtMs(total.p99)}, p99.9 ${fmtMs(total.p999)}, max ${fmtMs(total.max)}`;
  setText("#meta-uptime", fmtDuration(msg.uptime_s));
  if (msg.version) setText("#meta-version", "v" + msg.version);
  if (typeof msg.shards === "number") setText("#meta-shards", fmtInt(msg.shards));
    renderShards(Array.isArray(msg.per_shard) ? msg.per_shard : []);
  renderNodes(msg.cluster, totals.connections);
  renderWebhooks(msg.webhooks);
  const sample = msg.sample || {
    t: Date.now(), online: totals.online_users, connections: totals.connections,
    handshakes_per_s: rates.handshakes_per_s, deliveries_per_s: rates.deliveries_per_s,
    ops_per_s: rates.ops_per_s, p50_us: lat.p50, p99_us: lat.p99,
  };
  if (msg.sample) noteServerTime(msg.sample);
  appendSample(sample);
  redrawCharts();
}

function renderShards(shards) {
  const body = $("#shards tbody");
  const maxLoad = Math.max(1, ...shards.map((s) => s.connections || 0));
  const rows = shards.map((s) => {
    const tr = el("tr");
    tr.dataset.shard = String(s.shard);
    tr.append(
      el("td", "num mono", s.shard),
      el("td", "num mono", s.cpu === null || s.cpu === undefined ? "—" : s.cpu),
      el("td", "num", fmtInt(s.users)),
      el("td", "num", fmtInt(s.connections)),
      el("td", "num", fmtRate(s.deliveries_per_s)),
      el("td", "num", fmtCompact(s.mesh_in)),
      el("td", "num", fmtCompact(s.mesh_out)),
    );
    const bar = el("div", "bar");
    const fill = el("span");
    fill.style.width = (100 * (s.connections || 0) / maxLoad).toFixed(1) + "%";
    bar.title = `${fmtInt(s.connections)} connections`;
    bar.append(fill);
    const td = el("td");
    td.append(bar);
    tr.append(td);
    return tr;
  });
  body.replaceChildren(...rows);
}

/** The cluster's nodes (this one first), when the server runs in a cluster; hidden otherwise. */
function renderNodes(cluster, connections) {
  const card = $("#nodes-card");
  if (!cluster || typeof cluster !== "object") {
    card.hidden = true;
    return;
  }
  card.hidden = false;
  const totals = cluster.totals || {};
  setText("#nodes-total", fmtInt(totals.nodes));
  setText("#nodes-bus", `bus ${cluster.bus || "?"}` + (cluster.bus === "connected" ? "" : ` — ${cluster.why || ""}`));
  const self = { node: cluster.node + " (this node)", connections, online_users: null, last_heard_ms: null, admin: null };
  const others = Array.isArray(cluster.nodes) ? cluster.nodes : [];
  const rows = [self, ...others].map((n) => {
    const tr = el("tr");
    tr.dataset.node = String(n.node);
    const heard = typeof n.last_heard_ms === "number"
      ? fmtDuration(Math.max(0, (Date.now() + (state.serverOffsetMs || 0) - n.last_heard_ms) / 1000)) + " ago"
      : "—";
    const admin = el("td", "mono");
    if (typeof n.admin === "string" && /^https?:\/\//.test(n.admin)) {
      const a = el("a", "", n.admin);
      a.href = n.admin;
      a.rel = "noopener";
      admin.append(a);
    } else {
      admin.textContent = "—";
    }
    tr.append(
      el("td", "mono", n.node),
      el("td", "num", fmtInt(n.connections)),
      el("td", "num", n.online_users === null ? "—" : fmtInt(n.online_users)),
      el("td", "num", heard),
      admin,
    );
    return tr;
  });
  $("#nodes tbody").replaceChildren(...rows);
}

const HOOK_STATES = new Set(["idle", "ok", "failing", "stopping"]);

/** This node's webhooks and their health, when any is configured; hidden otherwise. */
function renderWebhooks(hooks) {
  const card = $("#webhooks-card");
  if (!Array.isArray(hooks) || hooks.length === 0) {
    card.hidden = true;
    return;
  }
  card.hidden = false;
  setText("#webhooks-total", fmtInt(hooks.length));
  const failing = hooks.filter((h) => h.state === "failing").length;
  setText("#webhooks-summary", failing ? `${failing} failing` : "all healthy");
  const rows = hooks.map((h) => {
    const st = HOOK_STATES.has(h.state) ? h.state : "idle";
    const tr = el("tr", st === "failing" ? "hook-row-failing" : "");
    tr.dataset.webhook = String(h.name);
    const name = el("td", "mono", h.name);
    name.title = `${h.target || ""} · ${h.format || ""} · ${(h.events || []).join(", ")}`;
    const state = el("td");
    const badge = el("span", "hook-state hook-" + st);
    badge.dataset.state = st;
    badge.append(el("span", "dot"), el("span", "", st));
    state.append(badge);
    if (st === "failing") {
      badge.title = `${fmtInt(h.consecutive_failures)} failed in a row` +
        (typeof h.retry_at_ms === "number" ? `; next try ${new Date(h.retry_at_ms).toLocaleTimeString()}` : "");
    }
    const queued = el("td", "num", fmtInt(h.queued));
    queued.title = `of ${fmtInt(h.max_queue)}`;
    const delay = h.delay_ms || {};
    const err = el("td", "hook-error", h.last_error || "—");
    if (h.last_error) err.title = `${h.last_error} (${fmtAgo(h.last_error_ms)})`;
    tr.append(
      name,
      state,
      queued,
      el("td", "num", fmtInt(h.acked)),
      el("td", "num", fmtInt(h.retries)),
      el("td", "num", fmtInt(h.dropped)),
      el("td", "num", delay.count ? fmtMs(delay.mean * 1000) : "—"),
      el("td", "num", typeof h.last_ok_ms === "number" ? fmtAgo(h.last_ok_ms) : "never"),
      err,
    );
    return tr;
  });
  $("#webhooks tbody").replaceChildren(...rows);
}

function onChanges(msg) {
  const users = Array.isArray(msg.users) ? msg.users : [];
  applyChanges(users, msg.missed);
  if (state.detail.user && users.some((u) => u.user === state.detail.user)) {
    scheduleDetailRefresh();
    scheduleHistoryRefresh();
  }
}

/** Blanks the KPIs, the facts in the top bar and the shards table (sign-out). */
export function clearFeed() {
  for (const sel of ["#online-count", "#conn-count", "#handshake-rate", "#delivery-rate",
    "#latency-p50", "#latency-p99", "#meta-uptime", "#meta-admin"]) setText(sel, "—");
    $("#shards tbody").replaceChildren();
  $("#nodes tbody").replaceChildren();
  $("#nodes-card").hidden = true;
  $("#webhooks tbody").replaceChildren();
  $("#webhooks-card").hidden = true;
}
