//! `cutover quickstart`: the first thing a new user runs. It starts the proxy on a free port,
//! runs the demo app as v1 on blue, puts steady keep-alive traffic on it, starts v2 on green,
//! checks it through the preview route, switches, rolls back, and reports what the clients saw.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use cutover_proxy::{Colour, Instance, ListenerConfig, Proxy, ProxyConfig, RouteTable, Service};
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

#[derive(clap::Args)]
pub struct QuickstartArgs {
    /// Concurrent keep-alive clients.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// How long traffic runs on each state (v1, v2, back to v1).
    #[arg(long, default_value = "2s", value_parser = cutover_control::config::parse_duration)]
    phase: Duration,
}

const PREVIEW_TOKEN: &str = "quickstart-preview";

/// A demo-app child process, killed when dropped.
struct App(Child);

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(StdListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn start_app(version: &str, colour: Colour) -> anyhow::Result<(App, SocketAddr)> {
    let port = free_port()?;
    let exe = std::env::current_exe().context("cannot find the cutover executable")?;
    let child = Command::new(exe)
        .args([
            "demo-app",
            "--port",
            &port.to_string(),
            "--version",
            version,
            "--colour",
            colour.as_str(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start the demo app")?;
    Ok((App(child), SocketAddr::from(([127, 0, 0, 1], port))))
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

async fn wait_healthy(addr: SocketAddr, within: Duration) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        if let Ok((200, _)) = get(addr, "/up", None).await {
            return Ok(start.elapsed());
        }
        if start.elapsed() > within {
            bail!("the demo app on {addr} did not become healthy within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
    let t0 = Instant::now();
    println!(
        "cutover quickstart: one service, two colours, {} keep-alive clients\n",
        args.clients
    );

    let mut svc = Service::new("demo");
    svc.preview_token = Some(Arc::from(PREVIEW_TOKEN.as_bytes()));
    let table = RouteTable::new(vec![svc])?;
    let config = ProxyConfig {
        listeners: vec![ListenerConfig {
            addr: "127.0.0.1:0".parse()?,
            preview: false,
        }],
        ..Default::default()
    };
    let proxy = Arc::new(Proxy::start(config, table)?);
    let front = proxy.local_addrs()[0];
    println!("  proxy listening on http://{front}");

    // v1 on blue: the first release goes live once healthy.
    let (_blue, blue_addr) = start_app("v1", Colour::Blue)?;
    let took = wait_healthy(blue_addr, Duration::from_secs(10)).await?;
    proxy.update(|t| {
        t.with_service("demo", |s| {
            s.blue = s.blue.with_instances(Some("v1"), vec![Instance::new(blue_addr)]);
            s.active = Colour::Blue;
            Ok(())
        })
    })?;
    println!("  v1 started on blue ({blue_addr}), healthy after {took:.0?}, live");

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let clients: Vec<_> = (0..args.clients)
        .map(|_| tokio::spawn(client(front, stop.clone(), tally.clone())))
        .collect();
    tokio::time::sleep(args.phase).await;

    // v2 on green, checked through the preview route before anyone sees it.
    let (_green, green_addr) = start_app("v2", Colour::Green)?;
    let took = wait_healthy(green_addr, Duration::from_secs(10)).await?;
    proxy.update(|t| {
        t.with_service("demo", |s| {
            s.green = s.green.with_instances(Some("v2"), vec![Instance::new(green_addr)]);
            Ok(())
        })
    })?;
    println!("  v2 started on green ({green_addr}), healthy after {took:.0?}");
    let (status, body) = get(front, "/", Some(PREVIEW_TOKEN)).await?;
    if status != 200 || body != "v2 green" {
        bail!("preview of green answered {status} '{body}', expected 200 'v2 green'");
    }
    let (_, live) = get(front, "/", None).await?;
    println!("  preview route answers '{body}' while live traffic still gets '{live}'");

    let mut switches = Vec::new();
    for (label, to) in [
        ("switch to green (v2)", Colour::Green),
        ("rollback to blue (v1)", Colour::Blue),
    ] {
        let from = to.other();
        let s = Instant::now();
        proxy.switch("demo", to)?;
        let switch_took = s.elapsed();
        let drain = proxy
            .drain("demo", from, Duration::from_secs(30), Duration::from_secs(1))
            .await?;
        println!(
            "  {label}: switch {:.1?}, old colour drained in {:.1?} ({} cut)",
            switch_took, drain.elapsed, drain.cut_requests
        );
        switches.push(switch_took);
        tokio::time::sleep(args.phase).await;
    }

    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.await;
    }
    proxy.shutdown();
    let p = proxy.clone();
    tokio::task::spawn_blocking(move || p.join()).await?;

    let t = tally.lock().unwrap_or_else(|p| p.into_inner());
    println!("\nreport");
    println!("  requests sent     {}", t.ok + t.failed);
    println!("  failed            {}", t.failed);
    for (version, n) in &t.served {
        println!("  served by {:<8} {n}", version);
    }
    println!("  total time        {:.1?}", t0.elapsed());
    if let Some(e) = &t.first_error {
        println!("  first failure     {e}");
    }
    if t.failed > 0 {
        println!("\nFAILED: {} requests failed", t.failed);
        return Ok(ExitCode::from(1));
    }
    println!("\nno request failed across {} switches", switches.len());
    Ok(ExitCode::SUCCESS)
}
