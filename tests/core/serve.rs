//! `labsync serve`: the scheduled refresh, run as a process.

use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::process::Command;

use crate::helpers::{SEEDED_LABS, TestApp, eventually};

#[tokio::test]
async fn serve_refreshes_on_schedule_never_overlaps_and_stops_cleanly_on_sigterm() {
    let t = TestApp::spawn().await;
    // Each run takes longer than the one-second tick.
    t.faults(json!({"latency_ms": {"list_labs": 1500}}));
    let mut child = Command::new(env!("CARGO_BIN_EXE_labsync"))
        .arg("serve")
        .envs(t.env())
        .env("LABSYNC__REFRESH__CRON", "*/1 * * * * *")
        .env("LABSYNC__REFRESH__RUN_AT_STARTUP", "true")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("labsync serve starts");

    eventually("two scheduled runs", || async {
        t.scheduled_runs().await.len() >= 2
    })
    .await;
    let runs = t.scheduled_runs().await;
    assert_eq!(runs[0].created, SEEDED_LABS as u64);
    for pair in runs.windows(2) {
        assert!(
            pair[1].started_at >= pair[0].finished_at,
            "runs overlapped: {:?} and {:?}",
            (pair[0].started_at, pair[0].finished_at),
            (pair[1].started_at, pair[1].finished_at)
        );
    }

    // SIGTERM while a run is in flight: it finishes, then the process exits 0.
    let in_flight = t.scheduled_runs().await.len();
    eventually("the next run to list the labs", || async {
        t.cml_requests(cml_sim::Endpoint::ListLabs) > in_flight as u64
    })
    .await;
    let pid = child.id().expect("running").to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = tokio::time::timeout_at(deadline.into(), child.wait())
        .await
        .expect("serve exits after SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert_eq!(
        t.scheduled_runs().await.len(),
        in_flight + 1,
        "the run in flight was completed and reported"
    );
}

#[tokio::test]
async fn sigterm_lets_a_delete_in_flight_complete_and_no_secret_reaches_the_logs() {
    use tokio::io::AsyncBufReadExt;

    let t = TestApp::spawn().await;
    let log = tempfile_path("serve-log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_labsync"))
        .arg("serve")
        .envs(t.env())
        .env("RUST_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
        .kill_on_drop(true)
        .spawn()
        .expect("labsync serve starts");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("serve prints its address")
        .unwrap()
        .unwrap();
    let base = first
        .split("API on ")
        .nth(1)
        .expect("address line")
        .trim()
        .to_owned();
    let http = reqwest::Client::new();
    let call = |m: reqwest::Method, path: &str, token: &str| {
        http.request(m, format!("{base}{path}")).bearer_auth(token)
    };
    let mut bodies = String::new();

    // A story with secrets in it: a worker registered with a password, refreshes, listings.
    let secret_password = "s3cret-password-via-api";
    let r = call(reqwest::Method::POST, "/api/v1/workers", crate::helpers::ADMIN_TOKEN)
        .json(&json!({"id": "cml-extra", "base_url": t.sim().base_url(), "username": "admin", "password": secret_password, "allow_http": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    bodies.push_str(&r.text().await.unwrap());
    // cml-extra's password is wrong for the simulator: its refresh fails
    // with CML's refusal, and the password must not leak in that path either.
    for (worker, want) in [("cml-1", 200), ("cml-extra", 502)] {
        let r = call(
            reqwest::Method::POST,
            &format!("/api/v1/workers/{worker}/labs/refresh"),
            crate::helpers::ADMIN_TOKEN,
        )
        .send()
        .await
        .unwrap();
        assert_eq!(r.status().as_u16(), want, "{worker}");
        bodies.push_str(&r.text().await.unwrap());
    }
    assert!(bodies.contains("refused the credentials"), "{bodies}");
    let r = call(
        reqwest::Method::GET,
        "/api/v1/workers",
        crate::helpers::VIEWER_TOKEN,
    )
    .send()
    .await
    .unwrap();
    bodies.push_str(&r.text().await.unwrap());
    let r = call(reqwest::Method::GET, "/api/v1/workers", "wrong-token-value")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    bodies.push_str(&r.text().await.unwrap());
    for path in [
        "/api/v1/workers/cml-1/labs?limit=500",
        "/api/v1/workers/cml-extra",
        "/api/v1/refresh-runs?limit=10",
        "/metrics",
        "/api/v1/openapi.json",
    ] {
        let r = call(reqwest::Method::GET, path, crate::helpers::ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
        bodies.push_str(&r.text().await.unwrap());
    }

    // A delete that takes a while at CML, and SIGTERM while it is there.
    let lab = t.add_lab("DEFINED_ON_CORE");
    t.faults(json!({"latency_ms": {"delete_lab": 1500}}));
    let delete = tokio::spawn(
        call(
            reqwest::Method::DELETE,
            &format!("/api/v1/workers/cml-1/labs/{lab}"),
            crate::helpers::OPERATOR_TOKEN,
        )
        .send(),
    );
    eventually("the delete to reach CML", || async {
        t.cml_requests(cml_sim::Endpoint::DeleteLab) >= 1
    })
    .await;
    let pid = child.id().expect("running").to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .unwrap()
            .success()
    );
    let response = delete
        .await
        .unwrap()
        .expect("the delete in flight is answered");
    assert_eq!(response.status().as_u16(), 200);
    let text = response.text().await.unwrap();
    bodies.push_str(&text);
    let out: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(out["kind"], "deleted");
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("exits")
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(t.sim().lab(lab.as_str()).is_none(), "gone in CML");
    assert!(t.record(&lab).await.is_none(), "and its record");

    let mut logs = std::fs::read_to_string(&log).unwrap();
    while let Ok(Some(line)) = lines.next_line().await {
        logs.push_str(&line);
    }
    assert!(
        logs.len() > 1000,
        "debug logs were written: {} bytes",
        logs.len()
    );
    assert!(
        logs.contains("refresh finished"),
        "the story is in the logs"
    );
    let secrets = [
        crate::helpers::ADMIN_PASSWORD,
        secret_password,
        crate::helpers::ADMIN_TOKEN,
        crate::helpers::OPERATOR_TOKEN,
        crate::helpers::VIEWER_TOKEN,
        "wrong-token-value",
        crate::helpers::TEST_KEY,
        // CML's session tokens are JWTs; each starts with this.
        "eyJ",
    ];
    for secret in secrets {
        assert!(!logs.contains(secret), "{secret:?} appears in the logs");
        assert!(!bodies.contains(secret), "{secret:?} appears in a response");
    }
    crate::helpers::report(
        "secrets",
        &format!(
            "secrets: {} secrets (CML passwords, API tokens, encryption key, CML session tokens) \
             searched in {} bytes of debug logs and {} bytes of responses: 0 hits",
            secrets.len(),
            logs.len(),
            bodies.len()
        ),
    );
    let _ = std::fs::remove_file(&log);
}

fn tempfile_path(prefix: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "labsync-{prefix}-{}.log",
        uuid::Uuid::new_v4().simple()
    ))
}

/// Every form a secret could take in an output: as is, base64 (standard
/// and URL-safe, padded or not), percent-encoded, and hex of its bytes.
fn encodings(secret: &str) -> Vec<String> {
    use base64::Engine;
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let percent: String = secret
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    let mut out = vec![
        secret.to_owned(),
        STANDARD.encode(secret),
        STANDARD_NO_PAD.encode(secret),
        URL_SAFE.encode(secret),
        URL_SAFE_NO_PAD.encode(secret),
        percent,
        hex::encode(secret),
    ];
    // The encryption key is itself base64: its bytes must not show either.
    if let Ok(raw) = STANDARD.decode(secret) {
        out.push(hex::encode(&raw));
        out.push(format!("{raw:?}"));
    }
    out.sort();
    out.dedup();
    out
}

#[tokio::test]
async fn labsync_config_help_and_error_paths_reveal_no_secret_in_any_encoding() {
    let t = TestApp::spawn().await;
    let mongo_password = "mongo-s3cret-pw";
    let sink_token = "sink-s3cret-token";
    let uri = format!(
        "mongodb://labsync:{mongo_password}@127.0.0.1:1/?directConnection=true&serverSelectionTimeoutMS=300"
    );
    let sink = format!("https://sink.invalid/hook?token={sink_token}");
    let secrets = [
        mongo_password,
        sink_token,
        crate::helpers::TEST_KEY,
        crate::helpers::ADMIN_PASSWORD,
    ];
    let mut outputs = String::new();
    // `labsync config` with every secret set, --help of every command, and
    // a command that fails on the unreachable database (its error names
    // the database, never the URI's password).
    for args in [
        vec!["config"],
        vec!["--help"],
        vec!["workers", "add", "--help"],
        vec!["refresh", "--worker", "cml-1"],
        vec!["workers", "list"],
    ] {
        let o = tokio::process::Command::new(env!("CARGO_BIN_EXE_labsync"))
            .args(&args)
            .envs(t.env())
            .env("LABSYNC__MONGODB__URI", &uri)
            .env("LABSYNC__MONGODB__SERVER_SELECTION_TIMEOUT_MS", "300")
            .env("LABSYNC__EVENTS__SINK_URL", &sink)
            .env("CML_PASSWORD", crate::helpers::ADMIN_PASSWORD)
            .env("RUST_LOG", "debug")
            .output()
            .await
            .unwrap();
        outputs.push_str(&crate::helpers::output_text(&o));
    }
    assert!(
        outputs.contains("encryption_key = \"[redacted]\"")
            && outputs.contains("sink_url = \"[redacted]\""),
        "labsync config printed its settings: {outputs:.3000}"
    );
    let mut forms = 0;
    for secret in secrets {
        for form in encodings(secret) {
            forms += 1;
            assert!(
                !outputs.contains(&form),
                "a secret appears as {form:?} in: {outputs:.4000}"
            );
        }
    }
    crate::helpers::report(
        "secrets-config",
        &format!(
            "secrets in labsync config, --help and error paths: {} secrets in {forms} encodings searched in {} bytes: 0 hits",
            secrets.len(),
            outputs.len()
        ),
    );
}
