//! Proves that bad input gets the documented error reply, keeps the session working and leaves
//! other sessions untouched: invalid JSON, unknown ops, wrong field types, binary frames,
//! oversized messages (soft limit → `too_large`; hard limit → close 1009), bad close codes.

mod common;

use common::TestServer;
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
