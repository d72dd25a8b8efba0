//! [`Storage`] as a log-structured hash table: the Bitcask design (Riak's
//! default backend), DKVS's default engine.
//!
//! Every change is appended to the active *segment* file of `<dir>/log/`;
//! an in-memory index maps each key to where its newest entry is (and, for
//! records, the version it holds, so write-if-newer never touches the disk).
//! A read is one index lookup and one `pread`; a batch of writes is one
//! `write(2)` (group commit, [`Storage::flush`]). The whole key set lives in
//! memory (≈ 140 bytes per key with short keys), the values on disk.
//!
//! Entry format (2), little-endian, after an 8-byte segment header
//! (`DKVSLG`, version u16): `magic u32 | header_checksum u32 | kind u8 |
//! key_len u32 | value_len u32 | payload_checksum u64 | key | value`. The
//! header checksum is seeded with the entry's position, so bytes that look
//! like an entry anywhere else (inside a value, say) never pass for one.
//! Start-up replays the segments in order and *resynchronises* after a
//! damaged entry: past it when its header is intact, else at the next offset
//! where a whole valid entry starts. So a damaged byte costs the entry it
//! hits; damage with nothing valid after it at the end of the newest segment
//! (a crash mid-write) is cut off. Segments of format 1 (no header, one
//! checksum) stay readable. `docs/STORAGE.md` has the details.
//!
//! Segments roll over at 64 MiB. A background thread compacts once dead
//! entries outweigh live ones by a segment: it copies the live entries of
//! the *oldest* segment to the end of the log and deletes the file. Because
//! it is the oldest, no older entry can exist for its keys, so its delete
//! markers can simply be dropped.
//!
//! fsync never happens under the engine's lock: `flush` writes the buffer
//! and, under `--fsync always`, fsyncs the files afterwards; a sealed segment
//! is fsynced by the next `sync`/`flush` rather than while rolling over.
//!
//! The pieces: `entry.rs` (the on-disk format), `index.rs` (the in-memory
//! state and index), `write.rs` (buffer, group commit, rollback after a
//! failed write, fsync), `replay.rs` (start-up), `compaction.rs`; this
//! file is the engine itself: [`LogStorage`], `open` and the [`Storage`]
//! implementation.

mod compaction;
mod entry;
mod index;
mod replay;
mod write;

use std::fs::File;
use std::ops::Bound;
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use self::entry::{Format, HEADER_BYTES, Kind, LEGACY_HEADER_BYTES};
use self::index::{Located, RecordSlot, State};
use self::write::{Faults, WriteError, sync_dir};
use super::{FsyncPolicy, Held, Storage};
use crate::clock::Version;
use crate::error::{Error, Result};
use crate::locks::Locked;
use crate::record::Record;

/// A segment stops growing past this size.
const SEGMENT_BYTES: u64 = 64 << 20;

/// Entries handled per lock acquisition while compacting or scanning.
const CHUNK: usize = 1024;

struct Shared {
    state: Mutex<State>,
    /// One compaction at a time. Lock order: compacting, syncing, state.
    compacting: Mutex<()>,
    /// One sync at a time, so a sync never returns while files written
    /// before it are still being fsynced by another.
    syncing: Mutex<()>,
    /// Failures tests inject.
    faults: Arc<Faults>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every change to the state is completed before the lock is released
        // or fails before touching it, so a poisoned lock is still consistent.
        self.state.locked()
    }
}

/// Receives each key with its record, or why the record could not be read.
/// Visits one record (or why it could not be read); answers whether to go on.
type RecordVisitor<'a> = dyn FnMut(&[u8], std::result::Result<Record, String>) -> bool + 'a;

/// The log-structured engine; see the module documentation.
pub struct LogStorage {
    shared: Arc<Shared>,
    fsync: FsyncPolicy,
    /// Dropping it stops the compaction thread.
    stop: Option<mpsc::Sender<()>>,
    compactor: Option<JoinHandle<()>>,
    /// Held for the engine's lifetime: one process per data dir.
    _lock: File,
}

impl LogStorage {
    /// Opens (or creates) the log in `dir`, replaying it.
    pub fn open(dir: &Path, fsync: FsyncPolicy) -> Result<Self> {
        if !dir.exists() {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::Storage(format!("cannot create {}: {e}", dir.display())))?;
            if let Some(parent) = dir.parent() {
                sync_dir(parent)?;
            }
        }
        let lock_path = dir.join("LOCK");
        let lock = File::create(&lock_path)
            .map_err(|e| Error::Storage(format!("cannot open {}: {e}", lock_path.display())))?;
        lock.try_lock().map_err(|_| {
            Error::Storage(format!(
                "{} is in use by another process (another DKVSServer on the same --data-dir?)",
                dir.display()
            ))
        })?;
        let faults = Arc::new(Faults::default());
        let mut state = replay::replay(dir)?;
        state.faults = faults.clone();
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            compacting: Mutex::new(()),
            syncing: Mutex::new(()),
            faults,
        });
        let (stop, compactor) = compaction::start(&shared)?;
        Ok(Self {
            shared,
            fsync,
            stop: Some(stop),
            compactor: Some(compactor),
            _lock: lock,
        })
    }

    /// Reads `key`'s entries from `index` in key order, `CHUNK` at a time
    /// (the lock is not held while reading from disk).
    fn visit_records(
        &self,
        from: Bound<Vec<u8>>,
        to: Option<&[u8]>,
        wanted: fn(&RecordSlot) -> bool,
        visit: &mut RecordVisitor<'_>,
    ) -> Result<()> {
        let mut from = from;
        loop {
            let chunk: Vec<(Box<[u8]>, Located)> = {
                let mut state = self.shared.lock();
                if !state.buffer.is_empty() {
                    // Read only what is written (see `get`).
                    let _ = state.write_buffer();
                }
                let range = state
                    .records
                    .range::<[u8], _>((from.as_ref().map(|k| &k[..]), Bound::Unbounded));
                let mut chunk = Vec::new();
                let mut last = None;
                for (examined, (key, slot)) in range.enumerate() {
                    if to.is_some_and(|to| &key[..] >= to) || examined == CHUNK * 16 {
                        break;
                    }
                    last = Some(key);
                    if wanted(slot) {
                        chunk.push((key.clone(), state.locate(slot.slot)?));
                        if chunk.len() == CHUNK {
                            break;
                        }
                    }
                }
                let Some(last) = last else {
                    return Ok(());
                };
                from = Bound::Excluded(last.to_vec());
                chunk
            };
            for (key, located) in chunk {
                let record = located
                    .read(Kind::Put, &key)?
                    .and_then(|v| Record::decode(v.get()).map_err(|e| e.0));
                if !visit(&key, record) {
                    return Ok(());
                }
            }
        }
    }

    fn sync_with(&self, data_only: bool) -> Result<()> {
        self.shared.sync(data_only)
    }
}

impl Drop for LogStorage {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(compactor) = self.compactor.take() {
            let _ = compactor.join();
        }
        if let Err(error) = self.shared.lock().write_buffer() {
            tracing::error!(%error, "could not write the last buffered entries");
        }
    }
}

fn corrupt(key: &[u8], why: String) -> Error {
    Error::CorruptRecord {
        key: String::from_utf8_lossy(key).into_owned(),
        why,
    }
}

impl Storage for LogStorage {
    fn get(&self, key: &[u8]) -> Result<Option<Record>> {
        let located = {
            let mut state = self.shared.lock();
            let Some(slot) = state.records.get(key).map(|r| r.slot) else {
                return Ok(None);
            };
            if state.is_buffered(slot) {
                // Never serve what is not written: write it now (on failure
                // the index is back to what is on disk; look again).
                let _ = state.write_buffer();
            }
            match state.records.get(key) {
                Some(slot) => state.locate(slot.slot)?,
                None => return Ok(None),
            }
        };
        let value = located
            .read(Kind::Put, key)?
            .map_err(|why| corrupt(key, why))?;
        Record::decode(value.get())
            .map(Some)
            .map_err(|e| corrupt(key, e.0))
    }

    fn held(&self, key: &[u8]) -> Result<Option<Held>> {
        let state = self.shared.lock();
        state.check()?;
        match state.records.get(key) {
            None => Ok(None),
            Some(RecordSlot {
                held: Some(held), ..
            }) => Ok(Some(*held)),
            Some(RecordSlot { held: None, .. }) => {
                Err(corrupt(key, "the stored record does not decode".into()))
            }
        }
    }

    fn put(&self, key: &[u8], record: &Record) -> Result<()> {
        let value = record.encode();
        let mut state = self.shared.lock();
        let slot = state.append(Kind::Put, key, &value)?;
        state.remember(Kind::Put, key, Some(record.version));
        let held = Some(Held::of(record));
        let old = match state.records.get_mut(key) {
            Some(existing) => Some(std::mem::replace(existing, RecordSlot { slot, held }).slot),
            None => {
                state.records.insert(key.into(), RecordSlot { slot, held });
                None
            }
        };
        state.replace_live(old, Some(slot));
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        match self.fsync {
            FsyncPolicy::Periodic => self.shared.lock().write_buffer(),
            FsyncPolicy::Always => self.sync_with(true),
        }
    }

    fn for_each(
        &self,
        visit: &mut dyn FnMut(&[u8], &Record),
        corrupt: &mut dyn FnMut(&[u8], String),
    ) -> Result<()> {
        self.visit_records(Bound::Unbounded, None, |_| true, &mut |key, record| {
            match record {
                Ok(record) => visit(key, &record),
                Err(why) => corrupt(key, why),
            }
            true
        })
    }

    fn for_each_held(
        &self,
        visit: &mut dyn FnMut(&[u8], Held),
        corrupt: &mut dyn FnMut(&[u8], String),
    ) -> Result<()> {
        // Start-up: replay already decoded every record into the index.
        let state = self.shared.lock();
        state.check()?;
        for (key, slot) in &state.records {
            match slot.held {
                Some(held) => visit(key, held),
                None => corrupt(key, "the stored record does not decode".into()),
            }
        }
        Ok(())
    }

    fn for_each_tombstone(&self, visit: &mut dyn FnMut(&[u8], &Record)) -> Result<()> {
        // Only tombstones are read from disk; the index knows which keys hold one.
        let is_tombstone = |slot: &RecordSlot| slot.held.is_some_and(|h| h.tombstone);
        self.visit_records(Bound::Unbounded, None, is_tombstone, &mut |key, record| {
            if let Ok(record) = record {
                visit(key, &record);
            }
            true
        })
    }

    fn scan(
        &self,
        from: &[u8],
        to: Option<&[u8]>,
        visit: &mut dyn FnMut(&[u8], &Record),
    ) -> Result<()> {
        self.visit_records(
            Bound::Included(from.to_vec()),
            to,
            |_| true,
            &mut |key, record| {
                if let Ok(record) = record {
                    visit(key, &record);
                }
                true
            },
        )
    }

    fn scan_while(
        &self,
        from: &[u8],
        to: Option<&[u8]>,
        visit: &mut dyn FnMut(&[u8], &Record) -> bool,
    ) -> Result<()> {
        self.visit_records(
            Bound::Included(from.to_vec()),
            to,
            |_| true,
            &mut |key, record| match record {
                Ok(record) => visit(key, &record),
                Err(_) => true,
            },
        )
    }

    fn delete(&self, key: &[u8]) -> Result<()> {
        let mut state = self.shared.lock();
        state.append(Kind::Delete, key, &[])?;
        state.remember(Kind::Delete, key, None);
        let old = state.records.remove(key).map(|r| r.slot);
        state.replace_live(old, None);
        Ok(())
    }

    fn get_meta(&self, name: &str) -> Result<Option<u64>> {
        let state = self.shared.lock();
        state.check()?;
        Ok(state.meta.get(name).map(|(value, _)| *value))
    }

    fn put_meta_durable(&self, name: &str, value: u64) -> Result<()> {
        {
            let mut state = self.shared.lock();
            let slot = state.append(Kind::Meta, name.as_bytes(), &value.to_le_bytes())?;
            state.remember(Kind::Meta, name.as_bytes(), None);
            let old = state.meta.insert(name.to_string(), (value, slot));
            state.replace_live(old.map(|(_, s)| s), Some(slot));
            // Written under the same lock hold: another caller's failed
            // write (a full disk) cannot drop it from the buffer unnoticed
            // while this waits for the sync; an error here undid it.
            state.write_buffer()?;
        }
        self.sync_with(true)
    }

    fn sync(&self) -> Result<()> {
        self.sync_with(false)
    }

    fn put_hint(&self, id: &[u8], bytes: &[u8]) -> Result<()> {
        let mut state = self.shared.lock();
        let slot = state.append(Kind::HintPut, id, bytes)?;
        state.remember(Kind::HintPut, id, None);
        let old = state.hints.insert(id.into(), slot);
        state.replace_live(old, Some(slot));
        Ok(())
    }

    fn delete_hint(&self, id: &[u8]) -> Result<()> {
        let mut state = self.shared.lock();
        state.append(Kind::HintDelete, id, &[])?;
        state.remember(Kind::HintDelete, id, None);
        let old = state.hints.remove(id);
        state.replace_live(old, None);
        Ok(())
    }

    /// From the in-memory index: no hint is read, except one in a segment
    /// whose framing is unknown (its first bytes were damaged).
    fn hint_ids(&self, prefix: &[u8], limit: usize) -> Result<Vec<(Vec<u8>, u64)>> {
        let mut unknown = Vec::new();
        let mut out = Vec::new();
        {
            let state = self.shared.lock();
            state.check()?;
            for (id, slot) in state
                .hints
                .range::<[u8], _>((Bound::Included(prefix), Bound::Unbounded))
            {
                if !id.starts_with(prefix) || out.len() >= limit {
                    break;
                }
                let header = match state.segments.get(&slot.segment).map(|s| s.format) {
                    Some(Format::Framed) => Some(HEADER_BYTES),
                    Some(Format::Legacy) => Some(LEGACY_HEADER_BYTES),
                    Some(Format::Unknown) | None => None,
                };
                let size =
                    header.map(|h| u64::from(slot.len).saturating_sub((h + id.len()) as u64));
                if size.is_none() {
                    unknown.push(out.len());
                }
                out.push((id.to_vec(), size.unwrap_or(0)));
            }
        }
        for index in unknown {
            let id = out[index].0.clone();
            out[index].1 = self
                .hints(&id, 1)?
                .into_iter()
                .find(|(found, _)| *found == id)
                .map_or(0, |(_, value)| value.len() as u64);
        }
        Ok(out)
    }

    fn hints(&self, prefix: &[u8], limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let located: Vec<(Vec<u8>, Located)> = {
            let mut state = self.shared.lock();
            if !state.buffer.is_empty() {
                // Read only what is written (see `get`).
                let _ = state.write_buffer();
            }
            let mut out = Vec::new();
            for (id, slot) in state
                .hints
                .range::<[u8], _>((Bound::Included(prefix), Bound::Unbounded))
            {
                if !id.starts_with(prefix) || out.len() >= limit {
                    break;
                }
                out.push((id.to_vec(), state.locate(*slot)?));
            }
            out
        };
        located
            .into_iter()
            .map(|(id, located)| {
                let value = located
                    .read(Kind::HintPut, &id)?
                    .map_err(|why| corrupt(&id, why))?;
                Ok((id.clone(), value.get().to_vec()))
            })
            .collect()
    }

    fn damaged_entries_skipped(&self) -> u64 {
        self.shared.lock().damaged_skipped
    }

    fn dropped_buffers(&self) -> u64 {
        self.shared.lock().rollbacks
    }

    fn lost_write(&self, key: &[u8], version: Version) -> Option<Error> {
        let state = self.shared.lock();
        let lost = state
            .lost
            .iter()
            .rev()
            .any(|(k, v)| *v == version && &k[..] == key);
        lost.then(|| {
            state.last_write_error.as_ref().map_or_else(
                || Error::Storage("the write could not be stored".into()),
                WriteError::to_error,
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn value(lamport: u64, text: &str) -> Record {
        Record::value(Version::new(lamport, 1), text.as_bytes().to_vec())
    }

    #[test]
    fn writes_survive_a_reopen_and_deletes_stay_deleted() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let log = LogStorage::open(dir.path(), FsyncPolicy::Periodic).expect("open");
            log.put(b"a", &value(1, "one")).expect("put");
            log.put(b"b", &value(2, "two")).expect("put");
            log.put(b"a", &value(3, "three")).expect("put");
            log.delete(b"b").expect("delete");
            log.put_hint(b"h1", b"hint").expect("hint");
            log.put_meta_durable("clock", 42).expect("meta");
            log.flush().expect("flush");
            assert_eq!(log.get(b"a").expect("get"), Some(value(3, "three")));
            assert_eq!(
                log.held(b"a").expect("held"),
                Some(Held::of(&value(3, "three")))
            );
        }
        let log = LogStorage::open(dir.path(), FsyncPolicy::Periodic).expect("reopen");
        assert_eq!(log.get(b"a").expect("get"), Some(value(3, "three")));
        assert_eq!(log.get(b"b").expect("get"), None);
        assert_eq!(log.get_meta("clock").expect("meta"), Some(42));
        assert_eq!(
            log.hints(b"h", 10).expect("hints"),
            vec![(b"h1".to_vec(), b"hint".to_vec())]
        );
        let mut seen = Vec::new();
        log.for_each(
            &mut |k, r| seen.push((k.to_vec(), r.clone())),
            &mut |_, _| {},
        )
        .expect("scan");
        assert_eq!(seen, vec![(b"a".to_vec(), value(3, "three"))]);
    }

    #[test]
    fn a_second_process_cannot_open_the_same_dir() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _first = LogStorage::open(dir.path(), FsyncPolicy::Periodic).expect("open");
        let second = LogStorage::open(dir.path(), FsyncPolicy::Periodic);
        assert!(matches!(second, Err(Error::Storage(why)) if why.contains("in use")));
    }

    #[test]
    fn hint_ids_give_each_hint_its_exact_size_without_reading_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = LogStorage::open(dir.path(), FsyncPolicy::Periodic).expect("open");
        storage.put_hint(b"a1", b"one").expect("hint");
        storage.put_hint(b"a2", &[7u8; 1000]).expect("hint");
        storage.put_hint(b"b1", b"").expect("hint");
        storage.flush().expect("flush");
        let expected = vec![(b"a1".to_vec(), 3), (b"a2".to_vec(), 1000)];
        assert_eq!(storage.hint_ids(b"a", 10).expect("ids"), expected);
        drop(storage);
        let storage = LogStorage::open(dir.path(), FsyncPolicy::Periodic).expect("reopen");
        assert_eq!(storage.hint_ids(b"a", 10).expect("ids"), expected);
        assert_eq!(
            storage.hint_ids(b"b", 10).expect("ids"),
            vec![(b"b1".to_vec(), 0)]
        );
        assert_eq!(storage.hint_ids(b"", 1).expect("ids").len(), 1);
    }

    #[test]
    fn scans_visit_a_key_range_and_the_tombstones_in_order_across_chunks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = LogStorage::open(dir.path(), FsyncPolicy::Periodic).expect("open");
        for i in 0..3000u32 {
            log.put(&i.to_be_bytes(), &value(u64::from(i) + 1, "v"))
                .expect("put");
        }
        let mut keys = Vec::new();
        log.scan(
            &100u32.to_be_bytes(),
            Some(&2500u32.to_be_bytes()),
            &mut |k, _| {
                keys.push(u32::from_be_bytes(k.try_into().expect("4 bytes")));
            },
        )
        .expect("scan");
        assert_eq!(keys, (100..2500).collect::<Vec<_>>());
        // Tombstones are found among many values, across chunks.
        for i in (0..3000u32).step_by(700) {
            let tombstone = Record::tombstone_at(Version::new(10_000, 1), u64::from(i));
            log.put(&i.to_be_bytes(), &tombstone).expect("delete");
        }
        let mut tombstones = Vec::new();
        log.for_each_tombstone(&mut |k, r| {
            assert!(r.is_tombstone());
            tombstones.push(u32::from_be_bytes(k.try_into().expect("4 bytes")));
        })
        .expect("tombstones");
        assert_eq!(tombstones, vec![0, 700, 1400, 2100, 2800]);
    }
}
