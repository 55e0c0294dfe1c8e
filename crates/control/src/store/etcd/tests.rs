//! The etcd store against a real 3-member etcd cluster (`crate::testing::etcd`). Each test starts
//! its own cluster (a second or two), so that the tests run apart, in parallel or one per
//! process, and a member killed by one test cannot disturb another.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;

use cutover_proxy::Colour;

use super::*;
use crate::lifecycle::{Cause, Live, Release};
use crate::store::tests::shared_contract;
use crate::testing::etcd::EtcdCluster;

fn store(cluster: &EtcdCluster, prefix: &str) -> EtcdStore {
    let mut options = EtcdOptions::new(cluster.endpoints());
    options.prefix = prefix.to_string();
    EtcdStore::connect(options).expect("connect to the test cluster")
}

fn live(version: &str) -> Live {
    Live {
        colour: Colour::Green,
        release: Release::new(version),
    }
}

fn audit(action: &str) -> Audit {
    Audit {
        actor: "cli".into(),
        service: None,
        action: action.into(),
        arguments: String::new(),
        result: "ok".into(),
    }
}

#[test]
fn etcd_keeps_the_state_store_contract() {
    let cluster = EtcdCluster::start();
    let store = store(&cluster, "/contract");
    shared_contract(&store);

    // The same keys under another prefix are another store.
    let other = self::store(&cluster, "/other/");
    assert_eq!(other.load("web").unwrap(), None);
    assert_eq!(other.history("records", 10).unwrap(), vec![]);

    // A commit's audit entry names the committed service; the log is newest first.
    let (_, revision) = store.load("web").unwrap().unwrap();
    let state = store.load("web").unwrap().unwrap().0;
    store
        .commit("web", revision, &state, &[], Some(audit("promote")))
        .unwrap();
    store.append_audit(&audit("refused")).unwrap();
    let log = store.audit_log(2).unwrap();
    let got: Vec<_> = log
        .iter()
        .map(|e| (e.audit.action.as_str(), e.audit.service.as_deref()))
        .collect();
    assert_eq!(got, [("refused", None), ("promote", Some("web"))]);
    assert!(log[0].seq > log[1].seq);

    // Service names with `/` and `%` stay apart from each other's keys.
    for name in ["a/b", "a", "a%2Fb", "a%b"] {
        let state = State::new(name);
        store.commit(name, Revision::NONE, &state, &[], None).unwrap();
    }
    for name in ["a/b", "a", "a%2Fb", "a%b"] {
        assert_eq!(
            store.load(name).unwrap().map(|(s, _)| s.service),
            Some(name.to_string())
        );
    }
}

/// A failure's message of megabytes (a smoke command's output) is cut to fit etcd's request
/// limit, and the commit goes through.
#[test]
fn long_messages_are_cut_to_fit_a_request() {
    let cluster = EtcdCluster::start();
    let store = store(&cluster, "/long");
    let id = DeploymentId(1);
    let mut state = State::new("web");
    state.last_id = Some(id);
    let started = Record::Started {
        id,
        release: Release::new("v1"),
        colour: Colour::Blue,
        cause: Cause::Deploy,
    };
    let r1 = store.commit("web", Revision::NONE, &state, &[started], None).unwrap();
    let huge = "ü".repeat(2 * 1024 * 1024);
    let reason = Reason::SmokeFailed(huge.clone());
    state.phase = Phase::Stable {
        warm: None,
        last: Some(crate::lifecycle::Ended {
            id,
            release: Release::new("v1"),
            outcome: Outcome::Aborted(reason.clone()),
        }),
    };
    let mut big_audit = audit("deploy");
    big_audit.result = huge.clone();
    store
        .commit("web", r1, &state, &[Record::Aborted { id, reason }], Some(big_audit))
        .unwrap();
    let records = store.transitions("web", id).unwrap();
    let Record::Aborted {
        reason: Reason::SmokeFailed(text),
        ..
    } = &records[1].record
    else {
        panic!("{records:?}")
    };
    assert!(text.len() < MAX_TEXT_BYTES + 100, "{}", text.len());
    assert!(huge.starts_with(text.split(" [").next().unwrap()));
    assert!(text.ends_with("more bytes cut]"), "{}", &text[text.len() - 40..]);
    let history = store.history("web", 1).unwrap();
    assert_eq!(
        history[0].outcome,
        Some(Outcome::Aborted(Reason::SmokeFailed(text.clone())))
    );
    let (loaded, _) = store.load("web").unwrap().unwrap();
    let Phase::Stable { last: Some(ended), .. } = loaded.phase else {
        panic!()
    };
    assert_eq!(ended.outcome, Outcome::Aborted(Reason::SmokeFailed(text.clone())));
    assert!(store.audit_log(1).unwrap()[0].audit.result.len() < MAX_TEXT_BYTES + 100);

    // More records than one etcd transaction takes are refused, and nothing is written.
    let many = vec![Record::Healthy { id }; MAX_RECORDS + 1];
    let (_, revision) = store.load("web").unwrap().unwrap();
    let err = store.commit("web", revision, &state, &many, None).unwrap_err();
    assert!(matches!(err, StoreError::Unrepresentable { .. }), "{err}");
    assert_eq!(store.transitions("web", id).unwrap().len(), 2);
}

/// Two nodes decide on the same revision at the same instant: exactly one commit wins, the
/// other is told of the conflict, and the stored state is the winner's.
#[test]
fn two_nodes_committing_on_one_revision_one_wins() {
    let cluster = EtcdCluster::start();
    let nodes = [Arc::new(store(&cluster, "/race")), Arc::new(store(&cluster, "/race"))];
    let mut revision = nodes[0]
        .commit("web", Revision::NONE, &State::new("web"), &[], None)
        .unwrap();
    let mut wins = [0; 2];
    for round in 0..50 {
        let barrier = Arc::new(Barrier::new(2));
        let handles: Vec<_> = nodes
            .iter()
            .enumerate()
            .map(|(n, node)| {
                let (node, barrier) = (Arc::clone(node), Arc::clone(&barrier));
                thread::spawn(move || {
                    let mut state = State::new("web");
                    state.live = Some(live(&format!("node{n}-round{round}")));
                    barrier.wait();
                    let result = node.commit("web", revision, &state, &[], Some(audit("deploy")));
                    (state, result)
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect();
        let winners: Vec<_> = handles.iter().filter(|(_, r)| r.is_ok()).collect();
        assert_eq!(winners.len(), 1, "round {round}: {handles:?}");
        let (state, Ok(won)) = winners[0] else { unreachable!() };
        for (_, result) in &handles {
            if let Err(err) = result {
                assert!(
                    matches!(err, StoreError::Conflict { expected, found, .. }
                        if *expected == revision.0 && *found == won.0),
                    "round {round}: {err}"
                );
            }
        }
        wins[handles.iter().position(|(_, r)| r.is_ok()).unwrap()] += 1;
        // Either node reads the winner's state at the winner's revision.
        for node in &nodes {
            assert_eq!(node.load("web").unwrap(), Some((state.clone(), *won)), "round {round}");
        }
        revision = *won;
    }
    // Exactly one audit entry per round: the loser wrote nothing.
    assert_eq!(nodes[0].audit_log(1000).unwrap().len(), 50);
    eprintln!("wins per node: {wins:?}");
}

/// Sends a prepared commit once, as one attempt of `retry` does.
fn send(store: &EtcdStore, commit: &CommitTxn) -> Committed {
    store
        .handle
        .block_on(send_commit(store.kv.clone(), commit.clone()))
        .expect("the test cluster answers")
}

/// A commit's transaction sent again after etcd applied it (as `retry` does when the answer was
/// lost) finds its own write and reports it applied, at the same revision; another commit on
/// the same revision, with its own nonce, gets the conflict and writes nothing.
#[test]
fn a_commit_sent_again_recognises_its_own_write() {
    let cluster = EtcdCluster::start();
    let store = store(&cluster, "/again");
    let state_key = store.service_key("web", "state");
    let prepare = |expected: Revision, version: &str| {
        let mut state = State::new("web");
        state.live = Some(live(version));
        let mut prepared = Prepared::new(store.service_key("web", "commit"));
        prepared.put(state_key.clone(), serde_json::to_vec(&state).unwrap());
        let txn = prepared.into_txn(&state_key, i64::try_from(expected.0).unwrap());
        (state, txn)
    };

    // The first commit of a service (compared on the key's absence).
    let (first, write) = prepare(Revision::NONE, "v1");
    let Committed::Applied(r1) = send(&store, &write) else {
        panic!("the first sending is applied")
    };
    assert_eq!(send(&store, &write), Committed::Applied(r1));
    let (_, rival) = prepare(Revision::NONE, "rival");
    assert_ne!(rival.nonce, write.nonce);
    assert_eq!(send(&store, &rival), Committed::Conflict(r1));
    let r1 = Revision(r1.unsigned_abs());
    assert_eq!(store.load("web").unwrap(), Some((first, r1)));

    // A later commit, and a rival on the same revision.
    let (mine, write) = prepare(r1, "v2");
    let (_, rival) = prepare(r1, "rival");
    let Committed::Applied(r2) = send(&store, &write) else {
        panic!("the first sending is applied")
    };
    for _ in 0..2 {
        assert_eq!(send(&store, &write), Committed::Applied(r2));
    }
    assert_eq!(send(&store, &rival), Committed::Conflict(r2));
    let r2 = Revision(r2.unsigned_abs());
    assert_eq!(store.load("web").unwrap(), Some((mine.clone(), r2)));
    // Through `commit`, a rival on the old revision is refused as well (by the read before the
    // transaction), and writes nothing.
    let mut other = mine.clone();
    other.live = Some(live("rival"));
    let err = store.commit("web", r1, &other, &[], Some(audit("deploy"))).unwrap_err();
    assert!(
        matches!(err, StoreError::Conflict { expected, found, .. } if expected == r1.0 && found == r2.0),
        "{err}"
    );
    assert_eq!(store.load("web").unwrap(), Some((mine.clone(), r2)));
    assert_eq!(
        store.audit_log(10).unwrap().len(),
        0,
        "the refused commits wrote nothing"
    );

    // Once the state is no longer the one it wrote, the sending is a conflict: a state put
    // without the commit key (by an older cutover) leaves the nonce at an older revision...
    let json = serde_json::to_vec(&other).unwrap();
    let put = store
        .handle
        .block_on(store.kv.clone().put(state_key.clone(), json, None))
        .unwrap();
    let r3 = put.header().unwrap().revision();
    assert_eq!(send(&store, &write), Committed::Conflict(r3));
    // ...and another commit puts its own nonce.
    let r4 = store
        .commit("web", Revision(r3.unsigned_abs()), &mine, &[], None)
        .unwrap();
    assert_eq!(send(&store, &write), Committed::Conflict(i64::try_from(r4.0).unwrap()));
    assert_eq!(store.load("web").unwrap(), Some((mine, r4)));
}

/// A TCP relay on loopback between the etcd client and one member. The first time a request
/// carrying `marker` passes through, it forwards the request, holds back everything the member
/// sends from then on, waits until `applied` says the request took effect, and breaks both
/// connections: etcd applied the request and the client never gets the answer. Every other
/// connection and request passes unchanged.
struct AnswerLosingRelay {
    addr: SocketAddr,
    /// How many requests carrying the marker went through.
    sent: Arc<AtomicUsize>,
    /// Whether an answer was held back and the request had taken effect.
    lost: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl AnswerLosingRelay {
    fn start(member: &str, marker: &'static [u8], applied: impl Fn() -> bool + Send + Sync + 'static) -> Self {
        let member: SocketAddr = member.trim_start_matches("http://").parse().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let relay = AnswerLosingRelay {
            addr: listener.local_addr().unwrap(),
            sent: Arc::new(AtomicUsize::new(0)),
            lost: Arc::new(AtomicBool::new(false)),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let (sent, lost, stop) = (relay.sent.clone(), relay.lost.clone(), relay.stop.clone());
        let applied = Arc::new(applied);
        let done = Arc::new(AtomicBool::new(false));
        thread::spawn(move || {
            for client in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let (Ok(client), Ok(server)) = (client, TcpStream::connect(member)) else {
                    continue;
                };
                let holding = Arc::new(AtomicBool::new(false));
                let both = Arc::new([client.try_clone().unwrap(), server.try_clone().unwrap()]);
                let close = |both: &[TcpStream; 2]| {
                    for socket in both {
                        let _ = socket.shutdown(Shutdown::Both);
                    }
                };
                let (mut from, mut to) = (server.try_clone().unwrap(), client.try_clone().unwrap());
                let (hold, close_both) = (holding.clone(), both.clone());
                thread::spawn(move || {
                    let mut buf = [0u8; 16 * 1024];
                    while let Ok(n @ 1..) = from.read(&mut buf) {
                        if !hold.load(Ordering::SeqCst) && to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    close(&close_both);
                });
                let (mut from, mut to) = (client, server);
                let (sent, lost, done, applied) = (sent.clone(), lost.clone(), done.clone(), applied.clone());
                thread::spawn(move || {
                    let mut buf = [0u8; 16 * 1024];
                    let mut tail = Vec::new();
                    while let Ok(n @ 1..) = from.read(&mut buf) {
                        let mut window = std::mem::take(&mut tail);
                        window.extend_from_slice(&buf[..n]);
                        let found = window.windows(marker.len()).filter(|w| *w == marker).count();
                        sent.fetch_add(found, Ordering::SeqCst);
                        let lose = found > 0 && !done.swap(true, Ordering::SeqCst);
                        if lose {
                            holding.store(true, Ordering::SeqCst);
                        }
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        if lose {
                            let until = Instant::now() + Duration::from_secs(2);
                            while !applied() && Instant::now() < until {
                                thread::sleep(Duration::from_millis(5));
                            }
                            lost.store(applied(), Ordering::SeqCst);
                            break;
                        }
                        tail = window.split_off(window.len().saturating_sub(marker.len() - 1));
                    }
                    close(&both);
                });
            }
        });
        relay
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for AnswerLosingRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accepting thread, which then sees `stop`.
        let _ = TcpStream::connect(self.addr);
    }
}

/// etcd applies a commit and the connection breaks before its answer arrives: the store sends
/// the commit again on a new connection, recognises its own write, and reports the commit done
/// at the revision it was applied at, rather than a conflict with itself. A commit of another
/// node on the revision the lost one compared against still gets the conflict (the rival's
/// transaction itself is in `a_commit_sent_again_recognises_its_own_write`).
#[test]
fn a_commit_whose_answer_is_lost_succeeds_when_sent_again() {
    const MARKER: &str = "answer-lost-v2";
    let cluster = EtcdCluster::start();
    let direct = Arc::new(store(&cluster, "/lost"));
    let r1 = direct
        .commit("web", Revision::NONE, &State::new("web"), &[], None)
        .unwrap();
    let mut state = State::new("web");
    state.live = Some(live(MARKER));

    let observer = Arc::clone(&direct);
    let wanted = state.clone();
    let relay = AnswerLosingRelay::start(
        &cluster.endpoint(0),
        MARKER.as_bytes(),
        move || matches!(observer.load("web"), Ok(Some((found, _))) if found == wanted),
    );
    let mut options = EtcdOptions::new([relay.endpoint()]);
    options.prefix = "/lost".into();
    let through_relay = EtcdStore::connect(options).unwrap();
    let r2 = through_relay
        .commit("web", r1, &state, &[], Some(audit("deploy")))
        .unwrap_or_else(|e| panic!("the commit was applied; its answer was lost: {e}"));
    assert!(
        relay.lost.load(Ordering::SeqCst),
        "the relay broke the connection after the write took effect"
    );
    assert!(
        relay.sent.load(Ordering::SeqCst) >= 2,
        "the commit was sent again: {}",
        relay.sent.load(Ordering::SeqCst)
    );
    assert_eq!(direct.load("web").unwrap(), Some((state.clone(), r2)));
    assert_eq!(through_relay.load("web").unwrap(), Some((state.clone(), r2)));
    assert_eq!(direct.audit_log(10).unwrap().len(), 1, "written once");

    // Another node that decided on the same revision is refused, and writes nothing.
    let mut other = State::new("web");
    other.live = Some(live("other"));
    let err = direct
        .commit("web", r1, &other, &[], Some(audit("deploy")))
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Conflict { expected, found, .. } if expected == r1.0 && found == r2.0),
        "{err}"
    );
    assert_eq!(direct.load("web").unwrap(), Some((state.clone(), r2)));
    assert_eq!(direct.audit_log(10).unwrap().len(), 1);
    // The service goes on from the lost answer's revision.
    state.live = Some(live("v3"));
    through_relay.commit("web", r2, &state, &[], None).unwrap();
}

#[test]
fn deployment_ids_from_two_nodes_are_distinct_and_increasing() {
    let cluster = EtcdCluster::start();
    let nodes = [Arc::new(store(&cluster, "/ids")), Arc::new(store(&cluster, "/ids"))];
    let barrier = Arc::new(Barrier::new(2));
    let per_node: Vec<Vec<u64>> = nodes
        .iter()
        .map(|node| {
            let (node, barrier) = (Arc::clone(node), Arc::clone(&barrier));
            thread::spawn(move || {
                barrier.wait();
                (0..40).map(|_| node.next_deployment_id("web").unwrap().0).collect()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    for ids in &per_node {
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    }
    let mut all: Vec<u64> = per_node.concat();
    all.sort();
    all.dedup();
    assert_eq!(all, (1..=80).collect::<Vec<_>>());
}

/// With one member of three down the store works; with two down a commit fails within the
/// timeout, names the endpoints and says what to do, and writes nothing.
#[test]
fn a_lost_quorum_fails_commits_in_bounded_time_and_never_half_writes() {
    let mut cluster = EtcdCluster::start();
    let timeout = Duration::from_secs(2);
    let mut options = EtcdOptions::new(cluster.endpoints());
    options.prefix = "/quorum".into();
    options.timeout = timeout;
    let store = EtcdStore::connect(options).unwrap();
    let mut state = State::new("web");
    let mut revision = store.commit("web", Revision::NONE, &state, &[], None).unwrap();

    cluster.kill(0);
    for n in 0..3 {
        state.live = Some(live(&format!("v{n}")));
        revision = store
            .commit("web", revision, &state, &[], Some(audit("deploy")))
            .unwrap_or_else(|e| panic!("commit {n} with one member down: {e}"));
        assert_eq!(store.load("web").unwrap(), Some((state.clone(), revision)));
    }
    assert!(store.next_deployment_id("web").is_ok());

    cluster.kill(1);
    let mut refused = state.clone();
    refused.live = Some(live("never"));
    let started = Instant::now();
    let err = store
        .commit("web", revision, &refused, &[], Some(audit("deploy")))
        .unwrap_err();
    let elapsed = started.elapsed();
    let message = err.to_string();
    assert!(
        elapsed < timeout + Duration::from_secs(1),
        "took {elapsed:?}: {message}"
    );
    assert!(matches!(err, StoreError::EtcdTimeout { .. }), "{message}");
    assert!(err.is_retryable());
    for endpoint in cluster.endpoints() {
        assert!(message.contains(&endpoint), "{message}");
    }
    assert!(message.contains("quorum") && message.contains("within 2s"), "{message}");
    let started = Instant::now();
    assert!(store.load("web").is_err());
    assert!(started.elapsed() < timeout + Duration::from_secs(1));

    cluster.restart(0);
    cluster.restart(1);
    cluster
        .wait_until_healthy(&[0, 1, 2], Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    // The timed-out commit was either never applied or applied whole: etcd promises nothing
    // about a request whose answer did not come (a member that had it in its log may lead after
    // the restart and commit it). Either way the state and its audit entry go together, and
    // the error said so ("may or may not have taken effect").
    assert!(message.contains("may or may not"), "{message}");
    let mut loaded = None;
    for _ in 0..50 {
        match store.load("web") {
            Ok(found) => {
                loaded = found;
                break;
            }
            Err(_) => thread::sleep(Duration::from_millis(100)),
        }
    }
    let (found, found_revision) = loaded.expect("the state is there after the restart");
    let audits = store.audit_log(100).unwrap().len();
    if found == state {
        assert_eq!(found_revision, revision);
        assert_eq!(
            audits, 3,
            "the state from before, without the failed commit's audit entry"
        );
    } else {
        assert_eq!(
            found, refused,
            "the only other state there can be is the failed commit's, whole"
        );
        assert_eq!(audits, 4, "applied late, with its audit entry");
    }
    // And the store works again.
    state.live = Some(live("after"));
    store.commit("web", found_revision, &state, &[], None).unwrap();
}

#[test]
fn unreachable_endpoints_fail_in_bounded_time_with_what_to_do() {
    // A port nothing listens on: connection refused at once, retried until the timeout.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut options = EtcdOptions::new([endpoint.clone()]);
    options.timeout = Duration::from_millis(800);
    let store = EtcdStore::connect(options).unwrap();
    let started = Instant::now();
    let err = store.load("web").unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    let message = err.to_string();
    assert!(
        message.contains(&endpoint) && message.contains("reachable"),
        "{message}"
    );

    let err = EtcdStore::connect(EtcdOptions::new(Vec::<String>::new())).unwrap_err();
    assert!(err.to_string().contains("no endpoints"), "{err}");
}
