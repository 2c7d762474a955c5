//! Who connects, whom each connection watches, and who flaps — pure and deterministic from the
//! seed, so every worker process of a fleet computes the same plan and opens only its share.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};
use serde::{Deserialize, Serialize};

/// How a connection picks the users it watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    /// Connection i watches users i+1 … i+K (everyone has exactly K watchers).
    Ring,
    /// K distinct users uniformly at random.
    Uniform,
    /// K distinct users by a Zipf(1.0) law: a few users have very many watchers (celebrities).
    Zipf,
}

/// User id of user `i`.
pub fn user(i: usize) -> String {
    format!("u{i}")
}

/// Users this worker opens: every `n`-th of the fleet, starting at `i`.
pub fn my_users(total: usize, worker: usize, workers: usize) -> impl Iterator<Item = usize> {
    (worker..total).step_by(workers.max(1))
}

/// The `k` users connection `i` of `total` watches (never itself).
pub fn watch_set(i: usize, total: usize, k: usize, pattern: Pattern, seed: u64) -> Vec<usize> {
    let k = k.min(total.saturating_sub(1));
    match pattern {
        Pattern::Ring => (1..=k).map(|d| (i + d) % total).collect(),
        Pattern::Uniform | Pattern::Zipf => {
            let mut rng =
                StdRng::seed_from_u64(seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let zipf = Zipf::new(total as f64, 1.0).expect("total >= 1 and exponent 1.0 are valid");
            let mut out = Vec::with_capacity(k);
            // Bounded: a skewed law repeats itself, so after enough tries fill in uniformly.
            let mut tries = 0;
            while out.len() < k {
                tries += 1;
                let u = if pattern == Pattern::Zipf && tries < 50 * k {
                    zipf.sample(&mut rng) as usize - 1
                } else {
                    rng.random_range(0..total)
                };
                if u != i && !out.contains(&u) {
                    out.push(u);
                }
            }
            out
        }
    }
}

/// Whether user `i` flaps, for a flapping fraction `fraction` (spread evenly over ids).
pub fn flaps(i: usize, fraction: f64) -> bool {
    if fraction <= 0.0 {
        return false;
    }
    let stride = (1.0 / fraction.min(1.0)).round().max(1.0) as usize;
    i.is_multiple_of(stride)
}

/// Source address for connection number `n` of this process: 127.0.0.1 … 127.0.0.`sources`,
/// so ephemeral ports (about 28k per source address) never run out.
pub fn source_ip(n: usize, sources: usize) -> std::net::Ipv4Addr {
    let last = 1 + (n % sources.clamp(1, 254)) as u8;
    std::net::Ipv4Addr::new(127, 0, 0, last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_partition_the_fleet() {
        let mut all: Vec<usize> = (0..3).flat_map(|w| my_users(10, w, 3)).collect();
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn watch_sets_are_distinct_deterministic_and_exclude_self() {
        for pattern in [Pattern::Ring, Pattern::Uniform, Pattern::Zipf] {
            for i in 0..50 {
                let w = watch_set(i, 50, 20, pattern, 7);
                assert_eq!(w.len(), 20);
                assert!(!w.contains(&i));
                let mut d = w.clone();
                d.sort();
                d.dedup();
                assert_eq!(d.len(), 20, "{pattern:?}");
                assert_eq!(w, watch_set(i, 50, 20, pattern, 7), "same seed, same plan");
            }
        }
        assert_eq!(watch_set(9, 10, 2, Pattern::Ring, 0), vec![0, 1]);
        assert_eq!(
            watch_set(0, 3, 20, Pattern::Ring, 0).len(),
            2,
            "capped at total-1"
        );
    }

    #[test]
    fn zipf_concentrates_watchers() {
        let mut watchers = vec![0usize; 1000];
        for i in 0..1000 {
            for u in watch_set(i, 1000, 10, Pattern::Zipf, 1) {
                watchers[u] += 1;
            }
        }
        assert!(watchers[0] > 100, "user 0 is a celebrity: {}", watchers[0]);
    }

    #[test]
    fn flapping_fraction() {
        assert_eq!((0..1000).filter(|i| flaps(*i, 0.1)).count(), 100);
        assert_eq!((0..10).filter(|i| flaps(*i, 0.0)).count(), 0);
        assert_eq!((0..10).filter(|i| flaps(*i, 1.0)).count(), 10);
        assert_eq!(source_ip(0, 4).octets()[3], 1);
        assert_eq!(source_ip(5, 4).octets()[3], 2);
    }
}
