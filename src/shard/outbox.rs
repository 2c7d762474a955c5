//! A session's outbound backlog: bounded, and coalescing by user for slow consumers (SPEC §4).
//!
//! Two lanes. Replies (`welcome`, `ack`, `error`, `pong`) are few and must all arrive, in order,
//! so they queue as they are. Events (presence, activity, group snapshots) are keyed by what
//! they are about, and queue in order too — a client that keeps up gets every event, with no
//! `seq` gap. Only when the client is *behind* (its socket would not take more, or more than
//! `coalesce_bytes` of events wait, or `max_events` are queued) does a new event replace the
//! newest undelivered event with the same key, in place. So a client that stops reading holds
//! at most one pending event per key past that point, memory stays bounded, and when it reads
//! again it sees the newest state of each user — never an older state after a newer one.

use std::collections::VecDeque;

use bytes::Bytes;
use hashbrown::HashMap;

use crate::presence::{GroupId, UserId};

/// What an event is about.
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
    /// Replaced the newest undelivered event for the same key (the client is behind).
    Coalesced,
    /// `max_events` are queued and none has this key: dropped (counted).
    Dropped,
}

/// The replies lane is full: the client sends ops without reading the answers.
#[derive(Debug, PartialEq, Eq)]
pub struct RepliesFull;

#[derive(Debug)]
struct Slot {
    key: Key,
    /// `None`: cancelled (unsubscribed) before it was written; skipped.
    frame: Option<Bytes>,
}

#[derive(Debug)]
pub struct Outbox {
    replies: VecDeque<Bytes>,
    events: VecDeque<Slot>,
    /// Absolute position of `events[0]` (positions only grow, so they stay valid across pops).
    head: u64,
    /// Per key with queued events: the position of its newest one and how many are queued.
    queued: HashMap<Key, (u64, u32)>,
    /// Events queued (not cancelled), and their bytes.
    live: usize,
    bytes: usize,
    /// Set by the connection: the socket would not take everything we wrote.
    behind: bool,
    max_replies: usize,
    max_events: usize,
    coalesce_bytes: usize,
}

/// Cancelled slots tolerated before compaction (beyond twice the live ones).
const STALE_KEEP: usize = 16;
/// Queue capacity kept after draining; more is given back at once (a burst such as the snapshots
/// of a subscribe, not the steady trickle of live updates, which then allocates nothing).
const BURST_KEEP: usize = 16;

impl Outbox {
    pub fn new(max_replies: usize, max_events: usize, coalesce_bytes: usize) -> Outbox {
        Outbox {
            replies: VecDeque::new(),
            events: VecDeque::new(),
            head: 0,
            queued: HashMap::new(),
            live: 0,
            bytes: 0,
            behind: false,
            max_replies,
            max_events,
            coalesce_bytes,
        }
    }

    pub fn push_reply(&mut self, frame: Bytes) -> Result<(), RepliesFull> {
        if self.replies.len() >= self.max_replies {
            return Err(RepliesFull);
        }
        self.replies.push_back(frame);
        Ok(())
    }

    /// Whether new events merge into queued ones (the client is not keeping up).
    fn coalescing(&self) -> bool {
        self.behind || self.bytes >= self.coalesce_bytes || self.live >= self.max_events
    }

    pub fn push_event(&mut self, key: &Key, frame: Bytes) -> Queued {
        self.push(key, frame, true)
    }

    /// A subscription's snapshot: queued like an event, but never dropped — it is what makes
    /// the subscribed state known, and a subscription left without one would stay unknown
    /// until the user's next change (or for good, for a user who never changes). Still bounded:
    /// one per subscription (`limits.max_subscriptions`) beyond `max_events`.
    pub fn push_snapshot(&mut self, key: &Key, frame: Bytes) -> Queued {
        self.push(key, frame, false)
    }

    /// The key is cloned only when a new slot is made (and once more for a key not queued yet).
    fn push(&mut self, key: &Key, frame: Bytes, droppable: bool) -> Queued {
        if self.coalescing() {
            if let Some(&(pos, _)) = self.queued.get(key) {
                let slot = &mut self.events[(pos - self.head) as usize];
                let new = frame.len();
                let old = slot.frame.replace(frame).map_or(0, |f| f.len());
                self.bytes = self.bytes - old + new;
                return Queued::Coalesced;
            }
            if droppable && self.live >= self.max_events {
                return Queued::Dropped;
            }
        }
        let pos = self.head + self.events.len() as u64;
        self.bytes += frame.len();
        self.live += 1;
        self.events.push_back(Slot {
            key: key.clone(),
            frame: Some(frame),
        });
        match self.queued.get_mut(key) {
            Some(entry) => *entry = (pos, entry.1 + 1),
            None => {
                self.queued.insert(key.clone(), (pos, 1));
            }
        }
        Queued::New
    }

    /// The next frame to write: replies first, then events in queued order. The flag says
    /// whether it is an event (counted as a delivery).
    pub fn pop(&mut self) -> Option<(Bytes, bool)> {
        let frame = match self.replies.pop_front() {
            Some(f) => Some((f, false)),
            None => loop {
                let Some(slot) = self.events.pop_front() else {
                    break None;
                };
                let pos = self.head;
                self.head += 1;
                let Some(frame) = slot.frame else { continue };
                self.forget_one(&slot.key, pos);
                self.live -= 1;
                self.bytes -= frame.len();
                break Some((frame, true));
            },
        };
        if self.is_empty()
            && (self.events.capacity() > BURST_KEEP || self.queued.capacity() > BURST_KEEP)
        {
            self.release(); // a burst grew the queues far past normal use
        }
        frame
    }

    /// One queued event of `key` (at `pos`) left the queue.
    fn forget_one(&mut self, key: &Key, pos: u64) {
        if let Some(entry) = self.queued.get_mut(key) {
            entry.1 -= 1;
            if entry.1 == 0 {
                debug_assert_eq!(entry.0, pos, "the last one out is the newest");
                self.queued.remove(key);
            }
        }
    }

    /// Forgets the undelivered events for `key` (after an unsubscribe); returns how many were
    /// dropped. O(1) when one is queued (the common case), O(queue) otherwise.
    pub fn cancel(&mut self, key: &Key) -> usize {
        let Some((pos, count)) = self.queued.remove(key) else {
            return 0;
        };
        if count == 1 {
            let frame = self.events[(pos - self.head) as usize].frame.take();
            self.drop_slot_frame(frame);
        } else {
            let mut dropped = Vec::new();
            for slot in self.events.iter_mut().filter(|s| s.key == *key) {
                dropped.extend(slot.frame.take());
            }
            for f in dropped {
                self.drop_slot_frame(Some(f));
            }
        }
        self.compact_if_stale();
        count as usize
    }

    /// Forgets every undelivered event whose key matches (a group unsubscribe drops all of
    /// that group's member events). Returns how many were dropped.
    pub fn cancel_where(&mut self, mut matches: impl FnMut(&Key) -> bool) -> usize {
        let keys: Vec<Key> = self.queued.keys().filter(|k| matches(k)).cloned().collect();
        let n = keys.iter().map(|k| self.cancel(k)).sum();
        self.compact_if_stale();
        n
    }

    fn drop_slot_frame(&mut self, frame: Option<Bytes>) {
        if let Some(f) = frame {
            self.live -= 1;
            self.bytes -= f.len();
        }
    }

    /// The connection says whether its socket is keeping up.
    pub fn set_behind(&mut self, behind: bool) {
        self.behind = behind;
    }

    pub fn is_empty(&self) -> bool {
        self.replies.is_empty() && self.live == 0
    }

    /// Frames waiting (replies plus events).
    pub fn len(&self) -> usize {
        self.replies.len() + self.live
    }

    /// Cancelled slots are bounded: past twice the live ones (plus slack), drop them and
    /// renumber.
    fn compact_if_stale(&mut self) {
        if self.events.len() > 2 * self.live + STALE_KEEP {
            self.events.retain(|s| s.frame.is_some());
            self.head = 0;
            for (i, slot) in self.events.iter().enumerate() {
                if let Some(entry) = self.queued.get_mut(&slot.key) {
                    entry.0 = i as u64; // ascending: the last one seen is the newest
                }
            }
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
        self.events = VecDeque::new();
        self.queued = HashMap::new();
        self.head = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(u: &str) -> Key {
        Key::Presence(u.into(), None)
    }

    fn drain(o: &mut Outbox) -> Vec<Bytes> {
        std::iter::from_fn(|| o.pop().map(|p| p.0)).collect()
    }

    fn push(o: &mut Outbox, user: &str, frame: &'static str) -> Queued {
        o.push_event(&key(user), Bytes::from_static(frame.as_bytes()))
    }

    #[test]
    fn a_client_that_keeps_up_gets_every_event() {
        // Two changes of one user land before the connection writes: both go out (the old
        // design merged them and the client saw a seq gap).
        let mut o = Outbox::new(4, 8, 1 << 20);
        assert_eq!(push(&mut o, "a", "a1"), Queued::New);
        assert_eq!(push(&mut o, "a", "a2"), Queued::New);
        o.push_reply(Bytes::from_static(b"ack")).unwrap();
        assert_eq!(drain(&mut o), vec!["ack", "a1", "a2"]);
        assert!(o.is_empty());
    }

    #[test]
    fn a_client_behind_gets_the_newest_state_in_place() {
        let mut o = Outbox::new(4, 8, 1 << 20);
        push(&mut o, "a", "a1");
        push(&mut o, "b", "b1");
        o.set_behind(true);
        assert_eq!(push(&mut o, "a", "a2"), Queued::Coalesced);
        assert_eq!(push(&mut o, "c", "c1"), Queued::New);
        assert_eq!(drain(&mut o), vec!["a2", "b1", "c1"]);
    }

    #[test]
    fn bytes_and_count_bounds_turn_coalescing_on() {
        let mut o = Outbox::new(4, 100, 4);
        o.push_event(&key("a"), Bytes::from_static(b"a1a1"));
        assert_eq!(
            o.push_event(&key("a"), Bytes::from_static(b"a2")),
            Queued::Coalesced
        );
        let mut o = Outbox::new(1, 2, 1 << 20);
        o.push_reply(Bytes::new()).unwrap();
        assert_eq!(o.push_reply(Bytes::new()), Err(RepliesFull));
        o.push_event(&key("a"), Bytes::new());
        o.push_event(&key("b"), Bytes::new());
        assert_eq!(o.push_event(&key("c"), Bytes::new()), Queued::Dropped);
        assert_eq!(o.push_event(&key("a"), Bytes::new()), Queued::Coalesced);
        assert_eq!(o.cancel(&key("a")), 1);
        assert_eq!(o.len(), 2);
    }

    #[test]
    fn a_cancelled_key_requeued_goes_to_the_back() {
        // Unsubscribe then resubscribe: a new event for the key must not take the stale place
        // ahead of the fresh snapshot.
        let mut o = Outbox::new(4, 8, 1 << 20);
        let member = Key::Presence("m".into(), Some("g".into()));
        o.push_event(&member, Bytes::from_static(b"m-old"));
        o.push_event(&member, Bytes::from_static(b"m-old2"));
        assert_eq!(
            o.cancel_where(|k| matches!(k, Key::Presence(_, Some(g)) if &**g == "g")),
            2
        );
        o.push_event(&Key::GroupSnapshot("g".into()), Bytes::from_static(b"snap"));
        o.push_event(&member, Bytes::from_static(b"m-new"));
        assert_eq!(drain(&mut o), vec!["snap", "m-new"]);
    }

    #[test]
    fn stale_entries_stay_bounded() {
        let mut o = Outbox::new(4, 8, 1 << 20);
        for _ in 0..10_000 {
            o.push_event(&key("a"), Bytes::new());
            o.cancel(&key("a"));
        }
        assert!(o.events.len() <= STALE_KEEP + 1, "{}", o.events.len());
        assert!(o.is_empty());
        o.release_if_idle();
        assert_eq!(
            (o.events.capacity(), o.replies.capacity()),
            (0, 0),
            "idle: no memory"
        );
    }

    proptest! {
        /// Model: for each key, what the client receives is a subsequence of what was pushed,
        /// in push order, ending with the last value pushed (nothing cancelled here); while the
        /// client is not behind and under the bounds, nothing is skipped at all; the backlog
        /// never exceeds `max_events`.
        #[test]
        fn coalescing_keeps_order_and_converges(
            pushes in proptest::collection::vec((0..5u8, 0..3u8, proptest::bool::ANY), 1..300),
        ) {
            let max_events = 8;
            let mut o = Outbox::new(1000, max_events, 1 << 20);
            let mut received: Vec<(u8, usize)> = Vec::new();
            let mut last: [Option<usize>; 5] = [None; 5];
            let mut skipped_while_keeping_up = false;
            for (i, (user, read, behind)) in pushes.iter().enumerate() {
                o.set_behind(*behind);
                let was_full = o.len() >= max_events;
                let frame = Bytes::from(format!("{user}:{i}"));
                let q = o.push_event(&key(&user.to_string()), frame);
                if q != Queued::New && !*behind && !was_full {
                    skipped_while_keeping_up = true;
                }
                if q != Queued::Dropped {
                    last[*user as usize] = Some(i);
                }
                prop_assert!(o.len() <= max_events);
                for _ in 0..*read {
                    if let Some((f, _)) = o.pop() {
                        let s = std::str::from_utf8(&f).unwrap();
                        let (u, n) = s.split_once(':').unwrap();
                        received.push((u.parse().unwrap(), n.parse().unwrap()));
                    }
                }
            }
            prop_assert!(!skipped_while_keeping_up);
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
            prop_assert!(o.is_empty() && o.bytes == 0);
        }
    }
}
