//! `--server-bin A --compare-bin B`: the same scenario against two server builds, back to back,
//! and the ratios B / A.
//!
//! For each round the harness starts build A, runs itself as a child with the same scenario
//! flags plus `--server-pid` (so the child reads the server's CPU and memory from `/proc` over
//! exactly its phases), stops the server, and does the same for B; rounds alternate the order
//! (A B, B A, …) so a drift of the machine's load falls on both. Every server start gets an empty
//! scratch directory, given to it as `{dir}` in `--server-args` (a history store, a socket). The
//! table shows each build's median over the rounds and B / A. The machine is shared and noisy:
//! compare within one such run, never across runs.
//!
//! Argument handling is pure and tested here; the rest is process plumbing.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::report::Report;

/// Flags of the parent only, with a value: removed from the child's arguments.
const PARENT_ONLY: [&str; 6] = [
    "--server-bin",
    "--compare-bin",
    "--server-args",
    "--rounds",
    "--json",
    "--compare-dir",
];

/// Most rounds (a bound, like every other input).
pub const MAX_ROUNDS: u32 = 20;

/// How long a server may take to listen, and to exit on SIGTERM.
const START_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// What a comparison was asked for.
pub struct Plan {
    pub a: PathBuf,
    pub b: PathBuf,
    /// `serve` and its flags, whitespace-separated; `{dir}` is the start's scratch directory.
    pub server_args: String,
    pub rounds: u32,
    /// Where scratch directories, server logs and the child reports go.
    pub dir: PathBuf,
    /// Where the server listens (the first `--url`): waited for after each start.
    pub listen: SocketAddr,
    pub json: Option<PathBuf>,
    pub quiet: bool,
}

/// The child harness's arguments: the parent's (without the program name) less the flags only
/// the parent reads, in either spelling (`--flag value` or `--flag=value`).
pub fn child_args(argv: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(argv.len());
    let mut skip_value = false;
    for a in argv {
        if skip_value {
            skip_value = false;
            continue;
        }
        if PARENT_ONLY.contains(&a.as_str()) {
            skip_value = true;
            continue;
        }
        if PARENT_ONLY
            .iter()
            .any(|f| a.strip_prefix(f).is_some_and(|r| r.starts_with('=')))
        {
            continue;
        }
        out.push(a.clone());
    }
    out
}

/// A server's command line from `--server-args`: split on whitespace (no quoting), `{dir}`
/// replaced by the start's scratch directory.
pub fn server_argv(server_args: &str, dir: &Path) -> Result<Vec<String>, String> {
    let dir = dir.to_str().ok_or("--compare-dir: not UTF-8")?;
    let argv: Vec<String> = server_args
        .split_whitespace()
        .map(|a| a.replace("{dir}", dir))
        .collect();
    if argv.is_empty() {
        return Err("--server-args: empty (e.g. `serve --config bench.toml`)".into());
    }
    Ok(argv)
}

/// The order of the builds in round `r` (0-based): A B, then B A, and so on.
pub fn order(round: u32) -> [Build; 2] {
    if round.is_multiple_of(2) {
        [Build::A, Build::B]
    } else {
        [Build::B, Build::A]
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Build {
    A,
    B,
}

impl Build {
    fn label(self) -> &'static str {
        match self {
            Build::A => "a",
            Build::B => "b",
        }
    }
}

/// The median of some values (the mean of the middle two for an even count); 0 for none.
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The figures compared, read from a report: (name, unit, value). A figure the report lacks
/// (no `server` section) is absent.
pub fn figures(r: &Report) -> Vec<(&'static str, &'static str, f64)> {
    let mut f = vec![
        ("deliveries/s, run and drain", "/s", r.deliveries_per_sec),
        ("fan-out latency p50", "µs", r.fanout_latency_us.p50 as f64),
        ("fan-out latency p99", "µs", r.fanout_latency_us.p99 as f64),
        (
            "fan-out latency p99.9",
            "µs",
            r.fanout_latency_us.p999 as f64,
        ),
        ("handshakes per second", "/s", r.handshakes_per_sec),
    ];
    if let Some(s) = &r.server {
        f.extend([
            ("deliveries/s, run phase", "/s", s.run_deliveries_per_sec),
            ("server CPU per delivery", "µs", s.cpu_us_per_delivery),
            ("  user", "µs", s.user_us_per_delivery),
            ("  kernel", "µs", s.kernel_us_per_delivery),
            ("server CPU, share of a core", "%", s.cpu_percent_of_core),
            (
                "RSS per connection, run start",
                "B",
                s.rss_per_connection_bytes,
            ),
            (
                "RSS per connection, run end",
                "B",
                s.rss_per_connection_end_bytes,
            ),
            (
                "ramp CPU per connection",
                "µs",
                s.ramp_cpu_us_per_connection,
            ),
            (
                "connections per CPU-second",
                "/s",
                s.connections_per_cpu_second,
            ),
        ]);
    }
    f
}

/// One row of the comparison.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Row {
    pub figure: String,
    pub unit: String,
    pub a: f64,
    pub b: f64,
    /// b / a; absent when a is 0.
    pub ratio: Option<f64>,
}

/// The rows: each figure's median over the rounds of A and of B, and B / A.
pub fn rows(a: &[Report], b: &[Report]) -> Vec<Row> {
    let collect = |rs: &[Report]| {
        let mut m: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
        for r in rs {
            for (name, _, v) in figures(r) {
                m.entry(name).or_default().push(v);
            }
        }
        m
    };
    let (ma, mb) = (collect(a), collect(b));
    let Some(first) = a.first().or(b.first()) else {
        return Vec::new();
    };
    figures(first)
        .into_iter()
        .filter_map(|(name, unit, _)| {
            let va = median(ma.get(name)?);
            let vb = median(mb.get(name)?);
            Some(Row {
                figure: name.into(),
                unit: unit.into(),
                a: va,
                b: vb,
                ratio: (va != 0.0).then(|| vb / va),
            })
        })
        .collect()
}

/// The human table.
pub fn table(plan: &Plan, rows: &[Row]) -> String {
    let mut t = format!(
        "\ncomparison, median of {} round(s) each\n  a = {}\n  b = {}\n\n  {:<30} {:>14} {:>14} {:>8}\n",
        plan.rounds,
        plan.a.display(),
        plan.b.display(),
        "",
        "a",
        "b",
        "b / a"
    );
    for r in rows {
        let ratio = r.ratio.map_or("-".into(), |x| format!("{x:.2}"));
        t += &format!(
            "  {:<30} {:>11.2} {:<2} {:>11.2} {:<2} {:>8}\n",
            r.figure, r.a, r.unit, r.b, r.unit, ratio
        );
    }
    t
}

#[derive(Serialize)]
struct Out<'a> {
    a: &'a Path,
    b: &'a Path,
    server_args: &'a str,
    rounds: u32,
    rows: &'a [Row],
    reports_a: &'a [Report],
    reports_b: &'a [Report],
}

/// Runs the comparison. `argv` is this process's arguments without the program name.
pub fn run(plan: &Plan, argv: &[String]) -> Result<std::process::ExitCode, String> {
    if !(1..=MAX_ROUNDS).contains(&plan.rounds) {
        return Err(format!("--rounds: 1 to {MAX_ROUNDS}"));
    }
    for bin in [&plan.a, &plan.b] {
        if !bin.is_file() {
            return Err(format!("{}: no such server binary", bin.display()));
        }
    }
    std::fs::create_dir_all(&plan.dir).map_err(|e| format!("{}: {e}", plan.dir.display()))?;
    let me = std::env::current_exe().map_err(|e| format!("this harness's path: {e}"))?;
    let child = child_args(argv);
    let (mut ra, mut rb) = (Vec::new(), Vec::new());
    let mut failed_verify = false;
    for round in 0..plan.rounds {
        for build in order(round) {
            let bin = if build == Build::A { &plan.a } else { &plan.b };
            let tag = format!("{}-{}", build.label(), round + 1);
            let scratch = plan.dir.join(&tag);
            let _ = std::fs::remove_dir_all(&scratch);
            std::fs::create_dir_all(&scratch).map_err(|e| format!("{}: {e}", scratch.display()))?;
            let report_path = plan.dir.join(format!("{tag}.json"));
            let _ = std::fs::remove_file(&report_path);
            let log = plan.dir.join(format!("{tag}-harness.log"));
            // Everything that can fail before the server runs, so no error leaves one behind.
            let (out, err) = (file(&log)?, file(&log.with_extension("err"))?);
            let argv = server_argv(&plan.server_args, &scratch)?;
            let mut server = start(bin, &argv, plan, &tag)?;
            if !plan.quiet {
                eprintln!(
                    "compare: round {} of {}, {} ({}), pid {}",
                    round + 1,
                    plan.rounds,
                    build.label(),
                    bin.display(),
                    server.id()
                );
            }
            let status = Command::new(&me)
                .args(&child)
                .arg("--server-pid")
                .arg(server.id().to_string())
                .arg("--json")
                .arg(&report_path)
                .stdout(out)
                .stderr(err)
                .status();
            // Reaped already when it exited by itself: only a running server is stopped.
            let exited = server.try_wait().ok().flatten();
            if exited.is_none() {
                stop(&mut server);
            }
            let status = status.map_err(|e| format!("{}: {e}", me.display()))?;
            if let Some(s) = exited {
                return Err(format!(
                    "{tag}: the server exited during the run ({s}); see {}",
                    plan.dir.join(format!("{tag}-server.log")).display()
                ));
            }
            match status.code() {
                Some(0) => {}
                Some(1) => failed_verify = true,
                _ => {
                    return Err(format!(
                        "{tag}: the harness failed ({status}); see {}",
                        log.with_extension("err").display()
                    ))
                }
            }
            let text = std::fs::read_to_string(&report_path)
                .map_err(|e| format!("{}: {e}", report_path.display()))?;
            let report: Report = serde_json::from_str(&text)
                .map_err(|e| format!("{}: {e}", report_path.display()))?;
            // A run whose server could not be read would drop out of the medians unseen.
            if report.server.is_none() {
                return Err(format!(
                    "{tag}: the harness could not read the server's /proc; see {}",
                    log.with_extension("err").display()
                ));
            }
            if build == Build::A {
                ra.push(report);
            } else {
                rb.push(report);
            }
        }
    }
    let rows = rows(&ra, &rb);
    print!("{}", table(plan, &rows));
    if failed_verify {
        println!(
            "\n  verify FAILED in at least one run: see the reports in {}",
            plan.dir.display()
        );
    }
    if let Some(p) = &plan.json {
        let out = Out {
            a: &plan.a,
            b: &plan.b,
            server_args: &plan.server_args,
            rounds: plan.rounds,
            rows: &rows,
            reports_a: &ra,
            reports_b: &rb,
        };
        let text = serde_json::to_string_pretty(&out).map_err(|e| e.to_string())?;
        std::fs::write(p, text).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    Ok(if failed_verify {
        std::process::ExitCode::from(1)
    } else {
        std::process::ExitCode::SUCCESS
    })
}

fn file(p: &Path) -> Result<std::fs::File, String> {
    std::fs::File::create(p).map_err(|e| format!("{}: {e}", p.display()))
}

/// Starts a server and waits until it listens.
fn start(bin: &Path, argv: &[String], plan: &Plan, tag: &str) -> Result<Child, String> {
    let log = plan.dir.join(format!("{tag}-server.log"));
    // One open file for both streams, so neither overwrites the other.
    let out = file(&log)?;
    let err = out
        .try_clone()
        .map_err(|e| format!("{}: {e}", log.display()))?;
    let mut child = Command::new(bin)
        .args(argv)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Err(format!(
                "{}: exited at start ({s}); see {}",
                bin.display(),
                log.display()
            ));
        }
        if TcpStream::connect_timeout(&plan.listen, Duration::from_millis(200)).is_ok() {
            return Ok(child);
        }
        if Instant::now() > deadline {
            stop(&mut child);
            return Err(format!(
                "{}: not listening on {} after {:?}; see {}",
                bin.display(),
                plan.listen,
                START_TIMEOUT,
                log.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGTERM, then SIGKILL past the stop timeout.
fn stop(child: &mut Child) {
    // SAFETY: kill sends a signal to our own child, which we have not reaped yet.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + STOP_TIMEOUT;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn the_child_gets_every_flag_but_the_parents() {
        let argv = s(&[
            "--server-bin",
            "old/presenced",
            "--connections",
            "4000",
            "--compare-bin=new/presenced",
            "--server-args",
            "serve --config x.toml",
            "--rounds=3",
            "--json",
            "out.json",
            "--compare-dir",
            "/tmp/c",
            "--verify",
            "--server-argsX",
        ]);
        assert_eq!(
            child_args(&argv),
            s(&["--connections", "4000", "--verify", "--server-argsX"])
        );
    }

    #[test]
    fn server_args_are_split_and_dir_is_filled_in() {
        let argv = server_argv(
            "serve  --config b.toml --data-dir {dir}/data",
            Path::new("/tmp/c/a-1"),
        )
        .unwrap();
        assert_eq!(
            argv,
            s(&[
                "serve",
                "--config",
                "b.toml",
                "--data-dir",
                "/tmp/c/a-1/data"
            ])
        );
        assert!(server_argv("  ", Path::new("/x")).is_err());
    }

    #[test]
    fn rounds_alternate_the_order() {
        assert_eq!(order(0), [Build::A, Build::B]);
        assert_eq!(order(1), [Build::B, Build::A]);
        assert_eq!(order(2), [Build::A, Build::B]);
    }

    #[test]
    fn the_median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
        assert_eq!(median(&[f64::NAN, 5.0]), 5.0);
    }

    fn report(deliveries_per_sec: f64, cpu: Option<f64>) -> Report {
        let stats = crate::report::Stats::default();
        let mut r = Report::new("churn", &stats, 1.0, 1.0, false, None);
        r.deliveries_per_sec = deliveries_per_sec;
        r.server = cpu.map(|c| crate::procstat::ServerCost {
            cpu_us_per_delivery: c,
            ..Default::default()
        });
        r
    }

    #[test]
    fn rows_are_medians_and_ratios_b_over_a() {
        let a = [
            report(100.0, Some(10.0)),
            report(300.0, Some(30.0)),
            report(200.0, Some(20.0)),
        ];
        let b = [
            report(100.0, Some(5.0)),
            report(100.0, Some(5.0)),
            report(100.0, Some(4.0)),
        ];
        let got = rows(&a, &b);
        let get = |n: &str| got.iter().find(|r| r.figure == n).unwrap().clone();
        let d = get("deliveries/s, run and drain");
        assert_eq!((d.a, d.b, d.ratio), (200.0, 100.0, Some(0.5)));
        let c = get("server CPU per delivery");
        assert_eq!((c.a, c.b, c.ratio), (20.0, 5.0, Some(0.25)));
        // A figure that is 0 for a has no ratio.
        assert_eq!(get("handshakes per second").ratio, None);
        // Without server sections there are no server rows.
        let plain = rows(&[report(1.0, None)], &[report(2.0, None)]);
        assert!(plain.iter().all(|r| !r.figure.contains("CPU")));
    }
}
