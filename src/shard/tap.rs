//! Taps: how the drivers that record or mirror presence (history, the dashboard's change log,
//! later the cluster bridge and webhooks) hear of sessions and changes, without the shard
//! knowing any of them. Each driver registers a tap on every shard at start-up; the shard calls
//! every tap synchronously, in registration order, at the moment the thing happens. A tap must
//! not block and must not call back into the shard (it may queue, count, or `try_send`).

use std::sync::Arc;

use crate::presence::{PresenceState, SessionId, SessionInfo, UserId};

/// Something that happened on a shard.
#[derive(Debug)]
pub enum Tap<'a> {
    /// A device session opened (impersonations are not sessions and are not tapped).
    SessionStart(SessionTap<'a>),
    /// A device session ended, for whatever reason.
    SessionEnd(SessionTap<'a>),
    /// A local user's aggregate changed (a new `seq`), and what it was before.
    Change(&'a Arc<PresenceState>, Before),
}

/// What a [`Tap::Change`]'s user was before it (the registry's own view, so a driver needs no
/// memory of its own to tell an online from a status change).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Before {
    /// Visible (not offline) before.
    pub was_online: bool,
    /// The status or the text changed (not only the device count or the groups).
    pub status_changed: bool,
}

/// The device session a [`Tap::SessionStart`] or [`Tap::SessionEnd`] is about.
#[derive(Debug)]
pub struct SessionTap<'a> {
    pub user: &'a UserId,
    pub session: SessionId,
    pub info: &'a SessionInfo,
    /// When it started or ended (ms since epoch).
    pub now: u64,
}

/// A registered listener.
pub type Listener = Box<dyn Fn(&Tap<'_>)>;
