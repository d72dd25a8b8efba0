//! The write path: appending entries to the buffer, handing the buffer to
//! the OS in one write (group commit) and rolling segments over, putting
//! the index back when a write fails (a full disk), and fsync, whose
//! failure is fatal ([`crate::storage::fatal`]). Also the segment files'
//! names and the failures tests inject.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::entry::{Kind, SEGMENT_HEADER, Slot, encode_entry, header_seed};
use super::index::{RecordSlot, Segment, State};
use super::{SEGMENT_BYTES, Shared};
use crate::clock::Version;
use crate::error::{Error, Result};
use crate::locks::Locked;
use crate::storage;

/// Files to fsync, taken under the lock and synced after it is released.
#[derive(Default)]
pub(super) struct SyncTargets {
    pub(super) files: Vec<Arc<File>>,
    pub(super) dir: Option<PathBuf>,
}

impl SyncTargets {
    /// fsyncs them all; the error says which failed (see [`storage::fatal`]).
    pub(super) fn sync(self, data_only: bool, faults: &Faults) -> std::result::Result<(), String> {
        for file in &self.files {
            let synced = faults.fsync().and_then(|()| {
                if data_only {
                    file.sync_data()
                } else {
                    file.sync_all()
                }
            });
            synced.map_err(|e| format!("fsync of the log failed: {e}"))?;
        }
        if let Some(dir) = self.dir {
            faults
                .fsync()
                .and_then(|()| File::open(&dir)?.sync_all())
                .map_err(|e| format!("fsync of {} failed: {e}", dir.display()))?;
        }
        Ok(())
    }
}

pub(super) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::Storage(format!("fsync of {} failed: {e}", dir.display())))
}

/// Failures tests inject; nothing (and no cost) outside tests.
#[derive(Default)]
pub(super) struct Faults {
    /// Every fsync fails.
    #[cfg(test)]
    fail_fsync: std::sync::atomic::AtomicBool,
    /// Every write stores half its bytes, then fails with ENOSPC.
    #[cfg(test)]
    disk_full: std::sync::atomic::AtomicBool,
}

impl Faults {
    /// Writes `bytes` at `offset` (tests: maybe a short write, then ENOSPC).
    fn write_at(&self, file: &File, bytes: &[u8], offset: u64) -> std::io::Result<()> {
        #[cfg(test)]
        if self.disk_full.load(std::sync::atomic::Ordering::Relaxed) {
            file.write_all_at(&bytes[..bytes.len() / 2], offset)?;
            return Err(std::io::Error::from_raw_os_error(28));
        }
        file.write_all_at(bytes, offset)
    }

    fn fsync(&self) -> std::io::Result<()> {
        #[cfg(test)]
        if self.fail_fsync.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(std::io::Error::other("injected fsync failure"));
        }
        Ok(())
    }
}

/// How many dropped record writes [`State::lost`] remembers: callers ask
/// right after their flush fails, so the last few batches suffice.
const LOST_REMEMBERED: usize = 1 << 16;

/// What an entry in the buffer changed, and how to put it back.
pub(super) enum Undo {
    Record {
        key: Box<[u8]>,
        before: Option<RecordSlot>,
        /// The version written (`None`: a delete).
        version: Option<Version>,
    },
    Hint {
        key: Box<[u8]>,
        before: Option<Slot>,
    },
    Meta {
        name: String,
        before: Option<(u64, Slot)>,
    },
}

/// Why the log could not be written.
#[derive(Clone, Debug)]
pub(super) struct WriteError {
    /// The disk is full (ENOSPC, EDQUOT, EFBIG).
    full: bool,
    /// The log directory.
    dir: PathBuf,
    /// The OS's words.
    why: String,
}

impl WriteError {
    fn new(dir: &Path, error: &std::io::Error) -> Self {
        use std::io::ErrorKind;
        let full = matches!(
            error.kind(),
            ErrorKind::StorageFull | ErrorKind::QuotaExceeded | ErrorKind::FileTooLarge
        ) || matches!(error.raw_os_error(), Some(28 | 122 | 27));
        Self {
            full,
            dir: dir.to_path_buf(),
            why: error.to_string(),
        }
    }

    pub(super) fn to_error(&self) -> Error {
        let dir = self.dir.display().to_string();
        if self.full {
            Error::DiskFull {
                dir,
                why: self.why.clone(),
            }
        } else {
            Error::Storage(format!(
                "cannot write to the log in {dir}: {}; the write was refused",
                self.why
            ))
        }
    }
}

pub(super) fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016}.log"))
}

pub(super) fn open_segment(dir: &Path, id: u64) -> Result<File> {
    let path = segment_path(dir, id);
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| Error::Storage(format!("cannot open {}: {e}", path.display())))
}

impl State {
    pub(super) fn append(&mut self, kind: Kind, key: &[u8], value: &[u8]) -> Result<Slot> {
        self.check()?;
        let offset = self.written + self.buffer.len() as u64;
        let seed = header_seed(self.active, offset);
        let len = encode_entry(&mut self.buffer, seed, kind, key, value)?;
        self.active_segment().bytes += len as u64;
        Ok(Slot {
            segment: self.active,
            offset,
            len: len as u32,
        })
    }

    /// Hands the buffer to the OS and rolls the segment over when full.
    pub(super) fn write_buffer(&mut self) -> Result<()> {
        self.check()?;
        let file = self.active_segment().file.clone();
        if self.truncate_pending {
            if let Err(error) = file.set_len(self.written) {
                return Err(self.drop_buffer(&error));
            }
            self.truncate_pending = false;
        }
        if !self.buffer.is_empty() {
            // Positional, at the end of what was written before.
            if let Err(error) = self.faults.write_at(&file, &self.buffer, self.written) {
                // Part of it may be on disk: cut it off, so no entry of a
                // refused write is replayed later.
                self.truncate_pending = file.set_len(self.written).is_err();
                return Err(self.drop_buffer(&error));
            }
            self.written += self.buffer.len() as u64;
            self.buffer.clear();
            self.undo.clear();
            self.live_bytes_written = self.live_bytes;
        }
        if self.written >= SEGMENT_BYTES {
            let next = self.active + 1;
            let file = Arc::new(open_segment(&self.dir, next)?);
            let sealed = self.active_segment().file.clone();
            self.unsynced.files.push(sealed);
            self.unsynced.dir = Some(self.dir.clone());
            self.start_segment(next, file);
        }
        Ok(())
    }

    /// After a failed write: forgets the buffered entries and puts the
    /// indexes back as they were before them, so nothing is read or
    /// counted that is not on disk. Answers the error for the writers.
    fn drop_buffer(&mut self, error: &std::io::Error) -> Error {
        let failure = WriteError::new(&self.dir, error);
        let entries = self.undo.len();
        for undo in self.undo.drain(..).rev() {
            match undo {
                Undo::Record {
                    key,
                    before,
                    version,
                } => {
                    let _ = match before {
                        Some(before) => self.records.insert(key.clone(), before),
                        None => self.records.remove(&key),
                    };
                    if let Some(version) = version {
                        if self.lost.len() == LOST_REMEMBERED {
                            self.lost.pop_front();
                        }
                        self.lost.push_back((key, version));
                    }
                }
                Undo::Hint { key, before } => {
                    let _ = match before {
                        Some(before) => self.hints.insert(key, before),
                        None => self.hints.remove(&key),
                    };
                }
                Undo::Meta { name, before } => {
                    let _ = match before {
                        Some(before) => self.meta.insert(name, before),
                        None => self.meta.remove(&name),
                    };
                }
            }
        }
        self.live_bytes = self.live_bytes_written;
        self.buffer.clear();
        if self.written == 0 {
            self.buffer.extend_from_slice(&SEGMENT_HEADER);
        }
        let bytes = self.written + self.buffer.len() as u64;
        self.active_segment().bytes = bytes;
        self.rollbacks += 1;
        tracing::error!(
            dir = %failure.dir.display(), error = %failure.why, entries,
            "cannot write to the log; refused the buffered writes"
        );
        let answer = failure.to_error();
        self.last_write_error = Some(failure);
        answer
    }

    /// Notes what the index holds for `key` before a buffered entry
    /// changes it (see [`State::drop_buffer`]).
    pub(super) fn remember(&mut self, kind: Kind, key: &[u8], version: Option<Version>) {
        let undo = match kind {
            Kind::Put | Kind::Delete => Undo::Record {
                key: key.into(),
                before: self.records.get(key).copied(),
                version,
            },
            Kind::HintPut | Kind::HintDelete => Undo::Hint {
                key: key.into(),
                before: self.hints.get(key).copied(),
            },
            Kind::Meta => {
                let name = String::from_utf8_lossy(key).into_owned();
                let before = self.meta.get(&name).copied();
                Undo::Meta { name, before }
            }
        };
        self.undo.push(undo);
    }

    /// Makes a new, empty segment the active one; its header goes out with
    /// the first write.
    pub(super) fn start_segment(&mut self, id: u64, file: Arc<File>) {
        let mut segment = Segment::new(file);
        segment.bytes = SEGMENT_HEADER.len() as u64;
        self.segments.insert(id, segment);
        self.active = id;
        self.written = 0;
        self.buffer.extend_from_slice(&SEGMENT_HEADER);
    }

    /// What must be fsynced for everything written so far to be durable.
    fn sync_targets(&mut self) -> SyncTargets {
        let mut targets = std::mem::take(&mut self.unsynced);
        targets.files.push(self.active_segment().file.clone());
        targets
    }
}

impl Shared {
    /// Writes the buffer and fsyncs everything written so far (outside the
    /// state lock). A failed fsync is fatal: never retried (it could
    /// "succeed" after the kernel dropped the pages it failed to write).
    pub(super) fn sync(&self, data_only: bool) -> Result<()> {
        let _one_at_a_time = self.syncing.locked();
        let (written, targets) = {
            let mut state = self.lock();
            let written = state.write_buffer();
            (written, state.sync_targets())
        };
        // What was written before is made durable even when the buffer
        // could not be written (a full disk): the periodic sync must not
        // be skipped for as long as the disk stays full.
        targets
            .sync(data_only, &self.faults)
            .map_err(|why| self.fail(why))?;
        written
    }

    /// Refuses everything from now on and reports `why` as fatal.
    pub(super) fn fail(&self, why: String) -> Error {
        let mut state = self.lock();
        if state.failed.is_none() {
            state.failed = Some(why.clone());
        }
        drop(state);
        storage::fatal(why)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::log::LogStorage;
    use crate::storage::log::tests::value;
    use crate::storage::{FsyncPolicy, Held, Storage};

    static FATALS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    fn count_fatal(_why: &str) {
        FATALS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    #[test]
    fn a_failed_fsync_is_fatal_and_everything_is_refused_after_it() {
        storage::set_fatal_handler(count_fatal);
        for fsync in [FsyncPolicy::Always, FsyncPolicy::Periodic] {
            let dir = tempfile::tempdir().expect("tempdir");
            let log = LogStorage::open(dir.path(), fsync).expect("open");
            log.put(b"a", &value(1, "a")).expect("put");
            log.flush().expect("flush");
            let fatals = FATALS.load(std::sync::atomic::Ordering::SeqCst);
            log.shared
                .faults
                .fail_fsync
                .store(true, std::sync::atomic::Ordering::Relaxed);
            log.put(b"b", &value(2, "b")).expect("buffered");
            // Always: the flush of b fsyncs; Periodic: the background sync.
            let failed = match fsync {
                FsyncPolicy::Always => log.flush(),
                FsyncPolicy::Periodic => log.sync(),
            };
            assert!(
                matches!(&failed, Err(Error::Storage(why)) if why.contains("fsync")),
                "{failed:?}"
            );
            assert!(FATALS.load(std::sync::atomic::Ordering::SeqCst) > fatals);
            // The disk recovers: still nothing is retried, acknowledged or served.
            log.shared
                .faults
                .fail_fsync
                .store(false, std::sync::atomic::Ordering::Relaxed);
            assert!(
                log.flush().is_err(),
                "{fsync:?}: flush after a failed fsync"
            );
            assert!(log.sync().is_err(), "{fsync:?}: a retried fsync");
            assert!(log.put(b"c", &value(3, "c")).is_err());
            assert!(log.delete(b"a").is_err());
            assert!(log.put_meta_durable("m", 1).is_err());
            assert!(log.get(b"a").is_err());
            assert!(log.held(b"a").is_err());
            drop(log);
            // A restart reads what is on disk.
            let log = LogStorage::open(dir.path(), fsync).expect("reopen");
            assert_eq!(log.get(b"a").expect("get"), Some(value(1, "a")));
            assert_eq!(log.get(b"c").expect("get"), None);
        }
    }

    #[test]
    fn a_durable_meta_write_is_never_answered_ok_unwritten() {
        // Review finding: a meta entry buffered and then dropped by another
        // caller's failed write was answered Ok by the sync that followed.
        let dir = tempfile::tempdir().expect("tempdir");
        let log = LogStorage::open(dir.path(), FsyncPolicy::Periodic).expect("open");
        log.put_meta_durable("clock_ceiling", 1).expect("meta");
        let full = |on: bool| {
            log.shared
                .faults
                .disk_full
                .store(on, std::sync::atomic::Ordering::Relaxed)
        };
        full(true);
        assert!(log.put_meta_durable("clock_ceiling", 2).is_err());
        assert_eq!(log.get_meta("clock_ceiling").expect("meta"), Some(1));
        full(false);
        log.put_meta_durable("clock_ceiling", 3).expect("meta");
        drop(log);
        let log = LogStorage::open(dir.path(), FsyncPolicy::Periodic).expect("reopen");
        assert_eq!(log.get_meta("clock_ceiling").expect("meta"), Some(3));
    }

    #[test]
    fn a_full_disk_refuses_the_writes_and_changes_nothing_else() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = LogStorage::open(dir.path(), FsyncPolicy::Always).expect("open");
        log.put(b"a", &value(1, "one")).expect("put");
        log.put_hint(b"h", b"hint").expect("hint");
        log.flush().expect("flush");
        let path = segment_path(dir.path(), 1);
        let size = std::fs::metadata(&path).expect("stat").len();
        let live = log.shared.lock().live_bytes;
        let full = |on: bool| {
            log.shared
                .faults
                .disk_full
                .store(on, std::sync::atomic::Ordering::Relaxed)
        };
        full(true);
        log.put(b"a", &value(2, "two")).expect("buffered");
        log.put(b"b", &value(3, "three")).expect("buffered");
        log.delete_hint(b"h").expect("buffered");
        let refused = log.flush();
        assert!(
            matches!(&refused, Err(Error::DiskFull { dir: d, .. }) if d.contains(&*dir.path().to_string_lossy())),
            "{refused:?}"
        );
        // Nothing of the refused writes is indexed, read or on disk.
        assert_eq!(log.get(b"a").expect("get"), Some(value(1, "one")));
        assert_eq!(
            log.held(b"a").expect("held"),
            Some(Held::of(&value(1, "one")))
        );
        assert_eq!(log.get(b"b").expect("get"), None);
        assert_eq!(log.hints(b"", 10).expect("hints").len(), 1);
        assert_eq!(log.shared.lock().live_bytes, live);
        assert_eq!(
            std::fs::metadata(&path).expect("stat").len(),
            size,
            "cut back"
        );
        assert_eq!(log.dropped_buffers(), 1);
        assert!(log.lost_write(b"a", Version::new(2, 1)).is_some());
        assert!(log.lost_write(b"a", Version::new(1, 1)).is_none());
        // A read of a buffered write writes it first: refused, then the old value.
        log.put(b"a", &value(4, "four")).expect("buffered");
        assert_eq!(log.get(b"a").expect("get"), Some(value(1, "one")));
        assert_eq!(log.dropped_buffers(), 2);
        // Space is back: writes are taken again and survive a restart.
        full(false);
        log.put(b"c", &value(5, "five")).expect("put");
        log.flush().expect("flush");
        drop(log);
        let log = LogStorage::open(dir.path(), FsyncPolicy::Always).expect("reopen");
        assert_eq!(log.get(b"a").expect("get"), Some(value(1, "one")));
        assert_eq!(log.get(b"b").expect("get"), None);
        assert_eq!(log.get(b"c").expect("get"), Some(value(5, "five")));
        assert_eq!(log.hints(b"", 10).expect("hints").len(), 1);
        assert_eq!(log.damaged_entries_skipped(), 0);
    }
}
