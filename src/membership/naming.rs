//! Proposing `instances named` (see [`crate::layout::naming`]).
//!
//! Every node runs [`Membership::naming_step`] each membership round. The
//! first member by address that this node believes up, and that votes as
//! the instance it is, proposes; a member whose own instance is not the
//! one the layout names never proposes its own naming. A peer's instance
//! is the one that answered this process's heartbeats with its read gate
//! open: a replacement is named once it has caught up, and an instance
//! recorded before a restart (perhaps replaced since) is never named.

use std::time::Duration;

use tokio::time::Instant;

use super::Membership;
use crate::clock::InstanceId;
use crate::heartbeat::Heartbeats;
use crate::layout::Role;

/// How long the first naming waits for every first member to be seen
/// before it names those that are (the others are named when they come).
pub const FIRST_NAMING_GRACE: Duration = Duration::from_secs(30);

/// When this node's membership started (the grace period counts from it).
pub(super) struct Naming {
    started: Instant,
}

impl Default for Naming {
    fn default() -> Self {
        Self {
            started: Instant::now(),
        }
    }
}

impl Membership {
    /// Proposes naming the instances this node knows at the active
    /// members' addresses, when the layout names others (or none) and this
    /// node is the one to propose. Nothing while a change is in progress,
    /// before the cluster id is agreed, or when this node does not vote.
    pub(super) async fn naming_step(&self, heartbeats: &Heartbeats) {
        let layout = self.layout();
        let me = &self.me;
        if !layout.is_settled()
            || !self.is_agreed()
            || !layout.votes_as(&me.address, me.instance_id)
        {
            return;
        }
        let seen: Vec<(String, InstanceId)> = layout
            .members
            .iter()
            .filter(|m| m.role == Role::Active)
            .map(|m| {
                let instance = if m.address == me.address {
                    me.instance_id
                } else {
                    heartbeats.serving_instance(&m.address)
                };
                (m.address.clone(), instance)
            })
            .collect();
        let grace_over = self.naming.started.elapsed() >= FIRST_NAMING_GRACE;
        let names = layout.instances_to_name(&seen, grace_over);
        if names.is_empty() {
            return;
        }
        // The proposer: the first member up (by address) that is not
        // being renamed, so never the new instance itself.
        let proposer = layout
            .members
            .iter()
            .filter(|m| m.role == Role::Active)
            .filter(|m| {
                !names
                    .iter()
                    .any(|(a, _)| *a == m.address && !m.instance_id.is_none())
            })
            .find(|m| m.address == me.address || self.cluster.liveness.is_up(&m.address));
        if proposer.is_none_or(|m| m.address != me.address) {
            return;
        }
        match self
            .propose(
                |l| l.name_instances(&names),
                |l| l.instances_to_name(&seen, grace_over).is_empty(),
            )
            .await
        {
            Ok(named) => tracing::info!(
                version = named.version,
                named = ?names.iter().map(|(a, i)| format!("{a}={i}")).collect::<Vec<_>>(),
                "instances named: each votes as the instance its layout names"
            ),
            Err(why) => tracing::debug!(%why, "cannot name instances yet; will retry"),
        }
    }
}
