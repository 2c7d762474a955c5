//! The history writer thread: batches records by size and time, writes them with retries and
//! backoff, enforces retention, answers queries, and flushes (with a deadline) at shutdown.
//!
//! It runs on its own thread (pinned to `history.cpu` when set, never a shard's core by
//! default) with a single-threaded tokio runtime, which the `scylla` driver needs and the local
//! store does not mind. Nothing here can slow a shard: shards only ever `try_send`.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::analytics;
use super::event::{HistoryEvent, Sample};
use super::store::{CompactPolicy, Opened, Store, StoreError};
use super::{Answer, HistoryMetrics, Query, Record, Reply};
use crate::config::HistoryConfig;
use crate::shard::now_ms;

/// Retention (the local store; Scylla's rows expire by TTL): a turn deletes what is older than
/// `retention_days`, in transactions of at most `RETENTION_CHUNK` records, for at most
/// `RETENTION_TURN` of the writer's time. When it caught up, the next turn comes
/// `RETENTION_EVERY` later; when a backlog is left (the first start after downtime, a shorter
/// retention, a write rate past what one turn a minute deletes), the next comes after the writer
/// has had as long again for batches and questions. So retention keeps up with any rate the
/// writer sustains, and never holds the writer for more than one turn.
const RETENTION_EVERY: Duration = Duration::from_secs(60);
const RETENTION_CHUNK: usize = 2_000;
const RETENTION_TURN: Duration = Duration::from_millis(100);
/// At most this often, after retention has deleted something and caught up, the writer
/// measures the local store's free space (which walks its pages) to decide whether to compact
/// it. The first such check may come at start: a start that finds nothing to delete does not
/// walk the store, however large it is.
const COMPACT_CHECK_EVERY: Duration = Duration::from_secs(600);
/// While a batch is open, the writer looks at its queue this many times per
/// `batch_interval_ms` instead of waking for every record: one wake-up per record cost the
/// server more CPU than writing it (docs/BENCHMARKS.md, "Issue 14"). The queue
/// (`queue_capacity`) holds what arrives between two looks; a look that finds a full batch
/// writes it, and the writer then takes the rest one batch per turn, as before.
const CHECKS_PER_BATCH: u32 = 4;

/// How a retention turn ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Turn {
    CaughtUp,
    /// A backlog is left: the next turn comes soon.
    MoreLeft,
    /// The store refused: the next try comes `RETENTION_EVERY` later.
    Failed,
}

/// Whether to measure the store for a compaction after a retention turn: only after a turn
/// that caught up (not after a store error), when something was deleted since the last check,
/// at most every `COMPACT_CHECK_EVERY`.
fn compaction_check_due(turn: Turn, expired_since_check: u64, last: Option<Instant>) -> bool {
    turn == Turn::CaughtUp
        && expired_since_check > 0
        && last.is_none_or(|at| at.elapsed() >= COMPACT_CHECK_EVERY)
}

pub struct Writer {
    cfg: HistoryConfig,
    records: flume::Receiver<Record>,
    queries: flume::Receiver<(Query, Reply)>,
    stop: flume::Receiver<Duration>,
    metrics: Arc<HistoryMetrics>,
    events: Vec<HistoryEvent>,
    samples: Vec<Sample>,
    /// Set when shutdown was asked for during a flush's retries: the flush gives up by then.
    stop_by: Option<Instant>,
    /// The stop signal has been taken (shutdown under way) or can no longer come: a flush's
    /// backoff must not listen for it any more.
    stop_taken: bool,
}

impl Writer {
    pub fn new(
        cfg: HistoryConfig,
        records: flume::Receiver<Record>,
        queries: flume::Receiver<(Query, Reply)>,
        stop: flume::Receiver<Duration>,
        metrics: Arc<HistoryMetrics>,
    ) -> Writer {
        Writer {
            events: Vec::with_capacity(cfg.batch_max),
            samples: Vec::new(),
            stop_by: None,
            stop_taken: false,
            cfg,
            records,
            queries,
            stop,
            metrics,
        }
    }

    /// The thread's body.
    pub fn run(self, store: Opened) {
        if let Some(cpu) = self.cfg.cpu {
            pin_to(cpu);
        }
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(error = %e, "history: cannot build the writer runtime; history is off");
                return;
            }
        };
        rt.block_on(async move {
            match store {
                Opened::Local(s) => self.run_with(s).await,
                Opened::Scylla(s) => self.run_with(s).await,
            }
        });
    }

    fn pending(&self) -> usize {
        self.events.len() + self.samples.len()
    }

    /// Takes what is already queued, without waiting, until the batch is full.
    fn take_queued(&mut self) {
        while self.pending() < self.cfg.batch_max {
            match self.records.try_recv() {
                Ok(r) => self.take(r),
                Err(_) => break,
            }
        }
    }

    fn take(&mut self, r: Record) {
        match r {
            Record::Event(e) => self.events.push(e),
            Record::Sample(s) => self.samples.push(s),
        }
    }

    async fn run_with<S: Store>(mut self, mut store: S) {
        let batch_wait = Duration::from_millis(self.cfg.batch_interval_ms);
        let batch_check = (batch_wait / CHECKS_PER_BATCH).max(Duration::from_millis(1));
        let mut batch_due: Option<tokio::time::Instant> = None;
        // While a batch is open: when the writer next looks at its queue.
        let mut next_check = tokio::time::Instant::now();
        // The first retention turn at once.
        let mut retention_due = tokio::time::Instant::now();
        let mut compact_checked: Option<Instant> = None;
        let mut expired_since_check = 0u64;
        self.note_disk(&store);
        let mut queries_open = true;
        loop {
            if let Some(deadline) = self.stop_by {
                // Shutdown arrived while a flush was retrying.
                self.shutdown(&mut store, deadline).await;
                return;
            }
            // While a batch is open the writer does not wake for each record: it looks at the
            // queue every `batch_wait / CHECKS_PER_BATCH` (and at the batch's due time), so a
            // steady trickle of records costs a few wake-ups per batch, not one per record.
            let due = batch_due
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            let look = next_check.min(due);
            // Not biased: under a flood of records, questions still get their turn, and the
            // other way round.
            tokio::select! {
                deadline = self.stop.recv_async(), if !self.stop_taken => {
                    self.stop_taken = true;
                    // No message (the handle was dropped without `stop`): the configured grace.
                    let grace = deadline
                        .unwrap_or(Duration::from_millis(self.cfg.flush_deadline_ms));
                    let deadline = Instant::now() + grace;
                    self.shutdown(&mut store, deadline).await;
                    return;
                }
                q = self.queries.recv_async(), if queries_open => {
                    match q {
                        // The admin side gave up already (timeout): no point in the work.
                        Ok((_, reply)) if reply.is_disconnected() => {}
                        Ok((q, reply)) => {
                            // A bug in a query must not take the writer (and its batch) down.
                            use futures_lite::FutureExt;
                            let answer = std::panic::AssertUnwindSafe(self.answer(&mut store, q))
                                .catch_unwind()
                                .await
                                .unwrap_or_else(|_| Err("the query failed (a bug: see the log)".into()));
                            HistoryMetrics::add(&self.metrics.queries, 1);
                            let _ = reply.try_send(answer);
                        }
                        // Every sink is gone; the records still queued are written below.
                        Err(_) => queries_open = false,
                    }
                }
                r = self.records.recv_async(), if batch_due.is_none() => {
                    let Ok(r) = r else {
                        // Every sink is gone without a stop: flush what is here, within the deadline.
                        let grace = Duration::from_millis(self.cfg.flush_deadline_ms);
                        self.shutdown(&mut store, Instant::now() + grace).await;
                        return;
                    };
                    self.take(r);
                    self.take_queued();
                    if self.pending() >= self.cfg.batch_max {
                        self.flush(&mut store, None).await;
                    } else {
                        let now = tokio::time::Instant::now();
                        batch_due = Some(now + batch_wait);
                        next_check = now + batch_check;
                    }
                }
                _ = tokio::time::sleep_until(look), if batch_due.is_some() => {
                    // At most one batch per look, like one per turn when records wake the
                    // writer: questions and the stop signal get their turn between batches.
                    self.take_queued();
                    let now = tokio::time::Instant::now();
                    if self.pending() >= self.cfg.batch_max || now >= due {
                        self.flush(&mut store, None).await;
                        // What is still queued opens the next batch at once (the branch
                        // above), and a full one is written on the next turn.
                        batch_due = None;
                    } else {
                        next_check = now + batch_check;
                    }
                }
                _ = tokio::time::sleep_until(retention_due) => {
                    let (expired, turn) = self.expire(&mut store).await;
                    expired_since_check += expired;
                    retention_due = tokio::time::Instant::now()
                        + if turn == Turn::MoreLeft { RETENTION_TURN } else { RETENTION_EVERY };
                    if compaction_check_due(turn, expired_since_check, compact_checked) {
                        self.compact(&mut store).await;
                        compact_checked = Some(Instant::now());
                        expired_since_check = 0;
                    }
                    self.note_disk(&store);
                }
            }
        }
    }

    /// Writes the pending batch, retrying retryable errors with exponential backoff and full
    /// jitter up to `max_retries` (or until `deadline`); then drops it and counts the loss.
    async fn flush<S: Store>(&mut self, store: &mut S, deadline: Option<Instant>) {
        if self.pending() == 0 {
            return;
        }
        let n = self.pending() as u64;
        let sc = &self.cfg.scylla;
        let mut attempt = 0u32;
        loop {
            let deadline = match (deadline, self.stop_by) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let started = Instant::now();
            let result = match deadline {
                // Past a deadline a hung store cannot hold the thread: the write is abandoned.
                Some(d) => tokio::time::timeout(
                    d.saturating_duration_since(Instant::now()),
                    store.write(&self.events, &self.samples),
                )
                .await
                .unwrap_or_else(|_| Err(StoreError::retry("write abandoned at the deadline"))),
                None => store.write(&self.events, &self.samples).await,
            };
            let us = started.elapsed().as_micros() as u64;
            match result {
                Ok(()) => {
                    // The size first: whoever sees the records counted sees the file that holds them.
                    self.note_disk(store);
                    let m = &self.metrics;
                    HistoryMetrics::add(&m.written, n);
                    HistoryMetrics::add(&m.batches, 1);
                    HistoryMetrics::add(&m.batch_records, n);
                    m.write_latency.record(us);
                    break;
                }
                Err(e) => {
                    HistoryMetrics::add(&self.metrics.write_errors, 1);
                    if store.write_progressed() {
                        // Part of the batch went in: the cluster is alive, and the retry sends
                        // only what is left. The budget (and the backoff) start again.
                        attempt = 0;
                    }
                    let out_of_time = deadline.is_some_and(|d| Instant::now() >= d);
                    if !e.retryable || attempt >= sc.max_retries || out_of_time {
                        HistoryMetrics::add(&self.metrics.dropped_write_failed, n);
                        tracing::warn!(error = %e, records = n, attempts = attempt + 1,
                            "history: batch dropped");
                        break;
                    }
                    let wait = backoff(sc.retry_base_ms, sc.retry_max_ms, attempt);
                    let wait = match deadline {
                        Some(d) => wait.min(d.saturating_duration_since(Instant::now())),
                        None => wait,
                    };
                    tracing::debug!(error = %e, ?wait, "history: write failed, retrying");
                    attempt += 1;
                    HistoryMetrics::add(&self.metrics.retries, 1);
                    // Shutdown must not wait out a backoff: it bounds what is left.
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        stop = self.stop.recv_async(), if !self.stop_taken => {
                            self.stop_taken = true;
                            // A closed channel without a message is no request to stop now.
                            if let Ok(grace) = stop {
                                self.stop_by = Some(Instant::now() + grace);
                            } else {
                                tokio::time::sleep(wait).await;
                            }
                        }
                    }
                }
            }
        }
        self.events.clear();
        self.samples.clear();
        if self.events.capacity() > 4 * self.cfg.batch_max {
            self.events = Vec::with_capacity(self.cfg.batch_max);
        }
    }

    /// One retention turn: returns how many records it deleted, and how it ended.
    async fn expire<S: Store>(&mut self, store: &mut S) -> (u64, Turn) {
        let keep_ms = u64::from(self.cfg.retention_days) * 86_400_000;
        let before = now_ms().saturating_sub(keep_ms);
        let started = Instant::now();
        let mut total = 0;
        loop {
            match store.expire(before, RETENTION_CHUNK).await {
                Ok(n) => {
                    HistoryMetrics::add(&self.metrics.expired, n);
                    total += n;
                    if n < RETENTION_CHUNK as u64 {
                        return (total, Turn::CaughtUp);
                    }
                    if started.elapsed() >= RETENTION_TURN {
                        return (total, Turn::MoreLeft);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "history: retention failed; next try in a minute");
                    return (total, Turn::Failed);
                }
            }
        }
    }

    /// Compacts the store if it is worth it (the local store; others have nothing to do). It
    /// holds the writer while it runs: records wait in the queue (past `queue_capacity`, shards
    /// drop and count them, as during any slow write) and questions wait (past
    /// `admin.query_timeout_ms`, they are answered 503).
    async fn compact<S: Store>(&mut self, store: &mut S) {
        let policy = CompactPolicy {
            min_free_bytes: self.cfg.compact_min_free_mb << 20,
            min_free_pct: self.cfg.compact_min_free_pct,
        };
        let started = Instant::now();
        match store.compact(policy).await {
            Ok(Some(c)) => {
                let freed = c.before.disk_bytes.saturating_sub(c.after_disk_bytes);
                HistoryMetrics::add(&self.metrics.compactions, 1);
                HistoryMetrics::add(&self.metrics.compaction_freed_bytes, freed);
                tracing::info!(
                    before = c.before.disk_bytes,
                    after = c.after_disk_bytes,
                    took_ms = started.elapsed().as_millis() as u64,
                    "history: store compacted"
                );
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "history: compaction failed"),
        }
    }

    /// Publishes the store's size on disk (`presenced_history_disk_bytes`).
    fn note_disk<S: Store>(&self, store: &S) {
        if let Some(bytes) = store.disk_bytes() {
            self.metrics.disk_bytes.store(bytes, Relaxed);
            self.metrics.disk_bytes_known.store(true, Relaxed);
        }
    }

    /// Drains the queue and writes it, until `deadline`; logs what it could not write.
    async fn shutdown<S: Store>(&mut self, store: &mut S, deadline: Instant) {
        loop {
            self.take_queued();
            if self.pending() == 0 {
                break;
            }
            if Instant::now() >= deadline {
                let left = self.pending() + self.records.len();
                HistoryMetrics::add(&self.metrics.dropped_write_failed, left as u64);
                tracing::warn!(
                    records = left,
                    "history: shutdown deadline passed; records not written"
                );
                return;
            }
            self.flush(store, Some(deadline)).await;
        }
        tracing::info!(
            written = HistoryMetrics::get(&self.metrics.written),
            "history: flushed"
        );
    }

    async fn answer<S: Store>(&mut self, store: &mut S, q: Query) -> Result<Answer, String> {
        let max = self.cfg.max_query_events;
        let fail = |e: StoreError| e.message;
        match q {
            Query::History {
                user,
                from,
                to,
                limit,
            } => store
                .history(&user, from, to, limit)
                .await
                .map(Answer::Events)
                .map_err(fail),
            Query::Analytics { user, from, to } => {
                // Sessions that began before `from` but overlap it: read back over the whole
                // retention window (one user's range; bounded by `max_query_events`).
                let keep_ms = u64::from(self.cfg.retention_days) * 86_400_000;
                let events = store
                    .user_events(&user, from.saturating_sub(keep_ms), to, max)
                    .await
                    .map_err(fail)?;
                Ok(Answer::Analytics(analytics::analytics(
                    &events,
                    from,
                    to,
                    now_ms(),
                )))
            }
            Query::Replay {
                from,
                to,
                step,
                group,
            } => {
                let samples = store
                    .samples(from.saturating_sub(step), to, max, Some(group.as_deref()))
                    .await
                    .map_err(fail)?;
                Ok(Answer::Replay(analytics::replay(
                    &samples,
                    from,
                    to,
                    step,
                    group.as_deref(),
                )))
            }
            Query::At { t, group, limit } => {
                let lookback = self.cfg.replay_lookback_h * 3_600_000;
                let events = store
                    .presence_between(t.saturating_sub(lookback), t, max)
                    .await
                    .map_err(fail)?;
                let (users, total) = analytics::online_at(&events, t, group.as_deref(), limit);
                Ok(Answer::At { users, total })
            }
        }
    }
}

/// Exponential backoff with full jitter: uniform in `[0, min(max, base · 2^attempt)]`.
pub fn backoff(base_ms: u64, max_ms: u64, attempt: u32) -> Duration {
    let cap = base_ms
        .saturating_mul(1u64 << attempt.min(20))
        .min(max_ms)
        .max(1);
    Duration::from_millis(rand::random_range(0..=cap))
}

/// Pins the calling thread to `cpu` (best effort; logged when refused).
fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it; the call only
    // reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            tracing::warn!(cpu, error = %std::io::Error::last_os_error(), "history: cannot pin the writer thread");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        for attempt in 0..30 {
            let d = backoff(50, 5_000, attempt);
            assert!(d <= Duration::from_millis(5_000));
            assert!(d <= Duration::from_millis(50u64.saturating_mul(1 << attempt.min(20)).max(1)));
        }
        let spread: std::collections::HashSet<_> = (0..50).map(|_| backoff(50, 5_000, 6)).collect();
        assert!(spread.len() > 5, "jittered");
    }

    #[test]
    fn the_store_is_measured_only_after_deletions_that_caught_up() {
        let long_ago = Instant::now().checked_sub(COMPACT_CHECK_EVERY * 2);
        // At start (never checked): only if the first turn deleted something.
        assert!(!compaction_check_due(Turn::CaughtUp, 0, None));
        assert!(compaction_check_due(Turn::CaughtUp, 10, None));
        // Not while a backlog is left, nor after a store error.
        assert!(!compaction_check_due(Turn::MoreLeft, 10, None));
        assert!(!compaction_check_due(Turn::Failed, 10, None));
        // At most every COMPACT_CHECK_EVERY.
        assert!(!compaction_check_due(
            Turn::CaughtUp,
            10,
            Some(Instant::now())
        ));
        if long_ago.is_some() {
            assert!(compaction_check_due(Turn::CaughtUp, 10, long_ago));
            assert!(!compaction_check_due(Turn::CaughtUp, 0, long_ago));
        }
    }
}
