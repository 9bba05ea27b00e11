//! [`RefreshLease`] on MongoDB: one document per worker (`_id` = worker id)
//! naming the holder and when the lease expires.
//!
//! Taking the lease is one upsert whose filter matches only a free, expired
//! or own lease. When someone else holds a live lease the filter misses, the
//! upsert tries to insert a second document with the same `_id`, and the
//! server refuses it (E11000): the atomic "no" across processes.
//!
//! A run whose release fails (MongoDB went away as it ended) leaves its lease
//! behind. Without help the worker would not be refreshed again until the
//! lease expires (10 minutes by default), even after MongoDB is back. The
//! lease remembers such holders, and the next run in this process takes the
//! lease over from them: their runs are over, so nothing else can be using it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
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
    /// Per worker, the holder of a finished run whose release failed.
    unreleased: Arc<Mutex<HashMap<WorkerId, String>>>,
}

impl MongoRefreshLease {
    pub fn new(db: &Database) -> Self {
        Self {
            leases: db.collection(collections::LEASES),
            unreleased: Arc::default(),
        }
    }

    fn unreleased(&self) -> std::sync::MutexGuard<'_, HashMap<WorkerId, String>> {
        self.unreleased.lock().unwrap_or_else(|p| p.into_inner())
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
        let mut ours = vec![holder.to_owned()];
        ours.extend(self.unreleased().get(worker).cloned());
        let result = self
            .leases
            .update_one(
                doc! {
                    "_id": worker.as_str(),
                    "$or": [{"expires_at": {"$lte": date(now)}}, {"holder": {"$in": ours}}],
                },
                doc! {"$set": {"holder": holder, "acquired_at": date(now), "expires_at": date(expires)}},
            )
            .upsert(true)
            .await;
        match result {
            Ok(_) => {
                self.unreleased().remove(worker);
                Ok(true)
            }
            Err(e) => match map_error(e) {
                RepoError::Duplicate(_) => Ok(false),
                other => Err(other),
            },
        }
    }

    async fn release(&self, worker: &WorkerId, holder: &str) -> Result<(), RepoError> {
        let result = self
            .leases
            .delete_one(doc! {"_id": worker.as_str(), "holder": holder})
            .await;
        if let Err(e) = result {
            self.unreleased().insert(worker.clone(), holder.to_owned());
            return Err(map_error(e));
        }
        Ok(())
    }
}
