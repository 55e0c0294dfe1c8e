//! HTTP/1.1 on the client side, beyond single requests: every kind of response framing reaches
//! the client correctly, hop-by-hop fields stay behind, pipelined requests are answered in order
//! (a request with a body among them), the proxy's own answers are framed right (HEAD), the idle
//! timeout runs from the end of a response, and a client that goes away ends its request.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An upstream that answers each path with fixed bytes, to try every framing.
async fn scripted_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let Some(end) = read_head_and(&mut s, &mut buf, |_| 0).await else {
                        return;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end);
                    let line = head.lines().next().unwrap_or("").to_string();
                    let path = line.split(' ').nth(1).unwrap_or("/");
                    let (resp, close): (&[u8], bool) = match path {
                        "/len" => (
                            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive, x-hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nX-App: a\r\n\r\nhello",
                            false,
                        ),
                        "/chunked" => (
                            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-App: c\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
                            false,
                        ),
                        "/close" => (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end", true),
                        "/nocontent" => (b"HTTP/1.1 204 No Content\r\nX-App: n\r\n\r\n", false),
                        "/notmodified" => (b"HTTP/1.1 304 Not Modified\r\nETag: \"1\"\r\n\r\n", false),
                        "/head" => (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", false),
                        // A length the upstream names as hop-by-hop, a repeated one, and one with a sign.
                        "/namedlength" => (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: content-length\r\n\r\nhello", false),
                        "/oddlength" => (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\ncontent-length: 5\r\n\r\nhello", false),
                        "/signedlength" => (b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello", true),
                        // Bodies the upstream breaks off: a length it does not reach, chunks without
                        // the last one.
                        "/cutlength" => (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part of it", true),
                        "/cutchunked" => (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", true),
                        _ => (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", false),
                    };
                    if s.write_all(resp).await.is_err() || close {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn one_instance_table(addr: SocketAddr) -> cutover_proxy::RouteTable {
    use cutover_proxy::{Instance, Pool, RouteTable, Service};
    let mut s = Service::new("app");
    s.blue = Pool::new(None, vec![Instance::new(addr)]);
    RouteTable::new(vec![s]).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_framing_arrives_whole_on_one_keep_alive_connection() {
    let upstream = scripted_upstream().await;
    let proxy = start_proxy(test_config(), one_instance_table(upstream));
    let addr = proxy.local_addrs()[0];
    let mut c = H1::connect(addr).await.unwrap();

    let (status, headers, body) = c.get("/len").await.unwrap();
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"hello"[..]));
    assert_eq!(headers["x-app"], "a");
    // The upstream sent no Date: the proxy adds one.
    let date = headers["date"].to_str().unwrap();
    assert!(date.len() == 29 && date.ends_with(" GMT"), "{headers:?}");
    assert_eq!(headers["content-length"], "5");
    for gone in ["x-hop", "keep-alive"] {
        assert!(!headers.contains_key(gone), "{gone} passed on: {headers:?}");
    }

    let (status, headers, body) = c.get("/chunked").await.unwrap();
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"hello world"[..]));
    assert_eq!(headers["transfer-encoding"], "chunked");
    assert_eq!(headers["x-app"], "c");

    // The upstream ends this body by closing; the client gets it chunked and keeps its connection.
    let (status, headers, body) = c.get("/close").await.unwrap();
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"until the end"[..]));
    assert_eq!(headers["transfer-encoding"], "chunked");
    assert!(!headers.contains_key("connection"), "{headers:?}");

    let (status, headers, body) = c.get("/nocontent").await.unwrap();
    assert_eq!((status, body.len()), (StatusCode::NO_CONTENT, 0));
    assert_eq!(headers["x-app"], "n");

    let (status, headers, body) = c.get("/notmodified").await.unwrap();
    assert_eq!((status, body.len()), (StatusCode::NOT_MODIFIED, 0));
    assert_eq!(headers["etag"], "\"1\"");

    let resp = c
        .request(
            Request::builder()
                .method(Method::HEAD)
                .uri("/head")
                .header("host", "x")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!((resp.0, resp.2.len()), (StatusCode::OK, 0));
    assert_eq!(resp.1["content-length"], "100");

    // Whatever the upstream wrote, the client gets one length, the one the body was framed by.
    for path in ["/namedlength", "/oddlength"] {
        let (status, headers, body) = c.get(path).await.unwrap();
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"hello"[..]), "{path}");
        let lengths: Vec<_> = headers.get_all("content-length").iter().collect();
        assert_eq!(lengths, ["5"], "{path}: {headers:?}");
    }

    // A length with a sign is not a length: the upstream's response is refused.
    let (status, _, _) = c.get("/signedlength").await.unwrap();
    assert_eq!(status, StatusCode::BAD_GATEWAY);

    // Still the same connection, still in step.
    let (status, _, body) = c.get("/len").await.unwrap();
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"hello"[..]));
}

/// Reads one response with a length-delimited body off a raw socket.
async fn read_one(s: &mut TcpStream, buf: &mut Vec<u8>) -> (String, Bytes) {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4) {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (n, v) = l.split_once(':')?;
                    n.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .expect("a content-length");
            if buf.len() >= end + len {
                let body = Bytes::copy_from_slice(&buf[end..end + len]);
                buf.drain(..end + len);
                return (head, body);
            }
        }
        let mut chunk = [0u8; 65536];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .expect("a response within 5 s")
            .unwrap();
        assert!(
            n > 0,
            "connection closed before the whole response; have {:?}",
            String::from_utf8_lossy(buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A body the upstream breaks off never reaches the client as a complete response: over HTTP/1
/// the client connection is closed without the rest of the length or the last chunk (or before
/// the head, when the break arrives with it), over HTTP/2 the stream is reset. Either way the
/// client sees an error, not a short success, and the request stops counting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_the_upstream_breaks_off_ends_in_an_error_for_the_client() {
    use http_body_util::BodyExt;
    let up = scripted_upstream().await;
    let proxy = start_proxy(test_config(), one_instance_table(up));
    let addr = proxy.local_addrs()[0];
    let within = Duration::from_secs(5);
    for path in ["/cutlength", "/cutchunked"] {
        let mut c = H1::connect(addr).await.unwrap();
        let outcome = tokio::time::timeout(within, async {
            let resp = c.open(path).await?;
            anyhow_like::Result::Ok(resp.into_body().collect().await?)
        })
        .await
        .expect("ends in time");
        assert!(
            outcome.is_err(),
            "{path} over HTTP/1: a short body passed for a whole one"
        );

        let mut h2 = h2_connect(addr).await.unwrap();
        let outcome = tokio::time::timeout(within, async {
            let req = Request::get(format!("http://{addr}{path}")).body(empty()).unwrap();
            let resp = h2.send_request(req).await?;
            resp.into_body().collect().await
        })
        .await
        .expect("ends in time");
        assert!(
            outcome.is_err(),
            "{path} over HTTP/2: a short body passed for a whole one"
        );
        // The HTTP/2 connection itself carries on.
        let req = Request::get(format!("http://{addr}/len")).body(empty()).unwrap();
        let resp = h2.send_request(req).await.unwrap();
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "hello");
    }
    let in_flight = proxy.table().service("app").unwrap().blue.in_flight();
    assert_eq!(in_flight, 0, "the broken requests stopped counting");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order_with_a_body_among_them() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let proxy = start_proxy(test_config(), table(&[&blue], &[&green]));
    let addr = proxy.local_addrs()[0];
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut buf = Vec::new();

    // Three bodiless requests in one write, then an upload and two more requests in another.
    s.write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /headers HTTP/1.1\r\nHost: x\r\nX-Request-Id: plain-1\r\n\r\nGET /c HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    for _ in 0..3 {
        let (head, body) = read_one(&mut s, &mut buf).await;
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert_eq!(&body[..], b"blue");
    }
    let seen = blue.seen.last_headers.lock().unwrap().clone().unwrap();
    assert_eq!(seen["x-request-id"], "plain-1");
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-host"], "x");

    let upload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let mut more = format!(
        "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        upload.len()
    )
    .into_bytes();
    more.extend_from_slice(&upload);
    more.extend_from_slice(
        b"GET /d HTTP/1.1\r\nHost: x\r\n\r\nGET /e HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    s.write_all(&more).await.unwrap();
    use sha2::Digest;
    let want = format!("blue {} {}", hex(&sha2::Sha256::digest(&upload)), upload.len());
    let (head, body) = read_one(&mut s, &mut buf).await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert_eq!(String::from_utf8_lossy(&body), want);
    let (_, body) = read_one(&mut s, &mut buf).await;
    assert_eq!(&body[..], b"blue");
    let (head, body) = read_one(&mut s, &mut buf).await;
    assert_eq!(&body[..], b"blue");
    assert!(head.to_ascii_lowercase().contains("connection: close"), "{head}");
    // And then the proxy closes.
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(matches!(n, Ok(Ok(0))), "{n:?} {rest:?}");
    assert_eq!(blue.requests(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bodiless_request_to_a_closed_upstream_gets_a_502_and_the_connection_goes_on() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap(); // closed on drop
    let proxy = start_proxy(test_config(), table(&[&blue], &[&green]));
    let addr = proxy.local_addrs()[0];
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut buf = Vec::new();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    assert_eq!(&read_one(&mut s, &mut buf).await.1[..], b"blue");

    proxy.update(|_| Ok(one_instance_table(dead))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let (head, body) = read_one(&mut s, &mut buf).await;
    assert!(head.starts_with("HTTP/1.1 502 Bad Gateway\r\n"), "{head}");
    assert!(head.contains("content-type: text/plain; charset=utf-8"), "{head}");
    assert!(head.contains("date: "), "{head}");
    assert!(String::from_utf8_lossy(&body).contains("could not connect"), "{body:?}");

    proxy.update(|_| Ok(table(&[&blue], &[&green]))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    assert_eq!(&read_one(&mut s, &mut buf).await.1[..], b"blue");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_request_answered_by_the_proxy_gets_no_body() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let proxy = start_proxy(test_config(), table(&[&blue], &[&green]));
    let addr = proxy.local_addrs()[0];
    // No instance on the live colour: the proxy answers 503 itself, twice on one connection.
    proxy.update(|_| Ok(table(&[], &[&green]))).unwrap();
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    // Both answers are in once the second one's body is.
    while buf.windows(16).filter(|w| w == b"no live instance").count() < 1
        || buf.windows(12).filter(|w| w == b"HTTP/1.1 503").count() < 2
    {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0);
        buf.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let second = text
        .find("HTTP/1.1 503")
        .and_then(|i| text[i + 1..].find("HTTP/1.1 503").map(|j| i + 1 + j));
    let second = second.unwrap_or_else(|| panic!("two 503 answers expected: {text:?}"));
    let first = &text[..second];
    assert!(first.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{first}");
    assert!(first.ends_with("\r\n\r\n"), "the HEAD answer has a body: {first:?}");
    assert!(text[second..].contains("no live instance"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_idle_timeout_runs_from_the_end_of_a_slow_response() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let mut cfg = test_config();
    cfg.idle_timeout = Duration::from_millis(400);
    let proxy = start_proxy(cfg, table(&[&blue], &[&green]));
    let mut c = H1::connect(proxy.local_addrs()[0]).await.unwrap();
    // The response takes longer than the idle timeout; the connection must still carry the next
    // request sent right after it.
    let (status, _, body) = c.get("/slow?ms=900&size=10").await.unwrap();
    assert_eq!((status, &body[..5]), (StatusCode::OK, &b"blue "[..]));
    let (status, _, body) = c.get("/").await.unwrap();
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"blue"[..]));
}

/// A client that stops reading its response is cut once it has acknowledged none of it for the
/// send timeout (the kernel's `TCP_USER_TIMEOUT`): the request, its upstream connection and its
/// colour's count are let go. A slow reader that keeps taking bytes is not cut, nor is an event
/// stream that is quiet because its upstream has nothing to send (the idle timeout, shorter
/// still, leaves it alone too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_after_the_send_timeout_but_a_slow_one_or_a_quiet_stream_is_not() {
    use http_body_util::BodyExt;
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let mut cfg = test_config();
    let limit = Duration::from_secs(1);
    cfg.send_timeout = limit;
    cfg.idle_timeout = Duration::from_millis(400);
    let proxy = start_proxy(cfg, table(&[&blue], &[&green]));
    let addr = proxy.local_addrs()[0];

    // 32 MiB that the client does not read: the sockets on the way fill up and stay full.
    let size = 32 << 20;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let sent = std::time::Instant::now();
    s.write_all(format!("GET /slow?ms=0&size={size} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    assert!(in_flight_reaches(&proxy, cutover_proxy::Colour::Blue, 1).await);
    assert!(
        in_flight_reaches(&proxy, cutover_proxy::Colour::Blue, 0).await,
        "the stalled response was let go"
    );
    assert!(
        sent.elapsed() >= limit,
        "not before a whole send timeout: {:?}",
        sent.elapsed()
    );
    let mut got = 0usize;
    let mut chunk = vec![0u8; 1 << 16];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got += n,
            Err(_) => panic!("the connection is still open after {got} bytes"),
        }
    }
    assert!(got < size, "the response was cut, not completed: {got} bytes");

    // A reader of 64 KiB every 50 ms (1.3 MB/s, far below what the proxy could send) for three
    // times the kernel's limit: its socket stays full throughout, and it goes on.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET /slow?ms=0&size={size} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let slow = std::time::Instant::now();
    let mut got = 0usize;
    while slow.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut chunk))
            .await
            .expect("bytes keep coming")
            .unwrap();
        assert!(
            n > 0,
            "cut after {got} bytes, {:?} into a slow but steady read",
            slow.elapsed()
        );
        got += n;
    }
    assert!(got < size / 2, "the reader stayed slow: {got} bytes");
    assert_eq!(
        proxy.table().service("web").unwrap().blue.in_flight(),
        1,
        "still being served"
    );
    drop(s);

    // An event stream whose upstream says nothing for three send timeouts carries on.
    let mut c = H1::connect(addr).await.unwrap();
    let mut body = c.open("/sse").await.unwrap().into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "data: first from blue\n\n");
    tokio::time::sleep(limit * 3).await;
    blue.sse_release.notify_one();
    let rest = tokio::time::timeout(Duration::from_secs(5), body.collect())
        .await
        .expect("the rest of the stream in time")
        .unwrap()
        .to_bytes();
    assert_eq!(rest, "data: last\n\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_ends_its_request() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let proxy = start_proxy(test_config(), table(&[&blue], &[&green]));
    let addr = proxy.local_addrs()[0];
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /slow?ms=8000 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(
        in_flight_reaches(&proxy, cutover_proxy::Colour::Blue, 1).await,
        "the request is in flight"
    );
    drop(s);
    let t = std::time::Instant::now();
    assert!(
        in_flight_reaches(&proxy, cutover_proxy::Colour::Blue, 0).await,
        "the request ended"
    );
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "it ended when the client left, not with the upstream: {:?}",
        t.elapsed()
    );
}
