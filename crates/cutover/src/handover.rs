//! Listening sockets that outlive a daemon: taken over at start (from systemd's socket
//! activation, or from the daemon being replaced), and handed to a new binary by
//! `cutover upgrade` without one connection refused.
//!
//! Both directions speak systemd's protocol: the sockets are descriptors 3 and up, `LISTEN_FDS`
//! says how many. A daemon started either way takes the TCP sockets whose addresses its
//! `[server] listen` and `preview_listen` name, and a unix socket as its admin socket (a TCP one
//! if its address is the TCP admin address); it binds the rest as usual.
//!
//! A handover, in order (see [`hand_over`]): the old daemon parks its control (instances keep
//! running, recorded; the proxy keeps serving from its route table; the state directory is let
//! go), then starts the new binary with every listening socket, the admin socket among them.
//! The new daemon loads the committed state, adopts the instances, checks them once, fills its
//! route table and only then accepts, from the same sockets: for a moment both accept, each
//! from a whole table. When it serves it says `READY=1` on the handover socket; the old daemon
//! then stops accepting and finishes what it has (in-flight requests; HTTP/1 clients are told
//! `Connection: close`; WebSockets run until they close or the shutdown window ends, then get
//! Close 1001, spread). Whatever stops the new daemon before it is ready (a binary that does
//! not run, a bad config, a timeout) leaves the old one serving and managing as before.

use std::net::TcpListener;
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

use crate::sd_notify::{Notifier, HANDOVER_SOCKET};

/// Listening sockets this process was started with.
#[derive(Default)]
pub struct Inherited {
    pub tcp: Vec<TcpListener>,
    pub unix: Vec<UnixListener>,
    /// In a fleet: the lease of the daemon this one replaces ([`FLEET_LEASE`]).
    pub fleet_lease: Option<i64>,
}

/// The variable that passes a fleet node's etcd lease to the daemon that replaces it.
pub const FLEET_LEASE: &str = "CUTOVER_FLEET_LEASE";

/// Takes the sockets passed with `LISTEN_FDS` (none without it), and removes the variables so
/// that the instances cutover starts do not see them. A `LISTEN_PID` naming another process
/// means they are not ours. Call before any other thread exists (the environment is the
/// process's).
pub fn take_inherited() -> anyhow::Result<Inherited> {
    let mut fds = listenfd::ListenFd::from_env();
    std::env::remove_var("LISTEN_FDNAMES");
    let mut inherited = Inherited {
        fleet_lease: std::env::var(FLEET_LEASE).ok().and_then(|v| v.parse().ok()),
        ..Inherited::default()
    };
    std::env::remove_var(FLEET_LEASE);
    for i in 0..fds.len() {
        let fd = 3 + i;
        if let Ok(Some(l)) = fds.take_tcp_listener(i) {
            inherited.tcp.push(l);
            continue;
        }
        match fds.take_unix_listener(i) {
            Ok(Some(l)) => inherited.unix.push(l),
            _ => anyhow::bail!(
                "descriptor {fd}, passed with LISTEN_FDS, is not a TCP or unix stream socket; pass only the sockets of `[server] listen`, `preview_listen` and `admin`"
            ),
        }
    }
    Ok(inherited)
}

/// The new daemon said it serves.
pub struct HandedOver {
    pub pid: u32,
}

/// Starts `binary` with `args` and every socket in `sockets` (as descriptors 3 and up), and
/// waits until it says it serves, exits, or `timeout` passes. On any failure the new process is
/// gone when this returns, and the reason says what happened.
pub async fn hand_over(
    binary: &Path,
    args: &[std::ffi::OsString],
    sockets: Vec<OwnedFd>,
    state_dir: &Path,
    manager: Option<&Notifier>,
    fleet_lease: Option<i64>,
    timeout: Duration,
) -> Result<HandedOver, String> {
    let path = state_dir.join("handover.sock");
    let _ = std::fs::remove_file(&path);
    let notify = UnixDatagram::bind(&path).map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    let _remove = RemoveOnDrop(path.clone());
    notify
        .set_nonblocking(true)
        .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    let notify = tokio::net::UnixDatagram::from_std(notify).map_err(|e| e.to_string())?;

    let count = sockets.len();
    let mut cmd = tokio::process::Command::new(binary);
    cmd.args(args)
        .env("LISTEN_FDS", count.to_string())
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDNAMES")
        .env(HANDOVER_SOCKET, &path)
        .stdin(std::process::Stdio::null())
        // Its own process group: a signal to this daemon's group (a Ctrl-C in its terminal) is
        // not one for its successor.
        .process_group(0)
        .kill_on_drop(false);
    for (var, value) in manager.map(|m| m.env()).unwrap_or_default() {
        cmd.env(var, value);
    }
    if let Some(lease) = fleet_lease {
        cmd.env(FLEET_LEASE, lease.to_string());
    }
    let mappings = sockets
        .into_iter()
        .enumerate()
        .map(|(i, fd)| command_fds::FdMapping {
            parent_fd: fd,
            child_fd: 3 + i as i32,
        })
        .collect();
    command_fds::CommandFdExt::fd_mappings(&mut cmd, mappings).map_err(|e| format!("cannot pass the sockets: {e}"))?;
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
    let pid = child.id().unwrap_or(0);
    tracing::info!(pid, binary = %binary.display(), "new daemon started; waiting until it serves");

    let mut last_status = String::new();
    // The `STATUS=` line of a notification, kept; whether it says `READY=1`.
    let read = |bytes: &[u8], last_status: &mut String| {
        let text = String::from_utf8_lossy(bytes);
        for line in text.lines() {
            if let Some(status) = line.strip_prefix("STATUS=") {
                *last_status = status.to_string();
            }
        }
        text.lines().any(|l| l == "READY=1")
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = vec![0u8; 4096];
    let failure = loop {
        tokio::select! {
            // First: what the new daemon said before it exited is already queued when its exit
            // is seen, and is the reason to report.
            biased;
            got = notify.recv(&mut buf) => {
                let Ok(n) = got else { continue };
                if read(&buf[..n], &mut last_status) {
                    return Ok(HandedOver { pid });
                }
            }
            status = child.wait() => {
                let how = match status {
                    Ok(s) => describe_exit(s),
                    Err(e) => format!("could not be waited for ({e})"),
                };
                break format!("the new daemon ({}) {how} before it served", binary.display());
            }
            _ = tokio::time::sleep_until(deadline) => {
                break format!(
                    "the new daemon ({}) was not serving within {:?}; it was stopped",
                    binary.display(),
                    timeout
                );
            }
        }
    };
    // Anything it said that is still queued.
    while let Ok(n) = notify.try_recv(&mut buf) {
        read(&buf[..n], &mut last_status);
    }
    // Make sure it is gone, whatever it did: a second daemon must not run on.
    let _ = child.start_kill();
    let _ = child.wait().await;
    Err(if last_status.is_empty() {
        failure
    } else {
        format!("{failure}: {last_status}")
    })
}

fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => format!("was killed by signal {sig}"),
        _ => "ended".to_string(),
    }
}

/// The binary an upgrade starts: the one named, or the file this process was started from
/// (read at start: a package upgrade replacing the file later does not change the path).
/// Refused unless it is an executable file.
pub fn check_binary(binary: &Path) -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(binary).map_err(|e| format!("binary {}: {e}", binary.display()))?;
    if !meta.is_file() {
        return Err(format!("binary {} is not a file", binary.display()));
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(format!(
            "binary {} is not executable; `chmod +x` it first",
            binary.display()
        ));
    }
    Ok(binary.to_path_buf())
}

/// The path of this process's binary, at start.
pub fn own_binary() -> anyhow::Result<PathBuf> {
    std::env::current_exe().context("cannot tell which file this process runs")
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
