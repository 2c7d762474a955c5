//! The dashboard page and its assets, embedded at compile time (no Node, no build step;
//! provenance and licences of vendored files in `assets/README.md`).
//!
//! `assets/dashboard/index.html` is served at `/`, every other file of `assets/dashboard/` at
//! `/assets/<name>` (the JavaScript is a set of ES modules that import each other by relative
//! path, so a module's URL must be its file name), and the vendored uPlot files at
//! `/assets/<name>`. Anything else is a 404. The tests below fail when a file in
//! `assets/dashboard/` is not in [`FILES`], when an embedded file differs from the one on disk,
//! or when a module imports a path that is not served.

use super::http::Response;

/// Security headers of every dashboard file: nothing but this origin, no inline script, no
/// framing, no referrer (the token lives in the URL fragment, which is never sent anyway).
/// `script-src 'self'` covers the module scripts and everything they import (same origin).
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

/// `(URL path, contents)` of `assets/<dir>/<name>`, served at `/assets/<name>`.
macro_rules! asset {
    ($dir:literal, $name:literal) => {
        (
            concat!("/assets/", $name),
            include_bytes!(concat!("../../assets/", $dir, "/", $name)) as &[u8],
        )
    };
}

/// Every file served: URL path and contents; the content type follows the extension
/// ([`content_type`]). A unit test below keeps this list equal to the `assets/dashboard/` folder.
const FILES: &[(&str, &[u8])] = &[
    ("/", include_bytes!("../../assets/dashboard/index.html")),
    asset!("dashboard", "app.css"),
    asset!("dashboard", "app.js"),
    asset!("dashboard", "api.js"),
    asset!("dashboard", "auth.js"),
    asset!("dashboard", "charts.js"),
    asset!("dashboard", "detail.js"),
    asset!("dashboard", "dom.js"),
    asset!("dashboard", "feed.js"),
    asset!("dashboard", "format.js"),
    asset!("dashboard", "history.js"),
    asset!("dashboard", "replay-chart.js"),
    asset!("dashboard", "replay.js"),
    asset!("dashboard", "socket.js"),
    asset!("dashboard", "state.js"),
    asset!("dashboard", "users.js"),
    asset!("vendor", "uPlot.iife.min.js"),
    asset!("vendor", "uPlot.min.css"),
];

/// The content type of a served path, from its extension. Module scripts must be served as
/// JavaScript: browsers refuse a module of any other type (and `nosniff` forbids guessing).
fn content_type(path: &str) -> Option<&'static str> {
    if path == "/" {
        return Some("text/html; charset=utf-8");
    }
    match path.rsplit_once('.')?.1 {
        "js" => Some("text/javascript; charset=utf-8"),
        "css" => Some("text/css; charset=utf-8"),
        "html" => Some("text/html; charset=utf-8"),
        _ => None,
    }
}

/// The embedded file at `path`, if any (`/index.html` is `/`).
pub fn get(path: &str) -> Option<Response> {
    let path = if path == "/index.html" { "/" } else { path };
    let (path, body) = FILES.iter().find(|(p, _)| *p == path)?;
    Some(Response {
        status: 200,
        content_type: content_type(path)
            .expect("every served file has a known extension (tested below)"),
        body: body.to_vec(),
        headers: HEADERS,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// The URL path a file of `assets/dashboard/` is served at.
    fn url_of(name: &str) -> String {
        if name == "index.html" {
            "/".to_owned()
        } else {
            format!("/assets/{name}")
        }
    }

    #[test]
    fn every_dashboard_file_is_served_as_it_is_on_disk() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/dashboard");
        let mut on_disk = BTreeSet::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            assert!(
                entry.file_type().unwrap().is_file(),
                "assets/dashboard/ holds files only (modules import by file name): {:?}",
                entry.path()
            );
            let name = entry.file_name().into_string().unwrap();
            let url = url_of(&name);
            let served = get(&url).unwrap_or_else(|| {
                panic!("assets/dashboard/{name} is not in FILES (src/admin/assets.rs)")
            });
            assert_eq!(
                served.body,
                std::fs::read(entry.path()).unwrap(),
                "{url} is not assets/dashboard/{name}"
            );
            on_disk.insert(url);
        }
        assert!(on_disk.contains("/assets/app.js"), "the entry module");
        let vendor = ["/assets/uPlot.iife.min.js", "/assets/uPlot.min.css"].map(String::from);
        let expected: BTreeSet<String> = on_disk.into_iter().chain(vendor).collect();
        let served: BTreeSet<String> = FILES.iter().map(|(p, _)| p.to_string()).collect();
        assert_eq!(served, expected, "FILES is the dashboard folder plus uPlot");
        assert_eq!(FILES.len(), served.len(), "no path is served twice");
    }

    #[test]
    fn each_file_has_its_content_type_and_the_csp() {
        for (path, _) in FILES {
            let r = get(path).unwrap();
            let want = match path.rsplit_once('.').map(|(_, ext)| ext) {
                Some("js") => "text/javascript; charset=utf-8",
                Some("css") => "text/css; charset=utf-8",
                _ => "text/html; charset=utf-8",
            };
            assert_eq!(r.content_type, want, "{path}");
            let csp = r
                .headers
                .iter()
                .find(|(k, _)| *k == "content-security-policy")
                .unwrap()
                .1;
            assert!(csp.contains("script-src 'self';"), "{path}: {csp}");
            assert!(!csp.contains("unsafe-"), "{path}: {csp}");
        }
        assert_eq!(get("/index.html").unwrap().body, get("/").unwrap().body);
    }

    #[test]
    fn unknown_paths_are_not_served() {
        for path in [
            "/assets/",
            "/assets/nope.js",
            "/assets/index.html",
            "/assets/uPlot.LICENSE",
            "/assets/../Cargo.toml",
            "/app.js",
            "/assets/app.js/",
            "/assets/APP.JS",
        ] {
            assert!(get(path).is_none(), "{path} is served");
        }
    }

    /// The specifiers of the `import … from "…"` statements in `src` (one per line, or the
    /// closing line of a multi-line import).
    fn imports(src: &str) -> Vec<&str> {
        src.lines()
            .map(str::trim_start)
            .filter(|l| l.starts_with("import ") || l.starts_with("} from "))
            .filter_map(|l| l.split(" from \"").nth(1))
            .filter_map(|rest| rest.split('"').next())
            .collect()
    }

    #[test]
    fn every_module_import_is_served_and_every_module_is_imported() {
        let modules = FILES
            .iter()
            .filter(|(p, _)| p.ends_with(".js") && !p.contains("uPlot")); // uPlot: a classic script
        let mut imported = BTreeSet::from(["/assets/app.js".to_owned()]); // by index.html
        for (path, body) in modules.clone() {
            let src = std::str::from_utf8(body).unwrap();
            assert!(
                src.starts_with("// "),
                "{path} opens with a comment saying what it is for"
            );
            for spec in imports(src) {
                let name = spec.strip_prefix("./").unwrap_or_else(|| {
                    panic!("{path} imports {spec:?}: only ./sibling.js (no bare or absolute paths)")
                });
                let url = format!("/assets/{name}");
                assert!(
                    get(&url).is_some(),
                    "{path} imports {spec}, which is not served"
                );
                imported.insert(url);
            }
        }
        let page = String::from_utf8(get("/").unwrap().body).unwrap();
        assert!(
            page.contains(r#"<script type="module" src="/assets/app.js"></script>"#),
            "index.html loads app.js as a module"
        );
        for (path, _) in modules {
            assert!(
                imported.contains(*path),
                "{path} is served but nothing imports it"
            );
        }
    }
}
