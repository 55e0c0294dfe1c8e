//! TLS from the proxy to a service's upstreams (`Service::upstream_tls`), against real TLS
//! upstreams (tokio-rustls, certificates made at test time): the handshake the upstream sees
//! (SNI, ALPN), keep-alive reuse, bodies, WebSockets, the answers to a certificate or a peer that
//! does not fit, and that pooled connections never cross from one TLS setting to another.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cutover_proxy::{Instance, Pool, RouteTable, Service, UpstreamTls};
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode};
use support::*;
use tokio_tungstenite::tungstenite::Message;

const ALPN_HTTP11: &[u8] = b"http/1.1";

fn settings(ca: &Ca, server_name: Option<&str>) -> Arc<UpstreamTls> {
    Arc::new(UpstreamTls::new(ca.pem().as_bytes(), "certs/internal-ca.pem", server_name).expect("a CA bundle"))
}

/// One default service "web" whose blue pool is `blue`, speaking TLS to it with `tls`.
fn tls_table(blue: &[&Upstream], tls: Option<Arc<UpstreamTls>>) -> RouteTable {
    let mut s = Service::new("web");
    s.blue = Pool::new(Some("v1"), blue.iter().map(|u| Instance::new(u.addr)).collect());
    s.upstream_tls = tls;
    RouteTable::new(vec![s]).unwrap()
}

/// A TLS upstream presenting a certificate of `ca` for `names`, offering ALPN http/1.1.
async fn tls_upstream(colour: &'static str, ca: &Ca, names: &[&str]) -> Upstream {
    Upstream::start_tls(colour, ca.issue(names).server(&[ALPN_HTTP11])).await
}

/// Requests reach the upstream over TLS: it sees the configured server name as SNI and ALPN
/// http/1.1; 400 requests over 4 keep-alive client connections take at most 4 handshakes (one
/// per connection the proxy keeps), and the forwarding headers are those of a plain upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_go_over_tls_on_kept_alive_connections() {
    let ca = Ca::new();
    let up = tls_upstream("blue", &ca, &["api.internal"]).await;
    let proxy = start_proxy(
        test_config(),
        tls_table(&[&up], Some(settings(&ca, Some("api.internal")))),
    );
    let addr = proxy.local_addrs()[0];

    let clients: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(async move {
                let mut c = H1::connect(addr).await.unwrap();
                for _ in 0..100 {
                    let (status, _, body) = c.get("/").await.unwrap();
                    assert_eq!((status, &body[..]), (StatusCode::OK, &b"blue"[..]));
                }
            })
        })
        .collect();
    for c in clients {
        c.await.unwrap();
    }
    assert_eq!(up.requests(), 400);
    assert_eq!(
        up.plain_connections(),
        0,
        "no plain connection reached the TLS upstream"
    );
    let handshakes = up.handshakes();
    assert!(
        (1..=4).contains(&handshakes.len()),
        "400 requests on 4 client connections took {} handshakes",
        handshakes.len()
    );
    for h in &handshakes {
        assert_eq!(h.sni.as_deref(), Some("api.internal"), "{h:?}");
        assert_eq!(h.alpn.as_deref(), Some(ALPN_HTTP11), "{h:?}");
    }

    let mut c = H1::connect(addr).await.unwrap();
    let (status, _, _) = c
        .request(
            Request::get("/headers")
                .header("host", "shop.example")
                .header("x-forwarded-proto", "https")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let headers = up.seen.last_headers.lock().unwrap().clone().unwrap();
    assert_eq!(headers["x-forwarded-proto"], "http", "as the client reached the proxy");
    assert_eq!(headers["x-forwarded-host"], "shop.example");
    assert_eq!(headers["host"], "shop.example");
    proxy.shutdown();
}

/// Without a server name the instance is verified for its IP address: a certificate with the IP
/// in its subjectAltName passes, and no SNI is sent (an IP is never sent as SNI); one for a DNS
/// name alone is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_server_name_the_instance_ip_is_verified() {
    let ca = Ca::new();
    let by_ip = tls_upstream("blue", &ca, &["127.0.0.1"]).await;
    let by_name = tls_upstream("green", &ca, &["api.internal"]).await;
    let proxy = start_proxy(test_config(), tls_table(&[&by_ip], Some(settings(&ca, None))));
    let addr = proxy.local_addrs()[0];
    let mut c = H1::connect(addr).await.unwrap();
    let (status, _, body) = c.get("/").await.unwrap();
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"blue"[..]));
    assert_eq!(by_ip.handshakes()[0].sni, None);

    proxy
        .update(|_| Ok(tls_table(&[&by_name], Some(settings(&ca, None)))))
        .unwrap();
    let (status, _, body) = c.get("/").await.unwrap();
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert!(body.contains("certificate not valid for name \"127.0.0.1\""), "{body}");
    proxy.shutdown();
}

/// Request bodies go over TLS whole, with a length and chunked, large enough that the TLS
/// socket fills, also to an upstream that reads slowly; the responses come back on the same
/// kept-alive connection. (A body that ends while TLS holds bytes back, which this cannot
/// provoke every time, is `h1::tls_body_tests`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_go_over_tls_whole() {
    use http_body_util::BodyExt;
    let ca = Ca::new();
    let server = ca.issue(&["api.internal"]).server(&[ALPN_HTTP11]);
    let up = Upstream::start_tls_small_buffers("blue", server).await;
    let proxy = start_proxy(
        test_config(),
        tls_table(&[&up], Some(settings(&ca, Some("api.internal")))),
    );
    let addr = proxy.local_addrs()[0];
    let mut c = H1::connect(addr).await.unwrap();

    let data: Vec<u8> = (0..4_000_000u32).map(|i| (i % 251) as u8).collect();
    let expected = {
        use sha2::Digest;
        format!("blue {} {}", hex(&sha2::Sha256::digest(&data)), data.len())
    };
    for target in ["/upload", "/upload?pace_ms=1"] {
        let req = Request::post(target)
            .header("host", "test")
            .body(full(data.clone()))
            .unwrap();
        let (status, _, answer) = c.request(req).await.unwrap();
        assert_eq!(
            (status, String::from_utf8_lossy(&answer)),
            (StatusCode::OK, expected.clone().into()),
            "{target}, with a length"
        );

        // Chunked, in pieces that arrive one by one.
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
        let pieces = data.clone();
        let feed = tokio::spawn(async move {
            for piece in pieces.chunks(300_000) {
                tx.send(Bytes::copy_from_slice(piece)).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        let req = Request::post(target)
            .header("host", "test")
            .body(ChannelBody(rx).boxed())
            .unwrap();
        let (status, _, answer) = c.request(req).await.unwrap();
        feed.await.unwrap();
        assert_eq!(
            (status, String::from_utf8_lossy(&answer)),
            (StatusCode::OK, expected.clone().into()),
            "{target}, chunked"
        );
    }
    assert_eq!(up.handshakes().len(), 1, "all on one kept-alive TLS connection");
    proxy.shutdown();
}

/// A certificate from another CA: 502 naming the service, the instance's address and rustls'
/// reason; the proxy goes on serving (the next requests get the same answer). Another CA with
/// the same name as the trusted one is refused as well (its signature does not verify).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_gets_502_with_the_reason() {
    let ca = Ca::named("internal CA");
    for (other, rustls_says) in [
        (Ca::named("someone else's CA"), "UnknownIssuer"),
        (Ca::named("internal CA"), "BadSignature"),
    ] {
        let up = tls_upstream("blue", &other, &["api.internal"]).await;
        let proxy = start_proxy(
            test_config(),
            tls_table(&[&up], Some(settings(&ca, Some("api.internal")))),
        );
        let addr = proxy.local_addrs()[0];
        for _ in 0..3 {
            let mut c = H1::connect(addr).await.unwrap();
            let (status, _, body) = c.get("/").await.unwrap();
            let body = String::from_utf8_lossy(&body);
            assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
            assert_eq!(
                body.trim_end(),
                format!(
                    "service web: could not connect to any instance (last tried {}: TLS handshake (server name \
                     api.internal) failed: invalid peer certificate: {rustls_says} (the certificate is not issued \
                     by a CA in certs/internal-ca.pem))",
                    up.addr
                )
            );
        }
        assert_eq!(up.requests(), 0);
        assert!(up.failed_handshakes() >= 1);
        proxy.shutdown();
    }
}

/// A certificate of the right CA for another name: 502, saying which names it holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_another_name_gets_502() {
    let ca = Ca::new();
    let up = tls_upstream("blue", &ca, &["other.internal"]).await;
    let proxy = start_proxy(
        test_config(),
        tls_table(&[&up], Some(settings(&ca, Some("api.internal")))),
    );
    let mut c = H1::connect(proxy.local_addrs()[0]).await.unwrap();
    let (status, _, body) = c.get("/").await.unwrap();
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert!(
        body.contains(&format!("last tried {}: TLS handshake (server name api.internal) failed: invalid peer certificate: certificate not valid for name \"api.internal\"; certificate is only valid for DnsName(\"other.internal\")", up.addr)),
        "{body}"
    );
    assert!(body.contains("set upstream_tls.server_name"), "{body}");
    assert_eq!(up.requests(), 0);
    proxy.shutdown();
}

/// An upstream that speaks plain HTTP where TLS is configured: 502 saying so; the request never
/// reaches it as a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_http_upstream_gets_502() {
    let ca = Ca::new();
    let up = Upstream::start("blue").await;
    let proxy = start_proxy(
        test_config(),
        tls_table(&[&up], Some(settings(&ca, Some("api.internal")))),
    );
    let mut c = H1::connect(proxy.local_addrs()[0]).await.unwrap();
    let (status, _, body) = c.get("/").await.unwrap();
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(
        body.trim_end(),
        format!(
            "service web: could not connect to any instance (last tried {}: TLS handshake (server name \
             api.internal) failed: received corrupt message of type InvalidContentType (the upstream does not \
             speak TLS; is it plain HTTP?))",
            up.addr
        )
    );
    assert_eq!(up.requests(), 0);
    proxy.shutdown();
}

/// A failed handshake counts as a failed connect: the instance is passed over and a sibling with
/// a good certificate answers every request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sibling_with_a_good_certificate_takes_the_requests() {
    let (ca, other) = (Ca::new(), Ca::new());
    let bad = tls_upstream("green", &other, &["api.internal"]).await;
    let good = tls_upstream("blue", &ca, &["api.internal"]).await;
    let proxy = start_proxy(
        test_config(),
        tls_table(&[&bad, &good], Some(settings(&ca, Some("api.internal")))),
    );
    let mut c = H1::connect(proxy.local_addrs()[0]).await.unwrap();
    for _ in 0..20 {
        let (status, _, body) = c.get("/").await.unwrap();
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"blue"[..]));
    }
    assert_eq!(good.requests(), 20);
    assert_eq!(bad.requests(), 0);
    proxy.shutdown();
}

/// A WebSocket through a TLS upstream: the upgrade and the frames both ways go over TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_go_over_tls() {
    let ca = Ca::new();
    let server = ca.issue(&["api.internal"]).server(&[ALPN_HTTP11]);
    let up = Upstream::start_tls_small_buffers("blue", server).await;
    let proxy = start_proxy(
        test_config(),
        tls_table(&[&up], Some(settings(&ca, Some("api.internal")))),
    );
    let mut ws = ws_connect(proxy.local_addrs()[0]).await;
    for i in 0..50 {
        assert_eq!(
            ws_echo(&mut ws, &format!("hello {i}")).await,
            format!("blue: hello {i}")
        );
    }
    // A message larger than a TLS record and the socket buffers, one way.
    ws.send(Message::binary(vec![7u8; 3_000_000])).await.unwrap();
    assert_eq!(ws_echo(&mut ws, "after").await, "blue: after");
    // Many messages to a slow reader, and nothing after them: the last one arrives whole even
    // though no later write pushes out what TLS held back.
    assert_eq!(ws_echo(&mut ws, "slow").await, "blue: slow");
    for _ in 0..100 {
        ws.send(Message::binary(vec![9u8; 65_536])).await.unwrap();
    }
    let binaries = || {
        up.seen
            .ws_events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| *e == "binary 65536")
            .count()
    };
    assert!(
        eventually(Duration::from_secs(10), || binaries() == 100).await,
        "{} of 100 messages reached the upstream",
        binaries()
    );
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
    assert!(
        eventually(Duration::from_secs(5), || up
            .seen
            .ws_events
            .lock()
            .unwrap()
            .contains(&"end".to_string()))
        .await
    );
    let events = up.seen.ws_events.lock().unwrap().clone();
    assert!(events.contains(&"binary 3000000".to_string()), "{events:?}");
    assert_eq!(up.handshakes().len(), 1);
    assert_eq!(up.plain_connections(), 0);
    proxy.shutdown();
}

/// Pooled connections are handed out only under the settings they were made with: a plain
/// connection is not used once the service speaks TLS, a TLS connection is not used under new
/// TLS settings (a CA reloaded), nor once the service speaks plain HTTP again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connections_never_cross_tls_settings() {
    let ca = Ca::new();
    // Serves TLS and, to a connection that starts with no handshake, plain HTTP.
    let up = tls_upstream("blue", &ca, &["api.internal"]).await;
    let mut cfg = test_config();
    cfg.workers = 1;
    let proxy = start_proxy(cfg, tls_table(&[&up], None));
    let mut c = H1::connect(proxy.local_addrs()[0]).await.unwrap();
    get_blue(&mut c).await;
    get_blue(&mut c).await;
    assert_eq!((up.plain_connections(), up.handshakes().len()), (1, 0));

    // The table keeps the same instance (same id, same pool) and adds TLS.
    let with_tls = |tls: Option<Arc<UpstreamTls>>| {
        move |t: &RouteTable| {
            t.with_service("web", |s| {
                s.upstream_tls = tls;
                Ok(())
            })
        }
    };
    let first = settings(&ca, Some("api.internal"));
    proxy.update(with_tls(Some(first.clone()))).unwrap();
    get_blue(&mut c).await;
    get_blue(&mut c).await;
    assert_eq!((up.plain_connections(), up.handshakes().len()), (1, 1));

    // The same CA loaded again is other settings: a new handshake.
    proxy
        .update(with_tls(Some(settings(&ca, Some("api.internal")))))
        .unwrap();
    get_blue(&mut c).await;
    get_blue(&mut c).await;
    assert_eq!((up.plain_connections(), up.handshakes().len()), (1, 2));

    proxy.update(with_tls(None)).unwrap();
    get_blue(&mut c).await;
    get_blue(&mut c).await;
    assert_eq!((up.plain_connections(), up.handshakes().len()), (2, 2));
    assert_eq!(up.requests(), 8);
    proxy.shutdown();
}

async fn get_blue(c: &mut H1) {
    let (status, _, body) = c.get("/").await.unwrap();
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"blue"[..]));
}
