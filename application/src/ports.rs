//! The ports: what the use cases need from the outside world, as traits the
//! infrastructure implements. Each method documents its contract; an adapter
//! that breaks a MUST breaks the invariants of docs/DESIGN.md.
//!
//! # Side-writes: events and audit entries
//! Every action on a lab or a worker tells its story twice: an event for
//! the sink (the outbox) and an entry in the audit log naming its
//! [`Actor`]. The use cases write both, for every
//! trigger (API, CLI, schedule); no edge audits. The rule, by kind:
//! - **A delete's outcome** (tombstone, or a failed attempt's history)
//!   carries its event and its audit entry into the repository call that
//!   records it ([`LabRepository::tombstone`],
//!   [`LabRepository::add_history`]), which writes them first: a failure
//!   half-way leaves an entry that says what CML did, never a silent delete.
//! - **A refresh's changes** carry their events in [`RecordChanges`]; they
//!   are staged with the writes and released once the writes are in
//!   ([`LabRepository::settle_staged_events`]). Its prunes are audited
//!   after the writes, by the run's actor; a failure there fails the run's
//!   report (the prunes stand, and the next run does not repeat them).
//! - **Runs and worker changes** are audited after they happen, best
//!   effort: a failed audit write is logged and never undoes the change.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use labsync_domain::{
    Actor, Existing, HistoryEntry, LabId, LabRecord, LabSnapshot, LabState, Worker, WorkerId,
};
use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use crate::errors::{CmlError, RepoError};
use crate::events::LabEvent;
use crate::refresh::{RunReport, RunStatus};

/// A worker with the password needed to talk to it. Only the CML gateway
/// reads the password; nothing serializes it.
#[derive(Debug, Clone)]
pub struct WorkerAccess {
    pub worker: Worker,
    pub password: SecretString,
}

/// Who labsync is on a CML server, as its last login said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CmlAccount {
    pub username: String,
    /// A CML administrator sees every lab. Any other account sees only its
    /// own and shared labs, and CML answers 404 for the rest: its list is
    /// not the server's inventory, and its 404 does not mean "gone".
    pub admin: bool,
}

/// CML's lab list as labsync could read it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabList {
    /// The valid lab ids, in CML's order.
    pub ids: Vec<LabId>,
    /// Entries that are not lab ids (not a UUID4 string): left out and
    /// counted. A list with any of them is incomplete, so nothing is pruned
    /// on its account.
    pub invalid: usize,
    /// The first invalid entry, clipped, for the run report.
    pub first_invalid: Option<String>,
}

/// Talks to CML servers.
///
/// Adapters MUST authenticate as the worker's user, reuse a connection pool
/// and a token per worker, and re-authenticate once on a 401 before giving
/// up with [`CmlError::Auth`]. Every login MUST learn whether the account is
/// a CML administrator ([`CmlGateway::account`]). [`CmlError::NotFound`]
/// MUST mean CML's own JSON answer that the lab does not exist, never any
/// 404 (a reverse proxy's page, a wrong base path). Response bodies MUST be
/// read with a size limit, and every text taken from them into an error or
/// a value labsync repeats MUST be clipped and escaped. Requests MUST go to
/// the worker's URL only: no redirect is followed, so that no other server
/// receives the password or a delete, or answers for CML.
#[async_trait]
pub trait CmlGateway: Send + Sync {
    /// Logs in with settings that may not be saved yet, then lists the
    /// labs if the account is an admin (an empty list otherwise): what an
    /// admin tests before saving a worker. MUST use a connection of its
    /// own, shared with no worker and kept by none.
    ///
    /// # Errors
    /// Any [`CmlError`] of the login or the list.
    async fn check(&self, access: &WorkerAccess) -> Result<(CmlAccount, LabList), CmlError>;

    /// The account of the current session, logging in if there is none.
    ///
    /// # Errors
    /// Any [`CmlError`] of the login.
    async fn account(&self, access: &WorkerAccess) -> Result<CmlAccount, CmlError>;

    /// Logs in afresh and returns the account: what a caller asks before
    /// trusting a list or a 404, since a token outlives a change of rights.
    ///
    /// # Errors
    /// Any [`CmlError`] of the login.
    async fn relogin(&self, access: &WorkerAccess) -> Result<CmlAccount, CmlError>;

    /// Every lab id on the server (the refresh fetches each once, however
    /// many times CML lists it).
    ///
    /// MUST ask for all labs (`show_all=true`): a partial list would make the
    /// refresh prune what it cannot see.
    ///
    /// # Errors
    /// Any [`CmlError`]; a body that is not a JSON array of strings is
    /// [`CmlError::Protocol`], never an empty list.
    async fn list_lab_ids(&self, access: &WorkerAccess) -> Result<LabList, CmlError>;

    /// The details of one lab.
    ///
    /// # Errors
    /// [`CmlError::NotFound`] if the lab does not exist; a body that lacks a
    /// valid `id` or `state`, or whose `id` differs, is [`CmlError::Protocol`].
    async fn lab_details(
        &self,
        access: &WorkerAccess,
        lab: &LabId,
    ) -> Result<LabSnapshot, CmlError>;

    /// The details of every lab the account sees, in one request (CML's
    /// `populate_lab_tiles`), keyed by lab id. MAY miss labs that
    /// [`CmlGateway::list_lab_ids`] returns (servers differ in what their
    /// tiles carry): a tile that is not a complete lab MUST be left out,
    /// never guessed, and callers fetch the missing labs one by one.
    ///
    /// # Errors
    /// Any [`CmlError`]; callers fall back to [`CmlGateway::lab_details`].
    async fn lab_tiles(
        &self,
        access: &WorkerAccess,
    ) -> Result<std::collections::HashMap<LabId, LabSnapshot>, CmlError>;

    /// The lab's overall state.
    ///
    /// # Errors
    /// As [`CmlGateway::lab_details`].
    async fn lab_state(&self, access: &WorkerAccess, lab: &LabId) -> Result<LabState, CmlError>;

    /// Asks CML to stop the lab; returns before it has stopped.
    ///
    /// # Errors
    /// Any [`CmlError`].
    async fn stop_lab(&self, access: &WorkerAccess, lab: &LabId) -> Result<(), CmlError>;

    /// Asks CML to wipe the (stopped) lab; returns before it is wiped.
    ///
    /// # Errors
    /// Any [`CmlError`].
    async fn wipe_lab(&self, access: &WorkerAccess, lab: &LabId) -> Result<(), CmlError>;

    /// Whether the lab's last state change has completed.
    ///
    /// # Errors
    /// Any [`CmlError`].
    async fn is_converged(&self, access: &WorkerAccess, lab: &LabId) -> Result<bool, CmlError>;

    /// Deletes the lab. MUST return `Ok` only on CML's own answer that it
    /// deleted the lab (its `204`), never on another success status.
    ///
    /// # Errors
    /// [`CmlError::NotFound`] if it was already gone; [`CmlError::Refused`]
    /// (CML's 400) if it is not stopped and wiped; [`CmlError::Protocol`]
    /// for any other answer, a redirect or another 2xx included.
    async fn delete_lab(&self, access: &WorkerAccess, lab: &LabId) -> Result<(), CmlError>;

    /// Says that the caller is done with this worker for a while (a refresh
    /// ended): adapters MAY close its pooled connections. The next call
    /// reconnects (and may log in again).
    fn release(&self, _access: &WorkerAccess) {}
}

/// The record of a lab deleted through labsync: it hides the lab from every
/// list and keeps every later refresh from bringing it back until it expires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstone {
    pub deleted_at: DateTime<Utc>,
    pub deleted_by: Actor,
    pub expires_at: DateTime<Utc>,
}

/// A changed lab for [`LabRepository::apply`]: the new record and the
/// history entry that says what changed (none when only the stored content
/// hash was stale).
#[derive(Debug, Clone)]
pub struct RecordUpdate {
    pub record: LabRecord,
    pub entry: Option<HistoryEntry>,
}

/// The writes of one refresh, and the events that describe them.
#[derive(Debug, Clone, Default)]
pub struct RecordChanges {
    /// The run's fencing token: records written by a run with a greater
    /// token are neither updated nor pruned by this one.
    pub fence: u64,
    pub create: Vec<LabRecord>,
    pub update: Vec<RecordUpdate>,
    pub prune: Vec<LabId>,
    /// Written to the outbox with the changes; those of a suppressed lab
    /// are dropped with it.
    pub events: Vec<LabEvent>,
}

/// A page of a worker's lab records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabQuery {
    /// Exact state, e.g. `STARTED`.
    pub state: Option<String>,
    /// Exact owner username.
    pub owner: Option<String>,
    /// Case-insensitive substring of the title.
    pub title_contains: Option<String>,
    /// Only labs with an id greater than this (the cursor).
    pub after: Option<LabId>,
    pub limit: usize,
}

/// A page of labs across the fleet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetLabQuery {
    /// One worker's labs only.
    pub worker: Option<WorkerId>,
    pub filter: LabQuery,
    pub sort: LabSort,
    /// Only labs after this one, in `sort`'s order: the cursor.
    pub after: Option<FleetCursor>,
}

/// The order of a fleet page. Each ends with (worker id, lab id), so that
/// it is total and a cursor names one place in it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LabSort {
    /// Worker id, then lab id.
    #[default]
    Worker,
    /// Title, byte order (capitals first).
    Title,
    /// State name.
    State,
    /// Modified in CML, newest first; labs without a time last.
    Modified,
}

impl LabSort {
    pub const ALL: [Self; 4] = [Self::Worker, Self::Title, Self::State, Self::Modified];

    pub const fn word(self) -> &'static str {
        match self {
            Self::Worker => "worker",
            Self::Title => "title",
            Self::State => "state",
            Self::Modified => "modified",
        }
    }

    pub fn parse(word: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.word() == word)
    }

    /// The record's place in this order.
    pub fn cursor(self, r: &LabRecord) -> FleetCursor {
        let key = match self {
            Self::Worker => SortKey::None,
            Self::Title => SortKey::Text(r.snapshot.title.clone()),
            Self::State => SortKey::Text(r.snapshot.state.as_str().to_owned()),
            Self::Modified => SortKey::Time(r.snapshot.modified),
        };
        FleetCursor {
            key,
            worker: r.worker_id.clone(),
            lab: r.lab_id,
        }
    }
}

/// The value a [`LabSort`] orders by.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum SortKey {
    None,
    Text(String),
    Time(Option<DateTime<Utc>>),
}

/// A place in a [`LabSort`] order: the last lab of a page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetCursor {
    pub key: SortKey,
    pub worker: WorkerId,
    pub lab: LabId,
}

impl FleetCursor {
    /// As a URL parameter: `worker/lab`, then `/key` for a keyed order (a
    /// time as RFC 3339, `-` for none).
    pub fn to_param(&self) -> String {
        let base = format!("{}/{}", self.worker, self.lab);
        match &self.key {
            SortKey::None => base,
            SortKey::Text(t) => format!("{base}/{t}"),
            SortKey::Time(Some(t)) => format!("{base}/{}", t.to_rfc3339()),
            SortKey::Time(None) => format!("{base}/-"),
        }
    }

    /// Reads [`FleetCursor::to_param`] for `sort`; `None` if it is not one.
    pub fn parse(sort: LabSort, param: &str) -> Option<Self> {
        let (worker, rest) = param.split_once('/')?;
        let (lab, key) = match rest.split_once('/') {
            Some((lab, key)) => (lab, Some(key)),
            None => (rest, None),
        };
        let key = match (sort, key) {
            (LabSort::Worker, None) => SortKey::None,
            (LabSort::Title | LabSort::State, Some(k)) => SortKey::Text(k.to_owned()),
            (LabSort::Modified, Some("-")) => SortKey::Time(None),
            (LabSort::Modified, Some(k)) => SortKey::Time(Some(
                DateTime::parse_from_rfc3339(k).ok()?.with_timezone(&Utc),
            )),
            _ => return None,
        };
        Some(Self {
            key,
            worker: WorkerId::parse(worker).ok()?,
            lab: LabId::parse(lab).ok()?,
        })
    }
}

/// What [`LabRepository::apply`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyOutcome {
    pub created: u64,
    pub updated: u64,
    pub pruned: u64,
    /// Creates and updates refused because the lab was tombstoned meanwhile.
    pub suppressed: Vec<LabId>,
    /// Records too large for the store, left as they were, with the reason.
    pub too_large: Vec<(LabId, String)>,
    /// Prunes that did not happen: the record was tombstoned meanwhile, or
    /// written by a newer run. Neither audited nor announced.
    pub not_pruned: Vec<LabId>,
}

/// The stored inventory: live records and tombstones, keyed by
/// (worker id, lab id), unique.
#[async_trait]
pub trait LabRepository: Send + Sync {
    /// The content hash of every live record of the worker and the ids of
    /// its tombstones, in one read.
    ///
    /// # Errors
    /// [`RepoError`] if the store cannot be read.
    async fn index(&self, worker: &WorkerId) -> Result<HashMap<LabId, Existing>, RepoError>;

    /// The live records with these ids (missing ones are left out).
    ///
    /// # Errors
    /// [`RepoError`].
    async fn records(&self, worker: &WorkerId, ids: &[LabId]) -> Result<Vec<LabRecord>, RepoError>;

    /// One live record.
    ///
    /// # Errors
    /// [`RepoError`].
    async fn get(&self, worker: &WorkerId, lab: &LabId) -> Result<Option<LabRecord>, RepoError>;

    /// Every live record of the worker, ordered by lab id.
    ///
    /// # Errors
    /// [`RepoError`].
    async fn list(&self, worker: &WorkerId) -> Result<Vec<LabRecord>, RepoError>;

    /// Live records matching `query`, ordered by lab id, at most
    /// `query.limit`, without their history.
    ///
    /// # Errors
    /// [`RepoError`].
    async fn page(&self, worker: &WorkerId, query: &LabQuery) -> Result<Vec<LabRecord>, RepoError>;

    /// Live records of every worker (or of `query.worker`) matching
    /// `query`, in `query.sort`'s order after `query.after`, at most
    /// `query.limit`, without their history. MUST be served by an index of
    /// that order, so that a page costs the same at any depth.
    ///
    /// # Errors
    /// [`RepoError`].
    async fn fleet_page(&self, query: &FleetLabQuery) -> Result<Vec<LabRecord>, RepoError>;

    /// How many live records the worker has in each state, in state
    /// order.
    ///
    /// # Errors
    /// [`RepoError`].
    async fn count_by_state(&self, worker: &WorkerId) -> Result<Vec<(String, u64)>, RepoError>;

    /// Writes a refresh's changes in bulk: its events first, staged (never
    /// delivered as they are), then the creates, the updates and every
    /// prune, each in as few commands as the store allows, then releases
    /// the events of the changes that were made and drops the others (a
    /// write refused by a tombstone, a record too large). A failure in
    /// between leaves staged events that the next run settles
    /// ([`LabRepository::settle_staged_events`]): no event is delivered for
    /// a change that did not happen, none is lost for one that did.
    ///
    /// MUST NOT write over a tombstone: a create or update of a tombstoned
    /// lab is skipped and reported in [`ApplyOutcome::suppressed`], atomically
    /// with respect to a concurrent [`LabRepository::tombstone`]. MUST keep
    /// at most `history_limit` history entries per record. Prunes remove
    /// live records only. MUST NOT update or prune a record last written
    /// under a greater [`RecordChanges::fence`] (a newer run's), atomically
    /// per record. MUST NOT send a command or write a document larger than
    /// the store allows: a record that cannot be written is reported in
    /// [`ApplyOutcome::too_large`] and the rest is written.
    ///
    /// # Errors
    /// [`RepoError`] if the batch could not be written; part of it may have
    /// been, and a later refresh converges.
    async fn apply(
        &self,
        worker: &WorkerId,
        changes: RecordChanges,
        history_limit: usize,
    ) -> Result<ApplyOutcome, RepoError>;

    /// Settles the events an earlier refresh of the worker staged but did
    /// not live to release (it died between its writes and the release):
    /// each is released for delivery if the change it describes is in the
    /// store (the record has the content it announces; a pruned lab has no
    /// record), and dropped otherwise. Returns (released, dropped).
    ///
    /// MUST be called under the worker's refresh lease, before the run's
    /// own writes.
    ///
    /// # Errors
    /// [`RepoError`].
    async fn settle_staged_events(&self, worker: &WorkerId) -> Result<(u64, u64), RepoError>;

    /// Writes `event` to the outbox and `audit` to the audit log, then
    /// appends to a live record's history; false if there is no live record
    /// (the event and the audit entry are written all the same).
    ///
    /// # Errors
    /// [`RepoError`].
    async fn add_history(
        &self,
        worker: &WorkerId,
        lab: &LabId,
        entry: HistoryEntry,
        history_limit: usize,
        event: LabEvent,
        audit: AuditEntry,
    ) -> Result<bool, RepoError>;

    /// Writes `event` to the outbox and `audit` to the audit log, then
    /// replaces the lab's record, if any, with a tombstone (creating one if
    /// there was no record) in one atomic step. Returns whether a live
    /// record was there. The event and the entry come first so that a
    /// failure in between never hides what CML did.
    ///
    /// # Errors
    /// [`RepoError`].
    async fn tombstone(
        &self,
        worker: &WorkerId,
        lab: &LabId,
        tombstone: Tombstone,
        event: LabEvent,
        audit: AuditEntry,
    ) -> Result<bool, RepoError>;

    /// Removes every record and tombstone of the worker; returns how many.
    ///
    /// # Errors
    /// [`RepoError`].
    async fn remove_worker(&self, worker: &WorkerId) -> Result<u64, RepoError>;
}

/// Registered workers.
#[async_trait]
pub trait WorkerRepository: Send + Sync {
    /// # Errors
    /// [`RepoError::Duplicate`] if the id is taken.
    async fn add(&self, worker: &Worker, password: &SecretString) -> Result<(), RepoError>;

    /// The worker with its decrypted password.
    ///
    /// # Errors
    /// [`RepoError`], including a password that cannot be decrypted.
    async fn get(&self, id: &WorkerId) -> Result<Option<WorkerAccess>, RepoError>;

    /// Every worker, ordered by id, without passwords.
    ///
    /// # Errors
    /// [`RepoError`].
    async fn list(&self) -> Result<Vec<Worker>, RepoError>;

    /// The worker's settings, without opening its password: what reads of
    /// the inventory and a change of settings need. MUST NOT fail for a
    /// password that does not open (sealed under another key): that is
    /// what `workers update` with a new password repairs.
    ///
    /// # Errors
    /// [`RepoError`].
    async fn settings(&self, id: &WorkerId) -> Result<Option<Worker>, RepoError>;

    /// Replaces the worker's settings by `worker`, and its password when
    /// one is given, MUST only if the stored settings are still `before`
    /// (as the caller read them), in one step: a change made meanwhile is
    /// never overwritten. Without a password, `worker` MUST NOT differ
    /// from `before` in URL, username or TLS settings (an error). Returns
    /// whether it wrote: `false` when the worker is gone or no longer
    /// `before` (read it again).
    ///
    /// # Errors
    /// [`RepoError`].
    async fn update(
        &self,
        before: &Worker,
        worker: &Worker,
        password: Option<&SecretString>,
    ) -> Result<bool, RepoError>;

    /// Returns whether the worker existed.
    ///
    /// # Errors
    /// [`RepoError`].
    async fn remove(&self, id: &WorkerId) -> Result<bool, RepoError>;
}

/// At most one refresh per worker at a time, across processes, and a
/// fencing token that orders the runs (see [`crate::lease`]).
#[async_trait]
pub trait RefreshLease: Send + Sync {
    /// Takes the worker's lease for `ttl` if it is free, expired, or already
    /// held by `holder`. Returns the run's fencing token, or `None` if
    /// someone else holds the lease.
    ///
    /// MUST be atomic across processes sharing the store. MUST judge expiry
    /// by the store's clock, not the caller's. Every grant MUST carry a
    /// token greater than any earlier grant's for the worker, even after
    /// the lease document was lost.
    ///
    /// # Errors
    /// [`RepoError`].
    async fn try_acquire(
        &self,
        worker: &WorkerId,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<u64>, RepoError>;

    /// Extends `holder`'s lease by `ttl` from now (the store's now).
    /// Returns false when `holder` no longer holds it (it expired and was
    /// taken, or was revoked): the run MUST then write nothing more.
    ///
    /// # Errors
    /// [`RepoError`].
    async fn renew(
        &self,
        worker: &WorkerId,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, RepoError>;

    /// Frees the lease if `holder` holds it. When that fails, the holder's
    /// run is over all the same: the next `try_acquire` for the worker in
    /// this process SHOULD take the lease over rather than wait for it to
    /// expire.
    ///
    /// # Errors
    /// [`RepoError`].
    async fn release(&self, worker: &WorkerId, holder: &str) -> Result<(), RepoError>;

    /// Takes the lease from whoever holds it, for `ttl` (a worker being
    /// removed): a run in progress fails its next renewal and writes
    /// nothing more.
    ///
    /// # Errors
    /// [`RepoError`].
    async fn revoke(&self, worker: &WorkerId, ttl: Duration) -> Result<(), RepoError>;
}

/// What labsync did, for the audit trail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditAction {
    Delete,
    Prune,
    Refresh,
    WorkerAdded,
    WorkerUpdated,
    WorkerRemoved,
}

impl AuditAction {
    /// The action as it is stored and shown.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Delete => "delete",
            Self::Prune => "prune",
            Self::Refresh => "refresh",
            Self::WorkerAdded => "worker_added",
            Self::WorkerUpdated => "worker_updated",
            Self::WorkerRemoved => "worker_removed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub at: DateTime<Utc>,
    /// Who asked; for a prune, who started the refresh.
    pub actor: Actor,
    pub action: AuditAction,
    pub worker_id: WorkerId,
    /// The lab, for lab actions.
    pub lab_id: Option<LabId>,
    /// A short, stable word: `deleted`, `already_absent`, `refused_running`...
    pub outcome: String,
    pub detail: String,
}

/// Which audit entries to read: every filter given must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditQuery {
    pub worker: Option<WorkerId>,
    pub lab: Option<LabId>,
    /// The actor's text, exactly (`api:ui`, `cli:ops`, `schedule`).
    pub actor: Option<String>,
    pub action: Option<AuditAction>,
    /// Entries at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Only entries older than the one with this id: the cursor.
    pub before: Option<String>,
    pub limit: usize,
}

/// An audit entry with the id the store gave it (the cursor of a page).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAudit {
    pub id: String,
    pub entry: AuditEntry,
}

/// The audit trail of deletes and prunes.
#[async_trait]
pub trait AuditLog: Send + Sync {
    /// # Errors
    /// [`RepoError`].
    async fn record(&self, entries: Vec<AuditEntry>) -> Result<(), RepoError>;

    /// The newest entries of a worker first, for one lab or all.
    ///
    /// # Errors
    /// [`RepoError`].
    async fn recent(
        &self,
        worker: &WorkerId,
        lab: Option<&LabId>,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, RepoError>;

    /// The entries matching `query`, newest first, at most `query.limit`;
    /// labs that are gone included. An unknown cursor MUST read as "from
    /// the newest", never fail.
    ///
    /// # Errors
    /// [`RepoError`].
    async fn search(&self, query: &AuditQuery) -> Result<Vec<StoredAudit>, RepoError>;
}

/// Stored run reports.
#[async_trait]
pub trait RunReports: Send + Sync {
    /// Stores the report, replacing the one stored under its run id (a
    /// `running` report, replaced by how the run ended).
    ///
    /// # Errors
    /// [`RepoError`].
    async fn store(&self, report: &RunReport) -> Result<(), RepoError>;

    /// # Errors
    /// [`RepoError`].
    async fn get(&self, run_id: &str) -> Result<Option<RunReport>, RepoError>;

    /// Newest first, as `query` asks.
    ///
    /// # Errors
    /// [`RepoError`].
    async fn recent(&self, query: &RunQuery) -> Result<Vec<RunReport>, RepoError>;

    /// Says that the `running` reports `run_ids` are alive at `now`
    /// (`alive_at`); an ended report MUST be left as it is.
    ///
    /// # Errors
    /// [`RepoError`].
    async fn keep_alive(&self, run_ids: &[String], now: DateTime<Utc>) -> Result<(), RepoError>;

    /// Marks the worker's reports still `running` whose process has been
    /// silent since `silent_since` (`alive_at` before it) failed with
    /// `reason`, finished `now`; returns how many.
    ///
    /// # Errors
    /// [`RepoError`].
    async fn abandon_running(
        &self,
        worker: &WorkerId,
        silent_since: DateTime<Utc>,
        now: DateTime<Utc>,
        reason: &str,
    ) -> Result<u64, RepoError>;
}

/// Which run reports to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunQuery {
    pub worker: Option<WorkerId>,
    pub status: Option<RunStatus>,
    /// Only runs that say something about the inventory: succeeded or
    /// failed, and not dry.
    pub outcomes_only: bool,
    pub limit: usize,
}

impl RunQuery {
    /// The newest `limit` runs of `worker`, or of every worker.
    pub fn newest(worker: Option<&WorkerId>, limit: usize) -> Self {
        Self {
            worker: worker.cloned(),
            status: None,
            outcomes_only: false,
            limit,
        }
    }
}

/// An event once it is visible, for live views: a lab's (stored and not
/// staged) or a refresh run's (finished).
#[derive(Debug, Clone, PartialEq)]
pub struct VisibleEvent {
    pub id: String,
    /// When the event became visible, by the clock of the replica that
    /// made it so.
    pub visible_at: DateTime<Utc>,
    pub kind: String,
    pub worker_id: String,
    /// None for an event that is not a lab's (a finished refresh run).
    pub lab_id: Option<String>,
    /// The CloudEvent as the sink receives it.
    pub cloudevent: serde_json::Value,
}

/// Lab events and finished runs as every replica stores them, read back
/// for live views.
#[async_trait]
pub trait EventFeed: Send + Sync {
    /// Events that became visible at or after `since` (and, at `since`
    /// itself, with an id after `after_id`), in (visible time, id) order,
    /// at most `limit`: a caller pages through any number of events that
    /// share one time. MUST include every event that is visible by then
    /// (delivered or not), and none that is staged: a staged event is
    /// visible from its release, not from its making.
    ///
    /// # Errors
    /// [`RepoError`].
    async fn visible_since(
        &self,
        since: DateTime<Utc>,
        after_id: Option<&str>,
        limit: usize,
    ) -> Result<Vec<VisibleEvent>, RepoError>;

    /// When the event `id` became visible; `None` when it is unknown,
    /// staged, or expired.
    ///
    /// # Errors
    /// [`RepoError`].
    async fn visible_at(&self, id: &str) -> Result<Option<DateTime<Utc>>, RepoError>;
}

/// Whether labsync's store answers, for readiness probes.
#[async_trait]
pub trait Health: Send + Sync {
    /// True when the store answered a no-op within `timeout`. MUST return
    /// by then whatever the store does, and MUST NOT leave a driver call
    /// half done when it gives up (a probe must not wedge the pool).
    async fn store_answers(&self, timeout: Duration) -> bool;
}

/// A console session: who signed in, until when, and the token that
/// every state-changing request of the session must echo (CSRF).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleSession {
    /// The SHA-256 (hex) of the secret in the browser's cookie; the secret
    /// itself is never stored.
    pub key: String,
    pub who: SessionOf,
    pub csrf: String,
    pub created_at: DateTime<Utc>,
    /// The absolute end, however active the session is.
    pub expires_at: DateTime<Utc>,
    /// The idle end: moved on by requests ([`Sessions::touch`]).
    pub idle_until: DateTime<Utc>,
}

/// Whom a session speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionOf {
    /// Whoever holds an API token: its SHA-256 (hex), so that the token's
    /// revocation ends the session.
    Token { sha256: String },
    /// A person the OpenID Connect provider signed in.
    Person(SignedInPerson),
}

/// A person as the provider described them at sign-in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedInPerson {
    /// The provider's `sub`.
    pub subject: String,
    /// A name to show (`preferred_username`, else `email`).
    pub display: String,
    /// Their CML username, from the configured claim, if it had one.
    pub username: Option<String>,
    /// The values of their roles claim at sign-in, mapped to a labsync
    /// role on every request: a changed role map applies at once.
    pub roles: Vec<String>,
    /// The provider's ID token, kept to end the session at the provider:
    /// it reaches the browser only at sign-out, as the `id_token_hint` of
    /// the provider's end-session URL. labsync's API refuses ID tokens.
    pub id_token: String,
}

/// A sign-in through the provider, between leaving labsync and coming
/// back: what the callback needs, found by the `state` it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingSignIn {
    /// The SHA-256 (hex) of the `state` sent to the provider.
    pub key: String,
    /// The SHA-256 (hex) of the secret in the browser's sign-in cookie:
    /// only the browser that left may come back with this `state`.
    pub browser: String,
    /// The PKCE verifier.
    pub verifier: String,
    pub nonce: String,
    pub expires_at: DateTime<Utc>,
}

/// Stored console sessions, shared by every replica.
#[async_trait]
pub trait Sessions: Send + Sync {
    /// # Errors
    /// [`RepoError`].
    async fn create(&self, session: &ConsoleSession) -> Result<(), RepoError>;

    /// The session stored under `key`; MUST be `None` once it has expired
    /// by `now` (absolute or idle), whether or not the store has removed
    /// it yet.
    ///
    /// # Errors
    /// [`RepoError`].
    async fn find(
        &self,
        key: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<ConsoleSession>, RepoError>;

    /// Moves the session's idle end on to `idle_until` (never back).
    ///
    /// # Errors
    /// [`RepoError`].
    async fn touch(&self, key: &str, idle_until: DateTime<Utc>) -> Result<(), RepoError>;

    /// Ends the session (sign-out); ending one that is gone is no error.
    ///
    /// # Errors
    /// [`RepoError`].
    async fn end(&self, key: &str) -> Result<(), RepoError>;

    /// Keeps a sign-in that has left for the provider.
    ///
    /// # Errors
    /// [`RepoError`].
    async fn begin_sign_in(&self, pending: &PendingSignIn) -> Result<(), RepoError>;

    /// Takes the sign-in stored under `key` for the browser `browser`
    /// away: MUST return it at most once, to one caller among all
    /// replicas, MUST NOT return it once it has expired by `now`, and MUST
    /// leave it for its own browser when another asks (someone holding only
    /// the callback's `state` cannot spend it).
    ///
    /// # Errors
    /// [`RepoError`].
    async fn take_sign_in(
        &self,
        key: &str,
        browser: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<PendingSignIn>, RepoError>;
}

/// An API token kept in the store (a machine's), known by the SHA-256 of
/// its secret: added and revoked while labsync runs, no restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineToken {
    /// Unique; the audit log names callers by it.
    pub name: String,
    /// `viewer`, `operator` or `admin`.
    pub role: String,
    /// The SHA-256 (hex) of the secret; the secret is never stored.
    pub sha256: String,
    pub created_at: DateTime<Utc>,
    /// No longer accepted from then on.
    pub expires_at: Option<DateTime<Utc>>,
    /// When it was last accepted, to the minute.
    pub last_used_at: Option<DateTime<Utc>>,
}

/// Stored API tokens, shared by every replica.
#[async_trait]
pub trait MachineTokens: Send + Sync {
    /// # Errors
    /// [`RepoError::Duplicate`] when the name (or the secret) is taken.
    async fn add(&self, token: &MachineToken) -> Result<(), RepoError>;

    /// The token whose secret hashes to `sha256`, expired or not.
    ///
    /// # Errors
    /// [`RepoError`].
    async fn find(&self, sha256: &str) -> Result<Option<MachineToken>, RepoError>;

    /// Every token, by name.
    ///
    /// # Errors
    /// [`RepoError`].
    async fn list(&self) -> Result<Vec<MachineToken>, RepoError>;

    /// Removes the token; returns whether there was one. MUST take effect
    /// for the next request on every replica.
    ///
    /// # Errors
    /// [`RepoError`].
    async fn revoke(&self, name: &str) -> Result<bool, RepoError>;

    /// Says the token was accepted at `now`, unless that was already said
    /// after `unless_after` (at most one write per token per minute).
    ///
    /// # Errors
    /// [`RepoError`].
    async fn used(
        &self,
        sha256: &str,
        now: DateTime<Utc>,
        unless_after: DateTime<Utc>,
    ) -> Result<(), RepoError>;
}

/// The time, injectable so that tests control it.
pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
}

/// The wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_audit_action_is_stored_by_the_word_it_shows() {
        for a in [
            AuditAction::Delete,
            AuditAction::Prune,
            AuditAction::Refresh,
            AuditAction::WorkerAdded,
            AuditAction::WorkerUpdated,
            AuditAction::WorkerRemoved,
        ] {
            assert_eq!(
                serde_json::to_value(a).unwrap(),
                serde_json::json!(a.as_str())
            );
        }
    }
}
