//! Refusing another cluster's messages: the layout owner knows this node's
//! cluster id, so it judges what a message carries
//! ([`crate::layout::cluster_id::check_sender`]) and logs each foreign
//! sender once.

use super::LayoutOwner;
use crate::error::{Error, Result};
use crate::locks::Locked;

/// Most foreign senders remembered for logging once; past it, the set is
/// cleared (a sender may then be logged again).
const FOREIGN_LOGGED_MAX: usize = 1024;

impl LayoutOwner {
    /// This node's cluster id (0: none yet).
    pub fn cluster_id(&self) -> u64 {
        self.state
            .locked()
            .committed
            .as_ref()
            .map_or(0, |l| l.cluster_id)
    }

    /// Accepts a message carrying cluster id `theirs` from `sender` (an
    /// address, or what is known of the sender), or refuses it with
    /// FAILED_PRECONDITION saying whose it is; a refusal is logged once per
    /// sender and id.
    pub fn check_sender(&self, theirs: u64, sender: &str) -> Result<()> {
        self.check_sender_against(self.cluster_id(), theirs, sender)
    }

    /// [`LayoutOwner::check_sender`] against the cluster id of the
    /// placement served: it takes no lock a layout save holds, so every
    /// node-to-node call can be checked (the placement is swapped right
    /// after the layout is adopted).
    pub fn check_caller(&self, theirs: u64, sender: &str) -> Result<()> {
        let placement = self.placement();
        let own = placement.layout().map_or(0, |l| l.cluster_id);
        self.check_sender_against(own, theirs, sender)
    }

    fn check_sender_against(&self, own: u64, theirs: u64, sender: &str) -> Result<()> {
        let Err(why) = crate::layout::cluster_id::check_sender(own, theirs) else {
            return Ok(());
        };
        let first = {
            let mut logged = self.foreign_logged.locked();
            if logged.len() >= FOREIGN_LOGGED_MAX {
                logged.clear();
            }
            logged.insert((sender.to_string(), theirs))
        };
        if first {
            tracing::warn!(sender, "refused: {why}");
        }
        Err(Error::FailedPrecondition(why))
    }
}

impl LayoutOwner {
    /// A peer refused this node's message as another cluster's: logged
    /// once per peer (the refusal says what to do).
    pub fn note_refusal(&self, peer: &str, why: &str) {
        if !why.contains(crate::layout::cluster_id::REFUSED_MARK) {
            return;
        }
        let first = {
            let mut logged = self.foreign_logged.locked();
            if logged.len() >= FOREIGN_LOGGED_MAX {
                logged.clear();
            }
            logged.insert((format!("refused by {peer}"), 0))
        };
        if first {
            tracing::warn!(
                peer,
                "a peer refuses this node as from another cluster: {why}"
            );
        }
    }
}
