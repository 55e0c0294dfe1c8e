//! cutover's data plane: an HTTP reverse proxy that routes each service to its live colour
//! (blue or green) and switches colours atomically, with draining of the old colour.
//!
//! The control plane builds [`RouteTable`]s and hands them to a running [`Proxy`]; the proxy
//! never reads files or talks to the state store.

#![forbid(unsafe_code)]

mod body;
mod config;
mod deadline;
mod error;
mod h1;
mod handler;
mod headers;
mod pass;
mod server;
mod stats;
mod table;
mod tunnel;
mod upstream;

pub use body::{BodyError, ProxyBody};
pub use config::{ListenerConfig, ProxyConfig};
pub use error::{ProxyError, TableError};
pub use headers::X_CUTOVER_PREVIEW;
pub use server::{DrainReport, Proxy, StartError};
pub use stats::{StatsSnapshot, LATENCY_BOUNDS_US};
pub use table::{Balance, Colour, Generation, Instance, Pool, RouteTable, Service};
