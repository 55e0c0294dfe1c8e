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

use common::{free_port, spawn_demo_app, wait_until, Proc, BIN};
use cutover_control::testing::etcd::EtcdCluster;

/// One node: its config, its live listener, its log.
struct Node {
    name: String,
    config: PathBuf,
    front: SocketAddr,
    log: PathBuf,
    proc: Option<Proc>,
}

impl Node {
    fn new(dir: &Path, name: &str, etcd: &[String], fleet_extra: &str) -> Node {
        let port = free_port();
        let config = dir.join(format!("{name}.toml"));
        let endpoints = etcd.iter().map(|e| format!("\"{e}\"")).collect::<Vec<_>>().join(", ");
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"127.0.0.1:{port}\"\nstate_dir = \"state-{name}\"\n\
                 [fleet]\netcd = [{endpoints}]\nnode = \"{name}\"\nlease_ttl = \"2s\"\n{fleet_extra}\n\
                 [services.api]\nhealth = {{ path = \"/up\", interval = \"100ms\", healthy = 1 }}\n\
                 watch = {{ duration = \"500ms\", min_requests = 1 }}\n"
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
    v1: String,
    v2: String,
    // In this order: the nodes stop before the apps, the directory and etcd go.
    _apps: (Proc, Proc),
    _dir: tempfile::TempDir,
    _etcd: EtcdCluster,
}

impl Fleet {
    fn with_v1_live(fleet_extra: &str) -> Fleet {
        let etcd = EtcdCluster::start();
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (free_port(), free_port());
        let apps = (
            Proc(spawn_demo_app(a, "s1", "first")),
            Proc(spawn_demo_app(b, "s2", "second")),
        );
        let nodes: Vec<Node> = ["n1", "n2", "n3"]
            .iter()
            .map(|n| Node::new(dir.path(), n, &etcd.endpoints(), fleet_extra))
            .collect();
        for n in &nodes {
            assert!(
                wait_until(Duration::from_secs(20), || n.cli(&["status"]).status.success()),
                "node {} did not start\n{}",
                n.name,
                logs(&nodes)
            );
        }
        let leader = leader_of(&nodes);
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
            v1,
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

/// A keep-alive client sending GET / to `addr` until `stop` (at most 30 s or 40000 requests).
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
                .and_then(|_| common::read_answer(reader));
            match answer {
                Ok((200, body)) => seen.answers.push((unix_ms(), body)),
                Ok((status, body)) => {
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

/// The node that leads, from the refusal of a command sent to another (which names it).
fn leader_of(nodes: &[Node]) -> usize {
    let mut last = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        for (i, n) in nodes.iter().enumerate() {
            let out = n.cli(&["promote", "api"]);
            let t = text(&out);
            // The leader answers the command itself (there is nothing to promote); the others
            // refuse it, naming the leader.
            let answers_itself =
                !t.contains("does not lead the fleet") && !t.contains("cannot connect") && !t.contains("not running");
            if answers_itself
                && nodes.iter().enumerate().all(|(j, m)| {
                    j == i || text(&m.cli(&["promote", "api"])).contains(&format!("node {} does", n.name))
                })
            {
                return i;
            }
            last = t;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("no node leads the fleet: {last}\n{}", logs(nodes));
}

/// A deployment under load sent to all three nodes loses no request; when `cutover deploy`
/// returns, every node serves the new version; no node answered from it before the switch
/// committed (which follows the release's validation); a follower refuses commands, naming the
/// leader.
#[test]
fn a_deploy_under_load_switches_every_node_and_loses_nothing() {
    let f = Fleet::with_v1_live("ack_timeout = \"5s\"");
    let (nodes, leader) = (&f.nodes, f.leader);
    let follower = (leader + 1) % 3;
    let out = nodes[follower].deploy("v1", &f.v1);
    assert!(!out.status.success());
    assert!(
        text(&out).contains(&format!(
            "node {} does not lead the fleet, node {} does",
            nodes[follower].name, nodes[leader].name
        )),
        "{}",
        text(&out)
    );

    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = nodes.iter().map(|n| load(n.front, stop.clone())).collect();
    std::thread::sleep(Duration::from_millis(300));
    let out = nodes[leader].deploy("v2", &f.v2);
    assert!(out.status.success(), "{}\n{}", text(&out), logs(nodes));
    let returned = unix_ms();
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
