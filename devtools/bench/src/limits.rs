//! What limits a refresh on this machine, measured in the same run as the
//! figure it explains.
//!
//! - [`Pids`] and [`CpuSplit`]: the CPU time (user + system, from
//!   `/proc/<pid>/stat`) that labsync (this process), the simulator and the
//!   database spent during a scenario. labsync, `cml-sim` and the database
//!   share the machine's cores, so "the machine is the limit" is a sum of
//!   these against the wall time, not a guess.
//! - [`db_floor`]: the database's own time to write the documents a
//!   scenario must write (as many lab records as it created or changed and
//!   as many events as it made, copied from the records it left and the
//!   newest events, so of the same size, into collections with the same
//!   indexes), written the fastest way the server allows: large unordered
//!   inserts from several connections, opened beforehand. A refresh
//!   cannot be faster than this, whatever labsync does, unless it writes
//!   less.

use std::sync::OnceLock;
use std::time::Instant;

use anyhow::Context;
use futures::{StreamExt, TryStreamExt};
use mongodb::bson::{Document, doc};
use mongodb::{Database, IndexModel};
use serde::{Deserialize, Serialize};

/// Documents per insert command in [`db_floor`].
const FLOOR_BATCH: usize = 1000;
/// Insert commands in flight at once in [`db_floor`], each on a connection
/// of its own.
const FLOOR_WRITERS: usize = 4;

/// The processes whose CPU time a scenario reports.
#[derive(Debug, Clone, Copy)]
pub struct Pids {
    pub sim: Option<u32>,
    /// None when the database is not ours (`LABSYNC_BENCH_MONGODB_URI`).
    pub db: Option<u32>,
}

/// CPU seconds (user + system) each process spent.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct CpuSplit {
    /// This process: labsync's code, plus the benchmark's own driving of
    /// it (small: a loop of calls and the command counters).
    pub labsync_s: f64,
    pub sim_s: Option<f64>,
    pub db_s: Option<f64>,
}

impl Pids {
    /// The CPU time each process has spent so far.
    pub fn read(&self) -> CpuSplit {
        CpuSplit {
            labsync_s: cpu_seconds(std::process::id()).unwrap_or(0.0),
            sim_s: self.sim.and_then(cpu_seconds),
            db_s: self.db.and_then(cpu_seconds),
        }
    }
}

impl CpuSplit {
    /// What was spent between `before` and `self`.
    pub fn since(&self, before: &Self) -> Self {
        let d = |a: Option<f64>, b: Option<f64>| Some(a? - b?);
        Self {
            labsync_s: self.labsync_s - before.labsync_s,
            sim_s: d(self.sim_s, before.sim_s),
            db_s: d(self.db_s, before.db_s),
        }
    }

    /// "labsync/simulator/database" seconds, `-` for one not measured.
    pub fn brief(&self) -> String {
        let s = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.1}"));
        format!(
            "{}/{}/{}",
            s(Some(self.labsync_s)),
            s(self.sim_s),
            s(self.db_s)
        )
    }

    /// The three together, in CPU seconds.
    pub fn total(&self) -> f64 {
        self.labsync_s + self.sim_s.unwrap_or(0.0) + self.db_s.unwrap_or(0.0)
    }
}

/// Clock ticks per second of `/proc`'s CPU times (`getconf CLK_TCK`; 100 on
/// every Linux this runs on when `getconf` is missing).
fn ticks_per_second() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// The user + system CPU time of process `pid`, in seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count
    // fields from the last ')'. utime and stime are fields 14 and 15.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / ticks_per_second())
}

/// The documents a refresh must write: its new and changed records, and
/// one event per created, updated or pruned lab.
#[derive(Debug, Clone, Copy, Default)]
pub struct MustWrite {
    pub records: usize,
    pub events: usize,
}

/// The database's own time, in seconds, to write `must` documents like the
/// ones the scenario just wrote (see the module's docs). Copies of the
/// records and of the newest events go into scratch collections with the
/// indexes of `labs` and `outbox`, which are dropped afterwards.
///
/// # Errors
/// When the database fails, or holds fewer records or events than asked
/// for (the scenario did not write what it said).
pub async fn db_floor(db: &Database, must: MustWrite) -> anyhow::Result<f64> {
    if must.records + must.events == 0 {
        return Ok(0.0);
    }
    // Live records only: a tombstone is a smaller document.
    let records = sample(
        db,
        "labs",
        must.records,
        doc! {"tombstone": {"$exists": false}},
        doc! {},
    )
    .await?;
    let events = sample(db, "outbox", must.events, doc! {}, doc! {"_id": -1}).await?;
    let targets = [
        ("floor_labs", "labs", records),
        ("floor_outbox", "outbox", events),
    ];
    let result = write_copies(db, targets).await;
    // Dropped whatever happened, so that no run leaves its copies behind.
    for scratch in ["floor_labs", "floor_outbox"] {
        db.collection::<Document>(scratch).drop().await?;
    }
    result
}

/// Creates each scratch collection with the indexes of the one it copies,
/// opens the writers' connections, then times the inserts alone.
async fn write_copies(
    db: &Database,
    targets: [(&str, &str, Vec<Document>); 2],
) -> anyhow::Result<f64> {
    let mut batches = Vec::new();
    for (scratch, like, docs) in targets {
        db.collection::<Document>(scratch).drop().await?;
        db.create_collection(scratch).await?;
        let scratch = db.collection::<Document>(scratch);
        let indexes: Vec<IndexModel> = db
            .collection::<Document>(like)
            .list_indexes()
            .await?
            .try_filter(|i| {
                let id = i.options.as_ref().and_then(|o| o.name.as_deref()) == Some("_id_");
                std::future::ready(!id)
            })
            .try_collect()
            .await?;
        if !indexes.is_empty() {
            scratch.create_indexes(indexes).await?;
        }
        let mut docs = docs.into_iter();
        loop {
            let batch: Vec<Document> = docs.by_ref().take(FLOOR_BATCH).collect();
            if batch.is_empty() {
                break;
            }
            batches.push((scratch.clone(), batch));
        }
    }
    // One command on each writer's connection first, at once, so that no
    // connection is opened inside the timed part.
    futures::future::try_join_all(
        (0..FLOOR_WRITERS).map(|_| db.run_command(doc! {"ping": 1}).into_future()),
    )
    .await?;
    let started = Instant::now();
    futures::stream::iter(batches)
        .map(|(c, batch)| async move { c.insert_many(batch).ordered(false).await })
        .buffer_unordered(FLOOR_WRITERS)
        .try_for_each(|_| std::future::ready(Ok(())))
        .await?;
    Ok(started.elapsed().as_secs_f64())
}

/// `n` documents of `collection` matching `filter`, in the order `sort`.
async fn sample(
    db: &Database,
    collection: &str,
    n: usize,
    filter: Document,
    sort: Document,
) -> anyhow::Result<Vec<Document>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    let docs: Vec<Document> = db
        .collection::<Document>(collection)
        .find(filter)
        .sort(sort)
        .limit(i64::try_from(n)?)
        .await?
        .try_collect()
        .await
        .with_context(|| format!("reading {collection} for the database floor"))?;
    anyhow::ensure!(
        docs.len() == n,
        "the database floor needs {n} documents of {collection}, which holds {}",
        docs.len()
    );
    Ok(docs)
}
