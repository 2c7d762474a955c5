//! `GET /api/webhooks` (and `/api/stats`'s `webhooks`): each webhook's counters, state and last
//! error, read from its [`Stats`] (atomics the sender thread updates; no shard is asked). In a
//! cluster every node sends its own events, so the route asks every node and lists each
//! node's webhooks with the node's id.

use serde::Serialize;
use serde_json::{json, Value};

use super::cluster::{self, Scope};
use crate::admin::http::Response;
use crate::admin::prom::WebhookScrape;
use crate::admin::AdminLocal;
use crate::auth::Identity;
use crate::metrics::Buckets;
use crate::shard::Shard;
use crate::webhooks::sender::{Filters, State, Stats};

/// A latency distribution in milliseconds, for people (`/metrics` has the histograms).
#[derive(Serialize, Debug, Default, PartialEq)]
pub struct Millis {
    pub count: u64,
    pub mean: f64,
    pub max: f64,
}

impl Millis {
    fn of(b: &Buckets) -> Millis {
        Millis {
            count: b.count,
            mean: if b.count == 0 {
                0.0
            } else {
                (b.sum_s * 1e3 / b.count as f64 * 10.0).round() / 10.0
            },
            max: b.max_us as f64 / 1e3,
        }
    }
}

/// One webhook as the admin API shows it.
#[derive(Serialize, Debug)]
pub struct WebhookRow {
    /// The node that sends it (in a cluster).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub name: String,
    /// Scheme and host only: a URL's path or query may be its secret (Slack's are).
    pub target: String,
    pub format: &'static str,
    pub events: Vec<&'static str>,
    pub filters: Filters,
    pub state: State,
    /// Events held (waiting and in flight), and the bound.
    pub queued: u64,
    pub max_queue: u64,
    pub requests: u64,
    pub events_sent: u64,
    pub acked: u64,
    /// Requests that failed (each batch is sent again).
    pub retries: u64,
    pub dropped: u64,
    /// Requests failed since the last 2xx.
    pub consecutive_failures: u64,
    pub last_ok_ms: Option<u64>,
    /// The last failure (kept after a recovery; `state` says whether it still fails).
    pub last_error: Option<String>,
    pub last_error_ms: Option<u64>,
    /// When the failed batch is sent again.
    pub retry_at_ms: Option<u64>,
    /// Round trips of acknowledged requests.
    pub request_ms: Millis,
    /// From each event to its acknowledgement.
    pub delay_ms: Millis,
}

fn nonzero(v: u64) -> Option<u64> {
    (v != 0).then_some(v)
}

impl WebhookRow {
    pub fn of(s: &Stats, node: Option<String>) -> WebhookRow {
        let n = WebhookScrape::of(s);
        WebhookRow {
            node,
            name: n.name,
            target: s.target.clone(),
            format: s.format,
            events: s.events.clone(),
            filters: s.filters.clone(),
            state: n.state,
            queued: n.queued,
            max_queue: n.max_queue,
            requests: n.requests,
            events_sent: n.events_sent,
            acked: n.acked,
            retries: n.failed,
            dropped: n.dropped,
            consecutive_failures: n.failing,
            last_ok_ms: nonzero(n.last_ok_ms),
            last_error: s.last_error(),
            last_error_ms: nonzero(n.last_error_ms),
            retry_at_ms: nonzero(n.retry_at_ms).filter(|_| n.state == State::Failing),
            request_ms: Millis::of(&n.latency),
            delay_ms: Millis::of(&n.delay),
        }
    }
}

/// This node's webhooks.
pub fn rows(shard: &Shard) -> Vec<WebhookRow> {
    let node = cluster::node_id(shard);
    AdminLocal::of(shard)
        .webhooks
        .iter()
        .map(|s| WebhookRow::of(s, node.clone()))
        .collect()
}

/// `GET /api/webhooks`: this node's webhooks, and in a cluster every node's.
pub async fn list(shard: &Shard, scope: Scope, query: &str, admin: &Identity) -> Response {
    let mine = rows(shard);
    match cluster::others(
        shard,
        scope,
        "GET",
        "/api/webhooks".into(),
        query,
        admin,
        None,
    )
    .await
    {
        None => Response::json(200, &json!({ "webhooks": mine })),
        Some(remote) => {
            let mut all: Vec<Value> = mine
                .iter()
                .filter_map(|r| serde_json::to_value(r).ok())
                .collect();
            for (_, body) in cluster::ok_bodies(&remote) {
                all.extend(body["webhooks"].as_array().into_iter().flatten().cloned());
            }
            Response::json(
                200,
                &json!({ "webhooks": all, "nodes_missing": remote.missing }),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::Relaxed;

    use super::*;

    #[test]
    fn a_row_says_the_state_and_keeps_the_last_error_after_a_recovery() {
        let s = Stats {
            name: "alerts".into(),
            target: "https://hooks.example.com".into(),
            max_queue: 10,
            ..Stats::default()
        };
        let row = WebhookRow::of(&s, None);
        assert_eq!(row.state, State::Idle);
        assert_eq!(
            (row.last_ok_ms, row.last_error, row.retry_at_ms),
            (None, None, None)
        );
        s.failing.store(2, Relaxed);
        s.retry_at_ms.store(5_000, Relaxed);
        s.last_error_ms.store(4_000, Relaxed);
        *s.last_error.lock().unwrap() = Some("HTTP 500".into());
        let row = WebhookRow::of(&s, Some("n1".into()));
        assert_eq!(row.state, State::Failing);
        assert_eq!(row.retry_at_ms, Some(5_000));
        assert_eq!(row.consecutive_failures, 2);
        s.failing.store(0, Relaxed);
        s.last_ok_ms.store(6_000, Relaxed);
        s.latency.record(2_000);
        s.latency.record(4_000);
        let row = WebhookRow::of(&s, None);
        assert_eq!(row.state, State::Ok);
        assert_eq!(row.last_error.as_deref(), Some("HTTP 500"));
        assert_eq!(row.retry_at_ms, None, "no retry waits once it is healthy");
        assert_eq!(
            row.request_ms,
            Millis {
                count: 2,
                mean: 3.0,
                max: 4.0
            }
        );
        let v = serde_json::to_value(WebhookRow::of(&s, Some("n1".into()))).unwrap();
        assert_eq!(v["state"], "ok");
        assert_eq!(v["node"], "n1");
        s.stopping.store(true, Relaxed);
        assert_eq!(s.state(), State::Stopping);
    }
}
