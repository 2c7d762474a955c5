//! The shard's clock: token expiry and liveness, without a timer per connection.
//!
//! - Expiry: sessions sit in a sorted set by `exp`; each tick pops the ones due and closes them
//!   with 4001. `refresh` moves a session within the set.
//! - Liveness: every `heartbeat_ms`, one sweep over the shard's connections pings each, and
//!   closes those that sent nothing for two intervals (half-open sockets, dead peers).

use std::rc::Rc;
use std::time::Duration;

use super::{now_ms, Shard};
use crate::metrics::ShardMetrics;

/// Longest wait between expiry checks: a token is closed at most this late.
const TICK_MAX_MS: u64 = 1000;

pub async fn run(shard: Rc<Shard>) {
    let heartbeat = shard.cfg.heartbeat_ms;
    let tick = Duration::from_millis(heartbeat.min(TICK_MAX_MS));
    let mut next_beat = now_ms() + heartbeat;
    while !shard.stopping.get() {
        glommio::timer::sleep(tick).await;
        let now = now_ms();
        expire(&shard, now / 1000);
        if now >= next_beat {
            beat(&shard, now);
            next_beat = now + heartbeat;
        }
    }
}

/// Closes sessions whose token expired at or before `now_s`.
fn expire(shard: &Shard, now_s: u64) {
    loop {
        let due = {
            let mut set = shard.expiries.borrow_mut();
            match set.first() {
                Some(&(exp, id)) if exp <= now_s => {
                    set.pop_first();
                    Some((exp, id))
                }
                _ => None,
            }
        };
        let Some((exp, id)) = due else { return };
        let conn = shard.conns.borrow().get(&id).cloned();
        if let Some(conn) = conn.filter(|c| c.expires_at.get() == exp) {
            ShardMetrics::inc(&shard.metrics.token_expiry_closes);
            conn.request_close(4001, "token expired");
        }
    }
}

/// Pings every connection; closes the silent ones.
fn beat(shard: &Shard, now: u64) {
    let silent_ms = 2 * shard.cfg.heartbeat_ms;
    let conns: Vec<_> = shard.conns.borrow().values().cloned().collect();
    for conn in conns.into_iter().filter(|c| !c.closing()) {
        if now.saturating_sub(conn.last_rx_ms.get()) > silent_ms {
            ShardMetrics::inc(&shard.metrics.heartbeat_timeouts);
            conn.request_close(1001, "heartbeat timeout");
        } else {
            ShardMetrics::inc(&shard.metrics.pings_sent);
            conn.heartbeat();
        }
    }
}
