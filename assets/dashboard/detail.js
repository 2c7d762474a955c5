// The user panel: a user's presence and sessions (/api/users/:id), kick buttons for the user and
// each session, and the history section below them (history.js).

import { errorText, userDetail } from "./api.js";
import { $, el, setText, toast } from "./dom.js";
import { fmtAgo, fmtInt, fmtTime, statusOf } from "./format.js";
import { clearHistory, loadHistory, stopHistory } from "./history.js";
import { state } from "./state.js";
import { markSelected } from "./users.js";

export function openDetail(user) {
  state.detail.user = user;
  $("#user-detail").hidden = false;
  $(".people").classList.add("with-detail");
  setText("#detail-user", user);
  $("#detail-dot").className = "dot";
  $("#sessions tbody").replaceChildren();
  $("#sessions-empty").hidden = true;
  setText("#detail-note", "");
  markSelected();
  loadDetail();
  clearHistory();
  loadHistory();
}

export function closeDetail() {
  state.detail.user = null;
  state.detail.gen++;
  stopHistory();
  $("#user-detail").hidden = true;
  $(".people").classList.remove("with-detail");
  markSelected();
}

/** Closes the panel and drops a pending refresh (sign-out). */
export function clearDetail() {
  clearTimeout(state.detail.refreshTimer);
  state.detail.refreshTimer = 0;
  closeDetail();
}

/** The open user changed: reload the panel soon (changes of one push come together). */
export function scheduleDetailRefresh() {
  const d = state.detail;
  if (d.refreshTimer) return;
  d.refreshTimer = setTimeout(() => { d.refreshTimer = 0; loadDetail(); }, 200);
}

export async function loadDetail() {
  const d = state.detail;
  const user = d.user;
  if (!user || !state.authed) return;
  const gen = ++d.gen;
  let res;
  try {
    res = await userDetail(user);
  } catch (e) {
    if (gen === d.gen) detailError(e.message);
    return;
  }
  if (gen !== d.gen || d.user !== user) return;
  if (res.status === 404) { detailError("Unknown user: the server has not seen it since it started."); renderDetail(null); return; }
  if (res.status !== 200) { detailError(`${res.status} ${errorText(res.body)}`); return; }
  detailError(null);
  renderDetail(res.body || {});
}

function detailError(text) {
  const e = $("#detail-error");
  e.textContent = text || "";
  e.hidden = !text;
}

function renderDetail(u) {
  const sessions = u && Array.isArray(u.sessions) ? u.sessions : [];
  const st = statusOf(u && u.status);
  $("#detail-dot").className = "dot dot-" + st;
  setText("#detail-status", u ? st + (u.text ? " · " + u.text : "") : "—");
  setText("#detail-devices", u ? fmtInt(u.devices) : "—");
  const ts = $("#detail-ts");
  if (u && typeof u.ts === "number") { ts.dataset.ts = String(u.ts); ts.title = fmtTime(u.ts); ts.textContent = fmtAgo(u.ts); }
  else { delete ts.dataset.ts; ts.textContent = "—"; }
  // An online user is seen now; last_seen only means something once every session is gone.
  let seen = "—";
  if (u && sessions.length) seen = "now";
  else if (u && typeof u.last_seen === "number") seen = fmtTime(u.last_seen);
  setText("#detail-last-seen", seen);
  setText("#detail-shard", u && u.shard !== undefined ? String(u.shard) : "—");
  setText("#detail-observers", u ? fmtInt(u.observers || 0) : "—");
  $("#kick-user").disabled = sessions.length === 0;
  const rows = sessions.map(sessionRow);
  $("#sessions tbody").replaceChildren(...rows);
  $("#sessions thead").hidden = rows.length === 0;
  $("#sessions-empty").hidden = rows.length > 0 || !u;
}

function sessionRow(s) {
  const tr = el("tr");
  tr.dataset.session = s.id;
  const connected = el("td", "since");
  if (typeof s.connected_at === "number") {
    connected.dataset.ts = String(s.connected_at);
    connected.title = fmtTime(s.connected_at);
    connected.textContent = fmtAgo(s.connected_at);
  } else connected.textContent = "—";
  const status = el("td");
  const cell = el("div", "status-cell");
  const sst = statusOf(s.status);
  cell.append(el("span", "dot dot-" + sst), el("span", "status-name", sst));
  status.append(cell);
  const kick = el("button", "btn btn-danger btn-small", "kick");
  kick.type = "button";
  kick.dataset.kickSession = s.id;
  kick.title = "Close this session with 4003";
  const act = el("td", "num");
  act.append(kick);
  tr.append(
    el("td", "mono", s.device || "—"),
    el("td", "", s.device_type || "—"),
    el("td", "", s.region || "—"),
    el("td", "mono", s.ip || "—"),
    connected,
    status,
    act,
  );
  tr.title = `session ${s.id}` + (Array.isArray(s.groups) && s.groups.length ? ` · groups: ${s.groups.join(", ")}` : "")
    + (Array.isArray(s.roles) && s.roles.length ? ` · roles: ${s.roles.join(", ")}` : "");
  return tr;
}

/** Asks, then sends the kick `request()` (api.kickUser or api.kickSession) and says how it went. */
export async function kick(request, what) {
  if (!window.confirm(`Kick ${what}? Its connections are closed with 4003.`)) return;
  let res;
  try {
    res = await request();
  } catch (e) {
    toast("Kick failed: " + e.message, true);
    return;
  }
  if (res.status === 200) {
    const n = res.body && typeof res.body.kicked === "number" ? res.body.kicked : "?";
    toast(`Kicked ${what}: ${n} session${n === 1 ? "" : "s"} closed.`);
  } else {
    toast(`Kick failed: ${res.status} ${errorText(res.body)}`, true);
  }
  loadDetail();
}
