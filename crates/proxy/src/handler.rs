//! The request path: route, pick an instance, forward, stream back.
//!
//! A request reads the route table exactly once, when its head has arrived; everything after
//! that works from the `Arc`s it took from that snapshot, so a switch never changes the colour of
//! a request already routed. The path takes no lock: the table is an `ArcSwap` load, pools are
//! per worker, counters are atomics.

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::Body;
use hyper::body::Incoming;
use tokio::io::AsyncWriteExt;

use crate::body::{InstanceGuard, ProxyBody, Streaming};
use crate::error::ProxyError;
use crate::h1::{BodyWriteError, Conn, Head, HeadError, Prefixed};
use crate::headers::{self, BodyFraming, Forwarding, X_CUTOVER_PREVIEW};
use crate::pass::{Hold, Side};
use crate::server::{OpenGuard, Shared};
use crate::table::{now_ms, Colour, Generation, GenerationGuard, Pool, PoolState};
use crate::upstream;

/// Per client connection: what every request on it shares.
pub(crate) struct ConnCtx {
    pub(crate) shared: Arc<Shared>,
    pub(crate) client_ip: HeaderValue,
    /// Requests on a preview listener always go to the inactive colour.
    pub(crate) preview_listener: bool,
    pub(crate) activity: Arc<crate::server::Activity>,
}

pub(crate) async fn handle(
    ctx: Arc<ConnCtx>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, std::convert::Infallible> {
    let _busy = ctx.activity.request();
    let start = std::time::Instant::now();
    let cfg = &ctx.shared.config;
    crate::server::preempt_point(start, cfg.preempt_interval);
    let line = cfg
        .access_log
        .then(|| (req.method().clone(), req.uri().path().to_string()));
    // Set once the request has a colour; its counters get the outcome.
    let mut seen: Option<Seen> = None;
    let resp = match proxy(&ctx, req, &mut seen).await {
        Ok(resp) => resp,
        Err(e) => error_response(&e),
    };
    if let Some(seen) = &seen {
        if cfg.record_stats {
            seen.pool.stats.record(resp.status().as_u16(), start.elapsed());
        }
    }
    if let Some((method, path)) = line {
        let (service, colour, id) = match &seen {
            Some(s) => (&*s.service, s.colour.as_str(), s.request_id.as_deref().unwrap_or("-")),
            None => ("-", "-", "-"),
        };
        tracing::info!(
            target: "cutover::access",
            request_id = id,
            service,
            colour,
            %method,
            path = %path,
            status = resp.status().as_u16(),
            duration_us = start.elapsed().as_micros() as u64,
            "request"
        );
    }
    Ok(resp)
}

/// What `handle` learns about a request once it is routed.
pub(crate) struct Seen {
    pool: Arc<PoolState>,
    service: Arc<str>,
    colour: Colour,
    /// Only with the access log on.
    request_id: Option<String>,
}

pub(crate) fn error_response(e: &ProxyError) -> Response<ProxyBody> {
    let mut msg = e.to_string();
    msg.push('\n');
    let mut resp = Response::new(ProxyBody::full(msg));
    *resp.status_mut() = e.status();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
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
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

async fn proxy(
    ctx: &ConnCtx,
    mut req: Request<Incoming>,
    seen: &mut Option<Seen>,
) -> Result<Response<ProxyBody>, ProxyError> {
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
    let colour = if ctx.preview_listener || preview {
        svc.active.other()
    } else {
        svc.active
    };
    let pool = svc.pool(colour);
    let (service_name, balance) = (&svc.name, svc.balance);
    let gen_guard = pool.generation.enter_request();
    *seen = Some(Seen {
        pool: pool.state.clone(),
        service: svc.name.clone(),
        colour,
        request_id: None,
    });

    let upgrade = if req.version() == Version::HTTP_11 && wants_upgrade(&req) {
        req.headers().get(header::UPGRADE).cloned()
    } else {
        None
    };
    let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
    let (parts, mut body) = req.into_parts();
    let framing = if body.is_end_stream() {
        BodyFraming::None
    } else if parts.headers.contains_key(header::CONTENT_LENGTH) && parts.version == Version::HTTP_11 {
        BodyFraming::Length
    } else {
        BodyFraming::Chunked
    };
    // The upstream request head, encoded once; a replay sends the same bytes again.
    let mut head = Vec::with_capacity(512);
    let generated = headers::encode_request(
        &mut head,
        &parts,
        &Forwarding {
            client_ip: &ctx.client_ip,
            proto: "http",
        },
        upgrade.as_ref(),
        framing,
    );
    if shared.config.access_log {
        if let Some(seen) = seen.as_mut() {
            seen.request_id = match &generated {
                Some(id) => Some(String::from_utf8_lossy(id).into_owned()),
                None => parts
                    .headers
                    .get(&headers::X_REQUEST_ID)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string),
            };
        }
    }
    let replayable = shared.config.retry_idempotent
        && upgrade.is_none()
        && framing == BodyFraming::None
        && is_idempotent(&parts.method);
    let req = Outgoing {
        head: &head,
        body: &mut body,
        framing,
        replayable,
        head_request: parts.method == Method::HEAD,
    };

    let gen = gen_guard.gen.clone();
    let sent = tokio::select! {
        biased;
        r = send(ctx, service_name, pool, colour, balance, req) => r,
        _ = crate::deadline::expired(&gen) => {
            return Err(ProxyError::DrainDeadline { service: service_name.to_string(), colour: colour.as_str() });
        }
    };
    let Sent {
        head: resp_head,
        conn,
        instance_id,
        addr,
        instance,
    } = sent?;

    let mut resp = Response::new(ProxyBody::empty());
    *resp.status_mut() = resp_head.status;
    *resp.headers_mut() = resp_head.headers;
    if resp_head.status == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_upgrade) = client_upgrade else {
            return Err(ProxyError::Upstream {
                service: service_name.to_string(),
                addr,
                reason: "switched protocols without being asked to".into(),
            });
        };
        let upstream = Prefixed {
            prefix: conn.buf.freeze(),
            io: conn.io,
        };
        spawn_tunnel(
            client_upgrade,
            upstream,
            Generation::into_upgraded(gen_guard),
            instance,
            OpenGuard::new(&ctx.shared),
        );
        return Ok(resp);
    }
    *resp.body_mut() = ProxyBody::streaming(Streaming {
        conn,
        framing: resp_head.framing,
        reusable: resp_head.keep_alive,
        instance_id,
        pool_size: shared.config.upstream_pool_size,
        gen: gen_guard,
        _instance: instance,
        _responding: crate::server::Responding::new(&ctx.activity),
        deadline: Default::default(),
    });
    Ok(resp)
}

fn wants_upgrade(req: &Request<Incoming>) -> bool {
    req.headers().contains_key(header::UPGRADE)
        && req.headers().get_all(header::CONNECTION).iter().any(|v| {
            v.to_str()
                .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
                .unwrap_or(false)
        })
}

/// A request on its way upstream: its encoded head and the client's body.
struct Outgoing<'a> {
    head: &'a [u8],
    body: &'a mut Incoming,
    framing: BodyFraming,
    /// Bodiless and idempotent: may be sent again if the connection breaks before an answer.
    replayable: bool,
    head_request: bool,
}

struct Sent {
    head: Head,
    conn: Conn,
    instance_id: u64,
    addr: SocketAddr,
    instance: InstanceGuard,
}

/// What became of one attempt on one connection.
enum Attempt {
    Answered(Head),
    /// Nothing reached the upstream, or it closed without answering a request that may be sent
    /// again: try another connection.
    Retry {
        reason: String,
        instance_failed: bool,
    },
    Failed(Failure),
}

/// Why an attempt failed for good; `send` names the service and instance.
enum Failure {
    Upstream(String),
    Timeout,
    /// The client's body broke off (disconnect, bad framing, wrong length).
    ClientBody,
}

/// Sends the request to an instance of the pool. A connect failure ejects the instance for a
/// moment and moves on to a sibling (nothing was sent). A pooled connection that turns out dead
/// before the request was written is replaced. A failure after the request was written is
/// final, unless the request is bodiless and idempotent.
async fn send(
    ctx: &ConnCtx,
    service: &Arc<str>,
    pool: &Pool,
    colour: Colour,
    balance: crate::table::Balance,
    mut req: Outgoing<'_>,
) -> Result<Sent, ProxyError> {
    let cfg = &ctx.shared.config;
    let mut skip: u64 = 0;
    let mut last: Option<ProxyError> = None;
    // Every instance once, plus a few for stale pooled connections.
    let max_attempts = pool.instances.len() + 3;
    for _ in 0..max_attempts {
        let Some(idx) = pool.pick(balance, skip, now_ms()) else {
            break;
        };
        let inst = &pool.instances[idx];
        let mut conn = match upstream::checkout(inst.id) {
            Some(c) => c,
            None => match upstream::connect(inst.addr, cfg.connect_timeout).await {
                Ok(c) => c,
                Err(e) => {
                    // Passive ejection: skip it for a while unless nothing else is left.
                    let until = now_ms() + cfg.connect_timeout.as_millis().max(1000) as u64 * 2;
                    inst.state
                        .ejected_until_ms
                        .store(until, std::sync::atomic::Ordering::Relaxed);
                    tracing::debug!(service = %service, %colour, addr = %inst.addr, error = %e, "connect failed, trying a sibling");
                    if idx < 64 {
                        skip |= 1 << idx;
                    }
                    last = Some(ProxyError::Connect {
                        service: service.to_string(),
                        addr: inst.addr,
                        reason: e.to_string(),
                    });
                    continue;
                }
            },
        };
        let guard = InstanceGuard::new(&inst.state);
        let reused = conn.reused;
        match attempt(&mut conn, &mut req, cfg.upstream_timeout).await {
            Attempt::Answered(head) => {
                return Ok(Sent {
                    head,
                    conn,
                    instance_id: inst.id,
                    addr: inst.addr,
                    instance: guard,
                });
            }
            Attempt::Retry {
                reason,
                instance_failed,
            } => {
                tracing::debug!(service = %service, %colour, addr = %inst.addr, error = %reason, reused, "upstream connection failed before answering; sending again");
                // A stale keep-alive connection says nothing about the instance; a fresh one does.
                if (instance_failed || !reused) && idx < 64 {
                    skip |= 1 << idx;
                }
                last = Some(ProxyError::Upstream {
                    service: service.to_string(),
                    addr: inst.addr,
                    reason,
                });
            }
            Attempt::Failed(Failure::Upstream(reason)) => {
                return Err(ProxyError::Upstream {
                    service: service.to_string(),
                    addr: inst.addr,
                    reason,
                });
            }
            Attempt::Failed(Failure::Timeout) => {
                return Err(ProxyError::Timeout {
                    service: service.to_string(),
                    addr: inst.addr,
                });
            }
            Attempt::Failed(Failure::ClientBody) => {
                return Err(ProxyError::BadRequest(
                    "the request body could not be read from the client",
                ));
            }
        }
    }
    Err(last.unwrap_or_else(|| ProxyError::NoInstance {
        service: service.to_string(),
        colour: colour.as_str(),
    }))
}

/// One try on one connection: write the head (and stream the body, watching for an early
/// answer), then wait for the response head within `timeout`.
async fn attempt(conn: &mut Conn, req: &mut Outgoing<'_>, timeout: std::time::Duration) -> Attempt {
    Hold::default().release(Side::Upstream).await;
    if let Err(e) = conn.io.write_all(req.head).await {
        // The head did not get through, so the upstream cannot act on it: safe to send again.
        return Attempt::Retry {
            reason: e.to_string(),
            instance_failed: false,
        };
    }
    let head_request = req.head_request;
    if req.framing == BodyFraming::None {
        return match tokio::time::timeout(
            timeout,
            crate::h1::read_head_from(&mut conn.io, &mut conn.buf, head_request),
        )
        .await
        {
            Ok(Ok(head)) => Attempt::Answered(head),
            // The send side decides from `reused` whether to blame the instance.
            Ok(Err(HeadError::ClosedBeforeResponse(e))) if req.replayable => Attempt::Retry {
                reason: e.to_string(),
                instance_failed: false,
            },
            Ok(Err(e)) => Attempt::Failed(Failure::Upstream(e.to_string())),
            Err(_) => Attempt::Failed(Failure::Timeout),
        };
    }

    // With a body: write it while watching for the response, which may come early (an upstream
    // refusing an upload answers before reading it all).
    let chunked = req.framing == BodyFraming::Chunked;
    let Conn { io, buf, .. } = conn;
    let (mut rd, mut wr) = io.split();
    let write = Conn::write_body(&mut wr, req.body, chunked);
    tokio::pin!(write);
    let mut early: Option<Head> = None;
    {
        let read = crate::h1::read_head_from(&mut rd, buf, head_request);
        tokio::pin!(read);
        tokio::select! {
            w = &mut write => match w {
                Ok(()) => {}
                Err(BodyWriteError::Client(e)) => {
                    tracing::debug!(error = %e, "the client's request body broke off");
                    return Attempt::Failed(Failure::ClientBody);
                }
                Err(BodyWriteError::Upstream(e)) => return Attempt::Failed(Failure::Upstream(e.to_string())),
            },
            h = &mut read => match h {
                Ok(head) => early = Some(head),
                Err(e) => return Attempt::Failed(Failure::Upstream(e.to_string())),
            },
        }
    }
    if let Some(mut head) = early {
        // Answered before the body was sent: the rest of the body stays unsent, so the
        // connection's framing is broken and it cannot be reused.
        head.keep_alive = false;
        return Attempt::Answered(head);
    }
    match tokio::time::timeout(timeout, crate::h1::read_head_from(&mut rd, buf, head_request)).await {
        Ok(Ok(head)) => Attempt::Answered(head),
        Ok(Err(e)) => Attempt::Failed(Failure::Upstream(e.to_string())),
        Err(_) => Attempt::Failed(Failure::Timeout),
    }
}

/// Joins the client's and the upstream's upgraded connections and copies bytes both ways until
/// either side closes, or until the colour's drain deadline plus a random offset within the
/// close window: spreading the closes keeps thousands of WebSocket clients from reconnecting in
/// the same instant.
fn spawn_tunnel(
    client: hyper::upgrade::OnUpgrade,
    mut upstream: Prefixed,
    guard: GenerationGuard,
    instance: InstanceGuard,
    open: OpenGuard,
) {
    tokio::spawn(async move {
        let client = match client.await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "client upgrade did not complete");
                return;
            }
        };
        let mut client = hyper_util::rt::TokioIo::new(client);
        let gen = guard.gen.clone();
        let deadline = async {
            crate::deadline::expired(&gen).await;
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
