//! Proves an `/api/online` scan does not stall its shard: it walks the registry in chunks of
//! `admin.scan_chunk` and lets the shard serve its connections between them. With 200k users on
//! one shard, presence changes sent *after* a scan started are delivered *before* it ends; a
//! scan that held the event loop would deliver none of them until it finished.
//!
//! 200k sockets are beyond a test machine (20k descriptors), so the users are registered
//! directly on the shard through a test-only hook (the `fault-injection` feature); the watcher,
//! the changing user and the admin requests are real connections.
#![cfg(feature = "fault-injection")]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const USERS: usize = 200_000;

#[test]
fn presence_flows_during_a_scan_of_200k_users() {
    let s = TestServer::with(1, |c| {
        c.admin.query_timeout_ms = 60_000;
        c.admin.scan_chunk = 1_024;
        c.limits.ops_per_second = 0;
        c.history.backend = presenced::config::HistoryBackend::Off;
    });
    s.handle()
        .run_on(0, |shard| shard.inject_users("synthetic-", USERS));
    let mut watcher = s.connect("watcher");
    watcher.subscribe(&["flapper"]);
    let mut flapper = s.connect("flapper");
    watcher.presence_of("flapper");
    // Scans in a loop on another thread, each timed from request to answer.
    type Scan = (Instant, Instant, u64);
    let scans: Arc<Mutex<Vec<Scan>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let scanner = {
        let (scans, stop) = (scans.clone(), stop.clone());
        let (admin, token) = (s.admin, s.admin_token());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                let (code, body) = raw_request(
                    admin,
                    &format!(
                        "GET /api/online?q=synthetic&limit=1 HTTP/1.1\r\n\
                         Authorization: Bearer {token}\r\nConnection: close\r\n\r\n"
                    ),
                );
                assert_eq!(code, 200, "{body}");
                let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                let total = v["total"].as_u64().unwrap();
                scans.lock().unwrap().push((t0, Instant::now(), total));
            }
        })
    };
    // A change every 5 ms while the scans run; each change's send and receipt times.
    let mut events: Vec<(Instant, Instant)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut n = 0;
    while Instant::now() < deadline && scans.lock().unwrap().len() < 4 {
        let text = format!("n{n}");
        let sent = Instant::now();
        let status = ["away", "busy"][n % 2];
        flapper.send(json!({"op":"set_status","status":status,"text":text}));
        watcher.recv_until("the change", |v| {
            v["user"] == "flapper" && v["text"] == text.as_str()
        });
        events.push((sent, Instant::now()));
        n += 1;
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Ordering::Relaxed);
    scanner.join().unwrap();
    let scans = scans.lock().unwrap();
    assert!(!scans.is_empty(), "at least one scan finished");
    assert!(
        scans.iter().all(|s| s.2 == USERS as u64),
        "every scan counted every user"
    );
    assert!(s.handle().metrics_total().admin_scan_yields > 0);
    // The longest scan that ran while changes were being sent: how many changes went out and
    // came back entirely inside it?
    let (first, last) = (events[0].0, events[events.len() - 1].1);
    let (t0, t1, _) = *scans
        .iter()
        .filter(|(a, b, _)| *a >= first && *b <= last)
        .max_by_key(|(a, b, _)| *b - *a)
        .expect("a scan ran entirely while changes were sent");
    let inside = events
        .iter()
        .filter(|(sent, got)| *sent > t0 && *got < t1)
        .count();
    assert!(
        inside >= 3,
        "only {inside} changes were delivered during a {:?} scan",
        t1 - t0
    );
}
