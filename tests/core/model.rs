//! Model-based test: a seeded random sequence of operations (labs created,
//! changed and deleted in CML behind labsync's back; deletes through
//! labsync, with and without force; refreshes; crashes of labsync as a
//! process) run against the real system and against a small model of what
//! CML holds and what MongoDB must show. After every step both must agree
//! with the model. `LABSYNC_MODEL_SEED` replays a sequence.

use std::collections::BTreeMap;
use std::process::Stdio;

use labsync_application::domain::LabId;
use labsync_application::{DeleteOutcomeKind, RunStatus};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use crate::crash::{kill_after, labsync, restart_and_refresh};
use crate::helpers::{TestApp, eventually, report, seed};

const STEPS: usize = 200;
const DEFAULT_SEED: u64 = 0x0de1_5eed;
const STATES: [&str; 3] = ["DEFINED_ON_CORE", "STOPPED", "STARTED"];

/// What a lab looks like, to the model: its title and state.
type Lab = (String, String);

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
}

fn cml_labs(t: &TestApp) -> BTreeMap<LabId, Lab> {
    t.sim()
        .labs()
        .into_iter()
        .map(|l| (LabId::parse(&l.id).unwrap(), (l.lab_title, l.state)))
        .collect()
}

async fn mongodb_labs(t: &TestApp) -> BTreeMap<LabId, Lab> {
    t.records()
        .await
        .into_iter()
        .map(|r| {
            let s = r.snapshot;
            (r.lab_id, (s.title, s.state.as_str().to_owned()))
        })
        .collect()
}

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
    for step in 0..STEPS {
        let roll = rng.random_range(0..100);
        let name = match roll {
            0..20 => {
                let state = STATES[rng.random_range(0..3)];
                let id = t.add_lab(state);
                let lab = t.sim().lab(id.as_str()).unwrap();
                model.cml.insert(id, (lab.lab_title, state.to_owned()));
                "create in CML"
            }
            20..35 => {
                let Some((id, _)) = pick(&mut rng, &model.cml) else {
                    continue;
                };
                let id = *id;
                let (title, state) = if rng.random_bool(0.5) {
                    (Some(format!("title {}", rng.random::<u32>())), None)
                } else {
                    (None, Some(STATES[rng.random_range(0..3)].to_owned()))
                };
                let lab = t
                    .sim()
                    .update_lab(
                        id.as_str(),
                        cml_sim::LabSpec {
                            lab_title: title,
                            state,
                            ..Default::default()
                        },
                    )
                    .unwrap();
                model.cml.insert(id, (lab.lab_title, lab.state));
                "change in CML"
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
                    Some((_, state)) if force || state == "DEFINED_ON_CORE" => {
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
                // A crash: labsync killed mid-refresh or mid-delete, then
                // started again; its effect on CML is whatever CML shows.
                let base = t.sim().stats().total;
                let mut child = if rng.random_bool(0.5) {
                    labsync(&t, &["refresh", "--worker", "cml-1"])
                } else {
                    let Some((id, _)) = pick(&mut rng, &model.recorded) else {
                        continue;
                    };
                    labsync(
                        &t,
                        &[
                            "delete-lab",
                            "--worker",
                            "cml-1",
                            "--lab",
                            id.as_str(),
                            "--force",
                        ],
                    )
                }
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
                t.faults(json!({"latency_ms": {"all": 2}}));
                kill_after(&t, &mut child, base, rng.random_range(1..=4)).await;
                t.faults(json!({}));
                // A forced delete killed after its stop leaves CML mid-way;
                // the model reads CML once it has settled.
                eventually("CML's transitions to settle", || async {
                    t.sim().labs().iter().all(cml_sim::Lab::converged)
                })
                .await;
                restart_and_refresh(&t).await;
                model.cml = cml_labs(&t);
                model.refreshed();
                removed_since_refresh = 0;
                "crash and restart"
            }
        };
        *n.steps.entry(name).or_default() += 1;
        // The check: CML and MongoDB both as the model says.
        assert_eq!(
            cml_labs(&t),
            model.cml,
            "seed {seed}, step {step} ({name}): CML"
        );
        let seen = mongodb_labs(&t).await;
        if seen != model.recorded {
            let lost: Vec<_> = model
                .recorded
                .keys()
                .filter(|k| !seen.contains_key(k))
                .collect();
            let extra: Vec<_> = seen
                .keys()
                .filter(|k| !model.recorded.contains_key(k))
                .collect();
            panic!(
                "seed {seed}, step {step} ({name}): MongoDB differs from the model: \
                 lost {lost:?}, resurrected or unknown {extra:?}\nmodel {:?}\nseen {seen:?}",
                model.recorded
            );
        }
        n.checked += seen.len();
    }
    let steps: Vec<String> = n.steps.iter().map(|(k, v)| format!("{v} {k}")).collect();
    report(
        "model",
        &format!(
            "model-based test (seed {seed}): {STEPS} steps ({}), {} records checked against the model: 0 lost, 0 resurrected",
            steps.join(", "),
            n.checked
        ),
    );
}
