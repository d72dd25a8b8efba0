//! Anti-entropy: replicas converge in the background, with no client reads.
//!
//! The ring's token ranges are the leaves of a hash tree. Each replica keeps,
//! per range, the XOR of a hash of every (key, version) it holds, updated on
//! every write (see [`crate::replica::ReplicaStore::range_digest`]); because
//! storage keys are prefixed with the ring hash, a range is also a contiguous
//! key range on disk. For a pair of nodes, the tree covers the ranges whose
//! replicas include both; its root hashes the leaves in order.
//!
//! Every `--anti-entropy-interval` seconds a node asks each live peer for
//! the root of their shared tree. Equal roots end the exchange — the cost
//! when nothing differs is one small RPC per peer. Otherwise it fetches the
//! peer's leaves, and for each differing range the (key, version) lists of
//! both sides; it then pulls what the peer has newer and pushes what it has
//! newer, through the ordinary write-if-newer path.
//!
//! The same round collects tombstones: one older than `--tombstone-grace` is
//! purged once every replica of its key holds it or holds nothing (a replica
//! holding an *older value* would bring the key back). A tombstone past its
//! grace is never copied to a replica that holds nothing for the key, so two
//! replicas purging at slightly different times do not hand it back and
//! forth. `--max-hint-age-secs` is below the grace, so no hint can carry an
//! older value past a purge either.
//!
//! A tombstone's age is the physical part of its version (see
//! [`crate::clock`]): the grace exceeds twice the clock-skew bound, so any
//! write that begins after a purge is stamped above the tombstone whichever
//! node coordinates it, and a replica that still holds the tombstone cannot
//! delete that write. Nodes may run with different graces: each decides
//! only for what it holds. Collection walks tombstones with a cursor, so
//! tombstones whose replica is down (skipped, retried later) never hold back
//! the others.
//!
//! Every copy is fenced: it carries the layout version its ranges were
//! listed at, and the side storing it refuses it unless it replicates the
//! key at the layout it serves, so no copy lands on a node that dropped
//! the range after a move. The same listing and push hand a range that
//! moved away to its new owners before the old owner drops it
//! (`handoff.rs`).

mod exchange;
mod gc;
pub mod handoff;
pub mod plan;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use plan::{SyncPlan, differing, plan, root, window_end};

use crate::identity::Identity;
use crate::placement::Placement;
use crate::replica::{RangeEntry, ReplicaStore};
use crate::serving::ClusterView;
use crate::workers::{RoundResult, WorkerError, more};

/// Most differing ranges repaired per peer per round.
const MAX_RANGES_PER_ROUND: usize = 4096;
/// Keys copied concurrently.
const COPY_CONCURRENCY: usize = 32;
/// Tombstones examined per round.
const MAX_GC_PER_ROUND: usize = 1000;

/// Counters reported in `NodeStats`.
#[derive(Debug, Default)]
pub struct AntiEntropyStats {
    pub exchanges: AtomicU64,
    pub in_sync: AtomicU64,
    pub keys_repaired: AtomicU64,
    pub tombstones_purged: AtomicU64,
    /// Tombstone checks skipped because a replica was believed down.
    pub tombstones_skipped: AtomicU64,
    /// Rounds completed since start.
    pub rounds: Arc<AtomicU64>,
}

/// One node's side of anti-entropy and tombstone collection.
pub struct AntiEntropy {
    /// This node's replica.
    replica: Arc<ReplicaStore>,
    /// Placement, peers, liveness, call deadline.
    cluster: Arc<ClusterView>,
    /// `--tombstone-grace`.
    grace: Duration,
    /// Counters.
    pub stats: AntiEntropyStats,
    /// Where the next tombstone collection starts (a storage key; empty:
    /// from the beginning). Std mutex: one round at a time uses it.
    gc_cursor: Mutex<Vec<u8>>,
    /// Told of every complete exchange (a replacement catches up by them).
    identity: Arc<Identity>,
}

impl AntiEntropy {
    pub fn new(
        replica: Arc<ReplicaStore>,
        cluster: Arc<ClusterView>,
        grace: Duration,
        identity: Arc<Identity>,
    ) -> Self {
        Self {
            replica,
            cluster,
            grace,
            stats: AntiEntropyStats::default(),
            gc_cursor: Mutex::default(),
            identity,
        }
    }

    /// This node's leaves for the tree it shares with `peer`.
    pub fn leaves_with(&self, view: &Placement, peer: &str) -> Vec<(usize, u64)> {
        view.shared_ranges(peer)
            .into_iter()
            .map(|range| (range, self.replica.range_digest(range)))
            .collect()
    }

    fn collectable(&self, now_ms: u64) -> impl Fn(&RangeEntry) -> bool + use<> {
        let grace_ms = self.grace.as_millis() as u64;
        move |entry: &RangeEntry| {
            entry.tombstone
                && crate::record::tombstone_time_ms(entry.version, entry.deleted_at_ms)
                    .saturating_add(grace_ms)
                    <= now_ms
        }
    }

    /// One round: sync with every live peer, then collect old tombstones,
    /// all under one placement. The round fails when it tried exchanges
    /// and none completed (no replica it needed could be synced with), or
    /// when tombstone collection failed (it skips keys whose replicas are
    /// down, so a failure there is this node's own: its storage). Peers
    /// believed down are not asked, and one failed exchange among others
    /// that completed is only logged.
    pub async fn round(&self) -> RoundResult {
        let view = self.cluster.placement();
        if self.replica.digests_layout_version() != view.version() {
            // The digests are being recounted for a new layout.
            return Ok(());
        }
        let peers: Vec<String> = view.peers().map(|m| m.address.clone()).collect();
        let (mut tried, mut failed) = (0, Vec::new());
        for peer in peers {
            // Asked just before each exchange: a round can be long, and a
            // peer back meanwhile should not wait for the next one.
            if !self.cluster.liveness.is_up(&peer) {
                continue;
            }
            tried += 1;
            match self.exchange_with(&view, &peer).await {
                Ok(repaired) => {
                    if repaired > 0 {
                        tracing::info!(peer, repaired, "anti-entropy copied keys");
                    }
                    if let Err(why) = self.identity.synced(&peer) {
                        tracing::warn!(peer, %why, "cannot record a completed anti-entropy exchange");
                    }
                }
                Err(why) => {
                    tracing::debug!(peer, %why, "anti-entropy exchange failed");
                    failed.push(format!("{peer}: {why}"));
                }
            }
        }
        // While data moves, a tombstone's replicas are changing: wait.
        let collected = if view.is_settled() {
            self.collect_tombstones(&view).await
        } else {
            Ok(())
        };
        self.stats
            .rounds
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if tried > 0 && failed.len() == tried {
            return Err(WorkerError::new(format!(
                "no anti-entropy exchange completed ({tried} tried); {}{}",
                failed[0],
                more(tried - 1, "peer")
            )));
        }
        collected.map_err(|why| WorkerError::new(format!("tombstone collection failed: {why}")))
    }
}
