//! The admin/stats port (SPEC §5, docs/ADMIN.md): health, Prometheus metrics, the JSON API, kicks,
//! and the live dashboard with its `/ws/admin` feed.
//!
//! Served by the shards themselves: every shard accepts on the admin listener (SO_REUSEPORT) and
//! answers a request by asking the shards that know (one, or all of them) over the mesh and
//! merging their answers. No global lock, no extra thread pool.
//!
//! - [`http`]: request parsing and responses (pure).
//! - [`query`]: the questions shards answer, their shard-side evaluation and the merges.
//! - [`changes`]: each shard's bounded log of recent presence changes, for the live feed (pure).
//! - [`prom`]: Prometheus text exposition (pure).
//! - [`api`]: routes and auth.
//! - [`server`]: the accept loop and HTTP/1.1 connections.
//! - [`feed`]: `/ws/admin`, the dashboard's live WebSocket.
//! - [`assets`]: the dashboard page, embedded at compile time.
//! - [`series`]: the 15-minute time series the dashboard charts.

pub mod api;
pub mod assets;
pub mod changes;
pub mod feed;
pub mod http;
pub mod prom;
pub mod query;
pub mod series;
pub mod server;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::metrics::{PeerCounters, ShardMetrics};

/// What every shard's admin server reads about the whole process: the counters of every shard
/// (atomics, written only by their own shard) and start-up facts. Nothing here is locked.
#[derive(Debug)]
pub struct Shared {
    pub started: Instant,
    pub started_ms: u64,
    pub metrics: Vec<Arc<ShardMetrics>>,
    /// Per shard: messages sent to each peer.
    pub mesh_pairs: Vec<Arc<PeerCounters>>,
    pub cpus: Vec<Option<usize>>,
    /// Shards that are accepting connections (`/readyz`).
    pub accepting: AtomicUsize,
    /// Set when shutdown begins (`/readyz` turns 503 so load balancers stop sending).
    pub stopping: AtomicBool,
    /// History's queue and counters.
    pub history: crate::history::Sink,
}

impl Shared {
    pub fn new(
        metrics: Vec<Arc<ShardMetrics>>,
        cpus: Vec<Option<usize>>,
        history: crate::history::Sink,
    ) -> Shared {
        let shards = metrics.len();
        Shared {
            started: Instant::now(),
            started_ms: crate::shard::now_ms(),
            mesh_pairs: (0..shards)
                .map(|_| Arc::new(PeerCounters::new(shards)))
                .collect(),
            metrics,
            cpus,
            accepting: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            history,
        }
    }

    pub fn shards(&self) -> usize {
        self.metrics.len()
    }

    pub fn ready(&self) -> bool {
        self.accepting.load(Ordering::Acquire) == self.shards()
            && !self.stopping.load(Ordering::Acquire)
    }
}

/// The server's version, as reported by `/api/stats` and `presenced_build_info`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
