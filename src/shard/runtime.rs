//! Starting and stopping the shards: one glommio executor per shard, each with its own
//! SO_REUSEPORT listener and mesh inbox.

use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::rc::Rc;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use glommio::{LocalExecutorBuilder, Placement as GPlacement, PoolPlacement};
use socket2::{Domain, Protocol, Socket, Type};

use super::mesh::{Mesh, MeshMsg};
use super::{now_ms, Shard};
use std::sync::atomic::Ordering;

use crate::admin::query::{AdminReq, AdminResp};
use crate::admin::{self, Shared};
use crate::auth::Verifier;
use crate::config::{parse_cpu_list, Config, Placement};
use crate::edge::accept;
use crate::edge::conn::CloseRequest;
use crate::history::History;
use crate::metrics::{MetricsSnapshot, ShardMetrics};

/// Memory glommio registers with io_uring per shard. We do no file DMA, so the minimum will do
/// (and stays well inside small `RLIMIT_MEMLOCK` budgets).
const IO_MEMORY: usize = 64 * 1024;
/// Mesh messages handled per wake-up before yielding to connections.
const INBOX_BATCH: usize = 256;
/// Listen backlog per shard.
const LISTEN_BACKLOG: i32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Tls(String),
    #[error("cpu placement: {0}")]
    Placement(String),
    #[error("{0}")]
    History(String),
    #[error("shard {shard} failed to start: {why}")]
    Shard { shard: usize, why: String },
}

/// A running server: its address, and a way to stop it.
pub struct ServerHandle {
    /// The `listen` address (TLS when `[tls]` is set without `tls.listen`).
    pub addr: SocketAddr,
    /// The TLS listener's address, when TLS is on.
    pub tls_addr: Option<SocketAddr>,
    /// The admin port's address, when it is enabled.
    pub admin_addr: Option<SocketAddr>,
    /// CPU of each shard (None = unpinned).
    pub cpus: Vec<Option<usize>>,
    shared: Arc<Shared>,
    history: Option<History>,
    flush_deadline: Duration,
    inboxes: Vec<flume::Sender<MeshMsg>>,
    threads: Vec<glommio::ExecutorJoinHandle<()>>,
    metrics: Vec<Arc<ShardMetrics>>,
}

impl ServerHandle {
    pub fn shards(&self) -> usize {
        self.inboxes.len()
    }

    /// Per-shard counters, read from another thread.
    pub fn metrics(&self) -> Vec<MetricsSnapshot> {
        self.metrics.iter().map(|m| m.snapshot()).collect()
    }

    pub fn metrics_total(&self) -> MetricsSnapshot {
        MetricsSnapshot::sum(&self.metrics())
    }

    /// Asks every shard to stop: no new connections, sessions closed with 1001.
    pub fn begin_shutdown(&self) {
        self.shared.stopping.store(true, Ordering::Release);
        for inbox in &self.inboxes {
            let _ = inbox.send(MeshMsg::Shutdown);
        }
    }

    /// Waits for every shard thread to finish, then flushes history (within
    /// `history.flush_deadline_ms`).
    pub fn join(mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Some(h) = self.history.take() {
            h.stop(self.flush_deadline);
        }
    }

    /// History's counters (queue depth through the admin port).
    pub fn history_metrics(&self) -> Option<&crate::history::HistoryMetrics> {
        self.history.as_ref().map(|h| &*h.sink.metrics)
    }

    pub fn shutdown(self) {
        self.begin_shutdown();
        self.join();
    }
}

/// The CPU each shard is pinned to, per the configured placement.
pub fn plan_cpus(cfg: &Config, shards: usize) -> Result<Vec<Option<usize>>, StartError> {
    let err = |e: glommio::GlommioError<()>| StartError::Placement(e.to_string());
    if !cfg.cpus.is_empty() && cfg.placement != Placement::Unbound {
        let list = parse_cpu_list(&cfg.cpus).map_err(StartError::Placement)?;
        return Ok((0..shards).map(|i| Some(list[i % list.len()])).collect());
    }
    let pool = match cfg.placement {
        Placement::Unbound => return Ok(vec![None; shards]),
        Placement::Fixed => unreachable!("validate() requires cpus for fixed placement"),
        Placement::MaxSpread => PoolPlacement::MaxSpread(shards, None),
        Placement::MaxPack => PoolPlacement::MaxPack(shards, None),
    };
    let mut gen = pool.generate_cpu_set().map_err(err)?;
    Ok((0..shards)
        .map(|_| gen.next().cpu_binding().and_then(|c| c.into_iter().next()))
        .collect())
}

/// Binds the listener socket a shard accepts on.
fn bind(addr: SocketAddr, listen: bool) -> std::io::Result<Socket> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    if listen {
        sock.listen(LISTEN_BACKLOG)?;
    }
    Ok(sock)
}

/// Reserves `want` for the shards: refuses a port another process holds (SO_REUSEPORT would
/// otherwise let a second instance share it silently and split the users between two servers),
/// then binds it without listening — port 0 becomes a real port that every shard can bind, and a
/// non-listening socket receives no connections. Dropped once all shards listen.
fn reserve_port(want: SocketAddr) -> Result<(Socket, SocketAddr), StartError> {
    let fail = |source| StartError::Listen { addr: want, source };
    if want.port() != 0 {
        let probe = Socket::new(Domain::for_address(want), Type::STREAM, None).map_err(fail)?;
        probe.set_reuse_address(true).map_err(fail)?;
        probe.bind(&want.into()).map_err(fail)?;
    }
    let reserve = bind(want, false).map_err(fail)?;
    let addr = reserve
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .unwrap_or(want);
    Ok((reserve, addr))
}

/// Starts the shards and returns once every one is accepting.
pub fn start(cfg: Config, verifier: Verifier) -> Result<ServerHandle, StartError> {
    let shards = cfg.shard_count();
    let cpus = plan_cpus(&cfg, shards)?;
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
    let mut reserved = Vec::new();
    let mut listeners = Vec::new();
    for (want, tls) in wanted {
        let (reserve, addr) = reserve_port(want)?;
        reserved.push(reserve);
        listeners.push((addr, tls));
    }
    let addr = listeners[0].0;
    let tls_addr = listeners.iter().find(|l| l.1.is_some()).map(|l| l.0);
    let admin_addr = if cfg.admin.enabled {
        let (reserve, admin_addr) = reserve_port(cfg.admin.listen)?;
        reserved.push(reserve);
        Some(admin_addr)
    } else {
        None
    };

    let cfg = Arc::new(cfg);
    let verifier = Arc::new(verifier);
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..shards)
        .map(|_| flume::bounded::<MeshMsg>(cfg.mesh.inbox_capacity))
        .unzip();
    let metrics: Vec<Arc<ShardMetrics>> = (0..shards).map(|_| Arc::default()).collect();
    let history = History::start(&cfg.history).map_err(StartError::History)?;
    let shared = Arc::new(Shared::new(
        metrics.clone(),
        cpus.clone(),
        history.sink.clone(),
    ));
    let (ready_tx, ready_rx) = mpsc::channel::<Result<usize, (usize, String)>>();
    let mut threads = Vec::with_capacity(shards);
    for (ix, inbox) in receivers.into_iter().enumerate() {
        let placement = cpus[ix].map_or(GPlacement::Unbound, GPlacement::Fixed);
        let listeners = listeners.clone();
        let sink = history.sink.clone();
        let admin_tls = if cfg.admin.tls { secure.clone() } else { None };
        let (cfg, verifier, peers, shared, ready) = (
            cfg.clone(),
            verifier.clone(),
            senders.clone(),
            shared.clone(),
            ready_tx.clone(),
        );
        let cpu = cpus[ix];
        let handle = LocalExecutorBuilder::new(placement)
            .name(&format!("shard-{ix}"))
            .io_memory(IO_MEMORY)
            .spawn(move || async move {
                let mut bound = Vec::new();
                for (addr, tls) in listeners {
                    match bind(addr, true) {
                        // SAFETY: a freshly bound, listening socket whose ownership moves here.
                        Ok(s) => bound.push((
                            unsafe { glommio::net::TcpListener::from_raw_fd(s.into_raw_fd()) },
                            tls,
                        )),
                        Err(e) => {
                            let _ = ready.send(Err((ix, format!("listen on {addr}: {e}"))));
                            return;
                        }
                    }
                }
                let admin_listener = match admin_addr.map(|a| (a, bind(a, true))) {
                    None => None,
                    // SAFETY: as above.
                    Some((_, Ok(s))) => {
                        Some(unsafe { glommio::net::TcpListener::from_raw_fd(s.into_raw_fd()) })
                    }
                    Some((a, Err(e))) => {
                        let _ = ready.send(Err((ix, format!("admin listen on {a}: {e}"))));
                        return;
                    }
                };
                let ix16 = u16::try_from(ix).expect("validate() caps shards at u16::MAX");
                let mesh = Mesh::new(
                    peers,
                    cfg.mesh.overflow_max,
                    shared.metrics[ix].clone(),
                    shared.mesh_pairs[ix].clone(),
                );
                let shard = Rc::new(Shard::new(
                    ix16,
                    cpu,
                    cfg,
                    verifier,
                    mesh,
                    shared.clone(),
                    sink,
                ));
                let mut stops = Vec::new();
                for (listener, tls) in bound {
                    let (stop_tx, stop_rx) = glommio::channels::local_channel::new_bounded(1);
                    let accepting =
                        accept::accept_loop(shard.clone(), listener, tls, Rc::new(stop_rx));
                    glommio::spawn_local(accepting).detach();
                    stops.push(stop_tx);
                }
                if let Some(listener) = admin_listener {
                    let (stop_tx, stop_rx) = glommio::channels::local_channel::new_bounded(1);
                    let serving = admin::server::accept_loop(
                        shard.clone(),
                        listener,
                        admin_tls.clone(),
                        Rc::new(stop_rx),
                    );
                    glommio::spawn_local(serving).detach();
                    glommio::spawn_local(admin_ticks(shard.clone())).detach();
                    stops.push(stop_tx);
                }
                if ix == 0 && shard.history.enabled() {
                    glommio::spawn_local(history_samples(shard.clone())).detach();
                }
                glommio::spawn_local(super::clock::run(shard.clone())).detach();
                shared.accepting.fetch_add(1, Ordering::AcqRel);
                let _ = ready.send(Ok(ix));
                run_inbox(&shard, inbox).await;
                for stop in stops {
                    let _ = stop.try_send(());
                }
                drain_sessions(&shard).await;
            })
            .map_err(|e| StartError::Shard {
                shard: ix,
                why: e.to_string(),
            });
        match handle {
            Ok(h) => threads.push(h),
            Err(e) => {
                stop_all(&senders, threads);
                history.stop(Duration::ZERO);
                return Err(e);
            }
        }
    }
    drop(ready_tx);
    for _ in 0..shards {
        let failed = match ready_rx.recv() {
            Ok(Ok(_)) => continue,
            Ok(Err((shard, why))) => StartError::Shard { shard, why },
            Err(_) => StartError::Shard {
                shard: 0,
                why: "a shard thread exited during start-up".into(),
            },
        };
        stop_all(&senders, threads);
        history.stop(Duration::ZERO);
        return Err(failed);
    }
    drop(reserved);
    tracing::info!(%addr, ?tls_addr, shards, ?cpus, "accepting WebSocket connections");
    if let Some(a) = admin_addr {
        tracing::info!(admin = %a, "admin port (API, /metrics, dashboard) listening");
    }
    Ok(ServerHandle {
        addr,
        tls_addr,
        admin_addr,
        shared,
        flush_deadline: Duration::from_millis(cfg.history.flush_deadline_ms),
        history: Some(history),
        cpus,
        inboxes: senders,
        threads,
        metrics,
    })
}

/// Stops the shards started so far (a failed start leaves nothing running).
fn stop_all(inboxes: &[flume::Sender<MeshMsg>], threads: Vec<glommio::ExecutorJoinHandle<()>>) {
    for inbox in inboxes {
        let _ = inbox.send(MeshMsg::Shutdown);
    }
    for t in threads {
        let _ = t.join();
    }
}

/// The shard's mesh loop: handles messages until `Shutdown`.
async fn run_inbox(shard: &Rc<Shard>, inbox: flume::Receiver<MeshMsg>) {
    loop {
        let Ok(first) = inbox.recv_async().await else {
            return;
        };
        let now = now_ms();
        let mut next = Some(first);
        let mut handled = 0;
        while let Some(msg) = next.take() {
            match msg {
                MeshMsg::Shutdown => return,
                MeshMsg::Handoff(h) => {
                    if shard.stopping.get() {
                        continue; // dropping closes the socket
                    }
                    accept::adopt(shard, *h)
                }
                msg => shard.handle(msg, now),
            }
            handled += 1;
            if handled < INBOX_BATCH {
                next = inbox.try_recv().ok();
            }
        }
        if handled >= INBOX_BATCH {
            glommio::yield_if_needed().await;
        }
    }
}

/// The admin port's clocks: shard 0 samples the dashboard's series every second; every shard
/// rotates its recent latency window every [`LATENCY_WINDOW_TICKS`] seconds.
async fn admin_ticks(shard: Rc<Shard>) {
    let mut tick = 0u64;
    while !shard.stopping.get() {
        glommio::timer::sleep(Duration::from_secs(1)).await;
        tick += 1;
        if tick.is_multiple_of(LATENCY_WINDOW_TICKS) {
            shard.latency.borrow_mut().rotate();
        }
        if shard.ix != 0 {
            continue;
        }
        let mut recent = crate::metrics::latency_histogram();
        if let Ok(all) = admin::api::ask_all(&shard, AdminReq::Latency).await {
            for a in all {
                if let AdminResp::Latency(h) = a {
                    let _ = recent.add(&*h);
                }
            }
        }
        let snaps = shard.shared.metrics.iter().map(|m| m.snapshot()).collect();
        let p = crate::metrics::Percentiles::of(&recent);
        shard
            .series
            .borrow_mut()
            .sample(now_ms(), snaps, p.p50, p.p99);
    }
}

/// Shard 0's history sampler: every `history.sample_interval_s`, the online count and the
/// largest groups' member counts, map-reduced over the shards, recorded for replay.
async fn history_samples(shard: Rc<Shard>) {
    let every = Duration::from_secs(shard.cfg.history.sample_interval_s);
    let max_groups = shard.cfg.history.max_groups_per_sample;
    while !shard.stopping.get() {
        glommio::timer::sleep(every).await;
        let Ok(all) = admin::api::ask_all(&shard, AdminReq::Counts { max_groups }).await else {
            continue;
        };
        let mut online = 0;
        let mut groups = Vec::new();
        for a in all {
            if let AdminResp::Counts {
                online: n,
                groups: g,
            } = a
            {
                online += n;
                groups.extend(g);
            }
        }
        groups.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        groups.truncate(max_groups);
        shard
            .history
            .record(crate::history::Record::Sample(crate::history::Sample {
                ts: now_ms(),
                online,
                groups,
            }));
    }
}

/// Seconds per recent-latency window.
const LATENCY_WINDOW_TICKS: u64 = 10;

/// Closes every session with 1001 and waits (up to the deadline) for them to go.
async fn drain_sessions(shard: &Rc<Shard>) {
    shard.stopping.set(true);
    shard.shared.accepting.fetch_sub(1, Ordering::AcqRel);
    let conns: Vec<_> = shard.conns.borrow().values().cloned().collect();
    for c in conns {
        // Flush what is queued first, within the deadline below.
        c.close_with(CloseRequest {
            code: 1001,
            reason: "server shutting down",
            flush: true,
        });
    }
    let deadline = Instant::now() + Duration::from_millis(shard.cfg.shutdown_deadline_ms);
    while !shard.conns.borrow().is_empty() && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
    // Sessions that would not close in time end here, so history records their end too (their
    // tasks are dropped with the executor).
    let left: Vec<_> = shard.conns.borrow().values().cloned().collect();
    for c in left {
        crate::edge::conn::end_session(shard, &c);
    }
}
