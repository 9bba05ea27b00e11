//! The gauges labsync reads from MongoDB rather than counts as things
//! happen: each worker's labs by state, its sync state, its failed runs in
//! a row, its held prune and its last success; the async delete queue; and
//! whether this replica is ready.
//!
//! # Expected flow
//! 1. At start, then every [`EVERY`], read each registered worker's
//!    overview and recent runs, its lab counts, and the queue's stats, and
//!    ping MongoDB.
//! 2. Turn them into a [`FleetReading`] (the decision is a pure function
//!    here: [`consecutive_failures`]) and set every gauge at once.
//!
//! # Guarantees
//! - Every replica exports the same values (they read one database), so
//!   the alerts take `max()` and do not care which replica ran a refresh.
//! - A worker that is removed leaves the gauges at the next reading.
//! - A reading that fails keeps the previous values and logs why; the
//!   replica reads as not ready only when MongoDB does not answer or its
//!   scheduler stopped.
//!
//! # Caveats
//! The values are up to [`EVERY`] old. A reading costs three reads per
//! worker (four when its last twenty runs hold no success) and four for
//! the queue, per replica.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use labsync_application::domain::LabState;
use labsync_application::inventory::SyncState;
use labsync_application::ports::{Health, RunQuery};
use labsync_application::{AppError, DeleteQueue, Inventory, RunStatus};
use labsync_infrastructure::metrics::{FleetReading, Metrics, WorkerReading};
use tokio::sync::watch;
use tracing::warn;

/// How often the gauges are read.
pub const EVERY: Duration = Duration::from_secs(30);

/// How long readiness waits for MongoDB.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs that failed since the last that did not, given the statuses of a
/// worker's runs newest first (outcomes only).
pub fn consecutive_failures(statuses: &[RunStatus]) -> u64 {
    statuses
        .iter()
        .take_while(|s| **s == RunStatus::Failed)
        .count() as u64
}

/// Lab counts by state with every state CML may invent counted as
/// `other`: the state is a metric label, and a label must stay a small set
/// whatever CML answers.
pub fn known_states(counts: Vec<(String, u64)>) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = Vec::new();
    for (state, n) in counts {
        let state = match LabState::parse(&state) {
            LabState::Unknown(_) => "other".to_owned(),
            known => known.as_str().to_owned(),
        };
        match out.iter_mut().find(|(s, _)| *s == state) {
            Some((_, total)) => *total += n,
            None => out.push((state, n)),
        }
    }
    out
}

/// Runs looked at to count failures in a row: more reads as "at least".
const RUNS_LOOKED_AT: usize = 20;

async fn read(inventory: &Inventory, queue: &DeleteQueue) -> Result<FleetReading, AppError> {
    let mut workers = Vec::new();
    for overview in inventory.workers().await? {
        let id = overview.worker.id.clone();
        // A disabled worker is handed off: no staleness or failure of it
        // is anyone's alert.
        let watched = overview.sync_state != SyncState::Disabled;
        let (failed, last_success) = if watched {
            let runs = inventory
                .runs(RunQuery {
                    worker: Some(id.clone()),
                    status: None,
                    outcomes_only: true,
                    limit: RUNS_LOOKED_AT,
                })
                .await?;
            // The recent runs usually hold the last success: asked for
            // only when they do not.
            let last_success = match runs.iter().find(|r| r.status == RunStatus::Succeeded) {
                Some(r) => Some(r.finished_at),
                None => inventory
                    .runs(RunQuery {
                        worker: Some(id.clone()),
                        status: Some(RunStatus::Succeeded),
                        outcomes_only: true,
                        limit: 1,
                    })
                    .await?
                    .first()
                    .map(|r| r.finished_at),
            }
            .map(|at| at.timestamp() as f64);
            let statuses: Vec<RunStatus> = runs.iter().map(|r| r.status).collect();
            (Some(consecutive_failures(&statuses)), last_success)
        } else {
            (None, None)
        };
        workers.push(WorkerReading {
            worker_id: id.to_string(),
            sync_state: overview.sync_state.word(),
            labs: known_states(inventory.lab_counts(&id).await?),
            consecutive_failed_runs: failed,
            held_prune: overview.last_run.as_ref().map_or(0, |r| r.held),
            last_success,
        });
    }
    let stats = queue.stats().await?;
    let now = chrono::Utc::now();
    Ok(FleetReading {
        workers,
        delete_requests: vec![
            ("pending", stats.pending),
            ("running", stats.running),
            ("failed", stats.failed),
        ],
        oldest_pending_delete_secs: stats.oldest_pending_at.map_or(0.0, |at| {
            (now - at).num_milliseconds().max(0) as f64 / 1000.0
        }),
    })
}

/// Reads and sets the gauges until `stop` turns true.
pub async fn run(
    inventory: Inventory,
    queue: DeleteQueue,
    health: Arc<dyn Health>,
    scheduler_running: Arc<AtomicBool>,
    metrics: Metrics,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let answers = health.store_answers(PING_TIMEOUT).await;
        metrics.set_ready(answers && scheduler_running.load(Ordering::Relaxed));
        if answers {
            match read(&inventory, &queue).await {
                Ok(reading) => metrics.fleet_gauges(&reading),
                Err(e) => warn!(error = %e, "could not read the gauges from MongoDB"),
            }
        }
        tokio::select! {
            () = tokio::time::sleep(EVERY) => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_in_a_row_stop_at_the_first_run_that_did_not_fail() {
        use RunStatus::{Failed, Succeeded};
        assert_eq!(consecutive_failures(&[]), 0);
        assert_eq!(
            consecutive_failures(&[Failed, Failed, Succeeded, Failed]),
            2
        );
        assert_eq!(consecutive_failures(&[Succeeded, Failed]), 0);
    }

    #[test]
    fn a_state_cml_invents_is_counted_as_other_so_labels_stay_few() {
        let counts = vec![
            ("STARTED".to_owned(), 2),
            ("\u{1b}[2J".repeat(1000), 1),
            ("BOOTING".to_owned(), 3),
        ];
        assert_eq!(
            known_states(counts),
            vec![("STARTED".to_owned(), 2), ("other".to_owned(), 4)]
        );
    }
}
