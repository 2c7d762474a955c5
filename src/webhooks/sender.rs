//! Delivering webhook events, off the shards: per webhook a bounded channel the shards'
//! taps `try_send` into (never waiting), a collector thread that moves events into the
//! webhook's [`Queue`] (dropping the oldest waiting one past `max_queue`), and a sender thread
//! that POSTs batches with `ureq` (rustls) and retries a failed one, the same batch, with
//! exponential backoff and full jitter (`retry_base_ms` doubling to `retry_max_ms`) until a
//! 2xx takes it off.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::delivery::{body, signature, Filter, Format, Queue};
use super::event::{Event, Kind};
use crate::config::{WebhookConfig, WebhookFormat};
use crate::metrics::AtomicBuckets;

/// The channel between the shards and a webhook's collector: events beyond it while the
/// collector is that far behind are dropped (and counted) by the shard, the newest first; the
/// queue behind it (`max_queue`) drops the oldest.
const CHANNEL: usize = 4_096;

/// One webhook's counters and health (for `/metrics`, `GET /api/webhooks` and the dashboard).
#[derive(Debug, Default)]
pub struct Stats {
    pub name: String,
    /// The URL's scheme and host only (a Slack webhook URL's path is its secret).
    pub target: String,
    /// `max_queue`.
    pub max_queue: u64,
    /// What it is sent: `json` or `slack`, the event kinds, the filters.
    pub format: &'static str,
    pub events: Vec<&'static str>,
    pub filters: Filters,
    /// Requests sent (first tries and retries).
    pub requests: AtomicU64,
    /// Events in the requests sent (retries included: an event retried twice counts three).
    pub events_sent: AtomicU64,
    /// Events acknowledged by a 2xx.
    pub acked: AtomicU64,
    /// Requests that failed: a non-2xx, a timeout, a refused connection. Each batch is retried.
    pub failed: AtomicU64,
    /// Events dropped: past `max_queue` (the oldest waiting), or while the collector was behind.
    pub dropped: AtomicU64,
    /// Events held (waiting and in flight).
    pub queued: AtomicU64,
    /// Round trips of acknowledged requests.
    pub latency: AtomicBuckets,
    /// Each acknowledged event's delay: from the event to the 2xx that took it.
    pub delay: AtomicBuckets,
    /// When the last 2xx came (ms since the epoch; 0: never).
    pub last_ok_ms: AtomicU64,
    /// Requests failed since the last 2xx (0: healthy).
    pub failing: AtomicU64,
    /// When the batch that failed is tried again (ms since the epoch; 0: no retry waiting).
    pub retry_at_ms: AtomicU64,
    /// When the last failure was (ms since the epoch; 0: never).
    pub last_error_ms: AtomicU64,
    /// The last failure, kept after a recovery (the state says whether it still fails).
    pub last_error: Mutex<Option<String>>,
    /// Shutdown has begun: delivering what is held until the deadline.
    pub stopping: AtomicBool,
}

/// A webhook's filters as configured (empty: every event passes).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Filters {
    pub users: Vec<String>,
    pub groups: Vec<String>,
    pub roles: Vec<String>,
}

/// A webhook's health, as `/metrics`, the admin API and the dashboard show it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Nothing sent yet.
    #[default]
    Idle,
    /// The last request was acknowledged.
    Ok,
    /// The last request failed; its batch is being retried.
    Failing,
    /// Shutting down, delivering what is held.
    Stopping,
}

impl State {
    pub const ALL: [State; 4] = [State::Idle, State::Ok, State::Failing, State::Stopping];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Idle => "idle",
            State::Ok => "ok",
            State::Failing => "failing",
            State::Stopping => "stopping",
        }
    }
}

impl Stats {
    pub fn state(&self) -> State {
        if self.stopping.load(Relaxed) {
            State::Stopping
        } else if self.failing.load(Relaxed) > 0 {
            State::Failing
        } else if self.last_ok_ms.load(Relaxed) > 0 {
            State::Ok
        } else {
            State::Idle
        }
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// What the collector and the sender share.
struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
    /// Shutdown asked the collector to stop after what the channel holds.
    stopping: AtomicBool,
    /// The collector has stopped: deliver what is left, then stop.
    closed: AtomicBool,
}

struct Hook {
    tx: flume::Sender<Event>,
    filter: Filter,
    stats: Arc<Stats>,
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// Every configured webhook.
pub struct Webhooks {
    hooks: Vec<Hook>,
    /// Until when a stopping sender keeps retrying (ms since the epoch; 0: not stopping).
    deadline_ms: Arc<AtomicU64>,
}

impl Webhooks {
    /// Starts the threads of every webhook in `cfgs` (validated).
    pub fn start(cfgs: &[WebhookConfig]) -> Webhooks {
        let deadline_ms = Arc::new(AtomicU64::new(0));
        let hooks = cfgs
            .iter()
            .enumerate()
            .map(|(i, c)| Hook::start(i, c, deadline_ms.clone()))
            .collect();
        Webhooks { hooks, deadline_ms }
    }

    /// Offers an event to every webhook that wants it (a copy for each but the last); never
    /// waits.
    pub fn offer(&self, e: Event) {
        let mut takers = self.hooks.iter().filter(|h| h.filter.wants(&e)).peekable();
        while let Some(h) = takers.next() {
            let copy = if takers.peek().is_some() {
                e.clone()
            } else {
                // The last taker gets the event itself.
                return Self::send(h, e);
            };
            Self::send(h, copy);
        }
    }

    fn send(h: &Hook, e: Event) {
        if h.tx.try_send(e).is_err() {
            h.stats.dropped.fetch_add(1, Relaxed);
        }
    }

    /// Whether some webhook takes events of `kind` (whatever their user).
    pub fn wants_kind(&self, kind: Kind) -> bool {
        self.hooks
            .iter()
            .any(|h| h.filter.kinds.is_empty() || h.filter.kinds.contains(&kind))
    }

    pub fn stats(&self) -> Vec<Arc<Stats>> {
        self.hooks.iter().map(|h| h.stats.clone()).collect()
    }

    /// Delivers what is held until `grace` has passed, then stops (after the shards: nothing
    /// is offered any more); logs what it could not deliver. Idempotent.
    pub fn stop(&self, grace: Duration) {
        let deadline = crate::shard::now_ms() + grace.as_millis() as u64;
        self.deadline_ms.store(deadline.max(1), Relaxed);
        for h in &self.hooks {
            h.stats.stopping.store(true, Relaxed);
            h.shared.stopping.store(true, Relaxed);
            h.shared.ready.notify_all();
        }
        for h in &self.hooks {
            let threads = std::mem::take(&mut *h.threads.lock().unwrap_or_else(|e| e.into_inner()));
            for t in threads {
                let _ = t.join();
            }
            let left = h
                .shared
                .queue
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .len();
            if left > 0 {
                tracing::warn!(
                    webhook = h.stats.name,
                    undelivered = left,
                    "webhook: stopped with events not delivered"
                );
            }
        }
    }
}

impl Hook {
    fn start(i: usize, c: &WebhookConfig, deadline_ms: Arc<AtomicU64>) -> Hook {
        let stats = Arc::new(Stats {
            name: c.name_of(i),
            // Scheme and host only: a Slack webhook URL's path is its secret.
            target: crate::config::redacted_url(&c.url),
            max_queue: c.max_queue as u64,
            format: match c.format {
                WebhookFormat::Json => "json",
                WebhookFormat::Slack => "slack",
            },
            events: Kind::ALL
                .into_iter()
                .map(Kind::as_str)
                .filter(|k| c.events.is_empty() || c.events.iter().any(|e| e == k))
                .collect(),
            filters: Filters {
                users: c.users.clone(),
                groups: c.groups.clone(),
                roles: c.roles.clone(),
            },
            ..Stats::default()
        });
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::new(c.max_queue)),
            ready: Condvar::new(),
            stopping: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        });
        let (tx, rx) = flume::bounded::<Event>(CHANNEL);
        let collector = {
            let (shared, stats) = (shared.clone(), stats.clone());
            std::thread::Builder::new()
                .name(format!("webhook-in-{i}"))
                .spawn(move || {
                    let take = |e: Event| {
                        let mut q = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
                        if q.push(e) {
                            stats.dropped.fetch_add(1, Relaxed);
                        }
                        stats.queued.store(q.len() as u64, Relaxed);
                        drop(q);
                        shared.ready.notify_one();
                    };
                    loop {
                        match rx.recv_timeout(Duration::from_millis(100)) {
                            Ok(e) => take(e),
                            Err(flume::RecvTimeoutError::Timeout) => {
                                if shared.stopping.load(Relaxed) {
                                    // The shards have stopped: what the channel holds is all.
                                    rx.try_iter().for_each(take);
                                    break;
                                }
                            }
                            Err(flume::RecvTimeoutError::Disconnected) => break,
                        }
                    }
                    {
                        // Under the lock: the sender checks `closed` under it before it waits,
                        // so this wake-up cannot fall between its check and its wait.
                        let _q = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
                        shared.closed.store(true, Relaxed);
                    }
                    shared.ready.notify_all();
                })
                .expect("the webhook collector thread starts")
        };
        let sender = {
            let (shared, stats) = (shared.clone(), stats.clone());
            let c = c.clone();
            std::thread::Builder::new()
                .name(format!("webhook-out-{i}"))
                .spawn(move || send_loop(&c, &shared, &stats, &deadline_ms))
                .expect("the webhook sender thread starts")
        };
        let filter = Filter {
            kinds: c
                .events
                .iter()
                .filter_map(|e| Kind::ALL.into_iter().find(|k| k.as_str() == e))
                .collect(),
            users: c.users.iter().cloned().collect(),
            groups: c.groups.iter().cloned().collect(),
            roles: c.roles.iter().cloned().collect(),
        };
        Hook {
            tx,
            filter,
            stats,
            shared,
            threads: Mutex::new(vec![collector, sender]),
        }
    }
}

fn send_loop(c: &WebhookConfig, shared: &Shared, stats: &Stats, deadline_ms: &AtomicU64) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_millis(c.timeout_ms)))
        .http_status_as_error(false)
        // A redirect is a failure, retried: following a 301/302/303 would turn the POST into a
        // GET without the body, and its 200 would acknowledge a batch nobody received.
        .max_redirects(0)
        .user_agent(concat!("presenced/", env!("CARGO_PKG_VERSION")))
        .build()
        .into();
    let format = match c.format {
        WebhookFormat::Json => Format::Json,
        WebhookFormat::Slack => Format::Slack,
    };
    let secret = c.secret.clone().unwrap_or_default();
    let mut attempt = 0u32;
    loop {
        let out_of_time = || {
            let d = deadline_ms.load(Relaxed);
            d != 0 && crate::shard::now_ms() >= d
        };
        // Wait for events (and, for a batch not yet full, up to `batch_ms` for more).
        let batch = {
            let mut q = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
            while q.is_empty() && !shared.closed.load(Relaxed) {
                q = shared.ready.wait(q).unwrap_or_else(|e| e.into_inner());
            }
            if q.is_empty() || out_of_time() {
                return;
            }
            let until = Instant::now() + Duration::from_millis(c.batch_ms);
            // A batch in flight (a retry) goes as it is, at once.
            while !q.has_in_flight() && q.len() < c.batch_max && !shared.closed.load(Relaxed) {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                q = shared
                    .ready
                    .wait_timeout(q, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            q.batch(c.batch_max).to_vec()
        };
        let body = body(format, &batch);
        let ts = crate::shard::now_ms() / 1000;
        let started = Instant::now();
        stats.requests.fetch_add(1, Relaxed);
        stats.events_sent.fetch_add(batch.len() as u64, Relaxed);
        // While stopping, no request outlives the deadline.
        let mut timeout = Duration::from_millis(c.timeout_ms);
        let d = deadline_ms.load(Relaxed);
        if d != 0 {
            timeout = timeout.min(Duration::from_millis(
                d.saturating_sub(crate::shard::now_ms()).max(1),
            ));
        }
        let result = agent
            .post(&c.url)
            .config()
            .timeout_global(Some(timeout))
            .build()
            .header("Content-Type", "application/json")
            .header("X-Presenced-Timestamp", ts.to_string())
            .header(
                "X-Presenced-Signature",
                signature(secret.as_bytes(), ts, &body),
            )
            .send(&body[..]);
        let failure = match result {
            Ok(r) if r.status().is_success() => None,
            Ok(r) => Some(format!("HTTP {}", r.status().as_u16())),
            Err(e) => Some(e.to_string()),
        };
        match failure {
            None => {
                let mut q = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
                let n = q.acked();
                stats.queued.store(q.len() as u64, Relaxed);
                drop(q);
                stats.acked.fetch_add(n as u64, Relaxed);
                let now = crate::shard::now_ms();
                stats.latency.record(started.elapsed().as_micros() as u64);
                for e in &batch {
                    stats
                        .delay
                        .record(now.saturating_sub(e.ts).saturating_mul(1_000));
                }
                stats.last_ok_ms.store(now, Relaxed);
                stats.failing.store(0, Relaxed);
                stats.retry_at_ms.store(0, Relaxed);
                attempt = 0;
            }
            Some(why) => {
                stats.failed.fetch_add(1, Relaxed);
                stats.last_error_ms.store(crate::shard::now_ms(), Relaxed);
                tracing::debug!(
                    webhook = stats.name,
                    why,
                    attempt,
                    "webhook: delivery failed; retrying"
                );
                *stats.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
                if out_of_time() {
                    return;
                }
                // The history writer's retry schedule: exponential, full jitter, capped.
                let wait =
                    crate::history::writer::backoff(c.retry_base_ms, c.retry_max_ms, attempt);

                stats
                    .retry_at_ms
                    .store(crate::shard::now_ms() + wait.as_millis() as u64, Relaxed);
                attempt = attempt.saturating_add(1);
                // Last, so that a reader seeing it failing finds its error and retry time.
                stats.failing.fetch_add(1, Relaxed);
                // Waits out the backoff, unless shutdown's deadline comes first.
                let q = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
                let until = Instant::now() + wait;
                let mut q = q;
                while Instant::now() < until && !out_of_time() {
                    let left = until.saturating_duration_since(Instant::now());
                    q = shared
                        .ready
                        .wait_timeout(q, left.min(Duration::from_millis(100)))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
    }
}
