//! Prometheus metrics. Labels are bounded: outcomes, reasons, endpoints,
//! routes (their templates) and status classes are fixed words, and the
//! only open label, `worker_id`, has one value per registered worker.
//!
//! Counters and histograms are counted as things happen in this process;
//! the per-worker and queue gauges are read from MongoDB
//! ([`Metrics::fleet_gauges`]), so that every replica exports the same
//! values and alerts take `max()`. Every label value of a bounded set is
//! exported from the start (at 0), so that `rate()` and the alerts see a
//! series before its first event.

use std::time::Instant;

use labsync_application::inventory::SyncState;
use labsync_application::{Observer, RunReport, RunStatus, SkipReason};
use prometheus::{
    Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every labsync metric, in one registry.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    refresh_runs: IntCounterVec,
    refresh_duration: HistogramVec,
    lab_changes: IntCounterVec,
    deletes: IntCounterVec,
    cml_requests: IntCounterVec,
    cml_latency: HistogramVec,
    last_success: GaugeVec,
    lease_skips: IntCounter,
    http_requests: IntCounterVec,
    outbox_undelivered: prometheus::IntGauge,
    outbox_oldest_age: prometheus::Gauge,
    http_connections: IntGauge,
    http_connections_closed: IntCounterVec,
    http_duration: HistogramVec,
    delete_duration: HistogramVec,
    worker_labs: IntGaugeVec,
    worker_sync_state: IntGaugeVec,
    worker_failed_runs: IntGaugeVec,
    worker_held: IntGaugeVec,
    delete_requests: IntGaugeVec,
    delete_oldest_pending: Gauge,
    event_failures: IntCounterVec,
    scheduler_ticks: IntCounterVec,
    token_rejections: IntCounterVec,
    key_set_reads: IntCounterVec,
    ready: IntGauge,
    /// The last reading set: its series that the next one lacks are
    /// removed (never reset all at once: a scrape in between would see
    /// none, and an alert would end and start again).
    last_reading: std::sync::Arc<std::sync::Mutex<FleetReading>>,
}

/// Delete outcomes, as `labsync_deletes_total` and the delete histogram
/// label them.
pub const DELETE_OUTCOMES: [&str; 9] = [
    "deleted",
    "already_absent",
    "refused_running",
    "cml_unreachable",
    "cml_refused",
    "not_converged",
    "account_not_admin",
    "not_owner",
    "record_cleanup_pending",
];

/// Why a token was refused (`labsync_token_rejections_total`).
pub const TOKEN_REJECTIONS: [&str; 13] = [
    "unknown_token",
    "malformed",
    "algorithm",
    "unknown_key",
    "signature",
    "issuer",
    "audience",
    "expired",
    "not_yet_valid",
    "claims",
    "id_token",
    "no_role",
    "provider",
];

/// Why an event delivery failed (`labsync_event_delivery_failures_total`).
pub const DELIVERY_FAILURES: [&str; 4] = ["redirect", "status_4xx", "status_5xx", "unreachable"];

/// Per-worker and queue readings from MongoDB, set together.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FleetReading {
    pub workers: Vec<WorkerReading>,
    /// Async delete requests by status (`pending`, `running`, `failed`).
    pub delete_requests: Vec<(&'static str, u64)>,
    /// Age of the oldest pending async delete; 0 when none waits.
    pub oldest_pending_delete_secs: f64,
}

/// One worker, as the gauges show it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkerReading {
    pub worker_id: String,
    /// `disabled`, `never_synced`, `synced` or `failing`.
    pub sync_state: &'static str,
    /// Live records by state.
    pub labs: Vec<(String, u64)>,
    /// Runs that failed since the last that did not (outcomes only);
    /// `None` for a disabled worker, which no alert should watch.
    pub consecutive_failed_runs: Option<u64>,
    /// Labs the last run held back from pruning.
    pub held_prune: u64,
    /// When it last refreshed successfully (Unix time); `None` for a
    /// disabled worker, or one that never did.
    pub last_success: Option<f64>,
}

#[allow(
    clippy::expect_used,
    reason = "the metrics are constants: an invalid or repeated one is a bug, found at start-up"
)]
fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(g.clone()))
        .expect("unique metric");
    g
}

#[allow(
    clippy::expect_used,
    reason = "the metrics are constants: an invalid or repeated one is a bug, found at start-up"
)]
fn gauge(registry: &Registry, name: &str, help: &str) -> Gauge {
    let g = Gauge::new(name, help).expect("valid metric");
    registry
        .register(Box::new(g.clone()))
        .expect("unique metric");
    g
}

/// Exports every value of a bounded label at 0.
fn zeroes(c: &IntCounterVec, values: &[&str]) {
    for v in values {
        c.with_label_values(&[v]);
    }
}

#[allow(
    clippy::expect_used,
    reason = "the metrics are constants: an invalid or repeated one is a bug, found at start-up"
)]
fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}

#[allow(
    clippy::expect_used,
    reason = "the metrics are constants: an invalid or repeated one is a bug, found at start-up"
)]
fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> HistogramVec {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .expect("valid metric");
    registry
        .register(Box::new(h.clone()))
        .expect("unique metric");
    h
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    #[allow(
        clippy::expect_used,
        reason = "the metrics are constants: an invalid or repeated one is a bug, found at start-up"
    )]
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("labsync".into()), None).expect("valid prefix");
        let last_success = GaugeVec::new(
            Opts::new(
                "last_successful_refresh_timestamp_seconds",
                "When each worker last refreshed successfully (Unix time).",
            ),
            &["worker_id"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(last_success.clone()))
            .expect("unique metric");
        let lease_skips = IntCounter::new(
            "refresh_lease_skips_total",
            "Refreshes skipped because another held the worker's lease.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(lease_skips.clone()))
            .expect("unique metric");
        let outbox_undelivered = prometheus::IntGauge::new(
            "outbox_undelivered_events",
            "Lab events not yet delivered to the sink (pending or staged).",
        )
        .expect("valid metric");
        registry
            .register(Box::new(outbox_undelivered.clone()))
            .expect("unique metric");
        let outbox_oldest_age = prometheus::Gauge::new(
            "outbox_oldest_undelivered_age_seconds",
            "Age of the oldest undelivered lab event; 0 when none waits.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(outbox_oldest_age.clone()))
            .expect("unique metric");
        let http_connections =
            IntGauge::new("http_connections", "API connections open now.").expect("valid metric");
        registry
            .register(Box::new(http_connections.clone()))
            .expect("unique metric");
        let ready = IntGauge::new(
            "ready",
            "1 while this replica is ready (MongoDB answers and its scheduler runs), else 0.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(ready.clone()))
            .expect("unique metric");
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("unique metric");
        let durations = vec![
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ];
        let deletes = counter(
            &registry,
            "deletes_total",
            "Lab deletes by outcome.",
            &["outcome"],
        );
        zeroes(&deletes, &DELETE_OUTCOMES);
        let refresh_runs = counter(
            &registry,
            "refresh_runs_total",
            "Refresh runs by status.",
            &["status"],
        );
        zeroes(&refresh_runs, &["succeeded", "failed", "skipped"]);
        let event_failures = counter(
            &registry,
            "event_delivery_failures_total",
            "Failed deliveries of lab events to the sink, by reason: redirect (never followed), \
             status_4xx, status_5xx, unreachable.",
            &["reason"],
        );
        zeroes(&event_failures, &DELIVERY_FAILURES);
        let scheduler_ticks = counter(
            &registry,
            "scheduler_ticks_total",
            "Scheduled ticks of this replica: started, or skipped_overlap (its previous tick \
             still ran). A worker whose lease another replica held counts in \
             refresh_lease_skips_total.",
            &["outcome"],
        );
        zeroes(&scheduler_ticks, &["started", "skipped_overlap"]);
        let token_rejections = counter(
            &registry,
            "token_rejections_total",
            "Bearer tokens refused, by the check that failed.",
            &["reason"],
        );
        zeroes(&token_rejections, &TOKEN_REJECTIONS);
        let key_set_reads = counter(
            &registry,
            "oidc_key_set_reads_total",
            "Reads of the OpenID Connect provider's discovery document and key set.",
            &["outcome"],
        );
        zeroes(&key_set_reads, &["ok", "failed"]);
        let http_connections_closed = counter(
            &registry,
            "http_connections_closed_total",
            "API connections labsync closed itself: header_timeout, idle_timeout, \
             evicted (the longest idle made room at api.max_connections) or \
             refused (every connection was running a request).",
            &["reason"],
        );
        zeroes(
            &http_connections_closed,
            &["header_timeout", "idle_timeout", "evicted", "refused"],
        );
        Self {
            http_connections_closed,
            http_duration: histogram(
                &registry,
                "http_request_duration_seconds",
                "API and console requests by route template, method and status class, until \
                 the answer's head (an event stream: until it starts).",
                &["route", "method", "class"],
                durations.clone(),
            ),
            delete_duration: histogram(
                &registry,
                "delete_duration_seconds",
                "Lab deletes by outcome, from the request to the outcome (a forced delete's \
                 stop and wipe included).",
                &["outcome"],
                vec![
                    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                ],
            ),
            worker_labs: gauge_vec(
                &registry,
                "worker_labs",
                "Live lab records by worker and state (read from MongoDB).",
                &["worker_id", "state"],
            ),
            worker_sync_state: gauge_vec(
                &registry,
                "worker_sync_state",
                "1 for the sync state each worker is in: disabled, never_synced, synced, failing.",
                &["worker_id", "state"],
            ),
            worker_failed_runs: gauge_vec(
                &registry,
                "worker_consecutive_failed_runs",
                "Refresh runs of each worker that failed since the last that did not.",
                &["worker_id"],
            ),
            worker_held: gauge_vec(
                &registry,
                "worker_held_prune_labs",
                "Labs each worker's last run held back from pruning, waiting for an admin.",
                &["worker_id"],
            ),
            delete_requests: gauge_vec(
                &registry,
                "delete_requests",
                "Async delete requests by status: pending, running, failed.",
                &["status"],
            ),
            delete_oldest_pending: gauge(
                &registry,
                "delete_requests_oldest_pending_age_seconds",
                "Age of the oldest pending async delete; 0 when none waits.",
            ),
            event_failures,
            scheduler_ticks,
            token_rejections,
            key_set_reads,
            ready,
            last_reading: std::sync::Arc::default(),
            http_connections,

            refresh_runs,
            refresh_duration: histogram(
                &registry,
                "refresh_duration_seconds",
                "Duration of one worker's refresh.",
                &["status"],
                vec![
                    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                ],
            ),
            lab_changes: counter(
                &registry,
                "lab_changes_total",
                "Labs created, updated, pruned, held, failed or suppressed by refreshes.",
                &["kind"],
            ),
            deletes,
            cml_requests: counter(
                &registry,
                "cml_requests_total",
                "Requests to CML by endpoint and status class.",
                &["endpoint", "class"],
            ),
            cml_latency: histogram(
                &registry,
                "cml_request_duration_seconds",
                "Latency of requests to CML by endpoint.",
                &["endpoint"],
                durations,
            ),
            http_requests: counter(
                &registry,
                "http_requests_total",
                "API requests by method and status class.",
                &["method", "class"],
            ),
            last_success,
            lease_skips,
            outbox_undelivered,
            outbox_oldest_age,
            registry,
        }
    }

    /// The event relay's latest measure of the outbox.
    pub fn outbox_backlog(&self, undelivered: u64, oldest_age_secs: f64) {
        self.outbox_undelivered
            .set(i64::try_from(undelivered).unwrap_or(i64::MAX));
        self.outbox_oldest_age.set(oldest_age_secs);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Starts timing a CML request; the result is recorded when the guard
    /// drops, with the class set by [`CmlTimer::status`] (or `error`).
    pub fn cml_request(&self, endpoint: &'static str) -> CmlTimer {
        CmlTimer {
            metrics: self.clone(),
            endpoint,
            started: Instant::now(),
            class: "error",
        }
    }

    /// An API connection was accepted.
    pub fn http_connection_opened(&self) {
        self.http_connections.inc();
    }

    /// An accepted API connection ended; `closed_by` says why when
    /// labsync ended it itself (a fixed word, see the metric's help).
    pub fn http_connection_ended(&self, closed_by: Option<&'static str>) {
        self.http_connections.dec();
        if let Some(reason) = closed_by {
            self.http_connection_closed(reason);
        }
    }

    /// Counts a connection labsync closed (or never served) for `reason`.
    pub fn http_connection_closed(&self, reason: &'static str) {
        self.http_connections_closed
            .with_label_values(&[reason])
            .inc();
    }

    /// Counts and times a request; `route` is its template (`None` for
    /// a path no route matched).
    pub fn http_request(
        &self,
        route: Option<&str>,
        method: &str,
        status: u16,
        elapsed: std::time::Duration,
    ) {
        let method = match method {
            "GET" | "POST" | "PUT" | "PATCH" | "DELETE" => method,
            _ => "other",
        };
        let class = status_class(status);
        self.http_requests.with_label_values(&[method, class]).inc();
        self.http_duration
            .with_label_values(&[route.unwrap_or("unmatched"), method, class])
            .observe(elapsed.as_secs_f64());
    }

    /// Sets the per-worker and queue gauges to a reading from MongoDB; a
    /// series the reading lacks (a removed worker, a state with no lab
    /// left, a worker disabled since) leaves the gauges.
    pub fn fleet_gauges(&self, r: &FleetReading) {
        let mut last = self
            .last_reading
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for w in &r.workers {
            let id = w.worker_id.as_str();
            for (state, n) in &w.labs {
                self.worker_labs
                    .with_label_values(&[id, state.as_str()])
                    .set(i64::try_from(*n).unwrap_or(i64::MAX));
            }
            for state in SyncState::ALL.map(SyncState::word) {
                self.worker_sync_state
                    .with_label_values(&[id, state])
                    .set(i64::from(state == w.sync_state));
            }
            match w.consecutive_failed_runs {
                Some(n) => self
                    .worker_failed_runs
                    .with_label_values(&[id])
                    .set(i64::try_from(n).unwrap_or(i64::MAX)),
                None => {
                    let _ = self.worker_failed_runs.remove_label_values(&[id]);
                }
            }
            self.worker_held
                .with_label_values(&[id])
                .set(i64::try_from(w.held_prune).unwrap_or(i64::MAX));
            // Also what the refresh's observer set in this process: a
            // disabled worker's last success is no alert's business.
            match w.last_success {
                Some(t) => self.last_success.with_label_values(&[id]).set(t),
                None => {
                    let _ = self.last_success.remove_label_values(&[id]);
                }
            }
        }
        for old in &last.workers {
            let id = old.worker_id.as_str();
            let now = r.workers.iter().find(|w| w.worker_id == old.worker_id);
            for (state, _) in &old.labs {
                if now.is_none_or(|w| !w.labs.iter().any(|(s, _)| s == state)) {
                    let _ = self.worker_labs.remove_label_values(&[id, state.as_str()]);
                }
            }
            if now.is_none() {
                for state in SyncState::ALL.map(SyncState::word) {
                    let _ = self.worker_sync_state.remove_label_values(&[id, state]);
                }
                let _ = self.worker_held.remove_label_values(&[id]);
            }
            if now.is_none() {
                let _ = self.worker_failed_runs.remove_label_values(&[id]);
            }
        }
        // The refresh's observer sets it too, in this process: a run that
        // ended after its worker was removed must not leave it behind.
        for family in prometheus::core::Collector::collect(&self.last_success) {
            for m in family.get_metric() {
                for l in m.get_label() {
                    if l.name() == "worker_id"
                        && !r
                            .workers
                            .iter()
                            .any(|w| w.worker_id == l.value() && w.last_success.is_some())
                    {
                        let _ = self.last_success.remove_label_values(&[l.value()]);
                    }
                }
            }
        }
        for (status, n) in &r.delete_requests {
            self.delete_requests
                .with_label_values(&[status])
                .set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
        self.delete_oldest_pending.set(r.oldest_pending_delete_secs);
        *last = r.clone();
    }

    /// Whether this replica is ready.
    pub fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    /// A failed event delivery, by one of [`DELIVERY_FAILURES`].
    pub fn event_delivery_failed(&self, reason: &'static str) {
        self.event_failures.with_label_values(&[reason]).inc();
    }

    /// A scheduled tick: `started` or `skipped_overlap`.
    pub fn scheduler_tick(&self, outcome: &'static str) {
        self.scheduler_ticks.with_label_values(&[outcome]).inc();
    }

    /// A refused bearer token, by one of [`TOKEN_REJECTIONS`].
    pub fn token_rejected(&self, reason: &'static str) {
        self.token_rejections.with_label_values(&[reason]).inc();
    }

    /// A read of the provider's keys.
    pub fn key_set_read(&self, ok: bool) {
        self.key_set_reads
            .with_label_values(&[if ok { "ok" } else { "failed" }])
            .inc();
    }
}

fn status_class(status: u16) -> &'static str {
    match status {
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "other",
    }
}

/// Times one CML request (a Drop guard, so early returns are counted too).
#[derive(Debug)]
pub struct CmlTimer {
    metrics: Metrics,
    endpoint: &'static str,
    started: Instant,
    class: &'static str,
}

impl CmlTimer {
    pub fn status(&mut self, status: u16) {
        self.class = status_class(status);
    }
}

impl Drop for CmlTimer {
    fn drop(&mut self) {
        self.metrics
            .cml_requests
            .with_label_values(&[self.endpoint, self.class])
            .inc();
        self.metrics
            .cml_latency
            .with_label_values(&[self.endpoint])
            .observe(self.started.elapsed().as_secs_f64());
    }
}

impl Observer for Metrics {
    fn refresh_finished(&self, r: &RunReport) {
        let status = r.status.word();
        self.refresh_runs.with_label_values(&[status]).inc();
        if r.skip_reason == Some(SkipReason::LeaseHeld) {
            self.lease_skips.inc();
        }
        if r.status != RunStatus::Skipped {
            self.refresh_duration
                .with_label_values(&[status])
                .observe(r.duration_ms as f64 / 1000.0);
        }
        // A dry run changed nothing: what it would have done is in its
        // report, not in the counts of changes.
        if !r.dry_run {
            for (kind, n) in [
                ("created", r.created),
                ("updated", r.updated),
                ("pruned", r.pruned),
                ("held", r.held),
                ("failed", r.failed),
                ("suppressed", r.suppressed),
            ] {
                if n > 0 {
                    self.lab_changes.with_label_values(&[kind]).inc_by(n);
                }
            }
        }
        if r.status == RunStatus::Succeeded && !r.dry_run {
            self.last_success
                .with_label_values(&[r.worker_id.as_str()])
                .set(r.finished_at.timestamp() as f64);
        }
    }

    fn delete_finished(&self, end: labsync_application::DeleteEnd<'_>) {
        self.deletes.with_label_values(&[end.word()]).inc();
    }

    fn delete_took(&self, outcome: &'static str, elapsed: std::time::Duration) {
        self.delete_duration
            .with_label_values(&[outcome])
            .observe(elapsed.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_absent_from_a_reading_leaves_the_gauges_whoever_set_them() {
        let m = Metrics::new();
        // As the refresh's observer does, for a worker removed since.
        m.last_success.with_label_values(&["gone"]).set(1.0);
        m.fleet_gauges(&FleetReading::default());
        assert!(!m.render().contains("worker_id=\"gone\""), "{}", m.render());
    }

    #[test]
    fn renders_bounded_metrics_with_the_prefix() {
        let m = Metrics::new();
        use labsync_application::{DeleteEnd, DeleteOutcomeKind};
        m.delete_finished(DeleteEnd::Outcome(&DeleteOutcomeKind::Deleted));
        m.delete_finished(DeleteEnd::RecordCleanupPending);
        {
            let mut t = m.cml_request("list_labs");
            t.status(200);
        }
        drop(m.cml_request("lab_details"));
        m.http_connection_opened();
        m.http_connection_opened();
        m.http_connection_ended(None);
        m.http_connection_closed("refused");
        let text = m.render();
        assert!(text.contains("labsync_http_connections 1"), "{text}");
        assert!(
            text.contains("labsync_http_connections_closed_total{reason=\"refused\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("labsync_deletes_total{outcome=\"deleted\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("labsync_deletes_total{outcome=\"record_cleanup_pending\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("labsync_cml_requests_total{class=\"2xx\",endpoint=\"list_labs\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("labsync_cml_requests_total{class=\"error\",endpoint=\"lab_details\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("labsync_cml_request_duration_seconds_bucket"),
            "{text}"
        );
    }
}
