//! Webhooks and alerts (`[[webhooks]]`, docs/WEBHOOKS.md).
//!
//! - [`event`] (pure): shard taps to webhook events (`user_online`, `user_offline`,
//!   `status_change`, `session_start`, `session_end`), with the user's groups and roles.
//! - [`delivery`] (pure): the filter, the bounded in-order queue with its in-flight batch, the
//!   request body (`json`, `slack`) and its HMAC-SHA256 signature.
//! - [`sender`]: per webhook, a collector and a sender thread off the shards (`ureq`, rustls).
//! - [`install`]: the tap on every shard.
//!
//! Their figures and health: `/metrics`, `GET /api/webhooks` and the dashboard
//! (`crate::admin::api::webhooks`).

pub mod delivery;
pub mod event;
pub mod sender;

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use crate::shard::tap::Tap;
use crate::shard::Shard;

/// Webhooks on one shard: a tap that turns its sessions and changes into events and offers
/// them to every webhook (queued, never waited for).
/// `node`: this node's id, in a cluster (in every event, and in its id).
pub fn install(shard: &Rc<Shard>, hooks: Arc<sender::Webhooks>, node: Option<Arc<str>>, seed: u64) {
    // Memberships outlive a user's last session for the offline grace and a minute more.
    let keep = shard.cfg().offline_grace_ms.saturating_add(60_000);
    let tracker = event::Tracker::new(node, seed, usize::from(shard.ix()), keep)
        .only(|k| hooks.wants_kind(k));
    let tracker = RefCell::new(tracker);
    shard.add_tap(Box::new(move |t: &Tap<'_>| {
        let mut tr = tracker.borrow_mut();
        let e = match t {
            Tap::SessionStart(s) => tr.session_start(s.user, s.session, s.info, s.now),
            Tap::SessionEnd(s) => tr.session_end(s.user, s.session, s.info, s.now),
            Tap::Change(state, before) => tr.change(state, *before),
        };
        drop(tr);
        if let Some(e) = e {
            hooks.offer(e);
        }
    }));
}
