//! Proves `--url` with several URLs end to end: connections are spread over them round-robin,
//! and `--verify` checks delivery across them — it passes when the URLs reach one server, and
//! fails when they reach two servers that do not share presence, since a watcher on one never
//! hears the final state of a user on the other.

mod common;

use std::path::PathBuf;

use common::{admin_url, harness_at, server, ws_url, SECRET};

fn json_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("lt-{name}-{}.json", std::process::id()))
}

fn report(json: &std::path::Path) -> serde_json::Value {
    let text = std::fs::read_to_string(json).unwrap();
    std::fs::remove_file(json).ok();
    serde_json::from_str(&text).unwrap()
}

fn explain(out: &std::process::Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `connections` of each `urls` entry of a report, in order.
fn by_url(report: &serde_json::Value) -> Vec<(String, u64)> {
    report["urls"]
        .as_array()
        .unwrap_or_else(|| panic!("no urls in {report}"))
        .iter()
        .map(|u| {
            (
                u["url"].as_str().unwrap().to_owned(),
                u["connections"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The `churn` scenario, 300 connections for 2 s, with `--verify` against `urls`.
fn churn(urls: &str, admin: &str, json: &std::path::Path) -> std::process::Output {
    harness_at(urls, SECRET, 4, json)
        .args(["--scenario", "churn", "--connections", "300"])
        .args(["--duration", "2s", "--verify", "--drain", "3s"])
        .args(["--admin-url", admin])
        .output()
        .unwrap()
}

/// Two spellings of one server's address (a name and its literal): half the fleet on each, and
/// every watcher converges whichever URL it and its watched users came through.
#[test]
fn two_urls_of_one_server_share_the_fleet_and_verify() {
    let server = server(|_| {});
    let port = server.addr.port();
    let (a, b) = (
        format!("ws://127.0.0.1:{port}/ws"),
        format!("ws://localhost:{port}/ws"),
    );
    let json = json_path("two-urls");
    let out = churn(&format!("{a},{b}"), &admin_url(&server), &json);
    assert!(out.status.success(), "{}", explain(&out));
    let r = report(&json);
    assert_eq!(r["connections_established"], 300);
    assert_eq!(by_url(&r), vec![(a, 150), (b, 150)]);
    assert_eq!(r["verify"]["passed"], true, "{r}");
    assert_eq!(r["verify"]["missing"], 0);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("connections by --url"),
        "{}",
        explain(&out)
    );
    assert_eq!(server.metrics_total().handshakes_ok, 300);
    server.shutdown();
}

/// Two servers that know nothing of each other: each serves half the fleet, and verification
/// fails — the flappers' finals never cross from one to the other. Their admin ports, both
/// given, are read and added up.
#[test]
fn two_unlinked_servers_fail_verification() {
    let (one, two) = (server(|_| {}), server(|_| {}));
    let urls = format!("{},{}", ws_url(&one), ws_url(&two));
    let admins = format!("{},{}", admin_url(&one), admin_url(&two));
    let json = json_path("unlinked");
    let out = churn(&urls, &admins, &json);
    assert_eq!(out.status.code(), Some(1), "{}", explain(&out));
    let r = report(&json);
    assert_eq!(r["connections_established"], 300);
    assert_eq!(by_url(&r), vec![(ws_url(&one), 150), (ws_url(&two), 150)]);
    assert_eq!(one.metrics_total().handshakes_ok, 150);
    assert_eq!(two.metrics_total().handshakes_ok, 150);
    assert_eq!(r["verify"]["passed"], false);
    assert!(r["verify"]["missing"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["verify"]["coalesced"], 0, "both admin ports read: {r}");
    one.shutdown();
    two.shutdown();
}

/// Every URL of the list is checked: a bad or non-loopback one is a usage error (exit 2).
#[test]
fn every_url_in_the_list_is_checked() {
    let server = server(|_| {});
    let good = ws_url(&server);
    for (urls, says) in [
        (format!("{good},"), "empty URL"),
        (format!("{good},http://127.0.0.1:1/ws"), "only ws://"),
        (format!("{good},ws://192.0.2.1:80/ws"), "--allow-remote"),
    ] {
        let json = json_path("bad-url");
        let out = harness_at(&urls, SECRET, 1, &json)
            .args(["--connections", "2", "--duration", "1s"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{urls}: {}", explain(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(says),
            "{urls}: {}",
            explain(&out)
        );
    }
    server.shutdown();
}
