//! The mesh: one bounded `flume` inbox per shard, and a sender to every inbox on every shard.
//!
//! Messages between a pair of shards are FIFO, which is what keeps each user's events in `seq`
//! order. Sending never blocks the shard: when a peer's inbox is full, messages wait in a
//! per-peer overflow queue, drained in order by a task that awaits capacity.
//!
//! Every message has a delivery `Class`, because losing one kind is harmless and losing
//! another corrupts state for good:
//! - `Class::State` (watch/unwatch, snapshots, invoked jobs such as socket hand-offs,
//!   shutdown): never dropped. A lost `Watch` or `Snapshot` would leave a subscription pending
//!   forever; a lost `Unwatch` would leak a watcher count. Their volume is bounded by
//!   *admission* instead: while any shard's overflow holds more than `mesh.overflow_max_bytes`,
//!   the mesh is [`congested`](Mesh::congested) and shards refuse new work (a `subscribe` gets
//!   `overloaded`, an upgrade gets 503), so state traffic is only what already-admitted work
//!   produces.
//! - `Class::Latest` (presence updates, group member changes and group events): a newer one
//!   for the same key replaces a queued older one in place (the key keeps its place in the
//!   stream); a snapshot is a barrier, so an update queued before it is never replaced by one
//!   sent after it, and FIFO order with snapshots is kept. Never dropped, so every watcher
//!   converges to the newest state.
//! - `Class::Ephemeral` (`activity`): dropped, and counted, while the overflow is over its
//!   bound.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::num::NonZeroU64;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use hashbrown::HashMap;

use super::Shard;
use crate::metrics::{PeerCounters, ShardMetrics};
use crate::presence::watchers::ShardIx;
use crate::presence::{GroupId, PresenceState, SessionId, UserId};

/// Work for another shard, run on that shard's thread with its [`Shard`] (Seastar's
/// `invoke_on`). Built by [`Shard::invoke_on`](super::Shard::invoke_on) and friends.
pub type Job = Box<dyn FnOnce(&Rc<Shard>) + Send>;

/// Everything shards say to each other. Owned and `Send`.
pub enum MeshMsg {
    /// Session `session` on shard `from` subscribes to `user`; answer with `Snapshot`. `gen`
    /// names this subscription attempt, so a snapshot meant for an earlier, since-cancelled
    /// attempt is never taken for the current one.
    Watch {
        user: UserId,
        from: ShardIx,
        session: SessionId,
        gen: NonZeroU64,
    },
    Unwatch {
        user: UserId,
        from: ShardIx,
    },
    Snapshot {
        session: SessionId,
        gen: NonZeroU64,
        state: Arc<PresenceState>,
    },
    /// A user's aggregate changed: deliver to local subscribers. `origin`: when the owner
    /// published it (fan-out latency).
    Update {
        state: Arc<PresenceState>,
        origin: Instant,
    },
    WatchGroup {
        group: GroupId,
        from: ShardIx,
        session: SessionId,
        gen: NonZeroU64,
    },
    UnwatchGroup {
        group: GroupId,
        from: ShardIx,
    },
    GroupSnapshot {
        session: SessionId,
        gen: NonZeroU64,
        group: GroupId,
        members: Vec<PresenceState>,
    },
    /// To the group's owner: a member's state as seen through the group.
    GroupMember {
        group: GroupId,
        state: Arc<PresenceState>,
        origin: Instant,
    },
    /// From the group's owner to watching shards.
    GroupEvent {
        group: GroupId,
        state: Arc<PresenceState>,
        origin: Instant,
    },
    /// Ephemeral: to watchers of `user`, or to the sessions of `to`.
    Activity {
        user: UserId,
        kind: Arc<str>,
        ts: u64,
        to: Option<UserId>,
    },
    /// Run this job on the receiving shard.
    Invoke(Job),
    /// Stop accepting, close sessions with 1001, exit.
    Shutdown,
}

impl std::fmt::Debug for MeshMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.kind())
    }
}

/// How a message may be treated when a peer cannot keep up (module docs).
#[derive(Debug, PartialEq, Eq)]
enum Class {
    State,
    Latest(LatestKey),
    Ephemeral,
}

/// What a [`Class::Latest`] message is the newest state of.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum LatestKey {
    User(UserId),
    Member(GroupId, UserId),
    GroupEvent(GroupId, UserId),
}

impl MeshMsg {
    pub fn kind(&self) -> &'static str {
        match self {
            MeshMsg::Watch { .. } => "watch",
            MeshMsg::Unwatch { .. } => "unwatch",
            MeshMsg::Snapshot { .. } => "snapshot",
            MeshMsg::Update { .. } => "update",
            MeshMsg::WatchGroup { .. } => "watch_group",
            MeshMsg::UnwatchGroup { .. } => "unwatch_group",
            MeshMsg::GroupSnapshot { .. } => "group_snapshot",
            MeshMsg::GroupMember { .. } => "group_member",
            MeshMsg::GroupEvent { .. } => "group_event",
            MeshMsg::Activity { .. } => "activity",
            MeshMsg::Invoke(_) => "invoke",
            MeshMsg::Shutdown => "shutdown",
        }
    }

    fn class(&self) -> Class {
        match self {
            MeshMsg::Update { state, .. } => Class::Latest(LatestKey::User(state.user.clone())),
            MeshMsg::GroupMember { group, state, .. } => {
                Class::Latest(LatestKey::Member(group.clone(), state.user.clone()))
            }
            MeshMsg::GroupEvent { group, state, .. } => {
                Class::Latest(LatestKey::GroupEvent(group.clone(), state.user.clone()))
            }
            MeshMsg::Activity { .. } => Class::Ephemeral,
            _ => Class::State,
        }
    }

    /// Memory this message holds while queued, approximately (its strings counted once, shared
    /// or not): what `mesh.overflow_max_bytes` bounds.
    fn approx_bytes(&self) -> usize {
        fn state(s: &PresenceState) -> usize {
            std::mem::size_of::<PresenceState>()
                + s.user.len()
                + s.text.as_ref().map_or(0, |t| t.len())
        }
        std::mem::size_of::<MeshMsg>()
            + match self {
                MeshMsg::Watch { user, .. } | MeshMsg::Unwatch { user, .. } => user.len(),
                MeshMsg::WatchGroup { group, .. } | MeshMsg::UnwatchGroup { group, .. } => {
                    group.len()
                }
                MeshMsg::Snapshot { state: s, .. } | MeshMsg::Update { state: s, .. } => state(s),
                MeshMsg::GroupMember {
                    group, state: s, ..
                }
                | MeshMsg::GroupEvent {
                    group, state: s, ..
                } => group.len() + state(s),
                MeshMsg::GroupSnapshot { group, members, .. } => {
                    group.len() + members.iter().map(state).sum::<usize>()
                }
                MeshMsg::Activity { user, kind, to, .. } => {
                    user.len() + kind.len() + to.as_ref().map_or(0, |t| t.len())
                }
                // A job's captures are opaque; a hand-off carries a socket and a few hundred
                // bytes of request.
                MeshMsg::Invoke(_) => 512,
                MeshMsg::Shutdown => 0,
            }
    }
}

/// One peer's overflow queue.
#[derive(Default)]
struct Overflow {
    /// Each message with its [`MeshMsg::approx_bytes`]. A newer message of the same
    /// [`LatestKey`] replaces the queued one in its slot.
    queue: VecDeque<(MeshMsg, usize)>,
    /// Absolute position of `queue[0]`.
    head: u64,
    /// Position of the queued message per latest-key.
    latest: HashMap<LatestKey, u64>,
    /// A drain task is running (new messages must queue behind it to stay FIFO).
    draining: bool,
}

/// This shard's side of the mesh.
pub struct Mesh {
    peers: Vec<flume::Sender<MeshMsg>>,
    overflow: Vec<RefCell<Overflow>>,
    /// Bytes waiting in all of this shard's overflow queues.
    bytes: Cell<usize>,
    /// The most `bytes` reached since the queues were last empty (memory is given back to the
    /// system after a large burst drains).
    peak: Cell<usize>,
    /// After a large burst: keep trimming the heap every [`TRIM_SETTLE_MS`] until this time
    /// (ms since epoch), since what the burst left behind (snapshots in outboxes, sessions that
    /// close afterwards) is freed after the mesh itself has drained.
    trim_until: Cell<u64>,
    /// The next of those trims (ms since epoch).
    trim_next: Cell<u64>,
    max_bytes: usize,
    /// Every shard's counters, for [`Mesh::congested`] (each shard's `mesh_overflow_bytes`).
    all: Arc<[Arc<ShardMetrics>]>,
    metrics: Arc<ShardMetrics>,
    /// Messages sent to each peer.
    sent_to: Arc<PeerCounters>,
}

/// Overflow beyond which a drained queue gives its memory back to the OS (`malloc_trim`).
const TRIM_AFTER_BYTES: usize = 1 << 20;
/// After such a drain the heap is trimmed again every `TRIM_SETTLE_MS`, for `TRIM_WINDOW_MS`.
const TRIM_SETTLE_MS: u64 = 3_000;
const TRIM_WINDOW_MS: u64 = 60_000;

impl Mesh {
    pub fn new(
        me: ShardIx,
        peers: Vec<flume::Sender<MeshMsg>>,
        max_bytes: usize,
        all: Arc<[Arc<ShardMetrics>]>,
        sent_to: Arc<PeerCounters>,
    ) -> Rc<Mesh> {
        let n = peers.len();
        Rc::new(Mesh {
            peers,
            overflow: (0..n).map(|_| RefCell::default()).collect(),
            bytes: Cell::new(0),
            peak: Cell::new(0),
            trim_until: Cell::new(0),
            trim_next: Cell::new(0),
            max_bytes,
            metrics: all[usize::from(me)].clone(),
            all,
            sent_to,
        })
    }

    pub fn shards(&self) -> usize {
        self.peers.len()
    }

    /// Whether any shard's overflow is past `mesh.overflow_max_bytes`: new work (subscribes,
    /// upgrades, admin questions) is refused until it drains.
    pub fn congested(&self) -> bool {
        self.all
            .iter()
            .any(|m| ShardMetrics::get(&m.mesh_overflow_bytes) as usize >= self.max_bytes)
    }

    /// Sends `msg` to shard `to` without ever waiting.
    pub fn send(self: &Rc<Self>, to: ShardIx, msg: MeshMsg) {
        let ix = usize::from(to);
        ShardMetrics::inc(&self.metrics.mesh_sent);
        self.sent_to.inc(ix);
        if !self.overflow[ix].borrow().draining {
            match self.peers[ix].try_send(msg) {
                Ok(()) => {}
                Err(flume::TrySendError::Disconnected(_)) => {
                    // The peer stopped (shutdown): nothing will read it.
                    ShardMetrics::inc(&self.metrics.mesh_dropped);
                }
                Err(flume::TrySendError::Full(msg)) => {
                    self.overflow[ix].borrow_mut().draining = true;
                    self.queue(ix, msg);
                    let mesh = self.clone();
                    glommio::spawn_local(async move { mesh.drain(ix).await }).detach();
                }
            }
        } else {
            self.queue(ix, msg);
        }
    }

    fn queue(&self, ix: usize, msg: MeshMsg) {
        let class = msg.class();
        if class == Class::Ephemeral && self.bytes.get() >= self.max_bytes {
            ShardMetrics::inc(&self.metrics.mesh_dropped);
            return;
        }
        let size = msg.approx_bytes();
        let mut q = self.overflow[ix].borrow_mut();
        let q = &mut *q;
        match (&class, &msg) {
            // A newer state of a key still queued takes the queued one's place: the key's
            // position in the stream is kept, so a hot user cannot be pushed back for ever.
            (Class::Latest(key), _) => {
                if let Some(&at) = q.latest.get(key) {
                    let (queued, queued_size) = &mut q.queue[(at - q.head) as usize];
                    *queued = msg;
                    let old_size = std::mem::replace(queued_size, size);
                    self.sub_bytes(old_size);
                    self.add_bytes(size);
                    ShardMetrics::inc(&self.metrics.mesh_coalesced);
                    return;
                }
                let pos = q.head + q.queue.len() as u64;
                q.latest.insert(key.clone(), pos);
            }
            // A snapshot is a barrier for its key's updates: one queued before it must not be
            // replaced by a state that the snapshot's receiver would then take as older news
            // (the update would be applied before the subscription it should follow is live).
            // Later updates queue behind the snapshot instead.
            (_, MeshMsg::Snapshot { state, .. }) => {
                q.latest.remove(&LatestKey::User(state.user.clone()));
            }
            (_, MeshMsg::GroupSnapshot { group, .. }) => {
                q.latest
                    .retain(|k, _| !matches!(k, LatestKey::GroupEvent(g, _) if g == group));
            }
            _ => {}
        }
        ShardMetrics::inc(&self.metrics.mesh_overflowed);
        q.queue.push_back((msg, size));
        self.add_bytes(size);
    }

    fn add_bytes(&self, n: usize) {
        let b = self.bytes.get() + n;
        self.bytes.set(b);
        self.peak.set(self.peak.get().max(b));
        ShardMetrics::set(&self.metrics.mesh_overflow_bytes, b as u64);
    }

    fn sub_bytes(&self, n: usize) {
        let b = self.bytes.get() - n;
        self.bytes.set(b);
        ShardMetrics::set(&self.metrics.mesh_overflow_bytes, b as u64);
    }

    async fn drain(&self, ix: usize) {
        loop {
            let next = {
                let mut q = self.overflow[ix].borrow_mut();
                let Some((msg, size)) = q.queue.pop_front() else {
                    break;
                };
                let pos = q.head;
                q.head += 1;
                if let Class::Latest(key) = msg.class() {
                    if q.latest.get(&key) == Some(&pos) {
                        q.latest.remove(&key);
                    }
                }
                (msg, size)
            };
            let (msg, size) = next;
            let sent = self.peers[ix].send_async(msg).await;
            self.sub_bytes(size);
            if sent.is_err() {
                ShardMetrics::inc(&self.metrics.mesh_dropped);
            }
        }
        // A burst (a mass reconnect: every subscription is a Watch and a Snapshot) can grow
        // this queue to millions of messages; give that memory back.
        {
            let mut q = self.overflow[ix].borrow_mut();
            *q = Overflow::default();
        }
        if self.bytes.get() == 0 && self.peak.get() >= TRIM_AFTER_BYTES {
            self.peak.set(0);
            trim_heap();
            let now = super::now_ms();
            self.trim_next.set(now + TRIM_SETTLE_MS);
            self.trim_until.set(now + TRIM_WINDOW_MS);
        }
    }

    /// Called by the shard's clock: the trims that follow a burst, while it settles.
    pub fn settle(&self, now_ms: u64) {
        if self.bytes.get() == 0
            && now_ms >= self.trim_next.get()
            && now_ms <= self.trim_until.get()
        {
            self.trim_next.set(now_ms + TRIM_SETTLE_MS);
            trim_heap();
        }
    }
}

/// Returns freed heap memory to the operating system (glibc keeps it in its arenas otherwise,
/// and the process's RSS would stay at its peak after a burst).
fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presence::Aggregate;

    fn state(user: &str, seq: u64) -> Arc<PresenceState> {
        Arc::new(PresenceState {
            user: user.into(),
            status: Aggregate::Online,
            text: None,
            devices: 1,
            last_seen: None,
            ts: 0,
            seq,
        })
    }

    fn update(user: &str, seq: u64) -> MeshMsg {
        MeshMsg::Update {
            state: state(user, seq),
            origin: Instant::now(),
        }
    }

    fn seq_of(m: &MeshMsg) -> u64 {
        match m {
            MeshMsg::Update { state, .. } => state.seq,
            MeshMsg::Snapshot { state, .. } => state.seq,
            _ => 0,
        }
    }

    #[test]
    fn classes() {
        assert_eq!(
            update("a", 1).class(),
            Class::Latest(LatestKey::User("a".into()))
        );
        let watch = MeshMsg::Watch {
            user: "a".into(),
            from: 0,
            session: SessionId::from_raw(1),
            gen: NonZeroU64::MIN,
        };
        assert_eq!(watch.class(), Class::State);
        assert_eq!(MeshMsg::Invoke(Box::new(|_| {})).class(), Class::State);
        let activity = MeshMsg::Activity {
            user: "a".into(),
            kind: "typing".into(),
            ts: 0,
            to: None,
        };
        assert_eq!(activity.class(), Class::Ephemeral);
        assert!(update("a", 1).approx_bytes() > std::mem::size_of::<MeshMsg>());
    }

    /// Runs the overflow against a peer inbox of capacity 1 that nobody reads until the end.
    #[test]
    fn overflow_keeps_state_coalesces_latest_and_sheds_ephemeral() {
        glommio::LocalExecutorBuilder::default()
            .spawn(|| async {
                let (mesh, rx, metrics) = one_peer(600);
                mesh.send(0, update("x", 0)); // fills the inbox
                for seq in 1..=50 {
                    mesh.send(0, update("a", seq));
                    mesh.send(0, snapshot("b", seq));
                }
                assert!(mesh.congested(), "past 600 bytes of overflow");
                mesh.send(
                    0,
                    MeshMsg::Activity {
                        user: "a".into(),
                        kind: "typing".into(),
                        ts: 0,
                        to: None,
                    },
                );
                let m = metrics[0].snapshot();
                assert_eq!(m.mesh_dropped, 1, "only the ephemeral message is dropped");
                // The drain task may already hold the first queued update (in flight to the
                // full inbox, no longer replaceable); every later one is replaced by the next.
                assert!(m.mesh_coalesced >= 48, "{m:?}");
                let got = receive(&rx, 2 + 50).await;
                let snapshots: Vec<u64> = got
                    .iter()
                    .filter(|(k, _)| *k == "snapshot")
                    .map(|(_, s)| *s)
                    .collect();
                assert_eq!(
                    snapshots,
                    (1..=50).collect::<Vec<_>>(),
                    "every snapshot, in order"
                );
                let updates: Vec<u64> = got
                    .iter()
                    .filter(|(k, _)| *k == "update")
                    .map(|(_, s)| *s)
                    .collect();
                assert_eq!(
                    updates.last(),
                    Some(&50),
                    "converges to the newest: {updates:?}"
                );
                assert!(updates.windows(2).all(|w| w[0] < w[1]), "{updates:?}");
                // The newest state took the queued one's place, near the front: it did not
                // wait behind 50 snapshots.
                let at = got.iter().position(|m| *m == ("update", 50)).unwrap();
                assert!(at <= 3, "the hot user kept its place: {got:?}");
                while mesh.bytes.get() > 0 {
                    futures_lite::future::yield_now().await;
                }
                assert!(!mesh.congested(), "drained: no longer congested");
                assert_eq!(ShardMetrics::get(&metrics[0].mesh_overflow_bytes), 0);
            })
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn a_snapshot_is_a_barrier_for_its_users_updates() {
        glommio::LocalExecutorBuilder::default()
            .spawn(|| async {
                let (mesh, rx, _) = one_peer(1 << 20);
                mesh.send(0, update("x", 0)); // fills the inbox
                mesh.send(0, update("x", 1)); // queued first: the drain may take it in flight
                mesh.send(0, update("a", 1));
                mesh.send(0, snapshot("a", 1));
                mesh.send(0, update("a", 2));
                mesh.send(0, update("a", 3));
                // Update 1 stays before the snapshot; 2 and 3 come after it, merged into 3.
                let got = receive(&rx, 3).await;
                assert_eq!(got, [("update", 1), ("snapshot", 1), ("update", 3)]);
            })
            .unwrap()
            .join()
            .unwrap();
    }

    /// A one-shard mesh whose inbox holds a single message, allowed `max_bytes` of overflow:
    /// the mesh, its inbox (read by nobody until the test does), and the shards' counters.
    fn one_peer(
        max_bytes: usize,
    ) -> (Rc<Mesh>, flume::Receiver<MeshMsg>, Arc<[Arc<ShardMetrics>]>) {
        let (tx, rx) = flume::bounded::<MeshMsg>(1);
        let metrics: Arc<[Arc<ShardMetrics>]> = vec![Arc::<ShardMetrics>::default()].into();
        let mesh = Mesh::new(
            0,
            vec![tx],
            max_bytes,
            metrics.clone(),
            Arc::new(PeerCounters::new(1)),
        );
        (mesh, rx, metrics)
    }

    fn snapshot(user: &str, seq: u64) -> MeshMsg {
        MeshMsg::Snapshot {
            session: SessionId::from_raw(seq),
            gen: NonZeroU64::MIN,
            state: state(user, seq),
        }
    }

    /// The next `n` messages after the inbox-filling `x` updates, as (kind, seq).
    async fn receive(rx: &flume::Receiver<MeshMsg>, n: usize) -> Vec<(&'static str, u64)> {
        let mut got = Vec::new();
        while got.len() < n {
            let msg = rx.recv_async().await.unwrap();
            if matches!(&msg, MeshMsg::Update { state, .. } if &*state.user == "x") {
                continue;
            }
            got.push((msg.kind(), seq_of(&msg)));
        }
        got
    }
}
