//! What history records: session starts and ends, aggregate presence changes, and periodic
//! samples of how many users were online (in all, and per group).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::presence::{Aggregate, DeviceType, GroupId, SessionId, UserId};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    SessionStart,
    SessionEnd,
    /// The user's aggregate (status, text, devices) changed.
    Status,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::SessionStart => "session_start",
            EventKind::SessionEnd => "session_end",
            EventKind::Status => "status",
        }
    }

    pub fn parse(s: &str) -> Option<EventKind> {
        match s {
            "session_start" => Some(EventKind::SessionStart),
            "session_end" => Some(EventKind::SessionEnd),
            "status" => Some(EventKind::Status),
            _ => None,
        }
    }
}

/// One recorded event. Session events carry the session's facts; status events the aggregate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEvent {
    /// Milliseconds since the epoch.
    pub ts: u64,
    pub user: UserId,
    pub kind: EventKind,
    /// The session (0 for status events, and then left out). In JSON it is the hex string that
    /// `welcome.session`, `/api/users/{id}` and the kick routes use (a number would lose
    /// precision in JavaScript once the shard index reaches 32).
    #[serde(
        default,
        skip_serializing_if = "no_session",
        deserialize_with = "hex_session::deserialize"
    )]
    pub session: SessionId,
    /// Session events: when the session started (an end carries its start, so one row gives the
    /// whole interval).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub started_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<Arc<str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_type: Option<DeviceType>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<Arc<str>>,
    #[serde(default, skip_serializing_if = "<[GroupId]>::is_empty")]
    pub groups: Arc<[GroupId]>,
    /// Status events: the aggregate after the change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Aggregate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<Arc<str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<u32>,
    /// Status events: the user's presence `seq`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub seq: u64,
}

/// A session id as lowercase hex in JSON; a number is accepted too.
mod hex_session {
    use serde::{Deserialize, Deserializer};

    use crate::presence::SessionId;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SessionId, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Id {
            Hex(String),
            Num(u64),
        }
        match Id::deserialize(d)? {
            Id::Num(n) => Ok(SessionId::from_raw(n)),
            Id::Hex(h) => SessionId::parse_hex(&h)
                .ok_or_else(|| serde::de::Error::custom(format!("bad session id `{h}`"))),
        }
    }
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

fn no_session(id: &SessionId) -> bool {
    id.get() == 0
}

impl HistoryEvent {
    /// A bare event of `kind`; callers fill in what applies.
    pub fn new(ts: u64, user: UserId, kind: EventKind) -> HistoryEvent {
        HistoryEvent {
            ts,
            user,
            kind,
            session: SessionId::default(),
            started_at: 0,
            device: None,
            device_type: None,
            region: None,
            groups: Arc::from([]),
            status: None,
            text: None,
            devices: None,
            seq: 0,
        }
    }
}

/// How many users were online at `ts`: in all, and per group (the largest groups, up to
/// `history.max_groups_per_sample`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    pub ts: u64,
    pub online: u64,
    #[serde(default)]
    pub groups: Vec<(GroupId, u64)>,
}

impl Sample {
    /// Drops every group count but `group`'s (all of them with `None`).
    pub fn keep_only(&mut self, group: Option<&str>) {
        self.groups
            .retain(|(g, _)| group.is_some_and(|k| &**g == k));
        self.groups.shrink_to_fit();
    }

    /// Online users in `group`, or in all when `None`.
    pub fn count(&self, group: Option<&str>) -> u64 {
        match group {
            None => self.online,
            Some(g) => self
                .groups
                .iter()
                .find(|(name, _)| &**name == g)
                .map_or(0, |(_, n)| *n),
        }
    }
}

/// Day number (UTC) of a timestamp in ms: Scylla partitions by it.
pub fn day_of(ts_ms: u64) -> u32 {
    (ts_ms / 86_400_000) as u32
}

/// Hour number (UTC) of a timestamp in ms.
pub fn hour_of(ts_ms: u64) -> u64 {
    ts_ms / 3_600_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_are_hex_in_json_and_round_trip() {
        let mut e = HistoryEvent::new(5, "u".into(), EventKind::SessionStart);
        e.session = SessionId::new(33, 7);
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["session"], "21000000000007");
        assert_eq!(serde_json::from_value::<HistoryEvent>(json).unwrap(), e);
        let status = HistoryEvent::new(5, "u".into(), EventKind::Status);
        assert!(serde_json::to_value(&status)
            .unwrap()
            .get("session")
            .is_none());
        let legacy: HistoryEvent =
            serde_json::from_str(r#"{"ts":1,"user":"u","kind":"session_end","session":12}"#)
                .unwrap();
        assert_eq!(legacy.session, SessionId::from_raw(12));
    }
}
