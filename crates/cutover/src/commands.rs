//! `cutover serve` and the commands that talk to it: deploy, promote, rollback, abort, status,
//! history, logs.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use cutover_control::config::Admin;
use cutover_control::daemon::{AtShutdown, Daemon, ServeRequest, UpgradeFailed, Upgraded};
use http::Method;

use crate::client::{config_path, load_config, usage, Client, Exit};

#[derive(clap::Args)]
pub struct ConfigArg {
    /// The config file (default ./cutover.toml).
    #[arg(short = 'c', long = "config", global = true)]
    pub config: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Log one line per proxied request: request id, service, colour, method, path, status,
    /// duration (target `cutover::access`).
    #[arg(long)]
    pub access_log: bool,
    /// At SIGTERM or SIGINT, stop the instances too (a full teardown). Without it they keep
    /// running, and the next `cutover serve` adopts them: a restart costs the applications
    /// nothing.
    #[arg(long)]
    pub stop_instances: bool,
    #[command(flatten)]
    pub config: ConfigArg,
}

#[derive(clap::Args)]
pub struct DeployArgs {
    /// The service to deploy (a [services.NAME] of the config). Several (`web api`, or
    /// `web=v2 api=v7` for different versions) make one release: each is provisioned and
    /// validated, then all switch in one store.
    #[arg(required = true, value_name = "SERVICE[=VERSION]")]
    pub services: Vec<String>,
    /// The version to deploy; given to the instances as $CUTOVER_VERSION.
    #[arg(long)]
    pub version: Option<String>,
    /// For a service without `command`: an instance address HOST:PORT (repeatable); in a release
    /// of several services, SERVICE=HOST:PORT.
    #[arg(long = "upstream")]
    pub upstreams: Vec<String>,
    /// Return once the deployment has started instead of following it.
    #[arg(long)]
    pub no_wait: bool,
    /// Print each step as a JSON line.
    #[arg(long)]
    pub json: bool,
    /// If the daemon stops while the deployment is followed, how long to wait for it to come
    /// back and go on following.
    #[arg(long, default_value = "60s", value_parser = cutover_control::config::parse_duration)]
    pub reconnect_timeout: Duration,
    #[command(flatten)]
    pub config: ConfigArg,
}

#[derive(clap::Args)]
pub struct ServiceArgs {
    /// The service.
    pub service: String,
    /// Print the daemon's answer as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub config: ConfigArg,
}

#[derive(clap::Args)]
pub struct PauseArgs {
    /// The service.
    pub service: String,
    /// The longest one request waits before it gets 503.
    #[arg(long, default_value = "30s", value_parser = cutover_control::config::parse_duration)]
    pub max: Duration,
    #[command(flatten)]
    pub config: ConfigArg,
}

#[derive(clap::Args)]
pub struct MaintenanceArgs {
    /// The service.
    pub service: String,
    /// What the page tells users, e.g. "Back at 14:00 UTC".
    #[arg(long)]
    pub message: String,
    #[command(flatten)]
    pub config: ConfigArg,
}

#[derive(clap::Args)]
pub struct UpgradeArgs {
    /// The new binary (default: the file the running daemon was started from, e.g. after a
    /// package upgrade replaced it).
    #[arg(long)]
    pub binary: Option<PathBuf>,
    /// How long the new daemon has to serve (load the state, adopt and check the instances)
    /// before the upgrade is given up and the running daemon serves on.
    #[arg(long, default_value = "60s", value_parser = cutover_control::config::parse_duration)]
    pub timeout: Duration,
    /// Print the daemon's answer as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub config: ConfigArg,
}

#[derive(clap::Args)]
pub struct ShutdownArgs {
    /// Stop the instances too (a full teardown). Without it they keep running for the next
    /// `cutover serve` to adopt.
    #[arg(long)]
    pub stop_instances: bool,
    #[command(flatten)]
    pub config: ConfigArg,
}

#[derive(clap::Args)]
pub struct ReloadArgs {
    /// Print the daemon's answer as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub config: ConfigArg,
}

#[derive(clap::Args)]
pub struct LintArgs {
    /// The files, as paths or glob patterns (quote them: "migrations/*.sql"); linted in name
    /// order as one sequence.
    #[arg(required = true)]
    pub files: Vec<String>,
    /// The SQL dialect they are written in: postgres, sqlite, mysql or generic.
    #[arg(long, default_value = "postgres")]
    pub dialect: String,
    /// Kinds of statement to allow everywhere (e.g. --allow drop-column); one statement is
    /// allowed with `-- cutover: allow KIND` on the line before it.
    #[arg(long)]
    pub allow: Vec<String>,
}

#[derive(clap::Args)]
pub struct StatusArgs {
    /// Print JSON: each service's live colour, versions and health.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub config: ConfigArg,
}

#[derive(clap::Args)]
pub struct HistoryArgs {
    pub service: String,
    /// How many deployments to show.
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub config: ConfigArg,
}

#[derive(clap::Args)]
pub struct LogsArgs {
    pub service: String,
    /// Only this colour's instances.
    #[arg(long, value_enum)]
    pub colour: Option<LogColour>,
    /// Lines from the end of each log.
    #[arg(short = 'n', long, default_value_t = 40)]
    pub lines: usize,
    /// Keep printing what the instances write (and the logs of instances started meanwhile)
    /// until interrupted.
    #[arg(short = 'f', long)]
    pub follow: bool,
    #[command(flatten)]
    pub config: ConfigArg,
}

/// `cutover config example`: the commented example config, valid as it is.
pub fn config_example() -> anyhow::Result<ExitCode> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    // A closed pipe (`| head`) is not an error worth a message.
    match out
        .write_all(cutover_control::config::EXAMPLE.as_bytes())
        .and_then(|()| out.flush())
    {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(ExitCode::SUCCESS),
        Err(e) => Err(e).context("cannot write the example config"),
    }
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogColour {
    Blue,
    Green,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// `cutover serve`: everything wrong is refused before anything starts, with exit code 2.
pub fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    // First, while this is the only thread: these edit the environment.
    let notifier = crate::sd_notify::Notifier::from_env();
    let handover = crate::sd_notify::Notifier::handover_from_env();
    let inherited = crate::handover::take_inherited();
    let start = Start {
        binary: crate::handover::own_binary().ok(),
        argv: std::env::args_os().skip(1).collect(),
    };
    let result = inherited.and_then(|inherited| serve_with(args, notifier, inherited, start, handover.as_ref()));
    if let (Err(e), Some(h)) = (&result, &handover) {
        // The daemon that started this one reports why it did not take over.
        h.send(&format!("STATUS={e:#}"));
    }
    result
}

/// How this process was started, for starting its successor the same way.
struct Start {
    binary: Option<PathBuf>,
    argv: Vec<std::ffi::OsString>,
}

/// How the serve loop ended.
enum Ending {
    /// SIGTERM, SIGINT or `cutover shutdown`.
    Stop(AtShutdown),
    /// A new daemon serves in this one's place.
    HandedOver,
}

fn serve_with(
    args: ServeArgs,
    notifier: Option<crate::sd_notify::Notifier>,
    inherited: crate::handover::Inherited,
    start: Start,
    handover: Option<&crate::sd_notify::Notifier>,
) -> anyhow::Result<ExitCode> {
    let path = config_path(args.config.config.as_deref());
    let config = load_config(&path)?;
    let token = match (&config.server.admin, &config.server.token_file) {
        (Admin::Tcp(_), Some(file)) => Some(
            cutover_control::token_file::read_token_file(file)
                .map_err(|e| usage(format!("{}: {e}", path.display())))?,
        ),
        _ => None,
    };
    // Before the admin socket, which by default lives in it.
    cutover_control::private_dir::prepare_state_dir(&config.server.state_dir)
        .map_err(|e| usage(format!("{}: {e}", path.display())))?;
    runtime()?.block_on(async move {
        // Before anything answers: a SIGTERM sent once the daemon is seen to answer must stop it
        // gracefully, not kill it with the default action.
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        let crate::handover::Inherited {
            mut tcp,
            mut unix,
            fleet_lease,
        } = inherited;
        let admin_inherited = match &config.server.admin {
            Admin::Unix(p) => match unix.len() {
                0 => None,
                1 => Some(
                    cutover_control::api::AdminListener::inherited_unix(unix.remove(0), p)
                        .map_err(|e| usage(format!("cannot serve the admin API on {}: {e}", config.server.admin)))?,
                ),
                n => return Err(usage(format!("{n} unix sockets were passed with LISTEN_FDS; pass at most one, the admin socket"))),
            },
            Admin::Tcp(a) => {
                if !unix.is_empty() {
                    return Err(usage(format!(
                        "a unix socket was passed with LISTEN_FDS, but the admin API is on TCP {a}; pass only the sockets the config names"
                    )));
                }
                match tcp.iter().position(|l| l.local_addr().ok() == Some(*a)) {
                    Some(i) => Some(
                        cutover_control::api::AdminListener::inherited_tcp(tcp.remove(i), token.clone().unwrap_or_default())
                            .map_err(|e| usage(format!("cannot serve the admin API on {a}: {e}")))?,
                    ),
                    None => None,
                }
            }
        };
        // The admin listener first: a busy address must fail the start before anything runs. If
        // the start fails after it, dropping it removes the socket file again.
        let listener = match admin_inherited {
            Some(l) => l,
            None => match &config.server.admin {
                Admin::Unix(p) => cutover_control::api::bind_unix(p),
                Admin::Tcp(a) => cutover_control::api::bind_tcp(*a, token.clone().unwrap_or_default()).await,
            }
            .map_err(|e| usage(format!("cannot serve the admin API on {}: {e}", config.server.admin)))?,
        };
        // Kept for a successor: the same socket, so that no command finds it missing.
        let admin_socket = listener
            .duplicate()
            .map_err(|e| usage(format!("cannot serve the admin API on {}: {e}", config.server.admin)))?;
        let access_log = args.access_log;
        let daemon = Daemon::start_inheriting(config.clone(), |p| p.access_log = access_log, tcp, fleet_lease)
            .await
            .map_err(|e| usage(format!("cannot start: {e}")))?;
        let mut requests = daemon.serve_requests();
        let api = cutover_control::api::serve(listener, daemon.clone());
        for a in daemon.proxy().local_addrs() {
            tracing::info!(listen = %a, admin = %config.server.admin, "cutover serving on {a}; admin API on {}", config.server.admin);
        }
        // Serving: the proxy accepts from a whole route table and the admin API answers.
        let ready = format!("READY=1\nMAINPID={}\nSTATUS=serving", std::process::id());
        if let Some(h) = handover {
            h.send(&ready);
        }
        let watchdog = notifier.as_ref().map(|n| {
            n.send(&ready);
            n.watchdog_every()
        });
        let mut beat = tokio::time::interval(watchdog.flatten().unwrap_or(Duration::from_secs(3600)));
        let at_signal = if args.stop_instances {
            AtShutdown::Stop
        } else {
            AtShutdown::Leave
        };
        let upgrade = |binary: Option<PathBuf>, timeout: Duration| {
            upgrade(&daemon, binary, timeout, &start, &admin_socket, notifier.as_ref(), &config.server.state_dir)
        };
        let ending = loop {
            tokio::select! {
                _ = term.recv() => break Ending::Stop(at_signal),
                _ = int.recv() => break Ending::Stop(at_signal),
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: handing over to a new daemon started from {}", start.binary.as_deref().map_or("?".into(), |b| b.display().to_string()));
                    match upgrade(None, HUP_UPGRADE_TIMEOUT).await {
                        Ok(done) => {
                            tracing::info!(pid = done.pid, "handed over to the new daemon (pid {})", done.pid);
                            break Ending::HandedOver;
                        }
                        Err(UpgradeFailed::Refused(e) | UpgradeFailed::Failed(e)) => {
                            tracing::error!(error = %e, "the handover failed; this daemon serves on")
                        }
                    }
                }
                Some(request) = async { match &mut requests { Some(r) => r.recv().await, None => None } } => match request {
                    ServeRequest::Upgrade { binary, timeout, reply } => match upgrade(binary, timeout).await {
                        Ok(done) => {
                            tracing::info!(pid = done.pid, "handed over to the new daemon (pid {})", done.pid);
                            let _ = reply.send(Ok(done));
                            break Ending::HandedOver;
                        }
                        Err(e) => {
                            let (UpgradeFailed::Refused(why) | UpgradeFailed::Failed(why)) = &e;
                            tracing::error!(error = %why, "the upgrade failed; this daemon serves on");
                            let _ = reply.send(Err(e));
                        }
                    },
                    ServeRequest::Shutdown { instances } => break Ending::Stop(instances),
                },
                _ = beat.tick(), if watchdog.flatten().is_some() => {
                    if let Some(n) = &notifier {
                        n.send("WATCHDOG=1");
                    }
                }
            }
        };
        match ending {
            Ending::Stop(instances) => {
                let what = match instances {
                    AtShutdown::Leave => "finishing requests; instances keep running for the next start",
                    AtShutdown::Stop => "finishing requests, then stopping instances",
                };
                if let Some(n) = &notifier {
                    n.send(&format!("STOPPING=1\nSTATUS=stopping: {what}"));
                }
                tracing::info!("cutover stopping: {what}");
                api.stop(false).await;
                daemon.stop(instances).await;
                daemon.leave_fleet().await;
            }
            Ending::HandedOver => {
                // The successor speaks for the unit now (it sent READY=1 with its MAINPID).
                tracing::info!("finishing what this daemon serves; the new one accepts");
                api.stop(true).await;
                daemon.stop(AtShutdown::Leave).await;
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// How long a new daemon started by SIGHUP has to serve.
const HUP_UPGRADE_TIMEOUT: Duration = Duration::from_secs(60);

/// Hands this daemon over to a new one started from `binary` (default: this process's own
/// binary), with the same arguments, every listening socket and the instances; see
/// `crate::handover`. On failure this daemon serves and manages on, and the reason is returned.
async fn upgrade(
    daemon: &Daemon,
    binary: Option<PathBuf>,
    timeout: Duration,
    start: &Start,
    admin_socket: &std::os::fd::OwnedFd,
    notifier: Option<&crate::sd_notify::Notifier>,
    state_dir: &std::path::Path,
) -> Result<Upgraded, UpgradeFailed> {
    let binary = match binary.or_else(|| start.binary.clone()) {
        Some(b) => crate::handover::check_binary(&b).map_err(UpgradeFailed::Failed)?,
        None => {
            return Err(UpgradeFailed::Failed(
                "cannot tell which file this daemon runs; name the new binary with --binary".into(),
            ))
        }
    };
    let mut sockets: Vec<std::os::fd::OwnedFd> = daemon
        .proxy()
        .listening_sockets()
        .map_err(|e| UpgradeFailed::Failed(format!("cannot pass the listening sockets on: {e}")))?
        .into_iter()
        .map(std::os::fd::OwnedFd::from)
        .collect();
    sockets.push(
        admin_socket
            .try_clone()
            .map_err(|e| UpgradeFailed::Failed(format!("cannot pass the admin socket on: {e}")))?,
    );
    let parked = daemon.park().await.map_err(|e| UpgradeFailed::Refused(e.to_string()))?;
    if let Some(n) = notifier {
        n.send("RELOADING=1\nSTATUS=handing over to a new daemon");
    }
    let lease = daemon.fleet_lease();
    match crate::handover::hand_over(&binary, &start.argv, sockets, state_dir, notifier, lease, timeout).await {
        Ok(done) => {
            parked.finish();
            Ok(Upgraded {
                pid: done.pid,
                previous_pid: std::process::id(),
                binary,
            })
        }
        Err(reason) => {
            if let Err(e) = parked.resume().await {
                tracing::error!(error = %e, "cannot take the state directory back; the services are managed without its lock");
            }
            if let Some(n) = notifier {
                n.send("READY=1\nSTATUS=serving (the handover failed)");
            }
            Err(UpgradeFailed::Failed(reason))
        }
    }
}

/// `cutover upgrade`: the running daemon hands over to a new binary; exit 0 once it serves, 1
/// (the old daemon serving on) if it did not.
pub fn upgrade_daemon(args: UpgradeArgs) -> anyhow::Result<ExitCode> {
    let binary = match &args.binary {
        Some(b) => Some(std::fs::canonicalize(b).map_err(|e| usage(format!("--binary {}: {e}", b.display())))?),
        None => None,
    };
    let client = Client::from_config(args.config.config.as_deref())?;
    let mut body = serde_json::json!({ "timeout_ms": args.timeout.as_millis() as u64 });
    if let Some(b) = &binary {
        body["binary"] = serde_json::Value::String(b.to_string_lossy().into_owned());
    }
    runtime()?.block_on(async move {
        let answer = client.call(Method::POST, "/v1/daemon/upgrade", Some(body)).await?;
        if args.json {
            println!("{answer}");
        } else {
            println!(
                "upgraded: pid {} serves now ({}); pid {} finishes its requests and exits",
                answer["pid"],
                answer["binary"].as_str().unwrap_or("?"),
                answer["previous_pid"]
            );
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// `cutover pause`, `cutover resume`, `cutover maintenance`: hold a service's live traffic.
pub fn pause(args: PauseArgs) -> anyhow::Result<ExitCode> {
    let client = Client::from_config(args.config.config.as_deref())?;
    let body = serde_json::json!({ "max_wait_ms": args.max.as_millis() as u64 });
    runtime()?.block_on(async move {
        client
            .call(
                Method::POST,
                &format!("/v1/services/{}/pause", args.service),
                Some(body),
            )
            .await?;
        println!(
            "{}: live traffic paused: requests wait (up to {:?} each, then 503) until `cutover resume {}`",
            args.service, args.max, args.service
        );
        Ok(ExitCode::SUCCESS)
    })
}

pub fn resume(args: ServiceArgs) -> anyhow::Result<ExitCode> {
    let client = Client::from_config(args.config.config.as_deref())?;
    runtime()?.block_on(async move {
        client
            .call(Method::POST, &format!("/v1/services/{}/resume", args.service), None)
            .await?;
        println!("{}: live traffic flows again", args.service);
        Ok(ExitCode::SUCCESS)
    })
}

pub fn maintenance(args: MaintenanceArgs) -> anyhow::Result<ExitCode> {
    let client = Client::from_config(args.config.config.as_deref())?;
    let body = serde_json::json!({ "message": args.message });
    runtime()?.block_on(async move {
        client
            .call(Method::POST, &format!("/v1/services/{}/maintenance", args.service), Some(body))
            .await?;
        println!(
            "{}: in maintenance: live requests get 503 with your message and Retry-After (the preview route still works) until `cutover resume {}`",
            args.service, args.service
        );
        Ok(ExitCode::SUCCESS)
    })
}

/// `cutover shutdown`: the daemon stops as at SIGTERM.
pub fn shutdown(args: ShutdownArgs) -> anyhow::Result<ExitCode> {
    let client = Client::from_config(args.config.config.as_deref())?;
    let body = serde_json::json!({ "stop_instances": args.stop_instances });
    runtime()?.block_on(async move {
        client.call(Method::POST, "/v1/daemon/shutdown", Some(body)).await?;
        if args.stop_instances {
            println!("stopping: the daemon finishes its requests, then stops every instance");
        } else {
            println!("stopping: the daemon finishes its requests; instances keep running for the next `cutover serve`");
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// `cutover reload`: the daemon reads every certificate file again; exit 1 when any failed (its
/// host keeps the certificate loaded before).
pub fn reload(args: ReloadArgs) -> anyhow::Result<ExitCode> {
    let client = Client::from_config(args.config.config.as_deref())?;
    runtime()?.block_on(async move {
        let answer = client
            .call(Method::POST, "/v1/daemon/reload", Some(serde_json::json!({})))
            .await?;
        let failed = answer["failed"].as_u64().unwrap_or(0);
        if args.json {
            println!("{answer}");
        } else {
            let certificates = answer["certificates"].as_array().cloned().unwrap_or_default();
            let cas = answer["upstream_cas"].as_array().cloned().unwrap_or_default();
            if certificates.is_empty() && cas.is_empty() {
                println!("nothing to reload: no TLS listener, no admin_tls and no upstream_tls is configured");
            }
            for c in &certificates {
                println!("{}", certificate_line(c));
            }
            for c in &cas {
                let (service, file) = (c["service"].as_str().unwrap_or("?"), c["file"].as_str().unwrap_or("?"));
                match c["error"].as_str() {
                    None => println!(
                        "upstream CA of {service}: {file} read; new connections to its instances verify with it"
                    ),
                    Some(e) => println!("upstream CA of {service}: {file} NOT taken: {e}"),
                }
            }
        }
        Ok(if failed > 0 {
            ExitCode::from(1)
        } else {
            ExitCode::SUCCESS
        })
    })
}

/// One certificate of `/v1/status` or `/v1/daemon/reload`, for people.
fn certificate_line(c: &serde_json::Value) -> String {
    let name = c["name"].as_str().unwrap_or("?");
    let hosts = c["hosts"]
        .as_array()
        .map(|h| h.iter().filter_map(|h| h.as_str()).collect::<Vec<_>>().join(", "))
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| match name {
            "admin API" => "the admin API's TCP listener".into(),
            _ => "names no other certificate covers".into(),
        });
    let expiry = match c["not_after"].as_u64() {
        Some(ms) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            if ms < now {
                format!("EXPIRED on {}", format_utc(ms))
            } else {
                format!("expires {} (in {} days)", format_utc(ms), (ms - now) / 86_400_000)
            }
        }
        None => "expiry unknown".into(),
    };
    let mut line = format!("tls {name} ({hosts}): {}, {expiry}", c["cert"].as_str().unwrap_or("?"));
    if let Some(e) = c["error"].as_str() {
        line.push_str(&format!(
            "\n  NOT RELOADED: {e}\n  still serving the certificate loaded at {}",
            format_utc(c["loaded_at"].as_u64().unwrap_or(0))
        ));
    }
    line
}

/// `cutover deploy`: starts a deployment and follows it to the end.
pub fn deploy(args: DeployArgs) -> anyhow::Result<ExitCode> {
    if args.services.len() > 1 || args.services[0].contains('=') {
        return release(args);
    }
    let service = args.services[0].clone();
    let Some(version) = args.version.clone() else {
        return Err(usage(format!(
            "--version is missing: write `cutover deploy {service} --version v2` (or `cutover deploy {service}=v2`)"
        )));
    };
    let client = Client::from_config(args.config.config.as_deref())?;
    runtime()?.block_on(async move {
        // Subscribe first, so that no step happens unseen between the request and the stream.
        let mut events = if args.no_wait {
            None
        } else {
            Some(client.events().await?)
        };
        let body = serde_json::json!({ "version": version, "upstreams": args.upstreams });
        let path = format!("/v1/services/{service}/deploy");
        let t0 = Instant::now();
        let answer = client.call(Method::POST, &path, Some(body)).await?;
        let id = answer
            .get("deployment")
            .and_then(|d| d.as_u64())
            .context("the daemon did not say which deployment")?;
        let Some(events) = events.as_mut() else {
            if args.json {
                println!("{answer}");
            } else {
                println!(
                    "deployment {id} of {} {} started; follow it with `cutover status`",
                    service, version
                );
            }
            return Ok(ExitCode::SUCCESS);
        };
        // The daemon's own "started" event is the first line.
        let mut out = Progress::new(args.json, &service, id);
        let service = service.as_str();
        let live_line = |t0: Instant| format!("{} {} is live ({:.1?})", service, version, t0.elapsed());
        // The deployment ended: exit 0 if it went live (with the live line), 1 otherwise.
        let end = |out: &mut Progress, went_live: bool| {
            out.finish();
            if !went_live {
                return ExitCode::from(1);
            }
            if !args.json {
                println!("{}", live_line(t0));
            }
            ExitCode::SUCCESS
        };
        loop {
            let ev = match events.next().await {
                Ok(Some(ev)) => ev,
                // The stream ends (or breaks off mid-chunk) when the daemon stops or dies.
                Ok(None) | Err(_) => {
                    let note = |kind: &str, message: String| {
                        let ev = serde_json::json!({
                            "kind": kind, "service": service, "deployment": id, "message": message,
                        });
                        (message, ev)
                    };
                    let (text, ev) = note(
                        "daemon-stopped",
                        format!(
                            "the daemon stopped (connection closed) while following deployment #{id}; \
                             waiting up to {:?} for it to come back",
                            args.reconnect_timeout
                        ),
                    );
                    out.line(&text, Some(&ev));
                    let Some(stream) = reconnect(&client, args.reconnect_timeout).await? else {
                        out.finish();
                        return Err(anyhow::anyhow!(Exit {
                            code: 1,
                            message: format!(
                                "the daemon did not come back within {:?}; what became of deployment #{id} is \
                                 unknown here: see `cutover history {service}` (it reads the state database \
                                 without a daemon) and the daemon's log",
                                args.reconnect_timeout
                            ),
                        }));
                    };
                    *events = stream;
                    // Subscribed again first, so nothing after this answer goes unseen.
                    let (outcome, live) = where_it_stands(&client, service, id).await?;
                    let Some(outcome) = outcome else {
                        let (text, ev) = note(
                            "daemon-back",
                            format!("the daemon is back; deployment #{id} is still in progress, following it"),
                        );
                        out.line(&text, Some(&ev));
                        continue;
                    };
                    let live = live.map(|l| format!("; live now: {l}")).unwrap_or_default();
                    let outcome = match outcome.as_str() {
                        "interrupted" => "interrupted: the daemon stopped before it was promoted, so its \
                                          instances were stopped and live traffic stayed where it was"
                            .to_string(),
                        other => other.to_string(),
                    };
                    let kind = if outcome == "went live" { "went-live" } else { "ended" };
                    let (text, ev) = note(kind, format!("the daemon is back; deployment #{id} {outcome}{live}"));
                    out.line(&text, Some(&ev));
                    return Ok(end(&mut out, kind == "went-live"));
                }
            };
            if ev.get("service").and_then(|s| s.as_str()) != Some(service) {
                continue;
            }
            let ev_id = ev.get("deployment").and_then(|d| d.as_u64());
            if ev_id.is_some() && ev_id != Some(id) {
                continue;
            }
            let message = ev.get("message").and_then(|m| m.as_str()).unwrap_or("").to_string();
            out.line(&message, Some(&ev));
            if ev.get("terminal").and_then(|t| t.as_bool()) == Some(true) && ev_id == Some(id) {
                let kind = ev.get("kind").and_then(|k| k.as_str()).unwrap_or("");
                return Ok(end(&mut out, kind == "went-live"));
            }
        }
    })
}

/// Opens the event stream again once the daemon answers, trying with a short backoff for up to
/// `within`; `None` if it did not come back in time.
async fn reconnect(client: &Client, within: Duration) -> anyhow::Result<Option<crate::client::Events>> {
    let deadline = tokio::time::Instant::now() + within;
    let mut pause = Duration::from_millis(100);
    loop {
        match client.events().await {
            Ok(events) => return Ok(Some(events)),
            // A daemon that is starting may accept before it serves: try again.
            Err(e) if crate::client::is_unreachable(&e) || e.downcast_ref::<hyper::Error>().is_some() => {}
            Err(e) => return Err(e),
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

/// How deployment `id` of `service` ended (`None` while in progress), and what is live.
async fn where_it_stands(client: &Client, service: &str, id: u64) -> anyhow::Result<(Option<String>, Option<String>)> {
    let history = client
        .call(Method::GET, &format!("/v1/services/{service}/history?limit=1000"), None)
        .await?;
    let outcome = history
        .as_array()
        .and_then(|list| list.iter().find(|d| d["id"].as_u64() == Some(id)))
        .and_then(|d| d["outcome"].as_str().map(str::to_string));
    let status = client.call(Method::GET, "/v1/status", None).await.ok();
    let live = status.as_ref().and_then(|s| {
        let svc = s["services"]
            .as_array()?
            .iter()
            .find(|v| v["name"].as_str() == Some(service))?;
        let live = svc.get("live").filter(|l| !l.is_null())?;
        Some(format!("{}@{}", live["colour"].as_str()?, live["version"].as_str()?))
    });
    Ok((outcome, live))
}

/// Step output: a spinner on a terminal, plain lines when piped, JSON lines with --json.
struct Progress {
    json: bool,
    bar: Option<indicatif::ProgressBar>,
    start: Instant,
}

impl Progress {
    fn new(json: bool, service: &str, id: u64) -> Progress {
        let bar = (!json && std::io::stdout().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.enable_steady_tick(Duration::from_millis(100));
            bar.set_message(format!("{service}: deployment {id}"));
            bar
        });
        Progress {
            json,
            bar,
            start: Instant::now(),
        }
    }

    fn line(&mut self, text: &str, ev: Option<&serde_json::Value>) {
        if self.json {
            if let Some(ev) = ev {
                println!("{ev}");
            }
            return;
        }
        let stamped = format!("[{:>6.1}s] {text}", self.start.elapsed().as_secs_f64());
        match &self.bar {
            Some(bar) => {
                bar.println(stamped);
                bar.set_message(text.to_string());
            }
            None => println!("{stamped}"),
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// promote, abort and rollback.
pub fn action(verb: &str, args: ServiceArgs) -> anyhow::Result<ExitCode> {
    let client = Client::from_config(args.config.config.as_deref())?;
    runtime()?.block_on(async move {
        let answer = client.call(Method::POST, &format!("/v1/services/{}/{verb}", args.service), None).await?;
        if args.json {
            println!("{answer}");
            return Ok(ExitCode::SUCCESS);
        }
        match verb {
            "rollback" => {
                // The answer says how; the status says what is live now (or being redeployed).
                let status = client.call(Method::GET, "/v1/status", None).await.ok();
                let service = status.as_ref().and_then(|s| {
                    s.get("services")?
                        .as_array()?
                        .iter()
                        .find(|v| v["name"].as_str() == Some(args.service.as_str()))
                        .cloned()
                });
                let at = |v: Option<&serde_json::Value>| {
                    v.filter(|v| !v.is_null()).map(|v| {
                        format!(
                            "{}@{}",
                            v["colour"].as_str().unwrap_or("?"),
                            v["version"].as_str().unwrap_or("?")
                        )
                    })
                };
                let live = at(service.as_ref().and_then(|s| s.get("live")));
                let redeploying = at(service.as_ref().and_then(|s| s.get("deployment")));
                match answer.get("kind").and_then(|k| k.as_str()) {
                    Some("instant") => println!(
                        "{}: rolled back instantly to the warm previous colour; live now: {}",
                        args.service,
                        live.as_deref().unwrap_or("see `cutover status`")
                    ),
                    Some("cold") => println!(
                        "{}: the previous colour was retired; redeploying the previous release{} as deployment {} (cold rollback); live until it is validated: {}",
                        args.service,
                        redeploying.map(|r| format!(" ({r})")).unwrap_or_default(),
                        answer.get("deployment").and_then(|d| d.as_u64()).unwrap_or(0),
                        live.as_deref().unwrap_or("see `cutover status`")
                    ),
                    _ => println!("{}: rolled back", args.service),
                }
                if let Some(fleet) = answer.get("fleet").and_then(|f| f.as_str()) {
                    println!("{}: {fleet}", args.service);
                }
            }
            "promote" => println!("{}: promoted", args.service),
            _ => println!("{}: aborted; live traffic untouched", args.service),
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let client = Client::from_config(args.config.config.as_deref())?;
    runtime()?.block_on(async move {
        let answer = client.call(Method::GET, "/v1/status", None).await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&answer)?);
            return Ok(ExitCode::SUCCESS);
        }
        let empty = Vec::new();
        for s in answer.get("services").and_then(|s| s.as_array()).unwrap_or(&empty) {
            let name = s["name"].as_str().unwrap_or("?");
            let live = match s.get("live").filter(|l| !l.is_null()) {
                Some(l) => format!(
                    "live {}@{}",
                    l["colour"].as_str().unwrap_or("?"),
                    l["version"].as_str().unwrap_or("?")
                ),
                None => "no release yet".into(),
            };
            let warm = s.get("warm").filter(|w| !w.is_null()).map(|w| {
                format!(
                    ", warm {}@{}",
                    w["colour"].as_str().unwrap_or("?"),
                    w["version"].as_str().unwrap_or("?")
                )
            });
            let instances = s["instances"].as_array().cloned().unwrap_or_default();
            let count = |key: &str| instances.iter().filter(|i| i[key].as_bool() == Some(true)).count();
            let (healthy, ejected) = (count("healthy"), count("ejected"));
            println!(
                "{name}: {live}{}, {} ({healthy}/{} instances healthy{})",
                warm.unwrap_or_default(),
                s["phase"].as_str().unwrap_or("?"),
                instances.len(),
                if ejected > 0 {
                    format!(", {ejected} ejected after a failed connect")
                } else {
                    String::new()
                }
            );
            if let Some(hold) = s["hold"].as_str() {
                println!("  live traffic held: {hold} (`cutover resume {name}` lets it through)");
            }
            match s.get("deployment").filter(|d| !d.is_null()) {
                Some(d) => {
                    println!(
                        "  deployment {} of {} on {} in progress",
                        d["id"],
                        d["version"].as_str().unwrap_or("?"),
                        d["colour"].as_str().unwrap_or("?")
                    );
                    if let Some(step) = s["summary"].as_str().filter(|t| t.starts_with("gradual switch")) {
                        println!("  {step}");
                    }
                }
                None if s.get("live").is_none_or(|l| l.is_null()) => {
                    println!("  deploy its first release with `cutover deploy {name} --version VERSION`")
                }
                None => {}
            }
        }
        for c in answer.get("tls").and_then(|t| t.as_array()).unwrap_or(&empty) {
            println!("{}", certificate_line(c));
        }
        if let Some(fleet) = answer.get("fleet").filter(|f| !f.is_null()) {
            print_fleet(fleet);
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// The `fleet` of `/v1/status`, for people: this node, then each member with its applied
/// revisions.
fn print_fleet(fleet: &serde_json::Value) {
    let node = fleet["node"].as_str().unwrap_or("?");
    let role = match (fleet["leading"].as_bool(), fleet["leader"].as_str()) {
        (Some(true), _) => "leads the fleet".to_string(),
        (_, Some(leader)) => format!("follows {leader}"),
        _ => "no node leads".to_string(),
    };
    let member = if fleet["member"].as_bool() == Some(true) {
        ""
    } else {
        ", not a member (its lease expired: etcd unreachable or without quorum)"
    };
    let connected = if fleet["connected"].as_bool() == Some(true) {
        "following etcd"
    } else {
        "cut off from etcd, serving the last revision applied"
    };
    println!("fleet: node {node} {role}, {connected}{member}");
    if let Some(error) = fleet["error"].as_str() {
        println!("  the other nodes are unknown: {error}");
        return;
    }
    let revisions = fleet["revisions"].as_object().cloned().unwrap_or_default();
    for n in fleet["nodes"].as_array().cloned().unwrap_or_default() {
        let name = n["name"].as_str().unwrap_or("?");
        let services: Vec<String> = n["services"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(service, s)| {
                        let applied = s["applied_revision"].as_u64();
                        let now = revisions.get(service).and_then(|r| r.as_u64());
                        match (applied, now, s["current"].as_bool()) {
                            (Some(a), _, Some(true)) => format!("{service} at revision {a} (current)"),
                            (Some(a), Some(r), _) => format!("{service} at revision {a}, behind {r}"),
                            (None, Some(r), _) => format!("{service}: nothing acknowledged (current: {r})"),
                            _ => format!("{service}: nothing committed yet"),
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "  {name}{}: {}",
            if n["leader"].as_bool() == Some(true) {
                " (leader)"
            } else {
                ""
            },
            services.join("; ")
        );
    }
}

/// `cutover history`: from the daemon, or when none runs, from the state database directly
/// (read-only).
pub fn history(args: HistoryArgs) -> anyhow::Result<ExitCode> {
    let client = Client::from_config(args.config.config.as_deref())?;
    let path = config_path(args.config.config.as_deref());
    let config = load_config(&path)?;
    if config.service(&args.service).is_none() {
        return Err(usage(format!(
            "unknown service '{}' in {}",
            args.service,
            path.display()
        )));
    }
    let url = format!("/v1/services/{}/history?limit={}", args.service, args.limit);
    let answer = match runtime()?.block_on(client.call(Method::GET, &url, None)) {
        Ok(answer) => answer,
        Err(e) if crate::client::is_unreachable(&e) => {
            let state_dir = &config.server.state_dir;
            let db = state_dir.join(cutover_control::store::DB_FILE);
            eprintln!(
                "no daemon answers at {}; reading {} directly",
                client.where_(),
                db.display()
            );
            if db.exists() {
                let store =
                    cutover_control::store::Store::open_read_only(state_dir).map_err(|e| anyhow::anyhow!("{e}"))?;
                let list = store
                    .history(&args.service, args.limit)
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                cutover_control::api::history_json(list)
            } else {
                serde_json::Value::Array(Vec::new())
            }
        }
        Err(e) => return Err(e),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
        return Ok(ExitCode::SUCCESS);
    }
    let empty = Vec::new();
    let list = answer.as_array().unwrap_or(&empty);
    if list.is_empty() {
        println!("{}: no deployments yet", args.service);
        return Ok(ExitCode::SUCCESS);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut rows = vec![[
        "#".to_string(),
        "started (UTC)".into(),
        "took".into(),
        "version".into(),
        "colour".into(),
        "cause".into(),
        "outcome".into(),
    ]];
    for d in list {
        let started = d["started_at"].as_u64().unwrap_or(0);
        let (took, outcome) = match d["ended_at"].as_u64() {
            Some(end) => (
                format_duration(end.saturating_sub(started)),
                d["outcome"].as_str().unwrap_or("?").to_string(),
            ),
            None => (
                format!("{} so far", format_duration(now.saturating_sub(started))),
                "in progress".into(),
            ),
        };
        rows.push([
            format!("#{}", d["id"]),
            format_utc(started),
            took,
            d["version"].as_str().unwrap_or("?").into(),
            d["colour"].as_str().unwrap_or("?").into(),
            match d["cause"].as_str().unwrap_or("?") {
                "coldrollback" => "cold rollback".into(),
                other => other.to_string(),
            },
            outcome,
        ]);
    }
    let mut widths = [0usize; 7];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in &rows {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", line.trim_end());
    }
    Ok(ExitCode::SUCCESS)
}

/// Unix milliseconds as `YYYY-MM-DD HH:MM:SS` in UTC.
fn format_utc(ms: u64) -> String {
    let ((year, month, day), (h, m, s)) = cutover_control::process::utc_civil(ms / 1000);
    format!("{year:04}-{month:02}-{day:02} {h:02}:{m:02}:{s:02}")
}

/// A span of milliseconds for people: `0.4s`, `12.0s`, `3m05s`, `2h07m`.
fn format_duration(ms: u64) -> String {
    let secs = ms / 1000;
    match secs {
        0..=59 => format!("{:.1}s", ms as f64 / 1000.0),
        60..=3599 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
    }
}

/// `cutover logs`: the tail of each instance's log file, read from the state directory, and with
/// `--follow` what is written to them afterwards.
pub fn logs(args: LogsArgs) -> anyhow::Result<ExitCode> {
    let path = config_path(args.config.config.as_deref());
    let config = load_config(&path)?;
    if config.service(&args.service).is_none() {
        return Err(usage(format!(
            "unknown service '{}' in {}",
            args.service,
            path.display()
        )));
    }
    let dir = config.server.state_dir.join("logs").join(&args.service);
    let prefix = args.colour.map(|c| match c {
        LogColour::Blue => "blue-",
        LogColour::Green => "green-",
    });
    let list = || -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        files.retain(|f| {
            let name = f
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            name.ends_with(".log") && prefix.is_none_or(|p| name.starts_with(p))
        });
        files.sort();
        files
    };
    let mut out = std::io::stdout().lock();
    let result = (|| -> std::io::Result<()> {
        use std::io::Write as _;
        let files = list();
        if files.is_empty() {
            writeln!(out, "no logs for {} in {}", args.service, dir.display())?;
        }
        // Where each file was read up to; `--follow` goes on from there.
        let mut read_to = std::collections::BTreeMap::new();
        let mut shown: Option<PathBuf> = None;
        for f in files {
            writeln!(out, "==> {} <==", f.display())?;
            let text = std::fs::read(&f).unwrap_or_default();
            let end = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            let whole = String::from_utf8_lossy(&text[..end]);
            let lines: Vec<&str> = whole.lines().collect();
            for l in &lines[lines.len().saturating_sub(args.lines)..] {
                writeln!(out, "{l}")?;
            }
            read_to.insert(f.clone(), end as u64);
            shown = Some(f);
        }
        out.flush()?;
        if !args.follow {
            return Ok(());
        }
        loop {
            std::thread::sleep(Duration::from_millis(200));
            for f in list() {
                let from = read_to.get(&f).copied().unwrap_or(0);
                let Ok(meta) = std::fs::metadata(&f) else { continue };
                // Shorter than what was read: the file was started anew.
                let from = if meta.len() < from { 0 } else { from };
                if meta.len() == from {
                    read_to.insert(f, from);
                    continue;
                }
                let mut text = Vec::new();
                if let Ok(mut file) = std::fs::File::open(&f) {
                    use std::io::{Read as _, Seek as _};
                    if file.seek(std::io::SeekFrom::Start(from)).is_err() {
                        continue;
                    }
                    let _ = file.take(meta.len() - from).read_to_end(&mut text);
                }
                // Whole lines only; a line being written is printed once it ends.
                let Some(last) = text.iter().rposition(|&b| b == b'\n') else {
                    read_to.insert(f, from);
                    continue;
                };
                if shown.as_ref() != Some(&f) {
                    writeln!(out, "==> {} <==", f.display())?;
                    shown = Some(f.clone());
                }
                out.write_all(String::from_utf8_lossy(&text[..=last]).as_bytes())?;
                out.flush()?;
                read_to.insert(f, from + last as u64 + 1);
            }
        }
    })();
    match result {
        Ok(()) => Ok(ExitCode::SUCCESS),
        // The reader went away (`| head`): nothing more to do.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(ExitCode::SUCCESS),
        Err(e) => Err(anyhow::anyhow!("cannot print the logs of {}: {e}", args.service)),
    }
}

/// `cutover lint-migrations`: the expand-phase lint of SQL files, without a daemon.
pub fn lint_migrations(args: LintArgs) -> anyhow::Result<ExitCode> {
    use cutover_control::schema_lint::{lint_files, Breaking, SqlDialect};
    let dialect = SqlDialect::from_name(&args.dialect).ok_or_else(|| {
        usage(format!(
            "--dialect {:?} is not a dialect cutover parses; write {}",
            args.dialect,
            SqlDialect::NAMES
        ))
    })?;
    let mut allow = Vec::new();
    for name in &args.allow {
        let kind = Breaking::from_name(name).ok_or_else(|| {
            usage(format!(
                "--allow {name:?} is not a kind of statement the lint reports; write one of {}",
                Breaking::ALL.map(Breaking::name).join(", ")
            ))
        })?;
        allow.push(kind);
    }
    let report =
        lint_files(&args.files, std::path::Path::new(""), dialect, &allow).map_err(|e| usage(e.to_string()))?;
    for f in &report.refused {
        println!("{f}");
    }
    for f in &report.allowed {
        println!(
            "{}:{}:{}: {} ({}): allowed",
            f.file.display(),
            f.line,
            f.column,
            f.what,
            f.kind
        );
    }
    println!(
        "{} file(s), {} statement(s): {}",
        report.files.len(),
        report.statements,
        match report.refused.len() {
            0 => "nothing breaks the running version".to_string(),
            n => format!("{n} break(s) the running version; the expand phase would be refused"),
        }
    );
    Ok(if report.refused.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_times_and_durations_read_as_people_write_them() {
        assert_eq!(format_utc(0), "1970-01-01 00:00:00");
        assert_eq!(format_utc(1_709_251_199_999), "2024-02-29 23:59:59");
        assert_eq!(format_utc(1_709_251_200_000), "2024-03-01 00:00:00");
        assert_eq!(format_duration(412), "0.4s");
        assert_eq!(format_duration(185_000), "3m05s");
        assert_eq!(format_duration(7_620_000), "2h07m");
    }
}

/// `cutover deploy web api --version v2` (or `web=v2 api=v7`): a release of several services,
/// followed until it is live or has ended otherwise.
fn release(args: DeployArgs) -> anyhow::Result<ExitCode> {
    let mut services = serde_json::Map::new();
    let mut order = Vec::new();
    for item in &args.services {
        let (name, version) = match item.split_once('=') {
            Some((name, version)) => (name.to_string(), version.to_string()),
            None => match &args.version {
                Some(v) => (item.clone(), v.clone()),
                None => {
                    return Err(usage(format!(
                        "{item} has no version: write {item}=VERSION, or give --version for every service without one"
                    )))
                }
            },
        };
        if name.is_empty() || version.is_empty() {
            return Err(usage(format!("{item:?} is not SERVICE or SERVICE=VERSION")));
        }
        order.push(name.clone());
        services.insert(name, serde_json::Value::String(version));
    }
    let mut upstreams: serde_json::Map<String, serde_json::Value> = serde_json::Map::new();
    for u in &args.upstreams {
        let (name, addr) = match (u.split_once('='), order.as_slice()) {
            (Some(pair), _) => pair,
            // A release of one service: its instances need no name.
            (None, [only]) => (only.as_str(), u.as_str()),
            (None, _) => {
                return Err(usage(format!(
                    "--upstream {u}: in a release of several services, write SERVICE=HOST:PORT (e.g. web=10.0.0.5:8080)"
                )))
            }
        };
        if !services.contains_key(name) {
            return Err(usage(format!(
                "--upstream {u}: {name} is not one of the services released ({})",
                order.join(", ")
            )));
        }
        let list = upstreams
            .entry(name.to_string())
            .or_insert_with(|| serde_json::Value::Array(Vec::new()));
        if let serde_json::Value::Array(list) = list {
            list.push(serde_json::Value::String(addr.to_string()));
        }
    }
    let client = Client::from_config(args.config.config.as_deref())?;
    runtime()?.block_on(async move {
        let mut events = if args.no_wait {
            None
        } else {
            Some(client.events().await?)
        };
        let t0 = Instant::now();
        let body = serde_json::json!({ "services": services, "upstreams": upstreams, "order": order });
        let record = client.call(Method::POST, "/v1/releases", Some(body)).await?;
        let id = record["id"].as_u64().context("the daemon did not say which release")?;
        let members: Vec<(String, u64)> = record["members"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| Some((m["service"].as_str()?.to_string(), m["deployment"].as_u64()?)))
            .collect();
        let describe = |members: &[(String, u64)]| {
            members
                .iter()
                .map(|(s, d)| format!("{s} (deployment {d})"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let Some(events) = events.as_mut() else {
            if args.json {
                println!("{record}");
            } else {
                println!(
                    "release {id} started: {}; follow it with `cutover releases`",
                    describe(&members)
                );
            }
            return Ok(ExitCode::SUCCESS);
        };
        if !args.json {
            println!("release {id}: {}", describe(&members));
        }
        let mut last_release_line = String::new();
        loop {
            let next = tokio::time::timeout(Duration::from_millis(200), events.next()).await;
            match next {
                Ok(Ok(Some(ev))) => {
                    let ours = members.iter().any(|(s, d)| {
                        ev["service"].as_str() == Some(s.as_str()) && ev["deployment"].as_u64() == Some(*d)
                    });
                    let release_line = ev["kind"] == "release";
                    if ours && !(release_line && ev["message"].as_str() == Some(last_release_line.as_str())) {
                        if release_line {
                            last_release_line = ev["message"].as_str().unwrap_or_default().to_string();
                        }
                        if args.json {
                            println!("{ev}");
                        } else {
                            println!(
                                "[{:>6.1}s] {}: {}",
                                t0.elapsed().as_secs_f64(),
                                ev["service"].as_str().unwrap_or_default(),
                                ev["message"].as_str().unwrap_or_default()
                            );
                        }
                    }
                }
                Ok(Ok(None)) | Ok(Err(_)) => {
                    return Err(usage(format!(
                        "the daemon closed the event stream while following release {id}; see `cutover releases`"
                    )))
                }
                Err(_) => {}
            }
            let now = client.call(Method::GET, &format!("/v1/releases/{id}"), None).await?;
            let status = now["status"].as_str().unwrap_or_default();
            if matches!(status, "live" | "aborted" | "rolled_back" | "interrupted") {
                if args.json {
                    println!("{now}");
                } else if status == "live" {
                    println!("release {id} is live ({:.1?})", t0.elapsed());
                } else {
                    println!(
                        "release {id} {}: {}",
                        status.replace('_', " "),
                        now["reason"].as_str().unwrap_or_default()
                    );
                }
                return Ok(if status == "live" {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                });
            }
        }
    })
}

#[derive(clap::Args)]
pub struct ReleasesArgs {
    /// Roll this release back: every service of it goes back to its warm colour in one store.
    #[arg(long, value_name = "ID")]
    pub rollback: Option<u64>,
    /// How many releases to list.
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub config: ConfigArg,
}

/// `cutover releases`: the last releases of several services; `--rollback ID` rolls one back.
pub fn releases(args: ReleasesArgs) -> anyhow::Result<ExitCode> {
    let client = Client::from_config(args.config.config.as_deref())?;
    runtime()?.block_on(async move {
        if let Some(id) = args.rollback {
            let r = client
                .call(Method::POST, &format!("/v1/releases/{id}/rollback"), None)
                .await?;
            if args.json {
                println!("{r}");
            } else {
                println!("release {id} rolled back in one store");
            }
            return Ok(ExitCode::SUCCESS);
        }
        let list = client
            .call(Method::GET, &format!("/v1/releases?limit={}", args.limit), None)
            .await?;
        if args.json {
            println!("{list}");
            return Ok(ExitCode::SUCCESS);
        }
        for r in list.as_array().into_iter().flatten() {
            let members: Vec<String> = r["members"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|m| {
                    format!(
                        "{} {} (deployment {})",
                        m["service"].as_str().unwrap_or_default(),
                        m["version"].as_str().unwrap_or_default(),
                        m["deployment"]
                    )
                })
                .collect();
            println!(
                "release {}: {}{} - {}",
                r["id"],
                r["status"].as_str().unwrap_or_default().replace('_', " "),
                r["reason"].as_str().map(|x| format!(" ({x})")).unwrap_or_default(),
                members.join(", ")
            );
        }
        Ok(ExitCode::SUCCESS)
    })
}
