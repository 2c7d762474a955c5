//! Proves group presence over real sockets: a group subscriber gets a snapshot of the visible
//! members, then join/leave/status events tagged with the group, across shards.

mod common;

use common::TestServer;
use serde_json::{json, Value};

fn group_event(c: &mut common::Client, user: &str) -> Value {
    c.recv_until(&format!("group event for {user}"), |v| {
        v["type"] == "presence" && v["user"] == user && v["group"] == "team"
    })
}

#[test]
fn snapshot_then_member_events() {
    let server = TestServer::start(2);
    let _m1 = server.connect_token(&server.token_in_groups("member1", &["team", "other"]));
    let mut m2 = server.connect_token(&server.token_in_groups("member2", &["team"]));
    let _outsider = server.connect_token(&server.token_in_groups("outsider", &["other"]));
    let mut hidden = server.connect_token(&server.token_in_groups("ghost", &["team"]));
    hidden.set_status("invisible", None);

    let mut w = server.connect("group-watcher");
    let ack = w.request(json!({"op":"subscribe_group","group":"team"}));
    assert_eq!(ack["type"], "ack");
    let snap = w.recv_until("group snapshot", |v| v["type"] == "group_snapshot");
    assert_eq!(snap["group"], "team");
    let members: Vec<&str> = snap["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["user"].as_str().unwrap())
        .collect();
    assert_eq!(
        members,
        vec!["member1", "member2"],
        "visible members only, sorted"
    );
    assert!(snap["members"]
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["group"] == "team" && m["status"] == "online"));

    // Status change of a member.
    m2.set_status("busy", Some("focus"));
    let ev = group_event(&mut w, "member2");
    assert_eq!(
        (ev["status"].as_str(), ev["text"].as_str()),
        (Some("busy"), Some("focus"))
    );

    // A member joins (new session carrying the group) ...
    let joiner = server.connect_token(&server.token_in_groups("member3", &["team"]));
    assert_eq!(group_event(&mut w, "member3")["status"], "online");
    // ... and leaves.
    joiner.close();
    let ev = group_event(&mut w, "member3");
    assert_eq!(
        (ev["status"].as_str(), ev["devices"].as_u64()),
        (Some("offline"), Some(0))
    );

    // Becoming visible joins the group feed; invisible leaves it.
    hidden.set_status("away", None);
    assert_eq!(group_event(&mut w, "ghost")["status"], "away");

    // Leaving the group while staying online elsewhere: the feed says offline.
    let _elsewhere = server.connect("ghost"); // a session without the group
    let ev = group_event(&mut w, "ghost");
    assert_eq!(ev["devices"], 2, "still a member, now with two devices");
    hidden.set_status("invisible", None);
    let ev = group_event(&mut w, "ghost");
    assert_eq!(
        (ev["status"].as_str(), ev["devices"].as_u64()),
        (Some("offline"), Some(0))
    );

    // After unsubscribing, nothing more from the group.
    assert_eq!(
        w.request(json!({"op":"unsubscribe_group","group":"team"}))["type"],
        "ack"
    );
    m2.set_status("online", None);
    w.expect_silence(std::time::Duration::from_millis(300));
}

#[test]
fn subscription_limit_counts_users_and_groups() {
    let server = TestServer::with(2, |c| {
        c.limits.max_subscriptions = 3;
        // The limit, not the id budget (whose burst is max_subscriptions) is what is tested.
        c.limits.subscriptions_per_second = 0;
    });
    let mut c = server.connect("limited");
    assert_eq!(
        c.request(json!({"op":"subscribe","users":["a","b"]}))["type"],
        "ack"
    );
    assert_eq!(
        c.request(json!({"op":"subscribe_group","group":"g"}))["type"],
        "ack"
    );
    let e = c.request(json!({"op":"subscribe","users":["c"]}));
    assert_eq!(e["code"], "too_many_subscriptions");
    // Re-subscribing to what is held is not new and is fine.
    assert_eq!(
        c.request(json!({"op":"subscribe","users":["a"]}))["type"],
        "ack"
    );
    let e = c.request(json!({"op":"subscribe_group","group":"h"}));
    assert_eq!(e["code"], "too_many_subscriptions");
    assert_eq!(
        c.request(json!({"op":"unsubscribe","users":["a"]}))["type"],
        "ack"
    );
    assert_eq!(
        c.request(json!({"op":"subscribe","users":["c"]}))["type"],
        "ack"
    );
}
