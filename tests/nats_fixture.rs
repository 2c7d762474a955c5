//! Proves the NATS fixture (`tests/common/nats.rs`) against the real `nats-server` binary: a
//! server greets a raw TCP client with `INFO`, stops greeting once killed, and greets again
//! after a restart on the same port; and two servers come up routed into one cluster, and find
//! each other again after one of them is killed and restarted.

mod common;

use std::io::ErrorKind;
use std::net::TcpStream;

use common::nats::{read_info, Nats};

#[test]
fn a_server_greets_dies_and_comes_back_on_the_same_port() {
    let mut nats = Nats::start();
    let port = nats.port();
    assert_eq!(nats.url(), format!("nats://127.0.0.1:{port}"));
    let info = read_info(nats.addr()).expect("the server greets a new client");
    assert!(info.contains(&format!("\"port\":{port}")), "{info}");
    assert!(
        !info.contains("\"jetstream\":true"),
        "JetStream is off: {info}"
    );

    nats.kill();
    assert!(!nats.is_running());
    let refused = TcpStream::connect(nats.addr()).expect_err("nobody listens after a kill");
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused);

    nats.restart();
    assert_eq!(nats.port(), port, "same port after a restart");
    let info = read_info(nats.addr()).expect("the restarted server greets");
    assert!(info.contains(&format!("\"port\":{port}")), "{info}");
}

#[test]
fn two_servers_form_a_cluster_and_reroute_after_a_restart() {
    let (mut a, mut b) = Nats::cluster2();
    assert_ne!(a.port(), b.port());
    assert_eq!(a.routes(), Ok(1));
    assert_eq!(b.routes(), Ok(1));
    for n in [&a, &b] {
        let info = read_info(n.addr()).expect("each member greets clients");
        assert!(info.contains("\"cluster\":\"presenced-test\""), "{info}");
    }

    // A killed member leaves its peer without a route; restarted with the same cluster flags,
    // the two route to each other again.
    b.kill();
    let deadline = std::time::Instant::now() + common::WAIT;
    while a.routes() != Ok(0) {
        assert!(
            std::time::Instant::now() < deadline,
            "a never lost its route"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    b.restart();
    a.wait_routes(1);
    b.wait_routes(1);
}
