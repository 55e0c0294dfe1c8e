//! Idle upstream connections of drained colours and of instances that left the table. In a test
//! binary of its own: it counts the process's open descriptors and its resident memory, which
//! no other test may share.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cutover_proxy::{Colour, Instance, Proxy};
use support::*;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").expect("read /proc/self/fd").count()
}

/// Resident memory of this process, in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

/// Deploys `to` with a new instance at `addr` (what a deploy's fresh process is to the proxy: a
/// new `Instance`, so a new pool), switches to it and drains the colour that was live.
async fn deploy(proxy: &Proxy, to: Colour, addr: std::net::SocketAddr, round: usize) {
    let version = format!("v{round}");
    proxy
        .update(|t| {
            t.with_service("web", |s| {
                let pool = s.pool(to).with_instances(Some(&version), vec![Instance::new(addr)]);
                *s.pool_mut(to) = pool;
                Ok(())
            })
        })
        .unwrap();
    assert!(proxy.switch("web", to).unwrap());
    let r = proxy
        .drain("web", to.other(), Duration::from_secs(5), Duration::from_millis(100))
        .await
        .unwrap();
    assert!(r.completed, "round {round}: the drain completed: {r:?}");
}

/// 100 deploys under a keep-alive load of 8 clients: once the load stops, the proxy's upstream
/// connections, the process's descriptors and its resident memory are back near where they
/// started within a second (the idle timeout, 30 s, plays no part). A drained colour left in
/// the table for a rollback keeps no idle connection, and after a rollback to it its
/// connections are pooled and reused again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drained_colours_keep_no_idle_upstream_connections() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let proxy = start_proxy(test_config(), table(&[&blue], &[&green]));
    let addr = proxy.local_addrs()[0];
    let upstream_of = |c: Colour| if c == Colour::Blue { &blue } else { &green };

    // Warm up what the first requests allocate once (runtimes, buffers, thread caches); the
    // client's connection closes before the baseline is taken.
    {
        let mut c = H1::connect(addr).await.unwrap();
        for _ in 0..50 {
            assert_eq!(c.get("/").await.unwrap().0, 200);
        }
    }
    assert!(
        eventually(Duration::from_secs(5), || proxy.open_connections() == 0).await,
        "the warm-up's client connection closes"
    );
    let fds_before = open_fds();
    let rss_before = rss_kib();

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (stop, ok) = (stop.clone(), ok.clone());
        clients.push(tokio::spawn(async move {
            let mut c = H1::connect(addr).await.expect("connect");
            let mut failures = Vec::new();
            // Bounded by the flag, and by the count whatever happens.
            for _ in 0..1_000_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                match c.get("/").await {
                    Ok((status, _, _)) if status == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok((status, _, body)) => failures.push(format!("{status} {:?}", String::from_utf8_lossy(&body))),
                    Err(e) => {
                        failures.push(format!("transport: {e}"));
                        c = H1::connect(addr).await.expect("reconnect");
                    }
                }
            }
            failures
        }));
    }

    let started = Instant::now();
    let mut live = Colour::Blue;
    let mut peak_fds = 0;
    for round in 1..=100 {
        let to = live.other();
        deploy(&proxy, to, upstream_of(to).addr, round).await;
        live = to;
        // Long enough for the load to reach the new colour on both workers.
        tokio::time::sleep(Duration::from_millis(10)).await;
        peak_fds = peak_fds.max(open_fds());
        assert!(started.elapsed() < Duration::from_secs(60), "deploy loop bounded");
    }
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for c in clients {
        failures.extend(c.await.unwrap());
    }
    let stopped = Instant::now();
    let requests = ok.load(Ordering::Relaxed);
    assert!(
        failures.is_empty(),
        "{} failures, first: {:?}",
        failures.len(),
        failures.first()
    );
    assert!(requests > 1000, "too little traffic to mean anything: {requests}");

    // Left: the live colour's idle connections, at most one per client on each worker (8 clients
    // never have more than 8 requests in flight), two descriptors each in this process (the
    // proxy's end and the upstream's). Margin: 8 connections, 16 descriptors, plus 8 for what
    // the runtime opens and closes meanwhile.
    let fd_margin = 24;
    let settled = eventually(Duration::from_secs(1), || open_fds() <= fds_before + fd_margin).await;
    let fds_after = open_fds();
    let upstream_open = (blue.open_connections(), green.open_connections());
    // Freed buffers need not go back to the system at once (allocator caches); 4 MiB is a
    // fifth of what 100 deploys' idle connections held when they lingered.
    let rss_margin = 4 * 1024;
    let rss_settled = eventually(Duration::from_secs(1), || rss_kib() <= rss_before + rss_margin).await;
    let rss_after = rss_kib();
    eprintln!(
        "{requests} requests over 100 deploys; descriptors {fds_before} before, {peak_fds} at most during, \
         {fds_after} {:.0?} after the load stopped; RSS {rss_before} KiB before, {rss_after} KiB after; \
         upstream connections open (blue, green) {upstream_open:?}",
        stopped.elapsed()
    );
    assert!(
        settled,
        "descriptors back within {fd_margin} of {fds_before} a second after the load stopped: {fds_after} \
         (upstream connections open: {upstream_open:?})"
    );
    assert!(
        rss_settled,
        "RSS back within {rss_margin} KiB of {rss_before} KiB a second after the load stopped: {rss_after} KiB"
    );
    let drained = upstream_of(live.other());
    assert_eq!(
        drained.open_connections(),
        0,
        "the drained colour, still in the table, keeps no upstream connection"
    );

    // A rollback to the drained colour (the same instances, still in the table): its
    // connections are pooled again, so sequential requests share one.
    assert!(proxy.switch("web", live.other()).unwrap());
    let accepted = drained.connections();
    let mut c = H1::connect(addr).await.unwrap();
    for _ in 0..20 {
        let (status, _, body) = c.get("/").await.unwrap();
        assert_eq!((status, colour_of(&body)), (http::StatusCode::OK, Some(live.other())));
    }
    let opened = drained.connections() - accepted;
    assert!(
        opened <= 2,
        "after the rollback, 20 sequential requests reuse pooled connections ({opened} opened)"
    );
    proxy.shutdown();
}
