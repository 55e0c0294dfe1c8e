//! Live traffic in validation and promotion, through `cutover serve` with static upstreams that
//! record what they are asked:
//! - mirroring (`validate.mirror`): a release whose answers to copies of live requests fail is
//!   refused before any user reaches it, one that answers them well goes live after the window,
//!   live clients lose nothing meanwhile, and only the listed methods are ever copied;
//! - the gradual switch (`promote.steps`): a release failing at its first step is rolled back
//!   with only that step's share of the requests affected; one that passes goes through every
//!   step to the switch.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{cli_at, free_port, get_host, output_text, read_response, serve_marked, KillMarked, Proc};

/// One request a recording upstream saw.
#[derive(Clone, Debug)]
struct Got {
    method: String,
    path: String,
    mirrored: bool,
}

/// A static upstream answering its `name` to every path (and "ok" to `/up`), or 500 to every
/// path but `/up` when `broken` (it passes health checks and the smoke test, and fails users);
/// it records what it was asked.
struct Recorder {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<Got>>>,
    stop: Arc<AtomicBool>,
}

impl Recorder {
    fn start(name: &'static str, broken: bool) -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (g, s) = (got.clone(), stop.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if s.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let g = g.clone();
                std::thread::spawn(move || serve(stream, name, broken, g));
            }
        });
        Recorder { addr, got, stop }
    }

    fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    /// What it got apart from health checks.
    fn requests(&self) -> Vec<Got> {
        self.got().into_iter().filter(|g| g.path != "/up").collect()
    }

    fn upstream(&self) -> String {
        self.addr.to_string()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr);
    }
}

fn serve(stream: TcpStream, name: &str, broken: bool, got: Arc<Mutex<Vec<Got>>>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, path) = (
            parts.next().unwrap_or_default().to_string(),
            parts.next().unwrap_or_default().to_string(),
        );
        let (mut length, mut mirrored) = (0usize, false);
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            if h == "\r\n" {
                break;
            }
            let lower = h.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
            if let Some(v) = lower.strip_prefix("x-cutover-mirror:") {
                mirrored = v.trim() == "1";
            }
        }
        let mut body = vec![0u8; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        got.lock().unwrap().push(Got {
            method: method.clone(),
            path: path.clone(),
            mirrored,
        });
        let (status, text) = match (path.as_str(), broken) {
            ("/up", _) => ("200 OK", "ok".to_string()),
            (_, true) => ("500 Internal Server Error", format!("{name} is broken")),
            _ => ("200 OK", name.to_string()),
        };
        let answer = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\n\r\n{text}", text.len());
        if writer.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

/// Live traffic until `stop` (60 s, 20000 requests at most): on one keep-alive connection a GET,
/// then a POST with a body, in turn. Returns the answers' bodies and the failures.
fn live_load(front: SocketAddr, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(Vec<String>, Vec<String>)> {
    std::thread::spawn(move || {
        let (mut answers, mut failures) = (Vec::new(), Vec::new());
        let started = Instant::now();
        let stream = TcpStream::connect(front).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut writer = stream.try_clone().unwrap();
        let mut reader = BufReader::new(stream);
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(60) && n < 20_000 {
            let request = if n % 2 == 0 {
                "GET /page HTTP/1.1\r\nHost: web.test\r\n\r\n".to_string()
            } else {
                "POST /order HTTP/1.1\r\nHost: web.test\r\nContent-Length: 8\r\n\r\none book".to_string()
            };
            n += 1;
            match writer
                .write_all(request.as_bytes())
                .and_then(|_| read_response(&mut reader))
            {
                Ok((200, body, false)) => answers.push(body),
                Ok((status, body, _)) => {
                    failures.push(format!("{status} {body}"));
                    break;
                }
                Err(e) => {
                    failures.push(e.to_string());
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        (answers, failures)
    })
}

/// `GET /metrics` on the admin socket.
fn scrape(socket: &std::path::Path) -> String {
    admin_get(socket, "/metrics")
}

/// A GET of `path` on the admin socket: the whole answer.
fn admin_get(socket: &std::path::Path, path: &str) -> String {
    let mut s = std::os::unix::net::UnixStream::connect(socket).expect("admin socket");
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The value of the sample named `name` (with its labels), if there is one.
fn sample(metrics: &str, name: &str) -> Option<u64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .map(|v| v.trim().parse::<f64>().unwrap() as u64)
}

#[test]
fn a_release_failing_copies_of_live_requests_is_refused_and_a_good_one_goes_live_after_its_window() {
    let blue = Recorder::start("v1", false);
    let broken = Recorder::start("v2-broken", true);
    let good = Recorder::start("v2", false);
    let (dir, config, front, _daemon) = site(
        "mirror-test",
        "validate = { smoke = \"true\", mirror = { sample = 0.5, duration = \"2s\", methods = [\"GET\"], min_requests = 20 } }\n\
         watch = { duration = \"300ms\", min_requests = 1 }\n",
        &blue,
    );
    let cli = |args: &[&str]| cli_at(&config, args);

    // v2-broken passes its health checks and smoke test, and answers users with 500.
    let stop = Arc::new(AtomicBool::new(false));
    let load = live_load(front, stop.clone());
    let started = Instant::now();
    let out = cli(&[
        "deploy",
        "web",
        "--version",
        "v2-broken",
        "--upstream",
        &broken.upstream(),
    ]);
    let said = output_text(&out);
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (answers, failures) = load.join().unwrap();
    assert!(!out.status.success(), "{said}");
    for expected in [
        "mirroring 50% of the live GET requests to green@v2-broken for 2s",
        "the copies of live requests failed more often than the live ones",
        "100% of copies, 0% of live",
        "validate.mirror.max_error_rate",
    ] {
        assert!(said.contains(expected), "{expected:?} in {said}");
    }
    assert!(
        took >= Duration::from_secs(2),
        "refused after {took:?}, before the window's end"
    );
    assert!(failures.is_empty(), "live requests failed: {failures:?}");
    assert!(
        answers.len() > 100 && answers.iter().all(|a| a == "v1"),
        "{} answers",
        answers.len()
    );
    assert_eq!(get_host(front, "web.test"), Some((200, "v1".into())), "live untouched");
    // Only GETs were copied, each marked, at least min_requests of them and not more than a
    // sample of a half of all the GETs sent (the window is only part of the deploy); no POST ever
    // reached v2.
    let copies = broken.requests();
    let gets = answers.len().div_ceil(2);
    assert!(
        copies
            .iter()
            .all(|g| g.method == "GET" && g.path == "/page" && g.mirrored),
        "{copies:?}"
    );
    assert!(
        copies.len() >= 20 && copies.len() * 4 < gets * 3,
        "{} copies of about {gets} GETs at a sample of 0.5",
        copies.len()
    );
    assert!(blue.requests().iter().all(|g| !g.mirrored));
    assert!(blue.requests().iter().any(|g| g.method == "POST"));
    // The metrics count them, all failed.
    let metrics = scrape(&dir.path().join("state/admin.sock"));
    assert_eq!(
        sample(
            &metrics,
            "cutover_mirror_requests_total{service=\"web\",colour=\"green\",class=\"5xx\"}"
        ),
        Some(copies.len() as u64),
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "cutover_mirror_dropped_total{service=\"web\",colour=\"green\"}"
        ),
        Some(0)
    );
    // History keeps why.
    let out = cli(&["history", "web"]);
    let history = output_text(&out);
    eprintln!("{history}");
    assert!(
        history.contains("validation failed: mirroring: the copies of live requests failed more often"),
        "{history}"
    );

    // v2 answers as v1 does: validated after the window, then live.
    let stop = Arc::new(AtomicBool::new(false));
    let load = live_load(front, stop.clone());
    let started = Instant::now();
    let out = cli(&["deploy", "web", "--version", "v2", "--upstream", &good.upstream()]);
    let said = output_text(&out);
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (answers, failures) = load.join().unwrap();
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("mirrored to green@v2: ") && said.contains(": passed"),
        "{said}"
    );
    assert!(
        took >= Duration::from_secs(2),
        "live after {took:?}, before the window's end"
    );
    assert!(failures.is_empty(), "live requests failed: {failures:?}");
    let first_v2 = answers.iter().position(|a| a == "v2").expect("v2 went live under load");
    assert!(answers[first_v2..].iter().all(|a| a == "v2"), "v1 after v2");
    let mirrored = good.requests().iter().filter(|g| g.mirrored).count();
    assert!(mirrored >= 20, "{mirrored} copies");
    // The window's figures are in the deployment's stored steps.
    let steps = admin_get(&dir.path().join("state/admin.sock"), "/v1/services/web/deployments/3");
    assert!(
        steps.contains("smoke test passed; mirrored to green@v2: ") && steps.contains(": passed"),
        "{steps}"
    );
    assert!(good.requests().iter().filter(|g| g.mirrored).all(|g| g.method == "GET"));
    // Once live, nothing is copied any more.
    assert_eq!(get_host(front, "web.test"), Some((200, "v2".into())));
    let before = good.requests().iter().filter(|g| g.mirrored).count();
    for _ in 0..20 {
        assert_eq!(get_host(front, "web.test"), Some((200, "v2".into())));
    }
    assert_eq!(good.requests().iter().filter(|g| g.mirrored).count(), before);
}

/// GETs on one keep-alive connection until `stop` (60 s, 30000 requests at most), every 2 ms:
/// when each was answered, its status and body. A failed connection ends it (recorded as 0).
fn gets(front: SocketAddr, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<(Instant, u16, String)>> {
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        let started = Instant::now();
        let stream = TcpStream::connect(front).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut writer = stream.try_clone().unwrap();
        let mut reader = BufReader::new(stream);
        while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(60) && seen.len() < 30_000 {
            let answer = writer
                .write_all(b"GET /page HTTP/1.1\r\nHost: web.test\r\n\r\n")
                .and_then(|_| read_response(&mut reader));
            match answer {
                Ok((status, body, _)) => seen.push((Instant::now(), status, body)),
                Err(e) => {
                    seen.push((Instant::now(), 0, e.to_string()));
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        seen
    })
}

/// The daemon of a [`site`]: stopped when dropped, and whatever carries its marker killed.
struct Daemon {
    _proc: Proc,
    _cleanup: KillMarked,
}

/// A site of one static service with `settings` in its table, and v1 live from `blue`.
fn site(owner: &str, settings: &str, blue: &Recorder) -> (tempfile::TempDir, std::path::PathBuf, SocketAddr, Daemon) {
    site_with(owner, settings, blue, &[])
}

/// [`site`], with `envs` in the daemon's environment.
fn site_with(
    owner: &str,
    settings: &str,
    blue: &Recorder,
    envs: &[(&str, String)],
) -> (tempfile::TempDir, std::path::PathBuf, SocketAddr, Daemon) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("cutover.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nstate_dir = \"state\"\n[services.web]\n\
             health = {{ path = \"/up\", interval = \"100ms\", healthy = 1 }}\n{settings}"
        ),
    )
    .unwrap();
    let daemon = Daemon {
        _proc: Proc(serve_marked(&config, owner, envs)),
        _cleanup: KillMarked(owner.into()),
    };
    let front = SocketAddr::from(([127, 0, 0, 1], port));
    let out = cli_at(
        &config,
        &["deploy", "web", "--version", "v1", "--upstream", &blue.upstream()],
    );
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(get_host(front, "web.test"), Some((200, "v1".into())));
    (dir, config, front, daemon)
}

#[test]
fn a_gradual_switch_failing_at_its_first_step_is_rolled_back_with_only_that_share_affected() {
    let blue = Recorder::start("v1", false);
    let broken = Recorder::start("v2-broken", true);
    let (_dir, config, front, _daemon) = site(
        "gradual-failing-test",
        "validate = { smoke = \"true\" }\npromote = { steps = [10, 50, 100], step = \"5s\" }\n\
         watch = { duration = \"1s\", min_requests = 20, max_error_rate = 0.05 }\n",
        &blue,
    );
    let stop = Arc::new(AtomicBool::new(false));
    let load = gets(front, stop.clone());
    std::thread::sleep(Duration::from_millis(300));
    let out = cli_at(
        &config,
        &[
            "deploy",
            "web",
            "--version",
            "v2-broken",
            "--upstream",
            &broken.upstream(),
        ],
    );
    let returned = Instant::now();
    let said = output_text(&out);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let seen = load.join().unwrap();
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("gradual switch: 10% of live requests to green (v2-broken)"),
        "{said}"
    );
    assert!(said.contains("rolled back") || said.contains("rolled-back"), "{said}");
    assert!(
        said.contains("gradual switch ended: every live request to blue (v1)"),
        "{said}"
    );
    assert!(
        !said.contains("50% of live requests"),
        "went past the first step: {said}"
    );
    // Every failure is the broken release's own answer; none after the rollback.
    let failed: Vec<_> = seen.iter().filter(|(_, status, _)| *status != 200).collect();
    assert!(
        failed
            .iter()
            .all(|(_, status, body)| *status == 500 && body == "v2-broken is broken"),
        "{failed:?}"
    );
    assert!(
        failed.iter().all(|(at, _, _)| *at <= returned),
        "a failure after the rollback"
    );
    assert!(seen
        .iter()
        .all(|(_, _, body)| body == "v1" || body == "v2-broken is broken"));
    // About a tenth of the requests from the first to the last that reached v2-broken.
    let (first, last) = (
        seen.iter()
            .position(|(_, s, _)| *s == 500)
            .expect("the step sent requests to v2-broken"),
        seen.iter().rposition(|(_, s, _)| *s == 500).unwrap(),
    );
    let during = last - first + 1;
    let share = failed.len() as f64 / during as f64;
    eprintln!(
        "{} of {during} requests during the step reached v2-broken ({share:.3})",
        failed.len()
    );
    assert!(
        share <= 0.2 && during >= 20,
        "{} of {during} requests during the step reached v2-broken ({share:.2})",
        failed.len()
    );
    assert_eq!(get_host(front, "web.test"), Some((200, "v1".into())));
    let history = output_text(&cli_at(&config, &["history", "web"]));
    assert!(history.contains("rolled"), "{history}");
}

#[test]
fn a_gradual_switch_that_passes_goes_through_every_step_to_the_switch() {
    let blue = Recorder::start("v1", false);
    let good = Recorder::start("v2", false);
    let (_dir, config, front, _daemon) = site(
        "gradual-passing-test",
        "validate = { smoke = \"true\" }\npromote = { steps = [20, 60, 100], step = \"1500ms\" }\n\
         watch = { duration = \"300ms\", min_requests = 1 }\n",
        &blue,
    );
    let stop = Arc::new(AtomicBool::new(false));
    let load = gets(front, stop.clone());
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let out = cli_at(
        &config,
        &["deploy", "web", "--version", "v2", "--upstream", &good.upstream()],
    );
    let took = started.elapsed();
    let said = output_text(&out);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let seen = load.join().unwrap();
    assert!(out.status.success(), "{said}");
    let (at20, at60, switched) = (
        said.find("gradual switch: 20% of live requests to green (v2); 60% after 1.5s")
            .expect(&said),
        said.find("gradual switch: 60% of live requests to green (v2); 100% after 1.5s")
            .expect(&said),
        said.find("live traffic switched to green (v2)").expect(&said),
    );
    assert!(at20 < at60 && at60 < switched, "{said}");
    assert!(
        took >= Duration::from_secs(3),
        "live after {took:?}: the steps were not waited out"
    );
    assert!(seen.iter().all(|(_, status, _)| *status == 200), "a request failed");
    // Mixed while stepping, then v2 alone: the last v1 before the last answers, none after.
    let first_v2 = seen.iter().position(|(_, _, b)| b == "v2").unwrap();
    let last_v1 = seen.iter().rposition(|(_, _, b)| b == "v1").unwrap();
    assert!(last_v1 > first_v2, "no mixing: the switch was not gradual");
    let mixed = &seen[first_v2..=last_v1];
    let v2_share = mixed.iter().filter(|(_, _, b)| b == "v2").count() as f64 / mixed.len() as f64;
    eprintln!(
        "{} requests while stepping, {v2_share:.3} of them answered by v2",
        mixed.len()
    );
    assert!(
        (0.2..0.7).contains(&v2_share),
        "v2 answered {v2_share:.2} while stepping"
    );
    assert!(seen[last_v1 + 1..].iter().all(|(_, _, b)| b == "v2"));
    assert!(seen.len() - last_v1 > 50, "v2 alone at the end");
    assert_eq!(get_host(front, "web.test"), Some((200, "v2".into())));
}

#[test]
fn promote_during_a_gradual_switch_switches_at_once() {
    let blue = Recorder::start("v1", false);
    let good = Recorder::start("v2", false);
    let (_dir, config, front, _daemon) = site(
        "gradual-promote-test",
        "validate = { smoke = \"true\" }\npromote = { steps = [20, 60, 100], step = \"60s\" }\n\
         watch = { duration = \"300ms\", min_requests = 1 }\n",
        &blue,
    );
    let deploying = deploy_in_background(&config, "v2", &good);
    // `cutover status` says where the switch stands.
    let status = || output_text(&cli_at(&config, &["status"]));
    let stepping = "gradual switch of deployment 2 (v2): 20% of live traffic on green, step 1 of 3, live blue@v1";
    assert!(
        common::wait_until(Duration::from_secs(20), || status().contains(stepping)),
        "{}",
        status()
    );
    let started = Instant::now();
    let out = cli_at(&config, &["promote", "web"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let out = deploying.join().unwrap();
    let said = output_text(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("live traffic switched to green (v2)"), "{said}");
    assert!(started.elapsed() < Duration::from_secs(10), "the steps were waited out");
    assert_eq!(get_host(front, "web.test"), Some((200, "v2".into())));
}

/// One `GET /` for web.test with `cookie` (if any) on a fresh connection: the body and the
/// value of the `cutover_session` cookie set, if one was.
fn get_with_cookie(front: SocketAddr, cookie: Option<&str>) -> (String, Option<String>) {
    let mut stream = TcpStream::connect(front).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let cookie = cookie.map_or(String::new(), |c| format!("Cookie: cutover_session={c}\r\n"));
    write!(
        stream,
        "GET / HTTP/1.1\r\nHost: web.test\r\n{cookie}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let set = head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        let value = value.trim().strip_prefix("cutover_session=")?;
        name.eq_ignore_ascii_case("set-cookie")
            .then(|| value.split(';').next().unwrap_or_default().to_string())
    });
    (body.trim().to_string(), set)
}

#[test]
fn a_gradual_switch_with_affinity_keeps_each_session_on_its_colour_through_the_switch() {
    let blue = Recorder::start("v1", false);
    let good = Recorder::start("v2", false);
    let (_dir, config, front, _daemon) = site(
        "gradual-affinity-test",
        "validate = { smoke = \"true\" }\npromote = { steps = [50, 100], step = \"2s\" }\n\
         watch = { duration = \"300ms\", min_requests = 1 }\naffinity = { cookie = \"cutover_session\", window = \"15m\" }\n",
        &blue,
    );
    let deploying = deploy_in_background(&config, "v2", &good);
    let status = || output_text(&cli_at(&config, &["status"]));
    assert!(
        common::wait_until(Duration::from_secs(20), || status()
            .contains("50% of live traffic on green")),
        "{}",
        status()
    );
    // New sessions at the 50% step: each gets a cookie for the colour that answered it, and
    // keeps that colour.
    let mut sessions = Vec::new();
    for _ in 0..30 {
        let (first, cookie) = get_with_cookie(front, None);
        let cookie = cookie.expect("a new session gets a cookie");
        for _ in 0..2 {
            assert_eq!(
                get_with_cookie(front, Some(&cookie)).0,
                first,
                "a session changed colour at the step"
            );
        }
        sessions.push((first, cookie));
    }
    let on_v2 = sessions.iter().filter(|(v, _)| v == "v2").count();
    assert!((3..=27).contains(&on_v2), "{on_v2} of 30 new sessions on v2 at 50%");
    let out = deploying.join().unwrap();
    let said = output_text(&out);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("sessions that began on blue stay there for 900s (affinity)"),
        "{said}"
    );
    // After the switch: the sessions begun on blue stay there (pinned), those on green too;
    // new sessions go to v2.
    for (first, cookie) in &sessions {
        assert_eq!(
            &get_with_cookie(front, Some(cookie)).0,
            first,
            "a session moved at the switch"
        );
    }
    for _ in 0..5 {
        assert_eq!(get_with_cookie(front, None).0, "v2");
    }
}

/// A fault in the service's control during a step: the share goes back to the live release
/// while nothing watches it, and the step is set again once the control restarts.
#[test]
fn a_fault_during_a_gradual_step_sends_the_share_back_until_the_control_restarts() {
    let blue = Recorder::start("v1", false);
    let good = Recorder::start("v2", false);
    let (_dir, config, front, _daemon) = site_with(
        "gradual-fault-test",
        "validate = { smoke = \"true\" }\npromote = { steps = [50, 100], step = \"60s\" }\n\
         watch = { duration = \"300ms\", min_requests = 100000 }\n",
        &blue,
        &[("CUTOVER_TEST_PANIC_ON_DEPLOY", "boom".to_string())],
    );
    let deploying = deploy_in_background(&config, "v2", &good);
    let status = || output_text(&cli_at(&config, &["status"]));
    let stepping = "gradual switch of deployment 2 (v2): 50% of live traffic on green";
    assert!(
        common::wait_until(Duration::from_secs(20), || status().contains(stepping)),
        "{}",
        status()
    );
    let v2_of = |n: usize| {
        (0..n)
            .filter(|_| get_host(front, "web.test").unwrap().1 == "v2")
            .count()
    };
    let before = v2_of(200);
    assert!((60..=140).contains(&before), "{before} of 200 on v2 at 50%");
    let out = cli_at(&config, &["deploy", "web", "--version", "boom"]);
    assert!(!out.status.success(), "{}", output_text(&out));
    // While the control restarts (1 s backoff), every request goes to v1: 30 in a row would
    // come by chance once in a billion at 50%.
    let mut run = 0;
    let back = common::wait_until(Duration::from_secs(3), || {
        run = if get_host(front, "web.test").unwrap().1 == "v1" {
            run + 1
        } else {
            0
        };
        run >= 30
    });
    assert!(back, "the share stayed on v2 while the control was down");
    // Restarted from the committed state: the step again, its share again.
    assert!(
        common::wait_until(Duration::from_secs(10), || status().contains(stepping)),
        "{}",
        status()
    );
    let after = common::wait_until(Duration::from_secs(5), || v2_of(40) >= 5);
    assert!(after, "the share did not come back after the restart");
    let out = cli_at(&config, &["promote", "web"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let _ = deploying.join().unwrap();
    assert!(common::wait_until(Duration::from_secs(5), || get_host(
        front, "web.test"
    ) == Some((
        200,
        "v2".into()
    ))));
}

/// `cutover deploy web --version VERSION --upstream` to `upstream`, in a thread of its own.
fn deploy_in_background(
    config: &std::path::Path,
    version: &str,
    upstream: &Recorder,
) -> std::thread::JoinHandle<std::process::Output> {
    let (config, version, upstream) = (config.to_path_buf(), version.to_string(), upstream.upstream());
    std::thread::spawn(move || {
        cli_at(
            &config,
            &["deploy", "web", "--version", &version, "--upstream", &upstream],
        )
    })
}
