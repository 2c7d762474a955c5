//! Accepting sockets and the upgrade handshake.
//!
//! Every shard accepts on its own SO_REUSEPORT listener. The accepting shard reads the upgrade
//! request (bounded in size and time, and in how many it reads at once), authenticates the
//! token, and — when another shard owns the user — hands the socket and any bytes already read
//! to that owner as a job over the mesh. The owner answers the upgrade and serves the
//! connection, so all of a user's devices live on one shard.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use glommio::sync::StaticPermit;
use rustls::ServerConfig;

use super::conn::{self, Accepted, Setup};
use super::http::{self, Reject};
use super::proxy::{self, AddrSource, ClientAddr, Proxied};
use super::tls::Tls;
use super::Edge;
use crate::auth::Claims;
use crate::metrics::ShardMetrics;
use crate::presence::DeviceType;
use crate::shard::{now_ms, Admission, Shard};

/// Accepts until `stop` fires, one handshake task per socket. `secure`: this listener speaks
/// TLS with that configuration.
pub async fn accept_loop(
    edge: Rc<Edge>,
    listener: TcpListener,
    secure: Option<Arc<ServerConfig>>,
    stop: glommio::channels::local_channel::LocalReceiver<()>,
) {
    let wait = Duration::from_millis(edge.shard.cfg().limits.handshake_wait_ms);
    loop {
        // Bounded work per shard: at most `max_handshakes_in_flight` upgrades are read at once
        // (each holds buffers, a timer, maybe a TLS session). While they are all taken, the
        // next sockets wait in the kernel's listen backlog, not here; only once no slot has
        // freed for `handshake_wait_ms` is the next one accepted, and answered 503 if there is
        // still no slot for it then.
        edge.slot_freed(wait).await;
        let Some(stream) = crate::net::next_connection(&listener, &stop).await else {
            return;
        };
        let accepted = Instant::now();
        let Ok(peer) = stream.peer_addr() else {
            continue;
        };
        let metrics = edge.shard.metrics().clone();
        // The per-IP rate first, before a slot, a TLS handshake or a read is spent on the
        // socket: one address cannot hold the slots everyone else needs. A trusted proxy
        // speaks for many clients: theirs are limited once the handshake has named them.
        if !edge.trusted.contains(peer.ip())
            && !edge.ip_limiter.borrow_mut().allow(peer.ip(), now_ms())
        {
            ShardMetrics::inc(&metrics.handshakes_rate_limited);
            let why = "too many connection attempts from this address";
            edge.refuse(stream, secure.is_some(), 429, why);
            continue;
        }
        let Ok(permit) = edge.handshakes.try_acquire_static_permit(1) else {
            ShardMetrics::inc(&metrics.handshakes_unavailable);
            edge.refuse(
                stream,
                secure.is_some(),
                503,
                "too many handshakes in progress",
            );
            continue;
        };
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
        let task = handshake(edge.clone(), stream, peer, tls, accepted, permit);
        glommio::spawn_local(crate::net::guarded(metrics, task)).detach();
    }
}

impl Edge {
    /// Waits until a handshake slot is free, or `wait` has passed.
    async fn slot_freed(&self, wait: Duration) {
        if self.handshakes.available() > 0 {
            return; // the usual case: no timer
        }
        futures_lite::future::or(
            async {
                let _ = self.handshakes.acquire_permit(1).await;
            },
            glommio::timer::sleep(wait),
        )
        .await;
    }

    /// Answers a socket refused at accept, before anything of it is read. Plain: the status,
    /// then a short linger, so that the request the client already sent does not turn the
    /// close into a reset that loses the answer. TLS: closed unanswered (a plaintext answer
    /// would be garbage to a TLS client, and a refused socket gets no TLS handshake). At most
    /// `max_handshakes_in_flight` refusals linger at once; past that a refused socket is
    /// closed at once.
    fn refuse(&self, stream: TcpStream, tls: bool, status: u16, reason: &'static str) {
        if tls {
            return;
        }
        let Ok(permit) = self.refusals.try_acquire_static_permit(1) else {
            return;
        };
        glommio::spawn_local(async move {
            let mut stream = stream;
            if stream
                .write_all(&http::error_response(status, reason))
                .await
                .is_ok()
            {
                conn::linger(&mut stream).await;
            }
            drop(permit);
        })
        .detach();
    }
}

async fn handshake(
    edge: Rc<Edge>,
    mut stream: TcpStream,
    peer: SocketAddr,
    mut tls: Option<Box<Tls>>,
    accepted: Instant,
    permit: StaticPermit,
) {
    let shard = &edge.shard;
    let limits = &shard.cfg().limits;
    let deadline = Duration::from_millis(limits.handshake_timeout_ms);
    let max = limits.max_header_bytes;
    let reading = async {
        // The PROXY header comes first, before TLS: the proxy writes it, not the client.
        let (proxied, early) = if shard.cfg().proxy_protocol {
            let (source, early) = read_proxy_header(&mut stream, max)
                .await
                .map_err(Refusal::Proxy)?;
            let proxied = source.map_or(Proxied::Unnamed, |a| Proxied::Named(a.ip()));
            // A client the proxy names meets the per-IP limit now, before a TLS handshake or
            // a read is spent on it, as a direct client does at accept.
            if let Some(client) = proxy::client_named_early(peer.ip(), proxied, &edge.trusted) {
                if !edge.ip_limiter.borrow_mut().allow(client, now_ms()) {
                    return Err(Refusal::Http(Reject::new(
                        429,
                        "too many connection attempts from this address",
                    )));
                }
            }
            (proxied, early)
        } else {
            (Proxied::Off, Vec::new())
        };
        let geo_header = shard.cfg().geo.header.as_deref();
        let (buf, req) = read_head(&mut stream, &mut tls, max, early, geo_header)
            .await
            .map_err(Refusal::Http)?;
        Ok((proxied, buf, req))
    };
    let head = futures_lite::future::or(reading, async {
        glommio::timer::sleep(deadline).await;
        Err(Refusal::Http(Reject::new(
            408,
            "upgrade request not received in time",
        )))
    })
    .await;
    let head = match head {
        Ok(head) => Ok(head),
        Err(Refusal::Http(reject)) => Err(reject),
        Err(Refusal::Proxy(why)) => {
            ShardMetrics::inc(&shard.metrics().handshakes_bad_proxy_header);
            if edge.trusted.contains(peer.ip()) {
                tracing::warn!(peer = %peer, why, "connection closed: bad PROXY protocol header from a trusted proxy (is the proxy sending it? `proxy_protocol` must match)");
            } else {
                tracing::info!(peer = %peer, why, "connection closed: bad PROXY protocol header");
            }
            // No answer: the peer speaks neither our HTTP nor, maybe, plaintext.
            conn::reject(&mut stream, None, 0, why).await;
            return;
        }
    };
    let result = head
        .and_then(|(proxied, buf, req)| {
            let client = edge.client_ip(peer, proxied, req.forwarded_for.as_deref())?;
            Ok((client, buf, req))
        })
        .and_then(|(client, buf, req)| edge.check_origin(&req).map(|()| (client, buf, req)))
        .and_then(|(client, buf, mut req)| {
            // Shedding load costs less than a signature check.
            if shard.congested() {
                return Err(Reject::new(503, "server overloaded: retry later"));
            }
            let geo = req.geo.take();
            let mut a = authenticate(shard, client.ip, accepted, buf, req)?;
            // The token's `region` claim wins; else a trusted proxy's geo header; else the
            // database.
            if a.admission.region.is_none() {
                a.admission.region = edge.region(&client, geo).map(Into::into);
            }
            Ok(a)
        });
    let a = match result {
        Ok(a) => a,
        Err(reject) => {
            let m = shard.metrics();
            let counter = match reject.status {
                401 => &m.handshakes_unauthorized,
                403 => &m.handshakes_forbidden,
                408 => &m.handshakes_timed_out,
                429 => &m.handshakes_rate_limited,
                503 => &m.handshakes_unavailable,
                _ => &m.handshakes_bad_request,
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
    // The handshake is over: the connection's own task (here or on the owner) holds no permit.
    drop(permit);
    // An impersonation is served where the impersonated user lives: it must see what is sent
    // to that user's sessions.
    let owner = shard.owner(&a.admission.user);
    if owner == shard.ix() {
        let setup = Setup {
            stream,
            tls,
            accepted: a,
        };
        // The connection gets its own task: this handshake's larger state ends here.
        conn::start(shard.clone(), setup);
        return;
    }
    // Duplicate the descriptor into an owned one for the owner shard, then drop this shard's
    // stream (which closes only its own descriptor).
    let fd = match dup(&stream) {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(error = %e, "dup failed during hand-off");
            conn::reject(&mut stream, tls.as_deref_mut(), 503, "server busy").await;
            return;
        }
    };
    drop(stream);
    ShardMetrics::inc(&shard.metrics().handoffs_out);
    let handoff = Handoff {
        fd,
        tls: tls.map(|t| Box::new(t.into_session())),
        accepted: a,
    };
    shard.send_job(
        owner,
        Box::new(move |owner: &Rc<Shard>| adopt(owner, handoff)),
    );
}

/// An authenticated socket on its way to the shard that owns its user (a mesh job: never
/// dropped; if the owner is stopping, dropping it closes the socket).
struct Handoff {
    fd: OwnedFd,
    /// The TLS session, when the socket came in over TLS: it moves with the descriptor.
    tls: Option<Box<rustls::ServerConnection>>,
    accepted: Accepted,
}

/// The owner's side of a hand-off.
fn adopt(shard: &Rc<Shard>, h: Handoff) {
    ShardMetrics::inc(&shard.metrics().handoffs_in);
    // SAFETY: `h.fd` is an open socket descriptor owned by this message; ownership moves into
    // the stream, which closes it on drop.
    let stream = unsafe { TcpStream::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(h.fd)) };
    let setup = Setup {
        stream,
        tls: h.tls.map(|t| Box::new(Tls::from_session(*t))),
        accepted: h.accepted,
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

/// Why a handshake ended before its request was read.
enum Refusal {
    /// Answered with an HTTP status (or closed, for status 0).
    Http(Reject),
    /// No valid PROXY protocol header where one was required: closed unanswered.
    Proxy(&'static str),
}

/// Reads the PROXY protocol header that starts the connection, within `max` bytes. Returns the
/// client address it names (`None` for the proxy's own connections) and the bytes read past it,
/// which belong to the client's stream.
async fn read_proxy_header(
    stream: &mut TcpStream,
    max: usize,
) -> Result<(Option<SocketAddr>, Vec<u8>), &'static str> {
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|_| "read error before the PROXY protocol header")?;
        if n == 0 {
            return Err("connection closed before its PROXY protocol header");
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(h) = proxy::parse_proxy_header(&buf)? {
            let rest = buf.split_off(h.len);
            return Ok((h.source, rest));
        }
        if buf.len() >= max {
            return Err("PROXY protocol header longer than limits.max_header_bytes");
        }
    }
}

/// Reads until the request head is complete, within `max` bytes; over TLS, runs the TLS
/// handshake on the way (what rustls wants to send is written as it comes). `early`: bytes
/// already read from the socket (after a PROXY header), taken first.
async fn read_head(
    stream: &mut TcpStream,
    tls: &mut Option<Box<Tls>>,
    max: usize,
    early: Vec<u8>,
    geo_header: Option<&str>,
) -> Result<(Vec<u8>, http::UpgradeRequest), Reject> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    let mut out = Vec::new();
    let mut early = Some(early).filter(|e| !e.is_empty());
    loop {
        let taken;
        let data: &[u8] = match early.take() {
            Some(e) => {
                taken = e;
                &taken
            }
            None => {
                let n = stream
                    .read(&mut chunk)
                    .await
                    .map_err(|_| Reject::new(400, "read error"))?;
                if n == 0 {
                    return Err(Reject::new(400, "connection closed during upgrade"));
                }
                &chunk[..n]
            }
        };
        match tls {
            None => buf.extend_from_slice(data),
            Some(t) => {
                let read = t.read(data, &mut |p| buf.extend_from_slice(p));
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
        if let Some(req) = http::parse_upgrade(&buf, geo_header)? {
            return Ok((buf, req));
        }
        if buf.len() >= max {
            return Err(Reject::new(431, "upgrade request head too large"));
        }
    }
}

impl Edge {
    /// The client's address ([`proxy::resolve`]), counted by where it came from. It meets the
    /// per-IP handshake limit here unless it already did: a direct client at accept, a client a
    /// PROXY header named as that was read. So does a trusted proxy's own connection that names
    /// no client: it shares the proxy's budget rather than escaping the limit.
    fn client_ip(
        &self,
        peer: SocketAddr,
        proxied: Proxied,
        forwarded_for: Option<&str>,
    ) -> Result<ClientAddr, Reject> {
        let client = proxy::resolve(peer.ip(), proxied, forwarded_for, &self.trusted);
        let m = self.shard.metrics();
        if client.ignored {
            ShardMetrics::inc(&m.proxy_headers_ignored);
            tracing::debug!(peer = %peer, "PROXY header or X-Forwarded-For not believed: ignored");
        }
        match client.source {
            AddrSource::Peer => {}
            AddrSource::ProxyProtocol => ShardMetrics::inc(&m.client_addr_proxy_protocol),
            AddrSource::ForwardedFor => ShardMetrics::inc(&m.client_addr_forwarded_for),
        }
        let limited = !self.trusted.contains(peer.ip())
            || proxy::client_named_early(peer.ip(), proxied, &self.trusted).is_some();
        if !limited && !self.ip_limiter.borrow_mut().allow(client.ip, now_ms()) {
            return Err(Reject::new(
                429,
                "too many connection attempts from this address",
            ));
        }
        Ok(client)
    }

    /// The region of `client` whose token has none: `geo.header`'s value when a trusted proxy
    /// wrote the request's headers, else `geo.database`'s answer for the address.
    fn region(&self, client: &ClientAddr, header: Option<String>) -> Option<String> {
        let m = self.shard.metrics();
        // A CDN's country code: short and printable, compared upper-cased (as the database's
        // are); `XX` (unknown) and `T1` (Tor) are Cloudflare's "no country".
        let header = header
            .map(|v| v.to_ascii_uppercase())
            .filter(|v| (1..=64).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_graphic()))
            .filter(|v| v != "XX" && v != "T1");
        if let Some(v) = header {
            if client.headers_trusted {
                ShardMetrics::inc(&m.geo_from_header);
                return Some(v);
            }
            ShardMetrics::inc(&m.proxy_headers_ignored);
        }
        let geo = self.shard.shared().geo.as_ref()?;
        let region = geo.region(client.ip);
        ShardMetrics::inc(if region.is_some() {
            &m.geo_found
        } else {
            &m.geo_not_found
        });
        region
    }

    /// The Origin allowlist (a request without `Origin`, not a browser's, passes).
    fn check_origin(&self, req: &http::UpgradeRequest) -> Result<(), Reject> {
        let allowed = &self.shard.cfg().allowed_origins;
        if let Some(origin) = &req.origin {
            if !allowed.is_empty() && !allowed.iter().any(|a| a.eq_ignore_ascii_case(origin)) {
                return Err(Reject::new(403, "origin not allowed"));
            }
        }
        Ok(())
    }
}

/// Token, device and impersonation checks on a parsed request.
fn authenticate(
    shard: &Shard,
    peer: IpAddr,
    at: Instant,
    mut buf: Vec<u8>,
    req: http::UpgradeRequest,
) -> Result<Accepted, Reject> {
    let token = req
        .token
        .as_deref()
        .ok_or(Reject::new(401, "missing token"))?;
    let admission = match req.as_user {
        Some(target) => observer_admission(shard, peer, token, target)?,
        None => {
            let mut claims = shard
                .verifier()
                .verify(token)
                .map_err(|e| Reject::new(401, e.reason()))?;
            claims
                .check_sub(shard.cfg().limits.max_id_bytes)
                .map_err(|why| Reject::new(401, why))?;
            let device_type = match claims.device_type.as_deref().or(req.device_type.as_deref()) {
                None => DeviceType::Other,
                Some(t) => DeviceType::parse(t).ok_or(Reject::new(
                    400,
                    "unknown device_type (web, ios, android, desktop, other)",
                ))?,
            };
            let device = claims.device.take().or(req.device);
            admission(claims, device, device_type, peer, None)
        }
    };
    Ok(Accepted {
        admission,
        key: req.key,
        early: buf.split_off(req.head_len),
        at,
    })
}

fn admission(
    claims: Claims,
    device: Option<String>,
    device_type: DeviceType,
    peer: IpAddr,
    observe: Option<String>,
) -> Admission {
    let (user, observer) = match observe {
        Some(target) => (target.as_str().into(), Some(claims.sub.as_str().into())),
        None => (claims.sub.as_str().into(), None),
    };
    Admission {
        user,
        expires_at: claims.exp,
        device: device.map(Into::into),
        device_type,
        region: claims.region.map(Into::into),
        groups: claims.groups,
        roles: claims.roles,
        ip: peer,
        observer,
    }
}

/// `?as=<user>`: an admin credential (a JWT with role `admin`, or the static admin token) opens
/// a read-only view of `target`. The session keeps the admin's identity and token expiry.
fn observer_admission(
    shard: &Shard,
    peer: IpAddr,
    token: &str,
    target: String,
) -> Result<Admission, Reject> {
    if target.is_empty() || target.len() > shard.cfg().limits.max_id_bytes {
        return Err(Reject::new(400, "bad `as` user id"));
    }
    let static_token = shard.cfg().admin.token.as_deref();
    let admin = match crate::auth::admin_identity(shard.verifier(), static_token, token) {
        Ok(admin) => admin,
        Err(e) if e.status == 401 => return Err(Reject::new(401, e.reason)),
        Err(_) => return Err(Reject::new(403, "impersonation needs an admin token")),
    };
    // The static admin token has no claims of its own; it lasts as long as the server's
    // configuration keeps it.
    let claims = admin.claims.unwrap_or_else(|| Claims {
        sub: admin.id.to_string(),
        exp: u64::MAX / 2,
        groups: Vec::new(),
        roles: vec!["admin".into()],
        device: None,
        device_type: None,
        region: None,
    });
    Ok(admission(
        claims,
        None,
        DeviceType::Other,
        peer,
        Some(target),
    ))
}
