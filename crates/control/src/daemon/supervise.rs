//! Supervision of the service actors: a panic in one is a fault of that service's control, never
//! of the daemon, and never of live traffic.
//!
//! The proxy shares the daemon's process, so the release build unwinds (`panic = "unwind"`) and
//! tokio keeps a panicking task from taking anything else down. That alone would leave the
//! service unmanaged (its mailbox closed, every command answered "shutting down") and, worse, its
//! instances stopped: dropping a [`ProcessGroup`](crate::process::ProcessGroup) stops them. So
//! each actor runs under [`service`], which catches the panic where the actor's `run` is awaited
//! and then does what a `kill -9` and restart of the daemon would do, for this one service:
//!
//! 1. says so: an error in the log naming the service and the panic message, and a
//!    [`EventKind::Fault`] notice with the message as its reason (the event stream, webhooks,
//!    the dashboard and the `cutover_control_faults_total` counter read it);
//! 2. hands the instances over instead of stopping them ([`Actor::hand_over`]): each process
//!    group is detached (its processes keep running, on the same pids and ports, and the route
//!    table keeps routing to them) and recorded in the store as they run now; the dead actor's
//!    health checks and forwarders are stopped, its smoke and watch tasks aborted, and its lanes
//!    finish the drains and stops already decided (the state that decided them is committed), so
//!    that nothing of it acts on the service any more;
//! 3. waits out a backoff (1 s after a fault, doubling to 1 min while the actor keeps failing
//!    within a minute of its start, so a panic loop costs little and each round is reported);
//! 4. starts a new actor from the committed state, exactly as a daemon start does: it loads the
//!    state, recovers it ([`Actor::recover`]: an interrupted deployment ends as `interrupted`, the
//!    live and warm colours are adopted with their running processes) and takes the same mailbox.
//!
//! The mailbox (`mpsc::Receiver<Msg>`) belongs to this supervisor and is only lent to each actor,
//! so the senders in [`Daemon`](super::Daemon) stay valid across restarts; commands sent
//! meanwhile wait in it. The command being handled when the actor panicked is lost, and its
//! caller is told so ([`super::CommandError::Faulted`]). Reports travel on a fresh channel per
//! actor: anything the dead one started and that still reports (a timer, a lane's last job)
//! reports into a closed channel, never to its successor.
//!
//! What is not covered: a panic in the narrow stretch where a run was taken out of the actor and
//! not yet handed to a lane, or where a started group is not yet in a run, drops that group, which
//! stops it. Such a group is not (or no longer) live, and the recovery stops what the store still
//! records on colours that are neither live nor warm.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Actor, EventKind, Lane, Msg, Report, Shared};
use crate::config::ServiceConfig;
use crate::lifecycle::State;
use crate::store::StoreError;
use cutover_proxy::Colour;

/// Runs a service's actor, and a new one after each panic, until the daemon stops it
/// ([`Msg::Shutdown`]) or every sender of its mailbox is gone. `actor` has recovered already.
pub(super) async fn service(
    mut actor: Actor,
    mut commands: mpsc::Receiver<Msg>,
    mut reports: mpsc::UnboundedReceiver<Report>,
) {
    let shared = actor.shared.clone();
    let cfg = actor.cfg.clone();
    let mut backoff = RestartBackoff::default();
    let mut recovered = true;
    loop {
        let started = Instant::now();
        let incarnation = async {
            if !recovered {
                actor.recover().await;
            }
            actor.run(&mut commands, &mut reports).await
        };
        // AssertUnwindSafe: after a panic nothing of the actor's memory is trusted except its
        // runs (whose groups and checkers are whole: the actor only moves them around), which
        // `hand_over` passes on; the next actor starts from the store.
        let outcome = AssertUnwindSafe(incarnation).catch_unwind().await;
        let Err(payload) = outcome else {
            return; // stopped as asked
        };
        let reason = crate::panics::message(payload.as_ref());
        let delay = backoff.after_fault(started.elapsed());
        tracing::error!(service = %cfg.name, panic = %reason, restart_in = ?delay,
            "the service's control task panicked; its instances keep serving and it restarts from the committed state");
        shared.notice(
            &cfg.name,
            None,
            EventKind::Fault,
            format!(
                "control of {} failed ({reason}); its instances keep serving, and it restarts from the committed state in {delay:?}",
                cfg.name
            ),
            Some(reason),
        );
        let restart_at = Instant::now() + delay;
        actor.hand_over().await;
        tokio::time::sleep_until(restart_at).await;
        // Loading fails only on a store error; try again, as slowly as after a fault.
        (actor, reports) = loop {
            match Actor::load(shared.clone(), cfg.clone()).await {
                Ok(loaded) => break loaded,
                Err(e) => {
                    let wait = backoff.after_fault(Duration::ZERO);
                    tracing::error!(service = %cfg.name, error = %e, retry_in = ?wait,
                        "cannot load the committed state to restart the service's control");
                    tokio::time::sleep(wait).await;
                }
            }
        };
        recovered = false;
    }
}

impl Actor {
    /// A new actor for `cfg` with the state the store has committed (a fresh one if none), and the
    /// receiver of its reports. Nothing runs yet: [`Actor::recover`] brings its colours back.
    pub(super) async fn load(
        shared: Arc<Shared>,
        cfg: ServiceConfig,
    ) -> Result<(Actor, mpsc::UnboundedReceiver<Report>), StoreError> {
        let loaded = {
            let (store, name) = (shared.store.clone(), cfg.name.clone());
            super::off_async_store(move || store.load(&name)).await?
        };
        let (state, revision) = loaded.unwrap_or_else(|| (State::new(&cfg.name), crate::store::Revision::NONE));
        let (reports, reports_rx) = mpsc::unbounded_channel();
        let lanes = [Colour::Blue, Colour::Green]
            .map(|colour| Lane::start(shared.clone(), cfg.name.clone(), colour, reports.clone()));
        let actor = Actor {
            shared,
            cfg,
            state,
            revision,
            runs: [None, None],
            lanes,
            statics: Default::default(),
            smoke: None,
            watch: None,
            last_run: 0,
            reports,
            pin: None,
            urgent: None,
            fleet_said: None,
            others: None,
            held: None,
        };
        Ok((actor, reports_rx))
    }

    /// After a panic: leaves the instances running and recorded for the next actor to adopt, and
    /// ends everything of this one that could still act on the service. See the module doc.
    async fn hand_over(&mut self) {
        self.abort_tasks();
        // A gradual switch's share was watched by the task just aborted: every live request goes
        // back to the live colour until the next actor, recovering, sets the step again.
        let split = self.shared.proxy.table().service(self.name()).and_then(|s| s.split());
        if let Some(split) = split {
            let _ = self.shared.proxy.split(self.name(), split.colour, 0);
            tracing::warn!(service = self.name(), colour = %split.colour,
                "the gradual switch's share on {} goes back to the live colour until the service's control restarts", split.colour);
        }
        for colour in [Colour::Blue, Colour::Green] {
            // What runs now, which may differ from what the store has (an instance restarted
            // since), is recorded: the next actor adopts from the store.
            if let Some((release, running)) = self.leave_running(colour).await {
                tracing::info!(service = self.name(), %colour, %release,
                    pids = ?running.iter().map(|r| r.pid).collect::<Vec<_>>(), "instances handed over");
            }
        }
        // Drains and stops already queued were decided on committed state: let them finish before
        // another actor acts on the same colours (a stop finishing later would clear the pool
        // and the records of what the next actor starts there).
        for colour in [Colour::Blue, Colour::Green] {
            self.end_pin(colour, true);
        }
        let [blue, green] = &mut self.lanes;
        tokio::join!(finish(blue), finish(green));
    }
}

/// Closes a lane and waits for what it has queued, unless it is closed already (by a panic late
/// in a shutdown, after the lanes were closed): a finished task must not be awaited again.
async fn finish(lane: &mut Lane) {
    if !lane.task.is_finished() {
        lane.close().await;
    }
}

/// How long to wait before restarting an actor that panicked.
///
/// [`RestartBackoff::FIRST`] after a fault of an actor that had run for at least
/// [`RestartBackoff::STABLE`]; after a quicker fault, twice the last wait, up to
/// [`RestartBackoff::MAX`]. A panic loop (an actor that fails while recovering, say) thus settles
/// at one restart, and one fault report, a minute, while a one-off fault costs a second.
#[derive(Debug, Default)]
struct RestartBackoff {
    /// The last wait; `None` before the first fault.
    last: Option<Duration>,
}

impl RestartBackoff {
    const FIRST: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(60);
    const STABLE: Duration = Duration::from_secs(60);

    /// The wait after a fault of an actor that had run for `ran`.
    fn after_fault(&mut self, ran: Duration) -> Duration {
        let next = match self.last {
            Some(last) if ran < Self::STABLE => (last * 2).min(Self::MAX),
            _ => Self::FIRST,
        };
        self.last = Some(next);
        next
    }
}

/// For tests: a deploy of the version named in `CUTOVER_TEST_PANIC_ON_DEPLOY` panics the
/// service's actor, as a bug in it would.
///
/// Compiled only with debug assertions, i.e. into the debug binary `cargo test` builds and runs;
/// the release build users run has no trace of it (no variable is read, no route exists). An
/// environment variable rather than an admin route: it needs the operator's hand on the daemon's
/// environment, and nothing a client sends can reach it.
#[cfg(debug_assertions)]
pub(super) fn inject_fault(service: &str, version: &str) {
    if std::env::var_os("CUTOVER_TEST_PANIC_ON_DEPLOY").is_some_and(|v| v == version) {
        panic!("injected fault: deploy of {service} {version} (CUTOVER_TEST_PANIC_ON_DEPLOY)");
    }
}

#[cfg(not(debug_assertions))]
#[inline(always)]
pub(super) fn inject_fault(_service: &str, _version: &str) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_backoff_doubles_while_faults_come_quickly_and_starts_over_after_a_stable_run() {
        let mut b = RestartBackoff::default();
        let quick = Duration::from_millis(10);
        let waits: Vec<u64> = (0..9).map(|_| b.after_fault(quick).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(b.after_fault(RestartBackoff::STABLE), RestartBackoff::FIRST);
        assert_eq!(b.after_fault(quick), Duration::from_secs(2));
    }
}
