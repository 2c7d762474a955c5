//! `presenced-loadtest`: drives a real presenced with a fleet of real WebSocket clients and
//! measures it. See loadtest/README.md.

mod barrier;
mod client;
mod compare;
mod plan;
mod procstat;
mod report;
mod run;
mod scenario;
mod scrape;
mod subchurn;
mod target;
mod tls;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};

use plan::Pattern;
use report::{Report, Stats};
use run::Shared;
use scenario::{Mode, Scenario};

#[derive(Parser)]
#[command(
    name = "presenced-loadtest",
    version,
    args_conflicts_with_subcommands = true
)]
#[command(about = "Drive a presenced server with a fleet of real WebSocket clients")]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// Merge the JSON reports of several workers into one fleet report.
    Merge {
        reports: Vec<PathBuf>,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Print one value of a JSON report, e.g. `get r.json fanout_latency_us.p99` (for scripts).
    Get { report: PathBuf, path: String },
}

#[derive(Args)]
struct RunArgs {
    /// Server WebSocket URL, or several comma-separated (e.g. the nodes of a cluster):
    /// connection n goes to URL n mod count, so watchers and watched land on different URLs and
    /// --verify checks delivery across them. Loopback only unless --allow-remote.
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    url: String,
    /// HS256 secret the server was started with.
    #[arg(
        long,
        env = "PRESENCED_JWT_SECRET",
        hide_env_values = true,
        default_value = ""
    )]
    secret: String,
    /// A preset (idle, churn, fanout, storm, subchurn) or a TOML scenario file; flags override
    /// it.
    #[arg(long, default_value = "churn")]
    scenario: String,
    /// Connections in the whole fleet (all workers).
    #[arg(long)]
    connections: Option<usize>,
    /// New connections per second for the whole fleet (0 = as fast as possible).
    #[arg(long)]
    rate: Option<u64>,
    /// Users each connection watches.
    #[arg(long)]
    watch: Option<usize>,
    #[arg(long, value_enum)]
    pattern: Option<Pattern>,
    /// Groups (user i joins g{i % groups} and subscribes to it); 0 for none.
    #[arg(long)]
    groups: Option<usize>,
    /// Fraction of users that flap.
    #[arg(long)]
    flap_fraction: Option<f64>,
    /// Status changes per second for the whole fleet.
    #[arg(long)]
    flaps_per_sec: Option<u64>,
    /// subchurn: subscribe/unsubscribe ops per second, per connection.
    #[arg(long)]
    churn_ops_per_sec: Option<u64>,
    /// subchurn: ids per op (the `--watch` ids are cycled through in batches this big).
    #[arg(long)]
    churn_batch: Option<usize>,
    /// subchurn: how many of the ids are online harness users (checked, then changed after the
    /// storm).
    #[arg(long)]
    churn_targets: Option<usize>,
    /// Run phase length, e.g. 10s, 2m.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Check order and convergence; exit 1 if they fail.
    #[arg(long)]
    verify: bool,
    /// Write the JSON report here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// This process is worker i of n (0-based), e.g. 1/3: it opens its share of the users.
    #[arg(long, default_value = "0/1", value_parser = parse_worker)]
    worker: (usize, usize),
    /// Client threads [default: one per CPU].
    #[arg(long)]
    threads: Option<usize>,
    /// Source addresses 127.0.0.1 … 127.0.0.K to spread connections over.
    #[arg(long, default_value_t = 16)]
    sources: usize,
    /// Seed for watch sets (every worker must use the same).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Tag of this run, in the flappers' final status text [default: random]. Workers of one
    /// fleet must share it.
    #[arg(long)]
    run_tag: Option<String>,
    /// Longest wait for final states to arrive after the run.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    drain: Duration,
    /// Allow a non-loopback target.
    #[arg(long)]
    allow_remote: bool,
    /// PEM certificates to trust for `wss://` URLs (the server's CA, or its self-signed
    /// certificate); required with any `wss://` URL, and nothing else is trusted.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// No progress lines on stderr.
    #[arg(long)]
    quiet: bool,
    /// The server's admin port, e.g. http://127.0.0.1:9090: `--verify` reads its coalescing
    /// counter (`/metrics`) before and after the run to tell a seq gap the server explains
    /// (coalescing for a slow consumer) from a lost event. Several comma-separated (one per
    /// server behind --url): their counters are added up. Cluster nodes are told by their
    /// metrics: there seq is a hybrid logical clock, and gaps do not fail verification.
    #[arg(long)]
    admin_url: Option<String>,
    /// Bearer token for the admin port, when its `/metrics` is protected.
    #[arg(long, env = "PRESENCED_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Write the current phase (ramp, run, drain, done) to this file as it changes, so scripts
    /// can sample the server exactly over the run phase.
    #[arg(long)]
    phase_file: Option<PathBuf>,
    /// The server's process id (several comma-separated: the nodes of a cluster, summed): its
    /// CPU time (user and kernel, all threads) over the run phase per delivery, its share of a
    /// core, and its resident memory growth per connection over the ramp, from `/proc`.
    #[arg(long, value_delimiter = ',')]
    server_pid: Vec<u32>,
    /// Compare two server builds: start this binary (with --server-args), run the scenario
    /// against it with --server-pid, stop it, then the same with --compare-bin; print each
    /// figure's median over --rounds and the ratio compare / server (loadtest/README.md).
    #[arg(long, requires = "compare_bin")]
    server_bin: Option<PathBuf>,
    /// The second build of a comparison (b; --server-bin is a).
    #[arg(long, requires = "server_bin")]
    compare_bin: Option<PathBuf>,
    /// The compared servers' arguments, whitespace-separated (no quoting); `{dir}` is an empty
    /// scratch directory of each start, e.g. `serve --config bench.toml --data-dir {dir}`.
    #[arg(long, default_value = "serve", allow_hyphen_values = true)]
    server_args: String,
    /// Rounds of a comparison; they alternate the order (a b, b a, …).
    #[arg(long, default_value_t = 1)]
    rounds: u32,
    /// Where a comparison keeps its scratch directories, server logs and per-run reports.
    #[arg(long, default_value = "target/compare")]
    compare_dir: PathBuf,
}

fn parse_worker(s: &str) -> Result<(usize, usize), String> {
    let (i, n) = s.split_once('/').ok_or("expected i/n, e.g. 0/2")?;
    let (i, n): (usize, usize) = (
        i.parse().map_err(|_| "bad worker index")?,
        n.parse().map_err(|_| "bad worker count")?,
    );
    if n == 0 || i >= n {
        return Err("worker index must be below the count".into());
    }
    Ok((i, n))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Some(Cmd::Merge { reports, json }) => merge(reports, json),
        Some(Cmd::Get { report, path }) => get(&report, &path),
        None if cli.run.server_bin.is_some() => run_compare(cli.run),
        None => run_load(cli.run),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("presenced-loadtest: {e}");
            ExitCode::from(2)
        }
    }
}

fn merge(paths: Vec<PathBuf>, json: Option<PathBuf>) -> Result<ExitCode, String> {
    let reports = paths
        .iter()
        .map(|p| {
            let text = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))
        })
        .collect::<Result<Vec<Report>, String>>()?;
    let merged = Report::merge(reports)?;
    print!("{}", merged.table());
    write_json(&merged, json)?;
    Ok(verdict(&merged))
}

fn get(report: &PathBuf, path: &str) -> Result<ExitCode, String> {
    let text = std::fs::read_to_string(report).map_err(|e| format!("{}: {e}", report.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    let pointer = format!("/{}", path.replace('.', "/"));
    match v.pointer(&pointer) {
        Some(serde_json::Value::String(s)) => println!("{s}"),
        Some(other) => println!("{other}"),
        None => return Err(format!("no `{path}` in {}", report.display())),
    }
    Ok(ExitCode::SUCCESS)
}

/// `--server-bin A --compare-bin B`: see [`compare`].
fn run_compare(args: RunArgs) -> Result<ExitCode, String> {
    if !args.server_pid.is_empty() {
        return Err("--server-pid: a comparison starts its own servers".into());
    }
    if args.worker.1 > 1 {
        return Err("--server-bin: a comparison runs as one process (no --worker)".into());
    }
    let first = target::split(&args.url)?.remove(0);
    let listen = target::resolve(&first, args.allow_remote)?.addr;
    let plan = compare::Plan {
        a: args.server_bin.clone().expect("checked by the caller"),
        b: args
            .compare_bin
            .clone()
            .ok_or("--compare-bin is required")?,
        server_args: args.server_args.clone(),
        rounds: args.rounds,
        dir: args.compare_dir.clone(),
        listen,
        json: args.json.clone(),
        quiet: args.quiet,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    compare::run(&plan, &argv)
}

fn write_json(report: &Report, path: Option<PathBuf>) -> Result<(), String> {
    if let Some(p) = path {
        let text = serde_json::to_string_pretty(report).map_err(|e| e.to_string())?;
        std::fs::write(&p, text).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    Ok(())
}

fn verdict(r: &Report) -> ExitCode {
    match &r.verify {
        Some(v) if !v.passed => ExitCode::from(1),
        _ => ExitCode::SUCCESS,
    }
}

fn resolve(args: &RunArgs) -> Result<Scenario, String> {
    let mut s = match Scenario::preset(&args.scenario) {
        Some(s) => s,
        None => {
            let text = std::fs::read_to_string(&args.scenario)
                .map_err(|e| format!("scenario `{}`: not a preset, and {e}", args.scenario))?;
            Scenario::preset("idle")
                .expect("idle exists")
                .merge_toml(&text)
                .map_err(|e| format!("{}: {e}", args.scenario))?
        }
    };
    macro_rules! over {
        ($($f:ident => $g:ident),*) => { $(if let Some(v) = args.$f { s.$g = v; })* };
    }
    over!(connections => connections, rate => rate, watch => watch, pattern => pattern,
          groups => groups, flap_fraction => flap_fraction, flaps_per_sec => flaps_per_sec,
          churn_ops_per_sec => churn_ops_per_sec, churn_batch => churn_batch,
          churn_targets => churn_targets);
    if let Some(d) = args.duration {
        s.duration_s = d.as_secs_f64();
    }
    s.check()?;
    Ok(s)
}

/// The server exited (or its `/proc` could not be read) during the run: said, and counted in
/// the report's errors.
fn server_unreadable(report: &mut Report, quiet: bool) {
    if !quiet {
        eprintln!("warning: --server-pid: the server could not be read during the run");
    }
    *report
        .errors
        .entry("server_pid_unreadable".into())
        .or_default() += 1;
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct we pass; RUSAGE_SELF covers every thread.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn run_load(args: RunArgs) -> Result<ExitCode, String> {
    presenced::raise_nofile();
    let scn = resolve(&args)?;
    let targets = target::resolve_all(&args.url, args.allow_remote)?;
    let tls = match (&args.ca_file, targets.iter().find(|t| t.tls)) {
        (Some(ca), Some(_)) => Some(tls::client_config(ca)?),
        (None, Some(t)) => {
            return Err(format!(
                "--url {}: a wss:// URL needs --ca-file (the certificates to trust)",
                t.url
            ))
        }
        (_, None) => None,
    };
    if args.secret.is_empty() {
        return Err("--secret (or PRESENCED_JWT_SECRET) is required".into());
    }
    let admins = args
        .admin_url
        .as_deref()
        .map(|u| scrape::parse_list(u, args.admin_token.clone()))
        .transpose()?
        .unwrap_or_default();
    for a in &admins {
        if !a.addr().ip().is_loopback() && !args.allow_remote {
            return Err(format!(
                "--admin-url {} is not loopback; pass --allow-remote to read it",
                a.addr()
            ));
        }
    }
    // The coalescing counters before the run (and whether the servers are cluster nodes): a
    // scrape that fails here is a usage error.
    let counters_before = if admins.is_empty() {
        None
    } else {
        Some(scrape::counters_sum(&admins).map_err(|e| format!("--admin-url: {e}"))?)
    };
    let (worker, workers) = args.worker;
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let shared = Arc::new(Shared {
        targets,
        tls,
        secret: args.secret.clone(),
        scn: scn.clone(),
        seed: args.seed,
        sources: args.sources,
        workers,
        fleet_flappers: plan::fleet_flappers(scn.connections, scn.flap_fraction),
        final_text: format!(
            "final-{}",
            args.run_tag
                .clone()
                .unwrap_or_else(|| format!("{:016x}", rand::random::<u64>()))
        ),
        run: AtomicBool::new(false),
        stop_flapping: AtomicBool::new(false),
        finish: AtomicBool::new(false),
        connected: AtomicU64::new(0),
        deliveries: AtomicU64::new(0),
        ramped: AtomicUsize::new(0),
        finals_sent: AtomicUsize::new(0),
        verified: AtomicUsize::new(0),
        release: AtomicBool::new(false),
        resubscribed: AtomicUsize::new(0),
        live: AtomicBool::new(false),
        live_checked: AtomicUsize::new(0),
        unconverged: (0..threads).map(|_| AtomicU64::new(0)).collect(),
    });
    let churn = (scn.mode == Mode::Subchurn)
        .then(|| Arc::new(subchurn::Plan::new(&shared, args.verify, args.drain)));
    if churn.is_some() && workers > 1 {
        return Err("--scenario subchurn runs as one process (no --worker)".into());
    }
    // The server before the first connection (a pid that cannot be read is a usage error).
    // Its cost is per delivery of the whole fleet, which one worker of several does not see.
    if !args.server_pid.is_empty() && workers > 1 {
        return Err("--server-pid: run the fleet as one process (no --worker)".into());
    }
    let server_before = if args.server_pid.is_empty() {
        None
    } else {
        Some(procstat::sample_all(&args.server_pid)?)
    };
    let spawn = |ix: usize, f: Box<dyn FnOnce() -> Stats + Send>| {
        std::thread::Builder::new()
            .name(format!("load-{ix}"))
            .spawn(f)
            .expect("spawning a client thread")
    };
    let cpu_start;
    let started;
    let expected;
    let handles: Vec<_> = if let Some(plan) = &churn {
        expected = plan.connections() as u64;
        cpu_start = cpu_seconds();
        started = Instant::now();
        subchurn::deal(plan, threads)
            .into_iter()
            .enumerate()
            .map(|(ix, (churners, targets))| {
                let (shared, plan) = (shared.clone(), plan.clone());
                spawn(
                    ix,
                    Box::new(move || subchurn::thread_main(shared, plan, churners, targets)),
                )
            })
            .collect()
    } else {
        let mine: Vec<usize> = plan::my_users(scn.connections, worker, workers).collect();
        expected = mine.len() as u64;
        cpu_start = cpu_seconds();
        started = Instant::now();
        plan::deal(&mine, threads, scn.flap_fraction)
            .into_iter()
            .enumerate()
            .map(|(ix, users)| {
                let shared = shared.clone();
                spawn(ix, Box::new(move || run::thread_main(shared, ix, users)))
            })
            .collect()
    };
    if let Some(p) = &args.phase_file {
        let _ = std::fs::write(p, "ramp");
    }
    // Several workers: a control connection, so no worker closes before all have verified.
    let fleet = (workers > 1).then(|| barrier::spawn(shared.clone(), worker, workers));

    let progress = |phase: &str| {
        if !args.quiet {
            eprintln!(
                "[{:>6.1}s] {phase:<6} connected {}/{expected}  deliveries {}",
                started.elapsed().as_secs_f64(),
                shared.connected.load(Relaxed),
                shared.deliveries.load(Relaxed)
            );
        }
    };
    // Ramp: bounded by twice the nominal ramp time plus a minute.
    let nominal = if scn.rate > 0 {
        scn.connections as f64 / scn.rate as f64
    } else {
        0.0
    };
    let ramp_deadline = started + Duration::from_secs_f64(nominal * 2.0 + 60.0);
    let mut tick = Instant::now();
    while shared.ramped.load(Relaxed) < threads && Instant::now() < ramp_deadline {
        std::thread::sleep(Duration::from_millis(20));
        if tick.elapsed() >= Duration::from_secs(1) {
            progress("ramp");
            tick = Instant::now();
        }
    }
    let ramp_s = started.elapsed().as_secs_f64();
    progress("ramp");
    let phase = |name: &str| {
        if let Some(p) = &args.phase_file {
            let _ = std::fs::write(p, name);
        }
    };
    // Run.
    let server_sample = || {
        (!args.server_pid.is_empty())
            .then(|| procstat::sample_all(&args.server_pid).ok())
            .flatten()
    };
    let server_start = server_sample();
    let run_started = Instant::now();
    phase("run");
    shared.run.store(true, Relaxed);
    let run_until = run_started + Duration::from_secs_f64(scn.duration_s);
    while Instant::now() < run_until {
        std::thread::sleep(Duration::from_millis(50).min(run_until - Instant::now()));
        if tick.elapsed() >= Duration::from_secs(1) {
            progress("run");
            tick = Instant::now();
        }
    }
    shared.stop_flapping.store(true, Relaxed);
    let run_phase_s = run_started.elapsed().as_secs_f64();
    let (server_end, run_deliveries) = (server_sample(), shared.deliveries.load(Relaxed));
    phase("drain");
    if let Some(plan) = &churn {
        // After the storm: every watcher re-subscribes and checks its snapshots (each within
        // --drain); then the targets change once more and every watcher checks the live events.
        if args.verify {
            let wait = |count: &AtomicUsize, what: &str| {
                let until = Instant::now() + args.drain + subchurn::STAGE_SLACK;
                let mut tick = Instant::now();
                while count.load(Acquire) < plan.churners && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(10));
                    if tick.elapsed() >= Duration::from_secs(1) {
                        progress(what);
                        tick = Instant::now();
                    }
                }
            };
            wait(&shared.resubscribed, "resub");
            shared.live.store(true, Release);
            wait(&shared.live_checked, "live");
        }
    }
    // Drain: wait for the final states, bounded (nothing to wait for in subchurn).
    let drain_until = Instant::now() + args.drain;
    while churn.is_none() && Instant::now() < drain_until {
        // Acquire pairs with the threads' Release: a thread's count is current once it is
        // counted in `finals_sent`.
        let finals = shared.finals_sent.load(Acquire) == threads;
        let waiting: u64 = shared.unconverged.iter().map(|u| u.load(Acquire)).sum();
        if finals && waiting == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        if tick.elapsed() >= Duration::from_secs(1) {
            progress("drain");
            tick = Instant::now();
        }
    }
    let run_s = run_started.elapsed().as_secs_f64();
    phase("done");
    shared.finish.store(true, Relaxed);
    // Every thread takes its verification snapshot before any connection closes (bounded: a
    // thread that died cannot hold the others forever) ...
    let deadline = Instant::now() + Duration::from_secs(10);
    while shared.verified.load(Acquire) < threads && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    // ... and so does every other worker of the fleet: the others started together with the
    // same flags, so they finish within a run and a drain of this one.
    let mut fleet_error = None;
    if let Some(b) = &fleet {
        let deadline = Instant::now()
            + Duration::from_secs_f64(scn.duration_s)
            + args.drain
            + Duration::from_secs(10);
        while b.state.load(Acquire) == barrier::WAITING && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if b.state.load(Acquire) == barrier::WAITING {
            fleet_error = Some("barrier_timeout".to_string());
        }
    }
    // Every subscriber has verified: nothing it counted can be merged any more.
    let mut coalesced_error = None;
    let coalesced = match counters_before {
        Some(before) => match scrape::counters_sum(&admins) {
            Ok(after) => Some(after.coalesced.saturating_sub(before.coalesced)),
            Err(e) => {
                if !args.quiet {
                    eprintln!("warning: --admin-url after the run: {e}");
                }
                coalesced_error = Some("admin_scrape");
                None
            }
        },
        None => None,
    };
    shared.release.store(true, Release);
    let mut stats = Stats::default();
    for h in handles {
        stats.add(h.join().map_err(|_| "a client thread panicked")?);
    }
    if let Some(b) = fleet {
        match b.thread.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => fleet_error = fleet_error.or(Some(e)),
            Err(_) => fleet_error = Some("barrier_panicked".into()),
        }
    }
    if let Some(e) = fleet_error {
        if !args.quiet {
            eprintln!(
                "warning: {e}: this worker may have closed its connections before every other \
                 worker verified; their verification can then count its users as missing"
            );
        }
        stats.error(e);
    }
    let cpu_s = cpu_seconds() - cpu_start;
    if let Some(plan) = &churn {
        // Every (watcher, id) re-snapshot and (watcher, target) live event is a check; a
        // watcher that could not re-subscribe misses all of its.
        let sc = &stats.subchurn;
        let unverified = plan.churners as u64 - sc.watchers.min(plan.churners as u64);
        stats.checked = sc.snapshots_expected + sc.live_expected;
        stats.missing = sc.snapshots_missing
            + sc.snapshots_wrong
            + sc.live_missing
            + unverified * (plan.ids + plan.targets.len()) as u64;
    }
    if stats.connections < expected {
        stats.missing += expected - stats.connections;
    }
    if let Some(e) = coalesced_error {
        stats.error(e);
    }
    if client::debug() && stats.missing > 0 {
        eprintln!(
            "LT_DEBUG: {} pair(s) missing in all; each thread printed its first {}",
            stats.missing,
            client::DEBUG_LINES
        );
    }
    let mut report = Report::new(&args.scenario, &stats, run_s, cpu_s, args.verify, coalesced);
    report.set_cluster(counters_before.is_some_and(|c| c.cluster));
    report.workers = 1;
    let urls: Vec<String> = shared.targets.iter().map(|t| t.url.clone()).collect();
    report.urls = report::UrlConnections::of(&urls, &stats);
    if churn.is_some() {
        report.subchurn = Some(stats.subchurn.clone());
    }
    report.flaps_per_sec_target = scn.flaps_per_sec;
    report.run_phase_s = run_phase_s;
    report.flaps_per_sec = stats.flaps_sent as f64 / run_phase_s.max(1e-9);
    report.ramp_s = ramp_s;
    report.handshakes_per_sec = stats.connections as f64 / ramp_s.max(1e-9);
    match (server_before, server_start, server_end) {
        (Some(before), Some(start), Some(end)) => {
            report.server = Some(procstat::ServerCost::of(
                &args.server_pid,
                before,
                start,
                end,
                run_deliveries,
                run_phase_s,
                stats.connections,
                procstat::ticks_per_second(),
            ));
        }
        (Some(_), _, _) => server_unreadable(&mut report, args.quiet),
        _ => {}
    }
    print!("{}", report.table());
    write_json(&report, args.json)?;
    Ok(verdict(&report))
}
