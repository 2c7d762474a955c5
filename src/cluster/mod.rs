//! The cluster bridge (SPEC §12, docs/CLUSTER.md): many nodes as one presence service over
//! NATS.
//!
//! A side thread off the shard cores, like the history writer, runs the `async-nats` client on
//! a small current-thread `tokio` runtime. The shards hand it their changed shares and interest
//! over a bounded `flume` channel ([`crate::shard::replica`]) and it feeds them back through
//! their mesh inboxes as jobs. Shards never wait on it.
//!
//! - [`members`]: who is alive (heartbeats, leases); [`gaps`]: lost messages, by number;
//!   [`interest`]: which buckets to follow; [`wire`]: subjects and bodies. All pure.
//! - [`bridge`]: the event loop that does the I/O.
//!
//! No `[cluster]` block: none of this runs.

pub mod bridge;
pub mod gaps;
pub mod handoff;
pub mod interest;
pub mod members;
pub mod wire;

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::config::ClusterConfig;
use crate::presence::contrib::Hlc;
use crate::shard::mesh::MeshMsg;
use crate::shard::replica::ClusterLink;
use crate::shard::runtime::Shared;
use members::Peer;

/// The bus connection as `/readyz`, `/api/stats` and `/metrics` report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum BusState {
    /// Not connected yet (the first attempt is still retrying).
    Connecting = 0,
    Connected = 1,
    /// Lost; the client is reconnecting with backoff. Local clients are served meanwhile.
    Disconnected = 2,
    /// Another live node holds this `node_id`: this node does not join (it serves locally).
    Refused = 3,
}

impl BusState {
    pub fn as_str(self) -> &'static str {
        match self {
            BusState::Connecting => "connecting",
            BusState::Connected => "connected",
            BusState::Disconnected => "disconnected",
            BusState::Refused => "refused",
        }
    }

    fn from_u8(v: u8) -> BusState {
        match v {
            1 => BusState::Connected,
            2 => BusState::Disconnected,
            3 => BusState::Refused,
            _ => BusState::Connecting,
        }
    }
}

/// Counters of the bridge (`presenced_cluster_*` in `/metrics`).
#[derive(Debug, Default)]
pub struct Counters {
    pub messages_out: AtomicU64,
    pub bytes_out: AtomicU64,
    pub messages_in: AtomicU64,
    pub bytes_in: AtomicU64,
    /// Delta messages published (user and group buckets) and their bytes: with `deltas_out`,
    /// the bus cost of a change.
    pub delta_messages_out: AtomicU64,
    pub delta_bytes_out: AtomicU64,
    /// Shares published / applied from deltas.
    pub deltas_out: AtomicU64,
    pub deltas_in: AtomicU64,
    pub snapshots_requested: AtomicU64,
    pub snapshots_served: AtomicU64,
    /// Snapshot requests that failed (no answer in time, or the bus went away).
    pub snapshots_failed: AtomicU64,
    pub gaps: AtomicU64,
    pub lease_expiries: AtomicU64,
    pub reconnects: AtomicU64,
    /// Shares replaced by a newer one of the same user before they were published (the bus
    /// was slow or down, or several changes fell in one batch).
    pub coalesced: AtomicU64,
    /// Messages from another process using this node's id.
    pub duplicate_ids: AtomicU64,
    /// Bus messages that did not parse (counted, dropped).
    pub malformed: AtomicU64,
    /// Shares refused because their clock was too far ahead of this node's
    /// ([`bridge::MAX_CLOCK_AHEAD_MS`]).
    pub clock_ahead: AtomicU64,
    /// `activity` events sent to / received from other nodes.
    pub activity_out: AtomicU64,
    pub activity_in: AtomicU64,
    /// `activity` events not sent: the bus was down, or more than
    /// [`bridge::PENDING_ACTIVITY`] waited for one batch (they are ephemeral).
    pub activity_dropped: AtomicU64,
}

impl Counters {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// An admin API request sent to another node ([`Status::scatter`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AdminCall {
    /// `GET` or `POST`.
    pub method: String,
    pub path: String,
    pub query: String,
    /// Who asked (for the audit log of kicks), as the asking node authenticated them.
    pub by: String,
}

/// A node's answer: its status and JSON body.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdminAnswer {
    pub code: u16,
    pub body: serde_json::Value,
}

/// What a scatter-gather got: each answering node's answer, and the nodes asked that did not
/// answer in time (never silently left out).
#[derive(Clone, Debug, Default)]
pub struct Scattered {
    pub answers: Vec<(String, AdminAnswer)>,
    pub missing: Vec<String>,
}

/// How the admin port answers a request from another node on shard 0 (set by the admin port
/// at start-up, so the bridge knows nothing of HTTP): the answer goes to the sender.
pub type LocalAdmin = fn(&std::rc::Rc<crate::shard::Shard>, AdminCall, flume::Sender<AdminAnswer>);

/// A scatter-gather for the bridge to run.
pub struct AdminAsk {
    pub call: AdminCall,
    /// One node only; `None`: every live node.
    pub only: Option<String>,
    pub deadline: Duration,
    pub reply: flume::Sender<Scattered>,
}

/// What any thread may read about the cluster: the bus state, the live nodes, the counters and
/// the cross-node propagation latency.
#[derive(Debug)]
pub struct Status {
    pub node_id: String,
    /// Changes only when an upgrade's new process cannot take the old one's over.
    incarnation: AtomicU64,
    /// In an upgrade's new process: it has heard from the nodes the old one knew (or gave up
    /// waiting), so its watchers' state is here before it accepts anyone.
    warm: std::sync::atomic::AtomicBool,
    bus: AtomicU8,
    why: Mutex<String>,
    nodes: Mutex<Vec<Peer>>,
    pub counters: Counters,
    /// Followed buckets (gauge).
    pub followed: AtomicU64,
    /// Origin clock → applied here, in microseconds (wall clocks of two machines: skew shows).
    latency: Mutex<hdrhistogram::Histogram<u64>>,
    /// Scatter-gathers for the bridge (bounded: an admin burst waits, never queues without
    /// bound).
    asks: flume::Sender<AdminAsk>,
    local_admin: std::sync::OnceLock<LocalAdmin>,
}

impl Status {
    fn new(node_id: String, incarnation: u64, asks: flume::Sender<AdminAsk>) -> Status {
        Status {
            asks,
            local_admin: std::sync::OnceLock::new(),
            node_id,
            incarnation: AtomicU64::new(incarnation),
            warm: std::sync::atomic::AtomicBool::new(false),
            bus: AtomicU8::new(BusState::Connecting as u8),
            why: Mutex::new("connecting to NATS".into()),
            nodes: Mutex::new(Vec::new()),
            counters: Counters::default(),
            followed: AtomicU64::new(0),
            latency: Mutex::new(
                hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 2)
                    .expect("constant bounds are valid"),
            ),
        }
    }

    pub fn incarnation(&self) -> u64 {
        self.incarnation.load(Ordering::Acquire)
    }

    fn set_incarnation(&self, inc: u64) {
        self.incarnation.store(inc, Ordering::Release);
    }

    pub fn warm(&self) -> bool {
        self.warm.load(Ordering::Acquire)
    }

    fn set_warm(&self) {
        self.warm.store(true, Ordering::Release);
    }

    pub fn bus(&self) -> BusState {
        BusState::from_u8(self.bus.load(Ordering::Acquire))
    }

    /// Why the bus is in its state, in words (for `/readyz` and `/api/stats`).
    pub fn why(&self) -> String {
        lock(&self.why).clone()
    }

    fn set_bus(&self, state: BusState, why: impl Into<String>) {
        self.bus.store(state as u8, Ordering::Release);
        *lock(&self.why) = why.into();
    }

    /// The other live nodes, sorted by id.
    pub fn nodes(&self) -> Vec<Peer> {
        lock(&self.nodes).clone()
    }

    fn set_nodes(&self, nodes: Vec<Peer>) {
        *lock(&self.nodes) = nodes;
    }

    /// Asks every other live node (or only `only`) an admin question over the bus, waiting at
    /// most `deadline` for each.
    pub async fn scatter(
        &self,
        call: AdminCall,
        only: Option<String>,
        deadline: Duration,
    ) -> Scattered {
        let (reply, answer) = flume::bounded(1);
        let asked = only.clone().map_or_else(
            || self.nodes().into_iter().map(|p| p.id).collect(),
            |n| vec![n],
        );
        let ask = AdminAsk {
            call,
            only,
            deadline,
            reply,
        };
        if self.asks.send_async(ask).await.is_err() {
            return Scattered {
                answers: Vec::new(),
                missing: asked,
            };
        }
        answer.recv_async().await.unwrap_or(Scattered {
            answers: Vec::new(),
            missing: asked,
        })
    }

    /// Sets how this node answers other nodes' admin questions (once, at start-up).
    pub fn serve_admin_with(&self, f: LocalAdmin) {
        let _ = self.local_admin.set(f);
    }

    pub(crate) fn local_admin(&self) -> Option<LocalAdmin> {
        self.local_admin.get().copied()
    }

    pub fn record_latency(&self, us: u64) {
        let _ = lock(&self.latency).record(us.max(1));
    }

    /// Propagation latency quantiles in microseconds, and the sample count.
    pub fn latency(&self, quantiles: &[f64]) -> (Vec<u64>, u64) {
        let h = lock(&self.latency);
        (
            quantiles.iter().map(|q| h.value_at_quantile(*q)).collect(),
            h.len(),
        )
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Who this node is on the bus.
#[derive(Clone, Debug)]
pub struct Identity {
    pub node_id: String,
    pub incarnation: u64,
    /// Its admin URL, announced in heartbeats.
    pub admin_url: Option<String>,
}

impl Identity {
    /// `node_id` from the config, or the host name and a random suffix. The incarnation is the
    /// start time in microseconds, so a restarted node's is larger.
    pub fn new(cfg: &ClusterConfig, admin_url: Option<String>) -> Identity {
        let node_id = cfg.node_id.clone().unwrap_or_else(default_node_id);
        Identity {
            node_id,
            incarnation: fresh_incarnation(),
            admin_url,
        }
    }

    /// An upgrade's new process: the old process's id and incarnation (`hello`), unless this
    /// configuration names the node otherwise (then it joins as a node of its own).
    pub fn inherit(
        cfg: &ClusterConfig,
        admin_url: Option<String>,
        hello: &handoff::Hello,
    ) -> Option<Identity> {
        if cfg.node_id.as_ref().is_some_and(|id| *id != hello.node_id) {
            return None;
        }
        Some(Identity {
            node_id: hello.node_id.clone(),
            incarnation: hello.incarnation,
            admin_url,
        })
    }
}

/// Now in microseconds since the epoch.
fn fresh_incarnation() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_micros() as u64)
}

/// The host name (only the characters a subject token allows) and 6 random hex digits.
fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let mut host: String = host
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(48)
        .collect();
    if host.is_empty() {
        host = "node".into();
    }
    format!("{host}-{:06x}", rand::random::<u32>() & 0xff_ffff)
}

/// What the upgrade asks of the bridge ([`Handle`]).
pub enum Control {
    /// The old process, before it sends its state: the node's bus identity.
    Hello(flume::Sender<handoff::Hello>),
    /// The old process, once the new one is ready: publish what waits, stop publishing, and
    /// answer with the clock and stream numbers. `unpublished`: users whose last share the
    /// shards still held back (their backlog).
    HandOff {
        unpublished: Vec<String>,
        budget: Duration,
        reply: flume::Sender<handoff::Handoff>,
    },
    /// The new process: publish from here on, after the old one (`None`: it could not hand
    /// over; join as a new incarnation).
    TakeOver(Option<handoff::Handoff>),
    /// The old process again: the new one died after it took over. `fresh`: the new one was
    /// not handed the bus (it joined as a new incarnation), so neither is this one's any more.
    TakeBack { fresh: bool },
}

/// The bridge as the upgrade reaches it, from any thread.
#[derive(Clone)]
pub struct Handle {
    ctl: flume::Sender<Control>,
    pub status: Arc<Status>,
}

impl Handle {
    /// The node's bus identity, within `wait`.
    pub fn hello(&self, wait: Duration) -> Option<handoff::Hello> {
        let (tx, rx) = flume::bounded(1);
        self.ctl.send(Control::Hello(tx)).ok()?;
        rx.recv_timeout(wait).ok()
    }

    /// Stops this process publishing and returns what the new one needs to go on. The bridge
    /// takes at most `wait` (what it could not publish by then is the new process's to); `None`:
    /// it did not answer in `wait` and a second (the new process joins as a new incarnation).
    pub fn hand_off(&self, unpublished: Vec<String>, wait: Duration) -> Option<handoff::Handoff> {
        let (tx, rx) = flume::bounded(1);
        self.ctl
            .send(Control::HandOff {
                unpublished,
                budget: wait,
                reply: tx,
            })
            .ok()?;
        rx.recv_timeout(wait + Duration::from_secs(1)).ok()
    }

    pub fn take_over(&self, handoff: Option<handoff::Handoff>) {
        let _ = self.ctl.send(Control::TakeOver(handoff));
    }

    pub fn take_back(&self, fresh: bool) {
        let _ = self.ctl.send(Control::TakeBack { fresh });
    }
}

/// A running bridge.
pub struct Cluster {
    pub status: Arc<Status>,
    ctl: flume::Sender<Control>,
    doors: Option<std::sync::mpsc::Sender<bridge::Attach>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Cluster {
    /// Starts the bridge thread and waits (up to `request_timeout_ms`, at least a second) for
    /// the bus. Reachable: this node's id is checked first, and a live holder of it is an
    /// error. Unreachable: it returns anyway, serving locally, and the client keeps trying
    /// (the check runs on the first connection). Returns the link the shards are built with.
    ///
    /// `inherit`: an upgrade's new process, taking over the old one's identity (`id` is
    /// then the old one's): no id check, and nothing published until [`Handle::take_over`].
    /// `follow_all`: follow every user bucket (webhooks need each own user's merged view).
    pub fn start(
        cfg: &ClusterConfig,
        id: Identity,
        shards: usize,
        inherit: Option<handoff::Hello>,
        follow_all: bool,
    ) -> Result<(Cluster, ClusterLink), String> {
        let hlc = Arc::new(Hlc::new());
        if let Some(h) = &inherit {
            hlc.observe(h.clock);
        }
        let (ctl_tx, ctl_rx) = flume::unbounded();
        let (tx, rx) = flume::bounded(cfg.queue_capacity);
        let (asks_tx, asks_rx) = flume::bounded(64);
        let status = Arc::new(Status::new(id.node_id.clone(), id.incarnation, asks_tx));
        let (doors_tx, doors_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let (verdict_tx, verdict_rx) = std::sync::mpsc::channel();
        let setup = bridge::Setup {
            cfg: cfg.clone(),
            id,
            shards,
            hlc: hlc.clone(),
            from_shards: rx,
            status: status.clone(),
            doors: doors_rx,
            stop: stop_rx,
            verdict: verdict_tx,
            asks: asks_rx,
            ctl: ctl_rx,
            inherit,
            follow_all,
        };
        let thread = std::thread::Builder::new()
            .name("cluster-bridge".into())
            .spawn(move || bridge::run(setup))
            .map_err(|e| format!("cannot start the cluster bridge thread: {e}"))?;
        let wait = Duration::from_millis(cfg.request_timeout_ms.max(1_000) + 1_000);
        let verdict = verdict_rx
            .recv_timeout(wait)
            .unwrap_or_else(|_| Err("the cluster bridge did not start".into()));
        let mut cluster = Cluster {
            status,
            ctl: ctl_tx,
            doors: Some(doors_tx),
            stop: Some(stop_tx),
            thread: Some(thread),
        };
        if let Err(why) = verdict {
            cluster.stop();
            return Err(why);
        }
        let link = ClusterLink {
            hlc,
            buckets: cfg.buckets,
            tx,
        };
        Ok((cluster, link))
    }

    /// How the upgrade reaches the bridge.
    pub fn handle(&self) -> Handle {
        Handle {
            ctl: self.ctl.clone(),
            status: self.status.clone(),
        }
    }

    /// Waits (at most `wait`) until the bridge has heard from the nodes an upgrade's old
    /// process knew ([`Status::warm`]).
    pub fn wait_warm(&self, wait: Duration) -> bool {
        let deadline = std::time::Instant::now() + wait;
        while !self.status.warm() {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// Hands the bridge the shards' inboxes (and counters) once they run; it starts feeding
    /// them.
    pub fn attach(&mut self, doors: Vec<flume::Sender<MeshMsg>>, shared: Arc<Shared>) {
        if let Some(tx) = self.doors.take() {
            let _ = tx.send((doors, shared));
        }
    }

    /// Stops the bridge: it says nothing more on the bus (the others drop this node within a
    /// lease) and its thread ends.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.doors.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}
