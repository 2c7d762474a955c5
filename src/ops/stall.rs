//! Stall detection (SPEC §11): a shard whose event loop did not turn for longer than
//! `stall_threshold_ms` is reported — a `warn` log line with the shard, the task queue it was
//! running and how long the loop stood still; `presenced_shard_stalls_total{shard}` and the
//! `presenced_shard_stall_seconds` histogram.
//!
//! How: the shard's executor runs one task queue at a time, each run lasting until the queue
//! is empty or its time slice is up (tasks are only ever switched between polls), then polls
//! for I/O and runs the next. A run that lasts past the threshold is a stall: the loop did not
//! turn meanwhile. glommio's stall-detector hook ([`StallDetectionHandler::threshold`]) is
//! called on the shard's thread as every queue run starts; there, [`StallReporter`] reads how
//! long the previous run lasted (glommio's own accounting of it) and reports it if that was
//! too long. Nothing is armed and nothing wakes up for it: an idle shard costs nothing, a busy
//! one a few nanoseconds per queue run.
//!
//! So a stall is reported when the loop turns again (at the next queue run: within a clock
//! tick, at most a second, on a shard with nothing else to do). A shard that never turns again
//! is never reported here; that is the systemd watchdog's case ([`super::watchdog`]).
//!
//! Why not glommio's stock detector (a timer armed for each queue run, a signal sent to the
//! shard's thread when it expires): its handler captures a backtrace in the signal and
//! symbolizes it on the shard's thread once the run ends, which the first time in a process
//! loads the binary's debug information — measured on a debug build: the first stall held the
//! shard another second and the process grew by 216 MB. The hook above returns "no timer", so
//! none of that runs.
//!
//! The budget: the shards' time slice is half of `stall_threshold_ms` (at most glommio's
//! 100 ms default, [`time_slice`]), so a healthy busy queue yields long before the threshold,
//! and a reported stall means one task held the thread for at least half of it.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use glommio::{StallDetectionHandler, TaskQueueHandle};

use crate::metrics::ShardMetrics;

/// glommio's default preemption time slice; shards use less when the stall threshold is short
/// ([`time_slice`]).
const DEFAULT_TIME_SLICE: Duration = Duration::from_millis(100);

/// The preemption time slice of a shard whose stall threshold is `threshold`: half of it, at
/// most glommio's default. A queue that yields at the end of its slice then stays well inside
/// the threshold.
pub fn time_slice(threshold: Duration) -> Duration {
    (threshold / 2).min(DEFAULT_TIME_SLICE)
}

/// Reports one shard's stalls; handed to glommio as the executor's stall detection handler.
#[derive(Debug)]
pub struct StallReporter {
    shard: usize,
    /// `stall_threshold_ms`.
    threshold: Duration,
    /// Task queue names by glommio queue index (0 is glommio's `default`).
    queue_names: &'static [&'static str],
    metrics: Arc<ShardMetrics>,
    /// The queue of the run that started last (an atomic only because glommio wants the
    /// handler `Sync`: only the shard's thread touches it).
    running: AtomicUsize,
}

impl StallReporter {
    pub fn new(
        shard: usize,
        threshold: Duration,
        queue_names: &'static [&'static str],
        metrics: Arc<ShardMetrics>,
    ) -> StallReporter {
        StallReporter {
            shard,
            threshold,
            queue_names,
            metrics,
            running: AtomicUsize::new(0),
        }
    }

    fn queue_name(&self, index: usize) -> &'static str {
        self.queue_names.get(index).copied().unwrap_or("unnamed")
    }

    /// A queue run of `queue` that just ended lasted `ran`: counted and logged if that is a
    /// stall.
    fn ran(&self, queue: usize, ran: Duration) {
        if ran <= self.threshold {
            return;
        }
        ShardMetrics::inc(&self.metrics.shard_stalls);
        let us = u64::try_from(ran.as_micros()).unwrap_or(u64::MAX);
        self.metrics.stall_duration_us.record(us);
        tracing::warn!(
            shard = self.shard,
            task_queue = %self.queue_name(queue),
            stalled_ms = us / 1000,
            threshold_ms = u64::try_from(self.threshold.as_millis()).unwrap_or(u64::MAX),
            "shard stalled: its event loop did not turn (a task held the thread)"
        );
    }
}

impl StallDetectionHandler for StallReporter {
    /// Called by glommio on the shard's thread as a queue run starts: the previous run has
    /// ended, and glommio's executor statistics hold its length (they are taken, so they cover
    /// exactly the runs since the last call: that one). Nothing else reads them.
    fn threshold(&self, queue: TaskQueueHandle, _time_slice: Duration) -> Option<Duration> {
        let ran = glommio::executor().executor_stats().executor_runtime();
        let previous = self.running.swap(queue.index(), Relaxed);
        self.ran(previous, ran);
        None // no timer for this run: the next call measures it
    }
}

/// Tests only: `PRESENCED_FAULT_STALL_AFTER_MS=<after>,<len>` makes shard 0 block its thread
/// for `len` ms, once, `after` ms after it starts (the `fault-injection` feature only; release
/// builds never read it). For tests that stall a shard of a `presenced serve` child process.
#[cfg(feature = "fault-injection")]
pub fn injected_stall() -> Option<(Duration, Duration)> {
    let spec = std::env::var("PRESENCED_FAULT_STALL_AFTER_MS").ok()?;
    let (after, len) = spec.split_once(',')?;
    let ms = |s: &str| s.trim().parse().ok().map(Duration::from_millis);
    Some((ms(after)?, ms(len)?))
}

/// Tests only: the stall of [`injected_stall`], as a task on the shard.
#[cfg(feature = "fault-injection")]
pub async fn inject_stall(after: Duration, len: Duration) {
    glommio::timer::sleep(after).await;
    tracing::warn!(
        len_ms = u64::try_from(len.as_millis()).unwrap_or(u64::MAX),
        "fault injection: blocking shard 0's thread"
    );
    std::thread::sleep(len);
    tracing::warn!("fault injection: shard 0's thread is free again");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_time_slice_leaves_half_the_threshold() {
        assert_eq!(
            time_slice(Duration::from_millis(50)),
            Duration::from_millis(25)
        );
        assert_eq!(
            time_slice(Duration::from_millis(1)),
            Duration::from_micros(500)
        );
        assert_eq!(time_slice(Duration::from_secs(60)), DEFAULT_TIME_SLICE);
    }

    #[test]
    fn only_runs_past_the_threshold_are_stalls() {
        let r = StallReporter::new(
            0,
            Duration::from_millis(50),
            &["default", "serve"],
            Arc::default(),
        );
        r.ran(1, Duration::from_millis(50));
        assert_eq!(
            r.metrics.snapshot().shard_stalls,
            0,
            "exactly the threshold"
        );
        r.ran(1, Duration::from_millis(120));
        r.ran(7, Duration::from_millis(60));
        let m = r.metrics.snapshot();
        assert_eq!(m.shard_stalls, 2);
        assert_eq!(m.stall_duration_us.count(), 2);
        assert_eq!(m.stall_duration_us.sum_us, 180_000);
        assert_eq!((r.queue_name(1), r.queue_name(7)), ("serve", "unnamed"));
    }

    /// glommio calls the hook at every queue run with the previous run's length in its
    /// statistics: a run that blocks past the threshold is reported at the next run, with the
    /// queue it ran in.
    #[test]
    fn a_blocking_queue_run_is_measured_by_the_next() {
        let metrics: Arc<ShardMetrics> = Arc::default();
        let m = metrics.clone();
        glommio::LocalExecutorBuilder::default()
            .detect_stalls(Some(Box::new(StallReporter::new(
                3,
                Duration::from_millis(40),
                &["default", "busy"],
                m,
            ))))
            .preempt_timer(time_slice(Duration::from_millis(40)))
            .make()
            .unwrap()
            .run(async move {
                let busy = glommio::executor().create_task_queue(
                    glommio::Shares::default(),
                    glommio::Latency::NotImportant,
                    "busy",
                );
                glommio::spawn_local_into(
                    async { std::thread::sleep(Duration::from_millis(10)) },
                    busy,
                )
                .unwrap()
                .await;
                glommio::timer::sleep(Duration::from_millis(5)).await;
                assert_eq!(metrics.snapshot().shard_stalls, 0, "10 ms is no stall");
                glommio::spawn_local_into(
                    async { std::thread::sleep(Duration::from_millis(80)) },
                    busy,
                )
                .unwrap()
                .await;
                glommio::timer::sleep(Duration::from_millis(5)).await;
                let s = metrics.snapshot();
                assert_eq!(s.shard_stalls, 1);
                let us = s.stall_duration_us.sum_us;
                assert!((80_000..200_000).contains(&us), "{us} µs");
            });
    }
}
