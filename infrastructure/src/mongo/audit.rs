//! [`AuditLog`] on MongoDB: one document per delete or prune.

use async_trait::async_trait;
use futures::TryStreamExt;
use labsync_application::RepoError;
use labsync_application::ports::{AuditAction, AuditEntry, AuditLog};
use labsync_domain::{Actor, LabId, WorkerId};
use mongodb::bson::{self, doc};
use mongodb::{Collection, Database};
use serde::{Deserialize, Serialize};

use super::convert::date;
use super::{collections, map_error};

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
        let docs: Vec<AuditDoc> = self
            .entries
            .find(filter)
            .sort(doc! {"at": -1, "_id": -1})
            .limit(i64::try_from(limit).unwrap_or(i64::MAX))
            .await
            .map_err(map_error)?
            .try_collect()
            .await
            .map_err(map_error)?;
        Ok(docs
            .into_iter()
            .map(|d| AuditEntry {
                at: d.at.to_chrono(),
                actor: d.actor,
                action: d.action,
                worker_id: d.worker_id,
                lab_id: d.lab_id,
                outcome: d.outcome,
                detail: d.detail,
            })
            .collect())
    }
}
