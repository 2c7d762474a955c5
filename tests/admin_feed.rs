//! `/ws/admin`, the dashboard's live feed, over a real WebSocket: auth in the first message,
//! pushed stats and changes, and queries answered on the same socket.

mod common;

use std::net::TcpStream;

use common::*;
use serde_json::{json, Value};

fn admin_feed(s: &TestServer) -> tungstenite::WebSocket<TcpStream> {
    let stream = TcpStream::connect(s.admin).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let url = format!("ws://{}/ws/admin", s.admin);
    tungstenite::client::client(url, stream).expect("upgrade").0
}

fn feed_recv(ws: &mut tungstenite::WebSocket<TcpStream>) -> Result<Value, u16> {
    loop {
        match ws.read() {
            Ok(tungstenite::Message::Text(t)) => return Ok(serde_json::from_str(&t).unwrap()),
            Ok(tungstenite::Message::Close(f)) => return Err(f.map_or(1005, |f| f.code.into())),
            Ok(_) => continue,
            Err(e) => panic!("feed read: {e}"),
        }
    }
}

fn feed_send(ws: &mut tungstenite::WebSocket<TcpStream>, v: Value) {
    ws.send(tungstenite::Message::text(v.to_string())).unwrap();
}

#[test]
fn the_admin_feed_authenticates_pushes_stats_and_changes_and_answers_queries() {
    let s = TestServer::with(2, |c| {
        c.admin.push_interval_ms = 200;
        c.admin.request_timeout_ms = 1_000;
    });
    let mut bad = admin_feed(&s);
    feed_send(&mut bad, json!({"op":"auth","token":"junk"}));
    assert_eq!(feed_recv(&mut bad), Err(4001));
    let mut user = admin_feed(&s);
    feed_send(&mut user, json!({"op":"auth","token": s.token("eve")}));
    assert_eq!(feed_recv(&mut user), Err(4003));
    let mut early = admin_feed(&s);
    feed_send(&mut early, json!({"op":"query","id":1,"path":"/api/stats"}));
    assert_eq!(feed_recv(&mut early), Err(4001), "queries need auth first");
    let mut silent = admin_feed(&s);
    assert_eq!(feed_recv(&mut silent), Err(4001), "no auth in time");

    let mut ws = admin_feed(&s);
    feed_send(&mut ws, json!({"op":"auth","token": s.admin_token()}));
    let hello = feed_recv(&mut ws).unwrap();
    assert_eq!(hello["type"], "hello");
    assert_eq!(
        (&hello["admin"], &hello["shards"]),
        (&json!("ops"), &json!(2))
    );
    assert!(hello["series"].is_array());
    assert_eq!(hello["history"]["backend"], "local");
    assert_eq!(hello["history"]["sample_interval_s"], 10);

    let mut zed = s.connect("zed");
    let stats = loop {
        let v = feed_recv(&mut ws).unwrap();
        if v["type"] == "stats" && v["totals"]["online_users"] == 1 {
            break v;
        }
    };
    assert!(stats["per_shard"].is_array() && stats["sample"]["t"].is_u64());
    zed.set_status("busy", Some("deep work"));
    let change = loop {
        let v = feed_recv(&mut ws).unwrap();
        if v["type"] == "changes"
            && v["users"]
                .as_array()
                .unwrap()
                .iter()
                .any(|u| u["user"] == "zed" && u["status"] == "busy")
        {
            break v;
        }
    };
    assert_eq!(change["missed"], 0);
    let row = change["users"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["user"] == "zed")
        .unwrap();
    assert_eq!(
        (&row["text"], &row["devices"]),
        (&json!("deep work"), &json!(1))
    );

    feed_send(
        &mut ws,
        json!({"op":"query","id":"q1","path":"/api/online?status=busy"}),
    );
    let reply = loop {
        let v = feed_recv(&mut ws).unwrap();
        if v["type"] == "reply" {
            break v;
        }
    };
    assert_eq!(
        (&reply["id"], &reply["status"]),
        (&json!("q1"), &json!(200))
    );
    assert_eq!(reply["body"]["users"][0]["user"], "zed");
    feed_send(
        &mut ws,
        json!({"op":"query","id":2,"method":"POST","path":"/api/users/zed/kick"}),
    );
    let reply = loop {
        let v = feed_recv(&mut ws).unwrap();
        if v["type"] == "reply" {
            break v;
        }
    };
    assert_eq!(reply["body"], json!({"user":"zed","kicked":1}));
    assert_eq!(zed.close_code(), 4003);
    feed_send(
        &mut ws,
        json!({"op":"query","id":3,"path":"/api/online?limit=0"}),
    );
    let reply = loop {
        let v = feed_recv(&mut ws).unwrap();
        if v["type"] == "reply" {
            break v;
        }
    };
    assert_eq!(
        (&reply["status"], &reply["body"]["error"]),
        (&json!(400), &json!("bad_request"))
    );
    feed_send(&mut ws, json!({"nonsense": true}));
    assert_eq!(feed_recv(&mut ws).unwrap_err(), 1007);
}
