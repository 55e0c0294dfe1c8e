//! The fleet's [`StateStore`] in etcd (v3 API), shared by every cutover node of a fleet.
//!
//! # Key layout
//! Every key lives under a configurable prefix `P` (default `/cutover`). Service names are
//! escaped in keys (`%` as `%25`, `/` as `%2F`) so that one service's keys can never fall inside
//! another's range. Values are JSON in the encoding of `crate::wire` (tagged enumerations,
//! durations in nanoseconds, instants in unix milliseconds), except ids and values.
//!
//! - `P/services/{svc}/state`: the service's committed [`State`]. Its etcd `mod_revision` is the
//!   state's [`Revision`]: revisions are etcd's cluster-wide revision numbers, so they increase
//!   with every commit of the service but not by one.
//! - `P/services/{svc}/commit`: the nonce of the commit that wrote the state key (128 random
//!   bits in hex), put in the same transaction, so that its `mod_revision` is the state's
//!   revision (see "Transactions"). Only a failed commit reads it; the range reads of a service's
//!   keys (`deployments/`, `records/{id}/`) do not cover it.
//! - `P/services/{svc}/deployments/{id:020}`: one [`DeploymentSummary`] per deployment, written
//!   by the commit whose records change it (`Started` creates it, `Promoted` sets `promoted_at`,
//!   the ending records set the outcome and `ended_at`; the last word wins, as in SQLite). Ids are
//!   zero-padded so that the key order is the id order: `history` is one range read, newest
//!   first, at most `limit` keys.
//! - `P/services/{svc}/records/{id:020}/{expected:020}-{n:05}`: each [`Record`] of a commit as
//!   `{"at_ms", "deployment", "record"}`, filed under its deployment (`Retired` under the
//!   committed state's `last_id`, or `none` without one). `expected` is the revision the commit
//!   compared against, which strictly increases from one commit of a service to the next, and
//!   `n` the record's position in the commit: the key order is the commit order, and
//!   `transitions` is one range read. A record's `seq` is its commit's etcd revision times
//!   65536 plus `n`: it increases and is never reused.
//! - `P/audit/{at_ms:016}-{random:016x}`: one [`Audit`] entry (with its service filled in); its
//!   `seq` is the entry's etcd create revision, the log's order.
//! - `P/ids/{svc}`: the last deployment id handed out, in decimal.
//! - `P/values/{key}`: a small cluster-wide value, as is (UTF-8).
//!
//! # Transactions
//! A commit is one etcd transaction: if the state key's `mod_revision` equals `expected` (for
//! [`Revision::NONE`]: if the key does not exist), it puts the state, the changed summaries, the
//! records, the audit entry and, at the commit key, a nonce drawn for this commit; otherwise it
//! writes nothing and reads the state key and the commit key back. The transaction is sent again
//! when a request fails on the way (see "Threads and time"), also when etcd applied it and only
//! the answer was lost; the resent transaction then finds the state key at the revision of its
//! own write. So when the compare fails: if the commit key holds this commit's nonce and its
//! `mod_revision` is the state key's, the state is this commit's (an earlier sending applied
//! it) and the call returns that revision; otherwise it returns [`StoreError::Conflict`] with
//! the revision found. (A state written without the commit key, by an older cutover, leaves the
//! commit key at an older revision: a conflict.) The summaries a commit changes are read before
//! the transaction; the compare on the state key makes that safe, since every write to a
//! service's summaries goes with a write of its state. Deployment ids come from a
//! compare-and-swap loop on `P/ids/{svc}` (guarded by the state key as well, so that an id is
//! higher than any a committed state holds): ids are strictly increasing across all nodes.
//!
//! # Sizes
//! etcd refuses requests over 1.5 MiB (its default `--max-request-bytes`) and transactions of
//! more than 128 operations (`--max-txn-ops`). Messages a commit stores that come from outside
//! (the reasons of failures: provision errors, smoke output, health reports; and the audit's
//! arguments and result) are cut to [`MAX_TEXT_BYTES`] with a note of how much was cut, so a long
//! output tail never makes a commit fail. A commit whose request would still exceed
//! [`MAX_REQUEST_BYTES`], or with more than [`MAX_RECORDS`] records, is refused with
//! [`StoreError::Unrepresentable`] and writes nothing.
//!
//! # Threads and time
//! [`StateStore`] is synchronous. [`EtcdStore`] owns a small tokio runtime of its own (one worker
//! thread) that runs the etcd client; a call hands its work to that runtime and waits for the
//! answer on the calling thread. Call it from blocking code only: a plain thread, or
//! `tokio::task::spawn_blocking` (the daemon's `off_async_store`); calling it on a tokio worker
//! thread would block that worker for up to the timeout. Every call completes within the
//! configured timeout ([`EtcdOptions::timeout`], 5 s by default): with the members unreachable
//! or without a quorum it fails with [`StoreError::EtcdTimeout`], which names the endpoints.
//! Within that time, requests that failed because a member was unreachable are retried (another
//! member may answer). A commit retried after its answer was lost recognises its own write by
//! the commit key's nonce and succeeds, unless another commit has replaced it in the meantime:
//! then it reports the conflict, which the caller resolves like any conflict, by reloading.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, KvClient, SortOrder, SortTarget,
    TlsOptions, Txn, TxnOp, TxnOpResponse,
};
use serde::{Deserialize, Serialize};

use super::{Audit, AuditEntry, DeploymentSummary, Revision, StateStore, StoreError, TransitionEntry};
use crate::lifecycle::{DeploymentId, Outcome, Phase, Reason, Record, State};
use crate::wire::millis::{from_ms, to_ms};

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "/cutover";
/// The default time limit of one call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest stored message (a failure's reason, an audit's arguments or result), in bytes.
pub const MAX_TEXT_BYTES: usize = 16 * 1024;
/// Largest commit sent to etcd, in bytes of keys and values; etcd's default limit is 1.5 MiB.
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;
/// Most records in one commit (etcd's default limit is 128 operations per transaction).
pub const MAX_RECORDS: usize = 100;

/// How long to wait before retrying a request that found no member to answer it.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// Where and how to reach etcd.
#[derive(Clone, Debug)]
pub struct EtcdOptions {
    /// Client URLs of the members, e.g. `http://10.0.0.1:2379` (`https://` with TLS).
    pub endpoints: Vec<String>,
    /// Every key is under this prefix ([`DEFAULT_PREFIX`]); no trailing `/`.
    pub prefix: String,
    /// User name and password, when etcd's authentication is enabled.
    pub user: Option<(String, String)>,
    /// TLS towards the members.
    pub tls: Option<EtcdTls>,
    /// Time limit of each call ([`DEFAULT_TIMEOUT`]).
    pub timeout: Duration,
}

/// TLS files (PEM) for the connection to etcd.
#[derive(Clone, Debug, Default)]
pub struct EtcdTls {
    /// The certificate authority that signed the members' certificates.
    pub ca: Option<PathBuf>,
    /// A client certificate and its key, when the members ask for one.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl EtcdOptions {
    /// Options for `endpoints` with every other setting at its default.
    pub fn new(endpoints: impl IntoIterator<Item = impl Into<String>>) -> EtcdOptions {
        EtcdOptions {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            prefix: DEFAULT_PREFIX.to_string(),
            user: None,
            tls: None,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// The [`StateStore`] of a fleet, in etcd. See the module documentation.
pub struct EtcdStore {
    kv: KvClient,
    prefix: String,
    timeout: Duration,
    /// How errors name this store: `etcd <endpoints> (prefix <prefix>)`.
    name: String,
    /// Runs the client; shut down in the background on drop (which may happen on any thread).
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// One stored record: a [`TransitionEntry`] without its `seq`, which comes from the key.
#[derive(Serialize, Deserialize)]
struct StoredRecord {
    #[serde(rename = "at_ms")]
    at_ms: i64,
    #[serde(rename = "deployment")]
    deployment: Option<DeploymentId>,
    #[serde(rename = "record")]
    record: Record,
}

/// How a call failed inside the runtime, before it becomes a [`StoreError`].
enum Fail {
    /// etcd (or the way to it) failed.
    Etcd(etcd_client::Error),
    /// Nothing etcd can help with: a conflict, a refused commit, an unreadable value.
    Store(StoreError),
}

impl From<etcd_client::Error> for Fail {
    fn from(e: etcd_client::Error) -> Fail {
        Fail::Etcd(e)
    }
}

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Fail {
        Fail::Store(e)
    }
}

/// gRPC status codes, by number (the client re-exports `tonic::Status`, not its `Code`).
mod code {
    pub const CANCELLED: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const INVALID_ARGUMENT: i32 = 3;
    pub const DEADLINE_EXCEEDED: i32 = 4;
    pub const PERMISSION_DENIED: i32 = 7;
    pub const RESOURCE_EXHAUSTED: i32 = 8;
    pub const ABORTED: i32 = 10;
    pub const UNAVAILABLE: i32 = 14;
    pub const UNAUTHENTICATED: i32 = 16;
}

/// Whether a failed request may succeed if sent again soon: no member answered it (in time: the
/// client cancels a request after half the call's timeout), or the one that did had no leader.
fn transient(e: &etcd_client::Error) -> bool {
    use etcd_client::Error as E;
    match e {
        E::TransportError(_) | E::IoError(_) => true,
        E::GRpcStatus(status) => matches!(
            i32::from(status.code()),
            code::UNAVAILABLE | code::DEADLINE_EXCEEDED | code::CANCELLED | code::UNKNOWN | code::ABORTED
        ),
        _ => false,
    }
}

const REACH_HINT: &str = "check that the etcd members are running and reachable from this host and that a majority \
     of them is up (etcd needs a quorum), then retry";

/// What to tell the user about an error etcd answered.
fn hint(e: &etcd_client::Error) -> &'static str {
    use etcd_client::Error as E;
    match e {
        E::GRpcStatus(status) => match i32::from(status.code()) {
            code::UNAUTHENTICATED | code::PERMISSION_DENIED => {
                "check the user and password given for etcd and the user's permissions on the prefix"
            }
            code::INVALID_ARGUMENT if status.message().contains("authentication") => {
                "check the user and password given for etcd"
            }
            code::INVALID_ARGUMENT | code::RESOURCE_EXHAUSTED => {
                "etcd refused the request as too large or malformed; this is a bug in cutover, please report it"
            }
            _ => REACH_HINT,
        },
        E::InvalidUri(_) | E::InvalidArgs(_) | E::EndpointError(_) => {
            "check the etcd endpoints: each must be a URL such as http://10.0.0.1:2379"
        }
        _ => REACH_HINT,
    }
}

fn describe(e: &etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(status) => format!("{} ({:?})", status.message(), status.code()),
        other => {
            // The transport's errors hide their cause one level down.
            let mut s = other.to_string();
            let mut source = std::error::Error::source(other);
            while let Some(cause) = source {
                let _ = write!(s, ": {cause}");
                source = cause.source();
            }
            s
        }
    }
}

impl EtcdStore {
    /// Connects to etcd (within the options' timeout: authenticates when a user is given). The
    /// endpoints need not all be up; without a user, none needs to be until the first call.
    pub fn connect(options: EtcdOptions) -> Result<EtcdStore, StoreError> {
        if options.endpoints.is_empty() {
            return Err(StoreError::EtcdSetup(
                "no endpoints given: name at least one etcd member's client URL, e.g. http://10.0.0.1:2379".into(),
            ));
        }
        if options.timeout.is_zero() {
            return Err(StoreError::EtcdSetup("the timeout must be longer than zero".into()));
        }
        let prefix = options.prefix.trim_end_matches('/').to_string();
        if prefix.is_empty() {
            return Err(StoreError::EtcdSetup(
                "the key prefix is empty: give one such as /cutover, so cutover's keys stay apart from others'".into(),
            ));
        }
        let name = format!("etcd {} (prefix {prefix})", options.endpoints.join(","));
        let mut connect = ConnectOptions::new()
            .with_require_leader(true)
            .with_connect_timeout(options.timeout.min(Duration::from_secs(1)))
            // Half the call's time for one request, so that a member that stopped answering
            // leaves time to ask another.
            .with_timeout(options.timeout / 2)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        if let Some((user, password)) = &options.user {
            connect = connect
                .with_user(user.clone(), password.clone())
                .with_auto_token_refresh(true);
        }
        if let Some(tls) = &options.tls {
            connect = connect.with_tls(tls_options(tls)?);
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("cutover-etcd")
            .enable_all()
            .build()
            .map_err(|e| StoreError::EtcdSetup(format!("cannot start the etcd client's runtime: {e}")))?;
        let handle = runtime.handle().clone();
        let endpoints = options.endpoints.clone();
        let client = run_on(&handle, &name, "connect", options.timeout, async move {
            Client::connect(endpoints, Some(connect)).await.map_err(Fail::Etcd)
        })?;
        Ok(EtcdStore {
            kv: client.kv_client(),
            prefix,
            timeout: options.timeout,
            name,
            runtime: Some(runtime),
            handle,
        })
    }

    /// How errors name this store.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The most recent `limit` audit entries, newest first.
    pub fn audit_log(&self, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let (kv, name) = (self.kv.clone(), self.name.clone());
        let prefix = format!("{}/audit/", self.prefix);
        self.run("read the audit log", move |deadline| async move {
            let options = GetOptions::new()
                .with_prefix()
                .with_sort(SortTarget::Create, SortOrder::Descend)
                .with_limit(limit_i64(limit));
            let resp = get(&kv, deadline, &prefix, Some(options)).await?;
            let mut out = Vec::new();
            for item in resp.kvs() {
                let audit: AuditEntryValue = decode(&name, item.key(), item.value())?;
                out.push(AuditEntry {
                    seq: item.create_revision().unsigned_abs(),
                    at: from_ms(audit.at_ms),
                    audit: audit.audit,
                });
            }
            Ok(out)
        })
    }

    fn service_key(&self, service: &str, rest: &str) -> String {
        service_key(&self.prefix, service, rest)
    }

    /// Runs `work` on the runtime within the timeout; `work` gets the deadline for its retries.
    fn run<T, F, W>(&self, op: &str, work: W) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, Fail>> + Send + 'static,
        W: FnOnce(Instant) -> F,
    {
        let deadline = Instant::now() + self.timeout;
        run_on(&self.handle, &self.name, op, self.timeout, work(deadline))
    }
}

/// The JSON of an audit entry's value.
#[derive(Serialize, Deserialize)]
struct AuditEntryValue {
    #[serde(rename = "at_ms")]
    at_ms: i64,
    #[serde(rename = "audit")]
    audit: Audit,
}

pub(crate) fn tls_options(tls: &EtcdTls) -> Result<TlsOptions, StoreError> {
    let read = |what: &str, path: &PathBuf| {
        std::fs::read(path).map_err(|e| {
            StoreError::EtcdSetup(format!(
                "cannot read the {what} {}: {e}; check the path and its permissions",
                path.display()
            ))
        })
    };
    let mut options = TlsOptions::new();
    if let Some(ca) = &tls.ca {
        options = options.ca_certificate(Certificate::from_pem(read("etcd CA certificate", ca)?));
    }
    match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => {
            options = options.identity(Identity::from_pem(
                read("etcd client certificate", cert)?,
                read("etcd client key", key)?,
            ));
        }
        (None, None) => {}
        _ => {
            return Err(StoreError::EtcdSetup(
                "a client certificate needs its key and a key its certificate: give both, or neither".into(),
            ))
        }
    }
    Ok(options)
}

/// Hands `work` to the runtime behind `handle` and waits for it, at most `timeout` (and a little
/// longer for the answer to travel back).
fn run_on<T, F>(
    handle: &tokio::runtime::Handle,
    name: &str,
    op: &str,
    timeout: Duration,
    work: F,
) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: Future<Output = Result<T, Fail>> + Send + 'static,
{
    let (tx, rx) = mpsc::sync_channel(1);
    handle.spawn(async move {
        let result = tokio::time::timeout(timeout, work).await;
        let _ = tx.send(result);
    });
    let timed_out = |detail: String| StoreError::EtcdTimeout {
        store: name.to_string(),
        op: op.to_string(),
        timeout,
        detail,
    };
    match rx.recv_timeout(timeout + Duration::from_millis(500)) {
        Ok(Ok(Ok(value))) => Ok(value),
        Ok(Ok(Err(Fail::Store(e)))) => Err(e),
        Ok(Ok(Err(Fail::Etcd(e)))) if transient(&e) => Err(timed_out(describe(&e))),
        Ok(Ok(Err(Fail::Etcd(e)))) => Err(StoreError::Etcd {
            store: name.to_string(),
            op: op.to_string(),
            detail: describe(&e),
            hint: hint(&e),
        }),
        Ok(Err(_elapsed)) => Err(timed_out("no answer".into())),
        Err(mpsc::RecvTimeoutError::Timeout) => Err(timed_out("no answer from the client's runtime".into())),
        Err(mpsc::RecvTimeoutError::Disconnected) => Err(StoreError::Interrupted {
            detail: format!("{op}: the etcd client's task ended without an answer"),
        }),
    }
}

/// How long one attempt of a request may take before it is sent again (to another member, as
/// the client balances): a request queued on a member that is down can otherwise wait for the
/// whole deadline.
const ATTEMPT: Duration = Duration::from_secs(1);

/// Sends a request until it succeeds, fails for good, or the deadline is near; the last
/// transient error is returned then. Each attempt is cut after [`ATTEMPT`].
pub(crate) async fn retry<T, F, M>(deadline: Instant, mut make: M) -> Result<T, etcd_client::Error>
where
    F: Future<Output = Result<T, etcd_client::Error>>,
    M: FnMut() -> F,
{
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let attempt = match tokio::time::timeout(ATTEMPT.min(left.max(Duration::from_millis(1))), make()).await {
            Ok(answer) => answer,
            Err(_) => Err(etcd_client::Error::IoError(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {:?}", ATTEMPT.min(left)),
            ))),
        };
        match attempt {
            Err(e) if transient(&e) && Instant::now() + RETRY_PAUSE < deadline => {
                tracing::debug!(error = %describe(&e), "etcd request failed, retrying");
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            other => return other,
        }
    }
}

/// A read of `key` (a range with `options`), retried as [`retry`] does.
async fn get(
    kv: &KvClient,
    deadline: Instant,
    key: &str,
    options: Option<GetOptions>,
) -> Result<etcd_client::GetResponse, etcd_client::Error> {
    retry(deadline, || {
        let mut kv = kv.clone();
        let options = options.clone();
        async move { kv.get(key, options).await }
    })
    .await
}

fn limit_i64(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// A service's name as a key segment: `%` and `/` escaped.
pub(crate) fn escape(service: &str) -> String {
    service.replace('%', "%25").replace('/', "%2F")
}

fn service_key(prefix: &str, service: &str, rest: &str) -> String {
    format!("{prefix}/services/{}/{rest}", escape(service))
}

fn id_segment(id: Option<DeploymentId>) -> String {
    match id {
        Some(id) => format!("{:020}", id.0),
        None => "none".to_string(),
    }
}

fn decode<T: for<'de> Deserialize<'de>>(name: &str, key: &[u8], value: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(value).map_err(|e| StoreError::EtcdCorrupt {
        store: name.to_string(),
        key: String::from_utf8_lossy(key).into_owned(),
        detail: format!("cannot decode its value: {e}"),
    })
}

/// Cuts `text` to [`MAX_TEXT_BYTES`] at a character boundary, noting how much was cut.
fn cut(text: &mut String) {
    if text.len() <= MAX_TEXT_BYTES {
        return;
    }
    let mut end = MAX_TEXT_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let dropped = text.len() - end;
    text.truncate(end);
    let _ = write!(text, " [{dropped} more bytes cut]");
}

fn cut_reason(reason: &mut Reason) {
    match reason {
        Reason::ProvisionFailed(why)
        | Reason::SmokeFailed(why)
        | Reason::Unhealthy(why)
        | Reason::NotAcknowledged(why)
        | Reason::MigrationFailed(why)
        | Reason::LiveCheckFailed(why) => cut(why),
        Reason::Requested | Reason::HealthDeadline(_) | Reason::ErrorRate { .. } | Reason::Latency { .. } => {}
    }
}

fn cut_outcome(outcome: &mut Outcome) {
    if let Outcome::Aborted(r) | Outcome::RolledBack(r) = outcome {
        cut_reason(r);
    }
}

fn cut_record(record: &mut Record) {
    match record {
        Record::Aborted { reason, .. } | Record::RolledBack { reason, .. } => cut_reason(reason),
        Record::Migration { detail, .. } => cut(detail),
        _ => {}
    }
}

fn cut_state(state: &mut State) {
    match &mut state.phase {
        Phase::Stable { last: Some(ended), .. } => cut_outcome(&mut ended.outcome),
        Phase::Migrating {
            failure: Some(reason), ..
        } => cut_reason(reason),
        _ => {}
    }
}

fn cut_audit(audit: &mut Audit) {
    cut(&mut audit.arguments);
    cut(&mut audit.result);
}

/// The key of a new audit entry: the time and a random part, unique across nodes.
fn audit_key(prefix: &str, at_ms: i64) -> String {
    let mut random = [0u8; 8];
    // Without randomness, the time and the process id still make a collision unlikely; a
    // collision would overwrite one entry, never fail a commit.
    if getrandom::getrandom(&mut random).is_err() {
        random[..4].copy_from_slice(&std::process::id().to_be_bytes());
    }
    format!("{prefix}/audit/{at_ms:016}-{:016x}", u64::from_be_bytes(random))
}

/// The kind of a record, as error messages name it.
fn kind(record: &Record) -> &'static str {
    match record {
        Record::Started { .. } => "started",
        Record::Healthy { .. } => "healthy",
        Record::Validated { .. } => "validated",
        Record::AwaitingPromotion { .. } => "awaiting_promotion",
        Record::Promoted { .. } => "promoted",
        Record::WentLive { .. } => "went_live",
        Record::Aborted { .. } => "aborted",
        Record::RolledBack { .. } => "rolled_back",
        Record::Interrupted { .. } => "interrupted",
        Record::WatchRestarted { .. } => "watch_restarted",
        Record::Retired { .. } => "retired",
        Record::Migration { .. } => "migration",
    }
}

/// The deployment a record names (`None` for `Retired`).
fn record_id(record: &Record) -> Option<DeploymentId> {
    match record {
        Record::Started { id, .. }
        | Record::Healthy { id }
        | Record::Validated { id, .. }
        | Record::AwaitingPromotion { id, .. }
        | Record::Promoted { id, .. }
        | Record::WentLive { id, .. }
        | Record::Aborted { id, .. }
        | Record::RolledBack { id, .. }
        | Record::Interrupted { id, .. }
        | Record::WatchRestarted { id }
        | Record::Migration { id, .. } => Some(*id),
        Record::Retired { .. } => None,
    }
}

/// A commit's nonce: 128 random bits in hex, which tell this commit's write apart from any
/// other's (see the module documentation, "Transactions").
pub(crate) fn commit_nonce() -> String {
    static FALLBACK: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let mut random = [0u8; 16];
    // Without randomness (Linux has had getrandom(2) since 3.17): the time in nanoseconds, the
    // process id and a count of this process's nonces, unique on this host, and across hosts
    // unless two processes of the same id commit at the same nanosecond.
    if getrandom::getrandom(&mut random).is_err() {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let count = FALLBACK.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        random[..8].copy_from_slice(&nanos.to_be_bytes());
        random[8..12].copy_from_slice(&std::process::id().to_be_bytes());
        random[12..].copy_from_slice(&count.to_be_bytes());
    }
    random.iter().fold(String::with_capacity(32), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// What a commit writes, prepared before it is sent: the puts, among them the commit key with
/// this commit's nonce.
struct Prepared {
    commit_key: String,
    nonce: String,
    puts: Vec<(String, Vec<u8>)>,
}

impl Prepared {
    /// A commit that puts a fresh nonce at `commit_key`, and nothing else yet.
    fn new(commit_key: String) -> Prepared {
        let nonce = commit_nonce();
        Prepared {
            puts: vec![(commit_key.clone(), nonce.clone().into_bytes())],
            commit_key,
            nonce,
        }
    }

    fn put(&mut self, key: String, value: Vec<u8>) {
        self.puts.push((key, value));
    }

    fn bytes(&self) -> usize {
        self.puts.iter().map(|(k, v)| k.len() + v.len()).sum()
    }

    /// The transaction that writes it all if the state key is at revision `expected` (0: if it
    /// does not exist), and otherwise reads the state key and the commit key.
    fn into_txn(self, state_key: &str, expected: i64) -> CommitTxn {
        let compare = if expected == 0 {
            Compare::create_revision(state_key, CompareOp::Equal, 0)
        } else {
            Compare::mod_revision(state_key, CompareOp::Equal, expected)
        };
        let txn = Txn::new()
            .when([compare])
            .and_then(
                self.puts
                    .into_iter()
                    .map(|(k, v)| TxnOp::put(k, v, None))
                    .collect::<Vec<_>>(),
            )
            .or_else([TxnOp::get(state_key, None), TxnOp::get(self.commit_key, None)]);
        CommitTxn { txn, nonce: self.nonce }
    }
}

/// A commit's transaction, ready to be sent, and sent again while [`retry`] says so.
#[derive(Clone)]
struct CommitTxn {
    txn: Txn,
    /// The value it puts at the commit key.
    nonce: String,
}

/// What became of a [`CommitTxn`].
#[derive(Debug, PartialEq, Eq)]
enum Committed {
    /// The commit is the service's state, at this revision: applied by this sending, or by an
    /// earlier one whose answer was lost.
    Applied(i64),
    /// Another commit's state is at this revision (0: no state); nothing was written.
    Conflict(i64),
}

/// Sends `commit` once and reads etcd's answer. When the compare failed, the state key and the
/// commit key tell whether the state there is this commit's own: the commit key holds this
/// commit's nonce and was written with the state key, at its revision (a key written by the same
/// transaction has the same `mod_revision`).
async fn send_commit(mut kv: KvClient, commit: CommitTxn) -> Result<Committed, etcd_client::Error> {
    let resp = kv.txn(commit.txn).await?;
    if resp.succeeded() {
        return Ok(Committed::Applied(resp.header().map_or(0, |h| h.revision())));
    }
    let mut found = resp.op_responses().into_iter().map(|answer| match answer {
        TxnOpResponse::Get(g) => g.kvs().first().map(|item| (item.mod_revision(), item.value().to_vec())),
        _ => None,
    });
    let (state, mark) = (found.next().flatten(), found.next().flatten());
    Ok(match (state, mark) {
        (Some((revision, _)), Some((marked, nonce))) if marked == revision && nonce == commit.nonce.as_bytes() => {
            Committed::Applied(revision)
        }
        (state, _) => Committed::Conflict(state.map_or(0, |(revision, _)| revision)),
    })
}

impl StateStore for EtcdStore {
    fn commit_many(
        &self,
        commits: &[crate::store::ServiceCommit<'_>],
        audit: Option<Audit>,
    ) -> Result<Vec<Revision>, StoreError> {
        match commits {
            [] => Ok(Vec::new()),
            [one] => self
                .commit(one.service, one.expected, one.state, one.records, audit)
                .map(|r| vec![r]),
            [first, ..] => Err(StoreError::Rejected {
                store: self.name.clone(),
                service: first.service.to_string(),
                detail: "the etcd store commits one service at a time; a release of several services \
                         switched as one is not available in a fleet yet: deploy them one at a time"
                    .into(),
            }),
        }
    }
    fn next_deployment_id(&self, service: &str) -> Result<DeploymentId, StoreError> {
        let kv = self.kv.clone();
        let name = self.name.clone();
        let counter = format!("{}/ids/{}", self.prefix, escape(service));
        let state_key = self.service_key(service, "state");
        let deployments = self.service_key(service, "deployments/");
        let service = service.to_string();
        self.run(
            &format!("allocate a deployment id for service {service}"),
            move |deadline| async move {
                loop {
                    // One consistent read of the counter, the state and the newest deployment.
                    let read = Txn::new().and_then([
                        TxnOp::get(counter.clone(), None),
                        TxnOp::get(state_key.clone(), None),
                        TxnOp::get(
                            deployments.clone(),
                            Some(
                                GetOptions::new()
                                    .with_prefix()
                                    .with_sort(SortTarget::Key, SortOrder::Descend)
                                    .with_limit(1),
                            ),
                        ),
                    ]);
                    let resp = retry(deadline, || {
                        let mut kv = kv.clone();
                        let read = read.clone();
                        async move { kv.txn(read).await }
                    })
                    .await?;
                    let gets: Vec<_> = resp
                        .op_responses()
                        .into_iter()
                        .filter_map(|r| match r {
                            TxnOpResponse::Get(g) => Some(g),
                            _ => None,
                        })
                        .collect();
                    let [counter_resp, state_resp, newest] = gets.as_slice() else {
                        return Err(Fail::Store(StoreError::EtcdCorrupt {
                            store: name.clone(),
                            key: counter.clone(),
                            detail: "etcd answered a read of three keys with another number of answers".into(),
                        }));
                    };
                    let mut highest = 0u64;
                    let mut counter_rev = 0i64;
                    if let Some(item) = counter_resp.kvs().first() {
                        counter_rev = item.mod_revision();
                        let text = String::from_utf8_lossy(item.value());
                        highest = text.trim().parse::<u64>().map_err(|_| {
                            Fail::Store(StoreError::EtcdCorrupt {
                                store: name.clone(),
                                key: counter.clone(),
                                detail: format!("{text:?} is not a deployment id"),
                            })
                        })?;
                    }
                    let mut state_rev = 0i64;
                    if let Some(item) = state_resp.kvs().first() {
                        state_rev = item.mod_revision();
                        let state: State = decode(&name, item.key(), item.value())?;
                        highest = highest.max(state.last_id.map_or(0, |id| id.0));
                    }
                    if let Some(item) = newest.kvs().first() {
                        let summary: DeploymentSummary = decode(&name, item.key(), item.value())?;
                        highest = highest.max(summary.id.0);
                    }
                    let Some(next) = highest.checked_add(1) else {
                        return Err(Fail::Store(StoreError::Unrepresentable {
                            store: name.clone(),
                            service: service.clone(),
                            what: "a deployment id above the largest 64-bit integer".into(),
                        }));
                    };
                    let swap = Txn::new()
                        .when([
                            Compare::mod_revision(counter.clone(), CompareOp::Equal, counter_rev),
                            Compare::mod_revision(state_key.clone(), CompareOp::Equal, state_rev),
                        ])
                        .and_then([TxnOp::put(counter.clone(), next.to_string(), None)]);
                    let resp = retry(deadline, || {
                        let mut kv = kv.clone();
                        let swap = swap.clone();
                        async move { kv.txn(swap).await }
                    })
                    .await?;
                    if resp.succeeded() {
                        return Ok(DeploymentId(next));
                    }
                    // Another node took an id (or committed) meanwhile: read again.
                }
            },
        )
    }

    fn commit(
        &self,
        service: &str,
        expected: Revision,
        state: &State,
        records: &[Record],
        audit: Option<Audit>,
    ) -> Result<Revision, StoreError> {
        let rejected = |detail: String| StoreError::Rejected {
            store: self.name.clone(),
            service: service.to_string(),
            detail,
        };
        let unfit = |what: String| StoreError::Unrepresentable {
            store: self.name.clone(),
            service: service.to_string(),
            what,
        };
        if state.service != service {
            return Err(rejected(format!(
                "the state to commit belongs to service {:?}",
                state.service
            )));
        }
        if records.len() > MAX_RECORDS {
            return Err(unfit(format!(
                "{} records in one commit (at most {MAX_RECORDS})",
                records.len()
            )));
        }
        let Ok(expected_rev) = i64::try_from(expected.0) else {
            return Err(StoreError::Conflict {
                store: self.name.clone(),
                service: service.to_string(),
                expected: expected.0,
                found: 0,
            });
        };
        let mut stored_state = state.clone();
        cut_state(&mut stored_state);
        let state_json = serde_json::to_vec(&stored_state).map_err(|e| unfit(format!("the state ({e})")))?;
        let mut stored_records = Vec::with_capacity(records.len());
        for record in records {
            let mut record = record.clone();
            cut_record(&mut record);
            // Encoded now, so that a value JSON cannot hold fails before anything is sent.
            serde_json::to_vec(&record).map_err(|e| unfit(format!("record {} ({e})", kind(&record))))?;
            stored_records.push(record);
        }
        let audit = audit.map(|mut a| {
            if a.service.is_none() {
                a.service = Some(service.to_string());
            }
            cut_audit(&mut a);
            a
        });

        let kv = self.kv.clone();
        let name = self.name.clone();
        let prefix = self.prefix.clone();
        let state_key = self.service_key(service, "state");
        let commit_key = self.service_key(service, "commit");
        let service = service.to_string();
        let last_id = state.last_id;
        self.run(&format!("commit of service {service}"), move |deadline| async move {
            let conflict = |found: i64| {
                Fail::Store(StoreError::Conflict {
                    store: name.clone(),
                    service: service.clone(),
                    expected: expected.0,
                    found: found.unsigned_abs(),
                })
            };
            let rejected = |detail: String| {
                Fail::Store(StoreError::Rejected {
                    store: name.clone(),
                    service: service.clone(),
                    detail,
                })
            };
            // Read the state's revision and the summaries the records change, at one revision.
            let mut ids: Vec<DeploymentId> = stored_records.iter().filter_map(record_id).collect();
            ids.extend(last_id);
            ids.sort();
            ids.dedup();
            let summary_key = |id: DeploymentId| service_key(&prefix, &service, &format!("deployments/{:020}", id.0));
            let mut reads = vec![TxnOp::get(state_key.clone(), None)];
            reads.extend(ids.iter().map(|id| TxnOp::get(summary_key(*id), None)));
            let read = Txn::new().and_then(reads);
            let resp = retry(deadline, || {
                let mut kv = kv.clone();
                let read = read.clone();
                async move { kv.txn(read).await }
            })
            .await?;
            let mut answers = resp.op_responses().into_iter();
            let found = match answers.next() {
                Some(TxnOpResponse::Get(g)) => g.kvs().first().map_or(0, |item| item.mod_revision()),
                _ => 0,
            };
            if found != expected_rev {
                return Err(conflict(found));
            }
            let mut summaries: BTreeMap<DeploymentId, (DeploymentSummary, bool)> = BTreeMap::new();
            for answer in answers {
                if let TxnOpResponse::Get(g) = answer {
                    if let Some(item) = g.kvs().first() {
                        let summary: DeploymentSummary = decode(&name, item.key(), item.value())?;
                        summaries.insert(summary.id, (summary, false));
                    }
                }
            }

            // The summaries as the records leave them, and the records' keys.
            let now_ms = to_ms(SystemTime::now());
            let now = from_ms(now_ms);
            let mut prepared = Prepared::new(commit_key);
            prepared.put(state_key.clone(), state_json);
            let mut record_puts = Vec::new();
            for (n, record) in stored_records.into_iter().enumerate() {
                let id = record_id(&record);
                match (&record, id) {
                    (
                        Record::Started {
                            id,
                            release,
                            colour,
                            cause,
                        },
                        _,
                    ) => {
                        if summaries.contains_key(id) {
                            return Err(rejected(format!(
                                "record started of deployment {id}, which was already started"
                            )));
                        }
                        let summary = DeploymentSummary {
                            id: *id,
                            release: release.clone(),
                            colour: *colour,
                            cause: *cause,
                            started_at: now,
                            promoted_at: None,
                            ended_at: None,
                            outcome: None,
                        };
                        summaries.insert(*id, (summary, true));
                    }
                    (_, Some(id)) => {
                        let Some((summary, changed)) = summaries.get_mut(&id) else {
                            return Err(rejected(format!(
                                "record {} of deployment {id}, which was never started",
                                kind(&record)
                            )));
                        };
                        let outcome = match &record {
                            Record::Promoted { .. } => {
                                summary.promoted_at = Some(now);
                                *changed = true;
                                None
                            }
                            Record::WentLive { .. } => Some(Outcome::WentLive),
                            Record::Aborted { reason, .. } => Some(Outcome::Aborted(reason.clone())),
                            Record::RolledBack { reason, .. } => Some(Outcome::RolledBack(reason.clone())),
                            Record::Interrupted { .. } => Some(Outcome::Interrupted),
                            _ => None,
                        };
                        if let Some(outcome) = outcome {
                            summary.outcome = Some(outcome);
                            summary.ended_at = Some(now);
                            *changed = true;
                        }
                    }
                    (_, None) => {}
                }
                let filed = id.or(last_id);
                let key = service_key(
                    &prefix,
                    &service,
                    &format!("records/{}/{:020}-{n:05}", id_segment(filed), expected.0),
                );
                let value = StoredRecord {
                    at_ms: now_ms,
                    deployment: filed,
                    record,
                };
                record_puts.push((key, value));
            }
            // `Retired` is filed under the committed state's newest deployment, which must exist.
            if let Some(id) = last_id {
                let files_retired = record_puts
                    .iter()
                    .any(|(_, r)| matches!(r.record, Record::Retired { .. }));
                if files_retired && !summaries.contains_key(&id) {
                    return Err(rejected(format!(
                        "record retired filed under deployment {id}, which was never started"
                    )));
                }
            }
            for (summary, changed) in summaries.values() {
                if *changed {
                    let json = serde_json::to_vec(summary)
                        .map_err(|e| rejected(format!("the summary of deployment {} ({e})", summary.id)))?;
                    prepared.put(summary_key(summary.id), json);
                }
            }
            for (key, value) in record_puts {
                let json = serde_json::to_vec(&value)
                    .map_err(|e| rejected(format!("record {} ({e})", kind(&value.record))))?;
                prepared.put(key, json);
            }
            if let Some(audit) = audit {
                let value = AuditEntryValue { at_ms: now_ms, audit };
                let json = serde_json::to_vec(&value).map_err(|e| rejected(format!("the audit entry ({e})")))?;
                prepared.put(audit_key(&prefix, now_ms), json);
            }
            if prepared.bytes() > MAX_REQUEST_BYTES {
                return Err(Fail::Store(StoreError::Unrepresentable {
                    store: name.clone(),
                    service: service.clone(),
                    what: format!(
                        "a commit of {} bytes (etcd takes at most {MAX_REQUEST_BYTES} in one request)",
                        prepared.bytes()
                    ),
                }));
            }

            let write = prepared.into_txn(&state_key, expected_rev);
            let committed = retry(deadline, || send_commit(kv.clone(), write.clone())).await?;
            match committed {
                Committed::Applied(revision) => Ok(Revision(revision.unsigned_abs())),
                Committed::Conflict(found) => Err(conflict(found)),
            }
        })
    }

    fn append_audit(&self, audit: &Audit) -> Result<(), StoreError> {
        let mut audit = audit.clone();
        cut_audit(&mut audit);
        let kv = self.kv.clone();
        let prefix = self.prefix.clone();
        self.run("append to the audit log", move |deadline| async move {
            let at_ms = to_ms(SystemTime::now());
            let json = serde_json::to_vec(&AuditEntryValue { at_ms, audit })
                .map_err(|e| Fail::Store(StoreError::EtcdSetup(format!("cannot encode an audit entry: {e}"))))?;
            let key = audit_key(&prefix, at_ms);
            retry(deadline, || {
                let mut kv = kv.clone();
                let (key, json) = (key.clone(), json.clone());
                async move { kv.put(key, json, None).await }
            })
            .await?;
            Ok(())
        })
    }

    fn load(&self, service: &str) -> Result<Option<(State, Revision)>, StoreError> {
        let kv = self.kv.clone();
        let name = self.name.clone();
        let key = self.service_key(service, "state");
        self.run(
            &format!("load the state of service {service}"),
            move |deadline| async move {
                let resp = get(&kv, deadline, &key, None).await?;
                match resp.kvs().first() {
                    None => Ok(None),
                    Some(item) => {
                        let state: State = decode(&name, item.key(), item.value())?;
                        Ok(Some((state, Revision(item.mod_revision().unsigned_abs()))))
                    }
                }
            },
        )
    }

    fn history(&self, service: &str, limit: usize) -> Result<Vec<DeploymentSummary>, StoreError> {
        if limit == 0 {
            // etcd reads a limit of 0 as "no limit".
            return Ok(Vec::new());
        }
        let kv = self.kv.clone();
        let name = self.name.clone();
        let prefix = self.service_key(service, "deployments/");
        self.run(
            &format!("read the history of service {service}"),
            move |deadline| async move {
                let options = GetOptions::new()
                    .with_prefix()
                    .with_sort(SortTarget::Key, SortOrder::Descend)
                    .with_limit(limit_i64(limit));
                let resp = get(&kv, deadline, &prefix, Some(options)).await?;
                resp.kvs()
                    .iter()
                    .map(|item| decode(&name, item.key(), item.value()).map_err(Fail::Store))
                    .collect()
            },
        )
    }

    fn transitions(&self, service: &str, deployment: DeploymentId) -> Result<Vec<TransitionEntry>, StoreError> {
        let kv = self.kv.clone();
        let name = self.name.clone();
        let prefix = self.service_key(service, &format!("records/{}/", id_segment(Some(deployment))));
        self.run(
            &format!("read the transitions of deployment {deployment} of service {service}"),
            move |deadline| async move {
                let options = GetOptions::new().with_prefix();
                let resp = get(&kv, deadline, &prefix, Some(options)).await?;
                let mut out = Vec::new();
                for item in resp.kvs() {
                    let stored: StoredRecord = decode(&name, item.key(), item.value())?;
                    // The key ends in `-{n:05}`: the record's position in its commit.
                    let n = item
                        .key()
                        .rsplit(|b| *b == b'-')
                        .next()
                        .and_then(|tail| std::str::from_utf8(tail).ok())
                        .and_then(|tail| tail.parse::<u64>().ok())
                        .unwrap_or(0);
                    let seq = item
                        .create_revision()
                        .unsigned_abs()
                        .saturating_mul(65_536)
                        .saturating_add(n);
                    out.push(TransitionEntry {
                        seq,
                        at: from_ms(stored.at_ms),
                        deployment: stored.deployment,
                        record: stored.record,
                    });
                }
                Ok(out)
            },
        )
    }

    fn get_value(&self, key: &str) -> Result<Option<String>, StoreError> {
        let kv = self.kv.clone();
        let name = self.name.clone();
        let full = format!("{}/values/{key}", self.prefix);
        self.run(&format!("read {key}"), move |deadline| async move {
            let resp = get(&kv, deadline, &full, None).await?;
            match resp.kvs().first() {
                None => Ok(None),
                Some(item) => String::from_utf8(item.value().to_vec()).map(Some).map_err(|_| {
                    Fail::Store(StoreError::EtcdCorrupt {
                        store: name.clone(),
                        key: full.clone(),
                        detail: "the value is not UTF-8 text".into(),
                    })
                }),
            }
        })
    }

    fn set_value(&self, key: &str, value: Option<&str>) -> Result<(), StoreError> {
        let kv = self.kv.clone();
        let full = format!("{}/values/{key}", self.prefix);
        let value = value.map(str::to_string);
        self.run(&format!("write {key}"), move |deadline| async move {
            retry(deadline, || {
                let mut kv = kv.clone();
                let (full, value) = (full.clone(), value.clone());
                async move {
                    match value {
                        Some(v) => kv.put(full, v, None).await.map(|_| ()),
                        None => kv.delete(full, None).await.map(|_| ()),
                    }
                }
            })
            .await?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests;
