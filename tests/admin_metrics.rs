//! `/metrics` read by the reference Prometheus parser: counters move with traffic, latency is a
//! real histogram, and every family (and every route) is documented in docs/ADMIN.md.

mod common;

use std::collections::BTreeSet;
use std::io::Write;

use common::*;
use serde_json::{json, Value};

#[test]
fn metrics_parse_with_the_prometheus_parser_and_move_with_traffic() {
    let s = admin_server(2);
    let before = scrape(&s);
    let mut a = s.connect(&user_on(0, 2, "pa"));
    let b_id = user_on(1, 2, "pb");
    a.subscribe(&[&b_id]);
    let mut b = s.connect(&b_id);
    a.presence_of(&b_id);
    b.set_status("busy", None);
    a.presence_of(&b_id);
    let after = eventually("deliveries counted", || {
        let m = scrape(&s);
        (sum(&m, "presenced_deliveries_total", &[]) >= 3.0).then_some(m)
    });
    let moved = |name: &str, labels: &[(&str, &str)]| {
        sum(&after, name, labels) - sum(&before, name, labels)
    };
    assert_eq!(
        moved("presenced_handshakes_total", &[("result", "ok")]),
        2.0
    );
    assert_eq!(moved("presenced_ops_total", &[("op", "subscribe")]), 1.0);
    assert_eq!(moved("presenced_ops_total", &[("op", "set_status")]), 1.0);
    assert_eq!(sum(&after, "presenced_connections", &[]), 2.0);
    assert_eq!(sum(&after, "presenced_connections", &[("shard", "0")]), 1.0);
    assert_eq!(sum(&after, "presenced_online_users", &[]), 2.0);
    assert!(
        moved(
            "presenced_mesh_messages_total",
            &[("from", "0"), ("to", "1")]
        ) >= 1.0
    );
    // Latency is a real Prometheus histogram: cumulative buckets ending in +Inf = _count.
    let count = sum(&after, "presenced_fanout_latency_seconds_count", &[]);
    assert!(count >= 2.0);
    assert_eq!(
        sum(
            &after,
            "presenced_fanout_latency_seconds_bucket",
            &[("le", "+Inf")]
        ),
        count
    );
    assert_eq!(
        sum(
            &after,
            "presenced_fanout_latency_seconds_bucket",
            &[("le", "10")]
        ),
        count,
        "every delivery took under 10 s"
    );
    assert!(sum(&after, "presenced_handshake_seconds_count", &[]) >= 2.0);
    // History's batch writes too (the writer thread, read through atomics).
    let written = eventually("a history batch written", || {
        let m = scrape(&s);
        let n = sum(&m, "presenced_history_write_latency_seconds_count", &[]);
        (n >= 1.0).then_some(m)
    });
    assert_eq!(
        sum(
            &written,
            "presenced_history_write_latency_seconds_bucket",
            &[("le", "+Inf")]
        ),
        sum(
            &written,
            "presenced_history_write_latency_seconds_count",
            &[]
        )
    );
    assert_eq!(
        sum(
            &after,
            "presenced_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    // Bad tokens show up by result.
    let _ = s.status_for("junk");
    let m = scrape(&s);
    assert_eq!(
        sum(
            &m,
            "presenced_handshakes_total",
            &[("result", "unauthorized")]
        ),
        1.0
    );
}

/// `[(name, labels, value)]` as parsed by the Python `prometheus_client` text parser.
type Samples = Vec<(String, serde_json::Map<String, Value>, f64)>;

fn sum(samples: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l.get(*k) == Some(&json!(v))))
        .map(|(_, _, v)| v)
        .sum()
}

fn scrape(s: &TestServer) -> Samples {
    prometheus_parse(&metrics_text(s.admin, None))
}

/// Parses exposition text with the reference Python client's parser (installed on first use:
/// `pip install prometheus_client`), which rejects malformed exposition.
fn prometheus_parse(text: &str) -> Samples {
    const SCRIPT: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for fam in text_string_to_metric_families(sys.stdin.read()):
    assert fam.documentation, fam.name + " has no HELP"
    for s in fam.samples:
        out.append([s.name, s.labels, s.value])
print(json.dumps(out))
"#;
    let has_parser = || {
        std::process::Command::new("python3")
            .args(["-c", "import prometheus_client"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !has_parser() {
        let status = std::process::Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "prometheus_client"])
            .status()
            .expect("python3 is needed to validate /metrics");
        assert!(
            status.success() && has_parser(),
            "cannot install prometheus_client"
        );
    }
    let mut child = std::process::Command::new("python3")
        .args(["-c", SCRIPT])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Prometheus parser rejected /metrics: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<(String, serde_json::Map<String, Value>, f64)> =
        serde_json::from_slice(&out.stdout).unwrap();
    rows
}

#[test]
fn every_metric_family_and_route_is_documented() {
    let s = admin_server(2);
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/ADMIN.md")).unwrap();
    let text = metrics_text(s.admin, None);
    let families: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| l.split(' ').next().unwrap())
        .collect();
    assert!(families.len() > 20);
    for f in families {
        assert!(
            doc.contains(&format!("`{f}`")),
            "metric {f} is not in docs/ADMIN.md"
        );
    }
    for route in [
        "GET /healthz",
        "GET /readyz",
        "GET /metrics",
        "GET /api/stats",
        "GET /api/users/{id}",
        "GET /api/online",
        "GET /api/groups/{g}",
        "POST /api/users/{id}/kick",
        "POST /api/sessions/{id}/kick",
        "GET /ws/admin",
        "GET /api/history/{user}",
        "GET /api/analytics/{user}",
        "GET /api/replay",
        "GET /api/replay/at",
        "GET /api/webhooks",
    ] {
        assert!(
            doc.contains(&format!("`{route}`")),
            "route {route} is not in docs/ADMIN.md"
        );
    }
}
