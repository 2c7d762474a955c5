//! Where the fleet connects. `--url` names one server WebSocket URL or several, comma-separated
//! (the nodes of a cluster, say); connection `n` of a process goes to URL `n mod count`, so
//! watchers and the users they watch sit on different URLs and `--verify` checks that what one
//! node hears reaches the others.
//!
//! Parsing is split from resolving: [`split`] is pure (and tested here), [`resolve`] asks the
//! resolver and applies the loopback rule to each URL.

use std::net::{SocketAddr, ToSocketAddrs};

use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// Most URLs in one `--url` (a bound, like every other input).
pub const MAX_URLS: usize = 64;

/// One server URL and the address it resolved to.
#[derive(Clone, Debug)]
pub struct Target {
    /// The URL as given: the upgrade request's target and `Host`.
    pub url: String,
    /// Where the TCP connection goes.
    pub addr: SocketAddr,
    /// `wss://`: TLS to the server, checked against `--ca-file`.
    pub tls: bool,
}

/// The URLs of a `--url` list, checked for form: each `ws://host:port[/path]` or
/// `wss://host:port[/path]`, none empty, at most [`MAX_URLS`]. The same URL may appear more
/// than once (it then gets its share twice).
pub fn split(list: &str) -> Result<Vec<String>, String> {
    let urls: Vec<String> = list.split(',').map(|u| u.trim().to_owned()).collect();
    if urls.len() > MAX_URLS {
        return Err(format!(
            "--url: at most {MAX_URLS} URLs, got {}",
            urls.len()
        ));
    }
    for u in &urls {
        if u.is_empty() {
            return Err(format!("--url `{list}`: an empty URL in the list"));
        }
        host_port(u)?;
        u.as_str()
            .into_client_request()
            .map_err(|e| format!("--url {u}: {e}"))?;
    }
    Ok(urls)
}

/// Whether a (checked) URL is `wss://`.
pub fn is_tls(url: &str) -> bool {
    url.starts_with("wss://")
}

/// The `host:port` of a `ws://` or `wss://` URL.
fn host_port(url: &str) -> Result<&str, String> {
    let rest = url
        .strip_prefix("ws://")
        .or_else(|| url.strip_prefix("wss://"))
        .ok_or_else(|| format!("--url {url}: only ws:// and wss:// URLs are supported"))?;
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let hostport = &rest[..end];
    if hostport.is_empty() {
        return Err(format!("--url {url}: no host"));
    }
    Ok(hostport)
}

/// Resolves one URL to the first IPv4 address of its host (the harness binds IPv4 source
/// addresses, so `localhost` must not become `::1`), which must be loopback unless
/// `allow_remote`.
pub fn resolve(url: &str, allow_remote: bool) -> Result<Target, String> {
    let hostport = host_port(url)?;
    let addr = hostport
        .to_socket_addrs()
        .map_err(|e| format!("--url {url}: {hostport}: {e}"))?
        .find(SocketAddr::is_ipv4)
        .ok_or_else(|| format!("--url {url}: {hostport} has no IPv4 address"))?;
    if !addr.ip().is_loopback() && !allow_remote {
        return Err(format!(
            "--url {url}: {addr} is not loopback; pass --allow-remote to target it"
        ));
    }
    Ok(Target {
        url: url.to_owned(),
        addr,
        tls: is_tls(url),
    })
}

/// Every URL of a `--url` list, checked and resolved, in order.
pub fn resolve_all(list: &str, allow_remote: bool) -> Result<Vec<Target>, String> {
    split(list)?
        .iter()
        .map(|u| resolve(u, allow_remote))
        .collect()
}

/// Which of `count` URLs connection `n` uses: round-robin.
pub fn index_of(n: usize, count: usize) -> usize {
    n % count.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_a_list_of_urls() {
        assert_eq!(
            split("ws://127.0.0.1:8080/ws").unwrap(),
            vec!["ws://127.0.0.1:8080/ws"]
        );
        assert_eq!(
            split("ws://127.0.0.1:1/ws, ws://localhost:2/ws ,ws://127.0.0.1:1/ws").unwrap(),
            vec![
                "ws://127.0.0.1:1/ws",
                "ws://localhost:2/ws",
                "ws://127.0.0.1:1/ws"
            ],
            "spaces around commas are dropped; a repeated URL stays"
        );
        assert_eq!(split("ws://h:1").unwrap(), vec!["ws://h:1"], "no path");
        assert_eq!(
            split("wss://localhost:8443/ws,ws://127.0.0.1:1/ws").unwrap(),
            vec!["wss://localhost:8443/ws", "ws://127.0.0.1:1/ws"],
            "TLS and plain URLs mix"
        );
        assert!(is_tls("wss://localhost:8443/ws") && !is_tls("ws://localhost:1/ws"));
        for bad in [
            "",
            ",",
            "ws://127.0.0.1:1/ws,",
            "ws://127.0.0.1:1/ws,,ws://127.0.0.1:2/ws",
            "http://127.0.0.1:1/ws",
            "wss://",
            "https://127.0.0.1:1/ws",
            "ws://127.0.0.1:1/ws,127.0.0.1:2",
            "ws:///ws",
            "ws://",
        ] {
            assert!(split(bad).is_err(), "{bad:?} must be refused");
        }
        let many = vec!["ws://127.0.0.1:1/ws"; MAX_URLS + 1].join(",");
        assert!(split(&many).unwrap_err().contains("at most"));
        let most = vec!["ws://127.0.0.1:1/ws"; MAX_URLS].join(",");
        assert_eq!(split(&most).unwrap().len(), MAX_URLS);
    }

    #[test]
    fn host_port_ends_at_path_query_or_fragment() {
        assert_eq!(host_port("ws://a:1/ws").unwrap(), "a:1");
        assert_eq!(host_port("ws://a:1?x=/y").unwrap(), "a:1");
        assert_eq!(host_port("ws://a:1#f").unwrap(), "a:1");
        assert_eq!(host_port("ws://a:1").unwrap(), "a:1");
    }

    /// Literal addresses resolve without a resolver; each URL of a list is held to the
    /// loopback rule on its own.
    #[test]
    fn every_url_must_be_loopback_unless_allowed() {
        let t = resolve_all("ws://127.0.0.1:9/ws,ws://127.0.0.2:10/x", false).unwrap();
        assert_eq!(
            t.iter().map(|t| t.addr.to_string()).collect::<Vec<_>>(),
            vec!["127.0.0.1:9", "127.0.0.2:10"]
        );
        assert_eq!(t[1].url, "ws://127.0.0.2:10/x");
        let remote = "ws://127.0.0.1:9/ws,ws://192.0.2.1:10/ws";
        let e = resolve_all(remote, false).unwrap_err();
        assert!(
            e.contains("192.0.2.1:10") && e.contains("--allow-remote"),
            "{e}"
        );
        assert_eq!(resolve_all(remote, true).unwrap().len(), 2);
        assert!(resolve("ws://127.0.0.1/ws", false).is_err(), "no port");
        assert!(
            resolve("ws://[::1]:9/ws", false)
                .unwrap_err()
                .contains("no IPv4"),
            "the client binds IPv4 sources"
        );
    }

    #[test]
    fn connections_go_round_robin() {
        let picks: Vec<usize> = (0..7).map(|n| index_of(n, 3)).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2, 0]);
        assert!((0..10).all(|n| index_of(n, 1) == 0));
    }
}
