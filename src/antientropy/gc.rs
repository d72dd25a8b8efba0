//! Tombstone collection: a tombstone past `--tombstone-grace` is purged once
//! every replica of its key holds it (or nothing), walking tombstones with a
//! cursor so that ones whose replica is down never hold back the rest.

use std::sync::atomic::Ordering;

use super::{AntiEntropy, MAX_GC_PER_ROUND};
use crate::clock::wall_clock_ms;
use crate::error::Result;
use crate::placement::Placement;
use crate::sync::Locked;

impl AntiEntropy {
    /// Purges tombstones past their grace that every replica of their key
    /// holds (or has already purged).
    pub async fn collect_tombstones(&self, view: &Placement) -> Result<()> {
        let deadline = wall_clock_ms().saturating_sub(self.grace.as_millis() as u64);
        let cursor = self.gc_cursor.locked().clone();
        let (candidates, next_cursor) =
            self.replica
                .old_tombstones(deadline, &cursor, MAX_GC_PER_ROUND)?;
        *self.gc_cursor.locked() = next_cursor;
        for (key, version) in candidates {
            let others: Vec<String> = view
                .replicas_of(&key)
                .into_iter()
                .filter(|m| !view.is_me(&m.address))
                .map(|m| m.address.clone())
                .collect();
            // A replica believed down cannot confirm: skip the key this round
            // instead of waiting for its timeout.
            if others
                .iter()
                .any(|address| !self.cluster.liveness.is_up(address))
            {
                self.stats
                    .tombstones_skipped
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let mut checks = Vec::new();
            for address in &others {
                let mut handle = self.cluster.peers.replica_handle(address, None)?;
                // A replica serving a newer layout refuses: skip the purge.
                handle.layout_version = view.version();
                let key = &key;
                checks.push(async move { handle.read(key, self.cluster.rpc_timeout).await });
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
            if everyone_agrees && self.replica.purge_tombstone(&key, version)? {
                self.stats.tombstones_purged.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }
}
