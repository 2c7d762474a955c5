//! What travels on the bus (docs/CLUSTER.md, "On the bus"): subjects and JSON bodies.
//!
//! | subject | body | from → to |
//! |---|---|---|
//! | `{prefix}.d.{bucket}` | [`Delta`] | a node's changed shares → nodes following the bucket |
//! | `{prefix}.g.{bucket}` | [`Delta`] | the same, for users in (or leaving) a group of the group bucket → nodes watching such a group |
//! | `{prefix}.a.{bucket}` | [`ActivityMsg`] | `activity` of users in the bucket → nodes with watchers there |
//! | `{prefix}.t.{bucket}` | [`ActivityMsg`] | `activity` with `to` a user in the bucket → nodes with sessions there |
//! | `{prefix}.hb` | [`Heartbeat`] | every node → every node, every `lease_ms / 3` |
//! | `{prefix}.snap.{node}` | [`SnapRequest`] → [`SnapChunk`]s | request/reply: a node's shares |
//! | `{prefix}.admin.{node}` | [`AdminCall`](super::AdminCall) → [`AdminAnswer`](super::AdminAnswer) | request/reply: a cluster-wide admin question |
//! | `{prefix}.id.{node}` | [`Heartbeat`] | "is this id taken?" → the live holder answers |

use serde::{Deserialize, Serialize};

use super::members::NodeInfo;
use crate::presence::contrib::{Activity, Contribution};
use crate::presence::UserId;

/// Shares one message carries at most (a snapshot is several chunks; a large delta several
/// messages), keeping each well under NATS's default 1 MiB payload limit.
pub const SHARES_PER_MESSAGE: usize = 1_000;

/// The subjects of one cluster (`cluster.prefix`).
#[derive(Clone, Debug)]
pub struct Subjects {
    prefix: String,
}

impl Subjects {
    pub fn new(prefix: &str) -> Subjects {
        Subjects {
            prefix: prefix.to_owned(),
        }
    }

    pub fn delta(&self, bucket: u32) -> String {
        format!("{}.d.{bucket}", self.prefix)
    }

    /// Every user bucket's deltas (a wildcard).
    pub fn all_deltas(&self) -> String {
        format!("{}.d.*", self.prefix)
    }

    pub fn group(&self, bucket: u32) -> String {
        format!("{}.g.{bucket}", self.prefix)
    }

    /// The bucket of a group delta subject, if it is one of this cluster's.
    pub fn group_bucket(&self, subject: &str) -> Option<u32> {
        subject
            .strip_prefix(&self.prefix)?
            .strip_prefix(".g.")?
            .parse()
            .ok()
    }

    /// `activity` for the watchers of users in `bucket`.
    pub fn activity(&self, bucket: u32) -> String {
        format!("{}.a.{bucket}", self.prefix)
    }

    /// `activity` with `to`, for the sessions of users in `bucket`.
    pub fn directed(&self, bucket: u32) -> String {
        format!("{}.t.{bucket}", self.prefix)
    }

    /// Whether `subject` carries `activity` (either kind).
    pub fn is_activity(&self, subject: &str) -> bool {
        subject
            .strip_prefix(&self.prefix)
            .is_some_and(|r| r.starts_with(".a.") || r.starts_with(".t."))
    }

    pub fn heartbeat(&self) -> String {
        format!("{}.hb", self.prefix)
    }

    pub fn snapshot(&self, node: &str) -> String {
        format!("{}.snap.{node}", self.prefix)
    }

    /// Nobody subscribes here: a request to it is answered "no responders" by the NATS server
    /// itself, which proves the link to the server works (the bridge's probe).
    pub fn probe(&self, node: &str) -> String {
        format!("{}.probe.{node}", self.prefix)
    }

    /// Admin API questions to `node` (request/reply).
    pub fn admin(&self, node: &str) -> String {
        format!("{}.admin.{node}", self.prefix)
    }

    pub fn whois(&self, node: &str) -> String {
        format!("{}.id.{node}", self.prefix)
    }

    /// The bucket of a delta subject, if it is one of this cluster's.
    pub fn delta_bucket(&self, subject: &str) -> Option<u32> {
        subject
            .strip_prefix(&self.prefix)?
            .strip_prefix(".d.")?
            .parse()
            .ok()
    }
}

/// A node's changed shares on one bucket. `n` numbers the node's messages on the bucket
/// (1, 2, ...) so receivers see a loss as a gap.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Delta {
    pub node: String,
    pub inc: u64,
    pub bucket: u32,
    pub n: u64,
    pub shares: Vec<(UserId, Contribution)>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Heartbeat {
    pub node: String,
    pub inc: u64,
    #[serde(flatten)]
    pub info: NodeInfo,
}

/// `activity` events from one node (ephemeral: not numbered, never resent).
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct ActivityMsg {
    pub node: String,
    pub inc: u64,
    pub items: Vec<Activity>,
}

/// "Send me your shares of the users in these user buckets, and of the members of the groups in
/// these group buckets."
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct SnapRequest {
    pub from: String,
    pub buckets: Vec<u32>,
    #[serde(default)]
    pub groups: Vec<u32>,
}

/// One part of a snapshot answer. `clock` is the answering node's clock when it started: a
/// share held from it that is older and missing from the answer is gone. `covered` is the last
/// delta number per bucket the snapshot includes. `last` ends the answer.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct SnapChunk {
    pub node: String,
    pub inc: u64,
    pub clock: u64,
    pub covered: Vec<(u32, u64)>,
    /// The same for the group buckets asked for.
    #[serde(default)]
    pub covered_groups: Vec<(u32, u64)>,
    pub shares: Vec<(UserId, Contribution)>,
    pub last: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_name_the_bucket_and_read_it_back() {
        let s = Subjects::new("presenced.eu");
        assert_eq!(s.delta(17), "presenced.eu.d.17");
        assert_eq!(s.delta_bucket("presenced.eu.d.17"), Some(17));
        assert_eq!(s.delta_bucket("other.d.17"), None);
        assert_eq!(s.delta_bucket("presenced.eu.d.x"), None);
        assert_eq!(s.snapshot("n1"), "presenced.eu.snap.n1");
        assert_eq!(s.group_bucket(&s.group(5)), Some(5));
        assert_eq!(s.group_bucket(&s.delta(5)), None);
        assert!(s.is_activity(&s.activity(3)) && s.is_activity(&s.directed(3)));
        assert!(!s.is_activity(&s.delta(3)));
        assert_eq!(s.heartbeat(), "presenced.eu.hb");
    }

    #[test]
    fn a_delta_round_trips_and_unknown_input_is_an_error() {
        let d = Delta {
            node: "a".into(),
            inc: 1,
            bucket: 3,
            n: 9,
            shares: vec![("u".into(), Contribution::offline(5, Some(4)))],
        };
        let bytes = serde_json::to_vec(&d).unwrap();
        assert_eq!(serde_json::from_slice::<Delta>(&bytes).unwrap(), d);
        assert!(serde_json::from_slice::<Delta>(b"{\"node\":1}").is_err());
        let hb = Heartbeat {
            node: "a".into(),
            inc: 2,
            info: NodeInfo {
                admin: Some("http://127.0.0.1:9090".into()),
                sessions: 1,
                online: 1,
            },
        };
        let text = serde_json::to_string(&hb).unwrap();
        assert!(text.contains("\"admin\""), "{text}");
        assert_eq!(serde_json::from_str::<Heartbeat>(&text).unwrap(), hb);
    }
}
