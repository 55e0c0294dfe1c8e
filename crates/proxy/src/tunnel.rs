//! An upgraded connection: bytes copied both ways, and a clean close when the proxy ends it.
//!
//! A tunnel copies what each side sends to the other; a FIN from one side is passed on to the
//! other, and the tunnel ends when both directions have ended. A read or write error on either
//! side (a reset) ends the whole tunnel at once.
//!
//! The proxy ends a tunnel itself at an instant of a close window (after a drain deadline, or
//! at shutdown). A WebSocket then gets a proper goodbye rather than a bare FIN, which its client
//! would report as an abnormal closure (code 1006): each direction is brought to the end of the
//! frame it is in, and a Close frame with status 1001 ("going away") goes to the client and
//! to the upstream application, each followed by a FIN. A client library takes a 1001 as a
//! reason to reconnect, and the reconnection reaches the live colour. A side that was already
//! sent a Close (its closing handshake is under way) gets no second one. Only frame headers are
//! read on the way; payloads (masked, compressed or not) pass untouched. A direction that is not
//! at the end of a frame within [`CLOSE_GRACE`], or an upgrade to another protocol, gets the
//! FIN alone. Either way the tunnel then reads and drops what the two sides still send until
//! they close or the grace runs out, so that its sockets are not closed with data unread
//! (which the kernel answers with a reset that can overtake the Close frame).

use std::future::Future;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{timeout_at, Instant};
use tokio_util::sync::CancellationToken;

/// How long a tunnel being closed waits for a frame in flight to end, and then for the two
/// sides to answer its Close frames and close.
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

/// The proxy's decision to close a tunnel, shared by its two directions.
#[derive(Default)]
struct Closing {
    token: CancellationToken,
    /// When the closing must be over.
    end: std::sync::OnceLock<Instant>,
}

impl Closing {
    fn begin(&self, end: Instant) {
        let _ = self.end.set(end);
        self.token.cancel();
    }

    /// Set by `begin` before the token is cancelled, so always there for a pump that saw the
    /// cancellation; the fallback only keeps this total.
    fn end(&self) -> Instant {
        self.end.get().copied().unwrap_or_else(|| Instant::now() + CLOSE_GRACE)
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
    }

    let end = closing.end();
    // The rest of the frame in flight, from what was read already and then from `from`; for
    // another protocol, what was read already.
    let upto = if websocket {
        frames.finish(&buf[written..read]).unwrap_or(read - written)
    } else {
        read - written
    };
    let passed_on = timeout_at(end, to.write_all(&buf[written..written + upto]))
        .await
        .is_ok_and(|r| r.is_ok());
    if websocket && passed_on {
        let at_edge = timeout_at(end, finish_frame(&mut from, &mut to, &mut frames, &mut buf))
            .await
            .unwrap_or(false);
        // A peer that was sent a Close already is in its closing handshake: a second one
        // would be a protocol error.
        if at_edge && !frames.close_sent {
            let _ = timeout_at(end, to.write_all(&close_frame(toward))).await;
        }
    }
    let _ = timeout_at(end, to.shutdown()).await;
    let _ = timeout_at(end, async {
        while let Ok(n) = from.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
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
}
