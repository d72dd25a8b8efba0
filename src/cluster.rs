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
use crate::placement::{Placement, SharedPlacement};
use crate::replica::ReplicaStore;

pub struct Cluster {
    /// Where keys live; take one snapshot per request or round.
    pub placement: SharedPlacement,
    /// Channels to peers.
    pub peers: Arc<PeerPool>,
    /// Which peers are believed down.
    pub liveness: Liveness,
    /// Deadline of each call to a peer (`--rpc-timeout-ms`).
    pub rpc_timeout: Duration,
}

impl Cluster {
    /// The placement now (see [`SharedPlacement::snapshot`]).
    pub fn placement(&self) -> Arc<Placement> {
        self.placement.snapshot()
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
        let members = view.replicas_of(key);
        let healths = self
            .liveness
            .healths(members.iter().map(|m| m.address.as_str()));
        members
            .into_iter()
            .zip(healths)
            .map(|(member, health)| {
                let local = view.is_me(&member.address).then_some(local);
                let mut handle = self.peers.replica_handle(&member.address, local)?;
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
