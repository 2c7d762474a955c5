//! The presence model (SPEC §3), with no I/O in it.
//!
//! - [`registry`]: per-user sessions, aggregate status, `seq`, `last_seen`, and which shards watch
//!   each user. Lives on the user's owner shard.
//! - [`groups`]: the visible members of each group and which shards watch the group. Lives on the
//!   group's owner shard.
//! - [`watchers`]: the "count per shard" bookkeeping both of them use for fan-out.
//!
//! Every function takes the current time as an argument, so the whole model is deterministic and
//! is tested exhaustively (unit tests and a proptest reference model in `registry`).

pub mod contrib;
pub mod groups;
pub mod handover;
pub mod registry;
pub mod state;
pub mod watchers;

pub use groups::{Groups, StatusCounts};
pub use registry::{
    Change, Held, Hold, Outgoing, Registry, Session, SessionInfo, SnapScope, UserView,
};
pub use state::{Aggregate, DeviceType, GroupId, PresenceState, SessionId, Status, UserId};
pub use watchers::Watchers;
