// PresenceClient: one WebSocket to presenced (docs/PROTOCOL.md), kept up: reconnects with
// backoff and full jitter, honours close codes, watches the heartbeat, refreshes the token, and
// after a reconnect resubscribes everything, restores the last status and reconciles the cache.

import { PresenceCache } from "./cache.js";
import { backoffDelay, closeAction, refreshDelay, spreadDelay, tokenExpiry } from "./policy.js";

const DEFAULTS = {
  reconnect: { baseMs: 500, maxMs: 30_000 },
  shutdownSpreadMs: 10_000,
  opTimeoutMs: 10_000,
  refreshBeforeMs: 60_000,
  maxUsersPerOp: 100,
  resubscribeRetries: 8,
};

const EVENTS = new Set(["presence", "group_snapshot", "activity", "state", "error"]);

/** An error the server sent for an op (`{"type":"error","code","message"}`). */
export class PresenceError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   */
  constructor(code, message) {
    super(message ? `${code}: ${message}` : code);
    this.name = "PresenceError";
    this.code = code;
  }
}

/** Splits `list` into arrays of at most `n`. */
function chunks(list, n) {
  const out = [];
  for (let i = 0; i < list.length; i += n) out.push(list.slice(i, i + n));
  return out;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** One user id or an array of them, as a list without repeats. */
const idList = (users) => [...new Set(Array.isArray(users) ? users : [users])];

export class PresenceClient {
  /**
   * @param {import("./index.js").ClientOptions} options
   */
  constructor(options) {
    if (!options || typeof options.url !== "string") throw new TypeError("PresenceClient: `url` is required");
    if (typeof options.token !== "string" && typeof options.getToken !== "function") {
      throw new TypeError("PresenceClient: give `token` or `getToken`");
    }
    this.options = {
      ...DEFAULTS,
      ...options,
      reconnect: { ...DEFAULTS.reconnect, ...(options.reconnect ?? {}) },
    };
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (typeof this.WebSocket !== "function") {
      throw new TypeError("PresenceClient: no global WebSocket here; pass one (e.g. the `ws` package) as `WebSocket`");
    }
    this.random = options.random ?? Math.random;
    this.token = options.token;
    this.cache = new PresenceCache();
    /** @type {Map<string, Set<Function>>} */
    this.listeners = new Map();
    this.watched = new Set();
    this.watchedGroups = new Set();
    /** @type {{status: string, text?: string} | undefined} */
    this.status = undefined;
    this.pending = new Map();
    this.nextId = 1;
    this.queue = [];
    this.attempt = 0;
    this.ws = null;
    this.stopped = true;
    this.currentState = "closed";
    this.welcome = null;
    this.timers = { reconnect: 0, watchdog: 0, ping: 0, refresh: 0 };
    this.lastFrameAt = 0;
    this.connectWaiters = [];
  }

  /** `"connecting" | "connected" | "reconnecting" | "closed"`. */
  get state() {
    return this.currentState;
  }

  /**
   * Listens to `"presence" | "group_snapshot" | "activity" | "state" | "error"`.
   * @returns {() => void} a function that removes the listener
   */
  on(event, fn) {
    if (!EVENTS.has(event)) throw new TypeError(`PresenceClient: unknown event ${event}`);
    if (!this.listeners.has(event)) this.listeners.set(event, new Set());
    this.listeners.get(event).add(fn);
    return () => this.off(event, fn);
  }

  off(event, fn) {
    this.listeners.get(event)?.delete(fn);
  }

  emit(event, value) {
    for (const fn of [...(this.listeners.get(event) ?? [])]) {
      try {
        fn(value);
      } catch (e) {
        // An app's listener that throws must not break the connection's handling.
        setTimeout(() => { throw e; });
      }
    }
  }

  setState(state, detail) {
    if (this.currentState === state && !detail) return;
    this.currentState = state;
    this.emit("state", { state, ...(detail ?? {}) });
  }

  /**
   * Connects (and keeps reconnecting until `close()` or a close code that says stop). Resolves
   * at the first `welcome`; rejects if the client stops before one.
   * @returns {Promise<void>}
   */
  connect() {
    if (this.stopped) {
      this.stopped = false;
      this.open();
    }
    if (this.currentState === "connected") return Promise.resolve();
    return new Promise((resolve, reject) => this.connectWaiters.push({ resolve, reject }));
  }

  /** Closes for good: no reconnect; ops not answered are rejected. */
  close() {
    this.stopped = true;
    this.clearTimers();
    const ws = this.ws;
    this.ws = null;
    if (ws) {
      detach(ws);
      try {
        ws.close(1000, "client closed");
      } catch {
        // already closing
      }
    }
    this.failPending(new Error("PresenceClient closed"));
    this.failQueue(new Error("PresenceClient closed"));
    for (const w of this.connectWaiters.splice(0)) w.reject(new Error("PresenceClient closed"));
    this.setState("closed", { reason: "closed by the client" });
  }

  /** The latest known aggregate of `user` (from its subscription or a group feed). */
  presence(user) {
    return this.cache.get(user);
  }

  /** The cached members of a watched group. */
  members(group) {
    return this.cache.members(group);
  }

  /** Watches users (a snapshot of each, then live changes). */
  watch(users) {
    const list = idList(users);
    for (const u of list) this.watched.add(u);
    return this.inChunks("subscribe", list);
  }

  unwatch(users) {
    const list = idList(users);
    for (const u of list) {
      this.watched.delete(u);
      this.cache.forgetUser(u);
    }
    return this.inChunks("unsubscribe", list);
  }

  watchGroup(group) {
    this.watchedGroups.add(group);
    return this.acked({ op: "subscribe_group", group });
  }

  unwatchGroup(group) {
    this.watchedGroups.delete(group);
    this.cache.forgetGroup(group);
    return this.acked({ op: "unsubscribe_group", group });
  }

  /** Sets this device's status (restored after every reconnect). */
  setStatus(status, text) {
    this.status = text === undefined ? { status } : { status, text };
    return this.acked({ op: "set_status", ...this.status });
  }

  /** An ephemeral activity (`typing`, …), to this user's watchers or to the user `to`. */
  activity(kind, to) {
    return this.acked(to === undefined ? { op: "activity", kind } : { op: "activity", kind, to });
  }

  // --- Internals. ---

  /** `request`, settled with nothing once acknowledged. */
  acked(op) {
    return this.request(op).then(() => undefined);
  }

  /** `op` (`subscribe` or `unsubscribe`) for `users`, at most `maxUsersPerOp` per message. */
  inChunks(op, users) {
    return Promise.all(chunks(users, this.options.maxUsersPerOp).map((c) => this.acked({ op, users: c })))
      .then(() => undefined);
  }

  /**
   * Sends `op` with a fresh id; settles on its `ack` (or `error`), or rejects after
   * `opTimeoutMs`. While disconnected the op waits for the next connection.
   */
  request(op) {
    return new Promise((resolve, reject) => {
      const id = this.nextId++;
      const entry = { op: { ...op, id }, resolve, reject, timer: 0 };
      entry.timer = setTimeout(() => {
        this.pending.delete(id);
        this.queue = this.queue.filter((q) => q !== entry);
        reject(new Error(`PresenceClient: no answer to ${op.op} within ${this.options.opTimeoutMs} ms`));
      }, this.options.opTimeoutMs);
      if (this.currentState === "connected" && this.ws) {
        this.pending.set(id, entry);
        this.sendRaw(entry.op);
      } else {
        this.queue.push(entry);
      }
    });
  }

  sendRaw(obj) {
    try {
      this.ws.send(JSON.stringify(obj));
    } catch {
      // The close handler deals with a dead socket.
    }
  }

  async freshToken() {
    if (typeof this.options.getToken !== "function") return this.token;
    const t = await this.options.getToken();
    if (typeof t !== "string" || t === "") throw new Error("getToken returned no token");
    this.token = t;
    return t;
  }

  async open() {
    if (this.stopped) return;
    this.setState(this.attempt === 0 && !this.welcome ? "connecting" : "reconnecting");
    let token = this.token;
    try {
      // A token that expires within the refresh margin is renewed before it is used.
      const exp = token === undefined ? undefined : tokenExpiry(token);
      if (token === undefined || (exp !== undefined && exp * 1000 - Date.now() < this.options.refreshBeforeMs)) {
        token = await this.freshToken();
      }
    } catch (e) {
      this.emit("error", { code: "token", message: `getToken failed: ${e?.message ?? e}` });
      this.scheduleReconnect(backoffDelay(this.attempt++, this.options.reconnect, this.random));
      return;
    }
    if (this.stopped) return;
    const url = new URL(this.options.url);
    url.searchParams.set("token", token);
    if (this.options.device) url.searchParams.set("device", this.options.device);
    if (this.options.deviceType) url.searchParams.set("device_type", this.options.deviceType);
    let ws;
    try {
      ws = new this.WebSocket(url.toString());
    } catch (e) {
      this.emit("error", { code: "connect", message: String(e?.message ?? e) });
      this.scheduleReconnect(backoffDelay(this.attempt++, this.options.reconnect, this.random));
      return;
    }
    this.ws = ws;
    this.lastFrameAt = Date.now();
    ws.onmessage = (ev) => this.onFrame(ws, ev.data);
    ws.onclose = (ev) => this.onClose(ws, ev.code, ev.reason);
    ws.onerror = () => {
      // Always followed by a close event, which decides what to do.
    };
  }

  onFrame(ws, data) {
    if (ws !== this.ws) return;
    this.lastFrameAt = Date.now();
    let msg;
    try {
      msg = JSON.parse(typeof data === "string" ? data : String(data));
    } catch {
      return;
    }
    switch (msg?.type) {
      case "welcome":
        this.onWelcome(msg);
        break;
      case "presence":
        if (this.cache.apply(msg)) this.emit("presence", msg);
        break;
      case "group_snapshot": {
        const { changed, gone } = this.cache.applyGroupSnapshot(msg.group, msg.members);
        this.emit("group_snapshot", { group: msg.group, members: msg.members ?? [], changed, gone });
        break;
      }
      case "activity":
        this.emit("activity", msg);
        break;
      case "ack":
      case "error": {
        const entry = msg.id === undefined ? undefined : this.pending.get(msg.id);
        if (entry) {
          this.pending.delete(msg.id);
          clearTimeout(entry.timer);
          if (msg.type === "ack") entry.resolve(msg);
          else entry.reject(new PresenceError(msg.code, msg.message));
        } else if (msg.type === "error") {
          this.emit("error", { code: msg.code, message: msg.message });
        }
        break;
      }
      default:
        break; // pong, and anything newer than this client
    }
  }

  onWelcome(msg) {
    this.welcome = msg;
    this.attempt = 0;
    this.cache.newEpoch();
    this.setState("connected", { session: msg.session, user: msg.user });
    const hb = Number(msg.heartbeat_ms) > 0 ? Number(msg.heartbeat_ms) : 25_000;
    // The server's WebSocket pings are invisible to a browser's API: a `ping` op each interval
    // gets a visible `pong`, so silence for two intervals means the link is dead.
    this.timers.ping = setInterval(() => this.sendRaw({ op: "ping" }), hb);
    this.timers.watchdog = setInterval(() => {
      if (Date.now() - this.lastFrameAt > 2 * hb) this.abandon("heartbeat timeout");
    }, Math.max(50, Math.floor(hb / 2)));
    this.scheduleRefresh();
    this.restore();
    for (const w of this.connectWaiters.splice(0)) w.resolve();
  }

  /** After a (re)connect: resubscribe everything, restore the status, then send what waited. */
  async restore() {
    const ws = this.ws;
    const replays = [];
    for (const c of chunks([...this.watched], this.options.maxUsersPerOp)) {
      replays.push(this.replay({ op: "subscribe", users: c }));
    }
    for (const g of this.watchedGroups) replays.push(this.replay({ op: "subscribe_group", group: g }));
    if (this.status) replays.push(this.replay({ op: "set_status", ...this.status }));
    const queued = this.queue.splice(0);
    for (const entry of queued) {
      if (ws !== this.ws) {
        this.queue.push(entry);
        continue;
      }
      this.pending.set(entry.op.id, entry);
      this.sendRaw(entry.op);
    }
    await Promise.all(replays);
  }

  /** One op of the restore: retried with backoff when the server sheds load or rate-limits. */
  async replay(op) {
    const ws = this.ws;
    for (let i = 0; ; i++) {
      if (ws !== this.ws || this.stopped) return;
      try {
        await this.request(op);
        return;
      } catch (e) {
        const retry = e instanceof PresenceError && (e.code === "rate_limited" || e.code === "overloaded");
        if (!retry || i + 1 >= this.options.resubscribeRetries) {
          if (ws === this.ws) this.emit("error", { code: e.code ?? "restore", message: `restoring ${op.op}: ${e.message}` });
          return;
        }
        await sleep(backoffDelay(i, this.options.reconnect, this.random));
      }
    }
  }

  scheduleRefresh() {
    clearTimeout(this.timers.refresh);
    if (typeof this.options.getToken !== "function") return;
    const exp = tokenExpiry(this.token);
    if (exp === undefined) return;
    const ws = this.ws;
    this.timers.refresh = setTimeout(async () => {
      if (ws !== this.ws || this.stopped) return;
      try {
        const token = await this.options.getToken();
        if (ws !== this.ws) return;
        await this.request({ op: "refresh", token });
        this.token = token;
      } catch (e) {
        this.emit("error", { code: e?.code ?? "refresh", message: `token refresh failed: ${e?.message ?? e}` });
      }
      if (ws === this.ws) this.scheduleRefresh();
    }, refreshDelay(exp, Date.now(), this.options.refreshBeforeMs));
  }

  /** Gives up on a silent connection and reconnects. */
  abandon(reason) {
    const ws = this.ws;
    if (!ws) return;
    detach(ws);
    try {
      ws.close(4000, reason);
    } catch {
      // ignore
    }
    this.onClose(ws, 4000, reason, true);
  }

  onClose(ws, code, reason, abandoned = false) {
    if (ws !== this.ws) return;
    this.ws = null;
    this.clearTimers();
    this.failPending(new Error(`connection closed (${code}) before the server answered`));
    if (this.stopped) return;
    const { action, reason: why } = abandoned ? { action: "reconnect", reason } : closeAction(code);
    const detail = { code, reason: reason || why };
    if (action === "stop") {
      this.stopped = true;
      this.failQueue(new Error(`stopped: ${why}`));
      this.emit("error", { code: `closed_${code}`, message: why });
      for (const w of this.connectWaiters.splice(0)) w.reject(new Error(`stopped: ${why}`));
      this.setState("closed", detail);
      return;
    }
    this.setState("reconnecting", detail);
    if (action === "spread") {
      this.scheduleReconnect(spreadDelay(this.options.shutdownSpreadMs, this.random));
    } else if (action === "refresh") {
      if (typeof this.options.getToken !== "function") {
        this.stopped = true;
        this.emit("error", { code: "closed_4001", message: "token expired and no getToken to renew it" });
        this.setState("closed", detail);
        return;
      }
      this.token = undefined; // open() gets a fresh one
      this.scheduleReconnect(backoffDelay(this.attempt++, this.options.reconnect, this.random));
    } else {
      this.scheduleReconnect(backoffDelay(this.attempt++, this.options.reconnect, this.random));
    }
  }

  scheduleReconnect(ms) {
    clearTimeout(this.timers.reconnect);
    this.timers.reconnect = setTimeout(() => this.open(), ms);
  }

  clearTimers() {
    clearTimeout(this.timers.reconnect);
    clearInterval(this.timers.ping);
    clearInterval(this.timers.watchdog);
    clearTimeout(this.timers.refresh);
  }

  failPending(err) {
    for (const [id, entry] of this.pending) {
      clearTimeout(entry.timer);
      entry.reject(err);
      this.pending.delete(id);
    }
  }

  failQueue(err) {
    for (const entry of this.queue.splice(0)) {
      clearTimeout(entry.timer);
      entry.reject(err);
    }
  }
}

function detach(ws) {
  ws.onmessage = null;
  ws.onclose = null;
  ws.onerror = null;
}
