//! [`Storage`] on fjall, an LSM-tree engine with a write-ahead journal.
//!
//! Two keyspaces: `records` (key → encoded [`Record`]) and `meta` (small
//! named numbers, such as the clock's ceiling). fjall appends every write to
//! its journal and hands it to the operating system before `insert` returns,
//! so an acknowledged write survives a crash or SIGKILL of the process; under
//! [`FsyncPolicy::Always`] `flush` also fsyncs, once per batch.
//!
//! Any failed fsync, and any failed write to the journal (fjall's journal
//! refuses every write after one failed write: it is "poisoned"), is fatal
//! ([`storage::fatal`]): the engine refuses everything after it and
//! `DKVSServer` exits non-zero. A full disk therefore stops a node on this
//! engine; restart it once space is back (replay recovers every
//! acknowledged write). The log engine instead refuses just the write.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

use super::{FsyncPolicy, Storage};
use crate::error::{Error, Result};
use crate::locks::Locked;
use crate::record::Record;
use crate::storage;

pub struct FjallStorage {
    /// The database: owns the journal shared by both keyspaces.
    db: Database,
    /// Key → encoded record.
    records: Keyspace,
    /// Named numbers.
    meta: Keyspace,
    /// Hints for other replicas.
    hints: Keyspace,
    /// When writes are fsynced.
    fsync: FsyncPolicy,
    /// The database directory, where fjall keeps its journal files.
    dir: PathBuf,
    /// Why a write or fsync failed, once one has: everything is refused.
    failed: OnceLock<String>,
    /// Held through every fsync, so none starts (and could succeed on
    /// dropped pages) after another failed.
    syncing: Mutex<()>,
    /// Tests: every fsync fails.
    #[cfg(test)]
    fail_fsync: std::sync::atomic::AtomicBool,
}

impl FjallStorage {
    /// Opens (or creates) the database in `dir`, replaying its journal.
    pub fn open(dir: &Path, fsync: FsyncPolicy) -> Result<Self> {
        let db = Database::builder(dir).open().map_err(|error| match error {
            // fjall keeps its format version in `<dir>/version`.
            fjall::Error::InvalidVersion(version) => Error::Storage(format!(
                "{} names {}, and this release reads fjall's format 3: a newer DKVS release wrote \
                 it (downgrades are not supported; run that release), or the file is damaged",
                dir.join("version").display(),
                version.map_or("no fjall format this release knows".to_string(), |v| {
                    format!("fjall format {}", u8::from(v))
                }),
            )),
            other => other.into(),
        })?;
        // Writes buffer in the journal until `flush`: the replica flushes
        // once per batch of writes, before acknowledging any of them.
        let buffered = || KeyspaceCreateOptions::default().manual_journal_persist(true);
        let records = db.keyspace("records", buffered)?;
        let meta = db.keyspace("meta", KeyspaceCreateOptions::default)?;
        let hints = db.keyspace("hints", buffered)?;
        Ok(Self {
            db,
            records,
            meta,
            hints,
            fsync,
            dir: dir.to_path_buf(),
            failed: OnceLock::new(),
            syncing: Mutex::new(()),
            #[cfg(test)]
            fail_fsync: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Refuses everything after a failed write or fsync.
    fn check(&self) -> Result<()> {
        match self.failed.get() {
            Some(why) => Err(storage::refused_after_fatal(why)),
            None => Ok(()),
        }
    }

    /// Refuses everything from now on and reports `why` as fatal.
    fn fail(&self, why: String) -> Error {
        let _ = self.failed.set(why.clone());
        storage::fatal(why)
    }

    /// A write's result: an error is fatal (fjall's journal is poisoned).
    fn written<T>(&self, result: fjall::Result<T>) -> Result<T> {
        result.map_err(|e| self.fail(format!("write to the fjall journal failed: {e}")))
    }

    /// Runs an fsync with the sync lock held; an error is fatal.
    fn fsync(&self, sync: impl FnOnce() -> Result<()>) -> Result<()> {
        let _one_at_a_time = self.syncing.locked();
        self.check()?;
        #[cfg(test)]
        if self.fail_fsync.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(self.fail("fsync of the journal failed: injected".into()));
        }
        sync().map_err(|e| self.fail(e.to_string()))
    }

    /// Makes every write so far durable without holding fjall's journal lock
    /// through the fsync (fjall's own `persist(SyncAll)` does, which stalls
    /// every writer of the node for the fsync's milliseconds): hand the
    /// journal buffer to the OS (short, under the lock), then fsync the
    /// active journal file through a descriptor of our own. Journals sealed
    /// earlier were fsynced by fjall when it rotated them, so the newest file
    /// is the only one that can hold unsynced writes.
    fn sync_journal(&self, full: bool) -> Result<()> {
        self.fsync(|| self.sync_journal_unchecked(full))
    }

    fn sync_journal_unchecked(&self, full: bool) -> Result<()> {
        self.db.persist(PersistMode::Buffer)?;
        let Some(active) = newest_journal(&self.dir)? else {
            // No journal file found (not expected): fall back to fjall.
            self.db.persist(PersistMode::SyncAll)?;
            return Ok(());
        };
        let file = std::fs::File::open(&active).map_err(|e| {
            Error::Storage(format!("cannot open journal {}: {e}", active.display()))
        })?;
        let synced = if full {
            file.sync_all()
        } else {
            file.sync_data()
        };
        synced.map_err(|e| Error::Storage(format!("fsync of {} failed: {e}", active.display())))
    }
}

/// The journal file with the highest number in `dir` (fjall names them
/// `<n>.jnl` and appends to the newest).
fn newest_journal(dir: &Path) -> Result<Option<PathBuf>> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| Error::Storage(format!("cannot list {}: {e}", dir.display())))?;
    let mut newest: Option<(u64, PathBuf)> = None;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(number) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".jnl"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        if newest.as_ref().is_none_or(|(best, _)| number > *best) {
            newest = Some((number, entry.path()));
        }
    }
    Ok(newest.map(|(_, path)| path))
}

impl Storage for FjallStorage {
    fn get(&self, key: &[u8]) -> Result<Option<Record>> {
        self.check()?;
        let Some(bytes) = self.records.get(key)? else {
            return Ok(None);
        };
        Record::decode(&bytes)
            .map(Some)
            .map_err(|e| Error::CorruptRecord {
                key: String::from_utf8_lossy(key).into_owned(),
                why: e.0,
            })
    }

    fn put(&self, key: &[u8], record: &Record) -> Result<()> {
        self.check()?;
        self.written(self.records.insert(key, record.encode()))
    }

    fn for_each(
        &self,
        visit: &mut dyn FnMut(&[u8], &Record),
        corrupt: &mut dyn FnMut(&[u8], String),
    ) -> Result<()> {
        self.check()?;
        for item in self.records.iter() {
            let (key, bytes) = item.into_inner()?;
            match Record::decode(&bytes) {
                Ok(record) => visit(&key, &record),
                Err(error) => corrupt(&key, error.0),
            }
        }
        Ok(())
    }

    fn scan(
        &self,
        from: &[u8],
        to: Option<&[u8]>,
        visit: &mut dyn FnMut(&[u8], &Record),
    ) -> Result<()> {
        self.check()?;
        let iter = match to {
            Some(to) => self.records.range(from.to_vec()..to.to_vec()),
            None => self.records.range(from.to_vec()..),
        };
        for item in iter {
            let (key, bytes) = item.into_inner()?;
            if let Ok(record) = Record::decode(&bytes) {
                visit(&key, &record);
            }
        }
        Ok(())
    }

    fn scan_while(
        &self,
        from: &[u8],
        to: Option<&[u8]>,
        visit: &mut dyn FnMut(&[u8], &Record) -> bool,
    ) -> Result<()> {
        self.check()?;
        let iter = match to {
            Some(to) => self.records.range(from.to_vec()..to.to_vec()),
            None => self.records.range(from.to_vec()..),
        };
        for item in iter {
            let (key, bytes) = item.into_inner()?;
            if let Ok(record) = Record::decode(&bytes)
                && !visit(&key, &record)
            {
                break;
            }
        }
        Ok(())
    }

    fn delete(&self, key: &[u8]) -> Result<()> {
        self.check()?;
        self.written(self.records.remove(key))
    }

    fn get_meta(&self, name: &str) -> Result<Option<u64>> {
        self.check()?;
        let Some(bytes) = self.meta.get(name)? else {
            return Ok(None);
        };
        let array: [u8; 8] = bytes.as_ref().try_into().map_err(|_| {
            Error::Storage(format!(
                "metadata {name:?} is {} bytes, expected 8",
                bytes.len()
            ))
        })?;
        Ok(Some(u64::from_le_bytes(array)))
    }

    fn put_meta_durable(&self, name: &str, value: u64) -> Result<()> {
        self.check()?;
        self.written(self.meta.insert(name, value.to_le_bytes()))?;
        self.sync_journal(false)
    }

    fn sync(&self) -> Result<()> {
        self.sync_journal(true)
    }

    /// Hands buffered writes to the OS; under `--fsync always` also
    /// fsyncs them — once for the whole batch (group commit).
    fn flush(&self) -> Result<()> {
        match self.fsync {
            FsyncPolicy::Always => self.fsync(|| Ok(self.db.persist(PersistMode::SyncData)?)),
            FsyncPolicy::Periodic => {
                self.check()?;
                self.written(self.db.persist(PersistMode::Buffer))
            }
        }
    }

    fn put_hint(&self, id: &[u8], bytes: &[u8]) -> Result<()> {
        self.check()?;
        self.written(self.hints.insert(id, bytes))
    }

    fn delete_hint(&self, id: &[u8]) -> Result<()> {
        self.check()?;
        self.written(self.hints.remove(id))
    }

    fn hints(&self, prefix: &[u8], limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.check()?;
        let mut out = Vec::new();
        for item in self.hints.prefix(prefix).take(limit) {
            let (id, bytes) = item.into_inner()?;
            out.push((id.to_vec(), bytes.to_vec()));
        }
        Ok(out)
    }

    /// The hints keyspace is a standard LSM tree: values sit inline in its
    /// data blocks, so listing ids streams through them (fjall's `Guard::size`
    /// reads the value too, except in a key-value separated keyspace), but
    /// only one value is held at a time, never all of them.
    fn hint_ids(&self, prefix: &[u8], limit: usize) -> Result<Vec<(Vec<u8>, u64)>> {
        let mut out = Vec::new();
        for item in self.hints.prefix(prefix).take(limit) {
            let (id, bytes) = item.into_inner()?;
            out.push((id.to_vec(), bytes.len() as u64));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Version;

    #[test]
    fn a_database_of_another_fjall_format_is_refused_naming_its_version_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(FjallStorage::open(dir.path(), FsyncPolicy::Periodic).expect("open"));
        let marker = dir.path().join("version");
        let mut bytes = std::fs::read(&marker).expect("read");
        assert_eq!(bytes.get(3), Some(&3), "fjall format 3 in {bytes:?}");
        for (version, said) in [(2, "fjall format 2"), (4, "no fjall format")] {
            bytes[3] = version;
            std::fs::write(&marker, &bytes).expect("write");
            let refused = FjallStorage::open(dir.path(), FsyncPolicy::Periodic)
                .err()
                .expect("refused")
                .to_string();
            assert!(refused.contains(&marker.display().to_string()), "{refused}");
            assert!(refused.contains(said), "{refused}");
        }
    }

    #[test]
    fn records_and_meta_survive_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let storage = FjallStorage::open(dir.path(), FsyncPolicy::Periodic).expect("open");
            storage
                .put(b"a", &Record::value(Version::new(1, 2), &b"one"[..]))
                .expect("put");
            storage
                .put(b"b", &Record::tombstone(Version::new(3, 4)))
                .expect("put");
            storage.put_meta_durable("clock_ceiling", 42).expect("meta");
        }
        let storage = FjallStorage::open(dir.path(), FsyncPolicy::Always).expect("reopen");
        assert_eq!(
            storage.get(b"a").expect("get"),
            Some(Record::value(Version::new(1, 2), &b"one"[..]))
        );
        assert_eq!(storage.get(b"missing").expect("get"), None);
        assert_eq!(storage.get_meta("clock_ceiling").expect("meta"), Some(42));
        let mut seen = Vec::new();
        storage
            .for_each(
                &mut |k, r| seen.push((k.to_vec(), r.clone())),
                &mut |_, _| {},
            )
            .expect("scan");
        assert_eq!(seen.len(), 2);
        assert!(seen[1].1.is_tombstone());
    }

    #[test]
    fn hint_ids_list_ids_and_sizes_by_prefix() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = FjallStorage::open(dir.path(), FsyncPolicy::Periodic).expect("open");
        storage.put_hint(b"a1", b"one").expect("hint");
        storage.put_hint(b"a2", &[7u8; 1000]).expect("hint");
        storage.put_hint(b"b1", b"x").expect("hint");
        assert_eq!(
            storage.hint_ids(b"a", 10).expect("ids"),
            [(b"a1".to_vec(), 3), (b"a2".to_vec(), 1000)]
        );
        assert_eq!(storage.hint_ids(b"", 1).expect("ids").len(), 1);
    }

    #[test]
    fn a_failed_fsync_is_fatal_and_everything_is_refused_after_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let record = Record::value(Version::new(1, 2), &b"one"[..]);
        for fsync in [FsyncPolicy::Always, FsyncPolicy::Periodic] {
            let storage = FjallStorage::open(dir.path(), fsync).expect("open");
            storage.put(b"a", &record).expect("put");
            storage.flush().expect("flush");
            storage
                .fail_fsync
                .store(true, std::sync::atomic::Ordering::Relaxed);
            assert!(storage.sync().is_err());
            storage
                .fail_fsync
                .store(false, std::sync::atomic::Ordering::Relaxed);
            // No retry succeeds, and nothing else is done.
            assert!(storage.sync().is_err());
            assert!(storage.flush().is_err());
            assert!(storage.put(b"b", &record).is_err());
            assert!(storage.get(b"a").is_err());
            drop(storage);
            let storage = FjallStorage::open(dir.path(), fsync).expect("reopen");
            assert_eq!(storage.get(b"a").expect("get"), Some(record.clone()));
        }
    }
}
