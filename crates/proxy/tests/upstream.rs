//! The upstream side: keep-alive connections reused per instance, the pool bounded by
//! `upstream_pool_size` and emptied after `upstream_idle_timeout`, and `Expect: 100-continue`
//! answered by the proxy before the body goes upstream.

mod support;

use std::time::Duration;

use sha2::{Digest, Sha256};
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_reuse_the_upstream_connections_they_left_idle() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let mut cfg = test_config();
    cfg.workers = 1;
    let proxy = start_proxy(cfg, table(&[&blue], &[&green]));
    let addr = proxy.local_addrs()[0];

    let mut c = H1::connect(addr).await.unwrap();
    for _ in 0..100 {
        assert_eq!(c.get("/").await.unwrap().2, "blue");
    }
    assert_eq!(blue.requests(), 100);
    assert_eq!(blue.connections(), 1, "one connection, kept alive across 100 requests");

    // Eight clients at once need at most eight connections, whatever their number of requests.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        tasks.push(tokio::spawn(async move {
            let mut c = H1::connect(addr).await.unwrap();
            for _ in 0..25 {
                assert_eq!(c.get("/").await.unwrap().2, "blue");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(blue.requests(), 300);
    assert!(
        blue.connections() <= 8,
        "{} connections for 8 clients",
        blue.connections()
    );
    assert_eq!(green.connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_size_of_zero_keeps_no_idle_connection() {
    let blue = Upstream::start("blue").await;
    let mut cfg = test_config();
    cfg.workers = 1;
    cfg.upstream_pool_size = 0;
    let proxy = start_proxy(cfg, table(&[&blue], &[]));
    let mut c = H1::connect(proxy.local_addrs()[0]).await.unwrap();
    for _ in 0..20 {
        assert_eq!(c.get("/").await.unwrap().2, "blue");
    }
    assert_eq!(blue.connections(), 20, "a new connection for every request");
}

/// At most `upstream_pool_size` connections per instance stay open once their requests are done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_keeps_at_most_its_size_of_idle_connections() {
    let blue = Upstream::start("blue").await;
    let mut cfg = test_config();
    cfg.workers = 1;
    cfg.upstream_pool_size = 2;
    let proxy = start_proxy(cfg, table(&[&blue], &[]));
    let addr = proxy.local_addrs()[0];
    // Eight requests at once, each held 300 ms by the upstream: eight connections.
    let burst = || async move {
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                tokio::spawn(async move {
                    let mut c = H1::connect(addr).await.unwrap();
                    c.get("/slow?ms=300&size=10").await.unwrap().0
                })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap(), 200);
        }
    };
    burst().await;
    assert_eq!(blue.connections(), 8);
    // Two of them were kept: the next burst reuses those and opens six.
    burst().await;
    assert_eq!(blue.connections(), 14);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_upstream_connections_are_dropped_after_the_upstream_idle_timeout() {
    let blue = Upstream::start("blue").await;
    let mut cfg = test_config();
    cfg.workers = 1;
    cfg.upstream_idle_timeout = Duration::from_millis(300);
    let proxy = start_proxy(cfg, table(&[&blue], &[]));
    let mut c = H1::connect(proxy.local_addrs()[0]).await.unwrap();
    assert_eq!(c.get("/").await.unwrap().2, "blue");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(c.get("/").await.unwrap().2, "blue");
    assert_eq!(blue.connections(), 1, "reused within the idle timeout");
    // The sweep runs every quarter of the timeout (100 ms at least): after 800 ms it has run.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(c.get("/").await.unwrap().2, "blue");
    assert_eq!(blue.connections(), 2, "a new connection after the idle one was dropped");
}

/// A client that sends `Expect: 100-continue` gets the interim answer from the proxy, then its
/// body goes upstream in full; the upstream does not see the expectation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_is_answered_by_the_proxy() {
    let blue = Upstream::start("blue").await;
    let proxy = start_proxy(test_config(), table(&[&blue], &[]));
    let mut s = TcpStream::connect(proxy.local_addrs()[0]).await.unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\nExpect: 100-continue\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(2), read_head_and(&mut s, &mut buf, |_| 0))
        .await
        .expect("100 Continue before the body is sent")
        .expect("closed before the interim answer");
    let interim = String::from_utf8_lossy(&buf.drain(..end).collect::<Vec<_>>()).into_owned();
    assert!(interim.starts_with("HTTP/1.1 100 Continue\r\n"), "{interim}");

    s.write_all(b"twelve bytes").await.unwrap();
    let expected = format!("blue {} 12", hex(&Sha256::digest(b"twelve bytes")));
    let end = tokio::time::timeout(Duration::from_secs(5), read_head_and(&mut s, &mut buf, content_length))
        .await
        .expect("the upload's answer")
        .expect("closed before the answer");
    let answer = String::from_utf8_lossy(&buf[..end + content_length(&buf[..end])]).into_owned();
    assert!(answer.ends_with(&expected), "{answer}");
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    let h = blue.seen.last_headers.lock().unwrap().clone().unwrap();
    assert!(h.get("expect").is_none(), "the expectation stays with the proxy");
    assert_eq!(h["content-length"], "12");
}
