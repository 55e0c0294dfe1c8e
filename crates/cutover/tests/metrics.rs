//! `/metrics` of a running daemon: scraped during load, its counters add up to the requests the
//! clients saw, split by colour across a switch.

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
    let _daemon = Stopping(
        Command::new(BIN)
            .args(["--log-format", "json", "serve", "--access-log", "-c"])
            .arg(&config)
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
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
            "0.25", "0.5", "1.0", "2.0", "4.0", "8.0", "16.0", "32.0", "60.0", "inf"
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
