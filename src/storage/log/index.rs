//! The engine's in-memory state, behind its one lock ([`State`]): the
//! index from each key (record, hint, metadata name) to where its newest
//! entry is, the segments the index points into, and reading the entry at
//! an indexed place ([`Located`]). The fields of the write path (buffer,
//! undo list, failure) live in [`State`] too; `write.rs` handles them.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use super::entry::{Entry, Format, Kind, SEGMENT_HEADER, Slot, parse_expected};
use super::replay::ScanReport;
use super::write::{Faults, SyncTargets, Undo, WriteError};
use crate::clock::Version;
use crate::error::{Error, Result};
use crate::record::Record;
use crate::storage::{self, Held};

/// A record's place, and what it holds (`None`: its bytes do not decode).
#[derive(Clone, Copy, Debug)]
pub(super) struct RecordSlot {
    pub(super) slot: Slot,
    pub(super) held: Option<Held>,
}

pub(super) struct Segment {
    pub(super) file: Arc<File>,
    /// Bytes in the segment, including (for the active one) buffered bytes.
    pub(super) bytes: u64,
    /// How its entries are framed.
    pub(super) format: Format,
    /// Where its first entry starts.
    pub(super) start: usize,
    /// Where replay found damaged stretches (see [`ScanReport`]): compaction
    /// must find these and no others.
    pub(super) damaged: ScanReport,
}

impl Segment {
    /// A new, empty segment of the current format.
    pub(super) fn new(file: Arc<File>) -> Self {
        Self {
            file,
            bytes: 0,
            format: Format::Framed,
            start: SEGMENT_HEADER.len(),
            damaged: ScanReport::default(),
        }
    }
}

pub(super) struct State {
    pub(super) dir: PathBuf,
    pub(super) records: BTreeMap<Box<[u8]>, RecordSlot>,
    pub(super) hints: BTreeMap<Box<[u8]>, Slot>,
    pub(super) meta: HashMap<String, (u64, Slot)>,
    pub(super) segments: BTreeMap<u64, Segment>,
    pub(super) active: u64,
    /// Bytes of the active segment already handed to the OS.
    pub(super) written: u64,
    /// Entries appended but not yet written.
    pub(super) buffer: Vec<u8>,
    /// Bytes of entries the indexes point to.
    pub(super) live_bytes: u64,
    /// Sealed segments not yet fsynced, and whether the directory changed.
    pub(super) unsynced: SyncTargets,
    /// Damaged stretches replay skipped (see
    /// [`LogStorage::damaged_entries_skipped`](crate::storage::Storage::damaged_entries_skipped)).
    pub(super) damaged_skipped: u64,
    /// Why an fsync failed, once one has: everything is refused from then
    /// on (see [`storage::fatal`]). Set under this lock, so no write is
    /// handed to the OS, and none acknowledged, after it.
    pub(super) failed: Option<String>,
    /// What each buffered entry changed in the indexes, to undo it when
    /// the buffer cannot be written.
    pub(super) undo: Vec<Undo>,
    /// `live_bytes` when the buffer was last written.
    pub(super) live_bytes_written: u64,
    /// A failed write may have left bytes past `written` that could not be
    /// cut off yet: nothing is written until they are.
    pub(super) truncate_pending: bool,
    /// Buffers dropped after a failed write, since start.
    pub(super) rollbacks: u64,
    /// The most recent record writes dropped that way (key, version).
    pub(super) lost: VecDeque<(Box<[u8]>, Version)>,
    /// Why the last buffer was dropped.
    pub(super) last_write_error: Option<WriteError>,
    /// Failures tests inject.
    pub(super) faults: Arc<Faults>,
}

impl State {
    /// Refuses everything after a failed fsync.
    pub(super) fn check(&self) -> Result<()> {
        match &self.failed {
            Some(why) => Err(storage::refused_after_fatal(why)),
            None => Ok(()),
        }
    }

    pub(super) fn active_segment(&mut self) -> &mut Segment {
        self.segments
            .get_mut(&self.active)
            .expect("the active segment is always in the segment map")
    }

    /// Whether `slot` is in the buffer, not yet written.
    pub(super) fn is_buffered(&self, slot: Slot) -> bool {
        slot.segment == self.active && slot.offset >= self.written
    }

    /// The bytes of the entry at `slot`: copied now when still buffered,
    /// otherwise the file to read them from.
    pub(super) fn locate(&self, slot: Slot) -> Result<Located> {
        self.check()?;
        if slot.segment == self.active && slot.offset >= self.written {
            let start = (slot.offset - self.written) as usize;
            let bytes = self
                .buffer
                .get(start..start + slot.len as usize)
                .ok_or_else(|| Error::Internal("log index points past the buffer".into()))?;
            return Ok(Located {
                source: Source::Bytes(bytes.to_vec()),
                format: Format::Framed,
                slot,
            });
        }
        let segment = self.segments.get(&slot.segment).ok_or_else(|| {
            Error::Internal(format!(
                "log index points to missing segment {}",
                slot.segment
            ))
        })?;
        Ok(Located {
            source: Source::File(segment.file.clone()),
            format: segment.format,
            slot,
        })
    }

    pub(super) fn replace_live(&mut self, old: Option<Slot>, new: Option<Slot>) {
        if let Some(old) = old {
            self.live_bytes = self.live_bytes.saturating_sub(u64::from(old.len));
        }
        if let Some(new) = new {
            self.live_bytes += u64::from(new.len);
        }
    }

    /// Applies an entry to the indexes (replay and compaction share this).
    pub(super) fn index(&mut self, entry: &Entry<'_>, slot: Slot) {
        match entry.kind {
            Kind::Put => {
                let held = Record::decode(entry.value).ok().map(|r| Held::of(&r));
                let old = self
                    .records
                    .insert(entry.key.into(), RecordSlot { slot, held })
                    .map(|r| r.slot);
                self.replace_live(old, Some(slot));
            }
            Kind::Delete => {
                let old = self.records.remove(entry.key).map(|r| r.slot);
                self.replace_live(old, None);
            }
            Kind::HintPut => {
                let old = self.hints.insert(entry.key.into(), slot);
                self.replace_live(old, Some(slot));
            }
            Kind::HintDelete => {
                let old = self.hints.remove(entry.key);
                self.replace_live(old, None);
            }
            Kind::Meta => {
                let name = String::from_utf8_lossy(entry.key).into_owned();
                let Ok(value) = <[u8; 8]>::try_from(entry.value) else {
                    tracing::error!(%name, "skipping a metadata entry of the wrong size");
                    return;
                };
                let old = self.meta.insert(name, (u64::from_le_bytes(value), slot));
                self.replace_live(old.map(|(_, s)| s), Some(slot));
            }
        }
    }

    /// Whether the index still points at `slot` for this entry.
    pub(super) fn is_live(&self, entry: &Entry<'_>, slot: Slot) -> bool {
        match entry.kind {
            Kind::Put => self.records.get(entry.key).is_some_and(|r| r.slot == slot),
            Kind::HintPut => self.hints.get(entry.key) == Some(&slot),
            Kind::Meta => std::str::from_utf8(entry.key)
                .ok()
                .and_then(|name| self.meta.get(name))
                .is_some_and(|(_, s)| *s == slot),
            Kind::Delete | Kind::HintDelete => false,
        }
    }
}

/// Where an entry's bytes are to be read from.
enum Source {
    /// Still buffered: copied.
    Bytes(Vec<u8>),
    /// Written: read with `pread`.
    File(Arc<File>),
}

/// An entry to read, outside the lock.
pub(super) struct Located {
    /// Where its bytes are.
    source: Source,
    /// How its segment frames entries.
    format: Format,
    /// Where the index says it is.
    slot: Slot,
}

impl Located {
    /// The entry, checked to be `kind` of `key` (`Ok(Err(why))`: it is
    /// not, or it is damaged).
    pub(super) fn read(self, kind: Kind, key: &[u8]) -> Result<std::result::Result<Value, String>> {
        let slot = self.slot;
        let bytes = match self.source {
            Source::Bytes(bytes) => bytes,
            Source::File(file) => {
                let mut bytes = vec![0u8; slot.len as usize];
                file.read_exact_at(&mut bytes, slot.offset).map_err(|e| {
                    Error::Storage(format!(
                        "cannot read segment {} at {}: {e}",
                        slot.segment, slot.offset
                    ))
                })?;
                bytes
            }
        };
        let range = match parse_expected(&bytes, self.format, slot, kind, key) {
            Ok(entry) => {
                let start = entry.value.as_ptr() as usize - bytes.as_ptr() as usize;
                start..start + entry.value.len()
            }
            Err(why) => return Ok(Err(why)),
        };
        Ok(Ok(Value { bytes, range }))
    }
}

/// An entry read from the log, and where its value is in it.
pub(super) struct Value {
    bytes: Vec<u8>,
    range: std::ops::Range<usize>,
}

impl Value {
    pub(super) fn get(&self) -> &[u8] {
        &self.bytes[self.range.clone()]
    }
}
