//! What travels on the bus (docs/CLUSTER.md, "On the bus"): subjects and JSON bodies.
//!
//! | subject | body | from → to |
//! |---|---|---|
//! | `{prefix}.d.{bucket}` | [`Delta`] | a node's changed shares → nodes following the bucket |
//! | `{prefix}.hb` | [`Heartbeat`] | every node → every node, every `lease_ms / 3` |
//! | `{prefix}.snap.{node}` | [`SnapRequest`] → [`SnapChunk`]s | request/reply: a node's shares |
//! | `{prefix}.id.{node}` | [`Heartbeat`] | "is this id taken?" → the live holder answers |

use serde::{Deserialize, Serialize};

use super::members::NodeInfo;
use crate::presence::contrib::Contribution;
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

    pub fn heartbeat(&self) -> String {
        format!("{}.hb", self.prefix)
    }

    pub fn snapshot(&self, node: &str) -> String {
        format!("{}.snap.{node}", self.prefix)
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

/// "Send me your shares of the users in these buckets."
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct SnapRequest {
    pub from: String,
    pub buckets: Vec<u32>,
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
