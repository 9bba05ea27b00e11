//! The refresh lease, kept alive while a run works.
//!
//! A refresh holds its worker's lease (a short one, `refresh.lease_ttl_secs`)
//! and renews it in the background every third of its lifetime. Before each
//! write it renews once more, synchronously: a run that could not renew
//! writes nothing and says so.
//!
//! # Expected flow
//! 1. [`RefreshLease::try_acquire`] grants the lease with a fencing token,
//!    greater than every earlier run's for the worker.
//! 2. [`LeaseKeeper::start`] renews it every `ttl / 3` until stopped. A
//!    renewal that says "not yours" marks the lease lost for good.
//! 3. [`LeaseKeeper::confirm`] renews now and answers whether the run may
//!    write; the run calls it before its writes.
//! 4. [`LeaseKeeper::stop`] ends the renewals; the run releases the lease.
//!
//! # Guarantees
//! - A run that lost its lease (it expired and another run took it, or the
//!   worker was removed) writes nothing after it learns so.
//! - Even a run that has not learnt it yet (its writes already on the
//!   wire) cannot undo a newer run's work: the repository refuses to
//!   update or prune a record written under a greater fencing token.
//! - Expiry is judged by the database's clock: a replica whose clock runs
//!   ahead does not take a live lease.
//!
//! # Assumptions
//! A renewal round trip takes far less than a third of the lease's
//! lifetime.
//!
//! # Caveats
//! A create of a lab the newer run has just pruned (gone in CML) can still
//! land between a stale run's last confirmation and its write; the next
//! refresh prunes it again. Fencing is per record, not per run: a run that
//! loses its lease half-way through its writes leaves the half it wrote.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use labsync_domain::WorkerId;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::warn;

use crate::errors::RepoError;
use crate::ports::RefreshLease;

/// The shortest time between two renewals, however short the lease: a
/// tiny `lease_ttl` must not make the keeper spin.
pub const MIN_RENEW_EVERY: Duration = Duration::from_millis(100);

/// Renews a held lease in the background.
pub struct LeaseKeeper {
    lease: Arc<dyn RefreshLease>,
    worker: WorkerId,
    holder: String,
    ttl: Duration,
    lost: Arc<AtomicBool>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

// Debug output only: no behaviour depends on it (mutants here are
// equivalent).
impl std::fmt::Debug for LeaseKeeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseKeeper")
            .field("worker", &self.worker)
            .field("holder", &self.holder)
            .field("lost", &self.lost.load(Ordering::SeqCst))
            .finish_non_exhaustive()
    }
}

impl LeaseKeeper {
    /// Starts renewing `holder`'s lease on `worker` every `ttl / 3`.
    pub fn start(
        lease: Arc<dyn RefreshLease>,
        worker: WorkerId,
        holder: String,
        ttl: Duration,
    ) -> Self {
        let lost = Arc::new(AtomicBool::new(false));
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn({
            let (lease, worker, holder, lost) =
                (lease.clone(), worker.clone(), holder.clone(), lost.clone());
            async move {
                let every = (ttl / 3).max(MIN_RENEW_EVERY);
                loop {
                    tokio::select! {
                        () = tokio::time::sleep(every) => {}
                        // Stopped, or the keeper dropped (channel closed).
                        _ = stopped.wait_for(|s| *s) => return,
                    }
                    match lease.renew(&worker, &holder, ttl).await {
                        Ok(true) => {}
                        Ok(false) => {
                            warn!(worker_id = %worker, "the refresh lease was lost: this run writes nothing more");
                            lost.store(true, Ordering::SeqCst);
                            return;
                        }
                        // The next renewal, or the confirmation before a
                        // write, decides.
                        Err(e) => {
                            warn!(worker_id = %worker, error = %e, "could not renew the refresh lease");
                        }
                    }
                }
            }
        });
        Self {
            lease,
            worker,
            holder,
            ttl,
            lost,
            stop,
            task: Some(task),
        }
    }

    /// Renews the lease now: `Ok(true)` when the run still holds it and may
    /// write.
    ///
    /// # Errors
    /// [`RepoError`] when the store cannot say; the run must not write then
    /// either.
    pub async fn confirm(&self) -> Result<bool, RepoError> {
        if self.lost.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let held = self
            .lease
            .renew(&self.worker, &self.holder, self.ttl)
            .await?;
        if !held {
            self.lost.store(true, Ordering::SeqCst);
        }
        Ok(held)
    }

    /// Stops the renewals and waits for the renewal in flight, if any.
    /// (Dropping the keeper stops them too, without waiting: the renewal
    /// task ends when the stop channel closes.)
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fakes::{FakeStore, worker_id};

    fn held(store: &Arc<FakeStore>) {
        *store.lease.lock().unwrap() = Some("run".into());
    }

    #[tokio::test(start_paused = true)]
    async fn the_lease_is_renewed_every_third_of_its_life_until_stopped() {
        let store = Arc::new(FakeStore::default());
        held(&store);
        let keeper = LeaseKeeper::start(
            store.clone(),
            worker_id(),
            "run".into(),
            Duration::from_secs(3),
        );
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        assert_eq!(
            *store.renewals.lock().unwrap(),
            1,
            "after a third of the TTL"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(*store.renewals.lock().unwrap(), 2);
        keeper.stop().await;
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(*store.renewals.lock().unwrap(), 2, "none after stop");
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_keeper_stops_the_renewals() {
        let store = Arc::new(FakeStore::default());
        held(&store);
        drop(LeaseKeeper::start(
            store.clone(),
            worker_id(),
            "run".into(),
            Duration::from_secs(3),
        ));
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(*store.renewals.lock().unwrap(), 0);
    }

    #[tokio::test]
    async fn confirm_says_yes_while_held_and_no_for_good_once_lost() {
        let store = Arc::new(FakeStore::default());
        held(&store);
        let keeper = LeaseKeeper::start(
            store.clone(),
            worker_id(),
            "run".into(),
            Duration::from_secs(60),
        );
        assert!(keeper.confirm().await.unwrap());
        assert!(keeper.confirm().await.unwrap(), "still held");
        *store.lease.lock().unwrap() = Some("another run".into());
        assert!(!keeper.confirm().await.unwrap());
        *store.lease.lock().unwrap() = Some("run".into());
        assert!(!keeper.confirm().await.unwrap(), "lost is lost");
        keeper.stop().await;
    }
}
