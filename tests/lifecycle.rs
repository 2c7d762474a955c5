//! Proves connection and subscription lifecycles hold up under clients that misbehave or change
//! their minds: re-subscribing always yields the current state; a client that floods ops and
//! never reads is closed (4008) within a bounded time and its session removed; a second server
//! cannot silently share a port already in use.

mod common;

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use common::{tcp_from, TestServer};
use serde_json::json;

#[test]
fn resubscribing_yields_the_current_state() {
    let server = TestServer::with(2, |c| c.limits.ops_per_second = 0);
    let mut w = server.connect("resub-watcher");
    let mut target = server.connect_token(&server.token_in_groups("resub-target", &["rg"]));
    for round in 0..20 {
        let status = ["away", "busy", "online"][round % 3];
        target.set_status(status, Some(&format!("t{round}")));
        // Unsubscribe and subscribe again in one go, then ask for the state.
        w.send(json!({"op":"unsubscribe","users":["resub-target"]}));
        w.send(json!({"op":"unsubscribe_group","group":"rg"}));
        let snap = w.subscribe(&["resub-target"])[0].clone();
        assert_eq!(
            snap["text"],
            format!("t{round}"),
            "snapshot is the current state"
        );
        assert_eq!(
            w.request(json!({"op":"subscribe_group","group":"rg"}))["type"],
            "ack"
        );
        let g = w.recv_until("group snapshot", |v| v["type"] == "group_snapshot");
        assert_eq!(g["members"][0]["text"], format!("t{round}"));
    }
}

#[test]
fn a_client_that_never_reads_its_replies_is_closed_in_bounded_time() {
    let server = TestServer::with(2, |c| {
        c.limits.max_pending_replies = 16;
        c.limits.ops_per_second = 0;
    });
    let mut w = server.connect("stuck-watcher");
    w.subscribe(&["stuck"]);
    let stream = tcp_from(IpAddr::V4(Ipv4Addr::LOCALHOST), server.addr, Some(2048));
    stream
        .set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut stuck = common::Client::connect_over(stream, &server.token("stuck"));
    assert_eq!(w.presence_of("stuck")["status"], "online");
    // Flood pings and never read a reply. Writes may start failing once the server stops
    // reading; that is expected.
    let started = Instant::now();
    for _ in 0..20_000 {
        let frame = tungstenite::Message::text(r#"{"op":"ping"}"#);
        if stuck.ws.send(frame).is_err() {
            break;
        }
    }
    let _ = stuck.ws.get_mut().flush();
    let ev = w.presence_of("stuck");
    assert_eq!(ev["status"], "offline", "the session is removed");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    drop(stuck);
}

#[test]
fn a_second_server_cannot_share_a_port_in_use() {
    let first = TestServer::start(1);
    let cfg = presenced::Config {
        listen: first.addr,
        shards: 1,
        placement: presenced::config::Placement::Unbound,
        jwt_secret: Some(common::SECRET.into()),
        admin: common::admin_on_any_port(),
        history: presenced::config::HistoryConfig {
            backend: presenced::config::HistoryBackend::Off,
            ..Default::default()
        },
        ..presenced::Config::default()
    };
    let cfg = cfg.validate().unwrap();
    let verifier = presenced::auth::Verifier::new(cfg.jwt_secret.as_deref(), &cfg.auth).unwrap();
    match presenced::start(cfg, verifier) {
        Err(presenced::StartError::Listen { .. }) => {}
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a second server started on {}", first.addr),
    }
}
