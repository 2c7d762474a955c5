//! The client's own address behind load balancers (docs/CONFIG.md, "Behind a proxy").
//!
//! Behind a proxy every socket's peer is the proxy, so per-IP limits, the `ip` of sessions and
//! history, and anything keyed by address would see one client. Two ways to learn the real one,
//! each believed only from a peer in `trusted_proxies`:
//! - the PROXY protocol (v1 text or v2 binary, parsed by the `ppp` crate), a header the proxy
//!   writes before anything else on the connection (`proxy_protocol = true`);
//! - `X-Forwarded-For`, walked from the right: every hop a trusted proxy appended is skipped, and
//!   the first address that is not a trusted proxy is the client. What the client wrote itself
//!   is to the left of that and never read, so it cannot choose its own address.
//!
//! From any other peer both are ignored (and counted). Pure: no I/O here.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use ppp::{v1, v2, HeaderResult, PartialResult};

/// Networks whose connections may say who the client is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// From `trusted_proxies`: CIDR blocks (`10.0.0.0/8`, `fd00::/8`) or single addresses. An
    /// IPv4-mapped IPv6 entry (`::ffff:10.0.0.0/104`) means its IPv4 block, as addresses are
    /// compared in their IPv4 form. A block of every address (`0.0.0.0/0`, `::/0`) is refused:
    /// it would let anyone name any address and escape the per-IP limit.
    pub fn parse(entries: &[String]) -> Result<TrustedProxies, String> {
        entries
            .iter()
            .map(|e| {
                let e = e.trim();
                let net = e
                    .parse::<IpNet>()
                    .or_else(|_| e.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("`{e}` is neither an address nor a CIDR block"))?;
                let net = match net {
                    IpNet::V6(n) if n.prefix_len() >= 96 => match n.addr().to_ipv4_mapped() {
                        Some(v4) => IpNet::new(IpAddr::V4(v4), n.prefix_len() - 96)
                            .map_err(|_| format!("`{e}`: a bad prefix"))?,
                        None => IpNet::V6(n),
                    },
                    n => n,
                };
                if net.prefix_len() == 0 {
                    return Err(format!(
                        "`{e}` trusts every address: anyone could name any client address"
                    ));
                }
                Ok(net.trunc())
            })
            .collect::<Result<Vec<_>, _>>()
            .map(TrustedProxies)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `ip` (an IPv4-mapped IPv6 address counts as its IPv4 form) is a trusted proxy.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|n| n.contains(&ip))
    }
}

/// The longest v1 header line, CRLF included (the protocol's own limit).
const V1_MAX: usize = 107;

/// A PROXY protocol header read from the start of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxyHeader {
    /// Bytes the header took; what follows is the client's own stream (TLS or HTTP).
    pub len: usize,
    /// The client's address, for a proxied TCP connection. `None` for the proxy's own
    /// connections (v2 `LOCAL`, v1 `UNKNOWN`) and for address families other than IP.
    pub source: Option<SocketAddr>,
}

/// Parses a PROXY header (v2, else v1) at the start of `buf`. `Ok(None)`: incomplete, read
/// more. `Err`: not a valid PROXY header, and no more bytes would make it one.
pub fn parse_proxy_header(buf: &[u8]) -> Result<Option<ProxyHeader>, &'static str> {
    // A v1 header is one line: judged whole, since `ppp` reads some prefixes of a valid line
    // (one cut after a port's space) as invalid rather than incomplete.
    let v1_prefix = &b"PROXY "[..buf.len().min(6)];
    if buf.starts_with(v1_prefix) && !buf.windows(2).any(|w| w == b"\r\n") {
        return if buf.len() < V1_MAX {
            Ok(None)
        } else {
            Err("PROXY protocol v1 line longer than 107 bytes")
        };
    }
    let parsed = HeaderResult::parse(buf);
    if parsed.is_incomplete() {
        return Ok(None);
    }
    match parsed {
        HeaderResult::V2(Ok(h)) => {
            let source = match (h.command, h.addresses) {
                (v2::Command::Local, _) => None,
                (v2::Command::Proxy, v2::Addresses::IPv4(a)) => {
                    Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
                }
                (v2::Command::Proxy, v2::Addresses::IPv6(a)) => {
                    Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port))
                }
                (v2::Command::Proxy, _) => None,
            };
            Ok(Some(ProxyHeader {
                len: h.len(),
                source,
            }))
        }
        HeaderResult::V1(Ok(h)) => {
            let source = match h.addresses {
                v1::Addresses::Tcp4(a) => {
                    Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
                }
                v1::Addresses::Tcp6(a) => {
                    Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port))
                }
                v1::Addresses::Unknown => None,
            };
            Ok(Some(ProxyHeader {
                len: h.header.len(),
                source,
            }))
        }
        HeaderResult::V2(Err(_)) | HeaderResult::V1(Err(_)) => {
            Err("no valid PROXY protocol header (v1 or v2) at the start of the connection")
        }
    }
}

/// One `X-Forwarded-For` hop as an address: `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1` or
/// `[2001:db8::1]:443`. `None`: anything else (`unknown`, an obfuscated name, junk).
fn hop(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    s.parse::<IpAddr>()
        .ok()
        .or_else(|| s.parse::<SocketAddr>().ok().map(|a| a.ip()))
        .map(|ip| ip.to_canonical())
}

/// The client in an `X-Forwarded-For` chain (every such header's value joined with commas, in
/// order) received from a trusted proxy: the right-most hop that is not a trusted proxy; if
/// every hop is one, the left-most. `None` when the walk meets a hop that is not an address
/// before it finds the client (then the peer's own address stands), or the chain is empty.
pub fn client_from_forwarded(chain: &str, trusted: &TrustedProxies) -> Option<IpAddr> {
    let mut last = None;
    for part in chain.rsplit(',') {
        let ip = hop(part)?;
        if !trusted.contains(ip) {
            return Some(ip);
        }
        last = Some(ip);
    }
    last
}

/// Where a connection's client address came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddrSource {
    /// The socket's peer (no proxy, or nothing believable from it).
    Peer,
    /// A PROXY protocol header from a trusted proxy.
    ProxyProtocol,
    /// `X-Forwarded-For` from a trusted proxy.
    ForwardedFor,
}

/// What a connection's PROXY protocol header said, if the listener reads one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proxied {
    /// No PROXY protocol on this listener.
    Off,
    /// A header with no address: v2 `LOCAL`, v1 `UNKNOWN`, or a family other than IP. Who
    /// writes the stream behind it is not known (an L4 proxy may be passing a client through).
    Unnamed,
    /// A header naming this source address.
    Named(IpAddr),
}

/// A connection's client address, and how it was learnt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientAddr {
    pub ip: IpAddr,
    pub source: AddrSource,
    /// A PROXY header's address, an `X-Forwarded-For` or a geo header came from a peer not
    /// trusted for it, and was ignored (a spoofing attempt, or a proxy missing from
    /// `trusted_proxies`).
    pub ignored: bool,
    /// Whoever wrote the request's HTTP headers is a trusted proxy, so headers a proxy sets
    /// (`X-Forwarded-For`, `geo.header`) may be believed. False behind a PROXY header that names
    /// a client (an L4 proxy passes the client's own headers through) or names nobody.
    pub headers_trusted: bool,
}

/// The client address of a connection from `peer`, given what its PROXY header said and the
/// request's `X-Forwarded-For` chain. A PROXY header's address is believed only from a trusted
/// peer, and is then who wrote the HTTP request: its `X-Forwarded-For` counts only if that
/// address is itself a trusted proxy (a chain of proxies). Headers behind a PROXY header that
/// names nobody are nobody's word.
pub fn resolve(
    peer: IpAddr,
    proxied: Proxied,
    forwarded_for: Option<&str>,
    trusted: &TrustedProxies,
) -> ClientAddr {
    let peer = peer.to_canonical();
    let peer_trusted = trusted.contains(peer);
    let mut out = ClientAddr {
        ip: peer,
        source: AddrSource::Peer,
        ignored: false,
        headers_trusted: peer_trusted,
    };
    match proxied {
        Proxied::Off => {}
        Proxied::Unnamed => out.headers_trusted = false,
        Proxied::Named(_) if !peer_trusted => out.ignored = true,
        Proxied::Named(p) => {
            out.ip = p.to_canonical();
            out.source = AddrSource::ProxyProtocol;
            out.headers_trusted = trusted.contains(out.ip);
        }
    }
    if let Some(chain) = forwarded_for {
        if !out.headers_trusted {
            out.ignored = true;
        } else if let Some(ip) = client_from_forwarded(chain, trusted) {
            out.ip = ip;
            out.source = AddrSource::ForwardedFor;
        }
    }
    out
}

/// Whether a client named by a PROXY header (`proxied`, from `peer`) is to be limited per IP
/// at once, before TLS and the request: it is a client (not a trusted proxy of a chain, whose
/// `X-Forwarded-For` will name the client later) and its peer is trusted to name it.
pub fn client_named_early(
    peer: IpAddr,
    proxied: Proxied,
    trusted: &TrustedProxies,
) -> Option<IpAddr> {
    match proxied {
        Proxied::Named(p) if trusted.contains(peer) && !trusted.contains(p) => {
            Some(p.to_canonical())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn trusted(list: &[&str]) -> TrustedProxies {
        TrustedProxies::parse(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn trusted_proxies_take_blocks_and_single_addresses() {
        let t = trusted(&["10.0.0.0/8", "192.0.2.7", "fd00::/8", "10.1.2.3/8"]);
        assert!(t.contains(ip("10.200.0.1")));
        assert!(t.contains(ip("192.0.2.7")));
        assert!(!t.contains(ip("192.0.2.8")));
        assert!(t.contains(ip("fd12::1")));
        assert!(t.contains(ip("::ffff:10.0.0.1")), "IPv4-mapped IPv6");
        assert!(!t.contains(ip("11.0.0.1")));
        let err = TrustedProxies::parse(&["10.0.0.0/33".into()]).unwrap_err();
        assert!(err.contains("10.0.0.0/33"), "{err}");
        assert!(TrustedProxies::parse(&["proxy.example".into()]).is_err());
        for everyone in ["0.0.0.0/0", "::/0", "::ffff:0.0.0.0/96"] {
            let err = TrustedProxies::parse(&[everyone.into()]).unwrap_err();
            assert!(err.contains("every address"), "{everyone}: {err}");
        }
        // Written IPv4-mapped, meant as IPv4: matches either form.
        let mapped = trusted(&["::ffff:10.0.0.0/104", "::ffff:192.0.2.9"]);
        assert!(mapped.contains(ip("10.1.2.3")));
        assert!(mapped.contains(ip("::ffff:10.1.2.3")));
        assert!(mapped.contains(ip("192.0.2.9")));
        assert!(!mapped.contains(ip("11.0.0.1")));
    }

    #[test]
    fn the_walk_skips_trusted_hops_from_the_right() {
        let t = trusted(&["10.0.0.0/8"]);
        let f = |chain| client_from_forwarded(chain, &t);
        assert_eq!(f("203.0.113.9"), Some(ip("203.0.113.9")));
        assert_eq!(f("1.1.1.1, 203.0.113.9, 10.0.0.2"), Some(ip("203.0.113.9")));
        assert_eq!(f("203.0.113.9:5555, 10.0.0.2"), Some(ip("203.0.113.9")));
        assert_eq!(f("[2001:db8::5]:443"), Some(ip("2001:db8::5")));
        assert_eq!(f("10.0.0.9, 10.0.0.2"), Some(ip("10.0.0.9")), "all trusted");
        // Junk the client wrote left of its real address is never read.
        assert_eq!(f("junk, unknown, 203.0.113.9"), Some(ip("203.0.113.9")));
        // Junk where the client should be: the peer's own address stands.
        assert_eq!(f("203.0.113.9, unknown, 10.0.0.2"), None);
        assert_eq!(f(""), None);
    }

    #[test]
    fn headers_count_only_from_trusted_peers() {
        let t = trusted(&["10.0.0.0/8"]);
        let proxy = ip("10.0.0.2");
        let stranger = ip("198.51.100.4");
        let client = ip("203.0.113.9");
        use Proxied::{Named, Off, Unnamed};
        let r = resolve(stranger, Named(client), Some("203.0.113.9"), &t);
        assert_eq!(
            (r.ip, r.source, r.ignored),
            (stranger, AddrSource::Peer, true)
        );
        assert!(!r.headers_trusted);
        let r = resolve(proxy, Off, Some("1.2.3.4, 203.0.113.9"), &t);
        assert_eq!((r.ip, r.source), (client, AddrSource::ForwardedFor));
        assert!(r.headers_trusted, "an L7 proxy wrote the headers");
        let r = resolve(proxy, Named(client), None, &t);
        assert_eq!((r.ip, r.source), (client, AddrSource::ProxyProtocol));
        assert!(
            !r.headers_trusted,
            "behind an L4 proxy the client wrote the headers"
        );
        // The PROXY header names an untrusted client: its X-Forwarded-For is its own word.
        let r = resolve(proxy, Named(client), Some("6.6.6.6"), &t);
        assert_eq!(
            (r.ip, r.source, r.ignored),
            (client, AddrSource::ProxyProtocol, true)
        );
        // A chain of proxies: the PROXY header names another trusted proxy, whose
        // X-Forwarded-For is believed.
        let r = resolve(proxy, Named(ip("10.9.9.9")), Some("203.0.113.9"), &t);
        assert_eq!((r.ip, r.source), (client, AddrSource::ForwardedFor));
        // A header that names nobody: whoever is behind it may be a client passed through.
        let r = resolve(proxy, Unnamed, Some("6.6.6.6"), &t);
        assert_eq!((r.ip, r.source, r.ignored), (proxy, AddrSource::Peer, true));
        assert!(!r.headers_trusted);
        let r = resolve(proxy, Off, None, &t);
        assert_eq!(
            (r.ip, r.source, r.ignored),
            (proxy, AddrSource::Peer, false)
        );
        // Limited at once: a client a trusted peer names, not a trusted proxy of a chain.
        assert_eq!(client_named_early(proxy, Named(client), &t), Some(client));
        assert_eq!(client_named_early(proxy, Named(ip("10.9.9.9")), &t), None);
        assert_eq!(client_named_early(stranger, Named(client), &t), None);
        assert_eq!(client_named_early(proxy, Unnamed, &t), None);
    }

    #[test]
    fn proxy_headers_v1_and_v2_parse_and_say_how_long_they_are() {
        let v1 = b"PROXY TCP4 203.0.113.9 10.0.0.1 5555 443\r\nGET /ws";
        let h = parse_proxy_header(v1).unwrap().unwrap();
        assert_eq!(h.source, Some("203.0.113.9:5555".parse().unwrap()));
        assert_eq!(&v1[h.len..], b"GET /ws");
        let v1_6 = b"PROXY TCP6 2001:db8::5 2001:db8::1 5555 443\r\n";
        let h = parse_proxy_header(v1_6).unwrap().unwrap();
        assert_eq!(h.source, Some("[2001:db8::5]:5555".parse().unwrap()));
        let unknown = b"PROXY UNKNOWN\r\n";
        assert_eq!(
            parse_proxy_header(unknown).unwrap(),
            Some(ProxyHeader {
                len: unknown.len(),
                source: None
            })
        );

        let addrs: v2::Addresses = (
            "203.0.113.9:5555".parse::<SocketAddr>().unwrap(),
            "10.0.0.1:443".parse::<SocketAddr>().unwrap(),
        )
            .into();
        let mut v2 = v2::Builder::with_addresses(
            v2::Version::Two | v2::Command::Proxy,
            v2::Protocol::Stream,
            addrs,
        )
        .write_tlv(v2::Type::NoOp, &[1, 2, 3])
        .unwrap()
        .build()
        .unwrap();
        let header_len = v2.len();
        v2.extend_from_slice(b"\x16\x03\x01"); // a TLS ClientHello follows
        let h = parse_proxy_header(&v2).unwrap().unwrap();
        assert_eq!(h.len, header_len);
        assert_eq!(h.source, Some("203.0.113.9:5555".parse().unwrap()));
        // Every strict prefix asks for more bytes.
        for n in 0..header_len {
            assert_eq!(parse_proxy_header(&v2[..n]), Ok(None), "prefix of {n}");
        }
        for n in 0..v1.len() - 7 {
            assert_eq!(parse_proxy_header(&v1[..n]), Ok(None), "v1 prefix of {n}");
        }

        let local = v2::Builder::with_addresses(
            v2::Version::Two | v2::Command::Local,
            v2::Protocol::Unspecified,
            v2::Addresses::Unspecified,
        )
        .build()
        .unwrap();
        assert_eq!(parse_proxy_header(&local).unwrap().unwrap().source, None);
    }

    #[test]
    fn anything_else_is_refused() {
        for bad in [
            &b"GET /ws HTTP/1.1\r\n\r\n"[..],
            b"PROXY TCP4 999.0.0.1 10.0.0.1 1 2\r\n",
            b"PROXY SCTP 1.2.3.4 10.0.0.1 1 2\r\n",
            b"\x16\x03\x01\x02\x00",
        ] {
            assert!(parse_proxy_header(bad).is_err(), "{bad:?}");
        }
    }

    proptest! {
        /// Whatever a client writes into its X-Forwarded-For, once a trusted proxy has appended
        /// the address it saw, the client is that address.
        #[test]
        fn a_client_cannot_choose_its_address(
            spoofed in proptest::collection::vec("[ -~]{0,20}", 0..6),
            real in any::<[u8; 4]>(),
            hops in 0..3usize,
        ) {
            let t = trusted(&["10.0.0.0/8"]);
            let real = IpAddr::from(real);
            prop_assume!(!t.contains(real));
            let mut chain = spoofed.join(",");
            chain.push_str(&format!(",{real}"));
            for i in 0..hops {
                chain.push_str(&format!(", 10.0.0.{i}"));
            }
            let r = resolve(ip("10.0.0.254"), Proxied::Off, Some(&chain), &t);
            prop_assert_eq!(r.ip, real);
            prop_assert_eq!(r.source, AddrSource::ForwardedFor);
        }

        /// From an untrusted peer nothing in the headers changes the address.
        #[test]
        fn strangers_are_who_they_are(
            chain in "[ -~]{0,60}",
            proxied in any::<Option<[u8; 4]>>(),
            peer in any::<[u8; 4]>(),
        ) {
            let t = trusted(&["10.0.0.0/8"]);
            let peer = IpAddr::from(peer);
            prop_assume!(!t.contains(peer));
            let proxied = proxied.map_or(Proxied::Off, |p| Proxied::Named(IpAddr::from(p)));
            let r = resolve(peer, proxied, Some(&chain), &t);
            prop_assert_eq!(r.ip, peer);
            prop_assert_eq!(r.source, AddrSource::Peer);
        }

        /// The parser never panics, and a complete header never claims more bytes than given;
        /// the bytes start with either protocol's signature (or nothing), so both parsers and
        /// v2's addresses and TLVs are reached.
        #[test]
        fn any_bytes_parse_without_panic(
            start in 0..3usize,
            bytes in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let signature: &[u8] = [&b""[..], b"PROXY ", b"\r\n\r\n\0\r\nQUIT\n"][start];
            let input = [signature, &bytes].concat();
            if let Ok(Some(h)) = parse_proxy_header(&input) {
                prop_assert!(h.len <= input.len());
            }
        }
    }
}
