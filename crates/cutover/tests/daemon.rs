//! `cutover serve` driven by the real CLI: deployments of the built-in demo app with real
//! processes, real sockets, a real SQLite file, and clients sending traffic throughout.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cutover_control::lifecycle::{DeploymentId, Reason, Record, Watched};

mod common;
use common::*;

/// A test's own directory, config and daemon. Every instance it starts carries a unique marker in
/// its environment, so the test can find (or not find) its processes.
struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
    front: SocketAddr,
    marker: String,
    daemon: Option<Proc>,
}

impl Drop for Setup {
    /// Stops the daemon as an operator would (SIGTERM stops the instances), then makes sure
    /// nothing of this test is left running even if the test failed half way.
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = Command::new("kill").args(["-TERM", &d.0.id().to_string()]).status();
            wait_until(Duration::from_secs(20), || d.0.try_wait().ok().flatten().is_some());
        }
        for pid in self.all_pids() {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        }
    }
}

impl Setup {
    fn all_pids(&self) -> Vec<u32> {
        self.pids_where(|_| true)
    }

    fn new(service_extra: &str) -> Setup {
        Setup::with_service(&format!(
            "command = \"MARKER {BIN} demo-app --port {{port}}\"\ninstances = 2\n\
             health = {{ path = \"/up\", interval = \"100ms\", timeout = \"1s\", healthy = 1, unhealthy = 2, deadline = \"3s\" }}\n\
             drain_timeout = \"3s\"\n{service_extra}\n"
        ))
    }

    /// A config whose one service, `web`, is `service` (the keys of its table), with `MARKER`
    /// replaced by the marker variable assignment.
    fn with_service(service: &str) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let marker = format!(
            "CUTOVER_TEST_MARK={}",
            dir.path().file_name().unwrap().to_string_lossy()
        );
        let config = dir.path().join("cutover.toml");
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nstate_dir = \"state\"\n\n[services.web]\n{}",
            service.replace("MARKER", &marker)
        );
        std::fs::write(&config, text).unwrap();
        Setup {
            dir,
            config,
            front: SocketAddr::from(([127, 0, 0, 1], port)),
            marker,
            daemon: None,
        }
    }

    fn start(&mut self) {
        let child = Command::new(BIN)
            .args(["serve", "-c"])
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(
                    self.dir
                        .path()
                        .join(format!("serve-{}.log", Instant::now().elapsed().as_nanos())),
                )
                .unwrap(),
            )
            .spawn()
            .unwrap();
        self.daemon = Some(Proc(child));
        let cfg = self.config.clone();
        assert!(
            wait_until(Duration::from_secs(20), || cli(&cfg, &["status"]).status.success()),
            "daemon answers status"
        );
    }

    fn cli(&self, args: &[&str]) -> Output {
        cli(&self.config, args)
    }

    /// Pids of this test's instances running `version` (from their environment).
    fn pids(&self, version: &str) -> Vec<u32> {
        let want = format!("CUTOVER_VERSION={version}");
        self.pids_where(|vars| vars.contains(&want.as_bytes()))
    }

    fn pids_where(&self, keep: impl Fn(&[&[u8]]) -> bool) -> Vec<u32> {
        let mut pids = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(env) = std::fs::read(entry.path().join("environ")) else {
                continue;
            };
            let vars: Vec<&[u8]> = env.split(|&b| b == 0).collect();
            if vars.contains(&self.marker.as_bytes()) && keep(&vars) {
                pids.push(pid);
            }
        }
        pids.sort();
        pids
    }

    fn get(&self) -> Option<(u16, String)> {
        get(self.front)
    }

    /// The daemons' logs so far, for failure messages.
    fn logs(&self) -> String {
        let mut out = String::new();
        let mut files: Vec<_> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        files.sort();
        for f in files
            .iter()
            .filter(|f| f.file_name().unwrap().to_string_lossy().starts_with("serve-"))
        {
            out.push_str(&std::fs::read_to_string(f).unwrap_or_default());
        }
        out
    }
}

fn cli(config: &Path, args: &[&str]) -> Output {
    let mut c = Command::new(BIN);
    c.args(args).arg("-c").arg(config);
    c.output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn get(addr: SocketAddr) -> Option<(u16, String)> {
    get_on(TcpStream::connect(addr).ok()?)
}

/// One `GET /` with `Connection: close` on a connected stream.
fn get_on(mut s: TcpStream) -> Option<(u16, String)> {
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.get(9..12)?.parse().ok()?;
    Some((status, out.split_once("\r\n\r\n")?.1.trim().to_string()))
}

/// Keep-alive clients sending GETs back to back; counts answers by body and every failure.
struct Load {
    stop: Arc<AtomicBool>,
    failures: Arc<Mutex<Vec<String>>>,
    served: Arc<Mutex<std::collections::BTreeMap<String, u64>>>,
    total: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr, clients: usize) -> Load {
        Load::start_at(addr, clients, "/", Duration::from_secs(600))
    }

    /// Clients sending GET `target` (path and query) until stopped or `within` passed.
    fn start_at(addr: SocketAddr, clients: usize, target: &str, within: Duration) -> Load {
        let until = Instant::now() + within;
        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let served = Arc::new(Mutex::new(std::collections::BTreeMap::new()));
        let total = Arc::new(AtomicU64::new(0));
        let threads = (0..clients)
            .map(|_| {
                let (stop, failures, served, total) = (stop.clone(), failures.clone(), served.clone(), total.clone());
                let target = target.to_string();
                std::thread::spawn(move || {
                    let mut conn: Option<(BufReader<TcpStream>, TcpStream)> = None;
                    // Bounded by the flag, by a count and by time.
                    for _ in 0..1_000_000 {
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
                        let (reader, writer) = conn.as_mut().unwrap();
                        match exchange_at(reader, writer, &target) {
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

    fn finish(self) -> (Vec<String>, std::collections::BTreeMap<String, u64>, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        let failures = self.failures.lock().unwrap().clone();
        let served = self.served.lock().unwrap().clone();
        (failures, served, self.total.load(Ordering::Relaxed))
    }
}

#[test]
fn deploy_promote_rollback_cycle_under_load_drops_nothing() {
    let mut s = Setup::new("keep_warm = \"1m\"\nwatch = { duration = \"1s\", min_requests = 10 }");
    s.start();
    let out = s.cli(&["deploy", "web", "--version", "v1"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(s.get(), Some((200, "v1 blue".into())));
    // One opening line, the daemon's, not a second one that says the same.
    let shown = text(&out);
    let opening: Vec<&str> = shown.lines().filter(|l| l.contains("deployment 1 of")).collect();
    assert_eq!(opening.len(), 1, "{shown}");
    assert!(shown.lines().next().unwrap().contains("started on blue"), "{shown}");

    let load = Load::start(s.front, 6);
    assert!(wait_until(Duration::from_secs(5), || load
        .total
        .load(Ordering::Relaxed)
        > 200));
    let out = s.cli(&["deploy", "web", "--version", "v2"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("web v2 is live"), "{}", text(&out));
    let before_rollback = load.total.load(Ordering::Relaxed);
    assert!(wait_until(Duration::from_secs(5), || load
        .total
        .load(Ordering::Relaxed)
        > before_rollback + 200));
    let out = s.cli(&["rollback", "web"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("instantly"),
        "warm blue makes it instant: {}",
        text(&out)
    );
    let after = load.total.load(Ordering::Relaxed);
    assert!(wait_until(Duration::from_secs(5), || load
        .total
        .load(Ordering::Relaxed)
        > after + 200));
    let (failures, served, total) = load.finish();

    assert!(
        failures.is_empty(),
        "{} of {total} failed, first {:?}",
        failures.len(),
        failures.first()
    );
    assert!(
        served.get("v1 blue").copied().unwrap_or(0) > 0 && served.get("v2 green").copied().unwrap_or(0) > 0,
        "{served:?}"
    );
    assert_eq!(s.get(), Some((200, "v1 blue".into())));
    let history = text(&s.cli(&["history", "web"]));
    assert!(
        history.contains("rolled back") && history.contains("went live"),
        "{history}"
    );
    // The rolled-back green is stopped.
    assert!(
        wait_until(Duration::from_secs(10), || s.pids("v2").is_empty()),
        "green instances stopped"
    );
}

#[test]
fn unhealthy_green_is_aborted_and_its_processes_are_gone() {
    let mut s = Setup::new("");
    s.start();
    assert!(s.cli(&["deploy", "web", "--version", "v1"]).status.success());
    let blue = s.pids("v1");
    assert!(!blue.is_empty());
    let out = s.cli(&["deploy", "web", "--version", "v2-unhealthy"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("aborted"), "{}", text(&out));
    assert_eq!(s.get(), Some((200, "v1 blue".into())), "live traffic untouched");
    assert!(
        wait_until(Duration::from_secs(10), || s.pids("v2-unhealthy").is_empty()),
        "green processes gone"
    );
    assert_eq!(s.pids("v1"), blue, "blue untouched");
}

#[test]
fn failed_smoke_aborts_and_manual_promotion_waits_for_promote() {
    let mut s = Setup::new(
        "promote = { auto = false }\nwatch = { duration = \"1s\", min_requests = 1 }\n\
         validate = { smoke = \"case $CUTOVER_VERSION in *-badsmoke) echo smoke says no; exit 3;; esac\" }",
    );
    s.start();
    // The first release goes live once validated, even with manual promotion, and says so.
    let out = s.cli(&["deploy", "web", "--version", "v1"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("promote = { auto = false } waits for `cutover promote` from the next release on"),
        "{}",
        text(&out)
    );

    let out = s.cli(&["deploy", "web", "--version", "v2-badsmoke"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("smoke says no"),
        "the reason reaches the user: {}",
        text(&out)
    );
    assert_eq!(s.get(), Some((200, "v1 blue".into())));

    let config = s.config.clone();
    let deploy = std::thread::spawn(move || cli(&config, &["deploy", "web", "--version", "v3"]));
    assert!(wait_until(Duration::from_secs(10), || text(&s.cli(&["status"]))
        .contains("ready to promote")));
    assert_eq!(
        s.get(),
        Some((200, "v1 blue".into())),
        "nothing switches before promote"
    );
    assert!(!deploy.is_finished());
    let out = s.cli(&["promote", "web"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = deploy.join().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(s.get(), Some((200, "v3 green".into())));
}

#[test]
fn broken_green_is_rolled_back_automatically_with_the_reason() {
    let mut s =
        Setup::new("keep_warm = \"1m\"\nwatch = { duration = \"10s\", min_requests = 20, max_error_rate = 0.05 }");
    s.start();
    assert!(s.cli(&["deploy", "web", "--version", "v1"]).status.success());
    let load = Load::start(s.front, 4);
    let t = Instant::now();
    let out = s.cli(&["deploy", "web", "--version", "v2-broken"]);
    let took = t.elapsed();
    let (failures, _, _) = load.finish();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("rolled back"), "{}", text(&out));
    assert!(
        took < Duration::from_secs(10),
        "rolled back within the watch window, took {took:?}"
    );
    assert!(
        !failures.is_empty(),
        "the broken release did fail requests while watched"
    );
    assert_eq!(s.get(), Some((200, "v1 blue".into())));
    let history = text(&s.cli(&["history", "web"]));
    assert!(
        history.contains("rolled back") && history.contains("error rate"),
        "reason recorded: {history}"
    );
}

/// Deploys v2 of the demo app while 24 keep-alive clients ask for answers delayed by `delay_ms`,
/// under a watch of 5 s with `max_p99 = "750ms"`; v1 answered them before the switch. Returns the
/// deploy's output, the clients' failures and the record of how the deployment ended.
fn release_answering_after(delay_ms: u64) -> (Output, Vec<String>, Record) {
    let min_requests = 30;
    let mut s = Setup::new(&format!(
        "keep_warm = \"1m\"\nwatch = {{ duration = \"5s\", min_requests = {min_requests}, max_p99 = \"750ms\" }}"
    ));
    s.start();
    assert!(s.cli(&["deploy", "web", "--version", "v1"]).status.success());
    let clients = 24;
    let load = Load::start_at(
        s.front,
        clients,
        &format!("/?delay={delay_ms}"),
        Duration::from_secs(60),
    );
    // Every client is waiting on its answers before the switch, so the new colour is busy at once.
    assert!(
        wait_until(Duration::from_secs(10), || load.total.load(Ordering::Relaxed)
            >= clients as u64),
        "the slow answers come"
    );
    let out = s.cli(&["deploy", "web", "--version", "v2"]);
    let (failures, served, _) = load.finish();
    // The watch can only have judged the latency if the new colour served `min_requests`.
    assert!(
        served.get("v2 green").copied().unwrap_or(0) >= min_requests,
        "{served:?}; {}",
        text(&out)
    );
    let store = cutover_control::store::Store::open(s.dir.path().join("state")).unwrap();
    let ended = store
        .transitions("web", DeploymentId(2))
        .unwrap()
        .into_iter()
        .map(|t| t.record)
        .find(|r| matches!(r, Record::WentLive { .. } | Record::RolledBack { .. }))
        .unwrap_or_else(|| panic!("deployment 2 ended; {}", s.logs()));
    (out, failures, ended)
}

#[test]
fn p99_of_600ms_under_a_750ms_maximum_stays_live() {
    let (out, failures, ended) = release_answering_after(600);
    assert!(
        matches!(
            ended,
            Record::WentLive {
                watch: Watched::Judged,
                ..
            }
        ),
        "went live after its latency was judged: {ended:?}; {}",
        text(&out)
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(failures.is_empty(), "{failures:?}");
}

#[test]
fn p99_of_900ms_under_a_750ms_maximum_rolls_back() {
    let (out, failures, ended) = release_answering_after(900);
    let Record::RolledBack {
        reason: Reason::Latency { p99, max },
        ..
    } = ended
    else {
        panic!("rolled back for its latency: {ended:?}; {}", text(&out));
    };
    assert_eq!(max, Duration::from_millis(750));
    // Every answer took 900 ms or more; the estimate is at most 6.25 % below.
    assert!(p99 >= Duration::from_micros(843_750), "{p99:?}");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("rolled back"), "{}", text(&out));
    assert!(failures.is_empty(), "{failures:?}");
}

#[test]
fn kill_9_during_a_deployment_then_restart() {
    let mut s = Setup::new("promote = { auto = false }");
    s.start();
    assert!(s.cli(&["deploy", "web", "--version", "v1"]).status.success());
    let blue = s.pids("v1");
    assert!(s
        .cli(&["deploy", "web", "--version", "v2", "--no-wait"])
        .status
        .success());
    assert!(wait_until(Duration::from_secs(10), || text(&s.cli(&["status"]))
        .contains("ready to promote")));
    assert!(!s.pids("v2").is_empty());

    // kill -9: no chance to clean up.
    s.daemon.take().map(|mut d| d.0.kill());
    s.start();
    let status = text(&s.cli(&["status"]));
    assert!(status.contains("live blue@v1") && status.contains("stable"), "{status}");
    assert_eq!(s.get(), Some((200, "v1 blue".into())), "{}", s.logs());
    assert_eq!(
        s.pids("v1"),
        blue,
        "running healthy blue instances adopted, not restarted"
    );
    assert!(
        wait_until(Duration::from_secs(10), || s.pids("v2").is_empty()),
        "interrupted green cleaned up"
    );
    let history = text(&s.cli(&["history", "web"]));
    assert!(
        history.contains("interrupted") && history.contains("went live"),
        "history intact: {history}"
    );
}

#[test]
fn bad_requests_are_refused_and_change_nothing() {
    let mut s = Setup::new("promote = { auto = false }");
    // Bad config: refused at start with file, line and exit code 2.
    let bad = s.dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[services.web]\ncommand = \"x\"\nhealth = { intervall = \"1s\" }\n",
    )
    .unwrap();
    let out = Command::new(BIN).args(["serve", "-c"]).arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).contains("bad.toml:3:") && text(&out).contains("intervall"),
        "{}",
        text(&out)
    );

    s.start();
    let out = s.cli(&["deploy", "nope", "--version", "v1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("unknown service 'nope'"), "{}", text(&out));

    assert!(s.cli(&["deploy", "web", "--version", "v1"]).status.success());
    assert!(s
        .cli(&["deploy", "web", "--version", "v2", "--no-wait"])
        .status
        .success());
    let out = s.cli(&["deploy", "web", "--version", "v3"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("in progress"), "{}", text(&out));
    let out = s.cli(&["deploy", "web", "--version", "has space"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(s.cli(&["abort", "web"]).status.success());
    assert!(
        wait_until(Duration::from_secs(10), || s.pids("v2").is_empty()),
        "aborted green stopped"
    );
    assert_eq!(s.get(), Some((200, "v1 blue".into())));
    assert!(s.pids("v3").is_empty(), "the refused deployment started nothing");
}

#[test]
fn tcp_admin_needs_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let (port, admin) = (free_port(), free_port());
    write_private(&dir.path().join("token"), "0123456789abcdef0123456789abcdef\n");
    let config = dir.path().join("cutover.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin = \"127.0.0.1:{admin}\"\ntoken_file = \"token\"\nstate_dir = \"state\"\n\
             [services.web]\ncommand = \"{BIN} demo-app --port {{port}}\"\nhealth = {{ path = \"/up\", interval = \"100ms\" }}\n"
        ),
    )
    .unwrap();
    let _daemon = Proc(spawn_serve(&config));
    assert!(
        wait_until(Duration::from_secs(20), || cli(&config, &["status"]).status.success()),
        "CLI with the token works"
    );
    let raw = |auth: Option<&str>| {
        let mut s = TcpStream::connect(("127.0.0.1", admin)).unwrap();
        let auth = auth
            .map(|a| format!("Authorization: Bearer {a}\r\n"))
            .unwrap_or_default();
        write!(s, "POST /v1/services/web/deploy HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: 17\r\nConnection: close\r\n\r\n{{\"version\":\"v9\"}}").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    assert!(raw(None).starts_with("HTTP/1.1 401"), "no token");
    assert!(
        raw(Some("wrong-token-wrong-token-wrong-tok")).starts_with("HTTP/1.1 401"),
        "wrong token"
    );
    let history = text(&cli(&config, &["history", "web"]));
    assert!(history.contains("no deployments yet"), "nothing happened: {history}");
    std::fs::write(dir.path().join("token"), "another-token-that-is-long-enough\n").unwrap();
    let out = cli(&config, &["status"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "the CLI with a wrong token is refused: {}",
        text(&out)
    );
}

/// Retirement stops the old colour's instances. SIGTERM leaves the live ones running for the
/// next start to adopt; `cutover shutdown --stop-instances` stops the daemon and every instance.
#[test]
fn daemon_stop_and_retirement_leave_no_instance_running() {
    let mut s = Setup::new("keep_warm = \"1s\"\nwatch = { duration = \"500ms\", min_requests = 1 }");
    s.start();
    assert!(s.cli(&["deploy", "web", "--version", "v1"]).status.success());
    assert!(s.cli(&["deploy", "web", "--version", "v2"]).status.success());
    // Blue stays warm for 1 s after the watch, then is retired: drained and stopped.
    assert!(
        wait_until(Duration::from_secs(15), || s.pids("v1").is_empty()),
        "retired blue stopped"
    );
    let live = s.pids("v2");
    assert!(!live.is_empty());
    let mut d = s.daemon.take().unwrap();
    assert!(Command::new("kill")
        .args(["-TERM", &d.0.id().to_string()])
        .status()
        .unwrap()
        .success());
    assert!(
        wait_until(Duration::from_secs(20), || d.0.try_wait().unwrap().is_some()),
        "daemon exits on SIGTERM"
    );
    assert_eq!(s.pids("v2"), live, "the live instances outlive a graceful stop");
    s.start();
    assert_eq!(s.get(), Some((200, "v2 green".into())));
    assert_eq!(s.pids("v2"), live, "and are adopted by the next start");

    let out = s.cli(&["shutdown", "--stop-instances"]);
    assert!(out.status.success(), "{}", text(&out));
    let mut d = s.daemon.take().unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || d.0.try_wait().unwrap().is_some()),
        "daemon exits after `cutover shutdown`"
    );
    assert!(s.pids("v2").is_empty(), "no instance survives the teardown");

    // Restarting with the proxy's port taken is refused, exit 2, and starts nothing.
    let _taken = TcpListener::bind(s.front).unwrap();
    let out = Command::new(BIN).args(["serve", "-c"]).arg(&s.config).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains(&s.front.to_string()),
        "names the address: {}",
        text(&out)
    );
    assert!(s.pids("v2").is_empty(), "nothing started");
}

#[test]
fn static_service_switches_between_named_upstreams() {
    // Instances that something else runs: two demo apps started by the test.
    let (a, b) = (free_port(), free_port());
    let app = |port: u16, version: &str, colour: &str| Proc(spawn_demo_app(port, version, colour));
    let (_a, _b) = (app(a, "s1", "first"), app(b, "s2", "second"));
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("cutover.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nstate_dir = \"state\"\n[services.api]\n\
             health = {{ path = \"/up\", interval = \"100ms\", healthy = 1 }}\nwatch = {{ duration = \"500ms\", min_requests = 1 }}\n"
        ),
    )
    .unwrap();
    let mut daemon = Proc(spawn_serve(&config));
    assert!(wait_until(Duration::from_secs(20), || cli(&config, &["status"])
        .status
        .success()));
    // The admin socket is private to the daemon's user.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("state/admin.sock"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let out = cli(&config, &["deploy", "api", "--version", "v1"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a static service needs --upstream: {}",
        text(&out)
    );
    assert!(text(&out).contains("--upstream"), "{}", text(&out));
    let front = SocketAddr::from(([127, 0, 0, 1], port));
    let ua = format!("127.0.0.1:{a}");
    let ub = format!("127.0.0.1:{b}");
    assert!(cli(&config, &["deploy", "api", "--version", "v1", "--upstream", &ua])
        .status
        .success());
    assert_eq!(get(front), Some((200, "s1 first".into())));
    assert!(cli(&config, &["deploy", "api", "--version", "v2", "--upstream", &ub])
        .status
        .success());
    assert_eq!(get(front), Some((200, "s2 second".into())));
    let out = cli(&config, &["rollback", "api"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(get(front), Some((200, "s1 first".into())));
    let _ = Command::new("kill")
        .args(["-TERM", &daemon.0.id().to_string()])
        .status();
    assert!(wait_until(Duration::from_secs(20), || daemon
        .0
        .try_wait()
        .unwrap()
        .is_some()));
    assert_eq!(
        get(SocketAddr::from(([127, 0, 0, 1], a))).map(|r| r.0),
        Some(200),
        "cutover never stops what it did not start"
    );
}

/// A webhook receiver on a listener the test bound: it records each request's headers and JSON
/// body and answers 200, or (`hang`) accepts connections and never answers. Dropping it closes
/// its listener and every connection, so a daemon stopping after it is not kept waiting.
struct HookServer {
    stop: Arc<AtomicBool>,
    requests: Arc<Mutex<Vec<(String, serde_json::Value)>>>,
    connections: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HookServer {
    fn start(listener: TcpListener, hang: bool) -> HookServer {
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicU64::new(0));
        let (flag, log, count) = (stop.clone(), requests.clone(), connections.clone());
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let Ok((stream, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                count.fetch_add(1, Ordering::Relaxed);
                if hang {
                    held.push(stream);
                    continue;
                }
                stream.set_nonblocking(false).unwrap();
                stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut head = String::new();
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                    head.push_str(&line);
                }
                let mut body = vec![0u8; length];
                if reader.read_exact(&mut body).is_ok() {
                    let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
                    log.lock().unwrap().push((head, json));
                }
                let _ = (&stream).write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            }
        });
        HookServer {
            stop,
            requests,
            connections,
            thread: Some(thread),
        }
    }

    fn events(&self) -> Vec<serde_json::Value> {
        self.requests.lock().unwrap().iter().map(|(_, b)| b.clone()).collect()
    }
}

impl Drop for HookServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn webhooks_report_the_rollback_with_its_reason_and_dead_receivers_delay_nothing() {
    let healthy_listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let hanging_listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let (healthy_addr, hanging_addr) = (
        healthy_listener.local_addr().unwrap(),
        hanging_listener.local_addr().unwrap(),
    );
    // A port whose listener is gone: connections to it are refused.
    let down = format!("http://127.0.0.1:{}/down", free_port());
    let mut s = Setup::new(&format!(
        "keep_warm = \"1m\"\nwatch = {{ duration = \"10s\", min_requests = 20, max_error_rate = 0.05 }}\n\n\
         [webhooks]\nurls = [\"{down}\", \"http://{hanging_addr}/hang\", \"http://{healthy_addr}/hook\"]\n\
         timeout = \"60s\"\nretries = 3\n"
    ));
    // Declared after `s`, so dropped before it: the daemon's stop is not kept waiting by them.
    let healthy = HookServer::start(healthy_listener, false);
    let hanging = HookServer::start(hanging_listener, true);
    s.start();
    assert!(s.cli(&["deploy", "web", "--version", "v1"]).status.success());
    let load = Load::start(s.front, 4);
    let t = Instant::now();
    let out = s.cli(&["deploy", "web", "--version", "v2-broken"]);
    let took = t.elapsed();
    load.finish();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("rolled back"), "{}", text(&out));
    assert!(
        took < Duration::from_secs(10),
        "rolled back within the watch window despite the dead receivers, took {took:?}"
    );

    let rolled_back = |e: &serde_json::Value| e["deployment"] == 2 && e["event"] == "rolled-back";
    assert!(
        wait_until(Duration::from_secs(10), || healthy.events().iter().any(rolled_back)),
        "{:?}\n{}",
        healthy.events(),
        s.logs()
    );
    let events = healthy.events();
    let second: Vec<&str> = events
        .iter()
        .filter(|e| e["deployment"] == 2)
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(second, ["started", "promoted", "rolled-back"], "{events:?}");
    assert!(
        events
            .iter()
            .all(|e| ["started", "promoted", "rolled-back", "aborted"].contains(&e["event"].as_str().unwrap())),
        "only the default events: {events:?}"
    );
    let event = events.iter().find(|e| rolled_back(e)).unwrap();
    assert_eq!(event["service"], "web");
    let reason = event["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("error rate"), "{event}");
    let message = event["message"].as_str().unwrap();
    assert!(
        message.starts_with("deployment 2 rolled back to blue@v1: ") && message.ends_with(reason),
        "{event}"
    );
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let at = event["at"].as_u64().unwrap();
    assert!(at <= now_ms && at + 120_000 > now_ms, "{event}");
    let (head, _) = healthy.requests.lock().unwrap()[0].clone();
    let head = head.to_ascii_lowercase();
    assert!(head.starts_with("post /hook http/1.1\r\n"), "{head}");
    assert!(head.contains("content-type: application/json\r\n"), "{head}");
    assert!(head.contains("user-agent: cutover/"), "{head}");

    // Meanwhile the receiver that never answers still holds the first event it was sent: it
    // delayed neither the rollback nor the healthy receiver.
    assert_eq!(hanging.connections.load(Ordering::Relaxed), 1);
    // The refused one is retried, and its failures logged with the URL.
    assert!(
        wait_until(Duration::from_secs(10), || {
            let logs = s.logs();
            logs.lines().any(|l| {
                l.contains("webhook delivery failed; retrying") && l.contains(&down) && l.contains("connection refused")
            })
        }),
        "{}",
        s.logs()
    );
}

/// An instance taken out of rotation by its health checks is announced as an `unhealthy` event
/// with the failure as its reason: the webhooks (and the event stream) get it as data.
#[test]
fn an_instance_taken_out_of_rotation_is_announced_with_its_reason() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let hook_addr = listener.local_addr().unwrap();
    let app_port = free_port();
    let mut app = Proc(spawn_demo_app(app_port, "s1", "first"));
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("cutover.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nstate_dir = \"state\"\n[services.api]\n\
             health = {{ path = \"/up\", interval = \"100ms\", healthy = 1, unhealthy = 2 }}\n\
             watch = {{ duration = \"300ms\", min_requests = 1 }}\n\
             [webhooks]\nurls = [\"http://{hook_addr}/hook\"]\nevents = [\"unhealthy\"]\n"
        ),
    )
    .unwrap();
    let hooks = HookServer::start(listener, false);
    let _daemon = Proc(spawn_serve(&config));
    assert!(wait_until(Duration::from_secs(20), || cli(&config, &["status"])
        .status
        .success()));
    let upstream = format!("127.0.0.1:{app_port}");
    let out = cli(&config, &["deploy", "api", "--version", "v1", "--upstream", &upstream]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(hooks.events().is_empty(), "nothing unhealthy yet: {:?}", hooks.events());

    let _ = app.0.kill();
    let _ = app.0.wait();
    assert!(
        wait_until(Duration::from_secs(10), || !hooks.events().is_empty()),
        "no unhealthy event"
    );
    // Once per instance going out, however many checks fail after.
    std::thread::sleep(Duration::from_millis(500));
    let events = hooks.events();
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!(e["event"], "unhealthy");
    assert_eq!(e["service"], "api");
    assert!(e["message"].as_str().unwrap().contains(&upstream), "{e}");
    let reason = e["reason"].as_str().unwrap_or_default();
    assert!(reason.contains(&upstream) && reason.contains("refused"), "{e}");
}

/// Two daemons on one state directory would adopt and stop each other's instances. With the
/// admin API on TCP nothing else stops the second (no shared socket path): the state directory's
/// lock refuses it, exit 2 naming the running one, and the first goes on untouched.
#[test]
fn a_second_daemon_on_the_same_state_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_private(&dir.path().join("token"), "0123456789abcdef0123456789abcdef\n");
    let config_with = |name: &str, port: u16, admin: u16| {
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            format!(
                "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin = \"127.0.0.1:{admin}\"\ntoken_file = \"token\"\nstate_dir = \"state\"\n\
                 [services.web]\ncommand = \"{BIN} demo-app --port {{port}}\"\n\
                 health = {{ path = \"/up\", interval = \"100ms\", healthy = 1 }}\n"
            ),
        )
        .unwrap();
        path
    };
    let port = free_port();
    let first = config_with("first.toml", port, free_port());
    let second = config_with("second.toml", free_port(), free_port());
    let mut daemon = Proc(spawn_serve(&first));
    assert!(wait_until(Duration::from_secs(20), || cli(&first, &["status"])
        .status
        .success()));
    let out = cli(&first, &["deploy", "web", "--version", "v1"]);
    assert!(out.status.success(), "{}", text(&out));
    let front = SocketAddr::from(([127, 0, 0, 1], port));
    assert_eq!(get(front).map(|r| r.0), Some(200));

    let mut refused = Command::new(BIN)
        .args(["serve", "-c"])
        .arg(&second)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let exited = wait_until(Duration::from_secs(10), || refused.try_wait().unwrap().is_some());
    if !exited {
        let _ = refused.kill();
    }
    let out = refused.wait_with_output().unwrap();
    let shown = text(&out);
    assert!(exited, "the second daemon kept running: {shown}");
    assert_eq!(out.status.code(), Some(2), "{shown}");
    assert!(
        shown.contains("in use by another cutover daemon") && shown.contains(&format!("pid {}", daemon.0.id())),
        "{shown}"
    );
    // The first one serves on, its instance still running.
    assert!(daemon.0.try_wait().unwrap().is_none());
    assert_eq!(get(front).map(|r| r.0), Some(200));
    assert!(cli(&first, &["status"]).status.success());
}

/// Twenty kill -9 restarts under 4 clients. Right after a restart the proxy answers nothing until the committed live colour, its version
/// and its instances are in the route table: clients that connect during the start-up window
/// wait in the listen backlog, and are never told 503 or served by the colour that is not live.
#[test]
fn restarts_never_answer_from_an_incomplete_route_table() {
    let mut s = Setup::new("keep_warm = \"10m\"\nwatch = { duration = \"200ms\", min_requests = 1 }");
    s.start();
    assert!(s.cli(&["deploy", "web", "--version", "v1"]).status.success());
    assert!(s.cli(&["deploy", "web", "--version", "v2"]).status.success());
    assert_eq!(s.get(), Some((200, "v2 green".into())));

    // Clients connecting over and over, each answer recorded; refused connects (the daemon is
    // down) and requests cut after their connect (in flight at a kill) are only counted.
    let stop = Arc::new(AtomicBool::new(false));
    let answers = Arc::new(Mutex::new(Vec::<(u16, String)>::new()));
    let refused = Arc::new(AtomicU64::new(0));
    let cut = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (stop, answers, refused, cut, front) =
                (stop.clone(), answers.clone(), refused.clone(), cut.clone(), s.front);
            std::thread::spawn(move || {
                for _ in 0..1_000_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(conn) = TcpStream::connect(front) else {
                        refused.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_micros(200));
                        continue;
                    };
                    match get_on(conn) {
                        Some(a) => answers.lock().unwrap().push(a),
                        None => {
                            cut.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    const CRASHES: u64 = 20;
    for _ in 0..CRASHES {
        if let Some(mut d) = s.daemon.take() {
            let _ = d.0.kill();
            let _ = d.0.wait();
        }
        s.start();
        let before = answers.lock().unwrap().len();
        assert!(
            wait_until(Duration::from_secs(5), || answers.lock().unwrap().len() > before + 20),
            "served again after the restart"
        );
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let answers = answers.lock().unwrap();
    let wrong: Vec<_> = answers
        .iter()
        .filter(|a| a != &&(200, "v2 green".to_string()))
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {} answers were not v2 green, e.g. {:?}; {}",
        wrong.len(),
        answers.len(),
        wrong.first(),
        s.logs()
    );
    let (refused, cut) = (refused.load(Ordering::Relaxed), cut.load(Ordering::Relaxed));
    eprintln!(
        "{CRASHES} kill -9 restarts: {} answers, all v2 green; per crash {:.1} requests cut after their connect (in flight at the kill, or reset in a closing backlog) and {:.1} connects refused while no daemon ran (each client tries again after 200 µs)",
        answers.len(),
        cut as f64 / CRASHES as f64,
        refused as f64 / CRASHES as f64
    );
}

/// Under systemd (`Type=notify`), `serve` says `READY=1` once it serves, sends `WATCHDOG=1`
/// every half of `WATCHDOG_USEC`, and says `STOPPING=1` when SIGTERM begins its stop; the
/// instances it starts do not inherit the notification socket.
#[test]
fn serve_notifies_systemd_when_ready_while_alive_and_when_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let notify = std::os::unix::net::UnixDatagram::bind(dir.path().join("notify.sock")).unwrap();
    notify.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let port = free_port();
    let mark = format!("CUTOVER_TEST_NOTIFY={port}");
    let _instances = KillMarked(mark.clone());
    let config = dir.path().join("cutover.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nstate_dir = \"state\"\n[services.web]\n\
             command = \"env {mark} {BIN} demo-app --port {{port}}\"\ninstances = 1\n\
             health = {{ path = \"/up\", interval = \"100ms\", healthy = 1 }}\n"
        ),
    )
    .unwrap();
    let mut daemon = Proc(
        Command::new(BIN)
            .args(["serve", "-c"])
            .arg(&config)
            .env("NOTIFY_SOCKET", dir.path().join("notify.sock"))
            .env("WATCHDOG_USEC", "200000")
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let recv = || {
        let mut buf = [0u8; 512];
        let n = notify.recv(&mut buf).expect("a notification in time");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let ready = recv();
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");
    assert!(ready.contains(&format!("MAINPID={}", daemon.0.id())), "{ready}");
    // Ready means serving: the admin API and the proxy answer at once.
    assert!(cli(&config, &["status"]).status.success());
    assert!(get(SocketAddr::from(([127, 0, 0, 1], port))).is_some());
    let t = Instant::now();
    let (mut beats, mut last) = (0, String::new());
    while beats < 3 {
        last = recv();
        if last == "WATCHDOG=1" {
            beats += 1;
        }
    }
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "3 watchdog beats took {:?}",
        t.elapsed()
    );
    let out = cli(&config, &["deploy", "web", "--version", "v1"]);
    assert!(out.status.success(), "{}", text(&out));
    // The instance's environment carries no notification socket.
    let instance = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("environ")).ok())
        .find(|env| env.split(|&b| b == 0).any(|v| v == mark.as_bytes()))
        .expect("the instance is running");
    assert!(
        !instance.split(|&b| b == 0).any(|v| v.starts_with(b"NOTIFY_SOCKET=")),
        "the instance inherited NOTIFY_SOCKET ({last})"
    );
    let _ = Command::new("kill")
        .args(["-TERM", &daemon.0.id().to_string()])
        .status();
    let stopping = loop {
        let n = recv();
        if n != "WATCHDOG=1" {
            break n;
        }
    };
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping}");
    assert!(wait_until(Duration::from_secs(20), || daemon
        .0
        .try_wait()
        .unwrap()
        .is_some()));
}

#[test]
fn rollback_after_retirement_is_a_cold_redeploy() {
    let mut s = Setup::new("keep_warm = \"0s\"\nwatch = { duration = \"300ms\", min_requests = 1 }");
    s.start();
    assert!(s.cli(&["deploy", "web", "--version", "v1"]).status.success());
    assert!(s.cli(&["deploy", "web", "--version", "v2"]).status.success());
    // keep_warm 0: blue is retired as soon as v2 passed its watch.
    assert!(
        wait_until(Duration::from_secs(10), || s.pids("v1").is_empty()),
        "blue retired"
    );
    let out = s.cli(&["rollback", "web"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("cold rollback"),
        "the CLI says which kind: {}",
        text(&out)
    );
    assert!(
        wait_until(Duration::from_secs(15), || s.get() == Some((200, "v1 blue".into()))),
        "the previous release is redeployed and live again: {:?}",
        s.get()
    );
    let history = text(&s.cli(&["history", "web"]));
    assert!(
        history.contains("coldrollback") || history.contains("cold"),
        "{history}"
    );
}

#[test]
fn a_release_whose_command_is_missing_fails_at_once_with_its_exit_status_and_output() {
    // Versions ending in -missing run a command that does not exist. The health deadline is a
    // minute away: only the instances' exits can end the deployment within the time asserted.
    let mut s = Setup::with_service(&format!(
        "command = 'case $CUTOVER_VERSION in *-missing) ./does-not-exist --port {{port}};; \
         *) MARKER {BIN} demo-app --port {{port}};; esac'\ninstances = 2\n\
         health = {{ path = \"/up\", interval = \"100ms\", timeout = \"1s\", healthy = 1, unhealthy = 2, deadline = \"60s\" }}\n\
         drain_timeout = \"3s\"\n"
    ));
    s.start();
    let out = s.cli(&["deploy", "web", "--version", "v1"]);
    assert!(out.status.success(), "{}", text(&out));

    let t = Instant::now();
    let out = s.cli(&["deploy", "web", "--version", "v2-missing"]);
    let took = t.elapsed();
    let shown = text(&out);
    assert_eq!(out.status.code(), Some(1), "{shown}");
    assert!(
        shown.contains("deployment 2 aborted: instances failed to start: service web (green): instance"),
        "{shown}"
    );
    assert!(
        shown.contains("(last: exited with status 127); exit status 127 means the shell found no such command"),
        "the exit status and what it means: {shown}"
    );
    assert!(
        shown.contains(
            "its last output: /bin/sh: 1: ./does-not-exist: not found; see `cutover logs web --colour green`"
        ),
        "the instance's own words: {shown}"
    );
    assert!(
        took < Duration::from_secs(30),
        "failed long before the health deadline, took {took:?}"
    );
    assert_eq!(s.get(), Some((200, "v1 blue".into())), "live traffic untouched");
    let history = text(&s.cli(&["history", "web"]));
    assert!(history.contains("aborted"), "{history}");
}

#[test]
fn an_instance_restarted_on_another_port_is_checked_and_routed_there() {
    // One instance, whose answer names the port it listens on.
    let mut s = Setup::with_service(&format!(
        "command = \"MARKER {BIN} demo-app --port {{port}} --version port-{{port}}\"\ninstances = 1\n\
         health = {{ path = \"/up\", interval = \"100ms\", timeout = \"1s\", healthy = 1, unhealthy = 2 }}\n"
    ));
    s.start();
    let out = s.cli(&["deploy", "web", "--version", "v1"]);
    assert!(out.status.success(), "{}", text(&out));
    let served_by = |s: &Setup| -> Option<u16> {
        match s.get()? {
            (200, body) => body.strip_prefix("port-")?.strip_suffix(" blue")?.parse().ok(),
            _ => None,
        }
    };
    let old = served_by(&s).expect("served by the instance");

    // The instance dies and another program takes its port before the restart, which then
    // moves it elsewhere. When the restart is quicker, the instance is killed again.
    let mut squatter = None;
    for _ in 0..10 {
        for pid in s.pids("v1") {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        }
        wait_until(Duration::from_secs(5), || {
            squatter = TcpListener::bind(("127.0.0.1", old)).ok();
            squatter.is_some()
        });
        if squatter.is_some() {
            break;
        }
    }
    assert!(squatter.is_some(), "could not take port {old} before the restart");

    // Requests reach the instance on its new port. It is in rotation only once the health checks
    // found it healthy there (a new address starts out of rotation), and the old address, where
    // nothing answers any more, is gone from the table.
    assert!(
        wait_until(Duration::from_secs(30), || served_by(&s).is_some_and(|p| p != old)),
        "{}",
        s.logs()
    );
    let new = served_by(&s).unwrap();
    let status: serde_json::Value = serde_json::from_slice(&s.cli(&["status", "--json"]).stdout).unwrap();
    let instances: Vec<(String, String, bool)> = status["services"][0]["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["colour"].as_str().unwrap().to_string(),
                i["addr"].as_str().unwrap().to_string(),
                i["healthy"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(instances, [("blue".to_string(), format!("127.0.0.1:{new}"), true)]);

    // The move is recorded: after a kill -9 of the daemon the process on the new port is adopted
    // and served from, not replaced by a fresh one while it runs on unsupervised.
    let running = s.pids("v1");
    assert_eq!(running.len(), 1, "{running:?}");
    if let Some(mut d) = s.daemon.take() {
        d.0.kill().unwrap();
    }
    s.start();
    assert_eq!(served_by(&s), Some(new), "{}", s.logs());
    assert_eq!(s.pids("v1"), running, "adopted, not restarted");
}

#[test]
fn messages_say_what_happened_in_plain_words() {
    let mut s = Setup::new("keep_warm = \"1m\"\nwatch = { duration = \"500ms\", min_requests = 5 }");
    s.start();
    // Before the first deployment: the proxy and `status` say there is no release yet, and how
    // to deploy one.
    let (code, body) = s.get().unwrap();
    assert_eq!(code, 503);
    assert!(
        body.contains("service web has no release yet") && body.contains("cutover deploy web --version"),
        "{body}"
    );
    let status = text(&s.cli(&["status"]));
    assert!(
        status.starts_with("web: no release yet") && status.contains("cutover deploy web --version"),
        "{status}"
    );

    // No smoke test is configured, so none is said to have passed; the first release is not
    // watched, and the words say why.
    let out = text(&s.cli(&["deploy", "web", "--version", "v1"]));
    assert!(
        out.contains("deployment 1: validated (no smoke test configured") && !out.contains("smoke test passed"),
        "{out}"
    );
    assert!(
        out.contains("deployment 1: blue@v1 is live; the first release: nothing was live to compare it with"),
        "{out}"
    );
    assert!(!out.contains("(Skipped)") && !out.contains("(Deploy)"), "{out}");

    // Under traffic the watch judges the new colour's requests against the limits.
    let load = Load::start(s.front, 2);
    let out = text(&s.cli(&["deploy", "web", "--version", "v2"]));
    load.finish();
    assert!(
        out.contains("green@v2 is live; watched for 500ms: its requests (at least 5) were judged against error rate at most 1%, and passed"),
        "{out}"
    );
    // Without traffic it could not judge them, and says so.
    let out = text(&s.cli(&["deploy", "web", "--version", "v3"]));
    assert!(
        out.contains("blue@v3 is live; watched for 500ms, but it served too few requests (at least 5 needed) to be judged against error rate at most 1%: only its health was watched"),
        "{out}"
    );

    // A rollback names what is live now.
    let out = s.cli(&["rollback", "web"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("live now: green@v2"), "{}", text(&out));
    let status = text(&s.cli(&["status"]));
    assert!(status.starts_with("web: live green@v2"), "{status}");
}

/// The column each cell of `row` starts at, cells being separated by two spaces or more.
fn columns(row: &str) -> Vec<usize> {
    let mut starts = vec![0];
    let b = row.as_bytes();
    for i in 2..b.len() {
        if b[i] != b' ' && b[i - 1] == b' ' && b[i - 2] == b' ' {
            starts.push(i);
        }
    }
    starts
}

#[test]
fn history_shows_times_in_aligned_columns_and_reads_the_store_without_a_daemon() {
    let mut s = Setup::new("watch = { duration = \"0s\" }\nkeep_warm = \"0s\"");
    s.start();
    assert!(s.cli(&["deploy", "web", "--version", "v1"]).status.success());
    // Refused commands use no deployment id.
    let out = s.cli(&["rollback", "web"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let out = s.cli(&["deploy", "web", "--version", "has space"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    for v in 2..=10 {
        let out = s.cli(&["deploy", "web", "--version", &format!("v{v}")]);
        assert!(out.status.success(), "{}", text(&out));
    }
    let out = s.cli(&["history", "web"]);
    assert!(out.status.success(), "{}", text(&out));
    let online = String::from_utf8(out.stdout).unwrap();
    let rows: Vec<&str> = online.lines().collect();
    assert_eq!(rows.len(), 11, "a header and ten deployments: {online}");
    assert!(
        rows[0].starts_with("#") && rows[0].contains("started (UTC)") && rows[0].contains("took"),
        "{online}"
    );
    // Newest first, ids without gaps, every column aligned across #10 and #9.
    for (row, id) in rows[1..].iter().zip((1..=10).rev()) {
        assert!(row.starts_with(&format!("#{id} ")), "{online}");
        assert_eq!(columns(row), columns(rows[0]), "aligned: {online}");
        let cells: Vec<&str> = row.split("  ").map(str::trim).filter(|c| !c.is_empty()).collect();
        let [_, started, took, version, _, _, outcome] = cells[..] else {
            panic!("seven cells: {row}")
        };
        assert!(
            started.len() == 19 && started.starts_with("20") && started.as_bytes()[10] == b' ',
            "{row}"
        );
        assert!(
            took.ends_with('s') && took.trim_end_matches('s').parse::<f64>().is_ok(),
            "{row}"
        );
        assert_eq!(version, format!("v{id}"));
        assert_eq!(outcome, "went live");
    }

    // kill -9: with no daemon the history comes from the SQLite file, the same as before.
    s.daemon.take().map(|mut d| d.0.kill());
    let out = s.cli(&["history", "web"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), online);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("no daemon answers") && said.contains("cutover.db"),
        "{said}"
    );
    let json: serde_json::Value = serde_json::from_slice(&s.cli(&["history", "web", "--json"]).stdout).unwrap();
    assert_eq!(json.as_array().map(Vec::len), Some(10), "{json}");

    // `logs`: a colour that is not one is a usage error naming the valid ones.
    let out = s.cli(&["logs", "web", "--colour", "purple"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("purple") && text(&out).contains("blue") && text(&out).contains("green"),
        "{}",
        text(&out)
    );
    // `logs --follow` prints what is written after it started, in files old and new.
    let logs = s.dir.path().join("state/logs/web");
    let mut child = Command::new(BIN)
        .args(["logs", "web", "--follow", "-c"])
        .arg(&s.config)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let follower = Proc(child);
    let seen = Arc::new(Mutex::new(String::new()));
    let reader = {
        let seen = seen.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let mut seen = seen.lock().unwrap();
                seen.push_str(&line);
                seen.push('\n');
            }
        })
    };
    assert!(wait_until(Duration::from_secs(10), || seen
        .lock()
        .unwrap()
        .contains("blue-0.log <==")));
    let append = |file: &str, line: &str| {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(logs.join(file))
            .unwrap();
        f.write_all(line.as_bytes()).unwrap();
    };
    append("blue-0.log", "written after the start\n");
    append("green-9.log", "a new instance's first line\n");
    assert!(
        wait_until(Duration::from_secs(10), || {
            let seen = seen.lock().unwrap();
            seen.contains("\nwritten after the start\n")
                && seen.contains("green-9.log <==\na new instance's first line\n")
        }),
        "{}",
        seen.lock().unwrap()
    );
    drop(follower);
    reader.join().unwrap();
}

/// `cutover deploy -c CONFIG ARGS` running in the background, its stdout and stderr collected.
struct Following {
    child: Proc,
    output: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Following {
    fn start(config: &Path, args: &[&str]) -> Following {
        let mut child = Command::new(BIN)
            .arg("deploy")
            .args(args)
            .arg("-c")
            .arg(config)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let output = Arc::new(Mutex::new(String::new()));
        let stdout: Box<dyn Read + Send> = Box::new(child.stdout.take().unwrap());
        let stderr: Box<dyn Read + Send> = Box::new(child.stderr.take().unwrap());
        let readers = [stdout, stderr]
            .into_iter()
            .map(|pipe| {
                let output = output.clone();
                std::thread::spawn(move || {
                    for line in BufReader::new(pipe).lines() {
                        let Ok(line) = line else { return };
                        let mut o = output.lock().unwrap();
                        o.push_str(&line);
                        o.push('\n');
                    }
                })
            })
            .collect();
        Following {
            child: Proc(child),
            output,
            readers,
        }
    }

    fn shown(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// Waits for the command to end (at most `within`); returns its exit code and output.
    fn finish(mut self, within: Duration) -> (Option<i32>, String) {
        let mut code = None;
        wait_until(within, || match self.child.0.try_wait().unwrap() {
            Some(status) => {
                code = status.code();
                true
            }
            None => false,
        });
        if code.is_some() {
            for r in std::mem::take(&mut self.readers) {
                r.join().unwrap();
            }
        }
        (code, self.shown())
    }
}

impl Setup {
    /// Stops the daemon with `signal` and waits for it to exit.
    fn stop_daemon(&mut self, signal: &str) {
        let mut d = self.daemon.take().unwrap();
        let _ = Command::new("kill")
            .args([&format!("-{signal}"), &d.0.id().to_string()])
            .status();
        assert!(
            wait_until(Duration::from_secs(20), || d.0.try_wait().unwrap().is_some()),
            "daemon exits on SIG{signal}"
        );
    }
}

#[test]
fn deploy_follows_the_deployment_across_a_daemon_restart() {
    let mut s = Setup::new("promote = { auto = false }\nwatch = { duration = \"3s\", min_requests = 1 }");
    s.start();
    assert!(s.cli(&["deploy", "web", "--version", "v1"]).status.success());

    // Stopped while the deployment waits for promotion: on restart it is marked interrupted,
    // which the CLI reports once the daemon is back, exiting 1.
    let deploy = Following::start(&s.config, &["web", "--version", "v2"]);
    assert!(wait_until(Duration::from_secs(10), || text(&s.cli(&["status"]))
        .contains("ready to promote")));
    s.stop_daemon("TERM");
    assert!(
        wait_until(Duration::from_secs(10), || deploy.shown().contains(
            "the daemon stopped (connection closed) while following deployment #2; waiting up to 60s"
        )),
        "{}",
        deploy.shown()
    );
    s.start();
    let (code, shown) = deploy.finish(Duration::from_secs(30));
    assert_eq!(code, Some(1), "{shown}");
    assert!(
        shown.contains("the daemon is back; deployment #2 interrupted: the daemon stopped before it was promoted")
            && shown.contains("live now: blue@v1"),
        "{shown}"
    );
    assert!(!shown.contains("error reading a body"), "{shown}");

    // Killed while the new release is watched: the watch starts again after the restart, and the
    // CLI follows it to the end.
    let deploy = Following::start(&s.config, &["web", "--version", "v3"]);
    assert!(wait_until(Duration::from_secs(10), || text(&s.cli(&["status"]))
        .contains("ready to promote")));
    assert!(s.cli(&["promote", "web"]).status.success());
    assert!(wait_until(Duration::from_secs(10), || deploy
        .shown()
        .contains("promoted")));
    s.stop_daemon("KILL");
    assert!(
        wait_until(Duration::from_secs(10), || deploy
            .shown()
            .contains("the daemon stopped")),
        "{}",
        deploy.shown()
    );
    s.start();
    let (code, shown) = deploy.finish(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{shown}");
    assert!(
        shown.contains("deployment #3 is still in progress, following it")
            && shown.contains("deployment 3: green@v3 is live; watched for 3s")
            && shown.contains("web v3 is live"),
        "{shown}"
    );

    // A daemon that does not come back: exit 1, saying where to look.
    let deploy = Following::start(&s.config, &["web", "--version", "v4", "--reconnect-timeout", "1s"]);
    assert!(wait_until(Duration::from_secs(10), || text(&s.cli(&["status"]))
        .contains("ready to promote")));
    s.stop_daemon("KILL");
    let (code, shown) = deploy.finish(Duration::from_secs(20));
    assert_eq!(code, Some(1), "{shown}");
    assert!(
        shown.contains("the daemon did not come back within 1s") && shown.contains("cutover history web"),
        "{shown}"
    );
}

#[test]
fn commands_are_answered_at_once_while_the_rolled_back_colour_drains() {
    // A request held open on green keeps green's drain going for 8 s of its 30 s drain_timeout.
    let mut s = Setup::with_service(&format!(
        "command = \"MARKER {BIN} demo-app --port {{port}}\"\ninstances = 1\n\
         health = {{ path = \"/up\", interval = \"100ms\", timeout = \"1s\", healthy = 1, unhealthy = 2, deadline = \"20s\" }}\n\
         drain_timeout = \"30s\"\npromote = {{ auto = false }}\nkeep_warm = \"1m\"\n\
         watch = {{ duration = \"1m\", min_requests = 1000000 }}\n"
    ));
    s.start();
    assert!(s.cli(&["deploy", "web", "--version", "v1"]).status.success());
    assert!(s
        .cli(&["deploy", "web", "--version", "v2", "--no-wait"])
        .status
        .success());
    assert!(wait_until(Duration::from_secs(20), || text(&s.cli(&["status"]))
        .contains("ready to promote")));
    assert!(s.cli(&["promote", "web"]).status.success());
    assert_eq!(s.get(), Some((200, "v2 green".into())));

    let front = s.front;
    let slow = std::thread::spawn(move || {
        let mut c = TcpStream::connect(front).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        write!(
            c,
            "GET /?delay=8000 HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        out
    });
    let green_in_flight = |s: &Setup| -> u64 {
        let status: serde_json::Value =
            serde_json::from_slice(&s.cli(&["status", "--json"]).stdout).unwrap_or_default();
        status["services"][0]["instances"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|i| i["colour"] == "green")
            .map(|i| i["in_flight"].as_u64().unwrap_or(0))
            .sum()
    };
    assert!(
        wait_until(Duration::from_secs(10), || green_in_flight(&s) == 1),
        "the slow request is on green"
    );

    // Each command is answered in well under the 8 s the drain is held for.
    let timed = |args: &[&str]| {
        let t = Instant::now();
        let out = s.cli(args);
        let took = t.elapsed();
        assert!(
            took < Duration::from_secs(3),
            "`cutover {}` took {took:?} while green drains: {}",
            args.join(" "),
            text(&out)
        );
        out
    };
    let out = timed(&["rollback", "web"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("instantly"), "{}", text(&out));
    assert_eq!(s.get(), Some((200, "v1 blue".into())), "live traffic is back at once");
    let out = timed(&["status"]);
    assert!(text(&out).contains("live blue@v1"), "{}", text(&out));
    // A deployment to green while green still drains is accepted, and waits for green's stop.
    let out = timed(&["deploy", "web", "--version", "v3", "--no-wait"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = timed(&["promote", "web"]);
    assert_eq!(out.status.code(), Some(2), "nothing to promote yet: {}", text(&out));
    let out = timed(&["deploy", "web", "--version", "v4", "--no-wait"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("in progress"), "{}", text(&out));
    let v3 = s.pids("v3");
    assert!(
        v3.is_empty() || s.pids("v2").is_empty(),
        "v3 started next to the draining v2: {v3:?}"
    );
    let out = timed(&["abort", "web"]);
    assert!(out.status.success(), "{}", text(&out));

    // The held request finished where it started, then green was stopped.
    let answer = slow.join().unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("v2 green\n"),
        "{answer}"
    );
    assert!(
        wait_until(Duration::from_secs(20), || s.pids("v2").is_empty()),
        "drained green stopped"
    );
    // The next deployment starts on green; by then the aborted v3, which was still waiting for
    // green, has long been passed over without starting anything.
    assert!(s
        .cli(&["deploy", "web", "--version", "v5", "--no-wait"])
        .status
        .success());
    assert!(
        wait_until(Duration::from_secs(20), || text(&s.cli(&["status"]))
            .contains("ready to promote")),
        "{}",
        s.logs()
    );
    assert!(s.pids("v3").is_empty(), "the aborted deployment started nothing");
    assert!(!s.pids("v5").is_empty());
    assert_eq!(s.get(), Some((200, "v1 blue".into())));
}
