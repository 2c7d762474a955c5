//! The `[auth]` config table: raw, operator-written values. [`Verifier::new`](super::Verifier::new)
//! turns them into typed keys once at startup ("parse, don't validate"), so nothing here is looked
//! at again on the handshake path.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Largest accepted `leeway_s`. Clock skew between issuer and server is seconds, not hours; the bound
/// also keeps jsonwebtoken's `now - leeway` / `nbf > now + leeway` arithmetic far from overflow.
pub const LEEWAY_S_MAX: u64 = 3600;

/// `[auth]`: which keys may sign client tokens and which claims are checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// HMAC algorithms accepted with the top-level `jwt_secret`. Narrow it (e.g. `["HS512"]`) when
    /// the issuer only ever uses one.
    pub secret_algorithms: Vec<String>,
    /// Asymmetric public keys read from PEM files.
    pub keys: Vec<KeyConfig>,
    /// Optional JWKS file (`{"keys":[…]}`); every key in it needs a `kid`.
    pub jwks: Option<PathBuf>,
    /// Required `iss` value; unchecked when unset.
    pub issuer: Option<String>,
    /// Accepted `aud` values; when empty a token's `aud` is not looked at.
    pub audience: Vec<String>,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds (at most [`LEEWAY_S_MAX`]).
    pub leeway_s: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            secret_algorithms: vec!["HS256".into(), "HS384".into(), "HS512".into()],
            keys: Vec::new(),
            jwks: None,
            issuer: None,
            audience: Vec::new(),
            leeway_s: 30,
        }
    }
}

/// One `[[auth.keys]]` entry: a public key in a PEM file (SPKI `PUBLIC KEY`, or PKCS#1
/// `RSA PUBLIC KEY`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// Selects this key when a token's header carries the same `kid`. Without one, the key serves
    /// tokens without `kid` whose `alg` equals [`alg`](Self::alg) (one such key per algorithm).
    #[serde(default)]
    pub kid: Option<String>,
    /// The only algorithm this key verifies: `RS256`…`RS512`, `PS256`…`PS512`, `ES256`, `ES384`,
    /// `EdDSA`. The key decides the algorithm, never the token.
    pub alg: String,
    /// Path of the PEM file.
    pub pem: PathBuf,
}
