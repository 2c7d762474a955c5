//! Proves the harness end to end against a real server started in this process: the `churn`
//! scenario with `--verify` passes at a small size and its JSON report carries the keys tools
//! consume; and verification is no rubber stamp — a fleet that cannot authenticate fails it.

use std::process::Command;

use presenced::config::{Config, Placement};

const SECRET: &str = "loadtest-integration-secret-0123";
const BIN: &str = env!("CARGO_BIN_EXE_presenced-loadtest");

fn server() -> presenced::ServerHandle {
    let mut cfg = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        shards: 2,
        placement: Placement::Unbound,
        jwt_secret: Some(SECRET.into()),
        ..Config::default()
    };
    cfg.admin.listen = "127.0.0.1:0".parse().unwrap();
    // History is measured by the benchmarks, not here; keep the test free of a data directory.
    cfg.history.backend = presenced::config::HistoryBackend::Off;
    // The whole fleet comes from a few loopback addresses.
    cfg.limits.handshake_rate_per_ip = 0;
    let cfg = cfg.validate().unwrap();
    let verifier = presenced::auth::Verifier::new(cfg.jwt_secret.as_deref(), &cfg.auth).unwrap();
    presenced::start(cfg, verifier).unwrap()
}

fn run(
    server: &presenced::ServerHandle,
    secret: &str,
    json: &std::path::Path,
) -> std::process::Output {
    Command::new(BIN)
        .args([
            "--url",
            &format!("ws://{}/ws", server.addr),
            "--secret",
            secret,
        ])
        .args([
            "--scenario",
            "churn",
            "--connections",
            "300",
            "--duration",
            "2s",
        ])
        .args([
            "--verify",
            "--quiet",
            "--threads",
            "2",
            "--sources",
            "4",
            "--drain",
            "5s",
        ])
        .arg("--json")
        .arg(json)
        .output()
        .unwrap()
}

#[test]
fn churn_scenario_verifies_and_reports() {
    let server = server();
    let json = std::env::temp_dir().join(format!("lt-churn-{}.json", std::process::id()));
    let out = run(&server, SECRET, &json);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{table}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
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
    // The server saw the same traffic.
    let m = server.metrics_total();
    assert!(m.deliveries >= report["deliveries"].as_u64().unwrap());
    std::fs::remove_file(&json).ok();
    server.shutdown();
}

#[test]
fn verification_fails_when_the_fleet_cannot_connect() {
    let server = server();
    let json = std::env::temp_dir().join(format!("lt-bad-{}.json", std::process::id()));
    let out = run(&server, "not-the-server-secret-at-all", &json);
    assert_eq!(out.status.code(), Some(1), "verify must fail");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["verify"]["passed"], false);
    assert_eq!(report["connections_established"], 0);
    assert_eq!(report["errors"]["http_401"], 300);
    std::fs::remove_file(&json).ok();
    server.shutdown();
}
