//! Every connection ready at once on one worker: more ready sockets than a worker takes from one
//! wait, so the burst is served over several passes. Nobody is left behind, and the
//! connections stay open for the next burst.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use cutover_proxy::Colour;
use support::*;
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
