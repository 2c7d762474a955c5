//! The admin port's HTTP server itself: keep-alive and its limits, the dashboard's strict
//! policy, and a pool that neither stuck readers nor idle sockets can take from `/healthz`.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

#[test]
fn the_http_server_keeps_alive_and_enforces_its_limits() {
    let s = TestServer::with(1, |c| {
        c.admin.request_timeout_ms = 300;
        c.admin.max_request_bytes = 4096;
    });
    // Two requests on one connection.
    let mut conn = TcpStream::connect(s.admin).unwrap();
    conn.set_read_timeout(Some(WAIT)).unwrap();
    for _ in 0..2 {
        conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut buf = vec![0u8; 1024];
        let n = conn.read(&mut buf).unwrap();
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(
            text.starts_with("HTTP/1.1 200 OK") && text.contains("connection: keep-alive"),
            "{text}"
        );
        assert!(text.ends_with(r#"{"ok":true}"#), "{text}");
    }
    // HEAD: headers only.
    let (code, body) = raw_request(
        s.admin,
        "HEAD /healthz HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    assert_eq!((code, body.as_str()), (200, ""));
    // Garbage, an oversized head, a stalled head.
    let (code, body) = raw_request(s.admin, "\x01\x02 nonsense\r\n\r\n");
    assert_eq!(code, 400, "{body}");
    let huge = format!(
        "GET /healthz HTTP/1.1\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(8192)
    );
    let (code, body) = raw_request(s.admin, &huge);
    assert_eq!(code, 413, "{body}");
    assert!(body.contains("too_large"));
    let started = Instant::now();
    let (code, _) = raw_request(s.admin, "GET /healthz HTTP/1.1\r\n");
    assert_eq!(code, 408);
    assert!(started.elapsed() < WAIT);
    // /ws/admin without an upgrade.
    let (code, _) = raw_request(
        s.admin,
        "GET /ws/admin HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(code, 400);
    // The server is still fine.
    assert_eq!(s.admin_request("GET", "/healthz", None).0, 200);
}

#[test]
fn the_dashboard_is_served_with_a_strict_policy() {
    let s = admin_server(1);
    let (code, body) = raw_request(s.admin, "GET / HTTP/1.1\r\nConnection: close\r\n\r\n");
    assert_eq!(code, 200);
    assert!(
        body.contains("<html")
            || body.contains("<!doctype html")
            || body.contains("<!DOCTYPE html")
    );
    let mut conn = TcpStream::connect(s.admin).unwrap();
    conn.write_all(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut all = String::new();
    conn.read_to_string(&mut all).unwrap();
    let head = all.split("\r\n\r\n").next().unwrap().to_ascii_lowercase();
    assert!(
        head.contains("content-security-policy: default-src 'self'"),
        "{head}"
    );
    assert!(head.contains("script-src 'self'"));
    for asset in [
        "/assets/app.js",
        "/assets/app.css",
        "/assets/uPlot.iife.min.js",
        "/assets/uPlot.min.css",
    ] {
        let (code, body) = raw_request(
            s.admin,
            &format!("GET {asset} HTTP/1.1\r\nConnection: close\r\n\r\n"),
        );
        assert_eq!(code, 200, "{asset}");
        assert!(!body.is_empty());
    }
}

#[test]
fn clients_that_stop_reading_cannot_hold_the_admin_port() {
    let s = TestServer::with(1, |c| {
        c.admin.max_connections = 3;
        c.admin.request_timeout_ms = 2_000;
        c.admin.idle_timeout_ms = 500;
    });
    // Three connections pipeline requests for a large open file and never read the answers.
    let request = "GET /assets/uPlot.iife.min.js HTTP/1.1\r\nHost: x\r\n\r\n".repeat(200);
    let stuck: Vec<TcpStream> = (0..3)
        .map(|_| {
            let mut c = tcp_from("127.0.0.1".parse().unwrap(), s.admin, Some(4096));
            c.set_write_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            let _ = c.write_all(request.as_bytes());
            c
        })
        .collect();
    // However far the server got with them, a probe is answered: by evicting a stuck one not
    // yet read (idle), or in a reserved probe slot.
    assert_eq!(s.admin_request("GET", "/healthz", None).0, 200);
    // Within a few write timeouts the server has given up on them and serves everything again.
    let token = s.admin_token();
    eventually("the admin port serving again", || {
        (s.admin_request("GET", "/api/stats", Some(&token)).0 == 200).then_some(())
    });
    drop(stuck);
}

/// When every pooled admin connection is busy (here: two live `/ws/admin` feeds in a pool of
/// two), a newcomer gets a reserved probe slot: `/healthz`, `/readyz` and `/metrics` are still
/// answered, anything else gets 503; once a feed goes, the API answers again.
#[test]
fn probes_are_answered_when_every_admin_connection_is_busy() {
    let s = TestServer::with(1, |c| c.admin.max_connections = 2);
    let token = s.admin_token();
    let feeds: Vec<_> = (0..2)
        .map(|_| {
            let stream = TcpStream::connect(s.admin).unwrap();
            stream.set_read_timeout(Some(WAIT)).unwrap();
            let url = format!("ws://{}/ws/admin", s.admin);
            let mut ws = tungstenite::client::client(url, stream).expect("upgrade").0;
            let auth = json!({"op":"auth","token":token}).to_string();
            ws.send(tungstenite::Message::text(auth)).unwrap();
            // The hello: this feed is live (busy) from here on.
            assert!(matches!(ws.read().unwrap(), tungstenite::Message::Text(_)));
            ws
        })
        .collect();
    for path in ["/healthz", "/readyz", "/metrics"] {
        let (code, _) = raw_request(
            s.admin,
            &format!("GET {path} HTTP/1.1\r\nConnection: close\r\n\r\n"),
        );
        assert_eq!(code, 200, "{path} in a probe slot");
    }
    let (code, body) = s.admin_request("GET", "/api/stats", Some(&token));
    assert_eq!(code, 503, "{body}");
    assert!(s.handle().metrics_total().admin_refused >= 1);
    drop(feeds);
    eventually("the pool free again", || {
        (s.admin_request("GET", "/api/stats", Some(&token)).0 == 200).then_some(())
    });
}

/// Item 14: idle sockets cannot lock the admin port. A full pool evicts its longest-idle
/// connection for a newcomer, so `/healthz` and `/metrics` answer while 50 silent sockets are
/// open against a pool of 8 (before, every probe got 503 until the sockets' 60 s idle timeout);
/// one client holds at most `admin.max_connections_per_ip` (429 past it); a socket that sends
/// nothing is closed after `admin.header_timeout_ms`.
#[test]
fn idle_sockets_cannot_lock_the_admin_port() {
    let s = TestServer::with(1, |c| {
        c.admin.max_connections = 8;
        c.admin.max_connections_per_ip = 1_000;
        c.admin.header_timeout_ms = 60_000;
    });
    let idle: Vec<TcpStream> = (0..50)
        .map(|_| TcpStream::connect(s.admin).unwrap())
        .collect();
    for _ in 0..5 {
        assert_eq!(s.admin_request("GET", "/healthz", None).0, 200);
        let (code, body) = raw_request(
            s.admin,
            "GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n",
        );
        assert_eq!(code, 200, "{body}");
    }
    assert!(s.handle().metrics_total().admin_evictions >= 10);
    drop(idle);

    let s = TestServer::with(1, |c| {
        c.admin.max_connections_per_ip = 3;
        c.admin.header_timeout_ms = 300;
    });
    let ip = |n| std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, n));
    let held: Vec<TcpStream> = (0..3).map(|_| tcp_from(ip(2), s.admin, None)).collect();
    let (code, body) = eventually("the fourth from one IP refused", || {
        let got = raw_request_from(
            tcp_from(ip(2), s.admin, None),
            "GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n",
        );
        (got.0 != 200).then_some(got)
    });
    assert_eq!(code, 429, "{body}");
    let (code, _) = raw_request_from(
        tcp_from(ip(3), s.admin, None),
        "GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(code, 200, "another IP is unaffected");
    // The held sockets sent nothing: each is closed after the header timeout.
    for mut c in held {
        c.set_read_timeout(Some(WAIT)).unwrap();
        let mut buf = [0u8; 16];
        assert!(matches!(c.read(&mut buf), Ok(0)), "closed by the server");
    }
}
