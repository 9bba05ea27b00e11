//! [`AuditLog`] on MongoDB: one document per delete or prune.

use async_trait::async_trait;
use futures::TryStreamExt;
use labsync_application::RepoError;
use labsync_application::ports::{AuditAction, AuditEntry, AuditLog, AuditQuery, StoredAudit};
use labsync_domain::{Actor, LabId, WorkerId};
use mongodb::bson::oid::ObjectId;
use mongodb::bson::{self, Document, doc};
use mongodb::{Collection, Database};
use serde::{Deserialize, Serialize};

use super::convert::date;
use super::{collections, find_sorted, map_error};

/// The stored audit entry as a document, for writes that carry their audit
/// entry with them.
///
/// # Errors
/// [`RepoError::Other`] if it cannot be encoded.
pub(crate) fn audit_document(e: &AuditEntry) -> Result<mongodb::bson::Document, RepoError> {
    bson::to_document(&AuditDoc::from(e.clone())).map_err(|e| RepoError::Other(e.to_string()))
}

impl From<AuditEntry> for AuditDoc {
    fn from(e: AuditEntry) -> Self {
        Self {
            at: date(e.at),
            actor: e.actor,
            action: e.action,
            worker_id: e.worker_id,
            lab_id: e.lab_id,
            outcome: e.outcome,
            detail: e.detail,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct AuditDoc {
    at: bson::DateTime,
    actor: Actor,
    action: AuditAction,
    worker_id: WorkerId,
    lab_id: Option<LabId>,
    outcome: String,
    detail: String,
}

#[derive(Debug, Clone)]
pub struct MongoAuditLog {
    entries: Collection<AuditDoc>,
}

impl MongoAuditLog {
    pub fn new(db: &Database) -> Self {
        Self {
            entries: db.collection(collections::AUDIT),
        }
    }
}

#[async_trait]
impl AuditLog for MongoAuditLog {
    async fn record(&self, entries: Vec<AuditEntry>) -> Result<(), RepoError> {
        if entries.is_empty() {
            return Ok(());
        }
        let docs = entries.into_iter().map(AuditDoc::from);
        self.entries.insert_many(docs).await.map_err(map_error)?;
        Ok(())
    }

    async fn recent(
        &self,
        worker: &WorkerId,
        lab: Option<&LabId>,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, RepoError> {
        let mut filter = doc! {"worker_id": worker.as_str()};
        if let Some(lab) = lab {
            filter.insert("lab_id", lab.as_str());
        }
        let docs = find_sorted(
            &self.entries,
            filter,
            doc! {"at": -1, "_id": -1},
            Some(limit),
        )
        .await?;
        Ok(docs.into_iter().map(AuditDoc::entry).collect())
    }

    async fn search(&self, q: &AuditQuery) -> Result<Vec<StoredAudit>, RepoError> {
        let mut filter = doc! {};
        if let Some(w) = &q.worker {
            filter.insert("worker_id", w.as_str());
        }
        if let Some(l) = &q.lab {
            filter.insert("lab_id", l.as_str());
        }
        if let Some(a) = &q.actor {
            filter.insert("actor", a);
        }
        if let Some(action) = q.action {
            let word = bson::to_bson(&action).map_err(|e| RepoError::Other(e.to_string()))?;
            filter.insert("action", word);
        }
        if let Some(since) = q.since {
            filter.insert("at", doc! {"$gte": date(since)});
        }
        if let Some(before) = q
            .before
            .as_deref()
            .and_then(|b| ObjectId::parse_str(b).ok())
        {
            filter.insert("_id", doc! {"$lt": before});
        }
        let docs: Vec<Document> = self
            .entries
            .clone_with_type::<Document>()
            .find(filter)
            .sort(doc! {"_id": -1})
            .limit(i64::try_from(q.limit).unwrap_or(i64::MAX))
            .await
            .map_err(map_error)?
            .try_collect()
            .await
            .map_err(map_error)?;
        docs.into_iter()
            .map(|d| {
                let id = d
                    .get_object_id("_id")
                    .map(ObjectId::to_hex)
                    .map_err(|e| RepoError::Corrupt(format!("audit _id: {e}")))?;
                let entry: AuditDoc =
                    bson::from_document(d).map_err(|e| RepoError::Corrupt(e.to_string()))?;
                Ok(StoredAudit {
                    id,
                    entry: entry.entry(),
                })
            })
            .collect()
    }
}

impl AuditDoc {
    fn entry(self) -> AuditEntry {
        AuditEntry {
            at: self.at.to_chrono(),
            actor: self.actor,
            action: self.action,
            worker_id: self.worker_id,
            lab_id: self.lab_id,
            outcome: self.outcome,
            detail: self.detail,
        }
    }
}
