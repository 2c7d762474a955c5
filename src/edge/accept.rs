//! Accepting sockets and the upgrade handshake.
//!
//! Every shard accepts on its own SO_REUSEPORT listener. The accepting shard reads the upgrade
//! request (bounded in size and time), authenticates the token, and — when another shard owns
//! the user — hands the socket and any bytes already read to that owner over the mesh. The owner
//! answers the upgrade and serves the connection, so all of a user's devices live on one shard.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use rustls::ServerConfig;
use std::sync::Arc;

use super::conn::{self, Setup};
use super::http::{self, Reject};
use super::tls::Tls;
use crate::auth::Claims;
use crate::metrics::ShardMetrics;
use crate::presence::DeviceType;
use crate::shard::mesh::{Handoff, MeshMsg};
use crate::shard::Shard;

/// Accepts until `stop` fires, one handshake task per socket. `secure`: this listener speaks
/// TLS with that configuration.
pub async fn accept_loop(
    shard: Rc<Shard>,
    listener: TcpListener,
    secure: Option<Arc<ServerConfig>>,
    stop: Rc<glommio::channels::local_channel::LocalReceiver<()>>,
) {
    while let Some(stream) = next_connection(&shard, &listener, &stop).await {
        let tls = match secure
            .as_ref()
            .map(|c| Tls::new(c).map(Box::new))
            .transpose()
        {
            Ok(tls) => tls,
            Err(e) => {
                tracing::warn!(error = %e, "TLS session setup failed");
                continue;
            }
        };
        let m = shard.metrics.clone();
        glommio::spawn_local(guarded(m, handshake(shard.clone(), stream, tls))).detach();
    }
}

/// The next accepted connection, or `None` once `stop` fires. Accept errors (EMFILE and
/// friends) are logged and followed by a short pause instead of a spin.
pub async fn next_connection(
    shard: &Shard,
    listener: &TcpListener,
    stop: &glommio::channels::local_channel::LocalReceiver<()>,
) -> Option<TcpStream> {
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            stop.recv().await;
            None
        })
        .await;
        match accepted? {
            Ok(stream) => return Some(stream),
            Err(e) => {
                tracing::warn!(shard = shard.ix, error = %e, "accept failed");
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Runs a connection-scoped task so that a panic in it ends that task only: a panic in a
/// detached glommio task would otherwise take the whole shard's executor down. Counted in
/// `conn_panics`.
pub async fn guarded(
    metrics: std::sync::Arc<ShardMetrics>,
    task: impl std::future::Future<Output = ()>,
) {
    use futures_lite::FutureExt;
    if std::panic::AssertUnwindSafe(task)
        .catch_unwind()
        .await
        .is_err()
    {
        ShardMetrics::inc(&metrics.conn_panics);
        tracing::error!(
            "a connection task panicked; that connection was dropped, the shard goes on"
        );
    }
}

/// What the handshake learned, for the owner shard.
struct Accepted {
    claims: Claims,
    key: String,
    device: Option<String>,
    device_type: DeviceType,
    early: Vec<u8>,
    /// `?as=<user>` by an admin: the user whose view this read-only connection shows.
    as_user: Option<String>,
}

async fn handshake(shard: Rc<Shard>, mut stream: TcpStream, mut tls: Option<Box<Tls>>) {
    let Ok(peer) = stream.peer_addr() else { return };
    let limits = &shard.cfg.limits;
    let deadline = Duration::from_millis(limits.handshake_timeout_ms);
    let reading = read_head(&mut stream, &mut tls, limits.max_header_bytes);
    let head = futures_lite::future::or(reading, async {
        glommio::timer::sleep(deadline).await;
        Err(Reject::new(408, "upgrade request not received in time"))
    })
    .await;
    let accepted = head
        .and_then(|(buf, req)| admit(&shard, peer, &req).map(|()| (buf, req)))
        .and_then(|(buf, req)| authenticate(&shard, buf, req));
    let accepted = match accepted {
        Ok(a) => a,
        Err(reject) => {
            let counter = match reject.status {
                401 => &shard.metrics.handshakes_unauthorized,
                403 => &shard.metrics.handshakes_forbidden,
                408 => &shard.metrics.handshakes_timed_out,
                429 => &shard.metrics.handshakes_rate_limited,
                _ => &shard.metrics.handshakes_bad_request,
            };
            ShardMetrics::inc(counter);
            tracing::debug!(peer = %peer, status = reject.status, reason = reject.reason, "upgrade refused");
            conn::reject(
                &mut stream,
                tls.as_deref_mut(),
                reject.status,
                reject.reason,
            )
            .await;
            return;
        }
    };
    // An impersonation is served where the impersonated user lives: it must see what is sent
    // to that user's sessions.
    let owner = shard.owner(accepted.as_user.as_deref().unwrap_or(&accepted.claims.sub));
    if owner == shard.ix {
        let setup = Setup {
            stream,
            peer,
            claims: accepted.claims,
            key: accepted.key,
            device: accepted.device,
            device_type: accepted.device_type,
            early: accepted.early,
            tls,
            as_user: accepted.as_user,
        };
        // The connection gets its own task: this handshake's larger state ends here.
        conn::start(shard, setup);
        return;
    }
    // SAFETY-free hand-off: duplicate the descriptor into an owned one for the owner shard,
    // then drop this shard's stream (which closes only its own descriptor).
    let fd = match dup(&stream) {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(error = %e, "dup failed during hand-off");
            conn::reject(&mut stream, tls.as_deref_mut(), 503, "server busy").await;
            return;
        }
    };
    drop(stream);
    ShardMetrics::inc(&shard.metrics.handoffs_out);
    let handoff = Handoff {
        fd,
        peer,
        claims: accepted.claims,
        key: accepted.key,
        device: accepted.device,
        device_type: Some(accepted.device_type.as_str().to_owned()),
        early: accepted.early,
        tls: tls.map(|t| Box::new(t.into_session())),
        as_user: accepted.as_user,
    };
    shard.mesh.send(owner, MeshMsg::Handoff(Box::new(handoff)));
}

/// The owner's side of a hand-off.
pub fn adopt(shard: &Rc<Shard>, h: Handoff) {
    ShardMetrics::inc(&shard.metrics.handoffs_in);
    // SAFETY: `h.fd` is an open socket descriptor owned by this message; ownership moves into
    // the stream, which closes it on drop.
    let stream = unsafe { TcpStream::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(h.fd)) };
    let device_type = h
        .device_type
        .as_deref()
        .and_then(DeviceType::parse)
        .unwrap_or_default();
    let setup = Setup {
        stream,
        peer: h.peer,
        claims: h.claims,
        key: h.key,
        device: h.device,
        device_type,
        early: h.early,
        tls: h.tls.map(|t| Box::new(Tls::from_session(*t))),
        as_user: h.as_user,
    };
    conn::start(shard.clone(), setup);
}

fn dup(stream: &TcpStream) -> std::io::Result<OwnedFd> {
    // SAFETY: dup on a valid descriptor we hold; the result is a new descriptor we own.
    let fd = unsafe { libc::fcntl(stream.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by fcntl and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reads until the request head is complete, within `max` bytes; over TLS, runs the TLS
/// handshake on the way (what rustls wants to send is written as it comes).
async fn read_head(
    stream: &mut TcpStream,
    tls: &mut Option<Box<Tls>>,
    max: usize,
) -> Result<(Vec<u8>, http::UpgradeRequest), Reject> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    let mut out = Vec::new();
    loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|_| Reject::new(400, "read error"))?;
        if n == 0 {
            return Err(Reject::new(400, "connection closed during upgrade"));
        }
        match tls {
            None => buf.extend_from_slice(&chunk[..n]),
            Some(t) => {
                let read = t.read(&chunk[..n], &mut |p| buf.extend_from_slice(p));
                t.drain(&mut out);
                if !out.is_empty() {
                    let _ = stream.write_all(&out).await;
                    out.clear();
                }
                match read {
                    Ok(true) => {}
                    Ok(false) => return Err(Reject::new(0, "TLS closed during upgrade")),
                    Err(_) => return Err(Reject::new(0, "TLS handshake failed")),
                }
            }
        }
        if let Some(req) = http::parse_upgrade(&buf)? {
            return Ok((buf, req));
        }
        if buf.len() >= max {
            return Err(Reject::new(431, "upgrade request head too large"));
        }
    }
}

/// Cheap checks before the token is verified: the per-IP rate limit and the Origin allowlist.
fn admit(shard: &Shard, peer: SocketAddr, req: &http::UpgradeRequest) -> Result<(), Reject> {
    if !shard
        .ip_limiter
        .borrow_mut()
        .allow(peer.ip(), crate::shard::now_ms())
    {
        return Err(Reject::new(
            429,
            "too many connection attempts from this address",
        ));
    }
    let allowed = &shard.cfg.allowed_origins;
    if let Some(origin) = &req.origin {
        if !allowed.is_empty() && !allowed.iter().any(|a| a.eq_ignore_ascii_case(origin)) {
            return Err(Reject::new(403, "origin not allowed"));
        }
    }
    Ok(())
}

/// Token, device and impersonation checks on a parsed request.
fn authenticate(
    shard: &Shard,
    mut buf: Vec<u8>,
    req: http::UpgradeRequest,
) -> Result<Accepted, Reject> {
    let token = req
        .token
        .as_deref()
        .ok_or(Reject::new(401, "missing token"))?;
    if let Some(target) = req.as_user {
        return impersonate(shard, buf, token, target, req.key, req.head_len);
    }
    let claims = shard
        .verifier
        .verify(token)
        .map_err(|e| Reject::new(401, e.reason()))?;
    let device_type = match claims.device_type.as_deref().or(req.device_type.as_deref()) {
        None => DeviceType::Other,
        Some(t) => DeviceType::parse(t).ok_or(Reject::new(
            400,
            "unknown device_type (web, ios, android, desktop, other)",
        ))?,
    };
    let device = claims.device.clone().or(req.device);
    let early = buf.split_off(req.head_len);
    Ok(Accepted {
        claims,
        key: req.key,
        device,
        device_type,
        early,
        as_user: None,
    })
}

/// `?as=<user>`: an admin credential (a JWT with role `admin`, or the static admin token) opens
/// a read-only view of `target`. The session keeps the admin's identity and token expiry.
fn impersonate(
    shard: &Shard,
    mut buf: Vec<u8>,
    token: &str,
    target: String,
    key: String,
    head_len: usize,
) -> Result<Accepted, Reject> {
    if target.is_empty() || target.len() > shard.cfg.limits.max_id_bytes {
        return Err(Reject::new(400, "bad `as` user id"));
    }
    let claims = match crate::admin::api::admin_identity(shard, token) {
        Err((401, why)) => return Err(Reject::new(401, why)),
        Err(_) => return Err(Reject::new(403, "impersonation needs an admin token")),
        Ok(who) => match shard.verifier.verify(token) {
            Ok(claims) => claims,
            // The static admin token: no claims of its own; it lasts as long as the server's
            // configuration keeps it.
            Err(_) => Claims {
                sub: who.to_string(),
                exp: u64::MAX / 2,
                groups: Vec::new(),
                roles: vec!["admin".into()],
                device: None,
                device_type: None,
                region: None,
            },
        },
    };
    let early = buf.split_off(head_len);
    Ok(Accepted {
        claims,
        key,
        device: None,
        device_type: DeviceType::Other,
        early,
        as_user: Some(target),
    })
}
