// The /ws/admin socket: connect and authenticate, reconnect with backoff, notice a stale feed,
// and match query replies to their requests. What the pushes mean is feed.js's business.

import { $ } from "./dom.js";
import { state } from "./state.js";

const QUERY_TIMEOUT_MS = 10000;
const BACKOFF_MIN_MS = 1000;
const BACKOFF_MAX_MS = 10000;
const STALE_INTERVALS = 4;            // no push for this many intervals: reconnect

// Set once by app.js: `message(msg)` gets every push but replies; `refused(code)` a close
// with 4001 (bad token) or 4003 (not an admin), after which the socket stays closed.
const handlers = { message: () => {}, refused: () => {} };
export function setHandlers(h) { Object.assign(handlers, h); }

/** The connection badge in the top bar; `kind` picks its colour. */
export function setConnState(text, kind) {
  const s = $("#conn-state");
  s.textContent = text;
  s.className = "state state-" + kind;
  s.title = text;
}

/** The next reconnect waits the shortest time again (after a sign-in or a hello). */
export function resetBackoff() { state.backoffMs = BACKOFF_MIN_MS; }

export function disconnect() {
  clearTimeout(state.reconnectTimer);
  clearTimeout(state.staleTimer);
  const ws = state.ws;
  state.ws = null;
  state.authed = false;
  if (ws) {
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    try { ws.close(1000); } catch (_) { /* already closed */ }
  }
  failPending("disconnected");
}

export function connect() {
  disconnect();
  if (!state.token) return;
  setConnState("connecting", "connecting");
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  let ws;
  try {
    ws = new WebSocket(`${proto}//${location.host}/ws/admin`);
  } catch (e) {
    setConnState("error: " + e.message, "error");
    scheduleReconnect();
    return;
  }
  state.ws = ws;
  ws.onopen = () => {
    ws.send(JSON.stringify({ op: "auth", token: state.token }));
    armStaleTimer();
  };
  ws.onmessage = (ev) => {
    let msg;
    try { msg = JSON.parse(ev.data); } catch (_) { return; }
    armStaleTimer();
    onMessage(msg);
  };
  ws.onclose = (ev) => {
    if (state.ws !== ws) return;
    state.ws = null;
    state.authed = false;
    clearTimeout(state.staleTimer);
    failPending("connection closed");
    if (ev.code === 4001 || ev.code === 4003) {
      handlers.refused(ev.code);
    } else {
      setConnState("connecting", "connecting");
      scheduleReconnect();
    }
  };
  ws.onerror = () => { /* onclose follows and decides */ };
}

function scheduleReconnect() {
  clearTimeout(state.reconnectTimer);
  if (!state.token) return;
  const wait = state.backoffMs;
  state.backoffMs = Math.min(BACKOFF_MAX_MS, state.backoffMs * 2);
  state.reconnectTimer = setTimeout(connect, wait);
}

// A socket that stops receiving pushes is dead even if TCP has not noticed yet.
export function armStaleTimer() {
  clearTimeout(state.staleTimer);
  const ws = state.ws;
  state.staleTimer = setTimeout(() => {
    if (state.ws !== ws || !ws) return;
    setConnState("connecting", "connecting");
    try { ws.close(4000); } catch (_) { /* ignore */ }
    // close() fires onclose asynchronously, which reconnects.
  }, Math.max(5000, state.intervalMs * STALE_INTERVALS));
}

function send(obj) {
  if (!state.ws || state.ws.readyState !== WebSocket.OPEN) return false;
  state.ws.send(JSON.stringify(obj));
  return true;
}

/** A request over the socket (api.js names the routes); resolves with {status, body}. */
export function query(path, method) {
  return new Promise((resolve, reject) => {
    if (!state.authed) { reject(new Error("not connected")); return; }
    const id = state.nextId++;
    const msg = { op: "query", id, path };
    if (method && method !== "GET") msg.method = method;
    const timer = setTimeout(() => {
      state.pending.delete(id);
      reject(new Error("no reply in time"));
    }, QUERY_TIMEOUT_MS);
    state.pending.set(id, { resolve, reject, timer });
    if (!send(msg)) {
      clearTimeout(timer);
      state.pending.delete(id);
      reject(new Error("not connected"));
    }
  });
}

function failPending(why) {
  for (const [, p] of state.pending) {
    clearTimeout(p.timer);
    p.reject(new Error(why));
  }
  state.pending.clear();
}

function onMessage(msg) {
  if (msg.type !== "reply") { handlers.message(msg); return; }
  const p = state.pending.get(msg.id);
  if (!p) return;
  state.pending.delete(msg.id);
  clearTimeout(p.timer);
  p.resolve({ status: msg.status, body: msg.body });
}
