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

/// Where the next window of a paged comparison ends, given where each
/// side's page ends (`None`: that side's listing is done): at the nearer of
/// the two, so both listings are complete up to it; `None` when both are
/// done (the window runs to the range's end). What lies past the window
/// on the longer page is listed again with the next window.
pub fn window_end(mine_next: Option<&[u8]>, theirs_next: Option<&[u8]>) -> Option<Vec<u8>> {
    match (mine_next, theirs_next) {
        (Some(mine), Some(theirs)) => Some(mine.min(theirs).to_vec()),
        (Some(one), None) | (None, Some(one)) => Some(one.to_vec()),
        (None, None) => None,
    }
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

    /// One page of `listing` (sorted by storage key) after `after`.
    fn page_of(
        listing: &[RangeEntry],
        after: &[u8],
        size: usize,
    ) -> (Vec<RangeEntry>, Option<Vec<u8>>) {
        let rest: Vec<RangeEntry> = listing
            .iter()
            .filter(|e| crate::replica::storage_key(&e.key)[..] > *after)
            .cloned()
            .collect();
        let page: Vec<RangeEntry> = rest.iter().take(size).cloned().collect();
        let next = (rest.len() > size).then(|| crate::replica::storage_key(&page[size - 1].key));
        (page, next)
    }

    #[test]
    fn windows_of_paged_listings_plan_what_the_whole_listings_do() {
        let by_storage_key = |mut v: Vec<RangeEntry>| {
            v.sort_by_key(|e| crate::replica::storage_key(&e.key));
            v
        };
        // Each side holds keys the other lacks, and some at other versions.
        let mine = by_storage_key(
            (0..60)
                .filter(|i| i % 3 != 0)
                .map(|i| entry(&format!("k{i}"), 1 + (i % 2), false, 0))
                .collect(),
        );
        let theirs = by_storage_key(
            (0..60)
                .filter(|i| i % 5 != 0)
                .map(|i| entry(&format!("k{i}"), 1 + (i % 4 == 1) as u64, false, 0))
                .collect(),
        );
        let whole = plan(&mine, &theirs, |_| false);
        for (my_size, their_size) in [(1, 1), (2, 7), (7, 2), (100, 3), (3, 100)] {
            let (mut windowed, mut after, mut windows) = (SyncPlan::default(), Vec::new(), 0);
            loop {
                let (my_page, my_next) = page_of(&mine, &after, my_size);
                let (their_page, their_next) = page_of(&theirs, &after, their_size);
                let end = window_end(my_next.as_deref(), their_next.as_deref());
                let within = |e: &&RangeEntry| {
                    end.as_ref()
                        .is_none_or(|end| crate::replica::storage_key(&e.key) <= *end)
                };
                let my_window: Vec<RangeEntry> = my_page.iter().filter(within).cloned().collect();
                let their_window: Vec<RangeEntry> =
                    their_page.iter().filter(within).cloned().collect();
                let part = plan(&my_window, &their_window, |_| false);
                windowed.pull.extend(part.pull);
                windowed.push.extend(part.push);
                windows += 1;
                match end {
                    Some(end) => {
                        assert!(end > after, "every window moves on");
                        after = end;
                    }
                    None => break,
                }
            }
            assert!(windows <= 120);
            let sorted = |mut v: Vec<String>| {
                v.sort();
                v
            };
            assert_eq!(
                sorted(windowed.pull),
                sorted(whole.pull.clone()),
                "{my_size}/{their_size}"
            );
            assert_eq!(
                sorted(windowed.push),
                sorted(whole.push.clone()),
                "{my_size}/{their_size}"
            );
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
