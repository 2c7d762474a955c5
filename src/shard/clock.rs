//! The shard's clock: token expiry and liveness, without a timer per connection.
//!
//! - Expiry: sessions sit in a sorted set by `exp`; each tick pops the ones due and closes them
//!   with 4001. `refresh` moves a session within the set.
//! - Liveness: connections are split into slots by session id, and each tick handles one slot,
//!   so every connection is visited once per `heartbeat_ms` but the work (a ping each, and the
//!   pongs coming back) is spread evenly over the interval instead of arriving as one burst that
//!   delays everyone's deliveries. A visit pings the connection, lets it give idle buffers back,
//!   and closes it if it sent nothing for two intervals (half-open sockets, dead peers).

use std::rc::Rc;
use std::time::Duration;

use super::{now_ms, CloseRequest, Shard};
use crate::metrics::ShardMetrics;

/// Longest wait between ticks: a token is closed at most this late.
const TICK_MAX_MS: u64 = 1000;
/// Shortest tick (very short heartbeats are for tests).
const TICK_MIN_MS: u64 = 10;
/// Slots a heartbeat interval is split into, at most.
const SLOTS_MAX: u64 = 32;
/// Recent-latency windows rotate this often (the dashboard shows the last one to two).
const LATENCY_WINDOW_MS: u64 = 10_000;

/// The tick and slot count for a heartbeat interval.
pub fn schedule(heartbeat_ms: u64) -> (u64, u64) {
    let tick = (heartbeat_ms / SLOTS_MAX).clamp(TICK_MIN_MS, TICK_MAX_MS);
    let slots = (heartbeat_ms / tick).max(1);
    (tick, slots)
}

pub async fn run(shard: Rc<Shard>) {
    let (tick_ms, slots) = schedule(shard.cfg.heartbeat_ms);
    let mut slot = 0u64;
    let mut rotated = now_ms();
    while !shard.stopping.get() {
        glommio::timer::sleep(Duration::from_millis(tick_ms)).await;
        let now = now_ms();
        expire(&shard, now / 1000);
        shard.expire_holds(now);
        beat(&shard, now, slot, slots);
        slot = (slot + 1) % slots;
        shard.mesh.settle(now);
        shard.retry_bridge_backlog();
        if now.saturating_sub(rotated) >= LATENCY_WINDOW_MS {
            shard.rotate_latency();
            rotated = now;
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
        if let Some(s) = shard.session(id).filter(|s| s.expires_at.get() == exp) {
            ShardMetrics::inc(&shard.metrics.token_expiry_closes);
            s.request_close(CloseRequest::now(4001, "token expired"));
        }
    }
}

/// Visits the connections of one slot: ping, or close the silent ones.
fn beat(shard: &Shard, now: u64, slot: u64, slots: u64) {
    let silent_ms = 2 * shard.cfg.heartbeat_ms;
    let due: Vec<_> = shard
        .sessions
        .borrow()
        .iter()
        .filter(|(id, s)| id.get() % slots == slot && !s.closing())
        .map(|(_, s)| s.clone())
        .collect();
    for s in due {
        if now.saturating_sub(s.last_rx_ms()) > silent_ms {
            ShardMetrics::inc(&shard.metrics.heartbeat_timeouts);
            s.request_close(CloseRequest::now(1001, "heartbeat timeout"));
        } else {
            ShardMetrics::inc(&shard.metrics.pings_sent);
            s.heartbeat();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_interval_is_split_into_even_slots() {
        assert_eq!(schedule(25_000), (781, 32));
        assert_eq!(schedule(3_000), (93, 32));
        assert_eq!(schedule(200), (10, 20));
        assert_eq!(schedule(100_000), (1000, 100));
        for hb in [100, 200, 999, 3_000, 25_000, 600_000] {
            let (tick, slots) = schedule(hb);
            assert!(
                tick * slots <= hb,
                "a full round fits in the interval: {hb}"
            );
            assert!((TICK_MIN_MS..=TICK_MAX_MS).contains(&tick));
        }
    }
}
