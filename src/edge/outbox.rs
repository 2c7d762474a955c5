//! A connection's outbound backlog: bounded, and coalescing by user (SPEC §4 "slow consumers").
//!
//! Two lanes. Replies (`welcome`, `ack`, `error`, `pong`, close) are few and must all arrive, in
//! order, so they queue as they are. Events (presence, activity, group snapshots) are keyed:
//! while an event for a key is still undelivered, a newer one for the same key replaces it in
//! place. So a client that stops reading holds at most one pending event per key, memory stays
//! bounded by its subscriptions, and when it reads again it sees the newest state of each user —
//! never an older state after a newer one.

use std::collections::VecDeque;

use bytes::Bytes;
use hashbrown::HashMap;

use crate::presence::{GroupId, UserId};

/// What an event is about; one pending event per key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Key {
    /// A user's presence, direct (`None`) or through a group feed.
    Presence(UserId, Option<GroupId>),
    Activity(UserId),
    GroupSnapshot(GroupId),
}

/// Result of queueing an event.
#[derive(Debug, PartialEq, Eq)]
pub enum Queued {
    New,
    /// Replaced an undelivered event for the same key (counted as coalesced).
    Coalesced,
    /// The backlog is at its bound of distinct keys; the event was dropped (counted).
    Dropped,
}

/// The replies lane is full: the client sends ops without reading the answers.
#[derive(Debug, PartialEq, Eq)]
pub struct RepliesFull;

#[derive(Debug)]
pub struct Outbox {
    replies: VecDeque<Bytes>,
    /// Event keys in first-queued order, each with the generation it was queued under. Entries
    /// whose generation no longer matches `pending` are stale (cancelled) and skipped.
    order: VecDeque<(Key, u64)>,
    /// The newest frame per key, with its generation.
    pending: HashMap<Key, (Bytes, u64)>,
    next_gen: u64,
    max_replies: usize,
    max_events: usize,
}

/// Stale queue slots tolerated before compaction (beyond twice the live ones).
const IDLE_KEEP: usize = 16;
/// Queue capacity kept after draining; more is given back at once (a burst such as the snapshots
/// of a subscribe, not the steady trickle of live updates, which then allocates nothing).
const BURST_KEEP: usize = 16;

impl Outbox {
    pub fn new(max_replies: usize, max_events: usize) -> Outbox {
        Outbox {
            replies: VecDeque::new(),
            order: VecDeque::new(),
            pending: HashMap::new(),
            next_gen: 0,
            max_replies,
            max_events,
        }
    }

    pub fn push_reply(&mut self, frame: Bytes) -> Result<(), RepliesFull> {
        if self.replies.len() >= self.max_replies {
            return Err(RepliesFull);
        }
        self.replies.push_back(frame);
        Ok(())
    }

    pub fn push_event(&mut self, key: Key, frame: Bytes) -> Queued {
        if let Some(slot) = self.pending.get_mut(&key) {
            slot.0 = frame;
            return Queued::Coalesced;
        }
        if self.pending.len() >= self.max_events {
            return Queued::Dropped;
        }
        let gen = self.next_gen;
        self.next_gen += 1;
        self.order.push_back((key.clone(), gen));
        self.pending.insert(key, (frame, gen));
        Queued::New
    }

    /// The next frame to write: replies first, then events in first-queued order. The flag
    /// says whether it is an event (counted as a delivery).
    pub fn pop(&mut self) -> Option<(Bytes, bool)> {
        let frame = match self.replies.pop_front() {
            Some(f) => Some((f, false)),
            None => loop {
                let Some((key, gen)) = self.order.pop_front() else {
                    break None;
                };
                if self.pending.get(&key).is_some_and(|(_, g)| *g == gen) {
                    let (frame, _) = self.pending.remove(&key).expect("checked just above");
                    break Some((frame, true));
                }
            },
        };
        if self.is_empty()
            && (self.order.capacity() > BURST_KEEP || self.pending.capacity() > BURST_KEEP)
        {
            self.release(); // a burst grew the queues far past normal use
        }
        frame
    }

    /// Forgets the undelivered event for `key` (after an unsubscribe). O(1): its place in the
    /// queue goes stale and is skipped. True if one was dropped.
    pub fn cancel(&mut self, key: &Key) -> bool {
        let dropped = self.pending.remove(key).is_some();
        self.compact_if_stale();
        dropped
    }

    /// Forgets every undelivered event whose key matches (a group unsubscribe drops all of
    /// that group's member events). Returns how many were dropped.
    pub fn cancel_where(&mut self, mut matches: impl FnMut(&Key) -> bool) -> usize {
        let before = self.pending.len();
        self.pending.retain(|k, _| !matches(k));
        self.compact_if_stale();
        before - self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.replies.is_empty() && self.pending.is_empty()
    }

    /// Frames waiting (replies plus events).
    pub fn len(&self) -> usize {
        self.replies.len() + self.pending.len()
    }

    /// Stale entries in `order` are bounded: past twice the live ones (plus slack), drop them.
    fn compact_if_stale(&mut self) {
        if self.order.len() > 2 * self.pending.len() + IDLE_KEEP {
            let pending = &self.pending;
            self.order
                .retain(|(k, g)| pending.get(k).is_some_and(|(_, pg)| pg == g));
        }
    }

    /// Gives all memory back if nothing is queued. Called for connections that have been idle
    /// a while (the heartbeat sweep), not on every drain: an active subscriber would otherwise
    /// allocate on every delivery.
    pub fn release_if_idle(&mut self) {
        if self.is_empty() {
            self.release();
        }
    }

    fn release(&mut self) {
        self.replies = VecDeque::new();
        self.order = VecDeque::new();
        self.pending = HashMap::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(u: &str) -> Key {
        Key::Presence(u.into(), None)
    }

    #[test]
    fn replies_first_then_events_and_newest_state_wins() {
        let mut o = Outbox::new(4, 8);
        assert_eq!(
            o.push_event(key("a"), Bytes::from_static(b"a1")),
            Queued::New
        );
        assert_eq!(
            o.push_event(key("b"), Bytes::from_static(b"b1")),
            Queued::New
        );
        assert_eq!(
            o.push_event(key("a"), Bytes::from_static(b"a2")),
            Queued::Coalesced
        );
        o.push_reply(Bytes::from_static(b"ack")).unwrap();
        let got: Vec<Bytes> = std::iter::from_fn(|| o.pop().map(|p| p.0)).collect();
        assert_eq!(got, vec!["ack", "a2", "b1"]);
        assert!(o.is_empty());
    }

    #[test]
    fn bounded_in_both_lanes() {
        let mut o = Outbox::new(1, 2);
        o.push_reply(Bytes::new()).unwrap();
        assert_eq!(o.push_reply(Bytes::new()), Err(RepliesFull));
        o.push_event(key("a"), Bytes::new());
        o.push_event(key("b"), Bytes::new());
        assert_eq!(o.push_event(key("c"), Bytes::new()), Queued::Dropped);
        assert_eq!(o.push_event(key("a"), Bytes::new()), Queued::Coalesced);
        o.cancel(&key("a"));
        assert_eq!(o.len(), 2);
    }

    #[test]
    fn a_cancelled_key_requeued_goes_to_the_back() {
        // Unsubscribe then resubscribe: a new event for the key must not take the stale place
        // ahead of the fresh snapshot.
        let mut o = Outbox::new(4, 8);
        let member = Key::Presence("m".into(), Some("g".into()));
        o.push_event(member.clone(), Bytes::from_static(b"m-old"));
        assert_eq!(
            o.cancel_where(|k| matches!(k, Key::Presence(_, Some(g)) if &**g == "g")),
            1
        );
        o.push_event(Key::GroupSnapshot("g".into()), Bytes::from_static(b"snap"));
        o.push_event(member, Bytes::from_static(b"m-new"));
        let got: Vec<Bytes> = std::iter::from_fn(|| o.pop().map(|p| p.0)).collect();
        assert_eq!(got, vec!["snap", "m-new"]);
    }

    #[test]
    fn stale_entries_stay_bounded() {
        let mut o = Outbox::new(4, 8);
        for _ in 0..10_000 {
            o.push_event(key("a"), Bytes::new());
            o.cancel(&key("a"));
        }
        assert!(o.order.len() <= IDLE_KEEP + 1, "{}", o.order.len());
        assert!(o.is_empty());
        o.release_if_idle();
        assert_eq!(
            (o.order.capacity(), o.replies.capacity()),
            (0, 0),
            "idle: no memory"
        );
    }

    proptest! {
        /// Model: for each key, what the client receives is a subsequence of what was pushed,
        /// ending with the last value pushed, and a key's values arrive in push order; the
        /// backlog never exceeds one frame per key.
        #[test]
        fn coalescing_keeps_order_and_converges(pushes in proptest::collection::vec((0..5u8, proptest::bool::ANY), 1..200)) {
            let mut o = Outbox::new(1000, 1000);
            let mut received: Vec<(u8, usize)> = Vec::new();
            let mut last: [Option<usize>; 5] = [None; 5];
            for (i, (user, read)) in pushes.iter().enumerate() {
                let frame = Bytes::from(format!("{user}:{i}"));
                o.push_event(key(&user.to_string()), frame);
                last[*user as usize] = Some(i);
                prop_assert!(o.len() <= 5);
                if *read {
                    if let Some((f, _)) = o.pop() {
                        let s = std::str::from_utf8(&f).unwrap();
                        let (u, n) = s.split_once(':').unwrap();
                        received.push((u.parse().unwrap(), n.parse().unwrap()));
                    }
                }
            }
            while let Some((f, _)) = o.pop() {
                let s = std::str::from_utf8(&f).unwrap();
                let (u, n) = s.split_once(':').unwrap();
                received.push((u.parse().unwrap(), n.parse().unwrap()));
            }
            for user in 0..5u8 {
                let seen: Vec<usize> = received.iter().filter(|r| r.0 == user).map(|r| r.1).collect();
                prop_assert!(seen.windows(2).all(|w| w[0] < w[1]), "in order");
                prop_assert_eq!(seen.last().copied(), last[user as usize], "converges");
            }
        }
    }
}
