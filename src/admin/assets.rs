//! The dashboard page and its assets, embedded at compile time (no Node, no build step;
//! provenance and licences of vendored files in `assets/README.md`).

use super::http::Response;

/// Security headers of every dashboard file: nothing but this origin, no inline script, no
/// framing, no referrer (the token lives in the URL fragment, which is never sent anyway).
const HEADERS: &[(&str, &str)] = &[
    (
        "content-security-policy",
        "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; \
         style-src 'self'; script-src 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("x-frame-options", "DENY"),
    ("cache-control", "no-cache"),
];

const FILES: &[(&str, &str, &[u8])] = &[
    (
        "/",
        "text/html; charset=utf-8",
        include_bytes!("../../assets/dashboard/index.html"),
    ),
    (
        "/assets/app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../assets/dashboard/app.js"),
    ),
    (
        "/assets/app.css",
        "text/css; charset=utf-8",
        include_bytes!("../../assets/dashboard/app.css"),
    ),
    (
        "/assets/uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../assets/vendor/uPlot.iife.min.js"),
    ),
    (
        "/assets/uPlot.min.css",
        "text/css; charset=utf-8",
        include_bytes!("../../assets/vendor/uPlot.min.css"),
    ),
];

/// The embedded file at `path`, if any (`/index.html` is `/`).
pub fn get(path: &str) -> Option<Response> {
    let path = if path == "/index.html" { "/" } else { path };
    FILES
        .iter()
        .find(|(p, _, _)| *p == path)
        .map(|(_, content_type, body)| Response {
            status: 200,
            content_type,
            body: body.to_vec(),
            headers: HEADERS,
        })
}
