//! Idle upstream connections: HTTP/1.1 keep-alive pools, one per instance and worker.
//!
//! Each worker thread owns its pools (a thread-local map), so checking a connection out or back in
//! takes no lock and no atomic. A pool entry is keyed by the instance id, never by address: an
//! instance that is replaced gets fresh connections. A periodic sweep on each worker drops
//! connections that closed or sat idle past the upstream idle timeout.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use crate::h1::Conn;

struct Idle {
    conn: Conn,
    since: Instant,
}

thread_local! {
    static POOLS: RefCell<HashMap<u64, Vec<Idle>>> = RefCell::new(HashMap::new());
}

/// Takes an idle connection to the instance, if this worker has one that is still open.
pub(crate) fn checkout(instance: u64) -> Option<Conn> {
    POOLS.with(|p| {
        let mut pools = p.borrow_mut();
        let idle = pools.get_mut(&instance)?;
        while let Some(mut c) = idle.pop() {
            if c.conn.idle_ok() {
                c.conn.reused = true;
                return Some(c.conn);
            }
        }
        None
    })
}

/// Returns a connection whose last exchange completed and that the upstream keeps open.
pub(crate) fn checkin(instance: u64, conn: Conn, max_idle: usize) {
    POOLS.with(|p| {
        let mut pools = p.borrow_mut();
        let idle = pools.entry(instance).or_default();
        if idle.len() < max_idle {
            idle.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    })
}

/// Drops this worker's connections that closed or idled longer than `max_idle`. Run
/// periodically on every worker.
pub(crate) fn sweep(max_idle: Duration) {
    let now = Instant::now();
    POOLS.with(|p| {
        let mut pools = p.borrow_mut();
        pools.retain(|_, idle| {
            idle.retain_mut(|c| now.duration_since(c.since) < max_idle && c.conn.idle_ok());
            !idle.is_empty()
        });
    })
}

/// Why a new connection could not be made. Nothing was sent, so the request may go elsewhere.
#[derive(Debug)]
pub(crate) enum ConnectError {
    Refused(std::io::Error),
    TimedOut,
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Refused(e) => write!(f, "connect: {e}"),
            ConnectError::TimedOut => f.write_str("connect timed out"),
        }
    }
}

/// Opens a new connection to an instance.
pub(crate) async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Conn, ConnectError> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(ConnectError::Refused(e)),
        Err(_) => return Err(ConnectError::TimedOut),
    };
    let _ = stream.set_nodelay(true);
    Ok(Conn::new(stream))
}
