//! Active health checks of upstream instances.
