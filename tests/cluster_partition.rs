//! Issue #12, test 4: a real network partition (docs/CLUSTER.md, "Partitions"), made with Linux
//! network namespaces, a real `nats-server` and real `presenced` processes.
//!
//! Node P runs in a namespace of its own, reached over two veth pairs:
//! - "bus": P ↔ the root namespace, where `nats-server` listens on the host end's address;
//! - "clients": the test's WebSocket clients (in the root namespace) ↔ P's listen and admin
//!   addresses.
//!
//! Nodes A and B run in the root namespace on 127.0.0.1 and reach the same `nats-server` without
//! any veth. The partition takes the namespace's end of the bus pair down: P loses the bus while
//! its clients still reach it, and the rest of the cluster keeps its bus. The heal brings it up.
//! No packet is refused: TCP simply stops getting through, as when a cable or a switch goes.
//!
//! Creating namespaces needs root and iproute2's `ip`. Without them the test fails and says so:
//! it never skips.

mod common;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::nats::Nats;
use common::{
    eventually_within, log_file, serve_cmd, spawn_serve, token, Client, Served, PRESENCED, SECRET,
};
use presenced::shard::now_ms;
use serde_json::Value;
use tungstenite::Message;

const LEASE_MS: u64 = 1_500;
const ADMIN_TOKEN: &str = "partition-admin-token-0123456789";
/// A bounded wait for anything that takes a lease, a heartbeat, a snapshot and, after the heal,
/// TCP's retransmission back-off on the link that was down.
const CONVERGE: Duration = Duration::from_secs(15);
/// Namespaces this test creates: the prefix, then the test process's pid.
const NS_PREFIX: &str = "presenced-part-";
/// Host ends of the veth pairs: the prefix, the pid, then `b` (bus) or `c` (clients). At most
/// 3 + 7 + 1 characters, under the 15 an interface name may have.
const LINK_PREFIX: &str = "prt";
/// The namespace's ends of the pairs (names are per namespace).
const NS_BUS: &str = "bus0";
const NS_CLIENTS: &str = "cli0";
/// Node P's ports, on the namespace's end of the clients pair: nothing else listens there.
const P_PORT: u16 = 8080;
const P_ADMIN: u16 = 9090;

/// `ip`: from `PATH`, or where iproute2 puts it.
fn ip_bin() -> PathBuf {
    let on_path: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("ip")).collect())
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain(["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"].map(PathBuf::from))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "the partition test needs iproute2's `ip` (network namespaces, veth pairs), and \
                 there is none on PATH or in /usr/sbin, /sbin, /usr/bin, /bin: install iproute2"
            )
        })
}

/// Runs `ip ARGS`, whatever comes of it.
fn ip_try(args: &[&str]) -> Output {
    Command::new(ip_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip {}`: {e}", args.join(" ")))
}

/// Runs `ip ARGS`; fails the test with `ip`'s words when it fails. Returns stdout.
fn ip(args: &[&str]) -> String {
    let out = ip_try(args);
    assert!(
        out.status.success(),
        "`ip {}` failed ({}): {}\nThe partition test needs root (or CAP_NET_ADMIN and \
         CAP_SYS_ADMIN) to create network namespaces and veth pairs.",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace with node P's two links to the root namespace. Everything is removed on
/// drop, a failing test's unwinding included.
struct Netns {
    name: String,
    /// Host ends of the bus and clients pairs.
    bus_host: String,
    clients_host: String,
    /// The third octet of this test's addresses: 10.231.`net`.0/29.
    net: u8,
}

impl Netns {
    /// Creates the namespace and both veth pairs, addressed and up:
    /// - bus: 10.231.`net`.1 (host) ↔ 10.231.`net`.2 (namespace), a /30;
    /// - clients: 10.231.`net`.5 (host) ↔ 10.231.`net`.6 (namespace), a /30.
    fn create() -> Netns {
        // SAFETY: geteuid(2) has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "the partition test must run as root: it creates network namespaces and veth \
             pairs (euid is {euid})"
        );
        sweep_stale();
        let pid = std::process::id();
        let ns = Netns {
            name: format!("{NS_PREFIX}{pid}"),
            bus_host: format!("{LINK_PREFIX}{pid}b"),
            clients_host: format!("{LINK_PREFIX}{pid}c"),
            net: pick_net(pid),
        };
        // From here on, a failure unwinds through `Drop`, which removes what was made.
        let name = ns.name.as_str();
        ip(&["netns", "add", name]);
        ip(&["-n", name, "link", "set", "lo", "up"]);
        for (host, inside, (h, n)) in [
            (&ns.bus_host, NS_BUS, (ns.bus_host_ip(), ns.bus_ns_ip())),
            (
                &ns.clients_host,
                NS_CLIENTS,
                (ns.clients_host_ip(), ns.p_ip()),
            ),
        ] {
            ip(&[
                "link", "add", host, "type", "veth", "peer", "name", inside, "netns", name,
            ]);
            ip(&["addr", "add", &format!("{h}/30"), "dev", host]);
            ip(&["link", "set", host, "up"]);
            ip(&["-n", name, "addr", "add", &format!("{n}/30"), "dev", inside]);
            ip(&["-n", name, "link", "set", inside, "up"]);
        }
        ns
    }

    fn ip4(&self, last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 231, self.net, last)
    }

    /// Where `nats-server` listens (the bus pair's host end).
    fn bus_host_ip(&self) -> Ipv4Addr {
        self.ip4(1)
    }

    fn bus_ns_ip(&self) -> Ipv4Addr {
        self.ip4(2)
    }

    fn clients_host_ip(&self) -> Ipv4Addr {
        self.ip4(5)
    }

    /// Node P's listen and admin address (the clients pair's namespace end).
    fn p_ip(&self) -> Ipv4Addr {
        self.ip4(6)
    }

    /// Cuts P off the bus: the namespace's end of the bus pair goes down, so nothing crosses
    /// either way (the host end loses its carrier), and no one is told.
    fn partition(&self) {
        ip(&["-n", &self.name, "link", "set", NS_BUS, "down"]);
    }

    fn heal(&self) {
        ip(&["-n", &self.name, "link", "set", NS_BUS, "up"]);
    }

    /// `ip netns exec NAME program`: `ip` enters the namespace and execs the program, so the
    /// child's pid is the program's (checked in [`Node::start_in`]).
    fn exec(&self, program: &str) -> Command {
        let mut cmd = Command::new(ip_bin());
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// The pids of processes in the namespace.
    fn pids(&self) -> Vec<String> {
        ip(&["netns", "pids", &self.name])
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its veth ends, and a veth pair goes with either end;
        // the host ends are deleted too in case a process still holds the namespace alive.
        let _ = ip_try(&["netns", "del", &self.name]);
        for host in [&self.bus_host, &self.clients_host] {
            let _ = ip_try(&["link", "del", host]);
        }
    }
}

/// Removes namespaces and host-side links that an earlier run of this test left behind when it
/// was killed before its `Drop` ran (their pid is no longer alive).
fn sweep_stale() {
    let dead = |pid: &str| {
        !pid.is_empty()
            && pid.bytes().all(|b| b.is_ascii_digit())
            && !std::path::Path::new("/proc").join(pid).exists()
    };
    for line in ip(&["netns", "list"]).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if name.strip_prefix(NS_PREFIX).is_some_and(dead) {
            let _ = ip_try(&["netns", "del", name]);
        }
    }
    for line in ip(&["-o", "link", "show"]).lines() {
        // "7: prt123b@if6: <…>"
        let Some(name) = line
            .split(": ")
            .nth(1)
            .map(|n| n.split('@').next().unwrap_or(n))
        else {
            continue;
        };
        let pid = name
            .strip_prefix(LINK_PREFIX)
            .and_then(|r| r.strip_suffix('b').or_else(|| r.strip_suffix('c')));
        if pid.is_some_and(dead) {
            let _ = ip_try(&["link", "del", name]);
        }
    }
}

/// A third octet for 10.231.x.0/29 that no address or route of the root namespace uses yet,
/// starting from one derived from the pid (runs side by side pick different ones).
fn pick_net(pid: u32) -> u8 {
    let taken = ip(&["-o", "-4", "addr", "show"]) + &ip(&["-4", "route", "show", "table", "all"]);
    (0..=255u32)
        .map(|i| ((pid + i) % 256) as u8)
        .find(|x| !taken.contains(&format!("10.231.{x}.")))
        .expect("a free 10.231.x.0/24 in the root namespace")
}

/// One `presenced serve` process.
struct Node {
    id: String,
    addr: SocketAddr,
    admin: SocketAddr,
    served: Served,
}

impl Node {
    /// A node in the root namespace, on loopback.
    fn start(id: &str, nats: &str) -> Node {
        let (port, admin) = (common::free_port(), common::free_port());
        let mut cmd = serve_cmd(port, admin);
        let node = Node::spawn(
            id,
            nats,
            &mut cmd,
            SocketAddr::from(([127, 0, 0, 1], port)),
            SocketAddr::from(([127, 0, 0, 1], admin)),
        );
        node.wait_ready();
        node
    }

    /// A node in `ns`, listening on the clients pair's namespace end.
    fn start_in(ns: &Netns, id: &str, nats: &str) -> Node {
        let (addr, admin) = (
            SocketAddr::from((ns.p_ip(), P_PORT)),
            SocketAddr::from((ns.p_ip(), P_ADMIN)),
        );
        let mut cmd = ns.exec(PRESENCED);
        cmd.args(["serve", "--listen", &addr.to_string()])
            .args(["--shards", "2", "--placement", "unbound"])
            .args(["--admin-listen", &admin.to_string()]);
        let node = Node::spawn(id, nats, &mut cmd, addr, admin);
        // `ip netns exec` execs the program in its own process: killing the child's pid kills
        // presenced, and nothing is left in the namespace after it.
        let want = std::fs::canonicalize(PRESENCED).unwrap();
        let pid = node.served.child.id();
        eventually_within(
            &format!("`ip netns exec` to exec presenced as pid {pid}"),
            CONVERGE,
            || {
                let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
                (exe == want).then_some(())
            },
        );
        node.wait_ready();
        node
    }

    fn spawn(id: &str, nats: &str, cmd: &mut Command, addr: SocketAddr, admin: SocketAddr) -> Node {
        cmd.args(["--jwt-secret", SECRET, "--nats-url", nats, "--node-id", id])
            .args(["--cluster-lease-ms", &LEASE_MS.to_string()])
            .args(["--admin-token", ADMIN_TOKEN])
            .env("RUST_LOG", "presenced=trace")
            .stdin(Stdio::null())
            .stdout(log_file(id))
            .stderr(Stdio::null());
        // SAFETY: prctl(2) is async-signal-safe. Should the test process die without unwinding,
        // the node dies with it instead of holding the namespace.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        Node {
            id: id.to_owned(),
            addr,
            admin,
            served: spawn_serve(cmd),
        }
    }

    /// `/readyz`'s body when it answers 200.
    fn readyz(&self) -> Option<Value> {
        let s = TcpStream::connect_timeout(&self.admin, Duration::from_secs(1)).ok()?;
        let (code, body) = common::raw_request_from(
            s,
            "GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        if code != 200 {
            return None;
        }
        serde_json::from_str(&body).ok()
    }

    /// Waits until `/readyz` satisfies `want`; returns that body.
    fn wait_readyz(&self, what: &str, want: impl Fn(&Value) -> bool) -> Value {
        eventually_within(&format!("{}: {what}", self.id), CONVERGE, || {
            self.readyz().filter(|r| want(r))
        })
    }

    fn wait_ready(&self) {
        self.wait_readyz("ready and on the bus", |r| {
            r["cluster"]["bus"] == "connected"
        });
    }

    /// Waits until this node sees `n` nodes in all (itself included).
    fn wait_nodes(&self, n: u64) -> Value {
        self.wait_readyz(&format!("sees {n} nodes"), |r| r["cluster"]["nodes"] == n)
    }

    fn connect(&self, sub: &str) -> Client {
        Client::connect(self.addr, &token(sub))
    }
}

/// The latest presence a watcher has of each user.
type Seen = HashMap<String, Value>;

/// A WebSocket client watching some users: it reads every presence event, keeps the latest per
/// user, and checks on each that the user's `seq` never goes back and that its `steady` users,
/// once online, never go offline.
struct Watcher {
    name: String,
    client: Client,
    seen: Seen,
    seq: HashMap<String, u64>,
    /// Users whose devices this watcher's side never loses: offline after online is a bug.
    steady: Vec<String>,
    /// Steady users seen online so far.
    armed: Vec<String>,
}

impl Watcher {
    fn new(name: &str, node: &Node, users: &[&str], steady: &[&str]) -> Watcher {
        let mut client = node.connect(name);
        let snaps = client.subscribe(users);
        let mut w = Watcher {
            name: format!("{name} (on {})", node.id),
            client,
            seen: Seen::new(),
            seq: HashMap::new(),
            steady: steady.iter().map(|s| s.to_string()).collect(),
            armed: Vec::new(),
        };
        for v in snaps {
            w.record(v);
        }
        w
    }

    fn record(&mut self, v: Value) {
        let user = v["user"].as_str().expect("a user").to_owned();
        let seq = v["seq"].as_u64().expect("a seq");
        let last = self.seq.entry(user.clone()).or_insert(0);
        assert!(
            seq >= *last,
            "{}: seq of {user} went back: {seq} after {last}: {v}",
            self.name
        );
        *last = seq;
        if self.steady.contains(&user) {
            let offline = v["status"] == "offline";
            assert!(
                !(offline && self.armed.contains(&user)),
                "{}: {user} went offline though its device never left this side: {v}",
                self.name
            );
            if !offline && !self.armed.contains(&user) {
                self.armed.push(user.clone());
            }
        }
        self.seen.insert(user, v);
    }

    /// Reads events until `want` holds of what this watcher has seen; fails after `patience`
    /// with the last state. Returns how long it took.
    fn until(&mut self, what: &str, patience: Duration, want: impl Fn(&Seen) -> bool) -> Duration {
        let start = Instant::now();
        let deadline = start + patience;
        while !want(&self.seen) {
            let now = Instant::now();
            assert!(
                now < deadline,
                "{}: no {what} within {patience:?}; last seen: {:?}",
                self.name,
                self.seen
            );
            self.read_one(deadline - now);
        }
        start.elapsed()
    }

    /// Waits at most `within` (and 200 ms at most) for one frame and records it when it is a
    /// direct presence event.
    fn read_one(&mut self, within: Duration) {
        let wait = within
            .min(Duration::from_millis(200))
            .max(Duration::from_millis(1));
        self.client
            .ws
            .get_ref()
            .set_read_timeout(Some(wait))
            .unwrap();
        match self.client.ws.read() {
            Ok(Message::Text(t)) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "presence" && v.get("group").is_none() {
                    self.record(v);
                }
            }
            Ok(Message::Ping(_) | Message::Pong(_)) => {}
            Ok(other) => panic!("{}: unexpected frame {other:?}", self.name),
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("{}: the connection failed: {e}", self.name),
        }
    }

    fn of(&self, user: &str) -> &Value {
        &self.seen[user]
    }
}

/// `user` is `status` with `devices` devices.
fn is(s: &Seen, user: &str, status: &str, devices: u64) -> bool {
    s.get(user)
        .is_some_and(|v| v["status"] == status && v["devices"] == devices)
}

/// Test 4: node P is cut off the bus. Each side keeps serving its own clients and drops the
/// other's presence within a lease; what changes on either side meanwhile stays there. After
/// the heal every watcher converges on the truth, and no `seq` goes back.
#[test]
fn a_partitioned_node_serves_locally_and_everyone_converges_after_the_heal() {
    let started = Instant::now();
    // Dropped last (declared first): the nodes are gone before the namespace is deleted.
    let net = Netns::create();
    let nats = Nats::start_on(net.bus_host_ip());
    let url = nats.url();
    let p = Node::start_in(&net, "node-p", &url);
    let a = Node::start("node-a", &url);
    let b = Node::start("node-b", &url);
    for n in [&p, &a, &b] {
        n.wait_nodes(3);
    }

    let mut u1_on_p = p.connect("u1");
    let _u2_on_a = a.connect("u2");
    let mut wp = Watcher::new("watcher-p", &p, &["u1", "u2"], &["u1"]);
    let mut wb = Watcher::new("watcher-b", &b, &["u1", "u2"], &["u2"]);
    for w in [&mut wp, &mut wb] {
        w.until("u1 and u2 online", CONVERGE, |s| {
            is(s, "u1", "online", 1) && is(s, "u2", "online", 1)
        });
    }

    // The partition.
    let cut_ms = now_ms();
    net.partition();
    let cut = Instant::now();

    // B's side drops P's share of u1 after a lease: offline, last seen at P's last heartbeat
    // that got through (before the cut). u2, whose device is on A, stays online.
    let took = wb.until("u1 offline", CONVERGE, |s| s["u1"]["status"] == "offline");
    let u1 = wb.of("u1");
    assert_eq!(u1["devices"], 0, "{u1}");
    let last_seen = u1["last_seen"].as_u64().expect("last_seen set");
    assert!(
        last_seen + LEASE_MS >= cut_ms && last_seen <= cut_ms + 250,
        "u1's last_seen {last_seen} is P's last heartbeat before the cut at {cut_ms}"
    );
    assert!(is(&wb.seen, "u2", "online", 1), "{:?}", wb.seen);
    assert!(
        took <= Duration::from_millis(LEASE_MS * 4),
        "B dropped P within a few leases: {took:?}"
    );
    // P's side does the same to A's share of u2; u1, local to P, stays online.
    wp.until("u2 offline", CONVERGE, |s| s["u2"]["status"] == "offline");
    assert!(wp.of("u2")["last_seen"].as_u64().is_some(), "{:?}", wp.seen);
    assert!(is(&wp.seen, "u1", "online", 1), "{:?}", wp.seen);
    let dropped_by_p = cut.elapsed();
    assert!(
        dropped_by_p <= Duration::from_millis(LEASE_MS * 4),
        "P dropped A and B within a few leases: {dropped_by_p:?}"
    );

    // What the nodes say: P sees only itself, A and B each other, and P stays ready. P also
    // says it lost the bus: its probe (a request the NATS server itself answers) goes
    // unanswered, since a link that dies without a reset is never noticed by the client's own
    // pings while P keeps publishing heartbeats.
    let ready_p = p.wait_nodes(1);
    p.wait_readyz("P reports the bus lost", |r| {
        r["cluster"]["bus"] != "connected"
    });
    a.wait_nodes(2);
    b.wait_nodes(2);
    assert_eq!(ready_p["ready"], true, "P still serves: {ready_p}");

    // Both sides keep serving: a change on P reaches P's watcher only, a device on B reaches
    // B's watcher only.
    u1_on_p.set_status("busy", Some("partitioned"));
    wp.until("u1 busy", CONVERGE, |s| is(s, "u1", "busy", 1));
    let _u2_on_b = b.connect("u2");
    wb.until("u2 on two devices", CONVERGE, |s| is(s, "u2", "online", 2));
    // And it stays so: for two more leases nothing crosses or flaps back on either side (a
    // heartbeat that got through just before the cut, or a late snapshot, must not revive a
    // dropped node).
    let window = Instant::now() + Duration::from_millis(LEASE_MS * 2);
    while Instant::now() < window {
        for w in [&mut wp, &mut wb] {
            w.read_one(Duration::from_millis(50));
        }
        assert!(is(&wb.seen, "u1", "offline", 0), "B: {:?}", wb.seen);
        assert!(is(&wb.seen, "u2", "online", 2), "B: {:?}", wb.seen);
        assert!(is(&wp.seen, "u2", "offline", 0), "P: {:?}", wp.seen);
        assert!(is(&wp.seen, "u1", "busy", 1), "P: {:?}", wp.seen);
    }
    let bus_during = p.readyz().expect("P answers /readyz during the partition")["cluster"].clone();
    assert_eq!(bus_during["nodes"], 1, "{bus_during}");
    assert_ne!(bus_during["bus"], "connected", "{bus_during}");
    let partitioned_for = cut.elapsed();

    // The heal: each side hears the other's heartbeats again, asks for snapshots, converges.
    net.heal();
    let healed = Instant::now();
    let truth = |s: &Seen| is(s, "u1", "busy", 1) && is(s, "u2", "online", 2);
    wb.until("the truth after the heal", CONVERGE, truth);
    wp.until("the truth after the heal", CONVERGE, truth);
    assert_eq!(wb.of("u1")["text"], "partitioned", "{:?}", wb.seen);
    let converged = healed.elapsed();
    for n in [&p, &a, &b] {
        n.wait_nodes(3);
    }
    p.wait_ready();
    eprintln!(
        "partition: dropped by B in {took:?}, by P in {dropped_by_p:?}; P's cluster during it: \
         {bus_during}; partitioned for {partitioned_for:?}; converged {converged:?} after the \
         heal; {:?} in all",
        started.elapsed()
    );

    // Stopping P (killing the child `ip netns exec` became) leaves nothing in the namespace.
    drop(p);
    eventually_within("an empty namespace once P is killed", CONVERGE, || {
        net.pids().is_empty().then_some(())
    });
}
