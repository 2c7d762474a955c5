//! The time series the dashboard charts: one sample a second for the last 15 minutes.
//!
//! Shard 0 samples (one timer, one read of every shard's counters, one latency map-reduce a
//! second); everyone else asks it over the mesh. The rates are differences of cumulative
//! counters over the real time between two samples, so a late tick does not inflate them.

use std::collections::VecDeque;

use serde::Serialize;

use crate::metrics::MetricsSnapshot;

/// Samples kept: 15 minutes at one a second.
pub const SERIES_LEN: usize = 900;

/// One point of the series.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Sample {
    /// Milliseconds since the epoch.
    pub t: u64,
    pub online: u64,
    pub connections: u64,
    pub handshakes_per_s: f64,
    pub deliveries_per_s: f64,
    pub ops_per_s: f64,
    /// Fan-out latency over the recent window (µs).
    pub p50_us: u64,
    pub p99_us: u64,
}

/// The sampler's state: the ring and the counters of the previous sample.
#[derive(Debug, Default)]
pub struct Series {
    ring: VecDeque<Sample>,
    prev: Option<(u64, Vec<MetricsSnapshot>)>,
    /// Deliveries per second of each shard at the last sample.
    shard_rates: Vec<f64>,
}

fn rate(now: u64, then: u64, dt_ms: u64) -> f64 {
    if dt_ms == 0 {
        return 0.0;
    }
    now.saturating_sub(then) as f64 * 1000.0 / dt_ms as f64
}

impl Series {
    /// Adds a sample taken at `t` from every shard's counters; `p50`/`p99` from the merged
    /// recent latency window.
    pub fn sample(&mut self, t: u64, shards: Vec<MetricsSnapshot>, p50_us: u64, p99_us: u64) {
        let total = MetricsSnapshot::sum(&shards);
        let mut s = Sample {
            t,
            online: total.online_users,
            connections: total.connections,
            p50_us,
            p99_us,
            ..Sample::default()
        };
        if let Some((t0, prev)) = &self.prev {
            let dt = t.saturating_sub(*t0);
            let before = MetricsSnapshot::sum(prev);
            s.handshakes_per_s = rate(total.handshakes_ok, before.handshakes_ok, dt);
            s.deliveries_per_s = rate(total.deliveries, before.deliveries, dt);
            s.ops_per_s = rate(total.ops, before.ops, dt);
            self.shard_rates = shards
                .iter()
                .zip(prev)
                .map(|(now, then)| rate(now.deliveries, then.deliveries, dt))
                .collect();
        }
        if self.ring.len() == SERIES_LEN {
            self.ring.pop_front();
        }
        self.ring.push_back(s);
        self.prev = Some((t, shards));
    }

    pub fn latest(&self) -> Option<Sample> {
        self.ring.back().copied()
    }

    pub fn all(&self) -> Vec<Sample> {
        self.ring.iter().copied().collect()
    }

    pub fn shard_rates(&self) -> Vec<f64> {
        self.shard_rates.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(online: u64, deliveries: u64) -> MetricsSnapshot {
        MetricsSnapshot {
            online_users: online,
            deliveries,
            ..MetricsSnapshot::default()
        }
    }

    #[test]
    fn rates_use_the_real_interval_and_the_ring_is_bounded() {
        let mut s = Series::default();
        s.sample(1_000, vec![snap(1, 0), snap(2, 10)], 5, 9);
        let first = s.latest().unwrap();
        assert_eq!((first.online, first.deliveries_per_s), (3, 0.0));
        // 2 s later, 40 more deliveries: 20/s, split 5/s and 15/s.
        s.sample(3_000, vec![snap(1, 10), snap(2, 40)], 5, 9);
        assert_eq!(s.latest().unwrap().deliveries_per_s, 20.0);
        assert_eq!(s.shard_rates(), vec![5.0, 15.0]);
        for i in 0..(SERIES_LEN as u64 + 10) {
            s.sample(4_000 + i * 1000, vec![snap(0, 0)], 0, 0);
        }
        assert_eq!(s.all().len(), SERIES_LEN);
        assert_eq!(s.all()[0].t, 4_000 + 10 * 1000);
        // A counter that went backwards (cannot happen, but a gauge could) gives 0, not garbage.
        assert_eq!(rate(1, 5, 1000), 0.0);
    }
}
