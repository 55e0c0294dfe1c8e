//! The configuration file (`cutover.toml`): its shape, its defaults, and its validation.
//!
//! This module owns turning text into a [`Config`] that the rest of the control plane can trust:
//! every value parsed, in range and consistent with the others. It never touches the network,
//! processes or the state directory (it does not even check that files exist), so `cutover serve`
//! can refuse a bad file before anything starts.
//!
//! Errors point at the exact place to fix: `cutover.toml:12:11: services.web.health.interval:
//! "5 sec" is not a duration; write ...`. To get there the text goes through three passes:
//! 1. into a key index (every key's dotted path and byte span); a failure here is a TOML syntax
//!    error;
//! 2. into raw structs whose leaves are `toml::Spanned<toml::Value>`, so that unknown keys
//!    (`deny_unknown_fields`) are rejected and every value keeps its position;
//! 3. by hand-written checks that turn the raw values into typed ones with our own messages.
//!
//! Tables are deliberately not wrapped in `Spanned`: toml 0.8 fails to deserialize a `Spanned`
//! table that was written with dotted keys (`services.web.command = "..."`). The key index gives
//! their positions instead.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cutover_proxy::{Balance, ListenerConfig, ProxyConfig};
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use crate::events::EventKind;
use toml::{Spanned, Value};

/// A commented, valid configuration showing every key, printed by `cutover config example`;
/// `example_parses` keeps it valid.
pub const EXAMPLE: &str = r#"# cutover.toml: what cutover serves and how it releases it.
# Durations are a whole number followed by us, ms, s, m or h ("500ms", "30s", "5m", "1h").
# Relative paths are relative to the directory of this file.

[server]
# Where live traffic arrives: one address or a list, as IP:PORT.
listen = "0.0.0.0:8080"
# Optional: a listener that always answers from the colour that is not live yet, to try a
# release before it is promoted. Keep it private.
preview_listen = "127.0.0.1:8081"
# The admin API used by the cutover CLI: a unix socket (mode 0600), or IP:PORT for TCP, which
# then needs a bearer token read from token_file (mode 0600, at least 16 characters).
admin = "unix:.cutover/admin.sock"
# admin = "127.0.0.1:9901"
# token_file = ".cutover/admin.token"
# Off loopback the admin API must speak TLS, so that the token never crosses the network in
# cleartext: the CLI trusts `ca` (default: the certificate itself, e.g. a self-signed one) and
# checks the name `server_name` (default: the admin address's IP). The certificate is reloaded
# like the listeners' ones. `admin_plaintext = true` allows plain TCP off loopback instead.
# admin_tls = { cert = "certs/admin.pem", key = "certs/admin.key" }
# Releases, deployment history, instance logs. Created with mode 0700.
state_dir = ".cutover"
# Proxy threads, each with its own event loop.
workers = 1
# HTTPS: listeners that terminate TLS (1.3 and 1.2; ALPN h2 and http/1.1), and the default
# certificate, for names no service's certificate covers and clients that send no server name.
# PEM files: the certificate first, then its intermediates; the key as PKCS#8, RSA or EC.
# Changed files are picked up within seconds (or at once with `cutover reload`); files that fail
# to load keep the certificate loaded before. A TLS listener needs at least one certificate.
# listen_tls = "0.0.0.0:8443"
# preview_listen_tls = "127.0.0.1:8444"
# tls = { cert = "certs/default.pem", key = "certs/default.key" }

# A service answers the Host names it lists; the one service without hosts gets the rest.
[services.web]
# The process driver: cutover starts `instances` copies of this command per colour, each on a
# free loopback port given as {port} and in $PORT. Here: the demo app built into cutover.
command = "cutover demo-app --port {port}"
instances = 2
# GET `path` on each instance every `interval`: `healthy` successes in a row put an instance in
# rotation, `unhealthy` failures in a row take it out. A new release whose instances are not all
# healthy within `deadline` is aborted; so is, at once, one with an instance that exits within
# 10s of its start 3 times in a row before then (the deploy shows how it exited and its output).
# Checks send `Host:` the service's first host (`host = "..."` to choose), or without hosts the
# instance's address.
health = { path = "/up", interval = "1s", timeout = "500ms", healthy = 2, unhealthy = 3, deadline = "60s" }
# Requests still running on the old colour after a switch get this long to finish.
drain_timeout = "30s"
# WebSockets and streams left at the drain deadline are closed spread over this window.
close_window = "5s"
# After a promotion the old colour stays running this long, so that a rollback is instant.
keep_warm = "1h"
# Before any user sees a release: this command runs against the preview route and must exit 0.
# It gets CUTOVER_PREVIEW_URL and CUTOVER_PREVIEW_TOKEN (send it as X-Cutover-Preview).
validate = { smoke = "curl -fsS -H \"X-Cutover-Preview: $CUTOVER_PREVIEW_TOKEN\" $CUTOVER_PREVIEW_URL/up", timeout = "60s" }
# Opt-in, in validate: once the smoke test passes, copy a sample of live GET/HEAD requests to the
# release for `duration` and fail it when the copies fail or are slower than the live answers:
#   mirror = { sample = 0.1, duration = "2m", max_error_rate = 0.01, max_p99_ratio = 1.5 }
# Schema changes in phases: expand before the release's instances start (then the live release
# is checked again: `check`, or the smoke test against the live route; `rollback` undoes the
# expand when that fails); contract once the previous colour is retired. `files` are linted first.
# migrate = { expand = "./migrate expand", contract = "./migrate contract", files = "migrations/*-expand.sql" }
# Promote by itself once validated (after `delay`), or wait for `cutover promote`. A service's
# first release has no live traffic to guard: it goes live once validated either way.
promote = { auto = true, delay = "0s" }
# Opt-in, in promote: a gradual switch, that share of live traffic (of new sessions, with
# affinity) to the release step after step, each watched for `step`; 100 is the switch itself:
#   steps = [10, 50, 100], step = "1m"
# After a promotion: roll back by itself if, within `duration` and once `min_requests` have
# been served, more than max_error_rate of them fail or their p99 latency exceeds max_p99.
# The p99 is estimated to within 6.25 % (from 250 µs to 60 s): a p99 more than 6.25 % below
# max_p99 never rolls back, one more than 6.25 % above always does.
watch = { duration = "5m", max_error_rate = 0.01, max_p99 = "500ms", min_requests = 100 }
# "least-in-flight" or "round-robin".
balance = "least-in-flight"

# Without a command a service uses the static driver: its instances run elsewhere (systemd,
# containers, other hosts) and each deploy names them:
#   cutover deploy api --version v2 --upstream 10.0.0.5:8080 --upstream 10.0.0.6:8080
[services.api]
hosts = ["api.example.com"]
health = { path = "/healthz" }
# The certificate TLS listeners present for this service's hosts (chosen by SNI).
# tls = { cert = "certs/api.pem", key = "certs/api.key" }
# With listen_tls: live requests over plain HTTP get 308 to the same URL over HTTPS.
# https_redirect = true
# TLS to the instances: every connection cutover makes to them (requests, WebSockets, health
# checks) speaks TLS 1.3 or 1.2 and verifies their certificate against `ca` (PEM; this CA
# bundle only, not the system's), for `server_name` (a DNS name or an IP address; default: each
# instance's IP address, which its certificate must then hold). A failed handshake is a failed
# connect: the request goes to a sibling or gets 502 naming why, and the health check fails
# saying so. The CA file is read at start; a missing or empty one stops `cutover serve`.
# upstream_tls = { ca = "certs/internal-ca.pem", server_name = "api.internal" }
# Sticky sessions across a switch: a session that began on the old colour keeps going there
# for `window` after a promotion (while it runs), then the old colour is drained. Off by default.
# affinity = { cookie = "cutover_session", window = "15m" }
# It may follow the application's own session cookie too: add app_cookie = "session_id".

# Optional: limits and timeouts of the proxy (these are the defaults).
[proxy]
client_header_timeout = "10s"
idle_timeout = "60s"
send_timeout = "60s"      # a client that takes none of the bytes sent to it for this long is cut
connect_timeout = "2s"
upstream_timeout = "60s"
upstream_idle_timeout = "30s"
upstream_pool_size = 1024
max_connections = 10000
max_header_bytes = 16384
shutdown_timeout = "30s"
retry_idempotent = true
preempt_interval = "2ms"   # longest a worker runs without a point where the kernel may switch to a waiting process; "0s": none
tls_handshake_timeout = "10s"   # a TLS client must finish its handshake within this from its connect
trusted_proxies = []       # e.g. ["10.0.0.0/8"]: load balancers whose X-Forwarded-For/-Proto/-Host are believed; from anyone else they are replaced
proxy_protocol = false     # true: connections from trusted_proxies begin with a PROXY protocol header (v1 or v2) naming their client

# Optional: POST a JSON event to each URL when a deployment starts, is promoted, is rolled back
# or aborted. Delivery never holds up a deployment: a failed one is retried with growing pauses,
# then logged and dropped.
# [webhooks]
# urls = ["http://127.0.0.1:9000/hook"]   # http:// only (no TLS yet)
# timeout = "5s"                          # per attempt
# retries = 3                             # attempts after the first
# events = ["started", "promoted", "rolled-back", "aborted"]
"#;

/// Most instances a process-driven service may ask for; more on one host is a typo.
pub const MAX_INSTANCES: u32 = 64;

/// A complete, validated configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// `[server]`: listeners, admin API, state directory.
    pub server: ServerConfig,
    /// `[proxy]`: limits and timeouts of the data plane.
    pub proxy: ProxySettings,
    /// `[services.NAME]`, sorted by name. Never empty.
    pub services: Vec<ServiceConfig>,
    /// `[webhooks]`: where to POST deployment events. Default: nowhere (no urls).
    pub webhooks: WebhooksConfig,
    /// `[fleet]`: several nodes that share their state through etcd and switch as one. Default
    /// none: this node alone, its state in SQLite under `state_dir`.
    pub fleet: Option<FleetConfig>,
    /// The directory relative paths were resolved against (the config file's directory for
    /// [`Config::load`], empty, i.e. the current directory, for [`Config::parse`]). Commands
    /// (`command`, `validate.smoke`) are meant to run from here, so that `./web` in the file means
    /// the same thing as `state_dir = ".cutover"`.
    pub dir: PathBuf,
}

/// `[server]`. The whole table is optional.
#[derive(Clone, Debug, PartialEq)]
pub struct ServerConfig {
    /// `listen`: one address or a list, IP:PORT. Default `["0.0.0.0:8080"]`. Never empty.
    pub listen: Vec<SocketAddr>,
    /// `preview_listen`: one address or a list. Default none: the unreleased colour is then
    /// reachable only with the preview token header.
    pub preview_listen: Vec<SocketAddr>,
    /// `admin`: `"unix:PATH"` or `"IP:PORT"`. Default `unix:<state_dir>/admin.sock`.
    pub admin: Admin,
    /// `token_file`: the admin bearer token; required when `admin` is TCP, unused otherwise.
    /// Not read here (see [`crate::token_file`]). Default none.
    pub token_file: Option<PathBuf>,
    /// `state_dir`: SQLite state, instance logs, the default admin socket. Default `.cutover`.
    /// Created, and checked at start, by [`crate::private_dir::prepare_state_dir`].
    pub state_dir: PathBuf,
    /// `workers`: proxy threads, 1 to 256. Default 1.
    pub workers: usize,
    /// `listen_tls`: one address or a list, IP:PORT, where live traffic arrives over TLS
    /// (HTTPS). Default none. Needs a certificate: `tls` here or on a service.
    pub listen_tls: Vec<SocketAddr>,
    /// `preview_listen_tls`: preview listeners over TLS. Default none.
    pub preview_listen_tls: Vec<SocketAddr>,
    /// `tls = { cert, key }`: the default certificate, for names no service's certificate
    /// covers and for clients that send no SNI. Default none.
    pub tls: Option<TlsFiles>,
    /// `admin_tls = { cert, key, ca, server_name }`: the admin API on TCP speaks TLS. Only with a
    /// TCP `admin`. Default none.
    pub admin_tls: Option<AdminTls>,
    /// `admin_plaintext = true`: a TCP `admin` off loopback may go without TLS (its token then
    /// crosses the network in cleartext; for a network or tunnel that is encrypted itself).
    /// Default false: such an address is refused without `admin_tls`.
    pub admin_plaintext: bool,
}

/// `admin_tls`: the daemon presents `files`; the CLI trusts `ca` and checks `server_name`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminTls {
    pub files: TlsFiles,
    /// `ca`: the certificates the CLI trusts (PEM). Default: the certificates in `files.cert`,
    /// which suits a self-signed certificate.
    pub ca: Option<PathBuf>,
    /// `server_name`: the name the CLI checks the certificate against. Default: the IP of
    /// `admin`, so the certificate must name that address.
    pub server_name: Option<String>,
}

impl AdminTls {
    /// The file of the certificates the CLI trusts.
    pub fn trusted(&self) -> &Path {
        self.ca.as_deref().unwrap_or(&self.files.cert)
    }
}

/// `tls = { cert = "...", key = "..." }`: a certificate chain and its private key, PEM files.
/// Paths are resolved against the config file's directory. Not read here (see [`crate::tls`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// `cert`: the server's certificate first, then its intermediates.
    pub cert: PathBuf,
    /// `key`: its private key (PKCS#8, PKCS#1 RSA or SEC1 EC).
    pub key: PathBuf,
}

/// Where the admin API listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admin {
    /// A unix socket, created with mode 0600: only this user can drive cutover.
    Unix(PathBuf),
    /// A TCP listener; every request must carry the bearer token from `token_file`.
    Tcp(SocketAddr),
}

impl fmt::Display for Admin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Admin::Unix(path) => write!(f, "unix:{}", path.display()),
            Admin::Tcp(addr) => write!(f, "{addr}"),
        }
    }
}

/// `[proxy]`: limits and timeouts of the data plane. Every key is optional and defaults to
/// [`ProxyConfig::default`]'s value (currently: 10s, 60s, 60s, 2s, 60s, 30s, 1024, 10000, 16384,
/// 30s, true, 2ms in field order). See [`ProxyConfig`] for what each one does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxySettings {
    /// Time a client has to send a request head (HTTP/2: a header block), from its first byte.
    pub client_header_timeout: Duration,
    /// A client connection with nothing moving and nothing in flight is closed after this; a
    /// silent one is probed with TCP keepalive from half of it on.
    pub idle_timeout: Duration,
    /// A client that acknowledges no byte sent to it (data or keepalive probes) for this long is
    /// cut; at least 1 s.
    pub send_timeout: Duration,
    /// Time to connect to an upstream instance (and, with `upstream_tls`, again for the TLS
    /// handshake).
    pub connect_timeout: Duration,
    /// Time from sending a request upstream to its response head.
    pub upstream_timeout: Duration,
    /// Idle upstream keep-alive connections are closed after this.
    pub upstream_idle_timeout: Duration,
    /// Idle upstream connections kept per instance and worker, 0 to 65536.
    pub upstream_pool_size: usize,
    /// Client connections at once, 1 to 1000000.
    pub max_connections: usize,
    /// Largest request head in bytes, 1024 to 1048576.
    pub max_header_bytes: usize,
    /// How long a graceful shutdown waits for in-flight requests and open tunnels; tunnels are
    /// closed at instants spread over the first half of what it leaves after their 1 s closing
    /// grace.
    pub shutdown_timeout: Duration,
    /// Replay idempotent, bodiless requests whose upstream connection failed before a response.
    pub retry_idempotent: bool,
    /// Longest a worker runs without a point where the kernel may hand its CPU to a waiting
    /// thread; 0 (no points) to 1s.
    pub preempt_interval: Duration,
    /// Time a connection to a TLS listener has to complete its handshake.
    pub tls_handshake_timeout: Duration,
    /// `trusted_proxies`: address blocks whose `X-Forwarded-*` headers are believed. Default none.
    pub trusted_proxies: Vec<cutover_proxy::Cidr>,
    /// `proxy_protocol`: connections from `trusted_proxies` begin with a PROXY protocol header
    /// (v1 or v2) naming their client. Default false; needs `trusted_proxies`.
    pub proxy_protocol: bool,
}

impl Default for ProxySettings {
    fn default() -> Self {
        // One source of truth for the numbers: the proxy's own defaults.
        let p = ProxyConfig::default();
        ProxySettings {
            client_header_timeout: p.client_header_timeout,
            idle_timeout: p.idle_timeout,
            send_timeout: p.send_timeout,
            connect_timeout: p.connect_timeout,
            upstream_timeout: p.upstream_timeout,
            upstream_idle_timeout: p.upstream_idle_timeout,
            upstream_pool_size: p.upstream_pool_size,
            max_connections: p.max_connections,
            max_header_bytes: p.max_header_bytes,
            shutdown_timeout: p.shutdown_timeout,
            retry_idempotent: p.retry_idempotent,
            preempt_interval: p.preempt_interval,
            tls_handshake_timeout: p.tls_handshake_timeout,
            trusted_proxies: p.trusted_proxies,
            proxy_protocol: p.proxy_protocol,
        }
    }
}

/// `[services.NAME]`. Every key is optional.
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceConfig {
    /// The table's name: 1 to 63 of `a-z`, `0-9`, `-`, not starting with `-`. It becomes a
    /// metric label, a file name and a CLI argument.
    pub name: String,
    /// `hosts`: one host or a list, lower-cased, without port. Empty (the default) makes this
    /// the default service, which answers every host no other service claims; at most one.
    pub hosts: Vec<String>,
    /// `command` (and `instances`): how the instances of a colour run.
    pub driver: Driver,
    /// `health`: active health checks of every instance.
    pub health: HealthConfig,
    /// `drain_timeout`: how long requests in flight on the old colour may take to finish after a
    /// switch. Default 30s; 0s cuts them at once.
    pub drain_timeout: Duration,
    /// `close_window`: upgraded connections and streams still open at the drain deadline are
    /// closed at instants spread over this window, not all at once. Default 5s.
    pub close_window: Duration,
    /// `keep_warm`: how long the old colour keeps running after a promotion, so that a rollback
    /// is instant; after it the rollback is a cold redeploy. Default 1h; 0s retires it as soon as
    /// the watch passes.
    pub keep_warm: Duration,
    /// `validate`: the smoke command run against the preview route. Default none: a release is
    /// validated by its health checks alone.
    pub validate: Option<ValidateConfig>,
    /// `promote`: automatic or manual promotion.
    pub promote: PromoteConfig,
    /// `watch`: the post-promotion window with automatic rollback.
    pub watch: WatchConfig,
    /// `balance`: `"least-in-flight"` (default) or `"round-robin"`.
    pub balance: Balance,
    /// `tls = { cert, key }`: the certificate TLS listeners present for this service's `hosts`
    /// (chosen by SNI). Default none: those names get the default certificate. Only for a
    /// service with hosts.
    pub tls: Option<TlsFiles>,
    /// `https_redirect = true`: live requests that arrive over plain HTTP get `308` to the same
    /// URL over HTTPS (the first `listen_tls` port). Needs `listen_tls`. Default false.
    pub https_redirect: bool,
    /// `affinity = { cookie, window }`: sticky sessions across a switch. Default none.
    pub affinity: Option<AffinityConfig>,
    /// `migrate = { expand, contract, check, rollback, files, ... }`: the schema change that
    /// comes with each release, in phases. Default none.
    pub migrate: Option<MigrateConfig>,
    /// `upstream_tls = { ca, server_name }`: connections to the instances speak TLS. Default
    /// none: plain TCP.
    pub upstream_tls: Option<UpstreamTlsConfig>,
}

/// `upstream_tls = { ca = "...", server_name = "..." }`: how the instances' certificates are
/// verified. The CA file is not read here (see [`crate::tls::load_upstream_tls`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamTlsConfig {
    /// `ca`: PEM certificates of the CA (or CAs) that issue the instances' certificates,
    /// resolved against the config file's directory.
    pub ca: PathBuf,
    /// `server_name`: the DNS name or IP address the instances' certificates are verified for
    /// (and sent as SNI when a DNS name). Default none: each instance's own IP address.
    pub server_name: Option<String>,
}

/// `affinity = { ... }`: a session that began on the colour live before a promotion keeps going
/// there for `window` after it, while that colour runs; then the colour is drained.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AffinityConfig {
    /// `cookie`: the name of the cookie cutover signs, an HTTP token. Default `cutover_session`.
    pub cookie: String,
    /// `window`: how long after a promotion the old colour keeps its sessions, and how long a
    /// cookie lives. Above 0. Default 15m.
    pub window: Duration,
    /// `app_cookie`: the application's own session cookie, followed too: the colour that first
    /// saw a session (a response setting it, or its first request) keeps it while pinned.
    /// Default none.
    pub app_cookie: Option<String>,
}

/// The default name of the affinity cookie.
pub const DEFAULT_AFFINITY_COOKIE: &str = "cutover_session";
/// The default affinity window.
pub const DEFAULT_AFFINITY_WINDOW: Duration = Duration::from_secs(15 * 60);

impl ServiceConfig {
    /// True for the service that answers hosts no other service claims.
    pub fn is_default(&self) -> bool {
        self.hosts.is_empty()
    }
}

/// How a service's instances are run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Driver {
    /// `command` given: cutover starts `instances` copies of it per colour, each on a free
    /// loopback port passed as `{port}` in the command and as `PORT` in the environment.
    /// A command that uses neither is accepted: many frameworks read `PORT` by themselves.
    Process {
        /// The command line, `{port}` not yet substituted.
        command: String,
        /// `instances`: copies per colour, 1 to [`MAX_INSTANCES`]. Default 1; use 2 or more so
        /// that one crashing instance does not fail requests while it restarts.
        instances: u32,
    },
    /// No `command`: the instances run elsewhere and each deploy names their addresses.
    Static,
}

/// `[fleet]`: this node is one of several that serve the same services, share their state in
/// etcd, and switch together. One node leads (runs the deployments); every node applies each
/// route revision and acknowledges it. Services with `command` run on every node: each node
/// runs its own instances and routes to them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetConfig {
    /// `etcd`: the client URLs of the etcd members, `http://HOST:PORT` or `https://HOST:PORT`.
    /// Required, at least one.
    pub etcd: Vec<String>,
    /// `node`: this node's name in the fleet, 1 to 63 of `A-Z a-z 0-9 . _ -`. Default: the host
    /// name. Unique in the fleet: a second node of the same name is refused.
    pub node: String,
    /// `prefix`: the etcd key prefix all of cutover's keys go under. Default `/cutover`; fleets
    /// that share an etcd cluster give each its own.
    pub prefix: String,
    /// `user` and `password_file`: when etcd's authentication is on. Both or neither; the file
    /// holds the password (its first line), read at start.
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
    /// `tls = { ca, cert, key }`: TLS towards etcd (with `https://` URLs). `ca` verifies the
    /// members; `cert` and `key`, both or neither, are this node's client certificate.
    pub tls: Option<FleetTls>,
    /// `ack_timeout`: how long a switch waits for every node to acknowledge it. Default 10s.
    pub ack_timeout: Duration,
    /// `on_missing_ack`: what a switch does when a node has not acknowledged it in
    /// `ack_timeout`: `"rollback"` (default: every node goes back to the colour that was live) or
    /// `"proceed"` (the switch stands; the node is named and catches up when it can).
    pub on_missing_ack: OnMissingAck,
    /// `lease_ttl`: whole seconds, 2 to 300. A node that stops (or loses etcd) leaves the fleet
    /// after this, and a leader that stops is replaced within it. Default 10s.
    pub lease_ttl: Duration,
}

/// `[fleet] tls`: PEM files for the connection to etcd, resolved against the config's directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetTls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// `[fleet] on_missing_ack`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnMissingAck {
    Rollback,
    Proceed,
}

impl OnMissingAck {
    pub fn as_str(self) -> &'static str {
        match self {
            OnMissingAck::Rollback => "rollback",
            OnMissingAck::Proceed => "proceed",
        }
    }
}

/// The default `[fleet] ack_timeout`.
pub const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// The default `[fleet] lease_ttl`.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);
/// The default `[fleet] prefix`.
pub const DEFAULT_FLEET_PREFIX: &str = "/cutover";

/// `health = { ... }`: active checks of each instance, before and after promotion.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthConfig {
    /// `path`: requested with GET; starts with `/`. Default `/`.
    pub path: String,
    /// `interval`: time between checks of one instance, above 0. Default 1s.
    pub interval: Duration,
    /// `timeout`: a check not answered in time fails. May be longer than `interval`: checks of
    /// one instance never overlap, the next starts when the previous ended. Default half the
    /// interval.
    pub timeout: Duration,
    /// `healthy`: successes in a row that make an instance healthy, 1 to 100. Default 2.
    pub healthy: u32,
    /// `unhealthy`: failures in a row that take it out of rotation, 1 to 100. Default 3.
    pub unhealthy: u32,
    /// `deadline`: how long a new release's instances have to become healthy before the
    /// deployment is aborted. Above 0. Default 60s. An instance that is crash-looping before
    /// (it exited within 10s of its start [`crate::process::CRASH_LOOP_EXITS`] times in a row)
    /// aborts the deployment at once.
    pub deadline: Duration,
    /// `host`: the `Host` header of each check. Default: the service's first entry of `hosts`,
    /// or without hosts the instance's address (`127.0.0.1:4001`), so that an application that
    /// answers only its own names (Django's `ALLOWED_HOSTS`, a virtual host) passes.
    pub host: Option<String>,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            path: "/".to_string(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            healthy: 2,
            unhealthy: 3,
            deadline: Duration::from_secs(60),
            host: None,
        }
    }
}

/// `validate = { ... }`: the smoke test of a release, run against the preview route.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidateConfig {
    /// `smoke` (required in the table): exit status 0 passes. Runs with `CUTOVER_PREVIEW_URL`
    /// and `CUTOVER_PREVIEW_TOKEN` in its environment.
    pub smoke: String,
    /// `timeout`: a smoke command still running after this fails (and is killed). Above 0.
    /// Default 60s.
    pub timeout: Duration,
    /// `mirror`: after the smoke test passes, copies of a sample of the live requests go to the
    /// release for a while, and their answers are compared with the live ones. Default none.
    pub mirror: Option<MirrorConfig>,
}

/// `validate.mirror = { ... }`: copies of live requests sent to the release being validated
/// (`cutover_proxy::Mirror`); promotion waits for the window and the release fails validation
/// when its answers compare badly with the live ones.
#[derive(Clone, Debug, PartialEq)]
pub struct MirrorConfig {
    /// `sample`: the share of live requests copied, above 0 and at most 1. Default 0.1.
    pub sample: f64,
    /// `duration`: how long copies are sent. Above 0. Default 2m.
    pub duration: Duration,
    /// `methods`: the methods copied, of the safe ones (GET, HEAD, OPTIONS, TRACE): a copy of a
    /// request that changes something would change it twice. Default GET and HEAD.
    pub methods: Vec<http::Method>,
    /// `max_error_rate`: how far the copies' 5xx rate may be above the live requests' own, 0 to
    /// 1. Default 0.01.
    pub max_error_rate: f64,
    /// `max_p99_ratio`: the copies' p99 latency over the live requests' p99, above 0. Default
    /// 1.5. Differences under [`MIRROR_P99_SLACK`] are not judged.
    pub max_p99_ratio: f64,
    /// `min_requests`: copies answered before anything is judged; with fewer at the end of the
    /// window the release is validated by its smoke test alone (and the output says so). At
    /// least 1. Default 100.
    pub min_requests: u64,
    /// `max_in_flight`: copies sent at once; a sampled request that finds this many running is
    /// not copied (counted as dropped). At least 1. Default 100.
    pub max_in_flight: usize,
}

/// A copies' p99 at most this much above the live p99 passes whatever the ratio: on fast
/// services, a new connection or a scheduling hiccup alone can double a sub-millisecond p99.
pub const MIRROR_P99_SLACK: Duration = Duration::from_millis(5);

impl Default for MirrorConfig {
    fn default() -> Self {
        MirrorConfig {
            sample: 0.1,
            duration: Duration::from_secs(120),
            methods: vec![http::Method::GET, http::Method::HEAD],
            max_error_rate: 0.01,
            max_p99_ratio: 1.5,
            min_requests: 100,
            max_in_flight: 100,
        }
    }
}

/// `migrate = { ... }`: a release's schema change in phases. Each command runs with `/bin/sh -c`
/// in the config's directory, with `CUTOVER_SERVICE`, `CUTOVER_VERSION` (the release whose step
/// it is), `CUTOVER_LIVE_VERSION` (the release live now, if any) and `CUTOVER_MIGRATE_STEP`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MigrateConfig {
    /// `expand`: before the new release's instances start; changes the schema so that both the
    /// live release and the new one work with it. A failure aborts the deployment.
    pub expand: Option<String>,
    /// `contract`: once the colour of the release before is retired (never while an instant
    /// rollback to it is possible); removes what only that release needed.
    pub contract: Option<String>,
    /// `check`: after `expand`, checks the live release still works (exit 0). Default: the
    /// smoke test (`validate.smoke`) run against the live route.
    pub check: Option<String>,
    /// `rollback`: undoes `expand` when the live release fails its check afterwards.
    pub rollback: Option<String>,
    /// `files`: SQL files (globs, relative to the config's directory) linted before `expand`
    /// runs; a statement that breaks the live release refuses the deployment.
    pub files: Vec<String>,
    /// `dialect`: how the files are parsed: postgres (default), sqlite, mysql or generic.
    pub dialect: crate::schema_lint::SqlDialect,
    /// `allow`: kinds of statement the lint lets through (e.g. "drop-column").
    pub allow: Vec<crate::schema_lint::Breaking>,
    /// `timeout`: a command still running after this fails (and is killed). Default 10m.
    pub timeout: Duration,
}

/// `promote = { ... }`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PromoteConfig {
    /// `auto`: promote once validated. Default true; false waits for `cutover promote`, except for
    /// a service's first release, which has no live traffic to guard and goes live once validated.
    pub auto: bool,
    /// `delay`: time between validation and an automatic promotion. Default 0s. Only with
    /// `auto = true`.
    pub delay: Duration,
    /// `steps`: a gradual switch, the percentages of live traffic (of new sessions, with
    /// affinity) sent to the release one after the other, e.g. [10, 50, 100]; rising, the last
    /// 100. Default empty: the single atomic switch.
    pub steps: Vec<u8>,
    /// `step`: how long each step but the last lasts, watched. Default 1m; only with `steps`.
    pub step: Duration,
}

/// How long a step of a gradual switch lasts when `promote.step` is not given.
pub const DEFAULT_PROMOTE_STEP: Duration = Duration::from_secs(60);

impl Default for PromoteConfig {
    fn default() -> Self {
        PromoteConfig {
            auto: true,
            delay: Duration::ZERO,
            steps: Vec::new(),
            step: DEFAULT_PROMOTE_STEP,
        }
    }
}

/// `watch = { ... }`: the window after a promotion in which the new colour is judged, from the
/// proxy's own counters, and rolled back automatically if it fails.
#[derive(Clone, Debug, PartialEq)]
pub struct WatchConfig {
    /// `duration`: length of the window. Default 5m; 0s skips the watch.
    pub duration: Duration,
    /// `max_error_rate`: failed requests over requests, 0 to 1. Default 0.01.
    pub max_error_rate: f64,
    /// `max_p99`: the 99th percentile latency above which the release is rolled back. Above 0.
    /// Default none: latency is not judged (a sensible bound depends on the app). The p99 is an
    /// estimate within 6.25 % (see [`cutover_proxy::StatsSnapshot::quantile`]): a release whose
    /// p99 is more than 6.25 % below the maximum stays, one more than 6.25 % above is rolled back.
    pub max_p99: Option<Duration>,
    /// `min_requests`: error rate and latency are judged only after this many requests, so that
    /// one early failure is not a 100% error rate. At least 1. Default 100.
    pub min_requests: u64,
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig {
            duration: Duration::from_secs(300),
            max_error_rate: 0.01,
            max_p99: None,
            min_requests: 100,
        }
    }
}

/// The events webhooks receive when `events` is not given: the ones an operator acts on.
pub const DEFAULT_WEBHOOK_EVENTS: &[EventKind] = &[
    EventKind::Started,
    EventKind::Promoted,
    EventKind::RolledBack,
    EventKind::Aborted,
];

/// Most retries of one webhook delivery: with the pause doubling after each failed attempt, ten
/// retries already spread over minutes.
pub const MAX_WEBHOOK_RETRIES: u32 = 10;

/// `[webhooks]`: deployment events POSTed as JSON to a list of URLs. The whole table is optional;
/// when it is written, `urls` is required (an empty list is allowed: it turns webhooks off).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhooksConfig {
    /// `urls`: one URL or a list, `http://` only, no duplicates. Default none.
    pub urls: Vec<WebhookUrl>,
    /// `timeout`: one delivery attempt (connect, send, response head) not done within this
    /// fails. Above 0. Default 5s.
    pub timeout: Duration,
    /// `retries`: attempts after the first failed one, 0 to [`MAX_WEBHOOK_RETRIES`]. Default 3.
    pub retries: u32,
    /// `events`: the event kinds sent (see [`EventKind::as_str`] for their names), in the order
    /// written, never empty. Default [`DEFAULT_WEBHOOK_EVENTS`].
    pub events: Vec<EventKind>,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        WebhooksConfig {
            urls: Vec::new(),
            timeout: Duration::from_secs(5),
            retries: 3,
            events: DEFAULT_WEBHOOK_EVENTS.to_vec(),
        }
    }
}

impl WebhooksConfig {
    /// Whether notices of `kind` are sent.
    pub fn selects(&self, kind: EventKind) -> bool {
        self.events.contains(&kind)
    }
}

/// A webhook's URL, taken apart for the HTTP client: `http://HOST[:PORT][/PATH][?QUERY]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookUrl {
    /// As written in the config; what logs show.
    pub url: String,
    /// Where to connect: a DNS name (resolved at each attempt) or an IP address (an IPv6
    /// address without its brackets).
    pub host: String,
    /// The port; 80 when the URL has none.
    pub port: u16,
    /// The `Host` header: host and port as written.
    pub authority: String,
    /// Path and query, starting with `/`: the request target.
    pub target: String,
}

impl fmt::Display for WebhookUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url)
    }
}

impl WebhookUrl {
    /// Parses a webhook URL. Only `http://` is accepted (cutover has no TLS client yet); user
    /// names, passwords and fragments are refused rather than silently dropped. The error is a
    /// complete sentence for the user, without the key.
    pub fn parse(text: &str) -> Result<WebhookUrl, String> {
        const EXAMPLE: &str = "\"http://127.0.0.1:9000/hook\"";
        let not_http = || format!("{text:?} is not an http:// URL; write e.g. {EXAMPLE}");
        let scheme_end = text.find("://").ok_or_else(not_http)?;
        let scheme = &text[..scheme_end];
        if scheme.eq_ignore_ascii_case("https") {
            return Err(format!(
                "{text:?}: https is not supported yet (cutover has no TLS client); use an http:// URL, e.g. a \
                 relay on a private network or this host such as {EXAMPLE}"
            ));
        }
        if !scheme.eq_ignore_ascii_case("http") {
            return Err(not_http());
        }
        if text.contains('#') {
            return Err(format!(
                "{text:?} has a fragment (#...), which is never sent to the server; remove it"
            ));
        }
        let uri: http::Uri = text
            .parse()
            .map_err(|_| format!("{text:?} is not a valid URL; write e.g. {EXAMPLE}"))?;
        let authority = uri.authority().ok_or_else(not_http)?.as_str();
        if authority.contains('@') {
            return Err(format!(
                "{text:?} has a user name or password, which cutover does not send; put a secret in the \
                 path or query instead, or remove it"
            ));
        }
        // The port is checked by hand: `http` reads "host:99999" as "no port".
        let (host, port) = match authority.strip_prefix('[') {
            Some(rest) => {
                let (ip, after) = rest.split_once(']').ok_or_else(not_http)?;
                if ip.parse::<std::net::Ipv6Addr>().is_err() {
                    return Err(format!("{text:?}: [{ip}] is not an IPv6 address"));
                }
                (ip, after.strip_prefix(':'))
            }
            None => match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            },
        };
        let port = match port {
            None => 80,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 => n,
                _ => return Err(format!("{text:?}: {p:?} is not a port; write a number from 1 to 65535")),
            },
        };
        let label_ok = |l: &str| {
            !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if !authority.starts_with('[') && (host.len() > 253 || !host.split('.').all(label_ok)) {
            return Err(format!("{text:?}: {host:?} is not a host name or IP address"));
        }
        Ok(WebhookUrl {
            url: text.to_string(),
            host: host.to_string(),
            port,
            authority: authority.to_string(),
            target: uri.path_and_query().map_or("/", |p| p.as_str()).to_string(),
        })
    }

    /// Whether two URLs reach the same endpoint (host names compare without case).
    fn same_endpoint(&self, other: &WebhookUrl) -> bool {
        self.host.eq_ignore_ascii_case(&other.host) && self.port == other.port && self.target == other.target
    }
}

const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
const DEFAULT_STATE_DIR: &str = ".cutover";
const DEFAULT_INSTANCES: u32 = 1;
const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_CLOSE_WINDOW: Duration = Duration::from_secs(5);
const DEFAULT_KEEP_WARM: Duration = Duration::from_secs(3600);
const DEFAULT_SMOKE_TIMEOUT: Duration = Duration::from_secs(60);

/// The methods `validate.mirror.methods` accepts: the safe ones (RFC 9110 §9.2.1).
const SAFE_METHODS: [&str; 4] = ["GET", "HEAD", "OPTIONS", "TRACE"];
/// The default `migrate.timeout`.
const DEFAULT_MIGRATE_TIMEOUT: Duration = Duration::from_secs(600);

/// Where in a file something is. Lines and columns count from 1; columns count characters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub file: String,
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.column)
    }
}

/// Why a configuration was refused. Display is the whole message for the user; every config
/// error is a usage error (the binary exits with 2).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: cannot read the config file: {source}; check the path, or name another file with -c FILE", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    /// The text is not TOML. `key` is a best guess from the surrounding lines, when there is one.
    #[error("{location}: {}{message}", key.as_deref().map(|k| format!("{k}: ")).unwrap_or_default())]
    Syntax {
        location: Location,
        key: Option<String>,
        message: String,
    },
    /// Valid TOML that is not a valid configuration: an unknown key, a value of the wrong type or
    /// out of range, or keys that contradict each other. `key` is where the fix belongs.
    #[error("{location}: {key}: {message}")]
    Invalid {
        location: Location,
        key: String,
        message: String,
    },
}

impl ConfigError {
    /// Where the error is, unless the file could not be read at all.
    pub fn location(&self) -> Option<&Location> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Syntax { location, .. } | ConfigError::Invalid { location, .. } => Some(location),
        }
    }

    /// The dotted key the error is about (`services.web.health.interval`), when known.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Syntax { key, .. } => key.as_deref(),
            ConfigError::Invalid { key, .. } => Some(key),
        }
    }
}

impl Config {
    /// Reads and validates a config file. Relative paths in it (`state_dir`, `admin`,
    /// `token_file`) are resolved against the file's directory, which becomes [`Config::dir`].
    pub fn load(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let dir = path.parent().unwrap_or(Path::new(""));
        Checker::new(&text, &path.display().to_string())?.config(dir)
    }

    /// Validates config text. `file_name` only appears in messages; relative paths stay as
    /// written (relative to the current directory) and [`Config::dir`] is empty.
    pub fn parse(text: &str, file_name: &str) -> Result<Config, ConfigError> {
        Checker::new(text, file_name)?.config(Path::new(""))
    }

    /// The configuration of [`EXAMPLE`].
    pub fn example() -> Config {
        // Cannot fail: the test `example_parses` parses exactly this text.
        Config::parse(EXAMPLE, "example").expect("EXAMPLE is a valid config")
    }

    /// Whether any listener speaks TLS.
    pub fn has_tls_listeners(&self) -> bool {
        !self.server.listen_tls.is_empty() || !self.server.preview_listen_tls.is_empty()
    }

    /// The service called `name`.
    pub fn service(&self, name: &str) -> Option<&ServiceConfig> {
        self.services.iter().find(|s| s.name == name)
    }

    /// The data plane's configuration: listeners, workers and the `[proxy]` settings.
    pub fn proxy_config(&self) -> ProxyConfig {
        let live = self.server.listen.iter().map(|&addr| ListenerConfig {
            addr,
            preview: false,
            tls: false,
        });
        let preview = self.server.preview_listen.iter().map(|&addr| ListenerConfig {
            addr,
            preview: true,
            tls: false,
        });
        let live_tls = self.server.listen_tls.iter().map(|&addr| ListenerConfig {
            addr,
            preview: false,
            tls: true,
        });
        let preview_tls = self.server.preview_listen_tls.iter().map(|&addr| ListenerConfig {
            addr,
            preview: true,
            tls: true,
        });
        let p = &self.proxy;
        ProxyConfig {
            listeners: live.chain(preview).chain(live_tls).chain(preview_tls).collect(),
            workers: self.server.workers,
            client_header_timeout: p.client_header_timeout,
            idle_timeout: p.idle_timeout,
            send_timeout: p.send_timeout,
            connect_timeout: p.connect_timeout,
            upstream_timeout: p.upstream_timeout,
            upstream_idle_timeout: p.upstream_idle_timeout,
            upstream_pool_size: p.upstream_pool_size,
            max_connections: p.max_connections,
            max_header_bytes: p.max_header_bytes,
            shutdown_timeout: p.shutdown_timeout,
            retry_idempotent: p.retry_idempotent,
            preempt_interval: p.preempt_interval,
            tls_handshake_timeout: p.tls_handshake_timeout,
            trusted_proxies: p.trusted_proxies.clone(),
            proxy_protocol: p.proxy_protocol,
            // Counting stays on in the daemon: the post-promotion watch reads the counters.
            ..ProxyConfig::default()
        }
    }
}

const DURATION_HINT: &str = "write a whole number followed by us, ms, s, m or h, e.g. \"500ms\"";

/// Parses a duration as written in the config: a whole number directly followed by `ms`, `s`,
/// `m` or `h` ("250ms", "30s", "5m", "1h"). No spaces, signs, fractions or other units. The error
/// is a complete sentence for the user, without the key.
/// `HOST:PORT` of a URL: a host name or an IP address (IPv6 in brackets), and a port.
fn valid_host_port(text: &str) -> bool {
    let text = text.strip_suffix('/').unwrap_or(text);
    let Some((host, port)) = text.rsplit_once(':') else {
        return false;
    };
    let host_ok = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        v6.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !host.is_empty() && host.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
    };
    host_ok && port.parse::<u16>().is_ok_and(|p| p > 0)
}

fn valid_node_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// This host's name, the default node name ("" when it cannot be read, which the caller refuses).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = text.split_at(digits);
    let micros_per_unit: u64 = match unit {
        "us" => 1,
        "ms" => 1_000,
        "s" => 1_000_000,
        "m" => 60_000_000,
        "h" => 3_600_000_000,
        _ => return Err(format!("{text:?} is not a duration; {DURATION_HINT}")),
    };
    if number.is_empty() {
        return Err(format!("{text:?} is not a duration; {DURATION_HINT}"));
    }
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(micros_per_unit))
        .map(Duration::from_micros)
        // The state store keeps durations in signed 64-bit nanoseconds: a longer one would pass
        // here and then fail every commit that carries it.
        .filter(|d| *d <= crate::store::LONGEST_DURATION)
        .ok_or_else(|| {
            format!(
                "{text:?} is too long a duration (the longest cutover keeps is about 292 years, \"2562047h\"); \
                 write at most a few days, e.g. \"72h\""
            )
        })
}

// ---------------------------------------------------------------------------------------------
// Raw shape: what serde reads. Leaves keep their spans and any TOML type; checks come later.

type Leaf = Option<Spanned<Value>>;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, expecting = "a table")]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    proxy: RawProxy,
    services: Option<BTreeMap<Spanned<String>, RawService>>,
    webhooks: Option<RawWebhooks>,
    fleet: Option<RawFleet>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table, e.g. [fleet]")]
struct RawFleet {
    etcd: Option<Spanned<RawList>>,
    node: Leaf,
    prefix: Leaf,
    user: Leaf,
    password_file: Leaf,
    tls: Option<RawFleetTls>,
    ack_timeout: Leaf,
    on_missing_ack: Leaf,
    lease_ttl: Leaf,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a table, e.g. tls = { ca = \"certs/etcd-ca.pem\", cert = \"certs/node.pem\", key = \"certs/node.key\" }"
)]
struct RawFleetTls {
    ca: Leaf,
    cert: Leaf,
    key: Leaf,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, expecting = "a table, e.g. [server]")]
struct RawServer {
    listen: Option<Spanned<RawList>>,
    preview_listen: Option<Spanned<RawList>>,
    admin: Leaf,
    token_file: Leaf,
    state_dir: Leaf,
    workers: Leaf,
    listen_tls: Option<Spanned<RawList>>,
    preview_listen_tls: Option<Spanned<RawList>>,
    tls: Option<RawTls>,
    admin_tls: Option<RawAdminTls>,
    admin_plaintext: Leaf,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a table, e.g. admin_tls = { cert = \"certs/admin.pem\", key = \"certs/admin.key\" }"
)]
struct RawAdminTls {
    cert: Leaf,
    key: Leaf,
    ca: Leaf,
    server_name: Leaf,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a table, e.g. tls = { cert = \"certs/shop.pem\", key = \"certs/shop.key\" }"
)]
struct RawTls {
    cert: Leaf,
    key: Leaf,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a table, e.g. upstream_tls = { ca = \"certs/internal-ca.pem\", server_name = \"api.internal\" }"
)]
struct RawUpstreamTls {
    ca: Leaf,
    server_name: Leaf,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, expecting = "a table, e.g. [proxy]")]
struct RawProxy {
    client_header_timeout: Leaf,
    idle_timeout: Leaf,
    send_timeout: Leaf,
    connect_timeout: Leaf,
    upstream_timeout: Leaf,
    upstream_idle_timeout: Leaf,
    upstream_pool_size: Leaf,
    max_connections: Leaf,
    max_header_bytes: Leaf,
    shutdown_timeout: Leaf,
    retry_idempotent: Leaf,
    preempt_interval: Leaf,
    tls_handshake_timeout: Leaf,
    trusted_proxies: Option<Spanned<RawList>>,
    proxy_protocol: Leaf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table, e.g. [webhooks]")]
struct RawWebhooks {
    urls: Option<Spanned<RawList>>,
    timeout: Leaf,
    retries: Leaf,
    events: Option<Spanned<RawList>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table, e.g. [services.web]")]
struct RawService {
    hosts: Option<Spanned<RawList>>,
    command: Leaf,
    instances: Leaf,
    health: Option<RawHealth>,
    drain_timeout: Leaf,
    close_window: Leaf,
    keep_warm: Leaf,
    validate: Option<RawValidate>,
    promote: Option<RawPromote>,
    watch: Option<RawWatch>,
    balance: Leaf,
    tls: Option<RawTls>,
    https_redirect: Leaf,
    upstream_tls: Option<RawUpstreamTls>,
    affinity: Option<RawAffinity>,
    migrate: Option<RawMigrate>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a table, e.g. migrate = { expand = \"./migrate expand\", contract = \"./migrate contract\" }"
)]
struct RawMigrate {
    expand: Leaf,
    contract: Leaf,
    check: Leaf,
    rollback: Leaf,
    files: Option<Spanned<RawList>>,
    dialect: Leaf,
    allow: Option<Spanned<RawList>>,
    timeout: Leaf,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a table, e.g. affinity = { cookie = \"cutover_session\", window = \"15m\" }"
)]
struct RawAffinity {
    cookie: Leaf,
    window: Leaf,
    app_cookie: Leaf,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a table, e.g. health = { path = \"/up\", interval = \"1s\" }"
)]
struct RawHealth {
    path: Leaf,
    host: Leaf,
    interval: Leaf,
    timeout: Leaf,
    healthy: Leaf,
    unhealthy: Leaf,
    deadline: Leaf,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a table, e.g. validate = { smoke = \"./smoke.sh\" }"
)]
struct RawValidate {
    smoke: Leaf,
    timeout: Leaf,
    mirror: Option<Spanned<RawMirror>>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a table, e.g. mirror = { sample = 0.1, duration = \"2m\" }"
)]
struct RawMirror {
    sample: Leaf,
    duration: Leaf,
    methods: Option<Spanned<RawList>>,
    max_error_rate: Leaf,
    max_p99_ratio: Leaf,
    min_requests: Leaf,
    max_in_flight: Leaf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table, e.g. promote = { auto = false }")]
struct RawPromote {
    auto: Leaf,
    delay: Leaf,
    steps: Leaf,
    step: Leaf,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a table, e.g. watch = { duration = \"5m\", max_error_rate = 0.01 }"
)]
struct RawWatch {
    duration: Leaf,
    max_error_rate: Leaf,
    max_p99: Leaf,
    min_requests: Leaf,
}

/// "One or a list": a single string, or an array whose elements keep their own spans.
/// Anything else is kept as a description for the error message.
enum RawList {
    One(String),
    Many(Vec<Spanned<Value>>),
    Other(String),
}

impl<'de> Deserialize<'de> for RawList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<RawList, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawList;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or an array of strings")
            }
            fn visit_str<E>(self, s: &str) -> Result<RawList, E> {
                Ok(RawList::One(s.to_string()))
            }
            fn visit_bool<E>(self, b: bool) -> Result<RawList, E> {
                Ok(RawList::Other(b.to_string()))
            }
            fn visit_i64<E>(self, n: i64) -> Result<RawList, E> {
                Ok(RawList::Other(n.to_string()))
            }
            fn visit_u64<E>(self, n: u64) -> Result<RawList, E> {
                Ok(RawList::Other(n.to_string()))
            }
            fn visit_f64<E>(self, x: f64) -> Result<RawList, E> {
                Ok(RawList::Other(x.to_string()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawList, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<Spanned<Value>>()? {
                    items.push(item);
                }
                Ok(RawList::Many(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawList, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(RawList::Other("a table".to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

// ---------------------------------------------------------------------------------------------
// Key index: every key's dotted path and the span of the key itself, in document order.

struct CollectKeys<'a> {
    prefix: String,
    out: &'a mut Vec<(String, Range<usize>)>,
}

impl<'de> DeserializeSeed<'de> for CollectKeys<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for CollectKeys<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any TOML value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq
            .next_element_seed(CollectKeys {
                prefix: self.prefix.clone(),
                out: &mut *self.out,
            })?
            .is_some()
        {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        loop {
            // toml hands a date-time to deserialize_any as a one-entry map whose key has no
            // span; it is a leaf, so stop there.
            let key = match map.next_key::<Spanned<String>>() {
                Ok(Some(key)) => key,
                Ok(None) | Err(_) => return Ok(()),
            };
            let segment = key_segment(key.get_ref());
            let path = if self.prefix.is_empty() {
                segment
            } else {
                format!("{}.{segment}", self.prefix)
            };
            self.out.push((path.clone(), key.span()));
            map.next_value_seed(CollectKeys {
                prefix: path,
                out: &mut *self.out,
            })?;
        }
    }
}

/// A key as it is written in a dotted path: bare when TOML allows it (letters, digits, `-`, `_`),
/// quoted otherwise, so that an empty key (`[""]`) or one with a dot in it is still named.
fn key_segment(key: &str) -> String {
    if !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        key.to_string()
    } else {
        format!("{key:?}")
    }
}

// ---------------------------------------------------------------------------------------------
// Checks.

struct Checker<'a> {
    text: &'a str,
    file: &'a str,
    keys: Vec<(String, Range<usize>)>,
}

impl<'a> Checker<'a> {
    /// Parses the key index; a failure is a TOML syntax error.
    fn new(text: &'a str, file: &'a str) -> Result<Checker<'a>, ConfigError> {
        let mut keys = Vec::new();
        let parsed = CollectKeys {
            prefix: String::new(),
            out: &mut keys,
        }
        .deserialize(toml::Deserializer::new(text));
        let mut checker = Checker { text, file, keys };
        if let Err(e) = parsed {
            let offset = e.span().map_or(0, |s| s.start);
            let rest_of_line = text.get(offset..).and_then(|t| t.lines().next()).unwrap_or("");
            let line_before = text.get(..offset).and_then(|t| t.rsplit('\n').next()).unwrap_or("");
            return Err(ConfigError::Syntax {
                location: checker.location(offset),
                key: guess_key(text, offset),
                message: syntax_message(e.message(), rest_of_line, line_before.contains('=')),
            });
        }
        checker.keys.sort_by_key(|(_, span)| span.start);
        Ok(checker)
    }

    fn location(&self, offset: usize) -> Location {
        let (line, column) = line_col(self.text, offset);
        Location {
            file: self.file.to_string(),
            line,
            column,
        }
    }

    fn invalid(&self, offset: usize, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            location: self.location(offset),
            key: key.to_string(),
            message: message.into(),
        }
    }

    fn at<T>(&self, value: &Spanned<T>, key: &str, message: impl Into<String>) -> ConfigError {
        self.invalid(value.span().start, key, message)
    }

    /// Where `path` is written; for a key that is not written, where its nearest written
    /// ancestor is (e.g. the `[services.api]` header for a missing `services.api.hosts`).
    fn key_offset(&self, path: &str) -> usize {
        let mut path = path;
        loop {
            if let Some((_, span)) = self.keys.iter().find(|(p, _)| p == path) {
                return span.start;
            }
            match path.rfind('.') {
                Some(dot) => path = &path[..dot],
                None => return 0,
            }
        }
    }

    /// The key an offset belongs to: the key written there, or else the last key written
    /// before it (whose value the offset is in).
    fn key_at(&self, offset: usize) -> Option<&str> {
        if let Some((path, _)) = self.keys.iter().find(|(_, span)| span.contains(&offset)) {
            return Some(path);
        }
        self.keys
            .iter()
            .take_while(|(_, span)| span.start <= offset)
            .last()
            .map(|(p, _)| p.as_str())
    }

    /// Turns a serde error of the raw pass (unknown key, table of the wrong type) into ours.
    fn schema_error(&self, e: toml::de::Error) -> ConfigError {
        let offset = e.span().map_or(0, |s| s.start);
        let key = self.key_at(offset).unwrap_or("(top level)").to_string();
        let message = e.message();
        let message = if message.starts_with("unknown field") {
            unknown_key_message(message)
        } else {
            format!(
                "{}; see `cutover quickstart` or the docs for an example config",
                message.replace('\n', ", ")
            )
        };
        self.invalid(offset, &key, message)
    }

    fn config(&self, dir: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(self.text).map_err(|e| self.schema_error(e))?;
        let server = self.server(&raw.server, dir)?;
        let proxy = self.proxy(&raw.proxy)?;
        let webhooks = match &raw.webhooks {
            None => WebhooksConfig::default(),
            Some(w) => self.webhooks(w)?,
        };

        let fleet = match &raw.fleet {
            None => None,
            Some(f) => Some(self.fleet(f, dir)?),
        };

        let raw_services = raw.services.unwrap_or_default();
        if raw_services.is_empty() {
            return Err(self.invalid(
                self.key_offset("services"),
                "services",
                "no services are defined; add one, e.g. a [services.web] table with command = \"./web --port {port}\"",
            ));
        }
        // File order, so that "a second default" and "already claimed" point at the later one.
        let mut in_file_order: Vec<_> = raw_services.iter().collect();
        in_file_order.sort_by_key(|(name, _)| name.span().start);
        let mut default: Option<(&str, usize)> = None;
        let mut claimed: BTreeMap<String, (String, usize)> = BTreeMap::new();
        let mut services = Vec::new();
        for (name, raw_service) in in_file_order {
            let (service, host_offsets) = self.service(name, raw_service, dir)?;
            let key = format!("services.{}.hosts", service.name);
            if service.is_default() {
                let here = raw_service.hosts.as_ref().map_or(name.span().start, |h| h.span().start);
                if let Some((first, first_offset)) = default {
                    return Err(self.invalid(
                        here,
                        &key,
                        format!(
                            "services.{first} (line {}) is already the default service (no hosts), and there can \
                             be only one; give one of them hosts = [\"...\"]",
                            self.location(first_offset).line
                        ),
                    ));
                }
                default = Some((name.get_ref(), here));
            }
            for (host, offset) in service.hosts.iter().zip(host_offsets) {
                if let Some((owner, owner_offset)) = claimed.get(host) {
                    let message = if *owner == service.name {
                        format!("{host:?} is listed twice; remove one")
                    } else {
                        format!(
                            "{host:?} is already claimed by services.{owner} (line {}); a host belongs to one \
                             service only, remove it from one of them",
                            self.location(*owner_offset).line
                        )
                    };
                    return Err(self.invalid(offset, &key, message));
                }
                claimed.insert(host.clone(), (service.name.clone(), offset));
            }
            services.push(service);
        }
        services.sort_by(|a, b| a.name.cmp(&b.name));
        self.tls_consistent(&server, &services)?;
        if fleet.is_some() {
            if let Some(s) = services.iter().find(|s| !s.promote.steps.is_empty()) {
                let key = format!("services.{}.promote.steps", s.name);
                return Err(self.invalid(
                    self.key_offset(&key),
                    &key,
                    "a gradual switch is not available in a fleet: its nodes apply whole switches only; remove steps, \
                     or run this service without [fleet]",
                ));
            }
        }
        Ok(Config {
            server,
            proxy,
            services,
            webhooks,
            fleet,
            dir: dir.to_path_buf(),
        })
    }

    fn server(&self, raw: &RawServer, dir: &Path) -> Result<ServerConfig, ConfigError> {
        let listen = match &raw.listen {
            None => vec![(DEFAULT_LISTEN.parse().expect("a valid literal address"), 0)],
            Some(list) => self.addresses(list, "server.listen", false)?,
        };
        let preview_listen = match &raw.preview_listen {
            None => Vec::new(),
            Some(list) => self.addresses(list, "server.preview_listen", true)?,
        };
        let listen_tls = match &raw.listen_tls {
            None => Vec::new(),
            Some(list) => self.addresses(list, "server.listen_tls", true)?,
        };
        let preview_listen_tls = match &raw.preview_listen_tls {
            None => Vec::new(),
            Some(list) => self.addresses(list, "server.preview_listen_tls", true)?,
        };
        // Two listeners on one port would either fail to bind at start or, with SO_REUSEPORT,
        // silently share connections between live and preview traffic (or TLS and plain).
        let mut seen: Vec<(SocketAddr, &str)> = Vec::new();
        for (key, list) in [
            ("server.listen", &listen),
            ("server.preview_listen", &preview_listen),
            ("server.listen_tls", &listen_tls),
            ("server.preview_listen_tls", &preview_listen_tls),
        ] {
            for &(addr, offset) in list {
                if let Some((other, other_key)) = seen.iter().find(|(a, _)| overlaps(*a, addr)) {
                    return Err(self.invalid(
                        offset,
                        key,
                        format!("{addr} collides with {other} in {other_key}; give each listener its own port"),
                    ));
                }
                seen.push((addr, key));
            }
        }

        let state_dir = match &raw.state_dir {
            None => PathBuf::from(DEFAULT_STATE_DIR),
            Some(v) => self.path(v, "server.state_dir", "state_dir = \".cutover\"")?,
        };
        let token_file = match &raw.token_file {
            None => None,
            Some(v) => Some(dir.join(self.path(v, "server.token_file", "token_file = \".cutover/admin.token\"")?)),
        };
        let admin = match &raw.admin {
            None => Admin::Unix(dir.join(&state_dir).join("admin.sock")),
            Some(v) => {
                let text = self.string(v, "server.admin", "admin = \"unix:.cutover/admin.sock\"")?;
                let admin = if let Some(path) = text.strip_prefix("unix:") {
                    if path.is_empty() {
                        return Err(self.at(
                            v,
                            "server.admin",
                            "the unix socket path is empty; write e.g. \"unix:.cutover/admin.sock\"",
                        ));
                    }
                    Admin::Unix(dir.join(path))
                } else {
                    match text.parse::<SocketAddr>() {
                        Ok(addr) => Admin::Tcp(addr),
                        Err(_) => {
                            return Err(self.at(
                                v,
                                "server.admin",
                                format!(
                                    "{text:?} is not an admin address; write \"unix:PATH\" for a unix socket or \
                                     IP:PORT for TCP, e.g. \"127.0.0.1:9901\" (host names are not resolved)"
                                ),
                            ))
                        }
                    }
                };
                if let Admin::Tcp(addr) = admin {
                    if token_file.is_none() {
                        return Err(self.at(
                            v,
                            "server.token_file",
                            format!(
                                "missing: the admin API on TCP ({addr}) requires a bearer token; add token_file = \
                                 \".cutover/admin.token\" to [server], or use admin = \"unix:.cutover/admin.sock\""
                            ),
                        ));
                    }
                    if let Some((other, other_key)) = seen.iter().find(|(a, _)| overlaps(*a, addr)) {
                        return Err(self.at(
                            v,
                            "server.admin",
                            format!("{addr} collides with {other} in {other_key}; give the admin API its own port"),
                        ));
                    }
                }
                admin
            }
        };
        let workers = match &raw.workers {
            None => 1,
            Some(v) => self.int(v, "server.workers", 1, 256, "a proxy needs a worker thread")? as usize,
        };
        let tls = match &raw.tls {
            None => None,
            Some(t) => Some(self.tls_files(t, "server.tls", dir)?),
        };
        let admin_plaintext = match &raw.admin_plaintext {
            None => false,
            Some(v) => self.boolean(v, "server.admin_plaintext")?,
        };
        let admin_tls = match &raw.admin_tls {
            None => None,
            Some(t) => Some(self.admin_tls(t, &admin, admin_plaintext, dir)?),
        };
        if let (Admin::Tcp(addr), None, false) = (&admin, &admin_tls, admin_plaintext) {
            if !addr.ip().is_loopback() {
                let offset = raw
                    .admin
                    .as_ref()
                    .map_or(self.key_offset("server.admin"), |v| v.span().start);
                return Err(self.invalid(
                    offset,
                    "server.admin",
                    format!(
                        "{addr} is not a loopback address, and the admin API's bearer token would cross the \
                         network in cleartext; add admin_tls = {{ cert = \"certs/admin.pem\", key = \
                         \"certs/admin.key\" }} to [server], or admin_plaintext = true if the network or a tunnel \
                         encrypts it already"
                    ),
                ));
            }
        }
        Ok(ServerConfig {
            listen: listen.into_iter().map(|(a, _)| a).collect(),
            preview_listen: preview_listen.into_iter().map(|(a, _)| a).collect(),
            admin,
            token_file,
            state_dir: dir.join(state_dir),
            workers,
            listen_tls: listen_tls.into_iter().map(|(a, _)| a).collect(),
            preview_listen_tls: preview_listen_tls.into_iter().map(|(a, _)| a).collect(),
            tls,
            admin_tls,
            admin_plaintext,
        })
    }

    fn admin_tls(
        &self,
        raw: &RawAdminTls,
        admin: &Admin,
        plaintext: bool,
        dir: &Path,
    ) -> Result<AdminTls, ConfigError> {
        let p = "server.admin_tls";
        if let Admin::Unix(path) = admin {
            return Err(self.invalid(
                self.key_offset(p),
                p,
                format!(
                    "the admin API is the unix socket {}, which TLS does not apply to; remove admin_tls, or \
                     set admin = \"IP:PORT\" to serve it on TCP",
                    path.display()
                ),
            ));
        }
        if plaintext {
            return Err(self.invalid(
                self.key_offset("server.admin_plaintext"),
                "server.admin_plaintext",
                "admin_plaintext = true allows the admin API without TLS, but admin_tls is set; remove one of the two",
            ));
        }
        let files = self.tls_files(
            &RawTls {
                cert: raw.cert.clone(),
                key: raw.key.clone(),
            },
            p,
            dir,
        )?;
        let ca = match &raw.ca {
            None => None,
            Some(v) => Some(dir.join(self.path(v, &format!("{p}.ca"), "ca = \"certs/admin-ca.pem\"")?)),
        };
        let server_name = match &raw.server_name {
            None => None,
            Some(v) => {
                let key = format!("{p}.server_name");
                let name = self.string(v, &key, "server_name = \"cutover.internal\"")?;
                if rustls::pki_types::ServerName::try_from(name.as_str()).is_err() {
                    return Err(self.at(
                        v,
                        &key,
                        format!("{name:?} is neither a DNS name nor an IP address; write the name the admin certificate was issued for"),
                    ));
                }
                Some(name)
            }
        };
        Ok(AdminTls { files, ca, server_name })
    }

    /// TLS listeners need a certificate, and certificates need a TLS listener.
    fn tls_consistent(&self, server: &ServerConfig, services: &[ServiceConfig]) -> Result<(), ConfigError> {
        let listeners = !server.listen_tls.is_empty() || !server.preview_listen_tls.is_empty();
        let with_tls = services.iter().find(|s| s.tls.is_some());
        if listeners && server.tls.is_none() && with_tls.is_none() {
            let key = if server.listen_tls.is_empty() {
                "server.preview_listen_tls"
            } else {
                "server.listen_tls"
            };
            return Err(self.invalid(
                self.key_offset(key),
                key,
                "a TLS listener needs a certificate, and none is configured; add a default one to [server], \
                 e.g. tls = { cert = \"certs/default.pem\", key = \"certs/default.key\" }, or one per service \
                 (the same key in [services.NAME], for its hosts)",
            ));
        }
        if let Some(s) = services
            .iter()
            .find(|s| s.https_redirect)
            .filter(|_| server.listen_tls.is_empty())
        {
            let key = format!("services.{}.https_redirect", s.name);
            return Err(self.invalid(
                self.key_offset(&key),
                &key,
                "there is no HTTPS listener to redirect to; add listen_tls = [\"0.0.0.0:443\"] to [server] \
                 (with a certificate), or remove https_redirect",
            ));
        }
        if !listeners {
            let key = match (&server.tls, with_tls) {
                (Some(_), _) => Some("server.tls".to_string()),
                (None, Some(s)) => Some(format!("services.{}.tls", s.name)),
                (None, None) => None,
            };
            if let Some(key) = key {
                return Err(self.invalid(
                    self.key_offset(&key),
                    &key,
                    "a certificate is configured but no listener speaks TLS; add listen_tls = [\"0.0.0.0:443\"] \
                     to [server], or remove the certificate",
                ));
            }
        }
        Ok(())
    }

    /// `tls = { cert, key }`: both paths required, resolved against `dir`.
    fn tls_files(&self, raw: &RawTls, p: &str, dir: &Path) -> Result<TlsFiles, ConfigError> {
        let example = "tls = { cert = \"certs/shop.pem\", key = \"certs/shop.key\" }";
        let mut paths = Vec::new();
        for (name, leaf) in [("cert", &raw.cert), ("key", &raw.key)] {
            let key = format!("{p}.{name}");
            match leaf {
                None => {
                    return Err(self.invalid(
                        self.key_offset(p),
                        &key,
                        format!("missing: a certificate needs both its PEM files, e.g. {example}"),
                    ))
                }
                Some(v) => paths.push(dir.join(self.path(v, &key, example)?)),
            }
        }
        let key = paths.pop().unwrap_or_default();
        let cert = paths.pop().unwrap_or_default();
        Ok(TlsFiles { cert, key })
    }

    /// `upstream_tls = { ca, server_name }`: `ca` required, resolved against `dir`; `server_name`
    /// a DNS name or an IP address.
    fn upstream_tls(&self, raw: &RawUpstreamTls, p: &str, dir: &Path) -> Result<UpstreamTlsConfig, ConfigError> {
        let example = "upstream_tls = { ca = \"certs/internal-ca.pem\", server_name = \"api.internal\" }";
        let ca = match &raw.ca {
            None => {
                return Err(self.invalid(
                    self.key_offset(p),
                    &format!("{p}.ca"),
                    format!(
                        "missing: TLS to the instances needs the CA certificates (PEM) their certificates are \
                         verified against, e.g. {example}; or remove upstream_tls to speak plain HTTP to them"
                    ),
                ))
            }
            Some(v) => dir.join(self.path(v, &format!("{p}.ca"), example)?),
        };
        let server_name = match &raw.server_name {
            None => None,
            Some(v) => {
                let key = format!("{p}.server_name");
                let name = self.string(v, &key, "server_name = \"api.internal\"")?;
                cutover_proxy::check_server_name(&name).map_err(|e| {
                    self.at(
                        v,
                        &key,
                        format!("{e}, or remove server_name to verify each instance for its IP address"),
                    )
                })?;
                Some(name)
            }
        };
        Ok(UpstreamTlsConfig { ca, server_name })
    }

    fn proxy(&self, raw: &RawProxy) -> Result<ProxySettings, ConfigError> {
        let d = ProxySettings::default();
        let timeout = |v: &Leaf, key: &str, default: Duration| match v {
            None => Ok(default),
            Some(v) => self.positive_duration(v, &format!("proxy.{key}")),
        };
        let count = |v: &Leaf, key: &str, default: usize, min: i64, max: i64, why: &str| match v {
            None => Ok(default),
            Some(v) => self.int(v, &format!("proxy.{key}"), min, max, why).map(|n| n as usize),
        };
        Ok(ProxySettings {
            client_header_timeout: timeout(
                &raw.client_header_timeout,
                "client_header_timeout",
                d.client_header_timeout,
            )?,
            idle_timeout: timeout(&raw.idle_timeout, "idle_timeout", d.idle_timeout)?,
            send_timeout: timeout(&raw.send_timeout, "send_timeout", d.send_timeout)?,
            connect_timeout: timeout(&raw.connect_timeout, "connect_timeout", d.connect_timeout)?,
            upstream_timeout: timeout(&raw.upstream_timeout, "upstream_timeout", d.upstream_timeout)?,
            upstream_idle_timeout: timeout(
                &raw.upstream_idle_timeout,
                "upstream_idle_timeout",
                d.upstream_idle_timeout,
            )?,
            upstream_pool_size: count(
                &raw.upstream_pool_size,
                "upstream_pool_size",
                d.upstream_pool_size,
                0,
                65_536,
                "0 keeps no idle connection",
            )?,
            max_connections: count(
                &raw.max_connections,
                "max_connections",
                d.max_connections,
                1,
                1_000_000,
                "the proxy must accept at least one connection",
            )?,
            max_header_bytes: count(
                &raw.max_header_bytes,
                "max_header_bytes",
                d.max_header_bytes,
                1024,
                1 << 20,
                "ordinary browsers send heads of a few KiB",
            )?,
            shutdown_timeout: match &raw.shutdown_timeout {
                None => d.shutdown_timeout,
                Some(v) => self.duration(v, "proxy.shutdown_timeout")?,
            },
            retry_idempotent: match &raw.retry_idempotent {
                None => d.retry_idempotent,
                Some(v) => self.boolean(v, "proxy.retry_idempotent")?,
            },
            tls_handshake_timeout: timeout(
                &raw.tls_handshake_timeout,
                "tls_handshake_timeout",
                d.tls_handshake_timeout,
            )?,
            trusted_proxies: match &raw.trusted_proxies {
                None => d.trusted_proxies,
                Some(list) => {
                    let example = "trusted_proxies = [\"10.0.0.0/8\", \"192.0.2.7\"]";
                    let mut blocks = Vec::new();
                    for (text, offset) in self.strings(list, "proxy.trusted_proxies", true, example)? {
                        let block = cutover_proxy::Cidr::parse(text.trim())
                            .map_err(|m| self.invalid(offset, "proxy.trusted_proxies", m))?;
                        blocks.push(block);
                    }
                    blocks
                }
            },
            proxy_protocol: match &raw.proxy_protocol {
                None => d.proxy_protocol,
                Some(v) => {
                    let on = self.boolean(v, "proxy.proxy_protocol")?;
                    if on
                        && raw
                            .trusted_proxies
                            .as_ref()
                            .is_none_or(|l| matches!(l.get_ref(), RawList::Many(m) if m.is_empty()))
                    {
                        return Err(self.at(
                            v,
                            "proxy.proxy_protocol",
                            "only connections from trusted_proxies may say who their client is; \
                             list the load balancers' addresses, e.g. trusted_proxies = [\"10.0.0.0/8\"]"
                                .to_string(),
                        ));
                    }
                    on
                }
            },
            preempt_interval: match &raw.preempt_interval {
                None => d.preempt_interval,
                Some(v) => {
                    let interval = self.duration(v, "proxy.preempt_interval")?;
                    if interval > Duration::from_secs(1) {
                        return Err(self.at(
                            v,
                            "proxy.preempt_interval",
                            format!(
                                "{} is too long to make a difference (the kernel preempts after a few ms anyway); \
                                 write \"0s\" to turn the points off, or a duration up to \"1s\", e.g. \"2ms\"",
                                describe(v.get_ref())
                            ),
                        ));
                    }
                    interval
                }
            },
        })
    }

    fn fleet(&self, raw: &RawFleet, dir: &Path) -> Result<FleetConfig, ConfigError> {
        let example = "etcd = [\"http://10.0.0.1:2379\", \"http://10.0.0.2:2379\", \"http://10.0.0.3:2379\"]";
        let Some(list) = &raw.etcd else {
            return Err(self.invalid(
                self.key_offset("fleet"),
                "fleet.etcd",
                format!(
                    "missing: [fleet] needs the client URLs of the etcd members, e.g. {example}; or remove the table"
                ),
            ));
        };
        let mut etcd: Vec<String> = Vec::new();
        let mut schemes = Vec::new();
        for (text, offset) in self.strings(list, "fleet.etcd", false, example)? {
            let scheme = match text.split_once("://") {
                Some(("http", rest)) | Some(("https", rest)) if valid_host_port(rest) => {
                    text.split_once("://").map(|(s, _)| s.to_string()).unwrap_or_default()
                }
                _ => {
                    return Err(self.invalid(
                        offset,
                        "fleet.etcd",
                        format!("{text:?} is not an etcd client URL; write http://HOST:PORT or https://HOST:PORT, e.g. {example}"),
                    ))
                }
            };
            if etcd.contains(&text) {
                return Err(self.invalid(offset, "fleet.etcd", format!("{text:?} is listed twice; remove one")));
            }
            schemes.push((scheme, offset));
            etcd.push(text);
        }
        let node = match &raw.node {
            None => host_name(),
            Some(v) => {
                let name = self.string(v, "fleet.node", "node = \"edge-1\"")?;
                if !valid_node_name(&name) {
                    return Err(self.at(
                        v,
                        "fleet.node",
                        format!(
                            "{name:?} is not a node name; write 1 to 63 of A-Z a-z 0-9 . _ -, e.g. node = \"edge-1\""
                        ),
                    ));
                }
                name
            }
        };
        if !valid_node_name(&node) {
            return Err(self.invalid(
                self.key_offset("fleet"),
                "fleet.node",
                format!(
                    "the host name {node:?} cannot be a node name (1 to 63 of A-Z a-z 0-9 . _ -); set node = \"NAME\""
                ),
            ));
        }
        let prefix = match &raw.prefix {
            None => DEFAULT_FLEET_PREFIX.to_string(),
            Some(v) => {
                let prefix = self.string(v, "fleet.prefix", "prefix = \"/cutover\"")?;
                let ok = prefix.len() > 1
                    && prefix.starts_with('/')
                    && !prefix.ends_with('/')
                    && !prefix.contains("//")
                    && prefix.chars().all(|c| c.is_ascii_graphic());
                if !ok {
                    return Err(self.at(
                        v,
                        "fleet.prefix",
                        format!("{prefix:?} is not a key prefix; write a path such as \"/cutover\" or \"/shop/cutover\" (a leading /, no trailing /, no spaces)"),
                    ));
                }
                prefix
            }
        };
        let user = match &raw.user {
            None => None,
            Some(v) => Some(self.string(v, "fleet.user", "user = \"cutover\"")?).filter(|u| !u.is_empty()),
        };
        let password_file = match &raw.password_file {
            None => None,
            Some(v) => Some(dir.join(self.path(v, "fleet.password_file", "password_file = \"etcd.password\"")?)),
        };
        match (&user, &password_file) {
            (Some(_), None) => {
                return Err(self.invalid(
                    self.key_offset("fleet.user"),
                    "fleet.password_file",
                    "missing: a user needs its password, in a file: password_file = \"etcd.password\"",
                ))
            }
            (None, Some(_)) => {
                return Err(self.invalid(
                    self.key_offset("fleet.password_file"),
                    "fleet.user",
                    "missing: a password file needs the user it belongs to, e.g. user = \"cutover\"",
                ))
            }
            _ => {}
        }
        let tls = match &raw.tls {
            None => None,
            Some(t) => {
                let file = |leaf: &Leaf, name: &str| -> Result<Option<PathBuf>, ConfigError> {
                    match leaf {
                        None => Ok(None),
                        Some(v) => Ok(Some(dir.join(self.path(
                            v,
                            &format!("fleet.tls.{name}"),
                            &format!("{name} = \"certs/etcd-{name}.pem\""),
                        )?))),
                    }
                };
                let tls = FleetTls {
                    ca: file(&t.ca, "ca")?,
                    cert: file(&t.cert, "cert")?,
                    key: file(&t.key, "key")?,
                };
                if tls.cert.is_some() != tls.key.is_some() {
                    let missing = if tls.cert.is_none() { "cert" } else { "key" };
                    return Err(self.invalid(
                        self.key_offset("fleet.tls"),
                        &format!("fleet.tls.{missing}"),
                        "missing: a client certificate needs both its files, cert and key",
                    ));
                }
                Some(tls)
            }
        };
        let https = schemes.iter().find(|(s, _)| s == "https");
        let http = schemes.iter().find(|(s, _)| s == "http");
        if let (Some(_), Some((_, offset))) = (https, http) {
            return Err(self.invalid(
                *offset,
                "fleet.etcd",
                "some URLs are https:// and some http://; the members of one cluster speak the same, write them alike",
            ));
        }
        if tls.is_some() && https.is_none() {
            return Err(self.invalid(
                self.key_offset("fleet.tls"),
                "fleet.tls",
                "TLS files are given but the etcd URLs are http://; write them as https://, or remove tls",
            ));
        }
        if tls.is_none() && https.is_some() {
            return Err(self.invalid(
                self.key_offset("fleet.etcd"),
                "fleet.tls",
                "missing: https:// URLs need the CA that signed the members' certificates, \
                 e.g. tls = { ca = \"certs/etcd-ca.pem\" }",
            ));
        }
        let ack_timeout = match &raw.ack_timeout {
            None => DEFAULT_ACK_TIMEOUT,
            Some(v) => self.positive_duration(v, "fleet.ack_timeout")?,
        };
        let on_missing_ack = match &raw.on_missing_ack {
            None => OnMissingAck::Rollback,
            Some(v) => match self.string(v, "fleet.on_missing_ack", "on_missing_ack = \"rollback\"")?.as_str() {
                "rollback" => OnMissingAck::Rollback,
                "proceed" => OnMissingAck::Proceed,
                other => {
                    return Err(self.at(
                        v,
                        "fleet.on_missing_ack",
                        format!("{other:?} is not a choice; write \"rollback\" (go back when a node does not acknowledge a switch) or \"proceed\""),
                    ))
                }
            },
        };
        let lease_ttl = match &raw.lease_ttl {
            None => DEFAULT_LEASE_TTL,
            Some(v) => {
                let d = self.duration(v, "fleet.lease_ttl")?;
                if d.subsec_nanos() != 0 || !(2..=300).contains(&d.as_secs()) {
                    return Err(self.at(
                        v,
                        "fleet.lease_ttl",
                        format!("{d:?} is not a lease time; etcd counts leases in whole seconds: write 2s to 300s, e.g. \"10s\""),
                    ));
                }
                d
            }
        };
        Ok(FleetConfig {
            etcd,
            node,
            prefix,
            user,
            password_file,
            tls,
            ack_timeout,
            on_missing_ack,
            lease_ttl,
        })
    }

    fn webhooks(&self, raw: &RawWebhooks) -> Result<WebhooksConfig, ConfigError> {
        let d = WebhooksConfig::default();
        let urls = match &raw.urls {
            // A [webhooks] table without urls is most likely a misspelt key, not a wish for none.
            None => {
                return Err(self.invalid(
                    self.key_offset("webhooks"),
                    "webhooks.urls",
                    "missing: [webhooks] needs the URLs to notify, e.g. urls = [\"http://127.0.0.1:9000/hook\"]; \
                     or remove the table",
                ))
            }
            Some(list) => {
                let mut urls: Vec<WebhookUrl> = Vec::new();
                let example = "urls = [\"http://127.0.0.1:9000/hook\"]";
                for (text, offset) in self.strings(list, "webhooks.urls", true, example)? {
                    let url = WebhookUrl::parse(&text).map_err(|m| self.invalid(offset, "webhooks.urls", m))?;
                    if let Some(first) = urls.iter().find(|u| u.same_endpoint(&url)) {
                        let message = if first.url == url.url {
                            format!("{text:?} is listed twice; remove one")
                        } else {
                            format!("{text:?} is the same endpoint as {:?}; remove one", first.url)
                        };
                        return Err(self.invalid(offset, "webhooks.urls", message));
                    }
                    urls.push(url);
                }
                urls
            }
        };
        let timeout = match &raw.timeout {
            None => d.timeout,
            Some(v) => self.positive_duration(v, "webhooks.timeout")?,
        };
        let retries = match &raw.retries {
            None => d.retries,
            Some(v) => self.int(
                v,
                "webhooks.retries",
                0,
                MAX_WEBHOOK_RETRIES as i64,
                "0 makes one attempt only",
            )? as u32,
        };
        let events = match &raw.events {
            None => d.events,
            Some(list) => {
                let mut events: Vec<EventKind> = Vec::new();
                let example = "events = [\"rolled-back\", \"aborted\"]";
                for (text, offset) in self.strings(list, "webhooks.events", false, example)? {
                    let Some(kind) = EventKind::from_name(&text) else {
                        let names = || EventKind::ALL.iter().map(|k| k.as_str());
                        let mut message = format!("{text:?} is not an event");
                        if let Some(near) = names()
                            .filter(|k| edit_distance(&text, k) <= 2)
                            .min_by_key(|k| edit_distance(&text, k))
                        {
                            message.push_str(&format!(" (did you mean {near:?}?)"));
                        }
                        message.push_str(&format!("; the events are {}", names().collect::<Vec<_>>().join(", ")));
                        return Err(self.invalid(offset, "webhooks.events", message));
                    };
                    if events.contains(&kind) {
                        return Err(self.invalid(
                            offset,
                            "webhooks.events",
                            format!("{text:?} is listed twice; remove one"),
                        ));
                    }
                    events.push(kind);
                }
                events
            }
        };
        Ok(WebhooksConfig {
            urls,
            timeout,
            retries,
            events,
        })
    }

    /// A service, and the offsets of its hosts (for "already claimed" errors).
    fn service(
        &self,
        name: &Spanned<String>,
        raw: &RawService,
        dir: &Path,
    ) -> Result<(ServiceConfig, Vec<usize>), ConfigError> {
        let p = format!("services.{}", name.get_ref());
        check_service_name(name.get_ref()).map_err(|m| self.at(name, &p, m))?;
        let name = name.get_ref().clone();

        let mut hosts = Vec::new();
        let mut host_offsets = Vec::new();
        if let Some(list) = &raw.hosts {
            for (text, offset) in self.strings(list, &format!("{p}.hosts"), true, "hosts = [\"shop.example.com\"]")? {
                let host = check_host(&text).map_err(|m| self.invalid(offset, &format!("{p}.hosts"), m))?;
                hosts.push(host);
                host_offsets.push(offset);
            }
        }

        let driver = match &raw.command {
            Some(v) => {
                let command = self.string(v, &format!("{p}.command"), "command = \"./web --port {port}\"")?;
                if command.trim().is_empty() {
                    return Err(self.at(
                        v,
                        &format!("{p}.command"),
                        "is empty; write the command that starts one instance, e.g. \"./web --port {port}\", or \
                         remove the key to run instances elsewhere (static driver)",
                    ));
                }
                let instances = match &raw.instances {
                    None => DEFAULT_INSTANCES,
                    Some(v) => self.int(
                        v,
                        &format!("{p}.instances"),
                        1,
                        MAX_INSTANCES as i64,
                        "each colour needs at least one instance",
                    )? as u32,
                };
                Driver::Process { command, instances }
            }
            None => {
                if let Some(v) = &raw.instances {
                    return Err(self.at(
                        v,
                        &format!("{p}.instances"),
                        "applies only to services with a command: without one, each deploy names its upstreams; \
                         add command = \"...\" or remove instances",
                    ));
                }
                Driver::Static
            }
        };

        let mut health = match &raw.health {
            None => HealthConfig::default(),
            Some(h) => self.health(h, &format!("{p}.health"))?,
        };
        if health.host.is_none() {
            health.host = hosts.first().cloned();
        }
        let duration_or = |v: &Leaf, key: &str, default: Duration| match v {
            None => Ok(default),
            Some(v) => self.duration(v, &format!("{p}.{key}")),
        };
        let drain_timeout = duration_or(&raw.drain_timeout, "drain_timeout", DEFAULT_DRAIN_TIMEOUT)?;
        let close_window = duration_or(&raw.close_window, "close_window", DEFAULT_CLOSE_WINDOW)?;
        let keep_warm = duration_or(&raw.keep_warm, "keep_warm", DEFAULT_KEEP_WARM)?;

        let validate = match &raw.validate {
            None => None,
            Some(v) => Some(self.validate(v, &format!("{p}.validate"))?),
        };
        let promote = match &raw.promote {
            None => PromoteConfig::default(),
            Some(v) => self.promote(v, &format!("{p}.promote"))?,
        };
        let watch = match &raw.watch {
            None => WatchConfig::default(),
            Some(v) => self.watch(v, &format!("{p}.watch"))?,
        };
        let balance = match &raw.balance {
            None => Balance::default(),
            Some(v) => match self
                .string(v, &format!("{p}.balance"), "balance = \"least-in-flight\"")?
                .as_str()
            {
                "least-in-flight" => Balance::LeastInFlight,
                "round-robin" => Balance::RoundRobin,
                other => {
                    return Err(self.at(
                        v,
                        &format!("{p}.balance"),
                        format!("{other:?} is not a balancing method; write \"least-in-flight\" or \"round-robin\""),
                    ))
                }
            },
        };
        let tls = match &raw.tls {
            None => None,
            Some(t) => {
                if hosts.is_empty() {
                    return Err(self.invalid(
                        self.key_offset(&format!("{p}.tls")),
                        &format!("{p}.tls"),
                        "this service has no hosts, so no TLS server name (SNI) can choose its certificate; \
                         give it hosts = [\"...\"], or make this the default certificate: [server] tls = { cert, key }",
                    ));
                }
                Some(self.tls_files(t, &format!("{p}.tls"), dir)?)
            }
        };
        let https_redirect = match &raw.https_redirect {
            None => false,
            Some(v) => self.boolean(v, &format!("{p}.https_redirect"))?,
        };
        let upstream_tls = match &raw.upstream_tls {
            None => None,
            Some(t) => Some(self.upstream_tls(t, &format!("{p}.upstream_tls"), dir)?),
        };
        let affinity = match &raw.affinity {
            None => None,
            Some(a) => Some(self.affinity(a, &format!("{p}.affinity"))?),
        };
        let migrate = match &raw.migrate {
            None => None,
            Some(m) => Some(self.migrate(m, &format!("{p}.migrate"))?),
        };
        let service = ServiceConfig {
            name,
            hosts,
            tls,
            https_redirect,
            upstream_tls,
            affinity,
            migrate,
            driver,
            health,
            drain_timeout,
            close_window,
            keep_warm,
            validate,
            promote,
            watch,
            balance,
        };
        Ok((service, host_offsets))
    }

    fn health(&self, raw: &RawHealth, p: &str) -> Result<HealthConfig, ConfigError> {
        let d = HealthConfig::default();
        let path = match &raw.path {
            None => d.path,
            Some(v) => {
                let path = self.string(v, &format!("{p}.path"), "path = \"/up\"")?;
                if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    return Err(self.at(
                        v,
                        &format!("{p}.path"),
                        format!("{path:?} is not a request path; write one that starts with / and has no spaces, e.g. \"/up\""),
                    ));
                }
                path
            }
        };
        let interval = match &raw.interval {
            None => d.interval,
            Some(v) => self.positive_duration(v, &format!("{p}.interval"))?,
        };
        let timeout = match &raw.timeout {
            None => interval / 2,
            // A timeout longer than the interval is allowed: checks of one instance never
            // overlap (the next starts when the previous has finished or timed out).
            Some(v) => {
                let timeout = self.positive_duration(v, &format!("{p}.timeout"))?;
                timeout
            }
        };
        let host = match &raw.host {
            None => None,
            Some(v) => {
                let host = self.string(v, &format!("{p}.host"), "host = \"shop.example.com\"")?;
                if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control() || c == '/') {
                    return Err(self.at(
                        v,
                        &format!("{p}.host"),
                        format!("{host:?} is not a Host header value; write a host name, with a port if needed, e.g. \"shop.example.com\""),
                    ));
                }
                Some(host)
            }
        };
        let threshold = |v: &Leaf, key: &str, default: u32, why: &str| match v {
            None => Ok(default),
            Some(v) => self.int(v, &format!("{p}.{key}"), 1, 100, why).map(|n| n as u32),
        };
        Ok(HealthConfig {
            path,
            host,
            interval,
            timeout,
            healthy: threshold(
                &raw.healthy,
                "healthy",
                d.healthy,
                "it counts successful checks in a row",
            )?,
            unhealthy: threshold(
                &raw.unhealthy,
                "unhealthy",
                d.unhealthy,
                "it counts failed checks in a row",
            )?,
            deadline: match &raw.deadline {
                None => d.deadline,
                Some(v) => self.positive_duration(v, &format!("{p}.deadline"))?,
            },
        })
    }

    fn validate(&self, raw: &RawValidate, p: &str) -> Result<ValidateConfig, ConfigError> {
        let smoke = match &raw.smoke {
            None => {
                return Err(self.invalid(
                    self.key_offset(p),
                    &format!("{p}.smoke"),
                    "missing: validate needs the command to run against the preview route, e.g. \
                     validate = { smoke = \"./smoke.sh\" }; or remove validate",
                ))
            }
            Some(v) => {
                let smoke = self.string(v, &format!("{p}.smoke"), "smoke = \"./smoke.sh\"")?;
                if smoke.trim().is_empty() {
                    return Err(self.at(
                        v,
                        &format!("{p}.smoke"),
                        "is empty; write a command, e.g. \"./smoke.sh\", or remove validate",
                    ));
                }
                smoke
            }
        };
        let timeout = match &raw.timeout {
            None => DEFAULT_SMOKE_TIMEOUT,
            Some(v) => self.positive_duration(v, &format!("{p}.timeout"))?,
        };
        let mirror = match &raw.mirror {
            None => None,
            Some(m) => Some(self.mirror(m.get_ref(), &format!("{p}.mirror"))?),
        };
        Ok(ValidateConfig { smoke, timeout, mirror })
    }

    fn mirror(&self, raw: &RawMirror, p: &str) -> Result<MirrorConfig, ConfigError> {
        let d = MirrorConfig::default();
        let sample = match &raw.sample {
            None => d.sample,
            Some(v) => {
                let key = format!("{p}.sample");
                let share = self.fraction(v, &key, "0.1 to copy 10% of the live requests")?;
                if share == 0.0 {
                    return Err(self.at(
                        v,
                        &key,
                        "is 0: nothing would be copied; write e.g. 0.1, or remove mirror",
                    ));
                }
                share
            }
        };
        let duration = match &raw.duration {
            None => d.duration,
            Some(v) => self.positive_duration(v, &format!("{p}.duration"))?,
        };
        let methods = match &raw.methods {
            None => d.methods,
            Some(v) => {
                let key = format!("{p}.methods");
                let mut methods = Vec::new();
                for (name, offset) in self.strings(v, &key, false, "[\"GET\", \"HEAD\"]")? {
                    let method = match name.as_str() {
                        "GET" => http::Method::GET,
                        "HEAD" => http::Method::HEAD,
                        "OPTIONS" => http::Method::OPTIONS,
                        "TRACE" => http::Method::TRACE,
                        other if SAFE_METHODS.iter().any(|m| m.eq_ignore_ascii_case(other)) => {
                            return Err(self.invalid(
                                offset,
                                &key,
                                format!(
                                    "{other:?}: methods are written in capitals; write {:?}",
                                    other.to_ascii_uppercase()
                                ),
                            ))
                        }
                        other => {
                            return Err(self.invalid(
                                offset,
                                &key,
                                format!(
                                "{other:?} is not mirrored: a copy of a request that changes something would change \
                                     it a second time (both colours share the database and the services behind them); \
                                     write safe methods only: {}",
                                SAFE_METHODS.join(", ")
                            ),
                            ))
                        }
                    };
                    if !methods.contains(&method) {
                        methods.push(method);
                    }
                }
                methods
            }
        };
        let max_error_rate = match &raw.max_error_rate {
            None => d.max_error_rate,
            Some(v) => self.fraction(
                v,
                &format!("{p}.max_error_rate"),
                "0.01 for copies failing at most 1% more often than live requests",
            )?,
        };
        let max_p99_ratio = match &raw.max_p99_ratio {
            None => d.max_p99_ratio,
            Some(v) => {
                let key = format!("{p}.max_p99_ratio");
                let ratio = match v.get_ref() {
                    Value::Float(x) => *x,
                    Value::Integer(n) => *n as f64,
                    other => {
                        return Err(self.at(
                            v,
                            &key,
                            format!(
                                "{} is not a number; write e.g. 1.5 (the copies' p99 at most 1.5 times the live p99)",
                                describe(other)
                            ),
                        ))
                    }
                };
                if !(ratio.is_finite() && ratio > 0.0) {
                    return Err(self.at(
                        v,
                        &key,
                        format!("{ratio} is not a ratio above 0; write e.g. 1.5 (the copies' p99 at most 1.5 times the live p99)"),
                    ));
                }
                ratio
            }
        };
        let min_requests = match &raw.min_requests {
            None => d.min_requests,
            Some(v) => self.int(
                v,
                &format!("{p}.min_requests"),
                1,
                i64::MAX,
                "a rate needs at least one copy",
            )? as u64,
        };
        let max_in_flight = match &raw.max_in_flight {
            None => d.max_in_flight,
            Some(v) => self.int(
                v,
                &format!("{p}.max_in_flight"),
                1,
                100_000,
                "copies are sent only while fewer than this many run",
            )? as usize,
        };
        Ok(MirrorConfig {
            sample,
            duration,
            methods,
            max_error_rate,
            max_p99_ratio,
            min_requests,
            max_in_flight,
        })
    }

    /// A number from 0 to 1 (an integer 0 or 1 too); `example` shows a good one.
    fn fraction(&self, v: &Spanned<Value>, key: &str, example: &str) -> Result<f64, ConfigError> {
        let x = match v.get_ref() {
            Value::Float(x) => *x,
            Value::Integer(n) => *n as f64,
            other => {
                return Err(self.at(
                    v,
                    key,
                    format!(
                        "{} is not a number; write a fraction from 0 to 1, e.g. {example}",
                        describe(other)
                    ),
                ))
            }
        };
        if !(0.0..=1.0).contains(&x) {
            return Err(self.at(
                v,
                key,
                format!("{x} is not a fraction from 0 to 1; write e.g. {example}"),
            ));
        }
        Ok(x)
    }

    fn migrate(&self, raw: &RawMigrate, p: &str) -> Result<MigrateConfig, ConfigError> {
        use crate::schema_lint::{Breaking, SqlDialect};
        let command = |v: &Leaf, key: &str| -> Result<Option<String>, ConfigError> {
            let Some(v) = v else { return Ok(None) };
            let key = format!("{p}.{key}");
            let text = self.string(v, &key, "\"./migrate expand\"")?;
            if text.trim().is_empty() {
                return Err(self.at(v, &key, "is empty; write the command to run, or remove the key"));
            }
            Ok(Some(text))
        };
        let expand = command(&raw.expand, "expand")?;
        let contract = command(&raw.contract, "contract")?;
        let check = command(&raw.check, "check")?;
        let rollback = command(&raw.rollback, "rollback")?;
        if expand.is_none() && contract.is_none() {
            return Err(self.invalid(
                self.key_offset(p),
                &format!("{p}.expand"),
                "missing: migrate needs expand or contract (or both), e.g. migrate = { expand = \"./migrate \
                 expand\", contract = \"./migrate contract\" }; or remove migrate",
            ));
        }
        if expand.is_none() {
            let needs_expand = [
                (raw.check.as_ref().map(|v| v.span().start), "check"),
                (raw.rollback.as_ref().map(|v| v.span().start), "rollback"),
                (raw.files.as_ref().map(|v| v.span().start), "files"),
            ];
            if let Some((Some(offset), key)) = needs_expand.into_iter().find(|(o, _)| o.is_some()) {
                return Err(self.invalid(
                    offset,
                    &format!("{p}.{key}"),
                    format!("{key} belongs to the expand step, and migrate has no expand: add expand, or remove {key}"),
                ));
            }
        }
        let files = match &raw.files {
            None => Vec::new(),
            Some(v) => self
                .strings(v, &format!("{p}.files"), false, "\"migrations/*.sql\"")?
                .into_iter()
                .map(|(f, _)| f)
                .collect(),
        };
        let dialect = match &raw.dialect {
            None => SqlDialect::default(),
            Some(v) => {
                let name = self.string(v, &format!("{p}.dialect"), "\"postgres\"")?;
                SqlDialect::from_name(&name).ok_or_else(|| {
                    self.at(
                        v,
                        &format!("{p}.dialect"),
                        format!("{name:?} is not a dialect cutover parses; write {}", SqlDialect::NAMES),
                    )
                })?
            }
        };
        let mut allow = Vec::new();
        if let Some(v) = &raw.allow {
            for (name, offset) in self.strings(v, &format!("{p}.allow"), true, "\"drop-column\"")? {
                let kind = Breaking::from_name(&name).ok_or_else(|| {
                    self.invalid(
                        offset,
                        &format!("{p}.allow"),
                        format!(
                            "{name:?} is not a kind of statement the lint reports; write one of {}",
                            Breaking::ALL.map(Breaking::name).join(", ")
                        ),
                    )
                })?;
                allow.push(kind);
            }
        }
        let timeout = match &raw.timeout {
            None => DEFAULT_MIGRATE_TIMEOUT,
            Some(v) => self.positive_duration(v, &format!("{p}.timeout"))?,
        };
        Ok(MigrateConfig {
            expand,
            contract,
            check,
            rollback,
            files,
            dialect,
            allow,
            timeout,
        })
    }

    fn affinity(&self, raw: &RawAffinity, p: &str) -> Result<AffinityConfig, ConfigError> {
        let cookie = match &raw.cookie {
            None => DEFAULT_AFFINITY_COOKIE.to_string(),
            Some(v) => {
                let cookie = self.string(v, &format!("{p}.cookie"), "cookie = \"cutover_session\"")?;
                if !cutover_proxy::affinity::valid_cookie_name(&cookie) {
                    return Err(self.at(
                        v,
                        &format!("{p}.cookie"),
                        format!(
                            "{cookie:?} is not a valid cookie name; use 1 to 64 letters, digits or any of                              !#$%&'*+-.^_`|~ (no spaces, `=`, `;` or `,`), e.g. \"cutover_session\""
                        ),
                    ));
                }
                cookie
            }
        };
        let window = match &raw.window {
            None => DEFAULT_AFFINITY_WINDOW,
            Some(v) => {
                let window = self.positive_duration(v, &format!("{p}.window"))?;
                if window < Duration::from_secs(1) {
                    return Err(self.at(
                        v,
                        &format!("{p}.window"),
                        "is shorter than a second; cookies count whole seconds: write at least \"1s\", e.g. \"15m\"",
                    ));
                }
                window
            }
        };
        let app_cookie = match &raw.app_cookie {
            None => None,
            Some(v) => {
                let name = self.string(v, &format!("{p}.app_cookie"), "app_cookie = \"session_id\"")?;
                if !cutover_proxy::affinity::valid_cookie_name(&name) {
                    return Err(self.at(
                        v,
                        &format!("{p}.app_cookie"),
                        format!(
                            "{name:?} is not a valid cookie name; write the name of the application's session cookie \
                             as it sends it, e.g. \"session_id\""
                        ),
                    ));
                }
                if name == cookie {
                    return Err(self.at(
                        v,
                        &format!("{p}.app_cookie"),
                        format!(
                            "{name:?} is also the name of cutover's own cookie (affinity.cookie); give one of them another name"
                        ),
                    ));
                }
                Some(name)
            }
        };
        Ok(AffinityConfig {
            cookie,
            window,
            app_cookie,
        })
    }

    fn promote(&self, raw: &RawPromote, p: &str) -> Result<PromoteConfig, ConfigError> {
        let auto = match &raw.auto {
            None => true,
            Some(v) => self.boolean(v, &format!("{p}.auto"))?,
        };
        let delay = match &raw.delay {
            None => Duration::ZERO,
            Some(v) => {
                let delay = self.duration(v, &format!("{p}.delay"))?;
                if !auto {
                    return Err(self.at(
                        v,
                        &format!("{p}.delay"),
                        "applies only to automatic promotion, and auto = false; remove delay or set auto = true",
                    ));
                }
                delay
            }
        };
        let example = "steps = [10, 50, 100]";
        let steps = match &raw.steps {
            None => Vec::new(),
            Some(v) => {
                let key = format!("{p}.steps");
                let Value::Array(items) = v.get_ref() else {
                    return Err(self.at(
                        v,
                        &key,
                        format!(
                            "{} is not a list of percentages; write e.g. {example}",
                            describe(v.get_ref())
                        ),
                    ));
                };
                let mut steps: Vec<u8> = Vec::new();
                for item in items {
                    let share = match item {
                        Value::Integer(n) if (1..=100).contains(n) => *n as u8,
                        other => {
                            return Err(self.at(
                                v,
                                &key,
                                format!(
                                    "{} is not a whole percentage from 1 to 100; write e.g. {example}",
                                    describe(other)
                                ),
                            ))
                        }
                    };
                    if let Some(before) = steps.last().filter(|b| **b >= share) {
                        return Err(self.at(
                            v,
                            &key,
                            format!("{share} comes after {before}: each step sends more than the one before; write e.g. {example}"),
                        ));
                    }
                    steps.push(share);
                }
                if steps.last() != Some(&100) {
                    return Err(self.at(
                        v,
                        &key,
                        format!("the last step must be 100 (every request on the release); write e.g. {example}"),
                    ));
                }
                // [100] is the single atomic switch.
                if steps.len() == 1 {
                    steps.clear();
                }
                steps
            }
        };
        let step = match &raw.step {
            None => DEFAULT_PROMOTE_STEP,
            Some(v) => {
                let step = self.positive_duration(v, &format!("{p}.step"))?;
                if raw.steps.is_none() {
                    return Err(self.at(
                        v,
                        &format!("{p}.step"),
                        format!("is how long each step of a gradual switch lasts, and there are no steps; add {example}, or remove step"),
                    ));
                }
                step
            }
        };
        Ok(PromoteConfig {
            auto,
            delay,
            steps,
            step,
        })
    }

    fn watch(&self, raw: &RawWatch, p: &str) -> Result<WatchConfig, ConfigError> {
        let d = WatchConfig::default();
        let duration = match &raw.duration {
            None => d.duration,
            Some(v) => self.duration(v, &format!("{p}.duration"))?,
        };
        let max_error_rate = match &raw.max_error_rate {
            None => d.max_error_rate,
            Some(v) => self.fraction(v, &format!("{p}.max_error_rate"), "0.01 for 1% of requests")?,
        };
        let max_p99 = match &raw.max_p99 {
            None => None,
            Some(v) => Some(self.positive_duration(v, &format!("{p}.max_p99"))?),
        };
        let min_requests = match &raw.min_requests {
            None => d.min_requests,
            Some(v) => self.int(
                v,
                &format!("{p}.min_requests"),
                1,
                i64::MAX,
                "an error rate needs at least one request",
            )? as u64,
        };
        Ok(WatchConfig {
            duration,
            max_error_rate,
            max_p99,
            min_requests,
        })
    }

    // -- leaves --

    fn string(&self, v: &Spanned<Value>, key: &str, example: &str) -> Result<String, ConfigError> {
        match v.get_ref() {
            Value::String(s) => Ok(s.clone()),
            other => Err(self.at(
                v,
                key,
                format!(
                    "{} is not a string; write it in quotes, e.g. {example}",
                    describe(other)
                ),
            )),
        }
    }

    fn path(&self, v: &Spanned<Value>, key: &str, example: &str) -> Result<PathBuf, ConfigError> {
        let text = self.string(v, key, example)?;
        if text.is_empty() {
            return Err(self.at(v, key, format!("the path is empty; write one, e.g. {example}")));
        }
        Ok(PathBuf::from(text))
    }

    fn boolean(&self, v: &Spanned<Value>, key: &str) -> Result<bool, ConfigError> {
        match v.get_ref() {
            Value::Boolean(b) => Ok(*b),
            other => Err(self.at(
                v,
                key,
                format!(
                    "{} is not true or false; write true or false without quotes",
                    describe(other)
                ),
            )),
        }
    }

    /// A whole number in `min..=max`; `why` explains the minimum.
    fn int(&self, v: &Spanned<Value>, key: &str, min: i64, max: i64, why: &str) -> Result<i64, ConfigError> {
        let range = if max == i64::MAX {
            format!("{min} or more")
        } else {
            format!("from {min} to {max}")
        };
        match v.get_ref() {
            Value::Integer(n) if (min..=max).contains(n) => Ok(*n),
            Value::Integer(n) if *n < min => Err(self.at(
                v,
                key,
                format!("{n} is too small ({why}); write a whole number {range}"),
            )),
            Value::Integer(n) => Err(self.at(v, key, format!("{n} is too large; write a whole number {range}"))),
            other => Err(self.at(
                v,
                key,
                format!(
                    "{} is not a whole number; write a number {range} without quotes",
                    describe(other)
                ),
            )),
        }
    }

    fn duration(&self, v: &Spanned<Value>, key: &str) -> Result<Duration, ConfigError> {
        match v.get_ref() {
            Value::String(s) => parse_duration(s).map_err(|m| self.at(v, key, m)),
            other => Err(self.at(
                v,
                key,
                format!(
                    "{} is not a duration; write a quoted whole number followed by us, ms, s, m or h, e.g. \"500ms\"",
                    describe(other)
                ),
            )),
        }
    }

    fn positive_duration(&self, v: &Spanned<Value>, key: &str) -> Result<Duration, ConfigError> {
        let d = self.duration(v, key)?;
        if d.is_zero() {
            let shown = describe(v.get_ref());
            return Err(self.at(
                v,
                key,
                format!("{shown} is zero; write a duration longer than 0, e.g. \"500ms\""),
            ));
        }
        Ok(d)
    }

    /// One string or a list of strings, each with its offset.
    fn strings(
        &self,
        v: &Spanned<RawList>,
        key: &str,
        allow_empty: bool,
        example: &str,
    ) -> Result<Vec<(String, usize)>, ConfigError> {
        let items = match v.get_ref() {
            RawList::One(s) => vec![(s.clone(), v.span().start)],
            RawList::Many(items) => {
                let mut out = Vec::new();
                for item in items {
                    match item.get_ref() {
                        Value::String(s) => out.push((s.clone(), item.span().start)),
                        other => {
                            return Err(self.at(
                                item,
                                key,
                                format!(
                                    "{} is not a string; write each entry in quotes, e.g. {example}",
                                    describe(other)
                                ),
                            ))
                        }
                    }
                }
                out
            }
            RawList::Other(what) => {
                return Err(self.at(
                    v,
                    key,
                    format!("{what} is not a string or a list of strings; write e.g. {example}"),
                ))
            }
        };
        if items.is_empty() && !allow_empty {
            return Err(self.at(v, key, format!("the list is empty; give at least one, e.g. {example}")));
        }
        Ok(items)
    }

    fn addresses(
        &self,
        v: &Spanned<RawList>,
        key: &str,
        allow_empty: bool,
    ) -> Result<Vec<(SocketAddr, usize)>, ConfigError> {
        let example = if allow_empty {
            "\"127.0.0.1:8081\""
        } else {
            "\"0.0.0.0:8080\""
        };
        let mut out = Vec::new();
        for (text, offset) in self.strings(v, key, allow_empty, example)? {
            let addr = text.parse::<SocketAddr>().map_err(|_| {
                self.invalid(
                    offset,
                    key,
                    format!(
                        "{text:?} is not an address; write IP:PORT, e.g. {example} or \"[::]:8080\" (host names \
                         are not resolved)"
                    ),
                )
            })?;
            if out.iter().any(|(a, _)| *a == addr) {
                return Err(self.invalid(offset, key, format!("{addr} is listed twice; remove one")));
            }
            out.push((addr, offset));
        }
        Ok(out)
    }
}

/// Whether two listeners would take the same port (port 0 asks for a fresh port each time).
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && a.port() != 0 && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

fn check_service_name(name: &str) -> Result<(), String> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !name.is_empty() && name.len() <= 63 && ok_chars && !name.starts_with('-') {
        return Ok(());
    }
    let suggestion: String = name
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect::<String>()
        .trim_matches('-')
        .chars()
        .take(63)
        .collect();
    let mut message = format!(
        "{name:?} is not a valid service name; use 1 to 63 lower-case letters, digits and '-', not starting \
         with '-' (names become metric labels and file names)"
    );
    if !suggestion.is_empty() {
        message.push_str(&format!(", e.g. [services.{suggestion}]"));
    }
    Err(message)
}

/// A host as the proxy matches it: lower case, no port. Returns the normalised host.
fn check_host(text: &str) -> Result<String, String> {
    let host = text.to_ascii_lowercase();
    let hint = "write a DNS name or IPv4 address without scheme, port or path, e.g. \"shop.example.com\"";
    if host.contains('*') {
        return Err(format!("{text:?}: wildcards are not supported; list each host"));
    }
    if host.contains(':')
        && !host.contains("://")
        && host
            .rsplit(':')
            .next()
            .is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(format!("{text:?} has a port; hosts are matched without it, {hint}"));
    }
    let label_ok = |l: &str| {
        !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if host.is_empty() || host.len() > 253 || !host.split('.').all(label_ok) {
        return Err(format!("{text:?} is not a host name; {hint}"));
    }
    Ok(host)
}

fn describe(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        Value::Integer(n) => n.to_string(),
        Value::Float(x) => x.to_string(),
        Value::Boolean(b) => b.to_string(),
        Value::Datetime(d) => d.to_string(),
        Value::Array(_) => "an array".to_string(),
        Value::Table(_) => "a table".to_string(),
    }
}

/// Rewrites serde's "unknown field `x`, expected one of `a`, `b`" for people.
fn unknown_key_message(serde_message: &str) -> String {
    // Backticked words: the unknown key first, then the valid ones.
    let mut names = serde_message.split('`').skip(1).step_by(2);
    let unknown = names.next().unwrap_or("");
    let valid: Vec<&str> = names.collect();
    let mut message = format!("unknown key {unknown:?}");
    if let Some(near) = valid
        .iter()
        .filter(|v| edit_distance(unknown, v) <= 2)
        .min_by_key(|v| edit_distance(unknown, v))
    {
        message.push_str(&format!(" (did you mean {near:?}?)"));
    }
    if valid.is_empty() {
        message.push_str("; remove it");
    } else {
        message.push_str(&format!(
            "; the keys here are {}; correct the spelling or remove it",
            valid.join(", ")
        ));
    }
    message
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (diagonal + usize::from(ca != *cb)).min(row[j] + 1).min(row[j + 1] + 1);
            diagonal = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

/// `at_error` is the text from the error's position to the end of its line; `after_equals` says
/// whether an `=` precedes it on that line (the error is in a value).
fn syntax_message(toml_message: &str, at_error: &str, after_equals: bool) -> String {
    let what = toml_message.trim().replace('\n', ", ");
    // An unquoted word where a value belongs (`command = ./web`) gets a message that depends on
    // its first character ("invalid string", "invalid floating-point number", ...).
    let bare_word = after_equals
        && at_error.starts_with(|c: char| c.is_ascii_alphabetic() || "./~$".contains(c))
        && !["true", "false", "inf", "nan"].iter().any(|w| at_error.starts_with(w));
    let hint = if what.starts_with("invalid string") || bare_word {
        "text values need quotes, e.g. command = \"./web --port {port}\""
    } else if what.contains("duplicate key") {
        "each key and table may appear once; remove or merge the repeated one"
    } else {
        "fix the TOML syntax here (https://toml.io)"
    };
    format!("invalid TOML: {what}; {hint}")
}

/// For a syntax error, the key it is most likely about: the table header above the error line,
/// and the key assigned on that line, when the error comes after its `=`.
fn guess_key(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    let line = &text[line_start..line_end];
    let is_key = |k: &str| !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || "-_.\"' ".contains(c));
    if line.trim_start().starts_with('[') {
        return None; // the header itself is broken
    }
    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .and_then(|l| l.trim_start_matches('[').split(']').next())
        .map(|h| h.trim().to_string())
        .filter(|h| is_key(h));
    let key = line.split_once('=').and_then(|(k, _)| {
        let k = k.trim();
        (offset - line_start > line.find('=').unwrap_or(usize::MAX) && is_key(k)).then(|| k.to_string())
    });
    match (table, key) {
        (Some(t), Some(k)) => Some(format!("{t}.{k}")),
        (t, k) => k.or(t),
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

#[cfg(test)]
mod tests;
