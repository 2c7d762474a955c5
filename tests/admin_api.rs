//! The admin API's answers over real HTTP: stats, a user's sessions, the online list with its
//! filters and pagination under churn, groups, kicks, and read-only impersonation.

mod common;

use std::collections::BTreeSet;
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

#[test]
fn stats_count_connections_per_shard() {
    let s = admin_server(2);
    let a = s.connect(&user_on(0, 2, "a"));
    let b = s.connect(&user_on(1, 2, "b"));
    let stats = eventually("stats with two users", || {
        let st = s.admin_get("/api/stats");
        (st["totals"]["online_users"] == 2).then_some(st)
    });
    assert_eq!(stats["shards"], 2);
    assert_eq!(stats["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(stats["totals"]["connections"], 2);
    assert_eq!(stats["totals"]["sessions"], 2);
    let per: Vec<&Value> = stats["per_shard"].as_array().unwrap().iter().collect();
    assert_eq!(per.len(), 2);
    for (i, row) in per.iter().enumerate() {
        assert_eq!(row["shard"], i);
        assert_eq!(row["users"], 1, "{row}");
        assert_eq!(row["connections"], 1, "{row}");
        assert!(row["cpu"].is_null(), "unpinned");
    }
    for k in ["p50", "p90", "p99", "p999", "max", "count"] {
        assert!(stats["latency_us"][k].is_u64(), "latency_us.{k}");
    }
    assert!(stats["uptime_s"].is_u64() && stats["started_ms"].as_u64().unwrap() > 0);
    drop((a, b));
}

#[test]
fn a_user_shows_presence_and_every_session() {
    let s = admin_server(2);
    let token = s.token_with("alice", |t| {
        t.groups = vec!["team".into()];
        t.roles = vec!["dev".into()];
        t.device = Some("phone".into());
        t.device_type = Some("ios".into());
        t.region = Some("eu-west".into());
    });
    let mut phone = s.connect_token(&token);
    let mut laptop = s.connect("alice");
    phone.set_status("busy", Some("in a call"));
    laptop.set_status("away", None); // aggregate: busy beats away
    let u = eventually("alice busy with two devices", || {
        let u = s.admin_get("/api/users/alice");
        (u["status"] == "busy" && u["devices"] == 2).then_some(u)
    });
    assert_eq!(u["user"], "alice");
    assert_eq!(u["text"], "in a call");
    assert_eq!(u["observers"], 0);
    assert!(u["last_seen"].is_null());
    let sessions = u["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 2);
    let p = sessions
        .iter()
        .find(|x| x["id"] == phone.welcome["session"])
        .expect("the phone's session id is welcome.session");
    assert_eq!(p["device"], "phone");
    assert_eq!(p["device_type"], "ios");
    assert_eq!(p["region"], "eu-west");
    assert_eq!(p["ip"], "127.0.0.1");
    assert_eq!(p["status"], "busy");
    assert_eq!(p["groups"], json!(["team"]));
    assert_eq!(p["roles"], json!(["dev"]));
    assert_eq!(p["shard"], phone.shard());
    assert!(p["connected_at"].as_u64().unwrap() > 1_600_000_000_000);
    let l = sessions
        .iter()
        .find(|x| x["id"] == laptop.welcome["session"])
        .unwrap();
    assert_eq!(
        (&l["device_type"], &l["status"]),
        (&json!("other"), &json!("away"))
    );

    // Gone offline: still known, with last_seen.
    phone.ws.close(None).unwrap();
    laptop.ws.close(None).unwrap();
    let u = eventually("alice offline", || {
        let u = s.admin_get("/api/users/alice");
        (u["status"] == "offline").then_some(u)
    });
    assert!(u["last_seen"].as_u64().is_some());
    assert_eq!(u["sessions"], json!([]));

    let (code, body) = s.admin_request("GET", "/api/users/nobody", Some(ADMIN_STATIC_TOKEN));
    assert_eq!((code, &body["error"]), (404, &json!("not_found")));
    // Ids are percent-decoded path segments.
    let _weird = s.connect("we ird/id");
    let u = s.admin_get("/api/users/we%20ird%2Fid");
    assert_eq!(u["user"], "we ird/id");
}

fn online_users(s: &TestServer, query: &str) -> Vec<String> {
    let body = s.admin_get(&format!("/api/online?{query}"));
    body["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["user"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn online_filters_combine_and_bad_parameters_are_400() {
    let s = admin_server(2);
    let with = |sub: &str, groups: &[&str], roles: &[&str], region: &str, dt: &str| {
        s.connect_token(&s.token_with(sub, |t| {
            t.groups = groups.iter().map(|g| g.to_string()).collect();
            t.roles = roles.iter().map(|g| g.to_string()).collect();
            t.region = Some(region.into());
            t.device_type = Some(dt.into());
        }))
    };
    let _a = with("ann", &["team"], &["dev"], "eu", "web");
    let mut b = with("ben", &["team"], &[], "us", "ios");
    let _c = with("cat", &["ops"], &["dev"], "us", "android");
    let mut d = with("dan", &["team"], &[], "eu", "desktop");
    b.set_status("away", None);
    d.set_status("invisible", None);
    eventually("three online", || {
        (online_users(&s, "") == ["ann", "ben", "cat"]).then_some(())
    });
    assert_eq!(online_users(&s, "group=team"), ["ann", "ben"]);
    assert_eq!(online_users(&s, "role=dev"), ["ann", "cat"]);
    assert_eq!(online_users(&s, "region=us"), ["ben", "cat"]);
    assert_eq!(online_users(&s, "device_type=ios"), ["ben"]);
    assert_eq!(online_users(&s, "status=away"), ["ben"]);
    assert_eq!(online_users(&s, "group=team&region=eu"), ["ann"]);
    assert_eq!(
        online_users(&s, "group=team&status=online&role=dev"),
        ["ann"]
    );
    assert!(online_users(&s, "group=ops&region=eu").is_empty());
    assert_eq!(
        online_users(&s, "q=A"),
        ["ann", "cat", "dan"]
            .into_iter()
            .filter(|u| *u != "dan")
            .collect::<Vec<_>>()
    );
    let body = s.admin_get("/api/online?group=team");
    assert_eq!(body["total"], 2);
    assert!(body["next_cursor"].is_null());
    let ann = &body["users"][0];
    assert_eq!(ann["device_types"], json!(["web"]));
    assert_eq!(ann["regions"], json!(["eu"]));
    assert_eq!(ann["groups"], json!(["team"]));

    for (q, needle) in [
        ("limit=0", "limit"),
        ("limit=abc", "limit"),
        ("limit=%2B5", "limit"),
        ("limit=%205", "limit"),
        ("limit=100000", "limit"),
        ("status=sleeping", "status"),
        ("status=offline", "status"),
        ("device_type=toaster", "device_type"),
        ("cursor=%21%21", "cursor"),
        ("colour=red", "colour"),
        ("group=", "group"),
        ("group=a&group=b", "group"),
    ] {
        let (code, body) =
            s.admin_request("GET", &format!("/api/online?{q}"), Some(ADMIN_STATIC_TOKEN));
        assert_eq!(code, 400, "{q}: {body}");
        assert_eq!(body["error"], "bad_request");
        let msg = body["message"].as_str().unwrap();
        assert!(
            msg.contains(needle),
            "{q}: message {msg:?} names the parameter"
        );
    }
}

#[test]
fn pagination_visits_every_user_online_throughout_exactly_once() {
    let s = admin_server(2);
    let stable: Vec<Client> = (0..40).map(|i| s.connect(&format!("s{i:02}"))).collect();
    eventually("40 online", || {
        (s.admin_get("/api/online?limit=1")["total"] == 40).then_some(())
    });
    let mut churn: Vec<Client> = Vec::new();
    let mut seen: Vec<String> = Vec::new();
    let mut cursor: Option<String> = None;
    let mut page = 0;
    loop {
        // Users come and go between pages, with ids sorting before, between and after.
        for k in 0..3 {
            let id = format!("{}{page}-{k}", ["a", "s1", "z"][k % 3]);
            churn.push(s.connect(&id));
        }
        if page % 2 == 1 {
            churn.drain(..2);
        }
        let path = match &cursor {
            None => "/api/online?limit=7".to_owned(),
            Some(c) => format!("/api/online?limit=7&cursor={c}"),
        };
        let body = s.admin_get(&path);
        let users = body["users"].as_array().unwrap();
        assert!(users.len() <= 7);
        seen.extend(users.iter().map(|u| u["user"].as_str().unwrap().to_owned()));
        page += 1;
        assert!(page < 100, "the walk ends");
        match body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    let unique: BTreeSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "nobody twice: {seen:?}");
    for i in 0..40 {
        let id = format!("s{i:02}");
        assert!(
            unique.contains(&id),
            "{id} online throughout but not listed"
        );
    }
    let sorted: Vec<&String> = {
        let mut v: Vec<&String> = seen.iter().collect();
        v.sort();
        v
    };
    assert_eq!(
        sorted,
        seen.iter().collect::<Vec<_>>(),
        "pages come in id order"
    );
    drop(stable);
}

#[test]
fn a_group_lists_its_visible_members_with_counts() {
    let s = admin_server(2);
    let mut a = s.connect_token(&s.token_in_groups("amy", &["crew"]));
    let _b = s.connect_token(&s.token_in_groups("bo", &["crew"]));
    let mut c = s.connect_token(&s.token_in_groups("cy", &["crew"]));
    a.set_status("busy", None);
    c.set_status("invisible", None);
    let g = eventually("crew members", || {
        let g = s.admin_get("/api/groups/crew");
        (g["total"] == 2 && g["counts"]["busy"] == 1).then_some(g)
    });
    assert_eq!(g["group"], "crew");
    assert_eq!(g["counts"], json!({"online": 1, "away": 0, "busy": 1}));
    let members: Vec<&str> = g["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["user"].as_str().unwrap())
        .collect();
    assert_eq!(members, ["amy", "bo"]);
    let page = s.admin_get("/api/groups/crew?limit=1");
    assert_eq!(page["members"].as_array().unwrap().len(), 1);
    let next = page["next_cursor"].as_str().expect("a second page");
    let rest = s.admin_get(&format!("/api/groups/crew?limit=1&cursor={next}"));
    assert_eq!(rest["members"][0]["user"], "bo");
    assert!(rest["next_cursor"].is_null());
    let (code, _) = s.admin_request("GET", "/api/groups/nobody-here", Some(ADMIN_STATIC_TOKEN));
    assert_eq!(code, 404);
    let (code, _) = s.admin_request("GET", "/api/groups/crew?limit=-1", Some(ADMIN_STATIC_TOKEN));
    assert_eq!(code, 400);
}

#[test]
fn kicks_close_with_4003_and_are_404_when_nobody_is_there() {
    let s = admin_server(2);
    let mut watcher = s.connect("watcher");
    watcher.subscribe(&["kim"]);
    let mut k1 = s.connect("kim");
    let mut k2 = s.connect("kim");
    let mut lee = s.connect("lee");
    watcher.presence_of("kim");

    let (code, body) = s.admin_request("POST", "/api/users/kim/kick", Some(&s.admin_token()));
    assert_eq!(code, 200, "{body}");
    assert_eq!(body, json!({"user": "kim", "kicked": 2}));
    assert_eq!(k1.close_code(), 4003);
    assert_eq!(k2.close_code(), 4003);
    let off = watcher.recv_until("kim offline", |v| {
        v["type"] == "presence" && v["user"] == "kim" && v["status"] == "offline"
    });
    assert_eq!(off["devices"], 0);

    let session = lee.welcome["session"].as_str().unwrap().to_owned();
    let path = format!("/api/sessions/{session}/kick");
    let (code, body) = s.admin_request("POST", &path, Some(ADMIN_STATIC_TOKEN));
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        body,
        json!({"session": session, "user": "lee", "kicked": 1})
    );
    assert_eq!(lee.close_code(), 4003);

    assert_eq!(
        s.admin_request("POST", &path, Some(ADMIN_STATIC_TOKEN)).0,
        404,
        "already gone"
    );
    assert_eq!(
        s.admin_request("POST", "/api/users/kim/kick", Some(ADMIN_STATIC_TOKEN))
            .0,
        404
    );
    assert_eq!(
        s.admin_request("POST", "/api/sessions/%2B1/kick", Some(ADMIN_STATIC_TOKEN))
            .0,
        400,
        "a sign is not part of a session id"
    );
    assert_eq!(
        s.admin_request("POST", "/api/sessions/zz/kick", Some(ADMIN_STATIC_TOKEN))
            .0,
        400
    );
    assert_eq!(
        s.admin_request(
            "POST",
            "/api/sessions/ffff000000000001/kick",
            Some(ADMIN_STATIC_TOKEN)
        )
        .0,
        404
    );
    assert_eq!(
        s.admin_request("GET", "/api/users/kim/kick", Some(ADMIN_STATIC_TOKEN))
            .0,
        405
    );
    assert_eq!(
        s.admin_request("POST", "/api/users/kim/kick", Some(&s.token("kim")))
            .0,
        403
    );
    assert_eq!(s.admin_request("POST", "/api/users/kim/kick", None).0, 401);
    let kicked: u64 = s.handle().metrics().iter().map(|m| m.kicks).sum();
    assert_eq!(kicked, 3);
}

#[test]
fn impersonation_is_a_read_only_view_of_the_user() {
    let s = admin_server(2);
    let mut bob = s.connect("bob");
    let mut watcher = s.connect("watcher");
    assert_eq!(watcher.subscribe(&["bob"])[0]["devices"], 1);
    let mut carol = s.connect("carol");

    let mut view = Client::connect_path(
        TcpStream::connect(s.addr).unwrap(),
        "/ws?as=bob",
        &s.admin_token(),
    );
    assert_eq!(view.welcome["user"], "bob");
    assert_eq!(view.welcome["read_only"], true);
    assert_eq!(view.welcome["admin"], "ops");
    assert_eq!(view.shard(), bob.shard(), "served where bob lives");
    // Not a device: bob's watcher hears nothing, bob still has one device.
    watcher.expect_silence(Duration::from_millis(300));
    let u = s.admin_get("/api/users/bob");
    assert_eq!(
        (u["devices"].as_u64(), u["observers"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(u["sessions"].as_array().unwrap().len(), 1);

    // It subscribes as the admin asks, and sees what is sent to bob directly.
    assert_eq!(view.subscribe(&["carol"])[0]["status"], "online");
    carol.set_status("away", None);
    assert_eq!(view.presence_of("carol")["status"], "away");
    let ack = carol.request(json!({"op":"activity","kind":"wave","to":"bob"}));
    assert_eq!(ack["type"], "ack");
    let seen = view.recv_until("activity to bob", |v| v["type"] == "activity");
    assert_eq!(
        (&seen["user"], &seen["kind"]),
        (&json!("carol"), &json!("wave"))
    );
    assert_eq!(
        bob.recv_until("bob's own copy", |v| v["type"] == "activity")["kind"],
        "wave"
    );

    // Read-only: nothing that would change anyone's state.
    for op in [
        json!({"op":"set_status","status":"busy"}),
        json!({"op":"activity","kind":"typing"}),
        json!({"op":"refresh","token": s.token("bob")}),
    ] {
        let reply = view.request(op.clone());
        assert_eq!(
            (&reply["type"], &reply["code"]),
            (&json!("error"), &json!("forbidden")),
            "{op}"
        );
    }
    watcher.expect_silence(Duration::from_millis(200));

    // Static admin token works too; a non-admin token is refused.
    let (code, _) = s.raw_upgrade(
        "/ws?as=bob",
        &format!("Authorization: Bearer {}\r\n", s.token("eve")),
    );
    assert_eq!(code, 403);
    let (code, _) = s.raw_upgrade("/ws?as=bob", "Authorization: Bearer junk\r\n");
    assert_eq!(code, 401);
    let st = Client::connect_path(
        TcpStream::connect(s.addr).unwrap(),
        "/ws?as=bob",
        ADMIN_STATIC_TOKEN,
    );
    assert_eq!(st.welcome["admin"], "static-token");

    // Kicking bob closes the observers too; the view's end changes nobody's presence.
    let (code, body) = s.admin_request("POST", "/api/users/bob/kick", Some(ADMIN_STATIC_TOKEN));
    assert_eq!((code, &body["kicked"]), (200, &json!(3)));
    assert_eq!(view.close_code(), 4003);
    assert_eq!(bob.close_code(), 4003);
}
