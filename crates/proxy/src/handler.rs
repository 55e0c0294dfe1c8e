//! The request path: route, pick an instance, forward, stream back.
//!
//! A request reads the route table exactly once, when its head has arrived; everything after
//! that works from the `Arc`s it took from that snapshot, so a switch never changes the colour of
//! a request already routed. The path takes no lock: the table is an `ArcSwap` load, pools are
//! per worker, counters are atomics.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::Body;
use hyper::body::Incoming;
use tokio::io::AsyncWriteExt;

use crate::body::{InstanceGuard, ProxyBody, Streaming};
use crate::clock::{instant_in, millis};
use crate::conn::{ConnCtx, Responding};
use crate::error::ProxyError;
use crate::h1::{BodyWriteError, Conn, Head, HeadError, Prefixed};
use crate::headers::{self, BodyFraming, Forwarding, X_CUTOVER_PREVIEW};
use crate::pass::{Hold, Side};
use crate::table::{now_ms, Colour, Generation, GenerationGuard, Pool, PoolState, RouteTable, Service};
use crate::upstream;

pub(crate) async fn handle(
    ctx: Arc<ConnCtx>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, std::convert::Infallible> {
    let _busy = ctx.activity.request();
    let start = std::time::Instant::now();
    let cfg = &ctx.shared.config;
    crate::preempt::preempt_point(start, cfg.preempt_interval);
    let line = cfg
        .access_log
        .then(|| (req.method().clone(), req.uri().path().to_string()));
    // Set once the request has a colour; its counters get the outcome.
    let mut seen: Option<Seen> = None;
    let http1 = req.version() < Version::HTTP_2;
    let mut resp = match proxy(&ctx, req, &mut seen).await {
        Ok(mut resp) => {
            if let Some(sticky) = seen.as_mut().and_then(|s| s.sticky.take()) {
                (*sticky).answer(&mut resp);
            }
            resp
        }
        Err(e) => failure_response(&e, http1),
    };
    // Shutting down: an HTTP/1 client learns from this response to take its next request
    // elsewhere (see `conn::drive`); an upgrade goes on until the shutdown closes it.
    if http1 && ctx.shared.shutdown.is_cancelled() && resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    if let Some(seen) = &seen {
        if cfg.record_stats {
            seen.pool.stats.record(resp.status().as_u16(), start.elapsed());
        }
        if let Some(mirror) = &seen.mirrored {
            mirror.record_live(resp.status().as_u16(), start.elapsed());
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
    pub(crate) request_id: Option<String>,
    /// What affinity does to the response; boxed, so that a request without it carries one
    /// pointer's worth of `None`.
    pub(crate) sticky: Option<Box<StickyAnswer>>,
    /// The mirroring window that copied this request: it counts the live answer beside the copy's.
    pub(crate) mirrored: Option<Arc<crate::mirror::Mirror>>,
}

/// What affinity does to a routed request's response.
pub(crate) struct StickyAnswer {
    /// The affinity cookie to set, appended after the upstream's own `Set-Cookie` headers.
    set_cookie: Option<HeaderValue>,
    /// The table and service index whose affinity learns the application's session cookies
    /// from the response (with `app_cookie`), and the colour that answered.
    learn: Option<(Arc<RouteTable>, usize, Colour)>,
}

impl StickyAnswer {
    /// After routing: counts how affinity routed the request, and says what to do to its answer.
    /// Out of line, so that the request path without affinity stays as it was.
    #[inline(never)]
    fn after_routing(
        table: &Arc<RouteTable>,
        service: usize,
        colour: Colour,
        d: crate::affinity::Decision,
        tls: bool,
    ) -> Option<Box<StickyAnswer>> {
        let svc = &table.services()[service];
        let affinity = svc.affinity.as_ref()?;
        if d.colour != colour {
            return None;
        }
        affinity.count(&d);
        let set_cookie = if d.mint {
            let value = affinity.mint_value(
                &svc.name,
                colour,
                svc.pool(colour).version.as_deref(),
                crate::affinity::unix_now(),
            );
            affinity.set_cookie(&value, tls)
        } else {
            None
        };
        // With `app_cookie`: the response may begin an application session on this colour.
        let learn = affinity
            .app_sessions()
            .is_some()
            .then(|| (table.clone(), service, colour));
        if set_cookie.is_none() && learn.is_none() {
            return None;
        }
        Some(Box::new(StickyAnswer { set_cookie, learn }))
    }

    #[inline(never)]
    fn answer(self, resp: &mut Response<ProxyBody>) {
        if let Some((table, i, colour)) = &self.learn {
            let svc = &table.services()[*i];
            if let Some(a) = &svc.affinity {
                a.learn_app_cookies(svc, *colour, resp.headers(), crate::affinity::unix_now());
            }
        }
        if let Some(cookie) = self.set_cookie {
            resp.headers_mut().append(header::SET_COOKIE, cookie);
        }
    }
}

/// The colour `X-Cutover-Colour` names, if it names one.
fn colour_of(map: &http::HeaderMap) -> Option<Colour> {
    let v = map.get(&headers::X_CUTOVER_COLOUR)?.as_bytes();
    if v.eq_ignore_ascii_case(b"blue") {
        Some(Colour::Blue)
    } else if v.eq_ignore_ascii_case(b"green") {
        Some(Colour::Green)
    } else {
        None
    }
}

/// Routes a live request of a service with affinity (out of line, see [`StickyAnswer`]).
#[inline(never)]
fn sticky_route(
    affinity: &crate::affinity::Affinity,
    svc: &Service,
    headers: &http::HeaderMap,
) -> (Colour, bool, Option<crate::affinity::Decision>) {
    let d = affinity.route(svc, headers, crate::affinity::unix_now(), now_ms());
    (d.colour, true, Some(d))
}

/// The answer to a request that failed, as the client receives it.
pub(crate) fn failure_response(e: &ProxyError, http1: bool) -> Response<ProxyBody> {
    let mut resp = error_response(e);
    // A refused request's body was not read, and a refused CONNECT's client may already be
    // sending tunnel bytes: nothing after it on the connection can be taken as a request.
    if http1 && matches!(e, ProxyError::BadRequest(_) | ProxyError::NotImplemented(_)) {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    if matches!(e, ProxyError::Paused { .. }) {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
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

/// Refuses what cutover does not pass on faithfully, before anything is routed: CONNECT (a
/// reverse proxy opens no tunnels to hosts its clients name) and transfer codings other than
/// one `chunked` (hyper removes the chunked coding; a `gzip, chunked` body would reach the
/// upstream as plain chunked with its gzip coding lost). RFC 9112 §6.1 asks for 501 for a coding
/// a server does not understand; `chunked` twice is malformed (400).
pub(crate) fn refuse_unsupported(parts: &http::request::Parts) -> Result<(), ProxyError> {
    if parts.method == Method::CONNECT {
        return Err(ProxyError::NotImplemented(
            "CONNECT is not supported by this reverse proxy",
        ));
    }
    let mut chunked = 0;
    for v in parts.headers.get_all(header::TRANSFER_ENCODING) {
        let Ok(v) = v.to_str() else {
            return Err(ProxyError::NotImplemented(
                "only the chunked transfer coding is supported",
            ));
        };
        for coding in v.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            if !coding.eq_ignore_ascii_case("chunked") {
                return Err(ProxyError::NotImplemented(
                    "only the chunked transfer coding is supported",
                ));
            }
            chunked += 1;
        }
    }
    if chunked > 1 {
        return Err(ProxyError::BadRequest(
            "the chunked transfer coding is applied more than once",
        ));
    }
    Ok(())
}

fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Where a request goes: the table snapshot it keeps to its end, its service there (an index),
/// its colour and its count in that colour's generation.
struct Routed {
    table: Arc<RouteTable>,
    service: usize,
    colour: Colour,
    gen: GenerationGuard,
    /// How affinity routed it, for a live request of a service that has affinity.
    sticky: Option<crate::affinity::Decision>,
    /// Routed as live traffic (not by a preview token or listener).
    live: bool,
}

/// Routes a request on `table` (just loaded from `current`) and counts it in.
///
/// A drain rotates a colour to a new generation in a new table, then waits for the old
/// generation's count to reach zero. A request that loaded the table before that store and counts
/// itself in after the drain looked would run on the drained colour unseen. So once counted, the
/// request checks whether its generation is being drained (the ordering that makes this enough is
/// on `Generation::enter_request`); if so it routes again on the table the drain stored. Twice
/// at most: a third drain of the same colour within these few instructions is not waited out.
fn enter(
    current: &arc_swap::ArcSwap<RouteTable>,
    mut table: Arc<RouteTable>,
    host: Option<&str>,
    plain: bool,
    colour_of: impl Fn(&Service) -> (Colour, bool, Option<crate::affinity::Decision>),
) -> Result<Entered, ProxyError> {
    let mut reloads = 0;
    loop {
        let service = table.route_index(host).ok_or(ProxyError::NoRoute)?;
        let svc = &table.services()[service];
        let (colour, live, sticky) = colour_of(svc);
        if let (true, true, Some(port)) = (live, plain, svc.https_redirect) {
            return Ok(Entered::ToHttps(port));
        }
        // Held before it counts anywhere: a held request is in no colour's drain.
        if let (true, Some(hold)) = (live, &svc.hold) {
            return Ok(Entered::Held(svc.name.clone(), hold.clone()));
        }
        let gen = svc.pool(colour).generation.enter_request();
        if !gen.gen.is_draining() || reloads == 2 {
            return Ok(Entered::Routed(Routed {
                table,
                service,
                colour,
                gen,
                sticky,
                live,
            }));
        }
        drop(gen);
        reloads += 1;
        table = current.load_full();
    }
}

/// Where `enter` put a request.
enum Entered {
    Routed(Routed),
    /// The service's live route is held (`crate::table::Hold`).
    Held(Arc<str>, crate::table::Hold),
    /// The request came over plain HTTP for a service that redirects to HTTPS on this port.
    ToHttps(u16),
}

/// `308` to the same URL over HTTPS: the host the request was routed by (without its port),
/// `port` unless it is 443, and the path and query.
fn to_https(authority: &str, uri: &http::Uri, port: u16) -> Response<ProxyBody> {
    // IPv6 hosts keep their brackets.
    let host = headers::host_of(authority);
    if host.is_empty() {
        return error_response(&ProxyError::BadRequest(
            "this service is served over HTTPS; send the request with a Host to be redirected there",
        ));
    }
    let port = if port == 443 { String::new() } else { format!(":{port}") };
    let path = uri.path_and_query().map_or("/", |pq| pq.as_str());
    let path = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    };
    let location = format!("https://{host}{port}{path}");
    let mut resp = Response::new(ProxyBody::full(format!("moved to {location}\n")));
    *resp.status_mut() = StatusCode::PERMANENT_REDIRECT;
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// The answer to a request of a service in maintenance: 503 with the page's message, and
/// `Retry-After`.
fn maintenance_page(service: &str, page: &crate::table::MaintenancePage) -> Response<ProxyBody> {
    let escaped: String = page
        .message
        .chars()
        .map(|c| match c {
            '<' => "&lt;".to_string(),
            '>' => "&gt;".to_string(),
            '&' => "&amp;".to_string(),
            '"' => "&quot;".to_string(),
            c => c.to_string(),
        })
        .collect();
    let body = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>Maintenance</title></head>\n<body><h1>Down for maintenance</h1><p>{escaped}</p></body></html>\n"
    );
    let mut resp = Response::new(ProxyBody::full(body));
    *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::RETRY_AFTER,
        HeaderValue::from(page.retry_after.as_secs().max(1)),
    );
    if let Ok(v) = HeaderValue::from_str(service) {
        h.insert("x-cutover-maintenance", v);
    }
    resp
}

// With `hyper-upstream`, the exchange below the routing goes through `crate::hyper_upstream`,
// and what follows its `return` is not reached (it still compiles).
#[cfg_attr(feature = "hyper-upstream", allow(unreachable_code, unused_mut, unused_variables))]
async fn proxy(
    ctx: &Arc<ConnCtx>,
    req: Request<Incoming>,
    seen: &mut Option<Seen>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let shared = &ctx.shared;

    let (mut parts, mut body) = req.into_parts();
    refuse_unsupported(&parts)?;
    let upgrade = if parts.version == Version::HTTP_11 && wants_upgrade(&parts) {
        parts.headers.get(header::UPGRADE).cloned()
    } else {
        None
    };
    let client_upgrade = match upgrade {
        Some(_) => parts.extensions.remove::<hyper::upgrade::OnUpgrade>(),
        None => None,
    };
    let authority =
        headers::target_authority(&parts.uri, &parts.headers, parts.version).map_err(ProxyError::BadRequest)?;

    // One table load per request (two if a drain began meanwhile, see `enter`). The request
    // keeps this snapshot (one reference count) to the end, so its colour and pool cannot change
    // under it whatever is stored meanwhile.
    let preview_header = parts.headers.get(&X_CUTOVER_PREVIEW);
    let request_headers = &parts.headers;
    let route = || {
        enter(
            &shared.table,
            shared.table.load_full(),
            Some(headers::host_of(authority)),
            !ctx.tls,
            |svc| {
                let preview = preview_header.is_some_and(|v| svc.preview_matches(v.as_bytes()));
                // Looked at only with a valid token: no work on the request path otherwise.
                if let Some(colour) = preview.then(|| colour_of(request_headers)).flatten() {
                    // An instance calling a peer of its own colour: counted as live when it is.
                    (colour, colour == svc.active, None)
                } else if ctx.preview_listener || preview {
                    (svc.active.other(), false, None)
                } else if let Some(affinity) = &svc.affinity {
                    sticky_route(affinity, svc, request_headers)
                } else {
                    (svc.live_colour(), true, None)
                }
            },
        )
    };
    let Routed {
        table,
        service,
        colour,
        gen: gen_guard,
        sticky,
        live,
    } = loop {
        match route()? {
            Entered::Routed(r) => break r,
            Entered::ToHttps(port) => return Ok(to_https(authority, &parts.uri, port)),
            Entered::Held(name, crate::table::Hold::Maintenance(page)) => return Ok(maintenance_page(&name, &page)),
            // Routed again once the pause ends; past its longest wait, refused.
            Entered::Held(name, crate::table::Hold::Paused(gate)) => {
                if !gate.wait().await {
                    return Err(ProxyError::Paused {
                        service: name.to_string(),
                    });
                }
            }
        }
    };
    let svc = &table.services()[service];
    let pool = svc.pool(colour);
    let (service_name, balance) = (&svc.name, svc.balance);
    let sticky = match sticky {
        Some(d) => StickyAnswer::after_routing(&table, service, colour, d, ctx.tls),
        None => None,
    };
    *seen = Some(Seen {
        pool: pool.state.clone(),
        service: svc.name.clone(),
        colour,
        request_id: None,
        sticky,
        mirrored: None,
    });

    let framing = body_framing(&parts, &body);
    #[cfg(feature = "hyper-upstream")]
    return crate::hyper_upstream::forward(
        crate::hyper_upstream::Forward {
            ctx,
            parts: &parts,
            body,
            authority,
            framing,
            upgrade,
            client_upgrade,
            service: service_name,
            pool,
            colour,
            balance,
            tls: svc.upstream_tls.as_deref(),
            gen: gen_guard,
        },
        seen,
    )
    .await;
    // The upstream request head, encoded once; a replay sends the same bytes again.
    let mut head = Vec::with_capacity(512);
    let generated = headers::encode_request(
        &mut head,
        &parts,
        &Forwarding {
            client_ip: &ctx.client_ip,
            proto: if ctx.tls { "https" } else { "http" },
            trusted: ctx.trusted,
            authority,
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
    // A copy for the colour being validated, if this request is in the sample (`crate::mirror`).
    if let (true, Some(mirror)) = (live, &svc.mirror) {
        if upgrade.is_none() && !framing.has_body() && mirror.samples(&parts.method, colour) {
            let head_request = parts.method == Method::HEAD;
            if crate::mirror::copy(mirror, shared, &table, service, &head, head_request) {
                if let Some(seen) = seen.as_mut() {
                    seen.mirrored = Some(mirror.clone());
                }
            }
        }
    }
    let replayable =
        shared.config.retry_idempotent && upgrade.is_none() && !framing.has_body() && is_idempotent(&parts.method);
    let req = Outgoing {
        head: &head,
        body: Some(&mut body),
        framing,
        replayable,
        head_request: parts.method == Method::HEAD,
    };

    let gen = gen_guard.gen.clone();
    let tls = svc.upstream_tls.as_deref();
    let sent = tokio::select! {
        biased;
        r = send(&shared.config, service_name, pool, colour, balance, tls, req) => r,
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
    } = sent.map_err(|e| name_missing_release(e, svc))?;

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
        let websocket = resp
            .headers()
            .get(header::UPGRADE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
        spawn_tunnel(
            client_upgrade,
            upstream,
            websocket,
            Generation::into_upgraded(gen_guard),
            instance,
            ctx.clone(),
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
        _responding: Responding::new(&ctx.activity),
        deadline: Default::default(),
        cut_at: None,
    });
    Ok(resp)
}

/// How the client's body goes upstream. hyper knows the length when the client declared a valid
/// one (HTTP/1 Content-Length, or HTTP/2 content-length, which it enforces against the DATA
/// frames); the upstream gets it as declared. Otherwise the body goes upstream chunked.
pub(crate) fn body_framing(parts: &http::request::Parts, body: &Incoming) -> BodyFraming {
    if body.is_end_stream() {
        // An empty body declared as such keeps its `Content-Length: 0` where the method gives a
        // body meaning (a POST or PUT without one may be refused with 411 otherwise).
        if parts.method != Method::GET
            && parts.method != Method::HEAD
            && parts.headers.contains_key(header::CONTENT_LENGTH)
        {
            BodyFraming::Length(0)
        } else {
            BodyFraming::None
        }
    } else if let Some(n) = body.size_hint().exact() {
        BodyFraming::Length(n)
    } else {
        BodyFraming::Chunked
    }
}

pub(crate) fn wants_upgrade(parts: &http::request::Parts) -> bool {
    parts.headers.contains_key(header::UPGRADE)
        && parts.headers.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str()
                .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
                .unwrap_or(false)
        })
}

/// A request on its way upstream: its encoded head and the client's body (none for a copy made
/// by mirroring, which is sent only for a request without one).
pub(crate) struct Outgoing<'a> {
    pub(crate) head: &'a [u8],
    pub(crate) body: Option<&'a mut Incoming>,
    pub(crate) framing: BodyFraming,
    /// Bodiless and idempotent: may be sent again if the connection breaks before an answer.
    pub(crate) replayable: bool,
    pub(crate) head_request: bool,
}

pub(crate) struct Sent {
    pub(crate) head: Head,
    pub(crate) conn: Conn,
    pub(crate) instance_id: u64,
    pub(crate) addr: SocketAddr,
    pub(crate) instance: InstanceGuard,
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
pub(crate) async fn send(
    cfg: &crate::ProxyConfig,
    service: &Arc<str>,
    pool: &Pool,
    colour: Colour,
    balance: crate::table::Balance,
    tls: Option<&crate::UpstreamTls>,
    mut req: Outgoing<'_>,
) -> Result<Sent, ProxyError> {
    let tls_id = tls.map_or(0, |t| t.id());
    let mut skip: u64 = 0;
    let mut last: Option<ProxyError> = None;
    // Every instance once, plus a few for stale pooled connections.
    let max_attempts = pool.instances.len() + 3;
    for _ in 0..max_attempts {
        let Some(idx) = pool.pick(balance, skip, now_ms()) else {
            break;
        };
        let inst = &pool.instances[idx];
        // Counted from the pick on, so that an instance whose connects hang (a full backlog, a
        // host dropping SYNs) shows its waiting requests to the next pick instead of looking idle.
        let guard = InstanceGuard::new(&inst.state);
        let mut conn = match upstream::checkout(inst.id, tls_id, cfg.upstream_idle_timeout) {
            Some(c) => c,
            None => match upstream::connect(inst.addr, cfg, tls).await {
                Ok(c) => c,
                Err(e) if e.is_local() => {
                    // This host is short of descriptors, memory or ports: a sibling would fail
                    // the same way, and the instance is not to blame.
                    tracing::warn!(service = %service, %colour, addr = %inst.addr, error = %e, "no upstream connection could be opened on this host");
                    return Err(ProxyError::Local {
                        service: service.to_string(),
                        reason: e.to_string(),
                    });
                }
                Err(e) => {
                    // Passive ejection: skip it for a while unless nothing else is left.
                    let now = now_ms();
                    let was_ejected = inst.is_ejected(now);
                    let until = now.saturating_add(millis(cfg.connect_timeout).max(1000).saturating_mul(2));
                    inst.state
                        .ejected_until_ms
                        .store(until, std::sync::atomic::Ordering::Relaxed);
                    if e.is_tls() && !was_ejected {
                        // A certificate or protocol mismatch is a configuration fault to fix, not
                        // a passing one: said at warning level, once per ejection of the instance.
                        tracing::warn!(service = %service, %colour, addr = %inst.addr, error = %e, "TLS to an upstream instance failed; it is skipped for a moment and a sibling is tried");
                    } else {
                        tracing::debug!(service = %service, %colour, addr = %inst.addr, error = %e, "connect failed, trying a sibling");
                    }
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

/// A service with no instance on either colour has never had a release: say so, rather than
/// blame the colour. Only failed requests pay for the check.
fn name_missing_release(e: ProxyError, svc: &crate::table::Service) -> ProxyError {
    match e {
        ProxyError::NoInstance { service, .. } if svc.blue.instances.is_empty() && svc.green.instances.is_empty() => {
            ProxyError::NoRelease { service }
        }
        e => e,
    }
}

/// One try on one connection: write the head (and stream the body, watching for an early
/// answer), then wait for the response head within `timeout`.
async fn attempt(conn: &mut Conn, req: &mut Outgoing<'_>, timeout: Duration) -> Attempt {
    Hold::default().release(Side::Upstream).await;
    // The flush sends what TLS may hold back; on plain TCP it returns at once.
    let head_sent = match conn.io.write_all(req.head).await {
        Ok(()) => conn.io.flush().await,
        Err(e) => Err(e),
    };
    if let Err(e) = head_sent {
        // The head did not get through, so the upstream cannot act on it: safe to send again.
        return Attempt::Retry {
            reason: e.to_string(),
            instance_failed: false,
        };
    }
    let head_request = req.head_request;
    if !req.framing.has_body() {
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
    let chunked = matches!(req.framing, BodyFraming::Chunked);
    let Some(body) = req.body.as_deref_mut() else {
        return Attempt::Failed(Failure::ClientBody);
    };
    let Conn { io, buf, .. } = conn;
    let (mut rd, mut wr) = io.split();
    let write = Conn::write_body(&mut wr, body, chunked, timeout);
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
                Err(BodyWriteError::UpstreamStalled) => return Attempt::Failed(Failure::Timeout),
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
/// both sides close, or until a random instant of a close window: the drain window after the
/// colour's drain deadline, or the shutdown window (see [`shutdown_close_window`]) after a shutdown begins,
/// whichever instant comes first. Spreading the closes keeps thousands of WebSocket clients from
/// reconnecting in the same instant. How a tunnel is closed: `crate::tunnel`.
pub(crate) fn spawn_tunnel<U>(
    client: hyper::upgrade::OnUpgrade,
    upstream: U,
    websocket: bool,
    guard: GenerationGuard,
    instance: InstanceGuard,
    conn: Arc<ConnCtx>,
) where
    U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    tokio::spawn(async move {
        let client = match client.await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "client upgrade did not complete");
                return;
            }
        };
        let client = hyper_util::rt::TokioIo::new(client);
        let gen = guard.gen.clone();
        let shared = &conn.shared;
        let close = async {
            // An instant drawn at random within `window` from now.
            let draw = |window: Duration| {
                let offset = crate::headers::random_u64() % millis(window).max(1);
                instant_in(Duration::from_millis(offset))
            };
            // The earliest close instant drawn so far (none yet: for ever), and, once a shutdown
            // has begun, the instant its workers stop waiting, which the closing must not outlast.
            let mut at = instant_in(Duration::MAX);
            let mut stop = None;
            let (mut drained, mut shutting_down) = (false, false);
            loop {
                tokio::select! {
                    _ = crate::deadline::expired(&gen), if !drained => {
                        drained = true;
                        let window = gen.close_window_ms.load(std::sync::atomic::Ordering::Relaxed);
                        at = at.min(draw(Duration::from_millis(window)));
                    }
                    _ = shared.shutdown.cancelled(), if !shutting_down => {
                        shutting_down = true;
                        let timeout = shared.config.shutdown_timeout;
                        stop = Some(instant_in(timeout));
                        at = at.min(draw(shutdown_close_window(timeout)));
                    }
                    _ = tokio::time::sleep_until(at) => break,
                }
            }
            let end = at + crate::tunnel::CLOSE_GRACE;
            stop.map_or(end, |stop| end.min(stop))
        };
        crate::tunnel::run(client, upstream, websocket, close).await;
        drop(instance);
        drop(guard);
        // Last: the client connection's slot (`max_connections`) and its count for shutdown.
        drop(conn);
    });
}

/// The window over which the tunnels still open at shutdown are closed: the first half of what
/// `shutdown_timeout` leaves after a tunnel's closing grace (`crate::tunnel::CLOSE_GRACE`), so
/// that the last of them has closed well before the workers stop waiting.
fn shutdown_close_window(shutdown_timeout: Duration) -> Duration {
    shutdown_timeout.saturating_sub(crate::tunnel::CLOSE_GRACE) / 2
}

#[cfg(test)]
mod tests {
    use super::*;

    fn as_routed(e: Entered) -> Routed {
        match e {
            Entered::Routed(r) => r,
            Entered::Held(name, _) => panic!("service {name} is held"),
            Entered::ToHttps(port) => panic!("redirected to HTTPS on {port}"),
        }
    }
    use crate::table::Instance;
    use crate::{Proxy, ProxyConfig};

    fn one_service() -> RouteTable {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mut s = Service::new("web");
        s.blue = Pool::new(Some("v1"), vec![Instance::new(addr)]);
        s.green = Pool::new(Some("v2"), vec![Instance::new(addr)]);
        RouteTable::new(vec![s]).unwrap()
    }

    /// The window `enter` closes: a request loads the table, a switch and a drain of the old
    /// colour run to completion (nothing is counted yet), then the request counts itself in.
    #[tokio::test]
    async fn a_request_routed_on_a_table_from_before_a_drain_is_routed_again() {
        let proxy = Proxy::start(ProxyConfig::default(), one_service()).unwrap();
        let current = &proxy.shared().table;
        let stale = current.load_full();
        let drained = stale.services()[0].blue.generation().clone();
        proxy.switch("web", Colour::Green).unwrap();
        let report = proxy
            .drain("web", Colour::Blue, Duration::from_secs(1), Duration::ZERO)
            .await
            .unwrap();
        assert!(report.completed, "nothing was counted in when the drain looked");

        // Live traffic: blue on the old table, whose generation is drained; routed again, green.
        let routed = as_routed(enter(current, stale.clone(), None, true, |s| (s.active, true, None)).unwrap());
        assert_eq!(routed.colour, Colour::Green);
        assert!(Arc::ptr_eq(&routed.table, &current.load_full()));
        assert!(Arc::ptr_eq(
            &routed.gen.gen,
            current.load().services()[0].green.generation()
        ));
        assert_eq!(routed.gen.gen.in_flight(), 1);
        assert_eq!(drained.in_flight(), 0, "the drained generation lets go of the request");
        drop(routed);

        // A generation that is not being drained keeps the request on the table it loaded.
        let routed = as_routed(enter(current, stale.clone(), None, true, |s| (s.active.other(), false, None)).unwrap());
        assert_eq!(routed.colour, Colour::Green);
        assert!(Arc::ptr_eq(&routed.table, &stale));
        assert_eq!(routed.gen.gen.in_flight(), 1);
        proxy.shutdown();
    }
}
