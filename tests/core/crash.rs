//! Crash tests: `labsync` run as a process that dies at a named moment of a
//! refresh or a delete, then started again.
//!
//! A signal sent from outside lands wherever the process happens to be,
//! which is almost never between two writes. Here the process aborts itself
//! at a named crash point (`labsync_application::crash`, compiled only in
//! test builds): after CML deleted a lab and before MongoDB was written;
//! between a delete's event and its tombstone; after a refresh fetched and
//! before it wrote; between its events and its records; between its
//! inserts and its updates; after its prunes and before their audit
//! entries. Each iteration sets up CML so that the point is reached with
//! something at stake, checks that the process died there, classifies
//! what MongoDB and CML look like before anything repairs it, then a new
//! process refreshes until a run goes through (a dead run's lease must
//! expire, never stick) and MongoDB must equal CML. Set
//! `LABSYNC_CRASH_SEED` to replay the order.

use std::process::Stdio;

use labsync_application::crash::{CRASH_AT_ENV, CRASH_MARKER, points};
use labsync_application::domain::LabId;
use mongodb::bson::{Document, doc};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use tokio::process::Command;

use crate::helpers::{TestApp, eventually, report, seed};

const ITERATIONS: usize = 70;
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

/// Where a process dies, and what it is doing then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Refresh,
    Delete,
}

const SCENARIOS: [(&str, Op); 7] = [
    (points::DELETE_AFTER_CML, Op::Delete),
    (points::DELETE_BEFORE_TOMBSTONE, Op::Delete),
    (points::REFRESH_AFTER_FETCH, Op::Refresh),
    (points::REFRESH_AFTER_EVENTS, Op::Refresh),
    (points::REFRESH_BETWEEN_BATCHES, Op::Refresh),
    (points::REFRESH_BEFORE_RELEASE, Op::Refresh),
    (points::REFRESH_BEFORE_PRUNE_AUDIT, Op::Refresh),
];

/// The least number of crashes each point must see.
const MIN_PER_POINT: usize = 10;

/// What a refresh has at stake: a lab new in CML, one changed, one gone.
struct Stakes {
    new: LabId,
    changed: LabId,
    changed_title: String,
    gone: LabId,
}

fn stakes(t: &TestApp, records: &[LabId], rng: &mut ChaCha8Rng) -> Stakes {
    let new = t.add_lab("STOPPED");
    let mut pick = records.to_vec();
    pick.shuffle(rng);
    let (changed, gone) = (pick[0], pick[1]);
    let changed_title = format!("changed {}", rng.random::<u32>());
    // Every field but the state changes (the oracle compares them all).
    let n: u32 = rng.random_range(0..30);
    t.sim()
        .update_lab(
            changed.as_str(),
            cml_sim::LabSpec {
                lab_title: Some(changed_title.clone()),
                lab_description: Some(format!("description {n}")),
                lab_notes: Some("notes ".repeat(n as usize)),
                owner_username: Some(["admin", "student"][rng.random_range(0..2)].to_owned()),
                node_count: Some(n),
                link_count: Some(n + 1),
                groups: Some(vec![cml_sim::LabGroup {
                    id: "0b1c62f1-8f5c-4f1e-9a53-3c8f3f0c8a11".into(),
                    permission: "read_write".into(),
                    name: Some(format!("group {n}")),
                }]),
                ..Default::default()
            },
        )
        .unwrap();
    t.sim().remove_lab(gone.as_str());
    Stakes {
        new,
        changed,
        changed_title,
        gone,
    }
}

async fn count(t: &TestApp, collection: &str, filter: Document) -> u64 {
    t.app
        .db
        .collection::<Document>(collection)
        .count_documents(filter)
        .await
        .unwrap()
}

/// The state a refresh that died at `point` must have left, before any
/// repair; panics naming what differs.
async fn assert_refresh_state(t: &TestApp, point: &str, s: &Stakes) {
    let new_recorded = t.record(&s.new).await.is_some();
    let changed_written = t
        .record(&s.changed)
        .await
        .is_some_and(|r| r.snapshot.title == s.changed_title);
    let gone_pruned = t.record(&s.gone).await.is_none();
    let new_event = count(
        t,
        "outbox",
        doc! {"lab_id": s.new.as_str(), "kind": "discovered"},
    )
    .await
        > 0;
    let prune_audited = count(
        t,
        "audit",
        doc! {"lab_id": s.gone.as_str(), "outcome": "pruned"},
    )
    .await
        > 0;
    let seen = (
        new_event,
        new_recorded,
        changed_written,
        gone_pruned,
        prune_audited,
    );
    let expected = match point {
        points::REFRESH_AFTER_FETCH => (false, false, false, false, false),
        points::REFRESH_AFTER_EVENTS => (true, false, false, false, false),
        points::REFRESH_BETWEEN_BATCHES => (true, true, false, false, false),
        points::REFRESH_BEFORE_RELEASE | points::REFRESH_BEFORE_PRUNE_AUDIT => {
            (true, true, true, true, false)
        }
        other => unreachable!("{other}"),
    };
    assert_eq!(
        seen, expected,
        "{point}: (event of the new lab, new lab recorded, change written, gone lab pruned, prune audited)"
    );
}

/// Runs `labsync` until it aborts at `point`; panics if it died elsewhere
/// or finished.
pub(crate) async fn crash_at(t: &TestApp, point: &str, args: &[&str]) {
    let out = labsync(t, args)
        .env(CRASH_AT_ENV, point)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code().is_none() && stderr.contains(&format!("{CRASH_MARKER}{point}")),
        "{args:?} did not die at {point}: {:?}\n{stderr}",
        out.status
    );
}

#[tokio::test]
async fn a_process_that_dies_at_any_named_step_loses_and_resurrects_nothing() {
    let seed = seed("LABSYNC_CRASH_SEED", DEFAULT_SEED);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let t = TestApp::spawn_with(1, &[("LABSYNC__REFRESH__LEASE_TTL_SECS", "1")]).await;
    t.refresh().await;
    let mut order: Vec<usize> = (0..ITERATIONS).map(|i| i % SCENARIOS.len()).collect();
    order.shuffle(&mut rng);
    let mut landed = [0usize; SCENARIOS.len()];
    let (mut leases_expired, mut diff) = (0, crate::helpers::Diff::default());
    for (i, &n) in order.iter().enumerate() {
        let (point, op) = SCENARIOS[n];
        let records: Vec<LabId> = t.records().await.iter().map(|r| r.lab_id).collect();
        match op {
            Op::Delete => {
                let victim = t.add_lab("DEFINED_ON_CORE");
                t.refresh().await;
                crash_at(
                    &t,
                    point,
                    &["delete-lab", "--worker", "cml-1", "--lab", victim.as_str()],
                )
                .await;
                // CML acted; MongoDB does not know yet.
                assert!(
                    t.sim().lab(victim.as_str()).is_none(),
                    "{point}: gone in CML"
                );
                assert!(
                    t.record(&victim).await.is_some(),
                    "{point}: record still live"
                );
                let events = count(
                    &t,
                    "outbox",
                    doc! {"lab_id": victim.as_str(), "kind": "deleted"},
                )
                .await;
                assert_eq!(
                    events,
                    u64::from(point == points::DELETE_BEFORE_TOMBSTONE),
                    "{point}: the delete's event"
                );
                let started = count(
                    &t,
                    "audit",
                    doc! {"lab_id": victim.as_str(), "outcome": "started"},
                )
                .await;
                assert_eq!(started, 1, "{point}: who asked is on record");
                if restart_and_refresh(&t).await > 0 {
                    leases_expired += 1;
                }
                assert!(t.record(&victim).await.is_none(), "{point}: repaired");
            }
            Op::Refresh => {
                let s = stakes(&t, &records, &mut rng);
                let deliverable = || {
                    count(
                        &t,
                        "outbox",
                        doc! {"lab_id": {"$in": [s.new.as_str(), s.changed.as_str(), s.gone.as_str()]}, "status": {"$ne": "staged"}},
                    )
                };
                let before = deliverable().await;
                crash_at(&t, point, &["refresh", "--worker", "cml-1"]).await;
                assert_refresh_state(&t, point, &s).await;
                if point != points::REFRESH_BEFORE_PRUNE_AUDIT {
                    // Nothing is deliverable before the change it describes.
                    assert_eq!(
                        deliverable().await,
                        before,
                        "{point}: an event released before its change"
                    );
                }
                if restart_and_refresh(&t).await > 0 {
                    leases_expired += 1;
                }
                // Each change announced once, deliverable; nothing left staged.
                let announced = |lab: LabId, kind: &'static str, extra: Document| {
                    let mut filter =
                        doc! {"lab_id": lab.as_str(), "kind": kind, "status": {"$ne": "staged"}};
                    filter.extend(extra);
                    count(&t, "outbox", filter)
                };
                assert_eq!(
                    announced(s.new, "discovered", doc! {}).await,
                    1,
                    "{point}: the new lab"
                );
                assert_eq!(
                    announced(
                        s.changed,
                        "changed",
                        doc! {"cloudevent.data.changes.new": &s.changed_title}
                    )
                    .await,
                    1,
                    "{point}: the change"
                );
                assert_eq!(
                    announced(s.gone, "pruned", doc! {}).await,
                    1,
                    "{point}: the prune"
                );
                let staged = count(&t, "outbox", doc! {"status": "staged"}).await;
                assert_eq!(staged, 0, "{point}: staged events left after the repair");
            }
        }
        landed[n] += 1;
        diff += t
            .assert_matches_truth(&format!("seed {seed}, iteration {i}: died at {point}"))
            .await;
    }
    for (n, (point, _)) in SCENARIOS.iter().enumerate() {
        assert!(
            landed[n] >= MIN_PER_POINT,
            "only {} crashes at {point}",
            landed[n]
        );
    }
    let per_point: Vec<String> = SCENARIOS
        .iter()
        .zip(landed)
        .map(|((p, _), n)| format!("{p} {n}"))
        .collect();
    report(
        "crash",
        &format!(
            "crash test (seed {seed}): {ITERATIONS} processes died at a named step, each in the state \
             that step must leave ({}); {leases_expired} left a refresh lease that expired on its own \
             (TTL 1 s); after the restarts, {diff}",
            per_point.join(", ")
        ),
    );
}
