//! Idle upstream connections: HTTP/1.1 keep-alive pools, one per instance and worker.
//!
//! Each worker thread owns its pools (a thread-local map), so checking a connection out or back in
//! takes no lock and no atomic. A pool entry is keyed by the instance id, never by address: an
//! instance that is replaced gets fresh connections. A periodic sweep on each worker drops
//! connections that closed or sat idle past the upstream idle timeout.
//!
//! Connections of instances that take no more traffic are closed at once instead of at the idle
//! timeout: every deploy brings new instances (new ids, new pools), so with a deploy every second
//! the pools of drained colours would otherwise hold thousands of descriptors. A drain that ends
//! and a table store that removes instances send their ids to every worker (`close_idle_of`),
//! and a connection coming back from a request counted in a draining generation is closed
//! instead of pooled (see `body::finish`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use crate::config::ProxyConfig;
use crate::h1::Conn;
use crate::upstream_io::UpstreamIo;
use crate::upstream_tls::UpstreamTls;

struct Idle {
    conn: Conn,
    since: Instant,
}

thread_local! {
    static POOLS: RefCell<HashMap<u64, Vec<Idle>>> = RefCell::new(HashMap::new());
}

/// Takes an idle connection to the instance, if this worker has one that is still open, was made
/// with the TLS settings `tls_id` (0: plain TCP; see `UpstreamTls`) and has not sat idle for
/// `max_idle` (the sweep runs only now and then; past that age the upstream may be closing it as
/// the request goes out). Connections made with other settings are closed.
pub(crate) fn checkout(instance: u64, tls_id: u64, max_idle: Duration) -> Option<Conn> {
    POOLS.with(|p| {
        let mut pools = p.borrow_mut();
        let idle = pools.get_mut(&instance)?;
        while let Some(mut c) = idle.pop() {
            if c.conn.tls_id == tls_id && c.since.elapsed() < max_idle && c.conn.idle_ok() {
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

/// Closes this worker's idle connections to the given instances.
pub(crate) fn close_idle(instances: &[u64]) {
    POOLS.with(|p| {
        let mut pools = p.borrow_mut();
        for id in instances {
            pools.remove(id);
        }
    })
}

/// Runs on every worker: closes the idle connections of each batch of instances it is sent.
///
/// Nothing marks the instances as closed for good: a drained colour stays in the table for an
/// instant rollback, which goes back to the same instances, and their connections must be
/// pooled again then. A batch arriving after such a rollback closes what the rollback's first
/// requests pooled meanwhile, which costs those a reconnect and nothing else.
pub(crate) async fn close_idle_of(mut rx: tokio::sync::mpsc::UnboundedReceiver<Arc<[u64]>>) {
    while let Some(ids) = rx.recv().await {
        close_idle(&ids);
        #[cfg(feature = "hyper-upstream")]
        crate::hyper_upstream::close_idle(&ids);
    }
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
    /// The TLS handshake failed (`upstream_tls`): the reason names the name verified and
    /// rustls' error.
    Tls(String),
    /// The TLS handshake did not finish within the connect timeout.
    TlsTimedOut,
}

impl ConnectError {
    /// The TLS handshake failed or stalled (the TCP connection was made).
    pub(crate) fn is_tls(&self) -> bool {
        matches!(self, ConnectError::Tls(_) | ConnectError::TlsTimedOut)
    }

    /// The failure is this host's, not the instance's: out of file descriptors, memory, buffers
    /// or local ports. It says nothing about the instance, which must not be ejected for it.
    pub(crate) fn is_local(&self) -> bool {
        matches!(self, ConnectError::Refused(e) if crate::is_local_error(e))
    }
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Refused(e) => write!(f, "connect: {e}"),
            ConnectError::TimedOut => f.write_str("connect timed out"),
            ConnectError::Tls(reason) => f.write_str(reason),
            ConnectError::TlsTimedOut => f.write_str("TLS handshake did not finish within the connect timeout"),
        }
    }
}

/// Opens a new connection to an instance, with the same keepalive and user timeout as client
/// connections (see `listen::set_liveness`): an upstream host that vanishes while a response
/// streams, or stops acknowledging what is written to it, is noticed by the kernel. With `tls`,
/// the TLS handshake follows, within its own `connect_timeout`.
pub(crate) async fn connect(
    addr: SocketAddr,
    config: &ProxyConfig,
    tls: Option<&UpstreamTls>,
) -> Result<Conn, ConnectError> {
    let stream = match tokio::time::timeout(config.connect_timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(ConnectError::Refused(e)),
        Err(_) => return Err(ConnectError::TimedOut),
    };
    let _ = stream.set_nodelay(true);
    if let Err(e) = crate::listen::set_liveness(socket2::SockRef::from(&stream), config) {
        tracing::debug!(%addr, error = %e, "could not set keepalive on an upstream connection");
    }
    let Some(tls) = tls else {
        return Ok(Conn::new(UpstreamIo::Plain(stream), 0));
    };
    match tokio::time::timeout(config.connect_timeout, tls.handshake(stream, addr)).await {
        Ok(Ok(stream)) => Ok(Conn::new(UpstreamIo::Tls(Box::new(stream)), tls.id())),
        Ok(Err(reason)) => Err(ConnectError::Tls(reason)),
        Err(_) => Err(ConnectError::TlsTimedOut),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn listener() -> (tokio::net::TcpListener, SocketAddr) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        (l, addr)
    }

    /// Upstream connections get the same liveness settings as client connections: a user
    /// timeout of `send_timeout` and keepalive probes.
    #[tokio::test]
    async fn upstream_connections_have_keepalive_and_a_user_timeout() {
        let (_l, addr) = listener().await;
        let config = ProxyConfig {
            send_timeout: Duration::from_secs(7),
            idle_timeout: Duration::from_secs(40),
            ..Default::default()
        };
        let conn = connect(addr, &config, None).await.unwrap();
        let sock = socket2::SockRef::from(conn.io.tcp());
        assert_eq!(sock.tcp_user_timeout().unwrap(), Some(Duration::from_secs(7)));
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(20));
        assert_eq!(sock.tcp_keepalive_interval().unwrap(), Duration::from_secs(5));
    }

    /// A pooled connection that sat idle for the idle timeout is not handed out, even before
    /// the sweep has come by; a younger one is.
    #[tokio::test]
    async fn a_connection_idle_past_the_timeout_is_not_checked_out() {
        let (l, addr) = listener().await;
        let config = ProxyConfig::default();
        let accept = tokio::spawn(async move {
            let mut held = Vec::new();
            for _ in 0..2 {
                held.push(l.accept().await.unwrap().0);
            }
            held
        });
        let old = connect(addr, &config, None).await.unwrap();
        let young = connect(addr, &config, None).await.unwrap();
        let _held = accept.await.unwrap();
        checkin(7, old, 8);
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(
            checkout(7, 0, Duration::from_millis(40)).is_none(),
            "60 ms idle is past 40 ms"
        );
        checkin(7, young, 8);
        let c = checkout(7, 0, Duration::from_millis(40)).expect("a fresh connection is handed out");
        assert!(c.reused);
    }
}
