//! A worker thread: a single-threaded tokio runtime that accepts, serves and forwards its own
//! connections, with its own upstream pools, tuned for short passes over ready events.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::clock::instant_in;
use crate::config::ListenerConfig;
use crate::listen::accept_loop;
use crate::preempt::{pass_end_point, unspaced_point};
use crate::shared::Shared;
use crate::table::Generation;

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

/// Runs one worker until the proxy shuts down and its connections have closed (bounded by
/// `shutdown_timeout`).
pub(crate) fn worker(
    shared: Arc<Shared>,
    listeners: Vec<(std::net::TcpListener, ListenerConfig)>,
    expired: tokio::sync::mpsc::UnboundedReceiver<Arc<Generation>>,
    close_idle: tokio::sync::mpsc::UnboundedReceiver<Arc<[u64]>>,
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
        tokio::spawn(crate::upstream::close_idle_of(close_idle));
        for (std_listener, role) in listeners {
            match TcpListener::from_std(std_listener) {
                Ok(l) => {
                    tokio::spawn(accept_loop(shared.clone(), l, role.preview, role.tls));
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
                #[cfg(feature = "hyper-upstream")]
                crate::hyper_upstream::sweep(idle);
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
