//! The HTTP API, served in-process on a free port, against the test server
//! and the simulator.

use labsync_application::domain::Actor;
use std::collections::HashSet;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{
    ADMIN_PASSWORD, ADMIN_TOKEN, OPERATOR_TOKEN, SEEDED_LABS, TestApi, TestApp, VIEWER_TOKEN,
    eventually,
};

/// Checks the RFC 9457 shape and returns the problem.
fn assert_problem(status: StatusCode, body: &Value, want: u16) {
    assert_eq!(status.as_u16(), want, "{body}");
    assert_eq!(body["status"], want, "{body}");
    for key in ["type", "title", "detail", "request_id"] {
        assert!(
            body[key].as_str().is_some_and(|s| !s.is_empty()),
            "{key} missing: {body}"
        );
    }
}

async fn refresh(api: &TestApi, worker: &str) -> Value {
    let (s, body) = api
        .send(api.req(
            Method::POST,
            &format!("/api/v1/workers/{worker}/labs/refresh"),
            Some(ADMIN_TOKEN),
        ))
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    body
}

async fn all_labs(api: &TestApi, worker: &str) -> Vec<Value> {
    let (s, body) = api
        .get(
            &format!("/api/v1/workers/{worker}/labs?limit=1000"),
            VIEWER_TOKEN,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    body["items"].as_array().unwrap().clone()
}

#[tokio::test]
async fn every_route_checks_the_token_and_the_role() {
    let t = TestApp::spawn().await;
    let api = TestApi::start(&t).await;
    let lab = "a6a334de-b497-47ae-bbff-44a83f890114";
    let routes: Vec<(Method, String, &str)> = vec![
        (Method::GET, "/api/v1/workers".into(), "viewer"),
        (Method::POST, "/api/v1/workers".into(), "admin"),
        (Method::GET, "/api/v1/workers/cml-1".into(), "viewer"),
        (Method::PATCH, "/api/v1/workers/cml-1".into(), "admin"),
        (Method::DELETE, "/api/v1/workers/cml-9".into(), "admin"),
        (Method::GET, "/api/v1/workers/cml-1/labs".into(), "viewer"),
        (
            Method::GET,
            format!("/api/v1/workers/cml-1/labs/{lab}"),
            "viewer",
        ),
        (
            Method::DELETE,
            format!("/api/v1/workers/cml-1/labs/{lab}"),
            "operator",
        ),
        (
            Method::GET,
            format!("/api/v1/delete-requests/{lab}"),
            "viewer",
        ),
        (
            Method::POST,
            "/api/v1/workers/cml-1/labs/refresh?dry_run=true".into(),
            "admin",
        ),
        (
            Method::POST,
            "/api/v1/labs/refresh?dry_run=true".into(),
            "admin",
        ),
        (Method::GET, "/api/v1/refresh-runs".into(), "viewer"),
        (
            Method::GET,
            format!("/api/v1/refresh-runs/{}", uuid::Uuid::new_v4()),
            "viewer",
        ),
        (
            Method::POST,
            "/api/v1/workers/cml-1/connection-check".into(),
            "admin",
        ),
        (Method::POST, "/api/v1/connection-checks".into(), "admin"),
        // By default (api.metrics_auth).
        (Method::GET, "/api/v1/metrics".into(), "viewer"),
        (Method::GET, "/metrics".into(), "viewer"),
    ];
    let rank = |r: &str| {
        ["viewer", "operator", "admin"]
            .iter()
            .position(|x| *x == r)
            .unwrap()
    };
    for (method, path, needs) in &routes {
        for token in [None, Some("not-a-token")] {
            let (s, body) = api
                .send(api.req(method.clone(), path, token).json(&json!({})))
                .await;
            assert_problem(s, &body, 401);
        }
        for (role, token) in [
            ("viewer", VIEWER_TOKEN),
            ("operator", OPERATOR_TOKEN),
            ("admin", ADMIN_TOKEN),
        ] {
            let (s, body) = api
                .send(api.req(method.clone(), path, Some(token)).json(&json!({})))
                .await;
            if rank(role) < rank(needs) {
                assert_problem(s, &body, 403);
            } else {
                assert!(
                    s != StatusCode::UNAUTHORIZED && s != StatusCode::FORBIDDEN,
                    "{method} {path} as {role}: {s} {body}"
                );
            }
        }
    }
    // Probes and the document need no token.
    for path in [
        "/api/v1/healthz",
        "/healthz",
        "/api/v1/readyz",
        "/readyz",
        "/api/v1/openapi.json",
    ] {
        let r = api.http.get(api.url(path)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
    }
    let r = api
        .http
        .get(api.url("/api/v1/workers"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let request_id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body["request_id"],
        request_id.as_str(),
        "the problem names the request"
    );
    api.stop().await;
}

#[tokio::test]
async fn workers_are_registered_changed_and_removed_with_write_only_credentials() {
    let t = TestApp::spawn().await;
    let api = TestApi::start(&t).await;
    let url = t.sim().base_url();
    let create = json!({"id": "api-worker", "base_url": url, "username": "admin", "password": ADMIN_PASSWORD, "allow_http": true});
    let (s, body) = api
        .send(
            api.req(Method::POST, "/api/v1/workers", Some(ADMIN_TOKEN))
                .json(&create),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    assert_eq!(
        (body["id"].as_str(), body["sync_state"].as_str()),
        (Some("api-worker"), Some("never_synced"))
    );
    assert!(!body.to_string().contains(ADMIN_PASSWORD) && body.get("password").is_none());

    let (s, body) = api
        .send(
            api.req(Method::POST, "/api/v1/workers", Some(ADMIN_TOKEN))
                .json(&create),
        )
        .await;
    assert_problem(s, &body, 409);
    for bad in [
        json!({"id": "Bad Id", "base_url": url, "username": "admin", "password": "x"}),
        json!({"id": "ok", "base_url": "ftp://x", "username": "admin", "password": "x"}),
        json!({"id": "ok", "base_url": url, "username": "admin", "password": "x", "colour": "red"}),
        json!({"id": "ok", "base_url": url, "username": "admin"}),
    ] {
        let (s, body) = api
            .send(
                api.req(Method::POST, "/api/v1/workers", Some(ADMIN_TOKEN))
                    .json(&bad),
            )
            .await;
        assert_problem(s, &body, 400);
    }
    let (s, body) = api
        .send(
            api.req(Method::POST, "/api/v1/workers", Some(ADMIN_TOKEN))
                .body("{}")
                .header("content-type", "text/plain"),
        )
        .await;
    assert_problem(s, &body, 415);

    refresh(&api, "api-worker").await;
    let (_, list) = api.get("/api/v1/workers", VIEWER_TOKEN).await;
    let w = list
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["id"] == "api-worker")
        .unwrap()
        .clone();
    assert_eq!(w["sync_state"], "synced");
    assert_eq!(w["last_run"]["created"], SEEDED_LABS);

    let (s, body) = api
        .send(
            api.req(
                Method::PATCH,
                "/api/v1/workers/api-worker",
                Some(ADMIN_TOKEN),
            )
            .json(&json!({"enabled": false, "name": "Renamed", "lab_tiles": true})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(
        (
            body["enabled"].as_bool(),
            body["name"].as_str(),
            body["sync_state"].as_str(),
            body["lab_tiles"].as_bool()
        ),
        (Some(false), Some("Renamed"), Some("disabled"), Some(true))
    );
    let (s, body) = api
        .send(
            api.req(
                Method::PATCH,
                "/api/v1/workers/api-worker",
                Some(ADMIN_TOKEN),
            )
            .json(&json!({"password": "rotated"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let (s, body) = api
        .send(
            api.req(Method::PATCH, "/api/v1/workers/nope", Some(ADMIN_TOKEN))
                .json(&json!({})),
        )
        .await;
    assert_problem(s, &body, 404);

    let (s, _) = api
        .send(api.req(
            Method::DELETE,
            "/api/v1/workers/api-worker",
            Some(ADMIN_TOKEN),
        ))
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, body) = api.get("/api/v1/workers/api-worker", VIEWER_TOKEN).await;
    assert_problem(s, &body, 404);
    let (s, body) = api
        .get("/api/v1/workers/api-worker/labs", VIEWER_TOKEN)
        .await;
    assert_problem(s, &body, 404);
    let audit = t
        .services()
        .audit
        .recent(
            &labsync_application::domain::WorkerId::parse("api-worker").unwrap(),
            None,
            10,
        )
        .await
        .unwrap();
    let actions: Vec<(String, String)> = audit
        .iter()
        .map(|a| (format!("{:?}", a.action), a.actor.to_string()))
        .collect();
    assert!(
        actions.contains(&("WorkerAdded".into(), "api:admin".into())),
        "{actions:?}"
    );
    assert!(
        actions.contains(&("WorkerRemoved".into(), "api:admin".into())),
        "{actions:?}"
    );
    api.stop().await;
}

#[tokio::test]
async fn labs_are_listed_from_mongodb_with_filters_and_stable_cursor_pages() {
    let t = TestApp::spawn().await;
    let api = TestApi::start(&t).await;
    refresh(&api, "cml-1").await;
    // Listing never asks CML.
    t.sim().reset_stats();
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/v1/workers/cml-1/labs?limit=5&cursor={c}"),
            None => "/api/v1/workers/cml-1/labs?limit=5".into(),
        };
        let (s, page) = api.get(&path, VIEWER_TOKEN).await;
        assert_eq!(s, StatusCode::OK, "{page}");
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= 5);
        seen.extend(
            items
                .iter()
                .map(|i| i["lab_id"].as_str().unwrap().to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen.len(), SEEDED_LABS);
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(seen, sorted, "stable order");
    assert_eq!(
        seen.iter().collect::<HashSet<_>>().len(),
        SEEDED_LABS,
        "no duplicates"
    );
    assert_eq!(t.sim().stats().total, 0, "listing never calls CML");

    let all = all_labs(&api, "cml-1").await;
    let started = all.iter().filter(|l| l["state"] == "STARTED").count();
    let (_, page) = api
        .get("/api/v1/workers/cml-1/labs?state=STARTED", VIEWER_TOKEN)
        .await;
    assert_eq!(page["items"].as_array().unwrap().len(), started);
    let students = all
        .iter()
        .filter(|l| l["owner_username"] == "student")
        .count();
    let (_, page) = api
        .get("/api/v1/workers/cml-1/labs?owner=student", VIEWER_TOKEN)
        .await;
    assert_eq!(page["items"].as_array().unwrap().len(), students);
    let ospf = all
        .iter()
        .filter(|l| l["title"].as_str().unwrap().to_lowercase().contains("ospf"))
        .count();
    assert!(ospf > 0);
    let (_, page) = api
        .get("/api/v1/workers/cml-1/labs?q=oSpF", VIEWER_TOKEN)
        .await;
    assert_eq!(page["items"].as_array().unwrap().len(), ospf);
    let (_, page) = api
        .get("/api/v1/workers/cml-1/labs?q=.*", VIEWER_TOKEN)
        .await;
    assert_eq!(
        page["items"].as_array().unwrap().len(),
        0,
        "search text is literal, not a pattern"
    );

    for bad in [
        "limit=0",
        "limit=1001",
        "limit=ten",
        "cursor=../x",
        "sort=title",
    ] {
        let (s, body) = api
            .get(&format!("/api/v1/workers/cml-1/labs?{bad}"), VIEWER_TOKEN)
            .await;
        assert_problem(s, &body, 400);
    }
    api.stop().await;
}

#[tokio::test]
async fn hostile_ids_get_400_and_unknown_ones_404() {
    let t = TestApp::spawn().await;
    let api = TestApi::start(&t).await;
    refresh(&api, "cml-1").await;
    for path in [
        "/api/v1/workers/..%2F..%2Fetc/labs",
        "/api/v1/workers/CML-1/labs",
        "/api/v1/workers/%E2%98%83/labs",
        "/api/v1/workers/cml-1/labs/..%2Fsecrets",
        "/api/v1/workers/cml-1/labs/A6A334DE-B497-47AE-BBFF-44A83F890114",
        "/api/v1/workers/cml-1/labs/%F0%9F%92%A5",
    ] {
        let (s, body) = api.get(path, VIEWER_TOKEN).await;
        assert_problem(s, &body, 400);
    }
    let (s, body) = api
        .get(
            "/api/v1/workers/cml-1/labs/a6a334de-b497-47ae-bbff-44a83f890114",
            VIEWER_TOKEN,
        )
        .await;
    assert_problem(s, &body, 404);
    let (s, body) = api.get("/api/v1/no/such/route", VIEWER_TOKEN).await;
    assert_problem(s, &body, 404);
    let (s, body) = api
        .send(api.req(Method::PUT, "/api/v1/workers", Some(ADMIN_TOKEN)))
        .await;
    assert_problem(s, &body, 405);
    let huge = json!({"id": "big", "base_url": "http://x", "username": "u", "password": "x".repeat(200_000)});
    let (s, body) = api
        .send(
            api.req(Method::POST, "/api/v1/workers", Some(ADMIN_TOKEN))
                .json(&huge),
        )
        .await;
    assert_problem(s, &body, 413);
    api.stop().await;
}

#[tokio::test]
async fn the_full_story_refresh_list_delete_list_refresh_and_an_async_delete_that_recovers() {
    let t = TestApp::spawn().await;
    let api = TestApi::start(&t).await;
    let report = refresh(&api, "cml-1").await;
    assert_eq!(
        (report["status"].as_str(), report["created"].as_u64()),
        (Some("succeeded"), Some(SEEDED_LABS as u64))
    );
    let labs = all_labs(&api, "cml-1").await;
    let wiped: Vec<String> = labs
        .iter()
        .filter(|l| l["state"] == "DEFINED_ON_CORE")
        .map(|l| l["lab_id"].as_str().unwrap().to_owned())
        .collect();
    let victim = &wiped[0];

    let (s, detail) = api
        .get(
            &format!("/api/v1/workers/cml-1/labs/{victim}"),
            VIEWER_TOKEN,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(detail["history"][0]["kind"], "created");

    let (s, out) = api
        .send(api.req(
            Method::DELETE,
            &format!("/api/v1/workers/cml-1/labs/{victim}"),
            Some(OPERATOR_TOKEN),
        ))
        .await;
    assert_eq!(s, StatusCode::OK, "{out}");
    assert_eq!(
        (out["kind"].as_str(), out["lab_gone"].as_bool()),
        (Some("deleted"), Some(true))
    );
    let after = all_labs(&api, "cml-1").await;
    assert_eq!(after.len(), SEEDED_LABS - 1);
    assert!(!after.iter().any(|l| l["lab_id"] == victim.as_str()));
    let again = refresh(&api, "cml-1").await;
    assert_eq!(again["created"], 0);
    assert!(
        !all_labs(&api, "cml-1")
            .await
            .iter()
            .any(|l| l["lab_id"] == victim.as_str()),
        "still gone"
    );
    let audit = t
        .audit(&labsync_application::domain::LabId::parse(victim).unwrap())
        .await;
    assert_eq!(audit[0].actor, Actor::api("operator"));

    // A running lab: 409 without force, with the outcome; 200 with it.
    let running = labs.iter().find(|l| l["state"] == "STARTED").unwrap()["lab_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (s, body) = api
        .send(api.req(
            Method::DELETE,
            &format!("/api/v1/workers/cml-1/labs/{running}"),
            Some(OPERATOR_TOKEN),
        ))
        .await;
    assert_problem(s, &body, 409);
    assert_eq!(body["outcome"]["kind"], "refused_running");
    assert_eq!(body["outcome"]["state"], "STARTED");
    let (s, body) = api
        .send(api.req(
            Method::DELETE,
            &format!("/api/v1/workers/cml-1/labs/{running}?force=true"),
            Some(OPERATOR_TOKEN),
        ))
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");

    // CML failing: sync delete is a 502; async delete retries until CML recovers.
    let second = &wiped[1];
    t.faults(json!({"error_rate": {"delete_lab": 1.0}}));
    let (s, body) = api
        .send(api.req(
            Method::DELETE,
            &format!("/api/v1/workers/cml-1/labs/{second}"),
            Some(OPERATOR_TOKEN),
        ))
        .await;
    assert_problem(s, &body, 502);
    let resp = api
        .req(
            Method::DELETE,
            &format!("/api/v1/workers/cml-1/labs/{second}?mode=async"),
            Some(OPERATOR_TOKEN),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let location = resp.headers()["location"].to_str().unwrap().to_owned();
    let accepted: Value = resp.json().await.unwrap();
    assert_eq!(location, accepted["href"].as_str().unwrap());
    eventually("the async delete to be retried", || async {
        api.get(&location, VIEWER_TOKEN).await.1["attempts"]
            .as_u64()
            .unwrap_or(0)
            >= 2
    })
    .await;
    let (_, pending) = api.get(&location, VIEWER_TOKEN).await;
    assert!(
        matches!(pending["status"].as_str(), Some("pending" | "running")),
        "{pending}"
    );
    assert!(t.sim().lab(second).is_some());
    t.faults(json!({}));
    eventually("the async delete to finish", || async {
        api.get(&location, VIEWER_TOKEN).await.1["status"] == "done"
    })
    .await;
    let (_, done) = api.get(&location, VIEWER_TOKEN).await;
    assert_eq!(done["outcome"]["kind"], "deleted");
    assert!(t.sim().lab(second).is_none());
    assert!(
        !all_labs(&api, "cml-1")
            .await
            .iter()
            .any(|l| l["lab_id"] == second.as_str())
    );

    // A permanent error ends an async delete at once.
    let running2 = t.add_lab("STARTED");
    let (_, accepted) = api
        .send(api.req(
            Method::DELETE,
            &format!("/api/v1/workers/cml-1/labs/{running2}?mode=async"),
            Some(OPERATOR_TOKEN),
        ))
        .await;
    let href = accepted["href"].as_str().unwrap().to_owned();
    eventually("the refused delete to fail", || async {
        api.get(&href, VIEWER_TOKEN).await.1["status"] == "failed"
    })
    .await;
    let (_, failed) = api.get(&href, VIEWER_TOKEN).await;
    assert_eq!(
        (
            failed["attempts"].as_u64(),
            failed["outcome"]["kind"].as_str()
        ),
        (Some(1), Some("refused_running"))
    );
    let (s, body) = api
        .get(
            "/api/v1/delete-requests/00000000-0000-4000-8000-000000000000",
            VIEWER_TOKEN,
        )
        .await;
    assert_problem(s, &body, 404);

    let (_, runs) = api
        .get("/api/v1/refresh-runs?worker_id=cml-1&limit=1", VIEWER_TOKEN)
        .await;
    assert_eq!(runs.as_array().unwrap().len(), 1);
    assert_eq!(runs[0]["run_id"], again["run_id"]);
    api.stop().await;
}

#[tokio::test]
async fn a_refresh_in_progress_is_a_409_and_a_failed_one_a_502() {
    let t = TestApp::spawn().await;
    let api = TestApi::start(&t).await;
    t.faults(json!({"latency_ms": {"list_labs": 500}}));
    let first = {
        let req = api.req(
            Method::POST,
            "/api/v1/workers/cml-1/labs/refresh",
            Some(ADMIN_TOKEN),
        );
        tokio::spawn(async move { req.send().await.unwrap().status() })
    };
    eventually("the first refresh to start", || async {
        t.cml_requests(cml_sim::Endpoint::ListLabs) >= 1
    })
    .await;
    let (s, body) = api
        .send(api.req(
            Method::POST,
            "/api/v1/workers/cml-1/labs/refresh",
            Some(ADMIN_TOKEN),
        ))
        .await;
    assert_problem(s, &body, 409);
    assert_eq!(body["report"]["status"], "skipped");
    assert_eq!(first.await.unwrap(), StatusCode::OK);
    t.faults(json!({"error_rate": {"list_labs": 1.0}}));
    let (s, body) = api
        .send(api.req(
            Method::POST,
            "/api/v1/workers/cml-1/labs/refresh",
            Some(ADMIN_TOKEN),
        ))
        .await;
    assert_problem(s, &body, 502);
    assert_eq!(body["report"]["status"], "failed");
    let (s, body) = api
        .send(api.req(Method::POST, "/api/v1/labs/refresh", Some(ADMIN_TOKEN)))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "a fleet refresh answers at once");
    assert_eq!(body[0]["status"], "running");
    let ended = finished_run(&api, body[0]["run_id"].as_str().unwrap()).await;
    assert_eq!(
        ended["status"], "failed",
        "the fleet refresh reports each worker"
    );
    api.stop().await;
}

/// The run's report once it is no longer `running`.
async fn finished_run(api: &TestApi, run_id: &str) -> Value {
    let path = format!("/api/v1/refresh-runs/{run_id}");
    let read = || api.send(api.req(Method::GET, &path, Some(VIEWER_TOKEN)));
    eventually("the run to finish", || async {
        read().await.1["status"] != "running"
    })
    .await;
    let (s, body) = read().await;
    assert_eq!(s, StatusCode::OK, "{body}");
    body
}

#[tokio::test]
async fn a_refresh_that_answers_at_once_is_a_202_with_a_running_report_to_follow() {
    let t = TestApp::spawn().await;
    let api = TestApi::start(&t).await;
    t.faults(json!({"latency_ms": {"list_labs": 300}}));
    let res = api
        .req(
            Method::POST,
            "/api/v1/workers/cml-1/labs/refresh",
            Some(ADMIN_TOKEN),
        )
        .header("prefer", "respond-async")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let location = res.headers()["location"].to_str().unwrap().to_owned();
    assert_eq!(res.headers()["preference-applied"], "respond-async");
    let started: Value = res.json().await.unwrap();
    assert_eq!(started["status"], "running");
    let run_id = started["run_id"].as_str().unwrap();
    assert_eq!(location, format!("/api/v1/refresh-runs/{run_id}"));
    // While it runs, the runs page says so, and no other run can start.
    let (_, running) = api
        .send(api.req(
            Method::GET,
            "/api/v1/refresh-runs?status=running",
            Some(VIEWER_TOKEN),
        ))
        .await;
    assert!(
        running
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["run_id"] == run_id),
        "{running}"
    );
    let ended = finished_run(&api, run_id).await;
    assert_eq!(ended["status"], "succeeded", "{ended}");
    assert!(ended["created"].as_u64().unwrap() > 0);
    t.assert_matches_truth("after the run that answered at once")
        .await;
    let (_, succeeded) = api
        .send(api.req(
            Method::GET,
            "/api/v1/refresh-runs?status=succeeded&worker_id=cml-1",
            Some(VIEWER_TOKEN),
        ))
        .await;
    assert_eq!(succeeded[0]["run_id"], run_id);
    // The CLI lists the same runs.
    let o = t
        .cli(&[
            "runs",
            "--worker",
            "cml-1",
            "--status",
            "succeeded",
            "--json",
        ])
        .await;
    assert!(o.status.success(), "{}", crate::helpers::output_text(&o));
    let cli: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(cli[0]["run_id"], run_id);
    let o = t.cli(&["runs", "--status", "done"]).await;
    assert_eq!(o.status.code(), Some(2), "a bad status is bad input");
    let (s, body) = api
        .send(api.req(
            Method::GET,
            "/api/v1/refresh-runs?status=done",
            Some(VIEWER_TOKEN),
        ))
        .await;
    assert_problem(s, &body, 400);
    let (s, body) = api
        .send(api.req(
            Method::GET,
            &format!("/api/v1/refresh-runs/{}", uuid::Uuid::new_v4()),
            Some(VIEWER_TOKEN),
        ))
        .await;
    assert_problem(s, &body, 404);
    assert!(body["type"].as_str().unwrap().ends_with(":unknown-run"));
    let (s, body) = api
        .send(api.req(
            Method::GET,
            "/api/v1/refresh-runs/..%2Fetc",
            Some(VIEWER_TOKEN),
        ))
        .await;
    assert_problem(s, &body, 400);
    // An unknown worker is refused before anything is started or stored.
    let (s, body) = api
        .send(
            api.req(
                Method::POST,
                "/api/v1/workers/nope/labs/refresh",
                Some(ADMIN_TOKEN),
            )
            .header("prefer", "respond-async"),
        )
        .await;
    assert_problem(s, &body, 404);
    api.stop().await;
}

#[tokio::test]
async fn metrics_move_after_a_refresh_and_a_delete() {
    let t = TestApp::spawn().await;
    let api = TestApi::start(&t).await;
    let metric = |text: &str, line: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(line))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    let text = |api: &TestApi| {
        let req = api.http.get(api.url("/metrics")).bearer_auth(VIEWER_TOKEN);
        async move { req.send().await.unwrap().text().await.unwrap() }
    };
    let before = text(&api).await;
    refresh(&api, "cml-1").await;
    let lab = all_labs(&api, "cml-1")
        .await
        .into_iter()
        .find(|l| l["state"] == "DEFINED_ON_CORE")
        .unwrap();
    let (s, _) = api
        .send(api.req(
            Method::DELETE,
            &format!(
                "/api/v1/workers/cml-1/labs/{}",
                lab["lab_id"].as_str().unwrap()
            ),
            Some(OPERATOR_TOKEN),
        ))
        .await;
    assert_eq!(s, StatusCode::OK);
    let after = text(&api).await;
    for line in [
        "labsync_refresh_runs_total{status=\"succeeded\"}",
        "labsync_lab_changes_total{kind=\"created\"}",
        "labsync_deletes_total{outcome=\"deleted\"}",
        "labsync_cml_requests_total{class=\"2xx\",endpoint=\"lab_details\"}",
        "labsync_refresh_duration_seconds_count{status=\"succeeded\"}",
        "labsync_http_requests_total{class=\"2xx\",method=\"DELETE\"}",
    ] {
        assert!(
            metric(&after, line) > metric(&before, line),
            "{line} did not move:\n{after}"
        );
    }
    assert_eq!(
        metric(&after, "labsync_lab_changes_total{kind=\"created\"}"),
        SEEDED_LABS as f64
    );
    assert!(
        metric(
            &after,
            "labsync_last_successful_refresh_timestamp_seconds{worker_id=\"cml-1\"}"
        ) > 1.7e9
    );
    api.stop().await;
}

#[tokio::test]
async fn readyz_follows_mongodb_and_the_scheduler() {
    let t = TestApp::spawn().await;
    let api = TestApi::start(&t).await;
    let (s, body) = api.send(api.req(Method::GET, "/readyz", None)).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({"ready": true, "mongodb": true, "scheduler": true})
    );
    api.stop().await;
}

#[tokio::test]
async fn the_audit_says_who_deleted_a_lab_after_it_is_gone_and_pages_without_repeats() {
    let t = TestApp::spawn().await;
    t.refresh().await;
    let lab = t.add_lab("DEFINED_ON_CORE");
    t.refresh().await;
    let api = TestApi::start(&t).await;
    api.delete_lab(&lab).await;
    let (s, _) = api
        .get(&format!("/api/v1/workers/cml-1/labs/{lab}"), VIEWER_TOKEN)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "the lab is gone");
    let (s, page) = api
        .get(
            &format!("/api/v1/audit?lab_id={lab}&action=delete"),
            VIEWER_TOKEN,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{page}");
    let who: Vec<(&str, &str, &str)> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["actor"].as_str().unwrap(),
                i["outcome"].as_str().unwrap(),
                i["worker_id"].as_str().unwrap(),
            )
        })
        .collect();
    assert!(
        who.contains(&("api:operator", "deleted", "cml-1")),
        "{page}"
    );
    assert!(
        who.iter().all(|(actor, ..)| *actor == "api:operator"),
        "only that lab's deletes: {page}"
    );

    // The whole log, one entry a page: each once, newest first.
    let mut seen = Vec::new();
    let mut cursor = String::new();
    loop {
        let (s, page) = api
            .get(&format!("/api/v1/audit?limit=1{cursor}"), VIEWER_TOKEN)
            .await;
        assert_eq!(s, StatusCode::OK, "{page}");
        for item in page["items"].as_array().unwrap() {
            seen.push(item["id"].as_str().unwrap().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = format!("&cursor={next}"),
            None => break,
        }
        assert!(seen.len() < 100, "paging ends");
    }
    let (_, all) = api.get("/api/v1/audit?limit=1000", VIEWER_TOKEN).await;
    let all: Vec<String> = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(seen, all, "pages add up to the whole log, in order");
    assert!(all.len() >= 3, "refreshes and the delete: {all:?}");

    for bad in [
        "action=explode",
        "lab_id=not-a-lab",
        "limit=0",
        "worker_id=Bad%20Id",
    ] {
        let (s, body) = api.get(&format!("/api/v1/audit?{bad}"), VIEWER_TOKEN).await;
        assert_problem(s, &body, 400);
    }
    let (s, _) = api.send(api.req(Method::GET, "/api/v1/audit", None)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    // The CLI says the same.
    let o = t
        .cli(&[
            "audit",
            "--lab",
            lab.as_str(),
            "--action",
            "delete",
            "--json",
        ])
        .await;
    assert!(o.status.success(), "{}", crate::helpers::output_text(&o));
    let cli: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(cli[0]["actor"], "api:operator");
    assert_eq!(cli[0]["outcome"], "deleted");
    api.stop().await;
}
