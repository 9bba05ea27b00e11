//! The inventory as people see it: workers with their sync state, a
//! worker's labs page by page, one lab with its history and audit trail;
//! and the admin's changes to workers. Reads come from the store only,
//! never live from CML.

use chrono::{DateTime, Utc};
use labsync_domain::{Actor, LabId, LabRecord, Worker, WorkerChanges, WorkerId};
use secrecy::SecretString;
use serde::Serialize;

use crate::connection::{ConnectionCheck, check_connection};
use crate::errors::{AppError, RepoError};
use crate::ports::{
    AuditAction, AuditEntry, AuditQuery, FleetCursor, FleetLabQuery, LabQuery, LabSort, RunQuery,
    StoredAudit, WorkerAccess,
};
use crate::refresh::{RunReport, RunStatus, WORKER_REMOVED};
use crate::services::Services;

/// How a worker's inventory stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncState {
    Disabled,
    NeverSynced,
    Synced,
    /// The last run failed; the inventory may be stale.
    Failing,
}

impl SyncState {
    pub const ALL: [Self; 4] = [
        Self::Disabled,
        Self::NeverSynced,
        Self::Synced,
        Self::Failing,
    ];

    /// The word it is serialized and exported as.
    pub const fn word(self) -> &'static str {
        match self {
            Self::Disabled => "disabled",
            Self::NeverSynced => "never_synced",
            Self::Synced => "synced",
            Self::Failing => "failing",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct WorkerOverview {
    pub worker: Worker,
    pub sync_state: SyncState,
    pub last_run: Option<RunReport>,
    /// A run of the worker started and not finished, if any.
    pub running: Option<RunReport>,
}

/// Largest page a caller may ask for.
pub const MAX_PAGE: usize = 1000;

/// The newest audit entries shown with a lab.
pub const LAB_AUDIT_SHOWN: usize = 50;

/// Run reports listed when no limit is asked for.
pub const DEFAULT_RUNS: usize = 50;
pub const DEFAULT_PAGE: usize = 100;

#[derive(Debug, Clone)]
pub struct LabPage {
    pub items: Vec<LabRecord>,
    /// Pass as `after` to get the next page; `None` on the last page.
    pub next_cursor: Option<LabId>,
}

/// A page of the audit log.
#[derive(Debug, Clone)]
pub struct AuditPage {
    pub items: Vec<StoredAudit>,
    /// Pass as `before` to get the next (older) page; `None` on the last.
    pub next_cursor: Option<String>,
}

/// A page of labs across the fleet.
#[derive(Debug, Clone)]
pub struct FleetLabPage {
    pub items: Vec<LabRecord>,
    /// Pass as `after` to get the next page; `None` on the last page.
    pub next_cursor: Option<FleetCursor>,
}

#[derive(Debug, Clone)]
pub struct LabDetail {
    pub record: LabRecord,
    pub audit: Vec<AuditEntry>,
}

/// How often a change to a worker is applied again when another change
/// landed between its read and its write.
pub const UPDATE_ATTEMPTS: usize = 5;

/// Queries and admin commands over the inventory.
#[derive(Debug, Clone)]
pub struct Inventory {
    services: Services,
}

impl Inventory {
    pub fn new(services: Services) -> Self {
        Self { services }
    }

    async fn require_worker(&self, id: &WorkerId) -> Result<Worker, AppError> {
        self.services
            .workers
            .settings(id)
            .await?
            .ok_or_else(|| AppError::UnknownWorker(id.clone()))
    }

    async fn record_audit(
        &self,
        actor: &Actor,
        action: AuditAction,
        worker: &WorkerId,
        detail: String,
    ) {
        let entry = AuditEntry {
            at: self.services.clock.now(),
            actor: actor.clone(),
            action,
            worker_id: worker.clone(),
            lab_id: None,
            outcome: "done".into(),
            detail,
        };
        if let Err(e) = self.services.audit.record(vec![entry]).await {
            tracing::warn!(error = %e, "could not write the audit entry");
        }
    }

    /// Every worker, with its last run and sync state.
    ///
    /// # Errors
    /// [`AppError::Repository`].
    pub async fn workers(&self) -> Result<Vec<WorkerOverview>, AppError> {
        let workers = self.services.workers.list().await?;
        let mut out = Vec::with_capacity(workers.len());
        for worker in workers {
            out.push(self.overview(worker).await?);
        }
        Ok(out)
    }

    /// Every worker, ordered by id, in one read: for pickers, which need
    /// no runs.
    ///
    /// # Errors
    /// [`AppError::Repository`].
    pub async fn registered(&self) -> Result<Vec<Worker>, AppError> {
        Ok(self.services.workers.list().await?)
    }

    /// # Errors
    /// [`AppError::UnknownWorker`], [`AppError::Repository`].
    pub async fn worker(&self, id: &WorkerId) -> Result<WorkerOverview, AppError> {
        let worker = self.require_worker(id).await?;
        self.overview(worker).await
    }

    async fn overview(&self, worker: Worker) -> Result<WorkerOverview, AppError> {
        let now = self.services.clock.now();
        let ttl = self.services.settings.lease_ttl;
        let running = self
            .services
            .reports
            .recent(&RunQuery {
                worker: Some(worker.id.clone()),
                status: Some(RunStatus::Running),
                outcomes_only: false,
                limit: 1,
            })
            .await?
            .into_iter()
            .map(|r| r.as_seen_at(now, ttl))
            .find(|r| r.status == RunStatus::Running);
        // The last run that says something about the inventory: skips and
        // dry runs do not, however many came since.
        let last_run = self
            .services
            .reports
            .recent(&RunQuery {
                worker: Some(worker.id.clone()),
                status: None,
                outcomes_only: true,
                limit: 1,
            })
            .await?
            .into_iter()
            .next();
        let sync_state = match (&last_run, worker.enabled) {
            (_, false) => SyncState::Disabled,
            (None, _) => SyncState::NeverSynced,
            (Some(r), _) if r.status == RunStatus::Failed => SyncState::Failing,
            _ => SyncState::Synced,
        };
        Ok(WorkerOverview {
            worker,
            sync_state,
            last_run,
            running,
        })
    }

    /// # Errors
    /// [`AppError::WorkerExists`], [`AppError::Repository`].
    pub async fn register(
        &self,
        worker: Worker,
        password: SecretString,
        actor: &Actor,
    ) -> Result<WorkerOverview, AppError> {
        worker.validate().map_err(AppError::Invalid)?;
        match self.services.workers.add(&worker, &password).await {
            Ok(()) => {}
            Err(RepoError::Duplicate(_)) => return Err(AppError::WorkerExists(worker.id)),
            Err(e) => return Err(e.into()),
        }
        self.record_audit(
            actor,
            AuditAction::WorkerAdded,
            &worker.id,
            format!("url {}", worker.base_url),
        )
        .await;
        self.overview(worker).await
    }

    /// Applies `changes` to the worker as it is stored. Only the fields
    /// the changes name change: the write goes through only if the worker
    /// is still as it was read, and a change that lost the race to another
    /// is applied again to what that one wrote, checked again as a whole
    /// (so two PATCHes of different fields both land, and two that
    /// together would make an invalid worker cannot both pass).
    ///
    /// # Errors
    /// [`AppError::UnknownWorker`], [`AppError::Invalid`],
    /// [`AppError::Conflict`] when other changes won every attempt,
    /// [`AppError::Repository`].
    pub async fn update(
        &self,
        id: &WorkerId,
        changes: WorkerChanges,
        password: Option<SecretString>,
        actor: &Actor,
    ) -> Result<WorkerOverview, AppError> {
        for _ in 0..UPDATE_ATTEMPTS {
            let before = self.require_worker(id).await?;
            let (worker, changed) = before
                .changed(&changes, password.is_some())
                .map_err(AppError::Invalid)?;
            if self
                .services
                .workers
                .update(&before, &worker, password.as_ref())
                .await?
            {
                self.record_audit(
                    actor,
                    AuditAction::WorkerUpdated,
                    id,
                    format!("changed {}", changed.join(", ")),
                )
                .await;
                return self.overview(worker).await;
            }
            // Changed (or removed) since it was read: read it again.
        }
        Err(AppError::Conflict(format!(
            "worker {id} kept changing while this change was applied; try again"
        )))
    }

    /// Removes the worker and every record of its labs; returns how many
    /// records went.
    ///
    /// # Errors
    /// [`AppError::UnknownWorker`], [`AppError::Repository`].
    pub async fn remove(&self, id: &WorkerId, actor: &Actor) -> Result<u64, AppError> {
        // A refresh of the worker in progress loses its lease first, so
        // that it writes nothing after the records are gone (and a worker
        // registered again under this id starts empty).
        self.services
            .lease
            .revoke(id, self.services.settings.run_deadline)
            .await?;
        if !self.services.workers.remove(id).await? {
            return Err(AppError::UnknownWorker(id.clone()));
        }
        let records = self.services.labs.remove_worker(id).await?;
        // Its runs in progress end with it (they lost the lease above).
        let now = self.services.clock.now();
        if let Err(e) = self
            .services
            .reports
            .abandon_running(id, DateTime::<Utc>::MAX_UTC, now, WORKER_REMOVED)
            .await
        {
            tracing::warn!(error = %e, "could not end the removed worker's runs");
        }
        self.record_audit(
            actor,
            AuditAction::WorkerRemoved,
            id,
            format!("{records} lab records removed"),
        )
        .await;
        Ok(records)
    }

    /// A page of a worker's labs, in lab id order.
    ///
    /// # Errors
    /// [`AppError::UnknownWorker`], [`AppError::Invalid`] for a bad limit,
    /// [`AppError::Repository`].
    pub async fn labs(&self, id: &WorkerId, mut query: LabQuery) -> Result<LabPage, AppError> {
        if query.limit == 0 || query.limit > MAX_PAGE {
            return Err(AppError::Invalid(format!(
                "limit must be between 1 and {MAX_PAGE}"
            )));
        }
        self.require_worker(id).await?;
        let limit = query.limit;
        // One more than asked tells whether there is a next page.
        query.limit += 1;
        let mut items = self.services.labs.page(id, &query).await?;
        let next_cursor = if items.len() > limit {
            items.truncate(limit);
            items.last().map(|r| r.lab_id)
        } else {
            None
        };
        Ok(LabPage { items, next_cursor })
    }

    /// A page of labs across the fleet (or one worker), in the order the
    /// query asks for.
    ///
    /// # Errors
    /// [`AppError::Invalid`] for a bad limit, [`AppError::Repository`].
    pub async fn fleet_labs(&self, mut query: FleetLabQuery) -> Result<FleetLabPage, AppError> {
        let limit = query.filter.limit;
        if limit == 0 || limit > MAX_PAGE {
            return Err(AppError::Invalid(format!(
                "limit must be between 1 and {MAX_PAGE}"
            )));
        }
        // One more than asked tells whether there is a next page.
        query.filter.limit += 1;
        let mut items = if query.sort == LabSort::Worker {
            self.fleet_by_worker(&query).await?
        } else {
            self.services.labs.fleet_page(&query).await?
        };
        let next_cursor = if items.len() > limit {
            items.truncate(limit);
            items.last().map(|r| query.sort.cursor(r))
        } else {
            None
        };
        Ok(FleetLabPage { items, next_cursor })
    }

    /// The fleet in (worker, lab) order, one worker's page after another:
    /// each read is an equality on the worker and a range on the lab id,
    /// which any server answers from the unique index, where one read of
    /// the whole fleet in that order may be sorted in memory. A filter
    /// that matches few labs reads every worker once.
    async fn fleet_by_worker(&self, query: &FleetLabQuery) -> Result<Vec<LabRecord>, RepoError> {
        let want = query.filter.limit;
        let workers: Vec<WorkerId> = match &query.worker {
            Some(w) => vec![w.clone()],
            None => self
                .services
                .workers
                .list()
                .await?
                .into_iter()
                .map(|w| w.id)
                .collect(),
        };
        let mut items = Vec::new();
        for w in workers {
            let after = match &query.after {
                Some(c) if w < c.worker => continue,
                Some(c) if w == c.worker => Some(c.lab),
                _ => None,
            };
            let filter = LabQuery {
                after,
                limit: want - items.len(),
                ..query.filter.clone()
            };
            items.extend(self.services.labs.page(&w, &filter).await?);
            if items.len() >= want {
                break;
            }
        }
        Ok(items)
    }

    /// Tries settings not saved yet against their CML server.
    pub async fn check_settings(&self, worker: Worker, password: SecretString) -> ConnectionCheck {
        let access = WorkerAccess { worker, password };
        check_connection(self.services.cml.as_ref(), &access).await
    }

    /// Tries the worker's stored settings, with `changes` applied as an
    /// update would apply them, against its CML server: the stored
    /// password unless `password` is given, and only where an update
    /// would accept it without one (a new URL, user or TLS setting needs
    /// it again).
    ///
    /// # Errors
    /// [`AppError::UnknownWorker`], [`AppError::Invalid`] for changes an
    /// update would refuse, [`AppError::Repository`] (a stored password
    /// that does not decrypt included).
    pub async fn check_worker(
        &self,
        id: &WorkerId,
        changes: &WorkerChanges,
        password: Option<SecretString>,
    ) -> Result<ConnectionCheck, AppError> {
        let stored = self
            .services
            .workers
            .get(id)
            .await?
            .ok_or_else(|| AppError::UnknownWorker(id.clone()))?;
        let (worker, _) = stored
            .worker
            .changed(changes, password.is_some())
            .map_err(AppError::Invalid)?;
        let access = WorkerAccess {
            worker,
            password: password.unwrap_or(stored.password),
        };
        Ok(check_connection(self.services.cml.as_ref(), &access).await)
    }

    /// How many labs the worker has in each state.
    ///
    /// # Errors
    /// [`AppError::Repository`].
    pub async fn lab_counts(&self, worker: &WorkerId) -> Result<Vec<(String, u64)>, AppError> {
        Ok(self.services.labs.count_by_state(worker).await?)
    }

    /// Audit entries, newest first: who deleted, pruned or refreshed what,
    /// and how it ended, labs that are gone included.
    ///
    /// # Errors
    /// [`AppError::Invalid`] for a bad limit, [`AppError::Repository`].
    pub async fn audit(&self, mut query: AuditQuery) -> Result<AuditPage, AppError> {
        let limit = query.limit;
        if limit == 0 || limit > MAX_PAGE {
            return Err(AppError::Invalid(format!(
                "limit must be between 1 and {MAX_PAGE}"
            )));
        }
        query.limit += 1;
        let mut items = self.services.audit.search(&query).await?;
        let next_cursor = if items.len() > limit {
            items.truncate(limit);
            items.last().map(|a| a.id.clone())
        } else {
            None
        };
        Ok(AuditPage { items, next_cursor })
    }

    /// One lab with its history and its audit trail.
    ///
    /// # Errors
    /// [`AppError::UnknownWorker`], [`AppError::UnknownLab`], [`AppError::Repository`].
    pub async fn lab(&self, id: &WorkerId, lab: &LabId) -> Result<LabDetail, AppError> {
        self.require_worker(id).await?;
        let record = self
            .services
            .labs
            .get(id, lab)
            .await?
            .ok_or_else(|| AppError::UnknownLab(id.clone(), *lab))?;
        let audit = self
            .services
            .audit
            .recent(id, Some(lab), LAB_AUDIT_SHOWN)
            .await?;
        Ok(LabDetail { record, audit })
    }

    /// Recent run reports, newest first.
    ///
    /// # Errors
    /// [`AppError::Repository`].
    pub async fn runs(&self, mut query: RunQuery) -> Result<Vec<RunReport>, AppError> {
        query.limit = query.limit.clamp(1, MAX_PAGE);
        let (now, ttl) = (self.services.clock.now(), self.services.settings.lease_ttl);
        Ok(self
            .services
            .reports
            .recent(&query)
            .await?
            .into_iter()
            .map(|r| r.as_seen_at(now, ttl))
            // Asked for runs in progress: not those whose process is gone.
            .filter(|r| query.status.is_none_or(|s| r.status == s))
            .collect())
    }

    /// One run's report, `running` while it runs.
    ///
    /// # Errors
    /// [`AppError::UnknownRun`], [`AppError::Repository`].
    pub async fn run(&self, run_id: &str) -> Result<RunReport, AppError> {
        self.services
            .reports
            .get(run_id)
            .await?
            .map(|r| r.as_seen_at(self.services.clock.now(), self.services.settings.lease_ttl))
            .ok_or_else(|| AppError::UnknownRun(run_id.chars().take(64).collect()))
    }
}
