//! The refresh schedule: a tokio-cron-scheduler job that runs
//! [`RefreshAll`] on the configured cron expression.
//!
//! The job never overlaps itself: a tick that finds the previous run still
//! going is skipped and logged (across processes, the per-worker lease does
//! the same). Shutdown stops the ticks and waits, up to a grace period, for
//! a run in progress to finish.

use crate::metrics::Metrics;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use labsync_application::{RefreshAll, RefreshOptions};
use labsync_domain::Actor;
use tokio::sync::Mutex;
use tokio_cron_scheduler::{Job, JobScheduler, JobSchedulerError};
use tracing::{Instrument, error, info, info_span, warn};

/// When the schedule fires next after `now`, parsed as the scheduler
/// parses it (six fields, seconds required, UTC); `None` if it does not
/// parse or never fires again.
pub fn next_refresh(cron: &str, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Required)
        .build()
        .parse(cron)
        .ok()?
        .find_next_occurrence(&now, false)
        .ok()
}

/// A running schedule.
pub struct RefreshScheduler {
    scheduler: JobScheduler,
    running: Arc<Mutex<()>>,
}

impl std::fmt::Debug for RefreshScheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RefreshScheduler").finish_non_exhaustive()
    }
}

/// Runs one refresh of every worker unless one is already running here.
async fn tick(refresh: RefreshAll, running: Arc<Mutex<()>>, metrics: Option<Metrics>) {
    let Ok(_guard) = running.try_lock() else {
        warn!("scheduled refresh skipped: the previous one is still running");
        if let Some(m) = &metrics {
            m.scheduler_tick("skipped_overlap");
        }
        return;
    };
    if let Some(m) = &metrics {
        m.scheduler_tick("started");
    }
    let span = info_span!("scheduled_refresh");
    match refresh
        .execute(&Actor::Schedule, RefreshOptions::default())
        .instrument(span)
        .await
    {
        Ok(reports) => {
            let failed = reports.iter().filter(|r| r.is_failure()).count();
            info!(workers = reports.len(), failed, "scheduled refresh done");
        }
        Err(e) => error!(error = %e, "scheduled refresh could not start"),
    }
}

impl RefreshScheduler {
    /// Starts the schedule; with `run_at_startup`, also one refresh now.
    ///
    /// # Errors
    /// When the cron expression is invalid or the scheduler cannot start.
    pub async fn start(
        cron: &str,
        refresh: RefreshAll,
        run_at_startup: bool,
        metrics: Option<Metrics>,
    ) -> Result<Self, JobSchedulerError> {
        let scheduler = JobScheduler::new().await?;
        let running = Arc::new(Mutex::new(()));
        let (r, m, x) = (refresh.clone(), running.clone(), metrics.clone());
        let job = Job::new_async(cron, move |_id, _sched| {
            let (r, m, x) = (r.clone(), m.clone(), x.clone());
            Box::pin(async move { tick(r, m, x).await })
        })?;
        scheduler.add(job).await?;
        scheduler.start().await?;
        info!(cron, "refresh schedule started");
        if run_at_startup {
            tokio::spawn(tick(refresh, running.clone(), metrics));
        }
        Ok(Self { scheduler, running })
    }

    /// Stops the ticks, then waits up to `grace` for a run in progress.
    /// Returns false if the run was still going when the grace ran out.
    pub async fn shutdown(mut self, grace: Duration) -> bool {
        if let Err(e) = self.scheduler.shutdown().await {
            warn!(error = %e, "scheduler shutdown reported an error");
        }
        tokio::time::timeout(grace, self.running.lock())
            .await
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_refresh_is_the_crons_next_tick_after_now() {
        let at = |t: &str| DateTime::parse_from_rfc3339(t).unwrap().to_utc();
        assert_eq!(
            next_refresh("0 */30 * * * *", at("2026-11-30T10:29:59Z")),
            Some(at("2026-11-30T10:30:00Z"))
        );
        assert_eq!(
            next_refresh("0 */30 * * * *", at("2026-11-30T10:30:00Z")),
            Some(at("2026-11-30T11:00:00Z")),
            "strictly after now"
        );
        assert_eq!(next_refresh("not cron", at("2026-11-30T10:30:00Z")), None);
    }
}
