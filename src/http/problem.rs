//! Errors as RFC 9457 problem details (`application/problem+json`), and the
//! one place that maps application errors to HTTP statuses.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use labsync_application::{AppError, DeleteOutcomeKind, RepoError};
use serde::Serialize;
use utoipa::ToSchema;

pub const PROBLEM_JSON: &str = "application/problem+json";

/// A problem detail. `request_id` names the request, so that every error
/// can be found in the logs.
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

/// Every kind of problem labsync answers with, its slug and its status
/// together: a new kind is added here or nowhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemKind {
    BadRequest,
    InvalidId,
    InvalidRequest,
    InvalidBody,
    InvalidQuery,
    InvalidPath,
    Unauthorized,
    Forbidden,
    NotLabOwner,
    NotFound,
    UnknownWorker,
    UnknownLab,
    UnknownDeleteRequest,
    UnknownRun,
    MethodNotAllowed,
    WorkerExists,
    WorkerDisabled,
    Conflict,
    Duplicate,
    LabRunning,
    DeleteRequestNotPending,
    RefreshSkipped,
    BodyTooLarge,
    UnsupportedMediaType,
    Internal,
    DatabaseError,
    CmlFailed,
    CmlAccountNotAdmin,
    RefreshFailed,
    DatabaseUnavailable,
    IdentityProviderUnavailable,
    NotReady,
    Overloaded,
}

impl ProblemKind {
    /// Every kind, for the tests that hold slugs and statuses together.
    pub const ALL: [Self; 33] = [
        Self::BadRequest,
        Self::InvalidId,
        Self::InvalidRequest,
        Self::InvalidBody,
        Self::InvalidQuery,
        Self::InvalidPath,
        Self::Unauthorized,
        Self::Forbidden,
        Self::NotLabOwner,
        Self::NotFound,
        Self::UnknownWorker,
        Self::UnknownLab,
        Self::UnknownDeleteRequest,
        Self::UnknownRun,
        Self::MethodNotAllowed,
        Self::WorkerExists,
        Self::WorkerDisabled,
        Self::Conflict,
        Self::Duplicate,
        Self::LabRunning,
        Self::DeleteRequestNotPending,
        Self::RefreshSkipped,
        Self::BodyTooLarge,
        Self::UnsupportedMediaType,
        Self::Internal,
        Self::DatabaseError,
        Self::CmlFailed,
        Self::CmlAccountNotAdmin,
        Self::RefreshFailed,
        Self::DatabaseUnavailable,
        Self::IdentityProviderUnavailable,
        Self::NotReady,
        Self::Overloaded,
    ];

    /// The last part of the problem's `type` URN.
    pub const fn slug(self) -> &'static str {
        match self {
            Self::BadRequest => "bad-request",
            Self::InvalidId => "invalid-id",
            Self::InvalidRequest => "invalid-request",
            Self::InvalidBody => "invalid-body",
            Self::InvalidQuery => "invalid-query",
            Self::InvalidPath => "invalid-path",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::NotLabOwner => "not-lab-owner",
            Self::NotFound => "not-found",
            Self::UnknownWorker => "unknown-worker",
            Self::UnknownLab => "unknown-lab",
            Self::UnknownDeleteRequest => "unknown-delete-request",
            Self::UnknownRun => "unknown-run",
            Self::MethodNotAllowed => "method-not-allowed",
            Self::WorkerExists => "worker-exists",
            Self::WorkerDisabled => "worker-disabled",
            Self::Conflict => "conflict",
            Self::Duplicate => "duplicate",
            Self::LabRunning => "lab-running",
            Self::DeleteRequestNotPending => "delete-request-not-pending",
            Self::RefreshSkipped => "refresh-skipped",
            Self::BodyTooLarge => "body-too-large",
            Self::UnsupportedMediaType => "unsupported-media-type",
            Self::Internal => "internal",
            Self::DatabaseError => "database-error",
            Self::CmlFailed => "cml-failed",
            Self::CmlAccountNotAdmin => "cml-account-not-admin",
            Self::RefreshFailed => "refresh-failed",
            Self::DatabaseUnavailable => "database-unavailable",
            Self::IdentityProviderUnavailable => "identity-provider-unavailable",
            Self::NotReady => "not-ready",
            Self::Overloaded => "overloaded",
        }
    }

    /// The HTTP status of every problem of this kind.
    pub const fn status(self) -> StatusCode {
        match self {
            Self::BadRequest
            | Self::InvalidId
            | Self::InvalidRequest
            | Self::InvalidBody
            | Self::InvalidQuery
            | Self::InvalidPath => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden | Self::NotLabOwner => StatusCode::FORBIDDEN,
            Self::NotFound
            | Self::UnknownWorker
            | Self::UnknownLab
            | Self::UnknownDeleteRequest
            | Self::UnknownRun => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::WorkerExists
            | Self::WorkerDisabled
            | Self::Conflict
            | Self::Duplicate
            | Self::LabRunning
            | Self::DeleteRequestNotPending
            | Self::RefreshSkipped => StatusCode::CONFLICT,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Internal | Self::DatabaseError => StatusCode::INTERNAL_SERVER_ERROR,
            Self::CmlFailed | Self::CmlAccountNotAdmin | Self::RefreshFailed => {
                StatusCode::BAD_GATEWAY
            }
            Self::DatabaseUnavailable
            | Self::IdentityProviderUnavailable
            | Self::NotReady
            | Self::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The kind of a framework rejection of this status, if labsync has
    /// one for it.
    pub fn of_status(status: StatusCode) -> Option<Self> {
        match status {
            StatusCode::NOT_FOUND => Some(Self::NotFound),
            StatusCode::METHOD_NOT_ALLOWED => Some(Self::MethodNotAllowed),
            StatusCode::PAYLOAD_TOO_LARGE => Some(Self::BodyTooLarge),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => Some(Self::UnsupportedMediaType),
            _ => None,
        }
    }
}

tokio::task_local! {
    /// The `x-request-id` of the request being handled, set by the problem
    /// middleware around every handler, so that an error names its request
    /// when it becomes an answer.
    pub static REQUEST_ID: Option<String>;
}

/// An error a handler returns.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub kind: ProblemKind,
    pub detail: String,
    pub extra: Option<serde_json::Map<String, serde_json::Value>>,
}

impl ApiError {
    pub fn new(kind: ProblemKind, detail: impl Into<String>) -> Self {
        Self {
            kind,
            detail: detail.into(),
            extra: None,
        }
    }

    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(ProblemKind::BadRequest, detail)
    }

    /// A failure of labsync itself (a task that panicked).
    pub fn internal(detail: impl Into<String>) -> Self {
        Self::new(ProblemKind::Internal, detail)
    }

    pub const fn status(&self) -> StatusCode {
        self.kind.status()
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

    /// The problem document, naming the request being handled.
    pub fn problem(&self) -> Problem {
        Problem {
            extra: self.extra.clone(),
            request_id: REQUEST_ID.try_with(Clone::clone).ok().flatten(),
            ..Problem::of_status(self.status(), self.kind.slug(), self.detail.clone())
        }
    }
}

impl From<AppError> for ApiError {
    fn from(e: AppError) -> Self {
        let kind = match &e {
            AppError::InvalidId(_) => ProblemKind::InvalidId,
            AppError::Invalid(_) => ProblemKind::InvalidRequest,
            AppError::UnknownWorker(_) => ProblemKind::UnknownWorker,
            AppError::UnknownLab(..) => ProblemKind::UnknownLab,
            AppError::UnknownRun(_) => ProblemKind::UnknownRun,
            AppError::WorkerExists(_) => ProblemKind::WorkerExists,
            AppError::WorkerDisabled(_) => ProblemKind::WorkerDisabled,
            AppError::NotLabOwner(_) => ProblemKind::NotLabOwner,
            AppError::Conflict(_) => ProblemKind::Conflict,
            AppError::Cml(_) => ProblemKind::CmlFailed,
            AppError::Repository(RepoError::Duplicate(_)) => ProblemKind::Duplicate,
            AppError::Repository(RepoError::Unavailable(_)) | AppError::RecordCleanupPending(_) => {
                ProblemKind::DatabaseUnavailable
            }
            AppError::Repository(_) => ProblemKind::DatabaseError,
        };
        Self::new(kind, e.to_string())
    }
}

/// The problem kind of a delete that did not remove the lab: the one
/// place a delete outcome becomes HTTP.
pub const fn delete_failure(kind: &DeleteOutcomeKind) -> ProblemKind {
    match kind {
        DeleteOutcomeKind::RefusedRunning { .. } => ProblemKind::LabRunning,
        DeleteOutcomeKind::AccountNotAdmin { .. } => ProblemKind::CmlAccountNotAdmin,
        DeleteOutcomeKind::NotOwner { .. } => ProblemKind::NotLabOwner,
        DeleteOutcomeKind::CmlUnreachable { .. }
        | DeleteOutcomeKind::CmlRefused { .. }
        | DeleteOutcomeKind::NotConverged { .. }
        | DeleteOutcomeKind::Deleted
        | DeleteOutcomeKind::AlreadyAbsent => ProblemKind::CmlFailed,
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

/// Marks an answer whose body is already labsync's own finished problem,
/// so that the middleware leaves it alone.
#[derive(Debug, Clone, Copy)]
pub struct Finished;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut r = (status, self.problem().bounded().to_json()).into_response();
        r.extensions_mut().insert(Finished);
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if status == StatusCode::UNAUTHORIZED {
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
    fn every_problem_kind_has_its_own_slug_and_an_error_status() {
        let slugs: std::collections::HashSet<_> =
            ProblemKind::ALL.iter().map(|k| k.slug()).collect();
        assert_eq!(slugs.len(), ProblemKind::ALL.len());
        for k in ProblemKind::ALL {
            assert!(k.status().as_u16() >= 400, "{k:?}");
            assert!(
                k.slug()
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'-'),
                "{k:?}"
            );
        }
        for k in ProblemKind::ALL {
            if let Some(back) = ProblemKind::of_status(k.status()) {
                assert_eq!(back.status(), k.status(), "{k:?}");
            }
        }
    }

    #[test]
    fn application_errors_map_to_their_statuses() {
        let w = WorkerId::parse("cml-1").unwrap();
        let cases = [
            (AppError::UnknownWorker(w.clone()), 404),
            (AppError::WorkerExists(w), 409),
            (AppError::NotLabOwner("x".into()), 403),
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
            assert_eq!(ApiError::from(e.clone()).status().as_u16(), status, "{e:?}");
        }
    }
}
