//! Writing a batch: rows grouped by partition into requests (an unlogged batch of one partition's
//! rows, or a single row), sent with bounded concurrency; a failed batch's retry resends only
//! what failed, with the same keys.

use ::scylla::client::session::Session;
use ::scylla::serialize::row::SerializeRow;
use ::scylla::statement::batch::{Batch, BatchType};
use ::scylla::statement::prepared::PreparedStatement;
use futures_util::stream::{FuturesUnordered, StreamExt};
use std::collections::HashMap;

use super::rows::{EventRow, SampleRow, SessionRow};
use super::{errors, ScyllaStore, Statements, BATCH_ROWS_MAX};
use crate::history::event::{HistoryEvent, Sample};
use crate::history::store::StoreError;

/// A batch not yet written whole, which the writer will retry (it passes the same records
/// again): the retry writes the same rows (same `n`) and skips the requests that succeeded.
pub(super) struct Progress {
    fingerprint: u64,
    base_n: u64,
    /// Per request (partition chunk) of the batch: written already.
    done: Vec<bool>,
}

/// Identifies a batch's content across the writer's retries: a hash of every field of every
/// record, so only the same records (which make the same rows) resume its progress.
fn fingerprint(events: &[HistoryEvent], samples: &[Sample]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = Vec::with_capacity(256);
    for e in events {
        buf.clear();
        serde_json::to_writer(&mut buf, e).expect("events serialise");
        h.update(&buf);
        h.update(&[0]);
    }
    h.update(&[1]);
    for s in samples {
        buf.clear();
        serde_json::to_writer(&mut buf, s).expect("samples serialise");
        h.update(&buf);
        h.update(&[0]);
    }
    h.digest()
}

/// One request of a write: a partition's rows of one table (one row: a plain EXECUTE).
enum Job<'r> {
    Events(Vec<&'r EventRow<'r>>),
    Sessions(Vec<&'r SessionRow<'r>>),
    Sample(&'r SampleRow<'r>),
}

/// Groups rows by partition, in first-seen order, in chunks of at most [`BATCH_ROWS_MAX`].
fn by_partition<R, K: Eq + std::hash::Hash>(rows: &[R], key: impl Fn(&R) -> K) -> Vec<Vec<&R>> {
    let mut index: HashMap<K, usize> = HashMap::new();
    let mut groups: Vec<Vec<&R>> = Vec::new();
    for r in rows {
        let i = *index.entry(key(r)).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[i].push(r);
    }
    groups
        .into_iter()
        .flat_map(|g| {
            g.chunks(BATCH_ROWS_MAX)
                .map(<[&R]>::to_vec)
                .collect::<Vec<_>>()
        })
        .collect()
}

async fn run_rows<R: SerializeRow>(
    session: &Session,
    st: &PreparedStatement,
    rows: &[&R],
) -> Result<(), StoreError> {
    let result = if let [row] = rows {
        session.execute_unpaged(st, row).await.map(drop)
    } else {
        let mut batch = Batch::new(BatchType::Unlogged);
        for _ in rows {
            batch.append_statement(st.clone());
        }
        batch.set_is_idempotent(true);
        session.batch(&batch, rows).await.map(drop)
    };
    result.map_err(|e| errors::write_error("writing", &e))
}

impl Job<'_> {
    async fn run(&self, session: &Session, st: &Statements) -> Result<(), StoreError> {
        match self {
            Job::Events(rows) => run_rows(session, &st.insert_event, rows).await,
            Job::Sessions(rows) => run_rows(session, &st.insert_session, rows).await,
            Job::Sample(row) => run_rows(session, &st.insert_sample, &[*row]).await,
        }
    }
}

/// Runs the jobs not yet `done` (marking those that succeed), at most `max_in_flight` at once.
/// A failed job does not stop the others (a flaky cluster still makes progress, and the retry
/// only sends what is left), but after `max_in_flight` failures, or a fatal one, no new job
/// starts: a dead cluster costs one round of timeouts per attempt, not one per partition.
async fn run_all(
    session: &Session,
    st: &Statements,
    jobs: &[Job<'_>],
    done: &mut [bool],
    max_in_flight: usize,
) -> Result<(), StoreError> {
    assert_eq!(jobs.len(), done.len(), "a done flag per job");
    let mut pending = (0..jobs.len())
        .filter(|&i| !done[i])
        .collect::<Vec<_>>()
        .into_iter();
    let mut running = FuturesUnordered::new();
    let mut failures = 0;
    let mut error: Option<StoreError> = None;
    loop {
        while running.len() < max_in_flight && failures < max_in_flight {
            let Some(i) = pending.next() else { break };
            running.push(async move { (i, jobs[i].run(session, st).await) });
        }
        match running.next().await {
            None => break,
            Some((i, Ok(()))) => done[i] = true,
            Some((_, Err(e))) => {
                failures += 1;
                if !e.retryable {
                    failures = max_in_flight;
                }
                // A fatal error wins: the batch is dropped rather than retried in vain.
                if error
                    .as_ref()
                    .is_none_or(|old| old.retryable && !e.retryable)
                {
                    error = Some(e);
                }
            }
        }
    }
    error.map_or(Ok(()), Err)
}

impl ScyllaStore {
    /// [`Store::write`](crate::history::store::Store::write).
    pub(super) async fn write_batch(
        &mut self,
        events: &[HistoryEvent],
        samples: &[Sample],
    ) -> Result<(), StoreError> {
        if events.is_empty() && samples.is_empty() {
            return Ok(());
        }
        let fp = fingerprint(events, samples);
        let mut progress = match self.unfinished.take() {
            Some(p) if p.fingerprint == fp => p,
            _ => {
                let base_n = self.next_n;
                self.next_n = self.next_n.wrapping_add(events.len() as u64);
                Progress {
                    fingerprint: fp,
                    base_n,
                    done: Vec::new(),
                }
            }
        };
        self.progressed = false;
        let base = progress.base_n;
        let max_in_flight = self.max_in_flight();
        let (session, st) = match self.ready().await {
            Ok(ready) => ready,
            Err(e) => {
                self.unfinished = Some(progress);
                return Err(e);
            }
        };
        let event_rows: Vec<EventRow> = (0u64..)
            .zip(events)
            .map(|(i, e)| EventRow::new(e, base.wrapping_add(i)))
            .collect();
        let session_rows: Vec<SessionRow> = (0u64..)
            .zip(events)
            .map(|(i, e)| SessionRow::new(e, base.wrapping_add(i)))
            .collect();
        let sample_rows: Vec<SampleRow> = samples.iter().map(SampleRow::new).collect();
        let jobs: Vec<Job> = by_partition(&event_rows, |r| (r.user_id, r.day))
            .into_iter()
            .map(Job::Events)
            .chain(
                by_partition(&session_rows, |r| (r.hour, r.bucket))
                    .into_iter()
                    .map(Job::Sessions),
            )
            .chain(sample_rows.iter().map(Job::Sample))
            .collect();
        // The same records group into the same jobs, in the same order.
        progress.done.resize(jobs.len(), false);
        let done_before = progress.done.iter().filter(|&&d| d).count();
        let result = run_all(session, st, &jobs, &mut progress.done, max_in_flight).await;
        self.progressed = progress.done.iter().filter(|&&d| d).count() > done_before;
        if result.is_err() {
            self.unfinished = Some(progress);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::EventKind;

    #[test]
    fn partitions_are_grouped_in_order_and_chunked() {
        let rows: Vec<(u8, usize)> = (0..100).map(|i| ((i % 3) as u8, i)).collect();
        let groups = by_partition(&rows, |r| r.0);
        for g in &groups {
            assert!(g.len() <= BATCH_ROWS_MAX);
            assert!(g.iter().all(|r| r.0 == g[0].0), "one partition per group");
            assert!(g.windows(2).all(|w| w[0].1 < w[1].1), "in order");
        }
        assert_eq!(groups.iter().map(Vec::len).sum::<usize>(), 100);
        assert_eq!(groups.len(), 3 * 2, "34, 33 and 33 rows: two chunks each");
    }

    #[test]
    fn a_retried_batch_has_the_same_fingerprint_a_different_one_does_not() {
        let e = |ts| HistoryEvent::new(ts, "u".into(), EventKind::Status);
        let a = vec![e(1), e(2)];
        assert_eq!(fingerprint(&a, &[]), fingerprint(&a.clone(), &[]));
        assert_ne!(fingerprint(&a, &[]), fingerprint(&[e(1), e(3)], &[]));
        assert_ne!(fingerprint(&a, &[]), fingerprint(&a[..1], &[]));
        let mut texted = a.clone();
        texted[1].text = Some("x".into());
        assert_ne!(
            fingerprint(&a, &[]),
            fingerprint(&texted, &[]),
            "every field counts"
        );
        let s = Sample::default();
        assert_ne!(fingerprint(&a, &[]), fingerprint(&a, &[s]));
    }
}
