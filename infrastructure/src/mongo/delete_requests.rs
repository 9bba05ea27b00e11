//! [`DeleteRequests`] on MongoDB: `_id` = request id. Claiming is one
//! `find_one_and_update` that writes a claim token, so two processes never
//! claim the same request at once; renewing and saving match that token, so
//! a run that lost its claim changes nothing.
//!
//! # One active request per lab
//! A lock document per (worker, lab) in `delete_request_locks`, `_id` =
//! `worker/lab`, names the lab's active request: a submit inserts the lock
//! first (E11000: the lab has one; that request is the answer), then the
//! request. A request that ends (done, failed, cancelled) removes its lock.
//! A lock whose request has ended, or is still not stored 10 s after the
//! lock (a process died in between), is stale: the next submit removes it
//! and tries again. A younger lock without its request is being stored:
//! the submit waits for it. (A
//! unique index on a field of the request itself would need the index
//! entry to move when a finished request changes the field; the test
//! server keeps stale entries, so the lock is a document of its own.)

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use labsync_application::{DeleteRequest, DeleteRequestStatus, DeleteRequests, RepoError};
use labsync_domain::{Actor, WorkerId};
use mongodb::bson::{self, Bson, Document, doc};
use mongodb::options::ReturnDocument;
use mongodb::{Collection, Database};

use super::convert::date;
use super::{collections, find_sorted, map_error};

#[derive(Debug, Clone)]
pub struct MongoDeleteRequests {
    requests: Collection<Document>,
    locks: Collection<Document>,
}

impl MongoDeleteRequests {
    pub fn new(db: &Database) -> Self {
        Self {
            requests: db.collection(collections::DELETE_REQUESTS),
            locks: db.collection(collections::DELETE_REQUEST_LOCKS),
        }
    }

    fn lock_id(r: &DeleteRequest) -> String {
        format!("{}/{}", r.worker_id, r.lab_id)
    }

    /// Frees the lab of `r` if `r` holds its lock.
    async fn unlock(&self, r: &DeleteRequest) -> Result<(), RepoError> {
        self.locks
            .delete_one(doc! {"_id": Self::lock_id(r), "request": &r.id})
            .await
            .map_err(map_error)?;
        Ok(())
    }
}

/// Tries to submit this often before giving up on a lock that keeps
/// changing hands.
const SUBMIT_TRIES: usize = 5;

/// How long a lock may name a request not stored yet before it counts as
/// left by a process that died between the two inserts.
const STORE_GRACE: chrono::TimeDelta = chrono::TimeDelta::seconds(10);

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
    async fn create_unless_active(
        &self,
        r: &DeleteRequest,
    ) -> Result<(DeleteRequest, bool), RepoError> {
        let lock = Self::lock_id(r);
        for _ in 0..SUBMIT_TRIES {
            match self
                .locks
                .insert_one(doc! {"_id": &lock, "request": &r.id, "created_at": date(Utc::now())})
                .await
                .map_err(map_error)
            {
                Ok(_) => {
                    self.requests
                        .insert_one(to_doc(r)?)
                        .await
                        .map_err(map_error)?;
                    return Ok((r.clone(), true));
                }
                Err(RepoError::Duplicate(_)) => {}
                Err(e) => return Err(e),
            }
            let Some(held) = self
                .locks
                .find_one(doc! {"_id": &lock})
                .await
                .map_err(map_error)?
            else {
                continue;
            };
            let holder = held.get_str("request").unwrap_or_default().to_owned();
            // The holder stores its request right after its lock: give it
            // a moment before calling the lock stale.
            let locked_at = held
                .get_datetime("created_at")
                .map_or(DateTime::<Utc>::UNIX_EPOCH, |t| t.to_chrono());
            let mut found = self.get(&holder).await?;
            while found.is_none() && Utc::now() - locked_at < STORE_GRACE {
                tokio::time::sleep(Duration::from_millis(20)).await;
                found = self.get(&holder).await?;
            }
            match found {
                Some(active) if active.status.is_active() => return Ok((active, false)),
                _ => {
                    // Stale: its request ended, or was never stored.
                    self.locks
                        .delete_one(doc! {"_id": &lock, "request": &holder})
                        .await
                        .map_err(map_error)?;
                }
            }
        }
        Err(RepoError::Other(format!(
            "the delete request lock of {lock} kept changing hands"
        )))
    }

    async fn get(&self, id: &str) -> Result<Option<DeleteRequest>, RepoError> {
        self.requests
            .find_one(doc! {"_id": id})
            .await
            .map_err(map_error)?
            .map(from_doc)
            .transpose()
    }

    async fn recent(
        &self,
        status: Option<labsync_application::DeleteRequestStatus>,
        limit: usize,
    ) -> Result<Vec<DeleteRequest>, RepoError> {
        let filter = match status {
            Some(s) => doc! {"status": s.as_str()},
            None => doc! {},
        };
        let docs =
            find_sorted(&self.requests, filter, doc! {"created_at": -1}, Some(limit)).await?;
        docs.into_iter().map(from_doc).collect()
    }

    async fn stats(&self) -> Result<labsync_application::QueueStats, RepoError> {
        let count = |status: &'static str| {
            let requests = self.requests.clone();
            async move {
                requests
                    .count_documents(doc! {"status": status})
                    .await
                    .map_err(map_error)
            }
        };
        let oldest = self
            .requests
            .find_one(doc! {"status": "pending"})
            .sort(doc! {"created_at": 1})
            .projection(doc! {"created_at": 1})
            .await
            .map_err(map_error)?
            .and_then(|d| d.get_datetime("created_at").ok().map(|t| t.to_chrono()));
        Ok(labsync_application::QueueStats {
            pending: count("pending").await?,
            running: count("running").await?,
            failed: count("failed").await?,
            oldest_pending_at: oldest,
        })
    }

    async fn claim_due(
        &self,
        now: DateTime<Utc>,
        hold: Duration,
        claim: &str,
        busy: &[WorkerId],
    ) -> Result<Option<DeleteRequest>, RepoError> {
        let until = until(now, hold);
        let busy: Vec<&str> = busy.iter().map(WorkerId::as_str).collect();
        self.requests
            .find_one_and_update(
                doc! {
                    "worker_id": {"$nin": busy},
                    "$or": [
                        {"status": "pending", "next_attempt_at": {"$lte": date(now)}},
                        {"status": "running", "claimed_until": {"$lte": date(now)}, "cancel_requested_by": null},
                    ],
                },
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
            .replace_one(
                // Still running under this claim: a cancel of an expired
                // claim (or another runner) has moved it on.
                doc! {"_id": &r.id, "status": "running", "claim": claim, "cancel_requested_by": null},
                to_doc(r)?,
            )
            .await
            .map_err(map_error)?;
        if result.matched_count == 1 {
            if !r.status.is_active() {
                self.unlock(r).await?;
            }
            return Ok(true);
        }
        // Still ours, but a cancel came while the attempt ran: a retry
        // becomes the end.
        let Some(by) = self
            .requests
            .find_one(doc! {"_id": &r.id, "status": "running", "claim": claim})
            .await
            .map_err(map_error)?
            .and_then(|d| d.get_str("cancel_requested_by").ok().map(Actor::from))
        else {
            return Ok(false);
        };
        let mut r = r.clone();
        r.cancel_requested_by = Some(by.clone());
        if r.status == DeleteRequestStatus::Pending {
            r.status = DeleteRequestStatus::Cancelled;
            r.cancelled_by = Some(by);
        }
        let result = self
            .requests
            .replace_one(
                doc! {"_id": &r.id, "status": "running", "claim": claim},
                to_doc(&r)?,
            )
            .await
            .map_err(map_error)?;
        if result.matched_count == 1 && !r.status.is_active() {
            self.unlock(&r).await?;
        }
        Ok(result.matched_count == 1)
    }

    async fn cancel(
        &self,
        id: &str,
        by: &Actor,
        now: DateTime<Utc>,
    ) -> Result<Option<DeleteRequest>, RepoError> {
        let cancelled = self
            .requests
            .find_one_and_update(
                doc! {"_id": id, "$or": [
                    {"status": "pending"},
                    // Its runner died: nothing runs it any more.
                    {"status": "running", "claimed_until": {"$lte": date(now)}},
                ]},
                doc! {"$set": {"status": "cancelled", "cancelled_by": by.to_string(), "updated_at": date(now)}},
            )
            .return_document(ReturnDocument::After)
            .await
            .map_err(map_error)?
            .map(from_doc)
            .transpose()?;
        if let Some(r) = cancelled {
            self.unlock(&r).await?;
            return Ok(Some(r));
        }
        // Running: its attempt finishes first, then it ends cancelled.
        let requested = self
            .requests
            .find_one_and_update(
                doc! {"_id": id, "status": "running"},
                doc! {"$set": {"cancel_requested_by": by.to_string()}},
            )
            .return_document(ReturnDocument::After)
            .await
            .map_err(map_error)?;
        match requested {
            Some(d) => from_doc(d).map(Some),
            None => self.get(id).await,
        }
    }
}
