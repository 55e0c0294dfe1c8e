//! The request path: route, pick an instance, forward, stream back.
//!
//! A request reads the route table exactly once, when its head has arrived; everything after
//! that works from the `Arc`s it took from that snapshot, so a switch never changes the colour of
//! a request already routed. The path takes no lock: the table is an `ArcSwap` load, pools are
//! per worker, counters are atomics.

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use hyper::body::Incoming;
use tokio::io::AsyncWriteExt;

use crate::body::{InstanceGuard, ProxyBody, Streaming};
use crate::error::ProxyError;
use crate::headers::{self, Forwarding, X_CUTOVER_PREVIEW};
use crate::server::{OpenGuard, Shared};
use crate::table::{now_ms, Colour, Generation, GenerationGuard, Pool};
use crate::upstream::{self, ConnectError, UpBody};

/// Per client connection: what every request on it shares.
pub(crate) struct ConnCtx {
    pub(crate) shared: Arc<Shared>,
    pub(crate) client_ip: HeaderValue,
    /// Requests on a preview listener always go to the inactive colour.
    pub(crate) preview_listener: bool,
    pub(crate) activity: Arc<crate::server::Activity>,
}

pub(crate) async fn handle(ctx: Arc<ConnCtx>, req: Request<Incoming>) -> Result<Response<ProxyBody>, std::convert::Infallible> {
    let _busy = ctx.activity.request();
    Ok(match proxy(&ctx, req).await {
        Ok(resp) => resp,
        Err(e) => error_response(&e),
    })
}

pub(crate) fn error_response(e: &ProxyError) -> Response<ProxyBody> {
    let mut msg = e.to_string();
    msg.push('\n');
    let mut resp = Response::new(ProxyBody::full(msg));
    *resp.status_mut() = e.status();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// The host a request is for, without port: the URI authority (HTTP/2, absolute-form) or the
/// Host header.
fn request_host(req: &Request<Incoming>) -> Option<&str> {
    if let Some(host) = req.uri().host() {
        return Some(host);
    }
    let raw = req.headers().get(header::HOST)?.to_str().ok()?;
    if raw.starts_with('[') {
        // IPv6 literal: [::1]:8080
        return raw.find(']').map(|end| &raw[..=end]);
    }
    Some(raw.rsplit_once(':').map_or(raw, |(h, _)| h))
}

fn is_idempotent(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE)
}

/// What a request keeps of itself so it can be sent again when its connection dies before any
/// response byte arrived. Only bodiless idempotent requests get one.
struct Replay {
    method: Method,
    uri: Uri,
    headers: http::HeaderMap,
}

impl Replay {
    fn request(&self) -> Request<UpBody> {
        let mut r = Request::new(UpBody::Empty);
        *r.method_mut() = self.method.clone();
        *r.uri_mut() = self.uri.clone();
        *r.headers_mut() = self.headers.clone();
        r
    }
}

async fn proxy(ctx: &ConnCtx, mut req: Request<Incoming>) -> Result<Response<ProxyBody>, ProxyError> {
    let shared = &ctx.shared;
    if shared.shutdown.is_cancelled() {
        return Err(ProxyError::ShuttingDown);
    }

    // One table load per request. The request keeps this snapshot (one reference count) to the
    // end, so its colour and pool cannot change under it whatever is stored meanwhile.
    let table = shared.table.load_full();
    let svc = table.route(request_host(&req)).ok_or(ProxyError::NoRoute)?;
    let preview = match req.headers().get(&X_CUTOVER_PREVIEW) {
        Some(v) => svc.preview_matches(v.as_bytes()),
        None => false,
    };
    let colour = if ctx.preview_listener || preview { svc.active.other() } else { svc.active };
    let pool = svc.pool(colour);
    let (service_name, balance) = (&svc.name, svc.balance);
    let gen_guard = pool.generation.enter_request();

    // The upstream speaks HTTP/1.1 in origin-form with a Host header.
    let upgrade = if req.version() == Version::HTTP_11 && wants_upgrade(&req) {
        req.headers().get(header::UPGRADE).cloned()
    } else {
        None
    };
    let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
    if req.version() != Version::HTTP_11 {
        if let Some(auth) = req.uri().authority() {
            if !req.headers().contains_key(header::HOST) {
                if let Ok(v) = HeaderValue::from_str(auth.as_str()) {
                    req.headers_mut().insert(header::HOST, v);
                }
            }
        }
        *req.version_mut() = Version::HTTP_11;
    }
    if req.uri().scheme().is_some() || req.uri().authority().is_some() {
        let pq = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let origin: Uri = pq.parse().map_err(|_| ProxyError::BadRequest("request target is not a valid path"))?;
        *req.uri_mut() = origin;
    }
    let proto = headers::proto_http();
    headers::request_to_upstream(
        req.headers_mut(),
        &Forwarding { client_ip: &ctx.client_ip, proto: &proto },
        upgrade.clone(),
    );

    let (parts, body) = req.into_parts();
    let replay = (shared.config.retry_idempotent && upgrade.is_none() && is_idempotent(&parts.method) && body.is_end_stream())
        .then(|| Replay { method: parts.method.clone(), uri: parts.uri.clone(), headers: parts.headers.clone() });
    let up_req = Request::from_parts(parts, UpBody::Client(body));

    let gen = gen_guard.gen.clone();
    let sent = tokio::select! {
        biased;
        r = send(ctx, service_name, pool, colour, balance, up_req, replay) => r,
        _ = gen.deadline.cancelled() => {
            return Err(ProxyError::DrainDeadline { service: service_name.to_string(), colour: colour.as_str() });
        }
    };
    let Sent { mut resp, tx, instance_id, addr, instance } = sent?;

    let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    headers::response_to_client(resp.headers_mut(), switching && client_upgrade.is_some());
    if switching {
        let Some(client_upgrade) = client_upgrade else {
            return Err(ProxyError::Upstream {
                service: service_name.to_string(),
                addr,
                reason: "switched protocols without being asked to".into(),
            });
        };
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        spawn_tunnel(client_upgrade, upstream_upgrade, Generation::into_upgraded(gen_guard), instance, OpenGuard::new(&ctx.shared));
        drop(tx);
        let (parts, _) = resp.into_parts();
        return Ok(Response::from_parts(parts, ProxyBody::empty()));
    }

    let (parts, body) = resp.into_parts();
    let body = ProxyBody::streaming(Streaming {
        body,
        gen: gen_guard,
        _instance: instance,
        conn: Some((instance_id, tx, shared.config.upstream_pool_size)),
        deadline: None,
    });
    Ok(Response::from_parts(parts, body))
}

fn wants_upgrade(req: &Request<Incoming>) -> bool {
    req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| v.to_str().map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade"))).unwrap_or(false))
}

struct Sent {
    resp: Response<Incoming>,
    tx: upstream::Sender,
    instance_id: u64,
    addr: SocketAddr,
    instance: InstanceGuard,
}

/// Sends the request to an instance of the pool. A connect failure ejects the instance for a
/// moment and moves on to a sibling (nothing was sent). A pooled connection found dead before
/// the request was written is replaced. A failure after the request was written is final, unless
/// the request is a bodiless idempotent one with a `replay` copy.
async fn send(
    ctx: &ConnCtx,
    service: &Arc<str>,
    pool: &Pool,
    colour: Colour,
    balance: crate::table::Balance,
    req: Request<UpBody>,
    replay: Option<Replay>,
) -> Result<Sent, ProxyError> {
    let cfg = &ctx.shared.config;
    let mut req = Some(req);
    let mut skip: u64 = 0;
    let mut last: Option<ProxyError> = None;
    // Every instance once, plus a few for dead pooled connections and replays.
    let max_attempts = pool.instances.len() + 3;
    for _ in 0..max_attempts {
        let Some(idx) = pool.pick(balance, skip, now_ms()) else { break };
        let inst = &pool.instances[idx];
        let mut tx = match upstream::checkout(inst.id) {
            Some(mut tx) => match tx.ready().await {
                Ok(()) => tx,
                Err(_) => continue, // closed while idle; try again (pooled or new)
            },
            None => match upstream::connect(inst.addr, cfg.connect_timeout).await {
                Ok(tx) => tx,
                Err(e) => {
                    if !matches!(e, ConnectError::Handshake(_)) {
                        // Passive ejection: skip it for a while unless nothing else is left.
                        inst.state
                            .ejected_until_ms
                            .store(now_ms() + cfg.connect_timeout.as_millis().max(1000) as u64 * 2, std::sync::atomic::Ordering::Relaxed);
                    }
                    tracing::debug!(service = %service, %colour, addr = %inst.addr, error = %e, "connect failed, trying a sibling");
                    if idx < 64 {
                        skip |= 1 << idx;
                    }
                    last = Some(ProxyError::Connect { service: service.to_string(), addr: inst.addr, reason: e.to_string() });
                    continue;
                }
            },
        };
        let guard = InstanceGuard::new(&inst.state);
        let Some(r) = req.take() else { break };
        let result = tokio::time::timeout(cfg.upstream_timeout, tx.try_send_request(r)).await;
        match result {
            Ok(Ok(resp)) => {
                return Ok(Sent { resp, tx, instance_id: inst.id, addr: inst.addr, instance: guard });
            }
            Ok(Err(mut e)) => {
                if let Some(r) = e.take_message() {
                    // Not written: the pooled connection died under us. Same request, new connection.
                    req = Some(r);
                    continue;
                }
                let reason = e.into_error().to_string();
                if let Some(rp) = &replay {
                    tracing::debug!(service = %service, %colour, addr = %inst.addr, error = %reason, "upstream failed before answering; replaying idempotent request");
                    if idx < 64 {
                        skip |= 1 << idx;
                    }
                    req = Some(rp.request());
                    last = Some(ProxyError::Upstream { service: service.to_string(), addr: inst.addr, reason });
                    continue;
                }
                return Err(ProxyError::Upstream { service: service.to_string(), addr: inst.addr, reason });
            }
            Err(_) => {
                return Err(ProxyError::Timeout { service: service.to_string(), addr: inst.addr });
            }
        }
    }
    Err(last.unwrap_or_else(|| ProxyError::NoInstance { service: service.to_string(), colour: colour.as_str() }))
}

/// Joins the client's and the upstream's upgraded connections and copies bytes both ways until
/// either side closes, or until the colour's drain deadline plus a random offset within the
/// close window: spreading the closes keeps thousands of WebSocket clients from reconnecting in
/// the same instant.
fn spawn_tunnel(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    guard: GenerationGuard,
    instance: InstanceGuard,
    open: OpenGuard,
) {
    tokio::spawn(async move {
        let (client, upstream) = match tokio::try_join!(client, upstream) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade did not complete");
                return;
            }
        };
        let mut client = hyper_util::rt::TokioIo::new(client);
        let mut upstream = hyper_util::rt::TokioIo::new(upstream);
        let gen = guard.gen.clone();
        let deadline = async {
            gen.deadline.cancelled().await;
            let window = gen.close_window_ms.load(std::sync::atomic::Ordering::Relaxed);
            if window > 0 {
                let offset = crate::headers::random_u64() % window;
                tokio::time::sleep(std::time::Duration::from_millis(offset)).await;
            }
        };
        tokio::select! {
            r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "upgraded connection ended with an error");
                }
            }
            _ = deadline => {
                let _ = client.shutdown().await;
                let _ = upstream.shutdown().await;
            }
        }
        drop(instance);
        drop(guard);
        drop(open);
    });
}
