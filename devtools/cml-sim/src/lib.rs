//! `cml-sim`: a simulator of the Cisco Modeling Labs 2.x REST API, for
//! labsync's integration tests, benchmarks and local demo.
//!
//! What lives here: one HTTP listener (HTTPS on request, with a generated
//! CA) per simulated CML server ("worker"), each answering the subset of
//! `/api/v0` that labsync uses, in the shapes of the official CML 2.9
//! OpenAPI document and of responses recorded from real servers
//! (`shared/reference/`), field for field; deterministic seeded labs and
//! users; and a control API under `/_sim/` to change labs behind a client's
//! back and to inject faults (latency, 500s, 502 while booting, hangs,
//! truncated or mistyped JSON, empty lists, token expiry).
//!
//! What it may depend on: HTTP, TLS and serialization crates only. It shares
//! no code with labsync on purpose: a simulator that reused labsync's
//! parsing would agree with labsync's bugs.

#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap,
    reason = "a tool's shares, percentiles and delays of small numbers"
)]

mod api;
mod auth;
mod control;
mod faults;
mod model;
mod seed;
mod server;
mod tls;

pub use faults::{Endpoint, Faults};
pub use model::{Lab, LabGroup, LabSpec, SimUser};
pub use server::{SimConfig, Simulator, WorkerHandle, WorkerSpec};

/// CML's lab id pattern, from the spec's `UUID4Type`.
pub const UUID4_PATTERN: &str = r"^[\da-f]{8}-[\da-f]{4}-4[\da-f]{3}-[89ab][\da-f]{3}-[\da-f]{12}$";
