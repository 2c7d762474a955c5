//! Presence history (SPEC §6, docs/HISTORY.md): every session start, session end and aggregate
//! change, recorded off the real-time path.
//!
//! Shards push [`Record`]s into one bounded `flume` channel and never wait: when it is full the
//! record is dropped and counted. A writer thread off the shard cores ([`writer`]) batches them
//! by size and time into the configured [`store`]: the embedded [`local`] store (redb, the
//! default) or ScyllaDB ([`scylla`]). Reads for the admin API go to the same thread over a second
//! channel and are answered by the shared, pure [`analytics`].

pub mod analytics;
pub mod event;
pub mod local;
pub mod schema;
pub mod scylla;
pub mod store;
pub mod writer;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;

pub use event::{EventKind, HistoryEvent, Sample};

use crate::config::{HistoryBackend, HistoryConfig};

/// What shards send the writer.
#[derive(Debug)]
pub enum Record {
    Event(HistoryEvent),
    Sample(Sample),
}

/// The writer's counters (it writes them; the admin port reads them).
#[derive(Debug, Default)]
pub struct HistoryMetrics {
    /// Events and samples the store acknowledged.
    pub written: AtomicU64,
    /// Records dropped because the queue was full (shards never wait).
    pub dropped_queue_full: AtomicU64,
    /// Records dropped after a batch failed `max_retries` times (or at the shutdown deadline).
    pub dropped_write_failed: AtomicU64,
    /// Failed write attempts.
    pub write_errors: AtomicU64,
    /// Write attempts that were retries.
    pub retries: AtomicU64,
    /// Batches written, and records in them (mean batch size = sum / count).
    pub batches: AtomicU64,
    pub batch_records: AtomicU64,
    /// Write latency per batch (fixed Prometheus buckets, and the max).
    pub write_latency: crate::metrics::AtomicBuckets,
    /// Records deleted by retention (local store).
    pub expired: AtomicU64,
    /// What the local store's file takes on disk (bytes), once known (`disk_bytes_known`).
    pub disk_bytes: AtomicU64,
    pub disk_bytes_known: AtomicBool,
    /// Compactions of the local store, and the bytes they gave back to the file system.
    pub compactions: AtomicU64,
    pub compaction_freed_bytes: AtomicU64,
    /// Queries answered.
    pub queries: AtomicU64,
}

impl HistoryMetrics {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }

    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Relaxed)
    }
}

/// A question for the history thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Query {
    /// A user's events in `[from, to]`, newest first.
    History {
        user: String,
        from: u64,
        to: u64,
        limit: usize,
    },
    Analytics {
        user: String,
        from: u64,
        to: u64,
    },
    Replay {
        from: u64,
        to: u64,
        step: u64,
        group: Option<String>,
    },
    At {
        t: u64,
        group: Option<String>,
        limit: usize,
    },
}

#[derive(Debug)]
pub enum Answer {
    Events(Vec<HistoryEvent>),
    Analytics(analytics::Analytics),
    Replay(Vec<analytics::ReplayPoint>),
    At { users: Vec<String>, total: u64 },
}

type Reply = flume::Sender<Result<Answer, String>>;

/// A shard's way into history: cheap to clone, never blocks.
#[derive(Clone, Debug)]
pub struct Sink {
    tx: Option<flume::Sender<Record>>,
    queries: Option<flume::Sender<(Query, Reply)>>,
    pub metrics: Arc<HistoryMetrics>,
}

impl Sink {
    /// A sink that records nothing (`history.backend = "off"`).
    pub fn off() -> Sink {
        Sink {
            tx: None,
            queries: None,
            metrics: Arc::default(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Queues a record, or drops and counts it when the queue is full.
    pub fn record(&self, r: Record) {
        if let Some(tx) = &self.tx {
            if tx.try_send(r).is_err() {
                HistoryMetrics::add(&self.metrics.dropped_queue_full, 1);
            }
        }
    }

    pub fn event(&self, e: HistoryEvent) {
        self.record(Record::Event(e));
    }

    /// Records waiting for the writer.
    pub fn queue_depth(&self) -> usize {
        self.tx.as_ref().map_or(0, flume::Sender::len)
    }

    /// Sends `q` to the writer thread; the answer arrives on the returned channel. `None` when
    /// history is off or the queue of questions is full.
    pub fn ask(&self, q: Query) -> Option<flume::Receiver<Result<Answer, String>>> {
        let queries = self.queries.as_ref()?;
        let (tx, rx) = flume::bounded(1);
        queries.try_send((q, tx)).ok()?;
        Some(rx)
    }
}

/// The running history pipeline: the shards' sink and the writer thread.
pub struct History {
    pub sink: Sink,
    stop: Option<flume::Sender<std::time::Duration>>,
    thread: Option<JoinHandle<()>>,
}

/// Questions waiting for the writer thread; more are refused (503) rather than queued.
const QUERY_QUEUE: usize = 64;

impl History {
    /// Opens the configured store and starts the writer thread. Errors name the config key.
    pub fn start(cfg: &HistoryConfig) -> Result<History, String> {
        Self::start_waiting(cfg, std::time::Duration::ZERO)
    }

    /// [`History::start`], for the new process of an upgrade: while the old process still
    /// holds the local store (redb allows one process at a time), events queue (bounded, as
    /// always) and the writer retries opening it for up to `wait`.
    pub fn start_waiting(
        cfg: &HistoryConfig,
        wait: std::time::Duration,
    ) -> Result<History, String> {
        if cfg.backend == HistoryBackend::Off {
            return Ok(History {
                sink: Sink::off(),
                stop: None,
                thread: None,
            });
        }
        let opened = match store::open(cfg) {
            Ok(o) => Some(o),
            Err(e) if wait.is_zero() => return Err(e),
            Err(e) => {
                tracing::info!(error = %e, "history: the store is busy (the old process of an upgrade still holds it); retrying");
                None
            }
        };
        let (tx, rx) = flume::bounded(cfg.queue_capacity);
        let (qtx, qrx) = flume::bounded(QUERY_QUEUE);
        let (stop_tx, stop_rx) = flume::bounded(1);
        let metrics = Arc::new(HistoryMetrics::default());
        let stopped = stop_rx.clone();
        let w = writer::Writer::new(cfg.clone(), rx, qrx, stop_rx, metrics.clone());
        let thread = std::thread::Builder::new()
            .name("history".into())
            .spawn({
                let cfg = cfg.clone();
                move || {
                    let opened = match opened {
                        Some(o) => o,
                        None => {
                            let deadline = std::time::Instant::now() + wait;
                            let mut said = false;
                            loop {
                                // Stopped before the store came free (the upgrade failed),
                                // or the handle is gone.
                                match stopped.recv_timeout(std::time::Duration::from_millis(100))
                                {
                                    Err(flume::RecvTimeoutError::Timeout) => {}
                                    _ => return,
                                }
                                match store::open(&cfg) {
                                    Ok(o) => break o,
                                    // Past the old process's drain and flush: say so once, and
                                    // keep trying (events queue, bounded, and the queue's
                                    // drops are counted as always).
                                    Err(e) if !said && std::time::Instant::now() >= deadline => {
                                        said = true;
                                        tracing::error!(error = %e,
                                            "history: the store is still not free after the upgrade; retrying");
                                    }
                                    Err(_) => {}
                                }
                            }
                        }
                    };
                    w.run(opened)
                }
            })
            .map_err(|e| format!("history: cannot start the writer thread: {e}"))?;
        Ok(History {
            sink: Sink {
                tx: Some(tx),
                queries: Some(qtx),
                metrics,
            },
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// Flushes what is queued (up to `deadline`) and stops the writer.
    pub fn stop(mut self, deadline: std::time::Duration) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(deadline);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
