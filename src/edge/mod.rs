//! The WebSocket edge: sockets in, sessions out. Nothing here decides what an op means (that is
//! `shard::session`); the edge accepts, authenticates, routes a socket to its owner shard and
//! moves bytes.
//!
//! - [`http`]: upgrade request parsing and HTTP responses (pure).
//! - [`accept`]: per-shard accept loop; reads the upgrade, authenticates, and hands the socket
//!   to the owner shard of its user.
//! - [`conn`]: the socket driver of one connection on its owner shard, for its whole life.
//! - [`proxy`]: the client's address behind trusted proxies: PROXY protocol, `X-Forwarded-For`
//!   (pure).
//! - [`ratelimit`]: the per-IP handshake limiter (pure).
//! - [`tls`]: rustls driven from the connection's poll loop.

pub mod accept;
pub mod conn;
pub mod http;
pub mod proxy;
pub mod ratelimit;
pub mod tls;

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

use glommio::sync::Semaphore;
use rustls::ServerConfig;

use crate::shard::runtime::Stop;
use crate::shard::Shard;
use proxy::TrustedProxies;
use ratelimit::IpLimiter;

/// The edge's per-shard state, shared by the shard's listeners (plain and TLS).
pub struct Edge {
    shard: Rc<Shard>,
    /// Per-IP handshake buckets for connections accepted by this shard.
    ip_limiter: RefCell<IpLimiter>,
    /// Handshakes in progress on this shard (`limits.max_handshakes_in_flight`).
    handshakes: Rc<Semaphore>,
    /// Sockets refused at accept that are still being answered (as many as handshakes).
    refusals: Rc<Semaphore>,
    /// `trusted_proxies`, parsed.
    trusted: TrustedProxies,
}

impl Edge {
    pub fn new(shard: Rc<Shard>) -> Rc<Edge> {
        let l = &shard.cfg().limits;
        Rc::new(Edge {
            ip_limiter: RefCell::new(IpLimiter::new(
                l.handshake_rate_per_ip,
                l.max_tracked_ips,
                l.ipv6_prefix_len,
            )),
            handshakes: Rc::new(Semaphore::new(l.max_handshakes_in_flight as u64)),
            refusals: Rc::new(Semaphore::new(l.max_handshakes_in_flight as u64)),
            // Validated with the configuration: an entry that does not parse never gets here.
            trusted: TrustedProxies::parse(&shard.cfg().trusted_proxies).unwrap_or_default(),
            shard,
        })
    }

    /// Binds this shard's client listeners and starts accepting on each; `with TLS` where the
    /// listener has a TLS configuration. Returns how to stop them.
    pub fn listen(
        self: &Rc<Self>,
        listeners: &[(SocketAddr, Option<Arc<ServerConfig>>)],
    ) -> Result<Vec<Stop>, String> {
        listeners
            .iter()
            .map(|(addr, tls)| {
                let role = if tls.is_some() { "wss" } else { "ws" };
                crate::net::serve(&self.shard, role, *addr, |listener, stop| {
                    accept::accept_loop(self.clone(), listener, tls.clone(), stop)
                })
            })
            .collect()
    }
}
