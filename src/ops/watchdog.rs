//! The systemd watchdog (`WatchdogSec=`; `sd_watchdog_enabled(3)`): when the service manager
//! asks for keep-alives (`$WATCHDOG_USEC`, and `$WATCHDOG_PID` unset or this process), a thread
//! sends `WATCHDOG=1` every half interval — but only while every shard's event loop is making
//! progress. A shard stuck for good (a deadlock, an endless loop: what the stall detector of
//! [`super::stall`] cannot report, since it reports when a stall ends) stops the keep-alives,
//! and systemd restarts the service after the interval.
//!
//! Progress: while the watchdog is on, every shard stamps `Shared::progress_us` every quarter
//! interval (`Shards::track_progress`); a stamp older than a whole interval at a check is a
//! stuck shard ([`all_progressing`]). So a stall shorter than three quarters of the interval
//! never costs a keep-alive, and a shard stuck for good stops them within an interval: systemd
//! acts within two. Without the watchdog there are no stamps and no thread: an idle server
//! does not wake up for it.

use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::shard::runtime::{Shards, Shared};

/// A shard whose loop made no progress within the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stuck {
    pub shard: usize,
    /// Since its last stamp, µs.
    pub silent_us: u64,
}

/// Whether every shard stamped within `window_us` of `now_us` (all on one clock, µs); if not,
/// the one silent the longest.
pub fn all_progressing(stamps_us: &[u64], now_us: u64, window_us: u64) -> Result<(), Stuck> {
    let stalest = stamps_us
        .iter()
        .enumerate()
        .map(|(shard, stamp)| Stuck {
            shard,
            silent_us: now_us.saturating_sub(*stamp),
        })
        .max_by_key(|s| (s.silent_us, std::cmp::Reverse(s.shard)));
    match stalest {
        Some(stuck) if stuck.silent_us > window_us => Err(stuck),
        _ => Ok(()),
    }
}

/// The keep-alive interval systemd asks for: `$WATCHDOG_USEC` (µs), unless `$WATCHDOG_PID`
/// names another process (a child of the service) or the interval is 0. An unreadable value
/// is an error (logged; the watchdog stays off).
pub fn interval(
    usec: Option<&str>,
    pid: Option<&str>,
    me: u32,
) -> Result<Option<Duration>, String> {
    let Some(usec) = usec else {
        return Ok(None);
    };
    if let Some(pid) = pid {
        let pid: u32 = pid
            .trim()
            .parse()
            .map_err(|_| format!("WATCHDOG_PID={pid:?} is not a process id"))?;
        if pid != me {
            return Ok(None);
        }
    }
    let usec: u64 = usec
        .trim()
        .parse()
        .map_err(|_| format!("WATCHDOG_USEC={usec:?} is not a number of microseconds"))?;
    Ok((usec > 0).then(|| Duration::from_micros(usec)))
}

/// The running watchdog thread.
pub struct Watchdog {
    stop: mpsc::Sender<()>,
    thread: JoinHandle<()>,
}

impl Watchdog {
    /// Starts feeding systemd's watchdog if it asked for it (see [`interval`]): sets the shards
    /// stamping their progress and starts the thread. `None` when it did not ask.
    pub fn start(shards: &Shards) -> Option<Watchdog> {
        let env = |k| std::env::var(k).ok();
        let every = match interval(
            env("WATCHDOG_USEC").as_deref(),
            env("WATCHDOG_PID").as_deref(),
            std::process::id(),
        ) {
            Ok(Some(every)) => every,
            Ok(None) => return None,
            Err(why) => {
                tracing::warn!(%why, "systemd watchdog not fed");
                return None;
            }
        };
        shards.track_progress(every / 4);
        let shared = shards.shared.clone();
        let (stop, stopped) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || feed(&shared, every, &stopped));
        match thread {
            Ok(thread) => {
                tracing::info!(
                    interval_ms = u64::try_from(every.as_millis()).unwrap_or(u64::MAX),
                    "feeding the systemd watchdog while every shard makes progress"
                );
                Some(Watchdog { stop, thread })
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not start the systemd watchdog thread");
                None
            }
        }
    }

    /// Stops the thread (no more `WATCHDOG=1`) and waits for it.
    pub fn stop(self) {
        drop(self.stop);
        let _ = self.thread.join();
    }
}

/// The thread: every half `interval`, `WATCHDOG=1` if every shard stamped within the last
/// `interval`. Ends when told to or when shutdown begins (systemd stops watching a stopping
/// service; after an upgrade's hand-over, the new process feeds it).
fn feed(shared: &Arc<Shared>, interval: Duration, stop: &mpsc::Receiver<()>) {
    let window_us = u64::try_from(interval.as_micros()).unwrap_or(u64::MAX);
    let every = interval / 2;
    let mut stuck: Option<usize> = None;
    loop {
        if shared.stopping.load(Ordering::Acquire) {
            return;
        }
        let stamps: Vec<u64> = shared
            .progress_us
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .collect();
        match all_progressing(&stamps, shared.since_start_us(), window_us) {
            Ok(()) => {
                super::notify::tell("WATCHDOG=1");
                if let Some(shard) = stuck.take() {
                    tracing::info!(
                        shard,
                        "shard progressing again: feeding the systemd watchdog"
                    );
                }
            }
            Err(s) if stuck != Some(s.shard) => {
                stuck = Some(s.shard);
                tracing::warn!(
                    shard = s.shard,
                    silent_ms = s.silent_us / 1000,
                    "shard's event loop made no progress: not feeding the systemd watchdog \
                     (systemd restarts the service unless it recovers)"
                );
            }
            Err(_) => {}
        }
        match stop.recv_timeout(every) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shard_must_have_stamped_within_the_window() {
        assert_eq!(all_progressing(&[900, 950, 1000], 1000, 100), Ok(()));
        assert_eq!(
            all_progressing(&[900], 1000, 100),
            Ok(()),
            "exactly the window"
        );
        assert_eq!(
            all_progressing(&[1000, 850, 1000], 1000, 100),
            Err(Stuck {
                shard: 1,
                silent_us: 150
            })
        );
        // Several stuck: the one silent the longest (the lowest index on a tie).
        assert_eq!(
            all_progressing(&[700, 500, 500, 990], 1000, 100),
            Err(Stuck {
                shard: 1,
                silent_us: 500
            })
        );
        // A stamp taken after `now` was read is fresh, not a wrap-around.
        assert_eq!(all_progressing(&[1200], 1000, 100), Ok(()));
        assert_eq!(all_progressing(&[], 1000, 100), Ok(()));
    }

    #[test]
    fn the_interval_is_systemds_when_it_is_for_this_process() {
        let ms = |n| Ok(Some(Duration::from_millis(n)));
        assert_eq!(interval(None, None, 42), Ok(None));
        assert_eq!(interval(Some("200000"), None, 42), ms(200));
        assert_eq!(interval(Some("200000"), Some("42"), 42), ms(200));
        assert_eq!(
            interval(Some("200000"), Some("41"), 42),
            Ok(None),
            "a parent's"
        );
        assert_eq!(interval(Some("0"), None, 42), Ok(None));
        assert!(interval(Some("soon"), None, 42).is_err());
        assert!(interval(Some("1000"), Some("me"), 42).is_err());
    }
}
