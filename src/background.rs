//! Work that runs beside requests, all of it stopped by one shutdown signal.
//!
//! * [`run_periodic`] is the one way a node runs a periodic worker
//!   (heartbeats, hint delivery, anti-entropy, fsync): a tick, one round of
//!   work, again, until shutdown cancels the wait or the round.
//! * [`Background`] runs bounded one-off tasks (read repairs, the trailing
//!   replies of a write round) that shutdown stops and waits for.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Most read repairs (and trailing write replies) in flight at once.
const MAX_BACKGROUND_TASKS: usize = 1024;

/// Runs `round` every `every` (the first time after `first`) until
/// `shutdown` is cancelled, which also abandons a round in progress. A round
/// that overruns delays the next tick rather than bunching ticks up.
pub fn run_periodic<Round, F>(
    name: &'static str,
    first: Duration,
    every: Duration,
    shutdown: CancellationToken,
    mut round: Round,
) -> tokio::task::JoinHandle<()>
where
    Round: FnMut() -> F + Send + 'static,
    F: Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        let start = tokio::time::Instant::now() + first;
        let mut ticker = tokio::time::interval_at(start, every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                _ = ticker.tick() => {}
            }
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                () = round() => {}
            }
        }
        tracing::debug!(worker = name, "stopped");
    })
}

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
    async fn a_periodic_worker_ticks_on_time_and_stops_on_shutdown() {
        let rounds = Arc::new(AtomicUsize::new(0));
        let shutdown = CancellationToken::new();
        let counted = rounds.clone();
        let worker = run_periodic(
            "test",
            Duration::from_millis(50),
            Duration::from_millis(100),
            shutdown.clone(),
            move || {
                let counted = counted.clone();
                async move {
                    counted.fetch_add(1, Ordering::SeqCst);
                }
            },
        );
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert_eq!(rounds.load(Ordering::SeqCst), 0, "not before `first`");
        tokio::time::sleep(Duration::from_millis(320)).await;
        // Ticks at 50, 150, 250, 350 ms.
        assert_eq!(rounds.load(Ordering::SeqCst), 4);
        shutdown.cancel();
        worker.await.expect("worker stops");
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_abandons_a_round_in_progress() {
        let shutdown = CancellationToken::new();
        let worker = run_periodic(
            "stuck",
            Duration::ZERO,
            Duration::from_millis(10),
            shutdown.clone(),
            std::future::pending::<()>,
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(1), worker)
            .await
            .expect("a stuck round does not hold shutdown")
            .expect("worker ends");
    }

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
