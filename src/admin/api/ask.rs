//! The admin API's side of the shard's `invoke_on`/`map_reduce`: every question gets
//! `admin.query_timeout_ms`, and a shard that does not answer in time turns into a 503 that
//! names it (a scrape takes what it gets instead: `all_partial`).

use std::future::Future;
use std::rc::Rc;
use std::time::Duration;

use crate::admin::http::Response;
use crate::presence::watchers::ShardIx;
use crate::shard::invoke::Answered;
use crate::shard::Shard;

fn deadline(shard: &Shard) -> Duration {
    Duration::from_millis(shard.cfg().admin.query_timeout_ms)
}

fn unavailable(missing: &[ShardIx]) -> Response {
    let list: Vec<String> = missing.iter().map(u16::to_string).collect();
    Response::error(
        503,
        &format!("shard(s) {} did not answer in time", list.join(", ")),
    )
}

/// `f` on shard `to`.
pub async fn on<R, F>(shard: &Shard, to: ShardIx, f: F) -> Result<R, Response>
where
    R: Send + 'static,
    F: FnOnce(&Rc<Shard>) -> R + Send + 'static,
{
    shard
        .invoke_on(to, deadline(shard), f)
        .await
        .ok_or_else(|| unavailable(&[to]))
}

/// `f` on every shard: the answers in shard order, or 503 if any is missing.
pub async fn all<R, F>(shard: &Shard, f: F) -> Result<Vec<R>, Response>
where
    R: Send + 'static,
    F: Fn(&Rc<Shard>) -> R + Send + Clone + 'static,
{
    let (answers, answered) = all_partial(shard, f).await;
    if !answered.complete() {
        return Err(unavailable(&answered.missing));
    }
    Ok(answers.into_iter().map(|(_, r)| r).collect())
}

/// `f` on every shard: what arrived in time, and who did not answer.
pub async fn all_partial<R, F>(shard: &Shard, f: F) -> (Vec<(ShardIx, R)>, Answered)
where
    R: Send + 'static,
    F: Fn(&Rc<Shard>) -> R + Send + Clone + 'static,
{
    shard.map_all(deadline(shard), f).await
}

/// An asynchronous `f` (a chunked scan) on every shard, or 503 if any is missing.
pub async fn all_async<R, F, Fut>(shard: &Shard, f: F) -> Result<Vec<R>, Response>
where
    R: Send + 'static,
    F: FnOnce(Rc<Shard>) -> Fut + Send + Clone + 'static,
    Fut: Future<Output = R> + 'static,
{
    let (answers, answered) = shard.map_all_async(deadline(shard), f).await;
    if !answered.complete() {
        return Err(unavailable(&answered.missing));
    }
    Ok(answers.into_iter().map(|(_, r)| r).collect())
}
