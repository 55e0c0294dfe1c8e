//! The `cutover` binary as a user runs it: real processes, real signals, real sockets.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::*;

/// A child process killed when dropped (a failing test leaves nothing behind).
impl Proc {
    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.0.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits for the process to exit, at most `within`; returns its exit code.
    fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// One HTTP/1.1 request on a fresh connection; returns (status, body).
fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

fn demo_app(version: &str, colour: &str) -> (Proc, SocketAddr) {
    let port = free_port();
    let child = spawn_demo_app(port, version, colour);
    let a = addr(port);
    assert!(
        wait_until(Duration::from_secs(10), || get(a, "/up")
            .map(|r| r.0 == 200)
            .unwrap_or(false)),
        "demo app up"
    );
    (Proc(child), a)
}

fn proxy(blue: SocketAddr, green: SocketAddr) -> (Proc, SocketAddr) {
    let port = free_port();
    let child = Command::new(BIN)
        .args([
            "proxy",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--blue",
            &blue.to_string(),
            "--green",
            &green.to_string(),
        ])
        .args(["--drain-timeout", "10s"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let a = addr(port);
    assert!(wait_until(Duration::from_secs(10), || get(a, "/").is_ok()), "proxy up");
    (Proc(child), a)
}

#[test]
fn sigusr1_switches_and_sigterm_finishes_in_flight_requests() {
    let (_blue, blue) = demo_app("v1", "blue");
    let (_green, green) = demo_app("v2", "green");
    let (mut p, front) = proxy(blue, green);
    assert_eq!(get(front, "/").unwrap(), (200, "v1 blue\n".to_string()));

    p.signal("USR1");
    assert!(wait_until(Duration::from_secs(5), || get(front, "/")
        .map(|r| r.1 == "v2 green\n")
        .unwrap_or(false)));

    // A slow request in flight when SIGTERM arrives still gets its whole answer.
    let slow = std::thread::spawn(move || get(front, "/?delay=1500"));
    std::thread::sleep(Duration::from_millis(300));
    p.signal("TERM");
    let (status, body) = slow.join().unwrap().unwrap();
    assert_eq!((status, body.as_str()), (200, "v2 green\n"));
    assert_eq!(
        p.wait_exit(Duration::from_secs(10)),
        Some(0),
        "clean exit after SIGTERM"
    );
    assert!(TcpStream::connect(front).is_err(), "listener closed");
}

#[test]
fn port_in_use_is_refused_with_exit_code_2() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let out = Command::new(BIN)
        .args([
            "proxy",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--blue",
            "127.0.0.1:1",
            "--green",
            "127.0.0.1:2",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("127.0.0.1:{port}")), "names the address: {err}");
}

#[test]
fn bad_flags_are_usage_errors() {
    let out = Command::new(BIN)
        .args([
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--blue",
            "nowhere",
            "--green",
            "127.0.0.1:2",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nowhere"));
    let out = Command::new(BIN)
        .args([
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--blue",
            "127.0.0.1:1",
            "--green",
            "127.0.0.1:2",
            "--drain-timeout",
            "soon",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("soon"));
}

#[test]
fn quickstart_reports_no_failed_request() {
    let mut child = Command::new(BIN)
        .args(["quickstart", "--phase", "1s"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{out}");
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with("failed"))
        .expect("report has a failed line");
    assert_eq!(line.split_whitespace().last(), Some("0"), "{out}");
    assert!(
        out.contains("served by v1 blue") && out.contains("served by v2 green"),
        "{out}"
    );
}
