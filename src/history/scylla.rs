//! The `scylla` backend: history in ScyllaDB (or Cassandra) through the `scylla` driver, on the
//! writer thread's single-threaded tokio runtime. Schema: `schema/presenced.cql` ([`schema`]).
//!
//! - **Lazy connection.** Nothing connects until the first write or query, and a failed connect
//!   is a retryable error: a cluster that is down when the server starts costs retried, then
//!   dropped and counted, batches, never a failed start or a stalled shard.
//! - **Writes.** Prepared statements at LOCAL_QUORUM, token-aware routing (the driver's default
//!   policy, preferring `local_dc` when set), an unlogged batch per partition chunk (never across
//!   partitions: a batch is routed to its first row's replicas), at most `max_in_flight` requests
//!   at once. The driver does not retry by itself: the writer does, with backoff and jitter, and
//!   counts it.
//! - **Retries that neither duplicate nor start over.** A row's key is (partition, ts, n); `n` is
//!   a per-writer counter (random start) that a retried batch gets again, so a write the client
//!   gave up on but the cluster applied is overwritten by its retry, not duplicated; and the retry
//!   sends only the requests that failed, so a flaky cluster still makes progress.
//! - **Retention** is the tables' TTL: [`Store::expire`] has nothing to do.
//! - **Reads** ask one partition (a user's day, an hour's bucket, a day of samples) at a time,
//!   paged, in order, stopping at the limit; ranges are bounded by the retention.
//!
//! [`schema`]: super::schema

pub mod errors;
mod reads;
pub mod rows;
mod writes;

use std::time::Duration;

use ::scylla::client::execution_profile::ExecutionProfile;
use ::scylla::client::session::Session;
use ::scylla::client::session_builder::SessionBuilder;
use ::scylla::policies::load_balancing::DefaultPolicy;
use ::scylla::policies::retry::FallthroughRetryPolicy;
use ::scylla::statement::prepared::PreparedStatement;
use ::scylla::statement::Consistency;

use super::event::{HistoryEvent, Sample};
use super::schema;
use super::store::{Store, StoreError};
use crate::config::ScyllaConfig;
use writes::Progress;

/// Rows per unlogged batch (all of one partition): well under the cluster's batch size warning
/// (128 KiB by default) for events with a few groups.
pub const BATCH_ROWS_MAX: usize = 32;
/// Rows per page when reading.
const PAGE_ROWS: i32 = 1_000;

/// Opens a driver session to `cfg.nodes` as configured: token-aware routing preferring
/// `local_dc`, credentials, `request_timeout_ms` per request, no driver-side retries (the writer
/// retries with backoff). DDL (`schema apply`) waits for schema agreement but does not refresh
/// the driver's metadata after it: nothing here needs it, and kassandra (the test server) cannot
/// answer that refresh.
pub async fn connect(cfg: &ScyllaConfig) -> Result<Session, StoreError> {
    let timeout = Duration::from_millis(cfg.request_timeout_ms.max(1));
    let mut policy = DefaultPolicy::builder().token_aware(true);
    if let Some(dc) = &cfg.local_dc {
        policy = policy.prefer_datacenter(dc.clone());
    }
    let profile = ExecutionProfile::builder()
        // A quorum of the local datacenter's replicas acknowledges each write.
        .consistency(Consistency::LocalQuorum)
        .load_balancing_policy(policy.build())
        .retry_policy(std::sync::Arc::new(FallthroughRetryPolicy::new()))
        .request_timeout(Some(timeout))
        .build();
    let mut builder = SessionBuilder::new()
        .known_nodes(&cfg.nodes)
        .connection_timeout(timeout)
        .default_execution_profile_handle(profile.into_handle())
        .auto_await_schema_agreement(true)
        .refresh_metadata_on_auto_schema_agreement(false);
    if let Some(user) = &cfg.username {
        builder = builder.user(user.clone(), cfg.password.clone().unwrap_or_default());
    }
    // Bounded: a connect to a cluster that accepts TCP but never answers must not hang the
    // writer (contact points are tried in turn, each within `timeout`).
    let whole = timeout * (cfg.nodes.len() as u32 + 2);
    match tokio::time::timeout(whole, builder.build()).await {
        Ok(Ok(session)) => Ok(session),
        Ok(Err(e)) => Err(StoreError {
            retryable: errors::connect_retryable(&e),
            message: format!("scylla: connecting to {:?}: {e}", cfg.nodes),
        }),
        Err(_) => Err(StoreError::retry(format!(
            "scylla: connecting to {:?}: no answer in {whole:?}",
            cfg.nodes
        ))),
    }
}

/// The CQL of every statement the store prepares, for keyspace `ks` and a TTL of `ttl_s`.
struct Cql {
    insert_event: String,
    insert_session: String,
    insert_sample: String,
    events_desc: String,
    events_asc: String,
    sessions: String,
    samples: String,
}

/// The columns reads select (and inserts write, with the partition key in front).
pub const EVENT_COLUMNS: &str = "user_id, ts, n, kind, session, started_at, device, device_type, \
                             region, groups, status, status_text, devices, seq";
pub const SESSION_COLUMNS: &str =
    "user_id, ts, n, kind, session, started_at, device, device_type, region, groups, status";

impl Cql {
    fn new(ks: &str, ttl_s: u64) -> Cql {
        let insert = |table: &str, cols: &str| {
            let marks = vec!["?"; cols.split(',').count()].join(", ");
            format!("INSERT INTO {ks}.{table} ({cols}) VALUES ({marks}) USING TTL {ttl_s}")
        };
        let events = |order: &str| {
            format!(
                "SELECT {EVENT_COLUMNS} FROM {ks}.events_by_user WHERE user_id = ? AND day = ? \
                 AND ts >= ? AND ts <= ? ORDER BY ts {order}, n {order} LIMIT ?"
            )
        };
        Cql {
            insert_event: insert("events_by_user", &format!("day, {EVENT_COLUMNS}")),
            insert_session: insert(
                "sessions_by_hour",
                &format!("hour, bucket, {SESSION_COLUMNS}"),
            ),
            insert_sample: insert("samples_by_day", "day, ts, online, groups"),
            events_desc: events("DESC"),
            events_asc: events("ASC"),
            sessions: format!(
                "SELECT {SESSION_COLUMNS} FROM {ks}.sessions_by_hour WHERE hour = ? AND bucket = ? \
                 AND ts >= ? AND ts <= ? LIMIT ?"
            ),
            samples: format!(
                "SELECT ts, online, groups FROM {ks}.samples_by_day WHERE day = ? \
                 AND ts >= ? AND ts <= ? LIMIT ?"
            ),
        }
    }
}

/// The prepared statements (prepared once per session).
struct Statements {
    insert_event: PreparedStatement,
    insert_session: PreparedStatement,
    insert_sample: PreparedStatement,
    events_desc: PreparedStatement,
    events_asc: PreparedStatement,
    sessions: PreparedStatement,
    samples: PreparedStatement,
}

pub struct ScyllaStore {
    /// Boxed, like the session: the store is moved into the writer thread in an enum with the
    /// (small) local store.
    cfg: Box<ScyllaConfig>,
    /// The TTL of what is written, and how far back reads look.
    retention_days: u32,
    /// The driver session, once connected (the driver reconnects by itself after that).
    session: Option<Box<Session>>,
    /// Prepared once the schema is there (`schema apply`); retried at each call until then.
    statements: Option<Box<Statements>>,
    /// `n` of the next new batch's first event; each new batch advances it by its length.
    next_n: u64,
    /// The last batch, while it has not been written whole.
    unfinished: Option<Progress>,
    /// The last write stored some of its batch's partitions ([`Store::write_progressed`]).
    progressed: bool,
}

impl ScyllaStore {
    /// A store for `cfg`; connects at the first write or query, from whatever tokio runtime
    /// runs it (the writer thread's, or a test's current-thread runtime).
    pub fn new(cfg: &ScyllaConfig, retention_days: u32) -> ScyllaStore {
        ScyllaStore {
            cfg: Box::new(cfg.clone()),
            retention_days,
            session: None,
            statements: None,
            // A random start (below 2^62, so `n` never wraps past i64::MAX and orders as it
            // grows): two writers (servers) do not share keys within a millisecond.
            next_n: (rand::random::<u64>() >> 2) & !0xFFFF_FFFF,
            unfinished: None,
            progressed: false,
        }
    }

    /// Connects and prepares, as far as needed.
    async fn ready(&mut self) -> Result<(&Session, &Statements), StoreError> {
        if self.session.is_none() {
            let session = connect(&self.cfg).await?;
            tracing::info!(nodes = ?self.cfg.nodes, "history: connected to scylla");
            self.session = Some(Box::new(session));
        }
        let session = self.session.as_ref().expect("connected just above");
        if self.statements.is_none() {
            let prepared = prepare(session, &self.cfg.keyspace, self.retention_days).await?;
            self.statements = Some(Box::new(prepared));
        }
        Ok((
            session,
            self.statements.as_ref().expect("prepared just above"),
        ))
    }

    fn max_in_flight(&self) -> usize {
        self.cfg.max_in_flight.max(1)
    }
}

async fn prepare(
    session: &Session,
    ks: &str,
    retention_days: u32,
) -> Result<Statements, StoreError> {
    let cql = Cql::new(ks, schema::ttl_s(retention_days));
    let p = |q: String| async move {
        let mut st = session.prepare(q.as_str()).await.map_err(|e| StoreError {
            retryable: errors::prepare_retryable(&e),
            message: format!(
                "scylla: preparing `{q}`: {e} (has `presenced schema apply` run for this keyspace?)"
            ),
        })?;
        st.set_is_idempotent(true);
        st.set_page_size(PAGE_ROWS);
        Ok::<_, StoreError>(st)
    };
    Ok(Statements {
        insert_event: p(cql.insert_event).await?,
        insert_session: p(cql.insert_session).await?,
        insert_sample: p(cql.insert_sample).await?,
        events_desc: p(cql.events_desc).await?,
        events_asc: p(cql.events_asc).await?,
        sessions: p(cql.sessions).await?,
        samples: p(cql.samples).await?,
    })
}

impl Store for ScyllaStore {
    async fn write(
        &mut self,
        events: &[HistoryEvent],
        samples: &[Sample],
    ) -> Result<(), StoreError> {
        self.write_batch(events, samples).await
    }

    fn write_progressed(&self) -> bool {
        self.progressed
    }

    async fn history(
        &mut self,
        user: &str,
        from: u64,
        to: u64,
        limit: usize,
    ) -> Result<Vec<HistoryEvent>, StoreError> {
        self.events(user, from, to, limit, true).await
    }

    async fn user_events(
        &mut self,
        user: &str,
        from: u64,
        to: u64,
        max: usize,
    ) -> Result<Vec<HistoryEvent>, StoreError> {
        self.events(user, from, to, max, false).await
    }

    async fn samples(
        &mut self,
        from: u64,
        to: u64,
        max: usize,
        only_group: Option<Option<&str>>,
    ) -> Result<Vec<Sample>, StoreError> {
        self.read_samples(from, to, max, only_group).await
    }

    async fn presence_between(
        &mut self,
        from: u64,
        to: u64,
        max: usize,
    ) -> Result<Vec<HistoryEvent>, StoreError> {
        self.read_presence(from, to, max).await
    }

    async fn expire(&mut self, _before: u64, _max: usize) -> Result<u64, StoreError> {
        // The tables' TTL expires rows; TimeWindowCompactionStrategy drops whole SSTables.
        Ok(0)
    }
}
