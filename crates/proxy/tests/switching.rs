//! Switch semantics under load: real sockets, real upstreams, concurrent keep-alive clients.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cutover_proxy::Colour;
use http::Request;
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};
use support::*;

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
    let t = Instant::now();
    let report = drain_blue(&proxy, Duration::from_millis(500), Duration::from_millis(100))
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
    // After it, the proxy closes it with a Close frame saying "going away", to the client and
    // to the application on blue.
    assert_eq!(
        ws_close_code(&mut old, Duration::from_secs(5)).await,
        Some(Some(1001)),
        "old websocket closed with 1001 after the drain deadline"
    );
    // Polled on, the client answers the Close and sees the end of the stream.
    let end = tokio::time::timeout(Duration::from_secs(2), futures_util::StreamExt::next(&mut old)).await;
    assert!(matches!(end, Ok(None)), "the closing handshake completes: {end:?}");
    drop(old);
    let report = drain.await.unwrap();
    assert!(!report.completed);
    assert_eq!(report.closed_upgrades, 1);
    assert!(t.elapsed() < Duration::from_secs(3));
    assert!(
        eventually(Duration::from_secs(3), || blue.seen.ws_events.lock().unwrap().len()
            >= 5)
        .await,
        "blue's socket ends"
    );
    assert_eq!(
        *blue.seen.ws_events.lock().unwrap(),
        [
            "text hello",
            "text still there",
            "text before deadline",
            "close 1001",
            "end"
        ]
    );
    // The green one is untouched.
    assert_eq!(ws_echo(&mut new, "after").await, "green: after");
}

/// WebSockets still open at the drain deadline close at instants spread over the close window.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn websockets_open_at_the_drain_deadline_close_spread_over_the_window() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let proxy = start_proxy(test_config(), table(&[&blue], &[&green]));
    let addr = proxy.local_addrs()[0];
    let sockets = ws_open(addr, 10, "blue").await;
    let (deadline, window) = (Duration::from_millis(300), Duration::from_secs(2));
    let start = Instant::now();
    let drain = drain_blue(&proxy, deadline, window);
    let at = ws_close_times(sockets, start, Duration::from_secs(5)).await;
    let (first, last) = (at[0], at[at.len() - 1]);
    assert!(first >= deadline, "none closed before the deadline: {at:?}");
    assert!(
        last < deadline + window + Duration::from_millis(500),
        "last close at {last:?}"
    );
    // Ten instants drawn over 2 s all fall within 0.5 s of each other with odds of about 4e-5.
    assert!(last - first >= window / 4, "closes spread over the window: {at:?}");
    let report = drain.await.unwrap();
    assert!(!report.completed);
    assert_eq!(report.closed_upgrades, 10);
}

/// The other order: a shutdown with a long window is under way when a drain deadline passes. The
/// WebSockets close at the drain's instant, the earlier one, not at the shutdown's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drain_deadline_during_a_shutdown_window_closes_websockets_at_its_own_instant() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let mut cfg = test_config();
    // Closes at shutdown would be spread over (24 h - 1 s) / 2: one of five landing within the
    // drain's 200 ms has odds of about 2e-5 (with 60 s, about 3%, which a run did hit).
    cfg.shutdown_timeout = Duration::from_secs(24 * 3600);
    let proxy = start_proxy(cfg, table(&[&blue], &[&green]));
    let sockets = ws_open(proxy.local_addrs()[0], 5, "blue").await;
    proxy.shutdown();
    let start = Instant::now();
    let drain = drain_blue(&proxy, Duration::from_millis(200), Duration::ZERO);
    let at = ws_close_times(sockets, start, Duration::from_secs(5)).await;
    assert!(at[0] >= Duration::from_millis(200), "{at:?}");
    assert!(at[at.len() - 1] < Duration::from_millis(1500), "{at:?}");
    assert_eq!(drain.await.unwrap().closed_upgrades, 5);
}

/// WebSockets busy with messages of all sizes when their drain deadline comes: every message
/// answered before the close is whole and in order, every client gets a Close 1001 and no
/// protocol error, and the application sees each socket end cleanly with a Close 1001, whatever
/// frame was under way at the close instant.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn busy_websockets_closed_at_a_drain_deadline_end_cleanly_on_both_sides() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    const SOCKETS: usize = 20;
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let proxy = start_proxy(test_config(), table(&[&blue], &[&green]));
    let addr = proxy.local_addrs()[0];
    let mut clients = Vec::new();
    for n in 0..SOCKETS {
        let mut ws = ws_connect(addr).await;
        clients.push(tokio::spawn(async move {
            let sizes = [10usize, 3_000, 20_000, 70_000];
            let mut answered = 0u32;
            // Bounded: the proxy closes the socket within a few seconds; the count caps it anyway.
            for i in 0..100_000u32 {
                let fill = char::from(b'a' + ((n + i as usize) % 26) as u8);
                let text = format!("{n}-{i}-{}", fill.to_string().repeat(sizes[i as usize % 4]));
                if ws.send(Message::text(text.clone())).await.is_err() {
                    break;
                }
                let reply = tokio::time::timeout(Duration::from_secs(5), ws.next())
                    .await
                    .expect("an answer or the close in time");
                match reply {
                    Some(Ok(Message::Text(t))) => {
                        assert_eq!(t.as_str(), format!("blue: {text}"), "whole and in order");
                        answered += 1;
                    }
                    Some(Ok(Message::Close(c))) => {
                        let code = c.map(|f| u16::from(f.code));
                        // Polled on, the client answers the Close and the stream ends.
                        let end = tokio::time::timeout(Duration::from_secs(3), ws.next()).await;
                        assert!(
                            matches!(end, Ok(None)),
                            "socket {n}: the closing handshake completes: {end:?}"
                        );
                        return (answered, code);
                    }
                    other => panic!("socket {n}: {other:?} after {answered} answers"),
                }
            }
            panic!("socket {n} was never closed");
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let report = drain_blue(&proxy, Duration::from_millis(300), Duration::from_millis(500))
        .await
        .unwrap();
    assert_eq!(report.closed_upgrades, SOCKETS);
    let mut total = 0;
    for c in clients {
        let (answered, code) = c.await.unwrap();
        assert_eq!(code, Some(1001));
        assert!(answered > 0, "messages went through before the close");
        total += answered;
    }
    assert!(
        eventually(Duration::from_secs(3), || {
            blue.seen
                .ws_events
                .lock()
                .unwrap()
                .iter()
                .filter(|e| *e == "end")
                .count()
                == SOCKETS
        })
        .await,
        "every socket on blue ends cleanly"
    );
    let events = blue.seen.ws_events.lock().unwrap();
    assert_eq!(events.iter().filter(|e| *e == "close 1001").count(), SOCKETS);
    assert!(!events.iter().any(|e| e == "error"), "no protocol error on blue");
    // Messages the application received and echoed; the last few echoes may have been dropped
    // with the close, so blue saw at least as many as the clients got back.
    let texts = events.iter().filter(|e| e.starts_with("text ")).count();
    assert!(texts >= total as usize, "{texts} < {total}");
}

/// An upgrade through the proxy with a raw socket: the handshake written by hand, so that frames
/// can be cut anywhere.
async fn raw_upgrade(addr: std::net::SocketAddr, protocol: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: shop\r\nConnection: Upgrade\r\nUpgrade: {protocol}\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let end = read_head_and(&mut s, &mut head, |_| 0).await.expect("a response head");
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    assert_eq!(end, head.len(), "nothing after the 101 yet");
    s
}

/// A masked frame: its header and payload (`len` bytes of a counting pattern, or `text`).
fn masked_frame(opcode: u8, len: usize, text: Option<&[u8]>) -> (Vec<u8>, Vec<u8>) {
    let key = [0x11, 0x22, 0x33, 0x44];
    let plain: Vec<u8> = text.map_or_else(|| (0..len).map(|i| i as u8).collect(), |t| t.to_vec());
    let mut head = vec![0x80 | opcode];
    if plain.len() < 126 {
        head.push(0x80 | plain.len() as u8);
    } else {
        head.push(0x80 | 127);
        head.extend_from_slice(&(plain.len() as u64).to_be_bytes());
    }
    head.extend_from_slice(&key);
    let payload = plain.iter().enumerate().map(|(i, b)| b ^ key[i % 4]).collect();
    (head, payload)
}

/// An upstream that answers one upgrade to its protocol with a 101 and then keeps every byte it
/// receives, until the end of the stream, whose instant it notes. It never closes first.
struct RawUpgradeUpstream {
    addr: std::net::SocketAddr,
    received: Arc<Mutex<Vec<u8>>>,
    ended: Arc<Mutex<Option<Instant>>>,
}

impl RawUpgradeUpstream {
    /// Reads nothing for `pause` after its 101.
    async fn start(protocol: &'static str, pause: Duration) -> RawUpgradeUpstream {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let ended = Arc::new(Mutex::new(None));
        let (r, e) = (received.clone(), ended.clone());
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = Vec::new();
            let end = read_head_and(&mut s, &mut buf, |_| 0)
                .await
                .expect("an upgrade request");
            r.lock().unwrap().extend_from_slice(&buf[end..]);
            let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(b"dGhlIHNhbXBsZSBub25jZQ==");
            let resp = format!(
                "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: {protocol}\r\n\
                 Sec-WebSocket-Accept: {accept}\r\n\r\n"
            );
            s.write_all(resp.as_bytes()).await.unwrap();
            tokio::time::sleep(pause).await;
            let mut chunk = vec![0u8; 64 * 1024];
            while let Ok(n) = s.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
                r.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
            *e.lock().unwrap() = Some(Instant::now());
            // The socket stays open a while: only the proxy ends the connection.
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(s);
        });
        RawUpgradeUpstream { addr, received, ended }
    }

    /// A table with this upstream as blue and `green` as green.
    fn table(&self, green: &Upstream) -> cutover_proxy::RouteTable {
        let mut s = cutover_proxy::Service::new("web");
        s.blue = cutover_proxy::Pool::new(Some("v1"), vec![cutover_proxy::Instance::new(self.addr)]);
        s.green = cutover_proxy::Pool::new(Some("v2"), vec![cutover_proxy::Instance::new(green.addr)]);
        cutover_proxy::RouteTable::new(vec![s]).unwrap()
    }
}

/// A raw upstream as blue (see [`RawUpgradeUpstream::start`]), a test upstream as green, a
/// proxy in front, and a raw client upgraded to `protocol` through it.
async fn raw_tunnel(
    protocol: &'static str,
    pause: Duration,
) -> (
    RawUpgradeUpstream,
    Upstream,
    Arc<cutover_proxy::Proxy>,
    tokio::net::TcpStream,
) {
    let blue = RawUpgradeUpstream::start(protocol, pause).await;
    let green = Upstream::start("green").await;
    let proxy = start_proxy(test_config(), blue.table(&green));
    let s = raw_upgrade(proxy.local_addrs()[0], protocol).await;
    (blue, green, proxy, s)
}

/// Everything the proxy still sends on `s`, up to its FIN (within 3 s).
async fn rest_of_stream(s: &mut (impl tokio::io::AsyncRead + Unpin)) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut got))
        .await
        .expect("the end of the stream in time")
        .expect("a FIN");
    got
}

/// Switches to green and drains blue, with the deadline `deadline` from now and the close window
/// `window` (zero: blue's tunnels close at the deadline), in a task of its own.
fn drain_blue(
    proxy: &Arc<cutover_proxy::Proxy>,
    deadline: Duration,
    window: Duration,
) -> tokio::task::JoinHandle<cutover_proxy::DrainReport> {
    proxy.switch("web", Colour::Green).unwrap();
    let p = proxy.clone();
    tokio::spawn(async move { p.drain("web", Colour::Blue, deadline, window).await.unwrap() })
}

/// A close that comes while the client is in the middle of a frame: the upstream cannot answer a
/// Close yet, so the client gets the proxy's Close half way through the grace (nothing was under
/// way toward it); the upstream gets the rest of the frame, sent later within the grace, then its
/// Close, and nothing the client sent after the frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_websocket_closed_in_the_middle_of_a_frame_gets_the_whole_frame_then_the_close() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let proxy = start_proxy(test_config(), table(&[&blue], &[&green]));
    let s = raw_upgrade(proxy.local_addrs()[0], "websocket").await;
    let (mut r, mut w) = s.into_split();
    let (head, payload) = masked_frame(0x2, 200_000, None);
    w.write_all(&head).await.unwrap();
    w.write_all(&payload[..100_000]).await.unwrap();

    let start = Instant::now();
    let drain = drain_blue(&proxy, Duration::from_millis(200), Duration::ZERO);
    let mut frame = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(3), r.read_exact(&mut frame))
        .await
        .expect("a close frame in time")
        .unwrap();
    let at = start.elapsed();
    assert_eq!(frame, [0x88, 0x02, 0x03, 0xe9], "Close, 1001");
    assert!(
        at >= Duration::from_millis(200) && at < Duration::from_millis(1500),
        "{at:?}"
    );

    // Within the grace, the rest of the frame, and then a message the upstream must not get.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut rest = payload[100_000..].to_vec();
    let (late_head, late) = masked_frame(0x1, 0, Some(b"late"));
    rest.extend_from_slice(&late_head);
    rest.extend_from_slice(&late);
    w.write_all(&rest).await.unwrap();
    let after = rest_of_stream(&mut r).await;
    assert!(after.is_empty(), "nothing after the close frame: {after:?}");
    drop((r, w));
    assert!(
        eventually(Duration::from_secs(3), || blue.seen.ws_events.lock().unwrap().len()
            >= 3)
        .await,
        "{:?}",
        blue.seen.ws_events.lock().unwrap()
    );
    assert_eq!(
        *blue.seen.ws_events.lock().unwrap(),
        ["binary 200000", "close 1001", "end"]
    );
    assert_eq!(drain.await.unwrap().closed_upgrades, 1);
}

/// A frame that does not end within the grace after the close instant: the upstream gets exactly
/// the bytes the client sent, with no Close in the middle of the frame (that would corrupt it),
/// and then the end of the stream, once the grace is over. The client, whose upstream never
/// answers, gets its Close half way through the grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frame_that_does_not_end_within_the_grace_ends_with_a_fin_alone() {
    use tokio::io::AsyncWriteExt;
    let (blue, _green, proxy, mut s) = raw_tunnel("websocket", Duration::ZERO).await;
    let (head, payload) = masked_frame(0x2, 200_000, None);
    let mut sent = head.clone();
    sent.extend_from_slice(&payload[..100_000]);
    s.write_all(&sent).await.unwrap();
    assert!(
        eventually(Duration::from_secs(3), || blue.received.lock().unwrap().len()
            == sent.len())
        .await,
        "the upstream gets what was sent before the close"
    );

    let start = Instant::now();
    let drain = drain_blue(&proxy, Duration::from_millis(200), Duration::ZERO);
    let got = rest_of_stream(&mut s).await;
    assert_eq!(got, [0x88, 0x02, 0x03, 0xe9], "Close, 1001, then the end");
    assert!(start.elapsed() < Duration::from_millis(1500), "{:?}", start.elapsed());
    // The upstream's stream ends once the grace (1 s) after the close instant (200 ms) is over.
    assert!(
        eventually(Duration::from_secs(4), || blue.ended.lock().unwrap().is_some()).await,
        "blue's stream ends"
    );
    let ended = blue.ended.lock().unwrap().unwrap() - start;
    assert!(
        ended >= Duration::from_millis(1100) && ended < Duration::from_millis(2500),
        "ended {ended:?} after the drain began"
    );
    assert!(*blue.received.lock().unwrap() == sent, "nothing added to the frame");
    assert_eq!(drain.await.unwrap().closed_upgrades, 1);
}

/// A WebSocket whose application has begun the closing handshake (its Close went to the client,
/// which has not answered) gets no second Close toward the client at the close instant: that
/// would be a protocol error. The client sees the application's Close and then the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_sent_a_close_by_the_application_gets_no_second_one() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let proxy = start_proxy(test_config(), table(&[&blue], &[&green]));
    let mut s = raw_upgrade(proxy.local_addrs()[0], "websocket").await;
    let (head, payload) = masked_frame(0x1, 0, Some(b"close-me"));
    s.write_all(&head).await.unwrap();
    s.write_all(&payload).await.unwrap();
    let mut app_close = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(3), s.read_exact(&mut app_close))
        .await
        .expect("the application's close in time")
        .unwrap();
    assert_eq!(app_close, [0x88, 0x02, 0x0f, 0xa0], "Close, 4000");

    let start = Instant::now();
    let drain = drain_blue(&proxy, Duration::from_millis(200), Duration::ZERO);
    let got = rest_of_stream(&mut s).await;
    assert!(got.is_empty(), "no second close: {got:?}");
    assert!(start.elapsed() < Duration::from_millis(1500), "{:?}", start.elapsed());
    assert_eq!(drain.await.unwrap().closed_upgrades, 1);
}

/// The mirror case: the client has begun the closing handshake and the application has not
/// answered. At the close instant the application gets no second Close; the client gets the
/// answer it waits for, a Close 1001.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_application_sent_a_close_by_the_client_gets_no_second_one() {
    use tokio::io::AsyncWriteExt;
    let (blue, _green, proxy, mut s) = raw_tunnel("websocket", Duration::ZERO).await;
    let (head, payload) = masked_frame(0x8, 0, Some(&4001u16.to_be_bytes()));
    let mut close = head;
    close.extend_from_slice(&payload);
    s.write_all(&close).await.unwrap();
    assert!(eventually(Duration::from_secs(3), || *blue.received.lock().unwrap() == close).await);

    let drain = drain_blue(&proxy, Duration::from_millis(200), Duration::ZERO);
    let got = rest_of_stream(&mut s).await;
    assert_eq!(got, [0x88, 0x02, 0x03, 0xe9], "Close, 1001, then the end");
    drop(s);
    assert!(eventually(Duration::from_secs(3), || blue.ended.lock().unwrap().is_some()).await);
    assert!(
        *blue.received.lock().unwrap() == close,
        "no second close toward the application"
    );
    assert_eq!(drain.await.unwrap().closed_upgrades, 1);
}

/// A close that comes while the proxy's write of a frame to the upstream is stuck (the upstream
/// reads nothing for 700 ms; the close instant is at 200 ms): what the proxy had read is not lost, the frame is finished, and
/// the upstream gets exactly the frame and then a masked Close 1001, and not the message the
/// client sent after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_close_while_a_write_to_the_upstream_is_stuck_loses_nothing() {
    use tokio::io::AsyncWriteExt;
    let (head, payload) = masked_frame(0x2, 4 << 20, None);
    let mut frame = head;
    frame.extend_from_slice(&payload);
    let (late_head, late) = masked_frame(0x1, 0, Some(b"late"));
    let (blue, _green, proxy, s) = raw_tunnel("websocket", Duration::from_millis(700)).await;
    let start = Instant::now();
    let (mut r, mut w) = s.into_split();
    let writer = {
        let frame = frame.clone();
        tokio::spawn(async move {
            w.write_all(&frame).await.unwrap();
            w.write_all(&late_head).await.unwrap();
            w.write_all(&late).await.unwrap();
            w
        })
    };
    let drain = drain_blue(&proxy, Duration::from_millis(200), Duration::ZERO);
    tokio::time::sleep(Duration::from_millis(400)).await;
    // At most what came with the upgrade request's head: the frame is in flight at the close.
    let early = blue.received.lock().unwrap().len();
    assert!(
        early < 64 << 10 && start.elapsed() < Duration::from_millis(600),
        "the upstream has read {early} bytes already, {:?} in",
        start.elapsed()
    );
    let got = rest_of_stream(&mut r).await;
    assert_eq!(got, [0x88, 0x02, 0x03, 0xe9], "Close, 1001, then the end");
    assert!(start.elapsed() < Duration::from_secs(3));
    assert!(
        eventually(Duration::from_secs(4), || blue.received.lock().unwrap().len()
            >= frame.len() + 8)
        .await,
        "the whole frame and a close: {} of {} bytes",
        blue.received.lock().unwrap().len(),
        frame.len() + 8
    );
    let _w = writer.await.unwrap();
    let received = blue.received.lock().unwrap().clone();
    assert_eq!(received.len(), frame.len() + 8, "nothing after the close");
    assert!(received[..frame.len()] == frame[..], "the frame, byte for byte");
    let close = &received[frame.len()..];
    assert_eq!(&close[..2], &[0x88, 0x82], "a masked Close with two bytes of payload");
    assert_eq!([close[6] ^ close[2], close[7] ^ close[3]], [0x03, 0xe9], "1001");
    assert_eq!(drain.await.unwrap().closed_upgrades, 1);
}

/// A client that resets its connection ends the whole tunnel (well before the 5 s its upstream
/// waits): the upstream's side is
/// closed too, rather than left open waiting for the upstream to close first.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reset_from_the_client_ends_the_whole_tunnel() {
    use tokio::io::AsyncWriteExt;
    let (blue, _green, proxy, mut s) = raw_tunnel("websocket", Duration::ZERO).await;
    let (head, payload) = masked_frame(0x1, 0, Some(b"hi"));
    s.write_all(&head).await.unwrap();
    s.write_all(&payload).await.unwrap();
    assert!(eventually(Duration::from_secs(3), || blue.received.lock().unwrap().len() == 8).await);
    assert_eq!(proxy.open_connections(), 1);
    s.set_zero_linger().unwrap();
    drop(s);
    assert!(
        eventually(Duration::from_secs(3), || proxy.open_connections() == 0).await,
        "the tunnel ends"
    );
    assert!(eventually(Duration::from_secs(3), || blue.ended.lock().unwrap().is_some()).await);
}

/// An upgrade to another protocol knows no frames: at its close instant both sides get the end
/// of the stream and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upgrade_to_another_protocol_is_closed_with_a_fin_alone() {
    use tokio::io::AsyncWriteExt;
    let (blue, _green, proxy, mut s) = raw_tunnel("x-test", Duration::ZERO).await;
    s.write_all(b"hello").await.unwrap();
    assert!(eventually(Duration::from_secs(3), || *blue.received.lock().unwrap() == b"hello").await);

    let start = Instant::now();
    let drain = drain_blue(&proxy, Duration::from_millis(200), Duration::ZERO);
    let got = rest_of_stream(&mut s).await;
    let at = start.elapsed();
    assert!(got.is_empty(), "no bytes of the proxy's own: {got:?}");
    assert!(
        at >= Duration::from_millis(200) && at < Duration::from_millis(1500),
        "{at:?}"
    );
    assert!(eventually(Duration::from_secs(2), || blue.ended.lock().unwrap().is_some()).await);
    assert_eq!(*blue.received.lock().unwrap(), b"hello");
    assert_eq!(drain.await.unwrap().closed_upgrades, 1);
}

/// A shutdown that begins while WebSockets wait for their instant in a long drain window closes
/// them within the shutdown's own window instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shutdown_during_a_drain_window_closes_its_websockets_within_the_shutdown_window() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let mut cfg = test_config();
    cfg.shutdown_timeout = Duration::from_secs(2);
    let proxy = start_proxy(cfg, table(&[&blue], &[&green]));
    let addr = proxy.local_addrs()[0];
    let sockets = ws_open(addr, 5, "blue").await;
    proxy.switch("web", Colour::Green).unwrap();
    let p = proxy.clone();
    // A deadline right away, then a minute to spread the closes over.
    let drain = tokio::spawn(async move {
        p.drain("web", Colour::Blue, Duration::from_millis(100), Duration::from_secs(60))
            .await
            .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let start = Instant::now();
    proxy.shutdown();
    // Within the shutdown window ((2 s - 1 s) / 2) rather than the drain's minute.
    let at = ws_close_times(sockets, start, Duration::from_millis(2500)).await;
    assert!(at[at.len() - 1] < Duration::from_millis(1500), "{at:?}");
    drain.abort();
}

/// An instance whose connects hang (its accept queue is full, so the kernel drops the SYNs) counts
/// the requests waiting on it from the moment they pick it: under least in-flight the load goes on
/// to its sibling instead of piling onto an instance that looks idle until the connect timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_instance_whose_connects_hang_does_not_draw_the_load() {
    // A listener with a backlog of 0 that never accepts: one connection fills its queue.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let hole = socket.listen(0).unwrap();
    let hole_addr = hole.local_addr().unwrap();
    let _filler = tokio::net::TcpStream::connect(hole_addr).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), tokio::net::TcpStream::connect(hole_addr))
            .await
            .is_err(),
        "a connect to the full listener hangs"
    );

    let live = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let mut cfg = test_config();
    cfg.workers = 1;
    cfg.connect_timeout = Duration::from_secs(2);
    let mut svc = cutover_proxy::Service::new("web");
    svc.blue = cutover_proxy::Pool::new(
        Some("v1"),
        vec![
            cutover_proxy::Instance::new(hole_addr),
            cutover_proxy::Instance::new(live.addr),
        ],
    );
    svc.green = cutover_proxy::Pool::new(Some("v2"), vec![cutover_proxy::Instance::new(green.addr)]);
    let proxy = start_proxy(cfg, cutover_proxy::RouteTable::new(vec![svc]).unwrap());
    let addr = proxy.local_addrs()[0];

    // Four clients send back to back for 1 s, half the connect timeout.
    let start = Instant::now();
    let within = Duration::from_secs(1);
    let mut tasks = Vec::new();
    for _ in 0..4 {
        tasks.push(tokio::spawn(async move {
            let mut c = H1::connect(addr).await.unwrap();
            let mut answered_in_time = 0u64;
            while start.elapsed() < within {
                let (status, _, body) = c.get("/").await.unwrap();
                // A request that waited on the hole is sent again to the sibling after the
                // connect timeout: late, but not failed.
                assert_eq!((status.as_u16(), &body[..]), (200, &b"blue"[..]));
                if start.elapsed() < within {
                    answered_in_time += 1;
                }
            }
            answered_in_time
        }));
    }
    let mut answered = 0;
    for t in tasks {
        answered += t.await.unwrap();
    }
    // Counted only after the connect, every request would find the hole idle while the sibling is
    // busy, and all four clients would be waiting on it within a few requests.
    assert!(
        answered >= 100,
        "only {answered} requests answered in the first second: the clients waited on the hole"
    );
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

/// HTTP/2 streams share a connection without holding each other up: while the client leaves a
/// 20 MiB download unread, small requests on the same connection are answered; the download and
/// a 20 MiB streamed upload then arrive whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http2_streams_move_large_bodies_both_ways_without_holding_each_other_up() {
    let blue = Upstream::start("blue").await;
    let proxy = start_proxy(test_config(), table(&[&blue], &[]));
    let addr = proxy.local_addrs()[0];
    let h2 = h2_connect(addr).await.unwrap();
    let size: usize = 20 << 20;

    let mut big = h2.clone();
    let req = Request::get(format!("http://{addr}/slow?ms=0&size={size}"))
        .body(empty())
        .unwrap();
    let resp = big.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut download = resp.into_body();
    let first = download.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(first.starts_with(b"blue "));

    // The download waits, unread, with its flow-control window used up; others go on.
    let started = Instant::now();
    for _ in 0..20 {
        let mut small = h2.clone();
        let req = Request::get(format!("http://{addr}/")).body(empty()).unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(2), small.send_request(req))
            .await
            .expect("a small request is not held up by the unread download")
            .unwrap();
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "blue");
    }
    assert!(started.elapsed() < Duration::from_secs(5));

    let mut got = first.len();
    while let Some(frame) = download.frame().await {
        got += frame.unwrap().into_data().map_or(0, |d| d.len());
    }
    assert_eq!(got, size, "the download arrives whole");

    // A 20 MiB upload in 64 KiB chunks on the same connection.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut up = h2.clone();
    let req = Request::post(format!("http://{addr}/upload"))
        .body(ChannelBody(rx).boxed())
        .unwrap();
    let pending = tokio::spawn(async move {
        let resp = up.send_request(req).await.unwrap();
        resp.into_body().collect().await.unwrap().to_bytes()
    });
    let mut hasher = Sha256::new();
    for i in 0..(size / (64 << 10)) {
        let chunk = Bytes::from(vec![(i % 251) as u8; 64 << 10]);
        hasher.update(&chunk);
        tx.send(chunk).await.unwrap();
    }
    drop(tx);
    let answer = tokio::time::timeout(Duration::from_secs(30), pending)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer, format!("blue {} {size}", hex(&hasher.finalize())));
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
    // The first refused connect ejected it: picks pass it over.
    let ejected = |i: usize| proxy.table().service("web").unwrap().blue.instances[i].ejected();
    assert!(
        eventually(Duration::from_secs(2), || ejected(1)).await,
        "the killed instance is ejected"
    );
    assert!(!ejected(0) && !ejected(2), "its siblings are not");
    // Something listens on its address again and counts every connection it is offered: while
    // the instance is ejected, none comes.
    let attempts = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let listener = loop {
        match tokio::net::TcpListener::bind(b2.addr).await {
            Ok(l) => break l,
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    };
    let counted = attempts.clone();
    let counter = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::Relaxed);
            drop(s);
        }
    });
    let others_before = b1.requests() + b3.requests();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(ejected(1), "still ejected while this is checked");
    counter.abort();
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
    assert_eq!(
        attempts.load(Ordering::Relaxed),
        0,
        "no connection was made to the ejected instance"
    );
    assert!(b1.requests() + b3.requests() > others_before, "siblings kept serving");
    assert!(total > 1000);
}

/// An upstream that takes each request whole (head and body), counts it, and closes the
/// connection without answering: the instance crashed while handling it.
async fn swallowing_upstream(taken: Arc<Mutex<Vec<String>>>) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let taken = taken.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let Some(end) = read_head_and(&mut s, &mut buf, content_length).await else {
                    return;
                };
                let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                let method = head.split(' ').next().unwrap_or("").to_string();
                taken.lock().unwrap().push(method);
                // Dropped here: closed without a response.
            });
        }
    });
    addr
}

/// Once an upstream has taken a request, only a bodiless idempotent one is sent again (to a
/// sibling) when the connection breaks before any response byte; a request with a body or a
/// non-idempotent method is answered 502 and never sent twice; `retry_idempotent = false` turns
/// the replays off as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_bodiless_idempotent_requests_are_sent_again_after_the_upstream_took_them() {
    let taken = Arc::new(Mutex::new(Vec::<String>::new()));
    let (a, b) = (
        swallowing_upstream(taken.clone()).await,
        swallowing_upstream(taken.clone()).await,
    );
    let green = Upstream::start("green").await;
    let table = || {
        let mut s = cutover_proxy::Service::new("web");
        s.blue = cutover_proxy::Pool::new(
            Some("v1"),
            vec![cutover_proxy::Instance::new(a), cutover_proxy::Instance::new(b)],
        );
        s.green = cutover_proxy::Pool::new(Some("v2"), vec![cutover_proxy::Instance::new(green.addr)]);
        cutover_proxy::RouteTable::new(vec![s]).unwrap()
    };
    let replaying = start_proxy(test_config(), table());
    let mut cfg = test_config();
    cfg.retry_idempotent = false;
    let strict = start_proxy(cfg, table());

    let cases: [(&cutover_proxy::Proxy, &str, &str, &'static [u8], usize); 7] = [
        (&replaying, "POST", "/charge", b"amount=5", 1),
        (&replaying, "POST", "/charge", b"", 1),
        (&replaying, "PATCH", "/order/5", b"", 1),
        (&replaying, "PUT", "/order/5", b"{}", 1),
        (&replaying, "GET", "/order/5", b"", 2),
        (&replaying, "DELETE", "/order/5", b"", 2),
        (&strict, "GET", "/order/5", b"", 1),
    ];
    for (proxy, method, path, body, times) in cases {
        taken.lock().unwrap().clear();
        let mut c = H1::connect(proxy.local_addrs()[0]).await.unwrap();
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "web.test")
            .body(full(Bytes::from_static(body)))
            .unwrap();
        let (status, _, text) = c.request(req).await.unwrap();
        assert_eq!(status, 502, "{method} {path}: {text:?}");
        let seen = taken.lock().unwrap().clone();
        assert_eq!(
            seen,
            vec![method.to_string(); times],
            "{method} with a {}-byte body",
            body.len()
        );
    }
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
        tls: false,
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

/// A service with an HTTPS redirect answers live requests over plain HTTP with 308 to the same
/// URL over HTTPS (the port omitted when it is 443); the preview route is not redirected.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn plain_http_to_a_service_that_redirects_gets_308_to_https() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let proxy = start_proxy(test_config(), table(&[&blue], &[&green]));
    proxy
        .update(|t| {
            t.with_service("web", |s| {
                s.https_redirect = Some(8443);
                s.preview_token = Some(std::sync::Arc::from(&b"tok"[..]));
                Ok(())
            })
        })
        .unwrap();
    let mut c = H1::connect(proxy.local_addrs()[0]).await.unwrap();
    let req = |path: &str, preview: bool| {
        let mut b = Request::get(path).header("host", "shop.example:8080");
        if preview {
            b = b.header("x-cutover-preview", "tok");
        }
        b.body(empty()).unwrap()
    };
    let resp = c.request(req("/cart?item=7", false)).await.unwrap();
    assert_eq!(resp.0, 308);
    assert_eq!(resp.1["location"], "https://shop.example:8443/cart?item=7");
    assert_eq!(blue.requests(), 0, "nothing reached the upstream");
    let resp = c.request(req("/", true)).await.unwrap();
    assert_eq!(resp.0, 200, "the preview route is served as is");
    assert!(resp.2.starts_with(b"green"), "{:?}", resp.2);
    proxy
        .update(|t| {
            t.with_service("web", |s| {
                s.https_redirect = Some(443);
                Ok(())
            })
        })
        .unwrap();
    let resp = c.request(req("/", false)).await.unwrap();
    assert_eq!(resp.1["location"], "https://shop.example/");
}

/// `X-Forwarded-For`, `-Proto` and `-Host` sent by a client are replaced unless the client is
/// one of `trusted_proxies`, whose chain is kept (the peer appended) and whose claims are passed
/// on: over real sockets, the same client trusted by one proxy and not by another.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forwarded_headers_are_believed_only_from_trusted_proxies() {
    let blue = Upstream::start("blue").await;
    let claims = || {
        Request::get("/headers")
            .header("host", "shop.example")
            .header("x-forwarded-for", "203.0.113.9")
            .header("x-forwarded-proto", "https")
            .header("x-forwarded-host", "www.shop.example")
            .body(empty())
            .unwrap()
    };
    let untrusting = start_proxy(test_config(), table(&[&blue], &[]));
    let mut c = H1::connect(untrusting.local_addrs()[0]).await.unwrap();
    c.request(claims()).await.unwrap();
    let h = blue.seen.last_headers.lock().unwrap().clone().unwrap();
    assert_eq!(h["x-forwarded-for"], "127.0.0.1", "an untrusted chain is replaced");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "shop.example");

    let mut cfg = test_config();
    cfg.trusted_proxies = vec![cutover_proxy::Cidr::parse("127.0.0.0/8").unwrap()];
    let trusting = start_proxy(cfg, table(&[&blue], &[]));
    let mut c = H1::connect(trusting.local_addrs()[0]).await.unwrap();
    c.request(claims()).await.unwrap();
    let h = blue.seen.last_headers.lock().unwrap().clone().unwrap();
    assert_eq!(h["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "https");
    assert_eq!(h["x-forwarded-host"], "www.shop.example");
    assert_eq!(h["host"], "shop.example", "the Host that routed it");
}

/// With `proxy_protocol`, a connection from a trusted proxy begins with a PROXY header (v1 or
/// v2) and the client it names is the one the upstream hears of; a connection from a trusted
/// proxy without one, or with a malformed one, is closed unanswered and reaches nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_proxy_protocol_header_from_a_trusted_proxy_names_the_client() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let blue = Upstream::start("blue").await;
    let mut cfg = test_config();
    cfg.trusted_proxies = vec![cutover_proxy::Cidr::parse("127.0.0.0/8").unwrap()];
    cfg.proxy_protocol = true;
    let proxy = start_proxy(cfg, table(&[&blue], &[]));
    let addr = proxy.local_addrs()[0];
    let send = |header: Vec<u8>| async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut bytes = header;
        bytes.extend_from_slice(
            b"GET /headers HTTP/1.1\r\nHost: shop.example\r\nX-Forwarded-For: 6.6.6.6\r\nConnection: close\r\n\r\n",
        );
        s.write_all(&bytes).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    };
    let answer = send(b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 80\r\n".to_vec()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let h = blue.seen.last_headers.lock().unwrap().clone().unwrap();
    assert_eq!(
        h["x-forwarded-for"], "203.0.113.7",
        "the client the header names; its own claim is not believed"
    );

    let mut v2 = vec![
        0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a, 0x21, 0x21, 0, 36,
    ];
    v2.extend_from_slice(&"2001:db8::7".parse::<std::net::Ipv6Addr>().unwrap().octets());
    v2.extend_from_slice(&"2001:db8::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
    v2.extend_from_slice(&443u16.to_be_bytes());
    v2.extend_from_slice(&443u16.to_be_bytes());
    let answer = send(v2).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let h = blue.seen.last_headers.lock().unwrap().clone().unwrap();
    assert_eq!(h["x-forwarded-for"], "2001:db8::7");

    let before = blue.requests();
    assert_eq!(send(Vec::new()).await, "", "no header: closed unanswered");
    assert_eq!(
        send(b"PROXY TCP4 nonsense\r\n".to_vec()).await,
        "",
        "a malformed header: closed unanswered"
    );
    assert_eq!(blue.requests(), before, "nothing reached the upstream");
}

/// A request body with a declared length reaches the upstream with that length, whichever
/// protocol the client spoke; one without goes chunked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn request_bodies_keep_their_declared_length_upstream() {
    let blue = Upstream::start("blue").await;
    let proxy = start_proxy(test_config(), table(&[&blue], &[]));
    let addr = proxy.local_addrs()[0];
    let body = b"twelve bytes";
    let sum = hex(&Sha256::digest(body));
    let framing = |h: &http::HeaderMap| {
        (
            h.get("content-length").map(|v| v.to_str().unwrap().to_string()),
            h.get("transfer-encoding").map(|v| v.to_str().unwrap().to_string()),
        )
    };
    let last = || {
        blue.seen
            .last_headers
            .lock()
            .unwrap()
            .take()
            .expect("upstream saw the upload")
    };

    // HTTP/2 with content-length.
    let mut h2 = h2_connect(addr).await.unwrap();
    let req = Request::post(format!("http://{addr}/upload"))
        .header("content-length", "12")
        .body(full(Bytes::from_static(body)))
        .unwrap();
    let resp = h2.send_request(req).await.unwrap();
    let text = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(text, format!("blue {sum} 12"));
    assert_eq!(framing(&last()), (Some("12".to_string()), None));

    // HTTP/2 without: its DATA frames go upstream chunked.
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let req = Request::post(format!("http://{addr}/upload"))
        .body(ChannelBody(rx).boxed())
        .unwrap();
    let pending = tokio::spawn({
        let mut h2 = h2.clone();
        async move {
            h2.send_request(req)
                .await
                .unwrap()
                .into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
        }
    });
    tx.send(Bytes::from_static(&body[..5])).await.unwrap();
    tx.send(Bytes::from_static(&body[5..])).await.unwrap();
    drop(tx);
    assert_eq!(pending.await.unwrap(), format!("blue {sum} 12"));
    assert_eq!(framing(&last()), (None, Some("chunked".to_string())));

    // HTTP/1.0 with Content-Length.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"POST /upload HTTP/1.0\r\nHost: web.test\r\nContent-Length: 12\r\n\r\ntwelve bytes")
        .await
        .unwrap();
    let mut resp = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut resp))
        .await
        .expect("HTTP/1.0 answer and close in time")
        .unwrap();
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.starts_with("HTTP/1.") && resp.contains(" 200 "), "{resp}");
    assert!(resp.ends_with(&format!("blue {sum} 12")), "{resp}");
    assert_eq!(framing(&last()), (Some("12".to_string()), None));

    // An empty body declared as such: a POST keeps its `Content-Length: 0`.
    let mut c = H1::connect(addr).await.unwrap();
    let req = Request::post("/upload")
        .header("host", "web.test")
        .header("content-length", "0")
        .body(empty())
        .unwrap();
    let (status, _, text) = c.request(req).await.unwrap();
    assert_eq!(
        (status.as_u16(), &text[..]),
        (200, format!("blue {} 0", hex(&Sha256::digest(b""))).as_bytes())
    );
    assert_eq!(framing(&last()), (Some("0".to_string()), None));
}

/// A stream still open at the drain deadline is cut there (the client sees the stream end in an
/// error), not left running on the old colour.
/// Streams (SSE) still open at the drain deadline are cut at instants spread over the close
/// window, as WebSockets are, so that their clients do not all reconnect at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_open_at_the_drain_deadline_are_cut_spread_over_the_window() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let proxy = start_proxy(test_config(), table(&[&blue], &[&green]));
    let addr = proxy.local_addrs()[0];
    let mut bodies = Vec::new();
    for _ in 0..20 {
        let mut c = H1::connect(addr).await.unwrap();
        let resp = c.open("/sse").await.unwrap();
        let mut body = resp.into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "data: first from blue\n\n");
        bodies.push((c, body));
    }
    let (deadline, window) = (Duration::from_millis(300), Duration::from_secs(2));
    let start = Instant::now();
    let drain = drain_blue(&proxy, deadline, window);
    let ends: Vec<_> = bodies
        .into_iter()
        .map(|(c, mut body)| {
            tokio::spawn(async move {
                let _c = c;
                let end = tokio::time::timeout(Duration::from_secs(10), body.frame())
                    .await
                    .expect("the stream ends within the window");
                assert!(matches!(end, Some(Err(_)) | None), "stream cut, not continued: {end:?}");
                start.elapsed()
            })
        })
        .collect();
    let mut at = Vec::new();
    for e in ends {
        at.push(e.await.unwrap());
    }
    at.sort();
    let (first, last) = (at[0], at[at.len() - 1]);
    assert!(first >= deadline, "none cut before the deadline: {at:?}");
    assert!(
        last < deadline + window + Duration::from_millis(500),
        "last cut at {last:?}"
    );
    // Twenty instants drawn over 2 s all fall within 1 s of each other with odds of about 2e-5.
    assert!(
        last - first >= window / 2,
        "cuts spread over at least half the window: {at:?}"
    );
    let report = drain.await.unwrap();
    assert!(!report.completed);
    assert_eq!(report.cut_requests, 20);
}

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

    let t = Instant::now();
    let report = drain_blue(&proxy, Duration::from_millis(500), Duration::from_millis(100))
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

/// A stream whose client has stopped reading when the drain deadline comes: it is cut at the
/// deadline, or, if the connection's writer is waiting on the client and does not take from the
/// stream then, as soon as the client reads again. Either way the client gets what was already
/// under way and then the end, never the whole response, and the drained colour is let go.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_whose_client_stopped_reading_is_cut_at_the_deadline_or_once_it_reads_again() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const SIZE: usize = 32 << 20;
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let mut cfg = test_config();
    cfg.send_timeout = Duration::from_secs(30);
    let proxy = start_proxy(cfg, table(&[&blue], &[&green]));
    let mut s = tokio::net::TcpStream::connect(proxy.local_addrs()[0]).await.unwrap();
    s.write_all(format!("GET /slow?ms=0&size={SIZE} HTTP/1.1\r\nHost: shop\r\n\r\n").as_bytes())
        .await
        .unwrap();
    // The client reads nothing: the response fills the sockets and the proxy's write waits.
    assert!(in_flight_reaches(&proxy, Colour::Blue, 1).await);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let drained = proxy.table().service("web").unwrap().blue.generation().clone();
    let report = drain_blue(&proxy, Duration::from_millis(300), Duration::from_millis(100))
        .await
        .unwrap();
    assert!(!report.completed);
    assert_eq!(report.cut_requests, 1);
    // Cut at the deadline (the colour is let go now, the client learns of it when it reads), or,
    // when the connection's writer was waiting on the client and did not take from the stream at
    // the deadline, still counted: then it must be cut as soon as the client reads again.
    let cut_at_deadline = match drained.in_flight() {
        0 => true,
        1 => false,
        n => panic!("{n} requests counted on the drained colour, one was sent"),
    };

    // The client reads again: it gets what was already under way, then the end, not the rest.
    let mut got = 0usize;
    let mut chunk = vec![0u8; 1 << 20];
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match s.read(&mut chunk).await {
                Ok(0) => return "fin",
                Ok(n) => got += n,
                Err(_) => return "reset",
            }
        }
    })
    .await
    .expect("the stream ends once the client reads");
    assert!(got < SIZE, "cut after {got} bytes ({end}), not sent whole");
    if !cut_at_deadline {
        assert!(
            eventually(Duration::from_secs(1), || drained.in_flight() == 0).await,
            "cut and let go once the client read again"
        );
    }
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

/// A gradual switch without affinity: each step sends its share of the requests (drawn per
/// request) to green; the switch that completes it sends them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gradual_switch_sends_each_steps_share_of_requests() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let proxy = start_proxy(test_config(), table(&[&blue], &[&green]));
    let mut h1 = H1::connect(proxy.local_addrs()[0]).await.unwrap();
    // Binomial bounds at 5 standard deviations.
    proxy.split("web", Colour::Green, 100_000).unwrap();
    let at_10 = green_of(&mut h1, 2000).await;
    assert!((133..=267).contains(&at_10), "{at_10} of 2000 at 10%");
    proxy.split("web", Colour::Green, 500_000).unwrap();
    let at_50 = green_of(&mut h1, 2000).await;
    assert!((888..=1112).contains(&at_50), "{at_50} of 2000 at 50%");
    assert!(proxy.switch("web", Colour::Green).unwrap());
    assert_eq!(proxy.table().service("web").unwrap().split(), None);
    assert_eq!(green_of(&mut h1, 200).await, 200);
    // A split ended by a share of 0: everything on the live colour.
    proxy.split("web", Colour::Blue, 300_000).unwrap();
    proxy.split("web", Colour::Blue, 0).unwrap();
    assert_eq!(green_of(&mut h1, 200).await, 200);
    proxy.shutdown();
}

/// How many of `n` GETs on `h1` green answered.
async fn green_of(h1: &mut H1, n: usize) -> usize {
    let mut green = 0;
    for _ in 0..n {
        let (status, _, body) = h1.get("/").await.unwrap();
        assert_eq!(status, 200);
        if colour_of(&body) == Some(Colour::Green) {
            green += 1;
        }
    }
    green
}
