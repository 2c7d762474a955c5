//! The fleet barrier: the workers of one fleet (`--worker i/n` with a shared `--run-tag`) close
//! their connections only once every worker has taken its verification snapshot.
//!
//! A closing connection is a user going offline, and every subscriber of that user — in every
//! worker — hears of it. A worker that closed as soon as its own subscribers had converged told
//! the subscribers of a worker still running or draining that its flapping users had gone
//! offline after their final state, and that worker then counted those pairs as missing
//! (issue 11 item 8: 2–12 missing finals per multi-worker run; the server had delivered them).
//! Threads of one process already waited for each other; this does the same across processes,
//! which may run on different machines, so it goes through the server itself: each worker holds
//! one control connection as user `lt-ctl-<run>-<i>`, subscribes to every other worker's control
//! user, and once its own threads have verified sets its status text to `verified-<run>`. It
//! lets its connections close when it has seen every other worker verified (or gone: a control
//! user that was online and went offline), or at a deadline.

use std::collections::HashSet;
use std::sync::atomic::AtomicU8;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio_tungstenite::tungstenite::Message;

use crate::client;
use crate::run::Shared;

/// Where the barrier stands, as seen by the main thread.
pub const WAITING: u8 = 0;
/// Every other worker verified (or left).
pub const PASSED: u8 = 1;
/// The control connection could not be opened or was lost: no barrier (counted as an error).
pub const FAILED: u8 = 2;

/// The control user of worker `worker` for the run whose final text is `final_text`: a short
/// hash of the run, so any `--run-tag` gives a valid id.
pub fn control_user(final_text: &str, worker: usize) -> String {
    // FNV-1a: stable across processes and builds, which `DefaultHasher` does not promise.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in final_text.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    format!("lt-ctl-{h:016x}-{worker}")
}

/// The status text a worker publishes once its threads have verified.
pub fn verified_text(final_text: &str) -> String {
    format!("verified-{final_text}")
}

pub struct Barrier {
    pub state: Arc<AtomicU8>,
    pub thread: std::thread::JoinHandle<Result<(), String>>,
}

/// Opens this worker's control connection on its own thread and keeps it until `release`.
pub fn spawn(shared: Arc<Shared>, worker: usize, workers: usize) -> Barrier {
    let state = Arc::new(AtomicU8::new(WAITING));
    let st = state.clone();
    let thread = std::thread::Builder::new()
        .name("load-barrier".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime");
            let out = rt.block_on(control(&shared, &st, worker, workers));
            if out.is_err() {
                st.store(FAILED, Release);
            }
            out
        })
        .expect("spawning the barrier thread");
    Barrier { state, thread }
}

#[derive(Deserialize)]
struct Presence<'a> {
    r#type: &'a str,
    #[serde(default)]
    user: Option<&'a str>,
    #[serde(default)]
    status: Option<&'a str>,
    #[serde(default)]
    text: Option<&'a str>,
}

async fn control(
    shared: &Shared,
    state: &AtomicU8,
    worker: usize,
    workers: usize,
) -> Result<(), String> {
    let threads = shared.unconverged.len();
    let me = control_user(&shared.final_text, worker);
    let peers: HashSet<String> = (0..workers)
        .filter(|w| *w != worker)
        .map(|w| control_user(&shared.final_text, w))
        .collect();
    let mut ws = client::connect(shared, &me, None, worker, None)
        .await
        .map_err(|e| format!("barrier_{e}"))?;
    let sub = serde_json::json!({"op": "subscribe", "users": peers}).to_string();
    ws.send(Message::text(sub))
        .await
        .map_err(|_| "barrier_send")?;
    let verified = verified_text(&shared.final_text);
    let mut online: HashSet<String> = HashSet::new();
    let mut done: HashSet<String> = HashSet::new();
    let mut published = false;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    while !shared.release.load(Acquire) {
        if !published && shared.verified.load(Acquire) >= threads {
            let op = serde_json::json!({"op": "set_status", "status": "online", "text": verified});
            ws.send(Message::text(op.to_string()))
                .await
                .map_err(|_| "barrier_send")?;
            published = true;
        }
        if published && done.len() == peers.len() && state.load(Relaxed) == WAITING {
            state.store(PASSED, Release);
        }
        tokio::select! {
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(t))) => {
                    let Ok(p) = serde_json::from_str::<Presence>(&t) else { continue };
                    let (Some(user), "presence") = (p.user, p.r#type) else { continue };
                    if !peers.contains(user) {
                        continue;
                    }
                    if p.status == Some("offline") {
                        // Online earlier in this run, now gone: it is not coming back.
                        if online.contains(user) {
                            done.insert(user.to_owned());
                        }
                    } else {
                        online.insert(user.to_owned());
                        if p.text == Some(verified.as_str()) {
                            done.insert(user.to_owned());
                        }
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return Err("barrier_closed".into()),
            },
            _ = tick.tick() => {}
        }
    }
    Ok(())
}
