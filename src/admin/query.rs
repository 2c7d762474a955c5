//! What a shard answers for the admin API, and how the answers of all shards merge into one.
//!
//! Every answer here is computed on the shard that knows (the owner of a user or group, the
//! shard of a session, or each shard in turn), inside a job sent by `api` through the shard's
//! `invoke_on`/`map_reduce`. Point questions are synchronous: they see the shard's state
//! between two mesh messages. Scans ([`online_page_chunked`]) walk in chunks of
//! `admin.scan_chunk` users and let the shard serve its connections between chunks, so a scan
//! of a million users never stalls presence.

use std::collections::BinaryHeap;
use std::rc::Rc;
use std::sync::Arc;

use base64::Engine;
use hdrhistogram::Histogram;
use serde::Serialize;

use super::changes::ChangeBatch;
use super::series::Sample;
use super::AdminLocal;
use crate::metrics::ShardMetrics;
use crate::presence::watchers::ShardIx;
use crate::presence::{
    Aggregate, DeviceType, GroupId, Registry, SessionId, StatusCounts, UserId, UserView,
};
use crate::shard::session::{KICK_CODE, KICK_REASON};
use crate::shard::{CloseRequest, Shard};

/// One shard's part of `/api/stats` beyond its counters (which any thread can read).
#[derive(Debug)]
pub struct ShardStats {
    pub sessions: usize,
    /// Ended sessions still counted for their users (reconnect grace, upgrade hand-over).
    pub held: usize,
    pub latency_total: Histogram<u64>,
    pub latency_recent: Histogram<u64>,
    /// Shard 0 only: the latest sample and each shard's delivery rate.
    pub sample: Option<(Sample, Vec<f64>)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SessionDetail {
    pub id: SessionId,
    pub device: Option<Arc<str>>,
    pub device_type: &'static str,
    pub region: Option<Arc<str>>,
    pub ip: String,
    pub connected_at: u64,
    pub status: crate::presence::Status,
    pub text: Option<Arc<str>>,
    pub groups: Arc<[GroupId]>,
    pub roles: Arc<[Arc<str>]>,
    pub shard: ShardIx,
}

#[derive(Debug, Clone, Serialize)]
pub struct UserDetail {
    pub user: UserId,
    pub status: &'static str,
    pub text: Option<Arc<str>>,
    pub devices: u32,
    pub seq: u64,
    pub ts: u64,
    pub last_seen: Option<u64>,
    pub shard: ShardIx,
    /// Subscriptions to this user, over all shards.
    pub watchers: u64,
    pub observers: usize,
    pub sessions: Vec<SessionDetail>,
}

/// The cursor of `/api/online`: the last user id of a page, base64url.
pub fn encode_cursor(user: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(user.as_bytes())
}

pub fn decode_cursor(c: &str) -> Option<UserId> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(c)
        .ok()?;
    String::from_utf8(bytes).ok().map(Into::into)
}

/// Filters of `/api/online`; every set one must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OnlineFilter {
    pub group: Option<String>,
    pub role: Option<String>,
    pub region: Option<String>,
    pub device_type: Option<DeviceType>,
    pub status: Option<Aggregate>,
    /// Substring of the user id, ASCII case-insensitive.
    pub q: Option<String>,
    /// Only users with a visible session on this node, described by those sessions alone (a
    /// cluster's scatter-gather: each node answers for its own sessions).
    pub local: bool,
}

impl OnlineFilter {
    pub fn matches(&self, v: &UserView<'_>) -> bool {
        let status = if self.local {
            match local_aggregate(v.sessions) {
                Some((status, _, _)) => status,
                None => return false,
            }
        } else {
            v.status
        };
        if self.status.is_some_and(|s| s != status) {
            return false;
        }
        if let Some(g) = &self.group {
            let member = if self.local {
                v.sessions.iter().any(|s| {
                    s.status.visible().is_some() && s.info.groups.iter().any(|x| **x == **g)
                })
            } else {
                v.groups.binary_search_by(|x| (**x).cmp(g.as_str())).is_ok()
            };
            if !member {
                return false;
            }
        }
        if let Some(q) = &self.q {
            if !contains_ignore_ascii_case(v.user, q) {
                return false;
            }
        }
        let s = v.sessions;
        if let Some(r) = &self.role {
            if !s.iter().any(|s| s.info.roles.iter().any(|x| **x == **r)) {
                return false;
            }
        }
        if let Some(r) = &self.region {
            if !s.iter().any(|s| {
                s.info
                    .region
                    .as_deref()
                    .is_some_and(|have| region_matches(have, r))
            }) {
                return false;
            }
        }
        if let Some(t) = self.device_type {
            if !s.iter().any(|s| s.info.device_type == t) {
                return false;
            }
        }
        true
    }
}

fn contains_ignore_ascii_case(hay: &str, needle: &str) -> bool {
    let (h, n) = (hay.as_bytes(), needle.as_bytes());
    n.is_empty() || h.windows(n.len()).any(|w| w.eq_ignore_ascii_case(n))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnlineQuery {
    pub filter: OnlineFilter,
    /// Start after this user id (the cursor).
    pub after: Option<UserId>,
    pub limit: usize,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct OnlineRow {
    pub user: UserId,
    pub status: &'static str,
    pub text: Option<Arc<str>>,
    pub devices: u32,
    pub ts: u64,
    pub device_types: Vec<&'static str>,
    pub regions: Vec<Arc<str>>,
    pub groups: Vec<GroupId>,
    pub shard: ShardIx,
}

/// One shard's page: its first `limit` matching users after the cursor, sorted; how many match
/// in all; whether it had more after the page.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OnlinePage {
    pub rows: Vec<OnlineRow>,
    pub total: u64,
    pub more: bool,
    /// The last id this page covered (its rows may have left since): where the next page
    /// starts when no row is left to name it.
    pub last_kept: Option<UserId>,
}

/// The aggregate of these sessions alone (status, text, visible devices); `None` when none is
/// visible.
fn local_aggregate(
    sessions: &[crate::presence::Session],
) -> Option<(Aggregate, Option<Arc<str>>, u32)> {
    let mut best: Option<(Aggregate, Option<Arc<str>>, u32)> = None;
    for s in sessions {
        let Some(agg) = s.status.visible() else {
            continue;
        };
        let b = best.get_or_insert((agg, s.text.clone(), 0));
        b.2 += 1;
        if agg > b.0 {
            (b.0, b.1) = (agg, s.text.clone());
        }
    }
    best
}

fn online_row(v: &UserView<'_>, shard: ShardIx, local: bool) -> OnlineRow {
    let mut device_types: Vec<&'static str> = v
        .sessions
        .iter()
        .map(|s| s.info.device_type.as_str())
        .collect();
    device_types.sort_unstable();
    device_types.dedup();
    let mut regions: Vec<Arc<str>> = v
        .sessions
        .iter()
        .filter_map(|s| s.info.region.clone())
        .collect();
    regions.sort_unstable();
    regions.dedup();
    let (status, text, devices) = match local.then(|| local_aggregate(v.sessions)).flatten() {
        Some(mine) => mine,
        None => (v.status, v.text.cloned(), v.devices),
    };
    OnlineRow {
        user: v.user.clone(),
        status: status.as_str(),
        text,
        devices,
        ts: v.ts,
        device_types,
        regions,
        groups: v.groups.to_vec(),
        shard,
    }
}

/// A resumable scan of one shard's online users for `/api/online`: it keeps the `limit`
/// smallest matching ids after the query's cursor in a bounded heap (O(n log limit), no full
/// sort) and the count of all matches, and resumes after the last id it visited, so it may
/// stop between chunks while users come and go: a user online throughout is visited once.
pub struct OnlineScan {
    q: OnlineQuery,
    total: u64,
    /// Max-heap of the smallest `limit + 1` ids seen (one extra tells whether there are more).
    best: BinaryHeap<UserId>,
    /// The last id visited.
    resume: Option<UserId>,
}

impl OnlineScan {
    pub fn new(q: OnlineQuery) -> OnlineScan {
        OnlineScan {
            best: BinaryHeap::with_capacity(q.limit + 2),
            q,
            total: 0,
            resume: None,
        }
    }

    /// Visits up to `chunk` more users; true when the scan is complete.
    pub fn step(&mut self, registry: &Registry, chunk: usize, now: u64) -> bool {
        let mut visited = 0;
        let mut last = None;
        for v in registry.online_after(self.resume.as_deref(), now) {
            visited += 1;
            if self.q.filter.matches(&v) {
                self.total += 1;
                if self.q.after.as_ref().is_none_or(|a| v.user > a) {
                    if self.best.len() <= self.q.limit {
                        self.best.push(v.user.clone());
                    } else if self.best.peek().is_some_and(|top| v.user < top) {
                        self.best.pop();
                        self.best.push(v.user.clone());
                    }
                }
            }
            if visited == chunk {
                last = Some(v.user.clone());
                break;
            }
        }
        match last {
            Some(id) => {
                self.resume = Some(id);
                false
            }
            None => true,
        }
    }

    /// The page: rows of the ids kept (those still online now), the total, whether more follow.
    pub fn finish(self, registry: &Registry, shard: ShardIx, now: u64) -> OnlinePage {
        let mut ids = self.best.into_sorted_vec();
        let more = ids.len() > self.q.limit;
        ids.truncate(self.q.limit);
        let last_kept = ids.last().cloned();
        // Users kept may have changed while the scan yielded: list them only if they still
        // match (the cursor still moves past them: `last_kept`).
        let rows = ids
            .iter()
            .filter_map(|id| registry.view(id, now))
            .filter(|v| v.status != Aggregate::Offline && self.q.filter.matches(v))
            .map(|v| online_row(&v, shard, self.q.filter.local))
            .collect();
        OnlinePage {
            rows,
            total: self.total,
            more,
            last_kept,
        }
    }
}

/// A shard's page of `/api/online` in one go (the tests' model of the chunked scan).
#[cfg(test)]
pub fn online_page(registry: &Registry, q: &OnlineQuery, shard: ShardIx, now: u64) -> OnlinePage {
    let mut scan = OnlineScan::new(q.clone());
    while !scan.step(registry, usize::MAX, now) {}
    scan.finish(registry, shard, now)
}

/// A shard's page of `/api/online`, `admin.scan_chunk` users at a time, letting the shard's
/// other tasks and I/O run between chunks.
/// A scan still running when the asker's deadline (`admin.query_timeout_ms`) has passed stops:
/// nobody waits for its answer any more.
pub async fn online_page_chunked(shard: Rc<Shard>, q: OnlineQuery) -> OnlinePage {
    let chunk = shard.cfg().admin.scan_chunk;
    let until = std::time::Instant::now()
        + std::time::Duration::from_millis(shard.cfg().admin.query_timeout_ms);
    let mut scan = OnlineScan::new(q);
    loop {
        let now = crate::shard::now_ms();
        if scan.step(&shard.registry(), chunk, now) {
            break;
        }
        if std::time::Instant::now() > until {
            return OnlinePage::default();
        }
        ShardMetrics::inc(&shard.metrics().admin_scan_yields);
        crate::shard::invoke::yield_to_io().await;
    }
    let now = crate::shard::now_ms();
    let registry = shard.registry();
    scan.finish(&registry, shard.ix(), now)
}

/// All shards' pages as one: the first `limit` ids overall, the total, and the cursor of the
/// next page (`None` on the last one).
pub fn merge_online(pages: Vec<OnlinePage>, limit: usize) -> (Vec<OnlineRow>, u64, Option<UserId>) {
    let total = pages.iter().map(|p| p.total).sum();
    let mut more = pages.iter().any(|p| p.more);
    // Where a page with no row left (all went offline meanwhile) still moves the cursor to: the
    // smallest last id a shard with more covered, so no shard's next users are skipped.
    let fallback = pages
        .iter()
        .filter(|p| p.more)
        .filter_map(|p| p.last_kept.clone())
        .min();
    let mut rows: Vec<OnlineRow> = pages.into_iter().flat_map(|p| p.rows).collect();
    rows.sort_unstable_by(|a, b| a.user.cmp(&b.user));
    if rows.len() > limit {
        rows.truncate(limit);
        more = true;
    }
    let next = if more {
        rows.last().map(|r| r.user.clone()).or(fallback)
    } else {
        None
    };
    (rows, total, next)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupQuery {
    pub group: GroupId,
    pub after: Option<UserId>,
    pub limit: usize,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MemberRow {
    pub user: UserId,
    pub status: &'static str,
    pub text: Option<Arc<str>>,
    pub devices: u32,
    pub ts: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct GroupPage {
    pub group: GroupId,
    pub members: Vec<MemberRow>,
    pub counts: StatusCounts,
    pub total: u64,
    pub next_cursor: Option<String>,
}

/// The group owner's answer: visible members after the cursor, sorted, and counts by status.
/// A range read of the group's ordered member map: O(log members + limit), no scan.
pub fn group_page(groups: &crate::presence::Groups, q: &GroupQuery) -> Option<GroupPage> {
    let (picked, more, counts) = groups.page(&q.group, q.after.as_deref(), q.limit)?;
    let members: Vec<MemberRow> = picked
        .into_iter()
        .map(|m| MemberRow {
            user: m.user.clone(),
            status: m.status.as_str(),
            text: m.text.clone(),
            devices: m.devices,
            ts: m.ts,
        })
        .collect();
    let next_cursor = more
        .then(|| members.last().map(|m| encode_cursor(&m.user)))
        .flatten();
    Some(GroupPage {
        group: q.group.clone(),
        total: counts.total(),
        counts,
        members,
        next_cursor,
    })
}

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Kicked {
    pub user: Option<UserId>,
    pub kicked: usize,
}

/// `/api/users/{id}`, on the user's owner.
pub fn user_detail(shard: &Shard, user: &str, now: u64) -> Option<UserDetail> {
    let registry = shard.registry();
    let v = registry.view(user, now)?;
    let sessions = v
        .sessions
        .iter()
        .map(|s| SessionDetail {
            id: s.id,
            device: s.info.device.clone(),
            device_type: s.info.device_type.as_str(),
            region: s.info.region.clone(),
            ip: s.info.ip.to_string(),
            connected_at: s.info.connected_at_ms,
            status: s.status,
            text: s.text.clone(),
            groups: s.info.groups.clone(),
            roles: s.info.roles.clone(),
            shard: shard.ix(),
        })
        .collect();
    Some(UserDetail {
        user: v.user.clone(),
        status: v.status.as_str(),
        text: v.text.cloned(),
        devices: v.devices,
        seq: v.seq,
        ts: v.ts,
        last_seen: v.last_seen,
        shard: shard.ix(),
        watchers: v.watchers,
        observers: shard.observers_of(user).len(),
        sessions,
    })
}

/// Closes every session (and impersonation) of `user` with 4003, on the user's owner.
pub fn kick_user(shard: &Shard, user: &UserId, by: &str) -> Kicked {
    let mut kicked = 0;
    for s in shard.sessions_of(user) {
        s.request_close(CloseRequest::now(KICK_CODE, KICK_REASON));
        kicked += 1;
        ShardMetrics::inc(&shard.metrics().kicks);
        tracing::info!(target: "presenced::audit", admin = %by, user = %user,
            session = %s.id(), "kick");
    }
    // Held sessions (reconnect grace, an upgrade) are kicked too: the user goes offline now,
    // and a reconnect cannot re-attach to them.
    let held = shard.drop_holds(user);
    if held > 0 {
        tracing::info!(target: "presenced::audit", admin = %by, user = %user, held,
            "kick: held sessions let go");
    }
    Kicked {
        user: (kicked > 0 || held > 0).then(|| user.clone()),
        kicked,
    }
}

/// Closes one session with 4003, on the session's shard.
pub fn kick_session(shard: &Shard, session: SessionId, by: &str) -> Kicked {
    let Some(s) = shard.session(session) else {
        return Kicked::default();
    };
    s.request_close(CloseRequest::now(KICK_CODE, KICK_REASON));
    ShardMetrics::inc(&shard.metrics().kicks);
    tracing::info!(target: "presenced::audit", admin = %by, user = %s.user(),
        session = %session, "kick");
    Kicked {
        user: Some(s.user().clone()),
        kicked: 1,
    }
}

/// One shard's part of `/api/stats`.
pub fn shard_stats(shard: &Shard) -> ShardStats {
    let latency = shard.latency();
    let sample = (shard.ix() == 0)
        .then(|| shard.local::<AdminLocal>())
        .flatten()
        .map(|local| {
            let series = local.series.borrow();
            (series.latest().unwrap_or_default(), series.shard_rates())
        });
    ShardStats {
        sessions: shard.registry().session_count(),
        held: shard.registry().held_count(),
        latency_total: latency.total.clone(),
        latency_recent: latency.recent(),
        sample,
    }
}

/// The dashboard feed's changes after `mark` on this shard (`u64::MAX`: start now).
pub fn changes_since(shard: &Shard, mark: u64) -> ChangeBatch {
    let Some(local) = shard.local::<AdminLocal>() else {
        return ChangeBatch::default();
    };
    let log = local.changes.borrow();
    if mark == u64::MAX {
        ChangeBatch {
            last: log.mark(),
            ..ChangeBatch::default()
        }
    } else {
        log.since(mark)
    }
}

/// A region filter matches the region itself and the regions below it: `DE` matches `DE` and
/// `DE/Berlin` (what `geo.database` gives with a city database), not `DEN`.
pub fn region_matches(have: &str, want: &str) -> bool {
    have == want
        || have
            .strip_prefix(want)
            .is_some_and(|rest| rest.starts_with('/'))
}

#[cfg(test)]
#[path = "query_tests.rs"]
mod tests;
