//! The nodes of a fleet, through etcd: who is a member, who leads, and which route revision each
//! one has applied.
//!
//! Each node joins under a lease of its own ([`Membership::join`]): its key
//! `{prefix}/nodes/{node}` lives while the node keeps the lease alive, and vanishes (with every
//! other key under the lease) within the lease's time to live after the node stops doing so, a
//! crash included. On this lease:
//!
//! - **Leadership** ([`Membership::campaign`]): `{prefix}/leader` holds the leader's name, put
//!   only if the key does not exist (a transaction on its create revision), under the leader's
//!   lease. Others wait until it is gone and try again. A leader that dies loses the key when its
//!   lease expires, so another node leads within the time to live.
//! - **Acknowledgements** ([`Membership::acknowledge`]): `{prefix}/acks/{service}/{node}` holds
//!   the revision of the service's route state the node applies now and when it applied it.
//!   [`Membership::wait_for_acks`] waits until every member has acknowledged a revision (or a
//!   later one), or names those that did not within the time given.
//! - **Readiness** ([`Membership::report_ready`]): `{prefix}/ready/{service}/{node}` says
//!   whether the node's own instances of a deployment's release (process driver: each node runs
//!   its own) are healthy and passed the smoke test there, or why they failed. The leader moves a
//!   deployment on only once every member's are ready.
//!
//! The wait watches the members and the service's acknowledgements and reads them once, so it
//! ends as soon as etcd has the last acknowledgement. A watch that breaks (or stays silent for
//! [`RECHECK`]) is replaced by a new watch and read within the same deadline.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp, WatchOptions,
};
use serde::{Deserialize, Serialize};

use crate::store::etcd::{retry, EtcdOptions, DEFAULT_PREFIX};

/// A node's word on its own instances of a deployment's release (process driver): they are
/// healthy and passed the smoke test on this node, or they failed, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Readiness {
    /// The deployment's number.
    pub deployment: u64,
    /// `None`: ready. `Some`: why the node's instances cannot serve the release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
}

/// One service's route state as etcd holds it: the committed state (JSON) and the revision that
/// wrote it, which is the revision nodes acknowledge.
#[derive(Clone, Debug)]
pub struct RouteState {
    /// The service's name as a key segment (`%` and `/` escaped).
    pub service: String,
    pub value: Vec<u8>,
    pub revision: u64,
}

impl RouteState {
    /// The route state a key under `{prefix}/services/` holds, if it is one (`{service}/state`;
    /// the other keys there are history and the last commit's nonce).
    fn from_key(prefix: &str, key: &[u8], value: &[u8], revision: i64) -> Option<RouteState> {
        let key = std::str::from_utf8(key).ok()?;
        let service = key.strip_prefix(prefix)?.strip_suffix("/state")?;
        if service.contains('/') {
            return None;
        }
        Some(RouteState {
            service: service.to_string(),
            value: value.to_vec(),
            revision: revision.unsigned_abs(),
        })
    }
}

/// How often waits look at etcd again.
pub const POLL: Duration = Duration::from_millis(50);

/// The longest a node that campaigns waits between two tries (the leader key is watched, so a
/// try normally follows its deletion at once).
pub const CAMPAIGN_RECHECK: Duration = Duration::from_secs(2);

/// How long an acknowledgement wait trusts a watch that brings nothing: after this it watches
/// anew and reads the keys again (a stream that stalls without breaking costs no more).
pub const RECHECK: Duration = Duration::from_secs(1);

/// Why a fleet operation failed. Messages name etcd and what to do.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("{0}")]
    Setup(String),
    #[error("etcd ({endpoints}): {what} failed: {message}; check that the etcd members are running and reachable and that a majority of them is up")]
    Etcd {
        endpoints: String,
        what: &'static str,
        message: String,
    },
    #[error("another node named {node:?} is a member of the fleet (its registration did not go away within {waited:?}); give each node its own name ([fleet] node)")]
    NameTaken { node: String, waited: Duration },
    #[error("the fleet lease of node {node:?} was lost (etcd did not hear from it within its time to live); it is no longer a member")]
    LeaseLost { node: String },
}

/// What a node acknowledged for one service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    #[serde(rename = "revision")]
    pub revision: u64,
    /// When the node had applied it (unix time, ms).
    #[serde(rename = "applied_at_ms")]
    pub applied_at_ms: u64,
    /// The same instant in microseconds; absent in acknowledgements written before it existed.
    #[serde(rename = "applied_at_us", default, skip_serializing_if = "Option::is_none")]
    pub applied_at_us: Option<u64>,
}

/// The result of waiting for acknowledgements.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AckWait {
    /// Members that acknowledged the revision or a later one.
    pub acked: Vec<String>,
    /// Members that had not when the time was up (empty when every one did).
    pub missing: Vec<String>,
}

/// This node's membership of the fleet: its lease, kept alive in the background.
pub struct Membership {
    client: Client,
    prefix: String,
    node: String,
    lease: i64,
    endpoints: String,
    /// How long one call retries a member that does not answer before it fails.
    timeout: Duration,
    keeper: tokio::task::JoinHandle<()>,
    lost: tokio::sync::watch::Receiver<bool>,
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

fn unix_ms() -> u64 {
    unix_us() / 1000
}

fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The members and one service's acknowledgements as etcd held them at one revision, kept
/// current from a watch's events.
#[derive(Default)]
struct AckView {
    members: BTreeSet<String>,
    /// The revision each node acknowledged (members or not: a node that joins brings its own).
    acked: BTreeMap<String, u64>,
}

impl AckView {
    fn wait(&self, revision: u64) -> AckWait {
        let (acked, missing) = self
            .members
            .iter()
            .cloned()
            .partition(|m| self.acked.get(m).is_some_and(|r| *r >= revision));
        AckWait { acked, missing }
    }

    /// Takes a key's new value (`None`: deleted) under `nodes` or `acks`.
    fn set(&mut self, nodes: &str, acks: &str, key: &[u8], value: Option<&[u8]>) {
        let Ok(key) = std::str::from_utf8(key) else { return };
        if let Some(node) = key.strip_prefix(nodes) {
            match value {
                Some(_) => self.members.insert(node.to_string()),
                None => self.members.remove(node),
            };
        } else if let Some(node) = key.strip_prefix(acks) {
            match value.and_then(|v| serde_json::from_slice::<Ack>(v).ok()) {
                Some(ack) => self.acked.insert(node.to_string(), ack.revision),
                None => self.acked.remove(node),
            };
        }
    }
}

/// How one watch of the acknowledgements ended.
enum Watched {
    /// Every member acknowledged, or the deadline came: the result.
    Done(AckWait),
    /// The watch broke (why), or brought nothing for [`RECHECK`]: watch and read again.
    Again(Option<FleetError>),
}

impl Membership {
    /// Joins the fleet as `node`, with a lease of `ttl` (at least 2 s) kept alive every third of
    /// it. A registration of the same name that is still alive (another node, or this one before
    /// a crash, until its lease expires) is waited for up to twice `ttl` and a second, then
    /// refused.
    pub async fn join(options: &EtcdOptions, node: &str, ttl: Duration) -> Result<Membership, FleetError> {
        Membership::join_with_lease(options, node, ttl, None).await
    }

    /// [`Membership::join`], taking over `inherited`, the lease of the daemon this one replaces
    /// (`cutover upgrade`): the registration under it is this node's own, and so is the
    /// leadership if that daemon led. A lease that is gone is replaced by a new one.
    pub async fn join_with_lease(
        options: &EtcdOptions,
        node: &str,
        ttl: Duration,
        inherited: Option<i64>,
    ) -> Result<Membership, FleetError> {
        if node.is_empty() || node.contains('/') {
            return Err(FleetError::Setup(format!(
                "{node:?} is not a node name: give a non-empty name without '/', e.g. the host name"
            )));
        }
        let ttl_s = ttl.as_secs().max(2) as i64;
        let prefix = match options.prefix.trim_end_matches('/') {
            "" => DEFAULT_PREFIX.to_string(),
            p => p.to_string(),
        };
        let endpoints = options.endpoints.join(",");
        let fail = |what: &'static str| {
            let endpoints = endpoints.clone();
            move |e: etcd_client::Error| FleetError::Etcd {
                endpoints: endpoints.clone(),
                what,
                message: e.to_string(),
            }
        };
        let mut connect = ConnectOptions::new()
            .with_require_leader(true)
            .with_connect_timeout(options.timeout.min(Duration::from_secs(1)))
            .with_timeout(options.timeout);
        if let Some((user, password)) = &options.user {
            connect = connect
                .with_user(user.clone(), password.clone())
                .with_auto_token_refresh(true);
        }
        if let Some(tls) = &options.tls {
            connect =
                connect.with_tls(crate::store::etcd::tls_options(tls).map_err(|e| FleetError::Setup(e.to_string()))?);
        }
        let mut client = tokio::time::timeout(
            options.timeout,
            Client::connect(options.endpoints.clone(), Some(connect)),
        )
        .await
        .map_err(|_| FleetError::Etcd {
            endpoints: endpoints.clone(),
            what: "connecting",
            message: format!("no answer within {:?}", options.timeout),
        })?
        .map_err(fail("connecting"))?;
        let alive = match inherited {
            Some(id) => match client.lease_time_to_live(id, None).await {
                Ok(r) if r.ttl() > 0 => Some(id),
                Ok(_) => None,
                Err(e) => return Err(fail("reading the inherited lease")(e)),
            },
            None => None,
        };
        let key = format!("{prefix}/nodes/{node}");
        let waited_from = Instant::now();
        // A lease is granted only once the name is free: one granted before a wait would expire
        // during it, as nothing keeps it alive yet.
        let lease = loop {
            if let Some(id) = alive {
                // The registration under the inherited lease is this node's own.
                let ours = Txn::new().when([Compare::lease(key.clone(), CompareOp::Equal, id)]);
                if client
                    .txn(ours)
                    .await
                    .map_err(fail("registering the node"))?
                    .succeeded()
                {
                    break id;
                }
            }
            let taken = !client
                .get(key.clone(), None)
                .await
                .map_err(fail("registering the node"))?
                .kvs()
                .is_empty();
            if !taken {
                let lease = match alive {
                    Some(id) => id,
                    None => client
                        .lease_grant(ttl_s, None)
                        .await
                        .map_err(fail("granting a lease"))?
                        .id(),
                };
                let put = Txn::new()
                    .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(
                        key.clone(),
                        unix_ms().to_string(),
                        Some(PutOptions::new().with_lease(lease)),
                    )]);
                if client.txn(put).await.map_err(fail("registering the node"))?.succeeded() {
                    break lease;
                }
                if alive.is_none() {
                    let _ = client.lease_revoke(lease).await;
                }
            }
            // A node that crashed keeps its registration until its lease expires, up to the
            // lease's life after its last keep-alive, and etcd removes expired leases in rounds:
            // a restart waits that out (twice the life and a second) before it says the name is
            // taken.
            if waited_from.elapsed() > Duration::from_secs(2 * ttl_s as u64 + 1) {
                return Err(FleetError::NameTaken {
                    node: node.to_string(),
                    waited: waited_from.elapsed(),
                });
            }
            tokio::time::sleep(POLL * 4).await;
        };
        let (lost_tx, lost) = tokio::sync::watch::channel(false);
        let keeper = {
            let mut client = client.clone();
            let ttl = Duration::from_secs(ttl_s as u64);
            let every = ttl / 3;
            let node = node.to_string();
            tokio::spawn(async move {
                // The lease lives at least `ttl` from the moment a keep-alive that etcd answered
                // was sent: past that instant without an answer, it may be gone, so the node
                // counts it lost then (never later than etcd does).
                let mut deadline = Instant::now() + ttl;
                let mut open = None;
                loop {
                    let step = async {
                        if open.is_none() {
                            open = Some(client.lease_keep_alive(lease).await?);
                        }
                        let Some((keeper, stream)) = open.as_mut() else {
                            return Ok(None);
                        };
                        let sent = Instant::now();
                        keeper.keep_alive().await?;
                        Ok::<_, etcd_client::Error>(match stream.message().await? {
                            Some(r) if r.ttl() > 0 => Some(sent + Duration::from_secs(r.ttl() as u64).min(ttl)),
                            // The lease is gone: etcd no longer knows it.
                            _ => None,
                        })
                    };
                    match tokio::time::timeout_at(deadline.into(), step).await {
                        Ok(Ok(Some(next))) => {
                            deadline = next;
                            tokio::time::sleep(every).await;
                        }
                        Ok(Err(e)) if Instant::now() < deadline => {
                            // A broken stream: open another one soon, within the lease's life.
                            tracing::debug!(node = %node, error = %e, "keeping the fleet lease alive failed; trying again");
                            open = None;
                            tokio::time::sleep(POLL * 2).await;
                        }
                        // Gone, or no answer before the lease may have expired.
                        Ok(Ok(None)) | Ok(Err(_)) | Err(_) => {
                            tracing::error!(node = %node, "the fleet lease of node {node} was lost; it is no longer a member");
                            let _ = lost_tx.send(true);
                            return;
                        }
                    }
                }
            })
        };
        Ok(Membership {
            client,
            prefix,
            node: node.to_string(),
            lease,
            endpoints,
            timeout: options.timeout,
            keeper,
            lost,
        })
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// The lease this node's registration lives under.
    pub fn lease(&self) -> i64 {
        self.lease
    }

    /// Leaves the fleet at once (a graceful stop): the lease is revoked, and with it the
    /// registration, the leadership and the acknowledgements; another node leads without
    /// waiting for the lease to expire.
    pub async fn resign(&self) -> Result<(), FleetError> {
        self.keeper.abort();
        let mut client = self.client.clone();
        client.lease_revoke(self.lease).await.map_err(self.fail("leaving"))?;
        Ok(())
    }

    /// Whether the lease was lost (this node is no longer a member, and leads nothing).
    pub fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    fn fail(&self, what: &'static str) -> impl Fn(etcd_client::Error) -> FleetError + '_ {
        move |e| FleetError::Etcd {
            endpoints: self.endpoints.clone(),
            what,
            message: e.to_string(),
        }
    }

    /// The deadline of a call started now: a member that is down (connection refused) is
    /// retried on the others until then.
    fn deadline(&self) -> Instant {
        Instant::now() + self.timeout
    }

    /// Every key under `prefix` (read through the retries of [`retry`]); `what` names the read
    /// in errors.
    async fn get_prefix(&self, prefix: &str, what: &'static str) -> Result<etcd_client::GetResponse, FleetError> {
        retry(self.deadline(), || {
            let (mut client, prefix) = (self.client.clone(), prefix.to_string());
            async move { client.get(prefix, Some(GetOptions::new().with_prefix())).await }
        })
        .await
        .map_err(self.fail(what))
    }

    /// The members now, by name.
    pub async fn members(&self) -> Result<Vec<String>, FleetError> {
        let prefix = format!("{}/nodes/", self.prefix);
        let resp = self.get_prefix(&prefix, "listing the nodes").await?;
        Ok(resp
            .kvs()
            .iter()
            .filter_map(|kv| kv.key_str().ok()?.strip_prefix(&prefix).map(str::to_string))
            .collect())
    }

    /// The leader's name, if any node leads now.
    pub async fn leader(&self) -> Result<Option<String>, FleetError> {
        let key = format!("{}/leader", self.prefix);
        let resp = retry(self.deadline(), || {
            let (mut client, key) = (self.client.clone(), key.clone());
            async move { client.get(key, None).await }
        })
        .await
        .map_err(self.fail("reading the leader"))?;
        Ok(resp
            .kvs()
            .first()
            .and_then(|kv| kv.value_str().ok())
            .map(str::to_string))
    }

    /// Tries once to become the leader; `true` if this node leads now (it did already, or the
    /// post was free).
    pub async fn try_lead(&self) -> Result<bool, FleetError> {
        if self.is_lost() {
            return Err(FleetError::LeaseLost {
                node: self.node.clone(),
            });
        }
        let key = format!("{}/leader", self.prefix);
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                self.node.clone(),
                Some(PutOptions::new().with_lease(self.lease)),
            )])
            .or_else([TxnOp::get(key, None)]);
        let resp = retry(self.deadline(), || {
            let (mut client, txn) = (self.client.clone(), txn.clone());
            async move { client.txn(txn).await }
        })
        .await
        .map_err(self.fail("campaigning"))?;
        if resp.succeeded() {
            return Ok(true);
        }
        // Already ours (a second campaign), when the key is under this node's lease.
        let ours = resp.op_responses().into_iter().any(|op| match op {
            etcd_client::TxnOpResponse::Get(get) => get.kvs().first().is_some_and(|kv| kv.lease() == self.lease),
            _ => false,
        });
        Ok(ours)
    }

    /// Waits until this node leads. Errors end the wait (the caller campaigns again). Between
    /// tries it watches the leader key and tries again as soon as it is deleted (the leader left
    /// or its lease expired), or after [`CAMPAIGN_RECHECK`] at the latest (a watch that missed
    /// the deletion, or this node's lease lost meanwhile).
    pub async fn campaign(&self) -> Result<(), FleetError> {
        let key = format!("{}/leader", self.prefix);
        loop {
            // Watched before the try: a deletion right after it is not missed.
            let watch = self.client.clone().watch(key.clone(), None).await;
            if self.try_lead().await? {
                return Ok(());
            }
            let deleted = async {
                let Ok(mut stream) = watch else {
                    return std::future::pending::<()>().await;
                };
                loop {
                    match stream.message().await {
                        Ok(Some(resp)) if resp.events().iter().any(|e| e.event_type() == EventType::Delete) => return,
                        Ok(Some(resp)) if !resp.canceled() => {}
                        // Broken or cancelled: wait for the recheck.
                        _ => return std::future::pending::<()>().await,
                    }
                }
            };
            let lost = self.lost();
            tokio::select! {
                () = deleted => {}
                () = lost => {}
                () = tokio::time::sleep(CAMPAIGN_RECHECK) => {}
            }
        }
    }

    /// Records that this node applies `revision` of `service`'s route state now.
    pub async fn acknowledge(&self, service: &str, revision: u64) -> Result<(), FleetError> {
        let now = unix_us();
        let ack = Ack {
            revision,
            applied_at_ms: now / 1000,
            applied_at_us: Some(now),
        };
        let value = serde_json::to_vec(&ack).map_err(|e| FleetError::Setup(e.to_string()))?;
        let key = format!("{}/acks/{service}/{}", self.prefix, self.node);
        self.put_leased(key, value, "acknowledging").await
    }

    /// Puts `value` at `key` under this node's lease (retried past members that are down);
    /// `what` names the write in errors.
    pub(crate) async fn put_leased(&self, key: String, value: Vec<u8>, what: &'static str) -> Result<(), FleetError> {
        retry(self.deadline(), || {
            let (mut client, key, value) = (self.client.clone(), key.clone(), value.clone());
            async move {
                client
                    .put(key, value, Some(PutOptions::new().with_lease(self.lease)))
                    .await
            }
        })
        .await
        .map_err(self.fail(what))?;
        Ok(())
    }

    /// Says whether this node's instances of `service` for deployment `deployment` are ready
    /// (healthy and validated here) or failed, under the node's lease:
    /// `{prefix}/ready/{service}/{node}`, one key per node, the latest deployment only.
    pub async fn report_ready(&self, service: &str, ready: &Readiness) -> Result<(), FleetError> {
        let value = serde_json::to_vec(ready).map_err(|e| FleetError::Setup(e.to_string()))?;
        let key = format!("{}/ready/{service}/{}", self.prefix, self.node);
        self.put_leased(key, value, "reporting readiness").await
    }

    /// What every member last said of its instances of `service` ([`Membership::report_ready`]),
    /// by node.
    pub async fn readiness(&self, service: &str) -> Result<BTreeMap<String, Readiness>, FleetError> {
        self.per_node(
            &format!("{}/ready/{service}/", self.prefix),
            "reading the nodes' readiness",
        )
        .await
    }

    /// The JSON value each node put under `prefix` (`{prefix}{node}`), by node; values that do
    /// not read as `T` are left out.
    async fn per_node<T: serde::de::DeserializeOwned>(
        &self,
        prefix: &str,
        what: &'static str,
    ) -> Result<BTreeMap<String, T>, FleetError> {
        let resp = self.get_prefix(prefix, what).await?;
        Ok(resp
            .kvs()
            .iter()
            .filter_map(|kv| {
                let node = kv.key_str().ok()?.strip_prefix(prefix)?.to_string();
                Some((node, serde_json::from_slice(kv.value()).ok()?))
            })
            .collect())
    }

    /// Every member's acknowledgement for `service` (members that gave none are absent).
    pub async fn acks(&self, service: &str) -> Result<BTreeMap<String, Ack>, FleetError> {
        self.per_node(
            &format!("{}/acks/{service}/", self.prefix),
            "reading the acknowledgements",
        )
        .await
    }

    /// Waits until every member has acknowledged `revision` of `service` (or a later one), at
    /// most `timeout`. Members are those registered as the wait goes on: one that leaves (its
    /// lease expired) is no longer waited for, one that joins is.
    ///
    /// The members and the acknowledgements are watched, then read, and kept current from the
    /// watch: the wait ends when etcd has the last acknowledgement. A watch that breaks is
    /// replaced by another (after [`POLL`]) as long as the deadline allows; at the deadline the
    /// keys are read once more, and an error is returned only if that read fails.
    pub async fn wait_for_acks(&self, service: &str, revision: u64, timeout: Duration) -> Result<AckWait, FleetError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let nodes = format!("{}/nodes/", self.prefix);
        let acks = format!("{}/acks/{service}/", self.prefix);
        loop {
            if tokio::time::Instant::now() >= deadline {
                return Ok(self.ack_view(&nodes, &acks).await?.0.wait(revision));
            }
            match self.watch_acks(&nodes, &acks, revision, deadline).await {
                Watched::Done(wait) => return Ok(wait),
                Watched::Again(None) => {}
                Watched::Again(Some(e)) => {
                    tracing::debug!(service, error = %e, "the watch of the acknowledgements broke; opening another");
                    tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + POLL)).await;
                }
            }
        }
    }

    /// The members and the acknowledgements under `acks`, read together, and the revision of
    /// the read.
    async fn ack_view(&self, nodes: &str, acks: &str) -> Result<(AckView, i64), FleetError> {
        let txn = Txn::new().and_then([
            TxnOp::get(nodes, Some(GetOptions::new().with_prefix())),
            TxnOp::get(acks, Some(GetOptions::new().with_prefix())),
        ]);
        let resp = retry(self.deadline(), || {
            let (mut client, txn) = (self.client.clone(), txn.clone());
            async move { client.txn(txn).await }
        })
        .await
        .map_err(self.fail("reading the acknowledgements"))?;
        let at = resp.header().map_or(0, |h| h.revision());
        let mut view = AckView::default();
        for op in resp.op_responses() {
            if let etcd_client::TxnOpResponse::Get(get) = op {
                for kv in get.kvs() {
                    view.set(nodes, acks, kv.key(), Some(kv.value()));
                }
            }
        }
        Ok((view, at))
    }

    /// Watches the members and the acknowledgements, reads them, and follows the watch until
    /// every member has acknowledged `revision`, the deadline, or the watch breaks or stays
    /// silent for [`RECHECK`].
    ///
    /// The watches start from the present, and the read follows once etcd has created them:
    /// etcd sends the events of a watch that starts from a revision already written only at its
    /// next catch-up of such watches (every 100 ms), which a watch from a read's revision would
    /// be whenever anything was written between the read and the watch. The read has every event
    /// up to its revision; the watch's events up to it are skipped.
    async fn watch_acks(&self, nodes: &str, acks: &str, revision: u64, deadline: tokio::time::Instant) -> Watched {
        let broke = |e: etcd_client::Error| Watched::Again(Some(self.fail("watching the acknowledgements")(e)));
        let cancelled = |resp: &etcd_client::WatchResponse| {
            Watched::Again(Some(FleetError::Setup(format!(
                "etcd cancelled the watch of the acknowledgements: {}",
                resp.cancel_reason()
            ))))
        };
        let ended = || {
            Watched::Again(Some(FleetError::Setup(
                "etcd ended the watch of the acknowledgements".into(),
            )))
        };
        let mut early = Vec::new();
        let opened = tokio::time::timeout_at(deadline, async {
            let mut stream = self
                .client
                .clone()
                .watch(acks, Some(WatchOptions::new().with_prefix()))
                .await?;
            stream.watch(nodes, Some(WatchOptions::new().with_prefix())).await?;
            let mut created = 0;
            while created < 2 {
                match stream.message().await? {
                    Some(resp) if resp.canceled() => return Ok(Err(cancelled(&resp))),
                    Some(resp) => {
                        created += usize::from(resp.created());
                        early.push(resp);
                    }
                    None => return Ok(Err(ended())),
                }
            }
            Ok::<_, etcd_client::Error>(Ok(stream))
        })
        .await;
        let mut stream = match opened {
            Ok(Ok(Ok(stream))) => stream,
            Ok(Ok(Err(why))) => return why,
            Ok(Err(e)) => return broke(e),
            Err(_) => return Watched::Again(None),
        };
        let (mut view, at) = match self.ack_view(nodes, acks).await {
            Ok(read) => read,
            Err(e) => return Watched::Again(Some(e)),
        };
        let take = |view: &mut AckView, resp: &etcd_client::WatchResponse| {
            for event in resp.events() {
                let Some(kv) = event.kv() else { continue };
                if kv.mod_revision() > at {
                    let value = (event.event_type() == EventType::Put).then(|| kv.value());
                    view.set(nodes, acks, kv.key(), value);
                }
            }
        };
        for resp in &early {
            take(&mut view, resp);
        }
        loop {
            let wait = view.wait(revision);
            if wait.missing.is_empty() || tokio::time::Instant::now() >= deadline {
                return Watched::Done(wait);
            }
            let quiet_until = deadline.min(tokio::time::Instant::now() + RECHECK);
            let message = match tokio::time::timeout_at(quiet_until, stream.message()).await {
                Ok(m) => m,
                Err(_) if quiet_until >= deadline => return Watched::Done(view.wait(revision)),
                Err(_) => return Watched::Again(None),
            };
            match message {
                Ok(Some(resp)) if resp.canceled() || resp.compact_revision() > 0 => return cancelled(&resp),
                Ok(Some(resp)) => take(&mut view, &resp),
                Ok(None) => return ended(),
                Err(e) => return broke(e),
            }
        }
    }

    /// Returns once the lease is lost (never while the node stays a member, nor after it left
    /// on purpose with [`Membership::resign`]).
    pub async fn lost(&self) {
        let mut lost = self.lost.clone();
        if lost.wait_for(|l| *l).await.is_err() {
            // The keeper was stopped on purpose: nothing was lost.
            std::future::pending::<()>().await;
        }
    }

    /// Every service's route state as etcd holds it now, and the revision of that read.
    pub async fn route_states(&self) -> Result<(Vec<RouteState>, i64), FleetError> {
        let prefix = format!("{}/services/", self.prefix);
        let resp = self.get_prefix(&prefix, "reading the route states").await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let states = resp
            .kvs()
            .iter()
            .filter_map(|kv| RouteState::from_key(&prefix, kv.key(), kv.value(), kv.mod_revision()))
            .collect();
        Ok((states, revision))
    }

    /// Sends each new route state written after revision `after` to `to`, in order, until the
    /// watch breaks (etcd unreachable, the revision compacted) or `to` is closed; says why.
    pub async fn watch_route_states(
        &self,
        after: i64,
        to: &tokio::sync::mpsc::UnboundedSender<RouteState>,
    ) -> FleetError {
        let prefix = format!("{}/services/", self.prefix);
        let options = WatchOptions::new().with_prefix().with_start_revision(after + 1);
        let mut stream = match self.client.clone().watch(prefix.clone(), Some(options)).await {
            Ok(w) => w,
            Err(e) => return self.fail("watching the route states")(e),
        };
        loop {
            match stream.message().await {
                Ok(Some(resp)) => {
                    if resp.canceled() || resp.compact_revision() > 0 {
                        return FleetError::Setup(format!(
                            "the watch of the route states was cancelled by etcd (compacted at revision {})",
                            resp.compact_revision()
                        ));
                    }
                    for event in resp.events() {
                        if event.event_type() != EventType::Put {
                            continue;
                        }
                        let Some(kv) = event.kv() else { continue };
                        if let Some(state) = RouteState::from_key(&prefix, kv.key(), kv.value(), kv.mod_revision()) {
                            if to.send(state).is_err() {
                                return FleetError::Setup("nobody takes the route states any more".into());
                            }
                        }
                    }
                }
                Ok(None) => return FleetError::Setup("etcd ended the watch of the route states".into()),
                Err(e) => return self.fail("watching the route states")(e),
            }
        }
    }

    /// Leaves the fleet at once: the lease is revoked, and with it the registration, the
    /// leadership and the acknowledgements.
    pub async fn leave(self) -> Result<(), FleetError> {
        self.keeper.abort();
        self.client
            .clone()
            .lease_revoke(self.lease)
            .await
            .map_err(self.fail("leaving"))?;
        Ok(())
    }

    /// Stops keeping the lease alive without revoking it, as a crash would: the registration
    /// and leadership go when the lease expires. For tests of failover.
    pub fn abandon(self) {
        self.keeper.abort();
    }
}

mod relay;
pub use relay::{Answer, Command, Done, Forwarded, Incoming, RelayError};

#[cfg(test)]
mod tests;
