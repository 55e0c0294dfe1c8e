//! The process's file descriptor limit, raised at start so that `max_connections` fits.
//!
//! Every client connection holds one descriptor and, while a request is out, one to its
//! upstream; idle pooled upstream connections hold one each. Many systems start a process with
//! a soft limit of 1,024 and a much higher hard one. A proxy left at the soft limit meets
//! `EMFILE` long before `max_connections`: accepts fail and upstream connects fail (which must
//! not be taken for the instance's fault; see `ConnectError::is_local`).

use nix::sys::resource::{getrlimit, setrlimit, Resource, RLIM_INFINITY};

/// Descriptors kept for everything that is not a proxied connection: listeners, the runtime's
/// event queues, logs, the state store, health checks, the admin API.
const RESERVE: u64 = 256;

/// Raises the soft limit on open files to the hard limit, and refuses a `max_connections` whose
/// client connections alone cannot fit. Returns the limit now in force.
pub(crate) fn fit_descriptors(max_connections: usize) -> Result<u64, String> {
    let (soft, hard) =
        getrlimit(Resource::RLIMIT_NOFILE).map_err(|e| format!("cannot read the open files limit: {e}"))?;
    let limit = if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                tracing::warn!(soft, hard, error = %e, "could not raise the open files limit to its hard limit");
                soft
            }
        }
    } else {
        soft
    };
    let limit_shown = |l: u64| {
        if l == RLIM_INFINITY {
            "unlimited".to_string()
        } else {
            l.to_string()
        }
    };
    let clients = max_connections as u64;
    if limit != RLIM_INFINITY && limit < clients.saturating_add(RESERVE) {
        return Err(format!(
            "max_connections = {clients} does not fit in the {} open files this process may have \
             (RLIMIT_NOFILE): lower max_connections to at most {} or raise the limit \
             (systemd: LimitNOFILE=; a shell: ulimit -n)",
            limit_shown(limit),
            limit.saturating_sub(RESERVE) / 2
        ));
    }
    if limit != RLIM_INFINITY && limit < clients.saturating_mul(2).saturating_add(RESERVE) {
        tracing::warn!(
            max_connections = clients,
            open_files_limit = limit,
            "max_connections busy clients with as many upstream connections would need about {} open files; \
             past the limit new connections wait and upstream connects fail with 503",
            clients * 2 + RESERVE
        );
    }
    Ok(limit)
}
