//! Real upstream servers and real clients for the proxy's integration tests.
//!
//! Every upstream is a hyper server on 127.0.0.1:0 that answers with its colour, so a test can
//! tell from each response where it was routed. It can be killed abruptly (listener and every
//! connection dropped at once), like a crashed process. A TLS upstream (`Upstream::start_tls`)
//! serves the same over TLS, with a certificate from a test CA ([`Ca`]).

#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cutover_proxy::{Colour, Instance, ListenerConfig, Pool, Proxy, ProxyConfig, RouteTable, Service, TlsCertificate};
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

pub type BoxBody = http_body_util::combinators::BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

pub fn full(s: impl Into<Bytes>) -> BoxBody {
    Full::new(s.into()).map_err(|e: Infallible| match e {}).boxed()
}

/// What an upstream saw: request count and the headers of the last request to `/headers` or
/// `/upload`.
#[derive(Default)]
pub struct Seen {
    pub requests: AtomicU64,
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Connections accepted and not closed yet.
    pub open: AtomicU64,
    pub last_headers: Mutex<Option<http::HeaderMap>>,
    /// What WebSockets received, in order: "text TEXT", "binary LEN", "close CODE" (0: no code),
    /// and how each ended: "end" (closed cleanly) or "error".
    pub ws_events: Mutex<Vec<String>>,
    /// TLS upstreams: handshakes completed, with the server name (SNI) and ALPN protocol each
    /// client sent or chose.
    pub handshakes: Mutex<Vec<Handshake>>,
    /// TLS upstreams: connections whose first byte was no TLS handshake (served as plain HTTP).
    pub plain_connections: AtomicU64,
    /// TLS upstreams: handshakes that failed (the client refused the certificate, or gave up).
    pub failed_handshakes: AtomicU64,
}

/// One TLS handshake a TLS upstream completed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Handshake {
    pub sni: Option<String>,
    pub alpn: Option<Vec<u8>>,
    pub version: Option<rustls::ProtocolVersion>,
}

/// An upstream test server.
pub struct Upstream {
    pub addr: SocketAddr,
    pub colour: &'static str,
    pub seen: Arc<Seen>,
    /// Lets `/sse` finish its stream.
    pub sse_release: Arc<Notify>,
    kill: CancellationToken,
}

impl Upstream {
    pub async fn start(colour: &'static str) -> Upstream {
        Upstream::start_with(colour, None).await
    }

    /// An upstream that speaks TLS with `server` (see [`Issued::server`]). A connection whose
    /// first byte is no TLS handshake is served as plain HTTP and counted in
    /// `Seen::plain_connections`, so that a test sees which kind each connection was.
    pub async fn start_tls(colour: &'static str, server: Arc<rustls::ServerConfig>) -> Upstream {
        Upstream::start_with(colour, Some(tokio_rustls::TlsAcceptor::from(server))).await
    }

    /// As `start_tls`, with the receive buffers of its connections fixed at 64 KiB (the kernel
    /// doubles it) rather than grown by the kernel: the proxy's writes to a slow reader soon find
    /// the socket full. Not smaller: a receive window below loopback's 64 KiB segment size makes
    /// Linux acknowledge in tiny steps every ~200 ms (delayed ACKs), a few KB/s, which tests the
    /// kernel, not the proxy.
    pub async fn start_tls_small_buffers(colour: &'static str, server: Arc<rustls::ServerConfig>) -> Upstream {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(64 * 1024).unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(128).unwrap();
        Upstream::serve_on(listener, colour, Some(tokio_rustls::TlsAcceptor::from(server)))
    }

    async fn start_with(colour: &'static str, tls: Option<tokio_rustls::TlsAcceptor>) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind upstream");
        Upstream::serve_on(listener, colour, tls)
    }

    fn serve_on(listener: TcpListener, colour: &'static str, tls: Option<tokio_rustls::TlsAcceptor>) -> Upstream {
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        let sse_release = Arc::new(Notify::new());
        let kill = CancellationToken::new();
        let (s, r, k) = (seen.clone(), sse_release.clone(), kill.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                    _ = k.cancelled() => return,
                };
                let _ = stream.set_nodelay(true);
                s.connections.fetch_add(1, Ordering::Relaxed);
                let (s, r, k, tls) = (s.clone(), r.clone(), k.clone(), tls.clone());
                tokio::spawn(async move {
                    let _open = OpenConnection::new(s.clone());
                    let serve = async {
                        let Some(acceptor) = tls else {
                            return serve_connection(stream, colour, s.clone(), r.clone()).await;
                        };
                        let mut first = [0u8; 1];
                        if !matches!(stream.peek(&mut first).await, Ok(1) if first[0] == 0x16) {
                            s.plain_connections.fetch_add(1, Ordering::SeqCst);
                            return serve_connection(stream, colour, s.clone(), r.clone()).await;
                        }
                        let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
                            Ok(Ok(tls)) => tls,
                            _ => {
                                s.failed_handshakes.fetch_add(1, Ordering::SeqCst);
                                return;
                            }
                        };
                        let conn = tls.get_ref().1;
                        s.handshakes.lock().unwrap().push(Handshake {
                            sni: conn.server_name().map(str::to_string),
                            alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
                            version: conn.protocol_version(),
                        });
                        serve_connection(tls, colour, s.clone(), r.clone()).await
                    };
                    tokio::select! {
                        _ = serve => {}
                        _ = k.cancelled() => {} // dropped: the socket closes abruptly
                    }
                });
            }
        });
        Upstream {
            addr,
            colour,
            seen,
            sse_release,
            kill,
        }
    }

    /// Drops the listener and every open connection at once.
    pub fn kill(&self) {
        self.kill.cancel();
    }

    pub fn requests(&self) -> u64 {
        self.seen.requests.load(Ordering::Relaxed)
    }

    pub fn connections(&self) -> u64 {
        self.seen.connections.load(Ordering::Relaxed)
    }

    /// Connections open right now (accepted, and neither side has closed them).
    pub fn open_connections(&self) -> u64 {
        self.seen.open.load(Ordering::SeqCst)
    }

    /// TLS upstreams: the handshakes completed so far.
    pub fn handshakes(&self) -> Vec<Handshake> {
        self.seen.handshakes.lock().unwrap().clone()
    }

    pub fn failed_handshakes(&self) -> u64 {
        self.seen.failed_handshakes.load(Ordering::SeqCst)
    }

    pub fn plain_connections(&self) -> u64 {
        self.seen.plain_connections.load(Ordering::SeqCst)
    }
}

/// Serves HTTP/1.1 (with upgrades) on one accepted connection until it ends.
async fn serve_connection<I>(io: I, colour: &'static str, seen: Arc<Seen>, sse_release: Arc<Notify>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| upstream_handle(colour, seen.clone(), sse_release.clone(), req));
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades()
        .await;
}

/// Counts one accepted connection in `Seen::open` until its task ends, however it ends.
struct OpenConnection(Arc<Seen>);

impl OpenConnection {
    fn new(seen: Arc<Seen>) -> OpenConnection {
        seen.open.fetch_add(1, Ordering::SeqCst);
        OpenConnection(seen)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.kill.cancel();
    }
}

fn query_u64(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.parse().ok()).flatten()
    })
}

async fn upstream_handle(
    colour: &'static str,
    seen: Arc<Seen>,
    sse_release: Arc<Notify>,
    mut req: Request<Incoming>,
) -> Result<Response<BoxBody>, Infallible> {
    seen.requests.fetch_add(1, Ordering::Relaxed);
    let path = req.uri().path().to_string();
    let resp = match path.as_str() {
        "/headers" => {
            *seen.last_headers.lock().unwrap() = Some(req.headers().clone());
            Response::new(full(colour))
        }
        // The application's own cookies, which the proxy's must not disturb.
        "/app-cookies" => Response::builder()
            .header("set-cookie", "app_session=s1; Path=/")
            .header("set-cookie", "theme=dark")
            .body(full(colour))
            .unwrap(),
        "/slow" => {
            let ms = query_u64(&req, "ms").unwrap_or(2000);
            let size = query_u64(&req, "size").unwrap_or(100_000) as usize;
            tokio::time::sleep(Duration::from_millis(ms)).await;
            let mut body = Vec::with_capacity(size + 8);
            body.extend_from_slice(colour.as_bytes());
            body.push(b' ');
            body.resize(size, b'x');
            Response::new(full(body))
        }
        "/upload" => {
            *seen.last_headers.lock().unwrap() = Some(req.headers().clone());
            // `?pace_ms=N`: a slow reader, which keeps the connection's buffers full.
            let pace = Duration::from_millis(query_u64(&req, "pace_ms").unwrap_or(0));
            let mut hasher = Sha256::new();
            let mut len = 0u64;
            let mut body = req.into_body();
            while let Some(frame) = body.frame().await {
                if !pace.is_zero() {
                    tokio::time::sleep(pace).await;
                }
                match frame {
                    Ok(f) => {
                        if let Some(d) = f.data_ref() {
                            len += d.len() as u64;
                            hasher.update(d);
                        }
                    }
                    Err(e) => {
                        let mut r = Response::new(full(format!("body error: {e}")));
                        *r.status_mut() = StatusCode::BAD_REQUEST;
                        return Ok(r);
                    }
                }
            }
            Response::new(full(format!("{colour} {} {len}", hex(&hasher.finalize()))))
        }
        "/sse" => {
            let (tx, rx) = mpsc::channel::<Bytes>(4);
            tokio::spawn(async move {
                let _ = tx.send(Bytes::from(format!("data: first from {colour}\n\n"))).await;
                sse_release.notified().await;
                let _ = tx.send(Bytes::from_static(b"data: last\n\n")).await;
            });
            let mut r = Response::new(ChannelBody(rx).boxed());
            r.headers_mut()
                .insert("content-type", "text/event-stream".parse().unwrap());
            r
        }
        "/ws" => {
            let key = req.headers().get("sec-websocket-key").cloned();
            let Some(key) = key else {
                let mut r = Response::new(full("not a websocket request"));
                *r.status_mut() = StatusCode::BAD_REQUEST;
                return Ok(r);
            };
            let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
            let on_upgrade = hyper::upgrade::on(&mut req);
            let seen = seen.clone();
            tokio::spawn(async move {
                let Ok(up) = on_upgrade.await else { return };
                let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                    TokioIo::new(up),
                    tokio_tungstenite::tungstenite::protocol::Role::Server,
                    None,
                )
                .await;
                let event = |e: String| seen.ws_events.lock().unwrap().push(e);
                // After a text "slow": a slow reader, which keeps the connection's buffers full.
                let mut slow = false;
                loop {
                    if slow {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    match ws.next().await {
                        Some(Ok(Message::Text(t))) if t.as_str() == "slow" => {
                            slow = true;
                            event(format!("text {t}"));
                            if ws.send(Message::text(format!("{colour}: {t}"))).await.is_err() {
                                return event("error".into());
                            }
                        }
                        Some(Ok(Message::Text(t))) if t.as_str() == "close-me" => {
                            // The application closes first, with its own status.
                            event(format!("text {t}"));
                            let frame = tokio_tungstenite::tungstenite::protocol::CloseFrame {
                                code: 4000.into(),
                                reason: "".into(),
                            };
                            if ws.close(Some(frame)).await.is_err() {
                                return event("error".into());
                            }
                        }
                        Some(Ok(Message::Text(t))) => {
                            event(format!("text {t}"));
                            if ws.send(Message::text(format!("{colour}: {t}"))).await.is_err() {
                                return event("error".into());
                            }
                        }
                        Some(Ok(Message::Binary(b))) => event(format!("binary {}", b.len())),
                        // Polled on, the socket answers the close and then ends.
                        Some(Ok(Message::Close(c))) => event(format!("close {}", c.map_or(0, |f| u16::from(f.code)))),
                        Some(Ok(_)) => {}
                        Some(Err(_)) => return event("error".into()),
                        None => return event("end".into()),
                    }
                }
            });
            let mut r = Response::new(full(Bytes::new()));
            *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            r.headers_mut().insert("connection", "upgrade".parse().unwrap());
            r.headers_mut().insert("upgrade", "websocket".parse().unwrap());
            r.headers_mut().insert("sec-websocket-accept", accept.parse().unwrap());
            r
        }
        _ => {
            let mut r = Response::new(full(colour));
            r.headers_mut().insert("x-colour", colour.parse().unwrap());
            r
        }
    };
    Ok(resp)
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A body fed from a channel, for streaming uploads and SSE.
pub struct ChannelBody(pub mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

/// Proxy settings for tests: one listener on a free port, short timeouts.
pub fn test_config() -> ProxyConfig {
    ProxyConfig {
        listeners: vec![ListenerConfig {
            addr: "127.0.0.1:0".parse().unwrap(),
            preview: false,
            tls: false,
        }],
        workers: 2,
        client_header_timeout: Duration::from_secs(1),
        connect_timeout: Duration::from_millis(500),
        upstream_timeout: Duration::from_secs(10),
        shutdown_timeout: Duration::from_secs(5),
        ..Default::default()
    }
}

/// A table with one default service "web" whose blue and green pools are the given upstreams.
pub fn table(blue: &[&Upstream], green: &[&Upstream]) -> RouteTable {
    let mut s = Service::new("web");
    s.blue = Pool::new(Some("v1"), blue.iter().map(|u| Instance::new(u.addr)).collect());
    s.green = Pool::new(Some("v2"), green.iter().map(|u| Instance::new(u.addr)).collect());
    s.preview_token = Some(Arc::from(&b"let-me-preview"[..]));
    RouteTable::new(vec![s]).unwrap()
}

pub fn start_proxy(config: ProxyConfig, table: RouteTable) -> Arc<Proxy> {
    Arc::new(Proxy::start(config, table).expect("proxy starts"))
}

/// A keep-alive HTTP/1.1 client connection.
pub struct H1 {
    pub tx: hyper::client::conn::http1::SendRequest<BoxBody>,
}

impl H1 {
    pub async fn connect(addr: SocketAddr) -> anyhow_like::Result<H1> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(H1 { tx })
    }

    pub async fn get(&mut self, path: &str) -> anyhow_like::Result<(StatusCode, http::HeaderMap, Bytes)> {
        self.request(get_request(path)).await
    }

    /// A GET whose response comes back with its body unread, for streams.
    pub async fn open(&mut self, path: &str) -> anyhow_like::Result<Response<Incoming>> {
        self.tx.ready().await?;
        Ok(self.tx.send_request(get_request(path)).await?)
    }

    pub async fn request(
        &mut self,
        req: Request<BoxBody>,
    ) -> anyhow_like::Result<(StatusCode, http::HeaderMap, Bytes)> {
        self.tx.ready().await?;
        let resp = self.tx.send_request(req).await?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok((parts.status, parts.headers, body))
    }
}

fn get_request(path: &str) -> Request<BoxBody> {
    Request::get(path).header("host", "web.test").body(empty()).unwrap()
}

/// Waits (5 s at most) until service `web`'s `colour` has `n` requests in flight.
pub async fn in_flight_reaches(proxy: &Proxy, colour: Colour, n: usize) -> bool {
    eventually(Duration::from_secs(5), || {
        proxy.table().service("web").unwrap().pool(colour).in_flight() == n
    })
    .await
}

pub fn empty() -> BoxBody {
    Empty::<Bytes>::new().map_err(|e: Infallible| match e {}).boxed()
}

/// An HTTP/2 (prior knowledge) client connection; clone `tx` for concurrent streams.
pub async fn h2_connect(addr: SocketAddr) -> anyhow_like::Result<hyper::client::conn::http2::SendRequest<BoxBody>> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(tx)
}

/// When each colour was live: every switch with the instants just before and just after the
/// table store. A response is correct when its colour was live at some instant between the
/// request's start and its end.
#[derive(Clone)]
pub struct SwitchLog {
    inner: Arc<Mutex<Vec<(Instant, Instant, Colour)>>>,
}

impl SwitchLog {
    pub fn new(initial: Colour) -> SwitchLog {
        let t = Instant::now();
        SwitchLog {
            inner: Arc::new(Mutex::new(vec![(t, t, initial)])),
        }
    }

    pub fn switch(&self, proxy: &Proxy, service: &str, to: Colour) {
        let mut log = self.inner.lock().unwrap();
        let before = Instant::now();
        proxy.switch(service, to).unwrap();
        let after = Instant::now();
        log.push((before, after, to));
    }

    pub fn len(&self) -> usize {
        self.inner.lock().unwrap().len() - 1
    }

    /// Was `colour` possibly live at some instant in [start, end]?
    pub fn was_live(&self, colour: Colour, start: Instant, end: Instant) -> bool {
        let log = self.inner.lock().unwrap();
        for (i, &(before, _, c)) in log.iter().enumerate() {
            if c != colour {
                continue;
            }
            // `c` may be live from just before its store until the next store completed.
            let from = before;
            let until = log.get(i + 1).map(|&(_, after, _)| after);
            let overlaps = from <= end && until.is_none_or(|u| u >= start);
            if overlaps {
                return true;
            }
        }
        false
    }
}

/// Polls `f` until it returns true or `within` passes.
pub async fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub fn colour_of(body: &[u8]) -> Option<Colour> {
    match body {
        b"blue" => Some(Colour::Blue),
        b"green" => Some(Colour::Green),
        _ => None,
    }
}

pub fn counts() -> Arc<Mutex<HashMap<String, u64>>> {
    Arc::new(Mutex::new(HashMap::new()))
}

/// A tiny boxed-error result for test helpers.
pub mod anyhow_like {
    pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;
}

pub type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

/// Opens a WebSocket to the upstreams' echo at `/ws` through the proxy.
pub async fn ws_connect(addr: SocketAddr) -> Ws {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (ws, resp) = tokio_tungstenite::client_async(format!("ws://{addr}/ws"), stream)
        .await
        .expect("websocket handshake");
    assert_eq!(resp.status(), 101);
    ws
}

/// Opens `n` WebSockets through the proxy and checks that each is answered by `colour`.
pub async fn ws_open(addr: SocketAddr, n: usize, colour: &str) -> Vec<Ws> {
    let mut sockets = Vec::new();
    for i in 0..n {
        let mut ws = ws_connect(addr).await;
        assert_eq!(ws_echo(&mut ws, &i.to_string()).await, format!("{colour}: {i}"));
        sockets.push(ws);
    }
    sockets
}

/// Sends `text` and returns the echo ("COLOUR: text").
pub async fn ws_echo(ws: &mut Ws, text: &str) -> String {
    ws.send(Message::text(text)).await.unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("echo in time")
        {
            Some(Ok(Message::Text(t))) => return t.to_string(),
            Some(Ok(_)) => continue,
            other => panic!("websocket ended: {other:?}"),
        }
    }
}

/// Waits until the proxy ends the WebSocket and returns the status of the Close frame it sent:
/// `Some(None)` if the stream ended without one (EOF or reset), `None` if it is still open after
/// `within`.
pub async fn ws_close_code(ws: &mut Ws, within: Duration) -> Option<Option<u16>> {
    tokio::time::timeout(within, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(c))) => return Some(c.map_or(0, |f| u16::from(f.code))),
                None | Some(Err(_)) => return None,
                Some(Ok(_)) => {}
            }
        }
    })
    .await
    .ok()
}

/// Reads from `s` into `buf` until `buf` holds a whole head (up to a blank line) and returns its
/// length; at least `more` bytes past it are read too. `None` if the peer closes first.
pub async fn read_head_and(s: &mut TcpStream, buf: &mut Vec<u8>, more: impl Fn(&[u8]) -> usize) -> Option<usize> {
    use tokio::io::AsyncReadExt;
    let mut end = None;
    loop {
        if end.is_none() {
            end = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
        }
        if let Some(e) = end {
            if buf.len() >= e + more(&buf[..e]) {
                return Some(e);
            }
        }
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Waits for the proxy to close each WebSocket (every one within `within`) and returns when each
/// closed, counted from `since`, in order.
pub async fn ws_close_times(sockets: Vec<Ws>, since: Instant, within: Duration) -> Vec<Duration> {
    let closes: Vec<_> = sockets
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                let code = ws_close_code(&mut ws, within).await;
                let at = since.elapsed();
                assert_eq!(
                    code,
                    Some(Some(1001)),
                    "each websocket gets a Close frame with 1001 (going away) within {within:?}"
                );
                at
            })
        })
        .collect();
    let mut at = Vec::new();
    for c in closes {
        at.push(c.await.unwrap());
    }
    at.sort();
    at
}

/// The value of a head's `Content-Length`, 0 without one.
pub fn content_length(head: &[u8]) -> usize {
    String::from_utf8_lossy(head)
        .to_ascii_lowercase()
        .lines()
        .find_map(|l| l.strip_prefix("content-length: ").map(|v| v.trim().parse().unwrap()))
        .unwrap_or(0)
}

/// One raw HTTP/2 frame: its 9-byte header (length, type, flags, stream) and payload.
pub fn h2_frame(kind: u8, flags: u8, stream: u8, payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, flags, 0, 0, 0, stream];
    f.extend_from_slice(payload);
    f
}

// ---------------------------------------------------------------------------------------------
// Certificates made at test time (rcgen).

/// A test certificate authority that issues server certificates.
pub struct Ca {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

/// A server certificate: its PEM files' contents and its DER (what a client is shown).
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: rustls::pki_types::CertificateDer<'static>,
}

impl Issued {
    pub fn load(&self) -> TlsCertificate {
        TlsCertificate::from_pem(self.cert_pem.as_bytes(), self.key_pem.as_bytes()).expect("a valid certificate")
    }
}

impl Issued {
    /// Settings for a TLS server presenting this certificate, offering `alpn` (TLS 1.3 and 1.2).
    pub fn server(&self, alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
        use rustls::pki_types::pem::PemObject;
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).unwrap();
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![self.der.clone()], key)
            .unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

impl Ca {
    /// The CA's certificate, PEM: what a client that trusts it is given.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    pub fn new() -> Ca {
        Ca::named("cutover test CA")
    }

    /// A CA whose name (its certificate's common name) is `name`.
    pub fn named(name: &str) -> Ca {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let issuer = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap();
        Ca { issuer }
    }

    pub fn issue(&self, names: &[&str]) -> Issued {
        let params = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }

    /// A client that trusts this CA and offers `alpn`.
    pub fn client(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.issuer.der().clone()).unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

#[allow(deprecated)]
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}
