//! An instance the cluster removed stops.
//!
//! The layout's removed list names instances (address *and* instance id)
//! that left, were removed, or whose join was aborted. Such an instance
//! must not serve again: its data could hold values whose tombstones were
//! purged since, and its old layout would have it stream, propose and
//! answer as a member. So whenever this node learns a layout, at start or
//! by adoption, [`Removal::check`] looks for its own instance there; once
//! found, the layout is not adopted, the notice is kept, and the node stops
//! (`DKVSServer` then exits 0 with the notice, so restart policies that
//! restart on failure leave it down). A new instance at the same address
//! (a wiped data dir) is not named and is not stopped.

use std::sync::OnceLock;

use tokio_util::sync::CancellationToken;

use crate::clock::InstanceId;
use crate::layout::Layout;

/// Watches the layouts this node learns for its own removal.
pub struct Removal {
    /// This node's address.
    address: String,
    /// This node's instance id (NONE: never matched).
    instance: InstanceId,
    /// What the node says when it stops (set once).
    notice: OnceLock<String>,
    /// Cancelled once this node learns it was removed.
    stop: CancellationToken,
}

impl Removal {
    pub fn new(address: &str, instance: InstanceId) -> Self {
        Self {
            address: address.to_string(),
            instance,
            notice: OnceLock::new(),
            stop: CancellationToken::new(),
        }
    }

    /// Whether `layout` removed this instance: if so, the notice (also
    /// kept, and the node told to stop).
    pub fn check(&self, layout: &Layout) -> Option<String> {
        let removed = layout.removed_instance(&self.address, self.instance)?;
        let notice = format!("{}; wipe its data dir and --join again", removed.notice());
        if self.notice.set(notice.clone()).is_ok() {
            tracing::warn!(
                instance = %self.instance,
                version = layout.version,
                "{notice}: stopping"
            );
        }
        self.stop.cancel();
        Some(notice)
    }

    /// Why this node stopped, once it learned it was removed.
    pub fn notice(&self) -> Option<&str> {
        self.notice.get().map(String::as_str)
    }

    /// Completes once this node learned it was removed.
    pub async fn stopped(&self) {
        self.stop.cancelled().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_this_instance_on_the_removed_list_stops_the_node() {
        let layout = Layout::bootstrap(&["a:1".into(), "b:1".into(), "c:1".into()], 3, 4)
            .begin_join_as("d:1", InstanceId(7))
            .and_then(|l| l.abort())
            .expect("aborted");
        let other = Removal::new("d:1", InstanceId(8));
        assert_eq!(other.check(&layout), None, "a new instance at the address");
        assert_eq!(other.notice(), None);
        let removed = Removal::new("d:1", InstanceId(7));
        assert_eq!(
            removed.check(&layout).as_deref(),
            Some("this node's join was aborted (layout v3); wipe its data dir and --join again")
        );
        assert!(removed.notice().is_some());
        assert!(removed.stop.is_cancelled());
    }
}
