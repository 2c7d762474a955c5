//! The reconnect grace (`offline_grace_ms`, issue 13, docs/OPERATIONS.md): a user whose last
//! session drops and comes back within the grace never goes offline for its watchers; past the
//! grace it does, stamped with the real end; a kick or an expired token bypasses it.

mod common;

use std::time::{Duration, Instant};

use common::*;

const GRACE_MS: u64 = 1_500;

fn server() -> TestServer {
    TestServer::with(2, |c| {
        c.offline_grace_ms = GRACE_MS;
        // The test clients answer no pings: a long heartbeat keeps them connected. (The clock
        // ticks every heartbeat/32, so a grace ends at most ~1 s late.)
        c.heartbeat_ms = 30_000;
    })
}

#[test]
fn a_drop_and_reconnect_within_the_grace_is_not_seen() {
    let s = server();
    let mut watcher = s.connect("w");
    let mut alice = s.connect("alice");
    assert_eq!(watcher.subscribe(&["alice"])[0]["status"], "online");
    alice.set_status("away", Some("lunch"));
    let before = watcher.presence_of("alice");
    // The connection drops (no close frame), and comes back at once.
    drop(alice);
    std::thread::sleep(Duration::from_millis(200));
    let alice = s.connect("alice");
    assert_eq!(
        alice.welcome["resumed"],
        serde_json::json!({"status": "away", "text": "lunch"}),
        "the welcome says what the session goes on with"
    );
    // Nothing at all for the watcher: same status, text, devices; not even a seq.
    watcher.expect_silence(Duration::from_millis(GRACE_MS + 500));
    let now = s.admin_get("/api/users/alice");
    assert_eq!(
        now["status"], "away",
        "the re-attached session kept its status: {now}"
    );
    assert_eq!(now["text"], "lunch");
    assert_eq!(now["seq"], before["seq"], "no change at all");
    let m = metrics_text(s.admin, Some(&s.admin_token()));
    assert!(metric_sum(&m, "presenced_reattached_total").unwrap() >= 1.0);
}

#[test]
fn past_the_grace_the_user_goes_offline_with_the_real_end_time() {
    let s = server();
    let mut watcher = s.connect("w");
    let alice = s.connect("alice");
    watcher.subscribe(&["alice"]);
    let ended = presenced::shard::now_ms();
    alice.close();
    let started = Instant::now();
    let off = watcher.presence_of("alice");
    let waited = started.elapsed();
    assert_eq!(off["status"], "offline");
    assert!(
        waited >= Duration::from_millis(GRACE_MS - 100),
        "held for the grace ({waited:?})"
    );
    let last_seen = off["last_seen"].as_u64().unwrap();
    assert!(
        last_seen.abs_diff(ended) < 500,
        "last_seen is when the session ended ({last_seen} vs {ended})"
    );
    let m = metrics_text(s.admin, Some(&s.admin_token()));
    assert!(metric_sum(&m, "presenced_grace_expired_total").unwrap() >= 1.0);
}

#[test]
fn a_second_device_still_online_means_no_hold_and_a_kick_bypasses_it() {
    let s = server();
    let mut watcher = s.connect("w");
    let phone = s.connect("kim");
    let _laptop = s.connect("kim");
    assert_eq!(watcher.subscribe(&["kim"])[0]["devices"], 2);
    // Not the last visible session: its end is seen at once, as a devices change.
    phone.close();
    assert_eq!(watcher.presence_of("kim")["devices"], 1);
    // A kick is never held: offline at once.
    let started = Instant::now();
    let (code, _) = s.admin_request("POST", "/api/users/kim/kick", Some(&s.admin_token()));
    assert_eq!(code, 200);
    let off = watcher.presence_of("kim");
    assert_eq!(off["status"], "offline");
    assert!(
        started.elapsed() < Duration::from_millis(GRACE_MS - 200),
        "a kick bypasses the grace ({:?})",
        started.elapsed()
    );
}

#[test]
fn an_expired_token_bypasses_the_grace() {
    let s = server();
    let mut watcher = s.connect("w");
    watcher.subscribe(&["eve"]);
    let short = s.token_with("eve", |t| t.ttl = Duration::from_secs(1));
    let mut eve = s.connect_token(&short);
    assert_eq!(watcher.presence_of("eve")["status"], "online");
    assert_eq!(eve.close_code(), 4001);
    let started = Instant::now();
    assert_eq!(watcher.presence_of("eve")["status"], "offline");
    assert!(
        started.elapsed() < Duration::from_millis(GRACE_MS - 200),
        "expiry bypasses the grace ({:?})",
        started.elapsed()
    );
}
