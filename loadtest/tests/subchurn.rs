//! The `subchurn` scenario (issue 11 item 13) end to end against a real server started in this
//! process, scaled down: connections cycling subscribe/unsubscribe over a set of ids, then a
//! re-subscription whose snapshots are checked, and live events.

mod common;

use common::{admin_url, harness, server, SECRET};

/// 4 watchers cycling over 200 ids (10 of them online targets) in batches of `batch` at the
/// default 45 ops/s, for 2 s; then --verify.
fn subchurn(
    server: &presenced::ServerHandle,
    name: &str,
    batch: &str,
    extra: &[&str],
) -> (std::process::Output, serde_json::Value) {
    let json = std::env::temp_dir().join(format!("lt-{name}-{}.json", std::process::id()));
    let admin = admin_url(server);
    let out = harness(server, SECRET, 2, &json)
        .args([
            "--scenario",
            "subchurn",
            "--connections",
            "4",
            "--watch",
            "200",
        ])
        .args([
            "--churn-batch",
            batch,
            "--churn-targets",
            "10",
            "--duration",
            "2s",
        ])
        .args(["--verify", "--drain", "5s", "--admin-url", &admin])
        .args(extra)
        .env("LT_DEBUG", "1")
        .output()
        .unwrap();
    let report = std::fs::read_to_string(&json)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(serde_json::Value::Null);
    std::fs::remove_file(&json).ok();
    (out, report)
}

fn explain(out: &std::process::Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn subchurn_counts_the_storm_and_verifies_recovery() {
    let server = server(|_| {});
    let (out, r) = subchurn(&server, "subchurn", "50", &[]);
    assert!(out.status.success(), "{}", explain(&out));
    let sc = &r["subchurn"];
    let n = |k: &str| sc[k].as_u64().unwrap_or_else(|| panic!("no {k} in {sc}"));
    // The storm: ops went out at the asked rate and every one was answered, acked or refused.
    assert!(n("subscribe_ops") >= 4 * 2 * 45 / 2 * 9 / 10, "{sc}");
    let refused: u64 = sc["refused"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(
        n("subscribe_acked") + n("unsubscribe_acked") + refused,
        n("subscribe_ops") + n("unsubscribe_ops"),
        "{sc}"
    );
    assert!(n("snapshots") > 0);
    // After the storm: every watcher re-subscribed, got a right snapshot of every id, and saw
    // every target's live change.
    assert_eq!((n("watchers"), n("resubscribed")), (4, 4), "{sc}");
    assert_eq!(n("snapshots_expected"), 4 * 200);
    assert_eq!(
        (n("snapshots_missing"), n("snapshots_wrong")),
        (0, 0),
        "{sc}"
    );
    assert_eq!((n("live_expected"), n("live_missing")), (4 * 10, 0), "{sc}");
    assert_eq!(r["verify"]["passed"], true);
    assert_eq!(r["connections_established"], 4 + 10);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("re-snapshots            800 expected, 0 missing, 0 wrong"),
        "{table}"
    );
    server.shutdown();
}

/// Refusals are counted by code and retried: the server allows 20 ops/s per connection (burst
/// 20) and the watchers send 30 (under the 2x that gets a connection closed). Over the 2 s storm
/// that is about as many ops as the budget holds (20 + 2 × 20), so how many storm ops come back
/// `rate_limited` depends on timing (4 to 7 in all in runs seen, and it can be 0); but the storm
/// leaves the budget spent, so re-subscribing right after it (8 ops per watcher) is refused
/// `rate_limited` and retried: 7 times per watcher, 27 to 28 in all, in every run seen. Every op
/// is answered once, and verification still passes.
#[test]
fn subchurn_counts_refusals_and_retries_them() {
    let server = server(|cfg| cfg.limits.ops_per_second = 20);
    let (out, r) = subchurn(
        &server,
        "subchurn-limited",
        "50",
        &["--churn-ops-per-sec", "30"],
    );
    assert!(out.status.success(), "{}", explain(&out));
    let sc = &r["subchurn"];
    let n = |k: &str| sc[k].as_u64().unwrap_or_else(|| panic!("no {k} in {sc}"));
    let retried = sc["resubscribe_refused"]["rate_limited"]
        .as_u64()
        .unwrap_or(0);
    assert!(retried > 0, "{sc}");
    // The storm's ops were each acked or refused `rate_limited`, nothing else.
    let limited = sc["refused"]["rate_limited"].as_u64().unwrap_or(0);
    assert_eq!(
        n("subscribe_acked") + n("unsubscribe_acked") + limited,
        n("subscribe_ops") + n("unsubscribe_ops"),
        "{sc}"
    );
    assert_eq!(
        (n("resubscribed"), n("snapshots_missing"), n("live_missing")),
        (4, 0, 0),
        "{sc}"
    );
    assert_eq!(r["verify"]["passed"], true);
    server.shutdown();
}

/// The red-team finding, scaled down: with a congested mesh the server used to drop `Watch`,
/// `Snapshot` and `Unwatch` messages (`mesh_dropped`), subscriptions stayed pending forever or
/// owners lost count of their watchers, and after the storm re-subscribing watchers got no
/// snapshots and no live events (before the fix this failed 4 of 4 runs, with 670–732 of 800
/// re-snapshots missing). Now state messages are never dropped: a congested server refuses new
/// subscribes with `overloaded` (the harness retries them) and every watcher recovers.
#[test]
fn subchurn_recovers_from_a_congested_mesh() {
    let server = server(|cfg| {
        cfg.mesh.inbox_capacity = 16;
        cfg.mesh.overflow_max_bytes = 1 << 20;
        // No id budget and no op limit: the storm reaches the mesh, which must shed it without
        // losing state.
        cfg.limits.subscriptions_per_second = 0;
        cfg.limits.ops_per_second = 0;
    });
    // Every op names all 200 ids: 200 Watch + 200 Snapshot messages per subscribe, 200
    // subscribes a second per watcher. (At 100 a second the mesh did not always congest once
    // the shards' time slice became 25 ms, issue 13: 1 run in 3 proved nothing and failed.)
    let (out, r) = subchurn(
        &server,
        "subchurn-congested",
        "200",
        &["--churn-ops-per-sec", "400"],
    );
    let m = server.metrics_total();
    // The storm did congest the mesh (otherwise this test proves nothing): subscribes were
    // refused `overloaded`, and the harness counted them.
    assert!(
        m.ops_overloaded > 0,
        "the mesh never congested\n{}\n{}",
        r["subchurn"],
        explain(&out)
    );
    assert!(
        r["subchurn"]["refused"]["overloaded"].as_u64() > Some(0),
        "{}",
        r["subchurn"]
    );
    // And everything recovered: verification passed, and no state was lost.
    assert!(
        out.status.success(),
        "mesh_dropped {}\n{}\n{}",
        m.mesh_dropped,
        r["subchurn"],
        explain(&out)
    );
    assert_eq!(r["verify"]["passed"], true);
    assert_eq!(
        m.mesh_dropped, 0,
        "no activity was sent: nothing may be dropped"
    );
    assert_eq!(m.unmatched_unwatches, 0, "every unwatch matched a watch");
    server.shutdown();
}
