//! The configuration file (`cutover.toml`).
