//! Bad input and failing upstreams (the tenth case of the data plane's list): each gets its
//! defined answer quickly, and the proxy keeps serving everyone else meanwhile. Also limits and
//! graceful shutdown.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cutover_proxy::{Colour, Instance, Pool, RouteTable, Service};
use http::Request;
use sha2::{Digest, Sha256};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends raw bytes and reads until the proxy closes or `within` passes; returns what came back.
async fn raw(addr: SocketAddr, bytes: &[u8], within: Duration) -> (String, Duration) {
    let t = Instant::now();
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(within, s.read_to_end(&mut out)).await;
    (String::from_utf8_lossy(&out).into_owned(), t.elapsed())
}

fn status_line(resp: &str) -> &str {
    resp.lines().next().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_and_oversized_requests() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let proxy = start_proxy(test_config(), table(&[&blue], &[&green]));
    let addr = proxy.local_addrs()[0];

    let (resp, took) = raw(addr, b"GARBAGE\r\n\r\n", Duration::from_secs(3)).await;
    assert_eq!(status_line(&resp), "HTTP/1.1 400 Bad Request", "{resp}");
    assert!(took < Duration::from_secs(1));

    let (resp, _) = raw(
        addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(status_line(&resp), "HTTP/1.1 400 Bad Request", "{resp}");

    let big = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(64 * 1024));
    let (resp, took) = raw(addr, big.as_bytes(), Duration::from_secs(3)).await;
    assert_eq!(
        status_line(&resp),
        "HTTP/1.1 431 Request Header Fields Too Large",
        "{resp}"
    );
    assert!(took < Duration::from_secs(1));

    assert_eq!(blue.requests(), 0, "nothing bad reached the upstream");
    let mut c = H1::connect(addr).await.unwrap();
    assert_eq!(c.get("/").await.unwrap().2, "blue");
}

/// Request framing that a proxy and its upstream could read differently (the ground of request
/// smuggling) never reaches the upstream as sent: ambiguous framings get 400 and nothing goes
/// upstream; a body both chunked and with a length is read as chunked, answered once, and the
/// connection closed, so nothing sent after it on that connection is taken as a request. What
/// the upstream gets is framed by the proxy itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ambiguous_request_framing_never_reaches_the_upstream() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let proxy = start_proxy(test_config(), table(&[&blue], &[&green]));
    let addr = proxy.local_addrs()[0];

    let refused: [(&str, &[u8]); 7] = [
        (
            "two lengths",
            b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        ),
        (
            "a negative length",
            b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\nhello",
        ),
        (
            "an unknown coding",
            b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: xchunked\r\n\r\nhello",
        ),
        (
            "a space before the colon",
            b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\nContent-Length: 5\r\n\r\nhello",
        ),
        (
            "chunked in HTTP/1.0",
            b"POST /upload HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
        ("a bare CR", b"GET / HTTP/1.1\r\nHost: x\rX-A: 1\r\n\r\n"),
        (
            "a folded header",
            b"GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n  folded\r\n\r\n",
        ),
    ];
    for (what, bytes) in refused {
        let (resp, took) = raw(addr, bytes, Duration::from_secs(3)).await;
        assert_eq!(status_line(&resp), "HTTP/1.1 400 Bad Request", "{what}: {resp}");
        assert!(took < Duration::from_secs(2), "{what}: answered and closed at once");
    }
    assert_eq!(blue.requests(), 0, "none of them reached the upstream");

    // Chunked and a length: the chunks are the body (RFC 9112 6.3), the upstream gets them framed
    // by the proxy, and the GET behind them is never served.
    let (resp, took) = raw(
        addr,
        b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /headers HTTP/1.1\r\nHost: x\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert!(took < Duration::from_secs(2), "closed after the answer");
    let expected = format!("blue {} 5", hex(&Sha256::digest(b"hello")));
    assert_eq!(status_line(&resp), "HTTP/1.1 200 OK", "{resp}");
    assert!(resp.ends_with(&expected), "{resp}");
    assert_eq!(resp.matches("HTTP/1.1 ").count(), 1, "one answer only: {resp}");
    assert_eq!(blue.requests(), 1, "the request behind the body was not served");
    let h = blue.seen.last_headers.lock().unwrap().clone().unwrap();
    assert_eq!(h["transfer-encoding"], "chunked");
    assert!(h.get("content-length").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slowloris_is_cut_and_others_are_served() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let proxy = start_proxy(test_config(), table(&[&blue], &[&green])); // header timeout 1 s
    let addr = proxy.local_addrs()[0];

    let slow = tokio::spawn(async move {
        let t = Instant::now();
        let mut s = TcpStream::connect(addr).await.unwrap();
        let request = b"GET / HTTP/1.1\r\nHost: web.test\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
        // One byte a second; bounded by the request length and a 30 s cap.
        for b in request.iter() {
            if s.write_all(&[*b]).await.is_err() || t.elapsed() > Duration::from_secs(30) {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        (t.elapsed(), out)
    });
    // Meanwhile, everyone else is served promptly.
    let mut c = H1::connect(addr).await.unwrap();
    for _ in 0..20 {
        let t = Instant::now();
        assert_eq!(c.get("/").await.unwrap().2, "blue");
        assert!(t.elapsed() < Duration::from_millis(500));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (took, out) = slow.await.unwrap();
    assert!(
        took < Duration::from_secs(5),
        "slow client cut after the 1 s header timeout, took {took:?}"
    );
    assert!(!out.starts_with(b"HTTP/1.1 200"), "the slow request was never served");
    assert_eq!(blue.requests(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_down_is_502_and_empty_service_is_503() {
    // A port that refuses connections: bound (so no other test can take it) but not listening.
    let reserved = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    reserved
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    let dead = reserved.local_addr().unwrap().as_socket().unwrap();
    let live = Upstream::start("blue").await;

    let mut down = Service::new("down");
    down.hosts = vec!["down.test".into()];
    down.blue = Pool::new(Some("v1"), vec![Instance::new(dead)]);
    let mut empty_svc = Service::new("empty");
    empty_svc.hosts = vec!["empty.test".into()];
    let mut ok = Service::new("ok");
    ok.hosts = vec!["ok.test".into()];
    ok.blue = Pool::new(Some("v1"), vec![Instance::new(live.addr)]);
    let proxy = start_proxy(test_config(), RouteTable::new(vec![down, empty_svc, ok]).unwrap());
    let addr = proxy.local_addrs()[0];

    let req = |host: &str| http::Request::get("/").header("host", host).body(empty()).unwrap();
    let mut c = H1::connect(addr).await.unwrap();
    let t = Instant::now();
    let (status, _, body) = c.request(req("down.test")).await.unwrap();
    assert_eq!(status, 502, "{body:?}");
    assert!(
        String::from_utf8_lossy(&body).contains("down"),
        "names the service: {body:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(1));

    let (status, _, body) = c.request(req("empty.test")).await.unwrap();
    assert_eq!(status, 503, "{body:?}");
    assert!(String::from_utf8_lossy(&body).contains("empty"));

    let (status, _, _) = c.request(req("nobody.test")).await.unwrap();
    assert_eq!(status, 404, "no service and no default");

    let (status, _, body) = c.request(req("ok.test")).await.unwrap();
    assert_eq!((status.as_u16(), &body[..]), (200, &b"blue"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_timeout_is_504() {
    let blue = Upstream::start("blue").await;
    let mut cfg = test_config();
    cfg.upstream_timeout = Duration::from_millis(300);
    let proxy = start_proxy(cfg, table(&[&blue], &[]));
    let mut c = H1::connect(proxy.local_addrs()[0]).await.unwrap();
    let t = Instant::now();
    let (status, _, _) = c.get("/slow?ms=3000").await.unwrap();
    assert_eq!(status, 504);
    assert!(t.elapsed() < Duration::from_secs(2));
    let mut c = H1::connect(proxy.local_addrs()[0]).await.unwrap();
    assert_eq!(c.get("/").await.unwrap().0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_connections_are_closed() {
    let blue = Upstream::start("blue").await;
    let mut cfg = test_config();
    cfg.idle_timeout = Duration::from_millis(300);
    cfg.client_header_timeout = Duration::from_secs(30);
    let proxy = start_proxy(cfg, table(&[&blue], &[]));
    let addr = proxy.local_addrs()[0];
    let mut c = H1::connect(addr).await.unwrap();
    assert_eq!(c.get("/").await.unwrap().0, 200);
    // A slow request longer than the idle timeout is not idle.
    assert_eq!(c.get("/slow?ms=1000&size=10").await.unwrap().0, 200);
    assert!(
        eventually(Duration::from_secs(3), || proxy.open_connections() == 0).await,
        "idle connection closed"
    );
    assert!(c.tx.is_closed() || c.get("/").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_keep_alive_connection_waiting_for_its_next_request_is_idle_not_slow() {
    // The header timeout counts from a request's first byte; the wait before it is the idle
    // timeout's business.
    let (blue, proxy) = header_timeout_proxy().await;
    let mut c = H1::connect(proxy.local_addrs()[0]).await.unwrap();
    assert_eq!(c.get("/").await.unwrap().2, "blue");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        proxy.open_connections(),
        1,
        "the idle keep-alive connection is still open"
    );
    assert_eq!(c.get("/").await.unwrap().2, "blue", "and serves the next request");
    assert_eq!(blue.requests(), 2);
}

/// One blue upstream behind a proxy with a 500 ms header timeout and a 20 s idle timeout.
async fn header_timeout_proxy() -> (Upstream, std::sync::Arc<cutover_proxy::Proxy>) {
    let blue = Upstream::start("blue").await;
    let mut cfg = test_config();
    cfg.client_header_timeout = Duration::from_millis(500);
    cfg.idle_timeout = Duration::from_secs(20);
    let proxy = start_proxy(cfg, table(&[&blue], &[]));
    (blue, proxy)
}

/// Appends the next bytes from `s` to `buf`; fails, naming `what`, when none come within 5 s
/// or the connection closes.
async fn read_more(s: &mut TcpStream, buf: &mut Vec<u8>, what: &str) {
    let mut chunk = [0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within 5 s"))
        .unwrap();
    assert!(n > 0, "{what}: closed early: {}", String::from_utf8_lossy(buf));
    buf.extend_from_slice(&chunk[..n]);
}

/// Reads one response with a `Content-Length` body from a raw connection; `None` when the
/// connection closes first.
async fn read_response(s: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return Some(String::from_utf8_lossy(&buf[..end + 4 + len]).into_owned());
            }
        }
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_request_head_is_timed_from_its_first_byte() {
    let (blue, proxy) = header_timeout_proxy().await;
    let mut s = TcpStream::connect(proxy.local_addrs()[0]).await.unwrap();
    let head = b"GET / HTTP/1.1\r\nHost: web.test\r\nX-Filler: abcdefghijklmnop\r\n\r\n";

    s.write_all(head).await.unwrap();
    let first = read_response(&mut s).await.expect("first response");
    assert!(first.starts_with("HTTP/1.1 200") && first.ends_with("blue"), "{first}");

    // Idle for longer than the header timeout, then a head in two parts, 300 ms apart: each
    // part well inside the timeout, so it is served.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    s.write_all(&head[..20]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.write_all(&head[20..]).await.unwrap();
    let second = read_response(&mut s).await.expect("second response");
    assert!(
        second.starts_with("HTTP/1.1 200") && second.ends_with("blue"),
        "{second}"
    );

    // A third head, one byte every 100 ms (about 6 s in all), on the same connection: cut about
    // 500 ms after its first byte.
    let t = Instant::now();
    let (mut rd, mut wr) = s.into_split();
    let dribble = tokio::spawn(async move {
        for b in head.iter() {
            if wr.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), rd.read_to_end(&mut out)).await;
    let took = t.elapsed();
    dribble.abort();
    assert!(out.is_empty(), "nothing answered: {}", String::from_utf8_lossy(&out));
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(2),
        "closed {took:?} after the head's first byte"
    );
    assert_eq!(blue.requests(), 2);
    assert!(
        eventually(Duration::from_secs(2), || proxy.open_connections() == 0).await,
        "the connection is gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_body_or_a_quiet_http2_connection_is_not_a_slow_head() {
    let (blue, proxy) = header_timeout_proxy().await;
    let addr = proxy.local_addrs()[0];

    // HTTP/1: a 30-byte body sent 3 bytes every 150 ms, 1.5 s in all, after a whole head.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: web.test\r\nContent-Length: 30\r\n\r\n")
        .await
        .unwrap();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        s.write_all(b"abc").await.unwrap();
    }
    let resp = read_response(&mut s).await.expect("the upload is answered");
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.ends_with(" 30") && resp.contains("blue "), "{resp}");

    // HTTP/2: a connection with no request for longer than the header timeout, only the
    // client's pings every 100 ms, keeps serving.
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut h2, conn) = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(Duration::from_millis(100))
        .keep_alive_while_idle(true)
        .handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let get = || Request::get("http://web.test/").body(empty()).unwrap();
    for _ in 0..2 {
        let resp = h2.send_request(get()).await.unwrap();
        assert_eq!(resp.status(), 200);
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(&body[..], b"blue");
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
    assert_eq!(blue.requests(), 3);
}

/// HTTP/2: a header block is timed from its first byte, as an HTTP/1 head is. A HEADERS frame
/// sent a byte at a time, or a block kept open by a slow CONTINUATION frame, gets its connection
/// closed (a quiet connection and a slow body do not; see the test above).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_http2_header_block_is_cut_like_a_slow_head() {
    let (blue, proxy) = header_timeout_proxy().await;
    let addr = proxy.local_addrs()[0];
    // Every frame here is on stream 1 but SETTINGS, which belongs to the connection (stream 0).
    let frame = |kind: u8, flags: u8, payload: &[u8]| h2_frame(kind, flags, u8::from(kind != 0x4), payload);
    // HPACK: GET, http, "/", and the authority web.test as a literal.
    let block: &[u8] = &[
        0x82, 0x86, 0x84, 0x41, 0x08, b'w', b'e', b'b', b'.', b't', b'e', b's', b't',
    ];
    let cases = [
        ("a HEADERS frame byte by byte", Vec::new(), frame(0x1, 0x4 | 0x1, block)),
        (
            "a CONTINUATION frame byte by byte",
            frame(0x1, 0x1, &block[..3]),
            frame(0x9, 0x4, &block[3..]),
        ),
    ];
    for (what, whole, trickled) in cases {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
        s.write_all(&frame(0x4, 0, &[])[..]).await.unwrap(); // SETTINGS
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t = Instant::now();
        let (mut rd, mut wr) = s.into_split();
        let dribble = tokio::spawn(async move {
            let _ = wr.write_all(&whole).await;
            // 200 ms a byte: 3.8 s or more for the whole frame.
            for b in trickled {
                if wr.write_all(&[b]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            tokio::time::sleep(Duration::from_secs(10)).await;
        });
        let closed = tokio::time::timeout(Duration::from_secs(3), async {
            let mut buf = [0u8; 1024];
            while let Ok(n) = rd.read(&mut buf).await {
                if n == 0 {
                    return;
                }
            }
        })
        .await;
        let took = t.elapsed();
        dribble.abort();
        assert!(closed.is_ok(), "{what}: the connection is still open after 3 s");
        assert!(
            took >= Duration::from_millis(400) && took < Duration::from_millis(2000),
            "{what}: closed {took:?} after the block began (header timeout 500 ms)"
        );
    }
    assert_eq!(blue.requests(), 0, "neither block became a request");
}

/// HTTP/2 reads no frames while it cannot write. A header block that began before the client
/// stopped taking a large response may have its rest waiting unread in the socket, so its clock
/// starts again while the writes wait; such a client is the send timeout's to cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_http2_header_block_is_not_timed_while_the_client_takes_no_writes() {
    let blue = Upstream::start("blue").await;
    let mut cfg = test_config();
    cfg.workers = 1;
    // Margins for a loaded machine: the download must have filled the sockets before the head
    // timeout could end the connection, and the send timeout must not come first.
    cfg.client_header_timeout = Duration::from_secs(2);
    cfg.idle_timeout = Duration::from_secs(20);
    cfg.send_timeout = Duration::from_secs(6);
    let proxy = start_proxy(cfg, table(&[&blue], &[]));
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    // SETTINGS_INITIAL_WINDOW_SIZE and a connection WINDOW_UPDATE at their largest: the proxy
    // may send far more than the sockets hold.
    bytes.extend(h2_frame(0x4, 0, 0, &[0x00, 0x04, 0x7f, 0xff, 0xff, 0xff]));
    bytes.extend(h2_frame(0x8, 0, 0, &[0x7f, 0xff, 0x00, 0x00]));
    // Stream 1: GET a 64 MiB body, HPACK literals for the path and authority.
    let path = b"/slow?ms=0&size=67108864";
    let mut block = vec![0x82, 0x86, 0x04, path.len() as u8];
    block.extend_from_slice(path);
    block.extend_from_slice(&[0x01, 0x08]);
    block.extend_from_slice(b"web.test");
    bytes.extend(h2_frame(0x1, 0x4 | 0x1, 1, &block));
    // Stream 3: the first bytes of a HEADERS frame, in the same write; the rest never comes.
    bytes.extend(&h2_frame(0x1, 0x4 | 0x1, 3, &[0x82, 0x86, 0x84])[..5]);
    // A small receive buffer, so that the proxy's writes back up after little data.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut s = tokio::net::TcpSocket::from_std_stream(sock.into())
        .connect(proxy.local_addrs()[0])
        .await
        .unwrap();
    s.write_all(&bytes).await.unwrap();
    // Nothing is read from here on.

    assert!(in_flight_reaches(&proxy, Colour::Blue, 1).await, "the download started");
    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert_eq!(
        proxy.open_connections(),
        1,
        "not cut at the header timeout while its writes wait"
    );
    assert!(
        eventually(Duration::from_secs(15), || proxy.open_connections() == 0).await,
        "cut once it has taken nothing for the send timeout"
    );
    drop(s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_pipelined_during_a_long_response_waits_for_it_without_a_head_timeout() {
    let (blue, proxy) = header_timeout_proxy().await;
    let mut s = TcpStream::connect(proxy.local_addrs()[0]).await.unwrap();
    s.write_all(b"GET /sse HTTP/1.1\r\nHost: web.test\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    // The stream's first event, then the next request while the stream is still open.
    while !buf.windows(16).any(|w| w == b"data: first from") {
        read_more(&mut s, &mut buf, "the first event").await;
    }
    s.write_all(b"GET / HTTP/1.1\r\nHost: web.test\r\n\r\n").await.unwrap();
    // Longer than the header timeout: the pipelined request waits for the stream, it is not slow.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    blue.sse_release.notify_one();
    let t = Instant::now();
    loop {
        let text = String::from_utf8_lossy(&buf).into_owned();
        if text.contains("data: last") && text.matches("HTTP/1.1 200").count() == 2 && text.ends_with("blue") {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "incomplete: {text}");
        read_more(&mut s, &mut buf, "both answers").await;
    }
    assert_eq!(blue.requests(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_connections_holds_extra_clients_back() {
    let blue = Upstream::start("blue").await;
    let mut cfg = test_config();
    cfg.max_connections = 2;
    cfg.workers = 1;
    let proxy = start_proxy(cfg, table(&[&blue], &[]));
    let addr = proxy.local_addrs()[0];
    let mut a = H1::connect(addr).await.unwrap();
    let mut b = H1::connect(addr).await.unwrap();
    assert_eq!(a.get("/").await.unwrap().0, 200);
    assert_eq!(b.get("/").await.unwrap().0, 200);
    third_client_waits_for_a_slot(&proxy, "connections", move || drop(a)).await;
}

/// With two connections open under `max_connections = 2`, a third client waits in the listen
/// backlog, and is served once `free` closes one of the two.
async fn third_client_waits_for_a_slot(proxy: &cutover_proxy::Proxy, open: &str, free: impl FnOnce()) {
    let addr = proxy.local_addrs()[0];
    let third = tokio::spawn(async move {
        let mut c = H1::connect(addr).await.unwrap();
        c.get("/").await.unwrap().0
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!third.is_finished(), "third client served while two {open} are open");
    assert_eq!(proxy.open_connections(), 2);
    free();
    let status = tokio::time::timeout(Duration::from_secs(3), third)
        .await
        .expect("served once a slot is free")
        .unwrap();
    assert_eq!(status, 200);
}

/// Timeouts beyond what the kernel's socket options hold (keepalive times up to 32767 s, a user
/// timeout up to 24 days) are clamped, not refused: the proxy starts and serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn very_long_timeouts_still_start_the_proxy() {
    let blue = Upstream::start("blue").await;
    let mut cfg = test_config();
    cfg.idle_timeout = Duration::from_secs(10 * 3600 * 24);
    cfg.send_timeout = Duration::from_secs(100 * 3600 * 24);
    let proxy = cutover_proxy::Proxy::start(cfg, table(&[&blue], &[])).expect("starts");
    let mut c = H1::connect(proxy.local_addrs()[0]).await.unwrap();
    assert_eq!(c.get("/").await.unwrap().2, "blue");
}

/// The longest durations a caller can pass (`Duration::MAX`, "wait for ever") for every timeout
/// neither panic nor stop requests, a drain or a shutdown from finishing once there is nothing
/// left to wait for.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_longest_durations_leave_drains_and_shutdown_working() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let mut cfg = test_config();
    cfg.client_header_timeout = Duration::MAX;
    cfg.idle_timeout = Duration::MAX;
    cfg.send_timeout = Duration::MAX;
    cfg.connect_timeout = Duration::MAX;
    cfg.upstream_timeout = Duration::MAX;
    cfg.upstream_idle_timeout = Duration::MAX;
    cfg.shutdown_timeout = Duration::MAX;
    // Green has an instance that refuses connections: its ejection lasts "for ever" too.
    let refusing = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let t = table(&[&blue], &[&green])
        .with_service("web", |s| {
            s.green = Pool::new(Some("v2"), vec![Instance::new(refusing), Instance::new(green.addr)]);
            Ok(())
        })
        .unwrap();
    let proxy = start_proxy(cfg, t);
    let mut c = H1::connect(proxy.local_addrs()[0]).await.unwrap();
    assert_eq!(c.get("/").await.unwrap().2, "blue");
    proxy.switch("web", Colour::Green).unwrap();
    for _ in 0..4 {
        assert_eq!(c.get("/").await.unwrap().2, "green");
    }
    let report = tokio::time::timeout(
        Duration::from_secs(3),
        proxy.drain("web", Colour::Blue, Duration::MAX, Duration::MAX),
    )
    .await
    .expect("an idle colour drains at once")
    .unwrap();
    assert!(report.completed);
    assert_eq!(c.get("/").await.unwrap().2, "green");

    proxy.shutdown();
    let p = proxy.clone();
    let joined = tokio::task::spawn_blocking(move || p.join());
    tokio::time::timeout(Duration::from_secs(5), joined)
        .await
        .expect("stops once its connections have closed")
        .unwrap();
    assert_eq!(proxy.open_connections(), 0);
}

/// A WebSocket is a client connection for as long as it is open: after its upgrade it keeps its
/// place under `max_connections`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn websockets_keep_their_place_under_max_connections() {
    let blue = Upstream::start("blue").await;
    let mut cfg = test_config();
    cfg.max_connections = 2;
    cfg.workers = 1;
    let proxy = start_proxy(cfg, table(&[&blue], &[]));
    let addr = proxy.local_addrs()[0];
    let mut a = ws_connect(addr).await;
    let mut b = ws_connect(addr).await;
    assert_eq!(ws_echo(&mut a, "a").await, "blue: a");
    assert_eq!(ws_echo(&mut b, "b").await, "blue: b");
    // The client goes away: the tunnel ends and frees its place.
    third_client_waits_for_a_slot(&proxy, "websockets", move || drop(a)).await;
    assert_eq!(ws_echo(&mut b, "still").await, "blue: still");
}

/// At shutdown, open WebSockets are closed at instants spread over the first half of
/// `shutdown_timeout` less the 1 s closing grace, requests in flight finish, and the proxy stops once all that is done rather
/// than at the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_closes_websockets_spread_over_half_the_timeout() {
    let blue = Upstream::start("blue").await;
    let mut cfg = test_config();
    cfg.shutdown_timeout = Duration::from_secs(5);
    let window = Duration::from_secs(2);
    let proxy = start_proxy(cfg, table(&[&blue], &[]));
    let addr = proxy.local_addrs()[0];
    let sockets = ws_open(addr, 10, "blue").await;
    let slow = tokio::spawn(async move {
        let mut c = H1::connect(addr).await.unwrap();
        c.get("/slow?ms=500&size=1000").await.unwrap()
    });
    assert!(in_flight_reaches(&proxy, Colour::Blue, 1).await);

    let start = Instant::now();
    proxy.shutdown();
    let p = proxy.clone();
    let stopped = tokio::task::spawn_blocking(move || {
        p.join();
        start.elapsed()
    });
    let at = ws_close_times(sockets, start, Duration::from_secs(4)).await;
    let (first, last) = (at[0], at[at.len() - 1]);
    assert!(last < window + Duration::from_millis(500), "last close at {last:?}");
    // Ten instants drawn over 2 s all fall within 0.5 s of each other with odds of about 4e-5.
    assert!(
        last - first >= window / 4,
        "closes spread over the window, not all at once: {at:?}"
    );
    let (status, _, body) = slow.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(body.len(), 1000);
    let stopped = stopped.await.unwrap();
    assert!(
        stopped < Duration::from_millis(3500),
        "stopped {stopped:?} after shutdown began, once the tunnels had closed, not at the 5 s timeout"
    );
    assert_eq!(proxy.open_connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_finishes_in_flight_requests() {
    let blue = Upstream::start("blue").await;
    let proxy = start_proxy(test_config(), table(&[&blue], &[]));
    let addr = proxy.local_addrs()[0];
    let slow = tokio::spawn(async move {
        let mut c = H1::connect(addr).await.unwrap();
        c.get("/slow?ms=1000&size=5000").await.unwrap()
    });
    assert!(in_flight_reaches(&proxy, Colour::Blue, 1).await);
    proxy.shutdown();
    // New connections are refused once the listeners are gone.
    assert!(eventually(Duration::from_secs(3), || std::net::TcpStream::connect(addr).is_err()).await);
    let (status, _, body) = slow.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(body.len(), 5000);
    let p = proxy.clone();
    tokio::task::spawn_blocking(move || p.join()).await.unwrap();
    assert_eq!(proxy.open_connections(), 0);
}

/// CPU time this process has used, over all its threads.
fn process_cpu() -> Duration {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_PROCESS_CPUTIME_ID).expect("process CPU clock");
    Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32)
}

/// Connections that sent a prefix of the HTTP/2 preface ("P") and nothing more cost next to no
/// CPU while they wait for the rest: the proxy sleeps until their next bytes arrive instead of
/// looking again and again. Afterwards such a connection still becomes HTTP/2 when the rest of
/// the preface follows, HTTP/1 when a request line follows, and is closed when it half-closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_holding_a_prefix_of_the_http2_preface_cost_no_cpu() {
    const CONNS: usize = 2_000;
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let mut config = test_config();
    config.client_header_timeout = Duration::from_secs(60);
    let proxy = start_proxy(config, table(&[&blue], &[&green]));
    let addr = proxy.local_addrs()[0];

    let mut held = Vec::with_capacity(CONNS);
    for _ in 0..CONNS {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"P").await.unwrap();
        held.push(s);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while proxy.open_connections() < CONNS {
        assert!(
            Instant::now() < deadline,
            "{} of {CONNS} connections open",
            proxy.open_connections()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let every connection's first bytes be seen before measuring.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let window = Duration::from_secs(2);
    let before = process_cpu();
    tokio::time::sleep(window).await;
    let used = process_cpu() - before;
    assert!(
        used < window / 20,
        "{CONNS} connections holding \"P\" used {used:?} of CPU in {window:?} (allowed: under 5% of one core)"
    );
    assert_eq!(proxy.open_connections(), CONNS, "the waiting connections are kept");

    // The rest of the preface makes one HTTP/2: the proxy answers with its SETTINGS frame.
    let mut h2 = held.pop().unwrap();
    h2.write_all(&b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[1..]).await.unwrap();
    h2.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap(); // empty SETTINGS
    let mut frame = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(5), h2.read_exact(&mut frame))
        .await
        .expect("an HTTP/2 answer in time")
        .unwrap();
    assert_eq!(frame[3], 4, "the first frame is SETTINGS: {frame:?}");

    // Anything else after the "P" is HTTP/1.
    let mut h1 = held.pop().unwrap();
    h1.write_all(b"UT / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        .await
        .unwrap();
    let resp = read_response(&mut h1).await.expect("an HTTP/1 answer");
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");

    // A client that half-closes after the "P" is let go at once, not kept to the header timeout.
    let mut half = held.pop().unwrap();
    half.shutdown().await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), half.read_to_end(&mut out))
        .await
        .expect("the half-closed connection is closed well before the 60 s header timeout")
        .unwrap();
}

/// Two services told apart by host: web.example (blue: `web`) and api.example (blue: `api`).
fn two_hosts(web: &Upstream, api: &Upstream) -> RouteTable {
    let mut services = Vec::new();
    for (name, host, up) in [("web", "web.example", web), ("api", "api.example", api)] {
        let mut s = Service::new(name);
        s.hosts = vec![host.to_string()];
        s.blue = Pool::new(Some("v1"), vec![Instance::new(up.addr)]);
        services.push(s);
    }
    RouteTable::new(services).unwrap()
}

fn last_header(up: &Upstream, name: &str) -> Option<String> {
    let seen = up.seen.last_headers.lock().unwrap();
    let headers = seen.as_ref()?;
    let mut all = headers
        .get_all(name)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let first = all.next();
    assert!(all.next().is_none(), "one {name} line upstream");
    first
}

/// The host a request is routed by is the host its upstream receives: an absolute-form target
/// (`GET http://api.example/...`) routes to api and is forwarded with `Host: api.example`
/// whatever Host line came with it; a Host named in `Connection` still goes upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_host_that_routes_a_request_is_the_host_its_upstream_gets() {
    let web = Upstream::start("web").await;
    let api = Upstream::start("api").await;
    let proxy = start_proxy(test_config(), two_hosts(&web, &api));
    let addr = proxy.local_addrs()[0];

    let (resp, _) = raw(
        addr,
        b"GET http://api.example/headers HTTP/1.1\r\nHost: web.example\r\nConnection: close\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(status_line(&resp), "HTTP/1.1 200 OK", "{resp}");
    assert!(resp.ends_with("api"), "routed by the target's host: {resp}");
    assert_eq!(last_header(&api, "host").as_deref(), Some("api.example"));
    assert_eq!(last_header(&api, "x-forwarded-host").as_deref(), Some("api.example"));
    assert_eq!(web.requests(), 0);

    let (resp, _) = raw(
        addr,
        b"GET /headers HTTP/1.1\r\nHost: web.example\r\nConnection: close, host\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert!(resp.ends_with("web"), "{resp}");
    assert_eq!(last_header(&web, "host").as_deref(), Some("web.example"));

    // HTTP/1.0 may come without a Host: the default service (none here) or an empty Host.
    let (resp, _) = raw(addr, b"GET /headers HTTP/1.0\r\n\r\n", Duration::from_secs(3)).await;
    assert_eq!(status_line(&resp), "HTTP/1.0 404 Not Found", "{resp}");
}

/// Requests cutover would otherwise pass on differently from how it read them are refused,
/// answered at once with the connection closed, and nothing reaches an upstream: two Host lines,
/// a Host that is not a host (400), HTTP/1.1 without Host (400), transfer codings other than
/// one chunked (501, 400 for chunked twice), CONNECT (501), a target with user information or
/// another scheme (400).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_that_cannot_be_forwarded_faithfully_are_refused() {
    let web = Upstream::start("web").await;
    let api = Upstream::start("api").await;
    let proxy = start_proxy(test_config(), two_hosts(&web, &api));
    let addr = proxy.local_addrs()[0];

    let cases: [(&str, &[u8], &str); 10] = [
        (
            "two Host lines",
            b"GET /headers HTTP/1.1\r\nHost: web.example\r\nHost: api.example\r\n\r\n",
            "400 Bad Request",
        ),
        (
            "a Host with a space",
            b"GET /headers HTTP/1.1\r\nHost: web.example x\r\n\r\n",
            "400 Bad Request",
        ),
        ("no Host in HTTP/1.1", b"GET /headers HTTP/1.1\r\n\r\n", "400 Bad Request"),
        (
            "gzip, chunked",
            b"POST /upload HTTP/1.1\r\nHost: web.example\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            "501 Not Implemented",
        ),
        (
            "identity, chunked",
            b"POST /upload HTTP/1.1\r\nHost: web.example\r\nTransfer-Encoding: identity, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            "501 Not Implemented",
        ),
        (
            "gzip then chunked on two lines",
            b"POST /upload HTTP/1.1\r\nHost: web.example\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            "501 Not Implemented",
        ),
        (
            "chunked twice",
            b"POST /upload HTTP/1.1\r\nHost: web.example\r\nTransfer-Encoding: chunked, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            "400 Bad Request",
        ),
        (
            "CONNECT",
            b"CONNECT api.example:443 HTTP/1.1\r\nHost: api.example:443\r\n\r\n",
            "501 Not Implemented",
        ),
        (
            "user information in the target",
            b"GET http://user:pw@api.example/headers HTTP/1.1\r\nHost: api.example\r\n\r\n",
            "400 Bad Request",
        ),
        (
            "another scheme",
            b"GET ftp://api.example/headers HTTP/1.1\r\nHost: api.example\r\n\r\n",
            "400 Bad Request",
        ),
    ];
    for (what, bytes, status) in cases {
        // The connection is closed after the answer: read_to_end returns well before `within`.
        let (resp, took) = raw(addr, bytes, Duration::from_secs(5)).await;
        assert_eq!(status_line(&resp), format!("HTTP/1.1 {status}"), "{what}: {resp}");
        assert!(
            took < Duration::from_secs(2),
            "{what}: the connection was left open ({took:?})"
        );
    }
    assert_eq!(
        web.requests() + api.requests(),
        0,
        "nothing refused reached an upstream"
    );

    // Plain chunked still goes through.
    let (resp, _) = raw(
        addr,
        b"POST /upload HTTP/1.1\r\nHost: web.example\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(status_line(&resp), "HTTP/1.1 200 OK", "{resp}");
}

/// An upstream that takes the request head, then reads nothing more and never answers: the
/// client gets 504 once the upstream has taken none of the body for `upstream_timeout`. A
/// client that sends its body slowly to an upstream that reads it is not cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upstream_that_stops_reading_the_body_times_out() {
    let stuck = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stuck_addr = stuck.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut s, _)) = stuck.accept().await {
            let mut head = [0u8; 512];
            let _ = s.read(&mut head).await;
            held.push(s); // open, unread, unanswered
        }
    });
    let green = Upstream::start("green").await;
    let mut s = Service::new("web");
    s.blue = Pool::new(Some("v1"), vec![Instance::new(stuck_addr)]);
    s.green = Pool::new(Some("v2"), vec![Instance::new(green.addr)]);
    s.preview_token = Some(std::sync::Arc::from(&b"let-me-preview"[..]));
    let mut config = test_config();
    config.upstream_timeout = Duration::from_secs(1);
    config.client_header_timeout = Duration::from_secs(10);
    let proxy = start_proxy(config, RouteTable::new(vec![s]).unwrap());
    let addr = proxy.local_addrs()[0];

    const LEN: usize = 64 << 20;
    let mut c = TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = c.split();
    let t = Instant::now();
    let head = format!("POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {LEN}\r\n\r\n");
    let write = async {
        let _ = wr.write_all(head.as_bytes()).await;
        let chunk = vec![b'x'; 1 << 16];
        for _ in 0..LEN / chunk.len() {
            if wr.write_all(&chunk).await.is_err() {
                break;
            }
        }
        std::future::pending::<()>().await
    };
    let mut got = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            match rd.read(&mut buf).await {
                Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
                _ => break,
            }
        }
    };
    let answered = tokio::time::timeout(Duration::from_secs(8), async {
        tokio::select! {
            _ = write => {}
            _ = read => {}
        }
    })
    .await;
    assert!(
        answered.is_ok(),
        "no answer in 8 s: the request is pinned by an upstream that stopped reading"
    );
    let resp = String::from_utf8_lossy(&got);
    assert_eq!(status_line(&resp), "HTTP/1.1 504 Gateway Timeout", "{resp}");
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "not before the upstream timeout: {:?}",
        t.elapsed()
    );

    // A slow client (2 s for its body, twice the upstream timeout) to an upstream that reads.
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nX-Cutover-Preview: let-me-preview\r\nContent-Length: 10\r\n\r\n")
        .await
        .unwrap();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        c.write_all(b"y").await.unwrap();
    }
    let resp = read_response(&mut c).await.expect("an answer");
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.ends_with(" 10"), "the whole body arrived: {resp}");
}
