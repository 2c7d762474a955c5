//! Proves connection liveness and token lifetime over real sockets: the server pings every
//! heartbeat; a client that answers stays; a half-open client that sends nothing is reaped after
//! two intervals and its session removed; a client that never finishes its upgrade request gets
//! 408 (slowloris); a token's expiry closes the session with 4001 unless `refresh` moved it.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{TestServer, SECRET};
use presenced::auth::{mint_hs256, TokenSpec};
use serde_json::json;
use tungstenite::Message;

#[test]
fn silent_client_is_reaped_and_a_responsive_one_stays() {
    let server = TestServer::with(2, |c| c.heartbeat_ms = 200);
    let mut watcher = server.connect("reaper-watcher");
    watcher.subscribe(&["halfopen"]);

    // A raw client: completes the upgrade, then never reads or writes again.
    let mut raw = TcpStream::connect(server.addr).unwrap();
    let token = server.token("halfopen");
    write!(
        raw,
        "GET /ws?token={token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    .unwrap();
    assert_eq!(watcher.presence_of("halfopen")["status"], "online");

    // A tungstenite client answers pings whenever it reads: keep one reading in a thread.
    let mut alive = server.connect("alive");
    let reader = std::thread::spawn(move || {
        alive
            .ws
            .get_ref()
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let (mut pings, deadline) = (0, Instant::now() + Duration::from_millis(1500));
        while Instant::now() < deadline {
            match alive.ws.read() {
                Ok(Message::Ping(_)) => pings += 1,
                Ok(other) => panic!("unexpected {other:?}"),
                Err(_) => {} // read timeout: keep going
            }
        }
        alive
            .ws
            .get_ref()
            .set_read_timeout(Some(common::WAIT))
            .unwrap();
        (alive, pings)
    });
    let started = Instant::now();
    let ev = watcher.presence_of("halfopen");
    assert_eq!(ev["status"], "offline", "reaped: its session is gone");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(300),
        "not before ~two intervals: {waited:?}"
    );
    assert_eq!(
        server.handle().metrics_total().heartbeat_timeouts,
        1,
        "counted once"
    );

    let (mut alive, pings) = reader.join().unwrap();
    assert!(pings >= 3, "server pings every heartbeat: {pings}");
    assert_eq!(
        alive.request(json!({"op":"ping"}))["type"],
        "pong",
        "still connected"
    );
    drop(raw);
}

#[test]
fn slowloris_gets_408() {
    let server = TestServer::with(2, |c| c.limits.handshake_timeout_ms = 300);
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(common::WAIT)).unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n").unwrap(); // and never finishes
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    assert_eq!(server.handle().metrics_total().handshakes_timed_out, 1);
}

fn short_token(sub: &str, secs: u64) -> String {
    mint_hs256(SECRET, &TokenSpec::new(sub, Duration::from_secs(secs)))
}

#[test]
fn token_expiry_closes_with_4001_unless_refreshed() {
    let server = TestServer::with(2, |c| c.auth.leeway_s = 0);
    let mut expiring = server.connect_token(&short_token("expiring", 2));
    let mut refreshed = server.connect_token(&short_token("refreshed", 2));
    let ack = refreshed.request(json!({"op":"refresh","token": short_token("refreshed", 3600)}));
    assert_eq!(ack["type"], "ack");

    let started = Instant::now();
    assert_eq!(expiring.close_code(), 4001);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "closed at expiry, not much later"
    );
    assert!(server.handle().metrics_total().token_expiry_closes >= 1);

    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        refreshed.request(json!({"op":"ping"}))["type"],
        "pong",
        "refresh moved expiry"
    );
}
