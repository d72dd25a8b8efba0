//! Compaction, on a background thread: once dead entries outweigh live
//! ones by more than a segment, the live entries of the *oldest* segment
//! are copied to the end of the log, made durable, and the segment is
//! deleted (its delete markers can be dropped: no older entry exists).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use super::entry::{Format, Slot, parse_entry};
use super::index::State;
use super::replay::scan_segment;
use super::write::{SyncTargets, segment_path};
use super::{CHUNK, SEGMENT_BYTES, Shared};
use crate::error::{Error, Result};
use crate::locks::Locked;

/// How often the compaction thread looks for work.
const COMPACTION_CHECK: Duration = Duration::from_secs(1);

/// Bytes copied per lock acquisition while compacting.
const CHUNK_BYTES: usize = 1 << 20;

/// Starts the compaction thread over `shared`; dropping the sender
/// stops it.
pub(super) fn start(shared: &Arc<Shared>) -> Result<(mpsc::Sender<()>, JoinHandle<()>)> {
    let (stop, stopped) = mpsc::channel::<()>();
    let worker = shared.clone();
    let compactor = std::thread::Builder::new()
        .name("dkvs-compactor".into())
        .spawn(move || {
            while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(COMPACTION_CHECK)
            {
                loop {
                    let candidate = worker.lock().compaction_candidate();
                    let Some(id) = candidate else { break };
                    if let Err(error) = worker.compact(id) {
                        tracing::error!(%error, segment = id, "log compaction failed");
                        break;
                    }
                }
            }
        })
        .map_err(|e| Error::Storage(format!("cannot start the compaction thread: {e}")))?;
    Ok((stop, compactor))
}

impl State {
    /// The oldest segment, when dead entries outweigh live ones by more
    /// than a segment and it is not the one being written.
    fn compaction_candidate(&self) -> Option<u64> {
        let total: u64 = self.segments.values().map(|s| s.bytes).sum();
        let oldest = *self.segments.keys().next()?;
        (oldest != self.active && total > 2 * self.live_bytes + SEGMENT_BYTES).then_some(oldest)
    }
}

/// Where entries of a segment are: (offset, length).
type Spans = Vec<(usize, usize)>;

/// What compaction needs of a segment, copied out under the lock.
struct ToCompact {
    /// The segment's file.
    file: Arc<File>,
    /// Its length.
    bytes: u64,
    /// How its entries are framed.
    format: Format,
    /// Where its first entry starts.
    start: usize,
    /// The damage replay found: skipped stretches and a damaged tail.
    known: (Vec<(usize, usize)>, Option<usize>),
}

impl Shared {
    /// Copies the live entries of segment `id` to the end of the log, makes
    /// them durable, and deletes the segment.
    fn compact(&self, id: u64) -> Result<()> {
        let _one_at_a_time = self.compacting.locked();
        let Some(segment) = self.to_compact(id) else {
            return Ok(());
        };
        let (data, entries) = valid_entries(id, &segment)?;
        let copied = self.copy_live(id, segment.format, &data, &entries)?;
        // The copies must be durable before the originals go; and the
        // segment leaves the map only once its file is gone for good, so a
        // failed delete is retried and a newer segment is never compacted
        // (dropping its delete markers) while this one still exists.
        self.sync(true)?;
        self.delete_segment(id)?;
        tracing::info!(
            segment = id,
            bytes = segment.bytes,
            copied,
            "compacted a log segment"
        );
        Ok(())
    }

    /// Segment `id` as compaction needs it, or `None` if it is gone.
    fn to_compact(&self, id: u64) -> Option<ToCompact> {
        let state = self.lock();
        let segment = state.segments.get(&id)?;
        Some(ToCompact {
            file: segment.file.clone(),
            bytes: segment.bytes,
            format: segment.format,
            start: segment.start,
            known: (segment.damaged.skipped.clone(), segment.damaged.tail),
        })
    }

    /// Appends the entries of segment `id` at `entries` (offset, length in
    /// `data`) that are still live to the log, a chunk per lock
    /// acquisition, and re-indexes them there. Returns how many it copied.
    fn copy_live(
        &self,
        id: u64,
        format: Format,
        data: &[u8],
        entries: &[(usize, usize)],
    ) -> Result<usize> {
        let mut copied = 0usize;
        for chunk in entries.chunks(CHUNK) {
            let mut state = self.lock();
            let mut chunk_bytes = 0usize;
            for &(offset, len) in chunk {
                let Ok(entry) = parse_entry(&data[offset..offset + len], format, id, offset as u64)
                else {
                    continue; // Valid a moment ago, in the same bytes.
                };
                let slot = Slot {
                    segment: id,
                    offset: offset as u64,
                    len: entry.len as u32,
                };
                if state.is_live(&entry, slot) {
                    let new = state.append(entry.kind, entry.key, entry.value)?;
                    state.remember(entry.kind, entry.key, None);
                    state.index(&entry, new);
                    copied += 1;
                    chunk_bytes += len;
                }
                if chunk_bytes >= CHUNK_BYTES {
                    state.write_buffer()?;
                    chunk_bytes = 0;
                }
            }
            state.write_buffer()?;
        }
        Ok(copied)
    }

    /// Deletes the file of compacted segment `id`, makes the delete durable,
    /// and only then drops the segment from the map.
    fn delete_segment(&self, id: u64) -> Result<()> {
        let dir = self.lock().dir.clone();
        let path = segment_path(&dir, id);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Error::Storage(format!(
                    "cannot delete {}: {e}",
                    path.display()
                )));
            }
        }
        SyncTargets {
            files: Vec::new(),
            dir: Some(dir),
        }
        .sync(false, &self.faults)
        .map_err(|why| self.fail(why))?;
        self.lock().segments.remove(&id);
        Ok(())
    }
}

/// Reads segment `id` (no lock held) and finds where its valid entries are
/// (offset, length), refusing it if it is damaged in ways replay did not
/// see: the keys of such entries are still indexed here, so the segment
/// must not be deleted. Returns the data with the entries.
fn valid_entries(id: u64, segment: &ToCompact) -> Result<(Vec<u8>, Spans)> {
    let mut data = vec![0u8; segment.bytes as usize];
    segment
        .file
        .read_exact_at(&mut data, 0)
        .map_err(|e| Error::Storage(format!("cannot read segment {id} to compact it: {e}")))?;
    let mut entries: Spans = Vec::new();
    let found = scan_segment(
        &data,
        id,
        segment.format,
        segment.start,
        &mut |entry, slot| {
            entries.push((slot.offset as usize, entry.len));
        },
    );
    if (found.skipped.clone(), found.tail) != segment.known {
        return Err(Error::Storage(format!(
            "segment {id} has damaged entries replay did not see ({}); not compacting it",
            found.reasons.join("; ")
        )));
    }
    Ok((data, entries))
}

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;

    use super::*;
    use crate::storage::log::LogStorage;
    use crate::storage::log::tests::value;
    use crate::storage::{FsyncPolicy, Storage};

    #[test]
    fn compaction_keeps_exactly_the_live_entries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = LogStorage::open(dir.path(), FsyncPolicy::Periodic).expect("open");
        let big = "x".repeat(512 * 1024);
        // Rewrite 4 keys over and over: ~3 segments of dead entries.
        for round in 0..400u64 {
            log.put(
                format!("k{}", round % 4).as_bytes(),
                &value(round + 1, &big),
            )
            .expect("put");
            log.flush().expect("flush");
        }
        log.put(b"small", &value(1000, "s")).expect("put");
        log.delete(b"k0").expect("delete");
        log.put_hint(b"hint", b"h").expect("hint");
        log.put_meta_durable("m", 7).expect("meta");
        log.flush().expect("flush");
        // The background thread may already be compacting; finish the job.
        loop {
            let candidate = log.shared.lock().compaction_candidate();
            let Some(id) = candidate else { break };
            log.shared.compact(id).expect("compact");
        }
        let state = log.shared.lock();
        let total: u64 = state.segments.values().map(|s| s.bytes).sum();
        assert!(
            total <= 2 * state.live_bytes + SEGMENT_BYTES,
            "total {total}"
        );
        assert!(
            !state.segments.contains_key(&1),
            "the oldest segment is gone"
        );
        assert!(!segment_path(dir.path(), 1).exists());
        drop(state);
        let check = |log: &LogStorage| {
            assert_eq!(log.get(b"k0").expect("get"), None);
            for k in 1..4u64 {
                let record = log
                    .get(format!("k{k}").as_bytes())
                    .expect("get")
                    .expect("kept");
                assert_eq!(record.version.hlc, 396 + k + 1);
            }
            assert_eq!(log.get(b"small").expect("get"), Some(value(1000, "s")));
            assert_eq!(log.hints(b"", 10).expect("hints").len(), 1);
            assert_eq!(log.get_meta("m").expect("meta"), Some(7));
        };
        check(&log);
        drop(log);
        check(&LogStorage::open(dir.path(), FsyncPolicy::Periodic).expect("reopen"));
    }

    #[test]
    fn a_segment_damaged_after_it_was_written_is_not_compacted_away() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = LogStorage::open(dir.path(), FsyncPolicy::Periodic).expect("open");
        let big = "x".repeat(1 << 20);
        // 70 distinct keys of 1 MiB: segment 1 fills up and rolls over.
        for i in 0..70u64 {
            log.put(format!("k{i:02}").as_bytes(), &value(i + 1, &big))
                .expect("put");
            log.flush().expect("flush");
        }
        assert!(log.shared.lock().segments.len() >= 2);
        // Damage an entry in the middle of segment 1 behind the engine's back.
        let path = segment_path(dir.path(), 1);
        let file = OpenOptions::new().write(true).open(&path).expect("open");
        file.write_all_at(b"garbage!", 10 << 20).expect("damage");
        drop(file);
        let refused = log.shared.compact(1);
        assert!(
            matches!(&refused, Err(Error::Storage(why)) if why.contains("damaged")),
            "{refused:?}"
        );
        assert!(path.exists(), "the damaged segment was deleted");
        assert!(log.shared.lock().segments.contains_key(&1));
        // Undamaged keys of that segment still read; the damaged one errors.
        assert!(log.get(b"k00").expect("get").is_some());
        assert!(log.get(b"k69").expect("get").is_some());
    }
}
