//! cutover's data plane: an HTTP reverse proxy that routes each service to its live colour
//! (blue or green) and switches colours atomically, with draining of the old colour.
//!
//! The control plane builds [`RouteTable`]s and hands them to a running [`Proxy`]; the proxy
//! never reads files or talks to the state store.

#![forbid(unsafe_code)]

pub mod affinity;
mod body;
mod clock;
mod config;
mod conn;
mod deadline;
mod drain;
mod error;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod h1;
mod h2;
mod handler;
mod headers;
#[cfg(feature = "hyper-upstream")]
mod hyper_upstream;
mod limits;
mod listen;
mod mirror;
mod pass;
mod preempt;
mod proxy;
mod proxy_protocol;
mod shared;
mod stats;
mod table;
mod tls;
mod tunnel;
mod upstream;
mod upstream_io;
mod upstream_tls;
mod worker;

pub use affinity::{Affinity, AffinitySnapshot, Pin};
pub use body::{BodyError, ProxyBody};
pub use config::{Cidr, ListenerConfig, ProxyConfig};
pub use drain::DrainReport;
pub use error::{ProxyError, TableError};
pub use headers::X_CUTOVER_PREVIEW;
pub use mirror::{Mirror, MirrorReport, MirrorTotals, X_CUTOVER_MIRROR};
pub use proxy::{Proxy, StartError, TlsSetupError};
pub use stats::{StatsSnapshot, LATENCY_BOUNDS_US};
pub use table::{
    Balance, Colour, Generation, Hold, Instance, MaintenancePage, PauseGate, Pool, RouteTable, Service, Split,
};
pub use tls::{
    admin_server_config, close_after, provider as tls_provider, CertificateError, CertificateFile, CertificateSet,
    CertificateSlot, TlsCertificate, TLS_HANDSHAKE_RECORD,
};
pub use upstream_tls::{
    check_server_name, client_config as tls_client_config, name_text as server_name_text, UpstreamTls, UpstreamTlsError,
};

/// Whether a socket error is this host's own shortage (file descriptors, memory, buffers, local
/// ports) rather than anything the peer did. Such a failure says nothing about the peer: the
/// proxy never ejects an instance for it, and a health check that meets one judges nothing.
pub fn is_local_error(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(nix::libc::EMFILE | nix::libc::ENFILE | nix::libc::ENOBUFS | nix::libc::ENOMEM | nix::libc::EADDRNOTAVAIL)
    )
}
