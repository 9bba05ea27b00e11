//! labsync's domain: the pure model of a lab inventory.
//!
//! What lives here: identifiers that parse instead of validate ([`WorkerId`],
//! [`LabId`]), the lab state as CML reports it ([`LabState`]), and, as the core
//! grows, lab records, the reconcile plan and their history.
//!
//! What it may depend on: nothing but `serde` and `thiserror`. No I/O, no async
//! runtime, no database or HTTP types: every other crate depends on this one,
//! and it depends on none of them.

mod ids;
mod state;

pub use ids::{IdError, LabId, WorkerId};
pub use state::LabState;
