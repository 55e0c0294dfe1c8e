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
    migrations: u32,
    contracts: u32,
}

#[derive(Debug, Default)]
struct World {
    instances: [Option<Instances>; 2],
    /// The proxy's active colour. Lost in a crash: the proxy runs inside the daemon.
    routed: Option<Colour>,
    /// The colour taking a share of live traffic in a gradual switch; ended by any switch.
    split: Option<Colour>,
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
                Event::SmokePassed { id, .. } if inst.started_by == id && inst.healthy => inst.validated = true,
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
                // In a gradual switch, live is still the colour rolled back to; the split's is bad.
                let bad = match &before.phase {
                    Phase::Watching {
                        step: Some(_),
                        deployment,
                        ..
                    } => deployment.colour,
                    _ => before.live.as_ref().expect("rollback with nothing live").colour,
                };
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
            Record::Migration { step, .. } => {
                self.counts.migrations += 1;
                if *step == MigrationStep::Contract {
                    self.counts.contracts += 1;
                }
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
                self.split = None;
            }
            Action::Split { colour, percent } => {
                // Invariant 1 holds for a share of live traffic too.
                let inst = self.instances[slot(*colour)].as_ref();
                assert!(
                    inst.is_some_and(|i| i.healthy && i.validated),
                    "{percent}% to {colour}: {inst:?}"
                );
                assert!((1..100).contains(percent));
                assert_ne!(self.routed, Some(*colour), "a share for the live colour");
                self.split = Some(*colour);
            }
            Action::StartWatch { deployment, colour } => {
                assert!(self.routed == Some(*colour) || self.split == Some(*colour));
                assert_eq!(self.tracked.as_ref().map(|t| t.id), Some(*deployment));
            }
            Action::RunMigration { deployment, step, .. } => match step {
                // Invariant 5: a contract runs only once nothing but the live colour runs: no
                // instant rollback to a release that needs the old schema is possible.
                MigrationStep::Contract => {
                    let idle = self.routed.map(|c| slot(c.other()));
                    assert!(
                        idle.is_none_or(|i| self.instances[i].is_none()),
                        "contract while the idle colour runs {:?}",
                        idle.map(|i| &self.instances[i])
                    );
                }
                // Invariant 6: expand, its check and its rollback run before any instance of
                // the deployment starts.
                _ => {
                    assert_eq!(self.tracked.as_ref().map(|t| t.id), Some(*deployment));
                    assert!(
                        self.instances.iter().flatten().all(|i| i.started_by != *deployment),
                        "{step} after the instances of deployment {deployment} started"
                    );
                }
            },
            Action::CancelSmoke { .. } | Action::StopWatch { .. } | Action::ArmTimer { .. } | Action::Record(_) => {}
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
        // A gradual switch in progress: its colour runs and takes its share, nothing else does.
        let split = match &state.phase {
            Phase::Watching {
                step: Some(_),
                deployment: d,
                ..
            } => {
                expected[slot(d.colour)] = Some(d.release.clone());
                Some(d.colour)
            }
            _ => None,
        };
        assert_eq!(self.split, split, "the split vs {state}");
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
        self.split = None;
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
        migrate: MigratePlan {
            expand: rng.percent(40),
            contract: rng.percent(40),
            rollback: rng.percent(50),
        },
        gradual: match rng.below(10) {
            0..=1 => Some(Gradual {
                steps: vec![10, 50, 100],
                step: Duration::from_secs(60),
            }),
            2 => Some(Gradual {
                steps: vec![25, 100],
                step: Duration::from_secs(30),
            }),
            _ => None,
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
            Phase::Stable { .. } if r < 82 => 13,
            Phase::Stable { .. } if r < 85 => 14,
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
            Phase::Watching { step: Some(_), .. } if r < 45 => 9,
            Phase::Watching { step: Some(_), .. } if r < 80 => 16,
            Phase::Watching { .. } if r < 55 => 9,
            Phase::Watching { .. } if r < 90 => 10,
            Phase::Watching { .. } if r < 93 => 13,
            Phase::Watching { .. } if r < 95 => 14,
            Phase::Watching { .. } => 6,
            Phase::Migrating { .. } if r < 90 => 15,
            Phase::Migrating { .. } if r < 95 => 12,
            Phase::Migrating { .. } => 13,
        }
    } else {
        rng.below(17)
    };
    let (id, step) = match (&state.phase, &state.contract) {
        (Phase::Migrating { step, .. }, _) if natural => (id, *step),
        (Phase::Stable { .. }, Some(c)) if natural && c.running => (c.id, MigrationStep::Contract),
        _ => (
            id,
            [
                MigrationStep::Contract,
                MigrationStep::Expand,
                MigrationStep::Check,
                MigrationStep::Rollback,
            ][rng.below(4) as usize],
        ),
    };
    // A contract running outside a deployment finishes soon, whatever comes.
    let kind = match &state.contract {
        Some(c) if c.running && natural && rng.percent(50) => 15,
        _ => kind,
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
        4 => Event::SmokePassed { id, detail: None },
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
        14 => Event::NotAcknowledged { id, nodes: "n3".into() },
        16 => Event::PromoteStepDue { id },
        15 => Event::MigrationFinished {
            id,
            step,
            ok: rng.percent(80),
            detail: "exited".into(),
        },
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
    for sequence in 0..2_400 {
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
        ("schema-change steps", c.migrations, 300),
        ("contract steps", c.contracts, 50),
    ] {
        assert!(n >= min, "only {n} {what} (want {min}): {c:?}");
    }
}
