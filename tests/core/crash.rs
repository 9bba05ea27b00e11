//! Crash tests: `labsync` run as a process and killed with SIGKILL in the
//! middle of refreshes and deletes, then started again.
//!
//! Each iteration changes CML behind labsync's back, starts a refresh or a
//! delete, and kills the process once CML has served a chosen number of its
//! requests (the crash point, drawn from a seeded generator; set
//! `LABSYNC_CRASH_SEED` to replay a sequence). Then a new process refreshes
//! until a run goes through (a crashed run's lease must expire, never stick)
//! and MongoDB must equal CML: no lost record, no resurrected one.

use std::process::Stdio;
use std::time::Duration;

use labsync_application::domain::LabId;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};
use tokio::process::{Child, Command};

use labsync_test_support::poll_until;

use crate::helpers::{TestApp, eventually, report, seed};

const ITERATIONS: usize = 60;
const DEFAULT_SEED: u64 = 0x1ab5_c4a5;

pub(crate) fn labsync(t: &TestApp, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_labsync"));
    c.args(args)
        .envs(t.env())
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    c
}

/// Kills `child` with SIGKILL once CML has served `after` more requests than
/// `base`, or reports that it exited first. Returns whether it was killed.
pub(crate) async fn kill_after(t: &TestApp, child: &mut Child, base: u64, after: u64) -> bool {
    let mut exited = false;
    // Checked every millisecond, so that the kill lands close to the chosen
    // request.
    poll_until(Duration::from_millis(1), Duration::from_secs(30), || {
        exited = child.try_wait().expect("child status").is_some();
        std::future::ready(exited || t.sim().stats().total >= base + after)
    })
    .await
    .expect("the process neither progressed nor exited");
    if exited {
        return false;
    }
    child.start_kill().expect("SIGKILL sent");
    let status = child.wait().await.expect("reaped");
    // A process that finished in the same instant exits 0 or 2.
    status.code().is_none()
}

/// One refresh by a new process that goes through; counts the runs skipped
/// because a killed process's lease had not expired yet.
pub(crate) async fn restart_and_refresh(t: &TestApp) -> u32 {
    let skipped = std::cell::Cell::new(0);
    eventually("the lease of a killed process to expire", || async {
        let out = labsync(t, &["refresh", "--worker", "cml-1", "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .await
            .unwrap();
        let reports: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
            panic!(
                "refresh said: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        match reports[0]["status"].as_str() {
            Some("succeeded") => true,
            Some("skipped") => {
                skipped.set(skipped.get() + 1);
                false
            }
            other => panic!("refresh after a crash: {other:?}: {reports}"),
        }
    })
    .await;
    skipped.get()
}

/// Changes CML behind labsync's back: a lab added, one removed, one changed.
fn change_cml(t: &TestApp, rng: &mut ChaCha8Rng) {
    let labs = t.sim().labs();
    match rng.random_range(0..4) {
        0 if labs.len() > 16 => {
            let lab = &labs[rng.random_range(0..labs.len())];
            t.sim().remove_lab(&lab.id);
        }
        1 => {
            let lab = &labs[rng.random_range(0..labs.len())];
            t.sim()
                .update_lab(
                    &lab.id,
                    cml_sim::LabSpec {
                        lab_title: Some(format!("changed {}", rng.random::<u16>())),
                        ..Default::default()
                    },
                )
                .unwrap();
        }
        _ => {
            t.add_lab(["DEFINED_ON_CORE", "STOPPED", "STARTED"][rng.random_range(0..3)]);
        }
    }
}

#[tokio::test]
async fn sigkill_mid_refresh_and_mid_delete_loses_and_resurrects_nothing() {
    let seed = seed("LABSYNC_CRASH_SEED", DEFAULT_SEED);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let t = TestApp::spawn_with(
        1,
        &[
            ("LABSYNC__REFRESH__LEASE_TTL_SECS", "1"),
            ("LABSYNC__REFRESH__MAX_CONCURRENT_LABS_PER_WORKER", "4"),
        ],
    )
    .await;
    t.refresh().await;
    // Slow enough that a kill lands inside an operation, not after it.
    t.faults(json!({"latency_ms": {"all": 2}, "jitter_ms": 2}));
    let (mut killed, mut finished, mut leases_expired, mut checked) = (0, 0, 0, 0);
    let (mut refreshes, mut deletes) = (0, 0);
    for i in 0..ITERATIONS {
        change_cml(&t, &mut rng);
        let base = t.sim().stats().total;
        let (mut child, crash_point, what) = if rng.random_bool(0.5) {
            refreshes += 1;
            let labs = t.sim().labs().len() as u64;
            // A new process logs in, lists, then asks for each lab.
            let point = rng.random_range(1..=labs + 2);
            let child = labsync(&t, &["refresh", "--worker", "cml-1"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            (child, point, "refresh".to_owned())
        } else {
            deletes += 1;
            let recorded = t.records().await;
            let deletable: Vec<LabId> = recorded
                .iter()
                .filter(|r| {
                    t.sim()
                        .lab(r.lab_id.as_str())
                        .is_some_and(|l| l.state == "DEFINED_ON_CORE")
                })
                .map(|r| r.lab_id)
                .collect();
            let victim = match deletable.first() {
                Some(v) => *v,
                None => t.add_lab("DEFINED_ON_CORE"),
            };
            // Login, state, delete: a kill after the third lands between
            // CML's delete and the record's removal.
            let point = rng.random_range(1..=3);
            let child = labsync(
                &t,
                &["delete-lab", "--worker", "cml-1", "--lab", victim.as_str()],
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
            (child, point, format!("delete of {victim}"))
        };
        if kill_after(&t, &mut child, base, crash_point).await {
            killed += 1;
        } else {
            finished += 1;
        }
        if restart_and_refresh(&t).await > 0 {
            leases_expired += 1;
        }
        checked += t
            .assert_matches_truth(&format!(
                "seed {seed}, iteration {i}: {what} killed after {crash_point} CML requests"
            ))
            .await;
    }
    assert!(
        killed >= 50,
        "only {killed} of {ITERATIONS} runs were killed mid-flight"
    );
    report(
        "crash",
        &format!(
            "crash test (seed {seed}): {ITERATIONS} iterations ({refreshes} refreshes, {deletes} deletes), \
             {killed} killed with SIGKILL mid-operation, {finished} finished first; \
             {leases_expired} left a refresh lease that expired on its own (TTL 1 s); \
             {checked} records checked against CML: 0 lost, 0 resurrected"
        ),
    );
}
