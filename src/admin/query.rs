//! The questions shards answer for the admin API, how a shard answers them, and how the
//! answers of all shards merge into one.
//!
//! A question travels as `MeshMsg::Admin` to the shards that know (the owner of a user or
//! group, the shard of a session, or all of them) and is answered synchronously inside that
//! shard's mesh handler, so it sees the shard's state between two messages, never half-way
//! through one.

use std::collections::BinaryHeap;
use std::sync::Arc;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::changes::ChangeBatch;
use super::series::Sample;
use crate::presence::watchers::ShardIx;
use crate::presence::{
    Aggregate, DeviceType, GroupId, PresenceState, Registry, SessionId, UserId, UserView,
};
use crate::shard::Shard;

/// Close code of a kicked session.
pub const KICK_CODE: u16 = 4003;
pub const KICK_REASON: &str = "kicked by admin";

#[derive(Debug)]
pub enum AdminReq {
    /// Every shard: registry sizes and latency histograms (shard 0 adds its latest sample).
    Stats,
    /// Every shard: the recent latency window (the sampler's once-a-second question).
    Latency,
    /// Shard 0: the whole time series.
    Series,
    /// The user's owner.
    User(UserId),
    /// Every shard: one page of its online users.
    Online(OnlineQuery),
    /// The group's owner.
    Group(GroupQuery),
    /// The user's owner: close every session (and observer) with 4003.
    KickUser { user: UserId, by: Arc<str> },
    /// The session's shard: close it with 4003.
    KickSession { session: SessionId, by: Arc<str> },
    /// Every shard: its changes after `since[shard]`.
    Changes { since: Arc<[u64]> },
    /// Every shard: its online users, and member counts of its largest `max_groups` groups.
    Counts { max_groups: usize },
}

#[derive(Debug)]
pub enum AdminResp {
    Stats(Box<ShardStats>),
    Latency(Box<Histogram<u64>>),
    Series(Vec<Sample>),
    User(Option<UserDetail>),
    Online(OnlinePage),
    Group(Option<GroupPage>),
    Kicked(Kicked),
    Changes(ChangeBatch),
    Counts {
        online: u64,
        groups: Vec<(GroupId, u64)>,
    },
}

/// One shard's part of `/api/stats` beyond its counters (which any thread can read).
#[derive(Debug)]
pub struct ShardStats {
    pub sessions: usize,
    pub latency_total: Histogram<u64>,
    pub latency_recent: Histogram<u64>,
    /// Shard 0 only: the latest sample and each shard's delivery rate.
    pub sample: Option<(Sample, Vec<f64>)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SessionDetail {
    pub id: String,
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
    pub observers: usize,
    pub sessions: Vec<SessionDetail>,
}

/// A session id as clients see it (`welcome.session`): lowercase hex.
pub fn session_hex(id: SessionId) -> String {
    format!("{id:x}")
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
}

impl OnlineFilter {
    pub fn matches(&self, v: &UserView<'_>) -> bool {
        if self.status.is_some_and(|s| s != v.status) {
            return false;
        }
        if let Some(g) = &self.group {
            if v.groups
                .binary_search_by(|x| (**x).cmp(g.as_str()))
                .is_err()
            {
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
            if !s
                .iter()
                .any(|s| s.info.region.as_deref() == Some(r.as_str()))
            {
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
}

fn online_row(v: &UserView<'_>, shard: ShardIx) -> OnlineRow {
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
    OnlineRow {
        user: v.user.clone(),
        status: v.status.as_str(),
        text: v.text.cloned(),
        devices: v.devices,
        ts: v.ts,
        device_types,
        regions,
        groups: v.groups.to_vec(),
        shard,
    }
}

/// A shard's page of `/api/online`: one scan of its users, keeping the `limit` smallest ids
/// after the cursor in a bounded heap (O(n log limit), no full sort).
pub fn online_page(registry: &Registry, q: &OnlineQuery, shard: ShardIx, now: u64) -> OnlinePage {
    let mut total = 0u64;
    // Max-heap of the smallest `limit + 1` ids seen (one extra tells whether there are more).
    let mut best: BinaryHeap<&UserId> = BinaryHeap::with_capacity(q.limit + 2);
    for v in registry.online(now) {
        if !q.filter.matches(&v) {
            continue;
        }
        total += 1;
        if q.after.as_ref().is_some_and(|a| v.user <= a) {
            continue;
        }
        if best.len() <= q.limit {
            best.push(v.user);
        } else if best.peek().is_some_and(|top| v.user < *top) {
            best.pop();
            best.push(v.user);
        }
    }
    let mut ids = best.into_sorted_vec();
    let more = ids.len() > q.limit;
    ids.truncate(q.limit);
    let rows = ids
        .iter()
        .filter_map(|id| registry.view(id, now))
        .map(|v| online_row(&v, shard))
        .collect();
    OnlinePage { rows, total, more }
}

/// All shards' pages as one: the first `limit` ids overall, the total, and the cursor of the
/// next page (`None` on the last one).
pub fn merge_online(pages: Vec<OnlinePage>, limit: usize) -> (Vec<OnlineRow>, u64, Option<UserId>) {
    let total = pages.iter().map(|p| p.total).sum();
    let mut more = pages.iter().any(|p| p.more);
    let mut rows: Vec<OnlineRow> = pages.into_iter().flat_map(|p| p.rows).collect();
    rows.sort_unstable_by(|a, b| a.user.cmp(&b.user));
    if rows.len() > limit {
        rows.truncate(limit);
        more = true;
    }
    let next = if more {
        rows.last().map(|r| r.user.clone())
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

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct StatusCounts {
    pub online: u64,
    pub away: u64,
    pub busy: u64,
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
pub fn group_page(groups: &crate::presence::Groups, q: &GroupQuery) -> Option<GroupPage> {
    let (members, _watched) = groups.members(&q.group)?;
    let mut counts = StatusCounts::default();
    let mut picked: Vec<&PresenceState> = Vec::new();
    for m in members {
        match m.status {
            Aggregate::Online => counts.online += 1,
            Aggregate::Away => counts.away += 1,
            Aggregate::Busy => counts.busy += 1,
            Aggregate::Offline => {}
        }
        if q.after.as_ref().is_none_or(|a| m.user > *a) {
            picked.push(m);
        }
    }
    picked.sort_unstable_by(|a, b| a.user.cmp(&b.user));
    let more = picked.len() > q.limit;
    picked.truncate(q.limit);
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
        .then(|| members.last().map(|m| super::api::encode_cursor(&m.user)))
        .flatten();
    Some(GroupPage {
        group: q.group.clone(),
        total: counts.online + counts.away + counts.busy,
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

fn user_detail(shard: &Shard, user: &str, now: u64) -> Option<UserDetail> {
    let registry = shard.registry.borrow();
    let v = registry.view(user, now)?;
    let sessions = v
        .sessions
        .iter()
        .map(|s| SessionDetail {
            id: session_hex(s.id),
            device: s.info.device.clone(),
            device_type: s.info.device_type.as_str(),
            region: s.info.region.clone(),
            ip: s.info.ip.to_string(),
            connected_at: s.info.connected_at_ms,
            status: s.status,
            text: s.text.clone(),
            groups: s.info.groups.clone(),
            roles: s.info.roles.clone(),
            shard: shard.ix,
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
        shard: shard.ix,
        observers: shard.observers_of(user).len(),
        sessions,
    })
}

fn kick_user(shard: &Shard, user: &UserId, by: &str) -> Kicked {
    let mut ids = shard.registry.borrow().session_ids(user);
    ids.extend(shard.observers_of(user));
    let conns = shard.conns.borrow();
    let mut kicked = 0;
    for id in ids {
        if let Some(c) = conns.get(&id) {
            c.request_close(KICK_CODE, KICK_REASON);
            kicked += 1;
            crate::metrics::ShardMetrics::inc(&shard.metrics.kicks);
            tracing::info!(target: "presenced::audit", admin = %by, user = %user,
                session = %session_hex(id), "kick");
        }
    }
    Kicked {
        user: (kicked > 0).then(|| user.clone()),
        kicked,
    }
}

fn kick_session(shard: &Shard, session: SessionId, by: &str) -> Kicked {
    let Some(c) = shard.conns.borrow().get(&session).cloned() else {
        return Kicked::default();
    };
    c.request_close(KICK_CODE, KICK_REASON);
    crate::metrics::ShardMetrics::inc(&shard.metrics.kicks);
    tracing::info!(target: "presenced::audit", admin = %by, user = %c.user,
        session = %session_hex(session), "kick");
    Kicked {
        user: Some(c.user.clone()),
        kicked: 1,
    }
}

/// Answers `req` from this shard's state. Synchronous: called from the mesh handler.
pub fn answer(shard: &Shard, req: &AdminReq, now: u64) -> AdminResp {
    match req {
        AdminReq::Stats => {
            let latency = shard.latency.borrow();
            let registry = shard.registry.borrow();
            let sample = (shard.ix == 0).then(|| {
                let series = shard.series.borrow();
                (series.latest().unwrap_or_default(), series.shard_rates())
            });
            AdminResp::Stats(Box::new(ShardStats {
                sessions: registry.session_count(),
                latency_total: latency.total.clone(),
                latency_recent: latency.recent(),
                sample,
            }))
        }
        AdminReq::Latency => AdminResp::Latency(Box::new(shard.latency.borrow().recent())),
        AdminReq::Series => AdminResp::Series(shard.series.borrow().all()),
        AdminReq::User(user) => AdminResp::User(user_detail(shard, user, now)),
        AdminReq::Online(q) => {
            AdminResp::Online(online_page(&shard.registry.borrow(), q, shard.ix, now))
        }
        AdminReq::Group(q) => AdminResp::Group(group_page(&shard.groups.borrow(), q)),
        AdminReq::KickUser { user, by } => AdminResp::Kicked(kick_user(shard, user, by)),
        AdminReq::KickSession { session, by } => {
            AdminResp::Kicked(kick_session(shard, *session, by))
        }
        AdminReq::Counts { max_groups } => {
            let mut groups = shard.groups.borrow().counts();
            groups.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            groups.truncate(*max_groups);
            AdminResp::Counts {
                online: shard.registry.borrow().online_users() as u64,
                groups,
            }
        }
        AdminReq::Changes { since } => {
            let mark = since
                .get(usize::from(shard.ix))
                .copied()
                .unwrap_or(u64::MAX);
            let log = shard.changes.borrow();
            AdminResp::Changes(if mark == u64::MAX {
                ChangeBatch {
                    last: log.mark(),
                    ..ChangeBatch::default()
                }
            } else {
                log.since(mark)
            })
        }
    }
}

#[cfg(test)]
#[path = "query_tests.rs"]
mod tests;
