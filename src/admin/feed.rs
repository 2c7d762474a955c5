//! `/ws/admin`: the dashboard's live WebSocket (docs/ADMIN.md).
//!
//! The token arrives in the first message (never in the URL). Then, once per
//! `admin.push_interval_ms` at most, the feed pushes the stats (one map-reduce) and the presence
//! changes since the previous push (one change-log read per shard), whatever the number of
//! users; requests ride the same socket and go through the HTTP API's router.

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use futures_lite::{AsyncRead, AsyncWrite, AsyncWriteExt};
use hashbrown::HashMap;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::api::{self, ask};
use super::http::Method;
use super::query::changes_since;
use super::AdminLocal;
use crate::presence::{PresenceState, UserId};
use crate::protocol::events::json_frame;
use crate::protocol::ws::{self, Decoder, Inbound};
use crate::shard::Shard;

/// Users listed in one `changes` push; past this they count as `missed` (re-query).
const MAX_CHANGES_PER_PUSH: usize = 500;

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum ClientMsg {
    Auth {
        token: String,
    },
    Query {
        id: serde_json::Value,
        path: String,
        #[serde(default)]
        method: Option<String>,
    },
}

#[derive(Serialize)]
struct Push<'a, T: Serialize> {
    r#type: &'static str,
    #[serde(flatten)]
    body: &'a T,
}

#[derive(Serialize)]
struct ChangeRow<'a> {
    user: &'a UserId,
    status: &'static str,
    text: Option<&'a str>,
    devices: u32,
    ts: u64,
    seq: u64,
    last_seen: Option<u64>,
}

/// What a poll of the socket and the timer gave.
enum Event {
    Read(usize),
    Gone,
    Tick,
}

struct Feed<S> {
    shard: Rc<Shard>,
    stream: S,
    decoder: Decoder,
    token: Option<String>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Feed<S> {
    async fn send(&mut self, frame: &[u8]) -> bool {
        self.stream.write_all(frame).await.is_ok()
    }

    async fn close(&mut self, code: u16, reason: &str) {
        let _ = self.stream.write_all(&ws::close_frame(code, reason)).await;
        let _ = self.stream.close().await;
    }

    /// Waits for bytes or the timer, without dropping a pending read.
    async fn next(&mut self, timer: &mut glommio::timer::Timer, buf: &mut [u8]) -> Event {
        futures_lite::future::poll_fn(|cx| {
            match Pin::new(&mut self.stream).poll_read(cx, buf) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Event::Gone),
                Poll::Ready(Ok(n)) => return Poll::Ready(Event::Read(n)),
                Poll::Pending => {}
            }
            Pin::new(&mut *timer).poll(cx).map(|_| Event::Tick)
        })
        .await
    }
}

/// Serves an upgraded `/ws/admin` connection on this shard until it closes.
pub async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    shard: Rc<Shard>,
    mut stream: S,
    key: &str,
    early: Vec<u8>,
) {
    if stream
        .write_all(&crate::edge::http::switching_protocols(key))
        .await
        .is_err()
    {
        return;
    }
    let max = shard.cfg().admin.max_request_bytes;
    let mut feed = Feed {
        decoder: Decoder::new(max, max * 4),
        shard,
        stream,
        token: None,
    };
    feed.decoder.feed(&early);
    let auth_wait = Duration::from_millis(feed.shard.cfg().admin.request_timeout_ms);
    let mut timer = glommio::timer::Timer::new(auth_wait);
    let push_every = Duration::from_millis(feed.shard.cfg().admin.push_interval_ms);
    let mut marks: Arc<[u64]> = vec![u64::MAX; feed.shard.shards()].into();
    let mut buf = vec![0u8; 4096];
    let mut admin: Option<Arc<str>> = None;
    loop {
        // Handle every complete message before waiting again.
        loop {
            let item = match feed.decoder.decode() {
                Ok(Some(item)) => item,
                Ok(None) => break,
                Err(e) => return feed.close(e.close_code(), "protocol error").await,
            };
            match item {
                Inbound::Text(bytes) => {
                    let msg: Result<ClientMsg, _> = serde_json::from_slice(&bytes);
                    match (msg, &admin) {
                        (Ok(ClientMsg::Auth { token }), None) => {
                            match api::auth::identity(&feed.shard, &token) {
                                Ok(who) => {
                                    tracing::info!(target: "presenced::audit", admin = %who,
                                        "admin feed opened");
                                    feed.token = Some(token);
                                    admin = Some(who.clone());
                                    if !hello(&mut feed, &who, &mut marks).await {
                                        return;
                                    }
                                    timer = glommio::timer::Timer::new(push_every);
                                }
                                Err((401, _)) => return feed.close(4001, "invalid token").await,
                                Err(_) => return feed.close(4003, "not an admin").await,
                            }
                        }
                        (Ok(ClientMsg::Query { id, path, method }), Some(_)) => {
                            if !query(&mut feed, id, &path, method.as_deref()).await {
                                return;
                            }
                        }
                        (Ok(_), None) => {
                            return feed.close(4001, "authenticate first").await;
                        }
                        (Ok(ClientMsg::Auth { .. }), Some(_)) => {}
                        (Err(_), _) => {
                            return feed.close(1007, "expected an auth or query op").await;
                        }
                    }
                }
                Inbound::Ping(p) => {
                    if !feed.send(&ws::pong_frame(&p)).await {
                        return;
                    }
                }
                Inbound::Close(_) => return feed.close(1000, "").await,
                Inbound::Pong => {}
                Inbound::Binary(_) | Inbound::TooLarge(_) => {
                    return feed.close(1003, "JSON text messages only").await;
                }
            }
        }
        match feed.next(&mut timer, &mut buf).await {
            Event::Gone => return,
            Event::Read(n) => feed.decoder.feed(&buf[..n]),
            Event::Tick => {
                let Some(token) = admin.as_ref().and(feed.token.clone()) else {
                    return feed.close(4001, "no auth message in time").await;
                };
                // The credential is checked again at every push: an expired token stops here.
                if api::auth::identity(&feed.shard, &token).is_err() {
                    return feed.close(4001, "token no longer valid").await;
                }
                if !push(&mut feed, &mut marks).await {
                    return;
                }
                timer = glommio::timer::Timer::new(push_every);
            }
        }
    }
}

async fn hello<S: AsyncRead + AsyncWrite + Unpin>(
    feed: &mut Feed<S>,
    who: &str,
    marks: &mut Arc<[u64]>,
) -> bool {
    let series = ask::on(&feed.shard, 0, |s| AdminLocal::of(s).series.borrow().all())
        .await
        .unwrap_or_default();
    // Start the change marks at "now" on every shard. If a shard did not answer, the marks stay
    // unset and the first push reports `missed` (below), so the client re-queries.
    let _ = changes(feed, marks).await;
    #[derive(Serialize)]
    struct Hello<'a> {
        r#type: &'static str,
        admin: &'a str,
        version: &'static str,
        shards: usize,
        interval_ms: u64,
        series: Vec<super::series::Sample>,
        history: HistoryInfo,
    }
    /// What the dashboard needs to draw history: whether it is on, how often samples are taken
    /// (the finest useful replay step), and how far back `replay/at` looks.
    #[derive(Serialize)]
    struct HistoryInfo {
        backend: crate::config::HistoryBackend,
        sample_interval_s: u64,
        replay_lookback_h: u64,
        retention_days: u32,
    }
    let h = &feed.shard.cfg().history;
    let frame = json_frame(&Hello {
        r#type: "hello",
        admin: who,
        version: super::VERSION,
        shards: feed.shard.shards(),
        interval_ms: feed.shard.cfg().admin.push_interval_ms,
        series,
        history: HistoryInfo {
            backend: h.backend,
            sample_interval_s: h.sample_interval_s,
            replay_lookback_h: h.replay_lookback_h,
            retention_days: h.retention_days,
        },
    });
    feed.send(&frame).await
}

/// Changes since `marks` on every shard, the latest per user, and how many were missed.
async fn changes<S>(feed: &Feed<S>, marks: &mut Arc<[u64]>) -> (Vec<Arc<PresenceState>>, u64) {
    let since = marks.clone();
    let asked = ask::all(&feed.shard, move |s| {
        let mark = since.get(usize::from(s.ix())).copied().unwrap_or(u64::MAX);
        changes_since(s, mark)
    });
    let Ok(answers) = asked.await else {
        return (Vec::new(), 1); // unknown: tell the client to re-query
    };
    let mut latest: HashMap<UserId, Arc<PresenceState>> = HashMap::new();
    let mut missed = 0;
    let mut new_marks = marks.to_vec();
    for (ix, batch) in answers.into_iter().enumerate() {
        missed += batch.missed;
        new_marks[ix] = batch.last;
        for s in batch.changes {
            latest.insert(s.user.clone(), s); // in seq order: the last one wins
        }
    }
    // A shard whose mark was never set (it did not answer `hello`'s question) starts now, and
    // what it had is reported as missed.
    for (ix, m) in marks.iter().enumerate() {
        if *m == u64::MAX && new_marks[ix] != u64::MAX {
            missed += 1;
        }
    }
    *marks = new_marks.into();
    let mut list: Vec<Arc<PresenceState>> = latest.into_values().collect();
    list.sort_unstable_by(|a, b| a.user.cmp(&b.user));
    if list.len() > MAX_CHANGES_PER_PUSH {
        missed += (list.len() - MAX_CHANGES_PER_PUSH) as u64;
        list.truncate(MAX_CHANGES_PER_PUSH);
    }
    (list, missed)
}

async fn push<S: AsyncRead + AsyncWrite + Unpin>(
    feed: &mut Feed<S>,
    marks: &mut Arc<[u64]>,
) -> bool {
    if let Ok(stats) = api::stats(&feed.shard).await {
        let frame = json_frame(&Push {
            r#type: "stats",
            body: &stats,
        });
        if !feed.send(&frame).await {
            return false;
        }
    }
    let (list, missed) = changes(feed, marks).await;
    if list.is_empty() && missed == 0 {
        return true;
    }
    #[derive(Serialize)]
    struct Changes<'a> {
        r#type: &'static str,
        users: Vec<ChangeRow<'a>>,
        missed: u64,
    }
    let users = list
        .iter()
        .map(|s| ChangeRow {
            user: &s.user,
            status: s.status.as_str(),
            text: s.text.as_deref(),
            devices: s.devices,
            ts: s.ts,
            seq: s.seq,
            last_seen: s.last_seen,
        })
        .collect();
    let frame = json_frame(&Changes {
        r#type: "changes",
        users,
        missed,
    });
    feed.send(&frame).await
}

async fn query<S: AsyncRead + AsyncWrite + Unpin>(
    feed: &mut Feed<S>,
    id: serde_json::Value,
    path: &str,
    method: Option<&str>,
) -> bool {
    let method = match method.unwrap_or("GET") {
        "GET" => Method::Get,
        "POST" => Method::Post,
        _ => Method::Other,
    };
    let (path, q) = path.split_once('?').unwrap_or((path, ""));
    let resp = if path.starts_with("/api/") {
        api::route(&feed.shard, method, path, q, feed.token.as_deref()).await
    } else {
        super::http::Response::error(404, "the feed answers /api/ paths only")
    };
    let body = String::from_utf8(resp.body).unwrap_or_default();
    let body = RawValue::from_string(body)
        .unwrap_or_else(|_| RawValue::from_string("null".into()).expect("valid JSON"));
    #[derive(Serialize)]
    struct Reply {
        r#type: &'static str,
        id: serde_json::Value,
        status: u16,
        body: Box<RawValue>,
    }
    let frame = json_frame(&Reply {
        r#type: "reply",
        id,
        status: resp.status,
        body,
    });
    feed.send(&frame).await
}
