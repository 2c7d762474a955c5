//! Proves TLS on the WebSocket listener with certificates made at test time (rcgen) and a real
//! rustls client: TLS 1.3 and 1.2 handshakes, presence events over TLS (including sessions handed
//! off between shards with their TLS state), plain and TLS listeners side by side, handshake
//! refusals readable over TLS, and clear startup errors for a missing or mismatched key.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;

use common::{TestServer, WAIT};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use serde_json::{json, Value};
use tungstenite::client::IntoClientRequest;
use tungstenite::{Message, WebSocket};

struct Certs {
    dir: PathBuf,
    cert_der: CertificateDer<'static>,
}

impl Certs {
    fn new(tag: &str) -> Certs {
        let dir = std::env::temp_dir().join(format!("presenced-tls-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
            .unwrap();
        std::fs::write(dir.join("cert.pem"), ck.cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), ck.signing_key.serialize_pem()).unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        std::fs::write(dir.join("other_key.pem"), other.serialize_pem()).unwrap();
        Certs {
            cert_der: ck.cert.der().clone(),
            dir,
        }
    }

    fn path(&self, f: &str) -> PathBuf {
        self.dir.join(f)
    }

    fn client_config(
        &self,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.cert_der.clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Arc::new(
            ClientConfig::builder_with_provider(provider)
                .with_protocol_versions(versions)
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

type TlsWs = WebSocket<StreamOwned<ClientConnection, TcpStream>>;

fn tls_stream(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> StreamOwned<ClientConnection, TcpStream> {
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    StreamOwned::new(ClientConnection::new(config, name).unwrap(), tcp)
}

fn connect_tls(addr: SocketAddr, config: Arc<ClientConfig>, token: &str) -> (TlsWs, Value) {
    let mut req = format!("wss://localhost:{}/ws", addr.port())
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("Authorization", format!("Bearer {token}").parse().unwrap());
    let (mut ws, _) =
        tungstenite::client::client(req, tls_stream(addr, config)).expect("TLS upgrade");
    let welcome = recv(&mut ws);
    assert_eq!(welcome["type"], "welcome");
    (ws, welcome)
}

fn recv(ws: &mut TlsWs) -> Value {
    loop {
        match ws.read().expect("a frame over TLS") {
            Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn tls_server(certs: &Certs, shards: usize, side_by_side: bool) -> TestServer {
    TestServer::with(shards, |c| {
        c.tls.cert = Some(certs.path("cert.pem"));
        c.tls.key = Some(certs.path("key.pem"));
        if side_by_side {
            c.tls.listen = Some("127.0.0.1:0".parse().unwrap());
        }
    })
}

#[test]
fn presence_over_tls_side_by_side_with_plain_and_across_shards() {
    let certs = Certs::new("side");
    let server = tls_server(&certs, 2, true);
    let tls_addr = server.handle().tls_addr.expect("a TLS listener");
    assert_ne!(tls_addr, server.addr);
    let config = certs.client_config(&[&rustls::version::TLS13]);

    // A plain client watches TLS users; a TLS client watches a plain user.
    let mut plain = server.connect("plain-user");
    let (mut secure, welcome) = connect_tls(tls_addr, config.clone(), &server.token("tls-user"));
    assert_eq!(welcome["user"], "tls-user");
    secure
        .send(Message::text(
            json!({"op":"subscribe","users":["plain-user"],"id":1}).to_string(),
        ))
        .unwrap();
    let mut snapshot = recv(&mut secure);
    while snapshot["type"] != "presence" {
        snapshot = recv(&mut secure);
    }
    assert_eq!(snapshot["status"], "online");
    plain.set_status("busy", Some("over tls"));
    let mut ev = recv(&mut secure);
    while ev["type"] != "presence" || ev["text"] != "over tls" {
        ev = recv(&mut secure);
    }

    // Users hashed to both shards over TLS, until some were handed off with their TLS session
    // (the kernel picks the accepting shard: 1 in 2 per connection), bounded.
    let mut held = Vec::new();
    for i in 0..64 {
        if i >= 6 && server.handle().metrics_total().handoffs_in > 0 {
            break;
        }
        let user = format!("tls-{i}");
        plain.subscribe(&[&user]);
        let (ws, _) = connect_tls(tls_addr, config.clone(), &server.token(&user));
        held.push(ws);
        assert_eq!(plain.presence_of(&user)["status"], "online");
    }
    for (i, ws) in held.iter_mut().enumerate() {
        let op = json!({"op":"set_status","status":"away","text":format!("tls {i}")});
        ws.send(Message::text(op.to_string())).unwrap();
        let ev = plain.presence_of(&format!("tls-{i}"));
        assert_eq!(ev["text"], format!("tls {i}"));
    }
    let m = server.handle().metrics_total();
    assert!(
        m.handoffs_in > 0,
        "some TLS sessions were handed off: {m:?}"
    );
}

#[test]
fn tls12_and_refusals_over_tls() {
    let certs = Certs::new("tls12");
    let server = tls_server(&certs, 2, false);
    assert_eq!(
        server.handle().tls_addr,
        Some(server.addr),
        "listen itself speaks TLS"
    );
    let tls12 = certs.client_config(&[&rustls::version::TLS12]);
    let (mut ws, _) = connect_tls(server.addr, tls12.clone(), &server.token("old-client"));
    ws.send(Message::text(r#"{"op":"ping","id":"p"}"#)).unwrap();
    let mut pong = recv(&mut ws);
    while pong["type"] != "pong" {
        pong = recv(&mut ws);
    }
    assert_eq!(pong["id"], "p");

    // A bad token gets a readable 401 over TLS.
    use std::io::{Read, Write};
    let mut s = tls_stream(server.addr, tls12);
    write!(
        s,
        "GET /ws?token=nope HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    .unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 401"), "{text}");

    // A plain-text client on a TLS port gets no upgrade.
    let (status, _) = common::raw_request(server.addr, "GET /ws HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_ne!(status, 101);
}

#[test]
fn startup_errors_name_the_bad_key() {
    let certs = Certs::new("errors");
    let start = |cert: PathBuf, key: PathBuf| {
        let mut cfg = presenced::Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            shards: 1,
            placement: presenced::config::Placement::Unbound,
            jwt_secret: Some(common::SECRET.into()),
            admin: common::admin_on_any_port(),
            history: presenced::config::HistoryConfig {
                backend: presenced::config::HistoryBackend::Off,
                ..Default::default()
            },
            ..presenced::Config::default()
        };
        cfg.tls.cert = Some(cert);
        cfg.tls.key = Some(key);
        let verifier =
            presenced::auth::Verifier::new(cfg.jwt_secret.as_deref(), &cfg.auth).unwrap();
        match presenced::start(cfg.validate().unwrap(), verifier) {
            Err(e) => e.to_string(),
            Ok(h) => {
                h.shutdown();
                panic!("started with a bad TLS config");
            }
        }
    };
    let missing = start(certs.path("cert.pem"), certs.path("absent.pem"));
    assert!(
        missing.starts_with("tls.key:") && missing.contains("absent.pem"),
        "{missing}"
    );
    let mismatched = start(certs.path("cert.pem"), certs.path("other_key.pem"));
    assert!(
        mismatched.starts_with("tls.key:") && mismatched.contains("does not fit"),
        "{mismatched}"
    );
    let no_cert = start(certs.path("key.pem"), certs.path("key.pem"));
    assert!(no_cert.starts_with("tls.cert:"), "{no_cert}");
}

#[test]
fn the_admin_port_speaks_tls_when_asked() {
    use std::io::{Read, Write};
    let certs = Certs::new("admin");
    let server = TestServer::with(2, |c| {
        c.tls.cert = Some(certs.path("cert.pem"));
        c.tls.key = Some(certs.path("key.pem"));
        c.tls.listen = Some("127.0.0.1:0".parse().unwrap());
        c.admin.tls = true;
    });
    let config = certs.client_config(&[&rustls::version::TLS13, &rustls::version::TLS12]);
    let get = |path: &str, token: Option<&str>| {
        let mut s = tls_stream(server.admin, config.clone());
        let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    assert!(get("/healthz", None).starts_with("HTTP/1.1 200 OK"));
    let stats = get("/api/stats", Some(&server.admin_token()));
    assert!(
        stats.starts_with("HTTP/1.1 200 OK") && stats.contains("\"shards\":2"),
        "{stats}"
    );
    assert!(get("/api/stats", None).starts_with("HTTP/1.1 401"));
    // Plain HTTP to a TLS admin port gets nothing useful, and the server carries on.
    let (code, _) = common::raw_request(server.admin, "GET /healthz HTTP/1.1\r\n\r\n");
    assert_eq!(code, 0, "no plaintext answer");
    assert!(get("/healthz", None).starts_with("HTTP/1.1 200 OK"));
}

/// A TLS listener refuses at accept by closing the socket: a plaintext `HTTP/1.1 503` is
/// garbage to a TLS client (it used to be written all the same).
#[test]
fn refusals_at_accept_on_a_tls_listener_are_closed_unanswered() {
    let certs = Certs::new("refuse");
    let server = TestServer::with(1, |c| {
        c.tls.cert = Some(certs.path("cert.pem"));
        c.tls.key = Some(certs.path("key.pem"));
        c.tls.listen = Some("127.0.0.1:0".parse().unwrap());
        c.limits.max_handshakes_in_flight = 1;
        c.limits.handshake_wait_ms = 0;
    });
    let tls_addr = server.handle().tls_addr.expect("a TLS listener");
    let _holds_the_slot = TcpStream::connect(tls_addr).unwrap();
    let (code, body) = common::eventually("a socket refused for want of a slot", || {
        let got = common::raw_request(tls_addr, "GET /ws HTTP/1.1\r\n\r\n");
        (server.handle().metrics_total().handshakes_unavailable > 0).then_some(got)
    });
    assert_eq!((code, body.as_str()), (0, ""), "no plaintext answer");
}

/// The admin port over TLS: a new connection is idle until its first request, so the pool may
/// evict it mid-handshake, and then it is closed at once, not after `admin.header_timeout_ms`
/// (it used to keep its socket that long, outside the pool's count). A connection refused at
/// accept is closed unanswered (a plaintext 429 used to be written into the TLS stream).
#[test]
fn the_tls_admin_port_closes_what_it_evicts_or_refuses() {
    use std::io::{Read, Write};
    let certs = Certs::new("admin-evict");
    let server = TestServer::with(1, |c| {
        c.tls.cert = Some(certs.path("cert.pem"));
        c.tls.key = Some(certs.path("key.pem"));
        c.tls.listen = Some("127.0.0.1:0".parse().unwrap());
        c.admin.tls = true;
        c.admin.max_connections = 2;
        c.admin.header_timeout_ms = 60_000;
    });
    let mut silent: Vec<TcpStream> = (0..6)
        .map(|_| TcpStream::connect(server.admin).unwrap())
        .collect();
    let config = certs.client_config(&[&rustls::version::TLS13]);
    let mut probe = tls_stream(server.admin, config);
    write!(
        probe,
        "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    let _ = probe.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    let closed = silent.iter_mut().map(closed_by_peer).filter(|c| *c).count();
    assert!(closed >= 4, "the evicted sockets are closed: {closed} of 6");

    let server = TestServer::with(1, |c| {
        c.tls.cert = Some(certs.path("cert.pem"));
        c.tls.key = Some(certs.path("key.pem"));
        c.tls.listen = Some("127.0.0.1:0".parse().unwrap());
        c.admin.tls = true;
        c.admin.max_connections_per_ip = 1;
    });
    let _held = TcpStream::connect(server.admin).unwrap();
    let (code, body) = common::eventually("a connection past the per-IP cap refused", || {
        let got = common::raw_request(server.admin, "GET /healthz HTTP/1.1\r\n\r\n");
        (server.handle().metrics_total().admin_refused > 0).then_some(got)
    });
    assert_eq!((code, body.as_str()), (0, ""), "no plaintext answer");
}

/// Whether the server has closed `s` (within 5 s).
fn closed_by_peer(s: &mut TcpStream) -> bool {
    use std::io::Read;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    match s.read(&mut [0u8; 1]) {
        Ok(0) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}
