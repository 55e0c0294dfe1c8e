//! The daemon: the proxy, the state store, and one actor per service that runs its lifecycle.
//!
//! Each service has an actor task that owns its [`State`]. Everything that can change the state
//! reaches the actor as a message: user commands (deploy, promote, rollback, abort) in a bounded
//! mailbox, and reports from the work it started (instances healthy, smoke result, watch samples,
//! timers) on a channel of their own ([`Report`]). The actor handles one message at a time: it
//! steps the state machine, commits the new state with its records in one store transaction,
//! then carries out the actions in order (see [`crate::lifecycle`]). The proxy never waits for the
//! actor; the actor only stores tables.
//!
//! Nothing slow runs inside the actor: drains (up to `drain_timeout` and the close window) and
//! stops (up to the grace period) are queued on the colour's [`Lane`], a task that carries out one
//! colour's slow work in order, so that commands are answered while a colour drains. Instances are
//! started on a colour only once everything queued there before has finished.
//!
//! A process group's instance changes reach the actor too ([`Actor::instances_changed`]): an
//! instance restarted on another port is health-checked and routed at its new address, the store
//! records the processes that run now, and a release whose instances keep exiting at once is
//! aborted without waiting for the health deadline.
//!
//! What must never happen, and why it cannot: live traffic on an unvalidated colour (the state
//! machine only switches to validated colours, and once something is live the route table's
//! active colour changes only in [`Action::SwitchTo`], one store after the commit of the `live`
//! it names); two deployments of one service at once (one actor, one state).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cutover_proxy::{Colour, Instance, Proxy, RouteTable, Service, StatsSnapshot};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::config::{Config, Driver, ServiceConfig};
use crate::health::{CheckSpec, HealthChecker, HealthSnapshot};
use crate::lifecycle::{
    Action, DeploymentId, Event, LifecycleError, MigratePlan, MigrationStep, Phase, Plan, Promotion, Record, Release,
    RollbackKind, State, Timer, Transition, WatchPolicy, WatchSample,
};
use crate::process::{InstanceInfo, InstanceSpec, ProcessGroup, Recorded};
use crate::store::{Audit, LocalStore, Revision, StateStore, Store, StoreError, StoredInstance};
use crate::webhooks::Webhooks;

pub use crate::events::{EventKind, Notice};

mod fleet_node;
mod fleet_runs;
mod mirror;
mod release;
pub use fleet_node::{FleetNodeView, FleetView, LocalFleetView, NodeServiceView};
pub use release::{Member, ReleaseRecord, ReleaseRequest};
mod supervise;

/// A service as `cutover status` shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ServiceView {
    pub name: String,
    pub live: Option<ColourView>,
    pub warm: Option<ColourView>,
    pub phase: String,
    pub deployment: Option<DeploymentView>,
    /// The release a cold rollback would deploy again (when no colour is warm).
    pub previous: Option<String>,
    pub summary: String,
    pub instances: Vec<InstanceView>,
    /// `paused`, or `maintenance: MESSAGE`, while live traffic is held.
    pub hold: Option<String>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ColourView {
    pub colour: String,
    pub version: String,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct DeploymentView {
    pub id: u64,
    pub version: String,
    pub colour: String,
}

/// One stored step of a deployment, worded as its [`Notice`] was.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StepView {
    /// Unix milliseconds, when the step was committed.
    pub at: u64,
    /// The event kind (`started`, `healthy`, ...).
    pub kind: EventKind,
    pub message: String,
    pub terminal: bool,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct InstanceView {
    pub colour: String,
    pub addr: String,
    pub healthy: bool,
    /// Passed over by the proxy for a moment after a connection to it failed.
    pub ejected: bool,
    pub in_flight: usize,
}

/// Errors of a daemon command, as the API and CLI report them.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("unknown service '{0}': check the name against `cutover status` or the config file")]
    UnknownService(String),
    #[error("{0}")]
    Lifecycle(#[from] LifecycleError),
    #[error("{0}")]
    BadRequest(String),
    #[error("the daemon is shutting down")]
    ShuttingDown,
    /// The service's actor panicked while it handled the command, which may or may not have
    /// taken effect; the actor is being restarted (see `daemon/supervise.rs`).
    #[error(
        "service {0}: the command was cut short by a fault in the daemon's control of the service, which restarts \
         from its committed state; see `cutover status {0}` and the daemon's log, then try again"
    )]
    Faulted(String),
    #[error("state store: {0}")]
    Store(String),
    /// Not now, or not here: the message says why and what to do.
    #[error("{0}")]
    Conflict(String),
    /// In a fleet: the leader's refusal of a command this node forwarded to it, with the HTTP
    /// status it answered with.
    #[error("{message}")]
    Remote { status: u16, message: String },
}

impl CommandError {
    /// The HTTP status the admin API answers this refusal with.
    pub fn http_status(&self) -> u16 {
        match self {
            CommandError::UnknownService(_) => 404,
            CommandError::Lifecycle(e) => match e.kind() {
                crate::lifecycle::ErrorKind::Conflict => 409,
                crate::lifecycle::ErrorKind::Refused | crate::lifecycle::ErrorKind::Stale => 400,
                crate::lifecycle::ErrorKind::Internal => 500,
            },
            CommandError::BadRequest(_) => 400,
            CommandError::ShuttingDown | CommandError::Faulted(_) => 503,
            CommandError::Store(_) => 500,
            CommandError::Conflict(_) => 409,
            CommandError::Remote { status, .. } => *status,
        }
    }
}

/// How long a command forwarded to the fleet's leader waits for its answer, on top of the
/// fleet's `ack_timeout` (a rollback answers once every node serves it).
const FORWARD_TIMEOUT: Duration = Duration::from_secs(20);

/// What a rollback did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RollbackDone {
    /// `instant` (the previous colour was warm) or `cold` (a redeploy of the previous release).
    pub kind: String,
    pub deployment: Option<u64>,
    /// In a fleet, for an instant rollback: whether every node serves it, as the switch's
    /// notice says (which nodes acknowledged it, or which did not).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fleet: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    StateDir(#[from] crate::private_dir::StateDirError),
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
    #[error("{0}")]
    Proxy(#[from] cutover_proxy::StartError),
    #[error("{0}")]
    Table(#[from] cutover_proxy::TableError),
    #[error("cannot write {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Certificate(#[from] crate::tls::LoadError),
    #[error("services.{service}.affinity: {message}")]
    Affinity { service: String, message: String },
    #[error("fleet: {0}")]
    Fleet(String),
}

/// A user command, from the API through [`Daemon`].
enum Msg {
    /// `reply` gets the transition or why it was refused.
    Event {
        event: Event,
        audit: Option<Audit>,
        reply: oneshot::Sender<Result<Transition, CommandError>>,
    },
    /// `cutover deploy`: the id is allocated by the actor, which also keeps the static upstreams.
    /// `held`: part of release N of several services: validated once every service's instances
    /// are healthy, promoted with them by the release (`Msg::Hold`), never by itself.
    Deploy {
        version: String,
        upstreams: Vec<SocketAddr>,
        actor: String,
        held: Option<u64>,
        reply: oneshot::Sender<Result<u64, CommandError>>,
    },
    /// A release switches this service together with others in one store (`release`): the actor
    /// works out `event` (a promotion or a rollback) without committing it, replies with the
    /// transition and the revision it was decided on, and handles nothing else until `resume`:
    /// `Some(revision)`: the release committed it with the others' in one store (the new
    /// revision) and switched the route table; the rest of its actions are carried out. `None`
    /// or dropped: nothing happened.
    Hold {
        event: Event,
        reply: oneshot::Sender<Result<(Transition, Revision), CommandError>>,
        resume: oneshot::Receiver<Option<Revision>>,
    },
    Rollback {
        actor: String,
        reply: oneshot::Sender<Result<RollbackDone, CommandError>>,
    },
    /// The daemon stops. With [`AtShutdown::Leave`] the instances keep running, recorded for the
    /// next daemon to adopt; with [`AtShutdown::Stop`] every instance is stopped. Either way the
    /// state stays as committed, so the next start brings the live release back.
    Shutdown {
        instances: AtShutdown,
        reply: oneshot::Sender<()>,
    },
    /// A handover begins ([`Daemon::park`]): refused while a deployment is in progress;
    /// otherwise the instances are left running and recorded, and the actor waits for `resume`
    /// (`true`: go on from the committed state; `false` or dropped: end).
    Park {
        reply: oneshot::Sender<Result<(), CommandError>>,
        resume: oneshot::Receiver<bool>,
    },
}

/// What the admin API asks of the `cutover serve` process itself, which alone holds the listening
/// sockets and decides when the process ends.
pub enum ServeRequest {
    /// `cutover upgrade`: hand the sockets and the instances over to a new daemon started from
    /// `binary` (`None`: the file this process was started from), which must be serving within
    /// `timeout`.
    Upgrade {
        binary: Option<PathBuf>,
        timeout: Duration,
        reply: oneshot::Sender<Result<Upgraded, UpgradeFailed>>,
    },
    /// `cutover shutdown`: stop as at SIGTERM, doing with the instances as asked.
    Shutdown { instances: AtShutdown },
}

/// Why an upgrade did not happen; this daemon serves and manages on either way.
#[derive(Clone, Debug)]
pub enum UpgradeFailed {
    /// Not now (a deployment in progress): nothing was started.
    Refused(String),
    /// The new daemon could not be started or did not serve in time.
    Failed(String),
}

/// A new daemon serves in place of this one.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Upgraded {
    pub pid: u32,
    pub previous_pid: u32,
    pub binary: PathBuf,
}

/// The daemon's control, parked for a handover ([`Daemon::park`]): the proxy serves on from its
/// route table, the instances run on, nothing is checked or decided, and the state directory
/// is free for the successor.
pub struct Parked {
    daemon: Daemon,
    resumes: Vec<oneshot::Sender<bool>>,
}

impl Parked {
    /// The handover failed: take the state directory back and let every service's control go
    /// on from its committed state, adopting its instances as after a restart.
    pub async fn resume(self) -> Result<(), StartError> {
        let dir = self.daemon.shared.config.server.state_dir.clone();
        let relocked = tokio::task::spawn_blocking(move || crate::private_dir::lock_state_dir(&dir))
            .await
            .map_err(|e| StartError::Io {
                path: self.daemon.shared.config.server.state_dir.clone(),
                source: std::io::Error::other(e.to_string()),
            });
        let result = match relocked {
            Ok(Ok(lock)) => {
                *self
                    .daemon
                    .shared
                    .state_dir_lock
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(lock);
                Ok(())
            }
            Ok(Err(e)) => Err(StartError::from(e)),
            Err(e) => Err(e),
        };
        // Even without the lock: the successor is gone, and the services must be managed.
        for resume in self.resumes {
            let _ = resume.send(true);
        }
        result
    }

    /// The successor serves: every service's control ends here, leaving its instances to it.
    pub fn finish(self) {
        for resume in self.resumes {
            let _ = resume.send(false);
        }
    }
}

/// What a stopping daemon does with the instances it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AtShutdown {
    /// Leave them running and recorded: the next daemon adopts them, and a restart costs the
    /// applications nothing (the default for `cutover serve`).
    Leave,
    /// Stop them all (`cutover serve --stop-instances`, `cutover shutdown --stop-instances`).
    Stop,
}

/// What the actor's own work tells it: smoke results, timers, watch samples, health and instance
/// changes, and its lanes' progress.
///
/// Reports travel on an unbounded channel apart from the commands' mailbox, and the actor takes
/// them first. A report must never be lost or wait behind commands: a dropped `SmokePassed`
/// would leave a deployment validating forever (that phase has no timer), and a sender waiting
/// for room behind a burst of commands would hold the deployment up as long. The channel stays
/// small without a bound: reports come only from work the actor started (one per smoke run,
/// timer, lane job, health or instance change, watch tick), and the actor, which never waits on
/// anything slow, takes each at once. Commands keep their bounded mailbox: a flood of them makes
/// their senders wait, never the actor's own work.
enum Report {
    /// A report for the state machine.
    Event(Event),
    /// The health of a colour's instances changed.
    Health { colour: Colour, snapshot: HealthSnapshot },
    /// The process driver's view of a colour's instances changed (an exit, a restart, a port
    /// move), for the run `run` ([`Run::id`]): a report about a run since replaced is dropped.
    Instances {
        colour: Colour,
        run: u64,
        instances: Vec<InstanceInfo>,
    },
    /// Everything queued on `colour`'s lane before [`Action::StartInstances`] of `deployment` is
    /// done (the colour's earlier instances are drained and stopped): start `release` there, then
    /// carry out `then`, the actions that followed the start in its transition.
    ColourReady {
        deployment: DeploymentId,
        colour: Colour,
        release: Release,
        then: Vec<Action>,
    },
}

struct Shared {
    config: Config,
    proxy: Arc<Proxy>,
    /// The state all nodes share (one node: the SQLite file).
    store: Arc<dyn StateStore>,
    /// What only this host knows: the instances it started.
    local: Arc<dyn LocalStore>,
    notices: broadcast::Sender<Notice>,
    seq: Mutex<u64>,
    views: Mutex<BTreeMap<String, ServiceView>>,
    preview_token: String,
    /// Set once the actors are started; stopped last in [`Daemon::stop`].
    webhooks: OnceLock<Webhooks>,
    /// Held while this daemon's control runs: no second daemon runs on this state directory.
    /// Let go only while handing over to a successor ([`Daemon::park`]).
    state_dir_lock: Mutex<Option<crate::private_dir::StateDirLock>>,
    /// Where requests only `cutover serve` can carry out go (see [`Daemon::serve_requests`]).
    requests: OnceLock<mpsc::Sender<ServeRequest>>,
    /// The TLS listeners' certificates; `None` without TLS listeners.
    certificates: Option<Arc<crate::tls::Certificates>>,
    /// Polls the certificate files for changes; ended by [`Daemon::stop`].
    certificate_watch: Mutex<Option<JoinHandle<()>>>,
    /// This node's part in a fleet (`[fleet]`); `None` for a daemon on its own.
    fleet: Option<Arc<fleet_node::FleetNode>>,
    /// Per release of several services: how many services it has, and those whose new
    /// instances are healthy (see `Actor::await_release_healthy`).
    barriers: Mutex<BarrierMap>,
    /// Held while a release starts (`Daemon::release`): two never take the same id.
    release_start: tokio::sync::Mutex<()>,
}

/// See [`Shared::barriers`].
type BarrierMap = std::collections::HashMap<
    u64,
    (
        Vec<String>,
        tokio::sync::watch::Sender<std::collections::BTreeSet<String>>,
    ),
>;

impl Shared {
    fn notice(
        &self,
        service: &str,
        deployment: Option<DeploymentId>,
        kind: EventKind,
        message: String,
        reason: Option<String>,
    ) {
        let seq = self.next_seq();
        tracing::info!(
            service,
            deployment = deployment.map(|d| d.0),
            kind = kind.as_str(),
            reason,
            "{message}"
        );
        let notice = Notice {
            seq,
            at: unix_ms(SystemTime::now()),
            service: service.to_string(),
            deployment: deployment.map(|d| d.0),
            kind,
            message,
            reason,
            terminal: kind.ends_deployment(),
            from: None,
        };
        if let Some(node) = &self.fleet {
            node.publish(&notice);
        }
        let _ = self.notices.send(notice);
    }

    /// The number of the next notice.
    fn next_seq(&self) -> u64 {
        let mut s = self.seq.lock().unwrap_or_else(|p| p.into_inner());
        *s += 1;
        *s
    }

    /// Sends on a notice another node of the fleet made (`notice.from`), numbered as this
    /// daemon's.
    fn repeat(&self, mut notice: Notice) {
        notice.seq = self.next_seq();
        tracing::debug!(service = %notice.service, from = ?notice.from, "{}", notice.message);
        let _ = self.notices.send(notice);
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The running daemon. Cheap to clone.
#[derive(Clone)]
pub struct Daemon {
    shared: Arc<Shared>,
    /// The services' actors. In a fleet, only while this node leads.
    actors: Arc<fleet_node::Actors>,
}

impl Daemon {
    /// Opens the store, starts the proxy on the configured listeners, recovers every service from
    /// its last committed state and starts its actor. Fails with nothing left running.
    pub async fn start(config: Config) -> Result<Daemon, StartError> {
        Daemon::start_with(config, |_| {}).await
    }

    /// [`Daemon::start`], with a last word on the proxy's settings (e.g. the access log, which
    /// `cutover serve --access-log` turns on).
    pub async fn start_with(
        config: Config,
        adjust: impl FnOnce(&mut cutover_proxy::ProxyConfig),
    ) -> Result<Daemon, StartError> {
        Daemon::start_inheriting(config, adjust, Vec::new(), None).await
    }

    /// [`Daemon::start_with`], the proxy taking over listening sockets that are open already
    /// (from systemd, or from the daemon this one replaces) for the listeners whose addresses
    /// they have; see [`Proxy::start_closed_with`]. A socket no listener names is closed, with a
    /// warning.
    pub async fn start_inheriting(
        config: Config,
        adjust: impl FnOnce(&mut cutover_proxy::ProxyConfig),
        inherited: Vec<std::net::TcpListener>,
        fleet_lease: Option<i64>,
    ) -> Result<Daemon, StartError> {
        let state_dir = config.server.state_dir.clone();
        crate::private_dir::prepare_state_dir(&state_dir)?;
        // Before the store is opened or anything adopted: a second daemon goes no further.
        let state_dir_lock = crate::private_dir::lock_state_dir(&state_dir)?;
        let sqlite = {
            let dir = state_dir.clone();
            off_async_store(move || Store::open(dir)).await?
        };
        let sqlite = Arc::new(sqlite);
        let local: Arc<dyn LocalStore> = sqlite.clone();
        // In a fleet the state is shared through etcd; the SQLite file keeps what only this host
        // knows (the instances it started).
        let fleet = match &config.fleet {
            Some(f) => Some(Arc::new(fleet_node::FleetNode::new(
                f,
                crate::store::etcd::DEFAULT_TIMEOUT,
            )?)),
            None => None,
        };
        let store: Arc<dyn StateStore> = match &fleet {
            Some(node) => {
                let options = node.options.clone();
                Arc::new(off_async_store(move || crate::store::etcd::EtcdStore::connect(options)).await?)
            }
            None => sqlite,
        };
        // The store's token is the one every node uses; the file is a copy for smoke scripts and
        // people (and the token of a state directory from before the store kept it).
        let stored_token = {
            let store = store.clone();
            off_async_store(move || store.get_value(PREVIEW_TOKEN_KEY)).await?
        };
        let preview_token = {
            let dir = state_dir.clone();
            tokio::task::spawn_blocking(move || preview_token(&dir, stored_token))
                .await
                .map_err(|e| StartError::Io {
                    path: state_dir.join("preview.token"),
                    source: std::io::Error::other(e.to_string()),
                })??
        };
        {
            let (store, token) = (store.clone(), preview_token.clone());
            off_async_store(move || store.set_value(PREVIEW_TOKEN_KEY, Some(&token))).await?;
        }

        // Before the proxy: a CA bundle that cannot be loaded fails the start, naming its file.
        let mut upstream_tls = {
            let config = config.clone();
            tokio::task::spawn_blocking(move || crate::tls::load_upstream_tls(&config))
                .await
                .map_err(|e| crate::tls::LoadError {
                    key: "upstream_tls".into(),
                    message: format!("loading the CA files stopped: {e}"),
                })??
        };
        // Only when a service has affinity: the key its cookies are signed with.
        let affinity_key = if config.services.iter().any(|s| s.affinity.is_some()) {
            let stored = {
                let store = store.clone();
                off_async_store(move || store.get_value(AFFINITY_KEY_KEY)).await?
            };
            let (key, new) = affinity_key(stored.as_deref())?;
            if new {
                let (store, hex) = (store.clone(), to_hex(&key));
                off_async_store(move || store.set_value(AFFINITY_KEY_KEY, Some(&hex))).await?;
            }
            Some(key)
        } else {
            None
        };

        let mut services = Vec::new();
        for svc in &config.services {
            let mut s = Service::new(&svc.name);
            if let (Some(a), Some(key)) = (&svc.affinity, &affinity_key) {
                let refused = |message| StartError::Affinity {
                    service: svc.name.clone(),
                    message,
                };
                let mut affinity = cutover_proxy::Affinity::new(&a.cookie, a.window, key).map_err(refused)?;
                if let Some(app) = &a.app_cookie {
                    affinity = affinity.with_app_cookie(app).map_err(refused)?;
                }
                s.affinity = Some(Arc::new(affinity));
            }
            s.hosts = svc.hosts.clone();
            s.upstream_tls = upstream_tls.remove(&svc.name);
            s.https_redirect = svc
                .https_redirect
                .then(|| config.server.listen_tls.first().map(|a| a.port()))
                .flatten();
            s.balance = svc.balance;
            s.preview_token = Some(Arc::from(preview_token.as_bytes()));
            // A maintenance set before the restart holds from the first request on.
            let key = maintenance_key(&svc.name);
            let kept = {
                let store = store.clone();
                off_async_store(move || store.get_value(&key)).await?
            };
            if let Some(message) = kept {
                tracing::warn!(service = %svc.name, "in maintenance since before the start: live requests get 503 until `cutover resume {}`", svc.name);
                s.hold = Some(maintenance_hold(message.trim()));
            }
            services.push(s);
        }
        // Before the proxy: a certificate that cannot be loaded fails the start, naming its file.
        let certificates = if config.has_tls_listeners() || config.server.admin_tls.is_some() {
            let sources = crate::tls::Source::all(&config);
            let loaded = tokio::task::spawn_blocking(move || crate::tls::Certificates::load(sources))
                .await
                .map_err(|e| crate::tls::LoadError {
                    key: "tls".into(),
                    message: format!("loading the certificates stopped: {e}"),
                })??;
            if config.has_tls_listeners() {
                warn_uncovered_hosts(&config);
            }
            Some(Arc::new(loaded))
        } else {
            None
        };
        let mut proxy_config = config.proxy_config();
        adjust(&mut proxy_config);
        // Bound now (a busy port fails the start before anything runs), accepting only once
        // every service's committed live colour and instances are in the table, below.
        let (proxy, unused) = Proxy::start_closed_with(proxy_config, RouteTable::new(services)?, inherited)?;
        for socket in unused {
            let addr = socket
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "?".into());
            tracing::warn!(
                listen = %addr,
                "a listening socket on {addr} was passed to cutover, but no `[server] listen` or `preview_listen` names it; it is closed"
            );
        }
        let proxy = Arc::new(proxy);
        // Before the listeners accept (`open`, below): no handshake finds the set empty.
        let certificate_watch = match &certificates {
            Some(c) => {
                c.install(proxy.clone())?;
                Some(tokio::spawn(c.clone().watch()))
            }
            None => None,
        };
        let (notices, _) = broadcast::channel(1024);
        // Subscribed before the actors recover, so that webhooks see their notices too.
        let webhook_notices = notices.subscribe();
        let shared = Arc::new(Shared {
            config,
            proxy,
            store,
            local,
            notices,
            seq: Mutex::new(0),
            views: Mutex::new(BTreeMap::new()),
            preview_token,
            webhooks: OnceLock::new(),
            state_dir_lock: Mutex::new(Some(state_dir_lock)),
            requests: OnceLock::new(),
            certificates,
            certificate_watch: Mutex::new(certificate_watch),
            fleet,
            barriers: Mutex::new(Default::default()),
            release_start: tokio::sync::Mutex::new(()),
        });

        let actors: Arc<fleet_node::Actors> = Arc::default();
        match shared.fleet.clone() {
            // A node of a fleet: the committed route of every service before the listeners
            // accept; the actors only once this node leads.
            Some(node) => {
                *node.inherited_lease.lock().unwrap_or_else(|p| p.into_inner()) = fleet_lease;
                fleet_node::join(&node).await?;
                fleet_node::load(&shared, &node).await?;
                tokio::spawn(fleet_node::follow(shared.clone(), node.clone()));
                tokio::spawn(fleet_node::keep_membership(node.clone()));
                tokio::spawn(fleet_node::mirror_notices(shared.clone(), node.clone()));
                let daemon = Daemon {
                    shared: shared.clone(),
                    actors: actors.clone(),
                };
                tokio::spawn(fleet_node::lead(daemon, node));
            }
            None => {
                for svc in shared.config.services.clone() {
                    let tx = start_actor(&shared, &svc).await?;
                    actors
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(svc.name.clone(), tx);
                }
            }
        }
        let _ = shared
            .webhooks
            .set(Webhooks::start(shared.config.webhooks.clone(), webhook_notices));
        // Every actor has recovered: the committed live colours, versions and instances are in
        // the table. Clients that connected meanwhile waited in the backlog; none was answered
        // from the table as it was before.
        shared.proxy.open();
        let daemon = Daemon { shared, actors };
        daemon.resume_releases().await;
        Ok(daemon)
    }

    pub fn proxy(&self) -> &Arc<Proxy> {
        &self.shared.proxy
    }

    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    pub fn preview_token(&self) -> &str {
        &self.shared.preview_token
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Notice> {
        self.shared.notices.subscribe()
    }

    /// The requests for `cutover serve` itself ([`ServeRequest`]); `None` after the first call.
    /// Without a taker (a daemon run inside another program), they are refused.
    pub fn serve_requests(&self) -> Option<mpsc::Receiver<ServeRequest>> {
        let (tx, rx) = mpsc::channel(4);
        self.shared.requests.set(tx).ok().map(|_| rx)
    }

    /// Passes a request to `cutover serve`.
    pub async fn request(&self, request: ServeRequest) -> Result<(), CommandError> {
        let Some(tx) = self.shared.requests.get() else {
            return Err(CommandError::Conflict(
                "this daemon runs inside another program, not as `cutover serve`: it cannot be upgraded or shut down over the API".into(),
            ));
        };
        tx.send(request).await.map_err(|_| CommandError::ShuttingDown)
    }

    /// Parks every service's control for a handover to a successor daemon: nothing is started,
    /// stopped, checked or switched any more, the instances keep running, recorded for the
    /// successor to adopt, and the state directory's lock is let go. The proxy goes on serving
    /// from its route table. Refused, with everything as it was, while a deployment is in
    /// progress. [`Parked::resume`] undoes it; [`Parked::finish`] ends the control for good.
    pub async fn park(&self) -> Result<Parked, CommandError> {
        let mut parked = Parked {
            daemon: self.clone(),
            resumes: Vec::new(),
        };
        for tx in self.senders() {
            let (reply, answer) = oneshot::channel();
            let (resume, resumed) = oneshot::channel();
            let r = match tx.send(Msg::Park { reply, resume: resumed }).await {
                Ok(()) => answer.await.unwrap_or(Err(CommandError::ShuttingDown)),
                Err(_) => Err(CommandError::ShuttingDown),
            };
            match r {
                Ok(()) => parked.resumes.push(resume),
                Err(e) => {
                    for resume in parked.resumes {
                        let _ = resume.send(true);
                    }
                    return Err(e);
                }
            }
        }
        *self.shared.state_dir_lock.lock().unwrap_or_else(|p| p.into_inner()) = None;
        Ok(parked)
    }

    /// `cutover pause`: holds `service`'s live requests until [`Daemon::resume`]; each waits at
    /// most `max_wait`, then gets 503. The preview route is not held. Not kept across a restart
    /// (a pause is for a few seconds of a write freeze).
    pub fn pause(&self, service: &str, max_wait: Duration, actor: &str) -> Result<(), CommandError> {
        self.actor(service)?;
        self.not_in_a_fleet("pause")?;
        let gate = Arc::new(cutover_proxy::PauseGate::new(max_wait));
        self.hold(service, Some(cutover_proxy::Hold::Paused(gate)))?;
        self.shared.notice(
            service,
            None,
            EventKind::Hold,
            format!("live traffic paused by {actor}: requests wait up to {max_wait:?}, then get 503"),
            None,
        );
        Ok(())
    }

    /// `cutover resume`: lets held requests through (a pause or a maintenance ends).
    pub async fn resume(&self, service: &str, actor: &str) -> Result<(), CommandError> {
        self.actor(service)?;
        self.save_maintenance(service, None).await?;
        self.hold(service, None)?;
        self.shared.notice(
            service,
            None,
            EventKind::Hold,
            format!("live traffic resumed by {actor}"),
            None,
        );
        Ok(())
    }

    /// `cutover maintenance`: answers `service`'s live requests with 503, `message` and
    /// `Retry-After` until [`Daemon::resume`]. Kept across restarts (in the state directory), so
    /// that a restart in the middle of a maintenance does not let traffic in.
    pub async fn maintenance(&self, service: &str, message: &str, actor: &str) -> Result<(), CommandError> {
        self.actor(service)?;
        self.not_in_a_fleet("maintenance")?;
        let message = message.trim();
        if message.is_empty() || message.len() > 2000 || message.chars().any(|c| c.is_control() && c != '\n') {
            return Err(CommandError::BadRequest(
                "the maintenance message must be 1 to 2000 characters of text".into(),
            ));
        }
        self.save_maintenance(service, Some(message)).await?;
        self.hold(service, Some(maintenance_hold(message)))?;
        self.shared.notice(
            service,
            None,
            EventKind::Hold,
            format!("in maintenance (set by {actor}): live requests get 503 \"{message}\""),
            None,
        );
        Ok(())
    }

    fn hold(&self, service: &str, hold: Option<cutover_proxy::Hold>) -> Result<(), CommandError> {
        self.shared
            .proxy
            .hold(service, hold)
            .map_err(|e| CommandError::Store(e.to_string()))
    }

    async fn save_maintenance(&self, service: &str, message: Option<&str>) -> Result<(), CommandError> {
        let (store, key) = (self.shared.store.clone(), maintenance_key(service));
        let message = message.map(str::to_string);
        off_async_store(move || store.set_value(&key, message.as_deref()))
            .await
            .map_err(|e| CommandError::Store(format!("cannot record the maintenance: {e}")))
    }

    /// The admin API's certificate, kept current by reloads, when `admin_tls` is set.
    pub fn admin_certificate(&self) -> Option<Arc<cutover_proxy::CertificateSlot>> {
        self.shared.certificates.as_ref().and_then(|c| c.admin())
    }

    /// The TLS listeners' certificates as served now (empty without TLS listeners).
    pub fn certificates(&self) -> Vec<crate::tls::CertificateView> {
        self.shared.certificates.as_ref().map(|c| c.views()).unwrap_or_default()
    }

    /// Reads every certificate file again (`cutover reload`): each one that loads is served to
    /// new TLS handshakes from now on, each one that fails keeps its previous certificate.
    /// Returns every certificate as served afterwards, with the errors.
    pub async fn reload_certificates(&self) -> Vec<crate::tls::CertificateView> {
        let Some(certificates) = self.shared.certificates.clone() else {
            return Vec::new();
        };
        let views = certificates.clone();
        tokio::task::spawn_blocking(move || certificates.reload(true))
            .await
            .unwrap_or_else(|_| views.views())
    }

    /// Reads each service's `upstream_tls` CA file again: new connections to its instances (and
    /// health checks started from now on) verify them with it; open ones keep what they
    /// verified. A file that cannot be used leaves the service on the CA it had, and says why.
    pub async fn reload_upstream_cas(&self) -> Vec<crate::tls::UpstreamCaView> {
        let services: Vec<ServiceConfig> = self
            .shared
            .config
            .services
            .iter()
            .filter(|s| s.upstream_tls.is_some())
            .cloned()
            .collect();
        let loaded = tokio::task::spawn_blocking(move || {
            services
                .into_iter()
                .map(|s| {
                    let file = s
                        .upstream_tls
                        .as_ref()
                        .map(|t| t.ca.display().to_string())
                        .unwrap_or_default();
                    (s.name.clone(), file, crate::tls::load_service_upstream_tls(&s))
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        let mut views = Vec::new();
        for (service, file, result) in loaded {
            let error = match result {
                Ok(Some(tls)) => {
                    let r = self.shared.proxy.update(|t| {
                        t.with_service(&service, |s| {
                            s.upstream_tls = Some(tls.clone());
                            Ok(())
                        })
                    });
                    r.err().map(|e| e.to_string())
                }
                Ok(None) => None,
                Err(e) => Some(format!("{e}; the CA loaded before stays in use")),
            };
            match &error {
                None => tracing::info!(service = %service, file = %file, "upstream CA file read again"),
                Some(e) => tracing::error!(service = %service, file = %file, error = %e, "upstream CA file not taken"),
            }
            views.push(crate::tls::UpstreamCaView { service, file, error });
        }
        views
    }

    /// Every service, in name order.
    pub fn status(&self) -> Vec<ServiceView> {
        let views = self.shared.views.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<ServiceView> = views.values().cloned().collect();
        let table = self.shared.proxy.table();
        for v in &mut out {
            v.instances = instance_views(&table, &v.name);
            v.hold = table.service(&v.name).and_then(|s| s.hold.as_ref()).map(|h| match h {
                cutover_proxy::Hold::Paused(_) => "paused".to_string(),
                cutover_proxy::Hold::Maintenance(page) => format!("maintenance: {}", page.message),
            });
        }
        out
    }

    /// The mailbox of `service`'s actor. In a fleet, a node that does not lead has none: the
    /// command is refused, naming the leader.
    fn actor(&self, service: &str) -> Result<mpsc::Sender<Msg>, CommandError> {
        if let Some(tx) = self.actors.read().unwrap_or_else(|p| p.into_inner()).get(service) {
            return Ok(tx.clone());
        }
        self.known(service)?;
        match &self.shared.fleet {
            Some(node) => Err(CommandError::Conflict(node.not_leading())),
            None => Err(CommandError::UnknownService(service.to_string())),
        }
    }

    /// Holds of live traffic act on this node's proxy only: in a fleet they would hold one node
    /// of several, so they are refused there.
    fn not_in_a_fleet(&self, command: &str) -> Result<(), CommandError> {
        match &self.shared.fleet {
            Some(_) => Err(CommandError::Conflict(format!(
                "`cutover {command}` holds the traffic of one node only, and this node is one of a [fleet]: \
                 it is not supported in a fleet yet"
            ))),
            None => Ok(()),
        }
    }

    /// Whether `service` is one of the config's.
    fn known(&self, service: &str) -> Result<(), CommandError> {
        match self.shared.config.service(service) {
            Some(_) => Ok(()),
            None => Err(CommandError::UnknownService(service.to_string())),
        }
    }

    /// Every actor's mailbox.
    fn senders(&self) -> Vec<mpsc::Sender<Msg>> {
        self.actors
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Why a command sent to `service` got no answer: the daemon stops (the mailbox is closed),
    /// or the actor failed while handling it (the supervisor still holds the mailbox).
    fn unanswered(&self, service: &str) -> CommandError {
        match self.actors.read().unwrap_or_else(|p| p.into_inner()).get(service) {
            Some(tx) if !tx.is_closed() => CommandError::Faulted(service.to_string()),
            _ => CommandError::ShuttingDown,
        }
    }

    /// In a fleet, on a node that does not lead: the membership to forward `service`'s
    /// commands through (`None`: this node carries them out itself).
    fn forwarding(&self, service: &str) -> Result<Option<Arc<crate::fleet::Membership>>, CommandError> {
        if self
            .actors
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(service)
        {
            return Ok(None);
        }
        self.known(service)?;
        let Some(node) = &self.shared.fleet else {
            return Ok(None);
        };
        match node.membership().filter(|m| !m.is_lost()) {
            Some(m) => Ok(Some(m)),
            None => Err(CommandError::Conflict(node.not_leading())),
        }
    }

    /// Sends `command` to the fleet's leader through etcd and returns its answer. Waits for a
    /// leader to take it, so a command sent while leadership changes hands is carried out by
    /// the next leader.
    async fn forward(
        &self,
        membership: &crate::fleet::Membership,
        service: &str,
        actor: &str,
        command: crate::fleet::Command,
    ) -> Result<crate::fleet::Done, CommandError> {
        let timeout = self
            .shared
            .fleet
            .as_ref()
            .map_or(FORWARD_TIMEOUT, |n| n.config.ack_timeout + FORWARD_TIMEOUT);
        match membership.forward(service, actor, command, timeout).await {
            Ok(answer) => answer
                .result
                .map_err(|(status, message)| CommandError::Remote { status, message }),
            Err(e @ crate::fleet::RelayError::NoAnswer { .. }) => Err(CommandError::Remote {
                status: 504,
                message: e.to_string(),
            }),
            Err(crate::fleet::RelayError::Fleet(e)) => Err(CommandError::Remote {
                status: 503,
                message: e.to_string(),
            }),
        }
    }

    /// Starts a deployment of `version`; returns its id once the first step is committed. In a
    /// fleet, a node that does not lead forwards it to the leader.
    pub async fn deploy(
        &self,
        service: &str,
        version: &str,
        upstreams: Vec<SocketAddr>,
        actor: &str,
    ) -> Result<u64, CommandError> {
        if let Some(m) = self.forwarding(service)? {
            let command = crate::fleet::Command::Deploy {
                version: version.to_string(),
                upstreams: upstreams.iter().map(|a| a.to_string()).collect(),
            };
            let done = self.forward(&m, service, actor, command).await?;
            return done.deployment.ok_or_else(|| CommandError::Remote {
                status: 500,
                message: "the leader accepted the deployment but did not say its id".into(),
            });
        }
        self.deploy_here(service, version, upstreams, actor).await
    }

    /// [`Daemon::deploy`] on this node, which must lead.
    async fn deploy_here(
        &self,
        service: &str,
        version: &str,
        upstreams: Vec<SocketAddr>,
        actor: &str,
    ) -> Result<u64, CommandError> {
        let (reply, rx) = oneshot::channel();
        let msg = Msg::Deploy {
            version: version.to_string(),
            upstreams,
            actor: actor.to_string(),
            held: None,
            reply,
        };
        self.actor(service)?
            .send(msg)
            .await
            .map_err(|_| CommandError::ShuttingDown)?;
        rx.await.map_err(|_| self.unanswered(service))?
    }

    /// [`Daemon::promote`] on this node, which must lead.
    async fn promote_here(&self, service: &str, actor: &str) -> Result<(), CommandError> {
        self.command(service, Event::Promote { id: None }, actor, "promote")
            .await
            .map(|_| ())
    }

    /// [`Daemon::abort`] on this node, which must lead.
    async fn abort_here(&self, service: &str, actor: &str) -> Result<(), CommandError> {
        self.command(service, Event::Abort, actor, "abort").await.map(|_| ())
    }

    pub async fn promote(&self, service: &str, actor: &str) -> Result<(), CommandError> {
        if let Some(m) = self.forwarding(service)? {
            return self
                .forward(&m, service, actor, crate::fleet::Command::Promote)
                .await
                .map(|_| ());
        }
        self.promote_here(service, actor).await
    }

    pub async fn abort(&self, service: &str, actor: &str) -> Result<(), CommandError> {
        if let Some(m) = self.forwarding(service)? {
            return self
                .forward(&m, service, actor, crate::fleet::Command::Abort)
                .await
                .map(|_| ());
        }
        self.abort_here(service, actor).await
    }

    pub async fn rollback(&self, service: &str, actor: &str) -> Result<RollbackDone, CommandError> {
        if let Some(m) = self.forwarding(service)? {
            let done = self
                .forward(&m, service, actor, crate::fleet::Command::Rollback)
                .await?;
            return Ok(RollbackDone {
                kind: done.rollback.unwrap_or_default(),
                deployment: done.deployment,
                fleet: done.fleet,
            });
        }
        self.rollback_here(service, actor).await
    }

    /// [`Daemon::rollback`] on this node, which must lead.
    async fn rollback_here(&self, service: &str, actor: &str) -> Result<RollbackDone, CommandError> {
        let (reply, rx) = oneshot::channel();
        self.actor(service)?
            .send(Msg::Rollback {
                actor: actor.to_string(),
                reply,
            })
            .await
            .map_err(|_| CommandError::ShuttingDown)?;
        rx.await.map_err(|_| self.unanswered(service))?
    }

    async fn command(
        &self,
        service: &str,
        event: Event,
        actor: &str,
        action: &str,
    ) -> Result<Transition, CommandError> {
        let (reply, rx) = oneshot::channel();
        let audit = Audit {
            actor: actor.to_string(),
            service: None,
            action: action.to_string(),
            arguments: String::new(),
            result: "ok".to_string(),
        };
        self.actor(service)?
            .send(Msg::Event {
                event,
                audit: Some(audit),
                reply,
            })
            .await
            .map_err(|_| CommandError::ShuttingDown)?;
        rx.await.map_err(|_| self.unanswered(service))?
    }

    /// The last `limit` deployments of a service, newest first.
    pub async fn history(
        &self,
        service: &str,
        limit: usize,
    ) -> Result<Vec<crate::store::DeploymentSummary>, CommandError> {
        self.known(service)?;
        let (store, name) = (self.shared.store.clone(), service.to_string());
        tokio::task::spawn_blocking(move || store.history(&name, limit))
            .await
            .map_err(|e| CommandError::Store(e.to_string()))?
            .map_err(|e| CommandError::Store(e.to_string()))
    }

    /// The steps of deployment `id` of a service so far, oldest first; empty if it has none (no
    /// such deployment). Read from the store, so a client that was not listening when they
    /// happened (a page opened mid-deployment) sees them too.
    pub async fn steps(&self, service: &str, id: u64) -> Result<Vec<StepView>, CommandError> {
        self.known(service)?;
        let Some(cfg) = self.shared.config.services.iter().find(|s| s.name == service) else {
            return Ok(Vec::new());
        };
        let (store, name) = (self.shared.store.clone(), service.to_string());
        let entries = tokio::task::spawn_blocking(move || store.transitions(&name, DeploymentId(id)))
            .await
            .map_err(|e| CommandError::Store(e.to_string()))?
            .map_err(|e| CommandError::Store(e.to_string()))?;
        Ok(entries
            .iter()
            .map(|t| {
                let (_, kind, message, _) = Actor::describe(cfg, &t.record);
                StepView {
                    at: unix_ms(t.at),
                    kind,
                    message,
                    terminal: kind.ends_deployment(),
                }
            })
            .collect())
    }

    /// In a fleet: this node's own view (member, connected, leading, applied revisions), for
    /// metrics; `None` without `[fleet]`.
    pub fn fleet_local(&self) -> Option<LocalFleetView> {
        self.shared.fleet.as_ref().map(|n| n.local_view())
    }

    /// In a fleet: this node and every member as etcd sees it (applied revisions, whether each
    /// is current, the leader), within `within`; `None` without `[fleet]`.
    pub async fn fleet_status(&self, within: Duration) -> Option<FleetView> {
        let node = self.shared.fleet.as_ref()?;
        let services: Vec<String> = self.shared.config.services.iter().map(|s| s.name.clone()).collect();
        Some(node.view(&services, within).await)
    }

    /// In a fleet: the lease this node is a member under, for the daemon that replaces this one
    /// (`cutover upgrade`), which takes the node's registration (and leadership) over with it.
    pub fn fleet_lease(&self) -> Option<i64> {
        self.shared.fleet.as_ref()?.membership().map(|m| m.lease())
    }

    /// In a fleet, after [`Daemon::stop`] (not after a handover, whose successor keeps the
    /// lease): leaves the fleet at once, so that another node leads without waiting for the
    /// lease to expire and a restart of this node registers at once.
    pub async fn leave_fleet(&self) {
        let Some(membership) = self.shared.fleet.as_ref().and_then(|n| n.membership()) else {
            return;
        };
        match membership.resign().await {
            Ok(()) => tracing::info!("left the fleet"),
            Err(e) => tracing::warn!(error = %e, "cannot leave the fleet; its lease expires by itself"),
        }
    }

    /// Stops the daemon: the proxy finishes what it is serving and closes, then each service's
    /// control stops, leaving its instances running or stopping them (see [`AtShutdown`]). The
    /// committed state is kept: the next start brings the live releases back, adopting what was
    /// left running. (A crash leaves instances running too.)
    pub async fn stop(&self, instances: AtShutdown) {
        if let Some(watch) = self
            .shared
            .certificate_watch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            watch.abort();
        }
        self.shared.proxy.shutdown();
        let proxy = self.shared.proxy.clone();
        let _ = tokio::task::spawn_blocking(move || proxy.join()).await;
        for tx in self.senders() {
            let (reply, rx) = oneshot::channel();
            if tx.send(Msg::Shutdown { instances, reply }).await.is_ok() {
                let _ = rx.await;
            }
        }
        if let Some(node) = &self.shared.fleet {
            node.end_runs(instances).await;
        }
        // Last, so that the notices of the shutdown itself are still sent.
        if let Some(webhooks) = self.shared.webhooks.get() {
            webhooks.stop().await;
        }
    }
}

/// Warns of the hosts whose TLS handshakes will fail: those of a service without a certificate
/// when there is no default certificate either.
fn warn_uncovered_hosts(config: &Config) {
    if config.server.tls.is_some() {
        return;
    }
    for s in config.services.iter().filter(|s| s.tls.is_none()) {
        if s.hosts.is_empty() {
            tracing::warn!(
                service = %s.name,
                "there is no default certificate ([server] tls): TLS clients that send no server name, or a name no service's certificate covers, cannot reach {} over TLS",
                s.name
            );
        } else {
            tracing::warn!(
                service = %s.name,
                "services.{} has no certificate and there is no default one ([server] tls): TLS handshakes for {} fail",
                s.name,
                s.hosts.join(", ")
            );
        }
    }
}

/// Runs a store call on a blocking thread. A call that does not come back (its thread was
/// cancelled because the runtime is shutting down) is an error like any other store failure,
/// never a panic: the proxy shares this process and must not go down with it.
async fn off_async_store<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(StoreError::Interrupted { detail: e.to_string() }))
}

/// The store's key of a service's maintenance message, set while it is in maintenance.
fn maintenance_key(service: &str) -> String {
    format!("maintenance/{service}")
}

fn maintenance_hold(message: &str) -> cutover_proxy::Hold {
    cutover_proxy::Hold::Maintenance(Arc::new(cutover_proxy::MaintenancePage {
        message: message.to_string(),
        retry_after: Duration::from_secs(60),
    }))
}

/// The store's key of the preview token.
const PREVIEW_TOKEN_KEY: &str = "preview-token";

/// The store's key of the key affinity cookies are signed with (hex).
const AFFINITY_KEY_KEY: &str = "affinity-key";

/// The affinity key: the store's (`stored`, hex), or 32 new random bytes (`true`: to be stored).
/// It lives in the store, not in a file of its own, so that every node sharing the store signs
/// and verifies with the same key; the state directory holding the store is private (0700).
fn affinity_key(stored: Option<&str>) -> Result<(Vec<u8>, bool), StartError> {
    if let Some(key) = stored.and_then(from_hex).filter(|k| k.len() >= 32) {
        return Ok((key, false));
    }
    if stored.is_some() {
        tracing::warn!(
            "the stored affinity key is unreadable; a new one is made (affinity cookies issued so far are ignored)"
        );
    }
    let mut key = vec![0u8; 32];
    getrandom::getrandom(&mut key).map_err(|e| StartError::Io {
        path: "getrandom(2)".into(),
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok((key, true))
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim().as_bytes();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    s.chunks(2)
        .map(|pair| {
            let digit = |c: u8| (c as char).to_digit(16);
            Some((digit(pair[0])? * 16 + digit(pair[1])?) as u8)
        })
        .collect()
}

/// The preview token: the store's (`stored`), else the one in `<state_dir>/preview.token` (a
/// state directory from before the store kept it), else a new random one. The file (mode 0600)
/// is written whenever it does not hold that token, so that a smoke script or a person can
/// read it.
fn preview_token(state_dir: &std::path::Path, stored: Option<String>) -> Result<String, StartError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = state_dir.join("preview.token");
    let in_file = std::fs::read_to_string(&path).ok().map(|t| t.trim().to_string());
    let token = match (
        stored.filter(|t| !t.is_empty()),
        in_file.clone().filter(|t| !t.is_empty()),
    ) {
        (Some(t), _) | (None, Some(t)) => t,
        (None, None) => {
            let mut bytes = [0u8; 16];
            getrandom::getrandom(&mut bytes).map_err(|e| StartError::Io {
                path: "getrandom(2)".into(),
                source: std::io::Error::other(e.to_string()),
            })?;
            bytes.iter().map(|b| format!("{b:02x}")).collect()
        }
    };
    if in_file.as_deref() == Some(token.as_str()) {
        return Ok(token);
    }
    let io = |source| StartError::Io {
        path: path.clone(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .map_err(io)?;
    writeln!(file, "{token}").map_err(io)?;
    Ok(token)
}

/// The status view of a service's committed state (instances and hold are filled in by
/// [`Daemon::status`] from the route table).
fn view_of(state: &State) -> ServiceView {
    ServiceView {
        name: state.service.clone(),
        live: state.live.as_ref().map(|l| ColourView {
            colour: l.colour.to_string(),
            version: l.release.version.clone(),
        }),
        // During a gradual switch the way back is the live colour itself, not a warm one.
        warm: state
            .warm()
            .filter(|w| state.live.as_ref() != Some(w))
            .map(|l| ColourView {
                colour: l.colour.to_string(),
                version: l.release.version.clone(),
            }),
        phase: state.phase.name().to_string(),
        deployment: state.in_progress().map(|d| DeploymentView {
            id: d.id.0,
            version: d.release.version.clone(),
            colour: d.colour.to_string(),
        }),
        previous: state.previous.as_ref().map(|r| r.version.clone()),
        summary: state.status(),
        instances: Vec::new(),
        hold: None,
    }
}

/// Starts the actor of `svc` from its committed state (recovered as after a restart) under its
/// supervisor; returns its mailbox.
async fn start_actor(shared: &Arc<Shared>, svc: &ServiceConfig) -> Result<mpsc::Sender<Msg>, StoreError> {
    let (mut actor, reports_rx) = Actor::load(shared.clone(), svc.clone()).await?;
    let (tx, rx) = mpsc::channel(256);
    actor.recover().await;
    tokio::spawn(supervise::service(actor, rx, reports_rx));
    Ok(tx)
}

fn instance_views(table: &RouteTable, service: &str) -> Vec<InstanceView> {
    let Some(svc) = table.service(service) else {
        return Vec::new();
    };
    [Colour::Blue, Colour::Green]
        .iter()
        .flat_map(|&c| {
            svc.pool(c).instances.iter().map(move |i| InstanceView {
                colour: c.to_string(),
                addr: i.addr.to_string(),
                healthy: i.healthy,
                ejected: i.ejected(),
                in_flight: i.in_flight(),
            })
        })
        .collect()
}

/// The instances of one colour and their health checks.
struct Run {
    /// Tells this run's reports from those of an earlier run of the same colour still queued.
    id: u64,
    release: Release,
    instances: Instances,
    /// The addresses the health checks and the colour's pool have. For a process group they
    /// follow its instances: a restart finding an instance's port taken moves it to another.
    addrs: Vec<SocketAddr>,
    /// What the store holds for a process group's instances, so that only changes are written.
    recorded: Vec<Recorded>,
    health: HealthChecker,
    /// Forwards the health snapshots to the actor.
    forward: JoinHandle<()>,
    /// Forwards a process group's instance changes to the actor; `None` for static upstreams.
    follow: Option<JoinHandle<()>>,
    /// Instances announced as out of rotation, so that each going out is announced once.
    out_of_rotation: std::collections::HashSet<SocketAddr>,
}

impl Run {
    /// Stops forwarding: nothing of this run reaches the actor any more (what is queued is
    /// dropped by [`Run::id`] or is harmless).
    fn stop_forwarding(&self) {
        self.forward.abort();
        if let Some(follow) = &self.follow {
            follow.abort();
        }
    }
}

enum Instances {
    Process(ProcessGroup),
    Static(Vec<SocketAddr>),
}

impl Instances {
    fn addrs(&self) -> Vec<SocketAddr> {
        match self {
            Instances::Process(g) => g.instances().iter().map(|i| i.addr()).collect(),
            Instances::Static(a) => a.clone(),
        }
    }
}

fn slot(c: Colour) -> usize {
    match c {
        Colour::Blue => 0,
        Colour::Green => 1,
    }
}

/// Sets a colour's instances (with their current health) in the route table. An instance the
/// checks have no verdict on yet keeps the flag it had or, if it is new, is in rotation only if
/// it is one of `known_healthy`.
fn set_pool(
    proxy: &Proxy,
    service: &str,
    colour: Colour,
    version: Option<&str>,
    addrs: &[SocketAddr],
    health: Option<&HealthSnapshot>,
    known_healthy: &[SocketAddr],
) {
    let r = proxy.update(|t| {
        t.with_service(service, |s| {
            let old = s.pool(colour).clone();
            // Keep the same Instance (and its counters and pooled connections) for an address
            // that stays; only its health flag changes.
            let instances = addrs
                .iter()
                .map(|a| {
                    let known = old.instances.iter().find(|i| i.addr == *a).cloned();
                    let before = known.as_ref().map_or(known_healthy.contains(a), |i| i.healthy);
                    let mut i = known.unwrap_or_else(|| Instance::new(*a));
                    i.healthy = match health.and_then(|h| h.get(*a)) {
                        Some(h) if h.status != crate::health::Status::Unknown => h.healthy,
                        _ => before,
                    };
                    i
                })
                .collect();
            *s.pool_mut(colour) = old.with_instances(version, instances);
            Ok(())
        })
    });
    if let Err(e) = r {
        tracing::error!(service, error = %e, "cannot update the route table");
    }
}

/// One colour's slow work, carried out in order by a task of its own.
///
/// A drain waits up to `drain_timeout` and the close window, a stop up to the grace period:
/// inside the actor they would hold every command and report of the service for most of a
/// minute. The actor decides and queues; the lane only waits and reports. Order is kept per
/// colour, which is the order that matters: a colour is drained before it is stopped, and a
/// start on a colour comes after everything queued there before it ([`Job::Then`]), so a new
/// release never starts next to the one being stopped on its colour. The two lanes run side by
/// side: a rollback's drain of one colour does not delay anything on the other.
///
/// A crash meanwhile loses nothing that matters: the state was committed before the work was
/// queued, and recovery stops every colour that is neither live nor warm.
struct Lane {
    jobs: mpsc::UnboundedSender<Job>,
    /// Jobs queued and not finished.
    pending: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

enum Job {
    /// Wait for what entered the colour to finish ([`Proxy::drain`]) and say how that went.
    Drain { timeout: Duration, close_window: Duration },
    /// The colour is pinned for the sessions that began on it (affinity): wait until the pin's
    /// window ends, or until the actor ends it (`Some(true)`: drain now; `Some(false)`: the
    /// colour is live again, nothing to drain), then drain as [`Job::Drain`] does.
    DrainAfterPin {
        until: tokio::time::Instant,
        end: tokio::sync::watch::Receiver<Option<bool>>,
        timeout: Duration,
        close_window: Duration,
    },
    /// Stop instances, then take them out of the route table and the store.
    Stop(Stopping),
    /// Everything queued before is done: hand the report to the actor.
    Then(Report),
    /// Finish what is queued, then end.
    Close,
}

enum Stopping {
    /// A run of this daemon, already taken out of the actor (it forwards nothing any more).
    Run(Box<Run>),
    /// Instances an earlier daemon recorded and this one never adopted.
    Recorded(Vec<Recorded>),
}

impl Lane {
    fn start(shared: Arc<Shared>, service: String, colour: Colour, reports: mpsc::UnboundedSender<Report>) -> Lane {
        let (jobs, mut rx) = mpsc::unbounded_channel();
        let pending = Arc::new(AtomicUsize::new(0));
        let left = pending.clone();
        let task = tokio::spawn(async move {
            while let Some(job) = rx.recv().await {
                let last = matches!(job, Job::Close);
                let done = async {
                    match job {
                        Job::Drain { timeout, close_window } => {
                            drain(&shared, &service, colour, timeout, close_window).await
                        }
                        Job::DrainAfterPin {
                            until,
                            mut end,
                            timeout,
                            close_window,
                        } => {
                            let drain_now = tokio::select! {
                                _ = tokio::time::sleep_until(until) => {
                                    // The proxy stopped following the pin at its end by itself;
                                    // take it out of the table (unless a newer one replaced it).
                                    let over = shared
                                        .proxy
                                        .table()
                                        .service(&service)
                                        .and_then(|s| s.pin().map(|p| p.colour == colour && p.remaining().is_zero()))
                                        .unwrap_or(false);
                                    if over {
                                        let _ = shared.proxy.unpin(&service, colour);
                                    }
                                    tracing::info!(service, %colour, "the affinity window is over: the sessions that began on {colour} go to the live colour now");
                                    true
                                }
                                r = end.wait_for(Option::is_some) => r.map(|v| (*v).unwrap_or(true)).unwrap_or(true),
                            };
                            if drain_now {
                                drain(&shared, &service, colour, timeout, close_window).await
                            }
                        }
                        Job::Stop(stopping) => stop(&shared, &service, colour, stopping).await,
                        Job::Then(report) => {
                            // Fails only once the actor is gone, when nothing is to start any more.
                            let _ = reports.send(report);
                        }
                        Job::Close => {}
                    }
                };
                // A job that panics is one failed job, not a dead lane: the jobs after it (and
                // the `Then` a start waits for) still run. Unwind safety: a job shares nothing
                // with the next but the pending count, an atomic.
                if let Err(payload) = futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(done)).await {
                    let reason = crate::panics::message(payload.as_ref());
                    tracing::error!(service, %colour, panic = %reason, "a drain or stop of the colour panicked");
                    shared.notice(
                        &service,
                        None,
                        EventKind::Fault,
                        format!(
                            "a drain or stop of {service} {colour} failed ({reason}); the colour's next jobs go on"
                        ),
                        Some(reason),
                    );
                }
                left.fetch_sub(1, Ordering::SeqCst);
                if last {
                    return;
                }
            }
        });
        Lane { jobs, pending, task }
    }

    /// Queues `job`; returns how many jobs queued before it are not finished yet.
    fn push(&self, job: Job) -> usize {
        let before = self.pending.fetch_add(1, Ordering::SeqCst);
        if self.jobs.send(job).is_err() {
            // The task ended, which it does only after `close`.
            self.pending.fetch_sub(1, Ordering::SeqCst);
        }
        before
    }

    /// Lets the lane finish what is queued and waits for it. Called once, as the actor stops.
    async fn close(&mut self) {
        self.push(Job::Close);
        if let Err(e) = (&mut self.task).await {
            tracing::error!(error = %e, "a colour's drain and stop task failed");
        }
    }
}

async fn drain(shared: &Shared, service: &str, colour: Colour, timeout: Duration, close_window: Duration) {
    match shared.proxy.drain(service, colour, timeout, close_window).await {
        Ok(r) => {
            let msg = if r.completed {
                format!("{colour} drained in {:.1?}", r.elapsed)
            } else {
                format!(
                    "{colour} drain deadline reached after {:.1?}: {} requests cut, {} upgraded connections closed",
                    r.elapsed, r.cut_requests, r.closed_upgrades
                )
            };
            shared.notice(service, None, EventKind::Drained, msg, None);
        }
        Err(e) => tracing::error!(service, error = %e, "drain failed"),
    }
}

async fn stop(shared: &Shared, service: &str, colour: Colour, stopping: Stopping) {
    match stopping {
        Stopping::Run(run) => {
            run.health.stop().await;
            if let Instances::Process(group) = &run.instances {
                if let Err(e) = group.stop().await {
                    tracing::error!(service, %colour, error = %e, "instances did not stop");
                }
            }
            shared.notice(
                service,
                None,
                EventKind::Instances,
                format!("{colour} ({}) stopped", run.release),
                None,
            );
        }
        Stopping::Recorded(recorded) => {
            let grace = crate::process::DEFAULT_GRACE;
            if let Err(e) = crate::process::stop_recorded(service, colour, &recorded, grace).await {
                tracing::error!(service, %colour, error = %e, "instances did not stop");
            }
        }
    }
    let (local, name) = (shared.local.clone(), service.to_string());
    match tokio::task::spawn_blocking(move || local.remove_instances(&name, colour)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!(service, %colour, error = %e, "cannot forget the stopped instances"),
        Err(e) => tracing::warn!(service, %colour, error = %e, "cannot forget the stopped instances"),
    }
    set_pool(&shared.proxy, service, colour, None, &[], None, &[]);
}

struct Actor {
    shared: Arc<Shared>,
    cfg: ServiceConfig,
    state: State,
    /// The revision of `state` in the store: the next commit expects it.
    revision: Revision,
    runs: [Option<Run>; 2],
    /// Each colour's slow work (drains, stops), by [`slot`].
    lanes: [Lane; 2],
    /// Upstream addresses given with `cutover deploy` for a static service, by deployment.
    statics: BTreeMap<DeploymentId, Vec<SocketAddr>>,
    smoke: Option<(DeploymentId, JoinHandle<()>)>,
    watch: Option<(DeploymentId, JoinHandle<()>)>,
    /// The last [`Run::id`] given out.
    last_run: u64,
    /// For the actor's own work to report back; see [`Report`].
    reports: mpsc::UnboundedSender<Report>,
    /// The colour pinned for its sessions since the last promotion (affinity), and how to end
    /// its pin early ([`Job::DrainAfterPin`]).
    pin: Option<(Colour, tokio::sync::watch::Sender<Option<bool>>)>,
    /// An event to handle before any queued report or command: a rollback decided while a
    /// switch waited for the fleet's acknowledgements (see [`Actor::await_fleet`]), which comes
    /// before the reports and timers that arrived meanwhile (a watch window that ended during
    /// the wait must not make the release live).
    urgent: Option<Event>,
    /// What the last wait for the fleet's acknowledgements found (its notice), for the answer
    /// of the command whose switch it was.
    fleet_said: Option<String>,
    /// In a fleet with the process driver: the wait for the other nodes' instances of the
    /// deployment being provisioned ([`Actor::await_fleet_ready`]), or for the other services of
    /// its release ([`Actor::await_release_healthy`]): this node's own instances are healthy.
    others: Option<OthersWait>,
    /// The deployment a release of several services holds (and the release): validated once
    /// all its services are healthy, promoted only with the others.
    held: Option<(DeploymentId, u64)>,
}

/// How a held deployment's failure begins when its own instances were healthy but the other
/// services of its release were not in time (the release names the service that failed first).
const WAITED_FOR_RELEASE: &str = "the release's other services were not healthy in time";

/// A deployment whose own instances are healthy, waiting for others' before it moves on.
struct OthersWait {
    deployment: DeploymentId,
    task: JoinHandle<()>,
    /// `Some`: the nodes still waited for (a fleet); `None`: the other services of its release.
    nodes: Option<Waiting>,
}

/// The nodes a wait of [`Actor::await_fleet_ready`] still waits for.
type Waiting = Arc<Mutex<Vec<String>>>;

impl Actor {
    fn name(&self) -> &str {
        &self.cfg.name
    }

    /// Runs `f` on the store, off the async threads: every store call waits for the disk.
    async fn on_store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn StateStore, &str) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (store, name) = (self.shared.store.clone(), self.name().to_string());
        off_async_store(move || f(&*store, &name)).await
    }

    /// What the store says about this service's instances on `colour` (and of `release`, if
    /// given), as the process driver takes it for adoption or stopping.
    async fn recorded(&self, colour: Colour, release: Option<&Release>) -> Vec<Recorded> {
        recorded_instances(&self.shared, self.name(), colour, release).await
    }

    async fn next_id(&self) -> Result<DeploymentId, CommandError> {
        self.on_store(|store, name| store.next_deployment_id(name))
            .await
            .map_err(|e| CommandError::Store(e.to_string()))
    }

    fn plan(&self) -> Plan {
        Plan {
            health_deadline: self.cfg.health.deadline,
            promote: if self.cfg.promote.auto {
                Promotion::Auto {
                    delay: self.cfg.promote.delay,
                }
            } else {
                Promotion::Manual
            },
            watch: WatchPolicy {
                duration: self.cfg.watch.duration,
                min_requests: self.cfg.watch.min_requests,
                max_error_rate: self.cfg.watch.max_error_rate,
                max_p99: self.cfg.watch.max_p99,
            },
            keep_warm: self.cfg.keep_warm,
            migrate: self
                .cfg
                .migrate
                .as_ref()
                .map_or_else(MigratePlan::default, |m| MigratePlan {
                    expand: m.expand.is_some(),
                    contract: m.contract.is_some(),
                    rollback: m.rollback.is_some(),
                }),
            gradual: (!self.cfg.promote.steps.is_empty()).then(|| crate::lifecycle::Gradual {
                steps: self.cfg.promote.steps.clone(),
                step: self.cfg.promote.step,
            }),
        }
    }

    async fn recover(&mut self) {
        let t = self.state.recover();
        let audit = Audit {
            actor: "daemon".into(),
            service: None,
            action: "recover".into(),
            arguments: String::new(),
            result: "ok".into(),
        };
        if let Err(e) = self.commit(&t, Some(audit)).await {
            tracing::error!(service = self.name(), error = %e, "cannot commit the recovered state");
        }
        self.state = t.state.clone();
        self.committed();
        self.execute(t.actions).await;
    }

    /// Reports first (see [`Report`]), then commands, one at a time, until the daemon stops. Both
    /// receivers are lent by the supervisor ([`supervise::service`]): the mailbox outlives a
    /// panic and is lent to the next actor; the reports channel is this actor's own.
    async fn run(&mut self, commands: &mut mpsc::Receiver<Msg>, reports: &mut mpsc::UnboundedReceiver<Report>) {
        loop {
            if let Some(event) = self.urgent.take() {
                let _ = self.step(event, None).await;
                continue;
            }
            tokio::select! {
                biased;
                // Never `None`: the actor holds a sender of its own.
                Some(report) = reports.recv() => self.report_arrived(report).await,
                msg = commands.recv() => match msg {
                    Some(msg) => {
                        if self.command(msg).await.is_break() {
                            return;
                        }
                    }
                    None => return,
                },
            }
        }
    }

    async fn report_arrived(&mut self, report: Report) {
        match report {
            Report::Event(Event::HealthDeadlinePassed { id }) => {
                // Healthy and waiting at a release's barrier for services still on their way (a
                // schema change, their own instances): their own steps and deadlines bound the
                // wait, and the release fails with the first of them that fails.
                let on_their_way = self.release_members_on_their_way(id);
                if !on_their_way.is_empty() {
                    self.shared.notice(
                        self.name(),
                        Some(id),
                        EventKind::Instances,
                        format!(
                            "healthy for {:?}, waiting for {} of the release, still on its way ({}); the wait goes on",
                            self.cfg.health.deadline,
                            on_their_way
                                .iter()
                                .map(|(n, _)| n.as_str())
                                .collect::<Vec<_>>()
                                .join(", "),
                            on_their_way
                                .iter()
                                .map(|(n, p)| format!("{n}: {p}"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                        None,
                    );
                    let (reports, after) = (self.reports.clone(), self.cfg.health.deadline);
                    tokio::spawn(async move {
                        tokio::time::sleep(after).await;
                        let _ = reports.send(Report::Event(Event::HealthDeadlinePassed { id }));
                    });
                    return;
                }
                let event = self.deadline_event(id);
                let _ = self.step(event, None).await;
            }
            Report::Event(event) => {
                let _ = self.step(event, None).await;
            }
            Report::Health { colour, snapshot } => self.health_changed(colour, snapshot).await,
            Report::Instances { colour, run, instances } => self.instances_changed(colour, run, instances).await,
            Report::ColourReady {
                deployment,
                colour,
                release,
                then,
            } => self.colour_ready(deployment, colour, release, then).await,
        }
    }

    /// Hands a report to the actor itself, for after the message it is handling.
    fn report(&self, event: Event) {
        // Cannot fail: the actor holds the receiver for as long as it runs.
        let _ = self.reports.send(Report::Event(event));
    }

    /// Handles a command; `Break` once the daemon stops.
    async fn command(&mut self, msg: Msg) -> std::ops::ControlFlow<()> {
        match msg {
            Msg::Event { event, audit, reply } => {
                let held = self
                    .held
                    .map(|(d, _)| d)
                    .filter(|h| self.state.in_progress().is_some_and(|d| d.id == *h));
                let r = match (&event, held) {
                    (Event::Promote { .. }, Some(id)) => Err(CommandError::Conflict(format!(
                        "service {}: deployment {id} is part of a release of several services, which promotes them \
                         all at once when every one is validated; it is not promoted alone (`cutover abort {}` \
                         aborts the whole release)",
                        self.name(),
                        self.name()
                    ))),
                    _ => self.step(event, audit).await,
                };
                let _ = reply.send(r);
            }
            Msg::Deploy {
                version,
                upstreams,
                actor,
                held,
                reply,
            } => {
                let r = self.deploy(version, upstreams, actor, held).await;
                let _ = reply.send(r);
            }
            Msg::Hold { event, reply, resume } => match self.state.step(event) {
                Err(e) => {
                    let _ = reply.send(Err(e.into()));
                }
                Ok(t) => {
                    if reply.send(Ok((t.clone(), self.revision))).is_ok() {
                        if let Ok(Some(revision)) = resume.await {
                            self.revision = revision;
                            self.state = t.state.clone();
                            self.end_others_wait();
                            self.committed();
                            self.execute(t.actions).await;
                        }
                    }
                }
            },
            Msg::Rollback { actor, reply } => {
                let r = self.rollback(actor).await;
                let _ = reply.send(r);
            }
            Msg::Park { reply, resume } => {
                if let Some(d) = self.state.in_progress() {
                    let _ = reply.send(Err(CommandError::Conflict(format!(
                        "service {}: deployment {} of {} is in progress; wait until it ends (`cutover status`) or abort it (`cutover abort {}`), then upgrade",
                        self.name(),
                        d.id.0,
                        d.release,
                        self.name()
                    ))));
                    return std::ops::ControlFlow::Continue(());
                }
                self.leave_all_running().await;
                let _ = reply.send(Ok(()));
                if resume.await.unwrap_or(false) {
                    // The daemon that failed to take over may have committed meanwhile.
                    self.reload().await;
                    self.recover().await;
                    return std::ops::ControlFlow::Continue(());
                }
                self.close_lanes().await;
                return std::ops::ControlFlow::Break(());
            }
            Msg::Shutdown { instances, reply } => {
                self.abort_tasks();
                match instances {
                    AtShutdown::Leave => self.leave_all_running().await,
                    AtShutdown::Stop => {
                        for colour in [Colour::Blue, Colour::Green] {
                            if let Some(run) = self.runs[slot(colour)].take() {
                                run.stop_forwarding();
                                self.lanes[slot(colour)].push(Job::Stop(Stopping::Run(Box::new(run))));
                            }
                        }
                    }
                }
                // The lanes finish what was queued before (drains end at once: the proxy has
                // stopped): stops of retired colours complete. Starts still queued only report to
                // an actor that no longer listens, which stops what they started: a release being
                // provisioned is aborted by the next start's recovery anyway.
                self.close_lanes().await;
                let _ = reply.send(());
                return std::ops::ControlFlow::Break(());
            }
        }
        std::ops::ControlFlow::Continue(())
    }

    async fn deploy(
        &mut self,
        version: String,
        upstreams: Vec<SocketAddr>,
        actor: String,
        held: Option<u64>,
    ) -> Result<u64, CommandError> {
        let version = version.trim().to_string();
        supervise::inject_fault(self.name(), &version);
        if version.is_empty() || version.len() > 128 || version.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(CommandError::BadRequest(format!(
                "service {}: '{version}' is not a usable version; give a short name without spaces, e.g. v2 or 1.4.0",
                self.name()
            )));
        }
        match (&self.cfg.driver, upstreams.is_empty()) {
            (Driver::Static, true) => {
                return Err(CommandError::BadRequest(format!(
                "service {} runs elsewhere (no `command` in the config): name its instances with --upstream HOST:PORT",
                self.name()
            )))
            }
            (Driver::Process { .. }, false) => {
                return Err(CommandError::BadRequest(format!(
                    "service {} is started by cutover from its `command`; --upstream is only for services without one",
                    self.name()
                )))
            }
            _ => {}
        }
        if let Some(d) = self.state.in_progress() {
            // Refused before an id is spent; the state machine gives the same answer.
            let probe = Event::Deploy {
                id: DeploymentId(d.id.0 + 1),
                release: Release::new(&version),
                plan: self.plan(),
            };
            if let Err(e) = self.state.step(probe) {
                return Err(e.into());
            }
        }
        self.lint_migrations().await?;
        let id = self.next_id().await?;
        if !upstreams.is_empty() {
            self.statics.insert(id, upstreams.clone());
        }
        let audit = Audit {
            actor,
            service: None,
            action: "deploy".into(),
            arguments: if upstreams.is_empty() {
                format!("--version {version}")
            } else {
                let list: Vec<String> = upstreams.iter().map(|u| format!("--upstream {u}")).collect();
                format!("--version {version} {}", list.join(" "))
            },
            result: "ok".into(),
        };
        let mut plan = self.plan();
        if held.is_some() {
            // Validated, it waits for the release to promote it with the others, which switches
            // every service at once: no gradual steps.
            plan.promote = Promotion::Manual;
            plan.gradual = None;
        }
        self.step(
            Event::Deploy {
                id,
                release: Release::new(&version),
                plan,
            },
            Some(audit),
        )
        .await?;
        self.held = held.map(|release| (id, release));
        Ok(id.0)
    }

    async fn rollback(&mut self, actor: String) -> Result<RollbackDone, CommandError> {
        let id = if self.state.warm().is_none() && !matches!(self.state.phase, crate::lifecycle::Phase::Watching { .. })
        {
            // A cold rollback is a new deployment: it needs a fresh id, spent only when the
            // state machine would take it (it refuses the same with any id; the refusal is then
            // made and audited below), so a refused rollback leaves no gap in the ids.
            let probe = DeploymentId(self.state.last_id.map_or(0, |d| d.0) + 1);
            match self.state.step(Event::Rollback {
                id: probe,
                plan: self.plan(),
            }) {
                Ok(_) => self.next_id().await?,
                Err(_) => probe,
            }
        } else {
            self.state.last_id.unwrap_or(DeploymentId(0))
        };
        let audit = Audit {
            actor,
            service: None,
            action: "rollback".into(),
            arguments: String::new(),
            result: "ok".into(),
        };
        self.fleet_said = None;
        let t = self
            .step(Event::Rollback { id, plan: self.plan() }, Some(audit))
            .await?;
        let kind = match t.rollback_kind() {
            Some(RollbackKind::Cold) => "cold",
            _ => "instant",
        };
        Ok(RollbackDone {
            kind: kind.into(),
            deployment: (kind == "cold").then_some(id.0),
            fleet: self.fleet_said.take(),
        })
    }

    /// One transition: step, commit, then execute.
    async fn step(&mut self, event: Event, audit: Option<Audit>) -> Result<Transition, CommandError> {
        let name = event.name();
        let t = match self.state.step(event) {
            Ok(t) => t,
            Err(e) => {
                if let Some(mut audit) = audit {
                    audit.service = Some(self.name().to_string());
                    audit.result = e.to_string();
                    let _ = self.on_store(move |store, _| store.append_audit(&audit)).await;
                }
                if e.kind() == crate::lifecycle::ErrorKind::Stale {
                    tracing::debug!(service = self.name(), event = name, "{e}");
                }
                return Err(e.into());
            }
        };
        if let Err(e) = self.commit(&t, audit).await {
            // Not committed: nothing is carried out, so the state stays what the store has.
            tracing::error!(service = self.name(), event = name, error = %e, "cannot commit; the step is not carried out");
            return Err(CommandError::Store(e.to_string()));
        }
        self.state = t.state.clone();
        self.end_others_wait();
        self.committed();
        self.execute(t.actions.clone()).await;
        Ok(t)
    }

    async fn commit(&mut self, t: &Transition, audit: Option<Audit>) -> Result<(), crate::store::StoreError> {
        let (state, records): (State, Vec<Record>) = (t.state.clone(), t.records().cloned().collect());
        let expected = self.revision;
        match self
            .on_store(move |store, name| store.commit(name, expected, &state, &records, audit))
            .await
        {
            Ok(revision) => {
                self.revision = revision;
                Ok(())
            }
            Err(e @ StoreError::Conflict { .. }) => {
                // Someone else committed: what this actor decided on is stale. It takes the
                // stored state, so that the next decision is made on it.
                self.reload().await;
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// In a fleet: records that this node (the leader) applies the revision committed last,
    /// once the transition's table changes are made (see [`Actor::execute`]).
    fn acknowledge(&self) {
        if let Some(node) = &self.shared.fleet {
            node.acknowledge(self.name(), self.revision.0);
        }
    }

    /// In a fleet, after this node switched `colour` live: waits until every node applies the
    /// revision that names it (at most `fleet.ack_timeout`) and says which did, in how long, or
    /// which did not. When nodes did not and the switch was a promotion, `on_missing_ack =
    /// "rollback"` rolls it back at once (see [`Actor::urgent`]); a rollback's own switch stands.
    async fn await_fleet(&mut self, colour: Colour, promoting: bool) {
        let Some(node) = self.shared.fleet.clone() else { return };
        let Some(membership) = node.membership() else { return };
        let revision = self.revision.0;
        let t0 = Instant::now();
        // This node's own acknowledgement is on its way (`Actor::acknowledge`).
        let timeout = node.config.ack_timeout;
        // etcd failing (a member down, a leader election) is retried until the time is up.
        let deadline = t0 + timeout;
        // The members when the switch happened: one that leaves meanwhile (its lease expired:
        // stopped, or cut off from etcd and still serving the old colour) did not apply it.
        let expected = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match membership.members().await {
                Ok(m) => break m,
                Err(_) if left > Duration::from_millis(100) => tokio::time::sleep(Duration::from_millis(100)).await,
                Err(_) => break Vec::new(),
            }
        };
        let (acked, mut missing) = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match membership.wait_for_acks(self.name(), revision, left).await {
                Ok(w) => break (w.acked, w.missing),
                Err(e) if left > Duration::from_millis(100) => {
                    tracing::debug!(service = self.name(), error = %e, "reading the acknowledgements failed; trying again");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => break (Vec::new(), vec![format!("(etcd: {e})")]),
            }
        };
        let left: Vec<String> = expected
            .into_iter()
            .filter(|m| !acked.contains(m) && !missing.contains(m))
            .collect();
        missing.extend(left.iter().cloned());
        if missing.is_empty() {
            let said = format!(
                "every node of the fleet serves {colour} (revision {revision}): {} acknowledged in {:.1?}",
                acked.join(", "),
                t0.elapsed()
            );
            self.fleet_said = Some(said.clone());
            self.shared.notice(self.name(), None, EventKind::Switch, said, None);
            return;
        }
        // The deployment whose promotion this switch was, while it can still be undone.
        let promoted = match &self.state.phase {
            Phase::Watching { deployment, .. } => Some(deployment.id),
            Phase::Stable { warm: Some(w), .. } => Some(w.promoted_by),
            _ => None,
        }
        .filter(|_| promoting);
        let rollback = node.config.on_missing_ack == crate::config::OnMissingAck::Rollback;
        let then = match (rollback, promoted) {
            (false, _) => "the switch stands (on_missing_ack = \"proceed\")".to_string(),
            (true, Some(_)) => format!("rolling back to {} (on_missing_ack = \"rollback\")", colour.other()),
            (true, None) if promoting => "the switch stands: there is no earlier release to roll back to".to_string(),
            (true, None) => "the switch stands".to_string(),
        };
        let nodes = missing.join(", ");
        let gone = match left.len() {
            0 => String::new(),
            _ => format!(
                " ({} left the fleet meanwhile: etcd did not hear from it within lease_ttl)",
                left.join(", ")
            ),
        };
        let said = format!(
            "nodes {nodes} did not acknowledge revision {revision} ({colour} live) within {timeout:?}{gone}; acknowledged: {}; {then}",
            if acked.is_empty() { "none".to_string() } else { acked.join(", ") },
        );
        self.fleet_said = Some(said.clone());
        self.shared.notice(
            self.name(),
            None,
            EventKind::Switch,
            said,
            Some(format!("not acknowledged by {nodes}")),
        );
        if let (true, Some(id)) = (rollback, promoted) {
            self.urgent = Some(Event::NotAcknowledged {
                id,
                nodes: format!("nodes {nodes} did not acknowledge revision {revision} within {timeout:?}"),
            });
        }
    }

    /// Takes the service's state and revision from the store (after a handover that failed, in
    /// which the other daemon may have committed, or a conflicting commit).
    async fn reload(&mut self) {
        match self.on_store(|store, name| store.load(name)).await {
            Ok(Some((state, revision))) => {
                self.state = state;
                self.revision = revision;
            }
            Ok(None) => {}
            Err(e) => tracing::error!(service = self.name(), error = %e, "cannot reload the committed state"),
        }
    }

    /// What follows every commit, before its actions: the status view shows the committed state,
    /// and while nothing is live the preview route leads to the first release.
    ///
    /// The live colour is not set here: it changes only in [`Action::SwitchTo`], so that the one
    /// table store that moves live traffic is the one timed and reported. The pools' instances,
    /// health and versions follow the runs ([`Actor::set_pool`]), not the state.
    fn committed(&self) {
        if self.state.live.is_none() {
            if let Some(d) = self.state.in_progress() {
                // The preview route goes to the colour that is not active; live traffic goes to
                // the active one, which has no instances while nothing is live, so gets 503.
                if let Err(e) = self.shared.proxy.switch(self.name(), d.colour.other()) {
                    tracing::error!(service = self.name(), error = %e, "cannot update the route table");
                }
            }
        }
        self.publish_view();
    }

    fn publish_view(&self) {
        let name = self.name().to_string();
        let view = view_of(&self.state);
        self.shared
            .views
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name, view);
    }

    /// Sets a colour's instances (with their current health) in the route table; see [`set_pool`].
    fn set_pool(
        &self,
        colour: Colour,
        addrs: &[SocketAddr],
        health: Option<&HealthSnapshot>,
        known_healthy: &[SocketAddr],
    ) {
        let version = self.runs[slot(colour)].as_ref().map(|r| r.release.version.clone());
        set_pool(
            &self.shared.proxy,
            self.name(),
            colour,
            version.as_deref(),
            addrs,
            health,
            known_healthy,
        );
    }

    /// Carries out a committed transition's actions in order. Drains and stops are queued on
    /// their colour's lane; a start waits there for them, and the actions after it wait with it
    /// ([`Report::ColourReady`]).
    async fn execute(&mut self, actions: Vec<Action>) {
        let mut actions = actions.into_iter();
        // A promotion's switch pins the colour it leaves (with affinity), and its drain of that
        // colour waits for the pin's end.
        let mut promoting = false;
        // A recovery's switch is no promotion (pins do not outlive a restart).
        let mut recovering = false;
        let mut pinned_now: Option<(Colour, tokio::time::Instant)> = None;
        // In a fleet, the switch waits for every node's acknowledgement once the transition's
        // other actions (the drain of the colour left, the watch and its timer) have started.
        let mut switched: Option<Colour> = None;
        // What the transition records after its switch (went live, rolled back) is said once
        // every node serves the switch: `cutover deploy` returns on those words.
        let mut after_switch = Vec::new();
        while let Some(action) = actions.next() {
            match action {
                Action::Record(record) => {
                    promoting |= matches!(record, Record::Promoted { .. });
                    recovering |= matches!(record, Record::WatchRestarted { .. });
                    match switched {
                        Some(_) if self.shared.fleet.is_some() => after_switch.push(record),
                        _ => self.announce(&record),
                    }
                }
                Action::StartInstances {
                    deployment,
                    colour,
                    release,
                } => {
                    // A pin never points at a colour being replaced.
                    self.end_pin(colour, true);
                    self.stop_instances(colour).await; // whatever was left there is not this release
                    let ready = Report::ColourReady {
                        deployment,
                        colour,
                        release,
                        then: actions.collect(),
                    };
                    // What this transition changed in the table is done; the rest waits for the
                    // colour's lane.
                    self.acknowledge();
                    if self.lanes[slot(colour)].push(Job::Then(ready)) > 0 {
                        self.shared.notice(
                            self.name(),
                            Some(deployment),
                            EventKind::Instances,
                            format!("deployment {deployment}: {colour} is still draining or stopping; its instances start once it has stopped"),
                            None,
                        );
                    }
                    return;
                }
                Action::Adopt { colour, release } => self.adopt(colour, release).await,
                Action::StopInstances { colour } => {
                    self.end_pin(colour, true);
                    self.stop_instances(colour).await
                }
                Action::Drain { colour } => match (pinned_now, &self.pin) {
                    (Some((pinned, until)), Some((_, end))) if pinned == colour => {
                        self.lanes[slot(colour)].push(Job::DrainAfterPin {
                            until,
                            end: end.subscribe(),
                            timeout: self.cfg.drain_timeout,
                            close_window: self.cfg.close_window,
                        });
                    }
                    _ => {
                        // Retiring a pinned colour (keep_warm shorter than the window) ends its pin.
                        self.end_pin(colour, true);
                        self.lanes[slot(colour)].push(Job::Drain {
                            timeout: self.cfg.drain_timeout,
                            close_window: self.cfg.close_window,
                        });
                    }
                },
                Action::RunSmoke { deployment, colour } => self.run_smoke(deployment, colour),
                Action::CancelSmoke { deployment } => {
                    if let Some((id, task)) = self.smoke.take() {
                        if id == deployment {
                            task.abort(); // kill_on_drop ends the command with the task
                        } else {
                            self.smoke = Some((id, task));
                        }
                    }
                }
                Action::SwitchTo { colour } => {
                    // The last step of a gradual switch (or `cutover promote` during its steps) is
                    // the promotion's switch, though its `promoted` record came at the first step.
                    promoting |= !recovering
                        && matches!(
                            &self.state.phase,
                            Phase::Watching { deployment, step: None, .. } if deployment.colour == colour
                        );
                    // The one store that moves live traffic, and what is timed: the state naming
                    // `colour` live is committed already, so a crash from here on comes back to it.
                    // Any pin ends here: a rollback returns to the pinned colour (live again,
                    // nothing to drain), and the colour it leaves was rejected, so it keeps nobody.
                    self.end_pin(colour, false);
                    // A cold rollback's promotion leaves the rejected release: no session stays there.
                    let cold_rollback = matches!(
                        &self.state.phase,
                        Phase::Watching { deployment, .. } if deployment.cause == crate::lifecycle::Cause::ColdRollback
                    );
                    let window = self
                        .cfg
                        .affinity
                        .as_ref()
                        .filter(|_| promoting && !cold_rollback)
                        .map(|a| a.window);
                    let split_before = self.shared.proxy.table().service(self.name()).and_then(|s| s.split());
                    let t0 = Instant::now();
                    let r = self.shared.proxy.switch_pinned(self.name(), colour, window);
                    let took = t0.elapsed();
                    let pin = self
                        .shared
                        .proxy
                        .table()
                        .service(self.name())
                        .and_then(|s| s.pin().filter(|p| p.colour == colour.other()).cloned());
                    let sticky = match (&r, window, pin) {
                        (Ok(true), Some(window), Some(pin)) => {
                            let until = tokio::time::Instant::now() + pin.remaining();
                            pinned_now = Some((pin.colour, until));
                            self.pin = Some((pin.colour, tokio::sync::watch::Sender::new(None)));
                            format!(
                                "; sessions that began on {} stay there for {window:?} (affinity), then it is drained",
                                pin.colour
                            )
                        }
                        _ => String::new(),
                    };
                    let version = self.runs[slot(colour)]
                        .as_ref()
                        .map(|r| r.release.version.clone())
                        .unwrap_or_default();
                    match r {
                        Ok(true) => {
                            switched = Some(colour);
                            self.shared.notice(
                                self.name(),
                                None,
                                EventKind::Switch,
                                format!("live traffic switched to {colour} ({version}) in {took:.1?}{sticky}"),
                                None,
                            )
                        }
                        // A gradual switch rolled back: its share came back to the live colour.
                        Ok(false) if split_before.is_some() => self.shared.notice(
                            self.name(),
                            None,
                            EventKind::Switch,
                            format!("gradual switch ended: every live request to {colour} ({version}) in {took:.1?}"),
                            None,
                        ),
                        // After a restart, the fresh table may name the live colour already.
                        Ok(false) => {
                            tracing::info!(service = self.name(), %colour, version, "live traffic is on {colour}")
                        }
                        Err(e) => tracing::error!(service = self.name(), error = %e, "switch failed"),
                    }
                }
                Action::Split { colour, percent } => {
                    let version = self.runs[slot(colour)]
                        .as_ref()
                        .map(|r| r.release.version.clone())
                        .unwrap_or_default();
                    let per_million = u32::from(percent) * 10_000;
                    match self.shared.proxy.split(self.name(), colour, per_million) {
                        Ok(()) => {
                            let what = if self.cfg.affinity.is_some() {
                                "new sessions"
                            } else {
                                "live requests"
                            };
                            let next = match &self.state.phase {
                                Phase::Watching { deployment, .. } => deployment.plan.gradual.as_ref().map(|g| {
                                    let after = g.steps.iter().copied().find(|s| *s > percent).unwrap_or(100);
                                    format!("; {after}% after {:?} if the watch passes", g.step)
                                }),
                                _ => None,
                            }
                            .unwrap_or_default();
                            self.shared.notice(
                                self.name(),
                                self.state.in_progress().map(|d| d.id),
                                EventKind::Switch,
                                format!("gradual switch: {percent}% of {what} to {colour} ({version}){next}"),
                                None,
                            );
                        }
                        Err(e) => {
                            tracing::error!(service = self.name(), error = %e, "cannot send a share of the traffic to {colour}")
                        }
                    }
                }
                Action::StartWatch { deployment, colour } => self.start_watch(deployment, colour),
                Action::StopWatch { deployment } => {
                    if let Some((id, task)) = self.watch.take() {
                        if id == deployment {
                            task.abort();
                        } else {
                            self.watch = Some((id, task));
                        }
                    }
                }
                Action::RunMigration {
                    deployment,
                    step,
                    release,
                } => self.run_migration(deployment, step, release),
                Action::ArmTimer {
                    deployment,
                    timer,
                    after,
                } => {
                    let reports = self.reports.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(after).await;
                        let event = match timer {
                            Timer::HealthDeadline => Event::HealthDeadlinePassed { id: deployment },
                            Timer::AutoPromote => Event::AutoPromoteDue { id: deployment },
                            Timer::WatchWindow => Event::WatchWindowElapsed { id: deployment },
                            Timer::KeepWarm => Event::KeepWarmElapsed { id: deployment },
                            Timer::PromoteStep => Event::PromoteStepDue { id: deployment },
                        };
                        let _ = reports.send(Report::Event(event));
                    });
                }
            }
        }
        self.acknowledge();
        if let Some(colour) = switched {
            self.await_fleet(colour, promoting).await;
        }
        for record in after_switch {
            self.announce(&record);
        }
    }

    fn announce(&self, record: &Record) {
        let (id, kind, message, reason) = Actor::describe(&self.cfg, record);
        self.shared.notice(self.name(), id, kind, message, reason);
    }

    /// A record of the service configured as `cfg` as its notice says it: deployment, kind,
    /// message, reason. Also words the stored transitions of a deployment, so that a step read
    /// back from the store reads as it did when it happened.
    fn describe(cfg: &ServiceConfig, record: &Record) -> (Option<DeploymentId>, EventKind, String, Option<String>) {
        let service = cfg.name.as_str();
        match record {
            Record::Migration { id, step, ok, detail } => (
                Some(*id),
                EventKind::Migration,
                match ok {
                    true => format!("{step}: {detail}"),
                    false => format!("{step} failed: {detail}"),
                },
                (!ok).then(|| detail.clone()),
            ),
            Record::Started {
                id,
                release,
                colour,
                cause,
            } => (
                Some(*id),
                EventKind::Started,
                match cause {
                    crate::lifecycle::Cause::Deploy => format!("deployment {id} of {release} started on {colour}"),
                    crate::lifecycle::Cause::ColdRollback => format!(
                        "deployment {id} of {release} started on {colour}: a cold rollback, the previous release redeployed"
                    ),
                },
                None,
            ),
            Record::Healthy { id } => (
                Some(*id),
                EventKind::Healthy,
                format!("deployment {id}: all instances healthy"),
                None,
            ),
            Record::Validated { id, detail } => (
                Some(*id),
                EventKind::Validated,
                match (&cfg.validate, detail) {
                    (Some(_), Some(detail)) => format!("deployment {id}: smoke test passed; {detail}"),
                    (Some(_), None) => format!("deployment {id}: smoke test passed"),
                    (None, _) => format!("deployment {id}: validated (no smoke test configured, only health checks)"),
                },
                None,
            ),
            Record::AwaitingPromotion { id, auto_after } => (
                Some(*id),
                EventKind::AwaitingPromotion,
                match auto_after {
                    Some(d) => format!("deployment {id}: promotion in {d:?}"),
                    None => format!("deployment {id}: waiting for `cutover promote {service}`"),
                },
                None,
            ),
            Record::Promoted { id, colour } => (
                Some(*id),
                EventKind::Promoted,
                format!("deployment {id} promoted to {colour}"),
                None,
            ),
            Record::WentLive { id, live, watch } => (
                Some(*id),
                EventKind::WentLive,
                format!(
                    "deployment {id}: {live} is live; {}{}",
                    watch_verdict(*watch, &cfg.watch),
                    // Manual promotion guards live traffic; a first release has none to guard.
                    if *watch == crate::lifecycle::Watched::Skipped && !cfg.promote.auto {
                        " (promote = { auto = false } waits for `cutover promote` from the next release on)"
                    } else {
                        ""
                    }
                ),
                None,
            ),
            Record::Aborted { id, reason } => (
                Some(*id),
                EventKind::Aborted,
                format!("deployment {id} aborted: {reason}"),
                Some(reason.to_string()),
            ),
            Record::RolledBack { id, to, reason } => (
                Some(*id),
                EventKind::RolledBack,
                format!("deployment {id} rolled back to {to}: {reason}"),
                Some(reason.to_string()),
            ),
            Record::Interrupted { id, phase } => (
                Some(*id),
                EventKind::Interrupted,
                format!("deployment {id} was interrupted while {phase}"),
                None,
            ),
            Record::WatchRestarted { id } => (
                Some(*id),
                EventKind::Watch,
                format!("deployment {id}: watching again after a restart"),
                None,
            ),
            Record::Retired { live } => (None, EventKind::Retired, format!("{live} retired"), None),
        }
    }

    fn spec(&self, colour: Colour, release: &Release, command: &str, instances: u32) -> InstanceSpec {
        instance_spec(&self.shared, self.name(), colour, release, command, instances)
    }

    /// The colour's lane has stopped what ran there before: start `deployment`'s instances, unless
    /// it ended meanwhile (an abort while the colour was still draining starts nothing, and its
    /// timers in `then` would only be stale), then carry out the rest of its transition.
    async fn colour_ready(&mut self, deployment: DeploymentId, colour: Colour, release: Release, then: Vec<Action>) {
        let current = matches!(&self.state.phase, Phase::Provisioning(d) if d.id == deployment && d.colour == colour);
        if !current {
            tracing::debug!(service = self.name(), %deployment, %colour, "deployment ended before its colour was free");
            return;
        }
        if let Err(reason) = self.start_instances(deployment, colour, release).await {
            let event = self.on_this_node(Event::ProvisionFailed { id: deployment, reason });
            self.report(event);
        }
        self.execute(then).await;
    }

    /// Starts a colour's instances; only once its lane is through with earlier ones.
    async fn start_instances(
        &mut self,
        deployment: DeploymentId,
        colour: Colour,
        release: Release,
    ) -> Result<(), String> {
        let instances = match &self.cfg.driver {
            Driver::Process { command, instances } => {
                let spec = self.spec(colour, &release, command, *instances);
                let group = ProcessGroup::start(spec).await.map_err(|e| e.to_string())?;
                Instances::Process(group)
            }
            Driver::Static => match self.statics.remove(&deployment) {
                Some(addrs) => Instances::Static(addrs),
                None => return Err("no upstream addresses for this deployment (was the daemon restarted?)".into()),
            },
        };
        self.begin_run(colour, release, instances, false).await;
        self.shared.notice(
            self.name(),
            Some(deployment),
            EventKind::Instances,
            format!(
                "{} instances started on {colour}",
                self.runs[slot(colour)]
                    .as_ref()
                    .map_or(0, |r| r.instances.addrs().len())
            ),
            None,
        );
        Ok(())
    }

    async fn record_instances(&self, colour: Colour, release: &Release, recorded: &[Recorded]) {
        record_instances(&self.shared, self.name(), colour, release, recorded).await;
    }

    /// Starts health checks of a colour's instances and puts them in its pool (out of rotation
    /// until healthy); records a process group's instances for adoption and follows their changes
    /// ([`Actor::instances_changed`]).
    ///
    /// `adopted` is for instances taken over after a restart: each is checked once at once, and
    /// only those that pass are in rotation before the periodic checks have a verdict. A colour
    /// that was serving keeps serving from its first request after a restart, and an instance
    /// that is down (or was started again because its process was gone) gets no request until it
    /// proves itself, as under the daemon before the restart.
    async fn begin_run(&mut self, colour: Colour, release: Release, instances: Instances, adopted: bool) {
        self.last_run += 1;
        let id = self.last_run;
        let (addrs, recorded, follow) = match &instances {
            Instances::Static(a) => {
                // Kept in the store, so that a restarted daemon (or another node) routes to them
                // again; written before the run begins.
                let text: String = a.iter().map(|a| format!("{a}\n")).collect();
                let key = static_key(self.name(), colour);
                if let Err(e) = self.on_store(move |store, _| store.set_value(&key, Some(&text))).await {
                    tracing::warn!(service = self.name(), %colour, error = %e, "cannot record the upstreams");
                }
                (a.clone(), Vec::new(), None)
            }
            Instances::Process(group) => {
                // Subscribed before the first read: a change after it is forwarded, none is lost.
                let mut rx = group.subscribe();
                let now = rx.borrow_and_update().clone();
                let recorded: Vec<Recorded> = now.iter().filter_map(InstanceInfo::recorded).collect();
                self.record_instances(colour, &release, &recorded).await;
                let reports = self.reports.clone();
                let follow = tokio::spawn(async move {
                    while rx.changed().await.is_ok() {
                        let instances = rx.borrow_and_update().clone();
                        let report = Report::Instances {
                            colour,
                            run: id,
                            instances,
                        };
                        if reports.send(report).is_err() {
                            return;
                        }
                    }
                });
                (now.iter().map(InstanceInfo::addr).collect(), recorded, Some(follow))
            }
        };
        let health = HealthChecker::start(CheckSpec {
            service: self.name().to_string(),
            colour,
            instances: addrs.clone(),
            config: self.cfg.health.clone(),
            tls: self.upstream_tls(),
        });
        let mut rx = health.subscribe();
        let reports = self.reports.clone();
        let forward = tokio::spawn(async move {
            loop {
                let snapshot = rx.borrow_and_update().clone();
                if reports.send(Report::Health { colour, snapshot }).is_err() {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
        self.runs[slot(colour)] = Some(Run {
            id,
            release,
            instances,
            addrs: addrs.clone(),
            recorded,
            health,
            forward,
            follow,
            out_of_rotation: Default::default(),
        });
        let known_healthy = if adopted {
            self.passing_now(&addrs).await
        } else {
            Vec::new()
        };
        self.set_pool(colour, &addrs, None, &known_healthy);
    }

    /// Lets go of `colour`'s run without stopping its instances, as a crash would but in order:
    /// nothing of it reports any more, the checks stop, the supervisors hand over their
    /// processes, and the store records exactly those, for the next actor or daemon to adopt.
    /// Returns the release and the instances handed over (none for static upstreams).
    async fn leave_running(&mut self, colour: Colour) -> Option<(Release, Vec<Recorded>)> {
        let run = self.runs[slot(colour)].take()?;
        run.stop_forwarding();
        run.health.stop().await;
        let Instances::Process(group) = run.instances else {
            return None;
        };
        let recorded = group.detach().await;
        self.record_instances(colour, &run.release, &recorded).await;
        Some((run.release, recorded))
    }

    /// [`Actor::leave_running`] for both colours, announced (a stop or a handover of the daemon).
    async fn leave_all_running(&mut self) {
        for colour in [Colour::Blue, Colour::Green] {
            if let Some((release, recorded)) = self.leave_running(colour).await {
                self.shared.notice(
                    self.name(),
                    None,
                    EventKind::Instances,
                    format!(
                        "{colour} ({release}): {} instances left running for the next start",
                        recorded.len()
                    ),
                    None,
                );
            }
        }
    }

    /// Ends the smoke command and the watch, if one runs.
    fn abort_tasks(&mut self) {
        if let Some((_, task)) = self.smoke.take() {
            task.abort();
        }
        if let Some(w) = self.others.take() {
            w.task.abort();
        }
        if let Some((_, task)) = self.watch.take() {
            task.abort();
        }
    }

    /// Ends the pin of `colour`, if it has one: its sessions go to the live colour from now on,
    /// and its drain waiting for the pin's end runs now (`drain`) or not at all (the colour is
    /// live again).
    fn end_pin(&mut self, colour: Colour, drain: bool) {
        if self.pin.as_ref().is_some_and(|(c, _)| *c == colour) {
            if let Some((_, end)) = self.pin.take() {
                end.send_replace(Some(drain));
            }
            let _ = self.shared.proxy.unpin(self.name(), colour);
        }
    }

    /// Lets both lanes finish what they have queued, and waits for it.
    async fn close_lanes(&mut self) {
        // A drain waiting for a pin's end does not hold the lanes up.
        for colour in [Colour::Blue, Colour::Green] {
            self.end_pin(colour, true);
        }
        let [blue, green] = &mut self.lanes;
        tokio::join!(blue.close(), green.close());
    }

    /// The service's `upstream_tls` as the proxy has it: the health checks use the same settings
    /// as the requests.
    fn upstream_tls(&self) -> Option<Arc<cutover_proxy::UpstreamTls>> {
        self.shared.proxy.table().service(self.name())?.upstream_tls.clone()
    }

    /// The addresses among `addrs` that pass one health check now (all checked at once, each
    /// within the check timeout).
    async fn passing_now(&self, addrs: &[SocketAddr]) -> Vec<SocketAddr> {
        passing_now(&self.cfg, self.upstream_tls(), addrs).await
    }

    async fn adopt(&mut self, colour: Colour, release: Release) {
        match &self.cfg.driver {
            Driver::Process { command, instances } => {
                let spec = self.spec(colour, &release, command, *instances);
                let recorded = self.recorded(colour, Some(&release)).await;
                match ProcessGroup::adopt(spec, recorded).await {
                    Ok((group, report)) => {
                        self.shared.notice(
                            self.name(),
                            None,
                            EventKind::Instances,
                            format!(
                                "{colour} ({release}): {} instances adopted, {} restarted",
                                report.adopted.len(),
                                report.started.len()
                            ),
                            None,
                        );
                        self.begin_run(colour, release, Instances::Process(group), true).await;
                    }
                    Err(e) => tracing::error!(service = self.name(), %colour, error = %e, "cannot adopt instances"),
                }
            }
            Driver::Static => {
                let key = static_key(self.name(), colour);
                let stored = self
                    .on_store(move |store, _| store.get_value(&key))
                    .await
                    .ok()
                    .flatten();
                let recorded = match stored {
                    Some(text) => Some(parse_static(&text)).filter(|a| !a.is_empty()),
                    // A state directory from before the store kept them.
                    None => {
                        let (dir, name) = (self.shared.config.server.state_dir.clone(), self.name().to_string());
                        tokio::task::spawn_blocking(move || load_static(&dir, &name, colour))
                            .await
                            .unwrap_or(None)
                    }
                };
                match recorded {
                    Some(addrs) => self.begin_run(colour, release, Instances::Static(addrs), true).await,
                    None => tracing::error!(service = self.name(), %colour, "no recorded upstreams to adopt"),
                }
            }
        }
    }

    /// Queues the stop of a colour's instances on its lane, which also takes them out of the route
    /// table and the store once they are gone. The run leaves the actor now: nothing of it
    /// reports any more, and a later start on the colour waits for the stop.
    async fn stop_instances(&mut self, colour: Colour) {
        let stopping = match self.runs[slot(colour)].take() {
            Some(run) => {
                run.stop_forwarding();
                Stopping::Run(Box::new(run))
            }
            None => {
                if !matches!(self.cfg.driver, Driver::Process { .. }) {
                    return;
                }
                // Instances of an earlier daemon that were never adopted. Read now: a start on the
                // colour queued after this stop must not find its own instances in the list.
                let recorded = self.recorded(colour, None).await;
                if recorded.is_empty() {
                    return;
                }
                Stopping::Recorded(recorded)
            }
        };
        self.lanes[slot(colour)].push(Job::Stop(stopping));
    }

    async fn health_changed(&mut self, colour: Colour, snapshot: HealthSnapshot) {
        let Some(run) = &mut self.runs[slot(colour)] else {
            return;
        };
        let addrs = run.addrs.clone();
        // Each instance the checks take out of rotation is announced once, with the failure.
        let mut gone_out = Vec::new();
        for i in &snapshot.instances {
            if i.status == crate::health::Status::Unhealthy {
                if run.out_of_rotation.insert(i.addr) {
                    gone_out.push((i.addr, i.last_error.clone().unwrap_or_default()));
                }
            } else {
                run.out_of_rotation.remove(&i.addr);
            }
        }
        let release = run.release.clone();
        for (addr, reason) in gone_out {
            self.shared.notice(
                self.name(),
                None,
                EventKind::Unhealthy,
                format!("{colour} ({release}) instance {addr} is out of rotation: {reason}"),
                Some(reason),
            );
        }
        self.set_pool(colour, &addrs, Some(&snapshot), &[]);
        // Only the colour of the deployment in progress reports to the lifecycle.
        let Some(d) = self.state.in_progress().filter(|d| d.colour == colour).map(|d| d.id) else {
            return;
        };
        let event = if snapshot.all_healthy() {
            if !matches!(self.state.phase, crate::lifecycle::Phase::Provisioning(_)) {
                None
            } else if self.runs_on_every_node() {
                self.await_fleet_ready(d, colour);
                None
            } else if let Some(release) = self.held.filter(|(h, _)| *h == d).map(|(_, r)| r) {
                self.await_release_healthy(d, release);
                None
            } else {
                Some(Event::InstancesHealthy { id: d })
            }
        } else if !matches!(self.state.phase, crate::lifecycle::Phase::Provisioning(_))
            && snapshot
                .instances
                .iter()
                .any(|i| i.status == crate::health::Status::Unhealthy)
        {
            Some(Event::Unhealthy {
                id: d,
                reason: snapshot.describe_unhealthy(),
            })
        } else {
            None
        };
        if let Some(event) = event {
            let _ = self.step(event, None).await;
        }
    }

    /// Where every node of a fleet runs its own instances: a failure of this node's, named as
    /// the other nodes' are.
    fn on_this_node(&self, event: Event) -> Event {
        match (event, &self.shared.fleet) {
            (Event::ProvisionFailed { id, reason }, Some(node)) if self.runs_on_every_node() => {
                Event::ProvisionFailed {
                    id,
                    reason: format!("node {}: {reason}", node.config.node),
                }
            }
            (event, _) => event,
        }
    }

    /// Whether every node of a fleet runs its own instances of this service (process driver).
    fn runs_on_every_node(&self) -> bool {
        self.shared.fleet.is_some() && matches!(self.cfg.driver, Driver::Process { .. })
    }

    /// This node's instances of `deployment` are healthy: once every other member says its own
    /// are ready (healthy and validated there; see `fleet_runs`), the deployment moves on; a
    /// member whose instances failed fails it, named. The health deadline bounds the wait
    /// ([`Actor::deadline_event`] names the nodes still waited for).
    fn await_fleet_ready(&mut self, deployment: DeploymentId, colour: Colour) {
        if self.others.as_ref().is_some_and(|w| w.deployment == deployment) {
            return;
        }
        let Some(node) = self.shared.fleet.clone() else { return };
        let waiting = Arc::new(Mutex::new(Vec::new()));
        let (reports, shared, name) = (self.reports.clone(), self.shared.clone(), self.name().to_string());
        let me = node.config.node.clone();
        let pending = waiting.clone();
        let task = tokio::spawn(async move {
            let key = crate::store::etcd::escape(&name);
            let mut said = None;
            loop {
                let membership = node.membership().filter(|m| !m.is_lost());
                let read = match &membership {
                    Some(m) => match (m.members().await, m.readiness(&key).await) {
                        (Ok(members), Ok(ready)) => Some((members, ready)),
                        (Err(e), _) | (_, Err(e)) => {
                            tracing::warn!(service = %name, error = %e, "cannot read the nodes' readiness; trying again");
                            None
                        }
                    },
                    None => None,
                };
                if let Some((members, ready)) = read {
                    let mut waits = Vec::new();
                    for member in members.iter().filter(|m| **m != me) {
                        match ready.get(member).filter(|r| r.deployment == deployment.0) {
                            Some(crate::fleet::Readiness { failed: Some(why), .. }) => {
                                let reason = format!("node {member}: {why}");
                                let _ = reports.send(Report::Event(Event::ProvisionFailed { id: deployment, reason }));
                                return;
                            }
                            Some(_) => {}
                            None => waits.push(member.clone()),
                        }
                    }
                    *pending.lock().unwrap_or_else(|p| p.into_inner()) = waits.clone();
                    if waits.is_empty() {
                        shared.notice(
                            &name,
                            Some(deployment),
                            EventKind::Instances,
                            format!("{colour} healthy and validated on every node ({})", members.join(", ")),
                            None,
                        );
                        let _ = reports.send(Report::Event(Event::InstancesHealthy { id: deployment }));
                        return;
                    }
                    if said.as_ref() != Some(&waits) {
                        shared.notice(
                            &name,
                            Some(deployment),
                            EventKind::Instances,
                            format!(
                                "{colour} healthy on node {me}; waiting for node(s) {} to have theirs healthy and validated",
                                waits.join(", ")
                            ),
                            None,
                        );
                        said = Some(waits);
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        self.wait_for_others(deployment, task, Some(waiting));
    }

    /// This service's instances of `deployment`, held by `release`, are healthy: once every
    /// service of the release has its own healthy, the deployment moves on to its smoke test,
    /// which can then call the other services' new instances (a release's smoke tests exercise
    /// the whole new stack). The health deadline bounds the wait.
    fn await_release_healthy(&mut self, deployment: DeploymentId, release: u64) {
        if self.others.as_ref().is_some_and(|w| w.deployment == deployment) {
            return;
        }
        let barrier = self
            .shared
            .barriers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&release)
            .cloned();
        let (reports, name) = (self.reports.clone(), self.name().to_string());
        let task = tokio::spawn(async move {
            if let Some((members, tx)) = barrier {
                tx.send_modify(|healthy| {
                    healthy.insert(name);
                });
                let mut rx = tx.subscribe();
                let _ = rx.wait_for(|healthy| members.iter().all(|m| healthy.contains(m))).await;
            }
            let _ = reports.send(Report::Event(Event::InstancesHealthy { id: deployment }));
        });
        self.wait_for_others(deployment, task, None);
    }

    /// Ends the wait for other nodes' or services' instances unless it is for the deployment
    /// being provisioned now.
    fn end_others_wait(&mut self) {
        let current = match &self.state.phase {
            Phase::Provisioning(d) => Some(d.id),
            _ => None,
        };
        if self.others.as_ref().is_some_and(|w| Some(w.deployment) != current) {
            if let Some(w) = self.others.take() {
                w.task.abort();
            }
        }
    }

    /// `task` waits for other nodes' or services' instances of `deployment` (replacing any
    /// earlier wait).
    fn wait_for_others(&mut self, deployment: DeploymentId, task: JoinHandle<()>, nodes: Option<Waiting>) {
        let wait = OthersWait {
            deployment,
            task,
            nodes,
        };
        if let Some(old) = self.others.replace(wait) {
            old.task.abort();
        }
    }

    /// The services of this service's release whose instances are not healthy yet (at the
    /// release's barrier).
    fn release_not_healthy(&self) -> Vec<String> {
        let release = self.held.map_or(0, |(_, r)| r);
        self.shared
            .barriers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&release)
            .map(|(members, tx)| {
                let healthy = tx.borrow();
                members.iter().filter(|m| !healthy.contains(*m)).cloned().collect()
            })
            .unwrap_or_default()
    }

    /// While `deployment` waits at its release's barrier: the services waited for whose own
    /// deployment is still before its instances are healthy (a schema change, instances starting),
    /// with their phase.
    fn release_members_on_their_way(&self, deployment: DeploymentId) -> Vec<(String, String)> {
        if !self
            .others
            .as_ref()
            .is_some_and(|w| w.deployment == deployment && w.nodes.is_none())
        {
            return Vec::new();
        }
        let waiting = self.release_not_healthy();
        let views = self.shared.views.lock().unwrap_or_else(|p| p.into_inner());
        waiting
            .into_iter()
            .filter_map(|m| {
                let view = views.get(&m)?;
                (view.deployment.is_some() && matches!(view.phase.as_str(), "migrating" | "provisioning"))
                    .then(|| (m, view.summary.clone()))
            })
            .collect()
    }

    /// The event a health deadline of `deployment` raises: while other nodes' or services'
    /// instances are waited for, a failure naming them.
    fn deadline_event(&self, deployment: DeploymentId) -> Event {
        let Some(wait) = self.others.as_ref().filter(|w| w.deployment == deployment) else {
            return Event::HealthDeadlinePassed { id: deployment };
        };
        if wait.nodes.is_none() {
            let waiting = self.release_not_healthy();
            return Event::ProvisionFailed {
                id: deployment,
                reason: format!(
                    "{WAITED_FOR_RELEASE} ({} within {:?}); this service's own were healthy",
                    waiting.join(", "),
                    self.cfg.health.deadline
                ),
            };
        }
        let waiting = wait
            .nodes
            .as_ref()
            .map(|w| w.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .unwrap_or_default();
        if waiting.is_empty() {
            return Event::HealthDeadlinePassed { id: deployment };
        }
        Event::ProvisionFailed {
            id: deployment,
            reason: format!(
                "instances not healthy and validated within {:?} on node(s) {} (healthy on this node, {})",
                self.cfg.health.deadline,
                waiting.join(", "),
                self.shared.fleet.as_ref().map(|n| n.config.node.as_str()).unwrap_or("")
            ),
        }
    }

    /// A process group's instances changed. An instance restarted on another port (its own was
    /// taken) has its new address checked and routed instead of the old one: the route table
    /// takes it out of rotation until the checks find it healthy, as any new instance. Changed
    /// pids and ports are recorded, so that a restarted daemon adopts the processes that run now.
    /// An instance of the release being provisioned that keeps exiting at once fails the
    /// deployment without waiting for the health deadline.
    async fn instances_changed(&mut self, colour: Colour, run_id: u64, instances: Vec<InstanceInfo>) {
        let Some(run) = self.runs[slot(colour)].as_mut().filter(|r| r.id == run_id) else {
            return;
        };
        let addrs: Vec<SocketAddr> = instances.iter().map(InstanceInfo::addr).collect();
        let moved: Vec<(u32, SocketAddr, SocketAddr)> = instances
            .iter()
            .zip(&run.addrs)
            .filter(|(i, old)| i.addr() != **old)
            .map(|(i, old)| (i.index, *old, i.addr()))
            .collect();
        let snapshot = (addrs != run.addrs).then(|| {
            run.health.set_instances(addrs.clone());
            run.addrs = addrs.clone();
            run.health.snapshot()
        });
        let recorded: Vec<Recorded> = instances.iter().filter_map(InstanceInfo::recorded).collect();
        let record = (recorded != run.recorded).then(|| {
            run.recorded = recorded.clone();
            run.release.clone()
        });
        if let Some(snapshot) = snapshot {
            self.set_pool(colour, &addrs, Some(&snapshot), &[]);
            for (index, from, to) in moved {
                self.shared.notice(
                    self.name(),
                    None,
                    EventKind::Instances,
                    format!("{colour} instance {index} restarted on {to}: {from} was taken by another program"),
                    None,
                );
            }
        }
        if let Some(release) = record {
            self.record_instances(colour, &release, &recorded).await;
        }
        let failed = match self.runs[slot(colour)].as_ref().map(|r| &r.instances) {
            Some(Instances::Process(group)) => crash_loop(&self.state.phase, group.spec(), &instances),
            _ => None,
        };
        if let Some(event) = failed {
            let event = self.on_this_node(event);
            let _ = self.step(event, None).await;
        }
    }

    fn run_smoke(&mut self, deployment: DeploymentId, colour: Colour) {
        if self.cfg.validate.is_none() {
            self.report(Event::SmokePassed {
                id: deployment,
                detail: None,
            });
            return;
        }
        let version = self.runs[slot(colour)]
            .as_ref()
            .map(|r| r.release.version.clone())
            .unwrap_or_default();
        let smoke = smoke_test(&self.shared, &self.cfg, colour, &version, false);
        let reports = self.reports.clone();
        let shared = self.shared.clone();
        let name = self.name().to_string();
        // Copies of live requests, once the smoke test passed: only with a live release on the
        // other colour to copy from, and not for a cold rollback (back to a release that ran
        // before, as fast as it can).
        let cold_rollback = self
            .state
            .in_progress()
            .is_some_and(|d| d.cause == crate::lifecycle::Cause::ColdRollback);
        let mirror = self
            .cfg
            .validate
            .as_ref()
            .and_then(|v| v.mirror.clone())
            .filter(|_| !cold_rollback && self.state.live.as_ref().is_some_and(|l| l.colour != colour));
        let task = tokio::spawn(async move {
            let smoke = match (smoke.await, mirror) {
                (Ok(()), Some(m)) => match mirror_window(&shared, &name, deployment, colour, &version, &m).await {
                    Ok(seen) => Ok(Some(seen)),
                    // Said by the window already.
                    Err(reason) => {
                        let _ = reports.send(Report::Event(Event::SmokeFailed { id: deployment, reason }));
                        return;
                    }
                },
                (result, _) => result.map(|()| None),
            };
            let event = match smoke {
                Ok(detail) => Event::SmokePassed { id: deployment, detail },
                Err(reason) => {
                    shared.notice(
                        &name,
                        Some(deployment),
                        EventKind::Smoke,
                        reason.clone(),
                        Some(reason.clone()),
                    );
                    Event::SmokeFailed { id: deployment, reason }
                }
            };
            let _ = reports.send(Report::Event(event));
        });
        self.smoke = Some((deployment, task));
    }

    /// Before a deployment whose expand step has SQL files (`migrate.files`): refused when a
    /// statement in them would break the live release (see `crate::schema_lint`) and is not
    /// allowed, or when they cannot be read or parsed. Nothing runs then.
    async fn lint_migrations(&self) -> Result<(), CommandError> {
        let Some(m) = self
            .cfg
            .migrate
            .clone()
            .filter(|m| m.expand.is_some() && !m.files.is_empty())
        else {
            return Ok(());
        };
        let dir = self.shared.config.dir.clone();
        let name = self.name().to_string();
        let linted =
            tokio::task::spawn_blocking(move || crate::schema_lint::lint_files(&m.files, &dir, m.dialect, &m.allow))
                .await
                .map_err(|e| CommandError::Store(e.to_string()))?;
        match linted {
            Err(e) => Err(CommandError::BadRequest(format!(
                "service {name}: the migration files (migrate.files) cannot be linted, so nothing ran: {e}"
            ))),
            Ok(report) if !report.refused.is_empty() => {
                let findings: Vec<String> = report.refused.iter().map(|f| format!("  {f}")).collect();
                Err(CommandError::BadRequest(format!(
                    "service {name}: refused before anything ran: {} statement(s) in migrate.files would break the \
                     live release during expand:\n{}\nmove them to the contract step, or allow them (migrate.allow, or \
                     `-- cutover: allow KIND` on the line before the statement)",
                    report.refused.len(),
                    findings.join("\n")
                )))
            }
            Ok(_) => Ok(()),
        }
    }

    /// Runs the schema-change command of `step` (for `release`) and reports how it ended. The
    /// check after expand is `migrate.check`, or else the smoke test against the live route.
    fn run_migration(&mut self, deployment: DeploymentId, step: MigrationStep, release: Release) {
        let reports = self.reports.clone();
        let live = self.state.live.clone();
        let migrate = self.cfg.migrate.clone();
        let command = migrate.as_ref().and_then(|m| match step {
            MigrationStep::Contract => m.contract.clone(),
            MigrationStep::Expand => m.expand.clone(),
            MigrationStep::Check => m.check.clone(),
            MigrationStep::Rollback => m.rollback.clone(),
        });
        let timeout = migrate.as_ref().map_or(Duration::from_secs(600), |m| m.timeout);
        self.shared.notice(
            self.name(),
            Some(deployment),
            EventKind::Migration,
            match &command {
                Some(c) => format!("{step} of {release}: running `{c}`"),
                None => format!("{step} of {release}: checking the live release with the smoke test"),
            },
            None,
        );
        let run: std::pin::Pin<Box<dyn std::future::Future<Output = (bool, String)> + Send>> =
            match (command, step, &live) {
                (Some(command), _, _) => {
                    let mut cmd = tokio::process::Command::new("/bin/sh");
                    cmd.arg("-c")
                        .arg(&command)
                        .current_dir(if self.shared.config.dir.as_os_str().is_empty() {
                            PathBuf::from(".")
                        } else {
                            self.shared.config.dir.clone()
                        })
                        .env("CUTOVER_SERVICE", self.name())
                        .env("CUTOVER_VERSION", &release.version)
                        .env(
                            "CUTOVER_LIVE_VERSION",
                            live.as_ref().map(|l| l.release.version.clone()).unwrap_or_default(),
                        )
                        .env("CUTOVER_MIGRATE_STEP", step.as_str());
                    Box::pin(async move { run_command(cmd, &command, timeout).await })
                }
                (None, MigrationStep::Check, Some(live)) if self.cfg.validate.is_some() => {
                    let smoke = smoke_test(&self.shared, &self.cfg, live.colour, &live.release.version, true);
                    let started = Instant::now();
                    Box::pin(async move {
                        match smoke.await {
                            Ok(()) => (
                                true,
                                format!(
                                    "the smoke test passed against the live route in {:.1?}",
                                    started.elapsed()
                                ),
                            ),
                            Err(why) => (false, format!("the smoke test against the live route: {why}")),
                        }
                    })
                }
                (None, MigrationStep::Check, _) => Box::pin(async {
                    (
                        true,
                        "nothing to check the live release with (no migrate.check, no validate.smoke)".to_string(),
                    )
                }),
                (None, _, _) => Box::pin(async move {
                    (
                        false,
                        format!("migrate.{step} is not configured (the configuration changed during the deployment?)"),
                    )
                }),
            };
        tokio::spawn(async move {
            let (ok, detail) = run.await;
            let _ = reports.send(Report::Event(Event::MigrationFinished {
                id: deployment,
                step,
                ok,
                detail,
            }));
        });
    }

    fn start_watch(&mut self, deployment: DeploymentId, colour: Colour) {
        let proxy = self.shared.proxy.clone();
        let name = self.name().to_string();
        let reports = self.reports.clone();
        let every = (self.cfg.watch.duration / 20).clamp(Duration::from_millis(100), Duration::from_secs(5));
        let task = tokio::spawn(async move {
            let stats = |p: &Proxy| -> StatsSnapshot {
                p.table()
                    .service(&name)
                    .map(|s| s.pool(colour).stats())
                    .unwrap_or_default()
            };
            let baseline = stats(&proxy);
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let w = stats(&proxy).since(&baseline);
                let sample = WatchSample {
                    requests: w.requests(),
                    errors: w.errors(),
                    p99: w.quantile(0.99),
                };
                if reports
                    .send(Report::Event(Event::WatchSample { id: deployment, sample }))
                    .is_err()
                {
                    return;
                }
            }
        });
        if let Some((_, old)) = self.watch.replace((deployment, task)) {
            old.abort();
        }
    }
}

/// How the process driver runs `service`'s `release` on `colour` on this host.
fn instance_spec(
    shared: &Shared,
    service: &str,
    colour: Colour,
    release: &Release,
    command: &str,
    instances: u32,
) -> InstanceSpec {
    let config = &shared.config;
    InstanceSpec {
        service: service.to_string(),
        colour,
        version: release.version.clone(),
        command: command.to_string(),
        instances,
        workdir: if config.dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            config.dir.clone()
        },
        state_dir: config.server.state_dir.clone(),
        grace: crate::process::DEFAULT_GRACE,
        backoff: Default::default(),
        peers: config.server.listen.first().map(|a| crate::process::Peers {
            url: match a.ip().is_unspecified() {
                true => format!("http://127.0.0.1:{}", a.port()),
                false => format!("http://{a}"),
            },
            token: shared.preview_token.clone(),
        }),
    }
}

/// What this host's store says about `service`'s instances on `colour` (and of `release`, if
/// given), as the process driver takes it for adoption or stopping.
async fn recorded_instances(
    shared: &Shared,
    service: &str,
    colour: Colour,
    release: Option<&Release>,
) -> Vec<Recorded> {
    let (local, name, release) = (shared.local.clone(), service.to_string(), release.cloned());
    let rows = off_async_store(move || local.instances(&name))
        .await
        .unwrap_or_default();
    rows.into_iter()
        .filter(|r| r.colour == colour && release.as_ref().is_none_or(|v| &r.release == v))
        .map(|r| Recorded {
            index: r.index,
            pid: r.pid,
            pgid: r.pgid,
            port: r.port,
            start_time: r.start_ticks,
        })
        .collect()
}

/// Records `service`'s instances on `colour` in this host's store (replacing those recorded
/// before), for a later daemon to adopt.
async fn record_instances(shared: &Shared, service: &str, colour: Colour, release: &Release, recorded: &[Recorded]) {
    let rows: Vec<StoredInstance> = recorded
        .iter()
        .map(|r| StoredInstance {
            service: service.to_string(),
            colour,
            index: r.index,
            release: release.clone(),
            pid: r.pid,
            pgid: r.pgid,
            port: r.port,
            start_ticks: r.start_time,
        })
        .collect();
    let (local, name) = (shared.local.clone(), service.to_string());
    let recorded = off_async_store(move || {
        let _ = local.remove_instances(&name, colour);
        for row in rows {
            if let Err(e) = local.record_instance(&row) {
                tracing::warn!(service = %name, error = %e, "cannot record an instance");
            }
        }
        Ok(())
    })
    .await;
    if let Err(e) = recorded {
        tracing::warn!(service, error = %e, "cannot record the instances");
    }
}

/// The addresses among `addrs` that pass one health check now (all checked at once, each
/// within the check timeout).
async fn passing_now(
    cfg: &ServiceConfig,
    tls: Option<Arc<cutover_proxy::UpstreamTls>>,
    addrs: &[SocketAddr],
) -> Vec<SocketAddr> {
    let (path, timeout) = (cfg.health.path.clone(), cfg.health.timeout);
    let host = cfg.health.host.clone();
    let checks = addrs.iter().map(|&a| {
        let (path, host, tls) = (path.clone(), host.clone(), tls.clone());
        tokio::spawn(async move {
            crate::health::check_once(a, &path, host.as_deref(), timeout, tls.as_deref())
                .await
                .is_ok()
                .then_some(a)
        })
    });
    let mut passing = Vec::new();
    for check in checks.collect::<Vec<_>>() {
        if let Ok(Some(a)) = check.await {
            passing.push(a);
        }
    }
    if passing.len() < addrs.len() {
        tracing::warn!(
            service = %cfg.name,
            "{} of {} adopted instances did not pass a check at once; they get requests once healthy",
            addrs.len() - passing.len(),
            addrs.len()
        );
    }
    passing
}

/// Runs `cmd` (`command`, as configured), killed after `timeout`: whether it exited 0, and what
/// it did (exit status, duration, the last lines of its output).
async fn run_command(mut cmd: tokio::process::Command, command: &str, timeout: Duration) -> (bool, String) {
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let started = Instant::now();
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return (false, format!("cannot run `{command}`: {e}")),
    };
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Err(_) => (false, format!("`{command}` still running after {timeout:?}; killed")),
        Ok(Err(e)) => (false, format!("`{command}`: {e}")),
        Ok(Ok(out)) => {
            let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
            text.push_str(&String::from_utf8_lossy(&out.stdout));
            let tail: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).rev().take(5).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            let mut detail = format!("`{command}` exited with {} in {:.1?}", out.status, started.elapsed());
            if !tail.is_empty() {
                detail.push_str(": ");
                detail.push_str(&tail.join(" / "));
            }
            (out.status.success(), detail)
        }
    }
}

/// The service's smoke test (`validate.smoke`) of `version` on `colour`, run against this node's
/// preview route (or, `live`, against the live route without the preview token); `Err` says why
/// it failed. Without `validate`, it passes.
/// The mirroring window of a validation (`validate.mirror`, see `mirror`): opens it, waits its
/// duration, closes it and judges what it saw, saying each step on the service's stream.
async fn mirror_window(
    shared: &Shared,
    service: &str,
    deployment: DeploymentId,
    to: Colour,
    version: &str,
    cfg: &crate::config::MirrorConfig,
) -> Result<String, String> {
    let say = |message: String, reason: Option<String>| {
        shared.notice(service, Some(deployment), EventKind::Mirror, message, reason)
    };
    let window = match mirror::Window::open(&shared.proxy, service, to, cfg) {
        Ok(w) => w,
        Err(why) => {
            say(why.clone(), Some(why.clone()));
            return Err(why);
        }
    };
    say(mirror::describe_start(to, version, cfg), None);
    tokio::time::sleep(cfg.duration).await;
    window.close();
    // Copies on their way when the window closed are judged once answered, waited for a moment
    // at most.
    let settle = Instant::now() + mirror::SETTLE;
    let mut report = window.report();
    while report.copies.requests() < report.live.requests() && Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(20)).await;
        report = window.report();
    }
    match mirror::judge(&report, cfg) {
        Ok(seen) => {
            let said = format!("mirrored to {to}@{version}: {seen}");
            say(said.clone(), None);
            Ok(said)
        }
        Err(why) => {
            say(format!("mirrored to {to}@{version}: {why}"), Some(why.clone()));
            Err(format!("mirroring: {why}"))
        }
    }
}

fn smoke_test(
    shared: &Shared,
    cfg: &ServiceConfig,
    colour: Colour,
    version: &str,
    live: bool,
) -> impl std::future::Future<Output = Result<(), String>> + Send + 'static {
    let validate = cfg.validate.clone();
    let server = &shared.config.server;
    let front = match live {
        true => server.listen.first(),
        false => server.preview_listen.first().or(server.listen.first()),
    }
    .copied();
    let url = match front {
        Some(a) if a.ip().is_unspecified() => format!("http://127.0.0.1:{}", a.port()),
        Some(a) => format!("http://{a}"),
        None => String::new(),
    };
    let mut cmd = tokio::process::Command::new("/bin/sh");
    if let Some(validate) = &validate {
        cmd.arg("-c")
            .arg(&validate.smoke)
            .current_dir(if shared.config.dir.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                shared.config.dir.clone()
            })
            .env("CUTOVER_PREVIEW_URL", &url)
            // Against the live route (the check after a schema change): without the token.
            .env(
                "CUTOVER_PREVIEW_TOKEN",
                if live { "" } else { shared.preview_token.as_str() },
            )
            .env("CUTOVER_PREVIEW_HOST", cfg.hosts.first().cloned().unwrap_or_default())
            .env("CUTOVER_SERVICE", &cfg.name)
            .env("CUTOVER_COLOUR", colour.as_str())
            .env("CUTOVER_VERSION", version)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
    }
    async move {
        let Some(validate) = validate else { return Ok(()) };
        match cmd.spawn() {
            Err(e) => Err(format!("cannot run `{}`: {e}", validate.smoke)),
            Ok(child) => match tokio::time::timeout(validate.timeout, child.wait_with_output()).await {
                Err(_) => Err(format!(
                    "`{}` still running after {:?}",
                    validate.smoke, validate.timeout
                )),
                Ok(Err(e)) => Err(format!("`{}`: {e}", validate.smoke)),
                Ok(Ok(out)) if out.status.success() => Ok(()),
                Ok(Ok(out)) => {
                    let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
                    text.push_str(&String::from_utf8_lossy(&out.stdout));
                    let tail: Vec<&str> = text.lines().rev().take(3).collect();
                    let tail: Vec<&str> = tail.into_iter().rev().collect();
                    Err(format!(
                        "`{}` exited with {}: {}",
                        validate.smoke,
                        out.status,
                        tail.join(" / ")
                    ))
                }
            },
        }
    }
}

/// [`Event::ProvisionFailed`] when an instance of `spec`'s colour is crash-looping
/// ([`InstanceInfo::crash_looping`]) while that colour is being provisioned: waiting would only
/// wait out the health deadline. Once a colour was healthy, its exits are the health checks'
/// business (and the driver restarts the instance), not a reason to abort.
fn crash_loop(phase: &Phase, spec: &InstanceSpec, instances: &[InstanceInfo]) -> Option<Event> {
    let Phase::Provisioning(d) = phase else {
        return None;
    };
    if d.colour != spec.colour {
        return None;
    }
    let i = instances.iter().find(|i| i.crash_looping())?;
    Some(Event::ProvisionFailed {
        id: d.id,
        reason: crash_report(spec, i),
    })
}

/// Why a crash-looping instance fails its deployment, for the user: how often and how it exited,
/// what exit statuses 126 and 127 of `/bin/sh` mean, the last lines it wrote, and where the rest
/// is. One line, like every reason: the output's lines are joined with " / ".
fn crash_report(spec: &InstanceSpec, i: &InstanceInfo) -> String {
    let (service, colour) = (&spec.service, spec.colour);
    let mut text = format!(
        "service {service} ({colour}): instance {} of `{}` exited {} times in a row, each within {:?} of its \
         start (last: {})",
        i.index,
        spec.command,
        i.quick_exits,
        spec.backoff.reset_after,
        i.last_exit.as_deref().unwrap_or("exited"),
    );
    match i.last_exit_code {
        Some(127) => text.push_str(&format!(
            "; exit status 127 means the shell found no such command: check `command`, which runs with \
             /bin/sh -c in {}",
            std::path::absolute(&spec.workdir)
                .unwrap_or_else(|_| spec.workdir.clone())
                .display()
        )),
        Some(126) => {
            text.push_str("; exit status 126 means a command was found but cannot be run: check its permissions")
        }
        _ => {}
    }
    if i.last_output.is_empty() {
        text.push_str("; it wrote nothing");
    } else {
        text.push_str(&format!("; its last output: {}", i.last_output.join(" / ")));
    }
    text.push_str(&format!("; see `cutover logs {service} --colour {colour}`"));
    text
}

fn static_path(state_dir: &std::path::Path, service: &str, colour: Colour) -> PathBuf {
    state_dir.join(format!("upstreams-{service}-{colour}.txt"))
}

/// The store's key of a static colour's upstreams (one address per line).
fn static_key(service: &str, colour: Colour) -> String {
    format!("upstreams/{service}/{colour}")
}

fn parse_static(text: &str) -> Vec<SocketAddr> {
    text.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// The upstreams a daemon from before the store kept them wrote beside it.
fn load_static(state_dir: &std::path::Path, service: &str, colour: Colour) -> Option<Vec<SocketAddr>> {
    let text = std::fs::read_to_string(static_path(state_dir, service, colour)).ok()?;
    let addrs = parse_static(&text);
    (!addrs.is_empty()).then_some(addrs)
}

/// What the watch of a deployment that went live judged, and against what, in words.
fn watch_verdict(watch: crate::lifecycle::Watched, cfg: &crate::config::WatchConfig) -> String {
    let limits = {
        let mut rate = format!("{:.2}", cfg.max_error_rate * 100.0);
        while rate.ends_with('0') {
            rate.pop();
        }
        let rate = rate.trim_end_matches('.');
        match cfg.max_p99 {
            Some(p99) => format!("error rate at most {rate}% and p99 latency at most {p99:?}"),
            None => format!("error rate at most {rate}%"),
        }
    };
    use crate::lifecycle::Watched;
    match watch {
        Watched::Skipped => {
            "the first release: nothing was live to compare it with or roll back to, so it went live once validated, without a watch".into()
        }
        Watched::Judged => format!(
            "watched for {:?}: its requests (at least {}) were judged against {limits}, and passed",
            cfg.duration, cfg.min_requests
        ),
        Watched::Unjudged if cfg.duration.is_zero() => "no watch (watch.duration is 0s)".into(),
        Watched::Unjudged => format!(
            "watched for {:?}, but it served too few requests (at least {} needed) to be judged against {limits}: only its health was watched",
            cfg.duration, cfg.min_requests
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::{Promotion, WatchPolicy};
    use crate::process::{InstanceState, CRASH_LOOP_EXITS};

    fn spec(colour: Colour) -> InstanceSpec {
        InstanceSpec {
            service: "web".to_string(),
            colour,
            version: "v2".to_string(),
            command: "./web --port {port}".to_string(),
            instances: 2,
            workdir: PathBuf::from("/srv/web"),
            state_dir: PathBuf::from("/srv/web/.cutover"),
            grace: Duration::from_secs(1),
            backoff: Default::default(),
            peers: None,
        }
    }

    fn instance(index: u32, quick_exits: u32, code: Option<i32>, output: &[&str]) -> InstanceInfo {
        InstanceInfo {
            index,
            port: 4000 + index as u16,
            pid: None,
            pgid: None,
            start_time: None,
            restarts: quick_exits,
            state: InstanceState::Restarting,
            adopted: false,
            last_exit: Some(match code {
                Some(c) => format!("exited with status {c}"),
                None => "killed by SIGSEGV".to_string(),
            }),
            last_exit_code: code,
            quick_exits,
            last_output: output.iter().map(|l| l.to_string()).collect(),
            log: PathBuf::from("/srv/web/.cutover/logs/web/green-0.log"),
        }
    }

    fn step(state: &State, event: Event) -> State {
        state.step(event).unwrap().state
    }

    /// web live on blue@v1, its deployment 2 of v2 provisioning on green.
    fn provisioning() -> State {
        let plan = Plan {
            health_deadline: Duration::from_secs(60),
            promote: Promotion::Auto { delay: Duration::ZERO },
            watch: WatchPolicy {
                duration: Duration::ZERO,
                min_requests: 1,
                max_error_rate: 0.01,
                max_p99: None,
            },
            keep_warm: Duration::from_secs(3600),
            migrate: Default::default(),
            gradual: None,
        };
        let deploy = |id, version| Event::Deploy {
            id: DeploymentId(id),
            release: Release::new(version),
            plan: plan.clone(),
        };
        let mut state = step(&State::new("web"), deploy(1, "v1"));
        state = step(&state, Event::InstancesHealthy { id: DeploymentId(1) });
        state = step(
            &state,
            Event::SmokePassed {
                id: DeploymentId(1),
                detail: None,
            },
        );
        assert_eq!(state.live.as_ref().map(|l| l.colour), Some(Colour::Blue), "{state:?}");
        let state = step(&state, deploy(2, "v2"));
        assert!(matches!(&state.phase, Phase::Provisioning(d) if d.colour == Colour::Green));
        state
    }

    #[test]
    fn daemon_crash_loop_fails_only_the_colour_being_provisioned() {
        let state = provisioning();
        let looping = CRASH_LOOP_EXITS;
        let not_found = ["/bin/sh: 1: ./web: not found"];
        let green = [instance(0, 0, None, &[]), instance(1, looping, Some(127), &not_found)];
        let Some(Event::ProvisionFailed { id, reason }) = crash_loop(&state.phase, &spec(Colour::Green), &green) else {
            panic!("a crash loop while provisioning fails the deployment");
        };
        assert_eq!(id, DeploymentId(2));
        assert_eq!(
            reason,
            "service web (green): instance 1 of `./web --port {port}` exited 3 times in a row, each within 10s \
             of its start (last: exited with status 127); exit status 127 means the shell found no such \
             command: check `command`, which runs with /bin/sh -c in /srv/web; its last output: /bin/sh: 1: \
             ./web: not found; see `cutover logs web --colour green`"
        );
        // The new colour is provisioned, not the live one: blue's exits are restarts.
        let blue = [
            instance(0, looping, Some(1), &[]),
            instance(1, looping + 5, Some(1), &[]),
        ];
        assert!(crash_loop(&state.phase, &spec(Colour::Blue), &blue).is_none());
        // One quick exit short of a crash loop, or exits after longer runs.
        let green = [
            instance(0, looping - 1, Some(127), &not_found),
            instance(1, 0, Some(1), &[]),
        ];
        assert!(crash_loop(&state.phase, &spec(Colour::Green), &green).is_none());

        // Once the colour was healthy, it is validated, promoted and live: never aborted for it.
        let crashing = [
            instance(0, looping, None, &["panic", "at the disco"]),
            instance(1, 0, None, &[]),
        ];
        let mut state = step(&state, Event::InstancesHealthy { id: DeploymentId(2) });
        assert!(matches!(state.phase, Phase::Validating(_)));
        assert!(crash_loop(&state.phase, &spec(Colour::Green), &crashing).is_none());
        state = step(
            &state,
            Event::SmokePassed {
                id: DeploymentId(2),
                detail: None,
            },
        );
        assert_eq!(state.live.as_ref().map(|l| l.colour), Some(Colour::Green), "{state:?}");
        assert!(crash_loop(&state.phase, &spec(Colour::Green), &crashing).is_none());
    }

    /// An upstream that answers every request 200 "ok" and closes, for static services.
    async fn upstream() -> SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let answer = "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n";
                    let _ = conn.write_all(answer.as_bytes()).await;
                });
            }
        });
        addr
    }

    /// A daemon with one static service, `web`, whose table has the keys in `service`.
    async fn static_daemon(dir: &std::path::Path, service: &str) -> Daemon {
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nstate_dir = \"{}\"\nworkers = 1\n\n[services.web]\n\
             health = {{ path = \"/up\", interval = \"50ms\", healthy = 1, unhealthy = 2, deadline = \"10s\" }}\n{service}\n",
            dir.join("state").display()
        );
        Daemon::start(Config::parse(&text, "test.toml").unwrap()).await.unwrap()
    }

    /// Polls the service's status until `done` holds, for at most `within`.
    async fn status_until(daemon: &Daemon, within: Duration, done: impl Fn(&ServiceView) -> bool) -> ServiceView {
        let deadline = Instant::now() + within;
        loop {
            let view = daemon.status().into_iter().find(|v| v.name == "web").unwrap();
            if done(&view) || Instant::now() > deadline {
                return view;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn live(view: &ServiceView) -> Option<&str> {
        view.live.as_ref().map(|l| l.colour.as_str())
    }

    /// A promotion moves live traffic in one table store, made by the switch, after the commit:
    /// nothing stores the new live colour before it, and no second store switches again (the
    /// old colour's drain stores one that leaves the live colour as it is).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn daemon_a_promotion_stores_one_table_and_that_store_is_the_switch() {
        let dir = tempfile::tempdir().unwrap();
        let daemon = static_daemon(
            dir.path(),
            "promote = { auto = false }\nwatch = { duration = \"1h\", min_requests = 1000000 }",
        )
        .await;
        daemon
            .deploy("web", "v1", vec![upstream().await], "test")
            .await
            .unwrap();
        let view = status_until(&daemon, Duration::from_secs(20), |v| live(v) == Some("blue")).await;
        assert_eq!(live(&view), Some("blue"), "{view:?}");
        daemon
            .deploy("web", "v2", vec![upstream().await], "test")
            .await
            .unwrap();
        let view = status_until(&daemon, Duration::from_secs(20), |v| v.phase == "ready to promote").await;
        assert_eq!(view.phase, "ready to promote", "{view:?}");

        let mut notices = daemon.subscribe();
        let before = daemon.proxy().table();
        assert_eq!(before.service("web").unwrap().active, Colour::Blue);
        daemon.promote("web", "test").await.unwrap();
        let after = daemon.proxy().table();
        assert_eq!(after.service("web").unwrap().active, Colour::Green);
        // One store moved live traffic; the only other one allowed is the old colour's drain
        // beginning on its lane (a new generation for blue, `active` untouched), which may or
        // may not have come by now.
        let stores = after.revision() - before.revision();
        assert!(
            stores == 1 || stores == 2,
            "the promotion stored one table that moved live traffic, and at most blue's drain after it: {stores} stores"
        );
        // The switch notice reports that store (and only a store that switched is reported).
        let switch = loop {
            let n = tokio::time::timeout(Duration::from_secs(5), notices.recv())
                .await
                .expect("a switch notice")
                .unwrap();
            if n.kind == "switch" {
                break n;
            }
        };
        assert!(
            switch.message.starts_with("live traffic switched to green (v2) in "),
            "{}",
            switch.message
        );
        assert!(
            !daemon.proxy().switch("web", Colour::Green).unwrap(),
            "green is live: switching to it again stores nothing"
        );
        daemon.stop(AtShutdown::Stop).await;
    }

    /// The actor's own reports never wait behind commands nor get dropped when the commands'
    /// mailbox is full: with hundreds of refused commands queued all the time, a first release
    /// still gets through health checks and validation (no smoke command: the actor reports the
    /// pass to itself) and goes live.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn daemon_reports_get_through_a_full_mailbox_of_commands() {
        let dir = tempfile::tempdir().unwrap();
        let daemon = static_daemon(dir.path(), "").await;
        daemon
            .deploy("web", "v1", vec![upstream().await], "test")
            .await
            .unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let refused = Arc::new(std::sync::atomic::AtomicU64::new(0));
        // More senders than the mailbox has room for, each sending again as soon as answered.
        let flood: Vec<_> = (0..400)
            .map(|_| {
                let (daemon, stop, refused) = (daemon.clone(), stop.clone(), refused.clone());
                tokio::spawn(async move {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        if daemon.promote("web", "flood").await.is_err() {
                            refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        let view = status_until(&daemon, Duration::from_secs(30), |v| {
            live(v) == Some("blue") && v.phase == "stable"
        })
        .await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for task in flood {
            task.await.unwrap();
        }
        assert!(
            refused.load(std::sync::atomic::Ordering::Relaxed) > 400,
            "the mailbox was flooded throughout"
        );
        assert_eq!(
            (live(&view), view.phase.as_str()),
            (Some("blue"), "stable"),
            "the deployment went on: {view:?}"
        );
        daemon.stop(AtShutdown::Stop).await;
    }

    #[test]
    fn daemon_crash_report_says_what_126_means_and_when_nothing_was_written() {
        let report = crash_report(&spec(Colour::Blue), &instance(0, 4, Some(126), &[]));
        assert!(
            report.contains("(last: exited with status 126); exit status 126 means a command was found but cannot be run: check its permissions; it wrote nothing; see `cutover logs web --colour blue`"),
            "{report}"
        );
        let report = crash_report(&spec(Colour::Blue), &instance(0, 3, None, &["a", "b"]));
        assert!(
            report.contains("(last: killed by SIGSEGV); its last output: a / b; see"),
            "{report}"
        );
    }
}
