//! cutover's control plane: everything that decides. It reads the configuration, runs the
//! deployment lifecycle of each service, and produces the route tables the data plane switches to.

#![forbid(unsafe_code)]

pub mod api;
pub mod config;
pub mod daemon;
pub mod events;
pub mod exposition;
pub mod fleet;
pub mod health;
pub mod lifecycle;
pub mod metrics;
mod oneshot;
mod panics;
pub mod private_dir;
pub mod process;
pub mod schema_lint;
pub mod store;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod tls;
pub mod token_file;
pub mod token_limiter;
pub mod webhooks;
mod wire;
