//! Prometheus metrics. Labels are bounded: outcomes, endpoints and status
//! classes are fixed words, and the only open label, `worker_id`, has one
//! value per registered worker.

use std::time::Instant;

use labsync_application::{Observer, RunReport, RunStatus, SkipReason};
use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
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
        Self {
            http_connections,
            http_connections_closed: counter(
                &registry,
                "http_connections_closed_total",
                "API connections labsync closed itself: header_timeout, idle_timeout, \
                 evicted (the longest idle made room at api.max_connections) or \
                 refused (every connection was running a request).",
                &["reason"],
            ),
            refresh_runs: counter(
                &registry,
                "refresh_runs_total",
                "Refresh runs by status.",
                &["status"],
            ),
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
            deletes: counter(
                &registry,
                "deletes_total",
                "Lab deletes by outcome.",
                &["outcome"],
            ),
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
                vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ],
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

    pub fn http_request(&self, method: &str, status: u16) {
        let method = match method {
            "GET" | "POST" | "PUT" | "PATCH" | "DELETE" => method,
            _ => "other",
        };
        self.http_requests
            .with_label_values(&[method, status_class(status)])
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
