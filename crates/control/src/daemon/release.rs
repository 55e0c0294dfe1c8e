//! Releases of several services switched as one (`cutover deploy web api --version v2`).
//!
//! Each service of a release gets a deployment of its own, held: it is provisioned and
//! validated as any deployment, then waits for the others. Once every one is validated, the
//! release promotes them together: each service's actor works out its promotion without
//! committing it (`Msg::Hold`), the release commits all of them in one store transaction
//! ([`StateStore::commit_many`]), switches every service in one route table store
//! ([`cutover_proxy::Proxy::switch_many`]) and lets the actors carry out the rest (drains,
//! watches). No request sees one service switched and another not. A service that fails before
//! the switch aborts the others; one whose watch rolls it back rolls the others back, in one
//! store; `rollback` of a release switches every service back in one store.
//!
//! A release's record is a value of the store (`release/{id}`), rewritten at each step; after a
//! restart an unfinished release is followed again (its services' promotions were committed
//! together or not at all).

use std::net::SocketAddr;
use std::time::Duration;

use cutover_proxy::Colour;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::{off_async_store, unix_ms, CommandError, Daemon, EventKind, Msg};
use crate::lifecycle::{DeploymentId, Event, RollbackKind, Transition};
use crate::store::{Audit, Revision, ServiceCommit};

/// How often a release looks at its services at least; it also looks at each notice of the
/// daemon (a step of one of them), so most changes are seen at once.
const POLL: Duration = Duration::from_millis(50);

/// Waits for the next notice of the daemon, or [`POLL`], whichever comes first.
async fn next_change(notices: &mut tokio::sync::broadcast::Receiver<crate::events::Notice>) {
    let _ = tokio::time::timeout(POLL, notices.recv()).await;
}

/// The store key of the last release id given out.
const SEQ_KEY: &str = "release-seq";

/// One service of a release, as `cutover deploy` names it.
#[derive(Clone, Debug)]
pub struct ReleaseRequest {
    pub service: String,
    pub version: String,
    /// For a static service: the new release's instances.
    pub upstreams: Vec<SocketAddr>,
}

/// A release, as the store keeps it and the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseRecord {
    pub id: u64,
    pub members: Vec<Member>,
    /// `deploying`, `switched` (live on every service, being watched), `live`, `aborted`,
    /// `rolled_back` or `interrupted`.
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub started_at: u64,
    /// When every service's deployment was validated (unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validated_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switched_at: Option<u64>,
    /// How long the switch took, from asking each service for its promotion to the table
    /// store, the one store transaction included (microseconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switch_us: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<u64>,
    pub actor: String,
}

impl ReleaseRecord {
    pub fn finished(&self) -> bool {
        matches!(self.status.as_str(), "live" | "aborted" | "rolled_back" | "interrupted")
    }
}

/// One service of a release and its deployment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub service: String,
    pub version: String,
    pub deployment: u64,
    /// The colour the release goes live on for this service.
    pub colour: String,
}

/// Where a member stands, as its service's state says.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Standing {
    /// Its deployment is in progress, in this phase.
    InProgress(String),
    /// Its deployment ended, and its release is live.
    Live,
    /// Its deployment ended otherwise (aborted, interrupted, rolled back), or another release is
    /// live on the service now.
    Gone,
}

fn key(id: u64) -> String {
    format!("release/{id:010}")
}

impl Daemon {
    /// Starts a release of several services: each one's deployment is held until all are
    /// validated, then all switch in one store. Returns once every deployment has started; the
    /// release goes on in the background (see the module documentation).
    pub async fn release(&self, requests: Vec<ReleaseRequest>, actor: &str) -> Result<ReleaseRecord, CommandError> {
        if self.shared.fleet.is_some() {
            return Err(CommandError::Conflict(
                "a release of several services switched as one is not available in a fleet yet; deploy the services \
                 one at a time"
                    .into(),
            ));
        }
        if requests.is_empty() {
            return Err(CommandError::BadRequest(
                "a release names at least one service, e.g. `cutover deploy web api --version v2`".into(),
            ));
        }
        for (n, r) in requests.iter().enumerate() {
            self.known(&r.service)?;
            if requests[..n].iter().any(|o| o.service == r.service) {
                return Err(CommandError::BadRequest(format!(
                    "service {} is named twice in the release; name each service once",
                    r.service
                )));
            }
        }
        // One release starts at a time: its id, and its services' deployments, before another's.
        let _starting = self.shared.release_start.lock().await;
        // One deployment of a service at a time: refused before anything starts.
        let busy: Vec<String> = {
            let views = self.shared.views.lock().unwrap_or_else(|p| p.into_inner());
            requests
                .iter()
                .filter_map(|r| {
                    let d = views.get(&r.service)?.deployment.as_ref()?;
                    Some(format!("{} (deployment {} of {})", r.service, d.id, d.version))
                })
                .collect()
        };
        if !busy.is_empty() {
            return Err(CommandError::Conflict(format!(
                "a deployment is in progress on {}; a release touching a service waits until its deployment ends \
                 (`cutover status`), or abort it first",
                busy.join(", ")
            )));
        }
        let store = self.shared.store.clone();
        let id = off_async_store(move || {
            let last = store
                .get_value(SEQ_KEY)?
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
            store.set_value(SEQ_KEY, Some(&(last + 1).to_string()))?;
            Ok(last + 1)
        })
        .await
        .map_err(|e| CommandError::Store(e.to_string()))?;
        let mut record = ReleaseRecord {
            id,
            members: Vec::new(),
            status: "deploying".into(),
            reason: None,
            started_at: unix_ms(std::time::SystemTime::now()),
            validated_at: None,
            switched_at: None,
            switch_us: None,
            ended_at: None,
            actor: actor.to_string(),
        };
        self.shared.barriers.lock().unwrap_or_else(|p| p.into_inner()).insert(
            id,
            (
                requests.iter().map(|r| r.service.clone()).collect(),
                tokio::sync::watch::channel(Default::default()).0,
            ),
        );
        for r in &requests {
            let (reply, rx) = oneshot::channel();
            let msg = Msg::Deploy {
                version: r.version.clone(),
                upstreams: r.upstreams.clone(),
                actor: format!("{actor} (release {id})"),
                held: Some(id),
                reply,
            };
            let started = match self.actor(&r.service) {
                Ok(tx) => match tx.send(msg).await {
                    Ok(()) => rx.await.map_err(|_| self.unanswered(&r.service)).and_then(|r| r),
                    Err(_) => Err(CommandError::ShuttingDown),
                },
                Err(e) => Err(e),
            };
            match started {
                Ok(deployment) => {
                    let colour = self
                        .shared
                        .views
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get(&r.service)
                        .and_then(|v| v.deployment.as_ref().map(|d| d.colour.clone()))
                        .unwrap_or_default();
                    record.members.push(Member {
                        service: r.service.clone(),
                        version: r.version.clone(),
                        deployment,
                        colour,
                    });
                }
                Err(e) => {
                    let reason = format!("service {}: {e}", r.service);
                    self.abort_members(&record).await;
                    self.end_release(&mut record, "aborted", reason.clone()).await;
                    return Err(match e {
                        CommandError::BadRequest(_) => CommandError::BadRequest(format!("release {id}: {reason}")),
                        _ => CommandError::Conflict(format!("release {id}: {reason}")),
                    });
                }
            }
        }
        self.save_release(&record).await;
        self.release_notice(
            &record,
            format!(
                "release {id} started: {}",
                record
                    .members
                    .iter()
                    .map(|m| format!("{} {} (deployment {})", m.service, m.version, m.deployment))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
        tokio::spawn(self.clone().follow_release(record.clone()));
        Ok(record)
    }

    /// The release `id`, as last recorded.
    pub async fn release_record(&self, id: u64) -> Result<Option<ReleaseRecord>, CommandError> {
        let store = self.shared.store.clone();
        let text = off_async_store(move || store.get_value(&key(id)))
            .await
            .map_err(|e| CommandError::Store(e.to_string()))?;
        Ok(text.and_then(|t| serde_json::from_str(&t).ok()))
    }

    /// The last `limit` releases, newest first.
    pub async fn releases(&self, limit: usize) -> Result<Vec<ReleaseRecord>, CommandError> {
        let store = self.shared.store.clone();
        let last = off_async_store(move || store.get_value(SEQ_KEY))
            .await
            .map_err(|e| CommandError::Store(e.to_string()))?
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        let mut out = Vec::new();
        for id in (1..=last).rev().take(limit) {
            if let Some(r) = self.release_record(id).await? {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// Rolls release `id` back: every service whose release is still live goes back to its warm
    /// colour, all in one store. Refused, changing nothing, when one of them has no warm colour
    /// left (a cold rollback cannot switch with the others).
    pub async fn rollback_release(&self, id: u64, actor: &str) -> Result<ReleaseRecord, CommandError> {
        let Some(mut record) = self.release_record(id).await? else {
            return Err(CommandError::BadRequest(format!(
                "there is no release {id}; `cutover releases` lists them"
            )));
        };
        if matches!(
            record.status.as_str(),
            "aborted" | "rolled_back" | "interrupted" | "deploying"
        ) {
            return Err(CommandError::Conflict(format!(
                "release {id} is {}: nothing of it is live to roll back",
                record.status.replace('_', " ")
            )));
        }
        let targets: Vec<Member> = record
            .members
            .iter()
            .filter(|m| self.standing(m) == Standing::Live || self.in_watch(m))
            .cloned()
            .collect();
        if targets.is_empty() {
            return Err(CommandError::Conflict(format!(
                "release {id}: none of its services serves it any more (each was deployed again or rolled back since); \
                 nothing to roll back"
            )));
        }
        self.switch_members(&record, &targets, true, actor).await?;
        record.status = "rolled_back".into();
        record.reason = Some(format!("requested by {actor}"));
        record.ended_at = Some(unix_ms(std::time::SystemTime::now()));
        self.save_release(&record).await;
        self.release_notice(&record, format!("release {id} rolled back in one store"));
        Ok(record)
    }

    /// After a start: follows every release that had not ended. One still deploying was
    /// interrupted with its services' deployments (they are never promoted without it); one
    /// switched goes on being watched.
    pub(super) async fn resume_releases(&self) {
        let Ok(list) = self.releases(20).await else { return };
        for record in list.into_iter().filter(|r| !r.finished()) {
            let daemon = self.clone();
            match record.status.as_str() {
                "switched" => {
                    tokio::spawn(async move { daemon.watch_release(record).await });
                }
                _ => {
                    tokio::spawn(daemon.follow_release(record));
                }
            }
        }
    }

    /// Follows a release to its end: the switch of all once all are validated, then their
    /// watches.
    async fn follow_release(self, mut record: ReleaseRecord) {
        let mut notices = self.shared.notices.subscribe();
        // When only services that waited for the others have ended: since when (the failure
        // of the one they waited for follows within moments, and is the one to name).
        let mut waiters_gone: Option<tokio::time::Instant> = None;
        // Until every deployment is validated; one that ends otherwise ends the release.
        loop {
            if self.release_ended_elsewhere(&record).await {
                return;
            }
            let standings: Vec<(Member, Standing)> =
                record.members.iter().map(|m| (m.clone(), self.standing(m))).collect();
            // Switched before a restart (the switch was committed, its record not yet saved).
            if standings
                .iter()
                .any(|(_, s)| *s == Standing::InProgress("watching".into()))
            {
                record.status = "switched".into();
                self.save_release(&record).await;
                return self.watch_release(record).await;
            }
            let gone: Vec<&Member> = standings
                .iter()
                .filter(|(_, s)| *s == Standing::Gone)
                .map(|(m, _)| m)
                .collect();
            if !gone.is_empty() {
                // Named: the service that failed, rather than one that waited for it.
                let mut first = None;
                for m in &gone {
                    let why = self.member_outcome(m).await;
                    let waited = why.contains(super::WAITED_FOR_RELEASE);
                    if first.is_none() || (!waited && first.as_ref().is_some_and(|(_, w, _)| *w)) {
                        first = Some((m.service.clone(), waited, why));
                    }
                }
                let (service, waited, why) = first.unwrap_or_default();
                let since = *waiters_gone.get_or_insert_with(tokio::time::Instant::now);
                if !waited || since.elapsed() > Duration::from_secs(2) {
                    self.end_release(&mut record, "aborted", format!("service {service}: {why}"))
                        .await;
                    self.abort_members(&record).await;
                    return;
                }
            }
            // A service's first release goes live once validated: nothing to switch from.
            let ready = |s: &Standing| *s == Standing::Live || *s == Standing::InProgress("ready to promote".into());
            if standings.iter().all(|(_, s)| ready(s)) {
                break;
            }
            next_change(&mut notices).await;
        }
        record.validated_at = Some(unix_ms(std::time::SystemTime::now()));
        let members: Vec<Member> = record
            .members
            .iter()
            .filter(|m| self.standing(m) != Standing::Live)
            .cloned()
            .collect();
        let switching = std::time::Instant::now();
        let switched = self
            .switch_members(&record, &members, false, &record.actor.clone())
            .await;
        record.switch_us = Some(switching.elapsed().as_micros() as u64);
        if let Err(e) = switched {
            self.end_release(&mut record, "aborted", format!("the switch failed: {e}"))
                .await;
            self.abort_members(&record).await;
            return;
        }
        record.status = "switched".into();
        record.switched_at = Some(unix_ms(std::time::SystemTime::now()));
        self.save_release(&record).await;
        self.release_notice(
            &record,
            format!(
                "release {} switched in one store: {}",
                record.id,
                record
                    .members
                    .iter()
                    .map(|m| format!("{} {} on {}", m.service, m.version, m.colour))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
        self.watch_release(record).await;
    }

    /// After the switch: until every watch passed (the release is live), or one service's
    /// watch rolled it back, which rolls the others back in one store.
    async fn watch_release(&self, mut record: ReleaseRecord) {
        let mut notices = self.shared.notices.subscribe();
        // The services whose release went live: one deployed again later is not a failure.
        let mut went_live = std::collections::BTreeSet::new();
        loop {
            if self.release_ended_elsewhere(&record).await {
                return;
            }
            let standings: Vec<(Member, Standing)> =
                record.members.iter().map(|m| (m.clone(), self.standing(m))).collect();
            for (m, s) in &standings {
                if *s == Standing::Live {
                    went_live.insert(m.service.clone());
                }
            }
            if standings.iter().all(|(m, _)| went_live.contains(&m.service)) {
                self.end_release(&mut record, "live", String::new()).await;
                return;
            }
            let failed = standings
                .iter()
                .find(|(m, s)| *s == Standing::Gone && !went_live.contains(&m.service));
            if let Some((m, _)) = failed {
                let why = self.member_outcome(m).await;
                let others: Vec<Member> = standings
                    .iter()
                    .filter(|(o, s)| o.service != m.service && (*s == Standing::Live || self.in_watch(o)))
                    .map(|(o, _)| o.clone())
                    .collect();
                let mut reason = format!("service {}: {why}", m.service);
                if let Err(e) = self.switch_members(&record, &others, true, "daemon").await {
                    tracing::error!(release = record.id, error = %e, "cannot roll back the release's other services");
                    reason.push_str(&format!("; the others could NOT be rolled back with it: {e}"));
                }
                self.end_release(&mut record, "rolled_back", reason).await;
                return;
            }
            next_change(&mut notices).await;
        }
    }

    /// Promotes (`back`: rolls back) `members` together: each actor works out its step and
    /// waits; all are committed in one store transaction, switched in one table store, then
    /// carried out. Anything refused: nothing is committed or switched.
    async fn switch_members(
        &self,
        record: &ReleaseRecord,
        members: &[Member],
        back: bool,
        actor: &str,
    ) -> Result<(), CommandError> {
        let mut held: Vec<(Member, Transition, Revision, oneshot::Sender<Option<Revision>>)> = Vec::new();
        let mut refused = None;
        // In name order, the order `Daemon::park` (`cutover upgrade`) takes the services in: each
        // service held here waits for the release, and one parked there waits for the upgrade, so
        // two different orders could each hold a service the other waits for.
        let mut members: Vec<&Member> = members.iter().collect();
        members.sort_by(|a, b| a.service.cmp(&b.service));
        for m in members {
            let event = if back {
                Event::Rollback {
                    id: DeploymentId(u64::MAX),
                    plan: crate::lifecycle::Plan {
                        health_deadline: Duration::ZERO,
                        promote: crate::lifecycle::Promotion::Manual,
                        watch: crate::lifecycle::WatchPolicy {
                            duration: Duration::ZERO,
                            min_requests: 0,
                            max_error_rate: 0.0,
                            max_p99: None,
                        },
                        keep_warm: Duration::ZERO,
                        migrate: Default::default(),
                        gradual: None,
                    },
                }
            } else {
                Event::Promote {
                    id: Some(DeploymentId(m.deployment)),
                }
            };
            let (reply, rx) = oneshot::channel();
            let (resume_tx, resume) = oneshot::channel();
            let answer = match self.actor(&m.service) {
                Ok(tx) => match tx.send(Msg::Hold { event, reply, resume }).await {
                    Ok(()) => rx.await.map_err(|_| self.unanswered(&m.service)).and_then(|r| r),
                    Err(_) => Err(CommandError::ShuttingDown),
                },
                Err(e) => Err(e),
            };
            match answer {
                Ok((t, _)) if back && t.rollback_kind() != Some(RollbackKind::Instant) => {
                    refused = Some(CommandError::Conflict(format!(
                        "service {}: its previous colour is no longer warm, so it cannot switch back with the others \
                         in one store; roll each service back on its own (`cutover rollback {}`)",
                        m.service, m.service
                    )));
                    let _ = resume_tx.send(None);
                    break;
                }
                Ok((t, revision)) => held.push((m.clone(), t, revision, resume_tx)),
                Err(e) => {
                    refused = Some(match e {
                        CommandError::Lifecycle(e) => CommandError::Conflict(format!("service {}: {e}", m.service)),
                        other => other,
                    });
                    break;
                }
            }
        }
        if let Some(e) = refused {
            for (_, _, _, resume) in held {
                let _ = resume.send(None);
            }
            return Err(e);
        }
        // One store transaction for every service's step.
        let store = self.shared.store.clone();
        let commits: Vec<(String, Revision, crate::lifecycle::State, Vec<crate::lifecycle::Record>)> = held
            .iter()
            .map(|(m, t, r, _)| (m.service.clone(), *r, t.state.clone(), t.records().cloned().collect()))
            .collect();
        let audit = Audit {
            actor: actor.to_string(),
            service: None,
            action: if back { "rollback release" } else { "promote release" }.into(),
            arguments: format!("release {}", record.id),
            result: "ok".into(),
        };
        let committed = off_async_store(move || {
            let parts: Vec<ServiceCommit<'_>> = commits
                .iter()
                .map(|(service, expected, state, records)| ServiceCommit {
                    service,
                    expected: *expected,
                    state,
                    records,
                })
                .collect();
            store.commit_many(&parts, Some(audit))
        })
        .await;
        let revisions = match committed {
            Ok(r) => r,
            Err(e) => {
                for (_, _, _, resume) in held {
                    let _ = resume.send(None);
                }
                return Err(CommandError::Store(e.to_string()));
            }
        };
        // One table store for every service's switch.
        let to: Vec<(&str, Colour)> = held
            .iter()
            .filter_map(|(m, t, _, _)| t.state.live.as_ref().map(|l| (m.service.as_str(), l.colour)))
            .collect();
        if let Err(e) = self.shared.proxy.switch_many(&to) {
            tracing::error!(release = record.id, error = %e, "cannot update the route table");
        }
        for ((_, _, _, resume), revision) in held.into_iter().zip(revisions) {
            let _ = resume.send(Some(revision));
        }
        Ok(())
    }

    /// Where `m` stands now, as its service's last committed state says.
    fn standing(&self, m: &Member) -> Standing {
        let views = self.shared.views.lock().unwrap_or_else(|p| p.into_inner());
        let Some(v) = views.get(&m.service) else {
            return Standing::Gone;
        };
        if v.deployment.as_ref().is_some_and(|d| d.id == m.deployment) {
            return Standing::InProgress(v.phase.clone());
        }
        match &v.live {
            Some(l) if l.version == m.version && l.colour == m.colour && v.deployment.is_none() => Standing::Live,
            _ => Standing::Gone,
        }
    }

    /// Whether `m`'s deployment is being watched (switched, not yet done).
    fn in_watch(&self, m: &Member) -> bool {
        self.standing(m) == Standing::InProgress("watching".into())
    }

    /// How `m`'s deployment ended, from the history.
    async fn member_outcome(&self, m: &Member) -> String {
        match self.history(&m.service, 5).await {
            Ok(list) => list
                .into_iter()
                .find(|d| d.id.0 == m.deployment)
                .and_then(|d| d.outcome)
                .map(|o| crate::api::outcome_text(&o))
                .unwrap_or_else(|| "ended".into()),
            Err(e) => e.to_string(),
        }
    }

    /// Aborts every deployment of the release still in progress (each may refuse while a
    /// schema change runs: tried again until none is left, at most 10 minutes).
    async fn abort_members(&self, record: &ReleaseRecord) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
        loop {
            let mut left = false;
            for m in &record.members {
                if let Standing::InProgress(phase) = self.standing(m) {
                    left = true;
                    if phase != "watching" {
                        let _ = self
                            .command(&m.service, Event::Abort, "daemon", "abort (release)")
                            .await;
                    }
                }
            }
            if !left || tokio::time::Instant::now() > deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Whether the release was ended meanwhile by someone else (a rollback of the release).
    async fn release_ended_elsewhere(&self, record: &ReleaseRecord) -> bool {
        matches!(self.release_record(record.id).await, Ok(Some(r)) if r.finished())
    }

    async fn end_release(&self, record: &mut ReleaseRecord, status: &str, reason: String) {
        self.shared
            .barriers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&record.id);
        record.status = status.to_string();
        record.reason = Some(reason.clone()).filter(|r| !r.is_empty());
        record.ended_at = Some(unix_ms(std::time::SystemTime::now()));
        self.save_release(record).await;
        let text = match status {
            "live" => format!("release {} is live", record.id),
            other => format!("release {} {}: {reason}", record.id, other.replace('_', " ")),
        };
        self.release_notice(record, text);
    }

    async fn save_release(&self, record: &ReleaseRecord) {
        let (store, text) = (
            self.shared.store.clone(),
            serde_json::to_string(record).unwrap_or_default(),
        );
        let k = key(record.id);
        if let Err(e) = off_async_store(move || store.set_value(&k, Some(&text))).await {
            tracing::error!(release = record.id, error = %e, "cannot record the release");
        }
    }

    /// A notice of the release, on each of its services' event streams.
    fn release_notice(&self, record: &ReleaseRecord, message: String) {
        for m in &record.members {
            self.shared.notice(
                &m.service,
                Some(DeploymentId(m.deployment)),
                EventKind::Release,
                message.clone(),
                None,
            );
        }
    }
}
