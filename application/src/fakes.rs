//! In-memory fakes of the ports, for unit tests of the use cases only. The
//! proof that the system works is in the integration tests, which use the
//! real adapters.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use labsync_domain::{
    BaseUrl, Existing, HistoryEntry, LabId, LabRecord, LabSnapshot, LabState, Worker, WorkerId,
};
use secrecy::SecretString;

use crate::errors::{CmlError, RepoError};
use crate::events::{LabEvent, NoObserver};
use crate::ports::*;
use crate::refresh::{RunReport, RunStatus};
use crate::services::{CoreSettings, Services};

pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A scriptable CML: labs with states, and errors to return per call name.
#[derive(Default)]
pub struct FakeCml {
    pub labs: Mutex<HashMap<LabId, LabSnapshot>>,
    pub fail: Mutex<HashMap<&'static str, CmlError>>,
    pub calls: Mutex<Vec<String>>,
    /// Labs that `lab_tiles` leaves out.
    pub missing_from_tiles: Mutex<Vec<LabId>>,
    /// Whether the account is not a CML admin.
    pub not_admin: Mutex<bool>,
    /// The account loses admin at its next login (the cached session
    /// still says admin until then).
    pub demoted: Mutex<bool>,
    /// Entries of the list that are not lab ids.
    pub invalid_in_list: Mutex<usize>,
    /// `delete_lab` deletes, then answers with this error.
    pub lose_delete_answer: Mutex<Option<CmlError>>,
    /// `is_converged` answers false this many times first.
    pub unconverged_polls: Mutex<u32>,
    /// Labs whose details fail.
    pub failing_labs: Mutex<Vec<LabId>>,
}

impl FakeCml {
    fn call(&self, name: &'static str, lab: Option<&LabId>) -> Result<(), CmlError> {
        lock(&self.calls).push(match lab {
            Some(l) => format!("{name} {l}"),
            None => name.to_owned(),
        });
        match lock(&self.fail).get(name) {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    fn with_lab<T>(
        &self,
        lab: &LabId,
        f: impl FnOnce(&mut LabSnapshot) -> T,
    ) -> Result<T, CmlError> {
        lock(&self.labs)
            .get_mut(lab)
            .map(f)
            .ok_or(CmlError::NotFound)
    }

    pub fn calls(&self) -> Vec<String> {
        lock(&self.calls).clone()
    }
}

impl FakeCml {
    fn whoami(&self) -> CmlAccount {
        CmlAccount {
            username: "admin".into(),
            admin: !*lock(&self.not_admin),
        }
    }
}

#[async_trait]
impl CmlGateway for FakeCml {
    async fn check(&self, a: &WorkerAccess) -> Result<(CmlAccount, LabList), CmlError> {
        let account = self.relogin(a).await?;
        if !account.admin {
            return Ok((account, LabList::default()));
        }
        Ok((account, self.list_lab_ids(a).await?))
    }
    async fn account(&self, _: &WorkerAccess) -> Result<CmlAccount, CmlError> {
        Ok(self.whoami())
    }
    async fn relogin(&self, _: &WorkerAccess) -> Result<CmlAccount, CmlError> {
        self.call("login", None)?;
        if *lock(&self.demoted) {
            *lock(&self.not_admin) = true;
        }
        Ok(self.whoami())
    }
    async fn list_lab_ids(&self, _: &WorkerAccess) -> Result<LabList, CmlError> {
        self.call("list", None)?;
        let mut ids: Vec<LabId> = lock(&self.labs).keys().copied().collect();
        ids.sort();
        let invalid = *lock(&self.invalid_in_list);
        Ok(LabList {
            ids,
            invalid,
            first_invalid: (invalid > 0).then(|| "\"not-a-lab\"".to_owned()),
        })
    }
    async fn lab_details(&self, _: &WorkerAccess, lab: &LabId) -> Result<LabSnapshot, CmlError> {
        self.call("details", Some(lab))?;
        if lock(&self.failing_labs).contains(lab) {
            return Err(CmlError::Protocol("garbled".into()));
        }
        self.with_lab(lab, |s| s.clone())
    }
    async fn lab_tiles(
        &self,
        _: &WorkerAccess,
    ) -> Result<std::collections::HashMap<LabId, LabSnapshot>, CmlError> {
        self.call("tiles", None)?;
        let hidden = lock(&self.missing_from_tiles).clone();
        Ok(lock(&self.labs)
            .iter()
            .filter(|(id, _)| !hidden.contains(id))
            .map(|(id, s)| (*id, s.clone()))
            .collect())
    }
    async fn lab_state(&self, _: &WorkerAccess, lab: &LabId) -> Result<LabState, CmlError> {
        self.call("state", Some(lab))?;
        self.with_lab(lab, |s| s.state.clone())
    }
    async fn stop_lab(&self, _: &WorkerAccess, lab: &LabId) -> Result<(), CmlError> {
        self.call("stop", Some(lab))?;
        self.with_lab(lab, |s| s.state = LabState::Stopped)
    }
    async fn wipe_lab(&self, _: &WorkerAccess, lab: &LabId) -> Result<(), CmlError> {
        self.call("wipe", Some(lab))?;
        self.with_lab(lab, |s| s.state = LabState::DefinedOnCore)
    }
    async fn is_converged(&self, _: &WorkerAccess, lab: &LabId) -> Result<bool, CmlError> {
        self.call("converged", Some(lab))?;
        let mut left = lock(&self.unconverged_polls);
        if *left > 0 {
            *left -= 1;
            return Ok(false);
        }
        Ok(true)
    }
    async fn delete_lab(&self, _: &WorkerAccess, lab: &LabId) -> Result<(), CmlError> {
        self.call("delete", Some(lab))?;
        let mut labs = lock(&self.labs);
        match labs.get(lab) {
            None => Err(CmlError::NotFound),
            Some(s) if !s.state.is_deletable() => Err(CmlError::Refused {
                status: 400,
                description: "not wiped".into(),
            }),
            Some(_) => {
                labs.remove(lab);
                match lock(&self.lose_delete_answer).clone() {
                    Some(e) => Err(e),
                    None => Ok(()),
                }
            }
        }
    }
}

#[derive(Default)]
pub struct FakeStore {
    pub live: Mutex<HashMap<LabId, LabRecord>>,
    pub tombstones: Mutex<HashMap<LabId, Tombstone>>,
    pub fail_tombstone: Mutex<bool>,
    pub audit: Mutex<Vec<AuditEntry>>,
    pub reports: Mutex<Vec<RunReport>>,
    pub lease: Mutex<Option<String>>,
    /// Grants so far: each is the next fencing token.
    pub grants: Mutex<u64>,
    /// Every renewal says the lease is someone else's now.
    pub lease_lost: Mutex<bool>,
    pub renewals: Mutex<usize>,
    pub settles: Mutex<usize>,
    /// The fencing token of the last `apply`.
    pub last_fence: Mutex<Option<u64>>,
    /// Labs `apply` reports as too large (and does not write).
    pub too_large: Mutex<Vec<LabId>>,
    pub applies: Mutex<usize>,
    pub events: Mutex<Vec<LabEvent>>,
}

#[async_trait]
impl LabRepository for FakeStore {
    async fn index(&self, _: &WorkerId) -> Result<HashMap<LabId, Existing>, RepoError> {
        let mut out: HashMap<LabId, Existing> = lock(&self.live)
            .iter()
            .map(|(id, r)| (*id, Existing::Live(r.content_hash)))
            .collect();
        out.extend(
            lock(&self.tombstones)
                .keys()
                .map(|id| (*id, Existing::Tombstoned)),
        );
        Ok(out)
    }
    async fn records(&self, _: &WorkerId, ids: &[LabId]) -> Result<Vec<LabRecord>, RepoError> {
        let live = lock(&self.live);
        Ok(ids.iter().filter_map(|id| live.get(id).cloned()).collect())
    }
    async fn get(&self, _: &WorkerId, lab: &LabId) -> Result<Option<LabRecord>, RepoError> {
        Ok(lock(&self.live).get(lab).cloned())
    }
    async fn list(&self, _: &WorkerId) -> Result<Vec<LabRecord>, RepoError> {
        let mut v: Vec<LabRecord> = lock(&self.live).values().cloned().collect();
        v.sort_by_key(|r| r.lab_id);
        Ok(v)
    }
    async fn apply(
        &self,
        _: &WorkerId,
        c: RecordChanges,
        _: usize,
    ) -> Result<ApplyOutcome, RepoError> {
        *lock(&self.applies) += 1;
        *lock(&self.last_fence) = Some(c.fence);
        let mut out = ApplyOutcome::default();
        let too_large = lock(&self.too_large).clone();
        lock(&self.events).extend(
            c.events
                .iter()
                .filter(|e| !too_large.contains(&e.lab_id))
                .cloned(),
        );
        out.too_large = too_large
            .iter()
            .map(|id| (*id, "too large".to_owned()))
            .collect();
        let c = RecordChanges {
            create: c
                .create
                .into_iter()
                .filter(|r| !too_large.contains(&r.lab_id))
                .collect(),
            update: c
                .update
                .into_iter()
                .filter(|u| !too_large.contains(&u.record.lab_id))
                .collect(),
            ..c
        };
        let tombs = lock(&self.tombstones);
        let mut live = lock(&self.live);
        for r in c
            .create
            .into_iter()
            .chain(c.update.into_iter().map(|u| u.record))
        {
            if tombs.contains_key(&r.lab_id) {
                out.suppressed.push(r.lab_id);
            } else if live.insert(r.lab_id, r).is_none() {
                out.created += 1;
            } else {
                out.updated += 1;
            }
        }
        for id in c.prune {
            out.pruned += u64::from(live.remove(&id).is_some());
        }
        Ok(out)
    }
    async fn page(&self, w: &WorkerId, q: &LabQuery) -> Result<Vec<LabRecord>, RepoError> {
        let mut v = self.list(w).await?;
        v.retain(|r| q.after.is_none_or(|a| r.lab_id > a));
        v.truncate(q.limit);
        Ok(v)
    }
    async fn fleet_page(&self, q: &FleetLabQuery) -> Result<Vec<LabRecord>, RepoError> {
        // The order as a tuple: newest first for times, none last.
        let place = |r: &LabRecord| {
            let c = q.sort.cursor(r);
            let key = match c.key {
                SortKey::Time(t) => (t.is_none(), std::cmp::Reverse(t), String::new()),
                SortKey::Text(t) => (false, std::cmp::Reverse(None), t),
                SortKey::None => (false, std::cmp::Reverse(None), String::new()),
            };
            (key, c.worker, c.lab)
        };
        let mut v: Vec<LabRecord> = lock(&self.live).values().cloned().collect();
        v.sort_by_key(place);
        if let Some(after) = &q.after {
            let at = v
                .iter()
                .position(|r| r.worker_id == after.worker && r.lab_id == after.lab);
            v = at.map_or_else(Vec::new, |i| v.split_off(i + 1));
        }
        v.truncate(q.filter.limit);
        Ok(v)
    }
    async fn count_by_state(&self, w: &WorkerId) -> Result<Vec<(String, u64)>, RepoError> {
        let mut counts = std::collections::BTreeMap::new();
        for r in self.list(w).await? {
            *counts
                .entry(r.snapshot.state.as_str().to_owned())
                .or_insert(0) += 1;
        }
        Ok(counts.into_iter().collect())
    }
    async fn add_history(
        &self,
        _: &WorkerId,
        lab: &LabId,
        e: HistoryEntry,
        limit: usize,
        event: LabEvent,
        audit: AuditEntry,
    ) -> Result<bool, RepoError> {
        lock(&self.events).push(event);
        lock(&self.audit).push(audit);
        Ok(lock(&self.live)
            .get_mut(lab)
            .map(|r| r.push_history(e, limit))
            .is_some())
    }
    async fn tombstone(
        &self,
        _: &WorkerId,
        lab: &LabId,
        t: Tombstone,
        event: LabEvent,
        audit: AuditEntry,
    ) -> Result<bool, RepoError> {
        if *lock(&self.fail_tombstone) {
            return Err(RepoError::Unavailable("injected".into()));
        }
        lock(&self.events).push(event);
        lock(&self.audit).push(audit);
        lock(&self.tombstones).insert(*lab, t);
        Ok(lock(&self.live).remove(lab).is_some())
    }
    async fn remove_worker(&self, _: &WorkerId) -> Result<u64, RepoError> {
        Ok(0)
    }
    async fn settle_staged_events(&self, _: &WorkerId) -> Result<(u64, u64), RepoError> {
        *lock(&self.settles) += 1;
        Ok((0, 0))
    }
}

#[async_trait]
impl RefreshLease for FakeStore {
    async fn try_acquire(
        &self,
        _: &WorkerId,
        holder: &str,
        _: Duration,
    ) -> Result<Option<u64>, RepoError> {
        let mut l = lock(&self.lease);
        if l.as_deref().is_some_and(|h| h != holder) {
            return Ok(None);
        }
        *l = Some(holder.to_owned());
        let mut grants = lock(&self.grants);
        *grants += 1;
        Ok(Some(*grants))
    }
    async fn renew(&self, _: &WorkerId, holder: &str, _: Duration) -> Result<bool, RepoError> {
        *lock(&self.renewals) += 1;
        Ok(!*lock(&self.lease_lost) && lock(&self.lease).as_deref() == Some(holder))
    }
    async fn revoke(&self, _: &WorkerId, _: Duration) -> Result<(), RepoError> {
        *lock(&self.lease) = Some("revoked".into());
        Ok(())
    }
    async fn release(&self, _: &WorkerId, holder: &str) -> Result<(), RepoError> {
        let mut l = lock(&self.lease);
        if l.as_deref() == Some(holder) {
            *l = None;
        }
        Ok(())
    }
}

#[async_trait]
impl AuditLog for FakeStore {
    async fn record(&self, entries: Vec<AuditEntry>) -> Result<(), RepoError> {
        lock(&self.audit).extend(entries);
        Ok(())
    }
    async fn recent(
        &self,
        _: &WorkerId,
        _: Option<&LabId>,
        _: usize,
    ) -> Result<Vec<AuditEntry>, RepoError> {
        Ok(lock(&self.audit).iter().rev().cloned().collect())
    }
    async fn search(&self, q: &AuditQuery) -> Result<Vec<StoredAudit>, RepoError> {
        Ok(lock(&self.audit)
            .iter()
            .enumerate()
            .rev()
            .filter(|(_, e)| q.lab.is_none_or(|l| e.lab_id == Some(l)))
            .take(q.limit)
            .map(|(n, e)| StoredAudit {
                id: n.to_string(),
                entry: e.clone(),
            })
            .collect())
    }
}

#[async_trait]
impl RunReports for FakeStore {
    async fn store(&self, r: &RunReport) -> Result<(), RepoError> {
        let mut reports = lock(&self.reports);
        reports.retain(|old| old.run_id != r.run_id);
        reports.push(r.clone());
        Ok(())
    }
    async fn get(&self, run_id: &str) -> Result<Option<RunReport>, RepoError> {
        Ok(lock(&self.reports)
            .iter()
            .find(|r| r.run_id == run_id)
            .cloned())
    }
    async fn recent(&self, q: &RunQuery) -> Result<Vec<RunReport>, RepoError> {
        Ok(lock(&self.reports)
            .iter()
            .rev()
            .filter(|r| q.worker.as_ref().is_none_or(|w| &r.worker_id == w))
            .filter(|r| q.status.is_none_or(|s| r.status == s))
            .filter(|r| {
                !q.outcomes_only
                    || (matches!(r.status, RunStatus::Succeeded | RunStatus::Failed) && !r.dry_run)
            })
            .take(q.limit)
            .cloned()
            .collect())
    }
    async fn keep_alive(&self, ids: &[String], now: DateTime<Utc>) -> Result<(), RepoError> {
        for r in lock(&self.reports)
            .iter_mut()
            .filter(|r| ids.contains(&r.run_id) && r.status == RunStatus::Running)
        {
            r.alive_at = Some(now);
        }
        Ok(())
    }
    async fn abandon_running(
        &self,
        worker: &WorkerId,
        silent_since: DateTime<Utc>,
        now: DateTime<Utc>,
        reason: &str,
    ) -> Result<u64, RepoError> {
        let mut n = 0;
        for r in lock(&self.reports).iter_mut().filter(|r| {
            &r.worker_id == worker
                && r.status == RunStatus::Running
                && r.alive_at.is_some_and(|a| a < silent_since)
        }) {
            r.status = RunStatus::Failed;
            r.error = Some(reason.to_owned());
            r.finished_at = now;
            n += 1;
        }
        Ok(n)
    }
}

pub struct FakeWorkers(pub Worker);

#[async_trait]
impl WorkerRepository for FakeWorkers {
    async fn add(&self, _: &Worker, _: &SecretString) -> Result<(), RepoError> {
        Err(RepoError::Duplicate("fake".into()))
    }
    async fn get(&self, id: &WorkerId) -> Result<Option<WorkerAccess>, RepoError> {
        Ok((id == &self.0.id).then(|| WorkerAccess {
            worker: self.0.clone(),
            password: SecretString::from("pw"),
        }))
    }
    async fn list(&self) -> Result<Vec<Worker>, RepoError> {
        Ok(vec![self.0.clone()])
    }
    async fn settings(&self, id: &WorkerId) -> Result<Option<Worker>, RepoError> {
        Ok((id == &self.0.id).then(|| self.0.clone()))
    }
    async fn update(
        &self,
        _: &Worker,
        _: &Worker,
        _: Option<&SecretString>,
    ) -> Result<bool, RepoError> {
        Ok(false)
    }
    async fn remove(&self, _: &WorkerId) -> Result<bool, RepoError> {
        Ok(false)
    }
}

pub struct Fixture {
    pub cml: Arc<FakeCml>,
    pub store: Arc<FakeStore>,
    pub services: Services,
}

pub fn worker_id() -> WorkerId {
    WorkerId::parse("cml-1").unwrap()
}

pub fn lab(n: u8) -> LabId {
    LabId::parse(&format!("{n:08x}-0000-4000-8000-000000000000")).unwrap()
}

pub fn snapshot(title: &str, state: LabState) -> LabSnapshot {
    LabSnapshot {
        title: title.into(),
        description: String::new(),
        notes: String::new(),
        owner_id: None,
        owner_username: Some("admin".into()),
        owner_fullname: None,
        state,
        node_count: 1,
        link_count: 0,
        groups: vec![],
        created: None,
        modified: None,
    }
}

/// A fixture whose worker has `lab_tiles` on.
pub fn fixture_with_lab_tiles() -> Fixture {
    let mut f = fixture();
    f.services.workers = Arc::new(FakeWorkers(Worker {
        lab_tiles: true,
        ..test_worker()
    }));
    f
}

impl Fixture {
    /// An admin disabled the worker.
    pub fn disable_worker(&mut self) {
        self.services.workers = Arc::new(FakeWorkers(Worker {
            enabled: false,
            ..test_worker()
        }));
    }
}

pub fn test_worker() -> Worker {
    Worker {
        id: worker_id(),
        name: "cml-1".into(),
        base_url: BaseUrl::parse("https://cml.invalid").expect("a worker URL"),
        username: "admin".into(),
        tls: Default::default(),
        enabled: true,
        lab_tiles: false,
    }
}

/// The use cases' tunables in unit tests: short waits, small limits.
pub fn test_settings() -> CoreSettings {
    CoreSettings {
        max_concurrent_workers: 8,
        max_concurrent_labs_per_worker: 16,
        prune: labsync_domain::PrunePolicy {
            max_prune_share: 0.5,
            prune_floor: 10,
            force: false,
        },
        lease_ttl: Duration::from_secs(60),
        run_deadline: Duration::from_secs(1500),
        history_limit: 50,
        tombstone_ttl: Duration::from_secs(7 * 24 * 3600),
        converge_timeout: Duration::from_secs(120),
        converge_poll: Duration::from_millis(1),
        instance_id: "labsync-test".into(),
    }
}

pub fn fixture() -> Fixture {
    let cml = Arc::new(FakeCml::default());
    let store = Arc::new(FakeStore::default());
    let worker = test_worker();
    let services = Services {
        workers: Arc::new(FakeWorkers(worker)),
        labs: store.clone(),
        cml: cml.clone(),
        lease: store.clone(),
        audit: store.clone(),
        reports: store.clone(),
        clock: Arc::new(SystemClock),
        observer: Arc::new(NoObserver),
        settings: test_settings(),
    };
    Fixture {
        cml,
        store,
        services,
    }
}
