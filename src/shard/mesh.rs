//! The mesh: one bounded `flume` inbox per shard, and a sender to every inbox on every shard.
//!
//! Messages between a pair of shards are FIFO, which is what keeps each user's events in `seq`
//! order. Sending never blocks the shard: when a peer's inbox is full, messages wait in a
//! bounded per-peer overflow queue, drained in order by a task that awaits capacity; past that
//! bound they are dropped and counted (`mesh_dropped`).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::num::NonZeroU64;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::sync::Arc;

use std::time::Instant;

use crate::admin::query::{AdminReq, AdminResp};
use crate::auth::Claims;
use crate::metrics::{PeerCounters, ShardMetrics};
use crate::presence::watchers::ShardIx;
use crate::presence::{GroupId, PresenceState, SessionId, UserId};

/// An authenticated socket on its way to the shard that owns its user.
#[derive(Debug)]
pub struct Handoff {
    pub fd: OwnedFd,
    pub peer: SocketAddr,
    pub claims: Claims,
    /// `Sec-WebSocket-Key`, answered by the owner.
    pub key: String,
    pub device: Option<String>,
    pub device_type: Option<String>,
    /// Bytes the client sent after the request head (already WebSocket frames; decrypted).
    pub early: Vec<u8>,
    /// The TLS session, when the socket came in over TLS: it moves with the descriptor.
    pub tls: Option<Box<rustls::ServerConnection>>,
    /// `?as=<user>`: a read-only impersonation of this user by the token's holder (an admin).
    pub as_user: Option<String>,
}

/// Everything shards say to each other. Owned and `Send`.
#[derive(Debug)]
pub enum MeshMsg {
    Handoff(Box<Handoff>),
    /// Connection `conn` on shard `from` subscribes to `user`; answer with `Snapshot`. `gen`
    /// names this subscription attempt, so a snapshot meant for an earlier, since-cancelled
    /// attempt is never taken for the current one.
    Watch {
        user: UserId,
        from: ShardIx,
        conn: SessionId,
        gen: NonZeroU64,
    },
    Unwatch {
        user: UserId,
        from: ShardIx,
    },
    Snapshot {
        conn: SessionId,
        gen: NonZeroU64,
        state: Arc<PresenceState>,
    },
    /// A user's aggregate changed: deliver to local subscribers. `origin`: when the owner
    /// published it (fan-out latency).
    Update {
        state: Arc<PresenceState>,
        origin: Instant,
    },
    WatchGroup {
        group: GroupId,
        from: ShardIx,
        conn: SessionId,
        gen: NonZeroU64,
    },
    UnwatchGroup {
        group: GroupId,
        from: ShardIx,
    },
    GroupSnapshot {
        conn: SessionId,
        gen: NonZeroU64,
        group: GroupId,
        members: Vec<PresenceState>,
    },
    /// To the group's owner: a member's state as seen through the group.
    GroupMember {
        group: GroupId,
        state: Arc<PresenceState>,
        origin: Instant,
    },
    /// From the group's owner to watching shards.
    GroupEvent {
        group: GroupId,
        state: Arc<PresenceState>,
        origin: Instant,
    },
    /// Ephemeral: to watchers of `user`, or to the sessions of `to`.
    Activity {
        user: UserId,
        kind: Arc<str>,
        ts: u64,
        to: Option<UserId>,
    },
    /// An admin question for this shard; the answer goes back on `reply`, tagged with the
    /// answering shard (map-reduce over the mesh, docs/ADMIN.md).
    Admin {
        req: Arc<AdminReq>,
        reply: flume::Sender<(ShardIx, AdminResp)>,
    },
    /// Stop accepting, close sessions with 1001, exit.
    Shutdown,
}

/// This shard's side of the mesh.
pub struct Mesh {
    peers: Vec<flume::Sender<MeshMsg>>,
    /// Per peer: messages waiting for room in its inbox, in send order.
    overflow: Vec<RefCell<VecDeque<MeshMsg>>>,
    /// Per peer: a drain task is running (new messages must queue behind it to stay FIFO).
    draining: Vec<Cell<bool>>,
    overflow_max: usize,
    metrics: Arc<ShardMetrics>,
    /// Messages sent to each peer.
    sent_to: Arc<PeerCounters>,
}

impl Mesh {
    pub fn new(
        peers: Vec<flume::Sender<MeshMsg>>,
        overflow_max: usize,
        metrics: Arc<ShardMetrics>,
        sent_to: Arc<PeerCounters>,
    ) -> Rc<Mesh> {
        let n = peers.len();
        Rc::new(Mesh {
            peers,
            overflow: (0..n).map(|_| RefCell::new(VecDeque::new())).collect(),
            draining: (0..n).map(|_| Cell::new(false)).collect(),
            overflow_max,
            metrics,
            sent_to,
        })
    }

    pub fn shards(&self) -> usize {
        self.peers.len()
    }

    /// Sends `msg` to shard `to` without ever waiting.
    pub fn send(self: &Rc<Self>, to: ShardIx, msg: MeshMsg) {
        let ix = usize::from(to);
        ShardMetrics::inc(&self.metrics.mesh_sent);
        self.sent_to.inc(ix);
        if !self.draining[ix].get() {
            match self.peers[ix].try_send(msg) {
                Ok(()) => return,
                Err(flume::TrySendError::Disconnected(_)) => {
                    ShardMetrics::inc(&self.metrics.mesh_dropped);
                    return;
                }
                Err(flume::TrySendError::Full(msg)) => self.queue(ix, msg),
            }
            self.draining[ix].set(true);
            let mesh = self.clone();
            glommio::spawn_local(async move { mesh.drain(ix).await }).detach();
        } else {
            self.queue(ix, msg);
        }
    }

    fn queue(&self, ix: usize, msg: MeshMsg) {
        let mut q = self.overflow[ix].borrow_mut();
        if q.len() >= self.overflow_max {
            ShardMetrics::inc(&self.metrics.mesh_dropped);
            return; // dropping a Handoff closes its socket: the client sees a reset, counted here
        }
        ShardMetrics::inc(&self.metrics.mesh_overflowed);
        q.push_back(msg);
    }

    async fn drain(&self, ix: usize) {
        loop {
            let next = self.overflow[ix].borrow_mut().pop_front();
            let Some(msg) = next else { break };
            if self.peers[ix].send_async(msg).await.is_err() {
                ShardMetrics::inc(&self.metrics.mesh_dropped);
            }
        }
        // A burst (a mass reconnect: every subscription is a Watch and a Snapshot) can grow
        // this queue to hundreds of thousands of messages; give that memory back.
        *self.overflow[ix].borrow_mut() = VecDeque::new();
        self.draining[ix].set(false);
    }
}
