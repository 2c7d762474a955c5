//! Registry operations: presenced's per-shard [`Registry`] against the "shared registry behind a
//! lock" design, a `std::sync::Mutex<std::collections::HashMap<String, UserState>>` doing the same
//! work (session list, aggregate status, `seq`, `last_seen`, watcher counts, a state to send).
//!
//! Why this baseline: it is what a thread-pool server would share between its threads. Alone on
//! one thread its lock is uncontended, so the gap there is the lock plus std's SipHash; the
//! `2_threads` cases run a second thread doing the same `set_status` load (on its own registry
//! for ours, as another shard would; on the same map for the baseline), which is where a shared
//! lock starts to cost on a 2-core machine. 100,000 users, each online with one session.

use std::collections::HashMap;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use presenced::presence::{
    Aggregate, DeviceType, Hold, PresenceState, Registry, SessionId, SessionInfo, Status, UserId,
};

const USERS: usize = 100_000;
const NOW_MS: u64 = 1_700_000_000_000;
/// Upper bound on the background thread's operations; it normally stops long before, on a flag.
const PEER_OPS_MAX: u64 = 1 << 40;

fn info() -> SessionInfo {
    SessionInfo {
        device: Some("laptop".into()),
        device_type: DeviceType::Web,
        region: None,
        groups: Arc::from([]),
        roles: Arc::from([]),
        ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        connected_at_ms: NOW_MS,
    }
}

fn users(prefix: &str) -> Vec<UserId> {
    (0..USERS).map(|i| format!("{prefix}-{i}").into()).collect()
}

/// One session in the baseline: the same fields as `presence::registry::Session`.
struct BaseSession {
    id: SessionId,
    status: Status,
    text: Option<Arc<str>>,
    stamp: u64,
    /// Kept as the registry keeps it (admin API, groups); never read here.
    _info: SessionInfo,
}

/// The baseline's per-user record: the same facts the registry keeps.
#[derive(Default)]
struct UserState {
    user: Option<UserId>,
    sessions: Vec<BaseSession>,
    status: Aggregate,
    text: Option<Arc<str>>,
    devices: u32,
    seq: u64,
    last_seen: Option<u64>,
    changed_at_ms: u64,
    stamps: u64,
    watchers: Vec<(u16, u32)>,
}

impl UserState {
    fn state(&self, user: &str, now_ms: u64) -> PresenceState {
        PresenceState {
            user: self.user.clone().unwrap_or_else(|| user.into()),
            status: self.status,
            text: self.text.clone(),
            devices: self.devices,
            last_seen: self.last_seen,
            ts: if self.seq == 0 {
                now_ms
            } else {
                self.changed_at_ms
            },
            seq: self.seq,
        }
    }

    /// Recomputes the aggregate; on a change returns the state and the shards to tell.
    fn recompute(&mut self, user: &str, now_ms: u64) -> Option<(PresenceState, Vec<u16>)> {
        let (mut status, mut text, mut devices, mut best) = (Aggregate::Offline, None, 0, 0);
        for s in &self.sessions {
            let Some(agg) = s.status.visible() else {
                continue;
            };
            devices += 1;
            if agg > status || (agg == status && s.stamp >= best) {
                (status, text, best) = (agg, s.text.clone(), s.stamp);
            }
        }
        if (status, &text, devices) == (self.status, &self.text, self.devices) {
            return None;
        }
        if self.status != Aggregate::Offline && status == Aggregate::Offline {
            self.last_seen = Some(now_ms);
        }
        (self.status, self.text, self.devices) = (status, text, devices);
        self.seq += 1;
        self.changed_at_ms = now_ms;
        let shards = self.watchers.iter().map(|(s, _)| *s).collect();
        Some((self.state(user, now_ms), shards))
    }
}

/// std's `entry` wants an owned key: look up first, so a known user costs no allocation.
fn entry<'a>(map: &'a mut HashMap<String, UserState>, user: &str) -> &'a mut UserState {
    if !map.contains_key(user) {
        map.insert(user.to_owned(), UserState::default());
    }
    map.get_mut(user).expect("inserted just above")
}

/// The shared-lock registry.
#[derive(Default)]
struct Shared(Mutex<HashMap<String, UserState>>);

type BaseChange = Option<(PresenceState, Vec<u16>)>;

impl Shared {
    fn connect(
        &self,
        user: &UserId,
        id: SessionId,
        status: Status,
        info: SessionInfo,
    ) -> BaseChange {
        let mut map = self.0.lock().expect("no panics while locked");
        let e = entry(&mut map, user);
        e.user.get_or_insert_with(|| user.clone());
        e.stamps += 1;
        e.sessions.push(BaseSession {
            id,
            status,
            text: None,
            stamp: e.stamps,
            _info: info,
        });
        e.recompute(user, NOW_MS)
    }

    fn disconnect(&self, user: &str, id: SessionId) -> BaseChange {
        let mut map = self.0.lock().expect("no panics while locked");
        let e = map.get_mut(user)?;
        let pos = e.sessions.iter().position(|s| s.id == id)?;
        e.sessions.swap_remove(pos);
        e.recompute(user, NOW_MS)
    }

    fn set_status(&self, user: &str, id: SessionId, status: Status) -> BaseChange {
        let mut map = self.0.lock().expect("no panics while locked");
        let e = map.get_mut(user)?;
        e.stamps += 1;
        let stamp = e.stamps;
        let s = e.sessions.iter_mut().find(|s| s.id == id)?;
        (s.status, s.text, s.stamp) = (status, None, stamp);
        e.recompute(user, NOW_MS)
    }

    fn watch(&self, user: &str, shard: u16) -> PresenceState {
        let mut map = self.0.lock().expect("no panics while locked");
        let e = entry(&mut map, user);
        match e.watchers.iter_mut().find(|(s, _)| *s == shard) {
            Some((_, n)) => *n += 1,
            None => e.watchers.push((shard, 1)),
        }
        e.state(user, NOW_MS)
    }

    fn unwatch(&self, user: &str, shard: u16) -> bool {
        let mut map = self.0.lock().expect("no panics while locked");
        let Some(e) = map.get_mut(user) else {
            return false;
        };
        let Some(pos) = e.watchers.iter().position(|(s, _)| *s == shard) else {
            return false;
        };
        e.watchers[pos].1 -= 1;
        if e.watchers[pos].1 == 0 {
            e.watchers.swap_remove(pos);
        }
        true
    }

    fn snapshot(&self, user: &str) -> PresenceState {
        let map = self.0.lock().expect("no panics while locked");
        match map.get(user) {
            Some(e) => e.state(user, NOW_MS),
            None => UserState::default().state(user, NOW_MS),
        }
    }
}

fn filled_registry(ids: &[UserId]) -> Registry {
    let mut r = Registry::new();
    for (i, u) in ids.iter().enumerate() {
        r.connect(
            u,
            SessionId::from_raw(i as u64),
            Status::Online,
            info(),
            NOW_MS,
        );
    }
    assert_eq!(r.online_users(), ids.len(), "every user is online");
    r
}

fn fill_shared(shared: &Shared, ids: &[UserId]) {
    for (i, u) in ids.iter().enumerate() {
        shared.connect(u, SessionId::from_raw(i as u64), Status::Online, info());
    }
}

/// Walks the users round-robin; the status flips every full pass so every call is a change.
fn next(n: &mut usize) -> (usize, Status) {
    let i = *n % USERS;
    let status = if (*n / USERS).is_multiple_of(2) {
        Status::Away
    } else {
        Status::Online
    };
    *n = n.wrapping_add(1);
    (i, status)
}

/// Runs `op` on another thread until the closure `measure` returns; bounded by `PEER_OPS_MAX`.
fn with_peer(op: impl FnMut(usize, Status) + Send, measure: impl FnOnce()) {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let mut op = op;
        let stop = &stop;
        s.spawn(move || {
            let mut n = 0;
            for _ in 0..PEER_OPS_MAX {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let (i, status) = next(&mut n);
                op(i, status);
            }
        });
        measure();
        stop.store(true, Ordering::Relaxed);
    });
}

fn set_status(c: &mut Criterion) {
    let ids = users("user");
    let peer_ids = users("peer");
    let mut ours = filled_registry(&ids);
    let shared = Shared::default();
    fill_shared(&shared, &ids);
    fill_shared(&shared, &peer_ids);

    let mut g = c.benchmark_group("registry/set_status_100k");
    // One walk per registry, so each call flips that user's status: always a change.
    let (mut n_ours, mut n_shared) = (0, 0);
    g.bench_function("ours", |b| {
        b.iter(|| {
            let (i, st) = next(&mut n_ours);
            black_box(ours.set_status(&ids[i], SessionId::from_raw(i as u64), st, None, NOW_MS))
        })
    });
    g.bench_function("mutex_hashmap", |b| {
        b.iter(|| {
            let (i, st) = next(&mut n_shared);
            black_box(shared.set_status(&ids[i], SessionId::from_raw(i as u64), st))
        })
    });
    // Another shard busy with its own registry (the other core is not idle in either case).
    let mut peer = filled_registry(&peer_ids);
    with_peer(
        |i, st| {
            let change = peer.set_status(
                &peer_ids[i],
                SessionId::from_raw(i as u64),
                st,
                None,
                NOW_MS,
            );
            black_box(change.expect("the peer's users are connected"));
        },
        || {
            g.bench_function("ours/2_threads", |b| {
                b.iter(|| {
                    let (i, st) = next(&mut n_ours);
                    black_box(ours.set_status(
                        &ids[i],
                        SessionId::from_raw(i as u64),
                        st,
                        None,
                        NOW_MS,
                    ))
                })
            });
        },
    );
    drop(peer);
    // Another thread on the same shared map (disjoint users: only the lock is shared).
    with_peer(
        |i, st| {
            black_box(shared.set_status(&peer_ids[i], SessionId::from_raw(i as u64), st));
        },
        || {
            g.bench_function("mutex_hashmap/2_threads", |b| {
                b.iter(|| {
                    let (i, st) = next(&mut n_shared);
                    black_box(shared.set_status(&ids[i], SessionId::from_raw(i as u64), st))
                })
            });
        },
    );
    g.finish();
}

fn sessions_and_watches(c: &mut Criterion) {
    let ids = users("user");
    let mut ours = filled_registry(&ids);
    let shared = Shared::default();
    fill_shared(&shared, &ids);
    let second = |i: usize| SessionId::from_raw((USERS + i) as u64);
    let mut n = 0;

    // A second device of an online user comes and goes: two changes (devices 1 → 2 → 1).
    let mut g = c.benchmark_group("registry/connect_disconnect_100k");
    g.bench_function("ours", |b| {
        b.iter(|| {
            let (i, _) = next(&mut n);
            black_box(ours.connect(&ids[i], second(i), Status::Online, info(), NOW_MS));
            black_box(ours.disconnect(&ids[i], second(i), Hold::None, NOW_MS))
        })
    });
    g.bench_function("mutex_hashmap", |b| {
        b.iter(|| {
            let (i, _) = next(&mut n);
            black_box(shared.connect(&ids[i], second(i), Status::Online, info()));
            black_box(shared.disconnect(&ids[i], second(i)))
        })
    });
    g.finish();

    // A subscription from shard 1 arrives (count it, return the snapshot), then ends.
    let mut g = c.benchmark_group("registry/watch_unwatch_100k");
    g.bench_function("ours", |b| {
        b.iter(|| {
            let (i, _) = next(&mut n);
            black_box(ours.watch(&ids[i], 1, NOW_MS));
            black_box(ours.unwatch(&ids[i], 1))
        })
    });
    g.bench_function("mutex_hashmap", |b| {
        b.iter(|| {
            let (i, _) = next(&mut n);
            black_box(shared.watch(&ids[i], 1));
            black_box(shared.unwatch(&ids[i], 1))
        })
    });
    g.finish();

    let mut g = c.benchmark_group("registry/snapshot_100k");
    g.bench_function("ours", |b| {
        b.iter(|| {
            let (i, _) = next(&mut n);
            black_box(ours.snapshot(&ids[i], NOW_MS))
        })
    });
    g.bench_function("mutex_hashmap", |b| {
        b.iter(|| {
            let (i, _) = next(&mut n);
            black_box(shared.snapshot(&ids[i]))
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50);
    targets = set_status, sessions_and_watches
}
criterion_main!(benches);
