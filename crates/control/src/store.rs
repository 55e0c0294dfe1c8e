//! The state store: services, releases, deployments and their history in SQLite
//! (`<state_dir>/cutover.db`).
//!
//! This module owns everything cutover must remember across a restart, even after `kill -9`: the
//! committed lifecycle [`State`] of each service, the deployment history with every
//! [`Record`] the lifecycle emitted, the audit log of who asked for what, the deployment id
//! counter, and the instances the process driver started (so that a restarted daemon can adopt
//! them). It never decides anything: it stores what the lifecycle and the drivers hand it and
//! gives it back unchanged. It never talks to the proxy.
//!
//! # Durability
//! The database runs in WAL mode with `synchronous=FULL`: when [`Store::commit`] returns, the
//! transaction is on disk and survives a crash of the process or of the machine. A commit is one
//! `BEGIN IMMEDIATE` transaction holding the new state snapshot, the records and the audit row;
//! a process killed at any instant leaves either all of it or none of it. That is the contract
//! the lifecycle's crash recovery is built on (see `lifecycle.rs`, "How the driver uses it").
//!
//! # The seam
//! The daemon reaches this store only through two traits: [`StateStore`], what every node of a
//! deployment shares (states compared and swapped on their [`Revision`], history, audit, ids,
//! small values), and [`LocalStore`], what only this host knows (the instances it started).
//! [`Store`] implements both for one node; a fleet's store implements [`StateStore`] and keeps
//! [`Store`] as its local one. `shared_contract` in the tests is the contract both must keep.
//!
//! # Schema (version 5, in `PRAGMA user_version`; `PRAGMA application_id` = 0x63757476 "cutv")
//! All tables are `STRICT`. Timestamps are unix milliseconds (`INTEGER`), durations are
//! nanoseconds (`INTEGER`, so at most about 292 years), colours are `'blue'` / `'green'`.
//! Enumerations are stored as fixed lower-case codes that belong to the schema version, not to
//! the Rust names, so renaming a variant never changes what is on disk.
//!
//! - `services`: one row per service, the last committed [`State`] as explicit columns:
//!   `name` (primary key), `updated_at`, `live_colour`, `live_version`, `previous_version`,
//!   `last_id`, `phase` (`stable | provisioning | validating | ready_to_promote | watching`);
//!   for `stable`: `warm_colour`, `warm_version`, `warm_promoted_by`, `warm_keep_warm_ns` and the
//!   last ended deployment `ended_id`, `ended_version`, `ended_outcome` plus the reason columns;
//!   for the phases with a deployment: `dep_id`, `dep_version`, `dep_colour`, `dep_cause`
//!   (`deploy | cold_rollback`) and its plan `plan_health_deadline_ns`, `plan_promote`
//!   (`manual | auto`), `plan_promote_delay_ns`, `plan_watch_ns`, `plan_min_requests`,
//!   `plan_max_error_rate` (`REAL`), `plan_max_p99_ns` (NULL: no latency check),
//!   `plan_keep_warm_ns`, `plan_migrate` and `plan_gradual` (JSON: the schema-change commands it
//!   runs, the steps of a gradual switch); for `watching` also `rollback_colour`,
//!   `rollback_version`, `judged` and, during a gradual switch, `watch_step`; for `migrating`
//!   `migration_step` and `migration_failure`; `contract` and `contracted_version` for the
//!   contract step owed or run. Columns a phase does not use are NULL.
//! - The reason columns, shared by `services`, `deployments` and `transitions`, hold a
//!   [`Reason`]: `reason` (`requested | provision_failed | health_deadline | smoke_failed |
//!   unhealthy | error_rate | latency | not_acknowledged`), `reason_text` (the message of the
//!   four with one),
//!   `reason_ns` (health deadline, or p99), `reason_max_ns` (latency maximum), `reason_errors`,
//!   `reason_requests`, `reason_max_rate` (error rate).
//! - `releases`: `(service, version)` primary key, `first_seen`: every version ever deployed.
//! - `deployments`: `(service, id)` primary key, `version`, `colour`, `cause`, `started_at`,
//!   `promoted_at`, `ended_at`, `outcome` (`went_live | aborted | rolled_back | interrupted`,
//!   NULL while in progress) plus the reason columns. Maintained from the records: `Started`
//!   inserts the row, `Promoted` sets `promoted_at`, the ending records set the outcome (an
//!   instant rollback after the watch turns `went_live` into `rolled_back`: the last word wins;
//!   `transitions` keeps every word).
//! - `transitions`: `seq` (AUTOINCREMENT, so never reused), `at`, `service`, `deployment`, `kind`
//!   (the [`Record`] variant) and its fields: `colour`, `version`, `cause`, `auto_after_ns`,
//!   `watched`, `phase`, the reason columns. `Retired` names no deployment; it is filed under the
//!   service's newest deployment (`State::last_id` of the committed state): the one whose watch
//!   ended (keep-warm over or zero) or that needed the colour.
//! - `audit`: `seq`, `at`, `actor`, `service`, `action`, `arguments`, `result`.
//! - `deployment_ids`: `service` primary key, `last`: the highest id handed out.
//! - `instances`: `(service, colour, idx)` primary key, `version`, `pid`, `pgid`, `port`,
//!   `start_ticks`: written by the process driver.
//! - Version 2 added `services.revision` (0 before the first commit, +1 at each; a commit names
//!   the revision it expects) and `kv`: `key` primary key, `value`, `updated_at`, for small
//!   cluster-wide values: `preview-token`, a static colour's upstreams
//!   (`upstreams/<service>/<colour>`, one address per line), a service's maintenance message
//!   (`maintenance/<service>`).
//!
//! Foreign keys tie `deployments`, `releases` and `transitions` to `services`, and
//! `transitions.(service, deployment)` to `deployments`. They are deferred to the end of the
//! transaction because a commit's records are not in dependency order (a new deployment's
//! `Retired` comes before its `Started`). A violation fails the whole commit.
//!
//! # Integers
//! SQLite integers are signed 64-bit. A `u64` above `i64::MAX`, a duration of more than about 292
//! years or a NaN rate cannot be stored exactly; [`Store::commit`] refuses them (nothing is
//! written) rather than store something that would not read back equal.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cutover_proxy::Colour;
use rusqlite::types::{FromSql, Value};
use rusqlite::{params, params_from_iter, Connection, ErrorCode, Row, Transaction, TransactionBehavior};
use serde::{Deserialize, Serialize};

use crate::lifecycle::{
    Cause, Deployment, DeploymentId, Ended, Live, MigratePlan, MigrationStep, Outcome, Phase, Plan, Promotion, Reason,
    Record, Release, State, Warm, WatchPolicy, Watched,
};

/// The database file's name inside the state directory.
pub const DB_FILE: &str = "cutover.db";

/// The schema version this code reads and writes (`PRAGMA user_version`): one per migration.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// The longest duration a state can hold: durations are stored as signed 64-bit nanoseconds.
/// The config check refuses anything longer (`config::parse_duration`), so that a duration the
/// config accepted never fails a commit later.
pub const LONGEST_DURATION: Duration = Duration::from_nanos(i64::MAX as u64);

/// How many times a service's state has been committed: each commit compares the revision it
/// was decided on with the stored one and writes the next ([`Store::commit_at`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Revision(pub u64);

impl Revision {
    /// The revision of a service that was never committed.
    pub const NONE: Revision = Revision(0);
}

/// `PRAGMA application_id` of a cutover database: "cutv". Tells our file from another program's
/// SQLite database that happens to sit at the same path.
const APPLICATION_ID: i64 = 0x6375_7476;

/// How long a statement waits for a lock held by another connection before failing. Only another
/// process can hold one (this process has a single connection); a daemon's commit takes
/// milliseconds, so waiting longer than this means something is wrong.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// One step of the schema: SQL, or code for what SQL alone cannot say.
enum Migration {
    Sql(&'static str),
    /// New reason codes: the tables whose `reason` column lists the codes are rebuilt with these
    /// added ([`widen_reasons`]).
    Reasons(&'static [&'static str]),
    /// Code that takes the database one version further.
    Code(fn(&rusqlite::Transaction<'_>) -> rusqlite::Result<()>),
}

/// `MIGRATIONS[n]` takes a database from version `n` to `n + 1`. Version 0 is an empty file.
const MIGRATIONS: [Migration; 5] = [
    Migration::Sql(SCHEMA_V1),
    Migration::Sql(SCHEMA_V2),
    // Version 3: a fleet's switch that nodes did not acknowledge is rolled back for that reason.
    Migration::Reasons(&["not_acknowledged"]),
    // Version 4: schema changes in phases (`migrate`).
    Migration::Code(schema_v4),
    // Version 5: gradual switches (`promote.steps`): the plan's steps, the step in progress.
    Migration::Sql(
        "ALTER TABLE services ADD COLUMN plan_gradual TEXT;
         ALTER TABLE services ADD COLUMN watch_step INTEGER CHECK (watch_step >= 0);",
    ),
];

/// Version 4: the phase `migrating`, the record `migration`, the reasons `migration_failed` and
/// `live_check_failed`, and the columns of a deployment's schema change.
fn schema_v4(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    // Builds that added these columns still wrote version 3 into the file: such a database has
    // version 4's schema already.
    let has_v4: i64 = tx.query_row(
        "SELECT COUNT(*) FROM pragma_table_info('services') WHERE name = 'migration_step'",
        [],
        |r| r.get(0),
    )?;
    if has_v4 > 0 {
        return Ok(());
    }
    rebuild_with(
        tx,
        "services",
        &[],
        &[("'ready_to_promote', 'watching'", &["migrating"])],
    )?;
    rebuild_with(
        tx,
        "transitions",
        &["CREATE INDEX transitions_by_deployment ON transitions (service, deployment, seq)"],
        &[("'watch_restarted', 'retired'", &["migration"])],
    )?;
    widen_reasons(tx, &["migration_failed", "live_check_failed"])?;
    tx.execute_batch(
        "ALTER TABLE services ADD COLUMN migration_step TEXT
             CHECK (migration_step IN ('contract', 'expand', 'check', 'rollback'));
         ALTER TABLE services ADD COLUMN migration_failure TEXT;
         ALTER TABLE services ADD COLUMN plan_migrate TEXT;
         ALTER TABLE services ADD COLUMN contract TEXT;
         ALTER TABLE services ADD COLUMN contracted_version TEXT;
         ALTER TABLE transitions ADD COLUMN detail TEXT;",
    )
}

/// The tables with reason columns, and the indexes each has (a rebuilt table loses them).
const REASON_TABLES: [(&str, &[&str]); 3] = [
    ("services", &[]),
    ("deployments", &[]),
    (
        "transitions",
        &["CREATE INDEX transitions_by_deployment ON transitions (service, deployment, seq)"],
    ),
];

/// The last code of every `reason` CHECK list, after which new codes are added.
const REASON_LIST_END: &str = "'latency'";

fn schema_error(message: String) -> rusqlite::Error {
    rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR), Some(message))
}

/// Rebuilds each table of [`REASON_TABLES`] with `codes` added to its `reason` CHECK list,
/// keeping every row, column and index (SQLite cannot change a CHECK in place). Runs inside the
/// migration's transaction, with foreign keys not yet enforced.
fn widen_reasons(tx: &rusqlite::Transaction<'_>, codes: &[&str]) -> rusqlite::Result<()> {
    for (table, indexes) in REASON_TABLES {
        rebuild_with(tx, table, indexes, &[(REASON_LIST_END, codes)])?;
    }
    Ok(())
}

/// Rebuilds `table` (then its `indexes`) with, for each edit, `codes` added to the CHECK list
/// whose last code is the edit's marker (found exactly once in the table's definition); rows and
/// columns are kept.
fn rebuild_with(
    tx: &rusqlite::Transaction<'_>,
    table: &str,
    indexes: &[&str],
    edits: &[(&str, &[&str])],
) -> rusqlite::Result<()> {
    let mut sql: String = tx.query_row(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?1",
        [table],
        |r| r.get(0),
    )?;
    for (marker, codes) in edits {
        let added: String = codes.iter().map(|c| format!(", '{c}'")).collect();
        let end = sql.find(marker).filter(|_| sql.matches(marker).count() == 1);
        let Some(end) = end.map(|i| i + marker.len()) else {
            return Err(schema_error(format!(
                "table {table}: a CHECK list does not end in {marker} exactly once"
            )));
        };
        sql = format!("{}{added}{}", &sql[..end], &sql[end..]);
    }
    // A table renamed by an earlier rebuild has its name quoted.
    let rest = sql
        .strip_prefix(&format!("CREATE TABLE {table} "))
        .or_else(|| sql.strip_prefix(&format!("CREATE TABLE \"{table}\" ")));
    let Some(rebuilt) = rest.map(|rest| format!("CREATE TABLE {table}_rebuilt {rest}")) else {
        return Err(schema_error(format!("table {table}: unexpected definition {sql:?}")));
    };
    tx.execute_batch(&format!(
        "{rebuilt};
         INSERT INTO {table}_rebuilt SELECT * FROM {table};
         DROP TABLE {table};
         ALTER TABLE {table}_rebuilt RENAME TO {table};"
    ))?;
    for index in indexes {
        tx.execute_batch(index)?;
    }
    Ok(())
}

/// Version 2: each service's state carries the revision its commits compare and swap on, and
/// small cluster-wide values (`kv`) leave their side files.
const SCHEMA_V2: &str = "
ALTER TABLE services ADD COLUMN revision INTEGER NOT NULL DEFAULT 0 CHECK (revision >= 0);
CREATE TABLE kv (
    key TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL,
    updated_at INTEGER NOT NULL
) STRICT;
";

const SCHEMA_V1: &str = "
CREATE TABLE services (
    name TEXT PRIMARY KEY NOT NULL,
    updated_at INTEGER NOT NULL,
    live_colour TEXT CHECK (live_colour IN ('blue', 'green')),
    live_version TEXT,
    previous_version TEXT,
    last_id INTEGER CHECK (last_id >= 0),
    phase TEXT NOT NULL
        CHECK (phase IN ('stable', 'provisioning', 'validating', 'ready_to_promote', 'watching')),
    warm_colour TEXT CHECK (warm_colour IN ('blue', 'green')),
    warm_version TEXT,
    warm_promoted_by INTEGER,
    warm_keep_warm_ns INTEGER,
    ended_id INTEGER,
    ended_version TEXT,
    ended_outcome TEXT CHECK (ended_outcome IN ('went_live', 'aborted', 'rolled_back', 'interrupted')),
    reason TEXT CHECK (reason IN ('requested', 'provision_failed', 'health_deadline', 'smoke_failed',
                                  'unhealthy', 'error_rate', 'latency')),
    reason_text TEXT,
    reason_ns INTEGER,
    reason_max_ns INTEGER,
    reason_errors INTEGER,
    reason_requests INTEGER,
    reason_max_rate REAL,
    dep_id INTEGER,
    dep_version TEXT,
    dep_colour TEXT CHECK (dep_colour IN ('blue', 'green')),
    dep_cause TEXT CHECK (dep_cause IN ('deploy', 'cold_rollback')),
    plan_health_deadline_ns INTEGER,
    plan_promote TEXT CHECK (plan_promote IN ('manual', 'auto')),
    plan_promote_delay_ns INTEGER,
    plan_watch_ns INTEGER,
    plan_min_requests INTEGER,
    plan_max_error_rate REAL,
    plan_max_p99_ns INTEGER,
    plan_keep_warm_ns INTEGER,
    rollback_colour TEXT CHECK (rollback_colour IN ('blue', 'green')),
    rollback_version TEXT,
    judged INTEGER CHECK (judged IN (0, 1)),
    CHECK ((live_colour IS NULL) = (live_version IS NULL)),
    CHECK ((phase = 'stable') = (dep_id IS NULL)),
    CHECK ((phase = 'watching') = (rollback_colour IS NOT NULL))
) STRICT;

CREATE TABLE releases (
    service TEXT NOT NULL REFERENCES services (name) DEFERRABLE INITIALLY DEFERRED,
    version TEXT NOT NULL,
    first_seen INTEGER NOT NULL,
    PRIMARY KEY (service, version)
) STRICT;

CREATE TABLE deployments (
    service TEXT NOT NULL REFERENCES services (name) DEFERRABLE INITIALLY DEFERRED,
    id INTEGER NOT NULL CHECK (id >= 0),
    version TEXT NOT NULL,
    colour TEXT NOT NULL CHECK (colour IN ('blue', 'green')),
    cause TEXT NOT NULL CHECK (cause IN ('deploy', 'cold_rollback')),
    started_at INTEGER NOT NULL,
    promoted_at INTEGER,
    ended_at INTEGER,
    outcome TEXT CHECK (outcome IN ('went_live', 'aborted', 'rolled_back', 'interrupted')),
    reason TEXT CHECK (reason IN ('requested', 'provision_failed', 'health_deadline', 'smoke_failed',
                                  'unhealthy', 'error_rate', 'latency')),
    reason_text TEXT,
    reason_ns INTEGER,
    reason_max_ns INTEGER,
    reason_errors INTEGER,
    reason_requests INTEGER,
    reason_max_rate REAL,
    CHECK ((outcome IS NULL) = (ended_at IS NULL)),
    PRIMARY KEY (service, id)
) STRICT;

CREATE TABLE transitions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    service TEXT NOT NULL REFERENCES services (name) DEFERRABLE INITIALLY DEFERRED,
    deployment INTEGER,
    kind TEXT NOT NULL CHECK (kind IN ('started', 'healthy', 'validated', 'awaiting_promotion', 'promoted',
                                       'went_live', 'aborted', 'rolled_back', 'interrupted',
                                       'watch_restarted', 'retired')),
    colour TEXT CHECK (colour IN ('blue', 'green')),
    version TEXT,
    cause TEXT CHECK (cause IN ('deploy', 'cold_rollback')),
    auto_after_ns INTEGER,
    watched TEXT CHECK (watched IN ('skipped', 'judged', 'unjudged')),
    phase TEXT,
    reason TEXT CHECK (reason IN ('requested', 'provision_failed', 'health_deadline', 'smoke_failed',
                                  'unhealthy', 'error_rate', 'latency')),
    reason_text TEXT,
    reason_ns INTEGER,
    reason_max_ns INTEGER,
    reason_errors INTEGER,
    reason_requests INTEGER,
    reason_max_rate REAL,
    FOREIGN KEY (service, deployment) REFERENCES deployments (service, id) DEFERRABLE INITIALLY DEFERRED
) STRICT;

CREATE INDEX transitions_by_deployment ON transitions (service, deployment, seq);

CREATE TABLE audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    actor TEXT NOT NULL,
    service TEXT,
    action TEXT NOT NULL,
    arguments TEXT NOT NULL,
    result TEXT NOT NULL
) STRICT;

CREATE TABLE deployment_ids (
    service TEXT PRIMARY KEY NOT NULL,
    last INTEGER NOT NULL CHECK (last > 0)
) STRICT;

CREATE TABLE instances (
    service TEXT NOT NULL,
    colour TEXT NOT NULL CHECK (colour IN ('blue', 'green')),
    idx INTEGER NOT NULL CHECK (idx >= 0),
    version TEXT NOT NULL,
    pid INTEGER NOT NULL CHECK (pid > 0),
    pgid INTEGER NOT NULL CHECK (pgid > 0),
    port INTEGER NOT NULL CHECK (port BETWEEN 1 AND 65535),
    start_ticks INTEGER CHECK (start_ticks >= 0),
    PRIMARY KEY (service, colour, idx)
) STRICT;
";

/// The `services` columns that hold the state snapshot (all but `name` and `updated_at`). Every
/// commit writes all of them, NULL where the new phase has no value, so nothing of an earlier
/// phase lingers.
const STATE_COLUMNS: [&str; 41] = [
    "live_colour",
    "live_version",
    "previous_version",
    "last_id",
    "phase",
    "warm_colour",
    "warm_version",
    "warm_promoted_by",
    "warm_keep_warm_ns",
    "ended_id",
    "ended_version",
    "ended_outcome",
    "reason",
    "reason_text",
    "reason_ns",
    "reason_max_ns",
    "reason_errors",
    "reason_requests",
    "reason_max_rate",
    "dep_id",
    "dep_version",
    "dep_colour",
    "dep_cause",
    "plan_health_deadline_ns",
    "plan_promote",
    "plan_promote_delay_ns",
    "plan_watch_ns",
    "plan_min_requests",
    "plan_max_error_rate",
    "plan_max_p99_ns",
    "plan_keep_warm_ns",
    "rollback_colour",
    "rollback_version",
    "judged",
    "migration_step",
    "migration_failure",
    "plan_migrate",
    "contract",
    "contracted_version",
    "plan_gradual",
    "watch_step",
];

const REASON_COLUMNS: [&str; 7] = [
    "reason",
    "reason_text",
    "reason_ns",
    "reason_max_ns",
    "reason_errors",
    "reason_requests",
    "reason_max_rate",
];

/// [`Phase::name`] of every phase, so that a stored [`Record::Interrupted`] gets its
/// `&'static str` back.
const PHASE_NAMES: [&str; 6] = crate::wire::phase_name::NAMES;

/// Why the store failed. Every message names the database file and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "state directory {}: cannot create it: {source}; check that its parent exists and is \
         writable, or set server.state_dir to another directory",
        path.display()
    )]
    CreateDir { path: PathBuf, source: std::io::Error },
    #[error(
        "state database {}: cannot open it: {source}; check that it is a readable and writable \
         file and that the disk is not full",
        path.display()
    )]
    Open { path: PathBuf, source: rusqlite::Error },
    #[error(
        "state database {}: not a SQLite database, or damaged beyond reading ({detail}); move it \
         aside (cutover then starts with an empty state) or restore it from a backup",
        path.display()
    )]
    NotADatabase { path: PathBuf, detail: String },
    #[error(
        "state database {}: a SQLite database of another program (application id {found:#x}), not \
         cutover's; it was left untouched: point server.state_dir at another directory, or move the \
         file aside",
        path.display()
    )]
    Foreign { path: PathBuf, found: i64 },
    #[error(
        "state database {}: schema version {found} is newer than this cutover knows (version \
         {known}); it was written by a newer cutover: run that version, or restore a backup made \
         before the upgrade",
        path.display()
    )]
    TooNew { path: PathBuf, found: i64, known: i64 },
    #[error(
        "state database {}: corrupt: {detail}; restore it from a backup, or move it aside (cutover \
         then starts with an empty state and forgets its history)",
        path.display()
    )]
    Corrupt { path: PathBuf, detail: String },
    #[error(
        "state database {}: cannot {what}; the state directory must be on a local file system \
         (WAL mode needs shared memory): set server.state_dir to a local directory",
        path.display()
    )]
    Unsupported { path: PathBuf, what: String },
    #[error(
        "state database {}: locked by another process ({source}); is a second `cutover serve` using \
         the same state directory? Stop it, then retry",
        path.display()
    )]
    Locked { path: PathBuf, source: rusqlite::Error },
    #[error(
        "state database {}: {op} failed: {source}; nothing was changed by it; check free disk space \
         and the permissions of the state directory, then retry",
        path.display()
    )]
    Sqlite {
        path: PathBuf,
        op: String,
        source: rusqlite::Error,
    },
    /// `store` names the store: `state database <path>`, or `etcd <endpoints> (prefix ...)`.
    #[error("{store}: cannot store {what} of service {service} exactly; nothing was written; use a smaller value")]
    Unrepresentable {
        store: String,
        service: String,
        what: String,
    },
    #[error(
        "{store}: refused the commit of service {service}: {detail}; nothing was written; this is \
         a bug in cutover, please report it"
    )]
    Rejected {
        store: String,
        service: String,
        detail: String,
    },
    /// A commit expected the service's state at one revision and found another: someone else
    /// committed meanwhile (another daemon on the same store). Nothing was written.
    #[error(
        "{store}: the state of service {service} changed underneath (expected revision {expected}, found {found}); nothing was written; reload it and decide again"
    )]
    Conflict {
        store: String,
        service: String,
        expected: u64,
        found: u64,
    },
    /// The call's blocking thread did not complete it (the daemon's runtime is shutting down).
    /// Whether the call took effect is unknown; the state read at the next start is what counts.
    #[error("state database: a call did not complete ({detail}); the daemon is stopping, or retry")]
    Interrupted { detail: String },
    /// etcd refused a request, or could not be reached; `store` names the endpoints.
    #[error("{store}: {op} failed: {detail}; {hint}")]
    Etcd {
        store: String,
        op: String,
        detail: String,
        /// What to do about it.
        hint: &'static str,
    },
    /// An etcd call did not complete in time: the members are unreachable, or too few of them
    /// are up to form a quorum. A write may or may not have taken effect.
    #[error(
        "{store}: {op} did not complete within {timeout:?} ({detail}); check that the etcd members \
         are running and reachable from this host and that a majority of them is up (etcd needs a \
         quorum), then retry; a write that timed out may or may not have taken effect"
    )]
    EtcdTimeout {
        store: String,
        op: String,
        timeout: Duration,
        detail: String,
    },
    /// A value under the store's prefix that cutover cannot read.
    #[error(
        "{store}: key {key}: {detail}; it was not written by this cutover: check that no other \
         program writes under the prefix, or restore the key from a backup"
    )]
    EtcdCorrupt { store: String, key: String, detail: String },
    /// The etcd store's options cannot be used as given.
    #[error("etcd store: {0}")]
    EtcdSetup(String),
}

impl StoreError {
    /// Whether the same call may succeed later as is (another process held the lock).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StoreError::Locked { .. } | StoreError::Interrupted { .. } | StoreError::EtcdTimeout { .. }
        )
    }
}

/// Who asked for what, appended to the audit log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Audit {
    /// `"cli"`, `"api:<token name>"`, `"auto"` (timers and driver reports), ...
    #[serde(rename = "actor")]
    pub actor: String,
    /// The service concerned; in [`Store::commit`], `None` means the committed service.
    #[serde(rename = "service")]
    pub service: Option<String>,
    /// `"deploy"`, `"promote"`, `"rollback"`, ...
    #[serde(rename = "action")]
    pub action: String,
    /// The request's arguments as the caller wants them shown (e.g. `--version v2`).
    #[serde(rename = "arguments")]
    pub arguments: String,
    /// What came of it: `"ok"`, the error message, ...
    #[serde(rename = "result")]
    pub result: String,
}

/// One row of the audit log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Position in the log; increases, never reused.
    #[serde(rename = "seq")]
    pub seq: u64,
    /// Unix milliseconds precision.
    #[serde(rename = "at_ms", with = "crate::wire::millis")]
    pub at: SystemTime,
    #[serde(rename = "audit")]
    pub audit: Audit,
}

/// One deployment as `cutover history` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeploymentSummary {
    #[serde(rename = "id")]
    pub id: DeploymentId,
    #[serde(rename = "release")]
    pub release: Release,
    #[serde(rename = "colour", with = "crate::wire::colour")]
    pub colour: Colour,
    #[serde(rename = "cause")]
    pub cause: Cause,
    #[serde(rename = "started_at_ms", with = "crate::wire::millis")]
    pub started_at: SystemTime,
    /// When live traffic switched to it (not for a first deployment, which goes live directly).
    #[serde(rename = "promoted_at_ms", with = "crate::wire::opt_millis")]
    pub promoted_at: Option<SystemTime>,
    /// `None` while it is in progress.
    #[serde(rename = "ended_at_ms", with = "crate::wire::opt_millis")]
    pub ended_at: Option<SystemTime>,
    #[serde(rename = "outcome")]
    pub outcome: Option<Outcome>,
}

/// One stored [`Record`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TransitionEntry {
    /// Position in the service's history; increases, never reused.
    #[serde(rename = "seq")]
    pub seq: u64,
    #[serde(rename = "at_ms", with = "crate::wire::millis")]
    pub at: SystemTime,
    /// The deployment it is filed under (for `Retired`, see the module doc).
    #[serde(rename = "deployment")]
    pub deployment: Option<DeploymentId>,
    #[serde(rename = "record")]
    pub record: Record,
}

/// An instance the process driver started, as it needs it to adopt the instance after a restart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredInstance {
    pub service: String,
    pub colour: Colour,
    /// The instance's slot on its colour, 0 .. instances.
    pub index: u32,
    pub release: Release,
    pub pid: u32,
    /// Its process group (the whole group is signalled on stop).
    pub pgid: u32,
    pub port: u16,
    /// The process's start time in clock ticks since boot (see `process::Recorded`): with the
    /// pid it tells the instance from an unrelated process that reused the pid. `None` if unknown.
    pub start_ticks: Option<u64>,
}

/// The open state database. One per daemon; share it behind an `Arc`. Every method is one short
/// transaction (the ones that write wait for the disk), so call them from blocking code
/// (`spawn_blocking`) in async contexts.
pub struct Store {
    path: PathBuf,
    /// The single connection. A mutex rather than a pool: writes are serialised by SQLite anyway,
    /// and one connection keeps "commit, then read it back" trivially consistent.
    conn: Mutex<Connection>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens `<state_dir>/cutover.db`, creating the directory and an empty database if missing,
    /// and brings its schema up to [`SCHEMA_VERSION`]. A file that is not a cutover database, is
    /// corrupt, or was written by a newer cutover is refused and left untouched.
    pub fn open(state_dir: impl AsRef<Path>) -> Result<Store, StoreError> {
        let dir = state_dir.as_ref();
        crate::private_dir::create(dir).map_err(|source| StoreError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join(DB_FILE);
        let mut conn = Connection::open(&path).map_err(|source| StoreError::Open {
            path: path.clone(),
            source,
        })?;
        let fail = |op: &str| failed(&path, op);
        conn.busy_timeout(BUSY_TIMEOUT).map_err(fail("set the busy timeout"))?;

        // Read page 1 before changing anything: a file that is not ours is refused untouched.
        let (app_id, version, objects) = conn
            .query_row(
                "SELECT (SELECT application_id FROM pragma_application_id()),
                        (SELECT user_version FROM pragma_user_version()),
                        (SELECT COUNT(*) FROM sqlite_master)",
                [],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?)),
            )
            .map_err(fail("read the schema version"))?;
        let from = match (app_id, version) {
            (0, 0) if objects == 0 => 0,
            (APPLICATION_ID, v) if v > SCHEMA_VERSION => {
                return Err(StoreError::TooNew {
                    path,
                    found: v,
                    known: SCHEMA_VERSION,
                })
            }
            (APPLICATION_ID, v) if v >= 1 => v,
            (APPLICATION_ID, v) => {
                return Err(StoreError::Corrupt {
                    path,
                    detail: format!("cutover's application id with schema version {v}"),
                })
            }
            (found, _) => return Err(StoreError::Foreign { path, found }),
        };

        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .map_err(fail("switch to WAL mode"))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Unsupported {
                path,
                what: format!("switch to WAL mode (journal mode stays {mode:?})"),
            });
        }
        // FULL: a commit syncs the WAL before it returns, so it survives power loss, not only
        // the death of the process.
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(fail("set synchronous=FULL"))?;
        if from < SCHEMA_VERSION {
            // Foreign keys are enforced only after the migration (checked at its end instead): a
            // table rebuilt in it is dropped and renamed while others refer to it. The pragma
            // cannot change inside a transaction.
            conn.pragma_update(None, "foreign_keys", false)
                .map_err(fail("suspend foreign keys for the migration"))?;
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(fail("begin the schema migration"))?;
            for (n, migration) in MIGRATIONS.iter().enumerate().skip(from as usize) {
                match migration {
                    Migration::Sql(sql) => tx.execute_batch(sql),
                    Migration::Reasons(codes) => widen_reasons(&tx, codes),
                    Migration::Code(f) => f(&tx),
                }
                .map_err(fail(&format!("migrate the schema to version {}", n + 1)))?;
            }
            let broken: i64 = tx
                .query_row("SELECT COUNT(*) FROM pragma_foreign_key_check", [], |r| r.get(0))
                .map_err(fail("check foreign keys after the migration"))?;
            if broken > 0 {
                return Err(StoreError::Corrupt {
                    path,
                    detail: format!("{broken} rows refer to rows that do not exist (PRAGMA foreign_key_check)"),
                });
            }
            // Both pragmas are transactional: a crash here leaves the empty file of before.
            tx.pragma_update(None, "application_id", APPLICATION_ID)
                .map_err(fail("set the application id"))?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)
                .map_err(fail("set the schema version"))?;
            tx.commit().map_err(fail("commit the schema migration"))?;
            tracing::info!(path = %path.display(), from, to = SCHEMA_VERSION, "state database schema created or migrated");
        }
        conn.pragma_update(None, "foreign_keys", true)
            .map_err(fail("enable foreign keys"))?;

        let problems = {
            let mut stmt = conn.prepare("PRAGMA quick_check(5)").map_err(fail("check integrity"))?;
            let rows = stmt
                .query_map([], |r| r.get::<_, String>(0))
                .map_err(fail("check integrity"))?;
            rows.collect::<Result<Vec<_>, _>>().map_err(fail("check integrity"))?
        };
        if problems != ["ok"] {
            return Err(StoreError::Corrupt {
                path,
                detail: problems.join("; "),
            });
        }
        Ok(Store {
            path,
            conn: Mutex::new(conn),
        })
    }

    /// Opens `<state_dir>/cutover.db` for reading only, as the CLI does when no daemon runs: it
    /// creates, migrates and changes nothing (a daemon that starts meanwhile is not disturbed),
    /// and refuses a file that is not a cutover database of a schema version this code reads.
    pub fn open_read_only(state_dir: impl AsRef<Path>) -> Result<Store, StoreError> {
        let path = state_dir.as_ref().join(DB_FILE);
        let conn = Connection::open_with_flags(
            &path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| StoreError::Open {
            path: path.clone(),
            source,
        })?;
        let fail = |op: &str| failed(&path, op);
        conn.busy_timeout(BUSY_TIMEOUT).map_err(fail("set the busy timeout"))?;
        let (app_id, version) = conn
            .query_row(
                "SELECT (SELECT application_id FROM pragma_application_id()),
                        (SELECT user_version FROM pragma_user_version())",
                [],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
            )
            .map_err(fail("read the schema version"))?;
        match (app_id, version) {
            (APPLICATION_ID, v) if v > SCHEMA_VERSION => {
                return Err(StoreError::TooNew {
                    path,
                    found: v,
                    known: SCHEMA_VERSION,
                })
            }
            (APPLICATION_ID, v) if v == SCHEMA_VERSION => {}
            (APPLICATION_ID, v) => {
                return Err(StoreError::Corrupt {
                    path,
                    detail: format!("cutover's application id with schema version {v}"),
                })
            }
            (found, _) => return Err(StoreError::Foreign { path, found }),
        }
        Ok(Store {
            path,
            conn: Mutex::new(conn),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Hands out a deployment id for `service`, higher than any it handed out or stored before,
    /// durably (a restart never hands out the same id twice). Ids start at 1.
    pub fn next_deployment_id(&self, service: &str) -> Result<DeploymentId, StoreError> {
        let fail = self.fail(format!("allocate a deployment id for service {service}"));
        let mut conn = self.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&fail)?;
        // The counter alone would do for ids it handed out; the other two cover states and
        // deployments committed with ids from elsewhere.
        let highest: Option<i64> = tx
            .query_row(
                "SELECT MAX(v) FROM (
                    SELECT last AS v FROM deployment_ids WHERE service = ?1
                    UNION ALL SELECT last_id FROM services WHERE name = ?1
                    UNION ALL SELECT MAX(id) FROM deployments WHERE service = ?1)",
                [service],
                |r| r.get(0),
            )
            .map_err(&fail)?;
        let Some(next) = highest.unwrap_or(0).checked_add(1) else {
            return Err(StoreError::Unrepresentable {
                store: self.name(),
                service: service.to_string(),
                what: "a deployment id above the largest integer SQLite holds".to_string(),
            });
        };
        tx.execute(
            "INSERT INTO deployment_ids (service, last) VALUES (?1, ?2)
             ON CONFLICT (service) DO UPDATE SET last = excluded.last",
            params![service, next],
        )
        .map_err(&fail)?;
        tx.commit().map_err(&fail)?;
        // `next` >= 1 (highest is a checked non-negative max + 1, or 1).
        Ok(DeploymentId(next.unsigned_abs()))
    }

    /// Commits `state` as the service's current state together with `records` (appended to its
    /// history, in order) and `audit`, in one transaction: after a crash at any instant either
    /// all of it is stored or none of it. On `Err` nothing was written.
    ///
    /// `records` is usually `transition.records()`.
    pub fn commit<'r>(
        &self,
        service: &str,
        state: &State,
        records: impl IntoIterator<Item = &'r Record>,
        audit: Option<Audit>,
    ) -> Result<(), StoreError> {
        self.commit_at(service, None, state, records, audit).map(|_| ())
    }

    /// [`Store::commit`], only if the service's committed state is at revision `expected` (when
    /// given; [`Revision::NONE`] for a service never committed): the compare and swap that
    /// keeps two writers from overwriting each other. Returns the new revision.
    pub fn commit_at<'r>(
        &self,
        service: &str,
        expected: Option<Revision>,
        state: &State,
        records: impl IntoIterator<Item = &'r Record>,
        audit: Option<Audit>,
    ) -> Result<Revision, StoreError> {
        let records: Vec<&Record> = records.into_iter().collect();
        self.commit_all(&[(service, expected, state, records)], audit)
            .map(|revisions| revisions[0])
    }

    /// Commits several services' states (each with its records, only if at its expected
    /// revision) in one transaction: all of them, or, on any error, none. `audit` is filed
    /// under the first. Returns each one's new revision, in order.
    pub fn commit_all(
        &self,
        commits: &[(&str, Option<Revision>, &State, Vec<&Record>)],
        audit: Option<Audit>,
    ) -> Result<Vec<Revision>, StoreError> {
        let now = now_ms();
        let Some(first) = commits.first().map(|c| c.0) else {
            return Ok(Vec::new());
        };
        let mut encoded = Vec::with_capacity(commits.len());
        for (service, _, state, _) in commits {
            if state.service != *service {
                return Err(self.rejected(
                    service,
                    format!("the state to commit belongs to service {:?}", state.service),
                ));
            }
            if commits.iter().filter(|c| c.0 == *service).count() > 1 {
                return Err(self.rejected(service, "the service is twice in one commit".to_string()));
            }
            let mut cols = encode_state(state).map_err(|what| StoreError::Unrepresentable {
                store: self.name(),
                service: service.to_string(),
                what: what.0,
            })?;
            cols.text("name", service);
            cols.int("updated_at", now);
            encoded.push(cols);
        }
        let services: Vec<&str> = commits.iter().map(|c| c.0).collect();
        let fail = self.fail(format!("commit of service {}", services.join(", ")));
        let mut conn = self.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&fail)?;
        let mut revisions = Vec::with_capacity(commits.len());
        for ((service, expected, state, records), mut cols) in commits.iter().zip(encoded) {
            let unfit = |what: Unfit| StoreError::Unrepresentable {
                store: self.name(),
                service: service.to_string(),
                what: what.0,
            };
            let found: i64 = tx
                .query_row(
                    "SELECT COALESCE((SELECT revision FROM services WHERE name = ?1), 0)",
                    [service],
                    |r| r.get(0),
                )
                .map_err(&fail)?;
            let found = Revision(found.unsigned_abs());
            if let Some(expected) = expected.filter(|e| *e != found) {
                return Err(StoreError::Conflict {
                    store: self.name(),
                    service: service.to_string(),
                    expected: expected.0,
                    found: found.0,
                });
            }
            let next = Revision(found.0 + 1);
            cols.int("revision", next.0.min(i64::MAX as u64) as i64);
            insert(&tx, "services", &cols, Some("name")).map_err(&fail)?;
            for record in records {
                store_record(&tx, service, state.last_id, record, now).map_err(|e| match e {
                    Failure::Sql(e) => self.commit_error(service, e),
                    Failure::Unfit(what) => unfit(what),
                    Failure::Rejected(detail) => self.rejected(service, detail),
                })?;
            }
            revisions.push(next);
        }
        if let Some(audit) = audit {
            insert_audit(&tx, &audit, Some(first), now).map_err(&fail)?;
        }
        // Deferred foreign keys are checked here; on failure `tx` rolls back when dropped.
        tx.commit().map_err(|e| self.commit_error(first, e))?;
        Ok(revisions)
    }

    /// Appends to the audit log on its own, for requests that changed no state (refused ones).
    pub fn append_audit(&self, audit: &Audit) -> Result<(), StoreError> {
        let conn = self.lock();
        insert_audit(&conn, audit, None, now_ms()).map_err(self.fail("append to the audit log"))?;
        Ok(())
    }

    /// The last committed state of `service`, `None` if it was never committed.
    pub fn load(&self, service: &str) -> Result<Option<State>, StoreError> {
        let conn = self.lock();
        let op = format!("load the state of service {service}");
        let mut stmt = conn
            .prepare_cached("SELECT * FROM services WHERE name = ?1")
            .map_err(self.fail(op.clone()))?;
        let mut rows = stmt.query([service]).map_err(self.fail(op.clone()))?;
        match rows.next().map_err(self.fail(op))? {
            Some(row) => Ok(Some(self.decode("services", service, decode_state(row))?)),
            None => Ok(None),
        }
    }

    /// The last committed state of `service` and its revision, `None` if it was never committed.
    pub fn load_at(&self, service: &str) -> Result<Option<(State, Revision)>, StoreError> {
        let conn = self.lock();
        let op = format!("load the state of service {service}");
        let mut stmt = conn
            .prepare_cached("SELECT * FROM services WHERE name = ?1")
            .map_err(self.fail(op.clone()))?;
        let mut rows = stmt.query([service]).map_err(self.fail(op.clone()))?;
        match rows.next().map_err(self.fail(op.clone()))? {
            Some(row) => {
                let revision: i64 = row.get("revision").map_err(self.fail(op))?;
                let state = self.decode("services", service, decode_state(row))?;
                Ok(Some((state, Revision(revision.unsigned_abs()))))
            }
            None => Ok(None),
        }
    }

    /// A small cluster-wide value (`None` if never set).
    pub fn get_value(&self, key: &str) -> Result<Option<String>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached("SELECT value FROM kv WHERE key = ?1")
            .map_err(self.fail(format!("read {key}")))?;
        let mut rows = stmt.query([key]).map_err(self.fail(format!("read {key}")))?;
        match rows.next().map_err(self.fail(format!("read {key}")))? {
            Some(row) => Ok(Some(row.get(0).map_err(self.fail(format!("read {key}")))?)),
            None => Ok(None),
        }
    }

    /// Sets (`Some`) or removes (`None`) a small cluster-wide value, durably.
    pub fn set_value(&self, key: &str, value: Option<&str>) -> Result<(), StoreError> {
        let conn = self.lock();
        let fail = self.fail(format!("write {key}"));
        match value {
            Some(v) => conn
                .execute(
                    "INSERT INTO kv (key, value, updated_at) VALUES (?1, ?2, ?3)
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                    params![key, v, now_ms()],
                )
                .map_err(fail)?,
            None => conn.execute("DELETE FROM kv WHERE key = ?1", [key]).map_err(fail)?,
        };
        Ok(())
    }

    /// Every service's last committed state, by name: what the daemon recovers at startup.
    pub fn load_all(&self) -> Result<Vec<(String, State)>, StoreError> {
        let conn = self.lock();
        let fail = self.fail("load the state of all services");
        let mut stmt = conn
            .prepare_cached("SELECT * FROM services ORDER BY name")
            .map_err(&fail)?;
        let mut rows = stmt.query([]).map_err(&fail)?;
        let mut all = Vec::new();
        while let Some(row) = rows.next().map_err(&fail)? {
            let name: String = row.get("name").map_err(&fail)?;
            let state = self.decode("services", &name, decode_state(row))?;
            all.push((name, state));
        }
        Ok(all)
    }

    /// The service's most recent `limit` deployments, newest first.
    pub fn history(&self, service: &str, limit: usize) -> Result<Vec<DeploymentSummary>, StoreError> {
        let conn = self.lock();
        let fail = self.fail(format!("read the history of service {service}"));
        let mut stmt = conn
            .prepare_cached("SELECT * FROM deployments WHERE service = ?1 ORDER BY id DESC LIMIT ?2")
            .map_err(&fail)?;
        let mut rows = stmt.query(params![service, clamp(limit)]).map_err(&fail)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(&fail)? {
            out.push(self.decode("deployments", service, decode_deployment(row))?);
        }
        Ok(out)
    }

    /// Every record of one deployment, in the order they were committed.
    pub fn transitions(&self, service: &str, deployment: DeploymentId) -> Result<Vec<TransitionEntry>, StoreError> {
        let conn = self.lock();
        let fail = self.fail(format!(
            "read the transitions of deployment {deployment} of service {service}"
        ));
        let Ok(id) = i64::try_from(deployment.0) else {
            return Ok(Vec::new()); // Never stored: commit refuses such ids.
        };
        let mut stmt = conn
            .prepare_cached("SELECT * FROM transitions WHERE service = ?1 AND deployment = ?2 ORDER BY seq")
            .map_err(&fail)?;
        let mut rows = stmt.query(params![service, id]).map_err(&fail)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(&fail)? {
            out.push(self.decode("transitions", service, decode_transition(row))?);
        }
        Ok(out)
    }

    /// The service's releases with the time each was first deployed, oldest first.
    pub fn releases(&self, service: &str) -> Result<Vec<(Release, SystemTime)>, StoreError> {
        let conn = self.lock();
        let fail = self.fail(format!("read the releases of service {service}"));
        let mut stmt = conn
            .prepare_cached("SELECT version, first_seen FROM releases WHERE service = ?1 ORDER BY first_seen, version")
            .map_err(&fail)?;
        let rows = stmt
            .query_map([service], |r| {
                Ok((Release::new(r.get::<_, String>(0)?), from_ms(r.get(1)?)))
            })
            .map_err(&fail)?;
        rows.collect::<Result<_, _>>().map_err(&fail)
    }

    /// The most recent `limit` audit entries, newest first.
    pub fn audit_log(&self, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let conn = self.lock();
        let fail = self.fail("read the audit log");
        let mut stmt = conn
            .prepare_cached("SELECT * FROM audit ORDER BY seq DESC LIMIT ?1")
            .map_err(&fail)?;
        let mut rows = stmt.query([clamp(limit)]).map_err(&fail)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(&fail)? {
            out.push(self.decode("audit", "", decode_audit(row))?);
        }
        Ok(out)
    }

    /// Records a started instance, replacing whatever was recorded in its slot
    /// (service, colour, index) before.
    pub fn record_instance(&self, instance: &StoredInstance) -> Result<(), StoreError> {
        let conn = self.lock();
        let i = instance;
        conn.prepare_cached(
            "INSERT OR REPLACE INTO instances (service, colour, idx, version, pid, pgid, port, start_ticks)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )
        .and_then(|mut stmt| {
            stmt.execute(params![
                i.service,
                i.colour.as_str(),
                i.index,
                i.release.version,
                i.pid,
                i.pgid,
                i.port,
                i.start_ticks.map(|t| t.min(i64::MAX as u64) as i64)
            ])
        })
        .map_err(self.fail(format!("record instance {} of {} on {}", i.index, i.service, i.colour)))?;
        Ok(())
    }

    /// Forgets one instance; `false` if none was recorded in that slot.
    pub fn remove_instance(&self, service: &str, colour: Colour, index: u32) -> Result<bool, StoreError> {
        let conn = self.lock();
        let n = conn
            .execute(
                "DELETE FROM instances WHERE service = ?1 AND colour = ?2 AND idx = ?3",
                params![service, colour.as_str(), index],
            )
            .map_err(self.fail(format!("remove instance {index} of {service} on {colour}")))?;
        Ok(n > 0)
    }

    /// Forgets every instance of `service` on `colour`; returns how many there were.
    pub fn remove_instances(&self, service: &str, colour: Colour) -> Result<usize, StoreError> {
        let conn = self.lock();
        conn.execute(
            "DELETE FROM instances WHERE service = ?1 AND colour = ?2",
            params![service, colour.as_str()],
        )
        .map_err(self.fail(format!("remove the instances of {service} on {colour}")))
    }

    /// The recorded instances of `service`, blue first, by index.
    pub fn instances(&self, service: &str) -> Result<Vec<StoredInstance>, StoreError> {
        let conn = self.lock();
        let fail = self.fail(format!("read the instances of service {service}"));
        let mut stmt = conn
            .prepare_cached("SELECT * FROM instances WHERE service = ?1 ORDER BY colour, idx")
            .map_err(&fail)?;
        let mut rows = stmt.query([service]).map_err(&fail)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(&fail)? {
            out.push(self.decode("instances", service, decode_instance(row))?);
        }
        Ok(out)
    }

    /// How errors name this store: `state database <path>`.
    fn name(&self) -> String {
        format!("state database {}", self.path.display())
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while the lock was held cannot leave a half-written transaction: a dropped
        // `Transaction` rolls back. The connection is fine to use.
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn fail(&self, op: impl Into<String>) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        let op = op.into();
        move |e| classify(&self.path, op.clone(), e)
    }

    fn rejected(&self, service: &str, detail: String) -> StoreError {
        StoreError::Rejected {
            store: self.name(),
            service: service.to_string(),
            detail,
        }
    }

    /// A constraint violation in a commit is a bug of the caller (e.g. a reused deployment id),
    /// not a problem of the disk.
    fn commit_error(&self, service: &str, e: rusqlite::Error) -> StoreError {
        if e.sqlite_error_code() == Some(ErrorCode::ConstraintViolation) {
            self.rejected(service, e.to_string())
        } else {
            classify(&self.path, format!("commit of service {service}"), e)
        }
    }

    fn decode<T>(&self, table: &str, key: &str, result: Result<T, Bad>) -> Result<T, StoreError> {
        result.map_err(|bad| match bad {
            Bad::Sql(e) => classify(&self.path, format!("read table {table}"), e),
            Bad::Invalid(what) => StoreError::Corrupt {
                path: self.path.clone(),
                detail: format!("table {table}, row of {key:?}: {what}"),
            },
        })
    }
}

/// What `op` on the database at `path` failing becomes, for `map_err`.
fn failed(path: &Path, op: &str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    let (path, op) = (path.to_path_buf(), op.to_string());
    move |e| classify(&path, op, e)
}

fn classify(path: &Path, op: String, e: rusqlite::Error) -> StoreError {
    let path = path.to_path_buf();
    match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase) => StoreError::NotADatabase {
            path,
            detail: e.to_string(),
        },
        Some(ErrorCode::DatabaseCorrupt) => StoreError::Corrupt {
            path,
            detail: e.to_string(),
        },
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => StoreError::Locked { path, source: e },
        _ => StoreError::Sqlite { path, op, source: e },
    }
}

fn clamp(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

// ---------------------------------------------------------------------------------------------
// Time

fn now_ms() -> i64 {
    to_ms(SystemTime::now())
}

fn to_ms(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_millis()).map_or(i64::MIN, |ms| -ms),
    }
}

fn from_ms(ms: i64) -> SystemTime {
    let d = Duration::from_millis(ms.unsigned_abs());
    if ms >= 0 {
        UNIX_EPOCH + d
    } else {
        UNIX_EPOCH - d
    }
}

// ---------------------------------------------------------------------------------------------
// Writing: a row is a list of (column, value); the SQL is built from the column names, which
// are all constants of this file.

/// A value that SQLite cannot hold exactly; the message names it.
#[derive(Debug)]
struct Unfit(String);

/// Why storing a record failed.
enum Failure {
    Sql(rusqlite::Error),
    Unfit(Unfit),
    Rejected(String),
}

impl From<rusqlite::Error> for Failure {
    fn from(e: rusqlite::Error) -> Failure {
        Failure::Sql(e)
    }
}

impl From<Unfit> for Failure {
    fn from(u: Unfit) -> Failure {
        Failure::Unfit(u)
    }
}

#[derive(Default)]
struct Cols(Vec<(&'static str, Value)>);

impl Cols {
    fn nulls(names: &[&'static str]) -> Cols {
        Cols(names.iter().map(|n| (*n, Value::Null)).collect())
    }

    fn put(&mut self, name: &'static str, value: Value) {
        match self.0.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = value,
            None => self.0.push((name, value)),
        }
    }

    fn text(&mut self, name: &'static str, s: &str) {
        self.put(name, Value::Text(s.to_owned()));
    }

    fn int(&mut self, name: &'static str, n: i64) {
        self.put(name, Value::Integer(n));
    }

    fn uint(&mut self, name: &'static str, n: u64) -> Result<(), Unfit> {
        let n = i64::try_from(n).map_err(|_| {
            Unfit(format!(
                "{name} = {n} (above the largest storable integer, {})",
                i64::MAX
            ))
        })?;
        self.int(name, n);
        Ok(())
    }

    fn id(&mut self, name: &'static str, id: DeploymentId) -> Result<(), Unfit> {
        self.uint(name, id.0)
    }

    fn dur(&mut self, name: &'static str, d: Duration) -> Result<(), Unfit> {
        let ns = i64::try_from(d.as_nanos())
            .ok()
            .filter(|_| d <= LONGEST_DURATION)
            .ok_or_else(|| {
                Unfit(format!(
                    "{name} = {d:?} (longer than the longest storable duration, about 292 years)"
                ))
            })?;
        self.int(name, ns);
        Ok(())
    }

    fn real(&mut self, name: &'static str, x: f64) -> Result<(), Unfit> {
        if x.is_nan() {
            return Err(Unfit(format!("{name} = NaN (not a number)")));
        }
        self.put(name, Value::Real(x));
        Ok(())
    }

    fn colour(&mut self, name: &'static str, c: Colour) {
        self.text(name, c.as_str());
    }

    fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.0.iter().map(|(n, _)| *n)
    }
}

/// `INSERT INTO table (cols) VALUES (...)`, an upsert on `key` when given.
fn insert(conn: &Connection, table: &str, cols: &Cols, key: Option<&str>) -> rusqlite::Result<usize> {
    let names: Vec<_> = cols.names().collect();
    let marks: Vec<_> = (1..=names.len()).map(|i| format!("?{i}")).collect();
    let mut sql = format!(
        "INSERT INTO {table} ({}) VALUES ({})",
        names.join(", "),
        marks.join(", ")
    );
    if let Some(key) = key {
        let set: Vec<_> = names
            .iter()
            .filter(|n| **n != key)
            .map(|n| format!("{n} = excluded.{n}"))
            .collect();
        sql.push_str(&format!(" ON CONFLICT ({key}) DO UPDATE SET {}", set.join(", ")));
    }
    conn.prepare_cached(&sql)?
        .execute(params_from_iter(cols.0.iter().map(|(_, v)| v)))
}

fn cause_code(c: Cause) -> &'static str {
    match c {
        Cause::Deploy => "deploy",
        Cause::ColdRollback => "cold_rollback",
    }
}

fn watched_code(w: Watched) -> &'static str {
    match w {
        Watched::Skipped => "skipped",
        Watched::Judged => "judged",
        Watched::Unjudged => "unjudged",
    }
}

fn outcome_code(o: &Outcome) -> &'static str {
    match o {
        Outcome::WentLive => "went_live",
        Outcome::Aborted(_) => "aborted",
        Outcome::RolledBack(_) => "rolled_back",
        Outcome::Interrupted => "interrupted",
    }
}

/// The reason columns: all of them, NULL but for the ones `reason` uses.
fn reason_cols(cols: &mut Cols, reason: Option<&Reason>) -> Result<(), Unfit> {
    for name in REASON_COLUMNS {
        cols.put(name, Value::Null);
    }
    let Some(reason) = reason else { return Ok(()) };
    let code = match reason {
        Reason::Requested => "requested",
        Reason::ProvisionFailed(why) => {
            cols.text("reason_text", why);
            "provision_failed"
        }
        Reason::HealthDeadline(d) => {
            cols.dur("reason_ns", *d)?;
            "health_deadline"
        }
        Reason::SmokeFailed(why) => {
            cols.text("reason_text", why);
            "smoke_failed"
        }
        Reason::Unhealthy(why) => {
            cols.text("reason_text", why);
            "unhealthy"
        }
        Reason::ErrorRate { errors, requests, max } => {
            cols.uint("reason_errors", *errors)?;
            cols.uint("reason_requests", *requests)?;
            cols.real("reason_max_rate", *max)?;
            "error_rate"
        }
        Reason::Latency { p99, max } => {
            cols.dur("reason_ns", *p99)?;
            cols.dur("reason_max_ns", *max)?;
            "latency"
        }
        Reason::NotAcknowledged(why) => {
            cols.text("reason_text", why);
            "not_acknowledged"
        }
        Reason::MigrationFailed(why) => {
            cols.text("reason_text", why);
            "migration_failed"
        }
        Reason::LiveCheckFailed(why) => {
            cols.text("reason_text", why);
            "live_check_failed"
        }
    };
    cols.text("reason", code);
    Ok(())
}

fn outcome_reason(o: &Outcome) -> Option<&Reason> {
    match o {
        Outcome::Aborted(r) | Outcome::RolledBack(r) => Some(r),
        Outcome::WentLive | Outcome::Interrupted => None,
    }
}

/// The `services` columns of a state (without `name` and `updated_at`).
fn encode_state(state: &State) -> Result<Cols, Unfit> {
    let mut c = Cols::nulls(&STATE_COLUMNS);
    if let Some(live) = &state.live {
        c.colour("live_colour", live.colour);
        c.text("live_version", &live.release.version);
    }
    if let Some(previous) = &state.previous {
        c.text("previous_version", &previous.version);
    }
    if let Some(id) = state.last_id {
        c.id("last_id", id)?;
    }
    let deployment = match &state.phase {
        Phase::Stable { warm, last } => {
            c.text("phase", "stable");
            if let Some(w) = warm {
                c.colour("warm_colour", w.colour);
                c.text("warm_version", &w.release.version);
                c.id("warm_promoted_by", w.promoted_by)?;
                c.dur("warm_keep_warm_ns", w.keep_warm)?;
            }
            if let Some(e) = last {
                c.id("ended_id", e.id)?;
                c.text("ended_version", &e.release.version);
                c.text("ended_outcome", outcome_code(&e.outcome));
                reason_cols(&mut c, outcome_reason(&e.outcome))?;
            }
            None
        }
        Phase::Provisioning(d) => {
            c.text("phase", "provisioning");
            Some(d)
        }
        Phase::Validating(d) => {
            c.text("phase", "validating");
            Some(d)
        }
        Phase::ReadyToPromote(d) => {
            c.text("phase", "ready_to_promote");
            Some(d)
        }
        Phase::Migrating {
            deployment,
            step,
            failure,
        } => {
            c.text("phase", "migrating");
            c.text("migration_step", step.as_str());
            if let Some(f) = failure {
                c.text("migration_failure", &to_json(f)?);
            }
            Some(deployment)
        }
        Phase::Watching {
            deployment,
            rollback_to,
            judged,
            step,
        } => {
            c.text("phase", "watching");
            c.colour("rollback_colour", rollback_to.colour);
            c.text("rollback_version", &rollback_to.release.version);
            c.int("judged", i64::from(*judged));
            if let Some(step) = step {
                c.uint("watch_step", *step as u64)?;
            }
            Some(deployment)
        }
    };
    if let Some(d) = deployment {
        c.id("dep_id", d.id)?;
        c.text("dep_version", &d.release.version);
        c.colour("dep_colour", d.colour);
        c.text("dep_cause", cause_code(d.cause));
        let p = &d.plan;
        c.dur("plan_health_deadline_ns", p.health_deadline)?;
        match p.promote {
            Promotion::Manual => c.text("plan_promote", "manual"),
            Promotion::Auto { delay } => {
                c.text("plan_promote", "auto");
                c.dur("plan_promote_delay_ns", delay)?;
            }
        }
        c.dur("plan_watch_ns", p.watch.duration)?;
        c.uint("plan_min_requests", p.watch.min_requests)?;
        c.real("plan_max_error_rate", p.watch.max_error_rate)?;
        if let Some(max) = p.watch.max_p99 {
            c.dur("plan_max_p99_ns", max)?;
        }
        c.dur("plan_keep_warm_ns", p.keep_warm)?;
        if p.migrate != MigratePlan::default() {
            c.text("plan_migrate", &to_json(&p.migrate)?);
        }
        if let Some(g) = &p.gradual {
            c.text("plan_gradual", &to_json(g)?);
        }
    }
    if let Some(contract) = &state.contract {
        c.text("contract", &to_json(contract)?);
    }
    if let Some(r) = &state.contracted {
        c.text("contracted_version", &r.version);
    }
    Ok(c)
}

/// `value` as JSON, for the columns that keep a small nested value whole.
fn to_json<T: serde::Serialize>(value: &T) -> Result<String, Unfit> {
    serde_json::to_string(value).map_err(|e| Unfit(format!("cannot encode as JSON: {e}")))
}

/// The JSON value of column `col`, if it is not NULL.
fn opt_json<T: serde::de::DeserializeOwned>(row: &Row<'_>, col: &str) -> Result<Option<T>, Bad> {
    match opt::<String>(row, col)? {
        None => Ok(None),
        Some(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Bad::Invalid(format!("{col}: {e}"))),
    }
}

/// Appends one record to `transitions` and keeps `deployments` and `releases` up to date.
/// `last_id` is the committed state's, under which `Retired` is filed.
fn store_record(
    tx: &Transaction<'_>,
    service: &str,
    last_id: Option<DeploymentId>,
    record: &Record,
    now: i64,
) -> Result<(), Failure> {
    let mut t = Cols::default();
    t.int("at", now);
    t.text("service", service);
    // What the record does to its deployment's row: nothing, set `promoted_at`, or end it.
    let mut ends: Option<(&'static str, Option<&Reason>)> = None;
    let mut promotes = false;
    let (kind, id) = match record {
        Record::Started {
            id,
            release,
            colour,
            cause,
        } => {
            let mut d = Cols::default();
            d.text("service", service);
            d.id("id", *id)?;
            d.text("version", &release.version);
            d.colour("colour", *colour);
            d.text("cause", cause_code(*cause));
            d.int("started_at", now);
            insert(tx, "deployments", &d, None)?;
            tx.prepare_cached(
                "INSERT INTO releases (service, version, first_seen) VALUES (?1, ?2, ?3)
                 ON CONFLICT DO NOTHING",
            )?
            .execute(params![service, release.version, now])?;
            t.text("version", &release.version);
            t.colour("colour", *colour);
            t.text("cause", cause_code(*cause));
            ("started", Some(*id))
        }
        Record::Healthy { id } => ("healthy", Some(*id)),
        Record::Validated { id, detail } => {
            if let Some(detail) = detail {
                t.text("detail", &to_json(detail)?);
            }
            ("validated", Some(*id))
        }
        Record::AwaitingPromotion { id, auto_after } => {
            if let Some(after) = auto_after {
                t.dur("auto_after_ns", *after)?;
            }
            ("awaiting_promotion", Some(*id))
        }
        Record::Promoted { id, colour } => {
            t.colour("colour", *colour);
            promotes = true;
            ("promoted", Some(*id))
        }
        Record::WentLive { id, live, watch } => {
            t.colour("colour", live.colour);
            t.text("version", &live.release.version);
            t.text("watched", watched_code(*watch));
            ends = Some(("went_live", None));
            ("went_live", Some(*id))
        }
        Record::Aborted { id, reason } => {
            reason_cols(&mut t, Some(reason))?;
            ends = Some(("aborted", Some(reason)));
            ("aborted", Some(*id))
        }
        Record::RolledBack { id, to, reason } => {
            t.colour("colour", to.colour);
            t.text("version", &to.release.version);
            reason_cols(&mut t, Some(reason))?;
            ends = Some(("rolled_back", Some(reason)));
            ("rolled_back", Some(*id))
        }
        Record::Interrupted { id, phase } => {
            t.text("phase", phase);
            ends = Some(("interrupted", None));
            ("interrupted", Some(*id))
        }
        Record::WatchRestarted { id } => ("watch_restarted", Some(*id)),
        Record::Retired { live } => {
            t.colour("colour", live.colour);
            t.text("version", &live.release.version);
            // Possibly a deployment started later in this same commit: left to the deferred
            // foreign key, not checked here.
            ("retired", last_id)
        }
        Record::Migration { id, step, ok, detail } => {
            #[derive(serde::Serialize)]
            struct Detail<'a> {
                step: MigrationStep,
                ok: bool,
                detail: &'a str,
            }
            t.text(
                "detail",
                &to_json(&Detail {
                    step: *step,
                    ok: *ok,
                    detail,
                })?,
            );
            ("migration", Some(*id))
        }
    };
    t.text("kind", kind);
    if let Some(id) = id {
        t.id("deployment", id)?;
    }
    if let (Some(id), false) = (id, matches!(record, Record::Started { .. } | Record::Retired { .. })) {
        let sql_id = i64::try_from(id.0).map_err(|_| Unfit(format!("deployment id {id}")))?;
        // Every statement below matches exactly one row of a started deployment.
        let changed = if let Some((outcome, reason)) = ends {
            let mut d = Cols::default();
            d.text("outcome", outcome);
            d.int("ended_at", now);
            reason_cols(&mut d, reason)?;
            let set: Vec<_> = d
                .names()
                .enumerate()
                .map(|(i, n)| format!("{n} = ?{}", i + 1))
                .collect();
            let n = d.0.len();
            let sql = format!(
                "UPDATE deployments SET {} WHERE service = ?{} AND id = ?{}",
                set.join(", "),
                n + 1,
                n + 2
            );
            let mut values: Vec<Value> = d.0.into_iter().map(|(_, v)| v).collect();
            values.push(Value::Text(service.to_string()));
            values.push(Value::Integer(sql_id));
            tx.prepare_cached(&sql)?.execute(params_from_iter(values))?
        } else if promotes {
            tx.prepare_cached("UPDATE deployments SET promoted_at = ?1 WHERE service = ?2 AND id = ?3")?
                .execute(params![now, service, sql_id])?
        } else {
            tx.prepare_cached("SELECT COUNT(*) FROM deployments WHERE service = ?1 AND id = ?2")?
                .query_row(params![service, sql_id], |r| r.get::<_, i64>(0))?
                .unsigned_abs() as usize
        };
        if changed != 1 {
            return Err(Failure::Rejected(format!(
                "record {kind} of deployment {id}, which was never started"
            )));
        }
    }
    insert(tx, "transitions", &t, None)?;
    Ok(())
}

fn insert_audit(conn: &Connection, audit: &Audit, service: Option<&str>, now: i64) -> rusqlite::Result<usize> {
    conn.prepare_cached(
        "INSERT INTO audit (at, actor, service, action, arguments, result) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        now,
        audit.actor,
        audit.service.as_deref().or(service),
        audit.action,
        audit.arguments,
        audit.result
    ])
}

// ---------------------------------------------------------------------------------------------
// Reading. Columns are read by name; a value the schema allows but this code does not know is
// reported as corruption, never guessed.

enum Bad {
    Sql(rusqlite::Error),
    Invalid(String),
}

impl From<rusqlite::Error> for Bad {
    fn from(e: rusqlite::Error) -> Bad {
        Bad::Sql(e)
    }
}

fn opt<T: FromSql>(row: &Row<'_>, col: &str) -> Result<Option<T>, Bad> {
    Ok(row.get::<_, Option<T>>(col)?)
}

fn req<T: FromSql>(row: &Row<'_>, col: &str) -> Result<T, Bad> {
    opt(row, col)?.ok_or_else(|| Bad::Invalid(format!("{col} is NULL")))
}

fn opt_uint(row: &Row<'_>, col: &str) -> Result<Option<u64>, Bad> {
    match opt::<i64>(row, col)? {
        None => Ok(None),
        Some(n) => u64::try_from(n)
            .map(Some)
            .map_err(|_| Bad::Invalid(format!("{col} = {n} is negative"))),
    }
}

fn req_uint(row: &Row<'_>, col: &str) -> Result<u64, Bad> {
    opt_uint(row, col)?.ok_or_else(|| Bad::Invalid(format!("{col} is NULL")))
}

fn req_id(row: &Row<'_>, col: &str) -> Result<DeploymentId, Bad> {
    req_uint(row, col).map(DeploymentId)
}

fn opt_dur(row: &Row<'_>, col: &str) -> Result<Option<Duration>, Bad> {
    Ok(opt_uint(row, col)?.map(Duration::from_nanos))
}

fn req_dur(row: &Row<'_>, col: &str) -> Result<Duration, Bad> {
    req_uint(row, col).map(Duration::from_nanos)
}

fn req_release(row: &Row<'_>, col: &str) -> Result<Release, Bad> {
    req::<String>(row, col).map(Release::new)
}

fn parse_colour(col: &str, s: &str) -> Result<Colour, Bad> {
    s.parse().map_err(|_| unknown(col, s))
}

fn req_colour(row: &Row<'_>, col: &str) -> Result<Colour, Bad> {
    parse_colour(col, &req::<String>(row, col)?)
}

fn unknown(col: &str, value: &str) -> Bad {
    Bad::Invalid(format!("{col} = {value:?} is not a value this cutover knows"))
}

/// A colour and a version that are both set or both NULL.
fn opt_live(row: &Row<'_>, colour: &str, version: &str) -> Result<Option<Live>, Bad> {
    match (opt::<String>(row, colour)?, opt::<String>(row, version)?) {
        (None, None) => Ok(None),
        (Some(c), Some(v)) => Ok(Some(Live {
            colour: parse_colour(colour, &c)?,
            release: Release::new(v),
        })),
        _ => Err(Bad::Invalid(format!("{colour} and {version} are not both set"))),
    }
}

fn req_live(row: &Row<'_>, colour: &str, version: &str) -> Result<Live, Bad> {
    opt_live(row, colour, version)?.ok_or_else(|| Bad::Invalid(format!("{colour} is NULL")))
}

fn decode_cause(row: &Row<'_>, col: &str) -> Result<Cause, Bad> {
    match req::<String>(row, col)?.as_str() {
        "deploy" => Ok(Cause::Deploy),
        "cold_rollback" => Ok(Cause::ColdRollback),
        other => Err(unknown(col, other)),
    }
}

fn decode_reason(row: &Row<'_>) -> Result<Reason, Bad> {
    Ok(match req::<String>(row, "reason")?.as_str() {
        "requested" => Reason::Requested,
        "provision_failed" => Reason::ProvisionFailed(req(row, "reason_text")?),
        "health_deadline" => Reason::HealthDeadline(req_dur(row, "reason_ns")?),
        "smoke_failed" => Reason::SmokeFailed(req(row, "reason_text")?),
        "unhealthy" => Reason::Unhealthy(req(row, "reason_text")?),
        "not_acknowledged" => Reason::NotAcknowledged(req(row, "reason_text")?),
        "migration_failed" => Reason::MigrationFailed(req(row, "reason_text")?),
        "live_check_failed" => Reason::LiveCheckFailed(req(row, "reason_text")?),
        "error_rate" => Reason::ErrorRate {
            errors: req_uint(row, "reason_errors")?,
            requests: req_uint(row, "reason_requests")?,
            max: req(row, "reason_max_rate")?,
        },
        "latency" => Reason::Latency {
            p99: req_dur(row, "reason_ns")?,
            max: req_dur(row, "reason_max_ns")?,
        },
        other => return Err(unknown("reason", other)),
    })
}

fn decode_outcome(row: &Row<'_>, col: &str) -> Result<Option<Outcome>, Bad> {
    let Some(code) = opt::<String>(row, col)? else {
        return Ok(None);
    };
    Ok(Some(match code.as_str() {
        "went_live" => Outcome::WentLive,
        "aborted" => Outcome::Aborted(decode_reason(row)?),
        "rolled_back" => Outcome::RolledBack(decode_reason(row)?),
        "interrupted" => Outcome::Interrupted,
        other => return Err(unknown(col, other)),
    }))
}

fn decode_state(row: &Row<'_>) -> Result<State, Bad> {
    let phase_code: String = req(row, "phase")?;
    let deployment = || -> Result<Deployment, Bad> {
        let promote = match req::<String>(row, "plan_promote")?.as_str() {
            "manual" => Promotion::Manual,
            "auto" => Promotion::Auto {
                delay: req_dur(row, "plan_promote_delay_ns")?,
            },
            other => return Err(unknown("plan_promote", other)),
        };
        Ok(Deployment {
            id: req_id(row, "dep_id")?,
            release: req_release(row, "dep_version")?,
            colour: req_colour(row, "dep_colour")?,
            plan: Plan {
                health_deadline: req_dur(row, "plan_health_deadline_ns")?,
                promote,
                watch: WatchPolicy {
                    duration: req_dur(row, "plan_watch_ns")?,
                    min_requests: req_uint(row, "plan_min_requests")?,
                    max_error_rate: req(row, "plan_max_error_rate")?,
                    max_p99: opt_dur(row, "plan_max_p99_ns")?,
                },
                keep_warm: req_dur(row, "plan_keep_warm_ns")?,
                migrate: opt_json(row, "plan_migrate")?.unwrap_or_default(),
                gradual: opt_json(row, "plan_gradual")?,
            },
            cause: decode_cause(row, "dep_cause")?,
        })
    };
    let phase = match phase_code.as_str() {
        "stable" => {
            let warm = match opt_live(row, "warm_colour", "warm_version")? {
                None => None,
                Some(live) => Some(Warm {
                    colour: live.colour,
                    release: live.release,
                    promoted_by: req_id(row, "warm_promoted_by")?,
                    keep_warm: req_dur(row, "warm_keep_warm_ns")?,
                }),
            };
            let last = match opt_uint(row, "ended_id")? {
                None => None,
                Some(id) => Some(Ended {
                    id: DeploymentId(id),
                    release: req_release(row, "ended_version")?,
                    outcome: decode_outcome(row, "ended_outcome")?
                        .ok_or_else(|| Bad::Invalid("ended_outcome is NULL".to_string()))?,
                }),
            };
            Phase::Stable { warm, last }
        }
        "migrating" => Phase::Migrating {
            deployment: deployment()?,
            step: match req::<String>(row, "migration_step")?.as_str() {
                "contract" => MigrationStep::Contract,
                "expand" => MigrationStep::Expand,
                "check" => MigrationStep::Check,
                "rollback" => MigrationStep::Rollback,
                other => return Err(unknown("migration_step", other)),
            },
            failure: opt_json(row, "migration_failure")?,
        },
        "provisioning" => Phase::Provisioning(deployment()?),
        "validating" => Phase::Validating(deployment()?),
        "ready_to_promote" => Phase::ReadyToPromote(deployment()?),
        "watching" => Phase::Watching {
            deployment: deployment()?,
            rollback_to: req_live(row, "rollback_colour", "rollback_version")?,
            judged: match req::<i64>(row, "judged")? {
                0 => false,
                1 => true,
                n => return Err(unknown("judged", &n.to_string())),
            },
            step: opt_uint(row, "watch_step")?.map(|s| s as usize),
        },
        other => return Err(unknown("phase", other)),
    };
    Ok(State {
        service: req(row, "name")?,
        live: opt_live(row, "live_colour", "live_version")?,
        previous: opt::<String>(row, "previous_version")?.map(Release::new),
        last_id: opt_uint(row, "last_id")?.map(DeploymentId),
        phase,
        contract: opt_json(row, "contract")?,
        contracted: opt::<String>(row, "contracted_version")?.map(Release::new),
    })
}

fn decode_transition(row: &Row<'_>) -> Result<TransitionEntry, Bad> {
    let kind: String = req(row, "kind")?;
    let deployment = opt_uint(row, "deployment")?.map(DeploymentId);
    let id = || deployment.ok_or_else(|| Bad::Invalid(format!("a {kind} record without deployment")));
    let record = match kind.as_str() {
        "started" => Record::Started {
            id: id()?,
            release: req_release(row, "version")?,
            colour: req_colour(row, "colour")?,
            cause: decode_cause(row, "cause")?,
        },
        "healthy" => Record::Healthy { id: id()? },
        "validated" => Record::Validated {
            id: id()?,
            detail: opt_json(row, "detail")?,
        },
        "awaiting_promotion" => Record::AwaitingPromotion {
            id: id()?,
            auto_after: opt_dur(row, "auto_after_ns")?,
        },
        "promoted" => Record::Promoted {
            id: id()?,
            colour: req_colour(row, "colour")?,
        },
        "went_live" => Record::WentLive {
            id: id()?,
            live: req_live(row, "colour", "version")?,
            watch: match req::<String>(row, "watched")?.as_str() {
                "skipped" => Watched::Skipped,
                "judged" => Watched::Judged,
                "unjudged" => Watched::Unjudged,
                other => return Err(unknown("watched", other)),
            },
        },
        "aborted" => Record::Aborted {
            id: id()?,
            reason: decode_reason(row)?,
        },
        "rolled_back" => Record::RolledBack {
            id: id()?,
            to: req_live(row, "colour", "version")?,
            reason: decode_reason(row)?,
        },
        "interrupted" => {
            let phase: String = req(row, "phase")?;
            Record::Interrupted {
                id: id()?,
                phase: PHASE_NAMES
                    .into_iter()
                    .find(|p| *p == phase)
                    .ok_or_else(|| unknown("phase", &phase))?,
            }
        }
        "watch_restarted" => Record::WatchRestarted { id: id()? },
        "retired" => Record::Retired {
            live: req_live(row, "colour", "version")?,
        },
        "migration" => {
            #[derive(serde::Deserialize)]
            struct Detail {
                step: MigrationStep,
                ok: bool,
                detail: String,
            }
            let d: Detail =
                opt_json(row, "detail")?.ok_or_else(|| Bad::Invalid("a migration record without detail".into()))?;
            Record::Migration {
                id: id()?,
                step: d.step,
                ok: d.ok,
                detail: d.detail,
            }
        }
        other => return Err(unknown("kind", other)),
    };
    Ok(TransitionEntry {
        seq: req_uint(row, "seq")?,
        at: from_ms(req(row, "at")?),
        deployment,
        record,
    })
}

fn decode_deployment(row: &Row<'_>) -> Result<DeploymentSummary, Bad> {
    Ok(DeploymentSummary {
        id: req_id(row, "id")?,
        release: req_release(row, "version")?,
        colour: req_colour(row, "colour")?,
        cause: decode_cause(row, "cause")?,
        started_at: from_ms(req(row, "started_at")?),
        promoted_at: opt(row, "promoted_at")?.map(from_ms),
        ended_at: opt(row, "ended_at")?.map(from_ms),
        outcome: decode_outcome(row, "outcome")?,
    })
}

fn decode_audit(row: &Row<'_>) -> Result<AuditEntry, Bad> {
    Ok(AuditEntry {
        seq: req_uint(row, "seq")?,
        at: from_ms(req(row, "at")?),
        audit: Audit {
            actor: req(row, "actor")?,
            service: opt(row, "service")?,
            action: req(row, "action")?,
            arguments: req(row, "arguments")?,
            result: req(row, "result")?,
        },
    })
}

fn decode_instance(row: &Row<'_>) -> Result<StoredInstance, Bad> {
    let int = |col: &str| -> Result<u32, Bad> {
        let n: i64 = req(row, col)?;
        u32::try_from(n).map_err(|_| Bad::Invalid(format!("{col} = {n} is out of range")))
    };
    let port = int("port")?;
    Ok(StoredInstance {
        service: req(row, "service")?,
        colour: req_colour(row, "colour")?,
        index: int("idx")?,
        release: req_release(row, "version")?,
        pid: int("pid")?,
        pgid: int("pgid")?,
        port: u16::try_from(port).map_err(|_| Bad::Invalid(format!("port = {port} is out of range")))?,
        start_ticks: row
            .get::<_, Option<i64>>("start_ticks")
            .map_err(|e| Bad::Invalid(format!("start_ticks: {e}")))?
            .map(|t| t.max(0) as u64),
    })
}

pub mod etcd;
#[cfg(test)]
mod tests;

/// What every node of a deployment shares and must agree on: each service's committed state
/// (compared and swapped on its [`Revision`]), the deployment history, the audit log, deployment
/// ids, and small cluster-wide values. One node keeps it in SQLite ([`Store`]); the daemon only
/// talks to it through this trait, so that another implementation (a fleet's etcd) can take its
/// place, and one test suite runs against each (`store/tests.rs`, `shared_contract`).
///
/// Every call blocks on its storage: call it off the async threads.
/// One service's part of [`StateStore::commit_many`].
#[derive(Clone, Copy, Debug)]
pub struct ServiceCommit<'a> {
    pub service: &'a str,
    /// The revision the state must be at ([`Revision::NONE`] if never committed).
    pub expected: Revision,
    pub state: &'a State,
    pub records: &'a [Record],
}

pub trait StateStore: Send + Sync + std::fmt::Debug {
    /// A deployment id for `service`, higher than any handed out or stored before, durably.
    fn next_deployment_id(&self, service: &str) -> Result<DeploymentId, StoreError>;
    /// Commits `state` with its `records` and `audit` in one step, only if the service's state is
    /// at revision `expected` ([`Revision::NONE`] if never committed); returns the new revision.
    /// On `Err` nothing was written; [`StoreError::Conflict`] if the revision differed.
    fn commit(
        &self,
        service: &str,
        expected: Revision,
        state: &State,
        records: &[Record],
        audit: Option<Audit>,
    ) -> Result<Revision, StoreError>;
    /// Commits several services' states at once (each at its expected revision, with its
    /// records): all of them or none; returns their new revisions in order. A store that cannot
    /// commit several services in one step refuses with [`StoreError::Rejected`], writing nothing.
    fn commit_many(&self, commits: &[ServiceCommit<'_>], audit: Option<Audit>) -> Result<Vec<Revision>, StoreError>;
    /// Appends to the audit log alone (a refused request).
    fn append_audit(&self, audit: &Audit) -> Result<(), StoreError>;
    /// The service's last committed state and its revision.
    fn load(&self, service: &str) -> Result<Option<(State, Revision)>, StoreError>;
    /// The service's most recent `limit` deployments, newest first.
    fn history(&self, service: &str, limit: usize) -> Result<Vec<DeploymentSummary>, StoreError>;
    /// Every record of one deployment, in commit order.
    fn transitions(&self, service: &str, deployment: DeploymentId) -> Result<Vec<TransitionEntry>, StoreError>;
    /// A small cluster-wide value, `None` if never set.
    fn get_value(&self, key: &str) -> Result<Option<String>, StoreError>;
    /// Sets or (`None`) removes a small cluster-wide value.
    fn set_value(&self, key: &str, value: Option<&str>) -> Result<(), StoreError>;
}

/// What only this host knows: the instances the process driver started here (pids, ports), for
/// a restarted daemon to adopt. Never shared with other nodes.
pub trait LocalStore: Send + Sync + std::fmt::Debug {
    fn record_instance(&self, instance: &StoredInstance) -> Result<(), StoreError>;
    fn remove_instances(&self, service: &str, colour: Colour) -> Result<usize, StoreError>;
    fn instances(&self, service: &str) -> Result<Vec<StoredInstance>, StoreError>;
}

impl StateStore for Store {
    fn next_deployment_id(&self, service: &str) -> Result<DeploymentId, StoreError> {
        Store::next_deployment_id(self, service)
    }
    fn commit(
        &self,
        service: &str,
        expected: Revision,
        state: &State,
        records: &[Record],
        audit: Option<Audit>,
    ) -> Result<Revision, StoreError> {
        self.commit_at(service, Some(expected), state, records, audit)
    }
    fn commit_many(&self, commits: &[ServiceCommit<'_>], audit: Option<Audit>) -> Result<Vec<Revision>, StoreError> {
        let all: Vec<(&str, Option<Revision>, &State, Vec<&Record>)> = commits
            .iter()
            .map(|c| (c.service, Some(c.expected), c.state, c.records.iter().collect()))
            .collect();
        self.commit_all(&all, audit)
    }
    fn append_audit(&self, audit: &Audit) -> Result<(), StoreError> {
        Store::append_audit(self, audit)
    }
    fn load(&self, service: &str) -> Result<Option<(State, Revision)>, StoreError> {
        self.load_at(service)
    }
    fn history(&self, service: &str, limit: usize) -> Result<Vec<DeploymentSummary>, StoreError> {
        Store::history(self, service, limit)
    }
    fn transitions(&self, service: &str, deployment: DeploymentId) -> Result<Vec<TransitionEntry>, StoreError> {
        Store::transitions(self, service, deployment)
    }
    fn get_value(&self, key: &str) -> Result<Option<String>, StoreError> {
        Store::get_value(self, key)
    }
    fn set_value(&self, key: &str, value: Option<&str>) -> Result<(), StoreError> {
        Store::set_value(self, key, value)
    }
}

impl LocalStore for Store {
    fn record_instance(&self, instance: &StoredInstance) -> Result<(), StoreError> {
        Store::record_instance(self, instance)
    }
    fn remove_instances(&self, service: &str, colour: Colour) -> Result<usize, StoreError> {
        Store::remove_instances(self, service, colour)
    }
    fn instances(&self, service: &str) -> Result<Vec<StoredInstance>, StoreError> {
        Store::instances(self, service)
    }
}
