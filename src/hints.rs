//! Hinted handoff: writes held for a replica that is down.
//!
//! When a replica of a key is down (believed down by the failure detector, or
//! failing the write), the coordinator asks the next live node clockwise
//! beyond the key's preference list to keep the write as a *hint* for that
//! replica. The hint holder persists it and, once its failure detector sees
//! the replica up again, delivers it (an ordinary write-if-newer) and deletes
//! it. Hints are bounded in number (`--max-hints`) and age
//! (`--max-hint-age-secs`): a replica down longer than that is brought up to
//! date by anti-entropy instead.
//!
//! Hints never count towards W for ONE, QUORUM or ALL — a hint is not a
//! replica a read would consult, so counting it would break the no-stale-read
//! guarantee. Only `CONSISTENCY_ANY` accepts a stored hint as enough.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::clock::NodeId;
use crate::error::{Error, Result};
use crate::record::Record;
use crate::storage::Storage;

/// A write kept for a replica that was down.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hint {
    /// The replica the write is for.
    pub target: NodeId,
    /// The key written.
    pub key: String,
    /// The version and value written.
    pub record: Record,
    /// When the hint was stored, in milliseconds since the Unix epoch.
    pub created_ms: u64,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
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

    pub fn decode(target: NodeId, bytes: &[u8]) -> Result<Self, String> {
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
fn hint_id(target: NodeId, sequence: u64) -> Vec<u8> {
    let mut id = Vec::with_capacity(16);
    id.extend_from_slice(&target.to_be_bytes());
    id.extend_from_slice(&sequence.to_be_bytes());
    id
}

/// This node's persisted hints, with in-memory counts per target.
pub struct HintStore {
    /// Where hints live (beside the records, in the storage engine).
    storage: Arc<dyn Storage>,
    /// Next sequence number.
    next_sequence: AtomicU64,
    /// Hints held per target (std mutex: held for a map update).
    pending: Mutex<HashMap<NodeId, u64>>,
    /// Most hints held at once.
    max_hints: u64,
    /// Hints older than this are dropped, not delivered.
    pub max_age: Duration,
    /// Hints delivered since start.
    delivered: AtomicU64,
}

impl HintStore {
    /// Opens the store, counting the hints already on disk.
    pub fn open(storage: Arc<dyn Storage>, max_hints: u64, max_age: Duration) -> Result<Self> {
        let mut pending: HashMap<NodeId, u64> = HashMap::new();
        let mut max_sequence = 0u64;
        for (id, _) in storage.hints(&[], usize::MAX)? {
            if id.len() == 16 {
                let target = u64::from_be_bytes(id[..8].try_into().unwrap_or_default());
                let sequence = u64::from_be_bytes(id[8..].try_into().unwrap_or_default());
                *pending.entry(target).or_default() += 1;
                max_sequence = max_sequence.max(sequence);
            }
        }
        Ok(Self {
            storage,
            next_sequence: AtomicU64::new(max_sequence + 1),
            pending: Mutex::new(pending),
            max_hints,
            max_age,
            delivered: AtomicU64::new(0),
        })
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, u64>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hints held in all.
    pub fn len(&self) -> u64 {
        self.pending().values().sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    /// Targets with hints waiting.
    pub fn targets(&self) -> Vec<NodeId> {
        self.pending()
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(t, _)| *t)
            .collect()
    }

    /// Persists a hint; refuses when `--max-hints` are already held.
    pub fn store(&self, hint: &Hint) -> Result<()> {
        {
            let mut pending = self.pending();
            if pending.values().sum::<u64>() >= self.max_hints {
                return Err(Error::Unavailable(format!(
                    "hint store full ({} hints, --max-hints)",
                    self.max_hints
                )));
            }
            *pending.entry(hint.target).or_default() += 1;
        }
        let sequence = self.next_sequence.fetch_add(1, Ordering::Relaxed);
        let id = hint_id(hint.target, sequence);
        let dropped = self.storage.dropped_buffers();
        let stored = self
            .storage
            .put_hint(&id, &hint.encode())
            .and_then(|()| self.storage.flush())
            .and_then(|()| {
                // A full disk can drop it even when this flush succeeded.
                if self.storage.dropped_buffers() == dropped
                    || self
                        .storage
                        .hints(&id, 1)?
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
            self.forget(hint.target);
            return Err(error);
        }
        Ok(())
    }

    fn forget(&self, target: NodeId) {
        if let Some(count) = self.pending().get_mut(&target) {
            *count = count.saturating_sub(1);
        }
    }

    /// Up to `limit` of `target`'s hints, oldest first, with their ids.
    /// Undecodable ones are deleted and skipped.
    pub fn for_target(&self, target: NodeId, limit: usize) -> Result<Vec<(Vec<u8>, Hint)>> {
        let mut hints = Vec::new();
        for (id, bytes) in self.storage.hints(&target.to_be_bytes(), limit)? {
            match Hint::decode(target, &bytes) {
                Ok(hint) => hints.push((id, hint)),
                Err(why) => {
                    tracing::warn!(%why, "dropping a corrupt hint");
                    self.remove(&id, target, false)?;
                }
            }
        }
        Ok(hints)
    }

    /// Deletes a hint (delivered, or expired).
    pub fn remove(&self, id: &[u8], target: NodeId, delivered: bool) -> Result<()> {
        self.storage.delete_hint(id)?;
        self.forget(target);
        if delivered {
            self.delivered.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Version;
    use crate::storage::MemoryStorage;

    fn hint(target: NodeId, key: &str, created_ms: u64) -> Hint {
        Hint {
            target,
            key: key.into(),
            record: Record::value(Version::new(3, 4), &b"v"[..]),
            created_ms,
        }
    }

    #[test]
    fn hints_round_trip_and_reject_garbage() {
        let h = hint(9, "kéy", 1234);
        assert_eq!(Hint::decode(9, &h.encode()), Ok(h.clone()));
        let tombstone = Hint {
            record: Record::tombstone(Version::new(1, 1)),
            ..h.clone()
        };
        assert_eq!(Hint::decode(9, &tombstone.encode()), Ok(tombstone));
        assert!(Hint::decode(9, &[1, 2, 3]).is_err());
        let mut overrun = h.encode();
        overrun[8] = 200;
        assert!(Hint::decode(9, &overrun).is_err());
    }

    #[test]
    fn store_is_bounded_ordered_per_target_and_survives_reopen() {
        let storage = Arc::new(MemoryStorage::new());
        let store = HintStore::open(storage.clone(), 3, Duration::from_secs(60)).expect("open");
        store.store(&hint(1, "a", 1)).expect("store");
        store.store(&hint(2, "b", 2)).expect("store");
        store.store(&hint(1, "c", 3)).expect("store");
        assert!(
            store.store(&hint(1, "d", 4)).is_err(),
            "--max-hints reached"
        );
        assert_eq!(store.len(), 3);
        let for_one: Vec<String> = store
            .for_target(1, 10)
            .expect("list")
            .into_iter()
            .map(|(_, h)| h.key)
            .collect();
        assert_eq!(for_one, ["a", "c"]);
        let reopened = HintStore::open(storage, 3, Duration::from_secs(60)).expect("reopen");
        assert_eq!(reopened.len(), 3);
        let (id, first) = reopened.for_target(1, 1).expect("list").remove(0);
        reopened.remove(&id, first.target, true).expect("remove");
        assert_eq!(reopened.len(), 2);
        assert_eq!(reopened.delivered(), 1);
        reopened.store(&hint(2, "e", 5)).expect("room again");
        let mut targets = reopened.targets();
        targets.sort();
        assert_eq!(targets, [1, 2]);
    }

    #[test]
    fn expiry_by_age() {
        let h = hint(1, "a", 1_000);
        assert!(!h.expired(2_000, Duration::from_secs(1)));
        assert!(h.expired(2_001, Duration::from_secs(1)));
    }
}
