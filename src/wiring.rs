//! Builds the application from configuration: one MongoDB client, the
//! indexes, the repositories, the CML gateway, metrics, and the use-case
//! services.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use labsync_application::domain::PrunePolicy;
use labsync_application::ports::SystemClock;
use labsync_application::retry::Backoff;
use labsync_application::{CoreSettings, DeleteQueue, DeleteQueueSettings, Inventory, Services};
use labsync_infrastructure::cml::CmlHttpGateway;
use labsync_infrastructure::configuration::Settings;
use labsync_infrastructure::crypto::PasswordCipher;
use labsync_infrastructure::metrics::Metrics;
use labsync_infrastructure::mongo::{
    self, MongoAuditLog, MongoDeleteRequests, MongoLabRepository, MongoRefreshLease,
    MongoRunReports, MongoWorkerRepository,
};
use mongodb::Database;

/// The wired application.
#[derive(Debug, Clone)]
pub struct App {
    pub services: Services,
    pub workers: MongoWorkerRepository,
    pub inventory: Inventory,
    pub delete_queue: DeleteQueue,
    pub metrics: Metrics,
    pub db: Database,
}

/// The use cases' settings from the configuration.
pub fn core_settings(settings: &Settings) -> CoreSettings {
    let r = &settings.refresh;
    let d = &settings.delete;
    CoreSettings {
        max_concurrent_workers: r.max_concurrent_workers,
        max_concurrent_labs_per_worker: r.max_concurrent_labs_per_worker,
        prune: PrunePolicy {
            max_prune_share: r.max_prune_share,
            prune_floor: r.prune_floor,
            force: false,
        },
        lease_ttl: Duration::from_secs(r.lease_ttl_secs),
        run_deadline: Duration::from_secs(r.run_deadline_secs),
        history_limit: r.history_limit,
        tombstone_ttl: Duration::from_secs(d.tombstone_ttl_secs),
        converge_timeout: Duration::from_secs(d.converge_timeout_secs),
        converge_poll: Duration::from_millis(d.converge_poll_ms),
        ..CoreSettings::default()
    }
}

fn queue_settings(settings: &Settings) -> DeleteQueueSettings {
    let d = &settings.delete;
    DeleteQueueSettings {
        backoff: Backoff {
            base: Duration::from_millis(d.async_retry_base_ms),
            max: Duration::from_secs(d.async_max_backoff_secs),
        },
        poll: Duration::from_millis(d.async_poll_ms),
        claim: Duration::from_secs(d.async_claim_secs),
        max_attempts: u32::try_from(d.async_max_attempts).unwrap_or(u32::MAX),
        max_age: Duration::from_secs(d.async_max_age_secs),
        max_parallel: usize::try_from(d.async_max_parallel).unwrap_or(1),
    }
}

impl App {
    /// Connects to MongoDB, creates the indexes, and wires every adapter.
    ///
    /// # Errors
    /// When MongoDB is unreachable or refuses the indexes.
    pub async fn build(settings: &Settings) -> anyhow::Result<Self> {
        let db = mongo::connect(&settings.mongodb).await?;
        Self::with_database(settings, db).await
    }

    /// As [`App::build`], on a given database (tests use their own).
    ///
    /// # Errors
    /// As [`App::build`].
    pub async fn with_database(settings: &Settings, db: Database) -> anyhow::Result<Self> {
        mongo::ensure_indexes(&db)
            .await
            .context("creating MongoDB indexes")?;
        let cipher = PasswordCipher::from_setting(&settings.security.encryption_key)
            .map_err(|e| anyhow::anyhow!("security.encryption_key: {e}"))?;
        let metrics = Metrics::new();
        let workers = MongoWorkerRepository::new(&db, cipher);
        let retention = Duration::from_secs(settings.events.retention_secs);
        let services = Services {
            workers: Arc::new(workers.clone()),
            labs: Arc::new(MongoLabRepository::new(&db, retention)),
            cml: Arc::new(CmlHttpGateway::new(settings.cml.clone(), metrics.clone())),
            lease: Arc::new(MongoRefreshLease::new(&db)),
            audit: Arc::new(MongoAuditLog::new(&db)),
            reports: Arc::new(MongoRunReports::new(&db)),
            clock: Arc::new(SystemClock),
            observer: Arc::new(metrics.clone()),
            settings: core_settings(settings),
        };
        let delete_queue = DeleteQueue::new(
            services.clone(),
            Arc::new(MongoDeleteRequests::new(&db)),
            queue_settings(settings),
        );
        Ok(Self {
            inventory: Inventory::new(services.clone()),
            services,
            workers,
            delete_queue,
            metrics,
            db,
        })
    }
}
