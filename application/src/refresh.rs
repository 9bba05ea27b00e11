//! The refresh: one reconciler behind the schedule, the admin API and the
//! CLI.
//!
//! # Expected flow (per worker)
//! 1. Skip a disabled worker; take the worker's lease (with a fencing
//!    token) or report `skipped`; keep it renewed while the run works
//!    ([`crate::lease`]).
//! 2. Log in afresh and learn whether the account is a CML admin; if not,
//!    fail the run: a non-admin's list holds only its own and shared labs.
//! 3. Fetch the lab list, then every listed lab's details once (a lab
//!    listed twice is one lab) with bounded concurrency in whatever order
//!    they answer, within `run_deadline`. A failed list ends the run with
//!    nothing written.
//! 4. Read the worker's index (hashes and tombstones) in one read and
//!    [`plan`] create / update / unchanged / prune / held as a pure function;
//!    [`crate::reconcile`] turns the plan into record changes with typed
//!    events, and the report's counts ([`RunReport::planned`],
//!    [`RunReport::applied`]), also pure.
//! 5. Confirm the lease, apply in bulk (nothing for unchanged labs), audit
//!    the prunes that happened, store, audit and return the run report,
//!    release the lease.
//!
//! # Guarantees
//! - Never prunes on a failed, empty, incomplete (an entry that is not a lab
//!   id) or suspiciously short list, nor with a non-admin account (see
//!   [`labsync_domain::plan`]); `force_prune` overrides the last guard only.
//! - Never brings back a lab deleted through labsync: the repository refuses
//!   to write over a tombstone, even one written after this run's list.
//! - A run that lost its lease writes nothing more, and cannot update or
//!   prune what a newer run wrote (fencing).
//! - Every attempt is a stored report, failures included, even one that
//!   failed before it could start (a password that does not decrypt).
//! - One lab that cannot be stored (too large) is that lab's failure; the
//!   rest of the run, prunes included, still applies.
//! - A dry run plans and reports but writes nothing (not even its report's
//!   effects; the report itself is stored, marked `dry_run`).
//!
//! # Caveats
//! - A process that dies mid-run leaves its lease until it expires
//!   (`lease_ttl`, short because it is renewed); the next run converges.
//! - A run started in the background ([`RefreshWorkerLabs::start`]) is not
//!   waited for at shutdown: its process stops saying it is alive, and its
//!   report reads as failed ([`ABANDONED`]) a lease's lifetime later; the
//!   next run of its worker stores it so, and removing the worker ends it.
//! - Whether a process is silent is judged by the readers' clocks against
//!   the writer's (`alive_at`): clocks that disagree by a good part of
//!   `lease_ttl` can make a live run read as failed for a while.

use std::collections::HashMap;
use std::time::Instant;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use labsync_domain::{Actor, Detail, Fetched, LabId, LabRecord, PrunePolicy, WorkerId, plan};
use serde::{Deserialize, Serialize};
use tracing::{Instrument, info, info_span, warn};

use crate::errors::{AppError, CmlError, RepoError};
use crate::lease::LeaseKeeper;
use crate::ports::{AuditAction, AuditEntry, RunQuery, WorkerAccess};
use crate::reconcile::{prune_audit, prunes_done, record_changes};
use crate::services::Services;

/// Why a run failed, in words for its report.
#[derive(Debug, thiserror::Error)]
enum RunError {
    #[error(transparent)]
    App(#[from] AppError),
    #[error(transparent)]
    Cml(#[from] CmlError),
    #[error(transparent)]
    Repository(#[from] RepoError),
    #[error(
        "the CML account {username:?} is not an administrator: it sees only its own and shared \
         labs, so labsync cannot tell a deleted lab from a hidden one; nothing was written. \
         Give the account admin rights in CML, or register an admin account"
    )]
    NotAdmin { username: String },
    #[error(
        "the run lost its refresh lease (it could not renew it, or the worker was removed); \
         it wrote nothing more"
    )]
    LeaseLost,
    #[error(
        "the run did not finish fetching within refresh.run_deadline_secs ({0} s); nothing was written"
    )]
    Deadline(u64),
}

/// How a refresh was started: the kind of its [`Actor`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    Schedule,
    Admin,
    Cli,
}

impl Trigger {
    pub const fn of(actor: &Actor) -> Self {
        match actor {
            Actor::Api(_) | Actor::Person { .. } => Self::Admin,
            Actor::Cli(_) => Self::Cli,
            Actor::Schedule | Actor::Recorded(_) => Self::Schedule,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RefreshOptions {
    pub dry_run: bool,
    pub force_prune: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Started and not finished: a run started through the API, followed
    /// by its id. One whose process died is marked failed by the next run
    /// of its worker (see [`RefreshWorkerLabs::start`]).
    Running,
    Succeeded,
    /// Nothing was fetched or written; `error` says why.
    Failed,
    /// Not run: the worker is disabled or another refresh holds its lease.
    Skipped,
}

impl RunStatus {
    /// The status as it is stored and audited.
    pub const fn word(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Skipped => "skipped",
        }
    }

    /// The status a caller asks for by its word.
    pub fn parse(word: &str) -> Option<Self> {
        [Self::Running, Self::Succeeded, Self::Failed, Self::Skipped]
            .into_iter()
            .find(|s| s.word() == word)
    }
}

/// What one refresh of one worker did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    pub run_id: String,
    pub worker_id: WorkerId,
    pub trigger: Trigger,
    pub status: RunStatus,
    pub dry_run: bool,
    pub force_prune: bool,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub duration_ms: u64,
    /// Labs CML listed, each counted once.
    pub listed: u64,
    pub created: u64,
    pub updated: u64,
    pub unchanged: u64,
    pub pruned: u64,
    pub held: u64,
    pub failed: u64,
    /// Listed by CML but deleted through labsync: not brought back.
    pub suppressed: u64,
    /// Entries of CML's list that are not lab ids: left out, and the list
    /// counted as incomplete (nothing pruned).
    #[serde(default)]
    pub invalid_ids: u64,
    pub hold_reason: Option<String>,
    pub skip_reason: Option<SkipReason>,
    pub error: Option<String>,
    /// The first few per-lab failures, for the operator.
    pub failures: Vec<LabFailure>,
    /// The labs whose prune was held (the first few): what an admin
    /// applies with `force_prune` after reviewing them.
    #[serde(default)]
    pub held_labs: Vec<LabId>,
    /// Set by the store when the report had to be cut down to be stored
    /// (its texts clipped, failures left out), saying what was cut.
    #[serde(default)]
    pub note: Option<String>,
    /// For a `running` report: when its process last said the run is
    /// alive (every third of `lease_ttl`). Older than `lease_ttl`, the
    /// process is gone ([`RunReport::as_seen_at`]).
    #[serde(default)]
    pub alive_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabFailure {
    pub lab_id: LabId,
    pub error: String,
}

/// Why a run did not run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SkipReason {
    #[serde(rename = "worker is disabled")]
    WorkerDisabled,
    /// Another refresh of the worker holds its lease, here or elsewhere.
    #[serde(rename = "another refresh of this worker is running")]
    LeaseHeld,
}

impl SkipReason {
    /// The reason in words, as stored and shown.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::WorkerDisabled => "worker is disabled",
            Self::LeaseHeld => "another refresh of this worker is running",
        }
    }
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl RunReport {
    pub(crate) fn new(
        worker: &WorkerId,
        actor: &Actor,
        options: RefreshOptions,
        now: DateTime<Utc>,
    ) -> Self {
        Self {
            run_id: uuid::Uuid::new_v4().to_string(),
            worker_id: worker.clone(),
            trigger: Trigger::of(actor),
            status: RunStatus::Succeeded,
            dry_run: options.dry_run,
            force_prune: options.force_prune,
            started_at: now,
            finished_at: now,
            duration_ms: 0,
            listed: 0,
            created: 0,
            updated: 0,
            unchanged: 0,
            pruned: 0,
            held: 0,
            failed: 0,
            suppressed: 0,
            invalid_ids: 0,
            hold_reason: None,
            skip_reason: None,
            error: None,
            failures: Vec::new(),
            held_labs: Vec::new(),
            note: None,
            alive_at: None,
        }
    }

    /// One line for the audit log (a dry run says so: its counts are what
    /// it would have done).
    pub fn summary(&self) -> String {
        let (run, [create, update, prune, hold], end) = if self.dry_run {
            (
                "dry run",
                ["would create", "update", "prune", "hold"],
                "; no record written",
            )
        } else {
            ("run", ["created", "updated", "pruned", "held"], "")
        };
        format!(
            "{run} {} {}: {create} {}, {update} {}, {prune} {}, {hold} {}{end}",
            self.run_id,
            self.status.word(),
            self.created,
            self.updated,
            self.pruned,
            self.held
        )
    }

    /// True when the run did what it was asked (a skip is not a failure).
    pub fn is_failure(&self) -> bool {
        self.status == RunStatus::Failed
    }

    /// The report of a run started and not yet run: stored as `running`
    /// so that its id can be followed at once.
    pub(crate) fn announced(
        worker: &WorkerId,
        actor: &Actor,
        options: RefreshOptions,
        now: DateTime<Utc>,
    ) -> Self {
        let mut r = Self::new(worker, actor, options, now);
        r.status = RunStatus::Running;
        r.alive_at = Some(now);
        r
    }

    /// The report as it stands at `now`: a `running` report whose process
    /// has not said it is alive for `lease_ttl` is a failed run (the
    /// process stopped), whether or not a later run has said so yet.
    #[must_use]
    pub fn as_seen_at(mut self, now: DateTime<Utc>, lease_ttl: std::time::Duration) -> Self {
        let ttl = chrono::Duration::from_std(lease_ttl).unwrap_or(chrono::Duration::MAX);
        if self.status == RunStatus::Running
            && let Some(alive) = self.alive_at
            && now.signed_duration_since(alive) > ttl
        {
            self.status = RunStatus::Failed;
            self.error = Some(ABANDONED.to_owned());
            self.finished_at = alive;
        }
        self
    }

    pub(crate) fn options(&self) -> RefreshOptions {
        RefreshOptions {
            dry_run: self.dry_run,
            force_prune: self.force_prune,
        }
    }
}

/// What says that a `running` report's process died: the run's lease
/// expired and another run of its worker took it.
pub const ABANDONED: &str = "the process running this refresh stopped before it finished \
     (it stopped saying the run is alive); what it wrote stays, and the next run converges";

/// What a `running` report of a removed worker says.
pub const WORKER_REMOVED: &str = "the worker was removed while this refresh was running";

/// Says every third of `lease_ttl` that the runs `ids` are alive, until
/// dropped: a process that dies stops saying so, and its runs read as
/// failed a lease's lifetime later.
async fn keep_alive(services: &Services, ids: Vec<String>) {
    let every = (services.settings.lease_ttl / 3).max(crate::lease::MIN_RENEW_EVERY);
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        if let Err(e) = services
            .reports
            .keep_alive(&ids, services.clock.now())
            .await
        {
            warn!(error = %e, "could not say that the runs are alive");
        }
    }
}

/// Runs `work` while saying that `ids` are alive.
async fn while_alive<F: std::future::Future>(services: &Services, ids: Vec<String>, work: F) {
    tokio::select! {
        _ = work => {}
        () = keep_alive(services, ids) => {}
    }
}

/// How often a run's final report is tried before it is given up on.
const STORE_ATTEMPTS: u32 = 3;

/// Refreshes one worker.
#[derive(Debug, Clone)]
pub struct RefreshWorkerLabs {
    services: Services,
}

impl RefreshWorkerLabs {
    pub fn new(services: Services) -> Self {
        Self { services }
    }

    /// Runs the refresh and returns its report, which is also stored. A
    /// failure at any step, before the run could start included (the
    /// stored password does not decrypt, the lease cannot be read), is a
    /// stored `Failed` report, not an error.
    ///
    /// # Errors
    /// [`AppError::UnknownWorker`] only.
    pub async fn execute(
        &self,
        worker_id: &WorkerId,
        actor: &Actor,
        options: RefreshOptions,
    ) -> Result<RunReport, AppError> {
        let report = RunReport::new(worker_id, actor, options, self.services.clock.now());
        match self.execute_as(report, actor).await {
            (_, false) => Err(AppError::UnknownWorker(worker_id.clone())),
            (report, true) => Ok(report),
        }
    }

    /// Starts a run in the background and returns at once its report,
    /// already stored as `running`: the non-blocking form,
    /// for a refresh that must not hold an HTTP request open. The stored
    /// report is replaced when the run finishes, however it ends.
    ///
    /// A process that dies mid-run leaves its report `running`; the next
    /// run of the worker that takes the lease marks it failed
    /// ([`ABANDONED`]).
    ///
    /// # Errors
    /// [`AppError::UnknownWorker`]; [`AppError::Repository`] when the
    /// worker cannot be read or the report cannot be stored (the run is
    /// then not started).
    pub async fn start(
        &self,
        worker_id: &WorkerId,
        actor: &Actor,
        options: RefreshOptions,
    ) -> Result<RunReport, AppError> {
        // A password that does not decrypt is the run's failure, stored
        // like any other; a database that cannot be read fails the
        // announcement too.
        if let Ok(None) = self.services.workers.get(worker_id).await {
            return Err(AppError::UnknownWorker(worker_id.clone()));
        }
        // Asked again while the same run is going: that run, not another.
        if let Some(live) = self.live_run(worker_id, options).await? {
            return Ok(live);
        }
        let report = self.announce(worker_id, actor, options).await?;
        let me = self.clone();
        let actor = actor.clone();
        let run = report.clone();
        tokio::spawn(async move {
            let ids = vec![run.run_id.clone()];
            while_alive(&me.services, ids, me.execute_as(run, &actor)).await;
        });
        Ok(report)
    }

    /// The worker's run in progress with these options, if any.
    async fn live_run(
        &self,
        worker_id: &WorkerId,
        options: RefreshOptions,
    ) -> Result<Option<RunReport>, AppError> {
        let now = self.services.clock.now();
        let ttl = self.services.settings.lease_ttl;
        Ok(self
            .services
            .reports
            .recent(&RunQuery {
                worker: Some(worker_id.clone()),
                status: Some(RunStatus::Running),
                outcomes_only: false,
                limit: 1,
            })
            .await?
            .into_iter()
            .map(|r| r.as_seen_at(now, ttl))
            .find(|r| r.status == RunStatus::Running && r.options() == options))
    }

    async fn announce(
        &self,
        worker_id: &WorkerId,
        actor: &Actor,
        options: RefreshOptions,
    ) -> Result<RunReport, AppError> {
        let report = RunReport::announced(worker_id, actor, options, self.services.clock.now());
        self.services.reports.store(&report).await?;
        Ok(report)
    }

    /// Runs the refresh that `report` begins; false with it when the
    /// worker is unknown (an announced run's report then says so).
    async fn execute_as(&self, mut report: RunReport, actor: &Actor) -> (RunReport, bool) {
        let worker_id = report.worker_id.clone();
        let span = info_span!("refresh", worker_id = %worker_id, %actor, run_id = %report.run_id, dry_run = report.dry_run);
        async {
            let started = Instant::now();
            match self.services.workers.get(&worker_id).await {
                Ok(Some(access)) => (self.run(access, actor, report).await, true),
                Ok(None) if report.status == RunStatus::Running => {
                    report.status = RunStatus::Failed;
                    report.error = Some("the worker was removed before the run began".into());
                    (self.finish(report, started, actor).await, false)
                }
                Ok(None) => (report, false),
                Err(e) => {
                    report.status = RunStatus::Failed;
                    report.error = Some(format!("the run could not start: {e}"));
                    (self.finish(report, started, actor).await, true)
                }
            }
        }
        .instrument(span)
        .await
    }

    async fn run(&self, access: WorkerAccess, actor: &Actor, mut report: RunReport) -> RunReport {
        let s = &self.services;
        let worker_id = access.worker.id.clone();
        let clock_start = Instant::now();
        let options = report.options();
        // A run is a success until a step says otherwise.
        report.status = RunStatus::Succeeded;
        if !access.worker.enabled {
            report.status = RunStatus::Skipped;
            report.skip_reason = Some(SkipReason::WorkerDisabled);
            return self.finish(report, clock_start, actor).await;
        }
        // Per run, not per process: two runs in one process exclude each
        // other just as runs in two processes do.
        let holder = format!("{}/{}", s.settings.instance_id, report.run_id);
        let fence = match s
            .lease
            .try_acquire(&worker_id, &holder, s.settings.lease_ttl)
            .await
        {
            Ok(Some(fence)) => fence,
            Ok(None) => {
                report.status = RunStatus::Skipped;
                report.skip_reason = Some(SkipReason::LeaseHeld);
                info!("refresh skipped: lease held elsewhere");
                return self.finish(report, clock_start, actor).await;
            }
            Err(e) => {
                report.status = RunStatus::Failed;
                report.error = Some(format!("could not take the refresh lease: {e}"));
                return self.finish(report, clock_start, actor).await;
            }
        };
        // A report still `running` whose process stopped saying so a
        // lease's lifetime ago belongs to a process that died: say so in
        // the store too.
        let now = s.clock.now();
        let silent_since =
            now - chrono::Duration::from_std(s.settings.lease_ttl).unwrap_or_default();
        if let Err(e) = s
            .reports
            .abandon_running(&worker_id, silent_since, now, ABANDONED)
            .await
        {
            warn!(error = %e, "could not mark abandoned runs failed");
        }
        let keeper = LeaseKeeper::start(
            s.lease.clone(),
            worker_id.clone(),
            holder.clone(),
            s.settings.lease_ttl,
        );
        let result = self
            .reconcile(&access, actor, options, &keeper, fence, report)
            .await;
        keeper.stop().await;
        s.cml.release(&access);
        if let Err(e) = s.lease.release(&worker_id, &holder).await {
            // The lease expires on its own; a failed release only delays the next run.
            warn!(error = %e, "could not release the refresh lease");
        }
        let report = match result {
            Ok(report) => report,
            Err((mut report, e)) => {
                report.status = RunStatus::Failed;
                report.error = Some(e.to_string());
                report
            }
        };
        self.finish(report, clock_start, actor).await
    }

    /// Stores the report and audits the run, whoever started it.
    async fn finish(&self, mut report: RunReport, started: Instant, actor: &Actor) -> RunReport {
        report.finished_at = self.services.clock.now();
        report.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        report.alive_at = None;
        // A report that cannot be stored leaves the run `running` until it
        // reads as abandoned: try a few times first.
        let backoff = crate::retry::Backoff {
            base: std::time::Duration::from_millis(200),
            max: std::time::Duration::from_secs(2),
        };
        for attempt in 1..=STORE_ATTEMPTS {
            match self.services.reports.store(&report).await {
                Ok(()) => break,
                Err(e) if attempt < STORE_ATTEMPTS => {
                    warn!(error = %e, attempt, "could not store the run report; trying again");
                    tokio::time::sleep(backoff.delay(attempt)).await;
                }
                Err(e) => warn!(error = %e, "could not store the run report"),
            }
        }
        let audit = AuditEntry {
            at: report.finished_at,
            actor: actor.clone(),
            action: AuditAction::Refresh,
            worker_id: report.worker_id.clone(),
            lab_id: None,
            outcome: report.status.word().to_owned(),
            detail: report.summary(),
        };
        if let Err(e) = self.services.audit.record(vec![audit]).await {
            warn!(error = %e, "could not write the audit entry of the run");
        }
        self.services.observer.refresh_finished(&report);
        info!(
            status = ?report.status,
            created = report.created,
            updated = report.updated,
            unchanged = report.unchanged,
            pruned = report.pruned,
            held = report.held,
            failed = report.failed,
            duration_ms = report.duration_ms,
            error = report.error.as_deref().unwrap_or(""),
            "refresh finished"
        );
        report
    }

    /// CML's labs, and how many entries of its list were not lab ids.
    async fn fetch(&self, access: &WorkerAccess) -> Result<(Fetched, u64), CmlError> {
        // The list is the truth about which labs exist, whichever way the
        // details come.
        let list = self.services.cml.list_lab_ids(access).await?;
        if let Some(first) = &list.first_invalid {
            warn!(
                invalid = list.invalid,
                first = %first,
                "CML's lab list has entries that are not lab ids: left out, nothing is pruned"
            );
        }
        // A lab listed twice is one lab: fetched once, counted once.
        let listed = list.ids.len();
        let mut seen = std::collections::HashSet::with_capacity(listed);
        let ids: Vec<LabId> = list.ids.into_iter().filter(|id| seen.insert(*id)).collect();
        if ids.len() < listed {
            warn!(
                duplicates = listed - ids.len(),
                distinct = ids.len(),
                "CML's lab list names some labs more than once: each is fetched once"
            );
        }
        let mut tiles = if access.worker.lab_tiles {
            match self.services.cml.lab_tiles(access).await {
                Ok(tiles) => {
                    let missing = ids.iter().filter(|id| !tiles.contains_key(id)).count();
                    // Only what is logged depends on this (a mutant here is
                    // equivalent): the missing labs are fetched below either way.
                    if missing > 0 {
                        info!(
                            missing,
                            "labs missing from the lab tiles are fetched one by one"
                        );
                    }
                    tiles
                }
                Err(e) => {
                    warn!(error = %e, "lab tiles failed; fetching every lab one by one");
                    HashMap::new()
                }
            }
        } else {
            HashMap::new()
        };
        let concurrency = self.services.settings.max_concurrent_labs_per_worker.max(1);
        let cml = &self.services.cml;
        // Unordered: one slow lab must not hold back the others behind it.
        let labs: Vec<(LabId, Detail)> = futures::stream::iter(ids)
            .map(|id| {
                let tile = tiles.remove(&id);
                async move {
                    let fetched = match tile {
                        Some(snapshot) => Ok(snapshot),
                        None => cml.lab_details(access, &id).await,
                    };
                    let detail = match fetched {
                        Ok(snapshot) => Detail::Found(Box::new(snapshot.normalized())),
                        Err(CmlError::NotFound) => Detail::Gone,
                        Err(e) => Detail::Failed(e.to_string()),
                    };
                    (id, detail)
                }
            })
            .buffer_unordered(concurrency)
            .collect()
            .await;
        Ok((
            Fetched {
                list_complete: list.invalid == 0,
                labs,
            },
            list.invalid as u64,
        ))
    }

    /// The account's admin flag as its last login said, or why not.
    async fn require_admin(&self, access: &WorkerAccess, fresh: bool) -> Result<(), RunError> {
        let cml = &self.services.cml;
        let account = if fresh {
            cml.relogin(access).await?
        } else {
            cml.account(access).await?
        };
        if account.admin {
            Ok(())
        } else {
            Err(RunError::NotAdmin {
                username: account.username,
            })
        }
    }

    /// The run under its lease: settle what a dead run staged, confirm the
    /// account, fetch, plan, and apply; the pure steps are in
    /// [`crate::reconcile`]. Returns what the run counted, also when it
    /// failed half-way.
    async fn reconcile(
        &self,
        access: &WorkerAccess,
        actor: &Actor,
        options: RefreshOptions,
        keeper: &LeaseKeeper,
        fence: u64,
        report: RunReport,
    ) -> Result<RunReport, (RunReport, RunError)> {
        let s = &self.services;
        let worker_id = &access.worker.id;
        // The report so far goes with an error: a failed run's report
        // says how far it got.
        let fail = |report: &RunReport, e: RunError| (report.clone(), e);
        let mut report = report;
        if !options.dry_run {
            // Events a dead run staged: delivered if their change is in
            // the store, dropped if not.
            let (released, dropped) = s
                .labs
                .settle_staged_events(worker_id)
                .await
                .map_err(|e| fail(&report, e.into()))?;
            // Only what is logged depends on this (a mutant here is equivalent).
            if released + dropped > 0 {
                info!(
                    released,
                    dropped, "settled the events of an earlier run that died"
                );
            }
        }
        // A token outlives a change of rights: log in afresh, so that what
        // the list means is known before it is read.
        self.require_admin(access, true)
            .await
            .map_err(|e| fail(&report, e))?;
        let deadline = s.settings.run_deadline;
        let (fetched, invalid_ids) = tokio::time::timeout(deadline, self.fetch(access))
            .await
            .map_err(|_| fail(&report, RunError::Deadline(deadline.as_secs())))?
            .map_err(|e| fail(&report, e.into()))?;
        let listed = fetched.labs.len() as u64;
        // Known from here on, whatever fails next.
        report.listed = listed;
        report.invalid_ids = invalid_ids;
        // A 401 mid-run logged in again: what did that login say?
        self.require_admin(access, false)
            .await
            .map_err(|e| fail(&report, e))?;
        crate::crash::point(crate::crash::points::REFRESH_AFTER_FETCH);
        let index = s
            .labs
            .index(worker_id)
            .await
            .map_err(|e| fail(&report, e.into()))?;
        let policy = PrunePolicy {
            force: options.force_prune,
            ..s.settings.prune
        };
        let plan = plan(&index, fetched, policy);
        let report = report.planned(&plan, listed, invalid_ids);
        if let Some(reason) = &plan.hold_reason {
            warn!(held = plan.held.len(), %reason, "prune held");
        }
        if options.dry_run || plan.is_noop() {
            return Ok(report);
        }
        let now = s.clock.now();
        // Only changed labs need their old snapshot (for the field diff).
        let update_ids: Vec<LabId> = plan.update.iter().map(|(id, _)| *id).collect();
        let old: HashMap<LabId, LabRecord> = if update_ids.is_empty() {
            HashMap::new()
        } else {
            s.labs
                .records(worker_id, &update_ids)
                .await
                .map_err(|e| fail(&report, e.into()))?
                .into_iter()
                .map(|r| (r.lab_id, r))
                .collect()
        };
        let limit = s.settings.history_limit;
        let changes = record_changes(plan, old, worker_id, now, limit, fence);
        let planned_prunes = changes.prune.clone();
        if !keeper
            .confirm()
            .await
            .map_err(|e| fail(&report, e.into()))?
        {
            return Err((report, RunError::LeaseLost));
        }
        let outcome = s
            .labs
            .apply(worker_id, changes, limit)
            .await
            .map_err(|e| fail(&report, e.into()))?;
        for (lab_id, error) in &outcome.too_large {
            warn!(lab_id = %lab_id, %error, "lab record too large to store; left as it was");
        }
        let report = report.applied(&outcome);
        let pruned = prunes_done(planned_prunes, &outcome);
        if !pruned.is_empty() {
            crate::crash::point(crate::crash::points::REFRESH_BEFORE_PRUNE_AUDIT);
            s.audit
                .record(prune_audit(&pruned, actor, worker_id, now))
                .await
                .map_err(|e| fail(&report, e.into()))?;
        }
        Ok(report)
    }
}

/// Refreshes every enabled worker, a bounded number at a time.
#[derive(Debug, Clone)]
pub struct RefreshAll {
    one: RefreshWorkerLabs,
    services: Services,
}

impl RefreshAll {
    pub fn new(services: Services) -> Self {
        Self {
            one: RefreshWorkerLabs::new(services.clone()),
            services,
        }
    }

    /// Starts a run of every enabled worker in the background, at most
    /// `max_concurrent_workers` at once, and returns their ids at once
    /// (see [`RefreshWorkerLabs::start`]).
    ///
    /// # Errors
    /// [`AppError::Repository`] if the workers cannot be listed or a run's
    /// report cannot be stored; the runs announced before it still run.
    pub async fn start(
        &self,
        actor: &Actor,
        options: RefreshOptions,
    ) -> Result<Vec<RunReport>, AppError> {
        let workers = self.services.workers.list().await?;
        // Every worker's run: one in progress with these options, or a new
        // one (only these are started here).
        let mut answer = Vec::new();
        let mut new = Vec::new();
        let mut failure = None;
        for w in workers.into_iter().filter(|w| w.enabled) {
            let found = match self.one.live_run(&w.id, options).await {
                Ok(Some(live)) => Ok((live, false)),
                Ok(None) => self
                    .one
                    .announce(&w.id, actor, options)
                    .await
                    .map(|r| (r, true)),
                Err(e) => Err(e),
            };
            match found {
                Ok((r, started)) => {
                    if started {
                        new.push(r.clone());
                    }
                    answer.push(r);
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let me = self.clone();
        let actor = actor.clone();
        let concurrency = self.services.settings.max_concurrent_workers.max(1);
        tokio::spawn(async move {
            // Queued runs are alive too: said so until each has run.
            let ids = new.iter().map(|r| r.run_id.clone()).collect();
            let work = futures::stream::iter(new)
                .map(|r| me.one.execute_as(r, &actor))
                .buffer_unordered(concurrency)
                .collect::<Vec<_>>();
            while_alive(&me.services, ids, work).await;
        });
        match failure {
            Some(e) => Err(e),
            None => Ok(answer),
        }
    }

    /// One report per enabled worker, in worker id order.
    ///
    /// # Errors
    /// [`AppError::Repository`] if the workers cannot be listed. A worker
    /// whose run cannot start gets a `Failed` report instead.
    pub async fn execute(
        &self,
        actor: &Actor,
        options: RefreshOptions,
    ) -> Result<Vec<RunReport>, AppError> {
        let workers = self.services.workers.list().await?;
        let concurrency = self.services.settings.max_concurrent_workers.max(1);
        let reports = futures::stream::iter(workers.into_iter().filter(|w| w.enabled))
            .map(|w| async move {
                match self.one.execute(&w.id, actor, options).await {
                    Ok(report) => report,
                    // Removed since the list was read: a failed run like any
                    // other, stored and audited.
                    Err(e) => {
                        let now = self.services.clock.now();
                        let mut r = RunReport::new(&w.id, actor, options, now);
                        r.status = RunStatus::Failed;
                        r.error = Some(e.to_string());
                        self.one.finish(r, Instant::now(), actor).await
                    }
                }
            })
            .buffered(concurrency)
            .collect()
            .await;
        Ok(reports)
    }
}

#[cfg(test)]
mod tests {
    use labsync_domain::LabState;

    use super::*;
    use crate::fakes::{fixture, fixture_with_lab_tiles, lab, snapshot, worker_id};

    fn refresh(f: &crate::fakes::Fixture) -> RefreshWorkerLabs {
        RefreshWorkerLabs::new(f.services.clone())
    }

    /// One refresh of the fixture's worker with the default options.
    async fn run(f: &crate::fakes::Fixture) -> RunReport {
        refresh(f)
            .execute(&worker_id(), &Actor::cli("test"), RefreshOptions::default())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_started_run_is_stored_running_at_once_and_replaced_by_how_it_ended() {
        let f = fixture();
        with_four_labs(&f);
        let started = refresh(&f)
            .start(&worker_id(), &Actor::cli("test"), RefreshOptions::default())
            .await
            .unwrap();
        assert_eq!(started.status, RunStatus::Running);
        let stored = || {
            crate::fakes::lock(&f.store.reports)
                .iter()
                .find(|r| r.run_id == started.run_id)
                .cloned()
                .unwrap()
        };
        // The run goes on in a task of its own: let it, until it has ended.
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while stored().status == RunStatus::Running {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the started run ends");
        let ended = stored();
        assert_eq!((ended.status, ended.created), (RunStatus::Succeeded, 4));
        assert_eq!(
            crate::fakes::lock(&f.store.reports).len(),
            1,
            "one report per run: the running one was replaced"
        );
        let unknown = WorkerId::parse("nope").unwrap();
        assert!(matches!(
            refresh(&f)
                .start(&unknown, &Actor::cli("test"), RefreshOptions::default())
                .await,
            Err(AppError::UnknownWorker(_))
        ));
    }

    #[tokio::test]
    async fn a_run_that_takes_the_lease_marks_a_silent_processs_running_report_failed() {
        let f = fixture();
        let mut dead = RunReport::announced(
            &worker_id(),
            &Actor::cli("test"),
            RefreshOptions::default(),
            Utc::now() - chrono::Duration::hours(1),
        );
        dead.run_id = "dead".into();
        crate::fakes::lock(&f.store.reports).push(dead);
        let mut young = RunReport::announced(
            &worker_id(),
            &Actor::cli("test"),
            RefreshOptions::default(),
            Utc::now(),
        );
        young.run_id = "young".into();
        crate::fakes::lock(&f.store.reports).push(young);
        // Queued for long, but its process says it is alive.
        let mut queued = RunReport::announced(
            &worker_id(),
            &Actor::cli("test"),
            RefreshOptions::default(),
            Utc::now() - chrono::Duration::hours(1),
        );
        queued.run_id = "queued".into();
        queued.alive_at = Some(Utc::now());
        crate::fakes::lock(&f.store.reports).push(queued);
        run(&f).await;
        let status = |id: &str| {
            crate::fakes::lock(&f.store.reports)
                .iter()
                .find(|r| r.run_id == id)
                .map(|r| (r.status, r.error.clone()))
                .unwrap()
        };
        assert_eq!(
            status("dead"),
            (RunStatus::Failed, Some(ABANDONED.to_owned()))
        );
        assert_eq!(
            status("young").0,
            RunStatus::Running,
            "heard from within a lease: it may be live"
        );
        assert_eq!(status("queued").0, RunStatus::Running);
    }

    #[test]
    fn a_running_report_reads_as_failed_once_its_process_is_silent_for_a_lease() {
        let ttl = std::time::Duration::from_secs(60);
        let now = Utc::now();
        let at = |secs: i64| now - chrono::Duration::seconds(secs);
        let r = RunReport::announced(
            &worker_id(),
            &Actor::Schedule,
            RefreshOptions::default(),
            at(61),
        );
        let seen = r.clone().as_seen_at(now, ttl);
        assert_eq!(
            (seen.status, seen.error.as_deref(), seen.finished_at),
            (RunStatus::Failed, Some(ABANDONED), at(61))
        );
        let mut heard = r.clone();
        heard.alive_at = Some(at(59));
        assert_eq!(heard.as_seen_at(now, ttl).status, RunStatus::Running);
        let mut ended = r;
        ended.status = RunStatus::Succeeded;
        assert_eq!(
            ended.as_seen_at(now, ttl).status,
            RunStatus::Succeeded,
            "only a running report"
        );
    }

    fn with_four_labs(f: &crate::fakes::Fixture) {
        for n in 1..=4 {
            f.cml
                .labs
                .lock()
                .unwrap()
                .insert(lab(n), snapshot(&format!("lab {n}"), LabState::Stopped));
        }
    }

    fn detail_calls(f: &crate::fakes::Fixture) -> usize {
        f.cml
            .calls()
            .iter()
            .filter(|c| c.starts_with("details"))
            .count()
    }

    #[tokio::test]
    async fn lab_tiles_replace_the_per_lab_requests_and_the_labs_they_miss_are_fetched_alone() {
        let f = fixture_with_lab_tiles();
        with_four_labs(&f);
        f.cml.missing_from_tiles.lock().unwrap().push(lab(3));
        let r = run(&f).await;
        assert_eq!((r.status, r.created), (RunStatus::Succeeded, 4), "{r:?}");
        assert_eq!(
            detail_calls(&f),
            1,
            "only the lab the tiles missed: {:?}",
            f.cml.calls()
        );
        assert!(f.cml.calls().iter().any(|c| c == "tiles"));
    }

    #[tokio::test]
    async fn a_failed_lab_tiles_request_falls_back_to_one_request_per_lab() {
        let f = fixture_with_lab_tiles();
        with_four_labs(&f);
        f.cml
            .fail
            .lock()
            .unwrap()
            .insert("tiles", CmlError::NotFound);
        let r = run(&f).await;
        assert_eq!((r.status, r.created), (RunStatus::Succeeded, 4), "{r:?}");
        assert_eq!(detail_calls(&f), 4);
    }

    #[tokio::test]
    async fn without_lab_tiles_the_tiles_are_never_asked_for() {
        let f = fixture();
        with_four_labs(&f);
        run(&f).await;
        assert!(!f.cml.calls().iter().any(|c| c == "tiles"));
        assert_eq!(detail_calls(&f), 4);
    }

    #[tokio::test]
    async fn a_failed_list_is_a_failed_report_that_writes_nothing_and_frees_the_lease() {
        let f = fixture();
        f.cml
            .fail
            .lock()
            .unwrap()
            .insert("list", CmlError::Unreachable("down".into()));
        let r = run(&f).await;
        assert_eq!(r.status, RunStatus::Failed);
        assert!(r.error.as_deref().unwrap().contains("down"));
        assert_eq!(*f.store.applies.lock().unwrap(), 0);
        assert!(f.store.lease.lock().unwrap().is_none(), "lease released");
        assert_eq!(
            f.store.reports.lock().unwrap().len(),
            1,
            "the failure is reported"
        );
    }

    #[tokio::test]
    async fn a_held_lease_skips_the_run_without_asking_cml() {
        let f = fixture();
        *f.store.lease.lock().unwrap() = Some("another-process/run".into());
        let r = refresh(&f)
            .execute(&worker_id(), &Actor::Schedule, RefreshOptions::default())
            .await
            .unwrap();
        assert_eq!(r.status, RunStatus::Skipped);
        assert!(f.cml.calls().is_empty());
    }

    #[tokio::test]
    async fn creates_then_writes_nothing_when_nothing_changed_and_a_dry_run_never_writes() {
        let f = fixture();
        for n in 1..=3 {
            f.cml
                .labs
                .lock()
                .unwrap()
                .insert(lab(n), snapshot(&format!("lab {n}"), LabState::Stopped));
        }
        let dry = refresh(&f)
            .execute(
                &worker_id(),
                &Actor::cli("test"),
                RefreshOptions {
                    dry_run: true,
                    force_prune: false,
                },
            )
            .await
            .unwrap();
        assert_eq!((dry.created, *f.store.applies.lock().unwrap()), (3, 0));
        let r = run(&f).await;
        assert_eq!((r.created, r.unchanged), (3, 0));
        let again = run(&f).await;
        assert_eq!((again.created, again.unchanged), (0, 3));
        assert_eq!(
            *f.store.applies.lock().unwrap(),
            1,
            "no write when nothing changed"
        );
    }

    #[tokio::test]
    async fn a_lab_whose_details_fail_keeps_its_record_and_counts_as_failed() {
        let f = fixture();
        f.cml
            .labs
            .lock()
            .unwrap()
            .insert(lab(1), snapshot("a", LabState::Stopped));
        run(&f).await;
        f.cml
            .fail
            .lock()
            .unwrap()
            .insert("details", CmlError::Protocol("bad json".into()));
        let r = run(&f).await;
        assert_eq!((r.failed, r.pruned, r.status), (1, 0, RunStatus::Succeeded));
        assert_eq!(r.failures[0].lab_id, lab(1));
        assert!(f.store.live.lock().unwrap().contains_key(&lab(1)));
    }

    #[tokio::test]
    async fn a_non_admin_account_fails_the_run_and_writes_nothing() {
        let f = fixture();
        with_four_labs(&f);
        *f.cml.not_admin.lock().unwrap() = true;
        let r = run(&f).await;
        assert_eq!(r.status, RunStatus::Failed);
        assert!(
            r.error.as_deref().unwrap().contains("not an administrator"),
            "{r:?}"
        );
        assert_eq!(*f.store.applies.lock().unwrap(), 0);
        assert!(
            !f.cml.calls().iter().any(|c| c == "list"),
            "{:?}",
            f.cml.calls()
        );
        assert!(f.store.lease.lock().unwrap().is_none(), "lease released");
    }

    #[tokio::test]
    async fn an_account_demoted_since_its_last_login_is_caught_by_the_runs_fresh_login() {
        let f = fixture();
        with_four_labs(&f);
        // The cached session says admin; a new login would not.
        *f.cml.demoted.lock().unwrap() = true;
        let r = run(&f).await;
        assert_eq!(r.status, RunStatus::Failed, "{r:?}");
        assert_eq!(*f.store.applies.lock().unwrap(), 0);
    }

    #[tokio::test]
    async fn a_list_with_entries_that_are_not_lab_ids_is_read_but_never_pruned_from() {
        let f = fixture();
        with_four_labs(&f);
        run(&f).await;
        f.cml.labs.lock().unwrap().remove(&lab(1));
        *f.cml.invalid_in_list.lock().unwrap() = 2;
        let r = refresh(&f)
            .execute(
                &worker_id(),
                &Actor::cli("test"),
                RefreshOptions {
                    dry_run: false,
                    force_prune: true,
                },
            )
            .await
            .unwrap();
        assert_eq!(
            (r.status, r.invalid_ids, r.pruned, r.held),
            (RunStatus::Succeeded, 2, 0, 1),
            "{r:?}"
        );
        assert!(r.hold_reason.as_deref().unwrap().contains("not lab ids"));
        assert!(f.store.live.lock().unwrap().contains_key(&lab(1)));
    }

    #[tokio::test]
    async fn a_run_that_lost_its_lease_writes_nothing() {
        let f = fixture();
        with_four_labs(&f);
        // Another holder took the lease once this run had it: every renewal
        // says "not yours".
        *f.store.lease_lost.lock().unwrap() = true;
        let r = run(&f).await;
        assert_eq!(r.status, RunStatus::Failed, "{r:?}");
        assert!(
            r.error
                .as_deref()
                .unwrap()
                .contains("lost its refresh lease"),
            "{r:?}"
        );
        assert_eq!(*f.store.applies.lock().unwrap(), 0);
    }

    #[test]
    fn only_a_failed_run_is_a_failure() {
        let mut r = RunReport::new(
            &worker_id(),
            &Actor::cli("test"),
            RefreshOptions::default(),
            chrono::Utc::now(),
        );
        for (status, failure) in [
            (RunStatus::Succeeded, false),
            (RunStatus::Skipped, false),
            (RunStatus::Failed, true),
        ] {
            r.status = status;
            assert_eq!(r.is_failure(), failure, "{status:?}");
        }
    }

    #[tokio::test]
    async fn a_run_settles_a_dead_runs_events_first_and_a_dry_run_does_not() {
        let f = fixture();
        with_four_labs(&f);
        let dry = RefreshOptions {
            dry_run: true,
            force_prune: false,
        };
        refresh(&f)
            .execute(&worker_id(), &Actor::cli("test"), dry)
            .await
            .unwrap();
        assert_eq!(*f.store.settles.lock().unwrap(), 0);
        run(&f).await;
        assert_eq!(*f.store.settles.lock().unwrap(), 1);
    }

    #[tokio::test]
    async fn writes_carry_the_leases_fencing_token_and_prunes_reach_the_store() {
        let f = fixture();
        with_four_labs(&f);
        run(&f).await;
        assert_eq!(
            *f.store.last_fence.lock().unwrap(),
            Some(1),
            "the first grant"
        );
        f.cml.labs.lock().unwrap().remove(&lab(1));
        let r = run(&f).await;
        assert_eq!((r.pruned, r.held), (1, 0), "{r:?}");
        assert_eq!(*f.store.last_fence.lock().unwrap(), Some(2));
        assert!(!f.store.live.lock().unwrap().contains_key(&lab(1)));
        let audit = f.store.audit.lock().unwrap().clone();
        let prunes: Vec<_> = audit
            .iter()
            .filter(|a| a.action == AuditAction::Prune)
            .collect();
        assert_eq!(prunes.len(), 1, "one prune, one audit entry: {audit:?}");
        assert_eq!(prunes[0].lab_id, Some(lab(1)));
        let runs = audit
            .iter()
            .filter(|a| a.action == AuditAction::Refresh)
            .count();
        assert_eq!(runs, 2, "each run is audited: {audit:?}");
    }

    #[tokio::test]
    async fn force_prune_releases_a_held_mass_prune() {
        let f = fixture();
        for n in 1..=20 {
            f.cml
                .labs
                .lock()
                .unwrap()
                .insert(lab(n), snapshot(&format!("lab {n}"), LabState::Stopped));
        }
        run(&f).await;
        for n in 1..=15 {
            f.cml.labs.lock().unwrap().remove(&lab(n));
        }
        let held = run(&f).await;
        assert_eq!((held.pruned, held.held), (0, 15));
        let forced = refresh(&f)
            .execute(
                &worker_id(),
                &Actor::cli("test"),
                RefreshOptions {
                    dry_run: false,
                    force_prune: true,
                },
            )
            .await
            .unwrap();
        assert_eq!((forced.pruned, forced.held), (15, 0));
    }

    #[tokio::test]
    async fn a_state_change_is_announced_as_such_and_a_title_change_is_not() {
        let f = fixture();
        with_four_labs(&f);
        run(&f).await;
        f.cml.labs.lock().unwrap().get_mut(&lab(1)).unwrap().state = LabState::Started;
        f.cml.labs.lock().unwrap().get_mut(&lab(2)).unwrap().title = "renamed".into();
        run(&f).await;
        let kinds: Vec<(LabId, crate::LabEventKind)> = f
            .store
            .events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.kind != crate::LabEventKind::Discovered)
            .map(|e| (e.lab_id, e.kind))
            .collect();
        assert!(
            kinds.contains(&(lab(1), crate::LabEventKind::StateChanged)),
            "{kinds:?}"
        );
        assert!(
            !kinds.contains(&(lab(2), crate::LabEventKind::StateChanged)),
            "{kinds:?}"
        );
    }

    #[tokio::test]
    async fn a_record_too_large_to_store_is_that_labs_failure_in_the_report() {
        let f = fixture();
        with_four_labs(&f);
        f.store.too_large.lock().unwrap().push(lab(2));
        let r = run(&f).await;
        assert_eq!(
            (r.status, r.created, r.failed),
            (RunStatus::Succeeded, 3, 1),
            "{r:?}"
        );
        assert_eq!(r.failures.len(), 1);
        assert_eq!(r.failures[0].lab_id, lab(2));
    }

    #[tokio::test]
    async fn refresh_all_reports_every_enabled_worker() {
        let f = fixture();
        with_four_labs(&f);
        let reports = RefreshAll::new(f.services.clone())
            .execute(&Actor::Schedule, RefreshOptions::default())
            .await
            .unwrap();
        assert_eq!(reports.len(), 1);
        assert_eq!(
            (reports[0].status, reports[0].created),
            (RunStatus::Succeeded, 4)
        );
    }

    #[tokio::test]
    async fn the_report_keeps_at_most_twenty_failures_of_any_kind() {
        let f = fixture();
        for n in 1..=25 {
            f.cml
                .labs
                .lock()
                .unwrap()
                .insert(lab(n), snapshot(&format!("lab {n}"), LabState::Stopped));
        }
        f.cml
            .fail
            .lock()
            .unwrap()
            .insert("details", CmlError::Protocol("bad".into()));
        // 25 failed details: 20 reported, 25 counted.
        let r = run(&f).await;
        assert_eq!(
            (r.failed, r.failures.len()),
            (25, crate::reconcile::MAX_REPORTED_FAILURES)
        );
        // 19 failed details and 2 records too large: still 20 reported.
        let f = fixture();
        for n in 1..=21 {
            f.cml
                .labs
                .lock()
                .unwrap()
                .insert(lab(n), snapshot(&format!("lab {n}"), LabState::Stopped));
        }
        f.cml.failing_labs.lock().unwrap().extend((3..=21).map(lab));
        f.store.too_large.lock().unwrap().extend([lab(1), lab(2)]);
        let r = run(&f).await;
        assert_eq!(
            (r.failed, r.failures.len()),
            (21, crate::reconcile::MAX_REPORTED_FAILURES),
            "{r:?}"
        );
    }
}
