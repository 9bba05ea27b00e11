//! [`LabRepository`] on MongoDB: live records and tombstones in one
//! collection with a unique (worker_id, lab_id) index.
//!
//! Why one collection: a refresh writes creates and updates as upserts whose
//! filter requires "no tombstone". If the lab was deleted meanwhile, its
//! tombstone holds the (worker_id, lab_id) key, the filter does not match,
//! the upsert tries to insert, and the unique index refuses it with E11000.
//! That makes "never write over a tombstone" atomic without transactions.
//!
//! Each write carries its lab events to the outbox in the same client bulk
//! write (one command to the server); see [`super::outbox`].

use std::collections::HashMap;

use async_trait::async_trait;
use futures::TryStreamExt;
use labsync_application::ports::{
    ApplyOutcome, AuditEntry, LabQuery, LabRepository, RecordChanges, Tombstone,
};
use labsync_application::{LabEvent, RepoError};
use labsync_domain::{Existing, HistoryEntry, LabId, LabRecord, WorkerId};
use mongodb::bson::{Document, doc};
use mongodb::options::{
    DeleteManyModel, DeleteOneModel, InsertOneModel, ReplaceOneModel, UpdateOneModel, WriteModel,
};
use mongodb::{Collection, Database};

use super::audit::audit_document;
use super::convert::{LabDoc, date, history_bson, parse_hash, snapshot_fields, to_i64};
use super::{DUPLICATE_KEY, collections, map_error, outbox};

#[derive(Debug, Clone)]
pub struct MongoLabRepository {
    db: Database,
    docs: Collection<Document>,
    records: Collection<LabDoc>,
    /// How long outbox events are kept.
    retention: std::time::Duration,
    audit_ns: mongodb::Namespace,
}

impl MongoLabRepository {
    pub fn new(db: &Database, event_retention: std::time::Duration) -> Self {
        Self {
            db: db.clone(),
            docs: db.collection(collections::LABS),
            records: db.collection(collections::LABS),
            retention: event_retention,
            audit_ns: db.collection::<Document>(collections::AUDIT).namespace(),
        }
    }
}

impl MongoLabRepository {
    /// One command that writes `models` in order, stopping at the first error.
    async fn write_in_order(
        &self,
        models: Vec<WriteModel>,
    ) -> Result<mongodb::results::SummaryBulkWriteResult, RepoError> {
        self.db
            .client()
            .bulk_write(models)
            .ordered(true)
            .await
            .map_err(map_error)
    }

    /// The outbox event and the audit entry that travel with a delete's
    /// write.
    fn event_and_audit(
        &self,
        event: &LabEvent,
        audit: &AuditEntry,
    ) -> Result<[WriteModel; 2], RepoError> {
        Ok([
            InsertOneModel::builder()
                .namespace(outbox::namespace(&self.db))
                .document(outbox::outbox_doc(event, self.retention)?)
                .build()
                .into(),
            InsertOneModel::builder()
                .namespace(self.audit_ns.clone())
                .document(audit_document(audit)?)
                .build()
                .into(),
        ])
    }
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
        let ns = self.docs.namespace();
        let outbox = outbox::namespace(&self.db);
        let mut models: Vec<WriteModel> = Vec::new();
        // What each model is: a lab write (and whether it creates), or an event.
        let mut targets: Vec<Option<(LabId, bool)>> = Vec::new();
        let mut events_by_lab: HashMap<LabId, Vec<&LabEvent>> = HashMap::new();
        for e in &changes.events {
            events_by_lab.entry(e.lab_id).or_default().push(e);
        }
        let mut push_events = |lab: &LabId,
                               models: &mut Vec<WriteModel>,
                               targets: &mut Vec<Option<(LabId, bool)>>|
         -> Result<(), RepoError> {
            for e in events_by_lab.remove(lab).unwrap_or_default() {
                models.push(
                    InsertOneModel::builder()
                        .namespace(outbox.clone())
                        .document(outbox::outbox_doc(e, self.retention)?)
                        .build()
                        .into(),
                );
                targets.push(None);
            }
            Ok(())
        };
        for record in &changes.create {
            let full = mongodb::bson::to_document(&LabDoc::from_record(record))
                .map_err(|e| RepoError::Other(e.to_string()))?;
            // A plain insert: the unique index refuses it when a tombstone
            // (or, after a race, a live record) holds the key.
            models.push(
                InsertOneModel::builder()
                    .namespace(ns.clone())
                    .document(full)
                    .build()
                    .into(),
            );
            targets.push(Some((record.lab_id, true)));
            push_events(&record.lab_id, &mut models, &mut targets)?;
        }
        for u in &changes.update {
            let r = &u.record;
            let mut set = snapshot_fields(&r.snapshot);
            set.insert("content_hash", r.content_hash.to_string());
            set.insert("revision", to_i64(r.revision));
            set.insert("last_changed_at", date(r.last_changed_at));
            set.insert("last_seen_at", date(r.last_seen_at));
            let mut update =
                doc! {"$set": set, "$setOnInsert": {"first_seen_at": date(r.first_seen_at)}};
            if let Some(entry) = &u.entry {
                update.insert("$push", history_push(entry, history_limit)?);
            }
            models.push(
                UpdateOneModel::builder()
                    .namespace(ns.clone())
                    .filter(live(worker, &r.lab_id))
                    .update(update)
                    .upsert(true)
                    .build()
                    .into(),
            );
            targets.push(Some((r.lab_id, false)));
            push_events(&r.lab_id, &mut models, &mut targets)?;
        }
        if !changes.prune.is_empty() {
            let ids: Vec<&str> = changes.prune.iter().map(LabId::as_str).collect();
            models.push(
                DeleteManyModel::builder()
                    .namespace(ns.clone())
                    .filter(doc! {"worker_id": worker.as_str(), "lab_id": {"$in": ids}, "tombstone": {"$exists": false}})
                    .build()
                    .into(),
            );
            targets.push(None);
            for lab in &changes.prune {
                push_events(lab, &mut models, &mut targets)?;
            }
        }
        if models.is_empty() {
            return Ok(outcome);
        }
        let result = self
            .db
            .client()
            .bulk_write(models)
            .ordered(false)
            .verbose_results()
            .await;
        let (results, errors) = match result {
            Ok(r) => (Some(r), HashMap::new()),
            Err(e) => match *e.kind {
                // Only duplicate keys (tombstones) are expected; anything
                // else, or an error beside the write errors, fails the batch.
                mongodb::error::ErrorKind::BulkWrite(ref bw)
                    if std::error::Error::source(&e).is_none()
                        && bw.write_concern_errors.is_empty()
                        && bw.write_errors.values().all(|w| w.code == DUPLICATE_KEY) =>
                {
                    let partial = bw.partial_result.clone().and_then(|p| match p {
                        mongodb::error::PartialBulkWriteResult::Verbose(v) => Some(v),
                        mongodb::error::PartialBulkWriteResult::Summary(_) => None,
                    });
                    (partial, bw.write_errors.clone())
                }
                _ => return Err(map_error(e)),
            },
        };
        let mut refused: Vec<LabId> = Vec::new();
        for (i, target) in targets.iter().enumerate() {
            let Some((lab, is_create)) = target else {
                continue;
            };
            if errors.contains_key(&i) {
                refused.push(*lab);
                continue;
            }
            if *is_create {
                if results
                    .as_ref()
                    .is_none_or(|r| r.insert_results.contains_key(&i))
                {
                    outcome.created += 1;
                }
                continue;
            }
            let Some(r) = results.as_ref().and_then(|r| r.update_results.get(&i)) else {
                continue;
            };
            if r.matched_count > 0 || r.upserted_id.is_some() {
                outcome.updated += 1;
            }
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
        if let Some(r) = &results {
            outcome.pruned = r.delete_results.values().map(|d| d.deleted_count).sum();
        }
        if !outcome.suppressed.is_empty() {
            // The lab stays deleted: so must its events (see outbox caveats).
            let ids: Vec<&str> = changes
                .events
                .iter()
                .filter(|e| outcome.suppressed.contains(&e.lab_id))
                .map(|e| e.id.as_str())
                .collect();
            self.db
                .collection::<Document>(collections::OUTBOX)
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
        let mut models: Vec<WriteModel> = vec![
            UpdateOneModel::builder()
                .namespace(self.docs.namespace())
                .filter(live(worker, lab))
                .update(doc! {"$push": history_push(&entry, history_limit)?})
                .build()
                .into(),
        ];
        models.extend(self.event_and_audit(&event, &audit)?);
        let r = self.write_in_order(models).await?;
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
        // Deleting the live record first says whether there was one, in the
        // same command that writes the tombstone and the event.
        let mut models: Vec<WriteModel> = vec![
            DeleteOneModel::builder()
                .namespace(self.docs.namespace())
                .filter(live(worker, lab))
                .build()
                .into(),
            ReplaceOneModel::builder()
                .namespace(self.docs.namespace())
                .filter(key(worker, lab))
                .replacement(replacement)
                .upsert(true)
                .build()
                .into(),
        ];
        models.extend(self.event_and_audit(&event, &audit)?);
        let r = self.write_in_order(models).await?;
        Ok(r.deleted_count > 0)
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
