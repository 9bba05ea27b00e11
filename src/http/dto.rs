//! What the API accepts and returns. These types are the HTTP contract (and
//! the OpenAPI schemas); they convert from and to the application's types,
//! so a change inside labsync does not silently change the API.

use chrono::{DateTime, Utc};
use labsync_application::domain::LabRecord;
use labsync_application::ports::AuditEntry;
use labsync_application::{DeleteOutcome, DeleteRequest, RunReport, WorkerOverview};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

#[derive(Debug, Serialize, ToSchema)]
pub struct TlsView {
    /// A CA bundle is configured (its content is not returned).
    pub ca_bundle: bool,
    /// Certificate verification is off.
    pub insecure: bool,
    /// Plain `http://` was explicitly accepted for this worker.
    pub allow_http: bool,
}

/// A worker; credentials are write-only and never returned.
#[derive(Debug, Serialize, ToSchema)]
pub struct WorkerView {
    pub id: String,
    pub name: String,
    pub base_url: String,
    pub username: String,
    pub tls: TlsView,
    /// What is unsafe about how labsync reaches this worker (plain HTTP,
    /// certificate verification off); empty when nothing is.
    pub warnings: Vec<String>,
    pub enabled: bool,
    /// Lab details come from CML's one `populate_lab_tiles` request, with
    /// one request per lab for what it misses or when it fails.
    pub lab_tiles: bool,
    /// `disabled`, `never_synced`, `synced` or `failing`.
    pub sync_state: String,
    pub last_run: Option<RunReportView>,
}

impl From<WorkerOverview> for WorkerView {
    fn from(o: WorkerOverview) -> Self {
        let w = o.worker;
        let warnings = warnings(&w);
        Self {
            id: w.id.to_string(),
            name: w.name,
            base_url: w.base_url.to_string(),
            username: w.username,
            tls: TlsView {
                ca_bundle: w.tls.ca_cert_pem().is_some(),
                insecure: w.tls.insecure(),
                allow_http: w.tls.allow_http,
            },
            warnings,
            enabled: w.enabled,
            lab_tiles: w.lab_tiles,
            sync_state: serde_json::to_value(o.sync_state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            last_run: o.last_run.map(RunReportView::from),
        }
    }
}

impl WorkerView {
    /// The view for a caller who may not read run errors (see
    /// [`RunReportView::without_error_texts`]).
    #[must_use]
    pub fn without_error_texts(mut self) -> Self {
        self.last_run = self.last_run.map(RunReportView::without_error_texts);
        self
    }
}

fn warnings(w: &labsync_application::domain::Worker) -> Vec<String> {
    let mut out = Vec::new();
    if w.plain_http() {
        out.push("plain http: the CML password crosses the network unencrypted".to_owned());
    }
    if w.tls.insecure() {
        out.push("certificate verification is off".to_owned());
    }
    out
}

/// Registers a worker.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkerCreate {
    /// A slug: 1-63 of a-z, 0-9 and '-'.
    pub id: String,
    /// 1 to 200 characters, no control characters; default: the id.
    pub name: Option<String>,
    /// `https://host[:port]`; labsync adds `/api/v0`.
    pub base_url: String,
    /// A CML admin account (labsync lists every user's labs): 1 to 200
    /// characters, no control characters.
    pub username: String,
    /// Write-only; not empty.
    pub password: String,
    /// PEM bundle of the CA(s) that signed the server's certificate; not
    /// together with `insecure`.
    pub ca_cert_pem: Option<String>,
    #[serde(default)]
    pub insecure: bool,
    /// Accept a plain `http://` URL (the password then crosses the network
    /// unencrypted). Default false: an `http://` URL is refused.
    #[serde(default)]
    pub allow_http: bool,
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Fetch lab details with CML's one `populate_lab_tiles` request
    /// (falls back to one request per lab). Default false.
    #[serde(default)]
    pub lab_tiles: bool,
}

fn yes() -> bool {
    true
}

/// Changes a worker; absent fields stay as they are. The changed worker
/// must pass the same checks as a new one (see [`WorkerCreate`]).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkerPatch {
    pub name: Option<String>,
    pub base_url: Option<String>,
    pub username: Option<String>,
    /// Write-only. Required when `base_url` or `username` changes.
    pub password: Option<String>,
    /// An empty string removes the CA bundle.
    pub ca_cert_pem: Option<String>,
    pub insecure: Option<bool>,
    pub allow_http: Option<bool>,
    pub enabled: Option<bool>,
    pub lab_tiles: Option<bool>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LabFailureView {
    pub lab_id: String,
    pub error: String,
}

/// What one refresh of one worker did.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RunReportView {
    pub run_id: String,
    pub worker_id: String,
    /// `schedule`, `admin` or `cli`.
    pub trigger: String,
    /// `succeeded`, `failed` or `skipped`.
    pub status: String,
    pub dry_run: bool,
    pub force_prune: bool,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub duration_ms: u64,
    pub listed: u64,
    pub created: u64,
    pub updated: u64,
    pub unchanged: u64,
    pub pruned: u64,
    pub held: u64,
    pub failed: u64,
    pub suppressed: u64,
    pub hold_reason: Option<String>,
    pub skip_reason: Option<String>,
    /// Why the run failed. CML's errors name its account, URLs and what
    /// the server said, so only admins read them; other callers get
    /// [`RUN_ERROR_FOR_ADMINS`].
    pub error: Option<String>,
    /// Labs that failed, each with its error (for callers below admin,
    /// [`LAB_ERROR_FOR_ADMINS`]).
    pub failures: Vec<LabFailureView>,
    /// The labs whose prune was held (the first 200): apply with
    /// `force_prune=true` after reviewing them.
    #[serde(default)]
    pub held_labs: Vec<String>,
    /// Set when the stored report had to be cut down to fit a MongoDB
    /// document, saying what was cut.
    pub note: Option<String>,
}

/// What a caller below admin reads instead of a run's error.
pub const RUN_ERROR_FOR_ADMINS: &str =
    "the run failed; why is shown to admins only (it names CML's account and addresses)";

/// What a caller below admin reads instead of a lab's error in a run.
pub const LAB_ERROR_FOR_ADMINS: &str =
    "this lab failed; why is shown to admins only (it names CML's account and addresses)";

impl RunReportView {
    /// The report without the texts of its errors, for callers who may
    /// not see a worker's details: that the run or a lab failed stays.
    #[must_use]
    pub fn without_error_texts(mut self) -> Self {
        if self.error.is_some() {
            self.error = Some(RUN_ERROR_FOR_ADMINS.to_owned());
        }
        for f in &mut self.failures {
            LAB_ERROR_FOR_ADMINS.clone_into(&mut f.error);
        }
        self
    }
}

fn word<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

impl From<RunReport> for RunReportView {
    fn from(r: RunReport) -> Self {
        Self {
            trigger: word(&r.trigger),
            status: word(&r.status),
            run_id: r.run_id,
            worker_id: r.worker_id.to_string(),
            dry_run: r.dry_run,
            force_prune: r.force_prune,
            started_at: r.started_at,
            finished_at: r.finished_at,
            duration_ms: r.duration_ms,
            listed: r.listed,
            created: r.created,
            updated: r.updated,
            unchanged: r.unchanged,
            pruned: r.pruned,
            held: r.held,
            failed: r.failed,
            suppressed: r.suppressed,
            hold_reason: r.hold_reason,
            skip_reason: r.skip_reason.map(|s| s.as_str().to_owned()),
            error: r.error,
            failures: r
                .failures
                .into_iter()
                .map(|f| LabFailureView {
                    lab_id: f.lab_id.to_string(),
                    error: f.error,
                })
                .collect(),
            held_labs: r.held_labs.iter().map(ToString::to_string).collect(),
            note: r.note,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct GroupView {
    pub id: String,
    pub permission: String,
    pub name: Option<String>,
}

/// A lab as labsync last saw it in CML.
#[derive(Debug, Serialize, ToSchema)]
pub struct LabView {
    pub worker_id: String,
    pub lab_id: String,
    pub title: String,
    pub description: String,
    pub notes: String,
    pub owner_id: Option<String>,
    pub owner_username: Option<String>,
    pub owner_fullname: Option<String>,
    /// `DEFINED_ON_CORE`, `STOPPED`, `STARTED`, or what a newer CML says.
    pub state: String,
    pub node_count: u64,
    pub link_count: u64,
    pub groups: Vec<GroupView>,
    pub created: Option<DateTime<Utc>>,
    pub modified: Option<DateTime<Utc>>,
    pub first_seen_at: DateTime<Utc>,
    pub last_seen_at: DateTime<Utc>,
    pub last_changed_at: DateTime<Utc>,
    pub revision: u64,
    pub content_hash: String,
}

impl From<&LabRecord> for LabView {
    fn from(r: &LabRecord) -> Self {
        let s = &r.snapshot;
        Self {
            worker_id: r.worker_id.to_string(),
            lab_id: r.lab_id.to_string(),
            title: s.title.clone(),
            description: s.description.clone(),
            notes: s.notes.clone(),
            owner_id: s.owner_id.clone(),
            owner_username: s.owner_username.clone(),
            owner_fullname: s.owner_fullname.clone(),
            state: s.state.to_string(),
            node_count: s.node_count,
            link_count: s.link_count,
            groups: s
                .groups
                .iter()
                .map(|g| GroupView {
                    id: g.id.clone(),
                    permission: g.permission.clone(),
                    name: g.name.clone(),
                })
                .collect(),
            created: s.created,
            modified: s.modified,
            first_seen_at: r.first_seen_at,
            last_seen_at: r.last_seen_at,
            last_changed_at: r.last_changed_at,
            revision: r.revision,
            content_hash: r.content_hash.to_string(),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LabPageView {
    pub items: Vec<LabView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LabListParams {
    /// Exact state, e.g. `STARTED`. Text filters have at most 200
    /// characters and no control characters.
    pub state: Option<String>,
    /// Exact owner username.
    pub owner: Option<String>,
    /// Case-insensitive text in the title.
    pub q: Option<String>,
    /// 1 to 1000, default 100.
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// One entry of a lab's history.
#[derive(Debug, Serialize, ToSchema)]
pub struct HistoryView {
    pub at: DateTime<Utc>,
    /// `created` (details: `state`), `changed` (details: `changes`, each
    /// `{field, old, new}`) or `delete_attempt` (details: `requested_by`,
    /// `force`, `outcome`, `detail`).
    pub kind: String,
    #[schema(value_type = Object)]
    pub details: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuditView {
    pub at: DateTime<Utc>,
    pub actor: String,
    pub action: String,
    pub outcome: String,
    pub detail: String,
}

impl From<AuditEntry> for AuditView {
    fn from(a: AuditEntry) -> Self {
        Self {
            action: word(&a.action),
            at: a.at,
            actor: a.actor.to_string(),
            outcome: a.outcome,
            detail: a.detail,
        }
    }
}

/// One audit entry, with the id that pages the log.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditItemView {
    pub id: String,
    pub at: DateTime<Utc>,
    /// `api:<token>`, `cli:<user>` or `schedule`.
    pub actor: String,
    /// `delete`, `prune`, `refresh`, `worker_added`, `worker_updated` or
    /// `worker_removed`.
    pub action: String,
    pub worker_id: String,
    pub lab_id: Option<String>,
    /// A short word: `deleted`, `already_absent`, `refused_running`,
    /// `pruned`, `succeeded`...
    pub outcome: String,
    pub detail: String,
}

impl From<labsync_application::ports::StoredAudit> for AuditItemView {
    fn from(s: labsync_application::ports::StoredAudit) -> Self {
        let a = s.entry;
        Self {
            id: s.id,
            at: a.at,
            actor: a.actor.to_string(),
            action: a.action.as_str().to_owned(),
            worker_id: a.worker_id.to_string(),
            lab_id: a.lab_id.map(|l| l.to_string()),
            outcome: a.outcome,
            detail: a.detail,
        }
    }
}

/// A page of the audit log, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditPageView {
    pub items: Vec<AuditItemView>,
    /// Pass as `cursor` for the next (older) page; absent on the last.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditParams {
    pub worker_id: Option<String>,
    pub lab_id: Option<String>,
    /// The actor, exactly: `api:<token>`, `cli:<user>`, `schedule`.
    pub actor: Option<String>,
    /// `delete`, `prune`, `refresh`, `worker_added`, `worker_updated`,
    /// `worker_removed`.
    pub action: Option<String>,
    /// RFC 3339: entries at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// 1 to 1000, default 100.
    pub limit: Option<usize>,
}

/// A lab with its history (real changes and delete attempts) and audit trail.
#[derive(Debug, Serialize, ToSchema)]
pub struct LabDetailView {
    pub lab: LabView,
    pub history: Vec<HistoryView>,
    pub audit: Vec<AuditView>,
}

impl From<labsync_application::LabDetail> for LabDetailView {
    fn from(d: labsync_application::LabDetail) -> Self {
        let history = d
            .record
            .history
            .iter()
            .map(|h| {
                let mut details = match serde_json::to_value(&h.event) {
                    Ok(serde_json::Value::Object(m)) => m,
                    _ => serde_json::Map::new(),
                };
                let kind = details
                    .remove("kind")
                    .and_then(|k| k.as_str().map(str::to_owned))
                    .unwrap_or_default();
                HistoryView {
                    at: h.at,
                    kind,
                    details,
                }
            })
            .collect();
        Self {
            lab: LabView::from(&d.record),
            history,
            audit: d.audit.into_iter().map(AuditView::from).collect(),
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeleteParams {
    /// Stop and wipe a running lab first.
    pub force: Option<bool>,
    /// `sync` (default) or `async`: store the request and return 202.
    pub mode: Option<String>,
}

/// How a delete ended.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeleteOutcomeView {
    pub worker_id: String,
    pub lab_id: String,
    /// `deleted`, `already_absent`, `refused_running`, `cml_unreachable`,
    /// `cml_refused`, `not_converged` or `account_not_admin`.
    pub kind: String,
    /// For `refused_running`: the lab's state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// For CML failures: what CML said.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// True when CML no longer has the lab.
    pub lab_gone: bool,
    pub record_was_present: bool,
    pub message: String,
}

impl From<&DeleteOutcome> for DeleteOutcomeView {
    fn from(o: &DeleteOutcome) -> Self {
        use labsync_application::DeleteOutcomeKind as K;
        let (state, error) = match &o.kind {
            K::RefusedRunning { state } => (Some(state.to_string()), None),
            K::CmlUnreachable { error } | K::CmlRefused { error, .. } => {
                (None, Some(error.clone()))
            }
            K::NotConverged { step } => (None, Some(step.clone())),
            K::Deleted | K::AlreadyAbsent | K::AccountNotAdmin { .. } | K::NotOwner { .. } => {
                (None, None)
            }
        };
        Self {
            worker_id: o.worker_id.to_string(),
            lab_id: o.lab_id.to_string(),
            kind: o.kind.word().to_owned(),
            state,
            error,
            lab_gone: o.lab_gone,
            record_was_present: o.record_was_present,
            message: o.message.clone(),
        }
    }
}

/// An asynchronous delete.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeleteRequestView {
    pub id: String,
    pub worker_id: String,
    pub lab_id: String,
    pub force: bool,
    pub requested_by: String,
    /// `pending`, `running`, `done`, `failed` or `cancelled`.
    pub status: String,
    pub attempts: u32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub next_attempt_at: DateTime<Utc>,
    pub last_error: Option<String>,
    pub outcome: Option<DeleteOutcomeView>,
    /// Who cancelled it, if it was.
    pub cancelled_by: Option<String>,
    /// Who asked to cancel it while an attempt was running.
    pub cancel_requested_by: Option<String>,
}

impl DeleteRequestView {
    /// The request without what CML said, for callers who may not delete:
    /// that it failed, and how, stays.
    #[must_use]
    pub fn without_error_texts(mut self) -> Self {
        if self.last_error.is_some() {
            self.last_error =
                Some("the delete failed; operators and admins see what CML said".to_owned());
        }
        if let Some(o) = &mut self.outcome {
            o.error = None;
            o.message = format!("{}; operators and admins see what CML said", o.kind);
        }
        self
    }
}

impl From<DeleteRequest> for DeleteRequestView {
    fn from(r: DeleteRequest) -> Self {
        Self {
            status: word(&r.status),
            id: r.id,
            worker_id: r.worker_id.to_string(),
            lab_id: r.lab_id.to_string(),
            force: r.force,
            requested_by: r.requested_by.to_string(),
            attempts: r.attempts,
            created_at: r.created_at,
            updated_at: r.updated_at,
            next_attempt_at: r.next_attempt_at,
            last_error: r.last_error,
            cancelled_by: r.cancelled_by.map(String::from),
            cancel_requested_by: r.cancel_requested_by.map(String::from),
            outcome: r.outcome.as_ref().map(DeleteOutcomeView::from),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AcceptedDelete {
    pub delete_request_id: String,
    /// Where to follow it.
    pub href: String,
    /// True when the lab already had an active request: this is that one
    /// (one active request per lab; its `force` is the first submit's).
    pub existing: bool,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RefreshParams {
    pub dry_run: Option<bool>,
    pub force_prune: Option<bool>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RunsParams {
    pub worker_id: Option<String>,
    /// running, succeeded, failed or skipped.
    pub status: Option<String>,
    /// 1 to 1000, default 50.
    pub limit: Option<usize>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    pub status: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    pub ready: bool,
    pub mongodb: bool,
    pub scheduler: bool,
    /// With `oidc.issuer` set: `ok`, or why the provider's keys cannot be
    /// read. Not part of `ready`: API tokens work without the provider.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oidc: Option<String>,
}

/// What a connection check found.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConnectionCheckView {
    pub ok: bool,
    /// `unreachable`, `tls`, `credentials`, `not_admin` or `not_cml`.
    pub problem: Option<String>,
    /// What happened and what to do about it.
    pub detail: String,
    /// The account CML said it is, when the login worked.
    pub username: Option<String>,
    /// How many labs CML listed.
    pub labs: Option<usize>,
}

impl From<labsync_application::connection::ConnectionCheck> for ConnectionCheckView {
    fn from(c: labsync_application::connection::ConnectionCheck) -> Self {
        Self {
            ok: c.ok,
            problem: c.problem.map(|p| word(&p)),
            detail: c.detail,
            username: c.username,
            labs: c.labs,
        }
    }
}
