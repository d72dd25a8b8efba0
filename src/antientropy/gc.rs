//! Tombstone collection: a tombstone past `--tombstone-grace` is purged once
//! every replica of its key holds it (or nothing), walking tombstones with a
//! cursor so that ones whose replica is down never hold back the rest.

use std::sync::atomic::Ordering;

use super::{AntiEntropy, MAX_GC_PER_ROUND};
use crate::clock::{Version, wall_clock_ms};
use crate::error::Result;
use crate::fanout::{Ended, FanOut, Stragglers, Tally};
use crate::locks::Locked;
use crate::net::ReplicaError;
use crate::placement::Placement;
use crate::record::Record;

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
            let mut checks = FanOut::new(Stragglers::Abandon);
            for (index, address) in others.iter().enumerate() {
                let mut handle = self.cluster.peers.replica_handle(address, None)?;
                // A replica serving a newer layout refuses: skip the purge.
                handle.layout_version = view.version();
                let (key, timeout) = (key.clone(), self.cluster.rpc_timeout);
                checks.send(index, async move { handle.read(&key, timeout).await });
            }
            let mut check = PurgeCheck {
                tombstone: version,
                asked: others.len(),
                agreed: 0,
                refused: false,
            };
            let everyone_agrees =
                matches!(checks.collect(&mut check, None).await, Ended::Decided(true));
            if everyone_agrees && self.replica.purge_tombstone(&key, version)? {
                self.stats.tombstones_purged.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }
}

/// Whether every other replica of a tombstone's key holds it (or something
/// newer, or has purged it): one that does not, or cannot say, keeps it.
struct PurgeCheck {
    tombstone: Version,
    asked: usize,
    agreed: usize,
    refused: bool,
}

impl Tally<Result<Option<Record>, ReplicaError>> for PurgeCheck {
    type Verdict = bool;

    fn record(&mut self, _index: usize, reply: Result<Option<Record>, ReplicaError>) {
        match reply {
            Ok(None) => self.agreed += 1,
            Ok(Some(held)) if held.version >= self.tombstone => self.agreed += 1,
            Ok(Some(_)) | Err(_) => self.refused = true,
        }
    }

    /// Decided at the first replica that does not agree.
    fn verdict(&self) -> Option<bool> {
        if self.refused {
            Some(false)
        } else {
            (self.agreed == self.asked).then_some(true)
        }
    }
}
