//! systemd's service notifications (`sd_notify(3)`), for `Type=notify` units: `READY=1` once the
//! daemon serves (its route table whole and its admin API answering), `STOPPING=1` when a stop
//! begins, and `WATCHDOG=1` every half of `WATCHDOG_USEC` while it runs. Without `NOTIFY_SOCKET`
//! (not started by systemd, or another service type) nothing is sent.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Where to send notifications, read once from the environment at start.
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET` and `WATCHDOG_USEC`/`WATCHDOG_PID`, and removes them from the
    /// environment so that the instances cutover starts do not inherit them and speak for this
    /// unit. Call before any other thread exists (the environment is the process's).
    pub fn from_env() -> Option<Notifier> {
        let target = std::env::var_os("NOTIFY_SOCKET")?;
        let usec = std::env::var("WATCHDOG_USEC").ok();
        let pid = std::env::var("WATCHDOG_PID").ok();
        for var in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"] {
            std::env::remove_var(var);
        }
        let target = target.to_str()?.to_string();
        let addr = match target.strip_prefix('@') {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name.as_bytes()).ok()?
            }
            None => SocketAddr::from_pathname(&target).ok()?,
        };
        let socket = UnixDatagram::unbound().ok()?;
        let _ = socket.set_nonblocking(true);
        // The watchdog is ours unless it names another process.
        let ours = pid.is_none_or(|p| p.trim() == std::process::id().to_string());
        let watchdog = usec
            .and_then(|u| u.trim().parse::<u64>().ok())
            .filter(|&u| u > 0 && ours)
            .map(Duration::from_micros);
        Some(Notifier { socket, addr, watchdog })
    }

    /// Sends one notification (`KEY=value` lines). A failure is logged, never fatal: the
    /// service manager is not the daemon's reason to stop serving.
    pub fn send(&self, state: &str) {
        if let Err(e) = self.socket.send_to_addr(state.as_bytes(), &self.addr) {
            tracing::warn!(error = %e, "cannot notify the service manager");
        }
    }

    /// How often to send `WATCHDOG=1`: half the interval systemd expects, if it expects any.
    pub fn watchdog_every(&self) -> Option<Duration> {
        self.watchdog.map(|d| d / 2)
    }
}
