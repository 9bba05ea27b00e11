//! The control API under `/_sim/`: what tests and benchmarks use to change a
//! worker behind labsync's back and to break it on purpose. It needs no
//! token and is never subject to faults.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::faults::Faults;
use crate::model::LabSpec;
use crate::server::WorkerState;

type Worker = State<Arc<WorkerState>>;

pub(crate) fn routes() -> Router<Arc<WorkerState>> {
    Router::new()
        .route("/_sim/labs", get(list).post(create))
        .route(
            "/_sim/labs/{lab_id}",
            get(show).patch(update).delete(remove),
        )
        .route(
            "/_sim/faults",
            get(get_faults).put(put_faults).delete(clear_faults),
        )
        .route("/_sim/expire_tokens", post(expire_tokens))
        .route("/_sim/stats", get(stats).delete(reset_stats))
        .route("/_sim/users", get(users))
        .route("/_sim/users/{username}", axum::routing::patch(patch_user))
        .route("/_sim/reset", post(reset))
}

/// A control request that cannot be carried out: 400 with the reason.
#[derive(Debug)]
struct BadRequest(String);

impl IntoResponse for BadRequest {
    fn into_response(self) -> Response {
        (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": self.0})),
        )
            .into_response()
    }
}

fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, BadRequest> {
    serde_json::from_slice(body).map_err(|e| BadRequest(e.to_string()))
}

/// Every lab, with its full state and whether it has converged: the truth
/// that tests compare labsync's inventory against.
async fn list(State(w): Worker) -> Response {
    let labs: Vec<_> = w
        .labs()
        .into_iter()
        .map(|l| {
            let converged = l.converged();
            let mut v = serde_json::to_value(l).unwrap_or_default();
            v["converged"] = converged.into();
            v
        })
        .collect();
    axum::Json(labs).into_response()
}

async fn show(State(w): Worker, Path(id): Path<String>) -> Response {
    match w.lab(&id) {
        Some(lab) => axum::Json(lab).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"error": "no such lab"})),
        )
            .into_response(),
    }
}

async fn create(State(w): Worker, body: Bytes) -> Result<Response, BadRequest> {
    let lab = w.add_lab(parse::<LabSpec>(&body)?).map_err(BadRequest)?;
    Ok((StatusCode::CREATED, axum::Json(lab)).into_response())
}

async fn update(
    State(w): Worker,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, BadRequest> {
    let lab = w
        .update_lab(&id, parse::<LabSpec>(&body)?)
        .map_err(BadRequest)?;
    Ok(axum::Json(lab).into_response())
}

async fn remove(State(w): Worker, Path(id): Path<String>) -> StatusCode {
    if w.remove_lab(&id) {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::NOT_FOUND
    }
}

async fn get_faults(State(w): Worker) -> Response {
    axum::Json(w.faults()).into_response()
}

async fn put_faults(State(w): Worker, body: Bytes) -> Result<Response, BadRequest> {
    let faults: Faults = parse(&body)?;
    w.set_faults(faults.clone());
    Ok(axum::Json(faults).into_response())
}

async fn clear_faults(State(w): Worker) -> StatusCode {
    w.set_faults(Faults::default());
    StatusCode::NO_CONTENT
}

async fn expire_tokens(State(w): Worker) -> StatusCode {
    w.expire_tokens();
    StatusCode::NO_CONTENT
}

async fn stats(State(w): Worker) -> Response {
    axum::Json(w.stats()).into_response()
}

async fn reset_stats(State(w): Worker) -> StatusCode {
    w.reset_stats();
    StatusCode::NO_CONTENT
}

/// The simulated users and their passwords (the simulator's own, for tests).
async fn users(State(w): Worker) -> Response {
    axum::Json(w.users()).into_response()
}

/// `{"admin": bool}`: gives a user admin rights or takes them away.
async fn patch_user(
    State(w): Worker,
    Path(username): Path<String>,
    body: Bytes,
) -> Result<StatusCode, BadRequest> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Patch {
        admin: bool,
    }
    let p: Patch = parse(&body)?;
    w.set_admin(&username, p.admin).map_err(BadRequest)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn reset(State(w): Worker) -> StatusCode {
    w.reset();
    StatusCode::NO_CONTENT
}
