//! What the history tests share.

use presenced::history::HistoryEvent;

/// Sorts by every field, for comparing what was sent with what is stored.
pub fn sorted_events(mut v: Vec<HistoryEvent>) -> Vec<HistoryEvent> {
    v.sort_by_cached_key(|e| (e.user.clone(), e.ts, serde_json::to_string(e).unwrap()));
    v
}

/// The real ScyllaDB the `#[ignore]`d tests run against (`PRESENCED_TEST_SCYLLA=host:port`).
/// Without one such a test fails: asked to run (`--ignored`), it must not pass without testing
/// anything.
pub fn real_scylla() -> String {
    match std::env::var("PRESENCED_TEST_SCYLLA") {
        Ok(addr) if !addr.is_empty() => addr,
        _ => panic!(
            "this test needs a real ScyllaDB: set PRESENCED_TEST_SCYLLA=host:port \
             (docs/HISTORY.md, \"Against a real ScyllaDB\")"
        ),
    }
}
