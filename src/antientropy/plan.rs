//! The pure part of anti-entropy: hash-tree roots, differing ranges, what
//! to copy between two listings of a range, and a tombstone's age.

use std::collections::HashMap;

use xxhash_rust::xxh3::xxh3_64;

use crate::replica::RangeEntry;

/// The root of a tree whose leaves are `(range, digest)` in range order.
pub fn root(leaves: &[(usize, u64)]) -> u64 {
    let mut bytes = Vec::with_capacity(leaves.len() * 12);
    for (range, digest) in leaves {
        bytes.extend_from_slice(&(*range as u32).to_le_bytes());
        bytes.extend_from_slice(&digest.to_le_bytes());
    }
    xxh3_64(&bytes)
}

/// Ranges whose digests differ (a range missing on one side differs unless
/// its digest on the other is 0, i.e. empty).
pub fn differing(mine: &[(usize, u64)], theirs: &[(usize, u64)]) -> Vec<usize> {
    let theirs: HashMap<usize, u64> = theirs.iter().copied().collect();
    let mut ranges: Vec<usize> = mine
        .iter()
        .filter(|(range, digest)| theirs.get(range).copied().unwrap_or(0) != *digest)
        .map(|(range, _)| *range)
        .collect();
    let mine: HashMap<usize, u64> = mine.iter().copied().collect();
    for (range, digest) in theirs {
        if !mine.contains_key(&range) && digest != 0 {
            ranges.push(range);
        }
    }
    ranges.sort_unstable();
    ranges.dedup();
    ranges
}

/// Keys to copy between two replicas of one range.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncPlan {
    /// Keys the peer holds newer: fetch and store here.
    pub pull: Vec<String>,
    /// Keys held newer here: send to the peer.
    pub push: Vec<String>,
}

/// Compares two listings of one range. `collectable` says whether a
/// tombstone is past its grace: such a tombstone is not copied to a side that
/// holds nothing for the key.
pub fn plan(
    mine: &[RangeEntry],
    theirs: &[RangeEntry],
    collectable: impl Fn(&RangeEntry) -> bool,
) -> SyncPlan {
    let mine_by_key: HashMap<&str, &RangeEntry> =
        mine.iter().map(|e| (e.key.as_str(), e)).collect();
    let theirs_by_key: HashMap<&str, &RangeEntry> =
        theirs.iter().map(|e| (e.key.as_str(), e)).collect();
    let mut out = SyncPlan::default();
    for their in theirs {
        match mine_by_key.get(their.key.as_str()) {
            Some(my) if my.version >= their.version => {}
            Some(_) => out.pull.push(their.key.clone()),
            None if their.tombstone && collectable(their) => {}
            None => out.pull.push(their.key.clone()),
        }
    }
    for my in mine {
        match theirs_by_key.get(my.key.as_str()) {
            Some(their) if their.version >= my.version => {}
            Some(_) => out.push.push(my.key.clone()),
            None if my.tombstone && collectable(my) => {}
            None => out.push.push(my.key.clone()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Version;

    fn entry(key: &str, lamport: u64, tombstone: bool, deleted_at_ms: u64) -> RangeEntry {
        RangeEntry {
            key: key.into(),
            version: Version::new(lamport, 1),
            tombstone,
            deleted_at_ms,
        }
    }

    #[test]
    fn equal_trees_have_equal_roots_and_no_differing_ranges() {
        let leaves = vec![(1, 11), (4, 44), (9, 0)];
        assert_eq!(root(&leaves), root(&leaves.clone()));
        assert_ne!(root(&leaves), root(&[(1, 11), (4, 45), (9, 0)]));
        assert!(differing(&leaves, &leaves).is_empty());
        assert_eq!(differing(&leaves, &[(1, 11), (4, 40), (9, 0)]), vec![4]);
        // An empty range equals a missing one.
        assert!(differing(&[(1, 11), (9, 0)], &[(1, 11)]).is_empty());
        assert_eq!(differing(&[(1, 11)], &[(1, 11), (5, 3)]), vec![5]);
    }

    #[test]
    fn plan_pulls_newer_and_missing_and_pushes_the_rest() {
        let mine = vec![
            entry("a", 1, false, 0),
            entry("b", 5, false, 0),
            entry("only-mine", 1, false, 0),
        ];
        let theirs = vec![
            entry("a", 2, false, 0),
            entry("b", 4, false, 0),
            entry("only-theirs", 1, false, 0),
        ];
        let plan = plan(&mine, &theirs, |_| false);
        assert_eq!(plan.pull, ["a", "only-theirs"]);
        assert_eq!(plan.push, ["b", "only-mine"]);
    }

    #[test]
    fn collectable_tombstones_are_not_handed_to_a_side_that_holds_nothing() {
        let old = |e: &RangeEntry| e.tombstone && e.deleted_at_ms < 100;
        let theirs = vec![entry("gone", 3, true, 10)];
        assert_eq!(plan(&[], &theirs, old), SyncPlan::default());
        assert_eq!(plan(&theirs, &[], old), SyncPlan::default());
        // ...but do overwrite an older value, or the key would come back.
        let mine = vec![entry("gone", 1, false, 0)];
        assert_eq!(plan(&mine, &theirs, old).pull, ["gone"]);
        // A recent tombstone is copied like any record.
        let fresh = vec![entry("new", 3, true, 500)];
        assert_eq!(plan(&[], &fresh, old).pull, ["new"]);
    }
}
