//! Listeners, workers and client connections; the `Proxy` handle the control plane drives.
//!
//! `workers` threads each run a single-threaded tokio runtime with their own accept socket per
//! listener (`SO_REUSEPORT`, so the kernel spreads connections) and their own upstream pools:
//! a connection is accepted, served and its upstream requests made on one thread, with no
//! cross-thread hand-off on the request path.
//!
//! Shutdown: `shutdown()` stops the accept loops and asks every connection to finish its current
//! request and close (HTTP/1) or to send GOAWAY (HTTP/2); tunnels (upgraded connections) close
//! at random instants over the first half of `shutdown_timeout` less their closing grace (see
//! `tunnel`). Each worker waits for its
//! connections and tunnels up to `shutdown_timeout` before its runtime is dropped, which closes
//! whatever is left.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::header::HeaderValue;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::config::ProxyConfig;
use crate::error::TableError;
use crate::handler::{self, ConnCtx};
use crate::pass::{Hold, Side};
use crate::table::{Colour, Generation, RouteTable};

pub(crate) struct Shared {
    pub(crate) table: ArcSwap<RouteTable>,
    pub(crate) config: ProxyConfig,
    /// Cancelled when the proxy begins to shut down.
    pub(crate) shutdown: CancellationToken,
    /// One per worker: generations whose drain deadline passed (see `deadline`).
    expired_tx: Vec<tokio::sync::mpsc::UnboundedSender<Arc<Generation>>>,
    conn_limit: Arc<Semaphore>,
    /// Client connections and upgraded tunnels still open, over all workers.
    open: AtomicUsize,
    open_changed: Notify,
}

/// What a client connection holds from its accept to its end, including the life of a tunnel
/// it became after an upgrade: its place under `max_connections` and its count for shutdown.
pub(crate) struct ConnSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    _open: OpenGuard,
}

/// Counts one open connection (or the tunnel it became) in `Shared::open` until dropped.
struct OpenGuard(Arc<Shared>);

impl OpenGuard {
    fn new(shared: &Arc<Shared>) -> OpenGuard {
        shared.open.fetch_add(1, Ordering::AcqRel);
        OpenGuard(shared.clone())
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.open_changed.notify_waiters();
        }
    }
}

/// What the watchdog of a client connection looks at.
#[derive(Default)]
pub(crate) struct Activity {
    /// Set by every read or write that completes; cleared by the watchdog when it looks.
    io: AtomicBool,
    requests: AtomicUsize,
    /// Responses whose body is still streaming to the client.
    responses: AtomicUsize,
    /// HTTP/1: set when bytes arrive while no request is in flight and no response is
    /// streaming, i.e. the head of the next request has begun; cleared when that request starts.
    head: AtomicBool,
    /// HTTP/2: a header block (or a frame header) has begun and is not complete yet.
    block: AtomicBool,
    /// The last write to the client found its socket full. HTTP/2 stops reading frames while it
    /// cannot write, so a header block may then sit whole but unread in the socket.
    write_waiting: AtomicBool,
    /// How many heads (HTTP/2: header blocks) have begun, so that the watchdog tells one from
    /// the next.
    heads_begun: AtomicU32,
}

pub(crate) struct RequestBusy<'a>(&'a Activity);

impl Activity {
    pub(crate) fn request(&self) -> RequestBusy<'_> {
        self.head.store(false, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        RequestBusy(self)
    }

    /// The number of the request head (HTTP/2: header block) that has begun to arrive and is
    /// not complete yet.
    fn head_pending(&self) -> Option<u32> {
        (self.head.load(Ordering::Relaxed) || self.block.load(Ordering::Relaxed))
            .then(|| self.heads_begun.load(Ordering::Relaxed))
    }

    /// Whether a read or write completed since the last look.
    fn moved_since_last_look(&self) -> bool {
        self.io.swap(false, Ordering::Relaxed)
    }
}

impl Drop for RequestBusy<'_> {
    fn drop(&mut self) {
        self.0.requests.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a response as streaming on its client connection until dropped (it travels with the
/// body): bytes the client sends meanwhile (a pipelined request) do not start a head's clock,
/// which could otherwise run out before the response ends and the next request can start.
pub(crate) struct Responding(Arc<Activity>);

impl Responding {
    pub(crate) fn new(activity: &Arc<Activity>) -> Responding {
        activity.responses.fetch_add(1, Ordering::Relaxed);
        Responding(activity.clone())
    }
}

impl Drop for Responding {
    fn drop(&mut self) {
        self.0.responses.fetch_sub(1, Ordering::Relaxed);
    }
}

/// HTTP/2: where the client's bytes stand among its frames, so that a header block is timed
/// from its first byte as an HTTP/1 head is. Only frame boundaries are followed (the 9-byte frame
/// headers); nothing is decoded, and a frame's payload is skipped without being looked at.
struct H2Frames {
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
    open: bool,
    opened: u32,
}

impl H2Frames {
    const HEADERS: u8 = 0x1;
    const CONTINUATION: u8 = 0x9;
    const END_HEADERS: u8 = 0x4;

    fn new() -> H2Frames {
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
    fn feed(&mut self, mut bytes: &[u8]) {
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

/// A client socket that notes every read and write for the watchdog.
struct Tracked {
    stream: TcpStream,
    activity: Arc<Activity>,
    /// HTTP/1: bytes that arrive between requests begin a request head.
    heads: bool,
    /// HTTP/2: the frames the client's bytes are in.
    frames: Option<Box<H2Frames>>,
    /// Holds each write to the end of the worker's pass (`crate::pass`).
    hold: Hold,
    /// The last write did not all fit into the socket: what follows is bulk data, sent as the
    /// socket takes it, not held.
    backed_up: bool,
    /// The last write found the socket full (mirrored in `Activity::write_waiting`).
    waiting: bool,
}

impl Tracked {
    fn poll_send(
        &mut self,
        cx: &mut Context<'_>,
        len: usize,
        write: impl FnOnce(Pin<&mut TcpStream>, &mut Context<'_>) -> Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        if !self.backed_up {
            ready!(self.hold.poll_release(Side::Client, cx));
        }
        let r = write(Pin::new(&mut self.stream), cx);
        self.backed_up = match &r {
            Poll::Ready(Ok(n)) => *n < len,
            Poll::Ready(Err(_)) => false,
            Poll::Pending => true,
        };
        if r.is_ready() {
            self.activity.io.store(true, Ordering::Relaxed);
        }
        if r.is_pending() != self.waiting {
            self.waiting = r.is_pending();
            self.activity.write_waiting.store(self.waiting, Ordering::Relaxed);
        }
        r
    }
}

impl AsyncRead for Tracked {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.stream).poll_read(cx, buf);
        if r.is_ready() {
            let a = &this.activity;
            a.io.store(true, Ordering::Relaxed);
            if this.heads
                && buf.filled().len() > before
                && !a.head.load(Ordering::Relaxed)
                && a.requests.load(Ordering::Relaxed) == 0
                && a.responses.load(Ordering::Relaxed) == 0
            {
                a.heads_begun.fetch_add(1, Ordering::Relaxed);
                a.head.store(true, Ordering::Relaxed);
            }
            if let Some(frames) = &mut this.frames {
                frames.feed(&buf.filled()[before..]);
                a.heads_begun.store(frames.opened, Ordering::Relaxed);
                a.block.store(frames.open, Ordering::Relaxed);
            }
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.get_mut().poll_send(cx, buf.len(), |s, cx| s.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let len = bufs.iter().map(|b| b.len()).sum();
        self.get_mut()
            .poll_send(cx, len, |s, cx| s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// A proxy could not start; nothing was left running.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source} (is another process using the port?)")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("cannot start worker thread: {0}")]
    Thread(io::Error),
    #[error("invalid proxy settings: {0}")]
    Config(String),
}

/// What a drain saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainReport {
    /// Time from the start of the drain until the colour was empty (or the cuts were done).
    pub elapsed: Duration,
    /// True when every request and upgraded connection finished before the deadline.
    pub completed: bool,
    /// Requests still in flight at the deadline (answered 504 or cut mid-stream).
    pub cut_requests: usize,
    /// Upgraded connections still open at the deadline (closed within the window).
    pub closed_upgrades: usize,
}

/// A running proxy. Cheap to share behind an `Arc`; every method is safe to call from any thread.
pub struct Proxy {
    shared: Arc<Shared>,
    addrs: Vec<SocketAddr>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    /// Serializes table updates (read-modify-write); the request path never touches it.
    update: Mutex<()>,
}

/// Binds a listening socket. The TCP settings of [`set_liveness`] made here are inherited by
/// every connection it accepts, so they cost nothing per connection.
fn bind(addr: SocketAddr, reuse_port: bool, config: &ProxyConfig) -> io::Result<std::net::TcpListener> {
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

impl Proxy {
    #[cfg(test)]
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Binds every listener (once per worker) and starts the workers. Fails, with nothing left
    /// running, when any address cannot be bound.
    pub fn start(config: ProxyConfig, table: RouteTable) -> Result<Proxy, StartError> {
        if config.workers == 0 {
            return Err(StartError::Config("workers must be at least 1".into()));
        }
        if config.max_header_bytes < 1024 {
            return Err(StartError::Config("max_header_bytes must be at least 1024".into()));
        }
        crate::limits::fit_descriptors(config.max_connections)?;
        let workers = config.workers;
        let reuse = workers > 1;
        // listeners[w] = the sockets of worker w, one per configured listener.
        let mut per_worker: Vec<Vec<(std::net::TcpListener, bool)>> = (0..workers).map(|_| Vec::new()).collect();
        let mut addrs = Vec::new();
        for l in &config.listeners {
            let first = bind(l.addr, reuse, &config).map_err(|source| StartError::Bind { addr: l.addr, source })?;
            let actual = first
                .local_addr()
                .map_err(|source| StartError::Bind { addr: l.addr, source })?;
            addrs.push(actual);
            per_worker[0].push((first, l.preview));
            for w in per_worker.iter_mut().skip(1) {
                let s = bind(actual, true, &config).map_err(|source| StartError::Bind { addr: actual, source })?;
                w.push((s, l.preview));
            }
        }

        let (expired_tx, mut expired_rx): (Vec<_>, Vec<_>) =
            (0..workers).map(|_| tokio::sync::mpsc::unbounded_channel()).unzip();
        let shared = Arc::new(Shared {
            expired_tx,
            table: ArcSwap::from_pointee(table),
            conn_limit: Arc::new(Semaphore::new(config.max_connections.max(1))),
            config,
            shutdown: CancellationToken::new(),
            open: AtomicUsize::new(0),
            open_changed: Notify::new(),
        });

        let mut handles = Vec::new();
        for (i, listeners) in per_worker.into_iter().enumerate() {
            let worker_shared = shared.clone();
            let rx = expired_rx.remove(0);
            let h = std::thread::Builder::new()
                .name(format!("cutover-worker-{i}"))
                .spawn(move || worker(worker_shared, listeners, rx));
            match h {
                Ok(h) => handles.push(h),
                Err(e) => {
                    shared.shutdown.cancel();
                    for h in handles {
                        let _ = h.join();
                    }
                    return Err(StartError::Thread(e));
                }
            }
        }
        Ok(Proxy {
            shared,
            addrs,
            workers: Mutex::new(handles),
            update: Mutex::new(()),
        })
    }

    /// The bound addresses, in the order of `ProxyConfig::listeners` (useful with port 0).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// The table requests are routed with right now.
    pub fn table(&self) -> Arc<RouteTable> {
        self.shared.table.load_full()
    }

    /// Replaces the table by `f(current)`. Updates are serialized; when `f` fails nothing changes.
    pub fn update<F>(&self, f: F) -> Result<Arc<RouteTable>, TableError>
    where
        F: FnOnce(&RouteTable) -> Result<RouteTable, TableError>,
    {
        let _serial = self.update.lock().unwrap_or_else(|p| p.into_inner());
        let next = Arc::new(f(&self.shared.table.load())?);
        self.shared.table.store(next.clone());
        Ok(next)
    }

    /// Makes `to` the live colour of `service` in one store. Requests already routed keep their
    /// colour; every request whose head arrives after this returns goes to `to`.
    pub fn switch(&self, service: &str, to: Colour) -> Result<(), TableError> {
        self.update(|t| {
            t.with_service(service, |s| {
                s.active = to;
                Ok(())
            })
        })
        .map(|_| ())
    }

    /// Waits until the requests and upgraded connections that entered `colour` of `service`
    /// before this call have finished, for at most `timeout`. At the deadline, requests still
    /// waiting for their upstream get 504, streams are cut, and upgraded connections are closed
    /// at random instants spread over `close_window`. Dropping the returned future before the
    /// deadline abandons the drain without cutting anything.
    pub async fn drain(
        &self,
        service: &str,
        colour: Colour,
        timeout: Duration,
        close_window: Duration,
    ) -> Result<DrainReport, TableError> {
        let start = Instant::now();
        // Rotate the colour to a fresh generation: whatever enters from now on (preview traffic,
        // or live traffic after a rollback) is not this drain's business.
        let mut old: Option<Arc<Generation>> = None;
        self.update(|t| {
            t.with_service(service, |s| {
                let pool = s.pool_mut(colour);
                old = Some(pool.generation.clone());
                pool.generation = Arc::new(Generation::default());
                Ok(())
            })
        })?;
        let Some(old) = old else {
            unreachable!("with_service ran the closure")
        };
        old.close_window_ms.store(millis(close_window), Ordering::Relaxed);
        old.draining.store(true, Ordering::SeqCst);

        let empty = |g: &Generation| g.in_flight() == 0 && g.upgraded() == 0;
        let deadline = instant_in(timeout);
        if wait_until(&old, deadline, empty).await {
            return Ok(DrainReport {
                elapsed: start.elapsed(),
                completed: true,
                cut_requests: 0,
                closed_upgrades: 0,
            });
        }
        let cut_requests = old.in_flight();
        let closed_upgrades = old.upgraded();
        old.expired.store(true, Ordering::Release);
        for tx in &self.shared.expired_tx {
            let _ = tx.send(old.clone());
        }
        // The cuts themselves take a moment; tunnels close within the window.
        let grace = instant_in(close_window.saturating_add(Duration::from_secs(2)));
        wait_until(&old, grace, empty).await;
        Ok(DrainReport {
            elapsed: start.elapsed(),
            completed: false,
            cut_requests,
            closed_upgrades,
        })
    }

    /// Begins a graceful shutdown: no new connections; open ones finish their current request.
    pub fn shutdown(&self) {
        self.shared.shutdown.cancel();
    }

    /// Waits (blocking the thread) until every worker has stopped. Call after `shutdown`.
    pub fn join(&self) {
        let handles = std::mem::take(&mut *self.workers.lock().unwrap_or_else(|p| p.into_inner()));
        for h in handles {
            let _ = h.join();
        }
    }

    /// Client connections and upgraded tunnels open right now.
    pub fn open_connections(&self) -> usize {
        self.shared.open.load(Ordering::Acquire)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
    }
}

/// The instant `d` from now; for a duration past what an instant can hold ("for ever"), one a
/// century away.
pub(crate) fn instant_in(d: Duration) -> tokio::time::Instant {
    instant_after(tokio::time::Instant::now(), d)
}

/// `t + d`, or a century after `t` when that is past what an instant can hold.
fn instant_after(t: tokio::time::Instant, d: Duration) -> tokio::time::Instant {
    t.checked_add(d)
        .unwrap_or_else(|| t + Duration::from_secs(100 * 365 * 24 * 3600))
}

/// `d` in whole milliseconds, at most `u64::MAX`.
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Where a worker gives the kernel a chance to hand its CPU to a waiting thread (see
/// [`ProxyConfig::preempt_interval`]).
#[derive(Debug, Default)]
struct PreemptPoints {
    /// When the worker last reported its CPU time.
    last: Option<Instant>,
}

impl PreemptPoints {
    /// The worker has been through every ready event and is about to wait for more: a point
    /// unless the last one was less than [`PASS_POINT_SPACING`] (or `interval`, if shorter) ago.
    fn pass_end(&mut self, now: Instant, interval: Duration) -> bool {
        if interval.is_zero() {
            return false;
        }
        if let Some(t) = self.last {
            if now.saturating_duration_since(t) < interval.min(PASS_POINT_SPACING) {
                return false;
            }
        }
        self.last = Some(now);
        true
    }

    /// The worker is back from its wait for events, with a new pass ahead, or a pass is through
    /// and its held writes are about to go out (`crate::pass`): always a point. Before the
    /// writes, a worker whose slice is used up can be switched out before the batch instead of in
    /// the middle of it. Neither counts for the spacing of the pass-end points, so they need no
    /// state; nor do they replace them: measured in BENCHMARKS.md ("Reading the numbers"), the
    /// point before the writes gave 1-3% more req/s with the pass-end points, and none without.
    fn unspaced(interval: Duration) -> bool {
        !interval.is_zero()
    }

    /// A request starts: a point only when a whole interval went by without one, which happens
    /// when events keep arriving faster than the worker gets through them.
    fn request(&mut self, now: Instant, interval: Duration) -> bool {
        if interval.is_zero() {
            return false;
        }
        match self.last {
            Some(t) if now.saturating_duration_since(t) < interval => false,
            _ => {
                self.last = Some(now);
                true
            }
        }
    }
}

/// The shortest time between two pass-end preemption points.
///
/// Under load, passes run back to back, each a few dozen microseconds long (about 5 requests),
/// where HAProxy's passes under the same load are about this long. Measured in BENCHMARKS.md
/// ("Reading the numbers"): without the pass-start point, this spacing gave 4-7% more req/s than
/// a point at every pass end, with the same p99; with it, the two are level, and the spacing
/// saves a system call per pass. At 1 ms the p99 was up to 15% worse.
const PASS_POINT_SPACING: Duration = Duration::from_micros(250);

thread_local! {
    static PREEMPT_POINTS: std::cell::RefCell<PreemptPoints> = std::cell::RefCell::new(PreemptPoints::default());
}

/// Reads this thread's CPU time. The value is not used: reading it makes the kernel bring the
/// thread's run time up to date, and a thread past the end of its time slice, with another one
/// waiting for the CPU, is switched out on the way back from the call, without waiting for
/// the next tick.
fn report_cpu_time() {
    let _ = nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID);
}

/// Called as each request starts, with its start time.
pub(crate) fn preempt_point(now: Instant, interval: Duration) {
    if PREEMPT_POINTS.with(|p| p.borrow_mut().request(now, interval)) {
        report_cpu_time();
    }
}

/// Called when the worker is back from its wait for events, before it runs what they woke, and
/// when a pass's held writes are about to go out.
fn unspaced_point(interval: Duration) {
    if PreemptPoints::unspaced(interval) {
        report_cpu_time();
    }
}

/// Called when the worker has run out of ready tasks, before it waits for events.
fn pass_end_point(interval: Duration) {
    if PREEMPT_POINTS.with(|p| p.borrow_mut().pass_end(Instant::now(), interval)) {
        report_cpu_time();
    }
}

/// Waits on the generation's notifications until `done` holds or the deadline passes.
async fn wait_until(g: &Generation, deadline: tokio::time::Instant, done: impl Fn(&Generation) -> bool) -> bool {
    loop {
        let notified = g.idle.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if done(g) {
            return true;
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return done(g);
        }
    }
}

/// How many tasks a worker may run before it looks for new events without waiting.
///
/// tokio's default is 61. Under load, a worker rarely runs out of ready tasks before 61 runs, so it
/// would pick up new events in the middle of a pass, without parking: the pass never ends, the
/// pass-end preemption point (`on_thread_park`) is skipped, and the kernel gets its chance to
/// switch only at the per-request points, after `preempt_interval`. One wait makes at most
/// [`EVENTS_PER_PASS`] sockets ready, each waking one task, so a pass normally ends by running out
/// of tasks and parking well before this many runs. The limit matters only when tasks keep
/// waking one another: after this many runs (a millisecond or two, at a few microseconds each)
/// the worker still picks up timers and new events. Measured in BENCHMARKS.md ("Reading the
/// numbers").
const TASKS_PER_PASS: u32 = 256;

/// How many ready sockets a worker takes from the kernel at a time (tokio's default is 1024).
///
/// A pass normally sees a few dozen. After the worker was kept off its CPU for a while, though,
/// every connection is ready at once, and a pass over all of them holds up every thread queued
/// for this CPU (clients, the upstream) for its whole length. Taking at most this many
/// splits such a burst into several passes, each ending with a preemption point;
/// sockets left over stay ready in the kernel for the next wait. A shorter pass costs one more
/// `epoll_wait` and CPU-time read per pass, well under a microsecond per request. Measured in
/// BENCHMARKS.md ("Reading the numbers"): at 64 connections, 48 gave a p99 4-6% lower than
/// 1024, and 16 another 5-7% lower than 48, each with slightly more req/s. At 1,000 connections
/// neither changed req/s or p99 beyond the noise.
const EVENTS_PER_PASS: usize = 16;

fn worker(
    shared: Arc<Shared>,
    listeners: Vec<(std::net::TcpListener, bool)>,
    expired: tokio::sync::mpsc::UnboundedReceiver<Arc<Generation>>,
) {
    let preempt_interval = shared.config.preempt_interval;
    let rt = tokio::runtime::Builder::new_current_thread()
        .event_interval(TASKS_PER_PASS)
        .max_io_events_per_tick(EVENTS_PER_PASS)
        .enable_all()
        // Called when the run queue is empty, before the worker waits for events.
        .on_thread_park(move || pass_end_point(preempt_interval))
        // Called when the wait returns.
        .on_thread_unpark(move || {
            crate::pass::pass_start();
            unspaced_point(preempt_interval)
        })
        .build();
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot build worker runtime; stopping the proxy");
            shared.shutdown.cancel();
            return;
        }
    };
    rt.block_on(async move {
        // First, so that it is in place before anything writes.
        tokio::spawn(crate::pass::flusher(move || unspaced_point(preempt_interval)));
        tokio::spawn(crate::deadline::wake_expired(expired));
        for (std_listener, preview) in listeners {
            match TcpListener::from_std(std_listener) {
                Ok(l) => {
                    tokio::spawn(accept_loop(shared.clone(), l, preview));
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot register listener; stopping the proxy");
                    shared.shutdown.cancel();
                }
            }
        }
        let sweep_every =
            (shared.config.upstream_idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
        let idle = shared.config.upstream_idle_timeout;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(sweep_every);
            loop {
                tick.tick().await;
                crate::upstream::sweep(idle);
            }
        });
        shared.shutdown.cancelled().await;
        // Connections see the same token and close themselves; wait for them, bounded.
        let deadline = instant_in(shared.config.shutdown_timeout);
        loop {
            let changed = shared.open_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if shared.open.load(Ordering::Acquire) == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                break;
            }
        }
    });
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, preview: bool) {
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
                    serve(shared, stream, peer, preview, slot).await;
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

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Tells HTTP/2 prior knowledge from HTTP/1 by the first bytes, without consuming them.
///
/// A client may send the preface a byte at a time, so a prefix of it ("P", "PR", ...) leaves the
/// question open. Peeking does not consume, so the socket stays readable and a plain
/// `peek().await` would return at once with the same bytes: the peek runs inside `try_io`, which
/// clears the readiness when the bytes settle nothing, so the task sleeps until more arrive. The
/// clearing is tied to the readiness event the peek saw, so bytes that arrive in between still
/// wake it. A connection that sent a prefix and then its FIN stays readable forever: it can
/// never become HTTP/2, so it is handed to HTTP/1, which answers it.
async fn sniff_h2(stream: &TcpStream) -> io::Result<bool> {
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
                return Ok(false);
            }
            if n == H2_PREFACE.len() {
                return Ok(true);
            }
            if ready.is_read_closed() {
                return Ok(false);
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

/// A server connection that can be asked to finish gracefully.
trait Graceful: Future<Output = Result<(), hyper::Error>> {
    fn graceful(self: Pin<&mut Self>);
}

impl<I, S, B> Graceful for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn graceful(self: Pin<&mut Self>) {
        self.graceful_shutdown()
    }
}

impl<I, S, B> Graceful for hyper::server::conn::http2::Connection<I, S, TokioExecutor>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn graceful(self: Pin<&mut Self>) {
        self.graceful_shutdown()
    }
}

async fn serve(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr, preview: bool, slot: ConnSlot) {
    let cfg = &shared.config;
    let is_h2 = match tokio::time::timeout(cfg.client_header_timeout, sniff_h2(&stream)).await {
        Ok(Ok(h2)) => h2,
        _ => return, // closed or silent: nothing to answer
    };
    let activity = Arc::new(Activity::default());
    let client_ip =
        HeaderValue::from_str(&peer.ip().to_string()).unwrap_or_else(|_| HeaderValue::from_static("unknown"));
    let ctx = Arc::new(ConnCtx {
        shared: shared.clone(),
        client_ip,
        preview_listener: preview,
        activity: activity.clone(),
        _slot: slot,
    });
    let io = TokioIo::new(Tracked {
        stream,
        activity: activity.clone(),
        heads: !is_h2,
        frames: is_h2.then(|| Box::new(H2Frames::new())),
        hold: Hold::default(),
        backed_up: false,
        waiting: false,
    });
    let svc = service_fn(move |req| handler::handle(ctx.clone(), req));

    if is_h2 {
        let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        b.timer(TokioTimer::new())
            .max_header_list_size(cfg.max_header_bytes as u32);
        drive(&shared, &activity, b.serve_connection(io, svc)).await;
    } else {
        let mut b = hyper::server::conn::http1::Builder::new();
        // The header timeout is `drive`'s: hyper's would start when it begins waiting for the
        // next request, so it would also close keep-alive connections idle for that long, and it
        // arms a timer for every request.
        b.header_read_timeout(None)
            .max_header_size(cfg.max_header_bytes)
            // One flattened send() per response instead of writev(): the copy of a response head
            // is cheaper than the vectored syscall path, measurably so on small responses.
            .writev(false)
            .keep_alive(true);
        drive(&shared, &activity, b.serve_connection(io, svc).with_upgrades()).await;
    }
}

/// Runs a connection to its end. Asks it to finish gracefully at shutdown or when it has been
/// idle for `idle_timeout`, and closes it when a request head (HTTP/2: a header block) that has
/// begun is not complete within `client_header_timeout`. A client that stops taking the bytes sent to it is
/// the kernel's to cut (see `bind`).
///
/// A head that arrives whole is parsed in the same poll as the read that brought it, so the
/// header deadline is armed only for heads that take more than one read; between requests, a
/// keep-alive connection is governed by the idle timeout alone.
async fn drive<C: Graceful>(shared: &Shared, activity: &Activity, conn: C) {
    tokio::pin!(conn);
    let shutdown = shared.shutdown.cancelled();
    tokio::pin!(shutdown);
    let idle = shared.config.idle_timeout;
    let header_timeout = shared.config.client_header_timeout;
    let mut closing = false;
    let mut idle_check = instant_in(idle);
    // The deadline of the head that has begun, and that head's number.
    let mut head_deadline: Option<(tokio::time::Instant, u32)> = None;
    let mut watchdog = Box::pin(tokio::time::sleep_until(idle_check));
    // The watchdog needs polling only to register it after a reset; afterwards its expiry wakes
    // the task and `is_elapsed` tells.
    let mut watchdog_armed = false;
    std::future::poll_fn(|cx| loop {
        if let Poll::Ready(r) = conn.as_mut().poll(cx) {
            if let Err(e) = r {
                tracing::debug!(error = %e, "client connection ended with an error");
            }
            return Poll::Ready(());
        }
        if !closing && shutdown.as_mut().poll(cx).is_ready() {
            closing = true;
            conn.as_mut().graceful();
            continue;
        }
        match activity.head_pending() {
            None => head_deadline = None,
            Some(n) if head_deadline.is_some_and(|(_, m)| m == n) => {}
            Some(n) => {
                let d = instant_in(header_timeout);
                head_deadline = Some((d, n));
                if d < watchdog.deadline() {
                    watchdog.as_mut().reset(d);
                    watchdog_armed = false;
                }
            }
        }
        if watchdog_armed && !watchdog.is_elapsed() {
            return Poll::Pending;
        }
        // Outside the task's budget, so that a poll always registers the timer: a budget-limited
        // poll would return without it, and the check above would then never poll it again.
        if Pin::new(&mut tokio::task::unconstrained(watchdog.as_mut()))
            .poll(cx)
            .is_pending()
        {
            watchdog_armed = true;
            return Poll::Pending;
        }
        let now = tokio::time::Instant::now();
        if let Some((_, n)) = head_deadline.filter(|&(d, _)| now >= d) {
            if !activity.write_waiting.load(Ordering::Relaxed) {
                tracing::debug!(
                    timeout = ?header_timeout,
                    "request head not complete within the client header timeout; closing the connection"
                );
                return Poll::Ready(());
            }
            // The client is not taking what is sent to it, and HTTP/2 reads no frames meanwhile:
            // the rest of the head may be in the socket already. Its time starts again; a client
            // that reads nothing at all is the send timeout's to cut.
            head_deadline = Some((instant_after(now, header_timeout), n));
        }
        if now >= idle_check {
            let moved = activity.moved_since_last_look();
            if !closing && !moved && activity.requests.load(Ordering::Relaxed) == 0 {
                closing = true;
                conn.as_mut().graceful();
            }
            idle_check = instant_after(now, idle);
        }
        watchdog
            .as_mut()
            .reset(head_deadline.map_or(idle_check, |(d, _)| d.min(idle_check)));
        watchdog_armed = false;
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_end_is_a_point_after_the_spacing_and_a_request_one_only_after_an_interval_without() {
        let us = Duration::from_micros;
        let interval = us(2000);
        let t0 = Instant::now();
        let mut p = PreemptPoints::default();
        assert!(p.request(t0, interval), "the first request: nothing reported yet");
        assert!(!p.request(t0 + us(1999), interval));
        assert!(p.request(t0 + us(2000), interval), "a whole interval without a point");
        assert!(
            !p.request(t0 + us(2100), interval),
            "the interval starts again from there"
        );
        assert!(
            !p.pass_end(t0 + us(2249), interval),
            "a pass end within the spacing of the last point"
        );
        assert!(p.pass_end(t0 + us(2250), interval), "a pass end after it");
        assert!(!p.pass_end(t0 + us(2300), interval));
        assert!(!p.request(t0 + us(4000), interval), "counted from the last pass end");
        assert!(p.request(t0 + us(4251), interval));
        // A start time older than the last point (a request that began before it) is not one.
        assert!(!p.request(t0, interval));
        // A pass start, and the moment before held writes go out, are always points, and leave
        // the spacing of pass ends alone.
        assert!(PreemptPoints::unspaced(interval));
        assert!(!p.pass_end(t0 + us(4300), interval));
        // An interval shorter than the spacing spaces the pass-end points too.
        let short = us(100);
        let mut p = PreemptPoints::default();
        assert!(p.pass_end(t0, short));
        assert!(!p.pass_end(t0 + us(99), short));
        assert!(p.pass_end(t0 + us(100), short));
    }

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

    #[test]
    fn zero_interval_turns_points_off() {
        let t0 = Instant::now();
        let mut p = PreemptPoints::default();
        assert!(!PreemptPoints::unspaced(Duration::ZERO));
        for i in 0..10 {
            assert!(!p.request(t0 + Duration::from_secs(i), Duration::ZERO));
            assert!(!p.pass_end(t0 + Duration::from_secs(i), Duration::ZERO));
        }
    }
}
