//! The daemon itself going away and coming back, under continuous load from keep-alive HTTP/1.1
//! clients, HTTP/2 clients and open WebSockets: `cutover upgrade` (in a row, and to binaries
//! that fail), a graceful stop and start (instances adopted, an app that takes 2 s to start),
//! and stops and crashes under socket activation (the test holds the listening socket, as
//! systemd's socket unit would).
//!
//! The clients behave as HTTP clients do: an HTTP/1.1 connection answered with
//! `Connection: close` is closed and a new one opened for the next request; an HTTP/2
//! connection that got GOAWAY is replaced. Everything else is counted against the daemon: a
//! refused connect, a connection closed or reset without a whole response, a 5xx, an answer from
//! the wrong release, a WebSocket that ends without Close 1001.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod common;
use common::site::*;
use common::*;

/// What the clients saw.
#[derive(Default)]
struct Seen {
    /// Answers by "STATUS BODY".
    answers: BTreeMap<String, u64>,
    /// Everything counted against the daemon, in words.
    failures: Vec<String>,
    /// Connects refused, and new connections reset before anything was read (the listener they
    /// waited in closed); also in `failures`, as "connect: ...".
    refused: u64,
    /// HTTP/1.1 connections ended by a `Connection: close` answer, HTTP/2 ones by GOAWAY.
    told_to_reconnect: u64,
    /// HTTP/2 requests the server did not process (their connection had ended, or they came
    /// after its GOAWAY), sent again on a new connection.
    unsent_retried: u64,
    /// WebSockets: echoes received, and how each ended.
    echoes: u64,
    ws_closed_1001: u64,
    ws_opened: u64,
    /// The longest time without a successful answer.
    longest_gap: Duration,
    last_ok: Option<Instant>,
}

impl Seen {
    fn ok(&mut self, answer: String) {
        let now = Instant::now();
        if let Some(last) = self.last_ok {
            self.longest_gap = self.longest_gap.max(now - last);
        }
        self.last_ok = Some(now);
        *self.answers.entry(answer).or_default() += 1;
    }

    fn fail(&mut self, what: String) {
        if self.failures.len() < 1000 {
            self.failures.push(what);
        }
    }

    fn total(&self) -> u64 {
        self.answers.values().sum()
    }
}

/// HTTP/1.1 keep-alive clients, HTTP/2 clients and WebSockets against `front`, until stopped
/// (or 10 minutes, whichever first).
struct Load {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
    rt: tokio::runtime::Runtime,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    expect: String,
}

const LOAD_LIMIT: Duration = Duration::from_secs(600);

impl Load {
    fn start(front: SocketAddr, h1: usize, h2: usize, ws: usize, expect: &str) -> Load {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let until = Instant::now() + LOAD_LIMIT;
        let mut tasks = Vec::new();
        for _ in 0..h1 {
            tasks.push(rt.spawn(h1_client(front, stop.clone(), seen.clone(), until)));
        }
        for _ in 0..h2 {
            tasks.push(rt.spawn(h2_client(front, stop.clone(), seen.clone(), until)));
        }
        for i in 0..ws {
            tasks.push(rt.spawn(ws_client(
                front,
                stop.clone(),
                seen.clone(),
                until,
                expect.to_string(),
                i,
            )));
        }
        Load {
            stop,
            seen,
            rt,
            tasks,
            expect: expect.to_string(),
        }
    }

    fn total(&self) -> u64 {
        self.seen.lock().unwrap().total()
    }

    /// Waits until `n` more answers arrived.
    fn more(&self, n: u64, within: Duration) -> bool {
        let start = self.total();
        wait_until(within, || self.total() >= start + n)
    }

    fn finish(self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = self.rt.block_on(t);
        }
        let mut seen = std::mem::take(&mut *self.seen.lock().unwrap());
        let expect = format!("200 {}", self.expect);
        let wrong: Vec<String> = seen
            .answers
            .iter()
            .filter(|(a, _)| **a != expect)
            .map(|(a, n)| format!("{n} answers of {a:?}"))
            .collect();
        seen.failures.extend(wrong);
        seen
    }
}

/// Reads one response (head and Content-Length body) from `s`. `Ok(None)`: the connection ended
/// before any byte of it.
async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Option<(u16, String, bool)>> {
    buf.clear();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4) {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
                .unwrap_or(0);
            if buf.len() >= end + len {
                let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
                let close = head
                    .lines()
                    .any(|l| l.starts_with("connection:") && l.contains("close"));
                let body = String::from_utf8_lossy(&buf[end..end + len]).trim().to_string();
                return Ok(Some((status, body, close)));
            }
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "closed mid-response",
                ))
            };
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn refused(seen: &Mutex<Seen>, e: std::io::Error) {
    let mut seen = seen.lock().unwrap();
    seen.refused += 1;
    seen.fail(format!("connect: {e}"));
}

async fn h1_client(front: SocketAddr, stop: Arc<AtomicBool>, seen: Arc<Mutex<Seen>>, until: Instant) {
    let mut conn: Option<TcpStream> = None;
    let mut buf = Vec::new();
    while !stop.load(Ordering::Relaxed) && Instant::now() < until {
        // A connection the kernel completed in the listener's backlog, but that no daemon took
        // before the listener closed, is reset before anything is read: to the client, the
        // same as a refused connect.
        let fresh = conn.is_none();
        let mut s = match conn.take() {
            Some(s) => s,
            None => match TcpStream::connect(front).await {
                Ok(s) => s,
                Err(e) => {
                    refused(&seen, e);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
            },
        };
        let sent = s.write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n").await;
        let got = match sent {
            Ok(()) => tokio::time::timeout(Duration::from_secs(20), read_response(&mut s, &mut buf)).await,
            Err(e) => Ok(Err(e)),
        };
        match got {
            Ok(Ok(Some((status, body, close)))) => {
                {
                    let mut seen = seen.lock().unwrap();
                    seen.ok(format!("{status} {body}"));
                    if close {
                        seen.told_to_reconnect += 1;
                    }
                }
                if !close {
                    conn = Some(s);
                }
            }
            Ok(Ok(None)) if fresh => refused(&seen, std::io::Error::other("closed by a closing listener")),
            Ok(Err(e)) if fresh && e.kind() == std::io::ErrorKind::ConnectionReset => refused(&seen, e),
            Ok(Ok(None)) => seen
                .lock()
                .unwrap()
                .fail("HTTP/1.1: connection closed without an answer".into()),
            Ok(Err(e)) => seen.lock().unwrap().fail(format!("HTTP/1.1: {e}")),
            Err(_) => seen.lock().unwrap().fail("HTTP/1.1: no answer within 20 s".into()),
        }
    }
}

async fn h2_client(front: SocketAddr, stop: Arc<AtomicBool>, seen: Arc<Mutex<Seen>>, until: Instant) {
    use http_body_util::BodyExt;
    type Sender = hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>;
    let mut conn: Option<Sender> = None;
    while !stop.load(Ordering::Relaxed) && Instant::now() < until {
        // As for HTTP/1.1: a new connection reset before its first answer waited in the backlog
        // of a listener that closed.
        let fresh = conn.is_none();
        let mut sender = match conn.take() {
            Some(s) => s,
            None => {
                let stream = match TcpStream::connect(front).await {
                    Ok(s) => s,
                    Err(e) => {
                        refused(&seen, e);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    }
                };
                let io = hyper_util::rt::TokioIo::new(stream);
                match hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await {
                    Ok((sender, connection)) => {
                        tokio::spawn(connection);
                        sender
                    }
                    Err(e) => {
                        seen.lock().unwrap().fail(format!("HTTP/2 handshake: {e}"));
                        continue;
                    }
                }
            }
        };
        // A connection that got GOAWAY (or closed) takes no new stream: open another.
        if sender.ready().await.is_err() {
            seen.lock().unwrap().told_to_reconnect += 1;
            continue;
        }
        let req = http::Request::get(format!("http://{front}/"))
            .body(http_body_util::Empty::new())
            .unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(20), async {
            let resp = sender.send_request(req).await?;
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>((status, String::from_utf8_lossy(&body).trim().to_string()))
        })
        .await;
        match answer {
            Ok(Ok((status, body))) => {
                seen.lock().unwrap().ok(format!("{status} {body}"));
                conn = Some(sender);
            }
            // Not processed: the connection ended before the request went out, or the stream
            // came after the server's GOAWAY. An HTTP/2 client sends it again on a new
            // connection, and so does this one.
            Ok(Err(e)) if e.is_canceled() || refused_by_goaway(&e) => seen.lock().unwrap().unsent_retried += 1,
            Ok(Err(e)) if fresh && reset(&e) => refused(&seen, std::io::Error::other(e.to_string())),
            Ok(Err(e)) => seen.lock().unwrap().fail(format!("HTTP/2: {e:?}")),
            Err(_) => seen.lock().unwrap().fail("HTTP/2: no answer within 20 s".into()),
        }
    }
}

fn reset(e: &hyper::Error) -> bool {
    let io = std::error::Error::source(e).and_then(|s| s.downcast_ref::<std::io::Error>());
    io.is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionReset)
}

/// The stream was opened after the server's GOAWAY named the last stream it would process: it
/// was not processed, and RFC 9113 §8.7 lets a client send it again.
fn refused_by_goaway(e: &hyper::Error) -> bool {
    let h2 = std::error::Error::source(e).and_then(|s| s.downcast_ref::<h2::Error>());
    h2.is_some_and(|h2| h2.is_go_away() && h2.is_remote() && h2.reason() == Some(h2::Reason::NO_ERROR))
}

/// A WebSocket sending a message every 100 ms and checking each echo; when the daemon closes it
/// with 1001 (a daemon that handed over, at the end of its shutdown window), it opens another.
async fn ws_client(
    front: SocketAddr,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
    until: Instant,
    expect: String,
    id: usize,
) {
    use tokio_tungstenite::tungstenite::Message;
    let mut n = 0u64;
    'connections: while !stop.load(Ordering::Relaxed) && Instant::now() < until {
        let stream = match TcpStream::connect(front).await {
            Ok(s) => s,
            Err(e) => {
                refused(&seen, e);
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        };
        let mut ws = match tokio_tungstenite::client_async(format!("ws://{front}/ws"), stream).await {
            Ok((ws, _)) => ws,
            Err(e) => {
                seen.lock().unwrap().fail(format!("WebSocket {id}: handshake: {e}"));
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        seen.lock().unwrap().ws_opened += 1;
        while !stop.load(Ordering::Relaxed) && Instant::now() < until {
            n += 1;
            let text = format!("{id}-{n}");
            if let Err(e) = ws.send(Message::text(text.clone())).await {
                seen.lock().unwrap().fail(format!("WebSocket {id}: send: {e}"));
                continue 'connections;
            }
            let want = format!("{expect}: {text}");
            loop {
                match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
                    Ok(Some(Ok(Message::Text(t)))) if t.as_str() == want => {
                        seen.lock().unwrap().echoes += 1;
                        break;
                    }
                    Ok(Some(Ok(Message::Text(t)))) => {
                        seen.lock()
                            .unwrap()
                            .fail(format!("WebSocket {id}: echo {t:?}, not {want:?}"));
                        break;
                    }
                    Ok(Some(Ok(Message::Close(frame)))) => {
                        let code = frame.map(|f| u16::from(f.code));
                        {
                            let mut seen = seen.lock().unwrap();
                            if code == Some(1001) {
                                seen.ws_closed_1001 += 1;
                            } else {
                                seen.fail(format!("WebSocket {id}: closed with {code:?}"));
                            }
                        }
                        continue 'connections;
                    }
                    Ok(Some(Ok(_))) => {}
                    Ok(Some(Err(e))) => {
                        seen.lock().unwrap().fail(format!("WebSocket {id}: {e}"));
                        continue 'connections;
                    }
                    Ok(None) => {
                        seen.lock()
                            .unwrap()
                            .fail(format!("WebSocket {id}: ended without a Close frame"));
                        continue 'connections;
                    }
                    Err(_) => {
                        seen.lock()
                            .unwrap()
                            .fail(format!("WebSocket {id}: no echo within 10 s"));
                        continue 'connections;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = ws.close(None).await;
    }
}

fn upgrade(site: &Site, extra: &[&str]) -> (Output, serde_json::Value) {
    let mut args = vec!["upgrade", "--json"];
    args.extend_from_slice(extra);
    let out = site.cli(&args);
    let json = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out, json)
}

/// Ten `cutover upgrade`s in a row under load: no refused connection, no failed request, every
/// WebSocket echoing until the old daemon closes it with 1001 at the end of its shutdown window;
/// the instances are the same processes throughout, and the daemon's pid changes every time.
#[test]
fn ten_upgrades_in_a_row_under_load_lose_nothing() {
    let mut site = Site::new("");
    site.start();
    site.deploy("v1");
    let instances = site.instance_pids();
    assert_eq!(instances.len(), 2, "two instances run");
    let load = Load::start(site.front, 4, 2, 3, "v1 blue");
    assert!(load.more(200, Duration::from_secs(20)), "the load runs");
    let mut daemon_pid = site.daemon.as_ref().unwrap().id();
    for round in 1..=10 {
        let (out, answer) = upgrade(&site, &[]);
        assert!(out.status.success(), "upgrade {round}: {}\n{}", text(&out), site.logs());
        let pid = answer["pid"].as_u64().unwrap() as u32;
        assert_eq!(answer["previous_pid"].as_u64(), Some(daemon_pid as u64), "{answer}");
        assert_ne!(pid, daemon_pid, "a new daemon serves after upgrade {round}");
        daemon_pid = pid;
        assert!(
            load.more(100, Duration::from_secs(20)),
            "answers go on after upgrade {round}"
        );
        assert_eq!(
            site.instance_pids(),
            instances,
            "no instance restarted by upgrade {round}"
        );
    }
    // The old daemons finish and exit: only the last one serves.
    assert!(
        wait_until(Duration::from_secs(30), || site.daemon_pids() == vec![daemon_pid]),
        "only the last daemon is left: {:?}",
        site.daemon_pids()
    );
    let seen = load.finish();
    let summary = format!(
        "{} answers, {} told to reconnect, {} HTTP/2 requests not processed and sent again, {} refused, {} echoes, {} WebSockets opened, {} closed with 1001, longest gap {:?}",
        seen.total(),
        seen.told_to_reconnect,
        seen.unsent_retried,
        seen.refused,
        seen.echoes,
        seen.ws_opened,
        seen.ws_closed_1001,
        seen.longest_gap
    );
    eprintln!("10 upgrades: {summary}");
    assert!(
        seen.failures.is_empty(),
        "{summary}; failures: {:?}",
        &seen.failures[..seen.failures.len().min(20)]
    );
    assert_eq!(seen.refused, 0);
    assert!(
        seen.ws_closed_1001 > 0,
        "the old daemons closed their WebSockets with 1001: {summary}"
    );
    assert_eq!(site.instance_pids(), instances, "the same instances serve");
    let status = site.cli(&["status"]);
    assert!(text(&status).contains("live blue@v1"), "{}", text(&status));
}

/// An upgrade to a binary that exits at once, or to one that cannot start because the config
/// is broken now, fails with exit 1 and the reason; the old daemon serves throughout, keeps its
/// pid, and manages the service as before (a deploy afterwards goes live).
#[test]
fn a_failed_upgrade_leaves_the_old_daemon_serving_and_managing() {
    let mut site = Site::new("");
    site.start();
    site.deploy("v1");
    let instances = site.instance_pids();
    let daemon_pid = site.daemon.as_ref().unwrap().id();
    let load = Load::start(site.front, 3, 1, 2, "v1 blue");
    assert!(load.more(100, Duration::from_secs(20)), "the load runs");

    let exits = site.dir.path().join("exits-at-once");
    std::fs::write(&exits, "#!/bin/sh\necho 'this binary only exits' >&2\nexit 3\n").unwrap();
    std::fs::set_permissions(&exits, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = site.cli(&["upgrade", "--binary", exits.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("exited with status 3 before it served"),
        "{}",
        text(&out)
    );
    assert!(
        load.more(100, Duration::from_secs(20)),
        "served on after the failed upgrade"
    );

    // The same binary, but the config it loads (the one the daemon was started with) is broken
    // now. The command itself reads a good copy, which names the same admin socket.
    let good = std::fs::read_to_string(&site.config).unwrap();
    let for_cli = site.dir.path().join("cli.toml");
    std::fs::write(&for_cli, &good).unwrap();
    std::fs::write(&site.config, format!("{good}\nnot_a_key = 1\n")).unwrap();
    let out = cli(&for_cli, &["upgrade"]);
    std::fs::write(&site.config, &good).unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("exited with status 2 before it served") && text(&out).contains("not_a_key"),
        "the reason names the bad key: {}",
        text(&out)
    );

    assert!(
        load.more(100, Duration::from_secs(20)),
        "served on after the failed upgrades"
    );
    assert_eq!(site.daemon_pids(), vec![daemon_pid], "the old daemon alone serves");
    assert_eq!(site.instance_pids(), instances, "the same instances serve");
    let seen = load.finish();
    assert!(
        seen.failures.is_empty(),
        "nothing lost: {:?}",
        &seen.failures[..seen.failures.len().min(20)]
    );
    // Managed as before: a release goes live.
    site.deploy("v2");
    assert_eq!(get_once(site.front).as_deref(), Some("v2 green"));
}

fn get_once(front: SocketAddr) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(front).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out.split_once("\r\n\r\n")?.1.trim().to_string())
}

/// SIGTERM, then `serve` again, with an app that takes 2 s to start: the instances keep running
/// across the restart and are adopted (same pids, no cold start), and no request is answered
/// with a 5xx. Without socket activation the listener is closed while no daemon runs, so
/// connects in that gap are refused (counted, not failures).
#[test]
fn a_graceful_restart_adopts_the_running_instances_and_answers_no_5xx() {
    let mut site = Site::new("--start-delay 2s");
    site.start();
    site.deploy("v1");
    let instances = site.instance_pids();
    assert_eq!(instances.len(), 2);
    let load = Load::start(site.front, 4, 1, 0, "v1 blue");
    assert!(load.more(100, Duration::from_secs(20)), "the load runs");
    for round in 1..=3 {
        site.stop();
        assert_eq!(site.instance_pids(), instances, "the instances outlive stop {round}");
        site.start();
        assert!(load.more(100, Duration::from_secs(20)), "served after restart {round}");
        assert_eq!(
            site.instance_pids(),
            instances,
            "adopted, not restarted, at start {round}"
        );
    }
    let logs = site.logs();
    assert!(logs.contains("2 instances adopted, 0 restarted"), "{logs}");
    let seen = load.finish();
    let not_refused: Vec<&String> = seen.failures.iter().filter(|f| !f.starts_with("connect:")).collect();
    eprintln!(
        "3 graceful restarts: {} answers, {} connects refused while no daemon ran, longest gap {:?}",
        seen.total(),
        seen.refused,
        seen.longest_gap
    );
    assert!(not_refused.is_empty(), "no 5xx, no request lost: {not_refused:?}");
    // The full teardown stops them.
    let out = site.cli(&["shutdown", "--stop-instances"]);
    assert!(out.status.success(), "{}", text(&out));
    let mut d = site.daemon.take().unwrap();
    assert!(wait_until(Duration::from_secs(30), || d
        .try_wait()
        .ok()
        .flatten()
        .is_some()));
    assert!(
        wait_until(Duration::from_secs(10), || site.instance_pids().is_empty()),
        "shutdown --stop-instances stops every instance: {:?}",
        site.instance_pids()
    );
}

/// Under socket activation the listening socket outlives the daemon: stop and start (and a
/// kill -9 and start) under load. A graceful restart refuses nothing and loses nothing: clients
/// wait in the backlog while no daemon runs. A kill -9 may lose only the requests in flight at
/// that instant, at most one per connection.
#[test]
fn under_socket_activation_a_restart_refuses_no_connection() {
    let mut site = Site::new("");
    let socket = TcpListener::bind(site.front).unwrap();
    site.start_activated(&socket);
    site.deploy("v1");
    let instances = site.instance_pids();
    let clients = 4 + 1;
    let load = Load::start(site.front, 4, 1, 0, "v1 blue");
    assert!(load.more(100, Duration::from_secs(20)), "the load runs");
    for round in 1..=3 {
        site.stop();
        site.start_activated(&socket);
        assert!(load.more(100, Duration::from_secs(20)), "served after restart {round}");
    }
    let graceful = std::mem::take(&mut *load.seen.lock().unwrap());
    eprintln!(
        "3 graceful restarts under socket activation: {} answers, {} refused, longest gap {:?}",
        graceful.total(),
        graceful.refused,
        graceful.longest_gap
    );
    assert!(
        graceful.failures.is_empty(),
        "nothing refused or lost: {:?}",
        &graceful.failures[..graceful.failures.len().min(20)]
    );
    assert_eq!(site.instance_pids(), instances, "the instances were adopted each time");

    for round in 1..=3 {
        site.kill();
        site.start_activated(&socket);
        assert!(load.more(100, Duration::from_secs(20)), "served after kill -9 {round}");
    }
    let seen = load.finish();
    let lost = seen.failures.len();
    eprintln!(
        "3 kill -9 restarts under socket activation: {} answers, {} failed ({:?}), {} refused, longest gap {:?}",
        seen.total(),
        lost,
        seen.failures,
        seen.refused,
        seen.longest_gap
    );
    assert_eq!(seen.refused, 0, "nothing refused: the socket stayed open");
    assert!(
        lost <= 3 * clients,
        "at most the requests in flight at each kill: {:?}",
        seen.failures
    );
    assert_eq!(site.instance_pids(), instances, "the instances were adopted each time");
}

/// While a deployment is in progress (here: validated, waiting for `cutover promote`) an upgrade
/// is refused, exit 2, with the deployment named and what to do; nothing is started or changed,
/// and the deployment goes on afterwards.
#[test]
fn an_upgrade_is_refused_while_a_deployment_is_in_progress() {
    let mut site = Site::new("");
    let text_config = std::fs::read_to_string(&site.config).unwrap();
    std::fs::write(&site.config, format!("{text_config}promote = {{ auto = false }}\n")).unwrap();
    site.start();
    site.deploy("v1");
    let daemon_pid = site.daemon.as_ref().unwrap().id();
    let out = site.cli(&["deploy", "web", "--version", "v2", "--no-wait"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        wait_until(Duration::from_secs(20), || text(&site.cli(&["status", "--json"]))
            .contains("ready to promote")),
        "v2 waits for promotion: {}",
        text(&site.cli(&["status"]))
    );
    let out = site.cli(&["upgrade"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("deployment 2 of v2 is in progress") && text(&out).contains("cutover abort web"),
        "{}",
        text(&out)
    );
    assert_eq!(site.daemon_pids(), vec![daemon_pid], "no new daemon was started");
    let out = site.cli(&["promote", "web"]);
    assert!(out.status.success(), "the deployment goes on: {}", text(&out));
    assert!(
        wait_until(Duration::from_secs(20), || get_once(site.front).as_deref()
            == Some("v2 green")),
        "v2 goes live"
    );
}
