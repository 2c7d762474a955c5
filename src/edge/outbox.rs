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
    order: VecDeque<Key>,
    pending: HashMap<Key, Bytes>,
    max_replies: usize,
    max_events: usize,
}

/// Queues that grew under a burst give their memory back once drained, past this capacity.
const IDLE_KEEP: usize = 16;

impl Outbox {
    pub fn new(max_replies: usize, max_events: usize) -> Outbox {
        Outbox {
            replies: VecDeque::new(),
            order: VecDeque::new(),
            pending: HashMap::new(),
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
            *slot = frame;
            return Queued::Coalesced;
        }
        if self.pending.len() >= self.max_events {
            return Queued::Dropped;
        }
        self.order.push_back(key.clone());
        self.pending.insert(key, frame);
        Queued::New
    }

    /// The next frame to write: replies first, then events in first-queued order. The flag
    /// says whether it is an event (counted as a delivery).
    pub fn pop(&mut self) -> Option<(Bytes, bool)> {
        let frame = match self.replies.pop_front() {
            Some(f) => Some((f, false)),
            None => self.order.pop_front().map(|key| {
                let frame = self
                    .pending
                    .remove(&key)
                    .expect("every key in `order` has a pending frame");
                (frame, true)
            }),
        };
        if frame.is_some() && self.is_empty() {
            self.shrink();
        }
        frame
    }

    /// Forgets undelivered events for `key` (after an unsubscribe). True if one was dropped.
    pub fn cancel(&mut self, key: &Key) -> bool {
        if self.pending.remove(key).is_some() {
            self.order.retain(|k| k != key);
            return true;
        }
        false
    }

    pub fn is_empty(&self) -> bool {
        self.replies.is_empty() && self.order.is_empty()
    }

    /// Frames waiting (replies plus events).
    pub fn len(&self) -> usize {
        self.replies.len() + self.order.len()
    }

    fn shrink(&mut self) {
        if self.replies.capacity() > IDLE_KEEP {
            self.replies = VecDeque::new();
        }
        if self.order.capacity() > IDLE_KEEP {
            self.order = VecDeque::new();
            self.pending = HashMap::new();
        }
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
