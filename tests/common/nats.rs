//! A real `nats-server` for integration tests ([`super::tools::nats_server`]): one server, or two
//! routed into a cluster, on loopback ports of their own, each killable and restartable on the
//! same ports so a test can take NATS away from presenced and give it back.
//!
//! Every server listens on 127.0.0.1 only (or, from [`Nats::start_on`], on one address of the
//! caller's choice), without JetStream, and writes its log to a file in a temporary directory; a
//! server that does not come up fails the test with the log's tail.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;
use super::tools::nats_server;

/// How long a server may take to accept clients, and a cluster to route.
pub const NATS_READY: Duration = Duration::from_secs(10);
/// Fresh ports tried when a new server cannot bind (another test took a port in between).
const START_TRIES: usize = 3;
/// Lines of the log a failure shows.
const LOG_TAIL_LINES: usize = 40;
/// Time-outs for one readiness probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// The log's name in the server's temporary directory.
const LOG_FILE: &str = "nats-server.log";
/// The `cluster_name` of [`Nats::cluster2`].
pub const CLUSTER_NAME: &str = "presenced-test";

/// A running (or killed, until restarted) `nats-server`.
pub struct Nats {
    /// `None` between [`Nats::kill`] and [`Nats::restart`].
    child: Option<Child>,
    /// The address it listens on, clients and monitoring alike: 127.0.0.1 unless started with
    /// [`Nats::start_on`].
    host: Ipv4Addr,
    /// Client port.
    port: u16,
    /// HTTP monitoring port (`/varz`, `/routez`).
    monitor_port: u16,
    /// For a routed server: (its own cluster port, the peer's cluster port). Kept for restarts.
    route: Option<(u16, u16)>,
    /// Holds the log file; removed with the server.
    dir: tempfile::TempDir,
}

impl Nats {
    /// One server on free loopback ports, accepting clients.
    pub fn start() -> Nats {
        Nats::start_on(Ipv4Addr::LOCALHOST)
    }

    /// One server listening on `host` only (clients and monitoring), on ports free on
    /// loopback, accepting clients: for a test whose clients reach it over another interface,
    /// such as a veth into a network namespace. [`Nats::url`] and [`Nats::addr`] name `host`.
    pub fn start_on(host: Ipv4Addr) -> Nats {
        let mut why = Vec::new();
        for _ in 0..START_TRIES {
            let [port, monitor_port] = distinct_ports();
            let mut n = Nats::spawn(host, port, monitor_port, None);
            match n.wait_ready() {
                Ok(()) => return n,
                Err(NotReady::Exited(e)) => why.push(e),
                Err(NotReady::Stuck(e)) => panic!("{e}"),
            }
        }
        panic!(
            "nats-server did not start in {START_TRIES} tries:\n{}",
            why.join("\n")
        );
    }

    /// Two servers routed to each other as cluster [`CLUSTER_NAME`]: both accept clients and
    /// each has its route to the other.
    pub fn cluster2() -> (Nats, Nats) {
        let mut why = Vec::new();
        for _ in 0..START_TRIES {
            let [pa, pb, ma, mb, ca, cb] = distinct_ports();
            let mut a = Nats::spawn(Ipv4Addr::LOCALHOST, pa, ma, Some((ca, cb)));
            let mut b = Nats::spawn(Ipv4Addr::LOCALHOST, pb, mb, Some((cb, ca)));
            let up = a
                .wait_ready()
                .and_then(|()| b.wait_ready())
                .and_then(|()| a.routes_up(1))
                .and_then(|()| b.routes_up(1));
            match up {
                Ok(()) => return (a, b),
                Err(NotReady::Exited(e)) => why.push(e), // both killed as they drop
                Err(NotReady::Stuck(e)) => panic!("{e}"),
            }
        }
        panic!(
            "a two-server NATS cluster did not come up in {START_TRIES} tries:\n{}",
            why.join("\n")
        );
    }

    /// `nats://127.0.0.1:PORT` (or the address given to [`Nats::start_on`]), for clients.
    pub fn url(&self) -> String {
        format!("nats://{}:{}", self.host, self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((self.host, self.port))
    }

    /// The server is running (not killed, and not exited by itself).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL, and reaped: no goodbye to clients or routes, as a crash or a lost machine.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills the server if it runs, and starts it again on the same ports (and, for a routed
    /// server, with the same cluster flags), waiting until it accepts clients. A routed server's
    /// route comes back by itself once its peer runs: see [`Nats::wait_routes`].
    pub fn restart(&mut self) {
        self.kill();
        // The ports were ours a moment ago; a failed bind is retried until the deadline.
        let deadline = Instant::now() + NATS_READY;
        loop {
            self.child = Some(spawn_child(
                &self.log_path(),
                self.host,
                self.port,
                self.monitor_port,
                self.route,
            ));
            match self.wait_ready() {
                Ok(()) => return,
                Err(NotReady::Exited(_)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err(NotReady::Exited(e) | NotReady::Stuck(e)) => {
                    panic!("nats-server did not restart on port {}: {e}", self.port)
                }
            }
        }
    }

    /// Waits until the server reports at least `n` routes on `/routez`; panics with the log's
    /// tail after [`NATS_READY`].
    pub fn wait_routes(&mut self, n: u64) {
        if let Err(NotReady::Exited(e) | NotReady::Stuck(e)) = self.routes_up(n) {
            panic!("{e}");
        }
    }

    /// [`Nats::wait_routes`], failing with the reason instead of panicking.
    fn routes_up(&mut self, n: u64) -> Result<(), NotReady> {
        let deadline = Instant::now() + NATS_READY;
        loop {
            let last = match self.routes() {
                Ok(have) if have >= n => return Ok(()),
                Ok(have) => format!("{have} route(s)"),
                Err(e) => e,
            };
            if !self.is_running() {
                return Err(self.exited());
            }
            if Instant::now() >= deadline {
                return Err(NotReady::Stuck(format!(
                    "nats-server on port {} has no {n} route(s) after {NATS_READY:?} ({last}); \
                     log:\n{}",
                    self.port,
                    self.log_tail()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `num_routes` from the monitoring endpoint's `/routez`.
    pub fn routes(&self) -> Result<u64, String> {
        let body = http_get(self.host, self.monitor_port, "/routez")?;
        let v: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| format!("/routez: {e}: {body}"))?;
        v["num_routes"]
            .as_u64()
            .ok_or_else(|| format!("/routez has no num_routes: {body}"))
    }

    /// The last lines of the server's log (every run of it, restarts included).
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join(LOG_FILE)
    }

    /// Starts the process in a fresh directory for its log; does not wait for it.
    fn spawn(host: Ipv4Addr, port: u16, monitor_port: u16, route: Option<(u16, u16)>) -> Nats {
        let dir = tempfile::tempdir().expect("a temp dir for the nats-server log");
        let child = spawn_child(&dir.path().join(LOG_FILE), host, port, monitor_port, route);
        Nats {
            child: Some(child),
            host,
            port,
            monitor_port,
            route,
            dir,
        }
    }

    /// Waits ([`NATS_READY`]) until the client port greets with `INFO {…}` while our child
    /// still runs: the greeting alone could come from another test's server on a reused port.
    fn wait_ready(&mut self) -> Result<(), NotReady> {
        let deadline = Instant::now() + NATS_READY;
        loop {
            let greeted = read_info(self.addr()).is_ok();
            if !self.is_running() {
                return Err(self.exited());
            }
            if greeted {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(NotReady::Stuck(format!(
                    "nats-server on port {} did not accept clients within {NATS_READY:?}; \
                     log:\n{}",
                    self.port,
                    self.log_tail()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server has exited (or was killed): how, with the log's tail.
    fn exited(&mut self) -> NotReady {
        let status = match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(Some(status))) => status.to_string(),
            Some(Ok(None)) => "still running".into(),
            Some(Err(e)) => e.to_string(),
            None => "killed".into(),
        };
        NotReady::Exited(format!(
            "nats-server on port {} is gone ({status}); log:\n{}",
            self.port,
            self.log_tail()
        ))
    }
}

/// Why a server is not ready.
enum NotReady {
    /// It exited, most likely because another test took a port between our check and its
    /// bind: fresh ports (or, for a restart, another try) may do.
    Exited(String),
    /// It runs but does not answer, or has no route: another try would not help.
    Stuck(String),
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Connects to `addr` and reads the first line, which a NATS server sends unasked:
/// `INFO {…}`. Errors when the connection fails or the line is something else.
pub fn read_info(addr: SocketAddr) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(PROBE_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    // Bounded: an INFO line is a few hundred bytes.
    while line.len() < 64 << 10 {
        match s.read(&mut byte) {
            Ok(0) => break,
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => line.push(byte[0]),
            Err(e) => return Err(e.to_string()),
        }
    }
    let line = String::from_utf8_lossy(&line).trim_end().to_owned();
    if line.starts_with("INFO {") {
        Ok(line)
    } else {
        Err(format!("not a NATS greeting: {line:?}"))
    }
}

/// `GET path` on the monitoring port at `host` over HTTP/1.0 (the server closes after
/// answering): the body, or why not.
fn http_get(host: Ipv4Addr, port: u16, path: &str) -> Result<String, String> {
    let addr = SocketAddr::from((host, port));
    let mut s = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(PROBE_TIMEOUT))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    // Bounded: a two-server /routez is a few KiB.
    s.take(1 << 20)
        .read_to_end(&mut out)
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{path}: no HTTP response"))?;
    if head.split_whitespace().nth(1) != Some("200") {
        return Err(format!("{path}: {}", head.lines().next().unwrap_or("")));
    }
    Ok(body.to_owned())
}

/// `N` distinct free loopback ports.
fn distinct_ports<const N: usize>() -> [u16; N] {
    let mut out = [0u16; N];
    for i in 0..N {
        out[i] = loop {
            let p = free_port();
            if !out[..i].contains(&p) {
                break p;
            }
        };
    }
    out
}

/// Starts `nats-server` on `host` (loopback but for [`Nats::start_on`]): clients on `port`,
/// monitoring on `monitor_port`, and for a routed server (own cluster port, peer's cluster port,
/// both on loopback) the cluster flags. Its output is appended to `log`, so a restarted server's
/// log follows the first run's.
fn spawn_child(
    log: &Path,
    host: Ipv4Addr,
    port: u16,
    monitor_port: u16,
    route: Option<(u16, u16)>,
) -> Child {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| panic!("the nats-server log {}: {e}", log.display()));
    let bin = nats_server();
    let mut cmd = Command::new(&bin);
    cmd.args(["-a", &host.to_string(), "-p", &port.to_string()])
        .args(["-m", &monitor_port.to_string()])
        .args(["--server_name", &format!("presenced-test-{port}")]);
    if let Some((own, peer)) = route {
        cmd.args(["--cluster", &format!("nats://127.0.0.1:{own}")])
            .args(["--routes", &format!("nats://127.0.0.1:{peer}")])
            .args(["--cluster_name", CLUSTER_NAME]);
    }
    // nats-server logs to stderr; both streams go to the file, flag errors included.
    cmd.stdin(Stdio::null())
        .stdout(file.try_clone().expect("a second handle on the log"))
        .stderr(file)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()))
}
