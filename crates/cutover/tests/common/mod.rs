//! What the binary-level tests share: the binary, ports, waiting, children killed or stopped the
//! way an operator would, the daemon and demo app started from the binary, and a keep-alive
//! HTTP/1.1 exchange.

#![allow(dead_code)] // each test file uses a different part

pub mod site;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_cutover");

/// A loopback port nothing listens on, for a child process to bind later. Taken from below the
/// kernel's ephemeral range (32768 and up here), where the kernel never hands out ports of its
/// own: a port it gave to `bind(0)` could meanwhile go to another test's outgoing connection
/// before the child binds it. Each test process walks the range from its own starting point, so
/// two tests in one process never get the same port.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const COUNT: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let start = std::process::id().wrapping_mul(2_654_435_761) % COUNT;
    let _ = NEXT.compare_exchange(u32::MAX, start, Ordering::Relaxed, Ordering::Relaxed);
    for _ in 0..COUNT {
        let port = (FIRST + NEXT.fetch_add(1, Ordering::Relaxed) % COUNT) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {FIRST}..{}", FIRST + COUNT)
}

/// Polls `f` until it holds or `within` passes.
pub fn wait_until(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    false
}

/// Writes `text` to `path` readable by its owner only, as a token file must be.
pub fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A child process killed when dropped, with whatever it left running (see [`spawn_serve`]).
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        kill_left_behind(self.0.id());
    }
}

/// The marker (`CUTOVER_TEST_OWNER=...`) each daemon started by [`spawn_serve`] passes on to
/// the instances it starts, by the daemon's pid.
static OWNERS: std::sync::Mutex<std::collections::BTreeMap<u32, String>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// Kills (-9) every process that carries the marker of the daemon `pid` started by
/// [`spawn_serve`]: the instances a daemon leaves running when it stops, by design, for the
/// next start to adopt.
pub fn kill_left_behind(pid: u32) {
    let Some(marker) = OWNERS.lock().unwrap_or_else(|p| p.into_inner()).remove(&pid) else {
        return;
    };
    kill_marked(&marker);
}

/// On drop, kills (-9) every process whose environment holds the entry it names
/// (`NAME=value`): instances a test's daemon started and left running.
pub struct KillMarked(pub String);

impl Drop for KillMarked {
    fn drop(&mut self) {
        kill_marked(&self.0);
    }
}

/// Kills (-9) every process whose environment holds `marker` (`NAME=value`).
pub fn kill_marked(marker: &str) {
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(p) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(env) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if env.split(|&b| b == 0).any(|v| v == marker.as_bytes()) {
            let _ = Command::new("kill").args(["-KILL", &p.to_string()]).status();
        }
    }
}

/// `cutover demo-app` on `port`, its output discarded.
pub fn spawn_demo_app(port: u16, version: &str, colour: &str) -> Child {
    Command::new(BIN)
        .args([
            "demo-app",
            "--port",
            &port.to_string(),
            "--version",
            version,
            "--colour",
            colour,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// `cutover serve -c CONFIG`, its log discarded.
pub fn spawn_serve(config: &Path) -> Child {
    spawn_owned(
        Command::new(BIN)
            .args(["serve", "-c"])
            .arg(config)
            .stderr(Stdio::null()),
    )
}

/// Starts `cmd` (a daemon) with a marker of its own in its environment, which the instances
/// it starts inherit: [`Proc`] and [`Stopping`] kill them with it ([`kill_left_behind`]).
pub fn spawn_owned(cmd: &mut Command) -> Child {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let owner = format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let child = cmd.env("CUTOVER_TEST_OWNER", &owner).spawn().unwrap();
    OWNERS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(child.id(), format!("CUTOVER_TEST_OWNER={owner}"));
    child
}

/// `cutover serve -c CONFIG` that is expected to refuse to start: its output, once it exited
/// (within 20 s, or the test fails rather than waits for a daemon that did start).
pub fn serve_refused(config: &Path) -> std::process::Output {
    use std::io::Read;
    let child = Command::new(BIN)
        .args(["serve", "-c"])
        .arg(config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Proc(child);
    assert!(
        wait_until(Duration::from_secs(20), || child.0.try_wait().unwrap().is_some()),
        "serve exits"
    );
    let Proc(inner) = &mut child;
    let mut out = std::process::Output {
        status: inner.try_wait().unwrap().unwrap(),
        stdout: Vec::new(),
        stderr: Vec::new(),
    };
    inner.stdout.take().unwrap().read_to_end(&mut out.stdout).unwrap();
    inner.stderr.take().unwrap().read_to_end(&mut out.stderr).unwrap();
    out
}

/// A child process stopped with SIGTERM when dropped (SIGKILL if it lingers past 20 s).
pub struct Stopping(pub Child);

impl Drop for Stopping {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
        wait_until(Duration::from_secs(20), || self.0.try_wait().ok().flatten().is_some());
        let _ = self.0.kill();
        let _ = self.0.wait();
        kill_left_behind(self.0.id());
    }
}

/// One GET / on a keep-alive connection; returns the status and the body.
pub fn exchange(reader: &mut BufReader<TcpStream>, writer: &mut TcpStream) -> std::io::Result<(u16, String)> {
    exchange_at(reader, writer, "/")
}

/// One GET of `target` (path and query) on a keep-alive connection; returns the status and the body.
pub fn exchange_at(
    reader: &mut BufReader<TcpStream>,
    writer: &mut TcpStream,
    target: &str,
) -> std::io::Result<(u16, String)> {
    writer.write_all(format!("GET {target} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())?;
    read_answer(reader)
}

/// Reads one HTTP/1.1 answer with a Content-Length body; returns the status and the body, trimmed.
pub fn read_answer(reader: &mut impl BufRead) -> std::io::Result<(u16, String)> {
    read_response(reader).map(|(status, body, _)| (status, body))
}

/// [`read_answer`], and whether the answer closes the connection (`Connection: close`).
pub fn read_response(reader: &mut impl BufRead) -> std::io::Result<(u16, String, bool)> {
    let mut close = false;
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status: u16 = line
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut length = 0usize;
    loop {
        let mut h = String::new();
        reader.read_line(&mut h)?;
        if h == "\r\n" || h.is_empty() {
            break;
        }
        let lower = h.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
        if let Some(v) = lower.strip_prefix("connection:") {
            close |= v.trim() == "close";
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body)?;
    Ok((status, String::from_utf8_lossy(&body).trim().to_string(), close))
}

/// `cutover ARGS -c CONFIG`, run to its end.
pub fn cli_at(config: &Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).arg("-c").arg(config).output().unwrap()
}

/// A command's standard output, then its standard error.
pub fn output_text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// One `GET /` for `host` on a fresh connection (`Connection: close`): status and body.
pub fn get_host(addr: std::net::SocketAddr, host: &str) -> Option<(u16, String)> {
    let stream = TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut writer = stream.try_clone().ok()?;
    let mut reader = BufReader::new(stream);
    writer
        .write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())
        .ok()?;
    read_answer(&mut reader).ok()
}

/// `cutover serve -c CONFIG` with `CUTOVER_TEST_OWNER=owner` (which its instances inherit, for
/// [`kill_marked`]) and `envs`, its output discarded; returns once `cutover status` answers.
pub fn serve_marked(config: &Path, owner: &str, envs: &[(&str, String)]) -> Child {
    let child = Command::new(BIN)
        .args(["serve", "-c"])
        .arg(config)
        .env("CUTOVER_TEST_OWNER", owner)
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || cli_at(config, &["status"]).status.success()),
        "the daemon did not start"
    );
    child
}

/// A client sending `GET /` on keep-alive connections until `stop` (at most 60 s, 40000
/// requests), to each of `hosts` in turn: every answer's body in order, and the failures
/// (anything but 200). As HTTP clients do, it opens a new connection after `Connection: close`.
pub fn keep_alive_client(
    addr: std::net::SocketAddr,
    hosts: &'static [&'static str],
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(Vec<String>, Vec<String>)> {
    std::thread::spawn(move || {
        let (mut answers, mut failures) = (Vec::new(), Vec::new());
        let started = Instant::now();
        let mut conn: Option<(BufReader<TcpStream>, TcpStream)> = None;
        let mut n = 0usize;
        while !stop.load(std::sync::atomic::Ordering::Relaxed)
            && started.elapsed() < Duration::from_secs(60)
            && answers.len() < 40_000
        {
            if conn.is_none() {
                match TcpStream::connect(addr) {
                    Ok(s) => {
                        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                        conn = Some((BufReader::new(s.try_clone().unwrap()), s));
                    }
                    Err(e) => {
                        failures.push(format!("connect: {e}"));
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                }
            }
            let host = hosts[n % hosts.len()];
            n += 1;
            let (reader, writer) = conn.as_mut().unwrap();
            match writer
                .write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
                .and_then(|_| read_response(reader))
            {
                Ok((200, body, close)) => {
                    answers.push(body);
                    if close {
                        conn = None;
                    }
                }
                Ok((status, body, _)) => {
                    failures.push(format!("{host}: {status} {body}"));
                    conn = None;
                }
                Err(e) => {
                    failures.push(format!("{host}: {e}"));
                    conn = None;
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        (answers, failures)
    })
}
