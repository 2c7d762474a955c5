//! Proves a panic while handling one connection's input closes only that connection (1011), is
//! counted, and leaves no half-applied state behind; the shard keeps serving everyone else,
//! including users on the same shard.
//! The trigger (`activity` with kind `__panic`) exists only under the `fault-injection` feature,
//! which the test command enables and release builds never do.
#![cfg(feature = "fault-injection")]

mod common;

use common::{user_on, TestServer};
use serde_json::json;

#[test]
fn a_panicking_connection_is_closed_and_the_shard_goes_on() {
    let server = TestServer::start(2);
    let victim = user_on(0, 2, "victim");
    let neighbour = user_on(0, 2, "neighbour");
    let mut w = server.connect("panic-watcher");
    w.subscribe(&[&neighbour]);
    let mut n = server.connect(&neighbour);
    assert_eq!(w.presence_of(&neighbour)["status"], "online");
    let mut v = server.connect(&victim);
    assert_eq!(v.shard(), n.shard(), "same shard");

    v.send(json!({"op":"activity","kind":"__panic"}));
    assert_eq!(v.close_code(), 1011);
    assert_eq!(server.handle().metrics_total().conn_panics, 1);

    n.set_status("busy", None);
    assert_eq!(w.presence_of(&neighbour)["status"], "busy");
    let again = server.connect(&victim);
    assert_eq!(again.shard(), n.shard());
}

/// A panic half-way through a fan-out (after the first watching shard was told, before the
/// second) is repaired. The session whose op panicked is closed (1011) and its user's state is
/// rebuilt and published with a new `seq` to every watcher. Before, the other shard's watcher
/// stayed at the old state for good when the closed session had been invisible (closing it
/// changed nothing, so nothing was published).
#[test]
fn a_panic_half_way_through_a_fan_out_is_repaired() {
    let s = TestServer::with(2, |c| {
        c.history.backend = presenced::config::HistoryBackend::Off
    });
    let user = user_on(0, 2, "multi");
    let mut w0 = s.connect(&user_on(0, 2, "w0-"));
    let mut w1 = s.connect(&user_on(1, 2, "w1-"));
    let mut phone = s.connect(&user);
    let mut laptop = s.connect(&user);
    w0.subscribe(&[&user]);
    w1.subscribe(&[&user]);
    phone.set_status("online", Some("phone"));
    for w in [&mut w0, &mut w1] {
        w.recv_until("both devices", |v| {
            v["user"] == user.as_str() && v["text"] == "phone" && v["devices"] == 2
        });
    }
    // The laptop goes invisible (2 devices -> 1) and the fan-out of that change panics after
    // its first send.
    laptop.send(json!({"op":"set_status","status":"invisible","text":"__panic_in_publish"}));
    assert_eq!(laptop.close_code(), 1011);
    assert_eq!(s.handle().metrics_total().conn_panics, 1);
    // Both watchers end with one device, whichever of them the panic cut off.
    for w in [&mut w0, &mut w1] {
        w.recv_until("the repaired state", |v| {
            v["user"] == user.as_str() && v["devices"] == 1 && v["text"] == "phone"
        });
    }
    let detail = s.admin_get(&format!("/api/users/{user}"));
    assert_eq!(detail["sessions"].as_array().unwrap().len(), 1);
    assert_eq!(detail["devices"], 1);
    assert_eq!(s.admin_get("/api/stats")["totals"]["sessions"], 3);
    // The shard goes on.
    phone.set_status("busy", None);
    w1.recv_until("a later change", |v| {
        v["user"] == user.as_str() && v["status"] == "busy"
    });
}

/// A panic while a session is being opened (after the shard knows it, before its user is
/// registered) is repaired too: the upgrade gets 503 and no session is left behind to count
/// against the user's device limit or to stay online for good.
#[test]
fn a_panic_while_opening_a_session_leaves_nothing_behind() {
    let s = TestServer::with(2, |c| {
        c.limits.max_sessions_per_user = 1;
        c.limits.session_policy = presenced::config::SessionPolicy::RejectNew;
    });
    let token = s.token_with("ghost", |t| t.device = Some("__panic_in_open".into()));
    let (code, _) = s.status_for(&token);
    assert_eq!(code, 503);
    assert_eq!(s.handle().metrics_total().conn_panics, 1);
    assert_eq!(s.handle().metrics_total().connections, 0);
    let (code, body) = s.admin_request("GET", "/api/users/ghost", Some(&s.admin_token()));
    assert_eq!(code, 404, "no session, no entry left: {body}");
    // The device limit (1) is free: a normal session opens.
    let c = s.connect("ghost");
    assert_eq!(c.welcome["user"], "ghost");
}
