//! Connections to upstream instances: HTTP/1.1 keep-alive pools, one per instance and worker.
//!
//! Each worker thread owns its pools (a thread-local map), so checking a connection out or back in
//! takes no lock and no atomic. A pool entry is keyed by the instance id, never by address: an
//! instance that is replaced gets fresh connections. A periodic sweep on each worker drops
//! connections that closed or sat idle past the upstream idle timeout.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// The body of a request sent upstream: the client's stream, or nothing (a replayed request).
pub(crate) enum UpBody {
    Client(Incoming),
    Empty,
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            UpBody::Client(b) => Pin::new(b).poll_frame(cx),
            UpBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpBody::Client(b) => b.is_end_stream(),
            UpBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpBody::Client(b) => b.size_hint(),
            UpBody::Empty => SizeHint::with_exact(0),
        }
    }
}

pub(crate) type Sender = SendRequest<UpBody>;

struct Idle {
    tx: Sender,
    since: Instant,
}

thread_local! {
    static POOLS: RefCell<HashMap<u64, Vec<Idle>>> = RefCell::new(HashMap::new());
}

/// Takes an idle connection to the instance, if this worker has one that is still open.
pub(crate) fn checkout(instance: u64) -> Option<Sender> {
    POOLS.with(|p| {
        let mut pools = p.borrow_mut();
        let idle = pools.get_mut(&instance)?;
        while let Some(conn) = idle.pop() {
            if !conn.tx.is_closed() {
                return Some(conn.tx);
            }
        }
        None
    })
}

/// Returns a connection whose last response was read to the end.
pub(crate) fn checkin(instance: u64, tx: Sender, max_idle: usize) {
    if tx.is_closed() {
        return;
    }
    POOLS.with(|p| {
        let mut pools = p.borrow_mut();
        let idle = pools.entry(instance).or_default();
        if idle.len() < max_idle {
            idle.push(Idle { tx, since: Instant::now() });
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
            idle.retain(|c| !c.tx.is_closed() && now.duration_since(c.since) < max_idle);
            !idle.is_empty()
        });
    })
}

/// Why a new connection could not be made. Nothing was sent, so the request may go elsewhere.
#[derive(Debug)]
pub(crate) enum ConnectError {
    Refused(std::io::Error),
    TimedOut,
    Handshake(hyper::Error),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Refused(e) => write!(f, "connect: {e}"),
            ConnectError::TimedOut => f.write_str("connect timed out"),
            ConnectError::Handshake(e) => write!(f, "handshake: {e}"),
        }
    }
}

/// Opens a new HTTP/1.1 connection and spawns its driver on the current worker.
pub(crate) async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Sender, ConnectError> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(ConnectError::Refused(e)),
        Err(_) => return Err(ConnectError::TimedOut),
    };
    let _ = stream.set_nodelay(true);
    let (tx, conn) = hyper::client::conn::http1::Builder::new()
        .writev(false)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(ConnectError::Handshake)?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(%addr, error = %e, "upstream connection ended with an error");
        }
    });
    Ok(tx)
}
