//! The upstream side of the proxy: a small HTTP/1.1 client driven inline by the request.
//!
//! The request's own task writes the request head, streams the body, reads the response head
//! and later (through the response body) the response body, all on one socket it owns for the
//! duration. There is no connection task and no channel between the request and its upstream
//! connection; when the response has been read to its end the connection goes back to the
//! worker's pool. Header names and values of the response are slices of the read buffer.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{StatusCode, Version};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::upstream_io::UpstreamIo;

/// Largest response head accepted from an upstream.
const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 100;
const READ_CHUNK: usize = 16 * 1024;

/// An open connection to an upstream instance.
pub(crate) struct Conn {
    pub(crate) io: UpstreamIo,
    /// Bytes read but not yet consumed.
    pub(crate) buf: BytesMut,
    /// Whether the connection has carried a request before (a failure on it may be a stale
    /// keep-alive connection rather than a dead instance).
    pub(crate) reused: bool,
    /// The id of the `UpstreamTls` settings it was made with, 0 for plain TCP: the pool hands it
    /// only to requests of a service with the same settings.
    pub(crate) tls_id: u64,
}

/// How the body of a response is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    Empty,
    Length(u64),
    Chunked(Chunk),
    /// Until the upstream closes the connection; the connection cannot be reused.
    Close,
}

/// Where a chunked decoder stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk with this many bytes left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: expecting trailer lines up to an empty line.
    Trailers,
}

/// A parsed response head.
pub(crate) struct Head {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) framing: Framing,
    /// The upstream allows another request on this connection after this response.
    pub(crate) keep_alive: bool,
}

/// Why reading a response head failed.
#[derive(Debug)]
pub(crate) enum HeadError {
    /// The connection ended before any byte of a response: the request may not have been seen.
    ClosedBeforeResponse(io::Error),
    /// The connection failed part way through the head.
    Io(io::Error),
    /// The bytes are not an HTTP/1 response (or one we refuse).
    Invalid(&'static str),
}

impl std::fmt::Display for HeadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeadError::ClosedBeforeResponse(e) => write!(f, "connection closed before the response ({e})"),
            HeadError::Io(e) => write!(f, "reading the response head: {e}"),
            HeadError::Invalid(what) => write!(f, "invalid response: {what}"),
        }
    }
}

impl Conn {
    pub(crate) fn new(io: UpstreamIo, tls_id: u64) -> Conn {
        Conn {
            io,
            buf: BytesMut::with_capacity(READ_CHUNK),
            reused: false,
            tls_id,
        }
    }

    /// True when an idle pooled connection is still usable: nothing arrived on it since the last
    /// response (an idle connection that turns readable was closed by the upstream, or sent
    /// bytes nobody asked for). Normally costs no system call: the readiness the event loop
    /// already knows is consulted first.
    pub(crate) fn idle_ok(&mut self) -> bool {
        self.buf.is_empty() && self.io.idle_ok()
    }

    /// Streams a client's request body to the upstream, chunk-encoded when its length is unknown.
    /// An upstream that takes none of a write for `stall` (it stopped reading and answers
    /// nothing) fails the request; a client that sends slowly is not timed here.
    pub(crate) async fn write_body<W, B>(
        out: &mut W,
        body: &mut B,
        chunked: bool,
        stall: Duration,
    ) -> Result<(), BodyWriteError>
    where
        W: AsyncWrite + Unpin,
        B: http_body::Body<Data = Bytes, Error = hyper::Error> + Unpin,
    {
        use http_body_util::BodyExt;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(BodyWriteError::Client)?;
            let Ok(data) = frame.into_data() else { continue }; // trailers are not forwarded
            if data.is_empty() {
                continue;
            }
            if chunked {
                let mut line = Vec::with_capacity(20);
                write_hex(&mut line, data.len() as u64);
                line.extend_from_slice(b"\r\n");
                write_within(out, &line, stall).await?;
                write_within(out, &data, stall).await?;
                write_within(out, b"\r\n", stall).await?;
            } else {
                write_within(out, &data, stall).await?;
            }
            // Each piece reaches the upstream as it came from the client, not when the next one
            // does (TLS may hold written bytes back until a flush).
            flush_within(out, stall).await?;
        }
        if chunked {
            write_within(out, b"0\r\n\r\n", stall).await?;
            flush_within(out, stall).await?;
        }
        Ok(())
    }

    /// Takes the next piece of body from the buffer (reading more from the socket when needed).
    /// `Ready(None)` is the end of the body.
    pub(crate) fn poll_body(&mut self, framing: &mut Framing, cx: &mut Context<'_>) -> Poll<Option<io::Result<Bytes>>> {
        loop {
            if let Some(step) = next_body_piece(&mut self.buf, framing) {
                return Poll::Ready(step);
            }
            // Need more bytes.
            self.buf.reserve(READ_CHUNK);
            match tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Ok(0)) => return Poll::Ready(body_at_eof(framing)),
                Poll::Ready(Ok(_)) => {}
            }
        }
    }
}

/// What the buffered bytes give of a response body framed by `framing`: a piece of it
/// (`Some(Some(Ok(_)))`), its end (`Some(None)`), a framing error, or, as `None`, nothing until
/// more bytes are read. Advances `framing` past what it returns.
pub(crate) fn next_body_piece(buf: &mut BytesMut, framing: &mut Framing) -> Option<Option<io::Result<Bytes>>> {
    match framing {
        Framing::Empty => Some(None),
        Framing::Length(0) => {
            *framing = Framing::Empty;
            Some(None)
        }
        Framing::Length(left) => {
            if buf.is_empty() {
                return None;
            }
            let n = (*left).min(buf.len() as u64) as usize;
            *left -= n as u64;
            Some(Some(Ok(buf.split_to(n).freeze())))
        }
        Framing::Close => {
            if buf.is_empty() {
                return None;
            }
            Some(Some(Ok(buf.split().freeze())))
        }
        Framing::Chunked(state) => match decode_chunk(buf, state) {
            Ok(ChunkStep::Data(b)) => Some(Some(Ok(b))),
            Ok(ChunkStep::Done) => {
                *framing = Framing::Empty;
                Some(None)
            }
            Ok(ChunkStep::NeedMore) => None,
            Err(e) => Some(Some(Err(e))),
        },
    }
}

/// What the end of the upstream's bytes means for a body framed by `framing`, once the buffer
/// gave all it could: the end of a body delimited by the close, otherwise an error.
pub(crate) fn body_at_eof(framing: &mut Framing) -> Option<io::Result<Bytes>> {
    if *framing == Framing::Close {
        *framing = Framing::Empty;
        return None;
    }
    Some(Err(io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "upstream closed the connection in the middle of the body",
    )))
}

/// Reads until a complete response head is buffered in `buf` and parses it. Informational
/// responses other than 101 are skipped.
pub(crate) async fn read_head_from<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    head_request: bool,
) -> Result<Head, HeadError> {
    let mut any_byte = !buf.is_empty();
    loop {
        if !buf.is_empty() {
            if let Some(head) = parse_head(buf, head_request)? {
                if head.status.is_informational() && head.status != StatusCode::SWITCHING_PROTOCOLS {
                    continue;
                }
                return Ok(head);
            }
            if buf.len() > MAX_HEAD {
                return Err(HeadError::Invalid("response head too large"));
            }
        }
        buf.reserve(READ_CHUNK);
        match io.read_buf(buf).await {
            Ok(0) if !any_byte => return Err(HeadError::ClosedBeforeResponse(io::ErrorKind::UnexpectedEof.into())),
            Ok(0) => return Err(HeadError::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(_) => any_byte = true,
            Err(e) if !any_byte => return Err(HeadError::ClosedBeforeResponse(e)),
            Err(e) => return Err(HeadError::Io(e)),
        }
    }
}

#[derive(Debug)]
pub(crate) enum BodyWriteError {
    /// The client's body failed (disconnect, bad chunking, length mismatch).
    Client(hyper::Error),
    Upstream(io::Error),
    /// The upstream took none of a write for the upstream timeout.
    UpstreamStalled,
}

/// Writes all of `bytes` unless the upstream makes no room for them for `stall`. The timer is
/// armed only when the write has to wait.
async fn write_within<W: AsyncWrite + Unpin>(out: &mut W, bytes: &[u8], stall: Duration) -> Result<(), BodyWriteError> {
    match tokio::time::timeout(stall, out.write_all(bytes)).await {
        Ok(r) => r.map_err(BodyWriteError::Upstream),
        Err(_) => Err(BodyWriteError::UpstreamStalled),
    }
}

/// Flushes what `write_within` left buffered (TLS), under the same stall rule. Plain TCP buffers
/// nothing: then it returns at once.
async fn flush_within<W: AsyncWrite + Unpin>(out: &mut W, stall: Duration) -> Result<(), BodyWriteError> {
    match tokio::time::timeout(stall, out.flush()).await {
        Ok(r) => r.map_err(BodyWriteError::Upstream),
        Err(_) => Err(BodyWriteError::UpstreamStalled),
    }
}

enum ChunkStep {
    Data(Bytes),
    Done,
    NeedMore,
}

fn invalid(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Advances a chunked decoder over the buffered bytes.
fn decode_chunk(buf: &mut BytesMut, state: &mut Chunk) -> io::Result<ChunkStep> {
    loop {
        match state {
            Chunk::Size => {
                let Some(eol) = find_crlf(buf) else {
                    if buf.len() > 4096 {
                        return Err(invalid("chunk size line too long"));
                    }
                    return Ok(ChunkStep::NeedMore);
                };
                let line = &buf[..eol];
                let digits = line.split(|&b| b == b';').next().unwrap_or(b"");
                let digits = trim_ows(digits);
                if digits.is_empty() || digits.len() > 16 {
                    return Err(invalid("bad chunk size"));
                }
                let mut size: u64 = 0;
                for &d in digits {
                    let v = match d {
                        b'0'..=b'9' => d - b'0',
                        b'a'..=b'f' => d - b'a' + 10,
                        b'A'..=b'F' => d - b'A' + 10,
                        _ => return Err(invalid("bad chunk size")),
                    };
                    size = size * 16 + v as u64;
                }
                buf.advance(eol + 2);
                *state = if size == 0 { Chunk::Trailers } else { Chunk::Data(size) };
            }
            Chunk::Data(left) => {
                if buf.is_empty() {
                    return Ok(ChunkStep::NeedMore);
                }
                let n = (*left).min(buf.len() as u64) as usize;
                *left -= n as u64;
                if *left == 0 {
                    *state = Chunk::DataEnd;
                }
                return Ok(ChunkStep::Data(buf.split_to(n).freeze()));
            }
            Chunk::DataEnd => {
                if buf.len() < 2 {
                    return Ok(ChunkStep::NeedMore);
                }
                if &buf[..2] != b"\r\n" {
                    return Err(invalid("missing CRLF after chunk"));
                }
                buf.advance(2);
                *state = Chunk::Size;
            }
            Chunk::Trailers => {
                let Some(eol) = find_crlf(buf) else {
                    if buf.len() > MAX_HEAD {
                        return Err(invalid("trailers too large"));
                    }
                    return Ok(ChunkStep::NeedMore);
                };
                buf.advance(eol + 2);
                if eol == 0 {
                    return Ok(ChunkStep::Done);
                }
            }
        }
    }
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

pub(crate) fn write_hex(out: &mut Vec<u8>, mut n: u64) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = HEX[(n & 15) as usize];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| trim_ows(t).eq_ignore_ascii_case(token.as_bytes()))
}

/// Parses a complete response head off the front of `buf`, or returns `None` if more bytes are
/// needed. Hop-by-hop headers are dropped here (their meaning is used for framing and reuse),
/// except on a 101 response, whose `Connection`/`Upgrade` are the handshake.
fn parse_head(buf: &mut BytesMut, head_request: bool) -> Result<Option<Head>, HeadError> {
    // Uninitialised slots: zeroing a hundred headers for every response costs more than parsing.
    let mut slots = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut resp, buf, &mut slots) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::Invalid("too many headers")),
        Err(_) => return Err(HeadError::Invalid("malformed response head")),
    };
    let code = resp.code.unwrap_or(0);
    let status = StatusCode::from_u16(code).map_err(|_| HeadError::Invalid("bad status code"))?;
    let version = if resp.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let switching = status == StatusCode::SWITCHING_PROTOCOLS;
    let base = buf.as_ptr() as usize;

    // Offsets first (the slices borrow `buf`), then split the head off as shared bytes.
    let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
    let count = resp.headers.len();
    for (i, h) in resp.headers.iter().enumerate() {
        // A head is at most MAX_HEAD bytes, so offsets fit in u32.
        let n = (h.name.as_ptr() as usize - base) as u32;
        let v = (h.value.as_ptr() as usize - base) as u32;
        spans[i] = (n, h.name.len() as u32, v, h.value.len() as u32);
    }
    let head = buf.split_to(len).freeze();

    let mut headers = HeaderMap::with_capacity(count);
    let mut keep_alive = version == Version::HTTP_11;
    let mut chunked = false;
    let mut other_coding = false;
    let mut length: Option<u64> = None;
    // Where the first Content-Length value lies in `head`: the client gets it, once.
    let mut length_at = 0..0;
    let mut named_in_connection: Vec<HeaderName> = Vec::new();
    for &(n, nl, v, vl) in &spans[..count] {
        let (n, nl, v, vl) = (n as usize, nl as usize, v as usize, vl as usize);
        let name = HeaderName::from_bytes(&head[n..n + nl]).map_err(|_| HeadError::Invalid("bad header name"))?;
        let raw = &head[v..v + vl];
        if name == header::CONNECTION {
            if has_token(raw, "close") {
                keep_alive = false;
            } else if has_token(raw, "keep-alive") {
                keep_alive = true;
            }
            for t in raw.split(|&b| b == b',') {
                let t = trim_ows(t);
                if !t.is_empty()
                    && !t.eq_ignore_ascii_case(b"close")
                    && !t.eq_ignore_ascii_case(b"keep-alive")
                    && !t.eq_ignore_ascii_case(b"upgrade")
                {
                    if let Ok(extra) = HeaderName::from_bytes(t) {
                        named_in_connection.push(extra);
                    }
                }
            }
            if !switching {
                continue;
            }
        } else if name == header::TRANSFER_ENCODING {
            // The last coding decides: chunked means chunked framing.
            let last = raw.split(|&b| b == b',').next_back().map(trim_ows).unwrap_or(b"");
            if last.eq_ignore_ascii_case(b"chunked") {
                chunked = true;
                other_coding = false;
            } else {
                other_coding = true;
            }
            continue;
        } else if name == header::CONTENT_LENGTH {
            // Digits only (RFC 9110, 8.6): no sign, no list; 19 digits cannot overflow. Repeated
            // equal values stand for one, and the client gets the first, written below.
            let digits = trim_ows(raw);
            let parsed = (!digits.is_empty() && digits.len() <= 19 && digits.iter().all(u8::is_ascii_digit))
                .then(|| digits.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')));
            match (parsed, length) {
                (None, _) => return Err(HeadError::Invalid("bad content-length")),
                (Some(a), Some(b)) if a != b => return Err(HeadError::Invalid("conflicting content-length")),
                (Some(_), Some(_)) => {}
                (Some(a), None) => {
                    length = Some(a);
                    let at = v + (digits.as_ptr() as usize - raw.as_ptr() as usize);
                    length_at = at..at + digits.len();
                }
            }
            continue;
        } else if (name == header::UPGRADE && !switching)
            || name == header::TE
            || name == header::TRAILER
            || name.as_str() == "keep-alive"
            || name.as_str() == "proxy-connection"
        {
            continue;
        }
        let value = HeaderValue::from_maybe_shared(head.slice(v..v + vl))
            .map_err(|_| HeadError::Invalid("bad header value"))?;
        headers.append(name, value);
    }
    for extra in named_in_connection {
        if !switching {
            headers.remove(extra);
        }
    }

    let no_body = head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let framing = if no_body {
        Framing::Empty
    } else if chunked {
        // A message with both is framed by chunking; the length must not be passed on.
        headers.remove(header::CONTENT_LENGTH);
        Framing::Chunked(Chunk::Size)
    } else if other_coding {
        headers.remove(header::CONTENT_LENGTH);
        keep_alive = false;
        Framing::Close
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        keep_alive = false;
        Framing::Close
    };
    if length.is_some() && !chunked && !other_coding {
        // A slice of the head, like every other value: no allocation.
        let value = HeaderValue::from_maybe_shared(head.slice(length_at))
            .map_err(|_| HeadError::Invalid("bad content-length"))?;
        headers.insert(header::CONTENT_LENGTH, value);
    }
    Ok(Some(Head {
        status,
        headers,
        framing,
        keep_alive,
    }))
}

/// The upstream end of a tunnel after a 101 response: whatever the upstream sent right after
/// its head (already in the read buffer) is read first, then the socket.
pub(crate) struct Prefixed {
    pub(crate) prefix: Bytes,
    pub(crate) io: UpstreamIo,
}

impl AsyncRead for Prefixed {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut tokio::io::ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(out.remaining());
            out.put_slice(&this.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, out)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Head {
        let mut b = BytesMut::from(raw.as_bytes());
        parse_head(&mut b, false).unwrap().unwrap()
    }

    #[test]
    fn parses_length_framed_response_and_strips_hop_by_hop() {
        let h = parse("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive, x-hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nX-App: a\r\n\r\n");
        assert_eq!(h.status, 200);
        assert_eq!(h.framing, Framing::Length(5));
        assert!(h.keep_alive);
        assert_eq!(h.headers["x-app"], "a");
        for gone in ["connection", "x-hop", "keep-alive"] {
            assert!(!h.headers.contains_key(gone), "{gone}");
        }
    }

    #[test]
    fn framing_rules() {
        assert!(matches!(
            parse("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n").framing,
            Framing::Chunked(_)
        ));
        let h = parse("HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!((h.framing, h.keep_alive), (Framing::Close, false));
        let h = parse("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n");
        assert!(!h.keep_alive);
        let h = parse("HTTP/1.1 204 No Content\r\n\r\n");
        assert_eq!(h.framing, Framing::Empty);
        let h = parse("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
        assert!(!h.keep_alive);
        let mut b = BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"[..]);
        assert!(parse_head(&mut b, false).is_err());
        for bad in ["+5", "5, 5", "0x5", ""] {
            let raw = format!("HTTP/1.1 200 OK\r\nContent-Length: {bad}\r\n\r\n");
            assert!(
                parse_head(&mut BytesMut::from(raw.as_bytes()), false).is_err(),
                "{bad:?}"
            );
        }
        let h = parse("HTTP/1.1 200 OK\r\nContent-Length: 5\r\ncontent-length: 5\r\n\r\n");
        assert_eq!(h.framing, Framing::Length(5));
        assert_eq!(h.headers.get_all("content-length").iter().collect::<Vec<_>>(), ["5"]);
        let mut b = BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-Le"[..]);
        assert!(parse_head(&mut b, false).unwrap().is_none());
    }

    #[test]
    fn decodes_chunks_split_anywhere() {
        let raw = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: x\r\n\r\nNEXT";
        for split in 0..raw.len() {
            let mut buf = BytesMut::new();
            let mut state = Chunk::Size;
            let mut out = Vec::new();
            let mut fed = 0;
            let mut done = false;
            for stage in [split, raw.len()] {
                buf.extend_from_slice(&raw[fed..stage]);
                fed = stage;
                loop {
                    match decode_chunk(&mut buf, &mut state).unwrap() {
                        ChunkStep::Data(b) => out.extend_from_slice(&b),
                        ChunkStep::Done => {
                            done = true;
                            break;
                        }
                        ChunkStep::NeedMore => break,
                    }
                }
                if done {
                    break;
                }
            }
            assert!(done, "split at {split}");
            buf.extend_from_slice(&raw[fed..]); // bytes after the body stay for the next response
            assert_eq!(out, b"hello world");
            assert_eq!(&buf[..], b"NEXT");
        }
    }

    #[test]
    fn rejects_bad_chunks() {
        let mut state = Chunk::Size;
        assert!(decode_chunk(&mut BytesMut::from(&b"zz\r\n"[..]), &mut state).is_err());
        // A chunk's data not followed by CRLF: the data comes out, then the same buffer and
        // state refuse what follows it.
        let mut state = Chunk::Size;
        let mut buf = BytesMut::from(&b"2\r\nabXX"[..]);
        assert!(matches!(decode_chunk(&mut buf, &mut state), Ok(ChunkStep::Data(d)) if &d[..] == b"ab"));
        let err = decode_chunk(&mut buf, &mut state)
            .err()
            .expect("XX where CRLF belongs is refused");
        assert_eq!(err.to_string(), "missing CRLF after chunk");
    }

    #[test]
    fn hex_lengths() {
        for (n, s) in [(0u64, "0"), (10, "a"), (255, "ff"), (4096, "1000")] {
            let mut v = Vec::new();
            write_hex(&mut v, n);
            assert_eq!(v, s.as_bytes());
        }
    }
}

/// Request bodies to a TLS upstream whose socket is full when the body ends: tokio-rustls takes a
/// write into its buffer and answers it as done when the socket has no room, so a body piece can
/// sit in the proxy until something flushes it. A sender with a small send buffer and a reader
/// slower than it keep the socket full to the end.
#[cfg(test)]
mod tls_body_tests {
    use std::collections::VecDeque;
    use std::net::SocketAddr;

    use http_body::Frame;
    use tokio::net::{TcpListener, TcpSocket};

    use super::*;

    /// A request body of the given pieces, each ready at once.
    struct Pieces(VecDeque<Bytes>);

    impl http_body::Body for Pieces {
        type Data = Bytes;
        type Error = hyper::Error;
        fn poll_frame(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
            Poll::Ready(self.get_mut().0.pop_front().map(|b| Ok(Frame::data(b))))
        }
    }

    /// A TLS server for `upstream.test` that reads at most 4 KiB per millisecond and sends back
    /// the count of bytes it read as it grows; its receive buffer is fixed (64 KiB, doubled by
    /// the kernel) so that the slow reading reaches the sender.
    async fn slow_tls_reader() -> (SocketAddr, String, tokio::sync::watch::Receiver<usize>) {
        let (config, ca) = crate::upstream_tls::self_signed_server("upstream.test");
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(64 * 1024).unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener: TcpListener = socket.listen(1).unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::watch::channel(0usize);
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = tokio_rustls::TlsAcceptor::from(config).accept(tcp).await.unwrap();
            let mut chunk = [0u8; 4096];
            let mut total = 0;
            loop {
                match tls.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => total += n,
                }
                tx.send_replace(total);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        (addr, ca, rx)
    }

    async fn body_reaches_a_slow_tls_reader(chunked: bool) {
        let (addr, ca, mut received) = slow_tls_reader().await;
        let tls = crate::upstream_tls::UpstreamTls::new(ca.as_bytes(), "test CA", Some("upstream.test")).unwrap();
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_send_buffer_size(4096).unwrap();
        let tcp = socket.connect(addr).await.unwrap();
        let mut stream = tls.handshake(tcp, addr).await.unwrap();
        // rustls takes up to 64 KiB beyond what the socket holds; whether the last piece ends
        // inside that window depends on when the reader's window opens. With room for the whole
        // body, every piece is taken at once and the socket is surely full when the body ends.
        stream.get_mut().1.set_buffer_limit(Some(1 << 20));
        let mut io = UpstreamIo::Tls(Box::new(stream));
        let pieces: VecDeque<Bytes> = (0..16u8).map(|i| Bytes::from(vec![i; 40_000])).collect();
        let expected: usize = if chunked {
            pieces
                .iter()
                .map(|p| format!("{:x}\r\n", p.len()).len() + p.len() + 2)
                .sum::<usize>()
                + 5
        } else {
            pieces.iter().map(Bytes::len).sum()
        };
        let (_rd, mut wr) = io.split();
        Conn::write_body(&mut wr, &mut Pieces(pieces), chunked, Duration::from_secs(10))
            .await
            .unwrap();
        // Nothing more is written: what the body left in the proxy's TLS buffer stays there.
        let whole = tokio::time::timeout(Duration::from_secs(5), received.wait_for(|n| *n == expected))
            .await
            .is_ok();
        assert!(
            whole,
            "the reader got {} of {expected} bytes (chunked: {chunked})",
            *received.borrow()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_body_with_a_length_reaches_a_slow_tls_upstream_whole() {
        body_reaches_a_slow_tls_reader(false).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_chunked_body_reaches_a_slow_tls_upstream_whole() {
        body_reaches_a_slow_tls_reader(true).await;
    }
}
