//! The hint store: hints persisted through the storage engine, bounded in
//! number, bytes and age, listed per target oldest first.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::clock::SkewBound;
use crate::error::{Error, Result};
use crate::locks::Locked;
use crate::record::Record;
use crate::ring::MemberId;
use crate::storage::Storage;

/// A write kept for a replica that was down.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hint {
    /// The replica the write is for.
    pub target: MemberId,
    /// The key written.
    pub key: String,
    /// The version and value written.
    pub record: Record,
    /// When the hint was stored, in milliseconds since the Unix epoch.
    pub created_ms: u64,
}

impl Hint {
    /// `created_ms u64 LE | key length u32 LE | key | encoded record`.
    pub fn encode(&self) -> Vec<u8> {
        let record = self.record.encode();
        let mut out = Vec::with_capacity(12 + self.key.len() + record.len());
        out.extend_from_slice(&self.created_ms.to_le_bytes());
        out.extend_from_slice(&(self.key.len() as u32).to_le_bytes());
        out.extend_from_slice(self.key.as_bytes());
        out.extend_from_slice(&record);
        out
    }

    pub fn decode(target: MemberId, bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() < 12 {
            return Err(format!(
                "hint of {} bytes is shorter than its header",
                bytes.len()
            ));
        }
        let (created, rest) = bytes.split_at(8);
        let (key_len, rest) = rest.split_at(4);
        let created_ms = u64::from_le_bytes(created.try_into().map_err(|_| "bad header")?);
        let key_len = u32::from_le_bytes(key_len.try_into().map_err(|_| "bad header")?) as usize;
        if rest.len() < key_len {
            return Err(format!("hint key of {key_len} bytes overruns the hint"));
        }
        let (key, record) = rest.split_at(key_len);
        let key =
            String::from_utf8(key.to_vec()).map_err(|_| "hint key is not UTF-8".to_string())?;
        let record = Record::decode(record).map_err(|e| e.0)?;
        Ok(Self {
            target,
            key,
            record,
            created_ms,
        })
    }

    /// Whether the hint is older than `max_age` at `now_ms`.
    pub fn expired(&self, now_ms: u64, max_age: Duration) -> bool {
        now_ms.saturating_sub(self.created_ms) > max_age.as_millis() as u64
    }
}

/// Storage id of a hint: target (8 bytes BE) then a sequence number (8 bytes
/// BE), so one target's hints are contiguous and in arrival order.
fn hint_id(target: MemberId, sequence: u64) -> Vec<u8> {
    let mut id = Vec::with_capacity(16);
    id.extend_from_slice(&target.0.to_be_bytes());
    id.extend_from_slice(&sequence.to_be_bytes());
    id
}

/// The target and sequence number in a hint id (`None`: not 16 bytes).
fn parse_id(id: &[u8]) -> Option<(MemberId, u64)> {
    let target = u64::from_be_bytes(id.get(..8)?.try_into().ok()?);
    let sequence = u64::from_be_bytes(id.get(8..)?.try_into().ok()?);
    Some((MemberId(target), sequence))
}

/// What bounds the hints a node holds and delivers.
#[derive(Clone, Copy, Debug)]
pub struct HintBounds {
    /// Most hints held at once (`--max-hints`).
    pub max_hints: u64,
    /// Most bytes of hints held at once (`--max-hint-bytes`).
    pub max_bytes: u64,
    /// Hints older than this are dropped, not delivered.
    pub max_age: Duration,
    /// The bound every version passes: a hint whose version is beyond it
    /// when delivered is dropped.
    pub skew: SkewBound,
}

/// A hint as held on disk: its storage id and size besides the hint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredHint {
    /// Storage id (see [`hint_id`]).
    pub id: Vec<u8>,
    /// Bytes stored under the id.
    pub bytes: u64,
    /// The hint.
    pub hint: Hint,
}

/// A hint as read from the engine: id, size, and its bytes or why they
/// cannot be read.
type ReadHint = (Vec<u8>, u64, std::result::Result<Vec<u8>, String>);

/// Hints and bytes held for one target.
#[derive(Clone, Copy, Debug, Default)]
struct Held {
    /// Hints held.
    hints: u64,
    /// Bytes of those hints.
    bytes: u64,
}

/// What the store holds, per target and in all.
#[derive(Debug, Default)]
struct Pending {
    /// Per target.
    targets: BTreeMap<MemberId, Held>,
    /// Sum over all targets.
    total: Held,
}

impl Pending {
    fn add(&mut self, target: MemberId, bytes: u64) {
        let held = self.targets.entry(target).or_default();
        held.hints += 1;
        held.bytes += bytes;
        self.total.hints += 1;
        self.total.bytes += bytes;
    }

    fn sub(&mut self, target: MemberId, bytes: u64) {
        if let Some(held) = self.targets.get_mut(&target) {
            held.hints = held.hints.saturating_sub(1);
            held.bytes = held.bytes.saturating_sub(bytes);
            if held.hints == 0 {
                self.targets.remove(&target);
            }
        }
        self.total.hints = self.total.hints.saturating_sub(1);
        self.total.bytes = self.total.bytes.saturating_sub(bytes);
    }
}

/// This node's persisted hints, with in-memory counts per target.
pub struct HintStore {
    /// Where hints live (beside the records, in the storage engine).
    storage: Arc<dyn Storage>,
    /// Next sequence number.
    next_sequence: AtomicU64,
    /// Hints and bytes held (std mutex: held for a map update, never
    /// across storage calls or `.await`).
    pending: Mutex<Pending>,
    /// Count, size, age and version bounds.
    bounds: HintBounds,
    /// Hints delivered since start.
    delivered: AtomicU64,
    /// Hints stored since start.
    stored: AtomicU64,
    /// Hints given up on since start: deleted undelivered (expired,
    /// corrupt, their target gone) or refused because the store was full.
    dropped: AtomicU64,
}

impl HintStore {
    /// Opens the store, counting the hints already on disk from their ids
    /// and sizes alone: no hint is read.
    pub fn open(storage: Arc<dyn Storage>, bounds: HintBounds) -> Result<Self> {
        let mut pending = Pending::default();
        let mut max_sequence = 0u64;
        for (id, bytes) in storage.hint_ids(&[], usize::MAX)? {
            match parse_id(&id) {
                Some((target, sequence)) => {
                    pending.add(target, bytes);
                    max_sequence = max_sequence.max(sequence);
                }
                None => {
                    tracing::warn!(id = ?id, "dropping a hint with a malformed id");
                    storage.delete_hint(&id)?;
                }
            }
        }
        Ok(Self {
            storage,
            next_sequence: AtomicU64::new(max_sequence + 1),
            pending: Mutex::new(pending),
            bounds,
            delivered: AtomicU64::new(0),
            stored: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        })
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.locked()
    }

    /// Hints held in all.
    pub fn len(&self) -> u64 {
        self.pending().total.hints
    }

    /// Bytes of hints held in all.
    pub fn bytes(&self) -> u64 {
        self.pending().total.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    /// Hints stored since start.
    pub fn stored(&self) -> u64 {
        self.stored.load(Ordering::Relaxed)
    }

    /// Hints given up on since start (see the field).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Targets with hints waiting.
    pub fn targets(&self) -> Vec<MemberId> {
        self.pending().targets.keys().copied().collect()
    }

    /// Persists a hint; refuses when `--max-hints` are already held, or
    /// when it would take the bytes held beyond `--max-hint-bytes`.
    pub fn store(&self, hint: &Hint) -> Result<()> {
        let bytes = hint.encode();
        let size = bytes.len() as u64;
        {
            let mut pending = self.pending();
            let full = pending.total.hints >= self.bounds.max_hints
                || pending.total.bytes.saturating_add(size) > self.bounds.max_bytes;
            if full {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            if pending.total.hints >= self.bounds.max_hints {
                return Err(Error::Unavailable(format!(
                    "hint store full ({} hints, --max-hints)",
                    self.bounds.max_hints
                )));
            }
            if pending.total.bytes.saturating_add(size) > self.bounds.max_bytes {
                return Err(Error::Unavailable(format!(
                    "hint store full: a hint of {size} bytes on top of the {} held exceeds --max-hint-bytes ({})",
                    pending.total.bytes, self.bounds.max_bytes
                )));
            }
            pending.add(hint.target, size);
        }
        let sequence = self.next_sequence.fetch_add(1, Ordering::Relaxed);
        let id = hint_id(hint.target, sequence);
        let dropped = self.storage.dropped_buffers();
        let stored = self
            .storage
            .put_hint(&id, &bytes)
            .and_then(|()| self.storage.flush())
            .and_then(|()| {
                // A full disk can drop it even when this flush succeeded.
                if self.storage.dropped_buffers() == dropped
                    || self
                        .storage
                        .hint_ids(&id, 1)?
                        .first()
                        .is_some_and(|(i, _)| *i == id)
                {
                    Ok(())
                } else {
                    Err(Error::Storage(
                        "the hint could not be written (the disk is full)".into(),
                    ))
                }
            });
        if let Err(error) = stored {
            self.pending().sub(hint.target, size);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return Err(error);
        }
        self.stored.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Up to `limit` of `target`'s hints that may be delivered at `now_ms`,
    /// oldest first. Hints that cannot be delivered are deleted on the way,
    /// each with a log line, so none blocks the ones behind it: expired
    /// ones, undecodable ones, and ones with an impossible version. A hint
    /// merely beyond the skew bound (the wall clock stepped back since it
    /// was taken) ends the batch: it waits, with those behind it, until the
    /// clock catches up, as it may be a write's only copy.
    pub fn for_target(
        &self,
        target: MemberId,
        limit: usize,
        now_ms: u64,
    ) -> Result<Vec<StoredHint>> {
        let mut hints = Vec::new();
        for (id, size, read) in self.read(target, limit)? {
            let decoded = read.and_then(|bytes| Hint::decode(target, &bytes));
            let hint = match decoded {
                Ok(hint) => hint,
                Err(why) => {
                    tracing::warn!(replica_id = %target, %why, "dropping a corrupt hint");
                    self.delete(&id, target, size, false)?;
                    continue;
                }
            };
            let stored = StoredHint {
                id,
                bytes: size,
                hint,
            };
            if stored.hint.expired(now_ms, self.bounds.max_age) {
                tracing::debug!(replica_id = %target, key_hash = %crate::metrics::key_hash(&stored.hint.key), "dropping an expired hint");
                self.remove(&stored, false)?;
                continue;
            }
            let version = stored.hint.record.version;
            if let Err(why) = self.bounds.skew.check_stored(version, now_ms) {
                tracing::warn!(replica_id = %target, key_hash = %crate::metrics::key_hash(&stored.hint.key), %why, "dropping a hint with an impossible version");
                self.remove(&stored, false)?;
                continue;
            }
            if let Err(why) = self.bounds.skew.check(version, now_ms) {
                // Genuine, but the wall clock stepped back since it was
                // taken: the target would refuse it now. It (and the hints
                // behind it) wait until the clock catches up; it may be
                // the only copy of a write taken at consistency ANY.
                tracing::warn!(replica_id = %target, key_hash = %crate::metrics::key_hash(&stored.hint.key), %why, "holding a hint until the wall clock catches up");
                break;
            }
            hints.push(stored);
        }
        Ok(hints)
    }

    /// Up to `limit` of `target`'s hints as stored: id, size, and bytes or
    /// why they cannot be read. When the engine finds one corrupt, the
    /// listing is read again hint by hint, so the others still come through.
    fn read(&self, target: MemberId, limit: usize) -> Result<Vec<ReadHint>> {
        let prefix = target.0.to_be_bytes();
        match self.storage.hints(&prefix, limit) {
            Ok(listed) => Ok(listed
                .into_iter()
                .map(|(id, bytes)| (id, bytes.len() as u64, Ok(bytes)))
                .collect()),
            Err(Error::CorruptRecord { .. }) => {
                let mut out = Vec::new();
                for (id, size) in self.storage.hint_ids(&prefix, limit)? {
                    let read = match self.storage.hints(&id, 1) {
                        Ok(mut one) => one
                            .pop()
                            .map(|(_, bytes)| bytes)
                            .ok_or_else(|| "hint vanished while read".to_string()),
                        Err(Error::CorruptRecord { why, .. }) => Err(why),
                        Err(other) => return Err(other),
                    };
                    out.push((id, size, read));
                }
                Ok(out)
            }
            Err(other) => Err(other),
        }
    }

    /// Deletes every hint held for `target` (no longer a cluster member),
    /// without reading them. Answers how many there were.
    #[cfg(test)]
    pub fn drop_target(&self, target: MemberId) -> Result<u64> {
        let mut dropped = 0;
        loop {
            let ids = self.storage.hint_ids(&target.0.to_be_bytes(), 1024)?;
            if ids.is_empty() {
                return Ok(dropped);
            }
            for (id, size) in ids {
                self.delete(&id, target, size, false)?;
                dropped += 1;
            }
        }
    }

    /// Deletes a hint (delivered, or not deliverable).
    pub fn remove(&self, stored: &StoredHint, delivered: bool) -> Result<()> {
        self.delete(&stored.id, stored.hint.target, stored.bytes, delivered)
    }

    fn delete(&self, id: &[u8], target: MemberId, size: u64, delivered: bool) -> Result<()> {
        self.storage.delete_hint(id)?;
        self.pending().sub(target, size);
        let count = if delivered {
            &self.delivered
        } else {
            &self.dropped
        };
        count.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
