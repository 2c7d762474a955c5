//! Proves that bad input gets the documented error reply, keeps the session working and leaves
//! other sessions untouched: invalid JSON, unknown ops, wrong field types, binary frames,
//! oversized messages (soft limit → `too_large`; hard limit → close 1009), bad close codes. And
//! that the parsers are strict where leniency would let two readers disagree: a repeated `Origin`
//! or `Host` on the upgrade and a `Content-Length` that is not plain digits on the admin port are
//! refused with 400, while JSON that merely spells an op name with escapes is the same op.

mod common;

use common::{raw_request, TestServer};
use serde_json::json;
use tungstenite::Message;

#[test]
fn each_bad_message_gets_its_error_and_the_session_goes_on() {
    let server = TestServer::with(2, |c| c.limits.max_message_bytes = 1024);
    let mut bystander = server.connect("bystander");
    let mut c = server.connect("sloppy");
    bystander.subscribe(&["sloppy"]);

    let cases: Vec<(Message, &str)> = vec![
        (Message::text("{not json"), "bad_request"),
        (Message::text(r#"{"op":"teleport","id":1}"#), "unknown_op"),
        (
            Message::text(r#"{"op":"subscribe","users":"alice","id":2}"#),
            "bad_request",
        ),
        (
            Message::text(r#"{"op":"set_status","status":42}"#),
            "bad_request",
        ),
        (
            Message::text(r#"{"op":"set_status","status":"asleep"}"#),
            "bad_request",
        ),
        (Message::text(r#"[1,2,3]"#), "bad_request"),
        (Message::binary(vec![1u8, 2, 3]), "bad_request"),
        (Message::text("x".repeat(5000)), "too_large"),
    ];
    for (msg, code) in cases {
        c.send_raw(msg.clone());
        let e = c.recv_until("error reply", |v| v["type"] == "error");
        assert_eq!(e["code"], code, "for {msg:?}: {e}");
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // Ids are echoed even when the op is refused.
    c.send(json!({"op":"teleport","id":"abc"}));
    assert_eq!(c.recv_until("error", |v| v["type"] == "error")["id"], "abc");

    // Still fully working, and the other session never noticed.
    assert_eq!(c.request(json!({"op":"ping"}))["type"], "pong");
    c.set_status("busy", None);
    assert_eq!(bystander.presence_of("sloppy")["status"], "busy");
    let m = server.handle().metrics_total();
    assert!(m.op_errors >= 9, "{m:?}");
}

#[test]
fn past_the_hard_limit_closes_with_1009_only_that_connection() {
    let server = TestServer::with(2, |c| {
        c.limits.max_message_bytes = 1024;
        c.limits.max_frame_bytes = 4096;
    });
    let mut other = server.connect("other");
    let mut c = server.connect("huge");
    c.send_raw(Message::text("y".repeat(10_000)));
    assert_eq!(c.close_code(), 1009);
    assert_eq!(other.request(json!({"op":"ping"}))["type"], "pong");
}

#[test]
fn protocol_violations_close_with_their_codes() {
    let server = TestServer::start(2);
    // Invalid UTF-8 in a text frame: 1007. tungstenite refuses to send it, so write a raw frame.
    let mut c = server.connect("badutf8");
    let frame = tungstenite::protocol::frame::Frame::message(
        vec![0xffu8, 0xfe],
        tungstenite::protocol::frame::coding::OpCode::Data(
            tungstenite::protocol::frame::coding::Data::Text,
        ),
        true,
    );
    c.ws.write(Message::Frame(frame)).unwrap();
    c.ws.flush().unwrap();
    assert_eq!(c.close_code(), 1007);
}

#[test]
fn closing_cleanly_echoes_the_code() {
    let server = TestServer::start(2);
    let mut c = server.connect("leaver");
    c.ws.close(Some(tungstenite::protocol::CloseFrame {
        code: 4000.into(),
        reason: "bye".into(),
    }))
    .unwrap();
    assert_eq!(c.close_code(), 4000);
}

#[test]
fn op_names_spelled_with_json_escapes_are_the_same_ops() {
    let server = TestServer::start(2);
    let mut watcher = server.connect("watcher");
    let mut c = server.connect("escaper");
    watcher.subscribe(&["escaper"]);
    c.send_raw(Message::text(r#"{"op":"\u0070ing","id":"e1"}"#));
    let pong = c.recv_until("pong", |v| v["id"] == "e1");
    assert_eq!(pong["type"], "pong", "{pong}");
    c.send_raw(Message::text(
        r#"{"op":"set_\u0073tatus","status":"b\u0075sy","id":"e2"}"#,
    ));
    assert_eq!(c.recv_until("ack", |v| v["id"] == "e2")["type"], "ack");
    assert_eq!(watcher.presence_of("escaper")["status"], "busy");
}

#[test]
fn a_repeated_origin_or_host_on_the_upgrade_is_refused() {
    let server = TestServer::with(2, |c| c.allowed_origins = vec!["https://app".into()]);
    let auth = format!("Authorization: Bearer {}\r\n", server.token("u"));
    // Each alone: the allowlist decides.
    assert_eq!(
        server
            .raw_upgrade("/ws", &format!("{auth}Origin: https://app\r\n"))
            .0,
        101
    );
    assert_eq!(
        server
            .raw_upgrade("/ws", &format!("{auth}Origin: https://evil\r\n"))
            .0,
        403
    );
    // Two: whichever the allowlist looked at, the other could be the one a browser or proxy
    // meant. Refused in either order (the last one used to win, so evil-then-app got in).
    for origins in [
        "Origin: https://evil\r\nOrigin: https://app\r\n",
        "Origin: https://app\r\nOrigin: https://evil\r\n",
    ] {
        let (status, body) = server.raw_upgrade("/ws", &format!("{auth}{origins}"));
        assert_eq!((status, body.as_str()), (400, "repeated Origin header"));
    }
    // raw_upgrade already sends `Host: x`.
    let (status, body) = server.raw_upgrade("/ws", &format!("{auth}Host: y\r\n"));
    assert_eq!((status, body.as_str()), (400, "repeated Host header"));
}

#[test]
fn admin_content_length_must_be_digits() {
    let server = TestServer::start(1);
    let post = |length: &str| {
        raw_request(
            server.admin,
            &format!(
                "POST /api/users/nobody/kick HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\
                 Connection: close\r\n\r\nhello"
            ),
        )
    };
    // Plain digits reach the router (which wants a token).
    assert_eq!(post("5").0, 401);
    for length in ["+5", "-5", "5.0", "0x5"] {
        let (status, body) = post(length);
        assert_eq!(status, 400, "Content-Length: {length}: {body}");
        assert!(body.contains("Content-Length"), "{body}");
    }
}
