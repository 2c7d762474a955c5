//! External programs some integration tests drive. A missing tool is installed when the machine
//! allows it (`tests/support/ensure-tools.sh`); otherwise the test fails, never skips, so a CI
//! run cannot pass without having run it.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Where Debian's `chromium` package puts its launcher.
const CHROMIUM_DEFAULT: &str = "/usr/bin/chromium";

/// The Chromium binary for browser tests: `$CHROMIUM` or `/usr/bin/chromium` when either
/// exists; otherwise installs the `chromium` package (as root, with apt-get) and uses that.
/// Panics with the reason when none can be had.
pub fn chromium() -> PathBuf {
    if let Some(found) = chromium_candidates().into_iter().find(|p| p.is_file()) {
        return found;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/ensure-tools.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg("chromium")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let path = PathBuf::from(CHROMIUM_DEFAULT);
    if !out.status.success() || !path.is_file() {
        panic!(
            "chromium is required by the dashboard browser test and could not be obtained \
             (set $CHROMIUM to a Chromium binary, or install Debian's `chromium` package).\n\
             {} chromium exited with {}:\n{}{}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
    }
    path
}

fn chromium_candidates() -> Vec<PathBuf> {
    let mut c: Vec<PathBuf> = std::env::var_os("CHROMIUM")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .into_iter()
        .collect();
    c.push(PathBuf::from(CHROMIUM_DEFAULT));
    c
}
