import assert from "node:assert/strict";
import { test } from "node:test";

import { PresenceCache } from "../src/cache.js";

const p = (user, seq, status = "online", extra = {}) =>
  ({ type: "presence", user, status, devices: status === "offline" ? 0 : 1, ts: seq, seq, ...extra });

test("on one connection an event not newer than the cached one is dropped", () => {
  const c = new PresenceCache();
  c.newEpoch();
  assert.equal(c.apply(p("a", 5)), true);
  assert.equal(c.apply(p("a", 5, "busy")), false, "same seq");
  assert.equal(c.apply(p("a", 3, "away")), false, "older");
  assert.equal(c.get("a").seq, 5);
  assert.equal(c.apply(p("a", 6, "busy")), true);
  assert.equal(c.get("a").status, "busy");
});

test("after a reconnect the snapshot replaces the cache, and is news only if it differs", () => {
  const c = new PresenceCache();
  c.newEpoch();
  c.apply(p("a", 10, "busy"));
  c.apply(p("b", 10, "away"));
  c.newEpoch();
  // Another node's clock may be behind: its snapshot is still the state to trust.
  assert.equal(c.apply(p("a", 8, "busy")), false, "the same state: nothing for the app");
  assert.equal(c.get("a").seq, 8);
  assert.equal(c.apply(p("b", 9, "offline")), true, "changed while disconnected");
  assert.equal(c.apply(p("a", 8, "online")), false, "then seq rules again");
  assert.equal(c.apply(p("a", 9, "online")), true);
});

test("group feeds are cached apart; presence() prefers the direct subscription", () => {
  const c = new PresenceCache();
  c.newEpoch();
  c.apply(p("a", 4, "away", { group: "team" }));
  assert.equal(c.get("a").status, "away");
  c.apply(p("a", 2, "busy"));
  assert.equal(c.get("a").status, "busy", "direct wins");
  c.forgetUser("a");
  assert.equal(c.get("a").status, "away");
  c.forgetGroup("team");
  assert.equal(c.get("a"), undefined);
});

test("a group snapshot replaces its members and says what changed and who left", () => {
  const c = new PresenceCache();
  c.newEpoch();
  c.applyGroupSnapshot("team", [p("a", 1, "online", { group: "team" }), p("b", 1, "away", { group: "team" })]);
  c.newEpoch();
  const r = c.applyGroupSnapshot("team", [p("a", 1, "online", { group: "team" }), p("c", 2, "busy", { group: "team" })]);
  assert.deepEqual(r.changed.map((m) => m.user), ["c"]);
  assert.deepEqual(r.gone, ["b"]);
  assert.deepEqual(c.members("team").map((m) => m.user), ["a", "c"]);
  assert.equal(c.apply(p("c", 2, "online", { group: "team" })), false, "not newer than the snapshot");
  assert.equal(c.apply(p("c", 3, "online", { group: "team" })), true);
});

test("a model of random event streams: the app never sees a lower seq after a higher one on a connection", () => {
  let x = 7;
  const rand = (n) => (x = (x * 1103515245 + 12345) % 2 ** 31) % n;
  for (let round = 0; round < 200; round++) {
    const c = new PresenceCache();
    const seen = new Map();
    let epoch = 0;
    c.newEpoch();
    for (let i = 0; i < 200; i++) {
      if (rand(50) === 0) {
        c.newEpoch();
        epoch++;
        seen.clear();
      }
      const user = "u" + rand(4);
      const ev = p(user, rand(30), ["online", "away", "busy", "offline"][rand(4)]);
      const first = !seen.has(user);
      if (c.apply(ev)) {
        const last = seen.get(user);
        assert.ok(last === undefined || ev.seq > last, `epoch ${epoch}: ${ev.seq} after ${last}`);
      }
      if (first || ev.seq > (seen.get(user) ?? -1)) seen.set(user, Math.max(ev.seq, seen.get(user) ?? -1));
      assert.ok(c.get(user).seq >= 0);
    }
  }
});
