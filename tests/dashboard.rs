//! Proves the admin dashboard works in a real browser against a real server: headless Chromium,
//! driven over the DevTools protocol, signs in from the URL fragment, follows users coming
//! online and changing status live over `/ws/admin`, filters the user list, opens a user's
//! sessions and kicks one (the client sees 4003) — under the page's strict CSP, having loaded
//! every ES module of `assets/dashboard/` as JavaScript, with no CSP violation, no uncaught
//! exception and no console or browser-log error (a broken import is one of those). It shows a user's recorded history (analytics, timeline,
//! refreshed live) and replays who was online from history, and says so when history is off.
//! It shows regions looked up from a client's address (`[geo]`, behind a trusted proxy). And it
//! refuses bad and non-admin tokens. Its webhook card shows a failing webhook (its error) beside a
//! healthy one, and the failing one recovering.
//!
//! Needs Chromium (`tests/common/tools.rs` finds or installs it); fails when it cannot.

#[path = "support/cdp.rs"]
mod cdp;
mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use cdp::{js_str, Browser};
use common::{tools, Client, TestServer, SECRET};
use presenced::auth::{mint_hs256, TokenSpec};
use presenced::config::HistoryBackend;
use serde_json::{json, Value};
use tungstenite::client::IntoClientRequest;

/// Viewport of the browser, CSS pixels: a laptop-sized window.
const VIEWPORT: (u32, u32) = (1440, 1000);

/// A narrow window: the detail panel becomes a drawer, the replay card stacks.
const NARROW: (u32, u32) = (900, 1000);

/// A client token for `sub` in `groups`, with an optional `device_type` claim.
fn client_token(sub: &str, groups: &[&str], device_type: Option<&str>) -> String {
    let mut spec = TokenSpec::new(sub, Duration::from_secs(3600));
    spec.groups = groups.iter().map(|g| g.to_string()).collect();
    spec.device_type = device_type.map(str::to_owned);
    mint_hs256(SECRET, &spec)
}

/// A client token with the claims history records: device, device type, region.
fn device_token(
    sub: &str,
    groups: &[&str],
    device: &str,
    device_type: &str,
    region: &str,
) -> String {
    let mut spec = TokenSpec::new(sub, Duration::from_secs(3600));
    spec.groups = groups.iter().map(|g| g.to_string()).collect();
    spec.device = Some(device.into());
    spec.device_type = Some(device_type.into());
    spec.region = Some(region.into());
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

/// Where a screenshot goes: `$CARGO_TARGET_DIR` (or `target/`) `/<name>`.
fn screenshot_path(name: &str) -> PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    let dir = if dir.is_absolute() {
        dir
    } else {
        std::env::current_dir().unwrap().join(dir)
    };
    dir.join(name)
}

/// Scrolls to the top and writes a full-page screenshot `name` under the target dir.
fn screenshot(b: &mut Browser, name: &str) {
    b.eval("window.scrollTo(0, 0)");
    let shot = screenshot_path(name);
    b.screenshot(&shot);
    println!("dashboard screenshot: {}", shot.display());
}

/// The text of `selector` while it is shown, else "" (for `hidden` messages).
fn shown_text(selector: &str) -> String {
    format!(
        "(() => {{ const e = document.querySelector({}); return e && !e.hidden ? e.textContent : ''; }})()",
        js_str(selector)
    )
}

/// The timeline of the user panel: `{kind, text}` per event, newest first.
const TIMELINE: &str = "[...document.querySelectorAll('#history-events li[data-kind]')]\
    .map(li => ({kind: li.dataset.kind, text: li.querySelector('.ev-what').textContent}))";

/// Whether the timeline `v` has an event of `kind` whose text contains `text`.
fn has_event(v: &Value, kind: &str, text: &str) -> bool {
    v.as_array().is_some_and(|evs| {
        evs.iter()
            .any(|e| e["kind"] == kind && e["text"].as_str().is_some_and(|t| t.contains(text)))
    })
}

/// The users listed under the replay chart.
const REPLAY_USERS: &str =
    "[...document.querySelectorAll('#replay-users [data-user]')].map(e => e.dataset.user)";

/// The dashboard's ES modules: every `.js` file of `assets/dashboard/` (`app.js` is the entry,
/// the rest it imports directly or not).
fn dashboard_modules() -> BTreeSet<String> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/dashboard");
    let modules: BTreeSet<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".js"))
        .collect();
    assert!(modules.contains("app.js"), "no app.js in {dir}");
    modules
}

/// What is wrong with how the page was loaded: its document without the strict CSP, a module
/// of `assets/dashboard/` not fetched, or fetched but not with a 200, as JavaScript, as a script.
fn module_problems(b: &mut Browser) -> Vec<String> {
    b.eval("0"); // reads the events still queued, responses among them
    let responses = b.responses();
    let mut problems = Vec::new();
    match responses.iter().find(|r| r.resource_type == "document") {
        None => problems.push("no document among the responses".to_owned()),
        Some(doc) => {
            let csp = doc.csp.as_deref().unwrap_or("");
            if !csp.contains("script-src 'self'") || csp.contains("unsafe-") {
                problems.push(format!("the page is not under the strict CSP: {csp:?}"));
            }
        }
    }
    // The entry first: when it fails, nothing else is fetched.
    let mut modules: Vec<String> = dashboard_modules().into_iter().collect();
    modules.sort_by_key(|m| m != "app.js");
    for name in modules {
        let path = format!("/assets/{name}");
        let mut fetched = responses
            .iter()
            .filter(|r| r.url.split('?').next().unwrap().ends_with(&path))
            .peekable();
        if fetched.peek().is_none() {
            problems.push(format!(
                "the browser never fetched the module {path} (nothing imports it, or an \
                 import before it failed)"
            ));
        }
        for r in fetched {
            if r.status != 200 || r.mime_type != "text/javascript" || r.resource_type != "script" {
                problems.push(format!("{path} is not loaded as a module script: {r:?}"));
            }
        }
    }
    problems
}

/// Loads the dashboard at `url` and fails at once, saying why, unless every module loaded and
/// ran cleanly (a broken import stops the page before it does anything).
fn open_page(b: &mut Browser, url: &str) {
    b.goto(url);
    // Loaded means this document's, not the blank one before it: by then every module has run
    // (module scripts run before DOMContentLoaded) or failed.
    let origin = url.splitn(4, '/').take(3).collect::<Vec<_>>().join("/");
    b.wait_for(
        &format!("{origin} to finish loading"),
        "location.origin + ' ' + document.readyState",
        |v| v.as_str() == Some(&format!("{origin} complete")),
    );
    assert_page_clean(b);
}

/// Fails on anything the page reported going wrong, all of it in one message: a module not
/// loaded (or the CSP missing), CSP violations, uncaught errors, console and browser-log errors.
fn assert_page_clean(b: &mut Browser) {
    let mut problems = module_problems(b);
    let csp = b.eval("window.__cspViolations");
    if csp != json!([]) {
        problems.push(format!(
            "the page violated its Content-Security-Policy: {csp}"
        ));
    }
    // The browser asks for /favicon.ico on its own (the page names no icon): its 404 is the
    // browser's, not the page's.
    problems.extend(
        b.page_errors()
            .iter()
            .filter(|e| !(e.starts_with("log error (network)") && e.ends_with("/favicon.ico")))
            .cloned(),
    );
    assert!(
        problems.is_empty(),
        "the page did not load or run cleanly: {problems:#?}\nresponses: {:#?}",
        b.responses()
    );
}

#[test]
fn dashboard_follows_presence_live_and_kicks_a_session() {
    let server = TestServer::start(2);
    let mut b = Browser::launch(&tools::chromium(), VIEWPORT.0, VIEWPORT.1);
    let admin = server.admin_token();
    open_page(&mut b, &format!("http://{}/#token={admin}", server.admin));

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

    screenshot(&mut b, "dashboard-screenshot.png");
    assert_page_clean(&mut b);
}

#[test]
fn dashboard_shows_a_users_history_and_replays_who_was_online() {
    let server = TestServer::with(2, |c| {
        c.history.sample_interval_s = 1;
        c.history.batch_interval_ms = 20;
    });
    let mut dana = Client::connect(
        server.addr,
        &device_token("dana", &["crew"], "phone", "ios", "eu-west"),
    );
    let _erin = Client::connect(
        server.addr,
        &device_token("erin", &["ops"], "laptop", "web", "us-east"),
    );
    dana.set_status("busy", Some("in a call"));
    // A second device of dana's, come and gone: a session end, another device type and region.
    Client::connect(
        server.addr,
        &device_token("dana", &["crew"], "laptop", "web", "us-east"),
    )
    .close();

    let mut b = Browser::launch(&tools::chromium(), VIEWPORT.0, VIEWPORT.1);
    open_page(
        &mut b,
        &format!("http://{}/#token={}", server.admin, server.admin_token()),
    );
    b.wait_text("#conn-state", "live");
    b.wait_for(
        "rows for dana and erin",
        USER_ROWS,
        rows_are(&["dana", "erin"]),
    );

    // The user's history: analytics of the last 24 h and the latest events.
    b.click("#users tr[data-user='dana']");
    b.wait_text("#detail-user", "dana");
    b.wait_for(
        "dana's analytics to count her session",
        "Number(document.querySelector('#an-sessions').textContent)",
        |v| v.as_f64() >= Some(1.0),
    );
    b.wait_text("#an-open", "1");
    let online = b.text("#an-online");
    assert!(
        online
            .as_str()
            .is_some_and(|t| t == "<1m" || t.ends_with('m')),
        "time online reads as h/m: {online}"
    );
    let types = b.eval(
        "[...document.querySelectorAll('#an-device-types li[data-key]')].map(li => li.dataset.key)",
    );
    assert!(
        types.as_array().is_some_and(|t| t.len() == 2
            && t.contains(&json!("ios"))
            && t.contains(&json!("web"))),
        "time by device type: ios and web, longest first: {types}"
    );
    b.wait_for(
        "sessions by region: one in eu-west, one in us-east",
        "[...document.querySelectorAll('#an-regions li[data-key]')]\
           .map(li => [li.dataset.key, li.querySelector('.bar-value').textContent])",
        |v| v == &json!([["eu-west", "1"], ["us-east", "1"]]),
    );
    let timeline = b.wait_for(
        "dana's timeline: her phone's start, the busy status, her laptop's end",
        TIMELINE,
        |v| {
            has_event(v, "session_start", "phone")
                && has_event(v, "status", "in a call")
                && has_event(v, "session_end", "laptop")
        },
    );
    assert!(
        has_event(&timeline, "session_start", "ios") && has_event(&timeline, "status", "busy"),
        "the start names the device type, the status event the status: {timeline}"
    );
    let texts = b.eval(
        "[...document.querySelectorAll('#history-events li[data-kind=\"status\"] .ev-text')]\
           .map(e => e.textContent)",
    );
    assert!(
        texts
            .as_array()
            .is_some_and(|t| t.contains(&json!("in a call"))),
        "a status event carries the text set: {texts}"
    );

    // A change of hers while the panel is open reaches the timeline (`changes` → re-fetch).
    dana.set_status("away", Some("back soon"));
    b.wait_for(
        "the timeline to show the new status without reopening the panel",
        TIMELINE,
        |v| has_event(v, "status", "back soon"),
    );

    // Replay: the last 15 minutes (the default window) from the samples, one a second here.
    let series = b.wait_for(
        "the replay over the last 15 min to show both users online",
        "(() => { const d = document.querySelector('#replay-chart').dataset; \
           return {points: Number(d.points), non_null: Number(d.nonNull), max: Number(d.max), \
                   canvas: !!document.querySelector('#replay-chart canvas')}; })()",
        |v| v["non_null"].as_u64() >= Some(1) && v["max"].as_u64() >= Some(2),
    );
    let points = series["points"].as_u64().unwrap();
    assert!(
        (2..=601).contains(&points) && series["canvas"] == true,
        "a drawn series of at most ~600 points: {series}"
    );
    assert_eq!(b.text("#replay-scope"), "all users");
    // Following the latest point, the list shows who is online now.
    b.wait_for(
        "the replay list to follow the latest point",
        REPLAY_USERS,
        rows_are(&["dana", "erin"]),
    );

    // The slider at the start of the window (before the server started): nobody.
    let min = b.eval("document.querySelector('#replay-at').min");
    b.type_into("#replay-at", min.as_str().unwrap());
    b.wait_text("#replay-total", "0");
    assert_eq!(b.eval(REPLAY_USERS), json!([]), "nobody was online then");
    assert!(
        b.text("#replay-lookback")
            .as_str()
            .is_some_and(|t| t.contains("24 h")),
        "the lookback is explained"
    );

    // A click at the right end of the chart picks the latest point (the x scale spans the
    // points, a couple of pixels apart): both users again.
    b.click_at("#replay-chart .u-over", 0.999, 0.5);
    let picked = b.wait_for(
        "the replay list for the clicked (latest) point",
        &format!(
            "({{users: {REPLAY_USERS}, t: document.querySelector('#replay-users').dataset.t, \
               last: document.querySelector('#replay-at').max, \
               at: document.querySelector('#replay-at-time').textContent}})"
        ),
        |v| v["users"] == json!(["dana", "erin"]) && v["t"] == v["last"],
    );
    assert!(
        picked["at"].as_str().is_some_and(|t| t.contains("paused")),
        "an inspected instant pauses the live replay: {picked}"
    );
    b.wait_text("#replay-total", "2");
    let age = b.eval(&format!("Date.now() - {}", picked["t"].as_str().unwrap()));
    assert!(
        age.as_f64().is_some_and(|ms| ms < 60_000.0),
        "the clicked instant is recent: {age} ms ago"
    );

    // The group filter narrows the replay to that group, at the same instant: dana alone is
    // in `crew`.
    b.type_into("#filter-group", "crew");
    b.wait_text("#replay-scope", "group crew");
    b.wait_for(
        "the replay list for the clicked instant, in crew",
        &format!(
            "({{users: {REPLAY_USERS}, t: document.querySelector('#replay-users').dataset.t}})"
        ),
        |v| v["users"] == json!(["dana"]) && v["t"] == picked["t"],
    );
    b.wait_text("#replay-total", "1");
    b.wait_for(
        "the crew series to count one user",
        "document.querySelector('#replay-chart').dataset.max",
        |v| v == "1",
    );

    screenshot(&mut b, "dashboard-history-1440.png");
    b.set_viewport(NARROW.0, NARROW.1);
    b.wait_for(
        "the replay chart to fit the narrow window",
        "document.querySelector('#replay-chart canvas').getBoundingClientRect().right <= innerWidth",
        |v| v == true,
    );
    screenshot(&mut b, "dashboard-history-900.png");

    // The other windows (the narrow page's drawer closed first: it covers the card): a step of
    // whole seconds, at least the sampling interval, keeps every replay within ~600 points;
    // picking a window follows the latest point again.
    b.click("#detail-close");
    for (button, step) in [("1 h", 6_000), ("24 h", 144_000)] {
        b.click(&format!(".seg-btn[data-window='{}']", step * 600));
        let got = b.wait_for(
            &format!("the {button} replay"),
            "(() => { const d = document.querySelector('#replay-chart').dataset; \
               return {step: Number(d.step), points: Number(d.points)}; })()",
            |v| v["step"] == step,
        );
        assert!(
            got["points"]
                .as_u64()
                .is_some_and(|n| (2..=601).contains(&n)),
            "{button}: {got}"
        );
        assert_eq!(
            b.eval("document.querySelector('#replay-now').classList.contains('active')"),
            true,
            "a new window follows the latest point"
        );
    }
    assert_page_clean(&mut b);
}

#[test]
fn dashboard_says_when_history_is_off() {
    let server = TestServer::with(1, |c| c.history.backend = HistoryBackend::Off);
    let _fay = server.connect("fay");
    let mut b = Browser::launch(&tools::chromium(), VIEWPORT.0, VIEWPORT.1);
    open_page(
        &mut b,
        &format!("http://{}/#token={}", server.admin, server.admin_token()),
    );
    b.wait_text("#conn-state", "live");

    b.wait_for(
        "the replay card to say history is off",
        &shown_text("#replay-msg"),
        |v| v.as_str().is_some_and(|t| t.contains("History is off")),
    );
    assert_eq!(
        b.eval("document.querySelector('#replay-body').hidden"),
        true,
        "no empty chart when history is off"
    );
    b.wait_for("a row for fay", USER_ROWS, rows_are(&["fay"]));
    b.click("#users tr[data-user='fay']");
    b.wait_text("#detail-user", "fay");
    b.wait_for(
        "the user panel to say history is off",
        &shown_text("#history-msg"),
        |v| v.as_str().is_some_and(|t| t.contains("History is off")),
    );
    assert_eq!(
        b.eval("document.querySelector('#history-body').hidden"),
        true,
        "no empty analytics when history is off"
    );
    // The live parts still work.
    b.wait_for(
        "fay's session in the panel",
        "document.querySelectorAll('#sessions tbody tr[data-session]').length",
        |v| v == 1,
    );
    screenshot(&mut b, "dashboard-history-off.png");
    assert_page_clean(&mut b);
}

#[test]
fn dashboard_asks_for_a_token_and_refuses_bad_ones() {
    let server = TestServer::start(1);
    let mut b = Browser::launch(&tools::chromium(), VIEWPORT.0, VIEWPORT.1);
    open_page(&mut b, &format!("http://{}/", server.admin));

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

/// In a cluster the dashboard lists the nodes (this one first) and the bus state, from
/// `/api/stats`' `cluster`; on a single node that card stays hidden (the other tests).
#[test]
fn dashboard_lists_the_cluster_nodes() {
    let nats = common::nats::Nats::start();
    let on_bus = |id: &'static str| {
        let url = nats.url();
        move |c: &mut presenced::Config| {
            c.cluster = Some(presenced::config::ClusterConfig {
                nats_url: vec![url],
                node_id: Some(id.into()),
                lease_ms: 1_500,
                ..Default::default()
            });
        }
    };
    let server = TestServer::with(1, on_bus("dash-a"));
    let _other = TestServer::with(1, on_bus("dash-b"));
    let mut b = Browser::launch(&tools::chromium(), VIEWPORT.0, VIEWPORT.1);
    open_page(
        &mut b,
        &format!("http://{}/#token={}", server.admin, server.admin_token()),
    );
    b.wait_text("#conn-state", "live");
    b.wait_for(
        "both nodes listed, this one first",
        "Array.from(document.querySelectorAll('#nodes tbody tr')).map(r => r.dataset.node)",
        |v| v == &json!(["dash-a (this node)", "dash-b"]),
    );
    assert_eq!(
        b.eval("document.querySelector('#nodes-card').hidden"),
        false
    );
    b.wait_for("the bus state", &shown_text("#nodes-bus"), |v| {
        v.as_str() == Some("bus connected")
    });
    screenshot(&mut b, "dashboard-cluster-nodes.png");
    assert_page_clean(&mut b);
}

#[test]
fn dashboard_shows_regions_looked_up_from_the_client_address() {
    // A client behind the trusted proxy 127.0.0.2, named in X-Forwarded-For, with no region
    // claim: its region comes from a small MaxMind database written here (tests/common/geo.rs).
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("geo.mmdb");
    common::geo::write_db(&db, &["203.0.113.0/24=ZZ/Testville", "198.51.100.0/24=YY"]);
    let server = TestServer::with(2, |c| {
        c.trusted_proxies = vec!["127.0.0.2".into()];
        c.geo.database = Some(db.clone());
    });
    let via_proxy = |user: &str, client: &str| {
        let tcp = common::tcp_from("127.0.0.2".parse().unwrap(), server.addr, None);
        let mut req = format!("ws://{}/ws", server.addr)
            .into_client_request()
            .unwrap();
        let h = req.headers_mut();
        h.insert(
            "Authorization",
            format!("Bearer {}", client_token(user, &[], None))
                .parse()
                .unwrap(),
        );
        h.insert("X-Forwarded-For", client.parse().unwrap());
        tungstenite::client::client(req, tcp)
            .expect("upgrade through the proxy")
            .0
    };
    let _berlin = via_proxy("zoe", "203.0.113.8");
    let _yy = via_proxy("yan", "198.51.100.8");
    let mut b = Browser::launch(&tools::chromium(), VIEWPORT.0, VIEWPORT.1);
    open_page(
        &mut b,
        &format!("http://{}/#token={}", server.admin, server.admin_token()),
    );
    b.wait_for("rows for yan and zoe", USER_ROWS, rows_are(&["yan", "zoe"]));
    assert_eq!(
        b.text("#users tr[data-user='zoe'] td:nth-child(5)"),
        "ZZ/Testville",
        "zoe's regions"
    );
    assert_eq!(b.text("#users tr[data-user='yan'] td:nth-child(5)"), "YY");
    // The region filter takes a country and keeps its cities.
    b.type_into("#filter-region", "ZZ");
    b.wait_for(
        "the region filter to keep zoe",
        USER_ROWS,
        rows_are(&["zoe"]),
    );
    b.click("#users tr[data-user='zoe']");
    b.wait_text("#detail-user", "zoe");
    b.wait_for(
        "zoe's session with its region and the client's address",
        "[...document.querySelectorAll('#sessions tbody tr[data-session] td')].map(t => t.textContent)",
        |v| {
            let cells: Vec<&str> = v.as_array().map_or(vec![], |a| a.iter().filter_map(Value::as_str).collect());
            cells.contains(&"ZZ/Testville") && cells.contains(&"203.0.113.8")
        },
    );
    assert_page_clean(&mut b);
}

#[test]
fn dashboard_shows_webhook_health() {
    // One receiver answers; the other is down (connection refused), then comes back.
    let good = common::webhooks::Receiver::start();
    let dead = common::webhooks::Receiver::start();
    dead.down();
    let server = TestServer::with(1, |c| {
        c.webhooks = vec![
            common::webhooks::hook(good.url(), |w| w.name = "audit".into()),
            common::webhooks::hook(dead.url(), |w| {
                w.name = "alerts".into();
                // Retries at most 500 ms apart: recovery shows within the page's poll.
                w.retry_max_ms = 500;
            }),
        ];
    });
    let _ann = server.connect("ann");
    let mut b = Browser::launch(&tools::chromium(), VIEWPORT.0, VIEWPORT.1);
    open_page(
        &mut b,
        &format!("http://{}/#token={}", server.admin, server.admin_token()),
    );
    b.wait_text("#conn-state", "live");
    let states = "Object.fromEntries([...document.querySelectorAll('#webhooks tbody tr')].map(r => [r.dataset.webhook, r.querySelector('[data-state]').dataset.state]))";
    b.wait_for("audit healthy, alerts failing", states, |v| {
        v == &json!({"audit": "ok", "alerts": "failing"})
    });
    assert_eq!(
        b.eval("document.querySelector('#webhooks-card').hidden"),
        false
    );
    assert_eq!(b.text("#webhooks-summary"), "1 failing");
    let error = b.text("#webhooks tr[data-webhook='alerts'] .hook-error");
    let error = error.as_str().unwrap_or_default().to_lowercase();
    assert!(
        error.contains("refused") || error.contains("connect"),
        "the refusal is shown: {error:?}"
    );
    // ann's session_start and user_online, acknowledged.
    let acked = |hook: &str| {
        shown_text(&format!(
            "#webhooks tr[data-webhook='{hook}'] td:nth-child(4)"
        ))
    };
    b.wait_for("audit's two events acknowledged", &acked("audit"), |v| {
        v == "2"
    });
    screenshot(&mut b, "dashboard-webhooks.png");
    dead.up();
    b.wait_for("alerts recovered", states, |v| {
        v == &json!({"audit": "ok", "alerts": "ok"})
    });
    assert_eq!(b.text("#webhooks-summary"), "all healthy");
    b.wait_for(
        "alerts' two events delivered after all",
        &acked("alerts"),
        |v| v == "2",
    );
    assert_page_clean(&mut b);
}
