//! Serving one WebSocket connection on the shard that owns its user, for its whole life.
//!
//! One task per connection, driven by a single hand-written poll loop: read whatever the socket
//! has, decode frames, handle ops, then write whatever the outbox holds. Deliveries from the
//! shard go into the connection's [`Outbox`] and wake the task; nothing else is allocated per
//! connection, and an idle connection holds no read or write buffer.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::net::SocketAddr;
use std::num::NonZeroU64;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::net::TcpStream;

use super::http;
use super::outbox::{Key, Outbox, Queued};
use super::ratelimit::{OpLimiter, OpVerdict};
use super::subs::SubSet;
use super::tls::Tls;
use crate::auth::Claims;
use crate::config::SessionPolicy;
use crate::history::{EventKind, HistoryEvent};
use crate::metrics::ShardMetrics;
use crate::presence::{DeviceType, SessionId, SessionInfo, Status, UserId};
use crate::protocol::ops::{self, ErrorCode, Op, Request};
use crate::protocol::ws::{self, Decoder, Inbound};
use crate::protocol::{events, RequestId};
use crate::shard::{now_ms, Shard};

/// Whether a subscription has received its snapshot yet. Live updates reach a connection only
/// once its snapshot has, so a client always sees the snapshot first. `Pending` carries the
/// attempt's generation: only the snapshot answering this very attempt makes it live.
/// (`NonZeroU64`: the enum packs into 8 bytes; it sits in every subscription.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubState {
    Pending(NonZeroU64),
    Live,
}

/// A request to close: the code, a short reason, and whether to flush queued frames first
/// (graceful shutdown) or close at once (kick, violation, eviction).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CloseRequest {
    pub code: u16,
    pub reason: &'static str,
    pub flush: bool,
}

/// The part of a connection the shard reaches: its outbox, its subscriptions, and a way to wake
/// or close it.
pub struct ConnHandle {
    pub id: SessionId,
    pub user: UserId,
    outbox: RefCell<Outbox>,
    waker: RefCell<Option<Waker>>,
    /// Set to close the connection at the next poll; the first request wins.
    close: Cell<Option<CloseRequest>>,
    pub watching: RefCell<SubSet<SubState>>,
    pub watching_groups: RefCell<SubSet<SubState>>,
    /// Token expiry (seconds since epoch); moved by `refresh`.
    pub expires_at: Cell<u64>,
    /// The session's own status (for `activity` from invisible sessions).
    pub status: Cell<Status>,
    /// When bytes last arrived from the client (ms since epoch), for liveness.
    pub last_rx_ms: Cell<u64>,
    limiter: RefCell<OpLimiter>,
    /// Generation of the next subscription attempt.
    gens: Cell<u64>,
    /// Set by the heartbeat sweep: send a ping at the next poll (no queued frame needed).
    ping_due: Cell<bool>,
    /// Set by the heartbeat sweep: if still idle at the next poll, give buffers back.
    trim_due: Cell<bool>,
    /// An admin impersonating `user`: no session, no status, no ops that change anything.
    pub read_only: bool,
    metrics: Arc<ShardMetrics>,
}

impl ConnHandle {
    fn new(id: SessionId, user: UserId, expires_at: u64, shard: &Shard, now: u64) -> ConnHandle {
        ConnHandle {
            id,
            user,
            outbox: RefCell::new(Outbox::new(
                shard.cfg.limits.max_pending_replies,
                shard.cfg.limits.max_pending_events,
            )),
            waker: RefCell::new(None),
            close: Cell::new(None),
            watching: RefCell::new(SubSet::default()),
            watching_groups: RefCell::new(SubSet::default()),
            expires_at: Cell::new(expires_at),
            status: Cell::new(Status::Online),
            last_rx_ms: Cell::new(now),
            limiter: RefCell::new(OpLimiter::new(shard.cfg.limits.ops_per_second, now)),
            gens: Cell::new(0),
            ping_due: Cell::new(false),
            trim_due: Cell::new(false),
            read_only: false,
            metrics: shard.metrics.clone(),
        }
    }

    /// Queues an event (coalescing by key) and wakes the connection.
    pub fn push_event(&self, key: Key, frame: Bytes, metrics: &ShardMetrics) {
        match self.outbox.borrow_mut().push_event(key, frame) {
            Queued::New => ShardMetrics::inc(&metrics.outbox_pending),
            Queued::Coalesced => ShardMetrics::inc(&metrics.coalesced),
            Queued::Dropped => ShardMetrics::inc(&metrics.outbox_dropped),
        }
        self.wake();
    }

    /// Queues a reply. A client that sends ops but never reads the answers is closed (4008).
    pub fn push_reply(&self, frame: Bytes) {
        if self.outbox.borrow_mut().push_reply(frame).is_err() {
            self.request_close(4008, "replies not read");
        } else {
            ShardMetrics::inc(&self.metrics.outbox_pending);
        }
        self.wake();
    }

    pub fn cancel(&self, key: &Key) {
        if self.outbox.borrow_mut().cancel(key) {
            ShardMetrics::sub(&self.metrics.outbox_pending, 1);
        }
    }

    pub fn cancel_where(&self, matches: impl FnMut(&Key) -> bool) {
        let n = self.outbox.borrow_mut().cancel_where(matches);
        ShardMetrics::sub(&self.metrics.outbox_pending, n as u64);
    }

    /// A fresh generation for a subscription attempt.
    pub fn next_gen(&self) -> NonZeroU64 {
        let g = self.gens.get() + 1;
        self.gens.set(g);
        NonZeroU64::new(g).expect("starts at 1 and only grows")
    }

    /// Asks the connection to close at once with `code`; the first request wins.
    pub fn request_close(&self, code: u16, reason: &'static str) {
        self.close_with(CloseRequest {
            code,
            reason,
            flush: false,
        });
    }

    /// Whether a close has been requested (the connection is on its way out).
    pub fn closing(&self) -> bool {
        self.close.get().is_some()
    }

    pub fn close_with(&self, req: CloseRequest) {
        if self.close.get().is_none() {
            self.close.set(Some(req));
        }
        self.wake();
    }

    /// The heartbeat: ping at the next poll, and give idle buffers back.
    pub fn heartbeat(&self) {
        self.ping_due.set(true);
        self.trim_due.set(true);
        self.outbox.borrow_mut().release_if_idle();
        self.wake();
    }

    /// Frames waiting to be written.
    pub fn backlog(&self) -> usize {
        self.outbox.borrow().len()
    }

    fn wake(&self) {
        if let Some(w) = self.waker.borrow().as_ref() {
            w.wake_by_ref();
        }
    }
}

impl Drop for ConnHandle {
    fn drop(&mut self) {
        ShardMetrics::sub(
            &self.metrics.outbox_pending,
            self.outbox.get_mut().len() as u64,
        );
    }
}

/// An authenticated, upgraded-to-be socket arriving at its owner shard.
pub struct Setup {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub claims: Claims,
    pub key: String,
    pub device: Option<String>,
    pub device_type: DeviceType,
    pub early: Vec<u8>,
    /// Boxed: rustls's session is over a kilobyte, and plain connections should not pay for it.
    pub tls: Option<Box<Tls>>,
    /// An admin's read-only view of this user (`/ws?as=`).
    pub as_user: Option<String>,
}

/// Bytes read per `read` call (a stack buffer; the decoder copies what it keeps).
const READ_CHUNK: usize = 4096;
/// Bytes gathered from the outbox into one write.
const WRITE_BATCH: usize = 64 * 1024;
/// Write-buffer capacity kept between writes (a few events); a burst's larger buffer is freed.
const WBUF_KEEP: usize = 1024;
/// Read/write rounds per poll before yielding, so one busy connection cannot starve the shard.
const ROUNDS_PER_POLL: usize = 16;
/// How long a closed connection waits for the peer's close before dropping the socket.
const LINGER: Duration = Duration::from_secs(2);

struct Io {
    stream: TcpStream,
    decoder: Decoder,
    wbuf: Vec<u8>,
    wpos: usize,
    close_sent: bool,
    /// Armed once a close is requested: a client that does not read cannot hold its session
    /// (and the close) open past it. Only closing connections have a timer.
    close_deadline: Option<glommio::timer::Timer>,
    /// TLS session: bytes read are decrypted into the decoder, frames are encrypted into `wbuf`.
    tls: Option<Box<Tls>>,
}

impl Io {
    /// Appends outgoing plaintext to the write buffer (encrypted when over TLS).
    fn put(&mut self, plain: &[u8]) {
        match &mut self.tls {
            None => self.wbuf.extend_from_slice(plain),
            Some(tls) => {
                tls.write(plain);
                tls.drain(&mut self.wbuf);
            }
        }
    }
}

/// The claim's ids as a shared slice; the common empty case reuses one per-shard allocation.
fn shared_or_new(ids: &[String], empty: &Arc<[Arc<str>]>) -> Arc<[Arc<str>]> {
    if ids.is_empty() {
        empty.clone()
    } else {
        ids.iter().map(|g| Arc::from(g.as_str())).collect()
    }
}

/// Why the owner shard refuses a connection before answering its upgrade.
fn admission(shard: &Shard) -> Result<(), (u16, &'static str)> {
    if shard.stopping.get() {
        return Err((503, "server shutting down"));
    }
    if shard.conns.borrow().len() >= shard.cfg.limits.max_connections_per_shard {
        return Err((503, "server full"));
    }
    Ok(())
}

/// Applies `max_sessions_per_user` to a new session of `user`. False: refuse the new one.
fn session_limit(shard: &Shard, user: &str) -> bool {
    let limits = &shard.cfg.limits;
    let max = limits.max_sessions_per_user;
    let mut ids = shard.registry.borrow().session_ids(user);
    if max == 0 || ids.len() < max {
        return true;
    }
    if limits.session_policy == SessionPolicy::RejectNew {
        ShardMetrics::inc(&shard.metrics.session_limit_closes);
        return false;
    }
    // Ids grow per shard and all of a user's sessions are on this shard: smallest = oldest.
    ids.sort_unstable();
    let conns = shard.conns.borrow();
    for id in &ids[..=ids.len() - max] {
        if let Some(c) = conns.get(id) {
            ShardMetrics::inc(&shard.metrics.session_limit_closes);
            c.request_close(4009, "session evicted: too many sessions for this user");
        }
    }
    true
}

/// Takes an upgraded-to-be connection on its owner shard: admits it (or answers 503), registers
/// the session and spawns its task. Synchronous, so the set-up state (claims, key, early bytes)
/// is gone before the long-lived task starts: the task holds only what a live connection needs.
pub fn start(shard: Rc<Shard>, mut setup: Setup) {
    if let Err((status, reason)) = admission(&shard) {
        ShardMetrics::inc(&shard.metrics.handshakes_unavailable);
        glommio::spawn_local(async move {
            reject(&mut setup.stream, setup.tls.as_deref_mut(), status, reason).await;
        })
        .detach();
        return;
    }
    let now = now_ms();
    let id = shard.next_session_id();
    let read_only = setup.as_user.is_some();
    let user: UserId = setup.as_user.as_deref().unwrap_or(&setup.claims.sub).into();
    let mut handle = ConnHandle::new(id, user.clone(), setup.claims.exp, &shard, now);
    handle.read_only = read_only;
    let conn = Rc::new(handle);
    let limits = &shard.cfg.limits;
    let mut io = Io {
        stream: setup.stream,
        decoder: Decoder::new(limits.max_message_bytes, limits.max_frame_bytes),
        wbuf: Vec::new(),
        wpos: 0,
        close_sent: false,
        close_deadline: None,
        tls: setup.tls,
    };
    let _ = io.stream.set_nodelay(true); // events are small and latency is the product
    io.put(&http::switching_protocols(&setup.key));
    ShardMetrics::inc(&shard.metrics.handshakes_ok);
    if read_only {
        observe(&shard, &conn, setup.claims, setup.peer);
        io.decoder.feed(&setup.early);
        decode_all(&shard, &conn, &mut io.decoder);
        glommio::spawn_local(live(shard, conn, io, true)).detach();
        return;
    }
    let admitted = session_limit(&shard, &user);
    if admitted {
        let session = format!("{id:x}");
        conn.push_reply(events::welcome(
            &session,
            &user,
            usize::from(shard.ix),
            shard.cpu,
            shard.cfg.heartbeat_ms,
            None,
        ));
        let claims = setup.claims;
        let info = SessionInfo {
            device: setup.device.map(Into::into),
            device_type: setup.device_type,
            region: claims.region.map(Into::into),
            groups: shared_or_new(&claims.groups, &shard.no_groups),
            roles: shared_or_new(&claims.roles, &shard.no_groups),
            ip: setup.peer.ip(),
            connected_at_ms: now,
        };
        if shard.history.enabled() {
            let mut e = HistoryEvent::new(now, user.clone(), EventKind::SessionStart);
            e.session = id;
            e.started_at = now;
            e.device = info.device.clone();
            e.device_type = Some(info.device_type);
            e.region = info.region.clone();
            e.groups = info.groups.clone();
            shard.history.event(e);
        }
        shard.conns.borrow_mut().insert(id, conn.clone());
        shard.expiries.borrow_mut().insert((claims.exp, id));
        ShardMetrics::inc(&shard.metrics.connections);
        let change = shard
            .registry
            .borrow_mut()
            .connect(&user, id, Status::Online, info, now);
        if let Some(change) = change {
            shard.publish(change);
        }
        tracing::debug!(session = %session, user = %user, peer = %setup.peer, "session open");
        // Frames the client sent along with its upgrade request are handled before anything.
        io.decoder.feed(&setup.early);
        decode_all(&shard, &conn, &mut io.decoder);
    } else {
        conn.request_close(4009, "too many sessions for this user");
    }
    glommio::spawn_local(live(shard, conn, io, admitted)).detach();
}

/// Opens an admin's read-only view of `conn.user`: a connection that receives what that user's
/// sessions receive and subscribes as the admin asks, but is no session (no status, no device,
/// no session limit). Audited with both identities.
fn observe(shard: &Rc<Shard>, conn: &Rc<ConnHandle>, claims: Claims, peer: SocketAddr) {
    let session = format!("{:x}", conn.id);
    conn.push_reply(events::welcome(
        &session,
        &conn.user,
        usize::from(shard.ix),
        shard.cpu,
        shard.cfg.heartbeat_ms,
        Some(&claims.sub),
    ));
    shard.conns.borrow_mut().insert(conn.id, conn.clone());
    shard.expiries.borrow_mut().insert((claims.exp, conn.id));
    shard.add_observer(&conn.user, conn.id, &claims.sub);
    ShardMetrics::inc(&shard.metrics.connections);
    ShardMetrics::inc(&shard.metrics.impersonations);
    tracing::info!(target: "presenced::audit", admin = %claims.sub, user = %conn.user,
        session = %session, peer = %peer, "impersonation started");
}

/// The connection's task for its whole life: drive it until it closes, then end the session
/// and hand the socket to a short linger task. A plain struct rather than an `async fn`, which
/// would store `io` twice (as argument and as local): this is what every live connection costs.
struct Live {
    shard: Rc<Shard>,
    conn: Rc<ConnHandle>,
    /// Taken when the connection ends (the socket moves to a linger task).
    io: Option<Io>,
    admitted: bool,
}

impl Future for Live {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let io = this
            .io
            .as_mut()
            .expect("a finished connection is not polled again");
        let clean = match drive(&this.shard, &this.conn, io, cx) {
            Poll::Ready(clean) => clean,
            Poll::Pending => return Poll::Pending,
        };
        // The session ends now, not after the linger: subscribers learn at once.
        if this.admitted {
            end_session(&this.shard, &this.conn);
        }
        let io = this.io.take().expect("taken once, just above");
        if clean {
            // Its own short-lived task: the linger state (a drain buffer, a timer) never
            // enlarges a live connection, and everything else of this one is freed now.
            let mut stream = io.stream;
            glommio::spawn_local(async move { linger(&mut stream).await }).detach();
        }
        Poll::Ready(())
    }
}

fn live(shard: Rc<Shard>, conn: Rc<ConnHandle>, io: Io, admitted: bool) -> Live {
    Live {
        shard,
        conn,
        io: Some(io),
        admitted,
    }
}

/// Ends a session: out of the registry (subscribers told), out of history's open sessions.
pub(crate) fn end_session(shard: &Shard, conn: &ConnHandle) {
    let id = conn.id;
    shard.conns.borrow_mut().remove(&id);
    shard
        .expiries
        .borrow_mut()
        .remove(&(conn.expires_at.get(), id));
    shard.unwatch_all(conn);
    if conn.read_only {
        let admin = shard.remove_observer(&conn.user, id).unwrap_or_default();
        ShardMetrics::sub(&shard.metrics.connections, 1);
        tracing::info!(target: "presenced::audit", admin = %admin, user = %conn.user,
            session = %format_args!("{id:x}"), "impersonation ended");
        return;
    }
    let now = now_ms();
    if shard.history.enabled() {
        let registry = shard.registry.borrow();
        if let Some(s) = registry.sessions(&conn.user).iter().find(|s| s.id == id) {
            let mut e = HistoryEvent::new(now, conn.user.clone(), EventKind::SessionEnd);
            e.session = id;
            e.started_at = s.info.connected_at_ms;
            e.device = s.info.device.clone();
            e.device_type = Some(s.info.device_type);
            e.region = s.info.region.clone();
            e.groups = s.info.groups.clone();
            shard.history.event(e);
        }
    }
    let change = shard.registry.borrow_mut().disconnect(&conn.user, id, now);
    if let Some(change) = change {
        shard.publish(change);
    }
    ShardMetrics::sub(&shard.metrics.connections, 1);
    tracing::debug!(session = %format_args!("{id:x}"), user = %conn.user, "session closed");
}

/// After our close frame: stop sending, let the peer's close (or EOF) arrive so the kernel does
/// not reset the connection under the frame we just sent.
async fn linger(stream: &mut TcpStream) {
    let _ = stream.close().await; // shutdown(Write)
    let drain = async {
        let mut sink = [0u8; 512];
        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
    };
    let _ = glommio::timer::timeout(LINGER, async {
        drain.await;
        Ok(())
    })
    .await;
}

/// One poll of the connection. `Ready(true)`: we sent a close frame (linger); `Ready(false)`:
/// the peer went away or the socket failed.
fn drive(shard: &Shard, conn: &ConnHandle, io: &mut Io, cx: &mut Context<'_>) -> Poll<bool> {
    {
        let mut slot = conn.waker.borrow_mut();
        if !slot.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            *slot = Some(cx.waker().clone());
        }
    }
    if let Some(req) = conn.close.get() {
        let timer = io.close_deadline.get_or_insert_with(|| {
            let wait = if req.flush {
                Duration::from_millis(shard.cfg.shutdown_deadline_ms)
            } else {
                LINGER
            };
            glommio::timer::Timer::new(wait)
        });
        if Pin::new(timer).poll(cx).is_ready() {
            return Poll::Ready(false); // the peer would not take the close: drop it
        }
    }
    if conn.trim_due.take() && io.wpos == io.wbuf.len() {
        io.wbuf = Vec::new(); // idle since the last heartbeat: hold no write buffer
        io.wpos = 0;
        io.decoder.release_if_idle();
    }
    if conn.ping_due.take() && !io.close_sent {
        io.put(&ws::ping_frame(b""));
    }
    for _ in 0..ROUNDS_PER_POLL {
        let mut progress = false;
        if !io.close_sent {
            let mut chunk = [0u8; READ_CHUNK];
            match Pin::new(&mut io.stream).poll_read(cx, &mut chunk) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(false),
                Poll::Ready(Ok(n)) => {
                    conn.last_rx_ms.set(now_ms());
                    progress = true;
                    match &mut io.tls {
                        None => io.decoder.feed(&chunk[..n]),
                        Some(tls) => {
                            let decoder = &mut io.decoder;
                            let read = tls.read(&chunk[..n], &mut |p| decoder.feed(p));
                            tls.drain(&mut io.wbuf); // handshake and alert records
                            if !matches!(read, Ok(true)) {
                                return Poll::Ready(false); // TLS error or close_notify
                            }
                        }
                    }
                    decode_all(shard, conn, &mut io.decoder);
                }
                Poll::Pending => {}
            }
        }
        if !io.close_sent {
            let drained = io.wpos == io.wbuf.len();
            match conn.close.get() {
                // Close at once, or (graceful shutdown) once everything queued is written.
                Some(req) if !req.flush || (drained && conn.backlog() == 0) => {
                    io.put(&ws::close_frame(req.code, req.reason));
                    if let Some(tls) = &mut io.tls {
                        tls.close();
                        tls.drain(&mut io.wbuf);
                    }
                    io.close_sent = true;
                }
                _ if drained => fill(shard, conn, io),
                _ => {}
            }
        }
        if io.wpos < io.wbuf.len() {
            match Pin::new(&mut io.stream).poll_write(cx, &io.wbuf[io.wpos..]) {
                Poll::Ready(Ok(n)) if n > 0 => {
                    io.wpos += n;
                    progress = true;
                }
                Poll::Ready(_) => return Poll::Ready(false),
                Poll::Pending => {}
            }
        }
        if io.close_sent && io.wpos == io.wbuf.len() {
            return Poll::Ready(true);
        }
        if !progress {
            return Poll::Pending;
        }
    }
    cx.waker().wake_by_ref(); // yield: more to do, but let other connections run first
    Poll::Pending
}

/// Moves frames from the outbox into the (empty) write buffer, up to [`WRITE_BATCH`] bytes.
fn fill(shard: &Shard, conn: &ConnHandle, io: &mut Io) {
    io.wbuf.clear();
    io.wpos = 0;
    if io.wbuf.capacity() > WBUF_KEEP {
        io.wbuf = Vec::new(); // a burst went out; steady traffic needs far less
    }
    let mut outbox = conn.outbox.borrow_mut();
    let (mut delivered, mut popped) = (0, 0);
    // Over TLS, frames are gathered as plaintext and encrypted in one go.
    let mut plain = Vec::new();
    let gather = if io.tls.is_some() {
        &mut plain
    } else {
        &mut io.wbuf
    };
    while gather.len() < WRITE_BATCH {
        let Some((frame, event)) = outbox.pop() else {
            break;
        };
        gather.extend_from_slice(&frame);
        delivered += u64::from(event);
        popped += 1;
    }
    if !plain.is_empty() {
        io.put(&plain);
    }
    ShardMetrics::sub(&shard.metrics.outbox_pending, popped);

    ShardMetrics::add(&shard.metrics.deliveries, delivered);
}

fn decode_all(shard: &Shard, conn: &ConnHandle, decoder: &mut Decoder) {
    loop {
        match decoder.decode() {
            Ok(Some(item)) => {
                let close = matches!(item, Inbound::Close(_));
                let handled =
                    std::panic::catch_unwind(AssertUnwindSafe(|| on_inbound(shard, conn, item)));
                if handled.is_err() {
                    // Only this connection is affected; the shard's state is per-user and the
                    // op either completed or did not start its mesh sends.
                    ShardMetrics::inc(&shard.metrics.conn_panics);
                    conn.request_close(1011, "internal error");
                    return;
                }
                if close {
                    return; // nothing after a close frame is read
                }
            }
            Ok(None) => return,
            Err(e) => {
                ShardMetrics::inc(&shard.metrics.protocol_closes);
                let reason = match e.close_code() {
                    1009 => "message too big",
                    1007 => "invalid UTF-8",
                    _ => "protocol error",
                };
                conn.request_close(e.close_code(), reason);
                return;
            }
        }
    }
}

fn on_inbound(shard: &Shard, conn: &ConnHandle, item: Inbound) {
    match item {
        Inbound::Text(bytes) => {
            ShardMetrics::inc(&shard.metrics.ops);
            let text = std::str::from_utf8(&bytes).expect("the decoder validated UTF-8");
            // Parsed before the rate check so a refusal can echo the op's id (parsing is bounded
            // by max_message_bytes).
            let parsed = ops::parse(text, &shard.op_limits);
            let verdict = conn
                .limiter
                .borrow_mut()
                .check(shard.cfg.limits.ops_per_second, now_ms());
            match verdict {
                OpVerdict::Allow => match parsed {
                    Ok(req) => handle_op(shard, conn, req),
                    Err(e) => {
                        ShardMetrics::inc(&shard.metrics.ops_invalid);
                        error(shard, conn, e.id.as_ref(), e.code, &e.message)
                    }
                },
                OpVerdict::Limited => {
                    ShardMetrics::inc(&shard.metrics.ops_rate_limited);
                    let id = match &parsed {
                        Ok(req) => req.id.as_ref(),
                        Err(e) => e.id.as_ref(),
                    };
                    error(
                        shard,
                        conn,
                        id,
                        ErrorCode::RateLimited,
                        "too many ops: slow down",
                    );
                }
                OpVerdict::Abuse => {
                    ShardMetrics::inc(&shard.metrics.rate_abuse_closes);
                    conn.request_close(4008, "rate limit abuse");
                }
            }
        }
        Inbound::Binary(_) => error(
            shard,
            conn,
            None,
            ErrorCode::BadRequest,
            "binary frames are not supported: send JSON text frames",
        ),
        Inbound::TooLarge(n) => error(
            shard,
            conn,
            None,
            ErrorCode::TooLarge,
            &format!(
                "message of {n} bytes exceeds the limit of {} bytes",
                shard.cfg.limits.max_message_bytes
            ),
        ),
        Inbound::Ping(payload) => conn.push_reply(ws::pong_frame(&payload)),
        Inbound::Pong => {}
        Inbound::Close(code) => {
            let code = code
                .map(|(c, _)| c)
                .filter(|c| ws::is_valid_close_code(*c))
                .unwrap_or(1000);
            conn.request_close(code, "");
        }
    }
}

fn error(shard: &Shard, conn: &ConnHandle, id: Option<&RequestId>, code: ErrorCode, msg: &str) {
    ShardMetrics::inc(&shard.metrics.op_errors);
    conn.push_reply(events::error(id, code, msg));
}

fn handle_op(shard: &Shard, conn: &ConnHandle, req: Request) {
    #[cfg(feature = "fault-injection")]
    if let Op::Activity { kind, .. } = &req.op {
        assert!(
            &**kind != "__panic",
            "fault injection: panic while handling an op"
        );
    }
    let id = req.id.as_ref();
    let m = &shard.metrics;
    ShardMetrics::inc(match &req.op {
        Op::Subscribe(_) => &m.ops_subscribe,
        Op::Unsubscribe(_) => &m.ops_unsubscribe,
        Op::SubscribeGroup(_) => &m.ops_subscribe_group,
        Op::UnsubscribeGroup(_) => &m.ops_unsubscribe_group,
        Op::SetStatus { .. } => &m.ops_set_status,
        Op::Activity { .. } => &m.ops_activity,
        Op::Refresh(_) => &m.ops_refresh,
        Op::Ping => &m.ops_ping,
    });
    if conn.read_only
        && matches!(
            req.op,
            Op::SetStatus { .. } | Op::Activity { .. } | Op::Refresh(_)
        )
    {
        let msg = "read-only impersonation: this session cannot change anything";
        return error(shard, conn, id, ErrorCode::Forbidden, msg);
    }
    let max_subs = shard.cfg.limits.max_subscriptions;
    let held = || conn.watching.borrow().len() + conn.watching_groups.borrow().len();
    match req.op {
        Op::Subscribe(users) => {
            let mut fresh: Vec<&UserId> = users
                .iter()
                .filter(|u| !conn.watching.borrow().contains_key(u))
                .collect();
            fresh.sort_unstable();
            fresh.dedup();
            if held() + fresh.len() > max_subs {
                let msg = format!("at most {max_subs} subscriptions per connection");
                return error(shard, conn, id, ErrorCode::TooManySubscriptions, &msg);
            }
            conn.push_reply(events::ack(id));
            shard.watch_users(conn, &users);
        }
        Op::Unsubscribe(users) => {
            shard.unwatch_users(conn, &users);
            conn.push_reply(events::ack(id));
        }
        Op::SubscribeGroup(group) => {
            if !conn.watching_groups.borrow().contains_key(&group) && held() + 1 > max_subs {
                let msg = format!("at most {max_subs} subscriptions per connection");
                return error(shard, conn, id, ErrorCode::TooManySubscriptions, &msg);
            }
            conn.push_reply(events::ack(id));
            shard.watch_group(conn, &group);
        }
        Op::UnsubscribeGroup(group) => {
            shard.unwatch_group(conn, &group);
            conn.push_reply(events::ack(id));
        }
        Op::SetStatus { status, text } => {
            let change =
                shard
                    .registry
                    .borrow_mut()
                    .set_status(&conn.user, conn.id, status, text, now_ms());
            match change {
                Ok(change) => {
                    conn.status.set(status);
                    conn.push_reply(events::ack(id));
                    if let Some(change) = change {
                        shard.publish(change);
                    }
                }
                Err(e) => unreachable!("a live connection's session is registered: {e}"),
            }
        }
        Op::Activity { kind, to } => {
            if conn.status.get() == Status::Invisible {
                let msg = "invisible sessions cannot send activity";
                return error(shard, conn, id, ErrorCode::Forbidden, msg);
            }
            conn.push_reply(events::ack(id));
            let ts = now_ms();
            let user = conn.user.clone();
            match to {
                None => {
                    let watchers = shard.registry.borrow().watchers(&user);
                    for w in watchers {
                        let msg = crate::shard::mesh::MeshMsg::Activity {
                            user: user.clone(),
                            kind: kind.clone(),
                            ts,
                            to: None,
                        };
                        shard.mesh.send(w, msg);
                    }
                }
                Some(to) => {
                    let owner = shard.owner(&to);
                    let msg = crate::shard::mesh::MeshMsg::Activity {
                        user,
                        kind,
                        ts,
                        to: Some(to),
                    };
                    shard.mesh.send(owner, msg);
                }
            }
        }
        Op::Refresh(token) => match shard.verifier.verify_refresh(&token, &conn.user) {
            Ok(claims) => {
                let mut expiries = shard.expiries.borrow_mut();
                expiries.remove(&(conn.expires_at.get(), conn.id));
                expiries.insert((claims.exp, conn.id));
                conn.expires_at.set(claims.exp);
                conn.push_reply(events::ack(id));
            }
            Err(e) => error(shard, conn, id, ErrorCode::Forbidden, e.reason()),
        },
        Op::Ping => conn.push_reply(events::pong(id, now_ms())),
    }
}

/// Writes a complete HTTP error response and closes the socket (handshake failures). Status 0:
/// no response at all (the TLS handshake itself failed), only what rustls has to say.
pub async fn reject(stream: &mut TcpStream, tls: Option<&mut Tls>, status: u16, reason: &str) {
    let response = if status == 0 {
        Vec::new()
    } else {
        http::error_response(status, reason)
    };
    let bytes = match tls {
        None => response,
        Some(tls) => {
            let mut out = Vec::new();
            if !response.is_empty() && !tls.is_handshaking() {
                tls.write(&response);
                tls.close();
            }
            tls.drain(&mut out);
            out
        }
    };
    let _ = stream.write_all(&bytes).await;
    let _ = stream.close().await;
}
