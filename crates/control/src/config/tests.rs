use super::*;
use std::net::{IpAddr, Ipv4Addr};

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, "cutover.toml")
}

/// Asserts that `text` is refused at `line:col` about `key`, with a message that contains
/// `words`, and that Display is exactly "cutover.toml:LINE:COL: KEY: ...".
#[track_caller]
fn refused(text: &str, line: usize, column: usize, key: &str, words: &str) -> String {
    let e = match parse(text) {
        Ok(_) => panic!("accepted, expected an error about {key}:\n{text}"),
        Err(e) => e,
    };
    let shown = e.to_string();
    let loc = e.location().expect("has a location");
    assert_eq!((loc.line, loc.column), (line, column), "{shown}");
    assert_eq!(e.key(), Some(key), "{shown}");
    assert!(
        shown.starts_with(&format!("cutover.toml:{line}:{column}: {key}: ")),
        "{shown}"
    );
    assert!(shown.contains(words), "{shown:?} does not contain {words:?}");
    shown
}

const MINIMAL: &str = "[services.web]\ncommand = \"./web --port {port}\"\n";

#[test]
fn example_parses() {
    let config = Config::example();
    assert_eq!(config.services.len(), 2);
    let web = config.service("web").unwrap();
    assert!(web.is_default());
    assert!(matches!(&web.driver, Driver::Process { instances: 2, .. }));
    assert!(web.validate.is_some());
    assert_eq!(config.service("api").unwrap().driver, Driver::Static);
    // The [proxy] section of the example claims to show the defaults.
    assert_eq!(config.proxy, ProxySettings::default());
    // [webhooks] is commented out.
    assert_eq!(config.webhooks, WebhooksConfig::default());
    assert!(config.webhooks.urls.is_empty());
}

#[test]
fn example_webhooks_table_parses_when_uncommented() {
    let start = EXAMPLE.find("# [webhooks]\n").expect("the example shows [webhooks]");
    let block: String = EXAMPLE[start..]
        .lines()
        .take_while(|l| l.starts_with("# "))
        .map(|l| format!("{}\n", &l[2..]))
        .collect();
    assert_eq!(block.lines().count(), 5, "{block}");
    let config = parse(&format!("{EXAMPLE}{block}")).unwrap();
    let hooks = config.webhooks;
    assert_eq!(hooks.urls.len(), 1);
    assert_eq!(hooks.urls[0].url, "http://127.0.0.1:9000/hook");
    // The example shows the defaults.
    assert_eq!(WebhooksConfig { urls: vec![], ..hooks }, WebhooksConfig::default());
}

#[test]
fn webhooks_defaults_and_partial_table() {
    let config = parse(&format!("{MINIMAL}[webhooks]\nurls = \"http://127.0.0.1:9000\"\n")).unwrap();
    let hooks = &config.webhooks;
    assert_eq!(hooks.timeout, Duration::from_secs(5));
    assert_eq!(hooks.retries, 3);
    assert_eq!(
        hooks.events,
        [
            EventKind::Started,
            EventKind::Promoted,
            EventKind::RolledBack,
            EventKind::Aborted
        ]
    );
    assert!(
        hooks.selects(EventKind::RolledBack)
            && !hooks.selects(EventKind::WentLive)
            && !hooks.selects(EventKind::Healthy)
    );
    assert_eq!(hooks.urls[0].target, "/");
    assert_eq!((hooks.urls[0].host.as_str(), hooks.urls[0].port), ("127.0.0.1", 9000));
    // An empty list turns webhooks off.
    assert!(parse(&format!("{MINIMAL}[webhooks]\nurls = []\n"))
        .unwrap()
        .webhooks
        .urls
        .is_empty());
    // One event as a string, dotted keys, IPv6, upper-case scheme.
    let config = parse(&format!(
        "webhooks.urls = [\"HTTP://[::1]:9000/h\"]\nwebhooks.events = \"aborted\"\n{MINIMAL}"
    ))
    .unwrap();
    assert_eq!(config.webhooks.events, [EventKind::Aborted]);
    let url = &config.webhooks.urls[0];
    assert_eq!(
        (url.host.as_str(), url.port, url.authority.as_str(), url.target.as_str()),
        ("::1", 9000, "[::1]:9000", "/h")
    );
    assert_eq!(url.to_string(), "HTTP://[::1]:9000/h");
}

#[test]
fn bad_webhook_urls() {
    let at = |v: &str| format!("{MINIMAL}[webhooks]\nurls = [\"http://127.0.0.1:9000/a\", {v}]\n");
    let shown = refused(
        &at("\"https://hooks.example.com/x\""),
        4,
        36,
        "webhooks.urls",
        "\"https://hooks.example.com/x\": https is not supported yet",
    );
    assert!(shown.contains("use an http:// URL"), "{shown}");
    refused(
        &at("\"ftp://h/x\""),
        4,
        36,
        "webhooks.urls",
        "\"ftp://h/x\" is not an http:// URL; write e.g. \"http://127.0.0.1:9000/hook\"",
    );
    refused(
        &at("\"hooks.example.com/x\""),
        4,
        36,
        "webhooks.urls",
        "is not an http:// URL",
    );
    refused(&at("\"http://\""), 4, 36, "webhooks.urls", "is not a valid URL");
    refused(
        &at("\"http://u:p@h/x\""),
        4,
        36,
        "webhooks.urls",
        "has a user name or password",
    );
    refused(&at("\"http://h/x#top\""), 4, 36, "webhooks.urls", "has a fragment");
    refused(
        &at("\"http://h:99999/\""),
        4,
        36,
        "webhooks.urls",
        "\"99999\" is not a port",
    );
    refused(&at("\"http://h:0/\""), 4, 36, "webhooks.urls", "\"0\" is not a port");
    refused(&at("\"http://h:/\""), 4, 36, "webhooks.urls", "\"\" is not a port");
    refused(
        &at("\"http://a..b/\""),
        4,
        36,
        "webhooks.urls",
        "\"a..b\" is not a host name",
    );
    refused(
        &at("\"http://[::g]/\""),
        4,
        36,
        "webhooks.urls",
        "is not an IPv6 address",
    );
    refused(&at("9000"), 4, 36, "webhooks.urls", "9000 is not a string");
    refused(
        &at("\"http://127.0.0.1:9000/a\""),
        4,
        36,
        "webhooks.urls",
        "is listed twice",
    );
    refused(
        &at("\"HTTP://127.0.0.1:9000/a\""),
        4,
        36,
        "webhooks.urls",
        "is the same endpoint as \"http://127.0.0.1:9000/a\"",
    );
    refused(
        &format!("{MINIMAL}[webhooks]\nurls = 5\n"),
        4,
        8,
        "webhooks.urls",
        "5 is not a string or a list of strings",
    );
}

#[test]
fn bad_webhook_settings() {
    let hooks = |rest: &str| format!("{MINIMAL}[webhooks]\nurls = [\"http://127.0.0.1:9000\"]\n{rest}\n");
    refused(
        &format!("{MINIMAL}\n[webhooks]\ntimeout = \"5s\"\n"),
        4,
        2,
        "webhooks.urls",
        "missing: [webhooks] needs the URLs to notify",
    );
    refused(&hooks("timeout = \"0s\""), 5, 11, "webhooks.timeout", "is zero");
    refused(&hooks("timeout = 5"), 5, 11, "webhooks.timeout", "5 is not a duration");
    refused(
        &hooks("retries = 11"),
        5,
        11,
        "webhooks.retries",
        "11 is too large; write a whole number from 0 to 10",
    );
    refused(&hooks("retries = -1"), 5, 11, "webhooks.retries", "-1 is too small");
    let shown = refused(
        &hooks("events = [\"started\", \"rolledback\"]"),
        5,
        22,
        "webhooks.events",
        "\"rolledback\" is not an event (did you mean \"rolled-back\"?)",
    );
    assert!(
        shown.contains("the events are started, migration, instances, healthy, unhealthy, "),
        "{shown}"
    );
    refused(
        &hooks("events = [\"aborted\", \"aborted\"]"),
        5,
        22,
        "webhooks.events",
        "\"aborted\" is listed twice",
    );
    refused(&hooks("events = []"), 5, 10, "webhooks.events", "the list is empty");
    refused(
        &hooks("event = [\"aborted\"]"),
        5,
        1,
        "webhooks.event",
        "did you mean \"events\"?",
    );
    refused(
        &format!("webhooks = \"http://127.0.0.1:9000\"\n{MINIMAL}"),
        1,
        12,
        "webhooks",
        "expected a table, e.g. [webhooks]",
    );
}

#[test]
fn full_config_round_trips() {
    let text = r#"
[server]
listen = ["0.0.0.0:8080", "[::]:8443"]
preview_listen = "127.0.0.1:8081"
admin = "127.0.0.1:9901"
token_file = "secrets/admin.token"
state_dir = "/var/lib/cutover"
workers = 2

[proxy]
client_header_timeout = "5s"
idle_timeout = "2m"
send_timeout = "45s"
connect_timeout = "250ms"
upstream_timeout = "30s"
upstream_idle_timeout = "20s"
upstream_pool_size = 0
max_connections = 500
max_header_bytes = 8192
shutdown_timeout = "0s"
retry_idempotent = false
preempt_interval = "0s"
trusted_proxies = ["10.0.0.0/8", "::1"]
proxy_protocol = true

[services.web]
hosts = ["Shop.Example.com", "www.example.com"]
command = "./web --port {port}"
instances = 3
health = { path = "/up", interval = "2s", timeout = "1s", healthy = 1, unhealthy = 5, deadline = "90s" }
drain_timeout = "45s"
close_window = "10s"
keep_warm = "30m"
validate = { smoke = "./smoke.sh", timeout = "90s" }
promote = { auto = true, delay = "1m" }
watch = { duration = "10m", max_error_rate = 0.05, max_p99 = "750ms", min_requests = 20 }
balance = "round-robin"

[services.admin-ui]
promote = { auto = false }
watch = { max_error_rate = 0 }

[webhooks]
urls = ["http://127.0.0.1:9000/hook", "http://hooks.internal/cutover?token=abc"]
timeout = "2s"
retries = 0
events = ["went-live", "rolled-back"]
"#;
    let config = parse(text).unwrap();
    let expected = Config {
        server: ServerConfig {
            listen: vec!["0.0.0.0:8080".parse().unwrap(), "[::]:8443".parse().unwrap()],
            preview_listen: vec!["127.0.0.1:8081".parse().unwrap()],
            admin: Admin::Tcp(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9901)),
            token_file: Some(PathBuf::from("secrets/admin.token")),
            state_dir: PathBuf::from("/var/lib/cutover"),
            workers: 2,
            listen_tls: vec![],
            preview_listen_tls: vec![],
            tls: None,
            admin_tls: None,
            admin_plaintext: false,
        },
        proxy: ProxySettings {
            client_header_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(120),
            send_timeout: Duration::from_secs(45),
            connect_timeout: Duration::from_millis(250),
            upstream_timeout: Duration::from_secs(30),
            upstream_idle_timeout: Duration::from_secs(20),
            upstream_pool_size: 0,
            max_connections: 500,
            max_header_bytes: 8192,
            shutdown_timeout: Duration::ZERO,
            retry_idempotent: false,
            preempt_interval: Duration::ZERO,
            tls_handshake_timeout: Duration::from_secs(10),
            trusted_proxies: vec![
                cutover_proxy::Cidr::parse("10.0.0.0/8").unwrap(),
                cutover_proxy::Cidr::parse("::1").unwrap(),
            ],
            proxy_protocol: true,
        },
        services: vec![
            ServiceConfig {
                name: "admin-ui".to_string(),
                hosts: vec![],
                driver: Driver::Static,
                health: HealthConfig::default(),
                drain_timeout: Duration::from_secs(30),
                close_window: Duration::from_secs(5),
                keep_warm: Duration::from_secs(3600),
                validate: None,
                promote: PromoteConfig {
                    auto: false,
                    delay: Duration::ZERO,
                    ..PromoteConfig::default()
                },
                watch: WatchConfig {
                    max_error_rate: 0.0,
                    ..WatchConfig::default()
                },
                balance: Balance::LeastInFlight,
                tls: None,
                https_redirect: false,
                upstream_tls: None,
                affinity: None,
                migrate: None,
            },
            ServiceConfig {
                name: "web".to_string(),
                hosts: vec!["shop.example.com".to_string(), "www.example.com".to_string()],
                driver: Driver::Process {
                    command: "./web --port {port}".to_string(),
                    instances: 3,
                },
                health: HealthConfig {
                    path: "/up".to_string(),
                    interval: Duration::from_secs(2),
                    timeout: Duration::from_secs(1),
                    healthy: 1,
                    unhealthy: 5,
                    deadline: Duration::from_secs(90),
                    host: Some("shop.example.com".to_string()),
                },
                drain_timeout: Duration::from_secs(45),
                close_window: Duration::from_secs(10),
                keep_warm: Duration::from_secs(1800),
                validate: Some(ValidateConfig {
                    smoke: "./smoke.sh".to_string(),
                    timeout: Duration::from_secs(90),
                    mirror: None,
                }),
                promote: PromoteConfig {
                    auto: true,
                    delay: Duration::from_secs(60),
                    ..PromoteConfig::default()
                },
                watch: WatchConfig {
                    duration: Duration::from_secs(600),
                    max_error_rate: 0.05,
                    max_p99: Some(Duration::from_millis(750)),
                    min_requests: 20,
                },
                balance: Balance::RoundRobin,
                tls: None,
                https_redirect: false,
                upstream_tls: None,
                affinity: None,
                migrate: None,
            },
        ],
        fleet: None,
        webhooks: WebhooksConfig {
            urls: vec![
                WebhookUrl {
                    url: "http://127.0.0.1:9000/hook".to_string(),
                    host: "127.0.0.1".to_string(),
                    port: 9000,
                    authority: "127.0.0.1:9000".to_string(),
                    target: "/hook".to_string(),
                },
                WebhookUrl {
                    url: "http://hooks.internal/cutover?token=abc".to_string(),
                    host: "hooks.internal".to_string(),
                    port: 80,
                    authority: "hooks.internal".to_string(),
                    target: "/cutover?token=abc".to_string(),
                },
            ],
            timeout: Duration::from_secs(2),
            retries: 0,
            events: vec![EventKind::WentLive, EventKind::RolledBack],
        },
        dir: PathBuf::new(),
    };
    assert_eq!(config, expected);

    let proxy = config.proxy_config();
    let listeners: Vec<_> = proxy
        .listeners
        .iter()
        .map(|l| (l.addr.to_string(), l.preview))
        .collect();
    assert_eq!(
        listeners,
        [
            ("0.0.0.0:8080".to_string(), false),
            ("[::]:8443".to_string(), false),
            ("127.0.0.1:8081".to_string(), true)
        ]
    );
    assert_eq!(
        (proxy.workers, proxy.max_connections, proxy.retry_idempotent),
        (2, 500, false)
    );
}

#[test]
fn minimal_config_gets_every_default() {
    let config = parse(MINIMAL).unwrap();
    assert_eq!(
        config.server,
        ServerConfig {
            listen: vec!["0.0.0.0:8080".parse().unwrap()],
            preview_listen: vec![],
            admin: Admin::Unix(PathBuf::from(".cutover/admin.sock")),
            token_file: None,
            state_dir: PathBuf::from(".cutover"),
            workers: 1,
            listen_tls: vec![],
            preview_listen_tls: vec![],
            tls: None,
            admin_tls: None,
            admin_plaintext: false,
        }
    );
    assert_eq!(config.proxy, ProxySettings::default());
    let web = &config.services[0];
    assert_eq!(config.services.len(), 1);
    assert_eq!(web.name, "web");
    assert!(web.is_default());
    assert_eq!(
        web.driver,
        Driver::Process {
            command: "./web --port {port}".to_string(),
            instances: 1
        }
    );
    assert_eq!(
        web.health,
        HealthConfig {
            path: "/".to_string(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            healthy: 2,
            unhealthy: 3,
            deadline: Duration::from_secs(60),
            host: None,
        }
    );
    assert_eq!(web.drain_timeout, Duration::from_secs(30));
    assert_eq!(web.close_window, Duration::from_secs(5));
    assert_eq!(web.keep_warm, Duration::from_secs(3600));
    assert_eq!(web.validate, None);
    assert_eq!(
        web.promote,
        PromoteConfig {
            auto: true,
            delay: Duration::ZERO,
            ..PromoteConfig::default()
        }
    );
    assert_eq!(
        web.watch,
        WatchConfig {
            duration: Duration::from_secs(300),
            max_error_rate: 0.01,
            max_p99: None,
            min_requests: 100
        }
    );
    assert_eq!(web.balance, Balance::LeastInFlight);
}

#[test]
fn partial_tables_keep_the_other_defaults() {
    let config = parse(
        "[server]\nstate_dir = \"run\"\n[services.web]\ncommand = \"x\"\nhealth = { interval = \"100ms\" }\n\
             validate = { smoke = \"true\" }\nwatch = { max_p99 = \"1s\" }\n",
    )
    .unwrap();
    // The admin socket follows state_dir; the health timeout follows the interval.
    assert_eq!(config.server.admin, Admin::Unix(PathBuf::from("run/admin.sock")));
    let web = &config.services[0];
    assert_eq!(web.health.interval, Duration::from_millis(100));
    assert_eq!(web.health.timeout, Duration::from_millis(50));
    assert_eq!(web.health.path, "/");
    assert_eq!(web.validate.as_ref().unwrap().timeout, Duration::from_secs(60));
    assert_eq!(web.watch.max_p99, Some(Duration::from_secs(1)));
    assert_eq!(web.watch.duration, Duration::from_secs(300));
}

#[test]
fn service_without_command_is_static() {
    let config = parse("[services.api]\nhosts = \"api.example.com\"\n").unwrap();
    assert_eq!(config.services[0].driver, Driver::Static);
    assert_eq!(config.services[0].hosts, ["api.example.com"]);
}

#[test]
fn command_without_port_placeholder_is_accepted() {
    // The port is also in $PORT, which many frameworks read by themselves.
    let config = parse("[services.web]\ncommand = \"bundle exec puma\"\n").unwrap();
    assert!(matches!(&config.services[0].driver, Driver::Process { command, .. } if command == "bundle exec puma"));
}

#[test]
fn dotted_keys_are_read_and_located() {
    let config = parse("services.web.command = \"./web\"\nservices.web.health.path = \"/up\"\n").unwrap();
    assert_eq!(config.services[0].health.path, "/up");
    refused(
        "services.web.command = \"./web\"\nservices.web.health.interval = \"1 s\"\n",
        2,
        32,
        "services.web.health.interval",
        "is not a duration",
    );
}

#[test]
fn syntax_errors_have_position_and_key() {
    let shown = refused_syntax("[services.web]\ncommand = ./web\n", 2, 11);
    assert_eq!(shown.1.as_deref(), Some("services.web.command"));
    assert!(
        shown
            .0
            .contains("cutover.toml:2:11: services.web.command: invalid TOML: "),
        "{}",
        shown.0
    );
    assert!(shown.0.contains("text values need quotes"), "{}", shown.0);

    let shown = refused_syntax("[services.web]\ncommand = \"a\"\ncommand = \"b\"\n", 3, 1);
    assert!(shown.0.contains("duplicate key `command`"), "{}", shown.0);
    assert!(shown.0.contains("may appear once"), "{}", shown.0);
    assert!(!shown.0.contains("need quotes"), "{}", shown.0);
    assert_eq!(shown.1.as_deref(), Some("services.web"));

    let shown = refused_syntax("[services.web\n", 1, 14);
    assert_eq!(shown.1, None);
    assert!(shown.0.starts_with("cutover.toml:1:14: invalid TOML: "), "{}", shown.0);
}

/// (Display, key) of a syntax error at line:col.
#[track_caller]
fn refused_syntax(text: &str, line: usize, column: usize) -> (String, Option<String>) {
    match parse(text) {
        Err(e @ ConfigError::Syntax { .. }) => {
            let loc = e.location().unwrap();
            assert_eq!((loc.line, loc.column), (line, column), "{e}");
            (e.to_string(), e.key().map(str::to_string))
        }
        other => panic!("expected a syntax error, got {other:?}"),
    }
}

#[test]
fn unknown_keys_are_refused_with_a_suggestion() {
    let shown = refused(
        "[services.web]\ncommand = \"x\"\nhelth = { path = \"/up\" }\n",
        3,
        1,
        "services.web.helth",
        "unknown key \"helth\"",
    );
    assert!(shown.contains("did you mean \"health\"?"), "{shown}");
    assert!(shown.contains("command, instances, health"), "{shown}");
    refused(
        "[services.web]\ncommand = \"x\"\nhealth = { path = \"/up\", intervall = \"1s\" }\n",
        3,
        26,
        "services.web.health.intervall",
        "did you mean \"interval\"?",
    );
    refused(
        "[servers]\nlisten = \"0.0.0.0:80\"\n",
        1,
        2,
        "servers",
        "did you mean \"server\"?",
    );
    refused(
        &format!("{MINIMAL}[proxy]\nmax_conns = 5\n"),
        4,
        1,
        "proxy.max_conns",
        "unknown key",
    );
}

#[test]
fn wrong_table_types_name_the_key() {
    refused(
        "[services.web]\ncommand = \"x\"\nhealth = \"/up\"\n",
        3,
        10,
        "services.web.health",
        "expected a table, e.g. health = {",
    );
    refused("services = 3\n", 1, 12, "services", "invalid type");
}

#[test]
fn bad_durations() {
    let at =
        |value: &str| format!("[services.web]\ncommand = \"x\"\nhealth = {{ path = \"/up\", interval = {value} }}\n");
    let shown = refused(
        &at("\"5 sec\""),
        3,
        37,
        "services.web.health.interval",
        "\"5 sec\" is not a duration; write a whole number followed by us, ms, s, m or h, e.g. \"500ms\"",
    );
    assert_eq!(
        shown,
        "cutover.toml:3:37: services.web.health.interval: \"5 sec\" is not a duration; write a whole number \
             followed by us, ms, s, m or h, e.g. \"500ms\""
    );
    refused(
        &at("\"1.5s\""),
        3,
        37,
        "services.web.health.interval",
        "\"1.5s\" is not a duration",
    );
    refused(
        &at("\"-1s\""),
        3,
        37,
        "services.web.health.interval",
        "\"-1s\" is not a duration",
    );
    refused(
        &at("\"10\""),
        3,
        37,
        "services.web.health.interval",
        "\"10\" is not a duration",
    );
    refused(
        &at("\"5d\""),
        3,
        37,
        "services.web.health.interval",
        "\"5d\" is not a duration",
    );
    refused(
        &at("5"),
        3,
        37,
        "services.web.health.interval",
        "5 is not a duration; write a quoted whole number",
    );
    refused(
        &at("\"0s\""),
        3,
        37,
        "services.web.health.interval",
        "\"0s\" is zero; write a duration longer than 0",
    );
    refused(
        &at("\"99999999999999999999h\""),
        3,
        37,
        "services.web.health.interval",
        "too long a duration",
    );
    refused(
        &at("1979-05-27"),
        3,
        37,
        "services.web.health.interval",
        "1979-05-27 is not a duration",
    );
    refused(
        "[services.web]\ndrain_timeout = \"30 s\"\n",
        2,
        17,
        "services.web.drain_timeout",
        "not a duration",
    );
    refused(
        &format!("{MINIMAL}[proxy]\nconnect_timeout = \"0ms\"\n"),
        4,
        19,
        "proxy.connect_timeout",
        "is zero",
    );
    refused(
        &format!("{MINIMAL}[proxy]\npreempt_interval = \"2s\"\n"),
        4,
        20,
        "proxy.preempt_interval",
        "\"2s\" is too long to make a difference",
    );
    refused(
        &format!("{MINIMAL}[proxy]\npreempt_interval = 1\n"),
        4,
        20,
        "proxy.preempt_interval",
        "1 is not a duration",
    );
    // Zero is allowed here: it turns the points off.
    let config = parse(&format!("{MINIMAL}[proxy]\npreempt_interval = \"0s\"\n")).unwrap();
    assert_eq!(config.proxy.preempt_interval, Duration::ZERO);
    assert_eq!(config.proxy_config().preempt_interval, Duration::ZERO);
}

#[test]
fn parse_duration_units() {
    assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
    assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
    assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
    assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    assert_eq!(parse_duration("500us"), Ok(Duration::from_micros(500)));
    for bad in ["", "s", "5", " 5s", "5s ", "5 sec", "1.5s", "-1s", "+1s", "5S", "1h30m"] {
        assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
    }
}

#[test]
fn bad_addresses() {
    refused(
        "[server]\nlisten = \"localhost:8080\"\n",
        2,
        10,
        "server.listen",
        "is not an address; write IP:PORT",
    );
    refused(
        "[server]\nlisten = [\"0.0.0.0:8080\",\n  \":9090\"]\n",
        3,
        3,
        "server.listen",
        "\":9090\" is not an address",
    );
    refused(
        "[server]\nlisten = [\"0.0.0.0:8080\", 8080]\n",
        2,
        27,
        "server.listen",
        "8080 is not a string",
    );
    refused(
        "[server]\nlisten = 8080\n",
        2,
        10,
        "server.listen",
        "8080 is not a string or a list of strings",
    );
    refused(
        "[server]\npreview_listen = \"127.0.0.1\"\n",
        2,
        18,
        "server.preview_listen",
        "is not an address",
    );
    refused(
        "[server]\nadmin = \"localhost:9901\"\n",
        2,
        9,
        "server.admin",
        "write \"unix:PATH\" for a unix socket or IP:PORT",
    );
    refused("[server]\nadmin = \"unix:\"\n", 2, 9, "server.admin", "path is empty");
}

#[test]
fn empty_listen_list() {
    refused(
        &format!("[server]\nlisten = []\n{MINIMAL}"),
        2,
        10,
        "server.listen",
        "the list is empty",
    );
    // No preview listener is fine.
    assert!(parse(&format!("[server]\npreview_listen = []\n{MINIMAL}"))
        .unwrap()
        .server
        .preview_listen
        .is_empty());
}

#[test]
fn colliding_listeners() {
    refused(
        &format!("[server]\nlisten = [\"0.0.0.0:8080\", \"0.0.0.0:8080\"]\n{MINIMAL}"),
        2,
        27,
        "server.listen",
        "listed twice",
    );
    refused(
        &format!("[server]\nlisten = \"0.0.0.0:8080\"\npreview_listen = \"127.0.0.1:8080\"\n{MINIMAL}"),
        3,
        18,
        "server.preview_listen",
        "collides with 0.0.0.0:8080 in server.listen",
    );
    refused(
        &format!("[server]\nadmin = \"127.0.0.1:8080\"\ntoken_file = \"t\"\n{MINIMAL}"),
        2,
        9,
        "server.admin",
        "collides with 0.0.0.0:8080",
    );
    // Port 0 means "any free port": two of them do not collide.
    parse(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\npreview_listen = \"127.0.0.1:0\"\n{MINIMAL}"
    ))
    .unwrap();
}

#[test]
fn tcp_admin_needs_a_token_file() {
    let shown = refused(
        &format!("[server]\nadmin = \"127.0.0.1:9901\"\n{MINIMAL}"),
        2,
        9,
        "server.token_file",
        "requires a bearer token; add token_file",
    );
    assert!(shown.contains("127.0.0.1:9901"), "{shown}");
    let config = parse(&format!("[server]\nadmin = \"unix:/run/cutover.sock\"\n{MINIMAL}")).unwrap();
    assert_eq!(config.server.admin, Admin::Unix(PathBuf::from("/run/cutover.sock")));
    assert_eq!(config.server.admin.to_string(), "unix:/run/cutover.sock");
}

#[test]
fn zero_instances_and_thresholds() {
    refused(
        "[services.web]\ncommand = \"x\"\ninstances = 0\n",
        3,
        13,
        "services.web.instances",
        "0 is too small",
    );
    refused(
        "[services.web]\ncommand = \"x\"\ninstances = 65\n",
        3,
        13,
        "services.web.instances",
        "65 is too large; write a whole number from 1 to 64",
    );
    refused(
        "[services.web]\ncommand = \"x\"\ninstances = \"2\"\n",
        3,
        13,
        "services.web.instances",
        "\"2\" is not a whole number",
    );
    refused(
        "[services.web]\ncommand = \"x\"\nhealth = { healthy = 0 }\n",
        3,
        22,
        "services.web.health.healthy",
        "0 is too small",
    );
    refused(
        "[services.web]\ncommand = \"x\"\nhealth = { unhealthy = 0 }\n",
        3,
        24,
        "services.web.health.unhealthy",
        "0 is too small",
    );
    refused("[server]\nworkers = 0\n", 2, 11, "server.workers", "0 is too small");
}

#[test]
fn instances_without_command() {
    refused(
        "[services.api]\ninstances = 2\n",
        2,
        13,
        "services.api.instances",
        "applies only to services with a command",
    );
    refused(
        "[services.api]\ncommand = \"  \"\n",
        2,
        11,
        "services.api.command",
        "is empty",
    );
}

#[test]
fn health_timeout_may_exceed_interval() {
    let c = Config::parse(
        "[services.web]\ncommand = \"x\"\nhealth = { interval = \"1s\", timeout = \"2s\" }\n",
        "cutover.toml",
    )
    .unwrap();
    let h = &c.service("web").unwrap().health;
    assert_eq!(
        (h.interval, h.timeout),
        (Duration::from_secs(1), Duration::from_secs(2))
    );
    refused(
        "[services.web]\ncommand = \"x\"\nhealth = { path = \"up\" }\n",
        3,
        19,
        "services.web.health.path",
        "starts with /",
    );
}

#[test]
fn error_rate_must_be_a_fraction() {
    let at = |v: &str| format!("[services.web]\ncommand = \"x\"\nwatch = {{ max_error_rate = {v} }}\n");
    refused(
        &at("1.5"),
        3,
        28,
        "services.web.watch.max_error_rate",
        "1.5 is not a fraction from 0 to 1",
    );
    refused(
        &at("-0.1"),
        3,
        28,
        "services.web.watch.max_error_rate",
        "not a fraction",
    );
    refused(&at("nan"), 3, 28, "services.web.watch.max_error_rate", "not a fraction");
    refused(
        &at("\"1%\""),
        3,
        28,
        "services.web.watch.max_error_rate",
        "\"1%\" is not a number",
    );
    assert_eq!(parse(&at("1")).unwrap().services[0].watch.max_error_rate, 1.0);
    refused(
        "[services.web]\ncommand = \"x\"\nwatch = { min_requests = 0 }\n",
        3,
        26,
        "services.web.watch.min_requests",
        "write a whole number 1 or more",
    );
}

#[test]
fn two_default_services() {
    let text = "[services.web]\ncommand = \"x\"\n\n[services.api]\ncommand = \"y\"\n";
    // "api" sorts first by name but comes second in the file: the error is on it.
    let shown = refused(
        text,
        4,
        11,
        "services.api.hosts",
        "services.web (line 1) is already the default service",
    );
    assert!(shown.contains("give one of them hosts"), "{shown}");
    refused(
        "[services.web]\ncommand = \"x\"\n[services.api]\nhosts = []\n",
        4,
        9,
        "services.api.hosts",
        "already the default",
    );
}

#[test]
fn a_host_belongs_to_one_service() {
    let text = "[services.web]\nhosts = [\"shop.example.com\"]\n\n[services.shop]\nhosts = [\"www.example.com\", \"SHOP.example.com\"]\n";
    refused(
        text,
        5,
        29,
        "services.shop.hosts",
        "\"shop.example.com\" is already claimed by services.web (line 2)",
    );
    refused(
        "[services.web]\nhosts = [\"a.example\", \"a.example\"]\n",
        2,
        23,
        "services.web.hosts",
        "listed twice",
    );
    refused(
        "[services.web]\nhosts = [\"shop.example.com:443\"]\n",
        2,
        10,
        "services.web.hosts",
        "has a port",
    );
    refused(
        "[services.web]\nhosts = [\"*.example.com\"]\n",
        2,
        10,
        "services.web.hosts",
        "wildcards",
    );
    refused(
        "[services.web]\nhosts = [\"https://example.com/\"]\n",
        2,
        10,
        "services.web.hosts",
        "is not a host name",
    );
}

#[test]
fn service_names_are_labels() {
    let shown = refused(
        "[services.Web_App]\ncommand = \"x\"\n",
        1,
        11,
        "services.Web_App",
        "is not a valid service name",
    );
    assert!(shown.contains("e.g. [services.web-app]"), "{shown}");
    refused(
        "[services.\"-x\"]\ncommand = \"x\"\n",
        1,
        11,
        "services.-x",
        "not starting with '-'",
    );
    refused(
        "[services]\n\"\" = { command = \"x\" }\n",
        2,
        1,
        "services.",
        "is not a valid service name",
    );
}

#[test]
fn no_services() {
    refused("", 1, 1, "services", "no services are defined");
    refused(
        "[server]\nworkers = 1\n\n[services]\n",
        4,
        2,
        "services",
        "no services are defined",
    );
}

#[test]
fn promote_and_validate_consistency() {
    refused(
        "[services.web]\ncommand = \"x\"\npromote = { auto = false, delay = \"5s\" }\n",
        3,
        35,
        "services.web.promote.delay",
        "auto = false",
    );
    refused(
        "[services.web]\ncommand = \"x\"\npromote = { auto = \"yes\" }\n",
        3,
        20,
        "services.web.promote.auto",
        "not true or false",
    );
    refused(
        "[services.web]\ncommand = \"x\"\nvalidate = { timeout = \"60s\" }\n",
        3,
        1,
        "services.web.validate.smoke",
        "missing",
    );
    refused(
        "[services.web]\ncommand = \"x\"\nbalance = \"random\"\n",
        3,
        11,
        "services.web.balance",
        "\"least-in-flight\" or \"round-robin\"",
    );
}

#[test]
fn positions_count_characters_and_lines() {
    assert_eq!(line_col("ab\ncd", 0), (1, 1));
    assert_eq!(line_col("ab\ncd", 3), (2, 1));
    assert_eq!(line_col("ab\ncd", 5), (2, 3));
    assert_eq!(line_col("é = \"x\"", 4), (1, 4)); // "é" is two bytes, one column
    assert_eq!(line_col("a\r\nb", 3), (2, 1));
    // A comment with non-ASCII text before the error does not shift the column.
    refused(
        "# café ☕\n[services.web]\ncommand = \"x\" # «ok»\ninstances = 0\n",
        4,
        13,
        "services.web.instances",
        "0 is too small",
    );
}

#[test]
fn load_resolves_paths_against_the_file() {
    let dir = std::env::temp_dir().join(format!("cutover-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("cutover.toml");
    std::fs::write(
        &path,
        format!("[server]\nadmin = \"127.0.0.1:9901\"\ntoken_file = \"admin.token\"\n{MINIMAL}"),
    )
    .unwrap();
    let config = Config::load(&path).unwrap();
    assert_eq!(config.dir, dir);
    assert_eq!(config.server.state_dir, dir.join(".cutover"));
    assert_eq!(config.server.token_file, Some(dir.join("admin.token")));

    std::fs::write(&path, "[services.web]\ninstances = 0\ncommand = \"x\"\n").unwrap();
    let e = Config::load(&path).unwrap_err();
    assert!(
        e.to_string()
            .starts_with(&format!("{}:2:13: services.web.instances: ", path.display())),
        "{e}"
    );

    let missing = dir.join("nope.toml");
    let e = Config::load(&missing).unwrap_err();
    assert!(matches!(e, ConfigError::Read { .. }));
    assert!(
        e.to_string()
            .starts_with(&format!("{}: cannot read the config file: ", missing.display())),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn example_tls_lines_parse_when_uncommented() {
    let uncommented: String = EXAMPLE
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest)
                if rest.starts_with("listen_tls")
                    || rest.starts_with("preview_listen_tls")
                    || rest.starts_with("tls =")
                    || rest.starts_with("upstream_tls =") =>
            {
                format!("{rest}\n")
            }
            _ => format!("{l}\n"),
        })
        .collect();
    let config = Config::parse(&uncommented, "example").unwrap();
    assert_eq!(
        config.server.listen_tls,
        vec!["0.0.0.0:8443".parse::<SocketAddr>().unwrap()]
    );
    assert_eq!(
        config.server.preview_listen_tls,
        vec!["127.0.0.1:8444".parse::<SocketAddr>().unwrap()]
    );
    assert_eq!(
        config.server.tls,
        Some(TlsFiles {
            cert: PathBuf::from("certs/default.pem"),
            key: PathBuf::from("certs/default.key")
        })
    );
    assert_eq!(
        config.service("api").unwrap().tls.as_ref().unwrap().cert,
        PathBuf::from("certs/api.pem")
    );
    assert_eq!(config.proxy.tls_handshake_timeout, Duration::from_secs(10));
    assert_eq!(
        config.service("api").unwrap().upstream_tls,
        Some(UpstreamTlsConfig {
            ca: PathBuf::from("certs/internal-ca.pem"),
            server_name: Some("api.internal".to_string()),
        })
    );
    assert_eq!(config.service("web").unwrap().upstream_tls, None);
}

#[test]
fn tls_listeners_certificates_and_their_paths() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cutover.toml");
    std::fs::write(
        &path,
        r#"
[server]
listen = "0.0.0.0:8080"
listen_tls = ["127.0.0.1:8443", "[::1]:8443"]
preview_listen_tls = "127.0.0.1:8444"
tls = { cert = "certs/default.pem", key = "/etc/keys/default.key" }

[proxy]
tls_handshake_timeout = "3s"

[services.web]
hosts = ["shop.example.com"]
tls = { cert = "web.pem", key = "web.key" }

[services.api]
hosts = "api.example.com"
"#,
    )
    .unwrap();
    let config = Config::load(&path).unwrap();
    assert_eq!(
        config.server.tls,
        Some(TlsFiles {
            cert: dir.path().join("certs/default.pem"),
            key: PathBuf::from("/etc/keys/default.key"),
        })
    );
    assert_eq!(
        config.service("web").unwrap().tls.as_ref().unwrap().key,
        dir.path().join("web.key")
    );
    assert_eq!(config.service("api").unwrap().tls, None);
    assert_eq!(config.proxy.tls_handshake_timeout, Duration::from_secs(3));
    let proxy = config.proxy_config();
    let listeners: Vec<_> = proxy
        .listeners
        .iter()
        .map(|l| (l.addr.to_string(), l.preview, l.tls))
        .collect();
    assert_eq!(
        listeners,
        [
            ("0.0.0.0:8080".to_string(), false, false),
            ("127.0.0.1:8443".to_string(), false, true),
            ("[::1]:8443".to_string(), false, true),
            ("127.0.0.1:8444".to_string(), true, true),
        ]
    );
    assert_eq!(proxy.tls_handshake_timeout, Duration::from_secs(3));
    assert!(config.has_tls_listeners());
}

#[test]
fn tls_mistakes_are_refused_where_they_are_written() {
    let web = "[services.web]\ncommand = \"./web\"\n";
    // A TLS listener without any certificate.
    refused(
        &format!("[server]\nlisten_tls = \"0.0.0.0:8443\"\n{web}"),
        2,
        1,
        "server.listen_tls",
        "a TLS listener needs a certificate, and none is configured",
    );
    refused(
        &format!("[server]\npreview_listen_tls = \"127.0.0.1:8444\"\n{web}"),
        2,
        1,
        "server.preview_listen_tls",
        "needs a certificate",
    );
    // A certificate without a TLS listener.
    refused(
        &format!("[server]\ntls = {{ cert = \"a.pem\", key = \"a.key\" }}\n{web}"),
        2,
        1,
        "server.tls",
        "no listener speaks TLS; add listen_tls",
    );
    refused(
        "[services.web]\nhosts = \"a.example\"\ntls = { cert = \"a.pem\", key = \"a.key\" }\n",
        3,
        1,
        "services.web.tls",
        "no listener speaks TLS",
    );
    // Half a pair, an unknown key, a wrong type.
    refused(
        &format!("[server]\nlisten_tls = \"0.0.0.0:8443\"\ntls = {{ cert = \"a.pem\" }}\n{web}"),
        3,
        1,
        "server.tls.key",
        "missing: a certificate needs both its PEM files",
    );
    refused(
        &format!("[server]\nlisten_tls = \"0.0.0.0:8443\"\ntls = {{ cert = \"a.pem\", key = \"a.key\", chain = \"c.pem\" }}\n{web}"),
        3,
        40,
        "server.tls.chain",
        "unknown key \"chain\"",
    );
    refused(
        &format!("[server]\nlisten_tls = \"0.0.0.0:8443\"\ntls = {{ cert = 1, key = \"a.key\" }}\n{web}"),
        3,
        16,
        "server.tls.cert",
        "1 is not a string",
    );
    refused(
        &format!("[server]\nlisten_tls = \"0.0.0.0:8443\"\ntls = {{ cert = \"\", key = \"a.key\" }}\n{web}"),
        3,
        16,
        "server.tls.cert",
        "the path is empty",
    );
    refused(
        &format!("[server]\nlisten_tl = \"0.0.0.0:8443\"\n{web}"),
        2,
        1,
        "server.listen_tl",
        "did you mean \"listen_tls\"",
    );
    // A service certificate can only be chosen by its hosts.
    refused(
        "[server]\nlisten_tls = \"0.0.0.0:8443\"\n[services.web]\ncommand = \"./web\"\ntls = { cert = \"a.pem\", key = \"a.key\" }\n",
        5,
        1,
        "services.web.tls",
        "this service has no hosts",
    );
    // A TLS port shared with a plain one.
    refused(
        "[server]\nlisten = \"0.0.0.0:8443\"\nlisten_tls = \"127.0.0.1:8443\"\ntls = { cert = \"a.pem\", key = \"a.key\" }\n[services.web]\ncommand = \"./web\"\n",
        3,
        14,
        "server.listen_tls",
        "collides with 0.0.0.0:8443 in server.listen",
    );
    refused(
        &format!("[server]\nlisten_tls = \"0.0.0.0:8443\"\ntls = {{ cert = \"a.pem\", key = \"a.key\" }}\n[proxy]\ntls_handshake_timeout = \"0s\"\n{web}"),
        5,
        25,
        "proxy.tls_handshake_timeout",
        "is zero",
    );
}

#[test]
fn trusted_proxies_are_address_blocks() {
    let err = parse("[proxy]\ntrusted_proxies = [\"10.0.0.1/8\"]\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("proxy.trusted_proxies") && err.contains("10.0.0.0/8"),
        "{err}"
    );
    let err = parse("[proxy]\ntrusted_proxies = [\"lb.example\"]\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("not an address block"), "{err}");
    let err = parse("[proxy]\ntrusted_proxies = [10]\n").unwrap_err().to_string();
    assert!(err.contains("not a string"), "{err}");
}

#[test]
fn https_redirect_needs_an_https_listener() {
    let err = parse("[services.web]\nhttps_redirect = true\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("services.web.https_redirect") && err.contains("listen_tls"),
        "{err}"
    );
    let err = parse("[services.web]\nhttps_redirect = \"yes\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("services.web.https_redirect"), "{err}");
}

/// Found by fuzzing: a key that is empty (`[""]`) was named as nothing ("cutover.toml:1:2: :
/// unknown key"). Keys that are not bare are named as they are written, quoted.
#[test]
fn a_key_that_is_not_bare_is_named_quoted() {
    refused("[\"\"]\ncommandnd = \"x\"\n", 1, 2, "\"\"", "unknown key \"\"");
    refused(
        "[server]\n\"work ers\" = 2\n",
        2,
        1,
        "server.\"work ers\"",
        "unknown key \"work ers\"",
    );
    refused(
        "[services.web]\ncommand = \"./web\"\nhealth = { \"pa.th\" = \"/up\" }\n",
        3,
        12,
        "services.web.health.\"pa.th\"",
        "unknown key \"pa.th\"",
    );
}

#[test]
fn proxy_protocol_needs_trusted_proxies() {
    let err = parse("[proxy]\nproxy_protocol = true\n").unwrap_err().to_string();
    assert!(
        err.contains("proxy.proxy_protocol") && err.contains("trusted_proxies"),
        "{err}"
    );
}

#[test]
fn an_admin_api_off_loopback_needs_tls_or_an_explicit_plaintext() {
    let server = |lines: &str| format!("[server]\ntoken_file = \"t\"\n{lines}\n{MINIMAL}");
    let err = refused(
        &server("admin = \"0.0.0.0:9901\""),
        3,
        9,
        "server.admin",
        "is not a loopback address",
    );
    assert!(
        err.contains("admin_tls = {") && err.contains("admin_plaintext = true"),
        "{err}"
    );
    refused(
        &server("admin = \"[2001:db8::1]:9901\""),
        3,
        9,
        "server.admin",
        "cleartext",
    );
    for ok in ["127.0.0.1:9901", "127.0.0.2:9901", "[::1]:9901"] {
        let c = parse(&server(&format!("admin = \"{ok}\""))).unwrap();
        assert_eq!(c.server.admin_tls, None, "{ok}");
        assert!(!c.server.admin_plaintext);
    }
    let c = parse(&server("admin = \"0.0.0.0:9901\"\nadmin_plaintext = true")).unwrap();
    assert!(c.server.admin_plaintext);
    let c = parse(&server(
        "admin = \"0.0.0.0:9901\"\nadmin_tls = { cert = \"certs/a.pem\", key = \"certs/a.key\" }",
    ))
    .unwrap();
    let tls = c.server.admin_tls.unwrap();
    assert_eq!(tls.files.cert, Path::new("certs/a.pem"));
    assert_eq!(tls.files.key, Path::new("certs/a.key"));
    assert_eq!(
        tls.trusted(),
        Path::new("certs/a.pem"),
        "without ca the certificate itself is trusted"
    );
    assert_eq!(tls.server_name, None);
    let c = parse(&server(
        "admin = \"10.0.0.1:9901\"\nadmin_tls = { cert = \"a.pem\", key = \"a.key\", ca = \"ca.pem\", server_name = \"cutover.internal\" }",
    ))
    .unwrap();
    let tls = c.server.admin_tls.unwrap();
    assert_eq!(tls.trusted(), Path::new("ca.pem"));
    assert_eq!(tls.server_name.as_deref(), Some("cutover.internal"));
}

#[test]
fn admin_tls_mistakes_are_named() {
    let server = |lines: &str| format!("[server]\ntoken_file = \"t\"\n{lines}\n{MINIMAL}");
    refused(
        &server("admin = \"0.0.0.0:9901\"\nadmin_tls = { cert = \"a.pem\" }"),
        4,
        1,
        "server.admin_tls.key",
        "missing: a certificate needs both its PEM files",
    );
    refused(
        &server(
            "admin = \"0.0.0.0:9901\"\nadmin_tls = { cert = \"a.pem\", key = \"a.key\", server_name = \"not a name\" }",
        ),
        4,
        60,
        "server.admin_tls.server_name",
        "neither a DNS name nor an IP address",
    );
    refused(
        &server("admin = \"0.0.0.0:9901\"\nadmin_tls = { cert = \"a.pem\", key = \"a.key\", verify = false }"),
        4,
        46,
        "server.admin_tls.verify",
        "unknown key",
    );
    refused(
        &server("admin = \"0.0.0.0:9901\"\nadmin_plaintext = true\nadmin_tls = { cert = \"a.pem\", key = \"a.key\" }"),
        4,
        1,
        "server.admin_plaintext",
        "remove one of the two",
    );
    refused(
        "[server]\nadmin = \"unix:a.sock\"\nadmin_tls = { cert = \"a.pem\", key = \"a.key\" }\n[services.web]\ncommand = \"./web\"\n",
        3,
        1,
        "server.admin_tls",
        "TLS does not apply to",
    );
    refused(
        &server("admin = \"0.0.0.0:9901\"\nadmin_plaintext = \"yes\""),
        4,
        19,
        "server.admin_plaintext",
        "",
    );
}

#[test]
fn upstream_tls_paths_and_server_names() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cutover.toml");
    std::fs::write(
        &path,
        r#"
[services.web]
command = "./web --port {port}"
upstream_tls = { ca = "certs/internal-ca.pem", server_name = "api.internal" }

[services.api]
hosts = "api.example.com"
upstream_tls = { ca = "/etc/cutover/ca.pem" }

[services.ip]
hosts = "ip.example.com"
upstream_tls = { ca = "ca.pem", server_name = "10.0.0.5" }

[services.plain]
hosts = "plain.example.com"
"#,
    )
    .unwrap();
    let config = Config::load(&path).unwrap();
    let tls = |name: &str| config.service(name).unwrap().upstream_tls.clone();
    assert_eq!(
        tls("web"),
        Some(UpstreamTlsConfig {
            ca: dir.path().join("certs/internal-ca.pem"),
            server_name: Some("api.internal".to_string()),
        })
    );
    assert_eq!(
        tls("api"),
        Some(UpstreamTlsConfig {
            ca: PathBuf::from("/etc/cutover/ca.pem"),
            server_name: None,
        })
    );
    assert_eq!(tls("ip").unwrap().server_name.as_deref(), Some("10.0.0.5"));
    assert_eq!(tls("plain"), None);
}

#[test]
fn upstream_tls_mistakes_are_refused_where_they_are_written() {
    let web = "[services.web]\ncommand = \"./web\"\n";
    let shown = refused(
        &format!("{web}upstream_tls = {{ server_name = \"api.internal\" }}\n"),
        3,
        1,
        "services.web.upstream_tls.ca",
        "missing: TLS to the instances needs the CA certificates (PEM) their certificates are verified against, \
         e.g. upstream_tls = { ca = \"certs/internal-ca.pem\", server_name = \"api.internal\" }; or remove \
         upstream_tls to speak plain HTTP to them",
    );
    assert_eq!(
        shown,
        "cutover.toml:3:1: services.web.upstream_tls.ca: missing: TLS to the instances needs the CA certificates \
         (PEM) their certificates are verified against, e.g. upstream_tls = { ca = \"certs/internal-ca.pem\", \
         server_name = \"api.internal\" }; or remove upstream_tls to speak plain HTTP to them"
    );
    // No way to turn verification off: an unknown key, with the ones there are.
    let shown = refused(
        &format!("{web}upstream_tls = {{ ca = \"ca.pem\", insecure_skip_verify = true }}\n"),
        3,
        33,
        "services.web.upstream_tls.insecure_skip_verify",
        "unknown key",
    );
    assert_eq!(
        shown,
        "cutover.toml:3:33: services.web.upstream_tls.insecure_skip_verify: unknown key \"insecure_skip_verify\"; \
         the keys here are ca, server_name; correct the spelling or remove it"
    );
    refused(
        &format!("{web}upstream_tls = {{ ca = \"ca.pem\", servername = \"a.internal\" }}\n"),
        3,
        33,
        "services.web.upstream_tls.servername",
        "did you mean \"server_name\"?",
    );
    let shown = refused(
        &format!("{web}upstream_tls = {{ ca = \"ca.pem\", server_name = \"api internal\" }}\n"),
        3,
        47,
        "services.web.upstream_tls.server_name",
        "is neither a DNS name nor an IP address",
    );
    assert_eq!(
        shown,
        "cutover.toml:3:47: services.web.upstream_tls.server_name: \"api internal\" is neither a DNS name nor an IP \
         address; write the name the upstreams' certificates are issued for, e.g. \"api.internal\", or remove \
         server_name to verify each instance for its IP address"
    );
    refused(
        &format!("{web}upstream_tls = {{ ca = \"\" }}\n"),
        3,
        23,
        "services.web.upstream_tls.ca",
        "the path is empty",
    );
    refused(
        &format!("{web}upstream_tls = {{ ca = 5 }}\n"),
        3,
        23,
        "services.web.upstream_tls.ca",
        "5 is not a string",
    );
    refused(
        &format!("{web}upstream_tls = {{ ca = \"ca.pem\", server_name = 1 }}\n"),
        3,
        47,
        "services.web.upstream_tls.server_name",
        "1 is not a string",
    );
    refused(
        &format!("{web}upstream_tls = \"ca.pem\"\n"),
        3,
        16,
        "services.web.upstream_tls",
        "upstream_tls = { ca = \"certs/internal-ca.pem\"",
    );
}

#[test]
fn affinity_is_read_with_its_defaults() {
    let c = parse("[services.web]\naffinity = { cookie = \"sid_1\", window = \"3s\" }\n").unwrap();
    assert_eq!(
        c.services[0].affinity,
        Some(AffinityConfig {
            cookie: "sid_1".into(),
            window: Duration::from_secs(3),
            app_cookie: None,
        })
    );
    let c = parse("[services.web]\naffinity = {}\n").unwrap();
    assert_eq!(
        c.services[0].affinity,
        Some(AffinityConfig {
            cookie: DEFAULT_AFFINITY_COOKIE.into(),
            window: DEFAULT_AFFINITY_WINDOW,
            app_cookie: None,
        })
    );
    let c = parse("[services.web]\naffinity = { app_cookie = \"session_id\" }\n").unwrap();
    assert_eq!(
        c.services[0].affinity.as_ref().unwrap().app_cookie.as_deref(),
        Some("session_id")
    );
    // A static service may have it too.
    let c = parse("[services.api]\nhosts = [\"api.test\"]\n[services.api.affinity]\nwindow = \"1m\"\n").unwrap();
    assert_eq!(c.services[0].affinity.as_ref().unwrap().window, Duration::from_secs(60));
    assert_eq!(parse("[services.web]\n").unwrap().services[0].affinity, None);
}

#[test]
fn bad_affinity_settings_are_refused_where_they_are() {
    let at = |v: &str| format!("[services.web]\ncommand = \"x\"\naffinity = {{ {v} }}\n");
    refused(&at("window = \"0s\""), 3, 23, "services.web.affinity.window", "zero");
    refused(
        &at("window = \"500ms\""),
        3,
        23,
        "services.web.affinity.window",
        "at least \"1s\"",
    );
    refused(
        &at("window = 5"),
        3,
        23,
        "services.web.affinity.window",
        "not a duration",
    );
    refused(
        &at("cookie = \"a b\""),
        3,
        23,
        "services.web.affinity.cookie",
        "not a valid cookie name",
    );
    refused(
        &at("cookie = \"\""),
        3,
        23,
        "services.web.affinity.cookie",
        "not a valid cookie name",
    );
    refused(
        &at("cookie = \"s;id\""),
        3,
        23,
        "services.web.affinity.cookie",
        "not a valid cookie name",
    );
    refused(
        &at("app_cookie = \"a b\""),
        3,
        27,
        "services.web.affinity.app_cookie",
        "not a valid cookie name",
    );
    refused(
        &at("app_cookie = \"cutover_session\""),
        3,
        27,
        "services.web.affinity.app_cookie",
        "also the name",
    );
    refused(
        &at("app_cookie = true"),
        3,
        27,
        "services.web.affinity.app_cookie",
        "not a string",
    );
    let err = parse(&at("cookies = \"x\"")).unwrap_err().to_string();
    assert!(err.contains("cookies"), "{err}");
}

const STATIC: &str = "[services.api]\nhealth = { path = \"/up\" }\n";

#[test]
fn fleet_settings_and_defaults() {
    let c = parse(&format!(
        "[fleet]\netcd = [\"http://10.0.0.1:2379\", \"http://10.0.0.2:2379\"]\nnode = \"edge-1\"\n{STATIC}"
    ))
    .unwrap();
    let f = c.fleet.unwrap();
    assert_eq!(f.etcd, ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]);
    assert_eq!(f.node, "edge-1");
    assert_eq!(f.prefix, "/cutover");
    assert_eq!((f.ack_timeout, f.lease_ttl), (DEFAULT_ACK_TIMEOUT, DEFAULT_LEASE_TTL));
    assert_eq!(f.on_missing_ack, OnMissingAck::Rollback);
    assert_eq!((f.user, f.password_file, f.tls), (None, None, None));

    let c = parse(&format!(
        "[fleet]\netcd = \"https://[::1]:2379\"\nprefix = \"/shop/cutover\"\nuser = \"cutover\"\n\
         password_file = \"etcd.pw\"\ntls = {{ ca = \"ca.pem\", cert = \"n.pem\", key = \"n.key\" }}\n\
         ack_timeout = \"3s\"\non_missing_ack = \"proceed\"\nlease_ttl = \"5s\"\n{STATIC}"
    ))
    .unwrap();
    let f = c.fleet.unwrap();
    assert_eq!(f.prefix, "/shop/cutover");
    assert_eq!(f.user.as_deref(), Some("cutover"));
    assert_eq!(f.password_file, Some(PathBuf::from("etcd.pw")));
    assert_eq!(f.tls.unwrap().ca, Some(PathBuf::from("ca.pem")));
    assert_eq!(f.on_missing_ack, OnMissingAck::Proceed);
    assert_eq!(
        (f.ack_timeout, f.lease_ttl),
        (Duration::from_secs(3), Duration::from_secs(5))
    );
    // The default node name is the host's.
    let c = parse(&format!("[fleet]\netcd = \"http://127.0.0.1:2379\"\n{STATIC}")).unwrap();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(c.fleet.unwrap().node, host.trim());
    assert!(parse(STATIC).unwrap().fleet.is_none());
}

#[test]
fn bad_fleet_settings_are_refused_with_what_to_write() {
    let f = |body: &str| format!("[fleet]\n{body}\n{STATIC}");
    refused(
        &f("node = \"a\""),
        1,
        2,
        "fleet.etcd",
        "missing: [fleet] needs the client URLs",
    );
    refused(
        &f("etcd = [\"10.0.0.1:2379\"]"),
        2,
        9,
        "fleet.etcd",
        "is not an etcd client URL",
    );
    refused(
        &f("etcd = [\"http://a:2379\", \"http://a:2379\"]"),
        2,
        26,
        "fleet.etcd",
        "listed twice",
    );
    refused(
        &f("etcd = [\"http://a:2379\", \"https://b:2379\"]\ntls = { ca = \"c.pem\" }"),
        2,
        9,
        "fleet.etcd",
        "write them alike",
    );
    refused(
        &f("etcd = \"https://a:2379\""),
        2,
        1,
        "fleet.tls",
        "https:// URLs need the CA",
    );
    refused(
        &f("etcd = \"http://a:2379\"\ntls = { ca = \"c.pem\" }"),
        3,
        1,
        "fleet.tls",
        "write them as https://",
    );
    refused(
        &f("etcd = \"https://a:2379\"\ntls = { ca = \"c.pem\", cert = \"n.pem\" }"),
        3,
        1,
        "fleet.tls.key",
        "both its files",
    );
    refused(
        &f("etcd = \"http://a:2379\"\nnode = \"a/b\""),
        3,
        8,
        "fleet.node",
        "is not a node name",
    );
    refused(
        &f("etcd = \"http://a:2379\"\nprefix = \"cutover/\""),
        3,
        10,
        "fleet.prefix",
        "a leading /",
    );
    refused(
        &f("etcd = \"http://a:2379\"\nuser = \"u\""),
        3,
        1,
        "fleet.password_file",
        "needs its password",
    );
    refused(
        &f("etcd = \"http://a:2379\"\npassword_file = \"p\""),
        3,
        1,
        "fleet.user",
        "needs the user",
    );
    refused(
        &f("etcd = \"http://a:2379\"\non_missing_ack = \"wait\""),
        3,
        18,
        "fleet.on_missing_ack",
        "\"rollback\"",
    );
    refused(
        &f("etcd = \"http://a:2379\"\nlease_ttl = \"1500ms\""),
        3,
        13,
        "fleet.lease_ttl",
        "whole seconds",
    );
    refused(
        &f("etcd = \"http://a:2379\"\nack_timeout = \"0s\""),
        3,
        15,
        "fleet.ack_timeout",
        "zero",
    );
    refused(
        &f("etcd = \"http://a:2379\"\nttl = \"1s\""),
        3,
        1,
        "fleet.ttl",
        "unknown",
    );
    // The process driver in a fleet: every node runs its own instances.
    let config = parse(&format!("[fleet]\netcd = \"http://a:2379\"\n{MINIMAL}")).unwrap();
    assert!(matches!(config.services[0].driver, Driver::Process { .. }));
}

#[test]
fn health_checks_send_the_service_host_or_the_one_given() {
    // Default without hosts: none (the check sends the instance's address).
    let config = parse("[services.web]\ncommand = \"./web\"\n").unwrap();
    assert_eq!(config.services[0].health.host, None);
    // With hosts: the first one.
    let config =
        parse("[services.web]\ncommand = \"./web\"\nhosts = [\"Shop.Example.com\", \"www.example.com\"]\n").unwrap();
    assert_eq!(config.services[0].health.host.as_deref(), Some("shop.example.com"));
    // Given: that one.
    let config = parse(
        "[services.web]\ncommand = \"./web\"\nhosts = [\"shop.example.com\"]\nhealth = { host = \"internal:8080\" }\n",
    )
    .unwrap();
    assert_eq!(config.services[0].health.host.as_deref(), Some("internal:8080"));
    for bad in ["\"\"", "\"a b\"", "\"x/y\"", "3"] {
        refused(
            &format!("[services.web]\ncommand = \"./web\"\nhealth = {{ host = {bad} }}\n"),
            3,
            19,
            "services.web.health.host",
            "",
        );
    }
}

#[test]
fn migrate_settings_are_read_and_bad_ones_refused() {
    use crate::schema_lint::{Breaking, SqlDialect};
    let m = |line: &str| format!("{MINIMAL}migrate = {{ {line} }}\n");
    let config = parse(&m(
        "expand = \"./m expand\", contract = \"./m contract\", check = \"./check\", rollback = \"./m undo\", \
         files = [\"migrations/*.sql\"], dialect = \"sqlite\", allow = [\"drop-column\"], timeout = \"2m\"",
    ))
    .unwrap();
    let got = config.services[0].migrate.clone().unwrap();
    assert_eq!(got.expand.as_deref(), Some("./m expand"));
    assert_eq!(got.contract.as_deref(), Some("./m contract"));
    assert_eq!(got.check.as_deref(), Some("./check"));
    assert_eq!(got.rollback.as_deref(), Some("./m undo"));
    assert_eq!(got.files, vec!["migrations/*.sql".to_string()]);
    assert_eq!(got.dialect, SqlDialect::Sqlite);
    assert_eq!(got.allow, vec![Breaking::DropColumn]);
    assert_eq!(got.timeout, Duration::from_secs(120));
    // Defaults: postgres, nothing allowed, 10 minutes; contract alone is fine.
    let got = parse(&m("contract = \"./m contract\"")).unwrap().services[0]
        .migrate
        .clone()
        .unwrap();
    assert_eq!(
        (got.dialect, got.allow.len(), got.timeout),
        (SqlDialect::Postgres, 0, Duration::from_secs(600))
    );
    assert!(parse(MINIMAL).unwrap().services[0].migrate.is_none());

    // Each refusal points at the value (or the key) it is about: its column on line 3.
    let at = |line: &str, what: &str| "migrate = { ".len() + line.find(what).unwrap() + 1;
    refused(
        &m("check = \"./check\""),
        3,
        1,
        "services.web.migrate.expand",
        "needs expand or contract",
    );
    for (line, what, key, words) in [
        (
            "contract = \"./c\", rollback = \"./undo\"",
            "\"./undo\"",
            "rollback",
            "belongs to the expand step",
        ),
        (
            "contract = \"./c\", files = \"m/*.sql\"",
            "\"m/*.sql\"",
            "files",
            "belongs to the expand step",
        ),
        ("expand = \" \"", "\" \"", "expand", "is empty"),
        (
            "expand = \"./e\", dialect = \"oracle\"",
            "\"oracle\"",
            "dialect",
            "\"oracle\" is not a dialect",
        ),
        (
            "expand = \"./e\", allow = [\"drop-everything\"]",
            "\"drop-everything\"",
            "allow",
            "\"drop-everything\" is not a kind of statement",
        ),
        ("expand = \"./e\", timeout = \"0s\"", "\"0s\"", "timeout", "zero"),
        ("expand = \"./e\", expnad = \"x\"", "expnad", "expnad", "unknown"),
    ] {
        refused(
            &m(line),
            3,
            at(line, what),
            &format!("services.web.migrate.{key}"),
            words,
        );
    }
}

#[test]
fn mirror_takes_safe_methods_and_sensible_limits() {
    let at =
        |m: &str| format!("[services.web]\ncommand = \"x\"\nvalidate = {{ smoke = \"./s\", mirror = {{ {m} }} }}\n");
    let c = parse(&at("")).unwrap();
    let m = c.services[0].validate.as_ref().unwrap().mirror.clone().unwrap();
    assert_eq!(m, MirrorConfig::default());
    assert_eq!(m.methods, vec![http::Method::GET, http::Method::HEAD]);
    let c = parse(&at(
        "sample = 0.25, duration = \"30s\", methods = [\"GET\", \"OPTIONS\", \"GET\"], max_error_rate = 0, \
         max_p99_ratio = 2, min_requests = 10, max_in_flight = 8",
    ))
    .unwrap();
    assert_eq!(
        c.services[0].validate.as_ref().unwrap().mirror,
        Some(MirrorConfig {
            sample: 0.25,
            duration: Duration::from_secs(30),
            methods: vec![http::Method::GET, http::Method::OPTIONS],
            max_error_rate: 0.0,
            max_p99_ratio: 2.0,
            min_requests: 10,
            max_in_flight: 8,
        })
    );
    assert_eq!(parse(MINIMAL).unwrap().services[0].validate, None);

    let said = refused(
        &at("methods = [\"GET\", \"POST\"]"),
        3,
        58,
        "services.web.validate.mirror.methods",
        "\"POST\" is not mirrored: a copy of a request that changes something would change it a second time",
    );
    assert!(said.contains("GET, HEAD, OPTIONS, TRACE"), "{said}");
    refused(
        &at("methods = [\"get\"]"),
        3,
        51,
        "services.web.validate.mirror.methods",
        "write \"GET\"",
    );
    refused(
        &at("sample = 0"),
        3,
        49,
        "services.web.validate.mirror.sample",
        "nothing would be copied",
    );
    refused(
        &at("sample = 1.5"),
        3,
        49,
        "services.web.validate.mirror.sample",
        "1.5 is not a fraction from 0 to 1",
    );
    refused(
        &at("max_p99_ratio = 0"),
        3,
        56,
        "services.web.validate.mirror.max_p99_ratio",
        "not a ratio above 0",
    );
    refused(
        &at("max_p99_ratio = \"x\""),
        3,
        56,
        "services.web.validate.mirror.max_p99_ratio",
        "is not a number",
    );
    refused(
        &at("duration = \"0s\""),
        3,
        51,
        "services.web.validate.mirror.duration",
        "",
    );
    refused(
        &at("max_in_flight = 0"),
        3,
        56,
        "services.web.validate.mirror.max_in_flight",
        "from 1 to 100000",
    );
    refused(
        &at("min_requests = 0"),
        3,
        55,
        "services.web.validate.mirror.min_requests",
        "1 or more",
    );
    let e = parse(&at("copies = 3")).unwrap_err().to_string();
    assert!(e.contains("copies"), "{e}");
    let e = parse("[services.web]\ncommand = \"x\"\nvalidate = { mirror = { sample = 0.1 } }\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("validate.smoke") && e.contains("missing"), "{e}");
}

#[test]
fn promote_steps_rise_to_100_and_take_a_step_duration() {
    let at = |p: &str| format!("[services.web]\ncommand = \"x\"\npromote = {{ {p} }}\n");
    let c = parse(&at("steps = [10, 50, 100], step = \"30s\"")).unwrap();
    assert_eq!(c.services[0].promote.steps, vec![10, 50, 100]);
    assert_eq!(c.services[0].promote.step, Duration::from_secs(30));
    let c = parse(&at("steps = [25, 100]")).unwrap();
    assert_eq!(c.services[0].promote.step, DEFAULT_PROMOTE_STEP);
    assert!(parse(&at("steps = [100]")).unwrap().services[0]
        .promote
        .steps
        .is_empty());
    assert!(parse(MINIMAL).unwrap().services[0].promote.steps.is_empty());

    refused(
        &at("steps = [10, 50]"),
        3,
        21,
        "services.web.promote.steps",
        "the last step must be 100",
    );
    refused(
        &at("steps = [50, 10, 100]"),
        3,
        21,
        "services.web.promote.steps",
        "10 comes after 50",
    );
    refused(
        &at("steps = [10, 10, 100]"),
        3,
        21,
        "services.web.promote.steps",
        "10 comes after 10",
    );
    refused(
        &at("steps = [0, 100]"),
        3,
        21,
        "services.web.promote.steps",
        "from 1 to 100",
    );
    refused(
        &at("steps = [10.5, 100]"),
        3,
        21,
        "services.web.promote.steps",
        "from 1 to 100",
    );
    refused(
        &at("steps = \"10,100\""),
        3,
        21,
        "services.web.promote.steps",
        "not a list of percentages",
    );
    refused(
        &at("step = \"1m\""),
        3,
        20,
        "services.web.promote.step",
        "there are no steps",
    );
    refused(
        &at("steps = [10, 100], step = \"0s\""),
        3,
        39,
        "services.web.promote.step",
        "is zero",
    );
    let fleet = format!(
        "[fleet]\netcd = [\"http://127.0.0.1:2379\"]\nnode = \"n1\"\n{}",
        at("steps = [10, 100]")
    );
    let e = parse(&fleet).unwrap_err().to_string();
    assert!(
        e.contains("services.web.promote.steps") && e.contains("not available in a fleet"),
        "{e}"
    );
}
