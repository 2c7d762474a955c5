//! What the harness's integration tests share: a real server started in this process, and the
//! harness binary pointed at it; and, in [`cluster`], a real cluster of `presenced serve`
//! processes over a real `nats-server`.
// Each test binary uses a subset of these.
#![allow(dead_code)]

pub mod cluster;

use std::path::Path;
use std::process::Command;

use presenced::config::{Config, HistoryBackend, Placement};

pub const SECRET: &str = "loadtest-integration-secret-0123";
pub const BIN: &str = env!("CARGO_BIN_EXE_presenced-loadtest");

/// A server with 2 unpinned shards on 127.0.0.1:0 and its admin port on, with what `tweak`
/// changes.
pub fn server(tweak: impl FnOnce(&mut Config)) -> presenced::ServerHandle {
    let mut cfg = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        shards: 2,
        placement: Placement::Unbound,
        jwt_secret: Some(SECRET.into()),
        ..Config::default()
    };
    cfg.admin.listen = "127.0.0.1:0".parse().unwrap();
    // History is measured by the benchmarks, not here; keep the tests free of a data directory.
    cfg.history.backend = HistoryBackend::Off;
    // The whole fleet comes from a few loopback addresses.
    cfg.limits.handshake_rate_per_ip = 0;
    tweak(&mut cfg);
    let cfg = cfg.validate().unwrap();
    let verifier = presenced::auth::Verifier::new(cfg.jwt_secret.as_deref(), &cfg.auth).unwrap();
    presenced::start(cfg, verifier).unwrap()
}

/// The `--admin-url` of `server`.
pub fn admin_url(server: &presenced::ServerHandle) -> String {
    format!(
        "http://{}",
        server.admin_addr.expect("the admin port is on")
    )
}

/// The `--url` of `server`.
pub fn ws_url(server: &presenced::ServerHandle) -> String {
    format!("ws://{}/ws", server.addr)
}

/// The harness against `server` with the flags every test shares: quiet, 2 threads, connections
/// spread over `sources` loopback addresses, the JSON report written to `json`.
pub fn harness(
    server: &presenced::ServerHandle,
    secret: &str,
    sources: usize,
    json: &Path,
) -> Command {
    harness_at(&ws_url(server), secret, sources, json)
}

/// [`harness`] against `--url urls` (one URL or several, comma-separated).
pub fn harness_at(urls: &str, secret: &str, sources: usize, json: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.args(["--url", urls, "--secret", secret])
        .args([
            "--quiet",
            "--threads",
            "2",
            "--sources",
            &sources.to_string(),
        ])
        .arg("--json")
        .arg(json);
    c
}

/// A harness run's exit status and output, for an assertion's message.
pub fn explain(out: &std::process::Output) -> String {
    format!(
        "harness exited with {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The JSON report at `path` (panics, naming it, when the harness wrote none).
pub fn read_report(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("the harness wrote no report {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// A harness run refused as a usage error (exit 2), saying each of `says` on stderr.
pub fn assert_refused(out: &std::process::Output, says: &[&str]) {
    assert_eq!(out.status.code(), Some(2), "{}", explain(out));
    let err = String::from_utf8_lossy(&out.stderr);
    for s in says {
        assert!(err.contains(s), "no {s:?} in: {}", explain(out));
    }
}
