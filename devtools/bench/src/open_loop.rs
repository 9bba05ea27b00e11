//! Deletes at a constant arrival rate (an open loop, as wrk2 measures).
//!
//! Each delete starts on its schedule, whether or not earlier ones
//! finished, and its latency is counted from when it was due: a slow
//! answer delays no later start, so it cannot hide the wait it causes
//! (the "coordinated omission" of a closed loop, where N callers each wait
//! for their last answer and so offer less load exactly when the system is
//! slow).
//!
//! The capacity is the highest rate at which the queue stays bounded
//! ([`Trial::bounded`]): labsync, the simulator and the database finish
//! deletes as fast as they arrive, and the late requests of a trial wait
//! no longer than its early ones. The overhead at a share of it is what a
//! caller waits beyond the delete's CML round trips.

use std::time::Duration;

use labsync_application::domain::{Actor, LabId, WorkerId};
use labsync_application::{DeleteLab, Services};
use serde::Serialize;
use tokio::time::Instant;

use crate::percentile;

/// One run at a fixed rate.
#[derive(Debug, Clone, Serialize)]
pub struct Trial {
    /// Deletes offered per second.
    pub rate: f64,
    pub deletes: usize,
    /// From the first due time to the last answer.
    pub span_s: f64,
    /// Deletes answered per second over the span (one slow answer at the
    /// end lowers it: a figure to read, not the test of a bound).
    pub achieved: f64,
    /// The share of deletes answered by the last due time plus twice the
    /// early median wait: with a bounded queue, nearly all.
    pub answered_in_time: f64,
    /// From due to answered, sorted.
    #[serde(skip)]
    pub latencies_ms: Vec<f64>,
    /// Median latency of the first and of the last fifth of the schedule.
    pub early_p50_ms: f64,
    pub late_p50_ms: f64,
    pub bounded: bool,
}

impl std::fmt::Display for Trial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "deletes at {:.0}/s: answered {:.0}/s, median wait early {:.1} ms, late {:.1} ms: {}",
            self.rate,
            self.achieved,
            self.early_p50_ms,
            self.late_p50_ms,
            if self.bounded {
                "bounded"
            } else {
                "the queue grows"
            }
        )
    }
}

impl Trial {
    /// The latency at `p` (0..=1) minus `cml_ms`, the delete's CML time.
    pub fn overhead(&self, p: f64, cml_ms: f64) -> f64 {
        percentile(&self.latencies_ms, p) - cml_ms
    }
}

/// The benchmark's delete of one wiped lab, as an operator asks it.
pub fn delete_of(worker_id: WorkerId, lab_id: LabId) -> DeleteLab {
    DeleteLab {
        worker_id,
        lab_id,
        force: false,
        requested_by: Actor::cli("bench"),
        owned_by: None,
    }
}

/// Deletes `targets` (wiped labs, made beforehand so that making them is
/// not measured) at `rate` per second.
///
/// # Errors
/// When a delete does not end with the lab gone: the figures would then
/// describe failures, not deletes.
pub async fn trial(
    services: &Services,
    targets: Vec<(WorkerId, LabId)>,
    rate: f64,
) -> anyhow::Result<Trial> {
    let n = targets.len();
    anyhow::ensure!(n >= 5 && rate > 0.0, "a trial needs 5 deletes and a rate");
    let every = Duration::from_secs_f64(1.0 / rate);
    let first = Instant::now() + Duration::from_millis(20);
    let mut running = Vec::with_capacity(n);
    for (i, (worker_id, lab_id)) in targets.into_iter().enumerate() {
        let due = first + every.mul_f64(i as f64);
        tokio::time::sleep_until(due).await;
        let services = services.clone();
        running.push(tokio::spawn(async move {
            let out = delete_of(worker_id, lab_id).execute(&services).await;
            (due, Instant::now(), out)
        }));
    }
    // In schedule order: the first and last fifths are the early and late
    // requests.
    let mut in_order = Vec::with_capacity(n);
    let mut answers = Vec::with_capacity(n);
    let mut last = first;
    let mut last_due = first;
    for task in running {
        let (due, done, out) = task.await?;
        match out {
            Ok(o) if o.lab_gone => {}
            other => anyhow::bail!("delete failed: {other:?}"),
        }
        last = last.max(done);
        last_due = last_due.max(due);
        answers.push(done);
        in_order.push((done - due).as_secs_f64() * 1000.0);
    }
    let fifth = (n / 5).max(1);
    let median = |xs: &[f64]| {
        let mut xs = xs.to_vec();
        xs.sort_by(f64::total_cmp);
        percentile(&xs, 0.5)
    };
    let early_p50_ms = median(&in_order[..fifth]);
    let late_p50_ms = median(&in_order[n - fifth..]);
    let span_s = (last - first).as_secs_f64();
    let achieved = n as f64 / span_s.max(1e-9);
    let in_time = last_due + Duration::from_secs_f64(2.0 * early_p50_ms / 1000.0);
    let answered_in_time = answers.iter().filter(|d| **d <= in_time).count() as f64 / n as f64;
    let mut latencies_ms = in_order;
    latencies_ms.sort_by(f64::total_cmp);
    // Bounded: the last requests waited about as long as the first (a
    // growing queue makes each wait longer than the one before), and
    // nearly every answer came soon after the schedule ended (a queue that
    // grew leaves a backlog behind it). Medians and shares, so that one
    // slow answer does not decide.
    let bounded = late_p50_ms <= 1.5 * early_p50_ms + 2.0 && answered_in_time >= 0.99;
    Ok(Trial {
        rate,
        deletes: n,
        span_s,
        achieved,
        answered_in_time,
        latencies_ms,
        early_p50_ms,
        late_p50_ms,
        bounded,
    })
}
