//! TLS towards CML: a worker serving HTTPS with a self-signed CA (the
//! simulator in TLS mode, over TCP) is refused by default, refreshed when
//! its CA bundle is trusted, and refreshed with a logged warning when
//! verification is turned off.

use cml_sim::{SimConfig, Simulator, WorkerSpec};
use labsync_application::RunStatus;
use labsync_application::domain::BaseUrl;
use labsync_application::domain::CertificateTrust;
use labsync_application::domain::{TlsSettings, Worker};
use secrecy::SecretString;
use serde_json::Value;

use crate::helpers::{
    ADMIN_PASSWORD, ADMIN_TOKEN, OPERATOR_TOKEN, SEEDED_LABS, TEST_KEY, TestApp, VIEWER_TOKEN, ids,
    output_text,
};

/// What labsync logs when it skips certificate verification.
const INSECURE_WARNING: &str = "TLS certificate verification is DISABLED";

/// A test app whose simulated fleet is one HTTPS worker, cml-1 (not yet
/// registered), with [`SEEDED_LABS`] labs.
async fn https_app() -> TestApp {
    let mut t = TestApp::spawn_with(0, &[]).await;
    t.sim = Simulator::start(SimConfig {
        tls: true,
        workers: vec![WorkerSpec::seeded("cml-1", SEEDED_LABS)],
        ..SimConfig::default()
    })
    .await
    .expect("HTTPS simulator starts");
    assert!(t.sim().base_url().starts_with("https://"));
    t
}

/// Registers cml-1 with these TLS settings.
async fn register(t: &TestApp, tls: TlsSettings) {
    t.services()
        .workers
        .add(
            &Worker {
                id: t.worker_id(),
                name: "cml-1".into(),
                base_url: BaseUrl::parse(&t.sim().base_url()).expect("the simulator's URL"),
                username: "admin".into(),
                tls,
                enabled: true,
                lab_tiles: false,
            },
            &SecretString::from(ADMIN_PASSWORD),
        )
        .await
        .expect("register worker");
}

fn ca_pem(t: &TestApp) -> String {
    t.sim.ca_cert_pem().expect("a CA in TLS mode").to_owned()
}

#[tokio::test]
async fn a_self_signed_worker_is_refused_by_default_with_a_clear_error_and_nothing_written() {
    let t = https_app().await;
    register(&t, TlsSettings::default()).await;

    let r = t.refresh().await;
    assert_eq!(r.status, RunStatus::Failed, "{r:?}");
    let error = r.error.clone().unwrap_or_default();
    assert!(
        error.contains("certificate") && error.contains("UnknownIssuer"),
        "the error should say the certificate's issuer is unknown: {error}"
    );
    assert_eq!((r.listed, r.created), (0, 0), "{r:?}");
    assert!(t.records().await.is_empty());
    // Not one HTTP request reached CML: the password never left labsync
    // over a connection it could not verify.
    assert_eq!(t.sim().stats().total, 0);
}

#[tokio::test]
async fn a_self_signed_worker_is_refreshed_when_its_ca_bundle_is_trusted() {
    let t = https_app().await;
    register(
        &t,
        TlsSettings {
            trust: CertificateTrust::CaBundle(ca_pem(&t)),
            allow_http: false,
        },
    )
    .await;

    let r = t.refresh().await;
    assert_eq!(r.status, RunStatus::Succeeded, "{r:?}");
    assert_eq!(
        (r.listed, r.created),
        (SEEDED_LABS as u64, SEEDED_LABS as u64)
    );
    assert_eq!(ids(&t.records().await), t.truth());
}

fn add_args<'a>(id: &'a str, url: &'a str) -> Vec<&'a str> {
    vec![
        "workers",
        "add",
        "--id",
        id,
        "--url",
        url,
        "--username",
        "admin",
        "--password-env",
        "CML_PASSWORD",
    ]
}

#[tokio::test]
async fn an_insecure_worker_is_refreshed_with_a_logged_warning_that_reveals_no_secret() {
    let t = https_app().await;
    let url = t.sim().base_url();

    let mut add = add_args("tls-insecure", &url);
    add.push("--insecure");
    let o = t.cli(&add).await;
    assert!(o.status.success(), "{}", output_text(&o));
    let o = t.cli(&add_args("tls-verified", &url)).await;
    assert!(o.status.success(), "{}", output_text(&o));

    let o = t
        .cli(&["refresh", "--worker", "tls-insecure", "--json"])
        .await;
    assert!(o.status.success(), "{}", output_text(&o));
    let reports: Value = serde_json::from_slice(&o.stdout).expect("JSON reports on stdout");
    assert_eq!(reports[0]["status"], "succeeded", "{reports}");
    assert_eq!(reports[0]["created"], SEEDED_LABS, "{reports}");
    let logs = String::from_utf8_lossy(&o.stderr);
    let warning = logs
        .lines()
        .find(|l| l.contains(INSECURE_WARNING))
        .unwrap_or_else(|| panic!("no warning logged:\n{}", output_text(&o)));
    assert!(
        warning.contains("WARN") && warning.contains("tls-insecure"),
        "{warning}"
    );
    let all = output_text(&o);
    for secret in [
        ADMIN_PASSWORD,
        TEST_KEY,
        ADMIN_TOKEN,
        OPERATOR_TOKEN,
        VIEWER_TOKEN,
        // Every CML token is a JWT, whose header starts so in base64.
        "eyJ",
    ] {
        assert!(!all.contains(secret), "{secret:?} in the output:\n{all}");
    }

    // The same server without --insecure is refused, and nothing warns.
    let o = t.cli(&["refresh", "--worker", "tls-verified"]).await;
    assert_eq!(o.status.code(), Some(1), "{}", output_text(&o));
    assert!(
        output_text(&o).contains("certificate"),
        "{}",
        output_text(&o)
    );
    assert!(
        !output_text(&o).contains(INSECURE_WARNING),
        "{}",
        output_text(&o)
    );
}

#[tokio::test]
async fn a_connection_check_says_which_of_tls_credentials_rights_or_reach_failed() {
    let t = https_app().await;
    let api = crate::helpers::TestApi::start(&t).await;
    let check = |body: serde_json::Value| {
        let req = api
            .req(
                reqwest::Method::POST,
                "/api/v1/connection-checks",
                Some(ADMIN_TOKEN),
            )
            .json(&body);
        let api = &api;
        async move {
            let (s, v) = api.send(req).await;
            assert_eq!(s, reqwest::StatusCode::OK, "{v}");
            (
                v["ok"].as_bool().unwrap(),
                v["problem"].clone(),
                v["detail"].as_str().unwrap().to_owned(),
            )
        }
    };
    let url = t.sim().base_url();
    let settings = |password: &str, ca: Option<String>| {
        serde_json::json!({"id": "candidate", "base_url": url, "username": "admin",
            "password": password, "ca_cert_pem": ca})
    };
    let (ok, problem, detail) = check(settings(ADMIN_PASSWORD, None)).await;
    assert!(!ok);
    assert_eq!(problem, "tls", "{detail}");
    assert!(detail.contains("certificate"), "{detail}");
    let (ok, problem, detail) = check(settings("wrong", Some(ca_pem(&t)))).await;
    assert_eq!(
        (ok, problem.as_str()),
        (false, Some("credentials")),
        "{detail}"
    );
    let (ok, _, detail) = check(settings(ADMIN_PASSWORD, Some(ca_pem(&t)))).await;
    assert!(ok, "{detail}");
    assert!(
        detail.contains(&format!("lists {SEEDED_LABS} labs")),
        "{detail}"
    );
    assert!(!detail.contains(ADMIN_PASSWORD));
    t.sim().set_admin("admin", false).unwrap();
    let (ok, problem, detail) = check(settings(ADMIN_PASSWORD, Some(ca_pem(&t)))).await;
    assert_eq!(
        (ok, problem.as_str()),
        (false, Some("not_admin")),
        "{detail}"
    );
    // Nothing listens on a port just freed.
    let closed = crate::helpers::free_port();
    let (ok, problem, detail) = check(serde_json::json!({"id": "candidate",
        "base_url": format!("https://127.0.0.1:{closed}"), "username": "admin",
        "password": ADMIN_PASSWORD}))
    .await;
    assert_eq!(
        (ok, problem.as_str()),
        (false, Some("unreachable")),
        "{detail}"
    );
    // A check saves nothing, and is an admin's.
    assert!(t.services().workers.list().await.unwrap().is_empty());
    // A registered worker is tried as an edit would leave it: its stored
    // password and CA bundle, a change that needs the password refused
    // without it.
    t.sim().set_admin("admin", true).unwrap();
    register(
        &t,
        TlsSettings::from_parts(Some(ca_pem(&t)), false, false).unwrap(),
    )
    .await;
    let edit = |body: serde_json::Value| {
        let req = api
            .req(
                reqwest::Method::POST,
                "/api/v1/workers/cml-1/connection-check",
                Some(ADMIN_TOKEN),
            )
            .json(&body);
        let api = &api;
        async move { api.send(req).await }
    };
    let (s, v) = edit(serde_json::json!({"name": "renamed"})).await;
    assert_eq!(
        (s, v["ok"].as_bool()),
        (reqwest::StatusCode::OK, Some(true)),
        "{v}"
    );
    let (s, v) = edit(serde_json::json!({"insecure": true, "ca_cert_pem": ""})).await;
    assert_eq!(s, reqwest::StatusCode::BAD_REQUEST, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("password"), "{v}");
    let (s, v) = edit(serde_json::json!({"ca_cert_pem": "", "password": ADMIN_PASSWORD})).await;
    assert_eq!(
        (s, v["problem"].as_str()),
        (reqwest::StatusCode::OK, Some("tls")),
        "{v}"
    );
    assert_eq!(
        t.services().workers.list().await.unwrap()[0].name,
        "cml-1",
        "nothing saved"
    );
    let (s, _) = api
        .send(
            api.req(
                reqwest::Method::POST,
                "/api/v1/connection-checks",
                Some(OPERATOR_TOKEN),
            )
            .json(&settings(ADMIN_PASSWORD, None)),
        )
        .await;
    assert_eq!(s, reqwest::StatusCode::FORBIDDEN);
    api.stop().await;
}
