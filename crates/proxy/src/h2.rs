//! What cutover reads of an HTTP/2 client's bytes before and besides hyper: whether a new
//! connection starts with the prior-knowledge preface, and where its bytes stand among frames
//! (so that a header block is timed like an HTTP/1 head). Nothing is decoded.

use std::io;

use tokio::net::TcpStream;

pub(crate) const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a new plain connection's first bytes say it speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sniffed {
    /// The HTTP/2 prior-knowledge preface.
    Http2,
    /// Anything else, which begins with this byte (HTTP/1, or a TLS ClientHello sent to a
    /// plain port).
    Other(u8),
}

/// Tells HTTP/2 prior knowledge from HTTP/1 by the first bytes, without consuming them.
///
/// A client may send the preface a byte at a time, so a prefix of it ("P", "PR", ...) leaves the
/// question open. Peeking does not consume, so the socket stays readable and a plain
/// `peek().await` would return at once with the same bytes: the peek runs inside `try_io`, which
/// clears the readiness when the bytes settle nothing, so the task sleeps until more arrive. The
/// clearing is tied to the readiness event the peek saw, so bytes that arrive in between still
/// wake it. A connection that sent a prefix and then its FIN stays readable forever: it can
/// never become HTTP/2, so it is handed to HTTP/1, which answers it.
pub(crate) async fn sniff_h2(stream: &TcpStream) -> io::Result<Sniffed> {
    use nix::sys::socket::{recv, MsgFlags};
    use std::os::fd::AsRawFd;
    use tokio::io::Interest;

    let mut buf = [0u8; H2_PREFACE.len()];
    loop {
        let ready = stream.ready(Interest::READABLE).await?;
        let peeked = stream.try_io(Interest::READABLE, || {
            let n = recv(
                stream.as_raw_fd(),
                &mut buf,
                MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
            )?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            if buf[..n] != H2_PREFACE[..n] {
                return Ok(Sniffed::Other(buf[0]));
            }
            if n == H2_PREFACE.len() {
                return Ok(Sniffed::Http2);
            }
            if ready.is_read_closed() {
                return Ok(Sniffed::Other(buf[0]));
            }
            // Nothing new to decide on: let the readiness go until more bytes arrive.
            Err(io::ErrorKind::WouldBlock.into())
        });
        match peeked {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

/// HTTP/2: where the client's bytes stand among its frames, so that a header block is timed
/// from its first byte as an HTTP/1 head is. Only frame boundaries are followed (the 9-byte frame
/// headers); nothing is decoded, and a frame's payload is skipped without being looked at.
pub(crate) struct H2Frames {
    /// Bytes of the connection preface still to come.
    preface: u8,
    /// A frame header being read.
    header: [u8; 9],
    header_len: u8,
    /// Payload bytes of the current frame still to come.
    payload: u32,
    /// The current frame ends its header block (HEADERS or CONTINUATION with END_HEADERS).
    ends_block: bool,
    /// A header block has begun (a HEADERS frame) and has not ended.
    in_block: bool,
    /// Whether a block or a frame header was open after the last bytes, and how many times one
    /// has opened.
    pub(crate) open: bool,
    pub(crate) opened: u32,
}

impl H2Frames {
    const HEADERS: u8 = 0x1;
    const CONTINUATION: u8 = 0x9;
    const END_HEADERS: u8 = 0x4;

    /// Where the follower stands, everything but the count of blocks opened (which depends on
    /// how the bytes were split into reads): bytes of preface still to come, frame-header bytes
    /// held, payload bytes still to come, and whether a header block is open.
    #[cfg(feature = "fuzzing")]
    pub(crate) fn position(&self) -> (u8, u8, u32, bool, bool) {
        (self.preface, self.header_len, self.payload, self.in_block, self.open)
    }

    pub(crate) fn new() -> H2Frames {
        H2Frames {
            preface: 24,
            header: [0; 9],
            header_len: 0,
            payload: 0,
            ends_block: false,
            in_block: false,
            open: false,
            opened: 0,
        }
    }

    /// Follows the next bytes the client sent.
    pub(crate) fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.preface > 0 {
                let n = bytes.len().min(self.preface as usize);
                self.preface -= n as u8;
                bytes = &bytes[n..];
            } else if self.payload > 0 {
                let n = bytes.len().min(self.payload as usize);
                self.payload -= n as u32;
                bytes = &bytes[n..];
                if self.payload == 0 && self.ends_block {
                    self.in_block = false;
                    self.ends_block = false;
                }
            } else {
                let at = self.header_len as usize;
                let n = bytes.len().min(9 - at);
                self.header[at..at + n].copy_from_slice(&bytes[..n]);
                self.header_len += n as u8;
                bytes = &bytes[n..];
                if self.header_len == 9 {
                    self.header_len = 0;
                    let h = self.header;
                    self.payload = u32::from_be_bytes([0, h[0], h[1], h[2]]);
                    if h[3] == Self::HEADERS || h[3] == Self::CONTINUATION {
                        self.in_block = true;
                        self.ends_block = h[4] & Self::END_HEADERS != 0;
                        if self.payload == 0 && self.ends_block {
                            self.in_block = false;
                            self.ends_block = false;
                        }
                    }
                }
            }
            let open = self.in_block || self.header_len > 0;
            if open && !self.open {
                self.opened = self.opened.wrapping_add(1);
            }
            self.open = open;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() as u32).to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, flags, 0, 0, 0, 1];
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn http2_header_blocks_are_followed_across_reads() {
        let mut f = H2Frames::new();
        let mut bytes = H2_PREFACE.to_vec();
        bytes.extend(frame(0x4, 0, &[])); // SETTINGS
        bytes.extend(frame(0x6, 0, &[0; 8])); // PING
        f.feed(&bytes);
        assert!(!f.open, "preface and whole frames leave nothing open");
        // A HEADERS frame with END_HEADERS, whole in one read: never open at the end of a read.
        f.feed(&frame(0x1, 0x4 | 0x1, &[0x82, 0x86, 0x84]));
        assert!(!f.open);
        // The same frame one byte at a time: open from its first byte to its last.
        let headers = frame(0x1, 0x4 | 0x1, &[0x82, 0x86, 0x84]);
        let before = f.opened;
        for (i, b) in headers.iter().enumerate() {
            f.feed(std::slice::from_ref(b));
            assert_eq!(f.open, i + 1 < headers.len(), "after byte {i}");
        }
        assert_eq!(f.opened, before + 1, "one block, counted once");
        // HEADERS without END_HEADERS leaves the block open through a DATA-free gap until the
        // CONTINUATION that ends it.
        f.feed(&frame(0x1, 0x1, &[0x82, 0x86]));
        assert!(f.open);
        f.feed(&frame(0x9, 0x4, &[0x84]));
        assert!(!f.open);
        // A body trickled in: DATA frames never open a block, whatever their pace.
        let data = frame(0x0, 0x1, b"hello");
        f.feed(&data[..9]);
        assert!(!f.open, "inside a DATA payload");
        f.feed(&data[9..]);
        assert!(!f.open);
        // Two blocks in one read, the second unfinished: it has a number of its own, so its time
        // starts afresh (the watchdog re-arms when the number changes).
        let before = f.opened;
        let mut two = frame(0x1, 0x5, &[0x82]);
        two.extend(&frame(0x1, 0x5, &[0x82, 0x86])[..10]);
        f.feed(&two);
        assert!(f.open);
        assert_eq!(f.opened, before + 2, "each block opened once");
    }
}
