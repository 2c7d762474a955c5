//! The history routes (`/api/history`, `/api/analytics`, `/api/replay`, `/api/replay/at`):
//! questions for the history thread, answered within `admin.query_timeout_ms`.

use std::time::Duration;

use serde::Serialize;

use super::params::{get, page_args, params, segment, time_range};
use crate::admin::http::digits;
use crate::admin::http::Response;
use crate::admin::AdminLocal;
use crate::history::{Answer, Query as HQuery};
use crate::shard::Shard;

/// Points one replay may return.
const MAX_REPLAY_POINTS: u64 = 10_000;
/// The longest replay step.
const MAX_REPLAY_STEP_MS: u64 = 31 * 86_400_000;

/// Asks the history thread, within `admin.query_timeout_ms`.
async fn ask_history(shard: &Shard, q: HQuery) -> Result<Answer, Response> {
    let history = &AdminLocal::of(shard).history;
    if !history.enabled() {
        return Err(Response::error_as(
            503,
            "history_off",
            "history is off (history.backend = \"off\")",
        ));
    }
    let rx = history
        .ask(q)
        .ok_or_else(|| Response::error(503, "history is busy: too many queries waiting"))?;
    let wait = Duration::from_millis(shard.cfg().admin.query_timeout_ms);
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

/// `/api/history/{user}`: the user's recorded changes in a time range.
pub async fn history(shard: &Shard, id: &str, query: &str) -> Result<Response, Response> {
    let user = user_id(id)?;
    let p = params(query, &["from", "to", "limit"])?;
    let (from, to) = time_range(&p)?;
    let (limit, _) = page_args(&p, 100, shard.cfg().admin.max_page)?;
    let q = HQuery::History {
        user: user.clone(),
        from,
        to,
        limit,
    };
    match ask_history(shard, q).await? {
        Answer::Events(events) => Ok(Response::json(
            200,
            &serde_json::json!({"user": user, "from": from, "to": to, "events": events}),
        )),
        _ => Err(unexpected()),
    }
}

/// `/api/analytics/{user}`: time online and per status over a time range.
pub async fn analytics(shard: &Shard, id: &str, query: &str) -> Result<Response, Response> {
    let user = user_id(id)?;
    let (from, to) = time_range(&params(query, &["from", "to"])?)?;
    let q = HQuery::Analytics {
        user: user.clone(),
        from,
        to,
    };
    match ask_history(shard, q).await? {
        Answer::Analytics(a) => {
            #[derive(Serialize)]
            struct Body<'a> {
                user: &'a str,
                #[serde(flatten)]
                a: &'a crate::history::analytics::Analytics,
            }
            Ok(Response::json(200, &Body { user: &user, a: &a }))
        }
        _ => Err(unexpected()),
    }
}

/// `/api/replay`: online counts sampled over a time range.
pub async fn replay(shard: &Shard, query: &str) -> Result<Response, Response> {
    let p = params(query, &["from", "to", "step", "group"])?;
    let (from, to) = time_range(&p)?;
    let step = match get(&p, "step") {
        None => shard.cfg().history.sample_interval_s * 1000,
        Some(v) => match digits::<u64>(v) {
            Some(n) if n > 0 => n,
            _ => return Err(Response::error(400, "step must be a positive number of ms")),
        },
    };
    if step > MAX_REPLAY_STEP_MS {
        let msg = format!("step must be at most {MAX_REPLAY_STEP_MS} ms (31 days)");
        return Err(Response::error(400, &msg));
    }
    if (to - from) / step > MAX_REPLAY_POINTS {
        let msg = format!("at most {MAX_REPLAY_POINTS} points: widen step or narrow from/to");
        return Err(Response::error(400, &msg));
    }
    let group = get(&p, "group").map(str::to_owned);
    let q = HQuery::Replay {
        from,
        to,
        step,
        group: group.clone(),
    };
    match ask_history(shard, q).await? {
        Answer::Replay(points) => Ok(Response::json(
            200,
            &serde_json::json!({"from": from, "to": to, "step": step, "group": group, "points": points}),
        )),
        _ => Err(unexpected()),
    }
}

/// `/api/replay/at`: who was online at one instant.
pub async fn replay_at(shard: &Shard, query: &str) -> Result<Response, Response> {
    let p = params(query, &["t", "group", "limit"])?;
    let t = match get(&p, "t") {
        None => return Err(Response::error(400, "t (ms since the epoch) is required")),
        Some(v) => {
            digits::<u64>(v).ok_or_else(|| Response::error(400, "t must be ms since the epoch"))?
        }
    };
    let (limit, _) = page_args(&p, 100, shard.cfg().admin.max_page)?;
    let group = get(&p, "group").map(str::to_owned);
    let q = HQuery::At {
        t,
        group: group.clone(),
        limit,
    };
    match ask_history(shard, q).await? {
        Answer::At { users, total } => Ok(Response::json(
            200,
            &serde_json::json!({
                "t": t, "group": group, "users": users, "total": total,
                "lookback_h": shard.cfg().history.replay_lookback_h,
            }),
        )),
        _ => Err(unexpected()),
    }
}

fn user_id(segment_text: &str) -> Result<String, Response> {
    segment(segment_text).ok_or_else(|| Response::error(400, "bad user id"))
}

/// The history thread answered a question with another question's answer (a bug).
fn unexpected() -> Response {
    Response::error(500, "unexpected history answer")
}
