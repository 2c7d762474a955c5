//! A shard: one core's share of the server. It owns, outright and unshared, the users and groups
//! that hash to it (`registry`, `groups`), the sessions of those users, and the local
//! subscription lists that turn one mesh message into many deliveries.
//!
//! The facade rule (Seastar style): an operation on a user or group goes to its owner shard,
//! always through the mesh — a shard's own inbox included, so every operation on a key is
//! handled in one FIFO order and no handler ever re-enters another.
//!
//! - [`session`]: a session's life (open, close, repair) with no socket in it; [`apply`]: what
//!   each client op means.
//! - [`mesh`]: the channels between shards, with a delivery class per message.
//! - [`invoke`]: Seastar's `invoke_on`/`map_reduce`: the one door through which drivers (the
//!   edge, the admin port, history) ask any shard anything.
//! - [`outbox`], [`subs`], [`budget`]: a session's backlog, subscriptions and budgets (pure).
//! - [`tap`]: how recorders (history, the dashboard) hear of sessions and changes.
//! - [`clock`]: token expiry and heartbeats without a timer per session.
//! - [`runtime`]: starting the executors.
//!
//! Nothing here knows the drivers above it (`edge`, `admin`, `history`): they call in, and hear
//! back through taps and the jobs they send.

pub mod apply;
pub mod budget;
pub mod clock;
#[cfg(feature = "fault-injection")]
pub mod faults;
pub mod handover;
pub mod invoke;
pub mod mesh;
pub mod outbox;
pub mod replica;
pub mod runtime;
pub mod session;
pub mod subs;
pub mod tap;

use std::any::Any;
use std::cell::{Cell, Ref, RefCell};
use std::collections::BTreeSet;
use std::num::NonZeroU64;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use hashbrown::HashMap;

use crate::auth::Verifier;
use crate::config::Config;
use crate::metrics::{Latency, ShardMetrics};
use crate::presence::watchers::ShardIx;
use crate::presence::{Change, GroupId, Groups, PresenceState, Registry, SessionId, UserId};
use crate::protocol::{events, OpLimits};
use mesh::{Mesh, MeshMsg};
use outbox::Key;
pub use runtime::Shared;
use session::SubState;
pub use session::{Admission, CloseRequest, Refusal, Session};
use tap::{Listener, Tap};

/// The owner shard of a user or group id: `xxh3(id) mod shards`. xxh3 is a specified,
/// seedless algorithm, so ownership is the same in every process and after every restart (it
/// can later extend to nodes).
pub fn owner_of(id: &str, shards: usize) -> ShardIx {
    debug_assert!(shards > 0 && shards <= usize::from(u16::MAX));
    (xxhash_rust::xxh3::xxh3_64(id.as_bytes()) % shards as u64) as ShardIx
}

/// Where a shard's session counter starts: the start time in seconds × 2^15. An upgrade's new
/// process (or a restarted one) starts above every id the old one handed out unless that one
/// averaged more than 32,768 sessions a second per shard over its whole life, so an id read
/// from the admin API before an upgrade does not name another session after it. Below 2^47
/// until the year 2106 (test-only fake sessions use ids from 2^47 up).
pub fn session_seed(now_ms: u64) -> u64 {
    (now_ms / 1000) << 15
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub struct Shard {
    ix: ShardIx,
    cfg: Arc<Config>,
    verifier: Arc<Verifier>,
    op_limits: OpLimits,
    mesh: Rc<Mesh>,
    metrics: Arc<ShardMetrics>,
    /// Process-wide facts and every shard's counters (read by any thread).
    shared: Arc<Shared>,
    /// Users owned by this shard.
    registry: RefCell<Registry>,
    /// Groups owned by this shard.
    groups: RefCell<Groups>,
    /// Sessions served here (their users are all owned here), impersonations included.
    sessions: RefCell<HashMap<SessionId, Rc<Session>>>,
    /// Live direct subscriptions held by local sessions, per watched user.
    user_subs: RefCell<HashMap<UserId, Vec<SessionId>>>,
    /// Live group subscriptions held by local sessions, per group.
    group_subs: RefCell<HashMap<GroupId, Vec<SessionId>>>,
    /// Read-only impersonations (`/ws?as=`), per impersonated local user.
    observers: RefCell<HashMap<UserId, Vec<SessionId>>>,
    next_session: Cell<u64>,
    /// Subscription-id budgets of the users owned here (one per user, across its sessions).
    subscriptions: RefCell<budget::Subscriptions>,
    /// Token expiry of every local session, sorted: (exp seconds, session). The clock pops
    /// the front instead of keeping a timer per session.
    expiries: RefCell<BTreeSet<(u64, SessionId)>>,
    /// Set once shutdown starts: no new sessions.
    stopping: Cell<bool>,
    /// The empty `groups` and `roles` slices every session without them shares.
    no_groups: Arc<[GroupId]>,
    no_roles: Arc<[Arc<str>]>,
    /// Fan-out latency of deliveries made here, and handshake latency of sessions opened here.
    latency: RefCell<Latency>,
    handshake_latency: RefCell<Latency>,
    /// Listeners registered by drivers at start-up (history, the dashboard's change log).
    taps: RefCell<Vec<Listener>>,
    /// Per-shard state of the drivers (Seastar's `sharded<T>`), one value per type.
    locals: RefCell<HashMap<std::any::TypeId, Rc<dyn Any>>>,
    /// In a cluster: changes the bridge could not take yet ([`replica`]).
    cluster_backlog: replica::BacklogCell,
    /// Set in the old process of an upgrade, from the hand-over on ([`handover`]).
    handover: RefCell<Option<handover::Handover>>,
    /// How to stop what `init` started (the accept loops): at shutdown, or when an upgrade's
    /// new process has taken over.
    stops: RefCell<Vec<runtime::Stop>>,
    /// How to start accepting again (set by the server's `init`).
    relisten: RefCell<Option<handover::Relisten>>,
    /// Tests only: the next publish panics after its first send ([`faults`]).
    #[cfg(feature = "fault-injection")]
    panic_in_publish: Cell<bool>,
}

impl Shard {
    pub fn new(
        ix: ShardIx,
        cfg: Arc<Config>,
        verifier: Arc<Verifier>,
        mesh: Rc<Mesh>,
        shared: Arc<Shared>,
    ) -> Shard {
        // One subscription budget per user with a session here, at most. Its burst: a client
        // may fill its whole allowance at once.
        let limits = &cfg.limits;
        let subscriptions = budget::Subscriptions::new(
            limits.max_connections_per_shard,
            limits.subscriptions_per_second,
            u32::try_from(limits.max_subscriptions).unwrap_or(u32::MAX),
        );
        let (registry, groups) = match &shared.cluster {
            Some(link) => (
                Registry::replicated(link.hlc.clone(), link.buckets),
                Groups::replicated(link.buckets),
            ),
            None => (Registry::new(), Groups::new()),
        };
        Shard {
            ix,
            op_limits: cfg.op_limits(),
            metrics: shared.metrics[usize::from(ix)].clone(),
            cfg,
            verifier,
            mesh,
            shared,
            registry: RefCell::new(registry),
            groups: RefCell::new(groups),
            sessions: RefCell::new(HashMap::new()),
            user_subs: RefCell::new(HashMap::new()),
            group_subs: RefCell::new(HashMap::new()),
            observers: RefCell::new(HashMap::new()),
            next_session: Cell::new(session_seed(now_ms())),
            subscriptions: RefCell::new(subscriptions),
            expiries: RefCell::new(BTreeSet::new()),
            stopping: Cell::new(false),
            no_groups: Arc::from([]),
            no_roles: Arc::from([]),
            latency: RefCell::new(Latency::default()),
            handshake_latency: RefCell::new(Latency::default()),
            taps: RefCell::new(Vec::new()),
            handover: RefCell::new(None),
            stops: RefCell::new(Vec::new()),
            relisten: RefCell::new(None),
            locals: RefCell::new(HashMap::new()),
            cluster_backlog: Default::default(),
            #[cfg(feature = "fault-injection")]
            panic_in_publish: Cell::new(false),
        }
    }

    // --- Read access for drivers. ---

    pub fn ix(&self) -> ShardIx {
        self.ix
    }

    pub fn cfg(&self) -> &Config {
        &self.cfg
    }

    pub fn verifier(&self) -> &Verifier {
        &self.verifier
    }

    pub fn op_limits(&self) -> &OpLimits {
        &self.op_limits
    }

    pub fn metrics(&self) -> &Arc<ShardMetrics> {
        &self.metrics
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub fn shards(&self) -> usize {
        self.mesh.shards()
    }

    pub fn registry(&self) -> Ref<'_, Registry> {
        self.registry.borrow()
    }

    pub fn groups(&self) -> Ref<'_, Groups> {
        self.groups.borrow()
    }

    pub fn latency(&self) -> Ref<'_, Latency> {
        self.latency.borrow()
    }

    pub fn handshake_latency(&self) -> Ref<'_, Latency> {
        self.handshake_latency.borrow()
    }

    /// Starts a new recent-latency window (every few seconds).
    pub fn rotate_latency(&self) {
        self.latency.borrow_mut().rotate();
        self.handshake_latency.borrow_mut().rotate();
    }

    /// A handshake finished (accept to session open), for `presenced_handshake_seconds`.
    pub fn record_handshake(&self, started: Instant) {
        let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.handshake_latency.borrow_mut().record(us);
    }

    pub fn stopping(&self) -> bool {
        self.stopping.get()
    }

    /// Whether the mesh is congested: new work is refused (see [`mesh`]).
    pub fn congested(&self) -> bool {
        self.mesh.congested()
    }

    pub fn owner(&self, id: &str) -> ShardIx {
        owner_of(id, self.mesh.shards())
    }

    /// A session served here.
    pub fn session(&self, id: SessionId) -> Option<Rc<Session>> {
        self.sessions.borrow().get(&id).cloned()
    }

    /// Sessions (devices, then impersonations) of a local user.
    pub fn sessions_of(&self, user: &str) -> Vec<Rc<Session>> {
        let mut ids = self.registry.borrow().session_ids(user);
        ids.extend(self.observers_of(user));
        let all = self.sessions.borrow();
        ids.iter().filter_map(|id| all.get(id).cloned()).collect()
    }

    /// Sessions served here, in no order.
    pub fn all_sessions(&self) -> Vec<Rc<Session>> {
        self.sessions.borrow().values().cloned().collect()
    }

    pub fn session_count(&self) -> usize {
        self.sessions.borrow().len()
    }

    /// Impersonations watching `user` as that user.
    pub fn observers_of(&self, user: &str) -> Vec<SessionId> {
        self.observers
            .borrow()
            .get(user)
            .cloned()
            .unwrap_or_default()
    }

    // --- Drivers' per-shard state and listeners (set up at start-up). ---

    /// Stores a driver's per-shard value (one per type).
    pub fn insert_local<T: 'static>(&self, value: Rc<T>) {
        self.locals
            .borrow_mut()
            .insert(std::any::TypeId::of::<T>(), value);
    }

    /// A driver's per-shard value, if it set one up.
    pub fn local<T: 'static>(&self) -> Option<Rc<T>> {
        let any = self
            .locals
            .borrow()
            .get(&std::any::TypeId::of::<T>())
            .cloned()?;
        any.downcast::<T>().ok()
    }

    /// Registers a listener for sessions and changes ([`tap`]).
    pub fn add_tap(&self, listener: Listener) {
        self.taps.borrow_mut().push(listener);
    }

    fn tap(&self, event: &Tap<'_>) {
        for listener in self.taps.borrow().iter() {
            listener(event);
        }
    }

    // --- Internals. ---

    /// A new session id: unique per process (and across a node's restarts and upgrades, see
    /// [`session_seed`]), and naming the shard that serves it ([`SessionId::shard`]).
    fn next_session_id(&self) -> SessionId {
        let n = self.next_session.get() + 1;
        self.next_session.set(n);
        SessionId::new(self.ix, n)
    }

    fn send(&self, to: ShardIx, msg: MeshMsg) {
        self.mesh.send(to, msg);
    }

    /// Tells everyone who must hear of a change of a local user's aggregate. Recorders hear
    /// of the changes made here only: one made on another node is recorded there.
    fn publish(&self, change: Change) {
        ShardMetrics::set(
            &self.metrics.online_users,
            self.registry.borrow().online_users() as u64,
        );
        let state = Arc::new(change.state);
        let origin = Instant::now();
        if change.local {
            let before = tap::Before {
                was_online: change.was_online,
                status_changed: change.status_changed,
            };
            self.tap(&Tap::Change(&state, before));
        }
        for shard in change.watchers {
            self.send(
                shard,
                MeshMsg::Update {
                    state: state.clone(),
                    origin,
                },
            );
            #[cfg(feature = "fault-injection")]
            assert!(
                !self.panic_in_publish.take(),
                "fault injection: panic half-way through a fan-out"
            );
        }
        for (group, member) in change.groups {
            let view = if member {
                state.clone()
            } else {
                Arc::new(state.left_group())
            };
            self.send(
                self.owner(&group),
                MeshMsg::GroupMember {
                    group,
                    state: view,
                    origin,
                },
            );
        }
    }

    /// An `activity` op of a local user: to this node's watchers (or sessions of `to`), and in
    /// a cluster to the other nodes'.
    fn send_activity(&self, user: &UserId, kind: Arc<str>, to: Option<UserId>) {
        let ts = now_ms();
        self.relay_activity(user, &kind, ts, to.clone());
        self.publish_activity(crate::presence::contrib::Activity {
            user: user.clone(),
            kind,
            ts,
            to,
        });
    }

    /// Delivers an `activity` event on this node: to the watchers of `user` (this must be its
    /// owner shard), or to the sessions of `to`.
    pub fn relay_activity(&self, user: &UserId, kind: &Arc<str>, ts: u64, to: Option<UserId>) {
        let kind = kind.clone();
        match to {
            None => {
                let watchers = self.registry.borrow().watchers(user);
                for w in watchers {
                    let msg = MeshMsg::Activity {
                        user: user.clone(),
                        kind: kind.clone(),
                        ts,
                        to: None,
                    };
                    self.send(w, msg);
                }
            }
            Some(to) => {
                let owner = self.owner(&to);
                let msg = MeshMsg::Activity {
                    user: user.clone(),
                    kind,
                    ts,
                    to: Some(to),
                };
                self.send(owner, msg);
            }
        }
    }

    /// Handles one mesh message. Never panics on message content.
    fn handle(self: &Rc<Self>, msg: MeshMsg, now: u64) {
        ShardMetrics::inc(&self.metrics.mesh_received);
        match msg {
            MeshMsg::Watch {
                user,
                from,
                session,
                gen,
            } => {
                let state = self.registry.borrow_mut().watch(&user, from, now);
                self.hand_to_bridge();
                let state = Arc::new(state);
                self.send(
                    from,
                    MeshMsg::Snapshot {
                        session,
                        gen,
                        state,
                    },
                );
            }
            MeshMsg::Unwatch { user, from } => {
                if !self.registry.borrow_mut().unwatch(&user, from) {
                    ShardMetrics::inc(&self.metrics.unmatched_unwatches);
                }
                self.hand_to_bridge();
            }
            MeshMsg::Snapshot {
                session,
                gen,
                state,
            } => self.on_snapshot(session, gen, &state),
            MeshMsg::Update { state, origin } => {
                let subs = self.user_subs.borrow();
                if let Some(sessions) = subs.get(&state.user) {
                    let frame = events::presence(&state, None);
                    let key = Key::Presence(state.user.clone(), None);
                    self.deliver(sessions, &key, &frame);
                    self.record_latency(origin);
                }
            }
            MeshMsg::WatchGroup {
                group,
                from,
                session,
                gen,
            } => {
                let members = self.groups.borrow_mut().watch(&group, from);
                self.hand_to_bridge();
                self.send(
                    from,
                    MeshMsg::GroupSnapshot {
                        session,
                        gen,
                        group,
                        members,
                    },
                );
            }
            MeshMsg::UnwatchGroup { group, from } => {
                if !self.groups.borrow_mut().unwatch(&group, from) {
                    ShardMetrics::inc(&self.metrics.unmatched_unwatches);
                }
                self.hand_to_bridge();
            }
            MeshMsg::GroupSnapshot {
                session,
                gen,
                group,
                members,
            } => self.on_group_snapshot(session, gen, group, &members),
            MeshMsg::GroupMember {
                group,
                state,
                origin,
            } => {
                let shards = self.groups.borrow_mut().member_update(&group, &state);
                for shard in shards {
                    self.send(
                        shard,
                        MeshMsg::GroupEvent {
                            group: group.clone(),
                            state: state.clone(),
                            origin,
                        },
                    );
                }
            }
            MeshMsg::GroupEvent {
                group,
                state,
                origin,
            } => {
                let subs = self.group_subs.borrow();
                if let Some(sessions) = subs.get(&group) {
                    let frame = events::presence(&state, Some(&group));
                    let key = Key::Presence(state.user.clone(), Some(group.clone()));
                    self.deliver(sessions, &key, &frame);
                    self.record_latency(origin);
                }
            }
            MeshMsg::Activity { user, kind, ts, to } => {
                let frame = events::activity(&user, &kind, ts);
                let key = Key::Activity(user.clone());
                match to {
                    None => {
                        if let Some(sessions) = self.user_subs.borrow().get(&user) {
                            self.deliver(sessions, &key, &frame);
                        }
                    }
                    Some(to) => {
                        let registry = self.registry.borrow();
                        let observers = self.observers.borrow();
                        // Admins impersonating `to` see what its sessions see.
                        let sessions = registry.sessions(&to).iter().map(|s| &s.id);
                        let sessions = sessions.chain(observers.get(&*to).into_iter().flatten());
                        self.deliver(sessions, &key, &frame);
                    }
                }
            }
            MeshMsg::Invoke(job) => self.run_job(job),
            MeshMsg::Shutdown => {
                debug_assert!(false, "the shard loop handles shutdown itself");
            }
        }
    }

    /// Fan-out latency of one delivered change: owner publish to local enqueue.
    fn record_latency(&self, origin: Instant) {
        let us = u64::try_from(origin.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.latency.borrow_mut().record(us);
    }

    fn on_snapshot(&self, id: SessionId, gen: NonZeroU64, state: &PresenceState) {
        let Some(session) = self.session(id) else {
            return; // closed meanwhile; its unwatch is already on the way
        };
        match session.watching.borrow_mut().get_mut(&state.user) {
            Some(s) if *s == SubState::Pending(gen) => *s = SubState::Live,
            _ => return, // unsubscribed (and maybe resubscribed: another gen) meanwhile
        }
        self.user_subs
            .borrow_mut()
            .entry_ref(&state.user)
            .or_default()
            .push(id);
        let frame = events::presence(state, None);
        session.push_snapshot(&Key::Presence(state.user.clone(), None), frame);
    }

    fn on_group_snapshot(
        &self,
        id: SessionId,
        gen: NonZeroU64,
        group: GroupId,
        members: &[PresenceState],
    ) {
        let Some(session) = self.session(id) else {
            return;
        };
        match session.watching_groups.borrow_mut().get_mut(&group) {
            Some(s) if *s == SubState::Pending(gen) => *s = SubState::Live,
            _ => return,
        }
        self.group_subs
            .borrow_mut()
            .entry_ref(&group)
            .or_default()
            .push(id);
        let frame = events::group_snapshot(&group, members);
        session.push_snapshot(&Key::GroupSnapshot(group), frame);
    }

    /// The same bytes to every listed local session.
    fn deliver<'a>(&self, ids: impl IntoIterator<Item = &'a SessionId>, key: &Key, frame: &Bytes) {
        let all = self.sessions.borrow();
        for id in ids {
            if let Some(session) = all.get(id) {
                session.push_event(key, frame.clone());
            }
        }
    }
}

fn remove_sub<K: std::hash::Hash + Eq + std::borrow::Borrow<str>>(
    subs: &mut HashMap<K, Vec<SessionId>>,
    key: &str,
    id: SessionId,
) {
    if let Some(list) = subs.get_mut(key) {
        if let Some(pos) = list.iter().position(|c| *c == id) {
            list.swap_remove(pos);
        }
        if list.is_empty() {
            subs.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ownership_is_stable_and_spread() {
        // Pinned values: ownership must never change between builds, processes or restarts.
        assert_eq!(xxhash_rust::xxh3::xxh3_64(b"alice"), 5593767425381308080);
        assert_eq!(owner_of("alice", 16), (5593767425381308080u64 % 16) as u16);
        assert_eq!(owner_of("bob", 7), (1442208253991303397u64 % 7) as u16);
        let spread: std::collections::HashSet<_> =
            (0..200).map(|i| owner_of(&format!("u{i}"), 4)).collect();
        assert_eq!(spread.len(), 4);
        assert_eq!(owner_of("anything", 1), 0);
    }
}

#[cfg(test)]
mod seed_tests {
    use super::session_seed;

    #[test]
    fn session_ids_of_a_later_process_start_above_the_earlier_ones() {
        let t = 1_796_000_000_000;
        // A process that ran an hour at 30,000 sessions a second per shard, then a new one.
        let old_last = session_seed(t) + 3600 * 30_000;
        assert!(session_seed(t + 3_600_000) > old_last);
        // Fake sessions of the fault-injection tests start at 2^47: real ids stay below until
        // 2106 (u32 seconds).
        assert!(session_seed(u64::from(u32::MAX) * 1000) < 1 << 47);
    }
}
