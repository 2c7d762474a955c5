//! Per-shard counters. Each shard writes only its own (relaxed atomics, no contention); other
//! threads read them, and cluster-wide figures are a sum over shards, never a global counter.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

macro_rules! counters {
    (
        $($(#[$doc:meta])* $name:ident,)*
        ;
        $($(#[$hdoc:meta])* $hist:ident,)*
    ) => {
        /// Counters (and a few histograms) of one shard.
        #[derive(Debug, Default)]
        pub struct ShardMetrics {
            $($(#[$doc])* pub $name: AtomicU64,)*
            $($(#[$hdoc])* pub $hist: AtomicBuckets,)*
        }

        /// A plain copy of the counters, for reports and tests.
        #[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
        pub struct MetricsSnapshot {
            $(pub $name: u64,)*
            $(pub $hist: BucketCounts,)*
        }

        impl ShardMetrics {
            pub fn snapshot(&self) -> MetricsSnapshot {
                MetricsSnapshot {
                    $($name: self.$name.load(Relaxed),)*
                    $($hist: self.$hist.counts(),)*
                }
            }
        }

        impl MetricsSnapshot {
            /// Sum of per-shard snapshots.
            pub fn sum<'a>(all: impl IntoIterator<Item = &'a MetricsSnapshot>) -> MetricsSnapshot {
                let mut out = MetricsSnapshot::default();
                for s in all {
                    $(out.$name += s.$name;)*
                    $(out.$hist.add(&s.$hist);)*
                }
                out
            }
        }
    };
}

counters! {
    /// Open WebSocket connections served by this shard (gauge).
    connections,
    /// Users with a visible session owned by this shard (gauge, refreshed on changes).
    online_users,
    /// Upgrades completed.
    handshakes_ok,
    /// Upgrades refused for a bad or missing token (401).
    handshakes_unauthorized,
    /// Upgrades refused as malformed HTTP (400/404/405/431).
    handshakes_bad_request,
    /// Clients that did not finish the upgrade request in time.
    handshakes_timed_out,
    /// Upgrades refused by the per-IP handshake rate limit (429).
    handshakes_rate_limited,
    /// Upgrades refused for their Origin (403).
    handshakes_forbidden,
    /// Upgrades refused because the shard was full or stopping (503).
    handshakes_unavailable,
    /// Connections closed for a missing or malformed PROXY protocol header.
    handshakes_bad_proxy_header,
    /// Client addresses taken from a trusted proxy's PROXY protocol header.
    client_addr_proxy_protocol,
    /// Client addresses taken from a trusted proxy's `X-Forwarded-For`.
    client_addr_forwarded_for,
    /// PROXY headers and `X-Forwarded-For` from peers not trusted for them, ignored.
    proxy_headers_ignored,
    /// Sessions given a region by `geo.header` from a trusted proxy.
    geo_from_header,
    /// Sessions given a region by the `geo.database` lookup of their address.
    geo_found,
    /// Lookups of `geo.database` that found no region for the address.
    geo_not_found,
    /// Accepted sockets handed to their owner shard.
    handoffs_out,
    /// Sockets received from another shard.
    handoffs_in,
    /// Client ops handled (all kinds).
    ops,
    /// `subscribe` ops.
    ops_subscribe,
    /// `unsubscribe` ops.
    ops_unsubscribe,
    /// `subscribe_group` ops.
    ops_subscribe_group,
    /// `unsubscribe_group` ops.
    ops_unsubscribe_group,
    /// `set_status` ops.
    ops_set_status,
    /// `activity` ops.
    ops_activity,
    /// `refresh` ops.
    ops_refresh,
    /// `ping` ops.
    ops_ping,
    /// Messages that did not parse as an op.
    ops_invalid,
    /// Ops answered with an `error`.
    op_errors,
    /// Ops refused by the per-connection rate limit (`rate_limited`).
    ops_rate_limited,
    /// Connections closed for sustained op-rate abuse (4008).
    rate_abuse_closes,
    /// Frames waiting in connection outboxes right now (gauge).
    outbox_pending,
    /// Sessions refused (reject_new) or evicted (evict_oldest) by the per-user limit (4009).
    session_limit_closes,
    /// Connections closed because their token expired (4001).
    token_expiry_closes,
    /// Connections closed after two silent heartbeat intervals.
    heartbeat_timeouts,
    /// Liveness pings sent.
    pings_sent,
    /// Events written to client connections (presence, activity, snapshots).
    deliveries,
    /// Undelivered events replaced by a newer state of the same user (the client was behind).
    coalesced,
    /// Events dropped because a connection's backlog held `max_pending_events` keys.
    outbox_dropped,
    /// Connections closed for protocol violations (1002/1007/1009) or unread replies (4008).
    protocol_closes,
    /// Panics caught while serving one connection (that connection closed, shard unharmed).
    conn_panics,
    /// Sessions closed by an admin kick (4003).
    kicks,
    /// New sessions that re-attached to a held session of their user (reconnect grace or an
    /// upgrade's hand-over): their watchers saw no flap.
    reattached,
    /// Held sessions whose grace ran out (the user's devices or offline then published).
    grace_expired,
    /// Sessions closed with 1001 by an upgrade's drain (old process).
    upgrade_drained,
    /// Changed users' records the old process could not queue for the new one (full queue).
    upgrade_records_dropped,
    /// Read-only impersonation sessions opened (`/ws?as=`).
    impersonations,
    /// Admin HTTP requests and `/ws/admin` queries answered by this shard.
    admin_requests,
    /// Admin connections open on this shard (gauge).
    admin_connections,
    /// Idle admin connections closed to make room for a new one (the pool was full).
    admin_evictions,
    /// Admin connections refused: 429 (too many from one IP) or 503 (every one busy).
    admin_refused,
    /// Times an admin scan let the shard serve its connections between chunks.
    admin_scan_yields,
    /// Jobs sent to this shard that panicked (the asker got no answer).
    invoke_panics,
    /// `subscribe`/`subscribe_group` refused with `overloaded` (the mesh was congested).
    ops_overloaded,
    /// `unwatch` messages that matched no subscription (counted, never trusted).
    unmatched_unwatches,
    /// Mesh messages sent by this shard.
    mesh_sent,
    /// Mesh messages received by this shard.
    mesh_received,
    /// Mesh messages that waited in the overflow queue because a peer's inbox was full.
    mesh_overflowed,
    /// Mesh messages dropped: `activity` while the mesh is congested, or a peer gone at
    /// shutdown. State messages are never dropped.
    mesh_dropped,
    /// Queued presence updates replaced by a newer one for the same user (congested mesh).
    mesh_coalesced,
    /// Bytes waiting in this shard's overflow queues (gauge; `mesh.overflow_max_bytes`).
    mesh_overflow_bytes,
    /// Changed shares replaced by a newer one of the same user while the cluster bridge's
    /// queue was full (cluster only).
    cluster_coalesced,
    /// `activity` events for other nodes dropped because the cluster bridge's queue was full
    /// (ephemeral: never queued).
    cluster_activity_dropped,
    /// Times this shard's event loop did not turn for longer than `stall_threshold_ms`
    /// (reported by glommio's stall detector once the loop turns again: `ops::stall`).
    shard_stalls,
    ;
    /// How long each of those stalls kept the loop from turning, µs.
    stall_duration_us,
}

impl ShardMetrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    pub fn set(counter: &AtomicU64, v: u64) {
        counter.store(v, Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Relaxed)
    }
}

impl ShardMetrics {
    /// Lowers a gauge.
    pub fn sub(counter: &AtomicU64, n: u64) {
        counter.fetch_sub(n, Relaxed);
    }
}

/// Mesh messages sent from one shard to each peer: one counter per destination, written only by
/// the sending shard.
#[derive(Debug)]
pub struct PeerCounters(Box<[AtomicU64]>);

impl PeerCounters {
    pub fn new(peers: usize) -> PeerCounters {
        PeerCounters((0..peers).map(|_| AtomicU64::new(0)).collect())
    }

    pub fn inc(&self, peer: usize) {
        self.0[peer].fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> Vec<u64> {
        self.0.iter().map(|c| c.load(Relaxed)).collect()
    }
}

/// Lowest and highest latency recorded, in microseconds (1 µs to 60 s).
const LATENCY_RANGE_US: (u64, u64) = (1, 60_000_000);

/// A latency histogram in microseconds: 1 µs to 60 s at 2 significant digits (1% resolution,
/// about 20 KiB). Values past the range are clamped, never refused.
pub fn latency_histogram() -> hdrhistogram::Histogram<u64> {
    hdrhistogram::Histogram::new_with_bounds(LATENCY_RANGE_US.0, LATENCY_RANGE_US.1, 2)
        .expect("constant, valid histogram bounds")
}

/// One shard's fan-out latency: everything since start, and a recent window (the current and
/// the previous rotation period) for the dashboard. Shard-local; other shards get clones over
/// the mesh and merge them.
#[derive(Debug, Clone)]
pub struct Latency {
    pub total: hdrhistogram::Histogram<u64>,
    current: hdrhistogram::Histogram<u64>,
    previous: hdrhistogram::Histogram<u64>,
}

impl Default for Latency {
    fn default() -> Self {
        Latency {
            total: latency_histogram(),
            current: latency_histogram(),
            previous: latency_histogram(),
        }
    }
}

impl Latency {
    pub fn record(&mut self, us: u64) {
        let us = us.clamp(LATENCY_RANGE_US.0, LATENCY_RANGE_US.1);
        self.total.saturating_record(us);
        self.current.saturating_record(us);
    }

    /// Starts a new recent window; the one that ends stays visible for one more period.
    pub fn rotate(&mut self) {
        std::mem::swap(&mut self.current, &mut self.previous);
        self.current.reset();
    }

    /// The last one to two rotation periods.
    pub fn recent(&self) -> hdrhistogram::Histogram<u64> {
        let mut h = self.current.clone();
        h.add(&self.previous)
            .expect("same bounds: both come from latency_histogram()");
        h
    }
}

/// Upper bounds (µs) of the Prometheus buckets latencies are exported in: fixed, so histograms
/// from every shard and every node add up, and recent latency can be alerted on with `rate()`
/// over the buckets. Exported in seconds (`le="0.00005"` … `le="10"`).
pub const LATENCY_BUCKETS_US: [u64; 17] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

const BUCKETS: usize = LATENCY_BUCKETS_US.len();

/// A latency distribution in the fixed [`LATENCY_BUCKETS_US`]: what a scrape exports, taken from
/// an hdrhistogram (at its 1% resolution) or from [`AtomicBuckets`]. Adds up over shards.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Buckets {
    /// Samples at or below each bound (cumulative); what is above the last is only in `count`.
    pub cumulative: [u64; BUCKETS],
    pub count: u64,
    /// Sum of the samples, in seconds.
    pub sum_s: f64,
    /// The largest sample, µs.
    pub max_us: u64,
}

impl Buckets {
    pub fn of(h: &hdrhistogram::Histogram<u64>) -> Buckets {
        let mut b = Buckets::default();
        if h.is_empty() {
            return b;
        }
        for (c, le) in b.cumulative.iter_mut().zip(LATENCY_BUCKETS_US) {
            *c = h.count_between(0, le);
        }
        b.count = h.len();
        b.sum_s = h.mean() * h.len() as f64 / 1e6;
        b.max_us = h.max();
        b
    }

    pub fn add(&mut self, other: &Buckets) {
        for (c, o) in self.cumulative.iter_mut().zip(other.cumulative) {
            *c += o;
        }
        self.count += other.count;
        self.sum_s += other.sum_s;
        self.max_us = self.max_us.max(other.max_us);
    }
}

/// A latency histogram with the fixed [`LATENCY_BUCKETS_US`] bounds, in atomics: for a thread
/// that is not a shard (the history writer) and whose figures the admin port reads from another
/// thread. Lock-free: three atomic updates per sample (its own bucket, the sum, the maximum);
/// the cumulative counts are summed at scrape time.
#[derive(Debug, Default)]
pub struct AtomicBuckets {
    /// Samples per bucket: `counts[i]` are those in `(bound[i-1], bound[i]]`; the last slot
    /// holds what is above every bound.
    counts: [AtomicU64; BUCKETS + 1],
    sum_us: AtomicU64,
    max_us: AtomicU64,
}

impl AtomicBuckets {
    pub fn record(&self, us: u64) {
        let i = LATENCY_BUCKETS_US.partition_point(|le| *le < us);
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
        self.max_us.fetch_max(us, Relaxed);
    }

    pub fn snapshot(&self) -> Buckets {
        self.counts().buckets()
    }

    /// A plain copy of the counts.
    pub fn counts(&self) -> BucketCounts {
        BucketCounts {
            counts: std::array::from_fn(|i| self.counts[i].load(Relaxed)),
            sum_us: self.sum_us.load(Relaxed),
            max_us: self.max_us.load(Relaxed),
        }
    }
}

/// What an [`AtomicBuckets`] holds, copied into plain numbers (so a [`MetricsSnapshot`] can
/// carry it and compare equal): samples per bucket, not yet cumulative. Adds up over shards.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct BucketCounts {
    /// `counts[i]`: samples in `(bound[i-1], bound[i]]`; the last slot is above every bound.
    pub counts: [u64; BUCKETS + 1],
    pub sum_us: u64,
    pub max_us: u64,
}

impl BucketCounts {
    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    pub fn add(&mut self, other: &BucketCounts) {
        for (c, o) in self.counts.iter_mut().zip(other.counts) {
            *c += o;
        }
        self.sum_us += other.sum_us;
        self.max_us = self.max_us.max(other.max_us);
    }

    /// The cumulative form a scrape exports.
    pub fn buckets(&self) -> Buckets {
        let mut b = Buckets::default();
        let mut acc = 0;
        for (c, n) in b.cumulative.iter_mut().zip(self.counts) {
            acc += n;
            *c = acc;
        }
        b.count = acc + self.counts[BUCKETS];
        b.sum_s = self.sum_us as f64 / 1e6;
        b.max_us = self.max_us;
        b
    }
}

/// Percentiles of a latency histogram, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Percentiles {
    pub fn of(h: &hdrhistogram::Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            count: h.len(),
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_windows_rotate_and_clamp() {
        let mut l = Latency::default();
        l.record(0); // clamped up to 1 µs
        l.record(120_000_000); // clamped down to 60 s
        l.record(100);
        assert_eq!(l.total.len(), 3);
        assert_eq!(l.recent().len(), 3);
        l.rotate();
        assert_eq!(l.recent().len(), 3, "the previous window stays visible");
        l.record(50);
        l.rotate();
        assert_eq!(l.recent().len(), 1, "only the last two windows");
        l.rotate();
        assert_eq!(l.recent().len(), 0);
        assert_eq!(l.total.len(), 4);
        let p = Percentiles::of(&l.total);
        assert_eq!(p.count, 4);
        assert!(p.max >= 59_000_000 && p.p50 <= 101, "{p:?}");
        assert_eq!(
            Percentiles::of(&latency_histogram()),
            Percentiles::default()
        );
    }

    #[test]
    fn buckets_are_cumulative() {
        let mut h = latency_histogram();
        for us in [40, 90, 700, 3_000, 20_000_000] {
            h.record(us).unwrap();
        }
        let b = Buckets::of(&h).cumulative;
        assert!(b.windows(2).all(|w| w[0] <= w[1]), "{b:?}");
        assert_eq!(b[0], 1, "40 µs <= 50 µs");
        assert_eq!(b[1], 2, "and 90 µs <= 100 µs");
        assert_eq!(
            *b.last().unwrap(),
            4,
            "20 s is above the last bound: only in +Inf"
        );
        assert!(Buckets::of(&latency_histogram())
            .cumulative
            .iter()
            .all(|c| *c == 0));
    }

    #[test]
    fn atomic_buckets_count_as_the_histogram_does() {
        let (mut h, atomic) = (latency_histogram(), AtomicBuckets::default());
        for us in [40, 50, 51, 90, 700, 3_000, 20_000_000] {
            h.record(us).unwrap();
            atomic.record(us);
        }
        let (a, b) = (atomic.snapshot(), Buckets::of(&h));
        assert_eq!((a.cumulative, a.count), (b.cumulative, b.count));
        assert_eq!(a.max_us, 20_000_000);
        let mut sum = a.clone();
        sum.add(&a);
        assert_eq!((sum.cumulative[0], sum.count), (4, 14));
    }

    #[test]
    fn shard_histograms_add_up_over_shards() {
        let (one, two) = (ShardMetrics::default(), ShardMetrics::default());
        one.stall_duration_us.record(80_000);
        two.stall_duration_us.record(300_000);
        two.stall_duration_us.record(20_000_000);
        let sum = MetricsSnapshot::sum(&[one.snapshot(), two.snapshot()]);
        assert_eq!(sum.stall_duration_us.count(), 3);
        assert_eq!(sum.stall_duration_us.max_us, 20_000_000);
        let b = sum.stall_duration_us.buckets();
        assert_eq!(b.count, 3);
        assert_eq!(
            b.cumulative[LATENCY_BUCKETS_US.partition_point(|le| *le < 100_000)],
            1
        );
        assert_eq!(*b.cumulative.last().unwrap(), 2, "20 s: only in +Inf");
        assert!((b.sum_s - 20.38).abs() < 1e-9, "{}", b.sum_s);
    }
}
