//! Configuration: a documented serde struct with defaults, read from TOML, overridden by CLI
//! flags, then validated once into values the server trusts (`docs/CONFIG.md` lists every key).

use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::auth::AuthConfig;
use crate::protocol::OpLimits;

/// The whole server configuration. Keys mirror the `serve` flags.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// WebSocket listener address (every shard binds it with SO_REUSEPORT).
    pub listen: SocketAddr,
    /// Number of shards; 0 means one per available CPU.
    pub shards: usize,
    /// CPUs to pin shards to, e.g. "0-3,6"; empty means chosen by `placement`.
    pub cpus: String,
    /// `max-spread` (default), `max-pack`, `fixed` (needs `cpus`) or `unbound` (no pinning).
    pub placement: Placement,
    /// HS256/384/512 shared secret. Also from env `PRESENCED_JWT_SECRET`.
    pub jwt_secret: Option<String>,
    /// Interval advertised in `welcome` and used for server pings.
    pub heartbeat_ms: u64,
    /// How long shutdown waits for sessions to close before exiting.
    pub shutdown_deadline_ms: u64,
    /// Origins allowed to open WebSockets (exact match, e.g. "https://app.example.com"); empty
    /// allows all. Requests without an Origin header (non-browser clients) are allowed.
    pub allowed_origins: Vec<String>,
    pub tls: TlsConfig,
    pub auth: AuthConfig,
    pub limits: Limits,
    pub mesh: MeshConfig,
    pub admin: AdminConfig,
    pub history: HistoryConfig,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Placement {
    MaxSpread,
    MaxPack,
    Fixed,
    Unbound,
}

/// TLS for the WebSocket listener (`[tls]`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain. TLS is on when `cert` and `key` are set.
    pub cert: Option<std::path::PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<std::path::PathBuf>,
    /// Address for TLS connections. Unset: `listen` itself speaks TLS. Set: TLS here, plain
    /// WebSocket stays on `listen` (side by side).
    pub listen: Option<SocketAddr>,
}

impl TlsConfig {
    pub fn enabled(&self) -> bool {
        self.cert.is_some() || self.key.is_some()
    }
}

/// What to do when a user opens more than `max_sessions_per_user` sessions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionPolicy {
    /// Close the new session with 4009.
    RejectNew,
    /// Close the user's oldest session with 4009 and admit the new one.
    EvictOldest,
}

/// Per-connection and per-handshake limits (`[limits]`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest inbound message answered normally; larger ones get a `too_large` error.
    pub max_message_bytes: usize,
    /// Messages larger than this close the connection with 1009.
    pub max_frame_bytes: usize,
    /// Users plus groups one connection may subscribe to.
    pub max_subscriptions: usize,
    /// Users named in one `subscribe`/`unsubscribe` op.
    pub max_users_per_op: usize,
    /// Bytes in a user or group id.
    pub max_id_bytes: usize,
    /// Characters in a status text.
    pub max_text_chars: usize,
    /// Largest upgrade request head (request line plus headers).
    pub max_header_bytes: usize,
    /// Time allowed from accept to a complete upgrade request.
    pub handshake_timeout_ms: u64,
    /// Sessions (devices) one user may hold; 0 means no limit.
    pub max_sessions_per_user: usize,
    /// `reject_new` or `evict_oldest`, past `max_sessions_per_user`.
    pub session_policy: SessionPolicy,
    /// Upgrades per second per client IP, per shard, with a burst of the same size; 0 disables.
    pub handshake_rate_per_ip: u32,
    /// Client IPs one shard tracks for the handshake rate limit.
    pub max_tracked_ips: usize,
    /// Ops per second per connection, with a burst of the same size; 0 disables.
    pub ops_per_second: u32,
    /// Open connections one shard serves; past it, upgrades get 503.
    pub max_connections_per_shard: usize,
    /// Replies (acks, errors, pongs) queued for a client that does not read them; past this the
    /// connection is closed with 4008.
    pub max_pending_replies: usize,
    /// Distinct users (and groups) with an undelivered event queued for one connection; newer
    /// events for a queued user replace the older one, so this bounds a slow client's backlog.
    pub max_pending_events: usize,
}

/// Inter-shard channels (`[mesh]`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MeshConfig {
    /// Capacity of each shard's inbox.
    pub inbox_capacity: usize,
    /// Messages a shard holds per peer while that peer's inbox is full; past this they are
    /// dropped and counted in `mesh_dropped`.
    pub overflow_max: usize,
}

/// Where presence history goes (`[history]`, docs/HISTORY.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HistoryBackend {
    /// The embedded store (redb) under `data_dir`.
    Local,
    /// ScyllaDB (or Cassandra) through the `scylla` driver.
    Scylla,
    /// No history.
    Off,
}

/// Presence history (`[history]`, docs/HISTORY.md).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// `local` (default), `scylla` or `off`.
    pub backend: HistoryBackend,
    /// Directory of the local store (`--data-dir`).
    pub data_dir: std::path::PathBuf,
    /// Events and samples older than this are deleted (local) or expire by TTL (scylla).
    pub retention_days: u32,
    /// How often the online counts (total and per group) are sampled for replay.
    pub sample_interval_s: u64,
    /// Groups kept per sample (the largest).
    pub max_groups_per_sample: usize,
    /// Events waiting for the writer; past this, shards drop (and count) new events.
    pub queue_capacity: usize,
    /// Events per write batch.
    pub batch_max: usize,
    /// A batch is written at the latest this long after its first event.
    pub batch_interval_ms: u64,
    /// CPU to pin the writer thread to (keep it off the shard cores); unset: not pinned.
    pub cpu: Option<usize>,
    /// How long shutdown waits for the writer to flush.
    pub flush_deadline_ms: u64,
    /// `replay/at` finds sessions that started at most this long before the instant asked.
    pub replay_lookback_h: u64,
    /// Events one query may read (bounds the writer's memory per query).
    pub max_query_events: usize,
    /// Local store: redb's page cache, in MiB (1 to 65536; redb's own default is 1024).
    pub cache_mb: usize,
    /// Local store: compact the file (give free space back to the file system) when at least
    /// this many MiB of it are free (1 to 1048576) ...
    pub compact_min_free_mb: u64,
    /// ... and at least this percentage of it (1 to 99).
    pub compact_min_free_pct: u8,
    pub scylla: ScyllaConfig,
}

/// The `scylla` backend (`[history.scylla]`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScyllaConfig {
    /// Contact points, `host:port`.
    pub nodes: Vec<String>,
    pub keyspace: String,
    /// Replication for `schema apply`: `NetworkTopologyStrategy` with `datacenters`, or
    /// `SimpleStrategy` with `replication_factor`.
    pub replication: String,
    /// `NetworkTopologyStrategy`: replicas per datacenter, e.g. `{ dc1 = 3 }`.
    pub datacenters: std::collections::BTreeMap<String, u32>,
    /// `SimpleStrategy` (single-datacenter test clusters).
    pub replication_factor: u32,
    /// Datacenter to prefer for requests (token- and DC-aware routing).
    pub local_dc: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Write requests in flight at once.
    pub max_in_flight: usize,
    pub request_timeout_ms: u64,
    /// Retries of a failed batch before its events are dropped (and counted).
    pub max_retries: u32,
    /// Backoff: base, doubled per retry with full jitter, capped.
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            backend: HistoryBackend::Local,
            data_dir: "./data".into(),
            retention_days: 30,
            sample_interval_s: 10,
            max_groups_per_sample: 1_000,
            queue_capacity: 65_536,
            batch_max: 512,
            batch_interval_ms: 200,
            cpu: None,
            flush_deadline_ms: 3_000,
            replay_lookback_h: 24,
            max_query_events: 1_000_000,
            cache_mb: 64,
            compact_min_free_mb: 64,
            compact_min_free_pct: 25,
            scylla: ScyllaConfig::default(),
        }
    }
}

impl Default for ScyllaConfig {
    fn default() -> Self {
        ScyllaConfig {
            nodes: vec!["127.0.0.1:9042".into()],
            keyspace: "presenced".into(),
            replication: "NetworkTopologyStrategy".into(),
            datacenters: [("datacenter1".to_owned(), 3)].into_iter().collect(),
            replication_factor: 1,
            local_dc: None,
            username: None,
            password: None,
            max_in_flight: 64,
            request_timeout_ms: 2_000,
            max_retries: 5,
            retry_base_ms: 50,
            retry_max_ms: 5_000,
        }
    }
}

/// The admin/stats port (`[admin]`, docs/ADMIN.md).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Serve the admin port at all.
    pub enabled: bool,
    /// Admin HTTP listener address (every shard binds it with SO_REUSEPORT).
    pub listen: SocketAddr,
    /// A static admin bearer token, accepted beside admin-role JWTs. Also from env
    /// `PRESENCED_ADMIN_TOKEN`. At least 16 bytes.
    pub token: Option<String>,
    /// Require admin auth for `/metrics`, `/healthz` and `/readyz` too.
    pub protect_metrics: bool,
    /// Serve the admin port over TLS with the `[tls]` certificate and key.
    pub tls: bool,
    /// Largest request head (and body) accepted; larger gets 413.
    pub max_request_bytes: usize,
    /// Time allowed for a request head to arrive once its first byte has (408), and for the
    /// `/ws/admin` auth message.
    pub request_timeout_ms: u64,
    /// Idle keep-alive connections are closed after this long.
    pub idle_timeout_ms: u64,
    /// Admin connections (HTTP and `/ws/admin`) one shard serves at once; past it new ones are
    /// closed at accept.
    pub max_connections: usize,
    /// How long a cross-shard query waits for every shard before answering 503.
    pub query_timeout_ms: u64,
    /// How often `/ws/admin` pushes stats and changes (the most it ever pushes).
    pub push_interval_ms: u64,
    /// Largest `limit` of a page in `/api/online` and `/api/groups/{g}`.
    pub max_page: usize,
    /// Presence changes each shard remembers for the dashboards' `changes` feed.
    pub change_log: usize,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            enabled: true,
            listen: "127.0.0.1:9090".parse().expect("constant address parses"),
            token: None,
            protect_metrics: false,
            tls: false,
            max_request_bytes: 16 * 1024,
            request_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            max_connections: 256,
            query_timeout_ms: 2_000,
            push_interval_ms: 1_000,
            max_page: 1_000,
            change_log: 1_024,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:8080".parse().expect("constant address parses"),
            shards: 0,
            cpus: String::new(),
            placement: Placement::MaxSpread,
            jwt_secret: None,
            heartbeat_ms: 25_000,
            shutdown_deadline_ms: 5_000,
            allowed_origins: Vec::new(),
            tls: TlsConfig::default(),
            auth: AuthConfig::default(),
            limits: Limits::default(),
            mesh: MeshConfig::default(),
            admin: AdminConfig::default(),
            history: HistoryConfig::default(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        let ops = OpLimits::default();
        Limits {
            max_message_bytes: 16 * 1024,
            max_frame_bytes: 1024 * 1024,
            max_subscriptions: 1000,
            max_users_per_op: ops.max_users_per_op,
            max_id_bytes: ops.max_id_bytes,
            max_text_chars: ops.max_text_chars,
            max_header_bytes: 8 * 1024,
            handshake_timeout_ms: 5_000,
            max_sessions_per_user: 16,
            session_policy: SessionPolicy::EvictOldest,
            handshake_rate_per_ip: 50,
            max_tracked_ips: 100_000,
            ops_per_second: 50,
            max_connections_per_shard: 500_000,
            max_pending_replies: 1024,
            max_pending_events: 4096,
        }
    }
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            inbox_capacity: 4096,
            overflow_max: 1024 * 1024,
        }
    }
}

/// A configuration error, naming the key at fault.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Reads a TOML file. Unknown keys and wrong types are errors naming the key.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
        Config::from_toml(&text).map_err(|e| ConfigError(format!("{}: {}", path.display(), e.0)))
    }

    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError(e.to_string().trim_end().to_owned()))
    }

    /// Checks relations between values; call after merging flags.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: &str| Err(ConfigError(format!("{key}: {why}")));
        let l = &self.limits;
        if self.shards > usize::from(u16::MAX) {
            return bad("shards", "at most 65535");
        }
        if self.placement == Placement::Fixed && self.cpus.is_empty() {
            return bad("placement", "`fixed` needs `cpus`");
        }
        if !self.cpus.is_empty() {
            parse_cpu_list(&self.cpus).map_err(|e| ConfigError(format!("cpus: {e}")))?;
        }
        if self.heartbeat_ms < 100 {
            return bad("heartbeat_ms", "at least 100");
        }
        if l.max_message_bytes == 0 || l.max_message_bytes > l.max_frame_bytes {
            return bad(
                "limits.max_message_bytes",
                "must be between 1 and limits.max_frame_bytes",
            );
        }
        for (key, v) in [
            ("limits.max_subscriptions", l.max_subscriptions),
            ("limits.max_users_per_op", l.max_users_per_op),
            ("limits.max_id_bytes", l.max_id_bytes),
            ("limits.max_pending_replies", l.max_pending_replies),
            ("limits.max_pending_events", l.max_pending_events),
            ("mesh.inbox_capacity", self.mesh.inbox_capacity),
            ("limits.max_tracked_ips", l.max_tracked_ips),
            ("admin.max_connections", self.admin.max_connections),
            ("admin.max_page", self.admin.max_page),
            ("admin.change_log", self.admin.change_log),
            ("history.queue_capacity", self.history.queue_capacity),
            ("history.batch_max", self.history.batch_max),
            ("history.max_query_events", self.history.max_query_events),
            (
                "history.scylla.max_in_flight",
                self.history.scylla.max_in_flight,
            ),
            (
                "limits.max_connections_per_shard",
                l.max_connections_per_shard,
            ),
        ] {
            if v == 0 {
                return bad(key, "must be at least 1");
            }
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return bad("tls", "`cert` and `key` go together");
        }
        if self.tls.listen.is_some() && !self.tls.enabled() {
            return bad("tls.listen", "needs `tls.cert` and `tls.key`");
        }
        if self.tls.listen == Some(self.listen) && self.listen.port() != 0 {
            return bad("tls.listen", "must differ from `listen`");
        }
        if l.max_header_bytes < 256 {
            return bad("limits.max_header_bytes", "at least 256");
        }
        let h = &self.history;
        if h.retention_days == 0 {
            return bad("history.retention_days", "must be at least 1");
        }
        if h.sample_interval_s == 0 || h.sample_interval_s > 86_400 {
            return bad("history.sample_interval_s", "between 1 and 86400");
        }
        if h.replay_lookback_h == 0 || h.replay_lookback_h > 24 * 366 {
            return bad("history.replay_lookback_h", "between 1 and 8784 (a year)");
        }
        if h.retention_days > 36_500 {
            return bad("history.retention_days", "at most 36500");
        }
        if h.cache_mb == 0 || h.cache_mb > 65_536 {
            return bad("history.cache_mb", "between 1 and 65536");
        }
        if h.compact_min_free_mb == 0 || h.compact_min_free_mb > 1_048_576 {
            return bad("history.compact_min_free_mb", "between 1 and 1048576");
        }
        if h.compact_min_free_pct == 0 || h.compact_min_free_pct > 99 {
            return bad("history.compact_min_free_pct", "between 1 and 99");
        }
        if h.scylla.nodes.is_empty() && h.backend == HistoryBackend::Scylla {
            return bad("history.scylla.nodes", "at least one contact point");
        }
        if !matches!(
            h.scylla.replication.as_str(),
            "NetworkTopologyStrategy" | "SimpleStrategy"
        ) {
            return bad(
                "history.scylla.replication",
                "NetworkTopologyStrategy or SimpleStrategy",
            );
        }
        if !h
            .scylla
            .keyspace
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
            || h.scylla.keyspace.is_empty()
        {
            return bad("history.scylla.keyspace", "letters, digits and _ only");
        }
        if self.admin.max_request_bytes < 1024 {
            return bad("admin.max_request_bytes", "at least 1024");
        }
        if self.admin.tls && !self.tls.enabled() {
            return bad("admin.tls", "needs `tls.cert` and `tls.key`");
        }
        if self.admin.push_interval_ms < 100 {
            return bad("admin.push_interval_ms", "at least 100");
        }
        if let Some(t) = &self.admin.token {
            if t.len() < 16 {
                return bad("admin.token", "at least 16 bytes");
            }
        }
        if self.admin.enabled && self.admin.listen == self.listen && self.listen.port() != 0 {
            return bad("admin.listen", "must differ from `listen`");
        }
        if let Some(s) = &self.jwt_secret {
            if s.len() < 16 {
                return bad("jwt_secret", "at least 16 bytes");
            }
        }
        Ok(())
    }

    /// Shards to run: the configured count, or one per available CPU.
    pub fn shard_count(&self) -> usize {
        if self.shards > 0 {
            self.shards
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }

    pub fn op_limits(&self) -> OpLimits {
        OpLimits {
            max_users_per_op: self.limits.max_users_per_op,
            max_id_bytes: self.limits.max_id_bytes,
            max_text_chars: self.limits.max_text_chars,
            ..OpLimits::default()
        }
    }
}

/// Parses "0-3,6" into [0, 1, 2, 3, 6].
pub fn parse_cpu_list(list: &str) -> Result<Vec<usize>, String> {
    let mut cpus = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let num = |s: &str| {
            s.trim()
                .parse::<usize>()
                .map_err(|_| format!("`{s}` is not a CPU number"))
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    return Err(format!("empty range `{part}`"));
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(num(part)?),
        }
    }
    if cpus.is_empty() {
        return Err("no CPUs listed".into());
    }
    Ok(cpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_round_trip() {
        let c = Config::default();
        c.validate().unwrap();
        let text = toml::to_string(&c).unwrap();
        let back = Config::from_toml(&text).unwrap();
        assert_eq!(back.listen, c.listen);
    }

    #[test]
    fn errors_name_the_key() {
        let e = Config::from_toml("listne = \"x\"").unwrap_err().0;
        assert!(e.contains("listne"), "{e}");
        let e = Config::from_toml("[limits]\nmax_message_bytes = \"big\"")
            .unwrap_err()
            .0;
        assert!(e.contains("max_message_bytes"), "{e}");
        let c = Config::from_toml("[limits]\nmax_message_bytes = 2000000").unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .0
            .starts_with("limits.max_message_bytes"));
        let c = Config::from_toml("placement = \"fixed\"").unwrap();
        assert!(c.validate().unwrap_err().0.starts_with("placement"));
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-2,5").unwrap(), vec![0, 1, 2, 5]);
        assert!(parse_cpu_list("3-1").is_err());
        assert!(parse_cpu_list("x").is_err());
        assert!(parse_cpu_list("").is_err());
    }
}
