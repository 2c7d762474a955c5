import assert from "node:assert/strict";
import { test } from "node:test";

import { backoffDelay, closeAction, refreshDelay, spreadDelay, tokenExpiry } from "../src/policy.js";

test("backoff doubles up to its cap, with full jitter", () => {
  const opts = { baseMs: 100, maxMs: 1_000 };
  const top = (a) => backoffDelay(a, opts, () => 0.999999);
  assert.deepEqual([0, 1, 2, 3, 4, 5, 40].map(top), [99, 199, 399, 799, 999, 999, 999]);
  for (let a = 0; a < 10; a++) assert.equal(backoffDelay(a, opts, () => 0), 0);
  // Full jitter: the delays of many clients cover the whole range, not one point.
  let x = 1;
  const rand = () => ((x = (x * 48271) % 2147483647) / 2147483647);
  const delays = Array.from({ length: 2000 }, () => backoffDelay(3, opts, rand));
  assert.ok(Math.min(...delays) < 80 && Math.max(...delays) > 720, "spread over [0, 800)");
  assert.ok(delays.every((d) => d >= 0 && d < 800));
});

test("a shutdown's reconnects spread over the window", () => {
  assert.equal(spreadDelay(10_000, () => 0), 0);
  assert.equal(spreadDelay(10_000, () => 0.5), 5_000);
  assert.equal(spreadDelay(-5, () => 0.5), 0);
});

test("close codes: 4001 refreshes, 4003 and 4009 stop, 1001 spreads, others reconnect", () => {
  assert.equal(closeAction(4001).action, "refresh");
  assert.equal(closeAction(4003).action, "stop");
  assert.equal(closeAction(4009).action, "stop");
  assert.equal(closeAction(1001).action, "spread");
  for (const code of [1000, 1002, 1006, 1007, 1009, 1011, 4008, 4000]) {
    assert.equal(closeAction(code).action, "reconnect", String(code));
  }
});

test("a token's exp is read without checking it; anything else has none", () => {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  assert.equal(tokenExpiry(`${b64({ alg: "HS256" })}.${b64({ sub: "a", exp: 1_800_000_000 })}.sig`), 1_800_000_000);
  assert.equal(tokenExpiry(`${b64({})}.${b64({ sub: "a" })}.sig`), undefined);
  assert.equal(tokenExpiry("not a jwt"), undefined);
  assert.equal(tokenExpiry("a.%%%.c"), undefined);
  assert.equal(tokenExpiry(`x.${b64({ exp: "soon" })}.y`), undefined);
});

test("refresh comes before exp, at most half-way for a short token", () => {
  const now = 1_000_000;
  assert.equal(refreshDelay(now / 1000 + 3600, now, 60_000), 3_540_000);
  assert.equal(refreshDelay(now / 1000 + 30, now, 60_000), 15_000);
  assert.equal(refreshDelay(now / 1000 - 1, now, 60_000), 0);
});
