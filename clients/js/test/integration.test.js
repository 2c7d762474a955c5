// The SDK against a real `presenced serve` (test/server.js), in Node with the `ws` package.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import WebSocket from "ws";

import { PresenceClient } from "../src/index.js";
import { eventually, Server, token } from "./server.js";

let server;
before(async () => {
  server = await Server.start({ args: ["--heartbeat-ms", "500"] });
});
after(async () => {
  await server?.kill();
});

/** A client of `sub`, recording its events. */
function client(sub, opts = {}) {
  const c = new PresenceClient({
    url: server.url,
    token: opts.getToken ? undefined : token(sub, { groups: opts.groups }),
    WebSocket,
    reconnect: { baseMs: 50, maxMs: 500 },
    shutdownSpreadMs: 300,
    ...opts,
  });
  c.log = { presence: [], states: [], errors: [], snapshots: [] };
  c.on("presence", (p) => c.log.presence.push(p));
  c.on("state", (s) => c.log.states.push(s));
  c.on("error", (e) => c.log.errors.push(e));
  c.on("group_snapshot", (g) => c.log.snapshots.push(g));
  return c;
}

test("watch, status changes and a group snapshot", async () => {
  const alice = client("alice", { groups: ["team"] });
  const bob = client("bob");
  await alice.connect();
  await bob.connect();
  await bob.watch(["alice", "nobody"]);
  await bob.watchGroup("team");
  assert.equal(bob.presence("nobody").status, "offline");
  const snap = await eventually("the group snapshot", () => bob.log.snapshots[0]);
  assert.deepEqual(snap.members.map((m) => m.user), ["alice"]);
  await alice.setStatus("busy", "in a call");
  await eventually("bob sees alice busy", () => bob.presence("alice")?.status === "busy");
  assert.equal(bob.presence("alice").text, "in a call");
  const seqs = bob.log.presence.filter((p) => p.user === "alice" && !p.group).map((p) => p.seq);
  assert.ok(seqs.every((s, i) => i === 0 || s > seqs[i - 1]), `seqs ascend: ${seqs}`);
  // The server's error reaches the op's promise.
  await assert.rejects(bob.setStatus("sleeping"), (e) => e.code === "bad_request");
  alice.close();
  bob.close();
});

test("a kick (4003) stops the client and says so", async () => {
  const carol = client("carol");
  await carol.connect();
  const r = await server.request("POST", "/api/users/carol/kick");
  assert.equal(r.status, 200);
  await eventually("closed", () => carol.state === "closed");
  assert.equal(carol.log.states.at(-1).code, 4003);
  assert.ok(carol.log.errors.some((e) => e.code === "closed_4003"), JSON.stringify(carol.log.errors));
  await new Promise((r2) => setTimeout(r2, 800));
  assert.equal(carol.state, "closed", "no reconnect after a kick");
  const carolNow = await server.get("/api/users/carol");
  assert.equal(carolNow.status, "offline");
  assert.deepEqual(carolNow.sessions, []);
});

test("an expiring token is refreshed without a disconnect; a static one gets 4001", async () => {
  let minted = 0;
  const dan = client("dan", {
    getToken: () => {
      minted += 1;
      return token("dan", { ttlS: 3 });
    },
    refreshBeforeMs: 1_500,
  });
  const eve = client("eve", { token: token("eve", { ttlS: 2 }) });
  await dan.connect();
  await eve.connect();
  const session = dan.log.states.find((s) => s.state === "connected").session;
  await eventually("eve's token expires", () => eve.state === "closed", 6_000);
  assert.ok(eve.log.errors.some((e) => e.code === "closed_4001"));
  await new Promise((r) => setTimeout(r, 4_000 - 2_000));
  assert.equal(dan.state, "connected");
  assert.ok(minted >= 3, `refreshed before each expiry: ${minted} tokens`);
  assert.deepEqual(dan.log.states.map((s) => s.state), ["connecting", "connected"]);
  assert.equal((await server.get("/api/users/dan")).sessions[0].id, session, "the same session");
  dan.close();
});

test("after a restart the client reconnects, resubscribes, restores its status and converges", async () => {
  const fay = client("fay");
  const gus = client("gus");
  await fay.connect();
  await gus.connect();
  await gus.watch("fay");
  await fay.setStatus("away", "lunch");
  await eventually("gus sees fay away", () => gus.presence("fay")?.status === "away");
  await server.restart();
  await eventually("both back", () => fay.state === "connected" && gus.state === "connected", 15_000);
  assert.ok(fay.log.states.some((s) => s.code === 1001), "closed with 1001");
  // fay's status came back with her; gus resubscribed and his cache holds it.
  await eventually("fay away again", async () => (await server.get("/api/users/fay"))?.status === "away");
  await eventually("gus's cache converges", () => gus.presence("fay")?.status === "away");
  await fay.setStatus("busy");
  await eventually("live again", () => gus.presence("fay")?.status === "busy");
  fay.close();
  gus.close();
});

test("a server that goes silent is left after two heartbeats", async () => {
  const hal = client("hal");
  await hal.connect();
  server.child.kill("SIGSTOP");
  try {
    await eventually("the watchdog gives up", () => hal.log.states.some((s) => s.reason === "heartbeat timeout"), 5_000);
  } finally {
    server.child.kill("SIGCONT");
  }
  await eventually("reconnected", () => hal.state === "connected", 15_000);
  hal.close();
});
