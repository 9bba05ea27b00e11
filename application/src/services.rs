//! The ports and settings the use cases share, wired once by the binary.

use std::sync::Arc;
use std::time::Duration;

use labsync_domain::PrunePolicy;

use crate::events::Observer;
use crate::ports::{
    AuditLog, Clock, CmlGateway, LabRepository, RefreshLease, RunReports, WorkerRepository,
};

/// Tunables of the use cases. Their defaults are config/default.toml and
/// nowhere else; `infrastructure::configuration` builds this from it.
#[derive(Debug, Clone)]
pub struct CoreSettings {
    pub max_concurrent_workers: usize,
    pub max_concurrent_labs_per_worker: usize,
    pub prune: PrunePolicy,
    /// The refresh lease's lifetime; runs renew it every third of it.
    pub lease_ttl: Duration,
    /// How long a refresh may spend fetching from CML before it gives up.
    pub run_deadline: Duration,
    pub history_limit: usize,
    /// How long a deleted lab stays hidden from refreshes.
    pub tombstone_ttl: Duration,
    /// How long a forced delete waits for stop and wipe to converge.
    pub converge_timeout: Duration,
    pub converge_poll: Duration,
    /// Identifies this process as a lease holder.
    pub instance_id: String,
}

/// Everything a use case needs; cheap to clone.
#[derive(Clone)]
pub struct Services {
    pub workers: Arc<dyn WorkerRepository>,
    pub labs: Arc<dyn LabRepository>,
    pub cml: Arc<dyn CmlGateway>,
    pub lease: Arc<dyn RefreshLease>,
    pub audit: Arc<dyn AuditLog>,
    pub reports: Arc<dyn RunReports>,
    pub clock: Arc<dyn Clock>,
    pub observer: Arc<dyn Observer>,
    pub settings: CoreSettings,
}

impl std::fmt::Debug for Services {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Services")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}
