//! [`LabRepository`] on MongoDB: live records and tombstones in one
//! collection with a unique (worker_id, lab_id) index.
//!
//! Why one collection: a refresh writes creates and updates as upserts whose
//! filter requires "no tombstone". If the lab was deleted meanwhile, its
//! tombstone holds the (worker_id, lab_id) key, the filter does not match,
//! the upsert tries to insert, and the unique index refuses it with E11000.
//! That makes "never write over a tombstone" atomic without transactions.

use std::collections::HashMap;

use async_trait::async_trait;
use futures::TryStreamExt;
use labsync_application::RepoError;
use labsync_application::ports::{ApplyOutcome, LabRepository, RecordChanges, Tombstone};
use labsync_domain::{Existing, HistoryEntry, LabId, LabRecord, WorkerId};
use mongodb::bson::{Document, doc};
use mongodb::options::{ReturnDocument, UpdateOneModel, WriteModel};
use mongodb::{Collection, Database};

use super::convert::{LabDoc, date, history_bson, parse_hash, snapshot_fields, to_i64};
use super::{DUPLICATE_KEY, collections, map_error};

#[derive(Debug, Clone)]
pub struct MongoLabRepository {
    db: Database,
    docs: Collection<Document>,
    records: Collection<LabDoc>,
}

impl MongoLabRepository {
    pub fn new(db: &Database) -> Self {
        Self {
            db: db.clone(),
            docs: db.collection(collections::LABS),
            records: db.collection(collections::LABS),
        }
    }
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

    async fn apply(
        &self,
        worker: &WorkerId,
        changes: RecordChanges,
        history_limit: usize,
    ) -> Result<ApplyOutcome, RepoError> {
        let mut outcome = ApplyOutcome::default();
        let ns = self.docs.namespace();
        let mut models: Vec<WriteModel> =
            Vec::with_capacity(changes.create.len() + changes.update.len());
        // Which lab each model writes, and whether it is a create.
        let mut targets: Vec<(LabId, bool)> = Vec::with_capacity(models.capacity());
        for record in &changes.create {
            let full = mongodb::bson::to_document(&LabDoc::from_record(record))
                .map_err(|e| RepoError::Other(e.to_string()))?;
            models.push(
                UpdateOneModel::builder()
                    .namespace(ns.clone())
                    .filter(live(worker, &record.lab_id))
                    .update(doc! {"$setOnInsert": full})
                    .upsert(true)
                    .build()
                    .into(),
            );
            targets.push((record.lab_id, true));
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
            targets.push((r.lab_id, false));
        }
        if !models.is_empty() {
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
                    mongodb::error::ErrorKind::BulkWrite(ref cbw)
                        if std::error::Error::source(&e).is_none() =>
                    {
                        let partial = cbw.partial_result.clone().and_then(|p| match p {
                            mongodb::error::PartialBulkWriteResult::Verbose(v) => Some(v),
                            mongodb::error::PartialBulkWriteResult::Summary(_) => None,
                        });
                        if cbw.write_errors.values().any(|w| w.code != DUPLICATE_KEY)
                            || !cbw.write_concern_errors.is_empty()
                        {
                            return Err(map_error(e));
                        }
                        (partial, cbw.write_errors.clone())
                    }
                    _ => return Err(map_error(e)),
                },
            };
            for (i, (lab, is_create)) in targets.iter().enumerate() {
                if errors.contains_key(&i) {
                    outcome.suppressed.push(*lab);
                    continue;
                }
                let Some(r) = results.as_ref().and_then(|r| r.update_results.get(&i)) else {
                    continue;
                };
                if *is_create {
                    if r.upserted_id.is_some() {
                        outcome.created += 1;
                    }
                } else if r.matched_count > 0 || r.upserted_id.is_some() {
                    outcome.updated += 1;
                }
            }
        }
        if !changes.prune.is_empty() {
            let ids: Vec<&str> = changes.prune.iter().map(LabId::as_str).collect();
            let deleted = self
                .docs
                .delete_many(doc! {"worker_id": worker.as_str(), "lab_id": {"$in": ids}, "tombstone": {"$exists": false}})
                .await
                .map_err(map_error)?;
            outcome.pruned = deleted.deleted_count;
        }
        Ok(outcome)
    }

    async fn add_history(
        &self,
        worker: &WorkerId,
        lab: &LabId,
        entry: HistoryEntry,
        history_limit: usize,
    ) -> Result<bool, RepoError> {
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
    ) -> Result<bool, RepoError> {
        let mut replacement = key(worker, lab);
        replacement.insert(
            "tombstone",
            doc! {"deleted_at": date(t.deleted_at), "deleted_by": t.deleted_by, "expires_at": date(t.expires_at)},
        );
        let before = self
            .docs
            .find_one_and_replace(key(worker, lab), replacement)
            .upsert(true)
            .return_document(ReturnDocument::Before)
            .await
            .map_err(map_error)?;
        Ok(before.is_some_and(|d| !d.contains_key("tombstone")))
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
