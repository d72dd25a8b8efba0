//! The log's on-disk format: the segment header, each entry's framing
//! (marker, header checksum seeded with the entry's position, payload
//! checksum), encoding and parsing for both formats, and finding where the
//! next valid entry starts after damage ([`resync`]). The layout is in the
//! parent module's documentation.

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use crate::error::{Error, Result};

/// The segment format this release writes (and the newest it reads).
pub(super) const FORMAT_VERSION: u16 = 2;
/// Opens every segment of format 2: `DKVSLG` and the format version (u16).
pub(super) const SEGMENT_HEADER: [u8; 8] = [b'D', b'K', b'V', b'S', b'L', b'G', 2, 0];
/// Starts every entry of format 2, so replay can find the next entry after
/// a damaged one. A later format must change it too: a reader tells a
/// newer segment from one whose version field is damaged by whether its
/// first entry parses as format 2 (see [`segment_start`]), and releases
/// before that check read a header one byte off as a damaged format 2.
const ENTRY_MAGIC: [u8; 4] = [0xD6, 0x4B, 0x56, 0xE5];
/// magic (4) + header checksum (4) + kind (1) + key length (4) + value
/// length (4) + payload checksum (8).
pub(super) const HEADER_BYTES: usize = 25;
/// Format 1 (segments without a header): checksum (8) + kind (1) + key
/// length (4) + value length (4).
pub(super) const LEGACY_HEADER_BYTES: usize = 17;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Put = 1,
    Delete = 2,
    HintPut = 3,
    HintDelete = 4,
    Meta = 5,
}

impl Kind {
    fn from_byte(byte: u8) -> Option<Self> {
        Some(match byte {
            1 => Kind::Put,
            2 => Kind::Delete,
            3 => Kind::HintPut,
            4 => Kind::HintDelete,
            5 => Kind::Meta,
            _ => return None,
        })
    }
}

/// How the entries of a segment are framed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Format {
    /// Format 1, written before segment headers: no magic, one checksum.
    Legacy,
    /// Format 2: segment header; entries with magic and header checksum.
    Framed,
    /// The segment's first bytes are damaged: entries of either format.
    Unknown,
}

/// Where an entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Slot {
    pub(super) segment: u64,
    pub(super) offset: u64,
    pub(super) len: u32,
}

/// One decoded entry.
pub(super) struct Entry<'a> {
    pub(super) kind: Kind,
    pub(super) key: &'a [u8],
    pub(super) value: &'a [u8],
    pub(super) len: usize,
}

/// Why there is no valid entry at some offset.
#[derive(Debug)]
pub(super) struct Damage {
    pub(super) why: String,
    /// The entry's length, when its header checked out (only its payload
    /// is bad): the next entry starts right after it.
    pub(super) trusted_len: Option<usize>,
}

impl Damage {
    fn new(why: impl Into<String>) -> Self {
        Self {
            why: why.into(),
            trusted_len: None,
        }
    }
}

/// The header checksum's seed: an entry's position, so that bytes which
/// look like an entry (say, inside a stored value) but sit anywhere else
/// than where they were written never pass for one.
pub(super) fn header_seed(segment: u64, offset: u64) -> u64 {
    segment.rotate_left(32) ^ offset
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

/// Appends a format-2 entry to be written at `seed`'s position.
pub(super) fn encode_entry(
    out: &mut Vec<u8>,
    seed: u64,
    kind: Kind,
    key: &[u8],
    value: &[u8],
) -> Result<usize> {
    let total = HEADER_BYTES
        .checked_add(key.len())
        .and_then(|n| n.checked_add(value.len()))
        .and_then(|n| u32::try_from(n).ok());
    let (Some(_), Ok(key_len), Ok(value_len)) =
        (total, u32::try_from(key.len()), u32::try_from(value.len()))
    else {
        return Err(Error::InvalidArgument(
            "entry too large for the log (over 4 GiB)".into(),
        ));
    };
    let start = out.len();
    out.extend_from_slice(&ENTRY_MAGIC);
    out.extend_from_slice(&[0u8; 4]);
    out.push(kind as u8);
    out.extend_from_slice(&key_len.to_le_bytes());
    out.extend_from_slice(&value_len.to_le_bytes());
    out.extend_from_slice(&[0u8; 8]);
    out.extend_from_slice(key);
    out.extend_from_slice(value);
    let payload = xxh3_64(&out[start + HEADER_BYTES..]);
    out[start + 17..start + HEADER_BYTES].copy_from_slice(&payload.to_le_bytes());
    let header = xxh3_64_with_seed(&out[start + 8..start + HEADER_BYTES], seed) as u32;
    out[start + 4..start + 8].copy_from_slice(&header.to_le_bytes());
    Ok(out.len() - start)
}

/// The format-2 entry at the start of `bytes`, written at `seed`'s position.
fn parse_framed(bytes: &[u8], seed: u64) -> std::result::Result<Entry<'_>, Damage> {
    let header = bytes
        .get(..HEADER_BYTES)
        .ok_or_else(|| Damage::new(format!("truncated header ({} bytes)", bytes.len())))?;
    if header[..4] != ENTRY_MAGIC {
        return Err(Damage::new("no entry marker"));
    }
    if xxh3_64_with_seed(&header[8..], seed) as u32 != u32_at(header, 4) {
        return Err(Damage::new("header checksum mismatch"));
    }
    let key_len = u32_at(header, 9) as usize;
    let value_len = u32_at(header, 13) as usize;
    let len = HEADER_BYTES
        .checked_add(key_len)
        .and_then(|n| n.checked_add(value_len))
        .filter(|&n| u32::try_from(n).is_ok())
        .ok_or_else(|| Damage::new("entry length overflows"))?;
    let damage = |why: String| Damage {
        why,
        trusted_len: Some(len),
    };
    let payload = bytes
        .get(HEADER_BYTES..len)
        .ok_or_else(|| damage(format!("truncated entry ({} of {len} bytes)", bytes.len())))?;
    if xxh3_64(payload) != u64_at(header, 17) {
        return Err(damage("payload checksum mismatch".into()));
    }
    let kind = Kind::from_byte(header[8])
        .ok_or_else(|| damage(format!("unknown entry kind {}", header[8])))?;
    Ok(Entry {
        kind,
        key: &payload[..key_len],
        value: &payload[key_len..],
        len,
    })
}

/// The format-1 entry at the start of `bytes` (no marker, no header
/// checksum: nothing about it is trusted unless its checksum matches).
fn parse_legacy(bytes: &[u8]) -> std::result::Result<Entry<'_>, Damage> {
    let header = bytes
        .get(..LEGACY_HEADER_BYTES)
        .ok_or_else(|| Damage::new(format!("truncated header ({} bytes)", bytes.len())))?;
    let kind = Kind::from_byte(header[8])
        .ok_or_else(|| Damage::new(format!("unknown entry kind {}", header[8])))?;
    let key_len = u32_at(header, 9) as usize;
    let value_len = u32_at(header, 13) as usize;
    let len = LEGACY_HEADER_BYTES
        .checked_add(key_len)
        .and_then(|n| n.checked_add(value_len))
        .filter(|&n| u32::try_from(n).is_ok())
        .ok_or_else(|| Damage::new("entry length overflows"))?;
    let body = bytes
        .get(8..len)
        .ok_or_else(|| Damage::new(format!("truncated entry ({} of {len} bytes)", bytes.len())))?;
    if xxh3_64(body) != u64_at(header, 0) {
        return Err(Damage::new("checksum mismatch"));
    }
    Ok(Entry {
        kind,
        key: &bytes[LEGACY_HEADER_BYTES..LEGACY_HEADER_BYTES + key_len],
        value: &bytes[LEGACY_HEADER_BYTES + key_len..len],
        len,
    })
}

/// The entry at the start of `bytes`, found at `offset` of `segment`.
pub(super) fn parse_entry(
    bytes: &[u8],
    format: Format,
    segment: u64,
    offset: u64,
) -> std::result::Result<Entry<'_>, Damage> {
    match format {
        Format::Framed => parse_framed(bytes, header_seed(segment, offset)),
        Format::Legacy => parse_legacy(bytes),
        Format::Unknown => match parse_framed(bytes, header_seed(segment, offset)) {
            Ok(entry) => Ok(entry),
            Err(damage) if damage.trusted_len.is_some() => Err(damage),
            Err(_) => parse_legacy(bytes),
        },
    }
}

/// The entry the index says is at `slot`: checked, so a wrong offset can
/// never hand out another key's data.
pub(super) fn parse_expected<'a>(
    bytes: &'a [u8],
    format: Format,
    slot: Slot,
    kind: Kind,
    key: &[u8],
) -> std::result::Result<Entry<'a>, String> {
    let entry = parse_entry(bytes, format, slot.segment, slot.offset).map_err(|d| d.why)?;
    if entry.kind != kind || entry.key != key {
        return Err(format!(
            "the log holds a different entry ({:?} of {:?}) where the index points",
            entry.kind,
            String::from_utf8_lossy(entry.key)
        ));
    }
    Ok(entry)
}

/// How a segment's first bytes say its entries are framed, and where they
/// start. `clean`: a format-2 header, intact (only such a segment is
/// appended to).
pub(super) struct SegmentStart {
    pub(super) format: Format,
    pub(super) start: usize,
    pub(super) clean: bool,
}

/// A segment whose header names a format version this release does not
/// read, with no format-2 entry after it to show the version field is
/// merely damaged.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct UnknownVersion(pub(super) u16);

/// How segment `segment`'s `data` starts. A header with an intact `DKVSLG`
/// and another version is a newer release's segment, unless its first entry
/// parses as format 2 (then only the version field is damaged, and the
/// segment is read like one with any other damaged header byte).
pub(super) fn segment_start(
    data: &[u8],
    segment: u64,
) -> std::result::Result<SegmentStart, UnknownVersion> {
    if let Some(header) = data.get(..SEGMENT_HEADER.len())
        && header[..6] == SEGMENT_HEADER[..6]
    {
        let version = u16::from_le_bytes([header[6], header[7]]);
        if version != FORMAT_VERSION {
            let first = &data[SEGMENT_HEADER.len()..];
            // Nothing after the header to judge by (a segment just rolled
            // over, or cut back to its header): a damaged byte costs
            // nothing here, so it is read as this release's empty segment.
            if first.len() < HEADER_BYTES {
                return Ok(SegmentStart {
                    format: Format::Framed,
                    start: SEGMENT_HEADER.len(),
                    clean: false,
                });
            }
            let seed = header_seed(segment, SEGMENT_HEADER.len() as u64);
            // A header checksum that matches (payload bad or not) is
            // evidence enough: it was seeded with this entry's position.
            let framed = match parse_framed(first, seed) {
                Ok(_) => true,
                Err(damage) => damage.trusted_len.is_some(),
            };
            if !framed {
                return Err(UnknownVersion(version));
            }
            return Ok(SegmentStart {
                format: Format::Framed,
                start: SEGMENT_HEADER.len(),
                clean: false,
            });
        }
    }
    Ok(known_segment_start(data))
}

/// [`segment_start`] once the version field is known not to name another
/// format.
fn known_segment_start(data: &[u8]) -> SegmentStart {
    if data.is_empty() {
        // Created, never written (a crash right after a roll-over).
        return SegmentStart {
            format: Format::Framed,
            start: 0,
            clean: false,
        };
    }
    if let Some(header) = data.get(..SEGMENT_HEADER.len()) {
        let differing = header
            .iter()
            .zip(SEGMENT_HEADER)
            .filter(|(a, b)| **a != *b)
            .count();
        if differing <= 1 {
            return SegmentStart {
                format: Format::Framed,
                start: SEGMENT_HEADER.len(),
                clean: differing == 0,
            };
        }
    }
    let format = if parse_legacy(data).is_ok() {
        Format::Legacy
    } else {
        Format::Unknown
    };
    SegmentStart {
        format,
        start: 0,
        clean: false,
    }
}

/// Whether an entry could start at `at` (cheap tests before checksums).
fn plausible(data: &[u8], format: Format, at: usize) -> bool {
    let rest = &data[at..];
    let framed = format != Format::Legacy && rest.starts_with(&ENTRY_MAGIC);
    let legacy = format != Format::Framed
        && rest.len() >= LEGACY_HEADER_BYTES
        && Kind::from_byte(rest[8]).is_some()
        && (u32_at(rest, 9) as usize).saturating_add(u32_at(rest, 13) as usize)
            <= rest.len() - LEGACY_HEADER_BYTES;
    framed || legacy
}

/// The first offset at or after `from` where a valid entry starts.
pub(super) fn resync(data: &[u8], format: Format, segment: u64, from: usize) -> Option<usize> {
    (from..data.len()).find(|&at| {
        plausible(data, format, at) && parse_entry(&data[at..], format, segment, at as u64).is_ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Version;
    use crate::record::Record;
    use crate::storage::log::LogStorage;
    use crate::storage::log::tests::value;
    use crate::storage::log::write::segment_path;
    use crate::storage::{FsyncPolicy, Storage};

    /// Format 1, as written before segment headers.
    fn encode_legacy(out: &mut Vec<u8>, kind: Kind, key: &[u8], value: &[u8]) {
        let start = out.len();
        out.extend_from_slice(&[0u8; 8]);
        out.push(kind as u8);
        out.extend_from_slice(&(key.len() as u32).to_le_bytes());
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        out.extend_from_slice(key);
        out.extend_from_slice(value);
        let checksum = xxh3_64(&out[start + 8..]);
        out[start..start + 8].copy_from_slice(&checksum.to_le_bytes());
    }

    #[test]
    fn a_damaged_length_field_costs_only_its_entry() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let log = LogStorage::open(dir.path(), FsyncPolicy::Periodic).expect("open");
            for i in 0..5u64 {
                log.put(format!("key{i}").as_bytes(), &value(i + 1, "value"))
                    .expect("put");
            }
            log.flush().expect("flush");
        }
        let path = segment_path(dir.path(), 1);
        let mut bytes = std::fs::read(&path).expect("read");
        // The third entry's value length (after the header, two entries).
        let entry_len = (bytes.len() - SEGMENT_HEADER.len()) / 5;
        let at = SEGMENT_HEADER.len() + 2 * entry_len + 13;
        bytes[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        std::fs::write(&path, &bytes).expect("write");
        let log = LogStorage::open(dir.path(), FsyncPolicy::Periodic).expect("open");
        assert_eq!(log.get(b"key2").expect("get"), None);
        for i in [0u64, 1, 3, 4] {
            assert_eq!(
                log.get(format!("key{i}").as_bytes()).expect("get"),
                Some(value(i + 1, "value"))
            );
        }
        assert_eq!(log.damaged_entries_skipped(), 1);
    }

    #[test]
    fn legacy_segments_stay_readable_and_resynchronise() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut bytes = Vec::new();
        let mut starts = Vec::new();
        for i in 0..5u64 {
            starts.push(bytes.len());
            let record = value(i + 1, "old");
            encode_legacy(
                &mut bytes,
                Kind::Put,
                format!("key{i}").as_bytes(),
                &record.encode(),
            );
        }
        encode_legacy(&mut bytes, Kind::Meta, b"clock", &7u64.to_le_bytes());
        // Damage: entry 1's checksum, entry 3's value length (huge).
        bytes[starts[1] + 2] ^= 0x01;
        bytes[starts[3] + 13..starts[3] + 17].copy_from_slice(&u32::MAX.to_le_bytes());
        std::fs::write(segment_path(dir.path(), 1), &bytes).expect("write");
        let log = LogStorage::open(dir.path(), FsyncPolicy::Periodic).expect("open");
        for i in [0u64, 2, 4] {
            assert_eq!(
                log.get(format!("key{i}").as_bytes()).expect("get"),
                Some(value(i + 1, "old"))
            );
        }
        assert_eq!(log.get(b"key1").expect("get"), None);
        assert_eq!(log.get(b"key3").expect("get"), None);
        assert_eq!(log.get_meta("clock").expect("meta"), Some(7));
        assert_eq!(log.damaged_entries_skipped(), 2);
        // New entries go to a new segment of the current format.
        log.put(b"new", &value(100, "new")).expect("put");
        log.flush().expect("flush");
        drop(log);
        let head = std::fs::read(segment_path(dir.path(), 2)).expect("segment 2");
        assert!(head.starts_with(&SEGMENT_HEADER));
        let log = LogStorage::open(dir.path(), FsyncPolicy::Periodic).expect("reopen");
        assert_eq!(log.get(b"new").expect("get"), Some(value(100, "new")));
        assert_eq!(log.get(b"key4").expect("get"), Some(value(5, "old")));
    }

    /// A segment of one record, then its bytes.
    fn one_record_segment(dir: &std::path::Path) -> Vec<u8> {
        {
            let log = LogStorage::open(dir, FsyncPolicy::Periodic).expect("open");
            log.put(b"key", &value(1, "value")).expect("put");
            log.flush().expect("flush");
        }
        std::fs::read(segment_path(dir, 1)).expect("read")
    }

    #[test]
    fn a_damaged_version_field_over_format_2_entries_costs_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut bytes = one_record_segment(dir.path());
        bytes[6..8].copy_from_slice(&3u16.to_le_bytes());
        std::fs::write(segment_path(dir.path(), 1), &bytes).expect("write");
        let opening = segment_start(&bytes, 1).expect("read as format 2");
        assert_eq!((opening.format, opening.clean), (Format::Framed, false));
        bytes[7] = 0x80; // both bytes of the field: still format 2 after it
        assert!(segment_start(&bytes, 1).is_ok());
        let log = LogStorage::open(dir.path(), FsyncPolicy::Periodic).expect("open");
        assert_eq!(log.get(b"key").expect("get"), Some(value(1, "value")));
        assert_eq!(log.damaged_entries_skipped(), 1, "the header byte");
    }

    #[test]
    fn a_segment_of_a_newer_format_is_refused_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut bytes = one_record_segment(dir.path());
        // A later format: another version and another entry marker.
        bytes[6..8].copy_from_slice(&3u16.to_le_bytes());
        bytes[SEGMENT_HEADER.len()] ^= 0xff;
        assert_eq!(segment_start(&bytes, 1).err(), Some(UnknownVersion(3)));
        // A segment with no entry after its header gives nothing to tell a
        // newer format from a damaged byte by: read as an empty segment of
        // this format (a flipped bit must not stop the node; there is
        // nothing in it to misread).
        let header_only = segment_start(&bytes[..SEGMENT_HEADER.len()], 1).expect("opens");
        assert_eq!(
            (header_only.format, header_only.clean),
            (Format::Framed, false)
        );
        let path = segment_path(dir.path(), 1);
        std::fs::write(&path, &bytes).expect("write");
        let refused = LogStorage::open(dir.path(), FsyncPolicy::Periodic)
            .err()
            .expect("refused")
            .to_string();
        assert!(refused.contains(&path.display().to_string()), "{refused}");
        assert!(refused.contains("format version 3"), "{refused}");
        assert_eq!(std::fs::read(&path).expect("read"), bytes, "left as it was");
    }

    #[test]
    fn an_entry_stored_inside_a_value_is_not_taken_for_one() {
        // A value that holds a valid-looking entry, in a segment whose
        // real entry before it is damaged: resync must not pick it up.
        let dir = tempfile::tempdir().expect("tempdir");
        let mut fake = Vec::new();
        encode_entry(&mut fake, header_seed(1, 0), Kind::Put, b"fake", b"x").expect("encode");
        {
            let log = LogStorage::open(dir.path(), FsyncPolicy::Periodic).expect("open");
            let record = Record::value(Version::new(1, 1), fake.clone());
            log.put(b"carrier", &record).expect("put");
            log.put(b"after", &value(2, "after")).expect("put");
            log.flush().expect("flush");
        }
        let path = segment_path(dir.path(), 1);
        let mut bytes = std::fs::read(&path).expect("read");
        bytes[SEGMENT_HEADER.len()] ^= 0xff; // the carrier's marker
        std::fs::write(&path, &bytes).expect("write");
        let log = LogStorage::open(dir.path(), FsyncPolicy::Periodic).expect("open");
        assert_eq!(log.get(b"fake").expect("get"), None);
        assert_eq!(log.get(b"carrier").expect("get"), None);
        assert_eq!(log.get(b"after").expect("get"), Some(value(2, "after")));
    }
}
