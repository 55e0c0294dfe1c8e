//! The instances a node of a fleet runs itself while it follows (process driver): every node
//! runs its own `instances` of each release and routes to its own, as apps and proxy share each
//! host.
//!
//! Each (service, colour) has a lane here, a task that makes what runs match what the route
//! state says runs on that colour ([`Desired`]): the release of the live colour, of the warm or
//! the rollback colour, or of the deployment in progress. A different release (or a new
//! deployment of the same one) stops what runs first, after the colour's drain; a release that
//! is already recorded in this host's store (left running by this node's previous daemon, or by
//! its own actor when it stopped leading) is adopted rather than started again.
//!
//! For the deployment in progress on its colour, a lane reports to the leader through etcd
//! ([`crate::fleet::Membership::report_ready`]) once every instance is healthy here and the
//! smoke test passed against this node's preview route, or why they failed (a start that
//! failed, a crash loop, a failed smoke test). The leader moves the deployment on only when
//! every member's instances are ready (see `Actor::await_fleet_ready`).
//!
//! A node that begins to lead ends its lanes leaving the instances running and recorded: its
//! actors adopt them, as a daemon's start does. A daemon that stops ends them as told
//! ([`AtShutdown`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cutover_proxy::Colour;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::fleet_node::FleetNode;
use super::{
    crash_report, instance_spec, passing_now, record_instances, recorded_instances, set_pool, AtShutdown, EventKind,
    Shared,
};
use crate::config::{Driver, ServiceConfig};
use crate::fleet::Readiness;
use crate::health::{CheckSpec, HealthChecker, HealthSnapshot};
use crate::lifecycle::{DeploymentId, Release};
use crate::process::{InstanceInfo, ProcessGroup, Recorded};
use crate::store::etcd::escape;

/// What should run on one colour of a service on this node, as the route state says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Desired {
    /// The release on the colour; `None`: nothing runs there.
    pub release: Option<Release>,
    /// The deployment in progress on the colour, whose readiness this node reports.
    pub deployment: Option<DeploymentId>,
    /// Counts the switches away from the colour: each one drains it (before anything of it
    /// stops).
    pub drains: u64,
}

/// A lane: what it is told, how it is ended, and its task.
pub(super) struct Lane {
    desired: watch::Sender<Desired>,
    end: watch::Sender<Option<AtShutdown>>,
    /// Whether the lane has made what runs match the first [`Desired`] it was given, and what
    /// runs serves (or failed to).
    settled: watch::Receiver<bool>,
    task: JoinHandle<()>,
}

impl Lane {
    pub(super) fn start(
        shared: Arc<Shared>,
        node: Arc<FleetNode>,
        svc: ServiceConfig,
        colour: Colour,
        desired: Desired,
    ) -> Lane {
        let (desired_tx, desired_rx) = watch::channel(desired);
        let (end_tx, end_rx) = watch::channel(None);
        let (settled_tx, settled) = watch::channel(false);
        let task = tokio::spawn(
            Runner {
                shared,
                node,
                svc,
                colour,
                run: None,
                last_run: 0,
                draining: None,
                drains_seen: 0,
                events: mpsc::unbounded_channel(),
                settled: settled_tx,
            }
            .run(desired_rx, end_rx),
        );
        Lane {
            desired: desired_tx,
            end: end_tx,
            settled,
            task,
        }
    }

    /// Tells the lane what should run now; `switched_away`: live traffic just left the colour.
    pub(super) fn set(&self, release: Option<Release>, deployment: Option<DeploymentId>, switched_away: bool) {
        self.desired.send_if_modified(|d| {
            let changed = d.release != release || d.deployment != deployment || switched_away;
            d.release = release;
            d.deployment = deployment;
            if switched_away {
                d.drains += 1;
            }
            changed
        });
    }

    /// Whether the lane has made what runs match what it was first told.
    pub(super) fn settled_receiver(&self) -> watch::Receiver<bool> {
        self.settled.clone()
    }

    /// Ends the lane: its instances are left running and recorded, or stopped.
    pub(super) async fn end(self, at: AtShutdown) {
        self.end.send_replace(Some(at));
        let _ = self.task.await;
    }
}

/// What the lane's own tasks tell it, about the run `run`.
enum LaneEvent {
    Instances { run: u64, instances: Vec<InstanceInfo> },
    Health { run: u64, snapshot: HealthSnapshot },
    Smoke { run: u64, result: Result<(), String> },
}

/// One release running on the colour.
struct LaneRun {
    id: u64,
    release: Release,
    /// The deployment it was started for, if it was started (or adopted) while one was in progress.
    deployment: Option<DeploymentId>,
    group: ProcessGroup,
    health: HealthChecker,
    addrs: Vec<SocketAddr>,
    recorded: Vec<Recorded>,
    tasks: [JoinHandle<()>; 2],
    /// Whether its readiness was reported (or its smoke test is running).
    reported: bool,
    smoke: Option<JoinHandle<()>>,
}

impl LaneRun {
    fn stop_tasks(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Some(s) = self.smoke.take() {
            s.abort();
        }
    }
}

struct Runner {
    shared: Arc<Shared>,
    node: Arc<FleetNode>,
    svc: ServiceConfig,
    colour: Colour,
    run: Option<LaneRun>,
    last_run: u64,
    /// The colour's drain after live traffic left it, while it runs.
    draining: Option<JoinHandle<()>>,
    drains_seen: u64,
    events: (mpsc::UnboundedSender<LaneEvent>, mpsc::UnboundedReceiver<LaneEvent>),
    /// Set once the first release it was told of serves here (or nothing is to run, or it
    /// failed): a node that starts accepts connections after that.
    settled: watch::Sender<bool>,
}

impl Runner {
    fn name(&self) -> &str {
        &self.svc.name
    }

    async fn run(mut self, mut desired: watch::Receiver<Desired>, mut end: watch::Receiver<Option<AtShutdown>>) {
        loop {
            let want = desired.borrow_and_update().clone();
            self.reconcile(want).await;
            if self.run.is_none() {
                self.settled.send_replace(true);
            }
            loop {
                tokio::select! {
                    biased;
                    _ = end.changed() => {
                        let at = (*end.borrow()).unwrap_or(AtShutdown::Leave);
                        self.finish(at).await;
                        return;
                    }
                    changed = desired.changed() => {
                        if changed.is_err() {
                            self.finish(AtShutdown::Leave).await;
                            return;
                        }
                        break;
                    }
                    Some(event) = self.events.1.recv() => self.event(event).await,
                }
            }
        }
    }

    /// Makes what runs on the colour match `want`.
    async fn reconcile(&mut self, want: Desired) {
        if want.drains != self.drains_seen {
            self.drains_seen = want.drains;
            let (shared, name, colour) = (self.shared.clone(), self.name().to_string(), self.colour);
            let (timeout, window) = (self.svc.drain_timeout, self.svc.close_window);
            let earlier = self.draining.take();
            self.draining = Some(tokio::spawn(async move {
                if let Some(earlier) = earlier {
                    let _ = earlier.await;
                }
                super::drain(&shared, &name, colour, timeout, window).await;
            }));
        }
        let replace = self.run.as_ref().is_some_and(|r| {
            want.release.as_ref() != Some(&r.release) || (want.deployment.is_some() && want.deployment != r.deployment)
        });
        if replace {
            self.stop_run().await;
        }
        if self.run.is_none() {
            if let Some(release) = want.release {
                self.start_run(release, want.deployment).await;
            }
        }
        self.check_ready();
    }

    /// Stops what runs, once the colour's drain is over: out of the route table, then the
    /// processes, then their records.
    async fn stop_run(&mut self) {
        let Some(mut run) = self.run.take() else { return };
        if let Some(draining) = self.draining.take() {
            let _ = draining.await;
        }
        run.stop_tasks();
        set_pool(&self.shared.proxy, self.name(), self.colour, None, &[], None, &[]);
        run.health.stop().await;
        if let Err(e) = run.group.stop().await {
            tracing::error!(service = self.name(), colour = %self.colour, error = %e, "instances did not stop");
        }
        let (local, name, colour) = (self.shared.local.clone(), self.name().to_string(), self.colour);
        if let Err(e) = super::off_async_store(move || local.remove_instances(&name, colour)).await {
            tracing::warn!(service = self.name(), error = %e, "cannot forget the stopped instances");
        }
        self.shared.notice(
            self.name(),
            None,
            EventKind::Instances,
            format!(
                "{} ({}) stopped on node {}",
                self.colour, run.release, self.node.config.node
            ),
            None,
        );
    }

    /// Starts `release` on the colour (adopting what this host recorded of it), checks it, and
    /// routes to what the checks let in.
    async fn start_run(&mut self, release: Release, deployment: Option<DeploymentId>) {
        let Driver::Process { command, instances } = &self.svc.driver else {
            return;
        };
        let spec = instance_spec(&self.shared, self.name(), self.colour, &release, command, *instances);
        let recorded = recorded_instances(&self.shared, self.name(), self.colour, Some(&release)).await;
        let (group, report) = match ProcessGroup::adopt(spec, recorded).await {
            Ok(started) => started,
            Err(e) => {
                tracing::error!(service = self.name(), colour = %self.colour, error = %e, "cannot start the instances");
                if let Some(d) = deployment {
                    self.report(d, Some(format!("cannot start the instances: {e}")));
                }
                return;
            }
        };
        self.last_run += 1;
        let id = self.last_run;
        let mut rx = group.subscribe();
        let now = rx.borrow_and_update().clone();
        let recorded: Vec<Recorded> = now.iter().filter_map(InstanceInfo::recorded).collect();
        record_instances(&self.shared, self.name(), self.colour, &release, &recorded).await;
        let addrs: Vec<SocketAddr> = now.iter().map(InstanceInfo::addr).collect();
        let events = self.events.0.clone();
        let follow = tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let instances = rx.borrow_and_update().clone();
                if events.send(LaneEvent::Instances { run: id, instances }).is_err() {
                    return;
                }
            }
        });
        let tls = self
            .shared
            .proxy
            .table()
            .service(self.name())
            .and_then(|s| s.upstream_tls.clone());
        let health = HealthChecker::start(CheckSpec {
            service: self.name().to_string(),
            colour: self.colour,
            instances: addrs.clone(),
            config: self.svc.health.clone(),
            tls: tls.clone(),
        });
        let mut hrx = health.subscribe();
        let events = self.events.0.clone();
        let forward = tokio::spawn(async move {
            loop {
                let snapshot = hrx.borrow_and_update().clone();
                if events.send(LaneEvent::Health { run: id, snapshot }).is_err() {
                    return;
                }
                if hrx.changed().await.is_err() {
                    return;
                }
            }
        });
        // Adopted instances that pass a check at once serve at once; new ones once healthy.
        let known_healthy = if report.adopted.is_empty() {
            Vec::new()
        } else {
            passing_now(&self.svc, tls, &addrs).await
        };
        set_pool(
            &self.shared.proxy,
            self.name(),
            self.colour,
            Some(&release.version),
            &addrs,
            None,
            &known_healthy,
        );
        if !known_healthy.is_empty() {
            self.settled.send_replace(true);
        }
        self.shared.notice(
            self.name(),
            deployment,
            EventKind::Instances,
            format!(
                "{} ({release}) on node {}: {} instances adopted, {} started",
                self.colour,
                self.node.config.node,
                report.adopted.len(),
                report.started.len()
            ),
            None,
        );
        self.run = Some(LaneRun {
            id,
            release,
            deployment,
            group,
            health,
            addrs,
            recorded,
            tasks: [follow, forward],
            reported: false,
            smoke: None,
        });
    }

    async fn event(&mut self, event: LaneEvent) {
        match event {
            LaneEvent::Health { run, snapshot } => {
                let Some(r) = self.run.as_ref().filter(|r| r.id == run) else {
                    return;
                };
                set_pool(
                    &self.shared.proxy,
                    self.name(),
                    self.colour,
                    Some(&r.release.version),
                    &r.addrs,
                    Some(&snapshot),
                    &[],
                );
                if snapshot.all_healthy() {
                    self.settled.send_replace(true);
                }
                self.check_ready();
            }
            LaneEvent::Instances { run, instances } => {
                let colour = self.colour;
                let Some(r) = self.run.as_mut().filter(|r| r.id == run) else {
                    return;
                };
                let addrs: Vec<SocketAddr> = instances.iter().map(InstanceInfo::addr).collect();
                if addrs != r.addrs {
                    r.health.set_instances(addrs.clone());
                    r.addrs = addrs.clone();
                    let snapshot = r.health.snapshot();
                    set_pool(
                        &self.shared.proxy,
                        &self.svc.name,
                        colour,
                        Some(&r.release.version),
                        &addrs,
                        Some(&snapshot),
                        &[],
                    );
                }
                let recorded: Vec<Recorded> = instances.iter().filter_map(InstanceInfo::recorded).collect();
                if recorded != r.recorded {
                    r.recorded = recorded.clone();
                    let release = r.release.clone();
                    record_instances(&self.shared, &self.svc.name, colour, &release, &recorded).await;
                }
                let Some(r) = self.run.as_mut() else { return };
                if let (Some(d), false) = (r.deployment, r.reported) {
                    if let Some(i) = instances.iter().find(|i| i.crash_looping()) {
                        r.reported = true;
                        let why = crash_report(r.group.spec(), i);
                        self.report(d, Some(why));
                    }
                }
            }
            LaneEvent::Smoke { run, result } => {
                let Some(r) = self.run.as_mut().filter(|r| r.id == run) else {
                    return;
                };
                r.smoke = None;
                let Some(d) = r.deployment else { return };
                self.report(d, result.err().map(|e| format!("smoke test: {e}")));
            }
        }
    }

    /// Once every instance of the deployment's release is healthy here: runs the smoke test
    /// against this node's preview route, whose result is this node's readiness.
    fn check_ready(&mut self) {
        let Some(r) = self.run.as_mut() else { return };
        if r.reported || r.deployment.is_none() || !r.health.snapshot().all_healthy() {
            return;
        }
        r.reported = true;
        let smoke = super::smoke_test(&self.shared, &self.svc, self.colour, &r.release.version, false);
        let (events, run) = (self.events.0.clone(), r.id);
        r.smoke = Some(tokio::spawn(async move {
            let result = smoke.await;
            let _ = events.send(LaneEvent::Smoke { run, result });
        }));
    }

    /// Tells the leader (through etcd, in the background) that this node's instances of
    /// `deployment` are ready, or why they failed.
    fn report(&self, deployment: DeploymentId, failed: Option<String>) {
        let ready = Readiness {
            deployment: deployment.0,
            failed,
        };
        match &ready.failed {
            None => {
                tracing::info!(service = self.name(), colour = %self.colour, %deployment, "instances ready on this node")
            }
            Some(why) => {
                tracing::warn!(service = self.name(), colour = %self.colour, %deployment, "instances failed on this node: {why}")
            }
        }
        let (node, service) = (self.node.clone(), escape(self.name()));
        tokio::spawn(async move {
            // Bounded: a node that stays out of the fleet this long is past any health deadline.
            for _ in 0..150 {
                if let Some(m) = node.membership().filter(|m| !m.is_lost()) {
                    match m.report_ready(&service, &ready).await {
                        Ok(()) => return,
                        Err(e) => tracing::warn!(error = %e, "cannot report readiness; trying again"),
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
    }

    /// The lane ends: what runs is left running and recorded (`Leave`), or stopped.
    async fn finish(&mut self, at: AtShutdown) {
        match at {
            AtShutdown::Stop => self.stop_run().await,
            AtShutdown::Leave => {
                if let Some(draining) = self.draining.take() {
                    draining.abort();
                }
                let Some(mut run) = self.run.take() else { return };
                run.stop_tasks();
                run.health.stop().await;
                let recorded = run.group.detach().await;
                record_instances(&self.shared, self.name(), self.colour, &run.release, &recorded).await;
            }
        }
    }
}
