//! Releases of several services switched as one: a real daemon, real demo apps, keep-alive
//! clients on both services.

mod common;

use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{
    cli_at, free_port, get_host, keep_alive_client, kill_marked, output_text, serve_marked, spawn_demo_app, wait_until,
    Proc, BIN,
};

struct Site {
    _daemon: Proc,
    marker: String,
    _dir: tempfile::TempDir,
    config: PathBuf,
    front: SocketAddr,
}

impl Drop for Site {
    fn drop(&mut self) {
        kill_marked(&self.marker);
    }
}

impl Site {
    /// A daemon with services `web` (host web.test) and `api` (host api.test), each with
    /// `service_extra` in its table.
    fn start(service_extra: &str) -> Site {
        Site::start_watching(service_extra, |_| "500ms")
    }

    /// [`Site::start`], each service watched as long as `watch(name)` says.
    fn start_watching(service_extra: &str, watch: impl Fn(&str) -> &'static str) -> Site {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let config = dir.path().join("cutover.toml");
        let service = |name: &str| {
            format!(
                "[services.{name}]\nhosts = [\"{name}.test\"]\n\
                 health = {{ path = \"/up\", interval = \"100ms\", healthy = 1, deadline = \"4s\" }}\n\
                 watch = {{ duration = \"{}\", min_requests = 1 }}\n{}\n",
                watch(name),
                service_extra.replace("NAME", name)
            )
        };
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"127.0.0.1:{port}\"\nstate_dir = \"state\"\n{}{}",
                service("web"),
                service("api")
            ),
        )
        .unwrap();
        let marker = format!("release-{}-{port}", std::process::id());
        let daemon = serve_marked(&config, &marker, &[]);
        Site {
            _daemon: Proc(daemon),
            marker: format!("CUTOVER_TEST_OWNER={marker}"),
            _dir: dir,
            config,
            front: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    fn cli(&self, args: &[&str]) -> Output {
        cli_at(&self.config, args)
    }

    fn get(&self, host: &str) -> Option<(u16, String)> {
        get_host(self.front, host)
    }
}

/// A keep-alive client asking web.test and api.test in turn (see `common::keep_alive_client`).
fn client(front: SocketAddr, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(Vec<String>, Vec<String>)> {
    keep_alive_client(front, &["web.test", "api.test"], stop)
}

/// In each client's sequence of answers (web and api in turn, one at a time): once one came
/// from `to`, none came from `from` (of either service).
fn never_back(seen: &[(Vec<String>, Vec<String>)], from: &str, to: &str) {
    for (n, (answers, failures)) in seen.iter().enumerate() {
        assert!(
            failures.is_empty(),
            "client {n} failed: {:?}",
            &failures[..failures.len().min(5)]
        );
        let first = answers
            .iter()
            .position(|a| a.starts_with(to))
            .unwrap_or_else(|| panic!("client {n} never saw {to}"));
        if let Some(back) = answers[first..].iter().position(|a| a.starts_with(from)) {
            panic!(
                "client {n} saw {:?} after {:?}: {:?}",
                answers[first + back],
                answers[first],
                &answers[first.saturating_sub(2)..(first + back + 2).min(answers.len())]
            );
        }
        assert!(
            answers[..first].iter().any(|a| a.starts_with(from)),
            "client {n} saw {from} first"
        );
    }
}

/// Two services released as one, under keep-alive load on both: after the switch no client sees
/// a v1 answer from either service once it has seen a v2 answer from either; the release's
/// rollback goes back the same way; history shows the release and its services.
#[test]
fn a_release_switches_several_services_in_one_store_and_rolls_back_the_same_way() {
    let site = Site::start("");
    let ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let _apps = [
        Proc(spawn_demo_app(ports[0], "v1", "web")),
        Proc(spawn_demo_app(ports[1], "v2", "web")),
        Proc(spawn_demo_app(ports[2], "v1", "api")),
        Proc(spawn_demo_app(ports[3], "v2", "api")),
    ];
    let up = |service: &str, port: u16| format!("--upstream={service}=127.0.0.1:{port}");
    let out = site.cli(&[
        "deploy",
        "web",
        "api",
        "--version",
        "v1",
        &up("web", ports[0]),
        &up("api", ports[2]),
    ]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(site.get("web.test"), Some((200, "v1 web".into())));
    assert_eq!(site.get("api.test"), Some((200, "v1 api".into())));

    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4).map(|_| client(site.front, stop.clone())).collect();
    std::thread::sleep(Duration::from_millis(300));
    let out = site.cli(&["deploy", "web=v2", "api=v2", &up("web", ports[1]), &up("api", ports[3])]);
    let said = output_text(&out);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("switched in one store") && said.contains("release 2 is live"),
        "{said}"
    );
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let seen: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    never_back(&seen, "v1", "v2");

    // The release's rollback: both back to v1 in one store, the same way.
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4).map(|_| client(site.front, stop.clone())).collect();
    std::thread::sleep(Duration::from_millis(300));
    let out = site.cli(&["releases", "--rollback", "2"]);
    assert!(out.status.success(), "{}", output_text(&out));
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let seen: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    never_back(&seen, "v2", "v1");
    assert_eq!(site.get("web.test"), Some((200, "v1 web".into())));
    assert_eq!(site.get("api.test"), Some((200, "v1 api".into())));

    let list = output_text(&site.cli(&["releases", "--json"]));
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    let two = list.as_array().unwrap().iter().find(|r| r["id"] == 2).unwrap();
    assert_eq!(two["status"], "rolled_back", "{two}");
    let services: Vec<&str> = two["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["service"].as_str().unwrap())
        .collect();
    assert_eq!(services, ["web", "api"], "{two}");
    // A deployment of one service is refused while a release holds it... and a release
    // touching a service being deployed is refused with a clear error.
    let slow = site.cli(&[
        "deploy",
        "web",
        "--version",
        "v3-unhealthy",
        "--no-wait",
        &format!("--upstream=127.0.0.1:{}", ports[1]),
    ]);
    assert!(slow.status.success(), "{}", output_text(&slow));
    let out = site.cli(&["deploy", "web=v2", "api=v2", &up("web", ports[1]), &up("api", ports[3])]);
    let said = output_text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("a deployment is in progress on web"), "{said}");
}

/// A release where one service fails its health check: nothing switched, and every service's
/// new instances are stopped, the healthy ones included.
#[test]
fn a_release_with_one_failing_service_switches_nothing_and_stops_every_new_instance() {
    let site = Site::start(&format!(
        "command = \"exec {BIN} demo-app --port {{port}} --colour NAME-$CUTOVER_COLOUR\"\ninstances = 2\n"
    ));
    let out = site.cli(&["deploy", "web", "api", "--version", "v1"]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(site.get("web.test"), Some((200, "v1 web-blue".into())));
    assert_eq!(site.get("api.test"), Some((200, "v1 api-blue".into())));
    let green = |name: &str| {
        let tag = format!("{name}-green");
        let mut n = 0;
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let (Ok(cmdline), Ok(env)) = (
                std::fs::read(entry.path().join("cmdline")),
                std::fs::read(entry.path().join("environ")),
            ) else {
                continue;
            };
            let has = |text: &[u8], what: &str| text.split(|b| *b == 0).any(|a| a == what.as_bytes());
            if has(&cmdline, &tag) && has(&env, &site.marker) {
                n += 1;
            }
        }
        n
    };

    let out = site.cli(&["deploy", "web=v2", "api=v2-unhealthy"]);
    let said = output_text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("release 2 aborted: service api"), "{said}");
    assert!(said.contains("not healthy within"), "{said}");
    assert_eq!(
        site.get("web.test"),
        Some((200, "v1 web-blue".into())),
        "nothing switched"
    );
    assert_eq!(site.get("api.test"), Some((200, "v1 api-blue".into())));
    for name in ["web", "api"] {
        assert!(
            wait_until(Duration::from_secs(15), || green(name) == 0),
            "{name}'s green instances still run: {}",
            green(name)
        );
    }
}

/// One service's watch failing after the switch rolls the whole release back.
#[test]
fn a_watch_failing_on_one_service_rolls_the_whole_release_back() {
    let site = Site::start("");
    let ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let _apps = [
        Proc(spawn_demo_app(ports[0], "v1", "web")),
        Proc(spawn_demo_app(ports[1], "v2", "web")),
        Proc(spawn_demo_app(ports[2], "v1", "api")),
        Proc(spawn_demo_app(ports[3], "v2-broken", "api")),
    ];
    let up = |service: &str, port: u16| format!("--upstream={service}=127.0.0.1:{port}");
    let out = site.cli(&[
        "deploy",
        "web",
        "api",
        "--version",
        "v1",
        &up("web", ports[0]),
        &up("api", ports[2]),
    ]);
    assert!(out.status.success(), "{}", output_text(&out));
    let stop = Arc::new(AtomicBool::new(false));
    let load = client(site.front, stop.clone());
    let out = site.cli(&[
        "deploy",
        "web=v2",
        "api=v2-broken",
        &up("web", ports[1]),
        &up("api", ports[3]),
    ]);
    let said = output_text(&out);
    stop.store(true, Ordering::Relaxed);
    let _ = load.join();
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("release 2 rolled back: service api"), "{said}");
    assert_eq!(site.get("web.test"), Some((200, "v1 web".into())));
    assert_eq!(site.get("api.test"), Some((200, "v1 api".into())));
    let list: serde_json::Value = serde_json::from_slice(&site.cli(&["releases", "--json"]).stdout).unwrap();
    assert_eq!(list[0]["status"], "rolled_back", "{list}");
    // A release of one static service takes its upstream without the service's name.
    let out = site.cli(&["deploy", "web=v2", &format!("--upstream=127.0.0.1:{}", ports[1])]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(site.get("web.test"), Some((200, "v2 web".into())));
}

/// Same-colour calls: the web app calls api through cutover with `CUTOVER_PEER_URL`,
/// `CUTOVER_PEER_TOKEN` and its own colour in `X-Cutover-Colour`. During a release's validation
/// green web reaches green api (its smoke test exercises the new stack end to end: it runs once
/// every service's new instances are healthy: api's start 1 s later than web's), while blue web,
/// live, reaches blue api; after the switch, the other way round. Asserted by the versions the
/// instances report.
#[test]
fn each_colour_of_a_release_calls_its_own_colour_of_the_other_services() {
    const WEB: &str = r#"
import http.server, os, urllib.request
version, colour = os.environ["CUTOVER_VERSION"], os.environ["CUTOVER_COLOUR"]
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        status, body = 200, b"ok"
        if self.path != "/up":
            req = urllib.request.Request(os.environ["CUTOVER_PEER_URL"] + "/", headers={
                "Host": "api.test",
                "X-Cutover-Preview": os.environ["CUTOVER_PEER_TOKEN"],
                "X-Cutover-Colour": colour,
            })
            try:
                api = urllib.request.urlopen(req, timeout=5).read().decode()
            except Exception as e:
                status, api = 502, f"failed: {e}"
            body = f"web {version} {colour} -> {api}".encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"#;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("web.py"), WEB).unwrap();
    let smoke_log = dir.path().join("smoke.log");
    let site = Site::start(&format!(
        "command = \"if [ NAME = web ]; then exec python3 {web}; else [ $CUTOVER_VERSION = v2 ] && sleep 1; exec {BIN} demo-app --port {{port}} --colour api-$CUTOVER_COLOUR; fi\"\n\
         instances = 1\n\
         validate = {{ smoke = 'curl -sf -H \"X-Cutover-Preview: $CUTOVER_PREVIEW_TOKEN\" -H \"Host: NAME.test\" \"$CUTOVER_PREVIEW_URL/\" >> {log} && echo >> {log}' }}\n",
        web = dir.path().join("web.py").display(),
        log = smoke_log.display(),
    ));
    let out = site.cli(&["deploy", "web", "api", "--version", "v1"]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(site.get("web.test"), Some((200, "web v1 blue -> v1 api-blue".into())));

    // v2 of both: while green is validated (held until both are), live blue web still calls
    // blue api; green web's smoke test called green api.
    let stop = Arc::new(AtomicBool::new(false));
    let load = client(site.front, stop.clone());
    let out = site.cli(&["deploy", "web", "api", "--version", "v2"]);
    stop.store(true, Ordering::Relaxed);
    let (answers, failures) = load.join().unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(failures.is_empty(), "{:?}", &failures[..failures.len().min(5)]);
    for a in answers.iter().filter(|a| a.starts_with("web")) {
        assert!(
            a == "web v1 blue -> v1 api-blue" || a == "web v2 green -> v2 api-green",
            "a web answer across colours: {a}"
        );
    }
    let smokes = std::fs::read_to_string(&smoke_log).unwrap();
    assert!(
        smokes.lines().any(|l| l == "web v2 green -> v2 api-green"),
        "green web's smoke test reached green api: {smokes}"
    );
    assert_eq!(site.get("web.test"), Some((200, "web v2 green -> v2 api-green".into())));
    // Without the token, the colour header selects nothing: live.
    let stream = TcpStream::connect(site.front).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    writer
        .write_all(b"GET / HTTP/1.1\r\nHost: api.test\r\nX-Cutover-Colour: blue\r\nConnection: close\r\n\r\n")
        .unwrap();
    assert_eq!(common::read_answer(&mut reader).unwrap(), (200, "v2 api-green".into()));
}

/// A service of a release deployed again while another service of it is still watched: not a
/// failure of the release (nothing rolled back), which goes live once the other's watch passes.
#[test]
fn a_service_deployed_again_during_the_release_watch_does_not_roll_the_others_back() {
    let site = Site::start_watching("", |name| if name == "api" { "3s" } else { "300ms" });
    let ports: Vec<u16> = (0..5).map(|_| free_port()).collect();
    let _apps = [
        Proc(spawn_demo_app(ports[0], "v1", "web")),
        Proc(spawn_demo_app(ports[1], "v2", "web")),
        Proc(spawn_demo_app(ports[2], "v1", "api")),
        Proc(spawn_demo_app(ports[3], "v2", "api")),
        Proc(spawn_demo_app(ports[4], "v3", "web")),
    ];
    let up = |service: &str, port: u16| format!("--upstream={service}=127.0.0.1:{port}");
    let out = site.cli(&[
        "deploy",
        "web",
        "api",
        "--version",
        "v1",
        &up("web", ports[0]),
        &up("api", ports[2]),
    ]);
    assert!(out.status.success(), "{}", output_text(&out));
    let out = site.cli(&[
        "deploy",
        "web=v2",
        "api=v2",
        &up("web", ports[1]),
        &up("api", ports[3]),
        "--no-wait",
    ]);
    assert!(out.status.success(), "{}", output_text(&out));
    let status = || {
        let list: serde_json::Value = serde_json::from_slice(&site.cli(&["releases", "--json"]).stdout).unwrap();
        list[0]["status"].as_str().unwrap_or_default().to_string()
    };
    // web's watch (300 ms) is over, api's (3 s) is not: web is deployed again meanwhile.
    let phase = |name: &str| {
        let st: serde_json::Value = serde_json::from_slice(&site.cli(&["status", "--json"]).stdout).unwrap_or_default();
        st["services"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == name)
            .and_then(|v| v["phase"].as_str().map(str::to_string))
            .unwrap_or_default()
    };
    assert!(
        wait_until(Duration::from_secs(10), || phase("web") == "stable"
            && phase("api") == "watching"),
        "web live on v2 while api is watched: web {}, api {}",
        phase("web"),
        phase("api")
    );
    assert_eq!(site.get("web.test"), Some((200, "v2 web".into())));
    let out = site.cli(&[
        "deploy",
        "web",
        "--version",
        "v3",
        &format!("--upstream=127.0.0.1:{}", ports[4]),
    ]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(
        site.get("api.test"),
        Some((200, "v2 api".into())),
        "api not rolled back"
    );
    assert_eq!(status(), "switched");
    assert!(
        wait_until(Duration::from_secs(10), || status() == "live"),
        "release {}",
        status()
    );
    assert_eq!(site.get("api.test"), Some((200, "v2 api".into())));
    assert_eq!(site.get("web.test"), Some((200, "v3 web".into())));
}

/// A service whose schema change outlasts another service's health deadline: the other's
/// healthy instances wait for it at the release's barrier (its own deadline does not end the
/// wait while the service it waits for is still on its way), and the release goes live.
#[test]
fn a_schema_change_longer_than_another_services_health_deadline_does_not_fail_the_release() {
    // api's expand takes 6 s; web's (and api's) health deadline is 4 s.
    let site = Site::start(&format!(
        "command = \"exec {BIN} demo-app --port {{port}} --colour NAME-$CUTOVER_COLOUR\"\n\
         migrate = {{ expand = \"[ NAME = api ] && sleep 6; true\" }}\n"
    ));
    let out = site.cli(&["deploy", "web", "api", "--version", "v1"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let out = site.cli(&["deploy", "web", "api", "--version", "v2"]);
    let said = output_text(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("still on its way"), "{said}");
    assert_eq!(site.get("web.test"), Some((200, "v2 web-green".into())));
    assert_eq!(site.get("api.test"), Some((200, "v2 api-green".into())));
}
