//! The admin port over real HTTP and real WebSockets: auth, every endpoint, bad parameters,
//! pagination under churn, kicks, impersonation, and the HTTP server's own limits.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const STATIC: &str = "static-admin-token-0123456789";

fn server(shards: usize) -> TestServer {
    TestServer::with(shards, |c| {
        c.limits.handshake_rate_per_ip = 0;
        c.limits.ops_per_second = 0;
        c.admin.token = Some(STATIC.into());
    })
}

/// Polls `f` until it returns `Some`, failing after [`WAIT`] with `what`.
#[test]
fn health_is_open_and_the_api_needs_an_admin() {
    let s = server(2);
    let (code, body) = s.admin_request("GET", "/healthz", None);
    assert_eq!((code, body), (200, json!({"ok": true})));
    let (code, body) = s.admin_request("GET", "/readyz", None);
    assert_eq!(code, 200);
    assert_eq!(body, json!({"ready": true, "shards": 2, "accepting": 2}));

    let (code, body) = s.admin_request("GET", "/api/stats", None);
    assert_eq!(code, 401);
    assert_eq!(body["error"], "unauthorized");
    assert!(body["message"].as_str().unwrap().contains("missing"));
    let (code, body) = s.admin_request("GET", "/api/stats", Some("not-a-token"));
    assert_eq!((code, &body["error"]), (401, &json!("unauthorized")));
    let (code, body) = s.admin_request("GET", "/api/stats", Some(&s.token("mallory")));
    assert_eq!((code, &body["error"]), (403, &json!("forbidden")));
    let wrong_key = presenced::auth::mint_hs256(
        "another-secret-0123456789abcdef",
        &presenced::auth::TokenSpec {
            roles: vec!["admin".into()],
            ..presenced::auth::TokenSpec::new("ops", Duration::from_secs(60))
        },
    );
    assert_eq!(
        s.admin_request("GET", "/api/stats", Some(&wrong_key)).0,
        401
    );
    assert_eq!(s.admin_request("GET", "/api/stats", Some(STATIC)).0, 200);
    assert_eq!(
        s.admin_request("GET", "/api/stats", Some(&s.admin_token()))
            .0,
        200
    );

    let (code, body) = s.admin_request("GET", "/nope", None);
    assert_eq!((code, &body["error"]), (404, &json!("not_found")));
    let (code, body) = s.admin_request("POST", "/api/stats", Some(STATIC));
    assert_eq!((code, &body["error"]), (405, &json!("method_not_allowed")));
    let (code, body) = s.admin_request("GET", "/api/stats?x=1", Some(STATIC));
    assert_eq!(code, 400, "{body}");
}

#[test]
fn metrics_and_health_can_be_protected() {
    let s = TestServer::with(1, |c| c.admin.protect_metrics = true);
    assert_eq!(s.admin_request("GET", "/metrics", None).0, 401);
    assert_eq!(s.admin_request("GET", "/readyz", None).0, 401);
    assert_eq!(
        s.admin_request("GET", "/metrics", Some(&s.token("x"))).0,
        403
    );
    assert_eq!(
        s.admin_request("GET", "/metrics", Some(&s.admin_token())).0,
        200
    );
}

#[test]
fn stats_count_connections_per_shard() {
    let s = server(2);
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
    let s = server(2);
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

    let (code, body) = s.admin_request("GET", "/api/users/nobody", Some(STATIC));
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
    let s = server(2);
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
        let (code, body) = s.admin_request("GET", &format!("/api/online?{q}"), Some(STATIC));
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
    let s = server(2);
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
    let s = server(2);
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
    let (code, _) = s.admin_request("GET", "/api/groups/nobody-here", Some(STATIC));
    assert_eq!(code, 404);
    let (code, _) = s.admin_request("GET", "/api/groups/crew?limit=-1", Some(STATIC));
    assert_eq!(code, 400);
}

#[test]
fn kicks_close_with_4003_and_are_404_when_nobody_is_there() {
    let s = server(2);
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
    let (code, body) = s.admin_request("POST", &path, Some(STATIC));
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        body,
        json!({"session": session, "user": "lee", "kicked": 1})
    );
    assert_eq!(lee.close_code(), 4003);

    assert_eq!(
        s.admin_request("POST", &path, Some(STATIC)).0,
        404,
        "already gone"
    );
    assert_eq!(
        s.admin_request("POST", "/api/users/kim/kick", Some(STATIC))
            .0,
        404
    );
    assert_eq!(
        s.admin_request("POST", "/api/sessions/%2B1/kick", Some(STATIC))
            .0,
        400,
        "a sign is not part of a session id"
    );
    assert_eq!(
        s.admin_request("POST", "/api/sessions/zz/kick", Some(STATIC))
            .0,
        400
    );
    assert_eq!(
        s.admin_request("POST", "/api/sessions/ffff000000000001/kick", Some(STATIC))
            .0,
        404
    );
    assert_eq!(
        s.admin_request("GET", "/api/users/kim/kick", Some(STATIC))
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
    let s = server(2);
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
    let st = Client::connect_path(TcpStream::connect(s.addr).unwrap(), "/ws?as=bob", STATIC);
    assert_eq!(st.welcome["admin"], "static-token");

    // Kicking bob closes the observers too; the view's end changes nobody's presence.
    let (code, body) = s.admin_request("POST", "/api/users/bob/kick", Some(STATIC));
    assert_eq!((code, &body["kicked"]), (200, &json!(3)));
    assert_eq!(view.close_code(), 4003);
    assert_eq!(bob.close_code(), 4003);
}

#[test]
fn metrics_parse_with_the_prometheus_parser_and_move_with_traffic() {
    let s = server(2);
    let before = scrape(&s);
    let mut a = s.connect(&user_on(0, 2, "pa"));
    let b_id = user_on(1, 2, "pb");
    a.subscribe(&[&b_id]);
    let mut b = s.connect(&b_id);
    a.presence_of(&b_id);
    b.set_status("busy", None);
    a.presence_of(&b_id);
    let after = eventually("deliveries counted", || {
        let m = scrape(&s);
        (sum(&m, "presenced_deliveries_total", &[]) >= 3.0).then_some(m)
    });
    let moved = |name: &str, labels: &[(&str, &str)]| {
        sum(&after, name, labels) - sum(&before, name, labels)
    };
    assert_eq!(
        moved("presenced_handshakes_total", &[("result", "ok")]),
        2.0
    );
    assert_eq!(moved("presenced_ops_total", &[("op", "subscribe")]), 1.0);
    assert_eq!(moved("presenced_ops_total", &[("op", "set_status")]), 1.0);
    assert_eq!(sum(&after, "presenced_connections", &[]), 2.0);
    assert_eq!(sum(&after, "presenced_connections", &[("shard", "0")]), 1.0);
    assert_eq!(sum(&after, "presenced_online_users", &[]), 2.0);
    assert!(
        moved(
            "presenced_mesh_messages_total",
            &[("from", "0"), ("to", "1")]
        ) >= 1.0
    );
    // Latency is a real Prometheus histogram: cumulative buckets ending in +Inf = _count.
    let count = sum(&after, "presenced_fanout_latency_seconds_count", &[]);
    assert!(count >= 2.0);
    assert_eq!(
        sum(
            &after,
            "presenced_fanout_latency_seconds_bucket",
            &[("le", "+Inf")]
        ),
        count
    );
    assert_eq!(
        sum(
            &after,
            "presenced_fanout_latency_seconds_bucket",
            &[("le", "10")]
        ),
        count,
        "every delivery took under 10 s"
    );
    assert!(sum(&after, "presenced_handshake_seconds_count", &[]) >= 2.0);
    assert_eq!(
        sum(
            &after,
            "presenced_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    // Bad tokens show up by result.
    let _ = s.status_for("junk");
    let m = scrape(&s);
    assert_eq!(
        sum(
            &m,
            "presenced_handshakes_total",
            &[("result", "unauthorized")]
        ),
        1.0
    );
}

/// `[(name, labels, value)]` as parsed by the Python `prometheus_client` text parser.
type Samples = Vec<(String, serde_json::Map<String, Value>, f64)>;

fn sum(samples: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l.get(*k) == Some(&json!(v))))
        .map(|(_, _, v)| v)
        .sum()
}

fn scrape(s: &TestServer) -> Samples {
    let (code, text) = raw_request(
        s.admin,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(code, 200);
    prometheus_parse(&text)
}

/// Parses exposition text with the reference Python client's parser (installed on first use:
/// `pip install prometheus_client`), which rejects malformed exposition.
fn prometheus_parse(text: &str) -> Samples {
    const SCRIPT: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for fam in text_string_to_metric_families(sys.stdin.read()):
    assert fam.documentation, fam.name + " has no HELP"
    for s in fam.samples:
        out.append([s.name, s.labels, s.value])
print(json.dumps(out))
"#;
    let has_parser = || {
        std::process::Command::new("python3")
            .args(["-c", "import prometheus_client"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !has_parser() {
        let status = std::process::Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "prometheus_client"])
            .status()
            .expect("python3 is needed to validate /metrics");
        assert!(
            status.success() && has_parser(),
            "cannot install prometheus_client"
        );
    }
    let mut child = std::process::Command::new("python3")
        .args(["-c", SCRIPT])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Prometheus parser rejected /metrics: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<(String, serde_json::Map<String, Value>, f64)> =
        serde_json::from_slice(&out.stdout).unwrap();
    rows
}

fn admin_feed(s: &TestServer) -> tungstenite::WebSocket<TcpStream> {
    let stream = TcpStream::connect(s.admin).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let url = format!("ws://{}/ws/admin", s.admin);
    tungstenite::client::client(url, stream).expect("upgrade").0
}

fn feed_recv(ws: &mut tungstenite::WebSocket<TcpStream>) -> Result<Value, u16> {
    loop {
        match ws.read() {
            Ok(tungstenite::Message::Text(t)) => return Ok(serde_json::from_str(&t).unwrap()),
            Ok(tungstenite::Message::Close(f)) => return Err(f.map_or(1005, |f| f.code.into())),
            Ok(_) => continue,
            Err(e) => panic!("feed read: {e}"),
        }
    }
}

fn feed_send(ws: &mut tungstenite::WebSocket<TcpStream>, v: Value) {
    ws.send(tungstenite::Message::text(v.to_string())).unwrap();
}

#[test]
fn the_admin_feed_authenticates_pushes_stats_and_changes_and_answers_queries() {
    let s = TestServer::with(2, |c| {
        c.admin.push_interval_ms = 200;
        c.admin.request_timeout_ms = 1_000;
    });
    let mut bad = admin_feed(&s);
    feed_send(&mut bad, json!({"op":"auth","token":"junk"}));
    assert_eq!(feed_recv(&mut bad), Err(4001));
    let mut user = admin_feed(&s);
    feed_send(&mut user, json!({"op":"auth","token": s.token("eve")}));
    assert_eq!(feed_recv(&mut user), Err(4003));
    let mut early = admin_feed(&s);
    feed_send(&mut early, json!({"op":"query","id":1,"path":"/api/stats"}));
    assert_eq!(feed_recv(&mut early), Err(4001), "queries need auth first");
    let mut silent = admin_feed(&s);
    assert_eq!(feed_recv(&mut silent), Err(4001), "no auth in time");

    let mut ws = admin_feed(&s);
    feed_send(&mut ws, json!({"op":"auth","token": s.admin_token()}));
    let hello = feed_recv(&mut ws).unwrap();
    assert_eq!(hello["type"], "hello");
    assert_eq!(
        (&hello["admin"], &hello["shards"]),
        (&json!("ops"), &json!(2))
    );
    assert!(hello["series"].is_array());
    assert_eq!(hello["history"]["backend"], "local");
    assert_eq!(hello["history"]["sample_interval_s"], 10);

    let mut zed = s.connect("zed");
    let stats = loop {
        let v = feed_recv(&mut ws).unwrap();
        if v["type"] == "stats" && v["totals"]["online_users"] == 1 {
            break v;
        }
    };
    assert!(stats["per_shard"].is_array() && stats["sample"]["t"].is_u64());
    zed.set_status("busy", Some("deep work"));
    let change = loop {
        let v = feed_recv(&mut ws).unwrap();
        if v["type"] == "changes"
            && v["users"]
                .as_array()
                .unwrap()
                .iter()
                .any(|u| u["user"] == "zed" && u["status"] == "busy")
        {
            break v;
        }
    };
    assert_eq!(change["missed"], 0);
    let row = change["users"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["user"] == "zed")
        .unwrap();
    assert_eq!(
        (&row["text"], &row["devices"]),
        (&json!("deep work"), &json!(1))
    );

    feed_send(
        &mut ws,
        json!({"op":"query","id":"q1","path":"/api/online?status=busy"}),
    );
    let reply = loop {
        let v = feed_recv(&mut ws).unwrap();
        if v["type"] == "reply" {
            break v;
        }
    };
    assert_eq!(
        (&reply["id"], &reply["status"]),
        (&json!("q1"), &json!(200))
    );
    assert_eq!(reply["body"]["users"][0]["user"], "zed");
    feed_send(
        &mut ws,
        json!({"op":"query","id":2,"method":"POST","path":"/api/users/zed/kick"}),
    );
    let reply = loop {
        let v = feed_recv(&mut ws).unwrap();
        if v["type"] == "reply" {
            break v;
        }
    };
    assert_eq!(reply["body"], json!({"user":"zed","kicked":1}));
    assert_eq!(zed.close_code(), 4003);
    feed_send(
        &mut ws,
        json!({"op":"query","id":3,"path":"/api/online?limit=0"}),
    );
    let reply = loop {
        let v = feed_recv(&mut ws).unwrap();
        if v["type"] == "reply" {
            break v;
        }
    };
    assert_eq!(
        (&reply["status"], &reply["body"]["error"]),
        (&json!(400), &json!("bad_request"))
    );
    feed_send(&mut ws, json!({"nonsense": true}));
    assert_eq!(feed_recv(&mut ws).unwrap_err(), 1007);
}

#[test]
fn the_http_server_keeps_alive_and_enforces_its_limits() {
    let s = TestServer::with(1, |c| {
        c.admin.request_timeout_ms = 300;
        c.admin.max_request_bytes = 2048;
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
        "a".repeat(4096)
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
    let s = server(1);
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
fn every_metric_family_and_route_is_documented() {
    let s = server(2);
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/ADMIN.md")).unwrap();
    let (_, text) = raw_request(
        s.admin,
        "GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    let families: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| l.split(' ').next().unwrap())
        .collect();
    assert!(families.len() > 20);
    for f in families {
        assert!(
            doc.contains(&format!("`{f}`")),
            "metric {f} is not in docs/ADMIN.md"
        );
    }
    for route in [
        "GET /healthz",
        "GET /readyz",
        "GET /metrics",
        "GET /api/stats",
        "GET /api/users/{id}",
        "GET /api/online",
        "GET /api/groups/{g}",
        "POST /api/users/{id}/kick",
        "POST /api/sessions/{id}/kick",
        "GET /ws/admin",
        "GET /api/history/{user}",
        "GET /api/analytics/{user}",
        "GET /api/replay",
        "GET /api/replay/at",
    ] {
        assert!(
            doc.contains(&format!("`{route}`")),
            "route {route} is not in docs/ADMIN.md"
        );
    }
}

#[test]
fn non_ascii_credentials_are_refused_without_harming_a_shard() {
    let s = server(2);
    for v in [
        "Bearer\u{e9} x",
        "B\u{e9}arer token",
        "\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}",
    ] {
        let (code, body) = raw_request(
            s.admin,
            &format!("GET /api/stats HTTP/1.1\r\nAuthorization: {v}\r\nConnection: close\r\n\r\n"),
        );
        assert_eq!(code, 401, "{v:?}: {body}");
        let (code, _) = s.raw_upgrade("/ws", &format!("Authorization: {v}\r\n"));
        assert_eq!(code, 401, "{v:?} on the client port");
    }
    // Every shard still answers: a map-reduce needs them all.
    assert_eq!(s.admin_get("/api/stats")["shards"], 2);
    let _a = s.connect(&user_on(0, 2, "x"));
    let _b = s.connect(&user_on(1, 2, "y"));
    assert_eq!(s.admin_request("GET", "/readyz", None).0, 200);
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
    // Give the server a moment to read their requests: until then they are idle connections
    // (nothing read yet), which a newcomer may evict.
    std::thread::sleep(Duration::from_millis(300));
    let (code, body) = s.admin_request("GET", "/healthz", None);
    assert_eq!(code, 503, "the three stuck clients hold every slot: {body}");
    // Within a few write timeouts the server has given up on them and answers others again.
    eventually("the admin port serving again", || {
        (s.admin_request("GET", "/healthz", None).0 == 200).then_some(())
    });
    drop(stuck);
}

/// Item 14: idle sockets cannot lock the admin port. A full pool evicts its longest-idle
/// connection for a newcomer, so `/healthz` and `/metrics` answer while 50 silent sockets are
/// open against a pool of 8 (before, every probe got 503 until the sockets' 60 s idle timeout);
/// one IP holds at most `admin.max_connections_per_ip` (429 past it); a socket that sends
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
