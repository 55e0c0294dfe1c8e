//! `cutover demo-app`: a tiny web app to deploy. It answers every path with its version and
//! colour (after `?delay=MS` milliseconds if asked, to show draining), `/up` with "ok" for
//! health checks, `/ws` as a WebSocket that echoes each text message prefixed with its version
//! and colour, and `/sse` as an event stream (`data: VERSION COLOUR N` every 100 ms).
//! `--start-delay` makes it take that long before it listens, like an app that loads for a
//! while. On SIGTERM it stops accepting, finishes what it is serving (for at
//! most 30 s; open WebSockets get Close 1001) and exits.
//!
//! To rehearse failures, a version's name can ask for one: a version ending in `-unhealthy`
//! answers `/up` with 503 (it never passes health checks), one ending in `-broken` answers every
//! other path with 500 (it passes health checks and a lenient smoke test, then fails users).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;

use anyhow::Context as _;
use bytes::Bytes;
use http::Response;
use http_body_util::{BodyExt, Full};
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
    /// How long to wait before listening, e.g. 2s.
    #[arg(long, default_value = "0s", value_parser = cutover_control::config::parse_duration)]
    start_delay: std::time::Duration,
}

pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        tokio::time::sleep(args.start_delay).await;
        let addr = SocketAddr::new(args.host, args.port);
        let listener = TcpListener::bind(addr).await.with_context(|| format!("demo-app cannot listen on {addr}"))?;
        let name: std::sync::Arc<str> = format!("{} {}", args.version, args.colour).into();
        let body = Bytes::from(format!("{name}\n"));
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
                    let name = name.clone();
                    let (unhealthy, broken) = (unhealthy, broken);
                    conns.spawn(async move {
                        let ws_stop = stop.clone();
                        let svc = service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
                            let body = body.clone();
                            let (name, stop) = (name.clone(), ws_stop.clone());
                            async move {
                                if req.uri().path() == "/ws" {
                                    return Ok(websocket(&mut req, name, stop).map(|b| b.boxed()));
                                }
                                if req.uri().path() == "/sse" {
                                    return Ok(events(name));
                                }
                                let delay = req.uri().query().and_then(|q| {
                                    q.split('&').find_map(|kv| kv.strip_prefix("delay=")).and_then(|v| v.parse::<u64>().ok())
                                });
                                if let Some(ms) = delay {
                                    tokio::time::sleep(std::time::Duration::from_millis(ms.min(600_000))).await;
                                }
                                let status = |code: u16| http::StatusCode::from_u16(code).unwrap_or(http::StatusCode::OK);
                                let mut resp = if req.uri().path() == "/up" {
                                    Response::new(Full::new(Bytes::from_static(b"ok\n")).boxed())
                                } else {
                                    Response::new(Full::new(body).boxed())
                                };
                                if (req.uri().path() == "/up" && unhealthy) || (req.uri().path() != "/up" && broken) {
                                    *resp.status_mut() = status(if unhealthy { 503 } else { 500 });
                                }
                                Ok::<_, std::convert::Infallible>(resp)
                            }
                        });
                        let conn = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .with_upgrades();
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

/// Answers a WebSocket handshake on `/ws` and echoes each text message as "NAME: text" until the
/// client closes or the app stops (Close 1001). Anything else on `/ws` gets 400.
fn websocket(
    req: &mut http::Request<hyper::body::Incoming>,
    name: std::sync::Arc<str>,
    stop: tokio_util_like::Stop,
) -> Response<Full<Bytes>> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::protocol::{frame::coding::CloseCode, CloseFrame, Message, Role};
    let key = req.headers().get("sec-websocket-key").cloned();
    let wants = req
        .headers()
        .get(http::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let Some(key) = key.filter(|_| wants) else {
        let mut resp = Response::new(Full::new(Bytes::from_static(b"/ws takes a WebSocket handshake\n")));
        *resp.status_mut() = http::StatusCode::BAD_REQUEST;
        return resp;
    };
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else { return };
        let mut ws =
            tokio_tungstenite::WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        loop {
            tokio::select! {
                msg = ws.next() => match msg {
                    Some(Ok(Message::Text(t))) => {
                        if ws.send(Message::text(format!("{name}: {t}"))).await.is_err() {
                            return;
                        }
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                    Some(Ok(_)) => {}
                },
                _ = stop.wait() => {
                    let frame = CloseFrame { code: CloseCode::Away, reason: "stopping".into() };
                    let _ = ws.close(Some(frame)).await;
                    return;
                }
            }
        }
    });
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
    let headers = resp.headers_mut();
    headers.insert(http::header::CONNECTION, http::HeaderValue::from_static("upgrade"));
    headers.insert(http::header::UPGRADE, http::HeaderValue::from_static("websocket"));
    if let Ok(v) = http::HeaderValue::from_str(&accept) {
        headers.insert("sec-websocket-accept", v);
    }
    resp
}

/// `/sse`: a server-sent event stream, `data: NAME N` every 100 ms, for as long as the client
/// reads (and the app runs).
fn events(
    name: std::sync::Arc<str>,
) -> Response<http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>> {
    use http_body_util::BodyExt;
    let stream = futures_util::stream::unfold(0u64, move |n| {
        let name = name.clone();
        async move {
            if n > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            let event = Bytes::from(format!("data: {name} {n}\n\n"));
            Some((
                Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(event)),
                n + 1,
            ))
        }
    });
    let mut resp = Response::new(http_body_util::StreamBody::new(stream).boxed());
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/event-stream"),
    );
    resp.headers_mut()
        .insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static("no-store"));
    resp
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
