//! Socket plumbing shared by the listeners (the WebSocket edge and the admin port): binding
//! SO_REUSEPORT listeners, reserving a port for the shards, the accept loop's next connection,
//! and the panic guard every connection task runs under.

use std::future::Future;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;

use glommio::channels::local_channel::LocalReceiver;
use glommio::net::{TcpListener, TcpStream};
use socket2::{Domain, Protocol, Socket, Type};

use crate::metrics::ShardMetrics;
use crate::shard::runtime::Stop;

/// The key a client address is limited under (the edge's per-IP handshake rate, the admin
/// port's per-IP connection cap): IPv4 as is, IPv6 cut to `prefix_len` bits. An IPv4-mapped
/// IPv6 address (an IPv4 client of a dual-stack `[::]` listener) is its IPv4 address: cut to a
/// /64 it would be `::`, one key for every IPv4 client there is.
pub fn limit_key(ip: IpAddr, prefix_len: u8) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let keep = u32::from(prefix_len.min(128));
            let mask = u128::MAX.checked_shl(128 - keep).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
        }
        v4 => v4,
    }
}

/// Listen backlog per shard.
const LISTEN_BACKLOG: i32 = 4096;

/// Binds a listener socket a shard accepts on (SO_REUSEPORT: every shard binds the same
/// address and the kernel spreads connections over them).
pub fn bind(addr: SocketAddr, listen: bool) -> std::io::Result<Socket> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    if listen {
        sock.listen(LISTEN_BACKLOG)?;
    }
    Ok(sock)
}

/// A listening socket a server serves, kept (as a duplicate) so that an upgrade can hand it to
/// the next process: `role` is `ws`, `wss` or `admin`.
pub struct Listening {
    pub role: String,
    pub addr: SocketAddr,
    pub fd: OwnedFd,
}

/// One server's listening sockets: those it serves (duplicates, for an upgrade to hand over)
/// and those it received from the old process and its shards have not taken yet.
#[derive(Default)]
pub struct Sockets {
    serving: Mutex<Vec<Listening>>,
    /// In the order received; a taken one leaves `None`, so positions stay put.
    inherited: Mutex<Vec<(String, SocketAddr, Option<OwnedFd>)>>,
}

impl std::fmt::Debug for Sockets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let serving = self.serving.lock().map_or(0, |v| v.len());
        let inherited = self
            .inherited
            .lock()
            .map_or(0, |v| v.iter().filter(|l| l.2.is_some()).count());
        f.debug_struct("Sockets")
            .field("serving", &serving)
            .field("inherited", &inherited)
            .finish()
    }
}

impl Sockets {
    /// Duplicates of every listening socket served (for the next process).
    pub fn serving(&self) -> std::io::Result<Vec<Listening>> {
        let held = self.serving.lock().unwrap_or_else(|e| e.into_inner());
        held.iter()
            .map(|l| {
                Ok(Listening {
                    role: l.role.clone(),
                    addr: l.addr,
                    fd: l.fd.try_clone()?,
                })
            })
            .collect()
    }

    /// Sockets received from the old process: the shards take them instead of binding anew.
    pub fn inherit(&self, sockets: Vec<Listening>) {
        self.inherited
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(sockets.into_iter().map(|l| (l.role, l.addr, Some(l.fd))));
    }

    /// The address an inherited socket of `role` listens on, if one matches `want` (any port
    /// on the same IP when `want`'s is 0).
    pub fn inherited_addr(&self, role: &str, want: SocketAddr) -> Option<SocketAddr> {
        let held = self.inherited.lock().unwrap_or_else(|e| e.into_inner());
        held.iter()
            .find(|(r, addr, fd)| {
                fd.is_some()
                    && r == role
                    && (*addr == want || (want.port() == 0 && addr.ip() == want.ip()))
            })
            .map(|l| l.1)
    }

    /// Every socket served goes back to be taken again by the shards (after an upgrade failed
    /// late, with this process's accept loops already stopped): the same sockets, so the
    /// connections queued in them are not lost.
    pub fn reclaim(&self) {
        let served = std::mem::take(&mut *self.serving.lock().unwrap_or_else(|e| e.into_inner()));
        self.inherit(served);
    }

    /// Inherited sockets no shard took (their address left the configuration).
    pub fn take_unclaimed(&self) -> Vec<Listening> {
        std::mem::take(&mut *self.inherited.lock().unwrap_or_else(|e| e.into_inner()))
            .into_iter()
            .filter_map(|(role, addr, fd)| fd.map(|fd| Listening { role, addr, fd }))
            .collect()
    }

    /// This shard's listening sockets for `addr`: of the inherited ones, those whose position
    /// is `shard` modulo `shards` (so each is served, whatever either process's shard count);
    /// with none, a new one bound with SO_REUSEPORT.
    fn listen(
        &self,
        role: &str,
        addr: SocketAddr,
        shard: usize,
        shards: usize,
    ) -> std::io::Result<Vec<TcpListener>> {
        use std::os::fd::{FromRawFd, IntoRawFd};
        let mine: Vec<OwnedFd> = {
            let mut held = self.inherited.lock().unwrap_or_else(|e| e.into_inner());
            let mut matching = 0;
            let mut mine = Vec::new();
            // Taken ones stay in place (their fd gone), so every shard counts the same
            // positions.
            for (r, a, fd) in held.iter_mut() {
                if r == role && *a == addr {
                    if matching % shards.max(1) == shard {
                        mine.extend(fd.take());
                    }
                    matching += 1;
                }
            }
            mine
        };
        let socks: Vec<OwnedFd> = if mine.is_empty() {
            vec![bind(addr, true)?.into()]
        } else {
            mine
        };
        let mut out = Vec::with_capacity(socks.len());
        for fd in socks {
            self.serving
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(Listening {
                    role: role.to_owned(),
                    addr,
                    fd: fd.try_clone()?,
                });
            // SAFETY: a bound, listening socket whose ownership moves into the listener.
            out.push(unsafe { TcpListener::from_raw_fd(fd.into_raw_fd()) });
        }
        Ok(out)
    }
}

/// Reserves `want` for the shards: refuses a port another process holds (SO_REUSEPORT would
/// otherwise let a second instance share it silently and split the users between two servers),
/// then binds it without listening — port 0 becomes a real port that every shard can bind, and a
/// non-listening socket receives no connections. Drop it once all shards listen.
pub fn reserve_port(want: SocketAddr) -> std::io::Result<(Socket, SocketAddr)> {
    if want.port() != 0 {
        let probe = Socket::new(Domain::for_address(want), Type::STREAM, None)?;
        probe.set_reuse_address(true)?;
        probe.bind(&want.into())?;
    }
    let reserve = bind(want, false)?;
    let addr = reserve
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .unwrap_or(want);
    Ok((reserve, addr))
}

/// The next accepted connection, or `None` once `stop` fires. Accept errors (EMFILE and
/// friends) are logged and followed by a short pause instead of a spin.
pub async fn next_connection(
    listener: &TcpListener,
    stop: &LocalReceiver<()>,
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
                tracing::warn!(error = %e, "accept failed");
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Runs a connection-scoped task so that a panic in it ends that task only: a panic in a
/// detached glommio task would otherwise take the whole shard's executor down. Whatever the
/// task owned is dropped (a WebSocket connection's drop guard closes its session). Counted in
/// `conn_panics`.
pub fn guarded<F: Future<Output = ()>>(metrics: Arc<ShardMetrics>, task: F) -> Guarded<F> {
    Guarded { metrics, task }
}

pin_project_lite::pin_project! {
    /// [`guarded`]'s future. A struct rather than an `async fn`: an `async fn` keeps its
    /// argument and the future it awaits side by side, so every live connection's task held its
    /// state twice (docs/BENCHMARKS.md, "Issue 14").
    pub struct Guarded<F> {
        metrics: Arc<ShardMetrics>,
        #[pin]
        task: F,
    }
}

impl<F: Future<Output = ()>> Future for Guarded<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        let task = this.task;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| task.poll(cx))) {
            Ok(p) => p,
            // The executor drops this future (and with it the task) once it is ready.
            Err(_) => {
                ShardMetrics::inc(&this.metrics.conn_panics);
                tracing::error!(
                    "a connection task panicked; that connection was dropped, the shard goes on"
                );
                Poll::Ready(())
            }
        }
    }
}

/// Takes this shard's listening sockets for `addr` (inherited from an upgrade's old process, or
/// bound anew) and spawns `accept(listener, stop)` on each, where `stop` fires when the returned
/// [`Stop`] is called. `role` (`ws`, `wss`, `admin`) names them in errors and in a hand-over.
pub fn serve<F: Future<Output = ()> + 'static>(
    shard: &crate::shard::Shard,
    role: &str,
    addr: SocketAddr,
    accept: impl Fn(TcpListener, LocalReceiver<()>) -> F,
) -> Result<Stop, String> {
    let listeners = shard
        .shared()
        .sockets
        .listen(role, addr, usize::from(shard.ix()), shard.shards())
        .map_err(|e| format!("{role} listen on {addr}: {e}"))?;
    let mut stops = Vec::with_capacity(listeners.len());
    for listener in listeners {
        let (stop_tx, stop_rx) = glommio::channels::local_channel::new_bounded(1);
        glommio::spawn_local(accept(listener, stop_rx)).detach();
        stops.push(stop_tx);
    }
    Ok(Box::new(move || {
        for stop in stops {
            let _ = stop.try_send(());
        }
    }))
}
