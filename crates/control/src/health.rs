//! Active health checks of upstream instances.
//!
//! This module owns one question: is each instance of one colour of one service fit for traffic
//! right now? A [`HealthChecker`] asks every instance `GET <path>` every `interval` for as long as
//! the colour exists (before and after promotion) and publishes a [`HealthSnapshot`] on a `watch`
//! channel. It never touches the route table, the store or the lifecycle: the daemon maps status
//! changes to route-table updates (`Instance::healthy`) and lifecycle events.
//!
//! How the pieces cooperate:
//! - [`Tracker`] is the pure threshold logic (no sockets, no clock): `healthy` successes in a row
//!   make an instance healthy, `unhealthy` failures in a row make it unhealthy.
//! - [`check_once`] is one check: connect, `GET`, a 2xx answer passes, anything else fails with a
//!   short reason that names the address. The CLI uses it directly.
//! - [`HealthChecker`] runs one task per instance: a jittered first check, then one check per
//!   `interval`, each fed to that instance's `Tracker` and copied into the shared snapshot.
//!
//! Decisions worth knowing:
//! - An instance starts [`Status::Unknown`], which is *not* healthy: the lifecycle waits for
//!   [`HealthSnapshot::all_healthy`], and a freshly started process proves itself first. Unknown
//!   ends after `healthy` successes (healthy) or `unhealthy` failures (unhealthy), whichever run
//!   completes first.
//! - Every check opens a fresh connection and sends `Connection: close`: a pass then also proves
//!   the instance accepts new connections (what the proxy needs), a process restarted on the same
//!   port is never judged through a stale socket, and no idle connection is parked on the
//!   instance. On loopback the extra handshake per interval costs nothing measurable.
//! - The decision is taken on the response head; the body is not read.
//! - Checks of one instance never overlap: each task awaits its check before scheduling the next.
//!   `interval` is measured from the start of one check to the start of the next; a check that
//!   overruns it (possible when `timeout > interval`) is followed by the next one at once.
//! - Subscribers are woken when an instance's status changes or the set of instances changes, not
//!   on every check; the counters (`consecutive_ok`, `last_check_ms`, ...) are current whenever
//!   the snapshot is read.
//!
//! Shutdown: [`HealthChecker::stop`] aborts every task and waits for them; dropping the checker
//! aborts them without waiting. Either way a task checks its `alive` flag before starting a check
//! and before publishing, so nothing starts after the checker is gone and a removed instance never
//! writes into a newer entry for the same address.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use cutover_proxy::{Colour, UpstreamTls};
use http::header::{CONNECTION, HOST, USER_AGENT};
use http_body_util::Empty;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::HealthConfig;

/// What the checks concluded about one instance so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    /// Not enough checks yet for either verdict. Gets no traffic.
    Unknown,
    /// `healthy` checks passed in a row (and fewer than `unhealthy` failed in a row since).
    Healthy,
    /// `unhealthy` checks failed in a row (and fewer than `healthy` passed in a row since).
    Unhealthy,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Unknown => "unknown",
            Status::Healthy => "healthy",
            Status::Unhealthy => "unhealthy",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A change of an instance's [`Status`], returned by [`Tracker::record`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub from: Status,
    pub to: Status,
    /// Why, for logs and events: the streak that decided it and, when failing, the last failure.
    pub reason: String,
}

/// The threshold logic of one instance: pure, so every transition is unit-tested.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tracker {
    healthy_after: u32,
    unhealthy_after: u32,
    status: Status,
    consecutive_ok: u32,
    consecutive_fail: u32,
    last_error: Option<String>,
}

impl Tracker {
    /// A tracker in [`Status::Unknown`]. Thresholds below 1 are treated as 1.
    pub fn new(healthy_after: u32, unhealthy_after: u32) -> Tracker {
        Tracker {
            healthy_after: healthy_after.max(1),
            unhealthy_after: unhealthy_after.max(1),
            status: Status::Unknown,
            consecutive_ok: 0,
            consecutive_fail: 0,
            last_error: None,
        }
    }

    pub fn status(&self) -> Status {
        self.status
    }

    pub fn is_healthy(&self) -> bool {
        self.status == Status::Healthy
    }

    pub fn consecutive_ok(&self) -> u32 {
        self.consecutive_ok
    }

    pub fn consecutive_fail(&self) -> u32 {
        self.consecutive_fail
    }

    /// The reason of the latest failure while failures are in a row; `None` after a success.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// Records one check (`reason` is used only when it failed) and returns the status change it
    /// caused, if any.
    pub fn record(&mut self, ok: bool, reason: &str) -> Option<Change> {
        if ok {
            self.consecutive_ok = self.consecutive_ok.saturating_add(1);
            self.consecutive_fail = 0;
            self.last_error = None;
            if self.status != Status::Healthy && self.consecutive_ok >= self.healthy_after {
                let why = format!("{} passed in a row", checks(self.consecutive_ok));
                return Some(self.move_to(Status::Healthy, why));
            }
        } else {
            self.consecutive_fail = self.consecutive_fail.saturating_add(1);
            self.consecutive_ok = 0;
            self.last_error = Some(reason.to_string());
            if self.status != Status::Unhealthy && self.consecutive_fail >= self.unhealthy_after {
                let why = format!("{} failed in a row, last: {reason}", checks(self.consecutive_fail));
                return Some(self.move_to(Status::Unhealthy, why));
            }
        }
        None
    }

    fn move_to(&mut self, to: Status, reason: String) -> Change {
        let from = std::mem::replace(&mut self.status, to);
        Change { from, to, reason }
    }
}

fn checks(n: u32) -> String {
    if n == 1 {
        "1 check".to_string()
    } else {
        format!("{n} checks")
    }
}

/// The health of one instance as last published.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceHealth {
    pub addr: SocketAddr,
    pub status: Status,
    /// `status == Status::Healthy`: whether the instance belongs in rotation.
    pub healthy: bool,
    pub consecutive_ok: u32,
    pub consecutive_fail: u32,
    /// The latest failure's reason while failures are in a row; `None` after a success.
    pub last_error: Option<String>,
    /// When the latest check finished, in milliseconds since the Unix epoch; `None` before the
    /// first one.
    pub last_check_ms: Option<u64>,
}

impl InstanceHealth {
    fn unknown(addr: SocketAddr) -> InstanceHealth {
        InstanceHealth {
            addr,
            status: Status::Unknown,
            healthy: false,
            consecutive_ok: 0,
            consecutive_fail: 0,
            last_error: None,
            last_check_ms: None,
        }
    }

    fn update(&mut self, tracker: &Tracker, now_ms: u64) {
        self.status = tracker.status();
        self.healthy = tracker.is_healthy();
        self.consecutive_ok = tracker.consecutive_ok();
        self.consecutive_fail = tracker.consecutive_fail();
        self.last_error = tracker.last_error.clone();
        self.last_check_ms = Some(now_ms);
    }
}

/// The health of every instance of one colour, in the order they were given.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HealthSnapshot {
    pub instances: Vec<InstanceHealth>,
}

impl HealthSnapshot {
    /// True when there is at least one instance and every instance is healthy.
    pub fn all_healthy(&self) -> bool {
        !self.instances.is_empty() && self.instances.iter().all(|i| i.healthy)
    }

    pub fn healthy_count(&self) -> usize {
        self.instances.iter().filter(|i| i.healthy).count()
    }

    pub fn get(&self, addr: SocketAddr) -> Option<&InstanceHealth> {
        self.instances.iter().find(|i| i.addr == addr)
    }

    /// One line naming each instance that is not healthy and why, for events and errors
    /// (`127.0.0.1:4001 unhealthy: GET http://127.0.0.1:4001/up: connect: connection refused`).
    pub fn describe_unhealthy(&self) -> String {
        if self.instances.is_empty() {
            return "no instances".to_string();
        }
        let parts: Vec<String> = self
            .instances
            .iter()
            .filter(|i| !i.healthy)
            .map(|i| match (&i.last_error, i.last_check_ms) {
                (Some(e), _) => format!("{} {}: {e}", i.addr, i.status),
                (None, None) => format!("{} not checked yet", i.addr),
                (None, Some(_)) => format!("{} {}: {} passed so far", i.addr, i.status, checks(i.consecutive_ok)),
            })
            .collect();
        if parts.is_empty() {
            "all instances healthy".to_string()
        } else {
            parts.join("; ")
        }
    }
}

/// What to check: the instances of one colour of one service, and how.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckSpec {
    /// Service name, for logs.
    pub service: String,
    /// Colour, for logs.
    pub colour: Colour,
    pub instances: Vec<SocketAddr>,
    pub config: HealthConfig,
    /// The service's `upstream_tls`: every check then speaks TLS, verified as the proxy's
    /// connections are.
    pub tls: Option<Arc<UpstreamTls>>,
}

/// What every instance task shares.
#[derive(Debug)]
struct Shared {
    service: String,
    colour: Colour,
    config: HealthConfig,
    tls: Option<Arc<UpstreamTls>>,
    /// Holds the current snapshot; receivers come from `subscribe`. `send_if_modified` applies
    /// changes even when nobody subscribed.
    tx: watch::Sender<HealthSnapshot>,
}

/// One instance's check loop.
#[derive(Debug)]
struct Task {
    handle: JoinHandle<()>,
    /// Cleared (under the watch lock, or before abort) when the instance is removed or the
    /// checker stops. An aborted task may still be in the middle of one poll on another worker
    /// thread; this flag keeps that last poll from starting a check or publishing.
    alive: Arc<AtomicBool>,
}

/// Health checks of the instances of one colour; they run until [`HealthChecker::stop`] or drop.
#[derive(Debug)]
pub struct HealthChecker {
    shared: Arc<Shared>,
    tasks: HashMap<SocketAddr, Task>,
}

impl HealthChecker {
    /// Starts checking `spec.instances` (duplicates are checked once). Must be called within a
    /// Tokio runtime; the checks run as tasks on it.
    pub fn start(spec: CheckSpec) -> HealthChecker {
        let (tx, _) = watch::channel(HealthSnapshot::default());
        let mut checker = HealthChecker {
            shared: Arc::new(Shared {
                service: spec.service,
                colour: spec.colour,
                config: spec.config,
                tls: spec.tls,
                tx,
            }),
            tasks: HashMap::new(),
        };
        checker.set_instances(spec.instances);
        checker
    }

    /// A receiver of the snapshot, woken on every status change and every change of the set.
    pub fn subscribe(&self) -> watch::Receiver<HealthSnapshot> {
        self.shared.tx.subscribe()
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> HealthSnapshot {
        self.shared.tx.borrow().clone()
    }

    pub fn service(&self) -> &str {
        &self.shared.service
    }

    pub fn colour(&self) -> Colour {
        self.shared.colour
    }

    /// Replaces the set of instances. An address already checked keeps its entry, counters and
    /// schedule (an instance restarted on the same port is the same entry); new addresses start
    /// [`Status::Unknown`] with a jittered first check; removed ones stop being checked at once.
    pub fn set_instances(&mut self, instances: Vec<SocketAddr>) {
        let mut wanted: Vec<SocketAddr> = Vec::with_capacity(instances.len());
        for addr in instances {
            if !wanted.contains(&addr) {
                wanted.push(addr);
            }
        }
        let tasks = &mut self.tasks;
        self.shared.tx.send_if_modified(|snap| {
            // Under the watch lock, so a task's publish is either before (and then dropped with
            // its entry) or after (and then sees `alive == false`).
            tasks.retain(|addr, task| {
                let keep = wanted.contains(addr);
                if !keep {
                    task.alive.store(false, Ordering::SeqCst);
                    task.handle.abort();
                }
                keep
            });
            let before: Vec<SocketAddr> = snap.instances.iter().map(|i| i.addr).collect();
            let mut old: HashMap<SocketAddr, InstanceHealth> = std::mem::take(&mut snap.instances)
                .into_iter()
                .map(|i| (i.addr, i))
                .collect();
            snap.instances = wanted
                .iter()
                .map(|addr| old.remove(addr).unwrap_or_else(|| InstanceHealth::unknown(*addr)))
                .collect();
            before != wanted
        });
        for addr in wanted {
            if !self.tasks.contains_key(&addr) {
                let alive = Arc::new(AtomicBool::new(true));
                let handle = tokio::spawn(run_restarting(self.shared.clone(), addr, alive.clone()));
                self.tasks.insert(addr, Task { handle, alive });
            }
        }
    }

    /// Stops every check and waits until their tasks are gone: when this returns, no check is
    /// running and none will start. (A request already written may still reach an instance.)
    pub async fn stop(mut self) {
        let tasks: Vec<Task> = self.tasks.drain().map(|(_, task)| task).collect();
        for task in &tasks {
            task.alive.store(false, Ordering::SeqCst);
            task.handle.abort();
        }
        for task in tasks {
            if let Err(e) = task.handle.await {
                if e.is_panic() {
                    tracing::error!(service = %self.shared.service, colour = %self.shared.colour,
                        "health check task panicked: {e}");
                }
            }
        }
    }
}

impl Drop for HealthChecker {
    fn drop(&mut self) {
        for (_, task) in self.tasks.drain() {
            task.alive.store(false, Ordering::SeqCst);
            task.handle.abort();
        }
    }
}

/// [`run`], started again an interval after it panics: a bug in one check must not leave the
/// instance unchecked for the colour's life. The instance keeps the status it had (the new loop's
/// first verdict replaces it), and the panic is logged as an error.
async fn run_restarting(shared: Arc<Shared>, addr: SocketAddr, alive: Arc<AtomicBool>) {
    use futures_util::FutureExt;
    loop {
        // Unwind safety: the loop's own state (the tracker) is dropped with it; what it shares
        // (the snapshot, behind the watch channel's lock, and `alive`) is whole between checks.
        let checks = std::panic::AssertUnwindSafe(run(shared.clone(), addr, alive.clone()));
        let Err(payload) = checks.catch_unwind().await else {
            return;
        };
        let panic = crate::panics::message(payload.as_ref());
        tracing::error!(service = %shared.service, colour = %shared.colour, %addr, %panic,
            "health check task panicked; checking the instance again after one interval");
        tokio::time::sleep(shared.config.interval.max(Duration::from_millis(100))).await;
    }
}

/// The check loop of one instance.
async fn run(shared: Arc<Shared>, addr: SocketAddr, alive: Arc<AtomicBool>) {
    let config = &shared.config;
    // A zero interval would spin; the config refuses it, this keeps a hand-built spec sane.
    let interval = config.interval.max(Duration::from_millis(1));
    let mut tracker = Tracker::new(config.healthy, config.unhealthy);
    tokio::time::sleep(first_check_delay(addr, interval)).await;
    loop {
        if !alive.load(Ordering::SeqCst) {
            return;
        }
        let started = Instant::now();
        let result = check_once(
            addr,
            &config.path,
            config.host.as_deref(),
            config.timeout,
            shared.tls.as_deref(),
        )
        .await;
        let change = match &result {
            Ok(()) => tracker.record(true, ""),
            Err(CheckFailure::Instance(reason)) => tracker.record(false, reason),
            Err(CheckFailure::Local(reason)) => {
                tracing::warn!(service = %shared.service, colour = %shared.colour, %addr, %reason,
                    "health check not made; the instance keeps its status");
                None
            }
        };
        let now_ms = unix_ms();
        let mut published = false;
        shared.tx.send_if_modified(|snap| {
            if !alive.load(Ordering::SeqCst) {
                return false;
            }
            match snap.instances.iter_mut().find(|i| i.addr == addr) {
                Some(entry) => {
                    entry.update(&tracker, now_ms);
                    published = true;
                    change.is_some()
                }
                None => false,
            }
        });
        if let (Some(change), true) = (change, published) {
            log_change(&shared, addr, &change);
        }
        tokio::time::sleep_until(started + interval).await;
    }
}

fn log_change(shared: &Shared, addr: SocketAddr, change: &Change) {
    let (service, colour) = (&shared.service, shared.colour);
    if change.to == Status::Healthy {
        tracing::info!(service = %service, colour = %colour, addr = %addr, from = %change.from,
            reason = %change.reason, "instance healthy");
    } else {
        tracing::warn!(service = %service, colour = %colour, addr = %addr, from = %change.from,
            reason = %change.reason, "instance {}", change.to);
    }
}

/// The delay of an instance's first check: uniform in `[0, interval)`, so that instances started
/// together do not check in lock-step. `RandomState` is randomly keyed per instance, which gives
/// enough randomness without a dependency.
fn first_check_delay(addr: SocketAddr, interval: Duration) -> Duration {
    let span = interval.as_nanos().min(u128::from(u64::MAX)) as u64;
    if span == 0 {
        return Duration::ZERO;
    }
    Duration::from_nanos(RandomState::new().hash_one(addr) % span)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Why a health check did not pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckFailure {
    /// The instance failed it: refused, reset, silent past the timeout, or answered other than
    /// 2xx. Counts towards `unhealthy`.
    Instance(String),
    /// This host could not make the check (out of file descriptors, memory or local ports).
    /// It says nothing about the instance: not counted either way.
    Local(String),
}

impl std::fmt::Display for CheckFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CheckFailure::Instance(r) | CheckFailure::Local(r) => f.write_str(r),
        }
    }
}

/// One health check: `GET path` on a fresh HTTP/1.1 connection to `addr` with `Host: host` (or
/// `addr` without one) and `Connection: close`, over TLS when `tls` is given (the service's `upstream_tls`); `timeout`
/// covers connect, handshake and response head. A 2xx passes; anything else fails with a short
/// reason naming the address, e.g.
/// `GET http://127.0.0.1:4001/up: answered 503 Service Unavailable`, or
/// `GET https://127.0.0.1:4001/up: TLS handshake (server name api.internal) failed: ...`.
pub async fn check_once(
    addr: SocketAddr,
    path: &str,
    host: Option<&str>,
    timeout: Duration,
    tls: Option<&UpstreamTls>,
) -> Result<(), CheckFailure> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    match tokio::time::timeout(timeout, attempt(addr, path, host, tls)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(CheckFailure::Instance(why))) => {
            Err(CheckFailure::Instance(format!("GET {scheme}://{addr}{path}: {why}")))
        }
        Ok(Err(CheckFailure::Local(why))) => Err(CheckFailure::Local(format!(
            "GET {scheme}://{addr}{path}: this host could not connect: {why}"
        ))),
        Err(_) => Err(CheckFailure::Instance(format!(
            "GET {scheme}://{addr}{path}: no answer within {timeout:?}"
        ))),
    }
}

async fn attempt(
    addr: SocketAddr,
    path: &str,
    host: Option<&str>,
    tls: Option<&UpstreamTls>,
) -> Result<(), CheckFailure> {
    if !path.starts_with('/') {
        return Err(CheckFailure::Instance("the health path must start with /".to_string()));
    }
    let request = http::Request::get(path)
        .header(HOST, host.map_or_else(|| addr.to_string(), str::to_string))
        .header(CONNECTION, "close")
        .header(USER_AGENT, concat!("cutover-health/", env!("CARGO_PKG_VERSION")))
        .body(Empty::<Bytes>::new())
        .map_err(|e| CheckFailure::Instance(format!("bad request path: {e}")))?;
    let stream = TcpStream::connect(addr).await.map_err(|e| {
        let reason = crate::oneshot::io_reason(&e);
        if cutover_proxy::is_local_error(&e) {
            CheckFailure::Local(reason)
        } else {
            CheckFailure::Instance(format!("connect: {reason}"))
        }
    })?;
    let _ = stream.set_nodelay(true);
    match tls {
        None => crate::oneshot::exchange(stream, request).await,
        Some(tls) => {
            let stream = tls.handshake(stream, addr).await.map_err(CheckFailure::Instance)?;
            crate::oneshot::exchange(stream, request).await
        }
    }
    .map_err(CheckFailure::Instance)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper_util::rt::TokioIo;
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicU16, AtomicUsize};
    use std::sync::{Mutex, OnceLock};

    use http_body_util::Full;
    use hyper::body::Incoming;
    use hyper::service::service_fn;
    use tokio::net::TcpListener;

    // ---- Tracker: every transition, no sockets ----

    fn ok(t: &mut Tracker) -> Option<Change> {
        t.record(true, "")
    }

    fn fail(t: &mut Tracker) -> Option<Change> {
        t.record(false, "boom")
    }

    #[test]
    fn unknown_becomes_healthy_after_exactly_healthy_successes() {
        let mut t = Tracker::new(3, 2);
        assert_eq!(t.status(), Status::Unknown);
        assert_eq!(ok(&mut t), None);
        assert_eq!(ok(&mut t), None);
        assert_eq!(t.status(), Status::Unknown);
        let change = ok(&mut t).expect("third success decides");
        assert_eq!((change.from, change.to), (Status::Unknown, Status::Healthy));
        assert_eq!(change.reason, "3 checks passed in a row");
        assert!(t.is_healthy());
        // Staying healthy is not a change.
        assert_eq!(ok(&mut t), None);
        assert_eq!(t.consecutive_ok(), 4);
    }

    #[test]
    fn unknown_becomes_unhealthy_after_exactly_unhealthy_failures() {
        let mut t = Tracker::new(2, 3);
        assert_eq!(fail(&mut t), None);
        assert_eq!(fail(&mut t), None);
        assert_eq!(t.status(), Status::Unknown);
        let change = fail(&mut t).expect("third failure decides");
        assert_eq!((change.from, change.to), (Status::Unknown, Status::Unhealthy));
        assert_eq!(change.reason, "3 checks failed in a row, last: boom");
        assert_eq!(fail(&mut t), None);
        assert_eq!(t.status(), Status::Unhealthy);
    }

    #[test]
    fn an_interrupted_streak_decides_nothing_while_unknown() {
        let mut t = Tracker::new(2, 2);
        for _ in 0..5 {
            assert_eq!(ok(&mut t), None);
            assert_eq!(fail(&mut t), None);
        }
        assert_eq!(t.status(), Status::Unknown);
    }

    #[test]
    fn healthy_goes_unhealthy_only_after_consecutive_failures() {
        let mut t = Tracker::new(1, 3);
        assert_eq!(ok(&mut t).map(|c| c.to), Some(Status::Healthy));
        // Two failures, then a success resets the streak.
        assert_eq!(fail(&mut t), None);
        assert_eq!(fail(&mut t), None);
        assert_eq!(ok(&mut t), None);
        assert!(t.is_healthy());
        assert_eq!(fail(&mut t), None);
        assert_eq!(fail(&mut t), None);
        assert!(t.is_healthy(), "below the threshold an instance stays in rotation");
        let change = t.record(false, "answered 500").expect("third failure in a row");
        assert_eq!((change.from, change.to), (Status::Healthy, Status::Unhealthy));
        assert!(change.reason.ends_with("last: answered 500"), "{}", change.reason);
        assert_eq!(fail(&mut t), None);
    }

    #[test]
    fn unhealthy_recovers_only_after_consecutive_successes() {
        let mut t = Tracker::new(2, 1);
        assert_eq!(fail(&mut t).map(|c| c.to), Some(Status::Unhealthy));
        assert_eq!(ok(&mut t), None);
        assert_eq!(fail(&mut t), None);
        assert_eq!(ok(&mut t), None);
        assert_eq!(t.status(), Status::Unhealthy);
        let change = ok(&mut t).expect("second success in a row");
        assert_eq!((change.from, change.to), (Status::Unhealthy, Status::Healthy));
        assert_eq!(ok(&mut t), None);
    }

    #[test]
    fn thresholds_of_one_flip_on_every_opposite_result() {
        let mut t = Tracker::new(1, 1);
        assert_eq!(
            ok(&mut t).map(|c| (c.from, c.to)),
            Some((Status::Unknown, Status::Healthy))
        );
        assert_eq!(
            fail(&mut t).map(|c| (c.from, c.to)),
            Some((Status::Healthy, Status::Unhealthy))
        );
        assert_eq!(
            ok(&mut t).map(|c| (c.from, c.to)),
            Some((Status::Unhealthy, Status::Healthy))
        );
        assert_eq!(ok(&mut t), None);
        let mut t = Tracker::new(1, 1);
        assert_eq!(
            fail(&mut t).map(|c| (c.from, c.to)),
            Some((Status::Unknown, Status::Unhealthy))
        );
    }

    #[test]
    fn zero_thresholds_act_as_one() {
        let mut t = Tracker::new(0, 0);
        assert_eq!(t.status(), Status::Unknown, "no verdict before any check");
        assert_eq!(ok(&mut t).map(|c| c.to), Some(Status::Healthy));
        assert_eq!(fail(&mut t).map(|c| c.to), Some(Status::Unhealthy));
    }

    #[test]
    fn counters_and_last_error_follow_the_current_streak() {
        let mut t = Tracker::new(5, 5);
        t.record(false, "first");
        t.record(false, "second");
        assert_eq!((t.consecutive_ok(), t.consecutive_fail()), (0, 2));
        assert_eq!(t.last_error(), Some("second"));
        t.record(true, "ignored");
        assert_eq!((t.consecutive_ok(), t.consecutive_fail()), (1, 0));
        assert_eq!(t.last_error(), None);
    }

    #[test]
    fn all_healthy_needs_every_instance_and_at_least_one() {
        let addr = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        let mut snap = HealthSnapshot::default();
        assert!(!snap.all_healthy(), "no instances is not healthy");
        snap.instances = vec![InstanceHealth::unknown(addr(1)), InstanceHealth::unknown(addr(2))];
        assert!(!snap.all_healthy());
        assert_eq!(
            snap.describe_unhealthy(),
            "127.0.0.1:1 not checked yet; 127.0.0.1:2 not checked yet"
        );
        let mut t = Tracker::new(1, 1);
        ok(&mut t);
        snap.instances[0].update(&t, 1);
        assert!(!snap.all_healthy());
        assert_eq!(snap.healthy_count(), 1);
        snap.instances[1].update(&t, 1);
        assert!(snap.all_healthy());
        assert_eq!(snap.get(addr(2)).map(|i| i.healthy), Some(true));
    }

    #[test]
    fn first_check_delay_stays_within_the_interval() {
        let addr = SocketAddr::from(([127, 0, 0, 1], 8080));
        let interval = Duration::from_millis(100);
        let delays: Vec<Duration> = (0..200).map(|_| first_check_delay(addr, interval)).collect();
        assert!(delays.iter().all(|d| *d < interval));
        let mut distinct = delays.clone();
        distinct.sort();
        distinct.dedup();
        assert!(
            distinct.len() > 100,
            "the delay is not jittered: {} distinct values",
            distinct.len()
        );
        assert_eq!(first_check_delay(addr, Duration::ZERO), Duration::ZERO);
    }

    // ---- Real sockets ----

    /// Long enough for a loaded 2-core machine; a passing run never waits for it.
    const DEADLINE: Duration = Duration::from_secs(20);

    async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + DEADLINE;
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn spec(instances: Vec<SocketAddr>, interval_ms: u64, timeout_ms: u64, healthy: u32, unhealthy: u32) -> CheckSpec {
        CheckSpec {
            service: "web".to_string(),
            colour: Colour::Green,
            instances,
            config: HealthConfig {
                path: "/up".to_string(),
                interval: Duration::from_millis(interval_ms),
                timeout: Duration::from_millis(timeout_ms),
                healthy,
                unhealthy,
                deadline: Duration::from_secs(60),
                host: None,
            },
            tls: None,
        }
    }

    fn health_of(checker: &HealthChecker, addr: SocketAddr) -> InstanceHealth {
        checker.snapshot().get(addr).cloned().expect("instance in the snapshot")
    }

    #[derive(Clone, Debug)]
    struct Arrival {
        /// The status this request was answered with.
        status: u16,
        /// Whether the checker's snapshot said healthy when this request arrived. Checks of one
        /// instance are sequential and each is published before the next starts, so this is the
        /// verdict after all earlier checks: a timing-free way to count checks per transition.
        healthy_before: bool,
        path: String,
        host: Option<String>,
        connection: Option<String>,
    }

    /// A hyper HTTP/1 server answering every request with the status currently set.
    struct Upstream {
        addr: SocketAddr,
        status: AtomicU16,
        arrivals: Mutex<Vec<Arrival>>,
        /// The checker's snapshot, read at each arrival.
        health: OnceLock<watch::Receiver<HealthSnapshot>>,
    }

    impl Upstream {
        async fn start(status: u16) -> Arc<Upstream> {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let upstream = Arc::new(Upstream {
                addr: listener.local_addr().unwrap(),
                status: AtomicU16::new(status),
                arrivals: Mutex::new(Vec::new()),
                health: OnceLock::new(),
            });
            let server = upstream.clone();
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let server = server.clone();
                    tokio::spawn(async move {
                        let service = service_fn(move |req| {
                            let response = server.answer(req);
                            async move { Ok::<_, Infallible>(response) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
            upstream
        }

        fn answer(&self, req: http::Request<Incoming>) -> http::Response<Full<Bytes>> {
            let status = self.status.load(Ordering::SeqCst);
            let healthy_before = self
                .health
                .get()
                .and_then(|rx| rx.borrow().get(self.addr).map(|i| i.healthy))
                .unwrap_or(false);
            let header = |name| {
                req.headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            };
            self.arrivals.lock().unwrap().push(Arrival {
                status,
                healthy_before,
                path: req.uri().to_string(),
                host: header(HOST),
                connection: header(CONNECTION),
            });
            http::Response::builder()
                .status(status)
                .body(Full::new(Bytes::from_static(b"ok\n")))
                .unwrap()
        }

        fn arrivals(&self) -> Vec<Arrival> {
            self.arrivals.lock().unwrap().clone()
        }

        fn count(&self) -> usize {
            self.arrivals.lock().unwrap().len()
        }
    }

    /// A TCP server that reads requests and never answers. Plain TCP rather than hyper, because
    /// what it measures is connections: how many of the checker's are open at once.
    struct Silent {
        addr: SocketAddr,
        conns: Mutex<Vec<Arc<SilentConn>>>,
        max_open: AtomicUsize,
    }

    struct SilentConn {
        stream: TcpStream,
        accepted_at: std::time::Instant,
        closed: AtomicBool,
    }

    impl SilentConn {
        /// Reads and discards whatever arrived; true once the peer has closed.
        fn peer_closed(&self) -> bool {
            if self.closed.load(Ordering::SeqCst) {
                return true;
            }
            let mut buf = [0u8; 1024];
            loop {
                match self.stream.try_read(&mut buf) {
                    Ok(0) => break,
                    Ok(_) => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
                    Err(_) => break,
                }
            }
            self.closed.store(true, Ordering::SeqCst);
            true
        }
    }

    impl Silent {
        async fn start() -> Arc<Silent> {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let silent = Arc::new(Silent {
                addr: listener.local_addr().unwrap(),
                conns: Mutex::new(Vec::new()),
                max_open: AtomicUsize::new(0),
            });
            let server = silent.clone();
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let conn = Arc::new(SilentConn {
                        stream,
                        accepted_at: std::time::Instant::now(),
                        closed: AtomicBool::new(false),
                    });
                    {
                        // The checker closes a check's socket before it connects for the next
                        // one, and on loopback the FIN is queued at our end before its SYN, so
                        // a previous connection that is still open here really overlaps.
                        let mut conns = server.conns.lock().unwrap();
                        let open = 1 + conns.iter().filter(|c| !c.peer_closed()).count();
                        server.max_open.fetch_max(open, Ordering::SeqCst);
                        conns.push(conn.clone());
                    }
                    tokio::spawn(async move {
                        while !conn.peer_closed() {
                            if conn.stream.readable().await.is_err() {
                                conn.closed.store(true, Ordering::SeqCst);
                            }
                        }
                    });
                }
            });
            silent
        }

        fn accepted(&self) -> usize {
            self.conns.lock().unwrap().len()
        }

        fn closed(&self) -> usize {
            self.conns
                .lock()
                .unwrap()
                .iter()
                .filter(|c| c.closed.load(Ordering::SeqCst))
                .count()
        }
    }

    #[tokio::test]
    async fn check_once_passes_2xx_only() {
        let up = Upstream::start(204).await;
        assert_eq!(
            check_once(up.addr, "/up", None, Duration::from_secs(5), None).await,
            Ok(())
        );
        for status in [301, 404, 500, 503] {
            up.status.store(status, Ordering::SeqCst);
            let err = check_once(up.addr, "/up", None, Duration::from_secs(5), None)
                .await
                .unwrap_err()
                .to_string();
            assert!(err.contains(&format!("http://{}/up", up.addr)), "{err}");
            assert!(err.contains(&format!("answered {status}")), "{err}");
        }
        let err = check_once(up.addr, "up", None, Duration::from_secs(5), None)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("must start with /"), "{err}");
    }

    #[tokio::test]
    async fn checks_send_the_host_given() {
        let up = Upstream::start(200).await;
        let mut spec = spec(vec![up.addr], 50, 5000, 1, 1);
        spec.config.host = Some("shop.example.com".to_string());
        let checker = HealthChecker::start(spec);
        up.health.set(checker.subscribe()).unwrap();
        wait_for("2 checks", || up.count() >= 2).await;
        for a in up.arrivals() {
            assert_eq!(a.host.as_deref(), Some("shop.example.com"));
        }
        assert_eq!(
            check_once(up.addr, "/up", Some("other.example.com"), Duration::from_secs(5), None).await,
            Ok(())
        );
        assert_eq!(
            up.arrivals().last().and_then(|a| a.host.clone()).as_deref(),
            Some("other.example.com")
        );
        checker.stop().await;
    }

    #[tokio::test]
    async fn answering_200_becomes_healthy_after_exactly_healthy_checks() {
        let up = Upstream::start(200).await;
        let checker = HealthChecker::start(spec(vec![up.addr], 50, 5000, 3, 2));
        // Current-thread runtime: no check can run before this line.
        up.health.set(checker.subscribe()).unwrap();
        let mut rx = checker.subscribe();
        assert_eq!(rx.borrow_and_update().instances[0].status, Status::Unknown);
        assert!(!rx.borrow().all_healthy());

        wait_for("4 checks", || up.count() >= 4).await;
        let arrivals = up.arrivals();
        let seen: Vec<bool> = arrivals.iter().take(4).map(|a| a.healthy_before).collect();
        assert_eq!(seen, [false, false, false, true], "healthy after exactly 3 checks");
        for a in &arrivals {
            assert_eq!(a.path, "/up");
            assert_eq!(a.host, Some(up.addr.to_string()));
            assert_eq!(a.connection.as_deref(), Some("close"));
        }
        assert!(rx.has_changed().unwrap(), "subscribers are woken by the change");
        let health = health_of(&checker, up.addr);
        assert_eq!(health.status, Status::Healthy);
        assert!(health.healthy && health.consecutive_ok >= 3);
        assert_eq!((health.consecutive_fail, health.last_error), (0, None));
        assert!(health.last_check_ms.is_some());
        assert!(checker.snapshot().all_healthy());
        checker.stop().await;
    }

    #[tokio::test]
    async fn answering_500_goes_unhealthy_after_unhealthy_checks_and_recovers() {
        let (healthy, unhealthy) = (2, 3);
        let up = Upstream::start(200).await;
        let checker = HealthChecker::start(spec(vec![up.addr], 50, 5000, healthy, unhealthy));
        up.health.set(checker.subscribe()).unwrap();
        wait_for("healthy", || health_of(&checker, up.addr).healthy).await;

        up.status.store(500, Ordering::SeqCst);
        wait_for("unhealthy", || health_of(&checker, up.addr).status == Status::Unhealthy).await;
        let first_500 = up.arrivals().iter().position(|a| a.status == 500).unwrap();
        wait_for("one more check", || up.count() > first_500 + unhealthy as usize).await;
        let seen: Vec<bool> = up.arrivals()[first_500..=first_500 + unhealthy as usize]
            .iter()
            .map(|a| a.healthy_before)
            .collect();
        assert_eq!(
            seen,
            [true, true, true, false],
            "unhealthy after exactly 3 failed checks"
        );
        let health = health_of(&checker, up.addr);
        let err = health.last_error.clone().unwrap();
        assert!(
            err.contains(&up.addr.to_string()) && err.contains("answered 500"),
            "{err}"
        );
        assert!(!checker.snapshot().all_healthy());
        assert!(checker.snapshot().describe_unhealthy().contains("answered 500"));

        up.status.store(200, Ordering::SeqCst);
        wait_for("healthy again", || health_of(&checker, up.addr).healthy).await;
        let arrivals = up.arrivals();
        let first_200 = first_500 + arrivals[first_500..].iter().position(|a| a.status == 200).unwrap();
        wait_for("one more check", || up.count() > first_200 + healthy as usize).await;
        let seen: Vec<bool> = up.arrivals()[first_200..=first_200 + healthy as usize]
            .iter()
            .map(|a| a.healthy_before)
            .collect();
        assert_eq!(
            seen,
            [false, false, true],
            "healthy again after exactly 2 passed checks"
        );
        assert_eq!(health_of(&checker, up.addr).last_error, None);
        checker.stop().await;
    }

    #[tokio::test]
    async fn refused_port_is_unhealthy_with_a_reason_naming_the_address() {
        let addr = {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            listener.local_addr().unwrap()
        };
        let err = check_once(addr, "/up", None, Duration::from_secs(5), None)
            .await
            .unwrap_err();
        assert_eq!(
            err,
            CheckFailure::Instance(format!("GET http://{addr}/up: connect: connection refused"))
        );

        let checker = HealthChecker::start(spec(vec![addr], 50, 5000, 1, 2));
        wait_for("unhealthy", || health_of(&checker, addr).status == Status::Unhealthy).await;
        let health = health_of(&checker, addr);
        assert!(!health.healthy && health.consecutive_fail >= 2);
        let err = health.last_error.unwrap();
        assert!(err.contains(&addr.to_string()) && err.contains("refused"), "{err}");
        let summary = checker.snapshot().describe_unhealthy();
        assert!(summary.starts_with(&format!("{addr} unhealthy: ")), "{summary}");
        assert!(!checker.snapshot().all_healthy());
    }

    #[tokio::test]
    async fn silent_server_is_cut_at_timeout_and_checks_never_overlap() {
        let timeout = Duration::from_millis(200);
        // One direct check: it fails after the timeout, not before and not never.
        let other = Silent::start().await;
        let t0 = std::time::Instant::now();
        let err = check_once(other.addr, "/up", None, timeout, None).await.unwrap_err();
        assert!(t0.elapsed() >= timeout);
        assert_eq!(
            err,
            CheckFailure::Instance(format!("GET http://{}/up: no answer within 200ms", other.addr))
        );

        // The timeout is four intervals: checks that were started on the interval's clock
        // regardless of the previous one would overlap by four.
        let silent = Silent::start().await;
        let started = std::time::Instant::now();
        let checker = HealthChecker::start(spec(vec![silent.addr], 50, 200, 1, 2));
        wait_for("5 checks, 4 of them cut", || {
            silent.accepted() >= 5 && silent.closed() >= 4
        })
        .await;
        assert_eq!(
            silent.max_open.load(Ordering::SeqCst),
            1,
            "checks of one instance overlapped"
        );
        // Each check started after the previous one's timeout.
        let fifth = silent.conns.lock().unwrap()[4].accepted_at;
        assert!(
            fifth.duration_since(started) >= 4 * timeout,
            "{:?}",
            fifth.duration_since(started)
        );
        let health = health_of(&checker, silent.addr);
        assert_eq!(health.status, Status::Unhealthy);
        let err = health.last_error.unwrap();
        assert_eq!(err, format!("GET http://{}/up: no answer within 200ms", silent.addr));
        checker.stop().await;
    }

    /// After the checker ends, at most the check in flight at that moment may still reach an
    /// instance; nothing new starts.
    async fn assert_no_more_checks(upstreams: &[Arc<Upstream>], counts: &[usize]) {
        tokio::time::sleep(Duration::from_millis(400)).await; // 8 intervals: nothing may come
        for (up, before) in upstreams.iter().zip(counts) {
            let after = up.count();
            assert!(after <= before + 1, "{} checks arrived after the end", after - before);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stop_ends_all_checks() {
        let ups = [Upstream::start(200).await, Upstream::start(500).await];
        let checker = HealthChecker::start(spec(ups.iter().map(|u| u.addr).collect(), 50, 5000, 1, 1));
        wait_for("checks on both", || ups.iter().all(|u| u.count() >= 3)).await;
        checker.stop().await;
        let counts: Vec<usize> = ups.iter().map(|u| u.count()).collect();
        assert_no_more_checks(&ups, &counts).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropping_the_checker_ends_all_checks() {
        let ups = [Upstream::start(200).await, Upstream::start(200).await];
        let checker = HealthChecker::start(spec(ups.iter().map(|u| u.addr).collect(), 50, 5000, 1, 1));
        let rx = checker.subscribe();
        wait_for("checks on both", || ups.iter().all(|u| u.count() >= 3)).await;
        drop(checker);
        let counts: Vec<usize> = ups.iter().map(|u| u.count()).collect();
        assert_no_more_checks(&ups, &counts).await;
        // Every task is gone, and with them the last owner of the sender.
        wait_for("the tasks to end", || rx.has_changed().is_err()).await;
    }

    #[tokio::test]
    async fn set_instances_keeps_known_entries_and_starts_new_ones_unknown() {
        let (a, b) = (Upstream::start(200).await, Upstream::start(200).await);
        let mut checker = HealthChecker::start(spec(vec![a.addr], 50, 5000, 2, 2));
        wait_for("a healthy", || health_of(&checker, a.addr).healthy).await;
        let mut rx = checker.subscribe();

        checker.set_instances(vec![a.addr, b.addr, a.addr]);
        assert!(rx.has_changed().unwrap(), "a new instance wakes subscribers");
        let snap = rx.borrow_and_update().clone();
        assert_eq!(
            snap.instances.iter().map(|i| i.addr).collect::<Vec<_>>(),
            [a.addr, b.addr]
        );
        assert!(
            snap.instances[0].healthy && snap.instances[0].consecutive_ok >= 2,
            "a kept its entry"
        );
        assert_eq!(snap.instances[1], InstanceHealth::unknown(b.addr));
        assert!(!snap.all_healthy());
        wait_for("both healthy", || checker.snapshot().all_healthy()).await;
        assert!(health_of(&checker, a.addr).consecutive_ok > snap.instances[0].consecutive_ok);

        checker.set_instances(vec![b.addr]);
        assert_eq!(
            checker.snapshot().instances.iter().map(|i| i.addr).collect::<Vec<_>>(),
            [b.addr]
        );
        let (a_count, b_count) = (a.count(), b.count());
        assert_no_more_checks(std::slice::from_ref(&a), &[a_count]).await;
        assert!(b.count() > b_count, "b is still checked");
        checker.stop().await;
    }
}
