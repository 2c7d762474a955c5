//! Item 13 against the real binary: a subscription-churn storm (every client subscribing and
//! unsubscribing 1,000 ids as fast as it is answered, with the per-connection id budget turned
//! off so the storm reaches the mesh) must be shed without losing state, and the server's
//! memory must come back down afterwards.
//!
//! Before the fix the mesh dropped `Watch`/`Snapshot`/`Unwatch` messages past its overflow
//! bound, RSS grew to the bound and stayed there, and watchers were left dead (re-subscribing
//! acked with no snapshot). Now: nothing is dropped (`presenced_mesh_dropped_total` stays 0),
//! new subscribes are refused with `overloaded` while the mesh is congested, every watcher gets
//! all 1,000 snapshots afterwards, and RSS returns close to where it started.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{free_port, metric_sum, metrics_text, serve_cmd, spawn_serve, Client, SECRET};
use serde_json::json;

const CLIENTS: usize = 12;
const IDS: usize = 1_000;
const STORM: Duration = Duration::from_secs(4);
/// What the server may keep after the storm beyond where it started, once every client is gone:
/// the allocator's fragmentation (a storm that peaks ~100 MiB above the start settles 15 to 30 MiB
/// above it).
const RSS_SLACK_KB: u64 = 32 * 1024;
/// How far the storm must push RSS up for the test to mean something.
const STORM_MIN_KB: u64 = 48 * 1024;

fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Metric `name` summed over the shards; it must be there.
fn metric(admin: SocketAddr, name: &str) -> f64 {
    metric_sum(&metrics_text(admin, None), name).unwrap_or_else(|| panic!("no {name} in /metrics"))
}

fn ids() -> Vec<String> {
    (0..IDS).map(|i| format!("id{i}")).collect()
}

/// Subscribes to every id, retrying refusals, and returns how many distinct ids got a snapshot.
fn subscribe_all(c: &mut Client, ids: &[String]) -> usize {
    loop {
        let reply = c.request(json!({"op":"subscribe","users":ids}));
        match reply["type"].as_str() {
            Some("ack") => break,
            _ if reply["code"] == "overloaded" || reply["code"] == "rate_limited" => {
                std::thread::sleep(Duration::from_millis(50));
            }
            _ => panic!("unexpected reply {reply}"),
        }
    }
    let mut snapshots = std::collections::HashSet::new();
    while snapshots.len() < ids.len() {
        let v = c.recv();
        if v["type"] == "presence" {
            snapshots.insert(v["user"].as_str().unwrap().to_owned());
        }
    }
    assert!(snapshots.iter().all(|u| ids.contains(u)));
    snapshots.len()
}

#[test]
fn a_subscription_storm_loses_no_state_and_memory_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("storm.toml");
    std::fs::write(
        &config,
        "[limits]\nsubscriptions_per_second = 0\nops_per_second = 0\nhandshake_rate_per_ip = 0\n\
         [mesh]\ninbox_capacity = 256\noverflow_max_bytes = 33554432\n\
         [history]\nbackend = \"off\"\n",
    )
    .unwrap();
    let (port, admin_port) = (free_port(), free_port());
    let server = spawn_serve(
        serve_cmd(port, admin_port)
            .arg("--config")
            .arg(&config)
            .env("PRESENCED_JWT_SECRET", SECRET)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let pid = server.child.id();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(admin).is_err() {
        assert!(Instant::now() < deadline, "the server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let token = |sub: &str| {
        presenced::auth::mint_hs256(
            SECRET,
            &presenced::auth::TokenSpec::new(sub, Duration::from_secs(600)),
        )
    };
    let before = rss_kb(pid);

    // The storm: each client cycles subscribe/unsubscribe over the 1,000 ids.
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(before));
    let sampler = {
        let (stop, peak) = (stop.clone(), peak.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kb(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let storm: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let t = token(&format!("watcher{i}"));
            std::thread::spawn(move || {
                let mut c = Client::connect(addr, &t);
                let ids = ids();
                let until = Instant::now() + STORM;
                while Instant::now() < until {
                    // Fire and forget: replies and snapshots are read in between, not awaited.
                    c.send(json!({"op":"subscribe","users":ids}));
                    c.send(json!({"op":"unsubscribe","users":ids}));
                    let _ = c.recv();
                }
                c
            })
        })
        .collect();
    let mut clients: Vec<Client> = storm.into_iter().map(|t| t.join().unwrap()).collect();
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();

    // After the storm every watcher starts clean and gets every snapshot.
    let ids = ids();
    for c in &mut clients {
        c.send(json!({"op":"unsubscribe","users":ids}));
        // Drain what the storm left queued until this unsubscribe is answered.
        c.request(json!({"op":"ping"}));
        assert_eq!(subscribe_all(c, &ids), IDS);
    }
    assert_eq!(
        metric(admin, "presenced_mesh_dropped_total"),
        0.0,
        "no message was dropped"
    );
    assert_eq!(
        metric(admin, "presenced_mesh_unmatched_unwatches_total"),
        0.0
    );
    assert!(
        metric(admin, "presenced_ops_overloaded_total") > 0.0,
        "the storm congested the mesh (otherwise this test proves nothing)"
    );
    drop(clients);

    // Memory comes back down once the storm has drained.
    let peak = peak.load(Ordering::Relaxed);
    let settle = Instant::now() + Duration::from_secs(30);
    let mut now = rss_kb(pid);
    while now > before + RSS_SLACK_KB && Instant::now() < settle {
        std::thread::sleep(Duration::from_millis(200));
        now = rss_kb(pid);
    }
    assert!(
        peak >= before + STORM_MIN_KB,
        "the storm raised RSS by {} kB only: it proves nothing",
        peak - before
    );
    assert!(
        now <= before + RSS_SLACK_KB,
        "RSS {before} kB before, {peak} kB at peak, still {now} kB after the storm"
    );
}
