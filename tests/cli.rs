//! Proves the binary's entry points as a newcomer uses them: `serve` with no configuration prints
//! a working secret, token and URL, and a next command that runs as printed (the README
//! walk-through, over real sockets); `token` mints a token the server accepts and refuses to mint
//! one it would not; `check-config` reads the same environment as `serve`, passes the README's
//! sample config, prints the effective config or names the bad key; `topology` fails on a plan
//! `serve` would refuse and warns on a poor one, in the flags' spelling; logs carry no colour
//! codes when they do not go to a terminal.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{serve_cmd, spawn_serve};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_presenced");

/// `serve` on any port with no admin port and `args`, for a plan it refuses: waits for it to
/// exit (history in `data`).
fn serve_refused(args: &[&str], data: &std::path::Path) -> std::process::Output {
    Command::new(BIN)
        .arg("serve")
        .args(args)
        .args(["--no-admin", "--listen", "127.0.0.1:0"])
        .args(["--jwt-secret", "0123456789abcdef0123"])
        .arg("--data-dir")
        .arg(data)
        .output()
        .unwrap()
}

#[test]
fn serve_with_no_config_prints_a_working_quickstart() {
    let port = common::free_port();
    let mut child = spawn_serve(
        serve_cmd(port, 0)
            .env_remove("PRESENCED_JWT_SECRET")
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    );
    let stdout = BufReader::new(child.child.stdout.take().unwrap());
    let (mut secret, mut url, mut dashboard) = (None, None, None);
    let (mut exported, mut next_command) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(20);
    for line in stdout.lines() {
        let line = line.unwrap();
        if let Some(s) = line.trim().strip_prefix("secret:") {
            secret = Some(s.trim().to_owned());
        }
        if exported.is_some() && next_command.is_none() {
            next_command = Some(line.trim().to_owned());
        }
        if let Some(s) = line.trim().strip_prefix("export PRESENCED_JWT_SECRET=") {
            exported = Some(s.to_owned());
        }
        if let Some(u) = line.trim().strip_prefix("connect:") {
            url = Some(u.trim().to_owned());
        }
        if line.trim().starts_with("http://") && line.contains("/#token=") {
            dashboard = Some(line.trim().to_owned());
            break;
        }
        assert!(Instant::now() < deadline, "quickstart not printed");
    }
    let (secret, url) = (secret.expect("secret printed"), url.expect("url printed"));
    assert_eq!(
        exported.as_deref(),
        Some(secret.as_str()),
        "the hint exports it"
    );
    let token = url.split("token=").nth(1).unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    // The walk-through: alice (printed token) watches bob (token from `presenced token`).
    let mut alice = common::Client::connect(addr, token);
    assert_eq!(alice.welcome["user"], "alice");
    // The printed next command, run as printed (its program is this binary's path), after the
    // printed export.
    let next_command = next_command.expect("a command after the export");
    let mut words = next_command.split_whitespace();
    let program = words.next().unwrap();
    let args: Vec<&str> = words.collect();
    assert_eq!(args, ["token", "--sub", "bob"], "{next_command}");
    let out = Command::new(program)
        .args(args)
        .args(["--groups", "team,ops"])
        .env("PRESENCED_JWT_SECRET", &secret)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let bob_token = String::from_utf8(out.stdout).unwrap();
    alice.subscribe(&["bob"]);
    let _bob = common::Client::connect(addr, bob_token.trim());
    let ev = alice.presence_of("bob");
    assert_eq!(
        (ev["status"].as_str(), ev["devices"].as_u64()),
        (Some("online"), Some(1))
    );
    assert_eq!(alice.request(json!({"op":"ping"}))["type"], "pong");

    // The printed dashboard link: its host is the admin port, its fragment an admin token.
    let dashboard = dashboard.expect("dashboard link printed");
    let (base, admin_token) = dashboard.split_once("/#token=").unwrap();
    let admin: SocketAddr = base.trim_start_matches("http://").parse().unwrap();
    let (code, page) = common::raw_request(admin, "GET / HTTP/1.1\r\nConnection: close\r\n\r\n");
    assert_eq!(code, 200);
    assert!(page.contains("presenced"), "the dashboard page");
    let req = format!(
        "GET /api/online HTTP/1.1\r\nAuthorization: Bearer {admin_token}\r\nConnection: close\r\n\r\n"
    );
    let (code, body) = common::raw_request(admin, &req);
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("\"alice\"") && body.contains("\"bob\""),
        "{body}"
    );
}

#[test]
fn sigterm_closes_sessions_with_1001_and_exits_zero() {
    let port = common::free_port();
    let secret = "a-secret-for-the-sigterm-test";
    let mut child = spawn_serve(
        serve_cmd(port, 0)
            .args(["--jwt-secret", secret])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let token = presenced::auth::mint_hs256(
        secret,
        &presenced::auth::TokenSpec::new("leaver", Duration::from_secs(60)),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut c = common::Client::connect(addr, &token);
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.child.id() as i32, libc::SIGTERM) };
    assert_eq!(c.close_code(), 1001);
    let status = child.child.wait().unwrap();
    assert!(status.success(), "exit status {status}");
}

#[test]
fn check_config_prints_effective_config_or_names_the_bad_key() {
    let dir = std::env::temp_dir().join(format!("presenced-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.toml");
    std::fs::File::create(&good)
        .unwrap()
        .write_all(b"listen = \"0.0.0.0:9000\"\njwt_secret = \"0123456789abcdef0123\"\n[limits]\nmax_subscriptions = 50\n")
        .unwrap();
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success());
    assert!(text.contains("listen = \"0.0.0.0:9000\"") && text.contains("max_subscriptions = 50"));
    assert!(
        !text.contains("0123456789abcdef0123"),
        "the secret is redacted"
    );

    for (body, key) in [
        ("lisen = \"x\"\n", "lisen"),
        ("[limits]\nmax_subscriptions = \"many\"\n", "max_subscriptions"),
        ("jwt_secret = \"short\"\n", "jwt_secret"),
        ("jwt_secret = \"0123456789abcdef0123\"\n[[auth.keys]]\nalg = \"RS256\"\npem = \"/nonexistent.pem\"\n", "auth.keys[0]"),
    ] {
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, body).unwrap();
        let out = Command::new(BIN)
            .args(["check-config", "--config"])
            .arg(&bad)
            .output()
            .unwrap();
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(!out.status.success(), "{body} should fail");
        assert!(err.contains(key), "error `{err}` should name `{key}`");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Runs the binary with `args` (and `env`), without `PRESENCED_JWT_SECRET` from the caller.
fn run(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env_remove("PRESENCED_JWT_SECRET");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn token_mints_only_what_the_server_accepts() {
    // A secret that starts with `-`, as base64 secrets did one time in 64: `--secret=` and the
    // environment both carry it.
    let secret = format!("-{}", common::SECRET);
    let server = common::TestServer::with(1, |c| c.jwt_secret = Some(secret.clone()));
    let with_equals = run(
        &[
            "token",
            &format!("--secret={secret}"),
            "--sub",
            "dash",
            "--device-type",
            "ios",
        ],
        &[],
    );
    assert!(with_equals.status.success(), "{}", stderr(&with_equals));
    let from_env = run(
        &["token", "--sub", "env"],
        &[("PRESENCED_JWT_SECRET", &secret)],
    );
    assert!(from_env.status.success(), "{}", stderr(&from_env));
    for (out, user) in [(with_equals, "dash"), (from_env, "env")] {
        let token = String::from_utf8(out.stdout).unwrap();
        let c = common::Client::connect(server.addr, token.trim());
        assert_eq!(c.welcome["user"], user);
    }

    // Each of these the server would refuse (the secret at start-up, the token at the
    // handshake), so no token is printed and the error names the flag.
    let good = "0123456789abcdef-good";
    let long_sub = "x".repeat(257);
    for (args, flag) in [
        (vec!["--secret", "short-secret", "--sub", "bob"], "--secret"),
        (vec!["--secret", good, "--sub", ""], "--sub"),
        (vec!["--secret", good, "--sub", &long_sub], "--sub"),
        (
            vec!["--secret", good, "--sub", "bob", "--device-type", "phone"],
            "--device-type",
        ),
        (
            vec!["--secret", good, "--sub", "bob", "--ttl", "0s"],
            "--ttl",
        ),
    ] {
        let out = run(&[&["token"], args.as_slice()].concat(), &[]);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(out.stdout.is_empty(), "{args:?}: no token printed");
        let err = stderr(&out);
        assert!(err.contains(flag), "{args:?}: `{err}` should name {flag}");
    }
    // What the server says about a token with a bad device type, for comparison.
    let bad_device = presenced::auth::mint_hs256(&secret, &{
        let mut spec = presenced::auth::TokenSpec::new("x", Duration::from_secs(60));
        spec.device_type = Some("phone".into());
        spec
    });
    assert_eq!(server.status_for(&bad_device).0, 400);
}

/// The README's sample `presenced.toml`, as written there.
fn readme_sample_config() -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find("```toml\n# presenced.toml\n")
        .expect("README has a ```toml block starting `# presenced.toml`")
        + "```toml\n".len();
    let len = readme[start..].find("```").expect("the block ends");
    readme[start..start + len].to_owned()
}

#[test]
fn check_config_reads_the_environment_serve_reads_and_passes_the_readme_sample() {
    let dir = tempfile::tempdir().unwrap();
    // The sample names TLS files under /etc/presenced; they are made here, and only that
    // directory is changed in the text.
    let sample = readme_sample_config();
    assert!(sample.contains("/etc/presenced/"), "{sample}");
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(dir.path().join("cert.pem"), ck.cert.pem()).unwrap();
    std::fs::write(dir.path().join("key.pem"), ck.signing_key.serialize_pem()).unwrap();
    let config = dir.path().join("presenced.toml");
    let tls_dir = format!("{}/", dir.path().display());
    std::fs::write(&config, sample.replace("/etc/presenced/", &tls_dir)).unwrap();
    let config = config.to_str().unwrap();

    // As the README runs it: the secret from the environment.
    let out = run(
        &["check-config", "--config", config],
        &[("PRESENCED_JWT_SECRET", "0123456789abcdef-from-env")],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("jwt_secret = \"<redacted>\""), "{text}");
    assert!(text.contains("session_policy = \"evict_oldest\""), "{text}");
    assert!(!text.contains("from-env"), "the secret is redacted");
    // The environment is really read: a short secret there fails as it would in serve.
    let out = run(
        &["check-config", "--config", config],
        &[("PRESENCED_JWT_SECRET", "short")],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("jwt_secret"), "{}", stderr(&out));
    // No key anywhere: serve would start with a secret of its own, so this is a warning.
    let out = run(&["check-config", "--config", config], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("warning: no JWT key"),
        "{}",
        stderr(&out)
    );
    // Serve's flags apply too.
    let out = run(
        &[
            "check-config",
            "--config",
            config,
            "--shards",
            "3",
            "--no-admin",
        ],
        &[("PRESENCED_JWT_SECRET", "0123456789abcdef-from-env")],
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("shards = 3"), "{text}");
}

#[test]
fn topology_fails_on_plans_serve_refuses_and_warns_on_poor_ones() {
    // A CPU that is not online: serve refuses it, so topology fails and says why.
    let out = run(&["topology", "--shards", "1", "--cpus", "1023"], &[]);
    assert!(!out.status.success());
    let text = String::from_utf8(out.stdout.clone()).unwrap();
    assert!(text.contains("--placement fixed --cpus 1023"), "{text}");
    assert!(
        stderr(&out)
            .contains("error: --shards 1 --placement fixed --cpus 1023: CPU(s) 1023 not online"),
        "{}",
        stderr(&out)
    );
    let data = tempfile::tempdir().unwrap();
    let serve = serve_refused(&["--shards", "1", "--cpus", "1023"], data.path());
    assert!(!serve.status.success(), "and serve does refuse it");

    // Shards sharing a CPU: serve runs it, so a warning and success.
    let out = run(&["topology", "--shards", "2", "--cpus", "0"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out)
        .contains("warning: --shards 2 --placement fixed --cpus 0: 2 shards on 1 CPU(s)"));

    // Placements in the flags' spelling.
    let out = run(
        &["topology", "--shards", "1", "--placement", "unbound"],
        &[],
    );
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("plan: --shards 1 --placement unbound\n"),
        "{text}"
    );
    assert!(!text.contains("Unbound"), "no Rust names: {text}");
}

#[test]
fn history_cpu_past_cpu_setsize_is_refused_and_an_offline_one_reported() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("p.toml");
    std::fs::write(&config, "[history]\ncpu = 5000\n").unwrap();
    let config_arg = config.to_str().unwrap();
    for args in [
        vec!["topology", "--config", config_arg],
        vec!["check-config", "--config", config_arg],
    ] {
        let out = run(&args, &[]);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains("history.cpu"), "{}", stderr(&out));
    }
    // serve used to panic (index past the cpu_set_t) and abort; now it refuses with exit 1.
    let serve = serve_refused(
        &["--config", config_arg, "--placement", "unbound"],
        &dir.path().join("data"),
    );
    assert_eq!(serve.status.code(), Some(1), "{}", stderr(&serve));
    assert!(stdout_and_err(&serve).contains("history.cpu"));

    std::fs::write(&config, "[history]\ncpu = 1023\n").unwrap();
    let out = run(
        &["topology", "--config", config_arg, "--placement", "unbound"],
        &[],
    );
    assert!(out.status.success(), "serve runs it (unpinned): a warning");
    assert!(
        stderr(&out).contains("warning: history.cpu = 1023: not online"),
        "{}",
        stderr(&out)
    );
}

fn stdout_and_err(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(out))
}

#[test]
fn logs_written_to_a_pipe_carry_no_colour_codes() {
    let port = common::free_port();
    let mut child = spawn_serve(
        serve_cmd(port, 0)
            .args(["--jwt-secret", "a-secret-for-the-log-test"])
            .env_remove("NO_COLOR")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let stdout = BufReader::new(child.child.stdout.take().unwrap());
    // serve's first log line (main.rs logs the open-file limit before anything else).
    let first = stdout.lines().next().expect("a log line").unwrap();
    assert!(first.contains("open-file limit"), "{first:?}");
    assert!(
        !first.contains('\u{1b}'),
        "colour codes in a pipe: {first:?}"
    );
    assert!(
        first.contains("INFO") || first.contains("WARN"),
        "{first:?}"
    );
}

/// Every `--flag` of every subcommand, as the binary's own `--help` lists them (clap writes the
/// help from the command definition).
fn long_flags(path: &[&str]) -> Vec<String> {
    let out = Command::new(BIN).args(path).arg("--help").output().unwrap();
    assert!(out.status.success(), "{path:?} --help");
    let help = String::from_utf8(out.stdout).unwrap();
    let mut flags = Vec::new();
    let mut subcommands = Vec::new();
    let mut section = "";
    for line in help.lines() {
        if !line.starts_with(' ') {
            section = line;
            continue;
        }
        let item = line.trim_start();
        match section {
            "Commands:" => {
                let name = item.split_whitespace().next().unwrap();
                if name != "help" {
                    subcommands.push(name.to_owned());
                }
            }
            // Option lines start with their flags; wrapped help text does not.
            "Options:" if item.starts_with('-') => {
                let flag = item
                    .split([' ', ','])
                    .find(|w| w.starts_with("--"))
                    .map(|w| w.split(['=', '<']).next().unwrap().to_owned());
                if let Some(flag) = flag.filter(|f| f != "--help" && f != "--version") {
                    flags.push(format!("{} {flag}", path.join(" ")));
                }
            }
            _ => {}
        }
    }
    for sub in subcommands {
        flags.extend(long_flags(&[path, &[sub.as_str()]].concat()));
    }
    flags
}

#[test]
fn config_md_lists_every_command_line_flag() {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/CONFIG.md")).unwrap();
    let section = doc
        .split("## Command line")
        .nth(1)
        .expect("CONFIG.md has a `## Command line` section");
    let section = section.split("\n## ").next().unwrap();
    let flags = long_flags(&[]);
    assert!(flags.len() > 20, "walked every subcommand: {flags:?}");
    let missing: Vec<&String> = flags
        .iter()
        .filter(|f| {
            // `serve --cpus` → a row for `serve` (or `schema apply`) that names `--cpus`.
            let (cmd, flag) = f.rsplit_once(' ').unwrap();
            !section
                .lines()
                .any(|l| l.starts_with(&format!("| `{cmd}`")) && l.contains(&format!("`{flag}")))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "flags missing from CONFIG.md: {missing:?}"
    );
}

#[test]
fn check_config_redacts_bus_database_and_webhook_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("presenced.toml");
    std::fs::write(
        &config,
        "jwt_secret = \"0123456789abcdef\"\n\
         [history.scylla]\nusername = \"db\"\npassword = \"db-secret\"\n\
         [cluster]\nnats_url = [\"nats://bususer:url-secret@127.0.0.1:4222\"]\n\
         user = \"u\"\npassword = \"bus-secret\"\n\
         [[webhooks]]\nurl = \"https://hookuser:hook-pass@hooks.slack.example/services/T0/B0/slack-secret\"\n\
         secret = \"webhook-signing-secret\"\n",
    )
    .unwrap();
    let out = run(&["check-config", "--config", config.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    for secret in [
        "db-secret",
        "url-secret",
        "bus-secret",
        "bususer",
        "slack-secret",
        "hook-pass",
        "webhook-signing-secret",
    ] {
        assert!(!text.contains(secret), "{secret} shown: {text}");
    }
    assert!(text.contains("nats://<redacted>@127.0.0.1:4222"), "{text}");
    assert!(
        text.contains("url = \"https://hooks.slack.example/<redacted>\""),
        "{text}"
    );
}
