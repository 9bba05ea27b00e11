//! Builds the application from configuration: one MongoDB client, the
//! indexes, the repositories, the CML gateway, metrics, and the use-case
//! services.

use std::sync::Arc;

use anyhow::Context;
use labsync_application::ports::SystemClock;
use labsync_application::{DeleteQueue, Inventory, Services};
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
            .map_err(|e| anyhow::anyhow!("security.encryption_key: {e}"))?
            .map(|c| c.with_previous(&settings.security.previous_encryption_key))
            .transpose()
            .map_err(|e| anyhow::anyhow!("security.previous_encryption_key: {e}"))?;
        let metrics = Metrics::new();
        let workers = MongoWorkerRepository::new(&db, cipher);
        let retention = settings.events.retention();
        let services = Services {
            workers: Arc::new(workers.clone()),
            labs: Arc::new(MongoLabRepository::new(&db, retention)),
            cml: Arc::new(CmlHttpGateway::new(settings.cml.clone(), metrics.clone())),
            lease: Arc::new(MongoRefreshLease::new(&db)),
            audit: Arc::new(MongoAuditLog::new(&db)),
            reports: Arc::new(MongoRunReports::new(&db)),
            clock: Arc::new(SystemClock),
            observer: Arc::new(metrics.clone()),
            settings: settings.core(),
        };
        let delete_queue = DeleteQueue::new(
            services.clone(),
            Arc::new(MongoDeleteRequests::new(&db)),
            settings.delete_queue(),
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
