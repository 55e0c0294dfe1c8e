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

/// The resident memory of a process, from /proc.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// Reads a request or response head byte by byte (so nothing after it is consumed); `None` if
/// the peer closes first.
fn read_head(s: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).ok()? == 0 {
            return None;
        }
        head.push(b[0]);
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// Bodies stream through the proxy process without piling up in it: 128 MiB each way, with the
/// receiving side not reading for a while, and the proxy's resident memory stays under 64 MiB.
#[test]
fn large_bodies_stream_through_without_being_buffered() {
    const SIZE: u64 = 128 << 20;
    const LIMIT_KIB: u64 = 64 << 10;
    let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
    let up = upstream.local_addr().unwrap();
    // A download it sends as fast as it may, an upload it reads only after a pause; anything
    // else (the readiness probe) gets a short answer.
    std::thread::spawn(move || {
        for conn in upstream.incoming() {
            let Ok(mut s) = conn else { return };
            std::thread::spawn(move || loop {
                // The proxy closes idle pooled connections: that ends this one.
                let Some(head) = read_head(&mut s) else { return };
                if head.starts_with("GET /big ") {
                    write!(s, "HTTP/1.1 200 OK\r\nContent-Length: {SIZE}\r\n\r\n").unwrap();
                    let chunk = vec![7u8; 64 << 10];
                    for _ in 0..SIZE / (64 << 10) {
                        s.write_all(&chunk).unwrap();
                    }
                } else if head.starts_with("POST /big ") {
                    assert!(
                        head.to_ascii_lowercase().contains(&format!("content-length: {SIZE}")),
                        "{head}"
                    );
                    std::thread::sleep(Duration::from_millis(1500));
                    let mut got = 0u64;
                    let mut buf = vec![0u8; 1 << 16];
                    while got < SIZE {
                        let n = s.read(&mut buf).unwrap();
                        assert!(n > 0, "upload broke off after {got} bytes");
                        got += n as u64;
                    }
                    let text = got.to_string();
                    write!(s, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{text}", text.len()).unwrap();
                } else {
                    s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").unwrap();
                }
            });
        }
    });
    let (p, front) = proxy(up, up);
    let pid = p.0.id();
    let idle = rss_kib(pid);

    // Download: the head, then nothing read for 1.5 s while the upstream pushes.
    let mut c = TcpStream::connect(front).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(c, "GET /big HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    let head = read_head(&mut c).expect("the download's head");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    std::thread::sleep(Duration::from_millis(1500));
    let stalled = rss_kib(pid);
    let mut got = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    let mut peak = stalled;
    while got < SIZE {
        let n = c.read(&mut buf).unwrap();
        assert!(n > 0, "download broke off after {got} bytes");
        got += n as u64;
        if got % (16 << 20) < n as u64 {
            peak = peak.max(rss_kib(pid));
        }
    }
    assert_eq!(got, SIZE);

    // Upload: 128 MiB sent while the upstream does not read for 1.5 s.
    let mut u = TcpStream::connect(front).unwrap();
    u.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut w = u.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        write!(w, "POST /big HTTP/1.1\r\nHost: test\r\nContent-Length: {SIZE}\r\n\r\n").unwrap();
        let chunk = vec![9u8; 64 << 10];
        for _ in 0..SIZE / (64 << 10) {
            w.write_all(&chunk).unwrap();
        }
    });
    std::thread::sleep(Duration::from_millis(1200));
    peak = peak.max(rss_kib(pid));
    writer.join().unwrap();
    let head = read_head(&mut u).expect("the upload's answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut answer = vec![0u8; SIZE.to_string().len()];
    u.read_exact(&mut answer).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&answer),
        SIZE.to_string(),
        "bytes the upstream got"
    );

    eprintln!("proxy resident memory: {idle} KiB idle, {stalled} KiB with the download unread, {peak} KiB at the most");
    assert!(
        stalled < LIMIT_KIB && peak < LIMIT_KIB,
        "resident memory: {idle} KiB idle, {stalled} KiB with the download unread, {peak} KiB at the most"
    );
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
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let err = std::thread::spawn(move || {
        let mut err = String::new();
        stderr.read_to_string(&mut err).unwrap();
        err
    });
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    let status = child.wait().unwrap();
    let err = err.join().unwrap();
    assert!(status.success(), "{out}{err}");
    // Each step is said once, not once by the daemon's log and again by the quickstart.
    let all = format!("{out}{err}");
    for step in ["deployment 2: all instances healthy", "live traffic switched to green"] {
        assert_eq!(all.matches(step).count(), 1, "{step:?} said once: {all}");
    }
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

/// A config with one static service (nothing to start) on a free port, in `dir`.
fn static_config(dir: &std::path::Path) -> std::path::PathBuf {
    let config = dir.join("cutover.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{}\"\nstate_dir = \"state\"\n\n[services.web]\n",
            free_port()
        ),
    )
    .unwrap();
    config
}

/// `cutover serve` with `flags`, stopped with SIGTERM once it answers; returns its stderr.
fn serve_stderr(config: &std::path::Path, flags: &[&str], env: &[(&str, &str)]) -> String {
    let mut child = Command::new(BIN)
        .args(flags)
        .args(["serve", "-c"])
        .arg(config)
        .envs(env.iter().copied())
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        stderr.read_to_string(&mut out).unwrap();
        out
    });
    let up = wait_until(Duration::from_secs(20), || {
        Command::new(BIN)
            .args(["status", "-c"])
            .arg(config)
            .output()
            .unwrap()
            .status
            .success()
    });
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let mut p = Proc(child);
    assert_eq!(p.wait_exit(Duration::from_secs(20)), Some(0));
    let out = reader.join().unwrap();
    assert!(up, "the daemon answered: {out}");
    out
}

#[test]
fn logs_into_a_pipe_carry_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let config = static_config(dir.path());
    let err = serve_stderr(&config, &[], &[]);
    assert!(err.contains("cutover serving on"), "{err}");
    assert!(!err.contains("\x1b["), "ANSI codes in redirected stderr: {err:?}");
}

#[test]
fn json_logs_are_json_on_every_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = static_config(dir.path());
    let err = serve_stderr(&config, &["--log-format", "json"], &[("NO_COLOR", "1")]);
    let lines: Vec<serde_json::Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}\n{err}")))
        .collect();
    let message = |v: &serde_json::Value| v["fields"]["message"].as_str().unwrap_or_default().to_string();
    assert!(
        lines.iter().any(|v| message(v).starts_with("cutover serving on ")),
        "{err}"
    );
    assert!(
        lines.iter().any(|v| message(v).starts_with("cutover stopping")),
        "{err}"
    );

    // A refusal, too, is one JSON line, and still exits 2.
    let out = Command::new(BIN)
        .args(["--log-format", "json", "status", "-c"])
        .arg(dir.path().join("missing.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let line: serde_json::Value = serde_json::from_str(err.trim()).unwrap_or_else(|e| panic!("{e}: {err:?}"));
    assert!(message(&line).contains("missing.toml not found"), "{err}");
    assert_eq!(line["level"], "ERROR", "{err}");
}

#[test]
fn config_example_prints_the_whole_commented_example() {
    let out = Command::new(BIN).args(["config", "example"]).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("# cutover.toml"), "{text}");
    for key in [
        "[server]",
        "listen",
        "state_dir",
        "health",
        "validate",
        "watch",
        "keep_warm",
        "webhooks",
    ] {
        assert!(text.contains(key), "the example mentions {key}");
    }
    // It is a config as it stands: the daemon accepts it (checked here by `logs`, which loads
    // and checks the file without a daemon).
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cutover.toml");
    std::fs::write(&config, &text).unwrap();
    let names: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("[services.")?.strip_suffix(']'))
        .collect();
    let service = names.first().expect("the example has a service");
    let out = Command::new(BIN)
        .args(["logs", service, "-c"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Processes whose working directory, executable, command line or an open file lies under `dir`
/// (the quickstart's instances write their logs there).
fn processes_using(dir: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let mut paths: Vec<std::path::PathBuf> = ["cwd", "exe"]
            .iter()
            .filter_map(|l| std::fs::read_link(entry.path().join(l)).ok())
            .collect();
        if let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) {
            paths.extend(fds.flatten().filter_map(|fd| std::fs::read_link(fd.path()).ok()));
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if paths.iter().any(|p| p.to_string_lossy().starts_with(dir)) || String::from_utf8_lossy(&cmdline).contains(dir)
        {
            pids.push(pid);
        }
    }
    pids
}

/// After a quickstart that was cut short: its directory and every process of it are gone (the
/// leftovers of a failure are killed so that they do not outlive the test).
fn assert_cleaned_up(dir: &str, what: &str) {
    let gone = wait_until(Duration::from_secs(10), || processes_using(dir).is_empty());
    let left = processes_using(dir);
    for pid in &left {
        let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
    }
    let dir_left = std::path::Path::new(dir).exists();
    let _ = std::fs::remove_dir_all(dir);
    assert!(gone, "{what}: processes of the quickstart left running: {left:?}");
    assert!(!dir_left, "{what}: {dir} left behind");
}

/// The quickstart's directory, from its second line of output (`  config DIR/cutover.toml`).
fn quickstart_dir(out: &str) -> String {
    let config = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("config "))
        .unwrap_or_else(|| panic!("no config line: {out}"));
    config.strip_suffix("/cutover.toml").unwrap().to_string()
}

#[test]
fn quickstart_cleans_up_when_its_output_closes() {
    // Eleven lines take it to the first release live with traffic on it: the next write finds
    // the pipe closed with blue's instances running. Three come before the daemon starts: the
    // write after them finds the pipe closed while the first release is being deployed.
    let scratch = tempfile::tempdir().unwrap();
    let status_file = scratch.path().join("status");
    for lines in [11, 3] {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "{{ '{BIN}' quickstart --phase 1s; echo $? > '{}'; }} | head -n {lines}",
                status_file.display()
            ))
            .output()
            .unwrap();
        let shown = String::from_utf8_lossy(&out.stdout);
        assert_eq!(shown.lines().count(), lines, "{shown}");
        let dir = quickstart_dir(&shown);
        assert_cleaned_up(&dir, &format!("quickstart | head -n {lines}"));
        let err = String::from_utf8_lossy(&out.stderr);
        let status = std::fs::read_to_string(&status_file).unwrap();
        // Stopped quietly, with the status of a command ended by SIGPIPE.
        assert_eq!(status.trim(), "141", "{err}");
        assert!(!err.contains("panicked") && !err.contains("error:"), "{err}");
    }
}

#[test]
fn quickstart_cleans_up_on_ctrl_c() {
    let mut child = Command::new(BIN)
        .args(["quickstart", "--phase", "5s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let mut quickstart = Proc(child);
    // Interrupted once the first release is live and traffic runs: instances on blue.
    let mut shown = String::new();
    let mut lines = std::io::BufReader::new(stdout);
    while !shown.contains("v1 live on blue") {
        let mut line = String::new();
        assert!(
            std::io::BufRead::read_line(&mut lines, &mut line).unwrap() > 0,
            "ended early: {shown}"
        );
        shown.push_str(&line);
    }
    let dir = quickstart_dir(&shown);
    let me = quickstart.0.id();
    let instances: Vec<u32> = processes_using(&dir).into_iter().filter(|&p| p != me).collect();
    assert!(
        instances.len() >= 2,
        "two demo instances run before the interrupt: {instances:?}"
    );
    quickstart.signal("INT");
    let code = quickstart.wait_exit(Duration::from_secs(30));
    assert_cleaned_up(&dir, "quickstart interrupted");
    let mut err = String::new();
    stderr.read_to_string(&mut err).unwrap();
    assert_eq!(code, Some(130), "{shown}{err}");
    assert!(
        err.contains("SIGINT: stopping the demo instances and removing"),
        "{err}"
    );
}
