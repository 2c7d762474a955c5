//! Per-shard fan-out of one presence change to K local subscribers (K = 1, 100, 10,000).
//!
//! Ours: serialise the event once, straight into a complete WebSocket frame
//! (`protocol::events::presence`), and push a clone of the same `Bytes` (a reference-count
//! increment) into each subscriber's `Outbox`. Baseline: the naive server, which serialises and
//! frames the event once per connection: the same `events::presence` call K times, into the same
//! outboxes, so the only difference is "once per shard" against "once per connection".
//!
//! Both then drain every outbox with `pop` (what the connection's writer does), so outbox state
//! stays bounded and each iteration starts from empty outboxes. Throughput is in deliveries.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use presenced::presence::{Aggregate, PresenceState};
use presenced::protocol::events;
use presenced::shard::outbox::{Key, Outbox, Queued};

const SUBSCRIBERS: [usize; 3] = [1, 100, 10_000];
/// The config defaults (`limits.max_pending_replies`, `limits.max_pending_events`,
/// `limits.coalesce_after_bytes`).
const MAX_REPLIES: usize = 1024;
const MAX_EVENTS: usize = 4096;
const COALESCE_BYTES: usize = 64 * 1024;

fn state() -> PresenceState {
    PresenceState {
        user: "user-4711".into(),
        status: Aggregate::Busy,
        text: Some("in a meeting until 3pm".into()),
        devices: 2,
        last_seen: None,
        ts: 1_700_000_000_000,
        seq: 42,
    }
}

/// What each connection's writer does: take every queued frame.
fn drain(outboxes: &mut [Outbox]) {
    for o in outboxes {
        while let Some(frame) = o.pop() {
            black_box(frame);
        }
    }
}

fn fanout(c: &mut Criterion) {
    let state = state();
    let mut g = c.benchmark_group("fanout/presence");
    for k in SUBSCRIBERS {
        let mut outboxes: Vec<Outbox> = (0..k)
            .map(|_| Outbox::new(MAX_REPLIES, MAX_EVENTS, COALESCE_BYTES))
            .collect();
        g.throughput(Throughput::Elements(k as u64));
        g.bench_function(BenchmarkId::new("ours_serialise_once", k), |b| {
            b.iter(|| {
                let frame = events::presence(&state, None);
                let key = Key::Presence(state.user.clone(), None);
                for o in outboxes.iter_mut() {
                    let queued = o.push_event(&key, frame.clone());
                    debug_assert_eq!(queued, Queued::New);
                }
                drain(&mut outboxes);
            })
        });
        g.bench_function(BenchmarkId::new("baseline_serialise_per_conn", k), |b| {
            b.iter(|| {
                for o in outboxes.iter_mut() {
                    let frame = events::presence(&state, None);
                    let key = Key::Presence(state.user.clone(), None);
                    let queued = o.push_event(&key, frame);
                    debug_assert_eq!(queued, Queued::New);
                }
                drain(&mut outboxes);
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    targets = fanout
}
criterion_main!(benches);
