//! Value types of the presence model: statuses, the aggregate a subscriber sees, and ids.

use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// A string id that travels between shards and sits in several maps: an `Arc<str>`, so cloning
/// it is one atomic increment, never a copy of the string. Distinct types for users and groups,
/// so one cannot be passed for the other; both read as `&str` and are looked up by `&str`
/// (`Borrow<str>` hashes and orders exactly as `str` does).
macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Arc<str>);

        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                $name(Arc::from(s))
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                $name(Arc::from(s))
            }
        }

        impl From<&String> for $name {
            fn from(s: &String) -> Self {
                $name(Arc::from(s.as_str()))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                &*self.0 == other
            }
        }
    };
}

string_id!(
    /// A user id (`sub`).
    UserId
);
string_id!(
    /// A group id, from the token's `groups` claim.
    GroupId
);

/// One session (= one connection) of a user. Unique within the server process: the shard that
/// serves it is in the top 16 bits ([`SessionId::shard`]), a per-shard counter in the rest.
/// Clients see it as lowercase hex (`welcome.session`, the admin API).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct SessionId(u64);

impl SessionId {
    /// Bits below the shard index.
    const COUNTER_BITS: u32 = 48;

    /// The `n`th session id of `shard` (`n` wraps within 48 bits).
    pub fn new(shard: u16, n: u64) -> SessionId {
        SessionId((u64::from(shard) << Self::COUNTER_BITS) | (n & ((1 << Self::COUNTER_BITS) - 1)))
    }

    /// The shard that serves this session.
    pub fn shard(self) -> u16 {
        (self.0 >> Self::COUNTER_BITS) as u16
    }

    /// The id as a number (storage, hashing into slots).
    pub fn get(self) -> u64 {
        self.0
    }

    pub fn from_raw(raw: u64) -> SessionId {
        SessionId(raw)
    }

    /// Parses the hex form clients see; digits only (no sign, no prefix).
    pub fn parse_hex(s: &str) -> Option<SessionId> {
        if s.is_empty() || s.len() > 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        u64::from_str_radix(s, 16).ok().map(SessionId)
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// The hex form clients see.
impl serde::Serialize for SessionId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

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

#[cfg(test)]
mod id_tests {
    use super::*;

    #[test]
    fn session_ids_name_their_shard_and_read_as_hex() {
        let id = SessionId::new(3, 7);
        assert_eq!(id.shard(), 3);
        assert_eq!(id.to_string(), "3000000000007");
        assert_eq!(SessionId::parse_hex("3000000000007"), Some(id));
        for bad in ["", "+1", "0x1", "g", "11112222333344445"] {
            assert_eq!(SessionId::parse_hex(bad), None, "{bad:?}");
        }
        assert_eq!(
            SessionId::new(1, 1 << 48).shard(),
            1,
            "the counter never reaches the shard"
        );
    }

    #[test]
    fn string_ids_look_up_and_serialise_as_strings() {
        let mut m: hashbrown::HashMap<UserId, u8> = hashbrown::HashMap::new();
        m.insert(UserId::from("alice"), 1);
        assert_eq!(m.get("alice"), Some(&1));
        assert_eq!(serde_json::to_string(&UserId::from("a")).unwrap(), "\"a\"");
        let g: GroupId = serde_json::from_str("\"team\"").unwrap();
        assert_eq!(&*g, "team");
    }
}
