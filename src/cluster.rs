//! What the parts of a node that talk to other nodes share: the placement
//! (one swappable view of the ring, N and this node), channels to peers,
//! the failure detector, and the deadline of each node-to-node call.
//!
//! The coordinator, hinted handoff, anti-entropy and heartbeats each hold
//! one `Arc<Cluster>` instead of their own copies of these.

use std::sync::Arc;
use std::time::Duration;

use crate::error::Result;
use crate::liveness::Liveness;
use crate::net::{PeerPool, ReplicaHandle};
use crate::placement::Placement;
use crate::replica::ReplicaStore;
use crate::serving::LayoutOwner;

pub struct Cluster {
    /// The layout served: where keys live (take one snapshot per request
    /// or round), and how a newer one is learned.
    pub layouts: Arc<LayoutOwner>,
    /// Channels to peers.
    pub peers: Arc<PeerPool>,
    /// Which peers are believed down.
    pub liveness: Liveness,
    /// Deadline of each call to a peer (`--rpc-timeout-ms`).
    pub rpc_timeout: Duration,
}

/// A write's replicas: the union of its replica sets, and each set as
/// indices into it.
pub struct WriteReplicas {
    pub handles: Vec<ReplicaHandle>,
    pub sets: Vec<Vec<usize>>,
}

impl Cluster {
    pub fn new(
        layouts: Arc<LayoutOwner>,
        peers: Arc<PeerPool>,
        liveness: Liveness,
        rpc_timeout: Duration,
    ) -> Self {
        Self {
            layouts,
            peers,
            liveness,
            rpc_timeout,
        }
    }

    /// The placement now (see [`LayoutOwner::placement`]).
    pub fn placement(&self) -> Arc<Placement> {
        self.layouts.placement()
    }

    /// Makes this node serve at least layout `version`, fetched from
    /// `from`, before a request placed with an older one is retried.
    pub async fn catch_up(&self, version: u64, from: &str) {
        // Boxed: rare, and its fetches would otherwise make every request's
        // future (which holds it inline) several kilobytes larger.
        Box::pin(self.layouts.catch_up(version, from)).await
    }

    /// Handles to every replica a write of `key` must reach under `view`.
    pub fn write_replicas(
        &self,
        view: &Placement,
        key: &str,
        local: &Arc<ReplicaStore>,
    ) -> Result<WriteReplicas> {
        let sets = view.write_sets(key);
        let mut union: Vec<&crate::ring::Member> = Vec::new();
        let mut indices = Vec::with_capacity(sets.len());
        for set in &sets {
            let mut own = Vec::with_capacity(set.len());
            for member in set {
                let index = match union.iter().position(|m| m.address == member.address) {
                    Some(index) => index,
                    None => {
                        union.push(member);
                        union.len() - 1
                    }
                };
                own.push(index);
            }
            indices.push(own);
        }
        Ok(WriteReplicas {
            handles: self.handles_for(view, union, local)?,
            sets: indices,
        })
    }

    /// Handles to `key`'s N replicas under `view`, this node's own store
    /// (`local`) in-process; a replica the detector believes down is marked
    /// so that quorum calls do not wait for it.
    pub fn replica_handles(
        &self,
        view: &Placement,
        key: &str,
        local: &Arc<ReplicaStore>,
    ) -> Result<Vec<ReplicaHandle>> {
        self.handles_for(view, view.replicas_of(key), local)
    }

    fn handles_for(
        &self,
        view: &Placement,
        members: Vec<&crate::ring::Member>,
        local: &Arc<ReplicaStore>,
    ) -> Result<Vec<ReplicaHandle>> {
        let healths = self
            .liveness
            .healths(members.iter().map(|m| m.address.as_str()));
        members
            .into_iter()
            .zip(healths)
            .map(|(member, health)| {
                let local = view.is_me(&member.address).then_some(local);
                let mut handle = self.peers.replica_handle(&member.address, local)?;
                handle.layout_version = view.version();
                if !health.up {
                    handle.believed_down = Some(format!(
                        "believed down by the failure detector (phi {:.1}{})",
                        health.phi,
                        health
                            .last_error
                            .map(|e| format!("; last heartbeat: {e}"))
                            .unwrap_or_default()
                    ));
                }
                Ok(handle)
            })
            .collect()
    }
}
