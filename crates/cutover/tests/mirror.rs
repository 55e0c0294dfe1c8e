//! Mirroring during validation (`validate.mirror`) through `cutover serve`: a release whose
//! answers to copies of live requests fail is refused before any user reaches it, one that
//! answers them well goes live after the window, live clients lose nothing meanwhile, and only
//! the listed methods are ever copied.

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
    let mut s = std::os::unix::net::UnixStream::connect(socket).expect("admin socket");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
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
    let owner = "mirror-test";
    let _cleanup = KillMarked(owner.into());
    let blue = Recorder::start("v1", false);
    let broken = Recorder::start("v2-broken", true);
    let good = Recorder::start("v2", false);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("cutover.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nstate_dir = \"state\"\n[services.web]\n\
             health = {{ path = \"/up\", interval = \"100ms\", healthy = 1 }}\n\
             validate = {{ smoke = \"true\", mirror = {{ sample = 0.5, duration = \"2s\", methods = [\"GET\"], min_requests = 20 }} }}\n\
             watch = {{ duration = \"300ms\", min_requests = 1 }}\n"
        ),
    )
    .unwrap();
    let _daemon = Proc(serve_marked(&config, owner, &[]));
    let front = SocketAddr::from(([127, 0, 0, 1], port));
    let cli = |args: &[&str]| cli_at(&config, args);
    let out = cli(&["deploy", "web", "--version", "v1", "--upstream", &blue.upstream()]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(get_host(front, "web.test"), Some((200, "v1".into())));

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
    // Only GETs were copied, each marked, about half of them; no POST ever reached v2.
    let copies = broken.requests();
    let gets = answers.len().div_ceil(2);
    assert!(
        copies
            .iter()
            .all(|g| g.method == "GET" && g.path == "/page" && g.mirrored),
        "{copies:?}"
    );
    assert!(
        copies.len() * 4 > gets && copies.len() * 4 < gets * 3,
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
    assert!(good.requests().iter().filter(|g| g.mirrored).all(|g| g.method == "GET"));
    // Once live, nothing is copied any more.
    assert_eq!(get_host(front, "web.test"), Some((200, "v2".into())));
    let before = good.requests().iter().filter(|g| g.mirrored).count();
    for _ in 0..20 {
        assert_eq!(get_host(front, "web.test"), Some((200, "v2".into())));
    }
    assert_eq!(good.requests().iter().filter(|g| g.mirrored).count(), before);
}
