//! TLS to a service's upstreams (`upstream_tls = { ca, server_name }`): the client settings every
//! connection to the service's instances is made with, and the handshake.
//!
//! The control plane reads the CA bundle and hands the proxy an [`UpstreamTls`] inside the
//! service's route-table entry; the proxy never reads the file. The same value makes the control
//! plane's own connections to the instances (health checks), so that both sides verify the same
//! certificates by the same rules.
//!
//! Each value has an id of its own, which tags every pooled connection made with it: a pooled
//! connection is handed out only to a request whose service has the same settings (none for a
//! plain connection). Connections made under other settings, plain ones for a service that
//! now speaks TLS or TLS ones after the CA changed, are never reused.
//!
//! What is verified: the upstream's chain against the CA bundle alone (no system roots), for the
//! configured `server_name`, or for the instance's IP address when none is set (the certificate
//! then needs that IP in its subjectAltName). TLS 1.3 and 1.2, rustls' safe default suites (ring),
//! ALPN `http/1.1`. There is no way to skip verification.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// Ids of [`UpstreamTls`] values; 0 stands for plain connections.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// How the proxy (and the health checks) speak TLS to one service's instances.
pub struct UpstreamTls {
    /// Unique for the life of the process, never 0: tags the pooled connections made with these
    /// settings (see the module documentation).
    id: u64,
    connector: tokio_rustls::TlsConnector,
    /// `None`: each instance is verified for its own IP address.
    server_name: Option<ServerName<'static>>,
    /// Where the CA bundle came from (its file), for the reasons of failed handshakes.
    ca_origin: Arc<str>,
}

impl fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("id", &self.id)
            .field("server_name", &self.server_name)
            .field("ca", &self.ca_origin)
            .finish()
    }
}

/// Two values are equal when they are the same settings (one load of one CA bundle).
impl PartialEq for UpstreamTls {
    fn eq(&self, other: &UpstreamTls) -> bool {
        self.id == other.id
    }
}

/// Why a CA bundle or a server name cannot be used. Display is a sentence without the file name,
/// which the caller adds.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UpstreamTlsError {
    #[error("holds no certificate; it must be PEM with one or more \"-----BEGIN CERTIFICATE-----\" blocks: the CA (or CAs) that issued the upstreams' certificates")]
    NoCertificate,
    #[error("is not valid PEM ({0}); it must hold \"-----BEGIN CERTIFICATE-----\" blocks of the CA that issued the upstreams' certificates")]
    Pem(String),
    #[error("holds a certificate that cannot be a trust anchor ({0}); use the CA certificate (PEM) that issued the upstreams' certificates")]
    BadCertificate(String),
    #[error("{0:?} is neither a DNS name nor an IP address; write the name the upstreams' certificates are issued for, e.g. \"api.internal\"")]
    BadServerName(String),
}

/// Whether `name` can be a `server_name`: a DNS name or an IP address.
pub fn check_server_name(name: &str) -> Result<(), UpstreamTlsError> {
    parse_server_name(name).map(|_| ())
}

fn parse_server_name(name: &str) -> Result<ServerName<'static>, UpstreamTlsError> {
    if name.is_empty() || name.trim() != name {
        return Err(UpstreamTlsError::BadServerName(name.to_string()));
    }
    ServerName::try_from(name.to_string()).map_err(|_| UpstreamTlsError::BadServerName(name.to_string()))
}

const ALPN_HTTP11: &[u8] = b"http/1.1";

/// Client settings that trust only the certificates of `ca_pem` (one or more PEM certificates):
/// TLS 1.3 and 1.2 with the proxy's provider, ALPN http/1.1, no client certificate.
pub fn client_config(ca_pem: &[u8]) -> Result<Arc<rustls::ClientConfig>, UpstreamTlsError> {
    let certs = CertificateDer::pem_slice_iter(ca_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| UpstreamTlsError::Pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(UpstreamTlsError::NoCertificate);
    }
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs {
        roots
            .add(cert)
            .map_err(|e| UpstreamTlsError::BadCertificate(e.to_string()))?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        // The provider is ring's, which supports both versions: cannot fail.
        .map_err(|e| UpstreamTlsError::BadCertificate(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    Ok(Arc::new(config))
}

/// A server name as people write it: the DNS name or the IP address.
pub fn name_text(name: &ServerName<'_>) -> String {
    match name {
        ServerName::DnsName(n) => n.as_ref().to_string(),
        ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
        other => format!("{other:?}"),
    }
}

impl UpstreamTls {
    /// Settings that trust the certificates of `ca_pem` (one or more PEM certificates) and
    /// verify upstreams for `server_name`, or for each instance's IP address when `None`.
    /// `ca_origin` names where the bundle came from (its file) in handshake failures.
    pub fn new(ca_pem: &[u8], ca_origin: &str, server_name: Option<&str>) -> Result<UpstreamTls, UpstreamTlsError> {
        let server_name = server_name.map(parse_server_name).transpose()?;
        let config = client_config(ca_pem)?;
        Ok(UpstreamTls {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            connector: tokio_rustls::TlsConnector::from(config),
            server_name,
            ca_origin: Arc::from(ca_origin),
        })
    }

    /// The tag of connections made with these settings (never 0, which is plain).
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// The name an instance at `addr` is verified for (and, when a DNS name, sent as SNI).
    pub fn server_name_for(&self, addr: SocketAddr) -> ServerName<'static> {
        match &self.server_name {
            Some(name) => name.clone(),
            None => ServerName::IpAddress(addr.ip().into()),
        }
    }

    /// The TLS handshake on `tcp`, a fresh connection to the instance at `addr`. Not timed here:
    /// the caller bounds it. The error is a sentence naming the name verified and what rustls
    /// said, with a hint where the cause is a usual one; the caller adds the address.
    pub async fn handshake(&self, tcp: TcpStream, addr: SocketAddr) -> Result<TlsStream<TcpStream>, String> {
        let name = self.server_name_for(addr);
        self.connector
            .connect(name.clone(), tcp)
            .await
            .map_err(|e| self.failure(&name, &e))
    }

    fn failure(&self, name: &ServerName<'_>, e: &io::Error) -> String {
        let name = name_text(name);
        let rustls_error = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>());
        // `BadSignature`: an issuer of the same name is in the bundle, but it did not sign this
        // certificate (another CA that happens to have the same name).
        #[allow(deprecated)]
        let hint = match rustls_error {
            Some(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer | rustls::CertificateError::BadSignature,
            )) => format!(" (the certificate is not issued by a CA in {})", self.ca_origin),
            Some(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName | rustls::CertificateError::NotValidForNameContext { .. },
            )) => " (set upstream_tls.server_name to a name the certificate holds)".to_string(),
            Some(rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType)) => {
                " (the upstream does not speak TLS; is it plain HTTP?)".to_string()
            }
            None if e.kind() == io::ErrorKind::UnexpectedEof => {
                " (the upstream closed the connection in the handshake; does it speak TLS?)".to_string()
            }
            _ => String::new(),
        };
        let what = match rustls_error {
            Some(r) => r.to_string(),
            None => e.to_string(),
        };
        format!("TLS handshake (server name {name}) failed: {what}{hint}")
    }
}

/// For tests: a TLS server configuration for `name` with a self-signed certificate, and that
/// certificate in PEM (the CA a client of it trusts).
#[cfg(test)]
pub(crate) fn self_signed_server(name: &str) -> (std::sync::Arc<rustls::ServerConfig>, String) {
    use rustls::pki_types::pem::PemObject;
    let c = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(c.signing_key.serialize_pem().as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![c.cert.der().clone()], key)
        .unwrap();
    (std::sync::Arc::new(config), c.cert.pem())
}
