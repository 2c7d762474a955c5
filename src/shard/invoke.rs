//! The one door into every shard (Seastar's `invoke_on` and `map_reduce`).
//!
//! A driver that needs something from a shard other than the one it runs on sends a job: a
//! closure that runs on the target shard's thread with that [`Shard`], between two mesh
//! messages, so it sees the shard's state whole. Its answer comes back over a one-shot channel,
//! within a deadline. A new admin question is a new closure where it is asked, not a new
//! message type here.
//!
//! Jobs may be synchronous ([`Shard::invoke_on`], [`Shard::map_reduce`]) or asynchronous
//! ([`Shard::map_reduce_async`]) when they walk large state in chunks and yield between them,
//! so a scan never holds a shard's event loop for long.
//!
//! A job that panics is contained: the panic is counted (`invoke_panics`), logged, and the
//! asker gets no answer for that shard (as if it timed out). Jobs are driver code — read-only
//! questions, kicks that only ask sessions to close, and socket hand-offs whose only change to
//! the shard goes through [`Shard::open_session`], which repairs a panic of its own — so a panic
//! inside one cannot leave a half-applied change.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_lite::FutureExt;

use super::mesh::{Job, MeshMsg};
use super::Shard;
use crate::metrics::ShardMetrics;
use crate::presence::watchers::ShardIx;

/// Which shards answered a question in time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answered {
    pub asked: usize,
    /// Shards that did not answer by the deadline (stuck, stopping, or their job panicked).
    pub missing: Vec<ShardIx>,
}

impl Answered {
    pub fn complete(&self) -> bool {
        self.missing.is_empty()
    }
}

impl Shard {
    /// Runs a job sent by another shard (or by this one, through its own inbox).
    pub(super) fn run_job(self: &Rc<Self>, job: Job) {
        if std::panic::catch_unwind(AssertUnwindSafe(|| job(self))).is_err() {
            ShardMetrics::inc(&self.metrics.invoke_panics);
            tracing::error!(
                shard = self.ix,
                "a job sent to this shard panicked; it was dropped"
            );
        }
    }

    /// Sends `job` to shard `to` over the mesh (a state message: never dropped).
    pub fn send_job(&self, to: ShardIx, job: Job) {
        self.mesh.send(to, MeshMsg::Invoke(job));
    }

    /// Runs `f` on shard `to` and returns its answer, or `None` past `deadline`.
    pub async fn invoke_on<R, F>(&self, to: ShardIx, deadline: Duration, f: F) -> Option<R>
    where
        R: Send + 'static,
        F: FnOnce(&Rc<Shard>) -> R + Send + 'static,
    {
        let (mut answers, _) = self.map_each(vec![(to, f)], deadline).await;
        answers.pop().map(|(_, r)| r)
    }

    /// Runs `f` on every shard and folds the answers that arrive by `deadline`, in shard order.
    pub async fn map_reduce<R, F, A>(
        &self,
        deadline: Duration,
        f: F,
        init: A,
        mut reduce: impl FnMut(A, ShardIx, R) -> A,
    ) -> (A, Answered)
    where
        R: Send + 'static,
        F: Fn(&Rc<Shard>) -> R + Send + Clone + 'static,
    {
        let jobs = (0..self.shards() as ShardIx)
            .map(|ix| (ix, f.clone()))
            .collect();
        let (answers, answered) = self.map_each(jobs, deadline).await;
        let acc = answers
            .into_iter()
            .fold(init, |acc, (ix, r)| reduce(acc, ix, r));
        (acc, answered)
    }

    /// [`Shard::map_reduce`] with jobs that run as tasks on their shards.
    pub async fn map_reduce_async<R, F, Fut, A>(
        &self,
        deadline: Duration,
        f: F,
        init: A,
        mut reduce: impl FnMut(A, ShardIx, R) -> A,
    ) -> (A, Answered)
    where
        R: Send + 'static,
        F: FnOnce(Rc<Shard>) -> Fut + Send + Clone + 'static,
        Fut: Future<Output = R> + 'static,
    {
        let jobs = (0..self.shards() as ShardIx)
            .map(|ix| (ix, f.clone()))
            .collect();
        let (answers, answered) = self.map_each_async(jobs, deadline).await;
        let acc = answers
            .into_iter()
            .fold(init, |acc, (ix, r)| reduce(acc, ix, r));
        (acc, answered)
    }

    /// Sends each job to its shard; each answers once, on the reply channel it is given.
    async fn fan_out<R: Send + 'static>(
        &self,
        jobs: Vec<(ShardIx, Answering<R>)>,
        deadline: Duration,
    ) -> (Vec<(ShardIx, R)>, Answered) {
        let to: Vec<ShardIx> = jobs.iter().map(|(ix, _)| *ix).collect();
        let (tx, rx) = flume::bounded(to.len());
        for (ix, job) in jobs {
            let tx = tx.clone();
            self.send_job(ix, Box::new(move |shard: &Rc<Shard>| job(shard, tx)));
        }
        drop(tx);
        collect(rx, &to, deadline).await
    }

    async fn map_each<R, F>(
        &self,
        jobs: Vec<(ShardIx, F)>,
        deadline: Duration,
    ) -> (Vec<(ShardIx, R)>, Answered)
    where
        R: Send + 'static,
        F: FnOnce(&Rc<Shard>) -> R + Send + 'static,
    {
        let jobs = jobs
            .into_iter()
            .map(|(ix, f)| {
                let job: Answering<R> = Box::new(move |shard, tx| {
                    // The asker may have given up (deadline): nothing to do then.
                    let _ = tx.try_send((shard.ix, f(shard)));
                });
                (ix, job)
            })
            .collect();
        self.fan_out(jobs, deadline).await
    }

    async fn map_each_async<R, F, Fut>(
        &self,
        jobs: Vec<(ShardIx, F)>,
        deadline: Duration,
    ) -> (Vec<(ShardIx, R)>, Answered)
    where
        R: Send + 'static,
        F: FnOnce(Rc<Shard>) -> Fut + Send + 'static,
        Fut: Future<Output = R> + 'static,
    {
        let jobs = jobs
            .into_iter()
            .map(|(ix, f)| {
                let job: Answering<R> = Box::new(move |shard, tx| {
                    let (ix, metrics) = (shard.ix, shard.metrics.clone());
                    let answer = AssertUnwindSafe(f(shard.clone())).catch_unwind();
                    glommio::spawn_local(async move {
                        match answer.await {
                            Ok(r) => {
                                let _ = tx.try_send((ix, r));
                            }
                            Err(_) => {
                                ShardMetrics::inc(&metrics.invoke_panics);
                                tracing::error!(shard = ix, "an asynchronous job panicked");
                            }
                        }
                    })
                    .detach();
                });
                (ix, job)
            })
            .collect();
        self.fan_out(jobs, deadline).await
    }
}

/// A job that answers on the channel it is given.
type Answering<R> = Box<dyn FnOnce(&Rc<Shard>, flume::Sender<(ShardIx, R)>) + Send>;

/// Answers from `rx` until every shard in `to` answered or `deadline` passed; sorted by shard.
async fn collect<R>(
    rx: flume::Receiver<(ShardIx, R)>,
    to: &[ShardIx],
    deadline: Duration,
) -> (Vec<(ShardIx, R)>, Answered) {
    let until = Instant::now() + deadline;
    let mut out: Vec<(ShardIx, R)> = Vec::with_capacity(to.len());
    while out.len() < to.len() {
        let wait = until.saturating_duration_since(Instant::now());
        let next = futures_lite::future::or(async { rx.recv_async().await.ok() }, async {
            glommio::timer::sleep(wait).await;
            None
        })
        .await;
        match next {
            Some(answer) => out.push(answer),
            None => break, // out of time, or every job was dropped (stopping, panicked)
        }
    }
    out.sort_unstable_by_key(|(ix, _)| *ix);
    let missing = to
        .iter()
        .copied()
        .filter(|ix| out.binary_search_by_key(ix, |(i, _)| *i).is_err())
        .collect();
    (
        out,
        Answered {
            asked: to.len(),
            missing,
        },
    )
}

/// Lets the shard's other tasks and its I/O run before going on: a long scan calls this
/// between chunks. (A zero-length sleep would complete at once; a one-microsecond timer only
/// fires once the reactor polls, which it does after the ready tasks have run.)
pub async fn yield_to_io() {
    glommio::timer::sleep(Duration::from_micros(1)).await;
}
