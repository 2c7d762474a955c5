//! Webhooks (docs/WEBHOOKS.md) against a real HTTP receiver on loopback that answers 200, 500,
//! hangs past the timeout, or is not there at all (connection refused), and comes back.
//!
//! Every event is delivered at least once, in order per user; signatures verify in Python's
//! `hmac`; the queue bound holds and drops are counted exactly; filters and the `slack` format;
//! a dead receiver does not delay presence.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU8, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::TestServer;
use presenced::config::{WebhookConfig, WebhookFormat};
use serde_json::Value;

const SECRET: &str = "webhook-secret-0123456789";

/// How the receiver answers.
const OK: u8 = 0;
const FAIL: u8 = 1;
const HANG: u8 = 2;

/// One request the receiver got.
#[derive(Clone, Debug)]
struct Got {
    headers: HashMap<String, String>,
    body: Vec<u8>,
    /// What the receiver answered (OK, FAIL or HANG).
    answered: u8,
}

/// A webhook receiver on a loopback port: records every request, answers as `mode` says.
/// `down()` closes its socket (connection refused), `up()` listens on the same port again.
struct Receiver {
    addr: SocketAddr,
    mode: Arc<AtomicU8>,
    got: Arc<Mutex<Vec<Got>>>,
    stop: Arc<Mutex<Option<std::sync::mpsc::Sender<()>>>>,
}

impl Receiver {
    fn start() -> Receiver {
        // Below the ephemeral range: while the receiver is down, no outgoing connection takes
        // its port, so `up()` can listen there again.
        let listener = TcpListener::bind(("127.0.0.1", common::free_port())).unwrap();
        let r = Receiver {
            addr: listener.local_addr().unwrap(),
            mode: Arc::new(AtomicU8::new(OK)),
            got: Arc::default(),
            stop: Arc::default(),
        };
        r.serve(listener);
        r
    }

    fn serve(&self, listener: TcpListener) {
        listener.set_nonblocking(true).unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        *self.stop.lock().unwrap() = Some(tx);
        let (mode, got) = (self.mode.clone(), self.got.clone());
        std::thread::spawn(move || loop {
            if rx.try_recv().is_ok() {
                return; // the listener closes here
            }
            match listener.accept() {
                Ok((s, _)) => {
                    let (mode, got) = (mode.clone(), got.clone());
                    std::thread::spawn(move || handle(s, &mode, &got));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        });
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, SeqCst);
    }

    fn down(&self) {
        if let Some(tx) = self.stop.lock().unwrap().take() {
            let _ = tx.send(());
        }
        // The accept loop notices within a few ms; then connecting is refused.
        common::eventually("the receiver refuses", || {
            TcpStream::connect(self.addr).err().map(|_| ())
        });
    }

    fn up(&self) {
        let listener = TcpListener::bind(self.addr).expect("the receiver's port again");
        self.serve(listener);
    }

    fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }
}

fn handle(s: TcpStream, mode: &AtomicU8, got: &Mutex<Vec<Got>>) {
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut headers = HashMap::new();
    let mut line = String::new();
    if r.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    loop {
        line.clear();
        if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.trim_end().split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    let n: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; n];
    if r.read_exact(&mut body).is_err() {
        return;
    }
    let answered = mode.load(SeqCst);
    got.lock().unwrap().push(Got {
        headers,
        body,
        answered,
    });
    let mut s = s;
    match answered {
        OK => {
            let _ =
                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
        FAIL => {
            let _ = s.write_all(
                b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
        }
        // Past every timeout the tests set (the connection is then dropped unanswered).
        _ => std::thread::sleep(Duration::from_secs(10)),
    }
}

fn hook(url: String, tweak: impl FnOnce(&mut WebhookConfig)) -> WebhookConfig {
    let mut w = WebhookConfig {
        url,
        secret: Some(SECRET.into()),
        batch_ms: 20,
        timeout_ms: 400,
        ..WebhookConfig::default()
    };
    tweak(&mut w);
    w
}

/// Every event the receiver acknowledged or not, deduplicated by id, in first-arrival order.
fn events(got: &[Got]) -> Vec<Value> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for g in got {
        let v: Value = serde_json::from_slice(&g.body).unwrap();
        for e in v["events"].as_array().unwrap() {
            if seen.insert(e["id"].as_str().unwrap().to_owned()) {
                out.push(e.clone());
            }
        }
    }
    out
}

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
    let s = &server.handle().webhook_stats()[0];
    let get = |a: &std::sync::atomic::AtomicU64| a.load(SeqCst);
    assert_eq!(get(&s.acked), (users.len() * want.len()) as u64);
    assert_eq!(get(&s.dropped), 0);
    assert!(get(&s.failed) >= 3, "500s, a timeout and refusals were met");
    // A 200 the sender had already timed out on counts as failed: hence at least.
    let oks = rx.got().iter().filter(|g| g.answered == OK).count() as u64;
    assert!(get(&s.requests) > get(&s.failed), "{s:?}");
    assert!(oks <= get(&s.requests) && oks >= 1, "{s:?}");
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
    let stats = server.handle().webhook_stats()[0].clone();
    common::eventually("all 20 queued or dropped", || {
        (stats.dropped.load(SeqCst) + stats.queued.load(SeqCst) >= 20).then_some(())
    });
    assert_eq!(stats.dropped.load(SeqCst), 15, "20 events, 5 held");
    rx.set(OK);
    let got = common::eventually_within("the held five", Duration::from_secs(30), || {
        let ev = events(&rx.got());
        (ev.len() >= 5 && stats.queued.load(SeqCst) == 0).then_some(ev)
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
    assert_eq!(server.handle().webhook_stats()[1].name, "alerts");
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
