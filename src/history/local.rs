//! The embedded store: one redb file under `history.data_dir`.
//!
//! redb is a pure-Rust, ACID, copy-on-write B-tree store: a committed write transaction is on
//! disk (fsync) before `commit` returns, so what the writer counts as written survives `kill -9`.
//! One transaction per batch keeps that to one fsync per batch.
//!
//! Tables:
//! - `events`: (user, ts, n) → event JSON. A user's events are one contiguous key range.
//! - `by_time`: (ts, n) → user. Time order over all users: retention and "who was online at".
//! - `samples`: ts → sample JSON.
//! - `meta`: the next `n` (a per-store counter that makes keys unique).

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::event::{HistoryEvent, Sample};
use super::store::{Store, StoreError};

const EVENTS: TableDefinition<(&str, u64, u64), &[u8]> = TableDefinition::new("events");
const BY_TIME: TableDefinition<(u64, u64), &str> = TableDefinition::new("by_time");
const SAMPLES: TableDefinition<u64, &[u8]> = TableDefinition::new("samples");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// File name inside `data_dir`.
pub const FILE: &str = "history.redb";

pub struct LocalStore {
    db: Database,
    next: u64,
}

type EventKey<'a> = redb::AccessGuard<'a, (&'static str, u64, u64)>;

fn decode_event(bytes: &[u8]) -> Result<HistoryEvent, StoreError> {
    serde_json::from_slice(bytes)
        .map_err(|e| StoreError::fatal(format!("local store: corrupt event: {e}")))
}

fn err(e: impl std::fmt::Display) -> StoreError {
    // A local disk error will not go away by waiting a few milliseconds, but a full disk can be
    // freed: retry, bounded by `max_retries`, then drop and count.
    StoreError::retry(format!("local store: {e}"))
}

impl LocalStore {
    /// Opens (or creates) the store under `dir`. Errors name `history.data_dir`.
    pub fn open(dir: &Path) -> Result<LocalStore, String> {
        let bad = |e: &dyn std::fmt::Display| format!("history.data_dir ({}): {e}", dir.display());
        std::fs::create_dir_all(dir).map_err(|e| bad(&e))?;
        let db = Database::create(dir.join(FILE)).map_err(|e| bad(&e))?;
        let txn = db.begin_write().map_err(|e| bad(&e))?;
        let next = {
            // Create every table so reads never meet a missing one.
            txn.open_table(EVENTS).map_err(|e| bad(&e))?;
            txn.open_table(BY_TIME).map_err(|e| bad(&e))?;
            txn.open_table(SAMPLES).map_err(|e| bad(&e))?;
            let meta = txn.open_table(META).map_err(|e| bad(&e))?;
            let next = meta
                .get("next")
                .map_err(|e| bad(&e))?
                .map_or(1, |v| v.value());
            next
        };
        txn.commit().map_err(|e| bad(&e))?;
        Ok(LocalStore { db, next })
    }

    fn read_events(
        &self,
        user: &str,
        from: u64,
        to: u64,
        max: usize,
        newest_first: bool,
    ) -> Result<Vec<HistoryEvent>, StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        let table = txn.open_table(EVENTS).map_err(err)?;
        let range = table
            .range((user, from, 0)..=(user, to, u64::MAX))
            .map_err(err)?;
        let decode = |item: Result<(EventKey<'_>, redb::AccessGuard<'_, &[u8]>), _>| {
            let (_, v) = item.map_err(err)?;
            decode_event(v.value())
        };
        if newest_first {
            range.rev().take(max).map(decode).collect()
        } else {
            range.take(max).map(decode).collect()
        }
    }
}

impl Store for LocalStore {
    async fn write(
        &mut self,
        events: &[HistoryEvent],
        samples: &[Sample],
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(err)?;
        let mut n = self.next;
        {
            let mut ev = txn.open_table(EVENTS).map_err(err)?;
            let mut by_time = txn.open_table(BY_TIME).map_err(err)?;
            for e in events {
                let json = serde_json::to_vec(e).expect("events serialise");
                ev.insert((&*e.user, e.ts, n), json.as_slice())
                    .map_err(err)?;
                by_time.insert((e.ts, n), &*e.user).map_err(err)?;
                n += 1;
            }
            let mut st = txn.open_table(SAMPLES).map_err(err)?;
            for s in samples {
                let json = serde_json::to_vec(s).expect("samples serialise");
                st.insert(s.ts, json.as_slice()).map_err(err)?;
            }
            txn.open_table(META)
                .map_err(err)?
                .insert("next", n)
                .map_err(err)?;
        }
        txn.commit().map_err(err)?;
        self.next = n;
        Ok(())
    }

    async fn history(
        &mut self,
        user: &str,
        from: u64,
        to: u64,
        limit: usize,
    ) -> Result<Vec<HistoryEvent>, StoreError> {
        self.read_events(user, from, to, limit, true)
    }

    async fn user_events(
        &mut self,
        user: &str,
        from: u64,
        to: u64,
        max: usize,
    ) -> Result<Vec<HistoryEvent>, StoreError> {
        self.read_events(user, from, to, max, false)
    }

    async fn samples(
        &mut self,
        from: u64,
        to: u64,
        max: usize,
        only_group: Option<Option<&str>>,
    ) -> Result<Vec<Sample>, StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        let table = txn.open_table(SAMPLES).map_err(err)?;
        table
            .range(from..=to)
            .map_err(err)?
            .take(max)
            .map(|item| {
                let (_, v) = item.map_err(err)?;
                let mut sample: Sample = serde_json::from_slice(v.value())
                    .map_err(|e| StoreError::fatal(format!("local store: corrupt sample: {e}")))?;
                if let Some(group) = only_group {
                    sample.keep_only(group);
                }
                Ok(sample)
            })
            .collect()
    }

    async fn presence_between(
        &mut self,
        from: u64,
        to: u64,
        max: usize,
    ) -> Result<Vec<HistoryEvent>, StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        let by_time = txn.open_table(BY_TIME).map_err(err)?;
        let events = txn.open_table(EVENTS).map_err(err)?;
        let mut out = Vec::new();
        for item in by_time.range((from, 0)..=(to, u64::MAX)).map_err(err)? {
            let (k, user) = item.map_err(err)?;
            let (ts, n) = k.value();
            let Some(v) = events.get((user.value(), ts, n)).map_err(err)? else {
                continue;
            };
            out.push(decode_event(v.value())?);
            if out.len() >= max {
                break;
            }
        }
        Ok(out)
    }

    async fn expire(&mut self, before: u64, max: usize) -> Result<u64, StoreError> {
        let txn = self.db.begin_write().map_err(err)?;
        let mut removed = 0u64;
        {
            let mut by_time = txn.open_table(BY_TIME).map_err(err)?;
            let mut events = txn.open_table(EVENTS).map_err(err)?;
            let old: Vec<((u64, u64), String)> = by_time
                .range((0, 0)..(before, 0))
                .map_err(err)?
                .take(max)
                .map(|item| item.map(|(k, u)| (k.value(), u.value().to_owned())))
                .collect::<Result<_, _>>()
                .map_err(err)?;
            for ((ts, n), user) in &old {
                events.remove((user.as_str(), *ts, *n)).map_err(err)?;
                by_time.remove((*ts, *n)).map_err(err)?;
                removed += 1;
            }
            let mut samples = txn.open_table(SAMPLES).map_err(err)?;
            let old_samples: Vec<u64> = samples
                .range(0..before)
                .map_err(err)?
                .take(max)
                .map(|item| item.map(|(k, _)| k.value()))
                .collect::<Result<_, _>>()
                .map_err(err)?;
            for ts in old_samples {
                samples.remove(ts).map_err(err)?;
                removed += 1;
            }
        }
        txn.commit().map_err(err)?;
        Ok(removed)
    }
}
