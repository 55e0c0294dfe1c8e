//! The CLI's side of the admin API: finds the endpoint from the config file, sends requests over
//! the unix socket (or TCP with the token), and reads the event stream.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context as _};
use bytes::Bytes;
use cutover_control::config::{Admin, Config};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;

/// A failure that maps to an exit code: 1 for a deployment that did not go live, 2 for a usage,
/// configuration or connection problem.
#[derive(Debug)]
pub struct Exit {
    pub code: u8,
    pub message: String,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Exit {}

pub fn usage(message: impl Into<String>) -> anyhow::Error {
    anyhow!(Exit {
        code: 2,
        message: message.into()
    })
}

/// Attached to the error of a command that found no daemon at the admin endpoint, so that a
/// command able to do without one (`history`) or to wait for one (`deploy`) can tell it apart.
#[derive(Debug)]
pub struct Unreachable;

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("no cutover daemon answers")
    }
}

/// The daemon could not be reached at all (nothing was sent).
pub fn is_unreachable(e: &anyhow::Error) -> bool {
    e.downcast_ref::<Unreachable>().is_some()
}

enum Endpoint {
    Unix(PathBuf),
    Tcp(SocketAddr),
    /// TCP with TLS (`server.admin_tls`): the settings trust the configured certificates, and
    /// the daemon's certificate must name `ServerName`.
    Tls(SocketAddr, tokio_rustls::TlsConnector, ServerName<'static>),
}

/// TLS settings that trust what `admin_tls` names, and the name the daemon's certificate must
/// carry. Errors name the file and what to do.
fn tls_client(
    tls: &cutover_control::config::AdminTls,
    admin: SocketAddr,
) -> Result<(tokio_rustls::TlsConnector, ServerName<'static>), String> {
    use cutover_proxy::UpstreamTlsError;
    let file = tls.trusted();
    let key = if tls.ca.is_some() {
        "admin_tls.ca"
    } else {
        "admin_tls.cert"
    };
    let pem = std::fs::read(file).map_err(|e| {
        format!(
            "cannot read {} ({key}), the certificates the CLI trusts for the admin API: {e}; check the path (relative to the config file)",
            file.display()
        )
    })?;
    let config = cutover_proxy::tls_client_config(&pem).map_err(|e| match e {
        UpstreamTlsError::NoCertificate => format!(
            "{} ({key}) holds no certificate; give the PEM certificate of the admin API or of its issuer",
            file.display()
        ),
        UpstreamTlsError::Pem(e) => format!("{} ({key}) is not a PEM certificate file: {e}", file.display()),
        UpstreamTlsError::BadCertificate(e) | UpstreamTlsError::BadServerName(e) => format!(
            "{} ({key}) holds a certificate that cannot be trusted: {e}",
            file.display()
        ),
    })?;
    let name = match &tls.server_name {
        Some(n) => ServerName::try_from(n.clone()).map_err(|e| format!("admin_tls.server_name {n:?}: {e}"))?,
        // An address that means "every interface" names no certificate.
        None if admin.ip().is_unspecified() => {
            return Err(format!(
                "admin = \"{admin}\" listens on every address, so the CLI cannot check the daemon's certificate \
                 against it: set admin_tls.server_name to a name or address the certificate holds (and reach the \
                 daemon through it)"
            ))
        }
        None => ServerName::IpAddress(admin.ip().into()),
    };
    Ok((tokio_rustls::TlsConnector::from(config), name))
}

/// The config file a command was given, or `./cutover.toml`.
pub fn config_path(config: Option<&Path>) -> PathBuf {
    config
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("cutover.toml"))
}

/// Reads and checks the config file; whatever is wrong with it is a usage error (exit 2).
pub fn load_config(path: &Path) -> anyhow::Result<Config> {
    Config::load(path).map_err(|e| usage(e.to_string()))
}

pub struct Client {
    endpoint: Endpoint,
    token: Option<String>,
}

impl Client {
    /// Reads `config` (or `./cutover.toml`) to find the admin endpoint.
    pub fn from_config(config: Option<&Path>) -> anyhow::Result<Client> {
        let path = config_path(config);
        if !path.exists() {
            return Err(usage(format!(
                "{} not found: run this next to your cutover.toml or pass -c FILE",
                path.display()
            )));
        }
        let config = load_config(&path)?;
        let (endpoint, token) = match &config.server.admin {
            Admin::Unix(p) => (Endpoint::Unix(p.clone()), None),
            Admin::Tcp(a) => {
                let file = config
                    .server
                    .token_file
                    .clone()
                    .ok_or_else(|| usage("admin is TCP but token_file is not set"))?;
                let token = cutover_control::token_file::read_token_file(&file)
                    .map_err(|e| usage(format!("{}: {e}", path.display())))?;
                let endpoint = match &config.server.admin_tls {
                    None => Endpoint::Tcp(*a),
                    Some(tls) => {
                        let (connector, name) =
                            tls_client(tls, *a).map_err(|e| usage(format!("{}: {e}", path.display())))?;
                        Endpoint::Tls(*a, connector, name)
                    }
                };
                (endpoint, Some(token))
            }
        };
        Ok(Client { endpoint, token })
    }

    /// Where the daemon is expected: the socket path or the TCP address.
    pub fn where_(&self) -> String {
        match &self.endpoint {
            Endpoint::Unix(p) => p.display().to_string(),
            Endpoint::Tcp(a) => a.to_string(),
            Endpoint::Tls(a, ..) => format!("https://{a}"),
        }
    }

    async fn connect(&self) -> anyhow::Result<SendRequest<Full<Bytes>>> {
        let unreachable = |e: std::io::Error| {
            usage(format!(
                "cannot reach the cutover daemon at {} ({e}): is `cutover serve` running?",
                self.where_()
            ))
            .context(Unreachable)
        };
        macro_rules! handshake {
            ($stream:expr) => {{
                let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new($stream)).await?;
                tokio::spawn(conn);
                tx
            }};
        }
        Ok(match &self.endpoint {
            Endpoint::Unix(p) => handshake!(tokio::net::UnixStream::connect(p).await.map_err(unreachable)?),
            Endpoint::Tcp(a) => handshake!(tokio::net::TcpStream::connect(a).await.map_err(unreachable)?),
            Endpoint::Tls(a, connector, name) => {
                let tcp = tokio::net::TcpStream::connect(a).await.map_err(unreachable)?;
                let tls = connector.connect(name.clone(), tcp).await.map_err(|e| {
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
                    ) {
                        return usage(format!(
                            "the cutover daemon at {a} closed the connection during the TLS handshake ({e}); nothing \
                             was sent. It may be busy (too many admin connections) or restarting: try again"
                        ));
                    }
                    if e.to_string().contains("InvalidContentType") {
                        return usage(format!(
                            "the cutover daemon at {a} does not answer in TLS ({e}); nothing was sent. Its config \
                             has no [server] admin_tls, or another program listens there"
                        ));
                    }
                    usage(format!(
                        "the TLS handshake with the cutover daemon at {a} failed ({e}); nothing was sent. Check that \
                         the certificates in [server] admin_tls.ca (default: admin_tls.cert) are the daemon's or \
                         its issuer's, and that its certificate names {}",
                        cutover_proxy::server_name_text(name)
                    ))
                })?;
                handshake!(tls)
            }
        })
    }

    fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<Request<Full<Bytes>>> {
        let mut b = Request::builder().method(method).uri(path).header("host", "cutover");
        if let Some(t) = &self.token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        let body = match body {
            Some(v) => {
                b = b.header("content-type", "application/json");
                Bytes::from(serde_json::to_vec(&v)?)
            }
            None => Bytes::new(),
        };
        Ok(b.body(Full::new(body))?)
    }

    /// Sends one request; a non-2xx answer becomes an error carrying the daemon's message.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<serde_json::Value> {
        let mut tx = self.connect().await?;
        let resp = tx
            .send_request(self.request(method, path, body)?)
            .await
            .context("admin request failed")?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        if status.is_success() {
            return Ok(value);
        }
        // The daemon's JSON error, else a plain-text answer (the TLS admin port's to a plain
        // request), else the status.
        let text = String::from_utf8_lossy(&bytes);
        let message = value
            .get("error")
            .and_then(|e| e.as_str())
            .map(str::to_string)
            .or_else(|| {
                (!text.trim().is_empty())
                    .then(|| format!("{status}: {}", text.trim().chars().take(500).collect::<String>()))
            })
            .unwrap_or_else(|| format!("{status}"));
        // Refusals (409, 400, 404, 401) are usage errors: nothing changed. A 502 says the daemon
        // tried and something it started failed (a new daemon, for `cutover upgrade`).
        let code = if status == StatusCode::INTERNAL_SERVER_ERROR || status == StatusCode::BAD_GATEWAY {
            1
        } else {
            2
        };
        Err(anyhow!(Exit { code, message }))
    }

    /// Opens the event stream; call before the request whose events you want to follow.
    pub async fn events(&self) -> anyhow::Result<Events> {
        let mut tx = self.connect().await?;
        let resp = tx.send_request(self.request(Method::GET, "/v1/events", None)?).await?;
        if !resp.status().is_success() {
            return Err(usage(format!("the event stream answered {}", resp.status())));
        }
        Ok(Events {
            body: resp.into_body(),
            buf: Vec::new(),
        })
    }
}

/// Server-sent events, parsed into JSON values.
pub struct Events {
    body: hyper::body::Incoming,
    buf: Vec<u8>,
}

impl Events {
    /// The next event's data, or `None` when the daemon closed the stream.
    pub async fn next(&mut self) -> anyhow::Result<Option<serde_json::Value>> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buf.drain(..end + 2).collect();
                let text = String::from_utf8_lossy(&block);
                let data: String = text
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(str::trim_start)
                    .collect();
                if data.is_empty() {
                    continue; // keep-alive comment
                }
                match serde_json::from_str(&data) {
                    Ok(v) => return Ok(Some(v)),
                    Err(_) => continue,
                }
            }
            match self.body.frame().await {
                None => return Ok(None),
                Some(frame) => {
                    if let Ok(data) = frame?.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}
