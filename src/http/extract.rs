//! Extractors that turn every malformed input into a problem+json 400 (or
//! 413/415), instead of the framework's plain-text rejections: the one
//! explicit step from HTTP input to domain types.

use std::fmt;
use std::marker::PhantomData;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use labsync_application::domain::{LabId, WorkerId};
use serde::de::value::MapAccessDeserializer;
use serde::de::{DeserializeOwned, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

use super::problem::{ApiError, ProblemKind};

/// A JSON body: an object; unknown fields are refused by the target types.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

/// `T` read from a JSON object and nothing else. serde's derived structs
/// also accept an array, reading the fields by position, so without this
/// `["w", null, "https://h", "u", "p", null]` registered a worker: the API
/// documents objects, and a body of another shape is a 400.
struct Object<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Members<T>(PhantomData<T>);

        impl<'de, T: Deserialize<'de>> Visitor<'de> for Members<T> {
            type Value = T;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                // The members go to T as they come, so T still refuses
                // unknown and repeated ones.
                T::deserialize(MapAccessDeserializer::new(map))
            }
        }

        d.deserialize_map(Members(PhantomData)).map(Object)
    }
}

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<Object<T>>::from_request(req, state).await {
            Ok(axum::Json(Object(v))) => Ok(Self(v)),
            Err(rejection) => {
                let kind = match &rejection {
                    JsonRejection::MissingJsonContentType(_) => ProblemKind::UnsupportedMediaType,
                    JsonRejection::BytesRejection(_)
                        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE =>
                    {
                        ProblemKind::BodyTooLarge
                    }
                    _ => ProblemKind::InvalidBody,
                };
                Err(ApiError::new(kind, rejection.body_text()))
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
            .map_err(|r| ApiError::new(ProblemKind::InvalidQuery, r.body_text()))
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
        .map_err(|r| ApiError::new(ProblemKind::InvalidPath, r.body_text()))
}

fn worker(s: &str) -> Result<WorkerId, ApiError> {
    WorkerId::parse(s).map_err(|e| ApiError::new(ProblemKind::InvalidId, e.to_string()))
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
            .map_err(|e| ApiError::new(ProblemKind::InvalidId, e.to_string()))?;
        Ok(Self(w, lab))
    }
}

#[cfg(test)]
mod tests {
    //! The body and query extractors on generated input, without a server:
    //! every input ends as a value or as the problem the extractor promises,
    //! never a panic. Paths need the router; tests/core/hostile.rs drives
    //! them, and all of this again, through the running API.

    use axum::body::Body;
    use axum::http::Uri;
    use rand::rngs::StdRng;
    use rand::seq::IndexedRandom;
    use rand::{Rng, SeedableRng};
    use serde_json::{Value, json};

    use super::*;
    use crate::http::dto::{
        DeleteParams, LabListParams, RefreshParams, RunsParams, WorkerCreate, WorkerPatch,
    };

    const SEED: u64 = 0x1ab5_0016;

    async fn body<T: DeserializeOwned>(
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Result<T, ApiError> {
        let mut r = Request::builder().method("POST").uri("/");
        if let Some(ct) = content_type {
            r = r.header("content-type", ct);
        }
        ApiJson::<T>::from_request(r.body(Body::from(body)).unwrap(), &())
            .await
            .map(|ApiJson(v)| v)
    }

    fn kind<T>(r: &Result<T, ApiError>) -> Option<(u16, &'static str)> {
        r.as_ref()
            .err()
            .map(|e| (e.status().as_u16(), e.kind.slug()))
    }

    #[tokio::test]
    async fn a_body_is_an_object_of_the_type_or_a_problem() {
        let ok = json!({"id": "w", "base_url": "https://h", "username": "u", "password": "p"});
        let json = |v: &Value| serde_json::to_vec(v).unwrap();
        let create = |v: Vec<u8>| body::<WorkerCreate>(Some("application/json"), v);
        assert!(create(json(&ok)).await.is_ok());
        assert!(
            body::<WorkerPatch>(Some("application/vnd.labsync+json"), b"{}".to_vec())
                .await
                .is_ok()
        );
        for bad in [
            // The same worker by position: serde's structs read arrays too.
            json!(["w", null, "https://h", "u", "p", null]),
            json!({"id": "w", "base_url": "https://h", "username": "u", "password": "p", "colour": 1}),
            json!({"id": "w", "base_url": "https://h", "username": "u"}),
            json!({"id": 7, "base_url": "https://h", "username": "u", "password": "p"}),
            json!(null),
            json!("w"),
        ] {
            let r = create(json(&bad)).await;
            assert_eq!(kind(&r), Some((400, "invalid-body")), "{bad}");
        }
        let r = create(json(&json!(["w"]))).await;
        assert!(
            r.unwrap_err().detail.contains("a JSON object"),
            "the message says what was expected"
        );
        // A repeated member is refused, not last-one-wins.
        let twice =
            br#"{"id": "w", "base_url": "https://h", "username": "u", "password": "p", "password": "q"}"#;
        assert_eq!(
            kind(&create(twice.to_vec()).await),
            Some((400, "invalid-body"))
        );
        for ct in [None, Some("text/plain"), Some("application/jsonx")] {
            let r = body::<WorkerCreate>(ct, json(&ok)).await;
            assert_eq!(kind(&r), Some((415, "unsupported-media-type")), "{ct:?}");
        }
        // Beyond axum's default limit (the router sets a lower one).
        let huge = json(&json!({"name": "x".repeat(3 << 20)}));
        assert_eq!(
            kind(&body::<WorkerPatch>(Some("application/json"), huge).await),
            Some((413, "body-too-large"))
        );
    }

    /// Bytes that are sometimes JSON, sometimes nearly.
    fn generated_body(rng: &mut StdRng) -> Vec<u8> {
        const PIECES: &[&str] = &[
            "{",
            "}",
            "[",
            "]",
            ",",
            ":",
            "\"id\"",
            "\"name\"",
            "\"password\"",
            "\"enabled\"",
            "\"x\"",
            "\"\\u0000\"",
            "\"é☃\"",
            "null",
            "true",
            "7",
            "-1.5e999",
            "\"",
            "\\",
        ];
        match rng.random_range(0..3) {
            0 => (0..rng.random_range(0..256))
                .map(|_| rng.random())
                .collect(),
            _ => (0..rng.random_range(0..32))
                .map(|_| *PIECES.choose(rng).unwrap())
                .collect::<String>()
                .into_bytes(),
        }
    }

    #[tokio::test]
    async fn generated_bodies_are_objects_or_400s() {
        let mut rng = StdRng::seed_from_u64(SEED);
        for _ in 0..2000 {
            let b = generated_body(&mut rng);
            let object = serde_json::from_slice::<Value>(&b).is_ok_and(|v| v.is_object());
            let r = body::<WorkerPatch>(Some("application/json"), b.clone()).await;
            match kind(&r) {
                None => assert!(object, "{}", String::from_utf8_lossy(&b)),
                Some(k) => assert_eq!(k, (400, "invalid-body")),
            }
            let r = body::<WorkerCreate>(Some("application/json"), b.clone()).await;
            assert!(matches!(kind(&r), None | Some((400, "invalid-body"))));
        }
    }

    async fn query<T: DeserializeOwned>(uri: Uri) -> Option<(u16, &'static str)> {
        let (mut parts, ()) = Request::builder().uri(uri).body(()).unwrap().into_parts();
        kind(&ApiQuery::<T>::from_request_parts(&mut parts, &()).await)
    }

    #[tokio::test]
    async fn generated_queries_are_parameters_or_400s() {
        const PIECES: &[&str] = &[
            "limit",
            "cursor",
            "state",
            "owner",
            "q",
            "force",
            "mode",
            "dry_run",
            "force_prune",
            "worker_id",
            "sort",
            "=",
            "&",
            "&&",
            "%00",
            "%FF",
            "%2F",
            "..",
            "+",
            "%2B",
            "1",
            "0",
            "-1",
            "1001",
            "99999999999999999999",
            "true",
            "async",
            "%E2%98%83",
            "%",
        ];
        let mut rng = StdRng::seed_from_u64(SEED);
        let mut parsed = 0;
        for _ in 0..2000 {
            let q: String = (0..rng.random_range(0..12))
                .map(|_| *PIECES.choose(&mut rng).unwrap())
                .collect();
            let Ok(uri) = format!("/x?{q}").parse::<Uri>() else {
                continue;
            };
            parsed += 1;
            for k in [
                query::<LabListParams>(uri.clone()).await,
                query::<DeleteParams>(uri.clone()).await,
                query::<RefreshParams>(uri.clone()).await,
                query::<RunsParams>(uri).await,
            ] {
                assert!(
                    matches!(k, None | Some((400, "invalid-query"))),
                    "{q}: {k:?}"
                );
            }
        }
        assert!(parsed > 1000, "only {parsed} generated queries were URIs");
    }
}
