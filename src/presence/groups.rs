//! Group presence on the group's owner shard: the visible members of each group and which
//! shards watch it.
//!
//! Members are users whose visible sessions carry the group in their token. The user's owner
//! shard sends every change of a member (or a member leaving) here; this shard keeps the member
//! list for snapshots and forwards the change to every watching shard.

use std::collections::BTreeMap;
use std::ops::Bound;

use hashbrown::HashMap;

use super::state::{Aggregate, GroupId, PresenceState, UserId};
use super::watchers::{ShardIx, Watchers};

/// Visible members of a group by aggregate status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct StatusCounts {
    pub online: u64,
    pub away: u64,
    pub busy: u64,
}

impl StatusCounts {
    fn slot(&mut self, status: Aggregate) -> Option<&mut u64> {
        match status {
            Aggregate::Online => Some(&mut self.online),
            Aggregate::Away => Some(&mut self.away),
            Aggregate::Busy => Some(&mut self.busy),
            Aggregate::Offline => None,
        }
    }

    pub fn total(&self) -> u64 {
        self.online + self.away + self.busy
    }
}

#[derive(Debug, Default)]
struct GroupEntry {
    /// Visible members only, in id order (snapshots and admin pages come out sorted, and a page
    /// is a range read, not a scan); a member that goes offline in the group is removed.
    members: BTreeMap<UserId, PresenceState>,
    /// Members by status, kept with every update (admin counts without a scan).
    counts: StatusCounts,
    watchers: Watchers,
}

/// The groups owned by one shard.
#[derive(Debug, Default)]
pub struct Groups {
    groups: HashMap<GroupId, GroupEntry>,
    /// In a cluster: `cluster.buckets`, and the group buckets that gained (+1) or lost (-1)
    /// their first or last watched group here, for the bridge ([`Groups::take_interest`]).
    interest: Option<(u32, Vec<(u32, i32)>)>,
}

impl Groups {
    pub fn new() -> Groups {
        Groups::default()
    }

    /// The groups of a cluster node: watched groups are reported by bucket.
    pub fn replicated(buckets: u32) -> Groups {
        Groups {
            interest: Some((buckets.max(1), Vec::new())),
            ..Groups::default()
        }
    }

    /// Group buckets whose interest changed since the last call (empty on a single node).
    pub fn take_interest(&mut self) -> Vec<(u32, i32)> {
        self.interest
            .as_mut()
            .map_or_else(Vec::new, |(_, v)| std::mem::take(v))
    }

    fn note_interest(&mut self, group: &str, delta: i32) {
        if let Some((buckets, v)) = &mut self.interest {
            v.push((super::contrib::bucket_of(group, *buckets), delta));
        }
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
        let old = if state.status == Aggregate::Offline {
            entry.members.remove(&state.user)
        } else {
            entry.members.insert(state.user.clone(), state.clone())
        };
        if let Some(n) = old.and_then(|o| entry.counts.slot(o.status)) {
            *n -= 1;
        }
        if let Some(n) = entry.counts.slot(state.status) {
            *n += 1;
        }
        let shards = entry.watchers.shards().collect();
        self.forget_if_empty(group);
        shards
    }

    /// A group subscription from `shard`: count it and return the visible members, sorted by
    /// user id so snapshots are stable.
    pub fn watch(&mut self, group: &GroupId, shard: ShardIx) -> Vec<PresenceState> {
        let entry = self.groups.entry_ref(group).or_default();
        let first = entry.watchers.is_empty();
        entry.watchers.add(shard);
        let members = entry.members.values().cloned().collect();
        if first {
            self.note_interest(group, 1);
        }
        members
    }

    /// A group subscription from `shard` ended. False when there was none to end.
    pub fn unwatch(&mut self, group: &str, shard: ShardIx) -> bool {
        let Some(entry) = self.groups.get_mut(group) else {
            return false;
        };
        let known = entry.watchers.remove(shard);
        if known && entry.watchers.is_empty() {
            self.note_interest(group, -1);
        }
        self.forget_if_empty(group);
        known
    }

    /// One page of `group`'s visible members after `after` (in id order, at most `limit`),
    /// whether more follow, and the counts by status; `None` when the group is unknown here (no
    /// member, no watcher). O(log members + limit): no scan.
    pub fn page(
        &self,
        group: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Option<(Vec<&PresenceState>, bool, StatusCounts)> {
        let g = self.groups.get(group)?;
        let from = match after {
            Some(a) => Bound::Excluded(a),
            None => Bound::Unbounded,
        };
        let mut members: Vec<&PresenceState> = g
            .members
            .range::<str, _>((from, Bound::Unbounded))
            .map(|(_, s)| s)
            .take(limit + 1)
            .collect();
        let more = members.len() > limit;
        members.truncate(limit);
        Some((members, more, g.counts))
    }

    /// The `max` groups held here with the most visible members, largest first (ties by
    /// name): one pass keeping the best in a bounded heap, no copy of the whole table.
    pub fn largest(&self, max: usize) -> Vec<(GroupId, u64)> {
        use std::cmp::Reverse;
        use std::collections::BinaryHeap;
        if max == 0 {
            return Vec::new();
        }
        // Min-heap on (count, Reverse(name)): the top is the weakest kept.
        let mut best: BinaryHeap<Reverse<(u64, Reverse<&GroupId>)>> = BinaryHeap::new();
        for (name, g) in &self.groups {
            let n = g.members.len() as u64;
            if n == 0 {
                continue;
            }
            let item = Reverse((n, Reverse(name)));
            if best.len() < max {
                best.push(item);
            } else if best.peek().is_some_and(|top| item < *top) {
                best.pop();
                best.push(item);
            }
        }
        let mut out: Vec<(GroupId, u64)> = best
            .into_iter()
            .map(|Reverse((n, Reverse(name)))| (name.clone(), n))
            .collect();
        out.sort_unstable_by(largest_first);
        out
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

/// The order of [`Groups::largest`]: most members first, ties by name (also how the shards'
/// lists are merged).
pub fn largest_first(a: &(GroupId, u64), b: &(GroupId, u64)) -> std::cmp::Ordering {
    b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0))
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
    fn watched_groups_are_reported_by_bucket_in_a_cluster_only() {
        let mut single = Groups::new();
        single.watch(&"team".into(), 0);
        assert!(single.take_interest().is_empty());
        let mut g = Groups::replicated(16);
        let b = crate::presence::contrib::bucket_of("team", 16);
        g.watch(&"team".into(), 0);
        g.watch(&"team".into(), 1);
        assert_eq!(g.take_interest(), vec![(b, 1)], "the first watcher only");
        g.unwatch("team", 0);
        g.unwatch("team", 1);
        assert_eq!(g.take_interest(), vec![(b, -1)], "the last one only");
        assert!(!g.unwatch("team", 1));
        assert!(g.take_interest().is_empty());
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
        let (page, more, counts) = g.page("team", None, 10).unwrap();
        assert_eq!((page.len(), more, counts.online), (1, false, 1));
        g.member_update(&team, &state("c", Aggregate::Away, 1));
        let (page, more, counts) = g.page("team", None, 1).unwrap();
        assert_eq!((&*page[0].user, more), ("b", true));
        assert_eq!((counts.online, counts.away, counts.total()), (1, 1, 2));
        let (page, more, _) = g.page("team", Some("b"), 1).unwrap();
        assert_eq!((&*page[0].user, more), ("c", false));
        g.member_update(&team, &state("c", Aggregate::Busy, 2));
        assert_eq!(
            g.page("team", None, 9).unwrap().2,
            StatusCounts {
                online: 1,
                away: 0,
                busy: 1
            }
        );
        g.member_update(&team, &state("c", Aggregate::Offline, 3));
        let other: GroupId = "other".into();
        g.member_update(&other, &state("x", Aggregate::Online, 1));
        g.member_update(&other, &state("y", Aggregate::Online, 1));
        assert_eq!(
            g.largest(1),
            vec![(other.clone(), 2)],
            "the largest group first, only as many as asked"
        );
        assert_eq!(g.largest(5), vec![(other.clone(), 2), (team.clone(), 1)]);
        g.member_update(&other, &state("x", Aggregate::Offline, 2));
        g.member_update(&other, &state("y", Aggregate::Offline, 2));
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
