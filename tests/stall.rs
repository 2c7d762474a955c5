//! Proves a shard whose event loop does not turn for longer than `stall_threshold_ms` is
//! reported — logged with its shard and task queue, counted per shard in
//! `presenced_shard_stalls_total` and measured in the `presenced_shard_stall_seconds`
//! histogram — and that a hiccup shorter than the threshold is not. The stall is a job run on
//! shard 0 that blocks its thread (`ServerHandle::run_on`, under the `fault-injection` feature,
//! which the test command enables and release builds never do).
#![cfg(feature = "fault-injection")]

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::*;

const THRESHOLD_MS: u64 = 100;

/// Everything logged in this test process (one subscriber for the whole binary).
fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || Sink(sink.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");
        buf
    })
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The log lines that report a stall.
fn stall_lines() -> Vec<String> {
    let text = String::from_utf8_lossy(&logs().lock().unwrap()).into_owned();
    text.lines()
        .filter(|l| l.contains("shard stalled"))
        .map(str::to_owned)
        .collect()
}

/// `presenced_shard_stalls_total` of one shard.
fn stalls_of(text: &str, shard: u16) -> f64 {
    let prefix = format!("presenced_shard_stalls_total{{shard=\"{shard}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {prefix} in /metrics"))
}

#[test]
fn a_blocked_shard_is_reported_and_a_short_hiccup_is_not() {
    logs();
    let s = TestServer::with(2, |c| c.stall_threshold_ms = THRESHOLD_MS);

    // Traffic across both shards, and a 20 ms hiccup on shard 0: no stall.
    let watched = user_on(0, 2, "watched");
    let mut w = s.connect(&user_on(1, 2, "watcher"));
    w.subscribe(&[&watched]);
    let mut c = s.connect(&watched);
    c.set_status("busy", None);
    w.recv_until("the change", |v| v["status"] == "busy");
    s.handle()
        .run_on(0, |_| std::thread::sleep(Duration::from_millis(20)));
    // A (wrong) report would come as soon as the loop turns: give it time to show.
    std::thread::sleep(Duration::from_millis(300));
    let quiet = metrics_text(s.admin, None);
    assert_eq!(stalls_of(&quiet, 0), 0.0, "a 20 ms hiccup is no stall");
    assert_eq!(stalls_of(&quiet, 1), 0.0);
    assert_eq!(
        metric_sum(&quiet, "presenced_shard_stall_seconds_count"),
        Some(0.0)
    );
    assert!(stall_lines().is_empty(), "{:?}", stall_lines());

    // Shard 0 blocked for 300 ms: reported once the loop turns again.
    s.handle()
        .run_on(0, |_| std::thread::sleep(Duration::from_millis(300)));
    let text = eventually("the stall in /metrics", || {
        let t = metrics_text(s.admin, None);
        (stalls_of(&t, 0) >= 1.0).then_some(t)
    });
    assert_eq!(stalls_of(&text, 1), 0.0, "shard 1 went on turning");
    let count = metric_sum(&text, "presenced_shard_stall_seconds_count").unwrap();
    let sum = metric_sum(&text, "presenced_shard_stall_seconds_sum").unwrap();
    assert!(count >= 1.0, "{count}");
    assert!(
        sum >= 0.3,
        "the stall lasted at least the 300 ms block: {sum}"
    );
    let lines = stall_lines();
    let line = lines
        .iter()
        .find(|l| l.contains("shard=0"))
        .unwrap_or_else(|| panic!("no stall logged for shard 0: {lines:?}"));
    assert!(line.contains("task_queue=serve"), "{line}");
    assert!(line.contains("WARN"), "{line}");

    // The shard serves on.
    c.set_status("away", None);
    w.recv_until("a later change", |v| v["status"] == "away");
    assert!(s.handle().metrics_total().shard_stalls >= 1);
}
