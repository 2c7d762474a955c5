//! One simulated device: connect from a chosen source address, upgrade with a bearer token,
//! subscribe, then read and check every event until told to stop. Reconnects (counted) if the
//! server drops it mid-run.

use std::borrow::{Borrow, Cow};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::{Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use futures_util::stream::{SplitSink, StreamExt};
use futures_util::SinkExt;
use serde::Deserialize;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use crate::plan;
use crate::report::Stats;
use crate::run::Shared;

/// A fleet member's socket: plain, or TLS for a `wss://` target.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;
pub type Sink = SplitSink<Ws, Message>;

/// Time-outs for one connection attempt.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Reconnects allowed per connection in one run.
const MAX_RECONNECTS: u64 = 3;

/// What one subscriber knows about one watched user on one feed.
#[derive(Debug, Default)]
pub struct Track {
    pub last_seq: Option<u64>,
    /// The newest state seen is the flapper's final one.
    pub final_seen: bool,
    /// After a (re)subscribe the snapshot may repeat the last seq.
    pub resync: bool,
    pub flaps: bool,
    /// Status of the newest event seen (for `LT_DEBUG`).
    pub last_status: &'static str,
}

/// Per-connection verification state, read at the end.
#[derive(Debug, Default)]
pub struct ConnState {
    /// The subscriber: user id of this connection.
    pub subscriber: usize,
    /// Keyed by (user, group feed or ""); looked up per event as a [`TrackKey`], so an event
    /// for a known track allocates nothing.
    pub tracks: HashMap<(String, String), Track>,
}

/// A track's key, (user, feed), whether owned (as stored) or borrowed (as an event carries it):
/// `(String, String)` borrows as `dyn TrackKey`, so a map keyed by it can be searched with
/// `&(&str, &str)`. Both hash and compare as the pair of strings, as `(String, String)` does.
pub trait TrackKey {
    fn pair(&self) -> (&str, &str);
}

impl TrackKey for (String, String) {
    fn pair(&self) -> (&str, &str) {
        (&self.0, &self.1)
    }
}

impl TrackKey for (&str, &str) {
    fn pair(&self) -> (&str, &str) {
        (self.0, self.1)
    }
}

impl<'a> Borrow<dyn TrackKey + 'a> for (String, String) {
    fn borrow(&self) -> &(dyn TrackKey + 'a) {
        self
    }
}

impl Hash for dyn TrackKey + '_ {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.pair().hash(h);
    }
}

impl PartialEq for dyn TrackKey + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.pair() == other.pair()
    }
}

impl Eq for dyn TrackKey + '_ {}

#[derive(Deserialize)]
struct Event<'a> {
    #[serde(borrow)]
    r#type: Cow<'a, str>,
    #[serde(borrow, default)]
    user: Option<Cow<'a, str>>,
    seq: Option<u64>,
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    status: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    group: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    code: Option<Cow<'a, str>>,
    #[serde(default)]
    members: Vec<serde_json::Value>,
}

pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Everything a connection needs to know about itself.
pub struct Spec {
    pub user: usize,
    pub n: usize,
    pub watch: Vec<usize>,
    pub group: Option<String>,
}

/// Opens one WebSocket as `user` (token minted here) from source address number `n` to the
/// server of connection `n` ([`Shared::target`]), and waits for its `welcome`. Connect and
/// handshake latencies go into `stats` when given.
pub async fn connect(
    shared: &Shared,
    user: &str,
    group: Option<&str>,
    n: usize,
    stats: Option<&RefCell<Stats>>,
) -> Result<Ws, String> {
    let started = Instant::now();
    let src: Ipv4Addr = plan::source_ip(n, shared.sources);
    let target = shared.target(n);
    let socket = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
    socket
        .bind(SocketAddr::new(src.into(), 0))
        .map_err(|_| "bind".to_string())?;
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(target.addr))
        .await
        .map_err(|_| "connect_timeout".to_string())?
        .map_err(|_| "connect".to_string())?;
    let _ = tcp.set_nodelay(true);
    if let Some(stats) = stats {
        stats
            .borrow_mut()
            .connect_us
            .saturating_record(started.elapsed().as_micros() as u64);
    }
    let mut req = target
        .url
        .as_str()
        .into_client_request()
        .map_err(|e| format!("url: {e}"))?;
    let token = shared.token_for(user, group);
    let auth = format!("Bearer {token}")
        .parse()
        .map_err(|_| "token header")?;
    req.headers_mut().insert("Authorization", auth);
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let connector = match (&shared.tls, target.tls) {
        (Some(cfg), true) => Connector::Rustls(cfg.clone()),
        (None, true) => return Err("tls_not_configured".into()),
        (_, false) => Connector::Plain,
    };
    let upgrade =
        tokio_tungstenite::client_async_tls_with_config(req, tcp, Some(config), Some(connector));
    let (mut ws, _) = tokio::time::timeout(CONNECT_TIMEOUT, upgrade)
        .await
        .map_err(|_| "handshake_timeout".to_string())?
        .map_err(|e| match e {
            tokio_tungstenite::tungstenite::Error::Http(r) => {
                format!("http_{}", r.status().as_u16())
            }
            tokio_tungstenite::tungstenite::Error::Tls(_) => "tls".to_string(),
            tokio_tungstenite::tungstenite::Error::Io(e)
                if target.tls && e.kind() == std::io::ErrorKind::InvalidData =>
            {
                "tls".to_string()
            }
            _ => "handshake".to_string(),
        })?;
    // The welcome completes the handshake from the client's point of view.
    match tokio::time::timeout(CONNECT_TIMEOUT, ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) if t.contains("\"welcome\"") => {}
        _ => return Err("no_welcome".into()),
    }
    if let Some(stats) = stats {
        stats
            .borrow_mut()
            .handshake_us
            .saturating_record(started.elapsed().as_micros() as u64);
    }
    Ok(ws)
}

/// Connects a fleet member and sends its subscriptions.
async fn open(shared: &Shared, spec: &Spec, stats: &RefCell<Stats>) -> Result<Ws, String> {
    let me = plan::user(spec.user);
    let mut ws = connect(shared, &me, spec.group.as_deref(), spec.n, Some(stats)).await?;
    let users: Vec<String> = spec.watch.iter().map(|u| plan::user(*u)).collect();
    let sub = serde_json::json!({"op":"subscribe","users":users}).to_string();
    ws.send(Message::text(sub)).await.map_err(|_| "send")?;
    if let Some(g) = &spec.group {
        let sub = serde_json::json!({"op":"subscribe_group","group":g}).to_string();
        ws.send(Message::text(sub)).await.map_err(|_| "send")?;
    }
    Ok(ws)
}

/// Runs one connection for the whole test. `ready` is bumped once it is subscribed (or failed),
/// `sink` holds its sending half while connected (the flapper writes through it).
pub async fn run(
    shared: std::sync::Arc<Shared>,
    spec: Spec,
    stats: Rc<RefCell<Stats>>,
    state: Rc<RefCell<ConnState>>,
    sink: Rc<RefCell<Option<Sink>>>,
    ready: Rc<Cell<usize>>,
) {
    {
        let mut st = state.borrow_mut();
        st.subscriber = spec.user;
        for u in &spec.watch {
            let flaps = plan::flaps(*u, shared.scn.flap_fraction);
            st.tracks.insert(
                (plan::user(*u), String::new()),
                Track {
                    flaps,
                    ..Track::default()
                },
            );
        }
    }
    let mut first = true;
    let mut attempts = 0;
    loop {
        let ws = match open(&shared, &spec, &stats).await {
            Ok(ws) => ws,
            Err(kind) => {
                stats.borrow_mut().error(kind);
                if first {
                    ready.set(ready.get() + 1);
                }
                return;
            }
        };
        if first {
            stats.borrow_mut().established(shared.target_index(spec.n));
            shared.connected.fetch_add(1, Relaxed);
            ready.set(ready.get() + 1);
            first = false;
        } else {
            {
                let mut stats = stats.borrow_mut();
                stats.reconnects += 1;
                *stats
                    .reconnect_windows
                    .entry(now_us() / 100_000)
                    .or_default() += 1;
            }
            for t in state.borrow_mut().tracks.values_mut() {
                t.resync = true;
            }
        }
        let (tx, mut rx) = ws.split();
        *sink.borrow_mut() = Some(tx);
        while let Some(msg) = rx.next().await {
            match msg {
                Ok(Message::Text(t)) => on_text(&shared, &t, &stats, &state),
                Ok(Message::Close(frame)) => {
                    let code = frame.map_or(1005, |f| u16::from(f.code));
                    if !shared.finish.load(Relaxed) {
                        stats.borrow_mut().error(format!("closed_{code}"));
                    }
                    break;
                }
                Ok(_) => {}
                Err(_) => {
                    if !shared.finish.load(Relaxed) {
                        stats.borrow_mut().error("read");
                    }
                    break;
                }
            }
        }
        sink.borrow_mut().take();
        attempts += 1;
        if shared.finish.load(Relaxed) || attempts > MAX_RECONNECTS {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn on_text(shared: &Shared, text: &str, stats: &RefCell<Stats>, state: &RefCell<ConnState>) {
    let Ok(ev) = serde_json::from_str::<Event>(text) else {
        stats.borrow_mut().error("bad_json");
        return;
    };
    match &*ev.r#type {
        "presence" => {
            let (Some(user), Some(seq)) = (ev.user, ev.seq) else {
                stats.borrow_mut().error("bad_presence");
                return;
            };
            let seen = Seen {
                user: &user,
                feed: ev.group.as_deref().unwrap_or(""),
                seq,
                text: ev.text.as_deref(),
                status: ev.status.as_deref().unwrap_or(""),
            };
            track(shared, stats, state, &seen);
        }
        "group_snapshot" => {
            let group = ev.group.as_deref().unwrap_or("");
            for m in &ev.members {
                let (Some(user), Some(seq)) = (m["user"].as_str(), m["seq"].as_u64()) else {
                    continue;
                };
                let seen = Seen {
                    user,
                    feed: group,
                    seq,
                    text: m["text"].as_str(),
                    status: m["status"].as_str().unwrap_or(""),
                };
                track(shared, stats, state, &seen);
            }
        }
        "error" => {
            let code = ev.code.as_deref().unwrap_or("unknown");
            stats.borrow_mut().error(format!("server_{code}"));
        }
        _ => {}
    }
}

/// One user's state as a subscriber received it.
struct Seen<'a> {
    user: &'a str,
    /// The group feed, or "" for a direct subscription.
    feed: &'a str,
    seq: u64,
    text: Option<&'a str>,
    status: &'a str,
}

/// Lines `LT_DEBUG` prints per thread for each kind of finding; the rest are counted.
pub const DEBUG_LINES: u64 = 50;

fn track(shared: &Shared, stats: &RefCell<Stats>, state: &RefCell<ConnState>, seen: &Seen) {
    let now = now_us();
    let mut stats = stats.borrow_mut();
    if shared.run.load(Relaxed) {
        stats.deliveries += 1;
        shared.deliveries.fetch_add(1, Relaxed);
        // Flaps carry their send time: "t<µs since epoch>".
        if let Some(sent) = seen
            .text
            .and_then(|t| t.strip_prefix('t'))
            .and_then(|t| t.parse::<u64>().ok())
        {
            stats.fanout_us.saturating_record(now.saturating_sub(sent));
        }
    }
    let mut st = state.borrow_mut();
    let subscriber = st.subscriber;
    let key: &dyn TrackKey = &(seen.user, seen.feed);
    if seen.status == "offline"
        && st
            .tracks
            .get(key)
            .is_some_and(|t| matches!(t.last_status, "online" | "away" | "busy"))
    {
        stats.went_offline += 1;
    }
    if let Some(t) = st.tracks.get_mut(key) {
        observe(shared, &mut stats, subscriber, t, seen);
    } else {
        let flaps = plan::flaps(
            seen.user
                .strip_prefix('u')
                .and_then(|u| u.parse().ok())
                .unwrap_or(usize::MAX),
            shared.scn.flap_fraction,
        );
        let t = st
            .tracks
            .entry((seen.user.to_owned(), seen.feed.to_owned()))
            .or_insert(Track {
                flaps,
                ..Track::default()
            });
        observe(shared, &mut stats, subscriber, t, seen);
    }
}

/// Checks one event of `subscriber`'s against what its track knew, and records it there.
fn observe(shared: &Shared, stats: &mut Stats, subscriber: usize, t: &mut Track, seen: &Seen) {
    if let Some(last) = t.last_seq {
        let ok = seen.seq > last || (t.resync && seen.seq == last);
        if !ok {
            stats.out_of_order += 1;
        }
        // A live event (not the snapshot that follows a subscribe) that skips a seq on a direct
        // feed: the server merged or lost an event. (A group feed legitimately skips the
        // changes a user makes while not a member.)
        if !t.resync && seen.feed.is_empty() && seen.seq > last + 1 {
            stats.seq_gaps += 1;
            if debug() && stats.seq_gaps <= DEBUG_LINES {
                eprintln!(
                    "seq gap: subscriber u{subscriber} user {} seq {last} -> {}",
                    seen.user, seen.seq
                );
            }
        }
    }
    t.resync = false;
    t.last_seq = Some(seen.seq);
    t.last_status = status_name(seen.status);
    // Only a live event of this run counts: against a server that served an earlier run, a
    // snapshot may already show that run's final state.
    t.final_seen = seen.text == Some(shared.final_text.as_str()) && shared.run.load(Relaxed);
}

/// Verification of one connection at the end: watched users never seen (no snapshot), and
/// flapped users whose final state did not arrive. With `LT_DEBUG` set, prints each pair it
/// counts as missing (subscriber, user, feed, and what the subscriber last saw of the user).
pub fn verify(state: &ConnState, stats: &mut Stats) {
    for ((user, feed), t) in &state.tracks {
        stats.checked += 1;
        let ok = t.last_seq.is_some() && (!t.flaps || t.final_seen);
        if !ok {
            stats.missing += 1;
            if debug() && stats.missing <= DEBUG_LINES {
                let why = match t.last_seq {
                    None => "no snapshot".to_string(),
                    Some(seq) => format!(
                        "final not the newest state: last seen seq {seq}, status {}",
                        if t.last_status.is_empty() {
                            "?"
                        } else {
                            t.last_status
                        }
                    ),
                };
                eprintln!(
                    "missing: subscriber u{} user {user}{} ({why})",
                    state.subscriber,
                    if feed.is_empty() {
                        String::new()
                    } else {
                        format!(" feed {feed}")
                    }
                );
            }
        }
    }
}

/// `LT_DEBUG` is set: print what verification counts as missing, and seq gaps. Read once.
pub fn debug() -> bool {
    static DEBUG: OnceLock<bool> = OnceLock::new();
    *DEBUG.get_or_init(|| std::env::var_os("LT_DEBUG").is_some())
}

/// A status as a static string, so a track keeps it without allocating.
fn status_name(s: &str) -> &'static str {
    match s {
        "online" => "online",
        "away" => "away",
        "busy" => "busy",
        "offline" => "offline",
        "" => "",
        _ => "other",
    }
}

/// Flapped users still waiting for their final state on this connection.
pub fn unconverged(state: &ConnState) -> usize {
    state
        .tracks
        .values()
        .filter(|t| t.flaps && !t.final_seen)
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tracks stored under owned keys are found from borrowed ones: the two hash alike.
    #[test]
    fn tracks_are_found_by_borrowed_keys() {
        let mut tracks: HashMap<(String, String), Track> = HashMap::new();
        for (user, feed) in [("u1", ""), ("u1", "g0"), ("u10", ""), ("", "u1")] {
            let t = Track {
                last_seq: Some(user.len() as u64 * 10 + feed.len() as u64),
                ..Track::default()
            };
            tracks.insert((user.to_owned(), feed.to_owned()), t);
        }
        for (user, feed) in [("u1", ""), ("u1", "g0"), ("u10", ""), ("", "u1")] {
            let key: &dyn TrackKey = &(user, feed);
            let want = user.len() as u64 * 10 + feed.len() as u64;
            assert_eq!(tracks.get(key).and_then(|t| t.last_seq), Some(want));
        }
        for (user, feed) in [("u", "1"), ("u1g0", ""), ("u2", "")] {
            let key: &dyn TrackKey = &(user, feed);
            assert!(!tracks.contains_key(key), "{user} {feed}");
        }
    }
}
