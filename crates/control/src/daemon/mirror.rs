//! Mirroring during validation (`validate.mirror`): once the smoke test of a release has passed,
//! copies of a sample of the live requests go to it for `duration` (`cutover_proxy::Mirror`),
//! and the release is judged by how their answers compare with the live ones:
//! - its 5xx rate may be at most `max_error_rate` above the live requests' own (a live release
//!   failing for a reason of its own, say a database down, does not fail the new one);
//! - its p99 latency may be at most `max_p99_ratio` times the live one, unless it is within
//!   [`MIRROR_P99_SLACK`] of it.
//!
//! Nothing is judged with fewer than `min_requests` copies answered: the output says so, and the
//! release is validated by its smoke test alone. The window ends when the deployment does (the
//! task running it is aborted): [`Window`] closes it on drop.

use std::sync::Arc;
use std::time::Duration;

use cutover_proxy::{Colour, Mirror, MirrorReport, Proxy};

use crate::config::{MirrorConfig, MIRROR_P99_SLACK};

/// An open mirroring window; closed when dropped.
pub(super) struct Window {
    proxy: Arc<Proxy>,
    service: String,
    mirror: Arc<Mirror>,
}

impl Window {
    /// Opens a window copying live requests of `service` to `to`.
    pub(super) fn open(proxy: &Arc<Proxy>, service: &str, to: Colour, cfg: &MirrorConfig) -> Result<Window, String> {
        let mirror = Arc::new(Mirror::new(to, cfg.sample, &cfg.methods, cfg.max_in_flight));
        proxy
            .mirror(service, mirror.clone())
            .map_err(|e| format!("mirroring could not begin: {e}"))?;
        Ok(Window {
            proxy: proxy.clone(),
            service: service.to_string(),
            mirror,
        })
    }

    /// Closes the window: no more copies are sent (those on their way go on).
    pub(super) fn close(&self) {
        self.proxy.end_mirror(&self.service, &self.mirror);
    }

    /// What the window saw so far.
    pub(super) fn report(&self) -> MirrorReport {
        self.mirror.report()
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        self.proxy.end_mirror(&self.service, &self.mirror);
    }
}

/// What the window is set to do, as the output says it when it opens.
pub(super) fn describe_start(to: Colour, version: &str, cfg: &MirrorConfig) -> String {
    let methods: Vec<&str> = cfg.methods.iter().map(|m| m.as_str()).collect();
    format!(
        "mirroring {} of the live {} requests to {to}@{version} for {:?}; its answers are compared with the live ones",
        percent(cfg.sample),
        methods.join("/"),
        cfg.duration
    )
}

/// Judges a closed window: `Ok` with what it saw when the release passes (or could not be
/// judged), `Err` with why it fails.
pub(super) fn judge(report: &MirrorReport, cfg: &MirrorConfig) -> Result<String, String> {
    let (copies, live) = (&report.copies, &report.live);
    let answered = copies.requests();
    let sent = live.requests();
    // Sent, their live answers in, and still no answer of their own once the window closed (and
    // settled): a release that hangs answers none; each counts as failed.
    let unanswered = sent.saturating_sub(answered);
    let judged = answered + unanswered;
    let mut seen = format!(
        "{answered} copies answered of {sent} sent ({unanswered} still without an answer, counted as failed), {} not \
         sent because max_in_flight = {} copies were running",
        report.dropped, cfg.max_in_flight
    );
    if judged < cfg.min_requests {
        return Ok(format!(
            "{seen}: fewer than min_requests = {}, so not judged; validated by the smoke test alone",
            cfg.min_requests
        ));
    }
    let rate = |errors: u64, of: u64| if of == 0 { 0.0 } else { errors as f64 / of as f64 };
    let (copy_rate, live_rate) = (rate(copies.errors() + unanswered, judged), rate(live.errors(), sent));
    seen.push_str(&format!(
        "; 5xx {} of copies, {} of live",
        percent(copy_rate),
        percent(live_rate)
    ));
    let (copy_p99, live_p99) = (
        copies.quantile(0.99).unwrap_or_default(),
        live.quantile(0.99).unwrap_or_default(),
    );
    seen.push_str(&format!("; p99 {copy_p99:.1?} for copies, {live_p99:.1?} for live"));
    if copy_rate > live_rate + cfg.max_error_rate {
        return Err(format!(
            "the copies of live requests failed more often than the live ones: {seen}; at most {} more is allowed \
             (validate.mirror.max_error_rate)",
            percent(cfg.max_error_rate)
        ));
    }
    // A live release failing beyond the limit itself (fast errors, say) is no baseline for speed.
    if live_rate > cfg.max_error_rate {
        return Ok(format!(
            "{seen}: passed; latency not compared, the live release itself failing more than max_error_rate"
        ));
    }
    let ratio = if live_p99.is_zero() {
        f64::INFINITY
    } else {
        copy_p99.as_secs_f64() / live_p99.as_secs_f64()
    };
    if ratio > cfg.max_p99_ratio && copy_p99.saturating_sub(live_p99) > MIRROR_P99_SLACK {
        return Err(format!(
            "the copies of live requests were slower than the live ones: {seen} ({ratio:.2}x); at most {}x is allowed \
             (validate.mirror.max_p99_ratio)",
            cfg.max_p99_ratio
        ));
    }
    Ok(format!("{seen}: passed"))
}

fn percent(x: f64) -> String {
    let p = x * 100.0;
    if p == p.round() {
        format!("{p:.0}%")
    } else {
        format!("{p:.1}%")
    }
}

/// How long after its end a window's last copies may still be answered: the judging waits this
/// long at most for copies on their way.
pub(super) const SETTLE: Duration = Duration::from_millis(500);

#[cfg(test)]
mod tests {
    use super::*;

    fn report(copies: &[(u16, u64)], live: &[(u16, u64)], dropped: u64) -> MirrorReport {
        MirrorReport {
            live: snapshot(live),
            copies: snapshot(copies),
            dropped,
        }
    }

    /// A snapshot of requests with these (status, milliseconds).
    fn snapshot(rows: &[(u16, u64)]) -> cutover_proxy::StatsSnapshot {
        cutover_proxy::StatsSnapshot::of(rows.iter().map(|&(s, ms)| (s, Duration::from_millis(ms))))
    }

    fn many(n: usize, status: u16, ms: u64) -> Vec<(u16, u64)> {
        vec![(status, ms); n]
    }

    #[test]
    fn a_release_failing_or_slower_than_live_fails_and_too_few_copies_judge_nothing() {
        let cfg = MirrorConfig {
            min_requests: 100,
            ..MirrorConfig::default()
        };
        let ok = many(200, 200, 10);
        // Equal answers pass, and say what was seen.
        let said = judge(&report(&ok, &ok, 3), &cfg).unwrap();
        assert!(
            said.contains("200 copies answered of 200 sent (0 still without"),
            "{said}"
        );
        assert!(said.contains("3 not sent"), "{said}");
        assert!(said.ends_with("passed"), "{said}");
        // 5 % of copies failing, live clean: fails, naming the rates.
        let mut failing = many(190, 200, 10);
        failing.extend(many(10, 500, 10));
        let why = judge(&report(&failing, &ok, 0), &cfg).unwrap_err();
        assert!(
            why.contains("failed more often") && why.contains("5% of copies, 0% of live"),
            "{why}"
        );
        // The same 5 % on live too: not the release's fault.
        assert!(judge(&report(&failing, &failing, 0), &cfg).is_ok());
        // Twice as slow (20 ms against 10 ms): fails past a ratio of 1.5, passes under 2.5.
        let slow = many(200, 200, 20);
        let why = judge(&report(&slow, &ok, 0), &cfg).unwrap_err();
        assert!(why.contains("slower") && why.contains("max_p99_ratio"), "{why}");
        let lenient = MirrorConfig {
            max_p99_ratio: 2.5,
            ..cfg.clone()
        };
        assert!(judge(&report(&slow, &ok, 0), &lenient).is_ok());
        // Sub-millisecond services: three times 0.4 ms is within the slack, so it passes.
        assert!(judge(&report(&many(200, 200, 1), &many(200, 200, 0), 0), &cfg).is_ok());
        // Too few copies: not judged, whatever they say.
        let said = judge(&report(&many(99, 500, 10), &many(99, 200, 10), 0), &cfg).unwrap();
        assert!(said.contains("not judged"), "{said}");
        // A release that hangs: 100 copies sent, none answered, each counted as failed.
        let why = judge(&report(&[], &many(100, 200, 10), 0), &cfg).unwrap_err();
        assert!(
            why.contains("0 copies answered of 100 sent (100 still without an answer"),
            "{why}"
        );
        assert!(why.contains("100% of copies"), "{why}");
        // A live release failing fast is no baseline for latency: its fix, slower, passes.
        let mut live_failing = many(150, 200, 40);
        live_failing.extend(many(50, 500, 1));
        let said = judge(&report(&many(200, 200, 40), &live_failing, 0), &cfg).unwrap();
        assert!(said.contains("latency not compared"), "{said}");
    }
}
