//! Handing a range that moved away to one of its new owners, before the
//! old owner drops it: the second half of an anti-entropy exchange (list
//! the owner's records of the range, push what it lacks or holds older),
//! with every push answered by the version the owner holds. The old owner
//! may drop a record only once every new owner of its range confirmed
//! holding it, at its version or a newer one (`membership/cleanup.rs`).

use super::{AntiEntropy, plan};
use crate::clock::{Version, wall_clock_ms};
use crate::error::{Error, Result};
use crate::net::RangeQuery;
use crate::placement::Placement;
use crate::replica::RangeEntry;

/// Records (key, version) an owner confirmed holding, at that version or a
/// newer one.
pub type Confirmed = Vec<(String, Version)>;

impl AntiEntropy {
    /// Hands this node's records of `range` (a range of `view`'s ring that
    /// this node does not replicate) to `owner`, one of its replicas in
    /// `view`. Answers every record of this node's listing, all confirmed:
    /// the owner listed it at an equal or newer version, or answered the
    /// push of it so (or it is a tombstone past its grace that the owner
    /// does not hold, which nobody needs). An error when any part failed:
    /// the owner serves another layout, could not be reached, or refused
    /// or failed a push; the old owner then keeps the range.
    pub async fn hand_off(&self, view: &Placement, owner: &str, range: usize) -> Result<Confirmed> {
        if self.replica.digests_layout_version() != view.version() {
            return Err(Error::Unavailable(format!(
                "this node's range listings are being recounted for layout v{}",
                view.version()
            )));
        }
        let query = RangeQuery {
            asker: view.me().to_string(),
            range_count: view.range_count() as u32,
            layout_version: view.version(),
            for_listing: false,
        };
        let (peers, timeout) = (&self.cluster.peers, self.cluster.rpc_timeout);
        // The owner refuses unless it serves the same layout (and has
        // counted its digests over it).
        let (_, theirs) = peers.range_entries(owner, timeout, &query, range).await?;
        let mine = self.replica.range_entries(range)?;
        let now_ms = wall_clock_ms();
        let mut plan = plan(&mine, &theirs, self.collectable(now_ms));
        let held: std::collections::HashSet<&str> = theirs.iter().map(|e| e.key.as_str()).collect();
        let grace_ms = self.grace.as_millis() as u64;
        let by_key: std::collections::HashMap<&str, &RangeEntry> =
            mine.iter().map(|e| (e.key.as_str(), e)).collect();
        plan.push.retain(|key| {
            by_key.get(key.as_str()).is_some_and(|mine| {
                worth_handing(mine, held.contains(key.as_str()), now_ms, grace_ms)
            })
        });
        let remote = self.cluster.peers.replica_handle(owner, None)?;
        let copies = self.push(&remote, view.version(), &plan.push).await?;
        if let Some(first) = copies.failed.first() {
            return Err(Error::Unavailable(format!(
                "{} of {} records not confirmed by {owner} ({} copied), e.g. {first}",
                copies.failed.len(),
                plan.push.len(),
                copies.copied
            )));
        }
        Ok(mine.into_iter().map(|e| (e.key, e.version)).collect())
    }
}

/// Whether a record of this node's listing is pushed to a new owner that
/// lacks it or holds it older. A value the owner does not hold at all and
/// that is older than the tombstone grace is not: a tombstone newer than
/// it may have been purged on every new owner already (their purge never
/// asks an old owner), and pushing it would bring the deleted key back. It
/// is dropped unpushed, as before hand-offs existed; every acknowledged
/// write reached the new owners during the move (W in each replica set,
/// then streaming and anti-entropy), so only a write at ONE that no
/// repair reached within the grace is not handed off. Tombstones, and
/// values younger than the grace (no newer tombstone can be purged yet),
/// are pushed.
fn worth_handing(mine: &RangeEntry, owner_holds_it: bool, now_ms: u64, grace_ms: u64) -> bool {
    owner_holds_it || mine.tombstone || mine.version.physical_ms().saturating_add(grace_ms) > now_ms
}

/// The records every owner confirmed: those of one set found in every other
/// (each owner's hand-off listed this node's records anew).
pub fn confirmed_by_all(mut sets: Vec<Confirmed>) -> Confirmed {
    let Some(first) = sets.pop() else {
        return Vec::new();
    };
    let others: Vec<std::collections::HashSet<(String, Version)>> = sets
        .into_iter()
        .map(|set| set.into_iter().collect())
        .collect();
    first
        .into_iter()
        .filter(|pair| others.iter().all(|set| set.contains(pair)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(key: &str, hlc: u64) -> (String, Version) {
        (key.to_string(), Version::new(hlc, 1))
    }

    #[test]
    fn a_value_older_than_the_grace_is_not_handed_to_an_owner_without_it() {
        let hlc_at = |ms: u64| Version::new(ms << crate::clock::LOGICAL_BITS, 1);
        let value = |ms: u64| RangeEntry {
            key: "k".into(),
            version: hlc_at(ms),
            tombstone: false,
            deleted_at_ms: 0,
        };
        let (now, grace) = (crate::clock::FIRST_HLC_MS + 10_000, 1_000);
        // Its tombstone may be purged already: it would come back.
        assert!(!worth_handing(&value(now - 5_000), false, now, grace));
        // The owner holds an older version: no tombstone of it was purged.
        assert!(worth_handing(&value(now - 5_000), true, now, grace));
        // Younger than the grace: no newer tombstone can be gone yet.
        assert!(worth_handing(&value(now - 500), false, now, grace));
        let tombstone = RangeEntry {
            tombstone: true,
            ..value(now - 5_000)
        };
        assert!(worth_handing(&tombstone, false, now, grace));
    }

    #[test]
    fn only_what_every_owner_confirmed_at_the_same_version_is_dropped() {
        assert!(confirmed_by_all(Vec::new()).is_empty());
        let one = vec![pair("a", 1), pair("b", 2), pair("c", 3)];
        assert_eq!(confirmed_by_all(vec![one.clone()]), one);
        // "b" was rewritten here between two hand-offs: the second owner
        // confirmed the newer version only; "c" came after the first.
        let two = vec![pair("a", 1), pair("b", 5), pair("c", 3)];
        let three = vec![pair("a", 1), pair("b", 2)];
        let mut both = confirmed_by_all(vec![one, two, three]);
        both.sort();
        assert_eq!(both, vec![pair("a", 1)]);
    }
}
