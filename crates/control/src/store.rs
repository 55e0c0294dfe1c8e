//! The state store: services, releases, deployments and their history in SQLite.
