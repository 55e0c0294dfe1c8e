//! The admin API on TCP over TLS (`[server] admin_tls`), against the real `cutover serve` and
//! CLI, with curl as a second TLS client: the bearer token never crosses the network in
//! cleartext, the CLI checks the daemon's certificate, the certificate is reloaded live, and an
//! admin address off loopback is refused without TLS.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod common;
use common::site::text;
use common::*;

const TOKEN: &str = "admin-tls-token-0123456789";

/// A self-signed certificate for `names` (DNS names or IP addresses), written as STEM.pem and
/// STEM.key in `dir`.
fn self_signed(dir: &Path, stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
    let c = rcgen::generate_simple_self_signed(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    let (cert, key) = (dir.join(format!("{stem}.pem")), dir.join(format!("{stem}.key")));
    std::fs::write(&cert, c.cert.pem()).unwrap();
    std::fs::write(&key, c.signing_key.serialize_pem()).unwrap();
    (cert, key)
}

/// A config with one static service, the admin API at `admin` with the token file, and
/// `server_extra` added to `[server]`.
fn write_config(dir: &Path, name: &str, admin: SocketAddr, server_extra: &str) -> PathBuf {
    let config = dir.join(name);
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{}\"\nstate_dir = \"state\"\nadmin = \"{admin}\"\n\
             token_file = \"admin.token\"\n{server_extra}\n\
             [services.api]\nhealth = {{ path = \"/up\", interval = \"100ms\", healthy = 1 }}\n",
            free_port()
        ),
    )
    .unwrap();
    config
}

fn cli(config: &Path, args: &[&str]) -> Output {
    Command::new(BIN).args(args).arg("-c").arg(config).output().unwrap()
}

fn curl(args: &[&str]) -> Output {
    Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .unwrap()
}

/// A TCP relay from a port of its own to `to`, recording every byte the clients send.
fn recording_relay(to: SocketAddr) -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        for client in listener.incoming().take(64) {
            let Ok(mut client) = client else { continue };
            let Ok(mut server) = TcpStream::connect(to) else {
                continue;
            };
            let (mut client_back, mut server_back) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut server_back, &mut client_back);
                let _ = client_back.shutdown(std::net::Shutdown::Write);
            });
            let record = record.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 16384];
                loop {
                    match client.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            record.lock().unwrap().extend_from_slice(&buf[..n]);
                            if server.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = server.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    (addr, seen)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The daemon's admin API over TLS: the CLI (through a relay that records what it sends) and
/// curl get answers, the token is nowhere in the bytes on the wire, plain HTTP is told to use
/// https, a CLI that trusts another certificate or checks another name sends nothing, and the
/// dashboard's session cookie is `Secure`.
#[test]
fn the_admin_api_over_tls_keeps_the_token_off_the_wire_and_checks_the_certificate() {
    let dir = tempfile::tempdir().unwrap();
    write_private(&dir.path().join("admin.token"), TOKEN);
    let (cert, _) = self_signed(dir.path(), "admin", &["127.0.0.1", "cutover.internal"]);
    self_signed(dir.path(), "other", &["127.0.0.1"]);
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let tls = "admin_tls = { cert = \"admin.pem\", key = \"admin.key\" }";
    let config = write_config(dir.path(), "cutover.toml", admin, tls);
    let _daemon = Stopping(spawn_serve(&config));
    assert!(
        wait_until(Duration::from_secs(20), || cli(&config, &["status"]).status.success()),
        "the CLI gets the status over TLS: {}",
        text(&cli(&config, &["status"]))
    );

    // The CLI through a relay that records what it sends: a TLS handshake, never the token.
    let (relay, seen) = recording_relay(admin);
    let through_relay = write_config(dir.path(), "relay.toml", relay, tls);
    let out = cli(&through_relay, &["status"]);
    assert!(out.status.success(), "status through the relay: {}", text(&out));
    assert!(text(&out).contains("api"), "{}", text(&out));
    let sent = seen.lock().unwrap().clone();
    assert!(sent.len() > 100, "the relay saw the CLI's bytes: {}", sent.len());
    assert_eq!(sent[0], 0x16, "the CLI's first byte is a TLS handshake record");
    assert!(!contains(&sent, TOKEN.as_bytes()), "the token crossed in cleartext");
    assert!(!contains(&sent, b"/v1/"), "a request line crossed in cleartext");

    // curl, trusting the certificate, with the token: the status, which lists the admin
    // API's certificate with its expiry.
    let url = format!("https://{admin}/v1/status");
    let bearer = format!("Authorization: Bearer {TOKEN}");
    let out = curl(&["--cacert", cert.to_str().unwrap(), "-H", &bearer, &url]);
    assert!(out.status.success(), "curl over TLS: {}", text(&out));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let certs = status["tls"].as_array().cloned().unwrap_or_default();
    assert!(
        certs
            .iter()
            .any(|c| c["name"] == "admin API" && c["not_after"].is_u64()),
        "the admin API's certificate is in the status: {status}"
    );
    // Without the token: refused, over TLS too.
    let out = curl(&[
        "--cacert",
        cert.to_str().unwrap(),
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &url,
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "401", "{}", text(&out));
    // Plain HTTP to the TLS port: told what to do, and nothing served.
    let out = curl(&[
        "-H",
        &bearer,
        "-w",
        " %{http_code}",
        &format!("http://{admin}/v1/status"),
    ]);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("speaks TLS only") && shown.ends_with(" 400"),
        "{}",
        text(&out)
    );
    // A session for the dashboard: its cookie is only ever sent back over TLS.
    let out = curl(&[
        "--cacert",
        cert.to_str().unwrap(),
        "-i",
        "-H",
        "X-Cutover-Request: 1",
        "-H",
        "content-type: application/json",
        "--data",
        &format!("{{\"token\": \"{TOKEN}\"}}"),
        &format!("https://{admin}/v1/session"),
    ]);
    let shown = text(&out).to_ascii_lowercase();
    assert!(
        shown.contains("set-cookie: cutover_session=") && shown.contains("; secure"),
        "{shown}"
    );

    // A CLI that trusts another certificate, or checks another name: refused before a request.
    let before = seen.lock().unwrap().len();
    let wrong_ca = write_config(
        dir.path(),
        "wrong-ca.toml",
        relay,
        "admin_tls = { cert = \"admin.pem\", key = \"admin.key\", ca = \"other.pem\" }",
    );
    let out = cli(&wrong_ca, &["status"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("TLS handshake with the cutover daemon") && text(&out).contains("admin_tls.ca"),
        "{}",
        text(&out)
    );
    let wrong_name = write_config(
        dir.path(),
        "wrong-name.toml",
        relay,
        "admin_tls = { cert = \"admin.pem\", key = \"admin.key\", server_name = \"elsewhere.internal\" }",
    );
    let out = cli(&wrong_name, &["status"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("elsewhere.internal"), "{}", text(&out));
    let right_name = write_config(
        dir.path(),
        "right-name.toml",
        relay,
        "admin_tls = { cert = \"admin.pem\", key = \"admin.key\", server_name = \"cutover.internal\" }",
    );
    let out = cli(&right_name, &["status"]);
    assert!(
        out.status.success(),
        "server_name = the certificate's name: {}",
        text(&out)
    );
    let sent = seen.lock().unwrap().clone();
    assert!(sent.len() > before, "the refused CLIs connected");
    assert!(!contains(&sent, TOKEN.as_bytes()), "the token crossed in cleartext");

    // An admin address of every interface names no certificate: the CLI asks for server_name.
    let any = write_config(
        dir.path(),
        "any.toml",
        SocketAddr::from(([0, 0, 0, 0], admin.port())),
        "admin_tls = { cert = \"admin.pem\", key = \"admin.key\" }",
    );
    let out = cli(&any, &["status"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("set admin_tls.server_name"), "{}", text(&out));

    // A CLI that expects plain TCP, against the TLS port: an answer that says why.
    let plain = write_config(dir.path(), "plain.toml", admin, "");
    let out = cli(&plain, &["status"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("speaks TLS only"), "{}", text(&out));
}

/// The admin certificate replaced on disk is served to new connections after `cutover reload`,
/// while the CLI, trusting the issuer (`ca`), goes on working; a broken file keeps the one
/// before. The two certificates name different hosts, so curl tells which one is presented.
#[test]
fn the_admin_certificate_is_reloaded_live() {
    let dir = tempfile::tempdir().unwrap();
    write_private(&dir.path().join("admin.token"), TOKEN);
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    // A name of its own: an issuer named like the certificates it signs reads as self-signed.
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "cutover admin test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
    let issue = |name: &str| {
        let params = rcgen::CertificateParams::new(vec![name.to_string(), "127.0.0.1".to_string()]).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &ca).unwrap();
        // Each file replaced in one rename, as a renewal does.
        for (file, text) in [("admin.key", key.serialize_pem()), ("admin.pem", cert.pem())] {
            let tmp = dir.path().join(format!(".{file}.tmp"));
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, dir.path().join(file)).unwrap();
        }
    };
    issue("one.internal");
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let config = write_config(
        dir.path(),
        "cutover.toml",
        admin,
        "admin_tls = { cert = \"admin.pem\", key = \"admin.key\", ca = \"ca.pem\" }",
    );
    let _daemon = Stopping(spawn_serve(&config));
    assert!(wait_until(Duration::from_secs(20), || cli(&config, &["status"])
        .status
        .success()));
    // Whether the certificate presented now names `host`.
    let presents = |host: &str| {
        curl(&[
            "--cacert",
            dir.path().join("ca.pem").to_str().unwrap(),
            "--resolve",
            &format!("{host}:{}:127.0.0.1", admin.port()),
            "-H",
            &format!("Authorization: Bearer {TOKEN}"),
            "-o",
            "/dev/null",
            &format!("https://{host}:{}/v1/status", admin.port()),
        ])
        .status
        .success()
    };

    assert!(presents("one.internal"));
    assert!(!presents("two.internal"));

    issue("two.internal");
    let out = cli(&config, &["reload"]);
    assert!(out.status.success(), "reload: {}", text(&out));
    assert!(text(&out).contains("the admin API's TCP listener"), "{}", text(&out));
    assert!(presents("two.internal"), "new connections get the new certificate");
    assert!(!presents("one.internal"), "the old certificate is no longer presented");

    // A broken certificate file: reported (exit 1), and the one before is still presented.
    std::fs::write(dir.path().join("admin.pem"), "not a certificate\n").unwrap();
    let out = cli(&config, &["reload"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("admin API") && text(&out).contains("admin.pem"),
        "the reload names the failing certificate: {}",
        text(&out)
    );
    assert!(presents("two.internal"), "the certificate before is kept");
    assert!(cli(&config, &["status"]).status.success());
}

/// An admin API off loopback without TLS is refused at start, naming the key and the two ways
/// out; `admin_plaintext = true` allows it.
#[test]
fn a_plaintext_admin_off_loopback_is_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    write_private(&dir.path().join("admin.token"), TOKEN);
    let admin = SocketAddr::from(([0, 0, 0, 0], free_port()));
    let config = write_config(dir.path(), "cutover.toml", admin, "");
    let out = serve_refused(&config);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let shown = text(&out);
    assert!(
        shown.contains("server.admin") && shown.contains("not a loopback address") && shown.contains("admin_tls"),
        "{shown}"
    );
    assert!(
        TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], admin.port()))).is_err(),
        "nothing listens"
    );

    let allowed = write_config(dir.path(), "allowed.toml", admin, "admin_plaintext = true");
    let _daemon = Stopping(spawn_serve(&allowed));
    assert!(
        wait_until(Duration::from_secs(20), || cli(&allowed, &["status"]).status.success()),
        "admin_plaintext = true serves plain TCP: {}",
        text(&cli(&allowed, &["status"]))
    );
}

/// A client cannot hold the admin API: one address gets at most 32 connections (the 33rd is
/// closed at once, and the CLI says the daemon may be busy), and a sign-in whose body does not
/// arrive is answered within seconds instead of holding its connection.
#[test]
fn one_client_cannot_hold_the_admin_api() {
    let dir = tempfile::tempdir().unwrap();
    write_private(&dir.path().join("admin.token"), TOKEN);
    let (cert, _) = self_signed(dir.path(), "admin", &["127.0.0.1"]);
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let config = write_config(
        dir.path(),
        "cutover.toml",
        admin,
        "admin_tls = { cert = \"admin.pem\", key = \"admin.key\" }",
    );
    let _daemon = Stopping(spawn_serve(&config));
    assert!(wait_until(Duration::from_secs(20), || cli(&config, &["status"])
        .status
        .success()));

    // 32 connections that say nothing hold every slot of 127.0.0.1.
    let held: Vec<TcpStream> = (0..32).map(|_| TcpStream::connect(admin).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let out = cli(&config, &["status"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("closed the connection during the TLS handshake"),
        "{}",
        text(&out)
    );
    drop(held);
    assert!(
        wait_until(Duration::from_secs(5), || cli(&config, &["status"]).status.success()),
        "the slots are free again once the connections close"
    );

    // A sign-in that declares a body and sends none: answered (400) within the body's time
    // limit, over TLS, by Python's ssl module.
    let script = r#"
import socket, ssl, sys, time
ctx = ssl.create_default_context(cafile=sys.argv[1])
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", int(sys.argv[2]))), server_hostname="127.0.0.1")
s.sendall(b"POST /v1/session HTTP/1.1\r\nHost: x\r\nX-Cutover-Request: 1\r\nContent-Length: 4000\r\n\r\n")
s.settimeout(20)
started = time.monotonic()
answer = s.recv(4096).decode(errors="replace")
print(round(time.monotonic() - started, 1), answer.split("\r\n")[0])
"#;
    let out = Command::new("python3")
        .args(["-c", script, cert.to_str().unwrap(), &admin.port().to_string()])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{}", text(&out));
    let (secs, status) = shown.trim().split_once(' ').unwrap();
    let secs: f64 = secs.parse().unwrap();
    assert!(status.contains("400"), "{shown}");
    assert!((4.0..9.0).contains(&secs), "answered after {secs} s: {shown}");
}
