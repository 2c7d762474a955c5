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
//!
//! Memory and disk: redb's page cache is `history.cache_mb` (redb's own default, 1 GiB, is far
//! more than history needs). Retention ([`Store::expire`]) deletes old records in bounded
//! transactions; redb then reuses the freed pages for new records, so under a steady load the file
//! stops growing at about the retention window's worth. The file only gets smaller by compaction
//! ([`LocalStore::compact_if_worth`]), which the writer runs when enough of the file is free.

use std::path::{Path, PathBuf};

use redb::{
    Builder, Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};

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
    path: PathBuf,
    next: u64,
    /// Bytes of pages in use per record at the last exact measurement ([`LocalStore::space`]):
    /// lets a compaction check estimate the free space without walking the file.
    bytes_per_record: Option<f64>,
}

/// How the file's bytes are used, from the file system and redb's own accounting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Space {
    /// What the file takes on disk (its allocated blocks, as `du` shows). redb grows the file in
    /// steps (doubling, up to 4 GiB at a time) without writing the new part, so on file systems
    /// with sparse files (ext4, xfs, btrfs…) its length can be well past this.
    pub disk_bytes: u64,
    /// Bytes in pages that hold data (tables, and redb's own metadata).
    pub allocated_bytes: u64,
}

impl Space {
    /// Bytes on disk in no page (pages retention freed and nothing has reused yet): what a
    /// compaction could give back, at most.
    pub fn free_bytes(&self) -> u64 {
        self.disk_bytes.saturating_sub(self.allocated_bytes)
    }
}

/// When a compaction is worth it: at least `min_free_bytes` free, and at least `min_free_pct`
/// percent of what the file takes on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompactPolicy {
    pub min_free_bytes: u64,
    pub min_free_pct: u8,
}

impl CompactPolicy {
    pub fn worth_it(&self, space: Space) -> bool {
        let free = space.free_bytes();
        free >= self.min_free_bytes
            && u128::from(free) * 100
                >= u128::from(space.disk_bytes) * u128::from(self.min_free_pct)
    }
}

/// What a compaction did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Compacted {
    pub before: Space,
    /// What the file takes on disk after it.
    pub after_disk_bytes: u64,
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
    /// Opens (or creates) the store under `dir`, with a page cache of `cache_mb` MiB
    /// (`history.cache_mb`). Errors name `history.data_dir`.
    pub fn open(dir: &Path, cache_mb: usize) -> Result<LocalStore, String> {
        let bad = |e: &dyn std::fmt::Display| format!("history.data_dir ({}): {e}", dir.display());
        std::fs::create_dir_all(dir).map_err(|e| bad(&e))?;
        let path = dir.join(FILE);
        let db = Builder::new()
            .set_cache_size(cache_mb.saturating_mul(1 << 20))
            .create(&path)
            .map_err(|e| bad(&e))?;
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
        Ok(LocalStore {
            db,
            path,
            next,
            bytes_per_record: None,
        })
    }

    /// What the file takes on disk now: its allocated blocks (`du`), not its length. (The
    /// [`Store::disk_bytes`] of this store, with the error kept.)
    pub fn disk_usage(&self) -> Result<u64, StoreError> {
        use std::os::unix::fs::MetadataExt;
        Ok(std::fs::metadata(&self.path).map_err(err)?.blocks() * 512)
    }

    /// The page cache's figures (bytes held, evictions): what `cache_mb` bounds.
    pub fn cache_stats(&self) -> redb::CacheStats {
        self.db.cache_stats()
    }

    /// Events and samples stored (redb keeps each table's length: no scan).
    pub fn records(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        let events = txn.open_table(EVENTS).map_err(err)?.len().map_err(err)?;
        let samples = txn.open_table(SAMPLES).map_err(err)?.len().map_err(err)?;
        Ok(events + samples)
    }

    /// How the file's bytes are used, exactly. Walks every table's pages (reads every page in
    /// use), so [`LocalStore::compact_if_worth`] asks only when its estimate says a compaction is
    /// likely worth it.
    pub fn space(&mut self) -> Result<Space, StoreError> {
        let txn = self.db.begin_write().map_err(err)?;
        let stats = txn.stats().map_err(err)?;
        txn.abort().map_err(err)?;
        let space = Space {
            disk_bytes: self.disk_usage()?,
            allocated_bytes: stats.allocated_pages() * stats.page_size() as u64,
        };
        let records = self.records()?;
        if records > 0 {
            self.bytes_per_record = Some(space.allocated_bytes as f64 / records as f64);
        }
        Ok(space)
    }

    /// Compacts the file when `policy` says it is worth it (`None` when not). redb moves the
    /// pages at the end of the file into free space lower down and truncates the file; it needs
    /// the database to itself, so it runs on the writer thread between batches, and nothing is
    /// written or read while it runs (records wait in the queue).
    ///
    /// Whether it is worth it is first estimated from the file's size on disk and the records stored,
    /// at the bytes per record of the last exact measurement (cheap: under a steady load, when
    /// retention's freed pages are reused, that is all a check costs); only when the estimate
    /// passes is the free space measured exactly ([`LocalStore::space`]) and the file compacted.
    pub fn compact_if_worth(
        &mut self,
        policy: CompactPolicy,
    ) -> Result<Option<Compacted>, StoreError> {
        if let Some(per_record) = self.bytes_per_record {
            let estimate = Space {
                disk_bytes: self.disk_usage()?,
                allocated_bytes: (self.records()? as f64 * per_record) as u64,
            };
            if !policy.worth_it(estimate) {
                return Ok(None);
            }
        }
        let before = self.space()?;
        if !policy.worth_it(before) {
            return Ok(None);
        }
        self.db.compact().map_err(err)?;
        Ok(Some(Compacted {
            before,
            after_disk_bytes: self.disk_usage()?,
        }))
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

    fn disk_bytes(&self) -> Option<u64> {
        self.disk_usage().ok()
    }

    async fn compact(&mut self, policy: CompactPolicy) -> Result<Option<Compacted>, StoreError> {
        self.compact_if_worth(policy)
    }
}
