//! Listening sockets and their accept loops; the TCP settings every connection gets.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::config::ProxyConfig;
use crate::conn::{serve, ConnSlot};
use crate::shared::{OpenGuard, Shared};

/// Binds a listening socket. The TCP settings of [`set_liveness`] made here are inherited by
/// every connection it accepts, so they cost nothing per connection.
pub(crate) fn bind(addr: SocketAddr, reuse_port: bool, config: &ProxyConfig) -> io::Result<std::net::TcpListener> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let sock = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    if reuse_port {
        sock.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_nonblocking(true)?;
    set_liveness(socket2::SockRef::from(&sock), config)?;
    sock.bind(&addr.into())?;
    sock.listen(4096)?;
    Ok(sock.into())
}

/// Readies a listening socket opened elsewhere (systemd, the daemon this one replaces) as
/// [`bind`] would have: non-blocking, with the connection settings of [`set_liveness`].
pub(crate) fn adopt_socket(sock: &std::net::TcpListener, config: &ProxyConfig) -> io::Result<()> {
    sock.set_nonblocking(true)?;
    set_liveness(socket2::SockRef::from(sock), config)
}

/// The TCP settings that let the kernel end a connection whose peer is gone, on client
/// connections (set on the listeners) and upstream connections alike:
/// - `TCP_USER_TIMEOUT` of `send_timeout`: a peer that acknowledges none of the bytes sent to
///   it for that long (it stopped reading and its window stayed shut, or it vanished with data
///   in flight) is cut by the kernel, and the write waiting on it fails. A slow reader that takes
///   some bytes now and then is not; neither is a client whose response waits for its upstream.
/// - TCP keepalive from half of `idle_timeout` of silence on, about every eighth of it, so that a
///   connection whose peer vanished without a FIN (a lost network, an expired NAT entry, a host
///   that went down) ends once its probes have gone unanswered for `send_timeout`, instead of
///   keeping its slot under `max_connections` or its request waiting for good. A live peer's
///   kernel answers the probes, and since several go out before the send timeout, one lost probe
///   does not end a live connection.
pub(crate) fn set_liveness(sock: socket2::SockRef<'_>, config: &ProxyConfig) -> io::Result<()> {
    // The kernel's limits: the user timeout is a positive C int of milliseconds (24 days), and
    // keepalive times are whole seconds up to 32767.
    let send = config
        .send_timeout
        .clamp(Duration::from_secs(1), Duration::from_millis(i32::MAX as u64));
    sock.set_tcp_user_timeout(Some(send))?;
    let secs = |d: Duration| Duration::from_secs(d.as_secs().clamp(1, 32_767));
    let idle = config.idle_timeout;
    sock.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(secs(idle / 2))
            .with_interval(secs(idle / 8)),
    )
}

/// Accepts until the shutdown, each connection once it has its place under `max_connections`
/// (waiting in the backlog until then), and serves each in a task of its own: HTTP on a plain
/// listener, TLS then HTTP on a TLS one (`tls`).
pub(crate) async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, preview: bool, tls: bool) {
    tokio::select! {
        _ = shared.opened.cancelled() => {}
        _ = shared.shutdown.cancelled() => return,
    }
    loop {
        let permit = tokio::select! {
            p = shared.conn_limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = shared.shutdown.cancelled() => return,
        };
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shared.shutdown.cancelled() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let shared = shared.clone();
                tokio::spawn(async move {
                    let slot = ConnSlot {
                        _permit: permit,
                        _open: OpenGuard::new(&shared),
                    };
                    if tls {
                        crate::tls::serve_tls(shared, stream, peer, preview, slot, crate::handler::handle).await;
                    } else {
                        serve(shared, stream, peer, preview, slot, crate::handler::handle).await;
                    }
                });
            }
            Err(e) => {
                // Out of file descriptors and similar: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
