//! Where a hint goes: the first live node clockwise beyond the key's
//! preference list, or this node (the coordinator) when none is.

use std::sync::Arc;

use super::{Hint, HintStore};
use crate::clock::wall_clock_ms;
use crate::error::Result;
use crate::placement::Placement;
use crate::record::Record;
use crate::ring::member_id_for;
use crate::serving::ClusterView;

/// Stores hints on the right node.
#[derive(Clone)]
pub struct Hinter {
    cluster: Arc<ClusterView>,
    /// This node's hint store.
    local: Arc<HintStore>,
}

impl Hinter {
    pub fn new(cluster: Arc<ClusterView>, local: Arc<HintStore>) -> Self {
        Self { cluster, local }
    }

    /// Where a hint for `key` should be kept under `view`.
    fn holder(&self, view: &Placement, key: &str) -> String {
        view.hint_candidates(key)
            .find(|m| self.cluster.liveness.is_up(&m.address))
            .map(|m| m.address.clone())
            .unwrap_or_else(|| view.me().to_string())
    }

    /// Stores a hint for `target` (a replica of `key` that missed `record`).
    pub async fn send(&self, target: &str, key: &str, record: &Record) -> Result<()> {
        let view = self.cluster.placement();
        let holder = self.holder(&view, key);
        if view.is_me(&holder) {
            let hint = Hint {
                target: member_id_for(target),
                key: key.to_string(),
                record: record.clone(),
                created_ms: wall_clock_ms(),
            };
            return self.local.store(&hint);
        }
        self.cluster
            .peers
            .store_hint(&holder, self.cluster.rpc_timeout, target, key, record)
            .await
    }

    /// [`Hinter::send`], logging a failure (anti-entropy repairs instead).
    pub async fn send_logged(&self, target: &str, key: &str, record: &Record) {
        if let Err(why) = self.send(target, key, record).await {
            tracing::warn!(replica_id = %target, key_hash = %crate::metrics::key_hash(key), %why, "could not store a hint; anti-entropy will repair the replica");
        }
    }
}
