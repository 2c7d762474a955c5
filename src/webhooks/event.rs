//! Webhook events from a shard's taps (pure): which of `user_online`, `user_offline`,
//! `status_change`, `session_start` and `session_end` a tap is, with the fields a receiver
//! gets, and the user's groups and roles for the filters.
//!
//! A change is told apart (online, offline, a status change, or only a device count) from what
//! the registry says the user was before ([`Before`]: the node's merged view, so in a cluster a
//! second node's session is no second `user_online`). A shard's [`Tracker`] keeps its users'
//! sessions' groups and roles (a status change carries none, but filters need them; they are
//! kept until the user's offline change, which comes after the last session's end) and their
//! last `seq`.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use serde::Serialize;

use crate::presence::{Aggregate, GroupId, PresenceState, SessionId, SessionInfo, UserId};
use crate::shard::tap::Before;

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The user's aggregate went from offline to visible.
    UserOnline,
    /// The user's aggregate went to offline.
    UserOffline,
    /// Visible before and after, with another status or text.
    StatusChange,
    /// A device session opened.
    SessionStart,
    /// A device session ended.
    SessionEnd,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::UserOnline,
        Kind::UserOffline,
        Kind::StatusChange,
        Kind::SessionStart,
        Kind::SessionEnd,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::UserOnline => "user_online",
            Kind::UserOffline => "user_offline",
            Kind::StatusChange => "status_change",
            Kind::SessionStart => "session_start",
            Kind::SessionEnd => "session_end",
        }
    }
}

/// One event as a receiver gets it (an element of the body's `events`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Event {
    /// Unique per event (in a cluster the node, then the process's seed, the shard, a
    /// counter): receivers deduplicate retried deliveries by it.
    pub id: String,
    pub event: Kind,
    /// The node that sent it (in a cluster): where the session or the change happened.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<Arc<str>>,
    pub user: UserId,
    /// The user's `seq` at the event (for a session event, the last one the shard knew).
    pub seq: u64,
    /// When it happened, ms since the epoch.
    pub ts: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<Arc<str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub devices: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<Arc<str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<Arc<str>>,
    /// The user's groups and roles (its sessions', or their last ones when it went offline).
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub groups: Arc<[GroupId]>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub roles: Arc<[Arc<str>]>,
}

/// One session's groups and roles.
type Membership = (SessionId, Arc<[GroupId]>, Arc<[Arc<str>]>);

/// What a shard keeps of one of its users.
#[derive(Debug, Default)]
struct Followed {
    seq: u64,
    sessions: Vec<Membership>,
    /// The union of the sessions' groups and roles, sorted (the last ones once none is left).
    groups: Arc<[GroupId]>,
    roles: Arc<[Arc<str>]>,
}

/// The sorted union of some lists.
fn union<'a, T: Clone + Ord + 'a>(lists: impl Iterator<Item = &'a [T]>) -> Arc<[T]> {
    let mut all: Vec<T> = lists.flat_map(|l| l.iter().cloned()).collect();
    all.sort_unstable();
    all.dedup();
    Arc::from(all)
}

impl Followed {
    fn remember_memberships(&mut self) {
        if self.sessions.is_empty() {
            return; // keep the last ones for the offline change
        }
        self.groups = union(self.sessions.iter().map(|s| &*s.1));
        self.roles = union(self.sessions.iter().map(|s| &*s.2));
    }
}

/// One shard's view of its users, turning taps into events.
#[derive(Debug)]
pub struct Tracker {
    /// `[{node}-]{seed:x}-{shard}-`: the prefix of this shard's event ids.
    id_prefix: String,
    node: Option<Arc<str>>,
    next: u64,
    users: HashMap<UserId, Followed>,
    /// Users whose last session here ended, oldest first: their memberships are kept for the
    /// offline change that may follow (after `offline_grace_ms`), then forgotten.
    ended: VecDeque<(u64, UserId)>,
    keep_ended_ms: u64,
    /// Kinds some webhook takes (by [`Kind::ALL`]'s order): no event is built for the others.
    wanted: [bool; 5],
}

impl Tracker {
    /// `keep_ended_ms`: how long a user's memberships outlive its last session here (the
    /// offline grace and then some), so that the offline change can be filtered by them.
    /// `node`: this node's id, in a cluster.
    pub fn new(node: Option<Arc<str>>, seed: u64, shard: usize, keep_ended_ms: u64) -> Tracker {
        Tracker {
            id_prefix: match &node {
                Some(n) => format!("{n}-{seed:x}-{shard}-"),
                None => format!("{seed:x}-{shard}-"),
            },
            node,
            next: 0,
            users: HashMap::new(),
            ended: VecDeque::new(),
            keep_ended_ms,
            wanted: [true; 5],
        }
    }

    /// Builds events of the kinds `wanted` accepts only (the tracker still follows every
    /// session, for the filters of the kinds it builds).
    pub fn only(mut self, wanted: impl Fn(Kind) -> bool) -> Tracker {
        self.wanted = Kind::ALL.map(wanted);
        self
    }

    fn wants(&self, kind: Kind) -> bool {
        Kind::ALL
            .iter()
            .position(|k| *k == kind)
            .is_some_and(|i| self.wanted[i])
    }

    /// Users followed: those with a session here, or whose last one ended within
    /// `keep_ended_ms` (the bound on this map's memory).
    pub fn followed(&self) -> usize {
        self.users.len()
    }

    /// Forgets users whose last session ended more than `keep_ended_ms` before `now`.
    fn prune(&mut self, now: u64) {
        while let Some((at, user)) = self.ended.front() {
            if now.saturating_sub(*at) < self.keep_ended_ms {
                break;
            }
            if self.users.get(user).is_some_and(|f| f.sessions.is_empty()) {
                self.users.remove(user);
            }
            self.ended.pop_front();
        }
    }

    fn event(&mut self, kind: Kind, user: &UserId, ts: u64) -> Event {
        self.next += 1;
        let f = self.users.get(user);
        Event {
            id: format!("{}{}", self.id_prefix, self.next),
            event: kind,
            node: self.node.clone(),
            user: user.clone(),
            seq: f.map_or(0, |f| f.seq),
            ts,
            status: None,
            text: None,
            devices: None,
            session: None,
            device: None,
            device_type: None,
            region: None,
            groups: f.map_or_else(|| Arc::from([]), |f| f.groups.clone()),
            roles: f.map_or_else(|| Arc::from([]), |f| f.roles.clone()),
        }
    }

    fn session_event(
        &mut self,
        kind: Kind,
        user: &UserId,
        session: SessionId,
        info: &SessionInfo,
        now: u64,
    ) -> Event {
        let mut e = self.event(kind, user, now);
        e.session = Some(session.to_string());
        e.device = info.device.clone();
        e.device_type = Some(info.device_type.as_str());
        e.region = info.region.clone();
        e
    }

    /// A device session opened: its event, if wanted.
    pub fn session_start(
        &mut self,
        user: &UserId,
        session: SessionId,
        info: &SessionInfo,
        now: u64,
    ) -> Option<Event> {
        self.prune(now);
        let f = self.users.entry(user.clone()).or_default();
        f.sessions
            .push((session, info.groups.clone(), info.roles.clone()));
        f.remember_memberships();
        self.wants(Kind::SessionStart)
            .then(|| self.session_event(Kind::SessionStart, user, session, info, now))
    }

    /// A device session ended: its event, if wanted.
    pub fn session_end(
        &mut self,
        user: &UserId,
        session: SessionId,
        info: &SessionInfo,
        now: u64,
    ) -> Option<Event> {
        self.prune(now);
        if let Some(f) = self.users.get_mut(user) {
            f.sessions.retain(|s| s.0 != session);
            f.remember_memberships();
            if f.sessions.is_empty() {
                self.ended.push_back((now, user.clone()));
            }
        }
        self.wants(Kind::SessionEnd)
            .then(|| self.session_event(Kind::SessionEnd, user, session, info, now))
    }

    /// A user's aggregate changed: `user_online`, `user_offline`, `status_change`, or nothing
    /// (only the device count or the groups moved), from what the registry says it was.
    pub fn change(&mut self, state: &PresenceState, before: Before) -> Option<Event> {
        self.prune(state.ts);
        if let Some(f) = self.users.get_mut(&state.user) {
            f.seq = state.seq;
        }
        let visible = state.status != Aggregate::Offline;
        let kind = match (before.was_online, visible) {
            (false, true) => Some(Kind::UserOnline),
            (true, false) => Some(Kind::UserOffline),
            (true, true) if before.status_changed => Some(Kind::StatusChange),
            _ => None,
        }
        .filter(|k| self.wants(*k));
        let out = kind.map(|k| {
            let mut e = self.event(k, &state.user, state.ts);
            e.seq = state.seq;
            e.status = Some(state.status.as_str());
            e.text = state.text.clone();
            e.devices = Some(state.devices);
            e
        });
        if !visible
            && self
                .users
                .get(&state.user)
                .is_some_and(|f| f.sessions.is_empty())
        {
            self.users.remove(&state.user);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::presence::DeviceType;

    fn info(groups: &[&str], roles: &[&str]) -> SessionInfo {
        SessionInfo {
            device: Some("phone".into()),
            device_type: DeviceType::Ios,
            region: Some("DE".into()),
            groups: groups.iter().map(|g| GroupId::from(*g)).collect(),
            roles: roles.iter().map(|r| Arc::<str>::from(*r)).collect(),
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            connected_at_ms: 1,
        }
    }

    fn state(status: Aggregate, text: Option<&str>, devices: u32, seq: u64) -> PresenceState {
        PresenceState {
            user: "alice".into(),
            status,
            text: text.map(Into::into),
            devices,
            last_seen: None,
            ts: 1_000 + seq,
            seq,
        }
    }

    fn before(was_online: bool, status_changed: bool) -> Before {
        Before {
            was_online,
            status_changed,
        }
    }

    fn kinds(events: &[Option<Event>]) -> Vec<Option<&'static str>> {
        events
            .iter()
            .map(|e| e.as_ref().map(|e| e.event.as_str()))
            .collect()
    }

    #[test]
    fn a_users_day_in_events() {
        let mut t = Tracker::new(None, 0xabc, 1, 60_000);
        let alice = UserId::from("alice");
        let (s1, s2) = (SessionId::new(1, 1), SessionId::new(1, 2));
        let start = t
            .session_start(&alice, s1, &info(&["team"], &["admin"]), 1_000)
            .unwrap();
        assert_eq!(start.event, Kind::SessionStart);
        assert_eq!(start.id, "abc-1-1");
        assert_eq!(start.device_type, Some("ios"));
        let events = vec![
            t.change(&state(Aggregate::Online, None, 1, 1), before(false, true)),
            t.session_start(&alice, s2, &info(&["ops"], &[]), 1_002),
            // A device more: nothing.
            t.change(&state(Aggregate::Online, None, 2, 2), before(true, false)),
            t.change(
                &state(Aggregate::Busy, Some("call"), 2, 3),
                before(true, true),
            ),
            // Text only.
            t.change(
                &state(Aggregate::Busy, Some("meeting"), 2, 4),
                before(true, true),
            ),
            t.session_end(&alice, s2, &info(&["ops"], &[]), 1_005),
            t.session_end(&alice, s1, &info(&["team"], &["admin"]), 1_006),
            t.change(&state(Aggregate::Offline, None, 0, 5), before(true, true)),
        ];
        assert_eq!(
            kinds(&events),
            [
                Some("user_online"),
                Some("session_start"),
                None,
                Some("status_change"),
                Some("status_change"),
                Some("session_end"),
                Some("session_end"),
                Some("user_offline"),
            ]
        );
        let busy = events[3].as_ref().unwrap();
        assert_eq!(
            (busy.status, busy.text.as_deref(), busy.devices),
            (Some("busy"), Some("call"), Some(2))
        );
        let groups = |e: &Event| e.groups.iter().map(|g| g.to_string()).collect::<Vec<_>>();
        assert_eq!(groups(busy), ["ops", "team"], "both sessions' groups");
        assert_eq!(&*busy.roles, [Arc::<str>::from("admin")]);
        // The offline change comes after the last session's end: it keeps the groups and roles
        // the filters need, and then the user is forgotten.
        let offline = events[7].as_ref().unwrap();
        assert_eq!(groups(offline), ["team"]);
        assert_eq!(offline.seq, 5);
        assert_eq!(t.followed(), 0);
        let ids: std::collections::HashSet<&str> =
            events.iter().flatten().map(|e| e.id.as_str()).collect();
        assert_eq!(ids.len(), 7, "unique ids");
    }

    #[test]
    fn in_a_cluster_a_second_nodes_session_is_no_second_online() {
        // The registry's merged view says the user was already visible elsewhere.
        let mut t = Tracker::new(None, 1, 0, 60_000);
        let e = t.change(&state(Aggregate::Online, None, 2, 7), before(true, false));
        assert!(e.is_none());
        let e = t.change(&state(Aggregate::Away, None, 1, 8), before(true, true));
        assert_eq!(e.unwrap().event, Kind::StatusChange);
        assert_eq!(t.followed(), 0, "no session here: nothing kept");
    }

    #[test]
    fn kinds_no_webhook_takes_are_not_built_but_sessions_are_still_followed() {
        let mut t = Tracker::new(None, 1, 0, 60_000).only(|k| k == Kind::UserOnline);
        let alice = UserId::from("alice");
        let s = SessionId::new(0, 1);
        assert_eq!(
            t.session_start(&alice, s, &info(&["team"], &[]), 1_000),
            None
        );
        let online = t.change(&state(Aggregate::Online, None, 1, 1), before(false, true));
        assert_eq!(
            online.map(|e| e.groups),
            Some(Arc::from([GroupId::from("team")]))
        );
        let busy = t.change(&state(Aggregate::Busy, None, 1, 2), before(true, true));
        assert_eq!(busy, None, "status_change is not wanted");
        assert_eq!(t.session_end(&alice, s, &info(&["team"], &[]), 1_003), None);
    }

    #[test]
    fn an_unseen_session_is_forgotten_in_time() {
        let mut t = Tracker::new(None, 1, 0, 60_000);
        let bob = UserId::from("bob");
        let s = SessionId::new(0, 9);
        t.session_start(&bob, s, &info(&[], &[]), 1);
        assert_eq!(t.followed(), 1);
        t.session_end(&bob, s, &info(&[], &[]), 2);
        assert_eq!(
            t.followed(),
            1,
            "kept for an offline change that may follow"
        );
        // No offline change comes (an invisible session, or the user visible on another
        // node): forgotten once `keep_ended_ms` has passed.
        t.session_start(
            &UserId::from("cy"),
            SessionId::new(0, 10),
            &info(&[], &[]),
            60_003,
        );
        assert_eq!(
            t.followed(),
            1,
            "never visible: no offline change will come"
        );
    }
}
