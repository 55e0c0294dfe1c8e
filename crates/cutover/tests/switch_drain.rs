//! What a switch does to the users still on the old colour, through the real daemon, with the
//! default `keep_warm` (1 h): the old colour is drained at the switch (its WebSockets and event
//! streams end by `drain_timeout` + `close_window`, spread over the window), while its instances
//! stay warm for an instant rollback.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

mod common;
use common::site::*;

/// A WebSocket to `/ws`, checked to echo from `expect`.
async fn websocket(front: std::net::SocketAddr, expect: &str) -> tokio_tungstenite::WebSocketStream<TcpStream> {
    let stream = TcpStream::connect(front).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{front}/ws"), stream)
        .await
        .expect("handshake");
    ws.send(Message::text("hello")).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => assert_eq!(t.as_str(), format!("{expect}: hello")),
        other => panic!("no echo: {other:?}"),
    }
    ws
}

/// An event stream from `/sse`, its first event read and checked to come from `expect`.
async fn event_stream(front: std::net::SocketAddr, expect: &str) -> TcpStream {
    let mut s = TcpStream::connect(front).await.unwrap();
    s.write_all(b"GET /sse HTTP/1.1\r\nHost: test\r\n\r\n").await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains(&format!("data: {expect} 0")) {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("first event in time")
            .unwrap();
        assert!(n > 0, "stream ended early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    s
}

/// With the default keep_warm, a promotion drains blue at once: every WebSocket on blue gets
/// Close 1001 and every event stream on blue ends, all by drain_timeout + close_window (+ the
/// closing grace), spread over at least half the window; blue's instances keep running, and an
/// instant rollback serves from them at once.
#[test]
fn a_switch_drains_the_old_colour_at_once_and_keeps_it_warm() {
    let (drain, window) = (Duration::from_millis(500), Duration::from_secs(2));
    let mut site = Site::with(
        "",
        "drain_timeout = \"500ms\"\nclose_window = \"2s\"\nwatch = { duration = \"300ms\", min_requests = 1 }\n",
    );
    site.start();
    site.deploy("v1");
    let blue = site.instance_pids();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let front = site.front;
    let (sockets, streams) = rt.block_on(async {
        let mut sockets = Vec::new();
        let mut streams = Vec::new();
        for _ in 0..10 {
            sockets.push(websocket(front, "v1 blue").await);
            streams.push(event_stream(front, "v1 blue").await);
        }
        (sockets, streams)
    });

    // Started now; `deploy` returns once v2 is live (the switch happened inside it).
    let start = Instant::now();
    let ends = rt.block_on(async {
        let mut ends = Vec::new();
        for mut ws in sockets {
            ends.push(tokio::spawn(async move {
                let code = tokio::time::timeout(Duration::from_secs(30), async {
                    loop {
                        match ws.next().await {
                            Some(Ok(Message::Close(f))) => return f.map(|f| u16::from(f.code)),
                            Some(Ok(_)) => {}
                            None | Some(Err(_)) => return None,
                        }
                    }
                })
                .await
                .expect("the WebSocket ends");
                ("ws", code, start.elapsed())
            }));
        }
        for mut s in streams {
            ends.push(tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                tokio::time::timeout(Duration::from_secs(30), async {
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                    }
                })
                .await
                .expect("the event stream ends");
                ("sse", None, start.elapsed())
            }));
        }
        ends
    });
    site.deploy("v2");
    let switched = start.elapsed();
    let mut at = Vec::new();
    let mut codes = Vec::new();
    for e in ends {
        let (kind, code, when) = rt.block_on(e).unwrap();
        if kind == "ws" {
            codes.push(code);
        }
        at.push(when);
    }
    at.sort();
    assert!(
        codes.iter().all(|c| *c == Some(1001)),
        "every WebSocket got 1001: {codes:?}"
    );
    let (first, last) = (at[0], at[at.len() - 1]);
    // From the switch: the drain's deadline, then the window, then up to a second of grace.
    let bound = switched + drain + window + Duration::from_millis(1500);
    assert!(
        last <= bound,
        "all ended by drain_timeout + close_window after the switch: {at:?} (switched at {switched:?})"
    );
    // Twenty instants over 2 s all within 1 s of each other: odds of about 2e-5.
    assert!(
        last - first >= window / 2,
        "ends spread over at least half the window: {at:?}"
    );

    assert_eq!(site.instance_pids().len(), 4, "green runs and blue stays warm");
    assert!(
        blue.iter().all(|p| site.instance_pids().contains(p)),
        "blue's instances run on"
    );
    let out = site.cli(&["rollback", "web"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("rolled back instantly"), "{}", text(&out));
    let answer = rt.block_on(async {
        let mut s = TcpStream::connect(front).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    });
    assert!(
        answer.ends_with("v1 blue\n"),
        "the rollback serves from warm blue at once: {answer}"
    );
}
