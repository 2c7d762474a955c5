// Sign-in and sign-out: the admin token from the URL fragment, the form or this tab's
// sessionStorage; a refused token (4001, 4003) signs out and says why; sign-out blanks the page.

import { clearSeries } from "./charts.js";
import { clearDetail } from "./detail.js";
import { $ } from "./dom.js";
import { clearFeed } from "./feed.js";
import { resetReplay } from "./replay.js";
import { connect, disconnect, resetBackoff, setConnState } from "./socket.js";
import { state } from "./state.js";
import { clearUsers } from "./users.js";

const TOKEN_KEY = "presenced.admin.token";

function showSignIn(message) {
  $("#main").hidden = true;
  $("#sign-out").hidden = true;
  $("#facts").hidden = true;
  $("#signin").hidden = false;
  const msg = $("#signin-msg");
  msg.textContent = message || "";
  msg.hidden = !message;
  $("#token-input").focus();
}

function showMain() {
  $("#signin").hidden = true;
  $("#signin-msg").hidden = true;
  $("#main").hidden = false;
  $("#sign-out").hidden = false;
  $("#facts").hidden = false;
}

function tokenFromFragment() {
  if (!location.hash || location.hash.length < 2) return null;
  const params = new URLSearchParams(location.hash.slice(1));
  const t = params.get("token");
  if (t === null) return null;
  // Drop the token from the address bar (and from history) before anything else happens.
  params.delete("token");
  const rest = params.toString();
  history.replaceState(null, "", location.pathname + location.search + (rest ? "#" + rest : ""));
  return t.trim() || null;
}

/** At start: signs in with the fragment's or the stored token, else shows the form. */
export function startSignedIn() {
  const fromFragment = tokenFromFragment();
  let stored = null;
  try { stored = sessionStorage.getItem(TOKEN_KEY); } catch (_) { /* storage disabled */ }
  const token = fromFragment || stored;
  if (token) signIn(token);
  else { setConnState("signed out", "signed-out"); showSignIn(null); }
}

export function signIn(token) {
  state.token = token;
  try { sessionStorage.setItem(TOKEN_KEY, token); } catch (_) { /* storage disabled */ }
  $("#token-input").value = "";
  showMain();
  resetBackoff();
  connect();
}

export function signOut(message, connText, connKind) {
  state.token = null;
  try { sessionStorage.removeItem(TOKEN_KEY); } catch (_) { /* storage disabled */ }
  disconnect();
  clearFeed();
  clearUsers();
  clearDetail();
  clearSeries();
  resetReplay();
  setConnState(connText || "signed out", connKind || "signed-out");
  showSignIn(message);
}

/** The server closed the feed refusing the token. */
export function onRefused(code) {
  if (code === 4001) {
    signOut("Invalid token: the server refused it (4001).", "error: invalid token", "error");
  } else {
    signOut("Not an admin: the token has no admin role (4003).", "error: not an admin", "error");
  }
}
