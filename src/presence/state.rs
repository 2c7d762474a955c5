//! Value types of the presence model: statuses, the aggregate a subscriber sees, and ids.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// A user id (`sub`). `Arc` because the same id travels in mesh messages between shards and sits
/// in several maps; cloning it is one atomic increment, never a copy of the string.
pub type UserId = Arc<str>;
/// A group id, from the token's `groups` claim.
pub type GroupId = Arc<str>;
/// One session (= one connection) of a user. Unique within the server process: the owner shard
/// index is in the top 16 bits, a per-shard counter in the rest.
pub type SessionId = u64;

/// The status a single session sets for itself (`set_status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Online,
    Away,
    Busy,
    Invisible,
}

impl Status {
    /// Parses the wire name; `None` for anything else.
    pub fn parse(name: &str) -> Option<Status> {
        match name {
            "online" => Some(Status::Online),
            "away" => Some(Status::Away),
            "busy" => Some(Status::Busy),
            "invisible" => Some(Status::Invisible),
            _ => None,
        }
    }

    /// What this session contributes to the user's aggregate: invisible sessions count as
    /// offline to everyone else.
    pub fn visible(self) -> Option<Aggregate> {
        match self {
            Status::Online => Some(Aggregate::Online),
            Status::Busy => Some(Aggregate::Busy),
            Status::Away => Some(Aggregate::Away),
            Status::Invisible => None,
        }
    }
}

/// What subscribers see: the highest status over a user's visible sessions.
/// Declaration order is the ranking (`Offline` < `Away` < `Busy` < `Online`), so `Ord` picks
/// the aggregate.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Aggregate {
    #[default]
    Offline,
    Away,
    Busy,
    Online,
}

impl Aggregate {
    pub fn as_str(self) -> &'static str {
        match self {
            Aggregate::Offline => "offline",
            Aggregate::Away => "away",
            Aggregate::Busy => "busy",
            Aggregate::Online => "online",
        }
    }
}

/// The kind of device a session runs on (`device_type` claim or query parameter).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DeviceType {
    Web,
    Ios,
    Android,
    Desktop,
    #[default]
    Other,
}

impl DeviceType {
    pub fn parse(name: &str) -> Option<DeviceType> {
        match name {
            "web" => Some(DeviceType::Web),
            "ios" => Some(DeviceType::Ios),
            "android" => Some(DeviceType::Android),
            "desktop" => Some(DeviceType::Desktop),
            "other" => Some(DeviceType::Other),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DeviceType::Web => "web",
            DeviceType::Ios => "ios",
            DeviceType::Android => "android",
            DeviceType::Desktop => "desktop",
            DeviceType::Other => "other",
        }
    }
}

/// A user's aggregate presence at one `seq`: exactly what a `presence` event carries.
/// This is the value that crosses the mesh (it is `Send`), once per watching shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PresenceState {
    pub user: UserId,
    pub status: Aggregate,
    /// Text of the session that decides the aggregate status (latest set wins among equals).
    pub text: Option<Arc<str>>,
    /// Number of visible sessions.
    pub devices: u32,
    /// When the user last went from visible to offline (ms since epoch).
    pub last_seen: Option<u64>,
    /// When this state came about (ms since epoch); for a snapshot of a user who never changed,
    /// the time of the snapshot.
    pub ts: u64,
    /// Per-user, strictly increasing with every change of (status, text, devices).
    pub seq: u64,
}

impl PresenceState {
    /// The view a group feed gets when the user is no longer a visible member of that group
    /// (no visible session carries the group): offline there, at the same `seq`.
    pub fn left_group(&self) -> PresenceState {
        PresenceState {
            user: self.user.clone(),
            status: Aggregate::Offline,
            text: None,
            devices: 0,
            last_seen: self.last_seen,
            ts: self.ts,
            seq: self.seq,
        }
    }
}
