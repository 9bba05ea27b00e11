//! The inventory as people see it: workers with their sync state, a
//! worker's labs page by page, one lab with its history and audit trail;
//! and the admin's changes to workers. Reads come from the store only,
//! never live from CML.

use labsync_domain::{Actor, LabId, LabRecord, Worker, WorkerId};
use secrecy::SecretString;
use serde::Serialize;

use crate::errors::{AppError, RepoError};
use crate::ports::{AuditAction, AuditEntry, LabQuery};
use crate::refresh::{RunReport, RunStatus};
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

#[derive(Debug, Clone, Serialize)]
pub struct WorkerOverview {
    pub worker: Worker,
    pub sync_state: SyncState,
    pub last_run: Option<RunReport>,
}

/// Largest page a caller may ask for.
pub const MAX_PAGE: usize = 1000;
pub const DEFAULT_PAGE: usize = 100;

#[derive(Debug, Clone)]
pub struct LabPage {
    pub items: Vec<LabRecord>,
    /// Pass as `after` to get the next page; `None` on the last page.
    pub next_cursor: Option<LabId>,
}

#[derive(Debug, Clone)]
pub struct LabDetail {
    pub record: LabRecord,
    pub audit: Vec<AuditEntry>,
}

/// Changes to a worker; absent fields stay as they are.
#[derive(Debug, Clone, Default)]
pub struct WorkerChanges {
    pub name: Option<String>,
    pub base_url: Option<String>,
    pub username: Option<String>,
    pub password: Option<SecretString>,
    /// `Some(None)` removes the CA bundle.
    pub ca_cert_pem: Option<Option<String>>,
    pub insecure: Option<bool>,
    pub allow_http: Option<bool>,
    pub enabled: Option<bool>,
    pub lab_tiles: Option<bool>,
}

/// How often a change to a worker is applied again when another change
/// landed between its read and its write.
pub const UPDATE_ATTEMPTS: usize = 5;

/// `before` with `changes` applied, and the names of the fields they set;
/// checked as a whole, as a registration is.
///
/// # Errors
/// [`AppError::Invalid`] for a worker that registration would refuse, or
/// for a change of where or how the password goes without the password.
fn apply_changes(
    before: &Worker,
    changes: &WorkerChanges,
) -> Result<(Worker, Vec<&'static str>), AppError> {
    let mut worker = before.clone();
    let mut changed: Vec<&'static str> = Vec::new();
    if let Some(v) = &changes.name {
        worker.name.clone_from(v);
        changed.push("name");
    }
    if let Some(v) = &changes.base_url {
        worker.base_url = labsync_domain::parse_base_url(v).map_err(AppError::Invalid)?;
        changed.push("base_url");
    }
    if let Some(v) = &changes.username {
        worker.username.clone_from(v);
        changed.push("username");
    }
    if let Some(v) = &changes.ca_cert_pem {
        worker.tls.ca_cert_pem.clone_from(v);
        changed.push("ca_cert_pem");
    }
    if let Some(v) = changes.insecure {
        worker.tls.insecure = v;
        changed.push("insecure");
    }
    if let Some(v) = changes.allow_http {
        worker.tls.allow_http = v;
        changed.push("allow_http");
    }
    if let Some(v) = changes.enabled {
        worker.enabled = v;
        changed.push("enabled");
    }
    if let Some(v) = changes.lab_tiles {
        worker.lab_tiles = v;
        changed.push("lab_tiles");
    }
    if changes.password.is_some() {
        changed.push("password");
    }
    // The same check as a registration: a change cannot store what
    // registering would refuse.
    worker.validate().map_err(AppError::Invalid)?;
    // Whoever may change the URL must not thereby learn the password:
    // it goes to a new place (or as a new user) only when given again.
    // Nor by loosening how it is protected on the way (a CA of one's
    // own, no verification, plain HTTP): a man in the middle reads it.
    if (worker.base_url != before.base_url
        || worker.username != before.username
        || worker.tls != before.tls)
        && changes.password.is_none()
    {
        return Err(AppError::Invalid(
            "changing a worker's URL, username or TLS settings needs its password again".into(),
        ));
    }
    Ok((worker, changed))
}

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
        Ok(self
            .services
            .workers
            .get(id)
            .await?
            .ok_or_else(|| AppError::UnknownWorker(id.clone()))?
            .worker)
    }

    async fn audit(&self, actor: &Actor, action: AuditAction, worker: &WorkerId, detail: String) {
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

    /// # Errors
    /// [`AppError::UnknownWorker`], [`AppError::Repository`].
    pub async fn worker(&self, id: &WorkerId) -> Result<WorkerOverview, AppError> {
        let worker = self.require_worker(id).await?;
        self.overview(worker).await
    }

    async fn overview(&self, worker: Worker) -> Result<WorkerOverview, AppError> {
        // The last run that did something: skips say nothing about the inventory.
        let last_run = self
            .services
            .reports
            .recent(Some(&worker.id), 10)
            .await?
            .into_iter()
            .find(|r| r.status != RunStatus::Skipped && !r.dry_run);
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
        self.audit(
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
        actor: &Actor,
    ) -> Result<WorkerOverview, AppError> {
        for _ in 0..UPDATE_ATTEMPTS {
            let before = self.require_worker(id).await?;
            let (worker, changed) = apply_changes(&before, &changes)?;
            if self
                .services
                .workers
                .update(&before, &worker, changes.password.as_ref())
                .await?
            {
                self.audit(
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
        self.audit(
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
        let audit = self.services.audit.recent(id, Some(lab), 50).await?;
        Ok(LabDetail { record, audit })
    }

    /// Recent run reports, newest first.
    ///
    /// # Errors
    /// [`AppError::Repository`].
    pub async fn runs(
        &self,
        worker: Option<&WorkerId>,
        limit: usize,
    ) -> Result<Vec<RunReport>, AppError> {
        Ok(self
            .services
            .reports
            .recent(worker, limit.clamp(1, MAX_PAGE))
            .await?)
    }
}
