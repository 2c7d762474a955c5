//! The `presenced` binary: `serve`, `token`, `check-config`, `topology`, `schema`.

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use presenced::auth::{mint_hs256, AuthError, TokenSpec, Verifier};
use presenced::config::{Config, Placement};
use presenced::history::schema;
use presenced::presence::DeviceType;

#[derive(Parser)]
#[command(
    name = "presenced",
    version,
    about = "Thread-per-core real-time presence server"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server.
    Serve(ServeArgs),
    /// Print a signed HS256 token (for trying things out and for tests).
    Token(TokenArgs),
    /// Validate what `serve` would run with (config file, flags and environment, the same as
    /// `serve` takes) and print the effective configuration.
    CheckConfig(ServeArgs),
    /// Print the machine's CPUs, cores, SMT siblings, NUMA nodes, and the shard -> CPU plan.
    Topology(PlacementArgs),
    /// The ScyllaDB history schema (docs/HISTORY.md): print it, or apply it.
    #[command(subcommand)]
    Schema(SchemaCmd),
    /// Upgrade the running server without dropping presence (docs/OPERATIONS.md): it starts the
    /// new binary, hands it its sockets and users, and drains. Waits for the outcome; exits
    /// non-zero, saying why, if the old process goes on serving.
    Upgrade(UpgradeArgs),
}

#[derive(Args)]
struct UpgradeArgs {
    /// TOML config file of the running server (for `upgrade.socket` and `history.data_dir`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The control socket [default: upgrade.socket, or <data_dir>/presenced.sock].
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Directory of the local history store, where the default socket is.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The binary to start [default: the path the running server was started from]. Naming
    /// the previous release's binary is a rollback.
    #[arg(long)]
    binary: Option<PathBuf>,
}

#[derive(Subcommand)]
enum SchemaCmd {
    /// Print the CQL for the configured keyspace, replication and retention.
    Print {
        /// TOML config file ([history.scylla], history.retention_days).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Apply it to a cluster. Idempotent: every statement is IF NOT EXISTS.
    Apply {
        /// TOML config file ([history.scylla], history.retention_days).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Contact points, HOST:PORT, comma-separated [default: history.scylla.nodes].
        #[arg(long, value_delimiter = ',')]
        scylla: Vec<String>,
    },
}

#[derive(Args)]
struct PlacementArgs {
    /// TOML config file; flags override its keys.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Shard count [default: one per available CPU].
    #[arg(long)]
    shards: Option<usize>,
    /// CPUs to pin shards to, e.g. "0-3,6"; implies `--placement fixed` unless one is given.
    #[arg(long)]
    cpus: Option<String>,
    /// max-spread, max-pack, fixed or unbound.
    #[arg(long, value_parser = parse_placement)]
    placement: Option<Placement>,
}

impl PlacementArgs {
    fn apply(self, cfg: &mut Config) {
        if let Some(v) = self.shards {
            cfg.shards = v;
        }
        if let Some(v) = self.cpus {
            cfg.cpus = v;
            if self.placement.is_none() {
                cfg.placement = Placement::Fixed;
            }
        }
        if let Some(v) = self.placement {
            cfg.placement = v;
        }
    }
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    placement: PlacementArgs,
    /// WebSocket listen address [default: 127.0.0.1:8080].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// HS256/384/512 shared secret (`--jwt-secret=VALUE` if it starts with `-`).
    #[arg(long, env = "PRESENCED_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// Heartbeat interval advertised to clients.
    #[arg(long)]
    heartbeat_ms: Option<u64>,
    /// Admin/stats port (API, /metrics, dashboard) [default: 127.0.0.1:9090].
    #[arg(long)]
    admin_listen: Option<SocketAddr>,
    /// Static admin bearer token (beside admin-role JWTs).
    #[arg(long, env = "PRESENCED_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Do not serve the admin port.
    #[arg(long)]
    no_admin: bool,
    /// Directory of the local history store [default: ./data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[command(flatten)]
    cluster: ClusterArgs,
}

/// `[cluster]` keys as flags (docs/CLUSTER.md). Any of them turns the cluster on, with the
/// config file's `[cluster]` block (or the defaults) for the rest.
#[derive(Args)]
struct ClusterArgs {
    /// NATS servers, comma-separated (`nats://HOST:PORT`): run as a cluster node.
    #[arg(long, value_delimiter = ',', env = "PRESENCED_NATS_URL")]
    nats_url: Vec<String>,
    /// This node's id on the bus [default: host name and a random suffix].
    #[arg(long)]
    node_id: Option<String>,
    /// Bus subject prefix [default: presenced].
    #[arg(long)]
    cluster_prefix: Option<String>,
    /// A node silent this long is dead [default: 6000].
    #[arg(long)]
    cluster_lease_ms: Option<u64>,
    /// User buckets on the bus; the same on every node [default: 4096].
    #[arg(long)]
    cluster_buckets: Option<u32>,
    /// Longest a change waits to be batched [default: 1000].
    #[arg(long)]
    cluster_batch_us: Option<u64>,
}

impl ClusterArgs {
    fn apply(self, cfg: &mut Config) {
        let any = !self.nats_url.is_empty()
            || self.node_id.is_some()
            || self.cluster_prefix.is_some()
            || self.cluster_lease_ms.is_some()
            || self.cluster_buckets.is_some()
            || self.cluster_batch_us.is_some();
        if !any {
            return;
        }
        let c = cfg.cluster.get_or_insert_with(Default::default);
        if !self.nats_url.is_empty() {
            c.nats_url = self.nats_url;
        }
        if let Some(v) = self.node_id {
            c.node_id = Some(v);
        }
        if let Some(v) = self.cluster_prefix {
            c.prefix = v;
        }
        if let Some(v) = self.cluster_lease_ms {
            c.lease_ms = v;
        }
        if let Some(v) = self.cluster_buckets {
            c.buckets = v;
        }
        if let Some(v) = self.cluster_batch_us {
            c.batch_us = v;
        }
    }
}

#[derive(Args)]
struct TokenArgs {
    /// The server's `jwt_secret` (at least 16 bytes). Write `--secret=VALUE`, or use the
    /// environment, so that a value starting with `-` is not taken for a flag.
    #[arg(long, env = "PRESENCED_JWT_SECRET", hide_env_values = true)]
    secret: String,
    /// User id (`sub`); not empty.
    #[arg(long)]
    sub: String,
    /// Comma-separated groups.
    #[arg(long, value_delimiter = ',')]
    groups: Vec<String>,
    /// Comma-separated roles.
    #[arg(long, value_delimiter = ',')]
    roles: Vec<String>,
    /// Lifetime, e.g. 30s, 15m, 1h, 7d.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// Device id (`device` claim).
    #[arg(long)]
    device: Option<String>,
    /// web, ios, android, desktop or other (`device_type` claim).
    #[arg(long)]
    device_type: Option<String>,
    /// Home region (`region` claim).
    #[arg(long)]
    region: Option<String>,
}

fn parse_placement(s: &str) -> Result<Placement, String> {
    toml::Value::String(s.to_owned())
        .try_into()
        .map_err(|_| format!("`{s}`: expected max-spread, max-pack, fixed or unbound"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Serve(args) => serve(args),
        Cmd::Token(args) => token(args).map(|t| println!("{t}")),
        Cmd::CheckConfig(args) => check_config(args),
        Cmd::Topology(args) => topology(args),
        Cmd::Schema(SchemaCmd::Print { config }) => load(config.as_ref()).and_then(|cfg| {
            cfg.validate().map_err(|e| e.to_string())?;
            let h = &cfg.history;
            print!("{}", schema::render(&h.scylla, h.retention_days)?);
            Ok(())
        }),
        Cmd::Schema(SchemaCmd::Apply { config, scylla }) => schema_apply(config.as_ref(), scylla),
        Cmd::Upgrade(args) => upgrade(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("presenced: {e}");
            ExitCode::FAILURE
        }
    }
}

fn load(path: Option<&PathBuf>) -> Result<Config, String> {
    match path {
        Some(p) => Config::from_file(p).map_err(|e| e.to_string()),
        None => Ok(Config::default()),
    }
}

/// `presenced token`: a token `serve` accepts, or an error saying why it would not. The checks are
/// the server's own, not a copy: the secret goes through the config validation and the verifier
/// `serve` builds (length, emptiness), the token through that verifier (claims such as a
/// non-empty `sub`), and the device type through the parser the handshake uses.
fn token(args: TokenArgs) -> Result<String, String> {
    let cfg = Config {
        jwt_secret: Some(args.secret),
        ..Config::default()
    };
    let secret_err = |e: &dyn std::fmt::Display| format!("--secret (or PRESENCED_JWT_SECRET): {e}");
    cfg.validate().map_err(|e| secret_err(&e))?;
    let verifier =
        Verifier::new(cfg.jwt_secret.as_deref(), &cfg.auth).map_err(|e| secret_err(&e))?;
    if let Some(t) = args.device_type.as_deref() {
        if DeviceType::parse(t).is_none() {
            return Err(format!(
                "--device-type: unknown device type `{t}` (web, ios, android, desktop, other)"
            ));
        }
    }
    if args.ttl.as_secs() == 0 {
        return Err(
            "--ttl: at least 1s (the server closes a session at its token's expiry)".into(),
        );
    }
    let spec = TokenSpec {
        sub: args.sub,
        groups: args.groups,
        roles: args.roles,
        ttl: args.ttl,
        device: args.device,
        device_type: args.device_type,
        region: args.region,
    };
    let secret = cfg.jwt_secret.as_deref().expect("set above");
    let token = mint_hs256(secret, &spec);
    match verifier.verify(&token) {
        Ok(claims) => claims
            .check_sub(cfg.limits.max_id_bytes)
            .map(|()| token)
            .map_err(|why| format!("--sub: the server would refuse it ({why})")),
        Err(AuthError::MissingClaim("sub")) => {
            Err("--sub: empty; the server refuses a token without a user id".into())
        }
        Err(e) => Err(format!(
            "the server would refuse this token: {}",
            e.reason()
        )),
    }
}

/// `presenced check-config`: the configuration `serve` would run with, from the same file, flags
/// and environment, validated the same way, or the first error.
fn check_config(args: ServeArgs) -> Result<(), String> {
    let cfg = effective_config(args)?;
    cfg.validate().map_err(|e| e.to_string())?;
    if no_key(&cfg) {
        // `serve` starts anyway, with a secret of its own for that run only.
        eprintln!(
            "warning: no JWT key configured: `serve` would generate a secret for each run, so no \
             token from elsewhere would verify (set jwt_secret, PRESENCED_JWT_SECRET, auth.keys \
             or auth.jwks)"
        );
    } else {
        Verifier::new(cfg.jwt_secret.as_deref(), &cfg.auth).map_err(|e| e.to_string())?;
    }
    presenced::edge::tls::load(&cfg.tls).map_err(|e| e.to_string())?;
    if let Some(path) = &cfg.geo.database {
        presenced::geo::GeoDb::open(path)?;
    }
    let mut shown = cfg.clone();
    if shown.jwt_secret.is_some() {
        shown.jwt_secret = Some("<redacted>".into());
    }
    if shown.admin.token.is_some() {
        shown.admin.token = Some("<redacted>".into());
    }
    for w in &mut shown.webhooks {
        if w.secret.is_some() {
            w.secret = Some("<redacted>".into());
        }
        // A URL's path or query can be its secret (Slack's is): scheme and host only.
        let host = presenced::config::redacted_url(&w.url);
        if host != w.url {
            w.url = format!("{host}/<redacted>");
        }
    }
    if shown.history.scylla.password.is_some() {
        shown.history.scylla.password = Some("<redacted>".into());
    }
    if let Some(c) = &mut shown.cluster {
        for secret in [&mut c.password, &mut c.token] {
            if secret.is_some() {
                *secret = Some("<redacted>".into());
            }
        }
        for url in &mut c.nats_url {
            *url = redact_userinfo(url);
        }
    }
    print!("{}", toml::to_string(&shown).map_err(|e| e.to_string())?);
    Ok(())
}

/// `nats://user:pass@host` → `nats://<redacted>@host` (credentials in a URL are secrets too).
fn redact_userinfo(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    match rest.rsplit_once('@') {
        Some((_, host)) if scheme.is_empty() => format!("<redacted>@{host}"),
        Some((_, host)) => format!("{scheme}://<redacted>@{host}"),
        None => url.to_owned(),
    }
}

/// `schema apply`: connects (waiting for schema agreement after each statement) and applies.
fn schema_apply(config: Option<&PathBuf>, nodes: Vec<String>) -> Result<(), String> {
    let mut cfg = load(config)?;
    if !nodes.is_empty() {
        cfg.history.scylla.nodes = nodes;
    }
    cfg.validate().map_err(|e| e.to_string())?;
    let h = &cfg.history;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("a runtime for the driver: {e}"))?;
    let n = rt.block_on(schema::apply_config(&h.scylla, h.retention_days))?;
    println!(
        "applied {n} statements (keyspace {}) to {}",
        h.scylla.keyspace,
        h.scylla.nodes.join(",")
    );
    Ok(())
}

/// `presenced topology`: the report on stdout; problems on stderr as `warning:` (the plan runs, but
/// poorly) or `error:` (`serve` would refuse it), and then a failure exit.
fn topology(args: PlacementArgs) -> Result<(), String> {
    let mut cfg = load(args.config.as_ref())?;
    args.apply(&mut cfg);
    cfg.validate().map_err(|e| e.to_string())?;
    let report = presenced::topology::report(&cfg)?;
    print!("{}", report.text);
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    for e in &report.errors {
        eprintln!("error: {e}");
    }
    match report.errors.len() {
        0 => Ok(()),
        n => Err(format!("{n} error(s): `serve` would refuse this plan")),
    }
}

/// The configuration `serve` runs with: the file (or the defaults), then flags and environment
/// variables over it.
fn effective_config(args: ServeArgs) -> Result<Config, String> {
    let mut cfg = load(args.placement.config.as_ref())?;
    args.placement.apply(&mut cfg);
    if let Some(v) = args.listen {
        cfg.listen = v;
    }
    if let Some(v) = args.jwt_secret {
        cfg.jwt_secret = Some(v);
    }
    if let Some(v) = args.heartbeat_ms {
        cfg.heartbeat_ms = v;
    }
    if let Some(v) = args.admin_listen {
        cfg.admin.listen = v;
    }
    if let Some(v) = args.admin_token {
        cfg.admin.token = Some(v);
    }
    if args.no_admin {
        cfg.admin.enabled = false;
    }
    if let Some(v) = args.data_dir {
        cfg.history.data_dir = v;
    }
    args.cluster.apply(&mut cfg);
    Ok(cfg)
}

/// No key at all: `serve` generates a secret for the run.
fn no_key(cfg: &Config) -> bool {
    cfg.jwt_secret.is_none() && cfg.auth.keys.is_empty() && cfg.auth.jwks.is_none()
}

/// A generated secret: 32 random bytes as 64 hex digits. Hex, because the secret is then typed
/// after a flag: base64url can start with `-`, which a command line takes for a flag.
fn generated_secret(bytes: [u8; 32]) -> String {
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// `presenced upgrade`: asks the running server for an upgrade and reports the outcome.
fn upgrade(args: UpgradeArgs) -> Result<(), String> {
    let mut cfg = load(args.config.as_ref())?;
    if let Some(d) = args.data_dir {
        cfg.history.data_dir = d;
    }
    let cfg = cfg.validate().map_err(|e| e.to_string())?;
    let socket = match args.socket {
        Some(s) => s,
        None => cfg
            .upgrade
            .socket_path(&cfg.history.data_dir)
            .ok_or("upgrade.socket is `none`: this server takes no upgrades")?,
    };
    // The server waits up to upgrade.timeout_ms for the new process; a little more here.
    let wait = Duration::from_millis(cfg.upgrade.timeout_ms + 5_000);
    let done = presenced::ops::upgrade::request(&socket, args.binary.as_deref(), wait)
        .map_err(|why| format!("upgrade failed, the old process goes on serving: {why}"))?;
    println!("upgraded: {done}");
    Ok(())
}

fn serve(args: ServeArgs) -> Result<(), String> {
    // Colour only for a terminal: redirected logs stay plain text. NO_COLOR is honoured too.
    let ansi = std::io::stdout().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt()
        .with_ansi(ansi)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match presenced::raise_nofile() {
        Some(n) => tracing::info!(max_open_files = n, "open-file limit"),
        None => tracing::warn!("could not read or raise the open-file limit"),
    }
    use presenced::ops::{notify, upgrade};
    // First of all: SIGUSR2's default action kills, and one may come at any time (a second
    // `kill -USR2` during start-up must not take the server down).
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGUSR2,
        // Reloads `geo.database`; its default action would kill the server.
        signal_hook::consts::SIGHUP,
    ])
    .map_err(|e| format!("installing signal handlers: {e}"))?;
    // Started by an upgrade: the old process waits for this one's word, whatever it is.
    let successor = match upgrade::successor() {
        None => None,
        Some(Ok(s)) => Some(s),
        Some(Err(why)) => return Err(why),
    };
    let refuse = |why: String| {
        if let Some(s) = &successor {
            s.refuse(&why);
        }
        why
    };
    let mut cfg = effective_config(args).map_err(refuse)?;
    let generated = no_key(&cfg).then(|| {
        let secret = generated_secret(rand::random());
        cfg.jwt_secret = Some(secret.clone());
        secret
    });
    let cfg = cfg.validate().map_err(|e| refuse(e.to_string()))?;
    let verifier =
        Verifier::new(cfg.jwt_secret.as_deref(), &cfg.auth).map_err(|e| refuse(e.to_string()))?;
    let takeover = match &successor {
        Some(s) => s.receive(cfg.upgrade.max_state_bytes).map_err(refuse)?,
        None => presenced::Takeover::default(),
    };
    let server = presenced::start_with(cfg.clone(), verifier, takeover)
        .map_err(|e| refuse(e.to_string()))?;
    if let (Some(secret), None) = (&generated, &successor) {
        print_quickstart(secret, server.addr, server.admin_addr);
    }
    // The next upgrade's new process gets a generated secret too, so tokens go on verifying.
    let env: Vec<(String, String)> = generated
        .map(|s| vec![("PRESENCED_JWT_SECRET".to_owned(), s)])
        .unwrap_or_default();
    let upgrader = match cfg.upgrade.socket_path(&cfg.history.data_dir) {
        Some(path) => Some(
            upgrade::Upgrader::new(cfg.clone(), server.doors(), path, env)
                .map_err(|e| refuse(format!("upgrade control socket: {e}")))?,
        ),
        None => None,
    };
    match successor {
        // The old process tells systemd (MAINPID, READY=1) once it has this word.
        Some(s) => {
            // Tests only: the new process is slow to say READY (past upgrade.timeout_ms).
            #[cfg(feature = "fault-injection")]
            if let Some(ms) = std::env::var("PRESENCED_FAULT_DELAY_READY_MS")
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
            {
                std::thread::sleep(Duration::from_millis(ms));
            }
            // The old process hands the bus over within its bridge's budget (plus a second
            // for its answer); past twice that it is taken to be stuck.
            let bus_wait = cfg
                .cluster
                .as_ref()
                .map_or(0, |c| 2 * c.request_timeout_ms + 5_000);
            s.ready(
                server.doors(),
                upgrader.clone(),
                Duration::from_millis(bus_wait),
            )
            .map_err(|e| format!("upgrade: telling the old process: {e}"))?;
            // The old process stops accepting as it reads READY; connections meanwhile wait in
            // the sockets' queues.
            server.start_accepting();
            // Tests only: the new process dies after taking over (the old one must serve again).
            #[cfg(feature = "fault-injection")]
            if let Some(ms) = std::env::var("PRESENCED_FAULT_ABORT_AFTER_READY_MS")
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
            {
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(ms));
                    tracing::error!("fault injection: the new process aborts");
                    std::process::abort();
                });
            }
        }
        None => {
            if let Some(u) = &upgrader {
                u.listen().map_err(|e| format!("upgrade.socket: {e}"))?;
            }
            notify::ready();
        }
    }
    for sig in signals.forever() {
        if sig == signal_hook::consts::SIGHUP {
            // The outcome is logged by the reload itself (and counted in /metrics).
            if server.reload_geo().is_none() {
                tracing::info!("SIGHUP: nothing to reload (no geo.database)");
            }
            continue;
        }
        if sig == signal_hook::consts::SIGUSR2 {
            match &upgrader {
                Some(u) => {
                    let u = u.clone();
                    // Off the signal loop: an upgrade takes seconds, and a SIGTERM meanwhile
                    // must still stop the server.
                    let _ = std::thread::Builder::new()
                        .name("upgrade-sig".into())
                        .spawn(move || match u.upgrade(None) {
                            Ok(done) => tracing::info!(done, "upgrade (SIGUSR2) done"),
                            Err(why) => tracing::error!(why, "upgrade (SIGUSR2) failed"),
                        });
                }
                None => tracing::warn!("SIGUSR2: upgrade.socket is `none`, so no upgrades"),
            }
            continue;
        }
        tracing::info!(signal = sig, "shutting down");
        break;
    }
    notify::stopping();
    server.shutdown();
    tracing::info!("stopped");
    Ok(())
}

fn print_quickstart(secret: &str, addr: SocketAddr, admin: Option<SocketAddr>) {
    let token = mint_hs256(secret, &TokenSpec::new("alice", Duration::from_secs(3600)));
    // This very binary, so the hint runs as printed whether or not `presenced` is on PATH
    // (quoted for a shell if its path has a space).
    let exe = match std::env::current_exe().map(|p| p.display().to_string()) {
        Ok(p) if p.contains(char::is_whitespace) => format!("'{p}'"),
        Ok(p) => p,
        Err(_) => "presenced".into(),
    };
    println!(
        "\nNo JWT key configured: generated an HS256 secret for this run only.\n\
         \n  secret:  {secret}\n\
         \n  example token for user `alice` (valid 1h):\n  {token}\n\
         \n  connect: ws://{addr}/ws?token={token}\n\
         \n  more tokens (in another shell):\n  \
         export PRESENCED_JWT_SECRET={secret}\n  \
         {exe} token --sub bob\n"
    );
    if let Some(admin) = admin {
        let mut spec = TokenSpec::new("admin", Duration::from_secs(12 * 3600));
        spec.roles = vec!["admin".into()];
        let admin_token = mint_hs256(secret, &spec);
        println!(
            "  dashboard (admin token valid 12h; it stays in the URL fragment):\n  \
             http://{admin}/#token={admin_token}\n\
             \n  metrics: http://{admin}/metrics\n"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_secrets_never_look_like_flags() {
        // 0xF8… and 0xFC… are the bytes base64url starts with `-` and `_`: the old encoding printed a
        // secret starting with `-` one run in 64, and `token --secret <it>` then failed.
        for bytes in [[0xF8; 32], [0xFC; 32], [0xFF; 32], [0; 32], rand::random()] {
            let secret = generated_secret(bytes);
            assert_eq!(secret.len(), 64, "{secret}");
            assert!(secret.bytes().all(|b| b.is_ascii_hexdigit()), "{secret}");
            let parsed =
                Cli::try_parse_from(["presenced", "token", "--secret", &secret, "--sub", "b"]);
            assert!(parsed.is_ok(), "{secret}");
        }
        // What went wrong, and the documented ways round it for a secret that does start with `-`.
        let dash = "-0123456789abcdef";
        assert!(
            Cli::try_parse_from(["presenced", "token", "--secret", dash, "--sub", "b"]).is_err()
        );
        let eq = format!("--secret={dash}");
        assert!(Cli::try_parse_from(["presenced", "token", eq.as_str(), "--sub", "b"]).is_ok());
    }
}
