//! One conformance suite for every [`Storage`] engine.
//!
//! Each engine used to carry its own handful of tests, each testing what its
//! author thought of; the memory engine, which every replica unit test runs
//! on, had none. A replica cannot tell engines apart, so they must not
//! differ in anything it can observe: this module states that contract once,
//! as checks, and runs every check against every engine (toydb's
//! `storage::engine::test` is the model).
//!
//! A check is a plain function of a [`Subject`]: an engine's name and how to
//! open it over a directory. A [`Fixture`] opens it in a fresh temporary
//! directory and, for a persistent engine, closes and reopens it over the
//! same directory on request, so most checks look at the data both before
//! and after a restart; a volatile engine (memory) has nothing to reopen and
//! is simply checked again through the same handle. The `disk_full_*`
//! checks need a disk, and run only for the persistent engines, on a small
//! tmpfs the test mounts itself ([`SmallDisk`]).
//!
//! What the suite holds engines to, beyond each method's documentation:
//!
//! - The engine keeps the *last* put per key, whatever its version: write if
//!   newer is the replica's job, not the engine's.
//! - Storage keys are never empty (they start with the 8-byte ring hash, see
//!   [`crate::storage::storage_key`]), so no check puts an empty key — fjall
//!   would panic on one. Empty values and empty hints are allowed.
//! - `scan(from, to)` is the half-open range `from..to` of storage keys, in
//!   key order, tombstones included.
//! - After `flush` or `sync`, every write survives closing and reopening;
//!   `put_meta_durable` survives it with neither.
//! - A full disk refuses a write with an `Err`, never a panic, and loses no
//!   write acknowledged before it.
//!
//! An engine joins the suite with one module at the bottom of this file.
//!
//! This is the one place the behaviour all engines share is tested, and it
//! stays one file (past the house limit of about 600 lines) for
//! that reason: it is one contract, each check written once and run for
//! every engine, so a check added for one engine holds them all to it.
//! What belongs to a single engine (the log's damaged-entry handling,
//! injected fsync failures, compaction) is tested next to that engine's
//! code instead.

use std::collections::BTreeMap;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

use super::{FjallStorage, FsyncPolicy, Held, LogStorage, MemoryStorage, Storage};
use crate::clock::Version;
use crate::error::{Error, Result};
use crate::record::Record;
use crate::storage::storage_key;

/// An engine under test.
#[derive(Clone, Copy)]
pub struct Subject {
    /// Names the engine in failure messages.
    pub name: &'static str,
    /// Opens the engine over `dir` (creating it), or reopens what is there.
    pub open: fn(&Path) -> Result<Box<dyn Storage>>,
    /// Whether data outlives the handle; only then is reopening checked.
    pub persistent: bool,
}

/// [`MemoryStorage`]: volatile, so nothing is reopened.
pub const MEMORY: Subject = Subject {
    name: "memory",
    open: open_memory,
    persistent: false,
};

/// [`LogStorage`] under the default fsync policy.
pub const LOG: Subject = Subject {
    name: "log",
    open: open_log,
    persistent: true,
};

/// [`FjallStorage`] under the default fsync policy.
pub const FJALL: Subject = Subject {
    name: "fjall",
    open: open_fjall,
    persistent: true,
};

fn open_memory(_: &Path) -> Result<Box<dyn Storage>> {
    Ok(Box::new(MemoryStorage::new()))
}

fn open_log(dir: &Path) -> Result<Box<dyn Storage>> {
    Ok(Box::new(LogStorage::open(dir, FsyncPolicy::Periodic)?))
}

fn open_fjall(dir: &Path) -> Result<Box<dyn Storage>> {
    Ok(Box::new(FjallStorage::open(dir, FsyncPolicy::Periodic)?))
}

/// An engine open over a directory; derefs to the engine.
pub struct Fixture {
    /// The engine it opens.
    subject: Subject,
    /// The engine's directory.
    dir: PathBuf,
    /// The open engine (`None` only while reopening).
    storage: Option<Box<dyn Storage>>,
    /// Deletes the directory last, when the fixture made it.
    _temp: Option<TempDir>,
}

impl Fixture {
    /// Opens `subject` in a fresh temporary directory.
    pub fn new(subject: Subject) -> Self {
        let temp = tempfile::tempdir().expect("cannot create a temporary directory");
        let dir = temp.path().join("data");
        let mut fixture = Self::open_at(subject, &dir).expect("cannot open the engine");
        fixture._temp = Some(temp);
        fixture
    }

    /// Opens `subject` over `dir`, which outlives the fixture.
    pub fn open_at(subject: Subject, dir: &Path) -> Result<Self> {
        Ok(Self {
            subject,
            dir: dir.to_path_buf(),
            storage: Some((subject.open)(dir)?),
            _temp: None,
        })
    }

    /// Closes the engine and opens it again over the same directory, as a
    /// restarted node would (a volatile engine keeps its handle: there is
    /// nothing to reopen). Both handles are never open at once.
    ///
    /// A process this test binary forks meanwhile (another test mounting a
    /// tmpfs) holds a copy of the engine's LOCK file until it execs, which
    /// keeps the lock a moment after the engine closed: a reopen refused
    /// as "in use" is retried for up to two seconds.
    pub fn reopen(&mut self) -> Result<()> {
        if self.subject.persistent {
            self.storage = None;
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
            loop {
                match (self.subject.open)(&self.dir) {
                    Ok(storage) => {
                        self.storage = Some(storage);
                        break;
                    }
                    Err(error)
                        if error.to_string().contains("in use by another process")
                            && std::time::Instant::now() < deadline =>
                    {
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                    Err(error) => return Err(error),
                }
            }
        }
        Ok(())
    }

    /// [`Fixture::reopen`], failing the check if the engine will not open.
    fn restart(&mut self) {
        if let Err(error) = self.reopen() {
            panic!("{}: reopening failed: {error}", self.subject.name);
        }
    }
}

impl Deref for Fixture {
    type Target = dyn Storage;

    fn deref(&self) -> &Self::Target {
        self.storage
            .as_deref()
            .expect("the engine is open outside reopen")
    }
}

/// What an engine must hold: the last record put under each key, by key.
#[derive(Default)]
pub struct Model {
    /// Storage key → record.
    records: BTreeMap<Vec<u8>, Record>,
}

impl Model {
    /// Puts `record` under `key` in both the engine and the model.
    fn put(&mut self, storage: &dyn Storage, key: &[u8], record: Record) {
        storage.put(key, &record).expect("put");
        self.records.insert(key.to_vec(), record);
    }

    /// Deletes `key` from both the engine and the model.
    fn delete(&mut self, storage: &dyn Storage, key: &[u8]) {
        storage.delete(key).expect("delete");
        self.records.remove(key);
    }

    /// Every key of the model reads back its record (the engine may hold
    /// more: used where a refused write may or may not have left a trace).
    fn assert_readable(&self, storage: &dyn Storage, context: &str) {
        for (key, record) in &self.records {
            let got = storage
                .get(key)
                .unwrap_or_else(|e| panic!("{context}: get {key:x?} failed: {e}"));
            assert!(
                got.as_ref() == Some(record),
                "{context}: get {key:x?} returned {}, expected {}",
                describe(got.as_ref()),
                describe(Some(record))
            );
            let held = storage
                .held(key)
                .unwrap_or_else(|e| panic!("{context}: held {key:x?} failed: {e}"));
            assert_eq!(held, Some(Held::of(record)), "{context}: held {key:x?}");
        }
    }

    /// The engine holds exactly the model, through every way of reading.
    fn assert_held_by(&self, storage: &dyn Storage, context: &str) {
        self.assert_readable(storage, context);
        let expected: Vec<(Vec<u8>, Record)> = self
            .records
            .iter()
            .map(|(k, r)| (k.clone(), r.clone()))
            .collect();

        // for_each: every live record once (in no promised order).
        let mut seen = Vec::new();
        storage
            .for_each(
                &mut |key, record| seen.push((key.to_vec(), record.clone())),
                &mut |key, why| panic!("{context}: for_each reported {key:x?} corrupt: {why}"),
            )
            .expect("for_each");
        seen.sort_by(|a, b| a.0.cmp(&b.0));
        assert!(
            seen == expected,
            "{context}: for_each differs from the model"
        );

        // scan over everything: the same, in key order.
        let scanned = scan(storage, &[], None);
        assert!(scanned == expected, "{context}: a full scan differs");

        // for_each_held: what each live record holds.
        let mut held = Vec::new();
        storage
            .for_each_held(
                &mut |key, h| held.push((key.to_vec(), h)),
                &mut |key, why| panic!("{context}: for_each_held reported {key:x?}: {why}"),
            )
            .expect("for_each_held");
        held.sort_by(|a, b| a.0.cmp(&b.0));
        let expected_held: Vec<(Vec<u8>, Held)> = expected
            .iter()
            .map(|(k, r)| (k.clone(), Held::of(r)))
            .collect();
        assert!(held == expected_held, "{context}: for_each_held differs");

        // for_each_tombstone: the live tombstones, and nothing else.
        let mut tombstones = Vec::new();
        storage
            .for_each_tombstone(&mut |key, record| {
                tombstones.push((key.to_vec(), record.clone()));
            })
            .expect("for_each_tombstone");
        tombstones.sort_by(|a, b| a.0.cmp(&b.0));
        let expected_tombstones: Vec<(Vec<u8>, Record)> = expected
            .into_iter()
            .filter(|(_, r)| r.is_tombstone())
            .collect();
        assert!(
            tombstones == expected_tombstones,
            "{context}: for_each_tombstone differs ({} visited, {} expected)",
            tombstones.len(),
            expected_tombstones.len()
        );
    }

    /// The model's records in `from..to`, in key order.
    fn range(&self, from: &[u8], to: Option<&[u8]>) -> Vec<(Vec<u8>, Record)> {
        self.records
            .range(from.to_vec()..)
            .take_while(|(k, _)| to.is_none_or(|to| k.as_slice() < to))
            .map(|(k, r)| (k.clone(), r.clone()))
            .collect()
    }

    fn len(&self) -> usize {
        self.records.len()
    }
}

/// `scan_while` visits what `scan` does, in the same order, and stops at
/// the first record its visitor answers `false` for: that record is the
/// last one visited. A page of a listing costs the page, not the range.
pub fn scan_while_stops_where_the_visitor_says(subject: Subject) {
    let mut fx = Fixture::new(subject);
    let mut model = Model::default();
    for i in 0..2_500u64 {
        model.put(
            &*fx,
            &storage_key(&format!("key-{i}")),
            value(i + 1, vec![7; 8]),
        );
    }
    let keys: Vec<Vec<u8>> = model.records.keys().cloned().collect();
    for round in ["before reopen", "after reopen"] {
        for (from, stop_after) in [
            (0usize, 0usize),
            (0, 1),
            (10, 99),
            (100, 2_000),
            (2_400, 500),
        ] {
            let expected = model.range(&keys[from], None);
            let mut visited = Vec::new();
            fx.scan_while(&keys[from], None, &mut |key, record| {
                visited.push((key.to_vec(), record.clone()));
                visited.len() <= stop_after
            })
            .expect("scan_while");
            let wanted = (stop_after + 1).min(expected.len());
            assert!(
                visited[..] == expected[..wanted],
                "{}: {round}: scan_while from key {from} stopping after {stop_after} visited {} records, expected {wanted}",
                subject.name,
                visited.len()
            );
        }
        fx.flush().expect("flush");
        fx.restart();
    }
}

/// What `scan(from, to)` visits, in visiting order.
fn scan(storage: &dyn Storage, from: &[u8], to: Option<&[u8]>) -> Vec<(Vec<u8>, Record)> {
    let mut out = Vec::new();
    storage
        .scan(from, to, &mut |key, record| {
            out.push((key.to_vec(), record.clone()))
        })
        .expect("scan");
    out
}

/// A record in a line, whatever its size (failure messages).
fn describe(record: Option<&Record>) -> String {
    match record {
        None => "nothing".into(),
        Some(record) => match &record.value {
            None => format!("a tombstone of {}", record.version),
            Some(value) => format!(
                "{} bytes (xxh3 {:016x}) of {}",
                value.len(),
                xxhash_rust::xxh3::xxh3_64(value),
                record.version
            ),
        },
    }
}

/// A value record written by node 7.
fn value(lamport: u64, bytes: impl Into<bytes::Bytes>) -> Record {
    Record::value(Version::new(lamport, 7), bytes)
}

/// A tombstone written by node 7 at a recognisable time.
fn tombstone(lamport: u64) -> Record {
    Record::tombstone_at(Version::new(lamport, 7), 1_700_000_000_000 + lamport)
}

/// `len` bytes that no engine can compress, different for each `seed`.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        // xorshift64*
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A hint id as [`crate::hints`] makes them: target, then sequence (BE).
fn hint_id(target: u64, sequence: u64) -> Vec<u8> {
    let mut id = target.to_be_bytes().to_vec();
    id.extend_from_slice(&sequence.to_be_bytes());
    id
}

/// What the engine holds for `key`, failing the check on an error.
fn get(storage: &dyn Storage, key: &[u8]) -> Option<Record> {
    storage.get(key).expect("get")
}

// ---------------------------------------------------------------------------
// The checks every engine passes.
// ---------------------------------------------------------------------------

/// A value, a tombstone and an empty value read back as written, through
/// `get` and `held`; a key never written reads as absent.
pub fn put_get_held_round_trip(subject: Subject) {
    let mut fx = Fixture::new(subject);
    let mut model = Model::default();
    model.put(&*fx, &storage_key("value"), value(10, &b"one"[..]));
    model.put(&*fx, &storage_key("tombstone"), tombstone(11));
    model.put(&*fx, &storage_key("empty"), value(12, Vec::new()));
    model.put(
        &*fx,
        &storage_key("unknown-deletion-time"),
        Record::tombstone(Version::new(13, 7)),
    );
    for round in ["before reopen", "after reopen"] {
        let context = format!("{}: {round}", subject.name);
        model.assert_held_by(&*fx, &context);
        assert_eq!(get(&*fx, &storage_key("missing")), None, "{context}");
        assert_eq!(fx.held(&storage_key("missing")).expect("held"), None);
        fx.flush().expect("flush");
        fx.restart();
    }
}

/// The engine keeps the last put per key even when its version is older:
/// write if newer is the replica's job.
pub fn last_put_wins_whatever_its_version(subject: Subject) {
    let mut fx = Fixture::new(subject);
    let mut model = Model::default();
    let (older, to_tombstone, from_tombstone) = (
        storage_key("older-version"),
        storage_key("to-tombstone"),
        storage_key("from-tombstone"),
    );
    model.put(&*fx, &older, value(50, &b"newer"[..]));
    model.put(&*fx, &older, value(30, &b"older, but last"[..]));
    model.put(&*fx, &to_tombstone, value(1, &b"alive"[..]));
    model.put(&*fx, &to_tombstone, tombstone(2));
    model.put(&*fx, &from_tombstone, tombstone(3));
    model.put(&*fx, &from_tombstone, value(4, &b"alive again"[..]));
    for _ in 0..3 {
        model.put(&*fx, &older, value(20, &b"rewritten"[..]));
    }
    model.assert_held_by(&*fx, subject.name);
    fx.flush().expect("flush");
    fx.restart();
    model.assert_held_by(&*fx, &format!("{}: after reopen", subject.name));
}

/// A deleted key is gone from every way of reading, stays gone after a
/// restart (a delete must not resurrect an older put), and can be written
/// again; deleting a missing key is not an error.
pub fn delete_removes_a_key_for_good(subject: Subject) {
    let mut fx = Fixture::new(subject);
    let mut model = Model::default();
    for (i, name) in ["a", "b", "c", "d"].iter().enumerate() {
        model.put(
            &*fx,
            &storage_key(name),
            value(i as u64 + 1, name.as_bytes().to_vec()),
        );
    }
    model.put(&*fx, &storage_key("gone-tombstone"), tombstone(9));
    model.delete(&*fx, &storage_key("a"));
    model.delete(&*fx, &storage_key("gone-tombstone"));
    model.delete(&*fx, &storage_key("never-written"));
    model.delete(&*fx, &storage_key("c"));
    model.put(&*fx, &storage_key("c"), value(20, &b"c again"[..]));
    model.assert_held_by(&*fx, subject.name);
    assert_eq!(fx.held(&storage_key("a")).expect("held"), None);
    fx.flush().expect("flush");
    fx.restart();
    model.assert_held_by(&*fx, &format!("{}: after reopen", subject.name));
    // Deleted before the restart, deleted again after it: still nothing.
    model.delete(&*fx, &storage_key("a"));
    fx.flush().expect("flush");
    fx.restart();
    model.assert_held_by(&*fx, &format!("{}: after a second reopen", subject.name));
}

/// `scan(from, to)` visits exactly the records in `from..to`, in key order,
/// tombstones included and deleted keys not; `to: None` runs to the end.
/// Bounds may be whole storage keys or bare 8-byte ring positions, as
/// anti-entropy passes them.
pub fn scan_visits_a_half_open_range_in_key_order(subject: Subject) {
    let mut fx = Fixture::new(subject);
    let mut model = Model::default();
    for i in 0..300u64 {
        let key = storage_key(&format!("key-{i}"));
        let record = if i % 7 == 0 {
            tombstone(i + 1)
        } else {
            value(i + 1, format!("value-{i}").into_bytes())
        };
        model.put(&*fx, &key, record);
    }
    for i in (0..300u64).step_by(11) {
        model.delete(&*fx, &storage_key(&format!("key-{i}")));
    }
    let keys: Vec<Vec<u8>> = model.records.keys().cloned().collect();
    let ring_position = |key: &[u8]| key[..8].to_vec();
    let ranges: Vec<(Vec<u8>, Option<Vec<u8>>)> = vec![
        // Whole storage keys: `from` included, `to` excluded.
        (keys[10].clone(), Some(keys[20].clone())),
        // Ring positions, as a token range is scanned.
        (ring_position(&keys[50]), Some(ring_position(&keys[150]))),
        // To the end.
        (keys[200].clone(), None),
        (Vec::new(), None),
        // Empty ranges: from == to, one key wide minus its own key, past
        // the end.
        (keys[30].clone(), Some(keys[30].clone())),
        (keys[30].clone(), Some(keys[31].clone())),
        (vec![0xff; 9], None),
        // Bounds that fall between keys.
        (
            [ring_position(&keys[5]), vec![0]].concat(),
            Some([ring_position(&keys[9]), vec![0]].concat()),
        ),
    ];
    for round in ["before reopen", "after reopen"] {
        for (from, to) in &ranges {
            let got = scan(&*fx, from, to.as_deref());
            let expected = model.range(from, to.as_deref());
            assert!(
                got == expected,
                "{}: {round}: scan {from:x?}..{to:x?} visited {} records, expected {}",
                subject.name,
                got.len(),
                expected.len()
            );
        }
        // The one-key range holds exactly that key.
        assert_eq!(model.range(&keys[30], Some(&keys[31])).len(), 1);
        fx.flush().expect("flush");
        fx.restart();
    }
}

/// `for_each`, `for_each_held` and `for_each_tombstone` visit exactly the
/// live records as they are now, after values became tombstones and back.
pub fn visits_see_exactly_the_live_records(subject: Subject) {
    let mut fx = Fixture::new(subject);
    let mut model = Model::default();
    for i in 0..100u64 {
        let key = storage_key(&format!("visit-{i}"));
        model.put(&*fx, &key, value(i + 1, format!("{i}").into_bytes()));
        match i % 4 {
            0 => model.put(&*fx, &key, tombstone(i + 1000)),
            1 => {
                model.put(&*fx, &key, tombstone(i + 1000));
                model.put(&*fx, &key, value(i + 2000, &b"back"[..]));
            }
            2 => model.delete(&*fx, &key),
            _ => {}
        }
    }
    model.assert_held_by(&*fx, subject.name);
    fx.flush().expect("flush");
    fx.restart();
    model.assert_held_by(&*fx, &format!("{}: after reopen", subject.name));
}

/// Named numbers read back as last stored, independently of each other,
/// and survive a restart with no flush or sync: `put_meta_durable` is
/// durable when it returns.
pub fn metadata_is_kept_and_durable_on_its_own(subject: Subject) {
    let mut fx = Fixture::new(subject);
    assert_eq!(fx.get_meta("clock_ceiling").expect("get_meta"), None);
    fx.put_meta_durable("clock_ceiling", 42).expect("put_meta");
    fx.put_meta_durable("clock_ceiling", 43).expect("put_meta");
    fx.put_meta_durable("zero", 0).expect("put_meta");
    fx.put_meta_durable("max", u64::MAX).expect("put_meta");
    // A record write left unflushed must not stop metadata being durable.
    fx.put(&storage_key("unflushed"), &value(1, &b"x"[..]))
        .expect("put");
    fx.put_meta_durable("after-a-put", 7).expect("put_meta");
    for round in ["before reopen", "after reopen"] {
        let meta = |name| fx.get_meta(name).expect("get_meta");
        let context = format!("{}: {round}", subject.name);
        assert_eq!(meta("clock_ceiling"), Some(43), "{context}");
        assert_eq!(meta("zero"), Some(0), "{context}");
        assert_eq!(meta("max"), Some(u64::MAX), "{context}");
        assert_eq!(meta("after-a-put"), Some(7), "{context}");
        assert_eq!(meta("never-stored"), None, "{context}");
        fx.restart();
    }
}

/// `hints(prefix, limit)` returns the hints whose id starts with `prefix`,
/// in id order, at most `limit` of them, with their latest bytes; deleted
/// hints are gone, before and after a restart.
pub fn hints_come_back_by_prefix_in_id_order_up_to_the_limit(subject: Subject) {
    let mut fx = Fixture::new(subject);
    // Out of order, across three targets; target 256 shares 7 prefix bytes
    // with 1 and 2 only as far as the shorter prefix below reaches.
    let mut expected: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    let mut put = |fx: &Fixture, id: Vec<u8>, bytes: Vec<u8>| {
        fx.put_hint(&id, &bytes).expect("put_hint");
        expected.insert(id, bytes);
    };
    for sequence in [3, 0, 4, 1, 2] {
        put(
            &fx,
            hint_id(1, sequence),
            format!("t1-{sequence}").into_bytes(),
        );
    }
    for sequence in [2, 0, 1] {
        put(
            &fx,
            hint_id(2, sequence),
            format!("t2-{sequence}").into_bytes(),
        );
    }
    put(&fx, hint_id(256, 0), b"t256".to_vec());
    put(&fx, hint_id(1, 2), b"t1-2, rewritten".to_vec());
    put(&fx, hint_id(2, 9), Vec::new());
    for id in [hint_id(1, 0), hint_id(1, 4), hint_id(3, 0)] {
        fx.delete_hint(&id).expect("delete_hint");
        expected.remove(&id);
    }
    let wanted = |prefix: &[u8], limit: usize| -> Vec<(Vec<u8>, Vec<u8>)> {
        expected
            .iter()
            .filter(|(id, _)| id.starts_with(prefix))
            .take(limit)
            .map(|(id, bytes)| (id.clone(), bytes.clone()))
            .collect()
    };
    let target = |t: u64| t.to_be_bytes().to_vec();
    let queries: Vec<(Vec<u8>, usize)> = vec![
        (target(1), 100),
        (target(1), 2),
        (target(1), 0),
        (target(2), 100),
        (target(3), 100),
        (target(256), 1),
        (vec![0; 7], 4),
        (vec![0; 7], 100),
        (Vec::new(), 100),
        (hint_id(1, 2), 10),
    ];
    for round in ["before reopen", "after reopen"] {
        for (prefix, limit) in &queries {
            assert_eq!(
                fx.hints(prefix, *limit).expect("hints"),
                wanted(prefix, *limit),
                "{}: {round}: hints({prefix:x?}, {limit})",
                subject.name
            );
        }
        assert_eq!(fx.hints(&target(1), 100).expect("hints").len(), 3);
        fx.flush().expect("flush");
        fx.restart();
    }
}

/// Records, hints and metadata written, overwritten and deleted, then made
/// durable with `flush` or with `sync`, are all there after a restart.
pub fn flushed_or_synced_writes_survive_reopen(subject: Subject) {
    for how in ["flush", "sync"] {
        let mut fx = Fixture::new(subject);
        let mut model = Model::default();
        for i in 0..500u64 {
            let key = storage_key(&format!("{how}-{i}"));
            model.put(&*fx, &key, value(i, noise(i, 100)));
            match i % 5 {
                0 => model.put(&*fx, &key, value(i + 1000, noise(i + 1000, 50))),
                1 => model.put(&*fx, &key, tombstone(i + 1000)),
                2 => model.delete(&*fx, &key),
                _ => {}
            }
        }
        fx.put_hint(&hint_id(5, 1), b"kept").expect("put_hint");
        fx.put_hint(&hint_id(5, 2), b"deleted").expect("put_hint");
        fx.delete_hint(&hint_id(5, 2)).expect("delete_hint");
        fx.put_meta_durable("m", 99).expect("put_meta");
        let persisted = if how == "flush" {
            fx.flush()
        } else {
            fx.sync()
        };
        persisted.unwrap_or_else(|e| panic!("{}: {how} failed: {e}", subject.name));
        fx.restart();
        let context = format!("{}: after {how} and reopen", subject.name);
        model.assert_held_by(&*fx, &context);
        assert_eq!(
            fx.hints(&5u64.to_be_bytes(), 10).expect("hints"),
            vec![(hint_id(5, 1), b"kept".to_vec())],
            "{context}"
        );
        assert_eq!(fx.get_meta("m").expect("get_meta"), Some(99), "{context}");
    }
}

/// 1 MiB values and hints round-trip whole, overwritten by other 1 MiB
/// values, before and after a restart.
pub fn large_values_round_trip(subject: Subject) {
    const MIB: usize = 1 << 20;
    let mut fx = Fixture::new(subject);
    let mut model = Model::default();
    model.put(&*fx, &storage_key("large-1"), value(1, noise(1, MIB)));
    model.put(&*fx, &storage_key("large-2"), value(2, noise(2, MIB)));
    model.put(&*fx, &storage_key("small"), value(3, &b"between"[..]));
    model.put(&*fx, &storage_key("large-1"), value(4, noise(4, MIB + 1)));
    fx.put_hint(&hint_id(1, 1), &noise(5, MIB))
        .expect("put_hint");
    for round in ["before reopen", "after reopen"] {
        let context = format!("{}: {round}", subject.name);
        model.assert_held_by(&*fx, &context);
        let hints = fx.hints(&hint_id(1, 1), 1).expect("hints");
        assert!(
            hints.len() == 1 && hints[0].1 == noise(5, MIB),
            "{context}: the 1 MiB hint"
        );
        fx.flush().expect("flush");
        fx.restart();
    }
}

/// 10,000 keys, a third overwritten, some made tombstones, a fifth deleted;
/// then a restart, more writes on the reopened engine, another restart.
pub fn many_keys_with_overwrites_and_deletes_survive_reopen(subject: Subject) {
    const KEYS: u64 = 10_000;
    let mut fx = Fixture::new(subject);
    let mut model = Model::default();
    let key = |i: u64| storage_key(&format!("many-{i}"));
    for i in 0..KEYS {
        model.put(&*fx, &key(i), value(i, noise(i, 64)));
    }
    for i in (0..KEYS).step_by(3) {
        model.put(&*fx, &key(i), value(KEYS + i, noise(KEYS + i, 32)));
    }
    for i in (0..KEYS).step_by(7) {
        model.put(&*fx, &key(i), tombstone(2 * KEYS + i));
    }
    for i in (0..KEYS).step_by(5) {
        model.delete(&*fx, &key(i));
    }
    fx.flush().expect("flush");
    model.assert_held_by(&*fx, subject.name);
    fx.restart();
    model.assert_held_by(&*fx, &format!("{}: after reopen", subject.name));

    // The reopened engine takes writes on top of what it replayed.
    for i in (0..KEYS).step_by(10) {
        model.put(&*fx, &key(i), value(3 * KEYS + i, noise(3 * KEYS + i, 16)));
    }
    for i in (1..KEYS).step_by(10) {
        model.delete(&*fx, &key(i));
    }
    fx.flush().expect("flush");
    fx.restart();
    assert!(model.len() > KEYS as usize / 2);
    model.assert_held_by(&*fx, &format!("{}: after a second reopen", subject.name));
}

/// Writers on several threads at once (the trait is `Sync`): every write
/// lands, none is lost or torn.
pub fn concurrent_writers_all_land(subject: Subject) {
    const THREADS: u64 = 4;
    const EACH: u64 = 250;
    let mut fx = Fixture::new(subject);
    std::thread::scope(|scope| {
        for t in 0..THREADS {
            let storage: &dyn Storage = &*fx;
            scope.spawn(move || {
                for i in 0..EACH {
                    let key = storage_key(&format!("thread-{t}-{i}"));
                    storage
                        .put(&key, &value(i, noise(t * EACH + i, 200)))
                        .expect("put");
                    if i % 50 == 0 {
                        storage.flush().expect("flush");
                    }
                }
            });
        }
    });
    let mut model = Model::default();
    for t in 0..THREADS {
        for i in 0..EACH {
            let key = storage_key(&format!("thread-{t}-{i}"));
            model
                .records
                .insert(key, value(i, noise(t * EACH + i, 200)));
        }
    }
    model.assert_held_by(&*fx, subject.name);
    fx.flush().expect("flush");
    fx.restart();
    model.assert_held_by(&*fx, &format!("{}: after reopen", subject.name));
}

// ---------------------------------------------------------------------------
// A full disk (persistent engines only).
// ---------------------------------------------------------------------------

/// The size of the filesystem the disk-full checks fill.
const DISK_BYTES: u64 = 8 << 20;
/// Space held back from the engine, freed to let it write again.
const BALLAST_BYTES: usize = 1 << 20;
/// A large write: past every engine's write buffer, so it reaches the disk
/// in `put` itself, and fills the disk in ~120 writes.
const LARGE_WRITE: usize = 64 << 10;
/// A small write, as most of DKVS's are: it waits in the engine's buffer
/// until `flush`, so that is where the disk turns out full.
const SMALL_WRITE: usize = 1 << 10;

/// A small real filesystem: a size-limited tmpfs mounted over a fresh
/// temporary directory, unmounted when dropped — also when the check
/// panics. Declare it before the engine, so that the engine (and its open
/// files) goes first.
pub struct SmallDisk {
    /// The mount point; removed after unmounting.
    dir: TempDir,
}

impl SmallDisk {
    /// Mounts a tmpfs of `bytes`, or prints why it cannot and returns
    /// `None`: mounting needs root (or the capability), and a check that
    /// cannot have its disk is skipped rather than failed.
    pub fn mount(bytes: u64) -> Option<Self> {
        let dir = match tempfile::tempdir() {
            Ok(dir) => dir,
            Err(error) => {
                eprintln!("skipped: no temporary directory to mount on: {error}");
                return None;
            }
        };
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .output();
        match mounted {
            Ok(output) if output.status.success() => Some(Self { dir }),
            Ok(output) => {
                eprintln!(
                    "skipped: cannot mount a {bytes}-byte tmpfs on {} ({}): {}",
                    dir.path().display(),
                    output.status,
                    String::from_utf8_lossy(&output.stderr).trim()
                );
                None
            }
            Err(error) => {
                eprintln!("skipped: cannot run mount: {error}");
                None
            }
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let umount = |lazy: bool| {
            let mut command = Command::new("umount");
            if lazy {
                command.arg("-l");
            }
            command.arg(self.dir.path()).output()
        };
        match umount(false) {
            Ok(output) if output.status.success() => {}
            // Busy (an engine thread still holds a file): detach it now,
            // the kernel frees it once the last file closes.
            _ => match umount(true) {
                Ok(output) if output.status.success() => {}
                Ok(output) => eprintln!(
                    "cannot unmount {}: {}",
                    self.dir.path().display(),
                    String::from_utf8_lossy(&output.stderr).trim()
                ),
                Err(error) => eprintln!("cannot run umount: {error}"),
            },
        }
    }
}

/// A write the full disk refused.
struct Refused {
    /// The key written.
    key: Vec<u8>,
    /// Which call failed: `put`, or the `flush` after it.
    call: &'static str,
    /// Why.
    error: Error,
}

/// A disk-full check's setup: a mounted [`SmallDisk`] with a ballast file
/// beside the engine's directory. `None` when the disk cannot be mounted.
fn small_disk_with_ballast() -> Option<(SmallDisk, PathBuf)> {
    let disk = SmallDisk::mount(DISK_BYTES)?;
    let ballast = disk.path().join("ballast");
    std::fs::write(&ballast, noise(0, BALLAST_BYTES)).expect("cannot write the ballast");
    Some((disk, ballast))
}

/// Writes fresh keys with values of `size` bytes (a write counts as
/// acknowledged once its `put` and the `flush` after it returned `Ok`)
/// until one is refused; the acknowledged ones go into `model`.
fn fill(subject: Subject, storage: &dyn Storage, model: &mut Model, size: usize) -> Refused {
    for i in 0u64.. {
        assert!(
            i * (size as u64) < 4 * DISK_BYTES,
            "{}: wrote four times the disk's size and no write failed",
            subject.name
        );
        let key = storage_key(&format!("fill-{i}"));
        let record = value(i, noise(i, size));
        if let Err(error) = storage.put(&key, &record) {
            return Refused {
                key,
                call: "put",
                error,
            };
        }
        if let Err(error) = storage.flush() {
            return Refused {
                key,
                call: "flush",
                error,
            };
        }
        model.records.insert(key, record);
    }
    unreachable!("the loop runs until a write fails")
}

/// Fills the disk: the write that finds it full fails with an `Err` (not a
/// panic), every write acknowledged before stays readable through the same
/// handle while the disk is full, and all of them are there after the
/// engine is reopened on the same, still full, disk.
pub fn disk_full_refuses_writes_and_keeps_acknowledged_ones(subject: Subject) {
    let Some((disk, _ballast)) = small_disk_with_ballast() else {
        return;
    };
    let mut fx = Fixture::open_at(subject, &disk.path().join("data")).expect("open");
    let mut model = Model::default();
    let refused = fill(subject, &*fx, &mut model, LARGE_WRITE);
    eprintln!(
        "{}: after {} acknowledged writes, {} failed: {}",
        subject.name,
        model.len(),
        refused.call,
        refused.error
    );
    assert!(
        model.len() > 10,
        "{}: the disk filled too soon",
        subject.name
    );
    model.assert_readable(&*fx, &format!("{}: while the disk is full", subject.name));
    let refused_visible = fx.get(&refused.key).map(|r| r.is_some());
    eprintln!(
        "{}: get of the refused write while full: {refused_visible:?} (true: served from memory)",
        subject.name
    );
    // Still full: another write is refused too, and reads still work.
    let again = fx
        .put(&storage_key("again"), &value(0, noise(0, LARGE_WRITE)))
        .and_then(|()| fx.flush());
    eprintln!("{}: a second write while full: {again:?}", subject.name);
    model.assert_readable(&*fx, &format!("{}: after a second refusal", subject.name));

    if let Err(error) = fx.reopen() {
        panic!("{}: cannot reopen on the full disk: {error}", subject.name);
    }
    model.assert_readable(
        &*fx,
        &format!("{}: reopened on the full disk", subject.name),
    );
    eprintln!(
        "{}: after reopening, the refused write is {}",
        subject.name,
        match fx.get(&refused.key) {
            Ok(Some(_)) => "present".to_string(),
            Ok(None) => "absent".to_string(),
            Err(error) => format!("unreadable: {error}"),
        }
    );
}

/// Fills the disk, then frees space (deletes a ballast file beside the
/// engine): the same handle takes writes again, and every acknowledged
/// write — before and after — survives a restart.
pub fn disk_full_writes_resume_once_space_is_freed(subject: Subject) {
    let Some((disk, ballast)) = small_disk_with_ballast() else {
        return;
    };
    let mut fx = Fixture::open_at(subject, &disk.path().join("data")).expect("open");
    let mut model = Model::default();
    let refused = fill(subject, &*fx, &mut model, LARGE_WRITE);
    std::fs::remove_file(&ballast).expect("cannot delete the ballast");
    write_after_freeing_space(subject, &fx, &mut model, &refused);
    model.assert_readable(&*fx, &format!("{}: after freeing space", subject.name));
    fx.restart();
    model.assert_readable(&*fx, &format!("{}: after reopen", subject.name));
}

/// Fills the disk, closes the engine, frees space and reopens it (what an
/// operator does, or what the engine may do itself once space is back):
/// it takes writes again and loses nothing acknowledged.
pub fn disk_full_writes_resume_after_a_reopen_once_space_is_freed(subject: Subject) {
    let Some((disk, ballast)) = small_disk_with_ballast() else {
        return;
    };
    let mut fx = Fixture::open_at(subject, &disk.path().join("data")).expect("open");
    let mut model = Model::default();
    let refused = fill(subject, &*fx, &mut model, LARGE_WRITE);
    fx.storage = None;
    std::fs::remove_file(&ballast).expect("cannot delete the ballast");
    fx.restart();
    model.assert_readable(&*fx, &format!("{}: reopened", subject.name));
    write_after_freeing_space(subject, &fx, &mut model, &refused);
    fx.restart();
    model.assert_readable(&*fx, &format!("{}: after another reopen", subject.name));
}

/// Writes a quarter of the freed ballast's worth through `fx`; every write
/// must succeed.
fn write_after_freeing_space(subject: Subject, fx: &Fixture, model: &mut Model, refused: &Refused) {
    for i in 0..(BALLAST_BYTES / LARGE_WRITE / 4) as u64 {
        let key = storage_key(&format!("after-{i}"));
        let record = value(1_000_000 + i, noise(1_000_000 + i, LARGE_WRITE));
        let written = fx.put(&key, &record).and_then(|()| fx.flush());
        if let Err(error) = written {
            panic!(
                "{}: write {i} after freeing space failed (the disk filled at {}: {}): {error}",
                subject.name, refused.call, refused.error
            );
        }
        model.records.insert(key, record);
    }
    eprintln!(
        "{}: once space was freed, the refused write is {}",
        subject.name,
        match fx.get(&refused.key) {
            Ok(Some(_)) => "present".to_string(),
            Ok(None) => "absent".to_string(),
            Err(error) => format!("unreadable: {error}"),
        }
    );
}

/// For an engine that treats a failed write as fatal (fjall): once the
/// disk is full, everything is refused (reads too: the node is to exit), a
/// retry never succeeds, and a reopen on the still-full disk has every
/// acknowledged write.
pub fn disk_full_is_fatal_and_a_reopen_loses_nothing(subject: Subject) {
    let Some((disk, _ballast)) = small_disk_with_ballast() else {
        return;
    };
    let mut fx = Fixture::open_at(subject, &disk.path().join("data")).expect("open");
    let mut model = Model::default();
    let refused = fill(subject, &*fx, &mut model, SMALL_WRITE);
    assert!(
        model.len() > 10,
        "{}: the disk filled too soon",
        subject.name
    );
    eprintln!(
        "{}: refused at {}: {}",
        subject.name, refused.call, refused.error
    );
    let again = fx
        .put(&storage_key("again"), &value(0, noise(0, SMALL_WRITE)))
        .and_then(|()| fx.flush());
    assert!(
        again.is_err(),
        "{}: a write after the failure succeeded",
        subject.name
    );
    assert!(
        fx.get(&refused.key).is_err(),
        "{}: the engine still serves reads after a fatal write error",
        subject.name
    );
    fx.storage = None;
    fx.restart();
    model.assert_readable(
        &*fx,
        &format!("{}: reopened on the full disk", subject.name),
    );
}

/// A refused large write leaves no trace; see [`refused_write_leaves_no_trace`].
pub fn disk_full_a_refused_large_write_leaves_no_trace(subject: Subject) {
    refused_write_leaves_no_trace(subject, LARGE_WRITE);
}

/// A refused small write (refused at `flush`) leaves no trace; see
/// [`refused_write_leaves_no_trace`].
pub fn disk_full_a_refused_small_write_leaves_no_trace(subject: Subject) {
    refused_write_leaves_no_trace(subject, SMALL_WRITE);
}

/// A refused write leaves no trace: its key reads as before (absent, or the
/// acknowledged record it would have overwritten), through every way of
/// reading, while the disk is full and after a restart.
fn refused_write_leaves_no_trace(subject: Subject, size: usize) {
    let Some((disk, _ballast)) = small_disk_with_ballast() else {
        return;
    };
    let mut fx = Fixture::open_at(subject, &disk.path().join("data")).expect("open");
    let mut model = Model::default();
    let refused = fill(subject, &*fx, &mut model, size);
    // An overwrite of an acknowledged key, refused as well.
    let (key, _) = model
        .records
        .first_key_value()
        .expect("a write was acknowledged");
    let key = key.clone();
    let overwrite = fx
        .put(&key, &value(u64::MAX, noise(9, size)))
        .and_then(|()| fx.flush());
    assert!(
        overwrite.is_err(),
        "{}: an overwrite on the full disk succeeded",
        subject.name
    );
    let context = format!(
        "{}: after a refused {} ({})",
        subject.name, refused.call, refused.error
    );
    let held = get(&*fx, &refused.key);
    assert!(
        held.is_none(),
        "{context}: the refused key holds {}",
        describe(held.as_ref())
    );
    model.assert_held_by(&*fx, &context);
    fx.restart();
    model.assert_held_by(&*fx, &format!("{context}, reopened"));
}

// ---------------------------------------------------------------------------
// Every engine, every check.
// ---------------------------------------------------------------------------

/// One `#[test]` per check, for the subject; attributes (e.g. `#[ignore]`)
/// go before a check's name.
macro_rules! checks {
    ($subject:expr; $($(#[$attr:meta])* $check:ident),+ $(,)?) => {
        $(
            #[test]
            $(#[$attr])*
            fn $check() {
                super::$check($subject)
            }
        )+
    };
}

/// The checks every engine must pass.
macro_rules! every_engine_checks {
    ($subject:expr) => {
        checks!($subject;
            put_get_held_round_trip,
            last_put_wins_whatever_its_version,
            delete_removes_a_key_for_good,
            scan_visits_a_half_open_range_in_key_order,
            scan_while_stops_where_the_visitor_says,
            visits_see_exactly_the_live_records,
            metadata_is_kept_and_durable_on_its_own,
            hints_come_back_by_prefix_in_id_order_up_to_the_limit,
            flushed_or_synced_writes_survive_reopen,
            large_values_round_trip,
            many_keys_with_overwrites_and_deletes_survive_reopen,
            concurrent_writers_all_land,
        );
    };
}

mod memory {
    every_engine_checks!(super::MEMORY);
}

mod log {
    every_engine_checks!(super::LOG);
    checks!(super::LOG;
        disk_full_refuses_writes_and_keeps_acknowledged_ones,
        disk_full_writes_resume_once_space_is_freed,
        disk_full_writes_resume_after_a_reopen_once_space_is_freed,
        disk_full_a_refused_large_write_leaves_no_trace,
        disk_full_a_refused_small_write_leaves_no_trace,
    );
}

/// fjall's journal refuses every write after one failed write
/// ("poisoned"), so DKVS treats a failed journal write on fjall as fatal:
/// the engine refuses everything and the node exits; a restart once space
/// is back loses nothing acknowledged.
mod fjall {
    every_engine_checks!(super::FJALL);
    checks!(super::FJALL;
        disk_full_is_fatal_and_a_reopen_loses_nothing,
        disk_full_writes_resume_after_a_reopen_once_space_is_freed,
    );
}
