//! Wiring: the one place that knows every part. Starts the history pipeline, the shards, and on
//! every shard the WebSocket edge, the admin port and history's tap; returns a handle to stop
//! it all. Tests call [`start`] with port 0 and get a real server in one line.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use crate::auth::Verifier;
use crate::config::ValidConfig;
use crate::history::{EventKind, History, HistoryEvent, Record, Sample, Sink};
use crate::metrics::MetricsSnapshot;
use crate::presence::handover::UserRecord;
use crate::shard::runtime::{self, plan_cpus, Init, Shards, Shared, Stop};
use crate::shard::tap::{SessionTap, Tap};
use crate::shard::{now_ms, Shard};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Tls(String),
    #[error("{0}")]
    Placement(String),
    #[error("{0}")]
    History(String),
    #[error("{0}")]
    Cluster(String),
    #[error("{0}")]
    Geo(String),
    #[error("shard {shard} failed to start: {why}")]
    Shard { shard: usize, why: String },
}

/// A running server: its addresses, and a way to stop it.
pub struct ServerHandle {
    /// The `listen` address (TLS when `[tls]` is set without `tls.listen`).
    pub addr: SocketAddr,
    /// The TLS listener's address, when TLS is on.
    pub tls_addr: Option<SocketAddr>,
    /// The admin port's address, when it is enabled.
    pub admin_addr: Option<SocketAddr>,
    shards: Shards,
    /// `[[webhooks]]`, when configured: stopped after the shards (their taps hold it).
    webhooks: Option<Arc<crate::webhooks::sender::Webhooks>>,
    history: Option<History>,
    cluster: Option<crate::cluster::Cluster>,
    flush_deadline: Duration,
    /// Feeds systemd's watchdog while every shard makes progress (when systemd asked).
    watchdog: Option<crate::ops::watchdog::Watchdog>,
}

impl ServerHandle {
    /// Per-shard counters, read from another thread.
    pub fn metrics(&self) -> Vec<MetricsSnapshot> {
        self.shards.shared.snapshots()
    }

    pub fn metrics_total(&self) -> MetricsSnapshot {
        MetricsSnapshot::sum(&self.metrics())
    }

    /// Every webhook's counters, in `[[webhooks]]` order.
    pub fn webhook_stats(&self) -> Vec<Arc<crate::webhooks::sender::Stats>> {
        self.webhooks
            .as_ref()
            .map(|w| w.stats())
            .unwrap_or_default()
    }

    /// History's counters (queue depth through the admin port).
    pub fn history_metrics(&self) -> Option<&crate::history::HistoryMetrics> {
        self.history.as_ref().map(|h| &*h.sink.metrics)
    }

    /// Reads `geo.database` again (SIGHUP): `None` when there is none configured; an error
    /// leaves the database loaded before in service.
    pub fn reload_geo(&self) -> Option<Result<(), String>> {
        self.shards.shared.geo.as_ref().map(|g| g.reload())
    }

    /// Asks every shard to stop: no new connections, sessions closed with 1001.
    pub fn begin_shutdown(&self) {
        self.shards.begin_shutdown();
    }

    /// Waits for every shard thread to finish, then flushes history (within
    /// `history.flush_deadline_ms`).
    pub fn join(mut self) {
        if let Some(w) = self.watchdog.take() {
            w.stop();
        }
        self.shards.join();
        if let Some(w) = self.webhooks.take() {
            // After the shards: their last events (sessions closed at shutdown) are offered.
            w.stop(self.flush_deadline);
        }
        // After the shards: their last changes (sessions closed at shutdown) go out first.
        if let Some(mut c) = self.cluster.take() {
            c.stop();
        }
        if let Some(h) = self.history.take() {
            h.stop(self.flush_deadline);
        }
    }

    pub fn shutdown(self) {
        self.begin_shutdown();
        self.join();
    }

    /// Tests only: runs `f` on shard `shard` and waits for it.
    #[cfg(feature = "fault-injection")]
    pub fn run_on(&self, shard: usize, f: impl FnOnce(&Rc<Shard>) + Send + 'static) {
        let (tx, rx) = std::sync::mpsc::channel();
        self.shards.send_job(
            shard,
            Box::new(move |s: &Rc<Shard>| {
                f(s);
                let _ = tx.send(());
            }),
        );
        rx.recv().expect("the shard ran the job");
    }

    /// An upgrade's new process, once it has said READY: every shard starts accepting on its
    /// share of the old process's sockets (a server started by [`start`] accepts from the
    /// start). Sockets no shard takes (an address the new configuration dropped) are let go.
    pub fn start_accepting(&self) {
        self.doors().on_each(|s| s.relisten());
        for left in self.shards.shared.sockets.take_unclaimed() {
            tracing::warn!(role = left.role, addr = %left.addr,
                "upgrade: the old process listened here and this configuration does not; \
                 connections waiting there are refused when it exits");
        }
    }

    /// A handle for drivers outside the shards (the upgrade) to reach them.
    pub fn doors(&self) -> Doors {
        Doors {
            inboxes: self.shards.doors(),
            shared: self.shards.shared.clone(),
            cluster: self.cluster.as_ref().map(crate::cluster::Cluster::handle),
        }
    }
}

/// What the new process of an upgrade starts from: the old process's listening sockets and its
/// presence (docs/OPERATIONS.md).
#[derive(Default)]
pub struct Takeover {
    pub sockets: Vec<crate::net::Listening>,
    pub records: Vec<UserRecord>,
    /// In a cluster: the old process's bus identity.
    pub bus: Option<crate::cluster::handoff::Hello>,
}

/// The shards' doors, for a driver on another thread (the upgrade): cheap to clone, `Send`.
#[derive(Clone)]
pub struct Doors {
    inboxes: Vec<flume::Sender<crate::shard::mesh::MeshMsg>>,
    shared: Arc<Shared>,
    cluster: Option<crate::cluster::Handle>,
}

impl Doors {
    fn send(&self, shard: usize, job: crate::shard::mesh::Job) -> bool {
        self.inboxes[shard]
            .send(crate::shard::mesh::MeshMsg::Invoke(job))
            .is_ok()
    }

    /// The cluster bridge, when the node is in a cluster.
    pub fn cluster(&self) -> Option<&crate::cluster::Handle> {
        self.cluster.as_ref()
    }

    /// Shards running.
    pub fn shard_count(&self) -> usize {
        self.shared.shards()
    }

    /// Runs `f` on every shard and returns what each answered, in shard order (`None` for a
    /// shard that stopped). For drivers outside the shards (the upgrade).
    pub fn on_each<R: Send + 'static>(
        &self,
        f: impl Fn(&Rc<Shard>) -> R + Send + Sync + 'static,
    ) -> Vec<Option<R>> {
        let f = Arc::new(f);
        let waits: Vec<_> = (0..self.shard_count())
            .map(|ix| {
                let (tx, rx) = std::sync::mpsc::channel();
                let f = f.clone();
                let sent = self.send(
                    ix,
                    Box::new(move |s: &Rc<Shard>| {
                        let _ = tx.send(f(s));
                    }),
                );
                sent.then_some(rx)
            })
            .collect();
        waits
            .into_iter()
            .map(|rx| rx.and_then(|rx| rx.recv().ok()))
            .collect()
    }

    /// Sends `f` to the shard that owns `user` (without waiting).
    pub fn on_owner(&self, user: &str, f: impl FnOnce(&Rc<Shard>) + Send + 'static) {
        let ix = crate::shard::owner_of(user, self.shard_count());
        self.send(usize::from(ix), Box::new(f));
    }

    /// The listening sockets served go back to the shards to take again (`Shard::relisten`).
    pub fn reclaim_sockets(&self) {
        self.shared.sockets.reclaim();
    }

    /// Duplicates of the listening sockets (for an upgrade's new process).
    pub fn listening(&self) -> std::io::Result<Vec<crate::net::Listening>> {
        self.shared.sockets.serving()
    }
}

/// Starts the server and returns once every shard is accepting.
pub fn start(cfg: ValidConfig, verifier: Verifier) -> Result<ServerHandle, StartError> {
    start_with(cfg, verifier, Takeover::default())
}

/// [`start`], taking over from an upgrade's old process: its sockets are served instead of
/// binding anew (so no connection is refused in the switch), and its users are adopted on
/// their owner shards before any connection is accepted.
pub fn start_with(
    cfg: ValidConfig,
    verifier: Verifier,
    mut takeover: Takeover,
) -> Result<ServerHandle, StartError> {
    let shards = cfg.shard_count();
    let cpus = plan_cpus(&cfg, shards).map_err(StartError::Placement)?;
    let secure = crate::edge::tls::load(&cfg.tls).map_err(|e| StartError::Tls(e.0))?;
    // What listens where: plain on `listen`, TLS on `tls.listen`; with TLS but no `tls.listen`,
    // `listen` itself speaks TLS.
    let mut wanted: Vec<(SocketAddr, Option<Arc<rustls::ServerConfig>>)> = Vec::new();
    match (&secure, cfg.tls.listen) {
        (None, _) => wanted.push((cfg.listen, None)),
        (Some(tls), None) => wanted.push((cfg.listen, Some(tls.clone()))),
        (Some(tls), Some(tls_addr)) => {
            wanted.push((cfg.listen, None));
            wanted.push((tls_addr, Some(tls.clone())));
        }
    }
    let takeover_mode = !takeover.sockets.is_empty();
    // Before anything that would need undoing: a missing or corrupt database stops start-up.
    let geo = match &cfg.geo.database {
        Some(path) => Some(Arc::new(
            crate::geo::Geo::open(path).map_err(StartError::Geo)?,
        )),
        None => None,
    };
    let mut shared = Shared::new(cpus);
    shared.geo = geo;
    shared.sockets.inherit(takeover.sockets);
    // A socket inherited from the old process serves its address; any other is reserved here.
    let mut reserved = Vec::new();
    let mut reserve = |role: &str, want: SocketAddr| {
        if let Some(addr) = shared.sockets.inherited_addr(role, want) {
            return Ok(addr);
        }
        let (sock, addr) = crate::net::reserve_port(want)
            .map_err(|source| StartError::Listen { addr: want, source })?;
        reserved.push(sock);
        Ok::<_, StartError>(addr)
    };
    let mut listeners = Vec::new();
    for (want, tls) in wanted {
        let role = if tls.is_some() { "wss" } else { "ws" };
        listeners.push((reserve(role, want)?, tls));
    }
    let addr = listeners[0].0;
    let tls_addr = listeners.iter().find(|l| l.1.is_some()).map(|l| l.0);
    let admin_addr = if cfg.admin.enabled {
        Some(reserve("admin", cfg.admin.listen)?)
    } else {
        None
    };
    let admin_tls = if cfg.admin.tls { secure.clone() } else { None };

    let history = if takeover_mode {
        // The old process lets go of the store when it exits, after its drain.
        let wait = cfg.drain_ms + cfg.shutdown_deadline_ms + cfg.history.flush_deadline_ms + 30_000;
        History::start_waiting(&cfg.history, Duration::from_millis(wait))
    } else {
        History::start(&cfg.history)
    }
    .map_err(StartError::History)?;
    let mut cluster = None;
    if let Some(cc) = &cfg.cluster {
        let scheme = if admin_tls.is_some() { "https" } else { "http" };
        let admin_url = admin_addr.map(|a| format!("{scheme}://{a}"));
        // An upgrade's new process speaks for the old one's node (docs/OPERATIONS.md).
        let inherited = takeover.bus.and_then(|hello| {
            let id = crate::cluster::Identity::inherit(cc, admin_url.clone(), &hello);
            if id.is_none() {
                tracing::warn!(old = %hello.node_id, "upgrade: cluster.node_id changed; \
                    joining as a new node (the old one leaves the cluster when it exits)");
            }
            id.map(|id| (id, hello))
        });
        let (id, inherit) = match inherited {
            Some((id, hello)) => (id, Some(hello)),
            None => {
                // A node of its own: its shares are its own too, stamped and published anew
                // (the old process's clocks belong to the old node id).
                for rec in &mut takeover.records {
                    rec.share = None;
                }
                (crate::cluster::Identity::new(cc, admin_url), None)
            }
        };
        match crate::cluster::Cluster::start(cc, id, shards, inherit, !cfg.webhooks.is_empty()) {
            Ok((c, link)) => {
                shared.cluster = Some(link);
                cluster = Some(c);
            }
            Err(why) => {
                history.stop(Duration::ZERO);
                return Err(StartError::Cluster(why));
            }
        }
    }
    let status = cluster.as_ref().map(|c| c.status.clone());
    if let (Some(status), true) = (&status, admin_addr.is_some()) {
        // Other nodes' admin questions are answered by this node's admin port code.
        status.serve_admin_with(crate::admin::api::cluster::serve_call);
    }
    let shared = Arc::new(shared);
    let sink = history.sink.clone();
    let webhooks = (!cfg.webhooks.is_empty())
        .then(|| Arc::new(crate::webhooks::sender::Webhooks::start(&cfg.webhooks)));
    let hooks = webhooks.clone();
    let hook_stats = webhooks.as_ref().map(|w| w.stats()).unwrap_or_default();
    let webhook_seed = crate::shard::now_ms();
    let webhook_node: Option<Arc<str>> = status.as_ref().map(|s| Arc::from(s.node_id.as_str()));
    // The old process's users, each on its owner shard here.
    let mut adopt: Vec<Vec<UserRecord>> = (0..shards).map(|_| Vec::new()).collect();
    for rec in takeover.records {
        adopt[usize::from(crate::shard::owner_of(&rec.user, shards))].push(rec);
    }
    let adopt: Arc<Vec<std::sync::Mutex<Vec<UserRecord>>>> =
        Arc::new(adopt.into_iter().map(std::sync::Mutex::new).collect());
    let init: Init = Arc::new(move |shard: &Rc<Shard>| {
        // Before the first accept, so no client sees a handed-over user missing.
        let records = std::mem::take(
            &mut *adopt[usize::from(shard.ix())]
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        shard
            .adopt(&records)
            .map_err(|e| format!("the old process's state: {e}"))?;
        let edge = crate::edge::Edge::new(shard.clone());
        if admin_addr.is_some() {
            crate::admin::prepare(shard, sink.clone(), status.clone(), hook_stats.clone());
        }
        // The listeners: at once, or, in an upgrade's new process, once it has taken over
        // ([`ServerHandle::start_accepting`]): until then the old process accepts, and a
        // takeover that fails cuts nobody. Kept, to accept again should an upgrade's new
        // process die after this one stopped.
        let (listeners, admin_tls) = (listeners.clone(), admin_tls.clone());
        let listen: crate::shard::handover::Relisten = Box::new(move |shard: &Rc<Shard>| {
            let mut stops = edge.listen(&listeners)?;
            if let Some(admin) = admin_addr {
                stops.push(crate::admin::listen(shard, admin, admin_tls.clone())?);
            }
            Ok(stops)
        });
        let stops: Vec<Stop> = if takeover_mode {
            Vec::new()
        } else {
            listen(shard)?
        };
        shard.keep_relisten(listen);
        if let Some(h) = &hooks {
            crate::webhooks::install(shard, h.clone(), webhook_node.clone(), webhook_seed);
        }
        if sink.enabled() {
            install_history(shard, sink.clone());
        }
        Ok(stops)
    });
    let running = match runtime::spawn(cfg.clone(), Arc::new(verifier), shared, init) {
        Ok(r) => r,
        Err((shard, why)) => {
            history.stop(Duration::ZERO);
            return Err(StartError::Shard { shard, why });
        }
    };
    drop(reserved);
    if let Some(c) = &mut cluster {
        c.attach(running.doors(), running.shared.clone());
        // An upgrade's new process: its watchers' state from the other nodes before anyone
        // is accepted (a no-op otherwise).
        let wait = cfg.cluster.as_ref().map_or(0, |cc| cc.request_timeout_ms) + 500;
        if takeover_mode && !c.wait_warm(Duration::from_millis(wait)) {
            tracing::warn!("upgrade: the other nodes' state did not all arrive in time");
        }
    }
    let cpus = &running.shared.cpus;
    tracing::info!(%addr, ?tls_addr, shards, ?cpus, "accepting WebSocket connections");
    if let Some(a) = admin_addr {
        tracing::info!(admin = %a, "admin port (API, /metrics, dashboard) listening");
    }
    let watchdog = crate::ops::watchdog::Watchdog::start(&running);
    Ok(ServerHandle {
        addr,
        tls_addr,
        admin_addr,
        shards: running,
        webhooks,
        flush_deadline: Duration::from_millis(cfg.history.flush_deadline_ms),
        history: Some(history),
        cluster,
        watchdog,
    })
}

/// History on one shard: a tap that turns sessions and changes into history events (queued,
/// never waited for), and on shard 0 the sampler of online counts.
fn install_history(shard: &Rc<Shard>, sink: Sink) {
    let events = sink.clone();
    shard.add_tap(Box::new(move |t: &Tap<'_>| events.event(history_event(t))));
    if shard.ix() == 0 {
        glommio::spawn_local(sample_online(shard.clone(), sink)).detach();
    }
}

/// The history record of a tapped event.
fn history_event(t: &Tap<'_>) -> HistoryEvent {
    match t {
        Tap::SessionStart(s) => session_event(EventKind::SessionStart, s),
        Tap::SessionEnd(s) => session_event(EventKind::SessionEnd, s),
        Tap::Change(state, _) => {
            let mut e = HistoryEvent::new(state.ts, state.user.clone(), EventKind::Status);
            e.status = Some(state.status);
            e.text = state.text.clone();
            e.devices = Some(state.devices);
            e.seq = state.seq;
            e
        }
    }
}

/// The history record of a session's start or end.
fn session_event(kind: EventKind, s: &SessionTap<'_>) -> HistoryEvent {
    let info = s.info;
    let mut e = HistoryEvent::new(s.now, s.user.clone(), kind);
    e.session = s.session;
    e.started_at = info.connected_at_ms;
    e.device = info.device.clone();
    e.device_type = Some(info.device_type);
    e.region = info.region.clone();
    e.groups = info.groups.clone();
    e
}

/// Shard 0's history sampler: every `history.sample_interval_s`, the online count and the
/// largest groups' member counts, map-reduced over the shards, recorded for replay.
async fn sample_online(shard: Rc<Shard>, sink: Sink) {
    let every = Duration::from_secs(shard.cfg().history.sample_interval_s);
    let max_groups = shard.cfg().history.max_groups_per_sample;
    let deadline = Duration::from_millis(shard.cfg().admin.query_timeout_ms);
    while !shard.stopping() {
        glommio::timer::sleep(every).await;
        let ((online, mut groups), answered) = shard
            .map_reduce(
                deadline,
                move |s: &Rc<Shard>| {
                    let online = s.registry().online_users() as u64;
                    (online, s.groups().largest(max_groups))
                },
                (0u64, Vec::new()),
                |(online, mut groups), _, (n, g)| {
                    groups.extend(g);
                    (online + n, groups)
                },
            )
            .await;
        if !answered.complete() {
            continue; // a partial count would read as a drop in the replay
        }
        groups.sort_unstable_by(crate::presence::groups::largest_first);
        groups.truncate(max_groups);
        sink.record(Record::Sample(Sample {
            ts: now_ms(),
            online,
            groups,
        }));
    }
}
