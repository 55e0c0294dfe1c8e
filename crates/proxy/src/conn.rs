//! A client connection: its place under `max_connections`, the socket wrapper that notes its
//! reads and writes, and the watchdog that closes it when a head is too slow, when it sits idle,
//! or at shutdown. What answers its requests is handed in (`handler::handle`).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::HeaderValue;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::clock::{instant_after, instant_in};
use crate::h2::{sniff_h2, H2Frames, Sniffed};
use crate::pass::{Hold, Side};
use crate::shared::{OpenGuard, Shared};

/// Per client connection: what every request on it shares.
pub(crate) struct ConnCtx {
    pub(crate) shared: Arc<Shared>,
    pub(crate) client_ip: HeaderValue,
    /// The peer is one of `trusted_proxies`: its `X-Forwarded-*` headers are believed.
    pub(crate) trusted: bool,
    /// Requests on a preview listener always go to the inactive colour.
    pub(crate) preview_listener: bool,
    /// The connection came through a TLS listener: forwarded as `X-Forwarded-Proto: https`.
    pub(crate) tls: bool,
    pub(crate) activity: Arc<Activity>,
    /// Held as long as the connection or a tunnel it became is open.
    pub(crate) _slot: ConnSlot,
}

/// What a client connection holds from its accept to its end, including the life of a tunnel
/// it became after an upgrade: its place under `max_connections` and its count for shutdown.
pub(crate) struct ConnSlot {
    pub(crate) _permit: tokio::sync::OwnedSemaphorePermit,
    pub(crate) _open: OpenGuard,
}

/// What the watchdog of a client connection looks at.
#[derive(Default)]
pub(crate) struct Activity {
    /// Set by every read or write that completes; cleared by the watchdog when it looks.
    io: AtomicBool,
    requests: AtomicUsize,
    /// Responses whose body is still streaming to the client.
    responses: AtomicUsize,
    /// HTTP/1: set when bytes arrive while no request is in flight and no response is
    /// streaming, i.e. the head of the next request has begun; cleared when that request starts.
    head: AtomicBool,
    /// HTTP/2: a header block (or a frame header) has begun and is not complete yet.
    block: AtomicBool,
    /// The last write to the client found its socket full. HTTP/2 stops reading frames while it
    /// cannot write, so a header block may then sit whole but unread in the socket.
    write_waiting: AtomicBool,
    /// How many heads (HTTP/2: header blocks) have begun, so that the watchdog tells one from
    /// the next.
    heads_begun: AtomicU32,
}

pub(crate) struct RequestBusy<'a>(&'a Activity);

impl Activity {
    pub(crate) fn request(&self) -> RequestBusy<'_> {
        self.head.store(false, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        RequestBusy(self)
    }

    /// The number of the request head (HTTP/2: header block) that has begun to arrive and is
    /// not complete yet.
    fn head_pending(&self) -> Option<u32> {
        (self.head.load(Ordering::Relaxed) || self.block.load(Ordering::Relaxed))
            .then(|| self.heads_begun.load(Ordering::Relaxed))
    }

    /// Whether a read or write completed since the last look.
    fn moved_since_last_look(&self) -> bool {
        self.io.swap(false, Ordering::Relaxed)
    }
}

impl Drop for RequestBusy<'_> {
    fn drop(&mut self) {
        self.0.requests.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a response as streaming on its client connection until dropped (it travels with the
/// body): bytes the client sends meanwhile (a pipelined request) do not start a head's clock,
/// which could otherwise run out before the response ends and the next request can start.
pub(crate) struct Responding(Arc<Activity>);

impl Responding {
    pub(crate) fn new(activity: &Arc<Activity>) -> Responding {
        activity.responses.fetch_add(1, Ordering::Relaxed);
        Responding(activity.clone())
    }
}

impl Drop for Responding {
    fn drop(&mut self) {
        self.0.responses.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A client socket (TCP, or the TLS session on it) that notes every read and write for the
/// watchdog. It sees the plaintext: on TLS, HTTP/2 frames and HTTP/1 heads are followed alike.
struct Tracked<S> {
    stream: S,
    activity: Arc<Activity>,
    /// HTTP/1: bytes that arrive between requests begin a request head.
    heads: bool,
    /// HTTP/2: the frames the client's bytes are in.
    frames: Option<Box<H2Frames>>,
    /// Holds each write to the end of the worker's pass (`crate::pass`).
    hold: Hold,
    /// The last write did not all fit into the socket: what follows is bulk data, sent as the
    /// socket takes it, not held.
    backed_up: bool,
    /// The last write found the socket full (mirrored in `Activity::write_waiting`).
    waiting: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Tracked<S> {
    fn poll_send(
        &mut self,
        cx: &mut Context<'_>,
        len: usize,
        write: impl FnOnce(Pin<&mut S>, &mut Context<'_>) -> Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        if !self.backed_up {
            ready!(self.hold.poll_release(Side::Client, cx));
        }
        let r = write(Pin::new(&mut self.stream), cx);
        self.backed_up = match &r {
            Poll::Ready(Ok(n)) => *n < len,
            Poll::Ready(Err(_)) => false,
            Poll::Pending => true,
        };
        if r.is_ready() {
            self.activity.io.store(true, Ordering::Relaxed);
        }
        if r.is_pending() != self.waiting {
            self.waiting = r.is_pending();
            self.activity.write_waiting.store(self.waiting, Ordering::Relaxed);
        }
        r
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.stream).poll_read(cx, buf);
        if r.is_ready() {
            let a = &this.activity;
            a.io.store(true, Ordering::Relaxed);
            if this.heads
                && buf.filled().len() > before
                && !a.head.load(Ordering::Relaxed)
                && a.requests.load(Ordering::Relaxed) == 0
                && a.responses.load(Ordering::Relaxed) == 0
            {
                a.heads_begun.fetch_add(1, Ordering::Relaxed);
                a.head.store(true, Ordering::Relaxed);
            }
            if let Some(frames) = &mut this.frames {
                frames.feed(&buf.filled()[before..]);
                a.heads_begun.store(frames.opened, Ordering::Relaxed);
                a.block.store(frames.open, Ordering::Relaxed);
            }
        }
        r
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.get_mut().poll_send(cx, buf.len(), |s, cx| s.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let len = bufs.iter().map(|b| b.len()).sum();
        self.get_mut()
            .poll_send(cx, len, |s, cx| s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// How long an HTTP/1 keep-alive connection idle at shutdown is kept open for its client's next
/// request, which is then answered with `Connection: close` (see [`drive`]). Long enough for a
/// client in a request loop to send one; short enough that a stop without a successor is not
/// held up by connections nobody uses.
pub(crate) const IDLE_LINGER_AT_SHUTDOWN: Duration = Duration::from_millis(500);

/// How often a connection lingering at shutdown with a request in flight looks again whether it
/// has become idle, in case no read or write wakes it.
const LINGER_RECHECK: Duration = Duration::from_millis(50);

/// A server connection that can be asked to finish gracefully.
trait Graceful: Future<Output = Result<(), hyper::Error>> {
    fn graceful(self: Pin<&mut Self>);
}

impl<I, S, B> Graceful for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn graceful(self: Pin<&mut Self>) {
        self.graceful_shutdown()
    }
}

impl<I, S, B> Graceful for hyper::server::conn::http2::Connection<I, S, TokioExecutor>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn graceful(self: Pin<&mut Self>) {
        self.graceful_shutdown()
    }
}

/// What a connection speaks once it is set up: decided by its first bytes on a plain listener,
/// by ALPN on a TLS one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Opening {
    Http1,
    Http2,
}

/// Serves one plain TCP client connection to its end: HTTP/2 when it opens with the preface,
/// HTTP/1 otherwise, each request answered by `handle`. A TLS ClientHello (a client that took
/// this port for an HTTPS one) is answered in plain HTTP and closed.
pub(crate) async fn serve<H, F, B>(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    preview: bool,
    slot: ConnSlot,
    handle: H,
) where
    H: Fn(Arc<ConnCtx>, Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let Some((stream, peer)) = crate::proxy_protocol::client_of(&shared, stream, peer).await else {
        return;
    };
    let header_timeout = shared.config.client_header_timeout;
    let opening = match tokio::time::timeout(header_timeout, sniff_h2(&stream)).await {
        Ok(Ok(Sniffed::Http2)) => Opening::Http2,
        Ok(Ok(Sniffed::Other(crate::tls::TLS_HANDSHAKE_RECORD))) => {
            answer_tls_hello(stream, peer, instant_in(header_timeout)).await;
            return;
        }
        Ok(Ok(Sniffed::Other(_))) => Opening::Http1,
        _ => return, // closed or silent: nothing to answer
    };
    serve_io(shared, stream, peer, preview, false, opening, slot, handle).await
}

/// A TLS ClientHello on a plain listener. TLS has no way to say "use http://": clients show a
/// TLS alert as a TLS problem ("protocol version", "handshake failure"), which sends people
/// looking in the wrong place. Bytes that are not TLS at all are what every client reports as
/// the port not speaking TLS (curl and Python: "wrong version number"; Firefox:
/// SSL_ERROR_RX_RECORD_TOO_LONG), and a plain HTTP answer is such bytes, readable by anyone who
/// looks at them: a 400 that says to use `http://`.
async fn answer_tls_hello(stream: TcpStream, peer: SocketAddr, deadline: tokio::time::Instant) {
    const BODY: &str = "This port speaks plain HTTP, not HTTPS: use an http:// URL.\n";
    let answer = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\ncache-control: no-store\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    tracing::debug!(%peer, "TLS handshake on a plain HTTP listener; answered 400 in plain HTTP");
    // The ClientHello is read first, so that closing does not reset the connection over it.
    let mut stream = stream;
    let mut hello = [0u8; 4096];
    let _ = tokio::time::timeout_at(deadline, tokio::io::AsyncReadExt::read(&mut stream, &mut hello)).await;
    crate::tls::close_after(stream, answer.as_bytes(), deadline).await;
}

/// Serves one client connection, set up already (a TCP stream, or a TLS session after its
/// handshake), to its end in the protocol `opening` says; each request is answered by `handle`.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn serve_io<S, H, F, B>(
    shared: Arc<Shared>,
    stream: S,
    peer: SocketAddr,
    preview: bool,
    tls: bool,
    opening: Opening,
    slot: ConnSlot,
    handle: H,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Arc<ConnCtx>, Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let cfg = &shared.config;
    let is_h2 = opening == Opening::Http2;
    let activity = Arc::new(Activity::default());
    let client_ip =
        HeaderValue::from_str(&peer.ip().to_string()).unwrap_or_else(|_| HeaderValue::from_static("unknown"));
    let trusted = cfg.trusted_proxies.iter().any(|c| c.contains(peer.ip()));
    let ctx = Arc::new(ConnCtx {
        shared: shared.clone(),
        client_ip,
        trusted,
        preview_listener: preview,
        tls,
        activity: activity.clone(),
        _slot: slot,
    });
    let io = TokioIo::new(Tracked {
        stream,
        activity: activity.clone(),
        heads: !is_h2,
        frames: is_h2.then(|| Box::new(H2Frames::new())),
        hold: Hold::default(),
        backed_up: false,
        waiting: false,
    });
    let svc = service_fn(move |req| handle(ctx.clone(), req));

    if is_h2 {
        let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        b.timer(TokioTimer::new())
            .max_header_list_size(cfg.max_header_bytes as u32);
        drive(&shared, &activity, false, b.serve_connection(io, svc)).await;
    } else {
        let mut b = hyper::server::conn::http1::Builder::new();
        // The header timeout is `drive`'s: hyper's would start when it begins waiting for the
        // next request, so it would also close keep-alive connections idle for that long, and it
        // arms a timer for every request.
        b.header_read_timeout(None)
            .max_header_size(cfg.max_header_bytes)
            // One flattened send() per response instead of writev(): the copy of a response head
            // is cheaper than the vectored syscall path, measurably so on small responses.
            .writev(false)
            .keep_alive(true);
        drive(&shared, &activity, true, b.serve_connection(io, svc).with_upgrades()).await;
    }
}

/// Runs a connection to its end. Asks it to finish gracefully at shutdown or when it has been
/// idle for `idle_timeout`, and closes it when a request head (HTTP/2: a header block) that has
/// begun is not complete within `client_header_timeout`. A client that stops taking the bytes sent to it is
/// the kernel's to cut (see `bind`).
///
/// At shutdown, HTTP/2 gets its GOAWAY at once: the client knows which streams were taken and
/// opens a new connection for the rest. An HTTP/1 connection has no such signal, and closing one
/// that looks idle races with the request its client may be sending on it at that instant. So:
/// a response still streaming gets the connection closed after it; a request in flight or
/// arriving later is answered with `Connection: close` (see `handler::handle`) and the connection
/// ends after it, so a busy client learns from the response itself to connect again (to the
/// next daemon, after a handover or a restart under socket activation); a connection idle for
/// [`IDLE_LINGER_AT_SHUTDOWN`] after the shutdown began is closed then.
///
/// A head that arrives whole is parsed in the same poll as the read that brought it, so the
/// header deadline is armed only for heads that take more than one read; between requests, a
/// keep-alive connection is governed by the idle timeout alone.
async fn drive<C: Graceful>(shared: &Shared, activity: &Activity, http1: bool, conn: C) {
    tokio::pin!(conn);
    let shutdown = shared.shutdown.cancelled();
    tokio::pin!(shutdown);
    // HTTP/1: once the shutdown has begun, when a connection still idle is closed.
    let mut linger_until: Option<tokio::time::Instant> = None;
    let idle = shared.config.idle_timeout;
    let header_timeout = shared.config.client_header_timeout;
    let mut closing = false;
    let mut idle_check = instant_in(idle);
    // The deadline of the head that has begun, and that head's number.
    let mut head_deadline: Option<(tokio::time::Instant, u32)> = None;
    let mut watchdog = Box::pin(tokio::time::sleep_until(idle_check));
    // The watchdog needs polling only to register it after a reset; afterwards its expiry wakes
    // the task and `is_elapsed` tells.
    let mut watchdog_armed = false;
    std::future::poll_fn(|cx| loop {
        if let Poll::Ready(r) = conn.as_mut().poll(cx) {
            if let Err(e) = r {
                tracing::debug!(error = %e, "client connection ended with an error");
            }
            return Poll::Ready(());
        }
        if !closing && linger_until.is_none() && shutdown.as_mut().poll(cx).is_ready() {
            if !http1 {
                closing = true;
                conn.as_mut().graceful();
                continue;
            }
            let until = instant_in(IDLE_LINGER_AT_SHUTDOWN.min(shared.config.shutdown_timeout));
            linger_until = Some(until);
            if until < watchdog.deadline() {
                watchdog.as_mut().reset(until);
                watchdog_armed = false;
            }
        }
        if let (false, Some(until)) = (closing, linger_until) {
            // A response streaming now went out with keep-alive: the connection ends after it.
            // A request in flight is answered with `Connection: close`; one that has not begun
            // by `until` is not waited for.
            let streaming = activity.responses.load(Ordering::Relaxed) > 0;
            let busy = activity.requests.load(Ordering::Relaxed) > 0 || activity.head_pending().is_some();
            if streaming || (!busy && tokio::time::Instant::now() >= until) {
                closing = true;
                conn.as_mut().graceful();
                continue;
            }
        }
        match activity.head_pending() {
            None => head_deadline = None,
            Some(n) if head_deadline.is_some_and(|(_, m)| m == n) => {}
            Some(n) => {
                let d = instant_in(header_timeout);
                head_deadline = Some((d, n));
                if d < watchdog.deadline() {
                    watchdog.as_mut().reset(d);
                    watchdog_armed = false;
                }
            }
        }
        if watchdog_armed && !watchdog.is_elapsed() {
            return Poll::Pending;
        }
        // Outside the task's budget, so that a poll always registers the timer: a budget-limited
        // poll would return without it, and the check above would then never poll it again.
        if Pin::new(&mut tokio::task::unconstrained(watchdog.as_mut()))
            .poll(cx)
            .is_pending()
        {
            watchdog_armed = true;
            return Poll::Pending;
        }
        let now = tokio::time::Instant::now();
        if let Some((_, n)) = head_deadline.filter(|&(d, _)| now >= d) {
            if !activity.write_waiting.load(Ordering::Relaxed) {
                tracing::debug!(
                    timeout = ?header_timeout,
                    "request head not complete within the client header timeout; closing the connection"
                );
                return Poll::Ready(());
            }
            // The client is not taking what is sent to it, and HTTP/2 reads no frames meanwhile:
            // the rest of the head may be in the socket already. Its time starts again; a client
            // that reads nothing at all is the send timeout's to cut.
            head_deadline = Some((instant_after(now, header_timeout), n));
        }
        if now >= idle_check {
            let moved = activity.moved_since_last_look();
            if !closing && !moved && activity.requests.load(Ordering::Relaxed) == 0 {
                closing = true;
                conn.as_mut().graceful();
            }
            idle_check = instant_after(now, idle);
        }
        let next = head_deadline.map_or(idle_check, |(d, _)| d.min(idle_check));
        let next = match linger_until {
            Some(until) if !closing => next.min(until.max(now + LINGER_RECHECK)),
            _ => next,
        };
        watchdog.as_mut().reset(next);
        watchdog_armed = false;
    })
    .await
}
