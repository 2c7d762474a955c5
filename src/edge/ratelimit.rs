//! The per-IP handshake rate limit of one shard (pure: time is an argument).
//!
//! Keys: an IPv4 address, or an IPv6 address cut to `limits.ipv6_prefix_len` bits (default 64),
//! because one IPv6 client usually holds a whole /64 and would otherwise walk past a per-address
//! limit by changing its interface id.
//!
//! Bounded: at most `max_ips` keys. The table is kept in least-recently-used order, so when it is
//! full the front is the key whose last attempt is oldest: if its bucket has refilled, it is
//! forgotten to make room (amortised O(1)); if not, the new address is refused rather than
//! growing the table or scanning it (a flood from many addresses costs neither memory nor CPU
//! beyond the bound). An approximation: a key further back may have refilled too, but finding it
//! would take the scan this avoids.

use std::net::IpAddr;

use hashlink::LinkedHashMap;

use crate::net::limit_key;
use crate::shard::budget::TokenBucket;

#[derive(Debug)]
pub struct IpLimiter {
    buckets: LinkedHashMap<IpAddr, TokenBucket>,
    rate: u32,
    max_ips: usize,
    ipv6_prefix_len: u8,
    /// Buckets examined to make room (tests: eviction must not scan the table).
    #[cfg(test)]
    probes: u64,
}

impl IpLimiter {
    /// `rate` handshakes per second per key, with a burst of the same size; 0 disables.
    pub fn new(rate: u32, max_ips: usize, ipv6_prefix_len: u8) -> IpLimiter {
        IpLimiter {
            buckets: LinkedHashMap::new(),
            rate,
            max_ips,
            ipv6_prefix_len,
            #[cfg(test)]
            probes: 0,
        }
    }

    /// Whether a handshake from `ip` may proceed now.
    pub fn allow(&mut self, ip: IpAddr, now_ms: u64) -> bool {
        if self.rate == 0 {
            return true;
        }
        let key = limit_key(ip, self.ipv6_prefix_len);
        let (rate, burst) = (self.rate, self.rate);
        if let Some(bucket) = self.buckets.to_back(&key) {
            return bucket.try_take(rate, burst, now_ms);
        }
        if self.buckets.len() >= self.max_ips {
            #[cfg(test)]
            {
                self.probes += 1;
            }
            let quiet = self
                .buckets
                .front_entry()
                .is_some_and(|mut e| e.get_mut().is_full(rate, burst, now_ms));
            if !quiet {
                return false;
            }
            self.buckets.pop_front();
        }
        let mut bucket = TokenBucket::full(burst, now_ms);
        let ok = bucket.try_take(rate, burst, now_ms);
        self.buckets.insert(key, bucket);
        ok
    }

    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn v4(n: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))
    }

    #[test]
    fn ip_limiter_is_per_ip_and_bounded() {
        let mut l = IpLimiter::new(2, 2, 64);
        assert!(l.allow(v4(1), 0) && l.allow(v4(1), 0));
        assert!(!l.allow(v4(1), 0), "third handshake in the same instant");
        assert!(l.allow(v4(2), 0), "another IP is unaffected");
        assert!(
            !l.allow(v4(3), 0),
            "table full of busy IPs: refuse, don't grow"
        );
        assert!(
            l.allow(v4(3), 5_000),
            "quiet IPs are forgotten to make room"
        );
        assert!(l.tracked() <= 2);
        assert!(IpLimiter::new(0, 1, 64).allow(v4(9), 0), "0 disables");
    }

    #[test]
    fn ipv6_is_limited_per_prefix() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff:0:0:9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let mut l = IpLimiter::new(2, 100, 64);
        assert!(l.allow(a, 0) && l.allow(b, 0));
        assert!(
            !l.allow(b, 0),
            "same /64: one budget, however the interface id changes"
        );
        assert!(l.allow(other, 0), "another /64 has its own");
        let mut per_address = IpLimiter::new(2, 100, 128);
        assert!(per_address.allow(a, 0) && per_address.allow(a, 0));
        assert!(per_address.allow(b, 0), "prefix 128: per address");
        assert_eq!(limit_key(a, 48), "2001:db8:1::".parse::<IpAddr>().unwrap());
        assert_eq!(limit_key(v4(1), 64), v4(1));
        // IPv4 clients of a dual-stack listener arrive IPv4-mapped: each keeps its own bucket.
        let mapped = |n: u8| IpAddr::V6(Ipv4Addr::new(203, 0, 113, n).to_ipv6_mapped());
        assert_eq!(
            limit_key(mapped(7), 64),
            IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7))
        );
        let mut dual = IpLimiter::new(1, 100, 64);
        assert!(dual.allow(mapped(1), 0));
        assert!(
            dual.allow(mapped(2), 0),
            "another IPv4 client is not the same /64"
        );
    }

    #[test]
    fn eviction_looks_at_one_entry_not_the_whole_table() {
        // Full of busy keys: a new address is refused after looking at the least recently
        // used key only. The old design scanned (and refilled) every bucket for every new
        // address: a flood of new addresses cost O(table) each.
        let max = 10_000;
        let mut l = IpLimiter::new(1, max, 64);
        for i in 0..max as u32 {
            assert!(l.allow(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)), 0));
        }
        for i in 0..50_000u32 {
            assert!(!l.allow(IpAddr::V4(Ipv4Addr::from(0x0b00_0000 + i)), 10));
        }
        assert_eq!(l.probes, 50_000, "one bucket looked at per refused address");
        assert_eq!(l.tracked(), max);
        // The least recently used key is forgotten first once it is quiet.
        assert!(l.allow(IpAddr::V4(Ipv4Addr::from(0x0c00_0000)), 2_000));
        assert_eq!(l.tracked(), max);
    }
}
