//! External programs some integration tests drive. A missing tool is installed when the machine
//! allows it (`tests/support/ensure-tools.sh`); otherwise the test fails, never skips, so a CI
//! run cannot pass without having run it.

use std::path::{Path, PathBuf};
use std::process::Command;

/// One tool: how to find it, and how to get it when it is not there.
struct Tool {
    /// The argument of `ensure-tools.sh`, and the Debian package's name.
    name: &'static str,
    /// The variable that points at a binary of the caller's choice.
    env: &'static str,
    /// Where the Debian package may put the binary, in the order tried.
    defaults: &'static [&'static str],
    /// Which tests need it, for the failure message.
    needed_by: &'static str,
}

/// Debian's `chromium` package puts its launcher in /usr/bin.
const CHROMIUM: Tool = Tool {
    name: "chromium",
    env: "CHROMIUM",
    defaults: &["/usr/bin/chromium"],
    needed_by: "the dashboard browser test",
};

/// Debian's `nats-server` package puts the server in /usr/sbin (bookworm); /usr/bin too, should
/// a later package move it.
const NATS_SERVER: Tool = Tool {
    name: "nats-server",
    env: "NATS_SERVER",
    defaults: &["/usr/sbin/nats-server", "/usr/bin/nats-server"],
    needed_by: "the tests that run a real NATS server",
};

/// The Chromium binary for browser tests: `$CHROMIUM` or `/usr/bin/chromium` when either
/// exists; otherwise installs the `chromium` package (as root, with apt-get) and uses that.
/// Panics with the reason when none can be had.
pub fn chromium() -> PathBuf {
    ensure(&CHROMIUM)
}

/// The `nats-server` binary for tests that need a real NATS server: `$NATS_SERVER`, or Debian's
/// `/usr/sbin/nats-server` (or `/usr/bin/nats-server`) when one exists; otherwise installs the
/// `nats-server` package (as root, with apt-get) and uses that. Panics with the reason when none
/// can be had.
pub fn nats_server() -> PathBuf {
    ensure(&NATS_SERVER)
}

fn ensure(tool: &Tool) -> PathBuf {
    if let Some(found) = candidates(tool).into_iter().find(|p| p.is_file()) {
        return found;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/ensure-tools.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(tool.name)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let installed = tool
        .defaults
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file());
    match installed {
        Some(path) if out.status.success() => path,
        _ => panic!(
            "{name} is required by {needed_by} and could not be obtained (set ${env} to a \
             {name} binary, or install Debian's `{name}` package).\n\
             {script} {name} exited with {status}:\n{stdout}{stderr}",
            name = tool.name,
            needed_by = tool.needed_by,
            env = tool.env,
            script = script.display(),
            status = out.status,
            stdout = String::from_utf8_lossy(&out.stdout),
            stderr = String::from_utf8_lossy(&out.stderr),
        ),
    }
}

/// `$ENV` when set and not empty, then the package's paths.
fn candidates(tool: &Tool) -> Vec<PathBuf> {
    let mut c: Vec<PathBuf> = std::env::var_os(tool.env)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .into_iter()
        .collect();
    c.extend(tool.defaults.iter().map(PathBuf::from));
    c
}
