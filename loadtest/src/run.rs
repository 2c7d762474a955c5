//! Orchestration: one single-threaded tokio runtime per thread (thread-per-core, like the
//! server), each owning its share of the connections; phases driven from the main thread
//! through a few atomics: ramp → run (flapping) → finals → drain → finish.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, ConnState, Sink, Spec};
use crate::plan;
use crate::report::Stats;
use crate::scenario::Scenario;
use crate::target::{self, Target};

/// What every thread shares: the plan and the phase flags. Phase flags only go false → true.
pub struct Shared {
    /// The servers (`--url`, one or more); connection `n` goes to [`Shared::target`]`(n)`.
    pub targets: Vec<Target>,
    /// The TLS client configuration, when any target is `wss://` (`--ca-file`).
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    pub secret: String,
    pub scn: Scenario,
    pub seed: u64,
    pub sources: usize,
    pub workers: usize,
    /// Flapping users in the whole fleet (all workers): each thread's share of the flap rate is
    /// the fraction of them it holds.
    pub fleet_flappers: usize,
    /// The text every flapping user ends on: `final-<run tag>`, unique per run, so a state left
    /// over from an earlier run on the same server is never taken for this run's final.
    pub final_text: String,
    /// Set when the run phase starts (deliveries count from here).
    pub run: AtomicBool,
    /// Stop flapping; each thread then sends its final states.
    pub stop_flapping: AtomicBool,
    /// Close everything and report.
    pub finish: AtomicBool,
    pub connected: AtomicU64,
    pub deliveries: AtomicU64,
    /// Threads done with their ramp.
    pub ramped: AtomicUsize,
    /// Threads that sent their final states.
    pub finals_sent: AtomicUsize,
    /// Threads that took their verification snapshot. Connections close only once all have:
    /// a closing connection is a user going offline, which every other subscriber would see.
    pub verified: AtomicUsize,
    /// Set by the main thread once every thread — and, with several workers, every worker
    /// (see [`crate::barrier`]) — has verified, or at a deadline: connections may close.
    pub release: AtomicBool,
    /// `subchurn`: watchers done re-subscribing and checking their snapshots; then (set by the
    /// main thread) the targets change once more; watchers done checking those live events.
    pub resubscribed: AtomicUsize,
    pub live: AtomicBool,
    pub live_checked: AtomicUsize,
    /// Per thread: flapped (subscriber, user) pairs still waiting for the final state; meaningful
    /// once that thread is counted in `finals_sent`.
    pub unconverged: Vec<AtomicU64>,
}

impl Shared {
    /// Which of [`Shared::targets`] connection number `n` of this process uses (round-robin).
    pub fn target_index(&self, n: usize) -> usize {
        target::index_of(n, self.targets.len())
    }

    pub fn target(&self, n: usize) -> &Target {
        &self.targets[self.target_index(n)]
    }

    /// The token of `user` (HS256, minted here: no identity provider needed).
    pub fn token_for(&self, user: &str, group: Option<&str>) -> String {
        let mut spec = presenced::auth::TokenSpec::new(user, Duration::from_secs(24 * 3600));
        spec.device_type = Some("other".into());
        if let Some(g) = group {
            spec.groups = vec![g.to_owned()];
        }
        presenced::auth::mint_hs256(&self.secret, &spec)
    }

    pub fn group_of(&self, i: usize) -> Option<String> {
        (self.scn.groups > 0).then(|| format!("g{}", i % self.scn.groups))
    }
}

/// One thread's part of the run. Returns its measurements.
pub fn thread_main(shared: Arc<Shared>, ix: usize, users: Vec<(usize, usize)>) -> Stats {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, drive(shared, ix, users))
}

async fn drive(shared: Arc<Shared>, ix: usize, users: Vec<(usize, usize)>) -> Stats {
    let stats = Rc::new(RefCell::new(Stats::default()));
    let ready = Rc::new(Cell::new(0usize));
    let threads = shared.unconverged.len();
    let total = shared.scn.connections;
    // This thread's share of the fleet's connect rate.
    let rate = shared.scn.rate as f64 / (threads * shared.workers) as f64;
    let mut states = Vec::with_capacity(users.len());
    let mut flappers: Vec<(usize, Rc<RefCell<Option<Sink>>>)> = Vec::new();
    let started = Instant::now();
    for (k, (user, n)) in users.iter().copied().enumerate() {
        if shared.finish.load(Relaxed) {
            break;
        }
        if rate > 0.0 {
            let due = started + Duration::from_secs_f64(k as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        let spec = Spec {
            user,
            n,
            watch: plan::watch_set(
                user,
                total,
                shared.scn.watch,
                shared.scn.pattern,
                shared.seed,
            ),
            group: shared.group_of(user),
        };
        let state = Rc::new(RefCell::new(ConnState::default()));
        let sink = Rc::new(RefCell::new(None));
        if plan::flaps(user, shared.scn.flap_fraction) {
            flappers.push((user, sink.clone()));
        }
        states.push(state.clone());
        tokio::task::spawn_local(client::run(
            shared.clone(),
            spec,
            stats.clone(),
            state,
            sink,
            ready.clone(),
        ));
    }
    // Ramp done once every connection is subscribed or failed.
    while ready.get() < states.len() && !shared.finish.load(Relaxed) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    shared.ramped.fetch_add(1, Relaxed);
    while !shared.run.load(Relaxed) && !shared.finish.load(Relaxed) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    flap(&shared, &stats, &flappers).await;
    // Final states: every flapper ends on ("online", "final-<tag>").
    for (_, sink) in &flappers {
        send(sink, "online", &shared.final_text).await;
    }
    // Report convergence before announcing the finals (Release, paired with the main
    // thread's Acquire), so the main thread never reads a count that predates them.
    let waiting = || -> u64 {
        states
            .iter()
            .map(|s| client::unconverged(&s.borrow()) as u64)
            .sum()
    };
    shared.unconverged[ix].store(waiting(), Release);
    shared.finals_sent.fetch_add(1, Release);
    while !shared.finish.load(Relaxed) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        shared.unconverged[ix].store(waiting(), Release);
    }
    let mut out = std::mem::take(&mut *stats.borrow_mut());
    for s in &states {
        client::verify(&s.borrow(), &mut out);
    }
    shared.verified.fetch_add(1, Release);
    // Bounded: the main thread sets `release` after bounded waits for the other threads and
    // workers.
    while !shared.release.load(Acquire) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for (_, sink) in &flappers {
        sink.borrow_mut().take();
    }
    out
}

async fn send(sink: &RefCell<Option<Sink>>, status: &str, text: &str) -> bool {
    let Some(mut tx) = sink.borrow_mut().take() else {
        return false;
    };
    let op = format!(r#"{{"op":"set_status","status":"{status}","text":"{text}"}}"#);
    let ok = tx.send(Message::text(op)).await.is_ok();
    *sink.borrow_mut() = Some(tx);
    ok
}

/// The run phase: this thread's share of `flaps_per_sec` (in proportion to the flappers it holds,
/// so the whole fleet sends exactly `flaps_per_sec`), round-robin over its flapping users, each
/// flap carrying its send time.
async fn flap(
    shared: &Shared,
    stats: &RefCell<Stats>,
    flappers: &[(usize, Rc<RefCell<Option<Sink>>>)],
) {
    let rate = plan::flap_share(
        shared.scn.flaps_per_sec as f64,
        flappers.len(),
        shared.fleet_flappers,
    );
    if flappers.is_empty() || rate <= 0.0 {
        while !shared.stop_flapping.load(Relaxed) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        return;
    }
    let statuses = ["away", "busy", "online"];
    let started = Instant::now();
    let mut k = 0usize;
    while !shared.stop_flapping.load(Relaxed) {
        let due = started + Duration::from_secs_f64(k as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        let (_, sink) = &flappers[k % flappers.len()];
        let text = format!("t{}", client::now_us());
        if send(sink, statuses[k % 3], &text).await {
            stats.borrow_mut().flaps_sent += 1;
        } else {
            stats.borrow_mut().error("flap_send");
        }
        k += 1;
    }
}
