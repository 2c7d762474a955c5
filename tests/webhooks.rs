//! Webhooks (docs/WEBHOOKS.md) against a real HTTP receiver on loopback that answers 200, 500,
//! hangs past the timeout, or is not there at all (connection refused), and comes back.
//!
//! Every event is delivered at least once, in order per user; signatures verify in Python's
//! `hmac`; the queue bound holds and drops are counted exactly; filters and the `slack` format;
//! a dead receiver does not delay presence.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::webhooks::{events, hook, Got, Receiver, FAIL, HANG, OK, SECRET};
use common::TestServer;
use presenced::config::WebhookFormat;
use serde_json::Value;

fn kinds_of(events: &[Value], user: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["user"] == user)
        .map(|e| e["event"].as_str().unwrap().to_owned())
        .collect()
}

/// Checks every request's signature with Python's `hmac` (a receiver would do the same).
fn verify_in_python(got: &[Got]) {
    let requests: Vec<Value> = got
        .iter()
        .map(|g| {
            serde_json::json!({
                "ts": g.headers["x-presenced-timestamp"],
                "sig": g.headers["x-presenced-signature"],
                "body": String::from_utf8(g.body.clone()).unwrap(),
            })
        })
        .collect();
    let script = r#"
import hashlib, hmac, json, sys
secret = sys.argv[1].encode()
bad = 0
for r in json.load(sys.stdin):
    want = "sha256=" + hmac.new(secret, (r["ts"] + "." + r["body"]).encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(want, r["sig"]):
        bad += 1
print(bad)
"#;
    let mut child = std::process::Command::new("python3")
        .args(["-c", script, SECRET])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(&requests).unwrap().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "0",
        "every signature verifies"
    );
}

#[test]
fn through_500s_timeouts_and_refusals_every_event_arrives_in_order_per_user() {
    let rx = Receiver::start();
    rx.set(FAIL);
    let server = TestServer::with(2, |c| c.webhooks = vec![hook(rx.url(), |_| {})]);
    let users = ["ann", "ben", "cat"];
    let mut clients: Vec<_> = users.iter().map(|u| server.connect(u)).collect();
    for c in &mut clients {
        c.set_status("busy", Some("call"));
    }
    common::eventually("a failed try", || (rx.got().len() >= 2).then_some(()));
    rx.set(HANG);
    for c in &mut clients {
        c.set_status("away", None);
    }
    common::eventually("a hung try", || {
        rx.got().iter().any(|g| g.answered == HANG).then_some(())
    });
    rx.down();
    for c in clients.drain(..) {
        c.close();
    }
    std::thread::sleep(Duration::from_millis(500)); // tries meet a refused connection
    rx.set(OK);
    rx.up();
    let want = [
        "session_start",
        "user_online",
        "status_change",
        "status_change",
        "session_end",
        "user_offline",
    ];
    let all = common::eventually_within("every event delivered", Duration::from_secs(60), || {
        let ev = events(&rx.got());
        users
            .iter()
            .all(|u| kinds_of(&ev, u).len() == want.len())
            .then_some(ev)
    });
    for u in users {
        assert_eq!(kinds_of(&all, u), want, "{u}: every event, in order");
        let seqs: Vec<u64> = all
            .iter()
            .filter(|e| e["user"] == u)
            .map(|e| e["seq"].as_u64().unwrap())
            .collect();
        assert!(seqs.windows(2).all(|w| w[0] <= w[1]), "{u}: {seqs:?}");
    }
    verify_in_python(&rx.got());
    // The admin API and /metrics tell the same story: all acknowledged, nothing dropped, the
    // failures met on the way counted and the last one kept, healthy again.
    let acked = (users.len() * want.len()) as u64;
    let h = common::eventually("the webhook healthy, all acknowledged", || {
        let h = server.admin_get("/api/webhooks")["webhooks"][0].clone();
        (h["acked"] == acked && h["state"] == "ok").then_some(h)
    });
    assert_eq!(h["name"], "webhook-0");
    assert_eq!(h["target"], format!("http://{}", rx.addr));
    assert_eq!(
        (h["dropped"].as_u64(), h["queued"].as_u64()),
        (Some(0), Some(0))
    );
    assert_eq!(h["consecutive_failures"], 0);
    let retries = h["retries"].as_u64().unwrap();
    let requests = h["requests"].as_u64().unwrap();
    assert!(retries >= 3, "500s, a timeout and refusals were met: {h}");
    assert!(
        h["last_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{h}"
    );
    assert!(h["last_ok_ms"].as_u64().unwrap() >= h["last_error_ms"].as_u64().unwrap());
    // A 200 the sender had already timed out on counts as failed: hence at least.
    let oks = rx.got().iter().filter(|g| g.answered == OK).count() as u64;
    assert!(requests > retries, "{h}");
    assert!(oks <= requests && oks >= 1, "{h}");
    assert!(h["events_sent"].as_u64().unwrap() >= acked, "{h}");
    assert_eq!(
        h["delay_ms"]["count"], acked,
        "one delay per acknowledged event"
    );
    let m = common::metrics_text(server.admin, None);
    for (family, v) in [
        ("presenced_webhook_events_acked_total", acked),
        ("presenced_webhook_retries_total", retries),
        ("presenced_webhook_requests_total", requests),
        ("presenced_webhook_events_dropped_total", 0),
        ("presenced_webhook_queue_depth", 0),
        ("presenced_webhook_consecutive_failures", 0),
        ("presenced_webhook_event_delay_seconds_count", acked),
    ] {
        let line = format!("{family}{{webhook=\"webhook-0\"}} {v}\n");
        assert!(m.contains(&line), "/metrics lacks {line:?}");
    }
    assert!(m.contains("presenced_webhook_state{webhook=\"webhook-0\",state=\"ok\"} 1\n"));
    let admin_md =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/ADMIN.md")).unwrap();
    let families: Vec<&str> = m
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE presenced_webhook_"))
        .collect();
    assert!(families.len() >= 12, "{families:?}");
    for f in families {
        let f = format!("presenced_webhook_{}", f.split(' ').next().unwrap());
        assert!(
            admin_md.contains(&format!("`{f}`")),
            "{f} is not in docs/ADMIN.md"
        );
    }
}

#[test]
fn past_max_queue_the_oldest_waiting_events_are_dropped_and_counted() {
    let rx = Receiver::start();
    rx.set(FAIL);
    let server = TestServer::with(2, |c| {
        c.webhooks = vec![hook(rx.url(), |w| {
            w.max_queue = 5;
            w.batch_max = 2;
            w.events = vec!["status_change".into()];
        })]
    });
    let mut ann = server.connect("ann");
    let texts: Vec<String> = (0..20).map(|i| format!("t{i}")).collect();
    // The first change goes out alone and fails: that batch stays in flight.
    ann.set_status("busy", Some(&texts[0]));
    common::eventually("the first try", || (!rx.got().is_empty()).then_some(()));
    for t in &texts[1..] {
        ann.set_status("busy", Some(t));
        ann.request(serde_json::json!({"op": "ping"}));
    }
    let hook = || server.admin_get("/api/webhooks")["webhooks"][0].clone();
    let held = common::eventually("all 20 queued or dropped", || {
        let h = hook();
        (h["dropped"].as_u64()? + h["queued"].as_u64()? >= 20).then_some(h)
    });
    assert_eq!(held["dropped"], 15, "20 events, 5 held: {held}");
    assert_eq!(held["queued"], 5, "{held}");
    assert_eq!(held["max_queue"], 5);
    assert_eq!(held["state"], "failing");
    assert_eq!(held["last_error"], "HTTP 500");
    assert!(
        held["consecutive_failures"].as_u64().unwrap() >= 1,
        "{held}"
    );
    assert!(
        held["retry_at_ms"].as_u64().is_some(),
        "a retry is waiting: {held}"
    );
    let m = common::metrics_text(server.admin, None);
    assert!(m.contains("presenced_webhook_events_dropped_total{webhook=\"webhook-0\"} 15\n"));
    assert!(m.contains("presenced_webhook_queue_capacity{webhook=\"webhook-0\"} 5\n"));
    assert!(m.contains("presenced_webhook_state{webhook=\"webhook-0\",state=\"failing\"} 1\n"));
    rx.set(OK);
    let got = common::eventually_within("the held five", Duration::from_secs(30), || {
        let ev = events(&rx.got());
        (ev.len() >= 5 && hook()["queued"] == 0).then_some(ev)
    });
    let delivered: Vec<&str> = got.iter().map(|e| e["text"].as_str().unwrap()).collect();
    // The first batch (t0 alone) was in flight and kept; of the rest, the newest four stayed.
    assert_eq!(delivered, ["t0", "t16", "t17", "t18", "t19"]);
}

#[test]
fn filters_pick_users_groups_and_kinds_and_slack_gets_sentences() {
    let ops_rx = Receiver::start();
    let slack_rx = Receiver::start();
    let server = TestServer::with(2, |c| {
        c.webhooks = vec![
            hook(ops_rx.url(), |w| {
                w.name = "ops".into();
                w.groups = vec!["ops".into()];
                w.users = vec!["dan".into()];
            }),
            hook(slack_rx.url(), |w| {
                w.name = "alerts".into();
                w.format = WebhookFormat::Slack;
                w.events = vec!["user_online".into(), "user_offline".into()];
                w.roles = vec!["admin".into()];
            }),
        ]
    });
    let _eve = server.connect_token(&server.token_with("eve", |t| {
        t.groups = vec!["ops".into()];
        t.roles = vec!["admin".into()];
    }));
    let mut dan = server.connect("dan");
    let _fay = server.connect("fay");
    dan.set_status("busy", None);
    let ops = common::eventually("ops events", || {
        let ev = events(&ops_rx.got());
        (kinds_of(&ev, "dan").len() == 3 && kinds_of(&ev, "eve").len() == 2).then_some(ev)
    });
    assert!(kinds_of(&ops, "fay").is_empty(), "fay matches no filter");
    let text = common::eventually("the slack message", || {
        let all: Vec<String> = slack_rx
            .got()
            .iter()
            .map(|g| {
                serde_json::from_slice::<Value>(&g.body).unwrap()["text"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        (!all.is_empty()).then(|| all.join("\n"))
    });
    assert_eq!(text, "eve (admin) is online");
    let hooks = server.admin_get("/api/webhooks")["webhooks"].clone();
    assert_eq!(hooks[0]["name"], "ops");
    assert_eq!(hooks[0]["filters"]["groups"], serde_json::json!(["ops"]));
    assert_eq!(hooks[1]["name"], "alerts");
    assert_eq!(hooks[1]["format"], "slack");
    assert_eq!(
        hooks[1]["events"],
        serde_json::json!(["user_online", "user_offline"])
    );
}

#[test]
fn a_dead_receiver_does_not_delay_presence() {
    let rx = Receiver::start();
    rx.set(HANG);
    let server = TestServer::with(2, |c| {
        c.webhooks = vec![hook(rx.url(), |w| w.timeout_ms = 5_000)]
    });
    let mut watcher = server.connect("watcher");
    watcher.subscribe(&["target"]);
    let mut target = server.connect("target");
    common::eventually("the webhook hangs", || (!rx.got().is_empty()).then_some(()));
    for status in ["busy", "away", "online"] {
        let t = Instant::now();
        target.set_status(status, None);
        watcher.recv_until(status, |v| v["user"] == "target" && v["status"] == status);
        assert!(
            t.elapsed() < Duration::from_millis(1_000),
            "{status} took {:?} with the receiver hung (timeout 5 s)",
            t.elapsed()
        );
    }
}

#[test]
fn a_bad_webhook_block_fails_the_config_check() {
    let mut c = presenced::config::Config {
        jwt_secret: Some("0123456789abcdef0123".into()),
        ..Default::default()
    };
    for (url, says) in [
        ("ftp://x/y", "http:// or https://"),
        ("http://", "valid URL"),
        ("not a url", "valid URL"),
        ("http://h:abc/", "valid URL"),
        ("http://[::1", "valid URL"),
    ] {
        c.webhooks = vec![hook(url.into(), |_| {})];
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("webhooks[0].url") && e.contains(says),
            "{url}: {e}"
        );
    }
    c.webhooks = vec![hook("https://hooks.example/x".into(), |w| {
        w.secret = Some("short".into())
    })];
    assert!(c
        .validate()
        .unwrap_err()
        .to_string()
        .contains("webhooks[0].secret"));
    c.webhooks = vec![hook("https://hooks.example/x".into(), |w| {
        w.events = vec!["online".into()]
    })];
    assert!(c
        .validate()
        .unwrap_err()
        .to_string()
        .contains("unknown event `online`"));
    c.webhooks = vec![hook("https://hooks.example/x".into(), |w| w.max_queue = 1)];
    assert!(c
        .validate()
        .unwrap_err()
        .to_string()
        .contains("webhooks[0].max_queue"));
    // A Slack URL's path is its secret: errors show scheme and host only.
    c.webhooks = vec![hook(
        "https://user:pw@hooks.slack.example/services/T0/B0/SECRETPATH".into(),
        |w| w.batch_max = 0,
    )];
    let e = c.validate().unwrap_err().to_string();
    assert!(
        e.contains("batch_max") && !e.contains("SECRETPATH") && !e.contains("pw"),
        "{e}"
    );
    c.webhooks = vec![hook("https://hooks.example/x".into(), |_| {})];
    c.validate().expect("a good block");
}

#[test]
fn at_shutdown_the_last_sessions_ends_are_delivered() {
    let rx = Receiver::start();
    let server = TestServer::with(2, |c| c.webhooks = vec![hook(rx.url(), |_| {})]);
    let _gil = server.connect("gil");
    common::eventually("gil online", || {
        (kinds_of(&events(&rx.got()), "gil").len() == 2).then_some(())
    });
    // Shutdown closes gil's session (1001): its end and the offline go out before exit.
    drop(server);
    assert_eq!(
        kinds_of(&events(&rx.got()), "gil"),
        [
            "session_start",
            "user_online",
            "session_end",
            "user_offline"
        ]
    );
}

#[test]
fn in_a_cluster_each_event_is_sent_once_by_the_node_where_it_happened() {
    let nats = common::nats::Nats::start();
    let rx = Receiver::start();
    let node = |id: &'static str| {
        let (url, hook) = (nats.url(), hook(rx.url(), |_| {}));
        TestServer::with(1, move |c| {
            c.cluster = Some(presenced::config::ClusterConfig {
                nats_url: vec![url],
                node_id: Some(id.into()),
                lease_ms: 1_500,
                ..Default::default()
            });
            c.webhooks = vec![hook];
        })
    };
    let (a, b) = (node("hook-a"), node("hook-b"));
    for n in [&a, &b] {
        common::eventually("both nodes on the bus", || {
            (n.admin_get("/readyz")["cluster"]["nodes"] == 2).then_some(())
        });
    }
    // Shares heard from the other node: a step's share has reached it once this grows.
    let heard = |n: &TestServer| -> f64 {
        let m = common::metrics_text(n.admin, None);
        common::metric_sum(&m, "presenced_cluster_deltas_in_total").expect("the cluster's families")
    };
    let step = |what: &str, other: &TestServer, act: &mut dyn FnMut()| {
        let before = heard(other);
        act();
        common::eventually(what, || (heard(other) > before).then_some(()));
    };
    // (user, event, node) of every event received, in arrival order.
    let seen = || -> Vec<(String, String, String)> {
        events(&rx.got())
            .iter()
            .map(|e| {
                let s = |k: &str| e[k].as_str().unwrap_or_default().to_owned();
                (s("user"), s("event"), s("node"))
            })
            .collect()
    };
    let until = |n: usize| {
        common::eventually(&format!("{n} events"), || {
            let s = seen();
            (s.len() >= n).then_some(s)
        })
    };
    let mut on_a = None;
    step("ann's share on a reaches b", &b, &mut || {
        on_a = Some(a.connect("ann"));
    });
    until(2);
    // A second device on b: the user was online already (b's view merges a's share).
    let mut on_b = None;
    step("ann's share on b reaches a", &a, &mut || {
        on_b = Some(b.connect("ann"));
    });
    until(3);
    // The first device leaves: ann is still online on b, so a sends no user_offline.
    step("ann's end on a reaches b", &b, &mut || {
        on_a.take().unwrap().close();
    });
    until(4);
    // The last device leaves: b sends the user_offline.
    on_b.take().unwrap().close();
    until(6);
    // A last session on each node: anything either had still queued came before it.
    let _carl = a.connect("carl");
    let _dora = b.connect("dora");
    let all = until(10);
    let ev = |u: &str, e: &str, n: &str| (u.to_owned(), e.to_owned(), n.to_owned());
    let ann: Vec<_> = all.iter().filter(|e| e.0 == "ann").cloned().collect();
    assert_eq!(
        ann,
        [
            ev("ann", "session_start", "hook-a"),
            ev("ann", "user_online", "hook-a"),
            ev("ann", "session_start", "hook-b"),
            ev("ann", "session_end", "hook-a"),
            ev("ann", "session_end", "hook-b"),
            ev("ann", "user_offline", "hook-b"),
        ],
        "every event once, from the node where it happened"
    );
    let carl: Vec<_> = all.iter().filter(|e| e.0 == "carl").collect();
    assert!(
        carl.iter().all(|e| e.2 == "hook-a") && carl.len() == 2,
        "{carl:?}"
    );
    let dora: Vec<_> = all.iter().filter(|e| e.0 == "dora").collect();
    assert!(
        dora.iter().all(|e| e.2 == "hook-b") && dora.len() == 2,
        "{dora:?}"
    );
    assert_eq!(all.len(), 10, "nothing else: {all:?}");
    // Ids name their node, so two nodes never send the same id.
    for e in events(&rx.got()) {
        let (id, node) = (e["id"].as_str().unwrap(), e["node"].as_str().unwrap());
        assert!(id.starts_with(&format!("{node}-")), "{e}");
    }
    // The admin API lists both nodes' webhooks, each with its node.
    let hooks = a.admin_get("/api/webhooks");
    let nodes: Vec<&str> = hooks["webhooks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["node"].as_str().unwrap())
        .collect();
    assert_eq!(nodes, ["hook-a", "hook-b"], "{hooks}");
    assert_eq!(hooks["nodes_missing"], serde_json::json!([]));
}
