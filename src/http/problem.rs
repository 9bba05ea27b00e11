//! Errors as RFC 9457 problem details (`application/problem+json`), and the
//! one place that maps application errors to HTTP statuses.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use labsync_application::{AppError, DeleteOutcomeKind, RepoError};
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
            extra: self.extra.clone(),
            ..Problem::of_status(self.status, self.kind, self.detail.clone())
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
            AppError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
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

/// The status and problem kind of a delete that did not remove the lab:
/// the one place a delete outcome becomes HTTP.
pub fn delete_failure(kind: &DeleteOutcomeKind) -> (StatusCode, &'static str) {
    match kind {
        DeleteOutcomeKind::RefusedRunning { .. } => (StatusCode::CONFLICT, "lab-running"),
        DeleteOutcomeKind::AccountNotAdmin { .. } => {
            (StatusCode::BAD_GATEWAY, "cml-account-not-admin")
        }
        DeleteOutcomeKind::CmlUnreachable { .. }
        | DeleteOutcomeKind::CmlRefused { .. }
        | DeleteOutcomeKind::NotConverged { .. }
        | DeleteOutcomeKind::Deleted
        | DeleteOutcomeKind::AlreadyAbsent => (StatusCode::BAD_GATEWAY, "cml-failed"),
    }
}

/// The longest `detail` an error answer carries, in characters; a longer
/// one (a parser's message repeating a huge input) is cut, saying so.
pub const MAX_DETAIL_CHARS: usize = 1000;

/// The most that extension members (`outcome`, `report`...) may take in
/// an error answer, in bytes of JSON; larger ones are left out, saying so.
pub const MAX_EXTRA_BYTES: usize = 256 * 1024;

impl Problem {
    /// The problem for a status alone, when nothing better is known.
    pub fn of_status(status: StatusCode, kind: &str, detail: impl Into<String>) -> Self {
        Self {
            kind: format!("urn:labsync:problem:{kind}"),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail: detail.into(),
            request_id: None,
            extra: None,
        }
    }

    /// The problem made small enough to send whatever it holds: the
    /// detail cut to [`MAX_DETAIL_CHARS`], extension members left out
    /// when they exceed [`MAX_EXTRA_BYTES`]. Never fails: an error answer
    /// stays a problem document.
    #[must_use]
    pub fn bounded(mut self) -> Self {
        let chars = self.detail.chars().count();
        if chars > MAX_DETAIL_CHARS {
            let kept: String = self.detail.chars().take(MAX_DETAIL_CHARS).collect();
            self.detail = format!(
                "{kept}... ({} more characters cut)",
                chars - MAX_DETAIL_CHARS
            );
        }
        if let Some(extra) = &self.extra {
            let size = serde_json::to_vec(extra).map_or(usize::MAX, |v| v.len());
            if size > MAX_EXTRA_BYTES {
                let mut note = serde_json::Map::new();
                note.insert(
                    "extensions_left_out".into(),
                    format!("{size} bytes of details were too large to send").into(),
                );
                self.extra = Some(note);
            }
        }
        self
    }

    /// The problem as JSON; a problem without its extension members if
    /// they do not serialize, so that the answer is never empty.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_else(|_| {
            let bare = Self {
                extra: None,
                ..self.clone()
            };
            serde_json::to_vec(&bare).unwrap_or_else(|_| {
                br#"{"type":"urn:labsync:problem:internal","title":"Internal Server Error","status":500,"detail":"the error could not be described"}"#.to_vec()
            })
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let problem = self.problem();
        let body = problem.to_json();
        let mut r = (self.status, body).into_response();
        // The problem middleware finishes the answer from this, without
        // parsing the body again.
        r.extensions_mut().insert(problem);
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
    fn a_problem_of_any_size_is_bounded_and_stays_a_problem() {
        let huge = "x".repeat(3 << 20);
        let p = ApiError::bad_request(format!("unknown field `{huge}`"))
            .with("report", serde_json::json!({"failures": [huge.clone()]}))
            .problem()
            .bounded();
        let json: serde_json::Value = serde_json::from_slice(&p.to_json()).unwrap();
        assert_eq!(json["status"], 400);
        assert_eq!(json["type"], "urn:labsync:problem:bad-request");
        let detail = json["detail"].as_str().unwrap();
        assert!(detail.starts_with("unknown field `xxx"), "{detail:.40}");
        assert!(detail.ends_with("more characters cut)"), "{detail:.40}");
        assert!(detail.chars().count() < MAX_DETAIL_CHARS + 50);
        assert!(json.get("report").is_none());
        assert!(json["extensions_left_out"].is_string(), "{json:.200}");
        assert!(p.to_json().len() < 4096);

        let small = ApiError::bad_request("short")
            .with("report", 1)
            .problem()
            .bounded();
        assert_eq!(
            (
                small.detail.as_str(),
                small.extra.unwrap()["report"].clone()
            ),
            ("short", serde_json::json!(1))
        );
        // A detail cut inside a multi-byte character stays valid text.
        let snowmen = ApiError::bad_request("☃".repeat(MAX_DETAIL_CHARS + 1))
            .problem()
            .bounded();
        assert!(snowmen.detail.starts_with(&"☃".repeat(MAX_DETAIL_CHARS)));
    }

    #[test]
    fn application_errors_map_to_their_statuses() {
        let w = WorkerId::parse("cml-1").unwrap();
        let cases = [
            (AppError::UnknownWorker(w.clone()), 404),
            (AppError::WorkerExists(w), 409),
            (AppError::Conflict("x".into()), 409),
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
