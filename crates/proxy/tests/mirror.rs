//! Mirroring through real sockets: which live requests are copied to the colour being
//! validated, and that a copy never holds up or fails the live request it copies.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cutover_proxy::{Colour, Instance, Mirror, Pool, RouteTable, Service};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use support::*;
use tokio::net::TcpListener;

/// What a recording upstream saw of one request.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Got {
    method: Method,
    path: String,
    mirrored: bool,
}

/// An upstream that records every request and answers `status` after `delay`.
struct Recorder {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<Got>>>,
}

impl Recorder {
    async fn start(colour: &'static str, status: StatusCode, delay: Duration) -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let g = got.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let g = g.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let g = g.clone();
                        async move {
                            g.lock().unwrap().push(Got {
                                method: req.method().clone(),
                                path: req.uri().path().to_string(),
                                mirrored: req.headers().get("x-cutover-mirror").is_some_and(|v| v == "1"),
                            });
                            let _ = req.into_body().collect().await;
                            tokio::time::sleep(delay).await;
                            Ok::<_, Infallible>(Response::builder().status(status).body(full(colour)).unwrap())
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Recorder { addr, got }
    }

    fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }
}

fn two_colours(blue: &Recorder, green: &Recorder) -> RouteTable {
    let mut s = Service::new("web");
    s.blue = Pool::new(Some("v1"), vec![Instance::new(blue.addr)]);
    s.green = Pool::new(Some("v2"), vec![Instance::new(green.addr)]);
    s.preview_token = Some(Arc::from(&b"let-me-preview"[..]));
    RouteTable::new(vec![s]).unwrap()
}

async fn send(h1: &mut H1, method: Method, path: &str, body: &'static str) -> (StatusCode, Duration) {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "web.test")
        .body(if body.is_empty() { empty() } else { full(body) })
        .unwrap();
    let start = Instant::now();
    let (status, _, _) = h1.request(req).await.expect("request");
    (status, start.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_a_sample_of_the_listed_methods_to_the_validated_colour_only() {
    let blue = Recorder::start("blue", StatusCode::OK, Duration::ZERO).await;
    let green = Recorder::start("green", StatusCode::OK, Duration::ZERO).await;
    let proxy = start_proxy(test_config(), two_colours(&blue, &green));
    let mut h1 = H1::connect(proxy.local_addrs()[0]).await.unwrap();

    // Every GET copied; no other method, no request with a body, no preview request.
    let mirror = Arc::new(Mirror::new(Colour::Green, 1.0, &[Method::GET], 64));
    proxy.mirror("web", mirror.clone()).unwrap();
    for i in 0..30 {
        assert_eq!(send(&mut h1, Method::GET, &format!("/get/{i}"), "").await.0, 200);
        assert_eq!(send(&mut h1, Method::POST, "/post", "an order").await.0, 200);
        assert_eq!(send(&mut h1, Method::HEAD, "/head", "").await.0, 200);
        assert_eq!(send(&mut h1, Method::DELETE, "/delete", "").await.0, 200);
        assert_eq!(send(&mut h1, Method::GET, "/get-with-body", "a body").await.0, 200);
    }
    let preview = Request::get("/preview")
        .header("host", "web.test")
        .header("x-cutover-preview", "let-me-preview")
        .body(empty())
        .unwrap();
    assert_eq!(h1.request(preview).await.unwrap().0, 200);
    assert!(
        eventually(Duration::from_secs(5), || green.got().len() >= 31).await,
        "{:?}",
        green.got()
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let copies: Vec<Got> = green.got().into_iter().filter(|g| g.path != "/preview").collect();
    let expected: Vec<Got> = (0..30)
        .map(|i| Got {
            method: Method::GET,
            path: format!("/get/{i}"),
            mirrored: true,
        })
        .collect();
    let mut sorted = copies.clone();
    sorted.sort_by_key(|g| g.path.trim_start_matches("/get/").parse::<u32>().unwrap_or(u32::MAX));
    assert_eq!(sorted, expected, "green got exactly the GETs, marked as copies");
    assert_eq!(
        green
            .got()
            .iter()
            .filter(|g| g.path == "/preview" && !g.mirrored)
            .count(),
        1
    );
    assert_eq!(blue.got().len(), 150, "every live request was answered by blue");
    assert!(blue.got().iter().all(|g| !g.mirrored));
    let report = mirror.report();
    assert_eq!(
        (report.live.requests(), report.copies.requests(), report.dropped),
        (30, 30, 0)
    );
    assert_eq!(report.copies.by_class[1], 30, "{report:?}");
    assert_eq!(
        proxy
            .table()
            .service("web")
            .unwrap()
            .green
            .mirror_totals()
            .copies
            .requests(),
        30
    );

    // A sample of a fifth: about 200 of 1000 GETs (binomial: 5 standard deviations either side).
    let sampled = Arc::new(Mirror::new(Colour::Green, 0.2, &[Method::GET, Method::HEAD], 64));
    proxy.mirror("web", sampled.clone()).unwrap();
    let before = green.got().len();
    for _ in 0..1000 {
        assert_eq!(send(&mut h1, Method::GET, "/sampled", "").await.0, 200);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let copied = green.got().len() - before;
    assert!(
        (137..=263).contains(&copied),
        "{copied} of 1000 copied at a sample of 0.2"
    );
    assert_eq!(sampled.report().copies.requests() as usize, copied);
    assert_eq!(sampled.report().live.requests() as usize, copied);

    // Closed: nothing copied any more; closing an earlier window changes nothing.
    assert!(!proxy.end_mirror("web", &mirror), "not the open window");
    assert!(proxy.end_mirror("web", &sampled));
    let before = green.got().len();
    for _ in 0..100 {
        assert_eq!(send(&mut h1, Method::GET, "/after", "").await.0, 200);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(green.got().len(), before, "copied after the window closed");
    // A client cannot pass a request off as a copy: its own header is removed.
    let forged = Request::get("/forged")
        .header("host", "web.test")
        .header("x-cutover-mirror", "1")
        .body(empty())
        .unwrap();
    assert_eq!(h1.request(forged).await.unwrap().0, 200);
    let last = blue.got().pop().unwrap();
    assert_eq!((last.path.as_str(), last.mirrored), ("/forged", false));

    // A window for the live colour copies nothing (it would double the live traffic).
    proxy
        .mirror("web", Arc::new(Mirror::new(Colour::Blue, 1.0, &[Method::GET], 64)))
        .unwrap();
    let before = (blue.got().len(), green.got().len());
    for _ in 0..20 {
        assert_eq!(send(&mut h1, Method::GET, "/live", "").await.0, 200);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!((blue.got().len(), green.got().len()), (before.0 + 20, before.1));
    proxy.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_failing_or_missing_colour_never_slows_or_fails_the_live_requests() {
    let blue = Recorder::start("blue", StatusCode::OK, Duration::ZERO).await;
    // Green answers 500, each after a second.
    let green = Recorder::start("green", StatusCode::INTERNAL_SERVER_ERROR, Duration::from_secs(1)).await;
    let proxy = start_proxy(test_config(), two_colours(&blue, &green));
    let mut h1 = H1::connect(proxy.local_addrs()[0]).await.unwrap();
    let mirror = Arc::new(Mirror::new(Colour::Green, 1.0, &[Method::GET], 4));
    proxy.mirror("web", mirror.clone()).unwrap();
    let mut slowest = Duration::ZERO;
    for _ in 0..200 {
        let (status, took) = send(&mut h1, Method::GET, "/", "").await;
        assert_eq!(status, 200);
        slowest = slowest.max(took);
    }
    // Green takes a second per copy: a live request that waited for one would show it.
    assert!(slowest < Duration::from_millis(500), "a live request took {slowest:?}");
    let report = mirror.report();
    assert_eq!(report.dropped + report.live.requests(), 200, "{report:?}");
    assert!(report.dropped >= 190, "only 4 copies at once: {report:?}");
    let green_pool = || proxy.table().service("web").unwrap().green.clone();
    assert_eq!(green_pool().mirror_totals().dropped, report.dropped);
    assert!(
        eventually(Duration::from_secs(5), || mirror.report().copies.requests()
            == report.live.requests())
        .await,
        "{:?}",
        mirror.report()
    );
    let report = mirror.report();
    assert_eq!(report.copies.errors(), report.copies.requests(), "{report:?}");
    assert!(report.copies.quantile(0.99).unwrap() >= Duration::from_millis(900));
    assert!(report.live.quantile(0.99).unwrap() < Duration::from_millis(500));

    // Green gone (connections refused): the copies count as failed, live is untouched.
    let gone: SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    proxy
        .update(|t| {
            t.with_service("web", |s| {
                s.green = s.green.with_instances(Some("v2"), vec![Instance::new(gone)]);
                Ok(())
            })
        })
        .unwrap();
    let refused = Arc::new(Mirror::new(Colour::Green, 1.0, &[Method::GET], 64));
    proxy.mirror("web", refused.clone()).unwrap();
    for _ in 0..20 {
        assert_eq!(send(&mut h1, Method::GET, "/", "").await.0, 200);
    }
    assert!(eventually(Duration::from_secs(5), || refused.report().copies.requests() == 20).await);
    assert_eq!(refused.report().copies.errors(), 20, "{:?}", refused.report());
    assert_eq!(refused.report().live.errors(), 0);
    proxy.shutdown();
}
