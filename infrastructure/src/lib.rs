//! labsync's infrastructure: everything that touches the outside world.
//!
//! What lives here: configuration ([`configuration`]), logging
//! ([`telemetry`]), the MongoDB connection and repositories ([`mongo`]), the
//! CML HTTP client ([`cml`]), password encryption ([`crypto`]) and the
//! refresh schedule ([`scheduler`]); each adapter implements a port of
//! `labsync-application`.
//!
//! What it may depend on: `labsync-application`, `labsync-domain` and any I/O
//! crate. Only the `labsync` binary depends on it.

pub mod cml;
pub mod configuration;
pub mod crypto;
pub mod metrics;
pub mod mongo;
pub mod oidc;
pub mod scheduler;
pub mod telemetry;
