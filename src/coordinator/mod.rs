//! Quorum calls: the async shell around [`crate::quorum`].
//!
//! A coordinator sends a request to all N replicas of a key at once and
//! feeds the replies into a tally as they arrive, answering as soon as the
//! tally says so:
//!
//! * **Writes** stamp a version, answer after W replicas hold it, re-stamp
//!   above any newer version a replica reports, and fail with UNAVAILABLE as
//!   soon as W can no longer be reached. Replies still in flight once the
//!   answer is known keep going in the background, so every live replica gets
//!   the write, not just the first W.
//! * **Reads** answer from the first R replies (newest version wins). The
//!   remaining replies are collected in the background and every replica
//!   found behind the newest version gets it (read repair), off the
//!   client's critical path. Both the node and the smart client read this way.
//! * **Monotonic reads.** At QUORUM and ALL, when fewer than W of the replies
//!   received hold the winning version, repair cannot wait: the node writes
//!   the winner until W replicas hold it and only then answers (or fails
//!   with UNAVAILABLE at the request deadline), so no later read can return
//!   an older value. Cassandra always blocks on read repair, Garage never
//!   does; DKVS blocks only then. The smart client never writes to replicas:
//!   it hands such a read to a node (`KeyValue.Get`).
//!
//! Background work is tracked by a [`Background`] so shutdown can stop it and
//! wait for it, and is bounded by a semaphore so a burst of stale reads
//! cannot spawn without limit.

mod read;
mod write;

#[cfg(test)]
mod tests;

pub use read::{PendingRepair, read_quorum};

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::background::Background;
use crate::error::{Error, Result};
use crate::hints::{HintStore, Hinter};
use crate::net::ReplicaHandle;
use crate::placement::Placement;
use crate::quorum::Target;
use crate::replica::ReplicaStore;
use crate::serving::ClusterView;

pub use crate::quorum::WriteAck;

/// Coordinates client requests on a node.
pub struct Coordinator {
    /// This node's replica: the clock, and the in-process replica.
    local: Arc<ReplicaStore>,
    /// Placement, peers, liveness, call deadline.
    cluster: Arc<ClusterView>,
    /// Deadline of a whole client request.
    request_timeout: Duration,
    /// Where read repairs and trailing write replies run.
    background: Background,
    /// Stores hints for replicas that miss writes.
    hinter: Hinter,
    /// Reads that had to repair their answer to W replicas before answering.
    blocking_repairs: AtomicU64,
    /// Per-key (striped) order of writes this node coordinates: a write is
    /// stamped only after the previous write to its key here was decided,
    /// so this node's own writes to a hot key never overtake each other at
    /// a replica (which would supersede the older one). Async mutexes: held
    /// across the write round.
    write_order: Vec<tokio::sync::Mutex<()>>,
}

/// Stripes of [`Coordinator::write_order`].
const WRITE_ORDER_STRIPES: usize = 4096;

impl Coordinator {
    pub fn new(
        local: Arc<ReplicaStore>,
        cluster: Arc<ClusterView>,
        request_timeout: Duration,
        background: Background,
        hints: Arc<HintStore>,
    ) -> Self {
        Self {
            local,
            hinter: Hinter::new(cluster.clone(), hints),
            cluster,
            request_timeout,
            background,
            blocking_repairs: AtomicU64::new(0),
            write_order: (0..WRITE_ORDER_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
        }
    }

    /// The deadline of a whole client request (`--request-timeout-ms`).
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// Reads so far that repaired their answer to W replicas before
    /// answering (successfully or not).
    pub fn blocking_repairs(&self) -> u64 {
        self.blocking_repairs.load(Ordering::Relaxed)
    }

    /// Handles to the key's N replicas under `view`, this node's own store
    /// in-process.
    fn replicas_for(&self, view: &Placement, key: &str) -> Result<Vec<ReplicaHandle>> {
        self.cluster.replica_handles(view, key, &self.local)
    }

    async fn with_deadline<T>(
        &self,
        operation: &str,
        work: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        tokio::time::timeout(self.request_timeout, work)
            .await
            .unwrap_or_else(|_| Err(self.deadline_exceeded(operation)))
    }

    fn deadline_exceeded(&self, operation: &str) -> Error {
        Error::DeadlineExceeded(format!(
            "{operation} did not finish within {} ms (--request-timeout-ms); replicas may be overloaded",
            self.request_timeout.as_millis()
        ))
    }
}

/// The targets the quorum rules reason about, for these handles.
fn targets_of(replicas: &[ReplicaHandle]) -> Vec<Target> {
    replicas
        .iter()
        .map(|r| Target {
            address: r.address.clone(),
            believed_down: r.believed_down.clone(),
        })
        .collect()
}
