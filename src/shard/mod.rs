//! A shard: one core's share of the server. It owns, outright and unshared, the users and groups
//! that hash to it (`registry`, `groups`), the connections of those users, and the local
//! subscription lists that turn one mesh message into many deliveries.
//!
//! The facade rule (Seastar style): an operation on a user or group goes to its owner shard,
//! always through the mesh — a shard's own inbox included, so every operation on a key is
//! handled in one FIFO order and no handler ever re-enters another.

pub mod clock;
pub mod mesh;
pub mod runtime;

use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;
use std::num::NonZeroU64;
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use hashbrown::HashMap;

use std::time::Instant;

use crate::admin::changes::ChangeLog;
use crate::admin::series::Series;
use crate::admin::Shared;
use crate::auth::Verifier;
use crate::config::Config;
use crate::edge::conn::{ConnHandle, SubState};
use crate::edge::outbox::Key;
use crate::edge::ratelimit::IpLimiter;
use crate::history::{EventKind, HistoryEvent};
use crate::metrics::{Latency, ShardMetrics};
use crate::presence::watchers::ShardIx;
use crate::presence::{Change, GroupId, Groups, PresenceState, Registry, SessionId, UserId};
use crate::protocol::{events, OpLimits};
use mesh::{Mesh, MeshMsg};

/// The owner shard of a user or group id: `xxh3(id) mod shards`. xxh3 is a specified,
/// seedless algorithm, so ownership is the same in every process and after every restart (it
/// can later extend to nodes).
pub fn owner_of(id: &str, shards: usize) -> ShardIx {
    debug_assert!(shards > 0 && shards <= usize::from(u16::MAX));
    (xxhash_rust::xxh3::xxh3_64(id.as_bytes()) % shards as u64) as ShardIx
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub struct Shard {
    pub ix: ShardIx,
    /// The CPU this shard is pinned to, if any.
    pub cpu: Option<usize>,
    pub cfg: Arc<Config>,
    pub verifier: Arc<Verifier>,
    pub op_limits: OpLimits,
    pub mesh: Rc<Mesh>,
    pub metrics: Arc<ShardMetrics>,
    /// Users owned by this shard.
    pub registry: RefCell<Registry>,
    /// Groups owned by this shard.
    pub groups: RefCell<Groups>,
    /// Connections served here (their users are all owned here).
    pub conns: RefCell<HashMap<SessionId, Rc<ConnHandle>>>,
    /// Live direct subscriptions held by local connections, per watched user.
    user_subs: RefCell<HashMap<UserId, Vec<SessionId>>>,
    /// Live group subscriptions held by local connections, per group.
    group_subs: RefCell<HashMap<GroupId, Vec<SessionId>>>,
    next_session: Cell<u64>,
    /// Token expiry of every local session, sorted: (exp seconds, session). The clock pops
    /// the front instead of keeping a timer per connection.
    pub expiries: RefCell<BTreeSet<(u64, SessionId)>>,
    /// Per-IP handshake buckets for connections accepted by this shard.
    pub ip_limiter: RefCell<IpLimiter>,
    /// Set once shutdown starts: no new sessions.
    pub stopping: Cell<bool>,
    /// The empty `groups`/`roles` slice every session without them shares.
    pub no_groups: Arc<[Arc<str>]>,
    /// Read-only impersonation connections (`/ws?as=`), per impersonated local user.
    observers: RefCell<HashMap<UserId, Vec<SessionId>>>,
    /// The admin behind each impersonation connection (for the audit log).
    observer_admins: RefCell<HashMap<SessionId, Arc<str>>>,
    /// Fan-out latency of deliveries made here (docs/ADMIN.md).
    pub latency: RefCell<Latency>,
    /// Recent presence changes of local users, for the dashboards' live feed.
    pub changes: RefCell<ChangeLog>,
    /// The dashboard's time series (sampled on shard 0 only).
    pub series: RefCell<Series>,
    /// Process-wide facts and every shard's counters, for the admin port.
    pub shared: Arc<Shared>,
    /// Where history records go (never blocks).
    pub history: crate::history::Sink,
}

impl Shard {
    pub fn new(
        ix: ShardIx,
        cpu: Option<usize>,
        cfg: Arc<Config>,
        verifier: Arc<Verifier>,
        mesh: Rc<Mesh>,
        shared: Arc<Shared>,
        history: crate::history::Sink,
    ) -> Shard {
        let metrics = shared.metrics[usize::from(ix)].clone();
        let ip_limiter =
            IpLimiter::new(cfg.limits.handshake_rate_per_ip, cfg.limits.max_tracked_ips);
        let cfg_change_log = cfg.admin.change_log;
        Shard {
            ix,
            cpu,
            op_limits: cfg.op_limits(),
            cfg,
            verifier,
            mesh,
            metrics,
            registry: RefCell::new(Registry::new()),
            groups: RefCell::new(Groups::new()),
            conns: RefCell::new(HashMap::new()),
            user_subs: RefCell::new(HashMap::new()),
            group_subs: RefCell::new(HashMap::new()),
            next_session: Cell::new(0),
            expiries: RefCell::new(BTreeSet::new()),
            ip_limiter: RefCell::new(ip_limiter),
            stopping: Cell::new(false),
            no_groups: Arc::from([]),
            observers: RefCell::new(HashMap::new()),
            observer_admins: RefCell::new(HashMap::new()),
            latency: RefCell::new(Latency::default()),
            changes: RefCell::new(ChangeLog::new(cfg_change_log)),
            series: RefCell::new(Series::default()),
            shared,
            history,
        }
    }

    pub fn owner(&self, id: &str) -> ShardIx {
        owner_of(id, self.mesh.shards())
    }

    /// A new session id: shard index in the top 16 bits, so ids are unique per process and
    /// name the shard that serves them.
    pub fn next_session_id(&self) -> SessionId {
        let n = self.next_session.get() + 1;
        self.next_session.set(n);
        (u64::from(self.ix) << 48) | (n & ((1 << 48) - 1))
    }

    fn send(&self, to: ShardIx, msg: MeshMsg) {
        self.mesh.send(to, msg);
    }

    /// Tells everyone who must hear of a change of a local user's aggregate.
    pub fn publish(&self, change: Change) {
        ShardMetrics::set(
            &self.metrics.online_users,
            self.registry.borrow().online_users() as u64,
        );
        let state = Arc::new(change.state);
        let origin = Instant::now();
        self.changes.borrow_mut().record(state.clone());
        if self.history.enabled() {
            let mut e = HistoryEvent::new(state.ts, state.user.clone(), EventKind::Status);
            e.status = Some(state.status);
            e.text = state.text.clone();
            e.devices = Some(state.devices);
            e.seq = state.seq;
            self.history.event(e);
        }
        for shard in change.watchers {
            self.send(
                shard,
                MeshMsg::Update {
                    state: state.clone(),
                    origin,
                },
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

    /// `subscribe` from a local connection: mark pending, ask each owner for a snapshot.
    pub fn watch_users(&self, conn: &ConnHandle, users: &[UserId]) {
        let mut watching = conn.watching.borrow_mut();
        for user in users {
            if watching.contains_key(user) {
                continue;
            }
            let gen = conn.next_gen();
            // Share the shard's copy of the id when it has one: one allocation per watched
            // user per shard, not one per subscription.
            let key = self
                .user_subs
                .borrow()
                .get_key_value(&**user)
                .map_or_else(|| user.clone(), |(k, _)| k.clone());
            watching.insert(key, SubState::Pending(gen));
            self.send(
                self.owner(user),
                MeshMsg::Watch {
                    user: user.clone(),
                    from: self.ix,
                    conn: conn.id,
                    gen,
                },
            );
        }
        drop(watching);
        conn.watching.borrow_mut().shrink();
    }

    pub fn unwatch_users(&self, conn: &ConnHandle, users: &[UserId]) {
        self.unwatch_users_inner(conn, users);
        conn.watching.borrow_mut().shrink();
    }

    fn unwatch_users_inner(&self, conn: &ConnHandle, users: &[UserId]) {
        for user in users {
            let Some(state) = conn.watching.borrow_mut().remove(user) else {
                continue;
            };
            if state == SubState::Live {
                remove_sub(&mut self.user_subs.borrow_mut(), user, conn.id);
            }
            conn.cancel(&Key::Presence(user.clone(), None));
            conn.cancel(&Key::Activity(user.clone()));
            self.send(
                self.owner(user),
                MeshMsg::Unwatch {
                    user: user.clone(),
                    from: self.ix,
                },
            );
        }
    }

    pub fn watch_group(&self, conn: &ConnHandle, group: &GroupId) {
        if conn.watching_groups.borrow().contains_key(group) {
            return;
        }
        let gen = conn.next_gen();
        conn.watching_groups
            .borrow_mut()
            .insert(group.clone(), SubState::Pending(gen));
        self.send(
            self.owner(group),
            MeshMsg::WatchGroup {
                group: group.clone(),
                from: self.ix,
                conn: conn.id,
                gen,
            },
        );
    }

    pub fn unwatch_group(&self, conn: &ConnHandle, group: &GroupId) {
        let Some(state) = conn.watching_groups.borrow_mut().remove(group) else {
            return;
        };
        if state == SubState::Live {
            remove_sub(&mut self.group_subs.borrow_mut(), group, conn.id);
        }
        // Every queued event of this feed goes: one left behind could overtake the snapshot of
        // a later re-subscription.
        conn.cancel_where(|k| match k {
            Key::GroupSnapshot(g) => g == group,
            Key::Presence(_, Some(g)) => g == group,
            _ => false,
        });
        self.send(
            self.owner(group),
            MeshMsg::UnwatchGroup {
                group: group.clone(),
                from: self.ix,
            },
        );
    }

    /// Drops every subscription of a closing connection.
    pub fn unwatch_all(&self, conn: &ConnHandle) {
        let users: Vec<UserId> = conn.watching.borrow().keys().cloned().collect();
        self.unwatch_users(conn, &users);
        let groups: Vec<GroupId> = conn.watching_groups.borrow().keys().cloned().collect();
        for g in &groups {
            self.unwatch_group(conn, g);
        }
    }

    /// Handles one mesh message. Never panics on message content.
    pub fn handle(&self, msg: MeshMsg, now: u64) {
        ShardMetrics::inc(&self.metrics.mesh_received);
        match msg {
            MeshMsg::Watch {
                user,
                from,
                conn,
                gen,
            } => {
                let state = self.registry.borrow_mut().watch(&user, from, now);
                let state = Arc::new(state);
                self.send(from, MeshMsg::Snapshot { conn, gen, state });
            }
            MeshMsg::Unwatch { user, from } => {
                self.registry.borrow_mut().unwatch(&user, from);
            }
            MeshMsg::Snapshot { conn, gen, state } => self.on_snapshot(conn, gen, &state),
            MeshMsg::Update { state, origin } => {
                let subs = self.user_subs.borrow();
                if let Some(conns) = subs.get(&state.user) {
                    let frame = events::presence(&state, None);
                    let key = Key::Presence(state.user.clone(), None);
                    self.deliver(conns, &key, &frame);
                    self.record_latency(origin);
                }
            }
            MeshMsg::WatchGroup {
                group,
                from,
                conn,
                gen,
            } => {
                let members = self.groups.borrow_mut().watch(&group, from);
                self.send(
                    from,
                    MeshMsg::GroupSnapshot {
                        conn,
                        gen,
                        group,
                        members,
                    },
                );
            }
            MeshMsg::UnwatchGroup { group, from } => {
                self.groups.borrow_mut().unwatch(&group, from);
            }
            MeshMsg::GroupSnapshot {
                conn,
                gen,
                group,
                members,
            } => self.on_group_snapshot(conn, gen, group, &members),
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
                if let Some(conns) = subs.get(&group) {
                    let frame = events::presence(&state, Some(&group));
                    let key = Key::Presence(state.user.clone(), Some(group.clone()));
                    self.deliver(conns, &key, &frame);
                    self.record_latency(origin);
                }
            }
            MeshMsg::Activity { user, kind, ts, to } => {
                let frame = events::activity(&user, &kind, ts);
                let key = Key::Activity(user.clone());
                match to {
                    None => {
                        if let Some(conns) = self.user_subs.borrow().get(&user) {
                            self.deliver(conns, &key, &frame);
                        }
                    }
                    Some(to) => {
                        let mut sessions = self.registry.borrow().session_ids(&to);
                        // Admins impersonating `to` see what its sessions see.
                        sessions.extend(self.observers_of(&to));
                        self.deliver(&sessions, &key, &frame);
                    }
                }
            }
            MeshMsg::Admin { req, reply } => {
                let answer = crate::admin::query::answer(self, &req, now);
                // The asker may have given up (timeout): nothing to do then.
                let _ = reply.try_send((self.ix, answer));
            }
            MeshMsg::Handoff(_) | MeshMsg::Shutdown => {
                unreachable!("the shard loop handles hand-offs and shutdown itself")
            }
        }
    }

    /// Fan-out latency of one delivered change: owner publish to local enqueue.
    fn record_latency(&self, origin: Instant) {
        let us = u64::try_from(origin.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.latency.borrow_mut().record(us);
    }

    /// Impersonation connections watching `user` as that user.
    pub fn observers_of(&self, user: &str) -> Vec<SessionId> {
        self.observers
            .borrow()
            .get(user)
            .cloned()
            .unwrap_or_default()
    }

    pub fn add_observer(&self, user: &UserId, conn: SessionId, admin: &str) {
        self.observer_admins.borrow_mut().insert(conn, admin.into());
        self.observers
            .borrow_mut()
            .entry_ref(user)
            .or_default()
            .push(conn);
    }

    /// Forgets an impersonation connection; returns its admin.
    pub fn remove_observer(&self, user: &str, conn: SessionId) -> Option<Arc<str>> {
        remove_sub(&mut self.observers.borrow_mut(), user, conn);
        self.observer_admins.borrow_mut().remove(&conn)
    }

    fn on_snapshot(&self, conn_id: SessionId, gen: NonZeroU64, state: &PresenceState) {
        let Some(conn) = self.conns.borrow().get(&conn_id).cloned() else {
            return; // closed meanwhile; its unwatch is already on the way
        };
        let mut watching = conn.watching.borrow_mut();
        match watching.get_mut(&state.user) {
            Some(s) if *s == SubState::Pending(gen) => *s = SubState::Live,
            _ => return, // unsubscribed (and maybe resubscribed: another gen) meanwhile
        }
        drop(watching);
        self.user_subs
            .borrow_mut()
            .entry_ref(&state.user)
            .or_default()
            .push(conn_id);
        let frame = events::presence(state, None);
        conn.push_event(
            Key::Presence(state.user.clone(), None),
            frame,
            &self.metrics,
        );
    }

    fn on_group_snapshot(
        &self,
        conn_id: SessionId,
        gen: NonZeroU64,
        group: GroupId,
        members: &[PresenceState],
    ) {
        let Some(conn) = self.conns.borrow().get(&conn_id).cloned() else {
            return;
        };
        match conn.watching_groups.borrow_mut().get_mut(&group) {
            Some(s) if *s == SubState::Pending(gen) => *s = SubState::Live,
            _ => return,
        }
        self.group_subs
            .borrow_mut()
            .entry_ref(&group)
            .or_default()
            .push(conn_id);
        let frame = events::group_snapshot(&group, members);
        conn.push_event(Key::GroupSnapshot(group), frame, &self.metrics);
    }

    /// The same bytes to every listed local connection.
    fn deliver(&self, conns: &[SessionId], key: &Key, frame: &Bytes) {
        let all = self.conns.borrow();
        for id in conns {
            if let Some(conn) = all.get(id) {
                conn.push_event(key.clone(), frame.clone(), &self.metrics);
            }
        }
    }
}

fn remove_sub<K: std::hash::Hash + Eq + std::borrow::Borrow<str>>(
    subs: &mut HashMap<K, Vec<SessionId>>,
    key: &str,
    conn: SessionId,
) {
    if let Some(list) = subs.get_mut(key) {
        if let Some(pos) = list.iter().position(|c| *c == conn) {
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
