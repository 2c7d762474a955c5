//! RSA, EC and Ed25519 tokens, with keys from PEM files and from the JWKS fixture, and the ways a
//! token may try to pick a key or an algorithm it has no right to.

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};

use super::{claims, fixture, private_key, sign, sign_hs, SECRET};
use crate::auth::{mint, AuthConfig, AuthError, KeyConfig, TokenSpec, Verifier};

fn pem_key(kid: Option<&str>, alg: &str, file: &str) -> KeyConfig {
    KeyConfig {
        kid: kid.map(str::to_owned),
        alg: alg.into(),
        pem: fixture(file),
    }
}

/// One key per family, without kid, and no shared secret.
fn pem_verifier() -> Verifier {
    let cfg = AuthConfig {
        keys: vec![
            pem_key(None, "RS256", "rsa_public.pem"),
            pem_key(None, "ES256", "ec_public.pem"),
            pem_key(None, "EdDSA", "ed_public.pem"),
        ],
        ..AuthConfig::default()
    };
    Verifier::new(None, &cfg).expect("fixture keys load")
}

fn jwks_verifier(secret: Option<&str>) -> Verifier {
    let cfg = AuthConfig {
        jwks: Some(fixture("jwks.json")),
        ..AuthConfig::default()
    };
    Verifier::new(secret, &cfg).expect("fixture JWKS loads")
}

const FAMILIES: [(Algorithm, &str); 3] = [
    (Algorithm::RS256, "rsa-1"),
    (Algorithm::ES256, "ec-1"),
    (Algorithm::EdDSA, "ed-1"),
];

#[test]
fn pem_keys_without_kid() {
    let v = pem_verifier();
    for (alg, _) in FAMILIES {
        let token = sign(alg, None, &private_key(alg), &claims("alice"));
        assert_eq!(
            v.verify(&token).map(|c| c.sub),
            Ok("alice".to_owned()),
            "{alg:?}"
        );
    }
}

#[test]
fn pem_keys_with_kid() {
    let cfg = AuthConfig {
        keys: vec![
            pem_key(Some("r"), "RS256", "rsa_public.pem"),
            pem_key(Some("e"), "ES256", "ec_public.pem"),
        ],
        ..AuthConfig::default()
    };
    let v = Verifier::new(None, &cfg).expect("fixture keys load");
    let rs = sign(
        Algorithm::RS256,
        Some("r"),
        &private_key(Algorithm::RS256),
        &claims("a"),
    );
    assert!(v.verify(&rs).is_ok());
    let es = sign(
        Algorithm::ES256,
        Some("e"),
        &private_key(Algorithm::ES256),
        &claims("a"),
    );
    assert!(v.verify(&es).is_ok());
    // The right algorithm but no kid: these keys answer only to their kid.
    let anonymous = sign(
        Algorithm::RS256,
        None,
        &private_key(Algorithm::RS256),
        &claims("a"),
    );
    assert_eq!(v.verify(&anonymous), Err(AuthError::UnknownKey));
}

#[test]
fn jwks_keys_by_kid() {
    let v = jwks_verifier(None);
    for (alg, kid) in FAMILIES {
        let spec = TokenSpec::new("carol", std::time::Duration::from_secs(60));
        let token = mint(&private_key(alg), alg, Some(kid), &spec).expect("fixture key signs");
        assert_eq!(
            v.verify(&token).map(|c| c.sub),
            Ok("carol".to_owned()),
            "{kid}"
        );
    }
}

#[test]
fn unknown_or_missing_kid() {
    let v = jwks_verifier(None);
    let key = private_key(Algorithm::RS256);
    let unknown = sign(Algorithm::RS256, Some("rsa-2"), &key, &claims("a"));
    assert_eq!(v.verify(&unknown), Err(AuthError::UnknownKey));
    let no_kid = sign(Algorithm::RS256, None, &key, &claims("a"));
    assert_eq!(v.verify(&no_kid), Err(AuthError::UnknownKey));
}

#[test]
fn kid_fixes_the_algorithm() {
    let v = jwks_verifier(None);
    // Same RSA key, another RSA algorithm.
    let rs384 = sign(
        Algorithm::RS384,
        Some("rsa-1"),
        &private_key(Algorithm::RS384),
        &claims("a"),
    );
    assert_eq!(v.verify(&rs384), Err(AuthError::AlgorithmMismatch));
    // An EdDSA token claiming the EC key.
    let ed = sign(
        Algorithm::EdDSA,
        Some("ec-1"),
        &private_key(Algorithm::EdDSA),
        &claims("a"),
    );
    assert_eq!(v.verify(&ed), Err(AuthError::AlgorithmMismatch));
}

#[test]
fn public_key_as_hmac_secret_is_refused() {
    // The classic confusion attack: sign HS256 with the (public) RSA PEM bytes as the secret.
    let public_pem = std::fs::read_to_string(fixture("rsa_public.pem")).expect("fixture");
    let cfg = AuthConfig {
        keys: vec![pem_key(None, "RS256", "rsa_public.pem")],
        ..AuthConfig::default()
    };
    let v = Verifier::new(None, &cfg).expect("fixture key loads");
    let forged = sign_hs(Algorithm::HS256, &public_pem, &claims("admin"));
    assert_eq!(v.verify(&forged), Err(AuthError::AlgorithmNotAllowed));

    let jwks = jwks_verifier(None);
    let key = EncodingKey::from_secret(public_pem.as_bytes());
    let forged_kid = sign(Algorithm::HS256, Some("rsa-1"), &key, &claims("admin"));
    assert_eq!(jwks.verify(&forged_kid), Err(AuthError::AlgorithmMismatch));
}

#[test]
fn tampered_asymmetric_tokens_fail_the_signature() {
    let v = pem_verifier();
    for (alg, _) in FAMILIES {
        let good = sign(alg, None, &private_key(alg), &claims("alice"));
        let other = sign(alg, None, &private_key(alg), &claims("mallory"));
        let (g, o): (Vec<_>, Vec<_>) = (good.split('.').collect(), other.split('.').collect());
        let spliced = format!("{}.{}.{}", g[0], o[1], g[2]);
        assert_eq!(v.verify(&spliced), Err(AuthError::BadSignature), "{alg:?}");
    }
}

#[test]
fn secret_and_keys_together() {
    let v = jwks_verifier(Some(SECRET));
    assert!(v
        .verify(&sign_hs(Algorithm::HS384, SECRET, &claims("a")))
        .is_ok());
    let rs = sign(
        Algorithm::RS256,
        Some("rsa-1"),
        &private_key(Algorithm::RS256),
        &claims("a"),
    );
    assert!(v.verify(&rs).is_ok());
    // A kid always means a configured key, even for HMAC.
    let hs_kid = sign(
        Algorithm::HS256,
        Some("hs"),
        &EncodingKey::from_secret(SECRET.as_bytes()),
        &claims("a"),
    );
    assert_eq!(v.verify(&hs_kid), Err(AuthError::UnknownKey));
}

/// Guards the fixture itself: `jwks.json` must hold exactly the public halves of the PEM files.
#[test]
fn jwks_fixture_matches_pem_files() {
    let set: JwkSet =
        serde_json::from_slice(&std::fs::read(fixture("jwks.json")).expect("fixture"))
            .expect("valid JWKS");
    let read = |name| std::fs::read(fixture(name)).expect("fixture");
    let pems = [
        (
            "rsa-1",
            Algorithm::RS256,
            DecodingKey::from_rsa_pem(&read("rsa_public.pem")),
        ),
        (
            "ec-1",
            Algorithm::ES256,
            DecodingKey::from_ec_pem(&read("ec_public.pem")),
        ),
        (
            "ed-1",
            Algorithm::EdDSA,
            DecodingKey::from_ed_pem(&read("ed_public.pem")),
        ),
    ];
    assert_eq!(set.keys.len(), pems.len());
    for (kid, alg, key) in pems {
        let from_pem = Jwk::from_decoding_key(&key.expect("PEM parses"), Some(alg)).expect("jwk");
        let in_set = set.find(kid).expect("kid present");
        assert_eq!(in_set.algorithm, from_pem.algorithm, "{kid}");
        assert_eq!(
            in_set.common.key_algorithm, from_pem.common.key_algorithm,
            "{kid}"
        );
        // And the private fixture derives the same public key.
        let from_private = Jwk::from_encoding_key(&private_key(alg), alg).expect("jwk");
        assert_eq!(from_private.algorithm, from_pem.algorithm, "{kid}");
    }
}
