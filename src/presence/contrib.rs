//! A node's share of a user's presence in a cluster (SPEC §12), and how the shares merge.
//!
//! Each node is the only writer of its own [`Contribution`] per user: the aggregate of that
//! user's visible sessions on that node. Every node holds the contributions it has heard from
//! the others, one per (user, node), and merges them with its own into what watchers see
//! ([`merge`]): the highest status, the sum of devices, the union of groups, the latest
//! `last_seen`. Each contribution carries its writer's [`Hlc`] clock, so a held contribution is
//! replaced only by a newer one ([`newer`]): applying any interleaving or duplication of a
//! node's contributions leaves the newest, the same as applying them in order (the proptest at
//! the bottom). Pure: no I/O, no time source but what is passed in.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::state::{Aggregate, GroupId};

/// A cluster node as a shard knows it: an index the bridge hands out per (node id,
/// incarnation), so a restarted node is a new index and its old contributions drop as one.
pub type NodeIx = u32;

/// The bucket of a user or group id: the same stable hash that picks its owner shard
/// (`xxh3`), mod `buckets`. Deltas travel on one bus subject per bucket, so a node follows
/// only the buckets its watchers need.
pub fn bucket_of(id: &str, buckets: u32) -> u32 {
    (xxhash_rust::xxh3::xxh3_64(id.as_bytes()) % u64::from(buckets.max(1))) as u32
}

/// One node's share of one user's presence (the default: nothing visible, clock 0).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contribution {
    /// Highest status over the user's visible sessions on the node; offline when none.
    pub status: Aggregate,
    /// The text that goes with `status` (the most recently set among equal statuses).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<Arc<str>>,
    /// Visible sessions on the node.
    pub devices: u32,
    /// Groups carried by at least one visible session on the node, sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<GroupId>,
    /// When the user last went offline on the node (ms since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<u64>,
    /// The writer's hybrid logical clock when it produced this ([`Hlc`]).
    pub clock: u64,
}

impl Contribution {
    /// Nothing visible on the node (a tombstone: it replaces an older visible share).
    pub fn offline(clock: u64, last_seen: Option<u64>) -> Contribution {
        Contribution {
            status: Aggregate::Offline,
            text: None,
            devices: 0,
            groups: Vec::new(),
            last_seen,
            clock,
        }
    }

    pub fn visible(&self) -> bool {
        self.status != Aggregate::Offline
    }

    /// Same visible share (status, text, devices, groups), whatever the clock.
    pub fn same_share(&self, other: &Contribution) -> bool {
        self.status == other.status
            && self.text == other.text
            && self.devices == other.devices
            && self.groups == other.groups
    }
}

/// An `activity` event on its way to other nodes (ephemeral: never stored, never resent).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activity {
    pub user: super::UserId,
    pub kind: Arc<str>,
    pub ts: u64,
    /// For the sessions of this user; `None`: for the watchers of `user`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<super::UserId>,
}

/// Whether `incoming` replaces `held` (last writer wins by the writer's clock; a node's clock
/// never repeats, so equal clocks are the same contribution seen twice).
pub fn newer(held: Option<&Contribution>, incoming: &Contribution) -> bool {
    held.is_none_or(|h| incoming.clock > h.clock)
}

/// What watchers see of a user: the shares merged.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Merged {
    pub status: Aggregate,
    pub text: Option<Arc<str>>,
    pub devices: u32,
    pub groups: Vec<GroupId>,
    pub last_seen: Option<u64>,
    /// The newest clock among the shares (0 for none).
    pub clock: u64,
}

/// Merges shares: status = highest (its text from the newest share with that status),
/// devices = sum, groups = union (sorted), last_seen = max. Order-independent.
pub fn merge<'a>(shares: impl IntoIterator<Item = &'a Contribution>) -> Merged {
    let mut m = Merged::default();
    let mut text_clock = 0;
    for c in shares {
        m.clock = m.clock.max(c.clock);
        m.last_seen = m.last_seen.max(c.last_seen);
        if !c.visible() {
            continue;
        }
        m.devices = m.devices.saturating_add(c.devices);
        // Two nodes' clocks can tie: the text breaks it, so the result never depends on order.
        let better = c.status > m.status
            || (c.status == m.status && (c.clock, &c.text) > (text_clock, &m.text));
        if better {
            m.status = c.status;
            m.text = c.text.clone();
            text_clock = c.clock;
        }
        for g in &c.groups {
            if let Err(pos) = m.groups.binary_search(g) {
                m.groups.insert(pos, g.clone());
            }
        }
    }
    m
}

/// Bits of an [`Hlc`] value below the milliseconds: up to 2048 clock values per millisecond
/// before the counter runs ahead into the next one, and values stay below 2^53 (exact in a
/// JSON number) until the year 2109.
pub const HLC_LOGICAL_BITS: u32 = 11;

// 2109-01-01 in ms, shifted, is still exact as a JSON (f64) number.
const _: () = assert!(4_386_441_600_000u64 << HLC_LOGICAL_BITS < 1 << 53);

/// A hybrid logical clock (Kulkarni et al.): physical milliseconds in the high bits, a counter in
/// the low ones. Every value it hands out is greater than every value it handed out or
/// [`observed`](Hlc::observe) before, and stays close to wall-clock time. One per process,
/// shared by the shards.
#[derive(Debug, Default)]
pub struct Hlc {
    last: AtomicU64,
}

impl Hlc {
    pub fn new() -> Hlc {
        Hlc::default()
    }

    /// A new clock value: above every earlier one, and at least `now_ms` in the high bits.
    pub fn tick(&self, now_ms: u64) -> u64 {
        let floor = now_ms << HLC_LOGICAL_BITS;
        let prev = self
            .last
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |last| {
                Some(last.saturating_add(1).max(floor))
            })
            .expect("the closure always returns Some");
        prev.saturating_add(1).max(floor)
    }

    /// Moves the clock past a value heard from another node, so this node's next values sort
    /// after everything it has seen.
    pub fn observe(&self, remote: u64) {
        self.last.fetch_max(remote, Ordering::AcqRel);
    }

    /// The milliseconds part of a clock value.
    pub fn millis(clock: u64) -> u64 {
        clock >> HLC_LOGICAL_BITS
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn share(status: Aggregate, devices: u32, clock: u64) -> Contribution {
        Contribution {
            status,
            text: Some(Arc::from(format!("t{clock}"))),
            devices,
            groups: Vec::new(),
            last_seen: None,
            clock,
        }
    }

    #[test]
    fn merge_takes_the_highest_status_sums_devices_and_unions_groups() {
        let mut a = share(Aggregate::Away, 2, 10);
        a.groups = vec!["g1".into(), "g3".into()];
        let mut b = share(Aggregate::Busy, 1, 5);
        b.groups = vec!["g2".into(), "g3".into()];
        b.last_seen = Some(7);
        let m = merge([&a, &b]);
        assert_eq!(m.status, Aggregate::Busy);
        assert_eq!(m.text.as_deref(), Some("t5"));
        assert_eq!(m.devices, 3);
        assert_eq!(m.groups, ["g1", "g2", "g3"].map(GroupId::from).to_vec());
        assert_eq!(m.last_seen, Some(7));
        assert_eq!(m.clock, 10);
    }

    #[test]
    fn equal_statuses_take_the_newest_text_and_offline_shares_add_nothing() {
        let old = share(Aggregate::Online, 1, 3);
        let new = share(Aggregate::Online, 1, 9);
        let gone = Contribution::offline(20, Some(1234));
        for order in [[&old, &new, &gone], [&gone, &new, &old]] {
            let m = merge(order);
            assert_eq!(m.text.as_deref(), Some("t9"));
            assert_eq!(m.devices, 2);
            assert_eq!(m.last_seen, Some(1234));
            assert_eq!(m.clock, 20);
        }
        assert_eq!(merge([&gone]).status, Aggregate::Offline);
        assert_eq!(merge([]), Merged::default());
    }

    #[test]
    fn newer_is_by_clock_only() {
        let a = share(Aggregate::Online, 1, 5);
        assert!(newer(None, &a));
        assert!(!newer(Some(&a), &a), "the same share twice changes nothing");
        assert!(newer(Some(&a), &Contribution::offline(6, None)));
        assert!(!newer(Some(&a), &share(Aggregate::Busy, 4, 4)));
    }

    #[test]
    fn the_clock_rises_past_everything_it_saw_and_tracks_the_wall() {
        let hlc = Hlc::new();
        let a = hlc.tick(1_000);
        assert_eq!(Hlc::millis(a), 1_000);
        let b = hlc.tick(1_000);
        assert!(b > a, "same millisecond: the counter moves");
        let c = hlc.tick(999);
        assert!(c > b, "a clock stepping back does not move it back");
        hlc.observe(5_000 << HLC_LOGICAL_BITS);
        assert!(hlc.tick(1_001) > 5_000 << HLC_LOGICAL_BITS);
        assert_eq!(Hlc::millis(hlc.tick(9_000)), 9_000);
    }

    /// One delivery a receiver may see: a node's contribution for a user, or a resync that
    /// re-sends the node's final contribution for that user.
    #[derive(Clone, Debug)]
    enum Delivery {
        Share { node: u8, user: u8, ix: usize },
        Resync { node: u8, user: u8 },
    }

    fn status_of(n: u8) -> Aggregate {
        [
            Aggregate::Offline,
            Aggregate::Away,
            Aggregate::Busy,
            Aggregate::Online,
        ][usize::from(n % 4)]
    }

    proptest! {
        /// Any interleaving, duplication or loss of deltas, healed by a resync of each node's
        /// final share, converges to the aggregate of the final shares applied in order.
        #[test]
        fn any_delivery_order_converges_to_the_final_shares(
            // Per (node, user): the statuses and device counts the node wrote, in order.
            writes in proptest::collection::vec(
                (0u8..3, 0u8..3, proptest::collection::vec((0u8..4, 0u32..3, any::<bool>()), 1..5)),
                1..8,
            ),
            deliveries in proptest::collection::vec((any::<u8>(), any::<u8>(), any::<u8>(), any::<bool>()), 0..60),
        ) {
            // Each (node, user) history gets increasing clocks, as a node's HLC hands out.
            let mut history: BTreeMap<(u8, u8), Vec<Contribution>> = BTreeMap::new();
            let mut clock = 0u64;
            for (node, user, ws) in &writes {
                let h = history.entry((*node, *user)).or_default();
                for (s, d, grouped) in ws {
                    clock += 1;
                    let status = status_of(*s);
                    let visible = status != Aggregate::Offline;
                    h.push(Contribution {
                        status,
                        text: visible.then(|| Arc::from(format!("x{clock}"))),
                        devices: if visible { d + 1 } else { 0 },
                        groups: if visible && *grouped { vec!["g".into()] } else { Vec::new() },
                        last_seen: (!visible).then_some(clock),
                        clock,
                    });
                }
            }
            let keys: Vec<(u8, u8)> = history.keys().copied().collect();
            // A random stream: shares in any order (some repeated, some never), then one
            // resync per (node, user) — what gap detection guarantees eventually.
            let mut stream: Vec<Delivery> = deliveries.iter().map(|(k, i, _, resync)| {
                let (node, user) = keys[usize::from(*k) % keys.len()];
                if *resync {
                    Delivery::Resync { node, user }
                } else {
                    let len = history[&(node, user)].len();
                    Delivery::Share { node, user, ix: usize::from(*i) % len }
                }
            }).collect();
            stream.extend(keys.iter().map(|&(node, user)| Delivery::Resync { node, user }));

            let mut held: BTreeMap<(u8, u8), Contribution> = BTreeMap::new();
            for d in &stream {
                let (key, c) = match d {
                    Delivery::Share { node, user, ix } => ((*node, *user), &history[&(*node, *user)][*ix]),
                    Delivery::Resync { node, user } => ((*node, *user), history[&(*node, *user)].last().unwrap()),
                };
                if newer(held.get(&key), c) {
                    held.insert(key, c.clone());
                }
            }
            for user in 0..3u8 {
                let got = merge(held.iter().filter(|((_, u), _)| *u == user).map(|(_, c)| c));
                let want = merge(history.iter().filter(|((_, u), _)| *u == user).map(|(_, h)| h.last().unwrap()));
                prop_assert_eq!(got, want);
            }
        }

        /// The merge does not depend on the order of the shares.
        #[test]
        fn merge_is_order_independent(
            shares in proptest::collection::vec((0u8..4, 0u32..4, 0u64..1000), 0..6),
        ) {
            let shares: Vec<Contribution> = shares.iter().enumerate().map(|(i, (s, d, t))| {
                let status = status_of(*s);
                Contribution {
                    status,
                    text: Some(Arc::from(format!("{i}"))),
                    devices: if status == Aggregate::Offline { 0 } else { d + 1 },
                    groups: vec![GroupId::from(format!("g{}", d % 2))],
                    last_seen: Some(*t),
                    // Distinct clocks, as distinct writes always have.
                    clock: t * 16 + i as u64,
                }
            }).collect();
            let forward = merge(&shares);
            let backward = merge(shares.iter().rev());
            prop_assert_eq!(forward, backward);
        }
    }
}
