//! The pure part of a key listing: where a listing stands (a position in
//! storage-key order, which is ring order: a key's 8-byte hash, then the
//! key), the cursor a client carries between pages, which hash interval of
//! the ring to list next, and how the pages of several replicas of one
//! interval merge into keys that are sure to be complete.

use std::collections::BTreeMap;

use crate::clock::Version;
use crate::error::{Error, Result};
use crate::replica::RangeEntry;
use crate::ring::Ring;
use crate::storage::storage_key;

/// The longest cursor a listing gives: a storage key (8 bytes of hash and
/// a key of at most 64 KiB, above any `--max-key-bytes`) in hex.
const MAX_CURSOR_CHARS: usize = 2 * (8 + (64 << 10));

/// Where a listing stands: every key whose storage key is at or below it
/// has been listed. Empty: nothing listed yet. Exactly the 8 bytes of a
/// hash `h`: every key hashed below `h` listed (a real storage key is
/// longer, so each key hashed `h` sorts after it).
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position(Vec<u8>);

impl Position {
    /// Before every key.
    pub fn start() -> Self {
        Self(Vec::new())
    }

    /// Just before every key hashed `hash`.
    pub fn before_hash(hash: u64) -> Self {
        Self(hash.to_be_bytes().to_vec())
    }

    /// Just after `key`.
    pub fn after_key(key: &str) -> Self {
        Self(storage_key(key))
    }

    /// The storage key a replica's page starts after.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The hash the next key listed has at least.
    fn hash(&self) -> u64 {
        match self.0.get(..8) {
            Some(bytes) => u64::from_be_bytes(bytes.try_into().unwrap_or([0; 8])),
            None => 0,
        }
    }

    /// The position a Redis SCAN cursor names: the hash the next page
    /// starts at (0: the start).
    pub fn from_scan_cursor(cursor: u64) -> Self {
        match cursor {
            0 => Self::start(),
            hash => Self::before_hash(hash),
        }
    }

    /// This position as a SCAN cursor (Redis clients expect a number): the
    /// hash the next page starts at. A position after a key resumes at the
    /// next hash, so another key of exactly that 64-bit hash sorted after
    /// it would be skipped (a chance of about 2^-64 per page). 0 at the
    /// very end of the ring.
    pub fn to_scan_cursor(&self) -> u64 {
        match self.0.len() {
            0 => 0,
            8 => self.hash(),
            _ => self.hash().wrapping_add(1),
        }
    }

    /// The cursor a client passes to resume here: the position in hex
    /// (URL-safe, opaque to the client).
    pub fn to_cursor(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The position a cursor names (empty: the start). A cursor is a
    /// position, not a snapshot: it stays valid across layout changes.
    pub fn from_cursor(cursor: &str) -> Result<Self> {
        let bad = || {
            Error::InvalidArgument(format!(
                "cursor {:?} is not one a listing gave: pass the `cursor` of the previous page unchanged, or none to start",
                cursor.chars().take(40).collect::<String>()
            ))
        };
        if cursor.is_empty() {
            return Ok(Self::start());
        }
        // A position is a storage key: 8 bytes of hash and a key.
        if cursor.len() % 2 != 0 || cursor.len() < 16 || cursor.len() > MAX_CURSOR_CHARS {
            return Err(bad());
        }
        let bytes = (0..cursor.len())
            .step_by(2)
            .map(|i| {
                cursor
                    .get(i..i + 2)
                    .and_then(|pair| u8::from_str_radix(pair, 16).ok())
            })
            .collect::<Option<Vec<u8>>>()
            .ok_or_else(bad)?;
        Ok(Self(bytes))
    }
}

/// The part of the ring a listing reads next: token range `range`, from
/// the position up to and including hash `last`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stretch {
    pub range: usize,
    pub last: u64,
}

/// The stretch holding the next key after `at`: the hash interval of a
/// token range that contains the position's hash. (Range 0 wraps around
/// zero, so it is read as two stretches, at both ends of the order.)
pub fn next_stretch(ring: &Ring, at: &Position) -> Stretch {
    let hash = at.hash();
    let range = ring.range_of(hash);
    let last = ring
        .range_hashes(range)
        .into_iter()
        .find(|&(first, last)| first <= hash && hash <= last)
        .map_or(u64::MAX, |(_, last)| last);
    Stretch { range, last }
}

/// One replica's page of a range: its entries after the position, and
/// the storage key it stopped at when more may follow.
#[derive(Clone, Debug, Default)]
pub struct ReplicaPage {
    pub entries: Vec<RangeEntry>,
    pub next: Option<Vec<u8>>,
}

/// A key a listing returns, with the newest version the replicas asked
/// hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    pub key: String,
    pub version: Version,
}

/// What the pages of one stretch give: the keys they show complete (in
/// storage-key order) and where the listing stands after them (`None`:
/// the whole ring has been listed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    pub keys: Vec<Listed>,
    pub next: Option<Position>,
}

/// Merges the pages several replicas gave of `stretch` after `at`: each
/// replica's listing is complete only up to where its page stopped, so the
/// window ends at the nearest such stop (or the stretch's end when every
/// page reached it). Per key the newest version wins; keys whose newest
/// version is a tombstone, and keys without `prefix`, are left out.
pub fn merge(pages: &[ReplicaPage], stretch: Stretch, at: &Position, prefix: &str) -> Window {
    let stop = pages.iter().filter_map(|p| p.next.as_deref()).min();
    let stretch_end = stretch.last.to_be_bytes();
    // Past the stretch's last hash: a key whose storage key starts with a
    // hash above it (the replica's page may run on into range 0's other
    // interval, listed later).
    let in_stretch = |stored: &[u8]| stored.get(..8).is_some_and(|hash| hash <= &stretch_end[..]);
    let mut newest: BTreeMap<Vec<u8>, (&RangeEntry, bool)> = BTreeMap::new();
    for entry in pages.iter().flat_map(|p| &p.entries) {
        let stored = storage_key(&entry.key);
        if stored.as_slice() <= at.as_bytes()
            || !in_stretch(&stored)
            || stop.is_some_and(|stop| stored.as_slice() > stop)
        {
            continue;
        }
        match newest.get(&stored) {
            Some((kept, _)) if kept.version >= entry.version => {}
            _ => {
                newest.insert(stored, (entry, entry.tombstone));
            }
        }
    }
    let keys = newest
        .into_values()
        .filter(|(entry, tombstone)| !tombstone && entry.key.starts_with(prefix))
        .map(|(entry, _)| Listed {
            key: entry.key.clone(),
            version: entry.version,
        })
        .collect();
    let next = match stop {
        Some(stop) if in_stretch(stop) => Some(Position(stop.to_vec())),
        _ => stretch.last.checked_add(1).map(Position::before_hash),
    };
    Window { keys, next }
}

#[cfg(test)]
#[path = "order_tests.rs"]
mod tests;
