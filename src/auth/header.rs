//! A first, cheap look at a token's JOSE header: just `alg` and `kid`, enough to pick the key.
//! Decoded into a stack buffer and borrowed, so an unknown or hostile token costs no allocation
//! before it is refused. jsonwebtoken re-checks the header when it verifies the signature.

use std::borrow::Cow;
use std::str::FromStr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::Algorithm;
use serde::de::IgnoredAny;
use serde::Deserialize;

use super::AuthError;

/// Longest accepted token. Real tokens are well under 2 KiB (an RS4096 signature is 683 chars);
/// the bound caps the work an attacker can ask of a handshake.
pub(crate) const TOKEN_LEN_MAX: usize = 8 * 1024;
/// Longest accepted header segment (base64url). Headers carrying certificate chains (`x5c`) are
/// refused; key selection here is by `kid` only.
const HEADER_B64_LEN_MAX: usize = 1024;
/// Room for the decoded header: base64 turns 4 chars into at most 3 bytes.
pub(crate) const HEADER_LEN_MAX: usize = HEADER_B64_LEN_MAX.div_ceil(4) * 3;

/// The header members that select a key.
pub(crate) struct Peek<'a> {
    pub(crate) alg: Algorithm,
    pub(crate) kid: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct RawHeader<'a> {
    #[serde(borrow)]
    alg: Cow<'a, str>,
    #[serde(borrow, default)]
    kid: Option<Cow<'a, str>>,
    /// RFC 7515 §4.1.11: extensions listed here must be understood or the token refused; this
    /// server understands none.
    #[serde(default)]
    crit: Option<IgnoredAny>,
}

/// Header buffer owned by the caller so that [`Peek`] can borrow from it.
pub(crate) type HeaderBuf = [u8; HEADER_LEN_MAX];

/// Checks the compact-JWS shape (three segments) and reads `alg`/`kid` from the header.
/// An `alg` jsonwebtoken does not implement (`none` included) is [`AuthError::AlgorithmNotAllowed`].
pub(crate) fn peek<'a>(token: &str, buf: &'a mut HeaderBuf) -> Result<Peek<'a>, AuthError> {
    if token.is_empty() {
        return Err(AuthError::Missing);
    }
    if token.len() > TOKEN_LEN_MAX {
        return Err(AuthError::Malformed);
    }
    let mut segments = token.split('.');
    let (Some(header), Some(_payload), Some(_signature), None) = (
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
    ) else {
        return Err(AuthError::Malformed);
    };
    if header.len() > HEADER_B64_LEN_MAX {
        return Err(AuthError::Malformed);
    }
    let len = URL_SAFE_NO_PAD
        .decode_slice(header, buf)
        .map_err(|_| AuthError::Malformed)?;
    let raw: RawHeader<'a> =
        serde_json::from_slice(&buf[..len]).map_err(|_| AuthError::Malformed)?;
    if raw.crit.is_some() {
        return Err(AuthError::Malformed);
    }
    let alg = Algorithm::from_str(&raw.alg).map_err(|_| AuthError::AlgorithmNotAllowed)?;
    Ok(Peek { alg, kid: raw.kid })
}
