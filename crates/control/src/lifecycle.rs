//! The deployment lifecycle of one service as an explicit, pure state machine.
//!
//! This module owns every decision of a release: which colour a new version goes to, when it may
//! see users, when traffic goes back, when the old colour is retired, and what a restart after a
//! crash resumes. It never carries those decisions out: no I/O, no clock, no sockets, no async.
//! [`State::step`] maps (state, [`Event`]) to a [`Transition`]: the next state and the [`Action`]s
//! the daemon's driver executes. Time enters only through events that the driver raises from the
//! timers it was asked to arm ([`Action::ArmTimer`]) and through data carried by events.
//!
//! ```text
//! Stable(live blue@v1) --Deploy v2--> Provisioning(green@v2) --InstancesHealthy--> Validating
//!   --SmokePassed--> ReadyToPromote --Promote / AutoPromoteDue--> Watching(live green@v2)
//!   --WatchWindowElapsed--> Stable(live green@v2, blue@v1 warm) --KeepWarmElapsed--> Stable
//! any failure before the switch          --> Stable, live untouched, outcome Aborted
//! watch failure or rollback while warm   --> Stable(live blue@v1), outcome RolledBack
//! ```
//!
//! # How the driver uses it
//! 1. An event arrives: a user command (deploy, promote, abort, rollback), a report of the driver
//!    (instances healthy, smoke result, watch sample) or one of the timers it armed.
//! 2. `state.step(event)`. An `Err` changed nothing: show it to the user, or, for
//!    [`ErrorKind::Stale`], log it and carry on (a late report of a finished step).
//! 3. On `Ok(transition)`: commit `transition.state` together with its [`Action::Record`]s in one
//!    store transaction, *then* execute the other actions in order. Actions on one colour finish
//!    in order (a [`Action::Drain`] waits for in-flight requests up to `drain_timeout`, then the
//!    [`Action::StopInstances`] after it runs, and only then an [`Action::StartInstances`] on that
//!    colour and the actions after it); the driver may carry out drains and stops in the
//!    background meanwhile, so that events keep being handled. Events of one service are handled
//!    one at a time.
//! 4. After a restart (even `kill -9`): load the last committed state and run [`State::recover`],
//!    then commit and execute as in 3.
//!
//! Committing before executing is what makes crash recovery simple: the proxy lives in the same
//! process, so a crash loses the route table too, and after a restart live traffic goes exactly
//! where the committed `live` says. `live` only ever names a colour whose instances became healthy
//! and then passed the smoke command, so a crash can never leave users on an unvalidated colour.

use std::fmt;
use std::time::Duration;

use cutover_proxy::Colour;
use serde::{Deserialize, Serialize};

/// A version of the service, as the user named it on `cutover deploy --version`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Release {
    pub version: String,
}

impl Release {
    pub fn new(version: impl Into<String>) -> Release {
        Release {
            version: version.into(),
        }
    }
}

impl fmt::Display for Release {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.version)
    }
}

/// Identifies one deployment. The store allocates them; for one service they only ever increase,
/// which is what lets a late timer or report of an earlier deployment be told apart and refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DeploymentId(pub u64);

impl fmt::Display for DeploymentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A colour serving a release: where live traffic goes, or a warm colour it can go back to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Live {
    #[serde(rename = "colour", with = "crate::wire::colour")]
    pub colour: Colour,
    #[serde(rename = "release")]
    pub release: Release,
}

impl fmt::Display for Live {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.colour, self.release)
    }
}

/// How a validated deployment gets promoted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind")]
pub enum Promotion {
    /// Wait for `cutover promote`.
    #[serde(rename = "manual")]
    Manual,
    /// Promote once validated: at once when `delay` is zero, otherwise when the
    /// [`Timer::AutoPromote`] fires (an operator may still promote earlier or abort meanwhile).
    #[serde(rename = "auto")]
    Auto {
        #[serde(rename = "delay_ns", with = "crate::wire::nanos")]
        delay: Duration,
    },
}

/// The thresholds of the post-promotion watch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WatchPolicy {
    /// How long the new colour is watched before the deployment counts as done.
    #[serde(rename = "duration_ns", with = "crate::wire::nanos")]
    pub duration: Duration,
    /// Error rate and latency are judged only once the new colour served this many requests
    /// since the switch: a handful of requests says nothing about a rate.
    #[serde(rename = "min_requests")]
    pub min_requests: u64,
    /// Highest tolerated share of failed requests (0.01 = 1 %).
    #[serde(rename = "max_error_rate", with = "crate::wire::finite")]
    pub max_error_rate: f64,
    /// Highest tolerated p99 latency; `None` disables the latency check. Judged against the
    /// proxy's estimate of the p99, which errs only when the true p99 is within 6.25 % of this
    /// (9.4 % below 250 µs, 6.25 µs below 100 µs); see [`cutover_proxy::StatsSnapshot::quantile`].
    #[serde(rename = "max_p99_ns", with = "crate::wire::opt_nanos")]
    pub max_p99: Option<Duration>,
}

/// The settings a deployment runs with, snapshotted from the service's configuration when the
/// deployment starts: reloading the configuration does not change a deployment in progress.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Instances must be healthy this long after the start, or the deployment aborts.
    #[serde(rename = "health_deadline_ns", with = "crate::wire::nanos")]
    pub health_deadline: Duration,
    #[serde(rename = "promote")]
    pub promote: Promotion,
    #[serde(rename = "watch")]
    pub watch: WatchPolicy,
    /// How long the previous colour stays running after a successful watch, for instant
    /// rollback. Zero retires it as soon as the watch passes.
    #[serde(rename = "keep_warm_ns", with = "crate::wire::nanos")]
    pub keep_warm: Duration,
    /// Which schema-change commands the service has (`migrate`).
    #[serde(rename = "migrate", default, skip_serializing_if = "MigratePlan::is_none")]
    pub migrate: MigratePlan,
    /// A gradual switch (`promote.steps`); `None`: the single atomic switch.
    #[serde(rename = "gradual", default, skip_serializing_if = "Option::is_none")]
    pub gradual: Option<Gradual>,
}

/// The steps of a gradual switch: the share of live traffic on the new release at each one,
/// rising to 100, and how long each step before the last lasts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gradual {
    /// Percentages, rising; the last is 100 (the switch itself).
    #[serde(rename = "steps")]
    pub steps: Vec<u8>,
    #[serde(rename = "step_ns", with = "crate::wire::nanos")]
    pub step: Duration,
}

impl Gradual {
    /// The share of step `i`, 100 past the end.
    pub fn share(&self, i: usize) -> u8 {
        self.steps.get(i).copied().unwrap_or(100)
    }
}

/// Which of the service's schema-change commands a deployment runs (the commands themselves are
/// in the configuration). The live re-check after `expand` always runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigratePlan {
    /// `migrate.expand`, before the release's instances start.
    #[serde(rename = "expand", default)]
    pub expand: bool,
    /// `migrate.contract`, once the colour this release replaced is retired.
    #[serde(rename = "contract", default)]
    pub contract: bool,
    /// `migrate.rollback`, when the live re-check fails after `expand`.
    #[serde(rename = "rollback", default)]
    pub rollback: bool,
}

/// A step of a deployment's schema change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MigrationStep {
    /// The previous release's `contract`, run before this deployment's own steps (this
    /// deployment retired the colour that needed the old schema).
    #[serde(rename = "contract")]
    Contract,
    /// `expand`: the schema both releases work with.
    #[serde(rename = "expand")]
    Expand,
    /// The live release checked again after `expand` (`check`, or the smoke test against the
    /// live route).
    #[serde(rename = "check")]
    Check,
    /// `rollback`, after a failed check: the expand undone.
    #[serde(rename = "rollback")]
    Rollback,
}

impl MigratePlan {
    /// No schema-change step at all (what plans written before they existed read as).
    pub fn is_none(&self) -> bool {
        *self == MigratePlan::default()
    }
}

impl MigrationStep {
    pub fn as_str(&self) -> &'static str {
        match self {
            MigrationStep::Contract => "contract",
            MigrationStep::Expand => "expand",
            MigrationStep::Check => "check",
            MigrationStep::Rollback => "rollback",
        }
    }
}

impl fmt::Display for MigrationStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The contract step a live release still owes: its deployment had `migrate.contract`, and it
/// runs once the colour of the release before it is retired.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contract {
    /// The deployment that made `release` live.
    #[serde(rename = "id")]
    pub id: DeploymentId,
    #[serde(rename = "release")]
    pub release: Release,
    /// Whether it runs now (outside a deployment, after a retirement).
    #[serde(rename = "running")]
    pub running: bool,
}

/// Why a deployment exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Cause {
    /// `cutover deploy`.
    #[serde(rename = "deploy")]
    Deploy,
    /// `cutover rollback` after the previous colour was retired: the previous release is deployed
    /// again onto the idle colour. It is health-checked, validated and watched like any deployment,
    /// but promoted as soon as it is validated whatever the promote policy: the rollback command is
    /// itself the operator's go-ahead.
    #[serde(rename = "cold_rollback")]
    ColdRollback,
}

/// One deployment of a release onto the idle colour.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Deployment {
    #[serde(rename = "id")]
    pub id: DeploymentId,
    #[serde(rename = "release")]
    pub release: Release,
    /// The colour its instances run on: the one that is not live (blue for a service's first).
    #[serde(rename = "colour", with = "crate::wire::colour")]
    pub colour: Colour,
    #[serde(rename = "plan")]
    pub plan: Plan,
    #[serde(rename = "cause")]
    pub cause: Cause,
}

/// The previously live colour, still running after a successful watch so that a rollback is an
/// instant switch back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Warm {
    #[serde(rename = "colour", with = "crate::wire::colour")]
    pub colour: Colour,
    #[serde(rename = "release")]
    pub release: Release,
    /// The deployment whose promotion replaced it; its [`Event::KeepWarmElapsed`] retires it.
    #[serde(rename = "promoted_by")]
    pub promoted_by: DeploymentId,
    /// Kept so that recovery after a restart can arm the keep-warm timer again.
    #[serde(rename = "keep_warm_ns", with = "crate::wire::nanos")]
    pub keep_warm: Duration,
}

/// How the watch of a deployment that went live turned out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Watched {
    /// The service's first deployment: nothing was live before it, so there was nothing to compare
    /// against nor to roll back to; it went live as soon as it was validated.
    #[serde(rename = "skipped")]
    Skipped,
    /// At least `min_requests` were judged against the thresholds, and passed.
    #[serde(rename = "judged")]
    Judged,
    /// The window ended before the new colour served `min_requests`: only health was watched.
    /// It still goes live (a quiet service must be able to release); the record says so.
    #[serde(rename = "unjudged")]
    Unjudged,
}

/// Why a deployment was aborted or rolled back.
///
/// Encoded as `{"reason": code, "detail": ...}`: the message for the three with one, nanoseconds
/// for `health_deadline`, an object for `error_rate` and `latency`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reason", content = "detail")]
pub enum Reason {
    /// `cutover abort` or `cutover rollback`.
    #[serde(rename = "requested")]
    Requested,
    /// The driver could not start the instances (the message says why).
    #[serde(rename = "provision_failed")]
    ProvisionFailed(String),
    /// The instances were not healthy within the plan's `health_deadline`.
    #[serde(rename = "health_deadline")]
    HealthDeadline(#[serde(with = "crate::wire::nanos")] Duration),
    /// The smoke command failed (exit status, timeout, output tail), or the copies of live
    /// requests compared badly with the live ones (`validate.mirror`; the text begins with
    /// "mirroring").
    #[serde(rename = "smoke_failed")]
    SmokeFailed(String),
    /// The health checker reports no healthy instance of the colour.
    #[serde(rename = "unhealthy")]
    Unhealthy(String),
    /// Too many failed requests on the new colour during the watch.
    #[serde(rename = "error_rate")]
    ErrorRate {
        #[serde(rename = "errors")]
        errors: u64,
        #[serde(rename = "requests")]
        requests: u64,
        #[serde(rename = "max", with = "crate::wire::finite")]
        max: f64,
    },
    /// The new colour's p99 latency during the watch was above the maximum.
    #[serde(rename = "latency")]
    Latency {
        #[serde(rename = "p99_ns", with = "crate::wire::nanos")]
        p99: Duration,
        #[serde(rename = "max_ns", with = "crate::wire::nanos")]
        max: Duration,
    },
    /// In a fleet, nodes did not acknowledge the switch within `fleet.ack_timeout` (the text
    /// names them), with `on_missing_ack = "rollback"`.
    #[serde(rename = "not_acknowledged")]
    NotAcknowledged(String),
    /// A schema-change command (`migrate.expand`, or the previous release's `contract`) failed;
    /// the text says which, its exit status and its last output.
    #[serde(rename = "migration_failed")]
    MigrationFailed(String),
    /// After `expand`, the live release failed its check: the schema change broke it.
    #[serde(rename = "live_check_failed")]
    LiveCheckFailed(String),
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Requested => f.write_str("requested by the operator"),
            Reason::ProvisionFailed(why) => write!(f, "instances failed to start: {why}"),
            Reason::HealthDeadline(d) => write!(f, "instances not healthy within {d:?}"),
            Reason::SmokeFailed(why) => write!(f, "validation failed: {why}"),
            Reason::Unhealthy(why) => write!(f, "no healthy instance: {why}"),
            Reason::ErrorRate { errors, requests, max } => write!(
                f,
                "{errors} of {requests} requests failed, above the maximum error rate {max}"
            ),
            Reason::Latency { p99, max } => {
                write!(f, "p99 latency {p99:?} above the maximum {max:?}")
            }
            Reason::NotAcknowledged(why) => write!(f, "the switch was not applied by every node of the fleet: {why}"),
            Reason::MigrationFailed(why) => write!(f, "schema change failed: {why}"),
            Reason::LiveCheckFailed(why) => {
                write!(f, "the live release failed its check after the schema change: {why}")
            }
        }
    }
}

/// How a deployment ended.
///
/// Encoded as `{"outcome": code, "reason": {...}}`, the reason only for the two with one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", content = "reason")]
pub enum Outcome {
    /// It serves live traffic (its watch passed, or it was the first deployment).
    #[serde(rename = "went_live")]
    WentLive,
    /// Stopped before any user saw it; live traffic never moved.
    #[serde(rename = "aborted")]
    Aborted(Reason),
    /// Traffic went back to the previous colour; this deployment's colour was drained and stopped.
    #[serde(rename = "rolled_back")]
    RolledBack(Reason),
    /// cutover restarted while it was in progress, before promotion; its colour was stopped.
    #[serde(rename = "interrupted")]
    Interrupted,
}

/// The most recent deployment that ended, for `status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ended {
    #[serde(rename = "id")]
    pub id: DeploymentId,
    #[serde(rename = "release")]
    pub release: Release,
    #[serde(rename = "outcome")]
    pub outcome: Outcome,
}

/// Where the service is in its lifecycle. Each variant says what can happen next.
///
/// Encoded as an object tagged `"name"` (`stable`, `provisioning`, `validating`,
/// `ready_to_promote`, `watching`); the deployment of the three newtype phases is inlined.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name")]
pub enum Phase {
    /// The deployment's schema change runs (`migrate`), before any of its instances start:
    /// `step` is the command running now. Next: its `MigrationFinished` moves to the next step,
    /// then to `Provisioning`; a failure ends in `Stable`, live untouched, outcome Aborted.
    #[serde(rename = "migrating")]
    Migrating {
        #[serde(rename = "deployment")]
        deployment: Deployment,
        #[serde(rename = "step")]
        step: MigrationStep,
        /// While `step` is `Rollback`: why the deployment ends once it has run.
        #[serde(rename = "failure", default, skip_serializing_if = "Option::is_none")]
        failure: Option<Reason>,
    },
    /// No deployment in progress. Next: `Deploy` starts one (retiring the warm colour first, since
    /// the new release needs that colour); `Rollback` switches back to the warm colour at once, or
    /// without one redeploys the previous release (cold); `KeepWarmElapsed` retires the warm colour.
    #[serde(rename = "stable")]
    Stable {
        #[serde(rename = "warm")]
        warm: Option<Warm>,
        #[serde(rename = "last")]
        last: Option<Ended>,
    },
    /// The deployment's instances were started. Next: `InstancesHealthy` moves to `Validating`;
    /// `ProvisionFailed`, `HealthDeadlinePassed` or `Abort` stop them and end in `Stable`.
    #[serde(rename = "provisioning")]
    Provisioning(Deployment),
    /// The smoke command runs against the preview route. Next: `SmokePassed` makes a first
    /// deployment live at once, promotes (auto without delay, cold rollback) or moves to
    /// `ReadyToPromote`; `SmokeFailed`, `Unhealthy` or `Abort` stop it.
    #[serde(rename = "validating")]
    Validating(Deployment),
    /// Validated, waiting for `Promote` (manual) or `AutoPromoteDue` (auto with a delay); the
    /// switch then moves to `Watching`. `Unhealthy` or `Abort` stop it.
    #[serde(rename = "ready_to_promote")]
    ReadyToPromote(Deployment),
    /// Promoted: live traffic is on the deployment's colour; the previous colour still runs.
    /// Next: `WatchWindowElapsed` ends in `Stable` with the previous colour warm; a failing
    /// `WatchSample`, `Unhealthy` or `Rollback` switches back to `rollback_to` at once.
    ///
    /// During a gradual switch (`step` set) `live` is still `rollback_to`, and the deployment's
    /// colour takes the step's share of the live traffic; `PromoteStepDue` moves to the next
    /// step, and the last one (100 %) is the switch, after which the watch window runs as after
    /// any promotion. A failure rolls back at once from any step.
    #[serde(rename = "watching")]
    Watching {
        #[serde(rename = "deployment")]
        deployment: Deployment,
        /// What was live before the switch, still running: the instant way back.
        #[serde(rename = "rollback_to")]
        rollback_to: Live,
        /// Whether a sample with at least `min_requests` was judged (and passed) yet.
        #[serde(rename = "judged")]
        judged: bool,
        /// During a gradual switch: the step in progress (an index of the plan's
        /// [`Gradual::steps`], never the last). `None` once switched.
        #[serde(rename = "step", default, skip_serializing_if = "Option::is_none")]
        step: Option<usize>,
    },
}

impl Phase {
    /// The phase's name as the CLI shows it.
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Stable { .. } => "stable",
            Phase::Migrating { .. } => "migrating",
            Phase::Provisioning(_) => "provisioning",
            Phase::Validating(_) => "validating",
            Phase::ReadyToPromote(_) => "ready to promote",
            Phase::Watching { .. } => "watching",
        }
    }

    /// The deployment in progress, if any (there is at most one).
    pub fn deployment(&self) -> Option<&Deployment> {
        match self {
            Phase::Stable { .. } => None,
            Phase::Provisioning(d) | Phase::Validating(d) | Phase::ReadyToPromote(d) => Some(d),
            Phase::Watching { deployment, .. } | Phase::Migrating { deployment, .. } => Some(deployment),
        }
    }

    /// Position of a deployment's phase, to tell a late report (for a step already passed) from
    /// one that cannot be valid yet. Only asked while a deployment is in progress.
    fn order(&self) -> u8 {
        match self {
            Phase::Stable { .. } | Phase::Migrating { .. } | Phase::Provisioning(_) => 0,
            Phase::Validating(_) => 1,
            Phase::ReadyToPromote(_) => 2,
            Phase::Watching { .. } => 3,
        }
    }
}

/// What the proxy measured on the new colour since the switch (cumulative, not per interval).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WatchSample {
    pub requests: u64,
    /// Requests answered with a 5xx or failed upstream.
    pub errors: u64,
    /// `None` while there were no requests.
    pub p99: Option<Duration>,
}

/// Something that happened to the service. Driver reports and timers carry the deployment id they
/// belong to; one that is not the deployment in progress is refused as stale.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// `cutover deploy`: start a deployment of `release` with a fresh `id`.
    Deploy {
        id: DeploymentId,
        release: Release,
        plan: Plan,
    },
    /// Driver, after [`Action::StartInstances`]: the instances passed their health checks.
    InstancesHealthy { id: DeploymentId },
    /// Driver, after [`Action::StartInstances`]: the instances cannot be started.
    ProvisionFailed { id: DeploymentId, reason: String },
    /// Timer [`Timer::HealthDeadline`].
    HealthDeadlinePassed { id: DeploymentId },
    /// Driver, after [`Action::RunSmoke`]: the smoke command exited 0.
    /// `detail`: what validation saw beyond the smoke command (the figures of `validate.mirror`).
    SmokePassed { id: DeploymentId, detail: Option<String> },
    /// Driver, after [`Action::RunSmoke`]: the smoke command failed or timed out.
    SmokeFailed { id: DeploymentId, reason: String },
    /// Health checker: the deployment's colour has no healthy instance left (after it was healthy).
    Unhealthy { id: DeploymentId, reason: String },
    /// `cutover promote [--deployment ID]`.
    Promote { id: Option<DeploymentId> },
    /// Timer [`Timer::AutoPromote`].
    AutoPromoteDue { id: DeploymentId },
    /// Driver, periodically after [`Action::StartWatch`] (and once more just before the window
    /// ends): the new colour's counters since the switch.
    WatchSample { id: DeploymentId, sample: WatchSample },
    /// Timer [`Timer::WatchWindow`]: the watch window ended without a failure.
    WatchWindowElapsed { id: DeploymentId },
    /// Timer [`Timer::PromoteStep`]: a step of a gradual switch lasted its time, watched, without
    /// a failure: on to the next.
    PromoteStepDue { id: DeploymentId },
    /// Timer [`Timer::KeepWarm`]: `id` is the deployment whose promotion left the colour warm.
    KeepWarmElapsed { id: DeploymentId },
    /// In a fleet with `on_missing_ack = "rollback"`: nodes did not acknowledge the switch that
    /// made deployment `id` live (`nodes` names them). Rolls back at once to the warm colour, in
    /// the watch or after it.
    NotAcknowledged { id: DeploymentId, nodes: String },
    /// Driver, after [`Action::RunMigration`]: the command of `step` ended (`ok`: exit 0);
    /// `detail` says what ran, how it exited, how long it took and its last output.
    MigrationFinished {
        id: DeploymentId,
        step: MigrationStep,
        ok: bool,
        detail: String,
    },
    /// `cutover abort`.
    Abort,
    /// `cutover rollback`. `id` and `plan` are used only by a cold rollback, which is a new
    /// deployment of the previous release; an instant rollback ignores them.
    Rollback { id: DeploymentId, plan: Plan },
}

impl Event {
    /// The event's name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Event::Deploy { .. } => "deploy",
            Event::InstancesHealthy { .. } => "instances healthy",
            Event::ProvisionFailed { .. } => "provisioning failed",
            Event::HealthDeadlinePassed { .. } => "health deadline",
            Event::SmokePassed { .. } => "smoke passed",
            Event::SmokeFailed { .. } => "smoke failed",
            Event::Unhealthy { .. } => "unhealthy",
            Event::Promote { .. } => "promote",
            Event::AutoPromoteDue { .. } => "auto-promote timer",
            Event::WatchSample { .. } => "watch sample",
            Event::WatchWindowElapsed { .. } => "watch window end",
            Event::PromoteStepDue { .. } => "gradual switch step",
            Event::KeepWarmElapsed { .. } => "keep-warm timer",
            Event::NotAcknowledged { .. } => "not acknowledged",
            Event::MigrationFinished { .. } => "migration finished",
            Event::Abort => "abort",
            Event::Rollback { .. } => "rollback",
        }
    }
}

/// A timer the driver arms; when it fires, the driver raises the matching event with the
/// deployment id it was armed for. Timers are never cancelled: one that fires after its step is
/// over is refused as stale, which changes nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timer {
    /// Raises [`Event::HealthDeadlinePassed`].
    HealthDeadline,
    /// Raises [`Event::AutoPromoteDue`].
    AutoPromote,
    /// Raises [`Event::WatchWindowElapsed`].
    WatchWindow,
    /// Raises [`Event::KeepWarmElapsed`].
    KeepWarm,
    /// Raises [`Event::PromoteStepDue`].
    PromoteStep,
}

/// A [`Phase::name`]. An alias, so that serde's derive does not take the field for a string
/// borrowed from its input (the name is one of the phases' own `&'static str`s).
pub type PhaseName = &'static str;

/// An entry of the deployment history; the driver writes it in the same store transaction as the
/// state it came with. Encoded as an object tagged `"kind"` (`started`, `healthy`, ...,
/// `retired`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind")]
pub enum Record {
    #[serde(rename = "started")]
    Started {
        #[serde(rename = "id")]
        id: DeploymentId,
        #[serde(rename = "release")]
        release: Release,
        #[serde(rename = "colour", with = "crate::wire::colour")]
        colour: Colour,
        #[serde(rename = "cause")]
        cause: Cause,
    },
    #[serde(rename = "healthy")]
    Healthy {
        #[serde(rename = "id")]
        id: DeploymentId,
    },
    #[serde(rename = "validated")]
    Validated {
        #[serde(rename = "id")]
        id: DeploymentId,
        /// What validation saw beyond the smoke command (the figures of `validate.mirror`).
        #[serde(rename = "detail", default, skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
    },
    /// Waiting for `cutover promote` (`auto_after: None`) or for the auto-promote delay.
    #[serde(rename = "awaiting_promotion")]
    AwaitingPromotion {
        #[serde(rename = "id")]
        id: DeploymentId,
        #[serde(rename = "auto_after_ns", with = "crate::wire::opt_nanos")]
        auto_after: Option<Duration>,
    },
    /// Live traffic switched to `colour`; the watch started.
    #[serde(rename = "promoted")]
    Promoted {
        #[serde(rename = "id")]
        id: DeploymentId,
        #[serde(rename = "colour", with = "crate::wire::colour")]
        colour: Colour,
    },
    #[serde(rename = "went_live")]
    WentLive {
        #[serde(rename = "id")]
        id: DeploymentId,
        #[serde(rename = "live")]
        live: Live,
        #[serde(rename = "watch")]
        watch: Watched,
    },
    #[serde(rename = "aborted")]
    Aborted {
        #[serde(rename = "id")]
        id: DeploymentId,
        #[serde(rename = "reason")]
        reason: Reason,
    },
    /// Live traffic went back to `to` (always an instant switch; a cold rollback is recorded as a
    /// new deployment with [`Cause::ColdRollback`]).
    #[serde(rename = "rolled_back")]
    RolledBack {
        #[serde(rename = "id")]
        id: DeploymentId,
        #[serde(rename = "to")]
        to: Live,
        #[serde(rename = "reason")]
        reason: Reason,
    },
    /// cutover restarted while the deployment was in `phase`, before promotion.
    #[serde(rename = "interrupted")]
    Interrupted {
        #[serde(rename = "id")]
        id: DeploymentId,
        #[serde(rename = "phase", with = "crate::wire::phase_name")]
        phase: PhaseName,
    },
    /// cutover restarted while watching: the watch starts over with a full window.
    #[serde(rename = "watch_restarted")]
    WatchRestarted {
        #[serde(rename = "id")]
        id: DeploymentId,
    },
    /// A previously live colour was drained and stopped (keep-warm over, zero keep-warm, or a new
    /// deployment needed the colour).
    #[serde(rename = "retired")]
    Retired {
        #[serde(rename = "live")]
        live: Live,
    },
    /// A schema-change command of deployment `id` ran: which step, whether it exited 0, and
    /// what it said (command, exit status, duration, last output).
    #[serde(rename = "migration")]
    Migration {
        #[serde(rename = "id")]
        id: DeploymentId,
        #[serde(rename = "step")]
        step: MigrationStep,
        #[serde(rename = "ok")]
        ok: bool,
        #[serde(rename = "detail")]
        detail: String,
    },
}

/// Something the driver does. Within a transition they run in order; see the module's step 3 for
/// the drains and stops that may finish in the background.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Start the service's instances of `release` on `colour` and health-check them; report
    /// [`Event::InstancesHealthy`] or [`Event::ProvisionFailed`] for `deployment`.
    StartInstances {
        deployment: DeploymentId,
        colour: Colour,
        release: Release,
    },
    /// After a restart: take over the instances of `release` still running on `colour` and start
    /// any that are missing; health checks put them back in rotation. Raises no event.
    Adopt { colour: Colour, release: Release },
    /// Stop every instance on `colour` (SIGTERM, then SIGKILL after the grace period). Never
    /// issued for the live colour. Idempotent: nothing running is fine.
    StopInstances { colour: Colour },
    /// Wait until requests and upgraded connections still on `colour` finish, up to
    /// `drain_timeout`. Only issued for a colour that no longer receives new requests.
    Drain { colour: Colour },
    /// Run the smoke command against `colour`'s preview route; report [`Event::SmokePassed`] or
    /// [`Event::SmokeFailed`] for `deployment`.
    RunSmoke { deployment: DeploymentId, colour: Colour },
    /// Kill the smoke command of `deployment` if it still runs; its result no longer matters.
    CancelSmoke { deployment: DeploymentId },
    /// Install a route table whose active colour is `colour`: from now on every new request goes
    /// there (in-flight ones finish where they started). Ends a gradual switch's split.
    SwitchTo { colour: Colour },
    /// A step of a gradual switch: `percent` % of the live requests (of new sessions, with
    /// affinity) go to `colour` from now on, the rest to the live colour.
    Split { colour: Colour, percent: u8 },
    /// Start sampling `colour`'s counters from now on; raise [`Event::WatchSample`].
    StartWatch { deployment: DeploymentId, colour: Colour },
    /// Stop sampling for `deployment`.
    StopWatch { deployment: DeploymentId },
    /// Arm `timer` to fire `after` from now, for `deployment`.
    ArmTimer {
        deployment: DeploymentId,
        timer: Timer,
        after: Duration,
    },
    /// Run the service's schema-change command of `step` for `release` (deployment
    /// `deployment`); report [`Event::MigrationFinished`].
    RunMigration {
        deployment: DeploymentId,
        step: MigrationStep,
        release: Release,
    },
    /// Append to the history, atomically with the transition's state.
    Record(Record),
}

/// Which kind of rollback a `Rollback` event turned into (the CLI says which happened).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RollbackKind {
    /// Traffic switched back to the warm previous colour.
    Instant,
    /// The previous colour was retired: its release is being deployed again on the idle colour.
    Cold,
}

/// The result of an accepted event: the state to commit and the actions to execute after it.
#[derive(Clone, Debug, PartialEq)]
pub struct Transition {
    pub state: State,
    pub actions: Vec<Action>,
}

impl Transition {
    /// Whether this transition rolls back, and how.
    pub fn rollback_kind(&self) -> Option<RollbackKind> {
        self.actions.iter().find_map(|a| match a {
            Action::Record(Record::RolledBack { .. }) => Some(RollbackKind::Instant),
            Action::Record(Record::Started {
                cause: Cause::ColdRollback,
                ..
            }) => Some(RollbackKind::Cold),
            _ => None,
        })
    }

    /// The history entries of this transition.
    pub fn records(&self) -> impl Iterator<Item = &Record> {
        self.actions.iter().filter_map(|a| match a {
            Action::Record(r) => Some(r),
            _ => None,
        })
    }
}

/// Who should act on a refused event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Another deployment is in progress; retry once it is over (HTTP 409).
    Conflict,
    /// The operator asked for something the current state does not allow; the message says what
    /// to do instead. Not retryable as is.
    Refused,
    /// A late report or timer of a step or deployment that is over: log and ignore.
    Stale,
    /// The driver broke the protocol (a bug in cutover): log loudly.
    Internal,
}

/// Why an event was refused. The state is unchanged. Every message names the service, its current
/// state, and what to do.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum LifecycleError {
    #[error(
        "service {service}: deployment {id} ({version}) is already in progress ({phase}); \
         one deployment per service at a time: {hint}"
    )]
    Conflict {
        service: String,
        id: DeploymentId,
        version: String,
        phase: &'static str,
        hint: String,
    },
    #[error(
        "service {service}: deployment {id} ({version}) is still {phase} and cannot be promoted \
         yet; wait until it is ready to promote, or stop it with `cutover abort {service}`"
    )]
    NotReady {
        service: String,
        id: DeploymentId,
        version: String,
        phase: &'static str,
    },
    #[error(
        "service {service}: deployment {asked} is not awaiting promotion; deployment {awaiting} \
         ({version}) is: promote it with `cutover promote {service}`"
    )]
    NotAwaiting {
        service: String,
        asked: DeploymentId,
        awaiting: DeploymentId,
        version: String,
    },
    #[error(
        "service {service}: nothing awaits promotion ({status}); start one with \
         `cutover deploy {service} --version VERSION`"
    )]
    NothingToPromote { service: String, status: String },
    #[error("service {service}: nothing to abort ({status}); no deployment is in progress")]
    NothingToAbort { service: String, status: String },
    #[error(
        "service {service}: deployment {id} ({version}) was already promoted and live traffic is \
         on {colour}; abort only stops unpromoted deployments: use `cutover rollback {service}`"
    )]
    AlreadyPromoted {
        service: String,
        id: DeploymentId,
        version: String,
        colour: Colour,
    },
    #[error(
        "service {service}: deployment {id} ({version}) is {phase} and was not promoted, so \
         there is nothing to roll back yet ({status}); to stop it use `cutover abort {service}`"
    )]
    RollbackDuringDeployment {
        service: String,
        id: DeploymentId,
        version: String,
        phase: &'static str,
        status: String,
    },
    #[error(
        "service {service}: nothing to roll back to ({status}); deploy the version you want with \
         `cutover deploy {service} --version VERSION`"
    )]
    NothingToRollBack { service: String, status: String },
    #[error(
        "service {service}: ignored {event} of deployment {id}: it is not the deployment in \
         progress ({status}); nothing to do, it reports on a deployment that is over"
    )]
    Stale {
        service: String,
        event: &'static str,
        id: DeploymentId,
        status: String,
    },
    #[error(
        "service {service}: ignored {event} of deployment {id}: that step is over, the deployment \
         is {phase}; nothing to do"
    )]
    Late {
        service: String,
        event: &'static str,
        id: DeploymentId,
        phase: &'static str,
    },
    #[error(
        "service {service}: {event} of deployment {id} is not expected while it is {phase}; \
         this is a bug in cutover's driver, please report it"
    )]
    Unexpected {
        service: String,
        event: &'static str,
        id: DeploymentId,
        phase: &'static str,
    },
    #[error(
        "service {service}: the {step} step of deployment {id} ({version}) is running; a schema \
         change is never interrupted halfway: wait for it to finish (its result decides what \
         happens next)"
    )]
    MigrationRunning {
        service: String,
        id: DeploymentId,
        version: String,
        step: MigrationStep,
    },
    #[error(
        "service {service}: the contract step of {release} (deployment {id}) is running; wait \
         for it to finish, then try again"
    )]
    ContractRunning {
        service: String,
        id: DeploymentId,
        release: Release,
    },
    #[error(
        "service {service}: cannot roll back to {previous}: the contract step of {live} ran, so \
         the schema no longer has what {previous} needs, and {previous} is no longer warm. \
         Deploy a release that works with the contracted schema (`cutover deploy {service} \
         --version VERSION`), or restore the schema by hand first"
    )]
    Contracted {
        service: String,
        live: Release,
        previous: Release,
    },
    #[error(
        "service {service}: deployment id {id} is not newer than the last one ({last}); \
         deployment ids must increase (a bug in cutover's store, please report it)"
    )]
    ReusedId {
        service: String,
        id: DeploymentId,
        last: DeploymentId,
    },
}

impl LifecycleError {
    /// Who should act on it; see [`ErrorKind`].
    pub fn kind(&self) -> ErrorKind {
        match self {
            LifecycleError::Conflict { .. } => ErrorKind::Conflict,
            LifecycleError::NotReady { .. }
            | LifecycleError::NotAwaiting { .. }
            | LifecycleError::NothingToPromote { .. }
            | LifecycleError::NothingToAbort { .. }
            | LifecycleError::AlreadyPromoted { .. }
            | LifecycleError::RollbackDuringDeployment { .. }
            | LifecycleError::NothingToRollBack { .. }
            | LifecycleError::Contracted { .. } => ErrorKind::Refused,
            LifecycleError::MigrationRunning { .. } | LifecycleError::ContractRunning { .. } => ErrorKind::Conflict,
            LifecycleError::Stale { .. } | LifecycleError::Late { .. } => ErrorKind::Stale,
            LifecycleError::Unexpected { .. } | LifecycleError::ReusedId { .. } => ErrorKind::Internal,
        }
    }
}

/// The lifecycle state of one service: what is live, what it can roll back to, and the phase.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct State {
    #[serde(rename = "service")]
    pub service: String,
    /// Where live traffic goes: a colour whose instances became healthy and then passed the
    /// smoke command. `None` until the service's first deployment went live.
    #[serde(rename = "live")]
    pub live: Option<Live>,
    /// The release that was live before `live`: the target of a cold rollback. `None` when there
    /// was none, and after a rollback (the release rolled back from was rejected; older ones are in
    /// the store's history and can be deployed by name).
    #[serde(rename = "previous")]
    pub previous: Option<Release>,
    /// The highest deployment id this service has seen; a new deployment must bring a higher one,
    /// so a stale report of an old deployment can never be taken for the new one.
    #[serde(rename = "last_id")]
    pub last_id: Option<DeploymentId>,
    #[serde(rename = "phase")]
    pub phase: Phase,
    /// The contract step the live release still owes, if its deployment had one.
    #[serde(rename = "contract", default, skip_serializing_if = "Option::is_none")]
    pub contract: Option<Contract>,
    /// The live release whose contract step ran: the schema no longer serves the release before
    /// it, so a cold rollback to that one is refused.
    #[serde(rename = "contracted", default, skip_serializing_if = "Option::is_none")]
    pub contracted: Option<Release>,
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.service, self.status())
    }
}

impl State {
    /// A service that was never deployed.
    pub fn new(service: impl Into<String>) -> State {
        State {
            service: service.into(),
            live: None,
            previous: None,
            last_id: None,
            phase: Phase::Stable { warm: None, last: None },
            contract: None,
            contracted: None,
        }
    }

    /// The deployment in progress, if any.
    pub fn in_progress(&self) -> Option<&Deployment> {
        self.phase.deployment()
    }

    /// The previously live colour that still runs, i.e. what an instant rollback switches to.
    pub fn warm(&self) -> Option<Live> {
        match &self.phase {
            Phase::Stable { warm: Some(w), .. } => Some(Live {
                colour: w.colour,
                release: w.release.clone(),
            }),
            Phase::Watching { rollback_to, .. } => Some(rollback_to.clone()),
            _ => None,
        }
    }

    /// One line for status output and error messages, without the service name.
    pub fn status(&self) -> String {
        let live = match &self.live {
            Some(l) => format!("live {l}"),
            None => "nothing live".to_string(),
        };
        match &self.phase {
            Phase::Stable { warm: Some(w), .. } => {
                format!("stable, {live}, {}@{} warm", w.colour, w.release)
            }
            Phase::Stable { warm: None, .. } => format!("stable, {live}"),
            Phase::Watching {
                deployment: d,
                step: Some(step),
                ..
            } => {
                let g = d.plan.gradual.as_ref();
                format!(
                    "gradual switch of deployment {} ({}): {}% of live traffic on {}, step {} of {}, {live}",
                    d.id,
                    d.release,
                    g.map_or(100, |g| g.share(*step)),
                    d.colour,
                    step + 1,
                    g.map_or(1, |g| g.steps.len()),
                )
            }
            Phase::Watching {
                deployment: d,
                rollback_to,
                ..
            } => format!(
                "watching deployment {} ({}) on {}, {live}, {rollback_to} warm",
                d.id, d.release, d.colour
            ),
            phase @ (Phase::Provisioning(d) | Phase::Validating(d) | Phase::ReadyToPromote(d)) => {
                format!(
                    "{} deployment {} ({}) on {}, {live}",
                    phase.name(),
                    d.id,
                    d.release,
                    d.colour
                )
            }
            Phase::Migrating {
                deployment: d, step, ..
            } => format!(
                "migrating ({step}) for deployment {} ({}) on {}, {live}",
                d.id, d.release, d.colour
            ),
        }
    }

    /// Applies one event. `Err` means refused: the state is unchanged and the error says why.
    pub fn step(&self, event: Event) -> Result<Transition, LifecycleError> {
        // Reports and timers of a deployment go to `report` with the last phase (see
        // `Phase::order`) in which they mean something; after it they are late, not wrong.
        match event {
            Event::Deploy { id, release, plan } => self.deploy(id, release, plan, Cause::Deploy),
            Event::Promote { id } => self.promote_command(id),
            Event::Abort => self.abort(),
            Event::Rollback { id, plan } => self.rollback(id, plan),
            Event::KeepWarmElapsed { id } => self.keep_warm_elapsed(id),
            Event::NotAcknowledged { id, nodes } => self.not_acknowledged(id, nodes),
            Event::MigrationFinished { id, step, ok, detail } => self.migration_finished(id, step, ok, detail),
            Event::InstancesHealthy { id } | Event::ProvisionFailed { id, .. } | Event::HealthDeadlinePassed { id } => {
                self.report(id, 0, event)
            }
            Event::SmokePassed { id, .. } | Event::SmokeFailed { id, .. } => self.report(id, 1, event),
            Event::AutoPromoteDue { id } => self.report(id, 2, event),
            Event::Unhealthy { id, .. }
            | Event::WatchSample { id, .. }
            | Event::WatchWindowElapsed { id }
            | Event::PromoteStepDue { id } => self.report(id, 3, event),
        }
    }

    /// What to do after a restart, given the last committed state.
    ///
    /// - Live traffic goes where the committed `live` says; its instances are adopted.
    /// - A deployment interrupted before promotion is marked interrupted and its colour stopped;
    ///   live traffic never moved for it.
    /// - Interrupted while watching: the promoted colour stays live (it was healthy and validated,
    ///   and it is what was last committed) and the watch starts over with a full window, the
    ///   previous colour adopted and warm, so a failure still rolls back at once. Rolling back
    ///   blindly instead would move traffic to instances that may not have survived the crash.
    /// - A warm colour is adopted and its keep-warm timer armed again with the full duration: the
    ///   time already spent is unknown without a clock; the cost is at most one more `keep_warm`.
    /// - Every colour that is neither live, warm, nor in a deployment is stopped. This also
    ///   finishes a stop, drain or retirement that the crash cut short.
    pub fn recover(&self) -> Transition {
        match &self.phase {
            Phase::Stable { warm, .. } => {
                let mut state = self.clone();
                let mut actions = Vec::new();
                if let Some(c) = self.contract.as_ref().filter(|c| c.running) {
                    actions.push(Action::Record(Record::Migration {
                        id: c.id,
                        step: MigrationStep::Contract,
                        ok: false,
                        detail: INTERRUPTED_MIGRATION.to_string(),
                    }));
                    state.contract = None;
                }
                actions.extend(self.resting_actions(warm.as_ref()));
                Transition { state, actions }
            }
            Phase::Migrating {
                deployment: d, step, ..
            } => {
                let mut state = self.rest(Outcome::Interrupted, d);
                if *step == MigrationStep::Contract {
                    state.contract = None;
                }
                let mut actions = vec![
                    Action::Record(Record::Migration {
                        id: d.id,
                        step: *step,
                        ok: false,
                        detail: INTERRUPTED_MIGRATION.to_string(),
                    }),
                    Action::Record(Record::Interrupted {
                        id: d.id,
                        phase: self.phase.name(),
                    }),
                ];
                actions.extend(state.resting_actions(None));
                Transition { state, actions }
            }
            phase @ (Phase::Provisioning(d) | Phase::Validating(d) | Phase::ReadyToPromote(d)) => {
                let state = self.rest(Outcome::Interrupted, d);
                let mut actions = vec![Action::Record(Record::Interrupted {
                    id: d.id,
                    phase: phase.name(),
                })];
                actions.extend(state.resting_actions(None));
                Transition { state, actions }
            }
            Phase::Watching {
                deployment: d,
                rollback_to,
                step: Some(step),
                ..
            } => {
                // In a gradual switch: the step starts over, its share on the new colour again,
                // the rest on the live one.
                let gradual = d.plan.gradual.clone().unwrap_or(Gradual {
                    steps: Vec::new(),
                    step: Duration::ZERO,
                });
                let actions = vec![
                    Action::Record(Record::WatchRestarted { id: d.id }),
                    Action::Adopt {
                        colour: rollback_to.colour,
                        release: rollback_to.release.clone(),
                    },
                    Action::SwitchTo {
                        colour: rollback_to.colour,
                    },
                    Action::Adopt {
                        colour: d.colour,
                        release: d.release.clone(),
                    },
                    Action::Split {
                        colour: d.colour,
                        percent: gradual.share(*step),
                    },
                    Action::StartWatch {
                        deployment: d.id,
                        colour: d.colour,
                    },
                    Action::ArmTimer {
                        deployment: d.id,
                        timer: Timer::PromoteStep,
                        after: gradual.step,
                    },
                ];
                let state = State {
                    phase: Phase::Watching {
                        deployment: d.clone(),
                        rollback_to: rollback_to.clone(),
                        judged: false,
                        step: Some(*step),
                    },
                    ..self.clone()
                };
                Transition { state, actions }
            }
            Phase::Watching {
                deployment: d,
                rollback_to,
                ..
            } => {
                let actions = vec![
                    Action::Record(Record::WatchRestarted { id: d.id }),
                    Action::Adopt {
                        colour: d.colour,
                        release: d.release.clone(),
                    },
                    Action::SwitchTo { colour: d.colour },
                    Action::Adopt {
                        colour: rollback_to.colour,
                        release: rollback_to.release.clone(),
                    },
                    Action::StartWatch {
                        deployment: d.id,
                        colour: d.colour,
                    },
                    Action::ArmTimer {
                        deployment: d.id,
                        timer: Timer::WatchWindow,
                        after: d.plan.watch.duration,
                    },
                ];
                let state = State {
                    phase: Phase::Watching {
                        deployment: d.clone(),
                        rollback_to: rollback_to.clone(),
                        judged: false,
                        step: None,
                    },
                    ..self.clone()
                };
                Transition { state, actions }
            }
        }
    }

    /// Recovery actions for a state without deployment in progress.
    fn resting_actions(&self, warm: Option<&Warm>) -> Vec<Action> {
        let mut actions = Vec::new();
        if let Some(live) = &self.live {
            actions.push(Action::Adopt {
                colour: live.colour,
                release: live.release.clone(),
            });
            actions.push(Action::SwitchTo { colour: live.colour });
        }
        for colour in [Colour::Blue, Colour::Green] {
            if self.live.as_ref().is_some_and(|l| l.colour == colour) {
                continue;
            }
            match warm {
                Some(w) if w.colour == colour => {
                    actions.push(Action::Adopt {
                        colour,
                        release: w.release.clone(),
                    });
                    actions.push(Action::ArmTimer {
                        deployment: w.promoted_by,
                        timer: Timer::KeepWarm,
                        after: w.keep_warm,
                    });
                }
                _ => actions.push(Action::StopInstances { colour }),
            }
        }
        actions
    }

    fn deploy(
        &self,
        id: DeploymentId,
        release: Release,
        plan: Plan,
        cause: Cause,
    ) -> Result<Transition, LifecycleError> {
        if let Some(d) = self.phase.deployment() {
            return Err(self.conflict(d));
        }
        if let Some(c) = self.contract.as_ref().filter(|c| c.running) {
            return Err(LifecycleError::ContractRunning {
                service: self.service.clone(),
                id: c.id,
                release: c.release.clone(),
            });
        }
        let warm = match &self.phase {
            Phase::Stable { warm, .. } => warm.as_ref(),
            _ => None,
        };
        if let Some(last) = self.last_id {
            if id <= last {
                return Err(LifecycleError::ReusedId {
                    service: self.service.clone(),
                    id,
                    last,
                });
            }
        }
        let colour = match &self.live {
            Some(live) => live.colour.other(),
            None => Colour::Blue,
        };
        let mut actions = Vec::new();
        // The warm colour is the idle one, which the new release needs: retire it first. Rollback
        // to it is no longer instant from here on; the deployment may still be aborted without
        // touching live traffic.
        if let Some(w) = warm {
            actions.extend(retire(w));
        }
        actions.push(Action::Record(Record::Started {
            id,
            release: release.clone(),
            colour,
            cause,
        }));
        let d = Deployment {
            id,
            release,
            colour,
            plan,
            cause,
        };
        let mut state = State {
            last_id: Some(id),
            ..self.clone()
        };
        // A contract the live release owes runs first: this deployment retires the colour that
        // needed the old schema. A cold rollback returns to that release instead: its schema
        // must stay, so the contract is dropped.
        let first = match (&self.contract, cause) {
            (Some(_), Cause::ColdRollback) => {
                state.contract = None;
                None
            }
            (Some(_), Cause::Deploy) => Some(MigrationStep::Contract),
            (None, _) => None,
        };
        let first = first.or((d.plan.migrate.expand && cause == Cause::Deploy).then_some(MigrationStep::Expand));
        Ok(match first {
            Some(step) => state.migrate(d, step, None, actions),
            None => state.provision(d, actions),
        })
    }

    /// `d` moves to its schema-change `step` (`failure`: why it ends after a rollback step).
    fn migrate(
        &self,
        d: Deployment,
        step: MigrationStep,
        failure: Option<Reason>,
        mut actions: Vec<Action>,
    ) -> Transition {
        let release = match (step, &self.contract) {
            (MigrationStep::Contract, Some(c)) => c.release.clone(),
            _ => d.release.clone(),
        };
        actions.push(Action::RunMigration {
            deployment: d.id,
            step,
            release,
        });
        let state = State {
            phase: Phase::Migrating {
                deployment: d,
                step,
                failure,
            },
            ..self.clone()
        };
        Transition { state, actions }
    }

    /// `d`'s instances start on its colour.
    fn provision(&self, d: Deployment, mut actions: Vec<Action>) -> Transition {
        actions.push(Action::StartInstances {
            deployment: d.id,
            colour: d.colour,
            release: d.release.clone(),
        });
        actions.push(Action::ArmTimer {
            deployment: d.id,
            timer: Timer::HealthDeadline,
            after: d.plan.health_deadline,
        });
        let state = State {
            phase: Phase::Provisioning(d),
            ..self.clone()
        };
        Transition { state, actions }
    }

    /// A schema-change command ended: the deployment's next step, or its end; or, outside a
    /// deployment, the contract step after a retirement.
    fn migration_finished(
        &self,
        id: DeploymentId,
        step: MigrationStep,
        ok: bool,
        detail: String,
    ) -> Result<Transition, LifecycleError> {
        let record = Action::Record(Record::Migration {
            id,
            step,
            ok,
            detail: detail.clone(),
        });
        let (d, failure) = match &self.phase {
            Phase::Migrating {
                deployment,
                step: running,
                failure,
            } if deployment.id == id && *running == step => (deployment.clone(), failure.clone()),
            Phase::Stable { .. }
                if step == MigrationStep::Contract
                    && self.contract.as_ref().is_some_and(|c| c.running && c.id == id) =>
            {
                let state = State {
                    contracted: if ok {
                        self.live.as_ref().map(|l| l.release.clone())
                    } else {
                        self.contracted.clone()
                    },
                    contract: None,
                    ..self.clone()
                };
                return Ok(state_transition(state, vec![record]));
            }
            _ => return Err(self.stale("migration finished", id)),
        };
        let actions = vec![record];
        Ok(match (step, ok) {
            (MigrationStep::Contract, _) => {
                let owed = self.contract.as_ref().map(|c| c.release.clone());
                let state = State {
                    contracted: if ok { owed.clone() } else { self.contracted.clone() },
                    contract: None,
                    ..self.clone()
                };
                if !ok {
                    let release = owed.map(|r| r.to_string()).unwrap_or_default();
                    let reason = Reason::MigrationFailed(format!("contract of {release}: {detail}"));
                    return Ok(with_first(state.abort_with(&d, reason, false), actions));
                }
                if d.plan.migrate.expand && d.cause == Cause::Deploy {
                    state.migrate(d, MigrationStep::Expand, None, actions)
                } else {
                    state.provision(d, actions)
                }
            }
            (MigrationStep::Expand, true) => self.migrate(d, MigrationStep::Check, None, actions),
            (MigrationStep::Expand, false) => with_first(
                self.abort_with(&d, Reason::MigrationFailed(format!("expand: {detail}")), false),
                actions,
            ),
            (MigrationStep::Check, true) => self.provision(d, actions),
            (MigrationStep::Check, false) => {
                let failure = Reason::LiveCheckFailed(detail);
                if d.plan.migrate.rollback {
                    self.migrate(d, MigrationStep::Rollback, Some(failure), actions)
                } else {
                    with_first(self.abort_with(&d, failure, false), actions)
                }
            }
            (MigrationStep::Rollback, _) => {
                let reason = failure.unwrap_or_else(|| Reason::LiveCheckFailed(String::new()));
                with_first(self.abort_with(&d, reason, false), actions)
            }
        })
    }

    fn conflict(&self, d: &Deployment) -> LifecycleError {
        let hint = match &self.phase {
            Phase::Watching { .. } => format!(
                "wait for its watch to end, or undo it with `cutover rollback {}`",
                self.service
            ),
            _ => format!(
                "wait for it to finish, or stop it with `cutover abort {}`",
                self.service
            ),
        };
        LifecycleError::Conflict {
            service: self.service.clone(),
            id: d.id,
            version: d.release.version.clone(),
            phase: self.phase.name(),
            hint,
        }
    }

    fn promote_command(&self, id: Option<DeploymentId>) -> Result<Transition, LifecycleError> {
        match &self.phase {
            Phase::ReadyToPromote(d) => match id {
                Some(asked) if asked != d.id => Err(LifecycleError::NotAwaiting {
                    service: self.service.clone(),
                    asked,
                    awaiting: d.id,
                    version: d.release.version.clone(),
                }),
                _ => Ok(self.promote(d, Vec::new())),
            },
            Phase::Provisioning(d) | Phase::Validating(d) | Phase::Migrating { deployment: d, .. } => {
                Err(LifecycleError::NotReady {
                    service: self.service.clone(),
                    id: d.id,
                    version: d.release.version.clone(),
                    phase: self.phase.name(),
                })
            }
            // During a gradual switch: the rest of its steps are skipped, the switch is now.
            Phase::Watching {
                deployment: d,
                rollback_to,
                judged,
                step: Some(_),
            } if id.is_none_or(|asked| asked == d.id) => Ok(self.switch_promoted(d, rollback_to, *judged, Vec::new())),
            Phase::Stable { .. } | Phase::Watching { .. } => Err(LifecycleError::NothingToPromote {
                service: self.service.clone(),
                status: self.status(),
            }),
        }
    }

    /// Switch live traffic to a validated deployment and drain the old colour, which stays warm
    /// (running, receiving nothing) for an instant rollback. `actions` come first (records so
    /// far).
    fn promote(&self, d: &Deployment, mut actions: Vec<Action>) -> Transition {
        let Some(old) = &self.live else {
            return self.go_live_first(d, actions);
        };
        actions.push(Action::Record(Record::Promoted {
            id: d.id,
            colour: d.colour,
        }));
        // A gradual switch begins with its first step's share; a cold rollback goes back at once.
        if let (Some(g), Cause::Deploy) = (&d.plan.gradual, d.cause) {
            if g.share(0) < 100 {
                actions.extend([
                    Action::Split {
                        colour: d.colour,
                        percent: g.share(0),
                    },
                    Action::StartWatch {
                        deployment: d.id,
                        colour: d.colour,
                    },
                    Action::ArmTimer {
                        deployment: d.id,
                        timer: Timer::PromoteStep,
                        after: g.step,
                    },
                ]);
                let state = State {
                    phase: Phase::Watching {
                        deployment: d.clone(),
                        rollback_to: old.clone(),
                        judged: false,
                        step: Some(0),
                    },
                    ..self.clone()
                };
                return Transition { state, actions };
            }
        }
        self.switch_promoted(d, old, false, actions)
    }

    /// The switch of a promotion (at once, or the last step of a gradual one): live traffic goes
    /// to the deployment's colour, the old colour is drained and kept warm, and the watch window
    /// begins (the watch itself runs already after a gradual switch's first step).
    fn switch_promoted(&self, d: &Deployment, old: &Live, judged: bool, mut actions: Vec<Action>) -> Transition {
        let watching = matches!(self.phase, Phase::Watching { .. });
        actions.extend([
            Action::SwitchTo { colour: d.colour },
            // The old colour keeps its instances (warm, for an instant rollback) but not its
            // users: what it is still serving is drained now, not when it retires.
            Action::Drain { colour: old.colour },
        ]);
        if !watching {
            actions.push(Action::StartWatch {
                deployment: d.id,
                colour: d.colour,
            });
        }
        actions.push(Action::ArmTimer {
            deployment: d.id,
            timer: Timer::WatchWindow,
            after: d.plan.watch.duration,
        });
        let state = State {
            live: Some(Live {
                colour: d.colour,
                release: d.release.clone(),
            }),
            previous: Some(old.release.clone()),
            phase: Phase::Watching {
                deployment: d.clone(),
                rollback_to: old.clone(),
                judged,
                step: None,
            },
            contracted: None,
            ..self.clone()
        };
        Transition { state, actions }
    }

    /// The service's first deployment goes live as soon as it is validated: there is no previous
    /// colour to protect, compare against or roll back to, so there is no watch.
    fn go_live_first(&self, d: &Deployment, mut actions: Vec<Action>) -> Transition {
        let live = Live {
            colour: d.colour,
            release: d.release.clone(),
        };
        // The switch before the record that ends the deployment: whoever waits for that record
        // (`cutover deploy`) finds live traffic on the new release once it comes.
        actions.push(Action::SwitchTo { colour: d.colour });
        actions.push(Action::Record(Record::WentLive {
            id: d.id,
            live: live.clone(),
            watch: Watched::Skipped,
        }));
        let state = State {
            live: Some(live),
            phase: Phase::Stable {
                warm: None,
                last: Some(Ended {
                    id: d.id,
                    release: d.release.clone(),
                    outcome: Outcome::WentLive,
                }),
            },
            ..self.clone()
        };
        Transition { state, actions }
    }

    fn abort(&self) -> Result<Transition, LifecycleError> {
        match &self.phase {
            Phase::Migrating {
                deployment: d, step, ..
            } => Err(LifecycleError::MigrationRunning {
                service: self.service.clone(),
                id: d.id,
                version: d.release.version.clone(),
                step: *step,
            }),
            Phase::Provisioning(d) | Phase::ReadyToPromote(d) => Ok(self.abort_with(d, Reason::Requested, false)),
            Phase::Validating(d) => Ok(self.abort_with(d, Reason::Requested, true)),
            Phase::Watching { deployment: d, .. } => Err(LifecycleError::AlreadyPromoted {
                service: self.service.clone(),
                id: d.id,
                version: d.release.version.clone(),
                colour: d.colour,
            }),
            Phase::Stable { .. } => Err(LifecycleError::NothingToAbort {
                service: self.service.clone(),
                status: self.status(),
            }),
        }
    }

    /// End an unpromoted deployment: stop its colour. Live traffic was never on it, so there is
    /// nothing to drain and nothing to switch.
    fn abort_with(&self, d: &Deployment, reason: Reason, cancel_smoke: bool) -> Transition {
        let mut actions = vec![Action::Record(Record::Aborted {
            id: d.id,
            reason: reason.clone(),
        })];
        if cancel_smoke {
            actions.push(Action::CancelSmoke { deployment: d.id });
        }
        actions.push(Action::StopInstances { colour: d.colour });
        Transition {
            state: self.rest(Outcome::Aborted(reason), d),
            actions,
        }
    }

    /// The state after `d` ended without ever being promoted: live and previous as they were.
    fn rest(&self, outcome: Outcome, d: &Deployment) -> State {
        State {
            phase: Phase::Stable {
                warm: None,
                last: Some(Ended {
                    id: d.id,
                    release: d.release.clone(),
                    outcome,
                }),
            },
            ..self.clone()
        }
    }

    fn rollback(&self, id: DeploymentId, plan: Plan) -> Result<Transition, LifecycleError> {
        match &self.phase {
            Phase::Watching {
                deployment: d,
                rollback_to,
                ..
            } => Ok(self.roll_back(d.id, &d.release, rollback_to, Reason::Requested, true)),
            Phase::Stable { warm: Some(w), .. } => {
                let Some(bad) = &self.live else {
                    // A warm colour exists only after a promotion, which made something live.
                    return Err(self.nothing_to_roll_back());
                };
                let to = Live {
                    colour: w.colour,
                    release: w.release.clone(),
                };
                Ok(self.roll_back(w.promoted_by, &bad.release, &to, Reason::Requested, false))
            }
            Phase::Stable { warm: None, .. } => match (&self.live, &self.previous) {
                (Some(live), Some(previous)) => {
                    if self.contracted.as_ref() == Some(&live.release) {
                        return Err(LifecycleError::Contracted {
                            service: self.service.clone(),
                            live: live.release.clone(),
                            previous: previous.clone(),
                        });
                    }
                    self.deploy(id, previous.clone(), plan, Cause::ColdRollback)
                }
                _ => Err(self.nothing_to_roll_back()),
            },
            Phase::Provisioning(d)
            | Phase::Validating(d)
            | Phase::ReadyToPromote(d)
            | Phase::Migrating { deployment: d, .. } => Err(LifecycleError::RollbackDuringDeployment {
                service: self.service.clone(),
                id: d.id,
                version: d.release.version.clone(),
                phase: self.phase.name(),
                status: self.status(),
            }),
        }
    }

    fn nothing_to_roll_back(&self) -> LifecycleError {
        let status = match (&self.live, &self.previous) {
            (None, _) => "nothing was ever live".to_string(),
            (Some(live), _) => format!("live {live}, no earlier release to return to"),
        };
        LifecycleError::NothingToRollBack {
            service: self.service.clone(),
            status,
        }
    }

    /// Instant rollback: live traffic back to the warm `to` first (it is the urgent part, and the
    /// record that ends the deployment follows it), then drain and stop the rejected colour (the
    /// one live now). `id` is the deployment that made the rejected release live.
    fn roll_back(&self, id: DeploymentId, rejected: &Release, to: &Live, reason: Reason, watching: bool) -> Transition {
        let bad = to.colour.other();
        let mut actions = vec![
            Action::SwitchTo { colour: to.colour },
            Action::Record(Record::RolledBack {
                id,
                to: to.clone(),
                reason: reason.clone(),
            }),
        ];
        if watching {
            actions.push(Action::StopWatch { deployment: id });
        }
        actions.push(Action::Drain { colour: bad });
        actions.push(Action::StopInstances { colour: bad });
        let state = State {
            live: Some(to.clone()),
            previous: None,
            phase: Phase::Stable {
                warm: None,
                last: Some(Ended {
                    id,
                    release: rejected.clone(),
                    outcome: Outcome::RolledBack(reason),
                }),
            },
            // The rejected release's contract never runs; `to` is warm, so never contracted.
            contract: None,
            contracted: None,
            ..self.clone()
        };
        state_transition(state, actions)
    }

    /// The switch that made deployment `id` live was not applied everywhere: back to the warm
    /// colour at once, whether the watch still runs or not.
    fn not_acknowledged(&self, id: DeploymentId, nodes: String) -> Result<Transition, LifecycleError> {
        match &self.phase {
            Phase::Watching {
                deployment: d,
                rollback_to,
                ..
            } if d.id == id => Ok(self.roll_back(id, &d.release, rollback_to, Reason::NotAcknowledged(nodes), true)),
            Phase::Stable { warm: Some(w), .. } if w.promoted_by == id => {
                let Some(bad) = &self.live else {
                    return Err(self.nothing_to_roll_back());
                };
                let to = Live {
                    colour: w.colour,
                    release: w.release.clone(),
                };
                Ok(self.roll_back(id, &bad.release, &to, Reason::NotAcknowledged(nodes), false))
            }
            // The first release (nothing to go back to), a deployment already rolled back or
            // replaced: nothing to undo.
            _ => Err(self.stale("not acknowledged", id)),
        }
    }

    fn keep_warm_elapsed(&self, id: DeploymentId) -> Result<Transition, LifecycleError> {
        match &self.phase {
            Phase::Stable { warm: Some(w), last } if w.promoted_by == id => {
                let state = State {
                    phase: Phase::Stable {
                        warm: None,
                        last: last.clone(),
                    },
                    ..self.clone()
                };
                let mut actions = retire(w).to_vec();
                Ok(state.contract_now(&mut actions))
            }
            phase => match phase.deployment() {
                Some(d) if d.id == id => Err(self.unexpected("keep-warm timer", id)),
                _ => Err(self.stale("keep-warm timer", id)),
            },
        }
    }

    /// Reports and timers of deployment `id`, meaningful up to phase order `last`.
    fn report(&self, id: DeploymentId, last: u8, event: Event) -> Result<Transition, LifecycleError> {
        if self.phase.deployment().map(|d| d.id) != Some(id) {
            return Err(self.stale(event.name(), id));
        }
        let name = event.name();
        match (&self.phase, event) {
            (Phase::Provisioning(d), Event::InstancesHealthy { .. }) => {
                let actions = vec![
                    Action::Record(Record::Healthy { id }),
                    Action::RunSmoke {
                        deployment: id,
                        colour: d.colour,
                    },
                ];
                let state = State {
                    phase: Phase::Validating(d.clone()),
                    ..self.clone()
                };
                Ok(state_transition(state, actions))
            }
            (Phase::Provisioning(d), Event::ProvisionFailed { reason, .. }) => {
                Ok(self.abort_with(d, Reason::ProvisionFailed(reason), false))
            }
            (Phase::Provisioning(d), Event::HealthDeadlinePassed { .. }) => {
                Ok(self.abort_with(d, Reason::HealthDeadline(d.plan.health_deadline), false))
            }
            (Phase::Validating(d), Event::SmokePassed { detail, .. }) => Ok(self.validated(d, detail)),
            (Phase::Validating(d), Event::SmokeFailed { reason, .. }) => {
                Ok(self.abort_with(d, Reason::SmokeFailed(reason), false))
            }
            (Phase::Validating(d), Event::Unhealthy { reason, .. }) => {
                Ok(self.abort_with(d, Reason::Unhealthy(reason), true))
            }
            (Phase::ReadyToPromote(d), Event::Unhealthy { reason, .. }) => {
                Ok(self.abort_with(d, Reason::Unhealthy(reason), false))
            }
            (Phase::ReadyToPromote(d), Event::AutoPromoteDue { .. })
                if matches!(d.plan.promote, Promotion::Auto { .. }) =>
            {
                Ok(self.promote(d, Vec::new()))
            }
            (
                Phase::Watching {
                    deployment: d,
                    rollback_to,
                    ..
                },
                Event::Unhealthy { reason, .. },
            ) => Ok(self.roll_back(id, &d.release, rollback_to, Reason::Unhealthy(reason), true)),
            (
                Phase::Watching {
                    deployment: d,
                    rollback_to,
                    judged,
                    step,
                },
                Event::WatchSample { sample, .. },
            ) => Ok(self.judge(d, rollback_to, *judged, *step, sample)),
            (
                Phase::Watching {
                    deployment: d,
                    rollback_to,
                    judged,
                    step: None,
                },
                Event::WatchWindowElapsed { .. },
            ) => Ok(self.watch_passed(d, rollback_to, *judged)),
            (
                Phase::Watching {
                    deployment: d,
                    rollback_to,
                    judged,
                    step: Some(step),
                },
                Event::PromoteStepDue { .. },
            ) => Ok(self.next_step(d, rollback_to, *judged, *step)),
            (phase, _) if phase.order() > last => Err(LifecycleError::Late {
                service: self.service.clone(),
                event: name,
                id,
                phase: phase.name(),
            }),
            // Before its step (or an auto-promote timer for a manual deployment): the driver raised
            // something it was never asked for.
            _ => Err(self.unexpected(name, id)),
        }
    }

    /// Smoke passed: the first deployment goes live; a cold rollback or auto promotion without
    /// delay switches now; otherwise wait in `ReadyToPromote`.
    fn validated(&self, d: &Deployment, detail: Option<String>) -> Transition {
        let validated = vec![Action::Record(Record::Validated { id: d.id, detail })];
        if self.live.is_none() {
            return self.go_live_first(d, validated);
        }
        let delay = match (d.cause, &d.plan.promote) {
            (Cause::ColdRollback, _) => return self.promote(d, validated),
            (Cause::Deploy, Promotion::Auto { delay }) if delay.is_zero() => return self.promote(d, validated),
            (Cause::Deploy, Promotion::Auto { delay }) => Some(*delay),
            (Cause::Deploy, Promotion::Manual) => None,
        };
        let mut actions = validated;
        actions.push(Action::Record(Record::AwaitingPromotion {
            id: d.id,
            auto_after: delay,
        }));
        if let Some(after) = delay {
            actions.push(Action::ArmTimer {
                deployment: d.id,
                timer: Timer::AutoPromote,
                after,
            });
        }
        let state = State {
            phase: Phase::ReadyToPromote(d.clone()),
            ..self.clone()
        };
        state_transition(state, actions)
    }

    /// Judge a watch sample: nothing until `min_requests`, then error rate and p99 against the
    /// plan's thresholds; a breach rolls back at once.
    ///
    /// The sample's p99 is an estimate that lies in the same sixteenth of a latency bucket as the
    /// true p99, so `p99 > max` decides as the true value would unless both fall in that sixteenth:
    /// a release more than 6.25 % under the maximum is never rolled back for latency, one more
    /// than 6.25 % over always is, and in between the estimate, interpolated within the sixteenth,
    /// decides. No margin is added on either side: either would move the limit the operator set.
    fn judge(
        &self,
        d: &Deployment,
        rollback_to: &Live,
        judged: bool,
        step: Option<usize>,
        sample: WatchSample,
    ) -> Transition {
        let policy = &d.plan.watch;
        if sample.requests < policy.min_requests {
            return state_transition(self.clone(), Vec::new());
        }
        let rate = if sample.requests == 0 {
            0.0
        } else {
            sample.errors as f64 / sample.requests as f64
        };
        if rate > policy.max_error_rate {
            let reason = Reason::ErrorRate {
                errors: sample.errors,
                requests: sample.requests,
                max: policy.max_error_rate,
            };
            return self.roll_back(d.id, &d.release, rollback_to, reason, true);
        }
        if let (Some(p99), Some(max)) = (sample.p99, policy.max_p99) {
            if p99 > max {
                let reason = Reason::Latency { p99, max };
                return self.roll_back(d.id, &d.release, rollback_to, reason, true);
            }
        }
        if judged {
            return state_transition(self.clone(), Vec::new());
        }
        let state = State {
            phase: Phase::Watching {
                deployment: d.clone(),
                rollback_to: rollback_to.clone(),
                judged: true,
                step,
            },
            ..self.clone()
        };
        state_transition(state, Vec::new())
    }

    /// A step of a gradual switch lasted its time, watched, without a failure: the next step's
    /// share goes to the new colour, or, when the next is the last, the switch.
    fn next_step(&self, d: &Deployment, rollback_to: &Live, judged: bool, step: usize) -> Transition {
        let Some(g) = &d.plan.gradual else {
            return self.switch_promoted(d, rollback_to, judged, Vec::new());
        };
        let next = step + 1;
        if next + 1 >= g.steps.len() || g.share(next) >= 100 {
            return self.switch_promoted(d, rollback_to, judged, Vec::new());
        }
        let actions = vec![
            Action::Split {
                colour: d.colour,
                percent: g.share(next),
            },
            Action::ArmTimer {
                deployment: d.id,
                timer: Timer::PromoteStep,
                after: g.step,
            },
        ];
        let state = State {
            phase: Phase::Watching {
                deployment: d.clone(),
                rollback_to: rollback_to.clone(),
                judged,
                step: Some(next),
            },
            ..self.clone()
        };
        Transition { state, actions }
    }

    /// The watch window ended without a failure: the deployment is done. The previous colour stays
    /// warm for `keep_warm`, or is retired now when that is zero.
    fn watch_passed(&self, d: &Deployment, rollback_to: &Live, judged: bool) -> Transition {
        let live = Live {
            colour: d.colour,
            release: d.release.clone(),
        };
        let mut actions = vec![
            Action::Record(Record::WentLive {
                id: d.id,
                live,
                watch: if judged { Watched::Judged } else { Watched::Unjudged },
            }),
            Action::StopWatch { deployment: d.id },
        ];
        let warm = Warm {
            colour: rollback_to.colour,
            release: rollback_to.release.clone(),
            promoted_by: d.id,
            keep_warm: d.plan.keep_warm,
        };
        let retired = d.plan.keep_warm.is_zero();
        let warm = if retired {
            actions.extend(retire(&warm));
            None
        } else {
            actions.push(Action::ArmTimer {
                deployment: d.id,
                timer: Timer::KeepWarm,
                after: d.plan.keep_warm,
            });
            Some(warm)
        };
        let state = State {
            phase: Phase::Stable {
                warm,
                last: Some(Ended {
                    id: d.id,
                    release: d.release.clone(),
                    outcome: Outcome::WentLive,
                }),
            },
            // Owed once the colour of the release before is retired (now, with no keep-warm).
            contract: (d.plan.migrate.contract && d.cause == Cause::Deploy).then(|| Contract {
                id: d.id,
                release: d.release.clone(),
                running: false,
            }),
            ..self.clone()
        };
        if retired {
            return state.contract_now(&mut actions);
        }
        state_transition(state, actions)
    }

    /// After a retirement (with `actions`): the contract step the live release owes starts now.
    fn contract_now(&self, actions: &mut Vec<Action>) -> Transition {
        let mut state = self.clone();
        if let Some(c) = state.contract.as_mut().filter(|c| !c.running) {
            c.running = true;
            actions.push(Action::RunMigration {
                deployment: c.id,
                step: MigrationStep::Contract,
                release: c.release.clone(),
            });
        }
        state_transition(state, std::mem::take(actions))
    }

    fn stale(&self, event: &'static str, id: DeploymentId) -> LifecycleError {
        LifecycleError::Stale {
            service: self.service.clone(),
            event,
            id,
            status: self.status(),
        }
    }

    fn unexpected(&self, event: &'static str, id: DeploymentId) -> LifecycleError {
        LifecycleError::Unexpected {
            service: self.service.clone(),
            event,
            id,
            phase: self.phase.name(),
        }
    }
}

fn state_transition(state: State, actions: Vec<Action>) -> Transition {
    Transition { state, actions }
}

/// `t` with `first` before its own actions.
fn with_first(mut t: Transition, mut first: Vec<Action>) -> Transition {
    first.append(&mut t.actions);
    t.actions = first;
    t
}

/// What history says of a schema-change command cut short by a restart of cutover.
const INTERRUPTED_MIGRATION: &str = "interrupted by a restart of cutover before it ended: whether it \
    changed the schema is unknown; check the schema, and run the command by hand if needed";

/// Drain and stop a warm colour. It no longer receives new requests; requests and connections
/// that started there before the switch get up to `drain_timeout` to finish.
fn retire(w: &Warm) -> [Action; 3] {
    [
        Action::Record(Record::Retired {
            live: Live {
                colour: w.colour,
                release: w.release.clone(),
            },
        }),
        Action::Drain { colour: w.colour },
        Action::StopInstances { colour: w.colour },
    ]
}

#[cfg(test)]
mod tests;

/// Randomized sequences of events (seeded, reproducible) against a model of the world the driver
/// acts on, checking the lifecycle's invariants after every event.
#[cfg(test)]
mod property_tests;
