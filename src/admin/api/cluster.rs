//! Cluster-wide answers (SPEC §12, docs/CLUSTER.md "Admin"): a route asked on one node asks the
//! other live nodes the same question over the bus (request/reply, `admin.query_timeout_ms`
//! each) and merges their answers with its own. A node that does not answer in time is named in
//! `nodes_missing`, never silently left out.
//!
//! The other nodes answer in [`Scope::Node`]: for their own sessions only, so that the merge
//! counts each session once. The bus is trusted: a node answers any admin question that
//! reaches it on `{prefix}.admin.{node}`, so the NATS subjects must be protected (CLUSTER.md,
//! "Security").

use std::rc::Rc;
use std::time::Duration;

use serde_json::{json, Map, Value};

use super::super::http::{Method, Response};
use crate::admin::AdminLocal;
use crate::cluster::{AdminAnswer, AdminCall, Scattered};
use crate::shard::Shard;

/// Whose sessions an answer covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// This node's (a question from another node, or no cluster).
    Node,
    /// The whole cluster's (a question from an operator, on a cluster node).
    Cluster,
}

/// The scope of a request that came in on this node's admin port.
pub fn scope_of(shard: &Shard) -> Scope {
    match AdminLocal::of(shard).cluster {
        Some(_) => Scope::Cluster,
        None => Scope::Node,
    }
}

/// Asks the other live nodes (or only `only`) `method path?query`, as `by`. `None` outside a
/// cluster scope.
pub async fn others(
    shard: &Shard,
    scope: Scope,
    method: &str,
    path: String,
    query: &str,
    by: &str,
    only: Option<String>,
) -> Option<Scattered> {
    if scope != Scope::Cluster {
        return None;
    }
    let status = AdminLocal::of(shard).cluster.clone()?;
    let call = AdminCall {
        method: method.into(),
        path,
        query: query.into(),
        by: by.into(),
    };
    let deadline = Duration::from_millis(shard.cfg().admin.query_timeout_ms);
    Some(status.scatter(call, only, deadline).await)
}

/// This node's id in a cluster.
pub fn node_id(shard: &Shard) -> Option<String> {
    AdminLocal::of(shard)
        .cluster
        .as_ref()
        .map(|c| c.node_id.clone())
}

/// Answers another node's question (on shard 0), in [`Scope::Node`]: the bridge's
/// [`LocalAdmin`](crate::cluster::LocalAdmin).
pub fn serve_call(shard: &Rc<Shard>, call: AdminCall, tx: flume::Sender<AdminAnswer>) {
    let shard = shard.clone();
    glommio::spawn_local(async move {
        let method = match call.method.as_str() {
            "GET" => Method::Get,
            "POST" => Method::Post,
            _ => Method::Other,
        };
        let segs: Vec<&str> = call.path.trim_start_matches('/').split('/').collect();
        let resp = match segs.as_slice() {
            ["api", rest @ ..] => {
                let by: crate::auth::Identity = format!("{} (via the cluster)", call.by).into();
                super::api(&shard, method, rest, &call.query, by, Scope::Node)
                    .await
                    .unwrap_or_else(|e| e)
            }
            _ => Response::error(404, "not found"),
        };
        let body = serde_json::from_slice(&resp.body).unwrap_or(Value::Null);
        let _ = tx.send(AdminAnswer {
            code: resp.status,
            body,
        });
    })
    .detach();
}

/// The answers with status 200, with the node that gave each.
pub fn ok_bodies(s: &Scattered) -> impl Iterator<Item = (&str, &Value)> {
    s.answers
        .iter()
        .filter(|(_, a)| a.code == 200)
        .map(|(n, a)| (n.as_str(), &a.body))
}

/// `/api/users/{id}` over the cluster: every node's sessions (each with its `node`), and the
/// aggregate recomputed over all of them. `None`: nobody knows the user.
pub fn merge_user(me: &str, local: Option<Value>, remote: &Scattered) -> Option<Value> {
    let mut parts: Vec<(&str, Value)> = Vec::new();
    if let Some(l) = local {
        parts.push((me, l));
    }
    parts.extend(ok_bodies(remote).map(|(n, b)| (n, b.clone())));
    let (_, mut base) = parts.first().cloned()?;
    let mut sessions = Vec::new();
    for (node, body) in &parts {
        for s in body["sessions"].as_array().into_iter().flatten() {
            let mut s = s.clone();
            s["node"] = json!(node);
            sessions.push(s);
        }
    }
    // The aggregate of every visible session: the highest status, its text, the count.
    let rank = |s: &str| ["away", "busy", "online"].iter().position(|r| *r == s);
    let visible: Vec<&Value> = sessions
        .iter()
        .filter(|s| s["status"].as_str().and_then(rank).is_some())
        .collect();
    let best = visible
        .iter()
        .max_by_key(|s| s["status"].as_str().and_then(rank));
    base["status"] = json!(best.map_or("offline", |s| s["status"].as_str().unwrap_or("offline")));
    base["text"] = best.map_or(Value::Null, |s| s["text"].clone());
    base["devices"] = json!(visible.len());
    base["watchers"] = json!(parts
        .iter()
        .map(|(_, b)| b["watchers"].as_u64().unwrap_or(0))
        .sum::<u64>());
    base["sessions"] = Value::Array(sessions);
    base["nodes_missing"] = json!(remote.missing);
    Some(base)
}

/// Kicks over the cluster: every node's count added up, per node, and who did not answer.
pub fn merge_kicks(me: &str, local: usize, remote: &Scattered) -> Value {
    let mut per_node = Map::new();
    per_node.insert(me.into(), json!(local));
    let mut total = local;
    for (node, body) in ok_bodies(remote) {
        let n = body["kicked"].as_u64().unwrap_or(0) as usize;
        total += n;
        per_node.insert(node.into(), json!(n));
    }
    // A node that found no session answers 404: it kicked nothing.
    for (node, a) in &remote.answers {
        if a.code == 404 {
            per_node.insert(node.clone(), json!(0));
        }
    }
    json!({"kicked": total, "nodes": per_node, "nodes_missing": remote.missing})
}

/// `/api/online` pages of every node, each for its own sessions, as one page: a user on several
/// nodes is one row (devices added up, the highest status), sorted by id, the first `limit`;
/// `total` adds up each node's count (a user with sessions on two nodes counts on both).
pub fn merge_online(pages: Vec<Value>, limit: usize) -> (Vec<Value>, u64, bool) {
    let rank = |s: &Value| {
        ["offline", "away", "busy", "online"]
            .iter()
            .position(|r| s.as_str() == Some(r))
    };
    let mut total = 0;
    let mut more = false;
    let mut rows: std::collections::BTreeMap<String, Value> = Default::default();
    for p in pages {
        total += p["total"].as_u64().unwrap_or(0);
        more |= !p["next_cursor"].is_null();
        for row in p["users"].as_array().into_iter().flatten() {
            let Some(user) = row["user"].as_str() else {
                continue;
            };
            match rows.get_mut(user) {
                None => {
                    rows.insert(user.to_owned(), row.clone());
                }
                Some(held) => {
                    let devices = held["devices"].as_u64().unwrap_or(0)
                        + row["devices"].as_u64().unwrap_or(0);
                    if rank(&row["status"]) > rank(&held["status"]) {
                        held["status"] = row["status"].clone();
                        held["text"] = row["text"].clone();
                    }
                    held["devices"] = json!(devices);
                    for list in ["groups", "device_types", "regions"] {
                        let mut all: Vec<Value> =
                            held[list].as_array().cloned().unwrap_or_default();
                        for v in row[list].as_array().into_iter().flatten() {
                            if !all.contains(v) {
                                all.push(v.clone());
                            }
                        }
                        all.sort_by(|a, b| a.as_str().cmp(&b.as_str()));
                        held[list] = Value::Array(all);
                    }
                }
            }
        }
    }
    let mut rows: Vec<Value> = rows.into_values().collect();
    if rows.len() > limit {
        rows.truncate(limit);
        more = true;
    }
    (rows, total, more)
}

/// `/api/groups/{g}` pages of every node as one: each member once (the row from the node that
/// saw its latest change), sorted, the first `limit`. The counts are exact when the whole
/// group fits in the page; otherwise they add up each node's counts (`counts_exact: false`).
pub fn merge_group(pages: Vec<Value>, limit: usize) -> Option<Value> {
    let mut base = pages.first()?.clone();
    let mut more = false;
    let mut rows: std::collections::BTreeMap<String, Value> = Default::default();
    let mut summed = [0u64; 3];
    for p in &pages {
        more |= !p["next_cursor"].is_null();
        for (i, k) in ["online", "away", "busy"].iter().enumerate() {
            summed[i] += p["counts"][k].as_u64().unwrap_or(0);
        }
        for m in p["members"].as_array().into_iter().flatten() {
            let Some(user) = m["user"].as_str() else {
                continue;
            };
            let newer = rows
                .get(user)
                .is_none_or(|h| m["ts"].as_u64() > h["ts"].as_u64());
            if newer {
                rows.insert(user.to_owned(), m.clone());
            }
        }
    }
    let mut members: Vec<Value> = rows.into_values().collect();
    if members.len() > limit {
        members.truncate(limit);
        more = true;
    }
    let exact = !more;
    let counts = if exact {
        let count = |s: &str| members.iter().filter(|m| m["status"] == s).count();
        [count("online"), count("away"), count("busy")].map(|n| n as u64)
    } else {
        summed
    };
    base["counts"] = json!({"online": counts[0], "away": counts[1], "busy": counts[2]});
    base["total"] = json!(counts.iter().sum::<u64>());
    base["counts_exact"] = json!(exact);
    base["next_cursor"] = match (more, members.last()) {
        (true, Some(m)) => json!(super::encode_cursor(m["user"].as_str().unwrap_or_default())),
        _ => Value::Null,
    };
    base["members"] = Value::Array(members);
    Some(base)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::AdminAnswer;

    fn answered(node: &str, code: u16, body: Value) -> (String, AdminAnswer) {
        (node.into(), AdminAnswer { code, body })
    }

    #[test]
    fn a_user_over_nodes_has_every_session_and_one_aggregate() {
        let local = json!({"user":"u","status":"away","devices":1,"watchers":2,
            "sessions":[{"id":"1","status":"away","text":"a"}]});
        let remote = Scattered {
            answers: vec![
                answered(
                    "b",
                    200,
                    json!({"user":"u","status":"busy","devices":2,"watchers":1,
                    "sessions":[{"id":"1","status":"busy","text":"b"},
                                {"id":"2","status":"invisible","text":null}]}),
                ),
                answered("c", 404, json!({"error":"not_found"})),
            ],
            missing: vec!["d".into()],
        };
        let v = merge_user("a", Some(local), &remote).unwrap();
        assert_eq!(v["status"], "busy");
        assert_eq!(v["text"], "b");
        assert_eq!(v["devices"], 2, "the invisible session is not a device");
        assert_eq!(v["watchers"], 3);
        let nodes: Vec<&str> = v["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["node"].as_str().unwrap())
            .collect();
        assert_eq!(nodes, ["a", "b", "b"]);
        assert_eq!(v["nodes_missing"], json!(["d"]));
        assert!(merge_user("a", None, &Scattered::default()).is_none());
    }

    #[test]
    fn kicks_add_up_and_name_who_did_not_answer() {
        let remote = Scattered {
            answers: vec![
                answered("b", 200, json!({"user":"u","kicked":2})),
                answered("c", 404, json!({})),
            ],
            missing: vec!["d".into()],
        };
        let v = merge_kicks("a", 1, &remote);
        assert_eq!(v["kicked"], 3);
        assert_eq!(v["nodes"], json!({"a":1,"b":2,"c":0}));
        assert_eq!(v["nodes_missing"], json!(["d"]));
    }

    #[test]
    fn online_pages_merge_one_row_per_user_in_id_order() {
        let a = json!({"total":2,"next_cursor":null,"users":[
            {"user":"x","status":"away","devices":1,"groups":["g"],"device_types":["web"],"regions":[]},
            {"user":"z","status":"online","devices":1,"groups":[],"device_types":["ios"],"regions":[]}]});
        let b = json!({"total":1,"next_cursor":null,"users":[
            {"user":"x","status":"busy","text":"t","devices":2,"groups":["h"],"device_types":["ios"],"regions":["eu"]}]});
        let (rows, total, more) = merge_online(vec![a, b], 10);
        assert_eq!((total, more), (3, false));
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0]["user"], "x");
        assert_eq!(
            (&rows[0]["status"], &rows[0]["devices"]),
            (&json!("busy"), &json!(3))
        );
        assert_eq!(rows[0]["groups"], json!(["g", "h"]));
        assert_eq!(rows[0]["device_types"], json!(["ios", "web"]));
        let (rows, _, more) = merge_online(vec![rows_page(&["a", "b", "c"])], 2);
        assert_eq!((rows.len(), more), (2, true));
    }

    fn rows_page(users: &[&str]) -> Value {
        let users: Vec<Value> = users
            .iter()
            .map(|u| json!({"user":u,"status":"online","devices":1}))
            .collect();
        json!({"total": users.len(), "next_cursor": null, "users": users})
    }

    #[test]
    fn group_pages_merge_each_member_once_with_its_latest_row() {
        let a = json!({"group":"g","total":2,"counts":{"online":2,"away":0,"busy":0},"next_cursor":null,
            "members":[{"user":"x","status":"online","ts":5},{"user":"y","status":"online","ts":1}]});
        let b = json!({"group":"g","total":1,"counts":{"online":0,"away":1,"busy":0},"next_cursor":null,
            "members":[{"user":"x","status":"away","ts":9}]});
        let v = merge_group(vec![a, b], 10).unwrap();
        assert_eq!(v["members"][0]["status"], "away", "the latest change wins");
        assert_eq!(v["counts"], json!({"online":1,"away":1,"busy":0}));
        assert_eq!((&v["total"], &v["counts_exact"]), (&json!(2), &json!(true)));
        let v = merge_group(vec![v.clone(), v], 1).unwrap();
        assert_eq!(v["counts_exact"], false);
        assert!(v["next_cursor"].is_string());
        assert!(merge_group(Vec::new(), 1).is_none());
    }
}
