//! Routes of the admin port. Each question to the shards is a closure given to the shard's
//! `invoke_on`/`map_reduce` ([`ask`]), written here where it is asked.
//!
//! - [`auth`]: admin credentials → identity, or 401/403.
//! - [`ask`]: the map-reduce over shards with the admin deadline (a late shard is named in a 503).
//! - [`params`]: query parameters and path segments → typed values, or 400.
//! - [`stats`]: `/api/stats` and `/metrics`.
//! - [`history`]: the history routes.
//! - [`webhooks`]: `/api/webhooks`, each webhook's health.

pub mod ask;
pub mod auth;
pub mod cluster;
pub mod history;
pub mod params;
pub mod stats;
pub mod webhooks;

use std::rc::Rc;

use serde::Serialize;

use super::http::{Method, Response};
use super::query::{self, merge_online, GroupQuery, Kicked, OnlineRow};
use crate::auth::Identity;
use crate::metrics::ShardMetrics;
use crate::presence::watchers::ShardIx;
use crate::presence::SessionId;
use crate::presence::UserId;
use crate::shard::{now_ms, Shard};
pub use auth::authenticate;
use cluster::Scope;
use params::{page_args, params, parse_online, segment};
pub use query::encode_cursor;
pub use stats::stats;

#[derive(Serialize)]
struct OnlineBody {
    users: Vec<OnlineRow>,
    total: u64,
    next_cursor: Option<String>,
}

/// Answers one request. `bearer`: the credential presented (header, or the feed's auth).
pub async fn route(
    shard: &Rc<Shard>,
    method: Method,
    path: &str,
    query: &str,
    bearer: Option<&str>,
) -> Response {
    ShardMetrics::inc(&shard.metrics().admin_requests);
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let read = matches!(method, Method::Get | Method::Head);
    let open_metrics = !shard.cfg().admin.protect_metrics;
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
                    let shared = shard.shared();
                    let ready = shared.ready();
                    let mut body = serde_json::json!({
                        "ready": ready,
                        "shards": shared.shards(),
                        "accepting": shared.accepting.load(std::sync::atomic::Ordering::Acquire),
                    });
                    // A node without the bus still serves its own clients, so it stays ready;
                    // the body says what it is missing.
                    if let Some(c) = &crate::admin::AdminLocal::of(shard).cluster {
                        body["cluster"] = serde_json::json!({
                            "node": c.node_id,
                            "bus": c.bus().as_str(),
                            "why": c.why(),
                            "nodes": c.nodes().len() + 1,
                        });
                    }
                    Response::json(if ready { 200 } else { 503 }, &body)
                }
                _ => stats::metrics(shard).await.unwrap_or_else(|e| e),
            }
        }
        ["api", rest @ ..] => {
            let admin = match authenticate(shard, bearer) {
                Ok(a) => a,
                Err(e) => return e,
            };
            let scope = cluster::scope_of(shard);
            api(shard, method, rest, query, admin, scope)
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

/// One API request, answered for this node's sessions or (`Scope::Cluster`) for the whole
/// cluster's ([`cluster`]).
async fn api(
    shard: &Rc<Shard>,
    method: Method,
    segs: &[&str],
    query: &str,
    admin: Identity,
    scope: Scope,
) -> Result<Response, Response> {
    let path = format!("/api/{}", segs.join("/"));
    let me = cluster::node_id(shard);
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
            let mut q = parse_online(query, shard.cfg().admin.max_page)?;
            // In a cluster every node lists the users with sessions on it, and the asker merges.
            q.filter.local = me.is_some();
            let limit = q.limit;
            let pages = ask::all_async(shard, move |s| query::online_page_chunked(s, q)).await?;
            let (users, total, next) = merge_online(pages, limit);
            let body = OnlineBody {
                users,
                total,
                next_cursor: next.map(|u| encode_cursor(&u)),
            };
            match cluster::others(shard, scope, "GET", path, query, &admin, None).await {
                None => Response::json(200, &body),
                Some(remote) => {
                    let mut pages = vec![serde_json::to_value(&body).unwrap_or_default()];
                    pages.extend(cluster::ok_bodies(&remote).map(|(_, b)| b.clone()));
                    let (users, total, more) = cluster::merge_online(pages, limit);
                    let next = more
                        .then(|| {
                            users
                                .last()
                                .and_then(|u| u["user"].as_str())
                                .map(encode_cursor)
                        })
                        .flatten();
                    Response::json(
                        200,
                        &serde_json::json!({"users": users, "total": total,
                            "next_cursor": next, "nodes_missing": remote.missing}),
                    )
                }
            }
        }
        ["users", id] => {
            need(read, "GET")?;
            let Some(user) = segment(id) else {
                return Err(Response::error(400, "bad user id"));
            };
            params(query, &[])?;
            let owner = shard.owner(&user);
            let detail = ask::on(shard, owner, move |s| {
                query::user_detail(s, &user, now_ms())
            })
            .await?;
            match cluster::others(shard, scope, "GET", path, query, &admin, None).await {
                None => match detail {
                    Some(d) => Response::json(200, &d),
                    None => Response::error(404, "unknown user"),
                },
                Some(remote) => {
                    let local = detail.map(|d| serde_json::to_value(d).unwrap_or_default());
                    let me = me.unwrap_or_default();
                    match cluster::merge_user(&me, local, &remote) {
                        Some(v) => Response::json(200, &v),
                        None if remote.missing.is_empty() => Response::error(404, "unknown user"),
                        None => Response::error(
                            404,
                            &format!(
                                "unknown to the nodes that answered; not answered by {}",
                                remote.missing.join(", ")
                            ),
                        ),
                    }
                }
            }
        }
        ["users", id, "kick"] => {
            need(method == Method::Post, "POST")?;
            let Some(user) = segment(id) else {
                return Err(Response::error(400, "bad user id"));
            };
            let owner = shard.owner(&user);
            let user: UserId = user.into();
            let by = admin.clone();
            let local = ask::on(shard, owner, move |s| query::kick_user(s, &user, &by)).await?;
            match cluster::others(shard, scope, "POST", path, query, &admin, None).await {
                None => match local {
                    k if k.kicked > 0 => Response::json(200, &k),
                    _ => Response::error(404, "the user has no session"),
                },
                Some(remote) => {
                    let mut v =
                        cluster::merge_kicks(&me.unwrap_or_default(), local.kicked, &remote);
                    v["user"] = serde_json::json!(segment(id));
                    if v["kicked"] == 0 && remote.missing.is_empty() {
                        Response::error(404, "the user has no session on any node")
                    } else {
                        Response::json(200, &v)
                    }
                }
            }
        }
        ["sessions", id, "kick"] => {
            need(method == Method::Post, "POST")?;
            let Some(session) = segment(id).and_then(|s| SessionId::parse_hex(&s)) else {
                return Err(Response::error(
                    400,
                    "a session id is the hex `session` of welcome",
                ));
            };
            // Session ids are per node: `?node=` (the `node` of the session in
            // `/api/users/{id}`) sends the kick to the node that serves it.
            let p = params(query, &["node"])?;
            if let Some((_, node)) = p.iter().find(|(k, _)| k == "node") {
                if me.as_deref() != Some(node.as_str()) {
                    let Some(remote) =
                        cluster::others(shard, scope, "POST", path, "", &admin, Some(node.clone()))
                            .await
                    else {
                        return Err(Response::error(404, "no such node: not in a cluster"));
                    };
                    return Ok(match remote.answers.into_iter().next() {
                        Some((_, a)) => Response::json(a.code, &a.body),
                        None => Response::error(
                            503,
                            &format!("node {node} did not answer in time (is it live?)"),
                        ),
                    });
                }
            }
            let owner = session.shard();
            if usize::from(owner) >= shard.shards() {
                return Err(Response::error(404, "unknown session"));
            }
            let kicked = ask::on(shard, owner, move |s| {
                query::kick_session(s, session, &admin)
            })
            .await?;
            match kicked {
                Kicked {
                    user: Some(user),
                    kicked,
                } => {
                    #[derive(Serialize)]
                    struct Body {
                        session: SessionId,
                        user: UserId,
                        kicked: usize,
                    }
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
            let (limit, after) = page_args(&p, 1000, shard.cfg().admin.max_page)?;
            let owner: ShardIx = shard.owner(&group);
            let q = GroupQuery {
                group: group.as_str().into(),
                after,
                limit,
            };
            let page = ask::on(shard, owner, move |s| query::group_page(&s.groups(), &q)).await?;
            match cluster::others(shard, scope, "GET", path, query, &admin, None).await {
                None => match page {
                    Some(page) => Response::json(200, &page),
                    None => Response::error(404, "unknown group: no visible member, no subscriber"),
                },
                Some(remote) => {
                    let mut pages: Vec<serde_json::Value> = page
                        .iter()
                        .filter_map(|p| serde_json::to_value(p).ok())
                        .collect();
                    pages.extend(cluster::ok_bodies(&remote).map(|(_, b)| b.clone()));
                    match cluster::merge_group(pages, limit) {
                        Some(mut v) => {
                            v["nodes_missing"] = serde_json::json!(remote.missing);
                            Response::json(200, &v)
                        }
                        None => Response::error(
                            404,
                            "unknown group on every node that answered: no visible member, no \
                             subscriber",
                        ),
                    }
                }
            }
        }
        ["webhooks"] => {
            need(read, "GET")?;
            params(query, &[])?;
            webhooks::list(shard, scope, query, &admin).await
        }
        ["history", id] => {
            need(read, "GET")?;
            history::history(shard, id, query).await?
        }
        ["analytics", id] => {
            need(read, "GET")?;
            history::analytics(shard, id, query).await?
        }
        ["replay"] => {
            need(read, "GET")?;
            history::replay(shard, query).await?
        }
        ["replay", "at"] => {
            need(read, "GET")?;
            history::replay_at(shard, query).await?
        }
        _ => Response::error(404, "not found"),
    })
}
