//! `wss://` targets: the fleet over TLS to a real server with a certificate made at test time
//! (rcgen), trusting only `--ca-file`; the churn scenario verifies over it, side by side with a
//! plain URL of the same server. A certificate the fleet does not trust fails every
//! connection with a counted `tls` error, and a `wss://` URL without `--ca-file` is refused.

mod common;

use std::path::Path;

use common::cluster::TempDir;
use common::{assert_refused, explain, harness_at, read_report, ws_url, SECRET};

/// A self-signed certificate for localhost and 127.0.0.1 in `dir`: cert.pem, key.pem.
fn certificate(dir: &Path, name: &str) {
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    std::fs::write(dir.join(format!("{name}.pem")), ck.cert.pem()).unwrap();
    std::fs::write(
        dir.join(format!("{name}-key.pem")),
        ck.signing_key.serialize_pem(),
    )
    .unwrap();
}

#[test]
fn the_fleet_churns_and_verifies_over_tls_beside_plain() {
    let dir = TempDir::new("tls");
    certificate(dir.path(), "server");
    certificate(dir.path(), "stranger");
    let server = common::server(|c| {
        c.tls.cert = Some(dir.path().join("server.pem"));
        c.tls.key = Some(dir.path().join("server-key.pem"));
        c.tls.listen = Some("127.0.0.1:0".parse().unwrap());
        c.limits.ops_per_second = 0;
    });
    let tls = server.tls_addr.expect("a TLS listener");
    let wss = format!("wss://localhost:{}/ws", tls.port());
    let json = dir.path().join("r.json");
    // Half the fleet over TLS, half plain: watchers (ring) watch users on the other listener.
    let out = harness_at(&format!("{wss},{}", ws_url(&server)), SECRET, 4, &json)
        .arg("--ca-file")
        .arg(dir.path().join("server.pem"))
        .args([
            "--scenario",
            "churn",
            "--connections",
            "200",
            "--watch",
            "5",
        ])
        .args(["--duration", "2s", "--verify"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", explain(&out));
    let r = read_report(&json);
    assert_eq!(r["connections_established"], 200, "{r}");
    assert_eq!(r["urls"][0]["url"], wss.as_str());
    assert_eq!(r["urls"][0]["connections"], 100, "{r}");
    assert_eq!(r["verify"]["passed"], true, "{r}");
    assert_eq!(r["errors"], serde_json::json!({}), "{r}");

    // The server's certificate is not the one the fleet trusts: every handshake fails, counted.
    let out = harness_at(&wss, SECRET, 4, &json)
        .arg("--ca-file")
        .arg(dir.path().join("stranger.pem"))
        .args([
            "--scenario",
            "idle",
            "--connections",
            "20",
            "--duration",
            "1s",
        ])
        .output()
        .unwrap();
    let r = read_report(&json);
    assert_eq!(r["connections_established"], 0, "{}", explain(&out));
    assert!(r["errors"]["tls"].as_u64().unwrap_or(0) >= 20, "{r}");

    // A wss:// URL and nothing to trust: a usage error before any connection.
    let out = harness_at(&wss, SECRET, 4, &json)
        .args(["--scenario", "idle", "--connections", "20"])
        .output()
        .unwrap();
    assert_refused(&out, &["needs --ca-file"]);
}
