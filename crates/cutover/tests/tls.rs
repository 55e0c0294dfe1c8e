//! `cutover serve` with TLS listeners, driven by real TLS clients (curl, Python's ssl, h2load,
//! rustls) and certificates made at test time: SNI and ALPN, certificates replaced on disk or
//! broken while the daemon runs, `cutover reload`, status and metrics, start errors, and a
//! deployment under HTTPS keep-alive load.
//!
//! curl, python3 and h2load (Debian's nghttp2-client) are installed by scripts/test.sh.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, ServerName};

mod common;
use common::*;

/// A test CA that issues server certificates as PEM files.
struct Ca {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    pem: PathBuf,
}

impl Ca {
    fn new(dir: &Path) -> Ca {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "cutover test CA");
        let issuer = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap();
        let pem = dir.join("ca.pem");
        std::fs::write(&pem, issuer.pem()).unwrap();
        Ca { issuer, pem }
    }

    /// Writes a certificate for `names` to `<stem>.pem` and `<stem>.key` in `dir`, each
    /// replacing the old file in one rename, and returns its DER.
    fn issue(&self, dir: &Path, stem: &str, names: &[&str]) -> CertificateDer<'static> {
        let params = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        for (ext, text) in [("key", key.serialize_pem()), ("pem", cert.pem())] {
            let tmp = dir.join(format!(".{stem}.{ext}.tmp"));
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, dir.join(format!("{stem}.{ext}"))).unwrap();
        }
        cert.der().clone()
    }

    fn client(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.issuer.der().clone()).unwrap();
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A blocking rustls connection naming `name`, its handshake done.
fn tls_connect(addr: SocketAddr, name: &str, config: &Arc<rustls::ClientConfig>) -> std::io::Result<Tls> {
    let tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    tcp.set_nodelay(true)?;
    let conn = rustls::ClientConnection::new(config.clone(), ServerName::try_from(name.to_string()).unwrap())
        .map_err(std::io::Error::other)?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    Ok(tls)
}

fn presented(tls: &Tls) -> CertificateDer<'static> {
    tls.conn.peer_certificates().unwrap()[0].clone().into_owned()
}

/// One keep-alive GET over `tls`; returns the status and the body.
fn https_get(tls: &mut Tls, host: &str, path: &str) -> std::io::Result<(u16, String)> {
    // One write, one TLS record, one segment.
    tls.write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())?;
    tls.flush()?;
    read_answer(&mut BufReader::new(tls))
}

/// An upstream that answers every request with its Host and X-Forwarded-Proto, keep-alive.
fn echo_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut writer = stream.try_clone().unwrap();
                let mut reader = BufReader::new(stream);
                loop {
                    let (mut host, mut proto) = (String::new(), String::new());
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    loop {
                        let mut h = String::new();
                        if reader.read_line(&mut h).unwrap_or(0) == 0 {
                            return;
                        }
                        if h == "\r\n" {
                            break;
                        }
                        let lower = h.to_ascii_lowercase();
                        if let Some(v) = lower.strip_prefix("host:") {
                            host = v.trim().to_string();
                        }
                        if let Some(v) = lower.strip_prefix("x-forwarded-proto:") {
                            proto = v.trim().to_string();
                        }
                    }
                    let body = format!("{host} {proto}");
                    let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len());
                    if writer.write_all(head.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// A daemon with a plain and a TLS listener, a default certificate and two services with
/// certificates of their own: `a` (host a.test) and `b` (host b.test), both deployed on the
/// echo upstream.
struct Site {
    dir: tempfile::TempDir,
    config: PathBuf,
    ca: Ca,
    plain: SocketAddr,
    tls: SocketAddr,
    _daemon: Stopping,
    certs: Mutex<std::collections::BTreeMap<String, CertificateDer<'static>>>,
}

impl Site {
    fn new() -> Site {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new(dir.path());
        let mut certs = std::collections::BTreeMap::new();
        for (stem, name) in [("default", "other.test"), ("a", "a.test"), ("b", "b.test")] {
            certs.insert(stem.to_string(), ca.issue(dir.path(), stem, &[name]));
        }
        let (plain, tls) = (free_port(), free_port());
        let config = dir.path().join("cutover.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"127.0.0.1:{plain}\"\nlisten_tls = \"127.0.0.1:{tls}\"\nstate_dir = \"state\"\n\
                 tls = {{ cert = \"default.pem\", key = \"default.key\" }}\n\n\
                 [services.a]\nhosts = [\"a.test\"]\ntls = {{ cert = \"a.pem\", key = \"a.key\" }}\nhealth = {{ interval = \"100ms\" }}\n\n\
                 [services.b]\nhosts = [\"b.test\"]\ntls = {{ cert = \"b.pem\", key = \"b.key\" }}\nhealth = {{ interval = \"100ms\" }}\n"
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("serve.log")).unwrap();
        let child = Command::new(BIN)
            .args(["serve", "-c"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let site = Site {
            dir,
            config,
            ca,
            plain: SocketAddr::from(([127, 0, 0, 1], plain)),
            tls: SocketAddr::from(([127, 0, 0, 1], tls)),
            _daemon: Stopping(child),
            certs: Mutex::new(certs),
        };
        assert!(
            wait_until(Duration::from_secs(20), || site.cli(&["status"]).status.success()),
            "daemon answers status: {}",
            site.log()
        );
        let upstream = echo_upstream().to_string();
        for service in ["a", "b"] {
            let out = site.cli(&["deploy", service, "--version", "v1", "--upstream", &upstream]);
            assert!(out.status.success(), "deploy {service}: {}\n{}", text(&out), site.log());
        }
        site
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .arg("-c")
            .arg(&self.config)
            .output()
            .unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("serve.log")).unwrap_or_default()
    }

    fn cert(&self, stem: &str) -> CertificateDer<'static> {
        self.certs.lock().unwrap()[stem].clone()
    }

    fn reissue(&self, stem: &str, name: &str) -> CertificateDer<'static> {
        let der = self.ca.issue(self.dir.path(), stem, &[name]);
        self.certs.lock().unwrap().insert(stem.to_string(), der.clone());
        der
    }

    fn status_json(&self) -> serde_json::Value {
        let out = self.cli(&["status", "--json"]);
        assert!(out.status.success(), "{}", text(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn metrics(&self) -> String {
        let out = Command::new("curl")
            .args(["-sS", "--unix-socket"])
            .arg(self.dir.path().join("state/admin.sock"))
            .arg("http://admin/metrics")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// curl against the TLS listener for `host`, resolved to it, trusting the test CA.
    fn curl(&self, host: &str, extra: &[&str]) -> Output {
        Command::new("curl")
            .args(["-sS", "--max-time", "10", "--cacert"])
            .arg(&self.ca.pem)
            .args(["--resolve", &format!("{host}:{}:127.0.0.1", self.tls.port())])
            .args(extra)
            .arg(format!("https://{host}:{}/", self.tls.port()))
            .output()
            .unwrap()
    }

    /// Python's ssl module: connects for `host` offering `alpn`, sends one request and prints
    /// the chosen ALPN protocol, the SHA-256 of the certificate shown and the response body.
    fn python(&self, host: &str, alpn: &[&str]) -> (String, String, String) {
        let script = r#"
import hashlib, socket, ssl, sys
host, port, ca, alpn = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4].split(",")
ctx = ssl.create_default_context(cafile=ca)
ctx.set_alpn_protocols(alpn)
with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
    with ctx.wrap_socket(raw, server_hostname=host) as s:
        chosen = s.selected_alpn_protocol()
        der = s.getpeercert(binary_form=True)
        body = ""
        if chosen != "h2":
            s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            body = data.split(b"\r\n\r\n", 1)[1].decode()
        print(chosen, hashlib.sha256(der).hexdigest(), body)
"#;
        let out = Command::new("python3")
            .args(["-c", script, host, &self.tls.port().to_string()])
            .arg(&self.ca.pem)
            .arg(alpn.join(","))
            .output()
            .expect("python3 runs (scripts/test.sh installs it)");
        assert!(out.status.success(), "python: {}", text(&out));
        let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let mut parts = line.splitn(3, ' ');
        let mut next = || parts.next().unwrap_or("").to_string();
        (next(), next(), next())
    }
}

fn sha256_hex(der: &[u8]) -> String {
    let out = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().unwrap().write_all(der)?;
            c.wait_with_output()
        })
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// SNI picks the right certificate for two hosts and the default for others, ALPN h2 and
/// http/1.1 both work, and the upstream is told `https` — seen by curl, Python's ssl module and
/// h2load; plain HTTP on the TLS port and TLS on the plain port get clear answers.
#[test]
fn curl_python_and_h2load_see_sni_alpn_and_https() {
    let site = Site::new();
    // curl verifies each host's certificate against the CA for that name, over both protocols.
    for host in ["a.test", "b.test"] {
        for (flag, version) in [("--http2", "2"), ("--http1.1", "1.1")] {
            let out = site.curl(host, &[flag, "-w", " %{http_version}"]);
            assert!(out.status.success(), "curl {host} {flag}: {}", text(&out));
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                format!("{host}:{} https {version}", site.tls.port())
            );
        }
    }
    // Python: the exact certificate per name, the ALPN choice, the body.
    for (host, stem) in [("a.test", "a"), ("b.test", "b"), ("other.test", "default")] {
        let (alpn, sha, _) = site.python(host, &["h2", "http/1.1"]);
        assert_eq!(alpn, "h2", "{host}");
        assert_eq!(sha, sha256_hex(&site.cert(stem)), "{host} gets the {stem} certificate");
        let (alpn, _, body) = site.python(host, &["http/1.1"]);
        assert_eq!(alpn, "http/1.1");
        if stem != "default" {
            assert_eq!(body, format!("{host} https"), "{host}");
        }
    }
    // h2load: HTTP/2 over TLS, every request answered.
    let out = Command::new("/usr/bin/h2load")
        .args(["-n", "2000", "-c", "4", "-m", "8", "-H", ":authority: a.test"])
        .arg(format!("https://127.0.0.1:{}/", site.tls.port()))
        .output()
        .expect("h2load runs (scripts/test.sh installs nghttp2-client)");
    let report = text(&out);
    assert!(out.status.success(), "{report}");
    assert!(report.contains("Application protocol: h2"), "{report}");
    assert!(report.contains("2000 succeeded, 0 failed, 0 errored"), "{report}");
    assert!(report.contains("status codes: 2000 2xx"), "{report}");

    // Plain HTTP to the TLS port: a 400 that names the https:// URL.
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-w", " %{http_code}", "-H", "Host: a.test"])
        .arg(format!("http://127.0.0.1:{}/cart", site.tls.port()))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "This port speaks HTTPS, not plain HTTP: use https://a.test/cart\n 400"
    );
    // TLS to the plain port: curl says the port does not speak TLS.
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(&site.ca.pem)
        .args(["--resolve", &format!("a.test:{}:127.0.0.1", site.plain.port())])
        .arg(format!("https://a.test:{}/", site.plain.port()))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(35), "an SSL connect error: {}", text(&out));
    assert!(text(&out).contains("wrong version number"), "{}", text(&out));
    // And the plain port still answers plain HTTP, as http.
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-H", "Host: b.test"])
        .arg(format!("http://127.0.0.1:{}/", site.plain.port()))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "b.test http");
}

/// A certificate replaced on disk is served to new connections within seconds while a
/// connection set up before continues; a broken file leaves its host on the previous
/// certificate and the other hosts untouched, and is reported in `cutover status`, the log,
/// the metrics and by `cutover reload` (exit 1), which serves a repaired one at once.
#[test]
fn replaced_and_broken_certificate_files_while_serving() {
    let site = Site::new();
    let client = site.ca.client(&[b"http/1.1"]);
    let a1 = site.cert("a");
    let mut old = tls_connect(site.tls, "a.test", &client).unwrap();
    assert_eq!(presented(&old), a1);
    assert_eq!(
        https_get(&mut old, "a.test", "/").unwrap(),
        (200, "a.test https".to_string())
    );

    // Replaced on disk: picked up by the poll, no command.
    let a2 = site.reissue("a", "a.test");
    assert!(
        wait_until(Duration::from_secs(15), || {
            tls_connect(site.tls, "a.test", &client)
                .map(|t| presented(&t) == a2)
                .unwrap_or(false)
        }),
        "new connections get the new certificate: {}",
        site.log()
    );
    for _ in 0..3 {
        assert_eq!(
            https_get(&mut old, "a.test", "/").unwrap().0,
            200,
            "the old connection continues"
        );
    }
    assert_eq!(presented(&old), a1, "with the certificate it was set up with");

    // b's certificate file broken: b keeps its certificate, a and the default are untouched.
    let b1 = site.cert("b");
    std::fs::write(
        site.dir.path().join("b.pem"),
        "-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    assert!(
        wait_until(Duration::from_secs(15), || {
            site.status_json()["tls"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["name"] == "b" && c["error"].is_string())
        }),
        "the error reaches the status: {}",
        site.log()
    );
    let status = site.status_json();
    let b = status["tls"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "b")
        .unwrap()
        .clone();
    assert!(b["error"].as_str().unwrap().contains("b.pem"), "{b}");
    for c in status["tls"].as_array().unwrap().iter().filter(|c| c["name"] != "b") {
        assert!(c["error"].is_null(), "{c}");
    }
    let shown = text(&site.cli(&["status"]));
    assert!(
        shown.contains("tls b (b.test)") && shown.contains("NOT RELOADED") && shown.contains("b.pem"),
        "{shown}"
    );
    assert_eq!(
        presented(&tls_connect(site.tls, "b.test", &client).unwrap()),
        b1,
        "b keeps its certificate"
    );
    assert_eq!(presented(&tls_connect(site.tls, "a.test", &client).unwrap()), a2);
    assert_eq!(
        presented(&tls_connect(site.tls, "other.test", &client).unwrap()),
        site.cert("default")
    );
    let metrics = site.metrics();
    assert!(
        metrics.contains("cutover_tls_certificate_load_failing{certificate=\"b\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("cutover_tls_certificate_load_failing{certificate=\"a\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("cutover_tls_certificate_errors_total{certificate=\"b\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("cutover_tls_certificate_expiry_timestamp_seconds{certificate=\"a\"} "),
        "{metrics}"
    );
    assert!(
        site.log().contains("the certificate of b could not be loaded"),
        "{}",
        site.log()
    );
    let out = site.cli(&["reload"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("NOT RELOADED") && text(&out).contains("b.pem"),
        "{}",
        text(&out)
    );

    // Repaired and reloaded by command: served at once.
    let b2 = site.reissue("b", "b.test");
    let out = site.cli(&["reload"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(presented(&tls_connect(site.tls, "b.test", &client).unwrap()), b2);
    assert!(site.status_json()["tls"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["error"].is_null()));
}

/// A certificate that cannot be loaded at start stops the start with exit 2, naming the file;
/// so does a TLS listener without any certificate, naming the key.
#[test]
fn a_certificate_that_does_not_load_at_start_is_a_start_error() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path());
    ca.issue(dir.path(), "web", &["web.test"]);
    std::fs::write(dir.path().join("web.key"), "not a key\n").unwrap();
    let config = dir.path().join("cutover.toml");
    let write = |tls: &str| {
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"127.0.0.1:{}\"\nlisten_tls = \"127.0.0.1:{}\"\nstate_dir = \"state\"\n{tls}\n[services.web]\n",
                free_port(),
                free_port()
            ),
        )
        .unwrap()
    };
    write("tls = { cert = \"web.pem\", key = \"web.key\" }");
    // Bounded: a daemon that starts instead of refusing is stopped after 30 s.
    let serve = || {
        Command::new("timeout")
            .args(["30", BIN, "serve", "-c"])
            .arg(&config)
            .output()
            .unwrap()
    };
    let out = serve();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let shown = text(&out);
    assert!(
        shown.contains("server.tls") && shown.contains("web.key") && shown.contains("no private key"),
        "{shown}"
    );

    write("");
    let out = serve();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("server.listen_tls: a TLS listener needs a certificate"),
        "{}",
        text(&out)
    );
}

/// A deployment (v1 to v2, each its own demo-app instances) under HTTPS keep-alive load: every
/// request answered 200 by one of the two releases, none lost.
#[test]
fn a_deployment_under_https_keep_alive_load_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path());
    ca.issue(dir.path(), "default", &["web.test"]);
    let tls_port = free_port();
    let config = dir.path().join("cutover.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{}\"\nlisten_tls = \"127.0.0.1:{tls_port}\"\nstate_dir = \"state\"\n\
             tls = {{ cert = \"default.pem\", key = \"default.key\" }}\n\n[services.web]\n\
             command = \"{BIN} demo-app --port {{port}}\"\ninstances = 2\ndrain_timeout = \"3s\"\nwatch = {{ duration = \"0s\" }}\n\
             health = {{ path = \"/up\", interval = \"100ms\", timeout = \"1s\", healthy = 1, unhealthy = 2, deadline = \"10s\" }}\n",
            free_port()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("serve.log")).unwrap();
    let child = Command::new(BIN)
        .args(["serve", "--stop-instances", "-c"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let _daemon = Stopping(child);
    let cli = |args: &[&str]| Command::new(BIN).args(args).arg("-c").arg(&config).output().unwrap();
    assert!(wait_until(Duration::from_secs(20), || cli(&["status"])
        .status
        .success()));
    let out = cli(&["deploy", "web", "--version", "v1"]);
    assert!(out.status.success(), "{}", text(&out));

    let addr = SocketAddr::from(([127, 0, 0, 1], tls_port));
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = Arc::new(Mutex::new(std::collections::BTreeMap::<String, u64>::new()));
    let client = ca.client(&[b"http/1.1"]);
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (stop, failures, seen, client) = (stop.clone(), failures.clone(), seen.clone(), client.clone());
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(120);
                let mut conn: Option<Tls> = None;
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    if conn.is_none() {
                        match tls_connect(addr, "web.test", &client) {
                            Ok(c) => conn = Some(c),
                            Err(e) => {
                                failures.lock().unwrap().push(format!("connect: {e}"));
                                std::thread::sleep(Duration::from_millis(50));
                                continue;
                            }
                        }
                    }
                    match https_get(conn.as_mut().unwrap(), "web.test", "/") {
                        Ok((200, body)) => *seen.lock().unwrap().entry(body).or_default() += 1,
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
    let out = cli(&["deploy", "web", "--version", "v2"]);
    assert!(out.status.success(), "{}", text(&out));
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} failures, first: {:?}",
        failures.len(),
        failures.first()
    );
    let seen = seen.lock().unwrap();
    let versions: Vec<_> = seen
        .keys()
        .map(|k| k.split_whitespace().next().unwrap_or("").to_string())
        .collect();
    assert!(
        seen.keys().any(|k| k.contains("v1")) && seen.keys().any(|k| k.contains("v2")),
        "both releases answered: {seen:?} {versions:?}"
    );
    assert!(seen.values().sum::<u64>() > 200, "{seen:?}");
    let _ = cli(&["shutdown", "--stop-instances"]);
}
