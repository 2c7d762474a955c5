//! `/api/stats` and `/metrics`: counters read directly (any thread may read the shards'
//! atomics), latency histograms map-reduced from the shards.

use serde::Serialize;

use super::ask;
use crate::admin::http::Response;
use crate::admin::query::{shard_stats, ShardStats};
use crate::admin::series::Sample;
use crate::admin::AdminLocal;
use crate::metrics::{latency_histogram, Buckets, MetricsSnapshot, Percentiles};
use crate::shard::Shard;

#[derive(Serialize, Default)]
pub struct Totals {
    pub connections: u64,
    pub online_users: u64,
    pub sessions: u64,
    pub handshakes_ok: u64,
    pub deliveries: u64,
    pub coalesced: u64,
    pub ops: u64,
    pub rate_limited: u64,
    pub mesh_sent: u64,
    pub mesh_received: u64,
    pub mesh_dropped: u64,
    pub kicks: u64,
    /// Ended sessions still counted for their users (`offline_grace_ms`, an upgrade).
    pub held_sessions: u64,
    pub reattached: u64,
    pub grace_expired: u64,
    /// Times a shard's event loop stalled past `stall_threshold_ms`.
    pub stalls: u64,
}

#[derive(Serialize, Default)]
pub struct Rates {
    pub handshakes_per_s: f64,
    pub deliveries_per_s: f64,
    pub ops_per_s: f64,
}

#[derive(Serialize)]
pub struct ShardRow {
    pub shard: usize,
    pub cpu: Option<usize>,
    pub users: u64,
    pub connections: u64,
    pub sessions: usize,
    pub mesh_in: u64,
    pub mesh_out: u64,
    pub deliveries: u64,
    pub deliveries_per_s: f64,
    pub stalls: u64,
}

#[derive(Serialize)]
pub struct StatsBody {
    pub version: &'static str,
    pub started_ms: u64,
    pub uptime_s: u64,
    pub shards: usize,
    pub totals: Totals,
    pub rates: Rates,
    /// Since start.
    pub latency_us: Percentiles,
    /// The last 10 to 20 seconds.
    pub latency_recent_us: Percentiles,
    pub per_shard: Vec<ShardRow>,
    /// The latest point of the dashboard's series.
    pub sample: Sample,
    /// In a cluster: this node, the others, the bus.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterStats>,
    /// This node's webhooks, with their health (`GET /api/webhooks` has more).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub webhooks: Vec<super::webhooks::WebhookRow>,
}

/// `/api/stats`'s `cluster`: this node and every live node with its counts, as of its last
/// heartbeat (at most `lease_ms / 3` old), and their totals.
#[derive(Serialize)]
pub struct ClusterStats {
    pub node: String,
    pub incarnation: u64,
    pub bus: &'static str,
    pub why: String,
    pub nodes: Vec<NodeRow>,
    /// Over every live node, this one included.
    pub totals: ClusterTotals,
}

#[derive(Serialize)]
pub struct NodeRow {
    pub node: String,
    pub incarnation: u64,
    pub admin: Option<String>,
    pub connections: u64,
    /// Online users as that node sees them (its own and those it hears of).
    pub online_users: u64,
    pub last_heard_ms: u64,
}

#[derive(Serialize)]
pub struct ClusterTotals {
    pub nodes: usize,
    pub connections: u64,
}

fn cluster_stats(c: &crate::cluster::Status, connections: u64) -> ClusterStats {
    let nodes: Vec<NodeRow> = c
        .nodes()
        .into_iter()
        .map(|p| NodeRow {
            node: p.id,
            incarnation: p.incarnation,
            admin: p.info.admin,
            connections: p.info.sessions,
            online_users: p.info.online,
            last_heard_ms: p.last_heard,
        })
        .collect();
    ClusterStats {
        node: c.node_id.clone(),
        incarnation: c.incarnation(),
        bus: c.bus().as_str(),
        why: c.why(),
        totals: ClusterTotals {
            nodes: nodes.len() + 1,
            connections: connections + nodes.iter().map(|n| n.connections).sum::<u64>(),
        },
        nodes,
    }
}

/// `/api/stats`.
pub async fn stats(shard: &Shard) -> Result<StatsBody, Response> {
    let answers: Vec<ShardStats> = ask::all(shard, |s| shard_stats(s)).await?;
    let shared = shard.shared();
    let snaps = shared.snapshots();
    let sum = MetricsSnapshot::sum(&snaps);
    let mut total_h = latency_histogram();
    let mut recent_h = latency_histogram();
    let mut sample = Sample::default();
    let mut shard_rates = Vec::new();
    for s in &answers {
        let _ = total_h.add(&s.latency_total);
        let _ = recent_h.add(&s.latency_recent);
        if let Some((latest, rates)) = &s.sample {
            sample = *latest;
            shard_rates.clone_from(rates);
        }
    }
    let per_shard = snaps
        .iter()
        .zip(&answers)
        .enumerate()
        .map(|(i, (m, s))| ShardRow {
            shard: i,
            cpu: shared.cpus.get(i).copied().flatten(),
            users: m.online_users,
            connections: m.connections,
            sessions: s.sessions,
            mesh_in: m.mesh_received,
            mesh_out: m.mesh_sent,
            deliveries: m.deliveries,
            deliveries_per_s: shard_rates.get(i).copied().unwrap_or(0.0),
            stalls: m.shard_stalls,
        })
        .collect();
    Ok(StatsBody {
        version: crate::admin::VERSION,
        started_ms: shared.started_ms,
        uptime_s: shared.started.elapsed().as_secs(),
        shards: shared.shards(),
        totals: Totals {
            connections: sum.connections,
            online_users: sum.online_users,
            sessions: answers.iter().map(|s| s.sessions as u64).sum(),
            handshakes_ok: sum.handshakes_ok,
            deliveries: sum.deliveries,
            coalesced: sum.coalesced,
            ops: sum.ops,
            rate_limited: sum.ops_rate_limited + sum.handshakes_rate_limited,
            mesh_sent: sum.mesh_sent,
            mesh_received: sum.mesh_received,
            mesh_dropped: sum.mesh_dropped,
            kicks: sum.kicks,
            held_sessions: answers.iter().map(|s| s.held as u64).sum(),
            reattached: sum.reattached,
            grace_expired: sum.grace_expired,
            stalls: sum.shard_stalls,
        },
        rates: Rates {
            handshakes_per_s: sample.handshakes_per_s,
            deliveries_per_s: sample.deliveries_per_s,
            ops_per_s: sample.ops_per_s,
        },
        latency_us: Percentiles::of(&total_h),
        latency_recent_us: Percentiles::of(&recent_h),
        per_shard,
        sample,
        cluster: AdminLocal::of(shard)
            .cluster
            .as_deref()
            .map(|c| cluster_stats(c, sum.connections)),
        webhooks: super::webhooks::rows(shard),
    })
}

/// `/metrics`. Counters need no shard's answer; the latency histograms come from the shards
/// that answer in time (`presenced_scrape_shards_answered` says how many), each as its fixed
/// buckets (a few numbers, not its whole histogram).
pub async fn metrics(shard: &Shard) -> Result<Response, Response> {
    let (answers, answered) = ask::all_partial(shard, |s| {
        (
            Buckets::of(&s.latency().total),
            Buckets::of(&s.handshake_latency().total),
        )
    })
    .await;
    let mut fanout = Buckets::default();
    let mut handshakes = Buckets::default();
    for (_, (f, h)) in &answers {
        fanout.add(f);
        handshakes.add(h);
    }
    let shared = shard.shared();
    let snaps = shared.snapshots();
    let pairs: Vec<Vec<u64>> = shared.mesh_pairs.iter().map(|p| p.snapshot()).collect();
    let history = &AdminLocal::of(shard).history;
    let text = crate::admin::prom::render(&crate::admin::prom::Scrape {
        version: crate::admin::VERSION,
        uptime_s: shared.started.elapsed().as_secs_f64(),
        shards: &snaps,
        mesh_pairs: &pairs,
        fanout: &fanout,
        handshakes: &handshakes,
        answered: answered.asked - answered.missing.len(),
        history: history.enabled().then(|| {
            crate::admin::prom::HistoryScrape::of(history, shard.cfg().history.queue_capacity)
        }),
        cluster: AdminLocal::of(shard)
            .cluster
            .as_deref()
            .map(crate::admin::prom::ClusterScrape::of),
        geo: shared.geo.as_deref().map(crate::admin::prom::GeoScrape::of),
        webhooks: AdminLocal::of(shard)
            .webhooks
            .iter()
            .map(|w| crate::admin::prom::WebhookScrape::of(w))
            .collect(),
    });
    Ok(Response::text(
        200,
        "text/plain; version=0.0.4; charset=utf-8",
        text.into_bytes(),
    ))
}
