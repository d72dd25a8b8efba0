//! One stored version of a key: a value or a tombstone, and its encoding.
//!
//! The on-disk encoding is fixed-width header + body:
//! `lamport: u64 LE | node_id: u64 LE | kind: u8 (0 value, 1 tombstone) | body`,
//! where the body is the value, or for a tombstone its deletion time
//! (`u64 LE`, milliseconds since the Unix epoch).
//! Decoding never panics: a short or unknown record is a [`DecodeError`].

use bytes::Bytes;

use crate::clock::{FIRST_HLC_MS, Version};

/// A version of a key: the value written, or `None` for a delete (tombstone).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The write's version; the newest version of a key wins.
    pub version: Version,
    /// The value, or `None` when the key was deleted.
    pub value: Option<Bytes>,
    /// For a tombstone: when the delete was coordinated (ms since the Unix
    /// epoch); tombstone GC counts `--tombstone-grace` from it. 0 for values.
    pub deleted_at_ms: u64,
}

const HEADER_LEN: usize = 17;
const KIND_VALUE: u8 = 0;
const KIND_TOMBSTONE: u8 = 1;

/// A stored record that cannot be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("corrupt record: {0}")]
pub struct DecodeError(pub String);

impl Record {
    pub fn value(version: Version, value: impl Into<Bytes>) -> Self {
        Self {
            version,
            value: Some(value.into()),
            deleted_at_ms: 0,
        }
    }

    /// A tombstone with an unknown deletion time (0: old enough to collect
    /// as soon as every replica holds it).
    pub fn tombstone(version: Version) -> Self {
        Self::tombstone_at(version, 0)
    }

    /// A tombstone for a delete coordinated at `deleted_at_ms`.
    pub fn tombstone_at(version: Version, deleted_at_ms: u64) -> Self {
        Self {
            version,
            value: None,
            deleted_at_ms,
        }
    }

    /// A value (`Some`) or a tombstone deleted now (`None`).
    pub fn new(version: Version, value: Option<Bytes>, now_ms: u64) -> Self {
        match value {
            Some(value) => Self::value(version, value),
            None => Self::tombstone_at(version, now_ms),
        }
    }

    pub fn is_tombstone(&self) -> bool {
        self.value.is_none()
    }

    pub fn encode(&self) -> Vec<u8> {
        let deleted_at = self.deleted_at_ms.to_le_bytes();
        let value = self.value.as_deref().unwrap_or(&deleted_at);
        let mut out = Vec::with_capacity(HEADER_LEN + value.len());
        out.extend_from_slice(&self.version.hlc.to_le_bytes());
        out.extend_from_slice(&self.version.instance_id.0.to_le_bytes());
        out.push(if self.value.is_some() {
            KIND_VALUE
        } else {
            KIND_TOMBSTONE
        });
        out.extend_from_slice(value);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() < HEADER_LEN {
            return Err(DecodeError(format!(
                "{} bytes, shorter than the {HEADER_LEN}-byte header",
                bytes.len()
            )));
        }
        let (lamport, rest) = bytes.split_at(8);
        let (node_id, rest) = rest.split_at(8);
        let (kind, value) = rest.split_at(1);
        let version = Version::new(le_u64(lamport), le_u64(node_id));
        match kind[0] {
            KIND_VALUE => Ok(Self::value(version, Bytes::copy_from_slice(value))),
            KIND_TOMBSTONE if value.is_empty() => Ok(Self::tombstone(version)),
            KIND_TOMBSTONE if value.len() == 8 => Ok(Self::tombstone_at(version, le_u64(value))),
            KIND_TOMBSTONE => Err(DecodeError(format!(
                "tombstone with a {}-byte body (expected 8)",
                value.len()
            ))),
            other => Err(DecodeError(format!("unknown record kind {other}"))),
        }
    }
}

fn le_u64(bytes: &[u8]) -> u64 {
    let mut buf = [0u8; 8];
    buf.copy_from_slice(bytes);
    u64::from_le_bytes(buf)
}

/// When a tombstone was made, for its grace: the physical part of its
/// version; `deleted_at_ms` only for versions from before the HLC.
pub fn tombstone_time_ms(version: Version, deleted_at_ms: u64) -> u64 {
    let physical = version.physical_ms();
    if physical >= FIRST_HLC_MS {
        physical
    } else {
        deleted_at_ms
    }
}

/// Merge rule: the record with the higher version wins; `None` loses to anything.
pub fn newest<'a>(a: Option<&'a Record>, b: Option<&'a Record>) -> Option<&'a Record> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if b.version > a.version { b } else { a }),
        (a, None) => a,
        (None, b) => b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_values_and_tombstones() {
        let value = Record::value(Version::new(5, 9), &b"hello"[..]);
        assert_eq!(Record::decode(&value.encode()), Ok(value));
        let empty = Record::value(Version::new(5, 9), Bytes::new());
        assert_eq!(Record::decode(&empty.encode()), Ok(empty));
        let tombstone = Record::tombstone(Version::new(u64::MAX, 1));
        assert_eq!(Record::decode(&tombstone.encode()), Ok(tombstone));
        let dated = Record::tombstone_at(Version::new(2, 1), 1_700_000_000_000);
        assert_eq!(Record::decode(&dated.encode()), Ok(dated));
    }

    #[test]
    fn corrupt_bytes_are_errors_not_panics() {
        assert!(Record::decode(b"").is_err());
        assert!(Record::decode(&[0u8; 16]).is_err());
        let mut bad_kind = Record::tombstone(Version::new(1, 1)).encode();
        bad_kind[16] = 7;
        assert!(Record::decode(&bad_kind).is_err());
        let mut tombstone_with_value = Record::tombstone(Version::new(1, 1)).encode();
        tombstone_with_value.push(1);
        assert!(Record::decode(&tombstone_with_value).is_err());
    }

    #[test]
    fn newest_prefers_the_higher_version_and_any_record_over_none() {
        let old = Record::value(Version::new(1, 2), &b"old"[..]);
        let new = Record::tombstone(Version::new(2, 1));
        assert_eq!(newest(Some(&old), Some(&new)), Some(&new));
        assert_eq!(newest(Some(&new), Some(&old)), Some(&new));
        assert_eq!(newest(None, Some(&old)), Some(&old));
        assert_eq!(newest(Some(&old), None), Some(&old));
        assert_eq!(newest(None, None), None);
    }
}
