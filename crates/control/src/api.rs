//! The admin API: HTTP/JSON under `/v1/`, on a unix socket (mode 0600: the file system is the
//! access control) and optionally on TCP, where every request must carry the bearer token.
//!
//! | method and path | what |
//! |---|---|
//! | `GET /v1/status` | every service: live colour and version, warm colour, deployment in progress, instances; and `tls`, the certificates served (expiry, load errors) |
//! | `GET /v1/services/{name}` | one service |
//! | `POST /v1/services/{name}/deploy` | `{"version": "v2", "upstreams": ["10.0.0.5:8080"]}` → `202 {"deployment": 7}` |
//! | `POST /v1/services/{name}/promote` | promote the validated deployment waiting for it |
//! | `POST /v1/services/{name}/rollback` | `{"kind": "instant"}` or `{"kind": "cold", "deployment": 8}` |
//! | `POST /v1/services/{name}/abort` | stop an unpromoted deployment |
//! | `GET /v1/services/{name}/history?limit=20` | past deployments, newest first |
//! | `GET /v1/services/{name}/deployments/{id}` | `{"id": 7, "steps": [{"at", "kind", "message", "terminal"}]}`: its steps so far, oldest first |
//! | `POST /v1/daemon/reload` | read every TLS certificate file and upstream CA file again → `{"certificates": [...], "upstream_cas": [...], "failed": 0}` (each that fails keeps what was loaded before) |
//! | `GET /v1/events` | server-sent events: one JSON [`crate::events::Notice`] per event |
//! | `GET /metrics` | OpenMetrics 1.0.0 when `Accept` asks for it, else the Prometheus text format 0.0.4 (see [`crate::metrics`], [`crate::exposition`]) |
//!
//! Errors are `{"error": "..."}` with 400 (bad request or refused in this state), 401 (missing or
//! wrong token), 404 (unknown service or deployment), 409 (a deployment is in progress), 429 (too
//! many wrong tokens from this address, with `Retry-After`; see [`crate::token_limiter`]), 503
//! (shutting down), 500 (the state store failed).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Path as UrlPath, Query, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::daemon::{AtShutdown, CommandError, Daemon, ServeRequest, UpgradeFailed};
use crate::token_limiter::{retry_after_secs, TokenLimiter, Verdict};

#[derive(Serialize)]
struct ErrorBody {
    error: String,
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(ErrorBody { error: message.into() })).into_response()
}

impl IntoResponse for CommandError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        error(status, self.to_string())
    }
}

/// A request's JSON body, or the 400 that says what was wrong with it and, in `hint`, what to
/// send instead.
fn json_body<T>(
    body: Result<Json<T>, axum::extract::rejection::JsonRejection>,
    hint: &str,
) -> Result<T, Box<Response>> {
    body.map(|Json(b)| b)
        .map_err(|e| Box::new(error(StatusCode::BAD_REQUEST, format!("{}; {hint}", e.body_text()))))
}

/// Who is asking, for the audit log.
#[derive(Clone)]
struct Caller(&'static str);

#[derive(Clone)]
struct Api {
    daemon: Daemon,
    metrics: Arc<crate::metrics::Metrics>,
}

/// The router, without authentication; [`serve_unix`] and [`serve_tcp`] add what their
/// transport needs.
fn router(daemon: Daemon, caller: &'static str) -> Router {
    let metrics = Arc::new(crate::metrics::Metrics::new(daemon.clone()));
    Router::new()
        .route("/", get(dashboard))
        .route("/metrics", get(metrics_text))
        .route("/v1/status", get(status))
        .route("/v1/services/{name}", get(service))
        .route("/v1/services/{name}/deploy", post(deploy))
        .route("/v1/services/{name}/promote", post(promote))
        .route("/v1/services/{name}/rollback", post(rollback))
        .route("/v1/services/{name}/abort", post(abort))
        .route("/v1/services/{name}/history", get(history))
        .route("/v1/services/{name}/pause", post(pause))
        .route("/v1/services/{name}/resume", post(resume))
        .route("/v1/services/{name}/maintenance", post(maintenance))
        .route("/v1/services/{name}/deployments/{id}", get(deployment))
        .route("/v1/releases", post(release).get(releases))
        .route("/v1/releases/{id}", get(release_record))
        .route("/v1/releases/{id}/rollback", post(release_rollback))
        .route("/v1/events", get(events))
        .route("/v1/daemon/upgrade", post(upgrade))
        .route("/v1/daemon/shutdown", post(shutdown))
        .route("/v1/daemon/reload", post(reload))
        // Answered by the TCP listener's access layer; the unix socket needs no session.
        .route(
            "/v1/session",
            post(|| async { error(StatusCode::NOT_FOUND, "sessions are for the TCP admin listener") }),
        )
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint; see /v1/status") })
        .layer(axum::Extension(Caller(caller)))
        .with_state(Api { daemon, metrics })
}

/// The dashboard: one page, embedded in the binary, that reads everything from this API.
async fn dashboard() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (header::X_FRAME_OPTIONS, "DENY"),
        ],
        include_str!("dashboard.html"),
    )
        .into_response()
}

/// Cumulative request and error counts of every service's colours, for the dashboard's charts.
fn traffic(daemon: &Daemon) -> serde_json::Value {
    let table = daemon.proxy().table();
    let services: Vec<serde_json::Value> = table
        .services()
        .iter()
        .map(|s| {
            let (b, g) = (s.blue.stats(), s.green.stats());
            serde_json::json!({
                "service": &*s.name,
                "blue": { "requests": b.requests(), "errors": b.errors() },
                "green": { "requests": g.requests(), "errors": g.errors() },
            })
        })
        .collect();
    let at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    serde_json::json!({ "at": at, "services": services })
}

/// The metrics in the format the scraper's `Accept` asks for (see [`crate::exposition`]).
async fn metrics_text(State(api): State<Api>, headers: axum::http::HeaderMap) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let format = crate::exposition::Format::negotiate(accept);
    (
        [(header::CONTENT_TYPE, format.content_type()), (header::VARY, "accept")],
        api.metrics.render(format),
    )
        .into_response()
}

#[derive(Serialize)]
struct StatusBody {
    services: Vec<crate::daemon::ServiceView>,
    preview_token: String,
    /// The TLS listeners' certificates; left out without TLS listeners.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tls: Vec<crate::tls::CertificateView>,
    /// In a fleet: this node and every member; left out without `[fleet]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    fleet: Option<crate::daemon::FleetView>,
}

/// How long `/v1/status` waits for etcd's view of the fleet before it answers without it.
const FLEET_STATUS_WAIT: std::time::Duration = std::time::Duration::from_millis(1500);

async fn status(State(api): State<Api>) -> Json<StatusBody> {
    Json(StatusBody {
        services: api.daemon.status(),
        preview_token: api.daemon.preview_token().to_string(),
        tls: api.daemon.certificates(),
        fleet: api.daemon.fleet_status(FLEET_STATUS_WAIT).await,
    })
}

/// `cutover reload`: every certificate file and upstream CA file read again. 200 either way: a
/// file that fails keeps what was loaded before and says why (`failed` counts them).
async fn reload(State(api): State<Api>, axum::Extension(caller): axum::Extension<Caller>) -> Response {
    tracing::info!(actor = caller.0, "certificate reload requested");
    let certificates = api.daemon.reload_certificates().await;
    let upstream_cas = api.daemon.reload_upstream_cas().await;
    let failed = certificates.iter().filter(|c| c.error.is_some()).count()
        + upstream_cas.iter().filter(|c| c.error.is_some()).count();
    Json(serde_json::json!({ "certificates": certificates, "upstream_cas": upstream_cas, "failed": failed }))
        .into_response()
}

async fn service(State(api): State<Api>, UrlPath(name): UrlPath<String>) -> Response {
    match api.daemon.status().into_iter().find(|s| s.name == name) {
        Some(s) => Json(s).into_response(),
        None => CommandError::UnknownService(name).into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeployBody {
    version: String,
    #[serde(default)]
    upstreams: Vec<String>,
}

async fn deploy(
    State(api): State<Api>,
    axum::Extension(caller): axum::Extension<Caller>,
    UrlPath(name): UrlPath<String>,
    body: Result<Json<DeployBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let body = match json_body(
        body,
        "send {\"version\": \"v2\"} (and \"upstreams\" for a static service)",
    ) {
        Ok(b) => b,
        Err(refused) => return *refused,
    };
    let mut upstreams = Vec::new();
    for u in &body.upstreams {
        match u.parse::<SocketAddr>() {
            Ok(a) => upstreams.push(a),
            Err(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("upstream '{u}' is not an address; write IP:PORT, e.g. 10.0.0.5:8080"),
                )
            }
        }
    }
    match api.daemon.deploy(&name, &body.version, upstreams, caller.0).await {
        Ok(id) => (StatusCode::ACCEPTED, Json(serde_json::json!({ "deployment": id }))).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn promote(
    State(api): State<Api>,
    axum::Extension(caller): axum::Extension<Caller>,
    UrlPath(name): UrlPath<String>,
) -> Response {
    match api.daemon.promote(&name, caller.0).await {
        Ok(()) => Json(serde_json::json!({ "ok": true })).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn abort(
    State(api): State<Api>,
    axum::Extension(caller): axum::Extension<Caller>,
    UrlPath(name): UrlPath<String>,
) -> Response {
    match api.daemon.abort(&name, caller.0).await {
        Ok(()) => Json(serde_json::json!({ "ok": true })).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn rollback(
    State(api): State<Api>,
    axum::Extension(caller): axum::Extension<Caller>,
    UrlPath(name): UrlPath<String>,
) -> Response {
    match api.daemon.rollback(&name, caller.0).await {
        Ok(done) => Json(done).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `POST /v1/releases`: the version of each service, and the upstreams of static ones.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseBody {
    services: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    upstreams: std::collections::BTreeMap<String, Vec<String>>,
    /// The order to start them in (default: by name).
    #[serde(default)]
    order: Vec<String>,
}

async fn release(
    State(api): State<Api>,
    axum::Extension(caller): axum::Extension<Caller>,
    body: Result<Json<ReleaseBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let body = match json_body(
        body,
        "send {\"services\": {\"web\": \"v2\", \"api\": \"v7\"}} (and \"upstreams\": {\"web\": [\"10.0.0.5:8080\"]} for static services)",
    ) {
        Ok(b) => b,
        Err(refused) => return *refused,
    };
    if let Some(extra) = body.upstreams.keys().find(|k| !body.services.contains_key(*k)) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("upstreams are given for {extra}, which the release does not name; name it in services, or drop its upstreams"),
        );
    }
    let mut names: Vec<&String> = body.order.iter().filter(|n| body.services.contains_key(*n)).collect();
    names.extend(body.services.keys().filter(|n| !body.order.contains(n)));
    let mut requests = Vec::new();
    for name in names {
        let mut upstreams = Vec::new();
        for u in body.upstreams.get(name).into_iter().flatten() {
            match u.parse::<SocketAddr>() {
                Ok(a) => upstreams.push(a),
                Err(_) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!("upstream '{u}' of {name} is not an address; write IP:PORT, e.g. 10.0.0.5:8080"),
                    )
                }
            }
        }
        requests.push(crate::daemon::ReleaseRequest {
            service: name.clone(),
            version: body.services[name].clone(),
            upstreams,
        });
    }
    match api.daemon.release(requests, caller.0).await {
        Ok(record) => (StatusCode::ACCEPTED, Json(record)).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn releases(State(api): State<Api>, Query(q): Query<HistoryQuery>) -> Response {
    match api.daemon.releases(q.limit.unwrap_or(20).min(1000)).await {
        Ok(list) => Json(list).into_response(),
        Err(e) => e.into_response(),
    }
}

fn release_id(id: &str) -> Result<u64, Box<Response>> {
    id.parse::<u64>().map_err(|_| {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            format!("'{id}' is not a release id; `cutover releases` lists them"),
        ))
    })
}

async fn release_record(State(api): State<Api>, UrlPath(id): UrlPath<String>) -> Response {
    let id = match release_id(&id) {
        Ok(id) => id,
        Err(r) => return *r,
    };
    match api.daemon.release_record(id).await {
        Ok(Some(r)) => Json(r).into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            format!("there is no release {id}; `cutover releases` lists them"),
        ),
        Err(e) => e.into_response(),
    }
}

async fn release_rollback(
    State(api): State<Api>,
    axum::Extension(caller): axum::Extension<Caller>,
    UrlPath(id): UrlPath<String>,
) -> Response {
    let id = match release_id(&id) {
        Ok(id) => id,
        Err(r) => return *r,
    };
    match api.daemon.rollback_release(id, caller.0).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PauseBody {
    /// The longest one request waits, in milliseconds; default 30 s.
    max_wait_ms: Option<u64>,
}

/// The longest a pause may hold one request.
const PAUSE_MAX: Duration = Duration::from_secs(600);

async fn pause(
    State(api): State<Api>,
    axum::Extension(caller): axum::Extension<Caller>,
    UrlPath(name): UrlPath<String>,
    body: Result<Json<PauseBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let body = match json_body(body, "send {} or {\"max_wait_ms\": 30000}") {
        Ok(b) => b,
        Err(refused) => return *refused,
    };
    let max_wait = Duration::from_millis(body.max_wait_ms.unwrap_or(30_000));
    if max_wait.is_zero() || max_wait > PAUSE_MAX {
        return error(
            StatusCode::BAD_REQUEST,
            format!("max_wait_ms must be above 0 and at most {}", PAUSE_MAX.as_millis()),
        );
    }
    match api.daemon.pause(&name, max_wait, caller.0) {
        Ok(()) => Json(serde_json::json!({ "paused": true })).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn resume(
    State(api): State<Api>,
    axum::Extension(caller): axum::Extension<Caller>,
    UrlPath(name): UrlPath<String>,
) -> Response {
    match api.daemon.resume(&name, caller.0).await {
        Ok(()) => Json(serde_json::json!({ "resumed": true })).into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MaintenanceBody {
    message: String,
}

async fn maintenance(
    State(api): State<Api>,
    axum::Extension(caller): axum::Extension<Caller>,
    UrlPath(name): UrlPath<String>,
    body: Result<Json<MaintenanceBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let body = match json_body(body, "send {\"message\": \"Back in 10 minutes\"}") {
        Ok(b) => b,
        Err(refused) => return *refused,
    };
    match api.daemon.maintenance(&name, &body.message, caller.0).await {
        Ok(()) => Json(serde_json::json!({ "maintenance": true })).into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpgradeBody {
    /// Absolute path of the new binary; absent: the file this daemon was started from.
    binary: Option<String>,
    /// How long the new daemon has to serve; default 60 s.
    timeout_ms: Option<u64>,
}

/// The longest a new daemon may take to serve: long enough for every instance's first check.
const UPGRADE_TIMEOUT_MAX: Duration = Duration::from_secs(600);

/// `cutover upgrade`: answered once the new daemon serves (or the old one serves on, with the
/// reason it failed).
async fn upgrade(
    State(api): State<Api>,
    axum::Extension(caller): axum::Extension<Caller>,
    body: Result<Json<UpgradeBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let body = match json_body(
        body,
        "send {} or {\"binary\": \"/usr/local/bin/cutover\", \"timeout_ms\": 60000}",
    ) {
        Ok(b) => b,
        Err(refused) => return *refused,
    };
    let binary = match body.binary {
        None => None,
        Some(b) if Path::new(&b).is_absolute() => Some(PathBuf::from(b)),
        Some(b) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("binary '{b}' is not an absolute path; the daemon does not share your working directory"),
            )
        }
    };
    let timeout = Duration::from_millis(body.timeout_ms.unwrap_or(60_000));
    if timeout.is_zero() || timeout > UPGRADE_TIMEOUT_MAX {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "timeout_ms must be above 0 and at most {}",
                UPGRADE_TIMEOUT_MAX.as_millis()
            ),
        );
    }
    tracing::info!(actor = caller.0, binary = ?binary, "upgrade requested");
    let (reply, answer) = tokio::sync::oneshot::channel();
    if let Err(e) = api
        .daemon
        .request(ServeRequest::Upgrade { binary, timeout, reply })
        .await
    {
        return e.into_response();
    }
    match answer.await {
        Ok(Ok(done)) => Json(done).into_response(),
        Ok(Err(UpgradeFailed::Refused(reason))) => error(StatusCode::CONFLICT, reason),
        // The new daemon, not this one, failed: as a gateway whose upstream did.
        Ok(Err(UpgradeFailed::Failed(reason))) => error(StatusCode::BAD_GATEWAY, reason),
        Err(_) => CommandError::ShuttingDown.into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ShutdownBody {
    #[serde(default)]
    stop_instances: bool,
}

/// `cutover shutdown`: the daemon stops as at SIGTERM; answered as the stop begins.
async fn shutdown(
    State(api): State<Api>,
    axum::Extension(caller): axum::Extension<Caller>,
    body: Result<Json<ShutdownBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let body = match json_body(body, "send {} or {\"stop_instances\": true}") {
        Ok(b) => b,
        Err(refused) => return *refused,
    };
    let instances = if body.stop_instances {
        AtShutdown::Stop
    } else {
        AtShutdown::Leave
    };
    tracing::info!(
        actor = caller.0,
        stop_instances = body.stop_instances,
        "shutdown requested"
    );
    match api.daemon.request(ServeRequest::Shutdown { instances }).await {
        Ok(()) => (StatusCode::ACCEPTED, Json(serde_json::json!({ "stopping": true }))).into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
struct HistoryQuery {
    limit: Option<usize>,
}

#[derive(Serialize)]
struct HistoryEntry {
    id: u64,
    version: String,
    colour: String,
    cause: String,
    started_at: u64,
    promoted_at: Option<u64>,
    ended_at: Option<u64>,
    outcome: Option<String>,
}

fn ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

async fn history(State(api): State<Api>, UrlPath(name): UrlPath<String>, Query(q): Query<HistoryQuery>) -> Response {
    match api.daemon.history(&name, q.limit.unwrap_or(20).min(1000)).await {
        Ok(list) => Json(history_json(list)).into_response(),
        Err(e) => e.into_response(),
    }
}

/// The history as `GET /v1/services/{name}/history` answers it; the CLI builds the same from
/// the state database when no daemon runs.
pub fn history_json(list: Vec<crate::store::DeploymentSummary>) -> serde_json::Value {
    let entries: Vec<HistoryEntry> = list
        .into_iter()
        .map(|d| HistoryEntry {
            id: d.id.0,
            version: d.release.version,
            colour: d.colour.to_string(),
            cause: format!("{:?}", d.cause).to_lowercase(),
            started_at: ms(d.started_at),
            promoted_at: d.promoted_at.map(ms),
            ended_at: d.ended_at.map(ms),
            outcome: d.outcome.map(|o| outcome_text(&o)),
        })
        .collect();
    serde_json::to_value(entries).unwrap_or_default()
}

async fn deployment(State(api): State<Api>, UrlPath((name, id)): UrlPath<(String, String)>) -> Response {
    let Ok(id) = id.parse::<u64>() else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("'{id}' is not a deployment id; `cutover history {name}` lists them"),
        );
    };
    match api.daemon.steps(&name, id).await {
        // Every deployment has at least its `started` step.
        Ok(steps) if steps.is_empty() => error(
            StatusCode::NOT_FOUND,
            format!("service {name} has no deployment {id}; `cutover history {name}` lists them"),
        ),
        Ok(steps) => Json(serde_json::json!({ "id": id, "steps": steps })).into_response(),
        Err(e) => e.into_response(),
    }
}

pub(crate) fn outcome_text(o: &crate::lifecycle::Outcome) -> String {
    use crate::lifecycle::Outcome;
    match o {
        Outcome::WentLive => "went live".into(),
        Outcome::Aborted(r) => format!("aborted: {r}"),
        Outcome::RolledBack(r) => format!("rolled back: {r}"),
        Outcome::Interrupted => "interrupted".into(),
    }
}

async fn events(State(api): State<Api>) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>> {
    let rx = api.daemon.subscribe();
    let notices = futures_util::stream::unfold(rx, |mut rx| async move {
        let ev = match rx.recv().await {
            Ok(n) => SseEvent::default()
                .event(n.kind.as_str())
                .json_data(&n)
                .unwrap_or_default(),
            // A slow reader missed some; tell it and go on.
            Err(tokio::sync::broadcast::error::RecvError::Lagged(k)) => {
                SseEvent::default().event("lagged").data(k.to_string())
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
        };
        Some((Ok(ev), rx))
    });
    // A traffic sample per second (event `traffic`) feeds the dashboard's charts.
    let tick = tokio::time::interval(std::time::Duration::from_secs(1));
    let daemon = api.daemon.clone();
    let samples = futures_util::stream::unfold((tick, daemon), |(mut tick, daemon)| async move {
        tick.tick().await;
        let ev = SseEvent::default()
            .event("traffic")
            .json_data(traffic(&daemon))
            .unwrap_or_default();
        Some((Ok(ev), (tick, daemon)))
    });
    Sse::new(futures_util::stream::select(notices, samples)).keep_alive(KeepAlive::default())
}

/// Constant-time comparison of the presented bearer token.
fn token_ok(presented: &[u8], expected: &[u8]) -> bool {
    presented.len() == expected.len() && presented.iter().zip(expected).fold(0u8, |a, (x, y)| a | (x ^ y)) == 0
}

/// Who may use the TCP listener: bearer-token holders, and browsers with a session made from the
/// token (`POST /v1/session`).
struct Access {
    token: String,
    /// Whether the API is served over TLS: its session cookie is then `Secure`.
    secure: bool,
    /// Session id -> expiry. Sessions live in memory: a restart signs everyone out.
    sessions: Mutex<HashMap<String, Instant>>,
    /// Slows down guessing: checked before the token is compared.
    limiter: TokenLimiter,
}

const SESSION_COOKIE: &str = "cutover_session";
/// How long a sign-in's body may take to arrive.
const LOGIN_BODY_TIMEOUT: Duration = Duration::from_secs(5);
const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);

impl Access {
    /// Compares `presented` with the token within the client's allowance of wrong tokens: `None`
    /// if it is right, else the answer to send (401, or 429 with `Retry-After`).
    fn refuse_token(&self, client: IpAddr, presented: &str, wrong: &'static str) -> Option<Response> {
        let verdict = self.limiter.attempt(client, Instant::now(), || {
            token_ok(presented.as_bytes(), self.token.as_bytes())
        });
        match verdict {
            Verdict::Allowed => None,
            Verdict::Wrong => Some(error(StatusCode::UNAUTHORIZED, wrong)),
            Verdict::Limited(wait) => {
                let secs = retry_after_secs(wait);
                let mut answer = error(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!("too many wrong tokens from {client}; try again in {secs} s"),
                );
                answer
                    .headers_mut()
                    .insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
                Some(answer)
            }
        }
    }

    fn session_ok(&self, req: &Request) -> bool {
        let Some(id) = req
            .headers()
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().strip_prefix(SESSION_COOKIE).and_then(|r| r.strip_prefix('=')))
            .next()
        else {
            return false;
        };
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        sessions.retain(|_, expiry| *expiry > now);
        sessions.keys().any(|k| token_ok(k.as_bytes(), id.as_bytes()))
    }
}

/// The client's address, which the TCP listener records on every request.
fn client(req: &Request) -> IpAddr {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
}

async fn require_token(State(access): State<Arc<Access>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if req.method() == Method::GET && path == "/" {
        return next.run(req).await; // the page itself holds no data; it asks for the token
    }
    if req.method() == Method::POST && path == "/v1/session" {
        return login(&access, req).await;
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(p) => match access.refuse_token(client(&req), p, "wrong token; use the one in the daemon's token_file") {
            None => next.run(req).await,
            Some(answer) => answer,
        },
        None if access.session_ok(&req) => {
            // A cookie goes along with cross-site requests too; SameSite=Strict stops most, and a
            // custom header (which a cross-site form cannot set) stops the rest.
            let safe = matches!(*req.method(), Method::GET | Method::HEAD);
            if !safe && !req.headers().contains_key("x-cutover-request") {
                return error(StatusCode::FORBIDDEN, "missing X-Cutover-Request header");
            }
            next.run(req).await
        }
        None => error(
            StatusCode::UNAUTHORIZED,
            "this endpoint needs `Authorization: Bearer <token>` (the daemon's token_file)",
        ),
    }
}

/// `POST /v1/session {"token": "..."}`: a session cookie for the dashboard.
async fn login(access: &Access, req: Request) -> Response {
    #[derive(Deserialize)]
    struct Login {
        token: String,
    }
    if !req.headers().contains_key("x-cutover-request") {
        return error(StatusCode::FORBIDDEN, "missing X-Cutover-Request header");
    }
    let client = client(&req);
    // Bounded in time as in size: before the token is checked, a client must not be able to
    // hold a connection by sending a body slowly.
    let Ok(Ok(bytes)) = tokio::time::timeout(LOGIN_BODY_TIMEOUT, axum::body::to_bytes(req.into_body(), 4096)).await
    else {
        return error(StatusCode::BAD_REQUEST, "send {\"token\": \"...\"}");
    };
    let Ok(login) = serde_json::from_slice::<Login>(&bytes) else {
        return error(StatusCode::BAD_REQUEST, "send {\"token\": \"...\"}");
    };
    if let Some(answer) = access.refuse_token(client, login.token.trim(), "wrong token") {
        return answer;
    }
    let Some(id) = session_id() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no random bytes for a session id (getrandom failed); try again, or use the token as a bearer token",
        );
    };
    access
        .sessions
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id.clone(), Instant::now() + SESSION_LIFETIME);
    let cookie = format!(
        "{SESSION_COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{}",
        SESSION_LIFETIME.as_secs(),
        if access.secure { "; Secure" } else { "" }
    );
    ([(header::SET_COOKIE, cookie)], Json(serde_json::json!({ "ok": true }))).into_response()
}

/// 32 random bytes from the kernel (`getrandom(2)`: no file to open, never blocks once the
/// system's pool is initialised), in hex. `None` if the kernel refuses, and the sign-in fails
/// with an error instead of ending the process.
fn session_id() -> Option<String> {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes).ok()?;
    Some(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// A bound admin listener, created before anything else starts so that a busy address fails
/// the start with nothing running. A unix socket's file goes with it: dropping the listener (a
/// start that fails later, a stop) removes the file.
pub struct AdminListener(Bound);

enum Bound {
    Unix(tokio::net::UnixListener, SocketFile),
    Tcp(tokio::net::TcpListener, String),
}

/// The admin socket's file, removed on drop if it is still the one this daemon bound (not a file
/// someone put in its place since), unless it was handed over with the socket
/// ([`AdminServer::stop`]).
struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
    handed_over: Arc<std::sync::atomic::AtomicBool>,
}

impl SocketFile {
    fn of(path: &Path) -> std::io::Result<SocketFile> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::symlink_metadata(path)?;
        Ok(SocketFile {
            path: path.to_path_buf(),
            dev: meta.dev(),
            ino: meta.ino(),
            handed_over: Default::default(),
        })
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt;
        if self.handed_over.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == (self.dev, self.ino) {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// Binds the admin unix socket at `path`, creating its directory (mode 0700) if missing. A stale
/// socket file, with no daemon answering on it, is replaced; a live one is refused.
///
/// The socket is never reachable with a wider mode than 0600, whatever the umask and whoever
/// can enter `path`'s directory: it is bound inside a fresh directory only this user can enter,
/// made 0600 there, and only then linked to `path` (a link, unlike a rename, fails instead of
/// replacing a socket another daemon published meanwhile).
pub fn bind_unix(path: &Path) -> std::io::Result<AdminListener> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let in_use = || {
        std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!("{} is in use by a running daemon; stop it first", path.display()),
        )
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    crate::private_dir::create(dir)?;
    if path.symlink_metadata().is_ok() {
        // Refuse to take over a socket another daemon still answers on.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(in_use());
        }
        std::fs::remove_file(path)?;
    }
    let private = dir.join(format!(".cutover-bind-{}", std::process::id()));
    let mut builder = std::fs::DirBuilder::new();
    builder.mode(0o700);
    if let Err(e) = builder.create(&private) {
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            return Err(e);
        }
        // Left by a start that died half way with the same pid: ours to clear. Created afresh
        // below, so nothing another user placed there is ever used.
        std::fs::remove_dir_all(&private)?;
        builder.create(&private)?;
    }
    let bound = private.join("s");
    let result = (|| {
        let listener = tokio::net::UnixListener::bind(&bound)?;
        std::fs::set_permissions(&bound, std::fs::Permissions::from_mode(0o600))?;
        std::fs::hard_link(&bound, path).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => in_use(),
            _ => e,
        })?;
        Ok(AdminListener(Bound::Unix(listener, SocketFile::of(path)?)))
    })();
    let _ = std::fs::remove_dir_all(&private);
    result
}

/// Binds the TCP admin address; every request on it will need `token`.
pub async fn bind_tcp(addr: SocketAddr, token: String) -> std::io::Result<AdminListener> {
    Ok(AdminListener(Bound::Tcp(
        tokio::net::TcpListener::bind(addr).await?,
        token,
    )))
}

impl AdminListener {
    /// The admin unix socket at `path`, listening already: handed over by the daemon this one
    /// replaces, or by systemd. (A socket bound through a link, as [`bind_unix`] does, no longer
    /// knows its path; the caller matched it to the config.)
    pub fn inherited_unix(listener: std::os::unix::net::UnixListener, path: &Path) -> std::io::Result<AdminListener> {
        use std::os::unix::fs::FileTypeExt;
        if !std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
            return Err(std::io::Error::other(format!(
                "the admin socket was handed over, but {} is not a socket any more",
                path.display()
            )));
        }
        let file = SocketFile::of(path)?;
        listener.set_nonblocking(true)?;
        Ok(AdminListener(Bound::Unix(
            tokio::net::UnixListener::from_std(listener)?,
            file,
        )))
    }

    /// The TCP admin address, listening already (see [`AdminListener::inherited_unix`]).
    pub fn inherited_tcp(listener: std::net::TcpListener, token: String) -> std::io::Result<AdminListener> {
        listener.set_nonblocking(true)?;
        Ok(AdminListener(Bound::Tcp(
            tokio::net::TcpListener::from_std(listener)?,
            token,
        )))
    }

    /// A new descriptor of the listening socket, for the daemon that takes over.
    pub fn duplicate(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        use std::os::fd::AsFd;
        match &self.0 {
            Bound::Unix(l, _) => l.as_fd().try_clone_to_owned(),
            Bound::Tcp(l, _) => l.as_fd().try_clone_to_owned(),
        }
    }
}

/// The admin API being served.
pub struct AdminServer {
    task: tokio::task::JoinHandle<()>,
    /// The unix socket's [`SocketFile::handed_over`].
    handed_over: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl AdminServer {
    /// Stops serving; once this returns the listener is closed. `handed_over`: another daemon
    /// serves on the same socket now, so its file stays.
    pub async fn stop(self, handed_over: bool) {
        if let (true, Some(flag)) = (handed_over, &self.handed_over) {
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        self.task.abort();
        let _ = self.task.await;
    }
}

/// Serves the API on a bound listener until stopped.
pub fn serve(listener: AdminListener, daemon: Daemon) -> AdminServer {
    match listener.0 {
        Bound::Unix(l, file) => {
            let app = router(daemon, "cli");
            let handed_over = Some(file.handed_over.clone());
            let task = tokio::spawn(async move {
                let _file = file;
                let _ = axum::serve(l, app).await;
            });
            AdminServer { task, handed_over }
        }
        Bound::Tcp(l, token) => {
            let tls_wanted = daemon.config().server.admin_tls.is_some();
            let tls = daemon.admin_certificate().and_then(|slot| {
                cutover_proxy::admin_server_config(slot)
                    .map_err(|e| tracing::error!(error = %e, "the admin API's TLS settings failed: {e}"))
                    .ok()
            });
            let access = Arc::new(Access {
                token,
                secure: tls.is_some(),
                sessions: Mutex::new(HashMap::new()),
                limiter: TokenLimiter::new(),
            });
            let app = router(daemon, "api").layer(axum::middleware::from_fn_with_state(access, require_token));
            let task = match tls {
                Some(tls) => tokio::spawn(serve_tls(l, app, tls)),
                // With admin_tls set and its settings refused (not expected: they are rustls'
                // defaults), the API is not served at all rather than in cleartext.
                None if tls_wanted => tokio::spawn(async {}),
                None => tokio::spawn(async move {
                    let _ = axum::serve(l, app.into_make_service_with_connect_info::<SocketAddr>()).await;
                }),
            };
            AdminServer {
                task,
                handed_over: None,
            }
        }
    }
}

/// Connections the admin API over TLS holds at once (handshakes included); more are closed at
/// once.
const ADMIN_TLS_CONNECTIONS: usize = 512;
/// Of those, the most one client address holds: one client cannot take every slot.
const ADMIN_TLS_CONNECTIONS_PER_CLIENT: usize = 32;
/// A request's head must arrive within this (also the longest an idle connection is kept).
const ADMIN_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The connections each client address holds, for [`ADMIN_TLS_CONNECTIONS_PER_CLIENT`].
#[derive(Default)]
struct PerClient(Mutex<HashMap<IpAddr, usize>>);

/// One connection of a client, counted until dropped.
struct ClientSlot {
    counts: Arc<PerClient>,
    ip: IpAddr,
}

impl PerClient {
    fn take(self: &Arc<Self>, ip: IpAddr) -> Option<ClientSlot> {
        let mut counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(ip).or_insert(0);
        if *n >= ADMIN_TLS_CONNECTIONS_PER_CLIENT {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            counts: self.clone(),
            ip,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}
/// A client must finish its TLS handshake with the admin API within this from its connect.
const ADMIN_TLS_HANDSHAKE: Duration = Duration::from_secs(10);

/// Serves the admin API over TLS (`server.admin_tls`): each connection's handshake on a task of
/// its own, bounded in time, then HTTP/1.1 with the API's routes.
async fn serve_tls(listener: tokio::net::TcpListener, app: Router, tls: Arc<rustls::ServerConfig>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let slots = Arc::new(tokio::sync::Semaphore::new(ADMIN_TLS_CONNECTIONS));
    let per_client = Arc::new(PerClient::default());
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors and the like: try again shortly rather than spin.
                tracing::warn!(error = %e, "admin API: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(client_slot) = per_client.take(peer.ip()) else {
            tracing::warn!(%peer, "admin API: {} holds {ADMIN_TLS_CONNECTIONS_PER_CLIENT} connections already; this one is closed", peer.ip());
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "admin API: {ADMIN_TLS_CONNECTIONS} connections open already; the one from {peer} is closed");
            continue;
        };
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            let _slots = (slot, client_slot);
            serve_tls_connection(stream, peer, acceptor, app).await;
        });
    }
}

async fn serve_tls_connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    app: Router,
) {
    let deadline = tokio::time::Instant::now() + ADMIN_TLS_HANDSHAKE;
    // Plain HTTP to this port is told to use https, rather than getting an alert it cannot read.
    let mut first = [0u8; 1];
    match tokio::time::timeout_at(deadline, stream.peek(&mut first)).await {
        Ok(Ok(1)) if first[0] != cutover_proxy::TLS_HANDSHAKE_RECORD => {
            let local = stream.local_addr().map(|a| a.to_string()).unwrap_or_default();
            let body = format!(
                "the cutover admin API at {local} speaks TLS only: use https://{local}/ (the cutover CLI does, with \
                 [server] admin_tls in its config)\n"
            );
            let answer = format!(
                "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            cutover_proxy::close_after(stream, answer.as_bytes(), deadline).await;
            return;
        }
        Ok(Ok(1)) => {}
        _ => return,
    }
    let tls = match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "admin API: the TLS handshake from {peer} failed: {e}");
            return;
        }
        Err(_) => {
            tracing::info!(%peer, "admin API: the TLS handshake from {peer} did not finish within {ADMIN_TLS_HANDSHAKE:?}");
            return;
        }
    };
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let mut req = req.map(axum::body::Body::new);
        req.extensions_mut().insert(ConnectInfo(peer));
        let mut app = app.clone();
        tower_service::Service::call(&mut app, req)
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(ADMIN_HEADER_TIMEOUT)
        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
        .with_upgrades()
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_are_64_hex_digits_and_differ() {
        let a = session_id().unwrap();
        let b = session_id().unwrap();
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn token_comparison() {
        assert!(token_ok(b"abc", b"abc"));
        assert!(!token_ok(b"abd", b"abc"));
        assert!(!token_ok(b"ab", b"abc"));
        assert!(!token_ok(b"", b"abc"));
    }
}
