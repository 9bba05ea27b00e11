//! The HTTP API (axum): routes under `/api/v1`, bearer tokens with roles,
//! problem+json errors carrying the request id, Prometheus metrics and a
//! generated OpenAPI document. Handlers call the application's use cases
//! and nothing else.

pub mod auth;
pub mod console;
pub mod dto;
pub mod extract;
pub mod openapi;
pub mod problem;
pub mod routes;
pub mod server;
pub mod session;
pub mod stream;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use labsync_application::ports::{Health, MachineTokens, Sessions};
use labsync_application::{DeleteQueue, Inventory, Services};
use labsync_infrastructure::configuration::{ApiToken, MetricsAuth};
use labsync_infrastructure::metrics::Metrics;
use tokio::sync::Semaphore;
use tower_http::request_id::{
    MakeRequestUuid, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::timeout::RequestBodyTimeoutLayer;
use tower_http::trace::TraceLayer;

use self::problem::{ApiError, Finished, PROBLEM_JSON, Problem, ProblemKind};

/// What every handler can reach.
#[derive(Clone)]
pub struct ApiState {
    pub services: Services,
    pub inventory: Inventory,
    pub delete_queue: DeleteQueue,
    pub tokens: Arc<Vec<ApiToken>>,
    pub metrics: Metrics,
    pub health: Arc<dyn Health>,
    pub scheduler_running: Arc<AtomicBool>,
    /// The refresh schedule's cron expression, to say when it fires next.
    pub cron: String,
    /// Who may read `/metrics`.
    pub metrics_auth: MetricsAuth,
    /// Console sign-ins.
    pub sessions: Arc<dyn Sessions>,
    /// API tokens added without a restart (`labsync token new`).
    pub machine_tokens: Arc<dyn MachineTokens>,
    /// Bearer JWTs from the OpenID Connect provider, when one is set.
    pub oidc: Option<Arc<labsync_infrastructure::oidc::OidcVerifier>>,
    /// How long console sessions last, and whether their cookie is marked
    /// `Secure` (labsync behind an HTTPS proxy).
    pub session_policy: session::SessionPolicy,
    /// Whether the console signs people in through the provider.
    pub console_sign_in: bool,
    /// Sign-ins this replica may still start this minute.
    pub sign_in_budget: Arc<session::SignInBudget>,
    /// Lab events for the live streams.
    pub events: stream::EventHub,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState")
            .field("tokens", &self.tokens.len())
            .finish_non_exhaustive()
    }
}

impl ApiState {
    /// Whether MongoDB answers within [`READINESS_TIMEOUT`].
    pub async fn ping(&self) -> bool {
        self.health.store_answers(READINESS_TIMEOUT).await
    }
}

/// How long a readiness probe waits for MongoDB: less than the usual
/// probe timeout, so that a slow database reads as "not ready", not as a
/// probe that hung.
pub const READINESS_TIMEOUT: Duration = Duration::from_secs(2);

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

/// Names the request in every error that labsync builds while handling it
/// (through [`problem::REQUEST_ID`]), turns the framework's own rejections
/// into problems too, and counts requests for `/metrics`.
async fn problems(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let request_id = request
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let method = request.method().as_str().to_owned();
    let started = std::time::Instant::now();
    let response = problem::REQUEST_ID
        .scope(request_id.clone(), next.run(request))
        .await;
    state.metrics.http_request(
        response.extensions().get::<Route>().map(|r| r.0.as_str()),
        &method,
        response.status().as_u16(),
        started.elapsed(),
    );
    if response.status().as_u16() < 400 || response.extensions().get::<Finished>().is_some() {
        return response;
    }
    foreign_problem(response, request_id).await
}

/// The route template that answered a request, for the metrics' `route`
/// label (bounded, unlike the path).
#[derive(Debug, Clone)]
struct Route(String);

/// Notes the matched route's template on the answer. The innermost route
/// layer (the nested API's) speaks first; an outer one keeps its word.
async fn note_route(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_owned());
    let mut response = next.run(request).await;
    if let Some(route) = route
        && response.extensions().get::<Route>().is_none()
    {
        response.extensions_mut().insert(Route(route));
    }
    response
}

/// How much of a framework rejection's body is read to describe it.
const FOREIGN_ERROR_READ: usize = 64 * 1024;

/// A framework rejection (no route, wrong method, body too large...) as a
/// problem+json naming the request, described by the start of its text.
/// Bounded, and never anything but a problem document.
async fn foreign_problem(response: Response, request_id: Option<String>) -> Response {
    let (mut parts, body) = response.into_parts();
    let (bytes, _) = read_at_most(body, FOREIGN_ERROR_READ).await;
    let detail = String::from_utf8_lossy(&bytes)
        .chars()
        .take(500)
        .collect::<String>();
    let detail = if detail.trim().is_empty() {
        parts
            .status
            .canonical_reason()
            .unwrap_or("error")
            .to_owned()
    } else {
        detail
    };
    let slug = ProblemKind::of_status(parts.status).map_or("http-error", ProblemKind::slug);
    let mut problem = Problem::of_status(parts.status, slug, detail).bounded();
    problem.request_id = request_id;
    parts
        .headers
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(problem.to_json()))
}

/// Up to `limit` bytes of `body`, and whether that was all of it (a body
/// that fails half-way counts as incomplete).
async fn read_at_most(mut body: Body, limit: usize) -> (Vec<u8>, bool) {
    use axum::body::HttpBody;
    let mut out = Vec::new();
    loop {
        let frame = std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await;
        match frame {
            None => return (out, true),
            Some(Err(_)) => return (out, false),
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let room = limit - out.len();
                    out.extend_from_slice(&data[..data.len().min(room)]);
                    if data.len() > room {
                        return (out, false);
                    }
                }
            }
        }
    }
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
            ProblemKind::BodyTooLarge,
            format!("the body may be at most {limit} bytes"),
        ));
    }
    Ok(next.run(request).await)
}

/// The answer for a route that is not there.
fn not_found() -> ApiError {
    ApiError::new(ProblemKind::NotFound, "no such route")
}

/// Paths that are never refused for load: an orchestrator's liveness
/// probe must not kill a busy process.
fn is_liveness_probe(path: &str) -> bool {
    matches!(path, "/healthz" | "/api/v1/healthz")
}

/// Refuses a request at once with a 503 problem while `api.max_requests_in_flight`
/// others are being handled, instead of letting them queue without end;
/// liveness probes always pass.
async fn limit_in_flight(
    State(permits): State<Arc<Semaphore>>,
    request: Request,
    next: Next,
) -> Response {
    if is_liveness_probe(request.uri().path()) {
        return next.run(request).await;
    }
    let Ok(_permit) = permits.clone().try_acquire_owned() else {
        let mut response = ApiError::new(
            ProblemKind::Overloaded,
            "labsync is handling as many requests as it may (api.max_requests_in_flight); \
             try again shortly",
        )
        .into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return response;
    };
    next.run(request).await
}

async fn fallback() -> ApiError {
    not_found()
}

/// The whole API: `body_limit` bytes per request body, at most
/// `max_in_flight` requests handled at once.
pub fn router(state: ApiState, body_limit: usize, max_in_flight: usize) -> Router {
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
        .route(
            "/workers/{worker_id}/connection-check",
            post(routes::check_worker),
        )
        .route("/connection-checks", post(routes::check_settings))
        .route("/workers/{worker_id}/labs", get(routes::list_labs))
        .route(
            "/workers/{worker_id}/labs/refresh",
            post(routes::refresh_worker),
        )
        .route(
            "/workers/{worker_id}/labs/{lab_id}",
            get(routes::get_lab).delete(routes::delete_lab),
        )
        .route(
            "/delete-requests/{id}",
            get(routes::get_delete_request).delete(routes::cancel_delete_request),
        )
        .route("/labs/refresh", post(routes::refresh_all))
        .route("/refresh-runs", get(routes::refresh_runs))
        .route("/refresh-runs/{run_id}", get(routes::refresh_run))
        .route("/audit", get(routes::audit))
        .route("/events/stream", get(stream::stream))
        .route("/healthz", get(routes::healthz))
        .route("/readyz", get(routes::readyz))
        .route("/metrics", get(routes::metrics))
        .route("/openapi.json", get(routes::openapi))
        .route_layer(axum::middleware::from_fn(note_route));
    Router::new()
        .nest("/api/v1", v1)
        // The console: pages, sign-in and its assets.
        .route("/", get(console::home))
        .route("/login", get(console::login_page).post(console::login))
        .route("/logout", post(console::logout))
        .route("/auth/start", get(console::start_sign_in))
        .route("/auth/callback", get(console::callback))
        .route("/fleet", get(console::fleet))
        .route("/runs", get(console::runs))
        .route("/labs", get(console::labs))
        .route("/labs/{worker_id}/{lab_id}", get(console::lab))
        .route("/workers/new", get(console::new_worker))
        .route("/workers/{worker_id}/edit", get(console::edit_worker))
        .route("/audit", get(console::audit))
        .route("/assets/console.js", get(console::script))
        .route("/assets/console.css", get(console::style))
        // The usual unversioned probe paths, for orchestrators.
        .route("/healthz", get(routes::healthz))
        .route("/readyz", get(routes::readyz))
        .route("/metrics", get(routes::metrics))
        .route_layer(axum::middleware::from_fn(note_route))
        .fallback(fallback)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(RequestBodyTimeoutLayer::new(BODY_TIMEOUT))
        .layer(axum::middleware::from_fn_with_state(
            body_limit,
            declared_length,
        ))
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(Semaphore::new(max_in_flight)),
            limit_in_flight,
        ))
        .layer(axum::middleware::from_fn(console::security_headers))
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
    use axum::http::StatusCode;

    async fn body_of(r: Response) -> (StatusCode, String, serde_json::Value) {
        let status = r.status();
        let ct = r.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .to_owned();
        let bytes = axum::body::to_bytes(r.into_body(), usize::MAX)
            .await
            .unwrap();
        (
            status,
            ct,
            serde_json::from_slice(&bytes).expect("a JSON document"),
        )
    }

    #[tokio::test]
    async fn an_error_built_while_handling_a_request_names_it_and_is_bounded() {
        let huge = "y".repeat(3 << 20);
        let own = problem::REQUEST_ID
            .scope(Some("rid-1".into()), async {
                ApiError::bad_request(format!("unknown field `{huge}`")).into_response()
            })
            .await;
        assert!(own.extensions().get::<Finished>().is_some());
        let (status, ct, p) = body_of(own).await;
        assert_eq!((status.as_u16(), ct.as_str()), (400, PROBLEM_JSON));
        assert_eq!(p["type"], "urn:labsync:problem:bad-request");
        assert_eq!(p["request_id"], "rid-1");
        let detail = p["detail"].as_str().unwrap();
        assert!(detail.starts_with("unknown field `yyy"), "{detail:.40}");
        assert!(detail.len() < 2000, "{detail:.40}");
        // Outside any request it names none.
        let (_, _, p) = body_of(ApiError::bad_request("x").into_response()).await;
        assert!(p.get("request_id").is_none(), "{p}");
    }

    #[tokio::test]
    async fn a_framework_rejection_of_any_body_ends_as_a_bounded_problem_naming_the_request() {
        let huge = "y".repeat(3 << 20);
        for (body, want) in [(huge.clone(), "yyy"), (String::new(), "Method Not Allowed")] {
            let plain = (StatusCode::METHOD_NOT_ALLOWED, body).into_response();
            let (status, ct, p) = body_of(foreign_problem(plain, Some("rid-1".into())).await).await;
            assert_eq!((status.as_u16(), ct.as_str()), (405, PROBLEM_JSON));
            assert_eq!(p["type"], "urn:labsync:problem:method-not-allowed");
            assert!(p["detail"].as_str().unwrap().starts_with(want), "{p:.300}");
            assert!(p["detail"].as_str().unwrap().len() < 2000, "{p:.300}");
            assert_eq!(p["request_id"], "rid-1");
        }
        // A status labsync has no kind for keeps its status.
        let odd = (StatusCode::BAD_GATEWAY, "{\"type\": ").into_response();
        let (_, _, p) = body_of(foreign_problem(odd, None).await).await;
        assert_eq!(p["status"], 502);
        assert_eq!(p["type"], "urn:labsync:problem:http-error");
    }

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
