//! Asynchronous deletes: a delete request is stored, then carried out by a
//! background worker that retries with capped exponential backoff until CML
//! confirms (the lab is gone), a permanent error ends it, or it gives up.
//!
//! # Expected flow
//! 1. Submit: the request is stored unless the lab already has an active
//!    (pending or running) one; then the existing request is the answer.
//! 2. The runner claims due requests, several at once but at most one per
//!    worker (`delete.async_max_parallel`): a worker that hangs holds up
//!    its own deletes only. A claimed request is `running` with a claim
//!    token of its own and a short claim (`delete.async_claim_secs`),
//!    renewed every third of its length while the delete runs.
//! 3. The outcome is saved only if the claim is still this runner's: a run
//!    that lost its claim writes nothing over whoever holds it now.
//! 4. A pending request can be cancelled by its requester or an admin; a
//!    running one finishes its attempt first.
//!
//! # Guarantees
//! - A request is `done` only when the lab is gone in CML and its record is
//!   a tombstone; `failed` for errors retrying cannot fix (the lab is
//!   running and `force` was not asked, CML refused with a 4xx, the account
//!   is no CML admin, the worker is unknown or disabled, a stored record is
//!   corrupt), and when it gives up: after `delete.async_max_attempts`
//!   attempts, or once `delete.async_max_age_secs` have passed since it was
//!   submitted (a forced delete queued during an outage does not run days
//!   later, when nobody expects it).
//! - One active request per (worker, lab), across processes.
//! - One execution at a time per request, across processes: a live run
//!   keeps its claim, and a stale run's `pending` or `failed` never
//!   overwrites another's `done`. A cancelled request never runs again.
//! - A process that dies while running a request leaves it claimed until
//!   the claim expires; another runner then takes it again. Deletes are
//!   idempotent, so that second execution finds the lab gone.
//!
//! # Caveats
//! A runner that cannot renew its claim (the database is away longer than
//! the claim) may see another runner start the same delete; the delete is
//! idempotent and the second finds the lab gone.

use std::collections::HashSet;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use labsync_domain::{Actor, LabId, WorkerId};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::delete::DeleteLab;
use crate::errors::{AppError, CmlError, RepoError};
use crate::retry::{Backoff, next_pass};
use crate::services::Services;

/// The shortest time between two renewals of a claim, however short the
/// claim: a tiny `delete.async_claim_secs` must not make the keeper spin.
pub const MIN_CLAIM_RENEW_EVERY: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeleteRequestStatus {
    Pending,
    Running,
    Done,
    Failed,
    Cancelled,
}

impl DeleteRequestStatus {
    /// Every status, in the order a request may reach them.
    pub const ALL: [Self; 5] = [
        Self::Pending,
        Self::Running,
        Self::Done,
        Self::Failed,
        Self::Cancelled,
    ];

    /// Pending or running: the lab's one active request.
    pub fn is_active(self) -> bool {
        matches!(self, Self::Pending | Self::Running)
    }

    /// The word it is stored and shown as.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Done => "done",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// A stored delete request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeleteRequest {
    pub id: String,
    pub worker_id: WorkerId,
    pub lab_id: LabId,
    pub force: bool,
    pub requested_by: Actor,
    /// A self-service delete: only if CML says the lab is this user's.
    #[serde(default)]
    pub owned_by: Option<String>,
    pub status: DeleteRequestStatus,
    pub attempts: u32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub next_attempt_at: DateTime<Utc>,
    pub last_error: Option<String>,
    /// The final outcome of the delete, as the synchronous API returns it.
    pub outcome: Option<crate::delete::DeleteOutcome>,
    /// Who cancelled it.
    #[serde(default)]
    pub cancelled_by: Option<Actor>,
    /// Who asked to cancel it while an attempt was running: unless that
    /// attempt deletes the lab (or fails for good), the request ends
    /// cancelled instead of waiting for another attempt.
    #[serde(default)]
    pub cancel_requested_by: Option<Actor>,
}

/// The async delete queue at a glance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    pub pending: u64,
    pub running: u64,
    pub failed: u64,
    pub oldest_pending_at: Option<DateTime<Utc>>,
}

/// Stored delete requests.
#[async_trait]
pub trait DeleteRequests: Send + Sync {
    /// Stores `request` (pending) unless its (worker, lab) already has an
    /// active request; returns the lab's active request and whether it is
    /// the one just stored.
    ///
    /// MUST be atomic across processes: of concurrent submits for one lab,
    /// one request is stored and every caller gets it.
    ///
    /// # Errors
    /// [`RepoError`].
    async fn create_unless_active(
        &self,
        request: &DeleteRequest,
    ) -> Result<(DeleteRequest, bool), RepoError>;

    /// # Errors
    /// [`RepoError`].
    async fn get(&self, id: &str) -> Result<Option<DeleteRequest>, RepoError>;

    /// How many requests are pending, running and failed, and when the
    /// oldest pending one was submitted (for the gauges).
    ///
    /// # Errors
    /// [`RepoError`].
    async fn stats(&self) -> Result<QueueStats, RepoError>;

    /// The newest requests (by submission), of `status` if given.
    ///
    /// # Errors
    /// [`RepoError`].
    async fn recent(
        &self,
        status: Option<DeleteRequestStatus>,
        limit: usize,
    ) -> Result<Vec<DeleteRequest>, RepoError>;

    /// Takes one due request (pending and due, or running with an expired
    /// claim) of a worker not in `busy`, marks it running, claimed for
    /// `hold` under `claim` (a token unique to this attempt).
    ///
    /// MUST be atomic across processes: a request is claimed by one runner,
    /// and a cancelled one by none.
    ///
    /// # Errors
    /// [`RepoError`].
    async fn claim_due(
        &self,
        now: DateTime<Utc>,
        hold: Duration,
        claim: &str,
        busy: &[WorkerId],
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
    /// still claimed under `claim`; returns whether it was. A request that
    /// is no longer active frees its lab for a new one.
    ///
    /// # Errors
    /// [`RepoError`].
    async fn save(&self, request: &DeleteRequest, claim: &str) -> Result<bool, RepoError>;

    /// Cancels the request if it is pending (or running under a claim that
    /// expired), atomically with [`DeleteRequests::claim_due`], and frees
    /// its lab. A running request gets `cancel_requested_by` instead:
    /// MUST then save the attempt's retry (pending) as cancelled, and
    /// MUST NOT let [`DeleteRequests::claim_due`] take it again. Returns the
    /// request as it now is (`None`: no such request).
    ///
    /// # Errors
    /// [`RepoError`].
    async fn cancel(
        &self,
        id: &str,
        by: &Actor,
        now: DateTime<Utc>,
    ) -> Result<Option<DeleteRequest>, RepoError>;
}

/// Tunables of the queue.
#[derive(Debug, Clone)]
pub struct DeleteQueueSettings {
    /// The wait before a failed attempt is tried again.
    pub backoff: Backoff,
    /// How often due requests are looked for.
    pub poll: Duration,
    /// How long a claim lasts before another runner may take the request.
    pub claim: Duration,
    /// Attempts after which a request that keeps failing fails for good.
    pub max_attempts: u32,
    /// Age after which a request is not attempted any more.
    pub max_age: Duration,
    /// Requests carried out at once (one per worker).
    pub max_parallel: usize,
}

/// Why a request may not be cancelled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CancelError {
    #[error("no delete request {0:?}")]
    Unknown(String),
    #[error("delete request {id} has ended ({status:?}): there is nothing to cancel")]
    NotPending {
        id: String,
        status: DeleteRequestStatus,
    },
    #[error(transparent)]
    Repository(#[from] RepoError),
}

/// Submits and runs asynchronous deletes.
#[derive(Clone)]
pub struct DeleteQueue {
    services: Services,
    requests: std::sync::Arc<dyn DeleteRequests>,
    policy: DeleteQueueSettings,
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
        policy: DeleteQueueSettings,
    ) -> Self {
        Self {
            services,
            requests,
            policy,
        }
    }

    /// Stores a request, or finds the lab's active one; the runner carries
    /// it out. Returns the request and whether it is new.
    ///
    /// # Errors
    /// [`AppError::UnknownWorker`], [`AppError::WorkerDisabled`], or
    /// [`AppError::Repository`].
    pub async fn submit(&self, cmd: &DeleteLab) -> Result<(DeleteRequest, bool), AppError> {
        let access = self
            .services
            .workers
            .get(&cmd.worker_id)
            .await?
            .ok_or_else(|| AppError::UnknownWorker(cmd.worker_id.clone()))?;
        if !access.worker.enabled {
            return Err(AppError::WorkerDisabled(cmd.worker_id.clone()));
        }
        // A self-service delete is queued only once CML has said the lab is
        // theirs: queued, it holds the lab's one active request, which an
        // operator's later submit would be handed.
        if let Some(username) = cmd.owned_by.as_deref() {
            match cmd.owner_refusal(&self.services, &access).await {
                None => {}
                Some(crate::DeleteOutcomeKind::NotOwner { owner }) => {
                    return Err(AppError::NotLabOwner(crate::delete::not_owner_detail(
                        owner.as_deref(),
                        username,
                    )));
                }
                Some(other) => {
                    return Err(AppError::Cml(CmlError::Unreachable(format!(
                        "CML could not say who owns the lab ({}): try again",
                        other.word()
                    ))));
                }
            }
        }
        let now = self.services.clock.now();
        let request = DeleteRequest {
            id: uuid::Uuid::new_v4().to_string(),
            worker_id: cmd.worker_id.clone(),
            lab_id: cmd.lab_id,
            force: cmd.force,
            requested_by: cmd.requested_by.clone(),
            owned_by: cmd.owned_by.clone(),
            status: DeleteRequestStatus::Pending,
            attempts: 0,
            created_at: now,
            updated_at: now,
            next_attempt_at: now,
            last_error: None,
            outcome: None,
            cancelled_by: None,
            cancel_requested_by: None,
        };
        Ok(self.requests.create_unless_active(&request).await?)
    }

    /// # Errors
    /// [`AppError::Repository`].
    pub async fn get(&self, id: &str) -> Result<Option<DeleteRequest>, AppError> {
        Ok(self.requests.get(id).await?)
    }

    /// The newest requests, of `status` if given.
    ///
    /// # Errors
    /// [`AppError::Repository`].
    pub async fn recent(
        &self,
        status: Option<DeleteRequestStatus>,
        limit: usize,
    ) -> Result<Vec<DeleteRequest>, AppError> {
        Ok(self.requests.recent(status, limit).await?)
    }

    /// The queue at a glance.
    ///
    /// # Errors
    /// [`AppError::Repository`].
    pub async fn stats(&self) -> Result<QueueStats, AppError> {
        Ok(self.requests.stats().await?)
    }

    /// Cancels a pending request; a running one ends cancelled after its
    /// attempt unless that attempt deletes the lab (then it is `done`, and
    /// `cancel_requested_by` says the cancel came too late). Who may cancel
    /// is the caller's decision (the requester or an admin).
    ///
    /// # Errors
    /// [`CancelError`].
    pub async fn cancel(&self, id: &str, by: &Actor) -> Result<DeleteRequest, CancelError> {
        let r = self
            .requests
            .cancel(id, by, self.services.clock.now())
            .await?
            .ok_or_else(|| CancelError::Unknown(id.to_owned()))?;
        let requested = r.status == DeleteRequestStatus::Running && r.cancel_requested_by.is_some();
        if r.status == DeleteRequestStatus::Cancelled || requested {
            info!(request_id = %r.id, cancelled_by = %by, running = requested, "async delete cancelled");
            Ok(r)
        } else {
            Err(CancelError::NotPending {
                id: r.id,
                status: r.status,
            })
        }
    }

    /// Runs every due request once, several workers at once; returns how
    /// many were attempted.
    ///
    /// # Errors
    /// [`AppError::Repository`] when the requests cannot be read or saved.
    pub async fn run_due(&self) -> Result<usize, AppError> {
        let mut running = Running::default();
        let mut n = 0;
        loop {
            n += self.fill(&mut running).await?;
            match running.tasks.join_next_with_id().await {
                Some(done) => running.finished(done),
                None => return Ok(n),
            }
        }
    }

    /// Claims due requests of idle workers and starts them, up to the
    /// bound; returns how many were started.
    async fn fill(&self, running: &mut Running) -> Result<usize, AppError> {
        let mut started = 0;
        while running.tasks.len() < self.policy.max_parallel.max(1) {
            let claim = uuid::Uuid::new_v4().to_string();
            let busy: Vec<WorkerId> = running.busy.iter().cloned().collect();
            let Some(request) = self
                .requests
                .claim_due(self.services.clock.now(), self.policy.claim, &claim, &busy)
                .await?
            else {
                break;
            };
            let this = self.clone();
            running.start(request.worker_id.clone(), async move {
                this.carry_out(request, claim).await;
            });
            started += 1;
        }
        Ok(started)
    }

    /// One attempt of a claimed request, saved under its claim.
    async fn carry_out(&self, mut request: DeleteRequest, claim: String) {
        // Aborted when this attempt ends, panics or is dropped: a keeper
        // left running would hold the claim for the life of the process.
        let _keeper = AbortOnDrop(self.keep_claim(request.id.clone(), claim.clone()));
        self.attempt(&mut request).await;
        drop(_keeper);
        // Whether saved or not, the runner goes on; only the log differs
        // (a mutant of this condition is equivalent).
        match self.requests.save(&request, &claim).await {
            Ok(true) => {}
            Ok(false) => {
                warn!(request_id = %request.id, "the claim on this async delete was lost; its outcome is not saved over the new holder's");
            }
            Err(e) => {
                warn!(request_id = %request.id, error = %e, "the outcome of an async delete could not be saved; its claim expires and it runs again");
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
                tokio::time::sleep((hold / 3).max(MIN_CLAIM_RENEW_EVERY)).await;
                match requests.renew_claim(&id, &claim, clock.now(), hold).await {
                    Ok(true) => {}
                    Ok(false) => {
                        warn!(request_id = %id, "lost the claim on an async delete");
                        return;
                    }
                    Err(e) => {
                        warn!(request_id = %id, error = %e, "could not renew the claim on an async delete");
                    }
                }
            }
        })
    }

    async fn attempt(&self, r: &mut DeleteRequest) {
        let now = self.services.clock.now();
        let max_age =
            chrono::Duration::from_std(self.policy.max_age).unwrap_or(chrono::Duration::MAX);
        if now - r.created_at >= max_age {
            r.updated_at = now;
            r.status = DeleteRequestStatus::Failed;
            r.last_error = Some(format!(
                "gave up: not done within {} s of its submission ({} attempts; last error: {})",
                self.policy.max_age.as_secs(),
                r.attempts,
                r.last_error.as_deref().unwrap_or("none")
            ));
            warn!(request_id = %r.id, attempts = r.attempts, "async delete given up: too old");
            return;
        }
        r.attempts += 1;
        let result = DeleteLab {
            worker_id: r.worker_id.clone(),
            lab_id: r.lab_id,
            force: r.force,
            requested_by: r.requested_by.clone(),
            owned_by: r.owned_by.clone(),
        }
        .execute(&self.services)
        .await;
        let now = self.services.clock.now();
        r.updated_at = now;
        let retry = match result {
            Ok(outcome) => {
                let retry = !outcome.lab_gone && outcome.kind.is_retryable();
                r.last_error = (!outcome.lab_gone).then(|| outcome.message.clone());
                r.outcome = Some(outcome.clone());
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
        if retry && r.attempts >= self.policy.max_attempts {
            r.last_error = Some(format!(
                "gave up after {} attempts: {}",
                r.attempts,
                r.last_error.as_deref().unwrap_or("")
            ));
            warn!(request_id = %r.id, attempts = r.attempts, "async delete given up: too many attempts");
        } else if retry {
            r.status = DeleteRequestStatus::Pending;
            let wait = self.policy.backoff.delay(r.attempts);
            r.next_attempt_at =
                now + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::seconds(60));
            warn!(request_id = %r.id, attempts = r.attempts, error = r.last_error.as_deref().unwrap_or(""), "async delete will be retried");
        } else {
            info!(request_id = %r.id, status = ?r.status, attempts = r.attempts, "async delete finished");
        }
    }

    /// Runs due requests until `stop` turns true, looking for new ones
    /// every `poll` and whenever one finishes; requests in progress are
    /// finished first.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut running = Running::default();
        loop {
            if let Err(e) = self.fill(&mut running).await {
                warn!(error = %e, "async deletes could not be processed");
            }
            // A delete that ends makes room for the next at once.
            let one_ends = async {
                match running.tasks.join_next_with_id().await {
                    Some(done) => running.finished(done),
                    None => std::future::pending().await,
                }
            };
            if !next_pass(self.policy.poll, &mut stop, one_ends).await {
                break;
            }
        }
        while let Some(done) = running.tasks.join_next_with_id().await {
            running.finished(done);
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The requests in progress, and their workers.
#[derive(Default)]
struct Running {
    tasks: JoinSet<()>,
    workers: std::collections::HashMap<tokio::task::Id, WorkerId>,
    busy: HashSet<WorkerId>,
}

impl Running {
    fn start(
        &mut self,
        worker: WorkerId,
        task: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let handle = self.tasks.spawn(task);
        self.busy.insert(worker.clone());
        self.workers.insert(handle.id(), worker);
    }

    fn finished(&mut self, done: Result<(tokio::task::Id, ()), tokio::task::JoinError>) {
        let id = match done {
            Ok((id, ())) => id,
            Err(e) => {
                // A panic in a delete: its claim expires and it runs again.
                warn!(error = %e, "an async delete task failed");
                e.id()
            }
        };
        if let Some(worker) = self.workers.remove(&id) {
            self.busy.remove(&worker);
        }
    }
}

#[cfg(test)]
mod tests {
    /// Test values of the queue's tunables (the defaults live in
    /// config/default.toml).
    fn test_settings() -> DeleteQueueSettings {
        DeleteQueueSettings {
            backoff: Backoff {
                base: Duration::from_secs(1),
                max: Duration::from_secs(60),
            },
            poll: Duration::from_millis(500),
            claim: Duration::from_secs(60),
            max_attempts: 20,
            max_age: Duration::from_secs(3600),
            max_parallel: 8,
        }
    }

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
        async fn recent(
            &self,
            status: Option<DeleteRequestStatus>,
            limit: usize,
        ) -> Result<Vec<DeleteRequest>, RepoError> {
            let mut found: Vec<DeleteRequest> = self
                .stored
                .lock()
                .unwrap()
                .iter()
                .map(|(r, _)| r.clone())
                .filter(|r| status.is_none_or(|s| r.status == s))
                .collect();
            found.sort_by_key(|r| std::cmp::Reverse(r.created_at));
            found.truncate(limit);
            Ok(found)
        }
        async fn stats(&self) -> Result<QueueStats, RepoError> {
            let stored = self.stored.lock().unwrap();
            let count = |s: DeleteRequestStatus| {
                stored.iter().filter(|(r, _)| r.status == s).count() as u64
            };
            Ok(QueueStats {
                pending: count(DeleteRequestStatus::Pending),
                running: count(DeleteRequestStatus::Running),
                failed: count(DeleteRequestStatus::Failed),
                oldest_pending_at: stored
                    .iter()
                    .filter(|(r, _)| r.status == DeleteRequestStatus::Pending)
                    .map(|(r, _)| r.created_at)
                    .min(),
            })
        }

        async fn create_unless_active(
            &self,
            r: &DeleteRequest,
        ) -> Result<(DeleteRequest, bool), RepoError> {
            let mut stored = self.stored.lock().unwrap();
            if let Some((active, _)) = stored.iter().find(|(o, _)| {
                o.worker_id == r.worker_id && o.lab_id == r.lab_id && o.status.is_active()
            }) {
                return Ok((active.clone(), false));
            }
            stored.push((r.clone(), None));
            Ok((r.clone(), true))
        }
        async fn cancel(
            &self,
            id: &str,
            by: &Actor,
            now: DateTime<Utc>,
        ) -> Result<Option<DeleteRequest>, RepoError> {
            let mut stored = self.stored.lock().unwrap();
            let Some((r, _)) = stored.iter_mut().find(|(r, _)| r.id == id) else {
                return Ok(None);
            };
            match r.status {
                DeleteRequestStatus::Pending => {
                    r.status = DeleteRequestStatus::Cancelled;
                    r.cancelled_by = Some(by.clone());
                    r.updated_at = now;
                }
                DeleteRequestStatus::Running => r.cancel_requested_by = Some(by.clone()),
                _ => {}
            }
            Ok(Some(r.clone()))
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
            busy: &[WorkerId],
        ) -> Result<Option<DeleteRequest>, RepoError> {
            let steal = *self.steal.lock().unwrap();
            let mut stored = self.stored.lock().unwrap();
            let Some((r, c)) = stored.iter_mut().find(|(r, c)| {
                r.status == DeleteRequestStatus::Pending
                    && r.next_attempt_at <= now
                    && c.is_none()
                    && !busy.contains(&r.worker_id)
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
                    let mut saved = request.clone();
                    if let Some(by) = entry.0.cancel_requested_by.clone() {
                        saved.cancel_requested_by = Some(by.clone());
                        if saved.status == DeleteRequestStatus::Pending {
                            saved.status = DeleteRequestStatus::Cancelled;
                            saved.cancelled_by = Some(by);
                        }
                    }
                    *entry = (saved, None);
                    Ok(true)
                }
                None => Ok(false),
            }
        }
    }

    fn queue(f: &Fixture) -> (DeleteQueue, Arc<FakeRequests>) {
        let requests = Arc::new(FakeRequests::default());
        let policy = DeleteQueueSettings {
            backoff: Backoff {
                base: Duration::from_secs(10),
                max: Duration::from_secs(60),
            },
            ..test_settings()
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
            requested_by: Actor::cli("unit"),
            owned_by: None,
        }
    }

    #[tokio::test]
    async fn a_due_request_runs_once_and_ends_done_with_its_outcome() {
        let f = fixture();
        with_lab(&f, LabState::DefinedOnCore);
        let (q, _) = queue(&f);
        let (r, _) = q.submit(&cmd()).await.unwrap();
        assert_eq!(q.run_due().await.unwrap(), 1);
        assert_eq!(q.run_due().await.unwrap(), 0, "nothing left");
        let done = q.get(&r.id).await.unwrap().unwrap();
        assert_eq!((done.status, done.attempts), (DeleteRequestStatus::Done, 1));
        assert_eq!(
            done.outcome.unwrap().kind,
            crate::DeleteOutcomeKind::Deleted
        );
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
        let (r, _) = q.submit(&cmd()).await.unwrap();
        q.run_due().await.unwrap();
        let pending = q.get(&r.id).await.unwrap().unwrap();
        assert_eq!(
            (pending.status, pending.attempts),
            (DeleteRequestStatus::Pending, 1)
        );
        let wait = pending.next_attempt_at - pending.updated_at;
        assert!(
            wait <= chrono::Duration::seconds(10) && wait >= chrono::Duration::seconds(8),
            "the base backoff, less its jitter: {wait}"
        );
        assert!(pending.last_error.unwrap().contains("down"));

        let f = fixture();
        with_lab(&f, LabState::Started);
        let (q, _) = queue(&f);
        let (r, _) = q.submit(&cmd()).await.unwrap();
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
            DeleteQueueSettings {
                claim: Duration::from_secs(3),
                ..test_settings()
            },
        );
        let (r, _) = q.submit(&cmd()).await.unwrap();
        let claimed = requests
            .claim_due(chrono::Utc::now(), Duration::from_secs(3), "mine", &[])
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
        let (r, _) = q.submit(&cmd()).await.unwrap();
        *requests.steal.lock().unwrap() = true;
        assert_eq!(q.run_due().await.unwrap(), 1);
        let seen = q.get(&r.id).await.unwrap().unwrap();
        assert_eq!(
            (seen.status, seen.attempts),
            (DeleteRequestStatus::Running, 0),
            "the holder's state, untouched"
        );
    }

    #[tokio::test]
    async fn a_second_submit_for_the_same_lab_gets_the_active_request() {
        let f = fixture();
        with_lab(&f, LabState::DefinedOnCore);
        let (q, requests) = queue(&f);
        let (first, new) = q.submit(&cmd()).await.unwrap();
        assert!(new);
        let (again, new) = q
            .submit(&DeleteLab {
                force: true,
                ..cmd()
            })
            .await
            .unwrap();
        assert!(!new);
        assert_eq!(again.id, first.id);
        assert!(!again.force, "the first submit's");
        assert_eq!(requests.stored.lock().unwrap().len(), 1);
        q.run_due().await.unwrap();
        let (after, new) = q.submit(&cmd()).await.unwrap();
        assert!(new, "a finished request frees the lab");
        assert_ne!(after.id, first.id);
    }

    #[tokio::test]
    async fn a_cancelled_request_never_runs_and_only_a_pending_one_can_be_cancelled() {
        let f = fixture();
        with_lab(&f, LabState::DefinedOnCore);
        let (q, _) = queue(&f);
        let (r, _) = q.submit(&cmd()).await.unwrap();
        let cancelled = q.cancel(&r.id, &Actor::api("someone")).await.unwrap();
        assert_eq!(cancelled.status, DeleteRequestStatus::Cancelled);
        assert_eq!(cancelled.cancelled_by, Some(Actor::api("someone")));
        assert_eq!(q.run_due().await.unwrap(), 0);
        assert!(
            f.cml.labs.lock().unwrap().contains_key(&lab(1)),
            "not deleted"
        );
        assert!(
            f.cml.calls().iter().all(|c| !c.starts_with("delete")),
            "{:?}",
            f.cml.calls()
        );
        assert_eq!(
            q.cancel(&r.id, &Actor::api("other"))
                .await
                .unwrap()
                .cancelled_by,
            Some(Actor::api("someone")),
            "cancelling twice is cancelling once"
        );
        let (done, _) = q.submit(&cmd()).await.unwrap();
        q.run_due().await.unwrap();
        assert_eq!(
            q.cancel(&done.id, &Actor::api("someone")).await,
            Err(CancelError::NotPending {
                id: done.id.clone(),
                status: DeleteRequestStatus::Done
            })
        );
        assert_eq!(
            q.cancel("nope", &Actor::api("x")).await,
            Err(CancelError::Unknown("nope".into()))
        );
    }

    #[tokio::test]
    async fn a_request_that_keeps_failing_gives_up_after_its_attempts() {
        let f = fixture();
        with_lab(&f, LabState::DefinedOnCore);
        f.cml
            .fail
            .lock()
            .unwrap()
            .insert("state", crate::CmlError::Unreachable("down".into()));
        let requests = Arc::new(FakeRequests::default());
        let q = DeleteQueue::new(
            f.services.clone(),
            requests.clone(),
            DeleteQueueSettings {
                backoff: Backoff {
                    base: Duration::ZERO,
                    max: Duration::ZERO,
                },
                max_attempts: 3,
                ..test_settings()
            },
        );
        let (r, _) = q.submit(&cmd()).await.unwrap();
        for _ in 0..5 {
            q.run_due().await.unwrap();
        }
        let failed = q.get(&r.id).await.unwrap().unwrap();
        assert_eq!(
            (failed.status, failed.attempts),
            (DeleteRequestStatus::Failed, 3)
        );
        let why = failed.last_error.unwrap();
        assert!(
            why.contains("gave up after 3 attempts") && why.contains("down"),
            "{why}"
        );
    }

    #[tokio::test]
    async fn a_request_older_than_its_maximum_age_is_not_attempted() {
        let f = fixture();
        with_lab(&f, LabState::DefinedOnCore);
        let requests = Arc::new(FakeRequests::default());
        let q = DeleteQueue::new(
            f.services.clone(),
            requests.clone(),
            DeleteQueueSettings {
                max_age: Duration::from_secs(60),
                ..test_settings()
            },
        );
        let (r, _) = q
            .submit(&DeleteLab {
                force: true,
                ..cmd()
            })
            .await
            .unwrap();
        requests.stored.lock().unwrap()[0].0.created_at -= chrono::Duration::seconds(61);
        q.run_due().await.unwrap();
        let failed = q.get(&r.id).await.unwrap().unwrap();
        assert_eq!(
            (failed.status, failed.attempts),
            (DeleteRequestStatus::Failed, 0)
        );
        assert!(failed.last_error.unwrap().contains("gave up"));
        assert!(
            f.cml.labs.lock().unwrap().contains_key(&lab(1)),
            "CML untouched"
        );
    }

    #[tokio::test]
    async fn a_disabled_worker_takes_no_delete_requests() {
        let mut f = fixture();
        f.disable_worker();
        let (q, _) = queue(&f);
        assert_eq!(
            q.submit(&cmd()).await.map(|_| ()),
            Err(AppError::WorkerDisabled(worker_id()))
        );
    }

    #[tokio::test]
    async fn a_cancel_during_an_attempt_is_taken_and_an_ended_request_refuses_one() {
        let f = fixture();
        with_lab(&f, LabState::DefinedOnCore);
        let (q, requests) = queue(&f);
        let (r, _) = q.submit(&cmd()).await.unwrap();
        let mut running = requests
            .claim_due(chrono::Utc::now(), Duration::from_secs(60), "c", &[])
            .await
            .unwrap()
            .unwrap();
        let asked = q.cancel(&r.id, &Actor::api("x")).await.unwrap();
        assert_eq!(asked.status, DeleteRequestStatus::Running);
        assert_eq!(asked.cancel_requested_by, Some(Actor::api("x")));
        running.status = DeleteRequestStatus::Failed;
        assert!(requests.save(&running, "c").await.unwrap());
        assert_eq!(
            q.cancel(&r.id, &Actor::api("x")).await,
            Err(CancelError::NotPending {
                id: r.id.clone(),
                status: DeleteRequestStatus::Failed
            }),
            "it ended failed; a cancel asked for before stays on record only"
        );
    }

    #[tokio::test]
    async fn no_more_requests_run_at_once_than_the_bound() {
        let f = fixture();
        let requests = Arc::new(FakeRequests::default());
        let q = DeleteQueue::new(
            f.services.clone(),
            requests.clone(),
            DeleteQueueSettings {
                max_parallel: 1,
                ..test_settings()
            },
        );
        for w in ["cml-1", "cml-2"] {
            let (mut r, _) = q.submit(&cmd()).await.unwrap();
            r.id = format!("{w}-request");
            r.worker_id = WorkerId::parse(w).unwrap();
            requests.stored.lock().unwrap().push((r, None));
        }
        // Only the two: the submitted original goes.
        requests.stored.lock().unwrap().remove(0);
        assert_eq!(requests.stored.lock().unwrap().len(), 2);
        let mut running = Running::default();
        assert_eq!(q.fill(&mut running).await.unwrap(), 1);
        assert_eq!(running.busy.len(), 1);
        while let Some(done) = running.tasks.join_next_with_id().await {
            running.finished(done);
        }
        assert!(
            running.busy.is_empty(),
            "a finished request frees its worker"
        );
    }
}
