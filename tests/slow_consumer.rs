//! Proves slow consumers cost bounded memory and still converge: a client with a tiny receive
//! window that never reads while its 5 watched users flap 10,000 times in total holds, on the
//! server, at most `limits.coalesce_after_bytes` of queued events plus about one pending event
//! per watched user (read from the server's own backlog gauge), is not disconnected, and when it
//! reads again sees each user's final state, never an older state after a newer one.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use common::{tcp_from, Client, TestServer};
use serde_json::json;

const USERS: usize = 5;
const FLAPS_PER_USER: usize = 2000;
/// Queued event bytes past which the server merges a behind client's events per user.
const COALESCE_BYTES: usize = 1024;
/// Frames those bytes can hold at most (a presence frame here is over 60 bytes).
const QUEUED_BEFORE_MERGING: u64 = (COALESCE_BYTES / 60) as u64;

#[test]
fn a_client_that_stops_reading_holds_the_merge_threshold_plus_one_event_per_user_and_converges() {
    let server = TestServer::with(2, |c| {
        c.limits.ops_per_second = 0;
        c.limits.coalesce_after_bytes = COALESCE_BYTES;
    });
    let stream = tcp_from(IpAddr::V4(Ipv4Addr::LOCALHOST), server.addr, Some(2048));
    let mut slow = Client::connect_over(stream, &server.token("slow-reader"));
    let users: Vec<String> = (0..USERS).map(|i| format!("flapper{i}")).collect();
    let names: Vec<&str> = users.iter().map(String::as_str).collect();
    let mut flappers: Vec<Client> = users.iter().map(|u| server.connect(u)).collect();
    let snapshots = slow.subscribe(&names);
    let mut last_seq: Vec<u64> = snapshots
        .iter()
        .map(|s| s["seq"].as_u64().unwrap())
        .collect();

    // Flap without the slow client reading anything; watch the server's backlog gauge.
    let statuses = ["away", "busy", "online"];
    let mut max_backlog = 0;
    for round in 0..FLAPS_PER_USER {
        for f in flappers.iter_mut() {
            let status = statuses[round % 3];
            f.send(json!({"op":"set_status","status":status,"text":format!("r{round}")}));
        }
        if round % 100 == 0 {
            max_backlog = max_backlog.max(server.handle().metrics_total().outbox_pending);
        }
    }
    // Let the flappers' ops all land (each one reads its acks).
    for f in flappers.iter_mut() {
        assert_eq!(f.request(json!({"op":"ping"}))["type"], "pong");
    }
    let m = server.handle().metrics_total();
    assert!(
        m.coalesced > 0,
        "the slow client's backlog coalesced: {m:?}"
    );
    // While flapping, the gauge also holds the fast clients' in-flight acks; it must still stay
    // far below the 10,000 events sent (without coalescing it would grow with every flap).
    assert!(
        max_backlog <= 200,
        "backlog {max_backlog} during 10,000 flaps"
    );
    // Settled (fast clients read everything): what still waits in the outbox is the slow
    // client's, at most what the merge threshold holds, then one event per watched user, plus a
    // heartbeat ping. (Beyond the outbox it holds at most one 64 KiB write batch and what the
    // kernel's socket buffer takes.)
    let settled = m.outbox_pending;
    assert!(
        settled <= QUEUED_BEFORE_MERGING + (USERS + 1) as u64,
        "settled backlog {settled}: more than the merge threshold plus one per user"
    );

    // Now read: every user ends at its final state, seqs only go up, no disconnect on the way.
    let final_text = format!("r{}", FLAPS_PER_USER - 1);
    let mut done = [false; USERS];
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done.iter().all(|d| *d) {
        assert!(Instant::now() < deadline, "did not converge");
        let v = slow.recv();
        if v["type"] != "presence" {
            continue;
        }
        let i = users.iter().position(|u| v["user"] == u.as_str()).unwrap();
        let seq = v["seq"].as_u64().unwrap();
        assert!(
            seq > last_seq[i],
            "older state after newer for {}",
            users[i]
        );
        last_seq[i] = seq;
        if v["text"] == final_text.as_str() {
            assert_eq!(v["status"], statuses[(FLAPS_PER_USER - 1) % 3]);
            done[i] = true;
        }
    }
    assert_eq!(
        slow.request(json!({"op":"ping"}))["type"],
        "pong",
        "never disconnected"
    );
}
