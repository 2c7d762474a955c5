//! JWT verification on the handshake path: `auth::Verifier::verify` for HS256, RS256, ES256 and
//! EdDSA tokens (the test fixtures' keys, `tests/fixtures/keys/`).
//!
//! Baseline: a raw `jsonwebtoken::decode` into the same `Claims` with a prebuilt `DecodingKey` and
//! the same `Validation` rules (exp/nbf, 30 s leeway, `exp` required). It does no key selection
//! and no claim checks of its own, so the gap is exactly what our wrapper adds: peeking at the
//! header to pick the key, the lenient `RawClaims` decode and the `sub`/`exp` checks. For the
//! asymmetric algorithms the signature check dominates; expect a ratio close to 1.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use jsonwebtoken::{DecodingKey, Validation};
use presenced::auth::{
    mint, mint_hs256, Algorithm, AuthConfig, Claims, EncodingKey, KeyConfig, TokenSpec, Verifier,
};

const SECRET: &str = "bench-secret-0123456789abcdef0123456789abcdef";

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/keys")
        .join(name)
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).expect("key fixtures are committed")
}

fn spec() -> TokenSpec {
    TokenSpec {
        groups: vec!["team-a".into(), "team-b".into()],
        device: Some("laptop".into()),
        device_type: Some("web".into()),
        ..TokenSpec::new("user-4711", Duration::from_secs(3600))
    }
}

/// (algorithm, token, the baseline's key) for each algorithm.
fn cases() -> Vec<(Algorithm, String, DecodingKey)> {
    let asym = |alg, private: &str, public: &str| {
        let enc = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&read(private)),
            Algorithm::ES256 => EncodingKey::from_ec_pem(&read(private)),
            _ => EncodingKey::from_ed_pem(&read(private)),
        }
        .expect("private key fixture");
        let dec = match alg {
            Algorithm::RS256 => DecodingKey::from_rsa_pem(&read(public)),
            Algorithm::ES256 => DecodingKey::from_ec_pem(&read(public)),
            _ => DecodingKey::from_ed_pem(&read(public)),
        }
        .expect("public key fixture");
        let token = mint(&enc, alg, None, &spec()).expect("fixture keys sign");
        (alg, token, dec)
    };
    vec![
        (
            Algorithm::HS256,
            mint_hs256(SECRET, &spec()),
            DecodingKey::from_secret(SECRET.as_bytes()),
        ),
        asym(Algorithm::RS256, "rsa_private.pem", "rsa_public.pem"),
        asym(Algorithm::ES256, "ec_private.pem", "ec_public.pem"),
        asym(Algorithm::EdDSA, "ed_private.pem", "ed_public.pem"),
    ]
}

/// The server's verifier: the shared secret plus one PEM key per asymmetric algorithm (no `kid`).
fn verifier() -> Verifier {
    let key = |alg: &str, pem: &str| KeyConfig {
        kid: None,
        alg: alg.into(),
        pem: fixture(pem),
    };
    let cfg = AuthConfig {
        keys: vec![
            key("RS256", "rsa_public.pem"),
            key("ES256", "ec_public.pem"),
            key("EdDSA", "ed_public.pem"),
        ],
        ..AuthConfig::default()
    };
    Verifier::new(Some(SECRET), &cfg).expect("fixture keys load")
}

/// What `Verifier` configures for each key (`auth::verifier::base_validation` with defaults).
fn validation(alg: Algorithm) -> Validation {
    let mut v = Validation::new(alg);
    v.leeway = AuthConfig::default().leeway_s;
    v.validate_exp = true;
    v.validate_nbf = true;
    v.validate_aud = false;
    v.set_required_spec_claims(&["exp"]);
    v
}

fn verify(c: &mut Criterion) {
    let ours = verifier();
    for (alg, token, key) in cases() {
        let validation = validation(alg);
        let claims = ours.verify(&token).expect("minted tokens verify");
        let raw = jsonwebtoken::decode::<Claims>(&token, &key, &validation).expect("and raw");
        assert_eq!(claims, raw.claims, "both read the same claims");

        let mut g = c.benchmark_group(format!("jwt/verify/{alg:?}"));
        g.bench_function("ours", |b| {
            b.iter(|| black_box(ours.verify(black_box(&token))))
        });
        g.bench_function("raw_jsonwebtoken", |b| {
            b.iter(|| {
                black_box(jsonwebtoken::decode::<Claims>(
                    black_box(&token),
                    &key,
                    &validation,
                ))
            })
        });
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    targets = verify
}
criterion_main!(benches);
