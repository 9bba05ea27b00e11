//! [`LabRepository`] on MongoDB: live records and tombstones in one
//! collection with a unique (worker_id, lab_id) index.
//!
//! Why one collection: a refresh writes creates and updates as upserts whose
//! filter requires "no tombstone". If the lab was deleted meanwhile, its
//! tombstone holds the (worker_id, lab_id) key, the filter does not match,
//! the upsert tries to insert, and the unique index refuses it with E11000.
//! That makes "never write over a tombstone" atomic without transactions.
//!
//! Every write puts its lab events in the outbox first, then changes the
//! records, each kind of write as one plain command (`insert`, `update`,
//! `delete`, `findAndModify`): on the MongoDB-wire test server these are
//! about three times faster per document than one client `bulkWrite` of
//! everything (docs/BENCHMARKS.md). Events first, because a crash between
//! the two then repeats a change and its events on the next refresh
//! instead of losing the events; see [`super::outbox`].

use std::collections::HashMap;

use async_trait::async_trait;
use futures::TryStreamExt;
use labsync_application::ports::{
    ApplyOutcome, AuditEntry, LabQuery, LabRepository, RecordChanges, RecordUpdate, Tombstone,
};
use labsync_application::{LabEvent, RepoError};
use labsync_domain::{Existing, HistoryEntry, LabId, LabRecord, WorkerId};
use mongodb::bson::{Document, doc};
use mongodb::{Collection, Database};

use super::audit::audit_document;
use super::convert::{LabDoc, date, history_bson, parse_hash, snapshot_fields, to_i64};
use super::tombstones::{TombstoneJob, TombstoneWriter, insert_events_and_audits};
use super::{DUPLICATE_KEY, collections, map_error, outbox, update_labs};

#[derive(Debug, Clone)]
pub struct MongoLabRepository {
    db: Database,
    docs: Collection<Document>,
    records: Collection<LabDoc>,
    outbox: Collection<Document>,
    audit: Collection<Document>,
    /// How long outbox events are kept.
    retention: std::time::Duration,
    tombstones: TombstoneWriter,
}

impl MongoLabRepository {
    /// The repository, and the task that writes the tombstones of
    /// concurrent deletes together: call it inside a Tokio runtime.
    pub fn new(db: &Database, event_retention: std::time::Duration) -> Self {
        Self {
            db: db.clone(),
            docs: db.collection(collections::LABS),
            records: db.collection(collections::LABS),
            outbox: db.collection(collections::OUTBOX),
            audit: db.collection(collections::AUDIT),
            retention: event_retention,
            tombstones: TombstoneWriter::start(db),
        }
    }
}

/// Update statements per `update` command: far below the server's 16 MiB
/// command limit even for records with a full history.
const UPDATE_BATCH: usize = 500;

impl MongoLabRepository {
    async fn insert_events(&self, events: &[LabEvent]) -> Result<(), RepoError> {
        if events.is_empty() {
            return Ok(());
        }
        let docs = events
            .iter()
            .map(|e| outbox::outbox_doc(e, self.retention))
            .collect::<Result<Vec<_>, _>>()?;
        self.outbox
            .insert_many(docs)
            .ordered(false)
            .await
            .map_err(map_error)?;
        Ok(())
    }

    /// The outbox event and the audit entry of a failed delete attempt,
    /// written as a delete's are (see [`insert_events_and_audits`]).
    async fn insert_event_and_audit(
        &self,
        event: &LabEvent,
        audit: &AuditEntry,
    ) -> Result<(), RepoError> {
        insert_events_and_audits(
            &self.outbox,
            &self.audit,
            vec![outbox::outbox_doc(event, self.retention)?],
            vec![audit_document(audit)?],
        )
        .await
    }

    /// Runs one `update` command of `statements`. Returns how many matched
    /// or were upserted, and the positions the unique index refused; any
    /// other write error fails the call.
    async fn update_many_statements(
        &self,
        statements: Vec<Document>,
    ) -> Result<(u64, Vec<usize>), RepoError> {
        let reply = update_labs(&self.db, statements).await?;
        let mut duplicates = Vec::new();
        for (i, code, msg) in reply.errors {
            if code != DUPLICATE_KEY {
                return Err(RepoError::Other(format!(
                    "update of lab records failed: {msg}"
                )));
            }
            duplicates.push(i);
        }
        Ok((reply.n, duplicates))
    }
}

/// The positions an unordered `insert_many` failed on, when every failure
/// is a duplicate key; `None` for any other error.
fn duplicate_indexes(e: &mongodb::error::Error) -> Option<Vec<usize>> {
    match &*e.kind {
        mongodb::error::ErrorKind::InsertMany(im) if im.write_concern_error.is_none() => {
            let errors = im.write_errors.as_ref()?;
            errors
                .iter()
                .all(|w| w.code == DUPLICATE_KEY)
                .then(|| errors.iter().map(|w| w.index).collect())
        }
        _ => None,
    }
}

/// An upsert of a changed record that only matches a live one: over a
/// tombstone it tries to insert and the unique index refuses it.
fn update_statement(
    worker: &WorkerId,
    u: &RecordUpdate,
    history_limit: usize,
) -> Result<Document, RepoError> {
    let r = &u.record;
    let mut set = snapshot_fields(&r.snapshot);
    set.insert("content_hash", r.content_hash.to_string());
    set.insert("revision", to_i64(r.revision));
    set.insert("last_changed_at", date(r.last_changed_at));
    set.insert("last_seen_at", date(r.last_seen_at));
    let mut update = doc! {"$set": set, "$setOnInsert": {"first_seen_at": date(r.first_seen_at)}};
    if let Some(entry) = &u.entry {
        update.insert("$push", history_push(entry, history_limit)?);
    }
    Ok(doc! {"q": live(worker, &r.lab_id), "u": update, "upsert": true})
}

/// Escapes a user's search text for a MongoDB regular expression, so that
/// it matches literally (and cannot be a costly pattern).
fn regex_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 2);
    for c in text.chars() {
        if "\\^$.|?*+()[]{}-/".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn key(worker: &WorkerId, lab: &LabId) -> Document {
    doc! {"worker_id": worker.as_str(), "lab_id": lab.as_str()}
}

fn live(worker: &WorkerId, lab: &LabId) -> Document {
    let mut k = key(worker, lab);
    k.insert("tombstone", doc! {"$exists": false});
    k
}

fn history_push(entry: &HistoryEntry, limit: usize) -> Result<Document, RepoError> {
    Ok(doc! {"history": {"$each": [history_bson(entry)?], "$slice": -to_i64(limit as u64)}})
}

#[async_trait]
impl LabRepository for MongoLabRepository {
    async fn index(&self, worker: &WorkerId) -> Result<HashMap<LabId, Existing>, RepoError> {
        let mut cursor = self
            .docs
            .find(doc! {"worker_id": worker.as_str()})
            .projection(doc! {"_id": 0, "lab_id": 1, "content_hash": 1, "tombstone.deleted_at": 1})
            .await
            .map_err(map_error)?;
        let mut out = HashMap::new();
        while let Some(d) = cursor.try_next().await.map_err(map_error)? {
            let id = d
                .get_str("lab_id")
                .ok()
                .and_then(|s| LabId::parse(s).ok())
                .ok_or_else(|| {
                    RepoError::Corrupt(format!("lab record without a valid lab_id: {d}"))
                })?;
            let existing = if d.contains_key("tombstone") {
                Existing::Tombstoned
            } else {
                let hash = d
                    .get_str("content_hash")
                    .map_err(|e| RepoError::Corrupt(format!("lab {id}: {e}")))?;
                Existing::Live(parse_hash(hash)?)
            };
            out.insert(id, existing);
        }
        Ok(out)
    }

    async fn records(&self, worker: &WorkerId, ids: &[LabId]) -> Result<Vec<LabRecord>, RepoError> {
        let ids: Vec<&str> = ids.iter().map(LabId::as_str).collect();
        let docs: Vec<LabDoc> = self
            .records
            .find(doc! {"worker_id": worker.as_str(), "lab_id": {"$in": ids}, "tombstone": {"$exists": false}})
            .await
            .map_err(map_error)?
            .try_collect()
            .await
            .map_err(map_error)?;
        docs.into_iter().map(LabDoc::into_record).collect()
    }

    async fn get(&self, worker: &WorkerId, lab: &LabId) -> Result<Option<LabRecord>, RepoError> {
        self.records
            .find_one(live(worker, lab))
            .await
            .map_err(map_error)?
            .map(LabDoc::into_record)
            .transpose()
    }

    async fn list(&self, worker: &WorkerId) -> Result<Vec<LabRecord>, RepoError> {
        let docs: Vec<LabDoc> = self
            .records
            .find(doc! {"worker_id": worker.as_str(), "tombstone": {"$exists": false}})
            .sort(doc! {"lab_id": 1})
            .await
            .map_err(map_error)?
            .try_collect()
            .await
            .map_err(map_error)?;
        docs.into_iter().map(LabDoc::into_record).collect()
    }

    async fn page(&self, worker: &WorkerId, q: &LabQuery) -> Result<Vec<LabRecord>, RepoError> {
        let mut filter = doc! {"worker_id": worker.as_str(), "tombstone": {"$exists": false}};
        if let Some(state) = &q.state {
            filter.insert("state", state);
        }
        if let Some(owner) = &q.owner {
            filter.insert("owner_username", owner);
        }
        if let Some(text) = &q.title_contains {
            filter.insert(
                "title",
                doc! {"$regex": regex_escape(text), "$options": "i"},
            );
        }
        if let Some(after) = &q.after {
            filter.insert("lab_id", doc! {"$gt": after.as_str()});
        }
        let docs: Vec<LabDoc> = self
            .records
            .find(filter)
            .projection(doc! {"history": 0})
            .sort(doc! {"lab_id": 1})
            .limit(i64::try_from(q.limit).unwrap_or(i64::MAX))
            .await
            .map_err(map_error)?
            .try_collect()
            .await
            .map_err(map_error)?;
        docs.into_iter().map(LabDoc::into_record).collect()
    }

    async fn apply(
        &self,
        worker: &WorkerId,
        changes: RecordChanges,
        history_limit: usize,
    ) -> Result<ApplyOutcome, RepoError> {
        let mut outcome = ApplyOutcome::default();
        // Events first: a crash after them repeats the change (and its
        // events) on the next refresh; a crash after the change would lose
        // them.
        self.insert_events(&changes.events).await?;
        let mut refused: Vec<LabId> = Vec::new();
        if !changes.create.is_empty() {
            // Plain inserts: the unique index refuses one when a tombstone
            // (or, after a race, a live record) holds the key.
            let docs = changes
                .create
                .iter()
                .map(|r| {
                    mongodb::bson::to_document(&LabDoc::from_record(r))
                        .map_err(|e| RepoError::Other(e.to_string()))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let duplicates = match self.docs.insert_many(docs).ordered(false).await {
                Ok(_) => Vec::new(),
                Err(e) => duplicate_indexes(&e).ok_or_else(|| map_error(e))?,
            };
            outcome.created = (changes.create.len() - duplicates.len()) as u64;
            refused.extend(duplicates.iter().map(|&i| changes.create[i].lab_id));
        }
        for chunk in changes.update.chunks(UPDATE_BATCH) {
            let statements = chunk
                .iter()
                .map(|u| update_statement(worker, u, history_limit))
                .collect::<Result<Vec<_>, _>>()?;
            let (matched, duplicates) = self.update_many_statements(statements).await?;
            outcome.updated += matched;
            refused.extend(duplicates.iter().map(|&i| chunk[i].record.lab_id));
        }
        if !changes.prune.is_empty() {
            let ids: Vec<&str> = changes.prune.iter().map(LabId::as_str).collect();
            outcome.pruned = self
                .docs
                .delete_many(doc! {"worker_id": worker.as_str(), "lab_id": {"$in": ids}, "tombstone": {"$exists": false}})
                .await
                .map_err(map_error)?
                .deleted_count;
        }
        if !refused.is_empty() {
            // Refused by the unique key: a tombstone (suppressed), or a live
            // record another writer created meanwhile (nothing to do).
            let ids: Vec<&str> = refused.iter().map(LabId::as_str).collect();
            let tombstoned: Vec<Document> = self
                .docs
                .find(doc! {"worker_id": worker.as_str(), "lab_id": {"$in": ids}, "tombstone": {"$exists": true}})
                .projection(doc! {"_id": 0, "lab_id": 1})
                .await
                .map_err(map_error)?
                .try_collect()
                .await
                .map_err(map_error)?;
            outcome.suppressed = tombstoned
                .iter()
                .filter_map(|d| d.get_str("lab_id").ok().and_then(|s| LabId::parse(s).ok()))
                .collect();
        }
        if !outcome.suppressed.is_empty() {
            // The lab stays deleted: so must its events (see outbox caveats).
            let ids: Vec<&str> = changes
                .events
                .iter()
                .filter(|e| outcome.suppressed.contains(&e.lab_id))
                .map(|e| e.id.as_str())
                .collect();
            self.outbox
                .delete_many(doc! {"_id": {"$in": ids}})
                .await
                .map_err(map_error)?;
        }
        Ok(outcome)
    }

    async fn add_history(
        &self,
        worker: &WorkerId,
        lab: &LabId,
        entry: HistoryEntry,
        history_limit: usize,
        event: LabEvent,
        audit: AuditEntry,
    ) -> Result<bool, RepoError> {
        self.insert_event_and_audit(&event, &audit).await?;
        let r = self
            .docs
            .update_one(
                live(worker, lab),
                doc! {"$push": history_push(&entry, history_limit)?},
            )
            .await
            .map_err(map_error)?;
        Ok(r.matched_count > 0)
    }

    async fn tombstone(
        &self,
        worker: &WorkerId,
        lab: &LabId,
        t: Tombstone,
        event: LabEvent,
        audit: AuditEntry,
    ) -> Result<bool, RepoError> {
        let mut replacement = key(worker, lab);
        replacement.insert(
            "tombstone",
            doc! {"deleted_at": date(t.deleted_at), "deleted_by": t.deleted_by, "expires_at": date(t.expires_at)},
        );
        // Written with the tombstones of concurrent deletes (see
        // `super::tombstones`): events and audit entries first, then the
        // record swapped for its tombstone.
        self.tombstones
            .write(TombstoneJob {
                worker: worker.clone(),
                lab: *lab,
                replacement,
                event: outbox::outbox_doc(&event, self.retention)?,
                audit: audit_document(&audit)?,
            })
            .await
    }

    async fn remove_worker(&self, worker: &WorkerId) -> Result<u64, RepoError> {
        let r = self
            .docs
            .delete_many(doc! {"worker_id": worker.as_str()})
            .await
            .map_err(map_error)?;
        Ok(r.deleted_count)
    }
}
