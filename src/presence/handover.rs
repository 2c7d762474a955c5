//! What one process hands the next in an upgrade (SPEC §11, docs/OPERATIONS.md): per user, the
//! sessions that make up its presence, with `seq`, `last_seen` and when it last changed. Plain
//! values; the byte format around them is `ops::handover`.
//!
//! Statuses and device types travel by name, so a record never depends on the order of an
//! enum's variants, and an unknown name is refused rather than read as something else.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::registry::Held;
use super::state::{DeviceType, GroupId, Status};

/// One user's presence, as the old process held it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    pub user: String,
    pub seq: u64,
    pub last_seen: Option<u64>,
    /// When the visible state last changed (ms since the epoch).
    pub changed_at_ms: u64,
    pub sessions: Vec<SessionRecord>,
    /// In a cluster: this node's share of the user as the old process last stamped it (and
    /// published it, or was about to). The new process keeps its clock, so the other nodes
    /// hear nothing new of a user the upgrade did not change. `None` on a single node.
    pub share: Option<ShareRecord>,
}

/// The old process's own share of a user on the bus: its clock and its `last_seen` (the
/// status, text, devices and groups follow from the sessions).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareRecord {
    pub clock: u64,
    pub last_seen: Option<u64>,
}

/// One session behind a user's presence: live in the old process (`until` = `None`) or held
/// there until a deadline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// The session's id in the old process.
    pub origin: u64,
    pub status: String,
    pub text: Option<String>,
    pub device: Option<String>,
    pub device_type: String,
    pub groups: Vec<String>,
    pub connected_at_ms: u64,
    /// When it ended in the old process (0 while live there).
    pub ended_at_ms: u64,
    pub stamp: u64,
    pub until: Option<u64>,
}

/// Why a record was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("a record with an empty user id")]
    EmptyUser,
    #[error("user {user}: unknown status `{status}`")]
    Status { user: String, status: String },
    #[error("user {user}: unknown device type `{device_type}`")]
    DeviceType { user: String, device_type: String },
    #[error("user {user}: `{field}` out of range")]
    Range { user: String, field: &'static str },
}

/// Largest `seq` or stamp a record may carry: far above any real one (a cluster's `seq` is a
/// clock below 2^53), far enough below `u64::MAX` that counting on from it cannot overflow.
pub const MAX_COUNTER: u64 = 1 << 62;

pub fn status_name(s: Status) -> &'static str {
    match s {
        Status::Online => "online",
        Status::Away => "away",
        Status::Busy => "busy",
        Status::Invisible => "invisible",
    }
}

impl SessionRecord {
    /// What the next process is told of a held session (a live one as a hold with no
    /// deadline: [`Held::of`]).
    pub fn of(h: &Held) -> SessionRecord {
        SessionRecord {
            origin: h.origin,
            status: status_name(h.status).to_owned(),
            text: h.text.as_deref().map(str::to_owned),
            device: h.device.as_deref().map(str::to_owned),
            device_type: h.device_type.as_str().to_owned(),
            groups: h.groups.iter().map(|g| g.to_string()).collect(),
            connected_at_ms: h.connected_at_ms,
            ended_at_ms: h.ended_at_ms,
            stamp: h.stamp,
            until: h.until,
        }
    }

    /// The held session this record becomes in the new process.
    pub fn to_held(&self, user: &str) -> Result<Held, RecordError> {
        if self.stamp > MAX_COUNTER {
            return Err(RecordError::Range {
                user: user.to_owned(),
                field: "stamp",
            });
        }
        let status = Status::parse(&self.status).ok_or_else(|| RecordError::Status {
            user: user.to_owned(),
            status: self.status.clone(),
        })?;
        let device_type =
            DeviceType::parse(&self.device_type).ok_or_else(|| RecordError::DeviceType {
                user: user.to_owned(),
                device_type: self.device_type.clone(),
            })?;
        let mut groups: Vec<GroupId> = self.groups.iter().map(GroupId::from).collect();
        groups.sort_unstable();
        groups.dedup();
        Ok(Held {
            origin: self.origin,
            from_old: true,
            status,
            text: self.text.as_deref().map(Arc::from),
            device: self.device.as_deref().map(Arc::from),
            device_type,
            groups: groups.into(),
            connected_at_ms: self.connected_at_ms,
            ended_at_ms: self.ended_at_ms,
            stamp: self.stamp,
            until: self.until,
        })
    }
}

impl UserRecord {
    /// Checks every field that has a closed set of values.
    pub fn check(&self) -> Result<(), RecordError> {
        if self.user.is_empty() {
            return Err(RecordError::EmptyUser);
        }
        if self.seq > MAX_COUNTER {
            return Err(RecordError::Range {
                user: self.user.clone(),
                field: "seq",
            });
        }
        if self.share.is_some_and(|s| s.clock > MAX_COUNTER) {
            return Err(RecordError::Range {
                user: self.user.clone(),
                field: "share.clock",
            });
        }
        for s in &self.sessions {
            s.to_held(&self.user)?;
        }
        Ok(())
    }
}
