//! Hint delivery: each round offers every target's hints, oldest first, to
//! targets the failure detector sees up.

use std::sync::Arc;

use super::HintStore;
use crate::clock::{NodeId, wall_clock_ms};
use crate::cluster::Cluster;
use crate::error::{Error, Result};
use crate::net::ReplicaError;

/// Delivers held hints (run by the node every `--hint-delivery-interval-ms`).
pub struct HintDelivery {
    cluster: Arc<Cluster>,
    store: Arc<HintStore>,
}

impl HintDelivery {
    pub fn new(cluster: Arc<Cluster>, store: Arc<HintStore>) -> Self {
        Self { cluster, store }
    }

    /// Offers every target's hints; a target that cannot be reached waits
    /// for the next round.
    pub async fn round(&self) {
        for target in self.store.targets() {
            if let Err(why) = self.deliver(target).await {
                tracing::debug!(%why, "hint delivery paused");
            }
        }
    }

    /// Delivers `target`'s hints, oldest first, while it can be reached.
    /// A hint the target rejects (INVALID_ARGUMENT: say a value over its
    /// `--max-value-bytes`) is dropped with a log line, so it does not block
    /// the hints behind it; anti-entropy repairs what it carried. A target
    /// that fails or times out pauses delivery until the next round.
    async fn deliver(&self, target: NodeId) -> Result<()> {
        let view = self.cluster.placement();
        let Some(member) = view.ring().member(target) else {
            // Not a member any more: nobody to deliver to.
            let dropped = self.store.drop_target(target)?;
            tracing::info!(
                target,
                dropped,
                "dropped the hints of a node that is not a member"
            );
            return Ok(());
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
                match replica.write(&hint.key, &hint.record, timeout).await {
                    Ok(_) => self.store.remove(&stored, true),
                    Err(ReplicaError::Rejected(why)) => {
                        tracing::warn!(
                            replica = %member.address,
                            key = %hint.key,
                            version = %hint.record.version,
                            %why,
                            "dropping a hint its replica rejects; anti-entropy will repair the replica"
                        );
                        self.store.remove(&stored, false)
                    }
                    Err(ReplicaError::Failed(why)) => {
                        return Err(Error::Unavailable(format!("{}: {why}", member.address)));
                    }
                }?;
            }
        }
    }
}
