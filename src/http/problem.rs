//! Errors as RFC 9457 problem details (`application/problem+json`), and the
//! one place that maps application errors to HTTP statuses.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use labsync_application::{AppError, RepoError};
use serde::Serialize;
use utoipa::ToSchema;

pub const PROBLEM_JSON: &str = "application/problem+json";

/// A problem detail. `request_id` is filled in by the middleware from the
/// `x-request-id` header, so that every error names the request in the logs.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Problem {
    /// A URN naming the kind of problem, e.g. `urn:labsync:problem:unknown-worker`.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// The `x-request-id` of the request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Context, such as the delete outcome or the run report.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Object)]
    pub extra: Option<serde_json::Map<String, serde_json::Value>>,
}

/// An error a handler returns.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub detail: String,
    pub extra: Option<serde_json::Map<String, serde_json::Value>>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            detail: detail.into(),
            extra: None,
        }
    }

    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad-request", detail)
    }

    /// Adds a member beside the standard ones.
    #[must_use]
    pub fn with(mut self, key: &str, value: impl Serialize) -> Self {
        let v = serde_json::to_value(value).unwrap_or_default();
        self.extra
            .get_or_insert_with(Default::default)
            .insert(key.to_owned(), v);
        self
    }

    pub fn problem(&self) -> Problem {
        Problem {
            kind: format!("urn:labsync:problem:{}", self.kind),
            title: self.status.canonical_reason().unwrap_or("Error").to_owned(),
            status: self.status.as_u16(),
            detail: self.detail.clone(),
            request_id: None,
            extra: self.extra.clone(),
        }
    }
}

impl From<AppError> for ApiError {
    fn from(e: AppError) -> Self {
        let detail = e.to_string();
        let (status, kind) = match &e {
            AppError::InvalidId(_) => (StatusCode::BAD_REQUEST, "invalid-id"),
            AppError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid-request"),
            AppError::UnknownWorker(_) => (StatusCode::NOT_FOUND, "unknown-worker"),
            AppError::UnknownLab(..) => (StatusCode::NOT_FOUND, "unknown-lab"),
            AppError::WorkerExists(_) => (StatusCode::CONFLICT, "worker-exists"),
            AppError::WorkerDisabled(_) => (StatusCode::CONFLICT, "worker-disabled"),
            AppError::Cml(_) => (StatusCode::BAD_GATEWAY, "cml-failed"),
            AppError::Repository(RepoError::Duplicate(_)) => (StatusCode::CONFLICT, "duplicate"),
            AppError::Repository(RepoError::Unavailable(_)) | AppError::RecordCleanupPending(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "database-unavailable")
            }
            AppError::Repository(_) => (StatusCode::INTERNAL_SERVER_ERROR, "database-error"),
        };
        Self::new(status, kind, detail)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self.problem()).unwrap_or_default();
        let mut r = (self.status, body).into_response();
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use labsync_application::domain::WorkerId;

    use super::*;

    #[test]
    fn application_errors_map_to_their_statuses() {
        let w = WorkerId::parse("cml-1").unwrap();
        let cases = [
            (AppError::UnknownWorker(w.clone()), 404),
            (AppError::WorkerExists(w), 409),
            (AppError::Invalid("x".into()), 400),
            (
                AppError::Cml(labsync_application::CmlError::Unreachable("x".into())),
                502,
            ),
            (
                AppError::Repository(RepoError::Unavailable("x".into())),
                503,
            ),
            (AppError::Repository(RepoError::Other("x".into())), 500),
        ];
        for (e, status) in cases {
            assert_eq!(ApiError::from(e.clone()).status.as_u16(), status, "{e:?}");
        }
    }
}
