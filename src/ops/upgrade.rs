//! Zero-downtime upgrades (SPEC §11, docs/OPERATIONS.md).
//!
//! The running server listens on a Unix control socket (`upgrade.socket`, mode 0600; a peer of
//! another uid is refused). `presenced upgrade` (or SIGUSR2) asks it to upgrade:
//!
//! 1. The old process starts the binary (the path it was started from, or one named in the
//!    request) with the same arguments, and `PRESENCED_UPGRADE_SOCKET`/`_NONCE` in its
//!    environment. The new process connects to the control socket and says `TAKEOVER nonce`.
//! 2. The old process sends its listening sockets (`SCM_RIGHTS`), then its presence state
//!    ([`super::handover`]), and from then on every changed user's record.
//! 3. The new process starts on those sockets with those users and says `READY`. The old one
//!    tells systemd the new main pid, stops accepting, lets go of the socket's path, and
//!    closes its sessions with 1001 spread over `drain_ms`; each stays held, so watchers see no
//!    flap while clients reconnect. When the last is closed it says `Drained` and exits.
//!
//! Any failure before `READY` (the new process exits, says `ERR`, or runs past
//! `upgrade.timeout_ms`) kills the new process, and the old one goes on serving as before.

use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, IoSlice, IoSliceMut, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::socket::{self, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};

use super::handover::{self, Frame};
use super::notify;
use crate::config::ValidConfig;
use crate::net::Listening;
use crate::presence::handover::UserRecord;
use crate::server::Doors;

/// Environment of the new process: the control socket to take over from, and the nonce that
/// proves it is the process the old one started.
pub const ENV_SOCKET: &str = "PRESENCED_UPGRADE_SOCKET";
pub const ENV_NONCE: &str = "PRESENCED_UPGRADE_NONCE";
/// File descriptors per `SCM_RIGHTS` message (the kernel's limit is 253).
const FDS_PER_MESSAGE: usize = 200;
/// Control connections served at once; more wait in the listen backlog.
const MAX_CONTROL_CONNECTIONS: usize = 8;
/// Longest request line on the control socket.
const MAX_LINE: u64 = 4096;
/// Changed users' records waiting for the new process.
const DELTA_QUEUE: usize = 1 << 20;

/// One batch of sockets in a hand-over: which role and address each passed fd serves.
#[derive(Serialize, Deserialize)]
struct SocketBatch {
    sockets: Vec<(String, SocketAddr)>,
    more: bool,
}

// --- The control socket (every serving process). ---

/// What the control socket needs to start an upgrade.
pub struct Upgrader {
    cfg: ValidConfig,
    doors: Doors,
    path: PathBuf,
    /// The binary and arguments this process was started with.
    exe: PathBuf,
    args: Vec<OsString>,
    /// Extra environment for the new process (a generated JWT secret, so its tokens go on
    /// verifying).
    env: Vec<(String, String)>,
    /// An upgrade is running (or this process has handed over: then for good).
    busy: AtomicBool,
    /// This process took over from an old one that is still draining: the next upgrade waits
    /// until that one is done (its sessions' records still come here).
    finishing: AtomicBool,
    /// The nonce of the new process being waited for, and where its connection goes.
    pending: Mutex<Option<(String, mpsc::SyncSender<UnixStream>)>>,
    connections: AtomicUsize,
    /// In a cluster: the last upgrade handed the bus identity over to its new process.
    bus_handed: AtomicBool,
}

impl Upgrader {
    pub fn new(
        cfg: ValidConfig,
        doors: Doors,
        path: PathBuf,
        env: Vec<(String, String)>,
    ) -> io::Result<Arc<Upgrader>> {
        Ok(Arc::new(Upgrader {
            cfg,
            doors,
            path,
            exe: std::env::current_exe()?,
            args: std::env::args_os().skip(1).collect(),
            env,
            busy: AtomicBool::new(false),
            finishing: AtomicBool::new(false),
            pending: Mutex::new(None),
            connections: AtomicUsize::new(0),
            bus_handed: AtomicBool::new(false),
        }))
    }

    /// Binds the control socket (mode 0600) and serves it on a thread. A path left behind by
    /// a dead process is replaced; one a live process answers on is refused.
    pub fn listen(self: &Arc<Self>) -> io::Result<()> {
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!(
                        "upgrade.socket {}: something other than a socket is there; \
                         point upgrade.socket at a free path",
                        self.path.display()
                    ),
                ));
            }
            if UnixStream::connect(&self.path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "upgrade.socket {}: another process serves it",
                        self.path.display()
                    ),
                ));
            }
            std::fs::remove_file(&self.path)?;
        }
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let listener = UnixListener::bind(&self.path)?;
        std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o600))?;
        let me = self.clone();
        std::thread::Builder::new()
            .name("upgrade-ctl".into())
            .spawn(move || me.serve(listener))?;
        tracing::info!(socket = %self.path.display(), "upgrade control socket listening");
        Ok(())
    }

    fn serve(self: Arc<Self>, listener: UnixListener) {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            if self.connections.fetch_add(1, Ordering::AcqRel) >= MAX_CONTROL_CONNECTIONS {
                self.connections.fetch_sub(1, Ordering::AcqRel);
                let _ = (&conn).write_all(b"ERR too many control connections\n");
                continue;
            }
            let me = self.clone();
            let spawned = std::thread::Builder::new()
                .name("upgrade-conn".into())
                .spawn(move || {
                    me.connection(conn);
                    me.connections.fetch_sub(1, Ordering::AcqRel);
                });
            if spawned.is_err() {
                self.connections.fetch_sub(1, Ordering::AcqRel);
            }
            if self.busy.load(Ordering::Acquire) && !self.path.exists() {
                return; // handed over: the path is the new process's now
            }
        }
    }

    fn connection(self: &Arc<Self>, conn: UnixStream) {
        if let Err(why) = same_uid(&conn) {
            tracing::warn!(why, "upgrade control socket: connection refused");
            let _ = (&conn).write_all(format!("ERR {why}\n").as_bytes());
            return;
        }
        // A request line comes at once; an idle peer must not hold a slot the new process of
        // an upgrade may need.
        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
        let Ok(line) = read_line(&conn) else {
            return;
        };
        let _ = conn.set_read_timeout(None);
        let mut words = line.split_whitespace();
        let answer = match (words.next(), words.next()) {
            (Some("UPGRADE"), binary) => match self.upgrade(binary.map(PathBuf::from)) {
                Ok(done) => format!("OK {done}\n"),
                Err(why) => format!("ERR {why}\n"),
            },
            (Some("TAKEOVER"), Some(nonce)) => {
                let pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                match pending.as_ref() {
                    Some((want, tx)) if want == nonce => {
                        let _ = tx.try_send(conn);
                        return;
                    }
                    _ => "ERR no upgrade is waiting for this process\n".into(),
                }
            }
            (Some("STATUS"), _) => {
                let state = if self.busy.load(Ordering::Acquire) {
                    "upgrading"
                } else {
                    "serving"
                };
                format!("OK {state} pid {}\n", std::process::id())
            }
            _ => "ERR unknown request: UPGRADE [binary] or STATUS\n".into(),
        };
        let _ = (&conn).write_all(answer.as_bytes());
    }

    /// Runs an upgrade to `binary` (default: the one this process was started from). `Ok`
    /// once the new process serves (this one then drains and exits); `Err` says why it did
    /// not, and this process goes on serving.
    pub fn upgrade(self: &Arc<Self>, binary: Option<PathBuf>) -> Result<String, String> {
        if self.finishing.load(Ordering::Acquire) {
            return Err(
                "the previous upgrade is still finishing (its old process drains); \
                        try again after drain_ms"
                    .into(),
            );
        }
        if self.busy.swap(true, Ordering::AcqRel) {
            return Err(
                "an upgrade is already in progress (or this process has handed over)".into(),
            );
        }
        let started = Instant::now();
        notify::reloading();
        notify::status("upgrading: starting the new process");
        match self.try_upgrade(binary.unwrap_or_else(|| self.exe.clone()), started) {
            Ok(done) => Ok(done),
            Err(why) => {
                tracing::error!(why, "upgrade failed: this process goes on serving");
                *self.pending.lock().unwrap_or_else(|e| e.into_inner()) = None;
                self.doors.on_each(|s| s.cancel_handover());
                notify::tell("READY=1");
                notify::status(&format!("serving (the last upgrade failed: {why})"));
                self.busy.store(false, Ordering::Release);
                Err(why)
            }
        }
    }

    fn try_upgrade(self: &Arc<Self>, binary: PathBuf, started: Instant) -> Result<String, String> {
        let deadline = started + Duration::from_millis(self.cfg.upgrade.timeout_ms);
        let nonce = format!("{:032x}", rand::random::<u128>());
        let (tx, rx) = mpsc::sync_channel(1);
        *self.pending.lock().unwrap_or_else(|e| e.into_inner()) = Some((nonce.clone(), tx));
        let mut cmd = Command::new(&binary);
        cmd.args(&self.args)
            .env(ENV_SOCKET, &self.path)
            .env(ENV_NONCE, &nonce)
            // systemd's WATCHDOG_PID names this process; the new one feeds the watchdog as
            // itself (NotifyAccess=all), and this one stops once it has handed over.
            .env_remove("WATCHDOG_PID")
            .stdin(Stdio::null());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let mut child =
            Guard(Some(cmd.spawn().map_err(|e| {
                format!("cannot start {}: {e}", binary.display())
            })?));
        let pid = child.pid();
        tracing::info!(pid, binary = %binary.display(), "upgrade: new process started");
        let timeout_ms = self.cfg.upgrade.timeout_ms;
        // Between waits: the new process still runs, and the deadline has not passed.
        let still_on = |child: &mut Guard, what: &str| {
            child.check_alive()?;
            if Instant::now() >= deadline {
                return Err(format!(
                    "the new process {what} within upgrade.timeout_ms ({timeout_ms} ms)"
                ));
            }
            Ok(())
        };
        // 1. Its connection.
        let stream = loop {
            match rx.recv_timeout(Duration::from_millis(20)) {
                Ok(s) => break s,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err("the control socket went away".into())
                }
            }
            still_on(&mut child, "did not connect")?;
        };
        *self.pending.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let answers = answers(stream.try_clone().map_err(|e| e.to_string())?);
        // A failed send most often means the new process gave up: its own word says why.
        let said = |what: &str, e: io::Error| match answers.recv_timeout(Duration::from_secs(2)) {
            Ok(Ok(line)) => refused(&line),
            _ => format!("{what}: {e}"),
        };
        // No write may outlast the deadline (a new process that stops reading must not hang
        // this thread, and with it every later upgrade).
        let left = deadline.saturating_duration_since(Instant::now());
        stream
            .set_write_timeout(Some(left.max(Duration::from_millis(1))))
            .map_err(|e| e.to_string())?;
        // 2. The sockets, then the state, then the changes.
        let sockets = self
            .doors
            .listening()
            .map_err(|e| format!("duplicating the listening sockets: {e}"))?;
        send_sockets(&stream, &sockets).map_err(|e| said("sending the listening sockets", e))?;
        drop(sockets);
        // In a cluster: the node's bus identity, for the new process to speak as this node.
        let bridge_wait = Duration::from_millis(
            self.cfg
                .cluster
                .as_ref()
                .map_or(0, |c| c.request_timeout_ms)
                + 1_000,
        );
        let hello = match self.doors.cluster() {
            None => None,
            Some(c) => {
                let mut hello = c
                    .hello(bridge_wait)
                    .ok_or("the cluster bridge did not answer; try again")?;
                hello.hold_ms = self.cfg.drain_ms + self.cfg.upgrade.reattach_ms;
                Some(hello)
            }
        };
        let (dtx, drx) = flume::bounded::<UserRecord>(DELTA_QUEUE);
        let records: Vec<UserRecord> = self
            .doors
            .on_each(move |s| s.begin_handover(dtx.clone()))
            .into_iter()
            .flatten()
            .flatten()
            .collect();
        let users = records.len();
        let mut out =
            io::BufWriter::with_capacity(1 << 16, stream.try_clone().map_err(|e| e.to_string())?);
        handover::write_state(&mut out, &records, hello.as_ref())
            .and_then(|()| out.flush())
            .map_err(|e| said("sending the presence state", e))?;
        drop(records);
        // 3. Its answer, forwarding changes meanwhile.
        loop {
            forward(&drx, &mut out).map_err(|e| format!("sending changes: {e}"))?;
            match answers.recv_timeout(Duration::from_millis(10)) {
                Ok(Ok(line)) if line == "READY" => break,
                Ok(Ok(line)) => return Err(refused(&line)),
                Ok(Err(e)) => return Err(format!("the new process's connection: {e}")),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err("the new process hung up".into())
                }
            }
            still_on(&mut child, "was not ready")?;
        }
        // Ready: the service is the new process's from here on, and nothing below undoes
        // that. The new process outlives this one (systemd follows MAINPID), so it is neither
        // killed nor waited for.
        let child = child.0.take().expect("held until here");
        let ready_ms = started.elapsed().as_millis();
        notify::hand_over_to(pid);
        notify::silence();
        let _ = std::fs::remove_file(&self.path);
        // From here a write may take a while (the new process is busy with reconnects), but
        // not for ever: a stuck link ends the forwarding (see `drain`).
        let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
        self.doors.on_each(|s| s.stop_accepting());
        // In a cluster: this process stops speaking for the node, and the new one takes over
        // from where it stopped (or, should the bridge not answer, as a new incarnation).
        self.bus_handed.store(false, Ordering::Release);
        if let Some(c) = self.doors.cluster() {
            let unpublished: Vec<String> = (self.doors.on_each(|s| s.take_backlog_users()))
                .into_iter()
                .flatten()
                .flatten()
                .collect();
            let budget = Duration::from_millis(
                self.cfg
                    .cluster
                    .as_ref()
                    .map_or(0, |c| c.request_timeout_ms),
            );
            let handoff = c.hand_off(unpublished, budget);
            if handoff.is_none() {
                tracing::error!("upgrade: the cluster bridge did not hand the bus over; the new process joins as a new incarnation");
            }
            // The changes this process published are the new one's before it speaks: their
            // records go first.
            let written = forward(&drx, &mut out)
                .and_then(|()| handover::write_handoff(&mut out, handoff.as_ref()))
                .and_then(|()| out.flush());
            match written {
                Ok(()) => self.bus_handed.store(handoff.is_some(), Ordering::Release),
                Err(e) => {
                    tracing::warn!(error = %e, "upgrade: could not hand the bus over to the new process");
                    // It joins as a new incarnation (if the link still carries this).
                    let _ = handover::write_handoff(&mut out, None).and_then(|()| out.flush());
                }
            }
        }
        if let Err(e) = handover::write_released(&mut out).and_then(|()| out.flush()) {
            tracing::warn!(error = %e, "upgrade: could not tell the new process the control socket is free");
        }
        tracing::info!(
            pid,
            ready_ms,
            users,
            drain_ms = self.cfg.drain_ms,
            "upgrade: the new process serves; draining this one"
        );
        let me = self.clone();
        std::thread::Builder::new()
            .name("upgrade-drain".into())
            .spawn(move || me.drain(drx, out, child))
            .map_err(|e| {
                format!("starting the drain (the new process serves; stop this one by hand): {e}")
            })?;
        Ok(format!("new process {pid} ready in {ready_ms} ms with {users} users; this one drains over {} ms", self.cfg.drain_ms))
    }
}

/// What the new process's `ERR why` line says, for `presenced upgrade`.
fn refused(line: &str) -> String {
    let why = line.strip_prefix("ERR ").unwrap_or(line);
    format!("the new process refused to take over: {why}")
}

/// The new process, killed unless the upgrade succeeds.
struct Guard(Option<Child>);

impl Guard {
    fn pid(&self) -> u32 {
        self.0.as_ref().map_or(0, Child::id)
    }

    fn check_alive(&mut self) -> Result<(), String> {
        match self.0.as_mut().map(Child::try_wait) {
            Some(Ok(Some(status))) => Err(format!(
                "the new process exited ({status}) before it was ready; its log says why"
            )),
            _ => Ok(()),
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One request line, read a byte at a time: a buffered reader could take bytes after it that
/// belong to whoever reads the connection next (the hand-over).
fn read_line(conn: &UnixStream) -> io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while (line.len() as u64) < MAX_LINE {
        match (&*conn).read(&mut byte)? {
            0 => break,
            _ if byte[0] == b'\n' => break,
            _ => line.push(byte[0]),
        }
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// The new process's lines (`READY`, `ERR why`), read on a thread.
fn answers(stream: UnixStream) -> mpsc::Receiver<io::Result<String>> {
    let (tx, rx) = mpsc::channel();
    let _ = std::thread::Builder::new()
        .name("upgrade-answers".into())
        .spawn(move || {
            let mut r = BufReader::new(stream.take(MAX_LINE));
            let mut line = String::new();
            let got = match r.read_line(&mut line) {
                Ok(0) => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed")),
                Ok(_) => Ok(line.trim_end().to_owned()),
                Err(e) => Err(e),
            };
            let _ = tx.send(got);
        });
    rx
}

/// Writes the changed users' records queued so far.
fn forward(deltas: &flume::Receiver<UserRecord>, out: &mut impl Write) -> io::Result<()> {
    let mut any = false;
    while let Ok(rec) = deltas.try_recv() {
        handover::write_delta(out, &rec)?;
        any = true;
    }
    if any {
        out.flush()?;
    }
    Ok(())
}

impl Upgrader {
    /// The old process after the hand-over: sessions closed over `drain_ms`, changes forwarded
    /// until the last is closed, then `Drained`, then this process stops (SIGTERM to itself).
    /// Should the new process die first, the drain is called off and this process serves
    /// again ([`Upgrader::resume`]).
    fn drain(
        self: Arc<Self>,
        deltas: flume::Receiver<UserRecord>,
        mut out: impl Write,
        mut child: Child,
    ) {
        let drain_ms = self.cfg.drain_ms;
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let shards = self
            .doors
            .on_each(move |s| {
                let (s, done) = (s.clone(), done_tx.clone());
                glommio::spawn_local(async move {
                    s.drain_for_upgrade(drain_ms).await;
                    let _ = done.send(());
                })
                .detach();
            })
            .into_iter()
            .flatten()
            .count();
        let mut drained = 0;
        let mut link = true;
        while drained < shards {
            if let Ok(Some(status)) = child.try_wait() {
                tracing::error!(%status, "upgrade: the new process died during the drain; this one serves again");
                self.resume(&format!("the new process died during the drain ({status})"));
                return;
            }
            if link && forward(&deltas, &mut out).is_err() {
                tracing::warn!("upgrade: the new process's link broke during the drain");
                link = false;
            }
            match done_rx.recv_timeout(Duration::from_millis(5)) {
                Ok(()) => drained += 1,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        if link {
            let _ = forward(&deltas, &mut out);
            let _ = handover::write_drained(&mut out).and_then(|()| out.flush());
        }
        // The new process outlives this one (systemd follows MAINPID): neither killed nor
        // waited for.
        drop(child);
        tracing::info!("upgrade: drained; stopping");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGTERM);
    }

    /// The new process died after it took over: this process calls its drain off, accepts
    /// again on the same listening sockets (so what queued in them meanwhile is served), takes
    /// the control socket back and is the service again for systemd.
    fn resume(self: &Arc<Self>, why: &str) {
        if let Some(c) = self.doors.cluster() {
            // Not handed over: the new process spoke as a new incarnation, so must this one.
            c.take_back(!self.bus_handed.load(Ordering::Acquire));
        }
        self.doors.reclaim_sockets();
        self.doors.on_each(|s| s.relisten());
        notify::unsilence();
        notify::tell(&format!("MAINPID={}\nREADY=1", std::process::id()));
        notify::status(&format!("serving (the last upgrade failed late: {why})"));
        if let Err(e) = self.listen() {
            tracing::error!(error = %e, socket = %self.path.display(),
                "upgrade: cannot serve the control socket again; no further upgrades until restart");
        }
        self.busy.store(false, Ordering::Release);
    }
}

/// Refuses a peer whose uid is not this process's.
fn same_uid(conn: &UnixStream) -> Result<(), String> {
    let cred = socket::getsockopt(conn, socket::sockopt::PeerCredentials)
        .map_err(|e| format!("cannot read the peer's credentials: {e}"))?;
    // SAFETY: geteuid cannot fail and touches no memory.
    let mine = unsafe { libc::geteuid() };
    if cred.uid() != mine {
        return Err(format!(
            "peer uid {} is not this server's uid {mine}",
            cred.uid()
        ));
    }
    Ok(())
}

/// Sends the listening sockets in batches: each a length-prefixed JSON [`SocketBatch`] with
/// its descriptors attached.
fn send_sockets(stream: &UnixStream, sockets: &[Listening]) -> io::Result<()> {
    let mut chunks: Vec<&[Listening]> = sockets.chunks(FDS_PER_MESSAGE).collect();
    if chunks.is_empty() {
        chunks.push(&[]);
    }
    let last = chunks.len() - 1;
    for (i, chunk) in chunks.into_iter().enumerate() {
        let batch = SocketBatch {
            sockets: chunk.iter().map(|l| (l.role.clone(), l.addr)).collect(),
            more: i < last,
        };
        let json = serde_json::to_vec(&batch)?;
        let mut msg = (json.len() as u32).to_le_bytes().to_vec();
        msg.extend_from_slice(&json);
        let fds: Vec<RawFd> = chunk.iter().map(|l| l.fd.as_raw_fd()).collect();
        let cmsg = [ControlMessage::ScmRights(&fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
        let sent = socket::sendmsg::<()>(
            stream.as_raw_fd(),
            &[IoSlice::new(&msg)],
            cmsgs,
            MsgFlags::empty(),
            None,
        )
        .map_err(io::Error::from)?;
        if sent < msg.len() {
            (&*stream).write_all(&msg[sent..])?;
        }
    }
    Ok(())
}

/// Receives what [`send_sockets`] sent.
fn recv_sockets(stream: &UnixStream) -> io::Result<Vec<Listening>> {
    let mut out = Vec::new();
    loop {
        let mut len = [0u8; 4];
        let mut cmsg = nix::cmsg_space!([RawFd; FDS_PER_MESSAGE]);
        let mut fds: Vec<OwnedFd> = Vec::new();
        let got = {
            let mut iov = [IoSliceMut::new(&mut len)];
            let msg = socket::recvmsg::<()>(
                stream.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(io::Error::from)?;
            for c in msg.cmsgs() {
                if let ControlMessageOwned::ScmRights(raw) = c {
                    // SAFETY: descriptors the kernel just installed in this process for us.
                    fds.extend(
                        raw.into_iter()
                            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                    );
                }
            }
            msg.bytes
        };
        if got == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the old process hung up",
            ));
        }
        if got < 4 {
            (&*stream).read_exact(&mut len[got..])?;
        }
        let n = u32::from_le_bytes(len);
        if n > 1 << 20 {
            return Err(io::Error::other("a socket batch over 1 MiB"));
        }
        let mut json = vec![0u8; n as usize];
        (&*stream).read_exact(&mut json)?;
        let batch: SocketBatch = serde_json::from_slice(&json)?;
        if batch.sockets.len() != fds.len() {
            return Err(io::Error::other(format!(
                "{} sockets announced, {} received",
                batch.sockets.len(),
                fds.len()
            )));
        }
        out.extend(
            batch
                .sockets
                .into_iter()
                .zip(fds)
                .map(|((role, addr), fd)| Listening { role, addr, fd }),
        );
        if !batch.more {
            return Ok(out);
        }
    }
}

// --- The new process. ---

/// The new process's link to the old one.
pub struct Successor {
    stream: UnixStream,
    /// Everything after the sockets is read through this one buffer, from the state to the
    /// last frame: a second reader would lose what the first had buffered.
    reader: std::sync::Mutex<Option<BufReader<UnixStream>>>,
    /// The old process's format version ([`handover::State::version`]).
    version: std::sync::atomic::AtomicU16,
    socket: PathBuf,
}

/// Whether this process was started by an upgrade; then connects to the old process and
/// introduces itself.
pub fn successor() -> Option<Result<Successor, String>> {
    let socket = PathBuf::from(std::env::var_os(ENV_SOCKET)?);
    let nonce = std::env::var(ENV_NONCE).unwrap_or_default();
    // Not passed on to anything this process starts (its own upgrades set their own).
    std::env::remove_var(ENV_SOCKET);
    std::env::remove_var(ENV_NONCE);
    Some((|| {
        let stream = UnixStream::connect(&socket).map_err(|e| {
            format!(
                "upgrade: cannot reach the old process at {}: {e}",
                socket.display()
            )
        })?;
        (&stream)
            .write_all(format!("TAKEOVER {nonce}\n").as_bytes())
            .map_err(|e| format!("upgrade: {e}"))?;
        Ok(Successor {
            stream,
            reader: std::sync::Mutex::new(None),
            version: std::sync::atomic::AtomicU16::new(handover::VERSION),
            socket,
        })
    })())
}

impl Successor {
    /// The old process's sockets and presence (at most `max_state_bytes`).
    pub fn receive(&self, max_state_bytes: u64) -> Result<crate::server::Takeover, String> {
        let sockets = recv_sockets(&self.stream)
            .map_err(|e| format!("upgrade: receiving the listening sockets: {e}"))?;
        let clone = self
            .stream
            .try_clone()
            .map_err(|e| format!("upgrade: {e}"))?;
        let mut r = BufReader::with_capacity(1 << 16, clone);
        let state = handover::read_state(&mut r, max_state_bytes)
            .map_err(|e| format!("upgrade: the old process's state was refused: {e}"))?;
        *self.reader.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
        self.version.store(state.version, Ordering::Release);
        Ok(crate::server::Takeover {
            sockets,
            records: state.records,
            bus: state.hello,
        })
    }

    /// Tells the old process why this one gives up (it goes on serving). Then waits (a
    /// little) for it to hang up: closing first, with its sockets and state unread, would
    /// reset the connection and lose the reason.
    pub fn refuse(&self, why: &str) {
        let _ = (&self.stream).write_all(format!("ERR {}\n", why.replace('\n', " ")).as_bytes());
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
        let _ = self.stream.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = io::copy(&mut &self.stream, &mut io::sink());
    }

    /// Says `READY`, then follows the old process on a thread: its changes go to the owner
    /// shards, and when it lets go of the control socket's path this process takes it (with
    /// `upgrader`). When it has drained (or is gone), what it still served is held for the
    /// reattach window.
    ///
    /// In a cluster, the old process hands the bus over right after `READY`; should nothing
    /// come within `bus_wait` (it hangs), this process speaks as a new incarnation.
    pub fn ready(
        self,
        doors: Doors,
        upgrader: Option<Arc<Upgrader>>,
        bus_wait: Duration,
    ) -> io::Result<()> {
        if let Some(u) = &upgrader {
            u.finishing.store(true, Ordering::Release);
        }
        (&self.stream).write_all(b"READY\n")?;
        if let Some(c) = doors.cluster().cloned() {
            // A no-op once the bus was handed over.
            std::thread::Builder::new()
                .name("upgrade-bus-wait".into())
                .spawn(move || {
                    std::thread::sleep(bus_wait);
                    c.take_over(None);
                })?;
        }
        std::thread::Builder::new()
            .name("upgrade-old".into())
            .spawn(move || follow(self, doors, upgrader))?;
        Ok(())
    }
}

fn follow(s: Successor, doors: Doors, upgrader: Option<Arc<Upgrader>>) {
    let taken = s.reader.lock().unwrap_or_else(|e| e.into_inner()).take();
    let Some(mut r) = taken else {
        tracing::error!("upgrade: following the old process before its state was read");
        if let Some(c) = doors.cluster() {
            c.take_over(None);
        }
        doors.on_each(|shard| shard.end_old());
        return;
    };
    let mut listening = false;
    let take_socket = |listening: &mut bool| {
        if *listening {
            return;
        }
        *listening = true;
        if let Some(u) = &upgrader {
            if let Err(e) = u.listen() {
                tracing::error!(error = %e, socket = %s.socket.display(),
                    "upgrade: cannot serve the control socket; no further upgrades until restart");
            }
        }
    };
    let mut updates = 0u64;
    let version = s.version.load(Ordering::Acquire);
    // The bus hand-over, in a cluster: its users, then the rest.
    let mut bus_users = Vec::new();
    let mut bus_taken = false;
    let why = loop {
        match handover::read_frame(&mut r, version) {
            Ok(Some(Frame::Delta(rec))) => {
                updates += 1;
                let user = rec.user.clone();
                doors.on_owner(&user, move |shard| shard.update_from_old(&rec));
            }
            Ok(Some(Frame::BusUsers(users))) => bus_users.extend(users),
            Ok(Some(Frame::Bus(handoff))) => {
                let handoff = handoff.map(|h| crate::cluster::handoff::Handoff {
                    users: std::mem::take(&mut bus_users),
                    ..h
                });
                if let Some(c) = doors.cluster() {
                    c.take_over(handoff);
                }
                bus_taken = true;
            }
            Ok(Some(Frame::Released)) => {
                // An old process in a cluster hands the bus over before this: none came, so
                // this one speaks as a new incarnation (a no-op when it took no identity).
                if !std::mem::replace(&mut bus_taken, true) {
                    if let Some(c) = doors.cluster() {
                        c.take_over(None);
                    }
                }
                take_socket(&mut listening)
            }
            Ok(Some(Frame::Drained)) => break "drained".to_owned(),
            Ok(None) => break "the old process closed the link".to_owned(),
            Err(e) => break format!("the old process's link broke: {e}"),
        }
    };
    if !bus_taken {
        // The old process went without handing the bus over: this one speaks for the node
        // as a new incarnation (a no-op when it took no identity over).
        if let Some(c) = doors.cluster() {
            c.take_over(None);
        }
    }
    doors.on_each(|shard| shard.end_old());
    take_socket(&mut listening);
    if let Some(u) = &upgrader {
        u.finishing.store(false, Ordering::Release);
    }
    tracing::info!(updates, why, "upgrade: the old process is done");
}

// --- `presenced upgrade`. ---

/// Asks the server on `socket` to upgrade (to `binary`, or its own binary) and waits for the
/// outcome, at most `wait`.
pub fn request(socket: &Path, binary: Option<&Path>, wait: Duration) -> Result<String, String> {
    let stream = UnixStream::connect(socket).map_err(|e| {
        format!(
            "cannot reach the server's control socket {}: {e}",
            socket.display()
        )
    })?;
    let line = match binary {
        Some(b) => format!("UPGRADE {}\n", b.display()),
        None => "UPGRADE\n".to_owned(),
    };
    // A refused peer is answered before the request is read: the answer is what counts.
    let _ = (&stream).write_all(line.as_bytes());
    stream
        .set_read_timeout(Some(wait))
        .map_err(|e| e.to_string())?;
    let mut answer = String::new();
    BufReader::new((&stream).take(MAX_LINE))
        .read_line(&mut answer)
        .map_err(|e| format!("no answer from the server: {e}"))?;
    let answer = answer.trim_end();
    match answer.strip_prefix("OK ") {
        Some(done) => Ok(done.to_owned()),
        None => Err(answer.strip_prefix("ERR ").unwrap_or(answer).to_owned()),
    }
}
