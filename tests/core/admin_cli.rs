//! The admin CLI an operator reaches for: its configuration as TOML,
//! completions and a manual, workers enabled, disabled, tested and changed,
//! a lab and an async delete shown, a database that does not answer said
//! in one line, and the encryption key rotated without losing a password.

use tokio::process::Command;

use crate::helpers::{ADMIN_PASSWORD, TEST_KEY, TestApp, output_text};

fn output_text_has(bytes: &[u8], what: &str) -> bool {
    String::from_utf8_lossy(bytes).contains(what)
}

/// A key other than the tests' own.
const NEW_KEY: &str = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";

async fn run(t: &TestApp, env: &[(&str, &str)], args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_labsync"))
        .args(args)
        .envs(t.env())
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn")
        .output()
        .await
        .expect("labsync runs")
}

/// The exit code, and what it printed (both streams).
async fn labsync(t: &TestApp, env: &[(&str, &str)], args: &[&str]) -> (Option<i32>, String) {
    let o = run(t, env, args).await;
    (o.status.code(), output_text(&o))
}

#[tokio::test]
async fn the_configuration_prints_as_toml_from_the_file_named_on_the_command_line() {
    let t = TestApp::spawn().await;
    let dir = std::env::temp_dir().join(format!("labsync-cli-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("labsync.toml");
    std::fs::write(&file, "[refresh]\ncron = \"0 */10 * * * *\"\n").unwrap();
    let o = run(
        &t,
        &[(
            "LABSYNC__MONGODB__URI",
            "mongodb://app:hunter2@db1:27017/?authSource=admin",
        )],
        &["--config", file.to_str().unwrap(), "config"],
    )
    .await;
    assert_eq!(o.status.code(), Some(0), "{}", output_text(&o));
    let out = String::from_utf8(o.stdout).unwrap();
    assert!(!output_text_has(&o.stderr, "hunter2"));
    let printed: toml::Table = toml::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(
        printed["refresh"]["cron"].as_str(),
        Some("0 */10 * * * *"),
        "the file given with --config"
    );
    for secret in ["hunter2", TEST_KEY] {
        assert!(!out.contains(secret), "{secret} printed: {out}");
    }
    assert_eq!(
        printed["mongodb"]["uri"].as_str(),
        Some("mongodb://[redacted]@db1:27017/?[redacted]")
    );
    let _ = std::fs::remove_dir_all(dir);

    // Completions and the manual need no configuration at all.
    let (code, out) = labsync(
        &t,
        &[("LABSYNC__REFRESH__CRON", "not a cron")],
        &["completions", "bash"],
    )
    .await;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("rotate-key") && out.contains("delete-requests"),
        "{out}"
    );
    let (code, out) = labsync(&t, &[], &["man"]).await;
    assert_eq!(code, Some(0));
    assert!(
        out.starts_with(".ie") || out.contains(".TH labsync"),
        "{out}"
    );
}

#[tokio::test]
async fn a_worker_is_disabled_enabled_tested_and_changed_from_the_terminal() {
    let t = TestApp::spawn().await;
    t.refresh().await;
    let (code, out) = labsync(&t, &[], &["workers", "disable", "cml-1"]).await;
    assert_eq!(code, Some(0), "{out}");
    let (_, out) = labsync(&t, &[], &["workers", "list"]).await;
    assert!(out.contains("disabled"), "{out}");
    let (_, out) = labsync(&t, &[], &["refresh", "--worker", "cml-1"]).await;
    assert!(
        out.contains("skipped") && out.contains("worker is disabled"),
        "a disabled worker is not refreshed: {out}"
    );
    let (code, out) = labsync(&t, &[], &["workers", "enable", "cml-1"]).await;
    assert_eq!(code, Some(0), "{out}");

    let (code, out) = labsync(&t, &[], &["workers", "test", "cml-1"]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("ok in") && out.contains("logged in as admin") && out.contains("labs listed"),
        "{out}"
    );
    // A wrong password, saved, then tested: the failure is said.
    let (code, out) = labsync(
        &t,
        &[("WRONG", "not-the-password")],
        &["workers", "update", "cml-1", "--password-env", "WRONG"],
    )
    .await;
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = labsync(&t, &[], &["workers", "test", "cml-1"]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("FAILED"), "{out}");
    let (code, out) = labsync(
        &t,
        &[("RIGHT", ADMIN_PASSWORD)],
        &[
            "workers",
            "update",
            "cml-1",
            "--password-env",
            "RIGHT",
            "--lab-tiles",
            "true",
        ],
    )
    .await;
    assert_eq!(code, Some(0), "{out}");
    let (_, out) = labsync(&t, &[], &["workers", "list", "--json"]).await;
    assert!(out.contains("\"lab_tiles\": true"), "{out}");

    // A lab, shown whole.
    let lab = t.records().await[0].lab_id;
    let (code, out) = labsync(
        &t,
        &[],
        &["labs", "show", "--worker", "cml-1", "--lab", lab.as_str()],
    )
    .await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(lab.as_str()) && out.contains("state"), "{out}");
}

#[tokio::test]
async fn an_async_delete_is_listed_and_shown() {
    let t = TestApp::spawn().await;
    let lab = t.add_lab("DEFINED_ON_CORE");
    t.refresh().await;
    let api = crate::helpers::TestApi::start(&t).await;
    let (s, body) = api
        .send(api.req(
            reqwest::Method::DELETE,
            &format!("/api/v1/workers/cml-1/labs/{lab}?mode=async"),
            Some(crate::helpers::OPERATOR_TOKEN),
        ))
        .await;
    assert_eq!(s, reqwest::StatusCode::ACCEPTED, "{body}");
    let id = body["delete_request_id"].as_str().unwrap().to_owned();
    let (code, out) = labsync(&t, &[], &["delete-requests", "list"]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(&id) && out.contains(lab.as_str()), "{out}");
    let (code, out) = labsync(&t, &[], &["delete-requests", "show", &id, "--json"]).await;
    assert_eq!(code, Some(0), "{out}");
    let shown: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["id"], id.as_str());
    let (code, out) = labsync(
        &t,
        &[],
        &["delete-requests", "list", "--status", "sideways"],
    )
    .await;
    assert_eq!(code, Some(2), "{out}");
    api.stop().await;
}

#[tokio::test]
async fn a_database_that_does_not_answer_is_said_in_one_line_without_its_credentials() {
    let t = TestApp::spawn().await;
    let port = crate::helpers::free_port();
    let (code, out) = labsync(
        &t,
        &[
            (
                "LABSYNC__MONGODB__URI",
                &format!("mongodb://app:hunter2@127.0.0.1:{port}/"),
            ),
            ("LABSYNC__MONGODB__SERVER_SELECTION_TIMEOUT_MS", "300"),
            ("LABSYNC__MONGODB__CONNECT_TIMEOUT_MS", "300"),
        ],
        &["workers", "list"],
    )
    .await;
    assert_eq!(code, Some(1), "{out}");
    assert_eq!(out.trim().lines().count(), 1, "one line: {out}");
    assert!(
        out.contains("MongoDB did not answer") && out.contains(&format!("127.0.0.1:{port}")),
        "{out}"
    );
    assert!(
        !out.contains("hunter2") && !out.contains("Topology"),
        "{out}"
    );

    // A missing encryption key is named as such, not as a database error.
    let (code, out) = labsync(
        &t,
        &[("LABSYNC__SECURITY__ENCRYPTION_KEY", ""), ("P", "x")],
        &[
            "workers",
            "add",
            "--id",
            "cml-9",
            "--url",
            "https://cml9.example.net",
            "--username",
            "admin",
            "--password-env",
            "P",
        ],
    )
    .await;
    assert_ne!(code, Some(0));
    assert!(
        out.contains("security.encryption_key is not set") && !out.contains("database error"),
        "{out}"
    );
}

#[tokio::test]
async fn the_encryption_key_is_rotated_worker_by_worker_and_a_second_run_finishes_the_first() {
    let t = TestApp::spawn_with(2, &[]).await;
    let new_key = [("LABSYNC__SECURITY__ENCRYPTION_KEY", NEW_KEY)];
    // As if a first run stopped after cml-1: its password is sealed under
    // the new key already (an update with the password seals it so).
    let (code, out) = labsync(
        &t,
        &[new_key[0], ("P", ADMIN_PASSWORD)],
        &["workers", "update", "cml-1", "--password-env", "P"],
    )
    .await;
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = labsync(
        &t,
        &[new_key[0], ("OLD_KEY", TEST_KEY)],
        &["security", "rotate-key", "--old-key-env", "OLD_KEY"],
    )
    .await;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("resealed 1") && out.contains("1 already"),
        "{out}"
    );
    let (code, out) = labsync(
        &t,
        &[new_key[0], ("OLD_KEY", TEST_KEY)],
        &["security", "rotate-key", "--old-key-env", "OLD_KEY"],
    )
    .await;
    assert_eq!(code, Some(0));
    assert!(
        out.contains("resealed 0") && out.contains("2 already"),
        "{out}"
    );
    // Every password opens under the new key, none under the old.
    let (code, out) = labsync(&t, &new_key, &["refresh"]).await;
    assert_eq!(code, Some(0), "under the new key: {out}");
    let (code, out) = labsync(&t, &[], &["refresh"]).await;
    assert_eq!(code, Some(1), "under the old key: {out}");
    // A wrong old key changes nothing and says which worker.
    let third = "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=";
    let (code, out) = labsync(
        &t,
        &[
            ("LABSYNC__SECURITY__ENCRYPTION_KEY", third),
            ("OLD_KEY", TEST_KEY),
        ],
        &["security", "rotate-key", "--old-key-env", "OLD_KEY"],
    )
    .await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("NOT resealed: cml-1") && out.contains("resealed 0"),
        "{out}"
    );
    let (code, out) = labsync(&t, &new_key, &["refresh"]).await;
    assert_eq!(code, Some(0), "still under the new key: {out}");
}
