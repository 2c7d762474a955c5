//! The harness's server-cost figures (`--server-pid`) and its side-by-side comparison of two
//! builds (`--server-bin` / `--compare-bin`), against real servers over real sockets: the
//! in-process server of `common::server` (its pid is this test's), and `presenced serve`
//! processes the comparison starts itself.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Mutex;

use common::cluster::{free_port, presenced_bin, TempDir};
use common::{assert_refused, explain, harness, read_report, BIN, SECRET};

/// One fleet at a time: two cores.
static SERIAL: Mutex<()> = Mutex::new(());

#[test]
fn server_pid_reports_the_servers_cpu_per_delivery_and_memory_per_connection() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let server = common::server(|c| c.limits.ops_per_second = 0);
    let dir = TempDir::new("cost-pid");
    let json = dir.path().join("r.json");
    // The server runs in this process: its pid is ours.
    let out = harness(&server, SECRET, 4, &json)
        .args([
            "--scenario",
            "churn",
            "--connections",
            "300",
            "--watch",
            "5",
        ])
        .args(["--flaps-per-sec", "1000", "--duration", "2s", "--verify"])
        .arg("--server-pid")
        .arg(std::process::id().to_string())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", explain(&out));
    let r = read_report(&json);
    let s = &r["server"];
    assert_eq!(s["pids"], serde_json::json!([std::process::id()]), "{r}");
    let run_deliveries = s["run_deliveries"].as_u64().unwrap();
    // 1,000 flaps/s to 5 watchers each over 2 s: thousands, counted over the run phase only
    // (the finals after it are in `deliveries`, not here).
    assert!(run_deliveries > 1_000, "{s}");
    assert!(run_deliveries < r["deliveries"].as_u64().unwrap(), "{s}");
    let cpu = s["cpu_us_per_delivery"].as_f64().unwrap();
    let (user, kernel) = (
        s["user_us_per_delivery"].as_f64().unwrap(),
        s["kernel_us_per_delivery"].as_f64().unwrap(),
    );
    assert!(
        cpu > 0.0,
        "thousands of deliveries cost the server some CPU: {s}"
    );
    assert!((cpu - user - kernel).abs() < 1e-6, "{s}");
    assert!(s["rss_per_connection_bytes"].as_f64().unwrap() > 0.0, "{s}");
    assert!(
        s["connections_per_cpu_second"].as_f64().unwrap() > 0.0,
        "{s}"
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("CPU per delivery"), "{table}");
}

#[test]
fn a_server_pid_that_cannot_be_read_is_refused() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("cost-nopid");
    let out = Command::new(BIN)
        .args([
            "--url",
            "ws://127.0.0.1:9/ws",
            "--secret",
            SECRET,
            "--quiet",
        ])
        .args(["--server-pid", "4000000000"])
        .arg("--json")
        .arg(dir.path().join("r.json"))
        .output()
        .unwrap();
    assert_refused(&out, &["--server-pid 4000000000"]);
}

/// The comparison's flags for `presenced serve` on `port`, with `config`.
fn compare(config: &Path, port: u16, dir: &Path, a: &Path, b: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.args([
        "--secret",
        SECRET,
        "--quiet",
        "--threads",
        "2",
        "--sources",
        "4",
    ])
    .arg("--url")
    .arg(format!("ws://127.0.0.1:{port}/ws"))
    .arg("--server-bin")
    .arg(a)
    .arg("--compare-bin")
    .arg(b)
    .arg("--server-args")
    .arg(format!(
        "serve --config {} --listen 127.0.0.1:{port} --shards 2 --placement unbound \
             --no-admin --data-dir {{dir}}",
        config.display()
    ))
    .arg("--compare-dir")
    .arg(dir.join("runs"))
    .arg("--json")
    .arg(dir.join("compare.json"));
    c
}

fn config(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("server.toml");
    std::fs::write(
        &p,
        format!(
            "jwt_secret = \"{SECRET}\"\n[limits]\nhandshake_rate_per_ip = 0\nops_per_second = 0\n"
        ),
    )
    .unwrap();
    p
}

#[test]
fn compare_bin_runs_both_builds_alternating_and_prints_ratios() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("cost-compare");
    // Two builds the test can tell apart: wrappers that note their pid (kept by `exec`) and
    // run the server.
    let bin = presenced_bin();
    let wrapper = |name: &str| {
        let path = dir.path().join(name);
        let script = format!(
            "#!/bin/sh\necho $$ >> {}.pids\nexec {} \"$@\"\n",
            path.display(),
            bin.display()
        );
        std::fs::write(&path, script).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    };
    let (a, b) = (wrapper("build-a"), wrapper("build-b"));
    let out = compare(&config(dir.path()), free_port(), dir.path(), &a, &b)
        .args([
            "--rounds",
            "2",
            "--scenario",
            "churn",
            "--connections",
            "200",
        ])
        .args([
            "--watch",
            "5",
            "--flaps-per-sec",
            "500",
            "--duration",
            "2s",
            "--verify",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", explain(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("b / a") && table.contains("server CPU per delivery"),
        "{table}"
    );
    let r = read_report(&dir.path().join("compare.json"));
    assert_eq!(r["rounds"], 2);
    // Each build ran twice, each time as a new process whose pid the child harness read, and
    // with a history store in its own scratch directory (`{dir}`).
    for (side, build) in [("reports_a", "build-a"), ("reports_b", "build-b")] {
        let reports = r[side].as_array().unwrap();
        assert_eq!(reports.len(), 2, "{side}");
        let mut pids = Vec::new();
        for rep in reports {
            assert_eq!(rep["verify"]["passed"], true, "{rep}");
            let s = &rep["server"];
            assert!(s["cpu_us_per_delivery"].as_f64().unwrap() > 0.0, "{s}");
            pids.push(s["pids"][0].as_u64().unwrap());
        }
        // The reports filed under a build are of the processes that build started.
        let started = std::fs::read_to_string(dir.path().join(format!("{build}.pids"))).unwrap();
        let mut started: Vec<u64> = started.lines().map(|l| l.parse().unwrap()).collect();
        pids.sort_unstable();
        started.sort_unstable();
        assert_eq!(pids, started, "{side}");
    }
    for run in ["a-1", "b-1", "b-2", "a-2"] {
        let store = dir.path().join("runs").join(run).join("history.redb");
        assert!(store.is_file(), "{} has no history store", run);
    }
    // Rows: medians and b / a. The same build at the same flap rate delivers at the same rate.
    let rows = r["rows"].as_array().unwrap();
    let row = |name: &str| {
        rows.iter()
            .find(|x| x["figure"] == name)
            .unwrap_or_else(|| panic!("no row {name}: {r}"))
    };
    let rate = row("deliveries/s, run phase");
    let ratio = rate["ratio"].as_f64().unwrap();
    assert!((0.8..1.25).contains(&ratio), "{rate}");
    assert!(row("server CPU per delivery")["a"].as_f64().unwrap() > 0.0);
}

#[test]
fn compare_bin_says_which_server_would_not_start() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("cost-compare-bad");
    let bin = presenced_bin();
    // A binary that is not there.
    let missing = dir.path().join("no-such-presenced");
    let out = compare(&config(dir.path()), free_port(), dir.path(), &bin, &missing)
        .output()
        .unwrap();
    assert_refused(&out, &["no such server binary"]);
    // A server that exits at start (its config does not exist).
    let out = compare(
        &dir.path().join("nope.toml"),
        free_port(),
        dir.path(),
        &bin,
        &bin,
    )
    .output()
    .unwrap();
    assert_refused(&out, &["exited at start", "a-1-server.log"]);
}
