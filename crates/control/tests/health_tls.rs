//! Health checks of instances that speak TLS (`upstream_tls`), against real TLS servers with
//! certificates made at test time; and the CA files, as the daemon loads them at start.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cutover_control::config::{Config, HealthConfig};
use cutover_control::health::{check_once, CheckFailure, CheckSpec, HealthChecker, Status};
use cutover_proxy::{Colour, UpstreamTls};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A test CA; `pem` is its certificate.
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

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// Server settings presenting a certificate of this CA for `names`.
    fn server(&self, names: &[&str]) -> Arc<rustls::ServerConfig> {
        let params = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key)
            .unwrap();
        Arc::new(config)
    }
}

/// An instance that answers every request with 200 over TLS; counts the handshakes it completed.
async fn tls_instance(server: Arc<rustls::ServerConfig>) -> (SocketAddr, Arc<AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handshakes = Arc::new(AtomicU64::new(0));
    let acceptor = tokio_rustls::TlsAcceptor::from(server);
    let counted = handshakes.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else { continue };
            let (acceptor, counted) = (acceptor.clone(), counted.clone());
            tokio::spawn(async move {
                let Ok(Ok(mut tls)) = tokio::time::timeout(Duration::from_secs(5), acceptor.accept(s)).await else {
                    return;
                };
                counted.fetch_add(1, Ordering::SeqCst);
                let mut buf = [0u8; 1024];
                let _ = tls.read(&mut buf).await;
                let _ = tls
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (addr, handshakes)
}

fn settings(ca: &Ca, server_name: Option<&str>) -> Arc<UpstreamTls> {
    Arc::new(UpstreamTls::new(ca.pem().as_bytes(), "certs/internal-ca.pem", server_name).unwrap())
}

/// A check of a TLS instance passes over TLS, verified for the server name or, without one, for
/// the instance's IP address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_over_tls_pass() {
    let ca = Ca::new("internal CA");
    let (by_name, handshakes) = tls_instance(ca.server(&["api.internal"])).await;
    let timeout = Duration::from_secs(5);
    let tls = settings(&ca, Some("api.internal"));
    assert_eq!(check_once(by_name, "/up", None, timeout, Some(&tls)).await, Ok(()));
    assert_eq!(handshakes.load(Ordering::SeqCst), 1);

    let (by_ip, _) = tls_instance(ca.server(&["127.0.0.1"])).await;
    assert_eq!(
        check_once(by_ip, "/up", None, timeout, Some(&settings(&ca, None))).await,
        Ok(())
    );
}

/// A certificate the settings refuse fails the check, saying why; so does an instance that
/// does not speak TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_that_fail_the_handshake_say_so() {
    let (ca, other) = (Ca::new("internal CA"), Ca::new("someone else's CA"));
    let timeout = Duration::from_secs(5);
    let tls = settings(&ca, Some("api.internal"));

    let (foreign, _) = tls_instance(other.server(&["api.internal"])).await;
    assert_eq!(
        check_once(foreign, "/up", None, timeout, Some(&tls)).await,
        Err(CheckFailure::Instance(format!(
            "GET https://{foreign}/up: TLS handshake (server name api.internal) failed: invalid peer certificate: \
             UnknownIssuer (the certificate is not issued by a CA in certs/internal-ca.pem)"
        )))
    );

    let (misnamed, _) = tls_instance(ca.server(&["web.internal"])).await;
    let Err(CheckFailure::Instance(why)) = check_once(misnamed, "/up", None, timeout, Some(&tls)).await else {
        panic!("a certificate for another name passes");
    };
    assert!(
        why.starts_with(&format!(
            "GET https://{misnamed}/up: TLS handshake (server name api.internal) failed: invalid peer certificate: \
             certificate not valid for name \"api.internal\""
        )),
        "{why}"
    );

    // A plain HTTP instance: it answers the ClientHello with a 400 of its own.
    let plain = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let plain_addr = plain.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = plain.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .await;
            });
        }
    });
    assert_eq!(
        check_once(plain_addr, "/up", None, timeout, Some(&tls)).await,
        Err(CheckFailure::Instance(format!(
            "GET https://{plain_addr}/up: TLS handshake (server name api.internal) failed: received corrupt message \
             of type InvalidContentType (the upstream does not speak TLS; is it plain HTTP?)"
        )))
    );
}

fn spec(addr: SocketAddr, tls: Option<Arc<UpstreamTls>>) -> CheckSpec {
    CheckSpec {
        service: "web".into(),
        colour: Colour::Green,
        instances: vec![addr],
        config: HealthConfig {
            path: "/up".into(),
            interval: Duration::from_millis(50),
            timeout: Duration::from_secs(2),
            healthy: 1,
            unhealthy: 1,
            deadline: Duration::from_secs(60),
            host: None,
        },
        tls,
    }
}

async fn wait_for_status(checker: &HealthChecker, addr: SocketAddr, want: Status) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while checker.snapshot().get(addr).map(|h| h.status) != Some(want) {
        assert!(
            Instant::now() < deadline,
            "{addr} never became {want:?}: {:?}",
            checker.snapshot()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The checker of a TLS service: a good certificate makes the instance healthy; one from
/// another CA makes it unhealthy, with the handshake's failure as its last error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_speaks_tls_and_reports_handshake_failures() {
    let (ca, other) = (Ca::new("internal CA"), Ca::new("someone else's CA"));
    let (good, handshakes) = tls_instance(ca.server(&["api.internal"])).await;
    let checker = HealthChecker::start(spec(good, Some(settings(&ca, Some("api.internal")))));
    wait_for_status(&checker, good, Status::Healthy).await;
    assert!(handshakes.load(Ordering::SeqCst) >= 1);
    checker.stop().await;

    let (foreign, _) = tls_instance(other.server(&["api.internal"])).await;
    let checker = HealthChecker::start(spec(foreign, Some(settings(&ca, Some("api.internal")))));
    wait_for_status(&checker, foreign, Status::Unhealthy).await;
    let last_error = checker.snapshot().get(foreign).unwrap().last_error.clone().unwrap();
    assert_eq!(
        last_error,
        format!(
            "GET https://{foreign}/up: TLS handshake (server name api.internal) failed: invalid peer certificate: \
             UnknownIssuer (the certificate is not issued by a CA in certs/internal-ca.pem)"
        )
    );
    assert!(checker.snapshot().describe_unhealthy().contains(&last_error));
    checker.stop().await;
}

/// The CA files are read as the daemon reads them at start: one that is missing, empty or holds
/// no certificate is an error naming the key, the file and what to do.
#[test]
fn ca_files_that_cannot_be_used_are_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let config_file = dir.path().join("cutover.toml");
    std::fs::write(
        &config_file,
        "[services.web]\ncommand = \"./web\"\nupstream_tls = { ca = \"certs/ca.pem\", server_name = \"api.internal\" }\n",
    )
    .unwrap();
    let config = Config::load(&config_file).unwrap();
    let ca_file = dir.path().join("certs/ca.pem");
    let shown = |config: &Config| cutover_control::tls::load_upstream_tls(config).unwrap_err().to_string();

    assert_eq!(
        shown(&config),
        format!(
            "services.web.upstream_tls.ca: cannot read the CA file {}: No such file or directory (os error 2); check \
             the path (relative paths are relative to the config file) and that cutover may read it",
            ca_file.display()
        )
    );
    std::fs::create_dir(dir.path().join("certs")).unwrap();
    std::fs::write(&ca_file, "").unwrap();
    let no_certificate = format!(
        "services.web.upstream_tls.ca: {}: holds no certificate; it must be PEM with one or more \
         \"-----BEGIN CERTIFICATE-----\" blocks: the CA (or CAs) that issued the upstreams' certificates",
        ca_file.display()
    );
    assert_eq!(shown(&config), no_certificate);
    // A key alone is no certificate either.
    std::fs::write(&ca_file, rcgen::KeyPair::generate().unwrap().serialize_pem()).unwrap();
    assert_eq!(shown(&config), no_certificate);

    let ca = Ca::new("internal CA");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let loaded = cutover_control::tls::load_upstream_tls(&config).unwrap();
    assert_eq!(loaded.keys().collect::<Vec<_>>(), ["web"]);
}
