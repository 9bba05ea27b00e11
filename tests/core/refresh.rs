//! The refresh: create, update, unchanged, prune, and the prune guards.

use labsync_application::domain::Actor;
use labsync_application::domain::LabField;
use labsync_application::domain::{HistoryEvent, LabState, Worker};
use labsync_application::ports::AuditAction;
use labsync_application::{RefreshOptions, RunStatus, SkipReason};
use mongodb::bson::{Bson, Document, doc};
use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::helpers::{ADMIN_TOKEN, SEEDED_LABS, TestApi, TestApp, VIEWER_TOKEN, eventually, ids};

#[tokio::test]
async fn a_first_refresh_creates_every_lab_with_every_field_and_a_second_writes_nothing() {
    let t = TestApp::spawn().await;
    let r = t.refresh().await;
    assert_eq!(r.status, RunStatus::Succeeded, "{r:?}");
    assert_eq!(
        (r.listed, r.created, r.updated, r.pruned),
        (SEEDED_LABS as u64, SEEDED_LABS as u64, 0, 0)
    );
    let records = t.records().await;
    assert_eq!(ids(&records), t.truth());
    for rec in &records {
        let lab = t.sim().lab(rec.lab_id.as_str()).unwrap();
        let s = &rec.snapshot;
        assert_eq!(s.title, lab.lab_title);
        assert_eq!(s.description, lab.lab_description);
        assert_eq!(s.notes, lab.lab_notes);
        assert_eq!(s.owner_id.as_deref(), Some(lab.owner.as_str()));
        assert_eq!(
            s.owner_username.as_deref(),
            Some(lab.owner_username.as_str())
        );
        assert_eq!(
            s.owner_fullname.as_deref(),
            Some(lab.owner_fullname.as_str())
        );
        assert_eq!(s.state.as_str(), lab.state);
        assert_eq!(
            (s.node_count, s.link_count),
            (u64::from(lab.node_count), u64::from(lab.link_count))
        );
        assert_eq!(s.groups.len(), lab.groups.len());
        assert_eq!(s.created.unwrap().to_rfc3339(), lab.created);
        assert_eq!(s.modified.unwrap().to_rfc3339(), lab.modified);
        assert_eq!(rec.revision, 1);
        assert!(
            matches!(rec.history[..], [ref e] if matches!(e.event, HistoryEvent::Created { .. }))
        );
    }
    // Dates are BSON dates, not strings.
    let raw = t
        .app
        .db
        .collection::<Document>("labs")
        .find_one(doc! {})
        .await
        .unwrap()
        .unwrap();
    for field in [
        "created",
        "modified",
        "first_seen_at",
        "last_seen_at",
        "last_changed_at",
    ] {
        assert!(
            matches!(raw.get(field), Some(Bson::DateTime(_))),
            "{field}: {:?}",
            raw.get(field)
        );
    }

    let again = t.refresh().await;
    assert_eq!(
        (again.created, again.updated, again.unchanged, again.pruned),
        (0, 0, SEEDED_LABS as u64, 0)
    );
    assert_eq!(
        t.records().await,
        records,
        "an unchanged lab is not rewritten"
    );
}

#[tokio::test]
async fn a_lab_changed_in_cml_is_updated_with_one_history_entry_naming_the_fields() {
    let t = TestApp::spawn().await;
    t.refresh().await;
    let target = t.records().await[3].clone();
    t.sim()
        .update_lab(
            target.lab_id.as_str(),
            cml_sim::LabSpec {
                lab_title: Some("Renamed in CML".into()),
                state: Some("STARTED".into()),
                node_count: Some(u32::try_from(target.snapshot.node_count).unwrap() + 5),
                ..Default::default()
            },
        )
        .unwrap();
    let state_before = target.snapshot.state.clone();
    let r = t.refresh().await;
    assert_eq!(
        (r.updated, r.created, r.unchanged),
        (1, 0, SEEDED_LABS as u64 - 1)
    );
    let after = t.record(&target.lab_id).await.unwrap();
    assert_eq!(after.snapshot.title, "Renamed in CML");
    assert_eq!(after.snapshot.state, LabState::Started);
    assert_eq!(after.revision, 2);
    assert!(after.last_changed_at > target.last_changed_at);
    assert_eq!(after.first_seen_at, target.first_seen_at);
    assert_eq!(after.history.len(), 2);
    let HistoryEvent::Changed { changes } = &after.history[1].event else {
        panic!("{:?}", after.history)
    };
    let mut fields: Vec<&str> = changes.iter().map(|c| c.field.as_str()).collect();
    fields.sort_unstable();
    let mut want = vec!["title", "node_count", "modified"];
    if state_before != LabState::Started {
        want.push("state");
    }
    want.sort_unstable();
    assert_eq!(fields, want);
    let title = changes.iter().find(|c| c.field == LabField::Title).unwrap();
    assert_eq!(
        (title.old.as_str(), title.new.as_str()),
        (target.snapshot.title.as_str(), "Renamed in CML")
    );
    // Nothing else was touched.
    let others: Vec<_> = t
        .records()
        .await
        .into_iter()
        .filter(|r| r.lab_id != target.lab_id)
        .collect();
    assert!(others.iter().all(|r| r.revision == 1));
}

#[tokio::test]
async fn a_lab_deleted_behind_labsyncs_back_is_pruned_and_audited() {
    let t = TestApp::spawn().await;
    t.refresh().await;
    let gone = t.records().await[0].lab_id;
    assert!(t.sim().remove_lab(gone.as_str()));
    let r = t.refresh().await;
    assert_eq!((r.pruned, r.held), (1, 0));
    assert!(t.record(&gone).await.is_none());
    assert_eq!(ids(&t.records().await), t.truth());
    let audit = t.audit(&gone).await;
    assert_eq!(audit.len(), 1);
    assert_eq!(
        (
            audit[0].actor.to_string().as_str(),
            audit[0].outcome.as_str()
        ),
        ("api:admin", "pruned")
    );
}

#[tokio::test]
async fn every_refresh_is_audited_naming_who_started_it_the_schedule_and_the_cli_included() {
    let t = TestApp::spawn().await;
    let api_run = t.refresh().await;
    let scheduled = t.spawn_refresh().await.expect("scheduled run");
    let o = t.cli(&["refresh", "--worker", "cml-1"]).await;
    assert!(o.status.success(), "{o:?}");
    let audit = t
        .services()
        .audit
        .recent(&t.worker_id(), None, 50)
        .await
        .unwrap();
    // Who started each run, by kind, and how it ended: one entry per run.
    let mut runs: Vec<(String, &str)> = audit
        .iter()
        .filter(|a| a.action == AuditAction::Refresh && a.lab_id.is_none())
        .map(|a| {
            let actor = a.actor.to_string();
            let kind = actor.split(':').next().unwrap_or_default().to_owned();
            (kind, a.outcome.as_str())
        })
        .collect();
    runs.sort();
    assert_eq!(
        runs,
        [
            ("api".to_owned(), "succeeded"),
            ("cli".to_owned(), "succeeded"),
            ("schedule".to_owned(), "succeeded")
        ]
    );
    assert!(audit.iter().any(|a| a.actor == Actor::api("admin")));
    for run in [&api_run, &scheduled] {
        assert!(
            audit.iter().any(|a| a
                .detail
                .starts_with(&format!("run {} succeeded", run.run_id))),
            "the entry names its run: {audit:?}"
        );
    }
}

#[tokio::test]
async fn an_empty_list_a_failed_list_or_malformed_json_never_prunes() {
    let t = TestApp::spawn().await;
    t.refresh().await;
    let before = t.records().await;
    for faults in [
        json!({"empty_list": true}),
        json!({"error_rate": {"list_labs": 1.0}}),
        json!({"truncate_json": ["list_labs"]}),
        json!({"wrong_types": ["list_labs"]}),
        json!({"booting": true}),
    ] {
        t.faults(faults.clone());
        let r = t.refresh().await;
        assert_eq!(r.pruned, 0, "{faults}: {r:?}");
        assert_eq!(t.records().await, before, "{faults}");
        if faults.get("empty_list").is_some() {
            assert_eq!(r.status, RunStatus::Succeeded);
            assert_eq!(r.held, SEEDED_LABS as u64);
            assert!(
                r.hold_reason.as_deref().unwrap().contains("no labs"),
                "{r:?}"
            );
        } else {
            assert_eq!(r.status, RunStatus::Failed, "{faults}");
            assert!(r.error.is_some());
        }
    }
    // Malformed details fail those labs; their records stay as they were.
    t.faults(json!({"wrong_types": ["lab_details"]}));
    let r = t.refresh().await;
    assert_eq!((r.failed, r.pruned, r.updated), (SEEDED_LABS as u64, 0, 0));
    assert_eq!(t.records().await, before);
}

#[tokio::test]
async fn a_drop_of_more_than_half_is_held_and_reported_then_applied_with_force() {
    let t = TestApp::spawn().await;
    t.refresh().await;
    let records = t.records().await;
    let doomed: Vec<_> = records.iter().take(13).map(|r| r.lab_id).collect();
    for id in &doomed {
        t.sim().remove_lab(id.as_str());
    }
    let r = t.refresh().await;
    assert_eq!((r.pruned, r.held), (0, 13), "{r:?}");
    assert!(
        r.hold_reason.as_deref().unwrap().contains("13 of 24"),
        "{r:?}"
    );
    assert_eq!(t.records().await.len(), SEEDED_LABS);

    let dry = t
        .refresh_with(RefreshOptions {
            dry_run: true,
            force_prune: true,
        })
        .await;
    assert_eq!(dry.pruned, 13);
    assert_eq!(
        t.records().await.len(),
        SEEDED_LABS,
        "a dry run writes nothing"
    );

    let forced = t
        .refresh_with(RefreshOptions {
            dry_run: false,
            force_prune: true,
        })
        .await;
    assert_eq!((forced.pruned, forced.held), (13, 0));
    assert_eq!(ids(&t.records().await), t.truth());
}

#[tokio::test]
async fn two_concurrent_refreshes_of_a_worker_run_once() {
    let t = TestApp::spawn().await;
    t.faults(json!({"latency_ms": {"lab_details": 40}}));
    let first = t.spawn_refresh();
    // Once the first has listed the labs it holds the lease.
    eventually("the first refresh to list the labs", || async {
        t.cml_requests(cml_sim::Endpoint::ListLabs) >= 1
    })
    .await;
    let second = t.refresh().await;
    assert_eq!(second.status, RunStatus::Skipped, "{second:?}");
    assert_eq!(second.skip_reason, Some(SkipReason::LeaseHeld));
    let first = first.await.unwrap();
    assert_eq!(
        (first.status, first.created),
        (RunStatus::Succeeded, SEEDED_LABS as u64)
    );
    assert_eq!(
        t.sim().stats().requests[&cml_sim::Endpoint::ListLabs],
        1,
        "the skipped run asked CML nothing"
    );
    assert_eq!(ids(&t.records().await), t.truth());
    // The lease was released: the next run is not skipped.
    assert_eq!(t.refresh().await.status, RunStatus::Succeeded);
}

#[tokio::test]
async fn an_expired_token_mid_run_is_renewed_once_and_the_run_succeeds() {
    let t = TestApp::spawn().await;
    t.refresh().await;
    assert_eq!(
        t.sim().stats().logins,
        1,
        "one login per run: it says whether the account is still an admin"
    );
    t.refresh().await;
    assert_eq!(
        t.sim().stats().logins,
        2,
        "and the token serves the whole run"
    );
    // Expire every token while the details of a run are being fetched.
    t.faults(json!({"latency_ms": {"lab_details": 20}}));
    let run = t.spawn_refresh();
    eventually("detail fetches to start", || async {
        t.cml_requests(cml_sim::Endpoint::LabDetails) > 2 * SEEDED_LABS as u64
    })
    .await;
    t.sim().expire_tokens();
    let r = run.await.unwrap();
    assert_eq!(
        (r.status, r.failed, r.unchanged),
        (RunStatus::Succeeded, 0, SEEDED_LABS as u64),
        "{r:?}"
    );
    assert_eq!(
        t.sim().stats().logins,
        4,
        "the run's own login and exactly one re-authentication"
    );
}

#[tokio::test]
async fn disabled_workers_are_skipped_and_refresh_all_covers_the_fleet() {
    let t = TestApp::spawn_with(3, &[]).await;
    let cml3 = labsync_application::domain::WorkerId::parse("cml-3").unwrap();
    let disable = labsync_application::domain::WorkerChanges {
        enabled: Some(false),
        ..Default::default()
    };
    let cml3_now = t
        .app
        .inventory
        .update(&cml3, disable, None, &Actor::api("admin"))
        .await
        .unwrap();
    assert!(!cml3_now.worker.enabled);
    let reports = labsync_application::RefreshAll::new(t.services().clone())
        .execute(&Actor::api("admin"), RefreshOptions::default())
        .await
        .unwrap();
    let names: Vec<&str> = reports.iter().map(|r| r.worker_id.as_str()).collect();
    assert_eq!(names, ["cml-1", "cml-2"]);
    assert!(
        reports
            .iter()
            .all(|r| r.status == RunStatus::Succeeded && r.created == SEEDED_LABS as u64)
    );
    assert!(t.services().labs.list(&cml3).await.unwrap().is_empty());
    let direct = labsync_application::RefreshWorkerLabs::new(t.services().clone())
        .execute(&cml3, &Actor::api("admin"), RefreshOptions::default())
        .await
        .unwrap();
    assert_eq!(direct.status, RunStatus::Skipped);
    let stored = t
        .services()
        .reports
        .recent(&labsync_application::ports::RunQuery::newest(None, 10))
        .await
        .unwrap();
    assert_eq!(stored.len(), 3);
    assert_eq!(stored[0].worker_id, cml3, "newest first");
}

async fn set_lab_tiles(t: &TestApp, on: bool) {
    let before = t
        .services()
        .workers
        .get(&t.worker_id())
        .await
        .unwrap()
        .expect("registered")
        .worker;
    let worker = Worker {
        lab_tiles: on,
        ..before.clone()
    };
    assert!(
        t.services()
            .workers
            .update(&before, &worker, None)
            .await
            .unwrap()
    );
}

#[tokio::test]
async fn lab_tiles_bring_every_labs_details_in_one_request_and_fall_back_when_they_fail() {
    let t = TestApp::spawn().await;
    set_lab_tiles(&t, true).await;
    let r = t.refresh().await;
    assert_eq!(
        (r.status, r.created),
        (RunStatus::Succeeded, SEEDED_LABS as u64)
    );
    assert_eq!(t.cml_requests(cml_sim::Endpoint::LabTiles), 1);
    assert_eq!(t.cml_requests(cml_sim::Endpoint::LabDetails), 0);
    t.assert_matches_truth("after a refresh from the tiles")
        .await;

    // The tiles and the per-lab details give the same records.
    set_lab_tiles(&t, false).await;
    let r = t.refresh().await;
    assert_eq!((r.unchanged, r.updated), (SEEDED_LABS as u64, 0), "{r:?}");
    assert_eq!(
        t.cml_requests(cml_sim::Endpoint::LabDetails),
        SEEDED_LABS as u64
    );
    assert_eq!(t.cml_requests(cml_sim::Endpoint::LabTiles), 1);

    // Tiles failing: the run fetches every lab on its own and succeeds.
    set_lab_tiles(&t, true).await;
    let changed = t.records().await[0].lab_id;
    t.sim()
        .update_lab(
            changed.as_str(),
            cml_sim::LabSpec {
                lab_title: Some("changed while the tiles fail".into()),
                ..Default::default()
            },
        )
        .unwrap();
    t.faults(json!({"error_rate": {"lab_tiles": 1.0}}));
    let r = t.refresh().await;
    assert_eq!(
        (r.status, r.updated, r.failed),
        (RunStatus::Succeeded, 1, 0),
        "{r:?}"
    );
    assert_eq!(t.cml_requests(cml_sim::Endpoint::LabTiles), 2);
    assert_eq!(
        t.cml_requests(cml_sim::Endpoint::LabDetails),
        2 * SEEDED_LABS as u64
    );
    t.assert_matches_truth("after the fallback").await;
}

#[tokio::test]
async fn a_dry_run_changes_no_metric_of_lab_changes_and_its_audit_entry_says_dry_run() {
    let t = TestApp::spawn().await;
    let api = TestApi::start(&t).await;
    let refresh = |dry_run: bool| {
        api.send(api.req(
            Method::POST,
            &format!("/api/v1/workers/cml-1/labs/refresh?dry_run={dry_run}"),
            Some(ADMIN_TOKEN),
        ))
    };
    let created = || async {
        let text = api
            .req(Method::GET, "/metrics", Some(VIEWER_TOKEN))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find(|l| l.starts_with("labsync_lab_changes_total{kind=\"created\"}"))
            .and_then(|l| l.rsplit(' ').next())
            .map_or(0.0, |v| v.parse::<f64>().unwrap())
    };
    let refreshes = || async {
        t.services()
            .audit
            .recent(&t.worker_id(), None, 50)
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.action == AuditAction::Refresh)
            .collect::<Vec<_>>()
    };

    let (status, report) = refresh(true).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(
        (report["dry_run"].as_bool(), report["created"].as_u64()),
        (Some(true), Some(SEEDED_LABS as u64)),
        "{report}"
    );
    assert!(t.records().await.is_empty(), "a dry run writes nothing");
    assert_eq!(created().await, 0.0, "nothing was created");
    let entries = refreshes().await;
    assert_eq!(entries.len(), 1);
    assert!(
        entries[0].detail.contains("dry run")
            && entries[0]
                .detail
                .contains(&format!("would create {SEEDED_LABS}")),
        "{}",
        entries[0].detail
    );

    // A real run moves the metric, and its entry says what it did.
    let (status, _) = refresh(false).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(created().await, SEEDED_LABS as f64);
    let entries = refreshes().await;
    assert_eq!(entries.len(), 2);
    let real = entries
        .iter()
        .find(|e| !e.detail.contains("dry run"))
        .expect("the real run's entry");
    assert!(
        real.detail.contains(&format!("created {SEEDED_LABS}")),
        "{}",
        real.detail
    );
    api.stop().await;
}
