//! [`Verifier`]: every key and its [`Validation`] built once at startup, then shared read-only by
//! all shards. `verify` only picks a key and lets jsonwebtoken check signature and claims.

use std::collections::HashMap;

use jsonwebtoken::errors::{Error as JwtError, ErrorKind};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};

use super::claims::RawClaims;
use super::config::LEEWAY_S_MAX;
use super::header::{self, HEADER_LEN_MAX};
use super::keys::{self, LoadedKey};
use super::{AuthConfig, AuthError, AuthSetupError, Claims};

/// Verifies client tokens. Immutable after [`new`](Self::new); share it with `Arc`.
#[derive(Debug)]
pub struct Verifier {
    /// The shared secret, usable with each of `auth.secret_algorithms`; for tokens without `kid`.
    secret: Option<Slot>,
    /// Keys from `auth.keys` and `auth.jwks` that have a `kid`.
    by_kid: HashMap<String, Slot>,
    /// `auth.keys` entries without `kid`, at most one per algorithm (so the choice is unambiguous).
    anonymous: Vec<Slot>,
    /// Every algorithm some key verifies; tells [`AuthError::UnknownKey`] ("right algorithm, say
    /// which key") from [`AuthError::AlgorithmNotAllowed`].
    algorithms: Vec<Algorithm>,
}

/// One key with the validation rules for it; `validation.algorithms` lists what it may verify.
#[derive(Debug)]
struct Slot {
    key: DecodingKey,
    validation: Validation,
}

impl Slot {
    fn accepts(&self, alg: Algorithm) -> bool {
        self.validation.algorithms.contains(&alg)
    }
}

// Shards on other threads hold the same `Arc<Verifier>`.
const _: fn() = || {
    fn shared<T: Send + Sync>() {}
    shared::<Verifier>();
};

impl Verifier {
    /// Builds the verifier from the top-level `jwt_secret` and the `[auth]` table, reading and
    /// checking every key file. Fails when no key at all is configured, or with a message naming
    /// the config key (and file) at fault.
    pub fn new(secret: Option<&str>, cfg: &AuthConfig) -> Result<Verifier, AuthSetupError> {
        let base = base_validation(cfg)?;
        let mut verifier = Verifier {
            secret: secret.map(|s| secret_slot(s, cfg, &base)).transpose()?,
            by_kid: HashMap::new(),
            anonymous: Vec::new(),
            algorithms: Vec::new(),
        };
        for (index, key_cfg) in cfg.keys.iter().enumerate() {
            let key = keys::load_pem(index, key_cfg)?;
            let at = format!("auth.keys[{index}]");
            match &key_cfg.kid {
                Some(kid) => verifier.add_kid(format!("{at}.kid"), kid, key, &base)?,
                None => verifier.add_anonymous(at, key, &base)?,
            }
        }
        if let Some(path) = &cfg.jwks {
            for (kid, key) in keys::load_jwks(path)? {
                let at = format!("auth.jwks: key `{kid}`");
                verifier.add_kid(at, &kid, key, &base)?;
            }
        }
        if verifier.secret.is_none() && verifier.by_kid.is_empty() && verifier.anonymous.is_empty()
        {
            return Err(AuthSetupError(
                "no JWT key configured (set `jwt_secret`, `auth.keys` or `auth.jwks`)".into(),
            ));
        }
        verifier.algorithms = verifier
            .slots()
            .flat_map(|s| &s.validation.algorithms)
            .copied()
            .collect();
        Ok(verifier)
    }

    /// Verifies a compact JWT (without any `Bearer ` prefix) and returns its claims.
    ///
    /// Key choice: a header `kid` names the key, and the header `alg` must be that key's. Without
    /// `kid`, the shared secret serves `auth.secret_algorithms`, else the key without `kid` for
    /// that `alg`. `exp` and `sub` are required; `nbf`, `iss`, `aud` are checked as configured.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let mut buf = [0; HEADER_LEN_MAX];
        let peek = header::peek(token, &mut buf)?;
        let slot = self.select(peek.alg, peek.kid.as_deref())?;
        let data = jsonwebtoken::decode::<RawClaims>(token, &slot.key, &slot.validation)
            .map_err(map_error)?;
        data.claims.into_claims()
    }

    /// [`verify`](Self::verify) for the `refresh` op: the new token must name the session's user.
    pub fn verify_refresh(&self, token: &str, expected_sub: &str) -> Result<Claims, AuthError> {
        let claims = self.verify(token)?;
        if claims.sub != expected_sub {
            return Err(AuthError::SubjectMismatch);
        }
        Ok(claims)
    }

    fn select(&self, alg: Algorithm, kid: Option<&str>) -> Result<&Slot, AuthError> {
        if let Some(kid) = kid {
            let slot = self.by_kid.get(kid).ok_or(AuthError::UnknownKey)?;
            return if slot.accepts(alg) {
                Ok(slot)
            } else {
                Err(AuthError::AlgorithmMismatch)
            };
        }
        let mut candidates = self.secret.iter().chain(&self.anonymous);
        if let Some(slot) = candidates.find(|s| s.accepts(alg)) {
            return Ok(slot);
        }
        if self.algorithms.contains(&alg) {
            Err(AuthError::UnknownKey)
        } else {
            Err(AuthError::AlgorithmNotAllowed)
        }
    }

    fn slots(&self) -> impl Iterator<Item = &Slot> {
        self.secret
            .iter()
            .chain(self.by_kid.values())
            .chain(&self.anonymous)
    }

    fn add_kid(
        &mut self,
        at: String,
        kid: &str,
        key: LoadedKey,
        base: &Validation,
    ) -> Result<(), AuthSetupError> {
        if kid.is_empty() {
            return Err(AuthSetupError::at(at, "empty kid"));
        }
        if self.by_kid.contains_key(kid) {
            return Err(AuthSetupError::at(at, format!("duplicate kid `{kid}`")));
        }
        self.by_kid
            .insert(kid.to_owned(), slot(key.key, vec![key.alg], base));
        Ok(())
    }

    fn add_anonymous(
        &mut self,
        at: String,
        key: LoadedKey,
        base: &Validation,
    ) -> Result<(), AuthSetupError> {
        if self.anonymous.iter().any(|s| s.accepts(key.alg)) {
            return Err(AuthSetupError::at(
                at,
                format!(
                    "another key without kid already verifies {:?}; give them kids",
                    key.alg
                ),
            ));
        }
        self.anonymous.push(slot(key.key, vec![key.alg], base));
        Ok(())
    }
}

/// Claim rules shared by every key; only `algorithms` differs per key.
fn base_validation(cfg: &AuthConfig) -> Result<Validation, AuthSetupError> {
    if cfg.leeway_s > LEEWAY_S_MAX {
        return Err(AuthSetupError::at(
            "auth.leeway_s",
            format!("at most {LEEWAY_S_MAX}"),
        ));
    }
    let mut v = Validation::new(Algorithm::HS256);
    v.leeway = cfg.leeway_s;
    v.validate_exp = true;
    v.validate_nbf = true;
    // jsonwebtoken checks `iss`/`aud` only when the token carries them; requiring them closes that.
    let mut required = vec!["exp"];
    if let Some(issuer) = &cfg.issuer {
        if issuer.is_empty() {
            return Err(AuthSetupError::at("auth.issuer", "empty"));
        }
        v.set_issuer(&[issuer]);
        required.push("iss");
    }
    if let Some(index) = cfg.audience.iter().position(|a| a.is_empty()) {
        return Err(AuthSetupError::at(
            format!("auth.audience[{index}]"),
            "empty",
        ));
    }
    if cfg.audience.is_empty() {
        // Its default would refuse every token that carries an `aud`.
        v.validate_aud = false;
    } else {
        v.set_audience(&cfg.audience);
        required.push("aud");
    }
    v.set_required_spec_claims(&required);
    Ok(v)
}

fn secret_slot(secret: &str, cfg: &AuthConfig, base: &Validation) -> Result<Slot, AuthSetupError> {
    if secret.is_empty() {
        return Err(AuthSetupError::at("jwt_secret", "empty"));
    }
    let mut algs = Vec::with_capacity(cfg.secret_algorithms.len());
    for (index, name) in cfg.secret_algorithms.iter().enumerate() {
        let at = format!("auth.secret_algorithms[{index}]");
        let alg = keys::parse_alg(name).map_err(|e| AuthSetupError::at(&at, e))?;
        if alg.family() != AlgorithmFamily::Hmac {
            return Err(AuthSetupError::at(
                at,
                format!("`{name}` is not an HMAC algorithm"),
            ));
        }
        if !algs.contains(&alg) {
            algs.push(alg);
        }
    }
    if algs.is_empty() {
        return Err(AuthSetupError::at(
            "auth.secret_algorithms",
            "empty, so `jwt_secret` could never be used",
        ));
    }
    Ok(slot(
        DecodingKey::from_secret(secret.as_bytes()),
        algs,
        base,
    ))
}

fn slot(key: DecodingKey, algorithms: Vec<Algorithm>, base: &Validation) -> Slot {
    let mut validation = base.clone();
    validation.algorithms = algorithms;
    Slot { key, validation }
}

/// jsonwebtoken's failure to the client-facing reason.
fn map_error(err: JwtError) -> AuthError {
    match err.kind() {
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::InvalidAlgorithm
        | ErrorKind::MissingAlgorithm
        | ErrorKind::InvalidAlgorithmName
        | ErrorKind::UnsupportedAlgorithm => AuthError::AlgorithmNotAllowed,
        ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
        ErrorKind::InvalidAudience => AuthError::WrongAudience,
        ErrorKind::InvalidSubject => AuthError::SubjectMismatch,
        ErrorKind::MissingRequiredClaim(claim) => match claim.as_str() {
            "exp" => AuthError::MissingClaim("exp"),
            "sub" => AuthError::MissingClaim("sub"),
            // Required only because configured: absent (or not a string) is just "wrong".
            "iss" => AuthError::WrongIssuer,
            "aud" => AuthError::WrongAudience,
            _ => AuthError::Malformed,
        },
        // Keys were probed in `new`, so these come from signature bytes the key cannot use.
        ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidEddsaKey
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidKeyFormat
        | ErrorKind::Signing(_)
        | ErrorKind::RsaFailedSigning => AuthError::BadSignature,
        // InvalidToken, InvalidClaimFormat, Base64, Json, Utf8, and kinds added later.
        _ => AuthError::Malformed,
    }
}
