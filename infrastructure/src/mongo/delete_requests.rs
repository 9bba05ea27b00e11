//! [`DeleteRequests`] on MongoDB: `_id` = request id. Claiming is one
//! `find_one_and_update` that writes a claim token, so two processes never
//! claim the same request at once; renewing and saving match that token, so
//! a run that lost its claim changes nothing.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use labsync_application::{DeleteRequest, DeleteRequests, RepoError};
use mongodb::bson::{self, Bson, Document, doc};
use mongodb::options::ReturnDocument;
use mongodb::{Collection, Database};

use super::convert::date;
use super::{collections, map_error};

#[derive(Debug, Clone)]
pub struct MongoDeleteRequests {
    requests: Collection<Document>,
}

impl MongoDeleteRequests {
    pub fn new(db: &Database) -> Self {
        Self {
            requests: db.collection(collections::DELETE_REQUESTS),
        }
    }
}

fn until(now: DateTime<Utc>, hold: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(hold)
        .ok()
        .and_then(|d| now.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

const DATE_FIELDS: [&str; 3] = ["created_at", "updated_at", "next_attempt_at"];

fn to_doc(r: &DeleteRequest) -> Result<Document, RepoError> {
    let mut d = bson::to_document(r).map_err(|e| RepoError::Other(e.to_string()))?;
    d.remove("id");
    d.insert("_id", r.id.clone());
    d.insert("created_at", date(r.created_at));
    d.insert("updated_at", date(r.updated_at));
    d.insert("next_attempt_at", date(r.next_attempt_at));
    Ok(d)
}

fn from_doc(mut d: Document) -> Result<DeleteRequest, RepoError> {
    if let Some(id) = d.remove("_id") {
        d.insert("id", id);
    }
    d.remove("claimed_until");
    d.remove("claim");
    for field in DATE_FIELDS {
        if let Some(Bson::DateTime(t)) = d.get(field) {
            let text = t.to_chrono().to_rfc3339();
            d.insert(field, text);
        }
    }
    bson::from_document(d).map_err(|e| RepoError::Corrupt(format!("delete request: {e}")))
}

#[async_trait]
impl DeleteRequests for MongoDeleteRequests {
    async fn create(&self, r: &DeleteRequest) -> Result<(), RepoError> {
        self.requests
            .insert_one(to_doc(r)?)
            .await
            .map_err(map_error)?;
        Ok(())
    }

    async fn get(&self, id: &str) -> Result<Option<DeleteRequest>, RepoError> {
        self.requests
            .find_one(doc! {"_id": id})
            .await
            .map_err(map_error)?
            .map(from_doc)
            .transpose()
    }

    async fn claim_due(
        &self,
        now: DateTime<Utc>,
        hold: Duration,
        claim: &str,
    ) -> Result<Option<DeleteRequest>, RepoError> {
        let until = until(now, hold);
        self.requests
            .find_one_and_update(
                doc! {"$or": [
                    {"status": "pending", "next_attempt_at": {"$lte": date(now)}},
                    {"status": "running", "claimed_until": {"$lte": date(now)}},
                ]},
                doc! {"$set": {"status": "running", "claimed_until": date(until), "claim": claim}},
            )
            .sort(doc! {"next_attempt_at": 1})
            .return_document(ReturnDocument::After)
            .await
            .map_err(map_error)?
            .map(from_doc)
            .transpose()
    }

    async fn renew_claim(
        &self,
        id: &str,
        claim: &str,
        now: DateTime<Utc>,
        hold: Duration,
    ) -> Result<bool, RepoError> {
        let r = self
            .requests
            .update_one(
                doc! {"_id": id, "status": "running", "claim": claim},
                doc! {"$set": {"claimed_until": date(until(now, hold))}},
            )
            .await
            .map_err(map_error)?;
        Ok(r.matched_count == 1)
    }

    async fn save(&self, r: &DeleteRequest, claim: &str) -> Result<bool, RepoError> {
        let result = self
            .requests
            .replace_one(doc! {"_id": &r.id, "claim": claim}, to_doc(r)?)
            .await
            .map_err(map_error)?;
        Ok(result.matched_count == 1)
    }
}
