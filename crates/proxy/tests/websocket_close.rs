//! WebSockets the proxy closes at a drain deadline, behind a real WebSocket server that waits for
//! the closing handshake: aiohttp (`websocket_close/aiohttp_server.py`, run with `python3`; the
//! test fails, not skips, without it: `./scripts/test.sh` installs it).
//!
//! aiohttp answers a Close and then closes the connection itself, as RFC 6455 asks of a server;
//! a client (here the proxy, in the client's place) that sends its FIN along with its Close makes
//! aiohttp fail its answer and report the socket as closed abnormally (1006).

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cutover_proxy::{Colour, Instance, Pool, RouteTable, Service};
use futures_util::{SinkExt, StreamExt};
use support::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

const SOCKETS: usize = 100;
const MESSAGE: usize = 1 << 20;

/// The aiohttp server, a child process killed when this is dropped.
struct AiohttpServer {
    addr: SocketAddr,
    /// Its stdout: a "report" line per WebSocket that ended.
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    _child: tokio::process::Child,
}

impl AiohttpServer {
    async fn start() -> AiohttpServer {
        let has_aiohttp = std::process::Command::new("python3")
            .args(["-c", "import aiohttp"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            has_aiohttp,
            "python3 with aiohttp is missing: `python3 -m pip install aiohttp` (./scripts/test.sh does)"
        );
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/websocket_close/aiohttp_server.py");
        let mut child = tokio::process::Command::new("python3")
            .arg(script)
            // The server exits when this pipe closes, should the test die without dropping it.
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 starts");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("the aiohttp server listens within 20 s")
            .unwrap()
            .expect("the aiohttp server prints its port (its errors are above)");
        let port: u16 = first
            .strip_prefix("listening ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line from the aiohttp server: {first:?}"));
        AiohttpServer {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            lines,
            _child: child,
        }
    }

    /// A table with this server as blue and `green` as green.
    fn table(&self, green: &Upstream) -> RouteTable {
        let mut s = Service::new("web");
        s.blue = Pool::new(Some("v1"), vec![Instance::new(self.addr)]);
        s.green = Pool::new(Some("v2"), vec![Instance::new(green.addr)]);
        RouteTable::new(vec![s]).unwrap()
    }

    /// The next `n` reports, by connection id, each a map of its fields; within `within`.
    async fn reports(&mut self, n: usize, within: Duration) -> HashMap<usize, HashMap<String, String>> {
        let mut reports = HashMap::new();
        let read = async {
            while reports.len() < n {
                let line = self.lines.next_line().await.unwrap().expect("the aiohttp server runs");
                let Some(fields) = line.strip_prefix("report ") else {
                    continue;
                };
                let fields: HashMap<String, String> = fields
                    .split_whitespace()
                    .filter_map(|f| f.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                let id = fields["id"].parse().expect("a numeric id");
                assert!(reports.insert(id, fields).is_none(), "one report per connection");
            }
        };
        let got = tokio::time::timeout(within, read).await;
        assert!(
            got.is_ok(),
            "{} of {n} reports from the aiohttp server within {within:?}",
            reports.len()
        );
        reports
    }
}

/// Message `seq` of connection `id`: its id and number, then a byte that depends on both.
fn message(id: usize, seq: u64) -> Vec<u8> {
    let mut m = vec![(id as u64 * 31 + seq) as u8; MESSAGE];
    m[..8].copy_from_slice(&(id as u64).to_be_bytes());
    m[8..16].copy_from_slice(&seq.to_be_bytes());
    m
}

/// How a client's WebSocket went.
#[derive(Debug)]
struct ClientEnd {
    /// Echoes received, each the whole message last sent.
    echoed: u64,
    /// The status of the Close frame received (0: none in it); `None`: no Close frame.
    close: Option<u16>,
    /// The stream ended cleanly after the Close (the client's answer came within the grace).
    clean_end: bool,
    /// What came instead of an echo or a Close, or after the Close instead of the end.
    fault: Option<String>,
}

/// Sends 1 MB messages one after the other, each once the last one's echo is back, until a
/// Close comes; then polls on until the end of the stream (the client answers the Close).
/// `flowing` counts the sockets that had an echo back.
async fn client(addr: SocketAddr, id: usize, flowing: Arc<AtomicUsize>) -> ClientEnd {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async(format!("ws://{addr}/ws?id={id}"), stream)
        .await
        .expect("websocket handshake");
    assert_eq!(resp.status(), 101);
    let mut end = ClientEnd {
        echoed: 0,
        close: None,
        clean_end: false,
        fault: None,
    };
    for seq in 0.. {
        let sent = message(id, seq);
        // A send can fail only once the proxy has closed; what comes next says how.
        let _ = ws.send(Message::binary(sent.clone())).await;
        let next = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
        match next {
            Ok(Some(Ok(Message::Binary(b)))) if b[..] == sent[..] => {
                end.echoed += 1;
                if end.echoed == 1 {
                    flowing.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(Some(Ok(Message::Close(c)))) => {
                end.close = Some(c.map_or(0, |f| u16::from(f.code)));
                // Polled on, the client answers the Close and then sees the end of the stream,
                // unless it answers too late: the proxy closes the connection when the grace is
                // over, and a client that took that long to read the Close (a loaded machine
                // can make it) gets a reset. Nothing else may come.
                let after = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
                match after {
                    Ok(None) => end.clean_end = true,
                    Ok(Some(Err(WsError::Io(_)))) => {}
                    _ => end.fault = Some(format!("after the Close: {after:?}")),
                }
                return end;
            }
            Ok(Some(Ok(Message::Binary(b)))) => {
                let (got_id, got_seq) = (&b[..8.min(b.len())], &b[8..16.min(b.len())]);
                end.fault = Some(format!(
                    "message {seq}: got {} bytes, id {got_id:?}, number {got_seq:?}",
                    b.len()
                ));
                return end;
            }
            other => {
                end.fault = Some(format!("message {seq}: {other:?}"));
                return end;
            }
        }
    }
    unreachable!("the loop returns")
}

/// A hundred WebSockets through the proxy to an aiohttp server, each with 1 MB messages going
/// both ways (each echoed), closed at instants spread over a second after a drain deadline. The
/// server sees every one closed cleanly with 1001 and no write of its own failing; every client
/// gets every echo the server sent before its Close, whole, then a Close 1001, then nothing but
/// the end of the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aiohttp_server_sees_every_websocket_closed_cleanly_with_1001() {
    let mut server = AiohttpServer::start().await;
    let green = Upstream::start("green").await;
    let proxy = start_proxy(test_config(), server.table(&green));
    let addr = proxy.local_addrs()[0];
    let flowing = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..SOCKETS)
        .map(|id| tokio::spawn(client(addr, id, flowing.clone())))
        .collect();
    assert!(
        eventually(Duration::from_secs(30), || flowing.load(Ordering::Relaxed) == SOCKETS).await,
        "{} of {SOCKETS} sockets had an echo back within 30 s",
        flowing.load(Ordering::Relaxed)
    );

    proxy.switch("web", Colour::Green).unwrap();
    let report = tokio::time::timeout(
        Duration::from_secs(10),
        proxy.drain("web", Colour::Blue, Duration::from_millis(200), Duration::from_secs(1)),
    )
    .await
    .expect("the drain ends within 10 s")
    .unwrap();
    assert_eq!(report.closed_upgrades, SOCKETS, "every socket was open at the deadline");

    let mut ends = Vec::new();
    for c in clients {
        let end = tokio::time::timeout(Duration::from_secs(20), c).await;
        ends.push(end.expect("every client ends within 20 s").unwrap());
    }
    let reports = server.reports(SOCKETS, Duration::from_secs(10)).await;

    // Everything that went wrong, counted, so that a failure says how it failed.
    let mut server_codes: HashMap<String, usize> = HashMap::new();
    let mut client_codes: HashMap<Option<u16>, usize> = HashMap::new();
    let (mut write_errors, mut exceptions, mut missing_echoes, mut faults) = (0, 0, 0, Vec::new());
    let (mut echoes, mut clean_ends) = (0, 0);
    for (id, end) in ends.iter().enumerate() {
        let r = &reports[&id];
        *server_codes.entry(r["close_code"].clone()).or_default() += 1;
        *client_codes.entry(end.close).or_default() += 1;
        write_errors += usize::from(r["write_errors"] != "0");
        exceptions += usize::from(r["exception"] != "None");
        let server_echoed: u64 = r["echoed"].parse().unwrap();
        missing_echoes += usize::from(server_echoed != end.echoed);
        if let Some(f) = &end.fault {
            faults.push(format!("socket {id}: {f}"));
        }
        echoes += end.echoed;
        clean_ends += usize::from(end.clean_end);
    }
    let summary = format!(
        "close codes the server saw {server_codes:?}; clients' {client_codes:?}; \
         sockets with failed writes on the server {write_errors}, ended with an exception {exceptions}, \
         echoes missing at the client {missing_echoes}; faults at the clients {faults:?}"
    );
    eprintln!(
        "{SOCKETS} sockets, {echoes} messages of 1 MB echoed, {clean_ends} clients' answers to the Close \
         in time; {summary}"
    );
    assert_eq!(server_codes.get("1001"), Some(&SOCKETS), "{summary}");
    assert_eq!(client_codes.get(&Some(1001)), Some(&SOCKETS), "{summary}");
    assert_eq!((write_errors, exceptions, missing_echoes), (0, 0, 0), "{summary}");
    assert!(faults.is_empty(), "{summary}");
}
