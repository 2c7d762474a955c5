//! Config mistakes: each must stop startup with a message naming the config key and file.

use std::path::PathBuf;

use base64::Engine as _;

use super::{fixture, TempFile, SECRET};
use crate::auth::{AuthConfig, KeyConfig, Verifier};

fn setup_error(secret: Option<&str>, cfg: &AuthConfig) -> String {
    match Verifier::new(secret, cfg) {
        Ok(_) => panic!("config should be refused: {cfg:?}"),
        Err(e) => e.to_string(),
    }
}

fn with_keys(keys: Vec<KeyConfig>) -> AuthConfig {
    AuthConfig {
        keys,
        ..AuthConfig::default()
    }
}

fn key(kid: Option<&str>, alg: &str, pem: PathBuf) -> KeyConfig {
    KeyConfig {
        kid: kid.map(str::to_owned),
        alg: alg.into(),
        pem,
    }
}

fn with_jwks(json: &str) -> (TempFile, String) {
    let file = TempFile::new(json);
    let err = setup_error(
        None,
        &AuthConfig {
            jwks: Some(file.0.clone()),
            ..AuthConfig::default()
        },
    );
    (file, err)
}

#[test]
fn no_key_at_all() {
    let err = setup_error(None, &AuthConfig::default());
    assert!(err.starts_with("no JWT key configured"), "{err}");
}

#[test]
fn pem_errors_name_the_entry_and_file() {
    let rsa = || key(None, "RS256", fixture("rsa_public.pem"));
    let err = setup_error(
        None,
        &with_keys(vec![rsa(), key(None, "ES256", "/x.pem".into())]),
    );
    assert!(
        err.starts_with("auth.keys[1].pem: cannot read /x.pem: "),
        "{err}"
    );

    let err = setup_error(
        None,
        &with_keys(vec![key(None, "XS256", fixture("rsa_public.pem"))]),
    );
    assert_eq!(err, "auth.keys[0].alg: unknown algorithm `XS256`");

    let err = setup_error(
        None,
        &with_keys(vec![key(None, "HS256", fixture("rsa_public.pem"))]),
    );
    assert!(
        err.starts_with("auth.keys[0].alg: ") && err.contains("jwt_secret"),
        "{err}"
    );

    let err = setup_error(
        None,
        &with_keys(vec![key(None, "RS256", fixture("ec_public.pem"))]),
    );
    assert!(
        err.starts_with("auth.keys[0].pem: ") && err.contains("ec_public.pem"),
        "{err}"
    );
    assert!(err.contains("not a RSA public key"), "{err}");

    let err = setup_error(
        None,
        &with_keys(vec![key(None, "ES384", fixture("ec_public.pem"))]),
    );
    assert!(
        err.starts_with("auth.keys[0].pem: ") && err.contains("unusable"),
        "{err}"
    );

    let err = setup_error(
        None,
        &with_keys(vec![key(None, "EdDSA", fixture("ec_public.pem"))]),
    );
    assert!(err.starts_with("auth.keys[0].pem: "), "{err}");

    let err = setup_error(
        None,
        &with_keys(vec![key(None, "RS256", fixture("rsa_private.pem"))]),
    );
    assert!(err.contains("holds a private key"), "{err}");

    let garbage = TempFile::new("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n");
    let err = setup_error(
        None,
        &with_keys(vec![key(None, "RS256", garbage.0.clone())]),
    );
    assert!(err.starts_with("auth.keys[0].pem: "), "{err}");
}

#[test]
fn kids_must_be_unique_and_anonymous_keys_unambiguous() {
    let rsa = |kid: Option<&str>| key(kid, "RS256", fixture("rsa_public.pem"));
    let err = setup_error(None, &with_keys(vec![rsa(Some("k")), rsa(Some("k"))]));
    assert_eq!(err, "auth.keys[1].kid: duplicate kid `k`");

    let err = setup_error(None, &with_keys(vec![rsa(None), rsa(None)]));
    assert!(
        err.starts_with("auth.keys[1]: another key without kid already verifies RS256"),
        "{err}"
    );

    let cfg = AuthConfig {
        keys: vec![rsa(Some("ec-1"))],
        jwks: Some(fixture("jwks.json")),
        ..AuthConfig::default()
    };
    assert_eq!(
        setup_error(None, &cfg),
        "auth.jwks: key `ec-1`: duplicate kid `ec-1`"
    );

    let err = setup_error(None, &with_keys(vec![rsa(Some(""))]));
    assert_eq!(err, "auth.keys[0].kid: empty kid");
}

#[test]
fn jwks_errors_name_the_key() {
    let (_f, err) = with_jwks(r#"{"keys":[{"kty":"RSA","kid":"k1"}]}"#);
    assert_eq!(err, "auth.jwks: key `k1`: no `n`");
    let (_f, err) = with_jwks(r#"{"keys":[{"kty":"XYZ","kid":"k3"}]}"#);
    assert!(
        err.starts_with("auth.jwks: key `k3`: unsupported key type"),
        "{err}"
    );
    let (_f, err) =
        with_jwks(r#"{"keys":[{"kty":"EC","crv":"P-521","kid":"k4","x":"AA","y":"AA"}]}"#);
    assert_eq!(err, "auth.jwks: key `k4`: unsupported curve `P-521`");
    let (_f, err) = with_jwks(r#"{"keys":[{"kty":"OKP","crv":"Ed25519","kid":"k5","x":"AAAA"}]}"#);
    assert!(err.starts_with("auth.jwks: key `k5`: unusable"), "{err}");
    let (_f, err) = with_jwks(r#"{"keys":[{"kty":"oct","kid":"k6","k":"c2VjcmV0"}]}"#);
    assert_eq!(err, "auth.jwks: key `k6`: an `oct` key needs an `alg`");
    let (_f, err) =
        with_jwks(r#"{"keys":[{"kty":"oct","kid":"k7","k":"c2VjcmV0","alg":"RS256"}]}"#);
    assert_eq!(
        err,
        "auth.jwks: key `k7`: alg `RS256` does not fit key type `oct`"
    );
    let (_f, err) =
        with_jwks(r#"{"keys":[{"kty":"RSA","kid":"k8","alg":"XS1","n":"AQAB","e":"AQAB"}]}"#);
    assert_eq!(err, "auth.jwks: key `k8`: unknown algorithm `XS1`");
    let (_f, err) = with_jwks(r#"{"keys":[{"kty":"RSA","kid":"k9","n":"AQAB","e":"AQAB"}]}"#);
    assert!(
        err.starts_with("auth.jwks: key `k9`: RSA modulus is 17 bits; accepted: 2048..=4096"),
        "{err}"
    );
    // An odd 2048-bit modulus, so that only the exponent is wrong.
    let n = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([0xC7u8; 256]);
    let (_f, err) = with_jwks(&format!(
        r#"{{"keys":[{{"kty":"RSA","kid":"k10","n":"{n}","e":"AQ"}}]}}"#
    ));
    assert_eq!(
        err,
        "auth.jwks: key `k10`: RSA exponent must be odd and in 3..=8589934591"
    );
    let (_f, err) = with_jwks(r#"{"keys":[{"kty":"RSA","n":"AQAB","e":"AQAB"}]}"#);
    assert_eq!(err, "auth.jwks: key #0: no `kid`");
}

#[test]
fn jwks_file_errors() {
    let err = setup_error(
        None,
        &AuthConfig {
            jwks: Some("/nope.json".into()),
            ..AuthConfig::default()
        },
    );
    assert!(
        err.starts_with("auth.jwks: cannot read /nope.json: "),
        "{err}"
    );
    let (f, err) = with_jwks("{not json");
    assert!(
        err.starts_with(&format!("auth.jwks: {}: invalid JSON", f.0.display())),
        "{err}"
    );
    let (_f, err) = with_jwks(r#"{"keys":[]}"#);
    assert!(err.ends_with(": no keys"), "{err}");
    let (_f, err) = with_jwks(r#"[]"#);
    assert!(err.ends_with(": not a JWK set"), "{err}");
}

#[test]
fn jwks_skips_encryption_keys_and_accepts_oct() {
    let file = TempFile::new(
        r#"{"keys":[
            {"kty":"RSA","kid":"enc-1","use":"enc","alg":"RSA-OAEP","n":"AQAB","e":"AQAB"},
            {"kty":"oct","kid":"hs-1","alg":"HS256","k":"c2VjcmV0LXNlY3JldC1zZWNyZXQ"}
        ]}"#,
    );
    let v = Verifier::new(
        None,
        &AuthConfig {
            jwks: Some(file.0.clone()),
            ..AuthConfig::default()
        },
    )
    .expect("oct key loads, enc key skipped");
    let key = jsonwebtoken::EncodingKey::from_secret(b"secret-secret-secret");
    let token = super::sign(
        jsonwebtoken::Algorithm::HS256,
        Some("hs-1"),
        &key,
        &super::claims("a"),
    );
    assert!(v.verify(&token).is_ok());
}

#[test]
fn secret_and_claim_settings() {
    let err = setup_error(Some(""), &AuthConfig::default());
    assert_eq!(err, "jwt_secret: empty");
    let cfg = AuthConfig {
        secret_algorithms: vec!["HS256".into(), "RS256".into()],
        ..AuthConfig::default()
    };
    assert_eq!(
        setup_error(Some(SECRET), &cfg),
        "auth.secret_algorithms[1]: `RS256` is not an HMAC algorithm"
    );
    let cfg = AuthConfig {
        secret_algorithms: vec!["none".into()],
        ..AuthConfig::default()
    };
    assert_eq!(
        setup_error(Some(SECRET), &cfg),
        "auth.secret_algorithms[0]: unknown algorithm `none`"
    );
    let cfg = AuthConfig {
        secret_algorithms: vec![],
        ..AuthConfig::default()
    };
    assert!(setup_error(Some(SECRET), &cfg).starts_with("auth.secret_algorithms: empty"));
    let cfg = AuthConfig {
        leeway_s: u64::MAX,
        ..AuthConfig::default()
    };
    assert!(setup_error(Some(SECRET), &cfg).starts_with("auth.leeway_s: "));
    let cfg = AuthConfig {
        issuer: Some(String::new()),
        ..AuthConfig::default()
    };
    assert_eq!(setup_error(Some(SECRET), &cfg), "auth.issuer: empty");
    let cfg = AuthConfig {
        audience: vec!["a".into(), String::new()],
        ..AuthConfig::default()
    };
    assert_eq!(setup_error(Some(SECRET), &cfg), "auth.audience[1]: empty");
}

#[test]
fn config_table_from_toml() {
    let cfg: AuthConfig = toml::from_str(
        r#"
        issuer = "https://id.example"
        audience = ["presence"]
        keys = [{ kid = "k1", alg = "RS256", pem = "/etc/presenced/k1.pem" }, { alg = "EdDSA", pem = "ed.pem" }]
        "#,
    )
    .expect("valid table");
    assert_eq!(cfg.secret_algorithms, ["HS256", "HS384", "HS512"]);
    assert_eq!(cfg.leeway_s, 30);
    assert_eq!(cfg.keys[0].kid.as_deref(), Some("k1"));
    assert_eq!(cfg.keys[1].kid, None);
    assert!(
        toml::from_str::<AuthConfig>("leeway = 5").is_err(),
        "unknown keys are refused"
    );
    assert!(
        toml::from_str::<AuthConfig>("keys = [{ alg = \"RS256\", pem = \"a\", x = 1 }]").is_err()
    );
    assert_eq!(
        toml::from_str::<AuthConfig>("").expect("empty table"),
        AuthConfig::default()
    );
}
