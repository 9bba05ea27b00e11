//! The stored record of one lab on one worker, and its history.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{Actor, ContentHash, FieldChange, LabId, LabSnapshot, LabState, WorkerId};

/// A lab as labsync knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabRecord {
    pub worker_id: WorkerId,
    pub lab_id: LabId,
    pub snapshot: LabSnapshot,
    pub first_seen_at: DateTime<Utc>,
    /// When a refresh last wrote this record. A refresh that finds the lab
    /// unchanged does not write; the worker's last complete refresh says
    /// when every record was last confirmed.
    pub last_seen_at: DateTime<Utc>,
    pub last_changed_at: DateTime<Utc>,
    /// 1 on creation, +1 on every change of the snapshot.
    pub revision: u64,
    pub content_hash: ContentHash,
    /// Real changes and delete attempts, oldest first, at most
    /// `refresh.history_limit` of them.
    pub history: Vec<HistoryEntry>,
}

/// One thing that happened to a lab.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub at: DateTime<Utc>,
    #[serde(flatten)]
    pub event: HistoryEvent,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum HistoryEvent {
    /// First seen by a refresh.
    Created { state: LabState },
    /// Fields changed in CML; a state transition is a change of `state`.
    Changed { changes: Vec<FieldChange> },
    /// A delete through labsync that did not remove the lab.
    DeleteAttempt {
        requested_by: Actor,
        force: bool,
        outcome: String,
        detail: String,
    },
}

impl LabRecord {
    /// The record a refresh creates for a lab it sees for the first time.
    pub fn discovered(
        worker_id: WorkerId,
        lab_id: LabId,
        snapshot: LabSnapshot,
        now: DateTime<Utc>,
    ) -> Self {
        let content_hash = snapshot.content_hash();
        let history = vec![HistoryEntry {
            at: now,
            event: HistoryEvent::Created {
                state: snapshot.state.clone(),
            },
        }];
        Self {
            worker_id,
            lab_id,
            snapshot,
            first_seen_at: now,
            last_seen_at: now,
            last_changed_at: now,
            revision: 1,
            content_hash,
            history,
        }
    }

    /// Applies a changed snapshot: bumps the revision and records which
    /// fields changed. Returns the history entry added, or `None` (and
    /// changes nothing but a stale content hash) when the snapshot is the
    /// same.
    pub fn apply_change(
        &mut self,
        snapshot: LabSnapshot,
        now: DateTime<Utc>,
        history_limit: usize,
    ) -> Option<HistoryEntry> {
        let changes = snapshot.changes_from(&self.snapshot);
        if changes.is_empty() {
            // Same content under a hash from another encoding: adopt the
            // current hash so the lab stops looking changed.
            self.content_hash = snapshot.content_hash();
            return None;
        }
        let entry = HistoryEntry {
            at: now,
            event: HistoryEvent::Changed { changes },
        };
        self.content_hash = snapshot.content_hash();
        self.snapshot = snapshot;
        self.revision += 1;
        self.last_changed_at = now;
        self.last_seen_at = now;
        self.push_history(entry.clone(), history_limit);
        Some(entry)
    }

    /// Appends to the ring buffer, dropping the oldest entries past `limit`.
    pub fn push_history(&mut self, entry: HistoryEntry, limit: usize) {
        self.history.push(entry);
        let excess = self.history.len().saturating_sub(limit);
        self.history.drain(..excess);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::tests::snapshot;

    fn ids() -> (WorkerId, LabId) {
        (
            WorkerId::parse("cml-1").unwrap(),
            LabId::parse("a6a334de-b497-47ae-bbff-44a83f890114").unwrap(),
        )
    }

    #[test]
    fn a_discovered_lab_starts_at_revision_1_with_a_created_entry() {
        let (w, l) = ids();
        let now = Utc::now();
        let r = LabRecord::discovered(w, l, snapshot("x"), now);
        assert_eq!(r.revision, 1);
        assert_eq!(r.content_hash, snapshot("x").content_hash());
        assert!(matches!(
            r.history[..],
            [HistoryEntry {
                event: HistoryEvent::Created { .. },
                ..
            }]
        ));
    }

    #[test]
    fn an_unchanged_snapshot_changes_nothing() {
        let (w, l) = ids();
        let t0 = Utc::now();
        let mut r = LabRecord::discovered(w, l, snapshot("x"), t0);
        let before = r.clone();
        assert!(
            r.apply_change(snapshot("x"), t0 + chrono::Duration::hours(1), 50)
                .is_none()
        );
        assert_eq!(r, before);
    }

    #[test]
    fn a_change_bumps_the_revision_and_names_the_fields() {
        let (w, l) = ids();
        let t0 = Utc::now();
        let t1 = t0 + chrono::Duration::hours(1);
        let mut r = LabRecord::discovered(w, l, snapshot("x"), t0);
        let mut s = snapshot("y");
        s.node_count = 9;
        let entry = r.apply_change(s.clone(), t1, 50).expect("changed");
        let HistoryEvent::Changed { changes } = entry.event else {
            panic!("not a change")
        };
        let fields: Vec<&str> = changes.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(fields, ["title", "node_count"]);
        assert_eq!(
            (r.revision, r.last_changed_at, r.first_seen_at),
            (2, t1, t0)
        );
        assert_eq!(r.content_hash, s.content_hash());
        assert_eq!(r.history.len(), 2);
    }

    #[test]
    fn history_is_a_ring_buffer() {
        let (w, l) = ids();
        let t0 = Utc::now();
        let mut r = LabRecord::discovered(w, l, snapshot("x"), t0);
        for i in 0..60u64 {
            let mut s = snapshot("x");
            s.node_count = i + 100;
            r.apply_change(s, t0, 50);
        }
        assert_eq!(r.history.len(), 50);
        assert_eq!(r.revision, 61);
        let HistoryEvent::Changed { changes } = &r.history[49].event else {
            panic!()
        };
        assert_eq!(changes[0].new, "159");
    }
}
