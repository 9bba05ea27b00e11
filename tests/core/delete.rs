//! The two-phase delete and its invariants (docs/DESIGN.md 1-3).

use labsync_application::domain::Actor;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use labsync_application::domain::{
    Existing, HistoryEntry, HistoryEvent, LabId, LabRecord, LabState, WorkerId,
};
use labsync_application::ports::{
    ApplyOutcome, AuditEntry, FleetLabQuery, LabQuery, LabRepository, RecordChanges, Tombstone,
};
use labsync_application::{AppError, DeleteOutcomeKind, LabEvent, RepoError, RunStatus};
use serde_json::json;

use crate::helpers::{SEEDED_LABS, TestApp, eventually, ids};

/// A lab that is stopped and wiped, known to labsync.
async fn recorded_lab(t: &TestApp, state: &str) -> LabId {
    let id = t.add_lab(state);
    t.refresh().await;
    assert!(t.record(&id).await.is_some());
    id
}

#[tokio::test]
async fn deleting_a_wiped_lab_removes_it_from_cml_and_mongodb_at_once() {
    let t = TestApp::spawn().await;
    let id = recorded_lab(&t, "DEFINED_ON_CORE").await;
    let out = t.delete(&id, false).await.unwrap();
    assert_eq!(out.kind, DeleteOutcomeKind::Deleted);
    assert!(out.lab_gone && out.record_was_present);
    assert!(t.sim().lab(id.as_str()).is_none(), "gone in CML");
    assert!(
        t.record(&id).await.is_none(),
        "gone from the inventory at once"
    );
    assert!(!ids(&t.records().await).contains(&id));
    let audit = t.audit(&id).await;
    assert_eq!(
        (
            audit[0].actor.to_string().as_str(),
            audit[0].outcome.as_str()
        ),
        ("api:operator", "deleted")
    );
    // A refresh after it keeps it gone.
    let r = t.refresh().await;
    assert_eq!((r.created, r.suppressed), (0, 0));
    assert_eq!(ids(&t.records().await), t.truth());
}

#[tokio::test]
async fn a_running_lab_is_refused_without_force_and_deleted_with_it() {
    let t = TestApp::spawn().await;
    let id = recorded_lab(&t, "STARTED").await;
    let before = t.record(&id).await.unwrap();
    let out = t.delete(&id, false).await.unwrap();
    assert_eq!(
        out.kind,
        DeleteOutcomeKind::RefusedRunning {
            state: LabState::Started
        }
    );
    assert!(!out.lab_gone);
    assert!(
        out.message.contains("STARTED") && out.message.contains("force"),
        "{}",
        out.message
    );
    assert!(t.sim().lab(id.as_str()).is_some());
    let after = t.record(&id).await.unwrap();
    assert_eq!(
        (after.snapshot.clone(), after.revision),
        (before.snapshot, before.revision)
    );
    assert!(matches!(&after.history.last().unwrap().event,
        HistoryEvent::DeleteAttempt { outcome, force: false, .. } if outcome == "refused_running"));

    let forced = t.delete(&id, true).await.unwrap();
    assert_eq!(forced.kind, DeleteOutcomeKind::Deleted, "{forced:?}");
    assert!(t.sim().lab(id.as_str()).is_none());
    assert!(t.record(&id).await.is_none());
    let stats = t.sim().stats();
    assert!(
        stats.requests[&cml_sim::Endpoint::LabAction] >= 2,
        "stop and wipe were asked"
    );
    assert!(
        stats.requests[&cml_sim::Endpoint::Converged] >= 2,
        "and waited for"
    );

    let stopped = recorded_lab(&t, "STOPPED").await;
    assert_eq!(
        t.delete(&stopped, true).await.unwrap().kind,
        DeleteOutcomeKind::Deleted
    );
}

#[tokio::test]
async fn a_lab_cml_does_not_have_is_already_absent_and_its_record_is_removed() {
    let t = TestApp::spawn().await;
    let id = recorded_lab(&t, "DEFINED_ON_CORE").await;
    t.sim().remove_lab(id.as_str());
    let out = t.delete(&id, false).await.unwrap();
    assert_eq!(out.kind, DeleteOutcomeKind::AlreadyAbsent);
    assert!(out.lab_gone && out.record_was_present);
    assert!(t.record(&id).await.is_none());
    // Again: still a success, and it says there was no record either.
    let again = t.delete(&id, false).await.unwrap();
    assert_eq!(again.kind, DeleteOutcomeKind::AlreadyAbsent);
    assert!(again.lab_gone && !again.record_was_present);
    assert!(again.message.contains("no record"), "{}", again.message);
}

#[tokio::test]
async fn when_cml_fails_the_record_stays_and_the_attempt_is_in_its_history() {
    let t = TestApp::spawn_with(1, &[("LABSYNC__CML__REQUEST_TIMEOUT_MS", "300")]).await;
    let id = recorded_lab(&t, "DEFINED_ON_CORE").await;
    let before = t.record(&id).await.unwrap();
    let cases = [
        (json!({"error_rate": {"delete_lab": 1.0}}), "cml_refused"),
        (json!({"booting": true}), "cml_unreachable"),
        (json!({"hang": ["all"]}), "cml_unreachable"),
    ];
    for (n, (faults, word)) in cases.iter().enumerate() {
        t.faults(faults.clone());
        let out = t.delete(&id, false).await.unwrap();
        assert!(!out.lab_gone, "{faults}");
        match (&out.kind, *word) {
            (DeleteOutcomeKind::CmlRefused { error, .. }, "cml_refused") => {
                assert!(error.contains("500"), "{error}");
            }
            (DeleteOutcomeKind::CmlUnreachable { .. }, "cml_unreachable") => {}
            other => panic!("{faults}: {other:?}"),
        }
        let rec = t.record(&id).await.expect("record untouched");
        assert_eq!(
            (rec.snapshot.clone(), rec.revision),
            (before.snapshot.clone(), before.revision)
        );
        assert_eq!(rec.history.len(), before.history.len() + n + 1);
        assert!(matches!(&rec.history.last().unwrap().event,
            HistoryEvent::DeleteAttempt { outcome, requested_by, .. } if outcome == word && *requested_by == Actor::api("operator")));
        assert_eq!(t.audit(&id).await[0].outcome, *word);
    }
    t.faults(json!({}));
    assert_eq!(
        t.delete(&id, false).await.unwrap().kind,
        DeleteOutcomeKind::Deleted
    );
}

#[tokio::test]
async fn a_refresh_that_listed_a_lab_before_its_delete_does_not_bring_it_back() {
    let t = TestApp::spawn_with(
        1,
        &[("LABSYNC__REFRESH__MAX_CONCURRENT_LABS_PER_WORKER", "1")],
    )
    .await;
    t.refresh().await;
    let victim = t.records().await[0].lab_id;
    t.sim()
        .update_lab(
            victim.as_str(),
            cml_sim::LabSpec {
                state: Some("DEFINED_ON_CORE".into()),
                ..Default::default()
            },
        )
        .unwrap();
    t.sim().reset_stats();
    // Details one at a time, slowly, in list order: the victim (first id)
    // is fetched first, then the run spends a while on the others.
    t.faults(json!({"latency_ms": {"lab_details": 30}}));
    let run = t.spawn_refresh();
    eventually(
        "the refresh to have fetched the victim's details",
        || async { t.cml_requests(cml_sim::Endpoint::LabDetails) >= 2 },
    )
    .await;
    let out = t.delete(&victim, false).await.unwrap();
    assert_eq!(out.kind, DeleteOutcomeKind::Deleted);
    let r = run.await.unwrap();
    assert_eq!(r.status, RunStatus::Succeeded);
    assert_eq!(
        r.suppressed, 1,
        "the late update refused over the tombstone is reported: {r:?}"
    );
    assert!(
        t.record(&victim).await.is_none(),
        "resurrected by a refresh that listed it before the delete"
    );
    assert!(!ids(&t.records().await).contains(&victim));
    assert_eq!(ids(&t.records().await), t.truth());
    assert_eq!(t.refresh().await.created, 0);
}

/// The real repository, except that replacing a record with a tombstone
/// fails once: what a crash (or a database outage) between the CML delete
/// and the record removal looks like to the delete.
struct TombstoneFailsOnce {
    inner: Arc<dyn LabRepository>,
    failed: AtomicBool,
}

#[async_trait]
impl LabRepository for TombstoneFailsOnce {
    async fn index(
        &self,
        w: &WorkerId,
    ) -> Result<std::collections::HashMap<LabId, Existing>, RepoError> {
        self.inner.index(w).await
    }
    async fn records(&self, w: &WorkerId, ids: &[LabId]) -> Result<Vec<LabRecord>, RepoError> {
        self.inner.records(w, ids).await
    }
    async fn get(&self, w: &WorkerId, l: &LabId) -> Result<Option<LabRecord>, RepoError> {
        self.inner.get(w, l).await
    }
    async fn list(&self, w: &WorkerId) -> Result<Vec<LabRecord>, RepoError> {
        self.inner.list(w).await
    }
    async fn apply(
        &self,
        w: &WorkerId,
        c: RecordChanges,
        limit: usize,
    ) -> Result<ApplyOutcome, RepoError> {
        self.inner.apply(w, c, limit).await
    }
    async fn page(&self, w: &WorkerId, q: &LabQuery) -> Result<Vec<LabRecord>, RepoError> {
        self.inner.page(w, q).await
    }
    async fn fleet_page(&self, q: &FleetLabQuery) -> Result<Vec<LabRecord>, RepoError> {
        self.inner.fleet_page(q).await
    }
    async fn count_by_state(&self, w: &WorkerId) -> Result<Vec<(String, u64)>, RepoError> {
        self.inner.count_by_state(w).await
    }
    async fn add_history(
        &self,
        w: &WorkerId,
        l: &LabId,
        e: HistoryEntry,
        limit: usize,
        ev: LabEvent,
        audit: AuditEntry,
    ) -> Result<bool, RepoError> {
        self.inner.add_history(w, l, e, limit, ev, audit).await
    }
    async fn tombstone(
        &self,
        w: &WorkerId,
        l: &LabId,
        t: Tombstone,
        ev: LabEvent,
        audit: AuditEntry,
    ) -> Result<bool, RepoError> {
        if !self.failed.swap(true, Ordering::SeqCst) {
            return Err(RepoError::Unavailable(
                "injected: database went away".into(),
            ));
        }
        self.inner.tombstone(w, l, t, ev, audit).await
    }
    async fn remove_worker(&self, w: &WorkerId) -> Result<u64, RepoError> {
        self.inner.remove_worker(w).await
    }
    async fn settle_staged_events(&self, w: &WorkerId) -> Result<(u64, u64), RepoError> {
        self.inner.settle_staged_events(w).await
    }
}

#[tokio::test]
async fn a_crash_between_the_cml_delete_and_the_record_removal_is_repaired_by_the_next_refresh() {
    let t = TestApp::spawn().await;
    let id = recorded_lab(&t, "DEFINED_ON_CORE").await;
    let mut services = t.services().clone();
    services.labs = Arc::new(TombstoneFailsOnce {
        inner: services.labs.clone(),
        failed: AtomicBool::new(false),
    });
    let err = labsync_application::DeleteLab {
        worker_id: t.worker_id(),
        lab_id: id,
        force: false,
        requested_by: Actor::api("operator"),
        owned_by: None,
    }
    .execute(&services)
    .await
    .unwrap_err();
    assert!(matches!(err, AppError::RecordCleanupPending(_)), "{err:?}");
    assert!(err.to_string().contains("next refresh"), "{err}");
    assert!(t.sim().lab(id.as_str()).is_none(), "CML deleted it");
    assert!(t.record(&id).await.is_some(), "the record outlived the lab");
    let r = t.refresh().await;
    assert_eq!(r.pruned, 1);
    assert!(t.record(&id).await.is_none());
    assert_eq!(ids(&t.records().await), t.truth());
    assert_eq!(t.records().await.len(), SEEDED_LABS);
}

#[tokio::test]
async fn the_tombstone_hides_a_lab_cml_still_lists_until_it_expires() {
    let t = TestApp::spawn_with(1, &[("LABSYNC__DELETE__TOMBSTONE_TTL_SECS", "2")]).await;
    let id = recorded_lab(&t, "DEFINED_ON_CORE").await;
    t.delete(&id, false).await.unwrap();
    // CML lists it again (e.g. restored from a backup under the same id).
    t.sim()
        .add_lab(cml_sim::LabSpec {
            id: Some(id.to_string()),
            ..Default::default()
        })
        .unwrap();
    let r = t.refresh().await;
    assert_eq!((r.created, r.suppressed), (0, 1));
    assert!(t.record(&id).await.is_none());
    // The tombstone has an expiry, enforced by a TTL index.
    let raw = t
        .app
        .db
        .collection::<mongodb::bson::Document>("labs")
        .find_one(mongodb::bson::doc! {"lab_id": id.as_str()})
        .await
        .unwrap()
        .unwrap();
    let tomb = raw.get_document("tombstone").unwrap();
    assert!(
        tomb.get_datetime("expires_at").is_ok() && tomb.get_str("deleted_by") == Ok("api:operator")
    );
    let indexes = t
        .app
        .db
        .collection::<mongodb::bson::Document>("labs")
        .list_index_names()
        .await
        .unwrap();
    assert!(
        indexes.contains(&"tombstone_ttl".to_owned())
            && indexes.contains(&"worker_lab_unique".to_owned()),
        "{indexes:?}"
    );
    // Once it has expired, the lab CML still lists comes back with the
    // next refresh, whether or not the TTL monitor has run.
    let tomb_until = tomb.get_datetime("expires_at").unwrap().to_chrono();
    eventually(
        "the tombstone to expire and the lab to come back",
        || async {
            let r = t.refresh().await;
            let back = r.created == 1;
            assert!(
                back || chrono::Utc::now() <= tomb_until + chrono::Duration::seconds(1),
                "still hidden after its expiry: {r:?}"
            );
            back
        },
    )
    .await;
    assert!(t.record(&id).await.is_some());
}

#[tokio::test]
async fn worker_passwords_are_encrypted_at_rest() {
    let t = TestApp::spawn().await;
    let raw = t
        .app
        .db
        .collection::<mongodb::bson::Document>("workers")
        .find_one(mongodb::bson::doc! {})
        .await
        .unwrap()
        .unwrap();
    let text = format!("{raw:?}");
    assert!(!text.contains(crate::helpers::ADMIN_PASSWORD), "{text}");
    assert!(
        raw.get_document("password")
            .unwrap()
            .contains_key("ciphertext")
    );
    let access = t
        .services()
        .workers
        .get(&t.worker_id())
        .await
        .unwrap()
        .unwrap();
    assert!(!format!("{access:?}").contains(crate::helpers::ADMIN_PASSWORD));
}
