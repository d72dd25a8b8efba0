//! Proposing `instances named` (see [`crate::layout::naming`]).
//!
//! Every node runs [`Membership::naming_step`] each membership round. The
//! first member by address that this node believes up, and that votes as
//! the instance it is, proposes; a member whose own instance is not the
//! one the layout names never proposes its own naming, nor does a node
//! still catching up. A peer's instance is the one that answered this
//! process's heartbeats in the last few intervals: a replacement is named
//! on its first answers (it votes with a fresh acceptor from the next
//! version on; its read gate still keeps its empty answers out of read
//! quorums until it caught up), and an instance recorded before a restart
//! or one that stopped answering (perhaps replaced since) is never named.

use std::time::Duration;

use tokio::time::Instant;

use super::Membership;
use crate::clock::InstanceId;
use crate::heartbeat::Heartbeats;
use crate::layout::{Layout, Refusal, Role};

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
    /// Proposes naming the instances that answer at the active members'
    /// addresses, when the layout names others (or none) and this node is
    /// the one to propose. Nothing while a change is in progress, before
    /// the cluster id is agreed, while this node catches up (a new data
    /// dir, or a peer serves a newer layout), or when it does not vote.
    pub(super) async fn naming_step(&self, heartbeats: &Heartbeats) {
        let layout = self.layout();
        if !layout.is_settled()
            || !self.is_agreed()
            || self.replica.read_refusal().is_some()
            || heartbeats.newest_layout_reported(layout.version).is_some()
        {
            return;
        }
        let grace_over = self.naming.started.elapsed() >= FIRST_NAMING_GRACE;
        let names = self.names_due(&layout, heartbeats, grace_over);
        if names.is_empty() || !self.proposes_naming(&layout, &names) {
            return;
        }
        // Each attempt looks again, on the layout it changes, at who
        // answers now: a layout another node committed meanwhile, or an
        // instance that stopped answering, is never renamed from what was
        // seen before.
        match self
            .propose(
                |l| {
                    let names = self.names_due(l, heartbeats, grace_over);
                    if !self.proposes_naming(l, &names) {
                        return Err(Refusal::Invalid(format!(
                            "layout v{}: this node no longer proposes the naming",
                            l.version
                        )));
                    }
                    l.name_instances(&names)
                },
                |l| self.names_due(l, heartbeats, grace_over).is_empty(),
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

    /// What `layout` should name, from the instances that answered this
    /// node's heartbeats lately (this node: its own).
    fn names_due(
        &self,
        layout: &Layout,
        heartbeats: &Heartbeats,
        grace_over: bool,
    ) -> Vec<(String, InstanceId)> {
        let recent = (heartbeats.interval() * 3).max(Duration::from_secs(1));
        let seen: Vec<(String, InstanceId)> = layout
            .members
            .iter()
            .filter(|m| m.role == Role::Active)
            .map(|m| {
                let instance = if m.address == self.me.address {
                    self.me.instance_id
                } else {
                    heartbeats.answering_instance(&m.address, recent)
                };
                (m.address.clone(), instance)
            })
            .collect();
        layout.instances_to_name(&seen, grace_over)
    }

    /// Whether this node proposes `names` for `layout`: it votes as the
    /// instance it is, and it is the first active member by address that
    /// it believes up and that is not being renamed (never the new
    /// instance itself).
    fn proposes_naming(&self, layout: &Layout, names: &[(String, InstanceId)]) -> bool {
        let me = &self.me;
        if !layout.votes_as(&me.address, me.instance_id) {
            return false;
        }
        layout
            .members
            .iter()
            .filter(|m| m.role == Role::Active)
            .filter(|m| {
                !names
                    .iter()
                    .any(|(a, _)| *a == m.address && !m.instance_id.is_none())
            })
            .find(|m| m.address == me.address || self.cluster.liveness.is_up(&m.address))
            .is_some_and(|m| m.address == me.address)
    }
}
