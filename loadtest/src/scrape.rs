//! Reads the server's merge counters from its admin port (`--admin-url`), so `--verify` can
//! tell a seq gap the server explains from a lost event. The server merges a user's queued
//! states in two places: a slow consumer's outbox (`presenced_coalesced_events_total`), and a
//! congested mesh between shards (`presenced_mesh_coalesced_total`), which reaches even
//! clients that keep up. It also tells whether a server is a cluster node
//! (`presenced_cluster_nodes`): there `seq` is a hybrid logical clock, and a gap is no loss.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

/// The counter of merged events, by its current name and by the name it had before.
pub const COALESCED: [&str; 2] = [
    "presenced_coalesced_events_total",
    "presenced_coalesced_total",
];

/// Time-outs for one scrape.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Largest `/metrics` body read.
const MAX_BODY: usize = 8 << 20;

/// An admin port: `http://host:port` (a path prefix is kept), with an optional bearer token.
#[derive(Clone, Debug)]
pub struct AdminPort {
    addr: SocketAddr,
    host: String,
    prefix: String,
    token: Option<String>,
}

impl AdminPort {
    pub fn parse(url: &str, token: Option<String>) -> Result<AdminPort, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or("--admin-url: only http:// URLs are supported")?;
        let (host, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        let addr = host
            .to_socket_addrs()
            .map_err(|e| format!("--admin-url {host}: {e}"))?
            .next()
            .ok_or(format!("--admin-url {host}: no address"))?;
        Ok(AdminPort {
            addr,
            host: host.to_owned(),
            prefix: prefix.to_owned(),
            token,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `GET /metrics`, body as text.
    pub fn metrics(&self) -> Result<String, String> {
        let mut s = TcpStream::connect_timeout(&self.addr, TIMEOUT)
            .map_err(|e| format!("{}: {e}", self.addr))?;
        s.set_read_timeout(Some(TIMEOUT))
            .map_err(|e| e.to_string())?;
        s.set_write_timeout(Some(TIMEOUT))
            .map_err(|e| e.to_string())?;
        let auth = self
            .token
            .as_ref()
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let req = format!(
            "GET {}/metrics HTTP/1.1\r\nHost: {}\r\n{auth}Connection: close\r\n\r\n",
            self.prefix, self.host
        );
        s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
        // Read the head, then exactly `content-length` bytes (not to EOF: a keep-alive answer
        // would hold the socket open until the time-out).
        let mut buf = Vec::new();
        let mut chunk = [0u8; 16 << 10];
        let (head_len, want) = loop {
            let n = s.read(&mut chunk).map_err(|e| format!("/metrics: {e}"))?;
            buf.extend_from_slice(&chunk[..n]);
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok());
                break (i + 4, len);
            }
            if n == 0 || buf.len() > MAX_BODY {
                return Err("/metrics: no HTTP response".into());
            }
        };
        let want = want.unwrap_or(MAX_BODY).min(MAX_BODY);
        while buf.len() - head_len < want {
            let n = s.read(&mut chunk).map_err(|e| format!("/metrics: {e}"))?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let head = String::from_utf8_lossy(&buf[..head_len]);
        let body = String::from_utf8_lossy(&buf[head_len..]);
        let status = head.split_whitespace().nth(1).unwrap_or("");
        if status != "200" {
            return Err(format!(
                "/metrics answered {status}{}",
                if status == "401" {
                    " (pass --admin-token)"
                } else {
                    ""
                }
            ));
        }
        Ok(body.into_owned())
    }

    /// The server's count of merged (coalesced) events, all shards together, and whether it
    /// is a cluster node.
    pub fn counters(&self) -> Result<Counters, String> {
        let text = self.metrics()?;
        let coalesced = coalesced_in(&text)
            .ok_or_else(|| format!("/metrics has neither {} nor {}", COALESCED[0], COALESCED[1]))?;
        Ok(Counters {
            coalesced,
            cluster: is_cluster_node(&text),
        })
    }
}

/// What `--verify` reads from the servers' admin ports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Merged (coalesced) events, every shard of every server added up.
    pub coalesced: u64,
    /// At least one server is a cluster node (docs/CLUSTER.md): its `seq` is a hybrid logical
    /// clock, which rises by at least one per change, not by exactly one.
    pub cluster: bool,
}

/// Every admin port of an `--admin-url` list (comma-separated: one per server of a cluster),
/// each with the same bearer token.
pub fn parse_list(list: &str, token: Option<String>) -> Result<Vec<AdminPort>, String> {
    let ports = list
        .split(',')
        .map(str::trim)
        .map(|u| {
            if u.is_empty() {
                Err(format!("--admin-url `{list}`: an empty URL in the list"))
            } else {
                AdminPort::parse(u, token.clone())
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    if ports.len() > crate::target::MAX_URLS {
        return Err(format!(
            "--admin-url: at most {} URLs",
            crate::target::MAX_URLS
        ));
    }
    Ok(ports)
}

/// The merge counters of every server in `ports`, added up: the fleet's servers together; and
/// whether any of them is a cluster node.
pub fn counters_sum(ports: &[AdminPort]) -> Result<Counters, String> {
    ports.iter().try_fold(Counters::default(), |sum, p| {
        let c = p.counters().map_err(|e| format!("{}: {e}", p.addr()))?;
        Ok(Counters {
            coalesced: sum.coalesced + c.coalesced,
            cluster: sum.cluster || c.cluster,
        })
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The mesh's merge counter (a congested mesh merges queued updates of a user).
pub const MESH_COALESCED: &str = "presenced_mesh_coalesced_total";

/// A gauge only a cluster node exports (docs/CLUSTER.md, "What you can watch"), whatever its
/// bus state and however many nodes it sees.
pub const CLUSTER_NODES: &str = "presenced_cluster_nodes";

/// The exposition is a cluster node's.
pub fn is_cluster_node(text: &str) -> bool {
    sum_of(text, CLUSTER_NODES).is_some()
}

/// Sums every sample of the coalescing counter (one per shard) in a Prometheus text exposition
/// (the current name wins when both are present), plus the mesh's merges when the server has
/// that counter. `None` when the outbox counter is not there under either name.
pub fn coalesced_in(text: &str) -> Option<u64> {
    let outbox = COALESCED.iter().find_map(|name| sum_of(text, name))?;
    Some(outbox + sum_of(text, MESH_COALESCED).unwrap_or(0))
}

fn sum_of(text: &str, name: &str) -> Option<u64> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        // The name must end here: a label set or the value follows.
        let value = match rest.as_bytes().first() {
            Some(b'{') => rest.split_once('}').map(|(_, v)| v),
            Some(b' ') => Some(rest),
            _ => None,
        };
        if let Some(v) = value.and_then(|v| v.split_whitespace().next()) {
            if let Ok(v) = v.parse::<f64>() {
                *found.get_or_insert(0u64) += v as u64;
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_shards_and_accepts_both_names() {
        let new = "# HELP presenced_coalesced_events_total x\n\
                   # TYPE presenced_coalesced_events_total counter\n\
                   presenced_coalesced_events_total{shard=\"0\"} 3\n\
                   presenced_coalesced_events_total{shard=\"1\"} 4\n\
                   presenced_coalesced_events_totally 100\n";
        assert_eq!(coalesced_in(new), Some(7));
        let old = "presenced_coalesced_total{shard=\"0\"} 5\npresenced_deliveries_total 9\n";
        assert_eq!(coalesced_in(old), Some(5));
        assert_eq!(coalesced_in("presenced_coalesced_total 2\n"), Some(2));
        assert_eq!(
            coalesced_in(&format!("{new}{old}")),
            Some(7),
            "new name wins"
        );
        assert_eq!(coalesced_in("presenced_deliveries_total 9\n"), None);
        assert_eq!(coalesced_in(""), None);
        // A congested mesh's merges count too.
        let mesh = format!("{new}presenced_mesh_coalesced_total{{shard=\"1\"}} 2\n");
        assert_eq!(coalesced_in(&mesh), Some(9));
    }

    #[test]
    fn a_cluster_node_is_told_by_its_node_gauge() {
        let node = "presenced_coalesced_events_total{shard=\"0\"} 0\n\
                    # TYPE presenced_cluster_nodes gauge\n\
                    presenced_cluster_nodes 1\n";
        assert!(is_cluster_node(node), "alone on its bus, still a node");
        assert!(!is_cluster_node("presenced_coalesced_events_total 0\n"));
        assert!(!is_cluster_node("presenced_cluster_nodes_seen 3\n"));
        assert!(!is_cluster_node("# HELP presenced_cluster_nodes x\n"));
    }

    #[test]
    fn parses_urls() {
        let a = AdminPort::parse("http://127.0.0.1:9090", None).unwrap();
        assert_eq!((a.addr().port(), a.prefix.as_str()), (9090, ""));
        let a = AdminPort::parse("http://127.0.0.1:9090/admin/", None).unwrap();
        assert_eq!(a.prefix, "/admin");
        assert!(AdminPort::parse("https://127.0.0.1:9090", None).is_err());
        let list = parse_list("http://127.0.0.1:9090, http://127.0.0.1:9091/admin", None).unwrap();
        assert_eq!(
            list.iter()
                .map(|a| (a.addr().port(), a.prefix.as_str()))
                .collect::<Vec<_>>(),
            vec![(9090, ""), (9091, "/admin")]
        );
        assert!(parse_list("http://127.0.0.1:9090,", None).is_err());
        assert!(parse_list("http://127.0.0.1:9090,ws://127.0.0.1:1", None).is_err());
        assert_eq!(counters_sum(&[]), Ok(Counters::default()));
    }
}
