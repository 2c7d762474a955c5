//! The per-shard presence registry: the users this shard owns, their sessions, their aggregate
//! state and who watches them (SPEC §3).
//!
//! Pure: every operation takes `now_ms` and returns what must be told to whom (a [`Change`]);
//! the shard turns that into mesh messages. Invariants, checked by the unit tests and by the
//! proptest reference model at the bottom of this file:
//! - a user's `seq` grows by exactly one per change of (status, text, devices), never otherwise;
//! - `last_seen` is set when a user goes from visible to offline;
//! - an entry exists while it has sessions, watchers, or history (`seq > 0`) worth remembering.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};
use std::net::IpAddr;
use std::ops::Bound;
use std::sync::Arc;

use hashbrown::HashMap;

use super::contrib::{self, bucket_of, Contribution, Hlc, NodeIx};
use super::handover::{RecordError, SessionRecord, ShareRecord, UserRecord};
use super::state::{Aggregate, DeviceType, GroupId, PresenceState, SessionId, Status, UserId};
use super::watchers::{ShardIx, Watchers};

/// What the token and the upgrade request said about a session. Kept for the admin API and for
/// group membership; never sent to ordinary subscribers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionInfo {
    pub device: Option<Arc<str>>,
    pub device_type: DeviceType,
    pub region: Option<Arc<str>>,
    pub groups: Arc<[GroupId]>,
    pub roles: Arc<[Arc<str>]>,
    pub ip: IpAddr,
    pub connected_at_ms: u64,
}

/// One live session of a user.
#[derive(Clone, Debug)]
pub struct Session {
    pub id: SessionId,
    pub status: Status,
    pub text: Option<Arc<str>>,
    /// Per-user counter stamped on every status change, so "the latest set text wins" among
    /// sessions of equal status does not depend on a clock.
    stamp: u64,
    pub info: SessionInfo,
}

/// A session that has ended but still counts for its user (SPEC §11): the last session of a user
/// within `offline_grace_ms` of its end, or a session handed over by the old process of an
/// upgrade. A new session of the user re-attaches to one ([`Registry::connect`]): it takes the
/// held status and text, so watchers see nothing change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    /// The id of the session it stands for, in the process that served it.
    pub origin: u64,
    /// Served by the old process of an upgrade (its ids may repeat this process's).
    pub from_old: bool,
    pub status: Status,
    pub text: Option<Arc<str>>,
    pub device: Option<Arc<str>>,
    pub device_type: DeviceType,
    pub groups: Arc<[GroupId]>,
    pub connected_at_ms: u64,
    /// When the session ended (ms since the epoch): the user's `last_seen` if it goes
    /// offline when the hold runs out.
    pub ended_at_ms: u64,
    /// The order of its last status change among the user's sessions.
    pub stamp: u64,
    /// When it stops counting (ms since the epoch). `None`: the old process of an upgrade still
    /// serves it.
    pub until: Option<u64>,
}

impl Held {
    /// `s`, held: ended at `ended_at_ms` (0 while it still runs), counted until `until`.
    pub fn of(s: &Session, ended_at_ms: u64, until: Option<u64>) -> Held {
        Held {
            origin: s.id.get(),
            from_old: false,
            status: s.status,
            text: s.text.clone(),
            device: s.info.device.clone(),
            device_type: s.info.device_type,
            groups: s.info.groups.clone(),
            connected_at_ms: s.info.connected_at_ms,
            ended_at_ms,
            stamp: s.stamp,
            until,
        }
    }
}

/// A user's held sessions, and which of the old process's sessions were re-attached here (so a
/// late update from the old process does not bring them back). Boxed in [`UserEntry`]: most
/// users never have one.
#[derive(Debug, Default)]
struct Holds {
    held: Vec<Held>,
    claimed: Vec<u64>,
}

/// How [`Registry::disconnect`] ends a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hold {
    /// Gone at once.
    None,
    /// Held until then if it was the user's last visible session (the reconnect grace).
    IfLast(u64),
    /// Held until then whatever else the user has (the old process of an upgrade, draining).
    Always(u64),
}

/// The part of a user's presence that subscribers see; `seq` moves exactly when this changes.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
struct View {
    status: Aggregate,
    text: Option<Arc<str>>,
    devices: u32,
    /// Groups carried by at least one visible session, sorted: where the user is a visible member.
    groups: Vec<GroupId>,
}

#[derive(Debug, Default)]
struct UserEntry {
    sessions: Vec<Session>,
    view: View,
    seq: u64,
    last_seen: Option<u64>,
    /// When `view` last changed, so a snapshot carries the time of the state it shows.
    changed_at_ms: u64,
    stamps: u64,
    watchers: Watchers,
    /// In a cluster: this node's share and the shares heard from other nodes (boxed, so a
    /// single node pays one pointer per user for it).
    replica: Option<Box<Replica>>,
    /// Ended sessions that still count ([`Held`]).
    holds: Option<Box<Holds>>,
}

/// A user's shares in a cluster ([`contrib`]).
#[derive(Debug, Default)]
struct Replica {
    /// This node's share, as last published.
    local: Contribution,
    /// The newest share heard from each other node (offline ones kept as tombstones).
    remote: Vec<(NodeIx, Contribution)>,
}

impl Replica {
    fn merged(&self) -> contrib::Merged {
        contrib::merge(std::iter::once(&self.local).chain(self.remote.iter().map(|(_, c)| c)))
    }
}

/// A registry's part in a cluster: the clock its shares are stamped with, and what the shard
/// must hand to the cluster bridge after each operation ([`Registry::take_outgoing`]).
#[derive(Debug)]
pub struct Replication {
    hlc: Arc<Hlc>,
    buckets: u32,
    outgoing: Vec<(UserId, Contribution)>,
    interest: Vec<(u32, i32)>,
    session_interest: Vec<(u32, i32)>,
}

/// What a snapshot answer covers ([`Registry::apply_snapshot`]).
pub struct SnapScope<'a> {
    /// Users whose bucket was asked for.
    pub users: &'a dyn Fn(&str) -> bool,
    /// Groups whose bucket was asked for.
    pub groups: &'a dyn Fn(&GroupId) -> bool,
    /// Users whose bucket this node follows.
    pub followed: &'a dyn Fn(&str) -> bool,
    /// Groups whose bucket this node follows.
    pub followed_groups: &'a dyn Fn(&GroupId) -> bool,
}

/// What a registry operation left for the cluster bridge: this node's shares that changed, and
/// buckets that gained (+1) or lost (-1) their first or last watched user here.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outgoing {
    pub shares: Vec<(UserId, Contribution)>,
    /// User buckets.
    pub interest: Vec<(u32, i32)>,
    /// Group buckets (from the shard's [`Groups`](super::Groups)).
    pub group_interest: Vec<(u32, i32)>,
    /// User buckets that gained (+1) or lost (-1) a user with sessions here (directed
    /// `activity` for them must reach this node).
    pub session_interest: Vec<(u32, i32)>,
    /// `activity` events for other nodes (ephemeral).
    pub activity: Vec<contrib::Activity>,
}

impl Outgoing {
    pub fn is_empty(&self) -> bool {
        self.shares.is_empty()
            && self.interest.is_empty()
            && self.group_interest.is_empty()
            && self.session_interest.is_empty()
            && self.activity.is_empty()
    }
}

/// What a recomputed view is stamped with when it goes from visible to offline: now for an
/// operation here, the time the other node reported for a share heard from it.
#[derive(Clone, Copy, Debug)]
enum Cause {
    Local,
    Remote {
        at: u64,
    },
    /// Held sessions ran out: `last_seen` is when the last of them really ended.
    Ended {
        at: u64,
    },
}

impl UserEntry {
    fn state(&self, user: &UserId, now_ms: u64) -> PresenceState {
        PresenceState {
            user: user.clone(),
            status: self.view.status,
            text: self.view.text.clone(),
            devices: self.view.devices,
            last_seen: self.last_seen,
            ts: if self.seq == 0 {
                now_ms
            } else {
                self.changed_at_ms
            },
            seq: self.seq,
        }
    }

    /// The view from this node's sessions (live and held) alone.
    fn compute_view(&self) -> View {
        let mut view = View::default();
        let mut best_stamp = 0;
        let live = self
            .sessions
            .iter()
            .map(|s| (s.status, &s.text, s.stamp, &s.info.groups));
        let held = self
            .held()
            .iter()
            .map(|h| (h.status, &h.text, h.stamp, &h.groups));
        for (status, text, stamp, groups) in live.chain(held) {
            let Some(agg) = status.visible() else {
                continue;
            };
            view.devices += 1;
            if agg > view.status || (agg == view.status && stamp >= best_stamp) {
                view.status = agg;
                view.text = text.clone();
                best_stamp = stamp;
            }
            for g in groups.iter() {
                if let Err(pos) = view.groups.binary_search(g) {
                    view.groups.insert(pos, g.clone());
                }
            }
        }
        view
    }

    fn held(&self) -> &[Held] {
        self.holds.as_ref().map_or(&[], |h| &h.held)
    }

    fn forgettable(&self) -> bool {
        self.sessions.is_empty()
            && self.watchers.is_empty()
            && self.seq == 0
            && self.held().is_empty()
    }

    /// Takes the held session a new session with these facts re-attaches to: the same device
    /// id first, then the same device type, then the oldest.
    ///
    /// Never across two different device ids, and a session the old process of an upgrade
    /// still serves (no deadline yet) only by its own device id: another device of the user
    /// connecting meanwhile is a device of its own, not that one coming back.
    fn claim(&mut self, device: Option<&Arc<str>>, device_type: DeviceType) -> Option<Held> {
        let holds = self.holds.as_mut()?;
        let same_device = |h: &Held| device.is_some() && h.device.as_ref() == device;
        let may = |h: &Held| {
            let compatible = h.device.is_none() || device.is_none() || same_device(h);
            compatible && (h.until.is_some() || same_device(h))
        };
        let pos = holds
            .held
            .iter()
            .position(|h| may(h) && same_device(h))
            .or_else(|| {
                holds
                    .held
                    .iter()
                    .position(|h| may(h) && h.device_type == device_type)
            })
            .or_else(|| holds.held.iter().position(may))?;
        let held = holds.held.remove(pos);
        if held.from_old {
            holds.claimed.push(held.origin);
        }
        self.tidy_holds();
        Some(held)
    }

    /// Drops the box when nothing is left in it.
    fn tidy_holds(&mut self) {
        if self
            .holds
            .as_ref()
            .is_some_and(|h| h.held.is_empty() && h.claimed.is_empty())
        {
            self.holds = None;
        }
    }
}

/// What the admin API reads of one user: the aggregate, the sessions behind it and the groups
/// it is a visible member of. Borrowed: building it copies nothing.
#[derive(Debug)]
pub struct UserView<'a> {
    pub user: &'a UserId,
    pub status: Aggregate,
    pub text: Option<&'a Arc<str>>,
    pub devices: u32,
    pub seq: u64,
    /// When the visible state last changed (or `now` for a user never changed).
    pub ts: u64,
    pub last_seen: Option<u64>,
    /// Groups where the user is a visible member, sorted.
    pub groups: &'a [GroupId],
    pub sessions: &'a [Session],
    /// Ended sessions that still count (reconnect grace, upgrade hand-over).
    pub held: &'a [Held],
    /// Subscriptions to this user, over all shards.
    pub watchers: u64,
}

impl<'a> UserView<'a> {
    fn new(user: &'a UserId, e: &'a UserEntry, now_ms: u64) -> UserView<'a> {
        UserView {
            user,
            status: e.view.status,
            text: e.view.text.as_ref(),
            devices: e.view.devices,
            seq: e.seq,
            ts: if e.seq == 0 { now_ms } else { e.changed_at_ms },
            last_seen: e.last_seen,
            groups: &e.view.groups,
            sessions: &e.sessions,
            held: e.held(),
            watchers: e.watchers.total(),
        }
    }
}

/// A change of a user's aggregate state, with everyone who must hear of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// Caused by a session here (false: by a share heard from another node). History records
    /// a change on the node where it happened.
    pub local: bool,
    pub state: PresenceState,
    /// Shards with subscribers of this user: one mesh message each.
    pub watchers: Vec<ShardIx>,
    /// Group feeds affected: `(group, still_member)`. A member gets `state`; a user who stopped
    /// being a visible member gets `state.left_group()`.
    pub groups: Vec<(GroupId, bool)>,
    /// Whether the user was visible before this change.
    pub was_online: bool,
    /// Whether its status or text changed (not only its device count or groups).
    pub status_changed: bool,
}

/// Why an operation on the registry was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("unknown session")]
    UnknownSession,
}

/// The users owned by one shard.
#[derive(Debug, Default)]
pub struct Registry {
    users: HashMap<UserId, UserEntry>,
    sessions: usize,
    /// Users with at least one visible session, in id order, kept up to date on every change
    /// that crosses between offline and visible. Admin scans walk it in chunks, resuming after
    /// the last id seen, so a scan can yield between chunks and still see every user that stays
    /// online exactly once.
    online: BTreeSet<UserId>,
    /// Set in a cluster.
    replication: Option<Replication>,
    /// When held sessions stop counting: `(until, user)`, soonest first. Entries whose held
    /// session was re-attached or replaced meanwhile are skipped when they come up.
    hold_deadlines: BinaryHeap<Reverse<(u64, UserId)>>,
    /// Held sessions, all users.
    held: usize,
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    /// A registry of a cluster node: shares stamped by `hlc`, users bucketed into `buckets`.
    pub fn replicated(hlc: Arc<Hlc>, buckets: u32) -> Registry {
        Registry {
            replication: Some(Replication {
                hlc,
                buckets: buckets.max(1),
                outgoing: Vec::new(),
                interest: Vec::new(),
                session_interest: Vec::new(),
            }),
            ..Registry::default()
        }
    }

    /// What the last operations left for the cluster bridge (empty on a single node).
    pub fn take_outgoing(&mut self) -> Outgoing {
        match &mut self.replication {
            None => Outgoing::default(),
            Some(r) => Outgoing {
                shares: std::mem::take(&mut r.outgoing),
                interest: std::mem::take(&mut r.interest),
                group_interest: Vec::new(),
                session_interest: std::mem::take(&mut r.session_interest),
                activity: Vec::new(),
            },
        }
    }

    /// Queues this node's share of each of `users` for the bridge again, as it stands (an
    /// upgrade's new process: shares the old process stamped and could not publish).
    pub fn republish(&mut self, users: &[UserId]) {
        let Some(r) = self.replication.as_mut() else {
            return;
        };
        for user in users {
            let share = self.users.get(user).and_then(|e| e.replica.as_ref());
            if let Some(replica) = share.filter(|rp| rp.local.clock > 0) {
                r.outgoing.push((user.clone(), replica.local.clone()));
            }
        }
    }

    /// Stamps this node's share of `users` (`None`: of every user) anew and queues it for the
    /// bridge: upgrades, where the other process may have published a later clock for the
    /// same node. Returns how many.
    pub fn restamp_shares(&mut self, users: Option<&[UserId]>, now_ms: u64) -> usize {
        let Some(r) = self.replication.as_mut() else {
            return 0;
        };
        let mut restamp = |user: &UserId, entry: &mut UserEntry| {
            let Some(replica) = entry.replica.as_mut().filter(|rp| rp.local.clock > 0) else {
                return false;
            };
            replica.local.clock = r.hlc.tick(now_ms);
            r.outgoing.push((user.clone(), replica.local.clone()));
            true
        };
        match users {
            Some(users) => users
                .iter()
                .filter(|u| {
                    self.users
                        .get_mut(*u)
                        .is_some_and(|entry| restamp(u, entry))
                })
                .count(),
            None => self
                .users
                .iter_mut()
                .map(|(u, entry)| restamp(u, entry))
                .filter(|done| *done)
                .count(),
        }
    }

    /// A new session of `user`, starting with `status`.
    pub fn connect(
        &mut self,
        user: &UserId,
        id: SessionId,
        status: Status,
        info: SessionInfo,
        now_ms: u64,
    ) -> Option<Change> {
        let entry = self.users.entry_ref(user).or_default();
        debug_assert!(
            entry.sessions.iter().all(|s| s.id != id),
            "session ids are unique"
        );
        entry.stamps += 1;
        if let (true, Some(r)) = (entry.sessions.is_empty(), &mut self.replication) {
            r.session_interest.push((bucket_of(user, r.buckets), 1));
        }
        // A held session of the user: this one re-attaches to it and goes on with its status.
        let (status, text, stamp) = match entry.claim(info.device.as_ref(), info.device_type) {
            Some(h) => {
                self.held = self.held.saturating_sub(1);
                (h.status, h.text, h.stamp)
            }
            None => (status, None, entry.stamps),
        };
        // Most users have one device: room for one session, not the four a first `push` makes
        // (a `Session` is over 100 bytes; docs/BENCHMARKS.md, "Issue 14").
        if entry.sessions.capacity() == 0 {
            entry.sessions.reserve_exact(1);
        }
        entry.sessions.push(Session {
            id,
            status,
            text,
            stamp,
            info,
        });
        self.sessions += 1;
        let change = settle(
            user,
            entry,
            self.replication.as_mut(),
            &mut self.online,
            now_ms,
            Cause::Local,
        );
        change
    }

    /// The session ended (closed, dropped, kicked). Unknown sessions are ignored. With a
    /// [`Hold`], it may go on counting as a [`Held`] session until a deadline.
    pub fn disconnect(
        &mut self,
        user: &str,
        id: SessionId,
        hold: Hold,
        now_ms: u64,
    ) -> Option<Change> {
        let (user, entry) = self.users.get_key_value_mut(user)?;
        let pos = entry.sessions.iter().position(|s| s.id == id)?;
        let gone = entry.sessions.swap_remove(pos);
        self.sessions -= 1;
        let until = match hold {
            Hold::None => None,
            Hold::Always(until) => Some(until),
            Hold::IfLast(until) => {
                let others = entry.sessions.iter().any(|s| s.status.visible().is_some());
                (!others).then_some(until)
            }
        };
        // Invisible sessions are held too: they add nothing to what watchers see, but the
        // session that re-attaches must come back invisible, not online.
        if let Some(until) = until {
            if until > now_ms {
                entry
                    .holds
                    .get_or_insert_with(Box::default)
                    .held
                    .push(Held::of(&gone, now_ms, Some(until)));
                self.held += 1;
                self.hold_deadlines.push(Reverse((until, user.clone())));
            }
        }
        if let (true, Some(r)) = (entry.sessions.is_empty(), &mut self.replication) {
            r.session_interest.push((bucket_of(user, r.buckets), -1));
        }
        let user = user.clone();
        self.resettle(&user, now_ms, Cause::Local)
    }

    /// `set_status` from one session.
    pub fn set_status(
        &mut self,
        user: &str,
        id: SessionId,
        status: Status,
        text: Option<Arc<str>>,
        now_ms: u64,
    ) -> Result<Option<Change>, RegistryError> {
        let (user, entry) = self
            .users
            .get_key_value_mut(user)
            .ok_or(RegistryError::UnknownSession)?;
        entry.stamps += 1;
        let stamp = entry.stamps;
        let session = entry
            .sessions
            .iter_mut()
            .find(|s| s.id == id)
            .ok_or(RegistryError::UnknownSession)?;
        session.status = status;
        session.text = text;
        session.stamp = stamp;
        let user = user.clone();
        let change = settle(
            &user,
            entry,
            self.replication.as_mut(),
            &mut self.online,
            now_ms,
            Cause::Local,
        );
        Ok(change)
    }

    /// A subscription from `shard`: count it and return the snapshot to send back.
    pub fn watch(&mut self, user: &UserId, shard: ShardIx, now_ms: u64) -> PresenceState {
        let entry = self.users.entry_ref(user).or_default();
        let first = entry.watchers.is_empty();
        entry.watchers.add(shard);
        if let (true, Some(r)) = (first, &mut self.replication) {
            r.interest.push((bucket_of(user, r.buckets), 1));
        }
        entry.state(user, now_ms)
    }

    /// A subscription from `shard` ended. Returns false for an unwatch with no matching watch.
    pub fn unwatch(&mut self, user: &str, shard: ShardIx) -> bool {
        let Some(entry) = self.users.get_mut(user) else {
            return false;
        };
        let known = entry.watchers.remove(shard);
        if let (true, true, Some(r)) = (known, entry.watchers.is_empty(), &mut self.replication) {
            r.interest.push((bucket_of(user, r.buckets), -1));
        }
        self.forget_if_empty(user);
        known
    }

    /// The current state of `user` (offline with `seq` 0 if never seen).
    pub fn snapshot(&self, user: &UserId, now_ms: u64) -> PresenceState {
        match self.users.get(user) {
            Some(entry) => entry.state(user, now_ms),
            None => UserEntry::default().state(user, now_ms),
        }
    }

    /// Sessions of `user` on this shard (all of them: a user's sessions live on its owner).
    pub fn sessions(&self, user: &str) -> &[Session] {
        self.users.get(user).map_or(&[], |e| &e.sessions)
    }

    /// A read-only view of one user, for the admin API.
    pub fn view(&self, user: &str, now_ms: u64) -> Option<UserView<'_>> {
        let (id, entry) = self.users.get_key_value(user)?;
        Some(UserView::new(id, entry, now_ms))
    }

    /// Users with a visible session whose id is after `after` (all of them for `None`), in id
    /// order: the admin API's scans, resumable after any id.
    pub fn online_after<'a>(
        &'a self,
        after: Option<&str>,
        now_ms: u64,
    ) -> impl Iterator<Item = UserView<'a>> + 'a {
        let from = match after {
            Some(a) => Bound::Excluded(a),
            None => Bound::Unbounded,
        };
        self.online
            .range::<str, _>((from, Bound::Unbounded))
            .filter_map(move |id| self.view(id, now_ms))
    }

    /// Ids of the sessions of `user` on this shard.
    pub fn session_ids(&self, user: &str) -> Vec<SessionId> {
        self.sessions(user).iter().map(|s| s.id).collect()
    }

    /// Watching shards of `user` (for ephemeral `activity` events).
    pub fn watchers(&self, user: &str) -> Vec<ShardIx> {
        self.users
            .get(user)
            .map_or_else(Vec::new, |e| e.watchers.shards().collect())
    }

    /// The soonest deadline of a held session (ms since the epoch), if any is held.
    pub fn next_hold_deadline(&self) -> Option<u64> {
        self.hold_deadlines.peek().map(|Reverse((t, _))| *t)
    }

    /// Held sessions whose deadline has passed stop counting: the changes to publish (an
    /// offline, or fewer devices).
    pub fn expire_holds(&mut self, now_ms: u64) -> Vec<Change> {
        let mut changes = Vec::new();
        while let Some(Reverse((t, _))) = self.hold_deadlines.peek() {
            if *t > now_ms {
                break;
            }
            let Some(Reverse((_, user))) = self.hold_deadlines.pop() else {
                break;
            };
            let Some(entry) = self.users.get_mut(&user) else {
                continue;
            };
            let Some(holds) = entry.holds.as_mut() else {
                continue;
            };
            let before = holds.held.len();
            let mut ended = 0;
            holds.held.retain(|h| {
                let keep = h.until.is_none_or(|u| u > now_ms);
                if !keep {
                    let at = if h.ended_at_ms == 0 {
                        now_ms
                    } else {
                        h.ended_at_ms
                    };
                    ended = ended.max(at);
                }
                keep
            });
            let expired = before - holds.held.len();
            if expired == 0 {
                continue;
            }
            self.held = self.held.saturating_sub(expired);
            entry.tidy_holds();
            changes.extend(self.resettle(&user, now_ms, Cause::Ended { at: ended }));
        }
        changes
    }

    /// Held sessions, all users.
    pub fn held_count(&self) -> usize {
        self.held
    }

    /// Lets go of every held session of `user` at once (a kick: it is never held). Sessions
    /// the old process of an upgrade still serves are let go for good: a later record naming
    /// them does not bring them back. Returns how many went, and the change to publish.
    pub fn drop_holds(&mut self, user: &str, now_ms: u64) -> (usize, Option<Change>) {
        let Some((id, entry)) = self.users.get_key_value_mut(user) else {
            return (0, None);
        };
        let Some(holds) = entry.holds.as_mut() else {
            return (0, None);
        };
        let gone = holds.held.len();
        for h in std::mem::take(&mut holds.held) {
            if h.from_old {
                holds.claimed.push(h.origin);
            }
        }
        self.held = self.held.saturating_sub(gone);
        entry.tidy_holds();
        let id = id.clone();
        (gone, self.resettle(&id, now_ms, Cause::Local))
    }

    /// After an operation changed `user`'s entry: the view recomputed (the online index kept),
    /// and the entry forgotten if nothing in it is worth keeping.
    fn resettle(&mut self, user: &UserId, now_ms: u64, cause: Cause) -> Option<Change> {
        let entry = self.users.get_mut(user)?;
        let change = settle(
            user,
            entry,
            self.replication.as_mut(),
            &mut self.online,
            now_ms,
            cause,
        );
        self.forget_if_empty(user);
        change
    }

    // --- Upgrades (SPEC §11): the presence one process hands the next. ---

    /// What the next process must know of `user`: its live sessions (`until` = `None`), its
    /// held ones, `seq` and `last_seen`. `None` for a user with nothing worth handing over
    /// (never changed, no session).
    pub fn handover_record(&self, user: &str) -> Option<UserRecord> {
        let (id, e) = self.users.get_key_value(user)?;
        if e.seq == 0 && e.sessions.is_empty() && e.held().is_empty() {
            return None;
        }
        // A live session travels as a hold with no deadline yet.
        let live = e
            .sessions
            .iter()
            .map(|s| SessionRecord::of(&Held::of(s, 0, None)));
        let held = e.held().iter().map(SessionRecord::of);
        Some(UserRecord {
            user: id.to_string(),
            seq: e.seq,
            last_seen: e.last_seen,
            changed_at_ms: e.changed_at_ms,
            sessions: live.chain(held).collect(),
            share: e
                .replica
                .as_ref()
                .filter(|r| r.local.clock > 0)
                .map(|r| ShareRecord {
                    clock: r.local.clock,
                    last_seen: r.local.last_seen,
                }),
        })
    }

    /// Every user's [`Registry::handover_record`].
    pub fn handover_records(&self) -> Vec<UserRecord> {
        self.users
            .keys()
            .filter_map(|u| self.handover_record(u))
            .collect()
    }

    /// A user handed over by the old process (at start, before any session here): its sessions
    /// held, its `seq`, `last_seen` and change time kept as they were, so nothing is published.
    pub fn adopt(&mut self, rec: &UserRecord, now_ms: u64) -> Result<(), RecordError> {
        rec.check()?;
        let held = rec
            .sessions
            .iter()
            .map(|s| s.to_held(&rec.user))
            .collect::<Result<Vec<_>, _>>()?;
        let user = UserId::from(rec.user.as_str());
        let entry = self.users.entry_ref(&user).or_default();
        self.held += held.len();
        for h in &held {
            if let Some(until) = h.until {
                self.hold_deadlines.push(Reverse((until, user.clone())));
            }
        }
        entry.stamps = entry
            .stamps
            .max(held.iter().map(|h| h.stamp).max().unwrap_or(0));
        entry
            .holds
            .get_or_insert_with(Box::default)
            .held
            .extend(held);
        entry.tidy_holds();
        // Nothing here but what the record holds: this node's share is the old process's,
        // clock and all, so the other nodes hear nothing new (and nothing is queued for them).
        if entry.sessions.is_empty() && entry.held().iter().all(|h| h.from_old) {
            inherit_share(entry, self.replication.as_ref(), rec.share);
        }
        let change = settle(
            &user,
            entry,
            self.replication.as_mut(),
            &mut self.online,
            now_ms,
            Cause::Local,
        );
        // The view is the old process's: its seq, its last_seen, its time of change.
        entry.seq = rec.seq;
        entry.last_seen = rec.last_seen;
        if change.is_some() || rec.seq > 0 {
            entry.changed_at_ms = rec.changed_at_ms;
        }
        self.forget_if_empty(&user);
        Ok(())
    }

    /// A later state of a user the old process still serves (a change there, or a session it
    /// closed while draining): its sessions replace the ones held from it, less those already
    /// re-attached here. `seq` never falls behind the old process's, so a watcher that moves
    /// over never sees it go back.
    pub fn update_from_old(
        &mut self,
        rec: &UserRecord,
        now_ms: u64,
    ) -> Result<Option<Change>, RecordError> {
        rec.check()?;
        let incoming = rec
            .sessions
            .iter()
            .map(|s| s.to_held(&rec.user))
            .collect::<Result<Vec<_>, _>>()?;
        let user = UserId::from(rec.user.as_str());
        let entry = self.users.entry_ref(&user).or_default();
        let holds = entry.holds.get_or_insert_with(Box::default);
        let before = holds.held.len();
        holds.held.retain(|h| !h.from_old);
        let mut all_taken = true;
        for h in incoming {
            // Re-attached here already, or expired here already (each process expires on its
            // own tick: a late record must not bring one back).
            if holds.claimed.contains(&h.origin) || h.until.is_some_and(|u| u <= now_ms) {
                all_taken = false;
                continue;
            }
            if let Some(until) = h.until {
                self.hold_deadlines.push(Reverse((until, user.clone())));
            }
            entry.stamps = entry.stamps.max(h.stamp);
            holds.held.push(h);
        }
        self.held = (self.held + holds.held.len()).saturating_sub(before);
        entry.tidy_holds();
        if rec.seq > entry.seq + 1 {
            entry.seq = rec.seq - 1;
        }
        // The same sessions as the old process: its share, with its clock (published from
        // here too, in case the old process handed the bus over before it could). Otherwise
        // the share is this process's own, stamped after the old one's.
        if all_taken && entry.sessions.is_empty() && entry.held().iter().all(|h| h.from_old) {
            if let Some(share) = inherit_share(entry, self.replication.as_ref(), rec.share) {
                if let Some(r) = self.replication.as_mut() {
                    r.outgoing.push((user.clone(), share));
                }
            }
        } else if let (Some(r), Some(share)) = (self.replication.as_ref(), rec.share) {
            r.hlc.observe(share.clock);
        }
        let change = settle(
            &user,
            entry,
            self.replication.as_mut(),
            &mut self.online,
            now_ms,
            // The old process recorded this change in its history: not again here.
            Cause::Remote {
                at: rec.last_seen.unwrap_or(now_ms),
            },
        );
        entry.seq = entry.seq.max(rec.seq);
        if entry.last_seen < rec.last_seen {
            entry.last_seen = rec.last_seen;
        }
        self.forget_if_empty(&user);
        Ok(change)
    }

    /// The old process is gone (drained, or its link broke): the sessions it still served are
    /// held until `until`, and the record of re-attached ones is dropped.
    pub fn end_old(&mut self, now_ms: u64, until: u64) {
        for (user, entry) in self.users.iter_mut() {
            let Some(holds) = entry.holds.as_mut() else {
                continue;
            };
            holds.claimed = Vec::new();
            let mut due = false;
            for h in holds
                .held
                .iter_mut()
                .filter(|h| h.from_old && h.until.is_none())
            {
                h.until = Some(until);
                h.ended_at_ms = now_ms;
                due = true;
            }
            if due {
                self.hold_deadlines.push(Reverse((until, user.clone())));
            }
            entry.tidy_holds();
        }
    }

    /// Users with at least one visible session.
    pub fn online_users(&self) -> usize {
        self.online.len()
    }

    /// Sessions of all users on this shard.
    pub fn session_count(&self) -> usize {
        self.sessions
    }

    /// Entries held (online, watched or remembered offline users).
    pub fn user_count(&self) -> usize {
        self.users.len()
    }

    /// Rebuilds `user`'s entry after a panic may have left it half-updated (the session layer's
    /// repair): drops `gone` if it is still listed, recomputes the aggregate, and recounts the
    /// registry's totals from scratch (O(users)). Always returns a change with a new `seq`, so
    /// every watcher is sent the rebuilt state even if the interrupted change had been counted.
    pub fn rebuild(&mut self, user: &str, gone: SessionId, now_ms: u64) -> Option<Change> {
        let change = match self.users.get_key_value_mut(user) {
            None => None,
            Some((id, entry)) => {
                let had = !entry.sessions.is_empty();
                entry.sessions.retain(|s| s.id != gone);
                if let (true, true, Some(r)) =
                    (had, entry.sessions.is_empty(), &mut self.replication)
                {
                    r.session_interest.push((bucket_of(user, r.buckets), -1));
                }
                let id = id.clone();
                refresh(
                    &id,
                    entry,
                    self.replication.as_mut(),
                    now_ms,
                    Cause::Local,
                    true,
                )
            }
        };
        self.sessions = self.users.values().map(|e| e.sessions.len()).sum();
        self.held = self.users.values().map(|e| e.held().len()).sum();
        self.online = self
            .users
            .iter()
            .filter(|(_, e)| e.view.status != Aggregate::Offline)
            .map(|(id, _)| id.clone())
            .collect();
        self.forget_if_empty(user);
        change
    }

    fn forget_if_empty(&mut self, user: &str) {
        if self.users.get(user).is_some_and(UserEntry::forgettable) {
            self.users.remove(user);
        }
    }

    // --- The cluster (SPEC §12): shares heard from other nodes. ---

    /// A share of `user` heard from `node`. Ignored unless newer than the one held (so
    /// duplicates and late arrivals change nothing), and on a single node.
    pub fn apply_remote(
        &mut self,
        user: &UserId,
        node: NodeIx,
        share: Contribution,
        now_ms: u64,
    ) -> Option<Change> {
        let repl = self.replication.as_mut()?;
        if !share.visible() && !self.users.contains_key(user) {
            return None; // nothing held to put out
        }
        let entry = self.users.entry_ref(user).or_default();
        let replica = entry.replica.get_or_insert_with(Box::default);
        let at = share.last_seen.unwrap_or(now_ms);
        match replica.remote.iter().position(|(n, _)| *n == node) {
            Some(i) if contrib::newer(Some(&replica.remote[i].1), &share) => {
                replica.remote[i].1 = share;
            }
            Some(_) => return None,
            None => replica.remote.push((node, share)),
        }
        settle(
            user,
            entry,
            Some(repl),
            &mut self.online,
            now_ms,
            Cause::Remote { at },
        )
    }

    /// A node's snapshot of the buckets in `scope`: every listed share is applied, and a
    /// visible share held from `node` that the snapshot leaves out, and that is older than it
    /// (`snap_clock`, the node's clock when it took it), is gone there:
    /// - for a user whose bucket was asked for, the whole share goes;
    /// - otherwise the share loses the groups whose buckets were asked for (the node no longer
    ///   has the user in them), and goes when none of the groups left is followed here and the
    ///   user's own bucket is not followed either (what keeps a share, as in
    ///   [`retain_remote`](Self::retain_remote)).
    pub fn apply_snapshot(
        &mut self,
        node: NodeIx,
        shares: Vec<(UserId, Contribution)>,
        scope: &SnapScope<'_>,
        snap_clock: u64,
        now_ms: u64,
    ) -> Vec<Change> {
        let listed: hashbrown::HashSet<UserId> = shares.iter().map(|(u, _)| u.clone()).collect();
        let mut changes: Vec<Change> = shares
            .into_iter()
            .filter_map(|(user, share)| self.apply_remote(&user, node, share, now_ms))
            .collect();
        let gone_at = Hlc::millis(snap_clock);
        changes.extend(self.each_replica(
            |user, replica| {
                let (_, held) = replica.remote.iter_mut().find(|(n, _)| *n == node)?;
                if !held.visible() || held.clock >= snap_clock || listed.contains(user) {
                    return None;
                }
                if (scope.users)(user) {
                    *held = Contribution::offline(snap_clock, Some(gone_at));
                } else if held.groups.iter().any(|g| (scope.groups)(g)) {
                    held.groups.retain(|g| !(scope.groups)(g));
                    let kept =
                        (scope.followed)(user) || held.groups.iter().any(scope.followed_groups);
                    if !kept {
                        *held = Contribution::offline(snap_clock, Some(gone_at));
                    }
                } else {
                    return None;
                }
                Some(gone_at)
            },
            now_ms,
        ));
        changes
    }

    /// `node` is gone (its lease expired, or it restarted): its shares are dropped, and users
    /// it alone kept online go offline with `last_seen` = `last_heard`.
    pub fn drop_node(&mut self, node: NodeIx, last_heard: u64, now_ms: u64) -> Vec<Change> {
        self.drop_remote(|n, _, _| n == node, last_heard, now_ms)
    }

    /// Keeps only the shares heard from other nodes that `keep` wants (the buckets they came
    /// through are still followed); the others would go stale, so they are dropped.
    pub fn retain_remote(
        &mut self,
        keep: &dyn Fn(&str, &Contribution) -> bool,
        now_ms: u64,
    ) -> Vec<Change> {
        self.drop_remote(|_, user, share| !keep(user, share), now_ms, now_ms)
    }

    fn drop_remote(
        &mut self,
        drop: impl Fn(NodeIx, &str, &Contribution) -> bool,
        at: u64,
        now_ms: u64,
    ) -> Vec<Change> {
        self.each_replica(
            |user, replica| {
                let before = replica.remote.len();
                replica.remote.retain(|(n, c)| !drop(*n, user, c));
                (replica.remote.len() != before).then_some(at)
            },
            now_ms,
        )
    }

    /// Runs `touch` on every user's shares (a single node has none); where it changed them and
    /// returns when (`last_seen` if the user went offline), the view is recomputed.
    fn each_replica(
        &mut self,
        mut touch: impl FnMut(&UserId, &mut Replica) -> Option<u64>,
        now_ms: u64,
    ) -> Vec<Change> {
        let Registry {
            users,
            online,
            replication,
            ..
        } = self;
        let Some(repl) = replication.as_mut() else {
            return Vec::new();
        };
        let mut changes = Vec::new();
        for (user, entry) in users.iter_mut() {
            let Some(at) = entry.replica.as_mut().and_then(|r| touch(user, r)) else {
                continue;
            };
            let cause = Cause::Remote { at };
            changes.extend(settle(user, entry, Some(&mut *repl), online, now_ms, cause));
        }
        changes
    }

    /// This node's visible shares that `in_scope` wants: what a snapshot sends.
    pub fn local_shares(
        &self,
        in_scope: &dyn Fn(&str, &Contribution) -> bool,
    ) -> Vec<(UserId, Contribution)> {
        self.users
            .iter()
            .filter_map(|(user, e)| {
                let r = e.replica.as_ref()?;
                (r.local.visible() && in_scope(user, &r.local))
                    .then(|| (user.clone(), r.local.clone()))
            })
            .collect()
    }

    /// Shares heard from other nodes and held here (tombstones included).
    #[cfg(test)]
    pub fn remote_share_count(&self) -> usize {
        self.users
            .values()
            .filter_map(|e| e.replica.as_ref())
            .map(|r| r.remote.len())
            .sum()
    }
}

/// Keeps the online index when a change crosses between offline and visible.
fn note_online(online: &mut BTreeSet<UserId>, change: Option<&Change>) {
    let Some(c) = change else { return };
    match (c.was_online, c.state.status != Aggregate::Offline) {
        (false, true) => {
            online.insert(c.state.user.clone());
        }
        (true, false) => {
            online.remove(&c.state.user);
        }
        _ => {}
    }
}

/// [`recompute`], keeping the online index.
fn settle(
    user: &UserId,
    entry: &mut UserEntry,
    repl: Option<&mut Replication>,
    online: &mut BTreeSet<UserId>,
    now_ms: u64,
    cause: Cause,
) -> Option<Change> {
    let change = recompute(user, entry, repl, now_ms, cause);
    note_online(online, change.as_ref());
    change
}

/// Recomputes `user`'s view after its sessions or shares changed; a change when it differs.
fn recompute(
    user: &UserId,
    entry: &mut UserEntry,
    repl: Option<&mut Replication>,
    now_ms: u64,
    cause: Cause,
) -> Option<Change> {
    refresh(user, entry, repl, now_ms, cause, false)
}

/// Takes the old process's share of a user (an upgrade, in a cluster) as this node's: what
/// its sessions make, with the old share's clock and `last_seen`, when that clock is newer than
/// the share held. The clock is observed either way, so this process's own stamps come after
/// it. Returns the share when it was taken.
fn inherit_share(
    entry: &mut UserEntry,
    repl: Option<&Replication>,
    share: Option<ShareRecord>,
) -> Option<Contribution> {
    let (r, share) = (repl?, share?);
    r.hlc.observe(share.clock);
    let replica = entry.replica.get_or_insert_with(Box::default);
    if share.clock <= replica.local.clock {
        return None;
    }
    let view = entry.compute_view();
    let replica = entry.replica.get_or_insert_with(Box::default);
    replica.local = Contribution {
        status: view.status,
        text: view.text,
        devices: view.devices,
        groups: view.groups,
        last_seen: share.last_seen,
        clock: share.clock,
    };
    Some(replica.local.clone())
}

/// [`recompute`], or with `force` a change (and a new `seq`) even when the view is the same.
///
/// In a cluster, this node's share is rebuilt from the sessions first; when it changed it is
/// stamped with a new clock and queued for the bridge. The view is then the merge of every
/// share, and `seq` = max(`seq` + 1, the newest share's clock), so it keeps rising when a
/// watcher moves to another node (docs/PROTOCOL.md, "seq").
fn refresh(
    user: &UserId,
    entry: &mut UserEntry,
    repl: Option<&mut Replication>,
    now_ms: u64,
    cause: Cause,
    force: bool,
) -> Option<Change> {
    let local = entry.compute_view();
    let (new, clock) = match repl {
        None => (local, 0),
        Some(r) => {
            let replica = entry.replica.get_or_insert_with(Box::default);
            let share = Contribution {
                status: local.status,
                text: local.text,
                devices: local.devices,
                groups: local.groups,
                last_seen: replica.local.last_seen,
                clock: replica.local.clock,
            };
            if !share.same_share(&replica.local) {
                let went_offline = replica.local.visible() && !share.visible();
                replica.local = Contribution {
                    last_seen: if went_offline {
                        Some(match cause {
                            Cause::Local => now_ms,
                            Cause::Remote { at } | Cause::Ended { at } => at,
                        })
                    } else {
                        share.last_seen
                    },
                    clock: r.hlc.tick(now_ms),
                    ..share
                };
                r.outgoing.push((user.clone(), replica.local.clone()));
            }
            let m = replica.merged();
            let view = View {
                status: m.status,
                text: m.text,
                devices: m.devices,
                groups: m.groups,
            };
            (view, m.clock)
        }
    };
    if new == entry.view && !force {
        return None;
    }
    let old = std::mem::replace(&mut entry.view, new);
    entry.seq = (entry.seq + 1).max(clock);
    entry.changed_at_ms = now_ms;
    if old.status != Aggregate::Offline && entry.view.status == Aggregate::Offline {
        entry.last_seen = Some(match cause {
            Cause::Local => now_ms,
            Cause::Remote { at } | Cause::Ended { at } => at,
        });
    }
    Some(Change {
        local: !matches!(cause, Cause::Remote { .. }),
        state: entry.state(user, now_ms),
        watchers: entry.watchers.shards().collect(),
        groups: group_changes(old.groups, &entry.view.groups),
        was_online: old.status != Aggregate::Offline,
        status_changed: old.status != entry.view.status || old.text != entry.view.text,
    })
}

/// Every group the user is a visible member of now (`true`), and every one it just left
/// (`false`): what the group owners must hear of a change.
fn group_changes(before: Vec<GroupId>, now: &[GroupId]) -> Vec<(GroupId, bool)> {
    let mut groups: Vec<(GroupId, bool)> = now.iter().map(|g| (g.clone(), true)).collect();
    for g in before {
        if now.binary_search(&g).is_err() {
            groups.push((g, false));
        }
    }
    groups
}

#[cfg(test)]
#[path = "registry_tests.rs"]
mod tests;
