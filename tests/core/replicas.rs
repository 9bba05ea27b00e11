//! Two `labsync serve` replicas on one database: both schedules fire on
//! every tick, the per-worker lease lets exactly one refresh each worker,
//! and when one replica is killed the other carries on alone.

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
    let checked = t.assert_matches_truth("after two replicas").await;
    report(
        "replicas",
        &format!(
            "two replicas: {ticks} ticks x {WORKERS} workers with both ({worked} refreshes, {skipped} skipped \
             by the lease, 0 doubled, 0 overlapping), then {ticks_alone} ticks alone after a SIGKILL \
             ({worked_alone} refreshes); {checked} records checked against CML"
        ),
    );
}
