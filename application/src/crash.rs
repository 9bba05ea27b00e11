//! Named crash points, for the crash tests.
//!
//! A crash test must kill labsync at the moments its guarantees are about
//! (after CML acted and before MongoDB was written, between a write's
//! events and its records, between two batches of writes), not wherever a
//! signal happens to land. Each such moment calls [`point`] with its name;
//! in a test build (feature `crash-points`, enabled only by the root
//! package's dev-dependency) the process aborts there when the environment
//! variable `LABSYNC_CRASH_AT` names it (`NAME`, or `NAME#N` for its Nth
//! hit). In every other build [`point`] is empty.

/// The environment variable naming the crash point.
pub const CRASH_AT_ENV: &str = "LABSYNC_CRASH_AT";

/// What a process prints to stderr just before it aborts at a crash point,
/// so that a test can tell a landed crash from any other death.
pub const CRASH_MARKER: &str = "labsync: crash point reached: ";

/// Every crash point, by name.
pub mod points {
    /// CML deleted the lab; nothing is written to MongoDB yet.
    pub const DELETE_AFTER_CML: &str = "delete.after_cml_delete";
    /// The delete's event and audit entry are written; the record is not
    /// yet a tombstone.
    pub const DELETE_BEFORE_TOMBSTONE: &str = "delete.after_events_before_tombstone";
    /// The refresh has fetched everything from CML and written nothing.
    pub const REFRESH_AFTER_FETCH: &str = "refresh.after_fetch";
    /// The refresh's events are in the outbox; no record is written yet.
    pub const REFRESH_AFTER_EVENTS: &str = "refresh.after_events_before_records";
    /// New records are inserted; updates and prunes are not written yet.
    pub const REFRESH_BETWEEN_BATCHES: &str = "refresh.after_creates_before_updates";
    /// Records are written and pruned; their events are still staged.
    pub const REFRESH_BEFORE_RELEASE: &str = "refresh.after_records_before_release";
    /// Records are written and pruned; the prunes' audit entries are not.
    pub const REFRESH_BEFORE_PRUNE_AUDIT: &str = "refresh.before_prune_audit";
}

/// Aborts the process if this is the crash point `LABSYNC_CRASH_AT` names
/// (test builds only).
#[inline]
pub fn point(name: &'static str) {
    #[cfg(feature = "crash-points")]
    imp::hit(name);
    #[cfg(not(feature = "crash-points"))]
    let _ = name;
}

#[cfg(feature = "crash-points")]
mod imp {
    use std::sync::atomic::{AtomicU32, Ordering};

    static HITS: AtomicU32 = AtomicU32::new(0);

    pub fn hit(name: &'static str) {
        let Ok(target) = std::env::var(super::CRASH_AT_ENV) else {
            return;
        };
        let (wanted, nth) = match target.split_once('#') {
            Some((n, k)) => (n.to_owned(), k.parse::<u32>().unwrap_or(1)),
            None => (target, 1),
        };
        if wanted != name {
            return;
        }
        if HITS.fetch_add(1, Ordering::SeqCst) + 1 == nth {
            eprintln!("{}{name}", super::CRASH_MARKER);
            std::process::abort();
        }
    }
}
