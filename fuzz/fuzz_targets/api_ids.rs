//! Bytes into everything the API parses before a handler runs: lab and
//! worker ids, and the path, query and JSON body extractors. Ids that parse
//! match their grammar and round-trip; the extractors end in a value or in
//! a 400, 413 or 415 problem, never a panic.
//!
//! The property tests in `domain/src/ids.rs` and `src/http/extract.rs`, and
//! `tests/core/hostile.rs` against the running API, cover the same ground in
//! every `cargo test`.

#![no_main]

use std::sync::LazyLock;

use axum::Router;
use axum::body::Body;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::{StatusCode, Uri};
use axum::routing::get;
use labsync::http::dto::{
    DeleteParams, LabListParams, RefreshParams, RunsParams, WorkerCreate, WorkerPatch,
};
use labsync::http::extract::{ApiJson, ApiQuery, LabPath, WorkerPath};
use labsync::http::problem::ApiError;
use labsync_domain::{LabId, WorkerId, is_uuid4};
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
});

/// The path extractors behind the API's own route patterns; a handler
/// answers 200 only with ids that are valid.
static ROUTES: LazyLock<Router> = LazyLock::new(|| {
    Router::new()
        .route(
            "/workers/{worker_id}",
            get(|WorkerPath(w): WorkerPath| async move {
                assert!(WorkerId::parse(w.as_str()).is_ok());
            }),
        )
        .route(
            "/workers/{worker_id}/labs/{lab_id}",
            get(|LabPath(w, l): LabPath| async move {
                assert!(WorkerId::parse(w.as_str()).is_ok() && is_uuid4(l.as_str().as_bytes()));
            }),
        )
});

fn rejected<T>(r: Result<T, ApiError>, allowed: &[(StatusCode, &str)]) {
    if let Err(e) = r {
        assert!(
            allowed.contains(&(e.status, e.kind)),
            "{} {}: {}",
            e.status,
            e.kind,
            e.detail
        );
    }
}

async fn query<T: serde::de::DeserializeOwned>(uri: &Uri) {
    let (mut parts, ()) = Request::builder()
        .uri(uri.clone())
        .body(())
        .unwrap()
        .into_parts();
    rejected(
        ApiQuery::<T>::from_request_parts(&mut parts, &()).await,
        &[(StatusCode::BAD_REQUEST, "invalid-query")],
    );
}

async fn body<T: serde::de::DeserializeOwned>(data: &[u8]) {
    let req = Request::builder()
        .method("POST")
        .header("content-type", "application/json")
        .body(Body::from(data.to_vec()))
        .unwrap();
    rejected(
        ApiJson::<T>::from_request(req, &()).await,
        &[
            (StatusCode::BAD_REQUEST, "invalid-body"),
            (StatusCode::PAYLOAD_TOO_LARGE, "body-too-large"),
        ],
    );
}

fuzz_target!(|data: &[u8]| {
    RUNTIME.block_on(async {
        body::<WorkerCreate>(data).await;
        body::<WorkerPatch>(data).await;
    });
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };

    if let Ok(id) = WorkerId::parse(text) {
        assert_eq!(id.as_str(), text);
        assert_eq!(WorkerId::parse(&format!("{id}")), Ok(id));
    }
    assert_eq!(LabId::parse(text).is_ok(), is_uuid4(data));
    if let Ok(id) = LabId::parse(text) {
        assert_eq!(id.as_str(), text);
        assert_eq!(LabId::parse(&format!("{id}")), Ok(id));
    }

    RUNTIME.block_on(async {
        if let Ok(uri) = format!("/x?{text}").parse::<Uri>() {
            query::<LabListParams>(&uri).await;
            query::<DeleteParams>(&uri).await;
            query::<RefreshParams>(&uri).await;
            query::<RunsParams>(&uri).await;
        }
        for path in [
            format!("/workers/{text}"),
            format!("/workers/cml-1/labs/{text}"),
            format!("/workers/{text}/labs/a6a334de-b497-47ae-bbff-44a83f890114"),
        ] {
            let Ok(uri) = path.parse::<Uri>() else {
                continue;
            };
            let req = Request::builder().uri(uri).body(Body::empty()).unwrap();
            let status = ROUTES.clone().oneshot(req).await.unwrap().status();
            // 404: the text held a `/` and matched no route.
            assert!(
                matches!(
                    status,
                    StatusCode::OK | StatusCode::BAD_REQUEST | StatusCode::NOT_FOUND
                ),
                "{path:?}: {status}"
            );
        }
    });
});
