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
//! It also owns the node's hybrid logical clock, merged with every version
//! the replica sees, and recovered at start-up from the persisted ceiling and
//! the highest version in the data.
//!
//! A version further ahead of the wall clock than `--max-clock-skew-ms` is
//! never stored. One already stored that no node can have issued (more
//! than a day ahead: a data dir poisoned before the bound existed) is
//! treated like a corrupt record: it is counted and logged at start-up, not
//! merged into the clock, read as a failure (so a quorum read never returns
//! it and read repair never spreads it), left out of anti-entropy listings,
//! and overwritten by the next valid write. A stored version merely beyond
//! the bound is genuine — the wall clock stepped back since it was accepted
//! — and keeps every right of a version: it wins over older ones and is
//! merged into the clock (which then refuses to stamp until the wall clock
//! catches up, rather than issue a version twice).
//!
//! The write path is in `write.rs`; the range digests and the listings
//! anti-entropy and tombstone collection read are in `digests.rs`; the
//! fence for copies made in the background, and dropping what moved away
//! once its new owners hold it, in `fence.rs`.

mod digests;
mod fence;
mod write;

pub use digests::{GcCursor, RangeEntry, record_digest};
pub use fence::replicates;
pub use write::WriteOutcome;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use xxhash_rust::xxh3::xxh3_64;

use crate::clock::{HybridClock, InstanceId, SkewBound, Version, wall_clock_ms};
use crate::error::{Error, Result};
use crate::locks::Locked;
use crate::record::Record;
use crate::ring::{Ring, key_hash};
use crate::storage::Storage;
pub use crate::storage::storage_key;

/// Metadata name under which the clock's ceiling is persisted.
const CLOCK_CEILING: &str = "clock_ceiling";
/// Number of per-key lock stripes.
const STRIPES: usize = 256;

/// Counts kept in memory, exact: initialised by a scan at start-up and
/// updated on every applied write.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LocalStats {
    /// Keys whose stored record is a value.
    pub live_keys: u64,
    /// Keys whose stored record is a tombstone.
    pub tombstones: u64,
    /// The clock's current timestamp.
    pub hlc: u64,
    /// Records found at start-up with an impossible version (see
    /// [`SkewBound::check_stored`]).
    pub future_records: u64,
}

/// The layout version of a call placed with no layout (a tool's call, or
/// a replica answering for itself): the fence lets it through.
pub const UNFENCED: u64 = 0;

/// The fence held at the layout version served (see [`ReplicaStore::fence`]).
pub struct FenceGuard<'a>(std::sync::RwLockReadGuard<'a, u64>);

impl FenceGuard<'_> {
    /// The layout version served.
    pub fn serving(&self) -> u64 {
        *self.0
    }

    /// Refuses, unapplied, a request placed with layout `tagged` older than
    /// the one served ([`UNFENCED`] passes).
    pub fn admit(&self, tagged: u64) -> Result<()> {
        if tagged != UNFENCED && tagged < *self.0 {
            return Err(Error::StaleLayout {
                caller: tagged,
                current: *self.0,
            });
        }
        Ok(())
    }
}

pub struct ReplicaStore {
    /// This node's instance; stamped into the versions it issues.
    instance_id: InstanceId,
    /// The engine.
    storage: Arc<dyn Storage>,
    /// The hybrid logical clock (std mutex: held for a tick, plus a rare
    /// durable metadata write, never across an await).
    clock: Arc<Mutex<HybridClock>>,
    /// What versions are accepted: `--max-clock-skew-ms`.
    bound: SkewBound,
    /// See [`LocalStats::future_records`].
    future_records: u64,
    /// Whether this replica may answer quorum reads (given by the node when
    /// it builds the store; none: always).
    read_gate: Option<Arc<crate::identity::Identity>>,
    /// The highest clock ceiling persisted; held while persisting one, so
    /// the persisted value only ever grows.
    persisted_ceiling: Arc<Mutex<u64>>,
    /// Per-key write serialisation.
    stripes: Vec<Mutex<()>>,
    /// See [`LocalStats::live_keys`].
    live_keys: AtomicU64,
    /// See [`LocalStats::tombstones`].
    tombstones: AtomicU64,
    /// Per token range of the read ring: XOR of [`record_digest`] over the
    /// records held (std mutex: held for one XOR or one copy; for a whole
    /// recount when the layout changes). Anti-entropy compares them.
    digests: Mutex<RangeDigests>,
    /// The layout version this replica serves: requests placed with an
    /// older one are refused unapplied. Writes hold it shared from the check
    /// to the apply, and a new layout takes it exclusively, so once a node
    /// serves v+1 no write placed with v is still being applied.
    fence: std::sync::RwLock<u64>,
}

/// Range digests over one ring.
pub(crate) struct RangeDigests {
    /// The layout version the ring is of (0: built without a layout, or
    /// still being counted).
    pub(crate) layout_version: u64,
    /// The layout version being counted (0: none).
    pub(crate) rebuilding: u64,
    pub(crate) ring: Arc<Ring>,
    pub(crate) per_range: Vec<u64>,
}

/// The user key inside a storage key.
fn user_key(storage_key: &[u8]) -> Option<&str> {
    storage_key
        .get(8..)
        .and_then(|k| std::str::from_utf8(k).ok())
}

/// Persists `ceiling` unless a higher one already is (renewals in the
/// background and a synchronous persist may race; the stored value must
/// never go down).
fn persist_ceiling(storage: &dyn Storage, persisted: &Mutex<u64>, ceiling: u64) -> Result<()> {
    let mut persisted = persisted.locked();
    if ceiling <= *persisted {
        return Ok(());
    }
    storage.put_meta_durable(CLOCK_CEILING, ceiling)?;
    *persisted = ceiling;
    Ok(())
}

/// What opening a replica learns from one pass over the stored records.
struct StoredScan {
    /// Records that are values.
    live_keys: u64,
    /// Records that are tombstones.
    tombstones: u64,
    /// Records whose version is beyond the skew bound (not merged into the
    /// clock).
    future_records: u64,
    /// The highest hybrid-clock time among the other records.
    max_hlc: u64,
    /// The digest of each range of the ring.
    digests: Vec<u64>,
}

impl StoredScan {
    /// Reads every stored record once, at wall-clock time `now_ms`, and
    /// logs the ones that cannot be read.
    fn of(storage: &dyn Storage, ring: &Ring, bound: SkewBound, now_ms: u64) -> Result<Self> {
        let mut scan = Self {
            live_keys: 0,
            tombstones: 0,
            future_records: 0,
            max_hlc: 0,
            digests: vec![0u64; ring.range_count().max(1)],
        };
        let mut corrupt_records = 0u64;
        let mut bad_keys = 0u64;
        storage.for_each_held(
            &mut |stored_key, held| {
                let Some(key) = user_key(stored_key) else {
                    bad_keys += 1;
                    return;
                };
                if held.tombstone {
                    scan.tombstones += 1;
                } else {
                    scan.live_keys += 1;
                }
                if let Err(why) = bound.check_stored(held.version, now_ms) {
                    scan.future_records += 1;
                    if scan.future_records <= 10 {
                        tracing::error!(key_hash = %crate::metrics::key_hash(key), %why, "stored record with an impossible version: not merged into the clock; the next write or repair replaces it");
                    }
                } else {
                    scan.max_hlc = scan.max_hlc.max(held.version.hlc);
                }
                scan.digests[ring.range_of(key_hash(key.as_bytes()))] ^= record_digest(key, held);
            },
            &mut |key, why| {
                corrupt_records += 1;
                tracing::error!(key_hash = %user_key(key).map(crate::metrics::key_hash).unwrap_or_else(|| "(not UTF-8)".into()), %why, "skipping corrupt record");
            },
        )?;
        corrupt_records += bad_keys;
        if corrupt_records > 0 {
            tracing::error!(
                corrupt_records,
                "some stored records could not be read; repair will restore them from other replicas"
            );
        }
        Ok(scan)
    }
}

/// The persisted clock ceiling to recover from: one beyond the bound
/// (persisted from a poisoned clock) is ignored the same way as a record
/// beyond it: the wall clock is what versions follow.
fn usable_ceiling(ceiling: u64, bound: SkewBound, now_ms: u64) -> u64 {
    if bound.check_stored(Version::new(ceiling, 0), now_ms).is_ok() {
        ceiling
    } else {
        tracing::error!(
            ceiling,
            "the persisted clock ceiling is beyond --max-clock-skew-ms; ignoring it"
        );
        0
    }
}

impl ReplicaStore {
    /// Opens the replica over `storage`: counts keys, computes the range
    /// digests and recovers the clock.
    pub fn open(
        instance_id: InstanceId,
        storage: Arc<dyn Storage>,
        ring: Arc<Ring>,
        bound: SkewBound,
    ) -> Result<Self> {
        let now_ms = wall_clock_ms();
        let StoredScan {
            live_keys,
            tombstones,
            future_records,
            max_hlc,
            digests,
        } = StoredScan::of(storage.as_ref(), &ring, bound, now_ms)?;
        let ceiling = storage.get_meta(CLOCK_CEILING)?.unwrap_or(0);
        if future_records > 0 {
            tracing::error!(
                future_records,
                "records with impossible versions were found; they are served as failed reads until replaced"
            );
        }
        let ceiling = usable_ceiling(ceiling, bound, now_ms);
        let clock = HybridClock::recover(instance_id, ceiling, max_hlc, bound);
        tracing::info!(live_keys, tombstones, hlc = clock.now(), "replica opened");
        Ok(Self {
            instance_id,
            storage,
            clock: Arc::new(Mutex::new(clock)),
            bound,
            future_records,
            read_gate: None,
            persisted_ceiling: Arc::new(Mutex::new(ceiling)),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            live_keys: AtomicU64::new(live_keys),
            tombstones: AtomicU64::new(tombstones),
            digests: Mutex::new(RangeDigests {
                layout_version: 0,
                rebuilding: 0,
                ring,
                per_range: digests,
            }),
            fence: std::sync::RwLock::new(0),
        })
    }

    pub fn instance_id(&self) -> InstanceId {
        self.instance_id
    }

    /// The layout version this replica serves.
    pub fn layout_version(&self) -> u64 {
        *self.fence.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Holds the fence at the layout served: the layout cannot advance
    /// until the guard is dropped (hold it until the writes are applied).
    pub fn fence(&self) -> FenceGuard<'_> {
        FenceGuard(self.fence.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// [`ReplicaStore::fence`], refusing a request placed with a layout
    /// older than the one served.
    pub fn fenced(&self, tagged: u64) -> Result<FenceGuard<'_>> {
        let fence = self.fence();
        fence.admit(tagged)?;
        Ok(fence)
    }

    /// Serves `version` from now on: waits for writes placed with an older
    /// layout that already passed the fence, then refuses the rest.
    pub fn advance_fence(&self, version: u64) {
        let mut serving = self.fence.write().unwrap_or_else(|p| p.into_inner());
        *serving = (*serving).max(version);
    }

    /// Records that the digests counted at open, over the ring passed to
    /// [`ReplicaStore::open`], are those of layout `version`.
    pub fn digests_are_of(&self, version: u64) {
        self.digests.locked().layout_version = version;
    }

    /// Recounts the range digests over `ring` (a new layout's read ring)
    /// in one pass over the index, without stopping writes: the new ring is
    /// swapped in first, so writes during the pass add their change to it,
    /// and the pass's count is added at the end. A key written while the
    /// pass runs can come out wrong (if the pass saw it after the write);
    /// anti-entropy then finds its range differing with nothing to copy and
    /// recounts that range exactly ([`ReplicaStore::recount_range`]).
    /// Anti-entropy uses the digests once the pass is over
    /// (`digests_layout_version`).
    pub fn rebuild_digests(&self, ring: Arc<Ring>, layout_version: u64) -> Result<()> {
        {
            let mut digests = self.digests.locked();
            if digests.layout_version.max(digests.rebuilding) >= layout_version {
                return Ok(());
            }
            *digests = RangeDigests {
                layout_version: 0,
                rebuilding: layout_version,
                per_range: vec![0u64; ring.range_count().max(1)],
                ring: ring.clone(),
            };
        }
        let mut counted = vec![0u64; ring.range_count().max(1)];
        let now_ms = wall_clock_ms();
        self.storage.for_each_held(
            &mut |stored_key, held| {
                if let Some(key) = user_key(stored_key)
                    && self.bound.check_stored(held.version, now_ms).is_ok()
                {
                    counted[ring.range_of(key_hash(key.as_bytes()))] ^= record_digest(key, held);
                }
            },
            &mut |_, _| {},
        )?;
        let mut digests = self.digests.locked();
        if Arc::ptr_eq(&digests.ring, &ring) {
            for (slot, count) in digests.per_range.iter_mut().zip(counted) {
                *slot ^= count;
            }
            digests.layout_version = layout_version;
        }
        Ok(())
    }

    /// Recounts one range's digest exactly: writes wait meanwhile (every
    /// stripe is held for the scan of that one range).
    pub fn recount_range(&self, range: usize) -> Result<()> {
        let _stripes = self.all_stripes();
        let mut digests = self.digests.locked();
        let now_ms = wall_clock_ms();
        let mut digest = 0u64;
        for (first, last) in digests.ring.range_hashes(range) {
            let from = first.to_be_bytes();
            let to = last.checked_add(1).map(|end| end.to_be_bytes());
            self.storage.scan(
                &from,
                to.as_ref().map(|t| &t[..]),
                &mut |stored_key, record| {
                    if let Some(key) = user_key(stored_key)
                        && self.bound.check_stored(record.version, now_ms).is_ok()
                    {
                        digest ^= record_digest(key, crate::storage::Held::of(record));
                    }
                },
            )?;
        }
        if let Some(slot) = digests.per_range.get_mut(range) {
            *slot = digest;
        }
        Ok(())
    }

    fn all_stripes(&self) -> Vec<MutexGuard<'_, ()>> {
        self.stripes.iter().map(|s| s.locked()).collect()
    }

    /// The record this replica holds for `key`. A record beyond the skew
    /// bound is an error, never an answer.
    pub fn read(&self, key: &str) -> Result<Option<Record>> {
        let record = self.storage.get(&storage_key(key))?;
        if let Some(record) = &record {
            self.check_held(key, record.version)?;
        }
        Ok(record)
    }

    /// Makes [`ReplicaStore::read_for_quorum`] refuse while `identity`
    /// says this replica must not answer (a new data dir catching up).
    pub fn with_read_gate(mut self, identity: Arc<crate::identity::Identity>) -> Self {
        self.read_gate = Some(identity);
        self
    }

    /// [`ReplicaStore::read`] for a quorum read: refused (UNAVAILABLE)
    /// while this replica, with a new data dir, may be missing writes its
    /// predecessor acknowledged; an empty answer would count as a replica
    /// that does not hold the key.
    pub fn read_for_quorum(&self, key: &str) -> Result<Option<Record>> {
        if let Some(why) = self.read_refusal() {
            return Err(Error::Unavailable(why));
        }
        self.read(key)
    }

    /// The layout served changed: the read gate waits for the peers this
    /// node shares ranges with under it.
    pub fn follow_layout(&self, sharing: std::collections::BTreeSet<String>) -> Result<()> {
        match &self.read_gate {
            Some(gate) => gate.follow_layout(sharing),
            None => Ok(()),
        }
    }

    /// Why this replica must not answer for its data yet (a new data dir
    /// catching up), if it must not: it is then no source for a joining
    /// node either.
    pub fn read_refusal(&self) -> Option<String> {
        self.read_gate.as_ref().and_then(|gate| gate.read_refusal())
    }

    /// The version accepted from outside (`--max-clock-skew-ms`).
    pub fn bound(&self) -> SkewBound {
        self.bound
    }

    fn check_held(&self, key: &str, version: Version) -> Result<()> {
        self.bound
            .check_stored(version, wall_clock_ms())
            .map_err(|why| Error::CorruptRecord {
                key: key.to_string(),
                why: format!("stored {why}"),
            })
    }

    fn stripe(&self, key: &str) -> MutexGuard<'_, ()> {
        self.stripes[(xxh3_64(key.as_bytes()) as usize) % STRIPES].locked()
    }

    /// Issues a new version, above every version this node has seen and
    /// at least the wall clock. Fails loudly rather than issue a version
    /// peers would refuse.
    pub fn next_version(&self) -> Result<Version> {
        let mut clock = self.clock.locked();
        let before = clock.clone();
        let tick = clock
            .tick(wall_clock_ms())
            .map_err(|error| Error::Unavailable(format!("cannot issue a version: {error}")))?;
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
            Ok(()) => clock.locked().renewed(ceiling),
            Err(error) => {
                tracing::warn!(%error, "cannot persist the clock's next ceiling; will retry");
                clock.locked().renewal_failed(ceiling);
            }
        };
        crate::seams::detach_blocking(renew);
    }

    /// Merges a version seen elsewhere into the clock (ignored, and
    /// answered false, beyond the skew bound).
    pub fn observe(&self, version: Version) -> bool {
        self.clock.locked().observe(version, wall_clock_ms())
    }

    pub fn stats(&self) -> LocalStats {
        LocalStats {
            live_keys: self.live_keys.load(Ordering::Relaxed),
            tombstones: self.tombstones.load(Ordering::Relaxed),
            hlc: self.clock.locked().now(),
            future_records: self.future_records,
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

    pub(super) fn ring() -> Arc<Ring> {
        Arc::new(Ring::new(
            [Member::new("127.0.0.1:7001"), Member::new("127.0.0.1:7002")],
            8,
        ))
    }

    pub(super) fn store() -> (Arc<MemoryStorage>, ReplicaStore) {
        let storage = Arc::new(MemoryStorage::new());
        let replica =
            ReplicaStore::open(InstanceId(1), storage.clone(), ring(), SkewBound::default())
                .expect("open");
        (storage, replica)
    }

    #[test]
    fn every_version_seen_advances_the_clock() {
        let (_, replica) = store();
        let first = replica.next_version().expect("tick");
        // A version from a peer whose clock is 5 s ahead.
        let ahead = Version::new(crate::clock::hlc_of_ms(wall_clock_ms() + 5000) + 40, 9);
        replica
            .write_if_newer("k", &Record::value(ahead, &b"x"[..]))
            .expect("write");
        let next = replica.next_version().expect("tick");
        assert!(next > first);
        assert_eq!(next, Version::new(ahead.hlc + 1, 1));
    }

    #[test]
    fn a_restart_never_reissues_a_version_after_merging_a_clock_far_ahead() {
        // Review finding: a peer 55 s ahead pushed the persisted ceiling
        // beyond the skew bound; ignoring it at start-up let the node issue
        // a version it had issued before.
        let storage = Arc::new(MemoryStorage::new());
        let replica =
            ReplicaStore::open(InstanceId(1), storage.clone(), ring(), SkewBound::default())
                .expect("open");
        let ahead = Version::new(crate::clock::hlc_of_ms(wall_clock_ms() + 55_000), 9);
        assert!(replica.observe(ahead));
        let stored = replica.next_version().expect("tick");
        replica
            .write_if_newer("held", &Record::value(stored, &b"v"[..]))
            .expect("write");
        let unstored = replica.next_version().expect("tick");
        drop(replica);
        let reopened = ReplicaStore::open(InstanceId(1), storage, ring(), SkewBound::default())
            .expect("reopen");
        // It may refuse to stamp until the wall clock catches up, but it
        // never repeats a version.
        if let Ok(next) = reopened.next_version() {
            assert!(next > unstored, "{next} repeats or precedes {unstored}");
        }
    }

    #[test]
    fn versions_beyond_the_skew_bound_are_refused_and_a_poisoned_store_still_works() {
        let storage = Arc::new(MemoryStorage::new());
        // A data dir poisoned before the bound existed: lamport 2^62.
        let poison = Record::value(Version::new(1 << 62, 9), &b"bad"[..]);
        storage.put(&storage_key("k"), &poison).expect("put");
        let good = Record::value(Version::new(1, 1), &b"old"[..]);
        storage.put(&storage_key("other"), &good).expect("put");
        let replica =
            ReplicaStore::open(InstanceId(1), storage.clone(), ring(), SkewBound::default())
                .expect("a poisoned data dir opens");
        assert_eq!(replica.stats().future_records, 1);
        // Not merged into the clock: versions follow the wall clock.
        let next = replica.next_version().expect("tick");
        assert!(next.physical_ms() <= wall_clock_ms() + 1000, "{next}");
        // Read as a failure, left out of anti-entropy listings.
        assert!(matches!(
            replica.read("k"),
            Err(Error::CorruptRecord { .. })
        ));
        let listed: usize = (0..ring().range_count())
            .map(|r| replica.range_entries(r).expect("entries").len())
            .sum();
        assert_eq!(listed, 1, "only the good record is listed");
        // The next valid write replaces it, and digests stay exact.
        let fresh = Record::value(next, &b"new"[..]);
        assert!(replica.write_if_newer("k", &fresh).expect("write").applied);
        assert_eq!(replica.read("k").expect("read"), Some(fresh));
        assert_eq!(replica.stats().live_keys, 2);
        // A new version beyond the bound is refused as invalid input.
        let hostile = Record::value(Version::new(1 << 62, 9), &b"x"[..]);
        assert!(matches!(
            replica.write_if_newer("k2", &hostile),
            Err(Error::InvalidArgument(_))
        ));
        assert_eq!(replica.read("k2").expect("read"), None);
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
        let reopened = ReplicaStore::open(InstanceId(1), storage, ring(), SkewBound::default())
            .expect("reopen");
        assert_eq!(reopened.stats().live_keys, 100);
        let next = reopened.next_version().expect("tick");
        assert!(next > last && next > unstored);
    }

    #[test]
    fn corrupt_records_are_reported_not_fatal() {
        let storage = Arc::new(MemoryStorage::new());
        storage.put_raw(&storage_key("bad"), vec![1, 2, 3]);
        let replica = ReplicaStore::open(InstanceId(1), storage, ring(), SkewBound::default())
            .expect("open despite corruption");
        assert!(matches!(
            replica.read("bad"),
            Err(Error::CorruptRecord { .. })
        ));
        // A write (or read repair) replaces the corrupt record.
        let record = Record::value(Version::new(1, 1), &b"x"[..]);
        replica.write_if_newer("bad", &record).expect("write");
        assert_eq!(replica.read("bad").expect("read"), Some(record));
    }
}
