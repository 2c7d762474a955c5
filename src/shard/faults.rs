//! Test-only hooks, compiled only with the `fault-injection` feature (which the test command
//! enables and release builds never do): synthetic load that sockets cannot create on a test
//! machine, and panics at chosen points.

use std::net::{IpAddr, Ipv4Addr};

use super::{now_ms, Shard};
use crate::metrics::ShardMetrics;
use crate::presence::{DeviceType, SessionId, SessionInfo, Status, UserId};

/// `set_status` with this text arms a panic in the middle of the fan-out of the change it
/// causes: after the first watching shard was sent the update, before the others.
pub const PANIC_IN_PUBLISH: &str = "__panic_in_publish";
/// `activity` with this kind panics while the op is applied.
pub const PANIC_IN_OP: &str = "__panic";
/// A session whose device id is this panics while it is being registered.
pub const PANIC_IN_OPEN: &str = "__panic_in_open";

impl Shard {
    /// Registers `n` synthetic online users (`{prefix}{i}`), each with one session that has no
    /// connection: registry load for scans, without a socket per user. Their session ids live
    /// above every real one of this shard.
    pub fn inject_users(&self, prefix: &str, n: usize) {
        let now = now_ms();
        let info = SessionInfo {
            device: None,
            device_type: DeviceType::Other,
            region: None,
            groups: self.no_groups.clone(),
            roles: self.no_roles.clone(),
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            connected_at_ms: now,
        };
        let mut registry = self.registry.borrow_mut();
        for i in 0..n {
            let user = UserId::from(format!("{prefix}{i}"));
            let id = SessionId::new(self.ix, (1 << 47) | i as u64);
            registry.connect(&user, id, Status::Online, info.clone(), now);
        }
        ShardMetrics::set(&self.metrics.online_users, registry.online_users() as u64);
    }
}
