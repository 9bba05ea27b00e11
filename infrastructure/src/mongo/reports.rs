//! [`RunReports`] on MongoDB: one document per refresh run, `_id` = run id.

use async_trait::async_trait;
use futures::TryStreamExt;
use labsync_application::ports::RunReports;
use labsync_application::{RepoError, RunReport};
use labsync_domain::WorkerId;
use mongodb::bson::{self, Bson, Document, doc};
use mongodb::{Collection, Database};

use super::convert::date;
use super::{collections, map_error};

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

const DATE_FIELDS: [&str; 2] = ["started_at", "finished_at"];

fn to_doc(report: &RunReport) -> Result<Document, RepoError> {
    let mut d = bson::to_document(report).map_err(|e| RepoError::Other(e.to_string()))?;
    d.insert("_id", report.run_id.clone());
    d.insert("started_at", date(report.started_at));
    d.insert("finished_at", date(report.finished_at));
    Ok(d)
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
        self.runs
            .insert_one(to_doc(report)?)
            .await
            .map_err(map_error)?;
        Ok(())
    }

    async fn recent(
        &self,
        worker: Option<&WorkerId>,
        limit: usize,
    ) -> Result<Vec<RunReport>, RepoError> {
        let filter = worker.map_or_else(Document::new, |w| doc! {"worker_id": w.as_str()});
        let docs: Vec<Document> = self
            .runs
            .find(filter)
            .sort(doc! {"started_at": -1, "_id": -1})
            .limit(i64::try_from(limit).unwrap_or(i64::MAX))
            .await
            .map_err(map_error)?
            .try_collect()
            .await
            .map_err(map_error)?;
        docs.into_iter().map(from_doc).collect()
    }
}
