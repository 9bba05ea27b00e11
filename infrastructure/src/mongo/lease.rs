//! [`RefreshLease`] on MongoDB: one document per worker (`_id` = worker id)
//! naming the holder, when the lease expires, and the fencing token
//! (`epoch`) of the run that took it last.
//!
//! # Expected flow
//! 1. Acquire: read the worker's lease document and the server's clock; if
//!    the lease is free (expired by the server's clock, released, or ours),
//!    write the new holder with a compare-and-set on the document as read
//!    (an insert when there was none): of two processes racing, one write
//!    matches and the other misses (or hits E11000 on the insert).
//! 2. Renew: move `expires_at` forward, only if the holder is still ours.
//! 3. Release: expire the lease (at the epoch), keeping the document and
//!    its epoch.
//!
//! # Guarantees
//! - One holder at a time per worker, across processes.
//! - Expiry is judged by the server's clock (`hello`'s `localTime`), so a
//!   replica whose clock runs ahead cannot take a live lease.
//! - Every grant's epoch is greater than the one before it:
//!   `max(server time in ms, previous epoch + 1)`. Being time-based, it
//!   keeps growing even if the document is lost (dropped by hand, an old
//!   TTL index), so a newer run always outranks an older one.
//! - A run whose release fails (MongoDB went away as it ended) does not
//!   block the next run of the same process: the lease remembers such
//!   holders and the next acquisition here takes the lease over from them.
//!
//! # Assumptions
//! The server's clock does not jump back by more than the time between two
//! runs of a worker.
//!
//! # Caveats
//! A server that does not report `localTime` in `hello` leaves expiry to
//! this process's clock (logged once).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use labsync_application::RepoError;
use labsync_application::ports::RefreshLease;
use labsync_domain::WorkerId;
use mongodb::bson::{Bson, Document, doc};
use mongodb::{Collection, Database};
use tracing::warn;

use super::convert::date;
use super::{collections, map_error};

#[derive(Debug, Clone)]
pub struct MongoRefreshLease {
    db: Database,
    leases: Collection<Document>,
    /// Per worker, the holder of a finished run whose release failed.
    unreleased: Arc<Mutex<HashMap<WorkerId, String>>>,
    warned_clock: Arc<AtomicBool>,
}

/// The holder written by [`RefreshLease::revoke`].
const REVOKED: &str = "(revoked: worker removed)";

impl MongoRefreshLease {
    pub fn new(db: &Database) -> Self {
        Self {
            db: db.clone(),
            leases: db.collection(collections::LEASES),
            unreleased: Arc::default(),
            warned_clock: Arc::default(),
        }
    }

    fn unreleased(&self) -> std::sync::MutexGuard<'_, HashMap<WorkerId, String>> {
        self.unreleased
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The database server's clock.
    async fn now(&self) -> Result<DateTime<Utc>, RepoError> {
        let hello = self
            .db
            .run_command(doc! {"hello": 1})
            .await
            .map_err(map_error)?;
        if let Ok(t) = hello.get_datetime("localTime") {
            return Ok(t.to_chrono());
        }
        // Decides only whether to log (a mutant here is equivalent).
        if !self.warned_clock.swap(true, Ordering::Relaxed) {
            warn!(
                "the database does not report its clock (hello.localTime): refresh leases expire by this process's clock"
            );
        }
        Ok(Utc::now())
    }
}

fn plus(now: DateTime<Utc>, ttl: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(ttl)
        .ok()
        .and_then(|d| now.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// The epoch stored in a lease document. Epochs are written as Int64; any
/// other value counts as 0, which a time-based epoch outranks anyway (an
/// Int32 is below any server time in milliseconds since 1970-01-25).
fn epoch_of(d: &Document) -> u64 {
    match d.get("epoch") {
        Some(Bson::Int64(n)) => u64::try_from(*n).unwrap_or(0),
        _ => 0,
    }
}

fn next_epoch(now: DateTime<Utc>, previous: u64) -> u64 {
    u64::try_from(now.timestamp_millis())
        .unwrap_or(0)
        .max(previous + 1)
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl MongoRefreshLease {
    /// Writes `holder` over the lease document as read (`current`), or
    /// inserts one; false when another writer got there first.
    async fn swap(
        &self,
        worker: &WorkerId,
        current: Option<&Document>,
        set: Document,
    ) -> Result<bool, RepoError> {
        match current {
            None => {
                let mut d = set;
                d.insert("_id", worker.as_str());
                match self.leases.insert_one(d).await {
                    Ok(_) => Ok(true),
                    Err(e) => match map_error(e) {
                        RepoError::Duplicate(_) => Ok(false),
                        other => Err(other),
                    },
                }
            }
            Some(old) => {
                // The document as read, field for field that a writer changes.
                let mut filter = doc! {"_id": worker.as_str()};
                for key in ["holder", "expires_at", "epoch"] {
                    filter.insert(
                        key,
                        old.get(key)
                            .cloned()
                            .unwrap_or_else(|| Bson::Document(doc! {"$exists": false})),
                    );
                }
                let r = self
                    .leases
                    .update_one(filter, doc! {"$set": set})
                    .await
                    .map_err(map_error)?;
                Ok(r.matched_count == 1)
            }
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
    ) -> Result<Option<u64>, RepoError> {
        let now = self.now().await?;
        let mut ours = vec![holder.to_owned()];
        ours.extend(self.unreleased().get(worker).cloned());
        let current = self
            .leases
            .find_one(doc! {"_id": worker.as_str()})
            .await
            .map_err(map_error)?;
        if let Some(d) = &current {
            let expired = d
                .get_datetime("expires_at")
                .map_or(true, |t| t.to_chrono() <= now);
            let held_by_us = d
                .get_str("holder")
                .is_ok_and(|h| ours.iter().any(|o| o == h));
            if !expired && !held_by_us {
                return Ok(None);
            }
        }
        let epoch = next_epoch(now, current.as_ref().map_or(0, epoch_of));
        let set = doc! {
            "holder": holder,
            "acquired_at": date(now),
            "expires_at": date(plus(now, ttl)),
            "epoch": to_i64(epoch),
        };
        if self.swap(worker, current.as_ref(), set).await? {
            self.unreleased().remove(worker);
            Ok(Some(epoch))
        } else {
            Ok(None)
        }
    }

    async fn renew(
        &self,
        worker: &WorkerId,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, RepoError> {
        let now = self.now().await?;
        let r = self
            .leases
            .update_one(
                doc! {"_id": worker.as_str(), "holder": holder},
                doc! {"$set": {"expires_at": date(plus(now, ttl))}},
            )
            .await
            .map_err(map_error)?;
        Ok(r.matched_count == 1)
    }

    async fn release(&self, worker: &WorkerId, holder: &str) -> Result<(), RepoError> {
        // Expired at the epoch: free by any clock, without asking the
        // server for its time (one round trip less per run).
        let result = self
            .leases
            .update_one(
                doc! {"_id": worker.as_str(), "holder": holder},
                doc! {"$set": {"expires_at": date(DateTime::<Utc>::UNIX_EPOCH), "holder": ""}},
            )
            .await
            .map_err(map_error);
        if let Err(e) = result {
            self.unreleased().insert(worker.clone(), holder.to_owned());
            return Err(e);
        }
        Ok(())
    }

    async fn revoke(&self, worker: &WorkerId, ttl: Duration) -> Result<(), RepoError> {
        // Whoever holds it loses it: a compare-and-set, retried while runs
        // race for the document.
        for _ in 0..10 {
            let now = self.now().await?;
            let current = self
                .leases
                .find_one(doc! {"_id": worker.as_str()})
                .await
                .map_err(map_error)?;
            let set = doc! {
                "holder": REVOKED,
                "acquired_at": date(now),
                "expires_at": date(plus(now, ttl)),
                "epoch": to_i64(next_epoch(now, current.as_ref().map_or(0, epoch_of))),
            };
            if self.swap(worker, current.as_ref(), set).await? {
                return Ok(());
            }
        }
        Err(RepoError::Other(format!(
            "could not revoke the refresh lease of worker {worker}: it kept changing"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_follow_the_clock_and_never_go_back() {
        let t = DateTime::<Utc>::from_timestamp_millis(1_000_000).unwrap();
        assert_eq!(next_epoch(t, 0), 1_000_000);
        assert_eq!(next_epoch(t, 5_000_000), 5_000_001, "a clock behind");
        assert_eq!(next_epoch(t, 1_000_000), 1_000_001, "the same millisecond");
        assert_eq!(
            plus(t, Duration::from_secs(u64::MAX)),
            DateTime::<Utc>::MAX_UTC
        );
    }
}
