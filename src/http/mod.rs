//! The HTTP API (axum): routes under `/api/v1`, bearer tokens with roles,
//! problem+json errors carrying the request id, Prometheus metrics and a
//! generated OpenAPI document. Handlers call the application's use cases
//! and nothing else.

pub mod auth;
pub mod dto;
pub mod extract;
pub mod openapi;
pub mod problem;
pub mod routes;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::{get, post};
use labsync_application::{DeleteQueue, Inventory, Services};
use labsync_infrastructure::configuration::ApiToken;
use labsync_infrastructure::metrics::Metrics;
use mongodb::Database;
use mongodb::bson::doc;
use tower_http::request_id::{
    MakeRequestUuid, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::timeout::RequestBodyTimeoutLayer;
use tower_http::trace::TraceLayer;

use self::problem::{ApiError, PROBLEM_JSON};

/// What every handler can reach.
#[derive(Clone)]
pub struct ApiState {
    pub services: Services,
    pub inventory: Inventory,
    pub delete_queue: DeleteQueue,
    pub tokens: Arc<Vec<ApiToken>>,
    pub metrics: Metrics,
    pub db: Database,
    pub scheduler_running: Arc<AtomicBool>,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState")
            .field("tokens", &self.tokens.len())
            .finish_non_exhaustive()
    }
}

impl ApiState {
    /// Whether MongoDB answers a ping within two seconds. The ping runs in
    /// its own task, so a slow server never leaves a driver call half done.
    pub async fn ping(&self) -> bool {
        let db = self.db.clone();
        let ping = tokio::spawn(async move { db.run_command(doc! {"ping": 1}).await.is_ok() });
        matches!(
            tokio::time::timeout(Duration::from_secs(2), ping).await,
            Ok(Ok(true))
        )
    }
}

const REQUEST_ID: &str = "x-request-id";

/// The longest `x-request-id` from a client that is kept.
pub const MAX_REQUEST_ID_LEN: usize = 64;

/// Whether a client's `x-request-id` may name its request: the id goes
/// into every error body and log line of the request, so only a short id
/// of letters, digits and `-_.` is kept (a UUID, a trace id).
pub fn acceptable_request_id(id: &[u8]) -> bool {
    (1..=MAX_REQUEST_ID_LEN).contains(&id.len())
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(b))
}

/// Drops a client's `x-request-id` that is not acceptable (or is given
/// twice), so that the next layer makes a new one.
async fn screen_request_id(mut request: Request, next: Next) -> Response {
    let ids = request.headers().get_all(REQUEST_ID);
    let mut count = 0;
    let acceptable = ids.iter().all(|v| {
        count += 1;
        acceptable_request_id(v.as_bytes())
    });
    if !acceptable || count > 1 {
        request.headers_mut().remove(REQUEST_ID);
    }
    next.run(request).await
}

/// Makes every error a problem+json that names the request, and counts
/// requests for `/metrics`.
async fn problems(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let request_id = request
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let method = request.method().as_str().to_owned();
    let response = next.run(request).await;
    state
        .metrics
        .http_request(&method, response.status().as_u16());
    if response.status().as_u16() < 400 {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    let is_problem = parts
        .headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(PROBLEM_JSON.as_bytes()));
    let mut value: serde_json::Value = if is_problem {
        serde_json::from_slice(&bytes).unwrap_or_default()
    } else {
        // A rejection from the framework (404 route, 405 method, 413...).
        let detail = String::from_utf8_lossy(&bytes)
            .chars()
            .take(500)
            .collect::<String>();
        let kind = match parts.status {
            StatusCode::NOT_FOUND => "not-found",
            StatusCode::METHOD_NOT_ALLOWED => "method-not-allowed",
            StatusCode::PAYLOAD_TOO_LARGE => "body-too-large",
            _ => "http-error",
        };
        let detail = if detail.is_empty() {
            parts
                .status
                .canonical_reason()
                .unwrap_or("error")
                .to_owned()
        } else {
            detail
        };
        serde_json::to_value(ApiError::new(parts.status, kind, detail).problem())
            .unwrap_or_default()
    };
    if let (Some(obj), Some(id)) = (value.as_object_mut(), request_id) {
        obj.insert("request_id".into(), id.into());
    }
    parts
        .headers
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(
        parts,
        Body::from(serde_json::to_vec(&value).unwrap_or_default()),
    )
}

/// How long a client may take to send a request body: a slow or missing
/// body must not hold a connection open for ever.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// Refuses a body whose declared length is over the limit before any of it
/// arrives; the body limit alone would wait for the bytes first.
async fn declared_length(
    State(limit): State<usize>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body-too-large",
            format!("the body may be at most {limit} bytes"),
        ));
    }
    Ok(next.run(request).await)
}

async fn fallback() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not-found", "no such route")
}

/// The whole API.
pub fn router(state: ApiState, body_limit: usize) -> Router {
    let v1 = Router::new()
        .route(
            "/workers",
            get(routes::list_workers).post(routes::create_worker),
        )
        .route(
            "/workers/{worker_id}",
            get(routes::get_worker)
                .patch(routes::patch_worker)
                .delete(routes::delete_worker),
        )
        .route("/workers/{worker_id}/labs", get(routes::list_labs))
        .route(
            "/workers/{worker_id}/labs/refresh",
            post(routes::refresh_worker),
        )
        .route(
            "/workers/{worker_id}/labs/{lab_id}",
            get(routes::get_lab).delete(routes::delete_lab),
        )
        .route("/delete-requests/{id}", get(routes::get_delete_request))
        .route("/labs/refresh", post(routes::refresh_all))
        .route("/refresh-runs", get(routes::refresh_runs))
        .route("/healthz", get(routes::healthz))
        .route("/readyz", get(routes::readyz))
        .route("/metrics", get(routes::metrics))
        .route("/openapi.json", get(routes::openapi));
    Router::new()
        .nest("/api/v1", v1)
        // The usual unversioned probe paths, for orchestrators.
        .route("/healthz", get(routes::healthz))
        .route("/readyz", get(routes::readyz))
        .route("/metrics", get(routes::metrics))
        .fallback(fallback)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(RequestBodyTimeoutLayer::new(BODY_TIMEOUT))
        .layer(axum::middleware::from_fn_with_state(
            body_limit,
            declared_length,
        ))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(axum::middleware::from_fn_with_state(state.clone(), problems))
        .layer(
            TraceLayer::new_for_http().make_span_with(|r: &Request| {
                let id = r
                    .extensions()
                    .get::<RequestId>()
                    .and_then(|id| id.header_value().to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                tracing::info_span!("http", method = %r.method(), path = %r.uri().path(), request_id = %id)
            }),
        )
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .layer(axum::middleware::from_fn(screen_request_id))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_short_plain_request_ids_are_kept() {
        for good in [
            "a",
            "abc-123_X.9",
            "0b3c1f1e-4d7a-4c59-9f0a-3e1d2c4b5a69",
            &"a".repeat(MAX_REQUEST_ID_LEN),
        ] {
            assert!(acceptable_request_id(good.as_bytes()), "{good:?}");
        }
        for bad in [
            "",
            "two words",
            "<script>",
            "a\"b",
            "%0d%0a",
            "é",
            "a/b",
            &"a".repeat(MAX_REQUEST_ID_LEN + 1),
        ] {
            assert!(!acceptable_request_id(bad.as_bytes()), "{bad:?}");
        }
        assert!(!acceptable_request_id(b"a\xffb"));
    }
}
