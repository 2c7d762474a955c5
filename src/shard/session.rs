//! The session layer: a session's life on its owner shard, with no socket in it.
//!
//! - [`Shard::open_session`] admits a connection (or says why not: [`Refusal`]) and registers
//!   it: registry, expiry, history/dashboard taps, the `welcome` reply.
//! - [`Shard::submit`] takes one decoded client message: the op budget, then [`Shard::apply`],
//!   which is the op's whole meaning. A panic inside is contained to the session (see
//!   [`Shard::submit`]).
//! - [`Shard::close_session`] ends it: subscriptions dropped, registry told, taps told.
//!   Idempotent, and called by the driver's drop guard too, so a session can never outlive its
//!   connection task.
//!
//! A refused connection never gets a [`Session`], so it cannot apply anything: there is no
//! half-admitted state to guard against.

use std::cell::{Cell, RefCell};
use std::net::IpAddr;
use std::num::NonZeroU64;
use std::panic::AssertUnwindSafe;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Waker;

use bytes::Bytes;

use super::budget::Budget;
use super::outbox::{Key, Outbox, Queued};
use super::subs::SubSet;
use super::tap::{SessionTap, Tap};
use super::{now_ms, Shard};
use crate::config::SessionPolicy;
use crate::metrics::ShardMetrics;
use crate::presence::{DeviceType, GroupId, SessionId, SessionInfo, Status, UserId};
use crate::protocol::ops::ErrorCode;
use crate::protocol::{events, RequestId};

/// Whether a subscription has received its snapshot yet. Live updates reach a session only once
/// its snapshot has, so a client always sees the snapshot first. `Pending` carries the attempt's
/// generation: only the snapshot answering this very attempt makes it live. (`NonZeroU64`: the
/// enum packs into 8 bytes; it sits in every subscription.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubState {
    Pending(NonZeroU64),
    Live,
}

/// A request to close: the code, a short reason, and how long the queued replies and events
/// may take to be written first (0: close at once).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CloseRequest {
    pub code: u16,
    pub reason: &'static str,
    pub flush_ms: u64,
}

impl CloseRequest {
    /// Close at once (kick, protocol violation, eviction).
    pub const fn now(code: u16, reason: &'static str) -> CloseRequest {
        CloseRequest {
            code,
            reason,
            flush_ms: 0,
        }
    }
}

/// Close code of a kicked session.
pub const KICK_CODE: u16 = 4003;
pub const KICK_REASON: &str = "kicked by admin";

/// What the edge learned about a connection before its upgrade: who, from where, on what.
#[derive(Debug, Clone)]
pub struct Admission {
    pub user: UserId,
    /// Token expiry, seconds since the epoch.
    pub expires_at: u64,
    pub device: Option<Arc<str>>,
    pub device_type: DeviceType,
    pub region: Option<Arc<str>>,
    pub groups: Vec<String>,
    pub roles: Vec<String>,
    pub ip: IpAddr,
    /// `Some(admin)`: a read-only impersonation of `user` by this admin (`/ws?as=`).
    pub observer: Option<Arc<str>>,
}

/// Why the owner shard will not open a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Answer the upgrade with this HTTP status instead (503: full, stopping, overloaded).
    Http(u16, &'static str),
    /// Complete the upgrade, then close with this code (4009: too many sessions).
    Close(u16, &'static str),
}

/// One session: the part of a connection the shard owns. The socket driver holds it and
/// moves bytes; everything it means lives here and in [`Shard`].
pub struct Session {
    pub(super) id: SessionId,
    pub(super) user: UserId,
    /// The admin behind a read-only impersonation; `None` for a device session.
    pub(super) observer: Option<Arc<str>>,
    pub(super) outbox: RefCell<Outbox>,
    waker: RefCell<Option<Waker>>,
    /// Set to close the connection at the next poll; the first request wins.
    close: Cell<Option<CloseRequest>>,
    /// Set once `close_session` ran.
    pub(super) closed: Cell<bool>,
    pub(super) watching: RefCell<SubSet<UserId, SubState>>,
    pub(super) watching_groups: RefCell<SubSet<GroupId, SubState>>,
    /// Token expiry (seconds since epoch); moved by `refresh`.
    pub(super) expires_at: Cell<u64>,
    /// The session's own status (for `activity` from invisible sessions).
    pub(super) status: Cell<Status>,
    /// When bytes last arrived from the client (ms since epoch), for liveness.
    last_rx_ms: Cell<u64>,
    pub(super) budget: RefCell<Budget>,
    /// Generation of the next subscription attempt.
    gens: Cell<u64>,
    /// Set by the heartbeat sweep: send a ping at the next poll (no queued frame needed).
    ping_due: Cell<bool>,
    /// Set by the heartbeat sweep: if still idle at the next poll, give buffers back.
    trim_due: Cell<bool>,
    metrics: Arc<ShardMetrics>,
}

impl Session {
    pub fn id(&self) -> SessionId {
        self.id
    }

    pub fn user(&self) -> &UserId {
        &self.user
    }

    /// Queues an event (coalescing by key when behind) and wakes the connection. A session on
    /// its way out takes no more events: what is queued is flushed, then the close goes.
    pub(super) fn push_event(&self, key: &Key, frame: Bytes) {
        if self.closing() {
            ShardMetrics::inc(&self.metrics.outbox_dropped);
            return;
        }
        let queued = self.outbox.borrow_mut().push_event(key, frame);
        self.count(queued);
    }

    /// Queues a subscription's snapshot: never dropped (see `Outbox::push_snapshot`).
    pub(super) fn push_snapshot(&self, key: &Key, frame: Bytes) {
        if self.closing() {
            return;
        }
        let queued = self.outbox.borrow_mut().push_snapshot(key, frame);
        self.count(queued);
    }

    fn count(&self, queued: Queued) {
        match queued {
            Queued::New => ShardMetrics::inc(&self.metrics.outbox_pending),
            Queued::Coalesced => ShardMetrics::inc(&self.metrics.coalesced),
            Queued::Dropped => ShardMetrics::inc(&self.metrics.outbox_dropped),
        }
        self.wake();
    }

    /// Queues a reply. A client that sends ops but never reads the answers is closed (4008).
    pub fn push_reply(&self, frame: Bytes) {
        if self.outbox.borrow_mut().push_reply(frame).is_err() {
            ShardMetrics::inc(&self.metrics.protocol_closes);
            self.request_close(CloseRequest::now(4008, "replies not read"));
        } else {
            ShardMetrics::inc(&self.metrics.outbox_pending);
        }
        self.wake();
    }

    /// An `error` reply.
    pub fn reply_error(&self, id: Option<&RequestId>, code: ErrorCode, msg: &str) {
        ShardMetrics::inc(&self.metrics.op_errors);
        self.push_reply(events::error(id, code, msg));
    }

    pub(super) fn cancel(&self, key: &Key) {
        let n = self.outbox.borrow_mut().cancel(key);
        ShardMetrics::sub(&self.metrics.outbox_pending, n as u64);
    }

    pub(super) fn cancel_where(&self, matches: impl FnMut(&Key) -> bool) {
        let n = self.outbox.borrow_mut().cancel_where(matches);
        ShardMetrics::sub(&self.metrics.outbox_pending, n as u64);
    }

    pub(super) fn next_gen(&self) -> NonZeroU64 {
        let g = self.gens.get() + 1;
        self.gens.set(g);
        NonZeroU64::new(g).expect("starts at 1 and only grows")
    }

    /// Asks the connection to close; the first request wins. Once asked, the session applies
    /// no more ops.
    pub fn request_close(&self, req: CloseRequest) {
        if self.close.get().is_none() {
            self.close.set(Some(req));
        }
        self.wake();
    }

    /// The close asked for, if any.
    pub fn close_request(&self) -> Option<CloseRequest> {
        self.close.get()
    }

    /// Whether a close has been requested (the connection is on its way out).
    pub fn closing(&self) -> bool {
        self.close.get().is_some()
    }

    /// The heartbeat: ping at the next poll, and give idle buffers back.
    pub(super) fn heartbeat(&self) {
        self.ping_due.set(true);
        self.trim_due.set(true);
        self.outbox.borrow_mut().release_if_idle();
        self.wake();
    }

    /// Frames waiting to be written.
    pub fn backlog(&self) -> usize {
        self.outbox.borrow().len()
    }

    // --- What the socket driver calls. ---

    /// The driver's waker, woken whenever there is something to write or a close to send.
    pub fn register_waker(&self, waker: &Waker) {
        let mut slot = self.waker.borrow_mut();
        if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *slot = Some(waker.clone());
        }
    }

    /// Bytes arrived from the client (liveness).
    pub fn touch(&self, now_ms: u64) {
        self.last_rx_ms.set(now_ms);
    }

    pub fn last_rx_ms(&self) -> u64 {
        self.last_rx_ms.get()
    }

    /// A heartbeat ping is due (once).
    pub fn take_ping_due(&self) -> bool {
        self.ping_due.take()
    }

    /// The heartbeat found the session idle: buffers may be given back (once).
    pub fn take_trim_due(&self) -> bool {
        self.trim_due.take()
    }

    /// Whether the socket is keeping up: only a session that is behind has its events merged.
    pub fn set_behind(&self, behind: bool) {
        self.outbox.borrow_mut().set_behind(behind);
    }

    /// Moves queued frames into `out` until it holds `max` bytes. Returns the frames moved and
    /// how many of them were events (deliveries).
    pub fn fill(&self, out: &mut Vec<u8>, max: usize) -> (u64, u64) {
        let mut outbox = self.outbox.borrow_mut();
        let (mut popped, mut delivered) = (0, 0);
        while out.len() < max {
            let Some((frame, event)) = outbox.pop() else {
                break;
            };
            out.extend_from_slice(&frame);
            delivered += u64::from(event);
            popped += 1;
        }
        ShardMetrics::sub(&self.metrics.outbox_pending, popped);
        ShardMetrics::add(&self.metrics.deliveries, delivered);
        (popped, delivered)
    }

    fn wake(&self) {
        if let Some(w) = self.waker.borrow().as_ref() {
            w.wake_by_ref();
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        ShardMetrics::sub(
            &self.metrics.outbox_pending,
            self.outbox.get_mut().len() as u64,
        );
    }
}

/// The claim's ids as a shared slice; the common empty case reuses one per-shard allocation.
fn shared_or_new<T: for<'a> From<&'a str>>(ids: &[String], empty: &Arc<[T]>) -> Arc<[T]> {
    if ids.is_empty() {
        empty.clone()
    } else {
        ids.iter().map(|g| T::from(g.as_str())).collect()
    }
}

impl Shard {
    /// Admits a connection and opens its session, or says why not. On success the `welcome`
    /// is queued and the user's watchers have been told.
    pub fn open_session(self: &Rc<Self>, a: Admission) -> Result<Rc<Session>, Refusal> {
        if self.stopping.get() {
            return Err(Refusal::Http(503, "server shutting down"));
        }
        if self.sessions.borrow().len() >= self.cfg.limits.max_connections_per_shard {
            return Err(Refusal::Http(503, "server full"));
        }
        if a.observer.is_none() && !self.apply_session_limit(&a.user) {
            return Err(Refusal::Close(4009, "too many sessions for this user"));
        }
        let now = now_ms();
        let id = self.next_session_id();
        let limits = &self.cfg.limits;
        let session = Rc::new(Session {
            id,
            user: a.user.clone(),
            observer: a.observer.clone(),
            outbox: RefCell::new(Outbox::new(
                limits.max_pending_replies,
                limits.max_pending_events,
                limits.coalesce_after_bytes,
            )),
            waker: RefCell::new(None),
            close: Cell::new(None),
            closed: Cell::new(false),
            watching: RefCell::new(SubSet::default()),
            watching_groups: RefCell::new(SubSet::default()),
            expires_at: Cell::new(a.expires_at),
            status: Cell::new(Status::Online),
            last_rx_ms: Cell::new(now),
            budget: RefCell::new(Budget::new(limits.ops_per_second, now)),
            gens: Cell::new(0),
            ping_due: Cell::new(false),
            trim_due: Cell::new(false),
            metrics: self.metrics.clone(),
        });
        let hex = id.to_string();
        let (user, observer) = (a.user.clone(), a.observer.clone());
        self.sessions.borrow_mut().insert(id, session.clone());
        self.expiries.borrow_mut().insert((a.expires_at, id));
        ShardMetrics::inc(&self.metrics.connections);
        // From here on the session is known to the shard: a panic while registering it is
        // repaired like one in an op (the session closed, its user's entry rebuilt), never
        // left half-registered.
        let registered =
            std::panic::catch_unwind(AssertUnwindSafe(|| self.register(&session, a, now)));
        let Ok(resumed) = registered else {
            self.repair_after_panic(&session);
            return Err(Refusal::Http(503, "internal error"));
        };
        // After registering (nothing reaches a session that watches nothing yet, so it is
        // still the first frame): a session that re-attached to a held one is told the status
        // it goes on with.
        let resumed = resumed.as_ref().map(|(status, text)| {
            (
                crate::presence::handover::status_name(*status),
                text.as_deref(),
            )
        });
        session.push_reply(events::welcome(
            &hex,
            &user,
            usize::from(self.ix),
            self.shared.cpus[usize::from(self.ix)],
            self.cfg.heartbeat_ms,
            observer.as_deref(),
            resumed,
        ));
        ShardMetrics::inc(&self.metrics.handshakes_ok);
        Ok(session)
    }

    /// The second half of [`Shard::open_session`]: the observer list, or the registry (and the
    /// taps, and the user's watchers). Returns the status and text a session that re-attached
    /// to a held one goes on with.
    fn register(
        &self,
        session: &Session,
        a: Admission,
        now: u64,
    ) -> Option<(Status, Option<Arc<str>>)> {
        let id = session.id;
        #[cfg(feature = "fault-injection")]
        assert!(
            a.device.as_deref() != Some(super::faults::PANIC_IN_OPEN),
            "fault injection: panic while opening a session"
        );
        if let Some(admin) = &a.observer {
            self.observers
                .borrow_mut()
                .entry_ref(&a.user)
                .or_default()
                .push(id);
            ShardMetrics::inc(&self.metrics.impersonations);
            tracing::info!(target: "presenced::audit", admin = %admin, user = %a.user,
                session = %id, peer = %a.ip, "impersonation started");
            return None;
        }
        let info = SessionInfo {
            device: a.device,
            device_type: a.device_type,
            region: a.region,
            groups: shared_or_new(&a.groups, &self.no_groups),
            roles: shared_or_new(&a.roles, &self.no_roles),
            ip: a.ip,
            connected_at_ms: now,
        };
        self.tap(&Tap::SessionStart(SessionTap {
            user: &a.user,
            session: id,
            info: &info,
            now,
        }));
        let held = self.registry.borrow().held_count();
        let change = self
            .registry
            .borrow_mut()
            .connect(&a.user, id, Status::Online, info, now);
        let reattached = self.registry.borrow().held_count() < held;
        // Re-attached to a held session: it goes on with that session's status.
        let mut resumed = None;
        if let Some(s) = self
            .registry
            .borrow()
            .sessions(&a.user)
            .iter()
            .find(|s| s.id == id)
        {
            session.status.set(s.status);
            if reattached {
                ShardMetrics::inc(&self.metrics.reattached);
                resumed = Some((s.status, s.text.clone()));
            }
        }
        if let Some(change) = change {
            self.publish(change);
        }
        self.hand_to_bridge();
        self.forward_to_new(&a.user);
        tracing::debug!(session = %id, user = %a.user, peer = %a.ip, "session open");
        resumed
    }

    /// `max_sessions_per_user` for a new session of `user`: false to refuse it (reject_new);
    /// with evict_oldest, asks the oldest sessions to close and admits it.
    fn apply_session_limit(&self, user: &str) -> bool {
        let limits = &self.cfg.limits;
        let max = limits.max_sessions_per_user;
        let mut ids = self.registry.borrow().session_ids(user);
        // Sessions already on their way out (evicted, kicked, expired) do not count.
        let sessions = self.sessions.borrow();
        ids.retain(|id| sessions.get(id).is_some_and(|s| !s.closing()));
        if max == 0 || ids.len() < max {
            return true;
        }
        if limits.session_policy == SessionPolicy::RejectNew {
            ShardMetrics::inc(&self.metrics.session_limit_closes);
            return false;
        }
        // Ids grow per shard and all of a user's sessions are on this shard: smallest = oldest.
        ids.sort_unstable();
        for id in &ids[..=ids.len() - max] {
            if let Some(s) = sessions.get(id) {
                ShardMetrics::inc(&self.metrics.session_limit_closes);
                s.request_close(CloseRequest::now(
                    4009,
                    "session evicted: too many sessions for this user",
                ));
            }
        }
        true
    }

    /// Ends a session: subscriptions dropped, registry and taps told. Idempotent.
    pub fn close_session(&self, session: &Session) {
        if session.closed.replace(true) {
            return;
        }
        let id = session.id;
        self.sessions.borrow_mut().remove(&id);
        self.expiries
            .borrow_mut()
            .remove(&(session.expires_at.get(), id));
        // Every subscription goes, in one pass each (taken whole, not removed one by one).
        let users = std::mem::take(&mut *session.watching.borrow_mut());
        for (user, state) in users {
            self.drop_user_sub(session, &user, state);
        }
        let groups = std::mem::take(&mut *session.watching_groups.borrow_mut());
        for (group, state) in groups {
            self.drop_group_sub(session, &group, state);
        }
        ShardMetrics::sub(&self.metrics.connections, 1);
        if let Some(admin) = &session.observer {
            super::remove_sub(&mut self.observers.borrow_mut(), &session.user, id);
            tracing::info!(target: "presenced::audit", admin = %admin, user = %session.user,
                session = %id, "impersonation ended");
            return;
        }
        let now = now_ms();
        // The session's facts, copied out (cheap: `Arc`s) so no registry borrow is held while
        // the taps run.
        let info = self
            .registry
            .borrow()
            .sessions(&session.user)
            .iter()
            .find(|s| s.id == id)
            .map(|s| s.info.clone());
        if let Some(info) = info {
            self.tap(&Tap::SessionEnd(SessionTap {
                user: &session.user,
                session: id,
                info: &info,
                now,
            }));
        }
        let hold = self.hold_for(session.close_request(), now);
        let change = self
            .registry
            .borrow_mut()
            .disconnect(&session.user, id, hold, now);
        if let Some(change) = change {
            self.publish(change);
        }
        self.hand_to_bridge();
        self.forward_to_new(&session.user);
        if self.registry.borrow().sessions(&session.user).is_empty() {
            self.subscriptions.borrow_mut().release(&session.user, now);
        }
        tracing::debug!(session = %id, user = %session.user, "session closed");
    }

    /// After a panic while applying one of `session`'s ops. The op may have stopped half-way
    /// through a change to shared state, so instead of trusting it:
    /// - the session is closed (1011) and forgotten everywhere its id could be (subscription
    ///   lists, observers, expiries): O(subscriptions on this shard);
    /// - its user's registry entry is rebuilt from its sessions and the shard's counters are
    ///   recounted: O(users on this shard);
    /// - the user's rebuilt state is published with a new `seq` to every watcher, so a
    ///   fan-out the panic cut short is completed.
    ///
    /// What it costs is documented in docs/ARCHITECTURE.md ("What a panic costs").
    pub(super) fn repair_after_panic(&self, session: &Session) {
        ShardMetrics::inc(&self.metrics.conn_panics);
        tracing::error!(session = %session.id, user = %session.user,
            "panic while applying an op: closing the session and rebuilding the state it touched");
        session.request_close(CloseRequest::now(1011, "internal error"));
        self.close_session(session);
        let id = session.id;
        let forget = |list: &mut Vec<SessionId>| {
            list.retain(|s| *s != id);
            !list.is_empty()
        };
        self.user_subs.borrow_mut().retain(|_, l| forget(l));
        self.group_subs.borrow_mut().retain(|_, l| forget(l));
        self.observers.borrow_mut().retain(|_, l| forget(l));
        self.expiries.borrow_mut().retain(|(_, s)| *s != id);
        let change = self
            .registry
            .borrow_mut()
            .rebuild(&session.user, id, now_ms());
        if let Some(change) = change {
            self.publish(change);
        }
        self.hand_to_bridge();
        self.forward_to_new(&session.user);
    }
}
