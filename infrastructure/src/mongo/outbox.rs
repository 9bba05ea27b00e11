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
use futures::{StreamExt, TryStreamExt};
use labsync_application::retry::{Backoff, next_pass};
use labsync_application::{LabEvent, RepoError};
use mongodb::bson::{self, Document, doc};
use mongodb::options::ReturnDocument;
use mongodb::{Collection, Database};
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
    // Visible from its release, not from its making.
    d.remove("visible_at");
    if let Some(h) = target_hash {
        d.insert("target_hash", h);
    }
    Ok(d)
}

/// The status of a refresh's event until its change is written.
pub const STAGED: &str = "staged";

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
        // When live views may see it: now, as it is written.
        "visible_at": date(Utc::now()),
        "attempts": 0_i64,
        "next_attempt_at": date(event.at),
        "expires_at": date(expires),
        "cloudevent": ce,
    })
}

/// Where and how the relay delivers.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    /// The sink; it may carry a token in its query, so it is a secret.
    /// `None`: nothing is delivered, the backlog is still measured.
    pub sink_url: Option<SecretString>,
    pub poll_interval: Duration,
    pub request_timeout: Duration,
    /// The wait before a failed delivery is tried again.
    pub backoff: Backoff,
    /// Deliveries in flight at once, each for a different lab.
    pub max_in_flight: usize,
}

/// Delivers outbox events to the sink until told to stop.
///
/// # Expected flow
/// 1. Find due `pending` events (oldest attempt first), skipping labs
///    already found blocked in this pass.
/// 2. For their labs, find the oldest undelivered (`pending` or `staged`)
///    event of each lab, its head, in creation order (`created_at`, then
///    the time-ordered event id). A due event that is not its lab's head
///    waits: its lab is blocked for this pass.
/// 3. Claim each due head (moving `next_attempt_at` forward, so that no
///    other replica takes it), POST them, at most `max_in_flight` at once,
///    and mark each `delivered` or schedule its next attempt with capped
///    exponential backoff.
/// 4. Repeat while anything was delivered, then measure the backlog.
///
/// # Guarantees
/// - Per lab, the sink receives events in the order they were created:
///   an event is sent only when every older undelivered event of its lab
///   is delivered, whichever replica sends it. A failing event holds back
///   its lab's later events, not other labs'.
/// - At least once: an event is `delivered` only after the sink answered
///   2xx. No redirect is followed and no `Referer` is sent: a 3xx is a
///   failed delivery (a redirect would turn the POST into a body-less GET
///   that "succeeds", or send the event and the sink URL's token
///   elsewhere).
///
/// # Assumptions
/// The sink answers within `request_timeout`; a claim lasts twice that,
/// so a replica whose delivery outlives it may see the event sent twice.
///
/// # Caveats
/// An event the sink refuses forever holds back its lab's later events
/// until it expires (`retention_secs`); `labsync_outbox_oldest_age_seconds`
/// shows it. Events staged by a run that died hold back their labs until
/// the next refresh of the worker settles them.
#[derive(Debug, Clone)]
pub struct EventRelay {
    outbox: Collection<Document>,
    http: reqwest::Client,
    settings: RelaySettings,
    metrics: Option<crate::metrics::Metrics>,
}

/// The wait after a first failed delivery; it doubles after each other.
pub const RELAY_BACKOFF_BASE: Duration = Duration::from_secs(2);

/// Due events looked at per query.
const PAGE: i64 = 256;

/// A lab's events share this key.
type LabKey = (String, String);

fn lab_key(d: &Document) -> Option<LabKey> {
    Some((
        d.get_str("worker_id").ok()?.to_owned(),
        d.get_str("lab_id").ok()?.to_owned(),
    ))
}

/// Creation order: `created_at`, then the event id (time-ordered).
fn order_key(d: &Document) -> (i64, String) {
    (
        d.get_datetime("created_at")
            .map_or(i64::MAX, |t| t.timestamp_millis()),
        d.get_str("_id").unwrap_or_default().to_owned(),
    )
}

/// Of `due` (each a due pending event), those that are the head of their
/// lab among `undelivered` (every pending or staged event of their labs),
/// and the labs whose due events must wait. Pure: the ordering rule.
fn heads(due: &[Document], undelivered: &[Document]) -> (Vec<Document>, Vec<LabKey>) {
    let mut first: std::collections::HashMap<LabKey, (i64, String)> =
        std::collections::HashMap::new();
    for d in undelivered {
        let Some(k) = lab_key(d) else { continue };
        let o = order_key(d);
        first
            .entry(k)
            .and_modify(|cur| {
                // `<=` would replace a key by an equal one (equivalent).
                if o < *cur {
                    *cur = o.clone();
                }
            })
            .or_insert(o);
    }
    let mut ready = Vec::new();
    let mut blocked = Vec::new();
    let mut taken = std::collections::HashSet::new();
    for d in due {
        let Some(k) = lab_key(d) else { continue };
        let is_head = first.get(&k).is_none_or(|h| *h == order_key(d));
        if is_head && taken.insert(k.clone()) {
            ready.push(d.clone());
        } else if !is_head {
            blocked.push(k);
        }
    }
    (ready, blocked)
}

impl EventRelay {
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn new(
        db: &Database,
        settings: RelaySettings,
        metrics: Option<crate::metrics::Metrics>,
    ) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .use_rustls_tls()
            .timeout(settings.request_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .referer(false)
            .build()?;
        Ok(Self {
            outbox: db.collection(collections::OUTBOX),
            http,
            settings,
            metrics,
        })
    }

    /// Claims one due event: pushes its next attempt out by the request
    /// timeout (twice), so that nobody else takes it meanwhile.
    async fn claim(&self, id: &str, now: DateTime<Utc>) -> Result<Option<Document>, RepoError> {
        let hold = chrono::Duration::from_std(self.settings.request_timeout * 2)
            .unwrap_or(chrono::Duration::seconds(60));
        self.outbox
            .find_one_and_update(
                doc! {"_id": id, "status": "pending", "next_attempt_at": {"$lte": date(now)}},
                doc! {"$set": {"next_attempt_at": date(now + hold)}},
            )
            .return_document(ReturnDocument::After)
            .await
            .map_err(map_error)
    }

    /// The due heads of their labs, skipping `blocked` labs (which gain the
    /// labs found waiting).
    async fn due_heads(
        &self,
        now: DateTime<Utc>,
        blocked: &mut std::collections::HashSet<LabKey>,
    ) -> Result<Vec<Document>, RepoError> {
        let projection = doc! {"_id": 1, "worker_id": 1, "lab_id": 1, "created_at": 1};
        loop {
            let skip: Vec<&str> = blocked.iter().map(|(_, lab)| lab.as_str()).collect();
            let due: Vec<Document> = self
                .outbox
                .find(doc! {
                    "status": "pending",
                    "next_attempt_at": {"$lte": date(now)},
                    "lab_id": {"$nin": skip},
                })
                .projection(projection.clone())
                .sort(doc! {"next_attempt_at": 1})
                .limit(PAGE)
                .await
                .map_err(map_error)?
                .try_collect()
                .await
                .map_err(map_error)?;
            if due.is_empty() {
                return Ok(Vec::new());
            }
            let labs: Vec<&str> = due
                .iter()
                .filter_map(|d| d.get_str("lab_id").ok())
                .collect();
            let undelivered: Vec<Document> = self
                .outbox
                .find(doc! {"lab_id": {"$in": labs}, "status": {"$in": ["pending", STAGED]}})
                .projection(projection.clone())
                .await
                .map_err(map_error)?
                .try_collect()
                .await
                .map_err(map_error)?;
            let (ready, waiting) = heads(&due, &undelivered);
            if !ready.is_empty() {
                return Ok(ready);
            }
            // Every due event of this page waits behind an older one: look
            // further, without these labs.
            let before = blocked.len();
            blocked.extend(waiting);
            if blocked.len() == before {
                return Ok(Vec::new());
            }
        }
    }

    /// Sends one claimed event; returns whether the sink took it.
    async fn deliver(&self, sink: &SecretString, d: Document) -> Result<bool, RepoError> {
        let id = d.get_str("_id").unwrap_or_default().to_owned();
        let attempts = d.get_i64("attempts").unwrap_or(0);
        let body = d
            .get_document("cloudevent")
            .ok()
            .and_then(|ce| serde_json::to_value(ce).ok())
            .unwrap_or_default();
        let result = self
            .http
            .post(sink.expose_secret())
            .header("content-type", "application/cloudevents+json")
            .json(&body)
            .send()
            .await;
        let now = Utc::now();
        let (ok, update) = match result {
            Ok(r) if r.status().is_success() => (
                true,
                doc! {"$set": {"status": "delivered", "delivered_at": date(now)}, "$inc": {"attempts": 1_i64}},
            ),
            other => {
                let (reason, why) = match other {
                    Ok(r) if r.status().is_redirection() => (
                        "redirect",
                        format!(
                            "sink answered {} (labsync follows no redirects)",
                            r.status()
                        ),
                    ),
                    Ok(r) if r.status().is_server_error() => {
                        ("status_5xx", format!("sink answered {}", r.status()))
                    }
                    Ok(r) => ("status_4xx", format!("sink answered {}", r.status())),
                    Err(e) => (
                        "unreachable",
                        format!("sink unreachable: {}", e.without_url()),
                    ),
                };
                if let Some(m) = &self.metrics {
                    m.event_delivery_failed(reason);
                }
                let n = u32::try_from(attempts + 1).unwrap_or(u32::MAX);
                let wait = chrono::Duration::from_std(self.settings.backoff.delay(n))
                    .unwrap_or(chrono::Duration::seconds(300));
                warn!(event_id = %id, attempts = n, error = %why, "event delivery failed; will retry");
                (
                    false,
                    doc! {"$set": {"next_attempt_at": date(now + wait), "last_error": why}, "$inc": {"attempts": 1_i64}},
                )
            }
        };
        self.outbox
            .update_one(doc! {"_id": &id}, update)
            .await
            .map_err(map_error)?;
        Ok(ok)
    }

    /// Delivers what is due now; returns how many were delivered.
    ///
    /// # Errors
    /// [`RepoError`] when the outbox cannot be read or updated.
    pub async fn deliver_due(&self) -> Result<usize, RepoError> {
        let Some(sink) = self.settings.sink_url.clone() else {
            return Ok(0);
        };
        let mut delivered = 0;
        let mut blocked = std::collections::HashSet::new();
        loop {
            let now = Utc::now();
            let heads = self.due_heads(now, &mut blocked).await?;
            if heads.is_empty() {
                return Ok(delivered);
            }
            let mut claimed = Vec::with_capacity(heads.len());
            for h in &heads {
                if let Some(d) = self
                    .claim(h.get_str("_id").unwrap_or_default(), now)
                    .await?
                {
                    claimed.push(d);
                }
            }
            let results: Vec<Result<bool, RepoError>> = futures::stream::iter(claimed)
                .map(|d| self.deliver(&sink, d))
                .buffer_unordered(self.settings.max_in_flight.max(1))
                .collect()
                .await;
            let mut progress = 0;
            for r in results {
                if r? {
                    progress += 1;
                }
            }
            if progress == 0 {
                // Everything due failed or was taken by another replica:
                // the next poll tries again.
                return Ok(delivered);
            }
            delivered += progress;
        }
    }

    /// Measures the undelivered events for the backlog metrics.
    ///
    /// # Errors
    /// [`RepoError`] when the outbox cannot be read.
    pub async fn measure(&self) -> Result<(), RepoError> {
        let Some(metrics) = &self.metrics else {
            return Ok(());
        };
        let undelivered = doc! {"status": {"$in": ["pending", STAGED]}};
        let count = self
            .outbox
            .count_documents(undelivered.clone())
            .await
            .map_err(map_error)?;
        let oldest = self
            .outbox
            .find_one(undelivered)
            .sort(doc! {"created_at": 1})
            .projection(doc! {"created_at": 1})
            .await
            .map_err(map_error)?
            .and_then(|d| d.get_datetime("created_at").ok().map(|t| t.to_chrono()));
        let age = oldest.map_or(0.0, |t| (Utc::now() - t).as_seconds_f64().max(0.0));
        metrics.outbox_backlog(count, age);
        Ok(())
    }

    /// Runs until `stop` turns true.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        loop {
            // The guard decides only whether to log (equivalent mutants).
            match self.deliver_due().await {
                Ok(n) if n > 0 => debug!(delivered = n, "events delivered"),
                Ok(_) => {}
                Err(e) => warn!(error = %e, "event relay could not read the outbox"),
            }
            if let Err(e) = self.measure().await {
                warn!(error = %e, "event relay could not measure the outbox");
            }
            if !next_pass(
                self.settings.poll_interval,
                &mut stop,
                std::future::pending(),
            )
            .await
            {
                return;
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
mod relay_tests {
    use super::*;

    fn ev(id: &str, lab: &str, at_ms: i64) -> Document {
        doc! {
            "_id": id,
            "worker_id": "cml-1",
            "lab_id": lab,
            "created_at": mongodb::bson::DateTime::from_millis(at_ms),
        }
    }

    #[test]
    fn only_the_oldest_undelivered_event_of_a_lab_goes_and_its_lab_waits_otherwise() {
        let (a1, a2, b2, c1) = (
            ev("1", "a", 10),
            ev("2", "a", 20),
            ev("3", "b", 20),
            ev("4", "c", 5),
        );
        // a1 is backing off (not due); b's older event is staged.
        let b1 = ev("0", "b", 10);
        let due = vec![a2.clone(), b2.clone(), c1.clone()];
        let undelivered = vec![a1, a2, b1, b2, c1.clone()];
        let (ready, blocked) = heads(&due, &undelivered);
        assert_eq!(ready, vec![c1]);
        let mut blocked: Vec<String> = blocked.into_iter().map(|(_, l)| l).collect();
        blocked.sort();
        assert_eq!(blocked, ["a", "b"]);
    }

    #[test]
    fn within_a_millisecond_the_time_ordered_id_decides() {
        let (x, y) = (ev("0190-a", "a", 10), ev("0190-b", "a", 10));
        let (ready, _) = heads(&[y.clone(), x.clone()], &[x.clone(), y]);
        assert_eq!(ready, vec![x]);
    }

    #[test]
    fn the_same_lab_goes_once_per_pass() {
        let x = ev("1", "a", 10);
        let (ready, _) = heads(&[x.clone(), x.clone()], &[]);
        assert_eq!(ready.len(), 1);
    }
}
