//! Proves authentication happens before the upgrade, over real sockets: every bad token gets a
//! 401 with a short reason and no upgrade; good tokens signed with HS*, RS256, ES256 and EdDSA
//! (keys from PEM files and from a JWKS, chosen by `kid`) are admitted.

mod common;

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use common::{TestServer, SECRET};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use presenced::auth::{mint, AuthConfig, KeyConfig, TokenSpec};
use serde_json::{json, Value};

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/keys")
        .join(name)
}

fn hs(alg: Algorithm, claims: Value) -> String {
    encode(
        &Header::new(alg),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn b64(v: &Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

#[test]
fn bad_tokens_get_401_and_no_upgrade() {
    let server = TestServer::with(2, |c| {
        c.auth.issuer = Some("https://idp".into());
        c.auth.audience = vec!["presence".into()];
        c.auth.leeway_s = 0;
    });
    let good = json!({"sub":"u","exp":now()+600,"iss":"https://idp","aud":"presence"});
    assert_eq!(
        server.status_for(&hs(Algorithm::HS256, good.clone())).0,
        101
    );
    // A `sub` no op could name (longer than limits.max_id_bytes, 256 by default).
    let long = json!({"sub":"x".repeat(257),"exp":now()+600,"iss":"https://idp","aud":"presence"});
    let (code, body) = server.status_for(&hs(Algorithm::HS256, long));
    assert_eq!(
        (code, body.as_str()),
        (401, "sub longer than limits.max_id_bytes")
    );
    assert_eq!(
        server.status_for(&hs(Algorithm::HS512, good.clone())).0,
        101
    );

    let with = |patch: Value| {
        let mut c = good.clone();
        for (k, v) in patch.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    };
    let wrong_key = encode(
        &Header::new(Algorithm::HS256),
        &good,
        &EncodingKey::from_secret(b"some-other-secret-entirely"),
    )
    .unwrap();
    let alg_none = format!(
        "{}.{}.",
        b64(&json!({"alg":"none","typ":"JWT"})),
        b64(&good)
    );
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "expired",
            hs(Algorithm::HS256, with(json!({"exp": now() - 60}))),
            "expired",
        ),
        (
            "nbf in the future",
            hs(Algorithm::HS256, with(json!({"nbf": now() + 600}))),
            "not yet valid",
        ),
        ("bad signature", wrong_key, "signature"),
        ("alg none", alg_none, ""),
        (
            "missing sub",
            hs(Algorithm::HS256, with(json!({"sub": null}))),
            "sub",
        ),
        (
            "missing exp",
            hs(Algorithm::HS256, with(json!({"exp": null}))),
            "exp",
        ),
        (
            "wrong issuer",
            hs(Algorithm::HS256, with(json!({"iss":"https://evil"}))),
            "issuer",
        ),
        (
            // RFC 7519: `iss` is one string; an array naming the issuer among others is refused.
            "iss as an array holding the issuer",
            hs(
                Algorithm::HS256,
                with(json!({"iss":["https://evil","https://idp"]})),
            ),
            "malformed",
        ),
        (
            "wrong audience",
            hs(Algorithm::HS256, with(json!({"aud":"other"}))),
            "audience",
        ),
        ("garbage", "not-a-jwt".into(), ""),
    ];
    for (what, token, reason) in cases {
        let (status, body) = server.status_for(&token);
        assert_eq!(status, 401, "{what}: {body}");
        assert!(
            body.contains(reason),
            "{what}: reason `{body}` should mention `{reason}`"
        );
    }
    // No token at all, by header or query.
    assert_eq!(server.raw_upgrade("/ws", "").0, 401);
    // The query parameter works like the header (browsers cannot set headers).
    let (status, _) = server.raw_upgrade(&format!("/ws?token={}", hs(Algorithm::HS256, good)), "");
    assert_eq!(status, 101);
    let m = server.handle().metrics_total();
    assert!(m.handshakes_unauthorized >= 10, "{m:?}");
}

#[test]
fn malformed_upgrades_get_4xx() {
    let server = TestServer::start(2);
    let token = server.token("x");
    assert_eq!(
        server
            .raw_upgrade("/nope", &format!("Authorization: Bearer {token}\r\n"))
            .0,
        404
    );
    let (status, _) = common::raw_request(server.addr, "POST /ws HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, 405);
    let (status, _) = common::raw_request(
        server.addr,
        &format!("GET /ws HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n"),
    );
    assert_eq!(status, 400, "a plain GET is not an upgrade");
    let (status, body) = server.raw_upgrade(
        "/ws?device_type=toaster",
        &format!("Authorization: Bearer {token}\r\n"),
    );
    assert_eq!((status, body.contains("device_type")), (400, true));
    let huge = format!("X-Filler: {}\r\n", "a".repeat(10_000));
    assert_eq!(
        server.raw_upgrade("/ws", &huge).0,
        431,
        "head over max_header_bytes"
    );
}

fn asymmetric_server() -> TestServer {
    TestServer::with(2, |c| {
        c.jwt_secret = None;
        c.auth = AuthConfig {
            keys: vec![KeyConfig {
                kid: Some("pem-rsa".into()),
                alg: "RS256".into(),
                pem: fixture("rsa_public.pem"),
            }],
            jwks: Some(fixture("jwks.json")),
            ..AuthConfig::default()
        };
    })
}

fn signed(alg: Algorithm, private: &str, kid: Option<&str>, sub: &str) -> String {
    let pem = std::fs::read(fixture(private)).unwrap();
    let key = match alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem),
        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
        _ => unreachable!(),
    }
    .unwrap();
    let mut spec = TokenSpec::new(sub, Duration::from_secs(600));
    spec.groups = vec!["g".into()];
    mint(&key, alg, kid, &spec).unwrap()
}

#[test]
fn asymmetric_keys_from_pem_and_jwks_by_kid() {
    let server = asymmetric_server();
    for (alg, private, kid) in [
        (Algorithm::RS256, "rsa_private.pem", "pem-rsa"),
        (Algorithm::RS256, "rsa_private.pem", "rsa-1"),
        (Algorithm::ES256, "ec_private.pem", "ec-1"),
        (Algorithm::EdDSA, "ed_private.pem", "ed-1"),
    ] {
        let token = signed(alg, private, Some(kid), &format!("user-{kid}"));
        let c = server.connect_token(&token);
        assert_eq!(c.welcome["user"], format!("user-{kid}"));
    }
    // Unknown kid; a kid whose key has another algorithm; the public key used as an HMAC secret.
    let unknown = signed(Algorithm::ES256, "ec_private.pem", Some("nope"), "u");
    assert_eq!(server.status_for(&unknown).0, 401);
    let mismatch = signed(Algorithm::ES256, "ec_private.pem", Some("rsa-1"), "u");
    assert_eq!(server.status_for(&mismatch).0, 401);
    let public_pem = std::fs::read(fixture("rsa_public.pem")).unwrap();
    let confused = encode(
        &Header {
            kid: Some("pem-rsa".into()),
            ..Header::new(Algorithm::HS256)
        },
        &json!({"sub":"attacker","exp":now()+600}),
        &EncodingKey::from_secret(&public_pem),
    )
    .unwrap();
    assert_eq!(server.status_for(&confused).0, 401);
    // No shared secret configured: HS256 tokens have no key.
    assert_eq!(
        server
            .status_for(&hs(Algorithm::HS256, json!({"sub":"u","exp":now()+600})))
            .0,
        401
    );
}

#[test]
fn refresh_requires_the_same_subject() {
    let server = TestServer::start(2);
    let mut c = server.connect("refresher");
    let ok = c.request(json!({"op":"refresh","token": server.token("refresher")}));
    assert_eq!(ok["type"], "ack");
    let other = c.request(json!({"op":"refresh","token": server.token("someone-else")}));
    assert_eq!(other["code"], "forbidden");
    let garbage = c.request(json!({"op":"refresh","token": "x.y.z"}));
    assert_eq!(garbage["code"], "forbidden");
    assert_eq!(c.request(json!({"op":"ping"}))["type"], "pong");
}
