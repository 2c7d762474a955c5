// presenced-client: the browser and Node client of presenced (docs/PROTOCOL.md).
export { PresenceClient, PresenceError } from "./client.js";
export { PresenceCache } from "./cache.js";
export { backoffDelay, closeAction, refreshDelay, spreadDelay, tokenExpiry } from "./policy.js";
