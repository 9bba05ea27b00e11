//! labsync's application layer: the use cases ([`DeleteLab`],
//! [`RefreshWorkerLabs`] and [`RefreshAll`], one reconciler for the schedule,
//! the admin and the CLI; the [`DeleteQueue`]; the [`Inventory`]), the pure
//! steps of a refresh ([`reconcile`]), the connection check of a worker's
//! settings ([`connection`]), the retry policy of background work
//! ([`retry`]), and the ports they drive ([`ports`]: CML gateway,
//! repositories, refresh lease, audit log, run reports, health, clock).
//!
//! What it may depend on: `labsync-domain`, and runtime-level crates (tokio
//! for time, futures, async-trait, tracing, secrecy). Never on MongoDB, HTTP
//! or web-framework types: adapters in `labsync-infrastructure` implement the
//! ports defined here, and the binary wires them together.

pub mod connection;
pub mod crash;
pub mod delete;
pub mod delete_queue;
pub mod errors;
pub mod events;
pub mod inventory;
pub mod lease;
pub mod ports;
pub mod reconcile;
pub mod refresh;
pub mod retry;
mod services;

#[cfg(test)]
mod fakes;

pub use delete::{DeleteEnd, DeleteLab, DeleteOutcome, DeleteOutcomeKind};
pub use delete_queue::{
    CancelError, DeleteQueue, DeleteQueueSettings, DeleteRequest, DeleteRequestStatus,
    DeleteRequests, QueueStats,
};
pub use errors::{AppError, CmlError, RepoError};
pub use events::{EventData, LabEvent, LabEventKind, NoObserver, Observer};
pub use inventory::{
    AuditPage, FleetLabPage, Inventory, LabDetail, LabPage, SyncState, WorkerOverview,
};
pub use refresh::{
    LabFailure, RefreshAll, RefreshOptions, RefreshWorkerLabs, RunReport, RunStatus, SkipReason,
    Trigger,
};
pub use services::{CoreSettings, Services};

pub use labsync_domain as domain;
