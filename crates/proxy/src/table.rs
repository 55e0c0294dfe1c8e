//! The route table: everything a request needs to be routed, in one immutable value.
//!
//! The proxy holds exactly one `Arc<RouteTable>` behind an `ArcSwap`. A request loads it once, when
//! its head arrives, and routes from that snapshot; a switch, a health change or a drain stores a
//! whole new table. Nothing here is ever mutated in place except counters (in-flight requests,
//! round-robin cursors, passive ejection deadlines), which live in `Arc`ed state shared by
//! successive tables so that they survive a swap.
//!
//! This module never does I/O and never blocks.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::Notify;

use crate::error::TableError;

/// One of the two environments of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Colour {
    Blue,
    Green,
}

impl Colour {
    pub fn other(self) -> Colour {
        match self {
            Colour::Blue => Colour::Green,
            Colour::Green => Colour::Blue,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Colour::Blue => "blue",
            Colour::Green => "green",
        }
    }
}

impl fmt::Display for Colour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Colour {
    type Err = TableError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "blue" => Ok(Colour::Blue),
            "green" => Ok(Colour::Green),
            other => Err(TableError::BadColour(other.to_string())),
        }
    }
}

/// How a colour's requests are spread over its instances.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Balance {
    /// The instance with the fewest requests in flight; ties broken round-robin.
    #[default]
    LeastInFlight,
    RoundRobin,
}

/// Mutable per-instance counters, shared by every table that contains the instance.
#[derive(Debug, Default)]
pub struct InstanceState {
    pub(crate) in_flight: AtomicUsize,
    /// Passive ejection: until this many milliseconds after the proxy's clock origin, the
    /// instance refused connections and is skipped while any sibling is usable.
    pub(crate) ejected_until_ms: AtomicU64,
}

static NEXT_INSTANCE_ID: AtomicU64 = AtomicU64::new(1);

/// One upstream address of one colour.
#[derive(Clone, Debug)]
pub struct Instance {
    /// Unique for the life of the process; keys the per-worker connection pools, so a new
    /// instance at a reused address never inherits connections of an old one.
    pub(crate) id: u64,
    pub addr: SocketAddr,
    /// Set by the control plane's health checks. Unhealthy instances get no traffic.
    pub healthy: bool,
    pub(crate) state: Arc<InstanceState>,
}

impl Instance {
    pub fn new(addr: SocketAddr) -> Instance {
        Instance {
            id: NEXT_INSTANCE_ID.fetch_add(1, Ordering::Relaxed),
            addr,
            healthy: true,
            state: Arc::new(InstanceState::default()),
        }
    }

    pub fn in_flight(&self) -> usize {
        self.state.in_flight.load(Ordering::Relaxed)
    }

    pub(crate) fn is_ejected(&self, now_ms: u64) -> bool {
        self.state.ejected_until_ms.load(Ordering::Relaxed) > now_ms
    }

    /// Ejected for now: a connection to it failed a moment ago, so picks pass it over (unless
    /// nothing else is left) until the ejection runs out.
    pub fn ejected(&self) -> bool {
        self.is_ejected(now_ms())
    }
}

/// Tracks the requests and upgraded connections that entered a colour while this generation
/// was current. Draining rotates a colour to a fresh generation, then waits on the old one:
/// everything counted here started before the drain began.
#[derive(Debug, Default)]
pub struct Generation {
    pub(crate) in_flight: AtomicUsize,
    pub(crate) upgraded: AtomicUsize,
    /// Set while a drain waits on this generation; only then do finishing requests notify
    /// `idle` (so an undrained colour's requests never touch its lock).
    pub(crate) draining: AtomicBool,
    /// Woken whenever one of the two counters drops to zero during a drain.
    pub(crate) idle: Notify,
    /// Set at the drain deadline: requests still waiting for their upstream answer 504, streams
    /// are cut, upgraded connections close within the drain window (see `deadline`).
    pub(crate) expired: AtomicBool,
    /// The spread window (milliseconds) that upgraded connections use when `deadline` fires.
    pub(crate) close_window_ms: AtomicU64,
    /// When the deadline fired ([`now_ms`]), set before `expired`: streams draw their cut
    /// instants over the window from then.
    pub(crate) expired_at_ms: AtomicU64,
}

impl Generation {
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    pub fn upgraded(&self) -> usize {
        self.upgraded.load(Ordering::SeqCst)
    }

    /// A drain has rotated this generation out and counts on what entered before.
    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Called when one of the counters reached zero.
    fn maybe_notify(&self) {
        if self.draining.load(Ordering::SeqCst) {
            self.idle.notify_waiters();
        }
    }

    /// Counts a request in. A drain marks the generation as draining (after storing the table
    /// that rotates it out) before it reads the count, and the request reads the mark after
    /// counting itself, all sequentially consistent: either the drain sees the request, or the
    /// request sees the mark (`is_draining`) and routes again on the newer table.
    pub(crate) fn enter_request(self: &Arc<Self>) -> GenerationGuard {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        GenerationGuard {
            gen: self.clone(),
            upgraded: false,
        }
    }

    /// Turns a request guard into the guard of the upgraded connection that replaced it.
    pub(crate) fn into_upgraded(mut guard: GenerationGuard) -> GenerationGuard {
        guard.gen.upgraded.fetch_add(1, Ordering::SeqCst);
        if guard.gen.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            guard.gen.maybe_notify();
        }
        guard.upgraded = true;
        guard
    }
}

/// Counts one request (or one upgraded connection) in its generation until dropped.
#[derive(Debug)]
pub(crate) struct GenerationGuard {
    pub(crate) gen: Arc<Generation>,
    upgraded: bool,
}

impl Drop for GenerationGuard {
    fn drop(&mut self) {
        let counter = if self.upgraded {
            &self.gen.upgraded
        } else {
            &self.gen.in_flight
        };
        if counter.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.gen.maybe_notify();
        }
    }
}

/// Round-robin cursor and request counters of a pool; shared by successive tables.
#[derive(Debug, Default)]
pub(crate) struct PoolState {
    pub(crate) cursor: AtomicUsize,
    pub(crate) stats: crate::stats::ColourStats,
    /// Copies of live requests this colour answered while it was mirrored to (`crate::mirror`).
    pub(crate) mirrored: crate::stats::ColourStats,
    /// Sampled requests not copied to this colour: every copy slot was taken.
    pub(crate) mirror_dropped: AtomicU64,
}

/// The instances of one colour of one service.
#[derive(Clone, Debug)]
pub struct Pool {
    /// The release running on this colour (shown in status, never used for routing).
    pub version: Option<Arc<str>>,
    pub instances: Arc<[Instance]>,
    pub(crate) generation: Arc<Generation>,
    pub(crate) state: Arc<PoolState>,
}

impl Default for Pool {
    fn default() -> Self {
        Pool::new(None, Vec::new())
    }
}

impl Pool {
    pub fn new(version: Option<&str>, instances: Vec<Instance>) -> Pool {
        Pool {
            version: version.map(Arc::from),
            instances: instances.into(),
            generation: Arc::new(Generation::default()),
            state: Arc::new(PoolState::default()),
        }
    }

    /// Replaces the instances, keeping the drain generation and the counters.
    pub fn with_instances(&self, version: Option<&str>, instances: Vec<Instance>) -> Pool {
        Pool {
            version: version.map(Arc::from),
            instances: instances.into(),
            ..self.clone()
        }
    }

    /// The generation that requests entering this colour now are counted in.
    pub fn generation(&self) -> &Arc<Generation> {
        &self.generation
    }

    /// Requests answered on this colour so far (status classes, latency to the response head).
    pub fn stats(&self) -> crate::stats::StatsSnapshot {
        self.state.stats.snapshot()
    }

    /// Requests in flight in the current generation of this colour.
    pub fn in_flight(&self) -> usize {
        self.generation.in_flight()
    }

    pub fn healthy_count(&self) -> usize {
        self.instances.iter().filter(|i| i.healthy).count()
    }

    /// Picks an instance for a request. `skip` is a bit set of instance indexes that already
    /// failed to connect for this request. Ejected instances are used only when nothing else is
    /// left, so that a pool whose instances all refused recently still gets a try.
    pub(crate) fn pick(&self, balance: Balance, skip: u64, now_ms: u64) -> Option<usize> {
        let n = self.instances.len();
        if n == 0 {
            return None;
        }
        let start = self.state.cursor.fetch_add(1, Ordering::Relaxed) % n;
        let mut best: Option<(usize, usize, bool)> = None; // (index, in_flight, ejected)
        for k in 0..n {
            let i = (start + k) % n;
            if i < 64 && skip & (1 << i) != 0 {
                continue;
            }
            let inst = &self.instances[i];
            if !inst.healthy {
                continue;
            }
            let ejected = inst.is_ejected(now_ms);
            if balance == Balance::RoundRobin && !ejected {
                return Some(i);
            }
            let load = inst.in_flight();
            let better = match best {
                None => true,
                Some((_, best_load, best_ejected)) => {
                    (best_ejected && !ejected) || (best_ejected == ejected && load < best_load)
                }
            };
            if better {
                best = Some((i, load, ejected));
            }
        }
        best.map(|(i, _, _)| i)
    }
}

/// A service: the hosts it answers, its two colours, and which one is live.
#[derive(Clone, Debug)]
pub struct Service {
    pub name: Arc<str>,
    /// Lower-case host names without port. Empty: this is the default service.
    pub hosts: Vec<String>,
    pub active: Colour,
    pub blue: Pool,
    pub green: Pool,
    pub balance: Balance,
    /// A request carrying this token in `X-Cutover-Preview` goes to the inactive colour.
    pub preview_token: Option<Arc<[u8]>>,
    /// Holds the live route's requests instead of routing them (the preview route is never
    /// held): see [`Hold`].
    pub hold: Option<Hold>,
    /// Live requests that arrive over plain HTTP are redirected (308) to HTTPS on this port.
    pub https_redirect: Option<u16>,
    /// Every connection to this service's instances speaks TLS with these settings
    /// (`upstream_tls`); `None`: plain TCP.
    pub upstream_tls: Option<Arc<crate::UpstreamTls>>,
    /// Sticky sessions across a switch (`crate::affinity`); `None`: every live request goes to
    /// the live colour.
    pub affinity: Option<Arc<crate::affinity::Affinity>>,
    /// The colour that was live before the last promotion, kept for its sessions a while: set by
    /// [`crate::Proxy::switch_pinned`], cleared by any other switch and by
    /// [`crate::Proxy::unpin`].
    pub(crate) pin: Option<crate::affinity::Pin>,
    /// Copies a sample of the live requests to the other colour while it is validated
    /// (`crate::mirror`); set by [`crate::Proxy::mirror`].
    pub(crate) mirror: Option<Arc<crate::mirror::Mirror>>,
    /// A gradual switch in progress: this share of the live requests (of new sessions, with
    /// affinity) goes to the other colour; set by [`crate::Proxy::split`], ended by any switch.
    pub(crate) split: Option<Split>,
}

/// A share of a service's live traffic sent to the colour that is not `active` (a step of a
/// gradual switch).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Split {
    /// The colour that gets the share.
    pub colour: Colour,
    /// The share, in millionths of the requests (or new sessions).
    pub per_million: u32,
}

/// What holds a service's live traffic instead of routing it.
#[derive(Clone, Debug)]
pub enum Hold {
    /// `cutover pause`: requests wait until the pause ends, each at most the gate's `max_wait`,
    /// then get 503.
    Paused(Arc<PauseGate>),
    /// `cutover maintenance`: requests get 503 with the page's message and `Retry-After`.
    Maintenance(Arc<MaintenancePage>),
}

/// What the requests held by a pause wait on.
#[derive(Debug)]
pub struct PauseGate {
    /// Set (to true) when the pause ends; every waiting request wakes and routes again.
    released: tokio::sync::watch::Sender<bool>,
    /// The longest one request waits.
    pub max_wait: std::time::Duration,
}

impl PauseGate {
    pub fn new(max_wait: std::time::Duration) -> PauseGate {
        PauseGate {
            released: tokio::sync::watch::Sender::new(false),
            max_wait,
        }
    }

    /// Wakes every request waiting on this gate (once the table without the pause is stored).
    pub(crate) fn release(&self) {
        self.released.send_replace(true);
    }

    /// Waits until the gate is released, for at most `max_wait`; true if it was.
    pub(crate) async fn wait(&self) -> bool {
        let mut rx = self.released.subscribe();
        tokio::time::timeout(self.max_wait, rx.wait_for(|r| *r))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

/// The answer of a service in maintenance.
#[derive(Debug)]
pub struct MaintenancePage {
    pub message: String,
    pub retry_after: std::time::Duration,
}

impl Service {
    pub fn new(name: &str) -> Service {
        Service {
            name: Arc::from(name),
            hosts: Vec::new(),
            active: Colour::Blue,
            blue: Pool::default(),
            green: Pool::default(),
            balance: Balance::default(),
            preview_token: None,
            hold: None,
            https_redirect: None,
            upstream_tls: None,
            affinity: None,
            pin: None,
            mirror: None,
            split: None,
        }
    }

    /// The colour pinned for its sessions, if a pin is set (it may have run out: see
    /// [`crate::affinity::Pin::remaining`]).
    pub fn pin(&self) -> Option<&crate::affinity::Pin> {
        self.pin.as_ref()
    }

    /// The gradual switch in progress, if any.
    pub fn split(&self) -> Option<Split> {
        self.split
    }

    /// The colour a live request without affinity goes to: the active one, or during a gradual
    /// switch, the split's colour for its share of the requests (drawn at random per request).
    #[inline]
    pub(crate) fn live_colour(&self) -> Colour {
        match &self.split {
            None => self.active,
            Some(s) => {
                if (crate::headers::random_u64() % 1_000_000) < u64::from(s.per_million) {
                    s.colour
                } else {
                    self.active
                }
            }
        }
    }

    /// Whether `colour` takes live traffic now: it is active, or the colour of a split.
    #[inline]
    pub(crate) fn takes_live(&self, colour: Colour) -> bool {
        colour == self.active || self.split.is_some_and(|s| s.colour == colour)
    }

    /// The mirroring window open on this service, if any.
    pub fn mirror(&self) -> Option<&Arc<crate::mirror::Mirror>> {
        self.mirror.as_ref()
    }

    pub fn pool(&self, colour: Colour) -> &Pool {
        match colour {
            Colour::Blue => &self.blue,
            Colour::Green => &self.green,
        }
    }

    pub fn pool_mut(&mut self, colour: Colour) -> &mut Pool {
        match colour {
            Colour::Blue => &mut self.blue,
            Colour::Green => &mut self.green,
        }
    }

    /// Constant-time comparison of a presented preview token with the configured one.
    pub(crate) fn preview_matches(&self, presented: &[u8]) -> bool {
        match &self.preview_token {
            None => false,
            Some(token) => {
                if token.len() != presented.len() {
                    return false;
                }
                token.iter().zip(presented).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
            }
        }
    }
}

/// The complete routing state of the proxy.
#[derive(Clone, Debug, Default)]
pub struct RouteTable {
    services: Vec<Service>,
    by_host: HashMap<String, usize>,
    default: Option<usize>,
    /// How many tables the proxy stored before this one (see [`RouteTable::revision`]).
    revision: u64,
}

impl RouteTable {
    /// Builds a table, checking that host names and service names are unique and that at most one
    /// service is the default.
    pub fn new(services: Vec<Service>) -> Result<RouteTable, TableError> {
        let mut by_host = HashMap::new();
        let mut default = None;
        let mut names = std::collections::HashSet::new();
        for (i, svc) in services.iter().enumerate() {
            if !names.insert(svc.name.clone()) {
                return Err(TableError::DuplicateService(svc.name.to_string()));
            }
            if svc.hosts.is_empty() {
                if let Some(prev) = default {
                    let prev: &Service = &services[prev];
                    return Err(TableError::TwoDefaults(prev.name.to_string(), svc.name.to_string()));
                }
                default = Some(i);
            }
            for host in &svc.hosts {
                let key = host.to_ascii_lowercase();
                if let Some(prev) = by_host.insert(key, i) {
                    return Err(TableError::DuplicateHost {
                        host: host.clone(),
                        first: services[prev].name.to_string(),
                        second: svc.name.to_string(),
                    });
                }
            }
        }
        Ok(RouteTable {
            services,
            by_host,
            default,
            revision: 0,
        })
    }

    /// 0 for the table a proxy starts with, one more for each table it stored since
    /// ([`crate::Proxy::update`], [`crate::Proxy::switch`]). Two loads with the same revision saw
    /// the same table; the difference between two revisions is how many stores came between them.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub(crate) fn set_revision(&mut self, revision: u64) {
        self.revision = revision;
    }

    pub fn services(&self) -> &[Service] {
        &self.services
    }

    /// The ids of every instance of every colour of every service.
    pub(crate) fn instance_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.services
            .iter()
            .flat_map(|s| s.blue.instances.iter().chain(s.green.instances.iter()))
            .map(|i| i.id)
    }

    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services.iter().find(|s| &*s.name == name)
    }

    /// A copy of this table with one service changed by `f`. Counters and drain generations are
    /// shared with this table, so in-flight accounting continues across the swap.
    pub fn with_service<F>(&self, name: &str, f: F) -> Result<RouteTable, TableError>
    where
        F: FnOnce(&mut Service) -> Result<(), TableError>,
    {
        let mut services = self.services.clone();
        let svc = services
            .iter_mut()
            .find(|s| &*s.name == name)
            .ok_or_else(|| TableError::UnknownService(name.to_string()))?;
        f(svc)?;
        RouteTable::new(services)
    }

    /// The service for a request's host (without port, any case), or the default service.
    pub fn route(&self, host: Option<&str>) -> Option<&Service> {
        self.route_index(host).map(|i| &self.services[i])
    }

    /// The index in `services()` of the service `route` returns.
    pub(crate) fn route_index(&self, host: Option<&str>) -> Option<usize> {
        if let (Some(host), false) = (host, self.by_host.is_empty()) {
            let hit = if host.bytes().any(|b| b.is_ascii_uppercase()) {
                self.by_host.get(&host.to_ascii_lowercase())
            } else {
                self.by_host.get(host)
            };
            if let Some(&i) = hit {
                return Some(i);
            }
        }
        self.default
    }
}

/// Milliseconds on a monotonic clock that starts with the process; used for ejection deadlines.
pub(crate) fn now_ms() -> u64 {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    origin.elapsed().as_millis() as u64 + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, hosts: &[&str]) -> Service {
        let mut s = Service::new(name);
        s.hosts = hosts.iter().map(|h| h.to_string()).collect();
        s
    }

    #[test]
    fn routes_by_host_any_case_and_falls_back_to_default() {
        let t = RouteTable::new(vec![svc("shop", &["shop.example.com"]), svc("fallback", &[])]).unwrap();
        assert_eq!(&*t.route(Some("shop.example.com")).unwrap().name, "shop");
        assert_eq!(&*t.route(Some("SHOP.Example.com")).unwrap().name, "shop");
        assert_eq!(&*t.route(Some("other")).unwrap().name, "fallback");
        assert_eq!(&*t.route(None).unwrap().name, "fallback");
    }

    #[test]
    fn no_default_means_no_route() {
        let t = RouteTable::new(vec![svc("shop", &["shop"])]).unwrap();
        assert!(t.route(Some("other")).is_none());
    }

    #[test]
    fn rejects_ambiguous_tables() {
        assert!(matches!(
            RouteTable::new(vec![svc("a", &[]), svc("b", &[])]),
            Err(TableError::TwoDefaults(..))
        ));
        assert!(matches!(
            RouteTable::new(vec![svc("a", &["x"]), svc("b", &["X"])]),
            Err(TableError::DuplicateHost { .. })
        ));
        assert!(matches!(
            RouteTable::new(vec![svc("a", &["x"]), svc("a", &["y"])]),
            Err(TableError::DuplicateService(..))
        ));
    }

    #[test]
    fn pick_skips_unhealthy_failed_and_prefers_unejected() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mut a = Instance::new(addr);
        let b = Instance::new(addr);
        let c = Instance::new(addr);
        a.healthy = false;
        b.state.ejected_until_ms.store(u64::MAX, Ordering::Relaxed);
        let pool = Pool::new(None, vec![a, b, c]);
        for _ in 0..10 {
            assert_eq!(pool.pick(Balance::LeastInFlight, 0, now_ms()), Some(2));
            assert_eq!(pool.pick(Balance::RoundRobin, 0, now_ms()), Some(2));
        }
        // With c already tried, the ejected b is the last resort; a (unhealthy) never is.
        assert_eq!(pool.pick(Balance::LeastInFlight, 1 << 2, now_ms()), Some(1));
        assert_eq!(pool.pick(Balance::LeastInFlight, (1 << 2) | (1 << 1), now_ms()), None);
    }

    #[test]
    fn least_in_flight_prefers_idle_instance() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let pool = Pool::new(None, vec![Instance::new(addr), Instance::new(addr)]);
        pool.instances[0].state.in_flight.store(5, Ordering::Relaxed);
        for _ in 0..10 {
            assert_eq!(pool.pick(Balance::LeastInFlight, 0, now_ms()), Some(1));
        }
    }

    #[test]
    fn round_robin_alternates() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let pool = Pool::new(None, vec![Instance::new(addr), Instance::new(addr)]);
        let picks: Vec<_> = (0..4)
            .map(|_| pool.pick(Balance::RoundRobin, 0, now_ms()).unwrap())
            .collect();
        assert_eq!(picks, vec![0, 1, 0, 1]);
    }

    #[test]
    fn with_service_keeps_generation_counters() {
        let t = RouteTable::new(vec![svc("a", &[])]).unwrap();
        let g = t.service("a").unwrap().blue.generation().clone();
        let guard = g.enter_request();
        let t2 = t
            .with_service("a", |s| {
                s.active = Colour::Green;
                Ok(())
            })
            .unwrap();
        assert_eq!(t2.service("a").unwrap().blue.in_flight(), 1);
        drop(guard);
        assert_eq!(t2.service("a").unwrap().blue.in_flight(), 0);
        assert!(t.with_service("nope", |_| Ok(())).is_err());
    }

    #[test]
    fn preview_token_comparison() {
        let mut s = Service::new("a");
        assert!(!s.preview_matches(b"anything"));
        s.preview_token = Some(Arc::from(&b"secret"[..]));
        assert!(s.preview_matches(b"secret"));
        assert!(!s.preview_matches(b"secreT"));
        assert!(!s.preview_matches(b"secret2"));
        assert!(!s.preview_matches(b""));
    }
}
