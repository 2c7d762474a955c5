//! Membership by heartbeat (SPEC §12): who is alive, as this node hears it. Pure.
//!
//! A node is known from the first thing heard from it (a heartbeat or a delta) until it has
//! been silent for a lease. Each (node id, incarnation) gets its own [`NodeIx`], so a restarted
//! node's old shares are dropped as one and never mixed with the new ones.

use hashbrown::HashMap;

use crate::presence::contrib::NodeIx;

/// What a node's heartbeat says besides its name.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeInfo {
    /// Its admin URL, for operators (and the dashboard's node list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<String>,
    pub sessions: u64,
    pub online: u64,
}

/// One live node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub id: String,
    pub incarnation: u64,
    pub ix: NodeIx,
    /// When it was last heard from (ms since the epoch, this node's clock).
    pub last_heard: u64,
    pub info: NodeInfo,
}

/// What hearing from a node means.
#[derive(Debug, PartialEq, Eq)]
pub enum Heard {
    /// Already known and alive.
    Known(NodeIx),
    /// Not known (new, or back after its lease expired): ask it for a snapshot.
    Appeared(NodeIx),
    /// Known under an older incarnation: it restarted. Drop `old`'s shares (`last_heard` is
    /// when it was last heard), and ask the new one for a snapshot.
    Restarted {
        old: NodeIx,
        last_heard: u64,
        new: NodeIx,
    },
    /// An incarnation older than the one known: a stale message from before a restart.
    Stale,
}

/// The live nodes other than this one.
#[derive(Debug, Default)]
pub struct Members {
    peers: HashMap<String, Peer>,
    next_ix: NodeIx,
}

impl Members {
    pub fn new() -> Members {
        Members::default()
    }

    /// `id` (incarnation `incarnation`) was heard from at `now`. `info` is what its heartbeat
    /// said (`None` for a delta, which says nothing about it).
    pub fn heard(&mut self, id: &str, incarnation: u64, now: u64, info: Option<NodeInfo>) -> Heard {
        let next = &mut self.next_ix;
        let mut fresh = || {
            *next = next.wrapping_add(1);
            *next
        };
        match self.peers.get_mut(id) {
            Some(p) if p.incarnation == incarnation => {
                p.last_heard = p.last_heard.max(now);
                if let Some(info) = info {
                    p.info = info;
                }
                Heard::Known(p.ix)
            }
            Some(p) if p.incarnation > incarnation => Heard::Stale,
            Some(p) => {
                let (old, last_heard) = (p.ix, p.last_heard);
                let new = fresh();
                *p = Peer {
                    id: id.to_owned(),
                    incarnation,
                    ix: new,
                    last_heard: now,
                    info: info.unwrap_or_default(),
                };
                Heard::Restarted {
                    old,
                    last_heard,
                    new,
                }
            }
            None => {
                let ix = fresh();
                self.peers.insert(
                    id.to_owned(),
                    Peer {
                        id: id.to_owned(),
                        incarnation,
                        ix,
                        last_heard: now,
                        info: info.unwrap_or_default(),
                    },
                );
                Heard::Appeared(ix)
            }
        }
    }

    /// Nodes silent for `lease_ms` by `now`: removed and returned (their shares must go).
    pub fn expire(&mut self, now: u64, lease_ms: u64) -> Vec<Peer> {
        let dead: Vec<String> = self
            .peers
            .values()
            .filter(|p| now.saturating_sub(p.last_heard) >= lease_ms)
            .map(|p| p.id.clone())
            .collect();
        dead.iter().filter_map(|id| self.peers.remove(id)).collect()
    }

    pub fn get(&self, id: &str) -> Option<&Peer> {
        self.peers.get(id)
    }

    /// The node holding `ix`, if it is still live.
    #[cfg(test)]
    fn by_ix(&self, ix: NodeIx) -> Option<&Peer> {
        self.peers.values().find(|p| p.ix == ix)
    }

    /// Live nodes, sorted by id.
    pub fn live(&self) -> Vec<Peer> {
        let mut v: Vec<Peer> = self.peers.values().cloned().collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_appears_stays_known_and_expires_after_a_silent_lease() {
        let mut m = Members::new();
        let Heard::Appeared(a) = m.heard("a", 1, 1_000, None) else {
            panic!("first contact appears")
        };
        assert_eq!(m.heard("a", 1, 2_000, None), Heard::Known(a));
        assert!(
            m.expire(7_999, 6_000).is_empty(),
            "heard at 2000: alive until 8000"
        );
        let dead = m.expire(8_000, 6_000);
        assert_eq!(dead.len(), 1);
        assert_eq!((dead[0].ix, dead[0].last_heard), (a, 2_000));
        assert!(m.is_empty());
        let Heard::Appeared(again) = m.heard("a", 1, 9_000, None) else {
            panic!("back after expiry: appears again (and is asked for a snapshot)")
        };
        assert_ne!(
            again, a,
            "a new index, so nothing of the old one is mixed in"
        );
    }

    #[test]
    fn a_restart_replaces_the_old_incarnation_and_stale_messages_are_refused() {
        let mut m = Members::new();
        let info = NodeInfo {
            admin: Some("http://a".into()),
            sessions: 3,
            online: 2,
        };
        let Heard::Appeared(old) = m.heard("a", 5, 100, Some(info.clone())) else {
            panic!()
        };
        assert_eq!(m.get("a").unwrap().info, info);
        let Heard::Restarted {
            old: o,
            last_heard,
            new,
        } = m.heard("a", 6, 200, None)
        else {
            panic!("a new incarnation is a restart")
        };
        assert_eq!((o, last_heard), (old, 100));
        assert_ne!(new, old);
        assert_eq!(m.heard("a", 5, 300, None), Heard::Stale);
        assert_eq!(m.by_ix(new).unwrap().incarnation, 6);
        assert!(m.by_ix(old).is_none());
    }

    #[test]
    fn live_nodes_are_sorted_by_id() {
        let mut m = Members::new();
        m.heard("b", 1, 0, None);
        m.heard("a", 1, 0, None);
        let ids: Vec<String> = m.live().into_iter().map(|p| p.id).collect();
        assert_eq!(ids, ["a", "b"]);
    }
}
