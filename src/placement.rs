//! One shared view of where keys live: the ring, N, and this node.
//!
//! A [`Placement`] is an immutable snapshot. The coordinator, hinted handoff
//! and anti-entropy each take one snapshot when a request or a round starts
//! ([`SharedPlacement::snapshot`]) and use only that one to the end, so that
//! a membership change can swap the view ([`SharedPlacement::replace`])
//! without touching a call site and without a request seeing two rings.
//!
//! Today the view is fixed at start (from `--peers`); the membership issue
//! makes it a layout version the cluster agrees on.

use std::sync::{Arc, RwLock};

use crate::clock::NodeId;
use crate::error::{Error, Result};
use crate::ring::{Member, Ring};

/// Who this node is: its ring position (member id, from its address), the
/// instance created with its data dir (what versions carry), and the address
/// peers reach it at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeIdentity {
    pub member_id: NodeId,
    pub instance_id: NodeId,
    pub address: String,
}

/// The ring, the replication factor in effect, and this node: everything
/// that decides which nodes hold a key.
#[derive(Debug)]
pub struct Placement {
    ring: Arc<Ring>,
    /// N in effect: the requested replication factor capped at the member
    /// count.
    replicas: usize,
    /// This node's advertised address.
    me: String,
}

impl Placement {
    /// A view of `ring` from the node at `me`, with `requested` replicas per
    /// key (capped at the member count).
    pub fn new(ring: Arc<Ring>, requested: usize, me: impl Into<String>) -> Self {
        let replicas = requested.min(ring.members().len());
        Self {
            ring,
            replicas,
            me: me.into(),
        }
    }

    pub fn ring(&self) -> &Arc<Ring> {
        &self.ring
    }

    /// Replicas per key, N.
    pub fn replicas(&self) -> usize {
        self.replicas
    }

    /// This node's address.
    pub fn me(&self) -> &str {
        &self.me
    }

    pub fn is_me(&self, address: &str) -> bool {
        self.me == address
    }

    pub fn members(&self) -> &[Member] {
        self.ring.members()
    }

    pub fn is_member(&self, address: &str) -> bool {
        self.members().iter().any(|m| m.address == address)
    }

    /// Every member but this node.
    pub fn peers(&self) -> impl Iterator<Item = &Member> {
        self.members().iter().filter(|m| m.address != self.me)
    }

    /// The N replicas of `key`, in preference order.
    pub fn replicas_of(&self, key: &str) -> Vec<&Member> {
        self.ring.preference_list(key.as_bytes(), self.replicas)
    }

    /// The members after `key`'s replicas, clockwise: where a hint for one of
    /// its replicas may be kept.
    pub fn hint_candidates(&self, key: &str) -> impl Iterator<Item = &Member> {
        self.ring
            .preference_list(key.as_bytes(), self.members().len())
            .into_iter()
            .skip(self.replicas)
    }

    /// Token ranges this node and `peer` both replicate.
    pub fn shared_ranges(&self, peer: &str) -> Vec<usize> {
        self.ring.shared_ranges(&self.me, peer, self.replicas)
    }

    /// Peers this node shares at least one range with.
    pub fn sharing_peers(&self) -> impl Iterator<Item = &Member> {
        self.peers()
            .filter(|m| !self.shared_ranges(&m.address).is_empty())
    }

    pub fn range_count(&self) -> usize {
        self.ring.range_count()
    }

    /// Refuses a caller whose ring has another number of token ranges (a
    /// different member list or vnode count).
    pub fn check_range_count(&self, range_count: u32) -> Result<()> {
        if range_count as usize != self.range_count() {
            return Err(Error::InvalidArgument(format!(
                "ring mismatch: the caller has {range_count} token ranges, this node {} (check --peers and --vnodes on every node)",
                self.range_count()
            )));
        }
        Ok(())
    }
}

/// The current [`Placement`], swapped whole.
#[derive(Debug)]
pub struct SharedPlacement(RwLock<Arc<Placement>>);

impl SharedPlacement {
    pub fn new(placement: Placement) -> Self {
        Self(RwLock::new(Arc::new(placement)))
    }

    /// The view now; keep it for the whole request or round.
    pub fn snapshot(&self) -> Arc<Placement> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Makes `placement` the view every later snapshot sees (membership
    /// changes will call it; until then only tests do).
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn replace(&self, placement: Placement) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(placement);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placement(members: usize, requested: usize) -> Placement {
        let ring = Ring::new(
            (1..=members).map(|i| Member::new(format!("127.0.0.1:{}", 7000 + i))),
            16,
        );
        Placement::new(Arc::new(ring), requested, "127.0.0.1:7001")
    }

    #[test]
    fn replicas_are_capped_and_hints_go_beyond_them() {
        let small = placement(2, 3);
        assert_eq!(small.replicas(), 2);
        let view = placement(5, 3);
        assert_eq!(view.replicas(), 3);
        let replicas: Vec<_> = view.replicas_of("k").iter().map(|m| &m.address).collect();
        let beyond: Vec<_> = view.hint_candidates("k").map(|m| &m.address).collect();
        assert_eq!(replicas.len(), 3);
        assert_eq!(beyond.len(), 2);
        assert!(beyond.iter().all(|a| !replicas.contains(a)));
        assert_eq!(view.peers().count(), 4);
        assert!(view.is_member("127.0.0.1:7005") && !view.is_member("127.0.0.1:7006"));
    }

    #[test]
    fn a_snapshot_stays_what_it_was_when_the_view_is_replaced() {
        let shared = SharedPlacement::new(placement(3, 3));
        let before = shared.snapshot();
        shared.replace(placement(5, 3));
        assert_eq!(before.members().len(), 3);
        assert_eq!(shared.snapshot().members().len(), 5);
    }

    #[test]
    fn a_caller_with_another_ring_is_refused() {
        let view = placement(3, 3);
        assert!(view.check_range_count(view.range_count() as u32).is_ok());
        let refused = view.check_range_count(7).unwrap_err();
        assert!(refused.to_string().contains("ring mismatch"), "{refused}");
    }
}
