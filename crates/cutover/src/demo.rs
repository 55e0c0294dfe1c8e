//! `cutover demo-app`: a tiny web app to deploy. It answers every path with its version and
//! colour (after `?delay=MS` milliseconds if asked, to show draining), and `/up` with "ok" for
//! health checks. On SIGTERM it stops accepting, finishes what it is serving (for at most 30 s)
//! and exits.
//!
//! To rehearse failures, a version's name can ask for one: a version ending in `-unhealthy`
//! answers `/up` with 503 (it never passes health checks), one ending in `-broken` answers every
//! other path with 500 (it passes health checks and a lenient smoke test, then fails users).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;

use anyhow::Context as _;
use bytes::Bytes;
use http::Response;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Port to listen on; defaults to $PORT.
    #[arg(long, env = "PORT")]
    port: u16,
    /// Address to listen on.
    #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    host: IpAddr,
    /// Version string to report.
    #[arg(long, env = "CUTOVER_VERSION", default_value = "v1")]
    version: String,
    /// Colour to report.
    #[arg(long, env = "CUTOVER_COLOUR", default_value = "blue")]
    colour: String,
}

pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let addr = SocketAddr::new(args.host, args.port);
        let listener = TcpListener::bind(addr).await.with_context(|| format!("demo-app cannot listen on {addr}"))?;
        let body = Bytes::from(format!("{} {}\n", args.version, args.colour));
        let unhealthy = args.version.ends_with("-unhealthy");
        let broken = args.version.ends_with("-broken");
        eprintln!("demo-app {} ({}) listening on {}", args.version, args.colour, listener.local_addr()?);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let stop = tokio_util_like::Stop::default();
        let mut conns = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                r = listener.accept() => {
                    let Ok((stream, _)) = r else { continue };
                    let _ = stream.set_nodelay(true);
                    let body = body.clone();
                    let stop = stop.clone();
                    let (unhealthy, broken) = (unhealthy, broken);
                    conns.spawn(async move {
                        let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                            let body = body.clone();
                            async move {
                                let delay = req.uri().query().and_then(|q| {
                                    q.split('&').find_map(|kv| kv.strip_prefix("delay=")).and_then(|v| v.parse::<u64>().ok())
                                });
                                if let Some(ms) = delay {
                                    tokio::time::sleep(std::time::Duration::from_millis(ms.min(600_000))).await;
                                }
                                let status = |code: u16| http::StatusCode::from_u16(code).unwrap_or(http::StatusCode::OK);
                                let mut resp = if req.uri().path() == "/up" {
                                    Response::new(Full::new(Bytes::from_static(b"ok\n")))
                                } else {
                                    Response::new(Full::new(body))
                                };
                                if (req.uri().path() == "/up" && unhealthy) || (req.uri().path() != "/up" && broken) {
                                    *resp.status_mut() = status(if unhealthy { 503 } else { 500 });
                                }
                                Ok::<_, std::convert::Infallible>(resp)
                            }
                        });
                        let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
                        tokio::pin!(conn);
                        tokio::select! {
                            _ = conn.as_mut() => {}
                            _ = stop.wait() => {
                                conn.as_mut().graceful_shutdown();
                                let _ = conn.await;
                            }
                        }
                    });
                }
                _ = term.recv() => {
                    stop.fire();
                    break;
                }
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        drop(listener);
        let drained = tokio::time::timeout(std::time::Duration::from_secs(30), async {
            while conns.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            eprintln!("demo-app: connections still open after 30 s; exiting anyway");
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// A one-shot broadcast "stop" signal for the app's connections.
mod tokio_util_like {
    use std::sync::Arc;
    use tokio::sync::watch;

    #[derive(Clone)]
    pub struct Stop(Arc<watch::Sender<bool>>, watch::Receiver<bool>);

    impl Default for Stop {
        fn default() -> Self {
            let (tx, rx) = watch::channel(false);
            Stop(Arc::new(tx), rx)
        }
    }

    impl Stop {
        pub fn fire(&self) {
            let _ = self.0.send(true);
        }
        pub async fn wait(&self) {
            let mut rx = self.1.clone();
            let _ = rx.wait_for(|v| *v).await;
        }
    }
}
