//! HTTP/1.1 requests without a body, served without hyper.
//!
//! Most requests a proxy carries are a head and nothing else (GET, HEAD, DELETE...), answered by a
//! head and a body. For those, this loop reads the head off the client connection, forwards it
//! with the same code as every other request (`handler::forward`), and writes the upstream's
//! response head to the client as the upstream spelled it, with hop-by-hop fields left out, then
//! streams the body. It builds no header map for the response and runs no server state machine,
//! which halves the user-space work of such a request (measured in BENCHMARKS.md, "Reading the
//! throughput numbers").
//!
//! Anything else goes to hyper's HTTP/1 server, which gets the connection from that request on
//! with the bytes read so far, and serves it to its end: a request with a body or framing
//! headers, an upgrade, `Expect`, an HTTP/1.0 request, a `Connection` header naming anything but
//! `close` or `keep-alive`, a head that does not parse, does not fit into its limits, or carries a
//! name or value the `http` types refuse. hyper then gives those their defined answers (400, 431,
//! ...), so this loop only ever takes requests that it serves as hyper would.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use bytes::{Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Uri, Version};
use http_body::Body;

use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::body::ProxyBody;
use crate::error::ProxyError;
use crate::h1::{write_hex, Framing};
use crate::handler::{self, ConnCtx, Seen};
use crate::pass::{Hold, Side};

/// Headers read per request head here; a head with more goes to hyper.
const MAX_FIELDS: usize = 64;
/// Body bytes gathered before they are written out, when the upstream sends faster than that.
const WRITE_AT: usize = 64 * 1024;
/// A response buffer grown past this by a large response is let go once the response is out,
/// so that an idle keep-alive connection does not keep it.
const KEEP_OUT: usize = 16 * 1024;
/// Longest request target taken here; hyper answers a longer one with 414.
const MAX_TARGET: usize = 65_534;

/// How the connection goes on after this loop.
pub(crate) enum Next {
    /// The connection is done (closed by the client, timed out, shutting down, or failed).
    Close,
    /// hyper takes the connection from the request at the front of these bytes.
    Hyper(Bytes),
}

/// A request head taken here.
struct Plain {
    parts: http::request::Parts,
    /// The client asked to close the connection after this response.
    close: bool,
}

/// Serves the connection's bodiless requests until it ends or a request comes that hyper must
/// serve.
pub(crate) async fn serve(ctx: Arc<ConnCtx>, stream: &mut TcpStream) -> Next {
    let shared = ctx.shared.clone();
    let cfg = &shared.config;
    let mut conn = Client {
        stream,
        buf: BytesMut::with_capacity(8 * 1024),
        // Grows to the size of the responses it carries, and keeps it.
        out: Vec::new(),
        hold: Hold::default(),
        backed_up: false,
    };
    let shutdown = shared.shutdown.cancelled();
    tokio::pin!(shutdown);
    let mut idle = Idle::new(cfg.idle_timeout);
    loop {
        let plain = match next_head(&mut conn, &ctx, shutdown.as_mut(), &mut idle).await {
            Ok(Some(p)) => p,
            Ok(None) => {
                let rest = conn.buf.split().freeze();
                return Next::Hyper(rest);
            }
            Err(()) => return Next::Close,
        };
        let start = std::time::Instant::now();
        crate::server::preempt_point(start, cfg.preempt_interval);
        let _busy = ctx.activity.request();
        let line = cfg
            .access_log
            .then(|| (plain.parts.method.clone(), plain.parts.uri.path().to_string()));
        let mut seen: Option<Seen> = None;
        let head_request = plain.parts.method == Method::HEAD;
        // A client that goes away while its request waits for the upstream ends the request.
        let mut watch = Watch::On;
        let result = tokio::select! {
            biased;
            r = handler::forward(&ctx, &plain.parts, None, None, &mut seen) => r,
            _ = poll_fn(|cx| watch.poll_gone(conn.stream, cx)) => {
                tracing::debug!("client closed the connection before the response; dropping the request");
                return Next::Close;
            }
        };
        let close = plain.close || shared.shutdown.is_cancelled();
        drop(plain);
        let ok = match result {
            Ok(fwd) if fwd.head.status == StatusCode::SWITCHING_PROTOCOLS => {
                let e = ProxyError::Upstream {
                    service: seen.as_ref().map_or_else(String::new, |s| s.service.to_string()),
                    addr: fwd.addr,
                    reason: "switched protocols without being asked to".into(),
                };
                handler::record(cfg, seen.as_ref(), e.status().as_u16(), start, line);
                conn.error(&e, close, head_request).await
            }
            Ok(fwd) => {
                let status = fwd.head.status;
                handler::record(cfg, seen.as_ref(), status.as_u16(), start, line);
                conn.out.clear();
                conn.out.extend_from_slice(b"HTTP/1.1 ");
                conn.out.extend_from_slice(status.as_str().as_bytes());
                conn.out.push(b' ');
                conn.out
                    .extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
                conn.out.extend_from_slice(b"\r\n");
                // A length-framed body goes out with the length the proxy framed it by, whatever
                // the upstream wrote (a repeated field, a sign, a Connection header naming it).
                let length = match fwd.head.framing {
                    Framing::Length(n) => Some(n),
                    _ => None,
                };
                fwd.head.write_fields(&mut conn.out, length.is_some());
                if let Some(n) = length {
                    conn.out.extend_from_slice(b"content-length: ");
                    conn.out.extend_from_slice(n.to_string().as_bytes());
                    conn.out.extend_from_slice(b"\r\n");
                }
                // A response passed on gets a Date if it has none (RFC 9110, 6.6.1), as hyper does.
                if !fwd.head.has_field(b"date") {
                    put_date(&mut conn.out);
                }
                // The upstream's chunking was taken off; a body of unknown length goes out chunked.
                let chunked = matches!(fwd.head.framing, Framing::Chunked(_) | Framing::Close);
                if chunked {
                    conn.out.extend_from_slice(b"transfer-encoding: chunked\r\n");
                }
                if close {
                    conn.out.extend_from_slice(b"connection: close\r\n");
                }
                conn.out.extend_from_slice(b"\r\n");
                let body = ProxyBody::streaming(
                    fwd.into_streaming(cfg.upstream_pool_size, crate::server::Responding::new(&ctx.activity)),
                );
                conn.body(body, chunked, &mut watch).await
            }
            Err(e) => {
                handler::record(cfg, seen.as_ref(), e.status().as_u16(), start, line);
                conn.error(&e, close, head_request).await
            }
        };
        if !ok {
            return Next::Close;
        }
        // The idle timeout runs from the end of the response.
        idle.touch();
        if conn.out.capacity() > KEEP_OUT {
            conn.out = Vec::new();
        }
        if close {
            // The response is out; a FIN tells the client no more follows.
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut *conn.stream).await;
            return Next::Close;
        }
    }
}

/// Waits for the next request head and takes it: `Ok(Some)` to serve here, `Ok(None)` for hyper
/// (the head stays in the buffer), `Err` to close the connection.
async fn next_head(
    conn: &mut Client<'_>,
    ctx: &ConnCtx,
    mut shutdown: Pin<&mut tokio_util::sync::WaitForCancellationFuture<'_>>,
    idle: &mut Idle,
) -> Result<Option<Plain>, ()> {
    let cfg = &ctx.shared.config;
    // When the head that has begun must be complete.
    let mut head_deadline: Option<Pin<Box<tokio::time::Sleep>>> = None;
    loop {
        if !conn.buf.is_empty() {
            match take_head(&mut conn.buf, cfg.max_header_bytes) {
                Taken::Plain(p) => return Ok(Some(p)),
                Taken::Hyper => return Ok(None),
                Taken::Refused(head) => {
                    // Rare: put the head back in front of what follows it.
                    let mut all = BytesMut::with_capacity(head.len() + conn.buf.len());
                    all.extend_from_slice(&head);
                    all.extend_from_slice(&conn.buf);
                    conn.buf = all;
                    return Ok(None);
                }
                Taken::Partial => {}
            }
            if head_deadline.is_none() {
                head_deadline = Some(Box::pin(tokio::time::sleep(cfg.client_header_timeout)));
            }
        }
        if conn.buf.capacity() - conn.buf.len() < 1024 {
            conn.buf.reserve(8 * 1024);
        }
        let waiting = conn.buf.is_empty();
        let read = poll_fn(|cx| {
            if let Poll::Ready(r) = tokio_util::io::poll_read_buf(Pin::new(&mut *conn.stream), cx, &mut conn.buf) {
                return Poll::Ready(Some(r));
            }
            // Between requests, shutting down closes the connection; a head that has begun is
            // read and answered first.
            let stopping = ctx.shared.shutdown.is_cancelled() || shutdown.as_mut().poll(cx).is_ready();
            if stopping && waiting {
                return Poll::Ready(None);
            }
            if let Some(d) = head_deadline.as_mut() {
                if d.as_mut().poll(cx).is_ready() {
                    tracing::debug!(
                        timeout = ?cfg.client_header_timeout,
                        "request head not complete within the client header timeout; closing the connection"
                    );
                    return Poll::Ready(None);
                }
            } else if idle.poll_expired(cx).is_ready() {
                return Poll::Ready(None);
            }
            Poll::Pending
        })
        .await;
        match read {
            Some(Ok(0)) | Some(Err(_)) | None => return Err(()),
            Some(Ok(_)) => idle.touch(),
        }
    }
}

enum Taken {
    Plain(Plain),
    /// For hyper; the head is still at the front of the buffer.
    Hyper,
    /// For hyper: a head that the `http` types refuse, already taken off the buffer.
    Refused(Bytes),
    Partial,
}

/// Parses the request head at the front of `buf`; takes it off when it is one to serve here.
fn take_head(buf: &mut BytesMut, max_header_bytes: usize) -> Taken {
    let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut req = httparse::Request::new(&mut fields);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() <= max_header_bytes => return Taken::Partial,
        // Too large, malformed, too many fields: hyper answers.
        _ => return Taken::Hyper,
    };
    if len > max_header_bytes || req.version != Some(1) {
        return Taken::Hyper;
    }
    let Some(method) = req.method.and_then(|m| Method::from_bytes(m.as_bytes()).ok()) else {
        return Taken::Hyper;
    };
    if method == Method::CONNECT {
        return Taken::Hyper;
    }
    let mut close = false;
    for f in req.headers.iter() {
        let name = f.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length")
            || name.eq_ignore_ascii_case(b"transfer-encoding")
            || name.eq_ignore_ascii_case(b"upgrade")
            || name.eq_ignore_ascii_case(b"expect")
        {
            return Taken::Hyper;
        }
        if name.eq_ignore_ascii_case(b"connection") {
            for t in f.value.split(|&b| b == b',') {
                let t = t.trim_ascii();
                if t.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if !t.eq_ignore_ascii_case(b"keep-alive") {
                    return Taken::Hyper;
                }
            }
        }
    }
    let base = buf.as_ptr() as usize;
    let path = req.path.unwrap_or("/");
    if path.len() > MAX_TARGET {
        return Taken::Hyper;
    }
    let path_at = (path.as_ptr() as usize - base, path.len());
    let mut spans = [(0usize, 0usize, 0usize, 0usize); MAX_FIELDS];
    let count = req.headers.len();
    for (i, f) in req.headers.iter().enumerate() {
        spans[i] = (
            f.name.as_ptr() as usize - base,
            f.name.len(),
            f.value.as_ptr() as usize - base,
            f.value.len(),
        );
    }
    // Names and values share the head's bytes.
    let head = buf.split_to(len).freeze();
    let Ok(uri) = Uri::from_maybe_shared(head.slice(path_at.0..path_at.0 + path_at.1)) else {
        return Taken::Refused(head);
    };
    let mut headers = HeaderMap::with_capacity(count);
    for &(n, nl, v, vl) in &spans[..count] {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&head[n..n + nl]),
            HeaderValue::from_maybe_shared(head.slice(v..v + vl)),
        ) else {
            return Taken::Refused(head);
        };
        headers.append(name, value);
    }
    let (mut parts, ()) = http::Request::new(()).into_parts();
    parts.method = method;
    parts.uri = uri;
    parts.version = Version::HTTP_11;
    parts.headers = headers;
    Taken::Plain(Plain { parts, close })
}

/// The idle timeout of a connection between requests, re-armed only when it fires: every read
/// moves the last activity on, and the timer, when it fires, sleeps again until an idle timeout
/// after that.
struct Idle {
    timeout: std::time::Duration,
    last: Instant,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl Idle {
    fn new(timeout: std::time::Duration) -> Idle {
        let now = Instant::now();
        Idle {
            timeout,
            last: now,
            timer: Box::pin(tokio::time::sleep_until(now + timeout)),
        }
    }

    fn touch(&mut self) {
        self.last = Instant::now();
    }

    fn poll_expired(&mut self, cx: &mut std::task::Context<'_>) -> Poll<()> {
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let due = self.last + self.timeout;
            if Instant::now() >= due {
                return Poll::Ready(());
            }
            self.timer.as_mut().reset(due);
        }
    }
}

/// The client side of the connection, while this loop serves it.
struct Client<'a> {
    stream: &'a mut TcpStream,
    buf: BytesMut,
    out: Vec<u8>,
    /// Holds each write to the end of the worker's pass (`crate::pass`).
    hold: Hold,
    /// The last write did not all fit into the socket: what follows is sent as the socket takes
    /// it, not held.
    backed_up: bool,
}

impl Client<'_> {
    /// Writes `out` whole and clears it.
    async fn flush(&mut self) -> io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        if !self.backed_up {
            self.hold.release(Side::Client).await;
        }
        let mut at = 0;
        let mut partial = false;
        loop {
            match self.stream.try_write(&self.out[at..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    at += n;
                    if at == self.out.len() {
                        break;
                    }
                    partial = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    partial = true;
                    self.stream.writable().await?;
                }
                Err(e) => return Err(e),
            }
        }
        self.backed_up = partial;
        self.out.clear();
        Ok(())
    }

    /// Streams the body after the head in `out`. False when the connection cannot go on.
    async fn body(&mut self, mut body: ProxyBody, chunked: bool, watch: &mut Watch) -> bool {
        enum Step {
            Frame(Option<Result<http_body::Frame<Bytes>, crate::body::BodyError>>),
            Flush,
            Gone,
        }
        loop {
            let stream = &*self.stream;
            let pending = !self.out.is_empty();
            let step = poll_fn(|cx| match Pin::new(&mut body).poll_frame(cx) {
                Poll::Ready(f) => Poll::Ready(Step::Frame(f)),
                Poll::Pending if pending => Poll::Ready(Step::Flush),
                // A stream that waits on its upstream (server-sent events, a long poll) ends when
                // the client goes away.
                Poll::Pending => match watch.poll_gone(stream, cx) {
                    Poll::Ready(()) => Poll::Ready(Step::Gone),
                    Poll::Pending => Poll::Pending,
                },
            })
            .await;
            match step {
                Step::Gone => {
                    tracing::debug!("client closed the connection during the response; dropping it");
                    return false;
                }
                Step::Flush => {
                    if self.flush().await.is_err() {
                        return false;
                    }
                }
                Step::Frame(Some(Ok(frame))) => {
                    let Ok(data) = frame.into_data() else { continue };
                    if data.is_empty() {
                        continue;
                    }
                    if chunked {
                        write_hex(&mut self.out, data.len() as u64);
                        self.out.extend_from_slice(b"\r\n");
                        self.out.extend_from_slice(&data);
                        self.out.extend_from_slice(b"\r\n");
                    } else {
                        self.out.extend_from_slice(&data);
                    }
                    if self.out.len() >= WRITE_AT && self.flush().await.is_err() {
                        return false;
                    }
                }
                Step::Frame(None) => {
                    if chunked {
                        self.out.extend_from_slice(b"0\r\n\r\n");
                    }
                    return self.flush().await.is_ok();
                }
                Step::Frame(Some(Err(e))) => {
                    // Cut mid-body (drain deadline, upstream failure): the client must see the
                    // response end early, so the connection closes.
                    tracing::debug!(error = %e, "response body broke off; closing the client connection");
                    let _ = self.flush().await;
                    return false;
                }
            }
        }
    }

    /// Answers with the proxy's own error response. False when the connection cannot go on.
    /// The answer to a HEAD request has the length of the message but not the message.
    async fn error(&mut self, e: &ProxyError, close: bool, head_request: bool) -> bool {
        let text = handler::error_text(e);
        let status = e.status();
        self.out.clear();
        self.out.extend_from_slice(b"HTTP/1.1 ");
        self.out.extend_from_slice(status.as_str().as_bytes());
        self.out.push(b' ');
        self.out
            .extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
        self.out.extend_from_slice(
            b"\r\ncontent-type: text/plain; charset=utf-8\r\ncache-control: no-store\r\ncontent-length: ",
        );
        self.out.extend_from_slice(text.len().to_string().as_bytes());
        if close {
            self.out.extend_from_slice(b"\r\nconnection: close");
        }
        self.out.extend_from_slice(b"\r\n");
        put_date(&mut self.out);
        self.out.extend_from_slice(b"\r\n");
        if !head_request {
            self.out.extend_from_slice(text.as_bytes());
        }
        self.flush().await.is_ok()
    }
}

thread_local! {
    /// The current second and its IMF-fixdate, made once a second.
    static DATE: std::cell::RefCell<(u64, Vec<u8>)> = const { std::cell::RefCell::new((u64::MAX, Vec::new())) };
}

/// Appends a `date` field with the current time.
fn put_date(out: &mut Vec<u8>) {
    let now = std::time::SystemTime::now();
    let secs = now.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with(|d| {
        let mut d = d.borrow_mut();
        if d.0 != secs {
            d.0 = secs;
            d.1 = httpdate::fmt_http_date(now).into_bytes();
        }
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(&d.1);
        out.extend_from_slice(b"\r\n");
    });
}

/// Watches the client socket while a request is in flight, for the client going away.
pub(crate) enum Watch {
    On,
    /// The client sent more (a pipelined request): it is still there, and its bytes wait for
    /// the next read.
    Off,
}

impl Watch {
    /// Ready when the client has closed its side or the socket failed. Reads nothing.
    fn poll_gone(&mut self, stream: &TcpStream, cx: &mut std::task::Context<'_>) -> Poll<()> {
        if matches!(self, Watch::Off) {
            return Poll::Pending;
        }
        let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
        let mut probe = tokio::io::ReadBuf::uninit(&mut probe);
        match stream.poll_peek(cx, &mut probe) {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => Poll::Ready(()),
            Poll::Ready(Ok(_)) => {
                *self = Watch::Off;
                Poll::Pending
            }
            Poll::Pending => Poll::Pending,
        }
    }
}
