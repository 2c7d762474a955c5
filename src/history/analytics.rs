//! The answers history gives, computed from recorded events and samples: pure functions, tested
//! here against brute-force models, shared by every backend.
//!
//! **Who counts as online** follows presence's rule (SPEC §3): a user is online while at least
//! one session is visible; invisible sessions count as offline to everyone else. History records
//! session starts and ends, and every change of the user's aggregate (`status` events, which
//! already apply the rule: `offline` when no session is visible). So a user is online at `t`
//! when a session of theirs is open at `t` **and** their latest status event at or before `t`
//! is not `offline`. With no status event at or before `t` among the events read (its record
//! expired, or was dropped), the sessions alone decide, as they did before status events were
//! read at all.
//!
//! What the records cannot tell: which of a user's sessions is the visible one. The aggregate
//! says whether *some* session is visible, not which. So while a user is online, every session
//! open at that moment counts as online (for device types, regions and groups); a user with an
//! invisible phone and a visible laptop shows both device types online. When all of a user's
//! sessions are visible or all hidden, the answers are exact.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::event::{EventKind, HistoryEvent, Sample};
use crate::presence::{Aggregate, DeviceType, SessionId};

/// One session's interval as far as the events show it; `end: None` while still open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interval {
    pub session: SessionId,
    pub start: u64,
    pub end: Option<u64>,
    pub device_type: DeviceType,
    pub region: Option<std::sync::Arc<str>>,
}

/// Session intervals from a user's events (any order). An end without its start (the start is
/// older than what was read) still gives the interval, from the end's `started_at`.
pub fn intervals(events: &[HistoryEvent]) -> Vec<Interval> {
    // Session ids restart with every server process, so a session is (id, start time): the end
    // event carries its start.
    let mut by_session: BTreeMap<(SessionId, u64), Interval> = BTreeMap::new();
    for e in events {
        match e.kind {
            EventKind::SessionStart => {
                by_session.entry((e.session, e.ts)).or_insert(Interval {
                    session: e.session,
                    start: e.ts,
                    end: None,
                    device_type: e.device_type.unwrap_or_default(),
                    region: e.region.clone(),
                });
            }
            EventKind::SessionEnd => {
                let start = if e.started_at > 0 { e.started_at } else { e.ts };
                let iv = by_session.entry((e.session, start)).or_insert(Interval {
                    session: e.session,
                    start,
                    end: None,
                    device_type: e.device_type.unwrap_or_default(),
                    region: e.region.clone(),
                });
                iv.end = Some(e.ts);
            }
            EventKind::Status => {}
        }
    }
    by_session.into_values().collect()
}

/// Whether a status event's aggregate is visible (`None`: not a status event, or one without
/// a status).
fn visible(e: &HistoryEvent) -> Option<bool> {
    (e.kind == EventKind::Status)
        .then_some(e.status)
        .flatten()
        .map(|s| s != Aggregate::Offline)
}

/// The order of a user's status events: time, then `seq` (same-millisecond changes of one
/// process), then the order read (stores return same-millisecond events in recorded order).
fn status_key(e: &HistoryEvent) -> (u64, u64) {
    (e.ts, e.seq)
}

/// One user's stretches of time that are **not** known to be hidden, from their status events
/// (any order): `[start, end)` ranges, sorted and disjoint, clipped to `[from, to)`. Before the
/// first status event the state is unknown, and counts as visible (the sessions decide).
pub fn visible_ranges(events: &[HistoryEvent], from: u64, to: u64) -> Vec<(u64, u64)> {
    let mut changes: Vec<(&HistoryEvent, bool)> = events
        .iter()
        .filter_map(|e| visible(e).map(|v| (e, v)))
        .collect();
    // Stable: equal keys keep the order read.
    changes.sort_by_key(|(e, _)| status_key(e));
    let mut stretches: Vec<(u64, u64)> = Vec::new();
    // (since, visible) of the stretch in progress; unknown counts as visible.
    let mut since = 0u64;
    let mut shown = true;
    for (e, v) in changes {
        if v != shown {
            if shown {
                stretches.push((since, e.ts));
            }
            since = e.ts;
            shown = v;
        }
    }
    if shown {
        stretches.push((since, u64::MAX));
    }
    union(stretches, from, to)
}

/// Sorted, disjoint `[start, end)` ranges covering the union of `ranges`, clipped to `[from, to)`.
pub fn union(mut ranges: Vec<(u64, u64)>, from: u64, to: u64) -> Vec<(u64, u64)> {
    ranges.retain_mut(|(s, e)| {
        *s = (*s).max(from);
        *e = (*e).min(to);
        s < e
    });
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (s, e) in ranges {
        match out.last_mut() {
            Some((_, last_end)) if s <= *last_end => *last_end = (*last_end).max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Total length of the union of `[start, end)` ranges, clipped to `[from, to)`.
#[cfg(test)]
fn union_len(ranges: Vec<(u64, u64)>, from: u64, to: u64) -> u64 {
    union(ranges, from, to).iter().map(|(s, e)| e - s).sum()
}

/// Total length of the intersection of two sorted, disjoint range lists (one sweep).
pub fn intersection_len(a: &[(u64, u64)], b: &[(u64, u64)]) -> u64 {
    let (mut i, mut j, mut total) = (0, 0, 0);
    while i < a.len() && j < b.len() {
        let (s, e) = (a[i].0.max(b[j].0), a[i].1.min(b[j].1));
        if s < e {
            total += e - s;
        }
        if a[i].1 <= b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    total
}

/// Whether `[s, e)` overlaps one of the sorted, disjoint `ranges` for at least a millisecond.
fn overlaps(ranges: &[(u64, u64)], s: u64, e: u64) -> bool {
    // The first range that ends after `s`.
    let i = ranges.partition_point(|r| r.1 <= s);
    ranges.get(i).is_some_and(|r| r.0 < e && s < e)
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Analytics {
    pub from: u64,
    pub to: u64,
    /// Milliseconds online: a session open and the user visible (overlapping devices count
    /// once; invisible time does not count).
    pub online_ms: u64,
    /// Sessions in the window during which the user was visible (online) at some point; a
    /// session shorter than a millisecond occupies the millisecond it started in.
    pub sessions: u64,
    /// Of those, sessions still open at `to` (counted up to `to`).
    pub open_sessions: u64,
    /// Milliseconds online per device type (of the sessions counted): a session of that type
    /// open and the user visible.
    pub by_device_type: BTreeMap<&'static str, u64>,
    /// Sessions online per region (`unknown` when the token had none), as `sessions` counts.
    pub sessions_by_region: BTreeMap<String, u64>,
}

/// Analytics of one user over `[from, to)` from their events (session and status, any order);
/// sessions still open count up to `min(to, now)`. Online time follows presence's rule (see the
/// module's documentation): invisible time is not online time.
pub fn analytics(events: &[HistoryEvent], from: u64, to: u64, now: u64) -> Analytics {
    let horizon = to.min(now);
    let mut out = Analytics {
        from,
        to,
        ..Analytics::default()
    };
    let shown = visible_ranges(events, from, to);
    let mut all = Vec::new();
    let mut per_type: BTreeMap<&'static str, Vec<(u64, u64)>> = BTreeMap::new();
    for iv in intervals(events) {
        if iv.start > horizon {
            continue;
        }
        let end = iv.end.unwrap_or(horizon);
        // A session counts when the user was visible in a millisecond it occupied: at least the
        // one it started in (a device can come and go within one).
        let occupied_end = end.max(iv.start.saturating_add(1)).min(to);
        if !overlaps(&shown, iv.start.max(from), occupied_end) {
            continue;
        }
        let (s, e) = (iv.start.max(from), end.min(horizon));
        out.sessions += 1;
        out.open_sessions += u64::from(iv.end.is_none());
        let region = iv.region.as_deref().unwrap_or("unknown").to_owned();
        *out.sessions_by_region.entry(region).or_default() += 1;
        all.push((s, e));
        per_type
            .entry(iv.device_type.as_str())
            .or_default()
            .push((s, e));
    }
    out.online_ms = intersection_len(&union(all, from, horizon), &shown);
    out.by_device_type = per_type
        .into_iter()
        .map(|(t, r)| (t, intersection_len(&union(r, from, horizon), &shown)))
        .collect();
    out
}

/// One point of a replay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ReplayPoint {
    pub t: u64,
    /// Online users (in the group, when one was asked for) at the latest sample at or before
    /// `t`; `None` when no sample lies within one step before `t`.
    pub online: Option<u64>,
}

/// Online counts at `from, from + step, … ≤ to`, each from the latest sample in `(t - step, t]`.
/// `samples` sorted by time.
pub fn replay(
    samples: &[Sample],
    from: u64,
    to: u64,
    step: u64,
    group: Option<&str>,
) -> Vec<ReplayPoint> {
    assert!(step > 0, "the API refuses step 0");
    let mut out = Vec::new();
    let mut i = 0;
    let mut t = from;
    while t <= to {
        while i < samples.len() && samples[i].ts <= t {
            i += 1;
        }
        // The latest sample in (t - step, t]; no overflow whatever `step` is.
        let within = |ts: u64| t.checked_sub(step).is_none_or(|lo| ts > lo);
        let online = (i > 0 && within(samples[i - 1].ts)).then(|| samples[i - 1].count(group));
        out.push(ReplayPoint { t, online });
        t = match t.checked_add(step) {
            Some(n) => n,
            None => break,
        };
    }
    out
}

/// Users online at `t`, from their session and status events in `[t - lookback, t]` (any
/// order): a session started in that window and not ended by `t`, and the user's latest status
/// event at or before `t` not `offline` (presence's rule; see the module's documentation). With
/// `group`, only sessions that carried it count. Sorted, at most `limit`; also returns how many
/// there were in all.
pub fn online_at(
    events: &[HistoryEvent],
    t: u64,
    group: Option<&str>,
    limit: usize,
) -> (Vec<String>, u64) {
    // A session is (user, id, start): ids restart with every server process and servers share
    // a ScyllaDB history.
    type Key<'a> = (&'a str, SessionId, u64);
    let mut open: BTreeMap<Key<'_>, bool> = BTreeMap::new();
    let mut ended: BTreeSet<Key<'_>> = BTreeSet::new();
    // Each user's latest status event at or before `t`: (order, visible).
    let mut latest: BTreeMap<&str, ((u64, u64), bool)> = BTreeMap::new();
    for e in events.iter().filter(|e| e.ts <= t) {
        match e.kind {
            EventKind::SessionStart => {
                let in_group = group.is_none_or(|g| e.groups.iter().any(|x| &**x == g));
                open.insert((&e.user, e.session, e.ts), in_group);
            }
            EventKind::SessionEnd => {
                let start = if e.started_at > 0 { e.started_at } else { e.ts };
                ended.insert((&e.user, e.session, start));
            }
            EventKind::Status => {
                let Some(v) = visible(e) else { continue };
                let key = status_key(e);
                // `>=`: of equal keys, the one read last (recorded last) wins.
                match latest.get_mut(&*e.user) {
                    Some(cur) if key < cur.0 => {}
                    Some(cur) => *cur = (key, v),
                    None => {
                        latest.insert(&e.user, (key, v));
                    }
                }
            }
        }
    }
    let users: BTreeSet<&str> = open
        .into_iter()
        .filter(|(k, in_group)| *in_group && !ended.contains(k))
        .map(|((u, _, _), _)| u)
        .filter(|u| latest.get(u).is_none_or(|(_, v)| *v))
        .collect();
    let total = users.len() as u64;
    (
        users.into_iter().take(limit).map(str::to_owned).collect(),
        total,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn start(user: &str, s: u64, ts: u64, t: DeviceType, groups: &[&str]) -> HistoryEvent {
        let mut e = HistoryEvent::new(ts, user.into(), EventKind::SessionStart);
        e.session = SessionId::from_raw(s);
        e.started_at = ts;
        e.device_type = Some(t);
        e.groups = groups
            .iter()
            .map(|g| crate::presence::GroupId::from(*g))
            .collect();
        e
    }

    fn end(user: &str, s: u64, started: u64, ts: u64, t: DeviceType) -> HistoryEvent {
        let mut e = HistoryEvent::new(ts, user.into(), EventKind::SessionEnd);
        e.session = SessionId::from_raw(s);
        e.started_at = started;
        e.device_type = Some(t);
        e
    }

    #[test]
    fn overlapping_devices_count_once_and_open_sessions_count_to_now() {
        let ev = vec![
            start("u", 1, 100, DeviceType::Web, &[]),
            start("u", 2, 150, DeviceType::Ios, &[]),
            end("u", 1, 100, 200, DeviceType::Web),
            end("u", 2, 150, 300, DeviceType::Ios),
            start("u", 3, 500, DeviceType::Web, &[]), // still open
        ];
        let a = analytics(&ev, 0, 10_000, 700);
        assert_eq!(a.online_ms, 200 + 200, "100..300 once, then 500..700 (now)");
        assert_eq!((a.sessions, a.open_sessions), (3, 1));
        assert_eq!(a.by_device_type["web"], 100 + 200);
        assert_eq!(a.by_device_type["ios"], 150);
        assert_eq!(a.sessions_by_region["unknown"], 3);
        // Clipped to the window.
        let w = analytics(&ev, 120, 250, 700);
        assert_eq!((w.online_ms, w.sessions), (130, 2));
        // An end whose start was not read still counts from its started_at.
        let only_end = vec![end("u", 9, 50, 120, DeviceType::Android)];
        assert_eq!(analytics(&only_end, 100, 200, 1000).online_ms, 20);
    }

    #[test]
    fn replay_takes_the_latest_sample_within_a_step() {
        let s = |ts, online| Sample {
            ts,
            online,
            groups: vec![("g".into(), online / 2)],
        };
        let samples = vec![s(10, 4), s(20, 6), s(50, 8)];
        let r = replay(&samples, 0, 60, 10, None);
        let got: Vec<Option<u64>> = r.iter().map(|p| p.online).collect();
        assert_eq!(got, [None, Some(4), Some(6), None, None, Some(8), None]);
        assert_eq!(replay(&samples, 20, 20, 10, Some("g"))[0].online, Some(3));
        assert_eq!(
            replay(&samples, 20, 20, 10, Some("nope"))[0].online,
            Some(0)
        );
    }

    #[test]
    fn session_ids_reused_across_restarts_and_users_are_told_apart() {
        // alice's session 1 (still open); after a restart bob's session 1 starts and ends.
        let ev = vec![
            start("alice", 1, 10, DeviceType::Web, &[]),
            start("bob", 1, 20, DeviceType::Web, &[]),
            end("bob", 1, 20, 30, DeviceType::Web),
        ];
        assert_eq!(online_at(&ev, 40, None, 10).0, ["alice"]);
        // The same user, the same id in two runs: two sessions, not one long one.
        let ev = vec![
            start("u", 1, 1_000, DeviceType::Web, &[]),
            end("u", 1, 1_000, 11_000, DeviceType::Web),
            start("u", 1, 50_000, DeviceType::Web, &[]),
            end("u", 1, 50_000, 60_000, DeviceType::Web),
        ];
        let a = analytics(&ev, 0, 100_000, 100_000);
        assert_eq!((a.online_ms, a.sessions), (20_000, 2));
    }

    #[test]
    fn a_huge_step_cannot_overflow() {
        let s = vec![Sample {
            ts: 10,
            online: 3,
            groups: vec![],
        }];
        let r = replay(&s, 0, 20, u64::MAX - 5, None);
        assert_eq!(r[0].online, None);
        assert_eq!(replay(&s, 10, 10, u64::MAX, None)[0].online, Some(3));
    }

    #[test]
    fn online_at_an_instant() {
        let ev = vec![
            start("a", 1, 10, DeviceType::Web, &["g"]),
            start("b", 2, 20, DeviceType::Web, &[]),
            end("a", 1, 10, 30, DeviceType::Web),
            start("a", 3, 40, DeviceType::Web, &["g"]),
            start("c", 4, 60, DeviceType::Web, &["g"]),
        ];
        assert_eq!(
            online_at(&ev, 25, None, 10),
            (vec!["a".into(), "b".into()], 2)
        );
        assert_eq!(online_at(&ev, 35, None, 10).0, ["b"]);
        assert_eq!(online_at(&ev, 50, Some("g"), 10).0, ["a"]);
        assert_eq!(
            online_at(&ev, 70, None, 2),
            (vec!["a".into(), "b".into()], 3)
        );
    }

    fn status(user: &str, ts: u64, a: Aggregate, seq: u64) -> HistoryEvent {
        let mut e = HistoryEvent::new(ts, user.into(), EventKind::Status);
        e.status = Some(a);
        e.seq = seq;
        e
    }

    #[test]
    fn invisible_time_is_not_online() {
        // u connects at 100 (online), goes invisible at 150, visible (away) at 250, leaves at 300.
        let ev = vec![
            start("u", 1, 100, DeviceType::Web, &["g"]),
            status("u", 100, Aggregate::Online, 1),
            status("u", 150, Aggregate::Offline, 2),
            status("u", 250, Aggregate::Away, 3),
            end("u", 1, 100, 300, DeviceType::Web),
            status("u", 300, Aggregate::Offline, 4),
        ];
        let a = analytics(&ev, 0, 1000, 1000);
        assert_eq!(a.online_ms, 50 + 50);
        assert_eq!(a.by_device_type["web"], 100);
        assert_eq!((a.sessions, a.open_sessions), (1, 0));
        // A window that is all invisible: no time, no session.
        let hidden = analytics(&ev, 160, 240, 1000);
        assert_eq!((hidden.online_ms, hidden.sessions), (0, 0));
        assert!(hidden.by_device_type.is_empty() && hidden.sessions_by_region.is_empty());
        for (t, online) in [
            (100, true),
            (149, true),
            (150, false),
            (249, false),
            (250, true),
        ] {
            let want: &[&str] = if online { &["u"] } else { &[] };
            assert_eq!(online_at(&ev, t, None, 10).0, want, "at {t}");
            assert_eq!(online_at(&ev, t, Some("g"), 10).0, want, "at {t} in g");
        }
        // Invisible from the start (connect, then invisible in the same millisecond).
        let ev = vec![
            start("v", 7, 500, DeviceType::Ios, &[]),
            status("v", 500, Aggregate::Online, 1),
            status("v", 500, Aggregate::Offline, 2),
        ];
        assert_eq!(online_at(&ev, 600, None, 10).1, 0);
        let reversed: Vec<HistoryEvent> = ev.iter().rev().cloned().collect();
        assert_eq!(online_at(&reversed, 600, None, 10).1, 0, "seq orders them");
        assert_eq!(
            analytics(&ev, 0, 1000, 1000),
            Analytics {
                from: 0,
                to: 1000,
                ..Analytics::default()
            }
        );
    }

    #[test]
    fn a_device_that_comes_and_goes_within_a_millisecond_is_a_session() {
        let ev = vec![
            start("u", 1, 100, DeviceType::Ios, &[]),
            status("u", 100, Aggregate::Online, 1),
            start("u", 2, 200, DeviceType::Web, &[]),
            status("u", 200, Aggregate::Online, 2),
            end("u", 2, 200, 200, DeviceType::Web),
            status("u", 200, Aggregate::Online, 3),
        ];
        let a = analytics(&ev, 0, 1000, 500);
        assert_eq!((a.online_ms, a.sessions, a.open_sessions), (400, 2, 1));
        assert_eq!(a.by_device_type["web"], 0, "listed, with no time");
    }

    #[test]
    fn a_stale_session_does_not_outlive_an_offline_status() {
        // Session 1 never ended (kill -9); after a restart the user came back and left: the
        // status says offline, so the stale session no longer counts.
        let ev = vec![
            start("u", 1, 10, DeviceType::Web, &[]),
            status("u", 10, Aggregate::Online, 1),
            start("u", 1, 50, DeviceType::Web, &[]),
            status("u", 50, Aggregate::Online, 1),
            end("u", 1, 50, 60, DeviceType::Web),
            status("u", 60, Aggregate::Offline, 2),
        ];
        assert_eq!(online_at(&ev, 70, None, 10).1, 0);
        assert_eq!(analytics(&ev, 0, 100, 100).online_ms, 50);
    }

    /// A reference model of presence (SPEC §3) that records what the shard records: session
    /// starts and ends, and a status event whenever the user's aggregate (status, visible
    /// devices) changes.
    #[derive(Debug, Clone)]
    enum Op {
        Wait(u64),
        Connect {
            user: usize,
            device: usize,
            groups: usize,
            region: usize,
        },
        SetStatus {
            session: usize,
            status: Status,
        },
        Disconnect {
            session: usize,
        },
    }

    use crate::presence::Status;

    fn op() -> impl Strategy<Value = Op> {
        let status = prop_oneof![
            Just(Status::Online),
            Just(Status::Away),
            Just(Status::Busy),
            Just(Status::Invisible),
            Just(Status::Invisible),
        ];
        prop_oneof![
            (0u64..4).prop_map(Op::Wait),
            (0usize..3, 0usize..3, 0usize..4, 0usize..2).prop_map(
                |(user, device, groups, region)| {
                    Op::Connect {
                        user,
                        device,
                        groups,
                        region,
                    }
                }
            ),
            (0usize..16, status).prop_map(|(session, status)| Op::SetStatus { session, status }),
            (0usize..16).prop_map(|session| Op::Disconnect { session }),
        ]
    }

    const TYPES: [DeviceType; 3] = [DeviceType::Web, DeviceType::Ios, DeviceType::Android];
    const GROUPS: [&[&str]; 4] = [&[], &["g"], &["h"], &["g", "h"]];
    const REGIONS: [&str; 2] = ["eu", "us"];

    /// One session in the model: who, what, when, and its status over time.
    struct Sess {
        user: String,
        id: u64,
        device: DeviceType,
        groups: &'static [&'static str],
        region: &'static str,
        start: u64,
        end: Option<u64>,
        statuses: Vec<(u64, Status)>,
    }

    impl Sess {
        fn open_at(&self, x: u64) -> bool {
            self.start <= x && self.end.is_none_or(|e| x < e)
        }

        fn visible_at(&self, x: u64) -> bool {
            self.open_at(x)
                && self
                    .statuses
                    .iter()
                    .rev()
                    .find(|(t, _)| *t <= x)
                    .is_some_and(|(_, s)| s.visible().is_some())
        }
    }

    struct Model {
        sessions: Vec<Sess>,
        events: Vec<HistoryEvent>,
        now: u64,
    }

    fn aggregate_of(sessions: &[Sess], user: &str, x: u64) -> (Aggregate, usize) {
        // The state after everything at `x`: sessions open at x, or ending after it.
        let live = sessions.iter().filter(|s| s.user == user && s.open_at(x));
        let mut agg = Aggregate::Offline;
        let mut devices = 0;
        for s in live {
            let st = s.statuses.iter().rev().find(|(t, _)| *t <= x).unwrap().1;
            if let Some(a) = st.visible() {
                agg = agg.max(a);
                devices += 1;
            }
        }
        (agg, devices)
    }

    fn run(ops: &[Op]) -> Model {
        let mut m = Model {
            sessions: Vec::new(),
            events: Vec::new(),
            now: 1,
        };
        let mut seqs = [0u64; 3];
        let mut shown: [(Aggregate, usize); 3] = [(Aggregate::Offline, 0); 3];
        for op in ops {
            let touched = match *op {
                Op::Wait(d) => {
                    m.now += d;
                    continue;
                }
                Op::Connect {
                    user,
                    device,
                    groups,
                    region,
                } => {
                    let id = m.sessions.len() as u64 + 1;
                    let s = Sess {
                        user: format!("u{user}"),
                        id,
                        device: TYPES[device],
                        groups: GROUPS[groups],
                        region: REGIONS[region],
                        start: m.now,
                        end: None,
                        statuses: vec![(m.now, Status::Online)],
                    };
                    let mut e = start(&s.user, id, m.now, s.device, s.groups);
                    e.region = Some(s.region.into());
                    m.events.push(e);
                    m.sessions.push(s);
                    user
                }
                Op::SetStatus { session, status } => {
                    let now = m.now;
                    let Some(s) = m.sessions.get_mut(session).filter(|s| s.end.is_none()) else {
                        continue;
                    };
                    s.statuses.push((now, status));
                    s.user[1..].parse().unwrap()
                }
                Op::Disconnect { session } => {
                    let now = m.now;
                    let Some(s) = m.sessions.get_mut(session).filter(|s| s.end.is_none()) else {
                        continue;
                    };
                    s.end = Some(now);
                    let mut e = end(&s.user, s.id, s.start, now, s.device);
                    e.region = Some(s.region.into());
                    m.events.push(e);
                    s.user[1..].parse().unwrap()
                }
            };
            // The aggregate after this op (same-millisecond ops apply in order; a session that
            // ended at `now` no longer counts).
            let user = format!("u{touched}");
            let after = aggregate_of(&m.sessions, &user, m.now);
            if after != shown[touched] {
                shown[touched] = after;
                seqs[touched] += 1;
                m.events.push(status(&user, m.now, after.0, seqs[touched]));
            }
        }
        m.now += 1;
        m
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// `online_at` and `analytics` against the presence rule, millisecond by millisecond,
        /// with events in the order stores return them and in reverse.
        #[test]
        fn replay_and_analytics_follow_the_presence_rule(
            ops in proptest::collection::vec(op(), 0..60),
            from in 0u64..40, len in 0u64..120, now_back in 0u64..20,
        ) {
            let m = run(&ops);
            let reversed: Vec<HistoryEvent> = m.events.iter().rev().cloned().collect();
            let users = ["u0", "u1", "u2"];
            let visible = |u: &str, x: u64| m.sessions.iter().any(|s| s.user == u && s.visible_at(x));
            for t in 0..=m.now {
                for group in [None, Some("g"), Some("h")] {
                    let want: Vec<String> = users
                        .iter()
                        .filter(|u| visible(u, t))
                        .filter(|u| group.is_none_or(|g| m.sessions.iter().any(|s| {
                            s.user == **u && s.open_at(t) && s.groups.contains(&g)
                        })))
                        .map(|u| u.to_string())
                        .collect();
                    let got = online_at(&m.events, t, group, 10);
                    prop_assert_eq!(&got.0, &want, "online at {} in {:?}", t, group);
                    prop_assert_eq!(got.1, want.len() as u64);
                    prop_assert_eq!(online_at(&reversed, t, group, 10).0, want);
                }
            }
            let (to, now) = (from + len, m.now.saturating_sub(now_back));
            let horizon = to.min(now);
            for u in users {
                let mine: Vec<HistoryEvent> =
                    m.events.iter().filter(|e| &*e.user == u).cloned().collect();
                let a = analytics(&mine, from, to, now);
                let online_ms = (from..horizon).filter(|&x| visible(u, x)).count() as u64;
                prop_assert_eq!(a.online_ms, online_ms, "{} online_ms", u);
                // A session counts when the user was visible in a millisecond it occupied (at
                // least the one it started in) within the window, and it started by `now`.
                let counted: Vec<&Sess> = m
                    .sessions
                    .iter()
                    .filter(|s| s.user == u && s.start <= horizon)
                    .filter(|s| {
                        let end = s.end.unwrap_or(horizon).max(s.start + 1).min(to);
                        (s.start.max(from)..end).any(|x| visible(u, x))
                    })
                    .collect();
                let mut types = BTreeMap::new();
                for s in &counted {
                    let t = s.device;
                    let ms = (from..horizon)
                        .filter(|&x| visible(u, x) && m.sessions.iter().any(|s| {
                            s.user == u && s.device == t && s.open_at(x)
                        }))
                        .count() as u64;
                    types.insert(t.as_str(), ms);
                }
                prop_assert_eq!(&a.by_device_type, &types, "{} by device type", u);
                prop_assert_eq!(a.sessions, counted.len() as u64, "{} sessions", u);
                prop_assert_eq!(
                    a.open_sessions,
                    counted.iter().filter(|s| s.end.is_none()).count() as u64
                );
                let mut regions = BTreeMap::new();
                for s in &counted {
                    *regions.entry(s.region.to_owned()).or_insert(0u64) += 1;
                }
                prop_assert_eq!(&a.sessions_by_region, &regions);
                let rev: Vec<HistoryEvent> = mine.iter().rev().cloned().collect();
                prop_assert_eq!(analytics(&rev, from, to, now), a);
            }
        }

        /// The intersection against a per-millisecond model.
        #[test]
        fn intersection_matches_a_pointwise_model(
            a in proptest::collection::vec((0u64..200, 0u64..60), 0..8),
            b in proptest::collection::vec((0u64..200, 0u64..60), 0..8),
        ) {
            let ranges = |v: Vec<(u64, u64)>| v.into_iter().map(|(s, l)| (s, s + l)).collect::<Vec<_>>();
            let (a, b) = (ranges(a), ranges(b));
            let inside = |r: &[(u64, u64)], t: u64| r.iter().any(|(s, e)| *s <= t && t < *e);
            let model = (0..300).filter(|&t| inside(&a, t) && inside(&b, t)).count() as u64;
            prop_assert_eq!(intersection_len(&union(a, 0, 300), &union(b, 0, 300)), model);
        }
    }

    proptest! {
        /// The union against a per-millisecond model.
        #[test]
        fn union_matches_a_pointwise_model(
            ranges in proptest::collection::vec((0u64..200, 0u64..60), 0..12),
            from in 0u64..150, len in 0u64..150,
        ) {
            let ranges: Vec<(u64, u64)> = ranges.into_iter().map(|(s, l)| (s, s + l)).collect();
            let to = from + len;
            let model = (from..to).filter(|t| ranges.iter().any(|(s, e)| s <= t && t < e)).count() as u64;
            prop_assert_eq!(union_len(ranges, from, to), model);
        }
    }
}
