//! Waking the requests, streams and tunnels of a drained colour at its deadline, without a lock
//! on the request path.
//!
//! Whatever may have to be cut registers its waker in a registry owned by its worker thread
//! (thread-local: no lock, no atomic), and only once it actually has to wait. At the deadline the
//! drainer marks the generation as expired and sends it to every worker; each worker then wakes
//! the waiters registered for that generation, which see the mark and end themselves.
//!
//! Ordering: the mark is set before the message is sent, and a waiter checks the mark before it
//! registers, on the same thread that later handles the message. So a waiter either sees the
//! mark, or is registered before the message is handled; none is missed.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use tokio::sync::mpsc;

use crate::table::Generation;

#[derive(Default)]
struct Waiters {
    slots: Vec<Option<(usize, Waker)>>,
    free: Vec<usize>,
}

thread_local! {
    static WAITERS: RefCell<Waiters> = RefCell::new(Waiters::default());
}

fn key(gen: &Generation) -> usize {
    gen as *const Generation as usize
}

/// A place in the worker's registry, held by something that must end at a drain deadline.
#[derive(Default)]
pub(crate) struct Registration {
    slot: Option<usize>,
}

impl Registration {
    /// Ready once the generation's drain deadline has passed; otherwise registers to be woken.
    pub(crate) fn poll_expired(&mut self, gen: &Generation, cx: &mut Context<'_>) -> Poll<()> {
        if gen.expired.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        WAITERS.with(|w| {
            let mut w = w.borrow_mut();
            match self.slot {
                Some(i) => {
                    if let Some((_, waker)) = &mut w.slots[i] {
                        if !waker.will_wake(cx.waker()) {
                            waker.clone_from(cx.waker());
                        }
                    }
                }
                None => {
                    let entry = Some((key(gen), cx.waker().clone()));
                    let i = match w.free.pop() {
                        Some(i) => {
                            w.slots[i] = entry;
                            i
                        }
                        None => {
                            w.slots.push(entry);
                            w.slots.len() - 1
                        }
                    };
                    self.slot = Some(i);
                }
            }
        });
        Poll::Pending
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(i) = self.slot.take() {
            // Dropped on its worker thread: the registry is that thread's.
            let _ = WAITERS.try_with(|w| {
                let mut w = w.borrow_mut();
                w.slots[i] = None;
                w.free.push(i);
            });
        }
    }
}

/// A future that completes at the generation's drain deadline.
pub(crate) struct Expired<'a> {
    gen: &'a Generation,
    reg: Registration,
}

pub(crate) fn expired(gen: &Generation) -> Expired<'_> {
    Expired {
        gen,
        reg: Registration::default(),
    }
}

impl Future for Expired<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        this.reg.poll_expired(this.gen, cx)
    }
}

/// Runs on every worker: wakes that worker's waiters of each expired generation it is sent.
pub(crate) async fn wake_expired(mut rx: mpsc::UnboundedReceiver<Arc<Generation>>) {
    while let Some(gen) = rx.recv().await {
        let k = key(&gen);
        let wakers: Vec<Waker> = WAITERS.with(|w| {
            w.borrow()
                .slots
                .iter()
                .flatten()
                .filter(|(g, _)| *g == k)
                .map(|(_, waker)| waker.clone())
                .collect()
        });
        for w in wakers {
            w.wake();
        }
    }
}
