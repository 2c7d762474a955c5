//! Loading verification keys from `[[auth.keys]]` PEM files and the `auth.jwks` file. Runs once at
//! startup; every key is parsed and probed here so that a bad key fails the boot with a precise
//! message instead of failing every handshake later with "bad signature".

use std::path::Path;
use std::str::FromStr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};
use serde_json::{Map, Value};

use super::{AuthSetupError, KeyConfig};

/// Smallest RSA modulus accepted: smaller keys are forgeable in practice.
const RSA_MODULUS_BITS_MIN: usize = 2048;
/// Largest RSA modulus the RustCrypto verifier accepts; bigger keys would fail every token.
const RSA_MODULUS_BITS_MAX: usize = 4096;
/// RSA public exponent bounds of the RustCrypto verifier (`e = 1` would make signatures trivial).
const RSA_EXPONENT_MIN: u64 = 3;
const RSA_EXPONENT_MAX: u64 = (1 << 33) - 1;
/// Size of an Ed25519 public key (RFC 8032).
const ED25519_PUBLIC_KEY_LEN: usize = 32;

/// A verification key bound to the one algorithm it may verify: the key decides the algorithm,
/// never the token.
pub(crate) struct LoadedKey {
    pub(crate) alg: Algorithm,
    pub(crate) key: DecodingKey,
}

/// Parses an algorithm name as written in the config or a JWK.
pub(crate) fn parse_alg(name: &str) -> Result<Algorithm, String> {
    Algorithm::from_str(name).map_err(|_| format!("unknown algorithm `{name}`"))
}

/// Loads `auth.keys[index]`.
pub(crate) fn load_pem(index: usize, cfg: &KeyConfig) -> Result<LoadedKey, AuthSetupError> {
    let at = |field: &str| format!("auth.keys[{index}].{field}");
    let alg = parse_alg(&cfg.alg).map_err(|e| AuthSetupError::at(at("alg"), e))?;
    let from_pem = match alg.family() {
        AlgorithmFamily::Rsa => DecodingKey::from_rsa_pem,
        AlgorithmFamily::Ec => DecodingKey::from_ec_pem,
        AlgorithmFamily::Ed => DecodingKey::from_ed_pem,
        AlgorithmFamily::Hmac => {
            return Err(AuthSetupError::at(
                at("alg"),
                format!(
                    "`{}` is an HMAC algorithm: its key is `jwt_secret`, not a PEM file",
                    cfg.alg
                ),
            ));
        }
    };
    let path = cfg.pem.display();
    let pem = std::fs::read(&cfg.pem)
        .map_err(|e| AuthSetupError::at(at("pem"), format!("cannot read {path}: {e}")))?;
    // jsonwebtoken would take some private-key PEMs for public ones and fail every token later.
    if contains(&pem, b"PRIVATE KEY-----") {
        return Err(AuthSetupError::at(
            at("pem"),
            format!("{path} holds a private key; configure the matching public key"),
        ));
    }
    let key = from_pem(&pem).map_err(|e| {
        AuthSetupError::at(
            at("pem"),
            format!(
                "{path} is not a {} public key in PEM format ({e})",
                family_name(alg)
            ),
        )
    })?;
    probe(&key, alg).map_err(|e| AuthSetupError::at(at("pem"), format!("{path}: {e}")))?;
    Ok(LoadedKey { alg, key })
}

/// Loads every signing key of the JWKS file at `path`, each with its `kid`. Keys marked for
/// encryption (`"use": "enc"`) are skipped: identity providers publish them in the same set.
pub(crate) fn load_jwks(path: &Path) -> Result<Vec<(String, LoadedKey)>, AuthSetupError> {
    let shown = path.display();
    let fail = |what: String| AuthSetupError::at("auth.jwks", what);
    let text = std::fs::read(path).map_err(|e| fail(format!("cannot read {shown}: {e}")))?;
    let keys = match serde_json::from_slice::<Value>(&text) {
        Ok(Value::Object(mut set)) => match set.remove("keys") {
            Some(Value::Array(keys)) => keys,
            _ => return Err(fail(format!("{shown}: no `keys` array"))),
        },
        Ok(_) => return Err(fail(format!("{shown}: not a JWK set"))),
        Err(e) => return Err(fail(format!("{shown}: invalid JSON: {e}"))),
    };
    if keys.is_empty() {
        return Err(fail(format!("{shown}: no keys")));
    }
    let mut loaded = Vec::with_capacity(keys.len());
    for (index, jwk) in keys.iter().enumerate() {
        let Value::Object(jwk) = jwk else {
            return Err(fail(format!("key #{index}: not an object")));
        };
        let kid = match str_field(jwk, "kid") {
            Ok(Some(kid)) if !kid.is_empty() => kid,
            _ => return Err(fail(format!("key #{index}: no `kid`"))),
        };
        let at = || format!("auth.jwks: key `{kid}`");
        if str_field(jwk, "use").map_err(|e| AuthSetupError::at(at(), e))? == Some("enc") {
            continue;
        }
        let key = load_jwk(jwk).map_err(|e| AuthSetupError::at(at(), e))?;
        loaded.push((kid.to_owned(), key));
    }
    Ok(loaded)
}

/// One JWK to a key. The algorithm comes from `alg`, or is inferred from `kty`/`crv` (RSA→RS256,
/// EC P-256→ES256, EC P-384→ES384, OKP Ed25519→EdDSA); `oct` keys must name theirs.
fn load_jwk(jwk: &Map<String, Value>) -> Result<LoadedKey, String> {
    let declared = str_field(jwk, "alg")?.map(parse_alg).transpose()?;
    let kty = str_field(jwk, "kty")?.ok_or("no `kty`")?;
    let crv = str_field(jwk, "crv")?;
    let param = |name: &str| str_field(jwk, name)?.ok_or_else(|| format!("no `{name}`"));
    let not_b64 = |what: &str| format!("{what} not base64url");
    let (inferred, key) = match (kty, crv) {
        ("RSA", _) => {
            let key = DecodingKey::from_rsa_components(param("n")?, param("e")?)
                .map_err(|_| not_b64("`n` or `e`"))?;
            (Some(Algorithm::RS256), key)
        }
        ("EC", Some("P-256" | "P-384")) => {
            let key = DecodingKey::from_ec_components(param("x")?, param("y")?)
                .map_err(|_| not_b64("`x` or `y`"))?;
            let alg = if crv == Some("P-256") {
                Algorithm::ES256
            } else {
                Algorithm::ES384
            };
            (Some(alg), key)
        }
        ("OKP", Some("Ed25519")) => {
            let key = DecodingKey::from_ed_components(param("x")?).map_err(|_| not_b64("`x`"))?;
            (Some(Algorithm::EdDSA), key)
        }
        ("oct", _) => {
            let secret = URL_SAFE_NO_PAD
                .decode(param("k")?)
                .map_err(|_| not_b64("`k`"))?;
            if secret.is_empty() {
                return Err("empty `k`".into());
            }
            (None, DecodingKey::from_secret(&secret))
        }
        ("EC" | "OKP", Some(crv)) => return Err(format!("unsupported curve `{crv}`")),
        ("EC" | "OKP", None) => return Err("no `crv`".into()),
        (kty, _) => return Err(format!("unsupported key type `{kty}`")),
    };
    let alg = declared.or(inferred).ok_or("an `oct` key needs an `alg`")?;
    if alg.family() != key.family() {
        return Err(format!("alg `{alg:?}` does not fit key type `{kty}`"));
    }
    probe(&key, alg)?;
    Ok(LoadedKey { alg, key })
}

/// Catches keys that parse but cannot verify `alg`: EC/Ed points off the curve, curve/alg
/// mismatches (a P-384 key under ES256), RSA moduli outside the accepted size.
fn probe(key: &DecodingKey, alg: Algorithm) -> Result<(), String> {
    // jsonwebtoken 11.1's EdDSA verifier slices `[..32]` without a length check: a short key
    // would panic on every handshake (a longer one would be silently truncated).
    if alg.family() == AlgorithmFamily::Ed
        && key.try_get_as_bytes().map(<[u8]>::len) != Ok(ED25519_PUBLIC_KEY_LEN)
    {
        return Err(format!(
            "unusable Ed25519 key: not {ED25519_PUBLIC_KEY_LEN} bytes"
        ));
    }
    // Building the verifier validates EC and Ed points; the empty signature then simply fails.
    jsonwebtoken::crypto::verify("", b"", key, alg)
        .map_err(|e| format!("unusable {} key for {alg:?} ({e})", family_name(alg)))?;
    if alg.family() == AlgorithmFamily::Rsa {
        // The RSA verifier only parses its key per token, so check it here instead.
        let jwk = Jwk::from_decoding_key(key, Some(alg))
            .map_err(|e| format!("invalid RSA public key ({e})"))?;
        if let AlgorithmParameters::RSA(rsa) = &jwk.algorithm {
            let n = URL_SAFE_NO_PAD
                .decode(&rsa.n)
                .map_err(|_| "invalid RSA modulus")?;
            let e = URL_SAFE_NO_PAD
                .decode(&rsa.e)
                .map_err(|_| "invalid RSA exponent")?;
            check_rsa(&n, &e)?;
        }
    }
    Ok(())
}

/// What the RustCrypto verifier demands of `n` and `e` (plus our minimum size), checked once
/// here rather than failed on every token.
fn check_rsa(n: &[u8], e: &[u8]) -> Result<(), String> {
    let bits = significant_bits(n);
    if !(RSA_MODULUS_BITS_MIN..=RSA_MODULUS_BITS_MAX).contains(&bits) {
        return Err(format!(
            "RSA modulus is {bits} bits; accepted: {RSA_MODULUS_BITS_MIN}..={RSA_MODULUS_BITS_MAX}"
        ));
    }
    if n.last().is_some_and(|low| low % 2 == 0) {
        return Err("RSA modulus is even".into());
    }
    let exponent = match significant_bits(e) {
        0..=64 => e.iter().fold(0u64, |acc, &b| acc << 8 | u64::from(b)),
        _ => u64::MAX,
    };
    if exponent % 2 == 0 || !(RSA_EXPONENT_MIN..=RSA_EXPONENT_MAX).contains(&exponent) {
        return Err(format!(
            "RSA exponent must be odd and in {RSA_EXPONENT_MIN}..={RSA_EXPONENT_MAX}"
        ));
    }
    Ok(())
}

/// Bit length of a big-endian unsigned integer.
fn significant_bits(be: &[u8]) -> usize {
    match be.iter().position(|&b| b != 0) {
        Some(first) => (be.len() - first - 1) * 8 + (8 - be[first].leading_zeros() as usize),
        None => 0,
    }
}

/// A string member of a JWK; present with another type is an error, not "absent".
fn str_field<'a>(jwk: &'a Map<String, Value>, name: &str) -> Result<Option<&'a str>, String> {
    match jwk.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("`{name}` is not a string")),
    }
}

fn family_name(alg: Algorithm) -> &'static str {
    match alg.family() {
        AlgorithmFamily::Hmac => "HMAC",
        AlgorithmFamily::Rsa => "RSA",
        AlgorithmFamily::Ec => "EC",
        AlgorithmFamily::Ed => "Ed25519",
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
