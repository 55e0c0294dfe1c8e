//! The dashboard in a real browser: headless Chromium driven through chromedriver (Debian's
//! `chromium` and `chromium-driver`, which `./scripts/test.sh` installs when missing). Signs in
//! with the token, watches a deploy started from the CLI, presses rollback and sees the page and
//! the traffic move back.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;
use common::*;

fn until<T>(within: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A W3C WebDriver session over plain HTTP.
struct Browser {
    driver: SocketAddr,
    session: String,
}

fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> std::io::Result<Value> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    // Read the head, then exactly Content-Length bytes: chromedriver may keep the connection open.
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let (head_end, length) = loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..pos]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            break (pos + 4, length);
        }
    };
    while buf.len() < head_end + length {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(serde_json::from_slice(&buf[head_end..(head_end + length).min(buf.len())]).unwrap_or(Value::Null))
}

impl Browser {
    fn start(driver: SocketAddr, profile: &Path) -> Browser {
        let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--window-size=1280,900", format!("--user-data-dir={}", profile.display())]}}}});
        let v = http(driver, "POST", "/session", Some(&caps)).expect("chromedriver answers");
        let session = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {v}"))
            .to_string();
        Browser { driver, session }
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let path = format!("/session/{}{path}", self.session);
        // WebDriver wants a JSON body on every POST, `{}` when there is nothing to say.
        let body = body.or_else(|| (method == "POST").then(|| json!({})));
        http(self.driver, method, &path, body.as_ref()).unwrap_or_else(|e| panic!("webdriver {method} {path}: {e}"))
            ["value"]
            .clone()
    }

    fn find(&self, css: &str) -> Option<String> {
        let v = self.call("POST", "/element", Some(json!({"using": "css selector", "value": css})));
        // W3C element reference; an error answer ("no such element") has no such key.
        v.get("element-6066-11e4-a52e-4f735466cecf")?
            .as_str()
            .map(str::to_string)
    }

    fn text(&self, css: &str) -> Option<String> {
        let id = self.find(css)?;
        self.call("GET", &format!("/element/{id}/text"), None)
            .as_str()
            .map(str::to_string)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = http(self.driver, "DELETE", &format!("/session/{}", self.session), None);
    }
}

fn get(addr: SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n").map(|(_, b)| b.trim().to_string())
}

#[test]
fn dashboard_follows_a_deploy_and_rolls_back() {
    for tool in ["/usr/bin/chromium", "/usr/bin/chromedriver"] {
        assert!(
            Path::new(tool).exists(),
            "{tool} is missing: install Debian's chromium and chromium-driver (./scripts/test.sh does)"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let (port, admin, driver_port) = (free_port(), free_port(), free_port());
    let token = "browser-test-token-0123456789abcdef";
    write_private(&dir.path().join("token"), token);
    let config = dir.path().join("cutover.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin = \"127.0.0.1:{admin}\"\ntoken_file = \"token\"\nstate_dir = \"state\"\n\
             [services.web]\ncommand = \"{BIN} demo-app --port {{port}}\"\ninstances = 2\n\
             health = {{ path = \"/up\", interval = \"100ms\", healthy = 1 }}\n\
             watch = {{ duration = \"4s\", min_requests = 1 }}\nkeep_warm = \"5m\"\n"
        ),
    )
    .unwrap();
    let _daemon = Stopping(spawn_serve(&config));
    let cli = |args: &[&str]| Command::new(BIN).args(args).arg("-c").arg(&config).output().unwrap();
    until(Duration::from_secs(20), "the daemon", || {
        cli(&["status"]).status.success().then_some(())
    });
    assert!(cli(&["deploy", "web", "--version", "v1"]).status.success());

    let _driver = Stopping(
        Command::new("/usr/bin/chromedriver")
            .arg(format!("--port={driver_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let driver = SocketAddr::from(([127, 0, 0, 1], driver_port));
    until(Duration::from_secs(20), "chromedriver", || {
        TcpStream::connect(driver).ok()
    });
    let b = Browser::start(driver, &dir.path().join("profile"));

    // Sign in with the token.
    b.call(
        "POST",
        "/url",
        Some(json!({"url": format!("http://127.0.0.1:{admin}/")})),
    );
    let field = until(Duration::from_secs(10), "the sign-in form", || {
        b.find("#login:not([hidden]) #token")
    });
    b.call("POST", &format!("/element/{field}/value"), Some(json!({"text": token})));
    let submit = b.find("#login-form button").unwrap();
    b.call("POST", &format!("/element/{submit}/click"), None);
    until(Duration::from_secs(10), "the live colour on the page", || {
        b.text("[data-service=web] [data-testid=live]")
            .filter(|t| t.contains("blue") && t.contains("v1"))
    });

    // Traffic, and a deploy from the CLI that the page follows step by step.
    let front = SocketAddr::from(([127, 0, 0, 1], port));
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            for _ in 0..100_000 {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let _ = get(front);
            }
        })
    };
    // A few traffic samples first, so that the charts have something to draw.
    std::thread::sleep(Duration::from_secs(4));
    let config2 = config.clone();
    let deploy = std::thread::spawn(move || {
        Command::new(BIN)
            .args(["deploy", "web", "--version", "v2", "-c"])
            .arg(&config2)
            .output()
            .unwrap()
    });
    until(Duration::from_secs(15), "the deployment's steps on the page", || {
        b.text("[data-service=web] [data-testid=steps]")
            .filter(|t| t.contains("started on green"))
    });
    until(Duration::from_secs(15), "green live on the page", || {
        b.text("[data-service=web] [data-testid=live]")
            .filter(|t| t.contains("green") && t.contains("v2"))
    });
    // Mid-deploy (watching the new colour): keep a picture of it.
    if let Some(png) = b.call("GET", "/screenshot", None).as_str() {
        let bytes = base64_decode(png);
        let _ = std::fs::write(
            Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-mid-deploy.png"),
            bytes,
        );
    }
    assert!(deploy.join().unwrap().status.success());
    assert_eq!(get(front).as_deref(), Some("v2 green"));

    // Rollback from the page: confirm, then the page and the traffic move back.
    // The page re-renders as events arrive, so a found button can go stale: find and click again
    // until the confirmation shows.
    until(Duration::from_secs(10), "the confirmation", || {
        if let Some(button) = b.find("[data-service=web] [data-testid=rollback]") {
            b.call("POST", &format!("/element/{button}/click"), None);
        }
        b.call("GET", "/alert/text", None)
            .as_str()
            .filter(|t| t.contains("Roll back web"))
            .map(str::to_string)
    });
    b.call("POST", "/alert/accept", Some(json!({})));
    until(Duration::from_secs(15), "blue live again on the page", || {
        b.text("[data-service=web] [data-testid=live]")
            .filter(|t| t.contains("blue") && t.contains("v1"))
    });
    until(Duration::from_secs(5), "traffic back on blue", || {
        (get(front).as_deref() == Some("v1 blue")).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    let history = String::from_utf8_lossy(&cli(&["history", "web"]).stdout).to_string();
    assert!(history.contains("rolled back"), "{history}");
}

/// Standard base64 (the screenshot's encoding), without padding checks.
fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for v in s.bytes().filter_map(val) {
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}
