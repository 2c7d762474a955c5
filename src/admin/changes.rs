//! Each shard's log of recent presence changes, read by the dashboards' live feed.
//!
//! A ring of the last `cap` changes, numbered. A reader keeps the last number it saw per shard
//! and asks for what came after; what fell out of the ring before it asked is reported as
//! `missed`, so the reader knows to re-query instead of trusting a partial picture. Recording is
//! one `Arc` clone and a ring push per change; nothing grows with the number of readers.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::presence::PresenceState;

#[derive(Debug)]
pub struct ChangeLog {
    ring: VecDeque<Arc<PresenceState>>,
    /// Number of the newest entry (0: none yet). Entry `i` of the ring is `last - len + 1 + i`.
    last: u64,
    cap: usize,
}

/// What a reader gets: changes after its mark, how many it missed, and its new mark.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangeBatch {
    pub changes: Vec<Arc<PresenceState>>,
    pub missed: u64,
    pub last: u64,
}

impl ChangeLog {
    pub fn new(cap: usize) -> ChangeLog {
        assert!(cap > 0, "validate() requires admin.change_log >= 1");
        ChangeLog {
            ring: VecDeque::new(),
            last: 0,
            cap,
        }
    }

    pub fn record(&mut self, state: Arc<PresenceState>) {
        if self.ring.len() == self.cap {
            self.ring.pop_front();
        }
        self.ring.push_back(state);
        self.last += 1;
    }

    /// The newest number, for a reader that starts now.
    pub fn mark(&self) -> u64 {
        self.last
    }

    /// Changes numbered after `since`. A `since` ahead of the log (a reader from before a
    /// restart) starts over from now.
    pub fn since(&self, since: u64) -> ChangeBatch {
        if since >= self.last {
            return ChangeBatch {
                changes: Vec::new(),
                missed: 0,
                last: self.last,
            };
        }
        let first = self.last - self.ring.len() as u64 + 1; // number of ring[0]
        let from = since + 1;
        let missed = first.saturating_sub(from);
        let skip = from.saturating_sub(first) as usize;
        ChangeBatch {
            changes: self.ring.iter().skip(skip).cloned().collect(),
            missed,
            last: self.last,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presence::Aggregate;

    fn st(user: &str, seq: u64) -> Arc<PresenceState> {
        Arc::new(PresenceState {
            user: user.into(),
            status: Aggregate::Online,
            text: None,
            devices: 1,
            last_seen: None,
            ts: 0,
            seq,
        })
    }

    #[test]
    fn readers_see_each_change_once_and_count_what_they_missed() {
        let mut log = ChangeLog::new(3);
        assert_eq!(log.since(0), ChangeBatch::default());
        let mark = log.mark();
        log.record(st("a", 1));
        log.record(st("b", 1));
        let b = log.since(mark);
        assert_eq!(b.changes.len(), 2);
        assert_eq!((b.missed, b.last), (0, 2));
        assert!(log.since(b.last).changes.is_empty());
        for i in 0..4 {
            log.record(st("c", i));
        }
        // 6 recorded, ring holds 4..=6; a reader at 2 missed 3.
        let b2 = log.since(2);
        assert_eq!((b2.changes.len(), b2.missed, b2.last), (3, 1, 6));
        assert_eq!(b2.changes[0].seq, 1);
        // A reader from the future starts over.
        assert_eq!(log.since(99).last, 6);
        assert!(log.since(99).changes.is_empty());
    }

    proptest::proptest! {
        #[test]
        fn matches_a_model(cap in 1usize..8, ops in proptest::collection::vec(0u8..3, 0..60)) {
            let mut log = ChangeLog::new(cap);
            let mut all: Vec<u64> = Vec::new(); // seq of every change recorded
            let mut mark = 0u64;
            for (i, op) in ops.into_iter().enumerate() {
                if op < 2 {
                    log.record(st("u", i as u64));
                    all.push(i as u64);
                } else {
                    let b = log.since(mark);
                    let expect: Vec<u64> = all[mark as usize..].to_vec();
                    let kept = expect.len().min(cap);
                    let got: Vec<u64> = b.changes.iter().map(|s| s.seq).collect();
                    proptest::prop_assert_eq!(&got[..], &expect[expect.len() - kept..]);
                    proptest::prop_assert_eq!(b.missed as usize, expect.len() - kept);
                    proptest::prop_assert_eq!(b.last as usize, all.len());
                    mark = b.last;
                }
            }
        }
    }
}
