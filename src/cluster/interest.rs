//! Interest routing (SPEC §12): which buckets this node follows on the bus. A bucket is
//! followed while some user in it is watched here; when the last watcher goes, it is kept for
//! `unsubscribe_after_ms` more (hysteresis: a user who flaps between watched and unwatched
//! does not churn subscriptions and snapshots). Pure.

use hashbrown::HashMap;

/// Watched users per bucket, and what to do about it.
#[derive(Debug)]
pub struct Interest {
    /// Watched users per bucket (summed over the shards).
    counts: HashMap<u32, i64>,
    /// Followed buckets; `Some(since)` once nobody here watches it any more.
    followed: HashMap<u32, Option<u64>>,
    linger_ms: u64,
}

/// What a change of interest asks of the bridge.
#[derive(Debug, PartialEq, Eq)]
pub enum Follow {
    /// Subscribe, and ask the other nodes for a snapshot of the bucket.
    Start(u32),
    Nothing,
}

impl Interest {
    pub fn new(linger_ms: u64) -> Interest {
        Interest {
            counts: HashMap::new(),
            followed: HashMap::new(),
            linger_ms,
        }
    }

    /// A shard's watched users in `bucket` changed by `delta` at `now`.
    pub fn add(&mut self, bucket: u32, delta: i32, now: u64) -> Follow {
        let count = self.counts.entry(bucket).or_default();
        *count += i64::from(delta);
        let watched = *count > 0;
        if *count == 0 {
            self.counts.remove(&bucket);
        }
        match (self.followed.get_mut(&bucket), watched) {
            (None, true) => {
                self.followed.insert(bucket, None);
                Follow::Start(bucket)
            }
            (Some(since), true) => {
                *since = None;
                Follow::Nothing
            }
            (Some(since @ None), false) => {
                *since = Some(now);
                Follow::Nothing
            }
            _ => Follow::Nothing,
        }
    }

    /// Buckets unwatched for `linger_ms` by `now`: no longer followed (unsubscribe, and drop
    /// the shares heard for their users).
    pub fn due(&mut self, now: u64) -> Vec<u32> {
        let linger = self.linger_ms;
        let due: Vec<u32> = self
            .followed
            .iter()
            .filter(|(_, since)| since.is_some_and(|s| now.saturating_sub(s) >= linger))
            .map(|(b, _)| *b)
            .collect();
        for b in &due {
            self.followed.remove(b);
        }
        due
    }

    /// Followed buckets, sorted.
    pub fn followed(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.followed.keys().copied().collect();
        v.sort_unstable();
        v
    }

    pub fn follows(&self, bucket: u32) -> bool {
        self.followed.contains_key(&bucket)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_is_followed_while_watched_and_dropped_after_the_linger() {
        let mut i = Interest::new(1_000);
        assert_eq!(i.add(5, 1, 0), Follow::Start(5));
        assert_eq!(i.add(5, 1, 0), Follow::Nothing, "a second watched user");
        assert_eq!(i.add(5, -1, 10), Follow::Nothing);
        assert_eq!(i.add(5, -1, 20), Follow::Nothing, "unwatched: lingers");
        assert!(i.follows(5));
        assert!(i.due(1_019).is_empty());
        assert_eq!(i.due(1_020), vec![5]);
        assert!(!i.follows(5));
        assert_eq!(
            i.add(5, 1, 2_000),
            Follow::Start(5),
            "watched again: followed afresh"
        );
    }

    #[test]
    fn watching_again_within_the_linger_keeps_the_subscription() {
        let mut i = Interest::new(1_000);
        i.add(1, 1, 0);
        i.add(1, -1, 100);
        assert_eq!(
            i.add(1, 1, 500),
            Follow::Nothing,
            "no new subscription, no snapshot"
        );
        assert!(i.due(5_000).is_empty(), "watched: never due");
        // Shards report independently: one may report its -1 before another's +1 lands.
        assert_eq!(i.add(2, -1, 0), Follow::Nothing);
        assert_eq!(
            i.add(2, 1, 0),
            Follow::Nothing,
            "nets to zero: nothing to follow"
        );
        assert_eq!(i.followed(), vec![1]);
    }
}
