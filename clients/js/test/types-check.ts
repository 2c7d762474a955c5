// Compiled by `tsc` (npm run typecheck), never run: the declarations must type an app's use of
// the client, and refuse a wrong one.
import { PresenceClient, type Presence, type StateChange } from "../src/index.js";

const client = new PresenceClient({
  url: "wss://presence.example.com/ws",
  getToken: async () => "jwt",
  device: "laptop",
  deviceType: "web",
  reconnect: { baseMs: 250 },
});
client.on("presence", (p: Presence) => p.status satisfies "online" | "away" | "busy" | "offline");
client.on("state", (s: StateChange) => s.state);
client.on("group_snapshot", (g) => g.members.map((m) => m.user));
await client.connect();
await client.watch(["alice", "bob"]);
await client.watchGroup("team");
await client.setStatus("busy", "in a call");
await client.activity("typing", "bob");
const known: Presence | undefined = client.presence("alice");
void known;
// @ts-expect-error: not a status
await client.setStatus("sleeping");
// @ts-expect-error: not an event
client.on("message", () => {});
client.close();
