//! labsync's infrastructure: everything that touches the outside world.
//!
//! What lives here: configuration ([`configuration`]), logging
//! ([`telemetry`]), the MongoDB connection ([`mongo`]) and, as the core grows,
//! the MongoDB repositories, the CML HTTP client and the scheduler, each an
//! adapter for a port of `labsync-application`.
//!
//! What it may depend on: `labsync-application`, `labsync-domain` and any I/O
//! crate. Only the `labsync` binary depends on it.

pub mod configuration;
pub mod mongo;
pub mod telemetry;
