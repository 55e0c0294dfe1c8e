//! Switch semantics under load: real sockets, real upstreams, concurrent keep-alive clients.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cutover_proxy::Colour;
use futures_util::{SinkExt, StreamExt};
use http::Request;
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};
use support::*;
use tokio_tungstenite::tungstenite::Message;

/// 1. Keep-alive clients send continuously while the live colour flips 200+ times: no request
/// fails and every response comes from a colour that was live during that request.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flips_under_keepalive_load_drop_nothing() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let proxy = start_proxy(test_config(), table(&[&blue], &[&green]));
    let addr = proxy.local_addrs()[0];
    let log = SwitchLog::new(Colour::Blue);

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (stop, ok, failures, log) = (stop.clone(), ok.clone(), failures.clone(), log.clone());
        clients.push(tokio::spawn(async move {
            let mut c = H1::connect(addr).await.expect("connect");
            let mut seen = [0u64; 2];
            // Bounded: the flag stops it after ~5 s; the count caps it regardless.
            for _ in 0..2_000_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let start = Instant::now();
                match c.get("/").await {
                    Ok((status, _, body)) => {
                        let end = Instant::now();
                        match colour_of(&body) {
                            Some(col) if status == 200 => {
                                if !log.was_live(col, start, end) {
                                    failures
                                        .lock()
                                        .unwrap()
                                        .push(format!("{col} answered but was not live"));
                                }
                                seen[(col == Colour::Green) as usize] += 1;
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            _ => failures
                                .lock()
                                .unwrap()
                                .push(format!("{status} {:?}", String::from_utf8_lossy(&body))),
                        }
                    }
                    Err(e) => {
                        failures.lock().unwrap().push(format!("transport: {e}"));
                        c = H1::connect(addr).await.expect("reconnect");
                    }
                }
            }
            seen
        }));
    }

    let started = Instant::now();
    let mut to = Colour::Green;
    while started.elapsed() < Duration::from_secs(5) || log.len() < 200 {
        log.switch(&proxy, "web", to);
        to = to.other();
        tokio::time::sleep(Duration::from_millis(15)).await;
        assert!(started.elapsed() < Duration::from_secs(30), "switch loop bounded");
    }
    stop.store(true, Ordering::Relaxed);
    let mut per_colour = [0u64; 2];
    for c in clients {
        let seen = c.await.unwrap();
        per_colour[0] += seen[0];
        per_colour[1] += seen[1];
    }
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} failures, first: {:?}",
        failures.len(),
        failures.first()
    );
    assert!(log.len() >= 200, "only {} switches", log.len());
    let total = ok.load(Ordering::Relaxed);
    assert!(total > 1000, "too little traffic to mean anything: {total}");
    assert!(
        per_colour[0] > 0 && per_colour[1] > 0,
        "both colours served: {per_colour:?}"
    );
    eprintln!(
        "{total} requests over {} switches, blue {} green {}",
        log.len(),
        per_colour[0],
        per_colour[1]
    );
}

/// 2. A slow request started on blue completes with its full body after a switch, and the drain
/// waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_request_finishes_on_old_colour() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let proxy = start_proxy(test_config(), table(&[&blue], &[&green]));
    let addr = proxy.local_addrs()[0];

    let slow = tokio::spawn(async move {
        let mut c = H1::connect(addr).await.unwrap();
        c.get("/slow?ms=2000&size=200000").await.unwrap()
    });
    assert!(in_flight_reaches(&proxy, Colour::Blue, 1).await);
    proxy.switch("web", Colour::Green).unwrap();
    let mut c = H1::connect(addr).await.unwrap();
    assert_eq!(c.get("/").await.unwrap().2, "green");

    let report = proxy
        .drain("web", Colour::Blue, Duration::from_secs(10), Duration::from_millis(100))
        .await
        .unwrap();
    let (status, _, body) = slow.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(body.len(), 200_000);
    assert!(body.starts_with(b"blue "));
    assert!(report.completed, "{report:?}");
    assert_eq!(report.cut_requests, 0);
    assert!(
        report.elapsed >= Duration::from_millis(1000),
        "drain waited for the slow request: {report:?}"
    );
}

/// A request still waiting on its upstream at the drain deadline gets 504.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drain_deadline_answers_504() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let proxy = start_proxy(test_config(), table(&[&blue], &[&green]));
    let addr = proxy.local_addrs()[0];
    let slow = tokio::spawn(async move {
        let mut c = H1::connect(addr).await.unwrap();
        c.get("/slow?ms=8000").await.unwrap()
    });
    assert!(in_flight_reaches(&proxy, Colour::Blue, 1).await);
    proxy.switch("web", Colour::Green).unwrap();
    let t = Instant::now();
    let report = proxy
        .drain(
            "web",
            Colour::Blue,
            Duration::from_millis(500),
            Duration::from_millis(100),
        )
        .await
        .unwrap();
    let (status, _, body) = slow.await.unwrap();
    assert_eq!(status, 504, "{:?}", String::from_utf8_lossy(&body));
    assert!(!report.completed);
    assert_eq!(report.cut_requests, 1);
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "cut at the deadline, not when the upstream finished"
    );
}

/// 3. On one client connection, the request after a switch reaches the new colour.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keepalive_connection_is_not_pinned() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let proxy = start_proxy(test_config(), table(&[&blue], &[&green]));
    let mut c = H1::connect(proxy.local_addrs()[0]).await.unwrap();
    assert_eq!(c.get("/").await.unwrap().2, "blue");
    proxy.switch("web", Colour::Green).unwrap();
    assert_eq!(c.get("/").await.unwrap().2, "green");
    proxy.switch("web", Colour::Blue).unwrap();
    assert_eq!(c.get("/").await.unwrap().2, "blue");
    assert!(!c.tx.is_closed(), "all three requests on the same connection");
}

async fn ws_connect(addr: std::net::SocketAddr) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (ws, resp) = tokio_tungstenite::client_async(format!("ws://{addr}/ws"), stream)
        .await
        .expect("websocket handshake");
    assert_eq!(resp.status(), 101);
    ws
}

async fn ws_echo(ws: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>, text: &str) -> String {
    ws.send(Message::text(text)).await.unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("echo in time")
        {
            Some(Ok(Message::Text(t))) => return t.to_string(),
            Some(Ok(_)) => continue,
            other => panic!("websocket ended: {other:?}"),
        }
    }
}

/// 4. A WebSocket opened on blue keeps working after the switch until the drain deadline, then is
/// closed; a new WebSocket goes to green.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn websocket_stays_until_drain_deadline() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let proxy = start_proxy(test_config(), table(&[&blue], &[&green]));
    let addr = proxy.local_addrs()[0];

    let mut old = ws_connect(addr).await;
    assert_eq!(ws_echo(&mut old, "hello").await, "blue: hello");
    proxy.switch("web", Colour::Green).unwrap();
    assert_eq!(ws_echo(&mut old, "still there").await, "blue: still there");
    let mut new = ws_connect(addr).await;
    assert_eq!(ws_echo(&mut new, "hi").await, "green: hi");

    assert_eq!(proxy.table().service("web").unwrap().blue.generation().upgraded(), 1);
    let p = proxy.clone();
    let drain = tokio::spawn(async move {
        p.drain(
            "web",
            Colour::Blue,
            Duration::from_millis(800),
            Duration::from_millis(300),
        )
        .await
        .unwrap()
    });
    // Before the deadline the old socket still works.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(ws_echo(&mut old, "before deadline").await, "blue: before deadline");
    let t = Instant::now();
    // After it, the proxy closes it: the stream ends (close frame or EOF) without us sending.
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match old.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "old websocket closed after the drain deadline");
    let report = drain.await.unwrap();
    assert!(!report.completed);
    assert_eq!(report.closed_upgrades, 1);
    assert!(t.elapsed() < Duration::from_secs(3));
    // The green one is untouched.
    assert_eq!(ws_echo(&mut new, "after").await, "green: after");
}

/// 5. A 50 MB upload streamed across a switch arrives intact on blue.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_upload_crosses_switch_intact() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let proxy = start_proxy(test_config(), table(&[&blue], &[&green]));
    let addr = proxy.local_addrs()[0];

    const CHUNK: usize = 1 << 20;
    const CHUNKS: usize = 50;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(2);
    let mut hasher = Sha256::new();
    let mut chunks = Vec::new();
    let mut seed: u32 = 12345;
    for _ in 0..CHUNKS {
        let mut buf = vec![0u8; CHUNK];
        for b in buf.iter_mut() {
            seed = seed.wrapping_mul(1103515245).wrapping_add(12345);
            *b = (seed >> 16) as u8;
        }
        hasher.update(&buf);
        chunks.push(Bytes::from(buf));
    }
    let expected = hex(&hasher.finalize());

    let upload = tokio::spawn(async move {
        let mut c = H1::connect(addr).await.unwrap();
        let req = Request::post("/upload")
            .header("host", "web.test")
            .header("content-length", (CHUNK * CHUNKS).to_string())
            .body(ChannelBody(rx).boxed())
            .unwrap();
        c.request(req).await.unwrap()
    });
    for (i, chunk) in chunks.into_iter().enumerate() {
        if i == 10 {
            proxy.switch("web", Colour::Green).unwrap();
        }
        tx.send(chunk).await.unwrap();
    }
    drop(tx);
    let (status, _, body) = upload.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        String::from_utf8_lossy(&body),
        format!("blue {expected} {}", CHUNK * CHUNKS)
    );
    let mut c = H1::connect(addr).await.unwrap();
    assert_eq!(c.get("/").await.unwrap().2, "green");
}

/// 6. An SSE stream's first event reaches the client before the upstream finishes the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sse_events_are_not_buffered() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let proxy = start_proxy(test_config(), table(&[&blue], &[&green]));
    let mut c = H1::connect(proxy.local_addrs()[0]).await.unwrap();
    let resp = c.open("/sse").await.unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("first event arrives while the stream is still open")
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap(), "data: first from blue\n\n");
    // Only now does the upstream send the rest and end the stream.
    blue.sse_release.notify_one();
    let rest = tokio::time::timeout(Duration::from_secs(5), body.collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    assert_eq!(rest, "data: last\n\n");
}

/// 7. HTTP/2 clients across switches: zero failures.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http2_clients_across_switches() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let proxy = start_proxy(test_config(), table(&[&blue], &[&green]));
    let addr = proxy.local_addrs()[0];
    let log = SwitchLog::new(Colour::Blue);
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let ok = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let tx = h2_connect(addr).await.unwrap();
        // Several concurrent streams on each connection.
        for _ in 0..8 {
            let (mut tx, stop, failures, ok, log) =
                (tx.clone(), stop.clone(), failures.clone(), ok.clone(), log.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..1_000_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let start = Instant::now();
                    let req = Request::get(format!("http://{addr}/")).body(empty()).unwrap();
                    let r = async {
                        tx.ready().await?;
                        let resp = tx.send_request(req).await?;
                        let status = resp.status();
                        let body = resp.into_body().collect().await?.to_bytes();
                        Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, body))
                    }
                    .await;
                    match r {
                        Ok((s, body)) if s == 200 => match colour_of(&body) {
                            Some(c) if log.was_live(c, start, Instant::now()) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            _ => failures.lock().unwrap().push(format!("wrong colour {body:?}")),
                        },
                        Ok((s, body)) => failures.lock().unwrap().push(format!("{s} {body:?}")),
                        Err(e) => {
                            failures.lock().unwrap().push(format!("h2: {e}"));
                            return;
                        }
                    }
                }
            }));
        }
    }
    let t = Instant::now();
    let mut to = Colour::Green;
    while t.elapsed() < Duration::from_secs(3) {
        log.switch(&proxy, "web", to);
        to = to.other();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} failures, first {:?}",
        failures.len(),
        failures.first()
    );
    assert!(ok.load(Ordering::Relaxed) > 500, "{}", ok.load(Ordering::Relaxed));
    assert!(log.len() > 50);
}

/// 8. An upstream instance killed mid-load: requests that cannot reach it go to its siblings;
/// no client sees a failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_instance_is_ejected_and_retried() {
    let b1 = Upstream::start("blue").await;
    let b2 = Upstream::start("blue").await;
    let b3 = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let proxy = start_proxy(test_config(), table(&[&b1, &b2, &b3], &[&green]));
    let addr = proxy.local_addrs()[0];
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (stop, failures) = (stop.clone(), failures.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = H1::connect(addr).await.unwrap();
            let mut n = 0u64;
            for _ in 0..2_000_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                match c.get("/").await {
                    Ok((s, _, body)) if s == 200 && body == "blue" => n += 1,
                    Ok((s, _, body)) => failures
                        .lock()
                        .unwrap()
                        .push(format!("{s} {}", String::from_utf8_lossy(&body))),
                    Err(e) => {
                        failures.lock().unwrap().push(format!("transport {e}"));
                        c = H1::connect(addr).await.unwrap();
                    }
                }
            }
            n
        }));
    }
    assert!(eventually(Duration::from_secs(5), || b2.requests() > 200).await);
    b2.kill();
    // Its connection tasks notice the kill on their next poll; after that nothing more counts.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let killed_at = b2.requests();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let others_before = b1.requests() + b3.requests();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} failures, first {:?}",
        failures.len(),
        failures.first()
    );
    assert_eq!(b2.requests(), killed_at, "nothing reached the killed instance");
    assert!(b1.requests() + b3.requests() > others_before, "siblings kept serving");
    assert!(total > 1000);
}

/// 9. The preview header with the right token reaches green; a wrong or missing one reaches blue;
/// the upstream never sees it. A preview listener serves only the inactive colour.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn preview_route() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let mut cfg = test_config();
    cfg.listeners.push(cutover_proxy::ListenerConfig {
        addr: "127.0.0.1:0".parse().unwrap(),
        preview: true,
    });
    let proxy = start_proxy(cfg, table(&[&blue], &[&green]));
    let addr = proxy.local_addrs()[0];
    let preview_addr = proxy.local_addrs()[1];
    let mut c = H1::connect(addr).await.unwrap();

    let get = |token: Option<&str>| {
        let mut b = Request::get("/headers").header("host", "web.test");
        if let Some(t) = token {
            b = b.header("x-cutover-preview", t);
        }
        b.body(empty()).unwrap()
    };
    assert_eq!(c.request(get(Some("let-me-preview"))).await.unwrap().2, "green");
    let seen = green.seen.last_headers.lock().unwrap().clone().unwrap();
    assert!(seen.get("x-cutover-preview").is_none(), "token stripped: {seen:?}");
    for wrong in [Some("wrong"), Some(""), Some("let-me-preview2"), None] {
        assert_eq!(c.request(get(wrong)).await.unwrap().2, "blue", "token {wrong:?}");
        let seen = blue.seen.last_headers.lock().unwrap().clone().unwrap();
        assert!(seen.get("x-cutover-preview").is_none());
    }
    let mut p = H1::connect(preview_addr).await.unwrap();
    assert_eq!(p.get("/").await.unwrap().2, "green");
    proxy.switch("web", Colour::Green).unwrap();
    assert_eq!(
        p.get("/").await.unwrap().2,
        "blue",
        "preview listener follows the inactive colour"
    );
    assert_eq!(c.request(get(Some("let-me-preview"))).await.unwrap().2, "blue");
}

/// Proxy headers as the upstream receives them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_sees_forwarding_headers() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let proxy = start_proxy(test_config(), table(&[&blue], &[&green]));
    let mut c = H1::connect(proxy.local_addrs()[0]).await.unwrap();
    let req = Request::get("/headers")
        .header("host", "shop.example:8080")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "secret")
        .header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .header("x-request-id", "req-42")
        .body(empty())
        .unwrap();
    c.request(req).await.unwrap();
    let h = blue.seen.last_headers.lock().unwrap().clone().unwrap();
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "shop.example:8080");
    assert_eq!(h["host"], "shop.example:8080");
    assert_eq!(
        h["traceparent"],
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    );
    assert_eq!(h["x-request-id"], "req-42");
    assert!(h.get("x-hop").is_none());
    c.get("/headers").await.unwrap();
    let h = blue.seen.last_headers.lock().unwrap().clone().unwrap();
    assert_eq!(h["x-request-id"].len(), 32, "generated when missing");
}

/// A stream still open at the drain deadline is cut there (the client sees the stream end in an
/// error), not left running on the old colour.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn open_stream_is_cut_at_drain_deadline() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let proxy = start_proxy(test_config(), table(&[&blue], &[&green]));
    let mut c = H1::connect(proxy.local_addrs()[0]).await.unwrap();
    let resp = c.open("/sse").await.unwrap();
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert_eq!(first.into_data().unwrap(), "data: first from blue\n\n");

    proxy.switch("web", Colour::Green).unwrap();
    let t = Instant::now();
    let report = proxy
        .drain(
            "web",
            Colour::Blue,
            Duration::from_millis(500),
            Duration::from_millis(100),
        )
        .await
        .unwrap();
    assert!(!report.completed);
    assert_eq!(report.cut_requests, 1);
    let end = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("stream ends after the deadline");
    assert!(matches!(end, Some(Err(_)) | None), "stream cut, not continued: {end:?}");
    assert!(t.elapsed() < Duration::from_secs(4));
}

/// Each colour counts exactly the requests it answered, by status class, across a switch.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn colour_counters_add_up_across_a_switch() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let proxy = start_proxy(test_config(), table(&[&blue], &[&green]));
    let mut c = H1::connect(proxy.local_addrs()[0]).await.unwrap();
    for _ in 0..50 {
        assert_eq!(c.get("/").await.unwrap().2, "blue");
    }
    proxy.switch("web", Colour::Green).unwrap();
    for _ in 0..30 {
        assert_eq!(c.get("/").await.unwrap().2, "green");
    }
    green.kill();
    // Nothing listens for green any more: answered 502 by the proxy, counted against green.
    assert_eq!(c.get("/").await.unwrap().0, 502);
    let t = proxy.table();
    let (b, g) = (
        t.service("web").unwrap().blue.stats(),
        t.service("web").unwrap().green.stats(),
    );
    assert_eq!((b.requests(), b.by_class[1], b.errors()), (50, 50, 0));
    assert_eq!((g.requests(), g.by_class[1], g.errors()), (31, 30, 1));
    assert!(g.quantile(0.99).is_some());
}
