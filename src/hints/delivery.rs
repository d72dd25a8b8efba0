//! Hint delivery: each round offers every target's hints, oldest first, to
//! targets the failure detector sees up.
//!
//! A hint is delivered as a copy placed with the layout this node serves:
//! the target refuses it if it serves a newer layout (this node then
//! catches up, and the hint waits for the next round) or does not
//! replicate the key at its layout. A hint whose key moved away from its
//! target goes to every replica the key has now instead; until all of
//! them hold it, it is kept. So a hint never lands on a node that dropped
//! the key's range after a move. The hints of a node that left or was
//! removed go the same way.

use std::sync::Arc;

use super::HintStore;
use crate::clock::wall_clock_ms;
use crate::error::{Error, Result};
use crate::net::ReplicaError;
use crate::ring::MemberId;
use crate::serving::ClusterView;
use crate::workers::{RoundResult, WorkerError, more};

/// Delivers held hints (run by the node every `--hint-delivery-interval-ms`).
pub struct HintDelivery {
    cluster: Arc<ClusterView>,
    store: Arc<HintStore>,
}

impl HintDelivery {
    pub fn new(cluster: Arc<ClusterView>, store: Arc<HintStore>) -> Self {
        Self { cluster, store }
    }

    /// Offers every target's hints; a target that cannot be reached waits
    /// for the next round. The round fails when the hint store could not
    /// be read or written (any error but UNAVAILABLE, which is a target's
    /// or a replica's: delivery to it just pauses); every target is still
    /// offered its hints.
    pub async fn round(&self) -> RoundResult {
        let mut failed = Vec::new();
        for target in self.store.targets() {
            match self.deliver(target).await {
                Ok(()) => {}
                Err(Error::Unavailable(why)) => tracing::debug!(%why, "hint delivery paused"),
                Err(why) => failed.push(format!("hints for node {target}: {why}")),
            }
        }
        match failed.first() {
            None => Ok(()),
            Some(first) => Err(WorkerError::new(format!(
                "{first}{}",
                more(failed.len() - 1, "target")
            ))),
        }
    }

    /// Delivers `target`'s hints, oldest first, while it can be reached.
    /// A hint the target rejects (INVALID_ARGUMENT: say a value over its
    /// `--max-value-bytes`) is dropped with a log line, so it does not block
    /// the hints behind it; anti-entropy repairs what it carried. A target
    /// that fails or times out pauses delivery until the next round.
    async fn deliver(&self, target: MemberId) -> Result<()> {
        let view = self.cluster.placement();
        // Every member, joining ones too (they get writes, so hints).
        let Some(member) = view
            .members()
            .iter()
            .find(|m| m.member_id == target)
            .cloned()
        else {
            // Not a member any more (it left or was removed): its hints go
            // to the replicas their keys have now.
            return self.hand_over(target).await;
        };
        if !self.cluster.liveness.is_up(&member.address) {
            return Ok(());
        }
        let replica = self.cluster.peers.replica_handle(&member.address, None)?;
        let timeout = self.cluster.rpc_timeout;
        loop {
            let batch = self.store.for_target(target, 256, wall_clock_ms())?;
            if batch.is_empty() {
                return Ok(());
            }
            for stored in batch {
                let hint = &stored.hint;
                let view = self.cluster.placement();
                // A target that is not among the replicas the key moves to
                // (or has) may drop the record once the move settles.
                let stays = view
                    .target_replicas_of(&hint.key)
                    .iter()
                    .any(|m| m.address == member.address);
                if !stays {
                    // The key moved, or is moving, away from the target:
                    // give the record to every replica it has now instead.
                    self.retarget(&view, &hint.key, &hint.record).await?;
                    self.store.remove(&stored, true)?;
                    continue;
                }
                let mut replica = replica.clone();
                replica.layout_version = view.version();
                match replica.write_copy(&hint.key, &hint.record, timeout).await {
                    Ok(_) => self.store.remove(&stored, true),
                    Err(ReplicaError::Rejected(why)) => {
                        tracing::warn!(
                            replica = %member.address,
                            key_hash = %crate::metrics::key_hash(&hint.key),
                            version = %hint.record.version,
                            %why,
                            "dropping a hint its replica rejects; anti-entropy will repair the replica"
                        );
                        self.store.remove(&stored, false)
                    }
                    Err(ReplicaError::Failed(why)) => {
                        return Err(Error::Unavailable(format!("{}: {why}", member.address)));
                    }
                    Err(ReplicaError::StaleLayout(v)) => {
                        self.cluster.catch_up(v, &member.address).await;
                        return Err(Error::Unavailable(format!(
                            "{} serves newer layout v{v}",
                            member.address
                        )));
                    }
                }?;
            }
        }
    }

    /// Gives the hints of `target`, no longer a member, to every replica
    /// each key has now; a hint is kept until they all hold it.
    async fn hand_over(&self, target: MemberId) -> Result<()> {
        let mut handed = 0u64;
        loop {
            let batch = self.store.for_target(target, 256, wall_clock_ms())?;
            if batch.is_empty() {
                break;
            }
            for stored in batch {
                let view = self.cluster.placement();
                self.retarget(&view, &stored.hint.key, &stored.hint.record)
                    .await?;
                self.store.remove(&stored, true)?;
                handed += 1;
            }
        }
        if handed > 0 {
            tracing::info!(
                replica_id = %target,
                handed,
                "gave the hints of a node that is no longer a member to the replicas its keys have now"
            );
        }
        Ok(())
    }

    /// Writes a hinted record to every replica `key` has under `view`
    /// (write-if-newer, as copies placed with `view`); fails, keeping the
    /// hint, unless all of them hold it.
    async fn retarget(
        &self,
        view: &crate::placement::Placement,
        key: &str,
        record: &crate::record::Record,
    ) -> Result<()> {
        let timeout = self.cluster.rpc_timeout;
        for member in view.write_sets(key).into_iter().flatten() {
            let mut handle = self.cluster.peers.replica_handle(&member.address, None)?;
            handle.layout_version = view.version();
            match handle.write_copy(key, record, timeout).await {
                Ok(_) => {}
                Err(why) => {
                    if let ReplicaError::StaleLayout(v) = &why {
                        self.cluster.catch_up(*v, &member.address).await;
                    }
                    return Err(Error::Unavailable(format!(
                        "re-targeted hint to {}: {why}",
                        member.address
                    )));
                }
            }
        }
        Ok(())
    }
}
