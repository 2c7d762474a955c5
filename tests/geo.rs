//! The region of a session from its address (docs/CONFIG.md, "`[geo]`"), over real sockets.
//!
//! Two databases: the real GeoLite2-City that PyPI's `maxminddb-geolite2` ships, whose answers
//! are read independently with MaxMind's own Python reader (`tests/support/geo.py expect`) and
//! compared with the server's; and small ones written here with PyPI's `mmdb-writer` for exact
//! cases (a city, a country only, no record). `tests/support/geo.py` installs both packages
//! with pip when they are missing; without Python and pip the tests fail, saying so.
//!
//! Clients reach the server through a trusted proxy (127.0.0.2) that names them in
//! `X-Forwarded-For`, so any address can be tried from loopback.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::geo::{geo_py, write_db};
use common::{tcp_from, TestServer, WAIT};
use serde_json::Value;

const PROXY: u8 = 2;
const STRANGER: u8 = 3;
const ADMIN_TOKEN: &str = "geo-test-admin-token-0123456789";

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// Upgrades `token`'s connection from loopback `from` with `extra` headers; the socket stays
/// open (the session lives) until dropped.
fn open(addr: SocketAddr, from: u8, token: &str, extra: &str) -> TcpStream {
    let mut s = tcp_from(ip(from), addr, None);
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(common::upgrade_request_with(token, extra).as_bytes())
        .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).unwrap(), 1, "answered: {head:?}");
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s
}

/// The region the admin API shows for `user`'s only session (`Null` for none).
fn region_of(get: impl Fn(&str) -> Value, user: &str) -> Value {
    common::eventually(&format!("{user}'s session"), || {
        let u = get(&format!("/api/users/{user}"));
        let s = u["sessions"].as_array()?.first()?.clone();
        Some(s["region"].clone())
    })
}

fn online(server: &TestServer, query: &str) -> Vec<String> {
    let mut users: Vec<String> = server.admin_get(&format!("/api/online?{query}"))["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["user"].as_str().unwrap().to_owned())
        .collect();
    users.sort();
    users
}

#[test]
fn the_real_geolite2_database_gives_each_client_what_maxminds_reader_gives() {
    let real = geo_py(&["real"]).trim().to_owned();
    let addresses = [
        "81.2.69.142",
        "8.8.8.8",
        "193.0.6.139",
        "200.1.1.1",
        "1.1.1.1",
        "2a02:d400::1",
        "2001:4860:4860::8888",
        "127.0.0.1",
        "192.0.2.1",
    ];
    let mut args = vec!["expect", real.as_str()];
    args.extend_from_slice(&addresses);
    let expected: Vec<(String, Option<String>)> = geo_py(&args)
        .lines()
        .map(|l| {
            let (ip, region) = l.split_once('\t').unwrap();
            (ip.to_owned(), (region != "-").then(|| region.to_owned()))
        })
        .collect();
    assert_eq!(expected.len(), addresses.len());
    // The database answers differently for these addresses, or the test would prove little.
    let countries: std::collections::HashSet<&str> = expected
        .iter()
        .filter_map(|(_, r)| r.as_deref()?.split('/').next())
        .collect();
    assert!(countries.len() >= 4, "{expected:?}");
    assert!(expected.iter().any(|(_, r)| r.is_none()), "{expected:?}");
    assert!(expected
        .iter()
        .any(|(_, r)| r.as_deref().is_some_and(|r| r.contains('/'))));

    let server = TestServer::with(2, |c| {
        c.trusted_proxies = vec!["127.0.0.2".into()];
        c.geo.database = Some(PathBuf::from(&real));
    });
    let mut held = Vec::new();
    for (i, (addr, want)) in expected.iter().enumerate() {
        let user = format!("geo{i}");
        held.push(open(
            server.addr,
            PROXY,
            &server.token(&user),
            &format!("X-Forwarded-For: {addr}\r\n"),
        ));
        let got = region_of(|p| server.admin_get(p), &user);
        assert_eq!(got.as_str(), want.as_deref(), "{addr}");
    }
    let m = server.handle().metrics_total();
    let found = expected.iter().filter(|(_, r)| r.is_some()).count() as u64;
    assert_eq!(m.geo_found, found);
    assert_eq!(m.geo_not_found, addresses.len() as u64 - found);
}

#[test]
fn exact_regions_the_claim_and_a_cdn_header_come_first_and_filters_match_countries() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("small.mmdb");
    write_db(
        &db,
        &[
            "203.0.113.0/24=ZZ/Testville",
            "198.51.100.0/24=YY",
            "2001:db8::/32=WW",
        ],
    );
    let server = TestServer::with(2, |c| {
        c.trusted_proxies = vec!["127.0.0.2".into()];
        c.geo.database = Some(db.clone());
        c.geo.header = Some("CF-IPCountry".into());
    });
    let xff = |a: &str| format!("X-Forwarded-For: {a}\r\n");
    let token = |u: &str| server.token(u);
    let _held = [
        open(server.addr, PROXY, &token("city"), &xff("203.0.113.5")),
        open(server.addr, PROXY, &token("country"), &xff("198.51.100.9")),
        open(server.addr, PROXY, &token("six"), &xff("2001:db8::77")),
        open(server.addr, PROXY, &token("nowhere"), &xff("192.0.2.1")),
        open(
            server.addr,
            PROXY,
            &server.token_with("claimed", |t| t.region = Some("eu-west".into())),
            &xff("203.0.113.6"),
        ),
        open(
            server.addr,
            PROXY,
            &token("cdn"),
            &format!("CF-IPCountry: FR\r\n{}", xff("203.0.113.7")),
        ),
        open(
            server.addr,
            PROXY,
            &token("cdn-unknown"),
            &format!("CF-IPCountry: XX\r\n{}", xff("198.51.100.3")),
        ),
        // A stranger's CDN header is not believed, and its own address is in no record.
        open(
            server.addr,
            STRANGER,
            &token("spoofed"),
            "CF-IPCountry: FR\r\n",
        ),
    ];
    let get = |p: &str| server.admin_get(p);
    for (user, want) in [
        ("city", Some("ZZ/Testville")),
        ("country", Some("YY")),
        ("six", Some("WW")),
        ("nowhere", None),
        ("claimed", Some("eu-west")),
        ("cdn", Some("FR")),
        ("cdn-unknown", Some("YY")),
        ("spoofed", None),
    ] {
        assert_eq!(region_of(get, user).as_str(), want, "{user}");
    }
    // A country filter matches its cities; a city filter only that city.
    assert_eq!(online(&server, "region=ZZ"), ["city"]);
    assert_eq!(online(&server, "region=ZZ%2FTestville"), ["city"]);
    assert_eq!(online(&server, "region=YY"), ["cdn-unknown", "country"]);
    assert_eq!(online(&server, "region=Z"), Vec::<String>::new());
    let m = server.handle().metrics_total();
    assert_eq!((m.geo_from_header, m.geo_found, m.geo_not_found), (1, 4, 2));
    assert_eq!(m.proxy_headers_ignored, 1, "the stranger's header");
}

#[test]
fn behind_an_l4_proxy_the_geo_header_is_the_clients_own_word() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("small.mmdb");
    write_db(&db, &["203.0.113.0/24=ZZ/Testville"]);
    let server = TestServer::with(2, |c| {
        c.trusted_proxies = vec!["127.0.0.2".into(), "10.0.0.0/8".into()];
        c.proxy_protocol = true;
        c.geo.database = Some(db.clone());
        c.geo.header = Some("CF-IPCountry".into());
    });
    let open_proxied = |user: &str, header: &str, extra: &str| {
        let mut s = tcp_from(ip(PROXY), server.addr, None);
        s.write_all(header.as_bytes()).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.write_all(common::upgrade_request_with(&server.token(user), extra).as_bytes())
            .unwrap();
        let mut buf = [0u8; 12];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"HTTP/1.1 101", "{user}");
        s
    };
    // The L4 proxy names the client and passes its headers through: its CF-IPCountry is its
    // own word, and the database answers.
    let _a = open_proxied(
        "l4",
        "PROXY TCP4 203.0.113.5 127.0.0.1 1 2\r\n",
        "CF-IPCountry: FR\r\n",
    );
    // An L7 proxy of the chain (10.0.0.0/8, named by the L4 one) set it: believed, and
    // upper-cased like the database's codes.
    let _b = open_proxied(
        "l7",
        "PROXY TCP4 10.0.0.7 127.0.0.1 1 2\r\n",
        "CF-IPCountry: de\r\nX-Forwarded-For: 203.0.113.6\r\n",
    );
    // Cloudflare's Tor marker is no country: the database answers.
    let _c = open_proxied(
        "tor",
        "PROXY TCP4 10.0.0.7 127.0.0.1 1 2\r\n",
        "CF-IPCountry: T1\r\nX-Forwarded-For: 203.0.113.7\r\n",
    );
    let get = |p: &str| server.admin_get(p);
    assert_eq!(region_of(get, "l4"), "ZZ/Testville");
    assert_eq!(region_of(get, "l7"), "DE");
    assert_eq!(region_of(get, "tor"), "ZZ/Testville");
    let m = server.handle().metrics_total();
    assert_eq!((m.geo_from_header, m.geo_found), (1, 2));
    assert_eq!(m.proxy_headers_ignored, 1, "the L4 client's header");
}

/// `GET path` on a spawned server's admin port with the static admin token.
fn admin_get(admin: SocketAddr, path: &str) -> Value {
    let (code, body) = common::raw_request(
        admin,
        &format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\
             Connection: close\r\n\r\n"
        ),
    );
    assert_eq!(code, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

fn reloads(admin: SocketAddr, result: &str) -> f64 {
    let text = common::metrics_text(admin, Some(ADMIN_TOKEN));
    text.lines()
        .find(|l| {
            l.starts_with(&format!(
                "presenced_geo_reloads_total{{result=\"{result}\"}}"
            ))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(-1.0)
}

#[test]
fn sighup_reloads_the_database_and_a_bad_file_keeps_the_one_in_service() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("geo.mmdb");
    write_db(&db, &["203.0.113.0/24=ZZ"]);
    let config = dir.path().join("presenced.toml");
    std::fs::write(
        &config,
        format!(
            "trusted_proxies = [\"127.0.0.2\"]\n[geo]\ndatabase = {:?}\n",
            db.to_str().unwrap()
        ),
    )
    .unwrap();
    let (port, admin_port) = (common::free_port(), common::free_port());
    let served = common::spawn_serve(
        common::serve_cmd(port, admin_port)
            .arg("--config")
            .arg(&config)
            .args(["--jwt-secret", common::SECRET, "--admin-token", ADMIN_TOKEN])
            .stdout(common::log_file("geo-sighup"))
            .stderr(std::process::Stdio::null()),
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let admin = SocketAddr::from(([127, 0, 0, 1], admin_port));
    common::eventually("the server listens", || TcpStream::connect(admin).ok());
    let get = |p: &str| admin_get(admin, p);
    let xff = "X-Forwarded-For: 203.0.113.5\r\n";
    let _a = open(addr, PROXY, &common::token("before"), xff);
    assert_eq!(region_of(get, "before"), "ZZ");

    let hup = || {
        let pid = served.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success());
    };
    // A new file, put in place whole (written beside it, then renamed over it).
    let next = dir.path().join("geo.mmdb.new");
    write_db(&next, &["203.0.113.0/24=QQ"]);
    std::fs::rename(&next, &db).unwrap();
    hup();
    common::eventually("the reload", || (reloads(admin, "ok") == 1.0).then_some(()));
    let _b = open(addr, PROXY, &common::token("after"), xff);
    assert_eq!(region_of(get, "after"), "QQ");
    assert_eq!(
        region_of(get, "before"),
        "ZZ",
        "a session keeps the region it had"
    );

    // A broken file: the reload fails, says so, and the database in service stays.
    std::fs::write(&db, b"not a MaxMind database").unwrap();
    hup();
    common::eventually("the failed reload", || {
        (reloads(admin, "failed") == 1.0).then_some(())
    });
    let _c = open(addr, PROXY, &common::token("still"), xff);
    assert_eq!(region_of(get, "still"), "QQ");
    assert_eq!(reloads(admin, "ok"), 1.0);
}

/// `presenced <cmd>` with `config` and the test secret, to its exit: the status and what it
/// printed.
fn run(cmd: &str, config: &Path, data: &Path) -> (bool, String) {
    let mut c = Command::new(common::PRESENCED);
    c.args([cmd, "--config"]).arg(config);
    c.args(["--jwt-secret", common::SECRET]);
    if cmd == "serve" {
        c.args(["--listen", "127.0.0.1:0", "--no-admin", "--data-dir"])
            .arg(data);
    }
    // A server that starts after all would never exit: stopped after a while, and failed.
    let mut child = c
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("`presenced {cmd}` did not exit: it started with a bad config");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn a_missing_or_corrupt_database_stops_start_up_and_fails_the_config_check() {
    let dir = tempfile::tempdir().unwrap();
    let corrupt = dir.path().join("corrupt.mmdb");
    // The real format's metadata marker with garbage around it: found, then unreadable.
    let mut bytes = vec![7u8; 4096];
    bytes.extend_from_slice(b"\xAB\xCD\xEFMaxMind.com");
    bytes.extend_from_slice(&[0xFF; 64]);
    std::fs::write(&corrupt, bytes).unwrap();
    // A valid database whose search tree is then damaged: its metadata reads fine, and only a
    // check of the whole file finds it.
    let damaged = dir.path().join("damaged.mmdb");
    write_db(&damaged, &["203.0.113.0/24=ZZ", "198.51.100.0/24=YY"]);
    let mut bytes = std::fs::read(&damaged).unwrap();
    for b in &mut bytes[..64] {
        *b = 0xFF;
    }
    std::fs::write(&damaged, bytes).unwrap();
    for (db, says) in [
        (dir.path().join("missing.mmdb"), "missing.mmdb"),
        (corrupt.clone(), "corrupt.mmdb"),
        (damaged.clone(), "damaged"),
    ] {
        let config = dir.path().join("presenced.toml");
        std::fs::write(
            &config,
            format!("[geo]\ndatabase = {:?}\n", db.to_str().unwrap()),
        )
        .unwrap();
        for cmd in ["serve", "check-config"] {
            let (ok, text) = run(cmd, &config, dir.path());
            assert!(!ok, "{cmd} with {says}: {text}");
            assert!(
                text.contains("geo.database") && text.contains(says),
                "{cmd}: {text}"
            );
        }
    }
    // A header the request reads for something else cannot be the geo header.
    let config = dir.path().join("taken.toml");
    std::fs::write(
        &config,
        "trusted_proxies = [\"10.0.0.0/8\"]\n[geo]\nheader = \"X-Forwarded-For\"\n",
    )
    .unwrap();
    let (ok, text) = run("check-config", &config, dir.path());
    assert!(!ok && text.contains("geo.header"), "{text}");
    // geo.header is believed only from trusted proxies: without any, the config is refused.
    let config = dir.path().join("header.toml");
    std::fs::write(&config, "[geo]\nheader = \"CF-IPCountry\"\n").unwrap();
    let (ok, text) = run("check-config", &config, dir.path());
    assert!(
        !ok && text.contains("geo.header") && text.contains("trusted_proxies"),
        "{text}"
    );
    std::fs::write(
        &config,
        "trusted_proxies = [\"10.0.0.0/8\"]\n[geo]\nheader = \"CF IPCountry\"\n",
    )
    .unwrap();
    let (ok, text) = run("check-config", &config, dir.path());
    assert!(!ok && text.contains("geo.header"), "{text}");
}
