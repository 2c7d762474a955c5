//! The shard's side of a cluster (SPEC §12): what it hands the cluster bridge, and what the
//! bridge asks of the users it owns. The bridge (`crate::cluster`) is a driver like history: it
//! calls in through jobs ([`super::invoke`]) and hears back through the [`ClusterLink`]
//! channel; nothing here knows NATS.
//!
//! After every operation that may change this node's share of a user, or the set of users
//! watched here, the shard hands what changed to the bridge with `try_send`: it never waits. When
//! the channel is full, changes wait in a per-shard backlog that keeps only the newest share per
//! user and the net interest per bucket (so it is bounded by the users and buckets of the
//! shard), and the shard's clock retries it every tick. Coalesced shares are counted in
//! `cluster_coalesced`.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use hashbrown::HashMap;

use super::{now_ms, Shard};
use crate::metrics::ShardMetrics;
use crate::presence::contrib::{bucket_of, Activity, Contribution, Hlc, NodeIx};
use crate::presence::{Outgoing, SnapScope, UserId};

/// What every shard shares with the cluster bridge: set in [`super::Shared`] when the node runs
/// in a cluster.
#[derive(Debug)]
pub struct ClusterLink {
    /// The node's clock: shares are stamped with it.
    pub hlc: Arc<Hlc>,
    /// `cluster.buckets`.
    pub buckets: u32,
    /// To the bridge: changed shares and interest, per operation.
    pub tx: flume::Sender<Outgoing>,
}

/// A set of buckets (a bitmap over `cluster.buckets`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BucketSet {
    buckets: u32,
    bits: Vec<u64>,
}

impl BucketSet {
    pub fn new(buckets: u32) -> BucketSet {
        BucketSet {
            buckets: buckets.max(1),
            bits: vec![0; (buckets.max(1) as usize).div_ceil(64)],
        }
    }

    pub fn of(buckets: u32, members: impl IntoIterator<Item = u32>) -> BucketSet {
        let mut set = BucketSet::new(buckets);
        for b in members {
            set.insert(b);
        }
        set
    }

    pub fn insert(&mut self, bucket: u32) {
        if bucket < self.buckets {
            self.bits[(bucket / 64) as usize] |= 1 << (bucket % 64);
        }
    }

    pub fn contains(&self, bucket: u32) -> bool {
        bucket < self.buckets && self.bits[(bucket / 64) as usize] & (1 << (bucket % 64)) != 0
    }

    /// Whether the user or group id `id` hashes into one of these buckets.
    pub fn holds(&self, id: &str) -> bool {
        self.contains(bucket_of(id, self.buckets))
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.bits.iter().all(|w| *w == 0)
    }

    #[cfg(test)]
    fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.buckets).filter(|b| self.contains(*b))
    }
}

/// Changes the bridge could not take yet: the newest share per user, the net interest per
/// bucket.
#[derive(Debug, Default)]
pub(super) struct Backlog {
    shares: HashMap<UserId, Contribution>,
    interest: HashMap<u32, i32>,
    group_interest: HashMap<u32, i32>,
    session_interest: HashMap<u32, i32>,
}

impl Backlog {
    /// Adds `out`; returns how many older shares it replaced. `activity` is ephemeral and
    /// not kept: the caller counts it as dropped.
    fn absorb(&mut self, out: Outgoing) -> u64 {
        let mut coalesced = 0;
        for (user, share) in out.shares {
            match self.shares.get_mut(&user) {
                Some(held) => {
                    coalesced += 1;
                    if share.clock > held.clock {
                        *held = share;
                    }
                }
                None => {
                    self.shares.insert(user, share);
                }
            }
        }
        for (sums, deltas) in [
            (&mut self.interest, out.interest),
            (&mut self.group_interest, out.group_interest),
            (&mut self.session_interest, out.session_interest),
        ] {
            for (bucket, delta) in deltas {
                *sums.entry(bucket).or_default() += delta;
            }
            sums.retain(|_, d| *d != 0);
        }
        coalesced
    }

    fn is_empty(&self) -> bool {
        self.shares.is_empty()
            && self.interest.is_empty()
            && self.group_interest.is_empty()
            && self.session_interest.is_empty()
    }

    fn take(&mut self) -> Outgoing {
        Outgoing {
            shares: self.shares.drain().collect(),
            interest: self.interest.drain().collect(),
            group_interest: self.group_interest.drain().collect(),
            session_interest: self.session_interest.drain().collect(),
            activity: Vec::new(),
        }
    }
}

pub(super) type BacklogCell = RefCell<Backlog>;

impl Shard {
    /// Hands what the last registry operation changed to the bridge (a no-op on a single node).
    pub(super) fn hand_to_bridge(&self) {
        let Some(link) = &self.shared.cluster else {
            return;
        };
        let mut out = self.registry.borrow_mut().take_outgoing();
        out.group_interest = self.groups.borrow_mut().take_interest();
        if out.is_empty() {
            return;
        }
        self.send_to_bridge(link, out);
    }

    /// Sends `out`, or keeps it in the backlog (behind what already waits there).
    fn send_to_bridge(&self, link: &ClusterLink, out: Outgoing) {
        let mut backlog = self.cluster_backlog.borrow_mut();
        let out = if backlog.is_empty() {
            match link.tx.try_send(out) {
                Err(flume::TrySendError::Full(out)) => out,
                _ => return,
            }
        } else {
            out
        };
        ShardMetrics::add(
            &self.metrics.cluster_activity_dropped,
            out.activity.len() as u64,
        );
        let n = backlog.absorb(out);
        ShardMetrics::add(&self.metrics.cluster_coalesced, n);
    }

    /// Upgrades: the users whose shares wait in the backlog, taken out of it (the old
    /// process hands the bus over; the new one publishes them).
    pub fn take_backlog_users(&self) -> Vec<String> {
        let mut backlog = self.cluster_backlog.borrow_mut();
        backlog.shares.drain().map(|(u, _)| u.to_string()).collect()
    }

    /// Upgrades: this node's shares of `users` published again ([`Registry::republish`]).
    ///
    /// [`Registry::republish`]: crate::presence::Registry::republish
    pub fn republish_shares(&self, users: &[UserId]) {
        self.registry.borrow_mut().republish(users);
        self.hand_to_bridge();
    }

    /// Upgrades: this node's shares of `users` (`None`: all) stamped anew and published
    /// ([`Registry::restamp_shares`]).
    ///
    /// [`Registry::restamp_shares`]: crate::presence::Registry::restamp_shares
    pub fn restamp_shares(&self, users: Option<Vec<UserId>>) {
        let n = (self.registry.borrow_mut()).restamp_shares(users.as_deref(), now_ms());
        tracing::debug!(
            shard = self.ix(),
            shares = n,
            "cluster: shares stamped anew"
        );
        self.hand_to_bridge();
    }

    /// An `activity` event made here, for the other nodes (a no-op on a single node).
    pub(super) fn publish_activity(&self, activity: Activity) {
        if let Some(link) = &self.shared.cluster {
            let out = Outgoing {
                activity: vec![activity],
                ..Outgoing::default()
            };
            self.send_to_bridge(link, out);
        }
    }

    /// Retries the backlog (the shard's clock, every tick).
    pub(super) fn retry_bridge_backlog(&self) {
        let Some(link) = &self.shared.cluster else {
            return;
        };
        let mut backlog = self.cluster_backlog.borrow_mut();
        if backlog.is_empty() {
            return;
        }
        let out = backlog.take();
        if let Err(flume::TrySendError::Full(out)) = link.tx.try_send(out) {
            backlog.absorb(out);
        }
    }

    /// Shares heard from `node` (a delta on the bus): applied, and the changes they make
    /// published to watchers here.
    pub fn apply_remote(&self, node: NodeIx, shares: Vec<(UserId, Contribution)>) {
        let now = now_ms();
        for (user, share) in shares {
            let change = self
                .registry
                .borrow_mut()
                .apply_remote(&user, node, share, now);
            if let Some(change) = change {
                self.publish(change);
            }
        }
    }

    /// `node`'s snapshot of the buckets in `scope`, for the users owned here
    /// ([`Registry::apply_snapshot`]).
    ///
    /// [`Registry::apply_snapshot`]: crate::presence::Registry::apply_snapshot
    pub fn apply_remote_snapshot(
        &self,
        node: NodeIx,
        shares: Vec<(UserId, Contribution)>,
        scope: &Scope,
        snap_clock: u64,
    ) {
        let snap = SnapScope {
            users: &|u| scope.users.holds(u),
            groups: &|g| scope.groups.holds(g),
            followed: &|u| scope.followed.holds(u),
            followed_groups: &|g| scope.followed_groups.holds(g),
        };
        let changes =
            self.registry
                .borrow_mut()
                .apply_snapshot(node, shares, &snap, snap_clock, now_ms());
        for change in changes {
            self.publish(change);
        }
    }

    /// `node` is gone: its shares are dropped, its users' `last_seen` is `last_heard`.
    pub fn drop_node(&self, node: NodeIx, last_heard: u64) {
        let changes = self
            .registry
            .borrow_mut()
            .drop_node(node, last_heard, now_ms());
        for change in changes {
            self.publish(change);
        }
    }

    /// Buckets were unfollowed: shares heard for users neither in a followed user bucket
    /// (`users`) nor in a group of a followed group bucket (`groups`) are dropped.
    pub fn retain_remote(&self, users: &BucketSet, groups: &BucketSet) {
        let keep =
            |u: &str, c: &Contribution| users.holds(u) || c.groups.iter().any(|g| groups.holds(g));
        let changes = self.registry.borrow_mut().retain_remote(&keep, now_ms());
        for change in changes {
            self.publish(change);
        }
    }

    /// This node's visible shares of the users in `users`' buckets, or in a group of `groups`'
    /// buckets, owned here (a snapshot's part).
    pub fn local_shares(
        &self,
        users: &BucketSet,
        groups: &BucketSet,
    ) -> Vec<(UserId, Contribution)> {
        let wanted =
            |u: &str, c: &Contribution| users.holds(u) || c.groups.iter().any(|g| groups.holds(g));
        self.registry.borrow().local_shares(&wanted)
    }
}

/// What a snapshot answer covers, as bucket sets: the user and group buckets asked for, and the
/// user buckets this node follows.
#[derive(Debug)]
pub struct Scope {
    pub users: BucketSet,
    pub groups: BucketSet,
    pub followed: BucketSet,
    /// The group buckets this node follows.
    pub followed_groups: BucketSet,
}

/// Runs `f` on every shard from outside them (the bridge's thread): one job per inbox.
pub fn on_every_shard(
    doors: &[flume::Sender<super::mesh::MeshMsg>],
    f: impl Fn(&Rc<Shard>) + Send + Clone + 'static,
) {
    for door in doors {
        let f = f.clone();
        let _ = door.send(super::mesh::MeshMsg::Invoke(Box::new(move |s| f(s))));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_sets_hold_what_was_put_in() {
        let set = BucketSet::of(100, [0, 63, 64, 99, 100]);
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![0, 63, 64, 99]);
        assert!(!set.contains(100), "out of range is never held");
        assert!(BucketSet::new(7).is_empty());
        let user = "alice";
        let b = bucket_of(user, 100);
        assert!(BucketSet::of(100, [b]).holds(user));
    }

    #[test]
    fn the_backlog_keeps_the_newest_share_per_user_and_net_interest() {
        let mut backlog = Backlog::default();
        let share = |clock| Contribution {
            clock,
            devices: 1,
            status: crate::presence::Aggregate::Online,
            ..Contribution::default()
        };
        let a = UserId::from("a");
        let n = backlog.absorb(Outgoing {
            shares: vec![(a.clone(), share(5))],
            interest: vec![(3, 1), (4, 1)],
            group_interest: vec![(3, 1)],
            ..Outgoing::default()
        });
        assert_eq!(n, 0);
        let n = backlog.absorb(Outgoing {
            shares: vec![(a.clone(), share(9)), (a.clone(), share(7))],
            interest: vec![(3, -1)],
            ..Outgoing::default()
        });
        assert_eq!(n, 2, "two older shares coalesced");
        let out = backlog.take();
        assert_eq!(out.shares, vec![(a, share(9))]);
        assert_eq!(out.interest, vec![(4, 1)], "+1 -1 nets out");
        assert_eq!(
            out.group_interest,
            vec![(3, 1)],
            "group buckets are kept apart"
        );
        assert!(backlog.is_empty());
    }
}
