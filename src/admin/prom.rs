//! Prometheus text exposition (format 0.0.4) of the process's metrics: every shard's counters,
//! mesh traffic per shard pair, and the fan-out latency histograms merged over shards.

use std::fmt::Write;

use crate::metrics::{Buckets, MetricsSnapshot, LATENCY_BUCKETS_US};

/// What one scrape shows.
pub struct Scrape<'a> {
    pub version: &'a str,
    pub uptime_s: f64,
    /// Per shard, in shard order.
    pub shards: &'a [MetricsSnapshot],
    /// `mesh_pairs[from][to]`: messages sent.
    pub mesh_pairs: &'a [Vec<u64>],
    /// Fan-out latency, added up over shards, since start.
    pub fanout: &'a Buckets,
    /// Handshake latency (accept to session open), added up over shards, since start.
    pub handshakes: &'a Buckets,
    /// Shards that answered this scrape in time (their latency histograms are merged).
    pub answered: usize,
    /// History's writer, when history is on.
    pub history: Option<HistoryScrape>,
    /// The cluster bridge, when the node runs in a cluster.
    pub cluster: Option<ClusterScrape>,
    /// `geo.database`, when one is configured: its reloads and build date.
    pub geo: Option<GeoScrape>,
    /// Every `[[webhooks]]` block, in file order.
    pub webhooks: Vec<WebhookScrape>,
}

/// One webhook's figures, read once from its counters: what `/metrics` shows, and the numbers
/// of `GET /api/webhooks` (`crate::admin::api::webhooks`).
#[derive(Clone, Debug, Default)]
pub struct WebhookScrape {
    pub name: String,
    pub state: crate::webhooks::sender::State,
    pub requests: u64,
    pub events_sent: u64,
    pub acked: u64,
    pub failed: u64,
    pub dropped: u64,
    pub queued: u64,
    pub max_queue: u64,
    pub failing: u64,
    pub last_ok_ms: u64,
    pub last_error_ms: u64,
    pub retry_at_ms: u64,
    pub latency: Buckets,
    pub delay: Buckets,
}

impl WebhookScrape {
    pub fn of(s: &crate::webhooks::sender::Stats) -> WebhookScrape {
        use std::sync::atomic::Ordering::Relaxed;
        WebhookScrape {
            name: s.name.clone(),
            state: s.state(),
            requests: s.requests.load(Relaxed),
            events_sent: s.events_sent.load(Relaxed),
            acked: s.acked.load(Relaxed),
            failed: s.failed.load(Relaxed),
            dropped: s.dropped.load(Relaxed),
            queued: s.queued.load(Relaxed),
            max_queue: s.max_queue,
            failing: s.failing.load(Relaxed),
            last_ok_ms: s.last_ok_ms.load(Relaxed),
            last_error_ms: s.last_error_ms.load(Relaxed),
            retry_at_ms: s.retry_at_ms.load(Relaxed),
            latency: s.latency.snapshot(),
            delay: s.delay.snapshot(),
        }
    }
}

/// What `/metrics` shows of `geo.database`.
#[derive(Clone, Copy, Debug, Default)]
pub struct GeoScrape {
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    pub build_epoch: u64,
}

impl GeoScrape {
    pub fn of(g: &crate::geo::Geo) -> GeoScrape {
        let (reloads_ok, reloads_failed) = g.reloads();
        GeoScrape {
            reloads_ok,
            reloads_failed,
            build_epoch: g.build_epoch(),
        }
    }
}

/// Quantiles of the cross-node propagation latency that `/metrics` shows.
pub const PROPAGATION_QUANTILES: [f64; 4] = [0.5, 0.9, 0.99, 0.999];

/// The cluster bridge's figures.
#[derive(Debug, Clone)]
pub struct ClusterScrape {
    pub bus: &'static str,
    /// Live nodes, this one included.
    pub nodes: u64,
    pub followed_buckets: u64,
    /// `(suffix, help, value)` of each counter.
    pub counters: Vec<(&'static str, &'static str, u64)>,
    /// Microseconds at [`PROPAGATION_QUANTILES`], and the sample count.
    pub propagation_us: Vec<u64>,
    pub propagation_count: u64,
}

impl ClusterScrape {
    pub fn of(s: &crate::cluster::Status) -> ClusterScrape {
        use crate::cluster::Counters as C;
        let c = &s.counters;
        let (propagation_us, propagation_count) = s.latency(&PROPAGATION_QUANTILES);
        ClusterScrape {
            bus: s.bus().as_str(),
            nodes: s.nodes().len() as u64 + 1,
            followed_buckets: s.followed.load(std::sync::atomic::Ordering::Relaxed),
            counters: vec![
                (
                    "messages_out_total",
                    "Bus messages published (deltas, heartbeats).",
                    C::get(&c.messages_out),
                ),
                (
                    "bytes_out_total",
                    "Payload bytes published on the bus.",
                    C::get(&c.bytes_out),
                ),
                (
                    "messages_in_total",
                    "Bus messages received.",
                    C::get(&c.messages_in),
                ),
                (
                    "bytes_in_total",
                    "Payload bytes received from the bus.",
                    C::get(&c.bytes_in),
                ),
                (
                    "deltas_out_total",
                    "Changed shares of this node published.",
                    C::get(&c.deltas_out),
                ),
                (
                    "delta_messages_out_total",
                    "Delta messages published (user and group buckets; several shares each).",
                    C::get(&c.delta_messages_out),
                ),
                (
                    "delta_bytes_out_total",
                    "Payload bytes of the delta messages published.",
                    C::get(&c.delta_bytes_out),
                ),
                (
                    "deltas_in_total",
                    "Shares received in other nodes' deltas.",
                    C::get(&c.deltas_in),
                ),
                (
                    "snapshots_requested_total",
                    "Snapshot requests sent to other nodes.",
                    C::get(&c.snapshots_requested),
                ),
                (
                    "snapshots_served_total",
                    "Snapshot requests answered.",
                    C::get(&c.snapshots_served),
                ),
                (
                    "snapshots_failed_total",
                    "Snapshot requests that got no whole answer in time (retried).",
                    C::get(&c.snapshots_failed),
                ),
                (
                    "gaps_total",
                    "Lost delta messages detected (each healed by a snapshot).",
                    C::get(&c.gaps),
                ),
                (
                    "lease_expiries_total",
                    "Nodes dropped for a silent lease.",
                    C::get(&c.lease_expiries),
                ),
                (
                    "reconnects_total",
                    "Reconnections to the bus.",
                    C::get(&c.reconnects),
                ),
                (
                    "coalesced_total",
                    "Shares replaced by a newer one of the same user before publication.",
                    C::get(&c.coalesced),
                ),
                (
                    "duplicate_ids_total",
                    "Messages from another process using this node's id.",
                    C::get(&c.duplicate_ids),
                ),
                (
                    "clock_ahead_total",
                    "Shares refused: their clock was more than 60 s ahead of this node's.",
                    C::get(&c.clock_ahead),
                ),
                (
                    "malformed_total",
                    "Bus messages that did not parse (dropped).",
                    C::get(&c.malformed),
                ),
                (
                    "activity_out_total",
                    "Activity events sent to other nodes.",
                    C::get(&c.activity_out),
                ),
                (
                    "activity_in_total",
                    "Activity events received from other nodes.",
                    C::get(&c.activity_in),
                ),
                (
                    "activity_dropped_total",
                    "Activity events not sent (bus down, or too many for one batch).",
                    C::get(&c.activity_dropped),
                ),
            ],
            propagation_us,
            propagation_count,
        }
    }
}

/// The history pipeline's figures.
#[derive(Debug, Default, Clone)]
pub struct HistoryScrape {
    pub queue_depth: u64,
    pub queue_capacity: u64,
    pub written: u64,
    pub dropped_queue_full: u64,
    pub dropped_write_failed: u64,
    pub write_errors: u64,
    pub retries: u64,
    pub batches: u64,
    pub batch_records: u64,
    /// Batch write latency.
    pub writes: Buckets,
    pub expired: u64,
    /// What the local store's file takes on disk; `None` for other backends.
    pub disk_bytes: Option<u64>,
    pub compactions: u64,
    pub compaction_freed_bytes: u64,
}

impl HistoryScrape {
    pub fn of(sink: &crate::history::Sink, capacity: usize) -> HistoryScrape {
        use crate::history::HistoryMetrics as M;
        let m = &sink.metrics;
        HistoryScrape {
            queue_depth: sink.queue_depth() as u64,
            queue_capacity: capacity as u64,
            written: M::get(&m.written),
            dropped_queue_full: M::get(&m.dropped_queue_full),
            dropped_write_failed: M::get(&m.dropped_write_failed),
            write_errors: M::get(&m.write_errors),
            retries: M::get(&m.retries),
            batches: M::get(&m.batches),
            batch_records: M::get(&m.batch_records),
            writes: m.write_latency.snapshot(),
            expired: M::get(&m.expired),
            disk_bytes: m
                .disk_bytes_known
                .load(std::sync::atomic::Ordering::Relaxed)
                .then(|| M::get(&m.disk_bytes)),
            compactions: M::get(&m.compactions),
            compaction_freed_bytes: M::get(&m.compaction_freed_bytes),
        }
    }
}

struct Out(String);

/// A label value and how to read its counter from a shard's snapshot.
type Labelled<'a> = (&'a str, fn(&MetricsSnapshot) -> u64);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn per_shard(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        shards: &[MetricsSnapshot],
        f: impl Fn(&MetricsSnapshot) -> u64,
    ) {
        self.family(name, kind, help);
        for (i, s) in shards.iter().enumerate() {
            let _ = writeln!(self.0, "{name}{{shard=\"{i}\"}} {}", f(s));
        }
    }

    fn labelled(
        &mut self,
        name: &str,
        help: &str,
        label: &str,
        shards: &[MetricsSnapshot],
        values: &[Labelled<'_>],
    ) {
        self.family(name, "counter", help);
        for (i, s) in shards.iter().enumerate() {
            for (v, f) in values {
                let _ = writeln!(self.0, "{name}{{shard=\"{i}\",{label}=\"{v}\"}} {}", f(s));
            }
        }
    }
}

/// Seconds, from microseconds.
fn secs(us: u64) -> f64 {
    us as f64 / 1e6
}

impl Out {
    /// A family of one unlabelled sample.
    fn single(&mut self, name: &str, kind: &str, help: &str, v: impl std::fmt::Display) {
        self.family(name, kind, help);
        let _ = writeln!(self.0, "{name} {v}");
    }

    /// A Prometheus histogram in seconds.
    fn histogram(&mut self, name: &str, help: &str, b: &Buckets) {
        self.family(name, "histogram", help);
        self.histogram_samples(name, "", b);
    }

    /// A histogram's samples; `labels`: `key="value",` pairs that go first in each.
    fn histogram_samples(&mut self, name: &str, labels: &str, b: &Buckets) {
        for (le, n) in LATENCY_BUCKETS_US.iter().zip(b.cumulative) {
            let _ = writeln!(self.0, "{name}_bucket{{{labels}le=\"{}\"}} {n}", secs(*le));
        }
        let _ = writeln!(self.0, "{name}_bucket{{{labels}le=\"+Inf\"}} {}", b.count);
        let braces = |l: &str| {
            let l = l.trim_end_matches(',');
            if l.is_empty() {
                String::new()
            } else {
                format!("{{{l}}}")
            }
        };
        let _ = writeln!(self.0, "{name}_sum{} {:.6}", braces(labels), b.sum_s);
        let _ = writeln!(self.0, "{name}_count{} {}", braces(labels), b.count);
    }

    /// The webhooks' families, one sample (or histogram) per webhook.
    fn webhooks(&mut self, hooks: &[WebhookScrape]) {
        if hooks.is_empty() {
            return;
        }
        type Field = fn(&WebhookScrape) -> u64;
        let plain: [(&str, &str, &str, Field); 9] = [
            ("presenced_webhook_requests_total", "counter", "Requests sent (first tries and retries).", |w| w.requests),
            ("presenced_webhook_events_sent_total", "counter", "Events in the requests sent (an event retried twice counts three times).", |w| w.events_sent),
            ("presenced_webhook_events_acked_total", "counter", "Events acknowledged by a 2xx.", |w| w.acked),
            ("presenced_webhook_retries_total", "counter", "Requests that failed (non-2xx, timeout, refused); each batch is sent again after a backoff.", |w| w.failed),
            ("presenced_webhook_events_dropped_total", "counter", "Events dropped: past max_queue (the oldest waiting), or while the webhook's collector was behind.", |w| w.dropped),
            ("presenced_webhook_queue_depth", "gauge", "Events held: waiting, and the batch in flight.", |w| w.queued),
            ("presenced_webhook_queue_capacity", "gauge", "max_queue.", |w| w.max_queue),
            ("presenced_webhook_consecutive_failures", "gauge", "Requests failed since the last 2xx (0: healthy).", |w| w.failing),
            ("presenced_webhook_last_success_timestamp_seconds", "gauge", "When the last 2xx came (0: never).", |w| w.last_ok_ms / 1000),
        ];
        for (name, kind, help, f) in plain {
            self.family(name, kind, help);
            for w in hooks {
                let _ = writeln!(self.0, "{name}{{webhook=\"{}\"}} {}", w.name, f(w));
            }
        }
        self.family(
            "presenced_webhook_state",
            "gauge",
            "1 for the webhook's current state (idle: nothing sent yet; failing: retrying a batch).",
        );
        for w in hooks {
            for state in crate::webhooks::sender::State::ALL.map(|s| s.as_str()) {
                let v = u8::from(state == w.state.as_str());
                let _ = writeln!(
                    self.0,
                    "presenced_webhook_state{{webhook=\"{}\",state=\"{state}\"}} {v}",
                    w.name
                );
            }
        }
        type Histogram = fn(&WebhookScrape) -> &Buckets;
        let histograms: [(&str, &str, Histogram); 2] = [
            ("presenced_webhook_request_seconds", "Round trip of each acknowledged request.", |w| &w.latency),
            ("presenced_webhook_event_delay_seconds", "From each event to the 2xx that acknowledged it (queueing, batching and retries included).", |w| &w.delay),
        ];
        for (name, help, f) in histograms {
            self.family(name, "histogram", help);
            for w in hooks {
                self.histogram_samples(name, &format!("webhook=\"{}\",", w.name), f(w));
            }
        }
    }
}

pub fn render(s: &Scrape<'_>) -> String {
    let mut o = Out(String::with_capacity(8 * 1024));
    let sh = s.shards;
    o.family(
        "presenced_build_info",
        "gauge",
        "Build information; the value is always 1.",
    );
    let _ = writeln!(o.0, "presenced_build_info{{version=\"{}\"}} 1", s.version);
    o.single(
        "presenced_uptime_seconds",
        "gauge",
        "Seconds since the server started.",
        format_args!("{:.3}", s.uptime_s),
    );
    o.single(
        "presenced_shards",
        "gauge",
        "Shards (one event loop per core).",
        sh.len(),
    );
    o.single(
        "presenced_scrape_shards_answered",
        "gauge",
        "Shards that answered this scrape within admin.query_timeout_ms (fewer than presenced_shards: a stuck shard).",
        s.answered,
    );
    o.per_shard(
        "presenced_connections",
        "gauge",
        "Open WebSocket connections.",
        sh,
        |m| m.connections,
    );
    o.per_shard(
        "presenced_online_users",
        "gauge",
        "Users with a visible session, by owner shard.",
        sh,
        |m| m.online_users,
    );
    o.per_shard(
        "presenced_outbox_pending",
        "gauge",
        "Frames queued in connection outboxes.",
        sh,
        |m| m.outbox_pending,
    );
    o.per_shard(
        "presenced_admin_connections",
        "gauge",
        "Open admin-port connections.",
        sh,
        |m| m.admin_connections,
    );
    o.labelled(
        "presenced_handshakes_total",
        "WebSocket upgrade attempts by result.",
        "result",
        sh,
        &[
            ("ok", |m| m.handshakes_ok),
            ("unauthorized", |m| m.handshakes_unauthorized),
            ("bad_request", |m| m.handshakes_bad_request),
            ("timed_out", |m| m.handshakes_timed_out),
            ("rate_limited", |m| m.handshakes_rate_limited),
            ("forbidden", |m| m.handshakes_forbidden),
            ("unavailable", |m| m.handshakes_unavailable),
            ("bad_proxy_header", |m| m.handshakes_bad_proxy_header),
        ],
    );
    o.labelled(
        "presenced_geo_regions_total",
        "Sessions without a region claim, by where their region came from (docs/CONFIG.md, [geo]).",
        "source",
        sh,
        &[
            ("header", |m| m.geo_from_header),
            ("database", |m| m.geo_found),
            ("none", |m| m.geo_not_found),
        ],
    );
    o.labelled(
        "presenced_client_addresses_total",
        "Client addresses learnt from a trusted proxy (docs/CONFIG.md, \"Behind a proxy\"), by how.",
        "source",
        sh,
        &[
            ("proxy_protocol", |m| m.client_addr_proxy_protocol),
            ("forwarded_for", |m| m.client_addr_forwarded_for),
        ],
    );
    o.per_shard(
        "presenced_proxy_headers_ignored_total",
        "counter",
        "PROXY protocol addresses and X-Forwarded-For headers from untrusted peers, ignored.",
        sh,
        |m| m.proxy_headers_ignored,
    );
    o.labelled(
        "presenced_handoffs_total",
        "Sockets handed between shards after the upgrade request.",
        "direction",
        sh,
        &[("in", |m| m.handoffs_in), ("out", |m| m.handoffs_out)],
    );
    o.labelled(
        "presenced_ops_total",
        "Client ops handled, by kind.",
        "op",
        sh,
        &[
            ("subscribe", |m| m.ops_subscribe),
            ("unsubscribe", |m| m.ops_unsubscribe),
            ("subscribe_group", |m| m.ops_subscribe_group),
            ("unsubscribe_group", |m| m.ops_unsubscribe_group),
            ("set_status", |m| m.ops_set_status),
            ("activity", |m| m.ops_activity),
            ("refresh", |m| m.ops_refresh),
            ("ping", |m| m.ops_ping),
            ("invalid", |m| m.ops_invalid),
        ],
    );
    o.per_shard(
        "presenced_ops_overloaded_total",
        "counter",
        "Subscribes refused with `overloaded` while the mesh was congested.",
        sh,
        |m| m.ops_overloaded,
    );
    o.per_shard(
        "presenced_op_errors_total",
        "counter",
        "Ops answered with an error.",
        sh,
        |m| m.op_errors,
    );
    o.labelled(
        "presenced_rate_limited_total",
        "Requests refused by a rate limit.",
        "kind",
        sh,
        &[
            ("ops", |m| m.ops_rate_limited),
            ("handshakes", |m| m.handshakes_rate_limited),
        ],
    );
    o.labelled(
        "presenced_closes_total",
        "Connections closed by the server, by reason.",
        "reason",
        sh,
        &[
            ("token_expired", |m| m.token_expiry_closes),
            ("heartbeat_timeout", |m| m.heartbeat_timeouts),
            ("session_limit", |m| m.session_limit_closes),
            ("protocol", |m| m.protocol_closes),
            ("rate_abuse", |m| m.rate_abuse_closes),
            ("kicked", |m| m.kicks),
            ("panic", |m| m.conn_panics),
            ("upgrade_drain", |m| m.upgrade_drained),
        ],
    );
    o.per_shard(
        "presenced_reattached_total",
        "counter",
        "New sessions that re-attached to a held session of their user (reconnect grace or an upgrade): no flap for watchers.",
        sh,
        |m| m.reattached,
    );
    o.per_shard(
        "presenced_grace_expired_total",
        "counter",
        "Held sessions whose grace ran out without a reconnect (then published as gone).",
        sh,
        |m| m.grace_expired,
    );
    o.per_shard(
        "presenced_upgrade_records_dropped_total",
        "counter",
        "Changed users' records the old process of an upgrade could not queue for the new one.",
        sh,
        |m| m.upgrade_records_dropped,
    );
    o.per_shard(
        "presenced_deliveries_total",
        "counter",
        "Events written to client connections.",
        sh,
        |m| m.deliveries,
    );
    o.per_shard(
        "presenced_coalesced_events_total",
        "counter",
        "Queued events replaced by a newer state of the same user, for clients that were behind (a client that keeps up gets every event).",
        sh,
        |m| m.coalesced,
    );
    o.per_shard(
        "presenced_outbox_dropped_total",
        "counter",
        "Events dropped: a connection's backlog was full.",
        sh,
        |m| m.outbox_dropped,
    );
    o.per_shard(
        "presenced_pings_sent_total",
        "counter",
        "Liveness pings sent.",
        sh,
        |m| m.pings_sent,
    );
    o.per_shard(
        "presenced_impersonations_total",
        "counter",
        "Read-only impersonation sessions opened.",
        sh,
        |m| m.impersonations,
    );
    o.per_shard(
        "presenced_admin_requests_total",
        "counter",
        "Admin HTTP requests and feed queries answered.",
        sh,
        |m| m.admin_requests,
    );
    o.family(
        "presenced_mesh_messages_total",
        "counter",
        "Mesh messages sent, by shard pair.",
    );
    for (from, row) in s.mesh_pairs.iter().enumerate() {
        for (to, n) in row.iter().enumerate() {
            let _ = writeln!(
                o.0,
                "presenced_mesh_messages_total{{from=\"{from}\",to=\"{to}\"}} {n}"
            );
        }
    }
    o.per_shard(
        "presenced_mesh_overflowed_total",
        "counter",
        "Mesh messages that waited for room in a full inbox.",
        sh,
        |m| m.mesh_overflowed,
    );
    o.per_shard(
        "presenced_mesh_dropped_total",
        "counter",
        "Mesh messages dropped: activity events while the mesh is congested, or a stopped peer. State messages are never dropped.",
        sh,
        |m| m.mesh_dropped,
    );
    o.per_shard(
        "presenced_mesh_coalesced_total",
        "counter",
        "Queued presence updates replaced by a newer one for the same user while a peer was slow.",
        sh,
        |m| m.mesh_coalesced,
    );
    o.per_shard(
        "presenced_mesh_overflow_bytes",
        "gauge",
        "Bytes of mesh messages waiting for a full peer inbox; past mesh.overflow_max_bytes new work is refused.",
        sh,
        |m| m.mesh_overflow_bytes,
    );
    o.per_shard(
        "presenced_cluster_shard_coalesced_total",
        "counter",
        "Changed shares a shard replaced by a newer one of the same user while the cluster bridge's queue was full.",
        sh,
        |m| m.cluster_coalesced,
    );
    o.per_shard(
        "presenced_cluster_activity_dropped_total",
        "counter",
        "Activity events for other nodes dropped because the cluster bridge's queue was full.",
        sh,
        |m| m.cluster_activity_dropped,
    );
    o.per_shard(
        "presenced_mesh_unmatched_unwatches_total",
        "counter",
        "Unwatch messages that matched no subscription.",
        sh,
        |m| m.unmatched_unwatches,
    );
    o.per_shard(
        "presenced_invoke_panics_total",
        "counter",
        "Cross-shard jobs (admin questions, hand-offs) that panicked and were dropped.",
        sh,
        |m| m.invoke_panics,
    );
    o.per_shard(
        "presenced_shard_stalls_total",
        "counter",
        "Times the shard's event loop did not turn for longer than stall_threshold_ms (counted when it turns again).",
        sh,
        |m| m.shard_stalls,
    );
    o.per_shard(
        "presenced_admin_evictions_total",
        "counter",
        "Idle admin connections closed to make room in a full pool.",
        sh,
        |m| m.admin_evictions,
    );
    o.per_shard(
        "presenced_admin_refused_total",
        "counter",
        "Admin connections refused (429 per IP, 503 all busy).",
        sh,
        |m| m.admin_refused,
    );
    o.per_shard(
        "presenced_admin_scan_yields_total",
        "counter",
        "Times an admin scan let its shard serve connections between chunks.",
        sh,
        |m| m.admin_scan_yields,
    );
    o.histogram(
        "presenced_fanout_latency_seconds",
        "Owner publish to local enqueue on a watching shard, merged over shards, since start.",
        s.fanout,
    );
    o.single(
        "presenced_fanout_latency_max_seconds",
        "gauge",
        "Largest fan-out latency since start.",
        format_args!("{:.6}", secs(s.fanout.max_us)),
    );
    o.histogram(
        "presenced_handshake_seconds",
        "Accept to session open (upgrade answered), merged over shards, since start.",
        s.handshakes,
    );
    let mut stalls = crate::metrics::BucketCounts::default();
    for shard in sh {
        stalls.add(&shard.stall_duration_us);
    }
    o.histogram(
        "presenced_shard_stall_seconds",
        "How long each stall kept a shard's event loop from turning, merged over shards, since start.",
        &stalls.buckets(),
    );
    if let Some(c) = &s.cluster {
        o.family(
            "presenced_cluster_bus_state",
            "gauge",
            "1 for the bus connection's current state.",
        );
        for state in ["connecting", "connected", "disconnected", "refused"] {
            let v = u8::from(state == c.bus);
            let _ = writeln!(o.0, "presenced_cluster_bus_state{{state=\"{state}\"}} {v}");
        }
        o.single(
            "presenced_cluster_nodes",
            "gauge",
            "Live nodes of the cluster as this node sees them, itself included.",
            c.nodes,
        );
        o.single(
            "presenced_cluster_followed_buckets",
            "gauge",
            "User buckets this node subscribes to (it has watchers there).",
            c.followed_buckets,
        );
        for (suffix, help, v) in &c.counters {
            o.single(&format!("presenced_cluster_{suffix}"), "counter", help, v);
        }
        o.family(
            "presenced_cluster_propagation_seconds",
            "summary",
            "Cross-node propagation: the origin node's clock at the change to its application here.",
        );
        for (q, us) in PROPAGATION_QUANTILES.iter().zip(&c.propagation_us) {
            let _ = writeln!(
                o.0,
                "presenced_cluster_propagation_seconds{{quantile=\"{q}\"}} {}",
                secs(*us)
            );
        }
        let _ = writeln!(
            o.0,
            "presenced_cluster_propagation_seconds_count {}",
            c.propagation_count
        );
    }
    if let Some(g) = &s.geo {
        o.family(
            "presenced_geo_reloads_total",
            "counter",
            "Reloads of geo.database (SIGHUP) by result; a failed one leaves the old database in service.",
        );
        let _ = writeln!(
            o.0,
            "presenced_geo_reloads_total{{result=\"ok\"}} {}",
            g.reloads_ok
        );
        let _ = writeln!(
            o.0,
            "presenced_geo_reloads_total{{result=\"failed\"}} {}",
            g.reloads_failed
        );
        o.single(
            "presenced_geo_database_build_epoch_seconds",
            "gauge",
            "When the geo database in service was built (its metadata), seconds since the epoch.",
            g.build_epoch,
        );
    }
    o.webhooks(&s.webhooks);
    if let Some(h) = &s.history {
        o.single(
            "presenced_history_queue_depth",
            "gauge",
            "History records waiting for the writer.",
            h.queue_depth,
        );
        o.single(
            "presenced_history_queue_capacity",
            "gauge",
            "Capacity of the history queue.",
            h.queue_capacity,
        );
        o.single(
            "presenced_history_written_total",
            "counter",
            "History records the store acknowledged.",
            h.written,
        );
        o.single(
            "presenced_history_write_errors_total",
            "counter",
            "Failed history write attempts.",
            h.write_errors,
        );
        o.single(
            "presenced_history_retries_total",
            "counter",
            "History write attempts that were retries.",
            h.retries,
        );
        o.single(
            "presenced_history_expired_total",
            "counter",
            "History records deleted by retention.",
            h.expired,
        );
        if let Some(bytes) = h.disk_bytes {
            o.single(
                "presenced_history_disk_bytes",
                "gauge",
                "Bytes the local history store's file takes on disk.",
                bytes,
            );
        }
        o.single(
            "presenced_history_compactions_total",
            "counter",
            "Compactions of the local history store.",
            h.compactions,
        );
        o.single(
            "presenced_history_compaction_freed_bytes_total",
            "counter",
            "Bytes the local history store's compactions gave back to the file system.",
            h.compaction_freed_bytes,
        );
        o.single(
            "presenced_history_write_latency_max_seconds",
            "gauge",
            "Slowest history batch write.",
            format_args!("{:.6}", secs(h.writes.max_us)),
        );
        o.family(
            "presenced_history_dropped_total",
            "counter",
            "History records dropped, by reason.",
        );
        let _ = writeln!(
            o.0,
            "presenced_history_dropped_total{{reason=\"queue_full\"}} {}",
            h.dropped_queue_full
        );
        let _ = writeln!(
            o.0,
            "presenced_history_dropped_total{{reason=\"write_failed\"}} {}",
            h.dropped_write_failed
        );
        o.family(
            "presenced_history_batch_size",
            "summary",
            "Records per history batch written.",
        );
        let _ = writeln!(o.0, "presenced_history_batch_size_sum {}", h.batch_records);
        let _ = writeln!(o.0, "presenced_history_batch_size_count {}", h.batches);
        o.histogram(
            "presenced_history_write_latency_seconds",
            "Time to write one history batch.",
            &h.writes,
        );
    }
    o.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sample_belongs_to_a_declared_family() {
        let mut fanout = crate::metrics::latency_histogram();
        fanout.record(40).unwrap();
        fanout.record(90).unwrap();
        let mut shards = vec![
            MetricsSnapshot {
                connections: 3,
                ..Default::default()
            };
            2
        ];
        let hook_latency = crate::metrics::AtomicBuckets::default();
        hook_latency.record(3_000);
        let hook_latency = hook_latency.snapshot();
        let stalled = crate::metrics::ShardMetrics::default();
        stalled.stall_duration_us.record(300_000);
        shards[1].shard_stalls = 1;
        shards[1].stall_duration_us = stalled.stall_duration_us.counts();
        let text = render(&Scrape {
            version: "1.2.3",
            uptime_s: 1.5,
            shards: &shards,
            mesh_pairs: &[vec![1, 2], vec![3, 4]],
            fanout: &Buckets::of(&fanout),
            handshakes: &Buckets::default(),
            answered: 2,
            history: Some(HistoryScrape {
                written: 7,
                disk_bytes: Some(4096),
                ..Default::default()
            }),
            cluster: Some(ClusterScrape {
                bus: "connected",
                nodes: 3,
                followed_buckets: 2,
                counters: vec![("gaps_total", "Gaps.", 4)],
                propagation_us: vec![500, 900, 1500, 2000],
                propagation_count: 9,
            }),
            geo: Some(GeoScrape {
                reloads_ok: 1,
                reloads_failed: 2,
                build_epoch: 1_530_653_216,
            }),
            webhooks: vec![WebhookScrape {
                name: "alerts".into(),
                state: crate::webhooks::sender::State::Failing,
                requests: 5,
                failed: 2,
                latency: hook_latency,
                ..Default::default()
            }],
        });
        let mut families = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                families.insert(rest.split(' ').next().unwrap().to_owned());
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let name = line.split(['{', ' ']).next().unwrap();
            let family = ["_sum", "_count", "_bucket"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| families.contains(*f)))
                .unwrap_or(name);
            assert!(families.contains(family), "{line}: no TYPE for {family}");
        }
        assert!(text.contains("presenced_connections{shard=\"1\"} 3\n"));
        assert!(text.contains("presenced_mesh_messages_total{from=\"1\",to=\"0\"} 3\n"));
        assert!(text.contains("presenced_fanout_latency_seconds_bucket{le=\"0.00005\"} 1\n"));
        assert!(text.contains("presenced_fanout_latency_seconds_bucket{le=\"0.0001\"} 2\n"));
        assert!(text.contains("presenced_fanout_latency_seconds_bucket{le=\"+Inf\"} 2\n"));
        assert!(text.contains("presenced_fanout_latency_seconds_count 2\n"));
        assert!(text.contains("presenced_handshake_seconds_count 0\n"));
        assert!(text.contains("presenced_shard_stalls_total{shard=\"0\"} 0\n"));
        assert!(text.contains("presenced_shard_stalls_total{shard=\"1\"} 1\n"));
        assert!(text.contains("presenced_shard_stall_seconds_bucket{le=\"0.25\"} 0\n"));
        assert!(text.contains("presenced_shard_stall_seconds_bucket{le=\"0.5\"} 1\n"));
        assert!(text.contains("presenced_shard_stall_seconds_sum 0.300000\n"));
        assert!(text.contains("# TYPE presenced_shard_stall_seconds histogram\n"));
        assert!(text.contains("# TYPE presenced_fanout_latency_seconds histogram\n"));
        assert!(text.contains("presenced_cluster_bus_state{state=\"connected\"} 1\n"));
        assert!(text.contains("presenced_cluster_gaps_total 4\n"));
        assert!(text.contains("presenced_cluster_propagation_seconds{quantile=\"0.99\"} 0.0015\n"));
        assert!(text.contains("presenced_webhook_retries_total{webhook=\"alerts\"} 2\n"));
        assert!(text.contains("presenced_webhook_requests_total{webhook=\"alerts\"} 5\n"));
        assert!(text.contains("presenced_webhook_state{webhook=\"alerts\",state=\"failing\"} 1\n"));
        assert!(text.contains("presenced_webhook_state{webhook=\"alerts\",state=\"ok\"} 0\n"));
        assert!(text.contains(
            "presenced_webhook_request_seconds_bucket{webhook=\"alerts\",le=\"0.0025\"} 0\n"
        ));
        assert!(text.contains(
            "presenced_webhook_request_seconds_bucket{webhook=\"alerts\",le=\"0.005\"} 1\n"
        ));
        assert!(
            text.contains("presenced_webhook_request_seconds_sum{webhook=\"alerts\"} 0.003000\n")
        );
        assert!(
            text.contains("presenced_webhook_event_delay_seconds_count{webhook=\"alerts\"} 0\n")
        );
    }
}
