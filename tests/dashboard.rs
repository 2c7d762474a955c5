//! Proves the admin dashboard works in a real browser against a real server: headless Chromium,
//! driven over the DevTools protocol, signs in from the URL fragment, follows users coming
//! online and changing status live over `/ws/admin`, filters the user list, opens a user's
//! sessions and kicks one (the client sees 4003) — under the page's strict CSP, with no CSP
//! violation and no uncaught exception. And it refuses bad and non-admin tokens.
//!
//! Needs Chromium (`tests/common/tools.rs` finds or installs it); fails when it cannot.

#[path = "support/cdp.rs"]
mod cdp;
mod common;

use std::path::PathBuf;
use std::time::Duration;

use cdp::{js_str, Browser};
use common::{tools, Client, TestServer, SECRET};
use presenced::auth::{mint_hs256, TokenSpec};
use serde_json::{json, Value};

/// Viewport of the browser, CSS pixels: a laptop-sized window.
const VIEWPORT: (u32, u32) = (1440, 1000);

/// A client token for `sub` in `groups`, with an optional `device_type` claim.
fn client_token(sub: &str, groups: &[&str], device_type: Option<&str>) -> String {
    let mut spec = TokenSpec::new(sub, Duration::from_secs(3600));
    spec.groups = groups.iter().map(|g| g.to_string()).collect();
    spec.device_type = device_type.map(str::to_owned);
    mint_hs256(SECRET, &spec)
}

/// The `data-user` of every row of the user list, in order.
const USER_ROWS: &str =
    "[...document.querySelectorAll('#users tbody tr[data-user]')].map(r => r.dataset.user)";

fn rows_are<'a>(want: &'a [&'a str]) -> impl Fn(&Value) -> bool + 'a {
    move |v| {
        v.as_array().is_some_and(|rows| {
            rows.len() == want.len() && rows.iter().zip(want).all(|(r, w)| r.as_str() == Some(*w))
        })
    }
}

/// Where the screenshot goes: `$CARGO_TARGET_DIR` (or `target/`) `/dashboard-screenshot.png`.
fn screenshot_path() -> PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    let dir = if dir.is_absolute() {
        dir
    } else {
        std::env::current_dir().unwrap().join(dir)
    };
    dir.join("dashboard-screenshot.png")
}

/// Fails on anything the page reported going wrong: CSP violations, uncaught errors.
fn assert_page_clean(b: &mut Browser) {
    let csp = b.eval("window.__cspViolations");
    assert_eq!(
        csp,
        json!([]),
        "the page violated its Content-Security-Policy"
    );
    assert!(
        b.page_errors().is_empty(),
        "the page reported errors: {:#?}",
        b.page_errors()
    );
}

#[test]
fn dashboard_follows_presence_live_and_kicks_a_session() {
    let server = TestServer::start(2);
    let mut b = Browser::launch(&tools::chromium(), VIEWPORT.0, VIEWPORT.1);
    let admin = server.admin_token();
    b.goto(&format!("http://{}/#token={admin}", server.admin));

    b.wait_text("#conn-state", "live");
    b.wait_text("#online-count", "0");
    let href = b.eval("location.href");
    assert!(
        !href.as_str().unwrap().contains("token="),
        "the token is still in the address bar: {href}"
    );
    assert_eq!(
        b.eval("sessionStorage.getItem('presenced.admin.token')"),
        json!(admin),
        "the token is kept in sessionStorage"
    );

    let mut alice = Client::connect(server.addr, &client_token("alice", &["team"], Some("web")));
    let mut bob = Client::connect(server.addr, &client_token("bob", &["team"], None));
    let _carol = Client::connect(server.addr, &client_token("carol", &["other"], None));
    b.wait_text("#online-count", "3");
    b.wait_for(
        "rows for alice, bob and carol",
        USER_ROWS,
        rows_are(&["alice", "bob", "carol"]),
    );
    b.wait_text("#users-total", "3");
    let alice_types = b.text("#users tr[data-user='alice'] td:nth-child(4)");
    assert_eq!(alice_types, "web", "alice's device types");

    bob.set_status("busy", None);
    b.wait_for(
        "bob's row to turn busy",
        "document.querySelector('#users tr[data-user=\"bob\"]')?.dataset.status",
        |v| v == "busy",
    );
    let dot = b.eval(
        "getComputedStyle(document.querySelector('#users tr[data-user=\"bob\"] .dot')).backgroundColor",
    );
    assert_eq!(dot, "rgb(240, 82, 79)", "busy is a red dot");

    b.type_into("#filter-group", "team");
    b.wait_for(
        "the group filter to keep alice and bob",
        USER_ROWS,
        rows_are(&["alice", "bob"]),
    );
    b.wait_text("#users-total", "2");

    b.click("#users tr[data-user='alice']");
    b.wait_text("#detail-user", "alice");
    let sessions = "[...document.querySelectorAll('#sessions tbody tr[data-session]')]\
                    .map(r => r.dataset.session)";
    let ids = b.wait_for("alice's one session", sessions, |v| {
        v.as_array().is_some_and(|a| a.len() == 1)
    });
    let session = ids[0].as_str().unwrap().to_owned();
    assert_eq!(
        session,
        alice.welcome["session"].as_str().unwrap(),
        "the row is alice's session"
    );

    b.eval("window.confirm = () => true");
    b.click(&format!(
        "#sessions button[data-kick-session={}]",
        js_str(&session)
    ));
    assert_eq!(
        alice.close_code(),
        4003,
        "a kicked session closes with 4003"
    );
    b.wait_text("#online-count", "2");
    b.wait_for(
        "alice to leave the filtered list",
        USER_ROWS,
        rows_are(&["bob"]),
    );
    b.wait_for("alice's panel to show no session", sessions, |v| {
        v == &json!([])
    });
    b.wait_text("#conn-state", "live");

    b.eval("window.scrollTo(0, 0)");
    let shot = screenshot_path();
    b.screenshot(&shot);
    println!("dashboard screenshot: {}", shot.display());
    assert_page_clean(&mut b);
}

#[test]
fn dashboard_asks_for_a_token_and_refuses_bad_ones() {
    let server = TestServer::start(1);
    let mut b = Browser::launch(&tools::chromium(), VIEWPORT.0, VIEWPORT.1);
    b.goto(&format!("http://{}/", server.admin));

    b.wait_text("#conn-state", "signed out");
    assert_eq!(
        b.eval("document.querySelector('#signin').hidden"),
        false,
        "sign-in form shown"
    );
    assert_eq!(
        b.eval("document.querySelector('#main').hidden"),
        true,
        "no data without a token"
    );

    b.type_into("#token-input", "not-a-token");
    b.click("#token-submit");
    b.wait_text("#conn-state", "error: invalid token");
    b.wait_for(
        "an 'invalid token' message",
        "document.querySelector('#signin-msg').hidden ? '' : document.querySelector('#signin-msg').textContent",
        |v| v.as_str().is_some_and(|t| t.to_lowercase().contains("invalid token")),
    );
    assert_eq!(
        b.eval("sessionStorage.getItem('presenced.admin.token')"),
        Value::Null,
        "a refused token is forgotten"
    );

    // A valid client token without the admin role.
    b.type_into("#token-input", &server.token("mallory"));
    b.click("#token-submit");
    b.wait_text("#conn-state", "error: not an admin");
    b.wait_for(
        "a 'not an admin' message",
        "document.querySelector('#signin').hidden ? '' : document.querySelector('#signin-msg').textContent",
        |v| v.as_str().is_some_and(|t| t.to_lowercase().contains("not an admin")),
    );

    // And the admin token from the form works, then signing out forgets it.
    b.type_into("#token-input", &server.admin_token());
    b.click("#token-submit");
    b.wait_text("#conn-state", "live");
    b.click("#sign-out");
    b.wait_text("#conn-state", "signed out");
    assert_eq!(b.eval("document.querySelector('#signin').hidden"), false);
    assert_eq!(
        b.eval("sessionStorage.getItem('presenced.admin.token')"),
        Value::Null
    );
    assert_page_clean(&mut b);
}
