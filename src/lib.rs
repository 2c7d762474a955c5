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

pub mod auth;
pub mod config;
pub mod edge;
pub mod metrics;
pub mod presence;
pub mod protocol;
pub mod shard;
pub mod topology;

pub use config::Config;
pub use shard::runtime::{start, ServerHandle, StartError};
