//! Proves a panic while handling one connection's input closes only that connection (1011) and
//! is counted; the shard keeps serving everyone else, including users on the same shard.
//! The trigger (`activity` with kind `__panic`) exists only under the `fault-injection` feature,
//! which the test command enables and release builds never do.
#![cfg(feature = "fault-injection")]

mod common;

use common::{user_on, TestServer};
use serde_json::json;

#[test]
fn a_panicking_connection_is_closed_and_the_shard_goes_on() {
    let server = TestServer::start(2);
    let victim = user_on(0, 2, "victim");
    let neighbour = user_on(0, 2, "neighbour");
    let mut w = server.connect("panic-watcher");
    w.subscribe(&[&neighbour]);
    let mut n = server.connect(&neighbour);
    assert_eq!(w.presence_of(&neighbour)["status"], "online");
    let mut v = server.connect(&victim);
    assert_eq!(v.shard(), n.shard(), "same shard");

    v.send(json!({"op":"activity","kind":"__panic"}));
    assert_eq!(v.close_code(), 1011);
    assert_eq!(server.handle().metrics_total().conn_panics, 1);

    n.set_status("busy", None);
    assert_eq!(w.presence_of(&neighbour)["status"], "busy");
    let again = server.connect(&victim);
    assert_eq!(again.shard(), n.shard());
}
