//! A fault in the control plane never stops the data plane: `cutover serve` driven by the real
//! CLI, a panic injected into a service's actor while keep-alive clients load the service, and
//! the assertion that not one request fails, the instances keep their pids, the daemon says what
//! happened, and the service is managed again afterwards.
//!
//! The panic is injected with `CUTOVER_TEST_PANIC_ON_DEPLOY` (see
//! `crates/control/src/daemon/supervise.rs`), which only the debug build `cargo test` runs reads.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::collections::BTreeMap;

mod common;
use common::*;

/// The version whose deploy panics the actor.
const BOOM: &str = "boom";

/// A test's directory, config and daemon. Every instance carries a marker in its environment, so
/// the test finds its processes (and kills what is left at the end).
struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
    front: SocketAddr,
    marker: String,
    log: PathBuf,
    daemon: Option<Proc>,
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = Command::new("kill").args(["-TERM", &d.0.id().to_string()]).status();
            wait_until(Duration::from_secs(20), || d.0.try_wait().ok().flatten().is_some());
        }
        for pid in self.pids(None) {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        }
    }
}

impl Setup {
    fn start() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let marker = format!(
            "CUTOVER_TEST_MARK={}",
            dir.path().file_name().unwrap().to_string_lossy()
        );
        let config = dir.path().join("cutover.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"127.0.0.1:{port}\"\nstate_dir = \"state\"\n\n[services.web]\n\
                 command = \"{marker} {BIN} demo-app --port {{port}}\"\ninstances = 2\n\
                 health = {{ path = \"/up\", interval = \"100ms\", timeout = \"1s\", healthy = 1, unhealthy = 2, deadline = \"5s\" }}\n\
                 drain_timeout = \"3s\"\nkeep_warm = \"1m\"\nwatch = {{ duration = \"1s\", min_requests = 10 }}\n"
            ),
        )
        .unwrap();
        let log = dir.path().join("serve.log");
        let child = Command::new(BIN)
            .args(["serve", "-c"])
            .arg(&config)
            .env("CUTOVER_TEST_PANIC_ON_DEPLOY", BOOM)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let s = Setup {
            dir,
            config,
            front: SocketAddr::from(([127, 0, 0, 1], port)),
            marker,
            log,
            daemon: Some(Proc(child)),
        };
        assert!(
            wait_until(Duration::from_secs(20), || s.cli(&["status"]).status.success()),
            "daemon answers status"
        );
        s
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .arg("-c")
            .arg(&self.config)
            .output()
            .unwrap()
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("state/admin.sock")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Pids of this test's processes, of `version` only if given (read from their environment).
    fn pids(&self, version: Option<&str>) -> Vec<u32> {
        let want = version.map(|v| format!("CUTOVER_VERSION={v}"));
        let mut pids = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(env) = std::fs::read(entry.path().join("environ")) else {
                continue;
            };
            let vars: Vec<&[u8]> = env.split(|&b| b == 0).collect();
            if vars.contains(&self.marker.as_bytes()) && want.as_ref().is_none_or(|w| vars.contains(&w.as_bytes())) {
                pids.push(pid);
            }
        }
        pids.sort();
        pids
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn scrape(socket: &Path) -> String {
    let mut s = UnixStream::connect(socket).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    std::io::Read::read_to_string(&mut s, &mut out).unwrap();
    out
}

/// The events of `GET /v1/events` (server-sent events on the admin socket), as they arrive.
struct Events {
    seen: Arc<Mutex<Vec<serde_json::Value>>>,
    stream: UnixStream,
}

impl Events {
    fn follow(socket: &Path) -> Events {
        let mut stream = UnixStream::connect(socket).unwrap();
        stream.write_all(b"GET /v1/events HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (reader, into) = (stream.try_clone().unwrap(), seen.clone());
        std::thread::spawn(move || {
            // Ends when the stream is shut down (drop) or the daemon goes away.
            for line in BufReader::new(reader).lines() {
                let Ok(line) = line else { return };
                if let Some(json) = line.strip_prefix("data: ") {
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(json) {
                        into.lock().unwrap().push(v);
                    }
                }
            }
        });
        Events { seen, stream }
    }

    /// The notices of `kind` so far.
    fn of(&self, kind: &str) -> Vec<serde_json::Value> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|v| v["kind"] == kind)
            .cloned()
            .collect()
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

/// Keep-alive clients sending GETs back to back (bounded in count and time); every answer is
/// counted by body, every failure kept.
struct Load {
    stop: Arc<AtomicBool>,
    failures: Arc<Mutex<Vec<String>>>,
    served: Arc<Mutex<BTreeMap<String, u64>>>,
    total: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr, clients: usize, within: Duration) -> Load {
        let until = Instant::now() + within;
        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let served = Arc::new(Mutex::new(BTreeMap::new()));
        let total = Arc::new(AtomicU64::new(0));
        let threads = (0..clients)
            .map(|_| {
                let (stop, failures, served, total) = (stop.clone(), failures.clone(), served.clone(), total.clone());
                std::thread::spawn(move || {
                    let mut conn: Option<(BufReader<TcpStream>, TcpStream)> = None;
                    for _ in 0..2_000_000 {
                        if stop.load(Ordering::Relaxed) || Instant::now() > until {
                            return;
                        }
                        if conn.is_none() {
                            match TcpStream::connect(addr) {
                                Ok(s) => {
                                    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                                    conn = Some((BufReader::new(s.try_clone().unwrap()), s));
                                }
                                Err(e) => {
                                    failures.lock().unwrap().push(format!("connect: {e}"));
                                    std::thread::sleep(Duration::from_millis(50));
                                    continue;
                                }
                            }
                        }
                        let Some((reader, writer)) = conn.as_mut() else {
                            continue;
                        };
                        match exchange(reader, writer) {
                            Ok((200, body)) => {
                                *served.lock().unwrap().entry(body).or_default() += 1;
                                total.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok((status, body)) => {
                                failures.lock().unwrap().push(format!("{status} {body}"));
                                total.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => {
                                failures.lock().unwrap().push(format!("transport: {e}"));
                                conn = None;
                            }
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            failures,
            served,
            total,
            threads,
        }
    }

    /// Waits (bounded) until `more` answers came after now.
    fn served_more(&self, more: u64, within: Duration) -> bool {
        let from = self.total.load(Ordering::Relaxed);
        wait_until(within, || self.total.load(Ordering::Relaxed) >= from + more)
    }

    fn finish(self) -> (Vec<String>, BTreeMap<String, u64>, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        let failures = self.failures.lock().unwrap().clone();
        let served = self.served.lock().unwrap().clone();
        (failures, served, self.total.load(Ordering::Relaxed))
    }
}

/// A panic in the web service's actor while six keep-alive clients load the service: every
/// request is answered by the live release (v1 blue), the instances keep their pids, the fault is
/// an event with its reason, an error in the log and a count in `/metrics`, the restarted actor
/// adopts the same processes, and a deploy of v2 afterwards goes live as any other.
#[test]
fn a_panicking_service_actor_is_restarted_and_live_traffic_never_notices() {
    let s = Setup::start();
    let out = s.cli(&["deploy", "web", "--version", "v1"]);
    assert!(out.status.success(), "{}", text(&out));
    let v1 = s.pids(Some("v1"));
    assert_eq!(v1.len(), 2, "two v1 instances: {v1:?}");
    let events = Events::follow(&s.socket());

    let load = Load::start(s.front, 6, Duration::from_secs(120));
    assert!(load.served_more(300, Duration::from_secs(10)), "load runs");

    let out = s.cli(&["deploy", "web", "--version", BOOM]);
    assert!(
        !out.status.success(),
        "the deploy that panics the actor fails: {}",
        text(&out)
    );
    assert!(
        text(&out).contains("cut short by a fault"),
        "the caller is told why: {}",
        text(&out)
    );

    // Reported: the event, with the panic message as its reason...
    assert!(
        wait_until(Duration::from_secs(10), || !events.of("fault").is_empty()),
        "a fault event; events: {:?}; log: {}",
        events.seen.lock().unwrap(),
        s.log()
    );
    let fault = &events.of("fault")[0];
    assert_eq!(fault["service"], "web", "{fault}");
    let reason = fault["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("injected fault: deploy of web boom"), "{fault}");
    // ... an error in the log naming the service and the panic ...
    let log = s.log();
    let line = log
        .lines()
        .find(|l| l.contains("control task panicked"))
        .unwrap_or_else(|| panic!("an error line in the log: {log}"));
    assert!(
        line.contains("ERROR") && line.contains("web") && line.contains("injected fault"),
        "{line}"
    );
    // ... and the counter.
    let metrics = scrape(&s.socket());
    assert!(
        metrics.contains("cutover_control_faults_total{service=\"web\"} 1\n"),
        "{metrics}"
    );

    // The restarted actor adopts the very processes that kept serving.
    assert!(
        wait_until(Duration::from_secs(15), || events.of("instances").iter().any(|e| e
            ["message"]
            .as_str()
            .unwrap_or_default()
            .contains("2 instances adopted, 0 restarted"))),
        "the new actor adopts both instances; events: {:?}; log: {}",
        events.seen.lock().unwrap(),
        s.log()
    );
    assert_eq!(s.pids(Some("v1")), v1, "the instances keep their pids");
    assert!(load.served_more(300, Duration::from_secs(10)), "load still runs");
    let status = text(&s.cli(&["status"]));
    assert!(status.contains("v1"), "{status}");

    // Managed again: a deploy goes live as before, under the same load.
    let before_v2 = load.served.lock().unwrap().clone();
    let out = s.cli(&["deploy", "web", "--version", "v2"]);
    assert!(out.status.success(), "{}\n{}", text(&out), s.log());
    assert!(text(&out).contains("web v2 is live"), "{}", text(&out));
    assert!(load.served_more(300, Duration::from_secs(10)), "load runs on v2");
    let (failures, served, total) = load.finish();

    assert!(
        failures.is_empty(),
        "{} of {total} requests failed, first {:?}; log: {}",
        failures.len(),
        failures.first(),
        s.log()
    );
    assert_eq!(
        before_v2.keys().collect::<Vec<_>>(),
        ["v1 blue"],
        "until v2, every answer came from the live v1"
    );
    let others: Vec<_> = served.keys().filter(|k| *k != "v1 blue" && *k != "v2 green").collect();
    assert!(others.is_empty(), "only the live release answers: {served:?}");
    assert!(served.get("v2 green").copied().unwrap_or(0) > 0, "{served:?}");
    assert_eq!(s.pids(Some("v1")), v1, "v1 stays warm on the same processes");
    assert_eq!(
        scrape(&s.socket())
            .matches("cutover_control_faults_total{service=\"web\"} 1\n")
            .count(),
        1
    );
    eprintln!("a fault in web's actor under load: {total} requests, none failed; {served:?}");
}
