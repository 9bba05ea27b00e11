//! [`RunReports`] on MongoDB: one document per refresh run, `_id` = run id.
//!
//! Every run is stored, whatever its texts hold: a report that would not
//! fit a MongoDB document (16 MiB, which labsync enforces itself: the test
//! server takes larger ones) is cut down first, its texts clipped and its
//! failures after the first few left out, with a `note` saying so. A report
//! that is not stored leaves its worker looking healthy.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use labsync_application::ports::{RunQuery, RunReports};
use labsync_application::{RepoError, RunReport, RunStatus};
use labsync_domain::WorkerId;
use mongodb::bson::{self, Bson, Document, doc};
use mongodb::{Collection, Database};

use super::convert::date;
use super::labs::{ENVELOPE, MAX_BSON_OBJECT, bson_size};
use super::{collections, find_sorted, map_error};
use crate::cml::clip_text;

#[derive(Debug, Clone)]
pub struct MongoRunReports {
    runs: Collection<Document>,
}

impl MongoRunReports {
    pub fn new(db: &Database) -> Self {
        Self {
            runs: db.collection(collections::REFRESH_RUNS),
        }
    }
}

const DATE_FIELDS: [&str; 3] = ["started_at", "finished_at", "alive_at"];

/// The most a stored report may take.
const MAX_REPORT: usize = MAX_BSON_OBJECT - ENVELOPE;
/// What a cut-down report keeps of each text, and how many failures.
const MAX_CUT_TEXT: usize = 4096;
const MAX_CUT_FAILURES: usize = 20;

fn encode(report: &RunReport) -> Result<Document, RepoError> {
    let mut d = bson::to_document(report).map_err(|e| RepoError::Other(e.to_string()))?;
    d.insert("_id", report.run_id.clone());
    d.insert("started_at", date(report.started_at));
    d.insert("finished_at", date(report.finished_at));
    match report.alive_at {
        Some(t) => d.insert("alive_at", date(t)),
        None => d.remove("alive_at"),
    };
    Ok(d)
}

/// The document to store: the report as it is, or cut down to fit.
fn to_doc(report: &RunReport) -> Result<Document, RepoError> {
    let d = encode(report)?;
    let size = bson_size(&d);
    if size <= MAX_REPORT {
        return Ok(d);
    }
    encode(&cut_down(report, size))
}

/// `report` with every text clipped to [`MAX_CUT_TEXT`] and at most
/// [`MAX_CUT_FAILURES`] failures (a few KB at most), and a note saying so.
fn cut_down(report: &RunReport, size: usize) -> RunReport {
    let mut r = report.clone();
    let left_out = r.failures.len().saturating_sub(MAX_CUT_FAILURES);
    r.failures.truncate(MAX_CUT_FAILURES);
    for f in &mut r.failures {
        f.error = clip_text(&f.error, MAX_CUT_TEXT);
    }
    for text in [&mut r.error, &mut r.hold_reason, &mut r.note]
        .into_iter()
        .flatten()
    {
        *text = clip_text(text, MAX_CUT_TEXT);
    }
    r.note = Some(format!(
        "this report was {size} bytes, more than a MongoDB document may hold: it was cut \
         down to be stored (texts clipped to {MAX_CUT_TEXT} bytes{}){}",
        if left_out > 0 {
            format!(", {left_out} failures left out")
        } else {
            String::new()
        },
        r.note
            .as_deref()
            .map_or_else(String::new, |n| format!("; {n}"))
    ));
    r
}

fn from_doc(mut d: Document) -> Result<RunReport, RepoError> {
    d.remove("_id");
    // The report type speaks chrono; the stored dates are BSON dates.
    for field in DATE_FIELDS {
        if let Some(Bson::DateTime(t)) = d.get(field) {
            let text = t.to_chrono().to_rfc3339();
            d.insert(field, text);
        }
    }
    bson::from_document(d).map_err(|e| RepoError::Corrupt(format!("run report: {e}")))
}

#[async_trait]
impl RunReports for MongoRunReports {
    async fn store(&self, report: &RunReport) -> Result<(), RepoError> {
        // A run started through the API was stored as `running` when it
        // began: how it ended replaces that.
        self.runs
            .replace_one(doc! {"_id": &report.run_id}, to_doc(report)?)
            .upsert(true)
            .await
            .map_err(map_error)?;
        Ok(())
    }

    async fn get(&self, run_id: &str) -> Result<Option<RunReport>, RepoError> {
        self.runs
            .find_one(doc! {"_id": run_id})
            .await
            .map_err(map_error)?
            .map(from_doc)
            .transpose()
    }

    async fn keep_alive(&self, run_ids: &[String], now: DateTime<Utc>) -> Result<(), RepoError> {
        self.runs
            .update_many(
                doc! {"_id": {"$in": run_ids}, "status": RunStatus::Running.word()},
                doc! {"$set": {"alive_at": date(now)}},
            )
            .await
            .map_err(map_error)?;
        Ok(())
    }

    async fn abandon_running(
        &self,
        worker: &WorkerId,
        silent_since: DateTime<Utc>,
        now: DateTime<Utc>,
        reason: &str,
    ) -> Result<u64, RepoError> {
        let r = self
            .runs
            .update_many(
                doc! {
                    "worker_id": worker.as_str(),
                    "status": RunStatus::Running.word(),
                    "alive_at": {"$lt": date(silent_since)},
                },
                doc! {"$set": {
                    "status": RunStatus::Failed.word(),
                    "error": reason,
                    "finished_at": date(now),
                }},
            )
            .await
            .map_err(map_error)?;
        Ok(r.modified_count)
    }

    async fn recent(&self, q: &RunQuery) -> Result<Vec<RunReport>, RepoError> {
        let mut filter = Document::new();
        if let Some(w) = &q.worker {
            filter.insert("worker_id", w.as_str());
        }
        // Both filters hold: a status asked for among the outcomes is that
        // status (never widened to every outcome).
        let outcomes = [RunStatus::Succeeded, RunStatus::Failed];
        match (q.status, q.outcomes_only) {
            (Some(s), true) if !outcomes.contains(&s) => {
                filter.insert("status", doc! {"$in": []});
            }
            (Some(s), _) => {
                filter.insert("status", s.word());
            }
            (None, true) => {
                filter.insert(
                    "status",
                    doc! {"$in": [RunStatus::Succeeded.word(), RunStatus::Failed.word()]},
                );
            }
            (None, false) => {}
        }
        if q.outcomes_only {
            filter.insert("dry_run", false);
        }
        let docs = find_sorted(
            &self.runs,
            filter,
            doc! {"started_at": -1, "_id": -1},
            Some(q.limit),
        )
        .await?;
        docs.into_iter().map(from_doc).collect()
    }
}
