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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use tokio::sync::mpsc;

use crate::table::Generation;

struct Waiters {
    /// Tells this thread's registry from every other one, including those of threads that have
    /// ended (a thread-local's address may be reused, a number from this counter is not).
    id: u64,
    slots: Vec<Option<(usize, Waker)>>,
    free: Vec<usize>,
}

static NEXT_REGISTRY: AtomicU64 = AtomicU64::new(1);

thread_local! {
    static WAITERS: RefCell<Waiters> = RefCell::new(Waiters {
        id: NEXT_REGISTRY.fetch_add(1, Ordering::Relaxed),
        slots: Vec::new(),
        free: Vec::new(),
    });
}

fn key(gen: &Generation) -> usize {
    gen as *const Generation as usize
}

/// A place in a worker's registry, held by something that must end at a drain deadline.
///
/// The place is an index into one thread's registry, so it is only meaningful on that thread.
/// Workers run current-thread runtimes and their tasks never move; but the futures holding a
/// registration must be `Send` (hyper's HTTP/2 server and `tokio::spawn` ask for it), so a move
/// is ruled out by checking, not by the type: the registration names its registry, and is only
/// ever read or freed there. Should it find itself on another thread, it registers anew in that
/// thread's registry and leaves its old place alone (one extra wake-up at that deadline), rather
/// than freeing or overwriting a place that belongs to another waiter.
#[derive(Default)]
pub(crate) struct Registration {
    /// (registry id, index in it)
    slot: Option<(u64, usize)>,
}

impl Registration {
    /// Ready once the generation's drain deadline has passed; otherwise registers to be woken.
    pub(crate) fn poll_expired(&mut self, gen: &Generation, cx: &mut Context<'_>) -> Poll<()> {
        if gen.expired.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        WAITERS.with(|w| {
            let mut w = w.borrow_mut();
            let here = w.id;
            if let Some((registry, i)) = self.slot {
                if registry == here {
                    if let Some(Some((_, waker))) = w.slots.get_mut(i) {
                        if !waker.will_wake(cx.waker()) {
                            waker.clone_from(cx.waker());
                        }
                    }
                    return;
                }
            }
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
            self.slot = Some((here, i));
        });
        Poll::Pending
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some((registry, i)) = self.slot.take() {
            let _ = WAITERS.try_with(|w| {
                let mut w = w.borrow_mut();
                if w.id == registry {
                    if let Some(slot) = w.slots.get_mut(i) {
                        *slot = None;
                        w.free.push(i);
                    }
                }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn waker() -> (Arc<Count>, Waker) {
        let c = Arc::new(Count(AtomicUsize::new(0)));
        (c.clone(), Waker::from(c))
    }

    fn occupied() -> usize {
        WAITERS.with(|w| w.borrow().slots.iter().flatten().count())
    }

    /// A registration that ends up on another thread touches nothing of that thread's registry
    /// but its own new place: the waiters registered there are still woken at their deadline.
    #[test]
    fn a_registration_moved_to_another_thread_leaves_that_threads_waiters_alone() {
        let gen = Arc::new(Generation::default());
        let (_, w1) = waker();
        let mut moved = Registration::default();
        assert!(moved.poll_expired(&gen, &mut Context::from_waker(&w1)).is_pending());

        let gen2 = gen.clone();
        std::thread::spawn(move || {
            // Two waiters of this thread, in the places 0 and 1.
            let (c_a, w_a) = waker();
            let (c_b, w_b) = waker();
            let mut a = Registration::default();
            let mut b = Registration::default();
            assert!(a.poll_expired(&gen2, &mut Context::from_waker(&w_a)).is_pending());
            assert!(b.poll_expired(&gen2, &mut Context::from_waker(&w_b)).is_pending());
            assert_eq!(occupied(), 2);
            // The registration made on the other thread, polled and dropped here.
            let mut moved = moved;
            let (_, w_m) = waker();
            assert!(moved.poll_expired(&gen2, &mut Context::from_waker(&w_m)).is_pending());
            assert_eq!(occupied(), 3, "it takes a place of its own here");
            drop(moved);
            assert_eq!(occupied(), 2, "and frees only that place");
            // Both waiters of this thread are still registered and woken.
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            tx.send(gen2.clone()).unwrap();
            drop(tx);
            rt.block_on(wake_expired(rx));
            assert_eq!(c_a.0.load(Ordering::SeqCst), 1);
            assert_eq!(c_b.0.load(Ordering::SeqCst), 1);
            drop((a, b));
            assert_eq!(occupied(), 0);
        })
        .join()
        .expect("the other thread's registry is left consistent");
        assert_eq!(
            occupied(),
            1,
            "the first thread's place stays until that thread sees to it"
        );
    }
}
