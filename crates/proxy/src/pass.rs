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
//! proxy's workers). A writer released in a pass writes on unheld until the next pass starts, so a
//! response that takes several writes (HTTP/2 frames, a tunnel's chunks) waits once. A client
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
    /// Bumped each time the held writes are released, and at the start of each pass.
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
        // A task polled again (an HTTP/2 connection, once per stream) is on the list once.
        if !list.last().is_some_and(|w| w.will_wake(waker)) {
            list.push(waker.clone());
        }
    }

    /// Ends the pass for every held write: a new number, and the held writers moved into
    /// `upstream` and `client` (empty), for [`wake_held`] once the borrow is released.
    fn release_into(&mut self, upstream: &mut Vec<Waker>, client: &mut Vec<Waker>) {
        self.number = self.number.wrapping_add(1);
        std::mem::swap(&mut self.upstream, upstream);
        std::mem::swap(&mut self.client, client);
    }
}

/// Wakes released writers, upstream requests first. Called outside the borrow of `PASS`: a
/// waker may run code that holds again.
fn wake_held(upstream: &mut Vec<Waker>, client: &mut Vec<Waker>) {
    for w in upstream.drain(..).chain(client.drain(..)) {
        w.wake();
    }
}

/// The worker is back from its wait for events: writers released in the last pass are held
/// again from here on. Nothing is held at this moment (the worker waits only once the flusher
/// has run), so nobody needs waking.
pub(crate) fn pass_start() {
    PASS.with(|p| {
        let mut p = p.borrow_mut();
        p.number = p.number.wrapping_add(1);
    })
}

thread_local! {
    static PASS: RefCell<Pass> = RefCell::new(Pass::default());
}

/// One writer's place in the pass: where its next write stands.
#[derive(Debug, Default)]
pub(crate) struct Hold(State);

#[derive(Debug, Default, Clone, Copy)]
enum State {
    #[default]
    Idle,
    /// A write waits, held while `Pass::number` is this.
    Held(u64),
    /// Released while `Pass::number` was this: until it changes (at the start of the next pass,
    /// or when the flusher runs again), the writer writes on without waiting. A response that
    /// takes several writes (HTTP/2 frames, a tunnel's chunks) waits once per pass, not once per
    /// write.
    Free(u64),
}

impl Hold {
    /// Ready when the writer may write: once the pass it was first called in has ended, and then
    /// for the rest of the pass it was released in. Call it before each write.
    pub(crate) fn poll_release(&mut self, side: Side, cx: &mut Context<'_>) -> Poll<()> {
        PASS.with(|p| {
            let mut p = p.borrow_mut();
            match self.0 {
                State::Held(n) if n != p.number => {
                    self.0 = State::Free(p.number);
                    Poll::Ready(())
                }
                // Polled again before the flusher ran: still held. The waker goes on the list
                // again if it is not the one there, in case the write has moved to another task.
                State::Held(_) => {
                    p.hold(side, cx.waker());
                    Poll::Pending
                }
                State::Free(n) if n == p.number => Poll::Ready(()),
                State::Idle | State::Free(_) => {
                    let Some(flusher) = &p.flusher else {
                        return Poll::Ready(());
                    };
                    if p.upstream.is_empty() && p.client.is_empty() {
                        flusher.wake_by_ref();
                    }
                    self.0 = State::Held(p.number);
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
            let (mut upstream, mut client) = (Vec::new(), Vec::new());
            let _ = PASS.try_with(|p| {
                let mut p = p.borrow_mut();
                p.flusher = None;
                p.release_into(&mut upstream, &mut client);
            });
            wake_held(&mut upstream, &mut client);
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
            p.release_into(&mut upstream, &mut client);
        });
        wake_held(&mut upstream, &mut client);
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
                        // The writer's next write in the same pass goes out at once.
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
                "upstream sent again",
                "client a sent",
                "client a sent again",
                "client b sent",
                "client b sent again",
            ]
        );
    }

    #[test]
    fn a_released_writer_is_free_until_the_next_pass_starts() {
        runtime().block_on(async {
            tokio::spawn(flusher(|| {}));
            tokio::task::yield_now().await;
            let mut cx = Context::from_waker(Waker::noop());
            let mut hold = Hold::default();
            assert!(
                hold.poll_release(Side::Client, &mut cx).is_pending(),
                "a first write is held"
            );
            assert!(
                hold.poll_release(Side::Client, &mut cx).is_pending(),
                "until the flusher runs"
            );
            tokio::task::yield_now().await;
            assert!(
                hold.poll_release(Side::Client, &mut cx).is_ready(),
                "released by the flusher"
            );
            for _ in 0..3 {
                assert!(
                    hold.poll_release(Side::Client, &mut cx).is_ready(),
                    "free for the rest of the pass"
                );
            }
            pass_start();
            assert!(
                hold.poll_release(Side::Client, &mut cx).is_pending(),
                "held again in the next pass"
            );
            tokio::task::yield_now().await;
            assert!(hold.poll_release(Side::Client, &mut cx).is_ready());
            // A task polled again while held is on the list once.
            let mut other = Hold::default();
            pass_start();
            std::future::poll_fn(|cx| {
                for _ in 0..5 {
                    assert!(other.poll_release(Side::Upstream, cx).is_pending());
                }
                Poll::Ready(())
            })
            .await;
            assert_eq!(PASS.with(|p| p.borrow().upstream.len()), 1);
        });
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
