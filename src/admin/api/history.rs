//! The history routes (`/api/history`, `/api/analytics`, `/api/replay`, `/api/replay/at`):
//! questions for the history thread, answered within `admin.query_timeout_ms`.

use std::time::Duration;

use serde::Serialize;

use super::params::{number, page_args, params, segment, time_range};
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

/// Whether `segs` (after `/api/`) is a history route.
pub fn is_route(segs: &[&str]) -> bool {
    matches!(
        segs,
        ["history", _] | ["analytics", _] | ["replay"] | ["replay", "at"]
    )
}

/// Answers a history route (`segs` after `/api/`, see [`is_route`]).
pub async fn route(
    shard: &Shard,
    read: bool,
    segs: &[&str],
    query: &str,
) -> Result<Response, Response> {
    let need = |ok: bool, which: &str| {
        if ok {
            Ok(())
        } else {
            Err(Response::error(405, &format!("use {which}")))
        }
    };
    need(read, "GET")?;
    Ok(match segs {
        ["history", id] | ["analytics", id] => {
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
                let (limit, _) = page_args(&p, 100, shard.cfg().admin.max_page)?;
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
            let p = params(query, &["from", "to", "step", "group"])?;
            let (from, to) = time_range(&p)?;
            let default_step = shard.cfg().history.sample_interval_s * 1000;
            let step = match p.iter().find(|(k, _)| k == "step") {
                None => default_step,
                Some((_, v)) => match number(v) {
                    Some(n) if n > 0 => n,
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
            let p = params(query, &["t", "group", "limit"])?;
            let t = match p.iter().find(|(k, _)| k == "t") {
                None => return Err(Response::error(400, "t (ms since the epoch) is required")),
                Some((_, v)) => match number(v) {
                    Some(t) => t,
                    None => return Err(Response::error(400, "t must be ms since the epoch")),
                },
            };
            let (limit, _) = page_args(&p, 100, shard.cfg().admin.max_page)?;
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
                        "lookback_h": shard.cfg().history.replay_lookback_h,
                    }),
                ),
                _ => Response::error(500, "unexpected history answer"),
            }
        }
        _ => Response::error(404, "not found"),
    })
}
