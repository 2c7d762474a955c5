//! The storage interface every history backend implements, and opening the configured one.

use super::event::{HistoryEvent, Sample};
pub use super::local::{CompactPolicy, Compacted};
use crate::config::{HistoryBackend, HistoryConfig};

/// A failed store operation. `retryable`: worth trying again (timeouts, overload, lost
/// connections); otherwise the batch is dropped and counted at once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct StoreError {
    pub retryable: bool,
    pub message: String,
}

impl StoreError {
    pub fn retry(message: impl Into<String>) -> StoreError {
        StoreError {
            retryable: true,
            message: message.into(),
        }
    }

    pub fn fatal(message: impl Into<String>) -> StoreError {
        StoreError {
            retryable: false,
            message: message.into(),
        }
    }
}

/// What the writer thread needs from a backend. Methods run on the writer thread's own
/// single-threaded runtime, never on a shard.
#[allow(async_fn_in_trait)] // used through generics on one thread, never boxed or sent
pub trait Store {
    /// Writes events and samples; acknowledged means durable (local) or accepted by the
    /// configured consistency (scylla).
    async fn write(
        &mut self,
        events: &[HistoryEvent],
        samples: &[Sample],
    ) -> Result<(), StoreError>;
    /// Whether the last `write`, though it failed, stored part of its batch, so that trying the
    /// same batch again sends less. The writer then counts `max_retries` from zero again: a
    /// flaky cluster that keeps taking part of every attempt loses nothing, and only attempts
    /// that store nothing at all use up the budget. A store that writes a batch whole (or not
    /// at all) never makes partial progress.
    fn write_progressed(&self) -> bool {
        false
    }
    /// A user's events in `[from, to]`, newest first, at most `limit`.
    async fn history(
        &mut self,
        user: &str,
        from: u64,
        to: u64,
        limit: usize,
    ) -> Result<Vec<HistoryEvent>, StoreError>;
    /// A user's events in `[from, to]`, oldest first, at most `max`.
    async fn user_events(
        &mut self,
        user: &str,
        from: u64,
        to: u64,
        max: usize,
    ) -> Result<Vec<HistoryEvent>, StoreError>;
    /// Samples in `[from, to]`, oldest first, at most `max`. With `only_group`, each sample keeps
    /// just that group's count (and none with `Some(None)`): replay reads many samples, and a
    /// sample can carry a thousand groups.
    async fn samples(
        &mut self,
        from: u64,
        to: u64,
        max: usize,
        only_group: Option<Option<&str>>,
    ) -> Result<Vec<Sample>, StoreError>;
    /// Session starts and ends and status events of every user in `[from, to]` (what "who was
    /// online" needs: [`analytics::online_at`](super::analytics::online_at)), oldest first, a
    /// user's same-millisecond events in the order recorded, at most `max`.
    async fn presence_between(
        &mut self,
        from: u64,
        to: u64,
        max: usize,
    ) -> Result<Vec<HistoryEvent>, StoreError>;
    /// Deletes what is older than `before` (at most `max` records per call); returns how many.
    /// Stores with their own expiry (Scylla's TTL) return 0.
    async fn expire(&mut self, before: u64, max: usize) -> Result<u64, StoreError>;
    /// What the store takes on this machine's disk (`None`: it is not on this machine).
    fn disk_bytes(&self) -> Option<u64> {
        None
    }
    /// Gives free space back to the file system when `policy` says it is worth it (`None`: it
    /// was not, or the store has nothing to give back).
    async fn compact(&mut self, _policy: CompactPolicy) -> Result<Option<Compacted>, StoreError> {
        Ok(None)
    }
}

/// The configured backend, opened (the local store) or ready to connect (scylla).
pub enum Opened {
    Local(super::local::LocalStore),
    Scylla(super::scylla::ScyllaStore),
}

/// Opens the configured backend. Errors name the config key at fault.
pub fn open(cfg: &HistoryConfig) -> Result<Opened, String> {
    match cfg.backend {
        HistoryBackend::Local => {
            super::local::LocalStore::open(&cfg.data_dir, cfg.cache_mb).map(Opened::Local)
        }
        HistoryBackend::Scylla => Ok(Opened::Scylla(super::scylla::ScyllaStore::new(
            &cfg.scylla,
            cfg.retention_days,
        ))),
        HistoryBackend::Off => Err("history.backend: off has no store".into()),
    }
}
