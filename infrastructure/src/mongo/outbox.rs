//! The event outbox: lab events stored as CloudEvents just before the change
//! they describe, and the relay that delivers them at least once to an HTTP
//! sink.
//!
//! # Expected flow
//! 1. A repository write adds outbox documents, then makes its change. A
//!    delete's events are `pending` at once (they describe what CML did,
//!    which happened whatever MongoDB does next); a refresh's are `staged`
//!    (see [`staged_doc`]) and become `pending` only once the change they
//!    describe is written.
//! 2. The relay claims a due document (moving `next_attempt_at` forward, so
//!    that a second replica does not take it too), POSTs the CloudEvent, and
//!    marks it `delivered`, or schedules the next attempt with capped
//!    exponential backoff.
//!
//! # Guarantees
//! At-least-once: an event is marked delivered only after the sink answered
//! 2xx; a crash in between delivers it again (consumers deduplicate on the
//! CloudEvent `id`). Every document expires (`expires_at`, TTL index), so
//! without a sink the outbox does not grow without bound.
//!
//! # Caveats
//! The events and the change are separate commands, not one transaction.
//! A refresh that dies between them leaves `staged` events, never
//! delivered as they are: the next refresh of the worker releases those
//! whose change is in the store and drops the others (then makes the
//! change and stages its own events). A write refused by a tombstone drops
//! its staged events, so a sink never hears of a change that did not
//! happen.

use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use labsync_application::{LabEvent, RepoError};
use mongodb::bson::{self, Document, doc};
use mongodb::options::ReturnDocument;
use mongodb::{Collection, Database, Namespace};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::watch;
use tracing::{debug, warn};

use super::convert::date;
use super::{collections, map_error};

/// The outbox document of a refresh's event: `staged`, not delivered until
/// the change is written. `target_hash` is the content hash the event
/// announces for the lab (none for a prune), by which a later run can tell
/// whether the change was made.
///
/// # Errors
/// As [`outbox_doc`].
pub fn staged_doc(
    event: &LabEvent,
    retention: Duration,
    target_hash: Option<String>,
) -> Result<Document, RepoError> {
    let mut d = outbox_doc(event, retention)?;
    d.insert("status", STAGED);
    if let Some(h) = target_hash {
        d.insert("target_hash", h);
    }
    Ok(d)
}

/// The status of a refresh's event until its change is written.
pub const STAGED: &str = "staged";

/// How long an event is kept, delivered or not.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// The outbox document for `event`.
///
/// # Errors
/// [`RepoError::Other`] if the event's data cannot be encoded.
pub fn outbox_doc(event: &LabEvent, retention: Duration) -> Result<Document, RepoError> {
    let ce = bson::to_bson(&event.to_cloudevent()).map_err(|e| RepoError::Other(e.to_string()))?;
    let expires = chrono::Duration::from_std(retention)
        .ok()
        .and_then(|d| event.at.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC);
    Ok(doc! {
        "_id": &event.id,
        "kind": event.kind.as_str(),
        "worker_id": event.worker_id.as_str(),
        "lab_id": event.lab_id.as_str(),
        "created_at": date(event.at),
        "status": "pending",
        "attempts": 0_i64,
        "next_attempt_at": date(event.at),
        "expires_at": date(expires),
        "cloudevent": ce,
    })
}

pub fn namespace(db: &Database) -> Namespace {
    db.collection::<Document>(collections::OUTBOX).namespace()
}

/// Where and how the relay delivers.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    /// The sink; it may carry a token in its query, so it is a secret.
    pub sink_url: SecretString,
    pub poll_interval: Duration,
    pub request_timeout: Duration,
    pub max_backoff: Duration,
}

/// Delivers outbox events to the sink until told to stop.
#[derive(Debug, Clone)]
pub struct EventRelay {
    outbox: Collection<Document>,
    http: reqwest::Client,
    settings: RelaySettings,
}

/// Capped exponential backoff: 1 s, 2 s, 4 s ... up to `max`.
pub fn backoff(attempts: u32, max: Duration) -> Duration {
    let exp = Duration::from_secs(1u64 << attempts.min(20));
    exp.min(max)
}

impl EventRelay {
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn new(db: &Database, settings: RelaySettings) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .use_rustls_tls()
            .timeout(settings.request_timeout)
            .build()?;
        Ok(Self {
            outbox: db.collection(collections::OUTBOX),
            http,
            settings,
        })
    }

    /// Claims one due event: pushes its next attempt out by the request
    /// timeout (twice), so that nobody else takes it meanwhile.
    async fn claim(&self, now: DateTime<Utc>) -> Result<Option<Document>, RepoError> {
        let hold = chrono::Duration::from_std(self.settings.request_timeout * 2)
            .unwrap_or(chrono::Duration::seconds(60));
        self.outbox
            .find_one_and_update(
                doc! {"status": "pending", "next_attempt_at": {"$lte": date(now)}},
                doc! {"$set": {"next_attempt_at": date(now + hold)}},
            )
            .sort(doc! {"next_attempt_at": 1})
            .return_document(ReturnDocument::After)
            .await
            .map_err(map_error)
    }

    /// Delivers what is due now; returns how many were delivered.
    ///
    /// # Errors
    /// [`RepoError`] when the outbox cannot be read or updated.
    pub async fn deliver_due(&self) -> Result<usize, RepoError> {
        let mut delivered = 0;
        while let Some(d) = self.claim(Utc::now()).await? {
            let id = d.get_str("_id").unwrap_or_default().to_owned();
            let attempts = d.get_i64("attempts").unwrap_or(0);
            let body = d
                .get_document("cloudevent")
                .ok()
                .and_then(|ce| serde_json::to_value(ce).ok())
                .unwrap_or_default();
            let result = self
                .http
                .post(self.settings.sink_url.expose_secret())
                .header("content-type", "application/cloudevents+json")
                .json(&body)
                .send()
                .await;
            let now = Utc::now();
            let update = match result {
                Ok(r) if r.status().is_success() => {
                    delivered += 1;
                    doc! {"$set": {"status": "delivered", "delivered_at": date(now)}, "$inc": {"attempts": 1_i64}}
                }
                other => {
                    let why = match other {
                        Ok(r) => format!("sink answered {}", r.status()),
                        Err(e) => format!("sink unreachable: {}", e.without_url()),
                    };
                    let n = u32::try_from(attempts + 1).unwrap_or(u32::MAX);
                    let wait = chrono::Duration::from_std(backoff(n, self.settings.max_backoff))
                        .unwrap_or(chrono::Duration::seconds(300));
                    warn!(event_id = %id, attempts = n, error = %why, "event delivery failed; will retry");
                    doc! {"$set": {"next_attempt_at": date(now + wait), "last_error": why}, "$inc": {"attempts": 1_i64}}
                }
            };
            self.outbox
                .update_one(doc! {"_id": &id}, update)
                .await
                .map_err(map_error)?;
        }
        Ok(delivered)
    }

    /// Runs until `stop` turns true.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        loop {
            match self.deliver_due().await {
                Ok(n) if n > 0 => debug!(delivered = n, "events delivered"),
                Ok(_) => {}
                Err(e) => warn!(error = %e, "event relay could not read the outbox"),
            }
            tokio::select! {
                _ = tokio::time::sleep(self.settings.poll_interval) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }
}

/// Outbox documents, for tests and operators.
///
/// # Errors
/// [`RepoError`].
pub async fn list(db: &Database, filter: Document) -> Result<Vec<Document>, RepoError> {
    db.collection::<Document>(collections::OUTBOX)
        .find(filter)
        .sort(doc! {"created_at": 1})
        .await
        .map_err(map_error)?
        .try_collect()
        .await
        .map_err(map_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        let max = Duration::from_secs(60);
        let got: Vec<u64> = (0..9).map(|n| backoff(n, max).as_secs()).collect();
        assert_eq!(got, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(backoff(u32::MAX, max), max);
    }
}
