//! One anti-entropy exchange with a peer: compare roots, then leaves, then
//! list each differing range on both sides and copy what differs, through
//! write-if-newer.

use std::sync::atomic::Ordering;

use super::{AntiEntropy, COPY_CONCURRENCY, MAX_RANGES_PER_ROUND, differing, plan, root};
use crate::clock::wall_clock_ms;
use crate::error::{Error, Result};
use crate::net::call_within;
use crate::pb;
use crate::placement::Placement;
use crate::replica::RangeEntry;

use super::SyncPlan;

impl AntiEntropy {
    /// Compares the tree shared with `peer` and copies what differs.
    /// Answers how many keys were copied; an error when any part of the
    /// exchange failed (after doing the rest), so only a complete exchange
    /// counts as one.
    pub async fn sync_with(&self, view: &Placement, peer: &str) -> Result<u64> {
        self.stats.exchanges.fetch_add(1, Ordering::Relaxed);
        let mine = self.leaves_with(view, peer);
        let mut client = self.cluster.peers.replica_client(peer)?;
        let range_count = view.range_count() as u32;
        let layout_version = view.version();
        let request = |leaves| pb::RangeDigestsRequest {
            peer: view.me().to_string(),
            leaves,
            range_count,
            layout_version,
        };
        let their_root = call_within(
            self.cluster.rpc_timeout,
            client.range_digests(request(false)),
        )
        .await?
        .root;
        if their_root == root(&mine) {
            self.stats.in_sync.fetch_add(1, Ordering::Relaxed);
            return Ok(0);
        }
        let theirs: Vec<(usize, u64)> = call_within(
            self.cluster.rpc_timeout,
            client.range_digests(request(true)),
        )
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
            return Err(Error::Unavailable(format!(
                "{incomplete} differing ranges not fully synced ({repaired} keys copied)"
            )));
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
    ) -> Result<u64> {
        let entries = pb::RangeEntriesRequest {
            range: range as u32,
            range_count,
            layout_version: self.cluster.placement().version(),
        };
        let listed = call_within(self.cluster.rpc_timeout, client.range_entries(entries))
            .await?
            .entries;
        let listed_count = listed.len();
        // An entry beyond the skew bound is neither pulled nor answered with
        // a push: the peer must not spread it.
        let bound = self.cluster.peers.skew_bound();
        let their_entries: Vec<RangeEntry> = listed
            .into_iter()
            .filter_map(|e| pb::range_entry_from(e, bound).ok())
            .collect();
        let my_entries = self.replica.range_entries(range)?;
        let plan = plan(
            &my_entries,
            &their_entries,
            self.collectable(wall_clock_ms()),
        );
        // Digests differ but the listings agree: this node's digest of the
        // range is off (a recount raced a write): count it again.
        if plan.pull.is_empty() && plan.push.is_empty() {
            let replica = self.replica.clone();
            crate::seams::blocking(move || replica.recount_range(range))
                .await
                .map_err(|e| Error::Internal(format!("range recount: {e}")))??;
        }
        let copied = self.copy(peer, plan).await?;
        let refused = listed_count - their_entries.len();
        if refused > 0 {
            // Not a complete exchange: a replacement must not count it.
            return Err(Error::Unavailable(format!(
                "{refused} of the peer's entries were beyond --max-clock-skew-ms and not copied"
            )));
        }
        Ok(copied)
    }

    async fn copy(&self, peer: &str, plan: SyncPlan) -> Result<u64> {
        let remote = self.cluster.peers.replica_handle(peer, None)?;
        let mut copied = 0;
        let mut failed: Vec<String> = Vec::new();
        for chunk in plan.pull.chunks(COPY_CONCURRENCY) {
            let reads = chunk
                .iter()
                .map(|key| remote.read_for_repair(key, self.cluster.rpc_timeout));
            for (key, result) in chunk.iter().zip(futures::future::join_all(reads).await) {
                match result {
                    Ok(Some(record)) => {
                        if self.replica.write_if_newer(key, &record)?.applied {
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
                if let Some(record) = self.replica.read(key)? {
                    let remote = &remote;
                    writes.push(async move {
                        remote.write(key, &record, self.cluster.rpc_timeout).await
                    });
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
            return Err(Error::Unavailable(format!(
                "{} of the keys to copy failed ({copied} copied), e.g. {first}",
                failed.len()
            )));
        }
        Ok(copied)
    }
}
