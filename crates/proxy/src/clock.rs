//! Instants and durations that never overflow: a timeout of `Duration::MAX` means "for ever",
//! not a panic.

use std::time::Duration;

/// The instant `d` from now; for a duration past what an instant can hold ("for ever"), one a
/// century away.
pub(crate) fn instant_in(d: Duration) -> tokio::time::Instant {
    instant_after(tokio::time::Instant::now(), d)
}

/// `t + d`, or a century after `t` when that is past what an instant can hold.
pub(crate) fn instant_after(t: tokio::time::Instant, d: Duration) -> tokio::time::Instant {
    t.checked_add(d)
        .unwrap_or_else(|| t + Duration::from_secs(100 * 365 * 24 * 3600))
}

/// `d` in whole milliseconds, at most `u64::MAX`.
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
