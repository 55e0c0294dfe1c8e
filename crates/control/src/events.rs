//! What happened to a service, as data: one kind per event, the service and deployment it
//! concerns, a line for people and, where there is one, the reason. The daemon publishes them;
//! the event stream (`/v1/events`), `cutover deploy`, the webhooks, the metrics and the dashboard
//! all read these fields, and none parses the message back.

use serde::{Deserialize, Serialize};

/// The kinds of event, named in kebab-case on the wire (`"went-live"`, `"rolled-back"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// A deployment began.
    Started,
    /// A schema-change command (`migrate`) ran: its step, exit status, duration and output tail
    /// (`reason` when it failed).
    Migration,
    /// A colour's instances were started, adopted, stopped or moved.
    Instances,
    /// Every instance of the release being deployed passed its health checks.
    Healthy,
    /// An instance was taken out of rotation by its health checks (`reason`: the last failure).
    Unhealthy,
    /// The release passed validation.
    Validated,
    /// Validated; waiting for `cutover promote`.
    AwaitingPromotion,
    /// Live traffic moved to the release; its watch begins.
    Promoted,
    /// The route table's live colour changed (the one atomic store).
    Switch,
    /// The post-promotion watch (re)started or judged.
    Watch,
    /// The release is live for good (ends its deployment).
    WentLive,
    /// The deployment stopped before live traffic moved (ends it; `reason`).
    Aborted,
    /// Live traffic went back to the previous release (ends the deployment; `reason`).
    RolledBack,
    /// The daemon stopped while the deployment ran (ends it).
    Interrupted,
    /// The warm colour was stopped.
    Retired,
    /// A drained colour finished, or reached its deadline.
    Drained,
    /// The smoke test failed (`reason`).
    Smoke,
    /// Copies of live requests began to go to the release being validated (`validate.mirror`),
    /// or were judged (`reason` when they failed).
    Mirror,
    /// A control-plane task of the service failed (`reason`: its panic message) and is being
    /// restarted from the committed state; its instances and live traffic were left as they were.
    Fault,
    /// The service's live traffic was paused, resumed, put in or taken out of maintenance.
    Hold,
    /// A release of several services began, switched them in one store, went live, or ended
    /// otherwise (on each of its services' streams).
    Release,
}

impl EventKind {
    /// Every kind, in the order a deployment meets them.
    pub const ALL: &'static [EventKind] = &[
        EventKind::Started,
        EventKind::Migration,
        EventKind::Instances,
        EventKind::Healthy,
        EventKind::Unhealthy,
        EventKind::Smoke,
        EventKind::Mirror,
        EventKind::Validated,
        EventKind::AwaitingPromotion,
        EventKind::Promoted,
        EventKind::Switch,
        EventKind::Watch,
        EventKind::WentLive,
        EventKind::Aborted,
        EventKind::RolledBack,
        EventKind::Interrupted,
        EventKind::Drained,
        EventKind::Retired,
        EventKind::Fault,
        EventKind::Hold,
        EventKind::Release,
    ];

    /// The name on the wire and in `[webhooks] events`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Started => "started",
            EventKind::Migration => "migration",
            EventKind::Instances => "instances",
            EventKind::Healthy => "healthy",
            EventKind::Unhealthy => "unhealthy",
            EventKind::Validated => "validated",
            EventKind::AwaitingPromotion => "awaiting-promotion",
            EventKind::Promoted => "promoted",
            EventKind::Switch => "switch",
            EventKind::Watch => "watch",
            EventKind::WentLive => "went-live",
            EventKind::Aborted => "aborted",
            EventKind::RolledBack => "rolled-back",
            EventKind::Interrupted => "interrupted",
            EventKind::Retired => "retired",
            EventKind::Drained => "drained",
            EventKind::Smoke => "smoke",
            EventKind::Mirror => "mirror",
            EventKind::Fault => "fault",
            EventKind::Hold => "hold",
            EventKind::Release => "release",
        }
    }

    /// The kind named `name`, if there is one.
    pub fn from_name(name: &str) -> Option<EventKind> {
        EventKind::ALL.iter().copied().find(|k| k.as_str() == name)
    }

    /// Whether an event of this kind ends its deployment.
    pub fn ends_deployment(self) -> bool {
        matches!(
            self,
            EventKind::WentLive | EventKind::Aborted | EventKind::RolledBack | EventKind::Interrupted
        )
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for EventKind {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// One event, as the daemon publishes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notice {
    /// Increases by one per notice over the daemon's life.
    pub seq: u64,
    /// Unix milliseconds.
    pub at: u64,
    pub service: String,
    pub deployment: Option<u64>,
    pub kind: EventKind,
    /// One line for people.
    pub message: String,
    /// Why: the failure that aborted or rolled back a deployment, failed a smoke test, or took
    /// an instance out of rotation. `None` for other kinds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// True for the kinds that end a deployment (see [`EventKind::ends_deployment`]).
    pub terminal: bool,
    /// In a fleet: the node that made the notice, when it is not this one (the leader's
    /// notices are repeated by every node; webhooks and metrics count them on the leader only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_one_name_that_names_it_back() {
        for &k in EventKind::ALL {
            assert_eq!(EventKind::from_name(k.as_str()), Some(k));
            assert_eq!(serde_json::to_value(k).unwrap(), serde_json::json!(k.as_str()));
        }
        let mut names: Vec<_> = EventKind::ALL.iter().map(|k| k.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), EventKind::ALL.len());
        assert_eq!(EventKind::from_name("went_live"), None);
    }
}
