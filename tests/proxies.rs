//! Client addresses behind proxies (docs/CONFIG.md, "Behind a proxy"), over real sockets from
//! chosen loopback addresses: 127.0.0.2 is the trusted proxy, 127.0.0.3 a stranger. The address
//! a session was given is read back from the admin API.
//!
//! - `X-Forwarded-For` from the trusted proxy names the client; from a stranger it is ignored;
//! - the PROXY protocol, v1 and v2 (bytes written here from the specification), before plain
//!   HTTP and before TLS; from a stranger its address is ignored;
//! - a missing or malformed PROXY header closes the connection unanswered, is counted, and
//!   leaves everyone else served;
//! - the per-IP handshake limit counts each client behind the proxy, not the proxy.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpStream};
use std::sync::Arc;

use common::{raw_request_from, tcp_from, upgrade_request_with, TestServer, WAIT};
use presenced::config::Config;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use tungstenite::client::IntoClientRequest;

const PROXY: u8 = 2;
const STRANGER: u8 = 3;

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

fn behind_proxy(
    shards: usize,
    proxy_protocol: bool,
    tweak: impl FnOnce(&mut Config),
) -> TestServer {
    TestServer::with(shards, |c| {
        c.trusted_proxies = vec!["127.0.0.2".into(), "10.0.0.0/8".into()];
        c.proxy_protocol = proxy_protocol;
        tweak(c);
    })
}

/// Opens `user`'s session from loopback address `from`, writing `preamble` (a PROXY header)
/// first; returns the socket (kept open) once upgraded.
fn open(server: &TestServer, from: u8, preamble: &[u8], user: &str, extra: &str) -> TcpStream {
    let mut s = tcp_from(ip(from), server.addr, None);
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut bytes = preamble.to_vec();
    bytes.extend_from_slice(upgrade_request_with(&server.token(user), extra).as_bytes());
    s.write_all(&bytes).unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).unwrap(), 1, "the server answered: {head:?}");
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{user}: {head}");
    s
}

/// The address the admin API shows for `user`'s only session.
fn session_ip(server: &TestServer, user: &str) -> String {
    common::eventually(&format!("{user}'s session"), || {
        let u = server.admin_get(&format!("/api/users/{user}"));
        let s = u["sessions"].as_array()?.first()?.clone();
        Some(s["ip"].as_str()?.to_owned())
    })
}

/// A PROXY v2 header for a TCP/IPv4 connection from `src`, with a NOOP TLV (PROXY protocol
/// spec §2.2: signature, version 2 + PROXY, TCP over IPv4, length, addresses, ports, TLVs).
fn v2_header(src: Ipv4Addr, src_port: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x21);
    h.push(0x11);
    let mut body = Vec::new();
    body.extend_from_slice(&src.octets());
    body.extend_from_slice(&[127, 0, 0, 1]);
    body.extend_from_slice(&src_port.to_be_bytes());
    body.extend_from_slice(&443u16.to_be_bytes());
    body.extend_from_slice(&[0x04, 0x00, 0x02, 0xAB, 0xCD]); // PP2_TYPE_NOOP, 2 bytes
    h.extend_from_slice(&(body.len() as u16).to_be_bytes());
    h.extend_from_slice(&body);
    h
}

#[test]
fn forwarded_for_names_the_client_only_from_a_trusted_proxy() {
    let server = behind_proxy(2, false, |_| {});
    // Through the proxy: the client wrote a fake hop, the proxy appended what it saw.
    let _a = open(
        &server,
        PROXY,
        b"",
        "via-proxy",
        "X-Forwarded-For: 6.6.6.6, 203.0.113.9\r\n",
    );
    assert_eq!(session_ip(&server, "via-proxy"), "203.0.113.9");
    // Two proxies in a row (the second one trusted too), on two header lines.
    let _b = open(
        &server,
        PROXY,
        b"",
        "two-hops",
        "X-Forwarded-For: 198.51.100.7\r\nX-Forwarded-For: 10.1.1.1\r\n",
    );
    assert_eq!(session_ip(&server, "two-hops"), "198.51.100.7");
    // A stranger says it is someone else: ignored and counted.
    let _c = open(
        &server,
        STRANGER,
        b"",
        "spoofer",
        "X-Forwarded-For: 203.0.113.9\r\n",
    );
    assert_eq!(session_ip(&server, "spoofer"), "127.0.0.3");
    // The trusted proxy's own connection without the header is itself.
    let _d = open(&server, PROXY, b"", "proxy-itself", "");
    assert_eq!(session_ip(&server, "proxy-itself"), "127.0.0.2");
    let m = server.handle().metrics_total();
    assert_eq!(m.client_addr_forwarded_for, 2);
    assert_eq!(m.proxy_headers_ignored, 1);
}

#[test]
fn proxy_protocol_v1_and_v2_name_the_client() {
    let server = behind_proxy(2, true, |_| {});
    let _v1 = open(
        &server,
        PROXY,
        b"PROXY TCP4 203.0.113.9 127.0.0.1 40000 443\r\n",
        "v1-user",
        "",
    );
    assert_eq!(session_ip(&server, "v1-user"), "203.0.113.9");
    let _v1_6 = open(
        &server,
        PROXY,
        b"PROXY TCP6 2001:db8::9 ::1 40000 443\r\n",
        "v1-six",
        "",
    );
    assert_eq!(session_ip(&server, "v1-six"), "2001:db8::9");
    let _v2 = open(
        &server,
        PROXY,
        &v2_header(Ipv4Addr::new(198, 51, 100, 20), 40001),
        "v2-user",
        "",
    );
    assert_eq!(session_ip(&server, "v2-user"), "198.51.100.20");
    // The proxy's health check (v1 UNKNOWN): the proxy itself.
    let _local = open(&server, PROXY, b"PROXY UNKNOWN\r\n", "health", "");
    assert_eq!(session_ip(&server, "health"), "127.0.0.2");
    // From a stranger the header is read (the stream starts after it) but not believed.
    let _s = open(
        &server,
        STRANGER,
        b"PROXY TCP4 203.0.113.9 127.0.0.1 40000 443\r\n",
        "stranger",
        "",
    );
    assert_eq!(session_ip(&server, "stranger"), "127.0.0.3");
    let m = server.handle().metrics_total();
    assert_eq!(m.client_addr_proxy_protocol, 3);
    assert_eq!(m.proxy_headers_ignored, 1);
}

/// True once the server has closed `s` without writing anything.
fn closed_unanswered(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}

#[test]
fn a_bad_proxy_header_closes_the_connection_and_nothing_else() {
    let server = behind_proxy(2, true, |_| {});
    let mut watcher = common::Client::connect_over(
        {
            let mut s = tcp_from(ip(PROXY), server.addr, None);
            s.write_all(b"PROXY TCP4 203.0.113.1 127.0.0.1 1 2\r\n")
                .unwrap();
            s
        },
        &server.token("watcher"),
    );
    watcher.subscribe(&["target"]);
    // No header at all: a client that went around the proxy.
    let bare = upgrade_request_with("x", "");
    let bad: [&[u8]; 4] = [
        bare.as_bytes(),
        b"PROXY TCP4 999.1.1.1 127.0.0.1 1 2\r\n",
        b"PROXY SCTP 1.2.3.4 127.0.0.1 1 2\r\n",
        // v2 signature, then version 1 in the version nibble.
        b"\r\n\r\n\0\r\nQUIT\n\x11\x11\x00\x0c",
    ];
    for (i, bytes) in bad.iter().enumerate() {
        for from in [PROXY, STRANGER] {
            let mut s = tcp_from(ip(from), server.addr, None);
            s.set_read_timeout(Some(WAIT)).unwrap();
            s.write_all(bytes).unwrap();
            assert!(closed_unanswered(&mut s), "case {i} from 127.0.0.{from}");
        }
    }
    // A v1 line that never ends is cut at the protocol's 107 bytes.
    let mut s = tcp_from(ip(PROXY), server.addr, None);
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(&[b"PROXY TCP4 ".as_slice(), &[b'1'; 200]].concat())
        .unwrap();
    assert!(closed_unanswered(&mut s), "an endless v1 line");
    assert_eq!(
        server.handle().metrics_total().handshakes_bad_proxy_header,
        2 * bad.len() as u64 + 1
    );
    // Everyone else is served as before.
    let mut target = common::Client::connect_over(
        {
            let mut s = tcp_from(ip(PROXY), server.addr, None);
            s.write_all(b"PROXY TCP4 203.0.113.2 127.0.0.1 1 2\r\n")
                .unwrap();
            s
        },
        &server.token("target"),
    );
    target.set_status("busy", None);
    watcher.recv_until("target busy", |v| {
        v["user"] == "target" && v["status"] == "busy"
    });
}

#[test]
fn behind_a_proxy_header_the_request_headers_are_the_clients_own() {
    let server = behind_proxy(2, true, |_| {});
    // An L4 proxy names the client and passes its stream through: the client's own
    // X-Forwarded-For is not believed.
    let _l4 = open(
        &server,
        PROXY,
        b"PROXY TCP4 203.0.113.9 127.0.0.1 40000 443\r\n",
        "l4-client",
        "X-Forwarded-For: 6.6.6.6\r\n",
    );
    assert_eq!(session_ip(&server, "l4-client"), "203.0.113.9");
    // A header that names nobody (v1 UNKNOWN): whoever is behind it gets no say either.
    let _unknown = open(
        &server,
        PROXY,
        b"PROXY UNKNOWN\r\n",
        "unnamed",
        "X-Forwarded-For: 6.6.6.6\r\n",
    );
    assert_eq!(session_ip(&server, "unnamed"), "127.0.0.2");
    // A chain: the PROXY header names another trusted proxy (an L7 one), whose
    // X-Forwarded-For is believed.
    let _chain = open(
        &server,
        PROXY,
        b"PROXY TCP4 10.1.1.1 127.0.0.1 40000 443\r\n",
        "chained",
        "X-Forwarded-For: 6.6.6.6, 198.51.100.44\r\n",
    );
    assert_eq!(session_ip(&server, "chained"), "198.51.100.44");
    assert_eq!(server.handle().metrics_total().proxy_headers_ignored, 2);
}

#[test]
fn a_client_named_by_a_proxy_header_is_limited_before_tls_or_the_request() {
    let server = behind_proxy(2, true, |c| c.limits.handshake_rate_per_ip = 5);
    let token = server.token("flood");
    let status = |client: &str| {
        let mut s = tcp_from(ip(PROXY), server.addr, None);
        s.write_all(format!("PROXY TCP4 {client} 127.0.0.1 40000 443\r\n").as_bytes())
            .unwrap();
        raw_request_from(s, &upgrade_request_with(&token, "")).0
    };
    let flood: Vec<u16> = (0..30).map(|_| status("198.51.100.1")).collect();
    assert!(flood.contains(&429), "{flood:?}");
    assert!(flood.iter().all(|s| *s == 101 || *s == 429), "{flood:?}");
    assert_eq!(
        status("198.51.100.2"),
        101,
        "its neighbour has its own budget"
    );
}

#[test]
fn the_per_ip_limit_counts_clients_behind_the_proxy() {
    let server = behind_proxy(2, false, |c| c.limits.handshake_rate_per_ip = 5);
    let token = server.token("many");
    let status = |from: u8, xff: &str| {
        raw_request_from(
            tcp_from(ip(from), server.addr, None),
            &upgrade_request_with(&token, &format!("X-Forwarded-For: {xff}\r\n")),
        )
        .0
    };
    // Forty clients through one proxy: each has its own budget, the proxy none of its own.
    for i in 0..40 {
        assert_eq!(status(PROXY, &format!("203.0.113.{i}")), 101, "client {i}");
    }
    // One client behind the proxy flooding: refused, while its neighbour is not.
    let flood: Vec<u16> = (0..30).map(|_| status(PROXY, "198.51.100.1")).collect();
    assert!(flood.contains(&429), "{flood:?}");
    assert_eq!(status(PROXY, "198.51.100.2"), 101);
    // A stranger's header does not buy it a fresh budget.
    let spoofed: Vec<u16> = (0..30)
        .map(|i| status(STRANGER, &format!("192.0.2.{i}")))
        .collect();
    assert!(spoofed.contains(&429), "{spoofed:?}");
}

#[test]
fn proxy_protocol_comes_before_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(dir.path().join("cert.pem"), ck.cert.pem()).unwrap();
    std::fs::write(dir.path().join("key.pem"), ck.signing_key.serialize_pem()).unwrap();
    let server = behind_proxy(2, true, |c| {
        c.tls.cert = Some(dir.path().join("cert.pem"));
        c.tls.key = Some(dir.path().join("key.pem"));
    });
    let mut roots = RootCertStore::empty();
    roots.add(ck.cert.der().clone()).unwrap();
    let config = Arc::new(
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let mut tcp = tcp_from(ip(PROXY), server.addr, None);
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    tcp.write_all(&v2_header(Ipv4Addr::new(203, 0, 113, 77), 5000))
        .unwrap();
    let tls = StreamOwned::new(
        ClientConnection::new(config, ServerName::try_from("localhost").unwrap()).unwrap(),
        tcp,
    );
    let mut req = format!("wss://localhost:{}/ws", server.addr.port())
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "Authorization",
        format!("Bearer {}", server.token("tls-user"))
            .parse()
            .unwrap(),
    );
    let (_ws, _) = tungstenite::client::client(req, tls).expect("TLS upgrade after PROXY v2");
    assert_eq!(session_ip(&server, "tls-user"), "203.0.113.77");
}

#[test]
fn a_bad_trusted_proxies_entry_fails_the_config_check() {
    let mut c = Config {
        trusted_proxies: vec!["10.0.0.0/8".into(), "lb.internal".into()],
        ..Config::default()
    };
    let err = c.validate().unwrap_err().to_string();
    assert!(
        err.contains("trusted_proxies") && err.contains("lb.internal"),
        "{err}"
    );
    c.trusted_proxies = vec!["10.0.0.0/8".into(), "192.0.2.1".into(), "fd00::/8".into()];
    c.validate().expect("blocks and single addresses");
    c.trusted_proxies = vec!["0.0.0.0/0".into()];
    let err = c.validate().unwrap_err().to_string();
    assert!(err.contains("every address"), "{err}");
    let c = Config {
        proxy_protocol: true,
        ..Config::default()
    };
    let err = c.validate().unwrap_err().to_string();
    assert!(
        err.contains("proxy_protocol") && err.contains("trusted_proxies"),
        "{err}"
    );
}

#[test]
fn a_bad_proxy_header_is_logged_with_the_peer_and_why() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("presenced.toml");
    std::fs::write(
        &config,
        "trusted_proxies = [\"127.0.0.2\"]\nproxy_protocol = true\n",
    )
    .unwrap();
    let log = dir.path().join("out.log");
    let port = common::free_port();
    let _served = common::spawn_serve(
        common::serve_cmd(port, 0)
            .arg("--config")
            .arg(&config)
            .args(["--jwt-secret", common::SECRET])
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::process::Stdio::null()),
    );
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    common::eventually("the server listens", || TcpStream::connect(addr).ok());
    for from in [PROXY, STRANGER] {
        let mut s = tcp_from(ip(from), addr, None);
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.write_all(b"GET /ws HTTP/1.1\r\n\r\n").unwrap();
        assert!(closed_unanswered(&mut s), "from 127.0.0.{from}");
    }
    let text = common::eventually("both lines logged", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        (text.matches("bad PROXY protocol header").count() >= 2).then_some(text)
    });
    let line = |needle: &str| {
        text.lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle}: {text}"))
            .to_owned()
    };
    let trusted = line("from a trusted proxy");
    assert!(
        trusted.contains("WARN") && trusted.contains("127.0.0.2"),
        "{trusted}"
    );
    assert!(
        trusted.contains("no valid PROXY protocol header"),
        "{trusted}"
    );
    let stranger = line("127.0.0.3");
    assert!(stranger.contains("bad PROXY protocol header"), "{stranger}");
}
