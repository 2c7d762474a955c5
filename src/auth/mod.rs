//! JWT authentication for the WebSocket upgrade (SPEC §4, §7). Pure: no sockets, no clocks other
//! than "now" for `exp`/`nbf`.
//!
//! # Layout
//! - [`config`]: the `[auth]` table as written by the operator.
//! - `keys`: PEM and JWKS files to verification keys, each bound to one algorithm, probed at load.
//! - `verifier`: [`Verifier`], built once at startup and shared by every shard through `Arc`;
//!   `header` is its allocation-free first look at a token (`alg`, `kid`).
//! - [`admin`]: who is an admin (static token or `admin` role).
//! - [`claims`]: what a verified token tells the server ([`Claims`]).
//! - `error`: [`AuthError`] (client's fault → 401 body) and [`AuthSetupError`] (operator's fault).
//! - `mint`: signing tokens for `presenced token` and tests.
//!
//! Security stance: the key decides the algorithm, never the token. Each key verifies exactly one
//! algorithm (the shared secret: the HMAC ones listed), so `alg: none` and the "RSA public key used
//! as HMAC secret" trick have no key to be checked against.

pub mod admin;
pub mod claims;
pub mod config;
mod error;
mod header;
mod keys;
mod mint;
mod verifier;

#[cfg(test)]
mod tests;

pub use admin::{admin_identity, Admin, Identity, NotAdmin};
pub use claims::Claims;
pub use config::{AuthConfig, KeyConfig, LEEWAY_S_MAX};
pub use error::{AuthError, AuthSetupError};
pub use jsonwebtoken::{Algorithm, EncodingKey};
pub use mint::{mint, mint_hs256, TokenSpec};
pub use verifier::Verifier;
