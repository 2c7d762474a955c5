//! The socket driver of one WebSocket connection on the shard that owns its user: read, decode,
//! hand each message to the session layer ([`Shard::submit`]), write what the session's outbox
//! holds. What an op means lives in `shard::session`; this file only moves bytes.
//!
//! One task per connection, driven by a single hand-written poll loop. An idle connection holds
//! no read or write buffer.

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::net::TcpStream;

use super::http;
use super::tls::Tls;
use crate::metrics::ShardMetrics;
use crate::protocol::ops::{self, ErrorCode};
use crate::protocol::ws::{self, Decoder, Inbound};
use crate::shard::{now_ms, Admission, CloseRequest, Refusal, Session, Shard};

/// What the upgrade handshake learned about an authenticated socket, for the shard that owns its
/// user (it travels with the socket when that is another shard).
pub struct Accepted {
    /// Who, from where, on what (for the session layer).
    pub admission: Admission,
    /// `Sec-WebSocket-Key`, answered by the owner.
    pub key: String,
    /// Bytes the client sent after the request head (already WebSocket frames; decrypted).
    pub early: Vec<u8>,
    /// When the socket was accepted (handshake latency).
    pub at: Instant,
}

/// An authenticated, upgraded-to-be socket arriving at its owner shard.
pub struct Setup {
    pub stream: TcpStream,
    /// Boxed: rustls's session is over a kilobyte, and plain connections should not pay for it.
    pub tls: Option<Box<Tls>>,
    pub accepted: Accepted,
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

/// Takes an upgraded-to-be connection on its owner shard: opens its session (or answers the
/// refusal) and spawns its task. Synchronous, so the set-up state (claims, key, early bytes) is
/// gone before the long-lived task starts: the task holds only what a live connection needs.
pub fn start(shard: Rc<Shard>, setup: Setup) {
    let Setup {
        mut stream,
        mut tls,
        accepted:
            Accepted {
                admission,
                key,
                early,
                at,
            },
    } = setup;
    let session = match shard.open_session(admission) {
        Ok(session) => session,
        Err(Refusal::Http(status, reason)) => {
            ShardMetrics::inc(&shard.metrics().handshakes_unavailable);
            glommio::spawn_local(async move {
                reject(&mut stream, tls.as_deref_mut(), status, reason).await;
            })
            .detach();
            return;
        }
        Err(Refusal::Close(code, reason)) => {
            // The upgrade completes, then the close: nothing the client sends is read.
            let mut plain = http::switching_protocols(&key);
            plain.extend_from_slice(&ws::close_frame(code, reason));
            let bytes = match tls.as_deref_mut() {
                None => plain,
                Some(tls) => {
                    let mut out = Vec::new();
                    tls.write(&plain);
                    tls.close();
                    tls.drain(&mut out);
                    out
                }
            };
            glommio::spawn_local(async move {
                if stream.write_all(&bytes).await.is_ok() {
                    linger(&mut stream).await;
                }
            })
            .detach();
            return;
        }
    };
    // From now on the session ends with this guard, whatever happens to what follows.
    let guard = Guard {
        shard: shard.clone(),
        session,
    };
    shard.record_handshake(at);
    let limits = &shard.cfg().limits;
    let mut io = Io {
        stream,
        decoder: Decoder::new(limits.max_message_bytes, limits.max_frame_bytes),
        wbuf: Vec::new(),
        wpos: 0,
        close_sent: false,
        close_deadline: None,
        tls,
    };
    let _ = io.stream.set_nodelay(true); // events are small and latency is the product
    io.put(&http::switching_protocols(&key));
    // Frames the client sent along with its upgrade request are handled before anything.
    io.decoder.feed(&early);
    decode_all(&shard, &guard.session, &mut io.decoder);
    let metrics = shard.metrics().clone();
    let live = Live {
        guard,
        io: Some(io),
    };
    glommio::spawn_local(crate::net::guarded(metrics, live)).detach();
}

/// Ends the session when the connection's task ends, however it ends: normally, by a panic in
/// the driver, or by the executor dropping the task at shutdown. A session can never outlive
/// its connection.
struct Guard {
    shard: Rc<Shard>,
    session: Rc<Session>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.shard.close_session(&self.session);
    }
}

/// The connection's task for its whole life: drive it until it closes, then end the session
/// and hand the socket to a short linger task. A plain struct rather than an `async fn`, which
/// would store `io` twice (as argument and as local): this is what every live connection costs.
struct Live {
    guard: Guard,
    /// Taken when the connection ends (the socket moves to a linger task).
    io: Option<Io>,
}

impl Future for Live {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let io = this
            .io
            .as_mut()
            .expect("a finished connection is not polled again");
        let g = &this.guard;
        let clean = match drive(&g.shard, &g.session, io, cx) {
            Poll::Ready(clean) => clean,
            Poll::Pending => return Poll::Pending,
        };
        // The session ends now, not after the linger: subscribers learn at once.
        g.shard.close_session(&g.session);
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

/// After our close frame: stop sending, let the peer's close (or EOF) arrive so the kernel does
/// not reset the connection under the frame we just sent.
pub(super) async fn linger(stream: &mut TcpStream) {
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
fn drive(shard: &Shard, session: &Session, io: &mut Io, cx: &mut Context<'_>) -> Poll<bool> {
    session.register_waker(cx.waker());
    if let Some(req) = session.close_request() {
        let timer = io.close_deadline.get_or_insert_with(|| {
            let wait = if req.flush_ms > 0 {
                Duration::from_millis(req.flush_ms)
            } else {
                LINGER
            };
            glommio::timer::Timer::new(wait)
        });
        if Pin::new(timer).poll(cx).is_ready() {
            return Poll::Ready(false); // the peer would not take the close: drop it
        }
    }
    if session.take_trim_due() && io.wpos == io.wbuf.len() {
        io.wbuf = Vec::new(); // idle since the last heartbeat: hold no write buffer
        io.wpos = 0;
        io.decoder.release_if_idle();
    }
    if session.take_ping_due() && !io.close_sent {
        io.put(&ws::ping_frame(b""));
    }
    for _ in 0..ROUNDS_PER_POLL {
        let mut progress = false;
        if !io.close_sent {
            let mut chunk = [0u8; READ_CHUNK];
            match Pin::new(&mut io.stream).poll_read(cx, &mut chunk) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(false),
                Poll::Ready(Ok(n)) => {
                    session.touch(now_ms());
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
                    decode_all(shard, session, &mut io.decoder);
                }
                Poll::Pending => {}
            }
        }
        if !io.close_sent {
            let drained = io.wpos == io.wbuf.len();
            match session.close_request() {
                // Close at once, or once everything queued is written (within the deadline).
                Some(req) if req.flush_ms == 0 || (drained && session.backlog() == 0) => {
                    io.put(&ws::close_frame(req.code, req.reason));
                    if let Some(tls) = &mut io.tls {
                        tls.close();
                        tls.drain(&mut io.wbuf);
                    }
                    io.close_sent = true;
                }
                _ if drained => fill(session, io),
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
        // Behind: the socket would not take everything written (the kernel buffer is full).
        // Only then does the session merge queued events per user.
        session.set_behind(io.wpos < io.wbuf.len());
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
fn fill(session: &Session, io: &mut Io) {
    io.wbuf.clear();
    io.wpos = 0;
    if io.wbuf.capacity() > WBUF_KEEP {
        io.wbuf = Vec::new(); // a burst went out; steady traffic needs far less
    }
    if io.tls.is_none() {
        session.fill(&mut io.wbuf, WRITE_BATCH);
    } else {
        // Over TLS, frames are gathered as plaintext and encrypted in one go.
        let mut plain = Vec::new();
        session.fill(&mut plain, WRITE_BATCH);
        if !plain.is_empty() {
            io.put(&plain);
        }
    }
}

/// Decodes every complete frame and hands it to the session layer.
fn decode_all(shard: &Shard, session: &Session, decoder: &mut Decoder) {
    loop {
        match decoder.decode() {
            Ok(Some(item)) => {
                let close = matches!(item, Inbound::Close(_));
                on_inbound(shard, session, item);
                if close {
                    return; // nothing after a close frame is read
                }
            }
            Ok(None) => return,
            Err(e) => {
                ShardMetrics::inc(&shard.metrics().protocol_closes);
                let reason = match e.close_code() {
                    1009 => "message too big",
                    1007 => "invalid UTF-8",
                    _ => "protocol error",
                };
                session.request_close(CloseRequest::now(e.close_code(), reason));
                return;
            }
        }
    }
}

fn on_inbound(shard: &Shard, session: &Session, item: Inbound) {
    match item {
        Inbound::Text(bytes) => {
            let text = std::str::from_utf8(&bytes).expect("the decoder validated UTF-8");
            // Parsed before the budget check so a refusal can echo the op's id (parsing is
            // bounded by max_message_bytes).
            shard.submit(session, ops::parse(text, shard.op_limits()));
        }
        Inbound::Binary(_) => session.reply_error(
            None,
            ErrorCode::BadRequest,
            "binary frames are not supported: send JSON text frames",
        ),
        Inbound::TooLarge(n) => session.reply_error(
            None,
            ErrorCode::TooLarge,
            &format!(
                "message of {n} bytes exceeds the limit of {} bytes",
                shard.cfg().limits.max_message_bytes
            ),
        ),
        Inbound::Ping(payload) => session.push_reply(ws::pong_frame(&payload)),
        Inbound::Pong => {}
        Inbound::Close(code) => {
            let code = code
                .map(|(c, _)| c)
                .filter(|c| ws::is_valid_close_code(*c))
                .unwrap_or(1000);
            session.request_close(CloseRequest::now(code, ""));
        }
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
