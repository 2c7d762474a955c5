//! The cluster (SPEC §12, docs/CLUSTER.md): real `presenced` processes joined by a real
//! `nats-server` on loopback, real WebSocket clients on each node.
//!
//! Leases are short here (1.5 s, heartbeats every 0.5 s) so node loss shows quickly; every
//! wait is bounded.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::nats::Nats;
use common::{eventually_within, log_file, serve_cmd, spawn_serve, token, Client, Served, SECRET};
use presenced::auth::{mint_hs256, TokenSpec};
use serde_json::Value;

const LEASE_MS: u64 = 1_500;
const ADMIN_TOKEN: &str = "cluster-admin-token-0123456789";
/// Long enough for a lease to expire, a heartbeat to land and a snapshot to travel.
const CONVERGE: Duration = Duration::from_secs(10);

/// One `presenced serve` process in the cluster.
struct Node {
    id: String,
    addr: SocketAddr,
    admin: SocketAddr,
    served: Served,
}

impl Node {
    fn start(id: &str, nats: &str) -> Node {
        Node::start_with(id, nats, LEASE_MS)
    }

    fn start_with(id: &str, nats: &str, lease_ms: u64) -> Node {
        let (port, admin) = (common::free_port(), common::free_port());
        let mut cmd = serve_cmd(port, admin);
        cmd.args(["--jwt-secret", SECRET, "--nats-url", nats, "--node-id", id])
            .args(["--cluster-lease-ms", &lease_ms.to_string()])
            .args(["--admin-token", ADMIN_TOKEN])
            .env("RUST_LOG", "presenced=trace")
            .stdout(log_file(id))
            .stderr(Stdio::null());
        let node = Node {
            id: id.to_owned(),
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            admin: format!("127.0.0.1:{admin}").parse().unwrap(),
            served: spawn_serve(&mut cmd),
        };
        node.wait_ready();
        node
    }

    /// `/readyz`'s body when it answers 200.
    fn readyz(&self) -> Option<Value> {
        let s = std::net::TcpStream::connect_timeout(&self.admin, Duration::from_secs(1)).ok()?;
        let (code, body) = common::raw_request_from(
            s,
            "GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        if code != 200 {
            return None;
        }
        serde_json::from_str(&body).ok()
    }

    fn wait_ready(&self) {
        eventually_within(
            &format!("{} ready and on the bus", self.id),
            CONVERGE,
            || {
                self.readyz()
                    .filter(|r| r["cluster"]["bus"] == "connected")
                    .map(|_| ())
            },
        );
    }

    /// Waits until this node sees `n` nodes in all (itself included).
    fn wait_nodes(&self, n: u64) {
        eventually_within(&format!("{} sees {n} nodes", self.id), CONVERGE, || {
            self.readyz()
                .filter(|r| r["cluster"]["nodes"] == n)
                .map(|_| ())
        });
    }

    /// GET `path` on the admin port with the admin token: (status, body).
    fn admin_get(&self, path: &str) -> (u16, String) {
        let s = std::net::TcpStream::connect(self.admin).unwrap();
        common::raw_request_from(
            s,
            &format!(
                "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\
                 Connection: close\r\n\r\n"
            ),
        )
    }

    /// POST `path` on the admin port with the admin token: (status, body).
    fn admin_post(&self, path: &str) -> (u16, String) {
        let s = std::net::TcpStream::connect(self.admin).unwrap();
        common::raw_request_from(
            s,
            &format!(
                "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\
                 Content-Length: 0\r\nConnection: close\r\n\r\n"
            ),
        )
    }

    fn connect(&self, sub: &str) -> Client {
        Client::connect(self.addr, &token(sub))
    }

    /// Connects `sub` with `group` in its token.
    fn connect_in(&self, sub: &str, group: &str) -> Client {
        let mut spec = TokenSpec::new(sub, Duration::from_secs(3600));
        spec.groups = vec![group.into()];
        Client::connect(self.addr, &mint_hs256(SECRET, &spec))
    }

    fn pid(&self) -> i32 {
        self.served.child.id() as i32
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(self.pid(), sig) }, 0);
    }
}

/// Reads `user`'s presence events until `want` holds, checking that `seq` never goes back.
/// Returns the matching event.
fn until(c: &mut Client, user: &str, last_seq: &mut u64, want: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + CONVERGE;
    loop {
        assert!(Instant::now() < deadline, "timed out waiting on {user}");
        let v = c.presence_of(user);
        let seq = v["seq"].as_u64().unwrap();
        assert!(
            seq >= *last_seq,
            "seq went back: {seq} after {last_seq}: {v}"
        );
        *last_seq = seq;
        if want(&v) {
            return v;
        }
    }
}

/// Kills `nats` and keeps its port taken while it is down (a listener that never answers, so
/// nodes see a bus that does not speak), so no other test's server or port takes it before
/// [`Nats::restart`]. Drop the listener right before restarting.
fn take_down(nats: &mut Nats) -> std::net::TcpListener {
    nats.kill();
    std::net::TcpListener::bind(nats.addr()).expect("the bus port is ours again")
}

fn three(nats: &Nats) -> (Node, Node, Node) {
    let url = nats.url();
    let nodes = (
        Node::start("node-a", &url),
        Node::start("node-b", &url),
        Node::start("node-c", &url),
    );
    for n in [&nodes.0, &nodes.1, &nodes.2] {
        n.wait_nodes(3);
    }
    nodes
}

/// Tests 1 and 2 of the issue: one aggregate over devices on two nodes, in order; then node
/// loss by `kill -9`.
#[test]
fn devices_on_two_nodes_merge_for_a_watcher_on_a_third_and_node_loss_drops_them() {
    let nats = Nats::start();
    let (a, b, c) = three(&nats);
    let mut watcher = c.connect("watcher");
    let snap = watcher.subscribe(&["alice"]);
    assert_eq!(snap[0]["status"], "offline");
    let mut seq = snap[0]["seq"].as_u64().unwrap();

    let mut phone = a.connect("alice");
    until(&mut watcher, "alice", &mut seq, |v| {
        v["status"] == "online" && v["devices"] == 1
    });
    let mut laptop = b.connect("alice");
    until(&mut watcher, "alice", &mut seq, |v| v["devices"] == 2);

    // The highest status over both nodes; changes from either node arrive in order.
    phone.set_status("away", Some("on the train"));
    laptop.set_status("busy", Some("in a call"));
    let v = until(&mut watcher, "alice", &mut seq, |v| {
        v["status"] == "busy" && v["devices"] == 2
    });
    assert_eq!(v["text"], "in a call");
    laptop.set_status("away", Some("lunch"));
    let v = until(&mut watcher, "alice", &mut seq, |v| {
        v["status"] == "away" && v["text"] == "lunch"
    });
    assert_eq!(v["devices"], 2);
    phone.set_status("online", None);
    until(&mut watcher, "alice", &mut seq, |v| v["status"] == "online");

    // kill -9 node A: its device goes within a lease (no goodbye was said).
    let killed = Instant::now();
    a.signal(libc::SIGKILL);
    let v = until(&mut watcher, "alice", &mut seq, |v| v["devices"] == 1);
    assert_eq!(v["status"], "away", "only the laptop's status is left");
    assert!(
        killed.elapsed() < Duration::from_millis(LEASE_MS * 3),
        "dropped within about a lease: {:?}",
        killed.elapsed()
    );

    // kill B too: offline, last seen at B's last heartbeat (before the kill, within a beat).
    let before_kill = presenced::shard::now_ms();
    b.signal(libc::SIGKILL);
    let v = until(&mut watcher, "alice", &mut seq, |v| {
        v["status"] == "offline"
    });
    assert_eq!(v["devices"], 0);
    let last_seen = v["last_seen"].as_u64().expect("last_seen set");
    assert!(
        last_seen <= before_kill + 50 && last_seen + LEASE_MS >= before_kill,
        "last_seen {last_seen} is B's last heartbeat, just before {before_kill}"
    );
    drop((phone, laptop));
}

/// Test 3: a node frozen past the lease is dropped; thawed, it rejoins and everyone converges,
/// with `seq` never going back.
#[test]
fn a_frozen_node_is_dropped_then_rejoins_and_everyone_converges() {
    let nats = Nats::start();
    let (a, b, c) = three(&nats);
    let mut watcher_c = c.connect("w1");
    let mut watcher_b = b.connect("w2");
    let mut seq_c = watcher_c.subscribe(&["bob"])[0]["seq"].as_u64().unwrap();
    let mut seq_b = watcher_b.subscribe(&["bob"])[0]["seq"].as_u64().unwrap();
    let mut bob_a = a.connect("bob");
    bob_a.set_status("busy", Some("frozen soon"));
    let mut bob_c = c.connect("bob");
    bob_c.set_status("away", None);
    until(&mut watcher_c, "bob", &mut seq_c, |v| {
        v["devices"] == 2 && v["status"] == "busy"
    });
    until(&mut watcher_b, "bob", &mut seq_b, |v| {
        v["devices"] == 2 && v["status"] == "busy"
    });

    a.signal(libc::SIGSTOP);
    until(&mut watcher_c, "bob", &mut seq_c, |v| {
        v["devices"] == 1 && v["status"] == "away"
    });
    until(&mut watcher_b, "bob", &mut seq_b, |v| v["devices"] == 1);
    c.wait_nodes(2);

    a.signal(libc::SIGCONT);
    // A's session may or may not survive the freeze (A closes sockets silent for two
    // heartbeats, and the client's socket buffered meanwhile); either way every watcher
    // converges on what A really has, with seq rising.
    until(&mut watcher_c, "bob", &mut seq_c, |v| {
        v["devices"] == 2 && v["status"] == "busy"
    });
    until(&mut watcher_b, "bob", &mut seq_b, |v| {
        v["devices"] == 2 && v["status"] == "busy"
    });
    for n in [&a, &b, &c] {
        n.wait_nodes(3);
    }
}

/// Test 5 (one server): nats-server restarted; nodes reconnect and resync, nothing stays stale.
#[test]
fn nodes_resync_after_the_bus_restarts() {
    let mut nats = Nats::start();
    let (a, b, c) = three(&nats);
    let mut watcher = c.connect("w");
    let mut seq = watcher.subscribe(&["carol"])[0]["seq"].as_u64().unwrap();
    let mut carol = a.connect("carol");
    until(&mut watcher, "carol", &mut seq, |v| v["status"] == "online");

    let hold = take_down(&mut nats);
    // While the bus is down: changes on A cannot travel; each node serves its own clients.
    carol.set_status("away", Some("bus down"));
    let mut local = a.connect("w-local");
    assert_eq!(local.subscribe(&["carol"])[0]["status"], "away");
    let mut carol_b = b.connect("carol");
    carol_b.set_status("away", Some("also down"));

    drop(hold);
    nats.restart();
    for n in [&a, &b, &c] {
        n.wait_ready();
    }
    // After the restart: what changed while the bus was down arrives; seq keeps rising.
    until(&mut watcher, "carol", &mut seq, |v| {
        v["status"] == "away" && v["devices"] == 2
    });
    carol.set_status("busy", None);
    until(&mut watcher, "carol", &mut seq, |v| v["status"] == "busy");
}

/// Test 5 (two routed servers): the one a node uses dies; it fails over to the other.
#[test]
fn nodes_fail_over_between_routed_nats_servers() {
    let (mut n1, n2) = Nats::cluster2();
    let both = format!("{},{}", n1.url(), n2.url());
    let a = Node::start("node-a", &n1.url());
    let b = Node::start("node-b", &both);
    let c = Node::start("node-c", &n2.url());
    for n in [&a, &b, &c] {
        n.wait_nodes(3);
    }
    let mut watcher = c.connect("w");
    let mut seq = watcher.subscribe(&["dave"])[0]["seq"].as_u64().unwrap();
    let mut dave = b.connect("dave");
    until(&mut watcher, "dave", &mut seq, |v| v["status"] == "online");

    n1.kill();
    // A knew only n1 at start, but learned n2 from it (NATS gossips its cluster's URLs).
    for n in [&a, &b] {
        n.wait_ready();
    }
    dave.set_status("busy", Some("failed over"));
    until(&mut watcher, "dave", &mut seq, |v| v["status"] == "busy");
    let _dave_a = a.connect("dave");
    until(&mut watcher, "dave", &mut seq, |v| v["devices"] == 2);
}

/// Test 7: a second live node with the same id is refused at start with a clear error.
#[test]
fn a_duplicate_node_id_is_refused_with_a_clear_error() {
    let nats = Nats::start();
    let _a = Node::start("same-name", &nats.url());
    let (port, admin) = (common::free_port(), common::free_port());
    let data = tempfile::tempdir().unwrap();
    let out = serve_cmd(port, admin)
        .args(["--jwt-secret", SECRET, "--nats-url", &nats.url()])
        .args(["--node-id", "same-name"])
        .arg("--data-dir")
        .arg(data.path())
        .output()
        .unwrap();
    assert!(!out.status.success(), "the duplicate must not start");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("node_id `same-name` is already used by a live node"),
        "{err}"
    );
}

/// Test 7: bad `[cluster]` settings are refused at start, naming the key.
#[test]
fn bad_cluster_settings_are_refused_naming_the_key() {
    let cases: &[(&[&str], &str)] = &[
        (&["--nats-url", "http://x:1"], "cluster.nats_url"),
        (
            &["--nats-url", "nats://127.0.0.1:1", "--node-id", "a.b"],
            "cluster.node_id",
        ),
        (
            &[
                "--nats-url",
                "nats://127.0.0.1:1",
                "--cluster-lease-ms",
                "5",
            ],
            "cluster.lease_ms",
        ),
        (
            &["--nats-url", "nats://127.0.0.1:1", "--cluster-buckets", "0"],
            "cluster.buckets",
        ),
    ];
    for (args, want) in cases {
        let out = Command::new(common::PRESENCED)
            .args(["check-config", "--jwt-secret", SECRET])
            .args(*args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} refused");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

/// A bus that is not there at start: the node serves its own clients, says why on `/readyz`,
/// and joins when the bus comes up.
#[test]
fn a_node_without_its_bus_serves_locally_and_joins_later() {
    let mut nats = Nats::start();
    let url = nats.url();
    let hold = take_down(&mut nats);
    let (port, admin) = (common::free_port(), common::free_port());
    let mut cmd = serve_cmd(port, admin);
    cmd.args([
        "--jwt-secret",
        SECRET,
        "--nats-url",
        &url,
        "--node-id",
        "lonely",
    ])
    .args(["--cluster-lease-ms", &LEASE_MS.to_string()])
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let lonely = Node {
        id: "lonely".into(),
        addr: format!("127.0.0.1:{port}").parse().unwrap(),
        admin: format!("127.0.0.1:{admin}").parse().unwrap(),
        served: spawn_serve(&mut cmd),
    };
    let r = eventually_within("ready without the bus", CONVERGE, || lonely.readyz());
    assert_ne!(r["cluster"]["bus"], "connected", "{r}");
    assert!(
        r["cluster"]["why"].as_str().unwrap().contains("NATS"),
        "{r}"
    );
    let mut w = lonely.connect("w");
    w.subscribe(&["erin"]);
    let _erin = lonely.connect("erin");
    assert_eq!(
        w.presence_of("erin")["status"],
        "online",
        "local presence works"
    );

    drop(hold);
    nats.restart();
    lonely.wait_ready();
    let other = Node::start("other", &url);
    other.wait_nodes(2);
    let mut remote = other.connect("w2");
    let mut seq = remote.subscribe(&["erin"])[0]["seq"].as_u64().unwrap();
    until(&mut remote, "erin", &mut seq, |v| v["status"] == "online");
}

/// A node that stops cleanly (SIGTERM) says goodbye: its sessions' ends reach the others at
/// once, not after a lease (here a long one, so waiting for it would fail the test).
#[test]
fn a_node_stopping_cleanly_takes_its_devices_away_at_once() {
    let nats = Nats::start();
    let url = nats.url();
    let lease = 30_000;
    let a = Node::start_with("node-a", &url, lease);
    let c = Node::start_with("node-c", &url, lease);
    a.wait_nodes(2);
    c.wait_nodes(2);
    let mut watcher = c.connect("w");
    let mut seq = watcher.subscribe(&["frank"])[0]["seq"].as_u64().unwrap();
    let _frank = a.connect("frank");
    until(&mut watcher, "frank", &mut seq, |v| v["status"] == "online");
    let stopped = Instant::now();
    a.signal(libc::SIGTERM);
    until(&mut watcher, "frank", &mut seq, |v| {
        v["status"] == "offline"
    });
    assert!(
        stopped.elapsed() < Duration::from_secs(8),
        "offline long before the {lease} ms lease: {:?}",
        stopped.elapsed()
    );
}

/// The admin port of a cluster node: `/api/stats` lists the other nodes with their admin URLs,
/// `/metrics` carries the bus families, and every one of them is documented.
#[test]
fn the_admin_port_reports_the_cluster_and_documents_every_family() {
    let nats = Nats::start();
    let a = Node::start("node-a", &nats.url());
    let b = Node::start("node-b", &nats.url());
    a.wait_nodes(2);
    let _u = b.connect("gina");
    // Heartbeats carry the counts: wait for B's connection to show on A.
    let stats = eventually_within("B's connection in A's stats", CONVERGE, || {
        let (code, body) = a.admin_get("/api/stats");
        assert_eq!(code, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        (v["cluster"]["totals"]["connections"] == 1).then_some(v)
    });
    let c = &stats["cluster"];
    assert_eq!(c["node"], "node-a");
    assert_eq!(c["bus"], "connected");
    assert_eq!(c["totals"]["nodes"], 2);
    let other = &c["nodes"][0];
    assert_eq!(other["node"], "node-b");
    assert_eq!(other["admin"], format!("http://{}", b.admin), "{other}");
    assert_eq!(other["connections"], 1);

    let (code, text) = a.admin_get("/metrics");
    assert_eq!(code, 200);
    assert!(
        text.contains("presenced_cluster_bus_state{state=\"connected\"} 1"),
        "{text}"
    );
    assert!(text.contains("presenced_cluster_nodes 2"), "{text}");
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/ADMIN.md")).unwrap();
    let families: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE presenced_cluster_"))
        .map(|l| l.split(' ').next().unwrap())
        .collect();
    assert!(families.len() > 15, "{families:?}");
    for f in families {
        assert!(
            doc.contains(&format!("`presenced_cluster_{f}`")),
            "presenced_cluster_{f} is not in docs/ADMIN.md"
        );
    }
}

/// Test 6 (groups): a group feed on one node shows members whose devices are on other nodes,
/// with one aggregate per member, and sees them leave.
#[test]
fn group_feeds_show_members_on_other_nodes() {
    let nats = Nats::start();
    let (a, b, c) = three(&nats);
    let mut watcher = c.connect("gw");
    let ack = watcher.request(serde_json::json!({"op":"subscribe_group","group":"team"}));
    assert_eq!(ack["type"], "ack", "{ack}");
    let snap = watcher.recv_until("the group snapshot", |v| v["type"] == "group_snapshot");
    assert_eq!(snap["members"], serde_json::json!([]), "{snap}");
    let mut seq = 0;
    let member = |n: &Node, user: &str| n.connect_in(user, "team");
    let mut on_a = member(&a, "ivy");
    let ev = group_until(&mut watcher, "ivy", &mut seq, |v| v["status"] == "online");
    assert_eq!(ev["devices"], 1);
    on_a.set_status("away", Some("far"));
    let mut on_b = member(&b, "ivy");
    on_b.set_status("busy", None);
    group_until(&mut watcher, "ivy", &mut seq, |v| {
        v["status"] == "busy" && v["devices"] == 2
    });
    // A device outside the group adds to the aggregate but not to membership.
    let _plain = a.connect("ivy");
    group_until(&mut watcher, "ivy", &mut seq, |v| v["devices"] == 3);
    drop(on_b);
    group_until(&mut watcher, "ivy", &mut seq, |v| {
        v["devices"] == 2 && v["status"] == "online"
    });
    // The last member session goes: ivy leaves the group (offline there), though still online.
    drop(on_a);
    group_until(&mut watcher, "ivy", &mut seq, |v| v["status"] == "offline");
}

/// Reads `user`'s events on the `team` feed until `want` holds; `seq` never goes back.
fn group_until(c: &mut Client, user: &str, last: &mut u64, want: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + CONVERGE;
    loop {
        assert!(
            Instant::now() < deadline,
            "timed out waiting on {user} in team"
        );
        let v = c.recv_until(&format!("{user} in team"), |v| {
            v["type"] == "presence" && v["user"] == user && v["group"] == "team"
        });
        let seq = v["seq"].as_u64().unwrap();
        assert!(seq >= *last, "seq went back: {seq} after {last}: {v}");
        *last = seq;
        if want(&v) {
            return v;
        }
    }
}

/// Test 6 (activity): `activity` reaches watchers on other nodes, and `activity` with `to`
/// reaches that user's sessions on other nodes; never stored.
#[test]
fn activity_reaches_watchers_and_sessions_on_other_nodes() {
    let nats = Nats::start();
    let (a, b, c) = three(&nats);
    let mut watcher = c.connect("aw");
    let mut seq = watcher.subscribe(&["jack"])[0]["seq"].as_u64().unwrap();
    let mut kate = b.connect("kate");
    let mut jack = a.connect("jack");
    until(&mut watcher, "jack", &mut seq, |v| v["status"] == "online");
    // Directed activity follows the sessions of `to`: B says it has kate's within a batch, but
    // give the subscription a moment to reach the NATS server before the first send.
    let typed = eventually_within("activity to the watcher on C", CONVERGE, || {
        let ack = jack.request(serde_json::json!({"op":"activity","kind":"typing"}));
        assert_eq!(ack["type"], "ack", "{ack}");
        watcher.try_recv_for(Duration::from_millis(300), |v| v["type"] == "activity")
    });
    assert_eq!(
        (&typed["user"], &typed["kind"]),
        (&"jack".into(), &"typing".into())
    );
    let got = eventually_within("activity to kate's session on B", CONVERGE, || {
        let ack = jack.request(serde_json::json!({"op":"activity","kind":"poke","to":"kate"}));
        assert_eq!(ack["type"], "ack", "{ack}");
        kate.try_recv_for(Duration::from_millis(300), |v| v["type"] == "activity")
    });
    assert_eq!(
        (&got["user"], &got["kind"]),
        (&"jack".into(), &"poke".into())
    );
}

/// Test 6 (admin): lookups, online lists, group pages and kicks answer for the whole cluster
/// from any node; a node that does not answer is named.
#[test]
fn admin_lookups_and_kicks_work_from_any_node_and_name_missing_nodes() {
    let nats = Nats::start();
    let (a, b, c) = three(&nats);
    let member = |n: &Node, user: &str| n.connect_in(user, "crew");
    let mut on_a = member(&a, "liam");
    on_a.set_status("away", Some("at A"));
    let mut on_b = member(&b, "liam");
    on_b.set_status("busy", Some("at B"));
    let _mia = member(&b, "mia");
    let get = |n: &Node, path: &str| -> Value {
        let (code, body) = n.admin_get(path);
        assert_eq!(code, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap()
    };
    // Asked on C, where liam has no session: both sessions, each with its node.
    let u = eventually_within("liam's sessions from C", CONVERGE, || {
        let u = get(&c, "/api/users/liam");
        (u["sessions"].as_array().map_or(0, Vec::len) == 2).then_some(u)
    });
    let mut nodes: Vec<&str> = u["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["node"].as_str().unwrap())
        .collect();
    nodes.sort_unstable();
    assert_eq!(nodes, ["node-a", "node-b"]);
    assert_eq!((&u["status"], &u["devices"]), (&"busy".into(), &2.into()));
    assert_eq!(u["nodes_missing"], serde_json::json!([]));

    // The online list from C: liam once (two devices), mia.
    let online = get(&c, "/api/online");
    let users: Vec<(&str, u64)> = online["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["user"].as_str().unwrap(), r["devices"].as_u64().unwrap()))
        .collect();
    assert_eq!(users, [("liam", 2), ("mia", 1)], "{online}");
    // The group page from A: both members, once each.
    let g = get(&a, "/api/groups/crew");
    let members: Vec<&str> = g["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["user"].as_str().unwrap())
        .collect();
    assert_eq!(members, ["liam", "mia"], "{g}");
    assert_eq!(g["counts_exact"], true);

    // A session kick sent from C to the node serving it.
    let b_session = u["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["node"] == "node-b")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (code, body) = c.admin_post(&format!("/api/sessions/{b_session}/kick?node=node-b"));
    assert_eq!(code, 200, "{body}");
    assert_eq!(on_b.close_code(), 4003);
    // A user kick from C reaches A.
    let (code, body) = c.admin_post("/api/users/liam/kick");
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["kicked"], 1, "{v}");
    assert_eq!(on_a.close_code(), 4003);

    // A node that does not answer is named, not left out.
    b.signal(libc::SIGSTOP);
    let online = get(&c, "/api/online");
    assert_eq!(
        online["nodes_missing"],
        serde_json::json!(["node-b"]),
        "{online}"
    );
    b.signal(libc::SIGCONT);
}

/// A node whose bus died stops promptly on SIGTERM: the last flush to the bus is bounded.
#[test]
fn a_node_stops_promptly_when_its_bus_is_gone() {
    let mut nats = Nats::start();
    let mut a = Node::start("node-a", &nats.url());
    let _u = a.connect("nora");
    let _hold = take_down(&mut nats);
    eventually_within("A notices the bus is gone", CONVERGE, || {
        a.readyz().filter(|r| r["cluster"]["bus"] != "connected")
    });
    let asked = Instant::now();
    a.signal(libc::SIGTERM);
    let status = eventually_within("A exits after SIGTERM", CONVERGE, || {
        a.served.child.try_wait().unwrap()
    });
    assert!(status.success(), "{status}");
    assert!(
        asked.elapsed() < Duration::from_secs(8),
        "shutdown took {:?}",
        asked.elapsed()
    );
}

/// NATS credentials from `[cluster]`: the right ones join, wrong ones are refused by the NATS
/// server and `/readyz` says so (the node still serves its own clients).
#[test]
fn nats_credentials_from_the_config_are_used_and_a_refusal_is_reported() {
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    // Our own nats-server with a user and password. Its port is picked free, then bound by the
    // server: another test may take it meanwhile, so the server we reach is checked to be ours
    // (it asks for auth) and the start is retried on another port otherwise.
    let (port, _server) = (0..5)
        .find_map(|_| {
            let port = common::free_port();
            let mut server = Kill(
                Command::new(common::tools::nats_server())
                    .args(["-a", "127.0.0.1", "-p", &port.to_string()])
                    .args(["--user", "presenced", "--pass", "bus-secret-1"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap(),
            );
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && server.0.try_wait().unwrap().is_none() {
                if let Ok(info) =
                    common::nats::read_info(format!("127.0.0.1:{port}").parse().unwrap())
                {
                    return info
                        .contains("\"auth_required\":true")
                        .then_some((port, server));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            None
        })
        .expect("a nats-server with auth on a free port");
    let node = |id: &str, password: &str| {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("presenced.toml");
        std::fs::write(
            &config,
            format!(
                "[cluster]\nnats_url = [\"nats://127.0.0.1:{port}\"]\nnode_id = \"{id}\"\n\
                 user = \"presenced\"\npassword = \"{password}\"\nlease_ms = {LEASE_MS}\n"
            ),
        )
        .unwrap();
        let (p, admin) = (common::free_port(), common::free_port());
        let mut cmd = serve_cmd(p, admin);
        cmd.args(["--jwt-secret", SECRET, "--admin-token", ADMIN_TOKEN])
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let n = Node {
            id: id.into(),
            addr: format!("127.0.0.1:{p}").parse().unwrap(),
            admin: format!("127.0.0.1:{admin}").parse().unwrap(),
            served: spawn_serve(&mut cmd),
        };
        (n, dir)
    };
    let (good, _d1) = node("with-creds", "bus-secret-1");
    good.wait_ready();
    let (bad, _d2) = node("wrong-creds", "nope");
    let r = eventually_within("the refusal on /readyz", CONVERGE, || {
        bad.readyz().filter(|r| {
            r["cluster"]["why"]
                .as_str()
                .is_some_and(|w| w.contains("refused"))
        })
    });
    assert_ne!(r["cluster"]["bus"], "connected", "{r}");
    assert!(
        r["cluster"]["why"]
            .as_str()
            .unwrap()
            .contains("uthorization"),
        "{r}"
    );
    let mut w = bad.connect("w");
    assert_eq!(
        w.subscribe(&["x"])[0]["status"],
        "offline",
        "it still serves locally"
    );
    good.wait_nodes(1);
}

/// Bad input on the bus: a message that does not parse, and a forged contribution whose clock
/// runs far ahead, are counted and change nothing; the node keeps serving.
#[test]
fn forged_and_malformed_bus_messages_are_counted_and_change_nothing() {
    use std::io::{BufRead, BufReader, Write};
    let nats = Nats::start();
    let a = Node::start("node-a", &nats.url());
    let mut watcher = a.connect("w");
    let mut seq = watcher.subscribe(&["zed"])[0]["seq"].as_u64().unwrap();
    // A raw NATS client (the wire protocol is text): publish on zed's bucket.
    let bucket = presenced::presence::contrib::bucket_of("zed", 4096);
    let mut bus = std::net::TcpStream::connect(nats.addr()).unwrap();
    let mut info = String::new();
    BufReader::new(bus.try_clone().unwrap())
        .read_line(&mut info)
        .unwrap();
    assert!(info.starts_with("INFO "), "{info}");
    bus.write_all(b"CONNECT {\"verbose\":false}\r\n").unwrap();
    let subject = format!("presenced.d.{bucket}");
    let mut n = 0;
    // Until A's subscription to the bucket has reached the server (it follows the bucket as
    // soon as `w` subscribes, asynchronously), a message may find nobody: send again, bounded.
    let mut publish = || {
        n += 1;
        let forged = serde_json::json!({
            "node": "forger", "inc": 1, "bucket": bucket, "n": n,
            "shares": [["zed", {"status": "online", "devices": 1, "clock": u64::MAX / 2}]],
        })
        .to_string();
        let mut wire = String::new();
        for body in [forged.as_str(), "{not json"] {
            wire.push_str(&format!("PUB {subject} {}\r\n{body}\r\n", body.len()));
        }
        bus.write_all(wire.as_bytes()).unwrap();
    };
    let metric = |name: &str| -> u64 {
        let (_, text) = a.admin_get("/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    eventually_within("both counted", CONVERGE, || {
        publish();
        (metric("presenced_cluster_clock_ahead_total") >= 1
            && metric("presenced_cluster_malformed_total") >= 1)
            .then_some(())
    });
    watcher.expect_silence(Duration::from_millis(500));
    // Still serving, with seq where it was.
    let _zed = a.connect("zed");
    let v = until(&mut watcher, "zed", &mut seq, |v| v["status"] == "online");
    assert!(
        v["seq"].as_u64().unwrap() < 1 << 53,
        "seq was not dragged forward: {v}"
    );
}
