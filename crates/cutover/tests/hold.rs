//! Holding a service's live traffic through the real daemon: `cutover pause` (requests wait,
//! then complete after `cutover resume`, or get 503 past `--max`) and `cutover maintenance` (503
//! with the message and Retry-After, kept across a restart, the preview route still open).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

mod common;
use common::site::*;

/// One GET / with `Connection: close` (and `extra` header lines); the whole answer.
fn get(front: SocketAddr, extra: &str) -> String {
    let mut s = TcpStream::connect(front).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET / HTTP/1.1\r\nHost: test\r\n{extra}Connection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn status_text(site: &Site) -> String {
    text(&site.cli(&["status"]))
}

#[test]
fn a_pause_holds_requests_until_resume_and_refuses_them_past_its_limit() {
    let mut site = Site::new("");
    site.start();
    site.deploy("v1");
    let front = site.front;

    let out = site.cli(&["pause", "web", "--max", "10s"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        status_text(&site).contains("live traffic held: paused"),
        "{}",
        status_text(&site)
    );
    let held: Vec<_> = (0..5)
        .map(|_| {
            std::thread::spawn(move || {
                let t = Instant::now();
                (get(front, ""), t.elapsed())
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(700));
    assert!(held.iter().all(|h| !h.is_finished()), "the requests wait while paused");
    let resumed_at = Instant::now();
    let out = site.cli(&["resume", "web"]);
    assert!(out.status.success(), "{}", text(&out));
    for h in held {
        let (answer, took) = h.join().unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("v1 blue\n"), "{answer}");
        assert!(took >= Duration::from_millis(700), "held until the resume: {took:?}");
    }
    assert!(
        resumed_at.elapsed() < Duration::from_secs(5),
        "answered as soon as resumed"
    );

    // Past its limit, a held request is refused, and says when to try again.
    let out = site.cli(&["pause", "web", "--max", "400ms"]);
    assert!(out.status.success(), "{}", text(&out));
    let t = Instant::now();
    let answer = get(front, "");
    let took = t.elapsed();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("retry-after: 1"), "{answer}");
    assert!(answer.contains("service web is paused"), "{answer}");
    assert!(
        took >= Duration::from_millis(350) && took < Duration::from_secs(5),
        "{took:?}"
    );
    // The preview route is not held.
    let token = std::fs::read_to_string(site.dir.path().join("state").join("preview.token")).unwrap();
    let preview = get(front, &format!("X-Cutover-Preview: {}\r\n", token.trim()));
    assert!(
        preview.starts_with("HTTP/1.1 503") && preview.contains("no live instance"),
        "the idle colour has nothing, but is reached at once: {preview}"
    );
    assert!(site.cli(&["resume", "web"]).status.success());
    assert!(get(front, "").ends_with("v1 blue\n"));
}

#[test]
fn maintenance_answers_503_with_the_message_survives_a_restart_and_leaves_preview_open() {
    let mut site = Site::new("");
    site.start();
    site.deploy("v1");
    site.deploy("v2");
    let front = site.front;
    let out = site.cli(&["maintenance", "web", "--message", "Back at 14:00 <UTC>"]);
    assert!(out.status.success(), "{}", text(&out));
    let answer = get(front, "");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    let lower = answer.to_ascii_lowercase();
    assert!(lower.contains("retry-after: 60"), "{answer}");
    assert!(lower.contains("content-type: text/html"), "{answer}");
    assert!(
        answer.contains("Back at 14:00 &lt;UTC&gt;"),
        "the message, escaped: {answer}"
    );
    assert!(
        status_text(&site).contains("maintenance: Back at 14:00 <UTC>"),
        "{}",
        status_text(&site)
    );
    // The preview route reaches the idle colour (blue, v1 stays warm) through the maintenance.
    let token = std::fs::read_to_string(site.dir.path().join("state").join("preview.token")).unwrap();
    let preview = get(front, &format!("X-Cutover-Preview: {}\r\n", token.trim()));
    assert!(preview.ends_with("v1 blue\n"), "{preview}");

    // A restart keeps the maintenance from its first request on.
    site.stop();
    site.start();
    assert!(
        get(front, "").starts_with("HTTP/1.1 503"),
        "still in maintenance after a restart"
    );
    assert!(site.cli(&["resume", "web"]).status.success());
    assert!(get(front, "").ends_with("v2 green\n"));
    site.stop();
    site.start();
    assert!(get(front, "").ends_with("v2 green\n"), "the resume is kept too");

    // Bad input changes nothing.
    let out = site.cli(&["maintenance", "web", "--message", "   "]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("maintenance message"), "{}", text(&out));
    let out = site.cli(&["pause", "nope"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(get(front, "").ends_with("v2 green\n"));
}
