//! Integration tests of the core: the refresh and the two-phase delete,
//! through the real adapters, against the MongoDB-wire test server and the
//! CML simulator over HTTP.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test that cannot go on fails at once, saying where"
)]

mod admin_cli;
mod api;
mod cli;
mod console;
mod crash;
mod delete;
mod edges;
mod events;
mod faults;
mod helpers;
mod hostile;
mod hostile_cml;
mod live;
mod model;
mod oidc;
mod openapi;
mod operations;
mod outage;
mod people;
mod queue;
mod refresh;
mod replicas;
mod serve;
mod tls;
mod tokens;
mod trust;
