//! labsync's application layer: the use cases (DeleteLab, RefreshWorkerLabs,
//! RefreshAll), the ports they drive (CML gateway, repositories, lease, audit,
//! clock) and the scheduling policy.
//!
//! What it may depend on: `labsync-domain`, and runtime-neutral crates
//! (async-trait, futures, tracing). Never on MongoDB, HTTP or web-framework
//! types: adapters in `labsync-infrastructure` implement the ports defined here.

pub use labsync_domain as domain;
