//! The handlers: each requires a role (by its extractor), turns its input into
//! domain types, calls one use case, and shapes the answer.

#![allow(
    clippy::missing_errors_doc,
    reason = "a handler's errors are its documented responses, in its utoipa::path"
)]

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use labsync_application::domain::{BaseUrl, LabId, TlsSettings, Worker, WorkerChanges, WorkerId};
use labsync_application::ports::LabQuery;
use labsync_application::{
    AppError, CancelError, DeleteLab, DeleteRequestStatus, RefreshAll, RefreshOptions,
    RefreshWorkerLabs, RunStatus, SkipReason,
};
use labsync_infrastructure::configuration::MetricsAuth;
use labsync_infrastructure::configuration::Role;
use secrecy::SecretString;

use super::ApiState;
use super::auth::{self, Admin, Caller, Deleter, Operator, Viewer};
use super::dto::*;
use super::extract::{ApiJson, ApiQuery, LabPath, WorkerPath};
use labsync_application::inventory::{DEFAULT_PAGE, DEFAULT_RUNS, MAX_PAGE};
use labsync_application::ports::{AuditAction, AuditQuery, RunQuery};

use super::problem::{ApiError, Problem, ProblemKind};

type ApiResult<T> = Result<T, ApiError>;

#[utoipa::path(get, path = "/api/v1/workers", tag = "workers",
    responses((status = 200, body = [WorkerView]), (status = 401, body = Problem)),
    security(("token" = [])))]
pub async fn list_workers(
    State(s): State<ApiState>,
    Viewer(caller): Viewer,
) -> ApiResult<Json<Vec<WorkerView>>> {
    let workers = s.inventory.workers().await?;
    Ok(Json(
        workers
            .into_iter()
            .map(|w| worker_view(w, &caller))
            .collect(),
    ))
}

/// A worker as `caller` may see it: run errors only for those who may
/// read a worker's details.
fn worker_view(w: labsync_application::WorkerOverview, caller: &Caller) -> WorkerView {
    let view = WorkerView::from(w);
    if caller.may_read_worker_details() {
        view
    } else {
        view.without_error_texts()
    }
}

#[utoipa::path(post, path = "/api/v1/workers", tag = "workers", request_body = WorkerCreate,
    responses((status = 201, body = WorkerView), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 409, body = Problem)),
    security(("token" = [])))]
pub async fn create_worker(
    State(s): State<ApiState>,
    Admin(caller): Admin,
    ApiJson(body): ApiJson<WorkerCreate>,
) -> ApiResult<(StatusCode, Json<WorkerView>)> {
    let (worker, password) = new_worker(body)?;
    let view = s
        .inventory
        .register(worker, password, &caller.actor())
        .await?;
    Ok((StatusCode::CREATED, Json(view.into())))
}

/// A worker to register (or check), as the domain accepts it.
fn new_worker(body: WorkerCreate) -> Result<(Worker, SecretString), ApiError> {
    let id = WorkerId::parse(&body.id).map_err(AppError::from)?;
    let base_url = BaseUrl::parse(&body.base_url).map_err(ApiError::bad_request)?;
    if body.password.is_empty() {
        return Err(ApiError::bad_request("password must not be empty"));
    }
    let tls = TlsSettings::from_parts(body.ca_cert_pem, body.insecure, body.allow_http)
        .map_err(AppError::Invalid)?;
    let mut worker = Worker::new(
        id.clone(),
        body.name.unwrap_or_else(|| id.to_string()),
        base_url,
        body.username,
        tls,
    )
    .map_err(AppError::Invalid)?;
    worker.enabled = body.enabled;
    worker.lab_tiles = body.lab_tiles;
    Ok((worker, SecretString::from(body.password)))
}

#[utoipa::path(post, path = "/api/v1/connection-checks", tag = "workers", request_body = WorkerCreate,
    description = "Logs in to CML with these settings and lists its labs, saving nothing: what to try \
        before registering a worker. A failed check is a 200 whose `problem` says what failed \
        (`unreachable`, `tls`, `credentials`, `not_admin`, `not_cml`).",
    responses((status = 200, body = ConnectionCheckView), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 403, body = Problem)),
    security(("token" = [])))]
pub async fn check_settings(
    State(s): State<ApiState>,
    _: Admin,
    ApiJson(body): ApiJson<WorkerCreate>,
) -> ApiResult<Json<ConnectionCheckView>> {
    let (worker, password) = new_worker(body)?;
    Ok(Json(
        s.inventory.check_settings(worker, password).await.into(),
    ))
}

#[utoipa::path(post, path = "/api/v1/workers/{worker_id}/connection-check", tag = "workers", request_body = WorkerPatch,
    description = "Logs in to CML with the worker's stored settings, changed as the body says (a PATCH's \
        body, `{}` for none; the stored password unless one is given, under the PATCH's rules), and lists \
        its labs, saving nothing: what an edit would do, tried before it is saved.",
    params(("worker_id" = String, Path, description = "A worker id (slug)")),
    responses((status = 200, body = ConnectionCheckView), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 404, body = Problem)),
    security(("token" = [])))]
pub async fn check_worker(
    State(s): State<ApiState>,
    _: Admin,
    WorkerPath(id): WorkerPath,
    ApiJson(body): ApiJson<WorkerPatch>,
) -> ApiResult<Json<ConnectionCheckView>> {
    let (changes, password) = worker_changes(body)?;
    Ok(Json(
        s.inventory
            .check_worker(&id, &changes, password)
            .await?
            .into(),
    ))
}

#[utoipa::path(get, path = "/api/v1/workers/{worker_id}", tag = "workers",
    params(("worker_id" = String, Path, description = "A worker id (slug)")),
    responses((status = 200, body = WorkerView), (status = 400, body = Problem), (status = 401, body = Problem), (status = 404, body = Problem)),
    security(("token" = [])))]
pub async fn get_worker(
    State(s): State<ApiState>,
    Viewer(caller): Viewer,
    WorkerPath(id): WorkerPath,
) -> ApiResult<Json<WorkerView>> {
    Ok(Json(worker_view(s.inventory.worker(&id).await?, &caller)))
}

#[utoipa::path(patch, path = "/api/v1/workers/{worker_id}", tag = "workers", request_body = WorkerPatch,
    params(("worker_id" = String, Path, description = "A worker id (slug)")),
    responses((status = 200, body = WorkerView), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 404, body = Problem),
        (status = 409, description = "Other changes of the worker kept landing first; nothing was written", body = Problem)),
    security(("token" = [])))]
pub async fn patch_worker(
    State(s): State<ApiState>,
    Admin(caller): Admin,
    WorkerPath(id): WorkerPath,
    ApiJson(body): ApiJson<WorkerPatch>,
) -> ApiResult<Json<WorkerView>> {
    let (changes, password) = worker_changes(body)?;
    Ok(Json(
        s.inventory
            .update(&id, changes, password, &caller.actor())
            .await?
            .into(),
    ))
}

/// A patch as the domain's changes, and the password it brings.
fn worker_changes(body: WorkerPatch) -> Result<(WorkerChanges, Option<SecretString>), ApiError> {
    if body.password.as_deref() == Some("") {
        return Err(ApiError::bad_request("password must not be empty"));
    }
    let base_url = body
        .base_url
        .as_deref()
        .map(BaseUrl::parse)
        .transpose()
        .map_err(AppError::Invalid)?;
    let changes = WorkerChanges {
        name: body.name,
        base_url,
        username: body.username,
        ca_cert_pem: body.ca_cert_pem.map(|p| (!p.is_empty()).then_some(p)),
        insecure: body.insecure,
        allow_http: body.allow_http,
        enabled: body.enabled,
        lab_tiles: body.lab_tiles,
    };
    Ok((changes, body.password.map(SecretString::from)))
}

#[utoipa::path(delete, path = "/api/v1/workers/{worker_id}", tag = "workers",
    params(("worker_id" = String, Path, description = "A worker id (slug)")),
    responses((status = 204, description = "Removed, with every record of its labs"), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 404, body = Problem)),
    security(("token" = [])))]
pub async fn delete_worker(
    State(s): State<ApiState>,
    Admin(caller): Admin,
    WorkerPath(id): WorkerPath,
) -> ApiResult<StatusCode> {
    s.inventory.remove(&id, &caller.actor()).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/workers/{worker_id}/labs", tag = "labs",
    params(("worker_id" = String, Path, description = "A worker id (slug)"), LabListParams),
    responses((status = 200, body = LabPageView), (status = 400, body = Problem), (status = 401, body = Problem), (status = 404, body = Problem)),
    security(("token" = [])))]
pub async fn list_labs(
    State(s): State<ApiState>,
    _: Viewer,
    WorkerPath(id): WorkerPath,
    ApiQuery(p): ApiQuery<LabListParams>,
) -> ApiResult<Json<LabPageView>> {
    let after = match p.cursor.as_deref() {
        Some(c) => Some(
            LabId::parse(c)
                .map_err(|_| ApiError::bad_request("cursor is not one this API returned"))?,
        ),
        None => None,
    };
    let query = LabQuery {
        state: text_filter("state", p.state)?,
        owner: text_filter("owner", p.owner)?,
        title_contains: text_filter("q", p.q)?,
        after,
        limit: p.limit.unwrap_or(DEFAULT_PAGE),
    };
    let page = s.inventory.labs(&id, query).await?;
    Ok(Json(LabPageView {
        items: page.items.iter().map(LabView::from).collect(),
        next_cursor: page.next_cursor.map(|c| c.to_string()),
    }))
}

/// Longest text a lab filter may have, in characters.
pub const MAX_FILTER_CHARS: usize = 200;

/// A text filter from the query string: empty means none; control
/// characters (MongoDB refuses a NUL in a pattern) and very long text are
/// refused here rather than by the database.
/// The audit query an `/audit` request asks for: the one parsing of its
/// filters, for the API and the console.
///
/// # Errors
/// 400 for an id that does not parse, an unknown action, a bad text.
pub fn audit_query(p: AuditParams) -> ApiResult<AuditQuery> {
    let action = match p.action.filter(|a| !a.is_empty()) {
        Some(a) => Some(
            serde_json::from_value::<AuditAction>(serde_json::Value::String(a.clone())).map_err(
                |_| {
                    ApiError::bad_request(format!(
                        "action must be delete, prune, refresh, worker_added, worker_updated \
                         or worker_removed, not {:?}",
                        a.chars().take(40).collect::<String>()
                    ))
                },
            )?,
        ),
        None => None,
    };
    Ok(AuditQuery {
        worker: text_filter("worker_id", p.worker_id)?
            .map(|w| WorkerId::parse(&w))
            .transpose()
            .map_err(AppError::from)?,
        lab: text_filter("lab_id", p.lab_id)?
            .map(|l| LabId::parse(&l))
            .transpose()
            .map_err(AppError::from)?,
        actor: text_filter("actor", p.actor)?,
        action,
        since: p.since,
        before: text_filter("cursor", p.cursor)?,
        limit: p.limit.unwrap_or(DEFAULT_PAGE),
    })
}

#[utoipa::path(get, path = "/api/v1/audit", tag = "audit",
    description = "Who deleted, pruned or refreshed what, and how it ended, newest first; labs that are gone included.",
    params(AuditParams),
    responses((status = 200, body = AuditPageView), (status = 400, body = Problem), (status = 401, body = Problem)),
    security(("token" = [])))]
pub async fn audit(
    State(s): State<ApiState>,
    Viewer(caller): Viewer,
    ApiQuery(p): ApiQuery<AuditParams>,
) -> ApiResult<Json<AuditPageView>> {
    let page = s.inventory.audit(audit_query(p)?).await?;
    // What CML said about a delete is for those who may delete.
    let details = caller.role >= Role::Operator;
    Ok(Json(AuditPageView {
        items: page
            .items
            .into_iter()
            .map(|a| {
                let hide = !details && a.entry.action == AuditAction::Delete;
                let mut view = AuditItemView::from(a);
                if hide {
                    view.detail = String::new();
                }
                view
            })
            .collect(),
        next_cursor: page.next_cursor,
    }))
}

fn text_filter(name: &str, value: Option<String>) -> ApiResult<Option<String>> {
    let Some(v) = value.filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    if v.chars().any(char::is_control) {
        return Err(ApiError::bad_request(format!(
            "{name} must not contain control characters"
        )));
    }
    if v.chars().count() > MAX_FILTER_CHARS {
        return Err(ApiError::bad_request(format!(
            "{name} may be at most {MAX_FILTER_CHARS} characters"
        )));
    }
    Ok(Some(v))
}

#[utoipa::path(get, path = "/api/v1/workers/{worker_id}/labs/{lab_id}", tag = "labs",
    params(("worker_id" = String, Path, description = "A worker id (slug)"), ("lab_id" = String, Path, description = "A lab id (UUID4)")),
    responses((status = 200, body = LabDetailView), (status = 400, body = Problem), (status = 401, body = Problem), (status = 404, body = Problem)),
    security(("token" = [])))]
pub async fn get_lab(
    State(s): State<ApiState>,
    _: Viewer,
    LabPath(w, lab): LabPath,
) -> ApiResult<Json<LabDetailView>> {
    Ok(Json(s.inventory.lab(&w, &lab).await?.into()))
}

#[utoipa::path(delete, path = "/api/v1/workers/{worker_id}/labs/{lab_id}", tag = "labs",
    params(("worker_id" = String, Path, description = "A worker id (slug)"), ("lab_id" = String, Path, description = "A lab id (UUID4)"), DeleteParams),
    responses(
        (status = 200, description = "The lab is gone (deleted, or CML did not have it)", body = DeleteOutcomeView),
        (status = 202, description = "Accepted (mode=async)", body = AcceptedDelete),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 404, body = Problem),
        (status = 403, description = "Below operator and not self-service; or a self-service person's delete of a lab that CML says someone else owns (`not-lab-owner`)", body = Problem),
        (status = 409, description = "The lab is running and force was not given", body = Problem),
        (status = 502, description = "CML failed or could not be reached, or labsync's CML account is not an admin", body = Problem),
        (status = 503, body = Problem)),
    security(("token" = [])))]
pub async fn delete_lab(
    State(s): State<ApiState>,
    Deleter(caller): Deleter,
    LabPath(w, lab): LabPath,
    ApiQuery(p): ApiQuery<DeleteParams>,
) -> ApiResult<Response> {
    let cmd = DeleteLab {
        worker_id: w,
        lab_id: lab,
        force: p.force.unwrap_or(false),
        requested_by: caller.actor(),
        owned_by: caller.delete_scope()?,
    };
    match p.mode.as_deref() {
        None | Some("sync") => {}
        Some("async") => {
            let (request, new) = s.delete_queue.submit(&cmd).await?;
            let href = format!("/api/v1/delete-requests/{}", request.id);
            let body = AcceptedDelete {
                delete_request_id: request.id,
                href: href.clone(),
                existing: !new,
            };
            return Ok(
                (StatusCode::ACCEPTED, [(header::LOCATION, href)], Json(body)).into_response(),
            );
        }
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "mode must be sync or async, not {other:?}"
            )));
        }
    }
    // The delete runs to completion even if the client goes away: a delete
    // cut off between CML and the database is exactly what must not happen.
    let services = s.services.clone();
    let outcome = tokio::spawn(async move { cmd.execute(&services).await })
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
    let view = DeleteOutcomeView::from(&outcome);
    if outcome.lab_gone {
        return Ok(Json(view).into_response());
    }
    let kind = super::problem::delete_failure(&outcome.kind);
    Err(ApiError::new(kind, outcome.message.clone()).with("outcome", view))
}

fn unknown_delete_request(id: &str) -> ApiError {
    ApiError::new(
        ProblemKind::UnknownDeleteRequest,
        format!("no delete request {id:?}"),
    )
}

/// The delete request `id` names; 404 for an id that is no UUID or names
/// none.
async fn stored_delete_request(
    s: &ApiState,
    id: &str,
) -> ApiResult<labsync_application::DeleteRequest> {
    if uuid::Uuid::parse_str(id).is_err() {
        return Err(unknown_delete_request(id));
    }
    s.delete_queue
        .get(id)
        .await?
        .ok_or_else(|| unknown_delete_request(id))
}

#[utoipa::path(get, path = "/api/v1/delete-requests/{id}", tag = "labs",
    params(("id" = String, Path, description = "The delete request id")),
    responses((status = 200, body = DeleteRequestView), (status = 401, body = Problem), (status = 404, body = Problem)),
    security(("token" = [])))]
pub async fn get_delete_request(
    State(s): State<ApiState>,
    Viewer(caller): Viewer,
    Path(id): Path<String>,
) -> ApiResult<Json<DeleteRequestView>> {
    let request = stored_delete_request(&s, &id).await?;
    let view = DeleteRequestView::from(request);
    // CML's words about a delete are for those who may delete.
    if caller.role >= Role::Operator {
        Ok(Json(view))
    } else {
        Ok(Json(view.without_error_texts()))
    }
}

#[utoipa::path(delete, path = "/api/v1/delete-requests/{id}", tag = "labs",
    params(("id" = String, Path, description = "The delete request id")),
    responses(
        (status = 200, description = "Cancelled: it will not run (again)", body = DeleteRequestView),
        (status = 202, description = "An attempt is running: it finishes first, then the request ends cancelled unless that attempt deleted the lab", body = DeleteRequestView),
        (status = 401, body = Problem),
        (status = 403, description = "Neither its requester nor an admin", body = Problem),
        (status = 404, body = Problem),
        (status = 409, description = "It has ended (done or failed)", body = Problem)),
    security(("token" = [])))]
pub async fn cancel_delete_request(
    State(s): State<ApiState>,
    Operator(caller): Operator,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let request = stored_delete_request(&s, &id).await?;
    if caller.role < Role::Admin && !request.requested_by.same_party(&caller.actor()) {
        return Err(ApiError::new(
            ProblemKind::Forbidden,
            format!(
                "delete request {id} was made by {}: only its requester or an admin may cancel it",
                request.requested_by
            ),
        ));
    }
    match s.delete_queue.cancel(&id, &caller.actor()).await {
        Ok(r) if r.status == DeleteRequestStatus::Running => {
            Ok((StatusCode::ACCEPTED, Json(DeleteRequestView::from(r))).into_response())
        }
        Ok(r) => Ok(Json(DeleteRequestView::from(r)).into_response()),
        Err(CancelError::Unknown(_)) => Err(unknown_delete_request(&id)),
        Err(e @ CancelError::NotPending { .. }) => Err(ApiError::new(
            ProblemKind::DeleteRequestNotPending,
            e.to_string(),
        )),
        Err(CancelError::Repository(e)) => Err(AppError::Repository(e).into()),
    }
}

fn report_response(r: labsync_application::RunReport) -> ApiResult<Json<RunReportView>> {
    match r.status {
        RunStatus::Succeeded | RunStatus::Running => Ok(Json(r.into())),
        RunStatus::Skipped => {
            let detail = r.skip_reason.map_or("skipped", SkipReason::as_str);
            Err(ApiError::new(ProblemKind::RefreshSkipped, detail)
                .with("report", RunReportView::from(r)))
        }
        RunStatus::Failed => {
            let detail = r.error.clone().unwrap_or_else(|| "refresh failed".into());
            Err(ApiError::new(ProblemKind::RefreshFailed, detail)
                .with("report", RunReportView::from(r)))
        }
    }
}

/// Whether the caller asked for an answer before the work is done
/// (RFC 7240 `Prefer: respond-async`).
fn respond_async(headers: &HeaderMap) -> bool {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim().eq_ignore_ascii_case("respond-async"))
}

fn run_href(run_id: &str) -> String {
    format!("/api/v1/refresh-runs/{run_id}")
}

/// 202 with the started run's `running` report, and where to follow it.
fn started(report: RunReportView) -> Response {
    let href = run_href(&report.run_id);
    let mut r = (StatusCode::ACCEPTED, Json(report)).into_response();
    if let Ok(v) = header::HeaderValue::from_str(&href) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r.headers_mut().insert(
        "preference-applied",
        header::HeaderValue::from_static("respond-async"),
    );
    r
}

fn refresh_options(p: &RefreshParams) -> RefreshOptions {
    RefreshOptions {
        dry_run: p.dry_run.unwrap_or(false),
        force_prune: p.force_prune.unwrap_or(false),
    }
}

#[utoipa::path(post, path = "/api/v1/workers/{worker_id}/labs/refresh", tag = "refresh",
    description = "Refreshes the worker and answers with the run's report. With `Prefer: respond-async` \
        it answers at once: 202, the run's report with status `running`, and its address in `Location` \
        (`GET /api/v1/refresh-runs/{run_id}`), which says how it ended once it has.",
    params(("worker_id" = String, Path, description = "A worker id (slug)"), RefreshParams,
        ("Prefer" = Option<String>, Header, description = "`respond-async`: answer 202 at once")),
    responses((status = 200, body = RunReportView),
        (status = 202, description = "Started (with `Prefer: respond-async`); follow `Location`", body = RunReportView),
        (status = 401, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem),
        (status = 409, description = "A refresh of this worker is in progress, or it is disabled", body = Problem),
        (status = 502, description = "CML failed", body = Problem)),
    security(("token" = [])))]
pub async fn refresh_worker(
    State(s): State<ApiState>,
    Admin(caller): Admin,
    WorkerPath(id): WorkerPath,
    headers: HeaderMap,
    ApiQuery(p): ApiQuery<RefreshParams>,
) -> ApiResult<Response> {
    let options = refresh_options(&p);
    let services = s.services.clone();
    let actor = caller.actor();
    if respond_async(&headers) {
        let report = RefreshWorkerLabs::new(services)
            .start(&id, &actor, options)
            .await?;
        return Ok(started(RunReportView::from(report)));
    }
    let report = tokio::spawn(async move {
        RefreshWorkerLabs::new(services)
            .execute(&id, &actor, options)
            .await
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))??;
    Ok(report_response(report)?.into_response())
}

#[utoipa::path(post, path = "/api/v1/labs/refresh", tag = "refresh", params(RefreshParams),
    description = "Starts a refresh of every enabled worker and answers at once: one `running` report per \
        worker. Follow each at `GET /api/v1/refresh-runs/{run_id}`, or watch the event stream for \
        `run_finished`.",
    responses((status = 202, description = "One `running` report per enabled worker", body = [RunReportView]),
        (status = 401, body = Problem), (status = 403, body = Problem), (status = 503, body = Problem)),
    security(("token" = [])))]
pub async fn refresh_all(
    State(s): State<ApiState>,
    Admin(caller): Admin,
    ApiQuery(p): ApiQuery<RefreshParams>,
) -> ApiResult<Response> {
    let reports = RefreshAll::new(s.services.clone())
        .start(&caller.actor(), refresh_options(&p))
        .await?;
    let views: Vec<RunReportView> = reports.into_iter().map(RunReportView::from).collect();
    Ok((StatusCode::ACCEPTED, Json(views)).into_response())
}

#[utoipa::path(get, path = "/api/v1/refresh-runs", tag = "refresh", params(RunsParams),
    responses((status = 200, description = "Newest first", body = [RunReportView]), (status = 400, body = Problem), (status = 401, body = Problem)),
    security(("token" = [])))]
pub async fn refresh_runs(
    State(s): State<ApiState>,
    Viewer(caller): Viewer,
    ApiQuery(p): ApiQuery<RunsParams>,
) -> ApiResult<Json<Vec<RunReportView>>> {
    let query = runs_query(&p)?;
    let runs = s.inventory.runs(query).await?;
    let details = caller.may_read_worker_details();
    Ok(Json(
        runs.into_iter()
            .map(RunReportView::from)
            .map(|r| if details { r } else { r.without_error_texts() })
            .collect(),
    ))
}

/// The runs a query asks for, checked: the API's and the console's.
pub fn runs_query(p: &RunsParams) -> Result<RunQuery, ApiError> {
    let worker = match p.worker_id.as_deref().filter(|w| !w.is_empty()) {
        Some(w) => Some(WorkerId::parse(w).map_err(AppError::from)?),
        None => None,
    };
    let status = match p.status.as_deref().filter(|w| !w.is_empty()) {
        Some(word) => Some(RunStatus::parse(word).ok_or_else(|| {
            ApiError::bad_request(
                "status must be one of running, succeeded, failed, skipped".to_owned(),
            )
        })?),
        None => None,
    };
    let limit = p.limit.unwrap_or(DEFAULT_RUNS);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit must be between 1 and {MAX_PAGE}"
        )));
    }
    Ok(RunQuery {
        worker,
        status,
        outcomes_only: false,
        limit,
    })
}

#[utoipa::path(get, path = "/api/v1/refresh-runs/{run_id}", tag = "refresh",
    description = "One run's report: `running` until it ends, then how it ended.",
    params(("run_id" = String, Path, description = "A run id, as a refresh answered it")),
    responses((status = 200, body = RunReportView), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 404, body = Problem)),
    security(("token" = [])))]
pub async fn refresh_run(
    State(s): State<ApiState>,
    Viewer(caller): Viewer,
    Path(run_id): Path<String>,
) -> ApiResult<Json<RunReportView>> {
    if uuid::Uuid::parse_str(&run_id).is_err() {
        return Err(ApiError::new(
            ProblemKind::InvalidId,
            "a run id is a UUID, as a refresh answered it",
        ));
    }
    let view = RunReportView::from(s.inventory.run(&run_id).await?);
    Ok(Json(if caller.may_read_worker_details() {
        view
    } else {
        view.without_error_texts()
    }))
}

#[utoipa::path(get, path = "/api/v1/healthz", tag = "operations", responses((status = 200, body = Health)))]
pub async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

#[utoipa::path(get, path = "/api/v1/readyz", tag = "operations",
    responses((status = 200, body = Readiness),
        (status = 503, body = Problem, content_type = "application/problem+json",
         description = "Not ready: a problem carrying the readiness fields")))]
pub async fn readyz(State(s): State<ApiState>) -> Result<Json<Readiness>, ApiError> {
    let mongodb = s.ping().await;
    let scheduler = s
        .scheduler_running
        .load(std::sync::atomic::Ordering::Relaxed);
    let ready = mongodb && scheduler;
    let oidc = match &s.oidc {
        Some(v) => Some(match v.last_problem().await {
            None => "ok".to_owned(),
            Some(e) => format!("the OpenID Connect provider cannot be read: {e}"),
        }),
        None => None,
    };
    if ready {
        return Ok(Json(Readiness {
            ready,
            mongodb,
            scheduler,
            oidc,
        }));
    }
    // An error like every other: a problem, with the readiness fields as
    // extension members so that probes and people read the same answer.
    let detail = match (mongodb, scheduler) {
        (false, false) => "MongoDB does not answer and the scheduler is not running",
        (false, true) => "MongoDB does not answer",
        _ => "the scheduler is not running",
    };
    Err(ApiError::new(ProblemKind::NotReady, detail)
        .with("ready", false)
        .with("mongodb", mongodb)
        .with("scheduler", scheduler))
}

#[utoipa::path(get, path = "/api/v1/metrics", tag = "operations",
    description = "Who may read the metrics is `api.metrics_auth`: by default a token of at least the viewer role; \
        `open` needs none, `off` answers 404.",
    responses((status = 200, description = "Prometheus text exposition", content_type = "text/plain"),
        (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 404, description = "The metrics are off", body = Problem)),
    security(("token" = []), ()))]
pub async fn metrics(State(s): State<ApiState>, headers: HeaderMap) -> ApiResult<Response> {
    match (s.metrics_auth, s.metrics_auth.role()) {
        (MetricsAuth::Off, _) => return Err(super::not_found()),
        (_, Some(role)) => auth::caller(&headers, &s).await?.require(role)?,
        (_, None) => {}
    }
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response())
}

#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "operations",
    responses((status = 200, description = "This document", content_type = "application/json")))]
pub async fn openapi() -> impl IntoResponse {
    Json(super::openapi::document())
}
