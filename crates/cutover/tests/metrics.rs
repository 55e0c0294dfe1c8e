//! `/metrics` of a running daemon: scraped during load, its counters add up to the requests the
//! clients saw, split by colour across a switch; it is served as OpenMetrics or the 0.0.4 text as
//! the scraper's `Accept` asks, `promtool check metrics` passes the text, and a real Prometheus
//! scraping the TCP admin listener with the bearer token sums the requests per colour. The last
//! two need Debian's `prometheus` package (`./scripts/test.sh` installs it when missing).

use std::collections::BTreeMap;
use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;
use common::*;

fn scrape(socket: &Path) -> String {
    let mut s = UnixStream::connect(socket).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

/// The value of the sample with exactly these labels, 0 when absent.
fn sample(metrics: &str, name: &str, labels: &str) -> u64 {
    let prefix = format!("{name}{{{labels}}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().parse::<f64>().unwrap() as u64)
        .unwrap_or(0)
}

#[test]
fn counters_add_up_to_the_requests_sent_split_by_colour() {
    let dir = tempfile::tempdir().unwrap();
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = dir.path().join("cutover.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nstate_dir = \"state\"\n[services.web]\n\
             command = \"{BIN} demo-app --port {{port}}\"\ninstances = 2\n\
             health = {{ path = \"/up\", interval = \"100ms\", healthy = 1 }}\nwatch = {{ duration = \"500ms\", min_requests = 1 }}\n"
        ),
    )
    .unwrap();
    let log = dir.path().join("serve.log");
    let _daemon = Stopping(spawn_owned(
        Command::new(BIN)
            .args(["--log-format", "json", "serve", "--access-log", "-c"])
            .arg(&config)
            .stderr(std::fs::File::create(&log).unwrap()),
    ));
    let socket = dir.path().join("state/admin.sock");
    let cli = |args: &[&str]| Command::new(BIN).args(args).arg("-c").arg(&config).output().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cli(&["status"]).status.success() {
        assert!(Instant::now() < deadline, "daemon up");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(cli(&["deploy", "web", "--version", "v1"]).status.success());

    let front = SocketAddr::from(([127, 0, 0, 1], port));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut seen: BTreeMap<String, u64> = BTreeMap::new();
                let s = TcpStream::connect(front).unwrap();
                let mut reader = BufReader::new(s.try_clone().unwrap());
                let mut writer = s;
                for _ in 0..1_000_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let (status, body) = exchange(&mut reader, &mut writer).unwrap();
                    *seen.entry(format!("{status} {body}")).or_default() += 1;
                }
                seen
            })
        })
        .collect();

    // Scraped while traffic flows: well-formed and moving.
    std::thread::sleep(Duration::from_millis(300));
    let during = scrape(&socket);
    assert!(
        sample(
            &during,
            "cutover_requests_total",
            r#"service="web",colour="blue",class="2xx""#
        ) > 0,
        "{during}"
    );
    assert!(cli(&["deploy", "web", "--version", "v2"]).status.success());
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let mut seen: BTreeMap<String, u64> = BTreeMap::new();
    for c in clients {
        for (k, v) in c.join().unwrap() {
            *seen.entry(k).or_default() += v;
        }
    }
    let after = scrape(&socket);
    let blue = seen.get("200 v1 blue").copied().unwrap_or(0);
    let green = seen.get("200 v2 green").copied().unwrap_or(0);
    assert_eq!(
        blue + green,
        seen.values().sum::<u64>(),
        "every answer was a 200 from v1 or v2: {seen:?}"
    );
    assert!(blue > 0 && green > 0, "{seen:?}");
    assert_eq!(
        sample(
            &after,
            "cutover_requests_total",
            r#"service="web",colour="blue",class="2xx""#
        ),
        blue
    );
    assert_eq!(
        sample(
            &after,
            "cutover_requests_total",
            r#"service="web",colour="green",class="2xx""#
        ),
        green
    );
    assert_eq!(
        sample(
            &after,
            "cutover_request_duration_seconds_count",
            r#"service="web",colour="green""#
        ),
        green
    );
    assert_eq!(
        sample(
            &after,
            "cutover_requests_total",
            r#"service="web",colour="green",class="5xx""#
        ),
        0
    );
    // The histogram keeps its bounds (100 µs to 60 s, then infinity), cumulative, ending at the
    // count: the finer counting behind the watch's p99 is summed into them.
    let green_buckets: Vec<(&str, u64)> = after
        .lines()
        .filter_map(|l| l.strip_prefix(r#"cutover_request_duration_seconds_bucket{le=""#))
        .filter_map(|rest| rest.split_once(r#"",service="web",colour="green"} "#))
        .map(|(le, value)| (le, value.trim().parse::<f64>().unwrap() as u64))
        .collect();
    let bounds: Vec<&str> = green_buckets.iter().map(|(le, _)| *le).collect();
    assert_eq!(
        bounds,
        [
            "0.0001", "0.00025", "0.0005", "0.001", "0.002", "0.004", "0.008", "0.016", "0.032", "0.064", "0.125",
            "0.25", "0.5", "1.0", "2.0", "4.0", "8.0", "16.0", "32.0", "60.0", "+Inf"
        ],
        "{after}"
    );
    assert!(
        green_buckets.windows(2).all(|w| w[0].1 <= w[1].1),
        "cumulative: {green_buckets:?}"
    );
    assert_eq!(green_buckets.last().map(|(_, n)| *n), Some(green));
    assert_eq!(
        sample(&after, "cutover_live", r#"service="web",colour="green",version="v2""#),
        1
    );
    assert_eq!(
        sample(
            &after,
            "cutover_deployments_total",
            r#"service="web",result="went-live""#
        ),
        2
    );
    assert!(
        sample(&after, "cutover_switches_total", r#"service="web""#) >= 2,
        "{after}"
    );
    assert_eq!(
        after
            .matches("cutover_instance_healthy{service=\"web\",colour=\"green\"")
            .count(),
        2
    );

    // The JSON access log has a line per request, with its id, colour and status.
    let access: Vec<serde_json::Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "cutover::access")
        .collect();
    let green_lines = access.iter().filter(|v| v["fields"]["colour"] == "green").count() as u64;
    assert!(
        green_lines >= green,
        "{green_lines} access lines for green, {green} green answers"
    );
    let one = access.iter().find(|v| v["fields"]["colour"] == "green").unwrap();
    assert_eq!(one["fields"]["status"], 200);
    assert_eq!(one["fields"]["request_id"].as_str().map(str::len), Some(32));
    // Every deployment step and switch is a JSON line too.
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.lines()
            .any(|l| l.contains("\"kind\":\"switch\"") && l.contains("\"service\":\"web\"")),
        "switch lines"
    );
}

/// What Prometheus 2.42 sends in `Accept` when it scrapes.
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// `GET /metrics` on the admin socket with these extra header lines: the content type and body.
fn scrape_as(socket: &Path, headers: &str) -> (String, String) {
    let mut s = UnixStream::connect(socket).unwrap();
    s.write_all(format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n").as_bytes())
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    let content_type = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type:")
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default();
    (content_type, body.to_string())
}

/// A daemon serving the demo app as service `web` (watched for 200 ms), `[server]` extended by
/// `server_extra`: the daemon, the config's path and the proxy's address once its admin answers.
fn serve_web(dir: &Path, server_extra: &str) -> (Stopping, std::path::PathBuf, SocketAddr) {
    let port = free_port();
    let config = dir.join("cutover.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nstate_dir = \"state\"\n{server_extra}\n[services.web]\n\
             command = \"{BIN} demo-app --port {{port}}\"\ninstances = 1\n\
             health = {{ path = \"/up\", interval = \"100ms\", healthy = 1 }}\nwatch = {{ duration = \"200ms\" }}\n"
        ),
    )
    .unwrap();
    let daemon = Stopping(spawn_owned(
        Command::new(BIN)
            .args(["serve", "-c"])
            .arg(&config)
            .stderr(std::fs::File::create(dir.join("serve.log")).unwrap()),
    ));
    assert!(
        wait_until(Duration::from_secs(20), || cli(&config, &["status"]).status.success()),
        "daemon up"
    );
    (daemon, config, SocketAddr::from(([127, 0, 0, 1], port)))
}

fn cli(config: &Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).arg("-c").arg(config).output().unwrap()
}

/// Deploys `version` of `web` and sends `n` requests through the proxy, all answered 200 by it.
fn deploy_and_send(config: &Path, front: SocketAddr, version: &str, n: usize) {
    let out = cli(config, &["deploy", "web", "--version", version]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = TcpStream::connect(front).unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut writer = s;
    for _ in 0..n {
        let (status, body) = exchange(&mut reader, &mut writer).unwrap();
        assert_eq!(status, 200);
        assert!(body.starts_with(&format!("{version} ")), "{body}");
    }
}

fn promtool_check(body: &str) -> std::process::Output {
    let mut child = Command::new("/usr/bin/promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn prometheus_installed() {
    for tool in ["/usr/bin/promtool", "/usr/bin/prometheus"] {
        assert!(
            Path::new(tool).exists(),
            "{tool} is missing: install Debian's prometheus package (./scripts/test.sh does)"
        );
    }
}

#[test]
fn the_format_follows_accept_and_promtool_passes_the_text_format() {
    prometheus_installed();
    let dir = tempfile::tempdir().unwrap();
    let (_daemon, config, front) = serve_web(dir.path(), "");
    deploy_and_send(&config, front, "v1", 3);
    let socket = dir.path().join("state/admin.sock");

    // Without Accept, with one that does not name OpenMetrics, or that prefers the text: 0.0.4.
    for headers in [
        "",
        "Accept: */*\r\n",
        "Accept: text/plain;version=0.0.4\r\n",
        "Accept: text/plain, application/openmetrics-text;q=0.5\r\n",
    ] {
        let (content_type, text) = scrape_as(&socket, headers);
        assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8", "{headers:?}");
        let checked = promtool_check(&text);
        assert!(
            checked.status.success(),
            "promtool check metrics: {:?}\n{}{}\n{text}",
            checked.status,
            String::from_utf8_lossy(&checked.stdout),
            String::from_utf8_lossy(&checked.stderr)
        );
        assert!(text.contains("# TYPE cutover_requests_total counter\n"), "{text}");
        assert!(text.contains("# HELP cutover_switches_total "), "{text}");
        assert!(
            text.contains("# TYPE cutover_request_duration_seconds histogram\n"),
            "{text}"
        );
        assert!(!text.contains("# EOF") && !text.contains("# UNIT"), "{text}");
        assert!(
            text.contains(r#"cutover_request_duration_seconds_bucket{le="+Inf",service="web",colour="blue"} 3"#),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                "cutover_requests_total",
                r#"service="web",colour="blue",class="2xx""#
            ),
            3
        );
    }

    // Asked as Prometheus asks: OpenMetrics, which says so. (`promtool check metrics` reads only
    // the 0.0.4 text: it takes OpenMetrics' family names for counters without help text.)
    for accept in [PROMETHEUS_ACCEPT, "application/openmetrics-text"] {
        let (content_type, om) = scrape_as(&socket, &format!("Accept: {accept}\r\n"));
        assert_eq!(
            content_type,
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        );
        assert!(om.ends_with("\n# EOF\n"), "{om}");
        assert!(om.contains("# TYPE cutover_requests counter\n"), "{om}");
        assert!(!om.contains("# TYPE cutover_requests_total"), "{om}");
        assert_eq!(
            sample(
                &om,
                "cutover_requests_total",
                r#"service="web",colour="blue",class="2xx""#
            ),
            3
        );
        assert!(
            om.contains(r#"cutover_request_duration_seconds_bucket{le="+Inf",service="web",colour="blue"} 3"#),
            "{om}"
        );
    }
}

/// `GET target` on a fresh connection to `addr`: the status and the body (chunked or not).
fn http_get(addr: SocketAddr, target: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    let out = String::from_utf8_lossy(&out).into_owned();
    let (head, mut body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    if !head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        return Ok((status, body.to_string()));
    }
    let mut joined = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 || rest.len() < size {
            break;
        }
        joined.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    Ok((status, joined))
}

/// `query` percent-encoded for a URL's query string.
fn url_encoded(query: &str) -> String {
    query
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An instant query's result as colour -> value, or None while Prometheus cannot answer it.
fn per_colour(prometheus: SocketAddr, query: &str) -> Option<BTreeMap<String, u64>> {
    let (status, body) = http_get(prometheus, &format!("/api/v1/query?query={}", url_encoded(query))).ok()?;
    if status != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v["data"]["result"]
        .as_array()?
        .iter()
        .map(|r| {
            let colour = r["metric"]["colour"].as_str()?.to_string();
            let value = r["value"][1].as_str()?.parse::<f64>().ok()? as u64;
            Some((colour, value))
        })
        .collect()
}

#[test]
fn a_real_prometheus_scrapes_the_tcp_admin_listener_with_the_token_and_sums_per_colour() {
    prometheus_installed();
    let dir = tempfile::tempdir().unwrap();
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let token = dir.path().join("admin.token");
    write_private(&token, "0123456789abcdef0123456789abcdef");
    let (_daemon, config, front) = serve_web(
        dir.path(),
        &format!("admin = \"{admin}\"\ntoken_file = \"admin.token\""),
    );
    deploy_and_send(&config, front, "v1", 7);
    deploy_and_send(&config, front, "v2", 5);

    let prometheus = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let prometheus_config = dir.path().join("prometheus.yml");
    std::fs::write(
        &prometheus_config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: cutover\n    \
             authorization:\n      credentials_file: {}\n    static_configs:\n      - targets: [\"{admin}\"]\n",
            token.display()
        ),
    )
    .unwrap();
    let log = dir.path().join("prometheus.log");
    let _prometheus = Stopping(
        Command::new("/usr/bin/prometheus")
            .arg(format!("--config.file={}", prometheus_config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("tsdb").display()))
            .arg(format!("--web.listen-address={prometheus}"))
            .current_dir(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );

    let want = BTreeMap::from([("blue".to_string(), 7), ("green".to_string(), 5)]);
    let requests = r#"sum by (colour) (cutover_requests_total{service="web"})"#;
    // The histogram's last bucket is le="+Inf", as queries name it.
    let counted = r#"sum by (colour) (cutover_request_duration_seconds_bucket{service="web",le="+Inf"})"#;
    let mut seen = (None, None);
    let agreed = wait_until(Duration::from_secs(60), || {
        seen = (per_colour(prometheus, requests), per_colour(prometheus, counted));
        seen.0.as_ref() == Some(&want) && seen.1.as_ref() == Some(&want)
    });
    let targets = http_get(prometheus, "/api/v1/targets")
        .map(|(_, b)| b)
        .unwrap_or_default();
    assert!(
        agreed,
        "Prometheus answered {seen:?}, not {want:?}\ntargets: {targets}\nlog:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // It scraped the TCP listener, with the token, without an error.
    let targets: serde_json::Value = serde_json::from_str(&targets).unwrap();
    let target = &targets["data"]["activeTargets"][0];
    assert_eq!(target["scrapeUrl"], format!("http://{admin}/metrics"));
    assert_eq!(target["health"], "up", "{target}");
    assert_eq!(target["lastError"], "", "{target}");
    // In OpenMetrics, as it asked: it keeps the counters' metadata under their family's name,
    // where from the 0.0.4 text it would keep it under the samples' name (with `_total`).
    let (_, metadata) = http_get(prometheus, "/api/v1/metadata").unwrap();
    let metadata: serde_json::Value = serde_json::from_str(&metadata).unwrap();
    assert_eq!(metadata["data"]["cutover_requests"][0]["type"], "counter", "{metadata}");
    assert!(metadata["data"].get("cutover_requests_total").is_none(), "{metadata}");
}
