//! Errors of the data plane: what failed, on which side, and what the client is told.

use std::net::SocketAddr;

use http::StatusCode;

/// Why a request could not be answered by an upstream. Each maps to one status code; the body
/// the client receives is the `Display` text, which never contains client input.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// Client side: no service matches the request's host and there is no default service.
    #[error("no service is configured for this host")]
    NoRoute,
    /// Upstream side: nothing was ever deployed to the service (neither colour has an instance);
    /// the answer says how to deploy its first release.
    #[error("service {service} has no release yet: deploy one with `cutover deploy {service} --version VERSION`")]
    NoRelease { service: String },
    /// Upstream side: the chosen colour has no healthy instance.
    #[error("service {service}: no live instance on {colour}")]
    NoInstance { service: String, colour: &'static str },
    /// Upstream side: every usable instance refused or timed out at connect (retryable: nothing
    /// was sent).
    #[error("service {service}: could not connect to any instance (last tried {addr}: {reason})")]
    Connect {
        service: String,
        addr: SocketAddr,
        reason: String,
    },
    /// Proxy side: this host could not open an upstream connection (out of file descriptors,
    /// memory or local ports). No instance is blamed; retryable.
    #[error("service {service}: the proxy could not open an upstream connection ({reason})")]
    Local { service: String, reason: String },
    /// Upstream side: the connection failed after the request was (partly) sent.
    #[error("service {service}: upstream {addr} failed: {reason}")]
    Upstream {
        service: String,
        addr: SocketAddr,
        reason: String,
    },
    /// Upstream side: no response head within the upstream timeout.
    #[error("service {service}: upstream {addr} did not answer in time")]
    Timeout { service: String, addr: SocketAddr },
    /// The colour was drained and this request outlived the drain deadline.
    #[error("service {service}: request cut at the drain deadline of {colour}")]
    DrainDeadline { service: String, colour: &'static str },
    /// The service's live route is paused, and the request waited as long as a pause holds one.
    #[error("service {service} is paused for a moment; try again shortly")]
    Paused { service: String },
    /// Client side: the request cannot be forwarded as it is.
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// Client side: the request asks for something the proxy does not do (CONNECT, a transfer
    /// coding it cannot pass on faithfully).
    #[error("not implemented: {0}")]
    NotImplemented(&'static str),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::NoInstance { .. }
            | ProxyError::NoRelease { .. }
            | ProxyError::Local { .. }
            | ProxyError::Paused { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Connect { .. } | ProxyError::Upstream { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout { .. } | ProxyError::DrainDeadline { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
        }
    }
}

/// Errors in building or changing the route table. They name the thing and what is wrong, and
/// the table they were raised on is left as it was.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TableError {
    #[error("unknown service '{0}'")]
    UnknownService(String),
    #[error("service '{0}' is defined twice")]
    DuplicateService(String),
    #[error("host '{host}' is claimed by both service '{first}' and service '{second}'")]
    DuplicateHost {
        host: String,
        first: String,
        second: String,
    },
    #[error("services '{0}' and '{1}' both have no hosts; only one service can be the default")]
    TwoDefaults(String, String),
    #[error("'{0}' is not a colour: use 'blue' or 'green'")]
    BadColour(String),
    #[error("service '{service}': {colour} is live already; a share of its traffic can only go to the other colour")]
    SplitToLive { service: String, colour: &'static str },
}
