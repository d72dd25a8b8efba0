//! Bounded one-off work beside requests (read repairs, the trailing
//! replies of a write round), which shutdown stops and waits for. The
//! periodic workers are in [`crate::workers`].

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Most read repairs (and trailing write replies) in flight at once.
const MAX_BACKGROUND_TASKS: usize = 1024;

/// Spawns bounded background work that stops on shutdown.
#[derive(Clone)]
pub struct Background {
    /// Lets shutdown wait for every task.
    tracker: TaskTracker,
    /// Cancelled on shutdown.
    shutdown: CancellationToken,
    /// Bounds how many tasks run at once.
    permits: Arc<Semaphore>,
    /// Read repairs sent (writes to stale replicas), blocking or not.
    pub(crate) repairs_sent: Arc<AtomicU64>,
    /// Tasks dropped because too many were running.
    dropped: Arc<AtomicU64>,
}

impl Background {
    pub fn new(shutdown: CancellationToken) -> Self {
        Self {
            tracker: TaskTracker::new(),
            shutdown,
            permits: Arc::new(Semaphore::new(MAX_BACKGROUND_TASKS)),
            repairs_sent: Arc::new(AtomicU64::new(0)),
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Runs `task` in the background unless the limit is reached (then it is
    /// dropped, and counted) or shutdown has begun.
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::warn!(
                dropped,
                "background task (read repair or trailing replica write) dropped: {MAX_BACKGROUND_TASKS} already in flight"
            );
            return;
        };
        self.run(task, Some(permit));
    }

    /// Runs the task `make` builds in the background if there is room,
    /// and answers whether it did; else `make` is not called and the
    /// caller does the work itself (work that must not be dropped: the
    /// trailing replies of a write round).
    pub fn try_spawn_with<F>(&self, make: impl FnOnce() -> F) -> bool
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            return false;
        };
        let task = make();
        self.run(task, Some(permit));
        true
    }

    /// Runs `task` in the background whatever the limit: only for calls
    /// already sent whose caller was cancelled (each carries its own RPC
    /// deadline, so they end soon), which must not be cut short.
    pub fn spawn_unbounded(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.run(task, None);
    }

    /// Runs `task` tracked, until it ends or shutdown cancels it, holding
    /// `permit` (its place under the limit) while it runs.
    fn run(
        &self,
        task: impl Future<Output = ()> + Send + 'static,
        permit: Option<tokio::sync::OwnedSemaphorePermit>,
    ) {
        let shutdown = self.shutdown.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                biased;
                () = task => {}
                () = shutdown.cancelled() => {}
            }
            drop(permit);
        });
    }

    /// Read repairs sent so far, blocking or not.
    pub fn repairs_sent(&self) -> u64 {
        self.repairs_sent.load(Ordering::Relaxed)
    }

    /// Stops accepting work, and waits for running tasks up to `grace`
    /// before cancelling them.
    pub async fn close(&self, grace: Duration) {
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            self.shutdown.cancel();
            self.tracker.wait().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[tokio::test(start_paused = true)]
    async fn background_tasks_are_bounded_and_cancelled_after_the_grace() {
        let background = Background::new(CancellationToken::new());
        let finished = Arc::new(AtomicUsize::new(0));
        for _ in 0..MAX_BACKGROUND_TASKS + 5 {
            let finished = finished.clone();
            background.spawn(async move {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                finished.fetch_add(1, Ordering::SeqCst);
            });
        }
        assert_eq!(background.dropped.load(Ordering::Relaxed), 5);
        background.close(Duration::from_secs(1)).await;
        assert_eq!(
            finished.load(Ordering::SeqCst),
            0,
            "cancelled, not waited out"
        );
    }
}
