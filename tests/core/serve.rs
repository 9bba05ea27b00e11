//! `labsync serve`: the scheduled refresh, run as a process.

use std::process::Stdio;
use std::time::{Duration, Instant};

use labsync_application::{RunReport, Trigger};
use serde_json::json;
use tokio::process::Command;

use crate::helpers::{SEEDED_LABS, TestApp, eventually};

async fn scheduled(t: &TestApp) -> Vec<RunReport> {
    let mut runs: Vec<RunReport> = t
        .services()
        .reports
        .recent(None, 100)
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.trigger == Trigger::Schedule)
        .collect();
    runs.sort_by_key(|r| r.started_at);
    runs
}

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
        scheduled(&t).await.len() >= 2
    })
    .await;
    let runs = scheduled(&t).await;
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
    let in_flight = scheduled(&t).await.len();
    eventually("the next run to list the labs", || async {
        t.sim()
            .stats()
            .requests
            .get(&cml_sim::Endpoint::ListLabs)
            .copied()
            .unwrap_or(0)
            > in_flight as u64
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
        scheduled(&t).await.len(),
        in_flight + 1,
        "the run in flight was completed and reported"
    );
}
