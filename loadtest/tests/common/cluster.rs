//! A real presenced cluster for the harness's tests (docs/CLUSTER.md): a real `nats-server` and
//! `presenced serve` processes joined by it, each on loopback ports of its own.
//!
//! `nats-server` is found as the server's own tests find it (`tests/common/tools.rs`):
//! `$NATS_SERVER`, Debian's `/usr/sbin/nats-server` or `/usr/bin/nats-server`, else
//! `tests/support/ensure-tools.sh nats-server` installs it. When none can be had the test fails,
//! never skips. `presenced` is `$PRESENCED_BIN`, or the binary Cargo builds beside the harness
//! (see [`presenced_bin`]).
//!
//! Every wait is bounded; a process that does not come up fails the test with its log's tail.
//! Every process is killed, and every log removed, when its handle drops.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use super::{BIN, SECRET};

/// Nodes' lease: short, as in the server's own cluster tests (`tests/cluster.rs`), so a node
/// that is not heard from shows quickly; heartbeats go out every third of it.
pub const LEASE_MS: u64 = 1_500;
/// How long a process may take to come up (a debug build on a small, busy machine), and a
/// node to see the others.
pub const READY: Duration = Duration::from_secs(20);
/// Fresh ports tried when a process cannot bind (another test took a port in between).
const START_TRIES: usize = 3;
/// Lines of a log a failure shows.
const LOG_TAIL_LINES: usize = 30;
/// Time-outs of one probe (NATS greeting, `/readyz`, `/metrics`).
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// The nodes' settings beside their flags: the whole fleet comes from a few loopback
/// addresses, so no per-IP handshake limit; history is not under test, so no store.
const NODE_CONFIG: &str = "[limits]\nhandshake_rate_per_ip = 0\n[history]\nbackend = \"off\"\n";

/// A directory of its own under the system's temporary directory, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(what: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!(
            "lt-{what}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("a temp dir {}: {e}", dir.display()));
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The workspace root (the server's crate), above this crate.
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the loadtest crate sits in the workspace")
        .to_path_buf()
}

/// A free loopback port (bound, then released: a process started on it may still lose a race,
/// which the starters retry).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// The last lines of the text file at `path`.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

/// Whether `child` has exited (and how).
fn exited(child: &mut Child) -> Option<String> {
    match child.try_wait() {
        Ok(Some(status)) => Some(status.to_string()),
        Ok(None) => None,
        Err(e) => Some(e.to_string()),
    }
}

// ---------------------------------------------------------------------------------------------
// nats-server

/// Where Debian's package puts the server (bookworm: /usr/sbin), in the order tried.
const NATS_DEFAULTS: [&str; 2] = ["/usr/sbin/nats-server", "/usr/bin/nats-server"];

/// The `nats-server` binary: `$NATS_SERVER` (when set and not empty) or a default path when
/// one exists; otherwise `tests/support/ensure-tools.sh nats-server` installs Debian's package
/// (as root, with apt-get). Panics with the reason when none can be had.
pub fn nats_server() -> PathBuf {
    let from_env = std::env::var_os("NATS_SERVER")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    let mut candidates: Vec<PathBuf> = from_env.into_iter().collect();
    candidates.extend(NATS_DEFAULTS.iter().map(PathBuf::from));
    if let Some(found) = candidates.iter().find(|p| p.is_file()) {
        return found.clone();
    }
    let script = workspace().join("tests/support/ensure-tools.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg("nats-server")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let installed = NATS_DEFAULTS
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file());
    match installed {
        Some(path) if out.status.success() => path,
        _ => panic!(
            "nats-server is required by the harness's cluster tests and could not be obtained \
             (set $NATS_SERVER to a nats-server binary, or install Debian's `nats-server` \
             package).\n{} nats-server exited with {}:\n{}{}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        ),
    }
}

/// A running `nats-server` on a loopback port, killed on drop.
pub struct Nats {
    child: Child,
    port: u16,
    dir: TempDir,
}

impl Nats {
    /// One server on a free loopback port, accepting clients (it greets with `INFO {…}`).
    pub fn start() -> Nats {
        let bin = nats_server();
        let mut why = Vec::new();
        for _ in 0..START_TRIES {
            let port = free_port();
            let dir = TempDir::new("nats");
            let log = dir.path().join("nats-server.log");
            let file = std::fs::File::create(&log).expect("the nats-server log");
            let child = Command::new(&bin)
                .args(["-a", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(file.try_clone().expect("a second handle on the log"))
                .stderr(file)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
            let mut nats = Nats { child, port, dir };
            let deadline = Instant::now() + READY;
            loop {
                // The greeting alone could come from another test's server on a reused port:
                // our child must still run.
                let greeted = nats_greets(nats.addr());
                if let Some(status) = exited(&mut nats.child) {
                    why.push(format!(
                        "nats-server on port {port} exited ({status}):\n{}",
                        nats.log_tail()
                    ));
                    break;
                }
                if greeted {
                    return nats;
                }
                assert!(
                    Instant::now() < deadline,
                    "nats-server on port {port} did not accept clients within {READY:?}; \
                     log:\n{}",
                    nats.log_tail()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!(
            "nats-server did not start in {START_TRIES} tries:\n{}",
            why.join("\n")
        );
    }

    /// `nats://127.0.0.1:PORT`, for the nodes.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn log_tail(&self) -> String {
        tail(&self.dir.path().join("nats-server.log"))
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The first line read from `addr` is a NATS server's unasked `INFO {…}`.
fn nats_greets(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(PROBE_TIMEOUT));
    let mut head = [0u8; 6];
    s.read_exact(&mut head).is_ok() && &head == b"INFO {"
}

// ---------------------------------------------------------------------------------------------
// presenced

/// The `presenced` binary the nodes run: `$PRESENCED_BIN` when set; otherwise the one Cargo
/// builds beside this harness (`target/<profile>/presenced`, which `cargo test --workspace` has
/// just built for the server's own tests). When that one is missing, or older than a file of
/// the server's sources (`src/`, `Cargo.toml`, `Cargo.lock`), as after `cargo test -p
/// presenced-loadtest` alone, it is built first (`cargo build -p presenced -p presenced-loadtest
/// --bin presenced`, in the same target directory and profile), so the nodes never run a stale
/// server. Panics with Cargo's output when that build fails.
pub fn presenced_bin() -> PathBuf {
    static BIN_PATH: OnceLock<PathBuf> = OnceLock::new();
    BIN_PATH.get_or_init(find_presenced).clone()
}

fn find_presenced() -> PathBuf {
    if let Some(p) = std::env::var_os("PRESENCED_BIN").filter(|v| !v.is_empty()) {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "$PRESENCED_BIN {} is not a file", p.display());
        return p;
    }
    // BIN is <target dir>/<profile dir>/presenced-loadtest.
    let profile_dir = Path::new(BIN).parent().expect("the harness's directory");
    let bin = profile_dir.join("presenced");
    let built = std::fs::metadata(&bin).and_then(|m| m.modified()).ok();
    let root = workspace();
    let newest_source = ["src", "Cargo.toml", "Cargo.lock"]
        .iter()
        .filter_map(|p| newest_mtime(&root.join(p)))
        .max();
    let fresh = matches!((built, newest_source), (Some(b), Some(s)) if b >= s);
    if fresh {
        return bin;
    }
    let target_dir = profile_dir.parent().expect("the target directory");
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev".to_string(),
        Some(other) => other.to_string(),
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    let out = Command::new(&cargo)
        // With this crate selected too, features unify as in this crate's own build (the
        // server's library with them): only the binary is left to build.
        .args(["build", "-p", "presenced", "-p", "presenced-loadtest"])
        .args(["--bin", "presenced", "--profile"])
        .arg(&profile)
        .env("CARGO_TARGET_DIR", target_dir)
        .current_dir(&root)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", Path::new(&cargo).display()));
    assert!(
        out.status.success() && bin.is_file(),
        "building the server for the cluster test failed (or set $PRESENCED_BIN to a presenced \
         binary): cargo build --bin presenced --profile {profile} exited with {}:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    bin
}

/// The newest modification time of `path`, or of any file below it.
fn newest_mtime(path: &Path) -> Option<SystemTime> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_dir() {
        return meta.modified().ok();
    }
    std::fs::read_dir(path)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| newest_mtime(&e.path()))
        .max()
}

/// One `presenced serve` process, a cluster node: killed on drop.
pub struct Node {
    pub id: String,
    /// The WebSocket listener.
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    child: Child,
    dir: TempDir,
}

impl Node {
    /// Starts node `id` on the bus at `nats` (with subject prefix `prefix`, or the default),
    /// with the lease [`LEASE_MS`], two unpinned shards and the harness's [`SECRET`], and waits
    /// until its `/readyz` says it is connected to the bus.
    pub fn start(id: &str, nats: &str, prefix: Option<&str>) -> Node {
        let bin = presenced_bin();
        let mut why = Vec::new();
        for _ in 0..START_TRIES {
            let dir = TempDir::new(&format!("node-{id}"));
            let config = dir.path().join("node.toml");
            std::fs::write(&config, NODE_CONFIG).expect("the node's config");
            let log = std::fs::File::create(dir.path().join("node.log")).expect("the node's log");
            let (port, admin) = (free_port(), free_port());
            let mut cmd = Command::new(&bin);
            cmd.arg("serve")
                .arg("--config")
                .arg(&config)
                .args(["--listen", &format!("127.0.0.1:{port}")])
                .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
                .args(["--shards", "2", "--placement", "unbound"])
                .args(["--jwt-secret", SECRET, "--nats-url", nats, "--node-id", id])
                .args(["--cluster-lease-ms", &LEASE_MS.to_string()])
                .arg("--data-dir")
                .arg(dir.path().join("data"));
            if let Some(p) = prefix {
                cmd.args(["--cluster-prefix", p]);
            }
            // Only what is given here: not the environment's secret, admin token or NATS URL.
            for var in [
                "PRESENCED_JWT_SECRET",
                "PRESENCED_ADMIN_TOKEN",
                "PRESENCED_NATS_URL",
            ] {
                cmd.env_remove(var);
            }
            let child = cmd
                .env("RUST_LOG", "presenced=info")
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("a second handle on the log"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
            let mut node = Node {
                id: id.to_owned(),
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                admin: SocketAddr::from(([127, 0, 0, 1], admin)),
                child,
                dir,
            };
            match node.wait_until("connected to the bus", |r| {
                r["cluster"]["bus"] == "connected"
            }) {
                Ok(()) => return node,
                Err(e) => why.push(e),
            }
        }
        panic!(
            "node {id} did not start in {START_TRIES} tries:\n{}",
            why.join("\n")
        );
    }

    /// Waits ([`READY`]) until `/readyz` answers 200 with a body that `want` accepts. Errors,
    /// with the log's tail, when the process exits first or the time is up.
    pub fn wait_until(
        &mut self,
        what: &str,
        want: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<(), String> {
        let deadline = Instant::now() + READY;
        let mut last = None;
        loop {
            if let Some(status) = exited(&mut self.child) {
                return Err(format!(
                    "node {} exited ({status}); log:\n{}",
                    self.id,
                    self.log_tail()
                ));
            }
            match self.readyz() {
                Some(r) if want(&r) => return Ok(()),
                r => last = r.or(last),
            }
            if Instant::now() >= deadline {
                let last = last.map_or("no answer".to_string(), |r| r.to_string());
                return Err(format!(
                    "node {} not {what} within {READY:?}: /readyz {last}; log:\n{}",
                    self.id,
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until this node sees `n` nodes (itself included) on a connected bus; panics with
    /// the reason after [`READY`].
    pub fn wait_nodes(&mut self, n: u64) {
        if let Err(e) = self.wait_until(&format!("seeing {n} node(s)"), |r| {
            r["cluster"]["bus"] == "connected" && r["cluster"]["nodes"] == n
        }) {
            panic!("{e}");
        }
    }

    /// `/readyz`'s JSON body when it answers 200.
    pub fn readyz(&self) -> Option<serde_json::Value> {
        let (code, body) = http_get(self.admin, "/readyz").ok()?;
        (code == 200).then(|| serde_json::from_str(&body).ok())?
    }

    /// The sum of `/metrics` sample `name` over its label sets; panics when the server does not
    /// answer 200 or has no such sample.
    pub fn metric(&self, name: &str) -> u64 {
        let (code, text) = http_get(self.admin, "/metrics")
            .unwrap_or_else(|e| panic!("node {}: /metrics: {e}", self.id));
        assert_eq!(code, 200, "node {}: /metrics: {text}", self.id);
        let mut found = None;
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(name) else {
                continue;
            };
            let value = match rest.as_bytes().first() {
                Some(b'{') => rest.split_once('}').map(|(_, v)| v),
                Some(b' ') => Some(rest),
                _ => None,
            };
            if let Some(v) = value.and_then(|v| v.split_whitespace().next()) {
                *found.get_or_insert(0) += v.parse::<f64>().unwrap_or(0.0) as u64;
            }
        }
        found.unwrap_or_else(|| panic!("node {}: no {name} in /metrics", self.id))
    }

    /// `ws://ADDR/ws`, the harness's `--url` for this node.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// `http://ADMIN`, the harness's `--admin-url` for this node.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }

    pub fn log_tail(&self) -> String {
        tail(&self.dir.path().join("node.log"))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET path` over a fresh connection that the server closes after answering: (status, body).
fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(PROBE_TIMEOUT))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    // Bounded: /metrics of a small node is a few tens of KiB.
    s.take(8 << 20)
        .read_to_end(&mut out)
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{path}: no HTTP response"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("{path}: {}", head.lines().next().unwrap_or("")))?;
    Ok((code, body.to_owned()))
}
