//! TLS listeners with real rustls clients and certificates made at test time (rcgen): SNI,
//! ALPN, certificate swaps, switches and WebSocket drains over TLS, stalled handshakes, and
//! the wrong protocol on either kind of port.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cutover_proxy::{CertificateSet, Colour, ListenerConfig, Pool, Proxy, ProxyConfig, RouteTable, Service};
use http::{Request, StatusCode, Version};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

// ---------------------------------------------------------------------------------------------
// Certificates and clients.

/// A TLS client connection to `addr` naming `name` (SNI, and the name the certificate must be
/// valid for).
async fn tls_connect(
    addr: SocketAddr,
    name: &str,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from(name.to_string()).unwrap();
    tokio_rustls::TlsConnector::from(config).connect(name, tcp).await
}

fn presented(tls: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    tls.get_ref().1.peer_certificates().expect("a certificate")[0]
        .clone()
        .into_owned()
}

fn alpn(tls: &TlsStream<TcpStream>) -> Option<Vec<u8>> {
    tls.get_ref().1.alpn_protocol().map(|p| p.to_vec())
}

/// An HTTP/1.1 keep-alive client over TLS.
async fn h1_over(tls: TlsStream<TcpStream>) -> hyper::client::conn::http1::SendRequest<BoxBody> {
    let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("h1 handshake");
    tokio::spawn(conn);
    tx
}

/// `tx` once it can take the next request.
async fn ready(
    tx: &mut hyper::client::conn::http1::SendRequest<BoxBody>,
) -> &mut hyper::client::conn::http1::SendRequest<BoxBody> {
    tx.ready().await.expect("the connection can take a request");
    tx
}

/// An HTTP/2 client over TLS.
async fn h2_over(tls: TlsStream<TcpStream>) -> Result<hyper::client::conn::http2::SendRequest<BoxBody>, hyper::Error> {
    let (tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    Ok(tx)
}

fn get(host: &str, path: &str) -> Request<BoxBody> {
    Request::get(path).header("host", host).body(empty()).unwrap()
}

fn get_h2(host: &str, path: &str) -> Request<BoxBody> {
    Request::get(format!("https://{host}{path}")).body(empty()).unwrap()
}

async fn body_of(resp: http::Response<hyper::body::Incoming>) -> (StatusCode, Version, Bytes) {
    let (parts, body) = resp.into_parts();
    (parts.status, parts.version, body.collect().await.unwrap().to_bytes())
}

// ---------------------------------------------------------------------------------------------
// Proxies.

/// A proxy with one plain and one TLS listener (in that order in `local_addrs`).
fn tls_config() -> ProxyConfig {
    let mut cfg = test_config();
    cfg.listeners.push(ListenerConfig {
        addr: "127.0.0.1:0".parse().unwrap(),
        preview: false,
        tls: true,
    });
    cfg
}

/// Services `a` (host a.test) and `b` (host b.test), each on its own upstreams.
fn two_hosts(a: &Upstream, b: &Upstream) -> RouteTable {
    let service = |name: &str, host: &str, up: &Upstream| {
        let mut s = Service::new(name);
        s.hosts = vec![host.to_string()];
        s.blue = Pool::new(Some("v1"), vec![cutover_proxy::Instance::new(up.addr)]);
        s
    };
    RouteTable::new(vec![service("a", "a.test", a), service("b", "b.test", b)]).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Tests.

/// The tests of this file run one at a time: one of them measures the process's CPU time, which
/// the others (a switch under load, a drain) would fill.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// SNI picks each host's certificate, and the default one for any other name; without a
/// default, a name no certificate covers fails its handshake. Each certificate verifies with
/// the client's CA for its name, and the request reaches the host's service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_each_hosts_certificate_and_the_default_for_other_names() {
    let _serial = SERIAL.lock().await;
    let (up_a, up_b) = (Upstream::start("blue").await, Upstream::start("green").await);
    let proxy = start_proxy(tls_config(), two_hosts(&up_a, &up_b));
    let addr = proxy.local_addrs()[1];
    let ca = Ca::new();
    let (a, b, default) = (ca.issue(&["a.test"]), ca.issue(&["b.test"]), ca.issue(&["other.test"]));
    let mut set = CertificateSet::new();
    set.insert_host("a.test", a.load());
    set.insert_host("b.test", b.load());
    proxy.set_certificates(set.clone()).unwrap();
    let client = ca.client(&[b"http/1.1"]);

    for (name, cert, colour) in [("a.test", &a, "blue"), ("b.test", &b, "green")] {
        let tls = tls_connect(addr, name, client.clone()).await.expect("handshake");
        assert_eq!(presented(&tls), cert.der, "{name} gets its own certificate");
        let mut tx = h1_over(tls).await;
        let (status, _, body) = body_of(tx.send_request(get(name, "/")).await.unwrap()).await;
        assert_eq!((status, &body[..]), (StatusCode::OK, colour.as_bytes()), "{name}");
    }
    // No default: a name nobody covers gets an alert instead of some other host's certificate.
    let e = tls_connect(addr, "other.test", client.clone())
        .await
        .expect_err("no certificate");
    assert!(e.to_string().contains("alert"), "{e}");

    set.set_default(default.load());
    proxy.set_certificates(set).unwrap();
    let tls = tls_connect(addr, "other.test", client.clone())
        .await
        .expect("handshake");
    assert_eq!(presented(&tls), default.der, "other names get the default");
    let tls = tls_connect(addr, "A.TEST", client.clone()).await.expect("handshake");
    assert_eq!(presented(&tls), a.der, "names match without case");
}

/// ALPN: a client offering h2 speaks HTTP/2, one offering http/1.1 (or nothing) HTTP/1.1. On
/// TLS, HTTP/2 comes from ALPN alone: the prior-knowledge preface on a connection that did not
/// choose h2 is not taken as HTTP/2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_h2_and_http11_both_work_and_h2_comes_from_alpn_alone() {
    let _serial = SERIAL.lock().await;
    let (blue, green) = (Upstream::start("blue").await, Upstream::start("green").await);
    let proxy = start_proxy(tls_config(), table(&[&blue], &[&green]));
    let addr = proxy.local_addrs()[1];
    let ca = Ca::new();
    let mut set = CertificateSet::new();
    set.set_default(ca.issue(&["web.test"]).load());
    proxy.set_certificates(set).unwrap();

    let tls = tls_connect(addr, "web.test", ca.client(&[b"h2", b"http/1.1"]))
        .await
        .unwrap();
    assert_eq!(alpn(&tls).as_deref(), Some(&b"h2"[..]));
    let mut h2 = h2_over(tls).await.unwrap();
    for _ in 0..3 {
        let (status, version, body) = body_of(h2.send_request(get_h2("web.test", "/")).await.unwrap()).await;
        assert_eq!(
            (status, version, &body[..]),
            (StatusCode::OK, Version::HTTP_2, &b"blue"[..])
        );
    }

    let tls = tls_connect(addr, "web.test", ca.client(&[b"http/1.1"])).await.unwrap();
    assert_eq!(alpn(&tls).as_deref(), Some(&b"http/1.1"[..]));
    let mut h1 = h1_over(tls).await;
    for _ in 0..3 {
        let (status, version, body) =
            body_of(ready(&mut h1).await.send_request(get("web.test", "/")).await.unwrap()).await;
        assert_eq!(
            (status, version, &body[..]),
            (StatusCode::OK, Version::HTTP_11, &b"blue"[..])
        );
    }

    let tls = tls_connect(addr, "web.test", ca.client(&[])).await.unwrap();
    assert_eq!(alpn(&tls), None);
    let mut h1 = h1_over(tls).await;
    let (status, version, _) = body_of(ready(&mut h1).await.send_request(get("web.test", "/")).await.unwrap()).await;
    assert_eq!(
        (status, version),
        (StatusCode::OK, Version::HTTP_11),
        "no ALPN: HTTP/1.1"
    );

    // The HTTP/2 preface without ALPN h2: HTTP/1 refuses it, no HTTP/2 session starts.
    let tls = tls_connect(addr, "web.test", ca.client(&[b"http/1.1"])).await.unwrap();
    let h2 = tokio::time::timeout(Duration::from_secs(5), async {
        let mut tx = h2_over(tls).await?;
        tx.send_request(get_h2("web.test", "/")).await
    })
    .await
    .expect("an answer in time");
    assert!(h2.is_err(), "HTTP/2 without ALPN h2 must not be served: {h2:?}");
}

/// `X-Forwarded-Proto` is `https` on a TLS listener and `http` on a plain one, whatever the
/// client claims.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_forwarded_proto_is_https_on_tls_listeners_only() {
    let _serial = SERIAL.lock().await;
    let (blue, green) = (Upstream::start("blue").await, Upstream::start("green").await);
    let proxy = start_proxy(tls_config(), table(&[&blue], &[&green]));
    let (plain, tls_addr) = (proxy.local_addrs()[0], proxy.local_addrs()[1]);
    let ca = Ca::new();
    let mut set = CertificateSet::new();
    set.set_default(ca.issue(&["web.test"]).load());
    proxy.set_certificates(set).unwrap();
    let proto = || {
        blue.seen
            .last_headers
            .lock()
            .unwrap()
            .as_ref()
            .unwrap()
            .get_all("x-forwarded-proto")
            .iter()
            .cloned()
            .collect::<Vec<_>>()
    };
    let claim = |req: Request<BoxBody>| {
        let (mut parts, body) = req.into_parts();
        parts.headers.insert("x-forwarded-proto", "http".parse().unwrap());
        Request::from_parts(parts, body)
    };

    let mut h1 = h1_over(
        tls_connect(tls_addr, "web.test", ca.client(&[b"http/1.1"]))
            .await
            .unwrap(),
    )
    .await;
    let (status, _, _) = body_of(
        ready(&mut h1)
            .await
            .send_request(claim(get("web.test", "/headers")))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(proto(), ["https"], "HTTP/1.1 over TLS");

    let mut h2 = h2_over(tls_connect(tls_addr, "web.test", ca.client(&[b"h2"])).await.unwrap())
        .await
        .unwrap();
    let (status, _, _) = body_of(h2.send_request(claim(get_h2("web.test", "/headers"))).await.unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(proto(), ["https"], "HTTP/2 over TLS");

    let mut c = H1::connect(plain).await.unwrap();
    let (status, _, _) = c.get("/headers").await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(proto(), ["http"], "plain HTTP");
}

/// Keep-alive HTTPS clients (HTTP/1.1 and HTTP/2) send continuously while the live colour flips
/// 100+ times: no request fails and every response comes from a colour that was live during it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_switch_under_https_keep_alive_load_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let (blue, green) = (Upstream::start("blue").await, Upstream::start("green").await);
    let proxy = start_proxy(tls_config(), table(&[&blue], &[&green]));
    let addr = proxy.local_addrs()[1];
    let ca = Ca::new();
    let mut set = CertificateSet::new();
    set.set_default(ca.issue(&["web.test"]).load());
    proxy.set_certificates(set).unwrap();
    let log = SwitchLog::new(Colour::Blue);
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut clients = Vec::new();
    for i in 0..6 {
        let h2 = i % 2 == 1;
        let (stop, ok, failures, log) = (stop.clone(), ok.clone(), failures.clone(), log.clone());
        let config = ca.client(if h2 { &[b"h2"] } else { &[b"http/1.1"] });
        clients.push(tokio::spawn(async move {
            let tls = tls_connect(addr, "web.test", config.clone()).await.expect("connect");
            let (mut h1, mut h2c) = if h2 {
                (None, Some(h2_over(tls).await.unwrap()))
            } else {
                (Some(h1_over(tls).await), None)
            };
            let mut seen = [0u64; 2];
            for _ in 0..1_000_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let start = Instant::now();
                let sent = match (&mut h1, &mut h2c) {
                    (Some(tx), _) => match tx.ready().await {
                        Ok(()) => tx.send_request(get("web.test", "/")).await,
                        Err(e) => Err(e),
                    },
                    (_, Some(tx)) => tx.send_request(get_h2("web.test", "/")).await,
                    _ => unreachable!(),
                };
                match sent {
                    Ok(resp) => {
                        let (status, _, body) = body_of(resp).await;
                        match colour_of(&body) {
                            Some(col) if status == 200 => {
                                if !log.was_live(col, start, Instant::now()) {
                                    failures
                                        .lock()
                                        .unwrap()
                                        .push(format!("{col} answered but was not live"));
                                }
                                seen[(col == Colour::Green) as usize] += 1;
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            _ => failures.lock().unwrap().push(format!("{status} {body:?}")),
                        }
                    }
                    Err(e) => failures.lock().unwrap().push(format!("transport: {e}")),
                }
            }
            seen
        }));
    }
    let started = Instant::now();
    let mut to = Colour::Green;
    while started.elapsed() < Duration::from_secs(4) || log.len() < 100 {
        log.switch(&proxy, "web", to);
        to = to.other();
        tokio::time::sleep(Duration::from_millis(20)).await;
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
    let total = ok.load(Ordering::Relaxed);
    assert!(total > 500, "too little traffic to mean anything: {total}");
    assert!(
        per_colour[0] > 0 && per_colour[1] > 0,
        "both colours served: {per_colour:?}"
    );
    eprintln!(
        "{total} HTTPS requests over {} switches, blue {} green {}",
        log.len(),
        per_colour[0],
        per_colour[1]
    );
}

type Wss = tokio_tungstenite::WebSocketStream<TlsStream<TcpStream>>;

async fn wss_connect(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Wss {
    let tls = tls_connect(addr, "web.test", config).await.unwrap();
    let (ws, resp) = tokio_tungstenite::client_async("wss://web.test/ws", tls)
        .await
        .expect("websocket handshake");
    assert_eq!(resp.status(), 101);
    ws
}

async fn wss_echo(ws: &mut Wss, text: &str) -> String {
    use futures_util::{SinkExt, StreamExt};
    ws.send(tokio_tungstenite::tungstenite::Message::text(text))
        .await
        .unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("echo in time")
        {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) => return t.to_string(),
            Some(Ok(_)) => continue,
            other => panic!("websocket ended: {other:?}"),
        }
    }
}

/// WebSockets over TLS (wss) drain as over plain TCP: after a switch they stay on their colour
/// until the drain deadline, then each gets a Close 1001 at an instant spread over the close
/// window, and the application sees each end cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wss_websockets_drain_as_over_plain_tcp() {
    let _serial = SERIAL.lock().await;
    use futures_util::StreamExt;
    let (blue, green) = (Upstream::start("blue").await, Upstream::start("green").await);
    let proxy = start_proxy(tls_config(), table(&[&blue], &[&green]));
    let addr = proxy.local_addrs()[1];
    let ca = Ca::new();
    let mut set = CertificateSet::new();
    set.set_default(ca.issue(&["web.test"]).load());
    proxy.set_certificates(set).unwrap();
    let client = ca.client(&[b"http/1.1"]);
    let mut sockets = Vec::new();
    for i in 0..8 {
        let mut ws = wss_connect(addr, client.clone()).await;
        assert_eq!(wss_echo(&mut ws, &i.to_string()).await, format!("blue: {i}"));
        sockets.push(ws);
    }
    proxy.switch("web", Colour::Green).unwrap();
    let mut new = wss_connect(addr, client.clone()).await;
    assert_eq!(wss_echo(&mut new, "new").await, "green: new");
    assert_eq!(
        wss_echo(&mut sockets[0], "still").await,
        "blue: still",
        "old ones stay on blue"
    );

    let (deadline, window) = (Duration::from_millis(500), Duration::from_secs(2));
    let start = Instant::now();
    let p = proxy.clone();
    let drain = tokio::spawn(async move { p.drain("web", Colour::Blue, deadline, window).await.unwrap() });
    let closes: Vec<_> = sockets
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                let code = tokio::time::timeout(Duration::from_secs(6), async {
                    loop {
                        match ws.next().await {
                            Some(Ok(tokio_tungstenite::tungstenite::Message::Close(c))) => {
                                return Some(c.map_or(0, |f| u16::from(f.code)))
                            }
                            None | Some(Err(_)) => return None,
                            Some(Ok(_)) => {}
                        }
                    }
                })
                .await
                .expect("closed in time");
                assert_eq!(code, Some(1001), "a Close frame with 1001 (going away)");
                let at = start.elapsed();
                // The closing handshake completes over TLS too.
                let end = tokio::time::timeout(Duration::from_secs(2), ws.next()).await;
                assert!(matches!(end, Ok(None)), "the closing handshake completes: {end:?}");
                at
            })
        })
        .collect();
    let mut at = Vec::new();
    for c in closes {
        at.push(c.await.unwrap());
    }
    at.sort();
    assert!(at[0] >= deadline, "none closed before the deadline: {at:?}");
    assert!(
        at[at.len() - 1] < deadline + window + Duration::from_millis(700),
        "{at:?}"
    );
    assert!(
        at[at.len() - 1] - at[0] >= window / 4,
        "closes spread over the window: {at:?}"
    );
    let report = drain.await.unwrap();
    assert_eq!(report.closed_upgrades, 8);
    assert!(
        eventually(Duration::from_secs(3), || blue
            .seen
            .ws_events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| *e == "end")
            .count()
            == 8)
        .await,
        "every socket ends cleanly at the application: {:?}",
        blue.seen.ws_events.lock().unwrap()
    );
    assert_eq!(
        wss_echo(&mut new, "after").await,
        "green: after",
        "the green one is untouched"
    );
}

/// A new certificate set is served to new handshakes at once, while a connection set up before
/// goes on with the certificate it got, request after request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_certificate_serves_new_connections_while_open_ones_continue() {
    let _serial = SERIAL.lock().await;
    let (blue, green) = (Upstream::start("blue").await, Upstream::start("green").await);
    let proxy = start_proxy(tls_config(), table(&[&blue], &[&green]));
    let addr = proxy.local_addrs()[1];
    let ca = Ca::new();
    let (first, second) = (ca.issue(&["web.test"]), ca.issue(&["web.test"]));
    let mut set = CertificateSet::new();
    set.set_default(first.load());
    proxy.set_certificates(set).unwrap();
    let client = ca.client(&[b"http/1.1"]);

    let old = tls_connect(addr, "web.test", client.clone()).await.unwrap();
    assert_eq!(presented(&old), first.der);
    let mut old = h1_over(old).await;
    let (status, _, _) = body_of(ready(&mut old).await.send_request(get("web.test", "/")).await.unwrap()).await;
    assert_eq!(status, StatusCode::OK);

    let mut set = CertificateSet::new();
    set.set_default(second.load());
    proxy.set_certificates(set).unwrap();
    let new = tls_connect(addr, "web.test", client.clone()).await.unwrap();
    assert_eq!(presented(&new), second.der, "a new connection gets the new certificate");
    for _ in 0..5 {
        let (status, _, body) = body_of(ready(&mut old).await.send_request(get("web.test", "/")).await.unwrap()).await;
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"blue"[..]));
    }
}

/// CPU time this process has used, over all its threads.
fn process_cpu() -> Duration {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_PROCESS_CPUTIME_ID).expect("process CPU clock");
    Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32)
}

/// Handshakes that stall (silent connections, and ones that sent half a ClientHello) cost no
/// CPU while they wait, hold their place under `max_connections`, and are cut at
/// `tls_handshake_timeout`, which frees their places for the clients waiting behind them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_handshake_is_cut_at_the_timeout_and_costs_no_cpu_while_it_waits() {
    let _serial = SERIAL.lock().await;
    const STALLED: usize = 600;
    let (blue, green) = (Upstream::start("blue").await, Upstream::start("green").await);
    let mut config = tls_config();
    let timeout = Duration::from_secs(6);
    config.tls_handshake_timeout = timeout;
    config.max_connections = STALLED;
    // One worker and one listener: each accept loop holds a place while it waits for a
    // connection, so with several the places left for one listener's backlog would depend on
    // how the kernel spread the connections.
    config.workers = 1;
    config.listeners.remove(0);
    let proxy = start_proxy(config, table(&[&blue], &[&green]));
    let addr = proxy.local_addrs()[0];
    let ca = Ca::new();
    let mut set = CertificateSet::new();
    set.set_default(ca.issue(&["web.test"]).load());
    proxy.set_certificates(set).unwrap();

    // The first 40 bytes of a real ClientHello, for half of the connections.
    let hello_start = {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let config = ca.client(&[b"h2"]);
        tokio::spawn(async move {
            let name = ServerName::try_from("web.test").unwrap();
            let _ = tokio_rustls::TlsConnector::from(config)
                .connect(name, &mut client)
                .await;
        });
        let mut buf = vec![0u8; 40];
        server.read_exact(&mut buf).await.unwrap();
        buf
    };
    assert_eq!(hello_start[0], 0x16, "a TLS handshake record");

    let started = Instant::now();
    let mut held = Vec::with_capacity(STALLED);
    for i in 0..STALLED {
        let mut s = TcpStream::connect(addr).await.unwrap();
        if i % 2 == 0 {
            s.write_all(&hello_start).await.unwrap();
        }
        held.push(s);
    }
    while proxy.open_connections() < STALLED {
        assert!(
            started.elapsed() < timeout,
            "{} of {STALLED} accepted",
            proxy.open_connections()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("{STALLED} stalled connections open after {:?}", started.elapsed());
    let window = Duration::from_secs(1);
    let before = process_cpu();
    tokio::time::sleep(window).await;
    let used = process_cpu() - before;
    assert!(
        used < window / 20,
        "{STALLED} stalled handshakes used {used:?} of CPU in {window:?} (allowed: under 5% of one core)"
    );

    // Every place is taken: a real client waits in the backlog until the stalled ones are cut.
    let client = ca.client(&[b"http/1.1"]);
    let waiting = tokio::spawn(async move {
        let tls = tls_connect(addr, "web.test", client)
            .await
            .expect("handshake after the cut");
        let mut h1 = h1_over(tls).await;
        let (status, _, _) = body_of(ready(&mut h1).await.send_request(get("web.test", "/")).await.unwrap()).await;
        (status, Instant::now())
    });

    // Each stalled connection is closed by the proxy at the timeout: EOF or a reset, not before.
    let mut cut = Vec::new();
    for mut s in held {
        cut.push(tokio::spawn(async move {
            let mut buf = [0u8; 64];
            loop {
                match tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return Some(Instant::now()),
                    Ok(Ok(_)) => continue,
                    Err(_) => return None,
                }
            }
        }));
    }
    let mut earliest = None::<Instant>;
    for c in cut {
        let at = c.await.unwrap().expect("the stalled connection is closed");
        earliest = Some(earliest.map_or(at, |e| e.min(at)));
    }
    let earliest = earliest.unwrap();
    assert!(
        earliest.duration_since(started) >= timeout - Duration::from_millis(100),
        "cut after {:?}, before the {timeout:?} timeout",
        earliest.duration_since(started)
    );
    let (status, served_at) = waiting.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(
        served_at >= earliest,
        "the waiting client was served only once places were freed"
    );
    assert!(eventually(Duration::from_secs(5), || proxy.open_connections() == 0).await);
}

/// Plain HTTP sent to a TLS port gets a plain HTTP 400 that says to use https:// (with the URL);
/// a TLS ClientHello sent to a plain port gets a plain HTTP 400 that says to use http://, which
/// a TLS client reports as the port not speaking TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wrong_protocol_on_either_port_gets_a_clear_answer() {
    let _serial = SERIAL.lock().await;
    let (blue, green) = (Upstream::start("blue").await, Upstream::start("green").await);
    let proxy = start_proxy(tls_config(), table(&[&blue], &[&green]));
    let (plain, tls_addr) = (proxy.local_addrs()[0], proxy.local_addrs()[1]);
    let ca = Ca::new();
    let mut set = CertificateSet::new();
    set.set_default(ca.issue(&["web.test"]).load());
    proxy.set_certificates(set).unwrap();

    let mut s = TcpStream::connect(tls_addr).await.unwrap();
    s.write_all(b"GET /cart?id=7 HTTP/1.1\r\nHost: shop.test:8443\r\nUser-Agent: test\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
    assert!(
        answer.ends_with("This port speaks HTTPS, not plain HTTP: use https://shop.test:8443/cart?id=7\n"),
        "{answer}"
    );
    assert_eq!(blue.requests(), 0, "nothing was forwarded");

    // A real TLS client on the plain port fails its handshake as on any non-TLS port...
    let e = tls_connect(plain, "web.test", ca.client(&[b"h2"]))
        .await
        .expect_err("not TLS");
    assert!(
        e.to_string().contains("corrupt message") || e.to_string().contains("InvalidContentType"),
        "{e}"
    );
    // ...and the bytes it was sent say what to do.
    let mut hello = Vec::new();
    {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let config = ca.client(&[b"h2"]);
        tokio::spawn(async move {
            let name = ServerName::try_from("web.test").unwrap();
            let _ = tokio_rustls::TlsConnector::from(config)
                .connect(name, &mut client)
                .await;
        });
        let mut buf = vec![0u8; 5];
        server.read_exact(&mut buf).await.unwrap();
        let len = u16::from_be_bytes([buf[3], buf[4]]) as usize;
        hello.extend_from_slice(&buf);
        let mut rest = vec![0u8; len];
        server.read_exact(&mut rest).await.unwrap();
        hello.extend_from_slice(&rest);
    }
    let mut s = TcpStream::connect(plain).await.unwrap();
    s.write_all(&hello).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{answer}");
    assert!(
        answer.ends_with("This port speaks plain HTTP, not HTTPS: use an http:// URL.\n"),
        "{answer}"
    );
    assert_eq!(blue.requests(), 0, "nothing was forwarded");

    // Both ports still serve their own protocol.
    let mut c = H1::connect(plain).await.unwrap();
    assert_eq!(c.get("/").await.unwrap().0, StatusCode::OK);
    let mut h1 = h1_over(tls_connect(tls_addr, "web.test", ca.client(&[])).await.unwrap()).await;
    assert_eq!(
        body_of(ready(&mut h1).await.send_request(get("web.test", "/")).await.unwrap())
            .await
            .0,
        StatusCode::OK
    );
}

/// A TLS listener takes over a listening socket passed at start (socket activation, or the
/// daemon it replaces), as a plain one does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_listener_takes_over_an_inherited_socket() {
    let _serial = SERIAL.lock().await;
    let (blue, green) = (Upstream::start("blue").await, Upstream::start("green").await);
    let inherited = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = inherited.local_addr().unwrap();
    let mut config = test_config();
    config.listeners = vec![ListenerConfig {
        addr,
        preview: false,
        tls: true,
    }];
    let (proxy, unused) = Proxy::start_closed_with(config, table(&[&blue], &[&green]), vec![inherited]).unwrap();
    assert!(unused.is_empty());
    let ca = Ca::new();
    let mut set = CertificateSet::new();
    set.set_default(ca.issue(&["web.test"]).load());
    proxy.set_certificates(set).unwrap();
    proxy.open();
    let mut h1 = h1_over(tls_connect(addr, "web.test", ca.client(&[b"http/1.1"])).await.unwrap()).await;
    let (status, _, body) = body_of(ready(&mut h1).await.send_request(get("web.test", "/")).await.unwrap()).await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"blue"[..]));
    proxy.shutdown();
}
