//! The admin port's HTTP/1.1 server, run by every shard on its own SO_REUSEPORT listener:
//! keep-alive, bounded request heads and bodies, time limits, and a bounded pool of connections.
//!
//! The pool (`admin.max_connections` per shard) must not be something a few idle sockets can
//! take: a probe that finds it full would restart a healthy server. So
//! - a new connection has `admin.header_timeout_ms` to send its first byte, and a keep-alive
//!   connection `admin.idle_timeout_ms` between requests;
//! - one client (an IPv4 address, an IPv6 /64) holds at most `admin.max_connections_per_ip`
//!   (more get 429);
//! - when the pool is full, a new connection closes the connection that has been idle longest
//!   (waiting for a first byte or between requests: closing it loses nothing);
//! - when every pooled connection is busy with a request, a newcomer still gets one of
//!   `admin.probe_connections` reserved slots, where `/healthz`, `/readyz` and `/metrics` are
//!   answered (one request, then close) and anything else gets 503. Only when those are taken
//!   too does a newcomer get 503 at accept (over TLS, refused connections are closed
//!   unanswered: a plaintext answer would be garbage to a TLS client).

use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};
use glommio::net::{TcpListener, TcpStream};
use hashbrown::HashMap;
use rustls::ServerConfig;

use super::http::{self, Method, Response};
use super::AdminLocal;
use crate::metrics::ShardMetrics;
use crate::shard::Shard;

/// One shard's admin connections.
#[derive(Default)]
pub struct Pool {
    next: u64,
    conns: HashMap<u64, Slot>,
    per_ip: HashMap<IpAddr, usize>,
}

struct Slot {
    ip: IpAddr,
    /// Since when the connection waits for a request's first byte; `None` while busy.
    idle_since: Option<Instant>,
    /// Tells the connection to close (it was evicted).
    evict: LocalSender<()>,
}

/// Why a new connection is not admitted.
#[derive(Debug, PartialEq, Eq)]
enum Full {
    /// This IP holds its share already (429).
    PerIp,
    /// Every connection is busy (503).
    Busy,
}

impl Pool {
    /// Admits a connection from `ip`, evicting the longest-idle one if the pool is full.
    /// Returns its id and the receiver of its eviction notice.
    fn admit(
        &mut self,
        ip: IpAddr,
        max: usize,
        max_per_ip: usize,
        metrics: &ShardMetrics,
    ) -> Result<(u64, LocalReceiver<()>), Full> {
        if self.per_ip.get(&ip).copied().unwrap_or(0) >= max_per_ip {
            return Err(Full::PerIp);
        }
        if self.conns.len() >= max {
            let oldest = self
                .conns
                .iter()
                .filter_map(|(id, s)| s.idle_since.map(|t| (t, *id)))
                .min();
            let Some((_, victim)) = oldest else {
                return Err(Full::Busy);
            };
            if let Some(slot) = self.remove(victim) {
                let _ = slot.evict.try_send(());
                ShardMetrics::inc(&metrics.admin_evictions);
            }
        }
        let (evict, notice) = local_channel::new_bounded(1);
        self.next += 1;
        let id = self.next;
        self.conns.insert(
            id,
            Slot {
                ip,
                idle_since: Some(Instant::now()),
                evict,
            },
        );
        *self.per_ip.entry(ip).or_default() += 1;
        Ok((id, notice))
    }

    fn remove(&mut self, id: u64) -> Option<Slot> {
        let slot = self.conns.remove(&id)?;
        if let Some(n) = self.per_ip.get_mut(&slot.ip) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&slot.ip);
            }
        }
        Some(slot)
    }

    fn set_idle(&mut self, id: u64, idle: bool) {
        if let Some(slot) = self.conns.get_mut(&id) {
            slot.idle_since = idle.then(Instant::now);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.conns.len()
    }
}

/// Accepts admin connections until `stop` fires; with `tls`, every connection speaks TLS.
pub async fn accept_loop(
    shard: Rc<Shard>,
    listener: TcpListener,
    tls: Option<Arc<ServerConfig>>,
    stop: LocalReceiver<()>,
) {
    let local = AdminLocal::of(&shard);
    while let Some(mut stream) = crate::net::next_connection(&listener, &stop).await {
        let Ok(peer) = stream.peer_addr() else {
            continue;
        };
        let cfg = &shard.cfg().admin;
        let m = shard.metrics().clone();
        let client = crate::net::limit_key(peer.ip(), shard.cfg().limits.ipv6_prefix_len);
        let admitted = local.pool.borrow_mut().admit(
            client,
            cfg.max_connections,
            cfg.max_connections_per_ip,
            &m,
        );
        let conn = match admitted {
            Ok((id, evicted)) => Conn::Pooled {
                open: Open::new(local.clone(), m.clone(), id),
                evicted,
            },
            Err(Full::Busy) if local.probes.get() < cfg.probe_connections => Conn::Probe {
                _slot: Probe::new(local.clone()),
            },
            Err(_) if tls.is_some() => {
                // A plaintext answer would be garbage to a TLS client, and a refused socket
                // gets no TLS handshake: closed unanswered.
                ShardMetrics::inc(&m.admin_refused);
                continue;
            }
            Err(full) => {
                ShardMetrics::inc(&m.admin_refused);
                let resp = match full {
                    Full::PerIp => {
                        Response::error(429, "too many admin connections from this address")
                    }
                    Full::Busy => Response::error(503, "too many admin connections"),
                };
                glommio::spawn_local(async move {
                    let _ = stream.write_all(&http::encode(&resp, false, false)).await;
                    let _ = stream.close().await;
                })
                .detach();
                continue;
            }
        };
        let serving = start(shard.clone(), stream, tls.clone(), conn);
        glommio::spawn_local(crate::net::guarded(m, serving)).detach();
    }
}

/// Holds a connection's place in the pool (and the gauge) for as long as it lives.
struct Open {
    local: Rc<AdminLocal>,
    metrics: Arc<ShardMetrics>,
    id: u64,
}

impl Open {
    fn new(local: Rc<AdminLocal>, metrics: Arc<ShardMetrics>, id: u64) -> Open {
        ShardMetrics::inc(&metrics.admin_connections);
        Open { local, metrics, id }
    }

    fn set_idle(&self, idle: bool) {
        self.local.pool.borrow_mut().set_idle(self.id, idle);
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        ShardMetrics::sub(&self.metrics.admin_connections, 1);
        self.local.pool.borrow_mut().remove(self.id);
    }
}

/// An admin connection's place.
enum Conn {
    /// In the pool, with the notice that the pool evicted it.
    Pooled {
        open: Open,
        evicted: LocalReceiver<()>,
    },
    /// In a reserved probe slot (held until the connection ends): one request, health and
    /// metrics only.
    Probe { _slot: Probe },
}

impl Conn {
    fn set_idle(&self, idle: bool) {
        if let Conn::Pooled { open, .. } = self {
            open.set_idle(idle);
        }
    }

    /// Resolves when the pool evicts this connection; never for a probe.
    async fn evicted(&self) {
        match self {
            Conn::Pooled { evicted, .. } => {
                evicted.recv().await;
            }
            Conn::Probe { .. } => futures_lite::future::pending::<()>().await,
        }
    }
}

/// Holds one of the reserved probe slots for as long as the connection lives.
struct Probe(Rc<AdminLocal>);

impl Probe {
    fn new(local: Rc<AdminLocal>) -> Probe {
        local.probes.set(local.probes.get() + 1);
        Probe(local)
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.0.probes.set(self.0.probes.get() - 1);
    }
}

/// Why reading a request stopped.
enum ReadEnd {
    /// The peer closed, stayed idle past its timeout, or the connection was evicted: close
    /// quietly.
    Gone,
    /// Answer this error, then close.
    Error(Response),
}

/// Sets the socket up and, with TLS, runs the TLS handshake (within the header timeout).
async fn start(shard: Rc<Shard>, stream: TcpStream, tls: Option<Arc<ServerConfig>>, conn: Conn) {
    let _ = stream.set_nodelay(true);
    // A client that stops reading cannot hold a slot: writes give up after the request timeout.
    let cfg = &shard.cfg().admin;
    let _ = stream.set_write_timeout(Some(Duration::from_millis(cfg.request_timeout_ms)));
    match tls {
        None => serve(shard, stream, conn).await,
        Some(tls_cfg) => {
            // Within the header timeout, and only while the pool keeps the connection: a new
            // connection counts as idle, so it may be evicted mid-handshake.
            let wait = Duration::from_millis(cfg.header_timeout_ms);
            let accepting = futures_rustls::TlsAcceptor::from(tls_cfg).accept(stream);
            let handshake = futures_lite::future::or(
                async { Some(accepting.await) },
                futures_lite::future::or(
                    async {
                        glommio::timer::sleep(wait).await;
                        None
                    },
                    async {
                        conn.evicted().await;
                        None
                    },
                ),
            )
            .await;
            if let Some(Ok(tls_stream)) = handshake {
                serve(shard, tls_stream, conn).await;
            }
        }
    }
}

/// Reads one request (head and body) into `buf`. Waits for its first byte up to the header
/// timeout (a new connection) or the idle timeout (keep-alive), as an idle member of the pool;
/// then up to the request timeout for the rest.
async fn read_request<S: AsyncRead + Unpin>(
    shard: &Shard,
    stream: &mut S,
    buf: &mut Vec<u8>,
    conn: &Conn,
    first: bool,
) -> Result<http::Request, ReadEnd> {
    let cfg = &shard.cfg().admin;
    let request_timeout = Duration::from_millis(cfg.request_timeout_ms);
    let mut deadline = (!buf.is_empty()).then(|| Instant::now() + request_timeout);
    conn.set_idle(deadline.is_none());
    let mut chunk = [0u8; 4096];
    let mut head: Option<http::Request> = None;
    loop {
        if head.is_none() {
            head = http::parse(buf, cfg.max_request_bytes)
                .map_err(|e| ReadEnd::Error(Response::error(e.status, e.message)))?;
        }
        if let Some(req) = &head {
            if buf.len() >= req.head_len + req.content_length {
                return Ok(head.take().expect("checked just above"));
            }
        }
        let wait = match deadline {
            Some(d) => d.saturating_duration_since(Instant::now()),
            None if first => Duration::from_millis(cfg.header_timeout_ms),
            None => Duration::from_millis(cfg.idle_timeout_ms),
        };
        let read = futures_lite::future::or(
            async { Some(stream.read(&mut chunk).await) },
            futures_lite::future::or(
                async {
                    glommio::timer::sleep(wait).await;
                    None
                },
                async {
                    conn.evicted().await;
                    Some(Err(std::io::ErrorKind::ConnectionAborted.into()))
                },
            ),
        )
        .await;
        match read {
            None if deadline.is_some() => {
                return Err(ReadEnd::Error(Response::error(
                    408,
                    "request not received in time",
                )))
            }
            None | Some(Ok(0)) | Some(Err(_)) => return Err(ReadEnd::Gone),
            Some(Ok(n)) => {
                buf.extend_from_slice(&chunk[..n]);
                if deadline.is_none() {
                    deadline = Some(Instant::now() + request_timeout);
                    conn.set_idle(false);
                }
            }
        }
    }
}

/// One admin connection: requests in order until close, idle timeout, eviction or an error.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(shard: Rc<Shard>, mut stream: S, conn: Conn) {
    let mut buf = Vec::new();
    let mut first = true;
    loop {
        let req = match read_request(&shard, &mut stream, &mut buf, &conn, first).await {
            Ok(req) => req,
            Err(ReadEnd::Gone) => return,
            Err(ReadEnd::Error(resp)) => {
                ShardMetrics::inc(&shard.metrics().admin_requests);
                let _ = stream.write_all(&http::encode(&resp, false, false)).await;
                let _ = stream.close().await;
                return;
            }
        };
        first = false;
        let end = req.head_len + req.content_length;
        if matches!(conn, Conn::Probe { .. }) {
            // A probe slot: health and metrics, once.
            let resp = if matches!(req.path.as_str(), "/healthz" | "/readyz" | "/metrics") {
                super::api::route(
                    &shard,
                    req.method,
                    &req.path,
                    &req.query,
                    req.bearer.as_deref(),
                )
                .await
            } else {
                ShardMetrics::inc(&shard.metrics().admin_refused);
                Response::error(503, "too many admin connections")
            };
            let _ = stream
                .write_all(&http::encode(&resp, false, req.method == Method::Head))
                .await;
            let _ = stream.close().await;
            return;
        }
        if req.path == "/ws/admin" {
            match req.ws_key.clone() {
                Some(key) => {
                    let early = buf.split_off(end);
                    super::feed::run(shard, stream, &key, early).await;
                    return;
                }
                None => {
                    let resp = Response::error(400, "/ws/admin is a WebSocket: send an upgrade");
                    let head = req.method == Method::Head;
                    let _ = stream.write_all(&http::encode(&resp, false, head)).await;
                    let _ = stream.close().await;
                    return;
                }
            }
        }
        let resp = super::api::route(
            &shard,
            req.method,
            &req.path,
            &req.query,
            req.bearer.as_deref(),
        )
        .await;
        let keep = req.keep_alive && !shard.stopping();
        let bytes = http::encode(&resp, keep, req.method == Method::Head);
        if stream.write_all(&bytes).await.is_err() {
            return;
        }
        buf.drain(..end);
        if !keep {
            let _ = stream.close().await;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn a_full_pool_evicts_the_longest_idle_and_refuses_only_when_all_are_busy() {
        glommio::LocalExecutorBuilder::default()
            .spawn(|| async {
                let m = ShardMetrics::default();
                let ip = |n| IpAddr::V4(Ipv4Addr::new(10, 0, 0, n));
                let mut pool = Pool::default();
                let (a, a_notice) = pool.admit(ip(1), 2, 5, &m).unwrap();
                let (b, _b_notice) = pool.admit(ip(2), 2, 5, &m).unwrap();
                pool.set_idle(b, false); // b is busy with a request
                let (_c, _) = pool.admit(ip(3), 2, 5, &m).expect("a, idle, makes room");
                assert!(a_notice.recv().await.is_some(), "a was told to close");
                assert!(!pool.conns.contains_key(&a));
                assert_eq!(pool.len(), 2);
                pool.set_idle(_c, false);
                assert_eq!(pool.admit(ip(4), 2, 5, &m).unwrap_err(), Full::Busy);
                assert_eq!(ShardMetrics::get(&m.admin_evictions), 1);
                // Per IP.
                let mut pool = Pool::default();
                pool.admit(ip(1), 10, 2, &m).unwrap();
                pool.admit(ip(1), 10, 2, &m).unwrap();
                assert_eq!(pool.admit(ip(1), 10, 2, &m).unwrap_err(), Full::PerIp);
                assert!(pool.admit(ip(2), 10, 2, &m).is_ok());
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
