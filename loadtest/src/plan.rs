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

/// Flapping users in the whole fleet of `total` (every worker's).
pub fn fleet_flappers(total: usize, fraction: f64) -> usize {
    (0..total).filter(|i| flaps(*i, fraction)).count()
}

/// Deals this worker's users to `threads` threads as `(user, n)`, `n` numbering the worker's
/// connections. Flappers and the rest are each dealt round-robin, so every thread holds an even
/// share of the flappers whatever the stride of the flappers and of the workers.
pub fn deal(mine: &[usize], threads: usize, fraction: f64) -> Vec<Vec<(usize, usize)>> {
    let threads = threads.max(1);
    let mut out = vec![Vec::new(); threads];
    let (mut f, mut o) = (0, 0);
    for (n, &user) in mine.iter().enumerate() {
        let k = if flaps(user, fraction) {
            &mut f
        } else {
            &mut o
        };
        out[*k % threads].push((user, n));
        *k += 1;
    }
    out
}

/// One thread's share of the fleet's flap rate: proportional to the flappers it holds, so the
/// fleet as a whole sends exactly `fleet_rate` whatever the threads and workers.
pub fn flap_share(fleet_rate: f64, held: usize, fleet_flappers: usize) -> f64 {
    if fleet_flappers == 0 {
        return 0.0;
    }
    fleet_rate * held as f64 / fleet_flappers as f64
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

    /// Every thread of every worker, with its share of the flap rate: they add up to the fleet
    /// rate exactly (issue 11 item 8: each thread used to send `rate / (threads × workers)`, and
    /// threads without flappers sent nothing, so 2 threads sent half the rate, 8 a quarter).
    #[test]
    fn flap_shares_add_up_to_the_fleet_rate() {
        for (total, workers, threads, fraction) in [
            (300, 1, 2, 0.1),
            (4000, 1, 2, 0.25),
            (19_000, 1, 8, 0.25),
            (45_000, 3, 4, 0.1),
            (1000, 2, 3, 0.5),
            (7, 3, 5, 1.0),
            (10, 1, 4, 0.1),
        ] {
            let fleet = fleet_flappers(total, fraction);
            let mut sum = 0.0;
            let mut held_total = 0;
            for w in 0..workers {
                let mine: Vec<usize> = my_users(total, w, workers).collect();
                let dealt = deal(&mine, threads, fraction);
                assert_eq!(dealt.iter().map(Vec::len).sum::<usize>(), mine.len());
                let held: Vec<usize> = dealt
                    .iter()
                    .map(|t| t.iter().filter(|(u, _)| flaps(*u, fraction)).count())
                    .collect();
                // Even: no thread holds more than one flapper above another.
                let (lo, hi) = (held.iter().min().unwrap(), held.iter().max().unwrap());
                assert!(hi - lo <= 1, "{total} {workers} {threads}: {held:?}");
                for h in held {
                    held_total += h;
                    sum += flap_share(1000.0, h, fleet);
                }
            }
            assert_eq!(held_total, fleet);
            assert!(
                (sum - 1000.0).abs() < 1e-6,
                "{total} users, {workers} workers, {threads} threads: {sum} flaps/s"
            );
        }
        assert_eq!(flap_share(500.0, 0, 0), 0.0);
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
