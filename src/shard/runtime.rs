//! Starting and stopping the shards: one glommio executor per shard, each with its mesh inbox.
//! What else runs on a shard (listeners, the admin port, taps) is the caller's: [`spawn`] calls
//! its `init` on every shard before that shard starts taking mesh messages.
//!
//! Every executor reports its stalls (`ops::stall`): a queue run that keeps the loop from turning
//! for `stall_threshold_ms` is reported with the name of its task queue ([`QUEUE_NAMES`]). While
//! the systemd watchdog is on, each shard also stamps [`Shared::progress_us`] every so often
//! ([`Shards::track_progress`]).

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use glommio::{
    Latency, LocalExecutorBuilder, Placement as GPlacement, PoolPlacement, Shares, TaskQueueHandle,
};

use super::mesh::{Mesh, MeshMsg};
use super::{now_ms, CloseRequest, Shard};
use crate::auth::Verifier;
use crate::config::{parse_cpu_list, Config, Placement, ValidConfig};
use crate::metrics::{MetricsSnapshot, PeerCounters, ShardMetrics};
use crate::ops::stall;
use crate::presence::watchers::ShardIx;

/// Memory glommio registers with io_uring per shard. We do no file DMA, so the minimum will do
/// (and stays well inside small `RLIMIT_MEMLOCK` budgets).
const IO_MEMORY: usize = 64 * 1024;
/// Mesh messages handled per wake-up before yielding to sessions.
const INBOX_BATCH: usize = 256;

/// A shard's task queues by glommio index: the names stall reports give. glommio numbers a new
/// executor's queues from 1 in creation order; 0 is its own `default` ([`TaskQueues::create`]).
pub const QUEUE_NAMES: &[&str] = &["default", "serve", "clock"];

/// A shard's task queues, with equal shares:
/// - `serve`: what `init` starts (the listeners, and the connections and admin requests they
///   start) and the mesh loop (with the jobs it runs and what they start);
/// - `clock`: the clock's sweeps (token expiry, heartbeats) and the watchdog's progress stamps;
/// - glommio's `default`: the shard's start and its shutdown drain.
#[derive(Debug, Clone, Copy)]
struct TaskQueues {
    serve: TaskQueueHandle,
    clock: TaskQueueHandle,
}

impl TaskQueues {
    /// Creates them on the current executor (first thing, so the indexes match the names).
    fn create() -> TaskQueues {
        let ex = glommio::executor();
        let make = |name| ex.create_task_queue(Shares::default(), Latency::NotImportant, name);
        let queues = TaskQueues {
            serve: make("serve"),
            clock: make("clock"),
        };
        assert_eq!(
            (
                QUEUE_NAMES[queues.serve.index()],
                QUEUE_NAMES[queues.clock.index()]
            ),
            ("serve", "clock"),
            "QUEUE_NAMES lists the queues in creation order"
        );
        queues
    }
}

/// Runs `task` in `queue` (so what it spawns runs there too) and waits for it.
async fn run_in<T: 'static>(queue: TaskQueueHandle, task: impl Future<Output = T> + 'static) -> T {
    glommio::spawn_local_into(task, queue)
        .expect("a shard's task queues live as long as the shard")
        .await
}

/// Stamps `shared.progress_us[ix]` every `every`, for as long as the shard runs.
async fn stamp_progress(shared: Arc<Shared>, ix: usize, every: Duration) {
    loop {
        shared.progress_us[ix].store(shared.since_start_us(), Ordering::Relaxed);
        glommio::timer::sleep(every).await;
    }
}

/// What every shard (and any other thread) may read about the whole process: the counters of
/// every shard (atomics, each written only by its own shard) and start-up facts. Nothing here is
/// locked.
#[derive(Debug)]
pub struct Shared {
    pub started: Instant,
    pub started_ms: u64,
    pub metrics: Arc<[Arc<ShardMetrics>]>,
    /// Per shard: messages sent to each peer.
    pub mesh_pairs: Vec<Arc<PeerCounters>>,
    pub cpus: Vec<Option<usize>>,
    /// Shards that are accepting connections (`/readyz`).
    pub accepting: AtomicUsize,
    /// Set when shutdown begins (`/readyz` turns 503 so load balancers stop sending).
    pub stopping: AtomicBool,
    /// Set when the node runs in a cluster.
    pub cluster: Option<super::replica::ClusterLink>,
    /// Per shard: when its loop last turned as far as the systemd watchdog knows (µs since
    /// `started`). Stamped by a task on the shard only while the watchdog is on
    /// ([`Shards::track_progress`]); read by the watchdog thread.
    pub progress_us: Box<[AtomicU64]>,
    /// The listening sockets: served, and inherited from an upgrade's old process.
    pub sockets: crate::net::Sockets,
    /// `geo.database`, shared read-only by every shard and swapped whole on reload.
    pub geo: Option<Arc<crate::geo::Geo>>,
}

impl Shared {
    pub fn new(cpus: Vec<Option<usize>>) -> Shared {
        let shards = cpus.len();
        Shared {
            started: Instant::now(),
            started_ms: now_ms(),
            metrics: (0..shards).map(|_| Arc::default()).collect(),
            mesh_pairs: (0..shards)
                .map(|_| Arc::new(PeerCounters::new(shards)))
                .collect(),
            cpus,
            accepting: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            cluster: None,
            progress_us: (0..shards).map(|_| AtomicU64::new(0)).collect(),
            sockets: crate::net::Sockets::default(),
            geo: None,
        }
    }

    pub fn shards(&self) -> usize {
        self.metrics.len()
    }

    /// Microseconds since `started`: the clock of `progress_us`.
    pub fn since_start_us(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    pub fn ready(&self) -> bool {
        self.accepting.load(Ordering::Acquire) == self.shards()
            && !self.stopping.load(Ordering::Acquire)
    }

    /// Per-shard counters, read from any thread.
    pub fn snapshots(&self) -> Vec<MetricsSnapshot> {
        self.metrics.iter().map(|m| m.snapshot()).collect()
    }
}

/// The CPU each shard is pinned to, per the configured placement.
pub fn plan_cpus(cfg: &Config, shards: usize) -> Result<Vec<Option<usize>>, String> {
    let err = |e: glommio::GlommioError<()>| format!("cpu placement: {e}");
    if !cfg.cpus.is_empty() && cfg.placement != Placement::Unbound {
        let list = parse_cpu_list(&cfg.cpus).map_err(|e| format!("cpu placement: {e}"))?;
        return Ok((0..shards).map(|i| Some(list[i % list.len()])).collect());
    }
    let pool = match cfg.placement {
        Placement::Unbound => return Ok(vec![None; shards]),
        Placement::Fixed => return Err("cpu placement: `fixed` needs `cpus`".into()),
        Placement::MaxSpread => PoolPlacement::MaxSpread(shards, None),
        Placement::MaxPack => PoolPlacement::MaxPack(shards, None),
    };
    let mut gen = pool.generate_cpu_set().map_err(err)?;
    Ok((0..shards)
        .map(|_| gen.next().cpu_binding().and_then(|c| c.into_iter().next()))
        .collect())
}

/// Something a shard's `init` started that must be told when the shard stops (an accept loop).
pub type Stop = Box<dyn FnOnce()>;

/// What `init` returns: the things to stop when the shard stops.
pub type Init = Arc<dyn Fn(&Rc<Shard>) -> Result<Vec<Stop>, String> + Send + Sync>;

/// The running shards.
pub struct Shards {
    pub shared: Arc<Shared>,
    inboxes: Vec<flume::Sender<MeshMsg>>,
    threads: Vec<glommio::ExecutorJoinHandle<()>>,
}

impl Shards {
    pub fn len(&self) -> usize {
        self.inboxes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inboxes.is_empty()
    }

    /// Asks every shard to stop: no new sessions, sessions closed with 1001.
    pub fn begin_shutdown(&self) {
        self.shared.stopping.store(true, Ordering::Release);
        for inbox in &self.inboxes {
            let _ = inbox.send(MeshMsg::Shutdown);
        }
    }

    /// Every shard's inbox, for a driver running outside the shards (the cluster bridge) to
    /// send jobs with.
    pub fn doors(&self) -> Vec<flume::Sender<MeshMsg>> {
        self.inboxes.clone()
    }

    /// Sends a job to one shard from outside the shards (tests, upgrades). False when the
    /// shard has stopped.
    pub fn send_job(&self, shard: usize, job: super::mesh::Job) -> bool {
        self.inboxes[shard].send(MeshMsg::Invoke(job)).is_ok()
    }

    /// Starts every shard stamping `shared.progress_us` every `every`, for the systemd watchdog
    /// (a stale stamp: that shard's loop stopped turning). One wake-up per shard per `every`, so
    /// only while the watchdog is on.
    pub fn track_progress(&self, every: Duration) {
        let now = self.shared.since_start_us();
        for stamp in &*self.shared.progress_us {
            stamp.store(now, Ordering::Relaxed);
        }
        for inbox in &self.inboxes {
            let _ = inbox.send(MeshMsg::Invoke(Box::new(move |shard: &Rc<Shard>| {
                let queues = shard
                    .local::<TaskQueues>()
                    .expect("every shard stores its task queues before taking mesh messages");
                let ix = usize::from(shard.ix());
                glommio::spawn_local_into(
                    stamp_progress(shard.shared().clone(), ix, every),
                    queues.clock,
                )
                .expect("a shard's task queues live as long as the shard")
                .detach();
            })));
        }
    }

    /// Waits for every shard thread to finish.
    pub fn join(&mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Starts one executor per entry of `shared.cpus` (pinned there, or unbound for `None`) and
/// returns once every shard has run `init` and is taking mesh messages.
pub fn spawn(
    cfg: ValidConfig,
    verifier: Arc<Verifier>,
    shared: Arc<Shared>,
    init: Init,
) -> Result<Shards, (usize, String)> {
    let shards = shared.shards();
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..shards)
        .map(|_| flume::bounded::<MeshMsg>(cfg.mesh.inbox_capacity))
        .unzip();
    let (ready_tx, ready_rx) = mpsc::channel::<Result<usize, (usize, String)>>();
    let mut running = Shards {
        shared: shared.clone(),
        inboxes: senders.clone(),
        threads: Vec::with_capacity(shards),
    };
    for (ix, inbox) in receivers.into_iter().enumerate() {
        let placement = shared.cpus[ix].map_or(GPlacement::Unbound, GPlacement::Fixed);
        let (cfg, verifier, peers, shared, ready, init) = (
            cfg.clone(),
            verifier.clone(),
            senders.clone(),
            shared.clone(),
            ready_tx.clone(),
            init.clone(),
        );
        let threshold = Duration::from_millis(cfg.stall_threshold_ms);
        let stalls =
            stall::StallReporter::new(ix, threshold, QUEUE_NAMES, shared.metrics[ix].clone());
        let handle = LocalExecutorBuilder::new(placement)
            .name(&format!("shard-{ix}"))
            .io_memory(IO_MEMORY)
            .ring_depth(usize::try_from(cfg.io_ring_depth).expect("validate() caps io_ring_depth"))
            .preempt_timer(stall::time_slice(threshold))
            .detect_stalls(Some(Box::new(stalls)))
            .spawn(move || async move {
                let queues = TaskQueues::create();
                let ix16 = ShardIx::try_from(ix).expect("validate() caps shards at u16::MAX");
                let mesh = Mesh::new(
                    ix16,
                    peers,
                    cfg.mesh.overflow_max_bytes,
                    shared.metrics.clone(),
                    shared.mesh_pairs[ix].clone(),
                );
                let shard = Rc::new(Shard::new(
                    ix16,
                    cfg.config_arc(),
                    verifier,
                    mesh,
                    shared.clone(),
                ));
                shard.insert_local(Rc::new(queues));
                let started = {
                    let shard = shard.clone();
                    run_in(queues.serve, async move { init(&shard) }).await
                };
                let stops = match started {
                    Ok(stops) => stops,
                    Err(why) => {
                        let _ = ready.send(Err((ix, why)));
                        return;
                    }
                };
                glommio::spawn_local_into(super::clock::run(shard.clone()), queues.clock)
                    .expect("the clock queue was just created")
                    .detach();
                #[cfg(feature = "fault-injection")]
                if let (0, Some((after, len))) = (ix, stall::injected_stall()) {
                    glommio::spawn_local_into(stall::inject_stall(after, len), queues.serve)
                        .expect("the serve queue was just created")
                        .detach();
                }
                shared.accepting.fetch_add(1, Ordering::AcqRel);
                let _ = ready.send(Ok(ix));
                shard.keep_stops(stops);
                let mesh_loop = shard.clone();
                run_in(
                    queues.serve,
                    async move { run_inbox(&mesh_loop, inbox).await },
                )
                .await;
                shard.stop_accepting();
                // It holds the shard's edge, which holds the shard: let go of the cycle.
                shard.relisten.borrow_mut().take();
                drain_sessions(&shard).await;
            });
        match handle {
            Ok(h) => running.threads.push(h),
            Err(e) => {
                running.begin_shutdown();
                running.join();
                return Err((ix, e.to_string()));
            }
        }
    }
    drop(ready_tx);
    for _ in 0..shards {
        let failed = match ready_rx.recv() {
            Ok(Ok(_)) => continue,
            Ok(Err(e)) => e,
            Err(_) => (0, "a shard thread exited during start-up".into()),
        };
        running.begin_shutdown();
        running.join();
        return Err(failed);
    }
    Ok(running)
}

/// The shard's mesh loop: handles messages until `Shutdown`.
///
/// A panic in a mesh handler is not contained: the handler was changing state every user of
/// this shard shares (the registry, group lists, subscription lists), so the process logs it
/// and aborts rather than serve wrong presence silently with a half-updated shard. (A panic
/// while applying one session's op is contained to that session: see `Shard::submit`.)
async fn run_inbox(shard: &Rc<Shard>, inbox: flume::Receiver<MeshMsg>) {
    loop {
        let Ok(first) = inbox.recv_async().await else {
            return;
        };
        let now = now_ms();
        let mut next = Some(first);
        let mut handled = 0;
        while let Some(msg) = next.take() {
            if matches!(msg, MeshMsg::Shutdown) {
                return;
            }
            let kind = msg.kind();
            let handled_ok = std::panic::catch_unwind(AssertUnwindSafe(|| shard.handle(msg, now)));
            if handled_ok.is_err() {
                tracing::error!(
                    shard = shard.ix,
                    message = kind,
                    "panic in a mesh handler: shard state may be half-updated; aborting"
                );
                std::process::abort();
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

/// Closes every session with 1001 and waits (up to the deadline) for them to go.
async fn drain_sessions(shard: &Rc<Shard>) {
    shard.stopping.set(true);
    shard.shared.accepting.fetch_sub(1, Ordering::AcqRel);
    let deadline_ms = shard.cfg.shutdown_deadline_ms;
    for s in shard.all_sessions() {
        // Flush what is queued first, within the deadline below.
        s.request_close(CloseRequest {
            code: 1001,
            reason: "server shutting down",
            flush_ms: deadline_ms,
        });
    }
    let deadline = Instant::now() + Duration::from_millis(deadline_ms);
    while shard.session_count() > 0 && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
    // Sessions that would not close in time end here, so history records their end too (their
    // tasks are dropped with the executor).
    for s in shard.all_sessions() {
        shard.close_session(&s);
    }
}
