//! Request counters of one colour of one service: how many, with which status class, and how long
//! until the response head. The control plane judges a new colour from them after a switch (error
//! rate, p99), and they feed the metrics endpoint.
//!
//! Recording is three relaxed atomic increments; reading takes a snapshot, and the difference of
//! two snapshots describes the requests in between.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the latency buckets, in microseconds: roughly doubling from 100 µs to 60 s.
/// These are the buckets the metrics endpoint exports; each is counted in 16 equal parts so that
/// quantiles can be estimated far more finely than the bounds are apart.
pub const LATENCY_BOUNDS_US: [u64; 20] = [
    100, 250, 500, 1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 64_000, 125_000, 250_000, 500_000, 1_000_000, 2_000_000,
    4_000_000, 8_000_000, 16_000_000, 32_000_000, 60_000_000,
];

/// Equal parts of each bucket of [`LATENCY_BOUNDS_US`]. Buckets at most double from 250 µs on,
/// so a part is at most 1/16 (6.25 %) of any latency it holds there: the precision of
/// [`StatsSnapshot::quantile`]. Doubling it would halve the error and double the memory (2.5 KiB
/// of counters per colour now); the cost of a record stays the same.
const SUB_BUCKETS: usize = 16;

/// The exported buckets: one per bound, and the last one "above every bound".
const BUCKETS: usize = LATENCY_BOUNDS_US.len() + 1;

/// The counted parts: [`SUB_BUCKETS`] per bound, and one "above every bound".
const PARTS: usize = LATENCY_BOUNDS_US.len() * SUB_BUCKETS + 1;

/// The highest latency the buckets resolve; anything slower is only known to be slower.
const LAST_BOUND_US: u64 = LATENCY_BOUNDS_US[LATENCY_BOUNDS_US.len() - 1];

/// Live counters; shared by every route table that contains the colour.
pub struct ColourStats {
    /// Index 0: 1xx, 1: 2xx, ... 4: 5xx.
    by_class: [AtomicU64; 5],
    /// Requests by latency, in the parts of [`part_of`].
    latency: [AtomicU64; PARTS],
    latency_sum_us: AtomicU64,
}

impl Default for ColourStats {
    fn default() -> Self {
        ColourStats {
            by_class: Default::default(),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
            latency_sum_us: AtomicU64::new(0),
        }
    }
}

impl std::fmt::Debug for ColourStats {
    /// Hundreds of latency counters would drown any table printed with them; the snapshot's
    /// summary says what they hold.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.snapshot(), f)
    }
}

/// Counts since the colour's counters were created; subtract two to get a window.
#[derive(Clone, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub by_class: [u64; 5],
    /// Requests by latency, in the parts of [`part_of`]; [`StatsSnapshot::latency_buckets`] sums
    /// them into the buckets of [`LATENCY_BOUNDS_US`].
    latency: [u64; PARTS],
    pub latency_sum_us: u64,
}

impl Default for StatsSnapshot {
    fn default() -> Self {
        StatsSnapshot {
            by_class: [0; 5],
            latency: [0; PARTS],
            latency_sum_us: 0,
        }
    }
}

impl std::fmt::Debug for StatsSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatsSnapshot")
            .field("by_class", &self.by_class)
            .field("latency_buckets", &self.latency_buckets())
            .field("latency_sum_us", &self.latency_sum_us)
            .finish()
    }
}

/// The part counting a latency of `us` microseconds: bucket `i` of [`LATENCY_BOUNDS_US`] holds
/// `lo < us <= hi` (the first one also 0), and its part `j` holds
/// `lo + j * (hi - lo) / SUB_BUCKETS < us <= lo + (j + 1) * (hi - lo) / SUB_BUCKETS`, so that a
/// part never straddles an exported bound and the exported buckets keep their `le` meaning.
/// A binary search over 20 bounds and one division: no loop over the parts, no branch per part.
fn part_of(us: u64) -> usize {
    let i = LATENCY_BOUNDS_US.partition_point(|&b| b < us);
    let Some(&hi) = LATENCY_BOUNDS_US.get(i) else {
        return PARTS - 1;
    };
    let lo = bucket_floor(i);
    // `lo < us <= hi` here (or `us == 0` in the first bucket), so this is below SUB_BUCKETS: at most
    // (SUB_BUCKETS * span - 1) / span. No overflow: `us` is at most 60 s in microseconds.
    let j = (us.saturating_sub(lo) * SUB_BUCKETS as u64).saturating_sub(1) / (hi - lo);
    i * SUB_BUCKETS + j as usize
}

/// The lower end of bucket `i` of [`LATENCY_BOUNDS_US`]: the bound below it, 0 for the first.
fn bucket_floor(i: usize) -> u64 {
    match i.checked_sub(1) {
        Some(below) => LATENCY_BOUNDS_US[below],
        None => 0,
    }
}

/// The latencies (exclusive, inclusive] in microseconds that part `k` holds; `None` for the last,
/// which has no upper end.
fn part_range(k: usize) -> Option<(f64, f64)> {
    let i = k / SUB_BUCKETS;
    let hi = *LATENCY_BOUNDS_US.get(i)?;
    let lo = bucket_floor(i) as f64;
    let width = (hi as f64 - lo) / SUB_BUCKETS as f64;
    let j = (k % SUB_BUCKETS) as f64;
    Some((lo + j * width, lo + (j + 1.0) * width))
}

impl ColourStats {
    /// On the request path: three relaxed atomic additions and [`part_of`], no lock, no allocation.
    pub(crate) fn record(&self, status: u16, elapsed: Duration) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.by_class[class].fetch_add(1, Ordering::Relaxed);
        let us = elapsed.as_micros().min(u64::MAX as u128) as u64;
        self.latency[part_of(us)].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us.fetch_add(us, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            by_class: std::array::from_fn(|i| self.by_class[i].load(Ordering::Relaxed)),
            latency: std::array::from_fn(|i| self.latency[i].load(Ordering::Relaxed)),
            latency_sum_us: self.latency_sum_us.load(Ordering::Relaxed),
        }
    }
}

impl StatsSnapshot {
    /// The counts of these requests (status, time to the response head), as a colour would have
    /// counted them: for judging code tested without a proxy.
    pub fn of(requests: impl IntoIterator<Item = (u16, Duration)>) -> StatsSnapshot {
        let stats = ColourStats::default();
        for (status, elapsed) in requests {
            stats.record(status, elapsed);
        }
        stats.snapshot()
    }

    pub fn requests(&self) -> u64 {
        self.by_class.iter().sum()
    }

    /// Responses with a 5xx status (including the proxy's own 502/503/504).
    pub fn errors(&self) -> u64 {
        self.by_class[4]
    }

    /// Requests by latency in the buckets of [`LATENCY_BOUNDS_US`] (not cumulative): entry `i`
    /// counts those above the bound before `i` and at most bound `i`; the last, those above 60 s.
    pub fn latency_buckets(&self) -> [u64; BUCKETS] {
        std::array::from_fn(|i| {
            let start = (i * SUB_BUCKETS).min(PARTS);
            let end = ((i + 1) * SUB_BUCKETS).min(PARTS);
            self.latency[start..end].iter().sum()
        })
    }

    /// The counts between `earlier` and this snapshot.
    pub fn since(&self, earlier: &StatsSnapshot) -> StatsSnapshot {
        StatsSnapshot {
            by_class: std::array::from_fn(|i| self.by_class[i].saturating_sub(earlier.by_class[i])),
            latency: std::array::from_fn(|i| self.latency[i].saturating_sub(earlier.latency[i])),
            latency_sum_us: self.latency_sum_us.saturating_sub(earlier.latency_sum_us),
        }
    }

    /// An estimate of the latency below which `q` (0..=1) of the requests fall, that is of the
    /// latency of the request at rank ⌈q·n⌉ of n; `None` without requests.
    ///
    /// Precision: each bucket of [`LATENCY_BOUNDS_US`] is counted in 16 equal parts, and the
    /// estimate interpolates linearly within the part holding that rank, so it lies in the same
    /// part as the true value and is off by at most the part's width: at most 6.25 % of the true
    /// value from 250 µs to 60 s, 9.4 % from 100 µs to 250 µs, and 6.25 µs below 100 µs
    /// (latencies are recorded in whole microseconds, truncated). Compared with a limit,
    /// the estimate is on the same side as the true value unless the two share a part, that is
    /// unless they are within those 6.25 % (9.4 %, 6.25 µs) of each other.
    ///
    /// Above 60 s there is no upper end to interpolate to: a rank there is reported as 60 s, a
    /// lower bound.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let total: u64 = self.latency.iter().sum();
        if total == 0 {
            return None;
        }
        // NaN clamps to NaN and casts to 0, hence rank 1.
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).clamp(1, total);
        let mut below = 0;
        for (k, &n) in self.latency.iter().enumerate() {
            // `below < rank` before this part, so the part holding the rank has n > 0.
            if below + n >= rank {
                let Some((lo, hi)) = part_range(k) else {
                    return Some(Duration::from_micros(LAST_BOUND_US));
                };
                let into = (rank - below) as f64 / n as f64;
                let us = lo + into * (hi - lo);
                // Float to integer casts saturate: no panic whatever the value.
                return Some(Duration::from_nanos((us * 1_000.0).round() as u64));
            }
            below += n;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The documented precision of [`StatsSnapshot::quantile`] for a true value of `us`.
    fn tolerance_us(us: f64) -> f64 {
        if us <= 100.0 {
            6.25
        } else if us <= 250.0 {
            us * 0.094
        } else {
            us * 0.0625
        }
    }

    /// The value at rank ⌈q·n⌉ of `sorted`, as `quantile` defines it.
    fn exact(sorted: &[u64], q: f64) -> u64 {
        let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        sorted[rank - 1]
    }

    fn recorded(latencies_us: &[u64]) -> StatsSnapshot {
        let s = ColourStats::default();
        for &us in latencies_us {
            s.record(200, Duration::from_micros(us));
        }
        s.snapshot()
    }

    fn assert_within_bound(latencies_us: &[u64], what: &str) {
        let snap = recorded(latencies_us);
        let mut sorted = latencies_us.to_vec();
        sorted.sort_unstable();
        for q in [0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 1.0] {
            let truth = exact(&sorted, q) as f64;
            let estimate = snap.quantile(q).unwrap().as_nanos() as f64 / 1_000.0;
            assert!(
                (estimate - truth).abs() <= tolerance_us(truth),
                "{what}: q {q}: estimate {estimate} µs, true {truth} µs"
            );
        }
    }

    /// A deterministic generator (SplitMix64), so that a failure names its distribution.
    struct Draws(u64);

    impl Draws {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        /// Uniform in [0, 1).
        fn unit(&mut self) -> f64 {
            (self.next() >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    #[test]
    fn counts_classes_and_latency() {
        let s = ColourStats::default();
        for _ in 0..98 {
            s.record(200, Duration::from_micros(80));
        }
        s.record(503, Duration::from_millis(3));
        s.record(101, Duration::from_secs(100));
        let snap = s.snapshot();
        assert_eq!(snap.requests(), 100);
        assert_eq!(snap.errors(), 1);
        assert_eq!(snap.by_class, [1, 98, 0, 0, 1]);
        // 80 µs is counted in the part (75, 81.25] µs; 3 ms in (2.75, 3] ms.
        let median = snap.quantile(0.5).unwrap();
        assert!(
            median > Duration::from_micros(75) && median <= Duration::from_nanos(81_250),
            "{median:?}"
        );
        let p99 = snap.quantile(0.99).unwrap();
        assert!(
            p99 > Duration::from_micros(2_750) && p99 <= Duration::from_millis(3),
            "{p99:?}"
        );
        // Beyond the last bound only a lower bound is known.
        assert_eq!(snap.quantile(1.0), Some(Duration::from_secs(60)));
    }

    #[test]
    fn windows_subtract() {
        let s = ColourStats::default();
        s.record(200, Duration::from_millis(1));
        let before = s.snapshot();
        s.record(500, Duration::from_millis(1));
        s.record(500, Duration::from_millis(1));
        let w = s.snapshot().since(&before);
        assert_eq!((w.requests(), w.errors()), (2, 2));
        assert_eq!(w.latency_buckets().iter().sum::<u64>(), 2);
        assert_eq!(StatsSnapshot::default().quantile(0.99), None);
    }

    #[test]
    fn a_p99_of_600ms_is_told_from_750ms_and_900ms_is_not() {
        for (ms, below_750) in [(600, true), (700, true), (800, false), (900, false)] {
            // A few fast requests beside the slow ones, as health checks and static files would be.
            let mut latencies = vec![ms * 1_000; 990];
            latencies.extend([2_000; 10]);
            let p99 = recorded(&latencies).quantile(0.99).unwrap();
            assert_eq!(
                p99 <= Duration::from_millis(750),
                below_750,
                "{ms} ms estimated {p99:?}"
            );
            let error = p99.as_secs_f64() * 1e3 - ms as f64;
            assert!(error.abs() < ms as f64 * 0.0625, "{ms} ms estimated {p99:?}");
        }
    }

    #[test]
    fn every_latency_alone_is_estimated_within_the_stated_bound() {
        // Every part's edges and middle, in every bucket, and the bounds themselves.
        let mut values = vec![0, 1];
        for k in 0..PARTS - 1 {
            let (lo, hi) = part_range(k).unwrap();
            for v in [lo.floor() + 1.0, (lo + hi) / 2.0, hi.floor()] {
                values.push(v as u64);
            }
        }
        for v in values {
            for q in [0.0, 0.5, 0.99, 1.0] {
                let estimate = recorded(&[v]).quantile(q).unwrap().as_nanos() as f64 / 1_000.0;
                assert!(
                    (estimate - v as f64).abs() <= tolerance_us(v as f64),
                    "{v} µs alone, q {q}: estimate {estimate} µs"
                );
            }
        }
    }

    #[test]
    fn quantiles_of_known_distributions_are_within_the_stated_bound() {
        let mut d = Draws(7);
        let n = 20_000;
        let uniform_fast: Vec<u64> = (0..n).map(|_| 50 + d.next() % 2_000).collect();
        assert_within_bound(&uniform_fast, "uniform 50 µs .. 2 ms");
        let uniform_slow: Vec<u64> = (0..n).map(|_| 400_000 + d.next() % 800_000).collect();
        assert_within_bound(&uniform_slow, "uniform 400 ms .. 1.2 s");
        // Exponential with a 20 ms mean: a long tail across many buckets.
        let exponential: Vec<u64> = (0..n).map(|_| (-(1.0 - d.unit()).ln() * 20_000.0) as u64).collect();
        assert_within_bound(&exponential, "exponential, mean 20 ms");
        // Log-uniform from 10 µs to 50 s: every bucket has some.
        let log_uniform: Vec<u64> = (0..n).map(|_| (10.0 * 5e6_f64.powf(d.unit())) as u64).collect();
        assert_within_bound(&log_uniform, "log-uniform 10 µs .. 50 s");
        // Two modes: the p99 sits in the slow one.
        let bimodal: Vec<u64> = (0..n)
            .map(|i| {
                if i % 50 == 0 {
                    700_000 + d.next() % 10_000
                } else {
                    1_000 + d.next() % 500
                }
            })
            .collect();
        assert_within_bound(&bimodal, "98 % at 1 ms, 2 % at 700 ms");
        // Everything at one value: the estimate cannot leave its part.
        assert_within_bound(&vec![612_345; 1_000], "all 612.345 ms");
    }

    #[test]
    fn exported_buckets_count_each_latency_at_most_its_bound() {
        for (i, &bound) in LATENCY_BOUNDS_US.iter().enumerate() {
            let at = recorded(&[bound]).latency_buckets();
            assert_eq!(at[i], 1, "{bound} µs counts in the bucket it bounds: {at:?}");
            let above = recorded(&[bound + 1]).latency_buckets();
            assert_eq!(above[i + 1], 1, "{} µs counts in the next bucket: {above:?}", bound + 1);
        }
        assert_eq!(recorded(&[0]).latency_buckets()[0], 1);
    }

    #[test]
    fn any_duration_is_recorded_and_any_quantile_answered() {
        let s = ColourStats::default();
        for d in [
            Duration::ZERO,
            Duration::from_nanos(999),
            Duration::from_secs(60),
            Duration::MAX,
        ] {
            s.record(200, d);
        }
        let snap = s.snapshot();
        assert_eq!(snap.latency_buckets()[0], 2);
        assert_eq!(snap.latency_buckets()[BUCKETS - 2], 1);
        assert_eq!(snap.latency_buckets()[BUCKETS - 1], 1);
        for q in [f64::NAN, f64::NEG_INFINITY, -1.0, 0.0, 0.5, 1.0, 2.0, f64::INFINITY] {
            assert!(snap.quantile(q).is_some(), "q {q}");
        }
        assert_eq!(snap.quantile(f64::NAN), snap.quantile(0.0));
    }
}
