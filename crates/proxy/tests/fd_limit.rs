//! The open files limit. In a test binary of its own: it changes the process's limit and
//! uses up every descriptor for a moment, which no other test may share.

mod support;

use cutover_proxy::{Colour, Proxy};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use support::*;

/// One test, run in order: the steps change process-wide state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_open_files_limit() {
    // 1. A proxy raises the soft limit to the hard one at start.
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    assert!(hard >= 4096, "this test needs a hard limit of 4096 or more, not {hard}");
    setrlimit(Resource::RLIMIT_NOFILE, 1024, hard).unwrap();
    let a = Upstream::start("blue").await;
    let b = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let mut config = test_config();
    config.max_connections = 1000;
    let proxy = start_proxy(config, table(&[&a, &b], &[&green]));
    assert_eq!(
        getrlimit(Resource::RLIMIT_NOFILE).unwrap(),
        (hard, hard),
        "soft limit raised to the hard one"
    );

    // 2. Out of descriptors on this host, an upstream connect fails with EMFILE: the client gets
    //    503 naming the proxy, and neither instance is ejected for it.
    let mut client = H1::connect(proxy.local_addrs()[0]).await.unwrap();
    // A soft limit of 4096 keeps the number of descriptors to use up small whatever the hard
    // limit is (it may be a million).
    setrlimit(Resource::RLIMIT_NOFILE, 4096, hard).unwrap();
    let mut hog = Vec::new();
    while let Ok(f) = std::fs::File::open("/dev/null") {
        hog.push(f);
        assert!(hog.len() <= 4096, "open never failed");
    }
    for _ in 0..4 {
        let (status, _, body) = client.get("/").await.unwrap();
        let body = String::from_utf8_lossy(&body).into_owned();
        assert_eq!(status, 503, "{body}");
        assert!(
            body.contains("the proxy could not open an upstream connection"),
            "{body}"
        );
    }
    drop(hog);
    let t = proxy.table();
    for inst in t.service("web").unwrap().pool(Colour::Blue).instances.iter() {
        assert!(!inst.ejected(), "{} ejected for this host's own shortage", inst.addr);
    }
    // Both instances serve again at once.
    for _ in 0..10 {
        let (status, _, body) = client.get("/").await.unwrap();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    }
    assert!(
        a.requests() > 0 && b.requests() > 0,
        "a {} b {}",
        a.requests(),
        b.requests()
    );
    proxy.shutdown();
    proxy.join();

    // 3. A max_connections whose client connections alone cannot fit is refused at start,
    //    naming the setting and what to do. (Lowering the hard limit cannot be undone without
    //    privileges: it comes last.)
    setrlimit(Resource::RLIMIT_NOFILE, 2000, 2000).unwrap();
    let mut config = test_config();
    config.max_connections = 10_000;
    let err = Proxy::start(config, table(&[&a], &[&green])).err().expect("refused");
    let msg = err.to_string();
    assert!(msg.contains("max_connections = 10000"), "{msg}");
    assert!(msg.contains("2000 open files"), "{msg}");
    assert!(msg.contains("LimitNOFILE"), "{msg}");
    let mut config = test_config();
    config.max_connections = 1500;
    let proxy = Proxy::start(config, table(&[&a], &[&green])).expect("1500 fits in 2000");
    proxy.shutdown();
}
