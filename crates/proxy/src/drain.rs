//! Draining a colour: waiting for what entered it to finish, and cutting what is left at the
//! deadline (see `deadline` for how the cut reaches each worker). A drained colour's idle
//! upstream connections are closed on every worker as the drain ends (see `upstream`).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::clock::{instant_in, millis};
use crate::error::TableError;
use crate::proxy::Proxy;
use crate::table::{Colour, Generation};

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

impl Proxy {
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
        let mut instances: Arc<[u64]> = Arc::new([]);
        self.update(|t| {
            t.with_service(service, |s| {
                let pool = s.pool_mut(colour);
                old = Some(pool.generation.clone());
                instances = pool.instances.iter().map(|i| i.id).collect();
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
            self.shared().close_idle(instances);
            return Ok(DrainReport {
                elapsed: start.elapsed(),
                completed: true,
                cut_requests: 0,
                closed_upgrades: 0,
            });
        }
        let cut_requests = old.in_flight();
        let closed_upgrades = old.upgraded();
        old.expired_at_ms.store(crate::table::now_ms(), Ordering::Relaxed);
        old.expired.store(true, Ordering::Release);
        for tx in &self.shared().expired_tx {
            let _ = tx.send(old.clone());
        }
        // The cuts themselves take a moment; tunnels close within the window.
        let grace = instant_in(close_window.saturating_add(Duration::from_secs(2)));
        wait_until(&old, grace, empty).await;
        self.shared().close_idle(instances);
        Ok(DrainReport {
            elapsed: start.elapsed(),
            completed: false,
            cut_requests,
            closed_upgrades,
        })
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
