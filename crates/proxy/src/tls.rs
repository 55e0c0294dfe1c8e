//! TLS on the listeners that ask for it: the certificates a handshake chooses from (by SNI), the
//! rustls server settings, and a connection's way from its accept to the HTTP it then speaks.
//!
//! The proxy never reads a certificate file. The control plane loads each one, builds a
//! [`CertificateSet`] and hands it over whole ([`crate::Proxy::set_certificates`]); a handshake
//! reads the set current at its ClientHello from one atomic pointer, so a reload changes the
//! certificate of new handshakes only and never that of a connection already set up. The set is
//! apart from the route table: nothing reads both at once, and a certificate reload must not
//! wait for (or count as) a table revision.
//!
//! What a TLS listener accepts, in order ([`serve_tls`]): the connection takes its place under
//! `max_connections`; its first byte says whether it is a TLS handshake at all (plain HTTP gets a
//! 400 naming `https://`); the handshake must be over within `tls_handshake_timeout` from the
//! accept, and a stalled one only waits (no CPU: the task sleeps until bytes arrive or the
//! timer fires); ALPN decides between HTTP/2 and HTTP/1.1 (a client that offers no ALPN speaks
//! HTTP/1.1); then the connection is served exactly as a plain one is (`conn::serve_io`).

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::conn::{serve_io, ConnSlot, Opening};
use crate::shared::Shared;

/// ALPN protocol names, in the server's order of preference.
const ALPN_H2: &[u8] = b"h2";
const ALPN_HTTP11: &[u8] = b"http/1.1";

/// The first byte of a TLS record that carries a handshake message (a ClientHello).
pub const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// The crypto provider of every TLS setting and key in the proxy: ring, named explicitly rather
/// than taken from a process-wide default (which would panic if two providers were linked).
///
/// rustls marks ring's provider deprecated because it has no post-quantum key exchange
/// (X25519MLKEM768); aws-lc-rs has one, and builds here too, but its C library adds about three
/// minutes to every cold build on a 2-core machine. Classical X25519/P-256 key exchange, TLS 1.3
/// and 1.2 with rustls' safe default suites, is what ring gives; switching is this function and
/// the `ring` features in Cargo.toml.
#[allow(deprecated)]
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate chain with its private key, checked to belong together, ready to be served.
#[derive(Clone)]
pub struct TlsCertificate {
    key: Arc<CertifiedKey>,
}

impl fmt::Debug for TlsCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsCertificate")
            .field("chain", &self.key.cert.len())
            .finish()
    }
}

/// Which file of a certificate's pair a [`CertificateError`] is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertificateFile {
    Cert,
    Key,
    /// The two do not belong together.
    Both,
}

/// Why a certificate and key cannot be served. Display is a sentence without the file names,
/// which the caller knows ([`CertificateError::file`] says which one is meant).
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("holds no certificate; it must be PEM with a \"-----BEGIN CERTIFICATE-----\" block, the server's certificate first, then its intermediates")]
    NoCertificate,
    #[error("is not valid PEM ({0}); it must hold \"-----BEGIN CERTIFICATE-----\" blocks")]
    CertificatePem(String),
    #[error(
        "holds no private key; it must be PEM with a \"-----BEGIN PRIVATE KEY-----\" (or RSA / EC PRIVATE KEY) block"
    )]
    NoKey,
    #[error("is not valid PEM ({0}); it must hold a \"-----BEGIN PRIVATE KEY-----\" (or RSA / EC PRIVATE KEY) block")]
    KeyPem(String),
    #[error("holds a private key that cannot be used ({0}); use an RSA (2048 bits or more), ECDSA P-256/P-384 or Ed25519 key")]
    UnusableKey(String),
    #[error("the private key does not belong to the certificate (their public keys differ); check that the key file is the one the certificate was issued for")]
    KeyMismatch,
    #[error("holds a certificate that cannot be read ({0})")]
    BadCertificate(String),
}

impl CertificateError {
    pub fn file(&self) -> CertificateFile {
        match self {
            CertificateError::NoCertificate
            | CertificateError::CertificatePem(_)
            | CertificateError::BadCertificate(_) => CertificateFile::Cert,
            CertificateError::NoKey | CertificateError::KeyPem(_) | CertificateError::UnusableKey(_) => {
                CertificateFile::Key
            }
            CertificateError::KeyMismatch => CertificateFile::Both,
        }
    }
}

impl TlsCertificate {
    /// A certificate chain (PEM, the server's own certificate first) and its private key (PEM:
    /// PKCS#8, PKCS#1 RSA or SEC1 EC). Fails when either holds nothing usable or when the key is
    /// not the certificate's.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<TlsCertificate, CertificateError> {
        let chain = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CertificateError::CertificatePem(e.to_string()))?;
        if chain.is_empty() {
            return Err(CertificateError::NoCertificate);
        }
        let key = match PrivateKeyDer::from_pem_slice(key_pem) {
            Ok(k) => k,
            Err(rustls::pki_types::pem::Error::NoItemsFound) => return Err(CertificateError::NoKey),
            Err(e) => return Err(CertificateError::KeyPem(e.to_string())),
        };
        let signing = provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| CertificateError::UnusableKey(e.to_string()))?;
        let key = CertifiedKey::new(chain, signing);
        match key.keys_match() {
            Ok(()) => {}
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
                return Err(CertificateError::KeyMismatch)
            }
            // The key cannot tell its public half: nothing to compare, as rustls itself decides.
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
            Err(e) => return Err(CertificateError::BadCertificate(e.to_string())),
        }
        Ok(TlsCertificate { key: Arc::new(key) })
    }

    /// The server's own certificate (DER), first of the chain.
    pub fn leaf_der(&self) -> &[u8] {
        // `from_pem` refuses an empty chain.
        self.key.cert.first().map_or(&[], |c| c.as_ref())
    }

    /// Whether two certificates are the same chain (the same bytes).
    pub fn same_chain(&self, other: &TlsCertificate) -> bool {
        self.key.cert == other.key.cert
    }
}

/// Every certificate a TLS listener may present: one per host name (the hosts of the service it
/// belongs to) and a default for names none covers (and for clients that send no SNI).
/// Immutable once handed to the proxy; a reload hands over a new one.
#[derive(Clone, Debug, Default)]
pub struct CertificateSet {
    /// Lower-case host names.
    hosts: HashMap<String, TlsCertificate>,
    default: Option<TlsCertificate>,
}

impl CertificateSet {
    pub fn new() -> CertificateSet {
        CertificateSet::default()
    }

    /// The certificate for names no host entry covers.
    pub fn set_default(&mut self, certificate: TlsCertificate) {
        self.default = Some(certificate);
    }

    /// The certificate for `host` (an exact name; case does not matter).
    pub fn insert_host(&mut self, host: &str, certificate: TlsCertificate) {
        self.hosts.insert(host.to_ascii_lowercase(), certificate);
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty() && self.default.is_none()
    }

    /// The certificate a handshake naming `server_name` (its SNI) gets: the host's, else the
    /// default, else none (the handshake fails).
    pub fn choose(&self, server_name: Option<&str>) -> Option<&TlsCertificate> {
        let exact = server_name.and_then(|name| {
            if name.bytes().any(|b| b.is_ascii_uppercase()) {
                self.hosts.get(&name.to_ascii_lowercase())
            } else {
                self.hosts.get(name)
            }
        });
        exact.or(self.default.as_ref())
    }
}

/// Chooses each handshake's certificate from the set it was built with.
struct SniResolver {
    certificates: Arc<CertificateSet>,
}

impl fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SniResolver")
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let chosen = self.certificates.choose(hello.server_name()).map(|c| c.key.clone());
        if chosen.is_none() {
            tracing::debug!(
                server_name = hello.server_name().unwrap_or("(none)"),
                "TLS handshake refused: no certificate for this name and no default certificate"
            );
        }
        chosen
    }
}

/// The one certificate a listener presents to every client (the admin API's), replaced whole
/// when it is reloaded; handshakes from then on get the new one.
pub struct CertificateSlot(std::sync::RwLock<TlsCertificate>);

impl fmt::Debug for CertificateSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CertificateSlot")
    }
}

impl CertificateSlot {
    pub fn new(certificate: TlsCertificate) -> Arc<CertificateSlot> {
        Arc::new(CertificateSlot(std::sync::RwLock::new(certificate)))
    }

    pub fn replace(&self, certificate: TlsCertificate) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = certificate;
    }

    /// Whether `certificate` is the one presented now.
    pub fn holds(&self, certificate: &TlsCertificate) -> bool {
        self.0.read().unwrap_or_else(|p| p.into_inner()).same_chain(certificate)
    }
}

impl ResolvesServerCert for CertificateSlot {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|p| p.into_inner()).key.clone())
    }
}

/// The settings of a TLS listener for the admin API: TLS 1.3 and 1.2 as on the traffic
/// listeners, ALPN http/1.1 only (the admin API speaks nothing else), and `slot`'s certificate.
pub fn admin_server_config(slot: Arc<CertificateSlot>) -> Result<Arc<ServerConfig>, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(slot);
    config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    config.max_early_data_size = 0;
    Ok(Arc::new(config))
}

/// What TLS handshakes are set up with: the certificates and the settings built around them.
/// Swapped whole (`Shared::tls`) when the certificates change.
pub(crate) struct TlsServer {
    pub(crate) certificates: Arc<CertificateSet>,
    pub(crate) config: Arc<ServerConfig>,
}

impl TlsServer {
    /// Settings for `certificates`. Each set gets settings of its own, with a session cache of
    /// its own: a client resuming a session from before a reload (which would skip the
    /// certificate) makes a full handshake instead, and sees the new certificate.
    pub(crate) fn new(certificates: CertificateSet) -> Result<TlsServer, rustls::Error> {
        let certificates = Arc::new(certificates);
        let config = server_config(certificates.clone())?;
        Ok(TlsServer { certificates, config })
    }
}

/// The server settings of every TLS listener of one proxy: TLS 1.3 and 1.2 with rustls' default
/// cipher suites (ring), no client certificates, ALPN h2 then http/1.1, no 0-RTT data (it could
/// be replayed), and certificates from `certificates`.
fn server_config(certificates: Arc<CertificateSet>) -> Result<Arc<ServerConfig>, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SniResolver { certificates }));
    config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()];
    config.max_early_data_size = 0;
    Ok(Arc::new(config))
}

/// Serves a connection accepted on a TLS listener: the handshake (bounded by
/// `tls_handshake_timeout` from now, and by the shutdown), then HTTP as ALPN chose.
pub(crate) async fn serve_tls<H, F, B>(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    preview: bool,
    slot: ConnSlot,
    handle: H,
) where
    H: Fn(Arc<crate::conn::ConnCtx>, http::Request<hyper::body::Incoming>) -> F + Send + Sync + 'static,
    F: std::future::Future<Output = Result<http::Response<B>, std::convert::Infallible>> + Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let Some((stream, peer)) = crate::proxy_protocol::client_of(&shared, stream, peer).await else {
        return;
    };
    // The settings current at the accept: a reload after it does not change this handshake.
    let config = shared.tls.load().config.clone();
    let timeout = shared.config.tls_handshake_timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    let handshake = async {
        match first_byte(&stream).await {
            Ok(Some(TLS_HANDSHAKE_RECORD)) => {}
            Ok(Some(_)) => {
                answer_plain_http(stream, deadline).await;
                return None;
            }
            Ok(None) | Err(_) => return None,
        }
        match tokio_rustls::TlsAcceptor::from(config).accept(stream).await {
            Ok(tls) => Some(tls),
            Err(e) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                None
            }
        }
    };
    let tls = tokio::select! {
        r = tokio::time::timeout_at(deadline, handshake) => match r {
            Ok(Some(tls)) => tls,
            Ok(None) => return,
            Err(_) => {
                tracing::debug!(%peer, ?timeout, "TLS handshake not complete within tls_handshake_timeout; closing the connection");
                return;
            }
        },
        _ = shared.shutdown.cancelled() => return,
    };
    let opening = if tls.get_ref().1.alpn_protocol() == Some(ALPN_H2) {
        Opening::Http2
    } else {
        Opening::Http1
    };
    serve_io(shared, tls, peer, preview, true, opening, slot, handle).await;
}

/// The first byte the client sent, without consuming it; `None` when it closed without one.
/// Sleeps until a byte arrives: the peek runs inside `try_io`, which clears the readiness
/// only when nothing was there.
async fn first_byte(stream: &TcpStream) -> io::Result<Option<u8>> {
    use nix::sys::socket::{recv, MsgFlags};
    use std::os::fd::AsRawFd;
    use tokio::io::Interest;

    let mut buf = [0u8; 1];
    loop {
        stream.ready(Interest::READABLE).await?;
        let peeked = stream.try_io(Interest::READABLE, || {
            let n = recv(
                stream.as_raw_fd(),
                &mut buf,
                MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
            )?;
            Ok((n > 0).then_some(buf[0]))
        });
        match peeked {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

/// Longest request head read from a plain HTTP client on a TLS port before it is answered.
const PLAIN_HEAD_MAX: usize = 8 * 1024;

/// Plain HTTP sent to a TLS listener: answered with a 400 in plain HTTP that says to use
/// `https://` (with the URL when its head names one), then closed. The head is read first (up
/// to [`PLAIN_HEAD_MAX`] bytes, until `deadline`) so that the close does not reset the
/// connection with unread bytes before the client has read the answer.
async fn answer_plain_http(mut stream: TcpStream, deadline: tokio::time::Instant) {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while head.len() < PLAIN_HEAD_MAX && !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let _ = req.parse(&head);
    let printable = |s: &str| !s.is_empty() && s.len() <= 2048 && s.bytes().all(|b| b.is_ascii_graphic());
    let host = req
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("host"))
        .and_then(|h| std::str::from_utf8(h.value).ok())
        .filter(|h| printable(h));
    let path = req.path.filter(|p| p.starts_with('/') && printable(p));
    let body = match (host, path) {
        (Some(host), Some(path)) => format!("This port speaks HTTPS, not plain HTTP: use https://{host}{path}\n"),
        _ => "This port speaks HTTPS, not plain HTTP: use an https:// URL.\n".to_string(),
    };
    let response = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\ncache-control: no-store\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    tracing::debug!("plain HTTP on a TLS listener; answered 400");
    close_after(stream, response.as_bytes(), deadline).await;
}

/// Writes `answer`, ends the sending side, and reads (dropping it) what the client still sends
/// until it closes, for at most [`LINGER`] or until `deadline`, so that the kernel does not
/// answer unread bytes with a reset that could overtake the answer.
pub async fn close_after(mut stream: TcpStream, answer: &[u8], deadline: tokio::time::Instant) {
    const LINGER: Duration = Duration::from_secs(1);
    let until = deadline.min(tokio::time::Instant::now() + LINGER);
    let written = tokio::time::timeout_at(until, async {
        stream.write_all(answer).await?;
        stream.shutdown().await
    })
    .await;
    if !matches!(written, Ok(Ok(()))) {
        return;
    }
    let mut sink = [0u8; 1024];
    let _ = tokio::time::timeout_at(until, async {
        loop {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return io::Result::Ok(()),
                Ok(_) => {}
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generated(names: &[&str]) -> (String, String) {
        let c = rcgen::generate_simple_self_signed(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        (c.cert.pem(), c.signing_key.serialize_pem())
    }

    #[test]
    fn a_certificate_loads_with_its_own_key_only() {
        let (cert, key) = generated(&["a.example"]);
        let (_, other_key) = generated(&["b.example"]);
        assert!(TlsCertificate::from_pem(cert.as_bytes(), key.as_bytes()).is_ok());
        let e = TlsCertificate::from_pem(cert.as_bytes(), other_key.as_bytes()).unwrap_err();
        assert!(matches!(e, CertificateError::KeyMismatch), "{e}");
        assert_eq!(e.file(), CertificateFile::Both);
        let e = TlsCertificate::from_pem(b"", key.as_bytes()).unwrap_err();
        assert!(matches!(e, CertificateError::NoCertificate), "{e}");
        let e = TlsCertificate::from_pem(key.as_bytes(), key.as_bytes()).unwrap_err();
        assert_eq!(
            e.file(),
            CertificateFile::Cert,
            "a key where the certificate belongs: {e}"
        );
        let e = TlsCertificate::from_pem(cert.as_bytes(), cert.as_bytes()).unwrap_err();
        assert!(matches!(e, CertificateError::NoKey), "{e}");
        let broken = cert.replace("MII", "M!I");
        let e = TlsCertificate::from_pem(broken.as_bytes(), key.as_bytes()).unwrap_err();
        assert_eq!(e.file(), CertificateFile::Cert, "{e}");
        let truncated = &key[..key.len() / 2];
        let e = TlsCertificate::from_pem(cert.as_bytes(), truncated.as_bytes()).unwrap_err();
        assert_eq!(e.file(), CertificateFile::Key, "{e}");
    }

    #[test]
    fn sni_chooses_the_host_then_the_default() {
        let load = |n: &str| {
            let (c, k) = generated(&[n]);
            TlsCertificate::from_pem(c.as_bytes(), k.as_bytes()).unwrap()
        };
        let (a, b, d) = (load("a.example"), load("b.example"), load("default"));
        let mut set = CertificateSet::new();
        assert!(set.choose(Some("a.example")).is_none(), "an empty set has nothing");
        set.insert_host("A.example", a.clone());
        set.insert_host("b.example", b.clone());
        assert!(set.choose(Some("a.example")).unwrap().same_chain(&a));
        assert!(set.choose(Some("B.EXAMPLE")).unwrap().same_chain(&b));
        assert!(set.choose(Some("c.example")).is_none(), "no default: no certificate");
        assert!(set.choose(None).is_none());
        set.set_default(d.clone());
        assert!(set.choose(Some("c.example")).unwrap().same_chain(&d));
        assert!(set.choose(None).unwrap().same_chain(&d));
        assert!(set.choose(Some("a.example")).unwrap().same_chain(&a));
    }
}
