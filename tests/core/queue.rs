//! Asynchronous deletes under rough use: duplicate submits, cancels, a CML
//! that stays away, a worker that hangs, a worker an admin disabled.

use labsync_infrastructure::mongo::outbox;
use mongodb::bson::doc;
use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{
    ADMIN_TOKEN, OPERATOR_TOKEN, SEEDED_LABS, TestApi, TestApp, VIEWER_TOKEN, eventually,
    tokens_setting,
};

/// A second operator, for "only the requester may cancel".
const OTHER_OPERATOR_TOKEN: &str = "test-other-operator-token";

fn with_other_operator() -> String {
    format!(
        "{},other:operator:{}",
        tokens_setting(),
        labsync::http::auth::hash_token(OTHER_OPERATOR_TOKEN)
    )
}

async fn submit(api: &TestApi, worker: &str, lab: &str, token: &str) -> (u16, Value) {
    let (s, body) = api
        .send(api.req(
            Method::DELETE,
            &format!("/api/v1/workers/{worker}/labs/{lab}?mode=async&force=true"),
            Some(token),
        ))
        .await;
    (s.as_u16(), body)
}

async fn request(api: &TestApi, id: &str) -> Value {
    let (s, body) = api
        .get(&format!("/api/v1/delete-requests/{id}"), OPERATOR_TOKEN)
        .await;
    assert_eq!(s.as_u16(), 200, "{body}");
    body
}

async fn cancel(api: &TestApi, id: &str, token: &str) -> (u16, Value) {
    let (s, body) = api
        .send(api.req(
            Method::DELETE,
            &format!("/api/v1/delete-requests/{id}"),
            Some(token),
        ))
        .await;
    (s.as_u16(), body)
}

async fn wait_for_status(api: &TestApi, id: &str, status: &str) -> Value {
    eventually(&format!("request {id} to be {status}"), || async {
        request(api, id).await["status"] == status
    })
    .await;
    request(api, id).await
}

#[tokio::test]
async fn fifty_concurrent_submits_of_one_lab_make_one_request_one_delete_and_one_event() {
    let t = TestApp::spawn().await;
    let lab = t.add_lab("STARTED");
    let api = TestApi::start(&t).await;
    let answers = futures::future::join_all(
        (0..50).map(|_| submit(&api, "cml-1", lab.as_str(), OPERATOR_TOKEN)),
    )
    .await;
    let ids: std::collections::HashSet<String> = answers
        .iter()
        .map(|(s, b)| {
            assert_eq!(*s, 202, "{b}");
            b["delete_request_id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 1, "one request: {ids:?}");
    let new = answers
        .iter()
        .filter(|(_, b)| b["existing"] == false)
        .count();
    assert_eq!(new, 1, "the other 49 were told it exists");
    let id = ids.into_iter().next().unwrap();
    let done = wait_for_status(&api, &id, "done").await;
    assert_eq!(done["attempts"], 1);
    assert_eq!(
        t.sim()
            .stats()
            .requests
            .get(&cml_sim::Endpoint::DeleteLab)
            .copied(),
        Some(1),
        "one DELETE reached CML"
    );
    let events = outbox::list(&t.app.db, doc! {"lab_id": lab.as_str(), "kind": "deleted"})
        .await
        .unwrap();
    assert_eq!(events.len(), 1);
    let deletes = t
        .audit(&lab)
        .await
        .into_iter()
        .filter(|a| a.outcome != "started")
        .count();
    assert_eq!(deletes, 1, "{:?}", t.audit(&lab).await);
    // The lab is free again: a new submit is a new request.
    let (s, again) = submit(&api, "cml-1", lab.as_str(), OPERATOR_TOKEN).await;
    assert_eq!((s, &again["existing"]), (202, &json!(false)), "{again}");
    assert_ne!(again["delete_request_id"], id.as_str());
    api.stop().await;
}

#[tokio::test]
async fn a_pending_delete_is_cancelled_by_its_requester_or_an_admin_and_never_runs() {
    let tokens = with_other_operator();
    let t = TestApp::spawn_with(
        1,
        &[
            ("LABSYNC__API__TOKENS", &tokens),
            // After a failed attempt, a request waits a minute: pending.
            ("LABSYNC__DELETE__ASYNC_RETRY_BASE_MS", "60000"),
        ],
    )
    .await;
    let (kept, also_kept) = (t.add_lab("DEFINED_ON_CORE"), t.add_lab("DEFINED_ON_CORE"));
    // CML is away: the requests wait between attempts.
    t.faults(json!({"booting": true}));
    let api = TestApi::start(&t).await;
    let (_, a) = submit(&api, "cml-1", kept.as_str(), OPERATOR_TOKEN).await;
    let (_, b) = submit(&api, "cml-1", also_kept.as_str(), OPERATOR_TOKEN).await;
    let (a, b) = (
        a["delete_request_id"].as_str().unwrap().to_owned(),
        b["delete_request_id"].as_str().unwrap().to_owned(),
    );
    eventually("both to have failed once and wait", || async {
        for id in [&a, &b] {
            let r = request(&api, id).await;
            if r["status"] != "pending" || r["attempts"].as_u64() < Some(1) {
                return false;
            }
        }
        true
    })
    .await;

    let (s, body) = cancel(&api, &a, OTHER_OPERATOR_TOKEN).await;
    assert_eq!(
        (s, &body["type"]),
        (403, &json!("urn:labsync:problem:forbidden")),
        "{body}"
    );
    let (s, body) = cancel(&api, &a, OPERATOR_TOKEN).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["status"], "cancelled");
    assert_eq!(body["cancelled_by"], "api:operator");
    let (s, body) = cancel(&api, &b, ADMIN_TOKEN).await;
    assert_eq!(
        (s, &body["cancelled_by"]),
        (200, &json!("api:admin")),
        "{body}"
    );
    let (s, _) = cancel(&api, &a, OPERATOR_TOKEN).await;
    assert_eq!(s, 200, "cancelling twice is cancelling once");

    // CML is back; a later request runs to the end, the cancelled do not.
    t.faults(json!({}));
    let later = t.add_lab("DEFINED_ON_CORE");
    let (_, c) = submit(&api, "cml-1", later.as_str(), OPERATOR_TOKEN).await;
    wait_for_status(&api, c["delete_request_id"].as_str().unwrap(), "done").await;
    for (id, lab) in [(&a, kept), (&b, also_kept)] {
        assert_eq!(request(&api, id).await["status"], "cancelled");
        assert!(t.sim().lab(lab.as_str()).is_some(), "lab {lab} was deleted");
    }
    let (s, body) = cancel(
        &api,
        c["delete_request_id"].as_str().unwrap(),
        OPERATOR_TOKEN,
    )
    .await;
    assert_eq!(s, 409, "{body}");
    assert!(
        body["type"]
            .as_str()
            .unwrap()
            .ends_with("delete-request-not-pending"),
        "{body}"
    );
    api.stop().await;
}

#[tokio::test]
async fn a_forced_delete_queued_during_an_outage_gives_up_and_does_not_run_when_cml_returns() {
    let t = TestApp::spawn_with(1, &[("LABSYNC__DELETE__ASYNC_MAX_ATTEMPTS", "3")]).await;
    let lab = t.add_lab("STARTED");
    t.faults(json!({"booting": true}));
    let api = TestApi::start(&t).await;
    let (_, r) = submit(&api, "cml-1", lab.as_str(), OPERATOR_TOKEN).await;
    let id = r["delete_request_id"].as_str().unwrap().to_owned();
    let failed = wait_for_status(&api, &id, "failed").await;
    assert_eq!(failed["attempts"], 3);
    assert!(
        failed["last_error"]
            .as_str()
            .unwrap()
            .contains("gave up after 3 attempts"),
        "{failed}"
    );
    // A viewer learns that it failed, not what CML said.
    let (_, seen) = api
        .get(&format!("/api/v1/delete-requests/{id}"), VIEWER_TOKEN)
        .await;
    assert_eq!(seen["status"], "failed");
    let text = seen["last_error"].as_str().unwrap();
    assert!(
        !text.contains("gave up") && text.contains("operators"),
        "{seen}"
    );
    t.faults(json!({}));
    // Another delete runs to the end: the queue is alive, and the given-up
    // request stays given up.
    let other = t.add_lab("DEFINED_ON_CORE");
    let (_, o) = submit(&api, "cml-1", other.as_str(), OPERATOR_TOKEN).await;
    wait_for_status(&api, o["delete_request_id"].as_str().unwrap(), "done").await;
    assert_eq!(request(&api, &id).await["status"], "failed");
    assert!(
        t.sim().lab(lab.as_str()).is_some(),
        "not deleted days later"
    );
    api.stop().await;
}

#[tokio::test]
async fn a_hanging_worker_does_not_hold_up_another_workers_deletes() {
    let t = TestApp::spawn_with(
        2,
        &[
            ("LABSYNC__CML__REQUEST_TIMEOUT_MS", "60000"),
            ("LABSYNC__API__SHUTDOWN_GRACE_SECS", "1"),
        ],
    )
    .await;
    t.refresh().await;
    let stuck = t.records().await[0].lab_id;
    let second = &t.sim.workers()[1];
    let healthy = second.labs()[0].id.clone();
    t.faults(json!({"hang": ["all"]}));
    let api = TestApi::start(&t).await;
    let (_, a) = submit(&api, "cml-1", stuck.as_str(), OPERATOR_TOKEN).await;
    let a = a["delete_request_id"].as_str().unwrap().to_owned();
    wait_for_status(&api, &a, "running").await;
    let (_, b) = submit(&api, "cml-2", &healthy, OPERATOR_TOKEN).await;
    wait_for_status(&api, b["delete_request_id"].as_str().unwrap(), "done").await;
    assert_eq!(
        request(&api, &a).await["status"],
        "running",
        "cml-1's delete still hangs"
    );
    assert!(second.lab(&healthy).is_none());
    assert_eq!(t.sim().labs().len(), SEEDED_LABS);
    api.stop().await;
}

#[tokio::test]
async fn a_disabled_worker_takes_no_deletes_and_cml_is_not_asked() {
    let t = TestApp::spawn().await;
    let lab = t.add_lab("DEFINED_ON_CORE");
    let api = TestApi::start(&t).await;
    let (s, body) = api
        .send(
            api.req(Method::PATCH, "/api/v1/workers/cml-1", Some(ADMIN_TOKEN))
                .json(&json!({"enabled": false})),
        )
        .await;
    assert_eq!(s.as_u16(), 200, "{body}");
    t.sim().reset_stats();
    for mode in ["sync", "async"] {
        let (s, body) = api
            .send(api.req(
                Method::DELETE,
                &format!("/api/v1/workers/cml-1/labs/{lab}?mode={mode}"),
                Some(OPERATOR_TOKEN),
            ))
            .await;
        assert_eq!(s.as_u16(), 409, "{mode}: {body}");
        assert!(
            body["type"].as_str().unwrap().ends_with("worker-disabled"),
            "{body}"
        );
    }
    assert_eq!(t.sim().stats().total, 0, "CML was not asked");
    assert!(t.sim().lab(lab.as_str()).is_some());
    api.stop().await;
}
