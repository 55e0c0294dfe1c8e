//! The dashboard in a real browser: headless Chromium driven through chromedriver (Debian's
//! `chromium` and `chromium-driver`, which `./scripts/test.sh` installs when missing). The sign-in
//! page says nothing about a connection; signed in, a deployment already waiting for promotion
//! shows its steps so far; each service offers only the buttons that apply; the history has times.
//! Then it watches a deploy started from the CLI, presses rollback and sees the page and the
//! traffic move back.

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
    http_as(addr, method, path, body, "").map(|(_, v)| v)
}

/// An HTTP exchange with `headers` (whole lines) added; returns the status and the JSON body.
fn http_as(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
    headers: &str,
) -> std::io::Result<(u16, Value)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
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
    let status = String::from_utf8_lossy(&buf[..head_end])
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = serde_json::from_slice(&buf[head_end..(head_end + length).min(buf.len())]).unwrap_or(Value::Null);
    Ok((status, body))
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

    /// Runs `script` (a function body; `arguments` holds `args`) in the page; returns its value.
    fn script(&self, script: &str, args: Value) -> Value {
        self.call("POST", "/execute/sync", Some(json!({"script": script, "args": args})))
    }

    /// The phase a service's card shows and the `data-testid`s of its buttons, in page order, read
    /// at once (a card is drawn whole, so the two belong together).
    fn buttons(&self, service: &str) -> (String, Vec<String>) {
        let v = self.script(
            "const card = document.querySelector(`[data-service='${arguments[0]}']`);\
             return card && [card.querySelector('[data-testid=phase]').textContent,\
                             [...card.querySelectorAll('.actions button')].map(b => b.dataset.testid)]",
            json!([service]),
        );
        serde_json::from_value(v).unwrap_or_default()
    }
}

/// Run in every page before its own script: keeps each text the page shows (`__shown`) and each
/// event stream it opens (`__sources`), so that a test can tell what the page said in passing.
const RECORDER: &str = r#"
window.__shown = [];
new MutationObserver(() => { if (document.body) window.__shown.push(document.body.innerText); })
  .observe(document, { subtree: true, childList: true, characterData: true, attributes: true });
window.__sources = [];
const NativeEventSource = window.EventSource;
window.EventSource = class extends NativeEventSource {
  constructor(...args) { super(...args); window.__sources.push(this); }
};
"#;

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
    // `web` promotes itself; `manual`'s second release waits for a promote; `cold` retires the
    // previous colour at once, so that only a cold rollback is left.
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin = \"127.0.0.1:{admin}\"\ntoken_file = \"token\"\nstate_dir = \"state\"\n\
             [services.web]\ncommand = \"{BIN} demo-app --port {{port}}\"\ninstances = 2\n\
             health = {{ path = \"/up\", interval = \"100ms\", healthy = 1 }}\n\
             watch = {{ duration = \"4s\", min_requests = 1 }}\nkeep_warm = \"5m\"\n\
             [services.manual]\nhosts = [\"manual.test\"]\ncommand = \"{BIN} demo-app --port {{port}}\"\ninstances = 1\n\
             health = {{ path = \"/up\", interval = \"100ms\", healthy = 1 }}\npromote = {{ auto = false }}\n\
             [services.cold]\nhosts = [\"cold.test\"]\ncommand = \"{BIN} demo-app --port {{port}}\"\ninstances = 1\n\
             health = {{ path = \"/up\", interval = \"100ms\", healthy = 1 }}\n\
             watch = {{ duration = \"300ms\", min_requests = 1 }}\nkeep_warm = \"0s\"\n"
        ),
    )
    .unwrap();
    let _daemon = Stopping(spawn_serve(&config));
    let cli = |args: &[&str]| Command::new(BIN).args(args).arg("-c").arg(&config).output().unwrap();
    until(Duration::from_secs(20), "the daemon", || {
        cli(&["status"]).status.success().then_some(())
    });
    let deploys = |service: &str, versions: &[&str]| {
        versions
            .iter()
            .all(|v| cli(&["deploy", service, "--version", v]).status.success())
    };
    std::thread::scope(|s| {
        let web = s.spawn(|| deploys("web", &["v1"]));
        // A first release goes live at once; the second waits for a promote that never comes.
        let manual = s.spawn(|| {
            deploys("manual", &["v1"])
                && cli(&["deploy", "manual", "--version", "v2", "--no-wait"])
                    .status
                    .success()
        });
        let cold = s.spawn(|| deploys("cold", &["v1", "v2"]));
        assert!(web.join().unwrap() && manual.join().unwrap() && cold.join().unwrap());
    });
    let admin_addr = SocketAddr::from(([127, 0, 0, 1], admin));
    let bearer = format!("Authorization: Bearer {token}\r\n");
    let service = |name: &str| {
        http_as(admin_addr, "GET", &format!("/v1/services/{name}"), None, &bearer)
            .unwrap()
            .1
    };
    until(Duration::from_secs(15), "manual's v2 ready to promote", || {
        (service("manual")["phase"] == "ready to promote").then_some(())
    });
    until(Duration::from_secs(15), "cold's v1 retired", || {
        let cold = service("cold");
        (cold["phase"] == "stable" && cold["warm"].is_null() && cold["previous"] == "v1").then_some(())
    });
    // Its steps so far, through the API (as the page reads them); an unknown deployment is 404.
    let (code, steps) = http_as(admin_addr, "GET", "/v1/services/manual/deployments/2", None, &bearer).unwrap();
    assert_eq!(code, 200, "{steps}");
    let kinds: Vec<&str> = steps["steps"]
        .as_array()
        .unwrap_or_else(|| panic!("{steps}"))
        .iter()
        .filter_map(|s| s["kind"].as_str())
        .collect();
    assert_eq!(
        kinds,
        ["started", "healthy", "validated", "awaiting-promotion"],
        "{steps}"
    );
    assert!(steps["steps"][0]["at"].as_u64().is_some_and(|at| at > 0), "{steps}");
    let (code, _) = http_as(admin_addr, "GET", "/v1/services/manual/deployments/9", None, &bearer).unwrap();
    assert_eq!(code, 404);

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
    b.call(
        "POST",
        "/goog/cdp/execute",
        Some(json!({"cmd": "Page.addScriptToEvaluateOnNewDocument", "params": {"source": RECORDER}})),
    );

    // The sign-in page: no event stream is left open (one refused for want of a session is
    // closed), and nothing the page showed on the way spoke of reconnecting.
    b.call(
        "POST",
        "/url",
        Some(json!({"url": format!("http://127.0.0.1:{admin}/")})),
    );
    let field = until(Duration::from_secs(10), "the sign-in form", || {
        b.find("#login:not([hidden]) #token")
    });
    until(Duration::from_secs(10), "the page's event streams closed", || {
        b.script(
            "return window.__sources.every(s => s.readyState === EventSource.CLOSED)",
            json!([]),
        )
        .as_bool()
        .filter(|closed| *closed)
    });
    let shown = b.script(
        "return [...window.__shown, document.body.innerText].filter(t => /connecting/i.test(t))",
        json!([]),
    );
    assert_eq!(shown, json!([]), "the sign-in page spoke of a connection");

    // Sign in with the token.
    b.call("POST", &format!("/element/{field}/value"), Some(json!({"text": token})));
    let submit = b.find("#login-form button").unwrap();
    b.call("POST", &format!("/element/{submit}/click"), None);
    until(Duration::from_secs(10), "the live colour on the page", || {
        b.text("[data-service=web] [data-testid=live]")
            .filter(|t| t.contains("blue") && t.contains("v1"))
    });

    // Opened while manual's v2 waits: its steps so far are on the page, though the page heard
    // none of them happen.
    until(Duration::from_secs(10), "manual's steps so far on the page", || {
        b.text("[data-service=manual] [data-testid=steps]")
            .filter(|t| t.contains("started on green") && t.contains("waiting for `cutover promote manual`"))
    });
    // Only the buttons that apply: manual can be promoted or aborted; cold can be rolled back to
    // its previous release; web (stable, nothing warm, no earlier release) has nothing to promote,
    // abort or roll back to.
    let buttons = |service: &str, phase: &str, want: &[&str]| {
        let (shown, buttons) = b.buttons(service);
        (shown == phase && buttons == want).then_some(())
    };
    until(Duration::from_secs(10), "promote and abort for manual", || {
        buttons("manual", "ready to promote", &["promote", "abort"])
    });
    assert_eq!(b.buttons("web"), ("stable".to_string(), Vec::new()));
    assert_eq!(b.buttons("cold"), ("stable".to_string(), vec!["rollback".to_string()]));

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
    b.script(
        "document.querySelector('[data-service=web]').scrollIntoView()",
        json!([]),
    );
    if let Some(png) = b.call("GET", "/screenshot", None).as_str() {
        let bytes = base64_decode(png);
        let _ = std::fs::write(
            Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-mid-deploy.png"),
            bytes,
        );
    }
    assert!(deploy.join().unwrap().status.success());
    assert_eq!(get(front).as_deref(), Some("v2 green"));

    // Each step of v2's deployment was heard as it happened and read back with the status: it is
    // listed once.
    let steps = until(Duration::from_secs(10), "v2's last step on the page", || {
        b.text("[data-service=web] [data-testid=steps]")
            .filter(|t| t.contains("green@v2 is live"))
    });
    assert_eq!(steps.matches("of v2 started on green").count(), 1, "{steps}");
    assert_eq!(steps.matches("all instances healthy").count(), 1, "{steps}");

    // Stable with blue warm: rollback is the one button.
    until(Duration::from_secs(10), "rollback alone for web", || {
        buttons("web", "stable", &["rollback"])
    });
    // The history says when each deployment started and how long it took, or that it runs.
    let row = |service: &str, id: u32, cell: &str| {
        b.text(&format!(
            "[data-service={service}] [data-testid=history] tr[data-deployment='{id}'] [data-testid={cell}]"
        ))
    };
    until(Duration::from_secs(10), "web's history with times", || {
        let (started, took) = (row("web", 2, "started")?, row("web", 2, "took")?);
        let clock = started.split(|c: char| !c.is_ascii_digit() && c != ':').any(|w| {
            let parts: Vec<&str> = w.split(':').collect();
            parts.len() == 3 && parts.iter().all(|p| !p.is_empty())
        });
        // The watch (4 s) is part of it.
        let seconds = took.strip_suffix(" s").and_then(|n| n.parse::<f64>().ok());
        (clock && seconds.is_some_and(|s| s >= 4.0)).then_some(())
    });
    assert_eq!(row("manual", 2, "took").as_deref(), Some("running"));

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

    // A release (here of web alone) started from the page: listed there, and rolled back from it
    // in one store.
    let input = until(Duration::from_secs(5), "the release form", || {
        b.find("[data-testid=release-versions]")
    });
    b.call(
        "POST",
        &format!("/element/{input}/value"),
        Some(json!({ "text": "web=v3" })),
    );
    let deploy = until(Duration::from_secs(5), "the deploy button", || {
        b.find("[data-testid=release-deploy]")
    });
    b.call("POST", &format!("/element/{deploy}/click"), None);
    until(Duration::from_secs(15), "the release live on the page", || {
        b.text("[data-testid=releases] tr[data-release='1'] [data-testid=release-status]")
            .filter(|t| t == "live")
    });
    until(Duration::from_secs(10), "the release's confirmation", || {
        if let Some(button) = b.find("[data-testid=releases] tr[data-release='1'] [data-testid=release-rollback]") {
            b.call("POST", &format!("/element/{button}/click"), None);
        }
        b.call("GET", "/alert/text", None)
            .as_str()
            .filter(|t| t.contains("Roll back release 1"))
            .map(str::to_string)
    });
    b.call("POST", "/alert/accept", Some(json!({})));
    until(Duration::from_secs(15), "the release rolled back on the page", || {
        b.text("[data-testid=releases] tr[data-release='1'] [data-testid=release-status]")
            .filter(|t| t.starts_with("rolled back"))
    });
    until(Duration::from_secs(5), "web back on v1", || {
        (get(front).as_deref() == Some("v1 blue")).then_some(())
    });
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
