//! The response body handed to the client: either a short message made by the proxy, or the
//! upstream's body streamed through frame by frame, never buffered.
//!
//! An upstream body carries the request's accounting with it: the request counts as in flight
//! (for its colour's drain and its instance's load) until the last frame has passed, and the
//! upstream connection goes back to the worker's pool only if the body was read to its end.
//! When the colour's drain deadline fires mid-stream, the body goes on until an instant drawn at
//! random over the drain's close window (as upgraded connections do, so that clients such as
//! EventSource do not all reconnect at once), then ends with an error, which makes the server
//! cut the client's stream (HTTP/1: close the connection; HTTP/2: reset the stream).

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::deadline::Registration;
use crate::h1::{Conn, Framing};
use crate::table::{GenerationGuard, InstanceState};
use crate::upstream;

/// Error of a streamed body: the upstream failed, or the drain deadline cut the stream.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("upstream body: {0}")]
    Upstream(#[from] std::io::Error),
    #[error("stream cut at the drain deadline")]
    DrainDeadline,
}

/// Counts a request against its instance's load until dropped.
pub(crate) struct InstanceGuard(pub(crate) Arc<InstanceState>);

impl InstanceGuard {
    pub(crate) fn new(state: &Arc<InstanceState>) -> InstanceGuard {
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        InstanceGuard(state.clone())
    }
}

impl Drop for InstanceGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Everything a streamed response holds on to until its end.
pub(crate) struct Streaming {
    /// The upstream connection the body arrives on, owned until the body ends.
    pub(crate) conn: Conn,
    pub(crate) framing: Framing,
    /// The connection may carry another request once this body is read to its end.
    pub(crate) reusable: bool,
    /// The instance the connection belongs to and the pool limit, for the check-in.
    pub(crate) instance_id: u64,
    pub(crate) pool_size: usize,
    pub(crate) gen: GenerationGuard,
    pub(crate) _instance: InstanceGuard,
    /// Marks the response as streaming on the client connection until the body ends.
    pub(crate) _responding: crate::conn::Responding,
    /// Registered only when the body has to wait for the upstream, so that short responses never
    /// touch the drain registry.
    pub(crate) deadline: Registration,
    /// Once the drain deadline has passed: when this stream is cut.
    pub(crate) cut_at: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Streaming {
    /// Whether the stream's instant to be cut has come. The first time it finds the drain
    /// deadline passed, it draws that instant within the close window and arms its timer.
    fn cut_due(&mut self, cx: &mut Context<'_>) -> bool {
        if self.cut_at.is_none() {
            if !self.gen.gen.expired.load(Ordering::Acquire) {
                return false;
            }
            // The instant is drawn over the window from the deadline, not from now: a stream
            // polled only later (its client had stopped reading) whose instant has passed is cut
            // at once.
            let gen = &self.gen.gen;
            let window = gen.close_window_ms.load(Ordering::Relaxed).max(1);
            let at = gen.expired_at_ms.load(Ordering::Relaxed) + crate::headers::random_u64() % window;
            let left = std::time::Duration::from_millis(at.saturating_sub(crate::table::now_ms()));
            if left.is_zero() {
                return true;
            }
            self.cut_at = Some(Box::pin(tokio::time::sleep_until(crate::clock::instant_in(left))));
        }
        self.cut_at
            .as_mut()
            .is_some_and(|t| std::future::Future::poll(t.as_mut(), cx).is_ready())
    }
}

pub struct ProxyBody {
    inner: Inner,
}

enum Inner {
    Full(Option<Bytes>),
    Stream(Box<Streaming>),
    /// A body from hyper's client (`crate::hyper_upstream`).
    #[cfg(feature = "hyper-upstream")]
    Hyper(Box<crate::hyper_upstream::Streaming>),
    Done,
}

impl ProxyBody {
    pub fn full(data: impl Into<Bytes>) -> ProxyBody {
        let data = data.into();
        ProxyBody {
            inner: if data.is_empty() {
                Inner::Done
            } else {
                Inner::Full(Some(data))
            },
        }
    }

    pub fn empty() -> ProxyBody {
        ProxyBody { inner: Inner::Done }
    }

    #[cfg(feature = "hyper-upstream")]
    pub(crate) fn hyper(s: crate::hyper_upstream::Streaming) -> ProxyBody {
        ProxyBody {
            inner: Inner::Hyper(Box::new(s)),
        }
    }

    pub(crate) fn streaming(s: Streaming) -> ProxyBody {
        if s.framing == Framing::Empty {
            // Nothing to stream (204, 304, HEAD, empty body): settle the accounting now.
            finish(s);
            return ProxyBody::empty();
        }
        ProxyBody {
            inner: Inner::Stream(Box::new(s)),
        }
    }
}

/// The body was read to its end: the connection goes back to the pool if the upstream keeps it
/// open, and the request stops counting as in flight.
///
/// A request counted in a draining generation closes its connection instead: the drain closes
/// the colour's idle connections once the generation is empty (see `drain`), and one pooled
/// after that would stay open until the idle timeout. Requests entering the colour afterwards
/// (preview traffic, or live traffic after a rollback) count in the new generation and pool as
/// usual.
fn finish(s: Streaming) {
    if s.reusable && s.conn.buf.is_empty() && !s.gen.gen.is_draining() {
        upstream::checkin(s.instance_id, s.conn, s.pool_size);
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        match &mut this.inner {
            Inner::Done => Poll::Ready(None),
            Inner::Full(data) => {
                let frame = data.take().map(|d| Ok(Frame::data(d)));
                this.inner = Inner::Done;
                Poll::Ready(frame)
            }
            #[cfg(feature = "hyper-upstream")]
            Inner::Hyper(s) => {
                let r = s.poll_data(cx);
                match &r {
                    // hyper's server stops polling a body once it has its declared length: the
                    // last data frame ends it.
                    Poll::Ready(Some(Ok(_))) if s.is_end_stream() => {
                        if let Inner::Hyper(s) = std::mem::replace(&mut this.inner, Inner::Done) {
                            s.finish();
                        }
                    }
                    Poll::Ready(None) => {
                        if let Inner::Hyper(s) = std::mem::replace(&mut this.inner, Inner::Done) {
                            s.finish();
                        }
                    }
                    Poll::Ready(Some(Err(_))) => this.inner = Inner::Done,
                    _ => {}
                }
                r
            }
            Inner::Stream(s) => {
                if s.cut_due(cx) {
                    this.inner = Inner::Done;
                    return Poll::Ready(Some(Err(BodyError::DrainDeadline)));
                }
                let Streaming { conn, framing, .. } = &mut **s;
                match conn.poll_body(framing, cx) {
                    Poll::Ready(Some(Ok(data))) => {
                        if s.framing == Framing::Empty || s.framing == Framing::Length(0) {
                            if let Inner::Stream(s) = std::mem::replace(&mut this.inner, Inner::Done) {
                                finish(*s);
                            }
                        }
                        Poll::Ready(Some(Ok(Frame::data(data))))
                    }
                    Poll::Ready(Some(Err(e))) => {
                        // The connection is broken: dropped with the state, never pooled.
                        this.inner = Inner::Done;
                        Poll::Ready(Some(Err(BodyError::Upstream(e))))
                    }
                    Poll::Ready(None) => {
                        if let Inner::Stream(s) = std::mem::replace(&mut this.inner, Inner::Done) {
                            finish(*s);
                        }
                        Poll::Ready(None)
                    }
                    Poll::Pending => {
                        // Woken at the deadline (registered only now: a body that never waits
                        // never registers), then by its own timer.
                        if s.cut_at.is_none() && s.deadline.poll_expired(&s.gen.gen, cx).is_pending() {
                            return Poll::Pending;
                        }
                        if s.cut_due(cx) {
                            this.inner = Inner::Done;
                            return Poll::Ready(Some(Err(BodyError::DrainDeadline)));
                        }
                        Poll::Pending
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Done => true,
            Inner::Full(d) => d.is_none(),
            Inner::Stream(_) => false,
            #[cfg(feature = "hyper-upstream")]
            Inner::Hyper(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Done => SizeHint::with_exact(0),
            Inner::Full(d) => SizeHint::with_exact(d.as_ref().map_or(0, |d| d.len() as u64)),
            Inner::Stream(s) => match s.framing {
                Framing::Length(n) => SizeHint::with_exact(n),
                _ => SizeHint::default(),
            },
            #[cfg(feature = "hyper-upstream")]
            Inner::Hyper(s) => s.size_hint(),
        }
    }
}
