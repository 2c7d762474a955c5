//! Issue #12's test 8: the harness with three URLs, the `churn` scenario and `--verify`, against
//! a real three-node cluster (docs/CLUSTER.md): a real `nats-server` and three `presenced serve`
//! processes on loopback. Connections go round-robin over the nodes, so nearly every watcher
//! sits on another node than the users it watches (`ring`), and verification passes only when
//! every flapping user's final state crossed the bus to every node that watches it.
//!
//! The control: the same three nodes on the same `nats-server`, each under a subject prefix of
//! its own, so they share nothing — verification must fail there. That is what shows the first
//! test checks delivery across nodes rather than passing whatever the servers do.
//!
//! In a cluster `seq` is a hybrid logical clock that rises by at least one per change: the
//! harness reads from `--admin-url` that the servers are cluster nodes, counts the jumps as seq
//! gaps and does not take them for lost events (loadtest/README.md, "Seq gaps").

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Mutex;

use common::cluster::{Nats, Node};
use common::{harness_at, SECRET};

/// Connections of the fleet: a third on each node.
const CONNECTIONS: u64 = 300;
/// Users each connection watches (the `churn` preset's `ring` of 10).
const WATCH: u64 = 10;

/// One cluster at a time: each test runs four servers and a fleet, which is plenty for a
/// two-core machine.
static SERIAL: Mutex<()> = Mutex::new(());

fn json_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("lt-cluster-{name}-{}.json", std::process::id()))
}

fn report(json: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(json)
        .unwrap_or_else(|e| panic!("the harness wrote no report {}: {e}", json.display()));
    std::fs::remove_file(json).ok();
    serde_json::from_str(&text).unwrap()
}

/// The harness's output and, on failure, what every server logged last.
fn explain(out: &Output, nats: &Nats, nodes: &[Node]) -> String {
    let mut s = format!(
        "harness exited with {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for n in nodes {
        s += &format!(
            "\n--- node {} (/readyz {:?})\n{}",
            n.id,
            n.readyz(),
            n.log_tail()
        );
    }
    s += &format!("\n--- nats-server\n{}", nats.log_tail());
    s
}

/// Three nodes on the bus at `nats`: one prefix for all (a cluster), or, with `apart`, one
/// prefix each (three clusters of one node).
fn three_nodes(nats: &Nats, apart: bool) -> Vec<Node> {
    let url = nats.url();
    ["lt-node-a", "lt-node-b", "lt-node-c"]
        .iter()
        .map(|id| Node::start(id, &url, apart.then_some(*id)))
        .collect()
}

/// The `churn` scenario with `--verify` over every node's URL, in order, reading every node's
/// admin port; small enough for a two-core machine (300 connections, 2 s of flaps at 500/s, at
/// most 5 s to drain).
fn churn(nodes: &[Node], json: &Path) -> Output {
    let urls: Vec<String> = nodes.iter().map(Node::ws_url).collect();
    let admins: Vec<String> = nodes.iter().map(Node::admin_url).collect();
    harness_at(&urls.join(","), SECRET, 4, json)
        .args(["--scenario", "churn", "--connections"])
        .arg(CONNECTIONS.to_string())
        .args(["--duration", "2s", "--verify", "--drain", "5s"])
        .args(["--admin-url", &admins.join(",")])
        // The servers take no admin token; one from the environment would be sent for nothing.
        .env_remove("PRESENCED_ADMIN_TOKEN")
        .output()
        .unwrap()
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

/// An even third of the fleet on each node, in `--url`'s order.
fn thirds(nodes: &[Node]) -> Vec<(String, u64)> {
    nodes
        .iter()
        .map(|n| (n.ws_url(), CONNECTIONS / 3))
        .collect()
}

#[test]
fn three_urls_over_one_cluster_churn_and_verify() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let nats = Nats::start();
    let mut nodes = three_nodes(&nats, false);
    for n in &mut nodes {
        n.wait_nodes(3);
    }
    let json = json_path("one-bus");
    let out = churn(&nodes, &json);
    let why = || explain(&out, &nats, &nodes);
    assert!(out.status.success(), "{}", why());
    let r = report(&json);
    assert_eq!(r["connections_established"], CONNECTIONS, "{r}");
    assert_eq!(by_url(&r), thirds(&nodes), "{r}");
    let v = &r["verify"];
    assert_eq!(v["passed"], true, "{r}\n{}", why());
    assert_eq!(v["missing"], 0, "{r}");
    assert_eq!(v["out_of_order"], 0, "{r}");
    assert_eq!(v["checked"], CONNECTIONS * WATCH, "{r}");
    // The harness read from the admin ports that these are cluster nodes; their seq is a hybrid
    // logical clock, so the live events jumped, and the jumps were not taken for losses.
    assert_eq!(v["cluster"], true, "{r}");
    assert!(v["seq_gaps"].as_u64().unwrap() > 0, "{r}");
    let table = String::from_utf8_lossy(&out.stdout);
    for line in ["connections by --url", "verify                  PASSED"] {
        assert!(table.contains(line), "no {line:?} in:\n{}", why());
    }
    // The changes crossed the bus: every node applied contributions of the others.
    for n in &nodes {
        assert!(
            n.metric("presenced_cluster_deltas_in_total") > 0,
            "node {} heard nothing: {}",
            n.id,
            why()
        );
    }
}

/// The control: the same three nodes and `nats-server`, but each under its own subject prefix,
/// so none hears the others. Each serves its third of the fleet, and verification fails: the
/// flappers' finals never reach the watchers on the other nodes.
#[test]
fn three_urls_over_unlinked_nodes_fail_verify() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let nats = Nats::start();
    let mut nodes = three_nodes(&nats, true);
    // Connected, and alone: past a lease, each still sees only itself.
    std::thread::sleep(std::time::Duration::from_millis(
        common::cluster::LEASE_MS + 500,
    ));
    for n in &mut nodes {
        n.wait_nodes(1);
    }
    let json = json_path("apart");
    let out = churn(&nodes, &json);
    let why = || explain(&out, &nats, &nodes);
    assert_eq!(out.status.code(), Some(1), "{}", why());
    let r = report(&json);
    assert_eq!(r["connections_established"], CONNECTIONS, "{r}");
    assert_eq!(by_url(&r), thirds(&nodes), "{r}");
    let v = &r["verify"];
    assert_eq!(v["passed"], false, "{r}");
    assert!(v["missing"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(v["cluster"], true, "{r}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("verify                  FAILED"),
        "{}",
        why()
    );
    for n in &nodes {
        assert_eq!(n.metric("presenced_cluster_deltas_in_total"), 0, "{}", n.id);
        assert_eq!(n.metric("presenced_cluster_nodes"), 1, "{}", n.id);
    }
}
