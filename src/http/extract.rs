//! Extractors that turn every malformed input into a problem+json 400 (or
//! 413/415), instead of the framework's plain-text rejections: the one
//! explicit step from HTTP input to domain types.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use labsync_application::domain::{LabId, WorkerId};
use serde::de::DeserializeOwned;

use super::problem::ApiError;

/// A JSON body; unknown fields are refused by the target types.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Self(v)),
            Err(rejection) => {
                let (status, kind) = match &rejection {
                    JsonRejection::MissingJsonContentType(_) => {
                        (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported-media-type")
                    }
                    JsonRejection::BytesRejection(_)
                        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE =>
                    {
                        (StatusCode::PAYLOAD_TOO_LARGE, "body-too-large")
                    }
                    _ => (StatusCode::BAD_REQUEST, "invalid-body"),
                };
                Err(ApiError::new(status, kind, rejection.body_text()))
            }
        }
    }
}

/// Query parameters.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(v)| Self(v))
            .map_err(|r| ApiError::new(StatusCode::BAD_REQUEST, "invalid-query", r.body_text()))
    }
}

/// `{worker_id}` in the path, parsed.
#[derive(Debug)]
pub struct WorkerPath(pub WorkerId);

/// `{worker_id}/.../{lab_id}` in the path, parsed.
#[derive(Debug)]
pub struct LabPath(pub WorkerId, pub LabId);

async fn raw_path<S: Send + Sync>(parts: &mut Parts, state: &S) -> Result<Vec<String>, ApiError> {
    Path::<Vec<(String, String)>>::from_request_parts(parts, state)
        .await
        .map(|Path(v)| v.into_iter().map(|(_, v)| v).collect())
        .map_err(|r| ApiError::new(StatusCode::BAD_REQUEST, "invalid-path", r.body_text()))
}

fn worker(s: &str) -> Result<WorkerId, ApiError> {
    WorkerId::parse(s)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid-id", e.to_string()))
}

impl<S: Send + Sync> FromRequestParts<S> for WorkerPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let v = raw_path(parts, state).await?;
        Ok(Self(worker(v.first().map_or("", String::as_str))?))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for LabPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let v = raw_path(parts, state).await?;
        let w = worker(v.first().map_or("", String::as_str))?;
        let lab = LabId::parse(v.get(1).map_or("", String::as_str))
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid-id", e.to_string()))?;
        Ok(Self(w, lab))
    }
}
