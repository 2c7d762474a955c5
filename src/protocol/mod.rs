//! Wire protocol v1 (SPEC §4, `docs/PROTOCOL.md`), with no I/O in it.
//!
//! - [`ops`]: client → server JSON ops, parsed once at the edge into typed values, with every
//!   input limit applied; bad input becomes an [`ops::OpError`] value, never a panic.
//! - [`events`]: server → client events, serialised straight into complete WebSocket frames so a
//!   shard can serialise a presence event once and hand the same bytes to every subscriber.
//! - [`ws`]: the WebSocket frame codec (RFC 6455) on top of tungstenite's frame header: bytes in,
//!   frames out; no buffers held while a connection is idle.

pub mod events;
pub mod ops;
pub mod ws;

pub use ops::{ErrorCode, Op, OpError, OpLimits, Request, RequestId};
