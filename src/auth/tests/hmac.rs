//! Tokens signed with the shared secret: algorithms, time checks, claim rules, refresh, minting.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::Algorithm;
use serde_json::{json, Value};

use super::{claims, hand_made, hs_verifier, now, sign_hs, SECRET};
use crate::auth::{mint_hs256, AuthError, TokenSpec};

#[test]
fn accepts_each_hmac_algorithm() {
    let v = hs_verifier(|_| {});
    for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
        let got = v
            .verify(&sign_hs(alg, SECRET, &claims("alice")))
            .expect("valid token");
        assert_eq!(got.sub, "alice", "{alg:?}");
    }
}

#[test]
fn secret_algorithms_narrow_what_the_secret_verifies() {
    let v = hs_verifier(|c| c.secret_algorithms = vec!["HS512".into()]);
    assert!(v
        .verify(&sign_hs(Algorithm::HS512, SECRET, &claims("a")))
        .is_ok());
    let hs256 = sign_hs(Algorithm::HS256, SECRET, &claims("a"));
    assert_eq!(v.verify(&hs256), Err(AuthError::AlgorithmNotAllowed));
}

#[test]
fn expired_and_not_yet_valid() {
    let v = hs_verifier(|_| {});
    let expired = json!({ "sub": "a", "exp": now() - 3600 });
    assert_eq!(
        v.verify(&sign_hs(Algorithm::HS256, SECRET, &expired)),
        Err(AuthError::Expired)
    );
    let early = json!({ "sub": "a", "exp": now() + 7200, "nbf": now() + 3600 });
    assert_eq!(
        v.verify(&sign_hs(Algorithm::HS256, SECRET, &early)),
        Err(AuthError::NotYetValid)
    );
    let started = json!({ "sub": "a", "exp": now() + 7200, "nbf": now() - 10 });
    assert!(v
        .verify(&sign_hs(Algorithm::HS256, SECRET, &started))
        .is_ok());
}

#[test]
fn leeway_applies_to_exp_and_nbf() {
    let lenient = hs_verifier(|c| c.leeway_s = 30);
    let strict = hs_verifier(|c| c.leeway_s = 0);
    let just_expired = sign_hs(
        Algorithm::HS256,
        SECRET,
        &json!({ "sub": "a", "exp": now() - 10 }),
    );
    let almost_valid = sign_hs(
        Algorithm::HS256,
        SECRET,
        &json!({ "sub": "a", "exp": now() + 3600, "nbf": now() + 10 }),
    );
    assert!(lenient.verify(&just_expired).is_ok());
    assert!(lenient.verify(&almost_valid).is_ok());
    assert_eq!(strict.verify(&just_expired), Err(AuthError::Expired));
    assert_eq!(strict.verify(&almost_valid), Err(AuthError::NotYetValid));
}

#[test]
fn bad_signatures() {
    let v = hs_verifier(|_| {});
    let wrong_secret = sign_hs(Algorithm::HS256, "another-secret", &claims("a"));
    assert_eq!(v.verify(&wrong_secret), Err(AuthError::BadSignature));

    // Someone else's payload under alice's signature.
    let alice = sign_hs(Algorithm::HS256, SECRET, &claims("alice"));
    let mallory = sign_hs(Algorithm::HS256, SECRET, &claims("mallory"));
    let (alice_parts, mallory_parts): (Vec<_>, Vec<_>) =
        (alice.split('.').collect(), mallory.split('.').collect());
    let spliced = format!("{}.{}.{}", alice_parts[0], mallory_parts[1], alice_parts[2]);
    assert_eq!(v.verify(&spliced), Err(AuthError::BadSignature));

    let unsigned = hand_made(r#"{"alg":"HS256","typ":"JWT"}"#, &claims("a"), "");
    assert_eq!(v.verify(&unsigned), Err(AuthError::BadSignature));
}

#[test]
fn alg_none_is_never_accepted() {
    let v = hs_verifier(|_| {});
    for header in [
        r#"{"alg":"none","typ":"JWT"}"#,
        r#"{"alg":"None"}"#,
        r#"{"alg":"none","kid":"rsa-1"}"#,
    ] {
        let token = hand_made(header, &claims("a"), "");
        assert_eq!(
            v.verify(&token),
            Err(AuthError::AlgorithmNotAllowed),
            "{header}"
        );
    }
    let no_alg = hand_made(r#"{"typ":"JWT"}"#, &claims("a"), "");
    assert_eq!(v.verify(&no_alg), Err(AuthError::Malformed));
}

#[test]
fn malformed_tokens() {
    let v = hs_verifier(|_| {});
    assert_eq!(v.verify(""), Err(AuthError::Missing));
    let good = sign_hs(Algorithm::HS256, SECRET, &claims("a"));
    for bad in [
        "abc".to_owned(),
        "a.b".to_owned(),
        "a.b.c".to_owned(),
        format!("{good}.x"),
        format!("Bearer {good}"),
        format!("{good}!"),
        "x".repeat(9000),
        hand_made("not json", &claims("a"), "c2ln"),
        hand_made(
            r#"{"alg":"HS256","crit":["b64"],"b64":false}"#,
            &claims("a"),
            "c2ln",
        ),
    ] {
        assert_eq!(v.verify(&bad), Err(AuthError::Malformed), "{bad:.40}");
    }
}

#[test]
fn required_claims() {
    let v = hs_verifier(|_| {});
    let verify = |c: Value| v.verify(&sign_hs(Algorithm::HS256, SECRET, &c));
    assert_eq!(
        verify(json!({ "exp": now() + 60 })),
        Err(AuthError::MissingClaim("sub"))
    );
    assert_eq!(
        verify(json!({ "sub": "", "exp": now() + 60 })),
        Err(AuthError::MissingClaim("sub"))
    );
    assert_eq!(
        verify(json!({ "sub": "a" })),
        Err(AuthError::MissingClaim("exp"))
    );
    assert_eq!(
        verify(json!({ "sub": 42, "exp": now() + 60 })),
        Err(AuthError::Malformed)
    );
    assert_eq!(
        verify(json!({ "sub": "a", "exp": "soon" })),
        Err(AuthError::Malformed)
    );
    let t = now();
    let fractional = json!({ "sub": "a", "exp": t as f64 + 60.5 });
    assert_eq!(verify(fractional).map(|c| c.exp), Ok(t + 60));
}

#[test]
fn optional_claims_of_the_wrong_type_are_malformed() {
    let v = hs_verifier(|_| {});
    let exp = now() + 60;
    for bad in [
        json!({ "sub": "a", "exp": exp, "groups": "g" }),
        json!({ "sub": "a", "exp": exp, "groups": [1, 2] }),
        json!({ "sub": "a", "exp": exp, "roles": {"admin": true} }),
        json!({ "sub": "a", "exp": exp, "device": 7 }),
        json!({ "sub": "a", "exp": exp, "nbf": "later" }),
    ] {
        let token = sign_hs(Algorithm::HS256, SECRET, &bad);
        assert_eq!(v.verify(&token), Err(AuthError::Malformed), "{bad}");
    }
}

#[test]
fn issuer_checked_only_when_configured() {
    let v = hs_verifier(|c| c.issuer = Some("https://id.example".into()));
    let with_iss = |iss: Value| {
        let c = json!({ "sub": "a", "exp": now() + 60, "iss": iss });
        v.verify(&sign_hs(Algorithm::HS256, SECRET, &c))
    };
    assert!(with_iss(json!("https://id.example")).is_ok());
    assert_eq!(
        with_iss(json!("https://evil.example")),
        Err(AuthError::WrongIssuer)
    );
    // RFC 7519 §4.1.1: one string; any other type is a malformed token. jsonwebtoken alone would
    // accept an array holding the issuer.
    for iss in [
        json!(["https://id.example"]),
        json!(["https://evil.example", "https://id.example"]),
        json!(["https://evil.example"]),
        json!({ "iss": "https://id.example" }),
        json!(17),
        json!(null),
    ] {
        assert_eq!(with_iss(iss.clone()), Err(AuthError::Malformed), "{iss}");
    }
    // A string serde_json must unescape (`\"`) is read like any other.
    let quoted = hs_verifier(|c| c.issuer = Some("id \"q\"".into()));
    let c = json!({ "sub": "a", "exp": now() + 60, "iss": "id \"q\"" });
    assert!(quoted
        .verify(&sign_hs(Algorithm::HS256, SECRET, &c))
        .is_ok());
    assert_eq!(
        v.verify(&sign_hs(Algorithm::HS256, SECRET, &claims("a"))),
        Err(AuthError::WrongIssuer)
    );

    let unchecked = hs_verifier(|_| {});
    let c = json!({ "sub": "a", "exp": now() + 60, "iss": "anyone" });
    assert!(unchecked
        .verify(&sign_hs(Algorithm::HS256, SECRET, &c))
        .is_ok());
    // Unchecked is not unparsed: an `iss` that is not a string is malformed either way.
    let c = json!({ "sub": "a", "exp": now() + 60, "iss": ["anyone"] });
    assert_eq!(
        unchecked.verify(&sign_hs(Algorithm::HS256, SECRET, &c)),
        Err(AuthError::Malformed)
    );
}

#[test]
fn audience_checked_only_when_configured() {
    let v = hs_verifier(|c| c.audience = vec!["presence".into(), "chat".into()]);
    let with_aud = |aud: Value| {
        let c = json!({ "sub": "a", "exp": now() + 60, "aud": aud });
        v.verify(&sign_hs(Algorithm::HS256, SECRET, &c))
    };
    assert!(with_aud(json!("chat")).is_ok());
    assert!(with_aud(json!(["billing", "presence"])).is_ok());
    assert_eq!(with_aud(json!("billing")), Err(AuthError::WrongAudience));
    assert_eq!(with_aud(json!(["billing"])), Err(AuthError::WrongAudience));
    assert_eq!(
        v.verify(&sign_hs(Algorithm::HS256, SECRET, &claims("a"))),
        Err(AuthError::WrongAudience)
    );

    // Not configured: a token's `aud` is not looked at (jsonwebtoken's default would refuse it).
    let unchecked = hs_verifier(|_| {});
    let c = json!({ "sub": "a", "exp": now() + 60, "aud": ["anything"] });
    assert!(unchecked
        .verify(&sign_hs(Algorithm::HS256, SECRET, &c))
        .is_ok());
}

#[test]
fn minted_claims_round_trip() {
    let v = hs_verifier(|_| {});
    let spec = TokenSpec {
        sub: "alice".into(),
        groups: vec!["team-a".into(), "team-b".into()],
        roles: vec!["admin".into()],
        ttl: Duration::from_secs(600),
        device: Some("laptop-1".into()),
        device_type: Some("desktop".into()),
        region: Some("eu-west".into()),
    };
    let t = now();
    let got = v
        .verify(&mint_hs256(SECRET, &spec))
        .expect("minted token verifies");
    assert_eq!(got.sub, "alice");
    assert_eq!(got.groups, spec.groups);
    assert_eq!(got.roles, spec.roles);
    assert_eq!(got.device.as_deref(), Some("laptop-1"));
    assert_eq!(got.device_type.as_deref(), Some("desktop"));
    assert_eq!(got.region.as_deref(), Some("eu-west"));
    assert!((t + 600..=t + 601).contains(&got.exp), "exp = iat + ttl");
}

#[test]
fn minting_omits_unset_claims() {
    let token = mint_hs256(SECRET, &TokenSpec::new("bob", Duration::from_secs(60)));
    let payload = token.split('.').nth(1).expect("three segments");
    let json: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("base64"))
        .expect("json payload");
    let mut keys: Vec<_> = json.as_object().expect("object").keys().cloned().collect();
    keys.sort();
    assert_eq!(keys, ["exp", "iat", "sub"]);
    let got = hs_verifier(|_| {}).verify(&token).expect("valid");
    assert!(got.groups.is_empty() && got.roles.is_empty() && got.device.is_none());
}

#[test]
fn refresh_must_keep_the_subject() {
    let v = hs_verifier(|_| {});
    let token = mint_hs256(SECRET, &TokenSpec::new("alice", Duration::from_secs(60)));
    assert_eq!(
        v.verify_refresh(&token, "alice").map(|c| c.sub),
        Ok("alice".to_owned())
    );
    assert_eq!(
        v.verify_refresh(&token, "bob"),
        Err(AuthError::SubjectMismatch)
    );
    let expired = sign_hs(
        Algorithm::HS256,
        SECRET,
        &json!({ "sub": "alice", "exp": now() - 3600 }),
    );
    assert_eq!(v.verify_refresh(&expired, "alice"), Err(AuthError::Expired));
}

#[test]
fn reasons_are_stable_and_match_display() {
    use AuthError::*;
    let all = [
        Missing,
        Malformed,
        Expired,
        NotYetValid,
        BadSignature,
        AlgorithmNotAllowed,
        AlgorithmMismatch,
        UnknownKey,
        MissingClaim("sub"),
        MissingClaim("exp"),
        WrongIssuer,
        WrongAudience,
        SubjectMismatch,
    ];
    let mut seen = std::collections::HashSet::new();
    for e in all {
        assert_eq!(e.to_string(), e.reason());
        assert!(seen.insert(e.reason()), "duplicate reason {}", e.reason());
    }
    assert_eq!(Expired.reason(), "token expired");
    assert_eq!(MissingClaim("sub").reason(), "missing claim: sub");
}
