//! The TLS handshake load of `bench/tls.sh`: a closed loop of `--connections` clients, each
//! opening a new TLS connection, sending one HTTP/1.1 `GET` with `Connection: close`, reading the
//! response, waiting for the server to close, and starting over, until `--duration` is up.
//!
//! Why not h2load or `openssl s_time`: with the OpenSSL 3.0 of the bench machine a client spends
//! several times the CPU of the server on a full handshake, so one client CPU cannot keep one
//! server CPU busy, and every server would show the client's rate. rustls' client costs about
//! what the server does.
//!
//! TLS 1.3 only, with one cipher suite (TLS_AES_128_GCM_SHA256) and one key exchange group
//! (X25519), so that every server negotiates the same. Like h2load and wrk, the client does not
//! check the certificate chain; it does check the server's handshake signature (CertificateVerify)
//! with the certificate's key, the part of the client's work a full handshake always costs.
//! Without `--resume` no session is ever offered: every handshake is a full one. With it, each
//! connection offers a ticket from the same client's previous connection (TLS 1.3 PSK with an
//! X25519 exchange), and the JSON line says how many handshakes the server resumed.
//!
//! One thread (pin it with taskset). Prints one JSON line: completed connections, seconds,
//! rate, resumed handshakes, errors by kind, latency percentiles (connect to the end of the
//! response) and what was negotiated.
//!
//! ```text
//! cargo build --release --locked -p cutover --example tls-load
//! target/release/examples/tls-load --addr 127.0.0.1:8443 --connections 32 --duration 8 [--resume]
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, HandshakeKind, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Any certificate is taken; the handshake signatures are checked with its key.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

struct Args {
    addr: SocketAddr,
    connections: usize,
    duration: Duration,
    resume: bool,
    sni: String,
}

fn usage(msg: &str) -> ! {
    eprintln!("tls-load: {msg}\nusage: tls-load --addr IP:PORT [--connections N] [--duration SECONDS] [--resume] [--sni NAME]");
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut args = Args {
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        connections: 32,
        duration: Duration::from_secs(8),
        resume: false,
        sni: "localhost".to_string(),
    };
    let mut addr = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().unwrap_or_else(|| usage(&format!("{name} needs a value")));
        match a.as_str() {
            "--addr" => {
                addr = Some(
                    value("--addr")
                        .parse()
                        .unwrap_or_else(|_| usage("--addr takes IP:PORT")),
                )
            }
            "--connections" => {
                args.connections = value("--connections")
                    .parse()
                    .ok()
                    .filter(|n| (1..=10_000).contains(n))
                    .unwrap_or_else(|| usage("--connections takes 1..10000"))
            }
            "--duration" => {
                let s: f64 = value("--duration")
                    .parse()
                    .ok()
                    .filter(|s| *s > 0.0 && *s <= 600.0)
                    .unwrap_or_else(|| usage("--duration takes seconds, above 0 and at most 600"));
                args.duration = Duration::from_secs_f64(s);
            }
            "--resume" => args.resume = true,
            "--sni" => args.sni = value("--sni"),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    args.addr = addr.unwrap_or_else(|| usage("--addr is required"));
    args
}

#[derive(Default)]
struct Tally {
    done: u64,
    resumed: u64,
    err_connect: u64,
    err_tls: u64,
    err_http: u64,
    err_timeout: u64,
    /// Microseconds from the connect to the end of the response, per completed connection.
    latencies: Vec<u32>,
    negotiated: Option<(String, String, String, String)>,
}

enum Failure {
    Connect,
    Tls,
    Http,
}

/// Time one connection may take, from its connect to the server's close.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);
/// After a complete response, how long the server has to close before the client does.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// One connection: its handshake, one request, its response; then waits (bounded) for the
/// server to close, so that the server's side, not the client's, holds the closed connection's
/// TIME_WAIT. Returns whether the handshake was a resumption and the time to the response's end.
async fn one(
    connector: &TlsConnector,
    addr: SocketAddr,
    name: &ServerName<'static>,
    request: &[u8],
    tally: &mut Tally,
) -> Result<(bool, Duration), Failure> {
    let start = Instant::now();
    let tcp = TcpStream::connect(addr).await.map_err(|_| Failure::Connect)?;
    let _ = tcp.set_nodelay(true);
    let mut tls = connector.connect(name.clone(), tcp).await.map_err(|_| Failure::Tls)?;
    let conn = tls.get_ref().1;
    let resumed = conn.handshake_kind() == Some(HandshakeKind::Resumed);
    if tally.negotiated.is_none() {
        tally.negotiated = Some((
            conn.protocol_version().map_or("?".into(), |v| format!("{v:?}")),
            conn.negotiated_cipher_suite()
                .map_or("?".into(), |s| format!("{:?}", s.suite())),
            conn.negotiated_key_exchange_group()
                .map_or("?".into(), |g| format!("{:?}", g.name())),
            conn.alpn_protocol()
                .map_or("none".into(), |p| String::from_utf8_lossy(p).into_owned()),
        ));
    }
    tls.write_all(request).await.map_err(|_| Failure::Http)?;
    tls.flush().await.map_err(|_| Failure::Http)?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let complete = loop {
        // An error counts as the end: a server may close without close_notify after a complete
        // response.
        let n = tls.read(&mut chunk).await.unwrap_or_default();
        buf.extend_from_slice(&chunk[..n]);
        if response_end(&buf).is_some_and(|end| end <= buf.len()) {
            break true;
        }
        if n == 0 || buf.len() > 64 * 1024 {
            break false;
        }
    };
    if !complete || !buf.starts_with(b"HTTP/1.1 200 ") {
        return Err(Failure::Http);
    }
    let elapsed = start.elapsed();
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        while let Ok(n) = tls.read(&mut chunk).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    Ok((resumed, elapsed))
}

/// Where the response in `buf` ends (head and `content-length` body), once its head is in.
fn response_end(buf: &[u8]) -> Option<usize> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buf[..head_end]).ok()?;
    let length = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<usize>().ok())?
    })?;
    Some(head_end + length)
}

async fn client(connector: TlsConnector, args: Arc<Args>, deadline: Instant) -> Tally {
    let name = ServerName::try_from(args.sni.clone()).unwrap_or_else(|_| usage("--sni is not a valid name"));
    let request = format!("GET / HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", args.sni);
    let mut tally = Tally::default();
    while Instant::now() < deadline {
        match tokio::time::timeout(
            CONNECTION_TIMEOUT,
            one(&connector, args.addr, &name, request.as_bytes(), &mut tally),
        )
        .await
        {
            Ok(Ok((resumed, elapsed))) => {
                tally.done += 1;
                tally.resumed += u64::from(resumed);
                tally.latencies.push(elapsed.as_micros().min(u32::MAX as u128) as u32);
            }
            Ok(Err(Failure::Connect)) => tally.err_connect += 1,
            Ok(Err(Failure::Tls)) => tally.err_tls += 1,
            Ok(Err(Failure::Http)) => tally.err_http += 1,
            Err(_) => tally.err_timeout += 1,
        }
        if tally.err_connect + tally.err_tls + tally.err_http + tally.err_timeout > 0 {
            // A failing server is not hammered in a tight loop.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    tally
}

fn percentile(sorted: &[u32], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(f64::from(sorted[i.clamp(1, sorted.len()) - 1]) / 1000.0)
}

/// A client's TLS settings. With resumption each client keeps its own tickets, so that every
/// connection offers one from the client's previous connection (a shared store holds only a few
/// tickets per server name, which the clients would take from each other).
fn connector(provider: &Arc<CryptoProvider>, resume: bool) -> TlsConnector {
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3 with the ring provider")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider.clone())))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.resumption = if resume {
        Resumption::in_memory_sessions(16)
    } else {
        Resumption::disabled()
    };
    TlsConnector::from(Arc::new(config))
}

fn main() {
    let args = Arc::new(parse_args());
    #[allow(deprecated)]
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256];
    provider.kx_groups = vec![rustls::crypto::ring::kx_group::X25519];
    let provider = Arc::new(provider);
    let shared = connector(&provider, false);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let start = Instant::now();
    let deadline = start + args.duration;
    let tallies = rt.block_on(async {
        let tasks: Vec<_> = (0..args.connections)
            .map(|_| {
                let c = if args.resume {
                    connector(&provider, true)
                } else {
                    shared.clone()
                };
                tokio::spawn(client(c, args.clone(), deadline))
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("a client task"));
        }
        out
    });
    let seconds = start.elapsed().as_secs_f64();
    let mut all = Tally::default();
    for t in tallies {
        all.done += t.done;
        all.resumed += t.resumed;
        all.err_connect += t.err_connect;
        all.err_tls += t.err_tls;
        all.err_http += t.err_http;
        all.err_timeout += t.err_timeout;
        all.latencies.extend(t.latencies);
        all.negotiated = all.negotiated.or(t.negotiated);
    }
    all.latencies.sort_unstable();
    let (protocol, cipher, group, alpn) = all.negotiated.unwrap_or_default();
    let num = |x: Option<f64>| x.map_or("null".to_string(), |v| format!("{v:.3}"));
    println!(
        "{{\"ok\": {}, \"connections\": {}, \"seconds\": {:.3}, \"rate\": {:.1}, \"resumed\": {}, \
         \"err_connect\": {}, \"err_tls\": {}, \"err_http\": {}, \"err_timeout\": {}, \
         \"p50_ms\": {}, \"p90_ms\": {}, \"p99_ms\": {}, \"protocol\": \"{protocol}\", \"cipher\": \"{cipher}\", \
         \"group\": \"{group}\", \"alpn\": \"{alpn}\", \"client_concurrency\": {}}}",
        all.done > 0,
        all.done,
        seconds,
        all.done as f64 / seconds,
        all.resumed,
        all.err_connect,
        all.err_tls,
        all.err_http,
        all.err_timeout,
        num(percentile(&all.latencies, 50.0)),
        num(percentile(&all.latencies, 90.0)),
        num(percentile(&all.latencies, 99.0)),
        args.connections,
    );
}
