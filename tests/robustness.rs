//! Regression tests for the robustness defects of issue 11, each over real sockets against a
//! real server: a refused session applies nothing; handshakes in flight are capped; a 4008
//! flushes its replies first, and is sent even while a watched user keeps changing; a client that
//! keeps up sees every `seq`. (An admin scan of 200k users not stopping presence is in
//! admin_scan.rs; a panic half-way through a fan-out being repaired, in panic_isolation.rs.)

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use serde_json::json;

/// Item 1: with `reject_new`, the refused connection is upgraded and closed with 4009, and
/// nothing it sends — even ops in the very packet of its upgrade request — is applied. (Before
/// the session layer, its `set_status` reached an `unreachable!` (a caught panic, counted) and
/// its `subscribe` left a watcher count on the owner for good.)
#[test]
fn a_refused_session_applies_nothing() {
    let s = TestServer::with(2, |c| {
        c.limits.max_sessions_per_user = 1;
        c.limits.session_policy = presenced::config::SessionPolicy::RejectNew;
    });
    let _first = s.connect("dup");
    let ops: Vec<u8> = [
        json!({"op":"subscribe","users":["target"]}),
        json!({"op":"set_status","status":"busy"}),
        json!({"op":"subscribe_group","group":"g"}),
    ]
    .iter()
    .flat_map(|op| masked_text(&op.to_string()))
    .collect();
    // Ops in the packet of the upgrade request, and ops right behind it in the next segment
    // (they reach the socket while the upgrade is handed to the owner shard), many times.
    for attempt in 0..40u64 {
        let mut raw = TcpStream::connect(s.addr).unwrap();
        raw.set_read_timeout(Some(WAIT)).unwrap();
        raw.set_nodelay(true).unwrap();
        let mut first = upgrade_request(&s.token("dup")).into_bytes();
        if attempt % 2 == 0 {
            first.extend_from_slice(&ops);
        }
        raw.write_all(&first).unwrap();
        // Land the rest at different moments of the server's handshake.
        std::thread::sleep(Duration::from_micros(100 * (attempt % 10)));
        let _ = raw.write_all(&ops);
        let mut got = Vec::new();
        let _ = raw.read_to_end(&mut got);
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 101"), "{text}");
        let head = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        assert_eq!(
            got[head], 0x88,
            "the first frame after the upgrade is a close"
        );
        assert_eq!(u16::from_be_bytes([got[head + 2], got[head + 3]]), 4009);
    }
    // Nothing was applied: no panic, no watcher left on the owners, no group watched, and the
    // first session's status untouched.
    let m = s.handle().metrics_total();
    assert_eq!(m.conn_panics, 0);
    assert_eq!(m.session_limit_closes, 40);
    let admin = s.admin_token();
    let (code, body) = s.admin_request("GET", "/api/users/target", Some(&admin));
    assert_eq!(code, 404, "target has no watcher entry: {body}");
    let (code, _) = s.admin_request("GET", "/api/groups/g", Some(&admin));
    assert_eq!(code, 404, "nobody watches g");
    assert_eq!(s.admin_get("/api/users/dup")["status"], "online");
}

/// Item 3: at most `limits.max_handshakes_in_flight` upgrade requests are read at once per
/// shard. A socket beyond them waits in the listen backlog and is served when a slot frees; one
/// that would wait past `limits.handshake_wait_ms` gets 503.
#[test]
fn handshakes_in_flight_are_capped() {
    let s = TestServer::with(1, |c| {
        c.limits.max_handshakes_in_flight = 2;
        c.limits.handshake_wait_ms = 100;
    });
    let silent: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(s.addr).unwrap())
        .collect();
    let (code, body) = eventually("the third handshake refused", || {
        let got = raw_request(s.addr, &upgrade_request(&s.token("third")));
        (got.0 != 101).then_some(got)
    });
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("too many handshakes in progress"), "{body}");
    drop(silent);
    eventually("the slots freed", || {
        (raw_request(s.addr, &upgrade_request(&s.token("fourth"))).0 == 101).then_some(())
    });

    // Backpressure first: with a long wait, a socket beyond the slots is held, then served.
    let s = TestServer::with(1, |c| {
        c.limits.max_handshakes_in_flight = 2;
        c.limits.handshake_wait_ms = 10_000;
    });
    let mut silent: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(s.addr).unwrap())
        .collect();
    let (patient, token) = (TcpStream::connect(s.addr).unwrap(), s.token("patient"));
    let third = std::thread::spawn(move || raw_request_from(patient, &upgrade_request(&token)).0);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !third.is_finished(),
        "the third handshake waits while both slots are taken"
    );
    silent.pop();
    assert_eq!(
        third.join().unwrap(),
        101,
        "served once a slot freed, not refused"
    );
}

/// Item 18: a burst of 15 ops against a limit of 5/s (burst 5) gets 5 answers, 5 `rate_limited`
/// errors, and only then the 4008 close: the replies queued before the close are written
/// first. (Before, the close went out at once and the queued replies were thrown away.) The
/// rate is low so that the bucket refills one token only every 200 ms: a shorter pause of the
/// server within the burst cannot change the counts (at 50/s, 20 ms did).
#[test]
fn a_rate_limit_close_flushes_the_replies_queued_before_it() {
    let s = TestServer::with(1, |c| c.limits.ops_per_second = 5);
    let mut c = s.connect("burster");
    let burst: Vec<u8> = (0..15)
        .flat_map(|i| masked_text(&json!({"op":"ping","id":i}).to_string()))
        .collect();
    c.ws.get_mut().write_all(&burst).unwrap();
    let (mut pongs, mut limited) = (0, 0);
    let code = loop {
        match c.ws.read() {
            Ok(tungstenite::Message::Text(t)) => {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                match (v["type"].as_str(), v["code"].as_str()) {
                    (Some("pong"), _) => pongs += 1,
                    (Some("error"), Some("rate_limited")) => limited += 1,
                    other => panic!("unexpected {other:?}"),
                }
            }
            Ok(tungstenite::Message::Close(Some(f))) => break u16::from(f.code),
            Ok(_) => {}
            Err(e) => panic!("no close frame: {e}"),
        }
    };
    assert_eq!((pongs, limited, code), (5, 5, 4008));
}

/// Item 19: a client that keeps up sees every change of a watched user, with no `seq` gap, even
/// when two changes land within the same moment (two ops in one TCP segment). Before, the
/// second replaced the first in the outbox whenever both were queued before a write.
#[test]
fn a_client_that_keeps_up_sees_every_seq() {
    let s = TestServer::with(2, |c| c.limits.ops_per_second = 0);
    let user = user_on(0, 2, "twice");
    let mut w = s.connect(&user_on(1, 2, "reader"));
    w.subscribe(&[&user]);
    let mut u = s.connect(&user);
    let mut last = w.presence_of(&user)["seq"].as_u64().unwrap();
    for round in 0..50 {
        let two: Vec<u8> = ["away", "busy"]
            .iter()
            .flat_map(|st| {
                let op = json!({"op":"set_status","status":st,"text":format!("r{round}")});
                masked_text(&op.to_string())
            })
            .collect();
        u.ws.get_mut().write_all(&two).unwrap();
        for _ in 0..2 {
            let v = w.presence_of(&user);
            let seq = v["seq"].as_u64().unwrap();
            assert_eq!(seq, last + 1, "round {round}: a gap after seq {last}: {v}");
            last = seq;
        }
    }
    assert_eq!(
        s.handle().metrics_total().coalesced,
        0,
        "nothing merged for a reader that keeps up"
    );
}

/// The close that follows a flush is sent even while events keep coming for the closing
/// session: a closing session takes no new events, so what was queued drains and the 4008
/// goes out. (The mechanism is unit-tested in `shard::apply` tests,
/// `a_closing_session_takes_no_new_events`; this is the same over a socket.)
#[test]
fn a_flushing_close_is_sent_while_a_watched_user_keeps_changing() {
    let s = TestServer::with(1, |c| {
        c.limits.ops_per_second = 50;
        c.limits.close_flush_ms = 2_000;
    });
    let mut c = s.connect("burster2");
    c.subscribe(&["chatty"]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flapper = {
        let (stop, mut chatty) = (stop.clone(), s.connect("chatty"));
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let status = ["away", "busy"][n as usize % 2];
                chatty.send(json!({"op":"set_status","status":status,"text":format!("n{n}")}));
                n += 1;
                std::thread::sleep(Duration::from_millis(25)); // 40/s: inside its own limit
            }
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    let burst: Vec<u8> = (0..150)
        .flat_map(|i| masked_text(&json!({"op":"ping","id":i}).to_string()))
        .collect();
    c.ws.get_mut().write_all(&burst).unwrap();
    let code = loop {
        match c.ws.read() {
            Ok(tungstenite::Message::Close(Some(f))) => break u16::from(f.code),
            Ok(_) => {}
            Err(e) => panic!("no close frame: {e}"),
        }
    };
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flapper.join().unwrap();
    assert_eq!(code, 4008);
}
