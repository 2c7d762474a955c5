//! Configuration: a documented serde struct with defaults, read from TOML, overridden by CLI
//! flags, then validated once into values the server trusts (`docs/CONFIG.md` lists every key).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

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
    /// After an upgrade hand-over (docs/OPERATIONS.md), the old process closes its sessions with
    /// 1001 spread evenly over this window, so clients do not reconnect in one burst.
    pub drain_ms: u64,
    /// When a user's last visible session ends (a drop or a close by the client), the offline is
    /// held this long; a new session of the user within it re-attaches and watchers see no flap.
    /// Kicks and token expiry bypass it. 0: offline at once.
    pub offline_grace_ms: u64,
    /// A shard whose event loop has not turned for this long is reported stalled (log with the
    /// task queue it was running, `presenced_shard_stalls_total`).
    pub stall_threshold_ms: u64,
    /// Entries of each shard's io_uring submission queues (glommio's ring depth). Each socket
    /// waiting to be read holds a poll request in its shard's ring, and the kernel sizes the
    /// table it searches them in from this depth: a deep ring keeps the executor's per-wake
    /// timer cancellations cheap with thousands of connections per shard.
    pub io_ring_depth: u64,
    /// Origins allowed to open WebSockets (exact match, e.g. "https://app.example.com"); empty
    /// allows all. Requests without an Origin header (non-browser clients) are allowed.
    pub allowed_origins: Vec<String>,
    /// Peers (CIDR blocks or addresses) whose PROXY protocol header and `X-Forwarded-For` name
    /// the client (docs/CONFIG.md, "Behind a proxy"); from anyone else both are ignored. Empty:
    /// every connection's address is its peer's.
    pub trusted_proxies: Vec<String>,
    /// The client listeners (`listen`, `tls.listen`) expect a PROXY protocol header (v1 or v2)
    /// before anything else on every connection; one without a valid header is closed.
    pub proxy_protocol: bool,
    pub tls: TlsConfig,
    pub auth: AuthConfig,
    pub limits: Limits,
    pub mesh: MeshConfig,
    pub admin: AdminConfig,
    pub history: HistoryConfig,
    /// Zero-downtime upgrades (`[upgrade]`, docs/OPERATIONS.md).
    pub upgrade: UpgradeConfig,
    /// The client's region from its address (`[geo]`, docs/CONFIG.md).
    pub geo: GeoConfig,
    /// `[[webhooks]]`: presence events POSTed to receivers (docs/WEBHOOKS.md).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub webhooks: Vec<WebhookConfig>,
    /// Many nodes as one service over NATS (`[cluster]`, docs/CLUSTER.md). Absent: a single
    /// node, with no bus code running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterConfig>,
}

/// How a webhook's request body is written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WebhookFormat {
    /// `{"events": [...]}`.
    #[default]
    Json,
    /// A Slack-compatible incoming-webhook message, `{"text": "alice (admin) is online"}`.
    Slack,
}

/// One `[[webhooks]]` block (docs/WEBHOOKS.md).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookConfig {
    /// Its name in metrics and the admin API; empty: `webhook-N` (N from 0, in file order).
    pub name: String,
    /// `http://` or `https://` (rustls, the Mozilla roots).
    pub url: String,
    /// Any of `user_online`, `user_offline`, `status_change`, `session_start`, `session_end`;
    /// empty: all.
    pub events: Vec<String>,
    /// Filters: an event passes when it matches any of them (a listed user, or a user in a
    /// listed group or with a listed role); none set: every event.
    pub users: Vec<String>,
    pub groups: Vec<String>,
    pub roles: Vec<String>,
    /// The HMAC-SHA256 key of `X-Presenced-Signature` (at least 16 bytes).
    pub secret: Option<String>,
    pub format: WebhookFormat,
    /// Events per request.
    pub batch_max: usize,
    /// How long the first event of a batch waits for others.
    pub batch_ms: u64,
    /// A request not answered in this long counts as failed (and is retried).
    pub timeout_ms: u64,
    /// Events held for this webhook; past it, the oldest waiting one is dropped and counted.
    pub max_queue: usize,
    /// A failed batch's first retry waits up to this long (full jitter); each failure doubles
    /// it, up to `retry_max_ms`.
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            name: String::new(),
            url: String::new(),
            events: Vec::new(),
            users: Vec::new(),
            groups: Vec::new(),
            roles: Vec::new(),
            secret: None,
            format: WebhookFormat::Json,
            batch_max: 100,
            batch_ms: 200,
            timeout_ms: 5_000,
            max_queue: 10_000,
            retry_base_ms: 100,
            retry_max_ms: 30_000,
        }
    }
}

/// `scheme://host[:port]` of a URL, for logs and errors: no credentials, path or query (a
/// Slack webhook URL's path is its secret).
pub fn redacted_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("?", url));
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    format!("{scheme}://{host}")
}

/// Webhooks a server may have.
pub const MAX_WEBHOOKS: usize = 32;

/// The ranges of a webhook's numbers: (key, min, max).
pub const WEBHOOK_RANGES: &[(&str, u64, u64)] = &[
    ("batch_max", 1, 1_000),
    ("batch_ms", 0, 60_000),
    ("timeout_ms", 100, 120_000),
    ("max_queue", 2, 10_000_000),
    ("retry_base_ms", 10, 60_000),
    ("retry_max_ms", 100, 3_600_000),
];

impl WebhookConfig {
    /// The effective name of the `i`-th webhook.
    pub fn name_of(&self, i: usize) -> String {
        if self.name.is_empty() {
            format!("webhook-{i}")
        } else {
            self.name.clone()
        }
    }

    fn validate(&self, i: usize) -> Result<(), ConfigError> {
        let key = |k: &str| format!("webhooks[{i}].{k}");
        let bad = |k: &str, why: String| Err(ConfigError(format!("{}: {why}", key(k))));
        let shown = redacted_url(&self.url);
        match self.url.parse::<ureq::http::Uri>() {
            Ok(u) if matches!(u.scheme_str(), Some("http" | "https")) => {
                if u.host().is_none_or(str::is_empty) {
                    return bad("url", format!("`{shown}` has no host"));
                }
                // `host:port` with a port that is no number: a valid URL to the parser, a
                // request that fails every time.
                let authority = u.authority().map_or("", |a| a.as_str());
                let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
                let after_host = authority.rsplit_once(']').map_or(authority, |(_, p)| p);
                if after_host.contains(':') && u.port_u16().is_none() {
                    return bad("url", format!("`{shown}` is not a valid URL (a bad port)"));
                }
            }
            Ok(_) => {
                return bad(
                    "url",
                    format!("`{shown}` is not an http:// or https:// URL"),
                )
            }
            Err(e) => return bad("url", format!("`{shown}` is not a valid URL ({e})")),
        }
        for e in &self.events {
            if ![
                "user_online",
                "user_offline",
                "status_change",
                "session_start",
                "session_end",
            ]
            .contains(&e.as_str())
            {
                return bad(
                    "events",
                    format!("unknown event `{e}` (user_online, user_offline, status_change, session_start, session_end)"),
                );
            }
        }
        match &self.secret {
            Some(s) if s.len() >= 16 => {}
            _ => {
                return bad(
                    "secret",
                    "at least 16 bytes: receivers check the signature with it".into(),
                )
            }
        }
        let values = [
            self.batch_max as u64,
            self.batch_ms,
            self.timeout_ms,
            self.max_queue as u64,
            self.retry_base_ms,
            self.retry_max_ms,
        ];
        for ((k, min, max), v) in WEBHOOK_RANGES.iter().zip(values) {
            if !(*min..=*max).contains(&v) {
                return bad(k, format!("must be between {min} and {max} (got {v})"));
            }
        }
        if self.retry_base_ms > self.retry_max_ms {
            return bad("retry_base_ms", "must not be above retry_max_ms".into());
        }
        if self.batch_max >= self.max_queue {
            return bad("batch_max", "must be below max_queue".into());
        }
        if self.name.len() > 64
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return bad("name", "letters, digits, `-`, `_`, `.`; at most 64".into());
        }
        Ok(())
    }
}

/// The region of a session whose token has no `region` claim (`[geo]`, docs/CONFIG.md).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GeoConfig {
    /// A MaxMind DB file (GeoLite2/GeoIP2 Country or City): loaded at start (a missing or
    /// corrupt file stops it), reloaded on SIGHUP.
    pub database: Option<std::path::PathBuf>,
    /// A header a trusted proxy or CDN sets to the client's country (e.g. `CF-IPCountry`);
    /// believed only from `trusted_proxies`, and before the database.
    pub header: Option<String>,
}

/// Zero-downtime upgrades (`[upgrade]`, SPEC §11, docs/OPERATIONS.md): the control socket that
/// `presenced upgrade` (and a new process taking over) talks to, and the hand-over's limits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpgradeConfig {
    /// Path of the Unix control socket (mode 0600; only the server's own uid may use it).
    /// Empty: `<history.data_dir>/presenced.sock`. `none`: no control socket, so no upgrades.
    pub socket: String,
    /// How long the new process has, from its start, to take over and say it is ready; past
    /// it, it is killed and the old process goes on serving.
    pub timeout_ms: u64,
    /// Largest presence state the new process accepts from the old one.
    pub max_state_bytes: u64,
    /// How long after the old process closed a session it may still re-attach to its user in
    /// the new process (beside `offline_grace_ms`, whichever is longer).
    pub reattach_ms: u64,
}

impl Default for UpgradeConfig {
    fn default() -> Self {
        UpgradeConfig {
            socket: String::new(),
            timeout_ms: 30_000,
            max_state_bytes: 1 << 30,
            reattach_ms: 5_000,
        }
    }
}

impl UpgradeConfig {
    /// The control socket's path, `None` when turned off.
    pub fn socket_path(&self, data_dir: &Path) -> Option<std::path::PathBuf> {
        match self.socket.as_str() {
            "none" => None,
            "" => Some(data_dir.join("presenced.sock")),
            p => Some(p.into()),
        }
    }
}

/// The cluster (`[cluster]`, SPEC §12, docs/CLUSTER.md).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// NATS servers, `nats://HOST:PORT` (or `tls://`), one or more; the client fails over
    /// between them and learns the rest of the NATS cluster from them. `nats://USER:PASS@HOST`
    /// and `nats://TOKEN@HOST` carry credentials in the URL.
    pub nats_url: Vec<String>,
    /// This node's name on the bus: letters, digits, `-` and `_`, at most 64. Unset: the host
    /// name and a random suffix. Two live nodes may not share one (the second is refused).
    pub node_id: Option<String>,
    /// Subject prefix of every bus subject (dot-separated tokens); clusters sharing a NATS
    /// system keep apart by prefix.
    pub prefix: String,
    /// A node not heard from for this long is dead: its shares are dropped everywhere.
    /// Heartbeats go out every `lease_ms / 3`.
    pub lease_ms: u64,
    /// Buckets users are hashed into; a node follows only the buckets its watchers need.
    /// Every node of a cluster must use the same value.
    pub buckets: u32,
    /// Longest a changed share waits to be published with others of its bucket.
    pub batch_us: u64,
    /// Changed shares a shard may queue for the bridge before it coalesces them per user.
    pub queue_capacity: usize,
    /// How long a snapshot request to another node waits for the whole answer.
    pub request_timeout_ms: u64,
    /// A bucket nobody here watches any more is unfollowed after this long (hysteresis).
    pub unsubscribe_after_ms: u64,
    /// NATS user and password (both or neither).
    pub user: Option<String>,
    pub password: Option<String>,
    /// NATS authentication token.
    pub token: Option<String>,
    /// NATS credentials file (JWT and NKey seed, `.creds`).
    pub credentials_file: Option<std::path::PathBuf>,
    /// PEM CA certificates to trust for the NATS servers' TLS.
    pub tls_ca: Option<std::path::PathBuf>,
    /// PEM client certificate and key for mutual TLS (both or neither).
    pub tls_cert: Option<std::path::PathBuf>,
    pub tls_key: Option<std::path::PathBuf>,
    /// Refuse a NATS server that does not offer TLS.
    pub tls_required: bool,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            nats_url: vec!["nats://127.0.0.1:4222".into()],
            node_id: None,
            prefix: "presenced".into(),
            lease_ms: 6_000,
            buckets: 4_096,
            batch_us: 1_000,
            queue_capacity: 65_536,
            request_timeout_ms: 2_000,
            unsubscribe_after_ms: 30_000,
            user: None,
            password: None,
            token: None,
            credentials_file: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            tls_required: false,
        }
    }
}

impl ClusterConfig {
    /// Checks what the ranges cannot: names, URLs, and settings that go together.
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: String| Err(ConfigError(format!("cluster.{key}: {why}")));
        if self.nats_url.is_empty() {
            return bad("nats_url", "at least one NATS server URL".into());
        }
        for url in &self.nats_url {
            if let Err(why) = check_nats_url(url) {
                return bad("nats_url", format!("`{url}`: {why}"));
            }
        }
        if let Some(id) = &self.node_id {
            if let Err(why) = check_node_id(id) {
                return bad("node_id", why);
            }
        }
        let token_ok = |t: &str| !t.is_empty() && t.bytes().all(is_subject_byte);
        if self.prefix.split('.').any(|t| !token_ok(t)) {
            return bad(
                "prefix",
                "dot-separated tokens of letters, digits, `-` and `_`".into(),
            );
        }
        if self.user.is_some() != self.password.is_some() {
            return bad("user", "`user` and `password` go together".into());
        }
        let ways = [
            self.user.is_some(),
            self.token.is_some(),
            self.credentials_file.is_some(),
        ];
        if ways.iter().filter(|w| **w).count() > 1 {
            return bad(
                "token",
                "one of user/password, token or credentials_file".into(),
            );
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return bad("tls_cert", "`tls_cert` and `tls_key` go together".into());
        }
        Ok(())
    }
}

/// A byte allowed in a NATS subject token as we use them.
fn is_subject_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// A node id: it becomes one token of bus subjects.
pub fn check_node_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 64 || !id.bytes().all(is_subject_byte) {
        return Err(format!(
            "`{id}`: 1 to 64 letters, digits, `-` and `_` (it names bus subjects)"
        ));
    }
    Ok(())
}

/// `nats://HOST:PORT`, `tls://HOST:PORT`, `ws://`, `wss://`, or a bare `HOST:PORT`.
fn check_nats_url(url: &str) -> Result<(), &'static str> {
    let rest = match url.split_once("://") {
        Some((scheme, rest)) => {
            if !matches!(scheme, "nats" | "tls" | "ws" | "wss") {
                return Err("the scheme must be nats://, tls://, ws:// or wss://");
            }
            rest
        }
        None => url,
    };
    let host_port = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let host_port = host_port.trim_end_matches('/');
    let host = match host_port.rsplit_once(':') {
        Some((h, port)) => {
            if port.parse::<u16>().is_err() {
                return Err("the port must be a number up to 65535");
            }
            h
        }
        None => host_port,
    };
    if host.is_empty() || host.contains(['/', ' ', ',']) {
        return Err("no host");
    }
    Ok(())
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
    /// Undelivered events queued for one connection. At the bound, a new event for a user (or
    /// group) already queued replaces the queued one; one for anybody else is dropped (counted).
    pub max_pending_events: usize,
    /// Undelivered event bytes past which a connection counts as behind, and a new event for a
    /// queued user replaces the queued one instead of queueing behind it (a connection whose
    /// socket stops taking data is behind at once). Clients that keep up get every event.
    pub coalesce_after_bytes: usize,
    /// New subscription ids (users and groups) per second per user, shared by all of the user's
    /// sessions and not refilled by reconnecting; the burst is `max_subscriptions`, so a client
    /// can subscribe its whole list at once. A subscribe
    /// costs one cross-shard message and one snapshot per id, so this, not the op rate, bounds
    /// what subscription churn costs the server. 0 disables.
    pub subscriptions_per_second: u32,
    /// How long the replies already queued (e.g. `rate_limited` errors) may take to be written
    /// before a 4008 (rate-limit abuse) close frame.
    pub close_flush_ms: u64,
    /// Upgrade requests one shard reads and authenticates at once (accepted sockets that have
    /// not finished their handshake). While all are taken, new sockets wait in the kernel's
    /// listen backlog; one that would wait longer than `handshake_wait_ms` gets 503.
    pub max_handshakes_in_flight: usize,
    /// How long the accept loop waits for a free handshake slot before it accepts the next
    /// socket anyway and answers it 503.
    pub handshake_wait_ms: u64,
    /// IPv6 clients are rate-limited per prefix of this many bits (a client usually holds a
    /// whole /64); 128 limits per address.
    pub ipv6_prefix_len: u8,
}

/// Inter-shard channels (`[mesh]`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MeshConfig {
    /// Capacity of each shard's inbox.
    pub inbox_capacity: usize,
    /// Bytes of mesh messages one shard may hold, over all peers, while their inboxes are full.
    /// Past it the mesh is congested: `activity` events are dropped (counted in
    /// `mesh_dropped`), and every shard refuses new work (subscribes get `overloaded`,
    /// upgrades 503) until it drains. State messages (subscriptions, snapshots, hand-offs) are
    /// never dropped; presence updates are merged per user, never dropped.
    pub overflow_max_bytes: usize,
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
    /// Retries of a failed batch in a row without progress before its events are dropped (and
    /// counted); an attempt that writes part of the batch starts the count again.
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
    /// Time a new connection has to send its first request byte; one that sends nothing is
    /// closed (separate from `idle_timeout_ms`, which applies between keep-alive requests).
    pub header_timeout_ms: u64,
    /// Idle keep-alive connections are closed after this long.
    pub idle_timeout_ms: u64,
    /// Admin connections (HTTP and `/ws/admin`) one shard serves at once. When they are all
    /// taken, a new connection closes the longest-idle one (waiting between requests or for a
    /// first byte); only when every one is busy does it get 503.
    pub max_connections: usize,
    /// Admin connections one client (an IPv4 address, an IPv6 prefix of
    /// `limits.ipv6_prefix_len` bits) may hold per shard; more are refused with 429.
    pub max_connections_per_ip: usize,
    /// Reserved slots per shard where, when every pooled connection is busy, `/healthz`,
    /// `/readyz` and `/metrics` are still answered (one request each).
    pub probe_connections: usize,
    /// Users an admin scan (`/api/online`) visits before letting the shard serve its
    /// connections again: a scan of a million users never holds an event loop for long.
    pub scan_chunk: usize,
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
            header_timeout_ms: 5_000,
            idle_timeout_ms: 60_000,
            max_connections: 256,
            max_connections_per_ip: 64,
            probe_connections: 8,
            scan_chunk: 4_096,
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
            drain_ms: 10_000,
            offline_grace_ms: 0,
            stall_threshold_ms: 50,
            io_ring_depth: 4096,
            allowed_origins: Vec::new(),
            trusted_proxies: Vec::new(),
            proxy_protocol: false,
            tls: TlsConfig::default(),
            auth: AuthConfig::default(),
            limits: Limits::default(),
            mesh: MeshConfig::default(),
            admin: AdminConfig::default(),
            history: HistoryConfig::default(),
            upgrade: UpgradeConfig::default(),
            geo: GeoConfig::default(),
            webhooks: Vec::new(),
            cluster: None,
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
            coalesce_after_bytes: 64 * 1024,
            subscriptions_per_second: 500,
            close_flush_ms: 1_000,
            max_handshakes_in_flight: 1_024,
            handshake_wait_ms: 1_000,
            ipv6_prefix_len: 64,
        }
    }
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            inbox_capacity: 4096,
            overflow_max_bytes: 64 << 20,
        }
    }
}

/// Every number the server accepts, with its inclusive range: `(key, min, max)`. One place, so
/// no duration, size or count can be left unchecked (a unit test walks the whole configuration
/// and fails for any number missing here). `*` stands for any key of a map.
pub const RANGES: &[(&str, u64, u64)] = &[
    ("shards", 0, 65_535),
    ("heartbeat_ms", 100, 3_600_000),
    ("shutdown_deadline_ms", 100, 600_000),
    ("drain_ms", 0, 600_000),
    ("offline_grace_ms", 0, 3_600_000),
    ("stall_threshold_ms", 1, 60_000),
    ("io_ring_depth", 128, 32_768),
    ("upgrade.timeout_ms", 1_000, 600_000),
    ("upgrade.max_state_bytes", 1 << 20, 64 << 30),
    ("upgrade.reattach_ms", 0, 3_600_000),
    ("auth.leeway_s", 0, crate::auth::LEEWAY_S_MAX),
    ("limits.max_message_bytes", 64, 16 << 20),
    ("limits.max_frame_bytes", 64, 64 << 20),
    ("limits.max_subscriptions", 1, 1_000_000),
    ("limits.max_users_per_op", 1, 100_000),
    ("limits.max_id_bytes", 1, 4_096),
    ("limits.max_text_chars", 1, 4_096),
    ("limits.max_header_bytes", 256, 1 << 20),
    ("limits.handshake_timeout_ms", 100, 600_000),
    ("limits.max_sessions_per_user", 0, 100_000),
    ("limits.handshake_rate_per_ip", 0, 1_000_000),
    ("limits.max_tracked_ips", 1, 100_000_000),
    // Below half of max_pending_replies' maximum: the relation between them (validate) must
    // leave every value in this range usable.
    ("limits.ops_per_second", 0, 100_000),
    ("limits.max_connections_per_shard", 1, 100_000_000),
    ("limits.max_pending_replies", 16, 1_000_000),
    ("limits.max_pending_events", 1, 10_000_000),
    ("limits.coalesce_after_bytes", 1_024, 1 << 30),
    ("limits.subscriptions_per_second", 0, 10_000_000),
    ("limits.close_flush_ms", 0, 60_000),
    ("limits.max_handshakes_in_flight", 1, 1_000_000),
    ("limits.handshake_wait_ms", 0, 60_000),
    ("limits.ipv6_prefix_len", 16, 128),
    ("mesh.inbox_capacity", 16, 16 << 20),
    ("mesh.overflow_max_bytes", 1 << 20, 64 << 30),
    ("admin.max_request_bytes", 4_096, 16 << 20),
    ("admin.request_timeout_ms", 100, 600_000),
    ("admin.header_timeout_ms", 100, 600_000),
    ("admin.idle_timeout_ms", 100, 86_400_000),
    ("admin.max_connections", 1, 1_000_000),
    ("admin.max_connections_per_ip", 1, 1_000_000),
    ("admin.probe_connections", 1, 1_024),
    ("admin.scan_chunk", 16, 10_000_000),
    ("admin.query_timeout_ms", 10, 600_000),
    ("admin.push_interval_ms", 100, 600_000),
    ("admin.max_page", 1, 100_000),
    ("admin.change_log", 1, 10_000_000),
    ("history.retention_days", 1, 36_500),
    ("history.sample_interval_s", 1, 86_400),
    ("history.max_groups_per_sample", 0, 1_000_000),
    ("history.queue_capacity", 1, 100_000_000),
    ("history.batch_max", 1, 1_000_000),
    ("history.batch_interval_ms", 1, 600_000),
    // CPU_SETSIZE: glibc's cpu_set_t holds CPUs 0 to 1023.
    ("history.cpu", 0, 1_023),
    ("history.flush_deadline_ms", 0, 600_000),
    ("history.replay_lookback_h", 1, 24 * 366),
    ("history.max_query_events", 1, 1_000_000_000),
    ("history.cache_mb", 1, 65_536),
    ("history.compact_min_free_mb", 1, 1_048_576),
    ("history.compact_min_free_pct", 1, 99),
    ("history.scylla.max_in_flight", 1, 100_000),
    ("history.scylla.request_timeout_ms", 10, 600_000),
    ("history.scylla.max_retries", 0, 100),
    ("history.scylla.retry_base_ms", 1, 600_000),
    ("history.scylla.retry_max_ms", 1, 3_600_000),
    ("history.scylla.replication_factor", 1, 100),
    ("history.scylla.datacenters.*", 1, 100),
    ("cluster.lease_ms", 300, 600_000),
    ("cluster.buckets", 1, 65_536),
    ("cluster.batch_us", 50, 1_000_000),
    ("cluster.queue_capacity", 16, 16 << 20),
    ("cluster.request_timeout_ms", 10, 600_000),
    ("cluster.unsubscribe_after_ms", 0, 86_400_000),
];

/// Checks every numeric key of `cfg` against [`RANGES`]. Unset optional keys are skipped.
fn check_ranges(cfg: &Config) -> Result<(), ConfigError> {
    let value = toml::Value::try_from(cfg)
        .map_err(|e| ConfigError(format!("configuration does not serialise: {e}")))?;
    for (key, min, max) in RANGES {
        for (path, v) in lookup(&value, key) {
            let n = v.as_integer().and_then(|n| u64::try_from(n).ok());
            if !n.is_some_and(|n| (*min..=*max).contains(&n)) {
                return Err(ConfigError(format!(
                    "{path}: must be between {min} and {max} (got {v})"
                )));
            }
        }
    }
    Ok(())
}

/// The values at a dotted `key` (`*` matches every key of a table), with their paths.
fn lookup<'a>(root: &'a toml::Value, key: &str) -> Vec<(String, &'a toml::Value)> {
    let mut found = vec![(String::new(), root)];
    for part in key.split('.') {
        let mut next = Vec::new();
        for (path, v) in found {
            let Some(table) = v.as_table() else { continue };
            let join = |k: &str| {
                if path.is_empty() {
                    k.to_owned()
                } else {
                    format!("{path}.{k}")
                }
            };
            if part == "*" {
                next.extend(table.iter().map(|(k, v)| (join(k), v)));
            } else if let Some(v) = table.get(part) {
                next.push((join(part), v));
            }
        }
        found = next;
    }
    found
}

/// A configuration that passed [`Config::validate`]: what the server starts from. Cheap to
/// clone; reads as a [`Config`].
#[derive(Clone, Debug)]
pub struct ValidConfig(Arc<Config>);

impl std::ops::Deref for ValidConfig {
    type Target = Config;

    fn deref(&self) -> &Config {
        &self.0
    }
}

impl ValidConfig {
    /// The shared configuration, for the shards to hold.
    pub fn config_arc(&self) -> Arc<Config> {
        self.0.clone()
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

    /// Checks every value against its range ([`RANGES`]) and the relations between values;
    /// call after merging flags. The result is what [`crate::start`] requires.
    pub fn validate(&self) -> Result<ValidConfig, ConfigError> {
        let bad = |key: &str, why: &str| Err(ConfigError(format!("{key}: {why}")));
        check_ranges(self)?;
        let l = &self.limits;
        if self.placement == Placement::Fixed && self.cpus.is_empty() {
            return bad("placement", "`fixed` needs `cpus`");
        }
        if !self.cpus.is_empty() {
            parse_cpu_list(&self.cpus).map_err(|e| ConfigError(format!("cpus: {e}")))?;
        }
        if l.max_message_bytes > l.max_frame_bytes {
            return bad(
                "limits.max_message_bytes",
                "must not exceed limits.max_frame_bytes",
            );
        }
        // The rate-limit policy answers up to 2 × ops_per_second ops of a burst (acks, then
        // `rate_limited` errors) before its 4008: they must fit in the replies lane, or the
        // client is closed for "replies not read" first.
        if l.ops_per_second > 0 && l.max_pending_replies <= 2 * l.ops_per_second as usize {
            return bad(
                "limits.max_pending_replies",
                "must exceed 2 × limits.ops_per_second (the replies of a rate-limited burst)",
            );
        }
        crate::edge::proxy::TrustedProxies::parse(&self.trusted_proxies)
            .map_err(|why| ConfigError(format!("trusted_proxies: {why}")))?;
        if self.webhooks.len() > MAX_WEBHOOKS {
            return bad("webhooks", &format!("at most {MAX_WEBHOOKS}"));
        }
        for (i, w) in self.webhooks.iter().enumerate() {
            w.validate(i)?;
        }
        let mut names: Vec<String> = self
            .webhooks
            .iter()
            .enumerate()
            .map(|(i, w)| w.name_of(i))
            .collect();
        names.sort();
        if names.windows(2).any(|w| w[0] == w[1]) {
            return bad("webhooks", "two webhooks have the same name");
        }
        if self.proxy_protocol && self.trusted_proxies.is_empty() {
            return bad(
                "proxy_protocol",
                "needs `trusted_proxies`: list the proxies that send the header (from anyone else \
                 its address is ignored)",
            );
        }
        if let Some(h) = &self.geo.header {
            let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
            if h.is_empty() || h.len() > 64 || !h.chars().all(token) {
                return bad(
                    "geo.header",
                    "an HTTP header name (letters, digits, `-`; at most 64)",
                );
            }
            // Headers the upgrade request reads for something else would never reach it.
            let lower = h.to_ascii_lowercase();
            let taken = [
                "host",
                "origin",
                "authorization",
                "upgrade",
                "connection",
                "x-forwarded-for",
            ];
            if taken.contains(&lower.as_str()) || lower.starts_with("sec-websocket-") {
                return bad(
                    "geo.header",
                    "names a header the upgrade request reads for something else",
                );
            }
            if self.trusted_proxies.is_empty() {
                return bad(
                    "geo.header",
                    "is believed only from `trusted_proxies`: list the proxy that sets it",
                );
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
        let h = &self.history;
        if h.scylla.nodes.is_empty() && h.backend == HistoryBackend::Scylla {
            return bad("history.scylla.nodes", "at least one contact point");
        }
        if h.scylla.retry_base_ms > h.scylla.retry_max_ms {
            return bad(
                "history.scylla.retry_base_ms",
                "must not exceed history.scylla.retry_max_ms",
            );
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
        if self.admin.tls && !self.tls.enabled() {
            return bad("admin.tls", "needs `tls.cert` and `tls.key`");
        }
        if let Some(t) = &self.admin.token {
            if t.len() < 16 {
                return bad("admin.token", "at least 16 bytes");
            }
        }
        if self.admin.enabled && self.admin.listen.port() != 0 {
            if self.admin.listen == self.listen {
                return bad("admin.listen", "must differ from `listen`");
            }
            if Some(self.admin.listen) == self.tls.listen {
                return bad("admin.listen", "must differ from `tls.listen`");
            }
        }
        if let Some(s) = &self.jwt_secret {
            if s.len() < 16 {
                return bad("jwt_secret", "at least 16 bytes");
            }
        }
        if let Some(p) = self.upgrade.socket_path(&h.data_dir) {
            // sun_path holds 108 bytes with its NUL.
            if p.as_os_str().len() > 107 {
                return bad(
                    "upgrade.socket",
                    "a Unix socket path must be under 108 bytes; set a shorter one",
                );
            }
        }
        if let Some(c) = &self.cluster {
            c.validate()?;
            if u128::from(c.batch_us) >= u128::from(c.lease_ms) * 1000 / 3 {
                return bad(
                    "cluster.batch_us",
                    "must be well under a heartbeat (lease_ms / 3)",
                );
            }
        }
        Ok(ValidConfig(Arc::new(self.clone())))
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
        let valid = c.validate().unwrap();
        assert_eq!(valid.listen, c.listen, "a valid config reads as the config");
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

    /// Every number in the configuration, as `(dotted key, value)`; optional keys are set first
    /// so they are walked too.
    fn numeric_keys() -> Vec<String> {
        let mut cfg = Config::default();
        cfg.history.cpu = Some(1);
        cfg.cluster = Some(ClusterConfig::default());
        let value = toml::Value::try_from(&cfg).unwrap();
        let mut out = Vec::new();
        fn walk(prefix: &str, v: &toml::Value, out: &mut Vec<String>) {
            match v {
                toml::Value::Table(t) => {
                    for (k, v) in t {
                        let key = if prefix.is_empty() {
                            k.clone()
                        } else {
                            format!("{prefix}.{k}")
                        };
                        walk(&key, v, out);
                    }
                }
                toml::Value::Integer(_) | toml::Value::Float(_) => out.push(prefix.to_owned()),
                _ => {}
            }
        }
        walk("", &value, &mut out);
        out
    }

    /// Sets `key` (dotted) to `n` in the TOML of the default config and parses it back.
    fn with(key: &str, n: i64) -> Result<Config, ConfigError> {
        let mut value = toml::Value::try_from(Config::default()).unwrap();
        let mut table = value.as_table_mut().unwrap();
        let parts: Vec<&str> = key.split('.').collect();
        for p in &parts[..parts.len() - 1] {
            let p = if *p == "*" { "dc1" } else { p };
            table = table
                .entry(p.to_owned())
                .or_insert_with(|| toml::Value::Table(Default::default()))
                .as_table_mut()
                .unwrap();
        }
        let leaf = parts.last().unwrap();
        let leaf = if *leaf == "*" { "dc1" } else { leaf };
        table.insert(leaf.to_string(), toml::Value::Integer(n));
        Config::from_toml(&toml::to_string(&value).unwrap())
    }

    /// The single table-driven test of item 16: every number has a range, and every range is
    /// enforced at both ends — below and above are refused naming the key, the ends accepted.
    #[test]
    fn every_number_has_a_range_and_it_is_enforced() {
        let ranged = |k: &str| {
            RANGES
                .iter()
                .any(|(r, _, _)| *r == k || (r.ends_with(".*") && k.starts_with(&r[..r.len() - 1])))
        };
        let missing: Vec<String> = numeric_keys().into_iter().filter(|k| !ranged(k)).collect();
        assert!(
            missing.is_empty(),
            "numbers without a range in RANGES: {missing:?}"
        );
        for (key, min, max) in RANGES {
            let shown = key.replace('*', "dc1");
            // Below the range (where there is a below) and above it: refused, naming the key.
            let mut outside = vec![i64::try_from(*max).unwrap() + 1];
            if *min > 0 {
                outside.push(i64::try_from(*min).unwrap() - 1);
            }
            for n in outside {
                match with(key, n) {
                    // u8/u32 keys may not even parse past their type's range: also a refusal
                    // naming the key.
                    Err(e) => assert!(
                        e.0.contains(key.rsplit('.').next().unwrap()) || key.ends_with('*'),
                        "{key}={n}: {}",
                        e.0
                    ),
                    Ok(c) => {
                        let e = c.validate().expect_err(&format!("{key} = {n} is refused"));
                        assert!(e.0.starts_with(&shown), "{key}={n}: {}", e.0);
                    }
                }
            }
            // The ends themselves: no range error for this key (a relation with another key
            // may still object, e.g. max_message_bytes above max_frame_bytes).
            for n in [*min, *max] {
                let c = with(key, i64::try_from(n).unwrap())
                    .unwrap_or_else(|e| panic!("{key} = {n} parses: {}", e.0));
                if let Err(e) = c.validate() {
                    assert!(!e.0.contains("must be between"), "{key}={n}: {}", e.0);
                }
            }
        }
    }

    #[test]
    fn zero_durations_that_broke_the_server_are_refused() {
        for key in [
            "limits.handshake_timeout_ms",
            "admin.idle_timeout_ms",
            "admin.query_timeout_ms",
            "admin.header_timeout_ms",
        ] {
            let e = with(key, 0).unwrap().validate().unwrap_err().0;
            assert!(e.starts_with(key), "{e}");
        }
        let e = with("history.cpu", 1024).unwrap().validate().unwrap_err().0;
        assert!(e.starts_with("history.cpu"), "{e}");
    }

    #[test]
    fn relations_leave_the_ends_of_ranges_usable() {
        let mut c = with("limits.ops_per_second", 100_000).unwrap();
        c.limits.max_pending_replies = 1_000_000;
        c.validate()
            .expect("the largest op rate, with room for its replies");
    }

    #[test]
    fn the_three_listeners_are_distinct() {
        let mut c = Config::default();
        c.tls.cert = Some("c.pem".into());
        c.tls.key = Some("k.pem".into());
        c.tls.listen = Some("127.0.0.1:9443".parse().unwrap());
        c.admin.listen = "127.0.0.1:9443".parse().unwrap();
        let e = c.validate().unwrap_err().0;
        assert_eq!(e, "admin.listen: must differ from `tls.listen`");
        c.admin.listen = c.listen;
        let e = c.validate().unwrap_err().0;
        assert_eq!(e, "admin.listen: must differ from `listen`");
    }

    #[test]
    fn a_cluster_block_is_checked_naming_the_key() {
        let ok = Config::from_toml("[cluster]\nnats_url = [\"nats://127.0.0.1:4222\"]").unwrap();
        assert_eq!(
            ok.cluster.as_ref().unwrap().lease_ms,
            6_000,
            "defaults fill the rest"
        );
        ok.validate().unwrap();
        assert!(
            Config::default().cluster.is_none(),
            "no block: a single node"
        );
        let cases = [
            ("nats_url = []", "cluster.nats_url: at least one"),
            (
                "nats_url = [\"http://x:1\"]",
                "cluster.nats_url: `http://x:1`: the scheme",
            ),
            (
                "nats_url = [\"nats://x:99999\"]",
                "cluster.nats_url: `nats://x:99999`: the port",
            ),
            ("node_id = \"a.b\"", "cluster.node_id: `a.b`: 1 to 64"),
            ("node_id = \"\"", "cluster.node_id"),
            ("prefix = \"a..b\"", "cluster.prefix"),
            ("prefix = \"a.>\"", "cluster.prefix"),
            (
                "user = \"u\"",
                "cluster.user: `user` and `password` go together",
            ),
            (
                "token = \"t\"\ncredentials_file = \"c\"",
                "cluster.token: one of",
            ),
            ("tls_cert = \"c.pem\"", "cluster.tls_cert"),
            (
                "lease_ms = 300\nbatch_us = 200000",
                "cluster.batch_us: must be well under",
            ),
            ("lease_ms = 10", "cluster.lease_ms: must be between"),
            ("surprise = 1", "unknown field `surprise`"),
        ];
        for (body, want) in cases {
            let e = match Config::from_toml(&format!("[cluster]\n{body}")) {
                Err(e) => e.0,
                Ok(c) => c.validate().unwrap_err().0,
            };
            assert!(e.contains(want), "{body}: {e}");
        }
        for url in [
            "nats://u:p@h:4222",
            "tls://h:4443",
            "h:4222",
            "nats://tok@h",
        ] {
            assert_eq!(check_nats_url(url), Ok(()), "{url}");
        }
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-2,5").unwrap(), vec![0, 1, 2, 5]);
        assert!(parse_cpu_list("3-1").is_err());
        assert!(parse_cpu_list("x").is_err());
        assert!(parse_cpu_list("").is_err());
    }
}
