//! Sends held to the end of a worker's pass.
//!
//! A worker takes a batch of ready sockets from the kernel and runs the tasks they woke: requests
//! read from clients go out to upstreams, responses read from upstreams go out to clients. Sent
//! the moment each is ready, those writes are spread over the whole pass, and each one wakes its
//! reader (a client, an upstream server) while the worker still has the rest of the pass to do.
//! The reader is often woken onto the worker's own CPU, where it either interrupts the pass or
//! waits behind it, and a reader on another CPU is woken once per write, finding one request or
//! response each time.
//!
//! Held instead until every task the batch woke has run, the writes go out back to back at the
//! end of the pass, upstream requests first (the upstreams can start on them while the worker
//! answers its clients), then client responses. Each reader wakes once to everything the pass
//! had for it.
//!
//! The pass end is a task, the flusher. The first write held in a pass wakes it; woken tasks run
//! in the order they were woken, so it runs after every task that was already ready, and then
//! (after a preemption point, see `ProxyConfig::preempt_interval`) wakes the held writers, which
//! run next and find their write released. A write is held for
//! at most the rest of one pass. Nothing is held on a thread without a flusher (outside the
//! proxy's workers), and a writer holds at most once per write: once released it writes. A client
//! connection whose last write did not all fit into its socket (a large download to a slow
//! reader) sends what follows as the socket takes it, unheld.
//!
//! Measured in BENCHMARKS.md ("Reading the throughput numbers"): under the throughput benchmark's
//! load, more requests per second and a lower p99 than sending at once.

use std::cell::RefCell;
use std::task::{Context, Poll, Waker};

/// Which writes go first when a pass ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    /// A request to an upstream.
    Upstream,
    /// A response (or anything else) to a client.
    Client,
}

#[derive(Default)]
struct Pass {
    /// Bumped each time the held writes are released; a writer held in an earlier one is free.
    number: u64,
    /// The worker's flusher task; `None` outside a worker.
    flusher: Option<Waker>,
    upstream: Vec<Waker>,
    client: Vec<Waker>,
}

impl Pass {
    fn hold(&mut self, side: Side, waker: &Waker) {
        let list = match side {
            Side::Upstream => &mut self.upstream,
            Side::Client => &mut self.client,
        };
        list.push(waker.clone());
    }
}

thread_local! {
    static PASS: RefCell<Pass> = RefCell::new(Pass::default());
}

/// One writer's place in the pass: where its next write stands.
#[derive(Debug, Default)]
pub(crate) struct Hold {
    /// The pass the pending write was held in.
    held_in: Option<u64>,
}

impl Hold {
    /// Ready when the writer may write: after the pass it was first called in has ended. Call it
    /// before each write; it holds each write once.
    pub(crate) fn poll_release(&mut self, side: Side, cx: &mut Context<'_>) -> Poll<()> {
        PASS.with(|p| {
            let mut p = p.borrow_mut();
            match self.held_in {
                Some(n) if n != p.number => {
                    self.held_in = None;
                    Poll::Ready(())
                }
                // Polled again in the same pass: still held. The waker goes on the list again,
                // in case the write has moved to another task since.
                Some(_) => {
                    p.hold(side, cx.waker());
                    Poll::Pending
                }
                None => {
                    let Some(flusher) = &p.flusher else {
                        return Poll::Ready(());
                    };
                    if p.upstream.is_empty() && p.client.is_empty() {
                        flusher.wake_by_ref();
                    }
                    self.held_in = Some(p.number);
                    p.hold(side, cx.waker());
                    Poll::Pending
                }
            }
        })
    }

    /// Waits until a write may go out (see [`Hold::poll_release`]).
    pub(crate) async fn release(&mut self, side: Side) {
        std::future::poll_fn(|cx| self.poll_release(side, cx)).await
    }
}

/// The worker's flusher: whenever it runs, it calls `before_release`, then ends the pass for every
/// held write. It never finishes; spawn one per worker runtime, before anything that writes.
pub(crate) async fn flusher(before_release: impl Fn()) {
    // Once the flusher is gone (its runtime shut down), nothing on this thread is held.
    struct Gone;
    impl Drop for Gone {
        fn drop(&mut self) {
            let held = PASS.try_with(|p| {
                let mut p = p.borrow_mut();
                p.flusher = None;
                p.number = p.number.wrapping_add(1);
                (std::mem::take(&mut p.upstream), std::mem::take(&mut p.client))
            });
            if let Ok((upstream, client)) = held {
                upstream.into_iter().chain(client).for_each(Waker::wake);
            }
        }
    }
    let _gone = Gone;
    let mut upstream = Vec::new();
    let mut client = Vec::new();
    std::future::poll_fn(|cx| {
        before_release();
        PASS.with(|p| {
            let mut p = p.borrow_mut();
            match &p.flusher {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => p.flusher = Some(cx.waker().clone()),
            }
            p.number = p.number.wrapping_add(1);
            std::mem::swap(&mut p.upstream, &mut upstream);
            std::mem::swap(&mut p.client, &mut client);
        });
        // Woken outside the borrow: a waker may run code that holds again.
        for w in upstream.drain(..).chain(client.drain(..)) {
            w.wake();
        }
        Poll::<()>::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn held_writes_go_out_after_every_ready_task_upstream_first() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let rt = runtime();
        rt.block_on(async {
            tokio::spawn(flusher(|| {}));
            tokio::task::yield_now().await;
            let mut tasks = Vec::new();
            for (name, side) in [
                ("client a", Some(Side::Client)),
                ("upstream", Some(Side::Upstream)),
                ("plain", None),
                ("client b", Some(Side::Client)),
            ] {
                let log = log.clone();
                tasks.push(tokio::spawn(async move {
                    log.lock().unwrap().push(format!("{name} ready"));
                    if let Some(side) = side {
                        let mut hold = Hold::default();
                        hold.release(side).await;
                        log.lock().unwrap().push(format!("{name} sent"));
                        // The next write of the same writer is held again, to the next pass end.
                        hold.release(side).await;
                        log.lock().unwrap().push(format!("{name} sent again"));
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        });
        let log = log.lock().unwrap().clone();
        assert_eq!(
            log,
            [
                "client a ready",
                "upstream ready",
                "plain ready",
                "client b ready",
                "upstream sent",
                "client a sent",
                "client b sent",
                "upstream sent again",
                "client a sent again",
                "client b sent again",
            ]
        );
    }

    #[test]
    fn nothing_is_held_without_a_flusher() {
        let mut cx = Context::from_waker(Waker::noop());
        assert!(Hold::default().poll_release(Side::Client, &mut cx).is_ready());

        // Once the flusher's runtime is gone, writers held at that moment are woken and free,
        // and nothing more is held.
        let rt = runtime();
        let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut held = Hold::default();
        rt.block_on(async {
            tokio::spawn(flusher(|| {}));
            tokio::task::yield_now().await;
            let waker = Arc::new(Flag(flag.clone())).into();
            let mut cx = Context::from_waker(&waker);
            assert!(held.poll_release(Side::Client, &mut cx).is_pending());
        });
        drop(rt);
        assert!(
            flag.load(std::sync::atomic::Ordering::Relaxed),
            "the held writer was not woken"
        );
        assert!(held.poll_release(Side::Client, &mut cx).is_ready());
        assert!(Hold::default().poll_release(Side::Upstream, &mut cx).is_ready());
    }

    struct Flag(Arc<std::sync::atomic::AtomicBool>);

    impl std::task::Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
}
