//! Routes of the admin port, their auth, and the map-reduce over the mesh behind them.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use serde::Serialize;

use super::http::{Method, Response};
use super::query::{
    merge_online, session_hex, AdminReq, AdminResp, GroupQuery, Kicked, OnlineFilter, OnlineQuery,
    OnlineRow, ShardStats,
};
use super::series::Sample;
use crate::history::{Answer, Query as HQuery};
use crate::metrics::{latency_histogram, MetricsSnapshot, Percentiles, ShardMetrics};
use crate::presence::watchers::ShardIx;
use crate::presence::{Aggregate, DeviceType, UserId};
use crate::shard::mesh::MeshMsg;
use crate::shard::Shard;

/// Who is asking: the admin JWT's `sub`, or `static-token`.
pub type Identity = Arc<str>;

/// Checks an admin credential: the static admin token, or a verified JWT with role `admin`.
/// Errors are the 401/403 responses to send.
pub fn authenticate(shard: &Shard, bearer: Option<&str>) -> Result<Identity, Response> {
    let token = bearer.ok_or_else(|| Response::error(401, "missing bearer token"))?;
    admin_identity(shard, token).map_err(|(status, msg)| Response::error(status, msg))
}

/// The admin behind `token`, or (401|403, why).
pub fn admin_identity(shard: &Shard, token: &str) -> Result<Identity, (u16, &'static str)> {
    if let Some(fixed) = &shard.cfg.admin.token {
        // Digests first: equal lengths, so the comparison's time says nothing about the
        // secret, not even its length.
        use subtle::ConstantTimeEq;
        let sha = |b: &[u8]| ring::digest::digest(&ring::digest::SHA256, b);
        let (want, got) = (sha(fixed.as_bytes()), sha(token.as_bytes()));
        if bool::from(want.as_ref().ct_eq(got.as_ref())) {
            return Ok("static-token".into());
        }
    }
    let claims = shard
        .verifier
        .verify(token)
        .map_err(|e| (401, e.reason()))?;
    if !claims.roles.iter().any(|r| r == "admin") {
        return Err((403, "the token has no admin role"));
    }
    Ok(claims.sub.into())
}

/// Why a cross-shard question got no full answer.
fn unavailable() -> Response {
    Response::error(503, "a shard did not answer in time")
}

/// Asks `to` (a list of shards) and waits, up to `admin.query_timeout_ms`, for all answers.
async fn ask_shards(
    shard: &Shard,
    to: &[ShardIx],
    req: AdminReq,
) -> Result<Vec<(ShardIx, AdminResp)>, Response> {
    let (answers, complete) = ask_shards_partial(shard, to, req).await;
    if complete {
        Ok(answers)
    } else {
        Err(unavailable())
    }
}

/// Like [`ask_shards`], but returns what arrived by the deadline (sorted by shard) and whether
/// that was everyone: a scrape should still show what the live shards know.
async fn ask_shards_partial(
    shard: &Shard,
    to: &[ShardIx],
    req: AdminReq,
) -> (Vec<(ShardIx, AdminResp)>, bool) {
    let (tx, rx) = flume::bounded(to.len());
    let req = Arc::new(req);
    for &s in to {
        shard.mesh.send(
            s,
            MeshMsg::Admin {
                req: req.clone(),
                reply: tx.clone(),
            },
        );
    }
    drop(tx);
    let deadline =
        std::time::Instant::now() + Duration::from_millis(shard.cfg.admin.query_timeout_ms);
    let mut out = Vec::with_capacity(to.len());
    while out.len() < to.len() {
        let wait = deadline.saturating_duration_since(std::time::Instant::now());
        let next = futures_lite::future::or(async { rx.recv_async().await.ok() }, async {
            glommio::timer::sleep(wait).await;
            None
        })
        .await;
        match next {
            Some(answer) => out.push(answer),
            None => break, // out of time, or a shard dropped the question (stopping)
        }
    }
    out.sort_unstable_by_key(|(ix, _)| *ix);
    let complete = out.len() == to.len();
    (out, complete)
}

/// Every shard's answer, in shard order.
pub async fn ask_all(shard: &Shard, req: AdminReq) -> Result<Vec<AdminResp>, Response> {
    let all: Vec<ShardIx> = (0..shard.mesh.shards() as ShardIx).collect();
    Ok(ask_shards(shard, &all, req)
        .await?
        .into_iter()
        .map(|(_, a)| a)
        .collect())
}

pub async fn ask(shard: &Shard, to: ShardIx, req: AdminReq) -> Result<AdminResp, Response> {
    let mut one = ask_shards(shard, &[to], req).await?;
    Ok(one.pop().expect("one shard asked, one answer").1)
}

/// The cursor of `/api/online`: the last user id of a page, base64url.
pub fn encode_cursor(user: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(user.as_bytes())
}

fn decode_cursor(c: &str) -> Option<UserId> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(c)
        .ok()?;
    String::from_utf8(bytes).ok().map(Into::into)
}

/// Query parameters, each allowed at most once and only from `allowed`.
fn params(query: &str, allowed: &[&str]) -> Result<Vec<(String, String)>, Response> {
    let mut out: Vec<(String, String)> = Vec::new();
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        if !allowed.contains(&&*k) {
            let msg = format!("unknown parameter `{k}` (allowed: {})", allowed.join(", "));
            return Err(Response::error(400, &msg));
        }
        if out.iter().any(|(x, _)| *x == k) {
            return Err(Response::error(
                400,
                &format!("parameter `{k}` given twice"),
            ));
        }
        if v.is_empty() {
            return Err(Response::error(400, &format!("parameter `{k}` is empty")));
        }
        out.push((k.into_owned(), v.into_owned()));
    }
    Ok(out)
}

fn page_args(
    p: &[(String, String)],
    default_limit: usize,
    max: usize,
) -> Result<(usize, Option<UserId>), Response> {
    let mut limit = default_limit.min(max);
    let mut after = None;
    for (k, v) in p {
        match k.as_str() {
            "limit" => {
                limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=max).contains(n))
                    .ok_or_else(|| {
                        Response::error(400, &format!("limit must be between 1 and {max}"))
                    })?;
            }
            "cursor" => {
                after = Some(
                    decode_cursor(v).ok_or_else(|| Response::error(400, "cursor is malformed"))?,
                );
            }
            _ => {}
        }
    }
    Ok((limit, after))
}

/// `/api/online`'s parameters.
pub fn parse_online(query: &str, max_page: usize) -> Result<OnlineQuery, Response> {
    let p = params(
        query,
        &[
            "group",
            "role",
            "region",
            "device_type",
            "status",
            "q",
            "limit",
            "cursor",
        ],
    )?;
    let mut filter = OnlineFilter::default();
    for (k, v) in &p {
        match k.as_str() {
            "group" => filter.group = Some(v.clone()),
            "role" => filter.role = Some(v.clone()),
            "region" => filter.region = Some(v.clone()),
            "q" => filter.q = Some(v.clone()),
            "device_type" => {
                filter.device_type = Some(DeviceType::parse(v).ok_or_else(|| {
                    Response::error(
                        400,
                        "device_type must be web, ios, android, desktop or other",
                    )
                })?);
            }
            "status" => {
                filter.status = Some(match v.as_str() {
                    "online" => Aggregate::Online,
                    "away" => Aggregate::Away,
                    "busy" => Aggregate::Busy,
                    _ => return Err(Response::error(400, "status must be online, away or busy")),
                });
            }
            _ => {}
        }
    }
    let (limit, after) = page_args(&p, 100, max_page)?;
    Ok(OnlineQuery {
        filter,
        after,
        limit,
    })
}

#[derive(Serialize)]
struct OnlineBody {
    users: Vec<OnlineRow>,
    total: u64,
    next_cursor: Option<String>,
}

#[derive(Serialize, Default)]
pub struct Totals {
    pub connections: u64,
    pub online_users: u64,
    pub sessions: u64,
    pub handshakes_ok: u64,
    pub deliveries: u64,
    pub coalesced: u64,
    pub ops: u64,
    pub rate_limited: u64,
    pub mesh_sent: u64,
    pub mesh_received: u64,
    pub mesh_dropped: u64,
    pub kicks: u64,
}

#[derive(Serialize, Default)]
pub struct Rates {
    pub handshakes_per_s: f64,
    pub deliveries_per_s: f64,
    pub ops_per_s: f64,
}

#[derive(Serialize)]
pub struct ShardRow {
    pub shard: usize,
    pub cpu: Option<usize>,
    pub users: u64,
    pub connections: u64,
    pub sessions: usize,
    pub mesh_in: u64,
    pub mesh_out: u64,
    pub deliveries: u64,
    pub deliveries_per_s: f64,
}

#[derive(Serialize)]
pub struct StatsBody {
    pub version: &'static str,
    pub started_ms: u64,
    pub uptime_s: u64,
    pub shards: usize,
    pub totals: Totals,
    pub rates: Rates,
    /// Since start.
    pub latency_us: Percentiles,
    /// The last 10 to 20 seconds.
    pub latency_recent_us: Percentiles,
    pub per_shard: Vec<ShardRow>,
    /// The latest point of the dashboard's series.
    pub sample: Sample,
}

/// `/api/stats`: counters read directly (any thread may read them), the rest map-reduced.
pub async fn stats(shard: &Shard) -> Result<StatsBody, Response> {
    let answers = ask_all(shard, AdminReq::Stats).await?;
    let shared = &shard.shared;
    let snaps: Vec<MetricsSnapshot> = shared.metrics.iter().map(|m| m.snapshot()).collect();
    let sum = MetricsSnapshot::sum(&snaps);
    let mut total_h = latency_histogram();
    let mut recent_h = latency_histogram();
    let mut sample = Sample::default();
    let mut shard_rates = Vec::new();
    let mut stats: Vec<ShardStats> = Vec::with_capacity(answers.len());
    for a in answers {
        let AdminResp::Stats(s) = a else {
            return Err(Response::error(500, "unexpected shard answer"));
        };
        let _ = total_h.add(&s.latency_total);
        let _ = recent_h.add(&s.latency_recent);
        if let Some((latest, rates)) = &s.sample {
            sample = *latest;
            shard_rates.clone_from(rates);
        }
        stats.push(*s);
    }
    let per_shard = snaps
        .iter()
        .zip(&stats)
        .enumerate()
        .map(|(i, (m, s))| ShardRow {
            shard: i,
            cpu: shared.cpus.get(i).copied().flatten(),
            users: m.online_users,
            connections: m.connections,
            sessions: s.sessions,
            mesh_in: m.mesh_received,
            mesh_out: m.mesh_sent,
            deliveries: m.deliveries,
            deliveries_per_s: shard_rates.get(i).copied().unwrap_or(0.0),
        })
        .collect();
    Ok(StatsBody {
        version: super::VERSION,
        started_ms: shared.started_ms,
        uptime_s: shared.started.elapsed().as_secs(),
        shards: shared.shards(),
        totals: Totals {
            connections: sum.connections,
            online_users: sum.online_users,
            sessions: stats.iter().map(|s| s.sessions as u64).sum(),
            handshakes_ok: sum.handshakes_ok,
            deliveries: sum.deliveries,
            coalesced: sum.coalesced,
            ops: sum.ops,
            rate_limited: sum.ops_rate_limited + sum.handshakes_rate_limited,
            mesh_sent: sum.mesh_sent,
            mesh_received: sum.mesh_received,
            mesh_dropped: sum.mesh_dropped,
            kicks: sum.kicks,
        },
        rates: Rates {
            handshakes_per_s: sample.handshakes_per_s,
            deliveries_per_s: sample.deliveries_per_s,
            ops_per_s: sample.ops_per_s,
        },
        latency_us: Percentiles::of(&total_h),
        latency_recent_us: Percentiles::of(&recent_h),
        per_shard,
        sample,
    })
}

/// `/metrics`. Counters need no shard's answer; the latency histograms come from the shards
/// that answer in time (`presenced_scrape_shards_answered` says how many).
async fn metrics(shard: &Shard) -> Result<Response, Response> {
    let all: Vec<ShardIx> = (0..shard.mesh.shards() as ShardIx).collect();
    let (answers, _) = ask_shards_partial(shard, &all, AdminReq::Stats).await;
    let answered = answers.len();
    let answers: Vec<AdminResp> = answers.into_iter().map(|(_, a)| a).collect();
    let mut total = latency_histogram();
    for a in &answers {
        if let AdminResp::Stats(s) = a {
            let _ = total.add(&s.latency_total);
        }
    }
    let shared = &shard.shared;
    let snaps: Vec<MetricsSnapshot> = shared.metrics.iter().map(|m| m.snapshot()).collect();
    let pairs: Vec<Vec<u64>> = shared.mesh_pairs.iter().map(|p| p.snapshot()).collect();
    let text = super::prom::render(&super::prom::Scrape {
        version: super::VERSION,
        uptime_s: shared.started.elapsed().as_secs_f64(),
        shards: &snaps,
        mesh_pairs: &pairs,
        latency: Percentiles::of(&total),
        answered,
        history: shared.history.enabled().then(|| {
            super::prom::HistoryScrape::of(&shared.history, shard.cfg.history.queue_capacity)
        }),
    });
    Ok(Response::text(
        200,
        "text/plain; version=0.0.4; charset=utf-8",
        text.into_bytes(),
    ))
}

/// A path segment, percent-decoded; empty or undecodable is `None`.
fn segment(s: &str) -> Option<String> {
    let d = percent_encoding::percent_decode_str(s).decode_utf8().ok()?;
    (!d.is_empty()).then(|| d.into_owned())
}

/// Answers one request. `bearer`: the credential presented (header, or the feed's auth).
pub async fn route(
    shard: &Rc<Shard>,
    method: Method,
    path: &str,
    query: &str,
    bearer: Option<&str>,
) -> Response {
    ShardMetrics::inc(&shard.metrics.admin_requests);
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let read = matches!(method, Method::Get | Method::Head);
    let open_metrics = !shard.cfg.admin.protect_metrics;
    match segs.as_slice() {
        ["healthz"] | ["readyz"] | ["metrics"] => {
            if !read {
                return Response::error(405, "use GET");
            }
            if !open_metrics {
                if let Err(e) = authenticate(shard, bearer) {
                    return e;
                }
            }
            match segs[0] {
                "healthz" => Response::json(200, &serde_json::json!({"ok": true})),
                "readyz" => {
                    let shared = &shard.shared;
                    let ready = shared.ready();
                    let body = serde_json::json!({
                        "ready": ready,
                        "shards": shared.shards(),
                        "accepting": shared.accepting.load(std::sync::atomic::Ordering::Acquire),
                    });
                    Response::json(if ready { 200 } else { 503 }, &body)
                }
                _ => metrics(shard).await.unwrap_or_else(|e| e),
            }
        }
        ["api", rest @ ..] => {
            let admin = match authenticate(shard, bearer) {
                Ok(a) => a,
                Err(e) => return e,
            };
            api(shard, method, rest, query, admin)
                .await
                .unwrap_or_else(|e| e)
        }
        _ if read => match super::assets::get(path) {
            Some(r) => r,
            None => Response::error(404, "not found"),
        },
        _ => Response::error(404, "not found"),
    }
}

/// Points one replay may return.
const MAX_REPLAY_POINTS: u64 = 10_000;
/// The longest replay step.
const MAX_REPLAY_STEP_MS: u64 = 31 * 86_400_000;

/// `from`/`to` in ms since the epoch; `to` defaults to now, `from` to a day before `to`.
fn time_range(p: &[(String, String)]) -> Result<(u64, u64), Response> {
    let get = |name: &str| -> Result<Option<u64>, Response> {
        match p.iter().find(|(k, _)| k == name) {
            None => Ok(None),
            Some((_, v)) => v
                .parse()
                .map(Some)
                .map_err(|_| Response::error(400, &format!("{name} must be ms since the epoch"))),
        }
    };
    let to = get("to")?.unwrap_or_else(crate::shard::now_ms);
    let from = get("from")?.unwrap_or(to.saturating_sub(86_400_000));
    if from > to {
        return Err(Response::error(400, "from must not be after to"));
    }
    Ok((from, to))
}

/// Asks the history thread, within `admin.query_timeout_ms`.
async fn ask_history(shard: &Shard, q: HQuery) -> Result<Answer, Response> {
    if !shard.history.enabled() {
        return Err(Response::error_as(
            503,
            "history_off",
            "history is off (history.backend = \"off\")",
        ));
    }
    let rx = shard
        .history
        .ask(q)
        .ok_or_else(|| Response::error(503, "history is busy: too many queries waiting"))?;
    let wait = Duration::from_millis(shard.cfg.admin.query_timeout_ms);
    let answer = futures_lite::future::or(async { rx.recv_async().await.ok() }, async {
        glommio::timer::sleep(wait).await;
        None
    })
    .await;
    match answer {
        None => Err(Response::error(503, "history did not answer in time")),
        Some(Err(e)) => Err(Response::error(503, &format!("history store: {e}"))),
        Some(Ok(a)) => Ok(a),
    }
}

async fn api(
    shard: &Rc<Shard>,
    method: Method,
    segs: &[&str],
    query: &str,
    admin: Identity,
) -> Result<Response, Response> {
    let read = matches!(method, Method::Get | Method::Head);
    // 405 unless the method is right.
    let need = |ok: bool, which: &str| {
        if ok {
            Ok(())
        } else {
            Err(Response::error(405, &format!("use {which}")))
        }
    };
    Ok(match segs {
        ["stats"] => {
            need(read, "GET")?;
            params(query, &[])?;
            Response::json(200, &stats(shard).await?)
        }
        ["online"] => {
            need(read, "GET")?;
            let q = parse_online(query, shard.cfg.admin.max_page)?;
            let limit = q.limit;
            let pages = ask_all(shard, AdminReq::Online(q)).await?;
            let pages = pages
                .into_iter()
                .filter_map(|a| match a {
                    AdminResp::Online(p) => Some(p),
                    _ => None,
                })
                .collect();
            let (users, total, next) = merge_online(pages, limit);
            Response::json(
                200,
                &OnlineBody {
                    users,
                    total,
                    next_cursor: next.map(|u| encode_cursor(&u)),
                },
            )
        }
        ["users", id] => {
            need(read, "GET")?;
            let Some(user) = segment(id) else {
                return Err(Response::error(400, "bad user id"));
            };
            params(query, &[])?;
            match ask(shard, shard.owner(&user), AdminReq::User(user.into())).await? {
                AdminResp::User(Some(d)) => Response::json(200, &d),
                _ => Response::error(404, "unknown user"),
            }
        }
        ["users", id, "kick"] => {
            need(method == Method::Post, "POST")?;
            let Some(user) = segment(id) else {
                return Err(Response::error(400, "bad user id"));
            };
            let req = AdminReq::KickUser {
                user: user.as_str().into(),
                by: admin,
            };
            match ask(shard, shard.owner(&user), req).await? {
                AdminResp::Kicked(k) if k.kicked > 0 => Response::json(200, &k),
                _ => Response::error(404, "the user has no session"),
            }
        }
        ["sessions", id, "kick"] => {
            need(method == Method::Post, "POST")?;
            let Some(session) = segment(id).and_then(|s| u64::from_str_radix(&s, 16).ok()) else {
                return Err(Response::error(
                    400,
                    "a session id is the hex `session` of welcome",
                ));
            };
            let owner = session >> 48;
            if owner >= shard.mesh.shards() as u64 {
                return Err(Response::error(404, "unknown session"));
            }
            let req = AdminReq::KickSession { session, by: admin };
            match ask(shard, owner as ShardIx, req).await? {
                AdminResp::Kicked(Kicked {
                    user: Some(user),
                    kicked,
                }) => {
                    #[derive(Serialize)]
                    struct Body {
                        session: String,
                        user: UserId,
                        kicked: usize,
                    }
                    let session = session_hex(session);
                    Response::json(
                        200,
                        &Body {
                            session,
                            user,
                            kicked,
                        },
                    )
                }
                _ => Response::error(404, "unknown session"),
            }
        }
        ["groups", g] => {
            need(read, "GET")?;
            let Some(group) = segment(g) else {
                return Err(Response::error(400, "bad group id"));
            };
            let p = params(query, &["limit", "cursor"])?;
            let max = shard.cfg.admin.max_page.max(1000);
            let (limit, after) = page_args(&p, 1000, max)?;
            let q = GroupQuery {
                group: group.as_str().into(),
                after,
                limit,
            };
            match ask(shard, shard.owner(&group), AdminReq::Group(q)).await? {
                AdminResp::Group(Some(page)) => Response::json(200, &page),
                _ => Response::error(404, "unknown group: no visible member, no subscriber"),
            }
        }
        ["history", id] | ["analytics", id] => {
            need(read, "GET")?;
            let Some(user) = segment(id) else {
                return Err(Response::error(400, "bad user id"));
            };
            let history = segs[0] == "history";
            let allowed: &[&str] = if history {
                &["from", "to", "limit"]
            } else {
                &["from", "to"]
            };
            let p = params(query, allowed)?;
            let (from, to) = time_range(&p)?;
            let q = if history {
                let (limit, _) = page_args(&p, 100, shard.cfg.admin.max_page)?;
                HQuery::History {
                    user: user.clone(),
                    from,
                    to,
                    limit,
                }
            } else {
                HQuery::Analytics {
                    user: user.clone(),
                    from,
                    to,
                }
            };
            match ask_history(shard, q).await? {
                Answer::Events(events) => Response::json(
                    200,
                    &serde_json::json!({"user": user, "from": from, "to": to, "events": events}),
                ),
                Answer::Analytics(a) => {
                    #[derive(Serialize)]
                    struct Body<'a> {
                        user: &'a str,
                        #[serde(flatten)]
                        a: &'a crate::history::analytics::Analytics,
                    }
                    Response::json(200, &Body { user: &user, a: &a })
                }
                _ => Response::error(500, "unexpected history answer"),
            }
        }
        ["replay"] => {
            need(read, "GET")?;
            let p = params(query, &["from", "to", "step", "group"])?;
            let (from, to) = time_range(&p)?;
            let default_step = shard.cfg.history.sample_interval_s * 1000;
            let step = match p.iter().find(|(k, _)| k == "step") {
                None => default_step,
                Some((_, v)) => match v.parse::<u64>() {
                    Ok(n) if n > 0 => n,
                    _ => return Err(Response::error(400, "step must be a positive number of ms")),
                },
            };
            if step > MAX_REPLAY_STEP_MS {
                let msg = format!("step must be at most {MAX_REPLAY_STEP_MS} ms (31 days)");
                return Err(Response::error(400, &msg));
            }
            if (to - from) / step > MAX_REPLAY_POINTS {
                let msg =
                    format!("at most {MAX_REPLAY_POINTS} points: widen step or narrow from/to");
                return Err(Response::error(400, &msg));
            }
            let group = p.iter().find(|(k, _)| k == "group").map(|(_, v)| v.clone());
            let q = HQuery::Replay {
                from,
                to,
                step,
                group: group.clone(),
            };
            match ask_history(shard, q).await? {
                Answer::Replay(points) => Response::json(
                    200,
                    &serde_json::json!({"from": from, "to": to, "step": step, "group": group, "points": points}),
                ),
                _ => Response::error(500, "unexpected history answer"),
            }
        }
        ["replay", "at"] => {
            need(read, "GET")?;
            let p = params(query, &["t", "group", "limit"])?;
            let t = match p.iter().find(|(k, _)| k == "t") {
                None => return Err(Response::error(400, "t (ms since the epoch) is required")),
                Some((_, v)) => match v.parse::<u64>() {
                    Ok(t) => t,
                    Err(_) => return Err(Response::error(400, "t must be ms since the epoch")),
                },
            };
            let (limit, _) = page_args(&p, 100, shard.cfg.admin.max_page)?;
            let group = p.iter().find(|(k, _)| k == "group").map(|(_, v)| v.clone());
            let q = HQuery::At {
                t,
                group: group.clone(),
                limit,
            };
            match ask_history(shard, q).await? {
                Answer::At { users, total } => Response::json(
                    200,
                    &serde_json::json!({
                        "t": t, "group": group, "users": users, "total": total,
                        "lookback_h": shard.cfg.history.replay_lookback_h,
                    }),
                ),
                _ => Response::error(500, "unexpected history answer"),
            }
        }
        _ => Response::error(404, "not found"),
    })
}
