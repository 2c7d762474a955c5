//! Token buckets for handshake and op rate limits (pure: time is an argument).
//!
//! Integer arithmetic in milli-tokens, so refills are exact and nothing drifts.

use std::net::IpAddr;

use hashbrown::HashMap;

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
        self.milli_tokens = (self.milli_tokens + elapsed.saturating_mul(u64::from(rate))).min(cap);
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, rate: u32, burst: u32, now_ms: u64) -> bool {
        self.refill(rate, burst, now_ms);
        if self.milli_tokens >= 1000 {
            self.milli_tokens -= 1000;
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

/// Per-IP handshake buckets of one shard. Bounded: when `max_ips` are tracked, buckets that have
/// refilled completely (their IP has been quiet) are forgotten first; if none has, the new IP
/// is refused rather than growing the map (a flood from many addresses is still bounded).
#[derive(Debug)]
pub struct IpLimiter {
    buckets: HashMap<IpAddr, TokenBucket>,
    rate: u32,
    max_ips: usize,
}

impl IpLimiter {
    /// `rate` handshakes per second per IP, with a burst of the same size; 0 disables.
    pub fn new(rate: u32, max_ips: usize) -> IpLimiter {
        IpLimiter {
            buckets: HashMap::new(),
            rate,
            max_ips,
        }
    }

    /// Whether a handshake from `ip` may proceed now.
    pub fn allow(&mut self, ip: IpAddr, now_ms: u64) -> bool {
        if self.rate == 0 {
            return true;
        }
        let (rate, burst) = (self.rate, self.rate);
        if !self.buckets.contains_key(&ip) && self.buckets.len() >= self.max_ips {
            self.buckets.retain(|_, b| !b.is_full(rate, burst, now_ms));
            if self.buckets.len() >= self.max_ips {
                return false;
            }
        }
        self.buckets
            .entry(ip)
            .or_insert_with(|| TokenBucket::full(burst, now_ms))
            .try_take(rate, burst, now_ms)
    }

    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

/// What the op limiter says about one op.
#[derive(Debug, PartialEq, Eq)]
pub enum OpVerdict {
    Allow,
    /// Over the rate: answer `rate_limited`, drop the op.
    Limited,
    /// Refused ops keep coming faster than the rate itself: close with 4008.
    Abuse,
}

/// Per-connection op rate limit: `ops_per_second` with an equal burst. Refused ops draw on a
/// second bucket of the same size, so a client that keeps sending at more than twice the rate
/// for about a second is closed, while one that bursts briefly only gets `rate_limited`.
#[derive(Debug)]
pub struct OpLimiter {
    ops: TokenBucket,
    strikes: TokenBucket,
}

impl OpLimiter {
    pub fn new(ops_per_second: u32, now_ms: u64) -> OpLimiter {
        OpLimiter {
            ops: TokenBucket::full(ops_per_second, now_ms),
            strikes: TokenBucket::full(ops_per_second, now_ms),
        }
    }

    pub fn check(&mut self, ops_per_second: u32, now_ms: u64) -> OpVerdict {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn bucket_bursts_then_refills_at_the_rate() {
        let mut b = TokenBucket::full(3, 0);
        assert!((0..3).all(|_| b.try_take(3, 3, 0)));
        assert!(!b.try_take(3, 3, 0));
        assert!(!b.try_take(3, 3, 300), "0.9 tokens after 300 ms");
        assert!(b.try_take(3, 3, 334));
        assert!(b.is_full(3, 3, 10_000), "caps at the burst");
    }

    #[test]
    fn ip_limiter_is_per_ip_and_bounded() {
        let ip = |n| IpAddr::V4(Ipv4Addr::new(127, 0, 0, n));
        let mut l = IpLimiter::new(2, 2);
        assert!(l.allow(ip(1), 0) && l.allow(ip(1), 0));
        assert!(!l.allow(ip(1), 0), "third handshake in the same instant");
        assert!(l.allow(ip(2), 0), "another IP is unaffected");
        assert!(
            !l.allow(ip(3), 0),
            "table full of busy IPs: refuse, don't grow"
        );
        assert!(
            l.allow(ip(3), 5_000),
            "quiet IPs are forgotten to make room"
        );
        assert!(l.tracked() <= 2);
        assert!(IpLimiter::new(0, 1).allow(ip(9), 0), "0 disables");
    }

    #[test]
    fn op_limiter_escalates_only_under_sustained_abuse() {
        let mut l = OpLimiter::new(10, 0);
        let verdicts: Vec<OpVerdict> = (0..25).map(|_| l.check(10, 0)).collect();
        assert!(verdicts[..10].iter().all(|v| *v == OpVerdict::Allow));
        assert!(verdicts[10..20].iter().all(|v| *v == OpVerdict::Limited));
        assert!(verdicts[20..].iter().all(|v| *v == OpVerdict::Abuse));
        // A client that slows down recovers.
        let mut l = OpLimiter::new(10, 0);
        for i in 0..100u64 {
            assert_eq!(
                l.check(10, i * 100),
                OpVerdict::Allow,
                "at the rate, never limited"
            );
        }
    }
}
