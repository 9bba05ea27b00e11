//! The CML `/api/v0` endpoints labsync uses, with CML's status codes and
//! bodies: errors are `{"code": <status>, "description": <text>}`, the token
//! is a bare JSON string, 204s have no body.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use serde::Deserialize;
use serde_json::json;

use crate::auth::TokenError;
use crate::model::{Inventory, Lab, SimUser};
use crate::server::WorkerState;

type Worker = State<Arc<WorkerState>>;

pub(crate) fn routes() -> Router<Arc<WorkerState>> {
    Router::new()
        .route("/api/v0/authenticate", post(authenticate))
        .route("/api/v0/auth_extended", post(auth_extended))
        .route("/api/v0/authok", get(authok))
        .route("/api/v0/logout", delete(logout))
        .route("/api/v0/system_information", get(system_information))
        .route("/api/v0/labs", get(list_labs))
        .route("/api/v0/labs/{lab_id}", get(lab_details).delete(delete_lab))
        .route("/api/v0/labs/{lab_id}/state", get(lab_state))
        .route("/api/v0/labs/{lab_id}/check_if_converged", get(converged))
        .route("/api/v0/labs/{lab_id}/{action}", put(lab_action))
        .route("/api/v0/populate_lab_tiles", get(lab_tiles))
        .fallback(not_found)
}

/// An answer in CML's error shape: `{"code": <status>, "description": <text>}`.
#[derive(Debug)]
pub(crate) struct CmlError {
    status: StatusCode,
    description: String,
}

impl CmlError {
    pub(crate) fn new(status: StatusCode, description: impl Into<String>) -> Self {
        Self {
            status,
            description: description.into(),
        }
    }
}

impl IntoResponse for CmlError {
    fn into_response(self) -> Response {
        (
            self.status,
            axum::Json(json!({"code": self.status.as_u16(), "description": self.description})),
        )
            .into_response()
    }
}

type ApiResult = Result<Response, CmlError>;

async fn not_found() -> CmlError {
    CmlError::new(
        StatusCode::NOT_FOUND,
        "The requested URL was not found on the server.",
    )
}

#[derive(Deserialize)]
struct Credentials {
    username: String,
    password: String,
}

/// Checks the credentials in a login body and issues a token.
fn login(worker: &WorkerState, body: &Bytes) -> Result<(SimUser, String), CmlError> {
    let creds: Credentials = serde_json::from_slice(body).map_err(|e| {
        CmlError::new(
            StatusCode::BAD_REQUEST,
            format!("Request body must be {{\"username\", \"password\"}}: {e}"),
        )
    })?;
    let mut g = worker.lock();
    let user = g
        .users
        .iter()
        .find(|u| u.username == creds.username && u.password == creds.password)
        .cloned()
        .ok_or_else(|| CmlError::new(StatusCode::FORBIDDEN, "Authentication failed!"))?;
    let token = g.tokens.issue(&user.id);
    Ok((user, token))
}

async fn authenticate(State(worker): Worker, body: Bytes) -> ApiResult {
    let (_, token) = login(&worker, &body)?;
    Ok(axum::Json(token).into_response())
}

async fn auth_extended(State(worker): Worker, body: Bytes) -> ApiResult {
    let (user, token) = login(&worker, &body)?;
    Ok(axum::Json(json!({
        "username": user.username,
        "id": user.id,
        "token": token,
        "admin": user.admin,
        "error": null,
    }))
    .into_response())
}

/// The caller's user and token id, or CML's 401.
fn caller(worker: &WorkerState, headers: &HeaderMap) -> Result<(SimUser, String), CmlError> {
    let unauthorized = |e: TokenError| CmlError::new(StatusCode::UNAUTHORIZED, e.to_string());
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| unauthorized(TokenError::Missing))?;
    let g = worker.lock();
    let claims = g.tokens.verify(token).map_err(unauthorized)?;
    let user = g
        .users
        .iter()
        .find(|u| u.id == claims.sub)
        .cloned()
        .ok_or_else(|| unauthorized(TokenError::Invalid))?;
    Ok((user, claims.jti))
}

async fn authok(State(worker): Worker, headers: HeaderMap) -> ApiResult {
    caller(&worker, &headers)?;
    Ok(axum::Json("OK").into_response())
}

async fn logout(
    State(worker): Worker,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let (user, jti) = caller(&worker, &headers)?;
    let all = flag(&q, "clear_all_sessions")?;
    let mut g = worker.lock();
    if all {
        g.tokens.revoke_user(&user.id);
    } else {
        g.tokens.revoke(&jti);
    }
    Ok(axum::Json(true).into_response())
}

async fn system_information(State(worker): Worker) -> Response {
    axum::Json(json!({
        "version": worker.version,
        "ready": true,
        "allow_ssh_pubkey_auth": false,
        "oui": "52:54:00:00:00:00",
    }))
    .into_response()
}

/// A boolean query parameter, as FastAPI parses one.
fn flag(q: &HashMap<String, String>, name: &str) -> Result<bool, CmlError> {
    match q.get(name).map(|s| s.to_ascii_lowercase()).as_deref() {
        None | Some("false" | "0" | "no" | "off") => Ok(false),
        Some("true" | "1" | "yes" | "on") => Ok(true),
        Some(_) => Err(CmlError::new(
            StatusCode::BAD_REQUEST,
            format!("Query parameter {name}: Input should be a valid boolean"),
        )),
    }
}

async fn list_labs(
    State(worker): Worker,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let (user, _) = caller(&worker, &headers)?;
    let show_all = flag(&q, "show_all")?;
    let g = worker.lock();
    if g.faults.empty_list {
        return Ok(axum::Json(Vec::<String>::new()).into_response());
    }
    let ids: Vec<serde_json::Value> = g
        .inventory
        .labs
        .values()
        .filter(|lab| {
            if show_all {
                lab.permissions_for(&user).is_some()
            } else {
                lab.owner == user.id
            }
        })
        .filter(|lab| !g.faults.hide_from_list.contains(&lab.id))
        .map(|lab| serde_json::Value::from(lab.id.as_str()))
        .chain(g.faults.invalid_list_entries.iter().cloned())
        .collect();
    Ok(axum::Json(ids).into_response())
}

/// `GET /populate_lab_tiles`: every lab the caller may see, keyed by id,
/// each as its details plus a `topology` (as a CML 2.4 server answered;
/// the simulator's labs have no nodes, so the topology is empty).
async fn lab_tiles(State(worker): Worker, headers: HeaderMap) -> ApiResult {
    let (user, _) = caller(&worker, &headers)?;
    let g = worker.lock();
    let tiles: serde_json::Map<String, serde_json::Value> = g
        .inventory
        .labs
        .values()
        .filter_map(|lab| {
            let perms = lab.permissions_for(&user)?;
            let mut tile = lab.to_response(&perms);
            if let Some(obj) = tile.as_object_mut() {
                obj.insert("topology".into(), json!({"nodes": [], "links": []}));
            }
            Some((lab.id.clone(), tile))
        })
        .collect();
    Ok(axum::Json(json!({ "lab_tiles": tiles })).into_response())
}

/// Resolves the caller, validates the id and returns what the caller may do
/// with the lab; a lab they cannot see does not exist for them.
fn visible_lab(
    worker: &WorkerState,
    headers: &HeaderMap,
    lab_id: &str,
) -> Result<Vec<&'static str>, CmlError> {
    let (user, _) = caller(worker, headers)?;
    if !worker.lab_id.is_match(lab_id) {
        return Err(CmlError::new(
            StatusCode::BAD_REQUEST,
            "Path parameter lab_id: String should match pattern '^[\\da-f]{8}-[\\da-f]{4}-4[\\da-f]{3}-[89ab][\\da-f]{3}-[\\da-f]{12}$'",
        ));
    }
    let g = worker.lock();
    g.inventory
        .labs
        .get(lab_id)
        .and_then(|lab| lab.permissions_for(&user))
        .ok_or_else(|| lab_not_found(lab_id))
}

fn lab_not_found(lab_id: &str) -> CmlError {
    CmlError::new(StatusCode::NOT_FOUND, format!("Lab not found: {lab_id}"))
}

/// Reads one lab the caller may see.
fn read_lab<T>(
    worker: &WorkerState,
    headers: &HeaderMap,
    lab_id: &str,
    f: impl FnOnce(&Lab, &[&'static str]) -> T,
) -> Result<T, CmlError> {
    let perms = visible_lab(worker, headers, lab_id)?;
    let g = worker.lock();
    let lab = g
        .inventory
        .labs
        .get(lab_id)
        .ok_or_else(|| lab_not_found(lab_id))?;
    Ok(f(lab, &perms))
}

async fn lab_details(
    State(worker): Worker,
    headers: HeaderMap,
    Path(lab_id): Path<String>,
) -> ApiResult {
    let body = read_lab(&worker, &headers, &lab_id, |lab, perms| {
        lab.to_response(perms)
    })?;
    Ok(axum::Json(body).into_response())
}

async fn lab_state(
    State(worker): Worker,
    headers: HeaderMap,
    Path(lab_id): Path<String>,
) -> ApiResult {
    let state = read_lab(&worker, &headers, &lab_id, |lab, _| lab.state.clone())?;
    Ok(axum::Json(state).into_response())
}

async fn converged(
    State(worker): Worker,
    headers: HeaderMap,
    Path(lab_id): Path<String>,
) -> ApiResult {
    let converged = read_lab(&worker, &headers, &lab_id, |lab, _| lab.converged())?;
    Ok(axum::Json(converged).into_response())
}

fn forbidden() -> CmlError {
    CmlError::new(
        StatusCode::FORBIDDEN,
        "User does not have the required access to the lab.",
    )
}

async fn lab_action(
    State(worker): Worker,
    headers: HeaderMap,
    Path((lab_id, action)): Path<(String, String)>,
) -> ApiResult {
    if !matches!(action.as_str(), "start" | "stop" | "wipe") {
        return Err(not_found().await);
    }
    let perms = visible_lab(&worker, &headers, &lab_id)?;
    if !perms.contains(&"lab_exec") {
        return Err(forbidden());
    }
    let delay = worker.transition_delay;
    let mut g = worker.lock();
    let lab = g
        .inventory
        .labs
        .get_mut(&lab_id)
        .ok_or_else(|| lab_not_found(&lab_id))?;
    let now = Instant::now();
    match action.as_str() {
        "start" if lab.state != "STARTED" => {
            Inventory::begin_transition(lab, "STARTED", delay, now);
        }
        "stop" if lab.state == "STARTED" => {
            Inventory::begin_transition(lab, "STOPPED", delay, now);
        }
        "wipe" if lab.state == "STARTED" => {
            return Err(CmlError::new(
                StatusCode::BAD_REQUEST,
                format!("Lab {lab_id} is running: stop it before wiping it."),
            ));
        }
        "wipe" if lab.state == "STOPPED" => {
            Inventory::begin_transition(lab, "DEFINED_ON_CORE", delay, now);
        }
        // Already in the requested state: CML accepts and does nothing.
        _ => {}
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn delete_lab(
    State(worker): Worker,
    headers: HeaderMap,
    Path(lab_id): Path<String>,
) -> ApiResult {
    let perms = visible_lab(&worker, &headers, &lab_id)?;
    if !perms.contains(&"lab_admin") {
        return Err(forbidden());
    }
    let mut g = worker.lock();
    let lab = g
        .inventory
        .labs
        .get(&lab_id)
        .ok_or_else(|| lab_not_found(&lab_id))?;
    if lab.state != "DEFINED_ON_CORE" {
        return Err(CmlError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "Lab {lab_id} is in state {}: stop and wipe it before deleting it.",
                lab.state
            ),
        ));
    }
    g.inventory.labs.remove(&lab_id);
    g.stats.deleted += 1;
    Ok(StatusCode::NO_CONTENT.into_response())
}
