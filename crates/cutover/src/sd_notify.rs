//! systemd's service notifications (`sd_notify(3)`), for `Type=notify` units: `READY=1` once the
//! daemon serves (its route table whole and its admin API answering), `STOPPING=1` when a stop
//! begins, and `WATCHDOG=1` every half of `WATCHDOG_USEC` while it runs. Without `NOTIFY_SOCKET`
//! (not started by systemd, or another service type) nothing is sent.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// The variable naming the handover socket of the daemon being replaced.
pub const HANDOVER_SOCKET: &str = "CUTOVER_HANDOVER_SOCKET";

/// Where to send notifications, read once from the environment at start.
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
    watchdog: Option<Duration>,
    /// The variables as read, for a daemon that takes over from this one (`cutover upgrade`)
    /// and speaks for the unit after it.
    env: Vec<(&'static str, String)>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET` and `WATCHDOG_USEC`/`WATCHDOG_PID`, and removes them from the
    /// environment so that the instances cutover starts do not inherit them and speak for this
    /// unit. Call before any other thread exists (the environment is the process's).
    pub fn from_env() -> Option<Notifier> {
        Notifier::from_vars("NOTIFY_SOCKET", true)
    }

    /// The daemon that started this one for a handover, listening at `$CUTOVER_HANDOVER_SOCKET`
    /// for the same notifications: `READY=1` when this one serves, `STATUS=` with the reason
    /// when it cannot start. Removed from the environment like `NOTIFY_SOCKET`.
    pub fn handover_from_env() -> Option<Notifier> {
        Notifier::from_vars(HANDOVER_SOCKET, false)
    }

    fn from_vars(socket_var: &'static str, watchdog: bool) -> Option<Notifier> {
        let target = std::env::var_os(socket_var)?;
        std::env::remove_var(socket_var);
        let (usec, pid) = if watchdog {
            let read = (std::env::var("WATCHDOG_USEC").ok(), std::env::var("WATCHDOG_PID").ok());
            std::env::remove_var("WATCHDOG_USEC");
            std::env::remove_var("WATCHDOG_PID");
            read
        } else {
            (None, None)
        };
        let target = target.to_str()?.to_string();
        let mut env = vec![(socket_var, target.clone())];
        if let Some(u) = &usec {
            env.push(("WATCHDOG_USEC", u.clone()));
        }
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
        Some(Notifier {
            socket,
            addr,
            watchdog,
            env,
        })
    }

    /// The environment that lets the daemon taking over from this one notify the same manager
    /// (`WATCHDOG_PID` left out: the watchdog then belongs to whichever process reads it).
    pub fn env(&self) -> &[(&'static str, String)] {
        &self.env
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
