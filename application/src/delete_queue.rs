//! Asynchronous deletes: a delete request is stored, then carried out by a
//! background worker that retries with capped exponential backoff until CML
//! confirms (the lab is gone) or a permanent error ends it.
//!
//! # Expected flow
//! 1. A worker claims one due request: it becomes `running` with a claim
//!    token of its own and a short claim (`delete.async_claim_secs`).
//! 2. While the delete runs (a forced one may take minutes), the claim is
//!    renewed every third of its length.
//! 3. The outcome is saved only if the claim is still this worker's: a run
//!    that lost its claim writes nothing over whoever holds it now.
//!
//! # Guarantees
//! - A request is `done` only when the lab is gone in CML and its record is
//!   a tombstone; `failed` only for errors retrying cannot fix (the lab is
//!   running and `force` was not asked, CML refused with a 4xx, the account
//!   is no CML admin, the worker is unknown, a stored record is corrupt).
//! - One execution at a time per request, across processes: a live run
//!   keeps its claim, and a stale run's `pending` or `failed` never
//!   overwrites another's `done`.
//! - A process that dies while running a request leaves it claimed until
//!   the claim expires; another worker then takes it again. Deletes are
//!   idempotent, so that second execution finds the lab gone.
//!
//! # Caveats
//! A worker that cannot renew its claim (the database is away longer than
//! the claim) may see another worker start the same delete; the delete is
//! idempotent and the second finds the lab gone.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use labsync_domain::{LabId, WorkerId};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::delete::DeleteLab;
use crate::errors::{AppError, RepoError};
use crate::services::Services;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeleteRequestStatus {
    Pending,
    Running,
    Done,
    Failed,
}

/// A stored delete request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeleteRequest {
    pub id: String,
    pub worker_id: WorkerId,
    pub lab_id: LabId,
    pub force: bool,
    pub requested_by: String,
    pub status: DeleteRequestStatus,
    pub attempts: u32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub next_attempt_at: DateTime<Utc>,
    pub last_error: Option<String>,
    /// The final outcome of the delete, as the synchronous API returns it.
    pub outcome: Option<serde_json::Value>,
}

/// Stored delete requests.
#[async_trait]
pub trait DeleteRequests: Send + Sync {
    /// # Errors
    /// [`RepoError`].
    async fn create(&self, request: &DeleteRequest) -> Result<(), RepoError>;

    /// # Errors
    /// [`RepoError`].
    async fn get(&self, id: &str) -> Result<Option<DeleteRequest>, RepoError>;

    /// Takes one due request (pending and due, or running with an expired
    /// claim), marks it running, claimed for `hold` under `claim` (a token
    /// unique to this attempt).
    ///
    /// MUST be atomic across processes: a request is claimed by one worker.
    ///
    /// # Errors
    /// [`RepoError`].
    async fn claim_due(
        &self,
        now: DateTime<Utc>,
        hold: Duration,
        claim: &str,
    ) -> Result<Option<DeleteRequest>, RepoError>;

    /// Extends `claim` to `now + hold`; false if the request is no longer
    /// claimed under it.
    ///
    /// # Errors
    /// [`RepoError`].
    async fn renew_claim(
        &self,
        id: &str,
        claim: &str,
        now: DateTime<Utc>,
        hold: Duration,
    ) -> Result<bool, RepoError>;

    /// Stores the request's new state and ends the claim, only if it is
    /// still claimed under `claim`; returns whether it was.
    ///
    /// # Errors
    /// [`RepoError`].
    async fn save(&self, request: &DeleteRequest, claim: &str) -> Result<bool, RepoError>;
}

/// Tunables of the retry loop.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub base: Duration,
    pub max_backoff: Duration,
    pub poll: Duration,
    /// How long a claim lasts before another worker may take the request.
    pub claim: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            base: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            poll: Duration::from_millis(500),
            claim: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// base, 2 base, 4 base, ... capped at `max_backoff`.
    pub fn backoff(&self, attempts: u32) -> Duration {
        let factor = 1u32
            .checked_shl(attempts.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max_backoff)
    }
}

/// Submits and runs asynchronous deletes.
#[derive(Clone)]
pub struct DeleteQueue {
    services: Services,
    requests: std::sync::Arc<dyn DeleteRequests>,
    policy: RetryPolicy,
}

// Debug output only: no behaviour depends on it (mutants here are
// equivalent).
impl std::fmt::Debug for DeleteQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeleteQueue")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl DeleteQueue {
    pub fn new(
        services: Services,
        requests: std::sync::Arc<dyn DeleteRequests>,
        policy: RetryPolicy,
    ) -> Self {
        Self {
            services,
            requests,
            policy,
        }
    }

    /// Stores a request; the background worker carries it out.
    ///
    /// # Errors
    /// [`AppError::UnknownWorker`], or [`AppError::Repository`].
    pub async fn submit(&self, cmd: &DeleteLab) -> Result<DeleteRequest, AppError> {
        if self.services.workers.get(&cmd.worker_id).await?.is_none() {
            return Err(AppError::UnknownWorker(cmd.worker_id.clone()));
        }
        let now = self.services.clock.now();
        let request = DeleteRequest {
            id: uuid::Uuid::new_v4().to_string(),
            worker_id: cmd.worker_id.clone(),
            lab_id: cmd.lab_id,
            force: cmd.force,
            requested_by: cmd.requested_by.clone(),
            status: DeleteRequestStatus::Pending,
            attempts: 0,
            created_at: now,
            updated_at: now,
            next_attempt_at: now,
            last_error: None,
            outcome: None,
        };
        self.requests.create(&request).await?;
        Ok(request)
    }

    /// # Errors
    /// [`AppError::Repository`].
    pub async fn get(&self, id: &str) -> Result<Option<DeleteRequest>, AppError> {
        Ok(self.requests.get(id).await?)
    }

    /// Runs every due request once; returns how many were attempted.
    ///
    /// # Errors
    /// [`AppError::Repository`] when the requests cannot be read or saved.
    pub async fn run_due(&self) -> Result<usize, AppError> {
        let mut n = 0;
        loop {
            let claim = uuid::Uuid::new_v4().to_string();
            let Some(mut request) = self
                .requests
                .claim_due(self.services.clock.now(), self.policy.claim, &claim)
                .await?
            else {
                return Ok(n);
            };
            n += 1;
            let keeper = self.keep_claim(request.id.clone(), claim.clone());
            self.attempt(&mut request).await;
            keeper.abort();
            // Whether saved or not, the loop goes on; only the log differs
            // (a mutant of this condition is equivalent).
            if !self.requests.save(&request, &claim).await? {
                warn!(request_id = %request.id, "the claim on this async delete was lost; its outcome is not saved over the new holder's");
            }
        }
    }

    /// Renews the claim every third of its length until aborted.
    fn keep_claim(&self, id: String, claim: String) -> tokio::task::JoinHandle<()> {
        let requests = self.requests.clone();
        let clock = self.services.clock.clone();
        let hold = self.policy.claim;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep((hold / 3).max(Duration::from_millis(50))).await;
                match requests.renew_claim(&id, &claim, clock.now(), hold).await {
                    Ok(true) => {}
                    Ok(false) => {
                        warn!(request_id = %id, "lost the claim on an async delete");
                        return;
                    }
                    Err(e) => {
                        warn!(request_id = %id, error = %e, "could not renew the claim on an async delete")
                    }
                }
            }
        })
    }

    async fn attempt(&self, r: &mut DeleteRequest) {
        r.attempts += 1;
        let result = DeleteLab {
            worker_id: r.worker_id.clone(),
            lab_id: r.lab_id,
            force: r.force,
            requested_by: r.requested_by.clone(),
        }
        .execute(&self.services)
        .await;
        let now = self.services.clock.now();
        r.updated_at = now;
        let retry = match result {
            Ok(outcome) => {
                let retry = !outcome.lab_gone && outcome.kind.is_retryable();
                r.last_error = (!outcome.lab_gone).then(|| outcome.message.clone());
                r.outcome = serde_json::to_value(&outcome).ok();
                r.status = if outcome.lab_gone {
                    DeleteRequestStatus::Done
                } else {
                    DeleteRequestStatus::Failed
                };
                retry
            }
            Err(e) => {
                r.last_error = Some(e.to_string());
                r.status = DeleteRequestStatus::Failed;
                // A database that is away may come back; a stored record
                // that does not decode (or a password that does not open)
                // will not by waiting.
                matches!(
                    e,
                    AppError::Repository(RepoError::Unavailable(_) | RepoError::Other(_))
                        | AppError::RecordCleanupPending(_)
                )
            }
        };
        if retry {
            r.status = DeleteRequestStatus::Pending;
            let wait = self.policy.backoff(r.attempts);
            r.next_attempt_at =
                now + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::seconds(60));
            warn!(request_id = %r.id, attempts = r.attempts, error = r.last_error.as_deref().unwrap_or(""), "async delete will be retried");
        } else {
            info!(request_id = %r.id, status = ?r.status, attempts = r.attempts, "async delete finished");
        }
    }

    /// Runs due requests every `poll` until `stop` turns true; the request
    /// in progress, if any, is finished first.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        loop {
            if let Err(e) = self.run_due().await {
                warn!(error = %e, "async deletes could not be processed");
            }
            tokio::select! {
                _ = tokio::time::sleep(self.policy.poll) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use labsync_domain::{LabRecord, LabState};

    use super::*;
    use crate::fakes::{Fixture, fixture, lab, snapshot, worker_id};

    /// Requests in memory, claims by token, as the port's contract says.
    #[derive(Default)]
    struct FakeRequests {
        stored: Mutex<Vec<(DeleteRequest, Option<String>)>>,
        /// Someone else takes every claim right after it is made.
        steal: Mutex<bool>,
        renewals: Mutex<usize>,
    }

    #[async_trait]
    impl DeleteRequests for FakeRequests {
        async fn create(&self, r: &DeleteRequest) -> Result<(), RepoError> {
            self.stored.lock().unwrap().push((r.clone(), None));
            Ok(())
        }
        async fn get(&self, id: &str) -> Result<Option<DeleteRequest>, RepoError> {
            Ok(self
                .stored
                .lock()
                .unwrap()
                .iter()
                .find(|(r, _)| r.id == id)
                .map(|(r, _)| r.clone()))
        }
        async fn claim_due(
            &self,
            now: DateTime<Utc>,
            _: Duration,
            claim: &str,
        ) -> Result<Option<DeleteRequest>, RepoError> {
            let steal = *self.steal.lock().unwrap();
            let mut stored = self.stored.lock().unwrap();
            let Some((r, c)) = stored.iter_mut().find(|(r, c)| {
                r.status == DeleteRequestStatus::Pending && r.next_attempt_at <= now && c.is_none()
            }) else {
                return Ok(None);
            };
            r.status = DeleteRequestStatus::Running;
            *c = Some(if steal {
                "someone else".into()
            } else {
                claim.to_owned()
            });
            Ok(Some(r.clone()))
        }
        async fn renew_claim(
            &self,
            id: &str,
            claim: &str,
            _: DateTime<Utc>,
            _: Duration,
        ) -> Result<bool, RepoError> {
            *self.renewals.lock().unwrap() += 1;
            Ok(self
                .stored
                .lock()
                .unwrap()
                .iter()
                .any(|(r, c)| r.id == id && c.as_deref() == Some(claim)))
        }
        async fn save(&self, request: &DeleteRequest, claim: &str) -> Result<bool, RepoError> {
            let mut stored = self.stored.lock().unwrap();
            match stored
                .iter_mut()
                .find(|(r, c)| r.id == request.id && c.as_deref() == Some(claim))
            {
                Some(entry) => {
                    *entry = (request.clone(), None);
                    Ok(true)
                }
                None => Ok(false),
            }
        }
    }

    fn queue(f: &Fixture) -> (DeleteQueue, Arc<FakeRequests>) {
        let requests = Arc::new(FakeRequests::default());
        let policy = RetryPolicy {
            base: Duration::from_secs(10),
            ..RetryPolicy::default()
        };
        (
            DeleteQueue::new(f.services.clone(), requests.clone(), policy),
            requests,
        )
    }

    fn with_lab(f: &Fixture, state: LabState) {
        let s = snapshot("x", state);
        f.cml.labs.lock().unwrap().insert(lab(1), s.clone());
        f.store.live.lock().unwrap().insert(
            lab(1),
            LabRecord::discovered(worker_id(), lab(1), s, chrono::Utc::now()),
        );
    }

    fn cmd() -> DeleteLab {
        DeleteLab {
            worker_id: worker_id(),
            lab_id: lab(1),
            force: false,
            requested_by: "unit".into(),
        }
    }

    #[tokio::test]
    async fn a_due_request_runs_once_and_ends_done_with_its_outcome() {
        let f = fixture();
        with_lab(&f, LabState::DefinedOnCore);
        let (q, _) = queue(&f);
        let r = q.submit(&cmd()).await.unwrap();
        assert_eq!(q.run_due().await.unwrap(), 1);
        assert_eq!(q.run_due().await.unwrap(), 0, "nothing left");
        let done = q.get(&r.id).await.unwrap().unwrap();
        assert_eq!((done.status, done.attempts), (DeleteRequestStatus::Done, 1));
        assert_eq!(done.outcome.unwrap()["kind"], "deleted");
        assert!(done.last_error.is_none());
    }

    #[tokio::test]
    async fn a_transient_failure_is_retried_after_the_backoff_and_a_refusal_is_final() {
        let f = fixture();
        with_lab(&f, LabState::DefinedOnCore);
        f.cml
            .fail
            .lock()
            .unwrap()
            .insert("state", crate::CmlError::Unreachable("down".into()));
        let (q, _) = queue(&f);
        let r = q.submit(&cmd()).await.unwrap();
        q.run_due().await.unwrap();
        let pending = q.get(&r.id).await.unwrap().unwrap();
        assert_eq!(
            (pending.status, pending.attempts),
            (DeleteRequestStatus::Pending, 1)
        );
        let wait = pending.next_attempt_at - pending.updated_at;
        assert_eq!(wait, chrono::Duration::seconds(10), "the base backoff");
        assert!(pending.last_error.unwrap().contains("down"));

        let f = fixture();
        with_lab(&f, LabState::Started);
        let (q, _) = queue(&f);
        let r = q.submit(&cmd()).await.unwrap();
        q.run_due().await.unwrap();
        let failed = q.get(&r.id).await.unwrap().unwrap();
        assert_eq!(
            (failed.status, failed.attempts),
            (DeleteRequestStatus::Failed, 1)
        );
        assert!(failed.last_error.unwrap().contains("STARTED"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_claim_is_renewed_every_third_of_its_length() {
        let f = fixture();
        let requests = Arc::new(FakeRequests::default());
        let q = DeleteQueue::new(
            f.services.clone(),
            requests.clone(),
            RetryPolicy {
                claim: Duration::from_secs(3),
                ..RetryPolicy::default()
            },
        );
        let r = q.submit(&cmd()).await.unwrap();
        let claimed = requests
            .claim_due(chrono::Utc::now(), Duration::from_secs(3), "mine")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(claimed.id, r.id);
        let keeper = q.keep_claim(r.id.clone(), "mine".into());
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        assert_eq!(
            *requests.renewals.lock().unwrap(),
            1,
            "after a third of the claim"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(*requests.renewals.lock().unwrap(), 2);
        keeper.abort();
    }

    #[tokio::test]
    async fn a_run_that_lost_its_claim_saves_nothing_over_the_new_holder() {
        let f = fixture();
        with_lab(&f, LabState::DefinedOnCore);
        let (q, requests) = queue(&f);
        let r = q.submit(&cmd()).await.unwrap();
        *requests.steal.lock().unwrap() = true;
        assert_eq!(q.run_due().await.unwrap(), 1);
        let seen = q.get(&r.id).await.unwrap().unwrap();
        assert_eq!(
            (seen.status, seen.attempts),
            (DeleteRequestStatus::Running, 0),
            "the holder's state, untouched"
        );
    }

    #[test]
    fn backoff_doubles_from_the_base_and_is_capped() {
        let p = RetryPolicy {
            base: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            ..RetryPolicy::default()
        };
        let got: Vec<u128> = (1..=6).map(|n| p.backoff(n).as_millis()).collect();
        assert_eq!(got, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(p.backoff(u32::MAX), Duration::from_secs(1));
    }
}
