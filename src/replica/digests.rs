//! What anti-entropy compares and lists: per token range, the XOR of
//! [`record_digest`] over the records held (kept exact on every write
//! through [`ReplicaStore::update_digest`]), the keys of a range with their
//! versions ([`RangeEntry`]), and the tombstones old enough to collect.

use xxhash_rust::xxh3::xxh3_64;

use super::{ReplicaStore, user_key};
use crate::clock::Version;
use crate::error::Result;
use crate::locks::Locked;
use crate::ring::key_hash;
use crate::storage::Held;

/// What anti-entropy compares: a hash of the key and the version held
/// (and whether it is a tombstone).
pub fn record_digest(key: &str, held: Held) -> u64 {
    let mut bytes = Vec::with_capacity(key.len() + 17);
    bytes.extend_from_slice(key.as_bytes());
    bytes.extend_from_slice(&held.version.hlc.to_le_bytes());
    bytes.extend_from_slice(&held.version.instance_id.0.to_le_bytes());
    bytes.push(u8::from(held.tombstone));
    xxh3_64(&bytes)
}

/// Records of a hash interval, and the storage key to resume after.
pub type RecordsIn = (Vec<(String, crate::record::Record)>, Option<Vec<u8>>);

/// One page of a range listing, and the storage key to resume after
/// (`None`: the range is done).
pub type RangePage = (Vec<RangeEntry>, Option<Vec<u8>>);

/// Where tombstone collection resumes: a storage key (empty: the start).
pub type GcCursor = Vec<u8>;

/// One key of a token range, as anti-entropy lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangeEntry {
    pub key: String,
    pub version: Version,
    pub tombstone: bool,
    /// For tombstones: the deletion time (ms since the Unix epoch).
    pub deleted_at_ms: u64,
}

impl ReplicaStore {
    pub(super) fn update_digest(&self, key: &str, before: Option<Held>, after: Option<Held>) {
        let mut digests = self.digests.locked();
        let range = digests.ring.range_of(key_hash(key.as_bytes()));
        if let Some(slot) = digests.per_range.get_mut(range) {
            if let Some(before) = before {
                *slot ^= record_digest(key, before);
            }
            if let Some(after) = after {
                *slot ^= record_digest(key, after);
            }
        }
    }

    /// The digest of token range `range` (0 when nothing is held there).
    pub fn range_digest(&self, range: usize) -> u64 {
        self.digests
            .locked()
            .per_range
            .get(range)
            .copied()
            .unwrap_or(0)
    }

    /// The layout version the digests' ring is of (0: none).
    pub fn digests_layout_version(&self) -> u64 {
        self.digests.locked().layout_version
    }

    /// The ring the digests are over.
    pub(crate) fn digest_ring(&self) -> std::sync::Arc<crate::ring::Ring> {
        self.digests.locked().ring.clone()
    }

    /// Every key held in token range `range`, with its version.
    pub fn range_entries(&self, range: usize) -> Result<Vec<RangeEntry>> {
        let mut entries = Vec::new();
        let ring = self.digest_ring();
        for (first, last) in ring.range_hashes(range) {
            let from = first.to_be_bytes();
            let to = last.checked_add(1).map(|end| end.to_be_bytes());
            self.storage.scan(
                &from,
                to.as_ref().map(|t| &t[..]),
                &mut |stored_key, record| {
                    if let Some(key) = user_key(stored_key)
                        && self.check_held(key, record.version).is_ok()
                    {
                        entries.push(RangeEntry {
                            key: key.to_string(),
                            version: record.version,
                            tombstone: record.is_tombstone(),
                            deleted_at_ms: record.deleted_at_ms,
                        });
                    }
                },
            )?;
        }
        Ok(entries)
    }

    /// Up to `limit` keys of token range `range` (at least one, and fewer
    /// once their keys reach `max_bytes`), in storage order, starting after
    /// storage key `after` (empty: from the start); with the storage key
    /// to resume after when more may follow. The scan stops at the page's
    /// end: a page costs its own size, never the range's.
    pub fn range_entries_page(
        &self,
        range: usize,
        after: &[u8],
        limit: usize,
        max_bytes: usize,
    ) -> Result<RangePage> {
        self.page_on(&self.digest_ring(), range, after, limit, max_bytes)
    }

    /// [`ReplicaStore::range_entries_page`] on the ring of layout
    /// `version`, which the digests must be counted over (checked and taken
    /// under one lock: a layout switching meanwhile cannot give the page
    /// another ring's ranges). UNAVAILABLE while they are another's.
    pub fn range_entries_page_of(
        &self,
        version: u64,
        range: usize,
        after: &[u8],
        limit: usize,
        max_bytes: usize,
    ) -> Result<RangePage> {
        let ring = {
            let digests = self.digests.locked();
            if digests.layout_version != version {
                return Err(crate::error::Error::Unavailable(format!(
                    "this node is switching layouts (its ranges are v{}'s, not v{version}'s)",
                    digests.layout_version
                )));
            }
            digests.ring.clone()
        };
        self.page_on(&ring, range, after, limit, max_bytes)
    }

    fn page_on(
        &self,
        ring: &crate::ring::Ring,
        range: usize,
        after: &[u8],
        limit: usize,
        max_bytes: usize,
    ) -> Result<RangePage> {
        let limit = limit.max(1);
        let mut intervals = ring.range_hashes(range);
        intervals.sort_unstable();
        let (mut entries, mut bytes) = (Vec::new(), 0usize);
        let mut last_key: Vec<u8> = Vec::new();
        let mut resume = None;
        for (first, last) in intervals {
            let start = first.to_be_bytes();
            let to = last.checked_add(1).map(|end| end.to_be_bytes());
            if to.is_some_and(|to| after >= &to[..]) {
                continue; // the cursor is past this interval
            }
            let from: &[u8] = if after > &start[..] { after } else { &start };
            self.storage.scan_while(
                from,
                to.as_ref().map(|t| &t[..]),
                &mut |stored_key, record| {
                    if stored_key == after {
                        return true;
                    }
                    if entries.len() == limit || bytes >= max_bytes {
                        resume = Some(last_key.clone());
                        return false;
                    }
                    if let Some(key) = user_key(stored_key)
                        && self.check_held(key, record.version).is_ok()
                    {
                        bytes += key.len() + 40;
                        last_key = stored_key.to_vec();
                        entries.push(RangeEntry {
                            key: key.to_string(),
                            version: record.version,
                            tombstone: record.is_tombstone(),
                            deleted_at_ms: record.deleted_at_ms,
                        });
                    }
                    true
                },
            )?;
            if resume.is_some() {
                break;
            }
        }
        Ok((entries, resume))
    }

    /// Up to `limit` records whose key hash is in `first..=last`, in
    /// storage order, starting after storage key `after` (empty: from the
    /// start); with the storage key to resume after when more may follow.
    /// What a joining node streams.
    pub fn records_in(
        &self,
        first: u64,
        last: u64,
        after: &[u8],
        limit: usize,
        max_bytes: usize,
    ) -> Result<RecordsIn> {
        let mut bytes = 0usize;
        let start = first.to_be_bytes();
        let from: &[u8] = if after > &start[..] { after } else { &start };
        let to = last.checked_add(1).map(|end| end.to_be_bytes());
        let mut records = Vec::new();
        let mut resume = None;
        self.storage.scan_while(
            from,
            to.as_ref().map(|t| &t[..]),
            &mut |stored_key, record| {
                if stored_key == after {
                    return true;
                }
                if records.len() == limit || bytes >= max_bytes {
                    resume = records
                        .last()
                        .map(|(k, _): &(String, crate::record::Record)| {
                            crate::replica::storage_key(k)
                        });
                    return false;
                }
                if let Some(key) = user_key(stored_key)
                    && self.check_held(key, record.version).is_ok()
                {
                    bytes += key.len() + record.value.as_ref().map_or(0, |v| v.len()) + 32;
                    records.push((key.to_string(), record.clone()));
                }
                true
            },
        )?;
        Ok((records, resume))
    }

    /// Removes every record whose key hash `keep` refuses (data of ranges
    /// this node no longer replicates, after a move settled). Answers how
    /// many were removed.
    pub fn drop_unowned(&self, keep: &dyn Fn(u64) -> bool) -> Result<u64> {
        let mut doomed: Vec<Vec<u8>> = Vec::new();
        self.storage.for_each_held(
            &mut |stored_key, _| {
                if let Some(key) = user_key(stored_key)
                    && !keep(key_hash(key.as_bytes()))
                {
                    doomed.push(stored_key.to_vec());
                }
            },
            &mut |_, _| {},
        )?;
        let mut dropped = 0;
        for stored in doomed {
            let Some(key) = user_key(&stored) else {
                continue;
            };
            let _stripe = self.stripe(key);
            let Some(held) = self.storage.held(&stored)? else {
                continue;
            };
            self.storage.delete(&stored)?;
            if held.tombstone {
                self.tombstones
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            } else {
                self.live_keys
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            }
            self.update_digest(key, Some(held), None);
            dropped += 1;
        }
        self.storage.flush()?;
        Ok(dropped)
    }

    /// Up to `limit` tombstones made at or before `deleted_before_ms` (see
    /// [`crate::record::tombstone_time_ms`]), taken in storage-key
    /// order from just after `cursor`, wrapping around to the start. Also
    /// answers the cursor for the next call (the last key returned), so
    /// tombstones that cannot be purged yet do not hold back the rest.
    pub fn old_tombstones(
        &self,
        deleted_before_ms: u64,
        cursor: &[u8],
        limit: usize,
    ) -> Result<(Vec<(String, Version)>, GcCursor)> {
        use std::collections::BinaryHeap;
        // The `limit` smallest keys after the cursor, and the `limit`
        // smallest at or before it (for the wrap-around): bounded memory
        // whatever order the engine visits keys in.
        let mut after: BinaryHeap<(Vec<u8>, Version)> = BinaryHeap::new();
        let mut before: BinaryHeap<(Vec<u8>, Version)> = BinaryHeap::new();
        self.storage.for_each_tombstone(&mut |stored_key, record| {
            let made = crate::record::tombstone_time_ms(record.version, record.deleted_at_ms);
            if made > deleted_before_ms || user_key(stored_key).is_none() {
                return;
            }
            let heap = if stored_key > cursor {
                &mut after
            } else {
                &mut before
            };
            if heap.len() < limit {
                heap.push((stored_key.to_vec(), record.version));
            } else if heap
                .peek()
                .is_some_and(|(top, _)| stored_key < top.as_slice())
            {
                heap.pop();
                heap.push((stored_key.to_vec(), record.version));
            }
        })?;
        let mut picked = after.into_sorted_vec();
        let room = limit.saturating_sub(picked.len());
        picked.extend(before.into_sorted_vec().into_iter().take(room));
        let next_cursor = picked.last().map(|(k, _)| k.clone()).unwrap_or_default();
        let found = picked
            .into_iter()
            .filter_map(|(stored, version)| user_key(&stored).map(|k| (k.to_string(), version)))
            .collect();
        Ok((found, next_cursor))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{InstanceId, SkewBound};
    use crate::record::Record;
    use crate::replica::tests::{ring, store};

    #[test]
    fn pages_of_a_range_list_it_whole_in_order_and_stop_at_their_size() {
        let (_storage, replica) = store();
        for i in 0..500 {
            let record = Record::value(Version::new(i + 1, 1), &b"v"[..]);
            replica
                .write_if_newer(&format!("k{i}"), &record)
                .expect("write");
        }
        let ring = replica.digest_ring();
        // The range that wraps around zero has two intervals: a cursor
        // must carry across them.
        for range in [0, 1, ring.range_count() - 1] {
            let whole = replica.range_entries(range).expect("list");
            for (limit, max_bytes) in [
                (1, usize::MAX),
                (3, usize::MAX),
                (1000, usize::MAX),
                (1000, 50),
            ] {
                let (mut paged, mut after, mut pages) = (Vec::new(), Vec::new(), 0);
                loop {
                    let (page, next) = replica
                        .range_entries_page(range, &after, limit, max_bytes)
                        .expect("page");
                    assert!(page.len() <= limit, "a page holds at most its limit");
                    pages += 1;
                    paged.extend(page);
                    match next {
                        Some(next) => {
                            assert!(next > after, "the cursor advances");
                            after = next;
                        }
                        None => break,
                    }
                    assert!(pages <= whole.len() + 1, "paging ends");
                }
                let mut sorted = whole.clone();
                sorted.sort_by_key(|e| crate::replica::storage_key(&e.key));
                assert_eq!(
                    paged, sorted,
                    "range {range}, pages of {limit} / {max_bytes} B"
                );
            }
        }
    }

    #[test]
    fn range_digests_track_writes_and_match_a_fresh_scan() {
        let (storage, replica) = store();
        for i in 0..300 {
            let record = Record::value(Version::new(i + 1, 1), &b"v"[..]);
            replica
                .write_if_newer(&format!("k{i}"), &record)
                .expect("write");
        }
        replica
            .write_if_newer("k7", &Record::tombstone_at(Version::new(1000, 1), 5))
            .expect("delete");
        let ranges = replica.digest_ring().range_count();
        let live: Vec<u64> = (0..ranges).map(|r| replica.range_digest(r)).collect();
        let reopened = ReplicaStore::open(InstanceId(1), storage, ring(), SkewBound::default())
            .expect("reopen");
        let scanned: Vec<u64> = (0..ranges).map(|r| reopened.range_digest(r)).collect();
        assert_eq!(live, scanned, "incremental digests equal a full recount");
        // Range listings partition the keys.
        let listed: usize = (0..ranges)
            .map(|r| reopened.range_entries(r).expect("list").len())
            .sum();
        assert_eq!(listed, 300);
        let k7 = replica.digest_ring().range_of(key_hash(b"k7"));
        let entry = reopened
            .range_entries(k7)
            .expect("list")
            .into_iter()
            .find(|e| e.key == "k7")
            .expect("k7 listed");
        assert!(entry.tombstone && entry.deleted_at_ms == 5);
    }

    #[test]
    fn digests_recounted_for_a_new_ring_while_writes_go_on_equal_a_fresh_scan() {
        let (storage, replica) = store();
        let replica = std::sync::Arc::new(replica);
        for i in 0..500 {
            let record = Record::value(Version::new(i + 1, 1), &b"v"[..]);
            replica
                .write_if_newer(&format!("k{i}"), &record)
                .expect("write");
        }
        let bigger = std::sync::Arc::new(crate::ring::Ring::new(
            (1..=4).map(|i| crate::ring::Member::new(format!("127.0.0.1:700{i}"))),
            8,
        ));
        // Writes race the recount.
        let writer = {
            let replica = replica.clone();
            std::thread::spawn(move || {
                for i in 0..2000u64 {
                    let record = Record::value(Version::new(1000 + i, 1), &b"w"[..]);
                    replica
                        .write_if_newer(&format!("k{}", i % 700), &record)
                        .expect("write");
                }
            })
        };
        assert_eq!(replica.digests_layout_version(), 0);
        replica.rebuild_digests(bigger.clone(), 2).expect("recount");
        writer.join().expect("writer");
        assert_eq!(replica.digests_layout_version(), 2);
        // An older layout's recount arriving late changes nothing.
        replica.rebuild_digests(ring(), 1).expect("stale recount");
        assert_eq!(replica.digests_layout_version(), 2);
        let ranges = bigger.range_count();
        // What anti-entropy does for a range it finds off with nothing to
        // copy: recount it exactly. After that, every range is exact.
        for range in 0..ranges {
            replica.recount_range(range).expect("recount a range");
        }
        let live: Vec<u64> = (0..ranges).map(|r| replica.range_digest(r)).collect();
        let reopened = ReplicaStore::open(InstanceId(1), storage, bigger, SkewBound::default())
            .expect("reopen");
        let scanned: Vec<u64> = (0..ranges).map(|r| reopened.range_digest(r)).collect();
        assert_eq!(
            live, scanned,
            "recounted and then updated digests equal a full recount"
        );
        // Without racing writes, the one-pass recount is exact by itself.
        let (_, quiet) = store();
        for i in 0..300 {
            let record = Record::value(Version::new(i + 1, 1), &b"v"[..]);
            quiet
                .write_if_newer(&format!("k{i}"), &record)
                .expect("write");
        }
        quiet
            .rebuild_digests(reopened.digest_ring(), 3)
            .expect("recount");
        let fresh: Vec<u64> = (0..ranges).map(|r| quiet.range_digest(r)).collect();
        let expected: Vec<u64> = {
            let (storage, again) = store();
            for i in 0..300 {
                let record = Record::value(Version::new(i + 1, 1), &b"v"[..]);
                again
                    .write_if_newer(&format!("k{i}"), &record)
                    .expect("write");
            }
            let reopened = ReplicaStore::open(
                InstanceId(1),
                storage,
                reopened.digest_ring(),
                SkewBound::default(),
            )
            .expect("reopen");
            (0..ranges).map(|r| reopened.range_digest(r)).collect()
        };
        assert_eq!(fresh, expected);
    }

    #[test]
    fn tombstone_collection_walks_with_a_cursor_and_ages_by_version() {
        let (_, replica) = store();
        let t0 = 1_750_000_000_000u64;
        // 25 tombstones made at t0 by the HLC (deleted_at_ms lies: 0), and
        // one made later, not old enough.
        for i in 0..25 {
            let version = Version::new(crate::clock::hlc_of_ms(t0) + i, 1);
            replica
                .write_if_newer(&format!("k{i}"), &Record::tombstone_at(version, 0))
                .expect("delete");
        }
        let young = Version::new(crate::clock::hlc_of_ms(t0 + 5000), 1);
        replica
            .write_if_newer("young", &Record::tombstone_at(young, 0))
            .expect("delete");
        assert_eq!(
            replica.old_tombstones(t0 - 1, &[], 10).expect("scan").0,
            vec![]
        );
        // Rounds of 10 visit every old tombstone once per 3 rounds, even if
        // none is ever purged (their replicas are down).
        let mut cursor = Vec::new();
        let mut seen = std::collections::BTreeMap::new();
        for _ in 0..3 {
            let (found, next) = replica
                .old_tombstones(t0 + 1000, &cursor, 10)
                .expect("scan");
            assert_eq!(found.len(), 10);
            for (key, _) in found {
                *seen.entry(key).or_insert(0) += 1;
            }
            cursor = next;
        }
        assert_eq!(seen.len(), 25, "every tombstone reached: {seen:?}");
        assert!(!seen.contains_key("young"));
    }
}
