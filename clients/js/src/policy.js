// Pure policy: the reconnect schedule and what each close code asks of the client.
// No I/O, no timers: `PresenceClient` applies these; `test/policy.test.js` checks them.

/**
 * The delay before reconnect attempt `attempt` (0 for the first): exponential backoff with full
 * jitter, `random() × min(maxMs, baseMs × 2^attempt)`.
 * @param {number} attempt
 * @param {{baseMs: number, maxMs: number}} opts
 * @param {() => number} [random] in [0, 1)
 * @returns {number} milliseconds
 */
export function backoffDelay(attempt, { baseMs, maxMs }, random = Math.random) {
  const n = Math.max(0, Math.min(Math.floor(attempt), 30));
  const cap = Math.min(maxMs, baseMs * 2 ** n);
  return Math.floor(random() * cap);
}

/**
 * A delay spread evenly over `windowMs` (after a server shutdown: a fleet's clients must not
 * reconnect in one burst).
 * @param {number} windowMs
 * @param {() => number} [random]
 * @returns {number}
 */
export function spreadDelay(windowMs, random = Math.random) {
  return Math.floor(random() * Math.max(0, windowMs));
}

/**
 * What the client does after the server closed the connection with `code` (docs/PROTOCOL.md §5).
 * - `reconnect`: after the backoff;
 * - `spread`: the server is going away (1001): reconnect after a delay spread over the window;
 * - `refresh`: the token expired (4001): get a fresh one (`getToken`), then reconnect;
 * - `stop`: kicked (4003) or refused by policy (4009): stay closed and report it.
 * @param {number} code
 * @returns {{action: "reconnect" | "spread" | "refresh" | "stop", reason: string}}
 */
export function closeAction(code) {
  switch (code) {
    case 1001:
      return { action: "spread", reason: "server going away" };
    case 4001:
      return { action: "refresh", reason: "token expired" };
    case 4003:
      return { action: "stop", reason: "kicked" };
    case 4009:
      return { action: "stop", reason: "session limit (policy)" };
    case 4008:
      return { action: "reconnect", reason: "rate limit abuse" };
    case 1000:
      return { action: "reconnect", reason: "closed by the server" };
    default:
      return { action: "reconnect", reason: `connection lost (${code})` };
  }
}

/**
 * The `exp` claim of a JWT (seconds since the epoch), or `undefined` when it has none or is
 * not a JWT. The signature is not checked: the server does that.
 * @param {string} token
 * @returns {number | undefined}
 */
export function tokenExpiry(token) {
  const parts = typeof token === "string" ? token.split(".") : [];
  if (parts.length !== 3) return undefined;
  try {
    const b64 = parts[1].replace(/-/g, "+").replace(/_/g, "/");
    const pad = b64 + "=".repeat((4 - (b64.length % 4)) % 4);
    const json = typeof atob === "function"
      ? atob(pad)
      : Buffer.from(pad, "base64").toString("binary");
    const exp = JSON.parse(json).exp;
    return typeof exp === "number" && Number.isFinite(exp) ? exp : undefined;
  } catch {
    return undefined;
  }
}

/**
 * When to refresh a token that expires at `expS` (seconds), as a delay from `nowMs`: `beforeMs`
 * ahead of expiry, or half-way through what is left when that is less than `2 × beforeMs` (a
 * short token is still refreshed in time); never negative.
 * @param {number} expS
 * @param {number} nowMs
 * @param {number} beforeMs
 * @returns {number}
 */
export function refreshDelay(expS, nowMs, beforeMs) {
  const left = expS * 1000 - nowMs;
  if (left <= 0) return 0;
  return left > 2 * beforeMs ? left - beforeMs : Math.floor(left / 2);
}
