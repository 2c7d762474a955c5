//! Reading: one partition at a time (a user's day, an hour's bucket, a day of samples), paged, in
//! order, stopping at the limit; the partitions a range visits are bounded by the retention.

use ::scylla::client::pager::TypedRowStream;
use ::scylla::client::session::Session;
use ::scylla::deserialize::row::DeserializeRow;
use ::scylla::serialize::row::SerializeRow;
use ::scylla::statement::prepared::PreparedStatement;
use futures_util::future::try_join_all;
use futures_util::stream::{Stream, StreamExt};

use super::rows::{ts, EventOut, SampleOut, SessionOut};
use super::ScyllaStore;
use crate::history::event::{HistoryEvent, Sample};
use crate::history::schema::SESSION_BUCKETS;
use crate::history::store::StoreError;
use crate::shard::now_ms;

/// Reads look this far past now (clocks of servers and cluster disagree a little).
const SKEW_MS: u64 = 3_600_000;
const DAY_MS: u64 = 86_400_000;
const HOUR_MS: u64 = 3_600_000;

/// The partitions (units of `unit_ms`) a read of `[from, to]` visits, oldest first: `to` is
/// capped at now (plus skew), and at most `max_units` of the newest are kept (older rows have
/// expired). `None` when the range is empty.
fn span(from: u64, to: u64, unit_ms: u64, max_units: u64) -> Option<(u64, u64)> {
    let to = to.min(now_ms() + SKEW_MS);
    if from > to {
        return None;
    }
    let last = to / unit_ms;
    let first = (from / unit_ms).max(last.saturating_sub(max_units.saturating_sub(1)));
    Some((first, last))
}

fn read_error(doing: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::retry(format!("scylla: {doing}: {e}"))
}

/// Bind value of a `LIMIT ?`.
fn limit(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

async fn rows_of<R>(
    session: &Session,
    st: &PreparedStatement,
    values: impl SerializeRow,
) -> Result<TypedRowStream<R>, StoreError>
where
    R: for<'f, 'm> DeserializeRow<'f, 'm>,
{
    session
        .execute_iter(st.clone(), values)
        .await
        .map_err(|e| read_error("reading", e))?
        .rows_stream::<R>()
        .map_err(|e| read_error("reading", e))
}

impl ScyllaStore {
    fn max_days(&self) -> u64 {
        u64::from(self.retention_days) + 2
    }

    /// A user's events in `[from, to]`, a day partition at a time, at most `max`.
    pub(super) async fn events(
        &mut self,
        user: &str,
        from: u64,
        to: u64,
        max: usize,
        newest_first: bool,
    ) -> Result<Vec<HistoryEvent>, StoreError> {
        let Some((first, last)) = span(from, to, DAY_MS, self.max_days()) else {
            return Ok(Vec::new());
        };
        let (session, st) = self.ready().await?;
        let st = if newest_first {
            &st.events_desc
        } else {
            &st.events_asc
        };
        let days = (0..=last - first).map(|k| if newest_first { last - k } else { first + k });
        let mut out = Vec::new();
        for day in days {
            if out.len() >= max {
                break;
            }
            let values = (user, day as i32, ts(from), ts(to), limit(max - out.len()));
            let mut rows = rows_of::<EventOut>(session, st, values).await?;
            while let Some(row) = rows.next().await {
                out.push(row.map_err(|e| read_error("reading", e))?.into_event()?);
                if out.len() >= max {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// [`Store::samples`](crate::history::store::Store::samples).
    pub(super) async fn read_samples(
        &mut self,
        from: u64,
        to: u64,
        max: usize,
        only_group: Option<Option<&str>>,
    ) -> Result<Vec<Sample>, StoreError> {
        let Some((first, last)) = span(from, to, DAY_MS, self.max_days()) else {
            return Ok(Vec::new());
        };
        let (session, st) = self.ready().await?;
        let mut out = Vec::new();
        for day in first..=last {
            if out.len() >= max {
                break;
            }
            let values = (day as i32, ts(from), ts(to), limit(max - out.len()));
            let mut rows = rows_of::<SampleOut>(session, &st.samples, values).await?;
            while let Some(row) = rows.next().await {
                let mut sample = row.map_err(|e| read_error("reading", e))?.into_sample();
                if let Some(group) = only_group {
                    sample.keep_only(group);
                }
                out.push(sample);
                if out.len() >= max {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// [`Store::presence_between`](crate::history::store::Store::presence_between).
    pub(super) async fn read_presence(
        &mut self,
        from: u64,
        to: u64,
        max: usize,
    ) -> Result<Vec<HistoryEvent>, StoreError> {
        let Some((first, last)) = span(from, to, HOUR_MS, self.max_days() * 24) else {
            return Ok(Vec::new());
        };
        let (session, st) = self.ready().await?;
        let mut out = Vec::new();
        for hour in first..=last {
            if out.len() >= max {
                break;
            }
            // The hour's buckets (asked at once: SESSION_BUCKETS requests in flight), each in
            // time order, merged.
            let left = limit(max - out.len());
            let mut streams = try_join_all((0..SESSION_BUCKETS as i32).map(|bucket| {
                let values = (hour as i64, bucket, ts(from), ts(to), left);
                rows_of::<SessionOut>(session, &st.sessions, values)
            }))
            .await?;
            merge(&mut streams, &mut out, max).await?;
        }
        Ok(out)
    }
}

/// Merges streams ordered by (ts, n) into `out`, until they end or `out` holds `max`.
async fn merge<S, E>(
    streams: &mut [S],
    out: &mut Vec<HistoryEvent>,
    max: usize,
) -> Result<(), StoreError>
where
    S: Stream<Item = Result<SessionOut, E>> + Unpin,
    E: std::fmt::Display,
{
    let mut heads: Vec<Option<SessionOut>> = Vec::with_capacity(streams.len());
    for s in streams.iter_mut() {
        heads.push(
            s.next()
                .await
                .transpose()
                .map_err(|e| read_error("reading", e))?,
        );
    }
    while out.len() < max {
        let Some(i) = (0..heads.len())
            .filter(|&i| heads[i].is_some())
            .min_by_key(|&i| heads[i].as_ref().map(|r| (r.ts, r.n)))
        else {
            break;
        };
        let next = streams[i]
            .next()
            .await
            .transpose()
            .map_err(|e| read_error("reading", e))?;
        let row = std::mem::replace(&mut heads[i], next).expect("picked a present head");
        out.push(EventOut::from(row).into_event()?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_are_bounded_and_end_at_now() {
        let now = now_ms();
        assert_eq!(span(5, 1, DAY_MS, 10), None);
        assert_eq!(span(0, DAY_MS - 1, DAY_MS, 10), Some((0, 0)));
        let (first, last) = span(0, u64::MAX, DAY_MS, 32).unwrap();
        assert_eq!(last, (now + SKEW_MS) / DAY_MS);
        assert_eq!(last - first + 1, 32);
    }

    fn row(ts_ms: i64, n: i64) -> SessionOut {
        SessionOut {
            user_id: format!("u{ts_ms}-{n}"),
            ts: ::scylla::value::CqlTimestamp(ts_ms),
            n,
            kind: "session_start".into(),
            session: Some(1),
            started_at: None,
            device: None,
            device_type: None,
            region: None,
            groups: None,
            status: None,
        }
    }

    fn merged(buckets: &[&[(i64, i64)]], max: usize) -> Vec<(u64, String)> {
        let mut streams: Vec<_> = buckets
            .iter()
            .map(|b| {
                let rows: Vec<Result<SessionOut, &str>> =
                    b.iter().map(|&(t, n)| Ok(row(t, n))).collect();
                futures_util::stream::iter(rows)
            })
            .collect();
        let mut out = Vec::new();
        futures_lite::future::block_on(merge(&mut streams, &mut out, max)).unwrap();
        out.into_iter()
            .map(|e| (e.ts, e.user.to_string()))
            .collect()
    }

    #[test]
    fn buckets_merge_in_time_then_n_order_up_to_the_limit() {
        let a: &[(i64, i64)] = &[(1, 5), (4, 1), (9, 0)];
        let b: &[(i64, i64)] = &[(1, 2), (4, 7)];
        let c: &[(i64, i64)] = &[];
        let all = merged(&[a, b, c], 100);
        let order: Vec<&str> = all.iter().map(|(_, u)| u.as_str()).collect();
        assert_eq!(order, ["u1-2", "u1-5", "u4-1", "u4-7", "u9-0"]);
        assert_eq!(merged(&[a, b, c], 3).len(), 3, "stops at the limit");
        assert!(merged(&[c, c], 10).is_empty());
    }
}
