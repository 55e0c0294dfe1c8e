//! `cutover serve` with a service whose instances speak TLS (`upstream_tls`): real TLS upstreams
//! (rustls, certificates made at test time), a deployment and its switch under keep-alive load,
//! a release whose certificate the CA does not vouch for, and CA files that stop the start.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;
use common::*;

/// A test CA whose certificate is written to `ca.pem` in a directory.
struct Ca {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        Ca {
            issuer: rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap(),
        }
    }

    fn write_to(&self, dir: &Path) {
        std::fs::write(dir.join("ca.pem"), self.issuer.pem()).unwrap();
    }

    /// Server settings presenting a certificate of this CA for `names`.
    fn server(&self, names: &[&str]) -> Arc<rustls::ServerConfig> {
        let params = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key)
            .unwrap();
        Arc::new(config)
    }
}

/// What a TLS upstream saw.
#[derive(Default)]
struct Seen {
    handshakes: AtomicU64,
    failed_handshakes: AtomicU64,
    requests: AtomicU64,
}

/// An upstream that speaks only TLS and answers every request with `body`, keep-alive unless
/// the request asks to close (as health checks do).
fn tls_upstream(server: Arc<rustls::ServerConfig>, body: &'static str) -> (SocketAddr, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let counts = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (server, seen) = (server.clone(), counts.clone());
            std::thread::spawn(move || {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
                let _ = stream.set_nodelay(true);
                let conn = rustls::ServerConnection::new(server).unwrap();
                let mut reader = BufReader::new(rustls::StreamOwned::new(conn, stream));
                let mut first = true;
                loop {
                    let mut line = String::new();
                    match reader.read_line(&mut line) {
                        Ok(0) => return,
                        Ok(_) => {}
                        Err(_) => {
                            if first {
                                seen.failed_handshakes.fetch_add(1, Ordering::SeqCst);
                            }
                            return;
                        }
                    }
                    if first {
                        seen.handshakes.fetch_add(1, Ordering::SeqCst);
                        first = false;
                    }
                    let mut close = false;
                    loop {
                        let mut h = String::new();
                        if reader.read_line(&mut h).unwrap_or(0) == 0 {
                            return;
                        }
                        if h == "\r\n" {
                            break;
                        }
                        let lower = h.to_ascii_lowercase();
                        if lower.starts_with("connection:") && lower.contains("close") {
                            close = true;
                        }
                    }
                    seen.requests.fetch_add(1, Ordering::SeqCst);
                    let tls = reader.get_mut();
                    let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len());
                    if tls.write_all(answer.as_bytes()).and_then(|_| tls.flush()).is_err() {
                        return;
                    }
                    if close {
                        tls.conn.send_close_notify();
                        let _ = tls.flush();
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

fn config_text(port: u16, upstream_tls: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nstate_dir = \"state\"\n\n[services.web]\n{upstream_tls}\n\
         health = {{ path = \"/up\", interval = \"100ms\", timeout = \"1s\", healthy = 1, unhealthy = 1, deadline = \"3s\" }}\n\
         drain_timeout = \"3s\"\nwatch = {{ duration = \"0s\" }}\n"
    )
}

/// `cutover serve -c CONFIG`, its log in `dir/serve.log`, stopped when dropped.
fn serve(dir: &Path, config: &Path) -> Stopping {
    let log = std::fs::File::create(dir.join("serve.log")).unwrap();
    Stopping(spawn_owned(
        Command::new(BIN)
            .args(["serve", "-c"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(log),
    ))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A deploy of v2 onto TLS instances and its switch under keep-alive load: every request is
/// answered 200 by v1 or v2 (over TLS), none fails; then a release whose certificate is not from
/// the configured CA fails its health checks, saying why, and live traffic stays on v2.
#[test]
fn a_deployment_to_tls_instances_under_load_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("internal CA");
    ca.write_to(dir.path());
    let (v1, seen_v1) = tls_upstream(ca.server(&["web.internal"]), "v1");
    let (v2, seen_v2) = tls_upstream(ca.server(&["web.internal"]), "v2");
    let (v3, seen_v3) = tls_upstream(Ca::new("another CA").server(&["web.internal"]), "v3");

    let port = free_port();
    let config = dir.path().join("cutover.toml");
    std::fs::write(
        &config,
        config_text(
            port,
            "upstream_tls = { ca = \"ca.pem\", server_name = \"web.internal\" }",
        ),
    )
    .unwrap();
    let _daemon = serve(dir.path(), &config);
    let serve_log = || std::fs::read_to_string(dir.path().join("serve.log")).unwrap_or_default();
    let cli = |args: &[&str]| Command::new(BIN).args(args).arg("-c").arg(&config).output().unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || cli(&["status"]).status.success()),
        "{}",
        serve_log()
    );
    let out = cli(&["deploy", "web", "--version", "v1", "--upstream", &v1.to_string()]);
    assert!(out.status.success(), "{}\n{}", text(&out), serve_log());

    let front = SocketAddr::from(([127, 0, 0, 1], port));
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let answered = Arc::new(Mutex::new(std::collections::BTreeMap::<String, u64>::new()));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (stop, failures, answered) = (stop.clone(), failures.clone(), answered.clone());
            std::thread::spawn(move || {
                // Bounded however the deploys go.
                let deadline = Instant::now() + Duration::from_secs(60);
                let mut conn: Option<(BufReader<TcpStream>, TcpStream)> = None;
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    if conn.is_none() {
                        let s = TcpStream::connect(front).unwrap();
                        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                        conn = Some((BufReader::new(s.try_clone().unwrap()), s));
                    }
                    let (reader, writer) = conn.as_mut().unwrap();
                    match exchange(reader, writer) {
                        Ok((200, body)) => *answered.lock().unwrap().entry(body).or_default() += 1,
                        Ok((status, body)) => failures.lock().unwrap().push(format!("{status} {body}")),
                        Err(e) => {
                            failures.lock().unwrap().push(format!("transport: {e}"));
                            conn = None;
                        }
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let out = cli(&["deploy", "web", "--version", "v2", "--upstream", &v2.to_string()]);
    assert!(out.status.success(), "{}\n{}", text(&out), serve_log());
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} failed, first: {:?}",
        failures.len(),
        failures.first()
    );
    let answered = answered.lock().unwrap().clone();
    assert_eq!(answered.keys().collect::<Vec<_>>(), ["v1", "v2"], "{answered:?}");
    let total: u64 = answered.values().sum();
    assert!(total > 200, "{answered:?}");
    // Every answer came over TLS: the upstreams speak nothing else. Health checks handshake once
    // each; the proxied requests ride kept-alive connections.
    let requests = seen_v1.requests.load(Ordering::SeqCst) + seen_v2.requests.load(Ordering::SeqCst);
    let handshakes = seen_v1.handshakes.load(Ordering::SeqCst) + seen_v2.handshakes.load(Ordering::SeqCst);
    assert!(requests >= total, "{requests} requests upstream for {total} answers");
    assert!(handshakes < total / 4, "{handshakes} handshakes for {total} answers");
    assert_eq!(
        seen_v1.failed_handshakes.load(Ordering::SeqCst) + seen_v2.failed_handshakes.load(Ordering::SeqCst),
        0
    );

    // A release the CA does not vouch for never goes live, and the deploy says why.
    let out = cli(&["deploy", "web", "--version", "v3", "--upstream", &v3.to_string()]);
    let shown = text(&out);
    assert_eq!(out.status.code(), Some(1), "{shown}");
    assert!(
        shown.contains(&format!(
            "GET https://{v3}/up: TLS handshake (server name web.internal) failed: invalid peer certificate: \
             UnknownIssuer (the certificate is not issued by a CA in"
        )),
        "{shown}"
    );
    assert_eq!(seen_v3.requests.load(Ordering::SeqCst), 0);
    assert!(seen_v3.failed_handshakes.load(Ordering::SeqCst) >= 1);
    let s = TcpStream::connect(front).unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut writer = s;
    assert_eq!(exchange(&mut reader, &mut writer).unwrap(), (200, "v2".to_string()));
}

/// A CA file that is missing, or holds no certificate, stops `cutover serve` with exit code 2,
/// naming the key and the file.
#[test]
fn a_ca_file_that_cannot_be_used_is_a_start_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cutover.toml");
    std::fs::write(
        &config,
        config_text(free_port(), "upstream_tls = { ca = \"certs/ca.pem\" }"),
    )
    .unwrap();
    // Bounded: a daemon that starts instead of refusing is stopped after 30 s.
    let serve = || {
        Command::new("timeout")
            .args(["30", BIN, "serve", "-c"])
            .arg(&config)
            .output()
            .unwrap()
    };
    let ca_file = dir.path().join("certs/ca.pem");
    let out = serve();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains(&format!(
            "cannot start: services.web.upstream_tls.ca: cannot read the CA file {}: No such file or directory",
            ca_file.display()
        )),
        "{}",
        text(&out)
    );

    std::fs::create_dir(dir.path().join("certs")).unwrap();
    std::fs::write(&ca_file, "").unwrap();
    let out = serve();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains(&format!(
            "cannot start: services.web.upstream_tls.ca: {}: holds no certificate",
            ca_file.display()
        )),
        "{}",
        text(&out)
    );
}

/// The instances move to certificates of a new CA: until `cutover reload`, a release signed by
/// it fails its health checks; after it, the release goes live. A CA file that cannot be used
/// is named by the reload (exit 1) and the CA loaded before stays in use.
#[test]
fn cutover_reload_reads_the_upstream_ca_again() {
    let dir = tempfile::tempdir().unwrap();
    let (old_ca, new_ca) = (Ca::new("old CA"), Ca::new("new CA"));
    old_ca.write_to(dir.path());
    let (v1, _) = tls_upstream(old_ca.server(&["web.internal"]), "v1");
    let (v2, _) = tls_upstream(new_ca.server(&["web.internal"]), "v2");
    let port = free_port();
    let config = dir.path().join("cutover.toml");
    std::fs::write(
        &config,
        config_text(
            port,
            "upstream_tls = { ca = \"ca.pem\", server_name = \"web.internal\" }",
        ),
    )
    .unwrap();
    let _daemon = serve(dir.path(), &config);
    let serve_log = || std::fs::read_to_string(dir.path().join("serve.log")).unwrap_or_default();
    let cli = |args: &[&str]| Command::new(BIN).args(args).arg("-c").arg(&config).output().unwrap();
    assert!(wait_until(Duration::from_secs(20), || cli(&["status"])
        .status
        .success()));
    let out = cli(&["deploy", "web", "--version", "v1", "--upstream", &v1.to_string()]);
    assert!(out.status.success(), "{}\n{}", text(&out), serve_log());

    // The new CA is on disk, not yet read: v2 is refused.
    new_ca.write_to(dir.path());
    let out = cli(&["deploy", "web", "--version", "v2", "--upstream", &v2.to_string()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("UnknownIssuer"), "{}", text(&out));

    let out = cli(&["reload"]);
    assert!(out.status.success(), "{}\n{}", text(&out), serve_log());
    assert!(
        text(&out).contains("upstream CA of web: ") && text(&out).contains("ca.pem read"),
        "{}",
        text(&out)
    );
    let out = cli(&["deploy", "web", "--version", "v2", "--upstream", &v2.to_string()]);
    assert!(out.status.success(), "{}\n{}", text(&out), serve_log());
    let front = SocketAddr::from(([127, 0, 0, 1], port));
    let s = TcpStream::connect(front).unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut writer = s;
    assert_eq!(exchange(&mut reader, &mut writer).unwrap(), (200, "v2".to_string()));

    // A broken file: named, and the CA of before stays (v2's new connections still verify).
    std::fs::write(dir.path().join("ca.pem"), "not a certificate\n").unwrap();
    let out = cli(&["reload"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("ca.pem NOT taken") && text(&out).contains("the CA loaded before stays in use"),
        "{}",
        text(&out)
    );
    for _ in 0..3 {
        let s = TcpStream::connect(front).unwrap();
        let mut reader = BufReader::new(s.try_clone().unwrap());
        let mut writer = s;
        assert_eq!(exchange(&mut reader, &mut writer).unwrap(), (200, "v2".to_string()));
    }
}
