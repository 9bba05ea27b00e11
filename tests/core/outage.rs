//! MongoDB outages: the MongoDB-wire server stopped in the middle of a
//! refresh and of a delete, then started again on the same address, with
//! labsync running throughout.
//!
//! Each test has a server of its own (the shared one must stay up for the
//! other tests).

use labsync_application::domain::Actor;
use labsync_application::{
    AppError, DeleteLab, RefreshOptions, RefreshWorkerLabs, RunReport, RunStatus,
};
use labsync_test_support::MongoServer;
use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::helpers::{TestApi, TestApp, VIEWER_TOKEN, eventually, report};

async fn ready(api: &TestApi) -> (StatusCode, serde_json::Value) {
    api.send(api.req(Method::GET, "/readyz", None)).await
}

/// Starts the server again, waits for `/readyz`, clears CML's faults and
/// refreshes: labsync itself is never restarted.
async fn back_up(t: &TestApp, api: &TestApi, mongo: &mut MongoServer) -> RunReport {
    mongo.restart().expect("the server comes back");
    eventually("/readyz to pass", || async {
        ready(api).await.0 == StatusCode::OK
    })
    .await;
    t.faults(json!({}));
    t.refresh().await
}

#[tokio::test]
async fn an_outage_mid_refresh_and_mid_delete_is_reported_and_repaired_without_a_restart() {
    let mut mongo = MongoServer::start().expect("a server of this test's own");
    let t = TestApp::spawn_with(
        1,
        &[
            ("LABSYNC__MONGODB__URI", mongo.uri()),
            ("LABSYNC__MONGODB__SERVER_SELECTION_TIMEOUT_MS", "1000"),
        ],
    )
    .await;
    let api = TestApi::start(&t).await;
    t.refresh().await;
    assert_eq!(ready(&api).await.0, StatusCode::OK);

    // 1. The server goes away while a refresh is fetching details.
    let records = t.records().await;
    let added = t.add_lab("STOPPED");
    t.sim().remove_lab(records[0].lab_id.as_str());
    t.faults(json!({"latency_ms": {"lab_details": 40}}));
    let services = t.services().clone();
    let worker = t.worker_id();
    let run = tokio::spawn(async move {
        RefreshWorkerLabs::new(services)
            .execute(&worker, &Actor::api("admin"), RefreshOptions::default())
            .await
    });
    eventually("the refresh to fetch details", || async {
        t.cml_requests(cml_sim::Endpoint::LabDetails) > records.len() as u64 + 2
    })
    .await;
    mongo.stop();
    let refresh_error = match run.await.unwrap() {
        Ok(r) => {
            assert_eq!(r.status, RunStatus::Failed, "{r:?}");
            r.error.expect("a failed run says why")
        }
        Err(e) => e.to_string(),
    };
    assert!(
        refresh_error.contains("database unavailable"),
        "{refresh_error}"
    );
    eventually("/readyz to fail", || async {
        let (s, body) = ready(&api).await;
        s == StatusCode::SERVICE_UNAVAILABLE && body["mongodb"] == false
    })
    .await;
    let (_, body) = ready(&api).await;
    assert_eq!(body["type"], "urn:labsync:problem:not-ready", "{body}");
    assert_eq!(body["detail"], "MongoDB does not answer", "{body}");
    let (s, body) = api.get("/api/v1/workers/cml-1/labs", VIEWER_TOKEN).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("database unavailable"),
        "{body}"
    );

    // 2. Back on the same address: no restart of labsync, and the next
    //    refresh is not held up by the lease the failed run could not free.
    let r = back_up(&t, &api, &mut mongo).await;
    assert_eq!(r.status, RunStatus::Succeeded, "{r:?}");
    let mut diff = t.assert_matches_truth("after the outage mid-refresh").await;
    assert!(t.record(&added).await.is_some());

    // 3. The server goes away while CML deletes a lab: CML's delete
    //    stands, the record cannot be removed, and the error says who will.
    let victim = t.add_lab("DEFINED_ON_CORE");
    t.refresh().await;
    t.faults(json!({"latency_ms": {"delete_lab": 300}}));
    let services = t.services().clone();
    let worker = t.worker_id();
    let delete = tokio::spawn(async move {
        DeleteLab {
            worker_id: worker,
            lab_id: victim,
            force: false,
            requested_by: Actor::api("operator"),
            owned_by: None,
        }
        .execute(&services)
        .await
    });
    eventually("CML to be asked to delete", || async {
        t.cml_requests(cml_sim::Endpoint::DeleteLab) >= 1
    })
    .await;
    mongo.stop();
    let err = delete
        .await
        .unwrap()
        .expect_err("the record could not be removed");
    assert!(matches!(err, AppError::RecordCleanupPending(_)), "{err:?}");
    assert!(err.to_string().contains("next refresh"), "{err}");
    assert!(t.sim().lab(victim.as_str()).is_none(), "CML deleted it");

    let r = back_up(&t, &api, &mut mongo).await;
    assert_eq!((r.status, r.pruned), (RunStatus::Succeeded, 1), "{r:?}");
    diff += t.assert_matches_truth("after the outage mid-delete").await;
    assert!(t.record(&victim).await.is_none());
    api.stop().await;
    report(
        "outage",
        &format!(
            "MongoDB outage: 2 outages (mid-refresh, mid-delete), recovered without a restart; \
             {diff}"
        ),
    );
}
