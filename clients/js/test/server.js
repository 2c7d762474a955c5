// Test support: a real `presenced serve` on loopback ports, HS256 tokens, and the admin port.
// The binary is PRESENCED_BIN (the Rust test `tests/js_client.rs` sets it), else the debug
// build of this repository; a missing binary fails the tests, it never skips them.

import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
export const BIN = process.env.PRESENCED_BIN ?? join(here, "../../../target/debug/presenced");
export const SECRET = "sdk-test-secret-0123456789abcdef";
export const ADMIN_TOKEN = "sdk-admin-token-0123456789";

/** An HS256 JWT for `sub`, expiring in `ttlS` seconds. */
export function token(sub, { ttlS = 3600, groups } = {}) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const claims = { sub, exp: Math.floor(Date.now() / 1000) + ttlS, ...(groups ? { groups } : {}) };
  const head = `${b64({ alg: "HS256", typ: "JWT" })}.${b64(claims)}`;
  return `${head}.${createHmac("sha256", SECRET).update(head).digest("base64url")}`;
}

export function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

/** Polls `f` every 50 ms until it returns a truthy value, for at most `ms`. */
export async function eventually(what, f, ms = 10_000) {
  const until = Date.now() + ms;
  for (;;) {
    const v = await f();
    if (v) return v;
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

export class Server {
  /** Starts presenced on fresh ports (or `port`, to restart on the same address). */
  static async start({ port, admin, args = [] } = {}) {
    if (!existsSync(BIN)) {
      throw new Error(`no presenced binary at ${BIN}: run \`cargo build\` or set PRESENCED_BIN`);
    }
    const s = new Server();
    s.port = port ?? (await freePort());
    s.admin = admin ?? (await freePort());
    s.args = args;
    s.data = mkdtempSync(join(tmpdir(), "presenced-sdk-"));
    await s.spawn();
    return s;
  }

  async spawn() {
    this.child = spawn(BIN, [
      "serve", "--listen", `127.0.0.1:${this.port}`, "--admin-listen", `127.0.0.1:${this.admin}`,
      "--shards", "2", "--placement", "unbound", "--jwt-secret", SECRET,
      "--admin-token", ADMIN_TOKEN, "--data-dir", this.data, ...this.args,
    ], { stdio: ["ignore", "ignore", "inherit"] });
    this.exited = new Promise((r) => this.child.once("exit", r));
    await eventually("presenced ready", async () => (await this.get("/readyz").catch(() => null))?.ready, 20_000);
  }

  get url() {
    return `ws://127.0.0.1:${this.port}/ws`;
  }

  async request(method, path) {
    const r = await fetch(`http://127.0.0.1:${this.admin}${path}`, {
      method,
      headers: { authorization: `Bearer ${ADMIN_TOKEN}` },
    });
    const text = await r.text();
    try {
      return { status: r.status, body: JSON.parse(text) };
    } catch {
      return { status: r.status, body: text };
    }
  }

  async get(path) {
    return (await this.request("GET", path)).body;
  }

  /** SIGTERM: the server closes every session with 1001 and exits. */
  async stop() {
    if (this.child.exitCode === null) this.child.kill("SIGTERM");
    await this.exited;
  }

  /** Stops, then starts again on the same ports. */
  async restart() {
    await this.stop();
    await this.spawn();
  }

  async kill() {
    await this.stop();
    rmSync(this.data, { recursive: true, force: true });
  }
}
