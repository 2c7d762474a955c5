//! Unit tests for `auth`: HMAC tokens (`hmac`), RSA/EC/Ed keys from PEM files and JWKS
//! (`asymmetric`), config mistakes reported at startup (`setup`), hostile input (`fuzz`). Keys are
//! the fixed test-only fixtures in `tests/fixtures/keys/`, so no key is generated at test time.

mod asymmetric;
mod fuzz;
mod hmac;
mod setup;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::Value;

use super::{AuthConfig, Verifier};

pub(super) const SECRET: &str = "test-secret-0123456789abcdef";

pub(super) fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/keys")
        .join(name)
}

pub(super) fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// Claims valid for an hour, for `sub`.
pub(super) fn claims(sub: &str) -> Value {
    serde_json::json!({ "sub": sub, "exp": now() + 3600 })
}

/// Signs arbitrary JSON claims (possibly invalid ones) with `key`.
pub(super) fn sign(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, key).expect("test claims serialise")
}

pub(super) fn sign_hs(alg: Algorithm, secret: &str, claims: &Value) -> String {
    sign(
        alg,
        None,
        &EncodingKey::from_secret(secret.as_bytes()),
        claims,
    )
}

/// The private fixture key for `alg`'s family.
pub(super) fn private_key(alg: Algorithm) -> EncodingKey {
    let read = |name| std::fs::read(fixture(name)).expect("fixture present");
    match alg {
        Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 | Algorithm::PS256 => {
            EncodingKey::from_rsa_pem(&read("rsa_private.pem")).expect("RSA fixture")
        }
        Algorithm::ES256 => EncodingKey::from_ec_pem(&read("ec_private.pem")).expect("EC fixture"),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&read("ed_private.pem")).expect("Ed fixture"),
        other => panic!("no private fixture for {other:?}"),
    }
}

/// A verifier with only the shared secret and `cfg` tweaks.
pub(super) fn hs_verifier(tweak: impl FnOnce(&mut AuthConfig)) -> Verifier {
    let mut cfg = AuthConfig::default();
    tweak(&mut cfg);
    Verifier::new(Some(SECRET), &cfg).expect("valid test config")
}

/// A token whose header is exactly `header_json` and whose signature is `sig` (no signing).
pub(super) fn hand_made(header_json: &str, claims: &Value, sig: &str) -> String {
    let header = URL_SAFE_NO_PAD.encode(header_json);
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    format!("{header}.{payload}.{sig}")
}

/// A file in the temp dir, removed on drop; for config-error tests.
pub(super) struct TempFile(pub(super) PathBuf);

impl TempFile {
    pub(super) fn new(contents: &str) -> TempFile {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("presenced-auth-{}-{n}", std::process::id()));
        std::fs::write(&path, contents).expect("temp dir writable");
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
