//! Two `labsync serve` replicas on one database: both schedules fire on
//! every tick, the per-worker lease lets exactly one refresh each worker,
//! and when one replica is killed the other carries on alone.

use labsync_application::domain::Actor;
use std::collections::BTreeMap;
use std::process::Stdio;

use chrono::{DateTime, Utc};
use labsync_application::{RunReport, RunStatus};
use serde_json::json;
use tokio::process::{Child, Command};

use labsync_test_support::eventually_within;

use crate::helpers::{TestApp, eventually, report};

const WORKERS: usize = 3;
/// Seconds between ticks: long enough that a tick's runs are over, and
/// that a late start is never taken for the next tick.
const TICK_SECS: i64 = 2;

fn replica(t: &TestApp) -> Child {
    Command::new(env!("CARGO_BIN_EXE_labsync"))
        .arg("serve")
        .envs(t.env())
        .env("LABSYNC__REFRESH__CRON", format!("*/{TICK_SECS} * * * * *"))
        .env("LABSYNC__REFRESH__LEASE_TTL_SECS", "3")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("labsync serve starts")
}

fn tick(at: DateTime<Utc>) -> i64 {
    at.timestamp().div_euclid(TICK_SECS)
}

/// Per finished tick and worker, the runs that did the work; checks that
/// no two runs of a worker overlapped. Returns (ticks, runs, skipped).
fn check_once_per_tick(runs: &[RunReport], since: DateTime<Utc>) -> (usize, usize, usize) {
    let now = tick(Utc::now());
    let mut per_tick: BTreeMap<i64, BTreeMap<String, usize>> = BTreeMap::new();
    let mut skipped = 0;
    for r in runs.iter().filter(|r| r.started_at >= since) {
        let k = tick(r.started_at);
        if k >= now {
            continue; // this tick may still be running
        }
        let entry = per_tick.entry(k).or_default();
        match r.status {
            RunStatus::Skipped => skipped += 1,
            _ => *entry.entry(r.worker_id.to_string()).or_default() += 1,
        }
    }
    for (k, workers) in &per_tick {
        assert_eq!(
            workers.len(),
            WORKERS,
            "tick {k}: not every worker was refreshed: {workers:?}"
        );
        assert!(
            workers.values().all(|n| *n == 1),
            "tick {k}: a worker was refreshed twice: {workers:?}"
        );
    }
    for w in 1..=WORKERS {
        let mine: Vec<&RunReport> = runs
            .iter()
            .filter(|r| {
                r.worker_id.as_str() == format!("cml-{w}") && r.status != RunStatus::Skipped
            })
            .collect();
        for pair in mine.windows(2) {
            assert!(
                pair[1].started_at >= pair[0].finished_at,
                "two runs of cml-{w} overlapped: {:?}",
                (pair[0].started_at, pair[0].finished_at, pair[1].started_at)
            );
        }
    }
    let worked = per_tick.values().map(|w| w.values().sum::<usize>()).sum();
    (per_tick.len(), worked, skipped)
}

#[tokio::test]
async fn two_replicas_refresh_each_worker_once_per_tick_and_one_carries_on_alone() {
    let t = TestApp::spawn_with(WORKERS, &[]).await;
    // Runs take about half a tick, so that a kill can land inside one.
    for w in t.sim.workers() {
        w.set_faults(serde_json::from_value(json!({"latency_ms": {"list_labs": 600}})).unwrap());
    }
    let start = Utc::now();
    let mut a = replica(&t);
    let mut b = replica(&t);
    let patience = std::time::Duration::from_secs(40);
    eventually_within(patience, "five ticks with both replicas", || async {
        let runs = t.scheduled_runs().await;
        let ticks: std::collections::BTreeSet<i64> =
            runs.iter().map(|r| tick(r.started_at)).collect();
        ticks.len() >= 5
    })
    .await;
    let (ticks, worked, skipped) = check_once_per_tick(&t.scheduled_runs().await, start);
    assert!(ticks >= 4, "{ticks}");
    assert!(
        skipped > 0,
        "both replicas competed for the workers: {skipped} runs skipped"
    );

    // Kill one replica while a tick's runs are in flight.
    let lists = t.sim.workers()[0].stats().requests[&cml_sim::Endpoint::ListLabs];
    eventually("the next tick to start", || async {
        t.sim.workers()[0].stats().requests[&cml_sim::Endpoint::ListLabs] > lists
    })
    .await;
    a.start_kill().unwrap();
    a.wait().await.unwrap();
    let killed_at = Utc::now();
    // Leases the dead replica held expire (3 s); then every tick is done
    // by the survivor alone.
    let resumed = killed_at + chrono::Duration::seconds(4);
    eventually_within(
        patience,
        "the survivor to refresh every worker three times",
        || async {
            let runs = t.scheduled_runs().await;
            (1..=WORKERS).all(|w| {
                runs.iter()
                    .filter(|r| {
                        r.worker_id.as_str() == format!("cml-{w}")
                            && r.status == RunStatus::Succeeded
                            && r.started_at >= resumed
                    })
                    .count()
                    >= 3
            })
        },
    )
    .await;
    let after = t.scheduled_runs().await;
    let (ticks_alone, worked_alone, _) = check_once_per_tick(&after, resumed);
    assert!(ticks_alone >= 2);
    assert!(
        after
            .iter()
            .filter(|r| r.started_at >= resumed)
            .all(|r| r.status == RunStatus::Succeeded),
        "alone, the survivor never finds a lease held"
    );
    assert!(b.try_wait().unwrap().is_none(), "the survivor is running");
    b.start_kill().unwrap();
    b.wait().await.unwrap();
    for w in t.sim.workers() {
        w.set_faults(Default::default());
    }
    let r = t.refresh().await;
    assert_eq!(r.status, RunStatus::Succeeded);
    let diff = t.assert_matches_truth("after two replicas").await;
    report(
        "replicas",
        &format!(
            "two replicas: {ticks} ticks x {WORKERS} workers with both ({worked} refreshes, {skipped} skipped \
             by the lease, 0 doubled, 0 overlapping), then {ticks_alone} ticks alone after a SIGKILL \
             ({worked_alone} refreshes); {diff}"
        ),
    );
}

#[tokio::test]
async fn two_replicas_run_a_slow_forced_async_delete_exactly_once() {
    let t = TestApp::spawn().await;
    let lab = t.add_lab("STARTED");
    t.refresh().await;
    // Stop and wipe take 1.5 s each at CML: the delete outlives its 1 s
    // claim several times over, so only renewing it keeps the other
    // replica out.
    t.faults(json!({"latency_ms": {"lab_action": 1500}}));
    let replica = || {
        Command::new(env!("CARGO_BIN_EXE_labsync"))
            .arg("serve")
            .envs(t.env())
            .env("LABSYNC__DELETE__ASYNC_CLAIM_SECS", "1")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("labsync serve starts")
    };
    let (mut a, mut b) = (replica(), replica());
    let (request, _) = t
        .app
        .delete_queue
        .submit(&labsync_application::DeleteLab {
            worker_id: t.worker_id(),
            lab_id: lab,
            force: true,
            requested_by: Actor::api("operator"),
            owned_by: None,
        })
        .await
        .unwrap();
    eventually_within(
        std::time::Duration::from_secs(60),
        "the async delete to end",
        || async {
            t.app
                .delete_queue
                .get(&request.id)
                .await
                .unwrap()
                .is_some_and(|r| {
                    matches!(
                        r.status,
                        labsync_application::DeleteRequestStatus::Done
                            | labsync_application::DeleteRequestStatus::Failed
                    )
                })
        },
    )
    .await;
    let done = t.app.delete_queue.get(&request.id).await.unwrap().unwrap();
    assert_eq!(
        (done.status, done.attempts),
        (labsync_application::DeleteRequestStatus::Done, 1),
        "{done:?}"
    );
    assert_eq!(
        done.outcome.as_ref().unwrap().kind,
        labsync_application::DeleteOutcomeKind::Deleted,
        "{done:?}"
    );
    let audit: Vec<String> = t.audit(&lab).await.into_iter().map(|a| a.outcome).collect();
    assert_eq!(
        audit,
        ["deleted", "started"],
        "one execution's audit entries only (newest first)"
    );
    let events = t
        .app
        .db
        .collection::<mongodb::bson::Document>("outbox")
        .count_documents(mongodb::bson::doc! {"lab_id": lab.as_str()})
        .await
        .unwrap();
    assert_eq!(events, 2, "discovered, then one deleted");
    a.start_kill().unwrap();
    b.start_kill().unwrap();
    let _ = (a.wait().await, b.wait().await);
}

#[tokio::test]
async fn two_replicas_never_overlap_a_run_that_outlives_its_lease() {
    // Runs of about 3 s (24 labs, 2 at a time, 250 ms each) on a 1 s lease,
    // both replicas ticking every second: without renewal, a replica would
    // start a second run of the worker a second into the first.
    let t = TestApp::spawn_with(
        1,
        &[("LABSYNC__REFRESH__MAX_CONCURRENT_LABS_PER_WORKER", "2")],
    )
    .await;
    t.faults(json!({"latency_ms": {"lab_details": 250}}));
    let replica = || {
        Command::new(env!("CARGO_BIN_EXE_labsync"))
            .arg("serve")
            .envs(t.env())
            .env("LABSYNC__REFRESH__CRON", "* * * * * *")
            .env("LABSYNC__REFRESH__LEASE_TTL_SECS", "1")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("labsync serve starts")
    };
    let (mut a, mut b) = (replica(), replica());
    let worked = |runs: &[RunReport]| {
        runs.iter()
            .filter(|r| r.status != RunStatus::Skipped)
            .cloned()
            .collect::<Vec<_>>()
    };
    eventually_within(
        std::time::Duration::from_secs(60),
        "two slow runs to finish",
        || async { worked(&t.scheduled_runs().await).len() >= 2 },
    )
    .await;
    a.start_kill().unwrap();
    b.start_kill().unwrap();
    let _ = (a.wait().await, b.wait().await);
    let runs = t.scheduled_runs().await;
    let worked = worked(&runs);
    assert!(
        worked.iter().all(|r| r.status == RunStatus::Succeeded),
        "{worked:?}"
    );
    assert!(
        worked[0].duration_ms > 2_000,
        "a run outlived its 1 s lease: {:?}",
        worked[0]
    );
    // The lease is released just before the report is finished: a few
    // milliseconds of apparent overlap are that, not a second run.
    let slack = chrono::Duration::milliseconds(250);
    for pair in worked.windows(2) {
        assert!(
            pair[1].started_at >= pair[0].finished_at - slack,
            "two runs of the worker overlapped: {:?} then {:?}",
            (pair[0].started_at, pair[0].finished_at),
            (pair[1].started_at, pair[1].finished_at)
        );
    }
    let first = &worked[0];
    let late_skips = runs
        .iter()
        .filter(|r| {
            r.status == RunStatus::Skipped
                && r.started_at > first.started_at + chrono::Duration::milliseconds(1_200)
                && r.started_at < first.finished_at
        })
        .count();
    assert!(
        late_skips > 0,
        "no run was kept out after the lease's first expiry: {runs:?}"
    );
    report(
        "replicas-slow",
        &format!(
            "two replicas, runs of {:.1} s on a 1 s lease: {} runs, {} skipped by the lease ({} after its first expiry), 0 overlapping",
            first.duration_ms as f64 / 1000.0,
            worked.len(),
            runs.len() - worked.len(),
            late_skips
        ),
    );
}
