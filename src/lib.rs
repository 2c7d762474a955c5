//! # presenced
//!
//! A thread-per-core real-time presence server. See `docs/ARCHITECTURE.md` for the picture.
//!
//! # Layout
//!
//! The pipeline, outside in:
//!
//! - [`edge`]: sockets. Per-shard accept loop → upgrade request ([`edge::http`]) → JWT check
//!   ([`auth`]) → hand-off to the owner shard → one task per connection ([`edge::conn`]) with
//!   a bounded, coalescing outbox ([`edge::outbox`]).
//! - [`protocol`]: the wire format. WebSocket frame codec ([`protocol::ws`]), client ops
//!   ([`protocol::ops`]), pre-framed server events ([`protocol::events`]).
//! - [`shard`]: the per-core runtime. [`shard::Shard`] owns its users and groups and routes every
//!   operation to the owner shard over the [`shard::mesh`]; [`shard::runtime`] starts the
//!   executors.
//! - [`presence`]: the presence model — registry, groups, watcher counts — pure and
//!   proptest-checked.
//! - [`config`], [`metrics`]: configuration and per-shard counters.
//! - [`topology`]: the CPU report behind `presenced topology`.
//! - [`history`]: presence history off the real-time path — a bounded queue into a writer
//!   thread, the embedded store (redb) or ScyllaDB, and the analytics the admin API answers.
//! - [`admin`]: the admin/stats port — health, Prometheus metrics, the JSON API, kicks, and the
//!   live dashboard — served by the shards over the mesh.

pub mod admin;
pub mod auth;
pub mod config;
pub mod edge;
pub mod history;
pub mod metrics;
pub mod presence;
pub mod protocol;
pub mod shard;
pub mod topology;

pub use config::Config;

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
pub use shard::runtime::{start, ServerHandle, StartError};
