//! One shared view of where keys live: the ring, N, and this node.
//!
//! A [`Placement`] is an immutable snapshot. The coordinator, hinted handoff
//! and anti-entropy each take one snapshot when a request or a round starts
//! ([`SharedPlacement::snapshot`]) and use only that one to the end, so that
//! a membership change can swap the view ([`SharedPlacement::replace`])
//! without touching a call site and without a request seeing two rings.
//!
//! A placement is a view of one [`Layout`] version: reads use its read ring
//! (active members), writes also go to its extra write rings while data
//! moves (see [`crate::layout`]), and every placement-dependent call carries
//! its version so a node serving a newer layout refuses it.

use std::sync::{Arc, RwLock};

use crate::clock::InstanceId;
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::ring::MemberId;
use crate::ring::{Member, Ring};

/// Who this node is: its ring position (member id, from its address), the
/// instance created with its data dir (what versions carry), and the address
/// peers reach it at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThisNode {
    pub member_id: MemberId,
    pub instance_id: InstanceId,
    pub address: String,
}

/// The ring, the replication factor in effect, and this node: everything
/// that decides which nodes hold a key.
#[derive(Debug)]
pub struct Placement {
    /// The read ring.
    ring: Arc<Ring>,
    /// N in effect: the requested replication factor capped at the member
    /// count.
    replicas: usize,
    /// N requested (each ring caps it at its own member count).
    requested: usize,
    /// This node's advertised address.
    me: String,
    /// The layout this is a view of (`None`: a bare ring, in unit tests).
    layout: Option<Arc<Layout>>,
    /// Rings writes also go to while data moves.
    extra_write_rings: Vec<Arc<Ring>>,
    /// The ring of every member, joining ones too: where data is moving to.
    target_ring: Arc<Ring>,
    /// Every member, joining ones too.
    members: Vec<Member>,
}

impl Placement {
    /// A view of `ring` from the node at `me`, with `requested` replicas per
    /// key (capped at the member count); no layout (version 0).
    pub fn new(ring: Arc<Ring>, requested: usize, me: impl Into<String>) -> Self {
        let replicas = requested.min(ring.members().len());
        Self {
            members: ring.members().to_vec(),
            target_ring: ring.clone(),
            ring,
            replicas,
            requested,
            me: me.into(),
            layout: None,
            extra_write_rings: Vec::new(),
        }
    }

    /// The view of `layout` from the node at `me`.
    pub fn of_layout(layout: Arc<Layout>, me: impl Into<String>) -> Self {
        let ring = Arc::new(layout.read_ring());
        let mut view = Self::new(ring, layout.replicas, me);
        view.extra_write_rings = layout
            .extra_write_rings()
            .into_iter()
            .map(Arc::new)
            .collect();
        view.target_ring = Arc::new(layout.target_ring());
        view.members = layout
            .members
            .iter()
            .map(|m| Member {
                address: m.address.clone(),
                member_id: m.member_id,
            })
            .collect();
        view.layout = Some(layout);
        view
    }

    /// The layout version (0: none).
    pub fn version(&self) -> u64 {
        self.layout.as_ref().map_or(0, |l| l.version)
    }

    pub fn layout(&self) -> Option<&Arc<Layout>> {
        self.layout.as_ref()
    }

    /// Whether no data is moving (tombstone GC waits otherwise).
    pub fn is_settled(&self) -> bool {
        self.layout.as_ref().is_none_or(|l| l.is_settled())
    }

    /// Whether writes go to more than the read sets (data is moving).
    pub fn is_moving(&self) -> bool {
        !self.extra_write_rings.is_empty()
    }

    /// The replicas `key` will have once the change in progress is over.
    pub fn target_replicas_of(&self, key: &str) -> Vec<&Member> {
        let n = self.requested.min(self.target_ring.members().len());
        self.target_ring.preference_list(key.as_bytes(), n)
    }

    /// The replica sets a write to `key` must reach, W acknowledgements in
    /// each: the read set first, then those of the extra write rings that
    /// differ from it.
    pub fn write_sets(&self, key: &str) -> Vec<Vec<&Member>> {
        let mut sets = vec![self.replicas_of(key)];
        for ring in &self.extra_write_rings {
            let n = self.requested.min(ring.members().len());
            let set = ring.preference_list(key.as_bytes(), n);
            if !sets.contains(&set) {
                sets.push(set);
            }
        }
        sets
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

    /// Every member, joining ones too.
    pub fn members(&self) -> &[Member] {
        &self.members
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

    /// Makes `placement` the view every later snapshot sees.
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
