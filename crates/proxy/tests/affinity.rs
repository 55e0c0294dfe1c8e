//! Sticky sessions across a switch, through real sockets: a client's cookie jar decides where
//! its requests go after a promotion, and only cookies the proxy signed count.

mod support;

use std::sync::Arc;
use std::time::Duration;

use cutover_proxy::{Affinity, Colour, Proxy};
use http::Request;
use support::*;

const KEY: &[u8] = b"an affinity key of 32 bytes.....";

/// A client with a one-cookie jar for the proxy's cookie (as a browser keeps it).
struct Session {
    h1: H1,
    cookie: Option<String>,
    minted: usize,
}

impl Session {
    async fn new(proxy: &Proxy) -> Session {
        Session {
            h1: H1::connect(proxy.local_addrs()[0]).await.expect("connect"),
            cookie: None,
            minted: 0,
        }
    }

    async fn get_at(&mut self, path: &str) -> (Colour, http::HeaderMap) {
        let mut req = Request::get(path).header("host", "web.test");
        if let Some(c) = &self.cookie {
            req = req.header("cookie", format!("theme=dark; cutover_session={c}"));
        }
        let (status, headers, body) = self.h1.request(req.body(empty()).unwrap()).await.expect("request");
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        for v in headers.get_all("set-cookie") {
            let v = v.to_str().unwrap();
            if let Some(rest) = v.strip_prefix("cutover_session=") {
                self.cookie = Some(rest.split(';').next().unwrap().to_string());
                self.minted += 1;
            }
        }
        (colour_of(&body).expect("a colour"), headers)
    }

    async fn get(&mut self) -> Colour {
        self.get_at("/").await.0
    }
}

fn sticky_table(blue: &Upstream, green: &Upstream) -> cutover_proxy::RouteTable {
    let t = table(&[blue], &[green]);
    t.with_service("web", |s| {
        s.affinity = Some(Arc::new(
            Affinity::new("cutover_session", Duration::from_secs(900), KEY).unwrap(),
        ));
        Ok(())
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_begun_on_blue_stay_there_while_pinned_and_new_ones_go_green() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let proxy = start_proxy(test_config(), sticky_table(&blue, &green));

    let mut old = Session::new(&proxy).await;
    assert_eq!(old.get().await, Colour::Blue);
    assert_eq!(old.minted, 1, "the first response sets the cookie");
    assert_eq!(old.get().await, Colour::Blue);
    assert_eq!(
        old.minted, 1,
        "a valid cookie for the colour it went to is not set again"
    );

    assert!(proxy
        .switch_pinned("web", Colour::Green, Some(Duration::from_secs(60)))
        .unwrap());
    let pin = proxy.table().service("web").unwrap().pin().cloned().expect("a pin");
    assert_eq!(pin.colour, Colour::Blue);
    for _ in 0..5 {
        assert_eq!(old.get().await, Colour::Blue, "a session begun on blue stays there");
    }
    let mut new = Session::new(&proxy).await;
    assert_eq!(new.get().await, Colour::Green);
    assert_eq!(new.get().await, Colour::Green);
    assert_eq!(new.minted, 1);

    // A forged cookie naming blue: a real blue cookie with its tag altered, and one recoloured.
    let real = old.cookie.clone().unwrap();
    let mut forged = Session::new(&proxy).await;
    let (head, tag) = real.rsplit_once('.').unwrap();
    let altered = if tag.starts_with('A') { "B" } else { "A" };
    forged.cookie = Some(format!("{head}.{altered}{}", &tag[1..]));
    assert_eq!(forged.get().await, Colour::Green);
    let mut recoloured = Session::new(&proxy).await;
    recoloured.cookie = Some(real.replacen("b.", "g.", 1));
    assert_eq!(recoloured.get().await, Colour::Green);
    // Its own cookies came through, and ours was added after them.
    let (_, headers) = Session::new(&proxy).await.get_at("/app-cookies").await;
    let set: Vec<_> = headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    assert_eq!(set.len(), 3, "{set:?}");
    assert_eq!(set[0], "app_session=s1; Path=/");
    assert_eq!(set[1], "theme=dark");
    assert!(set[2].starts_with("cutover_session=g."), "{set:?}");

    let snap = proxy
        .table()
        .service("web")
        .unwrap()
        .affinity
        .as_ref()
        .unwrap()
        .snapshot();
    assert_eq!(snap.pinned, [5, 0]);
    assert_eq!(snap.ignored[1], 2, "two invalid cookies: {snap:?}");

    // The pin ends: the old session goes green and gets a green cookie.
    assert!(proxy.unpin("web", Colour::Blue).unwrap());
    assert_eq!(old.get().await, Colour::Green);
    assert!(old.cookie.as_deref().unwrap().starts_with("g."));
    assert_eq!(old.get().await, Colour::Green);

    // The preview route never gets a cookie.
    let mut preview = H1::connect(proxy.local_addrs()[0]).await.unwrap();
    let req = Request::get("/")
        .header("host", "web.test")
        .header("x-cutover-preview", "let-me-preview")
        .body(empty())
        .unwrap();
    let (_, headers, body) = preview.request(req).await.unwrap();
    assert_eq!(colour_of(&body), Some(Colour::Blue));
    assert!(headers.get("set-cookie").is_none());
    proxy.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pin_runs_out_and_a_rollback_ends_it() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let proxy = start_proxy(test_config(), sticky_table(&blue, &green));
    let mut old = Session::new(&proxy).await;
    assert_eq!(old.get().await, Colour::Blue);

    proxy
        .switch_pinned("web", Colour::Green, Some(Duration::from_millis(300)))
        .unwrap();
    assert_eq!(old.get().await, Colour::Blue);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(old.get().await, Colour::Green, "the window is over");

    // Back to blue, pinned green for a while; green sessions stay, then a rollback to green
    // ends the pin (blue, the rejected colour, keeps nobody).
    let mut b = Session::new(&proxy).await;
    proxy
        .switch_pinned("web", Colour::Blue, Some(Duration::from_secs(60)))
        .unwrap();
    assert_eq!(old.get().await, Colour::Green);
    assert_eq!(b.get().await, Colour::Blue);
    proxy.switch("web", Colour::Green).unwrap();
    assert!(proxy.table().service("web").unwrap().pin().is_none());
    assert_eq!(b.get().await, Colour::Green, "no session stays on the rejected colour");
    assert_eq!(old.get().await, Colour::Green);
    proxy.shutdown();
}

/// Without affinity nothing changes: no cookie is set, a cookie is not looked at.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_affinity_no_cookie() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let proxy = start_proxy(test_config(), table(&[&blue], &[&green]));
    let mut s = Session::new(&proxy).await;
    assert_eq!(s.get().await, Colour::Blue);
    assert_eq!(s.minted, 0);
    proxy
        .switch_pinned("web", Colour::Green, Some(Duration::from_secs(60)))
        .unwrap();
    assert!(proxy.table().service("web").unwrap().pin().is_none());
    assert_eq!(s.get().await, Colour::Green);
    proxy.shutdown();
}

/// With `app_cookie`: a client that keeps only the application's session cookie (not cutover's)
/// stays on the colour whose response set it while that colour is pinned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_application_session_cookie_is_followed_too() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let t = table(&[&blue], &[&green])
        .with_service("web", |s| {
            let a = Affinity::new("cutover_session", Duration::from_secs(900), KEY)
                .unwrap()
                .with_app_cookie("app_session")
                .unwrap();
            s.affinity = Some(Arc::new(a));
            Ok(())
        })
        .unwrap();
    let proxy = start_proxy(test_config(), t);
    let mut c = H1::connect(proxy.local_addrs()[0]).await.unwrap();
    let get = |path: &str, cookie: Option<&str>| {
        let mut req = Request::get(path).header("host", "web.test");
        if let Some(cookie) = cookie {
            req = req.header("cookie", cookie);
        }
        req.body(empty()).unwrap()
    };
    // Blue's application sets its session cookie (app_session=s1).
    let (_, headers, body) = c.request(get("/app-cookies", None)).await.unwrap();
    assert_eq!(colour_of(&body), Some(Colour::Blue));
    assert!(headers
        .get_all("set-cookie")
        .iter()
        .any(|v| v.as_bytes().starts_with(b"app_session=s1")));

    proxy
        .switch_pinned("web", Colour::Green, Some(Duration::from_secs(60)))
        .unwrap();
    for _ in 0..3 {
        let (_, _, body) = c.request(get("/", Some("app_session=s1"))).await.unwrap();
        assert_eq!(
            colour_of(&body),
            Some(Colour::Blue),
            "the session blue began stays there"
        );
    }
    let (_, _, body) = c.request(get("/", Some("app_session=s2"))).await.unwrap();
    assert_eq!(
        colour_of(&body),
        Some(Colour::Green),
        "a session first seen now goes live"
    );
    let (_, _, body) = c.request(get("/", Some("app_session=s2"))).await.unwrap();
    assert_eq!(colour_of(&body), Some(Colour::Green));
    let a = proxy.table().service("web").unwrap().affinity.clone().unwrap();
    assert_eq!(a.app_sessions().unwrap().len(), 2);
    assert_eq!(a.snapshot().pinned, [3, 0]);

    proxy.unpin("web", Colour::Blue).unwrap();
    let (_, _, body) = c.request(get("/", Some("app_session=s1"))).await.unwrap();
    assert_eq!(colour_of(&body), Some(Colour::Green), "the pin is over");
    proxy.shutdown();
}

/// A gradual switch with affinity moves new sessions, not requests: each session keeps the
/// colour its first answer gave it through every step; at the end, the sessions left on blue
/// stay pinned there while new ones go green.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gradual_switch_moves_a_share_of_new_sessions_and_each_keeps_its_colour() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let proxy = start_proxy(test_config(), sticky_table(&blue, &green));
    let mut sessions = Vec::new();
    // 10 %: 300 new sessions, about 30 of them green (5 standard deviations: 6 to 54).
    proxy.split("web", Colour::Green, 100_000).unwrap();
    for _ in 0..300 {
        let mut s = Session::new(&proxy).await;
        let first = s.get().await;
        sessions.push((s, first));
    }
    let green_first = sessions.iter().filter(|(_, c)| *c == Colour::Green).count();
    assert!(
        (6..=54).contains(&green_first),
        "{green_first} of 300 new sessions on green at 10%"
    );
    // 50 %: the sessions keep their colour, every request; new ones split about evenly.
    proxy.split("web", Colour::Green, 500_000).unwrap();
    for (s, first) in sessions.iter_mut() {
        for _ in 0..3 {
            assert_eq!(s.get().await, *first, "a session changed colour at a step");
        }
        assert_eq!(s.minted, 1);
    }
    let mut later = 0;
    for _ in 0..200 {
        let mut s = Session::new(&proxy).await;
        if s.get().await == Colour::Green {
            later += 1;
        }
        sessions.push((s, Colour::Blue));
    }
    assert!(
        (65..=135).contains(&later),
        "{later} of 200 new sessions on green at 50%"
    );
    // 100 %: the switch; blue's sessions pinned there, new ones green.
    assert!(proxy
        .switch_pinned("web", Colour::Green, Some(Duration::from_secs(60)))
        .unwrap());
    assert_eq!(proxy.table().service("web").unwrap().split(), None);
    for (s, first) in sessions.iter_mut().take(300) {
        assert_eq!(s.get().await, *first);
    }
    for _ in 0..20 {
        assert_eq!(Session::new(&proxy).await.get().await, Colour::Green);
    }
    proxy.shutdown();
}

/// A gradual switch rolled back: every session goes back to blue at once, the green ones too
/// (their colour no longer takes live traffic).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gradual_switch_rolled_back_sends_every_session_to_the_live_colour() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let proxy = start_proxy(test_config(), sticky_table(&blue, &green));
    proxy.split("web", Colour::Green, 1_000_000).unwrap();
    let mut s = Session::new(&proxy).await;
    assert_eq!(s.get().await, Colour::Green, "all new sessions at 100% of a split");
    assert!(
        !proxy.switch("web", Colour::Blue).unwrap(),
        "blue was live all along: nothing switched, the split ends"
    );
    assert_eq!(proxy.table().service("web").unwrap().split(), None);
    assert_eq!(s.get().await, Colour::Blue);
    // A share for the live colour itself is refused, changing nothing.
    let e = proxy.split("web", Colour::Blue, 100_000).unwrap_err();
    assert!(e.to_string().contains("blue is live already"), "{e}");
    assert_eq!(proxy.table().service("web").unwrap().split(), None);
    proxy.shutdown();
}
