//! Model-based test: a seeded random sequence of operations (labs created,
//! changed in every field and deleted in CML behind labsync's back; deletes
//! through labsync, with and without force; refreshes; labsync as a process
//! dying at a named step) run against the real system and against a small
//! model of what CML holds and what MongoDB must show, field by field.
//! After every step, a crash included, both must agree with the model: the
//! model predicts what a death at each step leaves, it does not copy it.
//! Every step does something. `LABSYNC_MODEL_SEED` replays a sequence.

use std::collections::BTreeMap;

use futures::TryStreamExt;
use labsync_application::crash::points;
use labsync_application::domain::LabId;
use labsync_application::{DeleteOutcomeKind, RunStatus};
use mongodb::bson::{Document, doc};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::crash::{crash_at, restart_and_refresh};
use crate::helpers::{Fields, TestApp, fields_in_cml, fields_in_mongodb, report, seed};

const STEPS: usize = 200;
const DEFAULT_SEED: u64 = 0x0de1_5eed;
const STATES: [&str; 3] = ["DEFINED_ON_CORE", "STOPPED", "STARTED"];

/// What a lab looks like, to the model: every field labsync stores.
type Lab = Fields;

/// The model: CML's labs, and the records MongoDB must hold.
#[derive(Debug, Default)]
struct Model {
    cml: BTreeMap<LabId, Lab>,
    recorded: BTreeMap<LabId, Lab>,
}

impl Model {
    /// A refresh makes the records what CML holds (the changes between
    /// refreshes stay far below the mass-prune guard).
    fn refreshed(&mut self) {
        self.recorded = self.cml.clone();
    }
}

#[derive(Debug, Default)]
struct Counts {
    steps: BTreeMap<&'static str, usize>,
    checked: usize,
    lost: usize,
    resurrected: usize,
    stale: usize,
}

/// CML and MongoDB both as the model says; returns how many records were
/// compared, panics naming every difference.
async fn check(t: &TestApp, model: &Model, seed: u64, step: usize, name: &str) -> usize {
    assert_eq!(
        cml_labs(t),
        model.cml,
        "seed {seed}, step {step} ({name}): CML"
    );
    let seen = mongodb_labs(t).await;
    let lost: Vec<_> = model
        .recorded
        .keys()
        .filter(|k| !seen.contains_key(k))
        .collect();
    let extra: Vec<_> = seen
        .keys()
        .filter(|k| !model.recorded.contains_key(k))
        .collect();
    let stale: Vec<_> = seen
        .iter()
        .filter(|(k, v)| model.recorded.get(k).is_some_and(|m| m != *v))
        .map(|(k, _)| k)
        .collect();
    assert!(
        lost.is_empty() && extra.is_empty() && stale.is_empty(),
        "seed {seed}, step {step} ({name}): MongoDB differs from the model: \
         lost {lost:?}, resurrected or unknown {extra:?}, stale {stale:?}"
    );
    seen.len()
}

fn cml_labs(t: &TestApp) -> BTreeMap<LabId, Lab> {
    t.sim()
        .labs()
        .iter()
        .map(|l| (LabId::parse(&l.id).unwrap(), fields_in_cml(l)))
        .collect()
}

/// The live records, read from the raw collection.
async fn mongodb_labs(t: &TestApp) -> BTreeMap<LabId, Lab> {
    let docs: Vec<Document> = t
        .app
        .db
        .collection::<Document>("labs")
        .find(doc! {"worker_id": "cml-1", "tombstone": {"$exists": false}})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    docs.iter()
        .map(|d| {
            (
                LabId::parse(d.get_str("lab_id").unwrap()).unwrap(),
                fields_in_mongodb(d),
            )
        })
        .collect()
}

/// A random UUID4, from the test's own generator.
fn uuid4(rng: &mut ChaCha8Rng) -> String {
    let hex = format!("{:032x}", rng.random::<u128>());
    let variant = ["8", "9", "a", "b"][rng.random_range(0..4)];
    format!(
        "{}-{}-4{}-{variant}{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[13..16],
        &hex[17..20],
        &hex[20..32]
    )
}

/// A change of every field a lab has (the state too, at once).
fn every_field(rng: &mut ChaCha8Rng) -> cml_sim::LabSpec {
    let n: u32 = rng.random_range(0..40);
    cml_sim::LabSpec {
        lab_title: Some(format!("title {}", rng.random::<u32>())),
        lab_description: Some(format!("description {}", rng.random::<u32>())),
        lab_notes: Some("notes ".repeat(rng.random_range(0..50))),
        owner_username: Some(["admin", "student"][rng.random_range(0..2)].to_owned()),
        state: Some(STATES[rng.random_range(0..3)].to_owned()),
        node_count: Some(n),
        link_count: Some(n + rng.random_range(0..5)),
        groups: Some(if rng.random_bool(0.5) {
            vec![]
        } else {
            vec![cml_sim::LabGroup {
                id: "0b1c62f1-8f5c-4f1e-9a53-3c8f3f0c8a11".into(),
                permission: ["read_only", "read_write"][rng.random_range(0..2)].into(),
                name: Some("Students".into()),
            }]
        }),
        ..Default::default()
    }
}

/// Crash points of a refresh, and of a delete, with what the model says a
/// death there leaves.
const REFRESH_POINTS: [&str; 5] = [
    points::REFRESH_AFTER_FETCH,
    points::REFRESH_AFTER_EVENTS,
    points::REFRESH_BETWEEN_BATCHES,
    points::REFRESH_BEFORE_RELEASE,
    points::REFRESH_BEFORE_PRUNE_AUDIT,
];
const DELETE_POINTS: [&str; 2] = [points::DELETE_AFTER_CML, points::DELETE_BEFORE_TOMBSTONE];

fn pick<'a>(rng: &mut ChaCha8Rng, map: &'a BTreeMap<LabId, Lab>) -> Option<(&'a LabId, &'a Lab)> {
    if map.is_empty() {
        return None;
    }
    map.iter().nth(rng.random_range(0..map.len()))
}

#[tokio::test]
async fn a_random_sequence_of_operations_keeps_labsync_true_to_a_model_of_cml() {
    let seed = seed("LABSYNC_MODEL_SEED", DEFAULT_SEED);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let t = TestApp::spawn_with(1, &[("LABSYNC__REFRESH__LEASE_TTL_SECS", "1")]).await;
    let mut model = Model {
        cml: cml_labs(&t),
        ..Model::default()
    };
    let mut n = Counts::default();
    // Labs removed behind labsync's back since the last refresh: kept well
    // under the share that would hold a prune.
    let mut removed_since_refresh = 0;
    let mut step = 0;
    while step < STEPS {
        let roll = rng.random_range(0..100);
        // A roll that finds nothing to act on is rolled again: every
        // counted step does something.
        let name = match roll {
            0..20 => {
                let state = STATES[rng.random_range(0..3)];
                // The id comes from the test's seed, not the simulator's
                // generator (which request timing also draws from), so that
                // a seed replays the same sequence.
                let lab = t
                    .sim()
                    .add_lab(cml_sim::LabSpec {
                        id: Some(uuid4(&mut rng)),
                        state: Some(state.to_owned()),
                        lab_title: Some(format!("{state} lab")),
                        ..Default::default()
                    })
                    .unwrap();
                let id = LabId::parse(&lab.id).unwrap();
                model.cml.insert(id, fields_in_cml(&lab));
                "create in CML"
            }
            20..35 => {
                let Some((id, _)) = pick(&mut rng, &model.cml) else {
                    continue;
                };
                let id = *id;
                let lab = t
                    .sim()
                    .update_lab(id.as_str(), every_field(&mut rng))
                    .unwrap();
                model.cml.insert(id, fields_in_cml(&lab));
                "change every field in CML"
            }
            35..45 => {
                if removed_since_refresh * 4 >= model.recorded.len() {
                    continue;
                }
                let Some((id, _)) = pick(&mut rng, &model.cml) else {
                    continue;
                };
                let id = *id;
                assert!(t.sim().remove_lab(id.as_str()));
                model.cml.remove(&id);
                removed_since_refresh += 1;
                "delete in CML"
            }
            45..65 => {
                let Some((id, _)) = pick(&mut rng, &model.recorded) else {
                    continue;
                };
                let id = *id;
                let force = rng.random_bool(0.3);
                let out = t.delete(&id, force).await.expect("delete runs");
                match model.cml.get(&id) {
                    None => {
                        assert_eq!(out.kind, DeleteOutcomeKind::AlreadyAbsent, "step {step}");
                        model.recorded.remove(&id);
                    }
                    Some(lab) if force || lab["state"] == "DEFINED_ON_CORE" => {
                        assert_eq!(out.kind, DeleteOutcomeKind::Deleted, "step {step}");
                        model.cml.remove(&id);
                        model.recorded.remove(&id);
                    }
                    Some(_) => {
                        assert!(
                            matches!(out.kind, DeleteOutcomeKind::RefusedRunning { .. }),
                            "step {step}: {out:?}"
                        );
                    }
                }
                if force { "force delete" } else { "delete" }
            }
            65..90 => {
                let r = t.refresh().await;
                assert_eq!(
                    (r.status, r.held),
                    (RunStatus::Succeeded, 0),
                    "step {step}: {r:?}"
                );
                model.refreshed();
                removed_since_refresh = 0;
                "refresh"
            }
            _ => {
                // labsync dies at a named step of a refresh or of a forced
                // delete; the model predicts what that leaves.
                let delete = rng.random_bool(0.5);
                let (point, args): (&str, Vec<String>) = if delete {
                    let Some((id, _)) = pick(&mut rng, &model.recorded) else {
                        continue;
                    };
                    let id = *id;
                    if !model.cml.contains_key(&id) {
                        continue; // gone already: no CML step to die after
                    }
                    let point = DELETE_POINTS[rng.random_range(0..DELETE_POINTS.len())];
                    // CML deletes it; the record stays until the repair.
                    model.cml.remove(&id);
                    let args = [
                        "delete-lab",
                        "--worker",
                        "cml-1",
                        "--lab",
                        id.as_str(),
                        "--force",
                    ];
                    (point, args.iter().map(|a| (*a).to_owned()).collect())
                } else {
                    let point = REFRESH_POINTS[rng.random_range(0..REFRESH_POINTS.len())];
                    // Only a run with something to write reaches the write
                    // steps, and only one with a prune the prunes' audit.
                    let writes = model.cml != model.recorded;
                    let prunes = model.recorded.keys().any(|k| !model.cml.contains_key(k));
                    let reachable = match point {
                        points::REFRESH_AFTER_FETCH => true,
                        points::REFRESH_BEFORE_PRUNE_AUDIT => prunes,
                        _ => writes,
                    };
                    if !reachable {
                        continue;
                    }
                    match point {
                        // Creates written, updates and prunes not.
                        points::REFRESH_BETWEEN_BATCHES => {
                            for (id, lab) in &model.cml {
                                model.recorded.entry(*id).or_insert_with(|| lab.clone());
                            }
                        }
                        // Every record written.
                        points::REFRESH_BEFORE_RELEASE | points::REFRESH_BEFORE_PRUNE_AUDIT => {
                            model.refreshed();
                        }
                        _ => {}
                    }
                    let args = ["refresh", "--worker", "cml-1"];
                    (point, args.iter().map(|a| (*a).to_owned()).collect())
                };
                crash_at(
                    &t,
                    point,
                    &args.iter().map(String::as_str).collect::<Vec<_>>(),
                )
                .await;
                // The state the death left, checked before any repair.
                check(&t, &model, seed, step, point).await;
                restart_and_refresh(&t).await;
                model.refreshed();
                removed_since_refresh = 0;
                if delete {
                    "die mid-delete and restart"
                } else {
                    "die mid-refresh and restart"
                }
            }
        };
        *n.steps.entry(name).or_default() += 1;
        n.checked += check(&t, &model, seed, step, name).await;
        step += 1;
    }
    let steps: Vec<String> = n.steps.iter().map(|(k, v)| format!("{v} {k}")).collect();
    report(
        "model",
        &format!(
            "model-based test (seed {seed}): {STEPS} steps, each doing something ({}); {} records compared field by field with the model after every step: {} lost, {} resurrected, {} stale",
            steps.join(", "),
            n.checked,
            n.lost,
            n.resurrected,
            n.stale
        ),
    );
}
