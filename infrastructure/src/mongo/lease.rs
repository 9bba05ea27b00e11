//! [`RefreshLease`] on MongoDB: one document per worker (`_id` = worker id)
//! naming the holder and when the lease expires.
//!
//! Taking the lease is one upsert whose filter matches only a free, expired
//! or own lease. When someone else holds a live lease the filter misses, the
//! upsert tries to insert a second document with the same `_id`, and the
//! server refuses it (E11000): the atomic "no" across processes.

use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use labsync_application::RepoError;
use labsync_application::ports::RefreshLease;
use labsync_domain::WorkerId;
use mongodb::bson::{Document, doc};
use mongodb::{Collection, Database};

use super::convert::date;
use super::{collections, map_error};

#[derive(Debug, Clone)]
pub struct MongoRefreshLease {
    leases: Collection<Document>,
}

impl MongoRefreshLease {
    pub fn new(db: &Database) -> Self {
        Self {
            leases: db.collection(collections::LEASES),
        }
    }
}

#[async_trait]
impl RefreshLease for MongoRefreshLease {
    async fn try_acquire(
        &self,
        worker: &WorkerId,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, RepoError> {
        let now = Utc::now();
        let expires = now + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::hours(1));
        let result = self
            .leases
            .update_one(
                doc! {
                    "_id": worker.as_str(),
                    "$or": [{"expires_at": {"$lte": date(now)}}, {"holder": holder}],
                },
                doc! {"$set": {"holder": holder, "acquired_at": date(now), "expires_at": date(expires)}},
            )
            .upsert(true)
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(e) => match map_error(e) {
                RepoError::Duplicate(_) => Ok(false),
                other => Err(other),
            },
        }
    }

    async fn release(&self, worker: &WorkerId, holder: &str) -> Result<(), RepoError> {
        self.leases
            .delete_one(doc! {"_id": worker.as_str(), "holder": holder})
            .await
            .map_err(map_error)?;
        Ok(())
    }
}
