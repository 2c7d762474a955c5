// Presence replay: online users over a time window from /api/replay (optionally one group),
// followed live or paused on an instant, and who was online then (/api/replay/at).

import { errorText, isHistoryOff, replay, replayAt } from "./api.js";
import { $, el, setText, showNote } from "./dom.js";
import { fmtAgo, fmtClock, fmtInt, fmtTime, num } from "./format.js";
import { showHistoryOff } from "./history.js";
import { ensureReplayChart } from "./replay-chart.js";
import { serverNow, state } from "./state.js";

const REPLAY_POINTS_MAX = 600;
const REPLAY_AT_LIMIT = 100;
const REPLAY_REFRESH_MIN_MS = 5000;
const REPLAY_AT_DEBOUNCE_MS = 150;

function replayGroup() {
  const g = $("#filter-group").value.trim();
  return g && $("#replay-use-group").checked ? g : null;
}

/** Shows what the replay covers: all users, or the user list's group filter. */
export function updateReplayScope() {
  const g = $("#filter-group").value.trim();
  $("#replay-use-group").disabled = !g;
  $("#replay-group-check").classList.toggle("disabled", !g);
  setText("#replay-group-label", g ? `only group ${g}` : "group filter");
  const scope = replayGroup();
  const pill = $("#replay-scope");
  pill.textContent = scope ? `group ${scope}` : "all users";
  pill.classList.toggle("scope-group", !!scope);
}

export function onReplayScopeInput() {
  updateReplayScope();
  if (state.authed && replayGroup() !== state.replay.group) loadReplay();
}

export function setReplayWindow(ms) {
  const r = state.replay;
  r.windowMs = ms;
  r.selected = null;
  for (const b of document.querySelectorAll(".seg-btn[data-window]")) {
    b.setAttribute("aria-pressed", String(Number(b.dataset.window) === ms));
  }
  loadReplay();
}

/** Back to following the latest point ("live"). */
export function followLatest() {
  state.replay.selected = null;
  loadReplay();
}

// Whole seconds, at least the sampling interval, at most REPLAY_POINTS_MAX points.
function replayStep(windowMs, sampleMs) {
  return Math.max(sampleMs || 1000, Math.ceil(windowMs / REPLAY_POINTS_MAX / 1000) * 1000);
}

// False when the answer is usable; otherwise says why on the card.
function replayFailed(res, what) {
  if (isHistoryOff(res)) { showHistoryOff(res); return true; }
  if (res.status !== 200) {
    showNote("#replay-msg", `${what}: ${res.status} ${errorText(res.body)}`, "error");
    return true;
  }
  return false;
}

export async function loadReplay() {
  const r = state.replay;
  clearTimeout(r.timer);
  r.timer = 0;
  if (!state.authed || state.historyOff) return;
  const gen = ++r.gen;
  try {
    if (!r.sampleMs) {
      // A one-point replay without `step` answers with the default step: the sampling interval.
      const t = String(Math.floor(serverNow()));
      const probe = await replay(new URLSearchParams({ from: t, to: t }));
      if (gen !== r.gen || replayFailed(probe, "Replay")) return;
      r.sampleMs = num(probe.body && probe.body.step) || 1000;
    }
    const step = replayStep(r.windowMs, r.sampleMs);
    const from = Math.floor((serverNow() - r.windowMs) / step) * step;
    const group = replayGroup();
    // `to` explicit: the page's clock (the last sample's time) trails the server's by up to a
    // sample, and an open-ended window would then hold one point more than it should.
    const params = new URLSearchParams({
      from: String(from),
      to: String(from + r.windowMs),
      step: String(step),
    });
    if (group) params.set("group", group);
    const res = await replay(params);
    if (gen !== r.gen || replayFailed(res, "Replay")) return;
    showNote("#replay-msg", null);
    applyReplay(res.body || {}, group);
  } catch (e) {
    if (gen === r.gen) showNote("#replay-msg", "Replay: " + e.message, "error");
  } finally {
    if (gen === r.gen) scheduleReplayRefresh();
  }
}

// Live while following the latest point; an inspected instant pauses it (the chart and the
// slider hold still under the pointer) until "live" is pressed.
function scheduleReplayRefresh() {
  const r = state.replay;
  clearTimeout(r.timer);
  r.timer = 0;
  if (!state.authed || state.historyOff || r.selected !== null) return;
  r.timer = setTimeout(loadReplay, Math.max(REPLAY_REFRESH_MIN_MS, r.step || 0));
}

function applyReplay(body, group) {
  const r = state.replay;
  const pts = Array.isArray(body.points) ? body.points : [];
  const t = [], online = [];
  let nonNull = 0, max = null, last = null;
  for (const p of pts) {
    if (num(p.t) === null) continue;
    const v = num(p.online);
    t.push(p.t / 1000);
    online.push(v);
    if (v !== null) { nonNull++; max = Math.max(max === null ? 0 : max, v); last = v; }
  }
  r.data = [t, online];
  r.step = num(body.step) || r.step;
  const groupChanged = r.group !== group;
  r.group = group;
  $("#replay-body").hidden = false;
  $("#replay-card").classList.remove("history-off");
  const host = $("#replay-chart");
  host.dataset.points = String(t.length);
  host.dataset.nonNull = String(nonNull);
  host.dataset.max = max === null ? "" : String(max);
  host.dataset.last = last === null ? "" : String(last);
  host.dataset.step = String(r.step);
  ensureReplayChart((at) => selectInstant(at, true));
  if (r.chart) r.chart.setData(r.data);

  const slider = $("#replay-at");
  if (!t.length) { slider.disabled = true; return; }
  const first = t[0] * 1000, latest = t[t.length - 1] * 1000;
  slider.min = String(first);
  slider.max = String(latest);
  slider.step = String(r.step);
  slider.disabled = false;
  // An inspected instant outside the (reloaded) window gives way to the latest point.
  if (r.selected !== null && (r.selected < first || r.selected > latest)) r.selected = null;
  const at = r.selected === null ? latest : r.selected;
  slider.value = String(at);
  showLive();
  showAtTime(at);
  const shown = r.atShown;
  if (r.selected === null || groupChanged || !shown || shown.t !== at) loadAt(at);
}

function showAtTime(t) {
  const e = $("#replay-at-time");
  e.textContent = fmtClock(t) + (state.replay.selected === null ? " · latest" : " · paused");
  e.title = fmtTime(t) + " · " + fmtAgo(t);
}

function showLive() {
  const live = state.replay.selected === null;
  const b = $("#replay-now");
  b.classList.toggle("active", live);
  b.setAttribute("aria-pressed", String(live));
  b.title = live ? "Following the latest point" : "Paused on the chosen instant: back to the latest point, live";
}

/** Inspects the instant `t` (ms): pauses the live replay and lists who was online then. */
export function selectInstant(t, immediate) {
  const r = state.replay;
  if (!isFinite(t)) return;
  r.selected = t;
  clearTimeout(r.timer); // paused: see scheduleReplayRefresh
  r.timer = 0;
  $("#replay-at").value = String(t);
  showLive();
  showAtTime(t);
  if (r.chart) r.chart.redraw(false, false);
  clearTimeout(r.atTimer);
  r.atTimer = setTimeout(() => loadAt(t), immediate ? 0 : REPLAY_AT_DEBOUNCE_MS);
}

async function loadAt(t) {
  const r = state.replay;
  clearTimeout(r.atTimer);
  r.atTimer = 0;
  if (!state.authed || state.historyOff) return;
  const gen = ++r.atGen;
  const group = r.group;
  const params = new URLSearchParams({ t: String(Math.round(t)), limit: String(REPLAY_AT_LIMIT) });
  if (group) params.set("group", group);
  let res;
  try {
    res = await replayAt(params);
  } catch (e) {
    if (gen === r.atGen) showNote("#replay-msg", "Who was online: " + e.message, "error");
    return;
  }
  if (gen !== r.atGen || replayFailed(res, "Who was online")) return;
  r.atShown = { t, group };
  renderAt(res.body || {}, t);
}

function renderAt(body, t) {
  const users = Array.isArray(body.users) ? body.users.filter((u) => typeof u === "string") : [];
  const total = num(body.total) === null ? users.length : body.total;
  const list = $("#replay-users");
  list.dataset.t = String(t);
  setText("#replay-total", fmtInt(total));
  setText("#replay-total-unit", (total === 1 ? "user" : "users") + (body.group ? ` in ${body.group}` : ""));
  const items = users.map((u) => {
    const li = el("li");
    const b = el("button", "chip chip-user", u);
    b.type = "button";
    b.dataset.user = u;
    b.title = `Open ${u}`;
    li.append(b);
    return li;
  });
  if (!items.length) items.push(el("li", "muted small", "nobody"));
  list.replaceChildren(...items);
  const more = $("#replay-more");
  more.textContent = total > users.length ? `+ ${fmtInt(total - users.length)} more not listed` : "";
  more.hidden = !(total > users.length);
  const h = num(body.lookback_h);
  setText("#replay-lookback", h === null ? ""
    : `From sessions that started in the ${h} h before this instant: a session open longer is not counted.`);
}

/** Forgets the replay shown (sign-out). */
export function resetReplay() {
  const r = state.replay;
  clearTimeout(r.timer);
  clearTimeout(r.atTimer);
  r.timer = r.atTimer = 0;
  r.gen++;
  r.atGen++;
  r.selected = null;
  showLive();
  r.atShown = null;
  r.data = [[], []];
  if (r.chart) r.chart.setData(r.data);
  $("#replay-users").replaceChildren();
  setText("#replay-total", "—");
  setText("#replay-at-time", "—");
  $("#replay-more").hidden = true;
  showNote("#replay-msg", null);
}
