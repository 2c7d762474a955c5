//! Test helpers: start a real server on port 0, mint tokens, talk to it over real sockets with a
//! real WebSocket client (tungstenite) or raw HTTP.
#![allow(dead_code)]

pub mod geo;
pub mod history;
pub mod nats;
pub mod tools;
pub mod webhooks;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use presenced::auth::{mint_hs256, TokenSpec, Verifier};
use presenced::config::{Config, Placement};
use presenced::ServerHandle;
use serde_json::{json, Value};
use tungstenite::client::IntoClientRequest;
use tungstenite::protocol::WebSocket;
use tungstenite::Message;

pub const SECRET: &str = "integration-test-secret-0123456789";
/// How long a test waits for an expected frame before failing.
pub const WAIT: Duration = Duration::from_secs(10);

pub struct TestServer {
    handle: Option<ServerHandle>,
    pub addr: SocketAddr,
    /// The admin port.
    pub admin: SocketAddr,
    /// The history store's directory (removed with the server).
    pub data: tempfile::TempDir,
}

/// The static admin token of [`admin_server`].
pub const ADMIN_STATIC_TOKEN: &str = "static-admin-token-0123456789";

/// A server for admin-port tests: no rate limits in the way, and a static admin token.
pub fn admin_server(shards: usize) -> TestServer {
    TestServer::with(shards, |c| {
        c.limits.handshake_rate_per_ip = 0;
        c.limits.ops_per_second = 0;
        c.admin.token = Some(ADMIN_STATIC_TOKEN.into());
    })
}

/// The admin port on an ephemeral loopback port (tests run side by side).
pub fn admin_on_any_port() -> presenced::config::AdminConfig {
    presenced::config::AdminConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    }
}

impl TestServer {
    /// A server with `shards` unpinned shards on 127.0.0.1:0.
    pub fn start(shards: usize) -> TestServer {
        TestServer::with(shards, |_| {})
    }

    pub fn with(shards: usize, tweak: impl FnOnce(&mut Config)) -> TestServer {
        let data = tempfile::tempdir().expect("a temp dir for history");
        let mut cfg = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            shards,
            placement: Placement::Unbound,
            jwt_secret: Some(SECRET.into()),
            admin: admin_on_any_port(),
            ..Config::default()
        };
        cfg.history.data_dir = data.path().to_owned();
        tweak(&mut cfg);
        let cfg = cfg.validate().expect("test config is valid");
        let verifier = Verifier::new(cfg.jwt_secret.as_deref(), &cfg.auth).expect("verifier");
        let handle = presenced::start(cfg, verifier).expect("server starts");
        TestServer {
            addr: handle.addr,
            admin: handle.admin_addr.unwrap_or(handle.addr),
            handle: Some(handle),
            data,
        }
    }

    pub fn handle(&self) -> &ServerHandle {
        self.handle.as_ref().unwrap()
    }

    pub fn token(&self, sub: &str) -> String {
        mint_hs256(SECRET, &TokenSpec::new(sub, Duration::from_secs(3600)))
    }

    /// A token built from a spec `edit` fills in.
    pub fn token_with(&self, sub: &str, edit: impl FnOnce(&mut TokenSpec)) -> String {
        let mut spec = TokenSpec::new(sub, Duration::from_secs(3600));
        edit(&mut spec);
        mint_hs256(SECRET, &spec)
    }

    /// One admin-port request (`Connection: close`): status and JSON body (`Null` if not JSON).
    pub fn admin_request(&self, method: &str, path: &str, token: Option<&str>) -> (u16, Value) {
        let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        let (code, body) = raw_request(
            self.admin,
            &format!("{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"),
        );
        (code, serde_json::from_str(&body).unwrap_or(Value::Null))
    }

    /// `GET path` with the admin token; panics unless 200.
    pub fn admin_get(&self, path: &str) -> Value {
        let (code, body) = self.admin_request("GET", path, Some(&self.admin_token()));
        assert_eq!(code, 200, "GET {path}: {body}");
        body
    }

    /// An admin JWT (`roles: ["admin"]`) for `sub`.
    pub fn admin_token(&self) -> String {
        let mut spec = TokenSpec::new("ops", Duration::from_secs(3600));
        spec.roles = vec!["admin".into()];
        mint_hs256(SECRET, &spec)
    }

    pub fn token_in_groups(&self, sub: &str, groups: &[&str]) -> String {
        let mut spec = TokenSpec::new(sub, Duration::from_secs(3600));
        spec.groups = groups.iter().map(|g| g.to_string()).collect();
        mint_hs256(SECRET, &spec)
    }

    /// Connects as `sub` and reads the welcome.
    pub fn connect(&self, sub: &str) -> Client {
        self.connect_token(&self.token(sub))
    }

    pub fn connect_token(&self, token: &str) -> Client {
        Client::connect(self.addr, token)
    }

    /// Sends a raw upgrade request and returns the HTTP status line's code and the body.
    pub fn raw_upgrade(&self, target: &str, headers: &str) -> (u16, String) {
        raw_request(
            self.addr,
            &format!(
                "GET {target} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{headers}\r\n"
            ),
        )
    }

    /// Upgrade status for a token given as a bearer header.
    pub fn status_for(&self, token: &str) -> (u16, String) {
        self.raw_upgrade("/ws", &format!("Authorization: Bearer {token}\r\n"))
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown();
        }
    }
}

/// A free port below the ephemeral range, so no other test's port-0 listener (or outgoing
/// connection) can take it between this check and the child binding it.
pub fn free_port() -> u16 {
    loop {
        let port = 20_000 + (rand_port() % 10_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

fn rand_port() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::Instant::now())
}

/// A TCP connection to `addr` from source address `src` (any port), with an optional small
/// receive buffer (set before connecting, so the window stays small).
pub fn tcp_from(src: std::net::IpAddr, addr: SocketAddr, rcvbuf: Option<usize>) -> TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    if let Some(n) = rcvbuf {
        sock.set_recv_buffer_size(n).unwrap();
    }
    sock.bind(&SocketAddr::new(src, 0).into()).unwrap();
    sock.connect(&addr.into()).unwrap();
    sock.into()
}

/// Writes `request`, reads the response head and body until the server closes.
pub fn raw_request(addr: SocketAddr, request: &str) -> (u16, String) {
    raw_request_from(TcpStream::connect(addr).unwrap(), request)
}

/// [`raw_request`] over an existing connection.
pub fn raw_request_from(mut s: TcpStream, request: &str) -> (u16, String) {
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if out.starts_with(b"HTTP/1.1 101") && out.windows(4).any(|w| w == b"\r\n\r\n") {
                    break; // upgraded: the connection stays open
                }
            }
            Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&out).into_owned();
    let code = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.trim().to_owned())
        .unwrap_or_default();
    (code, body)
}

/// Polls `f` every 20 ms until it gives a value, failing after [`WAIT`].
pub fn eventually<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    eventually_within(what, WAIT, f)
}

/// [`eventually`], failing after `patience`.
pub fn eventually_within<T>(what: &str, patience: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + patience;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `GET /metrics` on the admin port `admin`, with a bearer token when it is protected: the
/// exposition text. Panics unless 200.
pub fn metrics_text(admin: SocketAddr, token: Option<&str>) -> String {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let (code, text) = raw_request(
        admin,
        &format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"),
    );
    assert_eq!(code, 200, "GET /metrics: {text}");
    text
}

/// The sum of metric `name`'s samples in exposition `text`, over every label set; `None` when it
/// has none. The name matches whole: a sample line is `name` then `{labels}` or a space, so
/// `presenced_x` does not count `presenced_x_total`.
pub fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let values: Vec<f64> = text
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let rest = match rest.strip_prefix('{') {
                Some(labelled) => labelled.rsplit_once('}')?.1,
                None => rest,
            };
            rest.strip_prefix(' ')?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// The `presenced` binary under test.
pub const PRESENCED: &str = env!("CARGO_BIN_EXE_presenced");

/// A token for `sub` signed with [`SECRET`], valid an hour.
pub fn token(sub: &str) -> String {
    mint_hs256(SECRET, &TokenSpec::new(sub, Duration::from_secs(3600)))
}

/// Where a spawned node's log goes: `$CLUSTER_TEST_LOGS/{id}.log` when that is set (for
/// debugging a failure), nowhere otherwise.
pub fn log_file(id: &str) -> std::process::Stdio {
    use std::process::Stdio;
    match std::env::var_os("CLUSTER_TEST_LOGS") {
        Some(dir) => std::fs::File::create(std::path::Path::new(&dir).join(format!("{id}.log")))
            .map_or_else(|_| Stdio::null(), Stdio::from),
        None => Stdio::null(),
    }
}

/// `presenced serve` on 127.0.0.1:`port` with two unpinned shards and the admin port on
/// 127.0.0.1:`admin` (0: any free port). The caller adds the rest: secret, config, data
/// directory, output.
pub fn serve_cmd(port: u16, admin: u16) -> Command {
    let mut cmd = Command::new(PRESENCED);
    cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--shards", "2", "--placement", "unbound"])
        .args(["--admin-listen", &format!("127.0.0.1:{admin}")]);
    cmd
}

/// A running `serve` child and its own history store: killed, then the store removed.
pub struct Served {
    pub child: Child,
    _data: tempfile::TempDir,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `cmd` (from [`serve_cmd`]) with a history store of its own.
pub fn spawn_serve(cmd: &mut Command) -> Served {
    let data = tempfile::tempdir().unwrap();
    let child = cmd.arg("--data-dir").arg(data.path()).spawn().unwrap();
    Served { child, _data: data }
}

/// A client-to-server WebSocket text frame (masked, as RFC 6455 requires), for tests that
/// write raw bytes.
pub fn masked_text(payload: &str) -> Vec<u8> {
    let p = payload.as_bytes();
    let mut out = vec![0x81];
    match p.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let key = [0x12, 0x34, 0x56, 0x78];
    out.extend_from_slice(&key);
    out.extend(p.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    out
}

/// A complete upgrade request for `/ws` with a bearer token.
pub fn upgrade_request(token: &str) -> String {
    upgrade_request_with(token, "")
}

/// [`upgrade_request`] with `extra` header lines (each ending in `\r\n`) after the token.
pub fn upgrade_request_with(token: &str, extra: &str) -> String {
    format!(
        "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Authorization: Bearer {token}\r\n{extra}\r\n"
    )
}

/// A user name that hashes to `shard` of `shards`.
pub fn user_on(shard: u16, shards: usize, prefix: &str) -> String {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .find(|u| presenced::shard::owner_of(u, shards) == shard)
        .unwrap()
}

pub struct Client {
    pub ws: WebSocket<TcpStream>,
    pub welcome: Value,
}

impl Client {
    pub fn connect(addr: SocketAddr, token: &str) -> Client {
        Client::connect_over(TcpStream::connect(addr).unwrap(), token)
    }

    /// Upgrades an existing TCP connection (e.g. from [`tcp_from`]).
    pub fn connect_over(stream: TcpStream, token: &str) -> Client {
        Client::connect_path(stream, "/ws", token)
    }

    /// Upgrades on `path` (e.g. `/ws?as=bob`) with a bearer token.
    pub fn connect_path(stream: TcpStream, path: &str, token: &str) -> Client {
        let addr = stream.peer_addr().unwrap();
        let mut req = format!("ws://{addr}{path}").into_client_request().unwrap();
        req.headers_mut()
            .insert("Authorization", format!("Bearer {token}").parse().unwrap());
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let (ws, _) = tungstenite::client::client(req, stream).expect("upgrade succeeds");
        let mut c = Client {
            ws,
            welcome: Value::Null,
        };
        c.welcome = c.recv();
        assert_eq!(c.welcome["type"], "welcome", "first frame is the welcome");
        c
    }

    pub fn shard(&self) -> u64 {
        self.welcome["shard"].as_u64().unwrap()
    }

    pub fn send(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).unwrap();
    }

    pub fn send_raw(&mut self, m: Message) {
        self.ws.send(m).unwrap();
    }

    /// The next JSON frame (pings and pongs skipped); panics after [`WAIT`].
    pub fn recv(&mut self) -> Value {
        loop {
            match self.ws.read().expect("a frame before the timeout") {
                Message::Text(t) => return serde_json::from_str(&t).unwrap(),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }

    /// Reads frames until one matches, failing after [`WAIT`].
    pub fn recv_until(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            let v = self.recv();
            if pred(&v) {
                return v;
            }
        }
    }

    /// The next `presence` event for `user` (direct, untagged).
    pub fn presence_of(&mut self, user: &str) -> Value {
        self.recv_until(&format!("presence of {user}"), |v| {
            v["type"] == "presence" && v["user"] == user && v.get("group").is_none()
        })
    }

    /// Sends `op` with an id and returns the reply carrying that id.
    pub fn request(&mut self, mut op: Value) -> Value {
        let id = format!("r{}", rand_id());
        op["id"] = json!(id);
        self.send(op);
        self.recv_until(&format!("reply {id}"), |v| v["id"] == id.as_str())
    }

    /// Subscribes and returns the snapshot of each user, in the order of `users`. Snapshots come
    /// from each user's owner shard, so they may arrive in any order.
    pub fn subscribe(&mut self, users: &[&str]) -> Vec<Value> {
        let ack = self.request(json!({"op":"subscribe","users":users}));
        assert_eq!(ack["type"], "ack", "{ack}");
        let mut got: Vec<Option<Value>> = vec![None; users.len()];
        while got.iter().any(Option::is_none) {
            let v = self.recv_until("snapshots", |v| {
                v["type"] == "presence" && v.get("group").is_none()
            });
            let i = users
                .iter()
                .position(|u| v["user"] == *u)
                .expect("a subscribed user");
            assert!(got[i].is_none(), "one snapshot per user");
            got[i] = Some(v);
        }
        got.into_iter().map(Option::unwrap).collect()
    }

    pub fn set_status(&mut self, status: &str, text: Option<&str>) {
        let mut op = json!({"op":"set_status","status":status});
        if let Some(t) = text {
            op["text"] = json!(t);
        }
        assert_eq!(self.request(op)["type"], "ack");
    }

    /// Asserts that for the whole of `d` the server sends nothing but pings and pongs, and the
    /// connection stays open. Pings are not messages: they are answered (tungstenite queues the
    /// pong and writes it on the next read) and the window goes on to its end. Any other frame,
    /// a close included, or a read error other than the window running out, fails the test.
    pub fn expect_silence(&mut self, d: Duration) {
        let end = Instant::now() + d;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            self.ws.get_ref().set_read_timeout(Some(left)).unwrap();
            match self.ws.read() {
                Ok(Message::Ping(_) | Message::Pong(_)) => continue,
                Ok(other) => panic!("expected silence for {d:?}, got {other:?}"),
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break
                }
                Err(e) => panic!("expected silence for {d:?}, the connection failed: {e}"),
            }
        }
        self.ws.get_ref().set_read_timeout(Some(WAIT)).unwrap();
    }

    /// The first frame within `d` that matches `want` (others are skipped), or `None` when
    /// none came.
    pub fn try_recv_for(&mut self, d: Duration, want: impl Fn(&Value) -> bool) -> Option<Value> {
        let end = Instant::now() + d;
        let found = loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break None;
            }
            self.ws.get_ref().set_read_timeout(Some(left)).unwrap();
            match self.ws.read() {
                Ok(Message::Text(t)) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    if want(&v) {
                        break Some(v);
                    }
                }
                Ok(Message::Ping(_) | Message::Pong(_)) => continue,
                Ok(other) => panic!("unexpected frame {other:?}"),
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break None
                }
                Err(e) => panic!("the connection failed: {e}"),
            }
        };
        self.ws.get_ref().set_read_timeout(Some(WAIT)).unwrap();
        found
    }

    /// Upgrades and expects the server to close right away; returns the close code.
    pub fn connect_expect_close(addr: SocketAddr, token: &str) -> u16 {
        let mut req = format!("ws://{addr}/ws").into_client_request().unwrap();
        req.headers_mut()
            .insert("Authorization", format!("Bearer {token}").parse().unwrap());
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let (ws, _) = tungstenite::client::client(req, stream).expect("upgrade succeeds");
        let mut c = Client {
            ws,
            welcome: Value::Null,
        };
        c.close_code()
    }

    /// Reads until the server's close frame; returns its code.
    pub fn close_code(&mut self) -> u16 {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            match self.ws.read() {
                Ok(Message::Close(Some(f))) => return f.code.into(),
                Ok(Message::Close(None)) => return 1005,
                Ok(_) => continue,
                Err(e) => panic!("no close frame: {e}"),
            }
        }
        panic!("no close frame in time");
    }

    pub fn close(mut self) {
        let _ = self.ws.close(None);
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if self.ws.read().is_err() {
                break;
            }
        }
    }
}

fn rand_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}
