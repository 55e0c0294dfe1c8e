//! Test harnesses shared by the crates' tests: compiled into this crate's unit tests, and for
//! other crates' tests with the `testing` feature (`cutover-control = { features = ["testing"] }`
//! in their dev-dependencies). Not part of cutover itself; these panic on failure, as tests do.

pub mod etcd;
pub mod postgres;
