//! Token claims: the typed [`Claims`] handed to the rest of the server, and the lenient
//! [`RawClaims`] the payload is first decoded into, so that an absent `sub` can be told apart from
//! one of the wrong type.

use serde::{Deserialize, Deserializer};

use super::AuthError;

/// What a verified token says about its holder. Registered claims other than `sub`/`exp` (`iat`,
/// `nbf`, `iss`, `aud`, …) are checked during verification but not kept.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Claims {
    /// User id; never empty.
    pub sub: String,
    /// Expiry, seconds since the Unix epoch; open sessions are closed with 4001 at this time.
    pub exp: u64,
    /// Groups the user belongs to (`subscribe_group` policy).
    #[serde(default)]
    pub groups: Vec<String>,
    /// Roles (e.g. admin) granted to the user.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Device id; wins over the `device=` query parameter.
    pub device: Option<String>,
    /// Device type (`web|ios|android|desktop|other`); wins over `device_type=`.
    pub device_type: Option<String>,
    /// Home region of the user, if the issuer knows it.
    pub region: Option<String>,
}

impl Claims {
    /// A user id is an id like any other: one nobody could subscribe to (ops refuse ids past
    /// `limits.max_id_bytes`) is refused before it takes a session. The upgrade and
    /// `presenced token` both ask this.
    pub fn check_sub(&self, max_id_bytes: usize) -> Result<(), &'static str> {
        if self.sub.len() > max_id_bytes {
            return Err("sub longer than limits.max_id_bytes");
        }
        Ok(())
    }
}

/// The payload as decoded before the required-claim checks. A field of the wrong JSON type fails
/// the whole decode (→ [`AuthError::Malformed`]); an absent one becomes `None` here and
/// [`AuthError::MissingClaim`] in [`RawClaims::into_claims`].
#[derive(Debug, Deserialize)]
pub(crate) struct RawClaims {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default, deserialize_with = "numeric_date")]
    exp: Option<u64>,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    device: Option<String>,
    #[serde(default)]
    device_type: Option<String>,
    #[serde(default)]
    region: Option<String>,
    /// Only its type is looked at here (the value is jsonwebtoken's to check against
    /// `auth.issuer`): see [`string_only`].
    #[serde(default, rename = "iss", deserialize_with = "string_only")]
    _iss: Option<()>,
}

impl RawClaims {
    /// Enforces the claims the server cannot work without. An empty `sub` counts as missing: it
    /// cannot name a user.
    pub(crate) fn into_claims(self) -> Result<Claims, AuthError> {
        let sub = match self.sub {
            Some(sub) if !sub.is_empty() => sub,
            _ => return Err(AuthError::MissingClaim("sub")),
        };
        let exp = self.exp.ok_or(AuthError::MissingClaim("exp"))?;
        Ok(Claims {
            sub,
            exp,
            groups: self.groups,
            roles: self.roles,
            device: self.device,
            device_type: self.device_type,
            region: self.region,
        })
    }
}

/// RFC 7519 §4.1.1: `iss` is one StringOrURI. jsonwebtoken also takes an array and accepts it
/// when any element is the configured issuer, so a token naming several issuers would pass; any
/// `iss` that is not a string fails the decode instead (→ [`AuthError::Malformed`]). Nothing is
/// allocated: the string is only looked at.
fn string_only<'de, D: Deserializer<'de>>(de: D) -> Result<Option<()>, D::Error> {
    struct Str;
    impl serde::de::Visitor<'_> for Str {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<(), E> {
            Ok(())
        }
    }
    de.deserialize_str(Str).map(Some)
}

/// RFC 7519 NumericDate: an integer or a fractional number of seconds (truncated), as jsonwebtoken
/// itself accepts for its `exp` check; anything else (string, negative, NaN) is a type error.
fn numeric_date<'de, D: Deserializer<'de>>(de: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Number {
        Int(u64),
        Float(f64),
    }
    match Option::<Number>::deserialize(de)? {
        None => Ok(None),
        Some(Number::Int(secs)) => Ok(Some(secs)),
        // The upper bound keeps the cast exact-ish and saturating-free; real expiries are far below.
        Some(Number::Float(secs)) if secs.is_finite() && (0.0..1e15).contains(&secs) => {
            Ok(Some(secs as u64))
        }
        Some(Number::Float(_)) => Err(serde::de::Error::custom("exp is not a NumericDate")),
    }
}
