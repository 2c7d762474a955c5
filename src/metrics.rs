//! Per-shard counters. Each shard writes only its own (relaxed atomics, no contention); other
//! threads read them, and cluster-wide figures are a sum over shards, never a global counter.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

macro_rules! counters {
    ($(#[$doc:meta] $name:ident,)*) => {
        /// Counters of one shard.
        #[derive(Debug, Default)]
        pub struct ShardMetrics { $(#[$doc] pub $name: AtomicU64,)* }

        /// A plain copy of the counters, for reports and tests.
        #[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
        pub struct MetricsSnapshot { $(pub $name: u64,)* }

        impl ShardMetrics {
            pub fn snapshot(&self) -> MetricsSnapshot {
                MetricsSnapshot { $($name: self.$name.load(Relaxed),)* }
            }
        }

        impl MetricsSnapshot {
            /// Sum of per-shard snapshots.
            pub fn sum<'a>(all: impl IntoIterator<Item = &'a MetricsSnapshot>) -> MetricsSnapshot {
                let mut out = MetricsSnapshot::default();
                for s in all { $(out.$name += s.$name;)* }
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
    /// Accepted sockets handed to their owner shard.
    handoffs_out,
    /// Sockets received from another shard.
    handoffs_in,
    /// Client ops handled (all kinds).
    ops,
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
    /// Undelivered events replaced by a newer state of the same user.
    coalesced,
    /// Events dropped because a connection's backlog held `max_pending_events` keys.
    outbox_dropped,
    /// Connections closed for protocol violations (1002/1007/1009) or unread replies (4008).
    protocol_closes,
    /// Panics caught while serving one connection (that connection closed, shard unharmed).
    conn_panics,
    /// Mesh messages sent by this shard.
    mesh_sent,
    /// Mesh messages received by this shard.
    mesh_received,
    /// Mesh messages that waited in the overflow queue because a peer's inbox was full.
    mesh_overflowed,
    /// Mesh messages dropped: overflow queue full or peer gone.
    mesh_dropped,
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
}

impl ShardMetrics {
    /// Lowers a gauge.
    pub fn sub(counter: &AtomicU64, n: u64) {
        counter.fetch_sub(n, Relaxed);
    }
}
