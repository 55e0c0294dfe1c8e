//! The upstream exchange through hyper's HTTP/1.1 client, for measuring the inline client in
//! `h1.rs` against it. Built only with the `hyper-upstream` feature (`cargo build --release -p
//! cutover --features hyper-upstream`); the default build has none of this.
//!
//! Everything around the exchange stays as in the default build: the same routing, instance pick,
//! ejection on connect failures and retries, the same per-worker pools keyed by instance id (here
//! holding hyper's `SendRequest` instead of an `h1::Conn`), the same request headers (built by
//! [`request_headers`] into a header map, where the default build encodes them straight into
//! bytes), and upstream writes held to the end of the worker's pass (`crate::pass`). What differs
//! is who speaks HTTP/1.1 to the upstream: each connection is a `hyper::client::conn::http1`
//! connection whose future is spawned on the worker's runtime, the request goes to it through its
//! `SendRequest`, and the response body comes back as hyper's `Incoming`.
//!
//! The A/B run: `CONTENDERS="cutover cutover-alt haproxy" ALT_BIN=<this build> bench/throughput.sh`
//! (see BENCHMARKS.md, "Upstream client: inline against hyper's").
//!
//! What this path does not do as the default build does:
//! - the upstream timeout runs from the start of the exchange to the response head, so it also
//!   counts the time a client takes to send its body: a client slower than `upstream_timeout` with
//!   its upload gets 504 (the default build times only an upstream that takes none of the body,
//!   and the wait for the head after it);
//! - an answer that arrives before the request body was sent is hyper's to handle (the default
//!   build stops sending the body and does not reuse the connection);
//! - the response head is parsed by hyper into its own header map, and the hop-by-hop headers are
//!   removed from that map afterwards, instead of being left out while parsing.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::body::{BodyError, InstanceGuard, ProxyBody};
use crate::clock::millis;
use crate::conn::{ConnCtx, Responding};
use crate::deadline::Registration;
use crate::error::ProxyError;
use crate::handler::Seen;
use crate::headers::{self, BodyFraming, Forwarding};
use crate::pass::{Hold, Side};
use crate::table::{now_ms, Balance, Colour, Generation, GenerationGuard, Pool};
use crate::upstream;

/// The request body as hyper sends it: the client's, or none (a bodiless request can be built
/// again for a replay; the client's body cannot).
type UpBody = Either<Incoming, Empty<Bytes>>;
type Sender = SendRequest<UpBody>;

struct Idle {
    sender: Sender,
    /// As `h1::Conn::tls_id`: the TLS settings the connection was made with, 0 for plain.
    tls_id: u64,
    since: Instant,
}

thread_local! {
    static POOLS: RefCell<HashMap<u64, Vec<Idle>>> = RefCell::new(HashMap::new());
}

/// As `upstream::checkout`: a connection to the instance that is still open and not idle past
/// `max_idle`. hyper's connection task watches the idle socket, so a closed one shows as closed.
fn checkout(instance: u64, tls_id: u64, max_idle: Duration) -> Option<Sender> {
    POOLS.with(|p| {
        let mut pools = p.borrow_mut();
        let idle = pools.get_mut(&instance)?;
        while let Some(c) = idle.pop() {
            if c.tls_id == tls_id && c.since.elapsed() < max_idle && !c.sender.is_closed() {
                return Some(c.sender);
            }
        }
        None
    })
}

fn checkin(instance: u64, tls_id: u64, sender: Sender, max_idle: usize) {
    POOLS.with(|p| {
        let mut pools = p.borrow_mut();
        let idle = pools.entry(instance).or_default();
        if idle.len() < max_idle {
            idle.push(Idle {
                sender,
                tls_id,
                since: Instant::now(),
            });
        }
    })
}

/// As `upstream::close_idle`, for this path's pools.
pub(crate) fn close_idle(instances: &[u64]) {
    POOLS.with(|p| {
        let mut pools = p.borrow_mut();
        for id in instances {
            pools.remove(id);
        }
    })
}

/// As `upstream::sweep`, for this path's pools.
pub(crate) fn sweep(max_idle: Duration) {
    let now = Instant::now();
    POOLS.with(|p| {
        let mut pools = p.borrow_mut();
        pools.retain(|_, idle| {
            idle.retain(|c| now.duration_since(c.since) < max_idle && !c.sender.is_closed());
            !idle.is_empty()
        });
    })
}

/// The upstream socket, its writes held to the end of the worker's pass as the default build's
/// request writes are.
struct HeldUpstream {
    io: crate::upstream_io::UpstreamIo,
    hold: Hold,
}

impl AsyncRead for HeldUpstream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for HeldUpstream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.hold.poll_release(Side::Upstream, cx));
        Pin::new(&mut this.io).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Opens a connection as the default build does (`upstream::connect`), hands it to hyper and
/// spawns hyper's connection future on this worker.
async fn connect(
    addr: std::net::SocketAddr,
    cfg: &crate::ProxyConfig,
    tls: Option<&crate::UpstreamTls>,
) -> Result<Sender, upstream::ConnectError> {
    let conn = upstream::connect(addr, cfg, tls).await?;
    let io = TokioIo::new(HeldUpstream {
        io: conn.io,
        hold: Hold::default(),
    });
    let (sender, connection) = hyper::client::conn::http1::Builder::new()
        // As the server side: one flattened send() per head instead of writev().
        .writev(false)
        .handshake(io)
        .await
        .map_err(|e| upstream::ConnectError::Refused(io::Error::other(e)))?;
    tokio::spawn(async move {
        if let Err(e) = connection.with_upgrades().await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    });
    Ok(sender)
}

/// The headers `headers::encode_request` writes, as a header map for hyper: the client's without
/// hop-by-hop ones and the preview token, then Host, the forwarding headers, a request id (kept
/// or `made`), the upgrade, and the body's framing.
pub(crate) fn request_headers(
    parts: &Parts,
    fwd: &Forwarding<'_>,
    upgrade: Option<&HeaderValue>,
    body: BodyFraming,
    made: Option<&[u8; 32]>,
) -> HeaderMap {
    let named = if parts.headers.contains_key(header::CONNECTION) {
        headers::named_in_connection(parts)
    } else {
        Vec::new()
    };
    let mut out = HeaderMap::with_capacity(parts.headers.len() + 8);
    let mut xff: Option<Vec<u8>> = None;
    let mut request_id_kept = false;
    for (name, value) in &parts.headers {
        if headers::is_hop_by_hop(name) || (!named.is_empty() && named.contains(name)) {
            continue;
        }
        if name == header::HOST
            || name == headers::X_FORWARDED_PROTO
            || name == headers::X_FORWARDED_HOST
            || name == header::CONTENT_LENGTH
        {
            continue;
        } else if name == headers::X_FORWARDED_FOR {
            if !fwd.trusted {
                continue;
            }
            let chain = xff.get_or_insert_with(Vec::new);
            chain.extend_from_slice(value.as_bytes());
            chain.extend_from_slice(b", ");
            continue;
        } else if name == headers::X_REQUEST_ID {
            if made.is_some() || request_id_kept || !sane_request_id(value) {
                continue;
            }
            request_id_kept = true;
        }
        out.append(name.clone(), value.clone());
    }
    out.append(header::HOST, value_of(fwd.authority.as_bytes()));
    let xff = match xff {
        Some(mut chain) => {
            chain.extend_from_slice(fwd.client_ip.as_bytes());
            value_of(&chain)
        }
        None => fwd.client_ip.clone(),
    };
    out.append(headers::X_FORWARDED_FOR.clone(), xff);
    let claimed = |name: &http::HeaderName| {
        fwd.trusted
            .then(|| parts.headers.get(name))
            .flatten()
            .filter(|v| !v.is_empty())
            .cloned()
    };
    out.append(
        headers::X_FORWARDED_PROTO.clone(),
        claimed(&headers::X_FORWARDED_PROTO).unwrap_or(HeaderValue::from_static(fwd.proto)),
    );
    match claimed(&headers::X_FORWARDED_HOST) {
        Some(host) => {
            out.append(headers::X_FORWARDED_HOST.clone(), host);
        }
        None if !fwd.authority.is_empty() => {
            out.append(headers::X_FORWARDED_HOST.clone(), value_of(fwd.authority.as_bytes()));
        }
        None => {}
    }
    if let Some(id) = made {
        out.append(headers::X_REQUEST_ID.clone(), value_of(id));
    }
    if let Some(proto) = upgrade {
        out.append(header::CONNECTION, HeaderValue::from_static("upgrade"));
        out.append(header::UPGRADE, proto.clone());
    }
    match body {
        BodyFraming::None => {}
        BodyFraming::Length(n) => {
            out.append(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        BodyFraming::Chunked => {
            out.append(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        }
    }
    out
}

/// A value made of bytes that came from valid header values (or the proxy's own): always valid.
fn value_of(bytes: &[u8]) -> HeaderValue {
    HeaderValue::from_bytes(bytes).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Whether the client's request id is kept (as `encode_request` decides): one that is present,
/// not empty, at most `MAX_REQUEST_ID` bytes and visible ASCII only.
fn keeps_request_id(parts: &Parts) -> bool {
    parts
        .headers
        .get_all(&headers::X_REQUEST_ID)
        .iter()
        .any(sane_request_id)
}

fn sane_request_id(v: &HeaderValue) -> bool {
    v.len() <= headers::MAX_REQUEST_ID && !v.is_empty() && v.as_bytes().iter().all(|b| b.is_ascii_graphic())
}

/// Everything the request path hands over once the request is routed.
pub(crate) struct Forward<'a> {
    pub(crate) ctx: &'a Arc<ConnCtx>,
    pub(crate) parts: &'a Parts,
    pub(crate) body: Incoming,
    pub(crate) authority: &'a str,
    pub(crate) framing: BodyFraming,
    pub(crate) upgrade: Option<HeaderValue>,
    pub(crate) client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    pub(crate) service: &'a Arc<str>,
    pub(crate) pool: &'a Pool,
    pub(crate) colour: Colour,
    pub(crate) balance: Balance,
    pub(crate) tls: Option<&'a crate::UpstreamTls>,
    pub(crate) gen: GenerationGuard,
}

/// The request path from the routed request to the response, through hyper's client. With the
/// access log on, the request's id goes into `seen`.
pub(crate) async fn forward(f: Forward<'_>, seen: &mut Option<Seen>) -> Result<Response<ProxyBody>, ProxyError> {
    let Forward {
        ctx,
        parts,
        body,
        authority,
        framing,
        upgrade,
        client_upgrade,
        service,
        pool,
        colour,
        balance,
        tls,
        gen: gen_guard,
    } = f;
    let shared = &ctx.shared;
    let made = (!keeps_request_id(parts)).then(headers::new_request_id);
    if let Some(seen) = seen.as_mut().filter(|_| shared.config.access_log) {
        seen.request_id = match &made {
            Some(id) => Some(String::from_utf8_lossy(id).into_owned()),
            None => parts
                .headers
                .get(&headers::X_REQUEST_ID)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
        };
    }
    let fwd = Forwarding {
        client_ip: &ctx.client_ip,
        proto: if ctx.tls { "https" } else { "http" },
        trusted: ctx.trusted,
        authority,
    };
    let build = |body: UpBody| -> Request<UpBody> {
        let mut req = Request::new(body);
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = match parts.uri.path_and_query() {
            Some(pq) if !pq.as_str().is_empty() => http::Uri::from(pq.clone()),
            _ => http::Uri::from_static("/"),
        };
        *req.version_mut() = Version::HTTP_11;
        *req.headers_mut() = request_headers(parts, &fwd, upgrade.as_ref(), framing, made.as_ref());
        req
    };
    let has_body = framing.has_body();
    let first = build(if has_body {
        Either::Left(body)
    } else {
        Either::Right(Empty::new())
    });
    let replayable = shared.config.retry_idempotent && upgrade.is_none() && !has_body && is_idempotent(&parts.method);

    let gen = gen_guard.gen.clone();
    let sent = tokio::select! {
        biased;
        r = send(ctx, service, pool, colour, balance, tls, first, &build, replayable) => r,
        _ = crate::deadline::expired(&gen) => {
            return Err(ProxyError::DrainDeadline { service: service.to_string(), colour: colour.as_str() });
        }
    };
    let Sent {
        resp: mut upstream_resp,
        sender,
        instance_id,
        addr,
        instance,
    } = sent?;

    let status = upstream_resp.status();
    let reusable = keeps_alive(upstream_resp.version(), upstream_resp.headers());
    strip_hop_by_hop(upstream_resp.headers_mut(), status == StatusCode::SWITCHING_PROTOCOLS);
    if status == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_upgrade) = client_upgrade else {
            return Err(ProxyError::Upstream {
                service: service.to_string(),
                addr,
                reason: "switched protocols without being asked to".into(),
            });
        };
        let upstream_io = hyper::upgrade::on(&mut upstream_resp)
            .await
            .map_err(|e| ProxyError::Upstream {
                service: service.to_string(),
                addr,
                reason: e.to_string(),
            })?;
        let (head, _) = upstream_resp.into_parts();
        let mut resp = Response::new(ProxyBody::empty());
        *resp.status_mut() = head.status;
        *resp.headers_mut() = head.headers;
        let websocket = resp
            .headers()
            .get(header::UPGRADE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
        crate::handler::spawn_tunnel(
            client_upgrade,
            TokioIo::new(upstream_io),
            websocket,
            Generation::into_upgraded(gen_guard),
            instance,
            ctx.clone(),
        );
        return Ok(resp);
    }
    let (head, body) = upstream_resp.into_parts();
    let mut resp = Response::new(ProxyBody::empty());
    *resp.status_mut() = head.status;
    *resp.headers_mut() = head.headers;
    let streaming = Streaming {
        body,
        sender: reusable.then_some(sender),
        instance_id,
        tls_id: tls.map_or(0, |t| t.id()),
        pool_size: shared.config.upstream_pool_size,
        gen: gen_guard,
        _instance: instance,
        _responding: Responding::new(&ctx.activity),
        deadline: Default::default(),
    };
    *resp.body_mut() = if streaming.body.is_end_stream() {
        streaming.finish();
        ProxyBody::empty()
    } else {
        ProxyBody::hyper(streaming)
    };
    Ok(resp)
}

fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

fn has_token(value: &HeaderValue, token: &str) -> bool {
    value
        .as_bytes()
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// Whether the upstream keeps the connection open after this response (as `h1::parse_head`).
fn keeps_alive(version: Version, headers: &HeaderMap) -> bool {
    let mut keep = version == Version::HTTP_11;
    for v in headers.get_all(header::CONNECTION) {
        if has_token(v, "close") {
            keep = false;
        } else if has_token(v, "keep-alive") {
            keep = true;
        }
    }
    keep
}

/// Drops the response's hop-by-hop headers, which hyper's client leaves in the map (the default
/// build drops them as it parses): `Connection` and what it names, `Keep-Alive`,
/// `Proxy-Connection`, `TE`, `Trailer`, `Transfer-Encoding`, and `Upgrade`; a 101 keeps its
/// `Connection` and `Upgrade`, which are the handshake.
fn strip_hop_by_hop(headers: &mut HeaderMap, switching: bool) {
    if !switching {
        let mut named: Vec<HeaderName> = Vec::new();
        for v in headers.get_all(header::CONNECTION) {
            for t in v.as_bytes().split(|&b| b == b',') {
                let t = t.trim_ascii();
                if !t.is_empty()
                    && !t.eq_ignore_ascii_case(b"close")
                    && !t.eq_ignore_ascii_case(b"keep-alive")
                    && !t.eq_ignore_ascii_case(b"upgrade")
                {
                    if let Ok(n) = HeaderName::from_bytes(t) {
                        named.push(n);
                    }
                }
            }
        }
        for n in named {
            headers.remove(n);
        }
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
    headers.remove(header::TRANSFER_ENCODING);
    headers.remove(header::TE);
    headers.remove(header::TRAILER);
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

struct Sent {
    resp: Response<Incoming>,
    sender: Sender,
    instance_id: u64,
    addr: std::net::SocketAddr,
    instance: InstanceGuard,
}

/// As `handler::send`, with hyper's client on each connection: a connect failure ejects the
/// instance for a moment and moves on to a sibling; a pooled connection found closed, or a
/// request hyper gives back unsent, goes to another connection; a failure after the request was
/// sent is final unless the request is bodiless and idempotent (then it is built again).
#[allow(clippy::too_many_arguments)]
async fn send(
    ctx: &ConnCtx,
    service: &Arc<str>,
    pool: &Pool,
    colour: Colour,
    balance: Balance,
    tls: Option<&crate::UpstreamTls>,
    mut req: Request<UpBody>,
    build: &impl Fn(UpBody) -> Request<UpBody>,
    replayable: bool,
) -> Result<Sent, ProxyError> {
    let cfg = &ctx.shared.config;
    let mut skip: u64 = 0;
    let mut last: Option<ProxyError> = None;
    let max_attempts = pool.instances.len() + 3;
    for _ in 0..max_attempts {
        let Some(idx) = pool.pick(balance, skip, now_ms()) else {
            break;
        };
        let inst = &pool.instances[idx];
        let guard = InstanceGuard::new(&inst.state);
        let (mut sender, reused) = match checkout(inst.id, tls.map_or(0, |t| t.id()), cfg.upstream_idle_timeout) {
            Some(s) => (s, true),
            None => match connect(inst.addr, cfg, tls).await {
                Ok(s) => (s, false),
                Err(e) if e.is_local() => {
                    tracing::warn!(service = %service, %colour, addr = %inst.addr, error = %e, "no upstream connection could be opened on this host");
                    return Err(ProxyError::Local {
                        service: service.to_string(),
                        reason: e.to_string(),
                    });
                }
                Err(e) => {
                    let until = now_ms().saturating_add(millis(cfg.connect_timeout).max(1000).saturating_mul(2));
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
        // A pooled connection is ready once hyper's task has seen the last response end.
        if let Err(e) = sender.ready().await {
            tracing::debug!(service = %service, %colour, addr = %inst.addr, error = %e, reused, "upstream connection closed before the request; sending on another");
            if !reused && idx < 64 {
                skip |= 1 << idx;
            }
            last = Some(ProxyError::Upstream {
                service: service.to_string(),
                addr: inst.addr,
                reason: e.to_string(),
            });
            continue;
        }
        match tokio::time::timeout(cfg.upstream_timeout, sender.try_send_request(req)).await {
            Ok(Ok(resp)) => {
                return Ok(Sent {
                    resp,
                    sender,
                    instance_id: inst.id,
                    addr: inst.addr,
                    instance: guard,
                });
            }
            Ok(Err(mut e)) => {
                let reason = e.error().to_string();
                req = match e.take_message() {
                    // Never written: safe on another connection.
                    Some(unsent) => unsent,
                    None if replayable && (e.error().is_incomplete_message() || e.error().is_canceled()) => {
                        build(Either::Right(Empty::new()))
                    }
                    None if e.error().is_user() => {
                        tracing::debug!(error = %e.error(), "the client's request body broke off");
                        return Err(ProxyError::BadRequest(
                            "the request body could not be read from the client",
                        ));
                    }
                    None => {
                        return Err(ProxyError::Upstream {
                            service: service.to_string(),
                            addr: inst.addr,
                            reason,
                        });
                    }
                };
                tracing::debug!(service = %service, %colour, addr = %inst.addr, error = %reason, reused, "upstream connection failed before answering; sending again");
                if !reused && idx < 64 {
                    skip |= 1 << idx;
                }
                last = Some(ProxyError::Upstream {
                    service: service.to_string(),
                    addr: inst.addr,
                    reason,
                });
            }
            Err(_) => {
                return Err(ProxyError::Timeout {
                    service: service.to_string(),
                    addr: inst.addr,
                });
            }
        }
    }
    Err(last.unwrap_or_else(|| ProxyError::NoInstance {
        service: service.to_string(),
        colour: colour.as_str(),
    }))
}

/// A response body streamed from hyper's `Incoming`, with the request's accounting (as
/// `body::Streaming`). The connection goes back to the pool once the body was read to its end.
pub(crate) struct Streaming {
    body: Incoming,
    /// `None` when the upstream closes the connection after this response.
    sender: Option<Sender>,
    instance_id: u64,
    tls_id: u64,
    pool_size: usize,
    gen: GenerationGuard,
    _instance: InstanceGuard,
    _responding: Responding,
    deadline: Registration,
}

impl Streaming {
    pub(crate) fn finish(self) {
        if let Some(sender) = self.sender {
            // As `body::finish`: a draining generation's connections are not pooled.
            if !sender.is_closed() && !self.gen.gen.is_draining() {
                checkin(self.instance_id, self.tls_id, sender, self.pool_size);
            }
        }
    }

    /// The next data frame; `Ready(None)` at the end of the body (the caller then calls
    /// [`Streaming::finish`]). Trailers are not forwarded.
    pub(crate) fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if self.gen.gen.expired.load(std::sync::atomic::Ordering::Acquire) {
            return Poll::Ready(Some(Err(BodyError::DrainDeadline)));
        }
        loop {
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if frame.is_data() {
                        return Poll::Ready(Some(Ok(frame)));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    return Poll::Ready(Some(Err(BodyError::Upstream(io::Error::other(e)))));
                }
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => {
                    if self.deadline.poll_expired(&self.gen.gen, cx).is_ready() {
                        return Poll::Ready(Some(Err(BodyError::DrainDeadline)));
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    pub(crate) fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    pub(crate) fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The header map this path sends holds the same headers, with the same values, as the head
    /// the default build encodes.
    #[test]
    fn request_headers_match_the_encoded_head() {
        let cases: Vec<(http::request::Builder, BodyFraming, Option<&str>)> = vec![
            (
                http::Request::get("/p?q=1")
                    .header("host", "shop.example")
                    .header("connection", "keep-alive, x-secret")
                    .header("keep-alive", "timeout=5")
                    .header("x-secret", "1")
                    .header("te", "trailers")
                    .header("x-forwarded-for", "1.1.1.1")
                    .header("x-forwarded-for", "2.2.2.2, 3.3.3.3")
                    .header("x-forwarded-proto", "https")
                    .header("x-request-id", "abc")
                    .header("x-request-id", "def")
                    .header("x-cutover-preview", "tok")
                    .header("accept", "a")
                    .header("accept", "b"),
                BodyFraming::None,
                None,
            ),
            (
                http::Request::post("/upload")
                    .header("host", "shop.example:8080")
                    .header("content-length", "5")
                    .header("x-request-id", "bad id"),
                BodyFraming::Length(5),
                None,
            ),
            (
                http::Request::put("/c")
                    .header("host", "a")
                    .header("transfer-encoding", "chunked"),
                BodyFraming::Chunked,
                None,
            ),
            (
                http::Request::get("/ws")
                    .header("host", "a")
                    .header("connection", "upgrade")
                    .header("upgrade", "websocket"),
                BodyFraming::None,
                Some("websocket"),
            ),
        ];
        for (b, framing, up) in cases {
            let (parts, _) = b.body(()).unwrap().into_parts();
            let authority = headers::target_authority(&parts.uri, &parts.headers, parts.version).unwrap();
            let ip = HeaderValue::from_static("10.1.2.3");
            let fwd = Forwarding {
                client_ip: &ip,
                proto: "http",
                trusted: true,
                authority,
            };
            let up = up.map(HeaderValue::from_static);
            let mut encoded = Vec::new();
            let made = headers::encode_request(&mut encoded, &parts, &fwd, up.as_ref(), framing);
            let map = request_headers(&parts, &fwd, up.as_ref(), framing, made.as_ref());
            assert_eq!(made.is_none(), keeps_request_id(&parts));

            let mut slots = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut slots);
            assert!(req.parse(&encoded).unwrap().is_complete());
            let mut want: Vec<(String, String)> = req
                .headers
                .iter()
                .map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).into_owned()))
                .collect();
            let mut got: Vec<(String, String)> = map
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_string()))
                .collect();
            want.sort();
            got.sort();
            assert_eq!(got, want, "{}", String::from_utf8_lossy(&encoded));
        }
    }
}
