//! Request counters of one colour of one service: how many, with which status class, and how long
//! until the response head. The control plane judges a new colour from them after a switch (error
//! rate, p99), and they feed the metrics endpoint.
//!
//! Recording is three relaxed atomic increments; reading takes a snapshot, and the difference of
//! two snapshots describes the requests in between.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the latency buckets, in microseconds: roughly doubling from 100 µs to 60 s.
pub const LATENCY_BOUNDS_US: [u64; 20] = [
    100, 250, 500, 1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 64_000, 125_000, 250_000, 500_000, 1_000_000, 2_000_000,
    4_000_000, 8_000_000, 16_000_000, 32_000_000, 60_000_000,
];
const BUCKETS: usize = LATENCY_BOUNDS_US.len() + 1; // the last one is "above every bound"

/// Live counters; shared by every route table that contains the colour.
#[derive(Debug, Default)]
pub struct ColourStats {
    /// Index 0: 1xx, 1: 2xx, ... 4: 5xx.
    by_class: [AtomicU64; 5],
    latency: [AtomicU64; BUCKETS],
    latency_sum_us: AtomicU64,
}

/// Counts since the colour's counters were created; subtract two to get a window.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub by_class: [u64; 5],
    pub latency: [u64; BUCKETS],
    pub latency_sum_us: u64,
}

impl ColourStats {
    pub(crate) fn record(&self, status: u16, elapsed: Duration) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.by_class[class].fetch_add(1, Ordering::Relaxed);
        let us = elapsed.as_micros().min(u64::MAX as u128) as u64;
        let bucket = LATENCY_BOUNDS_US.iter().position(|&b| us <= b).unwrap_or(BUCKETS - 1);
        self.latency[bucket].fetch_add(1, Ordering::Relaxed);
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
    pub fn requests(&self) -> u64 {
        self.by_class.iter().sum()
    }

    /// Responses with a 5xx status (including the proxy's own 502/503/504).
    pub fn errors(&self) -> u64 {
        self.by_class[4]
    }

    /// The counts between `earlier` and this snapshot.
    pub fn since(&self, earlier: &StatsSnapshot) -> StatsSnapshot {
        StatsSnapshot {
            by_class: std::array::from_fn(|i| self.by_class[i].saturating_sub(earlier.by_class[i])),
            latency: std::array::from_fn(|i| self.latency[i].saturating_sub(earlier.latency[i])),
            latency_sum_us: self.latency_sum_us.saturating_sub(earlier.latency_sum_us),
        }
    }

    /// An upper bound of the latency below which `q` (0..=1) of the requests fall: the bound of
    /// the bucket holding that rank. `None` without requests.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let total: u64 = self.latency.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, &n) in self.latency.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let us = LATENCY_BOUNDS_US.get(i).copied().unwrap_or(u64::MAX);
                return Some(Duration::from_micros(us));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(snap.quantile(0.5), Some(Duration::from_micros(100)));
        assert_eq!(snap.quantile(0.99), Some(Duration::from_micros(4_000)));
        assert_eq!(snap.quantile(1.0), Some(Duration::from_micros(u64::MAX)));
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
        assert_eq!(StatsSnapshot::default().quantile(0.99), None);
    }
}
