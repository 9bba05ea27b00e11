//! Contract tests: the simulator, over real HTTP, keeps each rule of the CML
//! 2.9 API that labsync relies on, in the shapes recorded from real servers.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test that cannot go on fails at once, saying where"
)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine;
use cml_sim::{Lab, LabSpec, SimConfig, Simulator, WorkerHandle, WorkerSpec};
use reqwest::StatusCode;
use serde_json::{Value, json};

const ADMIN: (&str, &str) = ("admin", "cml-sim-admin");
const STUDENT: (&str, &str) = ("student", "cml-sim-student");

/// A file of `fixtures/cml/` (see its README: where each came from).
fn reference(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/cml")
        .join(file)
}

fn read_json(file: &str) -> Value {
    let path = reference(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

async fn sim_with(config: SimConfig) -> Simulator {
    Simulator::start(config).await.expect("simulator starts")
}

async fn sim() -> Simulator {
    sim_with(SimConfig {
        transition_delay: Duration::from_millis(50),
        ..SimConfig::default()
    })
    .await
}

struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    fn new(w: &WorkerHandle) -> Self {
        Self {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
            base: w.base_url(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn login(&self, (user, pass): (&str, &str)) -> String {
        let r = self
            .http
            .post(self.url("/api/v0/authenticate"))
            .json(&json!({"username": user, "password": pass}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        r.json::<String>().await.unwrap()
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
    ) -> (StatusCode, String) {
        let mut req = self.http.request(method, self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.unwrap();
        (r.status(), r.text().await.unwrap())
    }

    async fn get(&self, path: &str, token: &str) -> (StatusCode, Value) {
        let (s, body) = self.call(reqwest::Method::GET, path, Some(token)).await;
        (
            s,
            serde_json::from_str(&body).unwrap_or(Value::String(body)),
        )
    }

    async fn put(&self, path: &str, token: &str) -> (StatusCode, String) {
        self.call(reqwest::Method::PUT, path, Some(token)).await
    }

    async fn delete(&self, path: &str, token: &str) -> (StatusCode, String) {
        self.call(reqwest::Method::DELETE, path, Some(token)).await
    }
}

fn assert_cml_error(body: &str, code: u16) {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(v["code"], code, "{body}");
    assert!(
        v["description"].as_str().is_some_and(|d| !d.is_empty()),
        "{body}"
    );
    assert_eq!(v.as_object().unwrap().len(), 2, "{body}");
}

fn claims(token: &str) -> Value {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "{token}");
    let decode = |p: &str| -> Value {
        serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(p)
                .unwrap(),
        )
        .unwrap()
    };
    assert_eq!(decode(parts[0])["alg"], "HS256");
    decode(parts[1])
}

use labsync_test_support::eventually;

#[tokio::test]
async fn authenticate_returns_a_bare_hs256_jwt_with_the_cml_claims() {
    let sim = sim().await;
    let api = Api::new(&sim.workers()[0]);
    let r = api
        .http
        .post(api.url("/api/v0/authenticate"))
        .json(&json!({"username": "admin", "password": "cml-sim-admin"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let body = r.text().await.unwrap();
    assert!(
        body.starts_with('"') && body.ends_with('"'),
        "not a bare JSON string: {body}"
    );
    let c = claims(&serde_json::from_str::<String>(&body).unwrap());
    for key in ["iss", "sub", "iat", "exp", "jti"] {
        assert!(c.get(key).is_some(), "claim {key} missing: {c}");
    }
    assert_eq!(
        c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(),
        86_400
    );
    let admin_id = sim.workers()[0]
        .users()
        .into_iter()
        .find(|u| u.admin)
        .unwrap()
        .id;
    assert_eq!(c["sub"], admin_id.as_str());
}

#[tokio::test]
async fn bad_credentials_get_403_and_a_bad_body_400() {
    let sim = sim().await;
    let api = Api::new(&sim.workers()[0]);
    for body in [
        json!({"username": "admin", "password": "wrong"}),
        json!({"username": "nobody", "password": "cml-sim-admin"}),
    ] {
        let r = api
            .http
            .post(api.url("/api/v0/authenticate"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert_cml_error(&r.text().await.unwrap(), 403);
    }
    let r = api
        .http
        .post(api.url("/api/v0/authenticate"))
        .body("{")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_cml_error(&r.text().await.unwrap(), 400);
}

#[tokio::test]
async fn auth_extended_and_authok() {
    let sim = sim().await;
    let api = Api::new(&sim.workers()[0]);
    let r: Value = api
        .http
        .post(api.url("/api/v0/auth_extended"))
        .json(&json!({"username": "student", "password": "cml-sim-student"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["username"], "student");
    assert_eq!(r["admin"], false);
    assert!(r["error"].is_null());
    let token = r["token"].as_str().unwrap();
    assert_eq!(
        api.get("/api/v0/authok", token).await,
        (StatusCode::OK, json!("OK"))
    );
}

#[tokio::test]
async fn calls_without_a_valid_token_get_401_in_cml_shape() {
    let sim = sim().await;
    let api = Api::new(&sim.workers()[0]);
    let token = api.login(ADMIN).await;
    let mut forged = token.clone();
    forged.pop();
    forged.push(if token.ends_with('A') { 'B' } else { 'A' });
    for t in [None, Some("not-a-jwt"), Some(forged.as_str())] {
        for path in [
            "/api/v0/labs",
            "/api/v0/authok",
            "/api/v0/labs/a6a334de-b497-47ae-bbff-44a83f890114",
        ] {
            let (s, body) = api.call(reqwest::Method::GET, path, t).await;
            assert_eq!(s, StatusCode::UNAUTHORIZED, "{path} with {t:?}");
            assert_cml_error(&body, 401);
        }
    }
    // A token from another worker (another secret) is refused too.
    let sim2 = sim_with(SimConfig {
        seed: 7,
        ..SimConfig::default()
    })
    .await;
    let other = Api::new(&sim2.workers()[0]).login(ADMIN).await;
    assert_eq!(
        api.get("/api/v0/labs", &other).await.0,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn system_information_needs_no_token_and_matches_the_recorded_shape() {
    let sim = sim().await;
    let api = Api::new(&sim.workers()[0]);
    let (s, body) = api
        .call(reqwest::Method::GET, "/api/v0/system_information", None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let ours: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        ours,
        read_json("cml-recorded/cml291-system-information.json")
    );
}

#[tokio::test]
async fn tokens_expire_after_their_ttl() {
    let sim = sim_with(SimConfig {
        token_ttl: Duration::from_secs(1),
        ..SimConfig::default()
    })
    .await;
    let api = Api::new(&sim.workers()[0]);
    let token = api.login(ADMIN).await;
    let c = claims(&token);
    assert_eq!(c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(), 1);
    assert_eq!(api.get("/api/v0/labs", &token).await.0, StatusCode::OK);
    eventually("the token to expire", || async {
        api.get("/api/v0/labs", &token).await.0 == StatusCode::UNAUTHORIZED
    })
    .await;
    let (_, body) = api
        .call(reqwest::Method::GET, "/api/v0/labs", Some(&token))
        .await;
    assert!(body.contains("expired"), "{body}");
}

#[tokio::test]
async fn logout_revokes_the_token_and_expire_tokens_revokes_all() {
    let sim = sim().await;
    let w = &sim.workers()[0];
    let api = Api::new(w);
    let (a, b, c) = (
        api.login(ADMIN).await,
        api.login(ADMIN).await,
        api.login(STUDENT).await,
    );
    let (s, body) = api.delete("/api/v0/logout", &a).await;
    assert_eq!((s, body.as_str()), (StatusCode::OK, "true"));
    assert_eq!(
        api.get("/api/v0/labs", &a).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        api.get("/api/v0/labs", &b).await.0,
        StatusCode::OK,
        "other sessions stay"
    );
    let (s, _) = api
        .delete("/api/v0/logout?clear_all_sessions=true", &b)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        api.get("/api/v0/labs", &b).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        api.get("/api/v0/labs", &c).await.0,
        StatusCode::OK,
        "other users stay"
    );
    let r = api
        .http
        .post(api.url("/_sim/expire_tokens"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        api.get("/api/v0/labs", &c).await.0,
        StatusCode::UNAUTHORIZED
    );
    let fresh = api.login(STUDENT).await;
    assert_eq!(api.get("/api/v0/labs", &fresh).await.0, StatusCode::OK);
}

fn ids(v: &Value) -> Vec<String> {
    let mut ids: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn show_all_decides_whose_labs_are_listed() {
    let sim = sim().await;
    let w = &sim.workers()[0];
    let api = Api::new(w);
    let users = w.users();
    let admin = users.iter().find(|u| u.admin).unwrap();
    let student = users.iter().find(|u| !u.admin).unwrap();
    let labs = w.labs();
    let all: Vec<String> = labs.iter().map(|l| l.id.clone()).collect();
    let owned_by = |uid: &str| -> Vec<String> {
        labs.iter()
            .filter(|l| l.owner == uid)
            .map(|l| l.id.clone())
            .collect()
    };
    let shared_with_students: Vec<String> = labs
        .iter()
        .filter(|l| {
            l.owner == student.id || l.groups.iter().any(|g| student.groups.contains(&g.id))
        })
        .map(|l| l.id.clone())
        .collect();
    // The seed gives both users labs, and some admin labs shared with students.
    assert!(!owned_by(&admin.id).is_empty() && !owned_by(&student.id).is_empty());
    assert!(shared_with_students.len() > owned_by(&student.id).len());

    let at = api.login(ADMIN).await;
    let st = api.login(STUDENT).await;
    assert_eq!(
        ids(&api.get("/api/v0/labs?show_all=true", &at).await.1),
        sorted(all.clone())
    );
    assert_eq!(
        ids(&api.get("/api/v0/labs", &at).await.1),
        sorted(owned_by(&admin.id))
    );
    assert_eq!(
        ids(&api.get("/api/v0/labs", &st).await.1),
        sorted(owned_by(&student.id))
    );
    assert_eq!(
        ids(&api.get("/api/v0/labs?show_all=true", &st).await.1),
        sorted(shared_with_students)
    );
    assert_eq!(
        api.get("/api/v0/labs?show_all=maybe", &at).await.0,
        StatusCode::BAD_REQUEST
    );
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[tokio::test]
async fn lab_details_are_the_recorded_cml_291_bodies_field_for_field() {
    let recorded = read_json("cml-recorded/cml291-lab-details.json");
    let labs: Vec<Lab> = serde_json::from_value(recorded.clone()).unwrap();
    let sim = sim_with(SimConfig {
        workers: vec![WorkerSpec {
            recorded_labs: Some(labs),
            ..WorkerSpec::seeded("cml-1", 0)
        }],
        ..SimConfig::default()
    })
    .await;
    let api = Api::new(&sim.workers()[0]);
    let token = api.login(ADMIN).await;
    let mut listed = ids(&api.get("/api/v0/labs?show_all=true", &token).await.1);
    listed.sort();
    assert_eq!(listed.len(), 54);
    for want in recorded.as_array().unwrap() {
        let id = want["id"].as_str().unwrap();
        let r = api
            .http
            .get(api.url(&format!("/api/v0/labs/{id}")))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let text = r.text().await.unwrap();
        let got: Value = serde_json::from_str(&text).unwrap();
        // Same keys in the same order as the real server...
        let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        let raw_keys: Vec<String> = {
            let ordered: serde_json::Map<String, Value> = serde_json::from_str(&text).unwrap();
            ordered.keys().cloned().collect()
        };
        assert_eq!(sorted(raw_keys), sorted(keys(want)), "{id}");
        // ...and the same values, permissions compared as a set (CML's order is not stable).
        for (k, v) in want.as_object().unwrap() {
            if k == "effective_permissions" {
                let set = |v: &Value| {
                    sorted(
                        v.as_array()
                            .unwrap()
                            .iter()
                            .map(|p| p.as_str().unwrap().to_owned())
                            .collect(),
                    )
                };
                assert_eq!(set(&got[k]), set(v), "{id}.{k}");
            } else {
                assert_eq!(&got[k], v, "{id}.{k}");
            }
        }
    }
}

#[tokio::test]
async fn seeded_labs_have_every_lab_response_field_with_valid_values() {
    let spec = read_json("cml-2.9-openapi.json");
    let schema = &spec["components"]["schemas"]["LabResponse"]["properties"];
    let sim = sim().await;
    let api = Api::new(&sim.workers()[0]);
    let token = api.login(ADMIN).await;
    let (_, list) = api.get("/api/v0/labs?show_all=true", &token).await;
    assert_eq!(list.as_array().unwrap().len(), 24);
    let pattern = regex::Regex::new(cml_sim::UUID4_PATTERN).unwrap();
    for id in ids(&list) {
        assert!(pattern.is_match(&id), "{id}");
        let (s, lab) = api.get(&format!("/api/v0/labs/{id}"), &token).await;
        assert_eq!(s, StatusCode::OK);
        let obj = lab.as_object().unwrap();
        let mut got_keys: Vec<&String> = obj.keys().collect();
        let mut want_keys: Vec<&String> = schema.as_object().unwrap().keys().collect();
        got_keys.sort();
        want_keys.sort();
        assert_eq!(got_keys, want_keys, "every LabResponse field, no other");
        for ts in ["created", "modified"] {
            let t = lab[ts].as_str().unwrap();
            assert!(
                chrono::DateTime::parse_from_rfc3339(t).is_ok() && t.ends_with("+00:00"),
                "{t}"
            );
        }
        assert!(
            ["DEFINED_ON_CORE", "STOPPED", "STARTED"].contains(&lab["state"].as_str().unwrap())
        );
        assert!(lab["node_count"].is_u64() && lab["link_count"].is_u64());
        let title = lab["lab_title"].as_str().unwrap();
        assert!(!title.is_empty() && title.chars().count() <= 64);
        for g in lab["groups"].as_array().unwrap() {
            assert!(pattern.is_match(g["id"].as_str().unwrap()));
            assert!(["read_only", "read_write"].contains(&g["permission"].as_str().unwrap()));
        }
    }
}

#[tokio::test]
async fn malformed_lab_ids_are_rejected_not_looked_up() {
    let sim = sim().await;
    let api = Api::new(&sim.workers()[0]);
    let token = api.login(ADMIN).await;
    for bad in [
        "A6A334DE-B497-47AE-BBFF-44A83F890114",
        "a6a334de-b497-17ae-bbff-44a83f890114",
        "..%2F..%2Fsystem_information",
        "not-a-uuid",
        "%E2%98%83",
    ] {
        for method in [reqwest::Method::GET, reqwest::Method::DELETE] {
            let (s, body) = api
                .call(method.clone(), &format!("/api/v0/labs/{bad}"), Some(&token))
                .await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{method} {bad}");
            assert_cml_error(&body, 400);
        }
    }
    let (s, body) = api
        .get("/api/v0/labs/a6a334de-b497-47ae-bbff-44a83f890114", &token)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(body["code"], 404);
}

async fn lab_in_state(w: &WorkerHandle, state: &str) -> String {
    w.add_lab(LabSpec {
        state: Some(state.into()),
        lab_title: Some(format!("{state} lab")),
        ..LabSpec::default()
    })
    .unwrap()
    .id
}

#[tokio::test]
async fn stop_and_wipe_are_asynchronous_and_delete_needs_a_wiped_lab() {
    let sim = sim().await;
    let w = &sim.workers()[0];
    let api = Api::new(w);
    let token = api.login(ADMIN).await;
    let id = lab_in_state(w, "STARTED").await;
    let lab = |p: &str| format!("/api/v0/labs/{id}{p}");

    let (s, body) = api.delete(&lab(""), &token).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "a running lab is not deleted");
    assert_cml_error(&body, 400);
    assert!(body.contains("STARTED"), "{body}");
    let (s, body) = api.put(&lab("/wipe"), &token).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "a running lab is not wiped");
    assert_cml_error(&body, 400);

    assert_eq!(
        api.put(&lab("/stop"), &token).await,
        (StatusCode::NO_CONTENT, String::new())
    );
    // Not converged at once: the transition takes the configured delay.
    assert_eq!(
        api.get(&lab("/check_if_converged"), &token).await.1,
        json!(false)
    );
    assert_eq!(api.get(&lab("/state"), &token).await.1, json!("STARTED"));
    eventually("stop to converge", || async {
        api.get(&lab("/check_if_converged"), &token).await.1 == json!(true)
    })
    .await;
    assert_eq!(api.get(&lab("/state"), &token).await.1, json!("STOPPED"));
    assert_eq!(
        api.delete(&lab(""), &token).await.0,
        StatusCode::BAD_REQUEST,
        "stopped is not wiped"
    );

    assert_eq!(
        api.put(&lab("/wipe"), &token).await.0,
        StatusCode::NO_CONTENT
    );
    eventually("wipe to converge", || async {
        api.get(&lab("/check_if_converged"), &token).await.1 == json!(true)
    })
    .await;
    assert_eq!(
        api.get(&lab("/state"), &token).await.1,
        json!("DEFINED_ON_CORE")
    );

    assert_eq!(
        api.delete(&lab(""), &token).await,
        (StatusCode::NO_CONTENT, String::new())
    );
    assert!(w.lab(&id).is_none());
    let (s, body) = api.delete(&lab(""), &token).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_cml_error(&body, 404);

    let other = lab_in_state(w, "DEFINED_ON_CORE").await;
    assert_eq!(
        api.put(&format!("/api/v0/labs/{other}/start"), &token)
            .await
            .0,
        StatusCode::NO_CONTENT
    );
    eventually("start to converge", || async {
        api.get(&format!("/api/v0/labs/{other}/state"), &token)
            .await
            .1
            == json!("STARTED")
    })
    .await;
}

#[tokio::test]
async fn delete_needs_lab_admin() {
    let sim = sim().await;
    let w = &sim.workers()[0];
    let api = Api::new(w);
    let st = api.login(STUDENT).await;
    let student = w.users().into_iter().find(|u| !u.admin).unwrap();
    let shared = w
        .labs()
        .into_iter()
        .find(|l| l.owner != student.id && l.groups.iter().any(|g| student.groups.contains(&g.id)))
        .expect("the seed shares an admin lab with students");
    let hidden = w
        .labs()
        .into_iter()
        .find(|l| l.owner != student.id && l.groups.is_empty())
        .expect("the seed has an unshared admin lab");
    w.update_lab(
        &shared.id,
        LabSpec {
            state: Some("DEFINED_ON_CORE".into()),
            ..LabSpec::default()
        },
    )
    .unwrap();
    let (s, body) = api
        .delete(&format!("/api/v0/labs/{}", shared.id), &st)
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "view permission is not lab_admin");
    assert_cml_error(&body, 403);
    assert!(w.lab(&shared.id).is_some());
    let (_, perms) = api.get(&format!("/api/v0/labs/{}", shared.id), &st).await;
    assert_eq!(perms["effective_permissions"], json!(["lab_view"]));
    assert_eq!(
        api.get(&format!("/api/v0/labs/{}", hidden.id), &st).await.0,
        StatusCode::NOT_FOUND
    );
    let own = w
        .add_lab(LabSpec {
            owner_username: Some("student".into()),
            ..LabSpec::default()
        })
        .unwrap();
    assert_eq!(
        api.delete(&format!("/api/v0/labs/{}", own.id), &st).await.0,
        StatusCode::NO_CONTENT
    );
}

#[tokio::test]
async fn control_api_changes_labs_behind_the_clients_back() {
    let sim = sim().await;
    let w = &sim.workers()[0];
    let api = Api::new(w);
    let token = api.login(ADMIN).await;
    let r = api
        .http
        .post(api.url("/_sim/labs"))
        .json(&json!({"lab_title": "Added behind the back", "state": "STOPPED", "node_count": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (_, lab) = api.get(&format!("/api/v0/labs/{id}"), &token).await;
    assert_eq!(
        (
            lab["lab_title"].clone(),
            lab["state"].clone(),
            lab["node_count"].clone()
        ),
        (json!("Added behind the back"), json!("STOPPED"), json!(3))
    );

    let r = api
        .http
        .patch(api.url(&format!("/_sim/labs/{id}")))
        .json(&json!({"lab_title": "Renamed", "node_count": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let (_, lab) = api.get(&format!("/api/v0/labs/{id}"), &token).await;
    assert_eq!(
        (lab["lab_title"].clone(), lab["node_count"].clone()),
        (json!("Renamed"), json!(5))
    );

    let r = api
        .http
        .patch(api.url(&format!("/_sim/labs/{id}")))
        .json(&json!({"colour": "red"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::BAD_REQUEST,
        "unknown fields are refused"
    );

    assert_eq!(
        api.http
            .delete(api.url(&format!("/_sim/labs/{id}")))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        api.get(&format!("/api/v0/labs/{id}"), &token).await.0,
        StatusCode::NOT_FOUND
    );
    assert!(!ids(&api.get("/api/v0/labs?show_all=true", &token).await.1).contains(&id));

    let truth: Value = api
        .http
        .get(api.url("/_sim/labs"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(truth.as_array().unwrap().len(), w.labs().len());
    assert!(truth[0]["converged"].is_boolean());
}

async fn set_faults(api: &Api, faults: Value) {
    let r = api
        .http
        .put(api.url("/_sim/faults"))
        .json(&faults)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
}

#[tokio::test]
async fn faults_500_502_and_empty_list() {
    let sim = sim().await;
    let api = Api::new(&sim.workers()[0]);
    let token = api.login(ADMIN).await;
    let some_lab = sim.workers()[0].labs()[0].id.clone();

    set_faults(&api, json!({"error_rate": {"list_labs": 1.0}})).await;
    let (s, body) = api
        .call(
            reqwest::Method::GET,
            "/api/v0/labs?show_all=true",
            Some(&token),
        )
        .await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR);
    assert_cml_error(&body, 500);
    assert_eq!(
        api.get(&format!("/api/v0/labs/{some_lab}"), &token).await.0,
        StatusCode::OK,
        "other endpoints unaffected"
    );

    set_faults(&api, json!({"booting": true})).await;
    let r = api
        .http
        .get(api.url("/api/v0/system_information"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(r.text().await.unwrap().contains("502 Bad Gateway"));
    // The control API is never faulted.
    assert_eq!(
        api.http
            .get(api.url("/_sim/faults"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );

    set_faults(&api, json!({"empty_list": true})).await;
    assert_eq!(
        api.get("/api/v0/labs?show_all=true", &token).await,
        (StatusCode::OK, json!([]))
    );

    set_faults(&api, json!({"hide_from_list": [some_lab]})).await;
    let listed = ids(&api.get("/api/v0/labs?show_all=true", &token).await.1);
    assert_eq!(listed.len(), 23);
    assert!(!listed.contains(&some_lab));
    assert_eq!(
        api.get(&format!("/api/v0/labs/{some_lab}"), &token).await.0,
        StatusCode::OK,
        "hidden, not gone"
    );

    assert_eq!(
        api.http
            .delete(api.url("/_sim/faults"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        ids(&api.get("/api/v0/labs?show_all=true", &token).await.1).len(),
        24
    );
    let r = api
        .http
        .put(api.url("/_sim/faults"))
        .json(&json!({"boot": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::BAD_REQUEST,
        "a misspelt fault is refused, not ignored"
    );
}

#[tokio::test]
async fn faults_corrupt_json_and_hang() {
    let sim = sim().await;
    let api = Api::new(&sim.workers()[0]);
    let token = api.login(ADMIN).await;
    let id = sim.workers()[0].labs()[0].id.clone();
    let details = format!("/api/v0/labs/{id}");

    set_faults(&api, json!({"truncate_json": ["lab_details"]})).await;
    let (s, body) = api.call(reqwest::Method::GET, &details, Some(&token)).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        serde_json::from_str::<Value>(&body).is_err(),
        "truncated body parsed: {body}"
    );

    set_faults(&api, json!({"wrong_types": ["lab_details", "list_labs"]})).await;
    let (_, lab) = api.get(&details, &token).await;
    assert!(
        lab["node_count"].is_string() && lab["lab_title"].is_number(),
        "{lab}"
    );
    assert!(
        api.get("/api/v0/labs?show_all=true", &token)
            .await
            .1
            .is_object()
    );

    set_faults(&api, json!({"hang": ["lab_details"]})).await;
    let short = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let err = short
        .get(api.url(&details))
        .bearer_auth(&token)
        .send()
        .await
        .expect_err("hangs");
    assert!(err.is_timeout(), "{err}");
}

#[tokio::test]
async fn latency_delays_answers_and_stats_count_requests() {
    let sim = sim().await;
    let w = &sim.workers()[0];
    let api = Api::new(w);
    let token = api.login(ADMIN).await;
    set_faults(&api, json!({"latency_ms": {"list_labs": 150}})).await;
    api.http
        .delete(api.url("/_sim/stats"))
        .send()
        .await
        .unwrap();
    let started = Instant::now();
    assert_eq!(
        api.get("/api/v0/labs?show_all=true", &token).await.0,
        StatusCode::OK
    );
    assert!(
        started.elapsed() >= Duration::from_millis(150),
        "latency not applied"
    );
    let id = w.labs()[0].id.clone();
    api.get(&format!("/api/v0/labs/{id}"), &token).await;
    api.get(&format!("/api/v0/labs/{id}"), &token).await;
    let stats: Value = api
        .http
        .get(api.url("/_sim/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["total"], 3);
    assert_eq!(stats["requests"]["list_labs"], 1);
    assert_eq!(stats["requests"]["lab_details"], 2);
    assert_eq!(stats["statuses"]["2xx"], 3);
}

#[tokio::test]
async fn seeds_are_deterministic_and_workers_are_separate() {
    let config = || SimConfig {
        workers: vec![
            WorkerSpec::seeded("cml-1", 10),
            WorkerSpec::seeded("cml-2", 10),
        ],
        ..SimConfig::default()
    };
    let a = sim_with(config()).await;
    let b = sim_with(config()).await;
    let dump = |s: &Simulator, i: usize| serde_json::to_value(s.workers()[i].labs()).unwrap();
    assert_eq!(dump(&a, 0), dump(&b, 0));
    assert_eq!(dump(&a, 1), dump(&b, 1));
    assert_ne!(dump(&a, 0), dump(&a, 1));
    assert_ne!(a.workers()[0].addr, a.workers()[1].addr);
    let c = sim_with(SimConfig {
        seed: 43,
        ..config()
    })
    .await;
    assert_ne!(dump(&a, 0), dump(&c, 0));
    // A lab removed on one worker is still on the other's copy of the seed.
    let id = a.workers()[0].labs()[0].id.clone();
    assert!(a.workers()[0].remove_lab(&id));
    assert!(b.workers()[0].lab(&id).is_some());
}

#[tokio::test]
async fn tls_mode_serves_api_and_control_over_https_trusted_only_through_its_ca() {
    let sim = sim_with(SimConfig {
        tls: true,
        workers: vec![
            WorkerSpec::seeded("cml-1", 3),
            WorkerSpec::seeded("cml-2", 2),
        ],
        ..SimConfig::default()
    })
    .await;
    let pem = sim.ca_cert_pem().expect("a CA in TLS mode").to_owned();
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
    let trusting = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).unwrap())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    for w in sim.workers() {
        assert!(
            w.base_url().starts_with("https://127.0.0.1:"),
            "{}",
            w.base_url()
        );
        // Without the CA a client refuses the certificate...
        let refused = reqwest::get(format!("{}/api/v0/system_information", w.base_url()))
            .await
            .expect_err("an untrusted certificate is refused");
        let chain = std::iter::successors(Some(&refused as &dyn std::error::Error), |e| e.source())
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(": ");
        assert!(chain.contains("certificate"), "{chain}");
        // ...with it, the API, logins and the control API answer.
        let api = Api {
            http: trusting.clone(),
            base: w.base_url(),
        };
        let token = api.login(ADMIN).await;
        let (s, labs) = api.get("/api/v0/labs?show_all=true", &token).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(labs.as_array().unwrap().len(), w.labs().len());
        let (s, stats) = api.call(reqwest::Method::GET, "/_sim/stats", None).await;
        assert_eq!(s, StatusCode::OK, "{stats}");
        assert_eq!(w.stats().logins, 1);
        // By name too: the certificate names localhost.
        let by_name = w.base_url().replace("127.0.0.1", "localhost");
        let r = trusting
            .get(format!("{by_name}/api/v0/system_information"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    // Plain HTTP stays the default, with no CA.
    let plain = sim_with(SimConfig::default()).await;
    assert!(plain.ca_cert_pem().is_none());
    assert!(plain.workers()[0].base_url().starts_with("http://"));
}

#[tokio::test]
async fn lab_tiles_hold_every_visible_lab_as_its_details_plus_a_topology() {
    let sim = sim().await;
    let api = Api::new(&sim.workers()[0]);
    let token = api.login(ADMIN).await;
    let (s, body) = api.get("/api/v0/populate_lab_tiles", &token).await;
    assert_eq!(s, StatusCode::OK);
    let obj = body.as_object().unwrap();
    assert_eq!(
        obj.keys().collect::<Vec<_>>(),
        ["lab_tiles"],
        "one key, as recorded"
    );
    let tiles = body["lab_tiles"].as_object().unwrap();
    let mut listed = ids(&api.get("/api/v0/labs?show_all=true", &token).await.1);
    listed.sort();
    let mut keys: Vec<String> = tiles.keys().cloned().collect();
    keys.sort();
    assert_eq!(keys, listed, "an admin's tiles are every lab");
    // The recorded 2.4 tile's keys are all there (2.4 lacked owner_fullname
    // and effective_permissions, which 2.9 details carry).
    let recorded = read_json("cml-recorded/cml24-populate-lab-tiles.json");
    let recorded_tile = recorded["lab_tiles"]
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap();
    for (id, tile) in tiles {
        for k in recorded_tile.as_object().unwrap().keys() {
            assert!(tile.get(k).is_some(), "{id}: no {k}");
        }
        let (_, details) = api.get(&format!("/api/v0/labs/{id}"), &token).await;
        for (k, v) in details.as_object().unwrap() {
            assert_eq!(&tile[k], v, "{id}.{k} differs from the lab's details");
        }
    }
    let (s, _) = api.get("/api/v0/populate_lab_tiles", "not-a-token").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}
