//! Preemption points: where a worker gives the kernel a chance to hand its CPU to a waiting
//! thread (see [`ProxyConfig::preempt_interval`](crate::ProxyConfig::preempt_interval)).

use std::time::{Duration, Instant};

/// When the last point was, for the spacing of the next ones.
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
pub(crate) fn unspaced_point(interval: Duration) {
    if PreemptPoints::unspaced(interval) {
        report_cpu_time();
    }
}

/// Called when the worker has run out of ready tasks, before it waits for events.
pub(crate) fn pass_end_point(interval: Duration) {
    if PREEMPT_POINTS.with(|p| p.borrow_mut().pass_end(Instant::now(), interval)) {
        report_cpu_time();
    }
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
