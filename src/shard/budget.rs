//! Token buckets for the budgets of sessions and users (pure: time is an argument).
//!
//! Integer arithmetic in milli-tokens, so refills are exact and nothing drifts. Two budgets:
//! - ops, per session: `limits.ops_per_second` frames with an equal burst (what the client
//!   sends);
//! - subscription ids, per *user* (all of a user's sessions live on its owner shard, so the
//!   shard holds one bucket per user): `limits.subscriptions_per_second` with a burst of
//!   `limits.max_subscriptions` (what a subscribe costs the server: one cross-shard `Watch`,
//!   and a `Snapshot` back, per id). A client may fill its whole allowance at once, but it
//!   cannot churn through ids faster than the rate however few frames it sends — and not by
//!   reconnecting either, or by opening more sessions.

use crate::presence::UserId;

/// A bucket of `burst` tokens refilled at `rate` tokens per second.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    milli_tokens: u64,
    last_ms: u64,
}

impl TokenBucket {
    /// A full bucket.
    pub fn full(burst: u32, now_ms: u64) -> TokenBucket {
        TokenBucket {
            milli_tokens: u64::from(burst) * 1000,
            last_ms: now_ms,
        }
    }

    fn refill(&mut self, rate: u32, burst: u32, now_ms: u64) {
        let elapsed = now_ms.saturating_sub(self.last_ms);
        self.last_ms = self.last_ms.max(now_ms);
        let cap = u64::from(burst) * 1000;
        self.milli_tokens = self
            .milli_tokens
            .saturating_add(elapsed.saturating_mul(u64::from(rate)))
            .min(cap);
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, rate: u32, burst: u32, now_ms: u64) -> bool {
        self.try_take_n(rate, burst, 1, now_ms)
    }

    /// Takes `n` tokens if there are that many; takes nothing otherwise.
    pub fn try_take_n(&mut self, rate: u32, burst: u32, n: u32, now_ms: u64) -> bool {
        self.refill(rate, burst, now_ms);
        let want = u64::from(n) * 1000;
        if self.milli_tokens >= want {
            self.milli_tokens -= want;
            true
        } else {
            false
        }
    }

    /// Whether the bucket is full (an idle client's bucket can be forgotten).
    pub fn is_full(&mut self, rate: u32, burst: u32, now_ms: u64) -> bool {
        self.refill(rate, burst, now_ms);
        self.milli_tokens >= u64::from(burst) * 1000
    }
}

/// What the op limiter says about one op.
#[derive(Debug, PartialEq, Eq)]
pub enum OpVerdict {
    Allow,
    /// Over the rate: answer `rate_limited`, drop the op.
    Limited,
    /// Refused ops keep coming faster than the rate itself: close with 4008 (after the replies
    /// already queued are written).
    Abuse,
}

/// A session's op budget (see the module docs). `ops_per_second` 0 disables it.
#[derive(Debug)]
pub struct Budget {
    ops: TokenBucket,
    strikes: TokenBucket,
}

impl Budget {
    pub fn new(ops_per_second: u32, now_ms: u64) -> Budget {
        Budget {
            ops: TokenBucket::full(ops_per_second, now_ms),
            strikes: TokenBucket::full(ops_per_second, now_ms),
        }
    }

    /// One op. Refused ops draw on a second bucket of the same size, so a client that keeps
    /// sending at more than twice the rate for about a second is closed, while one that bursts
    /// briefly only gets `rate_limited`.
    pub fn op(&mut self, ops_per_second: u32, now_ms: u64) -> OpVerdict {
        let r = ops_per_second;
        if r == 0 || self.ops.try_take(r, r, now_ms) {
            OpVerdict::Allow
        } else if self.strikes.try_take(r, r, now_ms) {
            OpVerdict::Limited
        } else {
            OpVerdict::Abuse
        }
    }
}

/// The subscription-id buckets of one shard's users, in least-recently-used order and at most
/// `max` of them. A user's bucket outlives its sessions (a reconnect gets no fresh allowance);
/// it is forgotten once it has refilled and the user has no session, or, past `max`, the least
/// recently used one goes first.
#[derive(Debug)]
pub struct Subscriptions {
    buckets: hashlink::LinkedHashMap<UserId, TokenBucket>,
    max: usize,
    /// Ids per second per user (0 disables the budget), and how many may be taken at once.
    rate: u32,
    burst: u32,
}

impl Subscriptions {
    pub fn new(max: usize, rate: u32, burst: u32) -> Subscriptions {
        Subscriptions {
            buckets: hashlink::LinkedHashMap::new(),
            max,
            rate,
            burst,
        }
    }

    /// `n` new subscription ids for `user`: all of them or none.
    pub fn take(&mut self, user: &UserId, n: u32, now_ms: u64) -> bool {
        let (rate, burst) = (self.rate, self.burst);
        if rate == 0 || n == 0 {
            return true;
        }
        if let Some(bucket) = self.buckets.to_back(user) {
            return bucket.try_take_n(rate, burst, n, now_ms);
        }
        if self.buckets.len() >= self.max {
            self.buckets.pop_front();
        }
        let mut bucket = TokenBucket::full(burst, now_ms);
        let ok = bucket.try_take_n(rate, burst, n, now_ms);
        self.buckets.insert(user.clone(), bucket);
        ok
    }

    /// The user's last session closed: forget its bucket if it has refilled (nothing to
    /// remember); a churner's partly spent bucket stays.
    pub fn release(&mut self, user: &str, now_ms: u64) {
        let (rate, burst) = (self.rate, self.burst);
        if self
            .buckets
            .get_mut(user)
            .is_some_and(|b| b.is_full(rate, burst, now_ms))
        {
            self.buckets.remove(user);
        }
    }

    #[cfg(test)]
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_bursts_then_refills_at_the_rate() {
        let mut b = TokenBucket::full(3, 0);
        assert!((0..3).all(|_| b.try_take(3, 3, 0)));
        assert!(!b.try_take(3, 3, 0));
        assert!(!b.try_take(3, 3, 300), "0.9 tokens after 300 ms");
        assert!(b.try_take(3, 3, 334));
        assert!(b.is_full(3, 3, 10_000), "caps at the burst");
        assert!(
            !b.try_take_n(3, 3, 4, 20_000),
            "more than the burst never fits"
        );
        assert!(b.try_take_n(3, 3, 3, 20_000));
    }

    #[test]
    fn ops_escalate_only_under_sustained_abuse() {
        let mut l = Budget::new(10, 0);
        let verdicts: Vec<OpVerdict> = (0..25).map(|_| l.op(10, 0)).collect();
        assert!(verdicts[..10].iter().all(|v| *v == OpVerdict::Allow));
        assert!(verdicts[10..20].iter().all(|v| *v == OpVerdict::Limited));
        assert!(verdicts[20..].iter().all(|v| *v == OpVerdict::Abuse));
        // A client that slows down recovers.
        let mut l = Budget::new(10, 0);
        for i in 0..100u64 {
            assert_eq!(
                l.op(10, i * 100),
                OpVerdict::Allow,
                "at the rate, never limited"
            );
        }
    }

    #[test]
    fn subscriptions_are_budgeted_by_id_per_user() {
        let u = UserId::from("u");
        // A full allowance at once, then no faster than the rate.
        let mut s = Subscriptions::new(100, 500, 1000);
        assert!(s.take(&u, 1000, 0));
        assert!(!s.take(&u, 1, 0), "allowance spent");
        assert!(!s.take(&u, 1000, 1_000), "500 ids back after 1 s, not 1000");
        assert!(s.take(&u, 500, 1_000));
        // Cycling 1,000 ids at 45 frames/s (inside the op limit) runs out within a second.
        let mut s = Subscriptions::new(100, 500, 1000);
        let granted = (0..45u64).filter(|i| s.take(&u, 1000, i * 22)).count();
        assert_eq!(
            granted, 1,
            "one full subscribe, then refused until the budget refills"
        );
        // A reconnect (the last session closed, a new one opened) gets no fresh allowance.
        s.release("u", 990);
        assert!(
            !s.take(&u, 1000, 990),
            "a spent bucket outlives the session"
        );
        s.release("u", 10_000);
        assert_eq!(s.tracked(), 0, "a refilled one is forgotten");
        assert!(
            Subscriptions::new(1, 0, 1000).take(&u, 5000, 0),
            "0 disables"
        );
        // Bounded: the least recently used user goes first.
        let mut s = Subscriptions::new(2, 500, 1000);
        for name in ["a", "b", "c"] {
            s.take(&UserId::from(name), 1, 0);
        }
        assert_eq!(s.tracked(), 2);
    }
}
