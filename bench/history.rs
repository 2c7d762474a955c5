//! History writer throughput: records/s from the shards' sink through the writer thread into the
//! embedded local store (redb, one durable commit per batch), end to end.
//!
//! Each iteration pushes `RECORDS` status events into the `history::Sink` (what a shard does) and
//! waits until the writer has acknowledged all of them (`HistoryMetrics::written`). Throughput is
//! in records.
//!
//! Ours: the configured batching (`history.batch_max = 512`). Baseline: the same pipeline with
//! `batch_max = 1`, i.e. one transaction (one fsync) per record — what writing each event as it
//! happens would cost. The ratio is the batching's worth; the absolute figure (ours) is the events/s
//! the writer sustains into the local store on this machine's disk.
//!
//! `history_scylla_writer`: the same pipeline into the `scylla` backend, over the real `scylla`
//! driver, to kassandra (the in-memory CQL server the tests embed, `tests/support/kassandra.rs`;
//! no proxy in between). Ours: batches of 512, 64 requests in flight. Baseline: one record per
//! request, one request at a time. kassandra is a single-threaded in-memory engine, so the
//! absolute figure is kassandra's, not a ScyllaDB cluster's; the ratio is the writer's.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use presenced::config::{HistoryBackend, HistoryConfig, ScyllaConfig};
use presenced::history::{EventKind, History, HistoryEvent, HistoryMetrics};
use presenced::presence::Aggregate;

const RECORDS: u64 = 2_000;

fn event(i: u64) -> HistoryEvent {
    let mut e = HistoryEvent::new(
        1_795_800_000_000 + i,
        format!("user-{}", i % 5_000).into(),
        EventKind::Status,
    );
    e.status = Some(if i.is_multiple_of(2) {
        Aggregate::Busy
    } else {
        Aggregate::Online
    });
    e.text = Some("in a meeting until 3pm".into());
    e.devices = Some(2);
    e.seq = i;
    e
}

#[path = "../tests/support/kassandra.rs"]
mod kassandra;

fn scylla_pipeline(node: String, batch_max: usize, in_flight: usize) -> History {
    let scylla = ScyllaConfig {
        nodes: vec![node],
        keyspace: "presenced_bench".into(),
        replication: "SimpleStrategy".into(),
        max_in_flight: in_flight,
        ..ScyllaConfig::default()
    };
    let cfg = HistoryConfig {
        backend: HistoryBackend::Scylla,
        batch_max,
        batch_interval_ms: 5,
        queue_capacity: RECORDS as usize * 2,
        scylla,
        ..HistoryConfig::default()
    };
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(presenced::history::schema::apply_config(
            &cfg.scylla,
            cfg.retention_days,
        ))
        .expect("the schema applies to kassandra");
    History::start(&cfg).expect("the scylla backend starts")
}

fn pipeline(batch_max: usize) -> (History, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = HistoryConfig {
        data_dir: dir.path().to_owned(),
        batch_max,
        batch_interval_ms: 5,
        queue_capacity: RECORDS as usize * 2,
        ..HistoryConfig::default()
    };
    (History::start(&cfg).expect("local store opens"), dir)
}

fn run(h: &History, iters: u64) -> Duration {
    let m = &h.sink.metrics;
    let start = Instant::now();
    for it in 0..iters {
        let target = HistoryMetrics::get(&m.written) + RECORDS;
        for i in 0..RECORDS {
            h.sink.event(event(it * RECORDS + i));
        }
        while HistoryMetrics::get(&m.written) < target {
            assert_eq!(
                HistoryMetrics::get(&m.dropped_queue_full),
                0,
                "the queue holds a whole round"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    start.elapsed()
}

fn writer(c: &mut Criterion) {
    let mut g = c.benchmark_group("history_local_writer");
    g.throughput(Throughput::Elements(RECORDS));
    let (ours, _d1) = pipeline(512);
    g.bench_function("ours_batch_512", |b| {
        b.iter_custom(|iters| run(&ours, iters))
    });
    let (baseline, _d2) = pipeline(1);
    g.bench_function("baseline_batch_1", |b| {
        b.iter_custom(|iters| run(&baseline, iters))
    });
    g.finish();
    ours.stop(Duration::from_secs(5));
    baseline.stop(Duration::from_secs(5));
}

fn scylla_writer(c: &mut Criterion) {
    let cluster = kassandra::Cluster::start();
    let node = cluster.direct.to_string();
    let mut g = c.benchmark_group("history_scylla_writer");
    g.throughput(Throughput::Elements(RECORDS));
    let ours = scylla_pipeline(node.clone(), 512, 64);
    g.bench_function("ours_batch_512_inflight_64", |b| {
        b.iter_custom(|iters| run(&ours, iters))
    });
    ours.stop(Duration::from_secs(5));
    let baseline = scylla_pipeline(node, 1, 1);
    g.bench_function("baseline_batch_1_inflight_1", |b| {
        b.iter_custom(|iters| run(&baseline, iters))
    });
    baseline.stop(Duration::from_secs(5));
    g.finish();
    drop(cluster);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(4))
        .sample_size(10);
    targets = writer, scylla_writer
}
criterion_main!(benches);
