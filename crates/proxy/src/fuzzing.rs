//! Doors onto the proxy's parsers of untrusted input, for the fuzz targets in `fuzz/` at the root
//! of the repository. Compiled only with the `fuzzing` feature, which no normal build, test or
//! CI run turns on; nothing here is a stable API.
//!
//! Each door calls the code the proxy runs, not a copy of it. Where a harness has to stand in
//! for part of the request path, its documentation says what it leaves out. The harnesses never
//! judge what they see: the targets hold the assertions.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::BytesMut;
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::body::ProxyBody;
use crate::error::ProxyError;
use crate::h1::{self, Conn, Framing};
use crate::h2::{H2Frames, H2_PREFACE};
use crate::handler;
use crate::headers::{self, BodyFraming, Forwarding};
use crate::table::RouteTable;
use crate::tunnel;

/// The request side: what the proxy checks and writes of a client's request head.
pub mod request {
    use super::*;

    /// How a request's body goes upstream ([`crate::headers::BodyFraming`]).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum UpstreamFraming {
        None,
        Length(u64),
        Chunked,
    }

    impl From<BodyFraming> for UpstreamFraming {
        fn from(f: BodyFraming) -> Self {
            match f {
                BodyFraming::None => UpstreamFraming::None,
                BodyFraming::Length(n) => UpstreamFraming::Length(n),
                BodyFraming::Chunked => UpstreamFraming::Chunked,
            }
        }
    }

    impl From<UpstreamFraming> for BodyFraming {
        fn from(f: UpstreamFraming) -> Self {
            match f {
                UpstreamFraming::None => BodyFraming::None,
                UpstreamFraming::Length(n) => BodyFraming::Length(n),
                UpstreamFraming::Chunked => BodyFraming::Chunked,
            }
        }
    }

    /// [`crate::headers::target_authority`].
    pub fn target_authority<'a>(
        uri: &'a http::Uri,
        headers: &'a HeaderMap,
        version: Version,
    ) -> Result<&'a str, &'static str> {
        headers::target_authority(uri, headers, version)
    }

    /// [`crate::headers::host_of`].
    pub fn host_of(authority: &str) -> &str {
        headers::host_of(authority)
    }

    /// The checks the handler makes before routing (CONNECT, transfer codings).
    pub fn refuse_unsupported(parts: &Parts) -> Result<(), ProxyError> {
        handler::refuse_unsupported(parts)
    }

    /// Whether the handler takes the request as an upgrade.
    pub fn wants_upgrade(parts: &Parts) -> bool {
        handler::wants_upgrade(parts)
    }

    /// The client address the harnesses forward for.
    pub const CLIENT_IP: &str = "192.0.2.7";

    /// [`crate::headers::encode_request`], for a client at [`CLIENT_IP`] over plain HTTP.
    pub fn encode_request(
        parts: &Parts,
        authority: &str,
        upgrade: Option<&HeaderValue>,
        framing: UpstreamFraming,
    ) -> Vec<u8> {
        let ip = HeaderValue::from_static(CLIENT_IP);
        let mut out = Vec::new();
        headers::encode_request(
            &mut out,
            parts,
            &Forwarding {
                client_ip: &ip,
                proto: "http",
                // As for a client on the internet: its forwarding claims are replaced.
                trusted: false,
                authority,
            },
            upgrade,
            framing.into(),
        );
        out
    }

    /// A request that reached the (in-memory) upstream.
    #[derive(Debug)]
    pub struct Forwarded {
        pub method: http::Method,
        pub version: Version,
        /// The authority it was routed by.
        pub authority: String,
        pub upgrade: Option<HeaderValue>,
        pub framing: UpstreamFraming,
        /// The request head as written upstream.
        pub head: Vec<u8>,
        /// The body as written upstream (chunk-encoded when `framing` is chunked).
        pub body: Vec<u8>,
        /// How streaming the body ended: an error is the client's body breaking off.
        pub body_result: Result<(), String>,
    }

    /// What became of one client connection.
    #[derive(Debug, Default)]
    pub struct Served {
        /// The connection opened with the HTTP/2 preface.
        pub http2: bool,
        pub forwarded: Vec<Forwarded>,
        /// Requests refused before anything went upstream, with the status they got.
        pub refused: Vec<(StatusCode, String)>,
        /// Every byte the client received.
        pub to_client: Vec<u8>,
        /// Whether the HTTP/2 frame follower saw a header block open at the end (HTTP/2 only).
        pub block_open_at_end: bool,
    }

    /// Serves one client connection whose bytes arrive in `reads` (each a separate read for the
    /// server), answered the way the proxy answers it up to the upstream socket:
    /// - the connection: HTTP/2 when it opens with the preface, else HTTP/1, through hyper's
    ///   server connection built with the proxy's settings (`conn::serve`), the HTTP/2 bytes
    ///   followed by the frame follower as `conn::Tracked` follows them;
    /// - each request: `refuse_unsupported`, the upgrade check, `target_authority`, routing on
    ///   `table`, the body's framing, the upstream head (`encode_request`) and the body streamed
    ///   by `Conn::write_body`, in `handler::proxy`'s order, with a refusal answered by the
    ///   handler's own failure response;
    /// - the upstream: an in-memory sink that takes the head and the body and answers `200 ok`.
    ///
    /// Left out: connecting, the upstream pool, retries, drains, the watchdog's timers, and the
    /// upstream's response (the response parser has its own door, [`super::response`]).
    pub fn serve_connection(table: Arc<RouteTable>, reads: &[&[u8]], max_header_bytes: usize) -> Served {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a current-thread runtime");
        let http2 = reads.concat().starts_with(H2_PREFACE);
        let log = Arc::new(Mutex::new(Served {
            http2,
            ..Served::default()
        }));
        let follower = Arc::new(Mutex::new(H2Frames::new()));
        rt.block_on(async {
            let (client, server) = tokio::io::duplex(64 * 1024);
            let io = hyper_util::rt::TokioIo::new(FollowedReads {
                inner: server,
                frames: http2.then(|| follower.clone()),
            });
            let svc_log = log.clone();
            let svc = hyper::service::service_fn(move |req| forward(table.clone(), svc_log.clone(), req));
            let server = async move {
                if http2 {
                    let mut b = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
                    b.timer(hyper_util::rt::TokioTimer::new())
                        .max_header_list_size(max_header_bytes as u32);
                    let _ = b.serve_connection(io, svc).await;
                } else {
                    let mut b = hyper::server::conn::http1::Builder::new();
                    b.header_read_timeout(None)
                        .max_header_size(max_header_bytes)
                        .writev(false)
                        .keep_alive(true);
                    let _ = b.serve_connection(io, svc).with_upgrades().await;
                }
            };
            let (mut from_server, mut to_server) = tokio::io::split(client);
            let send = async move {
                for piece in reads {
                    if to_server.write_all(piece).await.is_err() {
                        break;
                    }
                    // Let the server read this piece alone.
                    for _ in 0..4 {
                        tokio::task::yield_now().await;
                    }
                }
                let _ = to_server.shutdown().await;
            };
            let receive = async move {
                let mut got = Vec::new();
                let _ = from_server.read_to_end(&mut got).await;
                got
            };
            let (_, _, got) = tokio::join!(server, send, receive);
            log.lock().unwrap().to_client = got;
        });
        drop(rt);
        let mut served = std::mem::take(&mut *log.lock().unwrap());
        served.block_open_at_end = http2 && follower.lock().unwrap().open;
        served
    }

    /// The handler's path for one request against the in-memory upstream (see
    /// [`serve_connection`]).
    async fn forward(
        table: Arc<RouteTable>,
        log: Arc<Mutex<Served>>,
        req: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let http1 = req.version() < Version::HTTP_2;
        let (parts, mut body) = req.into_parts();
        let front = (|| {
            handler::refuse_unsupported(&parts)?;
            let upgrade = if parts.version == Version::HTTP_11 && handler::wants_upgrade(&parts) {
                parts.headers.get(http::header::UPGRADE).cloned()
            } else {
                None
            };
            let authority =
                headers::target_authority(&parts.uri, &parts.headers, parts.version).map_err(ProxyError::BadRequest)?;
            table
                .route(Some(headers::host_of(authority)))
                .ok_or(ProxyError::NoRoute)?;
            Ok::<_, ProxyError>((authority.to_string(), upgrade))
        })();
        let (authority, upgrade) = match front {
            Ok(f) => f,
            Err(e) => {
                let resp = handler::failure_response(&e, http1);
                log.lock().unwrap().refused.push((resp.status(), e.to_string()));
                return Ok(resp);
            }
        };
        let framing = handler::body_framing(&parts, &body);
        let head = request::encode_request(&parts, &authority, upgrade.as_ref(), framing.into());
        let mut sent = Vec::new();
        let body_result = if framing.has_body() {
            Conn::write_body(
                &mut sent,
                &mut body,
                framing == BodyFraming::Chunked,
                Duration::from_secs(60),
            )
            .await
            .map_err(|e| format!("{e:?}"))
        } else {
            Ok(())
        };
        log.lock().unwrap().forwarded.push(Forwarded {
            method: parts.method.clone(),
            version: parts.version,
            authority,
            upgrade,
            framing: framing.into(),
            head,
            body: sent,
            body_result,
        });
        Ok(Response::new(ProxyBody::full("ok\n")))
    }

    /// The server end of the in-memory client connection; HTTP/2 bytes are followed as they are
    /// read, as `conn::Tracked` follows them.
    struct FollowedReads {
        inner: tokio::io::DuplexStream,
        frames: Option<Arc<Mutex<H2Frames>>>,
    }

    impl AsyncRead for FollowedReads {
        fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            let before = buf.filled().len();
            let r = Pin::new(&mut this.inner).poll_read(cx, buf);
            if let (Poll::Ready(Ok(())), Some(frames)) = (&r, &this.frames) {
                frames.lock().unwrap().feed(&buf.filled()[before..]);
            }
            r
        }
    }

    impl AsyncWrite for FollowedReads {
        fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
        }
        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().inner).poll_flush(cx)
        }
        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
        }
    }
}

/// The upstream side: the response parser of `h1.rs`.
pub mod response {
    use super::*;

    /// How a response body is delimited ([`crate::h1::Framing`]).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum ResponseFraming {
        Empty,
        Length(u64),
        Chunked,
        Close,
    }

    /// A response read off an upstream's bytes.
    #[derive(Debug)]
    pub struct UpstreamResponse {
        pub status: StatusCode,
        /// The headers the client would get.
        pub headers: HeaderMap,
        pub framing: ResponseFraming,
        pub keep_alive: bool,
        /// The body bytes as the client would get them (chunking removed).
        pub body: Vec<u8>,
        /// How many pieces the body came in.
        pub body_pieces: usize,
        /// How the body ended: its end, or the error that cut it.
        pub body_result: Result<(), String>,
        /// Bytes after the end of the body, kept for the connection's next response.
        pub leftover: Vec<u8>,
    }

    /// Most pieces of body in a row without a byte in them before the reader is taken to spin.
    pub const MAX_EMPTY_PIECES: usize = 64;

    /// Reads one response from an upstream whose bytes arrive in `reads`, as the proxy does:
    /// the head with `read_head_from`, then the body piece by piece with the buffer logic of
    /// `Conn::poll_body` (`next_body_piece`, `body_at_eof`), reading the next piece only when
    /// the buffered bytes give nothing. The end of `reads` is the upstream closing.
    ///
    /// Panics if the head reader waits for anything but bytes (it would hang on a real socket),
    /// or if the body reader returns [`MAX_EMPTY_PIECES`] empty pieces in a row (it would spin).
    pub fn read_response(reads: &[&[u8]], head_request: bool) -> Result<UpstreamResponse, String> {
        let mut io = Pieces {
            reads,
            at: 0,
            offset: 0,
        };
        let mut buf = BytesMut::new();
        let head = {
            let read = h1::read_head_from(&mut io, &mut buf, head_request);
            let read = std::pin::pin!(read);
            match read.poll(&mut Context::from_waker(Waker::noop())) {
                Poll::Ready(r) => r.map_err(|e| e.to_string())?,
                Poll::Pending => panic!("the head reader waits although every read is ready"),
            }
        };
        let framing_seen = match head.framing {
            Framing::Empty => ResponseFraming::Empty,
            Framing::Length(n) => ResponseFraming::Length(n),
            Framing::Chunked(_) => ResponseFraming::Chunked,
            Framing::Close => ResponseFraming::Close,
        };
        let mut framing = head.framing;
        let mut body = Vec::new();
        let mut body_pieces = 0;
        let mut empty_in_a_row = 0;
        let body_result = loop {
            match h1::next_body_piece(&mut buf, &mut framing) {
                Some(Some(Ok(piece))) => {
                    body_pieces += 1;
                    if piece.is_empty() {
                        empty_in_a_row += 1;
                        assert!(
                            empty_in_a_row < MAX_EMPTY_PIECES,
                            "the body reader spins on empty pieces"
                        );
                    } else {
                        empty_in_a_row = 0;
                    }
                    body.extend_from_slice(&piece);
                }
                Some(Some(Err(e))) => break Err(e.to_string()),
                Some(None) => break Ok(()),
                None => match io.next_read() {
                    Some(bytes) => buf.extend_from_slice(bytes),
                    None => match h1::body_at_eof(&mut framing) {
                        None => break Ok(()),
                        Some(Err(e)) => break Err(e.to_string()),
                        Some(Ok(_)) => unreachable!("body_at_eof gives no bytes"),
                    },
                },
            }
        };
        let mut leftover = buf.to_vec();
        while let Some(bytes) = io.next_read() {
            leftover.extend_from_slice(bytes);
        }
        Ok(UpstreamResponse {
            status: head.status,
            headers: head.headers,
            framing: framing_seen,
            keep_alive: head.keep_alive,
            body,
            body_pieces,
            body_result,
            leftover,
        })
    }

    /// An upstream whose reads return `reads` one after the other (a read into a smaller buffer
    /// takes what fits and leaves the rest for the next), then the end of the stream.
    struct Pieces<'a> {
        reads: &'a [&'a [u8]],
        at: usize,
        offset: usize,
    }

    impl<'a> Pieces<'a> {
        /// The rest of the current read.
        fn next_read(&mut self) -> Option<&'a [u8]> {
            let read = self.reads.get(self.at)?;
            let rest = &read[self.offset..];
            self.at += 1;
            self.offset = 0;
            Some(rest)
        }
    }

    impl AsyncRead for Pieces<'_> {
        fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            // An empty read in the middle would look like the end of the stream: skip it.
            while this.reads.get(this.at).is_some_and(|r| this.offset == r.len()) {
                this.at += 1;
                this.offset = 0;
            }
            if let Some(read) = this.reads.get(this.at) {
                let n = (read.len() - this.offset).min(out.remaining());
                out.put_slice(&read[this.offset..this.offset + n]);
                this.offset += n;
            }
            Poll::Ready(Ok(()))
        }
    }
}

/// The HTTP/2 frame follower of `h2.rs`.
pub mod h2 {
    use super::*;

    /// The HTTP/2 connection preface.
    pub const PREFACE: &[u8] = H2_PREFACE;

    /// Where the follower stands, apart from how many blocks it counted.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Position {
        pub preface_left: u8,
        pub frame_header_bytes: u8,
        pub payload_left: u32,
        pub in_block: bool,
        pub open: bool,
    }

    /// [`crate::h2::H2Frames`].
    pub struct Follower(H2Frames);

    impl Default for Follower {
        fn default() -> Self {
            Follower(H2Frames::new())
        }
    }

    impl Follower {
        pub fn feed(&mut self, bytes: &[u8]) {
            self.0.feed(bytes)
        }
        /// A header block or a frame header is open after the bytes fed so far.
        pub fn open(&self) -> bool {
            self.0.open
        }
        /// How many times one has opened.
        pub fn opened(&self) -> u32 {
            self.0.opened
        }
        pub fn position(&self) -> Position {
            let (preface_left, frame_header_bytes, payload_left, in_block, open) = self.0.position();
            Position {
                preface_left,
                frame_header_bytes,
                payload_left,
                in_block,
                open,
            }
        }
    }
}

/// The WebSocket frame follower of `tunnel.rs`.
pub mod websocket {
    use super::*;

    /// [`crate::tunnel::Frames`].
    #[derive(Default)]
    pub struct Follower(tunnel::Frames);

    impl Follower {
        pub fn at_edge(&self) -> bool {
            self.0.at_edge()
        }
        pub fn advance(&mut self, bytes: &[u8]) {
            self.0.advance(bytes)
        }
        pub fn finish(&mut self, bytes: &[u8]) -> Option<usize> {
            self.0.finish(bytes)
        }
        pub fn step(&mut self, bytes: &[u8]) -> usize {
            self.0.step(bytes)
        }
        pub fn close_sent(&self) -> bool {
            self.0.close_sent
        }
    }
}
