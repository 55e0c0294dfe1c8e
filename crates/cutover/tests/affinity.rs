//! Sticky sessions across a switch, through the real daemon, with curl and its cookie jars as
//! the clients: sessions that began on blue stay there after a promotion until the window ends,
//! new sessions go to green, then blue is drained; cookies cutover did not sign are ignored; a
//! rollback leaves no session on the rejected colour.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::site::*;
use common::wait_until;

/// One client session: curl with its own cookie jar.
struct Session {
    jar: PathBuf,
}

impl Session {
    fn new(site: &Site, name: &str) -> Session {
        Session {
            jar: site.dir.path().join(format!("{name}.jar")),
        }
    }

    /// `GET /` with the jar's cookies; the jar keeps what the answer sets. The body, trimmed.
    fn get(&self, site: &Site) -> String {
        curl(site, &["-b", path(&self.jar), "-c", path(&self.jar)])
    }

    fn cookie(&self) -> Option<String> {
        let jar = std::fs::read_to_string(&self.jar).ok()?;
        jar.lines()
            .map(|l| l.split('\t').collect::<Vec<_>>())
            .find(|f| f.len() == 7 && f[5] == "cutover_session")
            .map(|f| f[6].to_string())
    }
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// One bounded curl request to `/`; the answer's body, trimmed.
fn curl(site: &Site, args: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5"])
        .args(args)
        .arg(format!("http://{}/", site.front))
        .output()
        .expect("curl runs");
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn scrape(site: &Site) -> String {
    let socket = site.dir.path().join("state").join("admin.sock");
    let mut s = UnixStream::connect(&socket).expect("admin socket");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn sample(metrics: &str, line: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(line).and_then(|v| v.strip_prefix(' ')))
        .map_or(0, |v| v.trim().parse::<f64>().unwrap() as u64)
}

#[test]
fn sessions_stay_on_the_old_colour_for_the_window_then_it_drains() {
    let window = Duration::from_secs(5);
    let mut site = Site::with(
        "",
        "watch = { duration = \"300ms\", min_requests = 1 }\ndrain_timeout = \"500ms\"\nclose_window = \"500ms\"\n\
         affinity = { cookie = \"cutover_session\", window = \"5s\" }\n",
    );
    site.start();
    site.deploy("v1");

    let old: Vec<Session> = (0..3).map(|i| Session::new(&site, &format!("old{i}"))).collect();
    for s in &old {
        assert_eq!(s.get(&site), "v1 blue");
        let cookie = s.cookie().expect("the first answer sets the cookie");
        assert!(cookie.starts_with("b."), "{cookie}");
        assert_eq!(s.get(&site), "v1 blue");
    }
    let blue_cookie = old[0].cookie().unwrap();

    let before = Instant::now();
    site.deploy("v2"); // returns once v2 is live on green and its watch passed
    let deployed = Instant::now();
    assert!(
        deployed - before < window,
        "the deploy took longer than the window; nothing left to check"
    );

    // Within the window: old sessions on blue, new ones on green.
    let mut pinned = 0;
    for s in &old {
        let got = s.get(&site);
        if deployed.elapsed() < window - Duration::from_millis(500) {
            assert_eq!(got, "v1 blue", "a session begun on blue stays there");
            pinned += 1;
        }
    }
    assert!(pinned > 0, "no request was sent within the window");
    let new = Session::new(&site, "new");
    assert_eq!(new.get(&site), "v2 green");
    assert!(new.cookie().unwrap().starts_with("g."));
    assert_eq!(new.get(&site), "v2 green");
    // Forged: blue's real cookie with its tag altered; one made up; one recoloured.
    let (head, tag) = blue_cookie.rsplit_once('.').unwrap();
    let altered = format!("{head}.{}{}", if tag.starts_with('A') { 'B' } else { 'A' }, &tag[1..]);
    let made_up = format!("b.{}.{}", head.split('.').nth(1).unwrap(), "x".repeat(43));
    let recoloured = blue_cookie.replacen("b.", "g.", 1);
    for forged in [&altered, &made_up, &recoloured] {
        assert_eq!(
            curl(&site, &["-b", &format!("cutover_session={forged}")]),
            "v2 green",
            "{forged}"
        );
    }
    let logs = site.logs();
    assert!(
        !logs.contains("blue drained"),
        "blue is not drained while pinned: {logs}"
    );
    let metrics = scrape(&site);
    assert!(
        sample(
            &metrics,
            "cutover_affinity_pinned_requests_total{service=\"web\",colour=\"blue\"}"
        ) >= pinned,
        "{metrics}"
    );
    assert!(
        sample(
            &metrics,
            "cutover_affinity_cookies_ignored_total{service=\"web\",reason=\"invalid\"}"
        ) >= 3,
        "{metrics}"
    );

    // The window ends: the old sessions go to green (their cookies are refused as no longer
    // pinned or expired) and blue is drained, its instances still warm.
    assert!(
        wait_until(Duration::from_secs(15), || site.logs().contains("blue drained")),
        "blue is drained at the window's end: {}",
        site.logs()
    );
    assert!(deployed.elapsed() >= window - Duration::from_secs(1));
    for s in &old {
        assert_eq!(s.get(&site), "v2 green", "the window is over");
        assert!(s.cookie().unwrap().starts_with("g."));
    }
    assert_eq!(site.instance_pids().len(), 4, "blue stays warm for keep_warm");

    // A rollback leaves nobody on the rejected colour: v3 on blue, a session begun there, back
    // to green. `new` has been idle longer than the window: its next request renews its cookie.
    assert_eq!(new.get(&site), "v2 green");
    site.deploy("v3");
    let on_v3 = Session::new(&site, "v3");
    assert_eq!(on_v3.get(&site), "v3 blue");
    assert_eq!(new.get(&site), "v2 green", "green's sessions are pinned after v3");
    let out = site.cli(&["rollback", "web"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(on_v3.get(&site), "v2 green", "no session stays on the rejected colour");
    assert_eq!(new.get(&site), "v2 green");
    assert_eq!(Session::new(&site, "after").get(&site), "v2 green");
}
