//! Who votes on a layout, which instance joins, and how a join is undone.
//!
//! **Learners.** A change to layout v commits when a majority of v's
//! *active* members accept it ([`Layout::acceptors`]). A joining member is a
//! learner: it is told every committed layout but is not asked to vote,
//! and refuses if asked. Were joiners acceptors, a dead joiner would count
//! against every majority: with three members, one of them down, and a
//! dead joiner, two of four would be alive and nothing could commit, not
//! even the change that drops the joiner.
//!
//! **The joiner's instance.** `X joins` names the instance (data dir) that
//! asked to join ([`Layout::begin_join_as`]); an instance whose join was
//! aborted is refused, and one that lost its data dir must wait for the
//! abort before it joins again.
//!
//! **Abort.** [`Layout::abort`] undoes a join while reads have not moved:
//! the joiner leaves the member list and goes on the `removed` list (its
//! address and instance), so that if it comes back it learns so and stops.
//! Dropping it loses no acknowledged write. While `X joins` is the layout,
//! reads use the old ring, and a write is acknowledged only once *each* of
//! its replica sets holds it on W replicas (`quorum::WriteRound`: one
//! tally per set), the old set among them; the joiner was only ever an
//! extra copy. The version after the abort has the old ring for reads and
//! writes, which is where every acknowledged write already is. Once the
//! join has finished (`previous` set, no joiner), reads use the new ring,
//! and taking the joiner out would leave ranges whose newest copies are on
//! it: abort refuses and the move is left to settle.

use super::{Layout, Refusal, Removed, Role};
use crate::clock::InstanceId;

/// What [`Removed::why`] says of an aborted join.
pub const JOIN_ABORTED: &str = "join aborted";

impl Layout {
    /// The members whose votes decide the version after this one: the
    /// active ones (joiners are learners).
    pub fn acceptors(&self) -> Vec<String> {
        self.members
            .iter()
            .filter(|m| m.role.votes())
            .map(|m| m.address.clone())
            .collect()
    }

    /// Whether `address` may vote on the version after this one.
    pub fn votes(&self, address: &str) -> bool {
        self.member(address).is_some_and(|m| m.role.votes())
    }

    /// Whether instance `instance` at `address` may vote on the version
    /// after this one: an active member, and the instance the layout names
    /// for it when it names one (a member that lost its data dir comes
    /// back as a new instance with an empty acceptor: it must not vote
    /// until a layout names it).
    pub fn votes_as(&self, address: &str, instance: InstanceId) -> bool {
        self.member(address).is_some_and(|m| {
            m.role.votes() && (m.instance_id.is_none() || m.instance_id == instance)
        })
    }

    /// The entry of the removed list naming `address` *and* `instance`.
    pub fn removed_instance(&self, address: &str, instance: InstanceId) -> Option<&Removed> {
        if instance.is_none() {
            return None;
        }
        self.removed
            .iter()
            .find(|r| r.address == address && r.instance_id == instance)
    }

    /// v+1 with `address` joining as `instance` (NONE: a joiner from a
    /// release before instance ids).
    pub fn begin_join_as(&self, address: &str, instance: InstanceId) -> Result<Layout, Refusal> {
        if let Some(removed) = self.removed_instance(address, instance) {
            return Err(Refusal::Invalid(format!(
                "{}; wipe its data dir and --join again",
                removed.notice()
            )));
        }
        let mut next = self.begin_join(address)?;
        for member in &mut next.members {
            if member.address == address {
                member.instance_id = instance;
            }
        }
        Ok(next)
    }

    /// Whether this layout has `address` as a member as far as a join by
    /// `instance` is concerned. An active member always is: one whose data
    /// dir was lost comes back through its read gate (see
    /// `crate::identity`). A joining member is when it is the same
    /// instance or either is unnamed; another instance at a joining
    /// address (the joiner lost its data dir) is a [`Refusal`]: the join
    /// must be aborted first, so that the layout never names an instance
    /// that is gone.
    pub fn has_joiner(&self, address: &str, instance: InstanceId) -> Result<bool, Refusal> {
        let Some(member) = self.member(address) else {
            return Ok(false);
        };
        if member.role != Role::Joining
            || instance.is_none()
            || member.instance_id.is_none()
            || member.instance_id == instance
        {
            return Ok(true);
        }
        Err(Refusal::Invalid(format!(
            "{address} is already joining as instance {} (layout v{}), and this is instance {instance} (a new data dir): \
             if the old instance is gone, run `DKVSClient cluster abort`, then --join again",
            member.instance_id, self.version
        )))
    }

    /// v+1 without the change in progress: the joiner leaves the member
    /// list and goes on the removed list. Refused once reads have moved
    /// (the join finished: wait for the move to settle) and when no change
    /// is in progress.
    pub fn abort(&self) -> Result<Layout, Refusal> {
        let joiners: Vec<_> = self.joining().collect();
        if self.reads_moved() || self.in_progress().is_none() {
            if self.reads_moved() {
                return Err(Refusal::Invalid(format!(
                    "cannot abort: {} (layout v{}) and reads already use the new replica sets; \
                     the change can no longer be undone. Run `DKVSClient cluster wait` for the move to settle \
                     (then remove or replace the node if you do not want it)",
                    self.change, self.version
                )));
            }
            return Err(Refusal::Invalid(format!(
                "nothing to abort: no change is in progress (layout v{}: {})",
                self.version, self.change
            )));
        }
        let version = self.version + 1;
        let addresses: Vec<String> = joiners.iter().map(|m| m.address.clone()).collect();
        let mut next = self.next(if addresses.is_empty() {
            format!("{} aborted", self.change_name())
        } else {
            format!("{} {JOIN_ABORTED}", addresses.join(", "))
        });
        // Members leaving or being removed stay: back to active.
        for member in &mut next.members {
            if matches!(member.role, Role::Leaving | Role::Removing) {
                member.role = Role::Active;
            }
        }
        next.streamed.clear();
        next.written_off.clear();
        for joiner in joiners {
            next.removed.push(Removed {
                address: joiner.address.clone(),
                instance_id: joiner.instance_id,
                version,
                why: JOIN_ABORTED.into(),
            });
        }
        next.members.retain(|m| m.role != Role::Joining);
        Ok(next)
    }
}

impl Removed {
    /// What the removed instance says when it learns it was removed.
    pub fn notice(&self) -> String {
        if self.why == JOIN_ABORTED {
            format!("this node's join was aborted (layout v{})", self.version)
        } else if self.why == super::change::LEFT {
            format!(
                "this node left the cluster (layout v{}); its ranges moved to the other members",
                self.version
            )
        } else {
            format!(
                "this node's instance was removed from the cluster (layout v{}: {})",
                self.version, self.why
            )
        }
    }
}
