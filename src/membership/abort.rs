//! Joins by instance, learners that refuse to vote, and `cluster abort`
//! (the rules are in `crate::layout`'s `abort.rs`).

use super::Membership;
use crate::clock::InstanceId;
use crate::error::{Error, Result};
use crate::layout::paxos::LayoutState;
use crate::layout::{JOIN_ABORTED, Layout, Refusal};

impl Membership {
    /// Whether this node must refuse to vote on `version`: it is a learner
    /// (joining, or not a member) in the layout it holds, the one the
    /// proposal changes, or another instance than the one that layout
    /// names for it (it lost its data dir, and with it its promises).
    pub(super) fn is_learner(&self, state: &LayoutState, version: u64) -> bool {
        let Some(committed) = &state.committed else {
            return false;
        };
        // An unnamed member (the first layout's) that is catching up may
        // be a first member that lost its data dir: no vote either.
        let unnamed_catching_up = committed
            .member(&self.me.address)
            .is_some_and(|m| m.instance_id.is_none())
            && self.replica.read_refusal().is_some();
        let learner = version == committed.version + 1
            && (!committed.votes_as(&self.me.address, self.me.instance_id) || unnamed_catching_up);
        if learner {
            tracing::debug!(
                version,
                "refused to vote on a layout: this node is not an active member of v{} as this instance (joiners are learners; a member that lost its data dir votes once a layout names its new instance)",
                committed.version
            );
        }
        learner
    }

    /// `Membership.Join` from instance `instance` (NONE: a joiner of a
    /// release before instance ids): commits the layout with `address`
    /// joining as that instance, or answers the one that already has it (a
    /// joiner retrying). Another instance at a joining address (the joiner
    /// lost its data dir) is refused until the join is aborted.
    pub async fn on_join_as(&self, address: &str, instance: InstanceId) -> Result<Layout> {
        if address.is_empty() || address.len() > 256 {
            return Err(Error::InvalidArgument(
                "join: the address must be HOST:PORT".into(),
            ));
        }
        let address = address.to_string();
        self.propose(
            |l| {
                l.has_joiner(&address, instance)?;
                l.begin_join_as(&address, instance)
            },
            |l| l.has_joiner(&address, instance).unwrap_or(false),
        )
        .await
    }

    /// `Cluster.Abort`: commits the layout without the join in progress,
    /// through the same Paxos rounds as any change. Refused (nothing
    /// changes) when nothing is in progress, when the join has finished
    /// (reads moved), and on the joining node itself. A proposal that gave
    /// up may or may not have committed: that failure is indeterminate.
    pub async fn abort(&self) -> Result<Layout> {
        let base = self.layout();
        if base
            .member(&self.me.address)
            .is_some_and(|m| !base.votes(&m.address))
        {
            return Err(Error::FailedPrecondition(format!(
                "{} is the node joining (layout v{}); send `cluster abort` to an active member",
                self.me.address, base.version
            )));
        }
        let target: Vec<(String, InstanceId)> = base
            .joining()
            .map(|m| (m.address.clone(), m.instance_id))
            .collect();
        let aborting = base.change_name();
        let change = |l: &Layout| {
            if l.in_progress().is_some() && !l.reads_moved() && l.change_name() != aborting {
                return Err(Refusal::Invalid(format!(
                    "the change in progress is now {} (layout v{}), not the one this abort was asked for: run `cluster abort` again to abort it",
                    l.change, l.version
                )));
            }
            l.abort()
        };
        let done = |l: &Layout| {
            if target.is_empty() {
                // A leave or remove: undone once its members are active again.
                return l.version > base.version
                    && l.change.ends_with(" aborted")
                    && l.in_progress().is_none();
            }
            target.iter().all(|(address, instance)| {
                l.removed.iter().any(|r| {
                    r.address == *address
                        && r.instance_id == *instance
                        && r.why == JOIN_ABORTED
                        && r.version > base.version
                })
            })
        };
        match self.propose(change, done).await {
            Err(Error::Unavailable(why)) => Err(Error::Indeterminate(format!(
                "{why}; the abort may or may not have committed: check `DKVSClient status` (or run `cluster abort` again: it says so if nothing is left to abort)"
            ))),
            answer => answer,
        }
    }
}
