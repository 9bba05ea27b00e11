//! The ways an adversarial review broke the delete and refresh promises
//! (issue "Trust"), each as the test that would have caught it: a non-admin
//! CML account, a proxy's 404, huge lab notes, a lease outlived, a password
//! sent to a changed URL, failures that look healthy, unbounded input.

use labsync::wiring::App;
use labsync_application::domain::Actor;
use labsync_application::domain::BaseUrl;
use labsync_application::domain::WorkerChanges;
use labsync_application::domain::{LabId, LabState, TlsSettings, Worker, WorkerId};
use labsync_application::ports::{RecordChanges, RecordUpdate, Tombstone};
use labsync_application::{
    AppError, DeleteOutcomeKind, EventData, LabEvent, LabEventKind, RefreshOptions, RunStatus,
    SyncState,
};
use labsync_infrastructure::configuration::Settings;
use mongodb::bson::{Document, doc};
use secrecy::SecretString;
use serde_json::json;

use crate::helpers::{ADMIN_PASSWORD, SEEDED_LABS, TestApp, eventually, ids};

const STUDENT_PASSWORD: &str = "cml-sim-student";

/// What the inventory says about each lab, history aside (a refused
/// delete adds to it).
async fn inventory(t: &TestApp) -> Vec<(LabId, labsync_application::domain::LabSnapshot)> {
    t.records()
        .await
        .into_iter()
        .map(|r| (r.lab_id, r.snapshot))
        .collect()
}

/// Switches cml-1's credentials to CML's non-admin `student` account.
async fn use_student_account(t: &TestApp) {
    t.app
        .inventory
        .update(
            &t.worker_id(),
            WorkerChanges {
                username: Some("student".into()),
                ..WorkerChanges::default()
            },
            Some(SecretString::from(STUDENT_PASSWORD)),
            &Actor::api("admin"),
        )
        .await
        .expect("credentials changed");
}

/// A lab the student can neither own nor see (an admin's, not shared).
fn hidden_from_student(t: &TestApp) -> LabId {
    let lab = t
        .sim()
        .labs()
        .into_iter()
        .find(|l| l.owner_username == "admin" && l.groups.is_empty())
        .expect("an admin's unshared lab in the seed");
    LabId::parse(&lab.id).unwrap()
}

#[tokio::test]
async fn a_non_admin_account_never_prunes_and_its_deletes_are_refused() {
    let t = TestApp::spawn().await;
    t.refresh().await;
    let before = inventory(&t).await;
    use_student_account(&t).await;

    let r = t.refresh().await;
    assert_eq!(r.status, RunStatus::Failed, "{r:?}");
    let error = r.error.clone().unwrap();
    assert!(
        error.contains("not an administrator") && error.contains("student"),
        "{error}"
    );
    assert_eq!((r.pruned, r.created, r.updated), (0, 0, 0));
    assert_eq!(
        inventory(&t).await,
        before,
        "nothing pruned, nothing written"
    );
    let overview = t.app.inventory.worker(&t.worker_id()).await.unwrap();
    assert_eq!(
        overview.sync_state,
        SyncState::Failing,
        "the worker shows it"
    );

    // A delete would have answered "already absent" for a lab the student
    // cannot see, and hidden it behind a tombstone for a week.
    let hidden = hidden_from_student(&t);
    for force in [false, true] {
        let out = t.delete(&hidden, force).await.unwrap();
        assert!(
            matches!(&out.kind, DeleteOutcomeKind::AccountNotAdmin { username } if username == "student"),
            "{out:?}"
        );
        assert!(!out.lab_gone);
        assert!(
            out.message.contains("not an administrator"),
            "{}",
            out.message
        );
    }
    assert!(t.sim().lab(hidden.as_str()).is_some(), "still in CML");
    assert!(
        t.record(&hidden).await.is_some(),
        "still listed, no tombstone"
    );
}

#[tokio::test]
async fn an_account_that_lost_admin_rights_is_caught_at_the_next_login_though_its_token_lives() {
    let t = TestApp::spawn().await;
    t.refresh().await;
    let before = inventory(&t).await;
    let hidden = {
        // A lab the admin account cannot see once it is no admin: the
        // student's own, unshared.
        let lab = t
            .sim()
            .labs()
            .into_iter()
            .find(|l| l.owner_username == "student" && l.groups.is_empty())
            .expect("a student's unshared lab in the seed");
        LabId::parse(&lab.id).unwrap()
    };
    // The session from the refresh above still says admin.
    t.sim().set_admin("admin", false).unwrap();
    let out = t.delete(&hidden, false).await.unwrap();
    assert!(
        matches!(out.kind, DeleteOutcomeKind::AccountNotAdmin { .. }),
        "a 404 is confirmed by a fresh login before it counts: {out:?}"
    );
    assert!(t.sim().lab(hidden.as_str()).is_some());
    assert!(t.record(&hidden).await.is_some());

    let r = t.refresh().await;
    assert_eq!(r.status, RunStatus::Failed, "{r:?}");
    assert_eq!(inventory(&t).await, before);

    t.sim().set_admin("admin", true).unwrap();
    let r = t.refresh().await;
    assert_eq!((r.status, r.pruned), (RunStatus::Succeeded, 0), "{r:?}");
    t.assert_matches_truth("admin rights back").await;
}

#[tokio::test]
async fn a_404_from_a_proxy_is_never_a_deleted_lab() {
    let t = TestApp::spawn().await;
    t.refresh().await;
    let before = inventory(&t).await;
    let lab = before[0].0;

    for endpoint in ["lab_state", "delete_lab"] {
        t.faults(json!({"proxy_404": [endpoint]}));
        let out = t.delete(&lab, true).await.unwrap();
        assert!(
            matches!(out.kind, DeleteOutcomeKind::CmlUnreachable { ref error } if error.contains("404")),
            "{endpoint}: {out:?}"
        );
        assert!(!out.lab_gone && out.kind.is_retryable());
        assert!(t.sim().lab(lab.as_str()).is_some(), "{endpoint}");
        assert!(t.record(&lab).await.is_some(), "{endpoint}: no tombstone");
    }

    // Every detail request answered by the proxy: failures, never prunes.
    t.faults(json!({"proxy_404": ["lab_details"]}));
    let r = t.refresh().await;
    assert_eq!(
        (r.pruned, r.held, r.failed),
        (0, 0, SEEDED_LABS as u64),
        "{r:?}"
    );
    // The list itself: a failed run.
    t.faults(json!({"proxy_404": ["list_labs"]}));
    let r = t.refresh().await;
    assert_eq!(r.status, RunStatus::Failed, "{r:?}");
    assert!(r.error.as_deref().unwrap().contains("404"), "{r:?}");
    assert_eq!(inventory(&t).await, before);
}

#[tokio::test]
async fn a_lab_deleted_between_the_state_check_and_the_delete_is_already_absent() {
    // CML's own 404 on DELETE: the lab went in between. Without the arm
    // that reads it as "already gone", this delete fails and its record
    // outlives the lab.
    let t = TestApp::spawn().await;
    let lab = t.add_lab("DEFINED_ON_CORE");
    t.refresh().await;
    t.faults(json!({"latency_ms": {"delete_lab": 400}}));
    let services = t.services().clone();
    let worker = t.worker_id();
    let delete = tokio::spawn(async move {
        labsync_application::DeleteLab {
            worker_id: worker,
            lab_id: lab,
            force: false,
            requested_by: Actor::api("operator"),
            owned_by: None,
        }
        .execute(&services)
        .await
    });
    eventually("the DELETE to reach CML", || async {
        t.cml_requests(cml_sim::Endpoint::DeleteLab) > 0
    })
    .await;
    assert!(
        t.sim().remove_lab(lab.as_str()),
        "removed while the DELETE waits"
    );
    let out = delete.await.unwrap().unwrap();
    assert_eq!(out.kind, DeleteOutcomeKind::AlreadyAbsent, "{out:?}");
    assert!(out.lab_gone && out.record_was_present);
    assert!(t.record(&lab).await.is_none());
}

#[tokio::test]
async fn one_lab_with_huge_notes_changed_again_and_again_never_stops_its_workers_refresh() {
    let t = TestApp::spawn().await;
    let big = t.add_lab("DEFINED_ON_CORE");
    let doomed = t.add_lab("DEFINED_ON_CORE");
    t.refresh().await;
    for round in 0..4u8 {
        let notes = format!("{round}").repeat(1_900_000);
        t.sim()
            .update_lab(
                big.as_str(),
                cml_sim::LabSpec {
                    lab_notes: Some(notes),
                    ..cml_sim::LabSpec::default()
                },
            )
            .unwrap();
        let r = t.refresh().await;
        assert_eq!(
            (r.status, r.updated, r.failed),
            (RunStatus::Succeeded, 1, 0),
            "round {round}: {r:?}"
        );
    }
    // The history keeps excerpts: the record stays far below 16 MiB.
    let raw = t
        .app
        .db
        .collection::<Document>("labs")
        .find_one(doc! {"lab_id": big.as_str()})
        .await
        .unwrap()
        .unwrap();
    let size = mongodb::bson::to_vec(&raw).unwrap().len();
    assert!(size < 2_200_000, "record of {size} bytes");
    // A lab deleted in CML afterwards is still pruned.
    t.sim().remove_lab(doomed.as_str());
    let r = t.refresh().await;
    assert_eq!((r.status, r.pruned), (RunStatus::Succeeded, 1), "{r:?}");
    t.assert_matches_truth("after four huge changes").await;
}

#[tokio::test]
async fn a_lab_too_large_for_a_mongodb_document_is_that_labs_failure_and_the_rest_applies() {
    // The test server takes documents over 16 MiB; a real mongod does not,
    // so labsync must refuse them itself. A 64 MiB read limit lets the lab
    // through the CML client.
    let t = TestApp::spawn_with(1, &[("LABSYNC__CML__MAX_RESPONSE_BYTES", "67108864")]).await;
    t.refresh().await;
    let huge = t.add_lab("DEFINED_ON_CORE");
    t.sim()
        .update_lab(
            huge.as_str(),
            cml_sim::LabSpec {
                lab_notes: Some("n".repeat(17 * 1024 * 1024)),
                ..cml_sim::LabSpec::default()
            },
        )
        .unwrap();
    let fresh = t.add_lab("STOPPED");
    let doomed = t.records().await[0].lab_id;
    t.sim().remove_lab(doomed.as_str());
    let r = t.refresh().await;
    assert_eq!(r.status, RunStatus::Succeeded, "{r:?}");
    assert_eq!((r.created, r.pruned, r.failed), (1, 1, 1), "{r:?}");
    assert_eq!(r.failures[0].lab_id, huge);
    assert!(r.failures[0].error.contains("MongoDB document"), "{r:?}");
    assert!(t.record(&huge).await.is_none());
    assert!(t.record(&fresh).await.is_some());
    // Nothing announces the change that was not made.
    let events = t
        .app
        .db
        .collection::<Document>("outbox")
        .count_documents(doc! {"lab_id": huge.as_str()})
        .await
        .unwrap();
    assert_eq!(events, 0);
}

#[tokio::test]
async fn an_answer_larger_than_the_read_limit_is_that_labs_failure() {
    let t = TestApp::spawn_with(1, &[("LABSYNC__CML__MAX_RESPONSE_BYTES", "16384")]).await;
    let big = t.add_lab("DEFINED_ON_CORE");
    t.sim()
        .update_lab(
            big.as_str(),
            cml_sim::LabSpec {
                lab_notes: Some("x".repeat(64 * 1024)),
                ..cml_sim::LabSpec::default()
            },
        )
        .unwrap();
    let r = t.refresh().await;
    assert_eq!((r.status, r.failed), (RunStatus::Succeeded, 1), "{r:?}");
    assert!(
        r.failures[0].error.contains("cml.max_response_bytes"),
        "{r:?}"
    );
    assert_eq!(r.created, SEEDED_LABS as u64);
}

#[tokio::test]
async fn updates_of_many_large_labs_go_in_commands_below_the_16_mib_limit_and_all_land() {
    let t = TestApp::spawn().await;
    let big: Vec<LabId> = (0..40).map(|_| t.add_lab("DEFINED_ON_CORE")).collect();
    t.refresh().await;
    for id in &big {
        t.sim()
            .update_lab(
                id.as_str(),
                cml_sim::LabSpec {
                    lab_notes: Some("z".repeat(500_000)),
                    ..cml_sim::LabSpec::default()
                },
            )
            .unwrap();
    }
    // 40 x 500 KB is 20 MB of changes: more than one command may carry.
    let r = t.refresh().await;
    assert_eq!(
        (r.status, r.updated, r.failed),
        (RunStatus::Succeeded, 40, 0),
        "{r:?}"
    );
    t.assert_matches_truth("after 20 MB of changes").await;
}

#[tokio::test]
async fn a_refresh_that_cannot_start_is_a_stored_failed_run_the_worker_shows() {
    let t = TestApp::spawn().await;
    t.refresh().await;
    // The same database, another encryption key: a rotated or mistyped key.
    let mut overrides: Vec<(&str, &str)> = t
        .overrides
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    overrides.retain(|(k, _)| *k != "LABSYNC__SECURITY__ENCRYPTION_KEY");
    overrides.push((
        "LABSYNC__SECURITY__ENCRYPTION_KEY",
        "CAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAg=",
    ));
    let other = App::build(&Settings::from_overrides(&overrides).unwrap())
        .await
        .unwrap();
    let r = labsync_application::RefreshWorkerLabs::new(other.services.clone())
        .execute(&t.worker_id(), &Actor::Schedule, RefreshOptions::default())
        .await
        .unwrap();
    assert_eq!(r.status, RunStatus::Failed);
    assert!(
        r.error.as_deref().unwrap().contains("could not start"),
        "{r:?}"
    );
    let runs = t
        .app
        .inventory
        .runs(labsync_application::ports::RunQuery::newest(
            Some(&t.worker_id()),
            10,
        ))
        .await
        .unwrap();
    assert_eq!(runs[0].run_id, r.run_id, "stored");
    let overview = t.app.inventory.worker(&t.worker_id()).await.unwrap();
    assert_eq!(overview.sync_state, SyncState::Failing, "not `synced`");
    let metrics = other.metrics.render();
    assert!(
        metrics.contains("status=\"failed\""),
        "counted in the metrics: {metrics:.2000}"
    );
}

#[tokio::test]
async fn a_changed_url_or_user_needs_the_password_again_and_a_copied_ciphertext_does_not_open() {
    let t = TestApp::spawn().await;
    let inventory = &t.app.inventory;
    for changes in [
        WorkerChanges {
            base_url: Some(BaseUrl::parse("https://elsewhere.example.net").unwrap()),
            ..WorkerChanges::default()
        },
        WorkerChanges {
            username: Some("student".into()),
            ..WorkerChanges::default()
        },
        // Loosening how the password is protected on the way exposes it
        // just as well.
        WorkerChanges {
            insecure: Some(true),
            ..WorkerChanges::default()
        },
        WorkerChanges {
            ca_cert_pem: Some(Some(
                "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
            )),
            ..WorkerChanges::default()
        },
    ] {
        let err = inventory
            .update(&t.worker_id(), changes, None, &Actor::api("admin"))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, AppError::Invalid(m) if m.contains("password")),
            "{err}"
        );
    }
    // The repository refuses it too, whoever calls it.
    let access = t
        .services()
        .workers
        .get(&t.worker_id())
        .await
        .unwrap()
        .unwrap();
    let mut moved = access.worker.clone();
    moved.base_url = BaseUrl::parse("https://elsewhere.example.net").unwrap();
    assert!(
        t.services()
            .workers
            .update(&access.worker, &moved, None)
            .await
            .is_err()
    );
    assert_eq!(
        t.services()
            .workers
            .get(&t.worker_id())
            .await
            .unwrap()
            .unwrap()
            .worker
            .base_url,
        access.worker.base_url
    );

    // A ciphertext copied into another worker's document does not open.
    let workers = t.app.db.collection::<Document>("workers");
    let mut copy = workers
        .find_one(doc! {"_id": "cml-1"})
        .await
        .unwrap()
        .unwrap();
    copy.insert("_id", "cml-copy");
    copy.insert("base_url", "https://elsewhere.example.net");
    workers.insert_one(copy).await.unwrap();
    let err = t
        .services()
        .workers
        .get(&WorkerId::parse("cml-copy").unwrap())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cannot decrypt"), "{err}");
}

#[tokio::test]
async fn a_plain_http_worker_needs_an_explicit_yes_and_is_shown_with_a_warning() {
    let t = TestApp::spawn().await;
    let worker = |id: &str, allow_http: bool| Worker {
        id: WorkerId::parse(id).unwrap(),
        name: id.into(),
        base_url: BaseUrl::parse(&t.sim().base_url()).expect("the simulator's URL"),
        username: "admin".into(),
        tls: TlsSettings {
            allow_http,
            ..TlsSettings::default()
        },
        enabled: true,
        lab_tiles: false,
    };
    let err = t
        .app
        .inventory
        .register(
            worker("plain", false),
            SecretString::from(ADMIN_PASSWORD),
            &Actor::api("test"),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, AppError::Invalid(m) if m.contains("allow-http")),
        "{err}"
    );
    t.app
        .inventory
        .register(
            worker("plain", true),
            SecretString::from(ADMIN_PASSWORD),
            &Actor::api("test"),
        )
        .await
        .unwrap();
    let o = t.cli(&["workers", "list"]).await;
    let text = crate::helpers::output_text(&o);
    assert!(text.contains("plain http"), "{text}");
    // Turning the yes off again is refused while the URL is http://.
    let err = t
        .app
        .inventory
        .update(
            &WorkerId::parse("plain").unwrap(),
            WorkerChanges {
                allow_http: Some(false),
                ..WorkerChanges::default()
            },
            None,
            &Actor::api("test"),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, AppError::Invalid(_)));
}

#[tokio::test]
async fn removing_a_worker_while_it_refreshes_leaves_nothing_behind_to_resurrect() {
    let t = TestApp::spawn().await;
    t.faults(json!({"latency_ms": {"lab_details": 150}}));
    let run = t.spawn_refresh();
    eventually("the refresh to fetch details", || async {
        t.cml_requests(cml_sim::Endpoint::LabDetails) > 0
    })
    .await;
    let removed = t
        .app
        .inventory
        .remove(&t.worker_id(), &Actor::api("admin"))
        .await
        .unwrap();
    assert_eq!(removed, 0, "the run had written nothing yet");
    let r = run.await.unwrap();
    assert_eq!(r.status, RunStatus::Failed, "{r:?}");
    assert!(r.error.as_deref().unwrap().contains("lease"), "{r:?}");
    let left = t
        .app
        .db
        .collection::<Document>("labs")
        .count_documents(doc! {"worker_id": "cml-1"})
        .await
        .unwrap();
    assert_eq!(left, 0, "nothing written back after the removal");
}

#[tokio::test]
async fn a_stale_run_cannot_update_or_prune_what_a_newer_run_wrote() {
    // The database's own guard, below any check in the planner: a record
    // written under fence 20 is neither overwritten nor pruned by a run
    // holding fence 10.
    let t = TestApp::spawn().await;
    let labs = &t.services().labs;
    let worker = t.worker_id();
    t.refresh().await;
    let mut newer = t.records().await.remove(0);
    let id = newer.lab_id;
    let mut snapshot = newer.snapshot.clone();
    snapshot.title = "written by the newer run".into();
    newer.apply_change(snapshot, chrono::Utc::now(), 50);
    labs.apply(
        &worker,
        RecordChanges {
            fence: u64::MAX / 2,
            update: vec![RecordUpdate {
                record: newer.clone(),
                entry: None,
            }],
            ..RecordChanges::default()
        },
        50,
    )
    .await
    .unwrap();
    let mut stale = newer.clone();
    stale.snapshot.title = "written by a stale run".into();
    let out = labs
        .apply(
            &worker,
            RecordChanges {
                fence: 10,
                update: vec![RecordUpdate {
                    record: stale,
                    entry: None,
                }],
                prune: vec![id],
                ..RecordChanges::default()
            },
            50,
        )
        .await
        .unwrap();
    assert_eq!((out.updated, out.pruned), (0, 0), "{out:?}");
    assert_eq!(
        t.record(&id).await.unwrap().snapshot.title,
        "written by the newer run"
    );
}

#[tokio::test]
async fn a_late_update_is_refused_by_the_database_over_a_tombstone_without_the_planner() {
    // D1's database guard on its own: an update written straight to the
    // repository (no planner to skip it) over a tombstone is refused by
    // the unique key, reported as suppressed, and its events are dropped.
    let t = TestApp::spawn().await;
    t.refresh().await;
    let record = t.records().await.remove(0);
    let id = record.lab_id;
    let now = chrono::Utc::now();
    let labs = &t.services().labs;
    let event = |kind| LabEvent::new(&t.worker_id(), id, now, &EventData::placeholder(kind));
    labs.tombstone(
        &t.worker_id(),
        &id,
        Tombstone {
            deleted_at: now,
            deleted_by: Actor::api("test"),
            expires_at: now + chrono::Duration::hours(1),
        },
        event(LabEventKind::Deleted),
        labsync_application::ports::AuditEntry {
            at: now,
            actor: Actor::api("test"),
            action: labsync_application::ports::AuditAction::Delete,
            worker_id: t.worker_id(),
            lab_id: Some(id),
            outcome: "deleted".into(),
            detail: String::new(),
        },
    )
    .await
    .unwrap();
    let mut late = record.clone();
    let mut snapshot = late.snapshot.clone();
    snapshot.state = LabState::Started;
    late.apply_change(snapshot, now, 50);
    let changed = event(LabEventKind::Changed);
    let out = labs
        .apply(
            &t.worker_id(),
            RecordChanges {
                fence: u64::MAX / 2,
                create: vec![late.clone()],
                update: vec![RecordUpdate {
                    record: late,
                    entry: None,
                }],
                events: vec![changed.clone()],
                ..RecordChanges::default()
            },
            50,
        )
        .await
        .unwrap();
    assert_eq!((out.created, out.updated), (0, 0), "{out:?}");
    assert!(out.suppressed.contains(&id), "{out:?}");
    let raw = t
        .app
        .db
        .collection::<Document>("labs")
        .find_one(doc! {"lab_id": id.as_str()})
        .await
        .unwrap()
        .unwrap();
    assert!(
        raw.contains_key("tombstone") && !raw.contains_key("state"),
        "{raw}"
    );
    let left = t
        .app
        .db
        .collection::<Document>("outbox")
        .count_documents(doc! {"_id": changed.id.as_str()})
        .await
        .unwrap();
    assert_eq!(left, 0, "the refused change's event is dropped");
}

#[tokio::test]
async fn a_list_with_entries_that_are_not_lab_ids_is_read_and_never_pruned_from() {
    let t = TestApp::spawn().await;
    t.refresh().await;
    let gone = t.records().await[0].lab_id;
    t.sim().remove_lab(gone.as_str());
    t.faults(json!({"invalid_list_entries": ["not-a-lab", 42, "\u{1b}[2J"]}));
    let r = t
        .refresh_with(RefreshOptions {
            dry_run: false,
            force_prune: true,
        })
        .await;
    assert_eq!(r.status, RunStatus::Succeeded, "{r:?}");
    assert_eq!((r.invalid_ids, r.pruned, r.held), (3, 0, 1), "{r:?}");
    assert!(
        t.record(&gone).await.is_some(),
        "not pruned on an incomplete list"
    );
    t.faults(json!({}));
    let r = t.refresh().await;
    assert_eq!(r.pruned, 1);
    t.assert_matches_truth("list whole again").await;
}

#[tokio::test]
async fn forcing_a_prune_after_cml_answered_an_empty_list_still_prunes_nothing() {
    let t = TestApp::spawn().await;
    t.refresh().await;
    t.faults(json!({"empty_list": true}));
    let r = t
        .refresh_with(RefreshOptions {
            dry_run: false,
            force_prune: true,
        })
        .await;
    assert_eq!((r.pruned, r.held), (0, SEEDED_LABS as u64), "{r:?}");
    assert_eq!(t.records().await.len(), SEEDED_LABS);
}

#[tokio::test]
async fn a_delete_names_who_asked_before_cml_is_asked() {
    let t = TestApp::spawn().await;
    t.refresh().await;
    let lab = t.records().await[0].lab_id;
    // CML deletes, then the answer is lost; one look at the lab finds it
    // gone. The audit said who asked before CML was asked.
    t.faults(json!({"after_the_fact": {"delete_lab": "error_500"}}));
    let out = t.delete(&lab, true).await.unwrap();
    assert_eq!(out.kind, DeleteOutcomeKind::AlreadyAbsent, "{out:?}");
    assert!(t.sim().lab(lab.as_str()).is_none(), "CML did delete it");
    assert!(t.record(&lab).await.is_none());
    let audit: Vec<(String, String)> = t
        .audit(&lab)
        .await
        .into_iter()
        .map(|a| (a.outcome, a.actor.to_string()))
        .collect();
    assert_eq!(
        audit,
        [
            ("already_absent".to_owned(), "api:operator".to_owned()),
            ("started".to_owned(), "api:operator".to_owned())
        ],
        "newest first"
    );
    assert!(!ids(&t.records().await).contains(&lab));
}

#[tokio::test]
async fn a_run_three_times_slower_than_its_lease_keeps_it_and_every_other_run_is_skipped() {
    // A 1 s lease, and a refresh of about 3 s (24 labs, 2 at a time, 250 ms
    // each): without renewal a second run would start after 1 s.
    let t = TestApp::spawn_with(
        1,
        &[
            ("LABSYNC__REFRESH__LEASE_TTL_SECS", "1"),
            ("LABSYNC__REFRESH__MAX_CONCURRENT_LABS_PER_WORKER", "2"),
        ],
    )
    .await;
    t.faults(json!({"latency_ms": {"lab_details": 250}}));
    let started = std::time::Instant::now();
    let first = t.spawn_refresh();
    eventually("the slow run to hold the lease and fetch", || async {
        t.cml_requests(cml_sim::Endpoint::LabDetails) > 0
    })
    .await;
    let latest_skip = std::cell::Cell::new(std::time::Duration::ZERO);
    eventually("the slow run to finish", || async {
        if first.is_finished() {
            return true;
        }
        let r = t.refresh().await;
        if r.status != RunStatus::Skipped {
            // Only once the first has written and let go: a run that
            // overlapped it would have found the labs still to create.
            assert_eq!(
                (r.status, r.created, r.unchanged),
                (RunStatus::Succeeded, 0, SEEDED_LABS as u64),
                "a second run started while the first was still working: {r:?}"
            );
            return true;
        }
        latest_skip.set(started.elapsed());
        false
    })
    .await;
    let r = first.await.unwrap();
    assert_eq!(
        (r.status, r.created),
        (RunStatus::Succeeded, SEEDED_LABS as u64),
        "{r:?}"
    );
    assert!(
        r.duration_ms > 2_000,
        "the run outlived its lease twice: {r:?}"
    );
    assert!(
        latest_skip.get() > std::time::Duration::from_millis(1_500),
        "other runs were still kept out after the lease's first expiry: {:?}",
        latest_skip.get()
    );
}

#[tokio::test]
async fn a_prune_that_did_not_happen_is_neither_announced_nor_audited() {
    // The lab was tombstoned between the run's index read and its prune:
    // the prune removes nothing, and its staged event is dropped.
    let t = TestApp::spawn().await;
    t.refresh().await;
    let id = t.records().await[0].lab_id;
    let now = chrono::Utc::now();
    let labs = &t.services().labs;
    labs.tombstone(
        &t.worker_id(),
        &id,
        Tombstone {
            deleted_at: now,
            deleted_by: Actor::api("test"),
            expires_at: now + chrono::Duration::hours(1),
        },
        LabEvent::new(
            &t.worker_id(),
            id,
            now,
            &EventData::placeholder(LabEventKind::Deleted),
        ),
        labsync_application::ports::AuditEntry {
            at: now,
            actor: Actor::api("test"),
            action: labsync_application::ports::AuditAction::Delete,
            worker_id: t.worker_id(),
            lab_id: Some(id),
            outcome: "deleted".into(),
            detail: String::new(),
        },
    )
    .await
    .unwrap();
    let pruned = LabEvent::new(
        &t.worker_id(),
        id,
        now,
        &EventData::placeholder(LabEventKind::Pruned),
    );
    let out = labs
        .apply(
            &t.worker_id(),
            RecordChanges {
                fence: u64::MAX / 2,
                prune: vec![id],
                events: vec![pruned.clone()],
                ..RecordChanges::default()
            },
            50,
        )
        .await
        .unwrap();
    assert_eq!(
        (out.pruned, out.not_pruned.clone()),
        (0, vec![id]),
        "{out:?}"
    );
    let left = t
        .app
        .db
        .collection::<Document>("outbox")
        .count_documents(doc! {"_id": pruned.id.as_str()})
        .await
        .unwrap();
    assert_eq!(left, 0, "no event for a prune that did not happen");
}
