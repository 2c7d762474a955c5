//! A CQL "cluster" inside the test process: kassandra's in-memory engine (CQL v4) served by a
//! small tokio accept loop, with ScyllaDB's fault-injection proxy (`scylla-proxy`) in front.
//!
//! Drivers under test connect to [`Cluster::proxy`], so tests can inject overloaded errors,
//! delays and dropped connections ([`Cluster::set_faults`]); checks read the engine's data
//! directly ([`Cluster::rows`]) and see every write request the server received
//! ([`Cluster::writes`]), so a test can prove what arrived, how often, and in which batches.
//!
//! kassandra is faithful for plain writes and whole-partition reads only: it ignores TTL,
//! clustering order, range restrictions and LIMIT (docs/HISTORY.md says what that leaves out).
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use kassandra::error::DbError;
use kassandra::frame::request::batch::BatchStatement;
use kassandra::frame::request::{Request, RequestOpcode as CqlOpcode};
use kassandra::frame::response::error::Error;
use kassandra::frame::response::result::QueryResult;
use kassandra::frame::response::Response;
use kassandra::frame::value::FrameValue;
use kassandra::frame::{request_stream, response_sink};
use kassandra::snapshot::ValueSnapshot;
use kassandra::KassandraSession;
use scylla_proxy::{
    Condition, Node, Proxy, Reaction, RequestOpcode, RequestReaction, RequestRule, RunningProxy,
    ShardAwareness,
};

/// How long [`Cluster::start`] waits for the proxy to come up.
const START_WAIT: Duration = Duration::from_secs(10);

/// One bound statement the server executed: which table (`keyspace.table`) and its values in
/// bind-marker order (`None`: null or unset).
#[derive(Clone, Debug)]
pub struct Statement {
    pub target: String,
    pub values: Vec<Option<Vec<u8>>>,
}

/// A write request as the server received it.
#[derive(Clone, Debug)]
pub enum Write {
    Execute(Statement),
    Batch(Vec<Statement>),
}

/// What the accept loop shares with the test.
#[derive(Default)]
struct Shared {
    /// Every QUERY's CQL, as the client sent it.
    queries: Vec<String>,
    /// Prepared statement id → `keyspace.table`.
    prepared: HashMap<Vec<u8>, String>,
    /// Every EXECUTE (of a prepared INSERT) and BATCH, in arrival order.
    writes: Vec<Write>,
}

pub struct Cluster {
    /// kassandra itself (no faults).
    pub direct: SocketAddr,
    /// The proxy in front of it: point drivers under test here.
    pub proxy: SocketAddr,
    engine: Arc<Mutex<KassandraSession>>,
    shared: Arc<Mutex<Shared>>,
    running: Arc<Mutex<Option<RunningProxy>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// Faults the proxy injects. The first three hit the driver's writes (EXECUTE and BATCH) only,
/// never its control connection, so the driver keeps its view of the cluster; the last two hit
/// everything.
#[derive(Clone, Copy, Debug)]
pub enum Fault {
    /// Answered with `Overloaded` instead of reaching the server.
    Overloaded(When),
    /// Held this long before they reach the server: longer than the driver's request timeout,
    /// the driver gives up while the server still applies them later.
    Delay(Duration, When),
    /// The connection is dropped (with everything in flight on it).
    DropConnection(When),
    /// Every request on every connection, control connection included, drops the connection:
    /// the cluster is dead.
    Dead,
    /// Every request on every connection is swallowed: the cluster accepts connections and
    /// never answers, so every request (and every connect) runs into its timeout.
    Unresponsive,
}

/// Which writes a [`Fault`] hits.
#[derive(Clone, Copy, Debug)]
pub enum When {
    /// Each, with this probability.
    Randomly(f64),
    /// The first this many that reach the rule.
    First(usize),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // kassandra panics on some inputs; a panicked connection task must not wedge the test.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Cluster {
    /// Starts kassandra and the proxy on ephemeral loopback ports, on a thread of their own.
    pub fn start() -> Cluster {
        let engine = Arc::new(Mutex::new(KassandraSession::new()));
        let shared = Arc::new(Mutex::new(Shared::default()));
        let running = Arc::new(Mutex::new(None));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let (engine, shared, running) = (engine.clone(), shared.clone(), running.clone());
            std::thread::Builder::new()
                .name("kassandra".into())
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("a runtime for kassandra");
                    let local = tokio::task::LocalSet::new();
                    local.block_on(&rt, async move {
                        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                            .await
                            .expect("kassandra binds");
                        let direct = listener.local_addr().unwrap();
                        let proxy_addr = free_port();
                        let node = Node::builder()
                            .real_address(direct)
                            .proxy_address(proxy_addr)
                            .shard_awareness(ShardAwareness::Unaware)
                            .build();
                        tokio::task::spawn_local(serve(listener, engine, shared));
                        let proxy = Proxy::builder()
                            .with_node(node)
                            .build()
                            .run()
                            .await
                            .expect("the proxy starts");
                        *lock(&running) = Some(proxy);
                        ready_tx.send((direct, proxy_addr)).unwrap();
                        let _ = stop_rx.await;
                        lock(&running).take();
                    });
                })
                .expect("the kassandra thread starts")
        };
        let (direct, proxy) = ready_rx
            .recv_timeout(START_WAIT)
            .expect("kassandra and the proxy start");
        Cluster {
            direct,
            proxy,
            engine,
            shared,
            running,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// Replaces the proxy's faults (an empty slice: pass everything through). A write meets the
    /// first fault that applies to it.
    pub fn set_faults(&self, faults: &[Fault]) {
        let writes = |when: When| {
            // Evaluated left to right: `when` only counts and draws for writes.
            Condition::not(Condition::ConnectionRegisteredAnyEvent)
                .and(
                    Condition::RequestOpcode(RequestOpcode::Execute)
                        .or(Condition::RequestOpcode(RequestOpcode::Batch)),
                )
                .and(match when {
                    When::Randomly(p) => Condition::RandomWithProbability(p),
                    When::First(n) => Condition::TrueForLimitedTimes(n),
                })
        };
        let rules = faults
            .iter()
            .map(|f| match *f {
                Fault::Overloaded(w) => {
                    RequestRule(writes(w), RequestReaction::forge().overloaded())
                }
                Fault::Delay(d, w) => RequestRule(writes(w), RequestReaction::delay(d)),
                Fault::DropConnection(w) => {
                    RequestRule(writes(w), RequestReaction::drop_connection())
                }
                Fault::Dead => RequestRule(Condition::True, RequestReaction::drop_connection()),
                Fault::Unresponsive => RequestRule(Condition::True, RequestReaction::drop_frame()),
            })
            .collect();
        let mut running = lock(&self.running);
        let proxy = running.as_mut().expect("the proxy runs");
        proxy.running_nodes[0].change_request_rules(Some(rules));
    }

    /// Rows of `keyspace.table`: each row's columns (partition key columns included).
    pub fn rows(&self, keyspace: &str, table: &str) -> Vec<HashMap<String, ValueSnapshot>> {
        let snapshot = lock(&self.engine).data_snapshot();
        let Some(ks) = snapshot.0.get(keyspace) else {
            return Vec::new();
        };
        let Some(t) = ks.tables.get(table) else {
            return Vec::new();
        };
        t.rows
            .iter()
            .map(|r| r.data.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .collect()
    }

    /// Every write request received so far.
    pub fn writes(&self) -> Vec<Write> {
        lock(&self.shared).writes.clone()
    }

    /// The CQL of every QUERY (unprepared statement) received so far, as sent.
    pub fn queries(&self) -> Vec<String> {
        lock(&self.shared).queries.clone()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A loopback port nobody listens on (the proxy binds it itself).
fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("an ephemeral port");
    l.local_addr().unwrap()
}

async fn serve(
    listener: tokio::net::TcpListener,
    engine: Arc<Mutex<KassandraSession>>,
    shared: Arc<Mutex<Shared>>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of descriptors, say: let the test's other work go on.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::task::spawn_local(connection(stream, engine.clone(), shared.clone()));
    }
}

/// One client connection: frames in, kassandra, frames out, in order.
async fn connection(
    mut stream: tokio::net::TcpStream,
    engine: Arc<Mutex<KassandraSession>>,
    shared: Arc<Mutex<Shared>>,
) {
    let quickack = socket2::SockRef::from(&stream).try_clone().ok();
    let (mut read, mut write) = stream.split();
    let mut frames = request_stream(&mut read);
    let mut sink = response_sink(&mut write);
    while let Some(Ok((frame, opcode, data))) = frames.next().await {
        let data = unfreeze(opcode, data, &shared);
        let response = match Request::deserialize(opcode, &data, frame.flags) {
            Ok(request) => answer(request, &engine, &shared),
            Err(e) => Response::Error(e),
        };
        if sink.send((response, frame.stream)).await.is_err() {
            break;
        }
        // The proxy writes a frame's header and its body apart, without TCP_NODELAY: an ACK
        // delayed here (Linux delays them once a connection goes request/response) would hold
        // each body back ~40 ms. Quick-ACK mode does not stick, so it is set after every answer.
        if let Some(s) = &quickack {
            let _ = s.set_quickack(true);
        }
    }
}

/// kassandra's type parser recurses forever on `frozen<…>` (a stack overflow aborts the whole
/// test process), so the CQL of QUERY and PREPARE requests reaches it without `frozen`. The driver
/// writes frozen and unfrozen collections alike, so the write path is unchanged. QUERY strings
/// are recorded as sent.
fn unfreeze(opcode: CqlOpcode, data: Bytes, shared: &Mutex<Shared>) -> Bytes {
    if !matches!(opcode, CqlOpcode::Query | CqlOpcode::Prepare) || data.len() < 4 {
        return data;
    }
    let len = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize;
    let Some(text) = data
        .get(4..4 + len)
        .and_then(|t| std::str::from_utf8(t).ok())
    else {
        return data;
    };
    if matches!(opcode, CqlOpcode::Query) {
        lock(shared).queries.push(text.to_owned());
    }
    if !text.contains("frozen<") {
        return data;
    }
    let cql = strip_frozen(text);
    let mut out = Vec::with_capacity(data.len());
    out.extend_from_slice(&(cql.len() as u32).to_be_bytes());
    out.extend_from_slice(cql.as_bytes());
    out.extend_from_slice(&data[4 + len..]);
    Bytes::from(out)
}

/// `frozen<list<text>>` → `list<text>`, however nested.
fn strip_frozen(cql: &str) -> String {
    let mut out = cql.to_owned();
    while let Some(start) = out.find("frozen<") {
        let inner = start + "frozen<".len();
        let mut depth = 1;
        let mut end = None;
        for (i, c) in out[inner..].char_indices() {
            match c {
                '<' => depth += 1,
                '>' => depth -= 1,
                _ => {}
            }
            if depth == 0 {
                end = Some(inner + i);
                break;
            }
        }
        let Some(end) = end else { break };
        out = format!("{}{}{}", &out[..start], &out[inner..end], &out[end + 1..]);
    }
    out
}

fn bytes(values: &[FrameValue<'_>]) -> Vec<Option<Vec<u8>>> {
    values
        .iter()
        .map(|v| match v {
            FrameValue::Some(b) => Some(b.to_vec()),
            FrameValue::Null | FrameValue::NotSet => None,
        })
        .collect()
}

fn answer(
    request: Request<'_>,
    engine: &Mutex<KassandraSession>,
    shared: &Mutex<Shared>,
) -> Response {
    let result = |r: Result<QueryResult, Error>| match r {
        Ok(r) => Response::Result(r),
        Err(e) => Response::Error(e),
    };
    match request {
        Request::StartUp(_) | Request::Register { .. } => Response::Ready,
        Request::Options => Response::options(),
        Request::Query(q) => result(lock(engine).process(q)),
        Request::Prepare(q) => {
            let target = q.target();
            let r = lock(engine).prepare(q);
            if let Ok(QueryResult::Prepared(p)) = &r {
                lock(shared)
                    .prepared
                    .insert(p.id.to_be_bytes().to_vec(), target);
            }
            result(r)
        }
        Request::Execute(e) => {
            let r = lock(engine).execute(e.clone());
            let mut s = lock(shared);
            if let (Ok(QueryResult::Void), Some(target)) = (&r, s.prepared.get(e.id).cloned()) {
                let values = bytes(&e.parameters.data);
                s.writes.push(Write::Execute(Statement { target, values }));
            }
            result(r)
        }
        Request::Batch(b) => {
            let statements = {
                let s = lock(shared);
                b.statements
                    .iter()
                    .map(|st| match st {
                        BatchStatement::Prepared { id, values } => Statement {
                            target: s.prepared.get(*id).cloned().unwrap_or_default(),
                            values: bytes(values),
                        },
                        BatchStatement::Query {
                            raw_query, values, ..
                        } => Statement {
                            target: raw_query.to_string(),
                            values: bytes(values),
                        },
                    })
                    .collect()
            };
            let r = lock(engine).process_batch(b);
            if r.is_ok() {
                lock(shared).writes.push(Write::Batch(statements));
            }
            result(r)
        }
        Request::AuthResponse => Response::Error(Error::new(
            DbError::ProtocolError,
            "kassandra: no authentication",
        )),
    }
}
