//! The WebSocket upgrade request (RFC 6455 §4.2), parsed with httparse: bytes in, a typed
//! request or an HTTP rejection out. No I/O here; the accept loop does the reading.

use base64::Engine;

/// Headers accepted in an upgrade request; more is a 431.
pub const MAX_HEADERS: usize = 32;

/// An upgrade request that passed the HTTP-level checks (not yet authenticated).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct UpgradeRequest {
    /// `Sec-WebSocket-Key`, answered with its accept hash.
    pub key: String,
    /// From `Authorization: Bearer`, else `?token=`.
    pub token: Option<String>,
    pub device: Option<String>,
    pub device_type: Option<String>,
    pub origin: Option<String>,
    /// `?as=<user>`: admin impersonation (see the admin API).
    pub as_user: Option<String>,
    /// Every `X-Forwarded-For` header's value, joined with commas in order (believed only from
    /// a trusted proxy: [`super::proxy`]).
    pub forwarded_for: Option<String>,
    /// The `geo.header` value (a CDN's country, e.g. `CF-IPCountry`), the last one if repeated;
    /// believed only from a trusted proxy.
    pub geo: Option<String>,
    /// Length of the request head; bytes after it already belong to the WebSocket stream.
    pub head_len: usize,
}

/// Why an upgrade is refused: answered as a plain HTTP response, no upgrade.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    pub status: u16,
    pub reason: &'static str,
}

impl Reject {
    pub const fn new(status: u16, reason: &'static str) -> Reject {
        Reject { status, reason }
    }
}

/// Parses the request head in `buf`. `Ok(None)`: incomplete, read more. `geo_header`: the
/// header (`geo.header`) whose value is kept as [`UpgradeRequest::geo`].
pub fn parse_upgrade(
    buf: &[u8],
    geo_header: Option<&str>,
) -> Result<Option<UpgradeRequest>, Reject> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Reject::new(431, "too many headers")),
        Err(_) => return Err(Reject::new(400, "malformed HTTP request")),
    };
    if req.method != Some("GET") {
        return Err(Reject::new(405, "only GET upgrades to a WebSocket"));
    }
    if req.version != Some(1) {
        return Err(Reject::new(400, "HTTP/1.1 required"));
    }
    let target = req.path.unwrap_or("");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if path != "/ws" {
        return Err(Reject::new(404, "not found: the WebSocket endpoint is /ws"));
    }
    let mut out = UpgradeRequest {
        head_len,
        ..UpgradeRequest::default()
    };
    let (mut upgrade, mut connection, mut version) = (false, false, false);
    // Headers that must appear at most once: with two, which one counts would depend on the
    // parser (here the last, in a proxy maybe the first), so an allowlist check could pass on one
    // value while another is used. RFC 9112 §3.2 requires a 400 for a repeated Host.
    let mut seen = Singletons::default();
    let mut geo_seen = 0u32;
    for h in req.headers.iter() {
        let value =
            std::str::from_utf8(h.value).map_err(|_| Reject::new(400, "non-UTF-8 header"))?;
        let name = h.name;
        if name.eq_ignore_ascii_case("upgrade") {
            upgrade |= has_token(value, "websocket");
        } else if name.eq_ignore_ascii_case("connection") {
            connection |= has_token(value, "upgrade");
        } else if name.eq_ignore_ascii_case("host") {
            seen.once(Singleton::Host)?;
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            seen.once(Singleton::Version)?;
            version = value.trim() == "13";
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            seen.once(Singleton::Key)?;
            out.key = value.trim().to_owned();
        } else if name.eq_ignore_ascii_case("authorization") {
            seen.once(Singleton::Authorization)?;
            if let Some(t) = bearer(value) {
                out.token = Some(t.to_owned());
            }
        } else if name.eq_ignore_ascii_case("origin") {
            seen.once(Singleton::Origin)?;
            out.origin = Some(value.to_owned());
        } else if geo_header.is_some_and(|g| name.eq_ignore_ascii_case(g)) {
            // Repeated: which one a proxy meant is unknown, so neither counts.
            geo_seen += 1;
            out.geo = (geo_seen == 1).then(|| value.trim().to_owned());
        } else if name.eq_ignore_ascii_case("x-forwarded-for") {
            // Repeats are one list (RFC 9110 §5.3), as proxies that add a line rather than
            // extend the last one mean it.
            match &mut out.forwarded_for {
                Some(chain) => {
                    chain.push(',');
                    chain.push_str(value);
                }
                None => out.forwarded_for = Some(value.to_owned()),
            }
        }
    }
    if !upgrade || !connection {
        return Err(Reject::new(400, "not a WebSocket upgrade request"));
    }
    if !version {
        return Err(Reject::new(
            400,
            "unsupported Sec-WebSocket-Version (13 required)",
        ));
    }
    let key_ok = base64::engine::general_purpose::STANDARD
        .decode(&out.key)
        .is_ok_and(|k| k.len() == 16);
    if !key_ok {
        return Err(Reject::new(400, "bad Sec-WebSocket-Key"));
    }
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        let slot = match &*k {
            "token" if out.token.is_none() => &mut out.token,
            "device" => &mut out.device,
            "device_type" => &mut out.device_type,
            "as" => &mut out.as_user,
            _ => continue,
        };
        *slot = Some(v.into_owned());
    }
    Ok(Some(out))
}

/// The headers an upgrade request may carry at most once.
#[derive(Clone, Copy)]
enum Singleton {
    Host,
    Origin,
    Authorization,
    Key,
    Version,
}

impl Singleton {
    fn repeated(self) -> Reject {
        Reject::new(
            400,
            match self {
                Singleton::Host => "repeated Host header",
                Singleton::Origin => "repeated Origin header",
                Singleton::Authorization => "repeated Authorization header",
                Singleton::Key => "repeated Sec-WebSocket-Key header",
                Singleton::Version => "repeated Sec-WebSocket-Version header",
            },
        )
    }
}

/// Which [`Singleton`]s a request has shown so far (a bit each).
#[derive(Default)]
struct Singletons(u8);

impl Singletons {
    /// Marks `h` seen; a second sighting is a 400.
    fn once(&mut self, h: Singleton) -> Result<(), Reject> {
        let bit = 1 << h as u8;
        if self.0 & bit != 0 {
            return Err(h.repeated());
        }
        self.0 |= bit;
        Ok(())
    }
}

/// The token of an `Authorization: Bearer <token>` value. Compares bytes, so a value with
/// multi-byte characters near the scheme cannot split a character (which would panic).
pub fn bearer(value: &str) -> Option<&str> {
    let v = value.trim();
    let scheme = v.as_bytes().get(..7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    // The first 7 bytes are ASCII, so byte 7 is a character boundary.
    Some(v[7..].trim()).filter(|t| !t.is_empty())
}

/// Whether a comma-separated header value holds `token` (case-insensitive).
pub fn has_token(value: &str, token: &str) -> bool {
    value
        .split(',')
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// `101 Switching Protocols` for `key`.
pub fn switching_protocols(key: &str) -> Vec<u8> {
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n"
    )
    .into_bytes()
}

/// The reason phrase of the status codes this server sends (both ports).
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    }
}

/// A plain-text error response that closes the connection.
pub fn error_response(status: u16, reason: &str) -> Vec<u8> {
    let text = reason_phrase(status);
    format!(
        "HTTP/1.1 {status} {text}\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{reason}\n",
        reason.len() + 1
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn req(extra: &str, target: &str) -> String {
        format!(
            "GET {target} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n{extra}\r\n"
        )
    }

    #[test]
    fn parses_a_browser_upgrade_with_query_token() {
        let text = req(
            "Origin: https://app\r\n",
            "/ws?token=a%2Eb&device=d1&device_type=ios",
        );
        let mut bytes = text.clone().into_bytes();
        bytes.extend_from_slice(b"\x81\x80early");
        let r = parse_upgrade(&bytes, None).unwrap().unwrap();
        assert_eq!(r.token.as_deref(), Some("a.b"));
        assert_eq!(r.device.as_deref(), Some("d1"));
        assert_eq!(r.device_type.as_deref(), Some("ios"));
        assert_eq!(r.origin.as_deref(), Some("https://app"));
        assert_eq!(
            r.head_len,
            text.len(),
            "bytes after the head are left for the socket"
        );
    }

    #[test]
    fn forwarded_for_lines_are_one_list_in_order() {
        let r = parse_upgrade(
            req(
                "X-Forwarded-For: 1.1.1.1, 2.2.2.2\r\nx-forwarded-for: 3.3.3.3\r\n",
                "/ws",
            )
            .as_bytes(),
            None,
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.forwarded_for.as_deref(), Some("1.1.1.1, 2.2.2.2,3.3.3.3"));
        let none = parse_upgrade(req("", "/ws").as_bytes(), None)
            .unwrap()
            .unwrap();
        assert_eq!(none.forwarded_for, None);
    }

    #[test]
    fn the_geo_header_is_kept_only_when_configured() {
        let text = req("CF-IPCountry:  DE \r\n", "/ws");
        let r = parse_upgrade(text.as_bytes(), Some("cf-ipcountry"))
            .unwrap()
            .unwrap();
        assert_eq!(r.geo.as_deref(), Some("DE"));
        let r = parse_upgrade(text.as_bytes(), None).unwrap().unwrap();
        assert_eq!(r.geo, None);
        let twice = req("CF-IPCountry: DE\r\ncf-ipcountry: FR\r\n", "/ws");
        let r = parse_upgrade(twice.as_bytes(), Some("CF-IPCountry"))
            .unwrap()
            .unwrap();
        assert_eq!(r.geo, None, "repeated: neither counts");
    }

    #[test]
    fn bearer_header_wins_over_query() {
        let r = parse_upgrade(
            req("Authorization: Bearer hdr\r\n", "/ws?token=q").as_bytes(),
            None,
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.token.as_deref(), Some("hdr"));
    }

    #[test]
    fn partial_then_rejections() {
        assert_eq!(parse_upgrade(b"GET /ws HTTP/1.1\r\nHost", None), Ok(None));
        let status = |s: &str| parse_upgrade(s.as_bytes(), None).unwrap_err().status;
        assert_eq!(status(&req("", "/other")), 404);
        assert_eq!(status(&req("", "/ws").replacen("GET", "POST", 1)), 405);
        assert_eq!(
            status(&req("", "/ws").replace("Upgrade: websocket\r\n", "")),
            400
        );
        assert_eq!(
            status(&req("", "/ws").replace("Version: 13", "Version: 8")),
            400
        );
        assert_eq!(status(&req("", "/ws").replace(KEY, "short")), 400);
        assert_eq!(status("\x00\x01garbage\r\n\r\n"), 400);
        let many: String = (0..40).map(|i| format!("X-{i}: y\r\n")).collect();
        assert_eq!(status(&req(&many, "/ws")), 431);
    }

    #[test]
    fn headers_that_must_be_single_are_refused_when_repeated() {
        let token = "Authorization: Bearer t\r\n";
        for (extra, why) in [
            ("Origin: https://app\r\nOrigin: https://evil\r\n", "Origin"),
            ("origin: https://app\r\nORIGIN: https://app\r\n", "Origin"),
            ("Host: y\r\n", "Host"),
            ("Authorization: Bearer other\r\n", "Authorization"),
            (
                "Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n",
                "Sec-WebSocket-Key",
            ),
            ("Sec-WebSocket-Version: 13\r\n", "Sec-WebSocket-Version"),
        ] {
            let text = req(&format!("{token}{extra}"), "/ws");
            let e = parse_upgrade(text.as_bytes(), None).unwrap_err();
            assert_eq!(e.status, 400, "{extra:?}");
            assert!(e.reason.contains(why), "{extra:?}: {}", e.reason);
        }
        // Each once is fine, whatever the case of the name.
        let once = req(&format!("{token}ORIGIN: https://app\r\n"), "/ws");
        let r = parse_upgrade(once.as_bytes(), None).unwrap().unwrap();
        assert_eq!(r.origin.as_deref(), Some("https://app"));
    }

    #[test]
    fn responses() {
        let ok = String::from_utf8(switching_protocols(KEY)).unwrap();
        assert!(ok.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
        let err = String::from_utf8(error_response(401, "token expired")).unwrap();
        assert!(err.starts_with("HTTP/1.1 401 Unauthorized\r\n"));
        assert!(err.ends_with("\r\n\r\ntoken expired\n"));
    }
}
