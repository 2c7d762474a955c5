//! Zero-downtime upgrades (issue 13, docs/OPERATIONS.md), end to end with the real binary:
//! `presenced upgrade` against a running `presenced serve`, real WebSocket clients on loopback.
//!
//! - Under load: 2,000 device sessions and watchers of all of them, with status churn; after the
//!   upgrade no reconnect was refused, no watcher saw a user go offline, no `seq` went back,
//!   `last_seen` was kept, and the old process is gone (every session is on the new one).
//! - Failures (the new binary exits, refuses its configuration, or hangs) leave the old process
//!   serving, say why, and a second upgrade during one is refused.
//! - The control socket refuses a peer of another uid.
//! - In a cluster (a real `nats-server`), another node sees nothing of an upgrade: the same
//!   incarnation, no gap in the numbers, no user offline; changes flow both ways after it.

mod common;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tungstenite::Message;

const PRESENCED: &str = env!("CARGO_BIN_EXE_presenced");

/// A `presenced serve` child with its own data directory and config file.
struct Node {
    served: Served,
    addr: SocketAddr,
    admin: SocketAddr,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Node {
    fn start(extra_toml: &str) -> Node {
        Node::start_env(extra_toml, &[])
    }

    fn start_env(extra_toml: &str, env: &[(&str, &str)]) -> Node {
        Node::start_full(extra_toml, "timeout_ms = 10000", env)
    }

    /// `extra_toml` at the top level, `upgrade_toml` in `[upgrade]`.
    fn start_full(extra_toml: &str, upgrade_toml: &str, env: &[(&str, &str)]) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let (port, admin) = (free_port(), free_port());
        let config = dir.path().join("presenced.toml");
        std::fs::write(&config, extra_toml).unwrap();
        let socket = dir.path().join("ctl.sock");
        let mut cmd = serve_cmd(port, admin);
        cmd.arg("--config")
            .arg(&config)
            .env("PRESENCED_JWT_SECRET", SECRET)
            .envs(env.iter().copied())
            .stdout(log_file(&format!("upgrade-node-{port}")))
            .stderr(log_file(&format!("upgrade-node-{port}-err")));
        // The control socket path goes in through the config: rewrite it with the path.
        let toml = format!("{extra_toml}\n[limits]\nhandshake_rate_per_ip = 0\n[upgrade]\nsocket = \"{}\"\n{upgrade_toml}\n# Shorter than the load test's drain: the old process must hold its drained sessions\n# until its drain is over, not only this long (else its watchers see them go offline).\nreattach_ms = 1000\n", socket.display());
        std::fs::write(&config, toml).unwrap();
        let served = spawn_serve(&mut cmd);
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
        eventually("the server listens", || TcpStream::connect(addr).ok());
        eventually("the control socket", || socket.exists().then_some(()));
        Node {
            served,
            addr,
            admin,
            socket,
            _dir: dir,
        }
    }

    fn pid(&self) -> u32 {
        self.served.child.id()
    }

    /// `presenced upgrade`, with `args`: (exit success, stdout + stderr).
    fn upgrade(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(PRESENCED)
            .arg("upgrade")
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }
}

/// Whether process `pid` still runs (a zombie counts as gone).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// A nonblocking client: reads what is there, never waits.
struct Peer {
    user: String,
    ws: tungstenite::WebSocket<TcpStream>,
    closed: Option<u16>,
}

fn open(addr: SocketAddr, user: &str) -> Result<Peer, String> {
    let stream = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut req =
        tungstenite::client::IntoClientRequest::into_client_request(format!("ws://{addr}/ws"))
            .unwrap();
    req.headers_mut().insert(
        "Authorization",
        format!("Bearer {}", token(user)).parse().unwrap(),
    );
    let (mut ws, _) =
        tungstenite::client::client(req, stream).map_err(|e| format!("upgrade: {e}"))?;
    match ws.read() {
        Ok(Message::Text(t)) if t.contains("\"welcome\"") => {}
        other => return Err(format!("no welcome: {other:?}")),
    }
    ws.get_ref().set_nonblocking(true).unwrap();
    Ok(Peer {
        user: user.to_owned(),
        ws,
        closed: None,
    })
}

impl Peer {
    /// Frames waiting now (JSON), noting a close.
    fn drain(&mut self) -> Vec<Value> {
        let mut out = Vec::new();
        loop {
            match self.ws.read() {
                Ok(Message::Text(t)) => out.push(serde_json::from_str(&t).unwrap()),
                Ok(Message::Close(f)) => {
                    self.closed = Some(f.map_or(1005, |f| f.code.into()));
                    return out;
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let _ = self.ws.flush();
                    return out;
                }
                Err(_) => {
                    self.closed.get_or_insert(1006);
                    return out;
                }
            }
        }
    }

    fn send(&mut self, v: Value) {
        let _ = self.ws.send(Message::text(v.to_string()));
    }
}

/// What one watcher has seen of each user: the last seq, and whether it ever saw offline.
#[derive(Default)]
struct Seen {
    seq: HashMap<String, u64>,
    last_seen: HashMap<String, Option<u64>>,
    offline: Vec<String>,
    backwards: Vec<String>,
}

impl Seen {
    fn note(&mut self, v: &Value) {
        if v["type"] != "presence" {
            return;
        }
        let user = v["user"].as_str().unwrap().to_owned();
        let seq = v["seq"].as_u64().unwrap();
        if v["status"] == "offline" {
            self.offline.push(format!("{user} at seq {seq}"));
        }
        let prev = self.seq.insert(user.clone(), seq).unwrap_or(0);
        if seq < prev {
            self.backwards.push(format!("{user}: {prev} then {seq}"));
        }
        self.last_seen.insert(user, v["last_seen"].as_u64());
    }
}

#[test]
fn an_upgrade_under_load_hands_over_presence_without_a_flap() {
    const DEVICES: usize = 2_000;
    const WATCHERS: usize = 20;
    let node = Node::start("drain_ms = 2000\n");
    let old_pid = node.pid();
    // A user that went offline once before the upgrade: its last_seen must survive it.
    let returning = open(node.addr, "returning").unwrap();
    drop(returning);
    std::thread::sleep(Duration::from_millis(200));
    let mut devices: Vec<Peer> = Vec::with_capacity(DEVICES + 1);
    for i in 0..DEVICES {
        devices.push(open(node.addr, &format!("u{i}")).expect("a device connects"));
    }
    devices.push(open(node.addr, "returning").unwrap());
    // Some set a status and text first.
    for (i, d) in devices.iter_mut().enumerate().filter(|(i, _)| i % 10 == 0) {
        d.send(json!({"op":"set_status","status":"away","text":format!("t{i}")}));
    }
    let users: Vec<String> = devices.iter().map(|d| d.user.clone()).collect();
    let per = users.len().div_ceil(WATCHERS);
    let subscribe = |w: &mut Peer, part: &[String]| {
        for chunk in part.chunks(100) {
            w.send(json!({"op":"subscribe","users":chunk}));
        }
    };
    let mut watchers: Vec<(Peer, Vec<String>, Seen)> = (0..WATCHERS)
        .map(|i| {
            let part = users[i * per..((i + 1) * per).min(users.len())].to_vec();
            let mut w = open(node.addr, &format!("watcher{i}")).unwrap();
            subscribe(&mut w, &part);
            (w, part, Seen::default())
        })
        .collect();
    // Every watcher has every snapshot before the upgrade.
    let deadline = Instant::now() + Duration::from_secs(30);
    for (w, part, seen) in &mut watchers {
        while seen.seq.len() < part.len() {
            assert!(Instant::now() < deadline, "snapshots before the upgrade");
            for v in w.drain() {
                seen.note(&v);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let last_seen_before = watchers
        .iter()
        .find_map(|(_, _, s)| s.last_seen.get("returning").copied().flatten())
        .expect("returning has a last_seen");

    // The upgrade, with churn going on and every client reconnecting when closed.
    let upgrader = {
        let socket = node.socket.clone();
        std::thread::spawn(move || {
            let out = Command::new(PRESENCED)
                .args(["upgrade", "--socket"])
                .arg(&socket)
                .output()
                .unwrap();
            (
                out.status.success(),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            )
        })
    };
    let mut refused = Vec::new();
    let mut reconnects = 0;
    let mut churn = 0u64;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(20) {
        for d in devices.iter_mut() {
            d.drain();
            if d.closed.is_some() {
                match open(node.addr, &d.user) {
                    Ok(p) => {
                        *d = p;
                        reconnects += 1;
                    }
                    Err(e) => refused.push(format!("{}: {e}", d.user)),
                }
            }
        }
        // Churn: a few status changes per round, bounded.
        if churn < 400 {
            let d = &mut devices[(churn as usize * 7) % DEVICES];
            let status = if churn.is_multiple_of(2) {
                "busy"
            } else {
                "online"
            };
            d.send(json!({"op":"set_status","status":status}));
            churn += 1;
        }
        for (w, part, seen) in watchers.iter_mut() {
            for v in w.drain() {
                seen.note(&v);
            }
            if w.closed.is_some() {
                match open(node.addr, &w.user) {
                    Ok(p) => {
                        *w = p;
                        reconnects += 1;
                        subscribe(w, part);
                    }
                    Err(e) => refused.push(format!("{}: {e}", w.user)),
                }
            }
        }
        if upgrader.is_finished() && !alive(old_pid) && started.elapsed() > Duration::from_secs(4) {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let (ok, said) = upgrader.join().unwrap();
    assert!(ok, "presenced upgrade: {said}");
    assert!(said.contains("ready in"), "{said}");
    assert!(!alive(old_pid), "the old process exited after its drain");
    assert!(
        refused.is_empty(),
        "connection attempts refused: {:?}",
        &refused[..refused.len().min(5)]
    );
    assert!(
        reconnects >= DEVICES + WATCHERS,
        "every client was drained and came back ({reconnects})"
    );
    // Settle: the watchers' fresh snapshots are in.
    std::thread::sleep(Duration::from_millis(500));
    for (w, _, seen) in watchers.iter_mut() {
        for v in w.drain() {
            seen.note(&v);
        }
    }
    for (w, _, seen) in &watchers {
        assert!(
            seen.offline.is_empty(),
            "{} saw offline: {:?}",
            w.user,
            &seen.offline[..seen.offline.len().min(5)]
        );
        assert!(
            seen.backwards.is_empty(),
            "{} saw seq go back: {:?}",
            w.user,
            &seen.backwards[..seen.backwards.len().min(5)]
        );
    }
    let kept = watchers
        .iter()
        .find_map(|(_, _, s)| s.last_seen.get("returning").copied().flatten());
    assert_eq!(
        kept,
        Some(last_seen_before),
        "last_seen survives the upgrade"
    );
    // Every session is on the new process: it serves them all and the old one is gone.
    let text = stats(node.admin).to_string();
    assert!(
        text.contains(&format!("\"connections\":{}", DEVICES + 1 + WATCHERS)),
        "new process serves all: {text:.400}"
    );
    // The new process goes on: a change reaches a watcher.
    devices[0].send(json!({"op":"set_status","status":"busy","text":"after"}));
    let deadline = Instant::now() + WAIT;
    let (w, _, seen) = &mut watchers[0];
    loop {
        assert!(Instant::now() < deadline, "a change after the upgrade");
        let got = w.drain();
        for v in &got {
            seen.note(v);
        }
        if got
            .iter()
            .any(|v| v["user"] == "u0" && v["text"] == "after")
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // The new process is the one to stop at the end.
    stop_new(&said);
}

/// An admin token signed with the test secret.
fn admin_token_for(secret: &str) -> String {
    let mut spec = presenced::auth::TokenSpec::new("admin", Duration::from_secs(600));
    spec.roles = vec!["admin".into()];
    presenced::auth::mint_hs256(secret, &spec)
}

/// Stops the new process an upgrade started, by the pid `presenced upgrade` reported
/// (`new process PID ready in …`), and waits for it to exit.
fn stop_new(said: &str) {
    let pid: i32 = said
        .split("new process ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("a pid in {said}"));
    // SAFETY: kill(2) with a pid and a signal number touches no memory.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + WAIT;
    while alive(pid as u32) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn write_script(dir: &Path, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

#[test]
fn a_failed_upgrade_leaves_the_old_process_serving_and_says_why() {
    let node = Node::start("drain_ms = 500\n");
    let scripts = tempfile::tempdir().unwrap();
    let mut watcher = Client::connect(node.addr, &token("w"));
    let mut alice = Client::connect(node.addr, &token("alice"));
    assert_eq!(watcher.subscribe(&["alice"])[0]["status"], "online");

    // 1. The new binary exits at once.
    let (ok, said) = node.upgrade(&["--binary", "/bin/false"]);
    assert!(!ok && said.contains("exited"), "{said}");
    // 2. It refuses its configuration (a flag out of range), and says so to the old one.
    let bad = write_script(
        scripts.path(),
        "bad-config",
        &format!("exec {PRESENCED} \"$@\" --heartbeat-ms 1"),
    );
    let (ok, said) = node.upgrade(&["--binary", bad.to_str().unwrap()]);
    assert!(!ok && said.contains("heartbeat_ms"), "{said}");
    // 3. It never connects: killed at upgrade.timeout_ms; and a second upgrade meanwhile is
    //    refused.
    let hang = write_script(scripts.path(), "hang", "sleep 60");
    let first = {
        let (socket, hang) = (node.socket.clone(), hang.clone());
        std::thread::spawn(move || {
            presenced::ops::upgrade::request(&socket, Some(&hang), Duration::from_secs(30))
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let (ok, said) = node.upgrade(&[]);
    assert!(!ok && said.contains("already in progress"), "{said}");
    let why = first
        .join()
        .unwrap()
        .expect_err("a hung new process fails the upgrade");
    assert!(why.contains("timeout_ms"), "{why}");

    // Through all of it the old process served on: same pid, same sessions, live changes.
    assert!(alive(node.pid()));
    alice.set_status("busy", Some("still here"));
    let p = watcher.presence_of("alice");
    assert_eq!(p["status"], "busy");
    assert_eq!(p["text"], "still here");
    let _ = Client::connect(node.addr, &token("bob"));
    // And after the failures, an upgrade that works still can.
    let (ok, said) = node.upgrade(&[]);
    assert!(ok, "{said}");
    assert_eq!(watcher.close_code(), 1001, "drained by the old process");
    stop_new(&said);
}

#[test]
fn the_control_socket_is_private_and_refuses_other_uids() {
    use std::os::unix::fs::PermissionsExt;
    let node = Node::start("");
    let mode = std::fs::metadata(&node.socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "control socket mode");
    // As another uid (nobody), with the file opened up: the server itself refuses the peer.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: the other-uid half needs setpriv as root; skipped");
        return;
    }
    std::fs::set_permissions(&node.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let dir = node.socket.parent().unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            PRESENCED,
            "upgrade",
            "--socket",
        ])
        .arg(&node.socket)
        .output()
        .expect("setpriv (util-linux) runs");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("peer uid 65534"), "{said}");
    assert!(alive(node.pid()));
}

/// The new process dies after it took over, in the middle of the drain: the old one calls the
/// drain off, accepts again on the same sockets, and serves (and can be upgraded again).
#[cfg(feature = "fault-injection")]
#[test]
fn a_new_process_that_dies_during_the_drain_leaves_the_old_one_serving_again() {
    // Only a process started by an upgrade reads this: the new one aborts 300 ms after READY.
    let node = Node::start_env(
        "drain_ms = 4000\n",
        &[("PRESENCED_FAULT_ABORT_AFTER_READY_MS", "300")],
    );
    // Sessions are drained oldest first: the watcher, connected last, is among the last.
    let mut clients: Vec<Client> = (0..20)
        .map(|i| Client::connect(node.addr, &token(&format!("d{i}"))))
        .collect();
    let mut watcher = Client::connect(node.addr, &token("w"));
    let users: Vec<String> = (0..20).map(|i| format!("d{i}")).collect();
    let names: Vec<&str> = users.iter().map(String::as_str).collect();
    watcher.subscribe(&names);
    let (ok, said) = node.upgrade(&[]);
    assert!(ok, "{said}");
    // The old process serves again: still alive after the new one died, accepting.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(alive(node.pid()), "the old process goes on");
    let mut fresh = Client::connect(node.addr, &token("late"));
    fresh.set_status("busy", Some("after"));
    // Sessions not yet drained are still there and still heard.
    let last = clients.last_mut().unwrap();
    last.set_status("away", Some("still here"));
    let p = watcher.presence_of("d19");
    assert_eq!(p["text"], "still here");
    // The control socket is back and not busy: another upgrade runs (and its new process,
    // with the same fault, dies too; the old one serves on again).
    let (ok, said) = node.upgrade(&[]);
    assert!(ok, "a second upgrade after the failed one: {said}");
    std::thread::sleep(Duration::from_millis(1000));
    assert!(alive(node.pid()));
    let _ = Client::connect(node.addr, &token("later"));
    let (status, body) = raw_request(
        node.admin,
        "GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 200, "{body}");
    // The new processes of both upgrades aborted (the fault); the old one is stopped with
    // `node`.
}

/// The new process starts its shards but is too slow to say READY: it is killed at
/// `upgrade.timeout_ms`. It never accepted (it listens only once it has taken over), so every
/// client that connected meanwhile was the old process's, and is still connected.
#[cfg(feature = "fault-injection")]
#[test]
fn a_new_process_killed_before_ready_had_accepted_nobody() {
    let node = Node::start_full(
        "",
        "timeout_ms = 1500",
        &[("PRESENCED_FAULT_DELAY_READY_MS", "4000")],
    );
    let upgrade = {
        let socket = node.socket.clone();
        std::thread::spawn(move || {
            presenced::ops::upgrade::request(&socket, None, Duration::from_secs(30))
        })
    };
    // Connect throughout the attempt: the new process is up (its shards started) for most of it.
    let mut clients = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(1400) {
        clients.push(Client::connect(
            node.addr,
            &token(&format!("c{}", clients.len())),
        ));
        std::thread::sleep(Duration::from_millis(20));
    }
    let why = upgrade
        .join()
        .unwrap()
        .expect_err("the new process was too slow");
    assert!(why.contains("timeout_ms"), "{why}");
    assert!(clients.len() >= 30, "{} clients", clients.len());
    for (i, c) in clients.iter_mut().enumerate() {
        let pong = c.request(json!({"op": "ping"}));
        assert_eq!(pong["type"], "pong", "client {i} is still served: {pong}");
    }
    assert!(alive(node.pid()));
}

/// `GET path` on the admin port with an admin token: the body of a 200.
fn admin_get(admin: SocketAddr, path: &str) -> String {
    let (status, body) = raw_request(
        admin,
        &format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
            admin_token_for(SECRET)
        ),
    );
    assert_eq!(status, 200, "{body}");
    body.split("\r\n\r\n").nth(1).unwrap_or(&body).to_owned()
}

/// The node's `/api/stats`.
fn stats(admin: SocketAddr) -> Value {
    serde_json::from_str(&admin_get(admin, "/api/stats")).unwrap_or(Value::Null)
}

/// A counter from the node's `/metrics`.
fn metric(admin: SocketAddr, name: &str) -> u64 {
    admin_get(admin, "/metrics")
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} in /metrics"))
}

/// A watcher's view: each user's last status and `seq`, and what must never happen.
#[derive(Default)]
struct View {
    status: HashMap<String, String>,
    text: HashMap<String, Option<String>>,
    seen: Seen,
}

impl View {
    fn note(&mut self, v: &Value) {
        if v["type"] != "presence" {
            return;
        }
        let user = v["user"].as_str().unwrap().to_owned();
        self.status
            .insert(user.clone(), v["status"].as_str().unwrap_or("").to_owned());
        self.text
            .insert(user, v["text"].as_str().map(str::to_owned));
        self.seen.note(v);
    }

    fn all_online(&self, users: &[String]) -> bool {
        users
            .iter()
            .all(|u| self.status.get(u).is_some_and(|s| s != "offline"))
    }

    /// Reads until `done` holds (at most `wait`).
    fn until(&mut self, w: &mut Peer, what: &str, done: impl Fn(&View) -> bool) {
        let deadline = Instant::now() + WAIT;
        while !done(self) {
            assert!(Instant::now() < deadline, "{what}");
            for v in w.drain() {
                self.note(&v);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn cluster_toml(nats: &common::nats::Nats, node: &str) -> String {
    format!(
        "[cluster]\nnats_url = [\"{}\"]\nnode_id = \"{node}\"\n",
        nats.url()
    )
}

/// In a cluster an upgrade keeps the node's id, incarnation, clock and stream numbers, so the
/// other nodes see nothing: no restart, no gap, no user going offline; and the upgraded node's
/// own watchers of other nodes' users find them online when they come back.
#[test]
fn in_a_cluster_an_upgrade_is_invisible_to_the_other_nodes() {
    const HERE: usize = 40;
    const THERE: usize = 10;
    let nats = common::nats::Nats::start();
    let one = Node::start_full(
        &format!("drain_ms = 1500\n{}", cluster_toml(&nats, "up-1")),
        "timeout_ms = 10000",
        &[],
    );
    let two = Node::start_full(&cluster_toml(&nats, "up-2"), "timeout_ms = 10000", &[]);
    let old_pid = one.pid();
    let mut ones: Vec<Peer> = (0..HERE)
        .map(|i| open(one.addr, &format!("a{i}")).unwrap())
        .collect();
    let mut twos: Vec<Peer> = (0..THERE)
        .map(|i| open(two.addr, &format!("b{i}")).unwrap())
        .collect();
    for (i, d) in ones.iter_mut().enumerate().filter(|(i, _)| i % 4 == 0) {
        d.send(json!({"op":"set_status","status":"away","text":format!("t{i}")}));
    }
    let a_users: Vec<String> = ones.iter().map(|d| d.user.clone()).collect();
    let b_users: Vec<String> = twos.iter().map(|d| d.user.clone()).collect();
    // A watcher on node 2 of node 1's users, and one on node 1 of node 2's users.
    let mut far = open(two.addr, "far").unwrap();
    far.send(json!({"op":"subscribe","users":a_users}));
    let mut near = open(one.addr, "near").unwrap();
    near.send(json!({"op":"subscribe","users":b_users}));
    let (mut far_view, mut near_view) = (View::default(), View::default());
    far_view.until(&mut far, "node 2 hears node 1's users", |v| {
        v.all_online(&a_users) && v.text.get("a0").is_some_and(|t| t.as_deref() == Some("t0"))
    });
    near_view.until(&mut near, "node 1 hears node 2's users", |v| {
        v.all_online(&b_users)
    });
    // Only what happens from here on counts (a fresh subscription in a cluster may show a
    // remote user offline until the bus snapshot is in).
    far_view.seen = Seen::default();
    near_view.seen = Seen::default();
    let inc_of = |s: &Value| -> Option<u64> {
        s["cluster"]["nodes"]
            .as_array()
            .and_then(|n| n.iter().find(|n| n["node"] == "up-1"))
            .and_then(|n| n["incarnation"].as_u64())
    };
    // The node list is refreshed at each heartbeat.
    let incarnation = eventually("node 2 lists up-1", || inc_of(&stats(two.admin)));
    assert_eq!(stats(one.admin)["cluster"]["incarnation"], incarnation);
    let gaps = metric(two.admin, "presenced_cluster_gaps_total");

    let upgrader = {
        let socket = one.socket.clone();
        std::thread::spawn(move || {
            presenced::ops::upgrade::request(&socket, None, Duration::from_secs(30))
        })
    };
    let mut refused = Vec::new();
    let mut churn = 0usize;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(20) {
        for d in ones.iter_mut() {
            d.drain();
            if d.closed.is_some() {
                match open(one.addr, &d.user) {
                    Ok(p) => *d = p,
                    Err(e) => refused.push(format!("{}: {e}", d.user)),
                }
            }
        }
        // Churn through the switch: a few changes, bounded.
        if churn < 60 && started.elapsed() > Duration::from_millis(churn as u64 * 30) {
            let status = if churn.is_multiple_of(2) {
                "busy"
            } else {
                "online"
            };
            ones[(churn * 7) % HERE].send(json!({"op":"set_status","status":status}));
            churn += 1;
        }
        for v in far.drain() {
            far_view.note(&v);
        }
        for v in near.drain() {
            near_view.note(&v);
        }
        if near.closed.is_some() {
            match open(one.addr, "near") {
                Ok(p) => {
                    near = p;
                    near.send(json!({"op":"subscribe","users":b_users}));
                }
                Err(e) => refused.push(format!("near: {e}")),
            }
        }
        if upgrader.is_finished() && !alive(old_pid) {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let said = upgrader.join().unwrap().expect("the upgrade succeeds");
    assert!(!alive(old_pid), "the old process exited after its drain");
    assert!(refused.is_empty(), "refused: {refused:?}");
    // The new process publishes on from the old one's numbers: node 2 takes its changes.
    ones[0].send(json!({"op":"set_status","status":"busy","text":"after"}));
    far_view.until(&mut far, "node 2 hears the new process", |v| {
        v.text
            .get("a0")
            .is_some_and(|t| t.as_deref() == Some("after"))
    });
    // And the upgraded node still hears node 2.
    twos[0].send(json!({"op":"set_status","status":"away","text":"there"}));
    near_view.until(&mut near, "the new process hears node 2", |v| {
        v.text
            .get("b0")
            .is_some_and(|t| t.as_deref() == Some("there"))
    });
    for (who, view) in [
        ("node 2's watcher", &far_view),
        ("node 1's watcher", &near_view),
    ] {
        assert!(
            view.seen.offline.is_empty(),
            "{who} saw offline: {:?}",
            view.seen.offline
        );
        assert!(
            view.seen.backwards.is_empty(),
            "{who} saw seq go back: {:?}",
            view.seen.backwards
        );
    }
    // One node throughout, to node 2: the same incarnation, no gap in its numbers.
    assert_eq!(
        inc_of(&stats(two.admin)),
        Some(incarnation),
        "no restart seen"
    );
    assert_eq!(stats(one.admin)["cluster"]["incarnation"], incarnation);
    assert_eq!(
        metric(two.admin, "presenced_cluster_gaps_total"),
        gaps,
        "no delta lost or renumbered"
    );
    stop_new(&said);
}

/// In a cluster, the new process dies after it took the bus over: the old one speaks for the
/// node again. The new one published meanwhile, so the old one's numbers jump ahead (node 2
/// sees a gap and resyncs rather than dropping them as old) and its shares are stamped anew:
/// node 2 converges on what the old process holds, and never sees a user go offline, but for
/// one whose only session was on the dead process.
#[cfg(feature = "fault-injection")]
#[test]
fn in_a_cluster_a_new_process_that_dies_hands_the_bus_back() {
    const HERE: usize = 20;
    let nats = common::nats::Nats::start();
    let one = Node::start_full(
        &format!("drain_ms = 6000\n{}", cluster_toml(&nats, "back-1")),
        "timeout_ms = 10000",
        &[("PRESENCED_FAULT_ABORT_AFTER_READY_MS", "1500")],
    );
    let two = Node::start_full(&cluster_toml(&nats, "back-2"), "timeout_ms = 10000", &[]);
    // Sessions are drained oldest first: a0 first.
    let mut ones: Vec<Peer> = (0..HERE)
        .map(|i| open(one.addr, &format!("a{i}")).unwrap())
        .collect();
    ones[0].send(json!({"op":"set_status","status":"away","text":"t0"}));
    let a_users: Vec<String> = ones.iter().map(|d| d.user.clone()).collect();
    let mut far = open(two.addr, "far").unwrap();
    far.send(json!({"op":"subscribe","users":a_users}));
    far.send(json!({"op":"subscribe","users":["ghost"]}));
    let mut view = View::default();
    view.until(&mut far, "node 2 hears node 1's users", |v| {
        v.all_online(&a_users) && v.text.get("a0").is_some_and(|t| t.as_deref() == Some("t0"))
    });
    view.seen = Seen::default();
    let (ok, said) = one.upgrade(&[]);
    assert!(ok, "{said}");
    // A user whose only session is on the new process (never reconnected after it dies).
    let _ghost = open(one.addr, "ghost").unwrap();
    // a0 is drained at once and comes back to the new process, which publishes its change.
    let (mut moved, mut heard_new) = (false, false);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        for (i, d) in ones.iter_mut().enumerate() {
            d.drain();
            if d.closed.is_some() {
                if let Ok(p) = open(one.addr, &d.user) {
                    *d = p;
                    if i == 0 && !moved {
                        d.send(json!({"op":"set_status","status":"busy","text":"on new"}));
                        moved = true;
                    }
                }
            }
        }
        for v in far.drain() {
            heard_new |= v["user"] == "a0" && v["text"] == "on new";
            view.note(&v);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(moved, "a0 was drained and reconnected");
    assert!(alive(one.pid()), "the old process serves again");
    assert!(
        view.seen.seq.contains_key("ghost"),
        "node 2 heard the new process's own user"
    );
    // Node 2 heard a0's change from the new process, then the old process's a0 again (its
    // session re-attached there, away "t0"): only through the jump in the numbers.
    assert!(heard_new, "node 2 heard a0's change from the new process");
    view.until(&mut far, "node 2 converges on the old process's a0", |v| {
        v.text.get("a0").is_some_and(|t| t.as_deref() == Some("t0"))
    });
    // And takes the old process's changes as before.
    ones[HERE - 1].send(json!({"op":"set_status","status":"busy","text":"after"}));
    view.until(&mut far, "node 2 hears the old process", |v| {
        v.text
            .get(&format!("a{}", HERE - 1))
            .is_some_and(|t| t.as_deref() == Some("after"))
    });
    // The dead process's own user goes (the old process's empty deltas made node 2 resync
    // every bucket it follows from it), and nobody else did.
    view.until(&mut far, "node 2 lets the dead process's user go", |v| {
        v.status.get("ghost").is_some_and(|s| s == "offline")
    });
    let others: Vec<&String> = (view.seen.offline.iter())
        .filter(|o| !o.starts_with("ghost "))
        .collect();
    assert!(others.is_empty(), "{others:?}");
    assert!(view.seen.backwards.is_empty(), "{:?}", view.seen.backwards);
}
