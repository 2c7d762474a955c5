//! Which shards watch a key (a user or a group), and how many subscriptions each holds.
//!
//! The owner of a key knows shards, not connections (SPEC §2): on a change it sends one message
//! per watching shard, and that shard fans out locally.

/// Shard index. `u16` bounds the shard count at 65,535, far above any core count.
pub type ShardIx = u16;

/// Subscription counts per watching shard. Almost always empty or one or two entries long, so a
/// small vector beats a map (and costs nothing while empty).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Watchers(Vec<(ShardIx, u32)>);

impl Watchers {
    /// One more subscription from `shard`.
    pub fn add(&mut self, shard: ShardIx) {
        match self.0.iter_mut().find(|(s, _)| *s == shard) {
            Some((_, count)) => *count += 1,
            None => self.0.push((shard, 1)),
        }
    }

    /// One subscription fewer from `shard`. Returns false when `shard` held none (a duplicate
    /// unwatch), which the caller counts rather than trusts.
    pub fn remove(&mut self, shard: ShardIx) -> bool {
        let Some(pos) = self.0.iter().position(|(s, _)| *s == shard) else {
            return false;
        };
        let count = &mut self.0[pos].1;
        assert!(
            *count > 0,
            "a watcher entry is removed when its count reaches zero"
        );
        *count -= 1;
        if *count == 0 {
            self.0.swap_remove(pos);
        }
        true
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The shards with at least one subscription.
    pub fn shards(&self) -> impl Iterator<Item = ShardIx> + '_ {
        self.0.iter().map(|(s, _)| *s)
    }

    /// Subscriptions held by all shards.
    pub fn total(&self) -> u64 {
        self.0.iter().map(|(_, c)| u64::from(*c)).sum()
    }

    /// Subscriptions held by `shard`.
    pub fn count(&self, shard: ShardIx) -> u32 {
        self.0
            .iter()
            .find(|(s, _)| *s == shard)
            .map_or(0, |(_, c)| *c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_shard_and_forgets_at_zero() {
        let mut w = Watchers::default();
        w.add(1);
        w.add(1);
        w.add(3);
        assert_eq!(w.count(1), 2);
        assert!(w.remove(1));
        assert_eq!(w.shards().collect::<Vec<_>>(), vec![1, 3]);
        assert!(w.remove(1));
        assert_eq!(w.shards().collect::<Vec<_>>(), vec![3]);
        assert!(!w.remove(1), "duplicate unwatch is reported");
        assert!(w.remove(3));
        assert!(w.is_empty());
    }
}
