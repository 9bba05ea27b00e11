//! [`EventFeed`] on MongoDB: what live views are told, from what every
//! replica stores.
//!
//! # Expected flow
//! Each read takes the outbox's visible lab events and the refresh runs
//! that finished, each from its own index, merges them in one (visible
//! time, id) order and keeps the first `limit`.
//!
//! # Guarantees
//! - A lab event is visible once it is stored and not staged (its
//!   `visible_at`); a run, once it finished (its `finished_at`), however it
//!   ended, an abandoned run included. A `running` report is not an event.
//! - Both collections answer the same filter, so that paging by (time, id)
//!   through the merge misses nothing and repeats nothing. A run's event
//!   id is `<run id>.<status>`: a run marked abandoned that then finishes
//!   ends twice, and each ending reaches the streams.
//!
//! # Assumptions
//! Outbox ids and run ids never collide (both are UUIDs, of one length, so
//! that a run's event id orders as its run id does).
//!
//! # Caveats
//! A run's event is its status and id only; what it did is read from
//! `GET /api/v1/refresh-runs/{run_id}`, which applies the reader's role.

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use labsync_application::ports::{EventFeed, VisibleEvent};
use labsync_application::{RepoError, RunStatus};
use mongodb::bson::{Document, doc};
use mongodb::{Collection, Database};

use super::convert::date;
use super::outbox::STAGED;
use super::{collections, map_error};

/// The event kind of a finished run, as streams name it.
pub const RUN_FINISHED: &str = "run_finished";

#[derive(Debug, Clone)]
pub struct MongoEventFeed {
    outbox: Collection<Document>,
    runs: Collection<Document>,
}

impl MongoEventFeed {
    pub fn new(db: &Database) -> Self {
        Self {
            outbox: db.collection(collections::OUTBOX),
            runs: db.collection(collections::REFRESH_RUNS),
        }
    }
}

/// Documents whose `field` is at or after `since` (at `since` itself,
/// with an id after `after_id`), in (field, id) order, at most `limit`.
async fn read_since(
    from: &Collection<Document>,
    mut filter: Document,
    field: &str,
    since: DateTime<Utc>,
    after_id: Option<&str>,
    limit: usize,
) -> Result<Vec<Document>, RepoError> {
    let window = match after_id {
        Some(id) => doc! {"$or": [
            {field: {"$gt": date(since)}},
            {field: date(since), "_id": {"$gt": id}},
        ]},
        None => doc! {field: {"$gte": date(since)}},
    };
    filter.extend(window);
    from.find(filter)
        .sort(doc! {field: 1, "_id": 1})
        .limit(i64::try_from(limit).unwrap_or(i64::MAX))
        .await
        .map_err(map_error)?
        .try_collect()
        .await
        .map_err(map_error)
}

fn lab_event(d: &Document) -> Option<VisibleEvent> {
    let text = |k: &str| d.get_str(k).ok().map(str::to_owned);
    Some(VisibleEvent {
        id: text("_id")?,
        visible_at: d.get_datetime("visible_at").ok()?.to_chrono(),
        kind: text("kind")?,
        worker_id: text("worker_id")?,
        lab_id: Some(text("lab_id")?),
        cloudevent: d
            .get_document("cloudevent")
            .ok()
            .and_then(|c| serde_json::to_value(c).ok())
            .unwrap_or_default(),
    })
}

fn run_event(d: &Document) -> Option<VisibleEvent> {
    let id = d.get_str("_id").ok()?;
    let worker = d.get_str("worker_id").ok()?;
    let status = d.get_str("status").ok()?;
    let at = d.get_datetime("finished_at").ok()?.to_chrono();
    Some(VisibleEvent {
        // A run may end twice (marked abandoned, then finishing after
        // all): each ending is its own event.
        id: format!("{id}.{status}"),
        visible_at: at,
        kind: RUN_FINISHED.to_owned(),
        worker_id: worker.to_owned(),
        lab_id: None,
        cloudevent: serde_json::json!({
            "specversion": "1.0",
            "type": "io.labsync.refresh.finished",
            "id": id,
            "subject": worker,
            "time": at.to_rfc3339(),
            "data": {"run_id": id, "worker_id": worker, "status": status},
        }),
    })
}

#[async_trait::async_trait]
impl EventFeed for MongoEventFeed {
    async fn visible_since(
        &self,
        since: DateTime<Utc>,
        after_id: Option<&str>,
        limit: usize,
    ) -> Result<Vec<VisibleEvent>, RepoError> {
        let labs = read_since(
            &self.outbox,
            doc! {"status": {"$ne": STAGED}},
            "visible_at",
            since,
            after_id,
            limit,
        )
        .await?;
        let runs = read_since(
            &self.runs,
            doc! {"status": {"$ne": RunStatus::Running.word()}},
            "finished_at",
            since,
            after_id,
            limit,
        )
        .await?;
        let mut all: Vec<VisibleEvent> = labs
            .iter()
            .filter_map(lab_event)
            .chain(runs.iter().filter_map(run_event))
            .collect();
        all.sort_by(|a, b| (a.visible_at, &a.id).cmp(&(b.visible_at, &b.id)));
        all.truncate(limit);
        Ok(all)
    }

    async fn visible_at(&self, id: &str) -> Result<Option<DateTime<Utc>>, RepoError> {
        if let Some(d) = self
            .outbox
            .find_one(doc! {"_id": id, "status": {"$ne": STAGED}})
            .projection(doc! {"visible_at": 1})
            .await
            .map_err(map_error)?
        {
            return Ok(d.get_datetime("visible_at").ok().map(|t| t.to_chrono()));
        }
        let Some((run, status)) = id.rsplit_once('.') else {
            return Ok(None);
        };
        Ok(self
            .runs
            .find_one(doc! {"_id": run, "status": status})
            .projection(doc! {"finished_at": 1})
            .await
            .map_err(map_error)?
            .and_then(|d| d.get_datetime("finished_at").ok().map(|t| t.to_chrono())))
    }
}
