//! A headless Chromium driven over the Chrome DevTools Protocol: a blocking WebSocket
//! (tungstenite) to the browser endpoint, one page target attached in flat mode, commands sent
//! with its `sessionId`. Just enough to load a page, poll its DOM, click and screenshot, and to
//! report what the page fetched and what went wrong in it (uncaught exceptions, console and
//! browser-log errors such as a module that failed to load); every wait is bounded and says what
//! it waited for and what it saw.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};
use tungstenite::protocol::WebSocket;
use tungstenite::Message;

/// How long Chromium may take to print its DevTools endpoint (a cold first start is slow).
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one CDP command may take to answer.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`Browser::wait_for`] polls before failing, and how often.
pub const POLL_TIMEOUT: Duration = Duration::from_secs(15);
const POLL_EVERY: Duration = Duration::from_millis(100);
/// How long one blocking read of the DevTools socket waits before checking its deadline.
const READ_SLICE: Duration = Duration::from_millis(500);
/// Chromium's stderr lines kept for failure messages.
const STDERR_LINES_MAX: usize = 200;
/// Page errors kept (uncaught exceptions, console errors, browser-log errors).
const PAGE_ERRORS_MAX: usize = 100;
/// HTTP responses kept (the page's document, scripts and styles: a few dozen).
const RESPONSES_MAX: usize = 500;

/// Records CSP violations and uncaught errors on every document, before the page's own scripts.
const PAGE_PROBE: &str = "window.__cspViolations = [];\
    document.addEventListener('securitypolicyviolation', e => \
      window.__cspViolations.push(e.violatedDirective + ' ' + (e.blockedURI || '') + ' ' + \
        (e.sourceFile || '') + ':' + (e.lineNumber || 0)));";

pub struct Browser {
    ws: WebSocket<TcpStream>,
    /// The attached page's flat-mode session.
    session: String,
    next_id: u64,
    stderr: Arc<Mutex<Vec<String>>>,
    /// Uncaught exceptions, console errors and browser-log errors the page reported, as text.
    page_errors: Vec<String>,
    /// Every HTTP response the page received, in order (at most [`RESPONSES_MAX`]).
    responses: Vec<HttpResponse>,
    /// Held for its drop, declared last so it runs last: the browser dies after the socket
    /// to it is closed.
    _process: Chromium,
}

/// One HTTP response a page received (`Network.responseReceived`).
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub url: String,
    pub status: u64,
    /// The MIME type Chromium took from `content-type` (no parameters).
    pub mime_type: String,
    /// `"script"`, `"document"`, `"stylesheet"`, …
    pub resource_type: String,
    /// Its `content-security-policy` header, if any.
    pub csp: Option<String>,
}

/// The running Chromium and its profile: killed (process group) and removed on drop, which
/// also happens when launching panics half-way.
struct Chromium {
    child: Child,
    profile: PathBuf,
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let pgid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) with a negative pid signals only the process group created for this
        // child (`process_group(0)` at spawn).
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

impl Browser {
    /// Starts `chromium` headless with a fresh profile and opens one blank page of
    /// `width`×`height` CSS pixels.
    pub fn launch(chromium: &Path, width: u32, height: u32) -> Browser {
        let profile = fresh_profile_dir();
        let mut cmd = Command::new(chromium);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--remote-debugging-port=0",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        // Its own process group, so that Drop can kill the renderers and helpers too.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", chromium.display()));
        let mut process = Chromium { child, profile };

        // Drain stderr for the whole run (a full pipe would stall Chromium), keeping the tail.
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let pipe = process.child.stderr.take().expect("stderr is piped");
        let keep = Arc::clone(&stderr);
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    let _ = tx.send(url.trim().to_owned());
                }
                let mut k = keep.lock().unwrap();
                if k.len() == STDERR_LINES_MAX {
                    k.remove(0);
                }
                k.push(line);
            }
        });
        let endpoint = rx.recv_timeout(LAUNCH_TIMEOUT).unwrap_or_else(|_| {
            panic!(
                "chromium printed no 'DevTools listening on ws://…' within {LAUNCH_TIMEOUT:?}; \
                 stderr:\n{}",
                stderr.lock().unwrap().join("\n")
            )
        });

        let ws = connect_devtools(&endpoint);
        let mut b = Browser {
            ws,
            session: String::new(),
            next_id: 1,
            stderr,
            page_errors: Vec::new(),
            responses: Vec::new(),
            _process: process,
        };
        let target = b.browser_call("Target.createTarget", json!({"url": "about:blank"}));
        let target_id = target["targetId"].as_str().expect("a targetId").to_owned();
        let attached = b.browser_call(
            "Target.attachToTarget",
            json!({"targetId": target_id, "flatten": true}),
        );
        b.session = attached["sessionId"]
            .as_str()
            .expect("a sessionId")
            .to_owned();
        b.call("Page.enable", json!({}));
        b.call("Runtime.enable", json!({}));
        // Failed loads (a module's 404, a refused MIME type) reach the browser log, not the
        // page's console API; responses say what was fetched and how it was served.
        b.call("Log.enable", json!({}));
        b.call("Network.enable", json!({}));
        b.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": false}),
        );
        b.call(
            "Page.addScriptToEvaluateOnNewDocument",
            json!({"source": PAGE_PROBE}),
        );
        b
    }

    /// Navigates and waits until the document and its deferred scripts have run.
    pub fn goto(&mut self, url: &str) {
        let r = self.call("Page.navigate", json!({"url": url}));
        assert!(
            r.get("errorText").is_none(),
            "navigating to {url} failed: {r}"
        );
        self.wait_for(
            &format!("{url} to finish loading"),
            "document.readyState",
            |v| v == "complete",
        );
    }

    /// Evaluates `expr` in the page (promises awaited) and returns its JSON value; panics with
    /// the exception when it throws.
    pub fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
        );
        if let Some(ex) = r.get("exceptionDetails") {
            panic!("evaluating `{expr}` threw: {ex}");
        }
        r["result"].get("value").cloned().unwrap_or(Value::Null)
    }

    /// Polls `expr` every 100 ms until `ok` accepts its value, for at most [`POLL_TIMEOUT`];
    /// returns that value. The failure names `what` and shows the last value seen.
    pub fn wait_for(&mut self, what: &str, expr: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + POLL_TIMEOUT;
        loop {
            let v = self.eval(expr);
            if ok(&v) {
                return v;
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {POLL_TIMEOUT:?} waiting for {what}\n  polled: {expr}\n  \
                     last seen: {v}\n  page errors: {:?}",
                    self.page_errors
                );
            }
            std::thread::sleep(POLL_EVERY);
        }
    }

    /// The text of the first element matching `selector` (null when there is none).
    pub fn text(&mut self, selector: &str) -> Value {
        self.eval(&format!(
            "(() => {{ const e = document.querySelector({}); return e ? e.textContent.trim() : null; }})()",
            js_str(selector)
        ))
    }

    /// Waits until the text of `selector` equals `want`.
    pub fn wait_text(&mut self, selector: &str, want: &str) {
        let expr = format!(
            "(() => {{ const e = document.querySelector({}); return e ? e.textContent.trim() : null; }})()",
            js_str(selector)
        );
        self.wait_for(&format!("{selector} to read {want:?}"), &expr, |v| {
            v == want
        });
    }

    /// A real mouse click (press and release) in the middle of the element `selector`, after
    /// scrolling it into view.
    pub fn click(&mut self, selector: &str) {
        self.click_at(selector, 0.5, 0.5);
    }

    /// A real mouse click at a point of the element `selector`, given as fractions of its box
    /// (`0.5, 0.5` is the middle), after scrolling it into view; the pointer moves there first,
    /// as a hand would, so hover state (a chart's cursor) follows it. It waits until that point
    /// holds still over two polls and hits the element itself (not a cover), so that a layout
    /// still settling (a chart appearing above) cannot send the click elsewhere.
    pub fn click_at(&mut self, selector: &str, fx: f64, fy: f64) {
        let expr = format!(
            "(() => {{ const e = document.querySelector({}); if (!e) return null; \
               e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect(); \
               const x = r.left + r.width * {fx}, y = r.top + r.height * {fy}; \
               const hit = document.elementFromPoint(x, y); \
               return {{x, y, w: r.width, h: r.height, hits: !!hit && e.contains(hit)}}; }})()",
            js_str(selector)
        );
        let last = std::cell::RefCell::new(Value::Null);
        let at = self.wait_for(
            &format!("{selector} to be clickable (shown, uncovered, holding still)"),
            &expr,
            |v| {
                let steady = *last.borrow() == *v;
                *last.borrow_mut() = v.clone();
                steady
                    && v["hits"] == true
                    && v["w"].as_f64() > Some(0.0)
                    && v["h"].as_f64() > Some(0.0)
            },
        );
        self.call(
            "Input.dispatchMouseEvent",
            json!({"type": "mouseMoved", "x": at["x"], "y": at["y"]}),
        );
        for kind in ["mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({"type": kind, "x": at["x"], "y": at["y"], "button": "left", "clickCount": 1}),
            );
        }
    }

    /// Resizes the viewport to `width`×`height` CSS pixels (the page lays itself out again).
    pub fn set_viewport(&mut self, width: u32, height: u32) {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": false}),
        );
    }

    /// Sets the value of the input `selector` and fires `input`, as typing would.
    pub fn type_into(&mut self, selector: &str, value: &str) {
        let ok = self.eval(&format!(
            "(() => {{ const e = document.querySelector({}); if (!e) return false; e.focus(); \
               e.value = {}; e.dispatchEvent(new Event('input', {{bubbles: true}})); return true; }})()",
            js_str(selector),
            js_str(value)
        ));
        assert_eq!(ok, true, "no element {selector} to type into");
    }

    /// A PNG of the whole page (beyond the viewport), written to `path`.
    pub fn screenshot(&mut self, path: &Path) {
        let size = self.eval(
            "({w: document.documentElement.scrollWidth, h: document.documentElement.scrollHeight})",
        );
        let r = self.call(
            "Page.captureScreenshot",
            json!({
                "format": "png",
                "captureBeyondViewport": true,
                "clip": {"x": 0, "y": 0, "width": size["w"], "height": size["h"], "scale": 1},
            }),
        );
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().expect("screenshot data"))
            .expect("screenshot is base64");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(path, png).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }

    /// Uncaught exceptions, console errors and browser-log errors reported so far.
    pub fn page_errors(&self) -> &[String] {
        &self.page_errors
    }

    /// The HTTP responses the page received so far (events are read while commands wait for
    /// their answers, so call this after an `eval`).
    pub fn responses(&self) -> &[HttpResponse] {
        &self.responses
    }

    /// A command to the attached page.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        let session = self.session.clone();
        self.send_command(method, params, Some(&session))
    }

    /// A command to the browser itself (no session).
    fn browser_call(&mut self, method: &str, params: Value) -> Value {
        self.send_command(method, params, None)
    }

    fn send_command(&mut self, method: &str, params: Value, session: Option<&str>) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        self.ws
            .send(Message::text(msg.to_string()))
            .unwrap_or_else(|e| panic!("sending {method} to chromium: {e}"));
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        loop {
            if Instant::now() >= deadline {
                panic!("chromium did not answer {method} within {COMMAND_TIMEOUT:?}");
            }
            let frame = match self.ws.read() {
                Ok(Message::Text(t)) => t,
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(e) => panic!(
                    "DevTools connection failed while waiting for {method}: {e}; chromium stderr:\n{}",
                    self.stderr.lock().unwrap().join("\n")
                ),
            };
            let v: Value = serde_json::from_str(&frame).expect("CDP sends JSON");
            if v["id"] == id {
                if let Some(err) = v.get("error") {
                    panic!("{method} failed: {err}");
                }
                return v["result"].clone();
            }
            self.note_event(&v);
        }
    }

    fn note_event(&mut self, v: &Value) {
        let text = match v["method"].as_str() {
            Some("Runtime.exceptionThrown") => {
                let d = &v["params"]["exceptionDetails"];
                let desc = d["exception"]["description"].as_str().unwrap_or("");
                format!("uncaught: {} {desc}", d["text"].as_str().unwrap_or(""))
            }
            Some("Runtime.consoleAPICalled") if v["params"]["type"] == "error" => {
                format!("console.error: {}", v["params"]["args"])
            }
            Some("Log.entryAdded") if v["params"]["entry"]["level"] == "error" => {
                let e = &v["params"]["entry"];
                format!(
                    "log error ({}): {} {}",
                    e["source"].as_str().unwrap_or(""),
                    e["text"].as_str().unwrap_or(""),
                    e["url"].as_str().unwrap_or("")
                )
            }
            Some("Network.responseReceived") => {
                let p = &v["params"];
                let r = &p["response"];
                let csp = r["headers"].as_object().and_then(|h| {
                    h.iter()
                        .find(|(k, _)| k.eq_ignore_ascii_case("content-security-policy"))
                        .and_then(|(_, v)| v.as_str().map(str::to_owned))
                });
                if self.responses.len() < RESPONSES_MAX {
                    self.responses.push(HttpResponse {
                        url: r["url"].as_str().unwrap_or("").to_owned(),
                        status: r["status"].as_f64().unwrap_or(0.0) as u64,
                        mime_type: r["mimeType"].as_str().unwrap_or("").to_owned(),
                        resource_type: p["type"].as_str().unwrap_or("").to_lowercase(),
                        csp,
                    });
                }
                return;
            }
            _ => return,
        };
        if self.page_errors.len() < PAGE_ERRORS_MAX {
            self.page_errors.push(text);
        }
    }
}

/// Connects to `ws://127.0.0.1:PORT/devtools/browser/ID`. The handshake gets the whole command
/// timeout (a busy machine can be slow to answer it, and a blocking handshake cannot resume
/// after a read timeout); afterwards reads time out often, so that command waits stay bounded.
fn connect_devtools(endpoint: &str) -> WebSocket<TcpStream> {
    let hostport = endpoint
        .strip_prefix("ws://")
        .and_then(|r| r.split('/').next())
        .unwrap_or_else(|| panic!("unexpected DevTools endpoint {endpoint:?}"));
    let stream = TcpStream::connect(hostport)
        .unwrap_or_else(|e| panic!("connecting to DevTools at {hostport}: {e}"));
    stream.set_read_timeout(Some(COMMAND_TIMEOUT)).unwrap();
    let (ws, _) = tungstenite::client::client(endpoint, stream)
        .unwrap_or_else(|e| panic!("DevTools WebSocket handshake with {endpoint}: {e}"));
    ws.get_ref().set_read_timeout(Some(READ_SLICE)).unwrap();
    ws
}

/// A new, empty Chromium profile directory under the system temp dir.
fn fresh_profile_dir() -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "presenced-chromium-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create a chromium profile dir");
    dir
}

/// `s` as a JavaScript string literal (JSON strings are valid JS).
pub fn js_str(s: &str) -> String {
    Value::from(s).to_string()
}
