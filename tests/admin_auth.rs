//! Who may use the admin port, over real HTTP: health is open and the API needs an admin
//! (static token or admin-role JWT, 401 and 403 told apart), protected metrics, and credentials
//! that are not even ASCII.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

#[test]
fn health_is_open_and_the_api_needs_an_admin() {
    let s = admin_server(2);
    let (code, body) = s.admin_request("GET", "/healthz", None);
    assert_eq!((code, body), (200, json!({"ok": true})));
    let (code, body) = s.admin_request("GET", "/readyz", None);
    assert_eq!(code, 200);
    assert_eq!(body, json!({"ready": true, "shards": 2, "accepting": 2}));

    let (code, body) = s.admin_request("GET", "/api/stats", None);
    assert_eq!(code, 401);
    assert_eq!(body["error"], "unauthorized");
    assert!(body["message"].as_str().unwrap().contains("missing"));
    let (code, body) = s.admin_request("GET", "/api/stats", Some("not-a-token"));
    assert_eq!((code, &body["error"]), (401, &json!("unauthorized")));
    let (code, body) = s.admin_request("GET", "/api/stats", Some(&s.token("mallory")));
    assert_eq!((code, &body["error"]), (403, &json!("forbidden")));
    let wrong_key = presenced::auth::mint_hs256(
        "another-secret-0123456789abcdef",
        &presenced::auth::TokenSpec {
            roles: vec!["admin".into()],
            ..presenced::auth::TokenSpec::new("ops", Duration::from_secs(60))
        },
    );
    assert_eq!(
        s.admin_request("GET", "/api/stats", Some(&wrong_key)).0,
        401
    );
    assert_eq!(
        s.admin_request("GET", "/api/stats", Some(ADMIN_STATIC_TOKEN))
            .0,
        200
    );
    assert_eq!(
        s.admin_request("GET", "/api/stats", Some(&s.admin_token()))
            .0,
        200
    );

    let (code, body) = s.admin_request("GET", "/nope", None);
    assert_eq!((code, &body["error"]), (404, &json!("not_found")));
    let (code, body) = s.admin_request("POST", "/api/stats", Some(ADMIN_STATIC_TOKEN));
    assert_eq!((code, &body["error"]), (405, &json!("method_not_allowed")));
    let (code, body) = s.admin_request("GET", "/api/stats?x=1", Some(ADMIN_STATIC_TOKEN));
    assert_eq!(code, 400, "{body}");
}

#[test]
fn metrics_and_health_can_be_protected() {
    let s = TestServer::with(1, |c| c.admin.protect_metrics = true);
    assert_eq!(s.admin_request("GET", "/metrics", None).0, 401);
    assert_eq!(s.admin_request("GET", "/readyz", None).0, 401);
    assert_eq!(
        s.admin_request("GET", "/metrics", Some(&s.token("x"))).0,
        403
    );
    assert_eq!(
        s.admin_request("GET", "/metrics", Some(&s.admin_token())).0,
        200
    );
}

#[test]
fn non_ascii_credentials_are_refused_without_harming_a_shard() {
    let s = admin_server(2);
    for v in [
        "Bearer\u{e9} x",
        "B\u{e9}arer token",
        "\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}",
    ] {
        let (code, body) = raw_request(
            s.admin,
            &format!("GET /api/stats HTTP/1.1\r\nAuthorization: {v}\r\nConnection: close\r\n\r\n"),
        );
        assert_eq!(code, 401, "{v:?}: {body}");
        let (code, _) = s.raw_upgrade("/ws", &format!("Authorization: {v}\r\n"));
        assert_eq!(code, 401, "{v:?} on the client port");
    }
    // Every shard still answers: a map-reduce needs them all.
    assert_eq!(s.admin_get("/api/stats")["shards"], 2);
    let _a = s.connect(&user_on(0, 2, "x"));
    let _b = s.connect(&user_on(1, 2, "y"));
    assert_eq!(s.admin_request("GET", "/readyz", None).0, 200);
}
