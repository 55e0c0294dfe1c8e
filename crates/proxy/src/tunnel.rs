//! An upgraded connection: bytes copied both ways, and a clean close when the proxy ends it.
//!
//! A tunnel copies what each side sends to the other; a FIN from one side is passed on to the
//! other, and the tunnel ends when both directions have ended. A read or write error on either
//! side (a reset) ends the whole tunnel at once.
//!
//! The proxy ends a tunnel itself at an instant of a close window (after a drain deadline, or
//! at shutdown), and the closing is over [`CLOSE_GRACE`] later. A WebSocket then gets a proper
//! closing handshake on both of its legs rather than a bare FIN, which either end would report
//! as an abnormal closure (code 1006). Only frame headers are read on the way; payloads (masked,
//! compressed or not) pass untouched.
//!
//! - Toward the upstream the proxy stands in for the client. The frame the client is in is
//!   finished, then a masked Close with status 1001 ("going away") follows, and nothing more:
//!   what the client still sends is read and dropped. RFC 6455 (section 7.1.1) asks a client to
//!   let the server close the TCP connection first, so the proxy sends no FIN until the upstream
//!   has closed its side (normally right after its own Close, the answer) or the grace is over.
//!   A FIN right behind the Close can make the application fail to answer and report an
//!   abnormal closure (aiohttp does: the end of the stream closes its socket for writing too).
//! - Toward the client the proxy stands in for the server. Whole frames from the upstream, the
//!   messages it had under way before its answer, still go to the client. The upstream's Close
//!   is not passed on: the client gets the proxy's Close 1001 in its place, whatever status the
//!   application answered with (aiohttp answers 1000, "normal closure", which a client library
//!   may take as a reason not to reconnect; a 1001 sends it back, to the live colour), and then
//!   the FIN. An upstream that has not answered by the middle of the grace stops being waited
//!   for: the frame then under way is finished and the client gets the Close 1001 all the same.
//!
//! A side that was already sent a Close (its closing handshake is under way) gets no second one.
//! A frame that does not end within the grace, or an upgrade to another protocol, gets the FIN
//! alone (at the close instant for another protocol). Either way the tunnel then reads and drops
//! what the two sides still send until they close or the grace runs out, so that its sockets are
//! not closed with data unread (which the kernel answers with a reset that can overtake the
//! Close frame).

use std::future::Future;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{timeout_at, Instant};
use tokio_util::sync::CancellationToken;

/// How long a tunnel being closed waits for a frame in flight to end, and then for the two
/// sides to answer its Close frames and close. The first half of it is what the client-ward
/// direction waits for the upstream's answer (see [`Closing::answer_by`]).
pub(crate) const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The buffer of each direction (the size tokio's `copy_bidirectional` uses).
const BUF: usize = 8 * 1024;

/// The opcode of a Close frame.
const OPCODE_CLOSE: u8 = 0x8;

/// Status 1001, "going away": the server end is leaving.
const GOING_AWAY: [u8; 2] = 1001u16.to_be_bytes();

/// Which side a direction writes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Toward {
    Client,
    Upstream,
}

/// Copies `client` and `upstream` into each other until both directions end, or until `close`
/// completes; then closes both as described in the module documentation. `close` gives the
/// instant by which the closing must be over (normally [`CLOSE_GRACE`] from its own end).
/// `websocket` says whether the upgrade was to the WebSocket protocol. A read or write error on
/// either side ends the whole tunnel at once.
pub(crate) async fn run<C, U>(client: C, upstream: U, websocket: bool, close: impl Future<Output = Instant>)
where
    C: AsyncRead + AsyncWrite,
    U: AsyncRead + AsyncWrite,
{
    let (client_r, client_w) = tokio::io::split(client);
    let (upstream_r, upstream_w) = tokio::io::split(upstream);
    let closing = Closing::default();
    let broken = CancellationToken::new();
    let copy = async {
        tokio::join!(
            pump(upstream_r, client_w, Toward::Client, websocket, &closing, &broken),
            pump(client_r, upstream_w, Toward::Upstream, websocket, &closing, &broken),
        )
    };
    tokio::pin!(copy);
    tokio::select! {
        biased;
        _ = &mut copy => return,
        _ = broken.cancelled() => return,
        end = close => closing.begin(end),
    }
    tokio::select! {
        biased;
        _ = &mut copy => {}
        _ = broken.cancelled() => {}
    }
}

/// The proxy's decision to close a tunnel, shared by its two directions, and what the
/// upstream-ward direction waits for before its FIN.
#[derive(Default)]
struct Closing {
    token: CancellationToken,
    /// Until when the client-ward direction waits for the upstream's Close, and when the
    /// closing must be over.
    instants: std::sync::OnceLock<(Instant, Instant)>,
    /// Cancelled once the client-ward direction is done reading the upstream: it has closed its
    /// side, failed, or the grace is over. Until then the upstream-ward direction, having sent
    /// its Close, sends no FIN.
    upstream_done: CancellationToken,
}

impl Closing {
    fn begin(&self, end: Instant) {
        let now = Instant::now();
        let answer_by = now + end.saturating_duration_since(now) / 2;
        let _ = self.instants.set((answer_by, end));
        self.token.cancel();
    }

    /// Set by `begin` before the token is cancelled, so always there for a pump that saw the
    /// cancellation; the fallback only keeps this total.
    fn instants(&self) -> (Instant, Instant) {
        self.instants.get().copied().unwrap_or_else(|| {
            let now = Instant::now();
            (now + CLOSE_GRACE / 2, now + CLOSE_GRACE)
        })
    }

    /// Until when the upstream's Close is waited for, half way through the closing: the other
    /// half is left for the frame then in flight to the client to end before the proxy's own
    /// Close.
    fn answer_by(&self) -> Instant {
        self.instants().0
    }

    /// When the closing must be over.
    fn end(&self) -> Instant {
        self.instants().1
    }
}

/// One direction: copies `from` into `to` until `from` ends or the closing begins, then closes
/// it. A read or write error while copying cancels `broken`.
async fn pump<R, W>(
    mut from: R,
    mut to: W,
    toward: Toward,
    websocket: bool,
    closing: &Closing,
    broken: &CancellationToken,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // The client-ward direction reads the upstream: however it ends, the upstream-ward one may
    // then close.
    let _upstream_done = (toward == Toward::Client).then(|| closing.upstream_done.clone().drop_guard());
    let mut buf = vec![0u8; BUF];
    let mut frames = Frames::default();
    // `buf[written..read]`: read from `from`, not yet written to `to`. Both the read and the
    // write below are single calls, which either complete or leave nothing done when the closing
    // interrupts them, so no byte is lost or doubled.
    let (mut written, mut read) = (0, 0);
    let cancelled = closing.token.cancelled();
    tokio::pin!(cancelled);
    let broke = |e: std::io::Error| {
        tracing::debug!(error = %e, "upgraded connection ended with an error");
        broken.cancel();
    };
    loop {
        if written == read {
            tokio::select! {
                biased;
                _ = &mut cancelled => break,
                r = from.read(&mut buf) => match r {
                    Ok(0) => {
                        // The end of this side's stream, passed on as a FIN; the other
                        // direction goes on.
                        let _ = to.shutdown().await;
                        return;
                    }
                    Ok(n) => (written, read) = (0, n),
                    Err(e) => return broke(e),
                },
            }
        }
        tokio::select! {
            biased;
            _ = &mut cancelled => break,
            r = to.write(&buf[written..read]) => match r {
                Ok(n) if n > 0 => {
                    if websocket {
                        frames.advance(&buf[written..written + n]);
                    }
                    written += n;
                }
                Ok(_) => return broke(std::io::ErrorKind::WriteZero.into()),
                Err(e) => return broke(e),
            },
        }
        if written == read {
            // Before the next read waits: what a TLS side took without sending yet goes out (a
            // plain socket holds nothing back, and its flush returns at once).
            tokio::select! {
                biased;
                _ = &mut cancelled => break,
                r = to.flush() => if let Err(e) = r {
                    return broke(e);
                },
            }
        }
    }

    let end = closing.end();
    let mut pending = Pending {
        buf,
        from: written,
        to: read,
    };
    match (websocket, toward) {
        (false, _) => {
            // Another protocol: what was read already, then the FIN.
            let _ = timeout_at(end, to.write_all(pending.bytes())).await;
            let _ = timeout_at(end, to.shutdown()).await;
        }
        (true, Toward::Upstream) => {
            close_toward_upstream(&mut from, &mut to, &mut frames, &mut pending, closing).await;
        }
        (true, Toward::Client) => {
            close_toward_client(&mut from, &mut to, &mut frames, &mut pending, closing).await;
        }
    }
    let buf = &mut pending.buf;
    let _ = timeout_at(end, async {
        while let Ok(n) = from.read(buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// A direction's buffer and the bytes in it read from one side and not yet written to the
/// other, `buf[from..to]`.
struct Pending {
    buf: Vec<u8>,
    from: usize,
    to: usize,
}

impl Pending {
    fn bytes(&self) -> &[u8] {
        &self.buf[self.from..self.to]
    }
}

/// The client-to-upstream direction of a WebSocket, once the closing has begun: the frame in
/// flight is finished and a masked Close 1001 follows (unless the client has sent one already);
/// then the FIN waits until the upstream has closed its side, or the grace is over, while what
/// the client still sends is read and dropped.
async fn close_toward_upstream<R, W>(
    from: &mut R,
    to: &mut W,
    frames: &mut Frames,
    pending: &mut Pending,
    closing: &Closing,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let end = closing.end();
    // The rest of the frame in flight, from what was read already and then from `from`.
    let upto = frames.finish(pending.bytes()).unwrap_or(pending.bytes().len());
    let passed_on = timeout_at(end, to.write_all(&pending.bytes()[..upto]))
        .await
        .is_ok_and(|r| r.is_ok());
    if passed_on {
        let at_edge = timeout_at(end, finish_frame(from, to, frames, &mut pending.buf))
            .await
            .unwrap_or(false);
        // A peer that was sent a Close already is in its closing handshake: a second one
        // would be a protocol error.
        if at_edge && !frames.close_sent {
            // Flushed: over TLS a record can wait in the session's buffer, and the upstream would
            // then not see the Close it is waited for.
            let _ = timeout_at(end, async {
                to.write_all(&close_frame(Toward::Upstream)).await?;
                to.flush().await
            })
            .await;
        }
    }
    let buf = &mut pending.buf;
    let _ = timeout_at(end, async {
        let mut client_open = true;
        loop {
            tokio::select! {
                _ = closing.upstream_done.cancelled() => break,
                r = from.read(buf), if client_open => client_open = matches!(r, Ok(n) if n > 0),
            }
        }
    })
    .await;
    let _ = timeout_at(end, to.shutdown()).await;
}

/// Why the client-ward direction stopped passing frames on while closing.
#[derive(Debug, PartialEq, Eq)]
enum ClientWardStop {
    /// The upstream's Close is next (not passed on), or the answer was waited for long enough;
    /// either way at the edge of a frame.
    AtEdge,
    /// The upstream closed its side or failed.
    UpstreamEnded,
    /// A write to the client failed.
    ClientFailed,
}

/// The upstream-to-client direction of a WebSocket, once the closing has begun: whole frames go
/// on to the client until the upstream's Close is next, or until the answer deadline (then the
/// frame under way is finished); the client gets the proxy's Close 1001 in place of the
/// upstream's (unless it was sent a Close already) and then the FIN.
async fn close_toward_client<R, W>(
    from: &mut R,
    to: &mut W,
    frames: &mut Frames,
    pending: &mut Pending,
    closing: &Closing,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (answer_by, end) = (closing.answer_by(), closing.end());
    let stop = timeout_at(end, async {
        loop {
            if pending.from == pending.to {
                // Between frames the read gives way to the answer deadline; within one it goes
                // on (up to the end of the grace) so that the frame ends whole.
                let read = async {
                    if frames.at_edge() {
                        timeout_at(answer_by, from.read(&mut pending.buf)).await.ok()
                    } else {
                        Some(from.read(&mut pending.buf).await)
                    }
                };
                match read.await {
                    None => return ClientWardStop::AtEdge,
                    Some(Ok(0) | Err(_)) => return ClientWardStop::UpstreamEnded,
                    Some(Ok(n)) => (pending.from, pending.to) = (0, n),
                }
            }
            if frames.at_edge() && (frames.close_next(pending.bytes()) || Instant::now() >= answer_by) {
                return ClientWardStop::AtEdge;
            }
            let n = frames.step(pending.bytes());
            if to.write_all(&pending.bytes()[..n]).await.is_err() {
                return ClientWardStop::ClientFailed;
            }
            pending.from += n;
        }
    })
    .await;
    let stop = match stop {
        Ok(stop) => stop,
        // The grace is over, in the middle of a frame: the FIN alone.
        Err(_) => return,
    };
    // A client whose application closed first is in its closing handshake already.
    let goodbye = stop != ClientWardStop::ClientFailed && frames.at_edge() && !frames.close_sent;
    if goodbye {
        let _ = timeout_at(end, to.write_all(&close_frame(Toward::Client))).await;
    }
    let _ = timeout_at(end, to.shutdown()).await;
}

/// Passes on the rest of the frame in flight, if any, and nothing after it. False if `from` ends
/// or a write fails first.
async fn finish_frame<R, W>(from: &mut R, to: &mut W, frames: &mut Frames, buf: &mut [u8]) -> bool
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    while !frames.at_edge() {
        let n = match from.read(buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => n,
        };
        let upto = frames.finish(&buf[..n]).unwrap_or(n);
        if to.write_all(&buf[..upto]).await.is_err() {
            return false;
        }
    }
    true
}

/// A Close frame with status 1001. Frames from a client are masked (RFC 6455, section 5.3), so
/// the one the proxy sends the upstream in the client's place is too.
fn close_frame(toward: Toward) -> Vec<u8> {
    match toward {
        Toward::Client => vec![0x88, 0x02, GOING_AWAY[0], GOING_AWAY[1]],
        Toward::Upstream => {
            let key = (crate::headers::random_u64() as u32).to_be_bytes();
            vec![
                0x88,
                0x80 | 0x02,
                key[0],
                key[1],
                key[2],
                key[3],
                GOING_AWAY[0] ^ key[0],
                GOING_AWAY[1] ^ key[1],
            ]
        }
    }
}

/// Where one direction of a WebSocket stands in its frames: how much of a frame's header has
/// been seen, and how much of its payload is still to come.
#[derive(Debug, Default)]
pub(crate) struct Frames {
    head: [u8; 14],
    /// Header bytes seen of the frame under way; 0 between frames and within a payload.
    have: usize,
    /// Payload bytes of the frame under way still to come.
    payload_left: u64,
    /// A Close frame has been passed on (its header at least): the peer it went to is in its
    /// closing handshake.
    pub(crate) close_sent: bool,
}

impl Frames {
    /// Between two frames.
    pub(crate) fn at_edge(&self) -> bool {
        self.have == 0 && self.payload_left == 0
    }

    /// Between two frames, with `bytes` (what follows) beginning with a Close frame: its first
    /// byte holds the opcode, and control frames are never fragmented.
    fn close_next(&self, bytes: &[u8]) -> bool {
        self.at_edge() && bytes.first().is_some_and(|b| b & 0x0f == OPCODE_CLOSE)
    }

    /// Follows all of `bytes`.
    pub(crate) fn advance(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let n = self.step(bytes);
            bytes = &bytes[n..];
        }
    }

    /// Follows `bytes` up to the end of the frame under way, and returns how many bytes that
    /// took (0 between frames); `None` if the frame goes on past them (all are followed).
    pub(crate) fn finish(&mut self, bytes: &[u8]) -> Option<usize> {
        if self.at_edge() {
            return Some(0);
        }
        let n = self.step(bytes);
        self.at_edge().then_some(n)
    }

    /// Follows `bytes` until a frame ends or they run out; returns how many it took (at least
    /// one, unless `bytes` is empty).
    pub(crate) fn step(&mut self, bytes: &[u8]) -> usize {
        let mut i = 0;
        while i < bytes.len() {
            if self.payload_left > 0 {
                let take = self.payload_left.min((bytes.len() - i) as u64);
                i += take as usize;
                self.payload_left -= take;
                if self.payload_left == 0 {
                    return i;
                }
                continue;
            }
            self.head[self.have] = bytes[i];
            self.have += 1;
            i += 1;
            if self.have >= 2 && self.have == header_len(self.head[1]) {
                self.close_sent |= self.head[0] & 0x0f == OPCODE_CLOSE;
                self.payload_left = payload_len(&self.head[..self.have]);
                self.have = 0;
                if self.payload_left == 0 {
                    return i;
                }
            }
        }
        i
    }
}

/// The length of a frame header, from its second byte: 2, then 2 or 8 bytes of extended length,
/// then 4 of masking key if the mask bit is set.
fn header_len(second: u8) -> usize {
    let extended = match second & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if second & 0x80 != 0 { 4 } else { 0 };
    2 + extended + mask
}

/// The payload length a whole frame header declares.
fn payload_len(head: &[u8]) -> u64 {
    match head[1] & 0x7f {
        126 => u16::from_be_bytes([head[2], head[3]]) as u64,
        127 => u64::from_be_bytes(head[2..10].try_into().expect("8 bytes")),
        n => n as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame with the given opcode and payload, masked with `key` if given.
    fn frame(opcode: u8, payload: &[u8], key: Option<[u8; 4]>) -> Vec<u8> {
        let mut f = vec![0x80 | opcode];
        let mask = if key.is_some() { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => f.push(mask | n as u8),
            n if n <= u16::MAX as usize => {
                f.push(mask | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(mask | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        match key {
            Some(k) => {
                f.extend_from_slice(&k);
                f.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
            }
            None => f.extend_from_slice(payload),
        }
        f
    }

    /// Every frame edge in `stream`, found by feeding it to a tracker in pieces of `piece` bytes.
    fn edges(stream: &[u8], piece: usize) -> Vec<usize> {
        let mut frames = Frames::default();
        let mut found = Vec::new();
        let mut at = 0;
        for chunk in stream.chunks(piece) {
            let mut rest = chunk;
            let mut base = at;
            while !rest.is_empty() {
                let n = frames.step(rest);
                assert!(n > 0);
                if frames.at_edge() {
                    found.push(base + n);
                }
                base += n;
                rest = &rest[n..];
            }
            at += chunk.len();
        }
        assert!(frames.at_edge(), "the stream ends between frames");
        found
    }

    #[test]
    fn finds_the_edges_of_frames_of_every_length_form_in_any_pieces() {
        let frames = [
            frame(0x1, b"hello", None),
            frame(0x2, &[7u8; 126], Some([1, 2, 3, 4])),
            frame(0x9, b"", None),
            frame(0x2, &[9u8; 70_000], None),
            frame(0x1, b"", Some([9, 9, 9, 9])),
            frame(0x8, &GOING_AWAY, Some([5, 6, 7, 8])),
        ];
        let mut stream = Vec::new();
        let mut expected = Vec::new();
        for f in &frames {
            stream.extend_from_slice(f);
            expected.push(stream.len());
        }
        for piece in [1, 2, 3, 7, 13, 1000, 8192, stream.len()] {
            assert_eq!(edges(&stream, piece), expected, "in pieces of {piece} bytes");
        }
    }

    #[test]
    fn a_frame_is_finished_up_to_its_end_and_no_further() {
        let first = frame(0x2, &[1u8; 300], Some([1, 1, 1, 1]));
        let second = frame(0x1, b"next", None);
        let mut frames = Frames::default();
        frames.advance(&first[..100]);
        assert!(!frames.at_edge());
        // The rest of the first frame arrives with the whole second one.
        let mut rest = first[100..].to_vec();
        rest.extend_from_slice(&second);
        assert_eq!(frames.finish(&rest[..50]), None, "the frame goes on");
        assert_eq!(frames.finish(&rest[50..]), Some(first.len() - 150));
        assert!(frames.at_edge());
        assert_eq!(frames.finish(&second), Some(0), "already between frames");
        // A header cut after its first byte is a frame under way.
        frames.advance(&second[..1]);
        assert!(!frames.at_edge());
        assert_eq!(frames.finish(&second[1..]), Some(second.len() - 1));
    }

    #[test]
    fn close_frames_carry_going_away_masked_toward_the_upstream() {
        assert_eq!(close_frame(Toward::Client), [0x88, 0x02, 0x03, 0xe9]);
        let up = close_frame(Toward::Upstream);
        assert_eq!(&up[..2], &[0x88, 0x82]);
        let key = &up[2..6];
        assert_eq!([up[6] ^ key[0], up[7] ^ key[1]], [0x03, 0xe9]);
        let mut frames = Frames::default();
        assert_eq!(frames.step(&up), up.len());
        assert!(frames.at_edge());
    }

    #[test]
    fn a_close_frame_is_next_only_between_frames() {
        let close = frame(0x8, &1000u16.to_be_bytes(), None);
        let text = frame(0x1, b"bye", None);
        let mut frames = Frames::default();
        assert!(frames.close_next(&close));
        assert!(!frames.close_next(&text));
        assert!(!frames.close_next(&[]), "nothing read yet");
        // In the middle of a frame, a byte that looks like a Close header is payload.
        let binary = frame(0x2, &[0x88; 10], None);
        frames.advance(&binary[..4]);
        assert!(!frames.close_next(&binary[4..]));
        frames.advance(&binary[4..]);
        assert!(frames.close_next(&close));
        assert!(!frames.close_sent, "seen, not passed on");
    }

    /// The proxy's ends of a tunnel under test: the test plays the client on `client` and the
    /// upstream on `upstream`, and begins the closing by sending its end instant on `close`.
    struct TestTunnel {
        client: tokio::io::DuplexStream,
        upstream: tokio::io::DuplexStream,
        close: tokio::sync::oneshot::Sender<Instant>,
        task: tokio::task::JoinHandle<()>,
    }

    fn tunnel(websocket: bool) -> TestTunnel {
        let (client, proxy_client) = tokio::io::duplex(64 * 1024);
        let (upstream, proxy_upstream) = tokio::io::duplex(64 * 1024);
        let (close, at) = tokio::sync::oneshot::channel();
        let close_at = async move {
            match at.await {
                Ok(end) => end,
                Err(_) => std::future::pending().await,
            }
        };
        let task = tokio::spawn(run(proxy_client, proxy_upstream, websocket, close_at));
        TestTunnel {
            client,
            upstream,
            close,
            task,
        }
    }

    /// Everything `from` sends up to its end, and when the end came.
    async fn rest(mut from: impl AsyncRead + Unpin) -> (Vec<u8>, Instant) {
        let mut got = Vec::new();
        from.read_to_end(&mut got).await.expect("an end, not an error");
        (got, Instant::now())
    }

    /// Reads the masked Close 1001 the proxy sends the upstream.
    async fn expect_masked_going_away(upstream: &mut (impl AsyncRead + Unpin)) {
        let mut close = [0u8; 8];
        upstream.read_exact(&mut close).await.unwrap();
        assert_eq!(&close[..2], &[0x88, 0x82], "a masked Close with two bytes");
        assert_eq!([close[6] ^ close[2], close[7] ^ close[3]], GOING_AWAY);
    }

    /// The proxy closes toward the upstream as a client must: its Close, then no FIN until the
    /// upstream has closed its side. Meanwhile the messages the upstream sent before its answer
    /// reach the client whole, and the client gets one Close, 1001, in place of the upstream's
    /// (1000 here), then the FIN. What the client sends after the proxy's Close is dropped.
    #[tokio::test(start_paused = true)]
    async fn the_upstream_closes_first_and_its_last_messages_reach_the_client() {
        let t = tunnel(true);
        let (client_r, mut client_w) = tokio::io::split(t.client);
        let mut upstream = t.upstream;
        let client = tokio::spawn(rest(client_r));
        let start = Instant::now();
        t.close.send(start + CLOSE_GRACE).unwrap();
        expect_masked_going_away(&mut upstream).await;
        client_w
            .write_all(&frame(0x1, b"too late", Some([1, 2, 3, 4])))
            .await
            .unwrap();

        let mut last = frame(0x1, b"last", None);
        last.extend_from_slice(&frame(0x2, &[7u8; 70_000], None));
        upstream.write_all(&last).await.unwrap();
        upstream
            .write_all(&frame(0x8, &1000u16.to_be_bytes(), None))
            .await
            .unwrap();
        let answered = Instant::now();
        // The proxy waits for the upstream to close first.
        let mut byte = [0u8; 1];
        let waited = tokio::time::timeout(Duration::from_millis(300), upstream.read(&mut byte)).await;
        assert!(
            waited.is_err(),
            "no FIN nor byte before the upstream closes: {waited:?}"
        );
        upstream.shutdown().await.unwrap();
        let (after, fin_at) = rest(&mut upstream).await;
        assert!(after.is_empty(), "nothing after the proxy's Close: {after:?}");
        assert!(
            fin_at - start < CLOSE_GRACE,
            "the FIN answers the upstream's, within the grace"
        );

        let (got, client_fin_at) = client.await.unwrap();
        let mut expected = last;
        expected.extend_from_slice(&close_frame(Toward::Client));
        assert!(
            got == expected,
            "the last messages and one Close 1001: {} bytes",
            got.len()
        );
        assert_eq!(
            client_fin_at, answered,
            "the client's FIN follows the upstream's answer"
        );
        drop(client_w);
        t.task.await.unwrap();
    }

    /// An upstream that does not answer the Close: whole frames reach the client until half the
    /// grace is over, the frame under way then is finished, and the client gets the proxy's Close
    /// 1001 and nothing after it. The upstream gets its FIN when the grace is over.
    #[tokio::test(start_paused = true)]
    async fn an_upstream_that_does_not_answer_is_waited_for_half_the_grace() {
        let t = tunnel(true);
        let mut upstream = t.upstream;
        let client = tokio::spawn(rest(t.client));
        let first = frame(0x2, &[1u8; 1_000], None);
        let more = frame(0x1, b"more", None);
        let second = frame(0x2, &[2u8; 3_000], None);
        upstream.write_all(&first[..500]).await.unwrap();
        let start = Instant::now();
        t.close.send(start + CLOSE_GRACE).unwrap();
        expect_masked_going_away(&mut upstream).await;

        tokio::time::sleep_until(start + Duration::from_millis(200)).await;
        upstream.write_all(&first[500..]).await.unwrap();
        upstream.write_all(&more).await.unwrap();
        // Under way at the answer deadline (500 ms), ended after it.
        tokio::time::sleep_until(start + Duration::from_millis(400)).await;
        upstream.write_all(&second[..1_500]).await.unwrap();
        tokio::time::sleep_until(start + Duration::from_millis(700)).await;
        let mut rest_and_late = second[1_500..].to_vec();
        rest_and_late.extend_from_slice(&frame(0x1, b"late", None));
        upstream.write_all(&rest_and_late).await.unwrap();

        let (got, client_fin_at) = client.await.unwrap();
        let expected = [first, more, second, close_frame(Toward::Client)].concat();
        assert!(got == expected, "whole frames then one Close 1001: {} bytes", got.len());
        assert_eq!(client_fin_at - start, Duration::from_millis(700));
        let (after, fin_at) = rest(&mut upstream).await;
        assert!(after.is_empty());
        assert_eq!(fin_at - start, CLOSE_GRACE, "the upstream's FIN when the grace is over");
        t.task.await.unwrap();
    }

    /// An application that closed first has had its Close passed on to the client: at the
    /// closing, the client gets no second Close, only the FIN once the upstream has closed.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_got_the_applications_close_gets_no_second_one() {
        let t = tunnel(true);
        let (mut client, mut upstream) = (t.client, t.upstream);
        let app_close = frame(0x8, &4000u16.to_be_bytes(), None);
        upstream.write_all(&app_close).await.unwrap();
        let mut got = vec![0u8; app_close.len()];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(got, app_close);
        let start = Instant::now();
        t.close.send(start + CLOSE_GRACE).unwrap();
        // The client never answered; the proxy does, in its place, which ends the handshake.
        expect_masked_going_away(&mut upstream).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        upstream.shutdown().await.unwrap();
        let (after, fin_at) = rest(&mut client).await;
        assert!(after.is_empty(), "no second Close: {after:?}");
        assert_eq!(fin_at - start, Duration::from_millis(100));
        assert!(rest(&mut upstream).await.0.is_empty());
        drop(client);
        t.task.await.unwrap();
    }

    /// An upgrade to another protocol knows no frames and no handshake: both sides get what was
    /// under way and the FIN at the closing instant.
    #[tokio::test(start_paused = true)]
    async fn another_protocol_gets_the_fin_alone_at_once() {
        let t = tunnel(false);
        let (mut client, mut upstream) = (t.client, t.upstream);
        upstream.write_all(b"\x88\x02ab").await.unwrap();
        let mut got = [0u8; 4];
        client.read_exact(&mut got).await.unwrap();
        let start = Instant::now();
        t.close.send(start + CLOSE_GRACE).unwrap();
        let ((to_client, client_fin), (to_upstream, upstream_fin)) =
            tokio::join!(rest(&mut client), rest(&mut upstream));
        assert!(to_client.is_empty() && to_upstream.is_empty());
        assert_eq!((client_fin, upstream_fin), (start, start));
        drop((client, upstream));
        t.task.await.unwrap();
    }
}
