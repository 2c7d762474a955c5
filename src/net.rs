//! Socket plumbing shared by the listeners (the WebSocket edge and the admin port): binding
//! SO_REUSEPORT listeners, reserving a port for the shards, the accept loop's next connection,
//! and the panic guard every connection task runs under.

use std::future::Future;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
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

/// A listening glommio socket for this shard.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use std::os::fd::{FromRawFd, IntoRawFd};
    let sock = bind(addr, true)?;
    // SAFETY: a freshly bound, listening socket whose ownership moves into the listener.
    Ok(unsafe { TcpListener::from_raw_fd(sock.into_raw_fd()) })
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
pub async fn guarded(metrics: Arc<ShardMetrics>, task: impl Future<Output = ()>) {
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

/// Binds this shard's listener on `addr` and spawns `accept(listener, stop)` on it, where
/// `stop` fires when the returned [`Stop`] is called. `what` names the listener in errors.
pub fn serve<F: Future<Output = ()> + 'static>(
    what: &str,
    addr: SocketAddr,
    accept: impl FnOnce(TcpListener, LocalReceiver<()>) -> F,
) -> Result<Stop, String> {
    let listener = listen(addr).map_err(|e| format!("{what} listen on {addr}: {e}"))?;
    let (stop_tx, stop_rx) = glommio::channels::local_channel::new_bounded(1);
    glommio::spawn_local(accept(listener, stop_rx)).detach();
    Ok(Box::new(move || {
        let _ = stop_tx.try_send(());
    }))
}
