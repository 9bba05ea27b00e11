//! The CLI, run as a process against the simulator and the test server.

use axum::http::{Method, StatusCode};
use axum::response::IntoResponse;
use cml_sim::LabSpec;
use serde_json::Value;
use tokio::process::Command;

use crate::helpers::{ADMIN_PASSWORD, SEEDED_LABS, TestApp, output_text};
use crate::hostile_cml::{ESCAPES, HOSTILE, HostileCml, cml_error, register};

/// `text` holds no control character but line ends: nothing a terminal
/// would act on.
#[track_caller]
fn assert_printable(what: &str, text: &str) {
    assert!(
        !text.chars().any(|c| c.is_control() && c != '\n'),
        "{what} would reach the terminal raw: {text:?}"
    );
}

#[tokio::test]
async fn the_cli_registers_refreshes_deletes_and_says_so_with_its_exit_code() {
    let t = TestApp::spawn().await;
    let url = t.sim().base_url();

    let add = [
        "workers",
        "add",
        "--id",
        "cli-worker",
        "--url",
        &url,
        "--username",
        "admin",
        "--password-env",
        "CML_PASSWORD",
        "--allow-http",
    ];
    let o = t.cli(&add).await;
    assert!(o.status.success(), "{}", output_text(&o));
    assert!(output_text(&o).contains("registered worker cli-worker"));
    let o = t.cli(&add).await;
    assert_eq!(o.status.code(), Some(2), "{}", output_text(&o));
    assert!(
        output_text(&o).contains("already registered"),
        "{}",
        output_text(&o)
    );
    let o = t
        .cli(&[
            "workers",
            "add",
            "--id",
            "Bad_Id",
            "--url",
            &url,
            "--username",
            "admin",
            "--password-env",
            "CML_PASSWORD",
        ])
        .await;
    assert_eq!(o.status.code(), Some(2));
    assert!(output_text(&o).contains("worker id"), "{}", output_text(&o));
    let o = t
        .cli(&[
            "workers",
            "add",
            "--id",
            "nopass",
            "--url",
            &url,
            "--username",
            "admin",
            "--password-env",
            "LABSYNC_UNSET_VAR",
        ])
        .await;
    assert_eq!(o.status.code(), Some(1));
    assert!(
        output_text(&o).contains("LABSYNC_UNSET_VAR"),
        "{}",
        output_text(&o)
    );

    let o = t.cli(&["workers", "list"]).await;
    assert!(o.status.success());
    assert!(output_text(&o).contains("cli-worker") && output_text(&o).contains("cml-1"));
    assert!(!output_text(&o).contains(ADMIN_PASSWORD));

    let o = t
        .cli(&["refresh", "--worker", "cli-worker", "--json"])
        .await;
    assert!(o.status.success(), "{}", output_text(&o));
    let reports: Value = serde_json::from_slice(&o.stdout).expect("JSON reports on stdout");
    assert_eq!(reports[0]["status"], "succeeded");
    assert_eq!(reports[0]["created"], SEEDED_LABS);

    let o = t.cli(&["refresh"]).await;
    assert!(o.status.success(), "{}", output_text(&o));
    assert!(
        output_text(&o).contains("cml-1") && output_text(&o).contains("cli-worker"),
        "{}",
        output_text(&o)
    );

    let o = t.cli(&["refresh", "--worker", "no-such-worker"]).await;
    assert_eq!(o.status.code(), Some(2));
    assert!(output_text(&o).contains("unknown worker"));

    let o = t
        .cli(&["labs", "list", "--worker", "cli-worker", "--json"])
        .await;
    let labs: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(labs.as_array().unwrap().len(), SEEDED_LABS);

    let running = t
        .sim()
        .labs()
        .into_iter()
        .find(|l| l.state == "STARTED")
        .unwrap()
        .id;
    let wiped = t
        .sim()
        .labs()
        .into_iter()
        .find(|l| l.state == "DEFINED_ON_CORE")
        .unwrap()
        .id;

    let o = t
        .cli(&["delete-lab", "--worker", "cli-worker", "--lab", &running])
        .await;
    assert_eq!(o.status.code(), Some(1), "{}", output_text(&o));
    assert!(output_text(&o).contains("STARTED"), "{}", output_text(&o));
    let o = t
        .cli(&[
            "delete-lab",
            "--worker",
            "cli-worker",
            "--lab",
            &running,
            "--force",
            "--json",
        ])
        .await;
    assert!(o.status.success(), "{}", output_text(&o));
    let outcome: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (outcome["kind"].as_str(), outcome["lab_gone"].as_bool()),
        (Some("deleted"), Some(true))
    );
    let o = t
        .cli(&["delete-lab", "--worker", "cli-worker", "--lab", &wiped])
        .await;
    assert!(o.status.success(), "{}", output_text(&o));
    let o = t
        .cli(&["delete-lab", "--worker", "cli-worker", "--lab", "../../etc"])
        .await;
    assert_eq!(o.status.code(), Some(2));
    assert!(output_text(&o).contains("UUID4"), "{}", output_text(&o));

    t.faults(serde_json::json!({"error_rate": {"list_labs": 1.0}}));
    let o = t.cli(&["refresh", "--worker", "cli-worker"]).await;
    assert_eq!(o.status.code(), Some(1), "{}", output_text(&o));
    assert!(
        output_text(&o).contains("FAILED") && output_text(&o).contains("500"),
        "{}",
        output_text(&o)
    );

    let o = t.cli(&["workers", "remove", "cli-worker"]).await;
    assert!(o.status.success(), "{}", output_text(&o));
    assert!(
        output_text(&o).contains(&format!("{SEEDED_LABS} lab records")),
        "{}",
        output_text(&o)
    );
    let o = t.cli(&["workers", "remove", "cli-worker"]).await;
    assert_eq!(o.status.code(), Some(2), "an unknown worker is bad input");
}

#[tokio::test]
async fn a_bad_configuration_fails_at_start_naming_the_key() {
    let t = TestApp::spawn().await;
    let o = Command::new(env!("CARGO_BIN_EXE_labsync"))
        .args(["workers", "list"])
        .envs(t.env())
        .env("LABSYNC__REFRESH__CRON", "every half hour")
        .output()
        .await
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(
        output_text(&o).contains("refresh.cron"),
        "{}",
        output_text(&o)
    );
}

#[tokio::test]
async fn human_output_escapes_the_control_characters_cml_sent_and_json_keeps_them() {
    let t = TestApp::spawn().await;
    let evil = format!("{ESCAPES}EVIL TITLE");
    let lab = t
        .sim()
        .add_lab(LabSpec {
            state: Some("STOPPED".into()),
            lab_title: Some(evil.clone()),
            ..LabSpec::default()
        })
        .unwrap();
    let o = t.cli(&["refresh", "--worker", "cml-1"]).await;
    assert!(o.status.success(), "{}", output_text(&o));

    let o = t.cli(&["labs", "list", "--worker", "cml-1"]).await;
    let out = String::from_utf8(o.stdout).unwrap();
    assert_printable("labs list", &out);
    let line = out
        .lines()
        .find(|l| l.starts_with(&lab.id))
        .expect("the lab is listed");
    assert!(
        line.ends_with(r"\u{1b}]0;pwned\u{7}\u{1b}[2J\u{1b}[31mEVIL TITLE"),
        "{line}"
    );
    let o = t
        .cli(&["labs", "list", "--worker", "cml-1", "--json"])
        .await;
    let labs: Value = serde_json::from_slice(&o.stdout).unwrap();
    let stored = labs
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["lab_id"] == lab.id.as_str())
        .unwrap();
    assert_eq!(
        stored["snapshot"]["title"],
        evil.as_str(),
        "JSON keeps the title whole"
    );

    // A delete's message and a refresh's report line carry CML's texts too.
    let cml = HostileCml::start().await;
    register(&t, &cml).await;
    let running = cml.add_lab("STARTED");
    cml.on(
        Method::GET,
        &format!("/api/v0/labs/{running}/state"),
        || axum::Json(format!("{ESCAPES}STARTED")).into_response(),
    );
    let o = t
        .cli(&["delete-lab", "--worker", HOSTILE, "--lab", running.as_str()])
        .await;
    assert_eq!(o.status.code(), Some(1), "{}", output_text(&o));
    let out = String::from_utf8(o.stdout).unwrap();
    assert_printable("delete-lab", &out);
    assert!(out.contains(r"\u{1b}]0;pwned"), "{out}");
    cml.on(Method::GET, "/api/v0/labs", || {
        cml_error(StatusCode::INTERNAL_SERVER_ERROR, &format!("{ESCAPES}boom"))
    });
    let o = t.cli(&["refresh", "--worker", HOSTILE]).await;
    assert_eq!(o.status.code(), Some(1), "{}", output_text(&o));
    let out = String::from_utf8(o.stdout).unwrap();
    assert_printable("refresh", &out);
    assert!(out.contains("FAILED") && out.contains("boom"), "{out}");
}
