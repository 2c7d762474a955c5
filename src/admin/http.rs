//! HTTP/1.1 for the admin port, parsed with httparse: bytes in, a typed request or an error
//! response out; responses to bytes. No I/O here.

use serde::Serialize;

use crate::edge::http::has_token;

/// Headers accepted in an admin request; more is a 431.
pub const MAX_HEADERS: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    Other,
}

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: Method,
    /// The path, still percent-encoded (segments are decoded by the router).
    pub path: String,
    /// The raw query string (without `?`).
    pub query: String,
    /// `Authorization: Bearer <token>`.
    pub bearer: Option<String>,
    /// HTTP/1.1 without `Connection: close` (or 1.0 with `keep-alive`).
    pub keep_alive: bool,
    /// A WebSocket upgrade's `Sec-WebSocket-Key`, when this is a valid upgrade request.
    pub ws_key: Option<String>,
    pub content_length: usize,
    /// Length of the head; the body (if any) follows.
    pub head_len: usize,
}

/// An error answered before routing: status, JSON error code, message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpError {
    pub status: u16,
    pub message: &'static str,
}

const fn err(status: u16, message: &'static str) -> HttpError {
    HttpError { status, message }
}

/// Parses the request head in `buf`. `Ok(None)`: incomplete, read more. `max`: the largest head
/// and the largest body accepted.
pub fn parse(buf: &[u8], max: usize) -> Result<Option<Request>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() >= max {
                Err(err(413, "request head too large"))
            } else {
                Ok(None)
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Err(err(431, "too many headers")),
        Err(_) => return Err(err(400, "malformed HTTP request")),
    };
    if head_len > max {
        return Err(err(413, "request head too large"));
    }
    let method = match req.method {
        Some("GET") => Method::Get,
        Some("HEAD") => Method::Head,
        Some("POST") => Method::Post,
        _ => Method::Other,
    };
    let version = req.version.unwrap_or(1);
    let target = req.path.unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut out = Request {
        method,
        path: path.to_owned(),
        query: query.to_owned(),
        bearer: None,
        keep_alive: version == 1,
        ws_key: None,
        content_length: 0,
        head_len,
    };
    let (mut upgrade, mut conn_upgrade, mut ws13, mut key) = (false, false, false, None);
    let mut seen_length = false;
    for h in req.headers.iter() {
        let Ok(value) = std::str::from_utf8(h.value) else {
            return Err(err(400, "non-UTF-8 header"));
        };
        let name = h.name;
        if name.eq_ignore_ascii_case("authorization") {
            if let Some(t) = crate::edge::http::bearer(value) {
                out.bearer = Some(t.to_owned());
            }
        } else if name.eq_ignore_ascii_case("connection") {
            if has_token(value, "close") {
                out.keep_alive = false;
            } else if has_token(value, "keep-alive") {
                out.keep_alive = true;
            }
            conn_upgrade |= has_token(value, "upgrade");
        } else if name.eq_ignore_ascii_case("content-length") {
            let n = digits(value.trim()).ok_or(err(400, "bad Content-Length"))?;
            if seen_length && n != out.content_length {
                return Err(err(400, "conflicting Content-Length headers"));
            }
            seen_length = true;
            out.content_length = n;
            if out.content_length > max {
                return Err(err(413, "request body too large"));
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(err(400, "chunked request bodies are not accepted"));
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade |= has_token(value, "websocket");
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            ws13 = value.trim() == "13";
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            key = Some(value.trim().to_owned());
        }
    }
    if upgrade && conn_upgrade && ws13 && method == Method::Get {
        use base64::Engine;
        let valid = key.as_deref().is_some_and(|k| {
            base64::engine::general_purpose::STANDARD
                .decode(k)
                .is_ok_and(|b| b.len() == 16)
        });
        if !valid {
            return Err(err(400, "bad Sec-WebSocket-Key"));
        }
        out.ws_key = key;
        out.keep_alive = false;
    }
    Ok(Some(out))
}

/// A decimal number as RFC 9110 writes one (`1*DIGIT`, e.g. Content-Length): ASCII digits only.
/// `str::parse` also takes a leading `+`, which another parser on the path (a proxy) may read
/// differently: the kind of disagreement request smuggling is made of. `None` on anything else,
/// and on overflow.
pub fn digits<T: std::str::FromStr>(s: &str) -> Option<T> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// A response before encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    /// Extra headers (security headers of the dashboard, cache policy).
    pub headers: &'static [(&'static str, &'static str)],
}

/// Every JSON answer: not cached, not sniffed.
const JSON_HEADERS: &[(&str, &str)] = &[
    ("cache-control", "no-store"),
    ("x-content-type-options", "nosniff"),
];

impl Response {
    pub fn json<T: Serialize>(status: u16, body: &T) -> Response {
        Response {
            status,
            content_type: "application/json",
            body: serde_json::to_vec(body).expect("API bodies serialise: plain structs"),
            headers: JSON_HEADERS,
        }
    }

    /// `{"error","message"}` with the code that goes with `status`.
    pub fn error(status: u16, message: &str) -> Response {
        Response::error_as(status, error_code(status), message)
    }

    /// An error whose `error` string is more specific than its status's (e.g. `history_off`).
    pub fn error_as(status: u16, code: &'static str, message: &str) -> Response {
        #[derive(Serialize)]
        struct Body<'a> {
            error: &'static str,
            message: &'a str,
        }
        Response::json(
            status,
            &Body {
                error: code,
                message,
            },
        )
    }

    pub fn text(status: u16, content_type: &'static str, body: Vec<u8>) -> Response {
        Response {
            status,
            content_type,
            body,
            headers: JSON_HEADERS,
        }
    }
}

/// The JSON `error` string of a status (docs/ADMIN.md).
pub fn error_code(status: u16) -> &'static str {
    match status {
        400 => "bad_request",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not_found",
        405 => "method_not_allowed",
        408 => "timeout",
        413 => "too_large",
        431 => "too_large",
        503 => "unavailable",
        _ => "internal",
    }
}

/// The response's bytes. `head_only`: a HEAD request (headers, no body).
pub fn encode(resp: &Response, keep_alive: bool, head_only: bool) -> Vec<u8> {
    use std::io::Write;
    let mut out = Vec::with_capacity(resp.body.len() + 256);
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\ncontent-type: {}\r\ncontent-length: {}\r\nconnection: {}\r\n",
        resp.status,
        crate::edge::http::reason_phrase(resp.status),
        resp.content_type,
        resp.body.len(),
        if keep_alive { "keep-alive" } else { "close" },
    );
    if resp.status == 401 {
        out.extend_from_slice(b"www-authenticate: Bearer\r\n");
    }
    for (k, v) in resp.headers {
        let _ = write!(out, "{k}: {v}\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !head_only {
        out.extend_from_slice(&resp.body);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_requests_and_refuses_bad_ones() {
        let r = parse(
            b"GET /api/online?limit=5 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer abc\r\n\r\n",
            4096,
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.method, Method::Get);
        assert_eq!(
            (r.path.as_str(), r.query.as_str()),
            ("/api/online", "limit=5")
        );
        assert_eq!(r.bearer.as_deref(), Some("abc"));
        // Multi-byte characters around the scheme: no token, and no panic.
        for v in [
            "Bearer\u{e9} x",
            "B\u{e9}arer x",
            "\u{e9}\u{e9}\u{e9}\u{e9}",
            "Bearer ",
            "bearer  tok ",
        ] {
            let req = format!("GET / HTTP/1.1\r\nAuthorization: {v}\r\n\r\n");
            let parsed = parse(req.as_bytes(), 4096).unwrap().unwrap();
            let want = (v == "bearer  tok ").then_some("tok");
            assert_eq!(parsed.bearer.as_deref(), want, "{v:?}");
        }
        assert!(r.keep_alive);
        assert_eq!(parse(b"GET / HTTP/1.1\r\nHost", 4096), Ok(None));
        let close = parse(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", 4096);
        assert!(!close.unwrap().unwrap().keep_alive);
        let old = parse(b"GET / HTTP/1.0\r\n\r\n", 4096).unwrap().unwrap();
        assert!(!old.keep_alive);
        assert_eq!(parse(b"BLAH\r\n\r\n", 4096).unwrap_err().status, 400);
        assert_eq!(parse(&[b'a'; 5000], 4096).unwrap_err().status, 413);
        let big = b"POST /x HTTP/1.1\r\nContent-Length: 99999\r\n\r\n";
        assert_eq!(parse(big, 4096).unwrap_err().status, 413);
        let chunked = b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(parse(chunked, 4096).unwrap_err().status, 400);
        let ws = b"GET /ws/admin HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                   Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
        let ws = parse(ws, 4096).unwrap().unwrap();
        assert_eq!(ws.ws_key.as_deref(), Some("dGhlIHNhbXBsZSBub25jZQ=="));
    }

    #[test]
    fn content_length_is_digits_only() {
        let with = |v: &str| {
            let req = format!("POST /x HTTP/1.1\r\nContent-Length: {v}\r\n\r\n");
            parse(req.as_bytes(), 4096).map(|r| r.unwrap().content_length)
        };
        assert_eq!(with("5"), Ok(5));
        assert_eq!(with("0"), Ok(0));
        assert_eq!(with("007"), Ok(7));
        for bad in [
            "+5",
            "-5",
            "5 5",
            "5,5",
            "0x10",
            "5.0",
            "\u{661}",
            "99999999999999999999999",
        ] {
            assert_eq!(with(bad).unwrap_err().status, 400, "{bad:?}");
        }
        assert_eq!(digits::<usize>(""), None);
        assert_eq!(digits(&usize::MAX.to_string()), Some(usize::MAX));
        assert_eq!(digits::<u64>("+1"), None);
    }

    #[test]
    fn encodes_responses() {
        let r = Response::error(404, "no such user");
        let bytes = String::from_utf8(encode(&r, true, false)).unwrap();
        assert!(bytes.starts_with("HTTP/1.1 404 Not Found\r\n"));
        assert!(bytes.contains("connection: keep-alive\r\n"));
        assert!(bytes.ends_with(r#"{"error":"not_found","message":"no such user"}"#));
        let head = String::from_utf8(encode(&r, false, true)).unwrap();
        assert!(head.ends_with("\r\n\r\n") && head.contains("content-length: 46"));
        let unauth = String::from_utf8(encode(&Response::error(401, "x"), true, false)).unwrap();
        assert!(unauth.contains("www-authenticate: Bearer"));
    }
}
