//! Loads that test how one worker goes through its passes.
//!
//! Every connection ready at once: more ready sockets than a worker takes from one wait, so the
//! burst is served over several passes. Nobody is left behind, and the connections stay open for
//! the next burst.
//!
//! A large response to a client that does not read: the worker's writes to it back up, and the
//! rest of its clients are served meanwhile.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use cutover_proxy::Colour;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Barrier;

const CLIENTS: usize = 200;
const BURSTS: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_from_every_connection_is_served_in_full() {
    let blue = Upstream::start("blue").await;
    let mut cfg = test_config();
    cfg.workers = 1;
    let proxy = start_proxy(cfg, table(&[&blue], &[]));
    let addr = proxy.local_addrs()[0];

    let mut clients = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        clients.push(H1::connect(addr).await.unwrap());
    }
    assert!(
        eventually(Duration::from_secs(5), || proxy.open_connections() == CLIENTS).await,
        "proxy holds {} connections, expected {CLIENTS}",
        proxy.open_connections()
    );

    let barrier = Arc::new(Barrier::new(CLIENTS));
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            let barrier = barrier.clone();
            tokio::spawn(async move {
                let mut answers = Vec::with_capacity(BURSTS);
                for _ in 0..BURSTS {
                    // Every client sends at the same instant, on its own keep-alive connection.
                    barrier.wait().await;
                    let t = Instant::now();
                    let (status, _, body) = c.get("/").await.expect("request on a kept-alive connection");
                    answers.push((status.as_u16(), colour_of(&body), t.elapsed()));
                }
                answers
            })
        })
        .collect();

    let all = tokio::time::timeout(Duration::from_secs(30), futures_util::future::join_all(tasks))
        .await
        .expect("every burst answered within 30 s");
    let mut slowest = Duration::ZERO;
    for (i, answers) in all.into_iter().enumerate() {
        let answers = answers.expect("client task");
        assert_eq!(answers.len(), BURSTS, "client {i}");
        for (burst, (status, colour, took)) in answers.into_iter().enumerate() {
            assert_eq!(status, 200, "client {i}, burst {burst}");
            assert_eq!(colour, Some(Colour::Blue), "client {i}, burst {burst}");
            slowest = slowest.max(took);
        }
    }
    assert!(
        slowest < Duration::from_secs(5),
        "slowest answer in a burst took {slowest:?}"
    );
    assert_eq!(blue.requests(), (CLIENTS * BURSTS) as u64);
    // The clients are gone (their tasks ended), and so are their connections on the proxy.
    assert!(
        eventually(Duration::from_secs(5), || proxy.open_connections() == 0).await,
        "{} connections still open after the clients left",
        proxy.open_connections()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_large_response_to_a_client_that_reads_late_arrives_whole_while_others_are_served() {
    const SIZE: usize = 24 * 1024 * 1024;
    let blue = Upstream::start("blue").await;
    let mut cfg = test_config();
    cfg.workers = 1;
    let proxy = start_proxy(cfg, table(&[&blue], &[]));
    let addr = proxy.local_addrs()[0];

    let mut late = TcpStream::connect(addr).await.unwrap();
    late.write_all(format!("GET /slow?ms=0&size={SIZE} HTTP/1.1\r\nhost: web.test\r\n\r\n").as_bytes())
        .await
        .unwrap();
    // Not read for now: the socket buffers on both sides fill, and the worker's writes to this
    // client wait for room.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut other = H1::connect(addr).await.unwrap();
    for i in 0..50 {
        let (status, _, body) = tokio::time::timeout(Duration::from_secs(2), other.get("/"))
            .await
            .unwrap_or_else(|_| panic!("request {i} of another client waited 2 s behind the stuck download"))
            .expect("another client's request");
        assert_eq!(status, 200, "request {i}");
        assert_eq!(colour_of(&body), Some(Colour::Blue), "request {i}");
    }

    // Now the late client reads: a little at a time first, then the rest.
    let started = Instant::now();
    let mut got: Vec<u8> = Vec::with_capacity(SIZE + 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    let mut reads = 0;
    let mut head_end = None;
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), late.read(&mut chunk))
            .await
            .expect("the download stalled for 5 s")
            .expect("reading the download");
        if n == 0 {
            break;
        }
        got.extend_from_slice(&chunk[..n]);
        reads += 1;
        if reads < 20 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if head_end.is_none() {
            head_end = find(&got, b"\r\n\r\n");
        }
        if head_end.is_some_and(|end| got.len() >= end + 4 + SIZE) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "download still running after 30 s"
        );
    }
    let end = head_end.expect("a response head");
    let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "head: {head}");
    assert!(head.contains(&format!("content-length: {SIZE}")), "head: {head}");
    let body = &got[end + 4..];
    assert_eq!(body.len(), SIZE, "body length");
    assert_eq!(&body[..5], b"blue ");
    let stray = body[5..].iter().position(|&b| b != b'x');
    assert_eq!(stray, None, "body differs from what the upstream sent");
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
