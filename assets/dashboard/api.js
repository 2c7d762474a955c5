// The HTTP API routes the page asks for (docs/ADMIN.md), sent as queries over the feed socket,
// and how to read their error answers.

import { query } from "./socket.js";

const seg = encodeURIComponent;

/** A page of online users; `params` (URLSearchParams) holds the filters, limit and cursor. */
export const onlineUsers = (params) => query("/api/online?" + params.toString());
export const userDetail = (user) => query("/api/users/" + seg(user));
export const kickUser = (user) => query(`/api/users/${seg(user)}/kick`, "POST");
export const kickSession = (id) => query(`/api/sessions/${seg(id)}/kick`, "POST");
// No from/to: the server's last 24 h, by its own clock.
export const userAnalytics = (user) => query(`/api/analytics/${seg(user)}`);
export const userHistory = (user, limit) => query(`/api/history/${seg(user)}?limit=${limit}`);
/** Online users over time; `params`: from, to or step, group. */
export const replay = (params) => query("/api/replay?" + params.toString());
/** Who was online at one instant; `params`: t, limit, group. */
export const replayAt = (params) => query("/api/replay/at?" + params.toString());

/** The readable part of an error answer's body. */
export function errorText(body) {
  if (body && typeof body === "object") return body.message || body.error || JSON.stringify(body);
  return String(body);
}

/** Whether an answer is the server's "history is off" (503). */
export const isHistoryOff = (res) => res.status === 503 &&
  ((res.body && res.body.error === "history_off") || /history is off/i.test(errorText(res.body)));
