//! Proves the harness end to end against a real server started in this process: the `churn`
//! scenario with `--verify` passes at a small size and its JSON report carries the keys tools
//! consume; and verification is no rubber stamp — a fleet that cannot authenticate fails it.

mod common;

use std::process::Command;

use common::{admin_url, server, BIN, SECRET};

/// The harness against `server`, with the flags every test here shares.
fn harness(server: &presenced::ServerHandle, secret: &str, json: &std::path::Path) -> Command {
    common::harness(server, secret, 4, json)
}

fn run(
    server: &presenced::ServerHandle,
    secret: &str,
    json: &std::path::Path,
) -> std::process::Output {
    let admin = admin_url(server);
    harness(server, secret, json)
        .args([
            "--scenario",
            "churn",
            "--connections",
            "300",
            "--duration",
            "2s",
        ])
        .args(["--verify", "--drain", "5s", "--admin-url", &admin])
        .output()
        .unwrap()
}

fn report(json: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap()
}

#[test]
fn churn_scenario_verifies_and_reports() {
    let server = server(|_| {});
    let json = std::env::temp_dir().join(format!("lt-churn-{}.json", std::process::id()));
    let out = run(&server, SECRET, &json);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{table}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = report(&json);
    for key in [
        "connections_established",
        "deliveries",
        "deliveries_per_sec",
        "duration_s",
        "client_cpu_s",
        "fanout_latency_us",
        "handshake_latency_us",
        "errors",
        "verify",
    ] {
        assert!(report.get(key).is_some(), "missing key {key}");
    }
    for p in ["p50", "p90", "p99", "p999", "max"] {
        assert!(
            report["fanout_latency_us"][p].as_u64().is_some(),
            "fanout {p}"
        );
        assert!(
            report["handshake_latency_us"][p].as_u64().is_some(),
            "handshake {p}"
        );
    }
    assert_eq!(report["connections_established"], 300);
    assert!(report["deliveries"].as_u64().unwrap() > 300, "{report}");
    assert_eq!(report["verify"]["passed"], true);
    assert_eq!(report["verify"]["out_of_order"], 0);
    // Issue 11 item 19: gaps are counted, and attributed through the admin port (`coalesced`
    // is read from its /metrics: a number, not null). A fleet this small keeps up: it sees no
    // gap and the server coalesces nothing.
    assert_eq!(report["verify"]["seq_gaps"], 0, "{report}");
    assert_eq!(report["verify"]["coalesced"], 0, "{report}");
    // Issue 11 item 8: the fleet sends the advertised rate (churn: 500 flaps/s, here for 2 s),
    // whatever the threads. With 2 threads it used to send half: every flapper (every tenth
    // user) sat on one thread, which sent 500 / 2 per second.
    let flaps = report["flaps_sent"].as_u64().unwrap();
    assert!(
        (900..=1100).contains(&flaps),
        "flaps sent {flaps}, want about 1000"
    );
    assert_eq!(report["flaps_per_sec_target"], 500);
    // The server saw the same traffic.
    let m = server.metrics_total();
    assert!(m.deliveries >= report["deliveries"].as_u64().unwrap());
    assert_eq!(m.coalesced, 0);
    std::fs::remove_file(&json).ok();
    server.shutdown();
}

#[test]
fn verification_fails_when_the_fleet_cannot_connect() {
    let server = server(|_| {});
    let json = std::env::temp_dir().join(format!("lt-bad-{}.json", std::process::id()));
    let out = harness(&server, "not-the-server-secret-at-all", &json)
        .args(["--scenario", "churn", "--connections", "300"])
        .args(["--duration", "2s", "--verify", "--drain", "5s"])
        .env("LT_DEBUG", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "verify must fail");
    let report = report(&json);
    // LT_DEBUG names the subscriber and the user of what it counts as missing.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.lines()
            .any(|l| l.starts_with("missing: subscriber u") && l.contains(" user u")),
        "{err}"
    );
    assert_eq!(report["verify"]["passed"], false);
    assert_eq!(report["connections_established"], 0);
    assert_eq!(report["errors"]["http_401"], 300);
    std::fs::remove_file(&json).ok();
    server.shutdown();
}

/// Issue 11 item 8: workers of one fleet whose run phases end at different times. Worker 0 holds
/// every flapper (half the users flap: the even ones) and runs 1 s; worker 1 runs 4 s. Worker 0's
/// subscribers converge first; it used to close its connections then, and worker 1's subscribers,
/// still in their run phase, saw every flapper go offline after its final state and counted all
/// of those pairs as missing. Now no worker closes before every worker has verified.
#[test]
fn workers_that_finish_at_different_times_all_verify() {
    let server = server(|_| {});
    let tag = format!("fleet-{}", std::process::id());
    let json: Vec<_> = (0..2)
        .map(|i| std::env::temp_dir().join(format!("lt-fleet-{i}-{}.json", std::process::id())))
        .collect();
    let workers: Vec<_> = [("0/2", "1s"), ("1/2", "4s")]
        .iter()
        .zip(&json)
        .map(|((worker, duration), json)| {
            harness(&server, SECRET, json)
                .args(["--scenario", "churn", "--connections", "200"])
                .args(["--flap-fraction", "0.5", "--flaps-per-sec", "200"])
                .args([
                    "--worker",
                    worker,
                    "--run-tag",
                    &tag,
                    "--duration",
                    duration,
                ])
                .args(["--verify", "--drain", "3s"])
                .env("LT_DEBUG", "1")
                .spawn()
                .unwrap()
        })
        .collect();
    for (i, w) in workers.into_iter().enumerate() {
        let out = w.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "worker {i}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let merged = std::env::temp_dir().join(format!("lt-fleet-{}.json", std::process::id()));
    let out = Command::new(BIN)
        .arg("merge")
        .args(&json)
        .arg("--json")
        .arg(&merged)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let m = report(&merged);
    assert_eq!(m["workers"], 2);
    assert_eq!(m["connections_established"], 200);
    assert_eq!(m["verify"]["passed"], true, "{m}");
    assert_eq!(m["verify"]["missing"], 0);
    // 100 flappers on worker 0, flapping at the fleet's 200/s for its 1 s.
    let flaps = m["flaps_sent"].as_u64().unwrap();
    assert!(
        (180..=220).contains(&flaps),
        "flaps sent {flaps}, want about 200"
    );
    for f in json.iter().chain([&merged]) {
        std::fs::remove_file(f).ok();
    }
    server.shutdown();
}
