//! The admin port's HTTP/1.1 server, run by every shard on its own SO_REUSEPORT listener:
//! keep-alive, bounded request heads and bodies, time limits, a per-shard connection cap.

use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use rustls::ServerConfig;
use std::sync::Arc;

use super::http::{self, Method, Response};
use crate::metrics::ShardMetrics;
use crate::shard::Shard;

/// Accepts admin connections until `stop` fires; with `tls`, every connection speaks TLS.
pub async fn accept_loop(
    shard: Rc<Shard>,
    listener: TcpListener,
    tls: Option<Arc<ServerConfig>>,
    stop: Rc<glommio::channels::local_channel::LocalReceiver<()>>,
) {
    while let Some(mut stream) =
        crate::edge::accept::next_connection(&shard, &listener, &stop).await
    {
        let open = shard
            .metrics
            .admin_connections
            .load(std::sync::atomic::Ordering::Relaxed);
        if open as usize >= shard.cfg.admin.max_connections {
            let resp = Response::error(503, "too many admin connections");
            glommio::spawn_local(async move {
                let _ = stream.write_all(&http::encode(&resp, false, false)).await;
                let _ = stream.close().await;
            })
            .detach();
            continue;
        }
        let open = Open::new(shard.clone());
        let m = shard.metrics.clone();
        let serving = start(shard.clone(), stream, tls.clone(), open);
        glommio::spawn_local(crate::edge::accept::guarded(m, serving)).detach();
    }
}

/// Counts an open admin connection for as long as it lives.
struct Open(Rc<Shard>);

impl Open {
    fn new(shard: Rc<Shard>) -> Open {
        ShardMetrics::inc(&shard.metrics.admin_connections);
        Open(shard)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        ShardMetrics::sub(&self.0.metrics.admin_connections, 1);
    }
}

/// Why reading a request stopped.
enum ReadEnd {
    /// The peer closed, or stayed idle past the idle timeout: close quietly.
    Gone,
    /// Answer this error, then close.
    Error(Response),
}

/// Sets the socket up and, with TLS, runs the TLS handshake (within the request timeout).
async fn start(shard: Rc<Shard>, stream: TcpStream, tls: Option<Arc<ServerConfig>>, open: Open) {
    let _ = stream.set_nodelay(true);
    // A client that stops reading cannot hold a slot: writes give up after the request timeout.
    let timeout = Duration::from_millis(shard.cfg.admin.request_timeout_ms);
    let _ = stream.set_write_timeout(Some(timeout));
    match tls {
        None => serve(shard, stream, open).await,
        Some(cfg) => {
            let accepting = futures_rustls::TlsAcceptor::from(cfg).accept(stream);
            let handshake = futures_lite::future::or(async { Some(accepting.await) }, async {
                glommio::timer::sleep(timeout).await;
                None
            })
            .await;
            if let Some(Ok(tls_stream)) = handshake {
                serve(shard, tls_stream, open).await;
            }
        }
    }
}

/// Reads one request (head and body) into `buf`. Waits up to the idle timeout for its first
/// byte, then up to the request timeout for the rest.
async fn read_request<S: AsyncRead + Unpin>(
    shard: &Shard,
    stream: &mut S,
    buf: &mut Vec<u8>,
) -> Result<http::Request, ReadEnd> {
    let cfg = &shard.cfg.admin;
    let mut deadline =
        (!buf.is_empty()).then(|| Instant::now() + Duration::from_millis(cfg.request_timeout_ms));
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
            None => Duration::from_millis(cfg.idle_timeout_ms),
        };
        let read = futures_lite::future::or(async { Some(stream.read(&mut chunk).await) }, async {
            glommio::timer::sleep(wait).await;
            None
        })
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
                deadline.get_or_insert_with(|| {
                    Instant::now() + Duration::from_millis(cfg.request_timeout_ms)
                });
            }
        }
    }
}

/// One admin connection: requests in order until close, idle timeout or an error.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(shard: Rc<Shard>, mut stream: S, _open: Open) {
    let mut buf = Vec::new();
    loop {
        let req = match read_request(&shard, &mut stream, &mut buf).await {
            Ok(req) => req,
            Err(ReadEnd::Gone) => return,
            Err(ReadEnd::Error(resp)) => {
                ShardMetrics::inc(&shard.metrics.admin_requests);
                let _ = stream.write_all(&http::encode(&resp, false, false)).await;
                let _ = stream.close().await;
                return;
            }
        };
        let end = req.head_len + req.content_length;
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
        let keep = req.keep_alive && !shard.stopping.get();
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
