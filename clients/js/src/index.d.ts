// Type declarations of presenced-client (checked by `npm run typecheck`).

/** A user's aggregate presence, as the server sends it (docs/PROTOCOL.md §3). */
export interface Presence {
  type: "presence";
  user: string;
  status: "online" | "away" | "busy" | "offline";
  text?: string;
  devices: number;
  last_seen?: number;
  ts: number;
  seq: number;
  /** Present on group feeds. */
  group?: string;
}

export interface Activity {
  type: "activity";
  user: string;
  kind: string;
  ts: number;
  to?: string;
}

export interface GroupSnapshot {
  group: string;
  members: Presence[];
  /** Members new or changed since the cached snapshot. */
  changed: Presence[];
  /** Users cached as members that this snapshot no longer lists. */
  gone: string[];
}

export type ConnectionState = "connecting" | "connected" | "reconnecting" | "closed";

export interface StateChange {
  state: ConnectionState;
  /** The close code that caused it, if any. */
  code?: number;
  reason?: string;
  session?: string;
  user?: string;
}

export interface ClientErrorEvent {
  /** The server's error code (`rate_limited`, `forbidden`, …), or `closed_<code>`, `token`, `refresh`, `restore`, `connect`. */
  code: string;
  message: string;
}

export interface EventMap {
  presence: Presence;
  group_snapshot: GroupSnapshot;
  activity: Activity;
  state: StateChange;
  error: ClientErrorEvent;
}

/** The constructor of a WebSocket: the global one, or e.g. the `ws` package's. */
export type WebSocketConstructor = new (url: string) => {
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
};

export interface ClientOptions {
  /** The server's WebSocket endpoint, e.g. `wss://presence.example.com/ws`. */
  url: string;
  /** A JWT; or give `getToken`, which is asked again before expiry and after a 4001. */
  token?: string;
  getToken?: () => string | Promise<string>;
  device?: string;
  deviceType?: "web" | "ios" | "android" | "desktop" | "other";
  /** Where there is no global `WebSocket` (Node 20): `import WebSocket from "ws"`. */
  WebSocket?: WebSocketConstructor;
  /** Reconnect backoff: full jitter over `min(maxMs, baseMs × 2^attempt)`. Default 500 ms, 30 s. */
  reconnect?: { baseMs?: number; maxMs?: number };
  /** After a server shutdown (1001), reconnect at a random point of this window. Default 10 s. */
  shutdownSpreadMs?: number;
  /** How long an op waits for its `ack`. Default 10 s. */
  opTimeoutMs?: number;
  /** Refresh the token this long before its `exp` (half-way, for a token with less than twice this left). Default 60 s. */
  refreshBeforeMs?: number;
  /** Users per `subscribe` (the server's `limits.max_users_per_op`). Default 100. */
  maxUsersPerOp?: number;
  /** Tries of each resubscription the server refuses with `rate_limited`/`overloaded`. Default 8. */
  resubscribeRetries?: number;
  /** The jitter's random source, in [0, 1). Default `Math.random`. */
  random?: () => number;
}

export class PresenceError extends Error {
  constructor(code: string, message: string);
  /** The server's error code. */
  code: string;
}

export class PresenceClient {
  constructor(options: ClientOptions);
  readonly state: ConnectionState;
  connect(): Promise<void>;
  close(): void;
  on<K extends keyof EventMap>(event: K, fn: (value: EventMap[K]) => void): () => void;
  off<K extends keyof EventMap>(event: K, fn: (value: EventMap[K]) => void): void;
  presence(user: string): Presence | undefined;
  members(group: string): Presence[];
  watch(users: string | string[]): Promise<void>;
  unwatch(users: string | string[]): Promise<void>;
  watchGroup(group: string): Promise<void>;
  unwatchGroup(group: string): Promise<void>;
  setStatus(status: "online" | "away" | "busy" | "invisible", text?: string): Promise<void>;
  activity(kind: string, to?: string): Promise<void>;
}

export class PresenceCache {
  constructor();
  newEpoch(): void;
  apply(ev: Presence): boolean;
  applyGroupSnapshot(group: string, members: Presence[]): { changed: Presence[]; gone: string[] };
  forgetUser(user: string): void;
  forgetGroup(group: string): void;
  get(user: string): Presence | undefined;
  members(group: string): Presence[];
}

export function backoffDelay(attempt: number, opts: { baseMs: number; maxMs: number }, random?: () => number): number;
export function spreadDelay(windowMs: number, random?: () => number): number;
export function closeAction(code: number): { action: "reconnect" | "spread" | "refresh" | "stop"; reason: string };
export function tokenExpiry(token: string): number | undefined;
export function refreshDelay(expS: number, nowMs: number, beforeMs: number): number;
