//! Start-up replay: every segment is read in order into the index,
//! skipping damaged stretches (each costs the entries it hits) and cutting
//! a torn tail (a crash mid-write) off the newest segment. Compaction
//! re-scans a segment with the same [`scan_segment`].

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::OpenOptions;
use std::path::Path;
use std::sync::Arc;

use super::SEGMENT_BYTES;
use super::entry::{
    Entry, FORMAT_VERSION, Format, SegmentStart, Slot, UnknownVersion, parse_entry, resync,
    segment_start,
};
use super::index::{Segment, State};
use super::write::{Faults, SyncTargets, open_segment, segment_path, sync_dir};
use crate::error::{Error, Result};

/// What a scan of a segment found besides its valid entries.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct ScanReport {
    /// Damaged stretches skipped: (start, where the next valid entry is).
    pub(super) skipped: Vec<(usize, usize)>,
    /// Where damage runs to the end of the data, if it does.
    pub(super) tail: Option<usize>,
    /// Why each of the above was damaged, in order.
    pub(super) reasons: Vec<String>,
}

/// Visits every valid entry of a segment's `data` from `start`, skipping
/// damaged stretches: past an entry whose header is intact but payload not,
/// or, when the header itself is damaged, to the next offset where a whole
/// valid entry starts (marker, header checksum and payload checksum).
pub(super) fn scan_segment(
    data: &[u8],
    segment: u64,
    format: Format,
    start: usize,
    visit: &mut dyn FnMut(&Entry<'_>, Slot),
) -> ScanReport {
    let mut report = ScanReport::default();
    let mut offset = start;
    while offset < data.len() {
        match parse_entry(&data[offset..], format, segment, offset as u64) {
            Ok(entry) => {
                let slot = Slot {
                    segment,
                    offset: offset as u64,
                    len: entry.len as u32,
                };
                visit(&entry, slot);
                offset += entry.len;
            }
            Err(damage) => {
                let from = match damage.trusted_len {
                    Some(len) if offset.saturating_add(len) <= data.len() => offset + len,
                    _ => offset + 1,
                };
                report.reasons.push(damage.why);
                match resync(data, format, segment, from) {
                    Some(next) => {
                        report.skipped.push((offset, next));
                        offset = next;
                    }
                    None => {
                        report.tail = Some(offset);
                        break;
                    }
                }
            }
        }
    }
    report
}

/// Rebuilds the indexes from the segments in `dir`.
pub(super) fn replay(dir: &Path) -> Result<State> {
    let ids = segment_ids(dir)?;
    let mut state = empty_state(dir);
    for (position, &id) in ids.iter().enumerate() {
        let newest = position + 1 == ids.len();
        replay_segment(&mut state, dir, id, newest)?;
    }
    if state.active == 0 {
        let id = ids.last().map_or(1, |l| l + 1);
        let file = Arc::new(open_segment(dir, id)?);
        sync_dir(dir)?;
        state.start_segment(id, file);
    }
    state.live_bytes_written = state.live_bytes;
    tracing::info!(
        segments = state.segments.len(),
        keys = state.records.len(),
        live_bytes = state.live_bytes,
        "log replayed"
    );
    Ok(state)
}

/// The ids of the segment files (`<id>.log`) in `dir`, oldest first.
fn segment_ids(dir: &Path) -> Result<Vec<u64>> {
    let mut ids: Vec<u64> = std::fs::read_dir(dir)
        .map_err(|e| Error::Storage(format!("cannot list {}: {e}", dir.display())))?
        .flatten()
        .filter_map(|entry| {
            entry
                .file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".log"))
                .and_then(|n| n.parse::<u64>().ok())
        })
        .collect();
    ids.sort_unstable();
    Ok(ids)
}

/// The state of a log in `dir` before any segment is read.
fn empty_state(dir: &Path) -> State {
    State {
        dir: dir.to_path_buf(),
        records: BTreeMap::new(),
        hints: BTreeMap::new(),
        meta: HashMap::new(),
        segments: BTreeMap::new(),
        active: 0,
        written: 0,
        buffer: Vec::new(),
        live_bytes: 0,
        unsynced: SyncTargets::default(),
        damaged_skipped: 0,
        failed: None,
        undo: Vec::new(),
        live_bytes_written: 0,
        truncate_pending: false,
        rollbacks: 0,
        lost: VecDeque::new(),
        last_write_error: None,
        faults: Arc::new(Faults::default()),
    }
}

/// Reads segment `id` into `state`'s indexes, cuts a torn tail off it if it
/// is the `newest`, registers it, and makes it the active segment if new
/// entries may be appended to it.
fn replay_segment(state: &mut State, dir: &Path, id: u64, newest: bool) -> Result<()> {
    let path = segment_path(dir, id);
    let data = std::fs::read(&path)
        .map_err(|e| Error::Storage(format!("cannot read {}: {e}", path.display())))?;
    let opening = read_opening(&data, id, &path)?;
    if opening.format == Format::Framed && !opening.clean && !data.is_empty() {
        tracing::error!(segment = %path.display(), "damaged segment header; reading its entries anyway");
        state.damaged_skipped += 1;
    }
    let mut report = scan_segment(
        &data,
        id,
        opening.format,
        opening.start,
        &mut |entry, slot| state.index(entry, slot),
    );
    for (&(from, to), why) in report.skipped.iter().zip(&report.reasons) {
        tracing::error!(
            segment = %path.display(), from, to, %why,
            "skipped a damaged stretch of the log (its entries are lost here; other replicas repair them)"
        );
    }
    state.damaged_skipped += report.skipped.len() as u64;
    let bytes = settle_damaged_tail(state, &path, &mut report, data.len() as u64, newest)?;
    let file = Arc::new(open_segment(dir, id)?);
    state.segments.insert(
        id,
        Segment {
            file: file.clone(),
            bytes,
            format: opening.format,
            start: opening.start,
            damaged: report,
        },
    );
    if newest && data.is_empty() {
        // Created but never written (its header is still to come).
        state.start_segment(id, file);
    } else if newest && opening.clean && bytes < SEGMENT_BYTES {
        // Appended to: only a segment of the current format with an
        // intact header (older or damaged ones are only read).
        state.active = id;
        state.written = bytes;
    }
    Ok(())
}

/// The format and first entry offset of segment `id` (read from `path`),
/// or the error that tells an operator what an unknown format version means.
fn read_opening(data: &[u8], id: u64, path: &Path) -> Result<SegmentStart> {
    segment_start(data, id).map_err(|UnknownVersion(version)| {
        Error::Storage(format!(
            "{} is a log segment of format version {version}, and this release reads \
             versions 1 and {FORMAT_VERSION}: a newer DKVS release wrote it (downgrades are not \
             supported; run that release), or its header is damaged. If no newer release ever \
             ran on this data dir, wipe the whole data dir and restart the node: it comes back \
             as a new instance and answers reads only once it has caught up from the other \
             replicas (moving only this file away would let it answer reads without the \
             writes the file holds)",
            path.display()
        ))
    })
}

/// Deals with damage that runs to the end of a segment of `bytes` bytes:
/// on the `newest` segment it is a write cut short by a crash and is cut
/// off (the report then has no tail); on an older one it is counted and
/// skipped. Returns the segment's length afterwards.
fn settle_damaged_tail(
    state: &mut State,
    path: &Path,
    report: &mut ScanReport,
    bytes: u64,
    newest: bool,
) -> Result<u64> {
    let Some(at) = report.tail else {
        return Ok(bytes);
    };
    let why = report.reasons.last().map_or("", String::as_str);
    if newest {
        // Nothing valid after it: a write cut short by a crash.
        // Cut it off, so new entries go right after the last valid one.
        tracing::warn!(
            segment = %path.display(), offset = at, %why,
            "cutting off a torn entry at the end of the log (a crash mid-write)"
        );
        OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|f| f.set_len(at as u64))
            .map_err(|e| Error::Storage(format!("cannot truncate {}: {e}", path.display())))?;
        report.tail = None;
        Ok(at as u64)
    } else {
        tracing::error!(
            segment = %path.display(), offset = at, %why,
            "damaged end of a log segment; skipped (other replicas repair it)"
        );
        state.damaged_skipped += 1;
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::record::Record;
    use crate::storage::log::LogStorage;
    use crate::storage::log::entry::{Kind, encode_entry, header_seed};
    use crate::storage::log::tests::value;
    use crate::storage::{FsyncPolicy, Storage};

    #[test]
    fn a_torn_or_damaged_tail_is_cut_off_and_earlier_entries_survive() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let log = LogStorage::open(dir.path(), FsyncPolicy::Periodic).expect("open");
            log.put(b"kept", &value(1, "kept")).expect("put");
            log.flush().expect("flush");
        }
        let path = segment_path(dir.path(), 1);
        // A crash in the middle of the next entry.
        let mut torn = Vec::new();
        let end = std::fs::metadata(&path).expect("stat").len();
        let seed = header_seed(1, end);
        encode_entry(
            &mut torn,
            seed,
            Kind::Put,
            b"torn",
            &value(2, "torn").encode(),
        )
        .expect("encode");
        let mut file = OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("open segment");
        file.write_all(&torn[..torn.len() - 3]).expect("append");
        drop(file);
        let log = LogStorage::open(dir.path(), FsyncPolicy::Periodic).expect("reopen");
        assert_eq!(log.get(b"kept").expect("get"), Some(value(1, "kept")));
        assert_eq!(log.get(b"torn").expect("get"), None);
        // New writes go after the cut and survive.
        log.put(b"after", &value(3, "after")).expect("put");
        log.flush().expect("flush");
        drop(log);
        let log = LogStorage::open(dir.path(), FsyncPolicy::Periodic).expect("reopen");
        assert_eq!(log.get(b"after").expect("get"), Some(value(3, "after")));
        // Flip a byte inside the stored value: reads report it, nothing panics.
        drop(log);
        let mut bytes = std::fs::read(&path).expect("read");
        let at = bytes.len() - 2;
        bytes[at] ^= 0xff;
        std::fs::write(&path, &bytes).expect("write");
        let log = LogStorage::open(dir.path(), FsyncPolicy::Periodic).expect("reopen corrupt");
        assert_eq!(log.get(b"kept").expect("get"), Some(value(1, "kept")));
        assert_eq!(
            log.get(b"after").expect("get"),
            None,
            "the torn-off entry is gone"
        );
    }

    /// Every record in `log`, by key.
    fn contents(log: &LogStorage) -> BTreeMap<Vec<u8>, Record> {
        let mut seen = BTreeMap::new();
        log.for_each(
            &mut |k, r| {
                seen.insert(k.to_vec(), r.clone());
            },
            &mut |k, why| panic!("corrupt record {k:?}: {why}"),
        )
        .expect("scan");
        seen
    }

    /// Checks that `found` is `expected` but for at most `lost` keys, and
    /// holds nothing `expected` does not.
    fn at_most_lost(
        found: &BTreeMap<Vec<u8>, Record>,
        expected: &BTreeMap<Vec<u8>, Record>,
        lost: usize,
        context: &str,
    ) -> usize {
        for (key, record) in found {
            assert_eq!(
                expected.get(key),
                Some(record),
                "{context}: invented {key:?}"
            );
        }
        let missing = expected.len() - found.len();
        assert!(missing <= lost, "{context}: {missing} keys lost");
        missing
    }

    #[test]
    fn every_flipped_byte_costs_at_most_the_entry_it_hits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut expected = BTreeMap::new();
        {
            let log = LogStorage::open(dir.path(), FsyncPolicy::Periodic).expect("open");
            for i in 0..6u64 {
                let record = value(i + 1, &"v".repeat(i as usize * 3));
                log.put(format!("key{i}").as_bytes(), &record).expect("put");
                expected.insert(format!("key{i}").into_bytes(), record);
            }
            log.flush().expect("flush");
        }
        let original = std::fs::read(segment_path(dir.path(), 1)).expect("read");
        for at in 0..original.len() {
            for flip in [0x01u8, 0xff] {
                let context = format!("byte {at} ^ {flip:#x}");
                let dir = tempfile::tempdir().expect("tempdir");
                let mut bytes = original.clone();
                bytes[at] ^= flip;
                std::fs::write(segment_path(dir.path(), 1), &bytes).expect("write");
                let log = LogStorage::open(dir.path(), FsyncPolicy::Periodic).expect(&context);
                let lost = at_most_lost(&contents(&log), &expected, 1, &context);
                // Only a hit on the last entry (a torn tail) goes uncounted.
                if lost == 1 && log.get(b"key5").expect("get").is_some() {
                    assert!(log.damaged_entries_skipped() >= 1, "{context}");
                }
                // New writes land where a later replay finds them.
                log.put(b"new", &value(100, "new")).expect("put");
                log.flush().expect("flush");
                drop(log);
                let log = LogStorage::open(dir.path(), FsyncPolicy::Periodic).expect(&context);
                let mut found = contents(&log);
                assert_eq!(
                    found.remove(&b"new"[..]),
                    Some(value(100, "new")),
                    "{context}"
                );
                assert_eq!(
                    at_most_lost(&found, &expected, 1, &context),
                    lost,
                    "{context}"
                );
            }
        }
    }

    #[test]
    fn a_damaged_segment_that_is_not_the_newest_loses_only_the_hit_entries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut expected = BTreeMap::new();
        {
            let log = LogStorage::open(dir.path(), FsyncPolicy::Periodic).expect("open");
            for i in 0..10u64 {
                let record = value(i + 1, "value");
                log.put(format!("key{i}").as_bytes(), &record).expect("put");
                expected.insert(format!("key{i}").into_bytes(), record);
            }
            log.flush().expect("flush");
        }
        // A newer (empty) segment: segment 1 is no longer the newest.
        std::fs::write(segment_path(dir.path(), 2), b"").expect("segment 2");
        let path = segment_path(dir.path(), 1);
        let mut bytes = std::fs::read(&path).expect("read");
        let len = bytes.len();
        bytes[len / 2] ^= 0x10; // an entry in the middle
        bytes[len - 1] ^= 0x10; // and the last one
        std::fs::write(&path, &bytes).expect("write");
        let log = LogStorage::open(dir.path(), FsyncPolicy::Periodic).expect("open");
        let lost = at_most_lost(&contents(&log), &expected, 2, "two hits");
        assert_eq!(lost, 2);
        assert_eq!(
            log.get(b"key9").expect("get"),
            None,
            "the last entry was hit"
        );
        assert_eq!(log.damaged_entries_skipped(), 2);
        assert_eq!(
            std::fs::metadata(&path).expect("stat").len(),
            len as u64,
            "an older segment is never cut"
        );
        log.put(b"new", &value(100, "new")).expect("put");
        log.flush().expect("flush");
        drop(log);
        let log = LogStorage::open(dir.path(), FsyncPolicy::Periodic).expect("reopen");
        assert_eq!(log.get(b"new").expect("get"), Some(value(100, "new")));
        assert_eq!(log.get(b"key0").expect("get"), Some(value(1, "value")));
        assert_eq!(log.get(b"key8").expect("get"), Some(value(9, "value")));
    }

    #[test]
    fn an_empty_newest_segment_is_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(LogStorage::open(dir.path(), FsyncPolicy::Periodic).expect("open"));
        drop(LogStorage::open(dir.path(), FsyncPolicy::Periodic).expect("reopen"));
        let log = LogStorage::open(dir.path(), FsyncPolicy::Periodic).expect("reopen");
        log.put(b"a", &value(1, "a")).expect("put");
        log.flush().expect("flush");
        assert_eq!(log.shared.lock().segments.len(), 1);
        drop(log);
        let log = LogStorage::open(dir.path(), FsyncPolicy::Periodic).expect("reopen");
        assert_eq!(log.get(b"a").expect("get"), Some(value(1, "a")));
    }
}
