use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Instant;

use super::*;
use crate::lifecycle::{Contract, Event, WatchSample};

fn rel(v: &str) -> Release {
    Release::new(v)
}

fn at(colour: Colour, v: &str) -> Live {
    Live {
        colour,
        release: rel(v),
    }
}

fn open(dir: &tempfile::TempDir) -> Store {
    Store::open(dir.path()).expect("open the store")
}

fn audit(actor: &str, action: &str, arguments: &str) -> Audit {
    Audit {
        actor: actor.to_string(),
        service: None,
        action: action.to_string(),
        arguments: arguments.to_string(),
        result: "ok".to_string(),
    }
}

/// Plans with every promotion, with and without a latency check, and extreme values.
fn plans() -> Vec<Plan> {
    vec![
        Plan {
            health_deadline: Duration::from_secs(30),
            promote: Promotion::Manual,
            watch: WatchPolicy {
                duration: Duration::from_secs(300),
                min_requests: 0,
                max_error_rate: 0.0,
                max_p99: None,
            },
            keep_warm: Duration::ZERO,
            migrate: Default::default(),
            gradual: None,
        },
        Plan {
            health_deadline: Duration::from_millis(1500),
            promote: Promotion::Auto { delay: Duration::ZERO },
            watch: WatchPolicy {
                duration: Duration::from_secs(60),
                min_requests: 100,
                max_error_rate: 0.01,
                max_p99: Some(Duration::from_millis(500)),
            },
            keep_warm: Duration::from_secs(3600),
            migrate: Default::default(),
            gradual: None,
        },
        Plan {
            // The longest duration the store holds.
            health_deadline: Duration::from_nanos(i64::MAX as u64),
            promote: Promotion::Auto {
                delay: Duration::new(1, 7),
            },
            watch: WatchPolicy {
                duration: Duration::new(0, 1),
                min_requests: i64::MAX as u64,
                max_error_rate: 0.1 + 0.2,
                max_p99: Some(Duration::new(0, 999_999_999)),
            },
            keep_warm: Duration::from_secs(200 * 365 * 24 * 3600),
            migrate: MigratePlan {
                expand: true,
                contract: true,
                rollback: true,
            },
            gradual: Some(crate::lifecycle::Gradual {
                steps: vec![1, 5, 25, 99, 100],
                step: Duration::new(59, 999),
            }),
        },
    ]
}

fn reasons() -> Vec<Reason> {
    vec![
        Reason::Requested,
        Reason::ProvisionFailed("exited with status 127: \"./web\" not found\nline 2 ünïcödé".to_string()),
        Reason::HealthDeadline(Duration::new(30, 1)),
        Reason::SmokeFailed(String::new()),
        Reason::Unhealthy("0 of 2 instances healthy; 'quotes'".to_string()),
        Reason::ErrorRate {
            errors: 7,
            requests: i64::MAX as u64,
            max: 1.0 / 3.0,
        },
        Reason::Latency {
            p99: Duration::new(0, 512_345_678),
            max: Duration::from_millis(500),
        },
        Reason::NotAcknowledged("n2, n3".to_string()),
        Reason::MigrationFailed(
            "expand: `./migrate expand` exited with 3 after 1.2s: ERROR: column \"x\" exists".to_string(),
        ),
        Reason::LiveCheckFailed("`./check` exited with 1".to_string()),
    ]
}

fn outcomes() -> Vec<Outcome> {
    let mut all = vec![Outcome::WentLive, Outcome::Interrupted];
    all.extend(reasons().into_iter().map(Outcome::Aborted));
    all.extend(reasons().into_iter().map(Outcome::RolledBack));
    all
}

/// Every state shape: each phase, with and without its optional parts, every outcome and
/// reason, every plan and cause.
fn all_states(service: &str) -> Vec<State> {
    let state = |live: Option<Live>, previous: Option<&str>, last_id: Option<u64>, phase: Phase| State {
        service: service.to_string(),
        live,
        previous: previous.map(rel),
        last_id: last_id.map(DeploymentId),
        phase,
        contract: None,
        contracted: None,
    };
    let warm = Warm {
        colour: Colour::Blue,
        release: rel("v3"),
        promoted_by: DeploymentId(4),
        keep_warm: Duration::from_secs(3600),
    };
    let mut all = vec![State::new(service)];
    all.push(state(
        Some(at(Colour::Green, "v4")),
        Some("v3"),
        Some(4),
        Phase::Stable {
            warm: Some(warm.clone()),
            last: None,
        },
    ));
    for (n, outcome) in outcomes().into_iter().enumerate() {
        for warm in [None, Some(warm.clone())] {
            all.push(state(
                Some(at(Colour::Green, "v4")),
                (n % 2 == 0).then_some("v3"),
                Some(4),
                Phase::Stable {
                    warm,
                    last: Some(Ended {
                        id: DeploymentId(4),
                        release: rel("v4"),
                        outcome: outcome.clone(),
                    }),
                },
            ));
        }
    }
    for (n, plan) in plans().into_iter().enumerate() {
        for cause in [Cause::Deploy, Cause::ColdRollback] {
            let d = Deployment {
                id: DeploymentId(10 + n as u64),
                release: rel(&format!("v{n}")),
                colour: if n % 2 == 0 { Colour::Green } else { Colour::Blue },
                plan: plan.clone(),
                cause,
            };
            let live = Some(at(d.colour.other(), "v1"));
            let id = Some(d.id.0);
            all.push(state(None, None, id, Phase::Provisioning(d.clone())));
            all.push(state(live.clone(), Some("v0"), id, Phase::Provisioning(d.clone())));
            all.push(state(live.clone(), None, id, Phase::Validating(d.clone())));
            all.push(state(live.clone(), Some("v0"), id, Phase::ReadyToPromote(d.clone())));
            for step in [
                MigrationStep::Contract,
                MigrationStep::Expand,
                MigrationStep::Check,
                MigrationStep::Rollback,
            ] {
                all.push(state(
                    live.clone(),
                    Some("v0"),
                    id,
                    Phase::Migrating {
                        deployment: d.clone(),
                        step,
                        failure: None,
                    },
                ));
            }
            all.push(state(
                live.clone(),
                None,
                id,
                Phase::Migrating {
                    deployment: d.clone(),
                    step: MigrationStep::Rollback,
                    failure: Some(Reason::LiveCheckFailed("`./check` exited with 1".into())),
                },
            ));
            for judged in [false, true] {
                all.push(state(
                    Some(at(d.colour, &d.release.version)),
                    Some("v1"),
                    id,
                    Phase::Watching {
                        deployment: d.clone(),
                        rollback_to: at(d.colour.other(), "v1"),
                        judged,
                        step: None,
                    },
                ));
            }
            // A gradual switch at its third step: live is still the colour before.
            all.push(state(
                Some(at(d.colour.other(), "v1")),
                None,
                id,
                Phase::Watching {
                    deployment: d.clone(),
                    rollback_to: at(d.colour.other(), "v1"),
                    judged: true,
                    step: Some(2),
                },
            ));
        }
    }
    // A contract owed, then one running; a release whose contract ran.
    for running in [false, true] {
        let mut s = state(
            Some(at(Colour::Green, "v4")),
            Some("v3"),
            Some(4),
            Phase::Stable { warm: None, last: None },
        );
        s.contract = Some(Contract {
            id: DeploymentId(4),
            release: rel("v4"),
            running,
        });
        s.contracted = (!running).then(|| rel("v2"));
        all.push(s);
    }
    all
}

/// Steps the lifecycle and commits the transition, as the daemon does.
fn step(store: &Store, state: &mut State, event: Event) -> crate::lifecycle::Transition {
    let name = event.name();
    let t = state
        .step(event)
        .unwrap_or_else(|e| panic!("{name} refused in {state}: {e}"));
    store
        .commit(&state.service, &t.state, t.records(), Some(audit("cli", name, "")))
        .unwrap_or_else(|e| panic!("commit of {name}: {e}"));
    *state = t.state.clone();
    t
}

fn records_of(entries: &[TransitionEntry]) -> Vec<Record> {
    entries.iter().map(|e| e.record.clone()).collect()
}

#[test]
fn every_state_shape_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let states = all_states("web");
    assert_eq!(states.len(), 2 + 2 * 22 + 3 * 2 * 12 + 2);
    let names: BTreeSet<_> = states.iter().map(|s| s.phase.name()).collect();
    assert_eq!(names, PHASE_NAMES.into_iter().collect());
    // One service through every shape in turn: nothing of an earlier phase lingers.
    for (n, state) in states.iter().enumerate() {
        store.commit("web", state, &[], None).unwrap();
        assert_eq!(store.load("web").unwrap().as_ref(), Some(state), "state {n}");
    }
    // Each shape in its own service, read back at once at startup.
    let mut expected = Vec::new();
    for (n, state) in states.into_iter().enumerate() {
        let service = format!("s{n:03}");
        let state = State {
            service: service.clone(),
            ..state
        };
        store.commit(&service, &state, &[], None).unwrap();
        expected.push((service, state));
    }
    expected.push(("web".to_string(), store.load("web").unwrap().unwrap()));
    assert_eq!(store.load_all().unwrap(), expected);
    drop(store);
    assert_eq!(open(&dir).load_all().unwrap(), expected);
    assert_eq!(open(&dir).load("never-committed").unwrap(), None);
}

/// Every kind of record (each reason, phase and watch verdict) for deployment `id1`, then a
/// second deployment `id2` that needed the warm colour: its `Retired` comes before its `Started`.
fn every_record(id1: DeploymentId, id2: DeploymentId) -> (Vec<Record>, Vec<Record>) {
    let mut first = vec![
        Record::Started {
            id: id1,
            release: rel("v1"),
            colour: Colour::Blue,
            cause: Cause::Deploy,
        },
        Record::Healthy { id: id1 },
        Record::Validated { id: id1, detail: None },
        Record::Validated {
            id: id1,
            detail: Some("mirrored to green@v2: 120 copies answered of 120 sent ...: passed \"ü\"".into()),
        },
        Record::AwaitingPromotion {
            id: id1,
            auto_after: None,
        },
        Record::AwaitingPromotion {
            id: id1,
            auto_after: Some(Duration::new(60, 5)),
        },
        Record::Promoted {
            id: id1,
            colour: Colour::Blue,
        },
    ];
    for watch in [Watched::Skipped, Watched::Judged, Watched::Unjudged] {
        first.push(Record::WentLive {
            id: id1,
            live: at(Colour::Blue, "v1"),
            watch,
        });
    }
    for reason in reasons() {
        first.push(Record::Aborted {
            id: id1,
            reason: reason.clone(),
        });
        first.push(Record::RolledBack {
            id: id1,
            to: at(Colour::Green, "v0"),
            reason,
        });
    }
    for phase in PHASE_NAMES {
        first.push(Record::Interrupted { id: id1, phase });
    }
    first.push(Record::WatchRestarted { id: id1 });
    // A new deployment that needed the warm colour: its Retired comes before its Started.
    let second = vec![
        Record::Retired {
            live: at(Colour::Green, "v0"),
        },
        Record::Started {
            id: id2,
            release: rel("v2"),
            colour: Colour::Green,
            cause: Cause::ColdRollback,
        },
    ];
    (first, second)
}

#[test]
fn every_record_round_trips_in_order_under_its_deployment() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let id1 = DeploymentId(1);
    let id2 = DeploymentId(2);
    let (first, second) = every_record(id1, id2);
    let mut state = State::new("web");
    state.last_id = Some(id2);
    let before = to_ms(SystemTime::now());
    store.commit("web", &state, first.iter().chain(&second), None).unwrap();
    let after = to_ms(SystemTime::now());

    let got = store.transitions("web", id1).unwrap();
    assert_eq!(records_of(&got), first);
    let got2 = store.transitions("web", id2).unwrap();
    assert_eq!(records_of(&got2), second);
    let all: Vec<_> = got.iter().chain(&got2).collect();
    for e in &all {
        assert!((before..=after).contains(&to_ms(e.at)), "{e:?}");
    }
    let seqs: Vec<_> = got.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=first.len() as u64).collect::<Vec<_>>());
    assert_eq!(
        got.iter().map(|e| e.deployment).collect::<BTreeSet<_>>(),
        [Some(id1)].into()
    );
    assert_eq!(
        got2.iter().map(|e| e.deployment).collect::<Vec<_>>(),
        [Some(id2), Some(id2)]
    );
    assert_eq!(store.transitions("web", DeploymentId(3)).unwrap(), vec![]);
    assert_eq!(store.transitions("other", id1).unwrap(), vec![]);
    // The last ending record of deployment 1 was Interrupted.
    let history = store.history("web", 10).unwrap();
    assert_eq!(history.len(), 2);
    assert_eq!(history[1].outcome, Some(Outcome::Interrupted));
    assert!(history[1].promoted_at.is_some());
}

#[test]
fn history_transitions_and_releases_follow_the_lifecycle() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let manual = plans().remove(0);
    let mut s = State::new("web");
    let before = SystemTime::now() - Duration::from_millis(1);

    let id1 = store.next_deployment_id("web").unwrap();
    step(
        &store,
        &mut s,
        Event::Deploy {
            id: id1,
            release: rel("v1"),
            plan: manual.clone(),
        },
    );
    step(&store, &mut s, Event::InstancesHealthy { id: id1 });
    step(&store, &mut s, Event::SmokePassed { id: id1, detail: None });

    let id2 = store.next_deployment_id("web").unwrap();
    step(
        &store,
        &mut s,
        Event::Deploy {
            id: id2,
            release: rel("v2"),
            plan: manual.clone(),
        },
    );
    step(&store, &mut s, Event::InstancesHealthy { id: id2 });
    step(&store, &mut s, Event::SmokePassed { id: id2, detail: None });
    step(&store, &mut s, Event::Promote { id: None });
    step(&store, &mut s, Event::WatchWindowElapsed { id: id2 });
    // keep_warm is zero in this plan: blue was retired when the watch passed. A rollback is a
    // cold one: deployment 3 redeploys v1, promoted once validated.
    let id3 = store.next_deployment_id("web").unwrap();
    step(
        &store,
        &mut s,
        Event::Rollback {
            id: id3,
            plan: manual.clone(),
        },
    );
    step(&store, &mut s, Event::InstancesHealthy { id: id3 });
    step(&store, &mut s, Event::SmokePassed { id: id3, detail: None });
    // Watching blue@v1 with green@v2 running: this rollback is instant, back to green.
    step(
        &store,
        &mut s,
        Event::Rollback {
            id: DeploymentId(99),
            plan: manual.clone(),
        },
    );
    assert_eq!(s.live, Some(at(Colour::Green, "v2")));

    let id4 = store.next_deployment_id("web").unwrap();
    step(
        &store,
        &mut s,
        Event::Deploy {
            id: id4,
            release: rel("v4"),
            plan: manual.clone(),
        },
    );
    step(
        &store,
        &mut s,
        Event::ProvisionFailed {
            id: id4,
            reason: "exit 1".to_string(),
        },
    );

    let id5 = store.next_deployment_id("web").unwrap();
    step(
        &store,
        &mut s,
        Event::Deploy {
            id: id5,
            release: rel("v5"),
            plan: manual.clone(),
        },
    );
    step(&store, &mut s, Event::InstancesHealthy { id: id5 });
    // The daemon dies; the restart recovers from what was committed.
    drop(store);
    let store = open(&dir);
    let loaded = store.load("web").unwrap().unwrap();
    assert_eq!(loaded, s);
    let t = loaded.recover();
    store.commit("web", &t.state, t.records(), None).unwrap();
    let after = SystemTime::now() + Duration::from_millis(1);

    assert_eq!([id1, id2, id3, id4, id5].map(|i| i.0), [1, 2, 3, 4, 5]);
    let history = store.history("web", 10).unwrap();
    let summary: Vec<_> = history
        .iter()
        .map(|d| {
            (
                d.id.0,
                d.release.version.as_str(),
                d.colour,
                d.cause,
                d.promoted_at.is_some(),
                d.outcome.clone(),
            )
        })
        .collect();
    use Colour::{Blue, Green};
    assert_eq!(
        summary,
        vec![
            (5, "v5", Blue, Cause::Deploy, false, Some(Outcome::Interrupted)),
            (
                4,
                "v4",
                Blue,
                Cause::Deploy,
                false,
                Some(Outcome::Aborted(Reason::ProvisionFailed("exit 1".into())))
            ),
            (
                3,
                "v1",
                Blue,
                Cause::ColdRollback,
                true,
                Some(Outcome::RolledBack(Reason::Requested))
            ),
            (2, "v2", Green, Cause::Deploy, true, Some(Outcome::WentLive)),
            (1, "v1", Blue, Cause::Deploy, false, Some(Outcome::WentLive)),
        ]
    );
    for d in &history {
        let ended = d.ended_at.expect("every deployment ended");
        assert!(
            before <= d.started_at && d.started_at <= ended && ended <= after,
            "{d:?}"
        );
    }
    assert_eq!(store.history("web", 2).unwrap(), history[..2].to_vec());
    assert_eq!(store.history("api", 10).unwrap(), vec![]);

    assert_eq!(
        records_of(&store.transitions("web", id2).unwrap()),
        vec![
            Record::Started {
                id: id2,
                release: rel("v2"),
                colour: Green,
                cause: Cause::Deploy
            },
            Record::Healthy { id: id2 },
            Record::Validated { id: id2, detail: None },
            Record::AwaitingPromotion {
                id: id2,
                auto_after: None
            },
            Record::Promoted { id: id2, colour: Green },
            Record::WentLive {
                id: id2,
                live: at(Green, "v2"),
                watch: Watched::Unjudged
            },
            Record::Retired { live: at(Blue, "v1") },
        ]
    );
    assert_eq!(
        records_of(&store.transitions("web", id5).unwrap()),
        vec![
            Record::Started {
                id: id5,
                release: rel("v5"),
                colour: Blue,
                cause: Cause::Deploy
            },
            Record::Healthy { id: id5 },
            Record::Interrupted {
                id: id5,
                phase: "validating"
            },
        ]
    );
    let releases: Vec<_> = store
        .releases("web")
        .unwrap()
        .into_iter()
        .map(|(r, _)| r.version)
        .collect();
    assert_eq!(releases, ["v1", "v2", "v4", "v5"]);
    assert_eq!(store.audit_log(100).unwrap().len(), 16);
}

#[test]
fn deployment_ids_increase_per_service_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    assert_eq!(store.next_deployment_id("web").unwrap(), DeploymentId(1));
    assert_eq!(store.next_deployment_id("web").unwrap(), DeploymentId(2));
    assert_eq!(store.next_deployment_id("api").unwrap(), DeploymentId(1));
    drop(store);
    let store = open(&dir);
    assert_eq!(store.next_deployment_id("web").unwrap(), DeploymentId(3));
    assert_eq!(store.next_deployment_id("api").unwrap(), DeploymentId(2));
    // A state committed with an id from elsewhere still moves the counter past it.
    let mut state = State::new("db");
    state.last_id = Some(DeploymentId(41));
    store.commit("db", &state, &[], None).unwrap();
    assert_eq!(store.next_deployment_id("db").unwrap(), DeploymentId(42));
    drop(store);
    assert_eq!(open(&dir).next_deployment_id("db").unwrap(), DeploymentId(43));
}

#[test]
fn a_read_only_store_reads_what_the_writer_committed_and_creates_or_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // No database: refused, and none is made.
    assert!(Store::open_read_only(dir.path()).is_err());
    assert!(!dir.path().join(DB_FILE).exists());

    let writer = open(&dir);
    let mut state = State::new("web");
    state.last_id = Some(DeploymentId(7));
    writer.commit("web", &state, &[], None).unwrap();
    // Read while the writer holds the file open, as `cutover history` may during a start.
    let reader = Store::open_read_only(dir.path()).unwrap();
    assert_eq!(reader.load("web").unwrap(), Some(state.clone()));
    assert!(reader.next_deployment_id("web").is_err(), "it writes nothing");
    drop(writer);
    assert_eq!(reader.load("web").unwrap(), Some(state));

    // Another program's database is refused as the writer refuses it.
    let other = tempfile::tempdir().unwrap();
    Connection::open(other.path().join(DB_FILE))
        .unwrap()
        .execute_batch("CREATE TABLE recipes (name TEXT);")
        .unwrap();
    assert!(matches!(
        Store::open_read_only(other.path()),
        Err(StoreError::Foreign { .. })
    ));
}

/// Everything a failed commit could have touched.
fn snapshot(store: &Store) -> impl PartialEq + std::fmt::Debug {
    let transitions: Vec<_> = (1..=3)
        .map(|id| store.transitions("web", DeploymentId(id)).unwrap())
        .collect();
    (
        store.load_all().unwrap(),
        store.history("web", 100).unwrap(),
        transitions,
        store.releases("web").unwrap(),
        store.audit_log(100).unwrap(),
    )
}

#[test]
fn a_commit_that_fails_midway_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let path = store.path().display().to_string();
    let plan = plans().remove(1);
    let mut s = State::new("web");
    step(
        &store,
        &mut s,
        Event::Deploy {
            id: DeploymentId(1),
            release: rel("v1"),
            plan: plan.clone(),
        },
    );
    step(&store, &mut s, Event::InstancesHealthy { id: DeploymentId(1) });
    step(
        &store,
        &mut s,
        Event::SmokePassed {
            id: DeploymentId(1),
            detail: None,
        },
    );
    let before = snapshot(&store);
    let deploy = s
        .step(Event::Deploy {
            id: DeploymentId(2),
            release: rel("v2"),
            plan: plan.clone(),
        })
        .unwrap();
    let started = deploy.records().cloned().collect::<Vec<_>>();
    assert_eq!(started.len(), 1);
    let try_commit = |state: &State, records: &[Record]| {
        let err = store
            .commit("web", state, records, Some(audit("cli", "deploy", "v2")))
            .unwrap_err();
        assert_eq!(snapshot(&store), before, "after {err}");
        err.to_string()
    };
    let rejected = |detail: &str| {
        format!(
            "state database {path}: refused the commit of service web: {detail}; nothing was written; \
                 this is a bug in cutover, please report it"
        )
    };

    // A record of a deployment that was never started, after the state and a good record.
    let mut records = started.clone();
    records.push(Record::Healthy { id: DeploymentId(7) });
    assert_eq!(
        try_commit(&deploy.state, &records),
        rejected("record healthy of deployment 7, which was never started")
    );
    // A reused deployment id: the deployments table's primary key.
    let mut records = started.clone();
    records.push(Record::Started {
        id: DeploymentId(1),
        release: rel("v1"),
        colour: Colour::Green,
        cause: Cause::Deploy,
    });
    assert_eq!(
        try_commit(&deploy.state, &records),
        rejected("UNIQUE constraint failed: deployments.service, deployments.id")
    );
    // Retired filed under a deployment that does not exist: the deferred foreign key fails
    // the COMMIT itself.
    let mut state = deploy.state.clone();
    state.last_id = Some(DeploymentId(9));
    let records = [
        started[0].clone(),
        Record::Retired {
            live: at(Colour::Blue, "v1"),
        },
    ];
    assert_eq!(try_commit(&state, &records), rejected("FOREIGN KEY constraint failed"));
    // A value SQLite cannot hold, in the last record.
    let mut records = started.clone();
    records.push(Record::Aborted {
        id: DeploymentId(2),
        reason: Reason::ErrorRate {
            errors: u64::MAX,
            requests: 1,
            max: 0.5,
        },
    });
    assert_eq!(
        try_commit(&deploy.state, &records),
        format!(
            "state database {path}: cannot store reason_errors = 18446744073709551615 (above the largest \
                 storable integer, 9223372036854775807) of service web exactly; nothing was written; use a \
                 smaller value"
        )
    );
    // The store is still usable, and the good commit goes through.
    store.commit("web", &deploy.state, deploy.records(), None).unwrap();
    assert_eq!(store.load("web").unwrap(), Some(deploy.state));
    assert_eq!(records_of(&store.transitions("web", DeploymentId(2)).unwrap()), started);
}

/// `keep_warm = "3000000h"` once passed the config check and then failed every commit: the
/// check and the store agree on the longest duration.
#[test]
fn every_duration_the_config_accepts_can_be_stored() {
    use crate::config::{parse_duration, Config};
    for too_long in ["3000000h", "2562048h", "153722868m", "9223372037s"] {
        let err = parse_duration(too_long).unwrap_err();
        assert!(err.contains("too long a duration"), "{too_long}: {err}");
    }
    let config = Config::parse(
        "[services.web]\ncommand = \"x {port}\"\nkeep_warm = \"2562047h\"\n",
        "cutover.toml",
    )
    .unwrap();
    let longest = config.services[0].keep_warm;
    assert_eq!(longest, Duration::from_secs(2_562_047 * 3600));
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let mut d = Deployment {
        id: DeploymentId(1),
        release: rel("v1"),
        colour: Colour::Blue,
        plan: plans().remove(0),
        cause: Cause::Deploy,
    };
    d.plan.keep_warm = longest;
    d.plan.health_deadline = longest;
    d.plan.watch.duration = longest;
    let state = State {
        phase: Phase::Provisioning(d),
        ..State::new("web")
    };
    store
        .commit("web", &state, &[], None)
        .expect("the longest accepted duration is stored");
    assert_eq!(store.load("web").unwrap(), Some(state));
    let err = Config::parse(
        "[services.web]\ncommand = \"x {port}\"\nkeep_warm = \"3000000h\"\n",
        "cutover.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("keep_warm") && err.contains("too long a duration"),
        "{err}"
    );
}

#[test]
fn values_sqlite_cannot_hold_are_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let path = store.path().display().to_string();
    let mut d = Deployment {
        id: DeploymentId(1),
        release: rel("v1"),
        colour: Colour::Blue,
        plan: plans().remove(0),
        cause: Cause::Deploy,
    };
    d.plan.keep_warm = Duration::from_nanos(i64::MAX as u64 + 1);
    let state = State {
        phase: Phase::Provisioning(d.clone()),
        ..State::new("web")
    };
    let err = store.commit("web", &state, &[], None).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "state database {path}: cannot store plan_keep_warm_ns = 9223372036.854775808s (longer than the \
                 longest storable duration, about 292 years) of service web exactly; nothing was written; use a \
                 smaller value"
        )
    );
    assert!(matches!(err, StoreError::Unrepresentable { .. }));
    assert!(!err.is_retryable());
    d.plan.keep_warm = Duration::ZERO;
    d.plan.watch.max_error_rate = f64::NAN;
    let state = State {
        phase: Phase::Validating(d),
        ..State::new("web")
    };
    let err = store.commit("web", &state, &[], None).unwrap_err().to_string();
    assert!(
        err.contains("cannot store plan_max_error_rate = NaN (not a number) of service web"),
        "{err}"
    );
    assert_eq!(store.load_all().unwrap(), vec![]);
}

#[test]
fn a_state_of_another_service_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let err = store.commit("web", &State::new("api"), &[], None).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "state database {}: refused the commit of service web: the state to commit belongs to service \
                 \"api\"; nothing was written; this is a bug in cutover, please report it",
            store.path().display()
        )
    );
    assert_eq!(store.load_all().unwrap(), vec![]);
}

#[test]
fn reopening_after_drop_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let plan = plans().remove(1);
    let mut s = State::new("web");
    step(
        &store,
        &mut s,
        Event::Deploy {
            id: DeploymentId(1),
            release: rel("v1"),
            plan: plan.clone(),
        },
    );
    step(&store, &mut s, Event::InstancesHealthy { id: DeploymentId(1) });
    step(
        &store,
        &mut s,
        Event::SmokePassed {
            id: DeploymentId(1),
            detail: None,
        },
    );
    step(
        &store,
        &mut s,
        Event::Deploy {
            id: DeploymentId(2),
            release: rel("v2"),
            plan,
        },
    );
    let instance = StoredInstance {
        service: "web".to_string(),
        colour: Colour::Green,
        index: 0,
        release: rel("v2"),
        pid: 4242,
        pgid: 4242,
        port: 40123,
        start_ticks: Some(123_456_789),
    };
    store.record_instance(&instance).unwrap();
    store.append_audit(&audit("api:ops", "status", "")).unwrap();
    let everything = |store: &Store| {
        (
            store.load_all().unwrap(),
            store.history("web", 100).unwrap(),
            store.transitions("web", DeploymentId(1)).unwrap(),
            store.transitions("web", DeploymentId(2)).unwrap(),
            store.releases("web").unwrap(),
            store.audit_log(100).unwrap(),
            store.instances("web").unwrap(),
        )
    };
    let before = everything(&store);
    assert_eq!(before.0, vec![("web".to_string(), s.clone())]);
    assert_eq!(
        (before.1.len(), before.2.len(), before.3.len(), before.5.len()),
        (2, 4, 1, 5)
    );
    assert_eq!(before.6, vec![instance]);
    drop(store);
    let store = open(&dir);
    assert_eq!(everything(&store), before);
    assert_eq!(store.next_deployment_id("web").unwrap(), DeploymentId(3));
}

#[test]
fn a_fresh_database_has_the_documented_settings_and_tables() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("nested/state")).unwrap();
    assert_eq!(store.path(), dir.path().join("nested/state/cutover.db"));
    let conn = store.lock();
    let pragma = |name: &str| -> String {
        conn.query_row(&format!("PRAGMA {name}"), [], |r| r.get::<_, Value>(0))
            .map(|v| match v {
                Value::Integer(n) => n.to_string(),
                Value::Text(s) => s,
                other => format!("{other:?}"),
            })
            .unwrap()
    };
    assert_eq!(pragma("journal_mode"), "wal");
    assert_eq!(pragma("synchronous"), "2"); // FULL
    assert_eq!(pragma("foreign_keys"), "1");
    assert_eq!(pragma("busy_timeout"), "5000");
    assert_eq!(pragma("user_version"), "5");
    assert_eq!(pragma("application_id"), APPLICATION_ID.to_string());
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        tables,
        [
            "audit",
            "deployment_ids",
            "deployments",
            "instances",
            "kv",
            "releases",
            "services",
            "sqlite_sequence",
            "transitions"
        ]
    );
    fn shared<T: Send + Sync>() {}
    shared::<Store>();
}

#[test]
fn a_newer_schema_version_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(DB_FILE);
    drop(open(&dir));
    Connection::open(&path)
        .unwrap()
        .pragma_update(None, "user_version", 6)
        .unwrap();
    let err = Store::open(dir.path()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "state database {}: schema version 6 is newer than this cutover knows (version 5); it was \
                 written by a newer cutover: run that version, or restore a backup made before the upgrade",
            path.display()
        )
    );
    let version: i64 = Connection::open(&path)
        .unwrap()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, 6);
}

#[test]
fn a_garbage_file_is_refused_untouched_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(DB_FILE);
    let garbage = "this is not a database, it is a shopping list\n".repeat(100);
    std::fs::write(&path, &garbage).unwrap();
    let err = Store::open(dir.path()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "state database {}: not a SQLite database, or damaged beyond reading (file is not a database); \
                 move it aside (cutover then starts with an empty state) or restore it from a backup",
            path.display()
        )
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), garbage);
    let mut files: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    files.sort();
    assert_eq!(files, [DB_FILE]);
}

#[test]
fn another_programs_database_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(DB_FILE);
    Connection::open(&path)
        .unwrap()
        .execute_batch("CREATE TABLE recipes (name TEXT); INSERT INTO recipes VALUES ('soup');")
        .unwrap();
    let err = Store::open(dir.path()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "state database {}: a SQLite database of another program (application id 0x0), not cutover's; \
                 it was left untouched: point server.state_dir at another directory, or move the file aside",
            path.display()
        )
    );
    let conn = Connection::open(&path).unwrap();
    let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
    assert_eq!(mode, "delete");
}

#[test]
fn a_damaged_database_is_refused_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(DB_FILE);
    let store = open(&dir);
    for n in 0..200 {
        store
            .append_audit(&audit("cli", "status", &"x".repeat(n * 10)))
            .unwrap();
    }
    drop(store);
    let mut bytes = std::fs::read(&path).unwrap();
    assert!(bytes.len() > 8 * 4096, "{} bytes", bytes.len());
    // Keep page 1 (header and schema), scribble over everything after it.
    for (i, b) in bytes.iter_mut().enumerate().skip(4096) {
        *b = (i % 251) as u8;
    }
    std::fs::write(&path, &bytes).unwrap();
    let err = Store::open(dir.path()).unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
    assert!(
        message.starts_with(&format!("state database {}: corrupt: ", path.display())),
        "{message}"
    );
    assert!(message.ends_with("restore it from a backup, or move it aside (cutover then starts with an empty state and forgets its history)"), "{message}");
}

#[test]
fn an_uncreatable_state_directory_is_reported_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("file"), "").unwrap();
    let state_dir = dir.path().join("file/state");
    let err = Store::open(&state_dir).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "state directory {}: cannot create it: Not a directory (os error 20); check that its parent \
                 exists and is writable, or set server.state_dir to another directory",
            state_dir.display()
        )
    );
}

#[test]
fn instances_are_recorded_replaced_listed_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let instance = |service: &str, colour, index, pid| StoredInstance {
        service: service.to_string(),
        colour,
        index,
        release: rel("v7"),
        pid,
        pgid: pid,
        port: 30000 + pid as u16,
        start_ticks: (pid % 2 == 0).then_some(1_000 + u64::from(pid)),
    };
    let g1 = instance("web", Colour::Green, 1, 11);
    let g0 = instance("web", Colour::Green, 0, 10);
    let b0 = instance("web", Colour::Blue, 0, 20);
    let other = instance("api", Colour::Blue, 0, 30);
    for i in [&g1, &g0, &b0, &other] {
        store.record_instance(i).unwrap();
    }
    assert_eq!(
        store.instances("web").unwrap(),
        vec![b0.clone(), g0.clone(), g1.clone()]
    );
    // A restarted instance replaces its slot.
    let g0b = StoredInstance {
        pid: 12,
        pgid: 12,
        port: 65535,
        ..g0.clone()
    };
    store.record_instance(&g0b).unwrap();
    assert_eq!(store.instances("web").unwrap(), vec![b0.clone(), g0b, g1.clone()]);
    assert!(store.remove_instance("web", Colour::Blue, 0).unwrap());
    assert!(!store.remove_instance("web", Colour::Blue, 0).unwrap());
    assert_eq!(store.remove_instances("web", Colour::Green).unwrap(), 2);
    assert_eq!(store.instances("web").unwrap(), vec![]);
    assert_eq!(store.instances("api").unwrap(), vec![other]);
    // Port 0 is not a port an instance listens on.
    let err = store
        .record_instance(&StoredInstance { port: 0, ..g1 })
        .unwrap_err()
        .to_string();
    assert!(err.contains("CHECK constraint failed"), "{err}");
}

#[test]
fn audit_entries_come_back_newest_first() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let t0 = to_ms(SystemTime::now());
    let refused = Audit {
        result: "service web: nothing to abort".to_string(),
        ..audit("cli", "abort", "")
    };
    store.append_audit(&refused).unwrap();
    store
        .commit(
            "web",
            &State::new("web"),
            &[],
            Some(audit("api:deployer", "deploy", "--version v1")),
        )
        .unwrap();
    let elsewhere = Audit {
        service: Some("api".to_string()),
        ..audit("auto", "keep-warm timer", "")
    };
    store
        .commit("web", &State::new("web"), &[], Some(elsewhere.clone()))
        .unwrap();
    let t1 = to_ms(SystemTime::now());
    let log = store.audit_log(10).unwrap();
    let got: Vec<_> = log.iter().map(|e| (e.seq, e.audit.clone())).collect();
    let deployed = Audit {
        service: Some("web".to_string()),
        ..audit("api:deployer", "deploy", "--version v1")
    };
    assert_eq!(got, vec![(3, elsewhere), (2, deployed), (1, refused)]);
    assert!(log.iter().all(|e| (t0..=t1).contains(&to_ms(e.at))));
    assert_eq!(store.audit_log(1).unwrap(), log[..1].to_vec());
}

#[test]
fn stored_phase_names_are_the_lifecycles() {
    let d = Deployment {
        id: DeploymentId(1),
        release: rel("v1"),
        colour: Colour::Blue,
        plan: plans().remove(0),
        cause: Cause::Deploy,
    };
    let phases = [
        Phase::Stable { warm: None, last: None },
        Phase::Migrating {
            deployment: d.clone(),
            step: MigrationStep::Expand,
            failure: None,
        },
        Phase::Provisioning(d.clone()),
        Phase::Validating(d.clone()),
        Phase::ReadyToPromote(d.clone()),
        Phase::Watching {
            deployment: d,
            rollback_to: at(Colour::Green, "v0"),
            judged: false,
            step: None,
        },
    ];
    assert_eq!(phases.map(|p| p.name()), PHASE_NAMES);
}

// ----- kill -9 -----

/// Set in the child process of the crash test: the state directory to commit into.
const CRASH_CHILD: &str = "CUTOVER_STORE_CRASH_CHILD";
/// Upper bound of the child's loop; it is killed long before.
const CRASH_STEPS: u64 = 20_000;

fn crash_plan() -> Plan {
    Plan {
        health_deadline: Duration::from_secs(10),
        promote: Promotion::Auto { delay: Duration::ZERO },
        watch: WatchPolicy {
            duration: Duration::from_secs(60),
            min_requests: 10,
            max_error_rate: 0.05,
            max_p99: Some(Duration::from_millis(300)),
        },
        keep_warm: Duration::from_secs(3600),
        migrate: Default::default(),
        gradual: None,
    }
}

/// The crash test's script: releases on repeat, every third failing its smoke test. A new
/// deployment retires the warm colour, so commits carry records of two deployments.
fn scripted_event(state: &State, next_id: impl FnOnce() -> DeploymentId) -> Event {
    match &state.phase {
        Phase::Stable { .. } => {
            let id = next_id();
            Event::Deploy {
                id,
                release: Release::new(format!("v{id}")),
                plan: crash_plan(),
            }
        }
        Phase::Migrating { deployment, step, .. } => Event::MigrationFinished {
            id: deployment.id,
            step: *step,
            ok: true,
            detail: String::new(),
        },
        Phase::Provisioning(d) => Event::InstancesHealthy { id: d.id },
        Phase::Validating(d) if d.id.0 % 3 == 0 => Event::SmokeFailed {
            id: d.id,
            reason: format!("exit {}", d.id),
        },
        Phase::Validating(d) => Event::SmokePassed { id: d.id, detail: None },
        Phase::ReadyToPromote(d) => Event::Promote { id: Some(d.id) },
        Phase::Watching {
            deployment,
            judged: false,
            ..
        } => Event::WatchSample {
            id: deployment.id,
            sample: WatchSample {
                requests: 100,
                errors: 1,
                p99: Some(Duration::from_millis(20)),
            },
        },
        Phase::Watching { deployment, .. } => Event::WatchWindowElapsed { id: deployment.id },
    }
}

/// State, number of records and of deployments after `steps` scripted commits, computed
/// without a database (ids 1, 2, ... as a fresh store hands them out).
fn replay(steps: u64) -> (State, usize, u64) {
    let mut state = State::new("web");
    let (mut records, mut ids) = (0, 0);
    for _ in 0..steps {
        let t = state.step(scripted_event(&state, || {
            ids += 1;
            DeploymentId(ids)
        }));
        let t = t.expect("scripted event refused");
        records += t.records().count();
        state = t.state;
    }
    (state, records, ids)
}

fn crash_child(dir: &str) {
    let store = Store::open(dir).expect("child: open");
    let mut state = State::new("web");
    let mut out = std::io::stdout();
    for seq in 1..=CRASH_STEPS {
        let event = scripted_event(&state, || store.next_deployment_id("web").expect("child: id"));
        let action = event.name();
        let t = state.step(event).expect("child: scripted event refused");
        let audit = audit("auto", action, &format!("step {seq}"));
        store
            .commit("web", &t.state, t.records(), Some(audit))
            .expect("child: commit");
        state = t.state;
        // Only after commit returned: every number printed is durable. A failed write means
        // the parent is gone: stop.
        writeln!(out, "committed {seq}")
            .and_then(|()| out.flush())
            .expect("child: stdout");
    }
}

#[test]
fn kill_9_during_commits_loses_nothing_committed_and_keeps_no_half() {
    if let Ok(dir) = std::env::var(CRASH_CHILD) {
        return crash_child(&dir);
    }
    let dir = tempfile::tempdir().unwrap();
    let test = format!(
        "{}::kill_9_during_commits_loses_nothing_committed_and_keeps_no_half",
        module_path!().split_once("::").map_or("", |(_, rest)| rest)
    );
    let stderr_path = dir.path().join("child.stderr");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([test.as_str(), "--exact", "--nocapture", "--test-threads=1"])
        .env(CRASH_CHILD, dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let stderr = || std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(n) = line.strip_prefix("committed ") {
                if tx.send(n.parse::<u64>().unwrap()).is_err() {
                    break;
                }
            }
        }
    });
    // Let it get going (its start-up may be slow on a loaded machine), then let it run for a
    // while and kill it wherever it is: mid-commit, mid-fsync, between commits.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = 0;
    while seen < 20 {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(n) => seen = n,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("child committed {seen} steps before {e}; its stderr:\n{}", stderr());
            }
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(
        status.signal(),
        Some(9),
        "child ended by itself: {status}; stderr:\n{}",
        stderr()
    );
    reader.join().unwrap();
    let last = rx.try_iter().last().unwrap_or(seen).max(seen);
    assert!(last < CRASH_STEPS);

    let store = Store::open(dir.path()).expect("reopen after kill -9");
    // The commit of step last + 1 may have completed before the child could print it.
    let committed = store.audit_log(usize::MAX).unwrap().len() as u64;
    assert!(
        committed == last || committed == last + 1,
        "{committed} commits, {last} reported"
    );
    let (state, records, deployments) = replay(committed);
    assert_eq!(
        store.load("web").unwrap(),
        Some(state.clone()),
        "after {committed} commits"
    );
    let history = store.history("web", usize::MAX).unwrap();
    assert_eq!(history.len() as u64, deployments);
    let stored: usize = history
        .iter()
        .map(|d| store.transitions("web", d.id).unwrap().len())
        .sum();
    assert_eq!(stored, records, "records of {committed} commits");
    // And it carries on from there.
    let event = scripted_event(&state, || store.next_deployment_id("web").unwrap());
    let t = state.step(event).unwrap();
    store.commit("web", &t.state, t.records(), None).unwrap();
    assert_eq!(store.load("web").unwrap(), Some(t.state));
    eprintln!("killed after {last} reported commits; {committed} stored, {records} records");
}

/// The contract every [`StateStore`] keeps (one node's SQLite here; a fleet's store runs the
/// same function): commits compare and swap on the revision, a conflicting commit writes
/// nothing, values round-trip, deployment ids only grow.
/// What every [`StateStore`] must do, run against each implementation (SQLite here, etcd in
/// `etcd/tests.rs`). Revisions are opaque: they only increase, per service.
pub(super) fn shared_contract(store: &dyn StateStore) {
    let s = "web";
    assert_eq!(store.load(s).unwrap(), None);
    let mut state = State::new(s);
    let first = store.commit(s, Revision::NONE, &state, &[], None).unwrap();
    assert!(first > Revision::NONE);
    assert_eq!(store.load(s).unwrap(), Some((state.clone(), first)));
    // A writer that decided on revision 0 (or on a future one) is refused, and nothing changes.
    state.live = Some(at(Colour::Green, "v9"));
    for stale in [Revision::NONE, Revision(first.0 + 1000)] {
        let err = store
            .commit(s, stale, &state, &[], Some(audit("other", "deploy", "")))
            .unwrap_err();
        assert!(
            matches!(err, StoreError::Conflict { expected, found, .. } if expected == stale.0 && found == first.0),
            "{err}"
        );
        assert!(err.to_string().contains("changed underneath"), "{err}");
    }
    assert_eq!(store.load(s).unwrap().map(|(st, r)| (st.live, r)), Some((None, first)));
    let second = store.commit(s, first, &state, &[], None).unwrap();
    assert!(second > first);
    assert_eq!(
        store.load(s).unwrap().map(|(st, _)| st.live),
        Some(Some(at(Colour::Green, "v9")))
    );
    // Revisions are per service.
    let api = store
        .commit("api", Revision::NONE, &State::new("api"), &[], None)
        .unwrap();
    assert!(api > Revision::NONE);
    assert_eq!(store.load(s).unwrap().map(|(_, r)| r), Some(second));
    // A state of another service is refused.
    let err = store.commit(s, second, &State::new("api"), &[], None).unwrap_err();
    assert!(matches!(err, StoreError::Rejected { .. }), "{err}");
    // Values.
    assert_eq!(store.get_value("preview-token").unwrap(), None);
    store.set_value("preview-token", Some("abc")).unwrap();
    store.set_value("preview-token", Some("def")).unwrap();
    assert_eq!(store.get_value("preview-token").unwrap().as_deref(), Some("def"));
    store
        .set_value("upstreams/web/blue", Some("127.0.0.1:1\n127.0.0.1:2"))
        .unwrap();
    assert_eq!(
        store.get_value("upstreams/web/blue").unwrap().as_deref(),
        Some("127.0.0.1:1\n127.0.0.1:2")
    );
    store.set_value("preview-token", None).unwrap();
    assert_eq!(store.get_value("preview-token").unwrap(), None);
    // Ids: increasing, and above any a committed state holds.
    let a = store.next_deployment_id(s).unwrap();
    let b = store.next_deployment_id(s).unwrap();
    assert!(b > a);
    let mut jumped = State::new("ids");
    jumped.last_id = Some(DeploymentId(40));
    store.commit("ids", Revision::NONE, &jumped, &[], None).unwrap();
    assert_eq!(store.next_deployment_id("ids").unwrap(), DeploymentId(41));

    contract_state_shapes(store);
    contract_records(store);
    contract_history(store);
}

/// Every state shape reads back as committed, and nothing of an earlier phase lingers.
fn contract_state_shapes(store: &dyn StateStore) {
    let mut revision = Revision::NONE;
    for (n, state) in all_states("shapes").iter().enumerate() {
        revision = store
            .commit("shapes", revision, state, &[], None)
            .unwrap_or_else(|e| panic!("state {n}: {e}"));
        assert_eq!(
            store.load("shapes").unwrap(),
            Some((state.clone(), revision)),
            "state {n}"
        );
    }
}

/// Every record reads back under its deployment in commit order (`Retired` under the
/// state's `last_id`), and deployments' summaries follow them.
fn contract_records(store: &dyn StateStore) {
    let s = "records";
    let id1 = DeploymentId(1);
    let id2 = DeploymentId(2);
    let (first, second) = every_record(id1, id2);
    let mut state = State::new(s);
    state.last_id = Some(id1);
    let before = to_ms(SystemTime::now());
    let r1 = store.commit(s, Revision::NONE, &state, &first, None).unwrap();
    state.last_id = Some(id2);
    let r2 = store
        .commit(s, r1, &state, &second, Some(audit("cli", "deploy", "--version v2")))
        .unwrap();
    let after = to_ms(SystemTime::now());

    let got = store.transitions(s, id1).unwrap();
    assert_eq!(records_of(&got), first);
    let got2 = store.transitions(s, id2).unwrap();
    assert_eq!(records_of(&got2), second);
    let all: Vec<_> = got.iter().chain(&got2).collect();
    for e in &all {
        assert!((before..=after).contains(&to_ms(e.at)), "{e:?}");
    }
    let seqs: Vec<_> = all.iter().map(|e| e.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert!(got.iter().all(|e| e.deployment == Some(id1)));
    assert!(got2.iter().all(|e| e.deployment == Some(id2)));
    assert_eq!(store.transitions(s, DeploymentId(3)).unwrap(), vec![]);
    assert_eq!(store.transitions("other", id1).unwrap(), vec![]);
    // The last ending record of deployment 1 was Interrupted; the last word wins.
    let history = store.history(s, 10).unwrap();
    assert_eq!(history.iter().map(|d| d.id).collect::<Vec<_>>(), [id2, id1]);
    assert_eq!(history[1].outcome, Some(Outcome::Interrupted));
    assert!(history[1].promoted_at.is_some() && history[1].ended_at.is_some());
    assert_eq!(
        (history[0].outcome.as_ref(), history[0].ended_at, history[0].promoted_at),
        (None, None, None)
    );
    assert_eq!(
        (history[0].colour, history[0].cause),
        (Colour::Green, Cause::ColdRollback)
    );
    assert_eq!(history[0].release, rel("v2"));
    assert!((before..=after).contains(&to_ms(history[0].started_at)));

    // Refused commits write nothing: a record of a deployment never started, a second start
    // of one, a Retired filed under a deployment never started.
    let refused: [(Option<DeploymentId>, Vec<Record>); 3] = [
        (Some(id2), vec![Record::Healthy { id: DeploymentId(9) }]),
        (
            Some(id2),
            vec![Record::Started {
                id: id1,
                release: rel("v1"),
                colour: Colour::Blue,
                cause: Cause::Deploy,
            }],
        ),
        (
            Some(DeploymentId(8)),
            vec![Record::Retired {
                live: at(Colour::Blue, "v1"),
            }],
        ),
    ];
    for (last_id, records) in refused {
        let mut next = state.clone();
        next.last_id = last_id;
        next.live = Some(at(Colour::Blue, "refused"));
        let err = store.commit(s, r2, &next, &records, None).unwrap_err();
        assert!(matches!(err, StoreError::Rejected { .. }), "{records:?}: {err}");
        assert_eq!(store.load(s).unwrap(), Some((state.clone(), r2)));
        assert_eq!(store.history(s, 10).unwrap(), history);
        assert_eq!(records_of(&store.transitions(s, id1).unwrap()), first);
        assert_eq!(store.transitions(s, DeploymentId(9)).unwrap(), vec![]);
    }
}

/// `history` is newest first, honours its limit, and follows the lifecycle's records.
fn contract_history(store: &dyn StateStore) {
    let s = "hist";
    let mut state = State::new(s);
    let mut revision = Revision::NONE;
    let mut ids = Vec::new();
    for n in 0..12u64 {
        let id = store.next_deployment_id(s).unwrap();
        ids.push(id);
        state.last_id = Some(id);
        let mut records = vec![Record::Started {
            id,
            release: rel(&format!("v{n}")),
            colour: if n % 2 == 0 { Colour::Blue } else { Colour::Green },
            cause: Cause::Deploy,
        }];
        match n % 3 {
            0 => records.push(Record::Aborted {
                id,
                reason: Reason::Requested,
            }),
            1 => {
                records.push(Record::Promoted {
                    id,
                    colour: Colour::Green,
                });
                records.push(Record::WentLive {
                    id,
                    live: at(Colour::Green, &format!("v{n}")),
                    watch: Watched::Judged,
                });
            }
            _ => {}
        }
        revision = store.commit(s, revision, &state, &records, None).unwrap();
    }
    let newest_first: Vec<_> = ids.iter().rev().copied().collect();
    let history = store.history(s, 100).unwrap();
    assert_eq!(history.iter().map(|d| d.id).collect::<Vec<_>>(), newest_first);
    assert_eq!(store.history(s, 5).unwrap(), history[..5].to_vec());
    assert_eq!(store.history(s, 1).unwrap(), history[..1].to_vec());
    assert_eq!(store.history(s, 0).unwrap(), vec![]);
    assert_eq!(store.history("nobody", 10).unwrap(), vec![]);
    for (d, n) in history.iter().zip((0..12u64).rev()) {
        assert_eq!(d.release, rel(&format!("v{n}")));
        let expected = match n % 3 {
            0 => Some(Outcome::Aborted(Reason::Requested)),
            1 => Some(Outcome::WentLive),
            _ => None,
        };
        assert_eq!(d.outcome, expected, "deployment {n}");
        assert_eq!(d.promoted_at.is_some(), n % 3 == 1, "deployment {n}");
        assert_eq!(d.ended_at.is_some(), n % 3 != 2, "deployment {n}");
    }
}

#[test]
fn sqlite_keeps_the_state_store_contract() {
    let dir = tempfile::tempdir().unwrap();
    shared_contract(&open(&dir));
}

/// A version 1 database (before revisions) opens as version 2: its states keep their content,
/// at revision 0, and the next commit expecting 0 goes through.
#[test]
fn a_version_1_database_is_migrated_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(DB_FILE);
    {
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(SCHEMA_V1).unwrap();
        conn.pragma_update(None, "application_id", APPLICATION_ID).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        conn.execute(
            "INSERT INTO services (name, updated_at, phase, last_id) VALUES ('web', 1, 'stable', 0)",
            [],
        )
        .unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    let (state, revision) = store.load_at("web").unwrap().unwrap();
    assert_eq!((state.service.as_str(), revision), ("web", Revision::NONE));
    assert_eq!(
        store.commit_at("web", Some(Revision::NONE), &state, [], None).unwrap(),
        Revision(1)
    );
}

/// A version 2 database with a history is rebuilt to version 3 keeping every row, the
/// transitions' index and its foreign keys; the new reason code is then stored and read back.
#[test]
fn a_version_2_database_keeps_its_history_when_reasons_are_added() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(DB_FILE);
    let plan = plans().remove(0);
    // A history written by the code of today, in a file then put back to version 2 with the
    // CHECK lists version 2 had: a database as version 2 left it.
    let store = Store::open(dir.path()).unwrap();
    let mut s = State::new("web");
    let mut revision = Revision::NONE;
    commit_steps(
        &store,
        &mut s,
        &mut revision,
        [
            Event::Deploy {
                id: DeploymentId(1),
                release: rel("v1"),
                plan: plan.clone(),
            },
            Event::InstancesHealthy { id: DeploymentId(1) },
            Event::SmokePassed {
                id: DeploymentId(1),
                detail: None,
            },
            Event::Deploy {
                id: DeploymentId(2),
                release: rel("v2"),
                plan: plan.clone(),
            },
            Event::InstancesHealthy { id: DeploymentId(2) },
            Event::SmokeFailed {
                id: DeploymentId(2),
                reason: "exit 1".into(),
            },
        ],
    );
    let history = store.history("web", 10).unwrap();
    let transitions = store.transitions("web", DeploymentId(2)).unwrap();
    assert_eq!(history.len(), 2);
    drop(store);
    {
        schema_as_of(&Connection::open(&path).unwrap(), 2);
    }
    {
        let conn = Connection::open(&path).unwrap();
        let lists: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE sql LIKE '%not_acknowledged%'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(lists, 0, "the file is as version 2 left it");
    }

    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.history("web", 10).unwrap(), history);
    assert_eq!(store.transitions("web", DeploymentId(2)).unwrap(), transitions);
    assert_eq!(store.load_at("web").unwrap(), Some((s.clone(), revision)));
    {
        let conn = store.conn.lock().unwrap();
        let (version, index): (i64, i64) = conn
            .query_row(
                "SELECT (SELECT user_version FROM pragma_user_version()),
                        (SELECT COUNT(*) FROM sqlite_master WHERE name = 'transitions_by_deployment')",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((version, index), (SCHEMA_VERSION, 1));
        let enforced: bool = conn.query_row("PRAGMA foreign_keys", [], |r| r.get(0)).unwrap();
        assert!(enforced, "foreign keys are enforced after the migration");
    }
    // The new code, in the state, the deployment and the transitions.
    let t = s
        .step(Event::Deploy {
            id: DeploymentId(3),
            release: rel("v3"),
            plan,
        })
        .unwrap();
    let revision = store
        .commit_at("web", Some(revision), &t.state, t.records(), None)
        .unwrap();
    let reason = Reason::NotAcknowledged("nodes n3 did not acknowledge".into());
    let mut ended = t.state.clone();
    ended.phase = Phase::Stable {
        warm: None,
        last: Some(Ended {
            id: DeploymentId(3),
            release: rel("v3"),
            outcome: Outcome::Aborted(reason.clone()),
        }),
    };
    let record = Record::Aborted {
        id: DeploymentId(3),
        reason: reason.clone(),
    };
    store.commit_at("web", Some(revision), &ended, [&record], None).unwrap();
    assert_eq!(store.load_at("web").unwrap().map(|(s, _)| s), Some(ended.clone()));
    let newest = store.history("web", 1).unwrap().remove(0);
    assert_eq!(newest.outcome, Some(Outcome::Aborted(reason.clone())));
    let last = store.transitions("web", DeploymentId(3)).unwrap().pop().unwrap();
    assert_eq!(last.record, record);
    // Version 4's: a deployment migrating, its step's record, its failure.
    let mut migrating_plan = plans().remove(2);
    migrating_plan.migrate.expand = true;
    let revision = store.load_at("web").unwrap().unwrap().1;
    let t = ended
        .step(Event::Deploy {
            id: DeploymentId(4),
            release: rel("v4"),
            plan: migrating_plan,
        })
        .unwrap();
    assert!(matches!(t.state.phase, Phase::Migrating { .. }), "{}", t.state);
    let revision = store
        .commit_at("web", Some(revision), &t.state, t.records(), None)
        .unwrap();
    assert_eq!(store.load_at("web").unwrap().map(|(s, _)| s), Some(t.state.clone()));
    let failed = t
        .state
        .step(Event::MigrationFinished {
            id: DeploymentId(4),
            step: MigrationStep::Expand,
            ok: false,
            detail: "`./migrate expand` exited with 3".into(),
        })
        .unwrap();
    store
        .commit_at("web", Some(revision), &failed.state, failed.records(), None)
        .unwrap();
    assert_eq!(
        store.load_at("web").unwrap().map(|(s, _)| s),
        Some(failed.state.clone())
    );
    let records: Vec<Record> = store
        .transitions("web", DeploymentId(4))
        .unwrap()
        .into_iter()
        .map(|e| e.record)
        .collect();
    assert_eq!(
        records,
        t.records().chain(failed.records()).cloned().collect::<Vec<_>>()
    );
}

/// The JSON encoding (`crate::wire`) reads back every state shape, record, reason, outcome,
/// summary and entry exactly.
#[test]
fn every_shape_round_trips_through_json() {
    fn round_trip<T: Serialize + for<'de> Deserialize<'de> + PartialEq + std::fmt::Debug>(value: &T) {
        let json = serde_json::to_string(value).unwrap_or_else(|e| panic!("{value:?}: {e}"));
        let back: T = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{json}: {e}"));
        assert_eq!(&back, value, "{json}");
    }
    for state in all_states("web") {
        round_trip(&state);
    }
    for outcome in outcomes() {
        round_trip(&outcome);
    }
    let id = DeploymentId(u64::MAX);
    let mut records = vec![
        Record::Started {
            id,
            release: rel("v1"),
            colour: Colour::Blue,
            cause: Cause::ColdRollback,
        },
        Record::AwaitingPromotion { id, auto_after: None },
        Record::AwaitingPromotion {
            id,
            auto_after: Some(Duration::new(1, 1)),
        },
        Record::Promoted {
            id,
            colour: Colour::Green,
        },
        Record::WatchRestarted { id },
        Record::Retired {
            live: at(Colour::Green, "v0"),
        },
    ];
    for watch in [Watched::Skipped, Watched::Judged, Watched::Unjudged] {
        records.push(Record::WentLive {
            id,
            live: at(Colour::Blue, "v1"),
            watch,
        });
    }
    for reason in reasons() {
        records.push(Record::Aborted {
            id,
            reason: reason.clone(),
        });
        records.push(Record::RolledBack {
            id,
            to: at(Colour::Blue, "v0"),
            reason,
        });
    }
    for phase in PHASE_NAMES {
        records.push(Record::Interrupted { id, phase });
    }
    let t = from_ms(1_700_000_000_123);
    for (seq, record) in records.into_iter().enumerate() {
        round_trip(&TransitionEntry {
            seq: seq as u64,
            at: t,
            deployment: (seq % 2 == 0).then_some(id),
            record,
        });
    }
    for outcome in [None, Some(Outcome::RolledBack(Reason::Requested))] {
        round_trip(&DeploymentSummary {
            id,
            release: rel("v2"),
            colour: Colour::Green,
            cause: Cause::Deploy,
            started_at: from_ms(-5),
            promoted_at: outcome.as_ref().map(|_| t),
            ended_at: outcome.as_ref().map(|_| t),
            outcome,
        });
    }
    round_trip(&AuditEntry {
        seq: 3,
        at: t,
        audit: Audit {
            service: Some("web".into()),
            ..audit("cli", "deploy", "--version v2")
        },
    });
}

/// The encoding is the documented one, field by field: what other nodes and later versions read.
#[test]
fn the_json_encoding_is_explicit_and_stable() {
    let plan = plans().remove(1);
    let state = State {
        service: "web".into(),
        live: Some(at(Colour::Blue, "v1")),
        previous: None,
        last_id: Some(DeploymentId(2)),
        phase: Phase::Watching {
            deployment: Deployment {
                id: DeploymentId(2),
                release: rel("v2"),
                colour: Colour::Green,
                plan,
                cause: Cause::Deploy,
            },
            rollback_to: at(Colour::Blue, "v1"),
            judged: false,
            step: None,
        },
        contract: None,
        contracted: None,
    };
    let json = r#"{"service":"web","live":{"colour":"blue","release":"v1"},"previous":null,"last_id":2,"phase":{"name":"watching","deployment":{"id":2,"release":"v2","colour":"green","plan":{"health_deadline_ns":1500000000,"promote":{"kind":"auto","delay_ns":0},"watch":{"duration_ns":60000000000,"min_requests":100,"max_error_rate":0.01,"max_p99_ns":500000000},"keep_warm_ns":3600000000000},"cause":"deploy"},"rollback_to":{"colour":"blue","release":"v1"},"judged":false}}"#;
    assert_eq!(serde_json::to_string(&state).unwrap(), json);
    // A plan with schema-change steps says which; one written before they existed reads as
    // one without them.
    let mut with = state.clone();
    if let Phase::Watching { deployment, .. } = &mut with.phase {
        deployment.plan.migrate.expand = true;
    }
    let text = serde_json::to_string(&with).unwrap();
    assert!(
        text.contains(r#""keep_warm_ns":3600000000000,"migrate":{"expand":true,"contract":false,"rollback":false}}"#),
        "{text}"
    );
    assert_eq!(serde_json::from_str::<State>(json).unwrap(), state);
    let migrating = Phase::Migrating {
        deployment: Deployment {
            id: DeploymentId(3),
            release: rel("v3"),
            colour: Colour::Green,
            plan: plans().remove(0),
            cause: Cause::Deploy,
        },
        step: MigrationStep::Rollback,
        failure: Some(Reason::LiveCheckFailed("`./check` exited with 1".into())),
    };
    let text = serde_json::to_string(&migrating).unwrap();
    assert!(
        text.starts_with(r#"{"name":"migrating","deployment":{"id":3,"#)
            && text.ends_with(
                r#""step":"rollback","failure":{"reason":"live_check_failed","detail":"`./check` exited with 1"}}"#
            ),
        "{text}"
    );
    let record = Record::Migration {
        id: DeploymentId(3),
        step: MigrationStep::Expand,
        ok: false,
        detail: "exited with 3".into(),
    };
    assert_eq!(
        serde_json::to_string(&record).unwrap(),
        r#"{"kind":"migration","id":3,"step":"expand","ok":false,"detail":"exited with 3"}"#
    );
    let ended = Phase::Stable {
        warm: None,
        last: Some(Ended {
            id: DeploymentId(1),
            release: rel("v1"),
            outcome: Outcome::Aborted(Reason::HealthDeadline(Duration::from_secs(30))),
        }),
    };
    assert_eq!(
        serde_json::to_string(&ended).unwrap(),
        r#"{"name":"stable","warm":null,"last":{"id":1,"release":"v1","outcome":{"outcome":"aborted","reason":{"reason":"health_deadline","detail":30000000000}}}}"#
    );
    let record = Record::Interrupted {
        id: DeploymentId(7),
        phase: "ready to promote",
    };
    assert_eq!(
        serde_json::to_string(&record).unwrap(),
        r#"{"kind":"interrupted","id":7,"phase":"ready to promote"}"#
    );
    let rate = Reason::ErrorRate {
        errors: 3,
        requests: 10,
        max: 0.25,
    };
    assert_eq!(
        serde_json::to_string(&rate).unwrap(),
        r#"{"reason":"error_rate","detail":{"errors":3,"requests":10,"max":0.25}}"#
    );
    // Values JSON cannot hold are refused, never written as null.
    let nan = Reason::ErrorRate {
        errors: 0,
        requests: 0,
        max: f64::NAN,
    };
    assert!(serde_json::to_string(&nan).is_err());
    assert!(serde_json::to_string(&Reason::HealthDeadline(Duration::MAX)).is_err());
    // Unknown codes are refused with their name.
    let err = serde_json::from_str::<Record>(r#"{"kind":"interrupted","id":7,"phase":"sleeping"}"#).unwrap_err();
    assert!(err.to_string().contains("sleeping"), "{err}");
    let err = serde_json::from_str::<Live>(r#"{"colour":"red","release":"v1"}"#).unwrap_err();
    assert!(err.to_string().contains("red"), "{err}");
}

/// Several services committed at once: all of them, or, when one is not at its expected
/// revision, none (the others' states, records and audit untouched).
#[test]
fn several_services_commit_in_one_transaction_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let plan = plans().remove(0);
    let deploy = |service: &str, id: u64| {
        State::new(service)
            .step(Event::Deploy {
                id: DeploymentId(id),
                release: rel("v1"),
                plan: plan.clone(),
            })
            .unwrap()
    };
    let (web, api) = (deploy("web", 1), deploy("api", 1));
    let web_records: Vec<Record> = web.records().cloned().collect();
    let api_records: Vec<Record> = api.records().cloned().collect();
    let commit = |expected_api: Revision| {
        StateStore::commit_many(
            &store,
            &[
                ServiceCommit {
                    service: "web",
                    expected: Revision::NONE,
                    state: &web.state,
                    records: &web_records,
                },
                ServiceCommit {
                    service: "api",
                    expected: expected_api,
                    state: &api.state,
                    records: &api_records,
                },
            ],
            Some(audit("cli", "deploy", "release 1")),
        )
    };
    // api is not at revision 3: nothing of either is written.
    let err = commit(Revision(3)).unwrap_err();
    assert!(
        matches!(&err, StoreError::Conflict { service, .. } if service == "api"),
        "{err}"
    );
    assert_eq!(store.load("web").unwrap(), None);
    assert_eq!(store.history("web", 10).unwrap(), vec![]);
    assert_eq!(store.audit_log(10).unwrap(), vec![]);
    // At the right revisions: both, with their records, one audit entry.
    let revisions = commit(Revision::NONE).unwrap();
    assert_eq!(revisions, vec![Revision(1), Revision(1)]);
    assert_eq!(store.load("web").unwrap(), Some(web.state.clone()));
    assert_eq!(store.load("api").unwrap(), Some(api.state.clone()));
    assert_eq!(store.history("api", 10).unwrap().len(), 1);
    assert_eq!(store.audit_log(10).unwrap().len(), 1);
    // A service twice in one commit is refused.
    let twice = StateStore::commit_many(
        &store,
        &[
            ServiceCommit {
                service: "web",
                expected: Revision(1),
                state: &web.state,
                records: &[],
            },
            ServiceCommit {
                service: "web",
                expected: Revision(1),
                state: &web.state,
                records: &[],
            },
        ],
        None,
    );
    assert!(matches!(twice, Err(StoreError::Rejected { .. })), "{twice:?}");
    assert_eq!(store.load_at("web").unwrap().unwrap().1, Revision(1));
}

/// A database at version 3 (before schema changes in phases and gradual switches) gets both
/// migrations when opened: its history and state are kept, and a gradual switch's state can be
/// committed. A file that builds labelled 3 while they had version 4's columns opens as well.
#[test]
fn a_version_3_database_is_brought_up_to_date_and_a_mislabelled_one_opens() {
    for mislabelled in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE);
        let plan = plans().remove(0);
        let store = Store::open(dir.path()).unwrap();
        let mut s = State::new("web");
        let mut revision = Revision::NONE;
        commit_steps(
            &store,
            &mut s,
            &mut revision,
            [
                Event::Deploy {
                    id: DeploymentId(1),
                    release: rel("v1"),
                    plan: plan.clone(),
                },
                Event::InstancesHealthy { id: DeploymentId(1) },
                Event::SmokePassed {
                    id: DeploymentId(1),
                    detail: None,
                },
            ],
        );
        let history = store.history("web", 10).unwrap();
        drop(store);
        {
            let conn = Connection::open(&path).unwrap();
            // Mislabelled: version 4's schema under the number 3.
            schema_as_of(&conn, if mislabelled { 4 } else { 3 });
            conn.pragma_update(None, "user_version", 3).unwrap();
        }
        let store = Store::open(dir.path()).unwrap_or_else(|e| panic!("mislabelled {mislabelled}: {e}"));
        assert_eq!(store.history("web", 10).unwrap(), history);
        assert_eq!(store.load_at("web").unwrap(), Some((s.clone(), revision)));
        let version: i64 = store
            .conn
            .lock()
            .unwrap()
            .query_row("SELECT user_version FROM pragma_user_version()", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        // A gradual switch in progress, committed and read back.
        let mut gradual = plan.clone();
        gradual.gradual = Some(crate::lifecycle::Gradual {
            steps: vec![10, 50, 100],
            step: Duration::from_secs(60),
        });
        commit_steps(
            &store,
            &mut s,
            &mut revision,
            [
                Event::Deploy {
                    id: DeploymentId(2),
                    release: rel("v2"),
                    plan: gradual,
                },
                Event::InstancesHealthy { id: DeploymentId(2) },
                Event::SmokePassed {
                    id: DeploymentId(2),
                    detail: None,
                },
                Event::Promote {
                    id: Some(DeploymentId(2)),
                },
            ],
        );
        assert!(
            matches!(&s.phase, crate::lifecycle::Phase::Watching { step: Some(0), .. }),
            "{:?}",
            s.phase
        );
        assert_eq!(store.load_at("web").unwrap(), Some((s.clone(), revision)));
    }
}

/// Takes a database this code wrote back to the schema of `version` (2, 3 or 4): the columns
/// and CHECK codes later versions added are removed, and `user_version` says `version`.
fn schema_as_of(conn: &Connection, version: i64) {
    conn.execute_batch(
        "ALTER TABLE services DROP COLUMN plan_gradual;
         ALTER TABLE services DROP COLUMN watch_step;",
    )
    .unwrap();
    let mut codes = Vec::new();
    if version < 4 {
        conn.execute_batch(
            "ALTER TABLE services DROP COLUMN migration_step;
             ALTER TABLE services DROP COLUMN migration_failure;
             ALTER TABLE services DROP COLUMN plan_migrate;
             ALTER TABLE services DROP COLUMN contract;
             ALTER TABLE services DROP COLUMN contracted_version;
             ALTER TABLE transitions DROP COLUMN detail;",
        )
        .unwrap();
        codes.extend([
            ("'migration_failed', 'live_check_failed'", 3),
            ("'migrating'", 1),
            ("'migration'", 1),
        ]);
    }
    if version < 3 {
        codes.push(("'not_acknowledged'", 3));
    }
    conn.pragma_update(None, "writable_schema", true).unwrap();
    for (codes, tables) in codes {
        let quoted = format!("', {}'", codes.replace('\'', "''"));
        let changed = conn
            .execute(
                &format!(
                    "UPDATE sqlite_master SET sql = replace(sql, {quoted}, '') WHERE type = 'table' AND instr(sql, {quoted}) > 0"
                ),
                [],
            )
            .unwrap();
        assert_eq!(changed, tables, "{codes}");
    }
    conn.pragma_update(None, "writable_schema", false).unwrap();
    conn.pragma_update(None, "user_version", version).unwrap();
}

/// Steps `state` through `events`, committing each transition at the revision before it.
fn commit_steps(store: &Store, state: &mut State, revision: &mut Revision, events: impl IntoIterator<Item = Event>) {
    for event in events {
        let t = state.step(event).unwrap();
        *revision = store
            .commit_at("web", Some(*revision), &t.state, t.records(), None)
            .unwrap();
        *state = t.state;
    }
}
