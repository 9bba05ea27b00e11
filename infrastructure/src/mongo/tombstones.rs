//! Group commit of tombstones: the record writes of concurrent deletes,
//! gathered into a few commands.
//!
//! Each delete ends with three writes (its outbox event, its audit entry,
//! and the swap of its record for a tombstone). The MongoDB-wire test server
//! commits them one after another, so 64 deletes in flight queued behind
//! each other's writes. Here every delete hands its writes to one writer
//! task; while a batch is being written the next one gathers, and is then
//! written with one insert of events, one insert of audit entries and one
//! `update` command, whatever its size.
//!
//! # Expected flow
//! 1. [`TombstoneWriter::write`] queues a job and waits for its answer.
//! 2. The writer takes every queued job (up to [`MAX_BATCH`]), writes the
//!    events and audit entries, then replaces each live record with its
//!    tombstone, or inserts the tombstone where there is no record, in one
//!    `update` command whose reply says which labs had a record.
//! 3. Each caller gets whether a live record was there, or the error.
//!
//! # Guarantees
//! - A caller's answer comes after its tombstone is acknowledged: when a
//!   delete returns, its record is gone, as before.
//! - Events and audit entries are written before the records change, as in
//!   every other write (see [`super::outbox`]).
//! - A job alone in its batch takes the single-delete path: one
//!   `findAndModify` that answers "was there a record" atomically.
//! - The write runs in the writer task: a caller that goes away (a client
//!   disconnecting) never cancels a driver call half-way.
//! - In a batch too, "was there a record" is answered by the write itself:
//!   a statement that matched a live record replaced it.

use std::collections::{HashMap, HashSet};

use labsync_application::RepoError;
use labsync_domain::{LabId, WorkerId};
use mongodb::bson::{Document, doc};
use mongodb::{Collection, Database};
use tokio::sync::{mpsc, oneshot};

use super::{DUPLICATE_KEY, collections, map_error, update_labs};

/// Deletes per batch: the commands stay small, and a batch is written in a
/// few milliseconds.
pub const MAX_BATCH: usize = 256;

/// One delete's writes.
#[derive(Debug)]
pub struct TombstoneJob {
    pub worker: WorkerId,
    pub lab: LabId,
    /// The whole tombstone document (key and `tombstone` field).
    pub replacement: Document,
    pub event: Document,
    pub audit: Document,
}

type Reply = oneshot::Sender<Result<bool, RepoError>>;

/// The handle deletes write through; cheap to clone. The writer task ends
/// when the last handle is dropped.
#[derive(Debug, Clone)]
pub struct TombstoneWriter {
    jobs: mpsc::Sender<(TombstoneJob, Reply)>,
}

#[derive(Debug, Clone)]
struct Store {
    db: Database,
    labs: Collection<Document>,
    outbox: Collection<Document>,
    audit: Collection<Document>,
}

impl TombstoneWriter {
    /// Starts the writer task on the current Tokio runtime.
    pub fn start(db: &Database) -> Self {
        let store = Store {
            db: db.clone(),
            labs: db.collection(collections::LABS),
            outbox: db.collection(collections::OUTBOX),
            audit: db.collection(collections::AUDIT),
        };
        // The capacity only paces callers (a mutant of it is equivalent).
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(run(store, rx));
        Self { jobs: tx }
    }

    /// Writes one delete's event, audit entry and tombstone; returns whether
    /// a live record was there.
    ///
    /// # Errors
    /// [`RepoError`] from the write that failed.
    pub async fn write(&self, job: TombstoneJob) -> Result<bool, RepoError> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send((job, tx))
            .await
            .map_err(|_| RepoError::Other("the tombstone writer has stopped".into()))?;
        rx.await
            .map_err(|_| RepoError::Other("the tombstone writer has stopped".into()))?
    }
}

async fn run(store: Store, mut rx: mpsc::Receiver<(TombstoneJob, Reply)>) {
    while let Some(first) = rx.recv().await {
        // How many jobs share a batch, and whether one goes alone, is about
        // speed (docs/BENCHMARKS.md): both paths give every job the same
        // answer (`tests::a_batch_swaps_records_for_tombstones_and_says_which_were_there`
        // and the contract tests), so mutants of the bound and of the
        // `[one]` arm are equivalent.
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let (jobs, replies): (Vec<TombstoneJob>, Vec<Reply>) = batch.into_iter().unzip();
        let results = match jobs.as_slice() {
            [one] => vec![store.write_one(one).await],
            _ => store.write_batch(&jobs).await,
        };
        for (reply, result) in replies.into_iter().zip(results) {
            // A caller that went away no longer needs its answer.
            let _ = reply.send(result);
        }
    }
}

impl Store {
    async fn insert_side_writes(&self, jobs: &[TombstoneJob]) -> Result<(), RepoError> {
        insert_events_and_audits(
            &self.outbox,
            &self.audit,
            jobs.iter().map(|j| j.event.clone()).collect(),
            jobs.iter().map(|j| j.audit.clone()).collect(),
        )
        .await
    }

    async fn write_one(&self, job: &TombstoneJob) -> Result<bool, RepoError> {
        self.insert_side_writes(std::slice::from_ref(job)).await?;
        labsync_application::crash::point(
            labsync_application::crash::points::DELETE_BEFORE_TOMBSTONE,
        );
        let before = self
            .labs
            .find_one_and_replace(key(&job.worker, &job.lab), job.replacement.clone())
            .upsert(true)
            .projection(doc! {"_id": 0, "tombstone": 1})
            .await
            .map_err(map_error)?;
        Ok(before.is_some_and(|d| !d.contains_key("tombstone")))
    }

    /// Every job's answer, in order; a failure of a shared command is every
    /// job's error.
    async fn write_batch(&self, jobs: &[TombstoneJob]) -> Vec<Result<bool, RepoError>> {
        match self.try_write_batch(jobs).await {
            Ok(results) => results,
            Err(e) => jobs.iter().map(|_| Err(e.clone())).collect(),
        }
    }

    async fn try_write_batch(
        &self,
        jobs: &[TombstoneJob],
    ) -> Result<Vec<Result<bool, RepoError>>, RepoError> {
        self.insert_side_writes(jobs).await?;
        labsync_application::crash::point(
            labsync_application::crash::points::DELETE_BEFORE_TOMBSTONE,
        );
        // Each statement replaces a live record, or inserts the tombstone
        // where there is none; over an older tombstone the insert is refused
        // (E11000), and those few are replaced in a second command. So the
        // reply alone says which labs had a record.
        let statements: Vec<Document> = jobs
            .iter()
            .map(|j| doc! {"q": live_key(j), "u": j.replacement.clone(), "upsert": true})
            .collect();
        let reply = update_labs(&self.db, statements).await?;
        let upserted: HashSet<usize> = reply.upserted.into_iter().collect();
        let mut outcome: Vec<Result<bool, RepoError>> = (0..jobs.len())
            .map(|i| Ok(!upserted.contains(&i)))
            .collect();
        let mut buried = Vec::new();
        for (i, code, msg) in reply.errors {
            if code == DUPLICATE_KEY {
                buried.push(i);
            } else if let Some(slot) = outcome.get_mut(i) {
                *slot = Err(RepoError::Other(format!("tombstone not written: {msg}")));
            }
        }
        if !buried.is_empty() {
            let statements: Vec<Document> = buried
                .iter()
                .map(|&i| {
                    let j = &jobs[i];
                    doc! {"q": key(&j.worker, &j.lab), "u": j.replacement.clone(), "upsert": true}
                })
                .collect();
            let reply = update_labs(&self.db, statements).await?;
            let failed: HashMap<usize, String> = reply
                .errors
                .into_iter()
                .map(|(i, _, msg)| (i, msg))
                .collect();
            for (n, &i) in buried.iter().enumerate() {
                outcome[i] = match failed.get(&n) {
                    Some(msg) => Err(RepoError::Other(format!("tombstone not written: {msg}"))),
                    None => Ok(false),
                };
            }
        }
        Ok(outcome)
    }
}

/// Writes outbox events and audit entries side by side, before the record
/// changes they describe: a crash in between leaves an event and an entry
/// that tell what CML did, never a change that nobody hears of.
///
/// # Errors
/// [`RepoError`] from either insert.
pub(super) async fn insert_events_and_audits(
    outbox: &Collection<Document>,
    audit: &Collection<Document>,
    events: Vec<Document>,
    audits: Vec<Document>,
) -> Result<(), RepoError> {
    let (e, a) = tokio::join!(
        outbox.insert_many(events).ordered(false),
        audit.insert_many(audits).ordered(false)
    );
    e.map_err(map_error)?;
    a.map_err(map_error)?;
    Ok(())
}

fn live_key(j: &TombstoneJob) -> Document {
    let mut k = key(&j.worker, &j.lab);
    k.insert("tombstone", doc! {"$exists": false});
    k
}

fn key(worker: &WorkerId, lab: &LabId) -> Document {
    doc! {"worker_id": worker.as_str(), "lab_id": lab.as_str()}
}

#[cfg(test)]
mod tests {
    use futures::TryStreamExt;

    use super::*;

    fn job(worker: &WorkerId, lab: &LabId, n: i32) -> TombstoneJob {
        let mut replacement = key(worker, lab);
        replacement.insert("tombstone", doc! {"deleted_by": format!("test {n}")});
        TombstoneJob {
            worker: worker.clone(),
            lab: *lab,
            replacement,
            event: doc! {"n": n},
            audit: doc! {"n": n},
        }
    }

    /// The batch path on the real test server: a live record, no record,
    /// an old tombstone, and the same lab twice in one batch.
    #[tokio::test]
    async fn a_batch_swaps_records_for_tombstones_and_says_which_were_there() {
        let db = labsync_test_support::test_database().await;
        // The unique (worker_id, lab_id) index is what refuses a second
        // document for a lab.
        super::super::ensure_indexes(&db).await.unwrap();
        let store = Store {
            db: db.clone(),
            labs: db.collection(collections::LABS),
            outbox: db.collection(collections::OUTBOX),
            audit: db.collection(collections::AUDIT),
        };
        let w = WorkerId::parse("cml-1").unwrap();
        let [live, absent, buried] =
            [0, 1, 2].map(|_| LabId::parse(&uuid::Uuid::new_v4().to_string()).unwrap());
        let mut record = key(&w, &live);
        record.insert("title", "a live record");
        let mut old = key(&w, &buried);
        old.insert("tombstone", doc! {"deleted_by": "earlier"});
        store.labs.insert_many([record, old]).await.unwrap();

        let jobs = vec![
            job(&w, &live, 1),
            job(&w, &absent, 2),
            job(&w, &buried, 3),
            job(&w, &live, 4),
        ];
        let results: Vec<bool> = store
            .write_batch(&jobs)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(results, [true, false, false, false]);

        let docs: Vec<Document> = store
            .labs
            .find(doc! {})
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        assert_eq!(docs.len(), 3, "one document per lab: {docs:?}");
        assert!(
            docs.iter().all(|d| d.get_document("tombstone").is_ok()),
            "{docs:?}"
        );
        assert!(
            docs.iter().all(|d| !d.contains_key("title")),
            "the record is replaced"
        );
        assert_eq!(store.outbox.count_documents(doc! {}).await.unwrap(), 4);
        assert_eq!(store.audit.count_documents(doc! {}).await.unwrap(), 4);
    }
}
