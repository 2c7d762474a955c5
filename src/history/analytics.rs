//! The answers history gives, computed from recorded events and samples: pure functions, tested
//! here against brute-force models, shared by every backend.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::event::{EventKind, HistoryEvent, Sample};
use crate::presence::{DeviceType, SessionId};

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

/// Total length of the union of `[start, end)` ranges, clipped to `[from, to)`.
pub fn union_len(mut ranges: Vec<(u64, u64)>, from: u64, to: u64) -> u64 {
    ranges.retain_mut(|(s, e)| {
        *s = (*s).max(from);
        *e = (*e).min(to);
        s < e
    });
    ranges.sort_unstable();
    let mut total = 0;
    let mut cur: Option<(u64, u64)> = None;
    for (s, e) in ranges {
        match &mut cur {
            Some((_, ce)) if s <= *ce => *ce = (*ce).max(e),
            _ => {
                if let Some((cs, ce)) = cur {
                    total += ce - cs;
                }
                cur = Some((s, e));
            }
        }
    }
    if let Some((cs, ce)) = cur {
        total += ce - cs;
    }
    total
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Analytics {
    pub from: u64,
    pub to: u64,
    /// Milliseconds with at least one session open (overlapping devices count once).
    pub online_ms: u64,
    /// Sessions overlapping the window.
    pub sessions: u64,
    /// Sessions still open at `to` (counted up to `to`).
    pub open_sessions: u64,
    /// Milliseconds online per device type (the union of that type's sessions).
    pub by_device_type: BTreeMap<&'static str, u64>,
    /// Sessions per region (`unknown` when the token had none).
    pub sessions_by_region: BTreeMap<String, u64>,
}

/// Analytics of one user over `[from, to)`; sessions still open count up to `min(to, now)`.
pub fn analytics(events: &[HistoryEvent], from: u64, to: u64, now: u64) -> Analytics {
    let horizon = to.min(now);
    let mut out = Analytics {
        from,
        to,
        ..Analytics::default()
    };
    let mut all = Vec::new();
    let mut per_type: BTreeMap<&'static str, Vec<(u64, u64)>> = BTreeMap::new();
    for iv in intervals(events) {
        let end = iv.end.unwrap_or(horizon);
        if iv.start >= to || end <= from || iv.start > horizon {
            continue;
        }
        out.sessions += 1;
        if iv.end.is_none_or(|e| e > to) {
            out.open_sessions += u64::from(iv.end.is_none());
        }
        let region = iv.region.as_deref().unwrap_or("unknown").to_owned();
        *out.sessions_by_region.entry(region).or_default() += 1;
        all.push((iv.start, end));
        per_type
            .entry(iv.device_type.as_str())
            .or_default()
            .push((iv.start, end));
    }
    out.online_ms = union_len(all, from, horizon);
    out.by_device_type = per_type
        .into_iter()
        .map(|(t, r)| (t, union_len(r, from, horizon)))
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

/// Users with a session open at `t`, from session events in `[t - lookback, t]` (any order):
/// a session started in that window and not ended by `t`. With `group`, only sessions that
/// carried it. Sorted, at most `limit`; also returns how many there were in all.
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
            EventKind::Status => {}
        }
    }
    let users: BTreeSet<&str> = open
        .into_iter()
        .filter(|(k, in_group)| *in_group && !ended.contains(k))
        .map(|((u, _, _), _)| u)
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
    use std::sync::Arc;

    fn start(user: &str, s: u64, ts: u64, t: DeviceType, groups: &[&str]) -> HistoryEvent {
        let mut e = HistoryEvent::new(ts, user.into(), EventKind::SessionStart);
        e.session = s;
        e.started_at = ts;
        e.device_type = Some(t);
        e.groups = groups.iter().map(|g| Arc::from(*g)).collect();
        e
    }

    fn end(user: &str, s: u64, started: u64, ts: u64, t: DeviceType) -> HistoryEvent {
        let mut e = HistoryEvent::new(ts, user.into(), EventKind::SessionEnd);
        e.session = s;
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
