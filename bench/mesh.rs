//! Mesh message throughput between two threads: batches of 10,000 `MeshMsg::Update`s (each with
//! its own `Arc<PresenceState>`, as the owner shard sends them) from a producer thread to a
//! consumer thread, over a queue with the mesh's default capacity (`mesh.inbox_capacity`).
//!
//! Ours: `flume::bounded`, what the mesh uses. Baselines: `std::sync::mpsc::sync_channel`, and a
//! hand-written `Mutex<VecDeque>` + `Condvar` queue that only signals a side that is waiting (so
//! it pays no wake-up syscall per message): the shared-queue-behind-a-lock design.
//!
//! One consumer thread lives for a whole criterion sample and acknowledges each batch; the timer
//! covers sending the batch until that acknowledgement, so a thread start is never timed. The
//! batch's messages are built before the timer starts.

use std::collections::VecDeque;
use std::hint::black_box;
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Bencher, Criterion, Throughput};
use presenced::presence::{Aggregate, PresenceState};
use presenced::shard::mesh::MeshMsg;

const BATCH: usize = 10_000;
/// The config default of `mesh.inbox_capacity`.
const CAPACITY: usize = 64 * 1024;

fn batch() -> Vec<MeshMsg> {
    (0..BATCH as u64)
        .map(|seq| MeshMsg::Update {
            state: Arc::new(PresenceState {
                user: "user-4711".into(),
                status: Aggregate::Online,
                text: None,
                devices: 1,
                last_seen: None,
                ts: 1_700_000_000_000,
                seq,
            }),
            origin: std::time::Instant::now(),
        })
        .collect()
}

/// A bounded FIFO behind one lock; each side sleeps on its own condvar only when it must wait.
struct LockedQueue {
    state: Mutex<Queue>,
    not_empty: Condvar,
    not_full: Condvar,
}

struct Queue {
    items: VecDeque<MeshMsg>,
    consumer_waiting: bool,
    producer_waiting: bool,
}

impl LockedQueue {
    fn new() -> LockedQueue {
        LockedQueue {
            state: Mutex::new(Queue {
                items: VecDeque::with_capacity(CAPACITY),
                consumer_waiting: false,
                producer_waiting: false,
            }),
            not_empty: Condvar::new(),
            not_full: Condvar::new(),
        }
    }

    fn send(&self, msg: MeshMsg) {
        let mut q = self.state.lock().expect("no panics while locked");
        while q.items.len() >= CAPACITY {
            q.producer_waiting = true;
            q = self.not_full.wait(q).expect("no panics while locked");
        }
        q.items.push_back(msg);
        if q.consumer_waiting {
            q.consumer_waiting = false;
            self.not_empty.notify_one();
        }
    }

    fn recv(&self) -> MeshMsg {
        let mut q = self.state.lock().expect("no panics while locked");
        loop {
            if let Some(msg) = q.items.pop_front() {
                if q.producer_waiting {
                    q.producer_waiting = false;
                    self.not_full.notify_one();
                }
                return msg;
            }
            q.consumer_waiting = true;
            q = self.not_empty.wait(q).expect("no panics while locked");
        }
    }
}

/// Times `iters` batches from this thread through `send` to a consumer thread calling `recv`.
fn run(b: &mut Bencher, mut send: impl FnMut(MeshMsg), mut recv: impl FnMut() -> MeshMsg + Send) {
    b.iter_custom(|iters| {
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let recv = &mut recv;
        std::thread::scope(|s| {
            s.spawn(move || {
                for _ in 0..iters {
                    for _ in 0..BATCH {
                        match recv() {
                            MeshMsg::Update { state, .. } => drop(black_box(state)),
                            other => panic!("only updates are sent, got {other:?}"),
                        }
                    }
                    done_tx
                        .send(())
                        .expect("the producer waits for every batch");
                }
            });
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let msgs = batch();
                let start = Instant::now();
                for msg in msgs {
                    send(msg);
                }
                done_rx
                    .recv()
                    .expect("the consumer acknowledges every batch");
                total += start.elapsed();
            }
            total
        })
    });
}

fn throughput(c: &mut Criterion) {
    let mut g = c.benchmark_group("mesh/two_threads_10k");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("ours_flume_bounded", |b| {
        let (tx, rx) = flume::bounded(CAPACITY);
        run(
            b,
            |m| tx.send(m).expect("the receiver lives"),
            move || rx.recv().expect("the sender lives"),
        );
    });
    g.bench_function("std_mpsc_sync_channel", |b| {
        let (tx, rx) = mpsc::sync_channel(CAPACITY);
        run(
            b,
            |m| tx.send(m).expect("the receiver lives"),
            move || rx.recv().expect("the sender lives"),
        );
    });
    g.bench_function("mutex_vecdeque_condvar", |b| {
        let q = Arc::new(LockedQueue::new());
        let rq = Arc::clone(&q);
        run(b, |m| q.send(m), move || rq.recv());
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20);
    targets = throughput
}
criterion_main!(benches);
