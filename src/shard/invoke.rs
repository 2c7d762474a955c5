//! The one door into every shard (Seastar's `invoke_on` and `map_reduce`).
//!
//! A driver that needs something from a shard other than the one it runs on sends a job: a
//! closure that runs on the target shard's thread with that [`Shard`], between two mesh
//! messages, so it sees the shard's state whole. Its answer comes back over a one-shot channel,
//! within a deadline. A new admin question is a new closure where it is asked, not a new
//! message type here.
//!
//! Jobs may be synchronous ([`Shard::invoke_on`], [`Shard::map_all`], [`Shard::map_reduce`]) or
//! asynchronous ([`Shard::map_all_async`]) when they walk large state in chunks and yield
//! between them, so a scan never holds a shard's event loop for long.
//!
//! A job that panics is contained: the panic is counted (`invoke_panics`), logged, and the
//! asker gets no answer for that shard (as if it timed out). Jobs are driver code — read-only
//! questions, kicks that only ask sessions to close, and socket hand-offs whose only change to
//! the shard goes through [`Shard::open_session`], which repairs a panic of its own — so a panic
//! inside one cannot leave a half-applied change.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::rc::Rc;
use std::time::Duration;

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
            job_panicked(
                &self.metrics,
                self.ix,
                "a job sent to this shard panicked; it was dropped",
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
        let (mut answers, _) = self.fan_out(vec![(to, answer_now(f))], deadline).await;
        answers.pop().map(|(_, r)| r)
    }

    /// Runs `f` on every shard: the answers that arrive by `deadline`, in shard order.
    pub async fn map_all<R, F>(&self, deadline: Duration, f: F) -> (Vec<(ShardIx, R)>, Answered)
    where
        R: Send + 'static,
        F: Fn(&Rc<Shard>) -> R + Send + Clone + 'static,
    {
        let jobs = self.on_every_shard(|| answer_now(f.clone()));
        self.fan_out(jobs, deadline).await
    }

    /// [`Shard::map_all`] with jobs that run as tasks on their shards.
    pub async fn map_all_async<R, F, Fut>(
        &self,
        deadline: Duration,
        f: F,
    ) -> (Vec<(ShardIx, R)>, Answered)
    where
        R: Send + 'static,
        F: FnOnce(Rc<Shard>) -> Fut + Send + Clone + 'static,
        Fut: Future<Output = R> + 'static,
    {
        let jobs = self.on_every_shard(|| answer_later(f.clone()));
        self.fan_out(jobs, deadline).await
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
        let (answers, answered) = self.map_all(deadline, f).await;
        let acc = answers
            .into_iter()
            .fold(init, |acc, (ix, r)| reduce(acc, ix, r));
        (acc, answered)
    }

    /// One job per shard, in shard order.
    fn on_every_shard<R>(&self, job: impl Fn() -> Answering<R>) -> Vec<(ShardIx, Answering<R>)> {
        (0..self.shards() as ShardIx)
            .map(|ix| (ix, job()))
            .collect()
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
}

/// A job that answers on the channel it is given.
type Answering<R> = Box<dyn FnOnce(&Rc<Shard>, flume::Sender<(ShardIx, R)>) + Send>;

/// `f` as a job that answers as soon as it has run (a panic is caught by [`Shard::run_job`]).
fn answer_now<R, F>(f: F) -> Answering<R>
where
    R: Send + 'static,
    F: FnOnce(&Rc<Shard>) -> R + Send + 'static,
{
    Box::new(move |shard, tx| {
        // The asker may have given up (deadline): nothing to do then.
        let _ = tx.try_send((shard.ix, f(shard)));
    })
}

/// `f` as a job that runs as a task on its shard and answers when that task completes.
fn answer_later<R, F, Fut>(f: F) -> Answering<R>
where
    R: Send + 'static,
    F: FnOnce(Rc<Shard>) -> Fut + Send + 'static,
    Fut: Future<Output = R> + 'static,
{
    Box::new(move |shard, tx| {
        let (ix, metrics) = (shard.ix, shard.metrics.clone());
        let answer = AssertUnwindSafe(f(shard.clone())).catch_unwind();
        glommio::spawn_local(async move {
            match answer.await {
                Ok(r) => {
                    let _ = tx.try_send((ix, r));
                }
                Err(_) => job_panicked(&metrics, ix, "an asynchronous job panicked"),
            }
        })
        .detach();
    })
}

/// A job panicked on shard `ix`: counted and logged; its asker gets no answer from this shard.
fn job_panicked(metrics: &ShardMetrics, ix: ShardIx, what: &str) {
    ShardMetrics::inc(&metrics.invoke_panics);
    tracing::error!(shard = ix, "{what}");
}

/// Answers from `rx` until every shard in `to` answered or `deadline` passed; sorted by shard.
async fn collect<R>(
    rx: flume::Receiver<(ShardIx, R)>,
    to: &[ShardIx],
    deadline: Duration,
) -> (Vec<(ShardIx, R)>, Answered) {
    let mut timeout = glommio::timer::Timer::new(deadline);
    let mut out: Vec<(ShardIx, R)> = Vec::with_capacity(to.len());
    while out.len() < to.len() {
        let next = futures_lite::future::or(async { rx.recv_async().await.ok() }, async {
            (&mut timeout).await;
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
