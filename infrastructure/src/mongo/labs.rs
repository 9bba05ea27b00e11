//! [`LabRepository`] on MongoDB: live records and tombstones in one
//! collection with a unique (worker_id, lab_id) index.
//!
//! Why one collection: a refresh writes creates and updates as upserts whose
//! filter requires "no tombstone". If the lab was deleted meanwhile, its
//! tombstone holds the (worker_id, lab_id) key, the filter does not match,
//! the upsert tries to insert, and the unique index refuses it with E11000.
//! That makes "never write over a tombstone" atomic without transactions.
//!
//! # Limits
//! MongoDB refuses a document or a command over 16 MiB (`maxBsonObjectSize`;
//! the test server accepts more, so the limit is enforced here, as the
//! smaller of the documented limit and what the server's `hello` says). A
//! record that would outgrow it is left as it was and reported as that
//! lab's failure; updates go in commands bounded in bytes as well as in
//! statements.
//!
//! # Fencing
//! Every record a refresh writes carries the run's fencing token (`fence`,
//! from the refresh lease); an update or a prune matches only records whose
//! token is not greater than the run's, so a run that lost its lease cannot
//! undo a newer run's work, atomically per record.
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
    ApplyOutcome, AuditEntry, FleetCursor, FleetLabQuery, LabQuery, LabRepository, LabSort,
    RecordChanges, RecordUpdate, SortKey, Tombstone,
};
use labsync_application::{LabEvent, RepoError, crash};
use labsync_domain::{Existing, HistoryEntry, LabId, LabRecord, WorkerId};
use mongodb::bson::{Bson, Document, doc};
use mongodb::{Collection, Database};

use super::audit::audit_document;
use super::convert::{LabDoc, date, history_bson, parse_hash, snapshot_fields, to_i64};
use super::tombstones::{TombstoneJob, TombstoneWriter, insert_events_and_audits};
use super::{DUPLICATE_KEY, collections, map_error, outbox, update_labs};

#[derive(Debug, Clone)]
pub struct MongoLabRepository {
    db: Database,
    /// The largest document the server takes, read once from `hello`.
    max_document: std::sync::Arc<tokio::sync::OnceCell<usize>>,
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
            max_document: std::sync::Arc::default(),
            docs: db.collection(collections::LABS),
            records: db.collection(collections::LABS),
            outbox: db.collection(collections::OUTBOX),
            audit: db.collection(collections::AUDIT),
            retention: event_retention,
            tombstones: TombstoneWriter::start(db),
        }
    }
}

/// Update statements per `update` command (the byte bound usually comes
/// first for large records).
const UPDATE_BATCH: usize = 500;

/// MongoDB's documented `maxBsonObjectSize`: no document, and no command
/// sent as one document, may be larger.
pub const MAX_BSON_OBJECT: usize = 16 * 1024 * 1024;

/// Room kept for what the server adds to a document (`_id`) or a command
/// (its name, options, framing).
pub(crate) const ENVELOPE: usize = 64 * 1024;

pub(crate) fn bson_size(d: &Document) -> usize {
    // Serializing a Document cannot fail; a failure would count as too large.
    mongodb::bson::to_vec(d).map_or(usize::MAX, |v| v.len())
}

/// Groups `items` (with their sizes in bytes) into runs of at most
/// `max_count` items and `max_bytes` bytes; an item larger than
/// `max_bytes` goes alone.
fn batches<T>(items: Vec<(T, usize)>, max_count: usize, max_bytes: usize) -> Vec<Vec<T>> {
    let mut out: Vec<Vec<T>> = Vec::new();
    let mut bytes = 0;
    for (item, size) in items {
        match out.last_mut() {
            Some(last) if last.len() < max_count && bytes + size <= max_bytes => {
                bytes += size;
                last.push(item);
            }
            _ => {
                bytes = size;
                out.push(vec![item]);
            }
        }
    }
    out
}

/// A filter clause: records not written under a greater fence than `fence`.
/// A plain range on a field every live record has ([`super::ensure_indexes`]
/// gives records from before fencing `fence: 0`): an `$or` here made the
/// test server scan the collection for every statement.
fn not_newer_than(fence: u64) -> Document {
    doc! {"fence": {"$lte": to_i64(fence)}}
}

impl MongoLabRepository {
    /// The largest document (and command) this server takes: the smaller
    /// of MongoDB's documented limit and the server's own.
    async fn max_document(&self) -> usize {
        *self
            .max_document
            .get_or_init(|| async {
                let reported = self
                    .db
                    .run_command(doc! {"hello": 1})
                    .await
                    .ok()
                    .and_then(|h| {
                        h.get_i32("maxBsonObjectSize")
                            .map(i64::from)
                            .or_else(|_| h.get_i64("maxBsonObjectSize"))
                            .ok()
                    })
                    .and_then(|n| usize::try_from(n).ok())
                    .unwrap_or(MAX_BSON_OBJECT);
                reported.min(MAX_BSON_OBJECT)
            })
            .await
    }

    /// The lab ids of the documents (records or tombstones) matching
    /// `filter`.
    async fn lab_ids_where(&self, filter: Document) -> Result<Vec<LabId>, RepoError> {
        let docs: Vec<Document> = self
            .docs
            .find(filter)
            .projection(doc! {"_id": 0, "lab_id": 1})
            .await
            .map_err(map_error)?
            .try_collect()
            .await
            .map_err(map_error)?;
        Ok(docs
            .iter()
            .filter_map(|d| d.get_str("lab_id").ok().and_then(|s| LabId::parse(s).ok()))
            .collect())
    }

    /// Stages a refresh's events: in the outbox, not yet deliverable.
    /// `targets` holds the content hash each lab's record is about to have.
    async fn stage_events(
        &self,
        events: &[LabEvent],
        targets: &HashMap<LabId, String>,
    ) -> Result<(), RepoError> {
        if events.is_empty() {
            return Ok(());
        }
        let docs = events
            .iter()
            .map(|e| outbox::staged_doc(e, self.retention, targets.get(&e.lab_id).cloned()))
            .collect::<Result<Vec<_>, _>>()?;
        self.outbox
            .insert_many(docs)
            .ordered(false)
            .await
            .map_err(map_error)?;
        Ok(())
    }

    /// Makes staged events deliverable.
    async fn release_events(&self, ids: Vec<&str>) -> Result<u64, RepoError> {
        if ids.is_empty() {
            return Ok(0);
        }
        Ok(self
            .outbox
            .update_many(
                doc! {"_id": {"$in": ids}, "status": outbox::STAGED},
                doc! {"$set": {"status": "pending", "visible_at": date(chrono::Utc::now())}},
            )
            .await
            .map_err(map_error)?
            .modified_count)
    }

    /// Drops staged events: their change was not made.
    async fn drop_events(&self, ids: Vec<&str>) -> Result<u64, RepoError> {
        if ids.is_empty() {
            return Ok(0);
        }
        Ok(self
            .outbox
            .delete_many(doc! {"_id": {"$in": ids}, "status": outbox::STAGED})
            .await
            .map_err(map_error)?
            .deleted_count)
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
    // A write concern error (a replica set that could not confirm) fails
    // the whole call. The test server is standalone and never reports one,
    // so no test can tell this guard from `true` (a surviving mutant).
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

/// An upsert of a changed record that only matches a live one written
/// under no greater fence: over a tombstone (or a newer run's record) it
/// tries to insert and the unique index refuses it.
fn update_statement(
    worker: &WorkerId,
    u: &RecordUpdate,
    history_limit: usize,
    fence: u64,
) -> Result<Document, RepoError> {
    let r = &u.record;
    let mut set = snapshot_fields(&r.snapshot);
    set.insert("content_hash", r.content_hash.to_string());
    set.insert("revision", to_i64(r.revision));
    set.insert("last_changed_at", date(r.last_changed_at));
    set.insert("last_seen_at", date(r.last_seen_at));
    set.insert("fence", to_i64(fence));
    let mut update = doc! {"$set": set, "$setOnInsert": {"first_seen_at": date(r.first_seen_at)}};
    if let Some(entry) = &u.entry {
        update.insert("$push", history_push(entry, history_limit)?);
    }
    let mut q = live(worker, &r.lab_id);
    q.extend(not_newer_than(fence));
    Ok(doc! {"q": q, "u": update, "upsert": true})
}

/// The stored size of a record, as a whole document.
fn record_size(r: &LabRecord) -> Result<usize, RepoError> {
    let d = mongodb::bson::to_document(&LabDoc::from_record(r))
        .map_err(|e| RepoError::Other(e.to_string()))?;
    Ok(bson_size(&d))
}

/// Escapes a user's search text for a MongoDB regular expression, so that
/// it matches literally (and cannot be a costly pattern).
fn too_large(size: usize, max: usize) -> String {
    format!(
        "the record would be {size} bytes, more than the {max} a MongoDB document may hold; left as it was"
    )
}

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
            .projection(doc! {"_id": 0, "lab_id": 1, "content_hash": 1, "tombstone.expires_at": 1})
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
            let existing = if let Ok(t) = d.get_document("tombstone") {
                // An expired tombstone hides nothing, whether or not the
                // server's TTL monitor has removed it yet (`apply` does).
                if t.get_datetime("expires_at")
                    .is_ok_and(|e| e.to_chrono() <= chrono::Utc::now())
                {
                    continue;
                }
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
        filter.extend(lab_filter(q));
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

    async fn fleet_page(&self, q: &FleetLabQuery) -> Result<Vec<LabRecord>, RepoError> {
        let mut filter = doc! {"tombstone": {"$exists": false}};
        filter.extend(lab_filter(&q.filter));
        if let Some(worker) = &q.worker {
            filter.insert("worker_id", worker.as_str());
        }
        let (field, direction) = sort_field(q.sort);
        let mut sort = Document::new();
        if let Some(field) = field {
            sort.insert(field, direction);
        }
        sort.insert("worker_id", 1);
        sort.insert("lab_id", 1);
        if let Some(after) = &q.after {
            filter.insert("$or", after_cursor(field, after));
        }
        let docs: Vec<LabDoc> = self
            .records
            .find(filter)
            .projection(doc! {"history": 0})
            .sort(sort)
            .limit(i64::try_from(q.filter.limit).unwrap_or(i64::MAX))
            .await
            .map_err(map_error)?
            .try_collect()
            .await
            .map_err(map_error)?;
        docs.into_iter().map(LabDoc::into_record).collect()
    }

    async fn count_by_state(&self, worker: &WorkerId) -> Result<Vec<(String, u64)>, RepoError> {
        let groups: Vec<Document> = self
            .records
            .clone_with_type::<Document>()
            .aggregate([
                doc! {"$match": {"worker_id": worker.as_str(), "tombstone": {"$exists": false}}},
                doc! {"$group": {"_id": "$state", "n": {"$sum": 1}}},
                doc! {"$sort": {"_id": 1}},
            ])
            .await
            .map_err(map_error)?
            .try_collect()
            .await
            .map_err(map_error)?;
        Ok(groups
            .into_iter()
            .filter_map(|g| {
                let state = g.get_str("_id").ok()?.to_owned();
                let n = match g.get("n")? {
                    Bson::Int32(n) => u64::try_from(*n).ok()?,
                    Bson::Int64(n) => u64::try_from(*n).ok()?,
                    _ => return None,
                };
                Some((state, n))
            })
            .collect())
    }

    async fn apply(
        &self,
        worker: &WorkerId,
        mut changes: RecordChanges,
        history_limit: usize,
    ) -> Result<ApplyOutcome, RepoError> {
        let mut outcome = ApplyOutcome::default();
        let max_document = self.max_document().await.saturating_sub(ENVELOPE);
        let fence = changes.fence;
        // Records that would outgrow a document are left as they were, and
        // so are their events: nothing announces a change not made.
        let mut create_docs = Vec::with_capacity(changes.create.len());
        for r in std::mem::take(&mut changes.create) {
            let mut d = mongodb::bson::to_document(&LabDoc::from_record(&r))
                .map_err(|e| RepoError::Other(e.to_string()))?;
            d.insert("fence", to_i64(fence));
            let size = bson_size(&d);
            // `>` or `>=` at the exact bound: both stay below MongoDB's
            // limit, which the bound keeps `ENVELOPE` under (an equivalent
            // mutant, here and for updates).
            if size > max_document {
                outcome
                    .too_large
                    .push((r.lab_id, too_large(size, max_document)));
            } else {
                changes.create.push(r);
                create_docs.push(d);
            }
        }
        let mut statements = Vec::with_capacity(changes.update.len());
        // What each written record's content will be: by this a later run
        // tells whether a staged event's change was made.
        let mut targets: HashMap<LabId, String> = changes
            .create
            .iter()
            .map(|r| (r.lab_id, r.content_hash.to_string()))
            .collect();
        for u in std::mem::take(&mut changes.update) {
            let size = record_size(&u.record)?;
            if size > max_document {
                outcome
                    .too_large
                    .push((u.record.lab_id, too_large(size, max_document)));
                continue;
            }
            let st = update_statement(worker, &u, history_limit, fence)?;
            let st_size = bson_size(&st);
            targets.insert(u.record.lab_id, u.record.content_hash.to_string());
            statements.push(((u.record.lab_id, st), st_size));
        }
        if !outcome.too_large.is_empty() {
            let skipped: Vec<LabId> = outcome.too_large.iter().map(|(id, _)| *id).collect();
            changes.events.retain(|e| !skipped.contains(&e.lab_id));
        }
        // Events first, staged: a crash after them leaves events that the
        // next run settles (released if their change was made, dropped if
        // not); a crash after the change would lose them.
        self.stage_events(&changes.events, &targets).await?;
        if !statements.is_empty() || !changes.prune.is_empty() {
            // Records an older labsync wrote (a rolling upgrade) have no
            // fence; they get the lowest, so that the range below matches.
            self.docs
                .update_many(
                    doc! {"worker_id": worker.as_str(), "fence": {"$exists": false}, "tombstone": {"$exists": false}},
                    doc! {"$set": {"fence": 0_i64}},
                )
                .await
                .map_err(map_error)?;
        }
        crash::point(crash::points::REFRESH_AFTER_EVENTS);
        let mut refused: Vec<LabId> = Vec::new();
        if !create_docs.is_empty() {
            // Expired tombstones of labs about to come back go first: the
            // TTL monitor removes them only every minute or so.
            let ids: Vec<&str> = changes.create.iter().map(|r| r.lab_id.as_str()).collect();
            self.docs
                .delete_many(doc! {
                    "worker_id": worker.as_str(),
                    "lab_id": {"$in": ids},
                    "tombstone.expires_at": {"$lte": date(chrono::Utc::now())},
                })
                .await
                .map_err(map_error)?;
            // Plain inserts: the unique index refuses one when a tombstone
            // (or, after a race, a live record) holds the key. The driver
            // splits them into messages the server takes.
            let duplicates = match self.docs.insert_many(create_docs).ordered(false).await {
                Ok(_) => Vec::new(),
                Err(e) => duplicate_indexes(&e).ok_or_else(|| map_error(e))?,
            };
            outcome.created = (changes.create.len() - duplicates.len()) as u64;
            refused.extend(duplicates.iter().map(|&i| changes.create[i].lab_id));
        }
        crash::point(crash::points::REFRESH_BETWEEN_BATCHES);
        // One `update` command is one document: bounded in bytes too.
        for chunk in batches(statements, UPDATE_BATCH, max_document) {
            let (ids, statements): (Vec<LabId>, Vec<Document>) = chunk.into_iter().unzip();
            let (matched, duplicates) = self.update_many_statements(statements).await?;
            outcome.updated += matched;
            // A position outside the batch (a server answering nonsense)
            // is ignored rather than trusted.
            refused.extend(duplicates.iter().filter_map(|&i| ids.get(i).copied()));
        }
        if !changes.prune.is_empty() {
            let ids: Vec<&str> = changes.prune.iter().map(LabId::as_str).collect();
            let mut filter = doc! {"worker_id": worker.as_str(), "lab_id": {"$in": ids}, "tombstone": {"$exists": false}};
            filter.extend(not_newer_than(fence));
            outcome.pruned = self
                .docs
                .delete_many(filter)
                .await
                .map_err(map_error)?
                .deleted_count;
            // `<=` would only add a read that finds nothing (equivalent).
            if outcome.pruned < changes.prune.len() as u64 {
                // Some were not removed: tombstoned meanwhile (a delete
                // announces itself), or rewritten by a newer run. Their
                // prune did not happen, so neither does its event.
                let ids: Vec<&str> = changes.prune.iter().map(LabId::as_str).collect();
                outcome.not_pruned = self
                    .lab_ids_where(doc! {"worker_id": worker.as_str(), "lab_id": {"$in": ids}})
                    .await?;
            }
        }
        if !refused.is_empty() {
            // Refused by the unique key: a tombstone (suppressed), or a live
            // record another writer created meanwhile (nothing to do).
            let ids: Vec<&str> = refused.iter().map(LabId::as_str).collect();
            outcome.suppressed = self
                .lab_ids_where(doc! {"worker_id": worker.as_str(), "lab_id": {"$in": ids}, "tombstone": {"$exists": true}})
                .await?;
        }
        // The changes refused by the unique key did not happen: their events
        // go; every other event is released.
        let (dropped, released): (Vec<&LabEvent>, Vec<&LabEvent>) =
            changes.events.iter().partition(|e| {
                refused.contains(&e.lab_id)
                    || (e.kind == labsync_application::LabEventKind::Pruned
                        && outcome.not_pruned.contains(&e.lab_id))
            });
        crash::point(crash::points::REFRESH_BEFORE_RELEASE);
        self.release_events(released.iter().map(|e| e.id.as_str()).collect())
            .await?;
        self.drop_events(dropped.iter().map(|e| e.id.as_str()).collect())
            .await?;
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
            doc! {"deleted_at": date(t.deleted_at), "deleted_by": t.deleted_by.to_string(), "expires_at": date(t.expires_at)},
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

    async fn settle_staged_events(&self, worker: &WorkerId) -> Result<(u64, u64), RepoError> {
        let staged: Vec<Document> = self
            .outbox
            .find(doc! {"worker_id": worker.as_str(), "status": outbox::STAGED})
            .projection(doc! {"_id": 1, "lab_id": 1, "kind": 1, "target_hash": 1})
            .await
            .map_err(map_error)?
            .try_collect()
            .await
            .map_err(map_error)?;
        if staged.is_empty() {
            return Ok((0, 0));
        }
        let labs: Vec<&str> = staged
            .iter()
            .filter_map(|d| d.get_str("lab_id").ok())
            .collect();
        // Per lab: the live record's hash, or "tombstone"; absent: nothing.
        let stored: HashMap<String, String> = self
            .docs
            .find(doc! {"worker_id": worker.as_str(), "lab_id": {"$in": labs}})
            .projection(doc! {"_id": 0, "lab_id": 1, "content_hash": 1, "tombstone.expires_at": 1})
            .await
            .map_err(map_error)?
            .try_collect::<Vec<Document>>()
            .await
            .map_err(map_error)?
            .into_iter()
            .filter_map(|d| {
                let lab = d.get_str("lab_id").ok()?.to_owned();
                let state = if d.contains_key("tombstone") {
                    "tombstone".to_owned()
                } else {
                    d.get_str("content_hash").ok()?.to_owned()
                };
                Some((lab, state))
            })
            .collect();
        let (mut release, mut drop) = (Vec::new(), Vec::new());
        for d in &staged {
            let (Ok(id), Ok(lab)) = (d.get_str("_id"), d.get_str("lab_id")) else {
                continue;
            };
            let made = match (d.get_str("kind"), d.get_str("target_hash")) {
                // A prune was made if the record is gone (not replaced by
                // a tombstone: that is a delete, with its own event).
                (Ok("pruned"), _) => !stored.contains_key(lab),
                (_, Ok(target)) => stored.get(lab).is_some_and(|h| h == target),
                _ => false,
            };
            if made {
                release.push(id);
            } else {
                drop.push(id);
            }
        }
        let released = self.release_events(release).await?;
        let dropped = self.drop_events(drop).await?;
        Ok((released, dropped))
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

/// The state, owner and title filters of a page.
/// The field a sort orders by before (worker id, lab id), and its
/// direction; each has its index (see `ensure_indexes`).
const fn sort_field(sort: LabSort) -> (Option<&'static str>, i32) {
    match sort {
        LabSort::Worker => (None, 1),
        LabSort::Title => (Some("title"), 1),
        LabSort::State => (Some("state"), 1),
        LabSort::Modified => (Some("modified"), -1),
    }
}

/// The labs after `c` in the order of `field` (ascending for text,
/// newest first for `modified`, where labs without a time come last).
fn after_cursor(field: Option<&str>, c: &FleetCursor) -> Vec<Document> {
    let (w, l) = (c.worker.as_str(), c.lab.as_str());
    let ties = |key: Document| {
        let mut next_worker = key.clone();
        next_worker.insert("worker_id", doc! {"$gt": w});
        let mut next_lab = key;
        next_lab.insert("worker_id", w);
        next_lab.insert("lab_id", doc! {"$gt": l});
        vec![next_worker, next_lab]
    };
    match (field, &c.key) {
        (Some(f), SortKey::Text(k)) => {
            let mut or = vec![doc! {f: {"$gt": k}}];
            or.extend(ties(doc! {f: k}));
            or
        }
        (Some(f), SortKey::Time(Some(t))) => {
            let mut or = vec![doc! {f: {"$lt": date(*t)}}];
            or.extend(ties(doc! {f: date(*t)}));
            // Null sorts below every time: after the last of them.
            or.push(doc! {f: Bson::Null});
            or
        }
        (Some(f), SortKey::Time(None)) => ties(doc! {f: Bson::Null}),
        _ => ties(Document::new()),
    }
}

fn lab_filter(q: &LabQuery) -> mongodb::bson::Document {
    let mut filter = doc! {};
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
    filter
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_hold_at_most_the_count_and_the_bytes_and_a_large_item_goes_alone() {
        let sized = |sizes: &[usize]| sizes.iter().copied().enumerate().collect::<Vec<_>>();
        assert_eq!(
            batches(sized(&[1, 1, 1, 1, 1]), 2, 100),
            [vec![0, 1], vec![2, 3], vec![4]]
        );
        assert_eq!(
            batches(sized(&[40, 60, 1, 50, 50, 200, 1]), 10, 100),
            [vec![0, 1], vec![2, 3], vec![4], vec![5], vec![6]]
        );
        assert!(batches(Vec::<(u8, usize)>::new(), 2, 100).is_empty());
    }

    #[test]
    fn a_document_is_measured_as_the_server_stores_it() {
        assert_eq!(bson_size(&doc! {}), 5);
        assert_eq!(bson_size(&doc! {"a": "bc"}), 5 + 1 + 2 + 4 + 3);
    }

    #[test]
    fn search_text_matches_literally() {
        assert_eq!(regex_escape("a.b*(c)"), r"a\.b\*\(c\)");
    }
}
