//! Naming the instance each member votes as.
//!
//! An acceptor's promises live in its data dir. A member that lost its
//! data dir comes back at the same address as a new instance with an
//! empty acceptor: were it to vote, two proposers could each gather a
//! majority for a different layout at one version (it forgot what it
//! accepted). So a member votes only as the instance the layout names for
//! it ([`Layout::votes_as`]), and its new instance votes once a committed
//! change names it: **`instances named`**, proposed by the *other* members
//! once they know the new instance (as etcd requires removing and
//! re-adding a member that lost its data). The old instance goes on the
//! removed list: a copy of its data dir restored later learns so and
//! stops, since its data could hold values whose tombstones were purged
//! since.
//!
//! The first layout (`--peers`) cannot name anyone: every node builds it
//! alone. Its members are named by the first `instances named` change,
//! once every member's instance is known (or, with a member that never
//! came up, after a grace period; that one is named when it does).
//! Joiners are named by their join ([`Layout::begin_join_as`]).
//!
//! Naming is its own change and waits for a settled layout: it moves no
//! data, and one change at a time keeps every other change's steps whole.

use super::{Layout, Refusal, Removed, Role};
use crate::clock::InstanceId;

/// What the naming change says ([`Layout::change`]).
pub const INSTANCES_NAMED: &str = "instances named";

/// What the removed list says of an instance replaced by a new one.
pub const INSTANCE_REPLACED: &str = "replaced by a new instance (its data dir was lost)";

impl Layout {
    /// The active members whose instance, as `seen` (address, instance;
    /// NONE: not known yet), should be named: every member whose named
    /// instance differs from the one seen. Unnamed members (the first
    /// layout's) are named only once every unnamed member's instance is
    /// seen, or when `grace_over` (the caller waited long enough for the
    /// others).
    pub fn instances_to_name(
        &self,
        seen: &[(String, InstanceId)],
        grace_over: bool,
    ) -> Vec<(String, InstanceId)> {
        let seen_of = |address: &str| {
            seen.iter()
                .find(|(a, _)| a == address)
                .map_or(InstanceId::NONE, |(_, instance)| *instance)
        };
        let active = || self.members.iter().filter(|m| m.role == Role::Active);
        let every_unnamed_seen = active()
            .filter(|m| m.instance_id.is_none())
            .all(|m| !seen_of(&m.address).is_none());
        active()
            .filter_map(|m| {
                let instance = seen_of(&m.address);
                let rename = !m.instance_id.is_none();
                // An instance once replaced never comes back.
                let due = instance != m.instance_id
                    && !instance.is_none()
                    && self.removed_instance(&m.address, instance).is_none()
                    && (rename || every_unnamed_seen || grace_over);
                due.then(|| (m.address.clone(), instance))
            })
            .collect()
    }

    /// v+1 naming each (address, instance) of `names`; a replaced
    /// instance goes on the removed list. Refused while another change is
    /// in progress, and for an address that is not an active member.
    pub fn name_instances(&self, names: &[(String, InstanceId)]) -> Result<Layout, Refusal> {
        self.refuse_if_busy()?;
        if names.is_empty() {
            return Err(Refusal::Invalid(format!(
                "layout v{} already names every instance seen",
                self.version
            )));
        }
        let version = self.version + 1;
        let mut next = self.next(INSTANCES_NAMED.into());
        for (address, instance) in names {
            if instance.is_none() {
                return Err(Refusal::Invalid(format!(
                    "cannot name {address}: an instance id is never 0"
                )));
            }
            if let Some(removed) = self.removed_instance(address, *instance) {
                return Err(Refusal::Invalid(format!(
                    "cannot name {address} instance {instance}: it was removed in layout v{} ({})",
                    removed.version, removed.why
                )));
            }
            let Some(member) = next
                .members
                .iter_mut()
                .find(|m| m.address == *address && m.role == Role::Active)
            else {
                return Err(Refusal::Invalid(format!(
                    "{address} is not an active member of layout v{}",
                    self.version
                )));
            };
            if !member.instance_id.is_none() && member.instance_id != *instance {
                next.removed.push(Removed {
                    address: address.clone(),
                    instance_id: member.instance_id,
                    version,
                    why: INSTANCE_REPLACED.into(),
                });
            }
            member.instance_id = *instance;
        }
        Ok(next)
    }

    /// Whether every active member is named.
    pub fn names_every_instance(&self) -> bool {
        self.members
            .iter()
            .filter(|m| m.role == Role::Active)
            .all(|m| !m.instance_id.is_none())
    }
}
