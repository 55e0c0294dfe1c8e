//! What every worker and connection of one proxy shares: the route table, the settings, the
//! shutdown signal, the connection count. Owned by the `Proxy` handle; nothing here decides.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::config::ProxyConfig;
use crate::table::{Generation, RouteTable};
use crate::tls::TlsServer;

pub(crate) struct Shared {
    pub(crate) table: ArcSwap<RouteTable>,
    pub(crate) config: ProxyConfig,
    /// The certificates TLS handshakes choose from and the settings around them, swapped whole
    /// by a reload (see `tls`).
    pub(crate) tls: ArcSwap<TlsServer>,
    /// Cancelled when the proxy begins to shut down.
    pub(crate) shutdown: CancellationToken,
    /// Cancelled when the listeners may accept (see `Proxy::open`). Until then connections wait
    /// in the kernel's listen backlog: they are neither refused nor answered.
    pub(crate) opened: CancellationToken,
    /// One per worker: generations whose drain deadline passed (see `deadline`).
    pub(crate) expired_tx: Vec<tokio::sync::mpsc::UnboundedSender<Arc<Generation>>>,
    /// One per worker: instances whose idle upstream connections to close (see `upstream`).
    pub(crate) close_idle_tx: Vec<tokio::sync::mpsc::UnboundedSender<Arc<[u64]>>>,
    pub(crate) conn_limit: Arc<Semaphore>,
    /// Client connections and upgraded tunnels still open, over all workers.
    pub(crate) open: AtomicUsize,
    pub(crate) open_changed: Notify,
}

impl Shared {
    /// Asks every worker to close its idle connections to these instances.
    pub(crate) fn close_idle(&self, instances: Arc<[u64]>) {
        if instances.is_empty() {
            return;
        }
        for tx in &self.close_idle_tx {
            // Fails only once the worker has stopped, and its pools with it.
            let _ = tx.send(instances.clone());
        }
    }

    /// Client connections and upgraded tunnels open right now.
    pub(crate) fn open_connections(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

/// Counts one open connection (or the tunnel it became) in `Shared::open` until dropped.
pub(crate) struct OpenGuard(Arc<Shared>);

impl OpenGuard {
    pub(crate) fn new(shared: &Arc<Shared>) -> OpenGuard {
        shared.open.fetch_add(1, Ordering::AcqRel);
        OpenGuard(shared.clone())
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.open_changed.notify_waiters();
        }
    }
}
