//! A shard's part in an upgrade (SPEC §11, docs/OPERATIONS.md).
//!
//! In the old process: [`Shard::begin_handover`] hands over what the registry holds and, from
//! then on, every change of a user here is sent after it as that user's whole record, so the
//! new process never holds an older state than this one showed. [`Shard::drain_for_upgrade`]
//! then closes the sessions with 1001, spread evenly over `drain_ms`; each stays held (in this
//! registry and, through the records, in the new process) so its user does not flap while its
//! client reconnects.
//!
//! In the new process: [`Shard::adopt`] takes the handed-over users before any connection is
//! accepted; [`Shard::update_from_old`] the records that follow; [`Shard::end_old`] the end of
//! the old process.

use std::rc::Rc;
use std::time::Duration;

use super::{now_ms, CloseRequest, Shard};
use crate::metrics::ShardMetrics;
use crate::presence::handover::{RecordError, UserRecord};
use crate::presence::Hold;

/// Close code and reason of a session drained by an upgrade.
pub const DRAIN_CODE: u16 = 1001;
pub const DRAIN_REASON: &str = "server restarting: reconnect";

/// How a shard starts accepting again: its listeners (edge, admin) on its share of the
/// sockets.
pub type Relisten = Box<dyn Fn(&Rc<Shard>) -> Result<Vec<super::runtime::Stop>, String>>;

/// The old process's side of a hand-over on one shard.
pub struct Handover {
    /// Where changed users' records go (to the new process, through the upgrade thread).
    deltas: flume::Sender<UserRecord>,
    /// Sessions are being drained: each close is held for the new process.
    draining: bool,
    /// When the drain's window ends (ms since the epoch).
    drain_ends_ms: u64,
}

impl Shard {
    /// Keeps what to call to stop accepting.
    pub(super) fn keep_stops(&self, stops: Vec<super::runtime::Stop>) {
        self.stops.borrow_mut().extend(stops);
    }

    /// Keeps how to accept again ([`Shard::relisten`]).
    pub fn keep_relisten(&self, f: Relisten) {
        *self.relisten.borrow_mut() = Some(f);
    }

    /// Accepts again, on the sockets handed back to the shards (the new process of an upgrade
    /// died after this process stopped accepting), and stops draining.
    pub fn relisten(self: &Rc<Self>) {
        self.cancel_handover();
        let relisten = self.relisten.borrow();
        let Some(f) = relisten.as_ref() else { return };
        match f(self) {
            Ok(stops) => {
                drop(relisten);
                self.keep_stops(stops);
            }
            Err(why) => tracing::error!(shard = self.ix(), why, "cannot accept again"),
        }
    }

    /// Stops every accept loop of this shard (idempotent). The listening sockets stay open in
    /// the process that took them over: connections waiting in them are not refused.
    pub fn stop_accepting(&self) {
        let stops = std::mem::take(&mut *self.stops.borrow_mut());
        for stop in stops {
            stop();
        }
    }

    /// Starts the hand-over: the records of every user here, and from now on each change
    /// after them through `deltas`.
    pub fn begin_handover(&self, deltas: flume::Sender<UserRecord>) -> Vec<UserRecord> {
        *self.handover.borrow_mut() = Some(Handover {
            deltas,
            draining: false,
            drain_ends_ms: 0,
        });
        self.registry.borrow().handover_records()
    }

    /// The hand-over was abandoned (the new process failed): back to normal.
    pub fn cancel_handover(&self) {
        *self.handover.borrow_mut() = None;
    }

    /// After a change to `user` here: its record, to the new process, while handing over.
    pub(super) fn forward_to_new(&self, user: &str) {
        let handover = self.handover.borrow();
        let Some(h) = handover.as_ref() else {
            return;
        };
        let rec = self
            .registry
            .borrow()
            .handover_record(user)
            .unwrap_or_else(|| UserRecord {
                user: user.to_owned(),
                seq: 0,
                last_seen: None,
                changed_at_ms: 0,
                sessions: Vec::new(),
                share: None,
            });
        if h.deltas.try_send(rec).is_err() {
            ShardMetrics::inc(&self.metrics.upgrade_records_dropped);
            tracing::warn!(
                user,
                "upgrade: a changed user's record could not be queued for the new process"
            );
        }
    }

    /// How a closing session's end is held ([`Hold`]): kicks, token expiry, evictions, abuse
    /// closes and panics are never held; a drain for an upgrade always is; otherwise the
    /// reconnect grace applies to a user's last visible session.
    pub(super) fn hold_for(&self, close: Option<CloseRequest>, now: u64) -> Hold {
        let code = close.map(|c| c.code);
        if matches!(code, Some(4001 | 4003 | 4008 | 4009 | 1011)) {
            return Hold::None;
        }
        let grace = self.cfg.offline_grace_ms;
        // Only the drain's own closes: a client that logs out meanwhile is not held for it.
        let drained = close.is_some_and(|c| c.code == DRAIN_CODE && c.reason == DRAIN_REASON);
        if let (true, Some(h)) = (
            drained,
            self.handover.borrow().as_ref().filter(|h| h.draining),
        ) {
            // Held here until the drain is over: the client is back on the new process by
            // then, and this process's watchers not yet drained must not see its user go
            // offline meanwhile.
            let wait = grace.max(self.cfg.upgrade.reattach_ms);
            return Hold::Always(now.max(h.drain_ends_ms) + wait);
        }
        if grace == 0 || self.stopping.get() {
            return Hold::None;
        }
        Hold::IfLast(now + grace)
    }

    /// Closes every session with 1001, spread evenly over `drain_ms`, oldest first; each is
    /// held for its client to reconnect to the new process. Returns once all are closed.
    pub async fn drain_for_upgrade(self: &Rc<Self>, drain_ms: u64) {
        if let Some(h) = self.handover.borrow_mut().as_mut() {
            h.draining = true;
            h.drain_ends_ms = now_ms() + drain_ms;
        }
        let mut sessions = self.all_sessions();
        sessions.sort_unstable_by_key(|s| s.id());
        let n = sessions.len() as u64;
        let start = std::time::Instant::now();
        let draining = || self.handover.borrow().as_ref().is_some_and(|h| h.draining);
        for (i, s) in sessions.into_iter().enumerate() {
            // The i-th of n closes at i/n of the window.
            let at = Duration::from_millis(drain_ms * i as u64 / n.max(1));
            if let Some(wait) = at.checked_sub(start.elapsed()) {
                glommio::timer::sleep(wait).await;
            }
            if !draining() {
                return; // called off: the new process died (see `ops::upgrade`)
            }
            self.drain_close(&s);
        }
        let deadline = start + Duration::from_millis(drain_ms + self.cfg.shutdown_deadline_ms);
        while self.session_count() > 0 && std::time::Instant::now() < deadline && draining() {
            // Sessions that were still in their handshake when the drain began.
            for s in self.all_sessions() {
                self.drain_close(&s);
            }
            glommio::timer::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Closes `s` for the drain (1001, held for the new process), unless it is closing anyway.
    fn drain_close(&self, s: &super::Session) {
        if !s.closing() {
            ShardMetrics::inc(&self.metrics.upgrade_drained);
            s.request_close(CloseRequest {
                code: DRAIN_CODE,
                reason: DRAIN_REASON,
                flush_ms: self.cfg.limits.close_flush_ms,
            });
        }
    }

    // --- The new process. ---

    /// Users handed over by the old process, before this shard accepts anyone.
    pub fn adopt(&self, records: &[UserRecord]) -> Result<(), RecordError> {
        let now = now_ms();
        let mut registry = self.registry.borrow_mut();
        for rec in records {
            registry.adopt(rec, now)?;
        }
        drop(registry);
        self.hand_to_bridge();
        Ok(())
    }

    /// A later record from the old process: published here if it changes what watchers see.
    pub fn update_from_old(&self, rec: &UserRecord) {
        let change = self.registry.borrow_mut().update_from_old(rec, now_ms());
        match change {
            Ok(Some(change)) => self.publish(change),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "upgrade: a record from the old process was refused")
            }
        }
        self.hand_to_bridge();
    }

    /// The old process is gone: what it still served is held for `reattach_ms` (or the grace,
    /// whichever is longer) and then let go.
    pub fn end_old(&self) {
        let wait = self.cfg.offline_grace_ms.max(self.cfg.upgrade.reattach_ms);
        let now = now_ms();
        self.registry.borrow_mut().end_old(now, now + wait);
    }

    /// A kick: the user's held sessions go at once (published), as its live ones are closed.
    /// Returns how many there were.
    pub fn drop_holds(&self, user: &str) -> usize {
        let (gone, change) = self.registry.borrow_mut().drop_holds(user, now_ms());
        if let Some(change) = change {
            self.publish(change);
        }
        self.hand_to_bridge();
        self.forward_to_new(user);
        gone
    }

    /// Held sessions past their deadline stop counting (the clock's tick).
    pub(super) fn expire_holds(&self, now: u64) {
        if self
            .registry
            .borrow()
            .next_hold_deadline()
            .is_none_or(|t| t > now)
        {
            return;
        }
        let changes = self.registry.borrow_mut().expire_holds(now);
        for change in changes {
            let user = change.state.user.clone();
            ShardMetrics::inc(&self.metrics.grace_expired);
            self.publish(change);
            self.forward_to_new(&user);
        }
        self.hand_to_bridge();
    }
}
