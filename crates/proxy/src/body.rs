//! The response body handed to the client: either a short message made by the proxy, or the
//! upstream's body streamed through frame by frame, never buffered.
//!
//! An upstream body carries the request's accounting with it: the request counts as in flight
//! (for its colour's drain and its instance's load) until the last frame has passed, and the
//! upstream connection goes back to the worker's pool only if the body was read to its end.
//! When the colour's drain deadline fires mid-stream the body ends with an error, which makes
//! the server cut the client's stream (HTTP/1: close the connection; HTTP/2: reset the stream).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio_util::sync::WaitForCancellationFutureOwned;

use crate::table::{GenerationGuard, InstanceState};
use crate::upstream::{self, Sender};

/// Error of a streamed body: the upstream failed, or the drain deadline cut the stream.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("upstream body: {0}")]
    Upstream(#[from] hyper::Error),
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
    pub(crate) body: Incoming,
    pub(crate) gen: GenerationGuard,
    pub(crate) _instance: InstanceGuard,
    /// The connection the body arrives on, with the instance it belongs to and the pool limit.
    pub(crate) conn: Option<(u64, Sender, usize)>,
    /// Created only when the body has to wait for the upstream, so that short responses never
    /// register with the drain token.
    pub(crate) deadline: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
}

pub struct ProxyBody {
    inner: Inner,
}

enum Inner {
    Full(Option<Bytes>),
    Stream(Box<Streaming>),
    Done,
}

impl ProxyBody {
    pub fn full(data: impl Into<Bytes>) -> ProxyBody {
        let data = data.into();
        ProxyBody { inner: if data.is_empty() { Inner::Done } else { Inner::Full(Some(data)) } }
    }

    pub fn empty() -> ProxyBody {
        ProxyBody { inner: Inner::Done }
    }

    pub(crate) fn streaming(s: Streaming) -> ProxyBody {
        if s.body.is_end_stream() {
            // Nothing to stream (204, 304, HEAD, empty body): settle the accounting now.
            finish(s);
            return ProxyBody::empty();
        }
        ProxyBody { inner: Inner::Stream(Box::new(s)) }
    }
}

/// The body was read to its end: the connection is reusable.
fn finish(mut s: Streaming) {
    if let Some((id, tx, max)) = s.conn.take() {
        upstream::checkin(id, tx, max);
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
            Inner::Stream(s) => {
                if s.gen.gen.deadline.is_cancelled() {
                    this.inner = Inner::Done;
                    return Poll::Ready(Some(Err(BodyError::DrainDeadline)));
                }
                match Pin::new(&mut s.body).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        if s.body.is_end_stream() {
                            if let Inner::Stream(s) = std::mem::replace(&mut this.inner, Inner::Done) {
                                finish(*s);
                            }
                        }
                        Poll::Ready(Some(Ok(frame)))
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
                        let deadline = s
                            .deadline
                            .get_or_insert_with(|| Box::pin(s.gen.gen.deadline.clone().cancelled_owned()));
                        if deadline.as_mut().poll(cx).is_ready() {
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
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Done => SizeHint::with_exact(0),
            Inner::Full(d) => SizeHint::with_exact(d.as_ref().map_or(0, |d| d.len() as u64)),
            Inner::Stream(s) => s.body.size_hint(),
        }
    }
}
