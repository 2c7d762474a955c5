//! Geo data for tests (docs/CONFIG.md, "`[geo]`"), through `tests/support/geo.py`, which installs
//! PyPI's `maxminddb-geolite2`, `maxminddb` and `mmdb-writer` with pip when they are missing.
//! Without Python 3 and pip a test that needs them fails, saying so; it never skips.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

/// Runs `tests/support/geo.py` with `args`; its standard output.
pub fn geo_py(args: &[&str]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/geo.py");
    let out = Command::new("python3")
        .arg(script)
        .args(args)
        .output()
        .expect("python3 runs (the geo tests need Python 3 with pip)");
    assert!(
        out.status.success(),
        "tests/support/geo.py {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A small MaxMind database with `specs` (`CIDR=CC[/City]`), written to `path`.
pub fn write_db(path: &Path, specs: &[&str]) {
    let mut args = vec!["write", path.to_str().unwrap()];
    args.extend_from_slice(specs);
    geo_py(&args);
}
