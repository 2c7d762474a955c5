//! Minting tokens, for `presenced token` (operators and load tests) and for tests. The server
//! itself never signs: tokens come from the product's identity provider.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

/// What to put in a minted token.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenSpec {
    /// User id (`sub`).
    pub sub: String,
    /// `groups` claim; omitted when empty.
    pub groups: Vec<String>,
    /// `roles` claim; omitted when empty.
    pub roles: Vec<String>,
    /// Lifetime: `exp = iat + ttl` (whole seconds).
    pub ttl: Duration,
    /// `device` claim; omitted when `None`.
    pub device: Option<String>,
    /// `device_type` claim; omitted when `None`.
    pub device_type: Option<String>,
    /// `region` claim; omitted when `None`.
    pub region: Option<String>,
}

impl TokenSpec {
    /// A token for `sub` valid for `ttl`, with no optional claims.
    pub fn new(sub: impl Into<String>, ttl: Duration) -> Self {
        TokenSpec {
            sub: sub.into(),
            ttl,
            ..TokenSpec::default()
        }
    }
}

/// The payload as serialised: borrowed from the spec, optional claims left out when unset.
#[derive(Serialize)]
struct MintedClaims<'a> {
    sub: &'a str,
    iat: u64,
    exp: u64,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    groups: &'a [String],
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    roles: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    device: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    device_type: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    region: Option<&'a str>,
}

/// An HS256 token signed with the shared `jwt_secret`.
pub fn mint_hs256(secret: &str, spec: &TokenSpec) -> String {
    mint(
        &EncodingKey::from_secret(secret.as_bytes()),
        Algorithm::HS256,
        None,
        spec,
    )
    .expect("HMAC takes keys of any length and these claims always serialise")
}

/// A token signed with any key: `key` must fit `alg` (e.g. `EncodingKey::from_rsa_pem` of a
/// private key for RS256). `kid`, when given, goes into the header so the server picks that key.
pub fn mint(
    key: &EncodingKey,
    alg: Algorithm,
    kid: Option<&str>,
    spec: &TokenSpec,
) -> Result<String, jsonwebtoken::errors::Error> {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    let iat = now_s();
    let claims = MintedClaims {
        sub: &spec.sub,
        iat,
        exp: iat.saturating_add(spec.ttl.as_secs()),
        groups: &spec.groups,
        roles: &spec.roles,
        device: spec.device.as_deref(),
        device_type: spec.device_type.as_deref(),
        region: spec.region.as_deref(),
    };
    jsonwebtoken::encode(&header, &claims, key)
}

/// Seconds since the Unix epoch; a clock before 1970 reads as 0 rather than panicking.
fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
