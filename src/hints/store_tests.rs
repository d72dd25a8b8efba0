//! Unit tests of `store` (kept apart so that the module reads as code).

use super::*;
use crate::clock::{DEFAULT_MAX_CLOCK_SKEW_MS as DEFAULT_SKEW, IMPOSSIBLE_AHEAD_MS, Version};
use crate::storage::MemoryStorage;

fn hint(target: u64, key: &str, created_ms: u64) -> Hint {
    Hint {
        target: MemberId(target),
        key: key.into(),
        record: Record::value(Version::new(3, 4), &b"v"[..]),
        created_ms,
    }
}

#[test]
fn hints_round_trip_and_reject_garbage() {
    let h = hint(9, "kéy", 1234);
    assert_eq!(Hint::decode(MemberId(9), &h.encode()), Ok(h.clone()));
    let tombstone = Hint {
        record: Record::tombstone(Version::new(1, 1)),
        ..h.clone()
    };
    assert_eq!(
        Hint::decode(MemberId(9), &tombstone.encode()),
        Ok(tombstone)
    );
    assert!(Hint::decode(MemberId(9), &[1, 2, 3]).is_err());
    let mut overrun = h.encode();
    overrun[8] = 200;
    assert!(Hint::decode(MemberId(9), &overrun).is_err());
}

/// Bounds loose enough not to matter unless a test sets one.
fn bounds(max_hints: u64) -> HintBounds {
    HintBounds {
        max_hints,
        max_bytes: u64::MAX,
        max_age: Duration::from_secs(60),
        skew: SkewBound::default(),
    }
}

fn keys(hints: &[StoredHint]) -> Vec<&str> {
    hints.iter().map(|s| s.hint.key.as_str()).collect()
}

#[test]
fn store_is_bounded_ordered_per_target_and_survives_reopen() {
    let storage = Arc::new(MemoryStorage::new());
    let store = HintStore::open(storage.clone(), bounds(3)).expect("open");
    store.store(&hint(1, "a", 1)).expect("store");
    store.store(&hint(2, "b", 2)).expect("store");
    store.store(&hint(1, "c", 3)).expect("store");
    assert!(
        store.store(&hint(1, "d", 4)).is_err(),
        "--max-hints reached"
    );
    assert_eq!(store.len(), 3);
    assert_eq!(
        keys(&store.for_target(MemberId(1), 10, 5).expect("list")),
        ["a", "c"]
    );
    let reopened = HintStore::open(storage, bounds(3)).expect("reopen");
    assert_eq!(reopened.len(), 3);
    assert_eq!(reopened.bytes(), store.bytes());
    let first = reopened
        .for_target(MemberId(1), 1, 5)
        .expect("list")
        .remove(0);
    reopened.remove(&first, true).expect("remove");
    assert_eq!(reopened.len(), 2);
    assert_eq!(reopened.delivered(), 1);
    reopened.store(&hint(2, "e", 5)).expect("room again");
    let mut targets = reopened.targets();
    targets.sort();
    assert_eq!(targets, [MemberId(1), MemberId(2)]);
    assert_eq!(reopened.drop_target(MemberId(2)).expect("drop"), 2);
    assert_eq!(reopened.targets(), [MemberId(1)]);
}

/// A memory engine that can refuse to hand out hint values (opening
/// the hint store must make do with ids and sizes), and can fail any
/// listing that includes one id, as the log engine does when an entry's
/// checksum fails.
#[derive(Default)]
struct Probe {
    inner: MemoryStorage,
    values_readable: std::sync::atomic::AtomicBool,
    corrupt: Option<Vec<u8>>,
}

impl Probe {
    fn ids_only() -> Self {
        Self::default()
    }
}

impl Storage for Probe {
    fn get(&self, key: &[u8]) -> Result<Option<Record>> {
        self.inner.get(key)
    }
    fn put(&self, key: &[u8], record: &Record) -> Result<()> {
        self.inner.put(key, record)
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn for_each(
        &self,
        visit: &mut dyn FnMut(&[u8], &Record),
        corrupt: &mut dyn FnMut(&[u8], String),
    ) -> Result<()> {
        self.inner.for_each(visit, corrupt)
    }
    fn scan(
        &self,
        from: &[u8],
        to: Option<&[u8]>,
        visit: &mut dyn FnMut(&[u8], &Record),
    ) -> Result<()> {
        self.inner.scan(from, to, visit)
    }
    fn delete(&self, key: &[u8]) -> Result<()> {
        self.inner.delete(key)
    }
    fn get_meta(&self, name: &str) -> Result<Option<u64>> {
        self.inner.get_meta(name)
    }
    fn put_meta_durable(&self, name: &str, value: u64) -> Result<()> {
        self.inner.put_meta_durable(name, value)
    }
    fn sync(&self) -> Result<()> {
        Ok(())
    }
    fn put_hint(&self, id: &[u8], bytes: &[u8]) -> Result<()> {
        self.inner.put_hint(id, bytes)
    }
    fn delete_hint(&self, id: &[u8]) -> Result<()> {
        self.inner.delete_hint(id)
    }
    fn hints(&self, prefix: &[u8], limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        assert!(
            self.values_readable.load(Ordering::Relaxed),
            "a hint value was read"
        );
        let listed = self.inner.hints(prefix, limit)?;
        if listed
            .iter()
            .any(|(id, _)| Some(id) == self.corrupt.as_ref())
        {
            return Err(Error::CorruptRecord {
                key: "hint".into(),
                why: "checksum mismatch".into(),
            });
        }
        Ok(listed)
    }
    fn hint_ids(&self, prefix: &[u8], limit: usize) -> Result<Vec<(Vec<u8>, u64)>> {
        self.inner.hint_ids(prefix, limit)
    }
}

#[test]
fn open_and_drop_target_read_no_hint() {
    let storage = Arc::new(Probe::ids_only());
    {
        let store = HintStore::open(storage.clone(), bounds(10)).expect("open");
        store.store(&hint(1, "a", 1)).expect("store");
        store.store(&hint(1, "bb", 2)).expect("store");
        store.store(&hint(2, "c", 3)).expect("store");
    }
    let reopened = HintStore::open(storage, bounds(10)).expect("reopen");
    assert_eq!(reopened.len(), 3);
    let expected: u64 = [hint(1, "a", 1), hint(1, "bb", 2), hint(2, "c", 3)]
        .iter()
        .map(|h| h.encode().len() as u64)
        .sum();
    assert_eq!(reopened.bytes(), expected);
    assert_eq!(reopened.drop_target(MemberId(1)).expect("drop"), 2);
    assert_eq!(reopened.len(), 1);
    assert_eq!(reopened.targets(), [MemberId(2)]);
}

#[test]
fn bytes_are_bounded_by_max_hint_bytes() {
    let size = hint(1, "a", 1).encode().len() as u64;
    let storage = Arc::new(MemoryStorage::new());
    let store = HintStore::open(
        storage.clone(),
        HintBounds {
            max_bytes: 2 * size,
            ..bounds(100)
        },
    )
    .expect("open");
    store.store(&hint(1, "a", 1)).expect("store");
    store.store(&hint(2, "b", 2)).expect("store");
    let full = store.store(&hint(1, "c", 3)).expect_err("budget spent");
    assert!(full.to_string().contains("--max-hint-bytes"), "{full}");
    let huge = Hint {
        record: Record::value(Version::new(3, 4), vec![0u8; 3 * size as usize]),
        ..hint(3, "h", 4)
    };
    assert!(store.store(&huge).is_err(), "larger than the whole budget");
    assert_eq!((store.len(), store.bytes()), (2, 2 * size));
    let first = store.for_target(MemberId(1), 1, 5).expect("list").remove(0);
    store.remove(&first, true).expect("remove");
    assert_eq!(store.bytes(), size);
    store.store(&hint(1, "c", 3)).expect("room again");
}

#[test]
fn corrupt_expired_and_impossible_hints_are_dropped_not_returned() {
    let now = 1_700_000_000_000u64;
    let storage = Arc::new(MemoryStorage::new());
    let store = HintStore::open(storage.clone(), bounds(10)).expect("open");
    let at = |ms: u64| Version::new(crate::clock::hlc_of_ms(ms), 4);
    let fresh = |key: &str, version| Hint {
        record: Record::value(version, &b"v"[..]),
        ..hint(1, key, now)
    };
    store.store(&fresh("good1", at(now))).expect("store");
    // Undecodable bytes where a hint should be.
    storage
        .put_hint(&hint_id(MemberId(1), 100), b"garbage")
        .expect("raw");
    store.pending().add(MemberId(1), 7);
    store.store(&hint(1, "expired", 1)).expect("store");
    // Ahead by more than any node can have issued.
    store
        .store(&fresh("impossible", at(now + 2 * IMPOSSIBLE_AHEAD_MS)))
        .expect("store");
    store.store(&fresh("good2", at(now))).expect("store");
    // Genuine but beyond the skew bound (the wall clock stepped back):
    // held, with what is behind it, until the clock catches up.
    let ahead = now + DEFAULT_SKEW + 5_000;
    store.store(&fresh("ahead", at(ahead))).expect("store");
    store.store(&fresh("good3", at(now))).expect("store");
    let listed = store.for_target(MemberId(1), 100, now).expect("list");
    assert_eq!(keys(&listed), ["good1", "good2"]);
    // Expired and impossible are deleted; the garbage (stored last, at
    // sequence 100) is behind the held hint and not reached yet.
    assert_eq!(store.len(), 5);
    assert_eq!(storage.hint_ids(&[], 100).expect("ids").len(), 5);
    let reopened = HintStore::open(storage.clone(), bounds(10)).expect("reopen");
    assert_eq!((reopened.len(), reopened.bytes()), (5, store.bytes()));
    // 5 s later the clock has caught up (and nothing has expired).
    let later = reopened
        .for_target(MemberId(1), 100, now + 5_000)
        .expect("list");
    assert_eq!(keys(&later), ["good1", "good2", "ahead", "good3"]);
    assert_eq!(
        storage.hint_ids(&[], 100).expect("ids").len(),
        4,
        "garbage dropped"
    );
}

#[test]
fn an_engine_level_corrupt_hint_does_not_hide_the_others() {
    let storage = Arc::new(Probe {
        values_readable: true.into(),
        corrupt: Some(hint_id(MemberId(1), 2)),
        ..Probe::default()
    });
    for (sequence, key) in [(1, "a"), (2, "bad"), (3, "c")] {
        storage
            .put_hint(&hint_id(MemberId(1), sequence), &hint(1, key, 1).encode())
            .expect("put");
    }
    let store = HintStore::open(storage.clone(), bounds(10)).expect("open");
    assert_eq!(store.len(), 3);
    assert_eq!(
        keys(&store.for_target(MemberId(1), 10, 5).expect("list")),
        ["a", "c"]
    );
    assert_eq!(store.len(), 2, "the corrupt one is deleted");
    assert_eq!(
        keys(&store.for_target(MemberId(1), 10, 5).expect("list")),
        ["a", "c"]
    );
}

#[test]
fn expiry_by_age() {
    let h = hint(1, "a", 1_000);
    assert!(!h.expired(2_000, Duration::from_secs(1)));
    assert!(h.expired(2_001, Duration::from_secs(1)));
}
