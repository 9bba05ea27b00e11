//! `labsync serve`: the HTTP API, the refresh schedule, the async delete
//! worker and the event relay, in one process, with a graceful stop.
//!
//! The API is served by [`crate::http::server`], which bounds connections,
//! requests and how long a client may take (see there).
//!
//! # Shutdown
//! On SIGTERM or SIGINT: stop accepting connections and let requests in
//! flight finish (a delete in progress completes), stop the schedule and
//! wait for a refresh in progress, stop the background loops after their
//! current item; all bounded by `api.shutdown_grace_secs`. Leases are
//! released by the runs themselves as they finish. A run started through
//! the API (`Prefer: respond-async`, the fleet refresh) is not waited for:
//! it stops with the process, and its report reads as failed a lease's
//! lifetime later (see `labsync_application::refresh`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use labsync_application::RefreshAll;
use labsync_infrastructure::configuration::Settings;
use labsync_infrastructure::mongo::feed::MongoEventFeed;
use labsync_infrastructure::mongo::outbox::EventRelay;
use labsync_infrastructure::mongo::{MongoHealth, MongoMachineTokens, MongoSessions};
use labsync_infrastructure::scheduler::RefreshScheduler;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::http::server::{self, Limits};
use crate::http::stream::EventHub;
use crate::http::{ApiState, router};
use crate::wiring::App;

/// A running service.
pub struct Running {
    pub addr: SocketAddr,
    pub app: App,
    stop: watch::Sender<bool>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Running {
    /// Asks the service to stop and waits until it has.
    ///
    /// # Errors
    /// What the service failed with.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        self.task.await.context("service task")?
    }
}

/// Starts everything on `listener` (bind port 0 in tests).
///
/// # Errors
/// When MongoDB or the schedule cannot be set up.
pub async fn start(settings: Settings, listener: TcpListener) -> anyhow::Result<Running> {
    let app = App::build(&settings).await?;
    start_with(settings, app, listener).await
}

/// As [`start`], with an application already built.
///
/// # Errors
/// When the schedule cannot be set up.
pub async fn start_with(
    settings: Settings,
    app: App,
    listener: TcpListener,
) -> anyhow::Result<Running> {
    let addr = listener.local_addr()?;
    let (stop, stop_rx) = watch::channel(false);
    let scheduler_running = Arc::new(AtomicBool::new(false));
    let scheduler = RefreshScheduler::start(
        &settings.refresh.cron,
        RefreshAll::new(app.services.clone()),
        settings.refresh.run_at_startup,
        Some(app.metrics.clone()),
    )
    .await
    .context("starting the refresh schedule")?;
    scheduler_running.store(true, Ordering::Relaxed);

    let mut background: Vec<JoinHandle<()>> = Vec::new();
    background.push(tokio::spawn(app.delete_queue.clone().run(stop_rx.clone())));
    let relay_settings = settings.relay();
    if relay_settings.sink_url.is_none() {
        info!("no events.sink_url: lab events stay in the outbox until they expire");
    }
    // Without a sink the relay only measures the backlog.
    let relay = EventRelay::new(&app.db, relay_settings, Some(app.metrics.clone()))
        .context("building the event relay")?;
    background.push(tokio::spawn(relay.run(stop_rx.clone())));
    let events = EventHub::new(
        Arc::new(MongoEventFeed::new(&app.db)),
        settings.api.max_event_streams,
    );
    background.push(tokio::spawn(events.clone().run(stop_rx.clone())));
    let health: Arc<dyn labsync_application::ports::Health> = Arc::new(MongoHealth::new(&app.db));
    background.push(tokio::spawn(crate::gauges::run(
        app.inventory.clone(),
        app.delete_queue.clone(),
        health.clone(),
        scheduler_running.clone(),
        app.metrics.clone(),
        stop_rx.clone(),
    )));

    let state = ApiState {
        services: app.services.clone(),
        inventory: app.inventory.clone(),
        delete_queue: app.delete_queue.clone(),
        tokens: Arc::new(settings.api.parsed_tokens()),
        metrics: app.metrics.clone(),
        health,
        sessions: Arc::new(MongoSessions::new(&app.db)),
        machine_tokens: Arc::new(MongoMachineTokens::new(&app.db)),
        oidc: if settings.oidc.enabled() {
            Some(Arc::new(
                labsync_infrastructure::oidc::OidcVerifier::new(settings.oidc.clone())
                    .map_err(|e| anyhow::anyhow!("oidc: {e}"))?
                    .with_metrics(app.metrics.clone()),
            ))
        } else {
            None
        },
        session_policy: crate::http::session::SessionPolicy {
            secure_cookie: settings.api.secure_cookie,
            idle: std::time::Duration::from_secs(settings.api.session_idle_secs),
            max: std::time::Duration::from_secs(settings.api.session_max_secs),
        },
        console_sign_in: settings.oidc.console_sign_in(),
        sign_in_budget: Arc::default(),
        events,
        scheduler_running: scheduler_running.clone(),
        cron: settings.refresh.cron.clone(),
        metrics_auth: settings.api.metrics_auth,
    };
    if state.tokens.is_empty() {
        warn!("no api.tokens configured: every API call except probes will be refused");
    }
    let grace = settings.api.shutdown_grace();
    let routes = router(
        state,
        settings.api.body_limit_bytes,
        settings.api.max_requests_in_flight,
    );
    let limits = Limits::from_settings(&settings.api);
    let metrics = app.metrics.clone();
    let mut http_stop = stop_rx.clone();
    let task = tokio::spawn(async move {
        info!(%addr, "labsync API listening");
        let server = server::serve(listener, routes, limits, metrics, async move {
            let _ = http_stop.wait_for(|s| *s).await;
        });
        let mut server = std::pin::pin!(server);
        let mut stop_rx = stop_rx;
        let stopping = async move {
            // The guard wait_for returns is not Send: drop it here.
            let _ = stop_rx.wait_for(|s| *s).await;
        };
        tokio::select! {
            r = &mut server => r.context("HTTP server")?,
            () = stopping => {
                info!("stopping: finishing requests in flight");
                if tokio::time::timeout(grace, &mut server).await.is_err() {
                    warn!(grace_secs = grace.as_secs(), "requests still running after the grace period");
                }
            }
        }
        scheduler_running.store(false, Ordering::Relaxed);
        if !scheduler.shutdown(grace).await {
            warn!("a refresh was still running after the grace period; its lease will expire");
        }
        for task in background {
            if tokio::time::timeout(grace, task).await.is_err() {
                warn!("a background task did not stop within the grace period");
            }
        }
        info!("stopped");
        Ok(())
    });
    Ok(Running {
        addr,
        app,
        stop,
        task,
    })
}

/// Runs until SIGINT or SIGTERM, then stops gracefully.
///
/// # Errors
/// When the listener cannot be bound or the service fails.
pub async fn serve(settings: Settings) -> anyhow::Result<()> {
    let listener = TcpListener::bind(&settings.api.listen)
        .await
        .with_context(|| format!("binding api.listen {}", settings.api.listen))?;
    let running = start(settings, listener).await?;
    println!("labsync: API on http://{}", running.addr);
    shutdown_signal().await?;
    running.stop().await
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    Ok(())
}
