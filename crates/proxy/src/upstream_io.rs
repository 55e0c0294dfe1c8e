//! The socket of an upstream connection: plain TCP, or TLS over TCP for a service with
//! `upstream_tls` (`crate::upstream_tls`).
//!
//! An enum rather than a trait object: the plain path pays a branch per read or write and no
//! allocation or indirect call; the TLS state is boxed so that a plain connection stays small.
//!
//! A TLS write may be taken into rustls' buffer without reaching the socket yet (when the socket
//! is full); it goes out at the next write or flush. Whoever writes a message and then waits for
//! an answer must flush (for plain TCP a flush costs nothing).

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::tcp;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

pub(crate) enum UpstreamIo {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl UpstreamIo {
    /// The TCP socket underneath, for socket options.
    #[cfg(test)]
    pub(crate) fn tcp(&self) -> &TcpStream {
        match self {
            UpstreamIo::Plain(s) => s,
            UpstreamIo::Tls(s) => s.get_ref().0,
        }
    }

    /// True when an idle connection shows nothing on it: no bytes and no close since its last
    /// response. Plain: the readiness the event loop knows is consulted first, so that normally
    /// no system call is made. TLS: first what rustls already holds (data or a close taken from
    /// the socket with an earlier read), then the socket: a readable socket may carry records
    /// that are no data (a session ticket, a key update), which rustls takes in here; application
    /// data or a close make the connection unusable.
    pub(crate) fn idle_ok(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match self {
            UpstreamIo::Plain(s) => match s.poll_read_ready(&mut cx) {
                Poll::Pending => true,
                Poll::Ready(Err(_)) => false,
                Poll::Ready(Ok(())) => {
                    let mut probe = [0u8; 1];
                    matches!(s.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
                }
            },
            UpstreamIo::Tls(s) => {
                // rustls may hold records it took from the socket already (data the last read
                // had no room for, or a close): the socket then looks idle while it is not.
                match s.get_mut().1.process_new_packets() {
                    Ok(state) if state.plaintext_bytes_to_read() == 0 && !state.peer_has_closed() => {}
                    _ => return false,
                }
                if s.get_ref().0.poll_read_ready(&mut cx).is_pending() {
                    return true;
                }
                let mut probe = [0u8; 1];
                let mut buf = ReadBuf::new(&mut probe);
                // Pending: whatever was readable was not data (or not whole yet).
                matches!(Pin::new(&mut **s).poll_read(&mut cx, &mut buf), Poll::Pending)
            }
        }
    }

    /// Borrowed read and write halves, for writing a request body while watching for an early
    /// answer. Plain: the socket's own halves (no lock, no allocation); TLS: tokio's split.
    pub(crate) fn split(&mut self) -> (UpstreamRead<'_>, UpstreamWrite<'_>) {
        match self {
            UpstreamIo::Plain(s) => {
                let (r, w) = s.split();
                (UpstreamRead::Plain(r), UpstreamWrite::Plain(w))
            }
            UpstreamIo::Tls(s) => {
                let (r, w) = tokio::io::split(&mut **s);
                (UpstreamRead::Tls(r), UpstreamWrite::Tls(w))
            }
        }
    }
}

impl AsyncRead for UpstreamIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamIo::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Plain(s) => s.is_write_vectored(),
            UpstreamIo::Tls(s) => s.is_write_vectored(),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamIo::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

/// The read half of [`UpstreamIo::split`].
pub(crate) enum UpstreamRead<'a> {
    Plain(tcp::ReadHalf<'a>),
    Tls(tokio::io::ReadHalf<&'a mut TlsStream<TcpStream>>),
}

/// The write half of [`UpstreamIo::split`].
pub(crate) enum UpstreamWrite<'a> {
    Plain(tcp::WriteHalf<'a>),
    Tls(tokio::io::WriteHalf<&'a mut TlsStream<TcpStream>>),
}

impl AsyncRead for UpstreamRead<'_> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamRead::Plain(r) => Pin::new(r).poll_read(cx, buf),
            UpstreamRead::Tls(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamWrite<'_> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamWrite::Plain(w) => Pin::new(w).poll_write(cx, buf),
            UpstreamWrite::Tls(w) => Pin::new(w).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamWrite::Plain(w) => Pin::new(w).poll_flush(cx),
            UpstreamWrite::Tls(w) => Pin::new(w).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamWrite::Plain(w) => Pin::new(w).poll_shutdown(cx),
            UpstreamWrite::Tls(w) => Pin::new(w).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A TLS server for `upstream.test` that sends `first` and, once told, `then`; and a client
    /// connected to it.
    async fn tls_pair(first: &'static [u8]) -> (UpstreamIo, tokio::sync::oneshot::Sender<&'static [u8]>) {
        let (config, ca) = crate::upstream_tls::self_signed_server("upstream.test");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<&'static [u8]>();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = tokio_rustls::TlsAcceptor::from(config).accept(tcp).await.unwrap();
            tls.write_all(first).await.unwrap();
            tls.flush().await.unwrap();
            if let Ok(then) = rx.await {
                tls.write_all(then).await.unwrap();
                tls.flush().await.unwrap();
            }
            let mut sink = [0u8; 64];
            let _ = tls.read(&mut sink).await;
        });
        let tls = crate::upstream_tls::UpstreamTls::new(ca.as_bytes(), "test CA", Some("upstream.test")).unwrap();
        let tcp = TcpStream::connect(addr).await.unwrap();
        (UpstreamIo::Tls(Box::new(tls.handshake(tcp, addr).await.unwrap())), tx)
    }

    /// Data rustls took from the socket with a read that had no room for all of it: the socket
    /// is drained, the connection is not idle.
    #[tokio::test]
    async fn tls_data_held_by_rustls_is_not_idle() {
        let (mut io, _then) = tls_pair(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokstale").await;
        let mut one = [0u8; 1];
        io.read_exact(&mut one).await.unwrap();
        // The record was read whole into rustls; the socket has nothing more.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut cx = Context::from_waker(Waker::noop());
        let UpstreamIo::Tls(s) = &mut io else { unreachable!() };
        assert!(
            s.get_ref().0.poll_read_ready(&mut cx).is_pending(),
            "the socket is drained"
        );
        assert!(!io.idle_ok(), "bytes are waiting in rustls");
    }

    /// An idle TLS connection is idle; one the upstream wrote to since is not.
    #[tokio::test]
    async fn tls_idle_until_the_upstream_sends() {
        let (mut io, then) = tls_pair(b"ok").await;
        let mut two = [0u8; 2];
        io.read_exact(&mut two).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(io.idle_ok(), "nothing more was sent");
        then.send(b"stale").unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!io.idle_ok(), "the upstream sent bytes nobody asked for");
    }
}
