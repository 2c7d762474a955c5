//! The `subchurn` scenario (issue 11 item 13): connections that cycle `subscribe`/`unsubscribe`
//! over the same set of ids at `churn_ops_per_sec` (by default inside the server's per-connection
//! op limit; the per-user subscription-id budget refuses most of it at the server's defaults, see
//! loadtest/README.md), and then, with `--verify`, a check that the server came through it:
//! every watcher unsubscribes and re-subscribes and must get a correct snapshot of every id, and
//! live events must flow again.
//!
//! Who is who: the ids are `u0 … u{watch-1}`. `churn_targets` of them, spread evenly, are online
//! harness connections whose state is known (`online`, text `<final text>-base`); the others are
//! never online, so their snapshot must say `offline`. The watchers ("churners") are the users
//! `u{watch} …`, `connections` of them.
//!
//! Phases, driven from the main thread through [`Shared`]'s flags: ramp (targets connect and set
//! their status, then the churners connect) → run, the storm (each churner sends
//! `churn_ops_per_sec` ops: subscribe one batch of `churn_batch` ids, unsubscribe it, the next
//! batch, … cycling over the ids; acks, refusals by code and snapshots are counted) → with
//! `--verify`, re-subscribe (each churner unsubscribes every id, then subscribes every id again,
//! retrying a refused op with back-off until `--drain`, then waits up to `--drain` for a snapshot
//! of every id and checks it) → live (each target sets `busy` with the run's final text; every
//! churner must see that event from every target within `--drain`) → finish.

use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::StreamExt;
use futures_util::SinkExt;
use serde::Deserialize;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, Sink};
use crate::plan;
use crate::report::{Stats, Subchurn};
use crate::run::Shared;

/// Longest back-off between two tries of a refused op.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// How long the main thread waits, beyond `--drain`, for the churners to report a stage.
pub const STAGE_SLACK: Duration = Duration::from_secs(5);

/// The plan of a subchurn run, the same for every thread.
pub struct Plan {
    /// The ids cycled over (`u0 …`).
    pub ids: usize,
    /// Index of each target among the ids.
    pub targets: Vec<usize>,
    is_target: Vec<bool>,
    /// Per batch: its ids as a JSON array, ready to splice into an op.
    batches: Vec<String>,
    batch_len: Vec<usize>,
    /// The churners' users start at this index.
    pub first_churner: usize,
    pub churners: usize,
    ops_per_sec: f64,
    base_text: String,
    final_text: String,
    verify: bool,
    drain: Duration,
}

impl Plan {
    pub fn new(shared: &Shared, verify: bool, drain: Duration) -> Plan {
        let scn = &shared.scn;
        let ids = scn.watch;
        let targets = spread(ids, scn.churn_targets);
        let mut is_target = vec![false; ids];
        for t in &targets {
            is_target[*t] = true;
        }
        let all: Vec<String> = (0..ids).map(plan::user).collect();
        let chunks: Vec<&[String]> = all.chunks(scn.churn_batch.max(1)).collect();
        Plan {
            ids,
            targets,
            is_target,
            batches: chunks
                .iter()
                .map(|c| serde_json::to_string(c).expect("strings serialise"))
                .collect(),
            batch_len: chunks.iter().map(|c| c.len()).collect(),
            first_churner: ids,
            churners: scn.connections,
            ops_per_sec: scn.churn_ops_per_sec as f64,
            base_text: format!("{}-base", shared.final_text),
            final_text: shared.final_text.clone(),
            verify,
            drain,
        }
    }

    /// Connections the run opens: churners and targets.
    pub fn connections(&self) -> usize {
        self.churners + self.targets.len()
    }

    fn op(&self, op: &str, id: &str, batch: usize) -> String {
        format!(
            r#"{{"op":"{op}","id":"{id}","users":{}}}"#,
            self.batches[batch]
        )
    }

    fn index(&self, user: &str) -> Option<usize> {
        let i: usize = user.strip_prefix('u')?.parse().ok()?;
        (i < self.ids).then_some(i)
    }
}

/// `k` indices spread evenly over `0..n`.
pub fn spread(n: usize, k: usize) -> Vec<usize> {
    let k = k.min(n);
    (0..k).map(|j| j * n / k).collect()
}

/// Deals churners and targets to threads, round-robin each.
pub fn deal(plan: &Plan, threads: usize) -> Vec<(Vec<usize>, Vec<usize>)> {
    let threads = threads.max(1);
    let mut out = vec![(Vec::new(), Vec::new()); threads];
    for c in 0..plan.churners {
        out[c % threads].0.push(c);
    }
    for (k, t) in plan.targets.iter().enumerate() {
        out[k % threads].1.push(*t);
    }
    out
}

/// One thread's part of a subchurn run.
pub fn thread_main(
    shared: Arc<Shared>,
    plan: Arc<Plan>,
    churners: Vec<usize>,
    targets: Vec<usize>,
) -> Stats {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, drive(shared, plan, churners, targets))
}

async fn drive(
    shared: Arc<Shared>,
    plan: Arc<Plan>,
    churners: Vec<usize>,
    targets: Vec<usize>,
) -> Stats {
    let stats = Rc::new(RefCell::new(Stats::default()));
    let ready = Rc::new(Cell::new(0usize));
    let done = Rc::new(Cell::new(0usize));
    // Targets first, so their state is set before anyone subscribes.
    for (k, t) in targets.iter().enumerate() {
        let n = plan.churners + k;
        tokio::task::spawn_local(target(
            shared.clone(),
            plan.clone(),
            *t,
            n,
            stats.clone(),
            ready.clone(),
            done.clone(),
        ));
    }
    while ready.get() < targets.len() && !shared.finish.load(Relaxed) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for c in &churners {
        tokio::task::spawn_local(churner(
            shared.clone(),
            plan.clone(),
            *c,
            stats.clone(),
            ready.clone(),
            done.clone(),
        ));
    }
    let all = targets.len() + churners.len();
    while ready.get() < all && !shared.finish.load(Relaxed) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    shared.ramped.fetch_add(1, Relaxed);
    while !shared.finish.load(Relaxed) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Every connection task adds its counts as it ends; bounded.
    let deadline = Instant::now() + Duration::from_secs(5);
    while done.get() < all && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let out = std::mem::take(&mut *stats.borrow_mut());
    shared.verified.fetch_add(1, Release);
    while !shared.release.load(Acquire) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    out
}

#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(borrow)]
    r#type: Cow<'a, str>,
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    user: Option<Cow<'a, str>>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(borrow, default)]
    status: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    code: Option<Cow<'a, str>>,
}

/// What one churner's reader learned.
#[derive(Default)]
struct Conn {
    /// Why the connection ended, once it has.
    closed: Option<String>,
    /// The storm's counts.
    counts: Subchurn,
    /// Verification ops acknowledged, and refused (op id → error code).
    acked: HashSet<String>,
    refused: HashMap<String, String>,
    /// Unsubscribe ops of the verification acknowledged; once all are, whatever arrives is the
    /// re-subscription's.
    cleared: usize,
    cleared_of: usize,
    /// Per id: the re-snapshot's seq and whether it was right, then the newest seq seen.
    snap: HashMap<usize, (u64, bool)>,
    /// Targets whose final state arrived live after their re-snapshot.
    live: HashSet<usize>,
    seq_gaps: u64,
}

fn on_text(plan: &Plan, conn: &RefCell<Conn>, text: &str) {
    let Ok(f) = serde_json::from_str::<Frame>(text) else {
        return;
    };
    let mut c = conn.borrow_mut();
    match &*f.r#type {
        "ack" => {
            let Some(id) = f.id.as_deref() else { return };
            if let Some(k) = id.strip_prefix('s') {
                c.counts.subscribe_acked += 1;
                let batch = k
                    .parse::<usize>()
                    .map_or(0, |k| (k / 2) % plan.batches.len());
                c.counts.ids_subscribed += plan.batch_len[batch] as u64;
            } else if id.starts_with('u') {
                c.counts.unsubscribe_acked += 1;
            } else {
                if id.starts_with("vu") {
                    c.cleared += 1;
                    if c.cleared == c.cleared_of {
                        c.snap.clear();
                        c.live.clear();
                    }
                }
                c.acked.insert(id.to_owned());
            }
        }
        "error" => {
            let code = f.code.as_deref().unwrap_or("unknown");
            match f.id.as_deref() {
                Some(id) if id.starts_with('v') => {
                    c.refused.insert(id.to_owned(), code.to_owned());
                }
                // A storm op: count it under its code, allocating only for a new code.
                _ => match c.counts.refused.get_mut(code) {
                    Some(n) => *n += 1,
                    None => {
                        c.counts.refused.insert(code.to_owned(), 1);
                    }
                },
            }
        }
        "presence" => {
            let (Some(user), Some(seq)) = (f.user.as_deref(), f.seq) else {
                return;
            };
            let cleared = c.cleared_of > 0 && c.cleared == c.cleared_of;
            if !cleared {
                c.counts.snapshots += 1;
                return;
            }
            let Some(i) = plan.index(user) else { return };
            let status = f.status.as_deref().unwrap_or("");
            let text = f.text.as_deref();
            match c.snap.get(&i).copied() {
                None => {
                    let right = if plan.is_target[i] {
                        status == "online" && text == Some(plan.base_text.as_str())
                    } else {
                        status == "offline"
                    };
                    if !right && client::debug() {
                        eprintln!(
                            "wrong snapshot: user {user} status {status} text {text:?} \
                             (target: {})",
                            plan.is_target[i]
                        );
                    }
                    c.snap.insert(i, (seq, right));
                }
                Some((last, right)) => {
                    if seq > last + 1 {
                        c.seq_gaps += 1;
                    }
                    c.snap.insert(i, (seq.max(last), right));
                    if plan.is_target[i] && text == Some(plan.final_text.as_str()) {
                        c.live.insert(i);
                    }
                }
            }
        }
        _ => {}
    }
}

/// Reads a connection until it ends.
async fn read(
    plan: Arc<Plan>,
    conn: Rc<RefCell<Conn>>,
    mut rx: futures_util::stream::SplitStream<client::Ws>,
) {
    let why = loop {
        match rx.next().await {
            Some(Ok(Message::Text(t))) => on_text(&plan, &conn, &t),
            Some(Ok(Message::Close(f))) => {
                break format!("closed_{}", f.map_or(1005, |f| u16::from(f.code)))
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => break "read".to_string(),
        }
    };
    conn.borrow_mut().closed = Some(why);
}

async fn open(
    shared: &Shared,
    plan: &Arc<Plan>,
    user: usize,
    n: usize,
    stats: &RefCell<Stats>,
    conn: &Rc<RefCell<Conn>>,
) -> Result<Sink, String> {
    let ws = client::connect(shared, &plan::user(user), None, n, Some(stats)).await?;
    let (tx, rx) = ws.split();
    tokio::task::spawn_local(read(plan.clone(), conn.clone(), rx));
    Ok(tx)
}

async fn churner(
    shared: Arc<Shared>,
    plan: Arc<Plan>,
    c: usize,
    stats: Rc<RefCell<Stats>>,
    ready: Rc<Cell<usize>>,
    done: Rc<Cell<usize>>,
) {
    let user = plan.first_churner + c;
    let conn = Rc::new(RefCell::new(Conn {
        cleared_of: plan.batches.len(),
        ..Conn::default()
    }));
    let opened = open(&shared, &plan, user, c, &stats, &conn).await;
    ready.set(ready.get() + 1);
    let mut tx = match opened {
        Ok(tx) => {
            stats.borrow_mut().established(shared.target_index(c));
            shared.connected.fetch_add(1, Relaxed);
            Some(tx)
        }
        Err(e) => {
            stats.borrow_mut().error(e);
            None
        }
    };
    while !shared.run.load(Relaxed) && !shared.finish.load(Relaxed) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The storm.
    let started = Instant::now();
    let mut k = 0usize;
    while let Some(sink) = tx.as_mut() {
        if shared.stop_flapping.load(Relaxed) || conn.borrow().closed.is_some() {
            break;
        }
        let due = started + Duration::from_secs_f64(k as f64 / plan.ops_per_sec);
        tokio::time::sleep_until(due.into()).await;
        let batch = (k / 2) % plan.batches.len();
        let subscribe = k.is_multiple_of(2);
        let (op, id) = if subscribe {
            ("subscribe", format!("s{k}"))
        } else {
            ("unsubscribe", format!("u{k}"))
        };
        if sink
            .send(Message::text(plan.op(op, &id, batch)))
            .await
            .is_err()
        {
            break;
        }
        let mut c = conn.borrow_mut();
        if subscribe {
            c.counts.subscribe_ops += 1;
        } else {
            c.counts.unsubscribe_ops += 1;
        }
        k += 1;
    }
    while !shared.stop_flapping.load(Relaxed) && !shared.finish.load(Relaxed) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    if let Some(why) = conn.borrow().closed.clone() {
        if !shared.finish.load(Relaxed) {
            stats.borrow_mut().error(why);
        }
    }
    let mut conns = vec![conn.clone()];
    if plan.verify {
        let mut checks = Subchurn {
            watchers: 1,
            ..Subchurn::default()
        };
        let deadline = Instant::now() + plan.drain;
        // A watcher the server closed during the storm comes back once, on a new connection,
        // and verifies on that.
        let mut on = conn.clone();
        let lost = tx.is_none() || conn.borrow().closed.is_some();
        if lost && !shared.finish.load(Relaxed) {
            let fresh = Rc::new(RefCell::new(Conn {
                cleared_of: plan.batches.len(),
                ..Conn::default()
            }));
            tx = match open(&shared, &plan, user, c, &stats, &fresh).await {
                Ok(s) => {
                    stats.borrow_mut().reconnects += 1;
                    conns.push(fresh.clone());
                    on = fresh;
                    Some(s)
                }
                Err(e) => {
                    stats.borrow_mut().error(e);
                    None
                }
            };
        }
        verify(&shared, &plan, &on, &mut tx, &mut checks, deadline).await;
        stats.borrow_mut().subchurn.add(&checks);
    }
    while !shared.finish.load(Relaxed) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for conn in conns {
        let c = conn.borrow();
        let mut st = stats.borrow_mut();
        st.subchurn.add(&c.counts);
        st.seq_gaps += c.seq_gaps;
    }
    done.set(done.get() + 1);
}

/// After the storm: unsubscribe every id, subscribe every id again, check the snapshots (until
/// `deadline`); then wait for the targets' live change.
async fn verify(
    shared: &Shared,
    plan: &Plan,
    conn: &Rc<RefCell<Conn>>,
    tx: &mut Option<Sink>,
    checks: &mut Subchurn,
    deadline: Instant,
) {
    let nb = plan.batches.len();
    let mut ok = tx.is_some();
    for (prefix, op) in [("vu", "unsubscribe"), ("vs", "subscribe")] {
        for b in 0..nb {
            if !ok {
                break;
            }
            let Some(sink) = tx.as_mut() else { break };
            ok = until_acked(plan, conn, sink, prefix, op, b, checks, deadline).await;
        }
    }
    if ok {
        checks.resubscribed = 1;
        while conn.borrow().snap.len() < plan.ids
            && conn.borrow().closed.is_none()
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    {
        let c = conn.borrow();
        checks.snapshots_expected = plan.ids as u64;
        checks.snapshots_missing = (plan.ids - c.snap.len().min(plan.ids)) as u64;
        checks.snapshots_wrong = c.snap.values().filter(|(_, right)| !right).count() as u64;
    }
    shared.resubscribed.fetch_add(1, Release);
    // Live events: the targets change once more, after every watcher has its snapshots.
    while !shared.live.load(Acquire) && !shared.finish.load(Relaxed) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let deadline = Instant::now() + plan.drain;
    let targets = plan.targets.len();
    if ok {
        while conn.borrow().live.len() < targets
            && conn.borrow().closed.is_none()
            && Instant::now() < deadline
            && !shared.finish.load(Relaxed)
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    checks.live_expected = targets as u64;
    checks.live_missing = (targets - conn.borrow().live.len().min(targets)) as u64;
    if client::debug() && (checks.snapshots_missing > 0 || checks.live_missing > 0) {
        let c = conn.borrow();
        let no_snap: Vec<usize> = (0..plan.ids).filter(|i| !c.snap.contains_key(i)).collect();
        let no_live: Vec<&usize> = plan
            .targets
            .iter()
            .filter(|t| !c.live.contains(t))
            .collect();
        eprintln!(
            "subchurn watcher: resubscribed {ok}, no re-snapshot for {} id(s) {:?}, no live \
             event from target(s) {:?}{}",
            no_snap.len(),
            &no_snap[..no_snap.len().min(20)],
            no_live,
            c.closed
                .as_ref()
                .map(|w| format!(", connection {w}"))
                .unwrap_or_default()
        );
    }
    shared.live_checked.fetch_add(1, Release);
}

/// Sends `op` of batch `b` until the server acknowledges it, backing off on a refusal.
#[allow(clippy::too_many_arguments)]
async fn until_acked(
    plan: &Plan,
    conn: &RefCell<Conn>,
    sink: &mut Sink,
    prefix: &str,
    op: &str,
    b: usize,
    checks: &mut Subchurn,
    deadline: Instant,
) -> bool {
    let mut backoff = Duration::from_millis(50);
    for attempt in 0.. {
        let id = format!("{prefix}{b}-{attempt}");
        if sink.send(Message::text(plan.op(op, &id, b))).await.is_err() {
            return false;
        }
        loop {
            {
                let c = conn.borrow();
                if c.acked.contains(&id) {
                    return true;
                }
                if let Some(code) = c.refused.get(&id) {
                    *checks.resubscribe_refused.entry(code.clone()).or_default() += 1;
                    break;
                }
                if c.closed.is_some() || Instant::now() >= deadline {
                    return false;
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        if Instant::now() + backoff >= deadline {
            return false;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
    false
}

/// A watched user whose state the harness knows: online from the ramp, then, after the storm
/// and once every watcher has its snapshots, `busy` with the run's final text.
async fn target(
    shared: Arc<Shared>,
    plan: Arc<Plan>,
    t: usize,
    n: usize,
    stats: Rc<RefCell<Stats>>,
    ready: Rc<Cell<usize>>,
    done: Rc<Cell<usize>>,
) {
    let conn = Rc::new(RefCell::new(Conn::default()));
    let opened = open(&shared, &plan, t, n, &stats, &conn).await;
    let mut tx = match opened {
        Ok(mut tx) => {
            stats.borrow_mut().established(shared.target_index(n));
            shared.connected.fetch_add(1, Relaxed);
            let op = serde_json::json!({"op": "set_status", "id": "vt0", "status": "online",
                                        "text": plan.base_text});
            let sent = tx.send(Message::text(op.to_string())).await.is_ok();
            let deadline = Instant::now() + Duration::from_secs(10);
            while sent && !conn.borrow().acked.contains("vt0") && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            if !conn.borrow().acked.contains("vt0") {
                stats.borrow_mut().error("target_status");
            }
            Some(tx)
        }
        Err(e) => {
            stats.borrow_mut().error(e);
            None
        }
    };
    ready.set(ready.get() + 1);
    while !shared.live.load(Acquire) && !shared.finish.load(Relaxed) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    if shared.live.load(Acquire) {
        if let Some(tx) = tx.as_mut() {
            let op = serde_json::json!({"op": "set_status", "status": "busy",
                                        "text": plan.final_text});
            if tx.send(Message::text(op.to_string())).await.is_err() {
                stats.borrow_mut().error("target_send");
            }
        }
    }
    while !shared.finish.load(Relaxed) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if let Some(why) = conn.borrow().closed.clone() {
        stats.borrow_mut().error(format!("target_{why}"));
    }
    done.set(done.get() + 1);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Plan {
        let targets = vec![0, 2];
        let mut is_target = vec![false; 4];
        for t in &targets {
            is_target[*t] = true;
        }
        Plan {
            ids: 4,
            targets,
            is_target,
            batches: vec![r#"["u0","u1"]"#.into(), r#"["u2","u3"]"#.into()],
            batch_len: vec![2, 2],
            first_churner: 4,
            churners: 1,
            ops_per_sec: 45.0,
            base_text: "final-x-base".into(),
            final_text: "final-x".into(),
            verify: true,
            drain: Duration::from_secs(1),
        }
    }

    /// Verification is no rubber stamp: what arrives before the re-subscription is only
    /// counted; after it, each id's first event is its snapshot, checked against what the
    /// harness set; a target's final text after its snapshot is the live event.
    #[test]
    fn reader_checks_snapshots_and_live_events() {
        let p = plan();
        let c = RefCell::new(Conn {
            cleared_of: 2,
            ..Conn::default()
        });
        let ev = |user: &str, seq: u64, status: &str, text: &str| {
            format!(
                r#"{{"type":"presence","user":"{user}","status":"{status}","text":"{text}","seq":{seq}}}"#
            )
        };
        on_text(&p, &c, r#"{"type":"ack","id":"s0"}"#);
        on_text(
            &p,
            &c,
            r#"{"type":"error","id":"u1","code":"rate_limited"}"#,
        );
        on_text(&p, &c, &ev("u0", 1, "online", "final-x-base"));
        on_text(&p, &c, r#"{"type":"ack","id":"vu0-0"}"#);
        on_text(&p, &c, &ev("u1", 1, "online", "stale"));
        {
            let c = c.borrow();
            assert_eq!((c.counts.subscribe_acked, c.counts.ids_subscribed), (1, 2));
            assert_eq!(c.counts.refused["rate_limited"], 1);
            assert_eq!(c.counts.snapshots, 2, "not cleared until every batch is");
            assert!(c.snap.is_empty());
        }
        on_text(&p, &c, r#"{"type":"ack","id":"vu1-0"}"#);
        on_text(
            &p,
            &c,
            r#"{"type":"error","id":"vs0-0","code":"overloaded"}"#,
        );
        on_text(&p, &c, &ev("u0", 1, "online", "final-x-base")); // target, right
        on_text(&p, &c, &ev("u1", 0, "offline", "")); // never online, right
        on_text(&p, &c, &ev("u2", 3, "online", "something-else")); // target, wrong
        on_text(&p, &c, &ev("u3", 1, "online", "")); // should be offline: wrong
        on_text(&p, &c, &ev("u0", 3, "busy", "final-x")); // live, after a gap
        on_text(&p, &c, &ev("u2", 4, "busy", "final-x")); // live
        let c = c.borrow();
        assert_eq!(c.refused["vs0-0"], "overloaded");
        assert_eq!(c.snap.len(), 4);
        assert_eq!(c.snap.values().filter(|(_, right)| !right).count(), 2);
        assert_eq!(c.live, HashSet::from([0, 2]));
        assert_eq!(c.seq_gaps, 1);
    }

    #[test]
    fn targets_spread_over_the_ids() {
        assert_eq!(spread(1000, 10)[..3], [0, 100, 200]);
        assert_eq!(spread(5, 10), vec![0, 1, 2, 3, 4]);
        assert!(spread(10, 0).is_empty());
        let s = spread(1000, 7);
        let mut d = s.clone();
        d.dedup();
        assert_eq!(d.len(), 7);
    }
}
