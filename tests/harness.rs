//! Proves the test helpers catch what they claim to, against a real server: `expect_silence`
//! fails when the server closes the session during the window (the old helper took a close, a
//! ping or a read error for silence), and a server ping inside the window neither fails it nor
//! ends it early, so a message that follows the ping is still caught.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use common::TestServer;

/// Runs `f`, expecting it to panic; returns the panic message.
fn panic_of(f: impl FnOnce()) -> String {
    let err = catch_unwind(AssertUnwindSafe(f)).expect_err("the helper should have failed");
    err.downcast_ref::<String>()
        .cloned()
        .or_else(|| err.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

#[test]
fn silence_fails_when_the_session_is_closed_during_it() {
    let server = TestServer::start(2);
    let mut kim = server.connect("kim");
    let (code, body) =
        server.admin_request("POST", "/api/users/kim/kick", Some(&server.admin_token()));
    assert_eq!(code, 200, "{body}");
    // The kick's 4003 is the opposite of silence; the old helper let it pass.
    let msg = panic_of(|| kim.expect_silence(Duration::from_secs(5)));
    assert!(msg.contains("Close"), "{msg}");
}

#[test]
fn a_server_ping_is_skipped_but_does_not_end_the_window() {
    // Pings every 100 ms: many arrive during the window before bob's event does.
    let server = TestServer::with(2, |c| c.heartbeat_ms = 100);
    let mut watcher = server.connect("watcher");
    watcher.subscribe(&["bob"]);
    // Only pings: silence holds, and the connection is still fine after it (the pongs went out).
    watcher.expect_silence(Duration::from_millis(600));
    assert_eq!(
        watcher.request(serde_json::json!({"op":"ping"}))["type"],
        "pong"
    );
    // Bob comes online a second into a five-second window, after several pings.
    let addr = server.addr;
    let token = server.token("bob");
    let bob = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(1));
        common::Client::connect(addr, &token)
    });
    let msg = panic_of(|| watcher.expect_silence(Duration::from_secs(5)));
    assert!(msg.contains("presence") && msg.contains("bob"), "{msg}");
    drop(bob.join().unwrap());
}
