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
        migrate: Default::default(),
        gradual: None,
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
    Event::SmokePassed {
        id: id(n),
        detail: None,
    }
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
        contract: None,
        contracted: None,
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
            record(Record::Validated {
                id: id(1),
                detail: None
            }),
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
            record(Record::Validated {
                id: id(2),
                detail: None
            }),
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
            record(Record::Validated {
                id: id(2),
                detail: None
            }),
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
        // Blue stays warm, but what it still serves is drained now.
        Action::Drain { colour: Colour::Blue },
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
            step: None,
        },
    )
}

#[test]
fn smoke_pass_with_auto_promotion_switches_at_once_and_watches() {
    let t = ok(&validating(auto()), smoke_passed(2));
    assert_eq!(
        t.actions,
        promoted_actions(vec![record(Record::Validated {
            id: id(2),
            detail: None
        })])
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
    assert_rolled_back_from_warm(&t, Reason::Requested);
}

/// Deployment 2, past its watch, rolled back to the warm blue@v1.
fn assert_rolled_back_from_warm(t: &Transition, reason: Reason) {
    assert_eq!(
        t.actions,
        vec![
            Action::SwitchTo { colour: Colour::Blue },
            record(Record::RolledBack {
                id: id(2),
                to: at(Colour::Blue, "v1"),
                reason: reason.clone()
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
                last: ended(2, "v2", Outcome::RolledBack(reason))
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
    assert_eq!(
        t.actions[0],
        record(Record::Validated {
            id: id(3),
            detail: None
        })
    );
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
                judged: false,
                step: None,
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

// ----- A switch some nodes of a fleet did not apply -----

fn not_acked(n: u64) -> Event {
    Event::NotAcknowledged {
        id: id(n),
        nodes: "nodes n3 did not acknowledge".to_string(),
    }
}

#[test]
fn a_switch_not_acknowledged_while_watching_rolls_back_at_once() {
    let t = ok(&watching(), not_acked(2));
    assert_rolled_back_from_watch(&t, Reason::NotAcknowledged("nodes n3 did not acknowledge".to_string()));
}

#[test]
fn a_switch_not_acknowledged_after_the_watch_rolls_back_to_the_warm_colour() {
    let t = ok(&stable_warm(), not_acked(2));
    assert_rolled_back_from_warm(&t, Reason::NotAcknowledged("nodes n3 did not acknowledge".to_string()));
}

#[test]
fn a_missing_acknowledgement_with_nothing_to_return_to_changes_nothing() {
    // The first release, a retired previous colour, another deployment's switch, and a
    // deployment in progress: late, nothing is undone.
    for (state, n) in [
        (first_live(), 1),
        (stable_cold(), 2),
        (stable_warm(), 1),
        (provisioning(auto()), 2),
    ] {
        let e = err(&state, not_acked(n));
        assert_eq!(e.kind(), ErrorKind::Stale, "{e}");
    }
}

// ----- Schema changes (migrate) -----

fn migrating(expand: bool, contract: bool, rollback: bool) -> Plan {
    let mut p = auto();
    p.migrate = MigratePlan {
        expand,
        contract,
        rollback,
    };
    p
}
fn finished(n: u64, step: MigrationStep, ok: bool) -> Event {
    Event::MigrationFinished {
        id: id(n),
        step,
        ok,
        detail: format!("{step} said {ok}"),
    }
}
fn runs(t: &Transition) -> Vec<(MigrationStep, Release)> {
    t.actions
        .iter()
        .filter_map(|a| match a {
            Action::RunMigration { step, release, .. } => Some((*step, release.clone())),
            _ => None,
        })
        .collect()
}
fn starts(t: &Transition) -> bool {
    t.actions.iter().any(|a| matches!(a, Action::StartInstances { .. }))
}

#[test]
fn expand_and_the_live_check_run_before_any_instance_starts() {
    let t = ok(&first_live(), deploy(2, "v2", migrating(true, false, false)));
    assert_eq!(runs(&t), vec![(MigrationStep::Expand, rel("v2"))]);
    assert!(!starts(&t), "{:?}", t.actions);
    assert_eq!(t.state.phase.name(), "migrating");
    let t = ok(&t.state, finished(2, MigrationStep::Expand, true));
    assert_eq!(runs(&t), vec![(MigrationStep::Check, rel("v2"))]);
    assert!(!starts(&t));
    // A late or foreign report changes nothing.
    assert_eq!(
        err(&t.state, finished(2, MigrationStep::Expand, true)).kind(),
        ErrorKind::Stale
    );
    assert_eq!(
        err(&t.state, finished(1, MigrationStep::Check, true)).kind(),
        ErrorKind::Stale
    );
    let t = ok(&t.state, finished(2, MigrationStep::Check, true));
    assert!(starts(&t));
    assert_eq!(t.state.phase.name(), "provisioning");
    assert!(t.records().any(|r| matches!(
        r,
        Record::Migration {
            step: MigrationStep::Check,
            ok: true,
            ..
        }
    )));
}

#[test]
fn a_failed_expand_aborts_with_live_untouched() {
    let s = ok(&first_live(), deploy(2, "v2", migrating(true, false, true))).state;
    let t = ok(&s, finished(2, MigrationStep::Expand, false));
    assert!(runs(&t).is_empty(), "no rollback of an expand that failed itself");
    assert_eq!(t.state.live, Some(at(Colour::Blue, "v1")));
    assert!(!t.actions.iter().any(|a| matches!(a, Action::SwitchTo { .. })));
    match &t.state.phase {
        Phase::Stable { last: Some(e), .. } => {
            assert!(matches!(&e.outcome, Outcome::Aborted(Reason::MigrationFailed(why)) if why.starts_with("expand: ")))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_live_check_that_fails_runs_the_rollback_then_aborts() {
    let s = ok(&first_live(), deploy(2, "v2", migrating(true, false, true))).state;
    let s = ok(&s, finished(2, MigrationStep::Expand, true)).state;
    let t = ok(&s, finished(2, MigrationStep::Check, false));
    assert_eq!(runs(&t), vec![(MigrationStep::Rollback, rel("v2"))]);
    assert!(!starts(&t));
    // Not interrupted halfway.
    assert_eq!(err(&t.state, Event::Abort).kind(), ErrorKind::Conflict);
    let t = ok(&t.state, finished(2, MigrationStep::Rollback, true));
    assert_eq!(t.state.live, Some(at(Colour::Blue, "v1")));
    match &t.state.phase {
        Phase::Stable { last: Some(e), .. } => {
            assert!(matches!(&e.outcome, Outcome::Aborted(Reason::LiveCheckFailed(why)) if why == "check said false"))
        }
        other => panic!("{other:?}"),
    }
    // Without a rollback command: aborted at once.
    let s = ok(&first_live(), deploy(2, "v2", migrating(true, false, false))).state;
    let s = ok(&s, finished(2, MigrationStep::Expand, true)).state;
    let t = ok(&s, finished(2, MigrationStep::Check, false));
    assert!(runs(&t).is_empty());
    assert_eq!(t.state.phase.name(), "stable");
}

/// green@v2 live (deployment 2 with a contract step), blue@v1 warm.
fn warm_owing_contract() -> State {
    let s = ok(&first_live(), deploy(2, "v2", migrating(false, true, false))).state;
    assert_eq!(s.phase.name(), "provisioning", "no expand: straight to the instances");
    let s = ok(&s, healthy(2)).state;
    let s = ok(&s, smoke_passed(2)).state;
    let s = ok(&s, Event::WatchWindowElapsed { id: id(2) }).state;
    assert!(s.warm().is_some());
    s
}

#[test]
fn contract_waits_for_the_retirement_and_then_no_rollback_can_need_the_old_schema() {
    let s = warm_owing_contract();
    assert_eq!(s.contract.as_ref().map(|c| c.running), Some(false));
    // While v1 is warm, an instant rollback works and the contract never runs.
    let back = ok(
        &s,
        Event::Rollback {
            id: id(3),
            plan: auto(),
        },
    );
    assert!(runs(&back).is_empty());
    assert_eq!(back.state.contract, None);
    // At the end of keep-warm: v1 retired, then contract.
    let t = ok(&s, Event::KeepWarmElapsed { id: id(2) });
    let retired = t
        .actions
        .iter()
        .position(|a| matches!(a, Action::StopInstances { colour: Colour::Blue }));
    let contract = t.actions.iter().position(|a| matches!(a, Action::RunMigration { .. }));
    assert!(retired.is_some() && retired < contract, "{:?}", t.actions);
    assert_eq!(runs(&t), vec![(MigrationStep::Contract, rel("v2"))]);
    // While it runs: no deploy, no rollback.
    assert_eq!(err(&t.state, deploy(3, "v3", auto())).kind(), ErrorKind::Conflict);
    assert_eq!(
        err(
            &t.state,
            Event::Rollback {
                id: id(3),
                plan: auto()
            }
        )
        .kind(),
        ErrorKind::Conflict
    );
    let done = ok(&t.state, finished(2, MigrationStep::Contract, true));
    assert_eq!(done.state.contracted, Some(rel("v2")));
    // A cold rollback to v1 is refused, saying why.
    let e = err(
        &done.state,
        Event::Rollback {
            id: id(3),
            plan: auto(),
        },
    );
    assert_eq!(e.kind(), ErrorKind::Refused);
    assert!(e.to_string().contains("the contract step of v2 ran"), "{e}");
    // A failed contract leaves the cold rollback possible.
    let failed = ok(&t.state, finished(2, MigrationStep::Contract, false));
    assert_eq!(failed.state.contracted, None);
    let cold = ok(
        &failed.state,
        Event::Rollback {
            id: id(3),
            plan: auto(),
        },
    );
    assert_eq!(cold.rollback_kind(), Some(RollbackKind::Cold));
}

#[test]
fn a_deploy_that_retires_the_warm_colour_runs_the_contract_owed_first() {
    let s = warm_owing_contract();
    let t = ok(&s, deploy(3, "v3", migrating(true, false, false)));
    assert_eq!(runs(&t), vec![(MigrationStep::Contract, rel("v2"))]);
    assert!(!starts(&t));
    let t = ok(&t.state, finished(3, MigrationStep::Contract, true));
    assert_eq!(t.state.contracted, Some(rel("v2")));
    assert_eq!(runs(&t), vec![(MigrationStep::Expand, rel("v3"))]);
    // A cold rollback to v1 owes nothing and runs nothing.
    let s = ok(&warm_owing_contract(), Event::KeepWarmElapsed { id: id(2) }).state;
    let s = ok(&s, finished(2, MigrationStep::Contract, false)).state;
    let t = ok(
        &s,
        Event::Rollback {
            id: id(3),
            plan: migrating(true, true, true),
        },
    );
    assert!(runs(&t).is_empty() && starts(&t), "{:?}", t.actions);
}

#[test]
fn a_restart_during_a_schema_change_interrupts_it_and_says_so() {
    let s = ok(&first_live(), deploy(2, "v2", migrating(true, false, false))).state;
    let t = s.recover();
    assert_eq!(t.state.live, Some(at(Colour::Blue, "v1")));
    assert!(t
        .records()
        .any(|r| matches!(r, Record::Migration { ok: false, detail, .. } if detail.contains("interrupted"))));
    assert!(t
        .records()
        .any(|r| matches!(r, Record::Interrupted { phase: "migrating", .. })));
    let s = ok(&warm_owing_contract(), Event::KeepWarmElapsed { id: id(2) }).state;
    let t = s.recover();
    assert_eq!(t.state.contract, None);
    assert_eq!(t.state.contracted, None, "not known to have run");
}

// ----- Gradual switch -----

fn gradual(steps: &[u8]) -> Plan {
    Plan {
        gradual: Some(Gradual {
            steps: steps.to_vec(),
            step: Duration::from_secs(60),
        }),
        ..auto()
    }
}

fn step_of(s: &State) -> Option<usize> {
    match &s.phase {
        Phase::Watching { step, .. } => *step,
        other => panic!("not watching: {other:?}"),
    }
}

#[test]
fn a_gradual_switch_moves_step_by_step_then_switches_and_watches_its_window() {
    let s = validating(gradual(&[10, 50, 100]));
    let t = ok(&s, smoke_passed(2));
    assert_eq!(
        t.actions,
        vec![
            record(Record::Validated {
                id: id(2),
                detail: None
            }),
            record(Record::Promoted {
                id: id(2),
                colour: Colour::Green
            }),
            Action::Split {
                colour: Colour::Green,
                percent: 10
            },
            Action::StartWatch {
                deployment: id(2),
                colour: Colour::Green
            },
            Action::ArmTimer {
                deployment: id(2),
                timer: Timer::PromoteStep,
                after: Duration::from_secs(60)
            },
        ]
    );
    // Live is still blue@v1, which is also the way back.
    assert_eq!(t.state.live, Some(at(Colour::Blue, "v1")));
    assert_eq!(step_of(&t.state), Some(0));
    // The watch window does not apply before the switch.
    err(&t.state, Event::WatchWindowElapsed { id: id(2) });
    // A sample that passes keeps the step; the next step's share follows its timer.
    let s = ok(&t.state, sample(2, 200, 1, 100)).state;
    assert_eq!(step_of(&s), Some(0));
    let t = ok(&s, Event::PromoteStepDue { id: id(2) });
    assert_eq!(
        t.actions,
        vec![
            Action::Split {
                colour: Colour::Green,
                percent: 50
            },
            Action::ArmTimer {
                deployment: id(2),
                timer: Timer::PromoteStep,
                after: Duration::from_secs(60)
            },
        ]
    );
    assert_eq!(step_of(&t.state), Some(1));
    assert_eq!(
        t.state.status(),
        "gradual switch of deployment 2 (v2): 50% of live traffic on green, step 2 of 3, live blue@v1"
    );
    // The last step is the switch: the old colour drained and kept warm, the window from now.
    let t = ok(&t.state, Event::PromoteStepDue { id: id(2) });
    assert_eq!(
        t.actions,
        vec![
            Action::SwitchTo { colour: Colour::Green },
            Action::Drain { colour: Colour::Blue },
            Action::ArmTimer {
                deployment: id(2),
                timer: Timer::WatchWindow,
                after: Duration::from_secs(300)
            },
        ]
    );
    assert_eq!(t.state.live, Some(at(Colour::Green, "v2")));
    assert_eq!(t.state.previous, Some(rel("v1")));
    assert_eq!(step_of(&t.state), None);
    // A late step timer changes nothing; the window ends the deployment as usual.
    err(&t.state, Event::PromoteStepDue { id: id(2) });
    let s = ok(&t.state, Event::WatchWindowElapsed { id: id(2) }).state;
    assert_eq!(s.warm().map(|w| w.colour), Some(Colour::Blue));
}

#[test]
fn a_gradual_switch_failing_its_watch_at_a_step_rolls_back_at_once() {
    let s = ok(&validating(gradual(&[10, 50, 100])), smoke_passed(2)).state;
    let t = ok(&s, sample(2, 150, 30, 100));
    assert_eq!(
        t.actions,
        vec![
            Action::SwitchTo { colour: Colour::Blue },
            record(Record::RolledBack {
                id: id(2),
                to: at(Colour::Blue, "v1"),
                reason: Reason::ErrorRate {
                    errors: 30,
                    requests: 150,
                    max: 0.01
                },
            }),
            Action::StopWatch { deployment: id(2) },
            Action::Drain { colour: Colour::Green },
            Action::StopInstances { colour: Colour::Green },
        ]
    );
    assert_eq!(t.state.live, Some(at(Colour::Blue, "v1")));
    assert!(t.state.warm().is_none());
    // `cutover rollback` during a step goes back the same way.
    let t = ok(
        &s,
        Event::Rollback {
            id: id(3),
            plan: auto(),
        },
    );
    assert_eq!(t.actions[0], Action::SwitchTo { colour: Colour::Blue });
    assert_eq!(t.state.live, Some(at(Colour::Blue, "v1")));
}

#[test]
fn promote_during_a_gradual_switch_switches_now() {
    let s = ok(&validating(gradual(&[10, 50, 100])), smoke_passed(2)).state;
    // Another deployment's id is refused, changing nothing.
    err(&s, Event::Promote { id: Some(id(7)) });
    let t = ok(&s, Event::Promote { id: None });
    assert_eq!(t.actions[0], Action::SwitchTo { colour: Colour::Green });
    assert_eq!(t.state.live, Some(at(Colour::Green, "v2")));
    assert_eq!(step_of(&t.state), None);
    // Once switched, nothing is left to promote.
    err(&t.state, Event::Promote { id: None });
}

#[test]
fn a_restart_during_a_gradual_switch_starts_its_step_over() {
    let s = ok(&validating(gradual(&[10, 50, 100])), smoke_passed(2)).state;
    let s = ok(&s, Event::PromoteStepDue { id: id(2) }).state;
    let t = s.recover();
    assert_eq!(
        t.actions,
        vec![
            record(Record::WatchRestarted { id: id(2) }),
            Action::Adopt {
                colour: Colour::Blue,
                release: rel("v1")
            },
            Action::SwitchTo { colour: Colour::Blue },
            Action::Adopt {
                colour: Colour::Green,
                release: rel("v2")
            },
            Action::Split {
                colour: Colour::Green,
                percent: 50
            },
            Action::StartWatch {
                deployment: id(2),
                colour: Colour::Green
            },
            Action::ArmTimer {
                deployment: id(2),
                timer: Timer::PromoteStep,
                after: Duration::from_secs(60)
            },
        ]
    );
    assert_eq!(step_of(&t.state), Some(1));
    assert_eq!(t.state.live, Some(at(Colour::Blue, "v1")));
}

#[test]
fn a_single_step_of_100_is_the_atomic_switch() {
    // steps = [100] is the atomic switch.
    let t = ok(&validating(gradual(&[100])), smoke_passed(2));
    assert!(t.actions.contains(&Action::SwitchTo { colour: Colour::Green }));
    assert_eq!(step_of(&t.state), None);
}
