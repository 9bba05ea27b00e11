//! The `labsync` binary crate: the command line and the wiring of adapters
//! into use cases. It holds no behaviour of its own; integration tests use
//! [`wiring::App`] to run the same code the binary runs.
//!
//! May depend on every labsync crate; nothing depends on it.

pub mod cli;
pub mod gauges;
pub mod http;
pub mod service;
pub mod wiring;
