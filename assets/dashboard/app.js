// presenced dashboard, the entry module: wires the page's controls to the modules beside it and
// signs in. One page, one WebSocket (/ws/admin), no framework, no build step; the contract it
// speaks is docs/ADMIN.md, and assets/README.md lists the modules.

import { kickSession, kickUser } from "./api.js";
import { onRefused, signIn, signOut, startSignedIn } from "./auth.js";
import { clearSeries } from "./charts.js";
import { closeDetail, kick, openDetail } from "./detail.js";
import { $ } from "./dom.js";
import { onFeedMessage } from "./feed.js";
import { fmtAgo } from "./format.js";
import { HISTORY_PERIODIC_MS, scheduleHistoryRefresh } from "./history.js";
import { followLatest, onReplayScopeInput, selectInstant, setReplayWindow, updateReplayScope } from "./replay.js";
import { setHandlers } from "./socket.js";
import { state } from "./state.js";
import { FILTERS, nextPage, onFilterInput, prevPage } from "./users.js";

const TICK_MS = 5000;                 // relative times ("5m ago") and the history's periodic refresh

function refreshRelativeTimes() {
  for (const e of document.querySelectorAll("[data-ts]")) e.textContent = fmtAgo(Number(e.dataset.ts));
}

function wireUsers() {
  for (const [, sel] of FILTERS) {
    $(sel).addEventListener("input", onFilterInput);
    $(sel).addEventListener("change", onFilterInput);
  }
  $("#page-next").addEventListener("click", nextPage);
  $("#page-prev").addEventListener("click", prevPage);
  const tbody = $("#users tbody");
  tbody.addEventListener("click", (ev) => {
    const tr = ev.target.closest("tr[data-user]");
    if (tr) openDetail(tr.dataset.user);
  });
  tbody.addEventListener("keydown", (ev) => {
    const tr = ev.target.closest("tr[data-user]");
    if (tr && (ev.key === "Enter" || ev.key === " ")) { ev.preventDefault(); openDetail(tr.dataset.user); }
  });
}

function wireDetail() {
  $("#detail-close").addEventListener("click", closeDetail);
  document.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape" && state.detail.user) closeDetail();
  });
  $("#kick-user").addEventListener("click", () => {
    const user = state.detail.user;
    if (user) kick(() => kickUser(user), `every session of ${user}`);
  });
  $("#sessions tbody").addEventListener("click", (ev) => {
    const b = ev.target.closest("button[data-kick-session]");
    if (b) kick(() => kickSession(b.dataset.kickSession), `session ${b.dataset.kickSession} of ${state.detail.user}`);
  });
}

function wireReplay() {
  for (const b of document.querySelectorAll(".seg-btn[data-window]")) {
    b.addEventListener("click", () => setReplayWindow(Number(b.dataset.window)));
  }
  $("#replay-use-group").addEventListener("change", onReplayScopeInput);
  $("#replay-at").addEventListener("input", () => selectInstant(Number($("#replay-at").value), false));
  $("#replay-now").addEventListener("click", followLatest);
  $("#replay-users").addEventListener("click", (ev) => {
    const b = ev.target.closest("button[data-user]");
    if (b) openDetail(b.dataset.user);
  });
  updateReplayScope();
}

function init() {
  setHandlers({ message: onFeedMessage, refused: onRefused });
  wireUsers();
  wireDetail();
  $("#signin-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const t = $("#token-input").value.trim();
    if (t) signIn(t);
  });
  $("#sign-out").addEventListener("click", () => signOut(null));
  wireReplay();
  setInterval(() => {
    refreshRelativeTimes();
    // An open panel's time online keeps growing: re-ask now and then.
    if (state.detail.user && !state.historyOff && Date.now() - state.hist.lastAt >= HISTORY_PERIODIC_MS) {
      scheduleHistoryRefresh();
    }
  }, TICK_MS);

  clearSeries();
  startSignedIn();
}

// Modules run after the document is parsed, so this is init() at once; kept for safety.
if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
else init();
