//! Group presence on the group's owner shard: the visible members of each group and which
//! shards watch it.
//!
//! Members are users whose visible sessions carry the group in their token. The user's owner
//! shard sends every change of a member (or a member leaving) here; this shard keeps the member
//! list for snapshots and forwards the change to every watching shard.

use hashbrown::HashMap;

use super::state::{Aggregate, GroupId, PresenceState, UserId};
use super::watchers::{ShardIx, Watchers};

#[derive(Debug, Default)]
struct GroupEntry {
    /// Visible members only; a member that goes offline in the group is removed.
    members: HashMap<UserId, PresenceState>,
    watchers: Watchers,
}

/// The groups owned by one shard.
#[derive(Debug, Default)]
pub struct Groups {
    groups: HashMap<GroupId, GroupEntry>,
}

impl Groups {
    pub fn new() -> Groups {
        Groups::default()
    }

    /// A member's state as seen through `group` (its aggregate, or offline when it left).
    /// Returns the shards to forward it to. A state older than the one held (impossible over a
    /// FIFO mesh, but cheap to refuse) is ignored and forwards nowhere.
    pub fn member_update(&mut self, group: &GroupId, state: &PresenceState) -> Vec<ShardIx> {
        let entry = self.groups.entry_ref(group).or_default();
        let held = entry.members.get(&state.user).map_or(0, |s| s.seq);
        if held > state.seq {
            return Vec::new();
        }
        if state.status == Aggregate::Offline {
            entry.members.remove(&state.user);
        } else {
            entry.members.insert(state.user.clone(), state.clone());
        }
        let shards = entry.watchers.shards().collect();
        self.forget_if_empty(group);
        shards
    }

    /// A group subscription from `shard`: count it and return the visible members, sorted by
    /// user id so snapshots are stable.
    pub fn watch(&mut self, group: &GroupId, shard: ShardIx) -> Vec<PresenceState> {
        let entry = self.groups.entry_ref(group).or_default();
        entry.watchers.add(shard);
        let mut members: Vec<PresenceState> = entry.members.values().cloned().collect();
        members.sort_unstable_by(|a, b| a.user.cmp(&b.user));
        members
    }

    /// A group subscription from `shard` ended. False when there was none to end.
    pub fn unwatch(&mut self, group: &str, shard: ShardIx) -> bool {
        let Some(entry) = self.groups.get_mut(group) else {
            return false;
        };
        let known = entry.watchers.remove(shard);
        self.forget_if_empty(group);
        known
    }

    /// Visible members of `group` (unordered) and whether anyone watches it; `None` when the
    /// group is unknown here (no member, no watcher).
    pub fn members(&self, group: &str) -> Option<(impl Iterator<Item = &PresenceState>, bool)> {
        let g = self.groups.get(group)?;
        Some((g.members.values(), !g.watchers.is_empty()))
    }

    /// Every group held here with its visible member count (groups without members skipped).
    pub fn counts(&self) -> Vec<(GroupId, u64)> {
        self.groups
            .iter()
            .filter(|(_, g)| !g.members.is_empty())
            .map(|(name, g)| (name.clone(), g.members.len() as u64))
            .collect()
    }

    /// Visible members of `group`.
    pub fn member_count(&self, group: &str) -> usize {
        self.groups.get(group).map_or(0, |g| g.members.len())
    }

    pub fn group_count(&self) -> usize {
        self.groups.len()
    }

    fn forget_if_empty(&mut self, group: &str) {
        if self
            .groups
            .get(group)
            .is_some_and(|g| g.members.is_empty() && g.watchers.is_empty())
        {
            self.groups.remove(group);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(user: &str, status: Aggregate, seq: u64) -> PresenceState {
        PresenceState {
            user: user.into(),
            status,
            text: None,
            devices: u32::from(status != Aggregate::Offline),
            last_seen: None,
            ts: seq,
            seq,
        }
    }

    #[test]
    fn snapshot_holds_visible_members_and_updates_reach_watchers() {
        let mut g = Groups::new();
        let team: GroupId = "team".into();
        assert!(g
            .member_update(&team, &state("b", Aggregate::Online, 1))
            .is_empty());
        g.member_update(&team, &state("a", Aggregate::Away, 1));
        let snap = g.watch(&team, 2);
        assert_eq!(
            snap.iter().map(|s| &*s.user).collect::<Vec<_>>(),
            vec!["a", "b"]
        );
        assert_eq!(
            g.member_update(&team, &state("a", Aggregate::Offline, 2)),
            vec![2]
        );
        assert_eq!(g.member_count("team"), 1);
        assert!(
            g.member_update(&team, &state("b", Aggregate::Busy, 0))
                .is_empty(),
            "stale"
        );
        assert!(g.unwatch("team", 2));
        assert!(!g.unwatch("team", 2));
        g.member_update(&team, &state("b", Aggregate::Offline, 3));
        assert_eq!(g.group_count(), 0, "an empty, unwatched group is forgotten");
    }
}
