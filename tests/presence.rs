//! Proves the presence model end to end over real WebSockets: users on different shards see each
//! other's changes, multi-device aggregation, invisible/busy/away, `seq` order, and socket
//! hand-off keeping the bytes a client sent right after its upgrade request.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{user_on, TestServer};
use serde_json::json;

#[test]
fn users_on_different_shards_see_each_other() {
    let server = TestServer::start(2);
    let a = user_on(0, 2, "alice");
    let b = user_on(1, 2, "bob");
    let mut alice = server.connect(&a);
    let mut bob = server.connect(&b);
    assert_eq!(alice.shard(), 0, "served by the owner shard of its user");
    assert_eq!(bob.shard(), 1);

    let snap = alice.subscribe(&[&b]);
    assert_eq!(snap[0]["status"], "online");
    assert_eq!(snap[0]["devices"], 1);
    bob.set_status("busy", Some("in a call"));
    let ev = alice.presence_of(&b);
    assert_eq!(
        (ev["status"].as_str(), ev["text"].as_str()),
        (Some("busy"), Some("in a call"))
    );
    assert!(ev["seq"].as_u64() > snap[0]["seq"].as_u64());

    bob.subscribe(&[&a]);
    alice.set_status("away", None);
    assert_eq!(bob.presence_of(&a)["status"], "away");
}

#[test]
fn offline_users_snapshot_then_come_online() {
    let server = TestServer::start(2);
    let mut watcher = server.connect("watcher");
    let snap = watcher.subscribe(&["nobody-yet"]);
    assert_eq!(snap[0]["status"], "offline");
    assert_eq!(snap[0]["devices"], 0);
    assert!(snap[0].get("last_seen").is_none());
    let _c = server.connect("nobody-yet");
    let ev = watcher.presence_of("nobody-yet");
    assert_eq!(
        (ev["status"].as_str(), ev["devices"].as_u64()),
        (Some("online"), Some(1))
    );
}

#[test]
fn multi_device_aggregation_and_last_seen() {
    let server = TestServer::start(2);
    let mut w = server.connect("w");
    w.subscribe(&["carol"]);
    let d1 = server.connect("carol");
    assert_eq!(w.presence_of("carol")["devices"], 1);
    let mut d2 = server.connect("carol");
    assert_eq!(
        d1.shard(),
        d2.shard(),
        "all devices of a user live on one shard"
    );
    assert_eq!(w.presence_of("carol")["devices"], 2);

    d2.set_status("away", None);
    // The aggregate (online, 2 devices) did not change, so no event and no seq.
    w.expect_silence(Duration::from_millis(300));

    d1.close();
    let ev = w.presence_of("carol");
    assert_eq!(
        (ev["status"].as_str(), ev["devices"].as_u64()),
        (Some("away"), Some(1))
    );
    assert!(ev.get("last_seen").is_none());

    d2.close();
    let ev = w.presence_of("carol");
    assert_eq!(
        (ev["status"].as_str(), ev["devices"].as_u64()),
        (Some("offline"), Some(0))
    );
    let last_seen = ev["last_seen"]
        .as_u64()
        .expect("last_seen when going offline");
    assert!(last_seen > 1_700_000_000_000);

    // A later subscriber's snapshot carries last_seen too.
    let mut late = server.connect("late");
    let snap = late.subscribe(&["carol"]);
    assert_eq!(snap[0]["last_seen"].as_u64(), Some(last_seen));
}

#[test]
fn invisible_hides_and_busy_outranks_away() {
    let server = TestServer::start(2);
    let mut w = server.connect("w2");
    w.subscribe(&["dave"]);
    let mut d1 = server.connect("dave");
    w.presence_of("dave");
    d1.set_status("invisible", None);
    let ev = w.presence_of("dave");
    assert_eq!(
        (ev["status"].as_str(), ev["devices"].as_u64()),
        (Some("offline"), Some(0))
    );

    let mut d2 = server.connect("dave");
    assert_eq!(w.presence_of("dave")["status"], "online");
    d2.set_status("away", None);
    assert_eq!(w.presence_of("dave")["status"], "away");
    d1.set_status("busy", None);
    let ev = w.presence_of("dave");
    assert_eq!(
        (ev["status"].as_str(), ev["devices"].as_u64()),
        (Some("busy"), Some(2))
    );
    d2.set_status("online", None);
    assert_eq!(w.presence_of("dave")["status"], "online");
    // An invisible session cannot leak through activity.
    d1.set_status("invisible", None);
    let r = d1.request(json!({"op":"activity","kind":"typing"}));
    assert_eq!(r["code"], "forbidden");
}

#[test]
fn seq_strictly_increases_for_every_subscriber() {
    // 60 ops in a burst: above the default per-connection op rate.
    let server = TestServer::with(2, |c| c.limits.ops_per_second = 0);
    let target = user_on(1, 2, "flapper");
    let mut watchers: Vec<_> = (0..4)
        .map(|i| server.connect(&format!("seqw{i}")))
        .collect();
    let mut last = Vec::new();
    for w in &mut watchers {
        last.push(w.subscribe(&[&target])[0]["seq"].as_u64().unwrap());
    }
    let mut t = server.connect(&target);
    let statuses = ["away", "busy", "online", "away", "busy", "online"];
    for (i, s) in statuses.iter().cycle().take(60).enumerate() {
        let op = json!({"op":"set_status","status":s,"text":format!("t{i}")});
        t.send(op);
    }
    // Final state: online, text t59. Every watcher sees strictly increasing seqs ending there.
    for (w, mut prev) in watchers.iter_mut().zip(last) {
        loop {
            let ev = w.presence_of(&target);
            let seq = ev["seq"].as_u64().unwrap();
            assert!(seq > prev, "seq {seq} after {prev}");
            prev = seq;
            if ev["text"] == "t59" {
                assert_eq!(ev["status"], "online");
                break;
            }
        }
    }
}

#[test]
fn handoff_keeps_bytes_sent_with_the_upgrade_request() {
    let server = TestServer::start(2);
    // Users until one connection has landed on a non-owner shard and been handed off (the
    // kernel picks the accepting shard; each try has a 1 in 2 chance), bounded.
    for i in 0..64 {
        if i >= 8 && server.handle().metrics_total().handoffs_in > 0 {
            break;
        }
        let user = format!("early{i}");
        let token = server.token(&user);
        let mut s = TcpStream::connect(server.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut wire = format!(
            "GET /ws?token={token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        .into_bytes();
        // A masked text frame, in the same write as the request.
        let payload = br#"{"op":"ping","id":"early"}"#;
        let mask = [1u8, 2, 3, 4];
        wire.extend_from_slice(&[0x81, 0x80 | payload.len() as u8]);
        wire.extend_from_slice(&mask);
        wire.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        s.write_all(&wire).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains(r#""id":"early""#) {
            let n = s.read(&mut buf).expect("pong to the early frame");
            assert!(n > 0, "connection closed before the pong");
            got.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 101"));
        assert!(text.contains(r#""type":"pong""#));
    }
    let m = server.handle().metrics_total();
    assert!(
        m.handoffs_in > 0,
        "at least one connection was handed off: {m:?}"
    );
    assert_eq!(m.handoffs_in, m.handoffs_out);
}

#[test]
fn unsubscribe_stops_events_and_activity_reaches_subscribers() {
    let server = TestServer::start(2);
    let mut w = server.connect("uw");
    let mut e = server.connect("erin");
    w.subscribe(&["erin"]);
    assert_eq!(
        e.request(json!({"op":"activity","kind":"typing"}))["type"],
        "ack"
    );
    let ev = w.recv_until("activity", |v| v["type"] == "activity");
    assert_eq!(
        (ev["user"].as_str(), ev["kind"].as_str()),
        (Some("erin"), Some("typing"))
    );
    // Directed activity reaches every session of the target, subscribed or not.
    e.request(json!({"op":"activity","kind":"poke","to":"uw"}));
    let ev = w.recv_until("poke", |v| v["kind"] == "poke");
    assert_eq!(ev["user"], "erin");

    assert_eq!(
        w.request(json!({"op":"unsubscribe","users":["erin"]}))["type"],
        "ack"
    );
    e.set_status("busy", None);
    w.expect_silence(Duration::from_millis(300));
    let pong = w.request(json!({"op":"ping"}));
    assert_eq!(pong["type"], "pong");
    assert!(pong["ts"].as_u64().is_some());
}
