// The online user list: filters, pages (cursor-paginated /api/online), rows patched live from
// `changes`, and a re-query when a change may move a user on or off the page shown.

import { onlineUsers, errorText } from "./api.js";
import { $, el, setText } from "./dom.js";
import { fmtAgo, fmtInt, fmtTime, statusOf } from "./format.js";
import { onReplayScopeInput } from "./replay.js";
import { state } from "./state.js";

const PAGE_LIMIT = 50;
const FILTER_DEBOUNCE_MS = 250;
const REQUERY_MIN_INTERVAL_MS = 1000; // live re-queries: at most one a second

/** Query parameter and input of each filter. */
export const FILTERS = [
  ["q", "#filter-q"], ["group", "#filter-group"], ["role", "#filter-role"],
  ["region", "#filter-region"], ["device_type", "#filter-device-type"], ["status", "#filter-status"],
];

function filterValues() {
  const out = {};
  for (const [name, sel] of FILTERS) {
    const v = $(sel).value.trim();
    if (v) out[name] = v;
  }
  return out;
}

function pageParams() {
  const params = new URLSearchParams(filterValues());
  params.set("limit", String(PAGE_LIMIT));
  if (state.page.cursor) params.set("cursor", state.page.cursor);
  return params;
}

export async function runPageQuery() {
  const page = state.page;
  clearTimeout(page.requeryTimer);
  page.requeryTimer = 0;
  if (!state.authed) return;
  const gen = ++page.gen;
  page.lastQueryAt = Date.now();
  let res;
  try {
    res = await onlineUsers(pageParams());
  } catch (e) {
    if (gen === page.gen) showUsersError("User list: " + e.message);
    return;
  }
  if (gen !== page.gen) return; // a newer query is on its way
  if (res.status !== 200) {
    showUsersError(`User list: ${res.status} ${errorText(res.body)}`);
    return;
  }
  const body = res.body || {};
  const users = Array.isArray(body.users) ? body.users : [];
  if (users.length === 0 && page.back.length > 0) {
    // The page emptied (its users left): step back rather than show nothing.
    page.cursor = page.back.pop();
    runPageQuery();
    return;
  }
  showUsersError(null);
  page.next = body.next_cursor || null;
  renderUsers(users, body.total);
}

function showUsersError(text) {
  const e = $("#users-error");
  e.textContent = text || "";
  e.hidden = !text;
}

function renderUsers(users, total) {
  const page = state.page;
  page.rows = new Map();
  const rows = users.map((u) => {
    const tr = userRow(u);
    page.rows.set(u.user, tr);
    return tr;
  });
  $("#users tbody").replaceChildren(...rows);
  $("#users-empty").hidden = rows.length > 0;
  setText("#users-total", fmtInt(typeof total === "number" ? total : users.length));
  $("#page-prev").disabled = page.back.length === 0;
  $("#page-next").disabled = !page.next;
  setText("#page-info", `page ${page.back.length + 1}`);
  markSelected();
}

function userRow(u) {
  const tr = el("tr");
  tr.dataset.user = u.user;
  tr.tabIndex = 0;
  const status = el("td");
  const cell = el("div", "status-cell");
  cell.append(el("span", "dot"), el("span", "status-name"), el("span", "status-text"));
  status.append(cell);
  const since = el("td", "since");
  tr.append(
    el("td", "user-id", u.user),
    status,
    el("td", "num devices"),
    chipsCell(u.device_types, "chip"),
    chipsCell(u.regions, "chip"),
    chipsCell(u.groups, "chip chip-group"),
    since,
  );
  patchRow(tr, u);
  return tr;
}

function chipsCell(list, cls) {
  const td = el("td");
  for (const v of Array.isArray(list) ? list : []) td.append(el("span", cls, v));
  if (!td.childNodes.length) td.append(el("span", "muted", "—"));
  return td;
}

// Presence fields that `changes` carries: status, text, devices, ts.
function patchRow(tr, u) {
  const st = statusOf(u.status);
  const before = tr.dataset.status;
  tr.dataset.status = st;
  tr.querySelector(".dot").className = "dot dot-" + st;
  tr.querySelector(".status-name").textContent = st;
  const text = typeof u.text === "string" ? u.text : "";
  const t = tr.querySelector(".status-text");
  t.textContent = text ? "· " + text : "";
  t.title = text;
  tr.querySelector(".devices").textContent = fmtInt(u.devices);
  tr.dataset.devices = String(u.devices);
  const since = tr.querySelector(".since");
  if (typeof u.ts === "number") since.dataset.ts = String(u.ts);
  since.textContent = fmtAgo(Number(since.dataset.ts));
  since.title = fmtTime(Number(since.dataset.ts));
  if (before && before !== st) {
    tr.classList.remove("flash");
    void tr.offsetWidth; // restart the animation
    tr.classList.add("flash");
  }
}

/** Patches the rows of the users in a `changes` push; re-queries when the page may be stale. */
export function applyChanges(users, missed) {
  const filters = filterValues();
  let requery = (missed || 0) > 0;
  for (const u of users) {
    const tr = state.page.rows.get(u.user);
    if (!tr) { requery = true; continue; }
    const devicesBefore = tr.dataset.devices;
    patchRow(tr, u);
    // The row may no longer belong on this page, or a device came or went and with it
    // device types, regions or groups that `changes` does not carry.
    if (statusOf(u.status) === "offline" || (filters.status && filters.status !== u.status)
      || devicesBefore !== tr.dataset.devices) requery = true;
  }
  if (requery) scheduleRequery();
}

function scheduleRequery() {
  const page = state.page;
  if (page.requeryTimer) return; // one already pending
  const wait = Math.max(0, page.lastQueryAt + REQUERY_MIN_INTERVAL_MS - Date.now());
  page.requeryTimer = setTimeout(runPageQuery, wait);
}

/** A filter changed: back to the first page (and the replay follows the group filter). */
export function onFilterInput() {
  const page = state.page;
  clearTimeout(page.filterTimer);
  page.filterTimer = setTimeout(() => {
    page.cursor = null;
    page.back = [];
    runPageQuery();
    onReplayScopeInput();
  }, FILTER_DEBOUNCE_MS);
}

export function nextPage() {
  const page = state.page;
  if (!page.next) return;
  page.back.push(page.cursor);
  page.cursor = page.next;
  runPageQuery();
}

export function prevPage() {
  const page = state.page;
  if (!page.back.length) return;
  page.cursor = page.back.pop();
  runPageQuery();
}

/** Highlights the row of the user whose panel is open. */
export function markSelected() {
  for (const [id, tr] of state.page.rows) tr.classList.toggle("selected", id === state.detail.user);
}

/** Empties the list and forgets its page (sign-out). */
export function clearUsers() {
  const page = state.page;
  setText("#users-total", "—");
  $("#users tbody").replaceChildren();
  clearTimeout(page.requeryTimer);
  clearTimeout(page.filterTimer);
  page.requeryTimer = page.filterTimer = 0;
  page.rows = new Map();
  page.cursor = null;
  page.back = [];
  page.next = null;
}
