//! API tokens stored in MongoDB (`labsync token new|list|revoke`): accepted
//! by a running service at once, named in the audit log, refused once
//! revoked or expired, console sessions included.

use labsync_application::ports::{MachineToken, MachineTokens};
use labsync_infrastructure::mongo::MongoMachineTokens;
use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::helpers::{TestApi, TestApp, VIEWER_TOKEN, output_text};

/// The token `labsync token new` printed.
fn printed_token(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("token:"))
        .expect("the token is printed")
        .trim()
        .to_owned()
}

#[tokio::test]
async fn a_stored_token_works_at_once_names_its_caller_and_is_refused_once_revoked() {
    let t = TestApp::spawn().await;
    t.refresh().await;
    let api = TestApi::start(&t).await;
    let o = t
        .cli(&["token", "new", "--name", "robot", "--role", "operator"])
        .await;
    assert!(o.status.success(), "{}", output_text(&o));
    let token = printed_token(&o);

    // The running service takes it, with its role, and names it.
    let (s, workers) = api.get("/api/v1/workers", &token).await;
    assert_eq!(s, StatusCode::OK, "{workers}");
    let (s, body) = api
        .send(api.req(Method::POST, "/api/v1/labs/refresh", Some(&token)))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "an operator does not refresh");
    assert!(body["detail"].as_str().unwrap().contains("robot"), "{body}");
    let lab = t.add_lab("DEFINED_ON_CORE");
    t.refresh().await;
    let (s, out) = api
        .send(api.req(
            Method::DELETE,
            &format!("/api/v1/workers/cml-1/labs/{lab}"),
            Some(&token),
        ))
        .await;
    assert_eq!(s, StatusCode::OK, "{out}");
    let audit = t.audit(&lab).await;
    assert!(
        audit.iter().any(|a| a.actor.to_string() == "api:robot"),
        "{audit:?}"
    );

    // Listed with its use, never with its secret.
    let o = t.cli(&["token", "list", "--json"]).await;
    assert!(o.status.success(), "{}", output_text(&o));
    assert!(!output_text(&o).contains(&token));
    let listed: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (listed[0]["name"].as_str(), listed[0]["role"].as_str()),
        (Some("robot"), Some("operator"))
    );
    assert!(listed[0]["last_used_at"].is_string(), "{listed}");

    // A console session made with it.
    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let signed_in = browser
        .post(api.url("/login"))
        .form(&[("token", token.as_str())])
        .send()
        .await
        .unwrap();
    let cookie = signed_in.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let page = |cookie: String| {
        let req = browser.get(api.url("/labs")).header("cookie", cookie);
        async move { req.send().await.unwrap() }
    };
    assert_eq!(page(cookie.clone()).await.status(), StatusCode::OK);

    // Revoked: refused from the next request on, its session too.
    let o = t.cli(&["token", "revoke", "robot"]).await;
    assert!(o.status.success(), "{}", output_text(&o));
    let (s, body) = api.get("/api/v1/workers", &token).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{body}");
    assert!(
        !body.to_string().contains(&token),
        "the token is not echoed"
    );
    let after = page(cookie).await;
    assert!(
        after.status().is_redirection()
            && after.headers()["location"]
                .to_str()
                .unwrap()
                .ends_with("/login"),
        "{}",
        after.status()
    );
    let o = t.cli(&["token", "revoke", "robot"]).await;
    assert_eq!(o.status.code(), Some(2), "{}", output_text(&o));
    api.stop().await;
}

#[tokio::test]
async fn a_token_name_is_taken_once_and_an_expired_token_is_refused_saying_so() {
    let t = TestApp::spawn().await;
    let api = TestApi::start(&t).await;
    let o = t
        .cli(&[
            "token",
            "new",
            "--name",
            "ci",
            "--role",
            "viewer",
            "--expires-in-days",
            "30",
        ])
        .await;
    assert!(o.status.success(), "{}", output_text(&o));
    assert!(output_text(&o).contains("expires"));
    for name in ["ci", "viewer"] {
        // Stored already, or a configured token's name.
        let o = t
            .cli(&["token", "new", "--name", name, "--role", "viewer"])
            .await;
        assert_eq!(o.status.code(), Some(2), "{}", output_text(&o));
    }
    let store = MongoMachineTokens::new(&t.app.db);
    let secret = "an-expired-machine-token";
    let now = chrono::Utc::now();
    store
        .add(&MachineToken {
            name: "old".into(),
            role: "admin".into(),
            sha256: labsync::http::auth::hash_token(secret),
            created_at: now - chrono::Duration::days(40),
            expires_at: Some(now - chrono::Duration::days(10)),
            last_used_at: None,
        })
        .await
        .unwrap();
    let (s, body) = api.get("/api/v1/workers", secret).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(
        body["detail"].as_str().unwrap().contains("expired"),
        "{body}"
    );
    // Configured tokens need no read and still work.
    assert_eq!(
        api.get("/api/v1/workers", VIEWER_TOKEN).await.0,
        StatusCode::OK
    );
    api.stop().await;
}
