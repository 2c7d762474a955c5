//! # presenced
//!
//! A thread-per-core real-time presence server. See `docs/ARCHITECTURE.md` for the picture.
//!
//! # Layout
//!
//! Bottom-up; each layer uses only the layers below it (docs/ARCHITECTURE.md has the picture):
//!
//! 1. Pure cores, no I/O: [`protocol`] (WebSocket codec, client ops, pre-framed events),
//!    [`presence`] (registry, groups, watcher counts — proptest-checked), [`auth`] (JWT),
//!    [`config`] (parsed once, validated into a [`config::ValidConfig`]), [`metrics`], [`geo`]
//!    (regions from a MaxMind DB, loaded once and shared read-only).
//! 2. [`shard`]: the per-core runtime — the session layer ([`shard::session`]: open, apply an
//!    op, close), the [`shard::mesh`] between shards, and the one generic door into any shard
//!    ([`shard::invoke`]: `invoke_on`/`map_reduce`). It imports no driver.
//! 3. Drivers: [`edge`] (sockets to sessions: accept, upgrade, JWT, hand-off, the socket
//!    driver), [`admin`] (HTTP to questions put to shards: API, metrics, dashboard),
//!    [`history`] (a writer thread fed over a bounded channel). [`net`] is their shared
//!    socket plumbing.
//! 4. [`server`]: wires them together ([`start`], [`start_with`] for an upgrade's new
//!    process); `main.rs` is the CLI around it.
//! 5. [`ops`]: what runs beside the server for operators — systemd's notify protocol and
//!    watchdog ([`ops::notify`], [`ops::watchdog`]), stall reports ([`ops::stall`]), and the
//!    zero-downtime upgrade ([`ops::upgrade`] over the control socket, [`ops::handover`] its
//!    byte format).
//!
//! [`topology`] is the CPU report behind `presenced topology`.

pub mod admin;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod edge;
pub mod geo;
pub mod history;
pub mod metrics;
pub mod net;
pub mod ops;
pub mod presence;
pub mod protocol;
pub mod server;
pub mod shard;
pub mod topology;
pub mod webhooks;

pub use config::{Config, ValidConfig};

/// One descriptor per connection: lifts the soft open-file limit to the hard one (a common soft
/// default of 1024 would cap a server, or a load generator, at a thousand sockets). Returns the
/// limit now in force.
pub fn raise_nofile() -> Option<u64> {
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return None;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
        Some(lim.rlim_cur)
    }
}
pub use server::{start, start_with, Doors, ServerHandle, StartError, Takeover};
