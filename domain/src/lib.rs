//! labsync's domain: the pure model of a lab inventory.
//!
//! What lives here: who asked ([`Actor`]), identifiers that parse instead of validate ([`WorkerId`],
//! [`LabId`]), the lab state as CML reports it ([`LabState`]), what CML says
//! about a lab ([`LabSnapshot`]), the stored [`LabRecord`] and its history,
//! registered [`Worker`]s, the reconcile [`plan`] of a refresh, and which
//! characters of outside text are invisible ([`text`]).
//!
//! What it may depend on: `serde`, `chrono`, `thiserror` and `url` (to parse
//! a worker's URL as the HTTP client will). No I/O, no async
//! runtime, no database or HTTP types: every other crate depends on this one,
//! and it depends on none of them.

mod actor;
mod ids;
mod plan;
mod record;
mod snapshot;
mod state;
pub mod text;
mod worker;

pub use actor::{Actor, MAX_ACTOR_NAME};
pub use ids::{IdError, LabId, WorkerId, is_uuid4};
pub use plan::{Detail, Existing, Fetched, HoldReason, PrunePolicy, ReconcilePlan, plan};
pub use record::{HistoryEntry, HistoryEvent, LabRecord};
pub use snapshot::{
    ContentHash, FieldChange, LabField, LabGroup, LabSnapshot, MAX_CHANGE_TEXT, excerpt,
};
pub use state::LabState;
pub use worker::{BaseUrl, CertificateTrust, TlsSettings, Worker, WorkerChanges};
