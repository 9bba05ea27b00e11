//! The MongoDB adapters against their ports' MUST contracts, on a real
//! MongoDB-wire server: each promise of `LabRepository`, `RefreshLease`,
//! `RunReports`, `WorkerRepository`, `DeleteRequests` and the event relay
//! that the refresh, the delete and the worker changes rely on, checked at
//! the adapter itself.
//!
//! The integration suite proves the same promises through the whole
//! service; these tests prove them in seconds, which is what lets mutation
//! testing (docs/RELIABILITY.md) run against the adapters at all.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test that cannot go on fails at once, saying where"
)]

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use labsync_application::ports::{
    AuditAction, AuditEntry, EventFeed, FleetCursor, FleetLabQuery, LabQuery, LabRepository,
    LabSort, RecordChanges, RecordUpdate, RefreshLease, RunQuery, RunReports, SortKey, Tombstone,
    WorkerRepository,
};
use labsync_application::{
    EventData, LabEvent, LabEventKind, LabFailure, RunReport, RunStatus, Trigger,
};
use labsync_domain::{
    Actor, BaseUrl, Existing, HistoryEntry, HistoryEvent, LabId, LabRecord, LabSnapshot, LabState,
    TlsSettings, Worker, WorkerId,
};
use labsync_infrastructure::crypto::PasswordCipher;
use labsync_infrastructure::mongo::feed::{MongoEventFeed, RUN_FINISHED};
use labsync_infrastructure::mongo::{
    MongoLabRepository, MongoRefreshLease, MongoRunReports, MongoWorkerRepository, collections,
    ensure_indexes, outbox,
};
use mongodb::Database;
use mongodb::bson::{Document, doc};

const HISTORY: usize = 5;

/// The time as the store keeps it: to the millisecond.
fn now() -> DateTime<Utc> {
    DateTime::from_timestamp_millis(Utc::now().timestamp_millis()).unwrap()
}
const RETENTION: Duration = Duration::from_secs(3600);

async fn store() -> (Database, MongoLabRepository) {
    let db = labsync_test_support::test_database().await;
    ensure_indexes(&db).await.expect("indexes");
    let repo = MongoLabRepository::new(&db, RETENTION);
    (db, repo)
}

fn worker(name: &str) -> WorkerId {
    WorkerId::parse(name).unwrap()
}

fn lab() -> LabId {
    LabId::parse(&uuid::Uuid::new_v4().to_string()).unwrap()
}

fn snapshot(title: &str) -> LabSnapshot {
    LabSnapshot {
        title: title.into(),
        description: "a description".into(),
        notes: String::new(),
        owner_id: Some("4cfc3696-4df0-49a3-a0dd-7bbd9271fe67".into()),
        owner_username: Some("admin".into()),
        owner_fullname: None,
        state: LabState::Stopped,
        node_count: 3,
        link_count: 2,
        groups: vec![],
        created: None,
        modified: None,
    }
}

fn record(w: &WorkerId, id: LabId, title: &str) -> LabRecord {
    LabRecord::discovered(w.clone(), id, snapshot(title), now())
}

/// `r` changed to `title`, with the history entry that says so.
fn changed(mut r: LabRecord, title: &str) -> RecordUpdate {
    let mut s = r.snapshot.clone();
    s.title = title.into();
    let entry = r.apply_change(s, now(), HISTORY);
    RecordUpdate { record: r, entry }
}

fn event(kind: LabEventKind, w: &WorkerId, id: LabId) -> LabEvent {
    LabEvent::new(w, id, now(), &EventData::placeholder(kind))
}

fn audit(w: &WorkerId, id: LabId) -> AuditEntry {
    AuditEntry {
        at: now(),
        actor: Actor::api("test"),
        action: AuditAction::Delete,
        worker_id: w.clone(),
        lab_id: Some(id),
        outcome: "deleted".into(),
        detail: String::new(),
    }
}

fn tombstone(expires_in: TimeDelta) -> Tombstone {
    Tombstone {
        deleted_at: now(),
        deleted_by: Actor::api("test"),
        expires_at: now() + expires_in,
    }
}

async fn create(repo: &MongoLabRepository, w: &WorkerId, records: Vec<LabRecord>, fence: u64) {
    let n = records.len() as u64;
    let out = repo
        .apply(
            w,
            RecordChanges {
                fence,
                create: records,
                ..RecordChanges::default()
            },
            HISTORY,
        )
        .await
        .expect("create");
    assert_eq!(out.created, n, "{out:?}");
}

/// Outbox status per event id.
async fn outbox_status(db: &Database) -> HashMap<String, String> {
    outbox::list(db, doc! {})
        .await
        .unwrap()
        .into_iter()
        .map(|d| {
            (
                d.get_str("_id").unwrap().to_owned(),
                d.get_str("status").unwrap().to_owned(),
            )
        })
        .collect()
}

async fn raw(db: &Database, w: &WorkerId, id: LabId) -> Option<Document> {
    db.collection::<Document>(collections::LABS)
        .find_one(doc! {"worker_id": w.as_str(), "lab_id": id.as_str()})
        .await
        .unwrap()
}

fn titles(records: &[LabRecord]) -> Vec<&str> {
    records.iter().map(|r| r.snapshot.title.as_str()).collect()
}

// ---------------------------------------------------------------- records

#[tokio::test]
async fn created_records_read_back_whole_through_every_reader() {
    let (_db, repo) = store().await;
    let w = worker("cml-1");
    let (a, b) = (record(&w, lab(), "alpha"), record(&w, lab(), "beta"));
    create(&repo, &w, vec![a.clone(), b.clone()], 1).await;

    assert_eq!(repo.get(&w, &a.lab_id).await.unwrap().as_ref(), Some(&a));
    let mut both = vec![a.clone(), b.clone()];
    both.sort_by_key(|r| r.lab_id);
    assert_eq!(repo.list(&w).await.unwrap(), both, "ordered by lab id");
    assert_eq!(
        repo.records(&w, &[b.lab_id]).await.unwrap(),
        vec![b.clone()]
    );
    let index = repo.index(&w).await.unwrap();
    assert_eq!(index.len(), 2);
    assert_eq!(index[&a.lab_id], Existing::Live(a.content_hash));
    assert_eq!(index[&b.lab_id], Existing::Live(b.content_hash));
    assert!(
        repo.list(&worker("cml-2")).await.unwrap().is_empty(),
        "per worker"
    );
}

#[tokio::test]
async fn an_update_rewrites_the_record_and_keeps_at_most_the_history_limit() {
    let (_db, repo) = store().await;
    let w = worker("cml-1");
    let mut r = record(&w, lab(), "v0");
    create(&repo, &w, vec![r.clone()], 1).await;
    for n in 1..=HISTORY + 2 {
        let u = changed(r.clone(), &format!("v{n}"));
        r = u.record.clone();
        let out = repo
            .apply(
                &w,
                RecordChanges {
                    fence: 1,
                    update: vec![u],
                    ..RecordChanges::default()
                },
                HISTORY,
            )
            .await
            .unwrap();
        assert_eq!((out.created, out.updated), (0, 1), "{out:?}");
    }
    let stored = repo.get(&w, &r.lab_id).await.unwrap().unwrap();
    assert_eq!(stored, r, "every field, the history ring included");
    assert_eq!(stored.history.len(), HISTORY);
    assert_eq!(stored.revision, (HISTORY + 3) as u64);
}

#[tokio::test]
async fn a_page_filters_by_state_owner_and_literal_title_text_after_a_cursor() {
    let (_db, repo) = store().await;
    let w = worker("cml-1");
    let mut records: Vec<LabRecord> = ["a.b (1)", "axb (2)", "A.B [3]", "other"]
        .iter()
        .map(|t| record(&w, lab(), t))
        .collect();
    records[3].snapshot.state = LabState::Started;
    records[3].snapshot.owner_username = Some("alice".into());
    create(&repo, &w, records.clone(), 1).await;

    let page = |q: LabQuery| {
        let repo = repo.clone();
        let w = w.clone();
        async move { repo.page(&w, &LabQuery { limit: 10, ..q }).await.unwrap() }
    };
    let mut hits = titles(
        &page(LabQuery {
            title_contains: Some("a.b".into()),
            ..LabQuery::default()
        })
        .await,
    )
    .into_iter()
    .map(str::to_owned)
    .collect::<Vec<_>>();
    hits.sort();
    assert_eq!(hits, ["A.B [3]", "a.b (1)"], "literal, case-insensitive");
    let started = page(LabQuery {
        state: Some("STARTED".into()),
        ..LabQuery::default()
    })
    .await;
    assert_eq!(titles(&started), ["other"]);
    let owned = page(LabQuery {
        owner: Some("alice".into()),
        ..LabQuery::default()
    })
    .await;
    assert_eq!(titles(&owned), ["other"]);
    assert!(owned[0].history.is_empty(), "pages leave the history out");

    let mut ids: Vec<LabId> = records.iter().map(|r| r.lab_id).collect();
    ids.sort();
    let first = repo
        .page(
            &w,
            &LabQuery {
                limit: 2,
                ..LabQuery::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(first.iter().map(|r| r.lab_id).collect::<Vec<_>>(), ids[..2]);
    let rest = page(LabQuery {
        after: Some(ids[1]),
        ..LabQuery::default()
    })
    .await;
    assert_eq!(rest.iter().map(|r| r.lab_id).collect::<Vec<_>>(), ids[2..]);
}

#[tokio::test]
async fn every_fleet_order_pages_through_every_lab_once_in_order_and_counts_by_state() {
    let (db, repo) = store().await;
    ensure_indexes(&db).await.unwrap();
    let (a, b) = (worker("cml-a"), worker("cml-b"));
    let at = |min: i64| Some(now() - TimeDelta::minutes(min));
    // Ties and labs without a modified time, on both workers.
    let specs = [
        (&a, "delta", "STARTED", at(5)),
        (&a, "alpha", "STOPPED", None),
        (&a, "Charlie", "STARTED", at(1)),
        (&b, "alpha", "DEFINED_ON_CORE", at(5)),
        (&b, "bravo", "STOPPED", None),
        (&b, "echo", "STARTED", at(9)),
        (&b, "alpha", "STOPPED", at(1)),
    ];
    let mut all = Vec::new();
    for (w, title, state, modified) in specs {
        let mut r = record(w, lab(), title);
        r.snapshot.state = LabState::parse(state);
        r.snapshot.modified = modified;
        all.push(r);
    }
    for w in [&a, &b] {
        let mine: Vec<LabRecord> = all.iter().filter(|r| &r.worker_id == w).cloned().collect();
        create(&repo, w, mine, 1).await;
    }
    for sort in LabSort::ALL {
        let mut expected = all.clone();
        expected.sort_by_key(|r| {
            let c = sort.cursor(r);
            let key = match c.key {
                SortKey::Time(t) => (t.is_none(), std::cmp::Reverse(t), String::new()),
                SortKey::Text(t) => (false, std::cmp::Reverse(None), t),
                SortKey::None => (false, std::cmp::Reverse(None), String::new()),
            };
            (key, c.worker, c.lab)
        });
        let mut shown = Vec::new();
        let mut after = None;
        loop {
            let page = repo
                .fleet_page(&FleetLabQuery {
                    worker: None,
                    filter: LabQuery {
                        limit: 2,
                        ..LabQuery::default()
                    },
                    sort,
                    after: after.clone(),
                })
                .await
                .unwrap();
            let Some(last) = page.last() else { break };
            // Through the URL form, as the console pages.
            after = FleetCursor::parse(sort, &sort.cursor(last).to_param());
            assert!(after.is_some(), "{sort:?}");
            shown.extend(page.into_iter().map(|r| (r.worker_id, r.lab_id)));
        }
        let expected: Vec<_> = expected
            .iter()
            .map(|r| (r.worker_id.clone(), r.lab_id))
            .collect();
        assert_eq!(shown, expected, "{sort:?}");
    }
    assert_eq!(
        repo.count_by_state(&b).await.unwrap(),
        [
            ("DEFINED_ON_CORE".to_owned(), 1),
            ("STARTED".to_owned(), 1),
            ("STOPPED".to_owned(), 2)
        ]
    );
    assert!(
        repo.count_by_state(&worker("none"))
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn prunes_remove_live_records_only_and_say_which_did_not_happen() {
    let (db, repo) = store().await;
    let w = worker("cml-1");
    let (gone, buried, other) = (
        record(&w, lab(), "gone"),
        record(&w, lab(), "buried"),
        record(&worker("cml-2"), lab(), "x"),
    );
    create(&repo, &w, vec![gone.clone(), buried.clone()], 1).await;
    create(
        &repo,
        &worker("cml-2"),
        vec![other.clone(), record(&worker("cml-2"), lab(), "y")],
        1,
    )
    .await;
    repo.tombstone(
        &w,
        &buried.lab_id,
        tombstone(TimeDelta::days(1)),
        event(LabEventKind::Deleted, &w, buried.lab_id),
        audit(&w, buried.lab_id),
    )
    .await
    .unwrap();
    let events = vec![
        event(LabEventKind::Pruned, &w, gone.lab_id),
        event(LabEventKind::Pruned, &w, buried.lab_id),
    ];
    let out = repo
        .apply(
            &w,
            RecordChanges {
                fence: 1,
                prune: vec![gone.lab_id, buried.lab_id, other.lab_id],
                events: events.clone(),
                ..RecordChanges::default()
            },
            HISTORY,
        )
        .await
        .unwrap();
    assert_eq!(out.pruned, 1, "{out:?}");
    let mut not_pruned = out.not_pruned.clone();
    not_pruned.sort();
    let mut expected = vec![buried.lab_id];
    expected.sort();
    assert_eq!(not_pruned, expected, "the tombstone stays, and is named");
    assert!(raw(&db, &w, gone.lab_id).await.is_none());
    assert!(
        raw(&db, &w, buried.lab_id)
            .await
            .unwrap()
            .contains_key("tombstone")
    );
    assert!(
        repo.get(&worker("cml-2"), &other.lab_id)
            .await
            .unwrap()
            .is_some(),
        "another worker's lab of the same id set"
    );
    let status = outbox_status(&db).await;
    assert_eq!(
        status[&events[0].id], "pending",
        "the prune made is announced"
    );
    assert!(
        !status.contains_key(&events[1].id),
        "the prune not made is not"
    );
    assert_eq!(repo.remove_worker(&w).await.unwrap(), 1, "the tombstone");
    assert_eq!(repo.remove_worker(&worker("cml-2")).await.unwrap(), 2);
}

// ---------------------------------------------------------------- tombstones

#[tokio::test]
async fn a_tombstone_hides_the_lab_and_refuses_a_late_create_or_update() {
    let (db, repo) = store().await;
    let w = worker("cml-1");
    let (updated, recreated, kept) = (
        record(&w, lab(), "u"),
        record(&w, lab(), "c"),
        record(&w, lab(), "k"),
    );
    create(&repo, &w, vec![updated.clone(), kept.clone()], 1).await;
    for id in [updated.lab_id, recreated.lab_id] {
        let had = repo
            .tombstone(
                &w,
                &id,
                tombstone(TimeDelta::days(1)),
                event(LabEventKind::Deleted, &w, id),
                audit(&w, id),
            )
            .await
            .unwrap();
        assert_eq!(
            had,
            id == updated.lab_id,
            "true only where a live record was"
        );
    }
    let index = repo.index(&w).await.unwrap();
    assert_eq!(index[&updated.lab_id], Existing::Tombstoned);
    assert_eq!(index[&recreated.lab_id], Existing::Tombstoned);
    assert!(repo.get(&w, &updated.lab_id).await.unwrap().is_none());
    assert_eq!(titles(&repo.list(&w).await.unwrap()), ["k"]);

    // A refresh that listed them before the delete writes late.
    let late = vec![
        event(LabEventKind::Changed, &w, updated.lab_id),
        event(LabEventKind::Discovered, &w, recreated.lab_id),
        event(LabEventKind::Changed, &w, kept.lab_id),
    ];
    let out = repo
        .apply(
            &w,
            RecordChanges {
                fence: 1,
                // A new lab first: the refused create is not the first.
                create: vec![record(&w, lab(), "new"), recreated.clone()],
                update: vec![
                    changed(updated.clone(), "late"),
                    changed(kept.clone(), "k2"),
                ],
                events: late.clone(),
                ..RecordChanges::default()
            },
            HISTORY,
        )
        .await
        .unwrap();
    let mut suppressed = out.suppressed.clone();
    suppressed.sort();
    let mut expected = vec![updated.lab_id, recreated.lab_id];
    expected.sort();
    assert_eq!(suppressed, expected, "{out:?}");
    assert_eq!((out.created, out.updated), (1, 1), "{out:?}");
    for id in [updated.lab_id, recreated.lab_id] {
        let d = raw(&db, &w, id).await.unwrap();
        assert!(
            d.contains_key("tombstone") && !d.contains_key("title"),
            "{d}"
        );
    }
    let status = outbox_status(&db).await;
    assert!(
        !status.contains_key(&late[0].id) && !status.contains_key(&late[1].id),
        "refused changes are not announced"
    );
    assert_eq!(status[&late[2].id], "pending");
    assert_eq!(
        db.collection::<Document>(collections::AUDIT)
            .count_documents(doc! {})
            .await
            .unwrap(),
        2
    );
}

#[tokio::test]
async fn an_expired_tombstone_hides_nothing_and_gives_way_to_a_create() {
    let (_db, repo) = store().await;
    let w = worker("cml-1");
    let r = record(&w, lab(), "back");
    repo.tombstone(
        &w,
        &r.lab_id,
        tombstone(TimeDelta::seconds(-1)),
        event(LabEventKind::Deleted, &w, r.lab_id),
        audit(&w, r.lab_id),
    )
    .await
    .unwrap();
    assert!(
        repo.index(&w).await.unwrap().is_empty(),
        "expired: not in the index"
    );
    create(&repo, &w, vec![r.clone()], 1).await;
    assert_eq!(repo.get(&w, &r.lab_id).await.unwrap(), Some(r));

    // A live tombstone first in a batch: only it is refused.
    let (buried, fresh) = (record(&w, lab(), "buried"), record(&w, lab(), "fresh"));
    repo.tombstone(
        &w,
        &buried.lab_id,
        tombstone(TimeDelta::days(1)),
        event(LabEventKind::Deleted, &w, buried.lab_id),
        audit(&w, buried.lab_id),
    )
    .await
    .unwrap();
    let both = RecordChanges {
        fence: 1,
        create: vec![buried.clone(), fresh.clone()],
        ..RecordChanges::default()
    };
    let out = repo.apply(&w, both, HISTORY).await.unwrap();
    assert_eq!((out.created, out.suppressed), (1, vec![buried.lab_id]));
    assert_eq!(repo.get(&w, &fresh.lab_id).await.unwrap(), Some(fresh));
}

#[tokio::test]
async fn concurrent_deletes_each_learn_whether_their_lab_had_a_record() {
    let (db, repo) = store().await;
    let w = worker("cml-1");
    let live: Vec<LabRecord> = (0..40)
        .map(|n| record(&w, lab(), &format!("l{n}")))
        .collect();
    create(&repo, &w, live.clone(), 1).await;
    let absent: Vec<LabId> = (0..40).map(|_| lab()).collect();
    // The same labs again, now tombstoned: no record any more.
    let mut jobs: Vec<(LabId, bool)> = live.iter().map(|r| (r.lab_id, true)).collect();
    jobs.extend(absent.iter().map(|&id| (id, false)));
    let run = |jobs: Vec<(LabId, bool)>| {
        futures::future::join_all(jobs.into_iter().map(|(id, expected)| {
            let (repo, w) = (repo.clone(), w.clone());
            async move {
                let had = repo
                    .tombstone(
                        &w,
                        &id,
                        tombstone(TimeDelta::days(1)),
                        event(LabEventKind::Deleted, &w, id),
                        audit(&w, id),
                    )
                    .await
                    .unwrap();
                (id, had, expected)
            }
        }))
    };
    for (id, had, expected) in run(jobs.clone()).await {
        assert_eq!(had, expected, "lab {id}");
    }
    for (id, had, _) in run(jobs.clone()).await {
        assert!(!had, "lab {id} was already tombstoned");
    }
    let labs = db.collection::<Document>(collections::LABS);
    assert_eq!(
        labs.count_documents(doc! {}).await.unwrap(),
        80,
        "one document per lab"
    );
    assert_eq!(
        labs.count_documents(doc! {"tombstone": {"$exists": true}})
            .await
            .unwrap(),
        80
    );
    assert_eq!(
        db.collection::<Document>(collections::OUTBOX)
            .count_documents(doc! {})
            .await
            .unwrap(),
        160
    );
    assert_eq!(
        db.collection::<Document>(collections::AUDIT)
            .count_documents(doc! {})
            .await
            .unwrap(),
        160
    );
}

#[tokio::test]
async fn a_delete_attempt_goes_into_the_history_of_a_live_record_only() {
    let (db, repo) = store().await;
    let w = worker("cml-1");
    let r = record(&w, lab(), "running");
    create(&repo, &w, vec![r.clone()], 1).await;
    let entry = HistoryEntry {
        at: now(),
        event: HistoryEvent::DeleteAttempt {
            requested_by: Actor::api("test"),
            force: false,
            outcome: "refused_running".into(),
            detail: "the lab is running".into(),
        },
    };
    for (id, expected) in [(r.lab_id, true), (lab(), false)] {
        let had = repo
            .add_history(
                &w,
                &id,
                entry.clone(),
                HISTORY,
                event(LabEventKind::DeleteFailed, &w, id),
                audit(&w, id),
            )
            .await
            .unwrap();
        assert_eq!(had, expected);
    }
    let stored = repo.get(&w, &r.lab_id).await.unwrap().unwrap();
    assert_eq!(stored.history.last(), Some(&entry));
    assert_eq!(stored.history.len(), 2, "created, then the attempt");
    for c in [collections::OUTBOX, collections::AUDIT] {
        let n = db
            .collection::<Document>(c)
            .count_documents(doc! {})
            .await
            .unwrap();
        assert_eq!(n, 2, "{c}: written with or without a record");
    }
}

// ---------------------------------------------------------------- fencing

#[tokio::test]
async fn an_older_run_neither_updates_nor_prunes_what_a_newer_run_wrote() {
    let (db, repo) = store().await;
    let w = worker("cml-1");
    let (a, b) = (record(&w, lab(), "a"), record(&w, lab(), "b"));
    create(&repo, &w, vec![a.clone(), b.clone()], 7).await;
    let stale = vec![
        event(LabEventKind::Changed, &w, a.lab_id),
        event(LabEventKind::Pruned, &w, b.lab_id),
    ];
    let out = repo
        .apply(
            &w,
            RecordChanges {
                fence: 6,
                update: vec![changed(a.clone(), "stale")],
                prune: vec![b.lab_id],
                events: stale.clone(),
                ..RecordChanges::default()
            },
            HISTORY,
        )
        .await
        .unwrap();
    assert_eq!((out.updated, out.pruned), (0, 0), "{out:?}");
    assert_eq!(out.not_pruned, vec![b.lab_id]);
    assert_eq!(repo.get(&w, &a.lab_id).await.unwrap(), Some(a.clone()));
    assert!(
        outbox_status(&db).await.is_empty(),
        "nothing stale is announced"
    );

    let out = repo
        .apply(
            &w,
            RecordChanges {
                fence: 7,
                update: vec![changed(a.clone(), "same run")],
                prune: vec![b.lab_id],
                ..RecordChanges::default()
            },
            HISTORY,
        )
        .await
        .unwrap();
    assert_eq!(
        (out.updated, out.pruned),
        (1, 1),
        "the same fence may: {out:?}"
    );
    assert_eq!(
        raw(&db, &w, a.lab_id)
            .await
            .unwrap()
            .get_i64("fence")
            .unwrap(),
        7
    );
}

#[tokio::test]
async fn records_written_before_fencing_are_updated_and_pruned_by_any_run() {
    let (db, repo) = store().await;
    let w = worker("cml-1");
    let (a, b) = (record(&w, lab(), "a"), record(&w, lab(), "b"));
    create(&repo, &w, vec![a.clone(), b.clone()], 1).await;
    let unfence = || async {
        db.collection::<Document>(collections::LABS)
            .update_many(doc! {}, doc! {"$unset": {"fence": ""}})
            .await
            .unwrap();
    };
    // An update alone, then a prune alone: each must see the old records.
    unfence().await;
    let only_update = RecordChanges {
        fence: 3,
        update: vec![changed(a.clone(), "a2")],
        ..RecordChanges::default()
    };
    let out = repo.apply(&w, only_update, HISTORY).await.unwrap();
    assert_eq!((out.updated, out.suppressed.len()), (1, 0), "{out:?}");
    unfence().await;
    let only_prune = RecordChanges {
        fence: 3,
        prune: vec![b.lab_id],
        ..RecordChanges::default()
    };
    let out = repo.apply(&w, only_prune, HISTORY).await.unwrap();
    assert_eq!(out.pruned, 1, "{out:?}");
}

// ---------------------------------------------------------------- limits

fn with_notes(mut r: LabRecord, bytes: usize) -> LabRecord {
    r.snapshot.notes = "n".repeat(bytes);
    r.content_hash = r.snapshot.content_hash();
    r
}

#[tokio::test]
async fn a_record_over_the_document_limit_is_that_labs_failure_and_the_rest_is_written() {
    let (db, repo) = store().await;
    let w = worker("cml-1");
    let small = record(&w, lab(), "small");
    let big = with_notes(record(&w, lab(), "big"), 2 * 1024 * 1024);
    let huge = with_notes(record(&w, lab(), "huge"), 17 * 1024 * 1024);
    // Within 64 KiB of the limit: the server adds to a document.
    let edge = with_notes(record(&w, lab(), "edge"), 16 * 1024 * 1024 - 32 * 1024);
    let events: Vec<LabEvent> = [&small, &big, &huge, &edge]
        .iter()
        .map(|r| event(LabEventKind::Discovered, &w, r.lab_id))
        .collect();
    let out = repo
        .apply(
            &w,
            RecordChanges {
                fence: 1,
                create: vec![small.clone(), big.clone(), huge.clone(), edge.clone()],
                events: events.clone(),
                ..RecordChanges::default()
            },
            HISTORY,
        )
        .await
        .unwrap();
    assert_eq!(out.created, 2, "{:?}", (out.created, &out.suppressed));
    let refused: Vec<LabId> = out.too_large.iter().map(|(id, _)| *id).collect();
    assert_eq!(refused, vec![huge.lab_id, edge.lab_id]);
    assert!(
        out.too_large[0].1.contains("bytes") && out.too_large[0].1.contains("MongoDB"),
        "{}",
        out.too_large[0].1
    );
    let status = outbox_status(&db).await;
    assert_eq!(status.len(), 2, "only the written labs are announced");
    assert_eq!(status[&events[1].id], "pending");

    // The same for an update that would outgrow the limit.
    let grown = with_notes(small.clone(), 17 * 1024 * 1024);
    let mut u = changed(small.clone(), "grown");
    u.record.snapshot.notes = grown.snapshot.notes;
    let out = repo
        .apply(
            &w,
            RecordChanges {
                fence: 1,
                update: vec![u, changed(big.clone(), "big2")],
                ..RecordChanges::default()
            },
            HISTORY,
        )
        .await
        .unwrap();
    assert_eq!(out.updated, 1);
    assert_eq!(
        out.too_large.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        vec![small.lab_id]
    );
    assert_eq!(repo.get(&w, &small.lab_id).await.unwrap(), Some(small));
}

#[tokio::test]
async fn updates_of_many_large_records_all_land() {
    let (_db, repo) = store().await;
    let w = worker("cml-1");
    let records: Vec<LabRecord> = (0..40)
        .map(|n| with_notes(record(&w, lab(), &format!("r{n}")), 500 * 1024))
        .collect();
    create(&repo, &w, records.clone(), 1).await;
    let updates: Vec<RecordUpdate> = records
        .iter()
        .map(|r| changed(r.clone(), "changed"))
        .collect();
    let out = repo
        .apply(
            &w,
            RecordChanges {
                fence: 1,
                update: updates.clone(),
                ..RecordChanges::default()
            },
            HISTORY,
        )
        .await
        .unwrap();
    assert_eq!(out.updated, 40, "{:?}", out.too_large);
    for u in &updates {
        assert_eq!(
            repo.get(&w, &u.record.lab_id).await.unwrap().as_ref(),
            Some(&u.record)
        );
    }
}

// ---------------------------------------------------------------- staged events

#[tokio::test]
async fn staged_events_of_a_dead_run_are_released_if_their_change_was_made_and_dropped_if_not() {
    let (db, repo) = store().await;
    let w = worker("cml-1");
    let (made, not_made, pruned, not_pruned, buried) = (
        record(&w, lab(), "made"),
        record(&w, lab(), "not made"),
        record(&w, lab(), "pruned"),
        record(&w, lab(), "still here"),
        record(&w, lab(), "buried"),
    );
    create(
        &repo,
        &w,
        vec![
            made.clone(),
            not_made.clone(),
            not_pruned.clone(),
            buried.clone(),
        ],
        1,
    )
    .await;
    repo.tombstone(
        &w,
        &buried.lab_id,
        tombstone(TimeDelta::days(1)),
        event(LabEventKind::Deleted, &w, buried.lab_id),
        audit(&w, buried.lab_id),
    )
    .await
    .unwrap();
    let outbox = db.collection::<Document>(collections::OUTBOX);
    let staged = [
        (
            event(LabEventKind::Changed, &w, made.lab_id),
            Some(made.content_hash.to_string()),
            "pending",
        ),
        (
            event(LabEventKind::Changed, &w, not_made.lab_id),
            Some("0000000000000000".to_owned()),
            "dropped",
        ),
        (
            event(LabEventKind::Pruned, &w, pruned.lab_id),
            None,
            "pending",
        ),
        (
            event(LabEventKind::Pruned, &w, not_pruned.lab_id),
            None,
            "dropped",
        ),
        (
            event(LabEventKind::Changed, &w, buried.lab_id),
            Some(buried.content_hash.to_string()),
            "dropped",
        ),
        (
            event(LabEventKind::Pruned, &w, buried.lab_id),
            None,
            "dropped",
        ),
    ];
    for (e, target, _) in &staged {
        outbox
            .insert_one(outbox::staged_doc(e, RETENTION, target.clone()).unwrap())
            .await
            .unwrap();
    }
    let other = event(LabEventKind::Changed, &worker("cml-2"), made.lab_id);
    outbox
        .insert_one(outbox::staged_doc(&other, RETENTION, None).unwrap())
        .await
        .unwrap();

    assert_eq!(repo.settle_staged_events(&w).await.unwrap(), (2, 4));
    let status = outbox_status(&db).await;
    for (e, _, expected) in &staged {
        match *expected {
            "dropped" => assert!(!status.contains_key(&e.id), "{:?} {}", e.kind, e.lab_id),
            s => assert_eq!(status[&e.id], s, "{:?}", e.kind),
        }
    }
    assert_eq!(
        status[&other.id],
        outbox::STAGED,
        "another worker's run is not settled"
    );
    assert_eq!(
        repo.settle_staged_events(&w).await.unwrap(),
        (0, 0),
        "settled once"
    );
}

// ---------------------------------------------------------------- lease

fn lease_store(db: &Database) -> MongoRefreshLease {
    MongoRefreshLease::new(db)
}

async fn lease_doc(db: &Database, w: &WorkerId) -> Document {
    db.collection::<Document>(collections::LEASES)
        .find_one(doc! {"_id": w.as_str()})
        .await
        .unwrap()
        .unwrap()
}

const TTL: Duration = Duration::from_secs(60);

#[tokio::test]
async fn one_holder_at_a_time_and_every_grant_outranks_the_last() {
    let db = labsync_test_support::test_database().await;
    let (one, two) = (lease_store(&db), lease_store(&db));
    let w = worker("cml-1");
    let first = one
        .try_acquire(&w, "one", TTL)
        .await
        .unwrap()
        .expect("free");
    let server_ms = lease_doc(&db, &w)
        .await
        .get_datetime("acquired_at")
        .unwrap()
        .timestamp_millis();
    assert_eq!(
        first,
        u64::try_from(server_ms).unwrap(),
        "the epoch is the server's time"
    );
    assert_eq!(
        lease_doc(&db, &w).await.get_i64("epoch").unwrap(),
        i64::try_from(first).unwrap()
    );
    assert_eq!(two.try_acquire(&w, "two", TTL).await.unwrap(), None, "held");
    assert!(
        two.try_acquire(&worker("cml-2"), "two", TTL)
            .await
            .unwrap()
            .is_some(),
        "per worker"
    );

    let again = one
        .try_acquire(&w, "one", TTL)
        .await
        .unwrap()
        .expect("ours");
    assert!(again > first);
    assert!(!two.renew(&w, "two", TTL).await.unwrap(), "not the holder");
    two.release(&w, "two").await.unwrap();
    assert_eq!(
        two.try_acquire(&w, "two", TTL).await.unwrap(),
        None,
        "a stranger's release frees nothing"
    );

    one.release(&w, "one").await.unwrap();
    let third = two
        .try_acquire(&w, "two", TTL)
        .await
        .unwrap()
        .expect("released");
    assert!(third > again);
    assert!(
        !one.renew(&w, "one", TTL).await.unwrap(),
        "the old holder lost it"
    );
}

#[tokio::test]
async fn a_lease_expires_by_the_servers_clock_and_a_renewal_moves_its_expiry() {
    let db = labsync_test_support::test_database().await;
    let (one, two) = (lease_store(&db), lease_store(&db));
    let w = worker("cml-1");
    one.try_acquire(&w, "one", Duration::ZERO)
        .await
        .unwrap()
        .expect("free");
    assert!(
        two.try_acquire(&w, "two", TTL).await.unwrap().is_some(),
        "expired at once"
    );

    let before = lease_doc(&db, &w)
        .await
        .get_datetime("expires_at")
        .unwrap()
        .to_chrono();
    assert!(
        two.renew(&w, "two", Duration::from_secs(3600))
            .await
            .unwrap()
    );
    let after = lease_doc(&db, &w)
        .await
        .get_datetime("expires_at")
        .unwrap()
        .to_chrono();
    assert!(
        after - before > TimeDelta::minutes(50),
        "{before} -> {after}"
    );
}

#[tokio::test]
async fn a_grant_outranks_a_previous_epoch_even_from_a_clock_that_ran_ahead() {
    let db = labsync_test_support::test_database().await;
    let lease = lease_store(&db);
    let w = worker("cml-1");
    let ahead = now().timestamp_millis() + 86_400_000;
    db.collection::<Document>(collections::LEASES)
        .insert_one(doc! {"_id": w.as_str(), "holder": "", "expires_at": DateTime::<Utc>::UNIX_EPOCH, "epoch": ahead})
        .await
        .unwrap();
    let epoch = lease.try_acquire(&w, "one", TTL).await.unwrap().unwrap();
    assert_eq!(epoch, u64::try_from(ahead + 1).unwrap());
}

#[tokio::test]
async fn a_revoked_lease_is_lost_by_its_holder_and_taken_by_nobody_until_it_expires() {
    let db = labsync_test_support::test_database().await;
    let (one, two) = (lease_store(&db), lease_store(&db));
    let w = worker("cml-1");
    let before = one.try_acquire(&w, "one", TTL).await.unwrap().unwrap();
    two.revoke(&w, TTL).await.unwrap();
    assert!(!one.renew(&w, "one", TTL).await.unwrap());
    assert_eq!(one.try_acquire(&w, "one", TTL).await.unwrap(), None);
    assert_eq!(two.try_acquire(&w, "two", TTL).await.unwrap(), None);
    assert!(lease_doc(&db, &w).await.get_i64("epoch").unwrap() > i64::try_from(before).unwrap());
    // A revoke of a worker never leased leaves a lease nobody holds.
    two.revoke(&worker("cml-9"), TTL).await.unwrap();
    assert_eq!(
        one.try_acquire(&worker("cml-9"), "one", TTL).await.unwrap(),
        None
    );
}

#[tokio::test]
async fn a_run_whose_release_failed_does_not_block_the_next_run_of_its_process() {
    let mut server = labsync_test_support::MongoServer::start().unwrap();
    let client =
        mongodb::Client::with_uri_str(format!("{}&serverSelectionTimeoutMS=1000", server.uri()))
            .await
            .unwrap();
    let db = client.database("lease");
    let (ours, theirs) = (lease_store(&db), lease_store(&db));
    let w = worker("cml-1");
    ours.try_acquire(&w, "run-1", TTL).await.unwrap().unwrap();
    server.stop();
    assert!(ours.release(&w, "run-1").await.is_err());
    server.restart().unwrap();
    labsync_test_support::eventually("the server is back", || async {
        db.run_command(doc! {"ping": 1}).await.is_ok()
    })
    .await;
    assert_eq!(
        theirs.try_acquire(&w, "other", TTL).await.unwrap(),
        None,
        "still held for others"
    );
    assert!(
        ours.try_acquire(&w, "run-2", TTL).await.unwrap().is_some(),
        "taken over by its own process"
    );
}

// ---------------------------------------------------------------- delete requests

fn delete_request(w: &WorkerId, lab: LabId) -> labsync_application::DeleteRequest {
    let at = now();
    labsync_application::DeleteRequest {
        id: uuid::Uuid::new_v4().to_string(),
        worker_id: w.clone(),
        lab_id: lab,
        force: false,
        requested_by: Actor::api("test"),
        owned_by: Some("alex".into()),
        status: labsync_application::DeleteRequestStatus::Pending,
        attempts: 0,
        created_at: at,
        updated_at: at,
        next_attempt_at: at,
        last_error: None,
        outcome: None,
        cancelled_by: None,
        cancel_requested_by: None,
    }
}

/// A failed run's report with `error` and `failures` as given.
fn failed_run(w: &WorkerId, error: String, failures: Vec<LabFailure>) -> RunReport {
    RunReport {
        run_id: uuid::Uuid::new_v4().to_string(),
        worker_id: w.clone(),
        trigger: Trigger::Schedule,
        status: RunStatus::Failed,
        dry_run: false,
        force_prune: false,
        started_at: now(),
        finished_at: now(),
        duration_ms: 12,
        listed: 7,
        created: 1,
        updated: 2,
        unchanged: 3,
        pruned: 0,
        held: 0,
        failed: failures.len() as u64,
        suppressed: 0,
        invalid_ids: 0,
        hold_reason: None,
        skip_reason: None,
        error: Some(error),
        failures,
        held_labs: Vec::new(),
        note: None,
        alive_at: None,
    }
}

/// The worker's newest run.
fn newest(w: &WorkerId) -> RunQuery {
    RunQuery::newest(Some(w), 1)
}

#[tokio::test]
async fn a_running_report_is_replaced_by_how_the_run_ended_and_a_dead_ones_is_marked_failed() {
    let db = labsync_test_support::test_database().await;
    ensure_indexes(&db).await.unwrap();
    let reports = MongoRunReports::new(&db);
    let feed = MongoEventFeed::new(&db);
    let w = worker("cml-1");
    let before = now() - TimeDelta::seconds(1);

    let mut live = failed_run(&w, String::new(), vec![]);
    live.status = RunStatus::Running;
    live.error = None;
    reports.store(&live).await.unwrap();
    assert_eq!(reports.get(&live.run_id).await.unwrap(), Some(live.clone()));
    let running = |status| RunQuery {
        worker: None,
        status: Some(status),
        outcomes_only: false,
        limit: 10,
    };
    assert_eq!(
        reports
            .recent(&running(RunStatus::Running))
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(
        feed.visible_since(before, None, 100)
            .await
            .unwrap()
            .is_empty(),
        "a running report is not an event"
    );

    let mut ended = live.clone();
    ended.status = RunStatus::Succeeded;
    ended.created = 9;
    reports
        .store(&ended)
        .await
        .expect("replaces the running report");
    assert_eq!(
        reports.get(&live.run_id).await.unwrap(),
        Some(ended.clone())
    );
    assert!(
        reports
            .recent(&running(RunStatus::Running))
            .await
            .unwrap()
            .is_empty()
    );
    let events = feed.visible_since(before, None, 100).await.unwrap();
    assert_eq!(events.len(), 1, "the finished run is one event");
    let event_id = format!("{}.succeeded", ended.run_id);
    assert_eq!(
        (
            events[0].kind.as_str(),
            events[0].id.as_str(),
            events[0].lab_id.as_ref()
        ),
        (RUN_FINISHED, event_id.as_str(), None)
    );
    assert_eq!(events[0].cloudevent["data"]["status"], "succeeded");
    assert_eq!(
        feed.visible_at(&event_id).await.unwrap(),
        Some(events[0].visible_at),
        "a reconnect resumes after a run's event too"
    );

    // A run whose process died: silent for ten minutes, still `running`.
    let mut dead = live.clone();
    dead.run_id = uuid::Uuid::new_v4().to_string();
    dead.started_at = now() - TimeDelta::minutes(10);
    dead.alive_at = Some(dead.started_at);
    // One queued as long, whose process says it is alive.
    let mut queued = dead.clone();
    queued.run_id = uuid::Uuid::new_v4().to_string();
    let mut young = dead.clone();
    young.run_id = uuid::Uuid::new_v4().to_string();
    young.started_at = now();
    young.alive_at = Some(now());
    for r in [&dead, &queued, &young] {
        reports.store(r).await.unwrap();
    }
    reports
        .keep_alive(std::slice::from_ref(&queued.run_id), now())
        .await
        .unwrap();
    let n = reports
        .abandon_running(
            &w,
            now() - TimeDelta::minutes(1),
            now(),
            labsync_application::refresh::ABANDONED,
        )
        .await
        .unwrap();
    assert_eq!(n, 1, "only the one silent for longer than the lease");
    let back = reports.get(&dead.run_id).await.unwrap().unwrap();
    assert_eq!(back.status, RunStatus::Failed);
    assert_eq!(
        back.error.as_deref(),
        Some(labsync_application::refresh::ABANDONED)
    );
    for live in [&young, &queued] {
        assert_eq!(
            reports.get(&live.run_id).await.unwrap().unwrap().status,
            RunStatus::Running,
            "a run that may still be live is left alone"
        );
    }
    // An ended report is not said alive again.
    reports
        .keep_alive(std::slice::from_ref(&dead.run_id), now())
        .await
        .unwrap();
    assert_eq!(
        reports.get(&dead.run_id).await.unwrap().unwrap().alive_at,
        dead.alive_at
    );
    // Its ending is an event of its own.
    let events = feed.visible_since(before, None, 100).await.unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.id == format!("{}.failed", dead.run_id)),
        "{events:?}"
    );
    assert_eq!(reports.get("no-such-run").await.unwrap(), None);
}

#[tokio::test]
async fn one_active_delete_request_per_lab_and_an_ended_one_frees_the_lab() {
    use labsync_application::{DeleteRequestStatus, DeleteRequests};
    let db = labsync_test_support::test_database().await;
    ensure_indexes(&db).await.unwrap();
    let requests = labsync_infrastructure::mongo::MongoDeleteRequests::new(&db);
    let w = worker("cml-1");
    let id = lab();
    let submits: Vec<_> = (0..20).map(|_| delete_request(&w, id)).collect();
    let answers =
        futures::future::join_all(submits.iter().map(|r| requests.create_unless_active(r))).await;
    let answers: Vec<_> = answers.into_iter().map(Result::unwrap).collect();
    assert_eq!(
        answers.iter().filter(|(_, new)| *new).count(),
        1,
        "one stored"
    );
    let first = answers.iter().find(|(_, new)| *new).unwrap().0.clone();
    assert!(
        answers.iter().all(|(r, _)| r.id == first.id),
        "every submit gets it"
    );
    assert_eq!(
        db.collection::<Document>("delete_requests")
            .count_documents(doc! {})
            .await
            .unwrap(),
        1
    );
    // A lock left by a process that died before storing its request.
    db.collection::<Document>("delete_request_locks")
        .insert_one(doc! {"_id": format!("{w}/{}", lab_for_stale()), "request": "gone"})
        .await
        .unwrap();
    let (healed, new) = requests
        .create_unless_active(&delete_request(&w, lab_for_stale()))
        .await
        .unwrap();
    assert!(new, "a stale lock gives way: {healed:?}");

    let hold = Duration::from_secs(60);
    let claimed = requests
        .claim_due(now(), hold, "c1", &[])
        .await
        .unwrap()
        .unwrap();
    assert!(
        requests
            .claim_due(now(), hold, "c2", std::slice::from_ref(&w))
            .await
            .unwrap()
            .is_none(),
        "one at a time per worker"
    );
    assert_eq!(claimed.status, DeleteRequestStatus::Running);
    assert!(
        requests
            .claim_due(now(), hold, "c2", std::slice::from_ref(&w))
            .await
            .unwrap()
            .is_none(),
        "the worker is busy"
    );
    let mut done = claimed.clone();
    done.status = DeleteRequestStatus::Done;
    assert!(requests.save(&done, "c1").await.unwrap());
    let (next, new) = requests
        .create_unless_active(&delete_request(&w, claimed.lab_id))
        .await
        .unwrap();
    assert!(new, "the ended request freed its lab: {next:?}");
}

fn lab_for_stale() -> LabId {
    LabId::parse("0b5e7a1e-0000-4000-8000-000000000001").unwrap()
}

#[tokio::test]
async fn a_cancelled_request_is_never_claimed_and_a_running_one_ends_cancelled_instead_of_retrying()
{
    use labsync_application::{DeleteRequestStatus, DeleteRequests};
    let db = labsync_test_support::test_database().await;
    ensure_indexes(&db).await.unwrap();
    let requests = labsync_infrastructure::mongo::MongoDeleteRequests::new(&db);
    let hold = Duration::from_secs(60);
    let (w1, w2) = (worker("cml-1"), worker("cml-2"));
    let (pending, _) = requests
        .create_unless_active(&delete_request(&w1, lab()))
        .await
        .unwrap();
    let c = requests
        .cancel(&pending.id, &Actor::api("a"), now())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            c.status,
            c.cancelled_by.as_ref().map(ToString::to_string).as_deref()
        ),
        (DeleteRequestStatus::Cancelled, Some("api:a"))
    );
    assert!(
        requests
            .claim_due(now(), hold, "c", &[])
            .await
            .unwrap()
            .is_none()
    );
    let (again, new) = requests
        .create_unless_active(&delete_request(&w1, pending.lab_id))
        .await
        .unwrap();
    assert!(new, "cancelling frees the lab: {again:?}");
    requests
        .cancel(&again.id, &Actor::api("a"), now())
        .await
        .unwrap();

    let (running, _) = requests
        .create_unless_active(&delete_request(&w2, lab()))
        .await
        .unwrap();
    let mut attempt = requests
        .claim_due(now(), hold, "c2", &[])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(attempt.id, running.id);
    let asked = requests
        .cancel(&running.id, &Actor::api("b"), now())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(asked.status, DeleteRequestStatus::Running);
    assert_eq!(
        asked
            .cancel_requested_by
            .as_ref()
            .map(ToString::to_string)
            .as_deref(),
        Some("api:b")
    );
    attempt.status = DeleteRequestStatus::Pending;
    attempt.attempts = 1;
    assert!(requests.save(&attempt, "c2").await.unwrap());
    let ended = requests.get(&running.id).await.unwrap().unwrap();
    assert_eq!(
        (
            ended.status,
            ended
                .cancelled_by
                .as_ref()
                .map(ToString::to_string)
                .as_deref(),
            ended.attempts
        ),
        (DeleteRequestStatus::Cancelled, Some("api:b"), 1)
    );
    assert!(
        requests
            .claim_due(now(), hold, "c3", &[])
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        requests
            .cancel("no-such", &Actor::api("x"), now())
            .await
            .unwrap(),
        None
    );
}

#[tokio::test]
async fn a_run_report_too_large_for_a_document_is_stored_cut_down_with_a_note_saying_so() {
    let db = labsync_test_support::test_database().await;
    let reports = MongoRunReports::new(&db);
    let w = worker("cml-1");

    // As it is when it fits.
    let small = failed_run(&w, "CML failed (500): boom".into(), vec![]);
    reports.store(&small).await.expect("stored");
    assert_eq!(reports.recent(&newest(&w)).await.unwrap(), [small]);

    // 17 MiB of error and 40 failures of 64 KB: over the 16 MiB a MongoDB
    // document may hold, which the test server would take all the same.
    let failures: Vec<LabFailure> = (0..40)
        .map(|_| LabFailure {
            lab_id: lab(),
            error: "f".repeat(64 << 10),
        })
        .collect();
    let large = failed_run(&w, format!("\u{1b}[2J{}", "e".repeat(17 << 20)), failures);
    reports.store(&large).await.expect("stored");
    let stored = db
        .collection::<Document>(collections::REFRESH_RUNS)
        .find_one(doc! {"_id": &large.run_id})
        .await
        .unwrap()
        .expect("the large report is stored");
    let size = mongodb::bson::to_vec(&stored).unwrap().len();
    assert!(size <= 16 << 20, "stored at {size} bytes");
    let back = reports.recent(&newest(&w)).await.unwrap().remove(0);
    assert_eq!(back.run_id, large.run_id);
    assert_eq!(
        (back.status, back.listed, back.failed),
        (RunStatus::Failed, 7, 40),
        "the counts are kept"
    );
    assert_eq!(back.failures.len(), 20);
    let ids = |f: &[LabFailure]| f.iter().map(|f| f.lab_id).collect::<Vec<_>>();
    assert_eq!(
        ids(&back.failures),
        ids(&large.failures[..20]),
        "the first 20, in order"
    );
    assert!(back.failures.iter().all(|f| f.error.len() <= 4100));
    let error = back.error.unwrap();
    assert!(
        error.starts_with("\\u{1b}[2Jeee") && error.len() <= 4100,
        "{error:.100}"
    );
    let note = back.note.expect("a note says it was cut down");
    assert!(
        note.contains("cut down") && note.contains("20 failures left out"),
        "{note}"
    );
}

// ---------------------------------------------------------------- driver errors

#[tokio::test]
async fn driver_errors_are_translated_once_by_their_codes() {
    use labsync_application::RepoError;
    use labsync_infrastructure::mongo::{error_code, map_error};
    let db = labsync_test_support::test_database().await;
    ensure_indexes(&db).await.unwrap();
    let leases = db.collection::<Document>(collections::LEASES);
    leases.insert_one(doc! {"_id": "x"}).await.unwrap();
    let dup = leases.insert_one(doc! {"_id": "x"}).await.unwrap_err();
    assert_eq!(error_code(&dup), Some(11000));
    assert!(matches!(map_error(dup), RepoError::Duplicate(_)));
    let unknown = db.run_command(doc! {"noSuchCommand": 1}).await.unwrap_err();
    let code = error_code(&unknown).expect("a command error has a code");
    assert_ne!(code, 11000);
    assert!(matches!(map_error(unknown), RepoError::Other(_)));
}

#[tokio::test]
async fn an_old_lease_expiry_index_goes_and_indexes_are_made_twice_alike() {
    let db = labsync_test_support::test_database().await;
    let leases = db.collection::<Document>(collections::LEASES);
    leases
        .create_index(
            mongodb::IndexModel::builder()
                .keys(doc! {"expires_at": 1})
                .options(
                    mongodb::options::IndexOptions::builder()
                        .name("lease_ttl".to_owned())
                        .expire_after(Duration::ZERO)
                        .build(),
                )
                .build(),
        )
        .await
        .unwrap();
    ensure_indexes(&db).await.unwrap();
    assert!(
        !leases
            .list_index_names()
            .await
            .unwrap()
            .contains(&"lease_ttl".to_owned())
    );
    ensure_indexes(&db).await.expect("a second start-up");
}

#[tokio::test]
async fn an_invalid_mongodb_uri_is_refused_without_showing_it() {
    let settings: labsync_infrastructure::configuration::MongoSettings =
        serde_json::from_value(serde_json::json!({
            "uri": "mongodb://labsync:pa55-secret@db.invalid:99999/?authSource=admin",
            "database": "labsync",
            "server_selection_timeout_ms": 1000,
            "connect_timeout_ms": 1000,
        }))
        .unwrap();
    let err = labsync_infrastructure::mongo::connect(&settings)
        .await
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "cannot use MongoDB database \"labsync\": invalid MongoDB URI (value not shown: it may contain credentials)"
    );
}

// ---------------------------------------------------------------- event relay

/// A sink on a bare socket: answers each POST with the status `script`
/// gives its number, after `delay`, and records the events' ids and the
/// most requests it had in flight at once.
#[derive(Clone, Default)]
struct Sink {
    received: std::sync::Arc<std::sync::Mutex<Vec<(String, u16)>>>,
    in_flight: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    max_in_flight: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Sink {
    async fn start(delay: Duration, script: fn(usize) -> u16) -> (Self, String) {
        use std::sync::atomic::Ordering::SeqCst;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let sink = Self::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/events", listener.local_addr().unwrap());
        let s = sink.clone();
        tokio::spawn(async move {
            loop {
                let (mut conn, _) = listener.accept().await.unwrap();
                let s = s.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let n = conn.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        let text = String::from_utf8_lossy(&buf).to_string();
                        let Some(end) = text.find("\r\n\r\n") else {
                            continue;
                        };
                        let length = text[..end]
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap())
                            })
                            .unwrap_or(0);
                        if buf.len() < end + 4 + length {
                            continue;
                        }
                        let body: serde_json::Value =
                            serde_json::from_slice(&buf[end + 4..end + 4 + length]).unwrap();
                        buf.drain(..end + 4 + length);
                        let now = s.in_flight.fetch_add(1, SeqCst) + 1;
                        s.max_in_flight.fetch_max(now, SeqCst);
                        tokio::time::sleep(delay).await;
                        let status = {
                            let mut r = s.received.lock().unwrap();
                            let status = script(r.len());
                            r.push((body["id"].as_str().unwrap().to_owned(), status));
                            status
                        };
                        s.in_flight.fetch_sub(1, SeqCst);
                        let answer = format!(
                            "HTTP/1.1 {status} X\r\nlocation: http://127.0.0.1:9/elsewhere\r\ncontent-length: 0\r\n\r\n"
                        );
                        if conn.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (sink, url)
    }

    fn received(&self) -> Vec<(String, u16)> {
        self.received.lock().unwrap().clone()
    }
}

fn relay(
    db: &Database,
    url: &str,
    max_in_flight: usize,
    metrics: &labsync_infrastructure::metrics::Metrics,
) -> outbox::EventRelay {
    outbox::EventRelay::new(
        db,
        outbox::RelaySettings {
            sink_url: Some(url.to_owned().into()),
            poll_interval: Duration::from_millis(10),
            request_timeout: Duration::from_secs(10),
            backoff: labsync_application::retry::Backoff {
                base: labsync_infrastructure::mongo::outbox::RELAY_BACKOFF_BASE,
                max: Duration::from_secs(60),
            },
            max_in_flight,
        },
        Some(metrics.clone()),
    )
    .unwrap()
}

/// An event of `lab` made at `ms` past a fixed time, pending.
async fn pending_event(db: &Database, w: &WorkerId, lab: LabId, ms: i64) -> LabEvent {
    let at = DateTime::from_timestamp_millis(1_700_000_000_000 + ms).unwrap();
    let e = LabEvent::new(w, lab, at, &EventData::placeholder(LabEventKind::Changed));
    db.collection::<Document>(collections::OUTBOX)
        .insert_one(outbox::outbox_doc(&e, RETENTION).unwrap())
        .await
        .unwrap();
    e
}

async fn event_doc(db: &Database, e: &LabEvent) -> Document {
    db.collection::<Document>(collections::OUTBOX)
        .find_one(doc! {"_id": &e.id})
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn a_labs_later_events_wait_for_its_failed_one_and_other_labs_do_not() {
    let db = labsync_test_support::test_database().await;
    ensure_indexes(&db).await.unwrap();
    // The first request fails.
    let (sink, url) = Sink::start(Duration::ZERO, |n| if n == 0 { 503 } else { 202 }).await;
    let metrics = labsync_infrastructure::metrics::Metrics::new();
    let relay = relay(&db, &url, 1, &metrics);
    let w = worker("cml-1");
    let (a, b) = (lab(), lab());
    let a1 = pending_event(&db, &w, a, 1).await;
    let a2 = pending_event(&db, &w, a, 2).await;
    let b1 = pending_event(&db, &w, b, 3).await;

    relay.measure().await.unwrap();
    assert!(
        metrics
            .render()
            .contains("labsync_outbox_undelivered_events 3"),
        "{}",
        metrics.render()
    );
    assert_eq!(relay.deliver_due().await.unwrap(), 1, "b1 only");
    assert_eq!(
        sink.received(),
        [(a1.id.clone(), 503), (b1.id.clone(), 202)]
    );
    let failed = event_doc(&db, &a1).await;
    assert_eq!(
        (
            failed.get_str("status").unwrap(),
            failed.get_i64("attempts").unwrap()
        ),
        ("pending", 1)
    );
    let why = failed.get_str("last_error").unwrap();
    assert!(why.contains("503") && !why.contains("redirect"), "{why}");
    let wait = failed.get_datetime("next_attempt_at").unwrap().to_chrono() - Utc::now();
    assert!(
        wait > TimeDelta::milliseconds(1500) && wait <= TimeDelta::seconds(2),
        "the first backoff is 2 s: {wait}"
    );
    assert!(
        failed.get_datetime("next_attempt_at").unwrap().to_chrono()
            > Utc::now() + TimeDelta::milliseconds(500),
        "backing off"
    );
    assert_eq!(
        event_doc(&db, &a2).await.get_i64("attempts").unwrap(),
        0,
        "a2 waits behind a1"
    );
    assert_eq!(
        event_doc(&db, &b1).await.get_str("status").unwrap(),
        "delivered"
    );

    db.collection::<Document>(collections::OUTBOX)
        .update_one(
            doc! {"_id": &a1.id},
            doc! {"$set": {"next_attempt_at": mongodb::bson::DateTime::from_millis(0)}},
        )
        .await
        .unwrap();
    assert_eq!(relay.deliver_due().await.unwrap(), 2);
    let order: Vec<String> = sink
        .received()
        .into_iter()
        .skip(2)
        .map(|(id, _)| id)
        .collect();
    assert_eq!(
        order,
        [a1.id.clone(), a2.id.clone()],
        "in the order they were made"
    );
    assert_eq!(relay.deliver_due().await.unwrap(), 0, "nothing twice");
    relay.measure().await.unwrap();
    assert!(
        metrics
            .render()
            .contains("labsync_outbox_undelivered_events 0")
    );
    assert!(
        metrics
            .render()
            .contains("labsync_outbox_oldest_undelivered_age_seconds 0")
    );
}

#[tokio::test]
async fn a_staged_older_event_holds_its_lab_back_and_a_redirect_is_a_failure() {
    let db = labsync_test_support::test_database().await;
    ensure_indexes(&db).await.unwrap();
    let (sink, url) = Sink::start(Duration::ZERO, |_| 302).await;
    let metrics = labsync_infrastructure::metrics::Metrics::new();
    let relay = relay(&db, &url, 4, &metrics);
    let w = worker("cml-1");
    let (a, b) = (lab(), lab());
    let staged = LabEvent::new(
        &w,
        a,
        DateTime::from_timestamp_millis(1_700_000_000_000).unwrap(),
        &EventData::placeholder(LabEventKind::Changed),
    );
    db.collection::<Document>(collections::OUTBOX)
        .insert_one(outbox::staged_doc(&staged, RETENTION, None).unwrap())
        .await
        .unwrap();
    let later = pending_event(&db, &w, a, 5).await;
    let other = pending_event(&db, &w, b, 6).await;
    assert_eq!(relay.deliver_due().await.unwrap(), 0);
    assert_eq!(
        sink.received(),
        [(other.id.clone(), 302)],
        "only b's event was sent"
    );
    let d = event_doc(&db, &other).await;
    assert_eq!(d.get_str("status").unwrap(), "pending");
    assert!(
        d.get_str("last_error").unwrap().contains("no redirects"),
        "{d}"
    );
    assert_eq!(event_doc(&db, &later).await.get_i64("attempts").unwrap(), 0);
}

#[tokio::test]
async fn events_of_different_labs_go_in_parallel_up_to_the_bound() {
    let db = labsync_test_support::test_database().await;
    ensure_indexes(&db).await.unwrap();
    let (sink, url) = Sink::start(Duration::from_millis(100), |_| 200).await;
    let metrics = labsync_infrastructure::metrics::Metrics::new();
    let relay = relay(&db, &url, 3, &metrics);
    let w = worker("cml-1");
    for n in 0..7 {
        pending_event(&db, &w, lab(), n).await;
    }
    assert_eq!(relay.deliver_due().await.unwrap(), 7);
    assert_eq!(sink.received().len(), 7);
    assert_eq!(
        sink.max_in_flight.load(std::sync::atomic::Ordering::SeqCst),
        3
    );
}

// ----- WorkerRepository -----

async fn workers() -> (Database, MongoWorkerRepository) {
    let db = labsync_test_support::test_database().await;
    ensure_indexes(&db).await.expect("indexes");
    // base64 of 32 bytes of 0x07: a test-only key.
    let key = secrecy::SecretString::from("BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=");
    let cipher = PasswordCipher::from_setting(&key).unwrap();
    let repo = MongoWorkerRepository::new(&db, cipher);
    (db, repo)
}

fn registered(id: &str) -> Worker {
    Worker {
        id: worker(id),
        name: id.into(),
        base_url: BaseUrl::parse("https://cml.example.net").expect("a worker URL"),
        username: "admin".into(),
        tls: TlsSettings::default(),
        enabled: true,
        lab_tiles: false,
    }
}

#[tokio::test]
async fn a_worker_update_lands_only_on_the_worker_as_it_was_read() {
    let (_, repo) = workers().await;
    let pw = secrecy::SecretString::from("pw");
    let read = registered("cml-1");
    repo.add(&read, &pw).await.unwrap();
    let renamed = Worker {
        name: "renamed".into(),
        ..read.clone()
    };
    let disabled = Worker {
        enabled: false,
        ..read.clone()
    };
    // Two changes read from the same worker: the first lands, the second
    // would undo it and is refused.
    assert!(repo.update(&read, &renamed, None).await.unwrap());
    assert!(!repo.update(&read, &disabled, None).await.unwrap());
    let stored = repo.get(&read.id).await.unwrap().unwrap().worker;
    assert_eq!(
        stored, renamed,
        "the first change stands, nothing of the second"
    );
    // Read again, the second lands on top of the first.
    let both = Worker {
        enabled: false,
        ..stored.clone()
    };
    assert!(repo.update(&stored, &both, None).await.unwrap());
    assert_eq!(repo.get(&read.id).await.unwrap().unwrap().worker, both);
    // Gone: nothing to write.
    let ghost = registered("cml-9");
    assert!(!repo.update(&ghost, &ghost, None).await.unwrap());
    // Without the password, where it goes cannot change, whatever `before` says.
    let moved = Worker {
        base_url: BaseUrl::parse("https://elsewhere.example.net").expect("a worker URL"),
        ..both.clone()
    };
    assert!(repo.update(&both, &moved, None).await.is_err());
    assert!(repo.update(&moved, &moved, None).await.is_ok_and(|w| !w));
    assert!(repo.update(&both, &moved, Some(&pw)).await.unwrap());
    assert_eq!(repo.get(&read.id).await.unwrap().unwrap().worker, moved);
}

#[tokio::test]
async fn a_worker_stored_by_an_older_release_with_what_is_refused_now_still_reads() {
    let (db, repo) = workers().await;
    let pw = secrecy::SecretString::from("pw");
    repo.add(&registered("cml-1"), &pw).await.unwrap();
    repo.add(&registered("cml-2"), &pw).await.unwrap();
    // A host the url crate refuses, a bundle that is no PEM and no
    // verification besides: each passed an older release's checks.
    db.collection::<Document>(collections::WORKERS)
        .update_one(
            doc! {"_id": "cml-1"},
            doc! {"$set": {"base_url": "https://cml.10", "ca_cert_pem": "x", "insecure": true}},
        )
        .await
        .unwrap();
    let listed = repo
        .list()
        .await
        .expect("one odd worker leaves the list readable");
    let ids: Vec<&str> = listed.iter().map(|w| w.id.as_str()).collect();
    assert_eq!(ids, ["cml-1", "cml-2"]);
    // (Its password, sealed to the URL it had, opens only for that URL:
    // reading it is `get`'s business, and fails for this one alone.)
    let odd = &listed[0];
    assert_eq!(odd.base_url.as_str(), "https://cml.10");
    assert!(odd.tls.insecure(), "what applied then: no verification");
}

#[tokio::test]
async fn a_worker_stored_before_its_newer_flags_is_updated_as_if_they_were_off() {
    let (db, repo) = workers().await;
    let read = registered("cml-1");
    repo.add(&read, &secrecy::SecretString::from("pw"))
        .await
        .unwrap();
    db.collection::<Document>(collections::WORKERS)
        .update_one(
            doc! {"_id": "cml-1"},
            doc! {"$unset": {"lab_tiles": "", "allow_http": ""}},
        )
        .await
        .unwrap();
    let read = repo.get(&read.id).await.unwrap().unwrap().worker;
    assert!(!read.lab_tiles && !read.tls.allow_http);
    let tiles = Worker {
        lab_tiles: true,
        ..read.clone()
    };
    assert!(repo.update(&read, &tiles, None).await.unwrap());
    assert_eq!(repo.get(&read.id).await.unwrap().unwrap().worker, tiles);
}

#[tokio::test]
async fn an_unreachable_server_is_unavailable_and_a_document_that_does_not_decode_is_corrupt() {
    use labsync_application::RepoError;
    use labsync_infrastructure::mongo::map_error;
    // A port nothing listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let away = mongodb::Client::with_uri_str(format!(
        "mongodb://127.0.0.1:{port}/?directConnection=true&serverSelectionTimeoutMS=200"
    ))
    .await
    .unwrap();
    let e = away
        .database("x")
        .run_command(doc! {"ping": 1})
        .await
        .unwrap_err();
    assert!(matches!(map_error(e), RepoError::Unavailable(_)));

    #[derive(Debug, serde::Deserialize)]
    struct Needs {
        #[allow(dead_code)]
        required: String,
    }
    let db = labsync_test_support::test_database().await;
    db.collection::<Document>("odd")
        .insert_one(doc! {"other": 1})
        .await
        .unwrap();
    let e = db
        .collection::<Needs>("odd")
        .find_one(doc! {})
        .await
        .unwrap_err();
    assert!(matches!(map_error(e), RepoError::Corrupt(_)));
}

#[tokio::test]
async fn a_claim_holds_an_event_for_twice_the_request_timeout() {
    let db = labsync_test_support::test_database().await;
    ensure_indexes(&db).await.unwrap();
    // A sink slow enough to look at the claim while the event is in flight.
    let (sink, url) = Sink::start(Duration::from_secs(2), |_| 202).await;
    let metrics = labsync_infrastructure::metrics::Metrics::new();
    let relay = relay(&db, &url, 1, &metrics);
    let e = pending_event(&db, &worker("cml-1"), lab(), 0).await;
    let delivering = tokio::spawn({
        let relay = relay.clone();
        async move { relay.deliver_due().await.unwrap() }
    });
    labsync_test_support::eventually("the event to be in flight", || async {
        sink.in_flight.load(std::sync::atomic::Ordering::SeqCst) == 1
    })
    .await;
    let held = event_doc(&db, &e)
        .await
        .get_datetime("next_attempt_at")
        .unwrap()
        .to_chrono()
        - Utc::now();
    assert!(held > TimeDelta::seconds(15), "claimed for 20 s: {held}");
    assert_eq!(delivering.await.unwrap(), 1);
}

#[tokio::test]
async fn a_lab_blocked_behind_more_than_a_page_of_its_events_holds_back_no_other_lab() {
    let db = labsync_test_support::test_database().await;
    ensure_indexes(&db).await.unwrap();
    let (sink, url) = Sink::start(Duration::ZERO, |_| 202).await;
    let metrics = labsync_infrastructure::metrics::Metrics::new();
    let relay = relay(&db, &url, 4, &metrics);
    let w = worker("cml-1");
    let (busy, other) = (lab(), lab());
    // busy's oldest event backs off; 300 more of busy's are due.
    let head = pending_event(&db, &w, busy, 0).await;
    db.collection::<Document>(collections::OUTBOX)
        .update_one(
            doc! {"_id": &head.id},
            doc! {"$set": {"next_attempt_at": mongodb::bson::DateTime::from_millis(i64::MAX / 2)}},
        )
        .await
        .unwrap();
    let due: Vec<Document> = (1..=300)
        .map(|n| {
            let at = DateTime::from_timestamp_millis(1_700_000_000_000 + n).unwrap();
            outbox::outbox_doc(
                &LabEvent::new(&w, busy, at, &EventData::placeholder(LabEventKind::Changed)),
                RETENTION,
            )
            .unwrap()
        })
        .collect();
    db.collection::<Document>(collections::OUTBOX)
        .insert_many(due)
        .await
        .unwrap();
    let last = pending_event(&db, &w, other, 1000).await;
    assert_eq!(relay.deliver_due().await.unwrap(), 1);
    assert_eq!(sink.received(), [(last.id.clone(), 202)]);
}

#[tokio::test]
async fn a_running_relay_delivers_until_it_is_stopped() {
    let db = labsync_test_support::test_database().await;
    ensure_indexes(&db).await.unwrap();
    let (sink, url) = Sink::start(Duration::ZERO, |_| 202).await;
    let metrics = labsync_infrastructure::metrics::Metrics::new();
    let relay = relay(&db, &url, 2, &metrics);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(relay.run(stopped));
    let e = pending_event(&db, &worker("cml-1"), lab(), 0).await;
    labsync_test_support::eventually("the event to be delivered", || async {
        event_doc(&db, &e).await.get_str("status") == Ok("delivered")
    })
    .await;
    assert_eq!(sink.received().len(), 1);
    stop.send(true).unwrap();
    running.await.unwrap();
}

#[tokio::test]
async fn a_delete_requests_outcome_is_stored_typed_and_read_back_whole() {
    use labsync_application::{
        DeleteOutcome, DeleteOutcomeKind, DeleteRequestStatus, DeleteRequests,
    };
    let db = labsync_test_support::test_database().await;
    ensure_indexes(&db).await.unwrap();
    let requests = labsync_infrastructure::mongo::MongoDeleteRequests::new(&db);
    let w = worker("cml-1");
    let (r, _) = requests
        .create_unless_active(&delete_request(&w, lab()))
        .await
        .unwrap();
    let mut claimed = requests
        .claim_due(now(), Duration::from_secs(60), "c", &[])
        .await
        .unwrap()
        .unwrap();
    claimed.status = DeleteRequestStatus::Failed;
    claimed.outcome = Some(DeleteOutcome {
        worker_id: w.clone(),
        lab_id: r.lab_id,
        kind: DeleteOutcomeKind::RefusedRunning {
            state: LabState::Unknown("BOOTING".into()),
        },
        lab_gone: false,
        record_was_present: true,
        message: "the lab is BOOTING".into(),
    });
    assert!(requests.save(&claimed, "c").await.unwrap());
    let back = requests.get(&r.id).await.unwrap().unwrap();
    assert_eq!(back.outcome, claimed.outcome);
    assert_eq!(back.status, DeleteRequestStatus::Failed);
}

#[tokio::test]
async fn a_runner_whose_expired_claim_was_cancelled_saves_nothing_over_the_cancel() {
    use labsync_application::{DeleteRequestStatus, DeleteRequests};
    let db = labsync_test_support::test_database().await;
    ensure_indexes(&db).await.unwrap();
    let requests = labsync_infrastructure::mongo::MongoDeleteRequests::new(&db);
    let w = worker("cml-1");
    let (r, _) = requests
        .create_unless_active(&delete_request(&w, lab()))
        .await
        .unwrap();
    // Claimed for no time at all: its claim has lapsed when the cancel comes.
    let mut late = requests
        .claim_due(now(), Duration::ZERO, "late", &[])
        .await
        .unwrap()
        .unwrap();
    let c = requests
        .cancel(&r.id, &Actor::api("a"), now() + TimeDelta::seconds(1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c.status, DeleteRequestStatus::Cancelled);
    late.status = DeleteRequestStatus::Pending;
    late.attempts = 1;
    assert!(
        !requests.save(&late, "late").await.unwrap(),
        "the cancel stands"
    );
    assert_eq!(
        requests.get(&r.id).await.unwrap().unwrap().status,
        DeleteRequestStatus::Cancelled
    );
    assert!(
        requests
            .claim_due(
                now() + TimeDelta::seconds(5),
                Duration::from_secs(60),
                "x",
                &[]
            )
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn a_stored_token_is_found_by_its_hash_unique_by_name_and_its_use_noted_once_a_minute() {
    use labsync_application::ports::{MachineToken, MachineTokens};
    let db = labsync_test_support::test_database().await;
    ensure_indexes(&db).await.unwrap();
    let store = labsync_infrastructure::mongo::MongoMachineTokens::new(&db);
    let token = MachineToken {
        name: "robot".into(),
        role: "operator".into(),
        sha256: "ab".repeat(32),
        created_at: now(),
        expires_at: None,
        last_used_at: None,
    };
    store.add(&token).await.unwrap();
    let again = MachineToken {
        sha256: "cd".repeat(32),
        ..token.clone()
    };
    assert!(matches!(
        store.add(&again).await,
        Err(labsync_application::RepoError::Duplicate(_))
    ));
    assert_eq!(
        store.find(&token.sha256).await.unwrap(),
        Some(token.clone())
    );
    let first = now();
    store
        .used(&token.sha256, first, first - TimeDelta::minutes(1))
        .await
        .unwrap();
    let later = first + TimeDelta::seconds(30);
    store
        .used(&token.sha256, later, later - TimeDelta::minutes(1))
        .await
        .unwrap();
    let used = |s: &labsync_infrastructure::mongo::MongoMachineTokens| {
        let s = s.clone();
        let h = token.sha256.clone();
        async move { s.find(&h).await.unwrap().unwrap().last_used_at }
    };
    assert_eq!(
        used(&store).await,
        Some(first),
        "noted once within a minute"
    );
    let much_later = first + TimeDelta::minutes(2);
    store
        .used(
            &token.sha256,
            much_later,
            much_later - TimeDelta::minutes(1),
        )
        .await
        .unwrap();
    assert_eq!(used(&store).await, Some(much_later));
    assert!(store.revoke("robot").await.unwrap());
    assert_eq!(store.find(&token.sha256).await.unwrap(), None);
    assert!(!store.revoke("robot").await.unwrap());
    store.add(&again).await.expect("the name is free again");
}

// ---------------------------------------------------------------- sessions

#[tokio::test]
async fn a_session_ends_at_its_idle_or_absolute_end_and_a_sign_in_is_taken_once() {
    use labsync_application::ports::{
        ConsoleSession, PendingSignIn, SessionOf, Sessions, SignedInPerson,
    };
    let db = labsync_test_support::test_database().await;
    ensure_indexes(&db).await.unwrap();
    let store = labsync_infrastructure::mongo::MongoSessions::new(&db);
    let t0 = now();
    let person = ConsoleSession {
        key: "k1".into(),
        who: SessionOf::Person(SignedInPerson {
            subject: "sub-1".into(),
            display: "olivia".into(),
            username: Some("olivia".into()),
            roles: vec!["labsync-operator".into(), "other".into()],
            id_token: "a.b.c".into(),
        }),
        csrf: "c".into(),
        created_at: t0,
        expires_at: t0 + TimeDelta::hours(12),
        idle_until: t0 + TimeDelta::minutes(30),
    };
    store.create(&person).await.unwrap();
    assert_eq!(
        store.find("k1", t0).await.unwrap(),
        Some(person.clone()),
        "a person's session reads back whole"
    );
    assert_eq!(
        store.find("k1", t0 + TimeDelta::minutes(31)).await.unwrap(),
        None,
        "idle past its idle end"
    );
    store
        .touch("k1", t0 + TimeDelta::minutes(40))
        .await
        .unwrap();
    store
        .touch("k1", t0 + TimeDelta::minutes(35))
        .await
        .unwrap();
    let found = store
        .find("k1", t0 + TimeDelta::minutes(31))
        .await
        .unwrap()
        .expect("a touch moved the idle end on");
    assert_eq!(
        found.idle_until,
        t0 + TimeDelta::minutes(40),
        "never moved back"
    );
    store.touch("k1", t0 + TimeDelta::days(2)).await.unwrap();
    assert_eq!(
        store.find("k1", t0 + TimeDelta::hours(13)).await.unwrap(),
        None,
        "however active, it ends at its absolute end"
    );
    let token = ConsoleSession {
        key: "k2".into(),
        who: SessionOf::Token {
            sha256: "ab".repeat(32),
        },
        ..person.clone()
    };
    store.create(&token).await.unwrap();
    assert_eq!(store.find("k2", t0).await.unwrap().unwrap().who, token.who);
    store.end("k2").await.unwrap();
    store.end("k2").await.unwrap();
    assert_eq!(store.find("k2", t0).await.unwrap(), None);
    // One stored before sessions had an idle end has ended.
    db.collection::<Document>(collections::SESSIONS)
        .insert_one(doc! {
            "_id": "old",
            "subject": "ab".repeat(32),
            "csrf": "c",
            "created_at": mongodb::bson::DateTime::from_chrono(t0),
            "expires_at": mongodb::bson::DateTime::from_chrono(t0 + TimeDelta::hours(12)),
        })
        .await
        .unwrap();
    assert_eq!(store.find("old", t0).await.unwrap(), None);

    let pending = PendingSignIn {
        key: "state-hash".into(),
        browser: "browser-hash".into(),
        verifier: "v".into(),
        nonce: "n".into(),
        expires_at: t0 + TimeDelta::minutes(10),
    };
    store.begin_sign_in(&pending).await.unwrap();
    assert_eq!(
        store
            .take_sign_in("state-hash", "another-browser", t0)
            .await
            .unwrap(),
        None,
        "another browser neither gets it nor spends it"
    );
    let takers = (0..4).map(|_| {
        let s = store.clone();
        tokio::spawn(async move {
            s.take_sign_in("state-hash", "browser-hash", t0)
                .await
                .unwrap()
        })
    });
    let taken: Vec<_> = futures::future::join_all(takers)
        .await
        .into_iter()
        .filter_map(|r| r.unwrap())
        .collect();
    assert_eq!(taken, vec![pending.clone()], "taken once, by one caller");
    let late = PendingSignIn {
        key: "late".into(),
        ..pending
    };
    store.begin_sign_in(&late).await.unwrap();
    assert_eq!(
        store
            .take_sign_in("late", "browser-hash", t0 + TimeDelta::minutes(11))
            .await
            .unwrap(),
        None,
        "an expired sign-in is of no use"
    );
}

#[tokio::test]
async fn a_status_asked_for_among_the_outcomes_is_that_status_only() {
    let db = labsync_test_support::test_database().await;
    ensure_indexes(&db).await.unwrap();
    let reports = MongoRunReports::new(&db);
    let w = worker("cml-1");
    let mut success = failed_run(&w, String::new(), vec![]);
    success.status = RunStatus::Succeeded;
    success.error = None;
    success.started_at = now() - TimeDelta::minutes(2);
    reports.store(&success).await.unwrap();
    // A failure after it: the last success must stay the success.
    let mut failure = failed_run(&w, String::new(), vec![]);
    failure.started_at = now() - TimeDelta::minutes(1);
    reports.store(&failure).await.unwrap();
    let query = |status| RunQuery {
        worker: Some(w.clone()),
        status,
        outcomes_only: true,
        limit: 10,
    };
    let found = reports
        .recent(&query(Some(RunStatus::Succeeded)))
        .await
        .unwrap();
    assert_eq!(
        found.iter().map(|r| r.run_id.as_str()).collect::<Vec<_>>(),
        vec![success.run_id.as_str()]
    );
    assert_eq!(reports.recent(&query(None)).await.unwrap().len(), 2);
    assert!(
        reports
            .recent(&query(Some(RunStatus::Skipped)))
            .await
            .unwrap()
            .is_empty(),
        "a skip is no outcome"
    );
}
