//! The wire protocol's hot paths, each against the obvious off-the-shelf way to do the same job:
//!
//! - parse client ops (`subscribe` with 20 users, `set_status`, `ping`) with `protocol::ops::parse`
//!   (typed, limits applied, borrowed where possible) vs `serde_json::from_str::<Value>` of the same
//!   text (untyped, no checks: a lower bound for "parse it with serde_json first");
//! - serialise events (`presence`, `ack`) with `protocol::events`, which also writes the WebSocket
//!   frame header, vs `serde_json::to_vec(&json!(…))` of the same object (payload only, no frame);
//! - decode one masked client text frame with `protocol::ws::Decoder` vs tungstenite's own
//!   `WebSocket` reading the same bytes. Both are long-lived (one per connection) and get one
//!   frame per read, as from a socket; tungstenite's stream is an in-memory replay of that frame,
//!   its writes (none here: no pings or closes) go nowhere.

use std::hint::black_box;
use std::io::{self, Read, Write};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use presenced::presence::{Aggregate, PresenceState};
use presenced::protocol::events;
use presenced::protocol::ops::{self, OpLimits, RequestId};
use presenced::protocol::ws::{Decoder, Inbound};
use serde_json::value::RawValue;
use tungstenite::protocol::frame::coding::{Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;
use tungstenite::protocol::{Role, WebSocket};
use tungstenite::Message;

/// The config defaults `limits.max_message_bytes` and `limits.max_frame_bytes`.
const SOFT_MAX: usize = 16 * 1024;
const HARD_MAX: usize = 1024 * 1024;
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

fn subscribe_20() -> String {
    let users: Vec<String> = (0..20).map(|i| format!("\"user-{}\"", 1000 + i)).collect();
    format!(
        r#"{{"op":"subscribe","id":1,"users":[{}]}}"#,
        users.join(",")
    )
}

const SET_STATUS: &str =
    r#"{"op":"set_status","id":"r-17","status":"busy","text":"in a meeting until 3pm"}"#;
const PING: &str = r#"{"op":"ping","id":7}"#;

fn parse(c: &mut Criterion) {
    let limits = OpLimits::default();
    for (name, text) in [
        ("subscribe_20", subscribe_20()),
        ("set_status", SET_STATUS.to_owned()),
        ("ping", PING.to_owned()),
    ] {
        let mut g = c.benchmark_group(format!("protocol/parse/{name}"));
        assert!(ops::parse(&text, &limits).is_ok(), "{name} is a valid op");
        g.bench_function("ours", |b| {
            b.iter(|| black_box(ops::parse(black_box(&text), &limits)))
        });
        g.bench_function("serde_json_value", |b| {
            b.iter(|| black_box(serde_json::from_str::<serde_json::Value>(black_box(&text))))
        });
        g.finish();
    }
}

fn serialise(c: &mut Criterion) {
    let state = PresenceState {
        user: "user-4711".into(),
        status: Aggregate::Busy,
        text: Some("in a meeting until 3pm".into()),
        devices: 2,
        last_seen: None,
        ts: 1_700_000_000_000,
        seq: 42,
    };
    let mut g = c.benchmark_group("protocol/serialise/presence");
    g.bench_function("ours_framed", |b| {
        b.iter(|| black_box(events::presence(black_box(&state), None)))
    });
    g.bench_function("serde_json_json_macro", |b| {
        b.iter(|| {
            let s = black_box(&state);
            let v = serde_json::json!({
                "type": "presence", "user": &*s.user, "status": s.status.as_str(),
                "text": s.text.as_deref(), "devices": s.devices, "ts": s.ts, "seq": s.seq,
            });
            black_box(serde_json::to_vec(&v).expect("a Value serialises"))
        })
    });
    g.finish();

    let id: RequestId = RawValue::from_string("\"r-17\"".into()).expect("a JSON string");
    let mut g = c.benchmark_group("protocol/serialise/ack");
    g.bench_function("ours_framed", |b| {
        b.iter(|| black_box(events::ack(Some(black_box(&id)))))
    });
    g.bench_function("serde_json_json_macro", |b| {
        b.iter(|| {
            let v = serde_json::json!({"type": "ack", "id": black_box(&id)});
            black_box(serde_json::to_vec(&v).expect("a Value serialises"))
        })
    });
    g.finish();
}

/// A masked client text frame, as a browser sends it.
fn client_frame(payload: &str) -> Vec<u8> {
    let header = FrameHeader {
        is_final: true,
        opcode: OpCode::Data(Data::Text),
        mask: Some(MASK),
        ..FrameHeader::default()
    };
    let mut out = Vec::new();
    header
        .format(payload.len() as u64, &mut out)
        .expect("writing to a Vec cannot fail");
    out.extend(payload.bytes().enumerate().map(|(i, b)| b ^ MASK[i & 3]));
    out
}

/// An endless socket that delivers `frame` again and again, at most one frame per `read`.
struct Replay {
    frame: Vec<u8>,
    pos: usize,
}

impl Read for Replay {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.frame.len() - self.pos);
        buf[..n].copy_from_slice(&self.frame[self.pos..self.pos + n]);
        self.pos = (self.pos + n) % self.frame.len();
        Ok(n)
    }
}

impl Write for Replay {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn ws_decode(c: &mut Criterion) {
    for (name, text) in [
        ("subscribe_20", subscribe_20()),
        ("set_status", SET_STATUS.to_owned()),
    ] {
        let frame = client_frame(&text);
        let mut g = c.benchmark_group(format!("protocol/ws_decode/{name}"));
        let mut ours = Decoder::new(SOFT_MAX, HARD_MAX);
        g.bench_function("ours", |b| {
            b.iter(|| {
                ours.feed(black_box(&frame));
                match ours.decode() {
                    Ok(Some(Inbound::Text(t))) => black_box(t),
                    other => panic!("one text message per frame, got {other:?}"),
                }
            })
        });
        let replay = Replay {
            frame: frame.clone(),
            pos: 0,
        };
        let mut theirs = WebSocket::from_raw_socket(replay, Role::Server, None);
        g.bench_function("tungstenite_websocket", |b| {
            b.iter(|| match theirs.read() {
                Ok(Message::Text(t)) => black_box(t),
                other => panic!("one text message per frame, got {other:?}"),
            })
        });
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50);
    targets = parse, serialise, ws_decode
}
criterion_main!(benches);
