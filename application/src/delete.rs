//! The two-phase delete of a lab.
//!
//! Phase 1 is this command: delete the lab in CML, then replace its record
//! with a tombstone at once. Phase 2 is every later refresh: it prunes what
//! is gone in CML and never writes over a tombstone.
//!
//! # Expected flow
//! 0. Refuse if labsync's CML account is not an admin: CML answers 404 for
//!    the labs such an account cannot see, so "already gone" would be a lie.
//!    For a self-service person (`owned_by`), refuse unless CML says now
//!    that the lab's `owner_username` is theirs.
//! 1. Ask CML for the lab's state. 404: the lab is already gone (step 4),
//!    once a fresh login confirms the account is still an admin.
//!    While CML answers, audit the attempt (`started`): who asked, what,
//!    when, so that a crash after CML acted still leaves a trace of who
//!    deleted the lab. Both end before CML is asked to change anything.
//! 2. Not stopped and wiped (`DEFINED_ON_CORE`): refuse, unless `force`, in
//!    which case stop, wait until converged, wipe, wait until converged.
//! 3. `DELETE` the lab in CML; a 404 here also means "already gone". When
//!    the `DELETE` fails, ask CML once more for the lab: its answer may have
//!    been lost after CML acted (a 500, a timeout, a dropped connection).
//! 4. Replace the record with a tombstone (hidden from every list, and a
//!    refresh that listed the lab before the delete cannot bring it back).
//! 5. Audit how it ended.
//!
//! # Guarantees
//! - Success means CML no longer has the lab and no list shows it.
//! - When CML refuses or cannot be reached, the record stays as it was, with
//!   the failed attempt in its history and in the audit log.
//! - Idempotent: deleting a lab CML does not have succeeds and says so.
//!
//! # Assumptions
//! CML deletes only labs in `DEFINED_ON_CORE`, and answers its own JSON 404
//! for a lab that does not exist (the gateway never reports another 404,
//! such as a proxy's page, as [`CmlError::NotFound`]).
//!
//! # Caveats
//! If the process dies (or the database fails) between steps 3 and 4, the
//! record outlives the lab until the next refresh prunes it, because CML no
//! longer lists it. The tombstone is written only after CML confirmed: a
//! tombstone for a lab that still exists would hide it.

use std::time::{Duration, Instant};

use labsync_domain::{Actor, HistoryEntry, HistoryEvent, LabId, LabState, WorkerId};
use serde::{Deserialize, Serialize};
use tracing::{Instrument, info, info_span, warn};

use crate::errors::{AppError, CmlError};
use crate::events::{EventData, LabEvent};
use crate::ports::{AuditAction, AuditEntry, Tombstone, WorkerAccess};
use crate::services::Services;

/// The longest wait between two convergence checks, whatever
/// `delete.converge_poll_ms` says: a long poll would make a forced delete
/// overshoot its `converge_timeout` by as much.
pub const MAX_CONVERGE_POLL: Duration = Duration::from_secs(5);

/// A request to delete one lab.
#[derive(Debug, Clone)]
pub struct DeleteLab {
    pub worker_id: WorkerId,
    pub lab_id: LabId,
    /// Stop and wipe a running lab first instead of refusing.
    pub force: bool,
    /// Who asked, for the audit log.
    pub requested_by: Actor,
    /// Delete only if CML says the lab's owner is this CML username (a
    /// self-service person's delete); `None` for any lab.
    pub owned_by: Option<String>,
}

/// How a delete ended. Stored as it is (an async delete keeps it), so a
/// variant's fields and words stay readable by later releases.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DeleteOutcomeKind {
    /// CML deleted the lab; its record is gone.
    Deleted,
    /// CML did not have the lab (404); any record is gone.
    AlreadyAbsent,
    /// The lab is not stopped and wiped, and `force` was not given.
    RefusedRunning { state: LabState },
    /// CML could not be reached (connection, timeout, gateway errors).
    CmlUnreachable { error: String },
    /// CML answered with an error; its description is kept. `retryable`
    /// when CML failed (5xx) or garbled its answer, rather than refused.
    CmlRefused { error: String, retryable: bool },
    /// A forced delete's stop or wipe did not converge in time.
    NotConverged { step: String },
    /// labsync's CML account is not an administrator: it cannot see every
    /// lab, so it cannot tell "gone" from "hidden". Nothing was asked.
    AccountNotAdmin { username: String },
    /// A self-service delete of a lab that CML says someone else owns.
    /// Nothing was asked.
    NotOwner { owner: Option<String> },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteOutcome {
    pub worker_id: WorkerId,
    pub lab_id: LabId,
    #[serde(flatten)]
    pub kind: DeleteOutcomeKind,
    /// True when CML no longer has the lab.
    pub lab_gone: bool,
    /// Whether labsync had a live record of the lab before the delete.
    pub record_was_present: bool,
    /// One line for people.
    pub message: String,
}

/// How a delete ended, for observers (metrics): an outcome, or the one
/// error that ends a delete after CML acted.
#[derive(Debug, Clone, Copy)]
pub enum DeleteEnd<'a> {
    Outcome(&'a DeleteOutcomeKind),
    /// CML deleted the lab; its record could not be replaced yet.
    RecordCleanupPending,
}

impl DeleteEnd<'_> {
    /// The outcome's own word (a bounded set: a metric label).
    pub fn word(self) -> &'static str {
        match self {
            Self::Outcome(kind) => kind.word(),
            Self::RecordCleanupPending => "record_cleanup_pending",
        }
    }
}

impl DeleteOutcomeKind {
    /// A short, stable word for logs, metrics and the audit log.
    pub fn word(&self) -> &'static str {
        match self {
            Self::Deleted => "deleted",
            Self::AlreadyAbsent => "already_absent",
            Self::RefusedRunning { .. } => "refused_running",
            Self::CmlUnreachable { .. } => "cml_unreachable",
            Self::CmlRefused { .. } => "cml_refused",
            Self::NotConverged { .. } => "not_converged",
            Self::AccountNotAdmin { .. } => "account_not_admin",
            Self::NotOwner { .. } => "not_owner",
        }
    }

    fn from_cml(e: CmlError) -> Self {
        match e {
            CmlError::Unreachable(_) | CmlError::Tls(_) => Self::CmlUnreachable {
                error: e.to_string(),
            },
            other => Self::CmlRefused {
                // A 5xx, or a garbled answer (a body cut short by a proxy or
                // a restarting controller), may well succeed later; a 4xx
                // or refused credentials will not until someone acts.
                retryable: matches!(other, CmlError::Server { .. } | CmlError::Protocol(_)),
                error: other.to_string(),
            },
        }
    }

    /// Whether trying again later may succeed (the async delete retries).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::CmlUnreachable { .. } | Self::NotConverged { .. } => true,
            Self::CmlRefused { retryable, .. } => *retryable,
            Self::Deleted
            | Self::AlreadyAbsent
            | Self::RefusedRunning { .. }
            | Self::AccountNotAdmin { .. }
            | Self::NotOwner { .. } => false,
        }
    }
}

/// Whether CML's `owner_username` is the person's CML username: exactly,
/// and never when CML names no owner.
pub fn owns(owner_in_cml: Option<&str>, username: &str) -> bool {
    !username.is_empty() && owner_in_cml == Some(username)
}

/// What a refused self-service delete says.
pub fn not_owner_detail(owner: Option<&str>, username: &str) -> String {
    format!(
        "CML says this lab belongs to {}, not to {username:?}: a self-service person deletes \
         only their own labs",
        owner.map_or_else(|| "no one".to_owned(), |o| format!("{o:?}")),
    )
}

enum Stop {
    /// The lab is ready to be deleted; it `was` in this state when the
    /// delete began (the audit keeps it: a forced delete of a running lab
    /// says so).
    Ready {
        was: LabState,
    },
    /// CML says it does not exist.
    Absent,
    Failed(DeleteOutcomeKind),
}

impl DeleteLab {
    /// Runs the delete.
    ///
    /// # Errors
    /// [`AppError::UnknownWorker`]; [`AppError::WorkerDisabled`];
    /// [`AppError::Repository`] when the
    /// worker cannot be read; [`AppError::RecordCleanupPending`]
    /// when CML deleted the lab but the record could not be removed (the next
    /// refresh removes it). Refusals and CML failures are outcomes, not errors.
    pub async fn execute(self, services: &Services) -> Result<DeleteOutcome, AppError> {
        let span = info_span!("delete_lab", worker_id = %self.worker_id, lab_id = %self.lab_id, force = self.force);
        let started = Instant::now();
        let result = self.run(services).instrument(span).await;
        let word = match &result {
            Ok(outcome) => outcome.kind.word(),
            Err(AppError::RecordCleanupPending(_)) => DeleteEnd::RecordCleanupPending.word(),
            Err(_) => "error",
        };
        services.observer.delete_took(word, started.elapsed());
        result
    }

    async fn run(self, s: &Services) -> Result<DeleteOutcome, AppError> {
        let access = s
            .workers
            .get(&self.worker_id)
            .await?
            .ok_or_else(|| AppError::UnknownWorker(self.worker_id.clone()))?;
        // Disabled means hands off (maintenance, a server being retired):
        // a delete through labsync would surprise whoever disabled it.
        if !access.worker.enabled {
            return Err(AppError::WorkerDisabled(self.worker_id.clone()));
        }
        match s.cml.account(&access).await {
            Ok(a) if a.admin => {}
            Ok(a) => {
                let kind = DeleteOutcomeKind::AccountNotAdmin {
                    username: a.username,
                };
                return Ok(self.failed(s, kind).await);
            }
            Err(e) => return Ok(self.failed(s, DeleteOutcomeKind::from_cml(e)).await),
        }
        if let Some(refused) = self.owner_refusal(s, &access).await {
            return Ok(self.failed(s, refused).await);
        }
        let stop = match self.make_deletable(s, &access).await {
            Stop::Ready { was } => match s.cml.delete_lab(&access, &self.lab_id).await {
                Ok(()) => Stop::Ready { was },
                Err(CmlError::NotFound) => Stop::Absent,
                Err(e) => self.after_a_lost_answer(s, &access, e).await,
            },
            other => other,
        };
        let (kind, audit_detail) = match stop {
            Stop::Ready { was } => {
                crate::crash::point(crate::crash::points::DELETE_AFTER_CML);
                (
                    DeleteOutcomeKind::Deleted,
                    format!("deleted in CML (it was {was})"),
                )
            }
            Stop::Absent => match self.confirm_absent(s, &access).await {
                Ok(()) => (
                    DeleteOutcomeKind::AlreadyAbsent,
                    "CML did not have the lab".to_owned(),
                ),
                Err(kind) => return Ok(self.failed(s, kind).await),
            },
            Stop::Failed(kind) => return Ok(self.failed(s, kind).await),
        };
        let now = s.clock.now();
        // Checked: a TTL that overflows (configuration bounds it) must not
        // panic after CML already deleted the lab.
        let expires_at = chrono::Duration::from_std(s.settings.tombstone_ttl)
            .ok()
            .and_then(|ttl| now.checked_add_signed(ttl))
            .unwrap_or(chrono::DateTime::<chrono::Utc>::MAX_UTC);
        let tombstone = Tombstone {
            deleted_at: now,
            deleted_by: self.requested_by.clone(),
            expires_at,
        };
        let event = LabEvent::new(
            &self.worker_id,
            self.lab_id,
            now,
            &EventData::Deleted {
                requested_by: self.requested_by.clone(),
                outcome: kind.word(),
                force: self.force,
            },
        );
        let audit = self.audit_entry(s, &kind, audit_detail);
        let record_was_present = match s
            .labs
            .tombstone(&self.worker_id, &self.lab_id, tombstone, event, audit)
            .await
        {
            Ok(present) => present,
            Err(e) => {
                warn!(error = %e, "deleted in CML but the record could not be removed");
                self.audit(s, kind.word(), format!("record removal failed: {e}"))
                    .await;
                s.observer.delete_finished(DeleteEnd::RecordCleanupPending);
                return Err(AppError::RecordCleanupPending(e));
            }
        };
        let message = match (&kind, record_was_present) {
            (DeleteOutcomeKind::Deleted, _) => "deleted in CML; record removed".to_owned(),
            (_, true) => "CML did not have the lab; record removed".to_owned(),
            (_, false) => "CML did not have the lab, and labsync had no record of it".to_owned(),
        };
        info!(outcome = kind.word(), "lab deleted");
        s.observer.delete_finished(DeleteEnd::Outcome(&kind));
        Ok(DeleteOutcome {
            worker_id: self.worker_id,
            lab_id: self.lab_id,
            kind,
            lab_gone: true,
            record_was_present,
            message,
        })
    }

    /// The `DELETE` failed, but CML may have carried it out before its
    /// answer was lost (a 500 after the fact, a timeout, a dropped
    /// connection): one look at the lab tells. Gone means gone (once the
    /// 404 is confirmed like any other); anything else is the original
    /// failure.
    async fn after_a_lost_answer(&self, s: &Services, access: &WorkerAccess, e: CmlError) -> Stop {
        warn!(error = %e, "the delete failed; asking CML whether the lab is still there");
        match s.cml.lab_state(access, &self.lab_id).await {
            Err(CmlError::NotFound) => Stop::Absent,
            _ => Stop::Failed(DeleteOutcomeKind::from_cml(e)),
        }
    }

    /// Why a self-service delete may not go on, judged by what CML says
    /// now (a record may be up to a refresh old). A lab CML does not have
    /// is not theirs either: its record goes with the next refresh.
    ///
    /// Public so that a queued delete is refused before it is queued: a
    /// request for someone else's lab must not hold the lab's one active
    /// request (an operator's later submit would be handed it).
    pub async fn owner_refusal(
        &self,
        s: &Services,
        access: &WorkerAccess,
    ) -> Option<DeleteOutcomeKind> {
        let username = self.owned_by.as_deref()?;
        match s.cml.lab_details(access, &self.lab_id).await {
            Ok(lab) if owns(lab.owner_username.as_deref(), username) => None,
            // CML's text, cut: it goes into the audit log and the answer.
            Ok(lab) => Some(DeleteOutcomeKind::NotOwner {
                owner: lab
                    .owner_username
                    .map(|o| o.chars().take(labsync_domain::MAX_ACTOR_NAME).collect()),
            }),
            // No owner CML vouches for, no delete: a lab that a later call
            // finds after all must not be someone else's for the taking.
            Err(CmlError::NotFound) => Some(DeleteOutcomeKind::NotOwner { owner: None }),
            Err(e) => Some(DeleteOutcomeKind::from_cml(e)),
        }
    }

    /// A 404 says "gone" only to an admin: a fresh login (a token outlives
    /// a change of rights) must confirm that the account still is one.
    async fn confirm_absent(
        &self,
        s: &Services,
        access: &WorkerAccess,
    ) -> Result<(), DeleteOutcomeKind> {
        match s.cml.relogin(access).await {
            Ok(a) if a.admin => Ok(()),
            Ok(a) => Err(DeleteOutcomeKind::AccountNotAdmin {
                username: a.username,
            }),
            Err(e) => Err(DeleteOutcomeKind::from_cml(e)),
        }
    }

    /// Gets the lab to `DEFINED_ON_CORE`, or says why not.
    async fn make_deletable(&self, s: &Services, access: &WorkerAccess) -> Stop {
        let cml = &s.cml;
        // Who asked, for what, when, is stored before CML is asked to
        // change anything, so that a crash after CML acted still names the
        // person. It is stored while CML is asked for the lab's state (a
        // question that changes nothing), so a delete does not wait for
        // the database and then for CML, one after the other; an attempt
        // refused below keeps its `started` entry beside its refusal.
        let (state, ()) = futures::join!(
            cml.lab_state(access, &self.lab_id),
            self.audit(
                s,
                "started",
                format!(
                    "checking the lab in CML, then deleting it (force {})",
                    self.force
                ),
            )
        );
        let state = match state {
            Ok(state) => state,
            Err(CmlError::NotFound) => return Stop::Absent,
            Err(e) => return Stop::Failed(DeleteOutcomeKind::from_cml(e)),
        };
        if !state.is_deletable() && !self.force {
            return Stop::Failed(DeleteOutcomeKind::RefusedRunning { state });
        }
        if state.is_deletable() {
            return Stop::Ready { was: state };
        }
        let steps: &[&str] = match &state {
            LabState::Stopped => &["wipe"],
            _ => &["stop", "wipe"],
        };
        for step in steps {
            let asked = if *step == "stop" {
                cml.stop_lab(access, &self.lab_id).await
            } else {
                cml.wipe_lab(access, &self.lab_id).await
            };
            match asked {
                Ok(()) => {}
                Err(CmlError::NotFound) => return Stop::Absent,
                Err(e) => return Stop::Failed(DeleteOutcomeKind::from_cml(e)),
            }
            match self.wait_converged(s, access).await {
                Ok(true) => info!(step, "converged"),
                Ok(false) => {
                    return Stop::Failed(DeleteOutcomeKind::NotConverged {
                        step: (*step).to_owned(),
                    });
                }
                Err(CmlError::NotFound) => return Stop::Absent,
                Err(e) => return Stop::Failed(DeleteOutcomeKind::from_cml(e)),
            }
        }
        Stop::Ready { was: state }
    }

    /// Polls `check_if_converged` until true or the deadline.
    async fn wait_converged(&self, s: &Services, access: &WorkerAccess) -> Result<bool, CmlError> {
        let deadline = Instant::now() + s.settings.converge_timeout;
        loop {
            if s.cml.is_converged(access, &self.lab_id).await? {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(s.settings.converge_poll.min(MAX_CONVERGE_POLL)).await;
        }
    }

    /// Records a failed attempt in the lab's history and the audit log; the
    /// record itself is left as it was.
    async fn failed(&self, s: &Services, kind: DeleteOutcomeKind) -> DeleteOutcome {
        let detail = match &kind {
            DeleteOutcomeKind::RefusedRunning { state } => {
                format!("lab is {state}: stop and wipe it first, or delete with force")
            }
            DeleteOutcomeKind::CmlUnreachable { error }
            | DeleteOutcomeKind::CmlRefused { error, .. } => error.clone(),
            DeleteOutcomeKind::NotConverged { step } => format!(
                "the lab's {step} did not converge within {} s",
                s.settings.converge_timeout.as_secs()
            ),
            DeleteOutcomeKind::AccountNotAdmin { username } => format!(
                "labsync's CML account {username:?} on this worker is not an administrator: \
                 it cannot see every lab, so no delete is attempted. Give it admin rights in \
                 CML, or register an admin account"
            ),
            DeleteOutcomeKind::NotOwner { owner } => not_owner_detail(
                owner.as_deref(),
                self.owned_by.as_deref().unwrap_or_default(),
            ),
            _ => String::new(),
        };
        warn!(outcome = kind.word(), %detail, "delete failed");
        // Someone else's lab keeps its history and its watchers' peace: a
        // refused self-service delete is in the audit log only, so that
        // repeated ones cannot push the lab's real history out.
        if matches!(kind, DeleteOutcomeKind::NotOwner { .. }) {
            self.audit(s, kind.word(), detail.clone()).await;
            s.observer.delete_finished(DeleteEnd::Outcome(&kind));
            return DeleteOutcome {
                worker_id: self.worker_id.clone(),
                lab_id: self.lab_id,
                kind,
                lab_gone: false,
                record_was_present: false,
                message: detail,
            };
        }
        let now = s.clock.now();
        let event = LabEvent::new(
            &self.worker_id,
            self.lab_id,
            now,
            &EventData::DeleteFailed {
                requested_by: self.requested_by.clone(),
                outcome: kind.word(),
                detail: detail.clone(),
            },
        );
        let entry = HistoryEntry {
            at: now,
            event: HistoryEvent::DeleteAttempt {
                requested_by: self.requested_by.clone(),
                force: self.force,
                outcome: kind.word().to_owned(),
                detail: detail.clone(),
            },
        };
        let record_was_present = match s
            .labs
            .add_history(
                &self.worker_id,
                &self.lab_id,
                entry,
                s.settings.history_limit,
                event,
                self.audit_entry(s, &kind, detail.clone()),
            )
            .await
        {
            Ok(present) => present,
            Err(e) => {
                warn!(error = %e, "could not record the failed delete in the lab's history");
                self.audit(s, kind.word(), detail.clone()).await;
                false
            }
        };
        s.observer.delete_finished(DeleteEnd::Outcome(&kind));
        DeleteOutcome {
            worker_id: self.worker_id.clone(),
            lab_id: self.lab_id,
            kind,
            lab_gone: false,
            record_was_present,
            message: detail,
        }
    }

    fn audit_entry(&self, s: &Services, kind: &DeleteOutcomeKind, detail: String) -> AuditEntry {
        self.audit_word(s, kind.word(), detail)
    }

    fn audit_word(&self, s: &Services, outcome: &str, detail: String) -> AuditEntry {
        AuditEntry {
            at: s.clock.now(),
            actor: self.requested_by.clone(),
            action: AuditAction::Delete,
            worker_id: self.worker_id.clone(),
            lab_id: Some(self.lab_id),
            outcome: outcome.to_owned(),
            detail,
        }
    }

    /// An audit entry on its own: the attempt's start, or the end of one
    /// whose own write failed.
    async fn audit(&self, s: &Services, outcome: &str, detail: String) {
        let entry = self.audit_word(s, outcome, detail);
        if let Err(e) = s.audit.record(vec![entry]).await {
            warn!(error = %e, "could not write the audit entry");
        }
    }
}

#[cfg(test)]
mod tests {
    use labsync_domain::{LabRecord, LabState};

    use super::*;

    #[test]
    fn a_delete_ends_with_its_outcomes_own_word() {
        assert_eq!(
            DeleteEnd::Outcome(&DeleteOutcomeKind::Deleted).word(),
            "deleted"
        );
        assert_eq!(
            DeleteEnd::Outcome(&DeleteOutcomeKind::AccountNotAdmin {
                username: "u".into()
            })
            .word(),
            "account_not_admin"
        );
        assert_eq!(
            DeleteEnd::RecordCleanupPending.word(),
            "record_cleanup_pending"
        );
    }
    use crate::fakes::{Fixture, fixture, lab, snapshot, worker_id};

    fn with_lab(state: LabState) -> (Fixture, LabId) {
        let f = fixture();
        let id = lab(1);
        let s = snapshot("x", state);
        f.cml.labs.lock().unwrap().insert(id, s.clone());
        f.store.live.lock().unwrap().insert(
            id,
            LabRecord::discovered(worker_id(), id, s, chrono::Utc::now()),
        );
        (f, id)
    }

    /// The outcome word of each audit entry, in the order written.
    fn audit_outcomes(f: &Fixture) -> Vec<String> {
        f.store
            .audit
            .lock()
            .unwrap()
            .iter()
            .map(|a| a.outcome.clone())
            .collect()
    }

    fn cmd(id: LabId, force: bool) -> DeleteLab {
        DeleteLab {
            worker_id: worker_id(),
            lab_id: id,
            force,
            requested_by: Actor::cli("unit"),
            owned_by: None,
        }
    }

    #[tokio::test]
    async fn a_running_lab_is_refused_and_the_attempt_kept() {
        let (f, id) = with_lab(LabState::Started);
        let out = cmd(id, false).execute(&f.services).await.unwrap();
        assert_eq!(
            out.kind,
            DeleteOutcomeKind::RefusedRunning {
                state: LabState::Started
            }
        );
        assert_eq!(
            f.cml.calls(),
            vec![format!("state {id}")],
            "nothing destructive was asked"
        );
        let rec = f.store.live.lock().unwrap()[&id].clone();
        assert!(matches!(
            rec.history.last().unwrap().event,
            HistoryEvent::DeleteAttempt { .. }
        ));
        assert!(f.store.tombstones.lock().unwrap().is_empty());
        let outcomes = audit_outcomes(&f);
        assert_eq!(
            outcomes,
            ["started", "refused_running"],
            "the attempt, stored while CML was asked for the state, and its refusal"
        );
    }

    #[tokio::test]
    async fn force_stops_waits_wipes_waits_then_deletes_in_that_order() {
        let (f, id) = with_lab(LabState::Started);
        let out = cmd(id, true).execute(&f.services).await.unwrap();
        assert_eq!(out.kind, DeleteOutcomeKind::Deleted);
        let calls: Vec<String> = f
            .cml
            .calls()
            .iter()
            .map(|c| c.split(' ').next().unwrap().to_owned())
            .collect();
        assert_eq!(
            calls,
            ["state", "stop", "converged", "wipe", "converged", "delete"]
        );
        assert!(f.store.tombstones.lock().unwrap().contains_key(&id));
        assert!(f.store.live.lock().unwrap().is_empty());
        let outcomes = audit_outcomes(&f);
        assert_eq!(
            outcomes,
            ["started", "deleted"],
            "who asked is stored before CML acts"
        );
    }

    #[tokio::test]
    async fn a_non_admin_account_is_refused_before_cml_is_asked_anything() {
        let (f, id) = with_lab(LabState::DefinedOnCore);
        *f.cml.not_admin.lock().unwrap() = true;
        let out = cmd(id, false).execute(&f.services).await.unwrap();
        assert!(
            matches!(out.kind, DeleteOutcomeKind::AccountNotAdmin { .. }),
            "{out:?}"
        );
        assert!(!out.lab_gone && !out.kind.is_retryable());
        assert!(
            out.message.contains("not an administrator"),
            "{}",
            out.message
        );
        assert!(f.cml.calls().is_empty(), "{:?}", f.cml.calls());
        assert!(f.store.tombstones.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_404_is_already_absent_only_after_a_fresh_login_says_admin() {
        let (f, id) = with_lab(LabState::DefinedOnCore);
        f.cml.labs.lock().unwrap().clear();
        let out = cmd(id, false).execute(&f.services).await.unwrap();
        assert_eq!(out.kind, DeleteOutcomeKind::AlreadyAbsent);
        assert!(
            f.cml.calls().iter().any(|c| c == "login"),
            "{:?}",
            f.cml.calls()
        );

        // The session still says admin; the next login will not.
        let (f, id) = with_lab(LabState::DefinedOnCore);
        f.cml.labs.lock().unwrap().clear();
        *f.cml.demoted.lock().unwrap() = true;
        let out = cmd(id, false).execute(&f.services).await.unwrap();
        assert!(
            matches!(out.kind, DeleteOutcomeKind::AccountNotAdmin { .. }),
            "{out:?}"
        );
        assert!(!out.lab_gone);
        assert!(
            f.store.tombstones.lock().unwrap().is_empty(),
            "a hidden lab is not tombstoned"
        );
        assert!(f.store.live.lock().unwrap().contains_key(&id));
    }

    #[tokio::test]
    async fn a_cml_error_leaves_the_record_and_writes_no_tombstone() {
        let (f, id) = with_lab(LabState::DefinedOnCore);
        f.cml.fail.lock().unwrap().insert(
            "delete",
            CmlError::Server {
                status: 500,
                description: "boom".into(),
            },
        );
        let out = cmd(id, false).execute(&f.services).await.unwrap();
        assert!(
            matches!(out.kind, DeleteOutcomeKind::CmlRefused { ref error, retryable: true } if error.contains("boom"))
        );
        assert!(!out.lab_gone);
        assert!(f.store.tombstones.lock().unwrap().is_empty());
        assert!(f.store.live.lock().unwrap().contains_key(&id));
        f.cml
            .fail
            .lock()
            .unwrap()
            .insert("state", CmlError::Unreachable("refused".into()));
        let out = cmd(id, false).execute(&f.services).await.unwrap();
        assert!(matches!(out.kind, DeleteOutcomeKind::CmlUnreachable { .. }));
    }

    #[tokio::test]
    async fn a_delete_whose_answer_was_lost_after_cml_acted_is_already_absent() {
        let (f, id) = with_lab(LabState::DefinedOnCore);
        // CML deletes the lab, and the answer never arrives.
        f.cml
            .lose_delete_answer
            .lock()
            .unwrap()
            .replace(CmlError::Unreachable("timed out".into()));
        let out = cmd(id, false).execute(&f.services).await.unwrap();
        assert_eq!(out.kind, DeleteOutcomeKind::AlreadyAbsent, "{out:?}");
        assert!(out.lab_gone);
        assert!(f.store.tombstones.lock().unwrap().contains_key(&id));
        // A DELETE that failed without CML acting is the failure it was.
        let (f, id) = with_lab(LabState::DefinedOnCore);
        f.cml.fail.lock().unwrap().insert(
            "delete",
            CmlError::Server {
                status: 500,
                description: "boom".into(),
            },
        );
        let out = cmd(id, false).execute(&f.services).await.unwrap();
        assert!(
            matches!(out.kind, DeleteOutcomeKind::CmlRefused { .. }),
            "{out:?}"
        );
        assert!(f.cml.labs.lock().unwrap().contains_key(&id));
    }

    #[tokio::test]
    async fn a_garbled_answer_is_worth_retrying_and_a_refusal_is_not() {
        let (f, id) = with_lab(LabState::DefinedOnCore);
        let mut retryable = Vec::new();
        for e in [
            CmlError::Protocol("EOF while parsing".into()),
            CmlError::Refused {
                status: 400,
                description: "bad".into(),
            },
        ] {
            f.cml.fail.lock().unwrap().insert("state", e);
            let out = cmd(id, false).execute(&f.services).await.unwrap();
            assert!(!out.lab_gone);
            retryable.push(out.kind.is_retryable());
        }
        assert_eq!(retryable, [true, false]);
    }

    #[tokio::test]
    async fn a_lab_cml_lacks_is_already_absent_and_tombstoned() {
        let (f, id) = with_lab(LabState::DefinedOnCore);
        f.cml.labs.lock().unwrap().clear();
        let out = cmd(id, false).execute(&f.services).await.unwrap();
        assert_eq!(out.kind, DeleteOutcomeKind::AlreadyAbsent);
        assert!(out.lab_gone && out.record_was_present);
        assert!(f.store.tombstones.lock().unwrap().contains_key(&id));
    }

    #[tokio::test]
    async fn a_failed_record_removal_after_the_cml_delete_is_an_error_that_says_what_follows() {
        let (f, id) = with_lab(LabState::DefinedOnCore);
        *f.store.fail_tombstone.lock().unwrap() = true;
        let err = cmd(id, false).execute(&f.services).await.unwrap_err();
        assert!(matches!(err, AppError::RecordCleanupPending(_)));
        assert!(f.cml.labs.lock().unwrap().is_empty(), "CML deleted it");
    }

    #[tokio::test]
    async fn an_unknown_worker_is_an_error_before_anything_is_asked() {
        let f = fixture();
        let mut c = cmd(lab(1), false);
        c.worker_id = WorkerId::parse("elsewhere").unwrap();
        assert!(matches!(
            c.execute(&f.services).await,
            Err(AppError::UnknownWorker(_))
        ));
        assert!(f.cml.calls().is_empty());
    }

    #[tokio::test]
    async fn a_stopped_lab_is_only_wiped_before_a_forced_delete() {
        let (f, id) = with_lab(LabState::Stopped);
        let out = cmd(id, true).execute(&f.services).await.unwrap();
        assert_eq!(out.kind, DeleteOutcomeKind::Deleted);
        let calls: Vec<String> = f
            .cml
            .calls()
            .iter()
            .map(|c| c.split(' ').next().unwrap().to_owned())
            .collect();
        assert_eq!(calls, ["state", "wipe", "converged", "delete"]);
    }

    #[tokio::test]
    async fn a_forced_delete_waits_for_convergence_until_its_deadline_and_no_longer() {
        // Converges on the third poll, well within the deadline.
        let (f, id) = with_lab(LabState::Started);
        *f.cml.unconverged_polls.lock().unwrap() = 2;
        let out = cmd(id, true).execute(&f.services).await.unwrap();
        assert_eq!(out.kind, DeleteOutcomeKind::Deleted, "{out:?}");
        // Never converges: the deadline ends the wait, with the step named.
        let (mut f, id) = with_lab(LabState::Started);
        f.services.settings.converge_timeout = Duration::from_millis(30);
        *f.cml.unconverged_polls.lock().unwrap() = u32::MAX;
        let out = cmd(id, true).execute(&f.services).await.unwrap();
        assert_eq!(
            out.kind,
            DeleteOutcomeKind::NotConverged {
                step: "stop".into()
            }
        );
        assert!(
            out.message.contains("did not converge within"),
            "{}",
            out.message
        );
    }

    #[tokio::test]
    async fn every_outcome_says_what_happened_in_the_audit_and_the_message() {
        let (f, id) = with_lab(LabState::DefinedOnCore);
        cmd(id, false).execute(&f.services).await.unwrap();
        let details: Vec<String> = f
            .store
            .audit
            .lock()
            .unwrap()
            .iter()
            .map(|a| a.detail.clone())
            .collect();
        assert_eq!(
            details.last().unwrap(),
            "deleted in CML (it was DEFINED_ON_CORE)",
            "{details:?}"
        );

        let (f, id) = with_lab(LabState::DefinedOnCore);
        f.cml.labs.lock().unwrap().clear();
        cmd(id, false).execute(&f.services).await.unwrap();
        let details: Vec<String> = f
            .store
            .audit
            .lock()
            .unwrap()
            .iter()
            .map(|a| a.detail.clone())
            .collect();
        assert_eq!(
            details.last().unwrap(),
            "CML did not have the lab",
            "{details:?}"
        );

        let (f, id) = with_lab(LabState::Started);
        let out = cmd(id, false).execute(&f.services).await.unwrap();
        assert!(
            out.message.contains("stop and wipe it first"),
            "{}",
            out.message
        );

        let (f, id) = with_lab(LabState::DefinedOnCore);
        f.cml.fail.lock().unwrap().insert(
            "state",
            CmlError::Refused {
                status: 400,
                description: "CML says no".into(),
            },
        );
        let out = cmd(id, false).execute(&f.services).await.unwrap();
        assert!(out.message.contains("CML says no"), "{}", out.message);
    }
}
