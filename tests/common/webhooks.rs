//! A webhook receiver on a loopback port for the tests (docs/WEBHOOKS.md): it records every
//! request and answers 200, 500, or hangs past the timeout; `down()` closes its socket
//! (connection refused) and `up()` listens on the same port again.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU8, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use presenced::config::WebhookConfig;
use serde_json::Value;

pub const SECRET: &str = "webhook-secret-0123456789";

/// How the receiver answers.
pub const OK: u8 = 0;
pub const FAIL: u8 = 1;
pub const HANG: u8 = 2;

/// One request the receiver got.
#[derive(Clone, Debug)]
pub struct Got {
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
    /// What the receiver answered (OK, FAIL or HANG).
    pub answered: u8,
}

/// A webhook receiver on a loopback port: records every request, answers as `mode` says.
/// `down()` closes its socket (connection refused), `up()` listens on the same port again.
pub struct Receiver {
    pub addr: SocketAddr,
    mode: Arc<AtomicU8>,
    got: Arc<Mutex<Vec<Got>>>,
    stop: Arc<Mutex<Option<std::sync::mpsc::Sender<()>>>>,
}

impl Receiver {
    pub fn start() -> Receiver {
        // Below the ephemeral range: while the receiver is down, no outgoing connection takes
        // its port, so `up()` can listen there again.
        let listener = TcpListener::bind(("127.0.0.1", super::free_port())).unwrap();
        let r = Receiver {
            addr: listener.local_addr().unwrap(),
            mode: Arc::new(AtomicU8::new(OK)),
            got: Arc::default(),
            stop: Arc::default(),
        };
        r.serve(listener);
        r
    }

    fn serve(&self, listener: TcpListener) {
        listener.set_nonblocking(true).unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        *self.stop.lock().unwrap() = Some(tx);
        let (mode, got) = (self.mode.clone(), self.got.clone());
        std::thread::spawn(move || loop {
            if rx.try_recv().is_ok() {
                return; // the listener closes here
            }
            match listener.accept() {
                Ok((s, _)) => {
                    let (mode, got) = (mode.clone(), got.clone());
                    std::thread::spawn(move || handle(s, &mode, &got));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        });
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    pub fn set(&self, mode: u8) {
        self.mode.store(mode, SeqCst);
    }

    pub fn down(&self) {
        if let Some(tx) = self.stop.lock().unwrap().take() {
            let _ = tx.send(());
        }
        // The accept loop notices within a few ms; then connecting is refused.
        super::eventually("the receiver refuses", || {
            TcpStream::connect(self.addr).err().map(|_| ())
        });
    }

    pub fn up(&self) {
        let listener = TcpListener::bind(self.addr).expect("the receiver's port again");
        self.serve(listener);
    }

    pub fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }
}

fn handle(s: TcpStream, mode: &AtomicU8, got: &Mutex<Vec<Got>>) {
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut headers = HashMap::new();
    let mut line = String::new();
    if r.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    loop {
        line.clear();
        if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.trim_end().split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    let n: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; n];
    if r.read_exact(&mut body).is_err() {
        return;
    }
    let answered = mode.load(SeqCst);
    got.lock().unwrap().push(Got {
        headers,
        body,
        answered,
    });
    let mut s = s;
    match answered {
        OK => {
            let _ =
                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
        FAIL => {
            let _ = s.write_all(
                b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
        }
        // Past every timeout the tests set (the connection is then dropped unanswered).
        _ => std::thread::sleep(Duration::from_secs(10)),
    }
}

pub fn hook(url: String, tweak: impl FnOnce(&mut WebhookConfig)) -> WebhookConfig {
    let mut w = WebhookConfig {
        url,
        secret: Some(SECRET.into()),
        batch_ms: 20,
        timeout_ms: 400,
        ..WebhookConfig::default()
    };
    tweak(&mut w);
    w
}

/// Every event the receiver acknowledged or not, deduplicated by id, in first-arrival order.
pub fn events(got: &[Got]) -> Vec<Value> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for g in got {
        let v: Value = serde_json::from_slice(&g.body).unwrap();
        for e in v["events"].as_array().unwrap() {
            if seen.insert(e["id"].as_str().unwrap().to_owned()) {
                out.push(e.clone());
            }
        }
    }
    out
}
