//! The `scylla` backend. Not built yet: `validate()` refuses `history.backend = "scylla"`.

use super::event::{HistoryEvent, Sample};
use super::store::{Store, StoreError};
use crate::config::ScyllaConfig;

/// Whether this build has the scylla backend.
pub const AVAILABLE: bool = false;

pub struct ScyllaStore;

impl ScyllaStore {
    pub fn new(_cfg: &ScyllaConfig, _retention_days: u32) -> ScyllaStore {
        ScyllaStore
    }
}

fn missing() -> StoreError {
    StoreError::fatal("the scylla backend is not built yet")
}

impl Store for ScyllaStore {
    async fn write(&mut self, _: &[HistoryEvent], _: &[Sample]) -> Result<(), StoreError> {
        Err(missing())
    }
    async fn history(
        &mut self,
        _: &str,
        _: u64,
        _: u64,
        _: usize,
    ) -> Result<Vec<HistoryEvent>, StoreError> {
        Err(missing())
    }
    async fn user_events(
        &mut self,
        _: &str,
        _: u64,
        _: u64,
        _: usize,
    ) -> Result<Vec<HistoryEvent>, StoreError> {
        Err(missing())
    }
    async fn samples(&mut self, _: u64, _: u64, _: usize) -> Result<Vec<Sample>, StoreError> {
        Err(missing())
    }
    async fn sessions_between(
        &mut self,
        _: u64,
        _: u64,
        _: usize,
    ) -> Result<Vec<HistoryEvent>, StoreError> {
        Err(missing())
    }
    async fn expire(&mut self, _: u64, _: usize) -> Result<u64, StoreError> {
        Ok(0)
    }
}
