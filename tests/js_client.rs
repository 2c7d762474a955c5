//! The JavaScript client SDK (`clients/js`, docs in its README): its own tests, run with Node's
//! test runner against this build's `presenced` binary. `npm ci` installs its dev packages
//! (`typescript` for the declarations check, `ws` for Node 20, which has no global WebSocket);
//! then `tsc` checks the declarations, and `npm test` runs the pure unit tests and the
//! integration tests against a real `presenced serve` (watch, status, group snapshot, kick,
//! token refresh and expiry, restart, a silent server). Fails, never skips, without Node or npm.

use std::path::Path;
use std::process::Command;

fn run(dir: &Path, args: &[&str]) {
    let out = Command::new("npm")
        .args(args)
        .current_dir(dir)
        .env("PRESENCED_BIN", env!("CARGO_BIN_EXE_presenced"))
        .output()
        .unwrap_or_else(|e| panic!("npm {args:?}: cannot run npm ({e}); install Node.js 20+"));
    assert!(
        out.status.success(),
        "npm {args:?} failed\n--- stdout\n{}\n--- stderr\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_js_client_passes_its_tests_against_this_server() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/js");
    run(&dir, &["ci", "--no-audit", "--no-fund"]);
    run(&dir, &["run", "typecheck"]);
    run(&dir, &["test"]);
}
