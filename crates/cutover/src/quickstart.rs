//! `cutover quickstart`: the first thing a new user runs. In a temporary directory it writes a
//! config for the built-in demo app, starts the daemon on free ports, deploys v1, puts steady
//! keep-alive traffic on it, deploys v2 to green (health checks, a smoke test through the preview
//! route, the switch, the watch), rolls back, and reports what the clients saw. It cleans up after
//! itself.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

/// `println!` that returns the write error instead of panicking: when the reader of stdout goes
/// away (`quickstart | head`), the quickstart stops its daemon and removes its directory like at
/// any other failure, instead of dying with its demo instances left running.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        writeln!(out, $($arg)*).and_then(|()| out.flush()).map_err(OutputClosed)
    }};
}

/// Stdout could not be written (the reader closed the pipe): stop quietly.
#[derive(Debug)]
struct OutputClosed(std::io::Error);

impl std::fmt::Display for OutputClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot write the quickstart's output: {}", self.0)
    }
}

impl std::error::Error for OutputClosed {}

#[derive(clap::Args)]
pub struct QuickstartArgs {
    /// Concurrent keep-alive clients.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// How long traffic runs on each state (v1, v2, back to v1).
    #[arg(long, default_value = "2s", value_parser = cutover_control::config::parse_duration)]
    phase: Duration,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(StdListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// One GET over a fresh connection; used for health and preview checks.
async fn get(addr: SocketAddr, path: &str, preview: Option<&str>) -> anyhow::Result<(u16, String)> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut req = Request::get(path).header("host", "quickstart");
    if let Some(t) = preview {
        req = req.header("x-cutover-preview", t);
    }
    let resp = tx.send_request(req.body(Empty::<Bytes>::new())?).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).trim().to_string()))
}

#[derive(Default)]
struct Tally {
    ok: u64,
    failed: u64,
    served: BTreeMap<String, u64>,
    first_error: Option<String>,
}

/// A keep-alive client sending GET / back to back until `stop`.
async fn client(addr: SocketAddr, stop: Arc<AtomicBool>, tally: Arc<Mutex<Tally>>) {
    let mut local = Tally::default();
    'outer: while !stop.load(Ordering::Relaxed) {
        let conn = async {
            let stream = tokio::net::TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            anyhow::Ok(tx)
        };
        let mut tx = match conn.await {
            Ok(tx) => tx,
            Err(e) => {
                local.failed += 1;
                local.first_error.get_or_insert(format!("connect: {e}"));
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        while !stop.load(Ordering::Relaxed) {
            let req = Request::get("/")
                .header("host", "quickstart")
                .body(Empty::<Bytes>::new())
                .expect("static request");
            let result = async {
                let resp = tx.send_request(req).await?;
                let status = resp.status();
                let body = resp.into_body().collect().await?.to_bytes();
                anyhow::Ok((status, body))
            }
            .await;
            match result {
                Ok((status, body)) if status.is_success() => {
                    local.ok += 1;
                    *local
                        .served
                        .entry(String::from_utf8_lossy(&body).trim().to_string())
                        .or_default() += 1;
                }
                Ok((status, body)) => {
                    local.failed += 1;
                    local
                        .first_error
                        .get_or_insert(format!("{status}: {}", String::from_utf8_lossy(&body).trim()));
                }
                Err(e) => {
                    local.failed += 1;
                    local.first_error.get_or_insert(e.to_string());
                    continue 'outer;
                }
            }
        }
    }
    let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
    t.ok += local.ok;
    t.failed += local.failed;
    for (k, v) in local.served {
        *t.served.entry(k).or_default() += v;
    }
    if t.first_error.is_none() {
        t.first_error = local.first_error;
    }
}

pub fn run(args: QuickstartArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(quickstart(args))
}

async fn quickstart(args: QuickstartArgs) -> anyhow::Result<ExitCode> {
    // Taken before anything starts, so that Ctrl-C (or a SIGTERM) never kills the process with
    // instances running and the directory left behind: it ends the steps, then the cleanup runs.
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let t0 = Instant::now();
    let dir = std::env::temp_dir().join(format!("cutover-quickstart-{}", std::process::id()));
    let _cleanup = RemoveOnDrop(dir.clone());
    std::fs::create_dir_all(&dir)?;
    let port = free_port()?;
    let exe = std::env::current_exe().context("cannot find the cutover executable")?;
    let exe = exe.display();
    let config_text = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nstate_dir = \"state\"\n\n\
         [services.demo]\ncommand = \"{exe} demo-app --port {{port}}\"\ninstances = 2\n\
         health = {{ path = \"/up\", interval = \"100ms\", timeout = \"1s\", healthy = 1, deadline = \"10s\" }}\n\
         validate = {{ smoke = \"{exe} smoke-check\", timeout = \"10s\" }}\n\
         watch = {{ duration = \"2s\", min_requests = 20, max_error_rate = 0.01 }}\n\
         drain_timeout = \"5s\"\nkeep_warm = \"10m\"\n"
    );
    let config_path = dir.join("cutover.toml");
    std::fs::write(&config_path, &config_text)?;
    let config = cutover_control::config::Config::load(&config_path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let started = async {
        say!(
            "cutover quickstart: the demo app, two instances per colour, {} keep-alive clients",
            args.clients
        )?;
        say!("  config {}", config_path.display())?;
        cutover_control::daemon::Daemon::start(config)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))
    };
    let daemon = tokio::select! {
        d = started => match d {
            Ok(d) => d,
            Err(e) => return quiet_if_closed(e),
        },
        _ = int.recv() => return Ok(interrupted(&dir, "SIGINT")),
        _ = term.recv() => return Ok(interrupted(&dir, "SIGTERM")),
    };
    // Whatever happens below (a failure, a closed output, a signal), the daemon stops its
    // instances before the directory goes.
    let result = tokio::select! {
        r = run_steps(&daemon, &args, t0) => r.or_else(quiet_if_closed),
        _ = int.recv() => Ok(interrupted(&dir, "SIGINT")),
        _ = term.recv() => Ok(interrupted(&dir, "SIGTERM")),
    };
    daemon.stop(cutover_control::daemon::AtShutdown::Stop).await;
    result
}

/// A closed stdout ends the quickstart without a message (whoever read it has gone) and with
/// the status a shell gives a command killed by SIGPIPE; any other error is reported.
fn quiet_if_closed(e: anyhow::Error) -> anyhow::Result<ExitCode> {
    match e.downcast_ref::<OutputClosed>() {
        Some(_) => Ok(ExitCode::from(128 + 13)),
        None => Err(e),
    }
}

/// Said on stderr (stdout may be what was closed) before the cleanup; the status a shell gives
/// a command killed by SIGINT.
fn interrupted(dir: &std::path::Path, signal: &str) -> ExitCode {
    eprintln!(
        "quickstart: {signal}: stopping the demo instances and removing {}",
        dir.display()
    );
    ExitCode::from(128 + 2)
}

async fn run_steps(
    daemon: &cutover_control::daemon::Daemon,
    args: &QuickstartArgs,
    t0: Instant,
) -> anyhow::Result<ExitCode> {
    let daemon = daemon.clone();
    let front = daemon.proxy().local_addrs()[0];
    say!("  daemon serving on http://{front}\n")?;
    let mut notices = daemon.subscribe();

    // v1 on blue: the first release goes live once healthy and validated.
    let took = deploy(&daemon, &mut notices, "v1").await?;
    say!("  v1 live on blue after {took:.1?}\n")?;

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let clients: Vec<_> = (0..args.clients)
        .map(|_| tokio::spawn(client(front, stop.clone(), tally.clone())))
        .collect();
    tokio::time::sleep(args.phase).await;

    // v2 on green: health checks, the smoke test through the preview route, the switch, the watch.
    let took = deploy(&daemon, &mut notices, "v2").await?;
    say!("  v2 live on green after {took:.1?} (including the 2 s watch)\n")?;
    tokio::time::sleep(args.phase).await;

    let t = Instant::now();
    let done = daemon.rollback("demo", "quickstart").await?;
    say!("  rollback ({}) in {:.1?}", done.kind, t.elapsed())?;
    follow(&mut notices, None, Duration::from_millis(200)).await?;
    tokio::time::sleep(args.phase).await;

    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.await;
    }
    let (_, live) = get(front, "/", None).await?;

    let t = tally.lock().unwrap_or_else(|p| p.into_inner());
    say!("\nreport")?;
    say!("  requests sent     {}", t.ok + t.failed)?;
    say!("  failed            {}", t.failed)?;
    for (version, n) in &t.served {
        say!("  served by {:<8} {n}", version)?;
    }
    say!("  live at the end   {live}")?;
    say!("  total time        {:.1?}", t0.elapsed())?;
    if let Some(e) = &t.first_error {
        say!("  first failure     {e}")?;
    }
    if t.failed > 0 {
        say!("\nFAILED: {} requests failed", t.failed)?;
        return Ok(ExitCode::from(1));
    }
    say!("\nno request failed across two switches")?;
    Ok(ExitCode::SUCCESS)
}

/// Deploys `version` and prints its steps until it is live; returns how long that took.
async fn deploy(
    daemon: &cutover_control::daemon::Daemon,
    notices: &mut tokio::sync::broadcast::Receiver<cutover_control::daemon::Notice>,
    version: &str,
) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let id = daemon.deploy("demo", version, Vec::new(), "quickstart").await?;
    match follow(notices, Some(id), Duration::from_secs(30)).await? {
        Some(kind) if kind == "went-live" => Ok(t.elapsed()),
        Some(kind) => anyhow::bail!("deployment {id} of {version} ended: {kind}"),
        None => anyhow::bail!("deployment {id} of {version} did not finish in 30 s"),
    }
}

/// Prints notices until deployment `id` ends (returning how), or until `quiet` passes without one
/// when no deployment is followed. Fails only when stdout is closed.
async fn follow(
    notices: &mut tokio::sync::broadcast::Receiver<cutover_control::daemon::Notice>,
    id: Option<u64>,
    quiet: Duration,
) -> Result<Option<String>, OutputClosed> {
    loop {
        let n = match tokio::time::timeout(quiet, notices.recv()).await {
            Ok(Ok(n)) => n,
            Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => continue,
            _ => return Ok(None),
        };
        say!("    {}", n.message)?;
        if n.terminal && id.is_some() && n.deployment == id {
            return Ok(Some(n.kind.as_str().to_string()));
        }
    }
}

/// `cutover smoke-check`: the quickstart's smoke test. It asks the preview route (with the
/// token the daemon gives it) for the release being validated and checks the answer names it.
pub fn smoke_check() -> anyhow::Result<ExitCode> {
    let url = std::env::var("CUTOVER_PREVIEW_URL").context("CUTOVER_PREVIEW_URL is not set")?;
    let token = std::env::var("CUTOVER_PREVIEW_TOKEN").context("CUTOVER_PREVIEW_TOKEN is not set")?;
    let version = std::env::var("CUTOVER_VERSION").unwrap_or_default();
    let addr: SocketAddr = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .context("CUTOVER_PREVIEW_URL")?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (status, body) = rt.block_on(get(addr, "/", Some(&token)))?;
    if status == 200 && body.starts_with(&format!("{version} ")) {
        println!("smoke: preview answers '{body}'");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("smoke: preview answered {status} '{body}', expected {version}");
        Ok(ExitCode::from(1))
    }
}

struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
