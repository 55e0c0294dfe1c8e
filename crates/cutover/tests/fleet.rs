//! Three `cutover serve` nodes in a fleet, sharing their state through a real 3-member etcd
//! cluster on loopback, switching a static service as one.

mod common;

use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{free_port, kill_marked, spawn_demo_app, wait_until, Proc, BIN};
use cutover_control::testing::etcd::EtcdCluster;

/// One node: its config, its live listener, its log.
struct Node {
    name: String,
    config: PathBuf,
    front: SocketAddr,
    log: PathBuf,
    proc: Option<Proc>,
    /// Passed on to the instances the node starts (`CUTOVER_TEST_OWNER`), for the test to find
    /// (and at its end kill) them.
    owner: String,
}

impl Node {
    fn new(dir: &Path, name: &str, etcd: &[String], fleet_extra: &str, service_extra: &str) -> Node {
        let port = free_port();
        let config = dir.join(format!("{name}.toml"));
        let endpoints = etcd.iter().map(|e| format!("\"{e}\"")).collect::<Vec<_>>().join(", ");
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"127.0.0.1:{port}\"\nstate_dir = \"state-{name}\"\n\
                 [fleet]\netcd = [{endpoints}]\nnode = \"{name}\"\nlease_ttl = \"2s\"\n{fleet_extra}\n\
                 [services.api]\nhealth = {{ path = \"/up\", interval = \"100ms\", healthy = 1, deadline = \"6s\" }}\n\
                 watch = {{ duration = \"500ms\", min_requests = 1 }}\n{service_extra}\n"
            ),
        )
        .unwrap();
        let log = dir.join(format!("serve-{name}.log"));
        let mut node = Node {
            name: name.to_string(),
            config,
            front: SocketAddr::from(([127, 0, 0, 1], port)),
            log,
            proc: None,
            owner: format!("fleet-{}-{name}-{port}", std::process::id()),
        };
        node.start();
        node
    }

    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(BIN)
            .args(["serve", "-c"])
            .arg(&self.config)
            .env("CUTOVER_TEST_OWNER", &self.owner)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.proc = Some(Proc(child));
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .arg("-c")
            .arg(&self.config)
            .output()
            .unwrap()
    }

    /// `GET /metrics` on the node's admin socket: the body.
    fn metrics(&self) -> String {
        use std::io::Read;
        let socket = self
            .config
            .parent()
            .unwrap()
            .join(format!("state-{}/admin.sock", self.name));
        let Ok(mut s) = std::os::unix::net::UnixStream::connect(&socket) else {
            return String::new();
        };
        let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer
    }

    /// A gauge of [`Node::metrics`]: the value of the line that starts with `series`.
    fn gauge(&self, series: &str) -> Option<i64> {
        self.metrics()
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
    }

    /// `cutover status --json` of this node: its `fleet`.
    fn fleet_status(&self) -> serde_json::Value {
        let out = self.cli(&["status", "--json"]);
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap_or_default()["fleet"].clone()
    }

    /// `cutover deploy api --version VERSION --upstream UPSTREAM` sent to this node.
    fn deploy(&self, version: &str, upstream: &str) -> Output {
        self.cli(&["deploy", "api", "--version", version, "--upstream", upstream])
    }
}

/// A fleet in front of two demo apps (`s1 first` at `v1`, `s2 second` at `v2`): a real 3-member
/// etcd cluster, three nodes with `fleet_extra` in their `[fleet]` table, and release v1
/// deployed through the leader and served by every node.
struct Fleet {
    nodes: Vec<Node>,
    leader: usize,
    v2: String,
    // In this order: the nodes stop before the apps, the directory and etcd go.
    _apps: (Proc, Proc),
    _dir: tempfile::TempDir,
    _etcd: EtcdCluster,
}

impl Fleet {
    fn with_v1_live(fleet_extra: &str) -> Fleet {
        Fleet::with_v1_live_in(tempfile::tempdir().unwrap(), fleet_extra, "")
    }

    /// As [`Fleet::with_v1_live`], in `dir`, with `service_extra` in the service's table.
    fn with_v1_live_in(dir: tempfile::TempDir, fleet_extra: &str, service_extra: &str) -> Fleet {
        let etcd = EtcdCluster::start();
        let (a, b) = (free_port(), free_port());
        let apps = (
            Proc(spawn_demo_app(a, "s1", "first")),
            Proc(spawn_demo_app(b, "s2", "second")),
        );
        let nodes: Vec<Node> = ["n1", "n2", "n3"]
            .iter()
            .map(|n| Node::new(dir.path(), n, &etcd.endpoints(), fleet_extra, service_extra))
            .collect();
        let leader = started(&nodes);
        let (v1, v2) = (format!("127.0.0.1:{a}"), format!("127.0.0.1:{b}"));
        let out = nodes[leader].deploy("v1", &v1);
        assert!(out.status.success(), "{}\n{}", text(&out), logs(&nodes));
        for n in &nodes {
            assert!(
                wait_until(Duration::from_secs(5), || get(n.front)
                    == Some((200, "s1 first".into()))),
                "node {} serves {:?}\n{}",
                n.name,
                get(n.front),
                logs(&nodes)
            );
        }
        Fleet {
            nodes,
            leader,
            v2,
            _apps: apps,
            _dir: dir,
            _etcd: etcd,
        }
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn logs(nodes: &[Node]) -> String {
    nodes
        .iter()
        .map(|n| {
            format!(
                "--- {} ---\n{}",
                n.name,
                std::fs::read_to_string(&n.log).unwrap_or_default()
            )
        })
        .collect()
}

/// One GET / on a fresh connection: status and body.
fn get(addr: SocketAddr) -> Option<(u16, String)> {
    let stream = TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut writer = stream.try_clone().ok()?;
    let mut reader = BufReader::new(stream);
    writer
        .write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .ok()?;
    common::read_answer(&mut reader).ok()
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// What one keep-alive client saw: each answer's body with the instant (unix ms) it arrived, and
/// the failures.
#[derive(Default)]
struct Seen {
    answers: Vec<(u64, String)>,
    failures: Vec<String>,
}

/// A keep-alive client sending GET / to `addr` until `stop` (at most 30 s or 40000 requests). As
/// HTTP clients do, it opens a new connection after an answer with `Connection: close`.
fn load(addr: SocketAddr, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Seen> {
    std::thread::spawn(move || {
        let mut seen = Seen::default();
        let started = Instant::now();
        let mut conn: Option<(BufReader<TcpStream>, TcpStream)> = None;
        while !stop.load(Ordering::Relaxed)
            && started.elapsed() < Duration::from_secs(30)
            && seen.answers.len() < 40_000
        {
            if conn.is_none() {
                match TcpStream::connect(addr) {
                    Ok(s) => {
                        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                        conn = Some((BufReader::new(s.try_clone().unwrap()), s));
                    }
                    Err(e) => {
                        seen.failures.push(format!("connect: {e}"));
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                }
            }
            let (reader, writer) = conn.as_mut().unwrap();
            let answer = writer
                .write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
                .and_then(|_| common::read_response(reader));
            match answer {
                Ok((200, body, close)) => {
                    seen.answers.push((unix_ms(), body));
                    if close {
                        conn = None;
                    }
                }
                Ok((status, body, _)) => {
                    seen.failures.push(format!("{status} {body}"));
                    conn = None;
                }
                Err(e) => {
                    seen.failures.push(format!("{e}"));
                    conn = None;
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        seen
    })
}

/// Waits until every node answers `cutover status`; returns the one that leads.
fn started(nodes: &[Node]) -> usize {
    for n in nodes {
        assert!(
            wait_until(Duration::from_secs(20), || n.cli(&["status"]).status.success()),
            "node {} did not start\n{}",
            n.name,
            logs(nodes)
        );
    }
    leader_of(nodes)
}

/// The node that leads, as every node's `cutover status` says.
fn leader_of(nodes: &[Node]) -> usize {
    let all: Vec<usize> = (0..nodes.len()).collect();
    let Some(leader) = leader_among(nodes, &all, Duration::from_secs(20)) else {
        panic!("no node leads the fleet\n{}", logs(nodes));
    };
    let name = nodes[leader].name.as_str();
    assert!(
        wait_until(Duration::from_secs(5), || all
            .iter()
            .all(|&i| nodes[i].fleet_status()["leader"] == name)),
        "every node names {name} as the leader\n{}",
        logs(nodes)
    );
    leader
}

/// A deployment under load sent to all three nodes, through a node that does not lead (which
/// forwards it to the leader and follows it from the leader's notices), loses no request; when
/// `cutover deploy` returns, every node serves the new version; no node answered from it before
/// the switch committed (which follows the release's validation).
#[test]
fn a_deploy_under_load_switches_every_node_and_loses_nothing() {
    let f = Fleet::with_v1_live("ack_timeout = \"5s\"");
    let (nodes, leader) = (&f.nodes, f.leader);
    let follower = (leader + 1) % 3;

    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = nodes.iter().map(|n| load(n.front, stop.clone())).collect();
    std::thread::sleep(Duration::from_millis(300));
    let out = nodes[follower].deploy("v2", &f.v2);
    assert!(out.status.success(), "{}\n{}", text(&out), logs(nodes));
    let returned = unix_ms();
    let said = text(&out);
    assert!(
        said.contains("promoted to green")
            && said.contains("every node of the fleet serves green")
            && said.contains("api v2 is live"),
        "the follower's deploy shows the leader's steps: {said}"
    );
    for n in nodes {
        assert_eq!(
            get(n.front),
            Some((200, "s2 second".into())),
            "node {} right after the deploy returned\n{}\n{}",
            n.name,
            text(&out),
            logs(nodes)
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let seen: Vec<Seen> = clients.into_iter().map(|c| c.join().unwrap()).collect();

    let history = nodes[follower].cli(&["history", "api", "--json"]);
    assert!(history.status.success(), "{}", text(&history));
    let history: serde_json::Value = serde_json::from_slice(&history.stdout).unwrap();
    let v2 = history
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["version"] == "v2")
        .unwrap_or_else(|| panic!("no v2 in the history: {history}"));
    let promoted = v2["promoted_at"]
        .as_u64()
        .unwrap_or_else(|| panic!("v2 not promoted: {v2}"));
    for (n, s) in nodes.iter().zip(&seen) {
        assert!(s.failures.is_empty(), "node {}: {:?}", n.name, s.failures);
        assert!(
            s.answers.len() > 50,
            "node {}: only {} answers",
            n.name,
            s.answers.len()
        );
        let first_v2 = s
            .answers
            .iter()
            .find(|(_, body)| body == "s2 second")
            .map(|(at, _)| *at)
            .unwrap_or_else(|| panic!("node {} never answered from v2", n.name));
        assert!(
            first_v2 >= promoted && first_v2 <= returned + 1000,
            "node {}: first answer from v2 at {first_v2}, switch committed at {promoted}, deploy returned at {returned}",
            n.name
        );
        assert!(
            s.answers.iter().all(|(at, body)| body == "s1 first" || *at >= promoted),
            "node {}",
            n.name
        );
    }
    println!("{}", text(&out));
}

/// A node that cannot apply a switch (stopped with SIGSTOP) is named in the deploy's output once
/// `ack_timeout` passes; with `on_missing_ack = "proceed"` the switch stands on the others, and
/// the stopped node catches up when it runs again.
#[test]
fn a_stopped_node_is_named_and_catches_up_when_the_switch_proceeds() {
    let f = Fleet::with_v1_live("ack_timeout = \"1500ms\"\non_missing_ack = \"proceed\"");
    let (nodes, leader) = (&f.nodes, f.leader);
    let stopped = &nodes[(leader + 1) % 3];
    let pid = stopped.proc.as_ref().unwrap().0.id().to_string();
    assert!(Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    let t0 = Instant::now();
    let out = nodes[leader].deploy("v2", &f.v2);
    let took = t0.elapsed();
    let said = text(&out);
    assert!(Command::new("kill").args(["-CONT", &pid]).status().unwrap().success());
    assert!(out.status.success(), "{said}\n{}", logs(nodes));
    assert!(
        said.contains(&format!("nodes {} did not acknowledge", stopped.name))
            && said.contains("the switch stands (on_missing_ack = \"proceed\")"),
        "the stopped node is named: {said}"
    );
    assert!(
        took >= Duration::from_millis(1500),
        "waited for the acknowledgement: {took:?}"
    );
    for n in nodes.iter().filter(|n| n.name != stopped.name) {
        assert_eq!(get(n.front), Some((200, "s2 second".into())), "node {}", n.name);
    }
    assert!(
        wait_until(Duration::from_secs(5), || get(stopped.front)
            == Some((200, "s2 second".into()))),
        "the stopped node catches up once it runs: {:?}\n{}",
        get(stopped.front),
        logs(nodes)
    );
}

/// A node killed (-9) before a switch and started again while the switch waits for it comes back
/// on the revision that is current: every answer it gives after the restart is from the new
/// release, none from the one it served before it died.
#[test]
fn a_node_restarted_during_a_switch_comes_back_on_the_current_revision() {
    let mut f = Fleet::with_v1_live("ack_timeout = \"8s\"\non_missing_ack = \"proceed\"");
    let leader = f.leader;
    let v2 = f.v2.clone();
    let nodes = &mut f.nodes;
    let restarted = (leader + 1) % 3;
    let other = (leader + 2) % 3;
    nodes[restarted].proc.take(); // killed (-9) and reaped
    let deploy = Command::new(BIN)
        .args(["deploy", "api", "--version", "v2", "--upstream", &v2, "-c"])
        .arg(&nodes[leader].config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The switch is committed (another node serves v2) and waits for the dead node.
    assert!(wait_until(Duration::from_secs(10), || get(nodes[other].front)
        == Some((200, "s2 second".into()))));
    nodes[restarted].start();
    let front = nodes[restarted].front;
    let mut answers = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while answers.len() < 20 && Instant::now() < deadline {
        if let Some(answer) = get(front) {
            answers.push(answer);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = deploy.wait_with_output().unwrap();
    assert!(out.status.success(), "{}\n{}", text(&out), logs(nodes));
    assert!(
        !answers.is_empty() && answers.iter().all(|a| *a == (200, "s2 second".to_string())),
        "answers of the restarted node: {answers:?}\n{}",
        logs(nodes)
    );
}

/// A node that cannot apply a switch (stopped with SIGSTOP) with the default `on_missing_ack =
/// "rollback"`: named in the deploy's output, the switch is rolled back on every node, the
/// deploy fails, history gives the reason, and the stopped node, once it runs, serves the
/// release that stands without passing through the rolled-back one.
#[test]
fn a_switch_a_node_did_not_apply_is_rolled_back_by_default() {
    let f = Fleet::with_v1_live("ack_timeout = \"1500ms\"");
    let (nodes, leader) = (&f.nodes, f.leader);
    let stopped = &nodes[(leader + 1) % 3];
    let pid = stopped.proc.as_ref().unwrap().0.id().to_string();
    assert!(Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    let out = nodes[leader].deploy("v2", &f.v2);
    let said = text(&out);
    let others_after: Vec<_> = nodes
        .iter()
        .filter(|n| n.name != stopped.name)
        .map(|n| (n.name.clone(), get(n.front)))
        .collect();
    assert!(Command::new("kill").args(["-CONT", &pid]).status().unwrap().success());
    // Once it runs, the stopped node's first answers come from v1: it skips the revision that
    // was rolled back.
    let mut resumed = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while resumed.len() < 20 && Instant::now() < deadline {
        if let Some(a) = get(stopped.front) {
            resumed.push(a);
        }
    }
    assert!(!out.status.success(), "the deploy fails: {said}");
    assert!(
        said.contains(&format!("nodes {} did not acknowledge", stopped.name))
            && said.contains("rolling back to blue (on_missing_ack = \"rollback\")"),
        "the stopped node is named and the rollback announced: {said}\n{}",
        logs(nodes)
    );
    for (name, answer) in others_after {
        assert_eq!(
            answer,
            Some((200, "s1 first".into())),
            "node {name} after the deploy returned"
        );
    }
    assert!(
        resumed.len() == 20 && resumed.iter().all(|a| *a == (200, "s1 first".to_string())),
        "the resumed node: {resumed:?}\n{}",
        logs(nodes)
    );
    let history = text(&nodes[leader].cli(&["history", "api"]));
    assert!(
        history.contains("rolled back") && history.contains(&format!("nodes {} did not acknowledge", stopped.name)),
        "{history}"
    );
}

/// kill -9 of the leader while a release is being validated: another node leads within the
/// lease's time to live, recovers the deployment as a restart does (interrupted, in history),
/// no node ever answers from the unvalidated release, no request to the surviving nodes fails,
/// and the new leader deploys.
#[test]
fn a_leader_killed_during_validation_is_replaced_and_nothing_unvalidated_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let slow = dir.path().join("slow-smoke");
    let extra = format!(
        "validate = {{ smoke = \"test ! -e '{}' || sleep 30\", timeout = \"60s\" }}",
        slow.display()
    );
    let mut f = Fleet::with_v1_live_in(dir, "ack_timeout = \"3s\"", &extra);
    let leader = f.leader;
    let v2 = f.v2.clone();
    let nodes = &mut f.nodes;
    let survivors: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    std::fs::write(&slow, "").unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = survivors.iter().map(|&i| load(nodes[i].front, stop.clone())).collect();
    let out = nodes[leader].cli(&["deploy", "api", "--version", "v2", "--upstream", &v2, "--no-wait"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        wait_until(Duration::from_secs(10), || text(&nodes[leader].cli(&["status"]))
            .contains("validating")),
        "{}",
        text(&nodes[leader].cli(&["status"]))
    );
    let killed_at = Instant::now();
    nodes[leader].proc.take(); // kill -9, reaped

    let new_leader = leader_among(nodes, &survivors, Duration::from_secs(15));
    let took = killed_at.elapsed();
    let new_leader = new_leader.unwrap_or_else(|| panic!("no node leads\n{}", logs(nodes)));
    println!("node {} leads {took:?} after the kill", nodes[new_leader].name);
    assert!(
        took < Duration::from_secs(2) + Duration::from_millis(1500),
        "a new leader within the lease's 2 s (and the campaign's poll): {took:?}"
    );

    let interrupted = || {
        let out = nodes[new_leader].cli(&["history", "api", "--json"]);
        let history: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        history
            .as_array()
            .and_then(|a| a.iter().find(|d| d["version"] == "v2").cloned())
            .filter(|d| d["outcome"] == "interrupted")
    };
    assert!(
        wait_until(Duration::from_secs(10), || interrupted().is_some()),
        "{}\n{}",
        text(&nodes[new_leader].cli(&["history", "api"])),
        logs(nodes)
    );
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    for (&i, c) in survivors.iter().zip(clients) {
        let seen = c.join().unwrap();
        assert!(seen.failures.is_empty(), "node {}: {:?}", nodes[i].name, seen.failures);
        assert!(
            seen.answers.len() > 50,
            "node {}: {} answers",
            nodes[i].name,
            seen.answers.len()
        );
        assert!(
            seen.answers.iter().all(|(_, body)| body == "s1 first"),
            "node {} answered from the unvalidated release",
            nodes[i].name
        );
    }

    // The new leader carries on: v2 again, validated this time.
    std::fs::remove_file(&slow).unwrap();
    let out = nodes[new_leader].deploy("v2", &v2);
    assert!(out.status.success(), "{}\n{}", text(&out), logs(nodes));
    for &i in &survivors {
        assert_eq!(
            get(nodes[i].front),
            Some((200, "s2 second".into())),
            "node {}",
            nodes[i].name
        );
    }
}

/// The node that leads among `among`, as its own `cutover status` says (a member that leads).
/// Waits at most `within`.
fn leader_among(nodes: &[Node], among: &[usize], within: Duration) -> Option<usize> {
    let t0 = Instant::now();
    while t0.elapsed() < within {
        for &i in among {
            let fleet = nodes[i].fleet_status();
            if fleet["leading"] == true && fleet["member"] == true {
                return Some(i);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// A leader that loses its lease without dying (stopped with SIGSTOP longer than the lease's
/// life): another node leads and deploys meanwhile; once it runs again, the old leader runs
/// nothing, refuses commands naming the new leader, joins the fleet again, serves what was
/// committed while it was away, and acknowledges the next switch.
#[test]
fn a_leader_that_lost_its_lease_steps_down_and_joins_again() {
    let f = Fleet::with_v1_live("ack_timeout = \"5s\"\non_missing_ack = \"proceed\"");
    let (nodes, old) = (&f.nodes, f.leader);
    let others: Vec<usize> = (0..3).filter(|&i| i != old).collect();
    let pid = nodes[old].proc.as_ref().unwrap().0.id().to_string();
    assert!(Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    let new = leader_among(nodes, &others, Duration::from_secs(10));
    let new = match new {
        Some(n) => n,
        None => {
            let _ = Command::new("kill").args(["-CONT", &pid]).status();
            panic!("no other node leads\n{}", logs(nodes));
        }
    };
    let out = nodes[new].deploy("v2", &f.v2);
    assert!(Command::new("kill").args(["-CONT", &pid]).status().unwrap().success());
    assert!(out.status.success(), "{}\n{}", text(&out), logs(nodes));

    // Back, it steps down: it follows the new leader.
    assert!(
        wait_until(Duration::from_secs(5), || {
            let fleet = nodes[old].fleet_status();
            fleet["leading"] == false && fleet["member"] == true && fleet["leader"] == nodes[new].name.as_str()
        }),
        "{}\n{}",
        nodes[old].fleet_status(),
        logs(nodes)
    );
    assert!(
        wait_until(Duration::from_secs(5), || get(nodes[old].front)
            == Some((200, "s2 second".into()))),
        "the old leader serves what was committed while it was stopped: {:?}",
        get(nodes[old].front)
    );
    // A member again: a command sent to it is carried out by the new leader, and the next
    // switch waits for it and hears from it.
    let out = nodes[old].cli(&["rollback", "api"]);
    assert!(out.status.success(), "{}\n{}", text(&out), logs(nodes));
    assert!(
        text(&out).contains("every node of the fleet serves blue"),
        "the rollback says where the fleet stands: {}",
        text(&out)
    );
    let out = nodes[new].deploy("v2", &f.v2);
    let said = text(&out);
    assert!(out.status.success(), "{said}\n{}", logs(nodes));
    assert!(
        said.contains("every node of the fleet serves")
            && said.contains(&nodes[old].name)
            && !said.contains("did not acknowledge"),
        "{said}\n{}",
        logs(nodes)
    );
    // Nothing was decided by the old leader after it was stopped: the history is the new
    // leader's three deployments after v1.
    let out = nodes[new].cli(&["history", "api", "--json"]);
    let history: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let versions: Vec<_> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["version"].as_str().unwrap_or("").to_string(), d["outcome"].clone()))
        .collect();
    assert_eq!(versions.len(), 3, "{history}");
}

/// etcd losing members: with one of three down, deploys work; with two down, every node keeps
/// serving the last revision without a failed request, a deploy is refused with an error that
/// names etcd and its quorum, and all works again once the members return.
#[test]
fn etcd_losing_its_quorum_leaves_traffic_alone_and_refuses_deploys() {
    let mut f = Fleet::with_v1_live("ack_timeout = \"5s\"");
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = f.nodes.iter().map(|n| load(n.front, stop.clone())).collect();

    f._etcd.kill(0);
    let leader = leader_among(&f.nodes, &[0, 1, 2], Duration::from_secs(10)).expect("a leader with one member down");
    let out = f.nodes[leader].deploy("v2", &f.v2);
    assert!(
        out.status.success(),
        "one member down: {}\n{}",
        text(&out),
        logs(&f.nodes)
    );
    for n in &f.nodes {
        assert_eq!(get(n.front), Some((200, "s2 second".into())), "node {}", n.name);
    }

    f._etcd.kill(1);
    let lost_at = Instant::now();
    // Longer than the lease's life: every node's lease is gone.
    std::thread::sleep(Duration::from_secs(3));
    let mut refusals = Vec::new();
    for n in &f.nodes {
        let t0 = Instant::now();
        let out = n.cli(&["rollback", "api"]);
        refusals.push((n.name.clone(), out.status.success(), text(&out), t0.elapsed()));
    }
    for (name, ok, said, took) in &refusals {
        assert!(!ok, "node {name} accepted a rollback without quorum: {said}");
        assert!(
            said.contains("no node leads") || said.contains("majority"),
            "node {name}: the refusal says why: {said}"
        );
        assert!(*took < Duration::from_secs(15), "node {name}: refused in {took:?}");
    }
    let serving = f
        .nodes
        .iter()
        .map(|n| (n.name.clone(), get(n.front)))
        .collect::<Vec<_>>();
    // Each node says so, in its status and its metrics.
    for n in &f.nodes {
        let said = text(&n.cli(&["status"]));
        assert!(
            said.contains(&format!("fleet: node {}", n.name)) && said.contains("not a member"),
            "node {}: {said}",
            n.name
        );
        let series = |name: &str| format!("cutover_fleet_{name}{{node=\"{}\"}}", n.name);
        assert_eq!(n.gauge(&series("member")), Some(0), "{}", n.metrics());
        assert_eq!(n.gauge(&series("leader")), Some(0), "{}", n.metrics());
        assert_eq!(n.gauge(&series("connected")), Some(0), "{}", n.metrics());
    }

    f._etcd.restart(0);
    f._etcd.restart(1);
    f._etcd.wait_until_healthy(&[0, 1, 2], Duration::from_secs(20)).unwrap();
    let back = lost_at.elapsed();
    let leader = leader_among(&f.nodes, &[0, 1, 2], Duration::from_secs(15))
        .unwrap_or_else(|| panic!("no leader after the members returned\n{}", logs(&f.nodes)));
    let out = f.nodes[leader].cli(&["rollback", "api"]);
    assert!(
        out.status.success(),
        "after recovery: {}\n{}",
        text(&out),
        logs(&f.nodes)
    );
    assert!(
        text(&out).contains("rolled back instantly"),
        "the warm colour survived: {}",
        text(&out)
    );
    for n in &f.nodes {
        assert!(
            wait_until(Duration::from_secs(5), || get(n.front)
                == Some((200, "s1 first".into()))),
            "node {} after recovery: {:?}\n{}",
            n.name,
            get(n.front),
            logs(&f.nodes)
        );
    }
    stop.store(true, Ordering::Relaxed);
    for (n, c) in f.nodes.iter().zip(clients) {
        let seen = c.join().unwrap();
        assert!(seen.failures.is_empty(), "node {}: {:?}", n.name, seen.failures);
    }
    for (name, answer) in serving {
        assert_eq!(answer, Some((200, "s2 second".into())), "node {name} without quorum");
    }
    // Back: every node a member, following etcd, and current; one leads.
    for n in &f.nodes {
        let series = |name: &str| format!("cutover_fleet_{name}{{node=\"{}\"}}", n.name);
        assert!(
            wait_until(Duration::from_secs(5), || n.gauge(&series("member")) == Some(1)
                && n.gauge(&series("connected")) == Some(1)),
            "{}",
            n.metrics()
        );
    }
    // Membership converges within a lease's life (a node learns that etcd let its lease go
    // no later than etcd does, and joins again).
    let listed = |fleet: &serde_json::Value| {
        let members = fleet["nodes"].as_array().cloned().unwrap_or_default();
        members.len() == 3 && members.iter().filter(|m| m["leader"] == true).count() == 1
    };
    assert!(
        wait_until(Duration::from_secs(5), || listed(&f.nodes[leader].fleet_status())),
        "{}\n{}",
        f.nodes[leader].fleet_status(),
        logs(&f.nodes)
    );
    let fleet = f.nodes[leader].fleet_status();
    let revision = fleet["revisions"]["api"].as_u64().unwrap_or_else(|| panic!("{fleet}"));
    for n in &f.nodes {
        assert!(
            wait_until(Duration::from_secs(5), || {
                let fleet = n.fleet_status();
                let member = fleet["nodes"]
                    .as_array()
                    .and_then(|a| a.iter().find(|m| m["name"] == n.name.as_str()).cloned());
                member.is_some_and(|m| m["services"]["api"]["current"] == true)
                    && n.gauge(&format!(
                        "cutover_fleet_applied_revision{{node=\"{}\",service=\"api\"}}",
                        n.name
                    )) == Some(revision as i64)
            }),
            "node {}: {}\n{}",
            n.name,
            n.fleet_status(),
            n.metrics()
        );
    }
    println!("{}", text(&f.nodes[leader].cli(&["status"])));
    for (name, _, said, took) in refusals {
        println!("without quorum, node {name} refused in {took:?}: {}", said.trim());
    }
    println!("quorum back after {back:?}");
}

/// Daemons started by `cutover upgrade` (not children of the test): killed (-9) on drop.
struct Upgraded(Vec<u32>);

impl Drop for Upgraded {
    fn drop(&mut self) {
        for pid in &self.0 {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    }
}

/// `cutover upgrade` of the leader, then of a follower, under keep-alive load on every node: no
/// request fails, the leader still leads, and the next switch is acknowledged by every node.
#[test]
fn upgrading_nodes_under_load_loses_nothing_and_keeps_the_lead() {
    let f = Fleet::with_v1_live("ack_timeout = \"5s\"");
    let mut upgraded = Upgraded(Vec::new());
    let (nodes, leader) = (&f.nodes, f.leader);
    let follower = (leader + 1) % 3;
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = nodes.iter().map(|n| load(n.front, stop.clone())).collect();
    std::thread::sleep(Duration::from_millis(300));
    for i in [leader, follower] {
        let t0 = Instant::now();
        let out = nodes[i].cli(&["upgrade", "--json"]);
        assert!(
            out.status.success(),
            "upgrade of node {} ({:?}): {}\n{}",
            nodes[i].name,
            t0.elapsed(),
            text(&out),
            logs(nodes)
        );
        let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        upgraded.0.push(answer["pid"].as_u64().unwrap() as u32);
        println!("node {} upgraded in {:?}", nodes[i].name, t0.elapsed());
    }
    assert_eq!(
        leader_among(nodes, &[0, 1, 2], Duration::from_secs(5)),
        Some(leader),
        "the upgraded leader leads\n{}",
        logs(nodes)
    );
    let out = nodes[leader].deploy("v2", &f.v2);
    let said = text(&out);
    assert!(out.status.success(), "{said}\n{}", logs(nodes));
    assert!(
        said.contains("every node of the fleet serves") && nodes.iter().all(|n| said.contains(&n.name)),
        "{said}"
    );
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    for (n, c) in nodes.iter().zip(clients) {
        let seen = c.join().unwrap();
        assert!(seen.failures.is_empty(), "node {}: {:?}", n.name, seen.failures);
        assert!(
            seen.answers.len() > 100,
            "node {}: {} answers",
            n.name,
            seen.answers.len()
        );
    }
}

/// A leader stopped gracefully (SIGTERM) leaves the fleet as it stops: another node leads at
/// once, well within the lease's 2 s, and the stopped node, started again, is a member at once.
#[test]
fn a_leader_stopped_gracefully_hands_the_lead_on_at_once() {
    let mut f = Fleet::with_v1_live("ack_timeout = \"5s\"");
    let leader = f.leader;
    let others: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    let pid = f.nodes[leader].proc.as_ref().unwrap().0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let t0 = Instant::now();
    let _ = f.nodes[leader].proc.as_mut().unwrap().0.wait();
    let stopped_in = t0.elapsed();
    let new = leader_among(&f.nodes, &others, Duration::from_secs(10)).expect("another node leads");
    let took = t0.elapsed();
    println!(
        "stopped in {stopped_in:?}; node {} leads {took:?} after SIGTERM",
        f.nodes[new].name
    );
    assert!(
        took < Duration::from_secs(1),
        "handed on at once: {took:?}\n{}",
        logs(&f.nodes)
    );

    f.nodes[leader].start();
    let back = Instant::now();
    let n = &f.nodes[leader];
    assert!(
        wait_until(Duration::from_secs(10), || n.cli(&["status"]).status.success()),
        "{}",
        logs(&f.nodes)
    );
    assert!(
        back.elapsed() < Duration::from_secs(2),
        "registered at once: {:?}",
        back.elapsed()
    );
    let out = f.nodes[new].deploy("v2", &f.v2);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("{},", f.nodes[leader].name))
            || text(&out).contains(&format!(", {}", f.nodes[leader].name)),
        "{}",
        text(&out)
    );
}

/// Every node checks the static instances itself: an instance that goes unhealthy (it answers
/// `/up` with 503 but still serves other paths) after its release went live is taken out of
/// rotation on the nodes that do not lead too, by their own checks, while the others serve on.
#[test]
fn every_node_takes_an_instance_that_fails_its_checks_out_of_rotation() {
    let f = Fleet::with_v1_live("ack_timeout = \"5s\"");
    let (nodes, leader) = (&f.nodes, f.leader);
    let port = free_port();
    let third = format!("127.0.0.1:{port}");
    let mut app = Proc(spawn_demo_app(port, "s3", "third"));
    assert!(wait_until(Duration::from_secs(10), || TcpStream::connect(&third).is_ok()));
    let out = nodes[leader].cli(&[
        "deploy",
        "api",
        "--version",
        "v2",
        "--upstream",
        &f.v2,
        "--upstream",
        &third,
    ]);
    assert!(out.status.success(), "{}\n{}", text(&out), logs(nodes));
    // Both instances serve on every node.
    for n in nodes {
        let answers: Vec<_> = (0..20).filter_map(|_| get(n.front)).collect();
        assert!(
            answers.contains(&(200, "s2 second".into())) && answers.contains(&(200, "s3 third".into())),
            "node {}: {answers:?}",
            n.name
        );
    }
    // The third instance comes back unhealthy on the same port.
    drop(app);
    app = Proc(spawn_demo_app(port, "s3-unhealthy", "third"));
    assert!(wait_until(Duration::from_secs(10), || TcpStream::connect(&third).is_ok()));
    for n in nodes {
        assert!(
            wait_until(Duration::from_secs(5), || (0..10)
                .filter_map(|_| get(n.front))
                .all(|a| a == (200, "s2 second".to_string()))),
            "node {} still routes to the unhealthy instance\n{}",
            n.name,
            logs(nodes)
        );
    }
    drop(app);
}

/// A fleet whose service runs on every node (process driver): a real 3-member etcd cluster and
/// three nodes, each running its own instances of `pf-demo` (`demo-app` answering
/// `VERSION NODE-COLOUR`), and release v1 deployed and served by every node from its own
/// instances. The smoke test, run by each node against its own preview route, appends
/// `UNIX_MS ANSWER` to `smoke.log`. A node's instances wait as many seconds as the file
/// `delay-NODE` says before they start, and a release fails to start on a node that has a file
/// `fail-NODE-VERSION` (see [`ProcessFleet::slow`], [`ProcessFleet::fail`]).
struct ProcessFleet {
    nodes: Vec<Node>,
    leader: usize,
    dir: PathBuf,
    _dir: tempfile::TempDir,
    _etcd: EtcdCluster,
}

impl Drop for ProcessFleet {
    fn drop(&mut self) {
        // The daemons first (killed: their instances stay), then every instance they left.
        let owners: Vec<String> = self.nodes.iter().map(|n| n.owner.clone()).collect();
        self.nodes.clear();
        for o in owners {
            kill_marked(&format!("CUTOVER_TEST_OWNER={o}"));
        }
    }
}

impl ProcessFleet {
    fn start(fleet_extra: &str) -> ProcessFleet {
        let etcd = EtcdCluster::start();
        let dir = tempfile::tempdir().unwrap();
        let nodes: Vec<Node> = ["n1", "n2", "n3"]
            .iter()
            .map(|n| {
                let service = format!(
                    "instances = 2\n\
                     validate = {{ smoke = 'a=$(curl -sf -H \"X-Cutover-Preview: $CUTOVER_PREVIEW_TOKEN\" \"$CUTOVER_PREVIEW_URL/\") && echo \"$(date +%s%3N) $a\" >> smoke.log' }}\n{}",
                    demo_command(n)
                );
                Node::new(dir.path(), n, &etcd.endpoints(), fleet_extra, &service)
            })
            .collect();
        let leader = started(&nodes);
        let out = nodes[leader].cli(&["deploy", "api", "--version", "v1"]);
        assert!(out.status.success(), "{}\n{}", text(&out), logs(&nodes));
        for n in &nodes {
            let own = format!("v1 pf-{}-blue", n.name);
            assert!(
                wait_until(Duration::from_secs(5), || get(n.front) == Some((200, own.clone()))),
                "node {} serves {:?}, not its own v1\n{}",
                n.name,
                get(n.front),
                logs(&nodes)
            );
        }
        ProcessFleet {
            nodes,
            leader,
            dir: dir.path().to_path_buf(),
            _dir: dir,
            _etcd: etcd,
        }
    }

    /// From now on, node `i`'s instances start `secs` seconds late.
    fn slow(&self, i: usize, secs: u32) {
        std::fs::write(self.dir.join(format!("delay-{}", self.nodes[i].name)), secs.to_string()).unwrap();
    }

    /// From now on, `version` fails to start on node `i`.
    fn fail(&self, i: usize, version: &str) {
        std::fs::write(self.dir.join(format!("fail-{}-{version}", self.nodes[i].name)), "").unwrap();
    }

    /// The smoke tests run so far: (unix ms, answer).
    fn smokes(&self) -> Vec<(u64, String)> {
        std::fs::read_to_string(self.dir.join("smoke.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (t, answer) = l.split_once(' ')?;
                Some((t.parse().ok()?, answer.to_string()))
            })
            .collect()
    }
}

/// The demo-app command of a process fleet's node `name` (see [`ProcessFleet`]).
fn demo_command(name: &str) -> String {
    format!(
        "command = 'sleep \"$(cat delay-{name} 2>/dev/null || echo 0)\"; \
         [ -e \"fail-{name}-$CUTOVER_VERSION\" ] && {{ echo $CUTOVER_VERSION cannot start on {name}; exit 3; }}; \
         exec {BIN} demo-app --port {{port}} --colour pf-{name}-$CUTOVER_COLOUR'\n"
    )
}

/// The pids of `node`'s instances of `colour` running now (its marker in their environment,
/// `pf-NODE-COLOUR` on their command line).
fn instances_of(node: &Node, colour: &str) -> Vec<u32> {
    let (tag, marker) = (
        format!("pf-{}-{colour}", node.name),
        format!("CUTOVER_TEST_OWNER={}", node.owner),
    );
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let (Ok(cmdline), Ok(env)) = (
            std::fs::read(entry.path().join("cmdline")),
            std::fs::read(entry.path().join("environ")),
        ) else {
            continue;
        };
        let has = |text: &[u8], what: &str| text.split(|b| *b == 0).any(|a| a == what.as_bytes());
        if has(&cmdline, &tag) && has(&cmdline, "demo-app") && has(&env, &marker) {
            pids.push(pid);
        }
    }
    pids.sort();
    pids
}

/// The process driver in a fleet: each node runs its own instances of a release, and the
/// switch waits for the slowest node's. A deploy under load through a node that does not lead,
/// with the other follower's instances 2 s slower to start: zero failed requests on every node; every node
/// answers only from its own instances; no node answered from v2 before the slow node's v2 was
/// healthy and had passed its smoke test; after the deploy returns, every node serves its own v2.
/// Then a release whose instances are not ready on one node within the health deadline, and one
/// whose instances fail to start on one node: each named in the deploy's failure, nothing
/// switched anywhere, and the failed release's instances stopped on every node.
#[test]
fn a_fleet_running_its_own_instances_switches_when_every_node_is_ready() {
    let f = ProcessFleet::start("ack_timeout = \"5s\"");
    let (nodes, leader) = (&f.nodes, f.leader);
    // Deployed through one follower; the other one is slow.
    let (follower, slow) = ((leader + 1) % 3, (leader + 2) % 3);
    f.slow(slow, 2);
    let slow_name = nodes[slow].name.clone();

    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = nodes.iter().map(|n| load(n.front, stop.clone())).collect();
    std::thread::sleep(Duration::from_millis(300));
    let started = unix_ms();
    let out = nodes[follower].cli(&["deploy", "api", "--version", "v2"]);
    assert!(out.status.success(), "{}\n{}", text(&out), logs(nodes));
    let said = text(&out);
    assert!(
        said.contains("green healthy and validated on every node")
            && said.contains("every node of the fleet serves green"),
        "the deploy says it waited for every node: {said}"
    );
    for n in nodes {
        assert_eq!(
            get(n.front),
            Some((200, format!("v2 pf-{}-green", n.name))),
            "node {} right after the deploy returned\n{said}\n{}",
            n.name,
            logs(nodes)
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let seen: Vec<Seen> = clients.into_iter().map(|c| c.join().unwrap()).collect();

    // The slow node's v2 was validated (its smoke test saw its own green) 2 s after the deploy.
    let smokes = f.smokes();
    let slow_ready = smokes
        .iter()
        .find(|(_, a)| *a == format!("v2 pf-{slow_name}-green"))
        .map(|(t, _)| *t)
        .unwrap_or_else(|| {
            panic!(
                "{slow_name}'s smoke test of v2 did not run: {smokes:?}\n{}",
                logs(nodes)
            )
        });
    assert!(
        slow_ready >= started + 2000,
        "{slow_name}'s v2 started 2 s late: {slow_ready} vs {started}"
    );
    for n in nodes {
        let own = format!("v2 pf-{}-green", n.name);
        assert!(
            smokes.iter().any(|(_, a)| *a == own),
            "{} validated its own v2: {smokes:?}",
            n.name
        );
    }
    for (n, s) in nodes.iter().zip(&seen) {
        assert!(
            s.failures.is_empty(),
            "node {} failed: {:?}",
            n.name,
            &s.failures[..s.failures.len().min(5)]
        );
        assert!(
            s.answers.len() > 50,
            "node {} answered {} requests",
            n.name,
            s.answers.len()
        );
        for (_, body) in &s.answers {
            assert!(
                body == &format!("v1 pf-{}-blue", n.name) || body == &format!("v2 pf-{}-green", n.name),
                "node {} answered from instances not its own: {body}",
                n.name
            );
        }
        let first_v2 = s.answers.iter().find(|(_, b)| b.starts_with("v2")).map(|(t, _)| *t);
        let first_v2 = first_v2.unwrap_or_else(|| panic!("node {} never answered from v2", n.name));
        assert!(
            first_v2 >= slow_ready,
            "node {} answered from v2 at {first_v2}, before {slow_name}'s v2 was validated at {slow_ready}",
            n.name
        );
    }

    // v3 never gets healthy on the slow follower within the health deadline (6 s): the deploy
    // fails naming it; nothing switched.
    // A deploy of v3 that fails saying each of `expected`; every node still serves its own v2.
    let refused = |expected: &[String]| {
        let out = nodes[leader].cli(&["deploy", "api", "--version", "v3"]);
        let said = text(&out);
        assert!(!out.status.success(), "{said}");
        assert!(expected.iter().all(|e| said.contains(e)), "says {expected:?}: {said}");
        for n in nodes {
            assert_eq!(
                get(n.front),
                Some((200, format!("v2 pf-{}-green", n.name))),
                "node {}",
                n.name
            );
        }
    };
    f.slow(slow, 60);
    refused(&[format!("not healthy and validated within 6s on node(s) {slow_name}")]);
    f.slow(slow, 0);

    // v3 cannot start on the slow follower: the deploy fails naming it; nothing switched; v3
    // stopped everywhere.
    f.fail(slow, "v3");
    refused(&[format!("node {slow_name}:"), format!("v3 cannot start on {slow_name}")]);
    for n in nodes {
        assert!(
            wait_until(Duration::from_secs(15), || instances_of(n, "blue").is_empty()),
            "node {} still runs blue instances {:?}\n{}",
            n.name,
            instances_of(n, "blue"),
            logs(nodes)
        );
        assert_eq!(instances_of(n, "green").len(), 2, "node {}", n.name);
    }
}

/// Instances outlive their node's daemon: a node killed (-9) and started again adopts its own
/// instances (the same processes serve, none started); a leader killed (-9) is replaced by a
/// node that adopts the instances it ran as a follower; the fleet then deploys as before, and
/// an instant rollback brings every node back to its own warm instances.
#[test]
fn nodes_killed_and_restarted_adopt_their_own_instances() {
    let mut f = ProcessFleet::start("ack_timeout = \"5s\"");
    let leader = f.leader;
    let follower = (leader + 1) % 3;
    let pids: Vec<Vec<u32>> = f.nodes.iter().map(|n| instances_of(n, "blue")).collect();
    for (n, p) in f.nodes.iter().zip(&pids) {
        assert_eq!(p.len(), 2, "node {} runs its 2 instances", n.name);
    }

    // Node `i` started again serves its own v1 from the same processes.
    let restarted = |f: &mut ProcessFleet, i: usize| {
        f.nodes[i].start();
        let n = &f.nodes[i];
        assert!(
            wait_until(Duration::from_secs(20), || get(n.front)
                == Some((200, format!("v1 pf-{}-blue", n.name)))),
            "the restarted node {} serves its own v1\n{}",
            n.name,
            logs(&f.nodes)
        );
        assert_eq!(
            instances_of(n, "blue"),
            pids[i],
            "node {} adopted the same processes\n{}",
            n.name,
            logs(&f.nodes)
        );
    };

    // A follower killed and started again.
    drop(f.nodes[follower].proc.take());
    restarted(&mut f, follower);

    // The leader killed under load on the others: another node leads and adopts what it ran
    // as a follower; no request fails.
    let others: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = others.iter().map(|&i| load(f.nodes[i].front, stop.clone())).collect();
    std::thread::sleep(Duration::from_millis(300));
    drop(f.nodes[leader].proc.take());
    let new = leader_among(&f.nodes, &others, Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no other node leads\n{}", logs(&f.nodes)));
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    for (&i, c) in others.iter().zip(clients) {
        let seen = c.join().unwrap();
        let n = &f.nodes[i];
        assert!(
            seen.failures.is_empty(),
            "node {}: {:?}",
            n.name,
            &seen.failures[..seen.failures.len().min(5)]
        );
        assert!(
            seen.answers.iter().all(|(_, b)| *b == format!("v1 pf-{}-blue", n.name)),
            "node {} answered from its own v1 only",
            n.name
        );
    }
    for &i in &others {
        let n = &f.nodes[i];
        assert_eq!(
            get(n.front),
            Some((200, format!("v1 pf-{}-blue", n.name))),
            "node {}",
            n.name
        );
        assert_eq!(instances_of(n, "blue"), pids[i], "node {} kept its processes", n.name);
    }
    // The old leader, started again, follows.
    restarted(&mut f, leader);

    let out = f.nodes[new].cli(&["deploy", "api", "--version", "v2"]);
    assert!(out.status.success(), "{}\n{}", text(&out), logs(&f.nodes));
    for n in &f.nodes {
        assert_eq!(
            get(n.front),
            Some((200, format!("v2 pf-{}-green", n.name))),
            "node {}",
            n.name
        );
        assert_eq!(instances_of(n, "green").len(), 2, "node {}", n.name);
    }
    // An instant rollback: every node serves its own warm v1 again, the same processes.
    let out = f.nodes[(new + 1) % 3].cli(&["rollback", "api"]);
    assert!(out.status.success(), "{}\n{}", text(&out), logs(&f.nodes));
    for (i, n) in f.nodes.iter().enumerate() {
        assert_eq!(
            get(n.front),
            Some((200, format!("v1 pf-{}-blue", n.name))),
            "node {}",
            n.name
        );
        assert_eq!(
            instances_of(n, "blue"),
            pids[i],
            "node {} rolled back to its warm instances",
            n.name
        );
    }
}
