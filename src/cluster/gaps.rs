//! Gap detection (SPEC §12): each node numbers the messages it publishes on each bucket
//! (1, 2, 3, ...), and a receiver that sees a number skipped knows it lost something there and
//! asks for a snapshot of that bucket. Pure.

use hashbrown::HashMap;

use crate::presence::contrib::NodeIx;

/// What a received message's number means.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    /// The next one, or the first since following this bucket or meeting this node (whatever
    /// came before is covered by the snapshot asked for then).
    InOrder,
    /// Numbers were skipped: messages were lost; ask for a snapshot.
    Gap { missed: u64 },
    /// Already seen (a duplicate, or older than a snapshot that covered it).
    Old,
}

/// The last number seen per (node, bucket).
#[derive(Debug, Default)]
pub struct Gaps {
    last: HashMap<(NodeIx, u32), u64>,
}

impl Gaps {
    pub fn new() -> Gaps {
        Gaps::default()
    }

    /// Message `n` of `node` on `bucket` arrived.
    pub fn see(&mut self, node: NodeIx, bucket: u32, n: u64) -> Seen {
        match self.last.get_mut(&(node, bucket)) {
            None => {
                self.last.insert((node, bucket), n);
                Seen::InOrder
            }
            Some(last) if n <= *last => Seen::Old,
            Some(last) => {
                let missed = n - *last - 1;
                *last = n;
                if missed == 0 {
                    Seen::InOrder
                } else {
                    Seen::Gap { missed }
                }
            }
        }
    }

    /// A snapshot of `bucket` from `node` covers its messages up to `n`.
    pub fn covered(&mut self, node: NodeIx, bucket: u32, n: u64) {
        let last = self.last.entry((node, bucket)).or_insert(n);
        *last = (*last).max(n);
    }

    /// Stops tracking a node (dead or restarted).
    pub fn forget_node(&mut self, node: NodeIx) {
        self.last.retain(|(n, _), _| *n != node);
    }

    /// Stops tracking a bucket (no longer followed): when it is followed again, its first
    /// message starts afresh.
    pub fn forget_bucket(&mut self, bucket: u32) {
        self.last.retain(|(_, b), _| *b != bucket);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn skipped_numbers_are_gaps_and_repeats_are_old() {
        let mut g = Gaps::new();
        assert_eq!(g.see(1, 7, 10), Seen::InOrder, "first seen: a baseline");
        assert_eq!(g.see(1, 7, 11), Seen::InOrder);
        assert_eq!(g.see(1, 7, 11), Seen::Old);
        assert_eq!(g.see(1, 7, 14), Seen::Gap { missed: 2 });
        assert_eq!(g.see(1, 8, 3), Seen::InOrder, "buckets are numbered apart");
        assert_eq!(g.see(2, 7, 1), Seen::InOrder, "and nodes");
        g.covered(1, 7, 20);
        assert_eq!(g.see(1, 7, 18), Seen::Old, "covered by the snapshot");
        assert_eq!(g.see(1, 7, 21), Seen::InOrder);
        g.covered(1, 7, 5);
        assert_eq!(
            g.see(1, 7, 22),
            Seen::InOrder,
            "an older snapshot moves nothing back"
        );
        g.forget_node(1);
        assert_eq!(g.see(1, 7, 99), Seen::InOrder);
        g.forget_bucket(7);
        assert_eq!(g.see(2, 7, 50), Seen::InOrder);
    }

    proptest! {
        /// Whatever subset of a numbered stream arrives, in order, a gap is reported exactly
        /// when something between two arrivals was lost, and the missed counts add up.
        #[test]
        fn gaps_report_exactly_the_losses(kept in proptest::collection::vec(any::<bool>(), 1..200)) {
            let mut g = Gaps::new();
            let arrived: Vec<u64> = (1..=kept.len() as u64).filter(|i| kept[(*i - 1) as usize]).collect();
            let mut missed_total = 0;
            for (i, n) in arrived.iter().enumerate() {
                match g.see(0, 0, *n) {
                    Seen::InOrder => prop_assert!(i == 0 || arrived[i - 1] + 1 == *n),
                    Seen::Gap { missed } => {
                        prop_assert_eq!(missed, n - arrived[i - 1] - 1);
                        missed_total += missed;
                    }
                    Seen::Old => prop_assert!(false, "no repeats were sent"),
                }
            }
            if let (Some(first), Some(last)) = (arrived.first(), arrived.last()) {
                prop_assert_eq!(missed_total, last - first + 1 - arrived.len() as u64);
            }
        }
    }
}
