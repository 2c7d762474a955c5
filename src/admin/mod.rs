//! The admin/stats port (SPEC §5, docs/ADMIN.md): health, Prometheus metrics, the JSON API, kicks,
//! and the live dashboard with its `/ws/admin` feed.
//!
//! Served by the shards themselves: every shard accepts on the admin listener (SO_REUSEPORT) and
//! answers a request by asking the shards that know (one, or all of them) through the shard's
//! generic `invoke_on`/`map_reduce`, and merging their answers. No global lock, no extra thread
//! pool, and no admin message type in the shard: each question is a closure, written where it
//! is asked.
//!
//! - [`http`]: request parsing and responses (pure).
//! - [`query`]: what a shard answers (read from its registry, groups and sessions) and how the
//!   answers of all shards merge into one; scans walk in chunks and yield.
//! - [`api`]: routes, auth, parameters and the map-reduces behind them.
//! - [`changes`]: each shard's bounded log of recent presence changes, for the live feed (pure).
//! - [`series`]: the 15-minute time series the dashboard charts (sampled on shard 0).
//! - [`prom`]: Prometheus text exposition (pure).
//! - [`server`]: the accept loop and HTTP/1.1 connections, with their pool.
//! - [`feed`]: `/ws/admin`, the dashboard's live WebSocket.
//! - [`assets`]: the dashboard page, embedded at compile time.

pub mod api;
pub mod assets;
pub mod changes;
pub mod feed;
pub mod http;
pub mod prom;
pub mod query;
pub mod series;
pub mod server;

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;

use crate::history::Sink;
use crate::shard::runtime::Stop;
use crate::shard::tap::Tap;
use crate::shard::{now_ms, Shard};
use changes::ChangeLog;
use series::Series;

/// The server's version, as reported by `/api/stats` and `presenced_build_info`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The admin port's per-shard state (kept in the shard's locals, found by type).
pub struct AdminLocal {
    /// Recent presence changes of this shard's users, for the dashboards' live feed.
    pub changes: RefCell<ChangeLog>,
    /// The dashboard's time series (sampled on shard 0 only).
    pub series: RefCell<Series>,
    /// This shard's admin connections (the pool).
    pub pool: RefCell<server::Pool>,
    /// Connections in the reserved probe slots (`admin.probe_connections`).
    pub probes: std::cell::Cell<usize>,
    /// History's queue, counters and questions.
    pub history: Sink,
    /// The cluster's state, when the node runs in one.
    pub cluster: Option<Arc<crate::cluster::Status>>,
    /// Every webhook's counters and health, in `[[webhooks]]` order.
    pub webhooks: Vec<Arc<crate::webhooks::sender::Stats>>,
}

impl AdminLocal {
    /// The admin state of `shard` (installed at start-up on every shard that serves the port).
    pub fn of(shard: &Shard) -> Rc<AdminLocal> {
        shard
            .local::<AdminLocal>()
            .expect("admin::prepare runs on every shard before it serves the admin port")
    }
}

/// Accepts admin connections on this shard's share of `addr` (again, after an upgrade that
/// failed late: `Shard::relisten`). Returns how to stop.
pub fn listen(
    shard: &Rc<Shard>,
    addr: SocketAddr,
    tls: Option<Arc<ServerConfig>>,
) -> Result<Stop, String> {
    crate::net::serve(shard, "admin", addr, |listener, stop| {
        server::accept_loop(shard.clone(), listener, tls.clone(), stop)
    })
}

/// Sets the admin port up on one shard: its state, the change-log tap and (on shard 0) the
/// dashboard's sampler. The listener is [`listen`]'s (an upgrade's new process starts it only
/// once it has taken over).
pub fn prepare(
    shard: &Rc<Shard>,
    history: Sink,
    cluster: Option<Arc<crate::cluster::Status>>,
    webhooks: Vec<Arc<crate::webhooks::sender::Stats>>,
) {
    let cfg = &shard.cfg().admin;
    let local = Rc::new(AdminLocal {
        changes: RefCell::new(ChangeLog::new(cfg.change_log)),
        series: RefCell::new(Series::default()),
        pool: RefCell::new(server::Pool::default()),
        probes: std::cell::Cell::new(0),
        history,
        cluster,
        webhooks,
    });
    shard.insert_local(local.clone());
    let log = local.clone();
    shard.add_tap(Box::new(move |t: &Tap<'_>| {
        if let Tap::Change(state, _) = t {
            log.changes.borrow_mut().record((*state).clone());
        }
    }));
    if shard.ix() == 0 {
        glommio::spawn_local(sample_series(shard.clone())).detach();
    }
}

/// Shard 0 samples the dashboard's series every second: every shard's counters (atomics, read
/// directly) and the recent fan-out latency (one map-reduce).
async fn sample_series(shard: Rc<Shard>) {
    let local = AdminLocal::of(&shard);
    let deadline = Duration::from_millis(shard.cfg().admin.query_timeout_ms);
    while !shard.stopping() {
        glommio::timer::sleep(Duration::from_secs(1)).await;
        let (recent, _) = shard
            .map_reduce(
                deadline,
                |s: &Rc<Shard>| s.latency().recent(),
                crate::metrics::latency_histogram(),
                |mut acc, _, h| {
                    let _ = acc.add(&h);
                    acc
                },
            )
            .await;
        let snaps = shard.shared().snapshots();
        let p = crate::metrics::Percentiles::of(&recent);
        local
            .series
            .borrow_mut()
            .sample(now_ms(), snaps, p.p50, p.p99);
    }
}
