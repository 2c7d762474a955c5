//! Proves `presenced serve` speaks systemd's notify protocol as a service manager hears it. The
//! service manager is played by a Unix datagram socket the test binds (`$NOTIFY_SOCKET`):
//! with `$WATCHDOG_USEC` set, `WATCHDOG=1` keep-alives arrive every half interval while every
//! shard's loop turns, stop while a shard is blocked (so systemd would restart the service),
//! and resume once it turns again; the stall is logged. The block is a fault injected into the
//! child (`PRESENCED_FAULT_STALL_AFTER_MS`, read only under the `fault-injection` feature,
//! which the test command enables and release builds never do).

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;

/// What the service manager was told: every datagram on `$NOTIFY_SOCKET`, with when it came.
struct NotifyListener {
    path: PathBuf,
    got: Arc<Mutex<Vec<(Instant, String)>>>,
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl NotifyListener {
    fn bind(dir: &Path) -> NotifyListener {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let got: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
        let done = Arc::new(AtomicBool::new(false));
        let thread = {
            let (got, done) = (Arc::clone(&got), Arc::clone(&done));
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while !done.load(Ordering::Relaxed) {
                    if let Ok(n) = sock.recv(&mut buf) {
                        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                        got.lock().unwrap().push((Instant::now(), text));
                    }
                }
            })
        };
        NotifyListener {
            path,
            got,
            done,
            thread: Some(thread),
        }
    }

    /// When each datagram holding the line `line` (e.g. `WATCHDOG=1`) came.
    fn times_of(&self, line: &str) -> Vec<Instant> {
        let got = self.got.lock().unwrap();
        got.iter()
            .filter(|(_, text)| text.lines().any(|l| l == line))
            .map(|(at, _)| *at)
            .collect()
    }

    /// Waits until `n` datagrams holding `line` came after `since`.
    #[cfg_attr(not(feature = "fault-injection"), allow(dead_code))]
    fn wait_for(&self, line: &str, n: usize, since: Instant) {
        eventually(&format!("{n} × {line}"), || {
            (self.times_of(line).iter().filter(|t| **t > since).count() >= n).then_some(())
        });
    }
}

impl Drop for NotifyListener {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A child's log (stdout), line by line, with when each line came.
struct Log(Arc<Mutex<Vec<(Instant, String)>>>);

impl Log {
    fn follow(out: impl std::io::Read + Send + 'static) -> Log {
        let lines: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                sink.lock().unwrap().push((Instant::now(), line));
            }
        });
        Log(lines)
    }

    /// When the first line containing every one of `parts` came.
    fn find(&self, parts: &[&str]) -> Option<(Instant, String)> {
        let lines = self.0.lock().unwrap();
        lines
            .iter()
            .find(|(_, l)| parts.iter().all(|p| l.contains(p)))
            .cloned()
    }

    fn wait(&self, parts: &[&str]) -> (Instant, String) {
        eventually(&format!("a log line with {parts:?}"), || self.find(parts))
    }

    #[cfg_attr(not(feature = "fault-injection"), allow(dead_code))]
    fn all(&self) -> String {
        let lines = self.0.lock().unwrap();
        lines.iter().map(|(_, l)| format!("{l}\n")).collect()
    }
}

/// `presenced serve` told to notify `listener`, with systemd's watchdog at `watchdog_ms`.
fn serve_notifying(listener: &NotifyListener, watchdog_ms: u64) -> std::process::Command {
    let mut cmd = serve_cmd(free_port(), 0);
    cmd.env("PRESENCED_JWT_SECRET", SECRET)
        .env("NOTIFY_SOCKET", &listener.path)
        .env("WATCHDOG_USEC", (watchdog_ms * 1000).to_string())
        .env_remove("WATCHDOG_PID")
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped());
    cmd
}

/// The watchdog interval of these tests: keep-alives every 100 ms.
const WATCHDOG_MS: u64 = 200;

#[cfg(feature = "fault-injection")]
#[test]
fn keep_alives_stop_while_a_shard_is_blocked_and_resume_after() {
    let dir = tempfile::tempdir().unwrap();
    let notify = NotifyListener::bind(dir.path());
    let mut cmd = serve_notifying(&notify, WATCHDOG_MS);
    // Shard 0 blocks its thread for 1.5 s, 1.5 s after it starts.
    cmd.env("PRESENCED_FAULT_STALL_AFTER_MS", "1500,1500");
    let mut served = spawn_serve(&mut cmd);
    let log = Log::follow(served.child.stdout.take().unwrap());

    let (blocked, _) = log.wait(&["fault injection: blocking shard 0's thread"]);
    let (freed, _) = log.wait(&["fault injection: shard 0's thread is free again"]);
    notify.wait_for("WATCHDOG=1", 3, freed);

    let feeds = notify.times_of("WATCHDOG=1");
    let before = feeds.iter().filter(|t| **t < blocked).count();
    assert!(
        before >= 3,
        "keep-alives while every shard turned: {before}"
    );
    // Keep-alives may still go out for a while after the block began: the last stamp of shard
    // 0 is up to a quarter interval old then, and counts as progress for a whole interval.
    let grace = Duration::from_millis(WATCHDOG_MS * 3 / 2);
    let during: Vec<_> = feeds
        .iter()
        .filter(|t| **t > blocked + grace && **t < freed)
        .map(|t| t.duration_since(blocked))
        .collect();
    assert!(
        during.is_empty(),
        "keep-alives while shard 0 was blocked (after the block began): {during:?}\n{}",
        log.all()
    );
    let longest_gap = feeds
        .windows(2)
        .map(|w| w[1].duration_since(w[0]))
        .max()
        .unwrap();
    assert!(
        longest_gap >= Duration::from_millis(1200),
        "the keep-alives stopped for most of the 1.5 s block: {longest_gap:?}"
    );

    // Both the watchdog's decision and the stall itself were logged, naming the shard.
    let (_, stuck) = log.wait(&["not feeding the systemd watchdog", "shard=0"]);
    assert!(stuck.contains("WARN"), "{stuck}");
    log.wait(&[
        "feeding the systemd watchdog",
        "shard=0",
        "progressing again",
    ]);
    let (_, stall) = log.wait(&["shard stalled", "shard=0"]);
    assert!(stall.contains("task_queue=serve"), "{stall}");
    let ms: u64 = stall
        .split("stalled_ms=")
        .nth(1)
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("stalled_ms in {stall}"));
    assert!(ms >= 1500, "the whole block: {stall}");

    let _ = served.child.kill();
}

#[test]
fn no_watchdog_no_keep_alives() {
    // `WATCHDOG_PID` names another process (systemd's watchdog is for a parent): not fed.
    let dir = tempfile::tempdir().unwrap();
    let notify = NotifyListener::bind(dir.path());
    let mut cmd = serve_notifying(&notify, WATCHDOG_MS);
    cmd.env("WATCHDOG_PID", "1");
    let mut served = spawn_serve(&mut cmd);
    let log = Log::follow(served.child.stdout.take().unwrap());
    log.wait(&["accepting WebSocket connections"]);
    std::thread::sleep(Duration::from_millis(3 * WATCHDOG_MS));
    assert!(notify.times_of("WATCHDOG=1").is_empty());
    assert!(log.find(&["feeding the systemd watchdog"]).is_none());
    let _ = served.child.kill();
}

/// Process `pid` has exited (or is a zombie).
fn gone(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z'))
    })
}

#[test]
fn ready_reloading_mainpid_and_stopping_follow_the_service_through_an_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let notify = NotifyListener::bind(dir.path());
    let socket = dir.path().join("ctl.sock");
    let config = dir.path().join("presenced.toml");
    std::fs::write(
        &config,
        format!(
            "drain_ms = 200\n[upgrade]\nsocket = \"{}\"\n",
            socket.display()
        ),
    )
    .unwrap();
    let mut cmd = serve_notifying(&notify, 0);
    cmd.env_remove("WATCHDOG_USEC").arg("--config").arg(&config);
    let mut served = spawn_serve(&mut cmd);
    let old = served.child.id();
    let log = Log::follow(served.child.stdout.take().unwrap());
    // READY=1 comes once the shards accept (`start` returns after they do; the datagram and
    // the log line travel different pipes, so their arrival order here proves nothing).
    log.wait(&["accepting WebSocket connections"]);
    notify.wait_for("READY=1", 1, Instant::now() - Duration::from_secs(60));
    let ready = notify.times_of("READY=1")[0];
    assert_eq!(notify.times_of("READY=1").len(), 1, "one READY=1 at start");

    // A failed upgrade: RELOADING=1, then READY=1 again (and a STATUS saying why).
    let failed = std::process::Command::new(env!("CARGO_BIN_EXE_presenced"))
        .args(["upgrade", "--binary", "/bin/false", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    assert!(!failed.status.success());
    notify.wait_for("READY=1", 1, ready);
    assert_eq!(notify.times_of("RELOADING=1").len(), 1);

    // A good one: RELOADING=1, then MAINPID=<the new process> with READY=1 in one datagram.
    let done = std::process::Command::new(env!("CARGO_BIN_EXE_presenced"))
        .args(["upgrade", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&done.stdout).into_owned();
    assert!(
        done.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let new: u32 = said
        .split("new process ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("a pid in {said}"));
    assert_ne!(new, old);
    eventually("MAINPID of the new process", || {
        let got = notify.got.lock().unwrap();
        got.iter()
            .any(|(_, t)| t.lines().any(|l| l == format!("MAINPID={new}")) && t.contains("READY=1"))
            .then_some(())
    });
    assert_eq!(notify.times_of("RELOADING=1").len(), 2);
    // The old process drains and exits without a word: STOPPING=1 from it would read as the
    // service stopping.
    eventually("the old process exits", || gone(old).then_some(()));
    assert!(
        notify.times_of("STOPPING=1").is_empty(),
        "the old process stayed silent"
    );
    // The new process is the service: SIGTERM to it says STOPPING=1.
    let since = Instant::now();
    // SAFETY: kill(2) with a pid and a signal number touches no memory.
    unsafe { libc::kill(new as i32, libc::SIGTERM) };
    notify.wait_for("STOPPING=1", 1, since);
    eventually("the new process exits", || gone(new).then_some(()));
}
