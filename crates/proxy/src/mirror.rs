//! Mirroring: copies of a sample of a service's live requests, sent to the colour being validated
//! while the release on it waits to be promoted. Their answers are counted (status class, time
//! to the response head) beside the answers of the live requests they copy, and thrown away.
//!
//! A copy never holds up the live request it copies: the request is sampled after it is routed
//! and its head encoded, and the copy runs in a task of its own on the same worker, with the
//! worker's upstream connections. At most `max_in_flight` copies run at once; a sampled request
//! that finds every slot taken is not copied and is counted as dropped, so a slow or stuck colour
//! costs the live traffic nothing but those counts. Only requests of the listed methods that
//! carry no body and ask for no upgrade are copied, each with `X-Cutover-Mirror: 1`, so that the
//! application can tell a copy from a user's request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Method;
use http_body::Body;
use tokio::sync::Semaphore;

use crate::body::{ProxyBody, Streaming};
use crate::shared::Shared;
use crate::stats::{ColourStats, StatsSnapshot};
use crate::table::{Colour, RouteTable};

/// The header every copy carries (a client's own is removed from every request).
pub const X_CUTOVER_MIRROR: &str = "x-cutover-mirror";

/// One mirroring window of one service: what is copied, to where, and what came of it.
pub struct Mirror {
    /// The colour that gets the copies: the one being validated, never the live one.
    to: Colour,
    /// A request is copied when a draw below one million falls under this.
    per_million: u64,
    methods: Box<[Method]>,
    slots: Arc<Semaphore>,
    /// The live requests that were copied, as they were answered on the live colour.
    live: ColourStats,
    /// Their copies' answers; a copy that got none counts as the 5xx the proxy would have given.
    copies: ColourStats,
    dropped: AtomicU64,
}

impl std::fmt::Debug for Mirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mirror")
            .field("to", &self.to)
            .field("per_million", &self.per_million)
            .field("methods", &self.methods)
            .finish_non_exhaustive()
    }
}

/// What a mirroring window saw so far.
#[derive(Clone, Debug)]
pub struct MirrorReport {
    /// The live requests that were copied, answered by the live colour.
    pub live: StatsSnapshot,
    /// Their copies, answered by the mirrored colour.
    pub copies: StatsSnapshot,
    /// Sampled requests not copied because `max_in_flight` copies were running.
    pub dropped: u64,
}

impl Mirror {
    /// Copies `sample` (0 to 1) of the live requests of `methods` to `to`, at most
    /// `max_in_flight` at once (at least 1).
    pub fn new(to: Colour, sample: f64, methods: &[Method], max_in_flight: usize) -> Mirror {
        let sample = if sample.is_finite() {
            sample.clamp(0.0, 1.0)
        } else {
            0.0
        };
        Mirror {
            to,
            per_million: (sample * 1_000_000.0).round() as u64,
            methods: methods.into(),
            slots: Arc::new(Semaphore::new(max_in_flight.max(1))),
            live: ColourStats::default(),
            copies: ColourStats::default(),
            dropped: AtomicU64::new(0),
        }
    }

    /// The colour the copies go to.
    pub fn to(&self) -> Colour {
        self.to
    }

    pub fn report(&self) -> MirrorReport {
        MirrorReport {
            live: self.live.snapshot(),
            copies: self.copies.snapshot(),
            dropped: self.dropped.load(Ordering::Relaxed),
        }
    }

    /// Whether a live request (routed to `live`, without body or upgrade) is to be copied.
    pub(crate) fn samples(&self, method: &Method, live: Colour) -> bool {
        live != self.to && self.methods.contains(method) && crate::headers::random_u64() % 1_000_000 < self.per_million
    }

    /// Counts the answer of a live request that was copied.
    pub(crate) fn record_live(&self, status: u16, elapsed: Duration) {
        self.live.record(status, elapsed);
    }
}

/// Sends a copy of a live request whose upstream head is `head` (ending with its blank line) to
/// the mirror's colour of service `service` of `table`, in a task of its own. False when no slot
/// was free (the request is counted as dropped) or the colour is being drained.
pub(crate) fn copy(
    mirror: &Arc<Mirror>,
    shared: &Arc<Shared>,
    table: &Arc<RouteTable>,
    service: usize,
    head: &[u8],
    head_request: bool,
) -> bool {
    let Some(svc) = table.services().get(service) else {
        return false;
    };
    let pool = svc.pool(mirror.to);
    let Ok(permit) = mirror.slots.clone().try_acquire_owned() else {
        mirror.dropped.fetch_add(1, Ordering::Relaxed);
        pool.state.mirror_dropped.fetch_add(1, Ordering::Relaxed);
        return false;
    };
    let gen = pool.generation.enter_request();
    if gen.gen.is_draining() {
        return false;
    }
    let Some(end) = head.len().checked_sub(2) else {
        return false;
    };
    let mut bytes = Vec::with_capacity(head.len() + 24);
    bytes.extend_from_slice(&head[..end]);
    bytes.extend_from_slice(X_CUTOVER_MIRROR.as_bytes());
    bytes.extend_from_slice(b": 1\r\n\r\n");
    let (mirror, shared, table) = (mirror.clone(), shared.clone(), table.clone());
    tokio::spawn(async move {
        let _permit = permit;
        let cfg = &shared.config;
        let svc = &table.services()[service];
        let pool = svc.pool(mirror.to);
        let started = Instant::now();
        let req = crate::handler::Outgoing {
            head: &bytes,
            body: None,
            framing: crate::headers::BodyFraming::None,
            replayable: true,
            head_request,
        };
        let sent = crate::handler::send(
            cfg,
            &svc.name,
            pool,
            mirror.to,
            svc.balance,
            svc.upstream_tls.as_deref(),
            req,
        );
        let (status, elapsed, body) = match tokio::time::timeout(cfg.upstream_timeout, sent).await {
            Ok(Ok(sent)) => {
                let status = sent.head.status.as_u16();
                let body = ProxyBody::streaming(Streaming {
                    conn: sent.conn,
                    framing: sent.head.framing,
                    reusable: sent.head.keep_alive,
                    instance_id: sent.instance_id,
                    pool_size: cfg.upstream_pool_size,
                    gen,
                    _instance: sent.instance,
                    _responding: crate::conn::Responding::new(&Arc::default()),
                    deadline: Default::default(),
                    cut_at: None,
                });
                (status, started.elapsed(), Some(body))
            }
            Ok(Err(e)) => (e.status().as_u16(), started.elapsed(), None),
            Err(_) => (504, started.elapsed(), None),
        };
        mirror.copies.record(status, elapsed);
        pool.state.mirrored.record(status, elapsed);
        // Read to its end, so that the connection serves the next request or copy.
        if let Some(mut body) = body {
            let read = std::future::poll_fn(|cx| {
                while let Some(frame) = std::task::ready!(std::pin::Pin::new(&mut body).poll_frame(cx)) {
                    if frame.is_err() {
                        break;
                    }
                }
                std::task::Poll::Ready(())
            });
            let _ = tokio::time::timeout(cfg.upstream_timeout, read).await;
        }
    });
    true
}

/// Copies of one colour since the proxy started, for metrics: their answers, and the sampled
/// requests dropped for want of a slot.
#[derive(Clone, Debug)]
pub struct MirrorTotals {
    pub copies: StatsSnapshot,
    pub dropped: u64,
}

impl crate::table::Pool {
    /// Copies this colour was sent by mirroring since the proxy started.
    pub fn mirror_totals(&self) -> MirrorTotals {
        MirrorTotals {
            copies: self.state.mirrored.snapshot(),
            dropped: self.state.mirror_dropped.load(Ordering::Relaxed),
        }
    }
}
