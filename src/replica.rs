//! One node's replica of its share of the keys.
//!
//! [`ReplicaStore`] is what the internal `Replica` service and the local side
//! of the coordinator call. It enforces the one storage rule of DKVS: *a
//! replica stores a write only if its version is newer than the one it
//! holds*, and otherwise says which version it holds. Writes to the same key
//! are serialised by a striped lock so the read-compare-write is atomic; the
//! stripes are std mutexes because they are held only across a synchronous
//! storage call, never across an `.await`.
//!
//! It also owns the node's Lamport clock, merged with every version the
//! replica sees, and recovered at start-up from the persisted ceiling and the
//! highest version in the data.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use xxhash_rust::xxh3::xxh3_64;

use crate::clock::{LamportClock, NodeId, Version};
use crate::error::{Error, Result};
use crate::record::Record;
use crate::ring::{Ring, key_hash};
use crate::storage::{Held, Storage};

/// Metadata name under which the clock's ceiling is persisted.
const CLOCK_CEILING: &str = "clock_ceiling";
/// Number of per-key lock stripes.
const STRIPES: usize = 256;

/// The result of a conditional write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteOutcome {
    /// True when this call stored the record.
    pub applied: bool,
    /// The version held after the call (the record's own when applied or
    /// already held; a newer one when refused).
    pub held: Version,
}

/// Counts kept in memory, exact: initialised by a scan at start-up and
/// updated on every applied write.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LocalStats {
    /// Keys whose stored record is a value.
    pub live_keys: u64,
    /// Keys whose stored record is a tombstone.
    pub tombstones: u64,
    /// The clock's current timestamp.
    pub lamport: u64,
}

pub struct ReplicaStore {
    /// This node's id; stamped into the versions it issues.
    node_id: NodeId,
    /// The engine.
    storage: Arc<dyn Storage>,
    /// The Lamport clock (std mutex: held for a tick, plus a rare durable
    /// metadata write, never across an await).
    clock: Arc<Mutex<LamportClock>>,
    /// The highest clock ceiling persisted; held while persisting one, so
    /// the persisted value only ever grows.
    persisted_ceiling: Arc<Mutex<u64>>,
    /// Per-key write serialisation.
    stripes: Vec<Mutex<()>>,
    /// See [`LocalStats::live_keys`].
    live_keys: AtomicU64,
    /// See [`LocalStats::tombstones`].
    tombstones: AtomicU64,
    /// The ring, to place keys in token ranges.
    ring: Arc<Ring>,
    /// Per token range: XOR of [`record_digest`] over the records held
    /// (std mutex: held for one XOR or one copy). Anti-entropy compares them.
    digests: Mutex<Vec<u64>>,
}

/// Storage key of `key`: its ring hash (8 bytes, big-endian) then the key,
/// so that storage order is ring order and a token range is a key range.
pub fn storage_key(key: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + key.len());
    out.extend_from_slice(&key_hash(key.as_bytes()).to_be_bytes());
    out.extend_from_slice(key.as_bytes());
    out
}

/// The user key inside a storage key.
fn user_key(storage_key: &[u8]) -> Option<&str> {
    storage_key
        .get(8..)
        .and_then(|k| std::str::from_utf8(k).ok())
}

/// What anti-entropy compares: a hash of the key and the version held
/// (and whether it is a tombstone).
pub fn record_digest(key: &str, held: Held) -> u64 {
    let mut bytes = Vec::with_capacity(key.len() + 17);
    bytes.extend_from_slice(key.as_bytes());
    bytes.extend_from_slice(&held.version.lamport.to_le_bytes());
    bytes.extend_from_slice(&held.version.node_id.to_le_bytes());
    bytes.push(u8::from(held.tombstone));
    xxh3_64(&bytes)
}

/// One key of a token range, as anti-entropy lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangeEntry {
    pub key: String,
    pub version: Version,
    pub tombstone: bool,
    /// For tombstones: the deletion time (ms since the Unix epoch).
    pub deleted_at_ms: u64,
}

/// Persists `ceiling` unless a higher one already is (renewals in the
/// background and a synchronous persist may race; the stored value must
/// never go down).
fn persist_ceiling(storage: &dyn Storage, persisted: &Mutex<u64>, ceiling: u64) -> Result<()> {
    let mut persisted = lock(persisted);
    if ceiling <= *persisted {
        return Ok(());
    }
    storage.put_meta_durable(CLOCK_CEILING, ceiling)?;
    *persisted = ceiling;
    Ok(())
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded state is only ever changed by complete assignments, so a
    // panic elsewhere cannot leave it half-updated.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl ReplicaStore {
    /// Opens the replica over `storage`: counts keys, computes the range
    /// digests and recovers the clock.
    pub fn open(node_id: NodeId, storage: Arc<dyn Storage>, ring: Arc<Ring>) -> Result<Self> {
        let mut live_keys = 0u64;
        let mut tombstones = 0u64;
        let mut max_lamport = 0u64;
        let mut corrupt_records = 0u64;
        let mut bad_keys = 0u64;
        let mut digests = vec![0u64; ring.range_count().max(1)];
        storage.for_each_held(
            &mut |stored_key, held| {
                let Some(key) = user_key(stored_key) else {
                    bad_keys += 1;
                    return;
                };
                if held.tombstone {
                    tombstones += 1;
                } else {
                    live_keys += 1;
                }
                max_lamport = max_lamport.max(held.version.lamport);
                digests[ring.range_of(key_hash(key.as_bytes()))] ^= record_digest(key, held);
            },
            &mut |key, why| {
                corrupt_records += 1;
                tracing::error!(key = %String::from_utf8_lossy(key), %why, "skipping corrupt record");
            },
        )?;
        corrupt_records += bad_keys;
        if corrupt_records > 0 {
            tracing::error!(
                corrupt_records,
                "some stored records could not be read; repair will restore them from other replicas"
            );
        }
        let ceiling = storage.get_meta(CLOCK_CEILING)?.unwrap_or(0);
        let clock = LamportClock::recover(node_id, ceiling, max_lamport);
        tracing::info!(
            live_keys,
            tombstones,
            lamport = clock.now(),
            "replica opened"
        );
        Ok(Self {
            node_id,
            storage,
            clock: Arc::new(Mutex::new(clock)),
            persisted_ceiling: Arc::new(Mutex::new(ceiling)),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            live_keys: AtomicU64::new(live_keys),
            tombstones: AtomicU64::new(tombstones),
            ring,
            digests: Mutex::new(digests),
        })
    }

    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// The record this replica holds for `key`.
    pub fn read(&self, key: &str) -> Result<Option<Record>> {
        self.storage.get(&storage_key(key))
    }

    fn stripe(&self, key: &str) -> MutexGuard<'_, ()> {
        lock(&self.stripes[(xxh3_64(key.as_bytes()) as usize) % STRIPES])
    }

    fn update_digest(&self, key: &str, before: Option<Held>, after: Option<Held>) {
        let range = self.ring.range_of(key_hash(key.as_bytes()));
        let mut digests = lock(&self.digests);
        if let Some(slot) = digests.get_mut(range) {
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
        lock(&self.digests).get(range).copied().unwrap_or(0)
    }

    /// Every key held in token range `range`, with its version.
    pub fn range_entries(&self, range: usize) -> Result<Vec<RangeEntry>> {
        let mut entries = Vec::new();
        for (first, last) in self.ring.range_hashes(range) {
            let from = first.to_be_bytes();
            let to = last.checked_add(1).map(|end| end.to_be_bytes());
            self.storage.scan(
                &from,
                to.as_ref().map(|t| &t[..]),
                &mut |stored_key, record| {
                    if let Some(key) = user_key(stored_key) {
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

    /// Tombstones deleted at or before `deleted_before_ms`, at most `limit`.
    pub fn old_tombstones(
        &self,
        deleted_before_ms: u64,
        limit: usize,
    ) -> Result<Vec<(String, Version)>> {
        let mut found = Vec::new();
        self.storage.for_each_tombstone(&mut |stored_key, record| {
            if found.len() < limit
                && record.deleted_at_ms <= deleted_before_ms
                && let Some(key) = user_key(stored_key)
            {
                found.push((key.to_string(), record.version));
            }
        })?;
        Ok(found)
    }

    /// Removes `key` if it still holds exactly the tombstone `version`.
    /// Answers whether it did.
    pub fn purge_tombstone(&self, key: &str, version: Version) -> Result<bool> {
        let _stripe = self.stripe(key);
        let stored = storage_key(key);
        let Some(held) = self.storage.get(&stored)? else {
            return Ok(false);
        };
        if !held.is_tombstone() || held.version != version {
            return Ok(false);
        }
        self.storage.delete(&stored)?;
        self.storage.flush()?;
        self.tombstones.fetch_sub(1, Ordering::Relaxed);
        self.update_digest(key, Some(Held::of(&held)), None);
        Ok(true)
    }

    /// Stores `record` if it is newer than what this replica holds.
    pub fn write_if_newer(&self, key: &str, record: &Record) -> Result<WriteOutcome> {
        let outcome = self.apply(key, record)?;
        self.storage.flush()?;
        Ok(outcome)
    }

    /// [`ReplicaStore::write_if_newer`] for many writes, with one flush to
    /// the operating system for all of them (group commit): no outcome is
    /// returned before every applied write is flushed.
    pub fn write_many<'a>(
        &self,
        writes: impl IntoIterator<Item = (&'a str, &'a Record)>,
    ) -> Vec<Result<WriteOutcome>> {
        let results: Vec<Result<WriteOutcome>> = writes
            .into_iter()
            .map(|(key, record)| self.apply(key, record))
            .collect();
        match self.storage.flush() {
            Ok(()) => results,
            Err(error) => {
                let why = error.to_string();
                results
                    .into_iter()
                    .map(|r| r.and_then(|_| Err(Error::Storage(why.clone()))))
                    .collect()
            }
        }
    }

    /// Stores `record` if newer, without flushing.
    fn apply(&self, key: &str, record: &Record) -> Result<WriteOutcome> {
        self.observe(record.version);
        let _stripe = self.stripe(key);
        let stored = storage_key(key);
        let held = match self.storage.held(&stored) {
            Err(Error::CorruptRecord { why, .. }) => {
                tracing::warn!(key, %why, "overwriting a corrupt record");
                None
            }
            other => other?,
        };
        if let Some(held) = held
            && held.version >= record.version
        {
            return Ok(WriteOutcome {
                applied: false,
                held: held.version,
            });
        }
        self.storage.put(&stored, record)?;
        self.count_transition(held, record);
        self.update_digest(key, held, Some(Held::of(record)));
        Ok(WriteOutcome {
            applied: true,
            held: record.version,
        })
    }

    fn count_transition(&self, before: Option<Held>, after: &Record) {
        match before {
            Some(before) if before.tombstone => self.tombstones.fetch_sub(1, Ordering::Relaxed),
            Some(_) => self.live_keys.fetch_sub(1, Ordering::Relaxed),
            None => 0,
        };
        if after.is_tombstone() {
            self.tombstones.fetch_add(1, Ordering::Relaxed);
        } else {
            self.live_keys.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Issues a new version, above every version this node has seen.
    pub fn next_version(&self) -> Result<Version> {
        let mut clock = lock(&self.clock);
        let before = clock.clone();
        let Some(tick) = clock.tick() else {
            return Err(Error::Internal(format!(
                "the Lamport clock is exhausted at {}; a bogus version reached this node",
                clock.now()
            )));
        };
        if let Some(ceiling) = tick.persist_ceiling
            && let Err(error) = persist_ceiling(&*self.storage, &self.persisted_ceiling, ceiling)
        {
            // Do not use a version the clock could reissue after a restart.
            *clock = before;
            return Err(Error::Storage(format!("cannot persist the clock: {error}")));
        }
        drop(clock);
        if let Some(ceiling) = tick.renew_ceiling {
            self.renew_ceiling(ceiling);
        }
        Ok(tick.version)
    }

    /// Persists the clock's next ceiling off the request path (on tokio's
    /// blocking pool; inline when there is no runtime, as in unit tests).
    fn renew_ceiling(&self, ceiling: u64) {
        let (storage, persisted, clock) = (
            self.storage.clone(),
            self.persisted_ceiling.clone(),
            self.clock.clone(),
        );
        let renew = move || match persist_ceiling(&*storage, &persisted, ceiling) {
            Ok(()) => lock(&clock).renewed(ceiling),
            Err(error) => {
                tracing::warn!(%error, "cannot persist the clock's next ceiling; will retry");
                lock(&clock).renewal_failed(ceiling);
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(renew)),
            Err(_) => renew(),
        }
    }

    /// Merges a version seen elsewhere into the clock.
    pub fn observe(&self, version: Version) {
        lock(&self.clock).observe(version);
    }

    pub fn stats(&self) -> LocalStats {
        LocalStats {
            live_keys: self.live_keys.load(Ordering::Relaxed),
            tombstones: self.tombstones.load(Ordering::Relaxed),
            lamport: lock(&self.clock).now(),
        }
    }

    /// Forces everything written so far to stable storage.
    pub fn sync(&self) -> Result<()> {
        self.storage.sync()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::Member;
    use crate::storage::MemoryStorage;

    fn ring() -> Arc<Ring> {
        Arc::new(Ring::new(
            [Member::new("127.0.0.1:7001"), Member::new("127.0.0.1:7002")],
            8,
        ))
    }

    fn store() -> (Arc<MemoryStorage>, ReplicaStore) {
        let storage = Arc::new(MemoryStorage::new());
        let replica = ReplicaStore::open(1, storage.clone(), ring()).expect("open");
        (storage, replica)
    }

    #[test]
    fn stores_only_newer_versions_and_reports_what_it_holds() {
        let (_, replica) = store();
        let v5 = Record::value(Version::new(5, 2), &b"five"[..]);
        let v3 = Record::value(Version::new(3, 2), &b"three"[..]);
        let outcome = replica.write_if_newer("k", &v5).expect("write");
        assert_eq!(
            outcome,
            WriteOutcome {
                applied: true,
                held: v5.version
            }
        );
        let outcome = replica.write_if_newer("k", &v3).expect("write");
        assert_eq!(
            outcome,
            WriteOutcome {
                applied: false,
                held: v5.version
            }
        );
        // Same version again: not applied, but held (counts as an ack).
        let outcome = replica.write_if_newer("k", &v5).expect("write");
        assert_eq!(
            outcome,
            WriteOutcome {
                applied: false,
                held: v5.version
            }
        );
        assert_eq!(replica.read("k").expect("read"), Some(v5));
    }

    #[test]
    fn every_version_seen_advances_the_clock() {
        let (_, replica) = store();
        let first = replica.next_version().expect("tick");
        replica
            .write_if_newer("k", &Record::value(Version::new(40, 9), &b"x"[..]))
            .expect("write");
        let next = replica.next_version().expect("tick");
        assert!(next > first);
        assert_eq!(next, Version::new(41, 1));
    }

    #[test]
    fn counts_follow_values_and_tombstones() {
        let (_, replica) = store();
        replica
            .write_if_newer("a", &Record::value(Version::new(1, 1), &b"x"[..]))
            .expect("write");
        replica
            .write_if_newer("b", &Record::value(Version::new(1, 1), &b"x"[..]))
            .expect("write");
        replica
            .write_if_newer("a", &Record::tombstone(Version::new(2, 1)))
            .expect("write");
        assert_eq!(
            (replica.stats().live_keys, replica.stats().tombstones),
            (1, 1)
        );
        replica
            .write_if_newer("a", &Record::value(Version::new(3, 1), &b"y"[..]))
            .expect("write");
        assert_eq!(
            (replica.stats().live_keys, replica.stats().tombstones),
            (2, 0)
        );
    }

    #[test]
    fn reopening_recovers_counts_and_never_reissues_a_version() {
        let (storage, replica) = store();
        let mut last = Version::default();
        for i in 0..100 {
            last = replica.next_version().expect("tick");
            replica
                .write_if_newer(&format!("k{i}"), &Record::value(last, &b"v"[..]))
                .expect("write");
        }
        // One issued version that never reached storage.
        let unstored = replica.next_version().expect("tick");
        drop(replica);
        let reopened = ReplicaStore::open(1, storage, ring()).expect("reopen");
        assert_eq!(reopened.stats().live_keys, 100);
        let next = reopened.next_version().expect("tick");
        assert!(next > last && next > unstored);
    }

    #[test]
    fn corrupt_records_are_reported_not_fatal() {
        let storage = Arc::new(MemoryStorage::new());
        storage.put_raw(&storage_key("bad"), vec![1, 2, 3]);
        let replica = ReplicaStore::open(1, storage, ring()).expect("open despite corruption");
        assert!(matches!(
            replica.read("bad"),
            Err(Error::CorruptRecord { .. })
        ));
        // A write (or read repair) replaces the corrupt record.
        let record = Record::value(Version::new(1, 1), &b"x"[..]);
        replica.write_if_newer("bad", &record).expect("write");
        assert_eq!(replica.read("bad").expect("read"), Some(record));
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
        let ranges = replica.ring.range_count();
        let live: Vec<u64> = (0..ranges).map(|r| replica.range_digest(r)).collect();
        let reopened = ReplicaStore::open(1, storage, ring()).expect("reopen");
        let scanned: Vec<u64> = (0..ranges).map(|r| reopened.range_digest(r)).collect();
        assert_eq!(live, scanned, "incremental digests equal a full recount");
        // Range listings partition the keys.
        let listed: usize = (0..ranges)
            .map(|r| reopened.range_entries(r).expect("list").len())
            .sum();
        assert_eq!(listed, 300);
        let k7 = replica.ring.range_of(key_hash(b"k7"));
        let entry = reopened
            .range_entries(k7)
            .expect("list")
            .into_iter()
            .find(|e| e.key == "k7")
            .expect("k7 listed");
        assert!(entry.tombstone && entry.deleted_at_ms == 5);
    }

    #[test]
    fn purging_removes_only_the_exact_tombstone() {
        let (_, replica) = store();
        let tombstone = Record::tombstone_at(Version::new(5, 1), 10);
        replica.write_if_newer("gone", &tombstone).expect("delete");
        replica
            .write_if_newer("kept", &Record::value(Version::new(5, 1), &b"v"[..]))
            .expect("write");
        assert_eq!(replica.old_tombstones(9, 10).expect("scan"), vec![]);
        assert_eq!(
            replica.old_tombstones(10, 10).expect("scan"),
            vec![("gone".to_string(), tombstone.version)]
        );
        assert!(
            !replica
                .purge_tombstone("gone", Version::new(4, 1))
                .expect("purge"),
            "other version"
        );
        assert!(
            !replica
                .purge_tombstone("kept", Version::new(5, 1))
                .expect("purge"),
            "not a tombstone"
        );
        let range = replica.ring.range_of(key_hash(b"gone"));
        let before = replica.range_digest(range);
        assert!(
            replica
                .purge_tombstone("gone", tombstone.version)
                .expect("purge")
        );
        assert_eq!(replica.read("gone").expect("read"), None);
        assert_eq!(replica.stats().tombstones, 0);
        assert_ne!(replica.range_digest(range), before);
    }
}
