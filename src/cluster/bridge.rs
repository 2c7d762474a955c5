//! The bridge's event loop: NATS on one side, the shards on the other (module docs in
//! [`super`]). One thread, one current-thread `tokio` runtime; every queue is bounded:
//! - shards → bridge: `cluster.queue_capacity` per process (then shards coalesce, see
//!   [`crate::shard::replica`]);
//! - shares waiting to be published: one per user at most (latest wins), so a slow or dead bus
//!   costs memory bounded by the node's users, never a growing queue;
//! - bus → bridge: the NATS client's per-subscription buffer and [`INCOMING`]; past them the
//!   client drops and counts (slow consumer), and the gap detection heals the loss.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, ConnectOptions, Event, Message};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::gaps::{Gaps, Seen};
use super::handoff::{Handoff, HandoffUser, Hello};
use super::interest::{Follow, Interest};
use super::members::{Heard, Members, NodeInfo};
use super::wire::{
    ActivityMsg, Delta, Heartbeat, SnapChunk, SnapRequest, Subjects, SHARES_PER_MESSAGE,
};
use super::{BusState, Control, Counters, Identity, Status};
use crate::config::ClusterConfig;
use crate::presence::contrib::{bucket_of, Activity, Contribution, Hlc, NodeIx};
use crate::presence::{GroupId, Outgoing, UserId};
use crate::shard::mesh::MeshMsg;
use crate::shard::replica::{on_every_shard, BucketSet, Scope};
use crate::shard::runtime::Shared;
use crate::shard::{now_ms, owner_of, Shard};

/// Bus messages waiting for the loop, over all subscriptions.
const INCOMING: usize = 4_096;

/// How far ahead of this node's wall clock a share's clock may be ([`clock_believable`]).
pub const MAX_CLOCK_AHEAD_MS: u64 = 60_000;

/// Whether `clock` (an HLC value) is at most [`MAX_CLOCK_AHEAD_MS`] ahead of `now_ms`.
pub fn clock_believable(clock: u64, now_ms: u64) -> bool {
    Hlc::millis(clock) <= now_ms.saturating_add(MAX_CLOCK_AHEAD_MS)
}

/// `activity` events waiting for one batch; more are dropped and counted (they are ephemeral).
pub const PENDING_ACTIVITY: usize = 10_000;

/// How far an old process of an upgrade moves its stream numbers on when it publishes again
/// after its new process died: past anything the new one can have published, so the others
/// see a gap (and ask for a snapshot) rather than old numbers they would drop.
pub const TAKE_BACK_JUMP: u64 = 1 << 32;

/// Who speaks for the node on the bus (docs/OPERATIONS.md, "In a cluster").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// Publishes shares and heartbeats, and answers snapshot, id and admin requests.
    Publishing,
    /// An upgrade's new process before the old one hands the bus over: shares wait (newest
    /// per user), nothing is said for the node.
    Waiting,
    /// An upgrade's old process after it handed the bus over: its shares are the new
    /// process's to publish (they reach it as records), and are dropped here.
    HandedOff,
}

type Door = flume::Sender<MeshMsg>;

/// What the bridge gets once the shards run: their inboxes, and their counters.
pub type Attach = (Vec<Door>, Arc<Shared>);

/// What [`super::Cluster::start`] hands the thread.
pub struct Setup {
    pub cfg: ClusterConfig,
    pub id: Identity,
    pub shards: usize,
    pub hlc: Arc<Hlc>,
    pub from_shards: flume::Receiver<Outgoing>,
    pub status: Arc<Status>,
    pub doors: std::sync::mpsc::Receiver<Attach>,
    pub stop: tokio::sync::oneshot::Receiver<()>,
    pub verdict: std::sync::mpsc::Sender<Result<(), String>>,
    pub asks: flume::Receiver<super::AdminAsk>,
    pub ctl: flume::Receiver<Control>,
    /// An upgrade's new process: the old one's bus identity.
    pub inherit: Option<Hello>,
    /// Follow every user bucket, not only the watched ones, so that this node's view of each
    /// of its own users merges the other nodes' shares (webhooks judge online and offline by
    /// it: docs/WEBHOOKS.md, "In a cluster").
    pub follow_all: bool,
}

/// The thread's body.
pub fn run(setup: Setup) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = setup
                .verdict
                .send(Err(format!("cluster bridge runtime: {e}")));
            return;
        }
    };
    rt.block_on(async move {
        if let Some(mut bridge) = Bridge::connect(setup).await {
            bridge.serve().await;
        }
    });
}

/// One numbered stream of deltas: a user bucket's (`{prefix}.d.{b}`: changes of the users in
/// it) or a group bucket's (`{prefix}.g.{b}`: changes of the members of its groups). A node
/// follows a user bucket while it has a watcher of a user in it, a group bucket while it has a
/// watcher of a group in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Stream {
    User(u32),
    Group(u32),
}

impl Stream {
    /// Its key in [`Gaps`]: user buckets first, group buckets after them.
    fn gaps_key(self, buckets: u32) -> u32 {
        match self {
            Stream::User(b) => b,
            Stream::Group(b) => buckets + b,
        }
    }

    fn bucket(self) -> u32 {
        match self {
            Stream::User(b) | Stream::Group(b) => b,
        }
    }

    fn subject(self, subjects: &Subjects) -> String {
        match self {
            Stream::User(b) => subjects.delta(b),
            Stream::Group(b) => subjects.group(b),
        }
    }
}

/// Everything the loop hears.
enum Incoming {
    Bus(Message),
    Event(Event),
    Snapshot {
        node: String,
        ix: NodeIx,
        streams: Vec<Stream>,
        answer: Result<Snapshot, String>,
    },
    /// Whether the NATS server answered this beat's probe in time.
    Probe(bool),
}

/// A whole snapshot answer.
struct Snapshot {
    inc: u64,
    clock: u64,
    covered: Vec<(u32, u64)>,
    covered_groups: Vec<(u32, u64)>,
    shares: Vec<(UserId, Contribution)>,
}

struct Bridge {
    cfg: ClusterConfig,
    id: Identity,
    subjects: Subjects,
    client: Client,
    shards: usize,
    hlc: Arc<Hlc>,
    status: Arc<Status>,
    from_shards: flume::Receiver<Outgoing>,
    doors: Vec<Door>,
    doors_rx: Option<std::sync::mpsc::Receiver<Attach>>,
    /// The shards' counters (heartbeats carry the node's totals); set with `doors`.
    shared: Option<Arc<Shared>>,
    stop: tokio::sync::oneshot::Receiver<()>,
    asks: flume::Receiver<super::AdminAsk>,
    ctl: flume::Receiver<Control>,
    role: Role,
    /// What an upgrade's old process knew, until the shards are attached.
    inherit: Option<Hello>,
    /// When to stop waiting for the snapshots the inherited nodes were asked for.
    warm_by: Option<tokio::time::Instant>,
    tx: mpsc::Sender<Incoming>,
    rx: mpsc::Receiver<Incoming>,
    /// Shares waiting for the next batch, newest per user.
    pending: HashMap<UserId, Contribution>,
    /// The groups last published per user with groups: a user who leaves a group is published
    /// on that group's bucket once more, so its watchers hear it leave.
    published_groups: HashMap<UserId, Vec<GroupId>>,
    /// Messages published per stream (the next one is this + 1); a stream not in it starts
    /// after `numbers_base` ([`TAKE_BACK_JUMP`]).
    numbers: HashMap<Stream, u64>,
    numbers_base: u64,
    members: Members,
    gaps: Gaps,
    /// Watched users (groups) here per user (group) bucket.
    users: Interest,
    groups: Interest,
    /// Subscription tasks of followed streams.
    subs: HashMap<Stream, tokio::task::JoinHandle<()>>,
    /// [`Setup::follow_all`]: every user bucket's deltas, on one wildcard subscription (user
    /// buckets then get no subscription of their own; `users` drives their `activity` only).
    follow_all: bool,
    all_users_sub: Option<tokio::task::JoinHandle<()>>,
    /// Users with sessions here per user bucket: directed `activity` must reach them.
    sessions: Interest,
    /// Subscriptions to `activity` of followed user buckets (`a.`), and to directed `activity`
    /// of buckets with sessions here (`t.`).
    activity_subs: HashMap<u32, tokio::task::JoinHandle<()>>,
    directed_subs: HashMap<u32, tokio::task::JoinHandle<()>>,
    /// `activity` waiting for the next batch (at most [`PENDING_ACTIVITY`]).
    pending_activity: Vec<Activity>,
    /// Streams newly followed: snapshots to ask for at the next batch.
    fresh: BTreeSet<Stream>,
    /// Per node: a snapshot request in flight, and streams to ask for when it ends.
    asking: HashMap<String, BTreeSet<Stream>>,
    again: HashMap<String, BTreeSet<Stream>>,
    /// Whether this node's id was checked against the live nodes (on the first connection;
    /// an upgrade's new process inherits the id and skips it).
    id_checked: bool,
    /// Whether the bus was ever reached (a later connection is a reconnection).
    ever_connected: bool,
    /// A probe of the bus is in flight ([`Bridge::probe`]).
    probing: bool,
    /// The client dropped messages for us: ask for every followed stream again at the next
    /// beat.
    resync_due: bool,
    connected: bool,
    /// Heartbeats, subscribed on the first connection.
    heartbeats: Option<tokio::task::JoinHandle<()>>,
    /// The node's own subjects (snapshot requests, id checks, admin questions), subscribed
    /// while it publishes.
    own_subs: Vec<tokio::task::JoinHandle<()>>,
}

impl Bridge {
    /// Connects (or starts retrying), checks the node id when the bus answers, and tells
    /// `start` how it went. `None`: the start failed and was told so.
    async fn connect(s: Setup) -> Option<Bridge> {
        let (tx, rx) = mpsc::channel(INCOMING);
        let events = tx.clone();
        let mut opts = ConnectOptions::new()
            .name(format!("presenced {}", s.id.node_id))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .no_echo()
            .connection_timeout(Duration::from_millis(s.cfg.request_timeout_ms.max(100)))
            // A link that dies without a reset (a partition) is noticed within about a lease:
            // the client gives up after two unanswered pings.
            .ping_interval(Duration::from_millis((s.cfg.lease_ms / 2).max(100)))
            .reconnect_delay_callback(|attempt| {
                // The client counts from 1 and waits this long before every attempt, the first
                // connection's too: at once, then 100 ms doubling to 5 s (quick after a blip,
                // gentle on a dead bus).
                Duration::from_millis(match attempt {
                    0 | 1 => 0,
                    n => (100u64 << (n - 2).min(6)).min(5_000),
                })
            })
            .event_callback(move |e| {
                // Never wait here: the client runs its callbacks in line. An event lost to a full
                // queue is made up for by `beat` (the connection state is read there too).
                let _ = events.try_send(Incoming::Event(e));
                async {}
            });
        match auth(opts, &s.cfg).await {
            Ok(o) => opts = o,
            Err(why) => {
                let _ = s.verdict.send(Err(why));
                return None;
            }
        }
        let urls: Vec<async_nats::ServerAddr> =
            match s.cfg.nats_url.iter().map(|u| u.parse()).collect() {
                Ok(u) => u,
                Err(e) => {
                    let _ = s.verdict.send(Err(format!("cluster.nats_url: {e}")));
                    return None;
                }
            };
        let client = match opts.connect(urls).await {
            Ok(c) => c,
            Err(e) => {
                let _ = s
                    .verdict
                    .send(Err(format!("cluster: cannot use NATS: {e}")));
                return None;
            }
        };
        let mut bridge = Bridge {
            subjects: Subjects::new(&s.cfg.prefix),
            users: Interest::new(s.cfg.unsubscribe_after_ms),
            groups: Interest::new(s.cfg.unsubscribe_after_ms),
            sessions: Interest::new(s.cfg.unsubscribe_after_ms),
            cfg: s.cfg,
            id: s.id,
            client,
            shards: s.shards,
            hlc: s.hlc,
            status: s.status,
            from_shards: s.from_shards,
            doors: Vec::new(),
            doors_rx: Some(s.doors),
            shared: None,
            stop: s.stop,
            asks: s.asks,
            ctl: s.ctl,
            role: if s.inherit.is_some() {
                Role::Waiting
            } else {
                Role::Publishing
            },
            id_checked: s.inherit.is_some(),
            inherit: s.inherit,
            warm_by: None,
            tx,
            rx,
            pending: HashMap::new(),
            published_groups: HashMap::new(),
            numbers: HashMap::new(),
            numbers_base: 0,
            members: Members::new(),
            gaps: Gaps::new(),
            subs: HashMap::new(),
            follow_all: s.follow_all,
            all_users_sub: None,
            activity_subs: HashMap::new(),
            directed_subs: HashMap::new(),
            pending_activity: Vec::new(),
            fresh: BTreeSet::new(),
            asking: HashMap::new(),
            again: HashMap::new(),
            ever_connected: false,
            probing: false,
            resync_due: false,
            connected: false,
            heartbeats: None,
            own_subs: Vec::new(),
        };
        if bridge.follow_all {
            bridge.all_users_sub = Some(bridge.subscribe(bridge.subjects.all_deltas()));
            for b in 0..bridge.cfg.buckets {
                bridge.fresh.insert(Stream::User(b));
            }
            bridge.note_followed();
        }
        // Wait a little for the first connection, so a duplicate id is refused at start.
        let wait = Duration::from_millis(self_wait(&bridge.cfg));
        let deadline = tokio::time::Instant::now() + wait;
        while bridge.client.connection_state() != async_nats::connection::State::Connected {
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if bridge.client.connection_state() == async_nats::connection::State::Connected {
            if let Err(why) = bridge.on_connected().await {
                let _ = s.verdict.send(Err(why));
                return None;
            }
        } else {
            tracing::warn!(urls = ?bridge.cfg.nats_url, "cluster: NATS not reachable; serving \
                local clients and retrying");
            bridge
                .status
                .set_bus(BusState::Connecting, "NATS not reachable yet; retrying");
        }
        let _ = s.verdict.send(Ok(()));
        Some(bridge)
    }

    /// A connection: the first checks the id, then subscribes to heartbeats and (while this
    /// process speaks for the node) to the node's own subjects; the client renews them on
    /// later ones. Err: another live node holds this id.
    async fn on_connected(&mut self) -> Result<(), String> {
        self.connected = true;
        self.ever_connected = true;
        if !self.id_checked {
            let ask = self.client.request(
                self.subjects.whois(&self.id.node_id),
                Bytes::from(self.heartbeat_body()),
            );
            match tokio::time::timeout(Duration::from_millis(self.cfg.request_timeout_ms), ask)
                .await
            {
                Ok(Ok(reply)) => {
                    let holder = serde_json::from_slice::<Heartbeat>(&reply.payload).ok();
                    let admin = holder.and_then(|h| h.info.admin).unwrap_or_default();
                    let why = format!(
                        "cluster.node_id `{}` is already used by a live node (admin: {admin}); \
                         give every node its own id",
                        self.id.node_id
                    );
                    self.status.set_bus(BusState::Refused, why.clone());
                    return Err(why);
                }
                Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => {}
                Ok(Err(e)) => tracing::warn!("cluster: node id check: {e}; assuming it is free"),
                Err(_) => tracing::warn!("cluster: node id check timed out; assuming it is free"),
            }
            self.id_checked = true;
        }
        if self.heartbeats.is_none() {
            let subject = self.subjects.heartbeat();
            let sub = self
                .client
                .subscribe(subject.clone())
                .await
                .map_err(|e| format!("cluster: cannot subscribe to {subject}: {e}"))?;
            self.heartbeats = Some(forward(sub, self.tx.clone()));
        }
        if self.role == Role::Publishing && self.own_subs.is_empty() {
            self.subscribe_own().await?;
        }
        self.status
            .set_bus(BusState::Connected, "connected to NATS");
        tracing::info!(node = %self.id.node_id, "cluster: connected to NATS");
        Ok(())
    }

    /// Snapshot requests to this node, id checks of this node's id, and admin questions.
    async fn subscribe_own(&mut self) -> Result<(), String> {
        for subject in [
            self.subjects.snapshot(&self.id.node_id),
            self.subjects.whois(&self.id.node_id),
            self.subjects.admin(&self.id.node_id),
        ] {
            let sub = self
                .client
                .subscribe(subject.clone())
                .await
                .map_err(|e| format!("cluster: cannot subscribe to {subject}: {e}"))?;
            self.own_subs.push(forward(sub, self.tx.clone()));
        }
        Ok(())
    }

    // --- Upgrades (docs/OPERATIONS.md, "In a cluster"). ---

    /// An upgrade's new process, once its shards run: follow what the old process followed
    /// (kept for `hold_ms` without a watcher, for its watchers to come back), and ask the nodes
    /// it knew for their state now rather than at their next heartbeat.
    fn seed(&mut self, hello: Hello) {
        let now = now_ms();
        let until = now.saturating_add(hello.hold_ms);
        let buckets = self.cfg.buckets;
        for b in hello.follows.into_iter().filter(|b| *b < buckets) {
            if let Follow::Start(b) = self.users.add(b, 1, now) {
                self.watch_users(b);
            }
            self.users.add(b, -1, until);
        }
        for b in hello.follows_groups.into_iter().filter(|b| *b < buckets) {
            if let Follow::Start(b) = self.groups.add(b, 1, now) {
                self.follow(Stream::Group(b));
            }
            self.groups.add(b, -1, until);
        }
        for (node, inc) in hello.members {
            if node != self.id.node_id {
                self.heard(&node, inc, None);
            }
        }
        // `heard` asked each of them for every followed stream.
        self.fresh.clear();
        self.status.set_nodes(self.members.live());
        let wait = Duration::from_millis(self.cfg.request_timeout_ms);
        self.warm_by = Some(tokio::time::Instant::now() + wait);
    }

    /// Warm once the snapshots asked for at [`Bridge::seed`] are in (or their time is up).
    fn check_warm(&mut self) {
        let Some(by) = self.warm_by else { return };
        let answered = self.asking.is_empty() && self.again.is_empty();
        if answered || tokio::time::Instant::now() >= by {
            self.warm_by = None;
            self.status.set_warm();
        }
    }

    async fn control(&mut self, c: Control) {
        match c {
            Control::Hello(reply) => {
                let _ = reply.send(self.hello());
            }
            Control::HandOff {
                unpublished,
                budget,
                reply,
            } => {
                let handoff = self.hand_off(unpublished, budget).await;
                let _ = reply.send(handoff);
            }
            Control::TakeOver(handoff) => self.take_over(handoff).await,
            Control::TakeBack { fresh } => self.take_back(fresh).await,
        }
    }

    fn hello(&self) -> Hello {
        Hello {
            node_id: self.id.node_id.clone(),
            incarnation: self.id.incarnation,
            clock: self.hlc.tick(now_ms()),
            follows: self.users.followed(),
            follows_groups: self.groups.followed(),
            members: (self.members.live().into_iter())
                .map(|p| (p.id, p.incarnation))
                .collect(),
            hold_ms: 0,
        }
    }

    /// The old process: publishes what waits (within `budget`), stops speaking for the node,
    /// and says what the new process needs to speak after it.
    async fn hand_off(&mut self, mut unpublished: Vec<String>, budget: Duration) -> Handoff {
        let deadline = tokio::time::Instant::now() + budget;
        while let Ok(out) = self.from_shards.try_recv() {
            self.take(out);
        }
        let waiting: Vec<String> = self.pending.keys().map(|u| u.to_string()).collect();
        let published = tokio::time::timeout_at(deadline, self.flush())
            .await
            .is_ok()
            && self.connected
            && tokio::time::timeout_at(deadline, self.round_trip())
                .await
                .is_ok_and(|ok| ok);
        if !published {
            // Cut short, or not known to have reached the server: the new process publishes
            // them again (with the same clocks: a node that has them ignores them).
            unpublished.extend(waiting);
        }
        self.role = Role::HandedOff;
        for t in self.own_subs.drain(..) {
            t.abort();
        }
        let mut users: HashMap<String, HandoffUser> = HashMap::new();
        for (user, groups) in &self.published_groups {
            users.insert(
                user.to_string(),
                HandoffUser {
                    user: user.to_string(),
                    groups: groups.iter().map(|g| g.to_string()).collect(),
                    unpublished: false,
                },
            );
        }
        // Still waiting for the bus (it is down), or held back in a shard's backlog.
        let held: Vec<String> = self.pending.drain().map(|(u, _)| u.to_string()).collect();
        for user in held.into_iter().chain(unpublished) {
            users
                .entry(user.clone())
                .or_insert_with(|| HandoffUser {
                    user,
                    ..HandoffUser::default()
                })
                .unpublished = true;
        }
        let numbers = |user: bool| -> Vec<(u32, u64)> {
            (self.numbers.iter())
                .filter(|(s, _)| matches!(s, Stream::User(_)) == user)
                .map(|(s, n)| (s.bucket(), *n))
                .collect()
        };
        let handoff = Handoff {
            clock: self.hlc.tick(now_ms()),
            numbers: numbers(true),
            group_numbers: numbers(false),
            numbers_base: self.numbers_base,
            users: users.into_values().collect(),
        };
        tracing::info!(
            streams = handoff.numbers.len() + handoff.group_numbers.len(),
            "cluster: handed the bus over to the new process"
        );
        handoff
    }

    /// Everything this connection published has reached the NATS server: it answers a request
    /// only after it has read what came before it on the connection (`Client::flush` only
    /// writes the socket). The request is one nobody serves, as [`Bridge::probe`]'s.
    async fn round_trip(&self) -> bool {
        if self.client.flush().await.is_err() {
            return false;
        }
        let ask = self
            .client
            .request(self.subjects.probe(&self.id.node_id), Bytes::new());
        match ask.await {
            Ok(_) => true,
            Err(e) => e.kind() == async_nats::RequestErrorKind::NoResponders,
        }
    }

    /// The new process: speaks for the node from here on, numbering on from the old one.
    /// `None` (the old one could not hand over): a new incarnation, as after a restart.
    async fn take_over(&mut self, handoff: Option<Handoff>) {
        if self.role != Role::Waiting {
            return;
        }
        match handoff {
            Some(h) => {
                self.hlc.observe(h.clock);
                let streams = (h.numbers.into_iter().map(|(b, n)| (Stream::User(b), n))).chain(
                    h.group_numbers
                        .into_iter()
                        .map(|(b, n)| (Stream::Group(b), n)),
                );
                self.numbers_base = self.numbers_base.max(h.numbers_base);
                let base = self.numbers_base;
                for (stream, n) in streams.filter(|(s, _)| s.bucket() < self.cfg.buckets) {
                    let mine = self.numbers.entry(stream).or_insert(base);
                    *mine = (*mine).max(n);
                }
                // Shares this process stamped before it heard the old one's clock may sort
                // before one the old process published since: stamped anew, after it.
                let stale: Vec<UserId> = (self.pending.iter())
                    .filter(|(_, c)| c.clock <= h.clock)
                    .map(|(u, _)| u.clone())
                    .collect();
                for u in &stale {
                    self.pending.remove(u);
                }
                if !stale.is_empty() {
                    self.on_owners(stale, |s, users| s.restamp_shares(Some(users)));
                }
                let mut unpublished: Vec<UserId> = Vec::new();
                for u in h.users {
                    let user = UserId::from(u.user.as_str());
                    if !u.groups.is_empty() {
                        let mut groups: Vec<GroupId> =
                            u.groups.iter().map(|g| GroupId::from(g.as_str())).collect();
                        groups.sort_unstable();
                        self.published_groups.entry(user.clone()).or_insert(groups);
                    }
                    if u.unpublished {
                        unpublished.push(user);
                    }
                }
                if !unpublished.is_empty() {
                    self.on_owners(unpublished, |s, users| s.republish_shares(&users));
                }
                tracing::info!("cluster: took the bus over from the old process");
            }
            None => {
                // No id check: the old process may still answer for the id (its bridge is
                // stuck), and a refusal would keep this node off the bus for good.
                self.new_incarnation();
                tracing::warn!(
                    node = %self.id.node_id,
                    "cluster: the old process could not hand the bus over; joining as a new \
                     incarnation (the other nodes resync this node's presence)"
                );
            }
        }
        self.role = Role::Publishing;
        if self.connected {
            if let Err(why) = self.on_connected().await {
                tracing::error!("{why}");
                self.connected = false;
                return;
            }
            self.heartbeat().await;
        }
    }

    /// A new incarnation of this node: the others drop what they held of the old one and
    /// resync from this one (as after a restart).
    fn new_incarnation(&mut self) {
        let inc = super::fresh_incarnation().max(self.id.incarnation + 1);
        self.id.incarnation = inc;
        self.status.set_incarnation(inc);
    }

    /// The old process again (its new process died after taking over): speaks for the node
    /// once more.
    /// - `fresh` (the new process joined as a new incarnation): so does this one.
    /// - Otherwise the new process may have published past this one's numbers and clocks, and
    ///   for users only it had. Every share here is stamped anew, every stream jumps
    ///   [`TAKE_BACK_JUMP`] ahead, and every bucket gets an empty delta at its new number: each
    ///   node following it sees a gap and asks for a snapshot, which puts out the users only
    ///   the dead process had.
    async fn take_back(&mut self, fresh: bool) {
        if self.role != Role::HandedOff {
            return;
        }
        self.role = Role::Publishing;
        if fresh {
            self.new_incarnation();
        } else {
            on_every_shard(&self.doors, |s: &std::rc::Rc<Shard>| s.restamp_shares(None));
            for n in self.numbers.values_mut() {
                *n += TAKE_BACK_JUMP;
            }
            self.numbers_base += TAKE_BACK_JUMP;
            if self.connected {
                for b in 0..self.cfg.buckets {
                    for stream in [Stream::User(b), Stream::Group(b)] {
                        let n = self.numbers.entry(stream).or_insert(self.numbers_base);
                        *n += 1;
                        let delta = Delta {
                            node: self.id.node_id.clone(),
                            inc: self.id.incarnation,
                            bucket: b,
                            n: *n,
                            shares: Vec::new(),
                        };
                        let body = serde_json::to_vec(&delta).unwrap_or_default();
                        Counters::add(&self.status.counters.messages_out, 1);
                        Counters::add(&self.status.counters.bytes_out, body.len() as u64);
                        self.send(stream.subject(&self.subjects), body).await;
                    }
                }
            }
        }
        if self.connected {
            if let Err(why) = self.subscribe_own().await {
                tracing::error!("{why}");
            }
            self.heartbeat().await;
        }
        tracing::warn!(
            fresh,
            "cluster: speaking for this node again (the upgrade's new process died)"
        );
    }

    /// Runs `f` on the owner shard of each of `users`, with its share of them.
    fn on_owners(
        &self,
        users: Vec<UserId>,
        f: impl Fn(&std::rc::Rc<Shard>, Vec<UserId>) + Send + Clone + 'static,
    ) {
        let mut per_shard: Vec<Vec<UserId>> = vec![Vec::new(); self.shards];
        for user in users {
            per_shard[usize::from(owner_of(&user, self.shards))].push(user);
        }
        for (shard, users) in per_shard.into_iter().enumerate() {
            if !users.is_empty() {
                let f = f.clone();
                let job = move |s: &std::rc::Rc<Shard>| f(s, users);
                let _ = self.doors[shard].send(MeshMsg::Invoke(Box::new(job)));
            }
        }
    }

    fn heartbeat_body(&self) -> Vec<u8> {
        let totals = self.local_counts();
        serde_json::to_vec(&Heartbeat {
            node: self.id.node_id.clone(),
            inc: self.id.incarnation,
            info: NodeInfo {
                admin: self.id.admin_url.clone(),
                sessions: totals.0,
                online: totals.1,
            },
        })
        .unwrap_or_default()
    }

    /// Connections here, and online users as this node sees them (from the shards' counters).
    fn local_counts(&self) -> (u64, u64) {
        let Some(shared) = &self.shared else {
            return (0, 0);
        };
        let total = crate::metrics::MetricsSnapshot::sum(&shared.snapshots());
        (total.connections, total.online_users)
    }

    async fn serve(&mut self) {
        let doors_rx = self.doors_rx.take();
        // The shards start after the bridge; wait for their inboxes before anything else.
        if let Some(rx) = doors_rx {
            let got = tokio::task::spawn_blocking(move || rx.recv()).await;
            match got {
                Ok(Ok((doors, shared))) => {
                    self.doors = doors;
                    self.shared = Some(shared);
                }
                _ => return, // the server stopped before its shards started
            }
        }
        match self.inherit.take() {
            Some(hello) => self.seed(hello),
            None => self.status.set_warm(),
        }
        let beat_every = Duration::from_millis((self.cfg.lease_ms / 3).max(1));
        let mut beat = tokio::time::interval(beat_every);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A batch is armed by the first change that waits: published at once when the last
        // batch went out at least `batch_us` ago, else `batch_us` after it. So a lone change
        // travels without delay, a busy bucket still gets at most one message per `batch_us`,
        // and nothing wakes the thread while nothing waits.
        let batch_wait = Duration::from_micros(self.cfg.batch_us);
        let mut due: Option<tokio::time::Instant> = None;
        let mut last_batch = tokio::time::Instant::now() - batch_wait;
        loop {
            self.check_warm();
            if due.is_none() && self.waiting() {
                due = Some((last_batch + batch_wait).max(tokio::time::Instant::now()));
            }
            // Due now: at once, not through the timer (whose resolution is a millisecond).
            if due.is_some_and(|d| d <= tokio::time::Instant::now()) {
                due = None;
                last_batch = tokio::time::Instant::now();
                self.flush().await;
                continue;
            }
            let batch = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now));
            tokio::select! {
                _ = &mut self.stop => break,
                out = self.from_shards.recv_async() => match out {
                    Ok(out) => self.take(out),
                    Err(_) => break, // every shard is gone
                },
                                Some(msg) = self.rx.recv() => self.on_incoming(msg).await,
                Ok(ask) = self.asks.recv_async() => self.scatter(ask),
                Ok(c) = self.ctl.recv_async() => self.control(c).await,
                _ = sleep_until_some(self.warm_by), if self.warm_by.is_some() => self.check_warm(),
                                                _ = batch, if due.is_some() => {
                    due = None;
                    last_batch = tokio::time::Instant::now();
                    self.flush().await;
                }
                _ = beat.tick() => self.beat().await,
            }
        }
        // The shards are gone (or going): what they last changed, sessions closed at shutdown
        // included, goes out now rather than waiting for the others' leases.
        while let Ok(out) = self.from_shards.try_recv() {
            self.take(out);
        }
        // Bounded: a dead bus must not hold the process up at shutdown.
        let deadline = Duration::from_millis(self.cfg.request_timeout_ms);
        let _ = tokio::time::timeout(deadline, self.flush()).await;
        let tasks = (self.subs.drain().map(|(_, t)| t))
            .chain(self.activity_subs.drain().map(|(_, t)| t))
            .chain(self.directed_subs.drain().map(|(_, t)| t))
            .chain(self.own_subs.drain(..))
            .chain(self.heartbeats.take())
            .chain(self.all_users_sub.take());
        for t in tasks {
            t.abort();
        }
        let _ = tokio::time::timeout(deadline, self.client.flush()).await;
    }

    /// Shares and interest from a shard.
    fn take(&mut self, out: Outgoing) {
        let now = now_ms();
        for (bucket, delta) in out.interest {
            if let Follow::Start(b) = self.users.add(bucket, delta, now) {
                self.watch_users(b);
            }
        }
        for (bucket, delta) in out.group_interest {
            if let Follow::Start(b) = self.groups.add(bucket, delta, now) {
                self.follow(Stream::Group(b));
            }
        }
        for (bucket, delta) in out.session_interest {
            if let Follow::Start(b) = self.sessions.add(bucket, delta, now) {
                let task = self.subscribe(self.subjects.directed(b));
                self.directed_subs.insert(b, task);
            }
        }
        for a in out.activity {
            // Ephemeral: while the bus is down it is dropped, not held (a late "typing" misleads).
            if self.connected && self.pending_activity.len() < PENDING_ACTIVITY {
                self.pending_activity.push(a);
            } else {
                Counters::add(&self.status.counters.activity_dropped, 1);
            }
        }
        if self.role == Role::HandedOff {
            return; // the new process publishes them (they reach it as records)
        }
        for (user, share) in out.shares {
            match self.pending.get_mut(&user) {
                Some(h) => {
                    Counters::add(&self.status.counters.coalesced, 1);
                    if share.clock > h.clock {
                        *h = share;
                    }
                }
                None => {
                    self.pending.insert(user, share);
                }
            }
        }
    }

    /// A user bucket has a watcher here now: follow it, or, when every user bucket is followed
    /// already, only its `activity`.
    fn watch_users(&mut self, b: u32) {
        if self.follow_all {
            let task = self.subscribe(self.subjects.activity(b));
            self.activity_subs.insert(b, task);
        } else {
            self.follow(Stream::User(b));
        }
    }

    /// The user buckets followed: all of them, or the watched ones.
    fn users_followed(&self) -> Vec<u32> {
        if self.follow_all {
            (0..self.cfg.buckets).collect()
        } else {
            self.users.followed()
        }
    }

    fn note_followed(&self) {
        let n = self.subs.len() as u64
            + if self.follow_all {
                u64::from(self.cfg.buckets)
            } else {
                0
            };
        self.status
            .followed
            .store(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Starts following `stream`: subscribe, and ask the live nodes for its snapshot.
    fn follow(&mut self, stream: Stream) {
        tracing::trace!(?stream, "cluster: following");
        let task = self.subscribe(stream.subject(&self.subjects));
        self.subs.insert(stream, task);
        if let Stream::User(b) = stream {
            let task = self.subscribe(self.subjects.activity(b));
            self.activity_subs.insert(b, task);
        }
        self.fresh.insert(stream);
        self.note_followed();
    }

    /// Whether a batch has something to do: shares, `activity` or snapshots of newly followed
    /// streams waiting, and a bus to send them on (while it is down, shares wait for the
    /// reconnection, which arms the next batch).
    fn waiting(&self) -> bool {
        let shares = self.role == Role::Publishing && !self.pending.is_empty();
        self.connected && (shares || !self.pending_activity.is_empty() || !self.fresh.is_empty())
    }

    /// A task forwarding `subject`'s messages to the loop (aborting it unsubscribes).
    fn subscribe(&self, subject: String) -> tokio::task::JoinHandle<()> {
        let client = self.client.clone();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            match client.subscribe(subject.clone()).await {
                Ok(sub) => pump(sub, tx).await,
                Err(e) => tracing::warn!("cluster: cannot subscribe to {subject}: {e}"),
            }
        })
    }

    /// Publishes the waiting `activity`, one message per subject. While the bus is down it is
    /// dropped and counted: it is ephemeral, and late typing indicators mislead.
    async fn flush_activity(&mut self) {
        if self.pending_activity.is_empty() {
            return;
        }
        let items = std::mem::take(&mut self.pending_activity);
        let status = self.status.clone();
        let c = &status.counters;
        if !self.connected {
            Counters::add(&c.activity_dropped, items.len() as u64);
            return;
        }
        let buckets = self.cfg.buckets;
        let mut by_subject: BTreeMap<String, Vec<Activity>> = BTreeMap::new();
        for a in items {
            let subject = match &a.to {
                None => self.subjects.activity(bucket_of(&a.user, buckets)),
                Some(to) => self.subjects.directed(bucket_of(to, buckets)),
            };
            by_subject.entry(subject).or_default().push(a);
        }
        for (subject, items) in by_subject {
            let n = items.len() as u64;
            let body = serde_json::to_vec(&ActivityMsg {
                node: self.id.node_id.clone(),
                inc: self.id.incarnation,
                items,
            })
            .unwrap_or_default();
            Counters::add(&c.messages_out, 1);
            Counters::add(&c.bytes_out, body.len() as u64);
            Counters::add(&c.activity_out, n);
            self.send(subject, body).await;
        }
    }

    /// Publishes the waiting shares: one message per stream (more past
    /// [`SHARES_PER_MESSAGE`]), on the user's bucket and on the bucket of each group it is in
    /// or just left; and asks for the snapshots of newly followed streams.
    async fn flush(&mut self) {
        self.flush_activity().await;
        if !self.connected {
            return; // kept, newest per user, until the bus is back
        }
        if !self.fresh.is_empty() {
            let fresh = std::mem::take(&mut self.fresh);
            for peer in self.members.live() {
                self.ask_snapshot(&peer.id, peer.ix, fresh.iter().copied());
            }
        }
        if self.pending.is_empty() || self.role != Role::Publishing {
            return;
        }
        let buckets = self.cfg.buckets;
        let mut streams: BTreeMap<Stream, Vec<(UserId, Contribution)>> = BTreeMap::new();
        for (user, share) in std::mem::take(&mut self.pending) {
            let mut group_buckets: BTreeSet<u32> =
                share.groups.iter().map(|g| bucket_of(g, buckets)).collect();
            let before = if share.groups.is_empty() {
                self.published_groups.remove(&user)
            } else {
                self.published_groups
                    .insert(user.clone(), share.groups.clone())
            };
            group_buckets.extend(before.iter().flatten().map(|g| bucket_of(g, buckets)));
            for gb in group_buckets {
                streams
                    .entry(Stream::Group(gb))
                    .or_default()
                    .push((user.clone(), share.clone()));
            }
            streams
                .entry(Stream::User(bucket_of(&user, buckets)))
                .or_default()
                .push((user, share));
        }
        for (stream, shares) in streams {
            for chunk in shares.chunks(SHARES_PER_MESSAGE) {
                let n = self.numbers.entry(stream).or_insert(self.numbers_base);
                *n += 1;
                let delta = Delta {
                    node: self.id.node_id.clone(),
                    inc: self.id.incarnation,
                    bucket: stream.bucket(),
                    n: *n,
                    shares: chunk.to_vec(),
                };
                let body = serde_json::to_vec(&delta).unwrap_or_default();
                let c = &self.status.counters;
                Counters::add(&c.messages_out, 1);
                Counters::add(&c.bytes_out, body.len() as u64);
                Counters::add(&c.delta_messages_out, 1);
                Counters::add(&c.delta_bytes_out, body.len() as u64);
                if matches!(stream, Stream::User(_)) {
                    Counters::add(&c.deltas_out, chunk.len() as u64);
                }
                self.send(stream.subject(&self.subjects), body).await;
            }
        }
    }

    /// Every `lease_ms / 3`: a heartbeat, expired nodes, buckets to stop following.
    async fn beat(&mut self) {
        let now = now_ms();
        // A `Connected` event can be lost (the client drops events when its queue is full):
        // the connection state says what the events did not.
        let up = self.client.connection_state() == async_nats::connection::State::Connected;
        if !self.connected && up && self.status.bus() != BusState::Refused {
            self.on_event(Event::Connected).await;
        }
        if std::mem::take(&mut self.resync_due) && self.connected {
            let followed = self.followed();
            for peer in self.members.live() {
                self.ask_snapshot(&peer.id, peer.ix, followed.iter().copied());
            }
        }
        if self.connected {
            self.heartbeat().await;
            self.probe();
        }
        for peer in self.members.expire(now, self.cfg.lease_ms) {
            Counters::add(&self.status.counters.lease_expiries, 1);
            tracing::warn!(node = %peer.id, silent_ms = now - peer.last_heard,
                "cluster: node lease expired; dropping its presence");
            self.forget_node(peer.ix, peer.last_heard, &peer.id);
        }
        let mut unwatched = self.users.due(now);
        if self.follow_all {
            // Still followed (the wildcard); only their `activity` goes.
            for b in unwatched.drain(..) {
                if let Some(t) = self.activity_subs.remove(&b) {
                    t.abort();
                }
            }
        }
        let unfollow: Vec<Stream> = (unwatched.into_iter().map(Stream::User))
            .chain(self.groups.due(now).into_iter().map(Stream::Group))
            .collect();
        if !unfollow.is_empty() {
            for stream in &unfollow {
                if let Some(t) = self.subs.remove(stream) {
                    t.abort();
                }
                if let Stream::User(b) = stream {
                    if let Some(t) = self.activity_subs.remove(b) {
                        t.abort();
                    }
                }
                self.gaps.forget_bucket(stream.gaps_key(self.cfg.buckets));
                self.fresh.remove(stream);
            }
            let users = Arc::new(BucketSet::of(self.cfg.buckets, self.users_followed()));
            let groups = Arc::new(BucketSet::of(self.cfg.buckets, self.groups.followed()));
            on_every_shard(&self.doors, move |s: &std::rc::Rc<Shard>| {
                s.retain_remote(&users, &groups)
            });
            self.note_followed();
        }
        for b in self.sessions.due(now) {
            if let Some(t) = self.directed_subs.remove(&b) {
                t.abort();
            }
        }
        // Requests that failed are retried here, once per beat.
        let again = std::mem::take(&mut self.again);
        for (node, buckets) in again {
            if let Some(peer) = self.members.get(&node).cloned() {
                self.ask_snapshot(&peer.id, peer.ix, buckets.into_iter());
            }
        }
        self.status.set_nodes(self.members.live());
    }

    /// Says this node is alive (while this process speaks for it).
    async fn heartbeat(&mut self) {
        if self.role != Role::Publishing {
            return;
        }
        let body = self.heartbeat_body();
        Counters::add(&self.status.counters.messages_out, 1);
        Counters::add(&self.status.counters.bytes_out, body.len() as u64);
        self.send(self.subjects.heartbeat(), body).await;
    }

    /// Publishes, waiting at most `request_timeout_ms` for the client to take the message: a
    /// client stuck on a dead link must not hold the loop (the bus is then taken for lost).
    async fn send(&mut self, subject: String, body: Vec<u8>) {
        let wait = Duration::from_millis(self.cfg.request_timeout_ms);
        match tokio::time::timeout(wait, self.client.publish(subject, body.into())).await {
            Ok(Ok(())) => {}
            // The client is closed (it never is while reconnecting): receivers see the gap in
            // the numbers and resync.
            Ok(Err(e)) => tracing::debug!("cluster: publish failed: {e}"),
            Err(_) => self.bus_lost("publishing to NATS blocked"),
        }
    }

    /// Asks the NATS server for an answer (a request nobody serves: the server itself says "no
    /// responders"). The client pings only after 60 s of silence, and a node that publishes a
    /// heartbeat every `lease_ms / 3` is never silent, so a link that died without a reset (a
    /// partition) would go unnoticed for as long as TCP takes to give up; this notices it within
    /// a beat and a half.
    fn probe(&mut self) {
        if self.probing {
            return;
        }
        self.probing = true;
        let client = self.client.clone();
        let subject = self.subjects.probe(&self.id.node_id);
        let wait = Duration::from_millis((self.cfg.lease_ms / 2).max(100));
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let ask = client.request(subject, Bytes::new());
            let answered = match tokio::time::timeout(wait, ask).await {
                Ok(Ok(_)) => true,
                Ok(Err(e)) => e.kind() == async_nats::RequestErrorKind::NoResponders,
                Err(_) => false,
            };
            let _ = tx.send(Incoming::Probe(answered)).await;
        });
    }

    /// The bus stopped answering while the client still thinks it is connected: hold shares
    /// (newest per user) as for a lost connection, say so, and make the client reconnect.
    fn bus_lost(&mut self, why: &str) {
        if !self.connected {
            return;
        }
        self.connected = false;
        tracing::warn!("cluster: {why}; serving local clients and reconnecting");
        self.status
            .set_bus(BusState::Disconnected, format!("{why}; reconnecting"));
        let client = self.client.clone();
        tokio::spawn(async move {
            let _ = client.force_reconnect().await;
        });
    }

    fn forget_node(&mut self, ix: NodeIx, last_heard: u64, id: &str) {
        self.gaps.forget_node(ix);
        self.asking.remove(id);
        self.again.remove(id);
        on_every_shard(&self.doors, move |s: &std::rc::Rc<Shard>| {
            s.drop_node(ix, last_heard)
        });
        self.status.set_nodes(self.members.live());
    }

    async fn on_incoming(&mut self, msg: Incoming) {
        match msg {
            Incoming::Event(e) => self.on_event(e).await,
            Incoming::Bus(m) => {
                let c = &self.status.counters;
                Counters::add(&c.messages_in, 1);
                Counters::add(&c.bytes_in, m.payload.len() as u64);
                if let Some(bucket) = self.subjects.delta_bucket(&m.subject) {
                    self.on_delta(Stream::User(bucket), &m.payload);
                } else if let Some(bucket) = self.subjects.group_bucket(&m.subject) {
                    self.on_delta(Stream::Group(bucket), &m.payload);
                } else if self.subjects.is_activity(&m.subject) {
                    self.on_activity(&m.payload);
                } else if m.subject.as_str() == self.subjects.heartbeat() {
                    self.on_heartbeat(&m.payload);
                } else if self.role != Role::Publishing {
                    // Late requests to the node's own subjects: the other process answers.
                } else if m.subject.as_str() == self.subjects.snapshot(&self.id.node_id) {
                    self.serve_snapshot(m);
                } else if m.subject.as_str() == self.subjects.admin(&self.id.node_id) {
                    self.answer_admin(m);
                } else if m.subject.as_str() == self.subjects.whois(&self.id.node_id) {
                    if let Some(reply) = m.reply {
                        let body = self.heartbeat_body();
                        self.send(reply.to_string(), body).await;
                    }
                }
            }
            Incoming::Snapshot {
                node,
                ix,
                streams,
                answer,
            } => self.on_snapshot(node, ix, streams, answer),
            Incoming::Probe(answered) => {
                self.probing = false;
                if !answered {
                    let wait = (self.cfg.lease_ms / 2).max(100);
                    self.bus_lost(&format!("NATS did not answer a probe within {wait} ms"));
                }
            }
        }
    }

    async fn on_event(&mut self, e: Event) {
        match e {
            Event::Connected => {
                if self.connected {
                    return; // the first connection, already handled in `connect`
                }
                let again = self.ever_connected;
                if let Err(why) = self.on_connected().await {
                    tracing::error!("{why}");
                    self.connected = false;
                    return;
                }
                if again {
                    Counters::add(&self.status.counters.reconnects, 1);
                    // Whatever was published meanwhile may be lost: ask everyone again.
                    let followed = self.followed();
                    for peer in self.members.live() {
                        self.ask_snapshot(&peer.id, peer.ix, followed.iter().copied());
                    }
                }
            }
            Event::Disconnected => {
                self.connected = false;
                if self.status.bus() != BusState::Refused {
                    self.status.set_bus(
                        BusState::Disconnected,
                        "lost the NATS connection; reconnecting",
                    );
                }
                tracing::warn!(
                    "cluster: lost the NATS connection; serving local clients and \
                    reconnecting"
                );
            }
            Event::SlowConsumer(_) => {
                // The client dropped messages for us. A gap shows when the next message of its
                // stream arrives, but a quiet stream may have no next one: at the next beat
                // every followed stream is asked for again (once per beat at most).
                tracing::debug!("cluster: slow consumer; resyncing at the next beat");
                self.resync_due = true;
            }
            Event::ServerError(_) | Event::ClientError(_) => {
                // An authorization failure, most often: say it where operators look, once per
                // distinct error, and keep retrying (credentials may be fixed server-side).
                let why = format!("NATS refused this node: {e}; retrying");
                if self.status.why() != why {
                    tracing::error!("cluster: {why}");
                }
                if !self.connected && self.status.bus() != BusState::Refused {
                    self.status.set_bus(self.status.bus(), why);
                }
            }
            other => tracing::debug!("cluster: {other}"),
        }
    }

    /// A bus message's body from another node: `None` (counted) when it does not parse, and
    /// `None` when it is this node's id (counted when it is another process's).
    fn peer_message<T: serde::de::DeserializeOwned>(
        &self,
        body: &[u8],
        who: impl Fn(&T) -> (&str, u64),
    ) -> Option<T> {
        let Ok(msg) = serde_json::from_slice::<T>(body) else {
            Counters::add(&self.status.counters.malformed, 1);
            return None;
        };
        let (node, inc) = who(&msg);
        if node == self.id.node_id {
            self.duplicate(inc);
            return None;
        }
        Some(msg)
    }

    fn on_heartbeat(&mut self, body: &[u8]) {
        let Some(hb) = self.peer_message(body, |h: &Heartbeat| (&h.node, h.inc)) else {
            return;
        };
        self.heard(&hb.node, hb.inc, Some(hb.info));
        self.status.set_nodes(self.members.live());
    }

    /// Another process speaks with this node's id (both started while the bus was split, so
    /// neither was refused): said loudly, counted; the operator must rename one.
    fn duplicate(&self, inc: u64) {
        // The same incarnation is this node's other process in an upgrade.
        if inc != self.id.incarnation {
            Counters::add(&self.status.counters.duplicate_ids, 1);
            tracing::error!(node = %self.id.node_id, "cluster: another live process uses this \
                node id; presence from both is mixed up until one is renamed");
        }
    }

    /// Something was heard from `node`: membership, and the snapshots that (re)appearing asks
    /// for. The node's index, unless the message is stale.
    fn heard(&mut self, node: &str, inc: u64, info: Option<NodeInfo>) -> Option<NodeIx> {
        match self.members.heard(node, inc, now_ms(), info) {
            Heard::Known(ix) => Some(ix),
            Heard::Appeared(ix) => {
                tracing::info!(node, "cluster: node joined");
                let followed = self.followed();
                self.ask_snapshot(node, ix, followed.into_iter());
                Some(ix)
            }
            Heard::Restarted {
                old,
                last_heard,
                new,
            } => {
                tracing::info!(node, "cluster: node restarted");
                self.forget_node(old, last_heard, node);
                let followed = self.followed();
                self.ask_snapshot(node, new, followed.into_iter());
                Some(new)
            }
            Heard::Stale => None,
        }
    }

    /// Every followed stream.
    fn followed(&self) -> Vec<Stream> {
        (self.users_followed().into_iter().map(Stream::User))
            .chain(self.groups.followed().into_iter().map(Stream::Group))
            .collect()
    }

    fn follows(&self, stream: Stream) -> bool {
        match stream {
            Stream::User(b) => (self.follow_all && b < self.cfg.buckets) || self.users.follows(b),
            Stream::Group(b) => self.groups.follows(b),
        }
    }

    fn on_delta(&mut self, stream: Stream, body: &[u8]) {
        let bucket = stream.bucket();
        let Some(d) = self.peer_message(body, |d: &Delta| (&d.node, d.inc)) else {
            return;
        };
        if d.bucket != bucket {
            Counters::add(&self.status.counters.malformed, 1);
            return;
        }
        let Some(ix) = self.heard(&d.node, d.inc, None) else {
            return;
        };
        if !self.follows(stream) {
            return; // a late message of a stream just unfollowed
        }
        match self.gaps.see(ix, stream.gaps_key(self.cfg.buckets), d.n) {
            Seen::Old => return,
            Seen::Gap { missed } => {
                Counters::add(&self.status.counters.gaps, 1);
                tracing::debug!(node = %d.node, ?stream, missed, "cluster: gap; asking for a snapshot");
                self.ask_snapshot(&d.node, ix, std::iter::once(stream));
            }
            Seen::InOrder => {}
        }
        Counters::add(&self.status.counters.deltas_in, d.shares.len() as u64);
        tracing::trace!(node = %d.node, ?stream, n = d.n, shares = d.shares.len(), "cluster: delta");
        self.apply(ix, d.shares);
    }

    /// Asks the nodes of `ask` its admin question, concurrently, each within the deadline.
    fn scatter(&self, ask: super::AdminAsk) {
        let targets: Vec<String> = match &ask.only {
            Some(n) => vec![n.clone()],
            None => self.members.live().into_iter().map(|p| p.id).collect(),
        };
        let client = self.client.clone();
        let subjects = self.subjects.clone();
        let connected = self.connected;
        tokio::spawn(async move {
            let body = Bytes::from(serde_json::to_vec(&ask.call).unwrap_or_default());
            let asks = targets.into_iter().map(|node| {
                let req = client.request(subjects.admin(&node), body.clone());
                async move {
                    let got = match connected {
                        false => None,
                        true => tokio::time::timeout(ask.deadline, req)
                            .await
                            .ok()
                            .and_then(Result::ok)
                            .and_then(|m| serde_json::from_slice(&m.payload).ok()),
                    };
                    (node, got)
                }
            });
            let mut out = super::Scattered::default();
            for (node, got) in futures_util::future::join_all(asks).await {
                match got {
                    Some(answer) => out.answers.push((node, answer)),
                    None => out.missing.push(node),
                }
            }
            let _ = ask.reply.send(out);
        });
    }

    /// Answers another node's admin question on shard 0 (the admin port's own code, set with
    /// [`super::Status::serve_admin_with`]); no answer in time means none at all (the asker
    /// names this node as missing).
    fn answer_admin(&self, m: Message) {
        let (Some(reply), Ok(call), Some(serve)) = (
            m.reply,
            serde_json::from_slice::<super::AdminCall>(&m.payload),
            self.status.local_admin(),
        ) else {
            Counters::add(&self.status.counters.malformed, 1);
            return;
        };
        let (tx, rx) = flume::bounded(1);
        let job = move |s: &std::rc::Rc<Shard>| serve(s, call, tx);
        if self.doors[0].send(MeshMsg::Invoke(Box::new(job))).is_err() {
            return;
        }
        let client = self.client.clone();
        let deadline = Duration::from_millis(self.cfg.request_timeout_ms);
        tokio::spawn(async move {
            if let Ok(Ok(answer)) = tokio::time::timeout(deadline, rx.recv_async()).await {
                let body = serde_json::to_vec(&answer).unwrap_or_default();
                let _ = client.publish(reply, body.into()).await;
            }
        });
    }

    /// `activity` from another node: to the owner shard of the user whose watchers get it, or
    /// of the user whose sessions get it.
    fn on_activity(&mut self, body: &[u8]) {
        let Some(msg) = self.peer_message(body, |m: &ActivityMsg| (&m.node, m.inc)) else {
            return;
        };
        Counters::add(&self.status.counters.activity_in, msg.items.len() as u64);
        for a in msg.items {
            let owner = owner_of(a.to.as_deref().unwrap_or(&a.user), self.shards);
            let job = move |s: &std::rc::Rc<Shard>| s.relay_activity(&a.user, &a.kind, a.ts, a.to);
            let _ = self.doors[usize::from(owner)].send(MeshMsg::Invoke(Box::new(job)));
        }
    }

    /// Whether a share's clock is believable: not more than [`MAX_CLOCK_AHEAD_MS`] ahead of this
    /// node's wall clock. A node whose clock runs far ahead (or a forged message) would otherwise
    /// drag every node's clock, and every user's `seq`, with it for good. Refused shares are
    /// counted (`presenced_cluster_clock_ahead_total`) and said in the log.
    fn believable(&self, share: &Contribution) -> bool {
        if clock_believable(share.clock, now_ms()) {
            return true;
        }
        if Counters::get(&self.status.counters.clock_ahead) == 0 {
            tracing::error!(
                "cluster: a node's clock is more than {MAX_CLOCK_AHEAD_MS} ms ahead of this \
                 one's; its presence is refused until the clocks agree (check NTP)"
            );
        }
        Counters::add(&self.status.counters.clock_ahead, 1);
        false
    }

    /// Routes shares heard from `ix` to their owner shards.
    fn apply(&self, ix: NodeIx, shares: Vec<(UserId, Contribution)>) {
        let mut per_shard: Vec<Vec<(UserId, Contribution)>> = vec![Vec::new(); self.shards];
        for (user, share) in shares {
            if self.believable(&share) {
                self.hlc.observe(share.clock);
                per_shard[usize::from(owner_of(&user, self.shards))].push((user, share));
            }
        }
        for (shard, shares) in per_shard.into_iter().enumerate() {
            if shares.is_empty() {
                continue;
            }
            let status = self.status.clone();
            let job = move |s: &std::rc::Rc<Shard>| {
                let now = now_ms();
                let oldest = shares.iter().map(|(_, c)| c.clock).min().unwrap_or(0);
                s.apply_remote(ix, shares);
                let lag_ms = now.saturating_sub(Hlc::millis(oldest));
                status.record_latency(lag_ms.saturating_mul(1_000));
            };
            let _ = self.doors[shard].send(MeshMsg::Invoke(Box::new(job)));
        }
    }

    /// Asks `node` for its shares of `streams` (merged into a request already in flight).
    fn ask_snapshot(&mut self, node: &str, ix: NodeIx, streams: impl Iterator<Item = Stream>) {
        let streams: BTreeSet<Stream> = streams.collect();
        if streams.is_empty() || !self.connected {
            if !streams.is_empty() {
                self.again
                    .entry(node.to_owned())
                    .or_default()
                    .extend(streams);
            }
            return;
        }
        if let Some(waiting) = self.asking.get_mut(node) {
            waiting.extend(streams);
            return;
        }
        self.asking.insert(node.to_owned(), BTreeSet::new());
        Counters::add(&self.status.counters.snapshots_requested, 1);
        let client = self.client.clone();
        let subject = self.subjects.snapshot(node);
        let pick = |user: bool| -> Vec<u32> {
            streams
                .iter()
                .filter(|s| matches!(s, Stream::User(_)) == user)
                .map(|s| s.bucket())
                .collect()
        };
        let req = SnapRequest {
            from: self.id.node_id.clone(),
            buckets: pick(true),
            groups: pick(false),
        };
        let timeout = Duration::from_millis(self.cfg.request_timeout_ms);
        let tx = self.tx.clone();
        let node = node.to_owned();
        tokio::spawn(async move {
            let answer = tokio::time::timeout(timeout, fetch_snapshot(client, subject, &req))
                .await
                .unwrap_or_else(|_| Err("no whole answer in time".into()));
            let _ = tx
                .send(Incoming::Snapshot {
                    node,
                    ix,
                    streams: streams.into_iter().collect(),
                    answer,
                })
                .await;
        });
    }

    fn on_snapshot(
        &mut self,
        node: String,
        ix: NodeIx,
        streams: Vec<Stream>,
        answer: Result<Snapshot, String>,
    ) {
        let queued = self.asking.remove(&node).unwrap_or_default();
        let live = self.members.get(&node).map(|p| (p.ix, p.incarnation));
        match (answer, live) {
            (Ok(snap), Some(_)) if !clock_believable(snap.clock, now_ms()) => {
                // Its clock would become tombstones' clocks, and `seq`s: refused whole.
                Counters::add(&self.status.counters.clock_ahead, 1);
                tracing::warn!(%node, "cluster: a snapshot stamped far ahead of this node's clock was refused");
            }
            (Ok(snap), Some((now_ix, inc))) if now_ix == ix && inc == snap.inc => {
                tracing::trace!(%node, shares = snap.shares.len(), ?streams, "cluster: snapshot");
                let buckets = self.cfg.buckets;
                let covered = (snap.covered.iter().map(|(b, n)| (Stream::User(*b), *n))).chain(
                    snap.covered_groups
                        .iter()
                        .map(|(b, n)| (Stream::Group(*b), *n)),
                );
                for (stream, n) in covered {
                    if stream.bucket() < buckets {
                        self.gaps.covered(ix, stream.gaps_key(buckets), n);
                    }
                }
                // Only what is still followed counts: an unfollowed stream's shares are dropped.
                let followed: Vec<Stream> =
                    streams.into_iter().filter(|s| self.follows(*s)).collect();
                let of_kind = |user: bool| {
                    BucketSet::of(
                        buckets,
                        followed
                            .iter()
                            .filter(|s| matches!(s, Stream::User(_)) == user)
                            .map(|s| s.bucket()),
                    )
                };
                let scope = Arc::new(Scope {
                    users: of_kind(true),
                    groups: of_kind(false),
                    followed: BucketSet::of(buckets, self.users_followed()),
                    followed_groups: BucketSet::of(buckets, self.groups.followed()),
                });
                let mut per_shard: Vec<Vec<(UserId, Contribution)>> = vec![Vec::new(); self.shards];
                for (user, share) in snap.shares {
                    let wanted = scope.users.holds(&user)
                        || share.groups.iter().any(|g| scope.groups.holds(g));
                    if wanted && self.believable(&share) {
                        self.hlc.observe(share.clock);
                        per_shard[usize::from(owner_of(&user, self.shards))].push((user, share));
                    }
                }
                // Every shard hears it, with or without shares: a share it holds from this node
                // and the snapshot leaves out is gone.
                for (shard, shares) in per_shard.into_iter().enumerate() {
                    let scope = scope.clone();
                    let clock = snap.clock;
                    let job = move |s: &std::rc::Rc<Shard>| {
                        s.apply_remote_snapshot(ix, shares, &scope, clock)
                    };
                    let _ = self.doors[shard].send(MeshMsg::Invoke(Box::new(job)));
                }
            }
            (Ok(_), _) => {} // the node restarted or died meanwhile: its new self is asked anew
            (Err(why), Some((now_ix, _))) if now_ix == ix => {
                Counters::add(&self.status.counters.snapshots_failed, 1);
                tracing::debug!(%node, "cluster: snapshot request failed: {why}; retrying");
                self.again.entry(node.clone()).or_default().extend(streams);
            }
            (Err(_), _) => {}
        }
        if !queued.is_empty() {
            if let Some(peer) = self.members.get(&node).cloned() {
                self.ask_snapshot(&peer.id, peer.ix, queued.into_iter());
            }
        }
    }

    /// Answers a snapshot request: the shares of the asked buckets from every shard, in
    /// chunks, to the request's reply subject. The clock and the numbers are read first, so
    /// what changes while the shards are asked is newer than the answer says (and its deltas
    /// follow).
    fn serve_snapshot(&mut self, m: Message) {
        let (Some(reply), Ok(req)) = (m.reply, serde_json::from_slice::<SnapRequest>(&m.payload))
        else {
            Counters::add(&self.status.counters.malformed, 1);
            return;
        };
        Counters::add(&self.status.counters.snapshots_served, 1);
        let buckets = self.cfg.buckets;
        let covered_of = |stream: fn(u32) -> Stream, asked: &[u32]| -> Vec<(u32, u64)> {
            asked
                .iter()
                .filter(|b| **b < buckets)
                .map(|b| {
                    let n = self.numbers.get(&stream(*b)).copied();
                    (*b, n.unwrap_or(self.numbers_base))
                })
                .collect()
        };
        let covered = covered_of(Stream::User, &req.buckets);
        let covered_groups = covered_of(Stream::Group, &req.groups);
        let clock = self.hlc.tick(now_ms());
        let users = Arc::new(BucketSet::of(buckets, covered.iter().map(|(b, _)| *b)));
        let groups = Arc::new(BucketSet::of(
            buckets,
            covered_groups.iter().map(|(b, _)| *b),
        ));
        let doors = self.doors.clone();
        let client = self.client.clone();
        let (node, inc) = (self.id.node_id.clone(), self.id.incarnation);
        let deadline = Duration::from_millis(self.cfg.request_timeout_ms);
        // The shards hold the newest shares; those still waiting to be published are the
        // same or older, so the answer reads the shards.
        tokio::spawn(async move {
            let mut shares = Vec::new();
            for door in &doors {
                let (tx, rx) = flume::bounded(1);
                let (users, groups) = (users.clone(), groups.clone());
                let job = move |s: &std::rc::Rc<Shard>| {
                    let _ = tx.send(s.local_shares(&users, &groups));
                };
                if door
                    .send_async(MeshMsg::Invoke(Box::new(job)))
                    .await
                    .is_err()
                {
                    return;
                }
                match tokio::time::timeout(deadline, rx.recv_async()).await {
                    Ok(Ok(part)) => shares.extend(part),
                    _ => return, // no answer: the asker times out and retries
                }
            }
            let mut chunks: Vec<&[(UserId, Contribution)]> =
                shares.chunks(SHARES_PER_MESSAGE).collect();
            if chunks.is_empty() {
                chunks.push(&[]);
            }
            let count = chunks.len();
            for (i, chunk) in chunks.into_iter().enumerate() {
                let body = SnapChunk {
                    node: node.clone(),
                    inc,
                    clock,
                    covered: if i == 0 { covered.clone() } else { Vec::new() },
                    covered_groups: if i == 0 {
                        covered_groups.clone()
                    } else {
                        Vec::new()
                    },
                    shares: chunk.to_vec(),
                    last: i + 1 == count,
                };
                let body = serde_json::to_vec(&body).unwrap_or_default();
                if client.publish(reply.clone(), body.into()).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// Sleeps until `at` (for ever when `None`; the branch is off then anyway).
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// How long `start` waits for the bus before serving without it.
fn self_wait(cfg: &ClusterConfig) -> u64 {
    cfg.request_timeout_ms.clamp(200, 2_000)
}

/// Credentials and TLS from the config.
async fn auth(mut opts: ConnectOptions, cfg: &ClusterConfig) -> Result<ConnectOptions, String> {
    if let (Some(u), Some(p)) = (&cfg.user, &cfg.password) {
        opts = opts.user_and_password(u.clone(), p.clone());
    }
    if let Some(t) = &cfg.token {
        opts = opts.token(t.clone());
    }
    if let Some(path) = &cfg.credentials_file {
        opts = opts
            .credentials_file(path)
            .await
            .map_err(|e| format!("cluster.credentials_file {}: {e}", path.display()))?;
    }
    if let Some(ca) = &cfg.tls_ca {
        if !ca.is_file() {
            return Err(format!(
                "cluster.tls_ca {}: not a readable file",
                ca.display()
            ));
        }
        opts = opts.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&cfg.tls_cert, &cfg.tls_key) {
        for (k, p) in [("tls_cert", cert), ("tls_key", key)] {
            if !p.is_file() {
                return Err(format!("cluster.{k} {}: not a readable file", p.display()));
            }
        }
        opts = opts.add_client_certificate(cert.clone(), key.clone());
    }
    if cfg.tls_required {
        opts = opts.require_tls(true);
    }
    Ok(opts)
}

/// Forwards a subscription's messages to the loop (a task; aborting it unsubscribes).
fn forward(sub: async_nats::Subscriber, tx: mpsc::Sender<Incoming>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(pump(sub, tx))
}

async fn pump(mut sub: async_nats::Subscriber, tx: mpsc::Sender<Incoming>) {
    while let Some(m) = sub.next().await {
        if tx.send(Incoming::Bus(m)).await.is_err() {
            return;
        }
    }
}

/// Sends a snapshot request and gathers its chunks.
async fn fetch_snapshot(
    client: Client,
    subject: String,
    req: &SnapRequest,
) -> Result<Snapshot, String> {
    let inbox = client.new_inbox();
    let mut sub = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| e.to_string())?;
    let body = serde_json::to_vec(req).map_err(|e| e.to_string())?;
    client
        .publish_with_reply(subject, inbox, body.into())
        .await
        .map_err(|e| e.to_string())?;
    let mut snap: Option<Snapshot> = None;
    while let Some(m) = sub.next().await {
        if m.status
            .is_some_and(|s| s == async_nats::StatusCode::NO_RESPONDERS)
        {
            return Err("the node does not answer (no responders)".into());
        }
        let chunk: SnapChunk = serde_json::from_slice(&m.payload).map_err(|e| e.to_string())?;
        let s = snap.get_or_insert_with(|| Snapshot {
            inc: chunk.inc,
            clock: chunk.clock,
            covered: Vec::new(),
            covered_groups: Vec::new(),
            shares: Vec::new(),
        });
        s.covered.extend(chunk.covered);
        s.covered_groups.extend(chunk.covered_groups);
        s.shares.extend(chunk.shares);
        if chunk.last {
            return snap.ok_or_else(|| "empty answer".into());
        }
    }
    Err("the answer stopped half-way".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presence::contrib::HLC_LOGICAL_BITS;

    #[test]
    fn a_clock_far_ahead_is_not_believed() {
        let now = 1_800_000_000_000;
        assert!(clock_believable(now << HLC_LOGICAL_BITS, now));
        assert!(clock_believable(
            (now + MAX_CLOCK_AHEAD_MS) << HLC_LOGICAL_BITS,
            now
        ));
        assert!(!clock_believable(
            (now + MAX_CLOCK_AHEAD_MS + 1) << HLC_LOGICAL_BITS,
            now
        ));
        assert!(!clock_believable(u64::MAX, now), "a forged clock");
        assert!(
            clock_believable(0, now),
            "behind is fine: the merge orders it"
        );
    }
}
