//! Webhook notifications: the daemon's deployment events POSTed as JSON to the URLs of
//! `[webhooks]`.
//!
//! This module owns getting notices to other systems. It must never slow down what it reports on:
//! the daemon publishes every [`Notice`] on a broadcast channel and never waits for a reader.
//! Here one dispatcher task takes them off that channel, keeps the selected kinds, serialises each
//! once and puts it into a bounded queue per URL ([`QUEUE_CAPACITY`]; when full, the oldest event
//! is dropped and logged). One delivery task per URL empties its queue in order, one event at a
//! time, each attempt on a fresh connection cut at `timeout`, with `retries` more attempts after
//! pauses that double from [`FIRST_BACKOFF`]. So a dead or slow receiver delays only its own later
//! events: not the daemon, not a switch, not the other receivers.
//!
//! Every failed attempt is logged (url, event, attempt, error) at warn level; an event given up is
//! logged at error level. The counters of each URL are in [`Webhooks::stats`].
//!
//! Shutdown ([`Webhooks::stop`]): the dispatcher first queues what was published before the stop,
//! then the delivery tasks give what is queued one attempt each (no retries, no pauses), all within
//! one `timeout`; whatever is left then is dropped and logged.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_TYPE, HOST, USER_AGENT};
use http_body_util::Full;
use tokio::net::TcpStream;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::{broadcast, watch, Notify};
use tokio::task::JoinHandle;

use crate::config::{WebhookUrl, WebhooksConfig};
use crate::events::{EventKind, Notice};

/// Events waiting per URL. A receiver down for a while misses the oldest ones beyond this rather
/// than the daemon holding an unbounded backlog for it.
pub const QUEUE_CAPACITY: usize = 256;

/// The pause after the first failed attempt; it doubles after each further one (200 ms, 400 ms,
/// 800 ms, ...).
pub const FIRST_BACKOFF: Duration = Duration::from_millis(200);

/// The `User-Agent` of every delivery.
pub const USER_AGENT_VALUE: &str = concat!("cutover/", env!("CARGO_PKG_VERSION"));

/// The JSON body of a delivery, e.g.
/// `{"event":"rolled-back","service":"web","deployment":7,"message":"...","reason":"...","at":1700000000000}`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WebhookEvent {
    /// The notice kind: `started`, `promoted`, `rolled-back`, `aborted`, `went-live`, ...
    pub event: String,
    pub service: String,
    /// The deployment; absent for the few notices that concern none (e.g. `retired`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<u64>,
    /// One line for people, as `cutover` shows it.
    pub message: String,
    /// Why a deployment was rolled back or aborted; absent for other events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When it happened (not when it was delivered), in Unix milliseconds.
    pub at: u64,
}

impl WebhookEvent {
    pub fn from_notice(notice: &Notice) -> WebhookEvent {
        WebhookEvent {
            event: notice.kind.as_str().to_string(),
            service: notice.service.clone(),
            deployment: notice.deployment,
            message: notice.message.clone(),
            reason: notice.reason.clone(),
            at: notice.at,
        }
    }
}

/// Delivery counters of one URL since [`Webhooks::start`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WebhookStats {
    /// The URL as written in the config.
    pub url: String,
    /// Events the receiver answered with a 2xx.
    pub delivered: u64,
    /// Attempts that failed: connection error, timeout or an answer other than 2xx.
    pub failed_attempts: u64,
    /// Events dropped after their last attempt, or left undelivered when the sender stopped.
    pub given_up: u64,
    /// Events dropped unsent because the URL's queue was full (the oldest go first).
    pub dropped: u64,
}

/// The webhook sender: a dispatcher task and one delivery task per URL. See the module docs.
pub struct Webhooks {
    targets: Vec<Arc<Target>>,
    /// `true` asks every task to stop (and closing it, by dropping `Webhooks`, does too).
    stop: watch::Sender<bool>,
    /// The dispatcher first, then the delivery tasks; emptied by [`Webhooks::stop`].
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// How long [`Webhooks::stop`] lets queued deliveries run.
    timeout: Duration,
}

/// One URL: its queue and counters, shared by the dispatcher and the URL's delivery task.
struct Target {
    url: WebhookUrl,
    queue: Mutex<Queue>,
    /// Signalled on every push and on close.
    ready: Notify,
    /// True while the delivery task works on an event it has taken off the queue (for counting
    /// what an aborted task leaves undelivered).
    busy: AtomicBool,
    delivered: AtomicU64,
    failed_attempts: AtomicU64,
    given_up: AtomicU64,
    dropped: AtomicU64,
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Arc<Delivery>>,
    /// Set by the dispatcher when nothing more will be pushed; the delivery task ends once the
    /// queue is also empty. Under the same lock as `items`, so that no push can be missed.
    closed: bool,
}

/// One event, serialised once for every URL.
struct Delivery {
    event: String,
    service: String,
    deployment: Option<u64>,
    body: Bytes,
}

impl Webhooks {
    /// Starts sending the notices that `notices` receives to every URL of `config`. Subscribe
    /// `notices` before the events of interest can be published; with no URLs nothing is started.
    /// Must be called within a tokio runtime.
    pub fn start(config: WebhooksConfig, notices: broadcast::Receiver<Notice>) -> Webhooks {
        let (stop, _) = watch::channel(false);
        let targets: Vec<Arc<Target>> = config
            .urls
            .iter()
            .map(|url| {
                Arc::new(Target {
                    url: url.clone(),
                    queue: Mutex::new(Queue::default()),
                    ready: Notify::new(),
                    busy: AtomicBool::new(false),
                    delivered: AtomicU64::new(0),
                    failed_attempts: AtomicU64::new(0),
                    given_up: AtomicU64::new(0),
                    dropped: AtomicU64::new(0),
                })
            })
            .collect();
        let mut tasks = Vec::new();
        if !targets.is_empty() {
            tracing::info!(
                urls = %config.urls.iter().map(|u| u.url.as_str()).collect::<Vec<_>>().join(" "),
                events = %config.events.iter().map(|e| e.as_str()).collect::<Vec<_>>().join(","),
                "sending webhooks"
            );
            tasks.push(tokio::spawn(dispatch(
                targets.clone(),
                config.events.clone(),
                notices,
                stop.subscribe(),
            )));
            for target in &targets {
                tasks.push(tokio::spawn(deliver_all(
                    target.clone(),
                    config.timeout,
                    config.retries,
                    stop.subscribe(),
                )));
            }
        }
        Webhooks {
            targets,
            stop,
            tasks: Mutex::new(tasks),
            timeout: config.timeout,
        }
    }

    /// Counters per URL, in the order of the config.
    pub fn stats(&self) -> Vec<WebhookStats> {
        self.targets
            .iter()
            .map(|t| WebhookStats {
                url: t.url.url.clone(),
                delivered: t.delivered.load(Ordering::SeqCst),
                failed_attempts: t.failed_attempts.load(Ordering::SeqCst),
                given_up: t.given_up.load(Ordering::SeqCst),
                dropped: t.dropped.load(Ordering::SeqCst),
            })
            .collect()
    }

    /// Stops sending. Notices published before the call are still queued; queued events get one
    /// attempt each, all within one `timeout` from now; what is left after that is dropped and
    /// logged. Returns when every task has ended. Calling it again does nothing.
    pub async fn stop(&self) {
        self.stop.send_replace(true);
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        if tasks.is_empty() {
            return;
        }
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut cut_short = false;
        for mut task in tasks {
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                task.abort();
                let _ = task.await;
                cut_short = true;
            }
        }
        if !cut_short {
            return;
        }
        for t in &self.targets {
            let queued = std::mem::take(&mut t.queue.lock().unwrap_or_else(|p| p.into_inner()).items).len() as u64;
            let left = queued + u64::from(t.busy.swap(false, Ordering::SeqCst));
            if left > 0 {
                t.given_up.fetch_add(left, Ordering::SeqCst);
                tracing::error!(
                    url = %t.url,
                    events = left,
                    "cutover is stopping: {left} webhook events not delivered within {:?}",
                    self.timeout
                );
            }
        }
    }
}

impl Drop for Webhooks {
    /// Without [`Webhooks::stop`], nothing is left running either.
    fn drop(&mut self) {
        for task in self.tasks.get_mut().unwrap_or_else(|p| p.into_inner()).drain(..) {
            task.abort();
        }
    }
}

fn stopping(stop: &watch::Receiver<bool>) -> bool {
    *stop.borrow() || stop.has_changed().is_err()
}

/// Takes notices off the broadcast channel and queues the selected ones for every URL, until
/// stopped (then it queues what was already published) or the daemon is gone.
async fn dispatch(
    targets: Vec<Arc<Target>>,
    events: Vec<EventKind>,
    mut notices: broadcast::Receiver<Notice>,
    mut stop: watch::Receiver<bool>,
) {
    let queue = |notice: &Notice| {
        if !events.contains(&notice.kind) {
            return;
        }
        let event = WebhookEvent::from_notice(notice);
        // Strings and integers only: serialising cannot fail.
        let body = serde_json::to_vec(&event).expect("a WebhookEvent serialises");
        let delivery = Arc::new(Delivery {
            event: event.event,
            service: event.service,
            deployment: event.deployment,
            body: Bytes::from(body),
        });
        for target in &targets {
            target.push(delivery.clone());
        }
    };
    // A notice whose routing panics is one event lost, not the end of the webhooks.
    let route = |notice: &Notice| {
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| queue(notice))).is_err() {
            tracing::error!(event = %notice.kind, service = %notice.service,
                "routing a webhook event panicked; the event is dropped");
        }
    };
    let lagged = |missed: u64| {
        tracing::warn!(
            missed,
            "webhooks missed {missed} notices: they were published faster than they could be queued"
        )
    };
    loop {
        tokio::select! {
            biased;
            received = notices.recv() => match received {
                // Another node's (the fleet's leader sends its own).
                Ok(notice) if notice.from.is_some() => {}
                Ok(notice) => route(&notice),
                Err(RecvError::Lagged(missed)) => lagged(missed),
                Err(RecvError::Closed) => break,
            },
            // Ok (stopped) or Err (`Webhooks` dropped): stop either way.
            _ = stop.wait_for(|s| *s) => {
                loop {
                    match notices.try_recv() {
                        Ok(notice) if notice.from.is_some() => {}
                        Ok(notice) => route(&notice),
                        Err(TryRecvError::Lagged(missed)) => lagged(missed),
                        Err(_) => break,
                    }
                }
                break;
            }
        }
    }
    for target in &targets {
        target.queue.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
        target.ready.notify_one();
    }
}

impl Target {
    fn push(&self, delivery: Arc<Delivery>) {
        let evicted = {
            let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            let evicted = if queue.items.len() >= QUEUE_CAPACITY {
                queue.items.pop_front()
            } else {
                None
            };
            queue.items.push_back(delivery);
            evicted
        };
        if let Some(old) = evicted {
            self.dropped.fetch_add(1, Ordering::SeqCst);
            tracing::warn!(
                url = %self.url,
                event = %old.event,
                service = %old.service,
                deployment = old.deployment,
                "webhook queue full ({QUEUE_CAPACITY} events waiting): dropped the oldest event"
            );
        }
        self.ready.notify_one();
    }

    /// The next event, or `None` once the queue is closed and empty. Marks the task busy.
    async fn next(&self) -> Option<Arc<Delivery>> {
        loop {
            {
                let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(delivery) = queue.items.pop_front() {
                    // No await between taking the event and marking it: an abort sees either
                    // the event in the queue or the busy flag.
                    self.busy.store(true, Ordering::SeqCst);
                    return Some(delivery);
                }
                if queue.closed {
                    return None;
                }
            }
            // A push between the check and here leaves a permit: no wake-up is lost.
            self.ready.notified().await;
        }
    }
}

/// The delivery task of one URL: its events in order, each with its retries.
async fn deliver_all(target: Arc<Target>, timeout: Duration, retries: u32, mut stop: watch::Receiver<bool>) {
    use futures_util::FutureExt;
    while let Some(delivery) = target.next().await {
        // A delivery that panics is one event given up, not the end of this URL's deliveries.
        // Unwind safety: the target's state is atomics and a queue behind a mutex whose poisoning
        // every user passes over.
        let attempt = std::panic::AssertUnwindSafe(deliver(&target, &delivery, timeout, retries, &mut stop));
        if attempt.catch_unwind().await.is_err() {
            target.given_up.fetch_add(1, Ordering::SeqCst);
            tracing::error!(url = %target.url, event = %delivery.event, service = %delivery.service,
                "delivering a webhook panicked; the event is dropped");
        }
        target.busy.store(false, Ordering::SeqCst);
    }
}

async fn deliver(target: &Target, d: &Delivery, timeout: Duration, retries: u32, stop: &mut watch::Receiver<bool>) {
    let url = &target.url;
    let mut pause = FIRST_BACKOFF;
    let mut attempt: u32 = 1;
    loop {
        let error = match post(url, d.body.clone(), timeout).await {
            Ok(()) => {
                target.delivered.fetch_add(1, Ordering::SeqCst);
                // After failures, say that it recovered at the level the failures were logged.
                if attempt > 1 {
                    tracing::info!(%url, event = %d.event, service = %d.service, deployment = d.deployment,
                        attempt, "webhook delivered");
                } else {
                    tracing::debug!(%url, event = %d.event, service = %d.service, deployment = d.deployment,
                        attempt, "webhook delivered");
                }
                return;
            }
            Err(error) => error,
        };
        target.failed_attempts.fetch_add(1, Ordering::SeqCst);
        let give_up = if attempt > retries {
            Some(format!("after {attempt} attempts"))
        } else if stopping(stop) {
            Some("cutover is stopping".to_string())
        } else {
            None
        };
        if let Some(why) = give_up {
            target.given_up.fetch_add(1, Ordering::SeqCst);
            tracing::error!(%url, event = %d.event, service = %d.service, deployment = d.deployment, attempt, %error,
                "webhook not delivered ({why}); the event is dropped");
            return;
        }
        tracing::warn!(%url, event = %d.event, service = %d.service, deployment = d.deployment, attempt, %error,
            "webhook delivery failed; retrying in {pause:?}");
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.wait_for(|s| *s) => {
                target.given_up.fetch_add(1, Ordering::SeqCst);
                tracing::error!(%url, event = %d.event, service = %d.service, deployment = d.deployment, attempt,
                    "webhook not delivered (cutover is stopping); the event is dropped");
                return;
            }
        }
        pause = pause.saturating_mul(2);
        attempt += 1;
    }
}

/// One attempt: `POST` on a fresh connection with `Connection: close`; `timeout` covers name
/// resolution, connect, sending and the response head. A 2xx succeeds; the error is a short
/// reason such as `connect: connection refused` or `answered 500 Internal Server Error`.
async fn post(url: &WebhookUrl, body: Bytes, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, attempt(url, body)).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

async fn attempt(url: &WebhookUrl, body: Bytes) -> Result<(), String> {
    let request = http::Request::post(url.target.as_str())
        .header(HOST, url.authority.as_str())
        .header(CONTENT_TYPE, "application/json")
        .header(USER_AGENT, USER_AGENT_VALUE)
        .header(CONNECTION, "close")
        .body(Full::new(body))
        .map_err(|e| format!("cannot build the request: {e}"))?;
    let stream = TcpStream::connect((url.host.as_str(), url.port))
        .await
        .map_err(|e| format!("connect: {}", crate::oneshot::io_reason(&e)))?;
    let _ = stream.set_nodelay(true);
    crate::oneshot::exchange(stream, request).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper_util::rt::TokioIo;
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::time::Instant;

    use http_body_util::BodyExt;
    use hyper::body::Incoming;
    use hyper::service::service_fn;
    use serde_json::{json, Value};
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    fn url(addr: SocketAddr, path: &str) -> WebhookUrl {
        WebhookUrl::parse(&format!("http://{addr}{path}")).unwrap()
    }

    fn config(urls: Vec<WebhookUrl>, timeout: Duration, retries: u32) -> WebhooksConfig {
        WebhooksConfig {
            urls,
            timeout,
            retries,
            ..WebhooksConfig::default()
        }
    }

    fn notice(service: &str, deployment: Option<u64>, kind: &str, message: &str) -> Notice {
        let kind = EventKind::from_name(kind).expect("a known kind");
        Notice {
            seq: 0,
            at: 1_700_000_000_000 + deployment.unwrap_or(0),
            service: service.to_string(),
            deployment,
            kind,
            message: message.to_string(),
            reason: None,
            terminal: kind.ends_deployment(),
            from: None,
        }
    }

    fn with_reason(mut n: Notice, reason: &str) -> Notice {
        n.reason = Some(reason.to_string());
        n
    }

    /// Polls `f` every 10 ms until it holds or `within` has passed.
    async fn wait_until(within: Duration, mut f: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if f() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn stats_of(hooks: &Webhooks, i: usize) -> WebhookStats {
        hooks.stats()[i].clone()
    }

    #[derive(Clone, Debug)]
    struct Arrival {
        at: Instant,
        method: String,
        target: String,
        headers: http::HeaderMap,
        raw_len: usize,
        body: Value,
    }

    /// A hyper HTTP/1 server that records every request, answers the statuses of its script in
    /// turn and 200 after that. While its gate is shut it holds every answer.
    struct Receiver {
        addr: SocketAddr,
        script: Mutex<VecDeque<u16>>,
        arrivals: Mutex<Vec<Arrival>>,
        gate: watch::Sender<bool>,
    }

    impl Receiver {
        async fn start(script: &[u16]) -> Arc<Receiver> {
            Receiver::serve(script, true).await
        }

        /// Holds its answers until [`Receiver::open`].
        async fn gated() -> Arc<Receiver> {
            Receiver::serve(&[], false).await
        }

        async fn serve(script: &[u16], open: bool) -> Arc<Receiver> {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let receiver = Arc::new(Receiver {
                addr: listener.local_addr().unwrap(),
                script: Mutex::new(script.iter().copied().collect()),
                arrivals: Mutex::new(Vec::new()),
                gate: watch::channel(open).0,
            });
            let server = receiver.clone();
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let server = server.clone();
                    tokio::spawn(async move {
                        let service = service_fn(move |req: http::Request<Incoming>| {
                            let server = server.clone();
                            async move { Ok::<_, Infallible>(server.answer(req).await) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
            receiver
        }

        async fn answer(&self, req: http::Request<Incoming>) -> http::Response<Full<Bytes>> {
            let at = Instant::now();
            let (parts, body) = req.into_parts();
            let raw = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            self.arrivals.lock().unwrap().push(Arrival {
                at,
                method: parts.method.to_string(),
                target: parts.uri.to_string(),
                headers: parts.headers,
                raw_len: raw.len(),
                body: serde_json::from_slice(&raw).unwrap_or(Value::Null),
            });
            let status = self.script.lock().unwrap().pop_front().unwrap_or(200);
            let _ = self.gate.subscribe().wait_for(|open| *open).await;
            http::Response::builder()
                .status(status)
                .body(Full::new(Bytes::from_static(b"ok\n")))
                .unwrap()
        }

        fn open(&self) {
            self.gate.send_replace(true);
        }

        fn arrivals(&self) -> Vec<Arrival> {
            self.arrivals.lock().unwrap().clone()
        }

        fn count(&self) -> usize {
            self.arrivals.lock().unwrap().len()
        }

        fn bodies(&self) -> Vec<Value> {
            self.arrivals().into_iter().map(|a| a.body).collect()
        }
    }

    /// A TCP server that accepts, reads whatever arrives and never answers; it records when each
    /// connection was accepted and when the client closed it.
    struct Hanging {
        addr: SocketAddr,
        conns: Mutex<Vec<(Instant, Option<Instant>)>>,
    }

    impl Hanging {
        async fn start() -> Arc<Hanging> {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let hanging = Arc::new(Hanging {
                addr: listener.local_addr().unwrap(),
                conns: Mutex::new(Vec::new()),
            });
            let server = hanging.clone();
            tokio::spawn(async move {
                while let Ok((mut stream, _)) = listener.accept().await {
                    let index = {
                        let mut conns = server.conns.lock().unwrap();
                        conns.push((Instant::now(), None));
                        conns.len() - 1
                    };
                    let server = server.clone();
                    tokio::spawn(async move {
                        let mut buf = [0u8; 4096];
                        while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
                        server.conns.lock().unwrap()[index].1 = Some(Instant::now());
                    });
                }
            });
            hanging
        }

        fn conns(&self) -> Vec<(Instant, Option<Instant>)> {
            self.conns.lock().unwrap().clone()
        }
    }

    /// An address that refuses connections for as long as the socket lives: bound (so that no
    /// one else gets the port) but not listening.
    fn refusing() -> (socket2::Socket, SocketAddr) {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
        let addr = socket.local_addr().unwrap().as_socket().unwrap();
        (socket, addr)
    }

    #[test]
    fn webhook_event_carries_the_reason_of_rollbacks_and_aborts() {
        let reason = "30 of 100 requests failed, above the maximum error rate 0.05";
        let rolled_back = with_reason(
            notice(
                "web",
                Some(7),
                "rolled-back",
                "deployment 7 rolled back to blue@v1:2 (the failure is in reason)",
            ),
            reason,
        );
        let event = WebhookEvent::from_notice(&rolled_back);
        assert_eq!(
            serde_json::to_value(&event).unwrap(),
            json!({
                "event": "rolled-back",
                "service": "web",
                "deployment": 7,
                "message": "deployment 7 rolled back to blue@v1:2 (the failure is in reason)",
                "reason": reason,
                "at": 1_700_000_000_007u64,
            })
        );
        // The reason is the notice's field, whatever its message says.
        let aborted = with_reason(
            notice("web", Some(8), "aborted", "deployment 8 aborted"),
            "smoke failed",
        );
        assert_eq!(
            WebhookEvent::from_notice(&aborted).reason.as_deref(),
            Some("smoke failed")
        );
        let worded = notice(
            "web",
            Some(8),
            "aborted",
            "deployment 8 aborted: requested by the operator",
        );
        assert_eq!(WebhookEvent::from_notice(&worded).reason, None);
        // No deployment: the key is absent, not null.
        let retired = serde_json::to_value(WebhookEvent::from_notice(&notice(
            "web",
            None,
            "retired",
            "blue@v1 retired",
        )))
        .unwrap();
        assert_eq!(
            retired,
            json!({"event": "retired", "service": "web", "message": "blue@v1 retired", "at": 1_700_000_000_000u64})
        );
    }

    #[tokio::test]
    async fn webhook_receiver_gets_exactly_the_selected_events_in_order() {
        let all = Receiver::start(&[]).await;
        let few = Receiver::start(&[]).await;
        let (tx, _) = broadcast::channel(64);
        let hooks = Webhooks::start(
            config(vec![url(all.addr, "/hook?key=k1")], Duration::from_secs(5), 0),
            tx.subscribe(),
        );
        let custom = Webhooks::start(
            WebhooksConfig {
                events: vec![EventKind::WentLive, EventKind::Retired],
                ..config(vec![url(few.addr, "/")], Duration::from_secs(5), 0)
            },
            tx.subscribe(),
        );
        let sent = [
            notice(
                "web",
                Some(7),
                "started",
                "deployment 7 of v2 started on green (Deploy)",
            ),
            notice("web", Some(7), "healthy", "deployment 7: all instances healthy"),
            notice("web", Some(7), "promoted", "deployment 7 promoted to green"),
            notice("web", Some(7), "went-live", "deployment 7: green@v2 is live"),
            with_reason(
                notice(
                    "web",
                    Some(7),
                    "rolled-back",
                    "deployment 7 rolled back to blue@v1: 30 of 100 requests failed, above the maximum error rate 0.05",
                ),
                "30 of 100 requests failed, above the maximum error rate 0.05",
            ),
            notice("api", Some(8), "started", "deployment 8 of v5 started on blue (Deploy)"),
            with_reason(
                notice(
                    "api",
                    Some(8),
                    "aborted",
                    "deployment 8 aborted: requested by the operator",
                ),
                "requested by the operator",
            ),
            notice("web", None, "retired", "blue@v1 retired"),
        ];
        for n in &sent {
            tx.send(n.clone()).unwrap();
        }
        let expected: Vec<Value> = [0, 2, 4, 5, 6]
            .iter()
            .map(|&i| serde_json::to_value(WebhookEvent::from_notice(&sent[i])).unwrap())
            .collect();
        assert!(
            wait_until(Duration::from_secs(10), || all.count() >= expected.len()
                && few.count() >= 2)
            .await,
            "{:?} {:?}",
            all.bodies(),
            few.bodies()
        );
        // Stopping sends whatever was still queued: after it nothing more can arrive.
        hooks.stop().await;
        custom.stop().await;

        assert_eq!(all.bodies(), expected);
        assert_eq!(
            all.bodies()[2],
            json!({
                "event": "rolled-back",
                "service": "web",
                "deployment": 7,
                "message": "deployment 7 rolled back to blue@v1: 30 of 100 requests failed, above the maximum error rate 0.05",
                "reason": "30 of 100 requests failed, above the maximum error rate 0.05",
                "at": 1_700_000_000_007u64,
            })
        );
        assert_eq!(all.bodies()[0]["reason"], Value::Null, "no reason on started");
        assert_eq!(all.bodies()[4]["reason"], json!("requested by the operator"));
        for a in all.arrivals() {
            let header = |name: &str| a.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
            assert_eq!((a.method.as_str(), a.target.as_str()), ("POST", "/hook?key=k1"));
            assert_eq!(header("content-type").as_deref(), Some("application/json"));
            assert_eq!(header("user-agent").as_deref(), Some(USER_AGENT_VALUE));
            assert!(USER_AGENT_VALUE.starts_with("cutover/0."), "{USER_AGENT_VALUE}");
            assert_eq!(header("host"), Some(all.addr.to_string()));
            assert_eq!(header("content-length"), Some(a.raw_len.to_string()));
        }
        let kinds: Vec<Value> = few.bodies().iter().map(|b| b["event"].clone()).collect();
        assert_eq!(kinds, [json!("went-live"), json!("retired")]);
        assert_eq!(
            hooks.stats(),
            [WebhookStats {
                url: format!("http://{}/hook?key=k1", all.addr),
                delivered: 5,
                ..WebhookStats::default()
            }]
        );
    }

    #[tokio::test]
    async fn webhook_down_receiver_is_retried_then_given_up_while_a_healthy_one_is_not_delayed() {
        let (_down, down) = refusing();
        let healthy = Receiver::start(&[]).await;
        let (tx, _) = broadcast::channel(64);
        let retries = 3;
        let hooks = Webhooks::start(
            config(
                vec![url(down, "/hook"), url(healthy.addr, "/hook")],
                Duration::from_secs(2),
                retries,
            ),
            tx.subscribe(),
        );
        let t0 = Instant::now();
        tx.send(notice(
            "web",
            Some(1),
            "started",
            "deployment 1 of v1 started on blue (Deploy)",
        ))
        .unwrap();
        tx.send(notice("web", Some(1), "healthy", "deployment 1: all instances healthy"))
            .unwrap();
        tx.send(notice("web", Some(1), "promoted", "deployment 1 promoted to blue"))
            .unwrap();
        assert!(wait_until(Duration::from_secs(10), || healthy.count() == 2).await);
        // The down receiver cannot have given up its first event yet: that takes at least the
        // pauses between its four attempts, 200 + 400 + 800 ms. The healthy one got both.
        let down_now = stats_of(&hooks, 0);
        assert_eq!(down_now.given_up, 0, "{down_now:?}");
        assert!(down_now.failed_attempts >= 1, "{down_now:?}");

        assert!(
            wait_until(Duration::from_secs(20), || stats_of(&hooks, 0).given_up == 2).await,
            "{:?}",
            hooks.stats()
        );
        assert!(
            t0.elapsed() >= 2 * Duration::from_millis(200 + 400 + 800),
            "backoff between attempts"
        );
        assert_eq!(
            hooks.stats(),
            [
                WebhookStats {
                    url: format!("http://{down}/hook"),
                    failed_attempts: 2 * (1 + retries as u64),
                    given_up: 2,
                    ..WebhookStats::default()
                },
                WebhookStats {
                    url: format!("http://{}/hook", healthy.addr),
                    delivered: 2,
                    ..WebhookStats::default()
                },
            ]
        );
        let kinds: Vec<Value> = healthy.bodies().iter().map(|b| b["event"].clone()).collect();
        assert_eq!(kinds, [json!("started"), json!("promoted")]);
        hooks.stop().await;
    }

    #[tokio::test]
    async fn webhook_answered_500_twice_is_delivered_on_the_third_attempt() {
        let flaky = Receiver::start(&[500, 500]).await;
        let broken = Receiver::start(&[500; 10]).await;
        let (tx, _) = broadcast::channel(64);
        let hooks = Webhooks::start(
            config(
                vec![url(flaky.addr, "/"), url(broken.addr, "/")],
                Duration::from_secs(5),
                3,
            ),
            tx.subscribe(),
        );
        tx.send(notice(
            "web",
            Some(3),
            "aborted",
            "deployment 3 aborted: requested by the operator",
        ))
        .unwrap();
        assert!(
            wait_until(Duration::from_secs(10), || {
                let s = hooks.stats();
                s[0].delivered == 1 && s[1].given_up == 1
            })
            .await,
            "{:?}",
            hooks.stats()
        );
        let arrivals = flaky.arrivals();
        assert_eq!(arrivals.len(), 3);
        assert!(arrivals
            .iter()
            .all(|a| a.body == arrivals[0].body && a.body["event"] == "aborted"));
        assert!(arrivals[1].at - arrivals[0].at >= Duration::from_millis(200));
        assert!(arrivals[2].at - arrivals[1].at >= Duration::from_millis(400));
        // The retries: exactly three after the first attempt, then given up.
        assert_eq!(broken.count(), 4);
        assert_eq!(
            hooks.stats(),
            [
                WebhookStats {
                    url: format!("http://{}/", flaky.addr),
                    delivered: 1,
                    failed_attempts: 2,
                    ..WebhookStats::default()
                },
                WebhookStats {
                    url: format!("http://{}/", broken.addr),
                    failed_attempts: 4,
                    given_up: 1,
                    ..WebhookStats::default()
                },
            ]
        );
        hooks.stop().await;
        assert_eq!(broken.count(), 4, "nothing after giving up");
    }

    #[tokio::test]
    async fn webhook_hanging_receiver_is_cut_at_timeout() {
        let hanging = Hanging::start().await;
        let (tx, _) = broadcast::channel(64);
        let timeout = Duration::from_millis(300);
        let hooks = Webhooks::start(config(vec![url(hanging.addr, "/")], timeout, 1), tx.subscribe());
        let t0 = Instant::now();
        tx.send(notice(
            "web",
            Some(1),
            "started",
            "deployment 1 of v1 started on blue (Deploy)",
        ))
        .unwrap();
        assert!(
            wait_until(Duration::from_secs(10), || stats_of(&hooks, 0).given_up == 1).await,
            "{:?}",
            hooks.stats()
        );
        // Both attempts' connections are closed by cutover, each no sooner than its timeout.
        assert!(
            wait_until(Duration::from_secs(10), || hanging
                .conns()
                .iter()
                .all(|c| c.1.is_some()))
            .await,
            "connections cut"
        );
        let conns = hanging.conns();
        assert_eq!(conns.len(), 2, "one attempt and one retry");
        let first_closed = conns[0].1.unwrap();
        assert!(first_closed >= t0 + timeout, "cut after {:?}", first_closed - t0);
        assert!(
            conns[1].0 >= first_closed,
            "the retry starts after the first attempt ended"
        );
        assert!(conns[1].0 >= t0 + timeout + FIRST_BACKOFF);
        assert!(conns[1].1.unwrap() >= conns[1].0);
        assert_eq!(
            (stats_of(&hooks, 0).delivered, stats_of(&hooks, 0).failed_attempts),
            (0, 2)
        );
        hooks.stop().await;
    }

    #[tokio::test]
    async fn webhook_full_queue_drops_the_oldest_events() {
        let receiver = Receiver::gated().await;
        let (tx, _) = broadcast::channel(1024);
        let hooks = Webhooks::start(
            WebhooksConfig {
                events: vec![EventKind::Started],
                ..config(vec![url(receiver.addr, "/")], Duration::from_secs(60), 0)
            },
            tx.subscribe(),
        );
        let started = |id: u64| notice("web", Some(id), "started", &format!("deployment {id} started"));
        // The first event is held by the receiver; the queue fills behind it.
        tx.send(started(1)).unwrap();
        assert!(wait_until(Duration::from_secs(10), || receiver.count() == 1).await);
        let overflow = 4;
        let last = 1 + QUEUE_CAPACITY as u64 + overflow;
        for id in 2..=last {
            tx.send(started(id)).unwrap();
        }
        assert!(
            wait_until(Duration::from_secs(10), || stats_of(&hooks, 0).dropped == overflow).await,
            "{:?}",
            hooks.stats()
        );
        receiver.open();
        assert!(
            wait_until(Duration::from_secs(30), || stats_of(&hooks, 0).delivered
                == 1 + QUEUE_CAPACITY as u64)
            .await,
            "{:?}",
            hooks.stats()
        );
        hooks.stop().await;
        let ids: Vec<u64> = receiver
            .bodies()
            .iter()
            .map(|b| b["deployment"].as_u64().unwrap())
            .collect();
        let expected: Vec<u64> = std::iter::once(1).chain(2 + overflow..=last).collect();
        assert_eq!(ids, expected, "2 to {} dropped, the rest in order", 1 + overflow);
        assert_eq!(stats_of(&hooks, 0).dropped, overflow);
    }

    #[tokio::test]
    async fn webhook_stop_sends_what_is_queued_and_waits_no_longer_than_the_timeout() {
        let hanging = Hanging::start().await;
        let healthy = Receiver::start(&[]).await;
        let (tx, _) = broadcast::channel(64);
        let timeout = Duration::from_secs(1);
        let hooks = Webhooks::start(
            config(vec![url(hanging.addr, "/"), url(healthy.addr, "/")], timeout, 5),
            tx.subscribe(),
        );
        for id in 1..=3 {
            tx.send(notice("web", Some(id), "started", "started")).unwrap();
        }
        // Stop at once: the notices are still in the channel or the queues.
        let t0 = Instant::now();
        hooks.stop().await;
        let took = t0.elapsed();
        // Without the stop, the hanging receiver would hold the sender for 3 events x 6 attempts
        // of 1 s, plus the pauses.
        assert!(took < timeout + Duration::from_secs(5), "stop took {took:?}");
        assert_eq!(healthy.count(), 3, "queued events are still sent");
        let s = hooks.stats();
        assert_eq!((s[1].delivered, s[1].given_up), (3, 0));
        assert_eq!((s[0].delivered, s[0].given_up), (0, 3), "{s:?}");
        hooks.stop().await;
        // Stopped: the dispatcher no longer listens, nothing more is sent.
        assert!(tx.send(notice("web", Some(4), "started", "started")).is_err());
        assert_eq!(hooks.stats(), s);
    }

    #[tokio::test]
    async fn webhook_without_urls_starts_nothing() {
        let (tx, _) = broadcast::channel(4);
        let hooks = Webhooks::start(WebhooksConfig::default(), tx.subscribe());
        assert!(hooks.stats().is_empty());
        assert!(hooks.tasks.lock().unwrap().is_empty());
        assert_eq!(tx.receiver_count(), 0, "the receiver is dropped");
        hooks.stop().await;
    }
}
