//! `/metrics`: what is counted and how it is read. The registry encodes OpenMetrics; the formats a
//! scrape is answered in are [`crate::exposition`]'s.
//!
//! Everything is read at scrape time from what already exists: the proxy's per-colour counters and
//! gauges (through the current route table), the daemon's status and its TLS certificates
//! (expiry, load failures), plus three counters kept here
//! from the daemon's event stream (switches, deployments by how they ended, and faults of the
//! control plane). Recording on the
//! request path is the proxy's three relaxed atomic increments; nothing here touches it.
//!
//! Label values come from the configuration (service names), the lifecycle (colours, results,
//! versions given by the operator) or the drivers (instance addresses), never from client input.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use cutover_proxy::{Colour, LATENCY_BOUNDS_US};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::daemon::Daemon;
use crate::exposition::Format;

#[derive(Default, Debug)]
struct Counts {
    /// service -> switches
    switches: BTreeMap<String, u64>,
    /// (service, result) -> deployments
    deployments: BTreeMap<(String, String), u64>,
    /// service -> control-plane faults ([`crate::events::EventKind::Fault`])
    faults: BTreeMap<String, u64>,
}

/// The metrics of one daemon.
pub struct Metrics {
    registry: Registry,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Metrics {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Metrics {
    /// Starts counting the daemon's switches, deployment results and faults.
    pub fn new(daemon: Daemon) -> Metrics {
        let counts = Arc::new(Mutex::new(Counts::default()));
        let mut notices = daemon.subscribe();
        let c = counts.clone();
        let task = tokio::spawn(async move {
            loop {
                let n = match notices.recv().await {
                    Ok(n) => n,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                if n.from.is_some() {
                    continue; // another node's, counted there
                }
                let mut counts = c.lock().unwrap_or_else(|p| p.into_inner());
                if n.kind == crate::events::EventKind::Switch {
                    *counts.switches.entry(n.service.clone()).or_default() += 1;
                }
                if n.kind == crate::events::EventKind::Fault {
                    *counts.faults.entry(n.service.clone()).or_default() += 1;
                }
                if n.terminal {
                    *counts
                        .deployments
                        .entry((n.service.clone(), n.kind.as_str().to_string()))
                        .or_default() += 1;
                }
            }
        });
        let mut registry = Registry::with_prefix("cutover");
        registry.register_collector(Box::new(DaemonCollector { daemon, counts }));
        Metrics { registry, task }
    }

    /// The current metrics, in `format`.
    pub fn render(&self, format: Format) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        match format {
            Format::OpenMetrics => out,
            Format::Text004 => crate::exposition::to_text_004(&out),
        }
    }
}

struct DaemonCollector {
    daemon: Daemon,
    counts: Arc<Mutex<Counts>>,
}

impl std::fmt::Debug for DaemonCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DaemonCollector")
    }
}

impl Collector for DaemonCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let table = self.daemon.proxy().table();
        let services: Vec<_> = table.services().iter().collect();
        let colours = [Colour::Blue, Colour::Green];
        // One snapshot of each colour's counters serves both families, so that a scrape's request
        // counts and histogram describe the same requests.
        let snapshots: Vec<_> = services
            .iter()
            .flat_map(|s| colours.map(|c| (*s, c, s.pool(c).stats())))
            .collect();

        let mut e = encoder.encode_descriptor(
            "requests",
            "Requests answered, by service, colour and status class (including the proxy's own 5xx)",
            None,
            MetricType::Counter,
        )?;
        for (s, c, stats) in &snapshots {
            for (i, class) in ["1xx", "2xx", "3xx", "4xx", "5xx"].iter().enumerate() {
                let labels = [("service", &*s.name), ("colour", c.as_str()), ("class", class)];
                ConstCounter::new(stats.by_class[i]).encode(e.encode_family(&labels)?)?;
            }
        }

        let mut e = encoder.encode_descriptor(
            "request_duration_seconds",
            "Time from a request's head to its response head, by service and colour",
            None,
            MetricType::Histogram,
        )?;
        for (s, c, stats) in &snapshots {
            // Per-bucket counts: the encoder makes them cumulative. The last bound is f64::MAX,
            // which the encoder spells `+Inf` (infinity itself would come out as `inf`).
            let buckets: Vec<(f64, u64)> = stats
                .latency_buckets()
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    (
                        LATENCY_BOUNDS_US.get(i).map(|us| *us as f64 / 1e6).unwrap_or(f64::MAX),
                        *n,
                    )
                })
                .collect();
            let total: u64 = buckets.iter().map(|(_, n)| n).sum();
            let labels = [("service", &*s.name), ("colour", c.as_str())];
            e.encode_family(&labels)?.encode_histogram::<()>(
                stats.latency_sum_us as f64 / 1e6,
                total,
                &buckets,
                None,
            )?;
        }

        // Mirroring (`validate.mirror`): copies each colour answered, and those not sent.
        let mirrored: Vec<_> = services
            .iter()
            .flat_map(|s| colours.map(|c| (*s, c, s.pool(c).mirror_totals())))
            .collect();
        let mut e = encoder.encode_descriptor(
            "mirror_requests",
            "Copies of live requests answered by a colour being validated (validate.mirror), by service, colour and status class (no answer counts as 5xx)",
            None,
            MetricType::Counter,
        )?;
        for (s, c, totals) in &mirrored {
            for (i, class) in ["1xx", "2xx", "3xx", "4xx", "5xx"].iter().enumerate() {
                let labels = [("service", &*s.name), ("colour", c.as_str()), ("class", class)];
                ConstCounter::new(totals.copies.by_class[i]).encode(e.encode_family(&labels)?)?;
            }
        }
        let mut e = encoder.encode_descriptor(
            "mirror_dropped",
            "Live requests sampled for mirroring and not copied because validate.mirror.max_in_flight copies were running, by service and the colour they were for",
            None,
            MetricType::Counter,
        )?;
        for (s, c, totals) in &mirrored {
            let labels = [("service", &*s.name), ("colour", c.as_str())];
            ConstCounter::new(totals.dropped).encode(e.encode_family(&labels)?)?;
        }

        // Sticky sessions, for the services that have them.
        let sticky: Vec<_> = services
            .iter()
            .filter_map(|s| s.affinity.as_ref().map(|a| (&*s.name, a.snapshot())))
            .collect();
        if !sticky.is_empty() {
            let mut e = encoder.encode_descriptor(
                "affinity_pinned_requests",
                "Requests sent by their affinity cookie to a colour that was not live (pinned), by service and colour",
                None,
                MetricType::Counter,
            )?;
            for (name, snap) in &sticky {
                for (i, c) in colours.iter().enumerate() {
                    let labels = [("service", *name), ("colour", c.as_str())];
                    ConstCounter::new(snap.pinned[i]).encode(e.encode_family(&labels)?)?;
                }
            }
            let mut e = encoder.encode_descriptor(
                "affinity_cookies_minted",
                "Affinity cookies set on responses (new sessions, renewed ones), by service",
                None,
                MetricType::Counter,
            )?;
            for (name, snap) in &sticky {
                ConstCounter::new(snap.minted).encode(e.encode_family(&[("service", *name)])?)?;
            }
            let mut e = encoder.encode_descriptor(
                "affinity_app_sessions",
                "Sessions of the application's own cookie (app_cookie) followed now, by service",
                None,
                MetricType::Gauge,
            )?;
            for s in &services {
                if let Some(app) = s.affinity.as_ref().and_then(|a| a.app_sessions()) {
                    ConstGauge::new(app.len() as i64).encode(e.encode_family(&[("service", &*s.name)])?)?;
                }
            }
            let mut e = encoder.encode_descriptor(
                "affinity_cookies_ignored",
                "Affinity cookies presented and not followed, by service and reason (malformed; invalid: forged, \
                 foreign or for a release the colour no longer runs; expired; unpinned: for a colour no longer pinned)",
                None,
                MetricType::Counter,
            )?;
            for (name, snap) in &sticky {
                for (i, why) in cutover_proxy::affinity::Ignored::ALL.iter().enumerate() {
                    let labels = [("service", *name), ("reason", why.as_str())];
                    ConstCounter::new(snap.ignored[i]).encode(e.encode_family(&labels)?)?;
                }
            }
        }

        let mut e = encoder.encode_descriptor(
            "in_flight_requests",
            "Requests in flight on the colour's current generation",
            None,
            MetricType::Gauge,
        )?;
        for s in &services {
            for c in colours {
                let labels = [("service", &*s.name), ("colour", c.as_str())];
                ConstGauge::new(s.pool(c).in_flight() as i64).encode(e.encode_family(&labels)?)?;
            }
        }

        let mut e = encoder.encode_descriptor(
            "upgraded_connections",
            "Open upgraded connections (WebSocket) on the colour's current generation",
            None,
            MetricType::Gauge,
        )?;
        for s in &services {
            for c in colours {
                let labels = [("service", &*s.name), ("colour", c.as_str())];
                ConstGauge::new(s.pool(c).generation().upgraded() as i64).encode(e.encode_family(&labels)?)?;
            }
        }

        let mut e = encoder.encode_descriptor(
            "instance_healthy",
            "1 when the instance passes its health checks and is in rotation",
            None,
            MetricType::Gauge,
        )?;
        for s in &services {
            for c in colours {
                for i in s.pool(c).instances.iter() {
                    let addr = i.addr.to_string();
                    let labels = [
                        ("service", &*s.name),
                        ("colour", c.as_str()),
                        ("instance", addr.as_str()),
                    ];
                    ConstGauge::new(i.healthy as i64).encode(e.encode_family(&labels)?)?;
                }
            }
        }

        let mut e = encoder.encode_descriptor(
            "live",
            "The live colour and version of each service (value 1)",
            None,
            MetricType::Gauge,
        )?;
        for view in self.daemon.status() {
            if let Some(live) = &view.live {
                let labels = [
                    ("service", view.name.as_str()),
                    ("colour", live.colour.as_str()),
                    ("version", live.version.as_str()),
                ];
                ConstGauge::new(1i64).encode(e.encode_family(&labels)?)?;
            }
        }

        if let Some(fleet) = self.daemon.fleet_local() {
            let node = [("node", fleet.node.as_str())];
            let mut e = encoder.encode_descriptor(
                "fleet_connected",
                "1 while this node follows the fleet's route states from etcd (its watch open, its lease alive); 0 while it serves the last revision applied (fail static)",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(i64::from(fleet.connected)).encode(e.encode_family(&node)?)?;
            let mut e = encoder.encode_descriptor(
                "fleet_member",
                "1 while this node's lease is alive in etcd (it counts in acknowledgements and may lead)",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(i64::from(fleet.member)).encode(e.encode_family(&node)?)?;
            let mut e = encoder.encode_descriptor(
                "fleet_leader",
                "1 while this node leads the fleet (runs the deployments)",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(i64::from(fleet.leading)).encode(e.encode_family(&node)?)?;
            let mut e = encoder.encode_descriptor(
                "fleet_applied_revision",
                "The etcd revision of each service's route state this node applies now",
                None,
                MetricType::Gauge,
            )?;
            for (service, revision) in &fleet.applied {
                ConstGauge::new(i64::try_from(*revision).unwrap_or(i64::MAX))
                    .encode(e.encode_family(&[("node", fleet.node.as_str()), ("service", service.as_str())])?)?;
            }
        }

        let certificates = self.daemon.certificates();
        if !certificates.is_empty() {
            let mut e = encoder.encode_descriptor(
                "tls_certificate_expiry_timestamp_seconds",
                "When the certificate served now expires (its notAfter), unix time, by certificate (\"default\" or the service)",
                None,
                MetricType::Gauge,
            )?;
            for c in certificates.iter() {
                if let Some(ms) = c.not_after {
                    ConstGauge::new((ms / 1000) as i64)
                        .encode(e.encode_family(&[("certificate", c.name.as_str())])?)?;
                }
            }
            let mut e = encoder.encode_descriptor(
                "tls_certificate_load_failing",
                "1 while a certificate's files fail to load and the certificate loaded before is served instead",
                None,
                MetricType::Gauge,
            )?;
            for c in certificates.iter() {
                ConstGauge::new(i64::from(c.error.is_some()))
                    .encode(e.encode_family(&[("certificate", c.name.as_str())])?)?;
            }
            let mut e = encoder.encode_descriptor(
                "tls_certificate_errors",
                "Failed loads of a certificate's files since the daemon started (each kept the previous certificate)",
                None,
                MetricType::Counter,
            )?;
            for c in certificates.iter() {
                ConstCounter::new(c.errors).encode(e.encode_family(&[("certificate", c.name.as_str())])?)?;
            }
        }

        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let mut e = encoder.encode_descriptor("switches", "Switches of the live colour", None, MetricType::Counter)?;
        for s in &services {
            let n = counts.switches.get(&*s.name).copied().unwrap_or(0);
            ConstCounter::new(n).encode(e.encode_family(&[("service", &*s.name)])?)?;
        }
        let mut e = encoder.encode_descriptor(
            "deployments",
            "Deployments that ended, by result (went-live, aborted, rolled-back, interrupted)",
            None,
            MetricType::Counter,
        )?;
        for ((service, result), n) in counts.deployments.iter() {
            let labels = [("service", service.as_str()), ("result", result.as_str())];
            ConstCounter::new(*n).encode(e.encode_family(&labels)?)?;
        }
        let mut e = encoder.encode_descriptor(
            "control_faults",
            "Panics in the control of a service (its actor restarted from the committed state; live traffic untouched)",
            None,
            MetricType::Counter,
        )?;
        for s in &services {
            let n = counts.faults.get(&*s.name).copied().unwrap_or(0);
            ConstCounter::new(n).encode(e.encode_family(&[("service", &*s.name)])?)?;
        }
        Ok(())
    }
}
