//! A node's bus identity, as an upgrade hands it from the old process to the new one
//! (docs/OPERATIONS.md, "In a cluster"). Plain values; the byte format around them is
//! `ops::handover`, the bridge's part `bridge.rs`.
//!
//! The new process takes the node's id and incarnation, so the other nodes hear one node
//! throughout: no restart, no lease expiry, no user going offline. It takes the clock, so its
//! stamps sort after the old one's, and, once the old one has published its last change, the
//! number of every delta stream, so the others see no gap.

use serde::{Deserialize, Serialize};

/// What the new process needs before it starts: who the node is, its clock, which buckets it
/// follows and which nodes it knows (so the new process asks them for its watchers' state
/// before it accepts anyone).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub node_id: String,
    pub incarnation: u64,
    pub clock: u64,
    /// Followed user buckets and group buckets.
    pub follows: Vec<u32>,
    pub follows_groups: Vec<u32>,
    /// The live nodes: (id, incarnation).
    pub members: Vec<(String, u64)>,
    /// How long the followed buckets are kept without a watcher (the old process's drain
    /// window and re-attach time): its watchers come back meanwhile.
    pub hold_ms: u64,
}

/// What the old process hands over once it has stopped publishing (after the new one said
/// READY): the clock, the last number of each delta stream, and per user what the new process
/// must know to publish after it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handoff {
    pub clock: u64,
    /// (user bucket, last number) and (group bucket, last number).
    pub numbers: Vec<(u32, u64)>,
    pub group_numbers: Vec<(u32, u64)>,
    /// Where a stream not listed numbers from (0, or past a take-back's jump).
    pub numbers_base: u64,
    pub users: Vec<HandoffUser>,
}

/// One user the old process published in groups, or could not publish.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoffUser {
    pub user: String,
    /// The groups it was last published in: one it leaves is published on that group's bucket
    /// once more, so the group's watchers hear it leave.
    pub groups: Vec<String>,
    /// Its last share was not published (the bus was down): the new process publishes it.
    pub unpublished: bool,
}
