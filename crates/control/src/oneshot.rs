//! One HTTP/1.1 request on a fresh connection, judged by its status: what health checks and
//! webhook deliveries both do. Failures come back as short reasons for logs and events.

use bytes::Bytes;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

/// Sends `request` on `stream` (a TCP connection, or TLS over one, with `TCP_NODELAY` set by the
/// caller) and waits for the response head: `Ok` for a 2xx, otherwise the reason. The connection
/// is driven here, not spawned, so dropping this future (a timeout) drops the socket with it.
pub(crate) async fn exchange<S, B>(stream: S, request: http::Request<B>) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| hyper_reason(&e))?;
    let mut conn = std::pin::pin!(conn);
    let mut send = std::pin::pin!(sender.send_request(request));
    let response = tokio::select! {
        biased;
        response = &mut send => response,
        // The connection ended (it closes after the answer, or failed): the request's outcome is
        // decided either way, so collect it rather than racing it.
        _ = &mut conn => send.await,
    }
    .map_err(|e| hyper_reason(&e))?;
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("answered {status}"))
    }
}

pub(crate) fn io_reason(e: &std::io::Error) -> String {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::ConnectionRefused => "connection refused".to_string(),
        ErrorKind::ConnectionReset => "connection reset".to_string(),
        ErrorKind::ConnectionAborted => "connection aborted".to_string(),
        ErrorKind::BrokenPipe => "connection closed while sending".to_string(),
        _ => e.to_string(),
    }
}

fn hyper_reason(e: &hyper::Error) -> String {
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return io_reason(io);
        }
        source = err.source();
    }
    if e.is_incomplete_message() {
        "connection closed before an answer".to_string()
    } else {
        e.to_string()
    }
}
