//! `apply` and the session lifecycle, tested directly: a one-shard `Shard` on a glommio executor,
//! with its mesh inbox pumped by hand. No socket anywhere: the replies are read from the
//! session's outbox exactly as the socket driver would write them.

use std::io::Cursor;
use std::net::{IpAddr, Ipv4Addr};
use std::rc::Rc;
use std::sync::Arc;

use serde_json::{json, Value};
use tungstenite::protocol::frame::FrameHeader;

use super::super::session::{Admission, Refusal, Session};
use super::super::{Shard, Shared};
use crate::auth::{AuthConfig, Verifier};
use crate::config::{Config, SessionPolicy};
use crate::metrics::ShardMetrics;
use crate::protocol::ops;

const SECRET: &str = "unit-test-secret-0123456789";

/// A one-shard server core: the shard and its own inbox, pumped by the test.
struct Core {
    shard: Rc<Shard>,
    inbox: flume::Receiver<super::super::mesh::MeshMsg>,
}

impl Core {
    fn new(tweak: impl FnOnce(&mut Config)) -> Core {
        let mut cfg = Config {
            shards: 1,
            ..Config::default()
        };
        tweak(&mut cfg);
        let cfg = cfg.validate().expect("valid test config");
        let verifier = Verifier::new(Some(SECRET), &AuthConfig::default()).unwrap();
        let shared = Arc::new(Shared::new(vec![None]));
        let (tx, rx) = flume::bounded(1 << 16);
        let mesh = super::super::mesh::Mesh::new(
            0,
            vec![tx],
            cfg.mesh.overflow_max_bytes,
            shared.metrics.clone(),
            shared.mesh_pairs[0].clone(),
        );
        let shard = Rc::new(Shard::new(
            0,
            cfg.config_arc(),
            Arc::new(verifier),
            mesh,
            shared,
        ));
        Core { shard, inbox: rx }
    }

    fn open(&self, user: &str) -> Result<Rc<Session>, Refusal> {
        self.shard.open_session(admission(user))
    }

    /// Delivers every queued mesh message, as the shard's loop would.
    fn pump(&self) {
        while let Ok(msg) = self.inbox.try_recv() {
            self.shard.handle(msg, super::super::now_ms());
        }
    }

    /// One client message, as the socket driver hands it over.
    fn send(&self, session: &Session, op: Value) {
        let parsed = ops::parse(&op.to_string(), self.shard.op_limits());
        self.shard.submit(session, parsed);
        self.pump();
    }

    fn metrics(&self) -> crate::metrics::MetricsSnapshot {
        self.shard.metrics().snapshot()
    }
}

/// Everything queued for `session`, as JSON (the frames' payloads).
fn drain(session: &Session) -> Vec<Value> {
    let mut bytes = Vec::new();
    session.fill(&mut bytes, usize::MAX);
    let mut frames = Cursor::new(&bytes[..]);
    let mut out = Vec::new();
    while let Some((_, len)) = FrameHeader::parse(&mut frames).unwrap() {
        let start = frames.position() as usize;
        let end = start + len as usize;
        out.push(serde_json::from_slice(&bytes[start..end]).unwrap());
        frames.set_position(end as u64);
    }
    out
}

fn of_type<'a>(frames: &'a [Value], t: &str) -> Vec<&'a Value> {
    frames.iter().filter(|v| v["type"] == t).collect()
}

fn run(test: impl FnOnce() + Send + 'static) {
    glommio::LocalExecutorBuilder::default()
        .spawn(|| async move { test() })
        .unwrap()
        .join()
        .unwrap();
}

#[test]
fn subscribe_acks_then_snapshots_then_live_updates() {
    run(|| {
        let core = Core::new(|_| {});
        let watcher = core.open("w").unwrap();
        let bob = core.open("bob").unwrap();
        core.pump();
        let welcome = drain(&watcher);
        assert_eq!(welcome[0]["type"], "welcome");
        core.send(
            &watcher,
            json!({"op":"subscribe","id":1,"users":["bob","carl","bob"]}),
        );
        let got = drain(&watcher);
        assert_eq!(got[0], json!({"type":"ack","id":1}));
        let snaps = of_type(&got, "presence");
        assert_eq!(snaps.len(), 2, "one snapshot per distinct user: {got:?}");
        assert_eq!(
            snaps.iter().find(|s| s["user"] == "bob").unwrap()["status"],
            "online"
        );
        core.send(
            &bob,
            json!({"op":"set_status","status":"busy","text":"call"}),
        );
        let live = drain(&watcher);
        assert_eq!(live.len(), 1);
        assert_eq!(
            (live[0]["status"].as_str(), live[0]["text"].as_str()),
            (Some("busy"), Some("call"))
        );
        core.send(&watcher, json!({"op":"unsubscribe","users":["bob"]}));
        drain(&watcher);
        core.send(&bob, json!({"op":"set_status","status":"away"}));
        assert!(drain(&watcher).is_empty(), "nothing after unsubscribe");
    });
}

#[test]
fn a_subscribe_past_the_id_budget_applies_nothing() {
    run(|| {
        let core = Core::new(|c| {
            c.limits.max_subscriptions = 10;
            c.limits.subscriptions_per_second = 1;
        });
        let w = core.open("w").unwrap();
        let ids: Vec<String> = (0..10).map(|i| format!("u{i}")).collect();
        core.send(&w, json!({"op":"subscribe","id":"a","users":ids}));
        assert_eq!(
            of_type(&drain(&w), "presence").len(),
            10,
            "the whole allowance at once"
        );
        core.send(&w, json!({"op":"unsubscribe","users":ids}));
        drain(&w);
        core.send(&w, json!({"op":"subscribe","id":"b","users":["x", "y"]}));
        let got = drain(&w);
        assert_eq!(got.len(), 1, "an error and nothing else: {got:?}");
        assert_eq!(
            (got[0]["id"].as_str(), got[0]["code"].as_str()),
            (Some("b"), Some("rate_limited"))
        );
        // Nothing was subscribed: a change of x reaches nobody.
        let x = core.open("x").unwrap();
        core.pump();
        drop(x);
        assert!(drain(&w).is_empty());
    });
}

#[test]
fn a_congested_mesh_refuses_new_subscriptions_only() {
    run(|| {
        let core = Core::new(|_| {});
        let w = core.open("w").unwrap();
        drain(&w);
        // Another shard's overflow past the bound: every shard sheds new work.
        let m = core.shard.shared().metrics[0].clone();
        ShardMetrics::set(&m.mesh_overflow_bytes, u64::MAX / 2);
        core.send(&w, json!({"op":"subscribe","id":1,"users":["a"]}));
        core.send(&w, json!({"op":"subscribe_group","id":2,"group":"g"}));
        core.send(&w, json!({"op":"set_status","id":3,"status":"away"}));
        core.send(&w, json!({"op":"unsubscribe","id":4,"users":["a"]}));
        let got = drain(&w);
        let codes: Vec<&str> = got
            .iter()
            .map(|v| v["code"].as_str().unwrap_or("ack"))
            .collect();
        assert_eq!(codes, ["overloaded", "overloaded", "ack", "ack"], "{got:?}");
        assert_eq!(core.metrics().ops_overloaded, 2);
        ShardMetrics::set(&m.mesh_overflow_bytes, 0);
        core.send(&w, json!({"op":"subscribe","id":5,"users":["a"]}));
        assert_eq!(
            of_type(&drain(&w), "presence").len(),
            1,
            "drained: admitted again"
        );
    });
}

#[test]
fn reject_new_refuses_the_session_before_it_exists() {
    run(|| {
        let core = Core::new(|c| {
            c.limits.max_sessions_per_user = 1;
            c.limits.session_policy = SessionPolicy::RejectNew;
        });
        let _first = core.open("u").unwrap();
        let refused = core.open("u");
        assert!(matches!(refused, Err(Refusal::Close(4009, _))));
        assert_eq!(
            core.shard.session_count(),
            1,
            "no session for the refused connection"
        );
        assert_eq!(core.shard.registry().session_count(), 1);
    });
}

#[test]
fn a_closing_session_applies_nothing() {
    run(|| {
        let core = Core::new(|_| {});
        let s = core.open("u").unwrap();
        drain(&s);
        s.request_close(super::super::CloseRequest::now(4003, "kicked"));
        core.send(&s, json!({"op":"subscribe","users":["a"]}));
        core.send(&s, json!({"op":"set_status","status":"busy"}));
        assert!(drain(&s).is_empty());
        assert_eq!(core.shard.registry().view("a", 0).map(|v| v.watchers), None);
        assert_eq!(
            core.shard.registry().view("u", 0).unwrap().status,
            crate::presence::Aggregate::Online
        );
    });
}

#[test]
fn closing_a_session_releases_everything_it_held() {
    run(|| {
        let core = Core::new(|_| {});
        let w = core.open("w").unwrap();
        core.send(&w, json!({"op":"subscribe","users":["a","b"]}));
        core.send(&w, json!({"op":"subscribe_group","group":"g"}));
        assert_eq!(core.shard.registry().view("a", 0).unwrap().watchers, 1);
        core.shard.close_session(&w);
        core.shard.close_session(&w); // idempotent
        core.pump();
        assert!(
            core.shard.registry().view("a", 0).is_none(),
            "unwatched and forgotten"
        );
        assert!(core.shard.groups().page("g", None, 1).is_none());
        assert_eq!(
            (core.shard.session_count(), core.metrics().connections),
            (0, 0)
        );
        assert_eq!(core.metrics().unmatched_unwatches, 0);
    });
}

#[test]
fn a_burst_past_twice_the_rate_gets_errors_then_a_flushed_4008() {
    run(|| {
        let core = Core::new(|c| c.limits.ops_per_second = 10);
        let s = core.open("u").unwrap();
        drain(&s);
        for i in 0..25 {
            core.send(&s, json!({"op":"ping","id":i}));
        }
        let got = drain(&s);
        let pongs = of_type(&got, "pong").len();
        let limited = got.iter().filter(|v| v["code"] == "rate_limited").count();
        assert_eq!((pongs, limited, got.len()), (10, 10, 20), "{got:?}");
        let close = s.close_request().expect("the 21st op closes");
        assert_eq!(close.code, 4008);
        assert!(
            close.flush_ms > 0,
            "the queued replies go out before the close"
        );
    });
}

#[test]
fn observers_are_read_only_and_invisible_sessions_send_no_activity() {
    run(|| {
        let core = Core::new(|_| {});
        let admin = core
            .shard
            .open_session(Admission {
                observer: Some("ops".into()),
                ..admission("bob")
            })
            .unwrap();
        let welcome = drain(&admin);
        assert_eq!(
            (
                welcome[0]["read_only"].as_bool(),
                welcome[0]["admin"].as_str()
            ),
            (Some(true), Some("ops"))
        );
        core.send(&admin, json!({"op":"set_status","id":1,"status":"busy"}));
        assert_eq!(drain(&admin)[0]["code"], "forbidden");
        assert!(
            core.shard.registry().view("bob", 0).is_none(),
            "an observer is no device"
        );
        let bob = core.open("bob").unwrap();
        drain(&bob);
        core.send(&bob, json!({"op":"set_status","status":"invisible"}));
        core.send(&bob, json!({"op":"activity","id":2,"kind":"typing"}));
        let got = drain(&bob);
        assert_eq!(got.last().unwrap()["code"], "forbidden", "{got:?}");
    });
}

#[test]
fn refresh_moves_the_expiry_and_refuses_another_subject() {
    run(|| {
        let core = Core::new(|_| {});
        let s = core.open("u").unwrap();
        drain(&s);
        let spec = |sub: &str| crate::auth::TokenSpec::new(sub, std::time::Duration::from_secs(60));
        let other = crate::auth::mint_hs256(SECRET, &spec("v"));
        core.send(&s, json!({"op":"refresh","id":1,"token":other}));
        assert_eq!(drain(&s)[0]["code"], "forbidden");
        let mine = crate::auth::mint_hs256(SECRET, &spec("u"));
        core.send(&s, json!({"op":"refresh","id":2,"token":mine}));
        assert_eq!(drain(&s)[0]["type"], "ack");
        assert!(
            s.expires_at.get() < u64::MAX / 2,
            "moved to the new token's exp"
        );
    });
}

fn admission(user: &str) -> Admission {
    Admission {
        user: user.into(),
        expires_at: u64::MAX / 2,
        device: None,
        device_type: Default::default(),
        region: None,
        groups: Vec::new(),
        roles: Vec::new(),
        ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        observer: None,
    }
}

#[test]
fn a_closing_session_takes_no_new_events() {
    // A flushing close (4008, shutdown) waits for the backlog to empty; events still arriving
    // for a watched user must not keep it from ever emptying.
    run(|| {
        let core = Core::new(|_| {});
        let w = core.open("w").unwrap();
        let bob = core.open("bob").unwrap();
        core.send(&w, json!({"op":"subscribe","users":["bob"]}));
        drain(&w);
        w.request_close(super::super::CloseRequest {
            code: 4008,
            reason: "rate limit abuse",
            flush_ms: 1_000,
        });
        for status in ["away", "busy", "online", "away"] {
            core.send(&bob, json!({"op":"set_status","status":status}));
        }
        assert_eq!(
            w.backlog(),
            0,
            "nothing queued after the close was asked for"
        );
        assert!(core.metrics().outbox_dropped >= 4);
    });
}
