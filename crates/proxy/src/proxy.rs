//! The `Proxy` handle the control plane drives: start, table updates and switches, drains
//! (`drain`), shutdown. Listeners are in `listen`, workers in `worker`, client connections in
//! `conn`, the request path in `handler`.
//!
//! `workers` threads each run a single-threaded tokio runtime with their own accept socket per
//! listener (`SO_REUSEPORT`, so the kernel spreads connections) and their own upstream pools:
//! a connection is accepted, served and its upstream requests made on one thread, with no
//! cross-thread hand-off on the request path.
//!
//! Shutdown: `shutdown()` stops the accept loops and asks every connection to finish its current
//! request and close (HTTP/1) or to send GOAWAY (HTTP/2); tunnels (upgraded connections) close
//! at random instants over the first half of `shutdown_timeout` less their closing grace (see
//! `tunnel`). Each worker waits for its
//! connections and tunnels up to `shutdown_timeout` before its runtime is dropped, which closes
//! whatever is left.

use std::collections::HashSet;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::config::{ListenerConfig, ProxyConfig};
use crate::error::TableError;
use crate::listen::{adopt_socket, bind};
use crate::shared::Shared;
use crate::table::{Colour, RouteTable};
use crate::tls::{CertificateSet, TlsServer};
use crate::worker::worker;

/// A proxy could not start; nothing was left running.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source} (is another process using the port?)")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("cannot start worker thread: {0}")]
    Thread(io::Error),
    #[error("invalid proxy settings: {0}")]
    Config(String),
}

/// TLS settings could not be built (rustls refused them); nothing changed.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up TLS: {0}")]
pub struct TlsSetupError(String);

/// A running proxy. Cheap to share behind an `Arc`; every method is safe to call from any thread.
pub struct Proxy {
    shared: Arc<Shared>,
    addrs: Vec<SocketAddr>,
    /// A handle on every listening socket until the shutdown; see [`Proxy::listening_sockets`].
    sockets: Mutex<Vec<std::net::TcpListener>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    /// Serializes table updates (read-modify-write); the request path never touches it.
    update: Mutex<()>,
}

impl Proxy {
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Binds every listener (once per worker) and starts the workers. Fails, with nothing left
    /// running, when any address cannot be bound.
    pub fn start(config: ProxyConfig, table: RouteTable) -> Result<Proxy, StartError> {
        let proxy = Proxy::start_closed(config, table)?;
        proxy.open();
        Ok(proxy)
    }

    /// Like [`Proxy::start`], with every listener bound and listening but not yet accepting:
    /// clients that connect wait in the listen backlog until [`Proxy::open`]. For a start that
    /// must finish its route table first (a restart restoring the live colours and their
    /// instances), so that no request is answered from an incomplete table.
    pub fn start_closed(config: ProxyConfig, table: RouteTable) -> Result<Proxy, StartError> {
        let (proxy, _) = Proxy::start_closed_with(config, table, Vec::new())?;
        Ok(proxy)
    }

    /// Like [`Proxy::start_closed`], taking over listening sockets opened elsewhere (by systemd's
    /// socket activation, or by the daemon this one replaces) instead of binding: a configured
    /// listener takes every inherited socket whose local address it names, and every worker
    /// accepts from each of them; a listener with none is bound as usual. The inherited sockets
    /// that no listener names are handed back, untouched.
    pub fn start_closed_with(
        config: ProxyConfig,
        table: RouteTable,
        inherited: Vec<std::net::TcpListener>,
    ) -> Result<(Proxy, Vec<std::net::TcpListener>), StartError> {
        if config.workers == 0 {
            return Err(StartError::Config("workers must be at least 1".into()));
        }
        if config.max_header_bytes < 1024 {
            return Err(StartError::Config("max_header_bytes must be at least 1024".into()));
        }
        crate::limits::fit_descriptors(config.max_connections).map_err(StartError::Config)?;
        let workers = config.workers;
        let reuse = workers > 1;
        let mut inherited: Vec<(Option<SocketAddr>, std::net::TcpListener)> =
            inherited.into_iter().map(|l| (l.local_addr().ok(), l)).collect();
        // listeners[w] = the sockets of worker w, one per configured listener.
        let mut per_worker: Vec<Vec<(std::net::TcpListener, ListenerConfig)>> =
            (0..workers).map(|_| Vec::new()).collect();
        // One handle on every socket, for `listening_sockets`.
        let mut sockets = Vec::new();
        let mut addrs = Vec::new();
        for l in &config.listeners {
            let bind_err = |addr, source| StartError::Bind { addr, source };
            let (mine, rest): (Vec<_>, Vec<_>) = inherited.into_iter().partition(|(a, _)| *a == Some(l.addr));
            inherited = rest;
            if !mine.is_empty() {
                for (_, s) in mine {
                    adopt_socket(&s, &config).map_err(|e| bind_err(l.addr, e))?;
                    for w in per_worker.iter_mut() {
                        w.push((s.try_clone().map_err(|e| bind_err(l.addr, e))?, l.clone()));
                    }
                    sockets.push(s);
                }
                addrs.push(l.addr);
                continue;
            }
            let first = bind(l.addr, reuse, &config).map_err(|source| bind_err(l.addr, source))?;
            let actual = first.local_addr().map_err(|source| bind_err(l.addr, source))?;
            addrs.push(actual);
            sockets.push(first.try_clone().map_err(|e| bind_err(actual, e))?);
            per_worker[0].push((first, l.clone()));
            for w in per_worker.iter_mut().skip(1) {
                let s = bind(actual, true, &config).map_err(|source| bind_err(actual, source))?;
                sockets.push(s.try_clone().map_err(|e| bind_err(actual, e))?);
                w.push((s, l.clone()));
            }
        }
        let unused = inherited.into_iter().map(|(_, l)| l).collect();

        let (expired_tx, mut expired_rx): (Vec<_>, Vec<_>) =
            (0..workers).map(|_| tokio::sync::mpsc::unbounded_channel()).unzip();
        let (close_idle_tx, mut close_idle_rx): (Vec<_>, Vec<_>) =
            (0..workers).map(|_| tokio::sync::mpsc::unbounded_channel()).unzip();
        let tls =
            TlsServer::new(CertificateSet::new()).map_err(|e| StartError::Config(format!("cannot set up TLS: {e}")))?;
        let shared = Arc::new(Shared {
            tls: ArcSwap::from_pointee(tls),
            expired_tx,
            close_idle_tx,
            table: ArcSwap::from_pointee(table),
            conn_limit: Arc::new(Semaphore::new(config.max_connections.max(1))),
            config,
            shutdown: CancellationToken::new(),
            opened: CancellationToken::new(),
            open: AtomicUsize::new(0),
            open_changed: Notify::new(),
        });

        let mut handles = Vec::new();
        for (i, listeners) in per_worker.into_iter().enumerate() {
            let worker_shared = shared.clone();
            let rx = expired_rx.remove(0);
            let close_rx = close_idle_rx.remove(0);
            let h = std::thread::Builder::new()
                .name(format!("cutover-worker-{i}"))
                .spawn(move || worker(worker_shared, listeners, rx, close_rx));
            match h {
                Ok(h) => handles.push(h),
                Err(e) => {
                    shared.shutdown.cancel();
                    for h in handles {
                        let _ = h.join();
                    }
                    return Err(StartError::Thread(e));
                }
            }
        }
        let proxy = Proxy {
            shared,
            addrs,
            sockets: Mutex::new(sockets),
            workers: Mutex::new(handles),
            update: Mutex::new(()),
        };
        Ok((proxy, unused))
    }

    /// A new handle on every listening socket (each worker's, when they have one each), for
    /// handing them to the process that takes over from this one. Empty once the shutdown began:
    /// the sockets are then this process's to close.
    pub fn listening_sockets(&self) -> io::Result<Vec<std::net::TcpListener>> {
        let sockets = self.sockets.lock().unwrap_or_else(|p| p.into_inner());
        sockets.iter().map(|s| s.try_clone()).collect()
    }

    /// The bound addresses, in the order of `ProxyConfig::listeners` (useful with port 0).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// The table requests are routed with right now.
    pub fn table(&self) -> Arc<RouteTable> {
        self.shared.table.load_full()
    }

    /// Replaces the table by `f(current)`. Updates are serialized; when `f` fails nothing changes.
    pub fn update<F>(&self, f: F) -> Result<Arc<RouteTable>, TableError>
    where
        F: FnOnce(&RouteTable) -> Result<RouteTable, TableError>,
    {
        let _serial = self.update.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.shared.table.load();
        let next = f(&current)?;
        Ok(self.store(&current, next))
    }

    /// Holds `service`'s live requests (the preview route is never held) as `hold` says, or lets
    /// them through again (`None`). Requests held by a pause that ends route at once, from the
    /// table stored here.
    pub fn hold(&self, service: &str, hold: Option<crate::table::Hold>) -> Result<(), TableError> {
        let _serial = self.update.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.shared.table.load();
        let mut before = None;
        let next = current.with_service(service, |s| {
            before = std::mem::replace(&mut s.hold, hold);
            Ok(())
        })?;
        self.store(&current, next);
        // After the store: a woken request routes from the table without this pause.
        if let Some(crate::table::Hold::Paused(gate)) = before {
            gate.release();
        }
        Ok(())
    }

    /// Makes `to` the live colour of `service` in one store. Requests already routed keep their
    /// colour; every request whose head arrives after this returns goes to `to`. Returns false,
    /// storing nothing, when `to` was live already.
    /// Any pin the service had ends with the switch (see [`Proxy::switch_pinned`]).
    pub fn switch(&self, service: &str, to: Colour) -> Result<bool, TableError> {
        self.switch_pinned(service, to, None)
    }

    /// [`Proxy::switch`], and with `pin_for`, in the same store: requests with a valid affinity
    /// cookie for the colour live until now keep going there for `pin_for`, while it runs the
    /// release it runs now and has a healthy instance (`crate::affinity`). No pin is set for a
    /// colour without instances or a service without affinity. Whatever was pinned before ends.
    pub fn switch_pinned(&self, service: &str, to: Colour, pin_for: Option<Duration>) -> Result<bool, TableError> {
        let _serial = self.update.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.shared.table.load();
        let svc = current
            .service(service)
            .ok_or_else(|| TableError::UnknownService(service.to_string()))?;
        if svc.active == to && svc.split.is_none() {
            return Ok(false);
        }
        let switched = svc.active != to;
        let next = current.with_service(service, |s| {
            let old = s.active;
            s.split = None;
            if !switched {
                // The end of a gradual switch back to where it began: the split goes, the pin
                // stays as it was.
                return Ok(());
            }
            s.active = to;
            s.pin = match pin_for {
                Some(d) if s.affinity.is_some() && !s.pool(old).instances.is_empty() => Some(crate::affinity::Pin {
                    colour: old,
                    release: s.pool(old).version.clone(),
                    until_ms: crate::table::now_ms().saturating_add(crate::clock::millis(d)),
                }),
                _ => None,
            };
            Ok(())
        })?;
        self.store(&current, next);
        Ok(switched)
    }

    /// A step of a gradual switch of `service`: `per_million` millionths of its live requests
    /// (of its new sessions, with affinity; sessions keep their colour) go to `to`, the rest to
    /// the live colour, from the next request on. `to` must not be the live colour. A share of 0
    /// ends the split; the switch that completes it ([`Proxy::switch`]) ends it too.
    pub fn split(&self, service: &str, to: Colour, per_million: u32) -> Result<(), TableError> {
        self.update(|t| {
            t.with_service(service, |s| {
                if s.active == to {
                    return Err(TableError::SplitToLive {
                        service: service.to_string(),
                        colour: to.as_str(),
                    });
                }
                s.split = (per_million > 0).then_some(crate::table::Split {
                    colour: to,
                    per_million: per_million.min(1_000_000),
                });
                Ok(())
            })
        })
        .map(|_| ())
    }

    /// Makes each `(service, colour)` live in one store: a request whose head arrives after this
    /// returns goes to the new colour of every one of them; none sees some switched and others
    /// not. An unknown service refuses the whole switch (nothing is stored). Pins end, as at any
    /// switch. Returns the services whose live colour changed.
    pub fn switch_many(&self, to: &[(&str, Colour)]) -> Result<Vec<String>, TableError> {
        let _serial = self.update.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.shared.table.load();
        let mut next: Option<crate::table::RouteTable> = None;
        let mut changed = Vec::new();
        for (service, colour) in to {
            let base: &crate::table::RouteTable = next.as_ref().unwrap_or(&current);
            let svc = base
                .service(service)
                .ok_or_else(|| TableError::UnknownService(service.to_string()))?;
            if svc.active == *colour && svc.split.is_none() {
                continue;
            }
            let switched = base.with_service(service, |s| {
                s.active = *colour;
                s.pin = None;
                s.split = None;
                Ok(())
            })?;
            next = Some(switched);
            changed.push(service.to_string());
        }
        if let Some(next) = next {
            self.store(&current, next);
        }
        Ok(changed)
    }

    /// Opens a mirroring window on `service` (see [`crate::Mirror`]): from the next request on,
    /// a sample of its live requests is copied to the mirror's colour. Whatever window was open
    /// before ends.
    pub fn mirror(&self, service: &str, mirror: Arc<crate::Mirror>) -> Result<(), TableError> {
        self.update(|t| {
            t.with_service(service, |s| {
                s.mirror = Some(mirror);
                Ok(())
            })
        })
        .map(|_| ())
    }

    /// Ends the mirroring window `mirror` of `service`, if it is still the open one; copies on
    /// their way finish. Returns whether it was open.
    pub fn end_mirror(&self, service: &str, mirror: &Arc<crate::Mirror>) -> bool {
        let _serial = self.update.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.shared.table.load();
        let open = current
            .service(service)
            .and_then(|s| s.mirror.as_ref())
            .is_some_and(|m| Arc::ptr_eq(m, mirror));
        if !open {
            return false;
        }
        match current.with_service(service, |s| {
            s.mirror = None;
            Ok(())
        }) {
            Ok(next) => {
                self.store(&current, next);
                true
            }
            Err(_) => false,
        }
    }

    /// Ends the pin of `colour` in `service`: its sessions go to the live colour from now on.
    /// Returns false when nothing was pinned there.
    pub fn unpin(&self, service: &str, colour: Colour) -> Result<bool, TableError> {
        let _serial = self.update.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.shared.table.load();
        let svc = current
            .service(service)
            .ok_or_else(|| TableError::UnknownService(service.to_string()))?;
        if svc.pin.as_ref().is_none_or(|p| p.colour != colour) {
            return Ok(false);
        }
        let next = current.with_service(service, |s| {
            s.pin = None;
            Ok(())
        })?;
        self.store(&current, next);
        Ok(true)
    }

    /// Stores `next` as the successor of `current`. Callers hold the update lock.
    ///
    /// Instances of `current` that `next` no longer holds (a stopped colour, a replaced
    /// instance) get no more requests, so every worker closes its idle connections to them now
    /// rather than at the idle timeout. A request still in flight on one checks its connection
    /// back in afterwards only if it was not counted in a draining generation; the periodic
    /// sweep closes such a rare leftover.
    fn store(&self, current: &RouteTable, mut next: RouteTable) -> Arc<RouteTable> {
        next.set_revision(current.revision().wrapping_add(1));
        let kept: HashSet<u64> = next.instance_ids().collect();
        let gone: Arc<[u64]> = current.instance_ids().filter(|id| !kept.contains(id)).collect();
        let next = Arc::new(next);
        self.shared.table.store(next.clone());
        self.shared.close_idle(gone);
        next
    }

    /// Replaces the certificates TLS handshakes choose from, in one store: handshakes from now
    /// on get the new set (sessions from before are not resumed); connections set up before keep
    /// the certificate they were given. Until the first call, TLS listeners have no certificate
    /// and every handshake fails.
    pub fn set_certificates(&self, certificates: CertificateSet) -> Result<(), TlsSetupError> {
        let server = TlsServer::new(certificates).map_err(|e| TlsSetupError(e.to_string()))?;
        self.shared.tls.store(Arc::new(server));
        Ok(())
    }

    /// The certificates TLS handshakes choose from right now.
    pub fn certificates(&self) -> Arc<CertificateSet> {
        self.shared.tls.load().certificates.clone()
    }

    /// Lets the listeners accept: connections waiting in the backlog are served from the table
    /// current from now on. Opening an open proxy does nothing.
    pub fn open(&self) {
        self.shared.opened.cancel();
    }

    /// Begins a graceful shutdown: no new connections; open ones finish their current request.
    pub fn shutdown(&self) {
        self.shared.shutdown.cancel();
        // Without a successor holding them, the sockets close with the accept loops, and
        // clients are refused at once instead of waiting in a backlog nobody accepts from.
        self.sockets.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Waits (blocking the thread) until every worker has stopped. Call after `shutdown`.
    pub fn join(&self) {
        let handles = std::mem::take(&mut *self.workers.lock().unwrap_or_else(|p| p.into_inner()));
        for h in handles {
            let _ = h.join();
        }
    }

    /// Client connections and upgraded tunnels open right now.
    pub fn open_connections(&self) -> usize {
        self.shared.open_connections()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::Service;

    #[tokio::test]
    async fn a_switch_is_one_store_and_a_switch_to_the_live_colour_none() {
        let table = RouteTable::new(vec![Service::new("web")]).unwrap();
        let proxy = Proxy::start(ProxyConfig::default(), table).unwrap();
        let start = proxy.table();
        assert_eq!(
            (start.revision(), start.service("web").unwrap().active),
            (0, Colour::Blue)
        );

        assert!(!proxy.switch("web", Colour::Blue).unwrap(), "blue is live already");
        assert!(Arc::ptr_eq(&proxy.table(), &start), "nothing was stored");

        assert!(proxy.switch("web", Colour::Green).unwrap());
        let switched = proxy.table();
        assert_eq!(switched.revision(), 1);
        assert_eq!(switched.service("web").unwrap().active, Colour::Green);

        let updated = proxy.update(|t| t.with_service("web", |_| Ok(()))).unwrap();
        assert!(Arc::ptr_eq(&updated, &proxy.table()));
        assert_eq!(updated.revision(), 2, "every update is a store, changed or not");
        assert!(proxy.switch("nope", Colour::Green).is_err());
        assert_eq!(proxy.table().revision(), 2);
        proxy.shutdown();
    }
}
