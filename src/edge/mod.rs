//! The WebSocket edge: accepting sockets, the upgrade handshake, and serving connections.
//!
//! - [`http`]: upgrade request parsing and HTTP responses (pure).
//! - [`accept`]: per-shard accept loop; reads the upgrade, authenticates, and hands the socket
//!   to the owner shard of its user.
//! - [`conn`]: serves one connection on its owner shard for its whole life.
//! - [`outbox`]: the bounded, coalescing per-connection backlog (pure).

pub mod accept;
pub mod conn;
pub mod http;
pub mod outbox;
pub mod ratelimit;
pub mod subs;
pub mod tls;
