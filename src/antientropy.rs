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

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use xxhash_rust::xxh3::xxh3_64;

use crate::clock::{FIRST_HLC_MS, Version};
use crate::failure::FailureDetector;
use crate::hints::now_ms;
use crate::net::{PeerPool, call_within};
use crate::pb;
use crate::replica::{RangeEntry, ReplicaStore};
use crate::ring::Ring;

/// Most differing ranges repaired per peer per round.
const MAX_RANGES_PER_ROUND: usize = 4096;
/// Keys copied concurrently.
const COPY_CONCURRENCY: usize = 32;
/// Tombstones examined per round.
const MAX_GC_PER_ROUND: usize = 1000;

/// The root of a tree whose leaves are `(range, digest)` in range order.
pub fn root(leaves: &[(usize, u64)]) -> u64 {
    let mut bytes = Vec::with_capacity(leaves.len() * 12);
    for (range, digest) in leaves {
        bytes.extend_from_slice(&(*range as u32).to_le_bytes());
        bytes.extend_from_slice(&digest.to_le_bytes());
    }
    xxh3_64(&bytes)
}

/// Ranges whose digests differ (a range missing on one side differs unless
/// its digest on the other is 0, i.e. empty).
pub fn differing(mine: &[(usize, u64)], theirs: &[(usize, u64)]) -> Vec<usize> {
    let theirs: HashMap<usize, u64> = theirs.iter().copied().collect();
    let mut ranges: Vec<usize> = mine
        .iter()
        .filter(|(range, digest)| theirs.get(range).copied().unwrap_or(0) != *digest)
        .map(|(range, _)| *range)
        .collect();
    let mine: HashMap<usize, u64> = mine.iter().copied().collect();
    for (range, digest) in theirs {
        if !mine.contains_key(&range) && digest != 0 {
            ranges.push(range);
        }
    }
    ranges.sort_unstable();
    ranges.dedup();
    ranges
}

/// Keys to copy between two replicas of one range.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncPlan {
    /// Keys the peer holds newer: fetch and store here.
    pub pull: Vec<String>,
    /// Keys held newer here: send to the peer.
    pub push: Vec<String>,
}

/// Compares two listings of one range. `collectable` says whether a
/// tombstone is past its grace: such a tombstone is not copied to a side that
/// holds nothing for the key.
pub fn plan(
    mine: &[RangeEntry],
    theirs: &[RangeEntry],
    collectable: impl Fn(&RangeEntry) -> bool,
) -> SyncPlan {
    let mine_by_key: HashMap<&str, &RangeEntry> =
        mine.iter().map(|e| (e.key.as_str(), e)).collect();
    let theirs_by_key: HashMap<&str, &RangeEntry> =
        theirs.iter().map(|e| (e.key.as_str(), e)).collect();
    let mut out = SyncPlan::default();
    for their in theirs {
        match mine_by_key.get(their.key.as_str()) {
            Some(my) if my.version >= their.version => {}
            Some(_) => out.pull.push(their.key.clone()),
            None if their.tombstone && collectable(their) => {}
            None => out.pull.push(their.key.clone()),
        }
    }
    for my in mine {
        match theirs_by_key.get(my.key.as_str()) {
            Some(their) if their.version >= my.version => {}
            Some(_) => out.push.push(my.key.clone()),
            None if my.tombstone && collectable(my) => {}
            None => out.push.push(my.key.clone()),
        }
    }
    out
}

/// Counters reported in `NodeStats`.
#[derive(Debug, Default)]
pub struct AntiEntropyStats {
    pub exchanges: AtomicU64,
    pub in_sync: AtomicU64,
    pub keys_repaired: AtomicU64,
    pub tombstones_purged: AtomicU64,
    /// Tombstone checks skipped because a replica was believed down.
    pub tombstones_skipped: AtomicU64,
}

/// When a tombstone was made, for its grace: the physical part of its
/// version; `deleted_at_ms` only for versions from before the HLC.
pub fn tombstone_time_ms(version: Version, deleted_at_ms: u64) -> u64 {
    let physical = version.physical_ms();
    if physical >= FIRST_HLC_MS {
        physical
    } else {
        deleted_at_ms
    }
}

/// One node's side of anti-entropy and tombstone collection.
pub struct AntiEntropy {
    /// This node's replica.
    pub replica: Arc<ReplicaStore>,
    /// The shared ring.
    pub ring: Arc<Ring>,
    /// This node's address.
    pub me: String,
    /// Replicas per key, N.
    pub replicas: usize,
    /// Channels to peers.
    pub peers: Arc<PeerPool>,
    /// Who is believed down.
    pub liveness: Arc<Mutex<FailureDetector>>,
    /// Deadline of each call.
    pub rpc_timeout: Duration,
    /// `--tombstone-grace`.
    pub grace: Duration,
    /// Counters.
    pub stats: Arc<AntiEntropyStats>,
    /// Where the next tombstone collection starts (a storage key; empty:
    /// from the beginning). Std mutex: one round at a time uses it.
    pub gc_cursor: Mutex<Vec<u8>>,
    /// Told of every complete exchange (a replacement catches up by them).
    pub identity: Arc<crate::identity::Identity>,
}

impl AntiEntropy {
    /// This node's leaves for the tree it shares with `peer`.
    pub fn leaves_with(&self, peer: &str) -> Vec<(usize, u64)> {
        self.ring
            .shared_ranges(&self.me, peer, self.replicas)
            .into_iter()
            .map(|range| (range, self.replica.range_digest(range)))
            .collect()
    }

    fn collectable(&self, now_ms: u64) -> impl Fn(&RangeEntry) -> bool + use<> {
        let grace_ms = self.grace.as_millis() as u64;
        move |entry: &RangeEntry| {
            entry.tombstone
                && tombstone_time_ms(entry.version, entry.deleted_at_ms).saturating_add(grace_ms)
                    <= now_ms
        }
    }

    fn is_up(&self, address: &str) -> bool {
        self.liveness
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_up(address, Instant::now())
    }

    /// One round: sync with every live peer, then collect old tombstones.
    pub async fn round(&self) {
        let peers: Vec<String> = self
            .ring
            .members()
            .iter()
            .filter(|m| m.address != self.me)
            .map(|m| m.address.clone())
            .collect();
        for peer in peers {
            if !self.is_up(&peer) {
                continue;
            }
            match self.sync_with(&peer).await {
                Ok(repaired) => {
                    if repaired > 0 {
                        tracing::info!(peer, repaired, "anti-entropy copied keys");
                    }
                    if let Err(why) = self.identity.synced(&peer) {
                        tracing::warn!(peer, %why, "cannot record a completed anti-entropy exchange");
                    }
                }
                Err(why) => tracing::debug!(peer, %why, "anti-entropy exchange failed"),
            }
        }
        if let Err(why) = self.collect_tombstones().await {
            tracing::debug!(%why, "tombstone collection failed");
        }
    }

    /// Compares the tree shared with `peer` and copies what differs.
    /// Answers how many keys were copied; an error when any part of the
    /// exchange failed (after doing the rest), so only a complete exchange
    /// counts as one.
    pub async fn sync_with(&self, peer: &str) -> Result<u64, String> {
        self.stats.exchanges.fetch_add(1, Ordering::Relaxed);
        let mine = self.leaves_with(peer);
        let mut client = self.peers.replica_client(peer).map_err(|e| e.to_string())?;
        let range_count = self.ring.range_count() as u32;
        let request = |leaves| pb::RangeDigestsRequest {
            peer: self.me.clone(),
            leaves,
            range_count,
        };
        let their_root = call_within(self.rpc_timeout, client.range_digests(request(false)))
            .await?
            .root;
        if their_root == root(&mine) {
            self.stats.in_sync.fetch_add(1, Ordering::Relaxed);
            return Ok(0);
        }
        let theirs: Vec<(usize, u64)> =
            call_within(self.rpc_timeout, client.range_digests(request(true)))
                .await?
                .leaves
                .into_iter()
                .map(|leaf| (leaf.range as usize, leaf.digest))
                .collect();
        let mut repaired = 0;
        let differing = differing(&mine, &theirs);
        let mut incomplete = differing.len().saturating_sub(MAX_RANGES_PER_ROUND);
        for range in differing.into_iter().take(MAX_RANGES_PER_ROUND) {
            // One failing range (too large, timed out) must not stop the others.
            match self.sync_range(&mut client, peer, range, range_count).await {
                Ok(copied) => repaired += copied,
                Err(why) => {
                    incomplete += 1;
                    tracing::debug!(peer, range, %why, "anti-entropy skipped a range");
                }
            }
        }
        self.stats
            .keys_repaired
            .fetch_add(repaired, Ordering::Relaxed);
        if incomplete > 0 {
            return Err(format!(
                "{incomplete} differing ranges not fully synced ({repaired} keys copied)"
            ));
        }
        Ok(repaired)
    }

    /// Lists one differing range on both sides and copies what differs.
    async fn sync_range(
        &self,
        client: &mut pb::replica_client::ReplicaClient<tonic::transport::Channel>,
        peer: &str,
        range: usize,
        range_count: u32,
    ) -> Result<u64, String> {
        let entries = pb::RangeEntriesRequest {
            range: range as u32,
            range_count,
        };
        let listed = call_within(self.rpc_timeout, client.range_entries(entries))
            .await?
            .entries;
        let listed_count = listed.len();
        let their_entries: Vec<RangeEntry> = listed
            .into_iter()
            .filter_map(|e| {
                // An entry beyond the skew bound is neither pulled nor
                // answered with a push: the peer must not spread it.
                let version =
                    pb::version_from(e.version, self.peers.skew_bound(), "entry version").ok()?;
                Some(RangeEntry {
                    key: e.key,
                    version,
                    tombstone: e.tombstone,
                    deleted_at_ms: e.deleted_at_ms,
                })
            })
            .collect();
        let my_entries = self
            .replica
            .range_entries(range)
            .map_err(|e| e.to_string())?;
        let plan = plan(&my_entries, &their_entries, self.collectable(now_ms()));
        let copied = self.copy(peer, plan).await?;
        let refused = listed_count - their_entries.len();
        if refused > 0 {
            // Not a complete exchange: a replacement must not count it.
            return Err(format!(
                "{refused} of the peer's entries were beyond --max-clock-skew-ms and not copied"
            ));
        }
        Ok(copied)
    }

    async fn copy(&self, peer: &str, plan: SyncPlan) -> Result<u64, String> {
        let remote = self
            .peers
            .replica_handle(peer, None)
            .map_err(|e| e.to_string())?;
        let mut copied = 0;
        let mut failed: Vec<String> = Vec::new();
        for chunk in plan.pull.chunks(COPY_CONCURRENCY) {
            let reads = chunk
                .iter()
                .map(|key| remote.read_for_repair(key, self.rpc_timeout));
            for (key, result) in chunk.iter().zip(futures::future::join_all(reads).await) {
                match result {
                    Ok(Some(record)) => {
                        if self
                            .replica
                            .write_if_newer(key, &record)
                            .map_err(|e| e.to_string())?
                            .applied
                        {
                            copied += 1;
                        }
                    }
                    Ok(None) => {}
                    Err(why) => failed.push(format!("{key}: {why}")),
                }
            }
        }
        for chunk in plan.push.chunks(COPY_CONCURRENCY) {
            let mut writes = Vec::new();
            for key in chunk {
                if let Some(record) = self.replica.read(key).map_err(|e| e.to_string())? {
                    let remote = &remote;
                    writes.push(async move { remote.write(key, &record, self.rpc_timeout).await });
                }
            }
            for result in futures::future::join_all(writes).await {
                match result {
                    Ok(outcome) if outcome.applied => copied += 1,
                    Ok(_) => {}
                    Err(why) => failed.push(why.to_string()),
                }
            }
        }
        if let Some(first) = failed.first() {
            return Err(format!(
                "{} of the keys to copy failed ({copied} copied), e.g. {first}",
                failed.len()
            ));
        }
        Ok(copied)
    }

    /// Purges tombstones past their grace that every replica of their key
    /// holds (or has already purged).
    pub async fn collect_tombstones(&self) -> Result<(), String> {
        let deadline = now_ms().saturating_sub(self.grace.as_millis() as u64);
        let cursor = self
            .gc_cursor
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let (candidates, next_cursor) = self
            .replica
            .old_tombstones(deadline, &cursor, MAX_GC_PER_ROUND)
            .map_err(|e| e.to_string())?;
        *self.gc_cursor.lock().unwrap_or_else(|p| p.into_inner()) = next_cursor;
        for (key, version) in candidates {
            let others: Vec<String> = self
                .ring
                .preference_list(key.as_bytes(), self.replicas)
                .into_iter()
                .filter(|m| m.address != self.me)
                .map(|m| m.address.clone())
                .collect();
            // A replica believed down cannot confirm: skip the key this round
            // instead of waiting for its timeout.
            if others.iter().any(|address| !self.is_up(address)) {
                self.stats
                    .tombstones_skipped
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let mut checks = Vec::new();
            for address in &others {
                let handle = self
                    .peers
                    .replica_handle(address, None)
                    .map_err(|e| e.to_string())?;
                let key = &key;
                checks.push(async move { handle.read(key, self.rpc_timeout).await });
            }
            let everyone_agrees =
                futures::future::join_all(checks)
                    .await
                    .into_iter()
                    .all(|answer| match answer {
                        Ok(None) => true,
                        Ok(Some(held)) => held.version >= version,
                        Err(_) => false,
                    });
            if everyone_agrees
                && self
                    .replica
                    .purge_tombstone(&key, version)
                    .map_err(|e| e.to_string())?
            {
                self.stats.tombstones_purged.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Version;

    fn entry(key: &str, lamport: u64, tombstone: bool, deleted_at_ms: u64) -> RangeEntry {
        RangeEntry {
            key: key.into(),
            version: Version::new(lamport, 1),
            tombstone,
            deleted_at_ms,
        }
    }

    #[test]
    fn equal_trees_have_equal_roots_and_no_differing_ranges() {
        let leaves = vec![(1, 11), (4, 44), (9, 0)];
        assert_eq!(root(&leaves), root(&leaves.clone()));
        assert_ne!(root(&leaves), root(&[(1, 11), (4, 45), (9, 0)]));
        assert!(differing(&leaves, &leaves).is_empty());
        assert_eq!(differing(&leaves, &[(1, 11), (4, 40), (9, 0)]), vec![4]);
        // An empty range equals a missing one.
        assert!(differing(&[(1, 11), (9, 0)], &[(1, 11)]).is_empty());
        assert_eq!(differing(&[(1, 11)], &[(1, 11), (5, 3)]), vec![5]);
    }

    #[test]
    fn plan_pulls_newer_and_missing_and_pushes_the_rest() {
        let mine = vec![
            entry("a", 1, false, 0),
            entry("b", 5, false, 0),
            entry("only-mine", 1, false, 0),
        ];
        let theirs = vec![
            entry("a", 2, false, 0),
            entry("b", 4, false, 0),
            entry("only-theirs", 1, false, 0),
        ];
        let plan = plan(&mine, &theirs, |_| false);
        assert_eq!(plan.pull, ["a", "only-theirs"]);
        assert_eq!(plan.push, ["b", "only-mine"]);
    }

    #[test]
    fn collectable_tombstones_are_not_handed_to_a_side_that_holds_nothing() {
        let old = |e: &RangeEntry| e.tombstone && e.deleted_at_ms < 100;
        let theirs = vec![entry("gone", 3, true, 10)];
        assert_eq!(plan(&[], &theirs, old), SyncPlan::default());
        assert_eq!(plan(&theirs, &[], old), SyncPlan::default());
        // ...but do overwrite an older value, or the key would come back.
        let mine = vec![entry("gone", 1, false, 0)];
        assert_eq!(plan(&mine, &theirs, old).pull, ["gone"]);
        // A recent tombstone is copied like any record.
        let fresh = vec![entry("new", 3, true, 500)];
        assert_eq!(plan(&[], &fresh, old).pull, ["new"]);
    }
}
