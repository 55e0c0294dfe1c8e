//! A daemon that is one node of a fleet (`[fleet]` in the config): its state is in etcd, shared
//! with the other nodes; one node leads and runs the services' deployments; every node applies
//! each committed route state to its own proxy and acknowledges it.
//!
//! - **Start.** The node joins the fleet ([`Membership::join`]), then reads every service's
//!   committed state from etcd and puts its live colour and instances in the route table before
//!   the listeners accept (see `Daemon::start_inheriting`): a node that starts or restarts in the
//!   middle of a release serves the revision that is current, never an older one.
//! - **Following** ([`follow`]): a watch on the services' state keys; each new state is applied
//!   to the route table (the static instances of each colour from the shared store, or for a
//!   service with `command` this node's own instances, run by its lanes: see `fleet_runs`; the
//!   live colour, then the old colour drained as the leader drains it) and acknowledged under
//!   the node's lease. A broken watch (etcd unreachable) leaves the table as it is, serving the last
//!   revision applied (fail static), and is opened again from a fresh read.
//! - **Leading** ([`lead`]): the node campaigns; once it leads it starts the services' actors
//!   from the committed state, exactly as a single daemon's start does (an interrupted
//!   deployment is recovered the same way). The leader's actors change its table themselves and
//!   acknowledge their commits; a switch waits for every node's acknowledgement (see
//!   `Actor::await_fleet`).
//! - **Commands** on a node that does not lead are refused, naming the leader.
//!
//! - **Losing the lease** (etcd did not hear from the node within `lease_ttl`): the node is no
//!   longer a member, and another node may lead. A leader stops its actors at once
//!   ([`lead`]); every node keeps serving what it applied and joins again ([`keep_membership`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use cutover_proxy::Colour;
use tokio::sync::mpsc;

use super::fleet_runs::{Desired, Lane};
use super::{
    off_async_store, parse_static, set_pool, static_key, view_of, AtShutdown, CommandError, Daemon, Msg, Shared,
    StartError,
};
use crate::config::{Driver, FleetConfig, ServiceConfig};
use crate::fleet::{Answer, Command, Done, FleetError, Incoming, Membership, RouteState};
use crate::health::{CheckSpec, HealthChecker};
use crate::lifecycle::{DeploymentId, Phase, Release, State};
use crate::store::etcd::{escape, EtcdOptions, EtcdTls};

/// The actors of the services, while this node leads (none otherwise).
pub(super) type Actors = RwLock<BTreeMap<String, mpsc::Sender<Msg>>>;

pub(super) struct FleetNode {
    pub(super) config: FleetConfig,
    pub(super) options: EtcdOptions,
    membership: Mutex<Option<Arc<Membership>>>,
    /// Whether this node leads: its actors, not the watch, change its route table.
    leading: AtomicBool,
    /// The leader's name as last seen.
    leader: Mutex<Option<String>>,
    /// The revision of each service's route state this node applies now.
    applied: Mutex<BTreeMap<String, u64>>,
    /// Whether the watch of the route states is open.
    connected: AtomicBool,
    /// The lease of the daemon this one replaces (`cutover upgrade`), to join under.
    pub(super) inherited_lease: Mutex<Option<i64>>,
    /// While this node leads: where its notices go to be published for the other nodes.
    publisher: Mutex<Option<mpsc::UnboundedSender<Vec<u8>>>>,
    /// Per service, the revision to acknowledge: one writer per service puts the newest one, so
    /// acknowledgements land in order and a slow write never holds up the next apply.
    acks_out: Mutex<std::collections::HashMap<String, tokio::sync::watch::Sender<u64>>>,
    /// While it follows: its own health checks of each colour's static instances.
    checks: Mutex<std::collections::HashMap<(String, Colour), FollowerCheck>>,
    /// While it follows: the instances it runs itself (process driver), per service and colour.
    lanes: Mutex<std::collections::HashMap<(String, Colour), Lane>>,
}

/// A follower's health checks of one colour of one service: what it checks and the task that
/// puts each change in the route table.
struct FollowerCheck {
    pool: Arc<Mutex<(Option<String>, Vec<SocketAddr>)>>,
    checker: HealthChecker,
    forward: tokio::task::JoinHandle<()>,
}

impl FleetNode {
    /// The node's settings; the password file, when there is one, is read here.
    pub(super) fn new(config: &FleetConfig, timeout: Duration) -> Result<FleetNode, StartError> {
        let mut options = EtcdOptions::new(config.etcd.clone());
        options.prefix = config.prefix.clone();
        options.timeout = timeout;
        if let (Some(user), Some(file)) = (&config.user, &config.password_file) {
            let text = std::fs::read_to_string(file).map_err(|source| StartError::Io {
                path: file.clone(),
                source,
            })?;
            let password = text.lines().next().unwrap_or("").to_string();
            options.user = Some((user.clone(), password));
        }
        if let Some(tls) = &config.tls {
            options.tls = Some(EtcdTls {
                ca: tls.ca.clone(),
                cert: tls.cert.clone(),
                key: tls.key.clone(),
            });
        }
        Ok(FleetNode {
            config: config.clone(),
            options,
            membership: Mutex::new(None),
            leading: AtomicBool::new(false),
            leader: Mutex::new(None),
            applied: Mutex::new(BTreeMap::new()),
            connected: AtomicBool::new(false),
            inherited_lease: Mutex::new(None),
            publisher: Mutex::new(None),
            checks: Mutex::new(std::collections::HashMap::new()),
            lanes: Mutex::new(std::collections::HashMap::new()),
            acks_out: Mutex::new(std::collections::HashMap::new()),
        })
    }

    pub(super) fn membership(&self) -> Option<Arc<Membership>> {
        self.membership.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(super) fn leading(&self) -> bool {
        self.leading.load(Ordering::SeqCst)
    }

    /// Why a command cannot be carried out here: this node does not lead.
    pub(super) fn not_leading(&self) -> String {
        if self.membership().is_none_or(|m| m.is_lost()) {
            return format!(
                "node {} is not a member of the fleet now: etcd has not heard from it within lease_ttl = {:?} \
                 (etcd unreachable, or without a quorum). Without a quorum no node leads and nothing can be \
                 deployed; every node keeps serving the last route it applied. Check the etcd members ({}): a \
                 majority of them must be up; the node joins again by itself",
                self.config.node,
                self.config.lease_ttl,
                self.config.etcd.join(", ")
            );
        }
        let leader = self.leader.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match leader {
            Some(l) if l != self.config.node => format!(
                "node {} does not lead the fleet, node {l} does: send the command to node {l}",
                self.config.node
            ),
            _ => format!(
                "node {} does not lead the fleet and no node leads it now (a leader is chosen within \
                 lease_ttl = {:?} while etcd has a quorum): try again shortly",
                self.config.node, self.config.lease_ttl
            ),
        }
    }

    /// While this node leads: queues `notice` for the other nodes (in order).
    pub(super) fn publish(&self, notice: &crate::events::Notice) {
        let publisher = self.publisher.lock().unwrap_or_else(|p| p.into_inner());
        if let (Some(tx), Ok(json)) = (publisher.as_ref(), serde_json::to_vec(notice)) {
            let _ = tx.send(json);
        }
    }

    /// Checks `addrs` of `service`'s `colour` (release `version`) from this node from now on, as
    /// configured for the service, and puts what the checks find in the route table: an upstream
    /// this node cannot reach is taken out of its rotation even if the leader reaches it. No
    /// addresses: the checks of that colour stop.
    fn check(
        &self,
        shared: &Arc<Shared>,
        svc: &ServiceConfig,
        colour: Colour,
        version: Option<&str>,
        addrs: &[SocketAddr],
    ) {
        let key = (svc.name.clone(), colour);
        let mut checks = self.checks.lock().unwrap_or_else(|p| p.into_inner());
        if addrs.is_empty() {
            if let Some(c) = checks.remove(&key) {
                c.forward.abort();
                tokio::spawn(c.checker.stop());
            }
            return;
        }
        if let Some(c) = checks.get_mut(&key) {
            let mut pool = c.pool.lock().unwrap_or_else(|p| p.into_inner());
            *pool = (version.map(str::to_string), addrs.to_vec());
            drop(pool);
            c.checker.set_instances(addrs.to_vec());
            return;
        }
        let tls = shared
            .proxy
            .table()
            .service(&svc.name)
            .and_then(|s| s.upstream_tls.clone());
        let checker = HealthChecker::start(CheckSpec {
            service: svc.name.clone(),
            colour,
            instances: addrs.to_vec(),
            config: svc.health.clone(),
            tls,
        });
        let pool = Arc::new(Mutex::new((version.map(str::to_string), addrs.to_vec())));
        let forward = {
            let (mut rx, pool, shared, name) = (checker.subscribe(), pool.clone(), shared.clone(), svc.name.clone());
            tokio::spawn(async move {
                while rx.changed().await.is_ok() {
                    let snapshot = rx.borrow_and_update().clone();
                    let (version, addrs) = pool.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    set_pool(
                        &shared.proxy,
                        &name,
                        colour,
                        version.as_deref(),
                        &addrs,
                        Some(&snapshot),
                        &addrs,
                    );
                }
            })
        };
        checks.insert(key, FollowerCheck { pool, checker, forward });
    }

    /// Tells the lane of `svc`'s `colour` what should run there (starting the lane if it has
    /// none); `switched_away`: live traffic just left the colour, which is drained before
    /// anything of it stops. Returns whether the colour has a lane.
    fn run_on(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        svc: &ServiceConfig,
        colour: Colour,
        release: Option<Release>,
        deployment: Option<DeploymentId>,
        switched_away: bool,
    ) -> bool {
        let mut lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
        if self.leading() {
            // Checked under the lock `end_runs` takes after leading began: no lane starts after.
            return false;
        }
        let key = (svc.name.clone(), colour);
        if let Some(lane) = lanes.get(&key) {
            lane.set(release, deployment, switched_away);
            return true;
        }
        if release.is_none() {
            return false;
        }
        let desired = Desired {
            release,
            deployment,
            drains: u64::from(switched_away),
        };
        lanes.insert(
            key,
            Lane::start(shared.clone(), self.clone(), svc.clone(), colour, desired),
        );
        true
    }

    /// Ends every lane: their instances are left running and recorded (this node begins to
    /// lead, and its actors adopt them; or the daemon stops leaving them), or stopped.
    pub(super) async fn end_runs(&self, at: AtShutdown) {
        let lanes = std::mem::take(&mut *self.lanes.lock().unwrap_or_else(|p| p.into_inner()));
        let ending: Vec<_> = lanes.into_values().map(|lane| lane.end(at)).collect();
        futures_util::future::join_all(ending).await;
    }

    /// Waits until every lane has made what runs match what it was first told (at a start,
    /// before the listeners accept), at most `within`.
    async fn runs_settled(&self, within: Duration) {
        let waits: Vec<_> = {
            let lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
            lanes.values().map(|l| l.settled_receiver()).collect()
        };
        let all = async {
            for mut rx in waits {
                let _ = rx.wait_for(|s| *s).await;
            }
        };
        let _ = tokio::time::timeout(within, all).await;
    }

    /// Stops every health check of this node's own (it leads: its actors check).
    fn stop_checks(&self) {
        let checks = std::mem::take(&mut *self.checks.lock().unwrap_or_else(|p| p.into_inner()));
        for (_, c) in checks {
            c.forward.abort();
            tokio::spawn(c.checker.stop());
        }
    }

    /// Acknowledges that this node applies `revision` of `service` (or a later one): written to
    /// etcd in the background, in order, the newest revision only, until it is written.
    pub(super) fn acknowledge(self: &Arc<Self>, service: &str, revision: u64) {
        let mut out = self.acks_out.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = out.get(service) {
            tx.send_if_modified(|v| {
                let newer = revision > *v;
                if newer {
                    *v = revision;
                }
                newer
            });
            return;
        }
        let (tx, mut rx) = tokio::sync::watch::channel(revision);
        rx.mark_changed();
        out.insert(service.to_string(), tx);
        let (node, service) = (self.clone(), service.to_string());
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                loop {
                    let revision = *rx.borrow_and_update();
                    let written = match node.membership().filter(|m| !m.is_lost()) {
                        // Not a member now: `keep_membership` acknowledges again once it is.
                        None => break,
                        Some(m) => m.acknowledge(&service, revision).await,
                    };
                    match written {
                        Ok(()) => break,
                        Err(e) => {
                            tracing::warn!(service = %service, error = %e, "cannot acknowledge revision {revision}; trying again");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            }
        });
    }

    /// Acknowledges again every revision acknowledged before (after joining the fleet again:
    /// acknowledgements live under the lease).
    fn acknowledge_again(&self) {
        for tx in self.acks_out.lock().unwrap_or_else(|p| p.into_inner()).values() {
            tx.send_modify(|_| {});
        }
    }

    fn set_applied(&self, service: &str, revision: u64) {
        self.applied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(service.to_string(), revision);
    }
}

/// What this node knows of itself, without asking etcd (for metrics).
#[derive(Clone, Debug, serde::Serialize)]
pub struct LocalFleetView {
    /// This node's name.
    pub node: String,
    /// Whether its lease is alive: it counts in acknowledgements and may lead.
    pub member: bool,
    /// Whether it follows the route states: its watch is open and its lease alive.
    pub connected: bool,
    /// Whether it leads.
    pub leading: bool,
    /// The leader's name as last seen.
    pub leader: Option<String>,
    /// The revision of each service's route state it applies now.
    pub applied: BTreeMap<String, u64>,
}

/// One node of the fleet as etcd sees it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FleetNodeView {
    pub name: String,
    pub leader: bool,
    /// Per service: the revision it acknowledged, how many revisions of that service's state it
    /// is behind (0: current), and since when it applies it (unix ms).
    pub services: BTreeMap<String, NodeServiceView>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct NodeServiceView {
    pub applied_revision: Option<u64>,
    pub current: bool,
    pub applied_at_ms: Option<u64>,
}

/// `fleet` in `/v1/status`: this node, and every member as etcd sees it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FleetView {
    #[serde(flatten)]
    pub local: LocalFleetView,
    /// The revision of each service's committed route state.
    pub revisions: BTreeMap<String, u64>,
    /// The members (nodes whose lease is alive), by name; empty when etcd did not answer.
    pub nodes: Vec<FleetNodeView>,
    /// Why etcd's view is missing, when it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl FleetNode {
    pub(super) fn local_view(&self) -> LocalFleetView {
        let member = self.membership().is_some_and(|m| !m.is_lost());
        LocalFleetView {
            node: self.config.node.clone(),
            member,
            // A watch can stay open to a member that lost its quorum and hears nothing more; a
            // node whose lease is gone is not following the fleet, whatever its watch says.
            connected: member && self.connected.load(Ordering::SeqCst),
            leading: self.leading(),
            leader: self.leader.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            applied: self.applied.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }
    }

    /// [`FleetNode::local_view`] and what etcd says of every member, within `within`.
    pub(super) async fn view(&self, services: &[String], within: Duration) -> FleetView {
        let local = self.local_view();
        let Some(membership) = self.membership() else {
            return FleetView {
                local,
                revisions: BTreeMap::new(),
                nodes: Vec::new(),
                error: Some("the node has not joined the fleet".into()),
            };
        };
        let read = async {
            let (states, _) = membership.route_states().await?;
            let revisions: BTreeMap<String, u64> = services
                .iter()
                .filter_map(|s| {
                    let key = escape(s);
                    states
                        .iter()
                        .find(|r| r.service == key)
                        .map(|r| (s.clone(), r.revision))
                })
                .collect();
            let members = membership.members().await?;
            let leader = membership.leader().await?;
            let mut acks = BTreeMap::new();
            for s in services {
                acks.insert(s.clone(), membership.acks(&escape(s)).await?);
            }
            let nodes = members
                .into_iter()
                .map(|name| FleetNodeView {
                    leader: leader.as_deref() == Some(name.as_str()),
                    services: services
                        .iter()
                        .map(|s| {
                            let ack = acks.get(s).and_then(|a| a.get(&name));
                            let current = revisions.get(s).is_none_or(|r| ack.is_some_and(|a| a.revision >= *r));
                            (
                                s.clone(),
                                NodeServiceView {
                                    applied_revision: ack.map(|a| a.revision),
                                    current,
                                    applied_at_ms: ack.map(|a| a.applied_at_ms),
                                },
                            )
                        })
                        .collect(),
                    name,
                })
                .collect();
            Ok::<_, FleetError>((revisions, nodes))
        };
        match tokio::time::timeout(within, read).await {
            Ok(Ok((revisions, nodes))) => FleetView {
                local,
                revisions,
                nodes,
                error: None,
            },
            Ok(Err(e)) => FleetView {
                local,
                revisions: BTreeMap::new(),
                nodes: Vec::new(),
                error: Some(e.to_string()),
            },
            Err(_) => FleetView {
                local,
                revisions: BTreeMap::new(),
                nodes: Vec::new(),
                error: Some(format!(
                    "etcd ({}) did not answer within {within:?}; check that a majority of its members is up",
                    self.config.etcd.join(", ")
                )),
            },
        }
    }
}

/// Joins the fleet: the node's name is registered under its lease (a live node of the same name
/// refuses the start).
pub(super) async fn join(node: &FleetNode) -> Result<(), StartError> {
    let inherited = node.inherited_lease.lock().unwrap_or_else(|p| p.into_inner()).take();
    let membership = Membership::join_with_lease(&node.options, &node.config.node, node.config.lease_ttl, inherited)
        .await
        .map_err(|e| StartError::Fleet(e.to_string()))?;
    let membership = Arc::new(membership);
    if let Ok(leader) = membership.leader().await {
        *node.leader.lock().unwrap_or_else(|p| p.into_inner()) = leader;
    }
    *node.membership.lock().unwrap_or_else(|p| p.into_inner()) = Some(membership);
    Ok(())
}

/// Reads every service's committed route state and applies it (before the listeners accept).
pub(super) async fn load(shared: &Arc<Shared>, node: &Arc<FleetNode>) -> Result<(), StartError> {
    let membership = node
        .membership()
        .ok_or_else(|| StartError::Fleet("the node has not joined the fleet".into()))?;
    let (states, _) = membership
        .route_states()
        .await
        .map_err(|e| StartError::Fleet(e.to_string()))?;
    for svc in &shared.config.services {
        let Some(rs) = states.iter().find(|s| s.service == escape(&svc.name)) else {
            continue;
        };
        let state: State = serde_json::from_slice(&rs.value).map_err(|e| {
            StartError::Fleet(format!(
                "the route state of service {} in etcd cannot be read: {e}",
                svc.name
            ))
        })?;
        apply(shared, node, svc, &state, rs.revision, false).await;
    }
    // The instances this node runs itself: adopted ones that pass a check serve at once; new
    // ones (a node new to the fleet) once healthy, within the services' health deadline.
    let within = shared
        .config
        .services
        .iter()
        .map(|s| s.health.deadline)
        .max()
        .unwrap_or_default();
    node.runs_settled(within).await;
    Ok(())
}

/// Puts `state` (revision `revision`) in this node's route table, then acknowledges it. The
/// leader's actors do their own table changes: there, only the view is refreshed.
async fn apply(
    shared: &Arc<Shared>,
    node: &Arc<FleetNode>,
    svc: &ServiceConfig,
    state: &State,
    revision: u64,
    drain: bool,
) {
    let name = svc.name.as_str();
    let runs_here = matches!(svc.driver, Driver::Process { .. });
    if !node.leading() {
        // First the colours that have a release, then the switch, then the colours left with
        // none: a pool is never emptied while it is live (a rollback empties the colour it
        // leaves only once it is no longer live, and once drained).
        let mut released = Vec::new();
        for colour in [Colour::Blue, Colour::Green] {
            let Some(version) = release_on(state, colour) else {
                released.push(colour);
                continue;
            };
            if runs_here {
                // This node's own instances: started (or adopted) by the colour's lane, which
                // routes to them as its checks let them in.
                let deployment = provisioned(state).filter(|d| d.colour == colour).map(|d| d.id);
                node.run_on(shared, svc, colour, Some(Release::new(version)), deployment, false);
                continue;
            }
            let (store, key) = (shared.store.clone(), static_key(name, colour));
            let addrs = match off_async_store(move || store.get_value(&key)).await {
                Ok(v) => v.as_deref().map(parse_static).unwrap_or_default(),
                Err(e) => {
                    tracing::error!(service = name, error = %e, "cannot read the instances of {colour}; keeping those the table has");
                    continue;
                }
            };
            // The leader let them in after its checks: they serve until this node's own checks
            // say otherwise.
            set_pool(&shared.proxy, name, colour, Some(&version), &addrs, None, &addrs);
            node.check(shared, svc, colour, Some(&version), &addrs);
        }
        let target = match (&state.live, state.in_progress()) {
            (Some(live), _) => Some(live.colour),
            // Nothing live yet: the preview route leads to the first release (live gets 503).
            (None, Some(d)) => Some(d.colour.other()),
            (None, None) => None,
        };
        let mut left = None;
        if let Some(colour) = target {
            match shared.proxy.switch(name, colour) {
                Ok(true) if drain && state.live.is_some() => {
                    tracing::info!(service = name, %colour, revision, "live traffic switched to {colour} (fleet revision {revision})");
                    left = Some(colour.other());
                }
                Ok(_) => {}
                Err(e) => tracing::error!(service = name, error = %e, "cannot update the route table"),
            }
        }
        if runs_here {
            // The colour left is drained by its lane, which stops what runs there only after.
            for colour in [Colour::Blue, Colour::Green] {
                let release = release_on(state, colour).map(Release::new);
                let deployment = provisioned(state).filter(|d| d.colour == colour).map(|d| d.id);
                let has_lane = node.run_on(shared, svc, colour, release, deployment, Some(colour) == left);
                if !has_lane && released.contains(&colour) {
                    set_pool(&shared.proxy, name, colour, None, &[], None, &[]);
                }
            }
        } else {
            for colour in &released {
                node.check(shared, svc, *colour, None, &[]);
            }
            if let Some(old) = left {
                // Drained as the leader drains it; emptied after, when it has no release any
                // more (and no later revision gave it one meanwhile: its pool still has the
                // version this switch left).
                let leaving = release_on(state, old)
                    .is_none()
                    .then(|| {
                        shared
                            .proxy
                            .table()
                            .service(name)
                            .and_then(|s| s.pool(old).version.clone())
                    })
                    .flatten();
                let shared = shared.clone();
                let (name, timeout, window) = (name.to_string(), svc.drain_timeout, svc.close_window);
                tokio::spawn(async move {
                    super::drain(&shared, &name, old, timeout, window).await;
                    let Some(leaving) = leaving else { return };
                    let current = shared
                        .proxy
                        .table()
                        .service(&name)
                        .and_then(|s| s.pool(old).version.clone());
                    if current.as_deref() == Some(&*leaving) {
                        set_pool(&shared.proxy, &name, old, None, &[], None, &[]);
                    }
                });
            }
            for colour in released.iter().filter(|c| Some(**c) != left) {
                set_pool(&shared.proxy, name, *colour, None, &[], None, &[]);
            }
        }
    }
    shared
        .views
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(name.to_string(), view_of(state));
    node.set_applied(name, revision);
    if !node.leading() {
        node.acknowledge(name, revision);
    }
}

/// The version of the release that runs on `colour` in `state`, if one does.
fn release_on(state: &State, colour: Colour) -> Option<String> {
    if let Some(live) = state.live.as_ref().filter(|l| l.colour == colour) {
        return Some(live.release.version.clone());
    }
    if let Some(warm) = state.warm().filter(|w| w.colour == colour) {
        return Some(warm.release.version.clone());
    }
    if let Phase::Watching { rollback_to, .. } = &state.phase {
        if rollback_to.colour == colour {
            return Some(rollback_to.release.version.clone());
        }
    }
    provisioned(state)
        .filter(|d| d.colour == colour)
        .map(|d| d.release.version.clone())
}

/// The deployment in progress once its instances may run: not while its schema change runs
/// (the leader starts its own only after it, and so do the other nodes).
fn provisioned(state: &State) -> Option<&crate::lifecycle::Deployment> {
    match state.phase {
        Phase::Migrating { .. } => None,
        _ => state.in_progress(),
    }
}

/// Applies each new route state as etcd commits it, for as long as the daemon runs. A broken
/// watch is opened again (from a fresh read of every state) after a short pause; meanwhile the
/// table keeps the last revision applied.
pub(super) async fn follow(shared: Arc<Shared>, node: Arc<FleetNode>) {
    loop {
        let Some(membership) = node.membership() else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let opened = async {
            let (states, at) = membership.route_states().await?;
            for rs in states {
                apply_one(&shared, &node, rs, false).await;
            }
            Ok::<i64, FleetError>(at)
        }
        .await;
        let at = match opened {
            Ok(at) => at,
            Err(e) => {
                if node.connected.swap(false, Ordering::SeqCst) {
                    tracing::error!(error = %e, "lost etcd: serving the last route revision applied until it returns");
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
        };
        if !node.connected.swap(true, Ordering::SeqCst) {
            tracing::info!("following the fleet's route states from etcd revision {at}");
        }
        let (tx, mut rx) = mpsc::unbounded_channel();
        let watch = {
            let membership = membership.clone();
            tokio::spawn(async move { membership.watch_route_states(at, &tx).await })
        };
        while let Some(first) = rx.recv().await {
            // A node that falls behind (stopped, or slow to apply) goes straight to the latest
            // revision of each service, never through the ones in between: a switch rolled back
            // meanwhile is not served on the way.
            let mut latest = BTreeMap::new();
            latest.insert(first.service.clone(), first);
            while let Ok(rs) = rx.try_recv() {
                latest.insert(rs.service.clone(), rs);
            }
            for rs in latest.into_values() {
                apply_one(&shared, &node, rs, true).await;
            }
        }
        let why = watch.await.map(|e| e.to_string()).unwrap_or_else(|e| e.to_string());
        node.connected.store(false, Ordering::SeqCst);
        tracing::warn!(error = %why, "the watch of the route states broke; serving the last revision applied, opening it again");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn apply_one(shared: &Arc<Shared>, node: &Arc<FleetNode>, rs: RouteState, drain: bool) {
    let Some(svc) = shared.config.services.iter().find(|s| escape(&s.name) == rs.service) else {
        return; // a service this node's config does not have
    };
    let already = node
        .applied
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&svc.name)
        .copied();
    if already.is_some_and(|a| a >= rs.revision) {
        return;
    }
    match serde_json::from_slice::<State>(&rs.value) {
        Ok(state) => apply(shared, node, svc, &state, rs.revision, drain).await,
        Err(e) => {
            tracing::error!(service = %svc.name, error = %e, "cannot read route revision {}; keeping the last one applied", rs.revision)
        }
    }
}

/// Campaigns for the fleet's leadership, and while this node leads, runs the services' actors
/// (in `actors`). A leader whose lease is lost (etcd did not hear from it within its time to
/// live, so another node may lead already) stops its actors at once, becomes a follower again,
/// and campaigns anew once it has joined again ([`keep_membership`]).
pub(super) async fn lead(daemon: Daemon, node: Arc<FleetNode>) {
    let (shared, actors) = (daemon.shared.clone(), daemon.actors.clone());
    // Keep the leader's name current for the refusals of commands.
    {
        let node = node.clone();
        tokio::spawn(async move {
            loop {
                if let Some(membership) = node.membership() {
                    if let Ok(leader) = membership.leader().await {
                        *node.leader.lock().unwrap_or_else(|p| p.into_inner()) = leader;
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
    }
    loop {
        let membership = current(&node).await;
        match membership.campaign().await {
            Ok(()) => {}
            Err(FleetError::LeaseLost { .. }) => {
                // `keep_membership` joins again; campaign with the new membership.
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "campaigning for the fleet's leadership failed; trying again");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        }
        node.leading.store(true, Ordering::SeqCst);
        node.stop_checks();
        // The instances this node ran as a follower are left running and recorded: its actors
        // adopt them.
        node.end_runs(AtShutdown::Leave).await;
        *node.leader.lock().unwrap_or_else(|p| p.into_inner()) = Some(node.config.node.clone());
        tracing::info!(node = %node.config.node, "this node leads the fleet");
        // Its notices, for the other nodes to repeat: queued from now on, sent in order.
        let publishing = {
            let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
            *node.publisher.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
            let membership = membership.clone();
            tokio::spawn(async move {
                while let Some(json) = rx.recv().await {
                    if let Err(e) = membership.publish_notice(json).await {
                        tracing::debug!(error = %e, "a notice was not published to the other nodes");
                    }
                }
            })
        };
        for svc in shared.config.services.clone() {
            match super::start_actor(&shared, &svc).await {
                Ok(tx) => {
                    actors
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(svc.name.clone(), tx);
                }
                Err(e) => tracing::error!(service = %svc.name, error = %e, "cannot start the control of the service"),
            }
        }
        let commands = tokio::spawn(serve_commands(daemon.clone(), membership.clone()));
        membership.lost().await;
        tracing::error!(
            node = %node.config.node,
            "this node no longer leads the fleet (its lease was lost): stopping its deployments; the node that leads next recovers them"
        );
        commands.abort();
        node.publisher.lock().unwrap_or_else(|p| p.into_inner()).take();
        publishing.abort();
        abdicate(&shared, &node, &actors).await;
    }
}

/// Carries out the commands other nodes forward (see `crate::fleet::relay`), for as long as
/// this node leads: those waiting when it began to lead, then each one as it comes.
async fn serve_commands(daemon: Daemon, membership: Arc<Membership>) {
    loop {
        let (waiting, at) = match membership.pending_commands().await {
            Ok(read) => read,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the commands other nodes forward; trying again");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        for c in waiting {
            let _ = tx.send(c);
        }
        let watch = {
            let membership = membership.clone();
            tokio::spawn(async move { membership.watch_commands(at, &tx).await })
        };
        while let Some(c) = rx.recv().await {
            tokio::spawn(carry_out(daemon.clone(), membership.clone(), c));
        }
        let why = watch.await.map(|e| e.to_string()).unwrap_or_else(|e| e.to_string());
        tracing::warn!(error = %why, "the watch of forwarded commands broke; opening it again");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Carries out one forwarded command, unless a leader took it already, and answers it.
async fn carry_out(daemon: Daemon, membership: Arc<Membership>, c: Incoming) {
    match membership.claim(&c).await {
        Ok(true) => {}
        Ok(false) => return,
        Err(e) => {
            tracing::warn!(command = %c.id, error = %e, "cannot take a forwarded command; its sender is told it had no answer");
            return;
        }
    }
    let f = &c.forwarded;
    let actor = format!("{} (via node {})", f.actor, f.from);
    let result: Result<Done, CommandError> = match &f.command {
        Command::Deploy { version, upstreams } => {
            let addrs: Result<Vec<std::net::SocketAddr>, _> = upstreams.iter().map(|u| u.parse()).collect();
            match addrs {
                Ok(addrs) => daemon
                    .deploy_here(&f.service, version, addrs, &actor)
                    .await
                    .map(|id| Done {
                        deployment: Some(id),
                        rollback: None,
                        fleet: None,
                    }),
                Err(e) => Err(CommandError::BadRequest(format!(
                    "an upstream of the forwarded deploy is not HOST:PORT: {e}"
                ))),
            }
        }
        Command::Promote => daemon.promote_here(&f.service, &actor).await.map(|()| Done::default()),
        Command::Abort => daemon.abort_here(&f.service, &actor).await.map(|()| Done::default()),
        Command::Rollback => daemon.rollback_here(&f.service, &actor).await.map(|r| Done {
            deployment: r.deployment,
            rollback: Some(r.kind),
            fleet: r.fleet,
        }),
    };
    let answer = Answer {
        leader: membership.node().to_string(),
        result: result.map_err(|e| (e.http_status(), e.to_string())),
    };
    if let Err(e) = membership.answer(&c, &answer).await {
        tracing::warn!(command = %c.id, error = %e, "cannot answer a forwarded command");
    }
}

/// Repeats the notices the leader publishes on this node's event stream, so that `cutover
/// deploy` and the dashboard sent to any node follow a deployment.
pub(super) async fn mirror_notices(shared: Arc<Shared>, node: Arc<FleetNode>) {
    loop {
        let membership = current(&node).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let watch = {
            let membership = membership.clone();
            tokio::spawn(async move { membership.watch_notices(&tx).await })
        };
        while let Some((from, json)) = rx.recv().await {
            if node.leading() {
                continue; // a notice of a leader before this one: this node makes its own now
            }
            match serde_json::from_slice::<crate::events::Notice>(&json) {
                Ok(mut notice) => {
                    notice.from = Some(from);
                    shared.repeat(notice);
                }
                Err(e) => tracing::debug!(error = %e, "a notice of node {from} cannot be read"),
            }
        }
        let why = watch.await.map(|e| e.to_string()).unwrap_or_else(|e| e.to_string());
        tracing::debug!(error = %why, "the watch of the leader's notices broke; opening it again");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Stops leading: commands are refused from now on, the actors stop (leaving what runs as it
/// is; the next leader recovers their deployments from the committed state), and the route
/// table follows the committed states again.
async fn abdicate(shared: &Arc<Shared>, node: &Arc<FleetNode>, actors: &Actors) {
    let stopping: Vec<_> = std::mem::take(&mut *actors.write().unwrap_or_else(|p| p.into_inner()))
        .into_values()
        .collect();
    *node.leader.lock().unwrap_or_else(|p| p.into_inner()) = None;
    for tx in stopping {
        let (reply, rx) = tokio::sync::oneshot::channel();
        if tx
            .send(Msg::Shutdown {
                instances: super::AtShutdown::Leave,
                reply,
            })
            .await
            .is_ok()
        {
            let _ = rx.await;
        }
    }
    node.leading.store(false, Ordering::SeqCst);
    // What the actors last did to the table may not be what was committed (a commit of theirs
    // may have failed against the next leader's): every state is applied again.
    node.applied.lock().unwrap_or_else(|p| p.into_inner()).clear();
    if let Some(membership) = node.membership() {
        match membership.route_states().await {
            Ok((states, _)) => {
                for rs in states {
                    apply_one(shared, node, rs, true).await;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the route states after leading; the watch applies them when etcd answers")
            }
        }
    }
}

/// The node's membership once it has one that is not lost.
async fn current(node: &FleetNode) -> Arc<Membership> {
    loop {
        if let Some(m) = node.membership().filter(|m| !m.is_lost()) {
            return m;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Joins the fleet again whenever the node's lease is lost (etcd unreachable for longer than
/// the lease's life, or the process stopped that long), and acknowledges again what it applies:
/// acknowledgements lived under the old lease. Until then the node serves what it applied.
pub(super) async fn keep_membership(node: Arc<FleetNode>) {
    loop {
        let membership = current(&node).await;
        membership.lost().await;
        tracing::error!(node = %node.config.node, "this node's fleet lease was lost; joining the fleet again");
        let mut pause = Duration::from_millis(250);
        let joined = loop {
            match Membership::join(&node.options, &node.config.node, node.config.lease_ttl).await {
                Ok(m) => break Arc::new(m),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot join the fleet again yet; serving the last revision applied");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
            }
        };
        *node.membership.lock().unwrap_or_else(|p| p.into_inner()) = Some(joined.clone());
        tracing::info!(node = %node.config.node, "joined the fleet again");
        node.acknowledge_again();
    }
}
