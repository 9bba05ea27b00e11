//! The pure steps of a refresh, between its reads and its writes: what the
//! plan means as record changes and events, what a run counts, what it
//! audits. No I/O here; [`crate::refresh`] reads, calls these in order and
//! writes.
//!
//! # Expected flow
//! 1. [`RunReport::planned`]: the counts the plan already knows.
//! 2. [`record_changes`]: the plan as records, history and typed events.
//! 3. [`RunReport::applied`]: the counts once the store says what it wrote.
//! 4. [`prunes_done`] and [`prune_audit`]: the audit of the prunes that
//!    happened, and only those.
//!
//! # Guarantees
//! - An event is made for each create, each real change (and a
//!   `state_changed` one when the state is among the changed fields) and
//!   each prune; none for an unchanged lab.
//! - A prune the store did not make is neither counted nor audited.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use labsync_domain::{
    Actor, HistoryEntry, HistoryEvent, LabField, LabId, LabRecord, LabSnapshot, ReconcilePlan,
    WorkerId,
};

use crate::events::{EventData, LabEvent};
use crate::ports::{ApplyOutcome, AuditAction, AuditEntry, RecordChanges, RecordUpdate};
use crate::refresh::{LabFailure, RunReport};

/// The per-lab failures a report keeps; the rest are only counted.
pub const MAX_REPORTED_FAILURES: usize = 20;

/// The held prunes a report names; the rest are only counted.
pub const MAX_HELD_SHOWN: usize = 200;

/// Why a prune happened, as its event and audit entry say.
pub const PRUNE_REASON: &str = "gone from CML";

impl RunReport {
    /// The report with the counts the plan knows before anything is
    /// written; a dry run's creates, updates and prunes are what it would
    /// do.
    #[must_use]
    pub fn planned(self, plan: &ReconcilePlan, listed: u64, invalid_ids: u64) -> Self {
        let (created, updated, pruned) = if self.dry_run {
            (
                plan.create.len() as u64,
                plan.update.len() as u64,
                plan.prune.len() as u64,
            )
        } else {
            (0, 0, 0)
        };
        Self {
            listed,
            invalid_ids,
            created,
            updated,
            unchanged: plan.unchanged.len() as u64,
            pruned,
            held: plan.held.len() as u64,
            held_labs: plan.held.iter().take(MAX_HELD_SHOWN).copied().collect(),
            failed: plan.failed.len() as u64,
            suppressed: plan.suppressed.len() as u64,
            hold_reason: plan.hold_reason.as_ref().map(ToString::to_string),
            failures: plan
                .failed
                .iter()
                .take(MAX_REPORTED_FAILURES)
                .map(|(id, e)| LabFailure {
                    lab_id: *id,
                    error: e.clone(),
                })
                .collect(),
            ..self
        }
    }

    /// The report once the store has said what it wrote: a record too
    /// large to store is that lab's failure, and a lab tombstoned since
    /// the plan is suppressed.
    #[must_use]
    pub fn applied(mut self, outcome: &ApplyOutcome) -> Self {
        self.created = outcome.created;
        self.updated = outcome.updated;
        self.pruned = outcome.pruned;
        self.suppressed += outcome.suppressed.len() as u64;
        self.failed += outcome.too_large.len() as u64;
        let room = MAX_REPORTED_FAILURES.saturating_sub(self.failures.len());
        self.failures.extend(
            outcome
                .too_large
                .iter()
                .take(room)
                .map(|(id, e)| LabFailure {
                    lab_id: *id,
                    error: e.clone(),
                }),
        );
        self
    }
}

/// The plan as the store's changes: new records, changed records with
/// their history entry, prunes, and an event for each.
pub fn record_changes(
    plan: ReconcilePlan,
    mut old: HashMap<LabId, LabRecord>,
    worker_id: &WorkerId,
    now: DateTime<Utc>,
    history_limit: usize,
    fence: u64,
) -> RecordChanges {
    let mut changes = RecordChanges {
        fence,
        prune: plan.prune.clone(),
        ..RecordChanges::default()
    };
    let event = |lab, data: EventData| LabEvent::new(worker_id, lab, now, &data);
    let discovered = |changes: &mut RecordChanges, id, snapshot: LabSnapshot| {
        changes.events.push(event(
            id,
            EventData::Discovered {
                title: snapshot.title.clone(),
                state: snapshot.state.as_str().to_owned(),
            },
        ));
        changes
            .create
            .push(LabRecord::discovered(worker_id.clone(), id, snapshot, now));
    };
    for (id, snapshot) in plan.create {
        discovered(&mut changes, id, snapshot);
    }
    for (id, snapshot) in plan.update {
        // Pruned or tombstoned since the index read: treat as new; the
        // repository refuses it if it is a tombstone.
        let Some(mut record) = old.remove(&id) else {
            discovered(&mut changes, id, snapshot);
            continue;
        };
        let entry = record.apply_change(snapshot, now, history_limit);
        if let Some(HistoryEntry {
            event: HistoryEvent::Changed { changes: fields },
            ..
        }) = &entry
        {
            let state = fields.iter().find(|c| c.field == LabField::State);
            let state_changed = state.map(|c| EventData::StateChanged {
                from: c.old.clone(),
                to: c.new.clone(),
            });
            changes.events.push(event(
                id,
                EventData::Changed {
                    changes: fields.clone(),
                },
            ));
            if let Some(data) = state_changed {
                changes.events.push(event(id, data));
            }
        }
        changes.update.push(RecordUpdate { record, entry });
    }
    for id in &plan.prune {
        changes.events.push(event(
            *id,
            EventData::Pruned {
                reason: PRUNE_REASON,
            },
        ));
    }
    changes
}

/// The prunes the store made: those planned, less those it did not make.
pub fn prunes_done(planned: Vec<LabId>, outcome: &ApplyOutcome) -> Vec<LabId> {
    let not: HashSet<&LabId> = outcome.not_pruned.iter().collect();
    planned.into_iter().filter(|id| !not.contains(id)).collect()
}

/// One audit entry per prune, naming who started the run.
pub fn prune_audit(
    pruned: &[LabId],
    actor: &Actor,
    worker_id: &WorkerId,
    now: DateTime<Utc>,
) -> Vec<AuditEntry> {
    pruned
        .iter()
        .map(|lab| AuditEntry {
            at: now,
            actor: actor.clone(),
            action: AuditAction::Prune,
            worker_id: worker_id.clone(),
            lab_id: Some(*lab),
            outcome: "pruned".into(),
            detail: PRUNE_REASON.into(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use labsync_domain::LabState;

    use super::*;
    use crate::events::LabEventKind;
    use crate::fakes::{lab, snapshot, worker_id};

    fn kinds(changes: &RecordChanges) -> Vec<(LabId, LabEventKind)> {
        changes.events.iter().map(|e| (e.lab_id, e.kind)).collect()
    }

    #[test]
    fn a_plan_becomes_records_and_one_event_per_change_with_the_state_change_named() {
        let now = Utc::now();
        let w = worker_id();
        let stopped = snapshot("one", LabState::Stopped);
        let mut started = stopped.clone();
        started.state = LabState::Started;
        let mut renamed = stopped.clone();
        renamed.title = "renamed".into();
        let old: HashMap<LabId, LabRecord> = [lab(2), lab(3)]
            .into_iter()
            .map(|id| {
                (
                    id,
                    LabRecord::discovered(w.clone(), id, stopped.clone(), now),
                )
            })
            .collect();
        let plan = ReconcilePlan {
            create: vec![(lab(1), stopped.clone())],
            update: vec![(lab(2), started), (lab(3), renamed), (lab(4), stopped)],
            unchanged: vec![lab(5)],
            prune: vec![lab(6)],
            ..ReconcilePlan::default()
        };
        let changes = record_changes(plan, old, &w, now, 50, 7);
        assert_eq!(changes.fence, 7);
        assert_eq!(
            kinds(&changes),
            [
                (lab(1), LabEventKind::Discovered),
                (lab(2), LabEventKind::Changed),
                (lab(2), LabEventKind::StateChanged),
                (lab(3), LabEventKind::Changed),
                // Gone from the store since the index read: new again.
                (lab(4), LabEventKind::Discovered),
                (lab(6), LabEventKind::Pruned),
            ]
        );
        let state = &changes.events[2].data;
        assert_eq!(
            (state["from"].as_str(), state["to"].as_str()),
            (Some("STOPPED"), Some("STARTED"))
        );
        let created: Vec<LabId> = changes.create.iter().map(|r| r.lab_id).collect();
        assert_eq!(created, [lab(1), lab(4)]);
        assert_eq!(changes.update.len(), 2);
        assert_eq!(changes.prune, [lab(6)]);
    }

    #[test]
    fn a_report_counts_the_plan_then_what_the_store_wrote() {
        let plan = ReconcilePlan {
            create: vec![(lab(1), snapshot("a", LabState::Stopped))],
            unchanged: vec![lab(2), lab(3)],
            prune: vec![lab(4), lab(5)],
            failed: (10..40).map(|n| (lab(n), "broken".to_owned())).collect(),
            ..ReconcilePlan::default()
        };
        let report = |dry_run| {
            RunReport::new(
                &worker_id(),
                &Actor::Schedule,
                crate::RefreshOptions {
                    dry_run,
                    force_prune: false,
                },
                Utc::now(),
            )
        };
        let dry = report(true).planned(&plan, 40, 1);
        assert_eq!(
            (dry.created, dry.pruned, dry.unchanged, dry.failed),
            (1, 2, 2, 30)
        );
        assert_eq!(dry.failures.len(), MAX_REPORTED_FAILURES);
        let wet = report(false).planned(&plan, 40, 1);
        assert_eq!((wet.created, wet.pruned, wet.invalid_ids), (0, 0, 1));
        let outcome = ApplyOutcome {
            created: 1,
            pruned: 1,
            too_large: vec![(lab(1), "too large".into())],
            not_pruned: vec![lab(5)],
            ..ApplyOutcome::default()
        };
        let done = wet.applied(&outcome);
        assert_eq!((done.created, done.pruned, done.failed), (1, 1, 31));
        assert_eq!(done.failures.len(), MAX_REPORTED_FAILURES, "still bounded");
        assert_eq!(prunes_done(plan.prune, &outcome), [lab(4)]);
        let audit = prune_audit(&[lab(4)], &Actor::Schedule, &worker_id(), Utc::now());
        assert_eq!(
            (audit[0].actor.clone(), audit[0].lab_id, audit[0].action),
            (Actor::Schedule, Some(lab(4)), AuditAction::Prune)
        );
    }
}
