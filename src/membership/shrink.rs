//! `cluster leave` and `cluster remove`: the async side of
//! `crate::layout::change` (the rules, and why each step is safe, are
//! there).

use std::time::Duration;

use super::Membership;
use crate::error::{Error, Result};
use crate::layout::{Layout, Role};

/// How long a remove asked for while a move's reads have moved waits for
/// that move to settle (it settles by itself: a dead member is not waited
/// for).
const SETTLE_WAIT: Duration = Duration::from_secs(20);

impl Membership {
    /// Whether this node believes `address` up (itself always).
    fn believed_up(&self, address: &str) -> bool {
        address == self.me.address || self.cluster.liveness.is_up(address)
    }

    /// `Cluster.Leave`: commits the layout with `address` leaving. Refused
    /// for a member believed down (its data cannot stream from it: use
    /// remove) unless `force`, and as [`Layout::begin_leave`] refuses.
    pub async fn leave(&self, address: &str, force: bool) -> Result<Layout> {
        let base = self.layout();
        if base.member(address).is_some() && !self.believed_up(address) && !force {
            return Err(Error::FailedPrecondition(format!(
                "{address} is believed down, so it cannot hand its data over: use `DKVSClient cluster remove {address}` \
                 (its ranges are rebuilt from the other replicas), or --force to leave anyway"
            )));
        }
        let done = |l: &Layout| {
            l.member(address).is_some_and(|m| m.role == Role::Leaving)
                || l.removed
                    .iter()
                    .any(|r| r.address == address && r.version > base.version)
        };
        indeterminate(
            self.propose(|l| l.begin_leave(address, force), done).await,
            "leave",
        )
    }

    /// `Cluster.Remove`: commits the layout with `address` being removed
    /// (a joiner: dropped). Refused for this node itself, for a member
    /// believed up unless `force`, and as [`Layout::begin_remove`] refuses.
    /// Asked while a move's reads have moved, it waits for that move to
    /// settle first.
    pub async fn remove(
        &self,
        address: &str,
        force: bool,
        allow_data_loss: bool,
    ) -> Result<Layout> {
        if address == self.me.address {
            return Err(Error::FailedPrecondition(format!(
                "{address} is the node asked: a node does not remove itself; use `cluster leave {address}`, \
                 or ask another member"
            )));
        }
        let base = self.layout();
        if base.member(address).is_some() && self.believed_up(address) && !force {
            return Err(Error::FailedPrecondition(format!(
                "{address} is up as {} sees it: use `DKVSClient cluster leave {address}` (its data moves first), \
                 or --force to remove it as if it were dead",
                self.me.address
            )));
        }
        let deadline = tokio::time::Instant::now() + SETTLE_WAIT;
        while self.layout().reads_moved() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let done = |l: &Layout| {
            l.member(address).is_some_and(|m| m.role == Role::Removing)
                || l.removed
                    .iter()
                    .any(|r| r.address == address && r.version > base.version)
        };
        let up = |a: &str| self.believed_up(a);
        indeterminate(
            self.propose(|l| l.begin_remove(address, allow_data_loss, up), done)
                .await,
            "remove",
        )
    }
}

impl Membership {
    /// `Membership.Join` with `replaces`: commits the layout in which
    /// `address` (instance `instance`) joins with the dead member
    /// `dead`'s tokens while `dead` is removed, or answers the one that
    /// already has it joining (a joiner retrying).
    pub async fn on_replace(
        &self,
        address: &str,
        instance: crate::clock::InstanceId,
        dead: &str,
    ) -> Result<Layout> {
        let up = |a: &str| self.believed_up(a);
        self.propose(
            |l| {
                l.has_joiner(address, instance)?;
                l.begin_replace(dead, address, instance, false, up)
            },
            |l| l.has_joiner(address, instance).unwrap_or(false),
        )
        .await
    }
}

/// A proposal that gave up may or may not have committed.
fn indeterminate(answer: Result<Layout>, what: &str) -> Result<Layout> {
    match answer {
        Err(Error::Unavailable(why)) => Err(Error::Indeterminate(format!(
            "{why}; the {what} may or may not have committed: check `DKVSClient status`"
        ))),
        answer => answer,
    }
}
