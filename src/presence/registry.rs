//! The per-shard presence registry: the users this shard owns, their sessions, their aggregate
//! state and who watches them (SPEC §3).
//!
//! Pure: every operation takes `now_ms` and returns what must be told to whom (a [`Change`]);
//! the shard turns that into mesh messages. Invariants, checked by the unit tests and by the
//! proptest reference model at the bottom of this file:
//! - a user's `seq` grows by exactly one per change of (status, text, devices), never otherwise;
//! - `last_seen` is set when a user goes from visible to offline;
//! - an entry exists while it has sessions, watchers, or history (`seq > 0`) worth remembering.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::ops::Bound;
use std::sync::Arc;

use hashbrown::HashMap;

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

    fn compute_view(&self) -> View {
        let mut view = View::default();
        let mut best_stamp = 0;
        for s in &self.sessions {
            let Some(agg) = s.status.visible() else {
                continue;
            };
            view.devices += 1;
            if agg > view.status || (agg == view.status && s.stamp >= best_stamp) {
                view.status = agg;
                view.text = s.text.clone();
                best_stamp = s.stamp;
            }
            for g in s.info.groups.iter() {
                if let Err(pos) = view.groups.binary_search(g) {
                    view.groups.insert(pos, g.clone());
                }
            }
        }
        view
    }

    fn forgettable(&self) -> bool {
        self.sessions.is_empty() && self.watchers.is_empty() && self.seq == 0
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
            watchers: e.watchers.total(),
        }
    }
}

/// A change of a user's aggregate state, with everyone who must hear of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub state: PresenceState,
    /// Shards with subscribers of this user: one mesh message each.
    pub watchers: Vec<ShardIx>,
    /// Group feeds affected: `(group, still_member)`. A member gets `state`; a user who stopped
    /// being a visible member gets `state.left_group()`.
    pub groups: Vec<(GroupId, bool)>,
    /// Whether the user was visible before this change.
    pub was_online: bool,
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
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
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
        entry.sessions.push(Session {
            id,
            status,
            text: None,
            stamp: entry.stamps,
            info,
        });
        self.sessions += 1;
        let change = Self::recompute(user, entry, now_ms);
        self.count_online(change.as_ref());
        change
    }

    /// The session ended (closed, dropped, kicked). Unknown sessions are ignored.
    pub fn disconnect(&mut self, user: &str, id: SessionId, now_ms: u64) -> Option<Change> {
        let (user, entry) = self.users.get_key_value_mut(user)?;
        let pos = entry.sessions.iter().position(|s| s.id == id)?;
        entry.sessions.swap_remove(pos);
        self.sessions -= 1;
        let user = user.clone();
        let change = Self::recompute(&user, entry, now_ms);
        self.count_online(change.as_ref());
        self.forget_if_empty(&user);
        change
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
        let change = Self::recompute(&user, entry, now_ms);
        self.count_online(change.as_ref());
        Ok(change)
    }

    /// A subscription from `shard`: count it and return the snapshot to send back.
    pub fn watch(&mut self, user: &UserId, shard: ShardIx, now_ms: u64) -> PresenceState {
        let entry = self.users.entry_ref(user).or_default();
        entry.watchers.add(shard);
        entry.state(user, now_ms)
    }

    /// A subscription from `shard` ended. Returns false for an unwatch with no matching watch.
    pub fn unwatch(&mut self, user: &str, shard: ShardIx) -> bool {
        let Some(entry) = self.users.get_mut(user) else {
            return false;
        };
        let known = entry.watchers.remove(shard);
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

    /// Keeps the online index when a change crosses between offline and visible.
    fn count_online(&mut self, change: Option<&Change>) {
        let Some(c) = change else { return };
        match (c.was_online, c.state.status != Aggregate::Offline) {
            (false, true) => {
                self.online.insert(c.state.user.clone());
            }
            (true, false) => {
                self.online.remove(&c.state.user);
            }
            _ => {}
        }
    }

    /// Rebuilds `user`'s entry after a panic may have left it half-updated (the session layer's
    /// repair): drops `gone` if it is still listed, recomputes the aggregate, and recounts the
    /// registry's totals from scratch (O(users)). Always returns a change with a new `seq`, so
    /// every watcher is sent the rebuilt state even if the interrupted change had been counted.
    pub fn rebuild(&mut self, user: &str, gone: SessionId, now_ms: u64) -> Option<Change> {
        let change = match self.users.get_key_value_mut(user) {
            None => None,
            Some((id, entry)) => {
                entry.sessions.retain(|s| s.id != gone);
                let id = id.clone();
                let old = std::mem::take(&mut entry.view);
                let was_online = old.status != Aggregate::Offline;
                entry.view = entry.compute_view();
                entry.seq += 1;
                entry.changed_at_ms = now_ms;
                if was_online && entry.view.status == Aggregate::Offline {
                    entry.last_seen = Some(now_ms);
                }
                Some(Change {
                    state: entry.state(&id, now_ms),
                    watchers: entry.watchers.shards().collect(),
                    groups: group_changes(old.groups, &entry.view.groups),
                    was_online,
                })
            }
        };
        self.sessions = self.users.values().map(|e| e.sessions.len()).sum();
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

    fn recompute(user: &UserId, entry: &mut UserEntry, now_ms: u64) -> Option<Change> {
        let new = entry.compute_view();
        if new == entry.view {
            return None;
        }
        let old = std::mem::replace(&mut entry.view, new);
        let visible_changed = old.status != entry.view.status
            || old.text != entry.view.text
            || old.devices != entry.view.devices;
        // Group membership can change on its own only through sessions that are visible, which
        // also changes `devices`; so a group-only difference cannot happen. Assert it.
        assert!(
            visible_changed,
            "group membership changes only with devices"
        );
        entry.seq += 1;
        entry.changed_at_ms = now_ms;
        if old.status != Aggregate::Offline && entry.view.status == Aggregate::Offline {
            entry.last_seen = Some(now_ms);
        }
        Some(Change {
            state: entry.state(user, now_ms),
            watchers: entry.watchers.shards().collect(),
            groups: group_changes(old.groups, &entry.view.groups),
            was_online: old.status != Aggregate::Offline,
        })
    }
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
