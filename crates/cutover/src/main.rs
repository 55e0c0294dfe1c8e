//! The `cutover` command: the daemon and the commands that drive it, the standalone proxy, the
//! demo app and the quickstart.

#![forbid(unsafe_code)]

mod client;
mod commands;
mod demo;
mod handover;
mod quickstart;
mod sd_notify;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use cutover_proxy::{Colour, Instance, ListenerConfig, Pool, Proxy, ProxyConfig, RouteTable, Service};

use cutover_control::config::parse_duration;

#[derive(Parser)]
#[command(
    name = "cutover",
    version,
    about = "Blue-green deployments behind an atomic switching proxy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format on stderr: `text` for people, `json` for one JSON object per line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: the proxy, the deployment controller and the admin API.
    ///
    /// SIGTERM or SIGINT stops it gracefully: requests in flight finish, and the instances keep
    /// running for the next start to adopt (`--stop-instances` stops them too). SIGHUP hands
    /// over to a new daemon started from the same binary, as `cutover upgrade` does. Listening
    /// sockets passed with systemd's LISTEN_FDS are used instead of binding.
    Serve(commands::ServeArgs),
    /// Replace the running daemon with a new binary without refusing a connection: the new
    /// daemon takes the listening sockets and the instances, and the old one exits once it has
    /// finished its requests. Exit 1, the old daemon serving on, if the new one does not serve.
    Upgrade(commands::UpgradeArgs),
    /// Stop the daemon as SIGTERM does; `--stop-instances` also stops every instance.
    Shutdown(commands::ShutdownArgs),
    /// Hold a service's live requests (during a short write freeze, say): they wait until
    /// `cutover resume`, each at most --max, then get 503. The preview route is not held.
    Pause(commands::PauseArgs),
    /// End a pause or a maintenance: held and new requests go through again.
    Resume(commands::ServiceArgs),
    /// Answer a service's live requests with 503, your message and Retry-After until `cutover
    /// resume` (kept across daemon restarts). The preview route still reaches the instances.
    Maintenance(commands::MaintenanceArgs),
    /// Read the TLS certificate files and the upstream CA files again, without a restart: new
    /// TLS connections get each certificate that loads, new connections to TLS instances verify
    /// them with each CA that loads; a file that fails keeps what was loaded before (exit 1).
    ///
    /// Open connections keep theirs. The daemon also looks for changed files every few seconds
    /// by itself. The rest of the config is read at start (`cutover upgrade` restarts with it).
    Reload(commands::ReloadArgs),
    /// Deploy a version of a service to its idle colour and follow it until live (exit 0) or
    /// failed, aborted or rolled back (exit 1).
    Deploy(commands::DeployArgs),
    /// Releases of several services (`cutover deploy web api ...`): each one's status and
    /// services; `--rollback ID` switches every service of one back in one store.
    Releases(commands::ReleasesArgs),
    /// Promote the validated deployment that waits for it (manual promotion).
    Promote(commands::ServiceArgs),
    /// Send live traffic back to the previous release: instantly while its colour is warm,
    /// otherwise by redeploying it.
    Rollback(commands::ServiceArgs),
    /// Stop a deployment that has not been promoted; live traffic is untouched.
    Abort(commands::ServiceArgs),
    /// Each service's live colour, versions, deployment in progress and instance health.
    Status(commands::StatusArgs),
    /// Past deployments of a service: when each started, how long it took, how it ended.
    ///
    /// Read from the daemon, or from the state database when no daemon runs. Deployment ids are
    /// handed out per service, in order, when a deployment (or a cold rollback) is accepted;
    /// refused commands use none. A number is skipped only when an accepted deployment could not
    /// be stored (a full disk, say), which that command reported as an error.
    History(commands::HistoryArgs),
    /// The output of a service's instances.
    Logs(commands::LogsArgs),
    /// The config file: `cutover config example` prints a complete, commented one.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Check SQL migration files meant for the expand phase: statements that break the version
    /// still running (DROP TABLE, DROP COLUMN, RENAME, ALTER ... TYPE, SET NOT NULL without a
    /// default, ...) are reported with file:line. Exit 0: nothing breaks it; 1: something does;
    /// 2: the files could not be read or parsed.
    LintMigrations(commands::LintArgs),
    /// Run the proxy alone in front of fixed blue and green upstreams.
    ///
    /// Blue is live at start. SIGUSR1 switches the live colour and drains the old one;
    /// SIGTERM or Ctrl-C shuts down gracefully.
    Proxy(ProxyArgs),
    /// A small HTTP app that answers with its version and colour (used by the quickstart).
    DemoApp(demo::DemoArgs),
    /// Deploy a demo app blue, then green, under traffic, roll back, and report what clients saw.
    Quickstart(quickstart::QuickstartArgs),
    /// The quickstart's smoke test: checks the preview route serves $CUTOVER_VERSION.
    #[command(hide = true)]
    SmokeCheck,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print a complete cutover.toml with every key, its default and what it does, as comments.
    ///
    /// Start a config with `cutover config example > cutover.toml`.
    Example,
}

#[derive(clap::Args)]
struct ProxyArgs {
    /// Address to listen on (repeatable).
    #[arg(long, required = true)]
    listen: Vec<SocketAddr>,
    /// Listener that serves only the inactive colour (repeatable).
    #[arg(long)]
    preview_listen: Vec<SocketAddr>,
    /// Blue upstream instances, comma-separated host:port.
    #[arg(long, value_delimiter = ',', required = true)]
    blue: Vec<SocketAddr>,
    /// Green upstream instances, comma-separated host:port.
    #[arg(long, value_delimiter = ',', required = true)]
    green: Vec<SocketAddr>,
    /// Worker threads, each with its own event loop.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Token that sends a request carrying it in X-Cutover-Preview to the inactive colour.
    #[arg(long)]
    preview_token: Option<String>,
    /// How long the old colour's requests may take to finish after a switch.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// Upgraded connections left at the drain deadline are closed over this window.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    close_window: Duration,
    /// Maximum client connections at once.
    #[arg(long, default_value_t = 10_000)]
    max_connections: usize,
    /// Do not count requests per colour (only to measure what counting costs).
    #[arg(long)]
    no_metrics: bool,
    /// Log one line per request: request id, colour, status, duration.
    #[arg(long)]
    access_log: bool,
    /// Longest a worker runs without a point where the kernel may hand its CPU to a waiting
    /// thread ("0s": none).
    #[arg(long, default_value = "2ms", value_parser = parse_duration)]
    preempt_interval: Duration,
    /// Sticky sessions: set a signed `cutover_session` cookie and follow it to a colour pinned
    /// for this long after a switch (to measure what affinity costs; the key is new at each start).
    #[arg(long, value_parser = parse_duration)]
    affinity_window: Option<Duration>,
    /// Copy this share (above 0, at most 1) of the live GET and HEAD requests to the colour that
    /// is not live, answers thrown away (to measure what mirroring costs; see `validate.mirror`).
    #[arg(long, value_parser = parse_sample)]
    mirror: Option<f64>,
}

fn parse_sample(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x > 0.0 && x <= 1.0 => Ok(x),
        _ => Err(format!(
            "{s:?} is not a share above 0 and at most 1; write e.g. 0.1 to copy 10% of the requests"
        )),
    }
}

/// With `--mirror`: a window copying to the colour that is not live, `live` being live.
fn mirror_window(proxy: &Proxy, live: Colour, sample: Option<f64>) -> anyhow::Result<()> {
    if let Some(sample) = sample {
        let methods = [http::Method::GET, http::Method::HEAD];
        proxy.mirror(
            "default",
            Arc::new(cutover_proxy::Mirror::new(live.other(), sample, &methods, 100)),
        )?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format, &cli.command);
    let result = match cli.command {
        Command::Serve(args) => commands::serve(args),
        Command::Upgrade(args) => commands::upgrade_daemon(args),
        Command::Shutdown(args) => commands::shutdown(args),
        Command::Pause(args) => commands::pause(args),
        Command::Resume(args) => commands::resume(args),
        Command::Maintenance(args) => commands::maintenance(args),
        Command::Reload(args) => commands::reload(args),
        Command::Deploy(args) => commands::deploy(args),
        Command::Releases(args) => commands::releases(args),
        Command::Promote(args) => commands::action("promote", args),
        Command::Rollback(args) => commands::action("rollback", args),
        Command::Abort(args) => commands::action("abort", args),
        Command::Status(args) => commands::status(args),
        Command::History(args) => commands::history(args),
        Command::Logs(args) => commands::logs(args),
        Command::Config(ConfigCommand::Example) => commands::config_example(),
        Command::LintMigrations(args) => commands::lint_migrations(args),
        Command::Proxy(args) => run_proxy(args),
        Command::DemoApp(args) => demo::run(args),
        Command::Quickstart(args) => quickstart::run(args),
        Command::SmokeCheck => quickstart::smoke_check(),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            let (code, message) = match e.downcast_ref::<client::Exit>() {
                Some(exit) => (exit.code, exit.message.clone()),
                None => (1, format!("{e:#}")),
            };
            match cli.log_format {
                // One JSON object like every other line a JSON reader gets on stderr.
                LogFormat::Json => tracing::error!(exit_code = code, "{message}"),
                LogFormat::Text => eprintln!("error: {message}"),
            }
            ExitCode::from(code)
        }
    }
}

/// Logs go to stderr, coloured only for a person at a terminal who did not ask otherwise
/// (`NO_COLOR` set to anything but the empty string), so that redirected logs stay plain text.
fn init_logging(format: LogFormat, command: &Command) {
    // The quickstart prints each step itself; its in-process daemon's info lines would say
    // every step a second time.
    let default = match command {
        Command::Quickstart(_) => "warn",
        _ => "info",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    match format {
        LogFormat::Text => {
            use std::io::IsTerminal;
            let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_ansi(std::io::stderr().is_terminal() && !no_color)
                .with_writer(std::io::stderr)
                .init()
        }
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init(),
    }
}

fn run_proxy(args: ProxyArgs) -> anyhow::Result<ExitCode> {
    let mut svc = Service::new("default");
    svc.blue = Pool::new(None, args.blue.iter().copied().map(Instance::new).collect());
    svc.green = Pool::new(None, args.green.iter().copied().map(Instance::new).collect());
    svc.preview_token = args.preview_token.as_deref().map(|t| Arc::from(t.as_bytes()));
    if let Some(window) = args.affinity_window {
        let key = cutover_proxy::affinity::random_key().map_err(|e| anyhow::anyhow!(e))?;
        let affinity = cutover_proxy::Affinity::new("cutover_session", window, &key)
            .map_err(|e| client::usage(format!("--affinity-window: {e}")))?;
        svc.affinity = Some(Arc::new(affinity));
    }
    let table = RouteTable::new(vec![svc])?;
    let mut listeners: Vec<ListenerConfig> = args
        .listen
        .iter()
        .map(|&addr| ListenerConfig {
            addr,
            preview: false,
            tls: false,
        })
        .collect();
    listeners.extend(args.preview_listen.iter().map(|&addr| ListenerConfig {
        addr,
        preview: true,
        tls: false,
    }));
    let config = ProxyConfig {
        listeners,
        workers: args.workers,
        max_connections: args.max_connections,
        record_stats: !args.no_metrics,
        access_log: args.access_log,
        preempt_interval: args.preempt_interval,
        ..Default::default()
    };
    let proxy = match Proxy::start(config, table) {
        Ok(p) => Arc::new(p),
        Err(e) => return Err(client::usage(e.to_string())),
    };
    mirror_window(&proxy, Colour::Blue, args.mirror)?;
    for addr in proxy.local_addrs() {
        tracing::info!(%addr, "cutover proxy listening on {addr}");
    }

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut usr1 = signal(SignalKind::user_defined1())?;
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut switches: u64 = 0;
        loop {
            tokio::select! {
                _ = usr1.recv() => {
                    let table = proxy.table();
                    let Some(svc) = table.service("default") else { continue };
                    let from = svc.active;
                    let to = from.other();
                    proxy.switch_pinned("default", to, args.affinity_window)?;
                    mirror_window(&proxy, to, args.mirror)?;
                    switches += 1;
                    tracing::info!(%from, %to, switches, "switch: live colour is now {to}");
                    let p = proxy.clone();
                    let (drain, window) = (args.drain_timeout, args.close_window);
                    tokio::spawn(async move {
                        match p.drain("default", from, drain, window).await {
                            Ok(r) if !r.completed => tracing::warn!(colour = %from, cut = r.cut_requests, closed = r.closed_upgrades, "drain deadline reached"),
                            Ok(_) => {}
                            Err(e) => tracing::error!(error = %e, "drain failed"),
                        }
                    });
                }
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
        }
        tracing::info!(switches, "cutover proxy shutting down ({switches} colour changes)");
        anyhow::Ok(())
    })?;
    proxy.shutdown();
    proxy.join();
    Ok(ExitCode::SUCCESS)
}
