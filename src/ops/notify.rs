//! systemd's notify protocol (`sd_notify(3)`), spoken directly: one datagram of `KEY=VALUE`
//! lines to the Unix socket named by `$NOTIFY_SOCKET` (a path, or `@name` for the abstract
//! namespace). It is a dozen lines over `std`, so no crate is taken for it. Without
//! `$NOTIFY_SOCKET` (not started by systemd) every call is a no-op.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set once this process handed the service over to an upgrade's new process: from then on the
/// new one speaks for the service, and this one must not (a `STOPPING=1` from it would read as
/// the service stopping).
static SILENCED: AtomicBool = AtomicBool::new(false);

/// Stops this process telling the service manager anything (see [`SILENCED`]).
pub fn silence() {
    SILENCED.store(true, Ordering::Release);
}

/// Speaks for the service again: the process it handed over to died (an upgrade that failed
/// late), so this one is the service once more.
pub fn unsilence() {
    SILENCED.store(false, Ordering::Release);
}

/// Sends `state` (e.g. `"READY=1"`, or several lines) to the service manager. `Ok(false)`
/// when there is none to tell, or this process was [`silence`]d.
pub fn send(state: &str) -> io::Result<bool> {
    if SILENCED.load(Ordering::Acquire) {
        return Ok(false);
    }
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let target = target.to_string_lossy().into_owned();
    let sock = UnixDatagram::unbound()?;
    match target.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
        }
        None => {
            sock.send_to(state.as_bytes(), &target)?;
        }
    }
    Ok(true)
}

/// [`send`], with a failure logged instead of returned: telling systemd is never a reason to
/// stop serving.
pub fn tell(state: &str) {
    if let Err(e) = send(state) {
        tracing::warn!(error = %e, state, "could not notify the service manager");
    }
}

/// `READY=1`: started (or, after an upgrade, the new process took over).
pub fn ready() {
    tell("READY=1");
}

/// `RELOADING=1`: an upgrade began (`ExecReload=`).
pub fn reloading() {
    tell("RELOADING=1");
}

/// `STOPPING=1`: shutting down (or draining after a hand-over).
pub fn stopping() {
    tell("STOPPING=1");
}

/// `MAINPID=pid` and `READY=1` in one datagram: the new process of an upgrade is the service
/// now (needs `NotifyAccess=all` in the unit, as the shipped one has).
pub fn hand_over_to(pid: u32) {
    tell(&format!("MAINPID={pid}\nREADY=1"));
}

/// `STATUS=...`: one line shown by `systemctl status`.
pub fn status(line: &str) {
    tell(&format!("STATUS={}", line.replace('\n', " ")));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_notify_socket_nothing_is_sent() {
        // The test runner may itself run under systemd: only assert the no-socket path when
        // there is none.
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            assert!(!send("READY=1").unwrap());
        }
    }
}
