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

/// A version of the service, as the user named it on `cutover deploy --version`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeploymentId(pub u64);

impl fmt::Display for DeploymentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A colour serving a release: where live traffic goes, or a warm colour it can go back to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Live {
    pub colour: Colour,
    pub release: Release,
}

impl fmt::Display for Live {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.colour, self.release)
    }
}

/// How a validated deployment gets promoted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Promotion {
    /// Wait for `cutover promote`.
    Manual,
    /// Promote once validated: at once when `delay` is zero, otherwise when the
    /// [`Timer::AutoPromote`] fires (an operator may still promote earlier or abort meanwhile).
    Auto { delay: Duration },
}

/// The thresholds of the post-promotion watch.
#[derive(Clone, Debug, PartialEq)]
pub struct WatchPolicy {
    /// How long the new colour is watched before the deployment counts as done.
    pub duration: Duration,
    /// Error rate and latency are judged only once the new colour served this many requests
    /// since the switch: a handful of requests says nothing about a rate.
    pub min_requests: u64,
    /// Highest tolerated share of failed requests (0.01 = 1 %).
    pub max_error_rate: f64,
    /// Highest tolerated p99 latency; `None` disables the latency check. Judged against the
    /// proxy's estimate of the p99, which errs only when the true p99 is within 6.25 % of this
    /// (9.4 % below 250 µs, 6.25 µs below 100 µs); see [`cutover_proxy::StatsSnapshot::quantile`].
    pub max_p99: Option<Duration>,
}

/// The settings a deployment runs with, snapshotted from the service's configuration when the
/// deployment starts: reloading the configuration does not change a deployment in progress.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// Instances must be healthy this long after the start, or the deployment aborts.
    pub health_deadline: Duration,
    pub promote: Promotion,
    pub watch: WatchPolicy,
    /// How long the previous colour stays running after a successful watch, for instant
    /// rollback. Zero retires it as soon as the watch passes.
    pub keep_warm: Duration,
}

/// Why a deployment exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// `cutover deploy`.
    Deploy,
    /// `cutover rollback` after the previous colour was retired: the previous release is deployed
    /// again onto the idle colour. It is health-checked, validated and watched like any deployment,
    /// but promoted as soon as it is validated whatever the promote policy: the rollback command is
    /// itself the operator's go-ahead.
    ColdRollback,
}

/// One deployment of a release onto the idle colour.
#[derive(Clone, Debug, PartialEq)]
pub struct Deployment {
    pub id: DeploymentId,
    pub release: Release,
    /// The colour its instances run on: the one that is not live (blue for a service's first).
    pub colour: Colour,
    pub plan: Plan,
    pub cause: Cause,
}

/// The previously live colour, still running after a successful watch so that a rollback is an
/// instant switch back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warm {
    pub colour: Colour,
    pub release: Release,
    /// The deployment whose promotion replaced it; its [`Event::KeepWarmElapsed`] retires it.
    pub promoted_by: DeploymentId,
    /// Kept so that recovery after a restart can arm the keep-warm timer again.
    pub keep_warm: Duration,
}

/// How the watch of a deployment that went live turned out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Watched {
    /// The service's first deployment: nothing was live before it, so there was nothing to compare
    /// against nor to roll back to; it went live as soon as it was validated.
    Skipped,
    /// At least `min_requests` were judged against the thresholds, and passed.
    Judged,
    /// The window ended before the new colour served `min_requests`: only health was watched.
    /// It still goes live (a quiet service must be able to release); the record says so.
    Unjudged,
}

/// Why a deployment was aborted or rolled back.
#[derive(Clone, Debug, PartialEq)]
pub enum Reason {
    /// `cutover abort` or `cutover rollback`.
    Requested,
    /// The driver could not start the instances (the message says why).
    ProvisionFailed(String),
    /// The instances were not healthy within the plan's `health_deadline`.
    HealthDeadline(Duration),
    /// The smoke command failed (exit status, timeout, output tail).
    SmokeFailed(String),
    /// The health checker reports no healthy instance of the colour.
    Unhealthy(String),
    /// Too many failed requests on the new colour during the watch.
    ErrorRate { errors: u64, requests: u64, max: f64 },
    /// The new colour's p99 latency during the watch was above the maximum.
    Latency { p99: Duration, max: Duration },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Requested => f.write_str("requested by the operator"),
            Reason::ProvisionFailed(why) => write!(f, "instances failed to start: {why}"),
            Reason::HealthDeadline(d) => write!(f, "instances not healthy within {d:?}"),
            Reason::SmokeFailed(why) => write!(f, "smoke command failed: {why}"),
            Reason::Unhealthy(why) => write!(f, "no healthy instance: {why}"),
            Reason::ErrorRate { errors, requests, max } => write!(
                f,
                "{errors} of {requests} requests failed, above the maximum error rate {max}"
            ),
            Reason::Latency { p99, max } => {
                write!(f, "p99 latency {p99:?} above the maximum {max:?}")
            }
        }
    }
}

/// How a deployment ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// It serves live traffic (its watch passed, or it was the first deployment).
    WentLive,
    /// Stopped before any user saw it; live traffic never moved.
    Aborted(Reason),
    /// Traffic went back to the previous colour; this deployment's colour was drained and stopped.
    RolledBack(Reason),
    /// cutover restarted while it was in progress, before promotion; its colour was stopped.
    Interrupted,
}

/// The most recent deployment that ended, for `status`.
#[derive(Clone, Debug, PartialEq)]
pub struct Ended {
    pub id: DeploymentId,
    pub release: Release,
    pub outcome: Outcome,
}

/// Where the service is in its lifecycle. Each variant says what can happen next.
#[derive(Clone, Debug, PartialEq)]
pub enum Phase {
    /// No deployment in progress. Next: `Deploy` starts one (retiring the warm colour first, since
    /// the new release needs that colour); `Rollback` switches back to the warm colour at once, or
    /// without one redeploys the previous release (cold); `KeepWarmElapsed` retires the warm colour.
    Stable { warm: Option<Warm>, last: Option<Ended> },
    /// The deployment's instances were started. Next: `InstancesHealthy` moves to `Validating`;
    /// `ProvisionFailed`, `HealthDeadlinePassed` or `Abort` stop them and end in `Stable`.
    Provisioning(Deployment),
    /// The smoke command runs against the preview route. Next: `SmokePassed` makes a first
    /// deployment live at once, promotes (auto without delay, cold rollback) or moves to
    /// `ReadyToPromote`; `SmokeFailed`, `Unhealthy` or `Abort` stop it.
    Validating(Deployment),
    /// Validated, waiting for `Promote` (manual) or `AutoPromoteDue` (auto with a delay); the
    /// switch then moves to `Watching`. `Unhealthy` or `Abort` stop it.
    ReadyToPromote(Deployment),
    /// Promoted: live traffic is on the deployment's colour; the previous colour still runs.
    /// Next: `WatchWindowElapsed` ends in `Stable` with the previous colour warm; a failing
    /// `WatchSample`, `Unhealthy` or `Rollback` switches back to `rollback_to` at once.
    Watching {
        deployment: Deployment,
        /// What was live before the switch, still running: the instant way back.
        rollback_to: Live,
        /// Whether a sample with at least `min_requests` was judged (and passed) yet.
        judged: bool,
    },
}

impl Phase {
    /// The phase's name as the CLI shows it.
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Stable { .. } => "stable",
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
            Phase::Watching { deployment, .. } => Some(deployment),
        }
    }

    /// Position of a deployment's phase, to tell a late report (for a step already passed) from
    /// one that cannot be valid yet. Only asked while a deployment is in progress.
    fn order(&self) -> u8 {
        match self {
            Phase::Stable { .. } | Phase::Provisioning(_) => 0,
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
    SmokePassed { id: DeploymentId },
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
    /// Timer [`Timer::KeepWarm`]: `id` is the deployment whose promotion left the colour warm.
    KeepWarmElapsed { id: DeploymentId },
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
            Event::KeepWarmElapsed { .. } => "keep-warm timer",
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
}

/// An entry of the deployment history; the driver writes it in the same store transaction as the
/// state it came with.
#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    Started {
        id: DeploymentId,
        release: Release,
        colour: Colour,
        cause: Cause,
    },
    Healthy {
        id: DeploymentId,
    },
    Validated {
        id: DeploymentId,
    },
    /// Waiting for `cutover promote` (`auto_after: None`) or for the auto-promote delay.
    AwaitingPromotion {
        id: DeploymentId,
        auto_after: Option<Duration>,
    },
    /// Live traffic switched to `colour`; the watch started.
    Promoted {
        id: DeploymentId,
        colour: Colour,
    },
    WentLive {
        id: DeploymentId,
        live: Live,
        watch: Watched,
    },
    Aborted {
        id: DeploymentId,
        reason: Reason,
    },
    /// Live traffic went back to `to` (always an instant switch; a cold rollback is recorded as a
    /// new deployment with [`Cause::ColdRollback`]).
    RolledBack {
        id: DeploymentId,
        to: Live,
        reason: Reason,
    },
    /// cutover restarted while the deployment was in `phase`, before promotion.
    Interrupted {
        id: DeploymentId,
        phase: &'static str,
    },
    /// cutover restarted while watching: the watch starts over with a full window.
    WatchRestarted {
        id: DeploymentId,
    },
    /// A previously live colour was drained and stopped (keep-warm over, zero keep-warm, or a new
    /// deployment needed the colour).
    Retired {
        live: Live,
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
    /// there (in-flight ones finish where they started).
    SwitchTo { colour: Colour },
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
            | LifecycleError::NothingToRollBack { .. } => ErrorKind::Refused,
            LifecycleError::Stale { .. } | LifecycleError::Late { .. } => ErrorKind::Stale,
            LifecycleError::Unexpected { .. } | LifecycleError::ReusedId { .. } => ErrorKind::Internal,
        }
    }
}

/// The lifecycle state of one service: what is live, what it can roll back to, and the phase.
#[derive(Clone, Debug, PartialEq)]
pub struct State {
    pub service: String,
    /// Where live traffic goes: a colour whose instances became healthy and then passed the
    /// smoke command. `None` until the service's first deployment went live.
    pub live: Option<Live>,
    /// The release that was live before `live`: the target of a cold rollback. `None` when there
    /// was none, and after a rollback (the release rolled back from was rejected; older ones are in
    /// the store's history and can be deployed by name).
    pub previous: Option<Release>,
    /// The highest deployment id this service has seen; a new deployment must bring a higher one,
    /// so a stale report of an old deployment can never be taken for the new one.
    pub last_id: Option<DeploymentId>,
    pub phase: Phase,
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
            Event::InstancesHealthy { id } | Event::ProvisionFailed { id, .. } | Event::HealthDeadlinePassed { id } => {
                self.report(id, 0, event)
            }
            Event::SmokePassed { id } | Event::SmokeFailed { id, .. } => self.report(id, 1, event),
            Event::AutoPromoteDue { id } => self.report(id, 2, event),
            Event::Unhealthy { id, .. } | Event::WatchSample { id, .. } | Event::WatchWindowElapsed { id } => {
                self.report(id, 3, event)
            }
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
                let actions = self.resting_actions(warm.as_ref());
                Transition {
                    state: self.clone(),
                    actions,
                }
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
        actions.push(Action::StartInstances {
            deployment: id,
            colour,
            release: release.clone(),
        });
        actions.push(Action::ArmTimer {
            deployment: id,
            timer: Timer::HealthDeadline,
            after: plan.health_deadline,
        });
        let state = State {
            last_id: Some(id),
            phase: Phase::Provisioning(Deployment {
                id,
                release,
                colour,
                plan,
                cause,
            }),
            ..self.clone()
        };
        Ok(Transition { state, actions })
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
            Phase::Provisioning(d) | Phase::Validating(d) => Err(LifecycleError::NotReady {
                service: self.service.clone(),
                id: d.id,
                version: d.release.version.clone(),
                phase: self.phase.name(),
            }),
            Phase::Stable { .. } | Phase::Watching { .. } => Err(LifecycleError::NothingToPromote {
                service: self.service.clone(),
                status: self.status(),
            }),
        }
    }

    /// Switch live traffic to a validated deployment. `actions` come first (records so far).
    fn promote(&self, d: &Deployment, mut actions: Vec<Action>) -> Transition {
        let Some(old) = &self.live else {
            return self.go_live_first(d, actions);
        };
        actions.extend([
            Action::Record(Record::Promoted {
                id: d.id,
                colour: d.colour,
            }),
            Action::SwitchTo { colour: d.colour },
            Action::StartWatch {
                deployment: d.id,
                colour: d.colour,
            },
            Action::ArmTimer {
                deployment: d.id,
                timer: Timer::WatchWindow,
                after: d.plan.watch.duration,
            },
        ]);
        let state = State {
            live: Some(Live {
                colour: d.colour,
                release: d.release.clone(),
            }),
            previous: Some(old.release.clone()),
            phase: Phase::Watching {
                deployment: d.clone(),
                rollback_to: old.clone(),
                judged: false,
            },
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
                (Some(_), Some(previous)) => self.deploy(id, previous.clone(), plan, Cause::ColdRollback),
                _ => Err(self.nothing_to_roll_back()),
            },
            Phase::Provisioning(d) | Phase::Validating(d) | Phase::ReadyToPromote(d) => {
                Err(LifecycleError::RollbackDuringDeployment {
                    service: self.service.clone(),
                    id: d.id,
                    version: d.release.version.clone(),
                    phase: self.phase.name(),
                    status: self.status(),
                })
            }
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
            ..self.clone()
        };
        state_transition(state, actions)
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
                Ok(state_transition(state, retire(w).to_vec()))
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
            (Phase::Validating(d), Event::SmokePassed { .. }) => Ok(self.validated(d)),
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
                },
                Event::WatchSample { sample, .. },
            ) => Ok(self.judge(d, rollback_to, *judged, sample)),
            (
                Phase::Watching {
                    deployment: d,
                    rollback_to,
                    judged,
                },
                Event::WatchWindowElapsed { .. },
            ) => Ok(self.watch_passed(d, rollback_to, *judged)),
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
    fn validated(&self, d: &Deployment) -> Transition {
        let validated = vec![Action::Record(Record::Validated { id: d.id })];
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
    fn judge(&self, d: &Deployment, rollback_to: &Live, judged: bool, sample: WatchSample) -> Transition {
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
            },
            ..self.clone()
        };
        state_transition(state, Vec::new())
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
        let warm = if d.plan.keep_warm.is_zero() {
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
            ..self.clone()
        };
        state_transition(state, actions)
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
mod tests {
    use super::*;

    const S: &str = "web";
    const HOUR: Duration = Duration::from_secs(3600);

    fn rel(v: &str) -> Release {
        Release::new(v)
    }
    fn id(n: u64) -> DeploymentId {
        DeploymentId(n)
    }
    fn at(colour: Colour, v: &str) -> Live {
        Live {
            colour,
            release: rel(v),
        }
    }
    fn plan(promote: Promotion) -> Plan {
        Plan {
            health_deadline: Duration::from_secs(30),
            promote,
            watch: WatchPolicy {
                duration: Duration::from_secs(300),
                min_requests: 100,
                max_error_rate: 0.01,
                max_p99: Some(Duration::from_millis(500)),
            },
            keep_warm: HOUR,
        }
    }
    fn manual() -> Plan {
        plan(Promotion::Manual)
    }
    fn auto() -> Plan {
        plan(Promotion::Auto { delay: Duration::ZERO })
    }
    fn delayed() -> Plan {
        plan(Promotion::Auto {
            delay: Duration::from_secs(60),
        })
    }
    fn deploy(n: u64, v: &str, plan: Plan) -> Event {
        Event::Deploy {
            id: id(n),
            release: rel(v),
            plan,
        }
    }
    fn healthy(n: u64) -> Event {
        Event::InstancesHealthy { id: id(n) }
    }
    fn smoke_passed(n: u64) -> Event {
        Event::SmokePassed { id: id(n) }
    }
    fn sample(n: u64, requests: u64, errors: u64, p99_ms: u64) -> Event {
        Event::WatchSample {
            id: id(n),
            sample: WatchSample {
                requests,
                errors,
                p99: Some(Duration::from_millis(p99_ms)),
            },
        }
    }
    fn ok(state: &State, event: Event) -> Transition {
        match state.step(event.clone()) {
            Ok(t) => t,
            Err(e) => panic!("{} refused in {state}: {e}", event.name()),
        }
    }
    fn err(state: &State, event: Event) -> LifecycleError {
        match state.step(event.clone()) {
            Ok(t) => panic!("{} accepted in {state}: {t:?}", event.name()),
            Err(e) => e,
        }
    }
    fn record(r: Record) -> Action {
        Action::Record(r)
    }
    /// Deployment 2 of v2 onto green, the usual second deployment.
    fn d2(plan: Plan) -> Deployment {
        Deployment {
            id: id(2),
            release: rel("v2"),
            colour: Colour::Green,
            plan,
            cause: Cause::Deploy,
        }
    }
    fn ended(n: u64, v: &str, outcome: Outcome) -> Option<Ended> {
        Some(Ended {
            id: id(n),
            release: rel(v),
            outcome,
        })
    }

    // Fixtures, each reached through the state machine itself.

    /// blue@v1 live, made live by deployment 1 (the first).
    fn first_live() -> State {
        let s = ok(&State::new(S), deploy(1, "v1", manual())).state;
        let s = ok(&s, healthy(1)).state;
        ok(&s, smoke_passed(1)).state
    }
    fn provisioning(plan: Plan) -> State {
        ok(&first_live(), deploy(2, "v2", plan)).state
    }
    fn validating(plan: Plan) -> State {
        ok(&provisioning(plan), healthy(2)).state
    }
    fn ready(plan: Plan) -> State {
        let s = ok(&validating(plan), smoke_passed(2)).state;
        assert_eq!(s.phase.name(), "ready to promote");
        s
    }
    /// green@v2 live and watched, blue@v1 still running.
    fn watching() -> State {
        ok(&ready(manual()), Event::Promote { id: None }).state
    }
    /// green@v2 live, blue@v1 warm.
    fn stable_warm() -> State {
        ok(&watching(), Event::WatchWindowElapsed { id: id(2) }).state
    }
    /// green@v2 live, blue retired: previous release v1 known.
    fn stable_cold() -> State {
        ok(&stable_warm(), Event::KeepWarmElapsed { id: id(2) }).state
    }

    fn base(live: Option<Live>, previous: Option<&str>, last: u64, phase: Phase) -> State {
        State {
            service: S.to_string(),
            live,
            previous: previous.map(rel),
            last_id: Some(id(last)),
            phase,
        }
    }

    // ----- Stable -----

    #[test]
    fn first_deploy_starts_on_blue_and_goes_live_once_validated_without_watch() {
        let t = ok(&State::new(S), deploy(1, "v1", manual()));
        let d1 = Deployment {
            id: id(1),
            release: rel("v1"),
            colour: Colour::Blue,
            plan: manual(),
            cause: Cause::Deploy,
        };
        assert_eq!(
            t.actions,
            vec![
                record(Record::Started {
                    id: id(1),
                    release: rel("v1"),
                    colour: Colour::Blue,
                    cause: Cause::Deploy
                }),
                Action::StartInstances {
                    deployment: id(1),
                    colour: Colour::Blue,
                    release: rel("v1")
                },
                Action::ArmTimer {
                    deployment: id(1),
                    timer: Timer::HealthDeadline,
                    after: Duration::from_secs(30)
                },
            ]
        );
        assert_eq!(t.state, base(None, None, 1, Phase::Provisioning(d1.clone())));

        let t = ok(&t.state, healthy(1));
        assert_eq!(t.state.live, None);
        let t = ok(&t.state, smoke_passed(1));
        // Manual promotion does not hold back a first deployment: nothing is live to protect.
        assert_eq!(
            t.actions,
            vec![
                record(Record::Validated { id: id(1) }),
                Action::SwitchTo { colour: Colour::Blue },
                record(Record::WentLive {
                    id: id(1),
                    live: at(Colour::Blue, "v1"),
                    watch: Watched::Skipped
                }),
            ]
        );
        assert_eq!(
            t.state,
            base(
                Some(at(Colour::Blue, "v1")),
                None,
                1,
                Phase::Stable {
                    warm: None,
                    last: ended(1, "v1", Outcome::WentLive)
                }
            )
        );
        assert_eq!(t.state, first_live());
    }

    #[test]
    fn deploy_goes_to_the_idle_colour_and_leaves_live_untouched() {
        let t = ok(&first_live(), deploy(2, "v2", manual()));
        assert_eq!(
            t.actions,
            vec![
                record(Record::Started {
                    id: id(2),
                    release: rel("v2"),
                    colour: Colour::Green,
                    cause: Cause::Deploy
                }),
                Action::StartInstances {
                    deployment: id(2),
                    colour: Colour::Green,
                    release: rel("v2")
                },
                Action::ArmTimer {
                    deployment: id(2),
                    timer: Timer::HealthDeadline,
                    after: Duration::from_secs(30)
                },
            ]
        );
        assert_eq!(
            t.state,
            base(Some(at(Colour::Blue, "v1")), None, 2, Phase::Provisioning(d2(manual())))
        );
    }

    #[test]
    fn deploy_while_the_previous_colour_is_warm_retires_it_first() {
        let t = ok(&stable_warm(), deploy(3, "v3", manual()));
        assert_eq!(
            t.actions,
            vec![
                record(Record::Retired {
                    live: at(Colour::Blue, "v1")
                }),
                Action::Drain { colour: Colour::Blue },
                Action::StopInstances { colour: Colour::Blue },
                record(Record::Started {
                    id: id(3),
                    release: rel("v3"),
                    colour: Colour::Blue,
                    cause: Cause::Deploy
                }),
                Action::StartInstances {
                    deployment: id(3),
                    colour: Colour::Blue,
                    release: rel("v3")
                },
                Action::ArmTimer {
                    deployment: id(3),
                    timer: Timer::HealthDeadline,
                    after: Duration::from_secs(30)
                },
            ]
        );
        assert_eq!(t.state.live, Some(at(Colour::Green, "v2")));
        assert_eq!(t.state.previous, Some(rel("v1")));
        assert_eq!(t.state.warm(), None);
    }

    #[test]
    fn deploy_with_an_id_not_newer_than_the_last_is_refused() {
        for reused in [1, 2] {
            let e = err(&stable_warm(), deploy(reused, "v3", manual()));
            assert_eq!(
                e,
                LifecycleError::ReusedId {
                    service: S.into(),
                    id: id(reused),
                    last: id(2)
                }
            );
            assert_eq!(e.kind(), ErrorKind::Internal);
        }
    }

    #[test]
    fn deploy_during_a_deployment_is_a_conflict_naming_service_and_deployment() {
        let abort_hint = "wait for it to finish, or stop it with `cutover abort web`";
        for (state, phase, hint) in [
            (provisioning(manual()), "provisioning", abort_hint),
            (validating(manual()), "validating", abort_hint),
            (ready(manual()), "ready to promote", abort_hint),
            (
                watching(),
                "watching",
                "wait for its watch to end, or undo it with `cutover rollback web`",
            ),
        ] {
            let e = err(&state, deploy(3, "v3", manual()));
            assert_eq!(
                e,
                LifecycleError::Conflict {
                    service: S.into(),
                    id: id(2),
                    version: "v2".into(),
                    phase,
                    hint: hint.into()
                }
            );
            assert_eq!(e.kind(), ErrorKind::Conflict);
        }
        assert_eq!(
            err(&validating(manual()), deploy(3, "v3", manual())).to_string(),
            "service web: deployment 2 (v2) is already in progress (validating); one deployment \
             per service at a time: wait for it to finish, or stop it with `cutover abort web`"
        );
    }

    // ----- Provisioning -----

    #[test]
    fn healthy_instances_move_to_validating_and_run_the_smoke_command() {
        let t = ok(&provisioning(manual()), healthy(2));
        assert_eq!(
            t.actions,
            vec![
                record(Record::Healthy { id: id(2) }),
                Action::RunSmoke {
                    deployment: id(2),
                    colour: Colour::Green
                },
            ]
        );
        assert_eq!(
            t.state,
            base(Some(at(Colour::Blue, "v1")), None, 2, Phase::Validating(d2(manual())))
        );
    }

    /// The state after deployment 2 was aborted with `reason`: live blue@v1 untouched.
    fn aborted_2(reason: Reason) -> State {
        base(
            Some(at(Colour::Blue, "v1")),
            None,
            2,
            Phase::Stable {
                warm: None,
                last: ended(2, "v2", Outcome::Aborted(reason)),
            },
        )
    }

    fn assert_aborted(t: &Transition, reason: Reason, cancel_smoke: bool) {
        let mut expected = vec![record(Record::Aborted {
            id: id(2),
            reason: reason.clone(),
        })];
        if cancel_smoke {
            expected.push(Action::CancelSmoke { deployment: id(2) });
        }
        expected.push(Action::StopInstances { colour: Colour::Green });
        assert_eq!(t.actions, expected);
        assert_eq!(t.state, aborted_2(reason));
    }

    #[test]
    fn health_deadline_aborts_and_stops_green_with_live_untouched() {
        let t = ok(&provisioning(manual()), Event::HealthDeadlinePassed { id: id(2) });
        assert_aborted(&t, Reason::HealthDeadline(Duration::from_secs(30)), false);
    }

    #[test]
    fn provisioning_failure_aborts() {
        let t = ok(
            &provisioning(manual()),
            Event::ProvisionFailed {
                id: id(2),
                reason: "command not found".into(),
            },
        );
        assert_aborted(&t, Reason::ProvisionFailed("command not found".into()), false);
    }

    // ----- Validating -----

    #[test]
    fn smoke_failure_aborts() {
        let t = ok(
            &validating(manual()),
            Event::SmokeFailed {
                id: id(2),
                reason: "exit status 1".into(),
            },
        );
        assert_aborted(&t, Reason::SmokeFailed("exit status 1".into()), false);
    }

    #[test]
    fn unhealthy_during_validation_aborts_and_cancels_the_smoke_command() {
        let t = ok(
            &validating(manual()),
            Event::Unhealthy {
                id: id(2),
                reason: "0 of 2 healthy".into(),
            },
        );
        assert_aborted(&t, Reason::Unhealthy("0 of 2 healthy".into()), true);
    }

    #[test]
    fn smoke_pass_with_manual_promotion_waits_for_promote() {
        let t = ok(&validating(manual()), smoke_passed(2));
        assert_eq!(
            t.actions,
            vec![
                record(Record::Validated { id: id(2) }),
                record(Record::AwaitingPromotion {
                    id: id(2),
                    auto_after: None
                }),
            ]
        );
        assert_eq!(
            t.state,
            base(
                Some(at(Colour::Blue, "v1")),
                None,
                2,
                Phase::ReadyToPromote(d2(manual()))
            )
        );
    }

    #[test]
    fn smoke_pass_with_delayed_auto_promotion_arms_the_timer() {
        let t = ok(&validating(delayed()), smoke_passed(2));
        assert_eq!(
            t.actions,
            vec![
                record(Record::Validated { id: id(2) }),
                record(Record::AwaitingPromotion {
                    id: id(2),
                    auto_after: Some(Duration::from_secs(60))
                }),
                Action::ArmTimer {
                    deployment: id(2),
                    timer: Timer::AutoPromote,
                    after: Duration::from_secs(60)
                },
            ]
        );
        assert_eq!(t.state.phase, Phase::ReadyToPromote(d2(delayed())));
        assert_eq!(t.state.live, Some(at(Colour::Blue, "v1")));
    }

    fn promoted_actions(leading: Vec<Action>) -> Vec<Action> {
        let mut actions = leading;
        actions.extend([
            record(Record::Promoted {
                id: id(2),
                colour: Colour::Green,
            }),
            Action::SwitchTo { colour: Colour::Green },
            Action::StartWatch {
                deployment: id(2),
                colour: Colour::Green,
            },
            Action::ArmTimer {
                deployment: id(2),
                timer: Timer::WatchWindow,
                after: Duration::from_secs(300),
            },
        ]);
        actions
    }

    fn watching_2(plan: Plan, judged: bool) -> State {
        base(
            Some(at(Colour::Green, "v2")),
            Some("v1"),
            2,
            Phase::Watching {
                deployment: d2(plan),
                rollback_to: at(Colour::Blue, "v1"),
                judged,
            },
        )
    }

    #[test]
    fn smoke_pass_with_auto_promotion_switches_at_once_and_watches() {
        let t = ok(&validating(auto()), smoke_passed(2));
        assert_eq!(
            t.actions,
            promoted_actions(vec![record(Record::Validated { id: id(2) })])
        );
        assert_eq!(t.state, watching_2(auto(), false));
    }

    // ----- ReadyToPromote -----

    #[test]
    fn promote_switches_to_green_and_starts_the_watch() {
        for asked in [None, Some(id(2))] {
            let t = ok(&ready(manual()), Event::Promote { id: asked });
            assert_eq!(t.actions, promoted_actions(Vec::new()));
            assert_eq!(t.state, watching_2(manual(), false));
        }
    }

    #[test]
    fn promote_of_another_deployment_is_refused() {
        let e = err(&ready(manual()), Event::Promote { id: Some(id(1)) });
        assert_eq!(
            e,
            LifecycleError::NotAwaiting {
                service: S.into(),
                asked: id(1),
                awaiting: id(2),
                version: "v2".into()
            }
        );
        assert_eq!(e.kind(), ErrorKind::Refused);
    }

    #[test]
    fn auto_promote_timer_promotes_and_a_manual_promote_may_come_first() {
        let t = ok(&ready(delayed()), Event::AutoPromoteDue { id: id(2) });
        assert_eq!(t.actions, promoted_actions(Vec::new()));
        assert_eq!(t.state, watching_2(delayed(), false));

        let early = ok(&ready(delayed()), Event::Promote { id: None });
        assert_eq!(early.state, watching_2(delayed(), false));
        // The timer still fires later: it is late, and changes nothing.
        assert_eq!(
            err(&early.state, Event::AutoPromoteDue { id: id(2) }),
            LifecycleError::Late {
                service: S.into(),
                event: "auto-promote timer",
                id: id(2),
                phase: "watching"
            }
        );
    }

    #[test]
    fn auto_promote_timer_for_a_manual_deployment_is_unexpected() {
        let e = err(&ready(manual()), Event::AutoPromoteDue { id: id(2) });
        assert_eq!(
            e,
            LifecycleError::Unexpected {
                service: S.into(),
                event: "auto-promote timer",
                id: id(2),
                phase: "ready to promote"
            }
        );
        assert_eq!(e.kind(), ErrorKind::Internal);
    }

    #[test]
    fn unhealthy_while_awaiting_promotion_aborts() {
        let t = ok(
            &ready(manual()),
            Event::Unhealthy {
                id: id(2),
                reason: "instance died".into(),
            },
        );
        assert_aborted(&t, Reason::Unhealthy("instance died".into()), false);
    }

    #[test]
    fn promote_before_ready_is_refused_as_not_ready() {
        for (state, phase) in [
            (provisioning(manual()), "provisioning"),
            (validating(manual()), "validating"),
        ] {
            for asked in [None, Some(id(2))] {
                let e = err(&state, Event::Promote { id: asked });
                assert_eq!(
                    e,
                    LifecycleError::NotReady {
                        service: S.into(),
                        id: id(2),
                        version: "v2".into(),
                        phase
                    }
                );
            }
        }
    }

    #[test]
    fn promote_with_nothing_awaiting_is_refused() {
        for state in [State::new(S), first_live(), watching(), stable_warm()] {
            let e = err(&state, Event::Promote { id: None });
            assert_eq!(
                e,
                LifecycleError::NothingToPromote {
                    service: S.into(),
                    status: state.status()
                }
            );
        }
        assert_eq!(
            err(&first_live(), Event::Promote { id: None }).to_string(),
            "service web: nothing awaits promotion (stable, live blue@v1); start one with \
             `cutover deploy web --version VERSION`"
        );
    }

    // ----- Abort -----

    #[test]
    fn abort_stops_an_unpromoted_deployment_with_live_untouched() {
        assert_aborted(&ok(&provisioning(manual()), Event::Abort), Reason::Requested, false);
        assert_aborted(&ok(&validating(manual()), Event::Abort), Reason::Requested, true);
        assert_aborted(&ok(&ready(manual()), Event::Abort), Reason::Requested, false);
    }

    #[test]
    fn abort_after_promotion_is_refused_pointing_to_rollback() {
        let e = err(&watching(), Event::Abort);
        assert_eq!(
            e,
            LifecycleError::AlreadyPromoted {
                service: S.into(),
                id: id(2),
                version: "v2".into(),
                colour: Colour::Green
            }
        );
        assert_eq!(
            e.to_string(),
            "service web: deployment 2 (v2) was already promoted and live traffic is on green; \
             abort only stops unpromoted deployments: use `cutover rollback web`"
        );
    }

    #[test]
    fn abort_with_nothing_in_progress_is_refused() {
        for state in [State::new(S), first_live(), stable_warm()] {
            assert_eq!(
                err(&state, Event::Abort),
                LifecycleError::NothingToAbort {
                    service: S.into(),
                    status: state.status()
                }
            );
        }
        assert_eq!(
            err(&stable_warm(), Event::Abort).to_string(),
            "service web: nothing to abort (stable, live green@v2, blue@v1 warm); no deployment \
             is in progress"
        );
    }

    // ----- Watching -----

    #[test]
    fn samples_below_min_requests_are_not_judged() {
        // 99 requests, all failed and slow: too few to judge.
        let t = ok(&watching(), sample(2, 99, 99, 10_000));
        assert_eq!(t.actions, vec![]);
        assert_eq!(t.state, watching());
    }

    #[test]
    fn a_sample_within_thresholds_marks_the_watch_judged() {
        // Exactly at the limits passes: 1 of 100 is the 1 % maximum, 500 ms the p99 maximum.
        let t = ok(&watching(), sample(2, 100, 1, 500));
        assert_eq!(t.actions, vec![]);
        assert_eq!(t.state, watching_2(manual(), true));
        let again = ok(&t.state, sample(2, 200, 2, 100));
        assert_eq!(again.actions, vec![]);
        assert_eq!(again.state, t.state);
    }

    /// Deployment 2 rolled back to blue@v1 while watching.
    fn assert_rolled_back_from_watch(t: &Transition, reason: Reason) {
        assert_eq!(
            t.actions,
            vec![
                Action::SwitchTo { colour: Colour::Blue },
                record(Record::RolledBack {
                    id: id(2),
                    to: at(Colour::Blue, "v1"),
                    reason: reason.clone()
                }),
                Action::StopWatch { deployment: id(2) },
                Action::Drain { colour: Colour::Green },
                Action::StopInstances { colour: Colour::Green },
            ]
        );
        assert_eq!(
            t.state,
            base(
                Some(at(Colour::Blue, "v1")),
                None,
                2,
                Phase::Stable {
                    warm: None,
                    last: ended(2, "v2", Outcome::RolledBack(reason))
                }
            )
        );
        assert_eq!(t.rollback_kind(), Some(RollbackKind::Instant));
    }

    #[test]
    fn error_rate_above_the_maximum_rolls_back_at_once() {
        let t = ok(&watching(), sample(2, 100, 2, 10));
        assert_rolled_back_from_watch(
            &t,
            Reason::ErrorRate {
                errors: 2,
                requests: 100,
                max: 0.01,
            },
        );
    }

    #[test]
    fn p99_above_the_maximum_rolls_back_at_once() {
        let t = ok(&watching(), sample(2, 100, 0, 501));
        assert_rolled_back_from_watch(
            &t,
            Reason::Latency {
                p99: Duration::from_millis(501),
                max: Duration::from_millis(500),
            },
        );
    }

    #[test]
    fn unhealthy_while_watching_rolls_back_without_waiting_for_min_requests() {
        let t = ok(
            &watching(),
            Event::Unhealthy {
                id: id(2),
                reason: "0 of 2 healthy".into(),
            },
        );
        assert_rolled_back_from_watch(&t, Reason::Unhealthy("0 of 2 healthy".into()));
    }

    #[test]
    fn watch_window_end_keeps_the_previous_colour_warm() {
        for (state, watch) in [
            (watching(), Watched::Unjudged),
            (ok(&watching(), sample(2, 100, 0, 1)).state, Watched::Judged),
        ] {
            let t = ok(&state, Event::WatchWindowElapsed { id: id(2) });
            assert_eq!(
                t.actions,
                vec![
                    record(Record::WentLive {
                        id: id(2),
                        live: at(Colour::Green, "v2"),
                        watch
                    }),
                    Action::StopWatch { deployment: id(2) },
                    Action::ArmTimer {
                        deployment: id(2),
                        timer: Timer::KeepWarm,
                        after: HOUR
                    },
                ]
            );
            assert_eq!(
                t.state,
                base(
                    Some(at(Colour::Green, "v2")),
                    Some("v1"),
                    2,
                    Phase::Stable {
                        warm: Some(Warm {
                            colour: Colour::Blue,
                            release: rel("v1"),
                            promoted_by: id(2),
                            keep_warm: HOUR
                        }),
                        last: ended(2, "v2", Outcome::WentLive)
                    }
                )
            );
        }
    }

    #[test]
    fn zero_keep_warm_retires_the_previous_colour_when_the_watch_passes() {
        let mut p = auto();
        p.keep_warm = Duration::ZERO;
        let s = ok(&validating(p), smoke_passed(2)).state;
        let t = ok(&s, Event::WatchWindowElapsed { id: id(2) });
        assert_eq!(
            t.actions,
            vec![
                record(Record::WentLive {
                    id: id(2),
                    live: at(Colour::Green, "v2"),
                    watch: Watched::Unjudged
                }),
                Action::StopWatch { deployment: id(2) },
                record(Record::Retired {
                    live: at(Colour::Blue, "v1")
                }),
                Action::Drain { colour: Colour::Blue },
                Action::StopInstances { colour: Colour::Blue },
            ]
        );
        assert_eq!(t.state.warm(), None);
        assert_eq!(t.state.previous, Some(rel("v1")));
        assert_eq!(t.state.live, Some(at(Colour::Green, "v2")));
    }

    // ----- Rollback -----

    #[test]
    fn rollback_while_watching_is_instant() {
        let t = ok(
            &watching(),
            Event::Rollback {
                id: id(3),
                plan: manual(),
            },
        );
        assert_rolled_back_from_watch(&t, Reason::Requested);
        // Instant rollback allocates no deployment.
        assert_eq!(t.state.last_id, Some(id(2)));
    }

    #[test]
    fn rollback_while_the_previous_colour_is_warm_is_instant() {
        let t = ok(
            &stable_warm(),
            Event::Rollback {
                id: id(3),
                plan: manual(),
            },
        );
        assert_eq!(
            t.actions,
            vec![
                Action::SwitchTo { colour: Colour::Blue },
                record(Record::RolledBack {
                    id: id(2),
                    to: at(Colour::Blue, "v1"),
                    reason: Reason::Requested
                }),
                Action::Drain { colour: Colour::Green },
                Action::StopInstances { colour: Colour::Green },
            ]
        );
        assert_eq!(
            t.state,
            base(
                Some(at(Colour::Blue, "v1")),
                None,
                2,
                Phase::Stable {
                    warm: None,
                    last: ended(2, "v2", Outcome::RolledBack(Reason::Requested))
                }
            )
        );
        assert_eq!(t.rollback_kind(), Some(RollbackKind::Instant));
    }

    #[test]
    fn rollback_after_retirement_is_a_cold_redeploy_promoted_without_waiting() {
        let t = ok(
            &stable_cold(),
            Event::Rollback {
                id: id(3),
                plan: manual(),
            },
        );
        assert_eq!(t.rollback_kind(), Some(RollbackKind::Cold));
        let d3 = Deployment {
            id: id(3),
            release: rel("v1"),
            colour: Colour::Blue,
            plan: manual(),
            cause: Cause::ColdRollback,
        };
        assert_eq!(
            t.actions,
            vec![
                record(Record::Started {
                    id: id(3),
                    release: rel("v1"),
                    colour: Colour::Blue,
                    cause: Cause::ColdRollback
                }),
                Action::StartInstances {
                    deployment: id(3),
                    colour: Colour::Blue,
                    release: rel("v1")
                },
                Action::ArmTimer {
                    deployment: id(3),
                    timer: Timer::HealthDeadline,
                    after: Duration::from_secs(30)
                },
            ]
        );
        assert_eq!(
            t.state,
            base(
                Some(at(Colour::Green, "v2")),
                Some("v1"),
                3,
                Phase::Provisioning(d3.clone())
            )
        );
        // Validated like any deployment, then promoted although the plan says manual.
        let s = ok(&t.state, healthy(3)).state;
        let t = ok(&s, smoke_passed(3));
        assert_eq!(t.actions[0], record(Record::Validated { id: id(3) }));
        assert_eq!(
            t.actions[1],
            record(Record::Promoted {
                id: id(3),
                colour: Colour::Blue
            })
        );
        assert_eq!(
            t.state,
            base(
                Some(at(Colour::Blue, "v1")),
                Some("v2"),
                3,
                Phase::Watching {
                    deployment: d3,
                    rollback_to: at(Colour::Green, "v2"),
                    judged: false
                }
            )
        );
    }

    #[test]
    fn cold_rollback_with_a_reused_id_is_refused() {
        let e = err(
            &stable_cold(),
            Event::Rollback {
                id: id(2),
                plan: manual(),
            },
        );
        assert_eq!(
            e,
            LifecycleError::ReusedId {
                service: S.into(),
                id: id(2),
                last: id(2)
            }
        );
    }

    #[test]
    fn rollback_with_nothing_to_return_to_is_refused() {
        let rolled_back = ok(
            &stable_warm(),
            Event::Rollback {
                id: id(3),
                plan: manual(),
            },
        )
        .state;
        for (state, status) in [
            (State::new(S), "nothing was ever live"),
            (first_live(), "live blue@v1, no earlier release to return to"),
            (rolled_back, "live blue@v1, no earlier release to return to"),
        ] {
            let e = err(
                &state,
                Event::Rollback {
                    id: id(9),
                    plan: manual(),
                },
            );
            assert_eq!(
                e,
                LifecycleError::NothingToRollBack {
                    service: S.into(),
                    status: status.into()
                }
            );
        }
        assert_eq!(
            err(
                &first_live(),
                Event::Rollback {
                    id: id(9),
                    plan: manual()
                }
            )
            .to_string(),
            "service web: nothing to roll back to (live blue@v1, no earlier release to return \
             to); deploy the version you want with `cutover deploy web --version VERSION`"
        );
    }

    #[test]
    fn rollback_during_an_unpromoted_deployment_points_to_abort() {
        for state in [provisioning(manual()), validating(manual()), ready(manual())] {
            let e = err(
                &state,
                Event::Rollback {
                    id: id(3),
                    plan: manual(),
                },
            );
            assert_eq!(
                e,
                LifecycleError::RollbackDuringDeployment {
                    service: S.into(),
                    id: id(2),
                    version: "v2".into(),
                    phase: state.phase.name(),
                    status: state.status()
                }
            );
        }
        assert_eq!(
            err(
                &provisioning(manual()),
                Event::Rollback {
                    id: id(3),
                    plan: manual()
                }
            )
            .to_string(),
            "service web: deployment 2 (v2) is provisioning and was not promoted, so there is \
             nothing to roll back yet (provisioning deployment 2 (v2) on green, live blue@v1); \
             to stop it use `cutover abort web`"
        );
    }

    // ----- Keep warm -----

    #[test]
    fn keep_warm_end_drains_and_stops_the_previous_colour() {
        let t = ok(&stable_warm(), Event::KeepWarmElapsed { id: id(2) });
        assert_eq!(
            t.actions,
            vec![
                record(Record::Retired {
                    live: at(Colour::Blue, "v1")
                }),
                Action::Drain { colour: Colour::Blue },
                Action::StopInstances { colour: Colour::Blue },
            ]
        );
        assert_eq!(
            t.state,
            base(
                Some(at(Colour::Green, "v2")),
                Some("v1"),
                2,
                Phase::Stable {
                    warm: None,
                    last: ended(2, "v2", Outcome::WentLive)
                }
            )
        );
    }

    #[test]
    fn keep_warm_timer_of_another_deployment_is_stale() {
        for (state, n) in [
            (stable_warm(), 1),
            (stable_cold(), 2),
            (first_live(), 1),
            (provisioning(manual()), 1),
        ] {
            let e = err(&state, Event::KeepWarmElapsed { id: id(n) });
            assert_eq!(
                e,
                LifecycleError::Stale {
                    service: S.into(),
                    event: "keep-warm timer",
                    id: id(n),
                    status: state.status()
                }
            );
            assert_eq!(e.kind(), ErrorKind::Stale);
        }
        // The warm colour a new deployment retired does not come back with its timer.
        let deploying = ok(&stable_warm(), deploy(3, "v3", manual())).state;
        assert_eq!(
            err(&deploying, Event::KeepWarmElapsed { id: id(2) }).kind(),
            ErrorKind::Stale
        );
    }

    // ----- Reports and timers out of place -----

    /// Every driver report and timer for deployment `n`.
    fn reports(n: u64) -> Vec<Event> {
        vec![
            healthy(n),
            Event::ProvisionFailed {
                id: id(n),
                reason: "x".into(),
            },
            Event::HealthDeadlinePassed { id: id(n) },
            smoke_passed(n),
            Event::SmokeFailed {
                id: id(n),
                reason: "x".into(),
            },
            Event::Unhealthy {
                id: id(n),
                reason: "x".into(),
            },
            Event::AutoPromoteDue { id: id(n) },
            sample(n, 0, 0, 0),
            Event::WatchWindowElapsed { id: id(n) },
            Event::KeepWarmElapsed { id: id(n) },
        ]
    }

    #[test]
    fn reports_for_the_deployment_in_progress_are_accepted_late_or_unexpected_by_phase() {
        // One letter per event of `reports`: A accepted, L late, U unexpected.
        for (state, expected) in [
            (provisioning(delayed()), "AAAUUUUUUU"),
            (validating(delayed()), "LLLAAAUUUU"),
            (ready(delayed()), "LLLLLAAUUU"),
            (ok(&ready(delayed()), Event::Promote { id: None }).state, "LLLLLALAAU"),
        ] {
            let phase = state.phase.name();
            for (event, want) in reports(2).into_iter().zip(expected.chars()) {
                let name = event.name();
                match (state.step(event), want) {
                    (Ok(_), 'A') => {}
                    (Err(e), 'L') => assert_eq!(
                        e,
                        LifecycleError::Late {
                            service: S.into(),
                            event: name,
                            id: id(2),
                            phase
                        }
                    ),
                    (Err(e), 'U') => assert_eq!(
                        e,
                        LifecycleError::Unexpected {
                            service: S.into(),
                            event: name,
                            id: id(2),
                            phase
                        }
                    ),
                    (got, want) => panic!("{name} while {phase}: want {want}, got {got:?}"),
                }
            }
        }
    }

    #[test]
    fn reports_for_any_other_deployment_are_stale() {
        for state in [
            State::new(S),
            first_live(),
            provisioning(manual()),
            validating(manual()),
            ready(delayed()),
            watching(),
            stable_warm(),
            stable_cold(),
        ] {
            // 1 is finished (or unknown for a new service), 7 was never issued; 2 is finished
            // in the stable states (the warm colour's own keep-warm timer aside).
            let mut stale = vec![1, 7];
            if state.in_progress().is_none() {
                stale.push(2);
            }
            for n in stale {
                for event in reports(n) {
                    let name = event.name();
                    if state == stable_warm() && n == 2 && name == "keep-warm timer" {
                        continue;
                    }
                    assert_eq!(
                        state.step(event),
                        Err(LifecycleError::Stale {
                            service: S.into(),
                            event: name,
                            id: id(n),
                            status: state.status()
                        }),
                        "{name} of {n} in {state}"
                    );
                }
            }
        }
        assert_eq!(
            err(&first_live(), healthy(7)).to_string(),
            "service web: ignored instances healthy of deployment 7: it is not the deployment in \
             progress (stable, live blue@v1); nothing to do, it reports on a deployment that is \
             over"
        );
    }

    // ----- Crash recovery -----

    #[test]
    fn recovery_of_a_stable_service_adopts_live_and_warm_and_stops_the_rest() {
        let t = stable_warm().recover();
        assert_eq!(
            t.actions,
            vec![
                Action::Adopt {
                    colour: Colour::Green,
                    release: rel("v2")
                },
                Action::SwitchTo { colour: Colour::Green },
                Action::Adopt {
                    colour: Colour::Blue,
                    release: rel("v1")
                },
                Action::ArmTimer {
                    deployment: id(2),
                    timer: Timer::KeepWarm,
                    after: HOUR
                },
            ]
        );
        assert_eq!(t.state, stable_warm());

        let t = stable_cold().recover();
        assert_eq!(
            t.actions,
            vec![
                Action::Adopt {
                    colour: Colour::Green,
                    release: rel("v2")
                },
                Action::SwitchTo { colour: Colour::Green },
                Action::StopInstances { colour: Colour::Blue },
            ]
        );
        assert_eq!(t.state, stable_cold());

        let t = State::new(S).recover();
        assert_eq!(
            t.actions,
            vec![
                Action::StopInstances { colour: Colour::Blue },
                Action::StopInstances { colour: Colour::Green },
            ]
        );
        assert_eq!(t.state, State::new(S));
    }

    #[test]
    fn recovery_marks_an_unpromoted_deployment_interrupted_and_stops_its_colour() {
        for state in [provisioning(manual()), validating(manual()), ready(manual())] {
            let t = state.recover();
            assert_eq!(
                t.actions,
                vec![
                    record(Record::Interrupted {
                        id: id(2),
                        phase: state.phase.name()
                    }),
                    Action::Adopt {
                        colour: Colour::Blue,
                        release: rel("v1")
                    },
                    Action::SwitchTo { colour: Colour::Blue },
                    Action::StopInstances { colour: Colour::Green },
                ]
            );
            assert_eq!(
                t.state,
                base(
                    Some(at(Colour::Blue, "v1")),
                    None,
                    2,
                    Phase::Stable {
                        warm: None,
                        last: ended(2, "v2", Outcome::Interrupted)
                    }
                )
            );
        }
    }

    #[test]
    fn recovery_of_an_interrupted_first_deployment_leaves_nothing_live() {
        let s = ok(&State::new(S), deploy(1, "v1", manual())).state;
        let s = ok(&s, healthy(1)).state;
        let t = s.recover();
        assert_eq!(
            t.actions,
            vec![
                record(Record::Interrupted {
                    id: id(1),
                    phase: "validating"
                }),
                Action::StopInstances { colour: Colour::Blue },
                Action::StopInstances { colour: Colour::Green },
            ]
        );
        assert_eq!(t.state.live, None);
        assert_eq!(t.state.last_id, Some(id(1)));
        // The next deployment is still a first one, on blue, with a newer id.
        assert_eq!(err(&t.state, deploy(1, "v1", manual())).kind(), ErrorKind::Internal);
        let next = ok(&t.state, deploy(2, "v1", manual())).state;
        assert_eq!(next.in_progress().map(|d| d.colour), Some(Colour::Blue));
    }

    #[test]
    fn recovery_while_watching_keeps_the_promoted_colour_and_watches_again() {
        let judged = ok(&watching(), sample(2, 100, 0, 1)).state;
        assert_eq!(judged, watching_2(manual(), true));
        let t = judged.recover();
        assert_eq!(
            t.actions,
            vec![
                record(Record::WatchRestarted { id: id(2) }),
                Action::Adopt {
                    colour: Colour::Green,
                    release: rel("v2")
                },
                Action::SwitchTo { colour: Colour::Green },
                Action::Adopt {
                    colour: Colour::Blue,
                    release: rel("v1")
                },
                Action::StartWatch {
                    deployment: id(2),
                    colour: Colour::Green
                },
                Action::ArmTimer {
                    deployment: id(2),
                    timer: Timer::WatchWindow,
                    after: Duration::from_secs(300)
                },
            ]
        );
        // The window starts over, and so does the judgement.
        assert_eq!(t.state, watching_2(manual(), false));
    }

    #[test]
    fn state_display_names_the_service_and_where_traffic_is() {
        assert_eq!(State::new(S).to_string(), "web: stable, nothing live");
        assert_eq!(
            ready(manual()).to_string(),
            "web: ready to promote deployment 2 (v2) on green, live blue@v1"
        );
        assert_eq!(
            watching().to_string(),
            "web: watching deployment 2 (v2) on green, live green@v2, blue@v1 warm"
        );
    }

    #[test]
    fn ordinary_transitions_are_not_rollbacks() {
        assert_eq!(ok(&first_live(), deploy(2, "v2", manual())).rollback_kind(), None);
        assert_eq!(ok(&ready(manual()), Event::Abort).rollback_kind(), None);
    }
}

/// Randomized sequences of events (seeded, reproducible) against a model of the world the driver
/// acts on, checking the lifecycle's invariants after every event.
#[cfg(test)]
mod property_tests {
    use super::*;

    /// splitmix64: small, seeded, good enough to pick events.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn percent(&mut self, p: u64) -> bool {
            self.below(100) < p
        }
    }

    fn slot(c: Colour) -> usize {
        match c {
            Colour::Blue => 0,
            Colour::Green => 1,
        }
    }

    /// Instances running on one colour, and what the world knows about them: health and smoke
    /// results come from the events the test raises, not from the state machine.
    #[derive(Clone, Debug)]
    struct Instances {
        release: Release,
        started_by: DeploymentId,
        healthy: bool,
        /// Passed the smoke command while healthy.
        validated: bool,
    }

    /// The deployment in progress, as the history records it.
    #[derive(Debug)]
    struct Tracked {
        id: DeploymentId,
        colour: Colour,
        live_at_start: Option<Live>,
        promoted: bool,
        switched_away: bool,
    }

    #[derive(Debug, Default)]
    struct Counts {
        first_live: u32,
        watched_live: u32,
        aborted: u32,
        interrupted: u32,
        rolled_back_by_watch: u32,
        rolled_back_by_request: u32,
        cold_rollbacks: u32,
        retired: u32,
        crashes: u32,
        truncated: u32,
        conflict: u32,
        refused: u32,
        stale: u32,
        internal: u32,
    }

    #[derive(Debug, Default)]
    struct World {
        instances: [Option<Instances>; 2],
        /// The proxy's active colour. Lost in a crash: the proxy runs inside the daemon.
        routed: Option<Colour>,
        tracked: Option<Tracked>,
        /// Colours of deployments that ended aborted, interrupted or rolled back, not stopped yet.
        cleanup: Vec<(DeploymentId, Colour)>,
        /// After an aborted or interrupted deployment: the live traffic it started with.
        expect_live: Option<Option<Live>>,
        counts: Counts,
    }

    impl World {
        /// What the event tells about reality, whatever the state machine makes of it.
        fn observe(&mut self, event: &Event) {
            let tracked = self.tracked.as_ref().map(|t| t.id);
            for inst in self.instances.iter_mut().flatten() {
                match *event {
                    Event::InstancesHealthy { id } if inst.started_by == id => inst.healthy = true,
                    Event::SmokePassed { id } if inst.started_by == id && inst.healthy => inst.validated = true,
                    // The health checker reports on the deployment in progress only.
                    Event::Unhealthy { id, .. } if inst.started_by == id && tracked == Some(id) => inst.healthy = false,
                    _ => {}
                }
            }
        }

        /// The history entries, written with the state before any action runs.
        fn commit(&mut self, record: &Record, before: &State) {
            match record {
                Record::Started { id, colour, cause, .. } => {
                    assert!(
                        self.tracked.is_none(),
                        "deployment {id} started while {:?} is in progress",
                        self.tracked
                    );
                    self.tracked = Some(Tracked {
                        id: *id,
                        colour: *colour,
                        live_at_start: before.live.clone(),
                        promoted: false,
                        switched_away: false,
                    });
                    if *cause == Cause::ColdRollback {
                        self.counts.cold_rollbacks += 1;
                    }
                }
                Record::Promoted { id, .. } => {
                    let t = self.tracked.as_mut().expect("promoted without a deployment");
                    assert_eq!(t.id, *id);
                    t.promoted = true;
                }
                Record::WentLive { id, watch, .. } => {
                    let t = self.tracked.take().expect("went live without a deployment");
                    assert_eq!(t.id, *id);
                    match watch {
                        Watched::Skipped => self.counts.first_live += 1,
                        Watched::Judged | Watched::Unjudged => self.counts.watched_live += 1,
                    }
                }
                Record::Aborted { id, .. } | Record::Interrupted { id, .. } => {
                    let t = self.tracked.take().expect("ended without a deployment");
                    assert_eq!(t.id, *id);
                    assert!(!t.promoted, "deployment {id} aborted after promotion");
                    assert!(!t.switched_away, "deployment {id} moved live traffic");
                    self.cleanup.push((t.id, t.colour));
                    self.expect_live = Some(t.live_at_start);
                    if matches!(record, Record::Aborted { .. }) {
                        self.counts.aborted += 1;
                    } else {
                        self.counts.interrupted += 1;
                    }
                }
                Record::RolledBack { id, to, reason } => {
                    let bad = before.live.as_ref().expect("rollback with nothing live").colour;
                    assert_eq!(to.colour, bad.other());
                    // From Watching it ends the deployment in progress; from Stable there is none.
                    if let Some(t) = self.tracked.take() {
                        assert_eq!(t.id, *id);
                        assert!(t.promoted);
                    }
                    self.cleanup.push((*id, bad));
                    if *reason == Reason::Requested {
                        self.counts.rolled_back_by_request += 1;
                    } else {
                        self.counts.rolled_back_by_watch += 1;
                    }
                }
                Record::Retired { live } => {
                    let inst = self.instances[slot(live.colour)].as_ref();
                    assert_eq!(inst.map(|i| &i.release), Some(&live.release));
                    self.counts.retired += 1;
                }
                Record::Healthy { .. }
                | Record::Validated { .. }
                | Record::AwaitingPromotion { .. }
                | Record::WatchRestarted { .. } => {}
            }
        }

        fn execute(&mut self, action: &Action) {
            match action {
                Action::StartInstances {
                    deployment,
                    colour,
                    release,
                } => {
                    let c = slot(*colour);
                    assert!(
                        self.instances[c].is_none(),
                        "starting {release} on {colour}, which runs {:?}",
                        self.instances[c]
                    );
                    assert_ne!(self.routed, Some(*colour));
                    assert_eq!(self.tracked.as_ref().map(|t| t.id), Some(*deployment));
                    self.instances[c] = Some(Instances {
                        release: release.clone(),
                        started_by: *deployment,
                        healthy: false,
                        validated: false,
                    });
                }
                Action::Adopt { colour, release } => {
                    let inst = self.instances[slot(*colour)].as_ref();
                    assert_eq!(
                        inst.map(|i| &i.release),
                        Some(release),
                        "adopting {release} on {colour}"
                    );
                }
                Action::StopInstances { colour } => {
                    assert_ne!(self.routed, Some(*colour), "stopping the live colour");
                    self.instances[slot(*colour)] = None;
                    self.cleanup.retain(|(_, c)| c != colour);
                }
                Action::Drain { colour } => {
                    assert_ne!(self.routed, Some(*colour), "draining the live colour");
                }
                Action::RunSmoke { deployment, colour } => {
                    let inst = self.instances[slot(*colour)].as_ref().expect("smoke on nothing");
                    assert_eq!(inst.started_by, *deployment);
                    assert!(inst.healthy, "smoke before health");
                }
                Action::SwitchTo { colour } => {
                    // Invariant 1: live traffic only goes to healthy, validated instances.
                    let inst = self.instances[slot(*colour)].as_ref();
                    assert!(
                        inst.is_some_and(|i| i.healthy && i.validated),
                        "switch to {colour}: {inst:?}"
                    );
                    if let Some(t) = self.tracked.as_mut() {
                        let home = t.live_at_start.as_ref().map(|l| l.colour);
                        if !t.promoted && home != Some(*colour) {
                            t.switched_away = true;
                        }
                    }
                    self.routed = Some(*colour);
                }
                Action::StartWatch { deployment, colour } => {
                    assert_eq!(self.routed, Some(*colour));
                    assert_eq!(self.tracked.as_ref().map(|t| t.id), Some(*deployment));
                }
                Action::CancelSmoke { .. } | Action::StopWatch { .. } | Action::ArmTimer { .. } | Action::Record(_) => {
                }
            }
        }

        /// Commits the transition, then executes its first `executed` actions (all: usize::MAX).
        fn apply(&mut self, before: &State, t: &Transition, executed: usize) {
            for r in t.records() {
                self.commit(r, before);
            }
            let actions = t.actions.iter().filter(|a| !matches!(a, Action::Record(_)));
            for a in actions.take(executed) {
                self.execute(a);
            }
        }

        /// Invariants once a transition was fully executed.
        fn check(&mut self, state: &State) {
            assert_eq!(self.routed, state.live.as_ref().map(|l| l.colour));
            if let Some(live) = &state.live {
                let inst = self.instances[slot(live.colour)].as_ref();
                assert!(inst.is_some_and(|i| i.release == live.release && i.validated));
            }
            // Exactly the colours the state accounts for run, with the right release: nothing
            // leaks, nothing needed is missing.
            let mut expected: [Option<Release>; 2] = [None, None];
            if let Some(live) = &state.live {
                expected[slot(live.colour)] = Some(live.release.clone());
            }
            if let Some(w) = state.warm() {
                expected[slot(w.colour)] = Some(w.release);
            }
            if let Phase::Provisioning(d) | Phase::Validating(d) | Phase::ReadyToPromote(d) = &state.phase {
                expected[slot(d.colour)] = Some(d.release.clone());
            }
            let running = self.instances.clone().map(|i| i.map(|i| i.release));
            assert_eq!(running, expected, "running colours vs {state}");
            // Invariant 4: aborted, interrupted and rolled-back deployments were stopped.
            assert_eq!(self.cleanup, vec![]);
            // Invariant 2: one deployment in progress, the one the history says.
            assert_eq!(self.tracked.as_ref().map(|t| t.id), state.in_progress().map(|d| d.id));
            // Invariant 3: a deployment that ended before promotion left live traffic as it was.
            if let Some(live) = self.expect_live.take() {
                assert_eq!(state.live, live);
            }
        }

        fn crash_and_recover(&mut self, state: &State) -> State {
            self.routed = None;
            self.counts.crashes += 1;
            let t = state.recover();
            self.apply(state, &t, usize::MAX);
            t.state
        }
    }

    fn random_plan(rng: &mut Rng) -> Plan {
        let promote = match rng.below(3) {
            0 => Promotion::Manual,
            1 => Promotion::Auto { delay: Duration::ZERO },
            _ => Promotion::Auto {
                delay: Duration::from_secs(30),
            },
        };
        Plan {
            health_deadline: Duration::from_secs(10),
            promote,
            watch: WatchPolicy {
                duration: Duration::from_secs(60),
                min_requests: 50,
                max_error_rate: 0.05,
                max_p99: Some(Duration::from_millis(300)),
            },
            keep_warm: if rng.percent(30) {
                Duration::ZERO
            } else {
                Duration::from_secs(600)
            },
        }
    }

    enum Step {
        Event(Event),
        Crash,
    }

    /// Mostly the event the current phase waits for, otherwise anything, with ids of the
    /// deployment in progress, of finished ones, or never issued.
    fn random_step(rng: &mut Rng, state: &State, next_id: &mut u64) -> Step {
        if rng.percent(2) {
            return Step::Crash;
        }
        // The deployment the next report or timer most likely belongs to.
        let current = match &state.phase {
            Phase::Stable { warm: Some(w), .. } => Some(w.promoted_by),
            phase => phase.deployment().map(|d| d.id),
        };
        let any_id = |rng: &mut Rng, next_id: u64| match (rng.below(10), current) {
            (0..=5, Some(id)) => id,
            (0..=8, _) => DeploymentId(1 + rng.below(next_id.max(1))),
            _ => DeploymentId(next_id + 100),
        };
        let natural = rng.percent(75);
        let id = match current {
            Some(current) if natural && rng.percent(90) => current,
            _ => any_id(rng, *next_id),
        };
        let fresh = |rng: &mut Rng, next_id: &mut u64| {
            if rng.percent(5) && *next_id > 1 {
                DeploymentId(1 + rng.below(*next_id - 1))
            } else {
                *next_id += 1;
                DeploymentId(*next_id)
            }
        };
        // `kind` numbers the arms of the `match kind` below.
        let kind = if natural {
            let r = rng.below(100);
            match &state.phase {
                Phase::Stable { .. } if r < 60 => 0,
                Phase::Stable { .. } if r < 85 => 13,
                Phase::Stable { .. } => 11,
                Phase::Provisioning(_) if r < 85 => 1,
                Phase::Provisioning(_) if r < 92 => 3,
                Phase::Provisioning(_) if r < 95 => 2,
                Phase::Provisioning(_) => 12,
                Phase::Validating(_) if r < 85 => 4,
                Phase::Validating(_) if r < 92 => 5,
                Phase::Validating(_) if r < 95 => 6,
                Phase::Validating(_) => 12,
                Phase::ReadyToPromote(_) if r < 55 => 7,
                Phase::ReadyToPromote(_) if r < 90 => 8,
                Phase::ReadyToPromote(_) if r < 95 => 12,
                Phase::ReadyToPromote(_) => 6,
                Phase::Watching { .. } if r < 55 => 9,
                Phase::Watching { .. } if r < 90 => 10,
                Phase::Watching { .. } if r < 95 => 13,
                Phase::Watching { .. } => 6,
            }
        } else {
            rng.below(14)
        };
        let event = match kind {
            0 => Event::Deploy {
                id: fresh(rng, next_id),
                release: Release::new(format!("v{}", rng.below(5))),
                plan: random_plan(rng),
            },
            1 => Event::InstancesHealthy { id },
            2 => Event::ProvisionFailed {
                id,
                reason: "exited".into(),
            },
            3 => Event::HealthDeadlinePassed { id },
            4 => Event::SmokePassed { id },
            5 => Event::SmokeFailed {
                id,
                reason: "exit 1".into(),
            },
            6 => Event::Unhealthy {
                id,
                reason: "down".into(),
            },
            7 => Event::Promote {
                id: if rng.percent(50) { None } else { Some(id) },
            },
            8 => Event::AutoPromoteDue { id },
            9 => {
                let requests = rng.below(200);
                Event::WatchSample {
                    id,
                    sample: WatchSample {
                        requests,
                        errors: rng.below(requests / 16 + 1),
                        p99: Some(Duration::from_millis(rng.below(330))),
                    },
                }
            }
            10 => Event::WatchWindowElapsed { id },
            11 => Event::KeepWarmElapsed { id },
            12 => Event::Abort,
            _ => Event::Rollback {
                id: fresh(rng, next_id),
                plan: random_plan(rng),
            },
        };
        Step::Event(event)
    }

    #[test]
    fn invariants_hold_after_any_sequence_of_events_crashes_and_recoveries() {
        let mut rng = Rng(0x5eed_c07e_0001);
        let mut totals = Counts::default();
        for sequence in 0..2_000 {
            let mut state = State::new("web");
            let mut world = World {
                counts: std::mem::take(&mut totals),
                ..World::default()
            };
            let mut next_id = 0;
            let len = 1 + rng.below(30);
            for _ in 0..len {
                match random_step(&mut rng, &state, &mut next_id) {
                    Step::Crash => state = world.crash_and_recover(&state),
                    Step::Event(event) => {
                        world.observe(&event);
                        let name = event.name();
                        match state.step(event) {
                            Ok(t) => {
                                // Sometimes the daemon dies halfway through the actions.
                                let truncate = rng.percent(4);
                                let executed = if truncate {
                                    rng.below(t.actions.len() as u64 + 1) as usize
                                } else {
                                    usize::MAX
                                };
                                world.apply(&state, &t, executed);
                                state = t.state;
                                if truncate {
                                    world.counts.truncated += 1;
                                    state = world.crash_and_recover(&state);
                                }
                            }
                            Err(e) => {
                                assert!(
                                    e.to_string().starts_with("service web: "),
                                    "sequence {sequence}, {name}: {e}"
                                );
                                match e.kind() {
                                    ErrorKind::Conflict => world.counts.conflict += 1,
                                    ErrorKind::Refused => world.counts.refused += 1,
                                    ErrorKind::Stale => world.counts.stale += 1,
                                    ErrorKind::Internal => world.counts.internal += 1,
                                }
                            }
                        }
                    }
                }
                world.check(&state);
            }
            totals = world.counts;
        }
        // The sequences must actually reach every outcome, or the invariants prove little.
        let c = totals;
        eprintln!("{c:?}");
        for (what, n, min) in [
            ("first deployments live", c.first_live, 700),
            ("watched deployments live", c.watched_live, 300),
            ("aborted", c.aborted, 1000),
            ("interrupted", c.interrupted, 300),
            ("rolled back by the watch", c.rolled_back_by_watch, 150),
            ("rolled back on request", c.rolled_back_by_request, 100),
            ("cold rollbacks", c.cold_rollbacks, 50),
            ("retired", c.retired, 200),
            ("crashes", c.crashes, 600),
            ("truncated", c.truncated, 350),
            ("conflicts", c.conflict, 150),
            ("refused", c.refused, 1500),
            ("stale", c.stale, 2500),
            ("internal", c.internal, 600),
        ] {
            assert!(n >= min, "only {n} {what} (want {min}): {c:?}");
        }
    }
}
