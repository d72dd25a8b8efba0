//! The write-if-newer rule: [`ReplicaStore::write_if_newer`] stores a
//! record only if its version is newer than the one held, under the key's
//! stripe; [`ReplicaStore::write_many`] flushes a batch once (group commit)
//! and takes a write the engine then dropped back out of the counts and
//! digests. Also the conditional delete that purges a collected tombstone.

use std::sync::atomic::Ordering;

use super::{ReplicaStore, storage_key};
use crate::clock::Version;
use crate::error::{Error, Result};
use crate::record::Record;
use crate::storage::Held;

/// The result of a conditional write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteOutcome {
    /// True when this call stored the record.
    pub applied: bool,
    /// The version held after the call (the record's own when applied or
    /// already held; a newer one when refused).
    pub held: Version,
}

/// A write [`ReplicaStore::apply`] handled, and what the key held before.
struct Applied {
    outcome: WriteOutcome,
    /// What the key held before (to undo the counts if the engine drops
    /// the write).
    before: Option<Held>,
}

/// A batch's flush error, for each of its writes (errors are not `Clone`).
fn flush_error(error: &Error) -> Error {
    match error {
        Error::DiskFull { dir, why } => Error::DiskFull {
            dir: dir.clone(),
            why: why.clone(),
        },
        other => Error::Storage(other.to_string()),
    }
}

impl ReplicaStore {
    /// Removes `key` if it still holds exactly the tombstone `version`.
    /// Answers whether it did.
    pub fn purge_tombstone(&self, key: &str, version: Version) -> Result<bool> {
        let _stripe = self.stripe(key);
        let stored = storage_key(key);
        let Some(held) = self.storage.get(&stored)? else {
            return Ok(false);
        };
        if !held.is_tombstone() || held.version != version {
            return Ok(false);
        }
        let dropped = self.storage.dropped_buffers();
        self.storage.delete(&stored)?;
        self.storage.flush()?;
        if self.storage.dropped_buffers() != dropped
            && self.storage.held(&stored)?.map(|h| h.version) == Some(version)
        {
            // The delete was dropped with a buffer: the tombstone stays.
            return Ok(false);
        }
        self.tombstones.fetch_sub(1, Ordering::Relaxed);
        self.update_digest(key, Some(Held::of(&held)), None);
        Ok(true)
    }

    /// Stores `record` if it is newer than what this replica holds.
    pub fn write_if_newer(&self, key: &str, record: &Record) -> Result<WriteOutcome> {
        let mut results = self.write_many([(key, record)]);
        results
            .pop()
            .unwrap_or_else(|| Err(Error::Internal("no result for a write".into())))
    }

    /// [`ReplicaStore::write_if_newer`] for many writes, with one flush to
    /// the operating system for all of them (group commit): no outcome is
    /// returned before every applied write is flushed.
    pub fn write_many<'a>(
        &self,
        writes: impl IntoIterator<Item = (&'a str, &'a Record)>,
    ) -> Vec<Result<WriteOutcome>> {
        let dropped = self.storage.dropped_buffers();
        let applied: Vec<(&str, &Record, Result<Applied>)> = writes
            .into_iter()
            .map(|(key, record)| (key, record, self.apply(key, record)))
            .collect();
        let flushed = self.storage.flush();
        // A full disk makes the engine drop buffered writes — maybe ours,
        // even when our own flush found nothing left to write.
        let dropped = self.storage.dropped_buffers() != dropped;
        applied
            .into_iter()
            .map(|(key, record, result)| {
                let applied = result?;
                // Also when it was "already held" at this version: the
                // entry that held it may be the one another flush dropped.
                let holds = applied.outcome.applied || applied.outcome.held == record.version;
                if holds && dropped {
                    let stored = storage_key(key);
                    if let Some(error) = self.storage.lost_write(&stored, record.version) {
                        if applied.outcome.applied {
                            // Not stored: undo what it changed in counts and digests.
                            self.undo_transition(key, applied.before, record);
                        }
                        return Err(error);
                    }
                }
                match &flushed {
                    Ok(()) => Ok(applied.outcome),
                    Err(error) => Err(flush_error(error)),
                }
            })
            .collect()
    }

    /// Stores `record` if newer, without flushing.
    fn apply(&self, key: &str, record: &Record) -> Result<Applied> {
        // Callers convert at the door (pb.rs); this is the last line.
        self.bound.refuse_now(record.version, "")?;
        self.observe(record.version);
        let _stripe = self.stripe(key);
        let stored = storage_key(key);
        let held = match self.storage.held(&stored) {
            Err(Error::CorruptRecord { why, .. }) => {
                tracing::warn!(key_hash = %crate::metrics::key_hash(key), %why, "overwriting a corrupt record");
                None
            }
            Ok(Some(held)) if self.check_held(key, held.version).is_err() => {
                tracing::warn!(key_hash = %crate::metrics::key_hash(key), version = %held.version, "overwriting a record with an impossible version");
                // Its digest contribution must still be removed.
                return self.replace_future_record(key, &stored, held, record);
            }
            other => other?,
        };
        if let Some(held) = held
            && held.version >= record.version
        {
            return Ok(Applied {
                outcome: WriteOutcome {
                    applied: false,
                    held: held.version,
                },
                before: Some(held),
            });
        }
        self.storage.put(&stored, record)?;
        self.count_transition(held, record);
        self.update_digest(key, held, Some(Held::of(record)));
        Ok(Applied {
            outcome: WriteOutcome {
                applied: true,
                held: record.version,
            },
            before: held,
        })
    }

    /// Takes back what [`ReplicaStore::apply`] changed in the key counts
    /// and range digests for a write the engine then dropped. (Counts and
    /// digests compose by addition and XOR, so the order of undoing among
    /// concurrent writes does not matter.)
    fn undo_transition(&self, key: &str, before: Option<Held>, after: &Record) {
        if after.is_tombstone() {
            self.tombstones.fetch_sub(1, Ordering::Relaxed);
        } else {
            self.live_keys.fetch_sub(1, Ordering::Relaxed);
        }
        match before {
            Some(before) if before.tombstone => self.tombstones.fetch_add(1, Ordering::Relaxed),
            Some(_) => self.live_keys.fetch_add(1, Ordering::Relaxed),
            None => 0,
        };
        self.update_digest(key, Some(Held::of(after)), before);
    }

    /// Replaces a stored record whose version is beyond the skew bound.
    fn replace_future_record(
        &self,
        key: &str,
        stored: &[u8],
        held: Held,
        record: &Record,
    ) -> Result<Applied> {
        self.storage.put(stored, record)?;
        self.count_transition(Some(held), record);
        self.update_digest(key, Some(held), Some(Held::of(record)));
        Ok(Applied {
            outcome: WriteOutcome {
                applied: true,
                held: record.version,
            },
            before: Some(held),
        })
    }

    fn count_transition(&self, before: Option<Held>, after: &Record) {
        match before {
            Some(before) if before.tombstone => self.tombstones.fetch_sub(1, Ordering::Relaxed),
            Some(_) => self.live_keys.fetch_sub(1, Ordering::Relaxed),
            None => 0,
        };
        if after.is_tombstone() {
            self.tombstones.fetch_add(1, Ordering::Relaxed);
        } else {
            self.live_keys.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::clock::{InstanceId, SkewBound, wall_clock_ms};
    use crate::replica::tests::{ring, store};
    use crate::ring::key_hash;
    use crate::storage::{MemoryStorage, Storage};

    #[test]
    fn stores_only_newer_versions_and_reports_what_it_holds() {
        let (_, replica) = store();
        let v5 = Record::value(Version::new(5, 2), &b"five"[..]);
        let v3 = Record::value(Version::new(3, 2), &b"three"[..]);
        let outcome = replica.write_if_newer("k", &v5).expect("write");
        assert_eq!(
            outcome,
            WriteOutcome {
                applied: true,
                held: v5.version
            }
        );
        let outcome = replica.write_if_newer("k", &v3).expect("write");
        assert_eq!(
            outcome,
            WriteOutcome {
                applied: false,
                held: v5.version
            }
        );
        // Same version again: not applied, but held (counts as an ack).
        let outcome = replica.write_if_newer("k", &v5).expect("write");
        assert_eq!(
            outcome,
            WriteOutcome {
                applied: false,
                held: v5.version
            }
        );
        assert_eq!(replica.read("k").expect("read"), Some(v5));
    }

    #[test]
    fn a_genuine_record_beyond_the_bound_still_wins_over_older_versions() {
        // Review finding: after the wall clock stepped back, a real record
        // looked like a future one and an older version replaced it.
        let storage = Arc::new(MemoryStorage::new());
        let newer = Record::value(
            Version::new(crate::clock::hlc_of_ms(wall_clock_ms() + 2_000), 9),
            &b"new"[..],
        );
        storage.put(&storage_key("k"), &newer).expect("put");
        let replica = ReplicaStore::open(InstanceId(1), storage, ring(), SkewBound::new(1_000))
            .expect("open");
        assert_eq!(replica.stats().future_records, 0);
        let older = Record::value(
            Version::new(crate::clock::hlc_of_ms(wall_clock_ms()), 9),
            &b"old"[..],
        );
        let outcome = replica.write_if_newer("k", &older).expect("write");
        assert!(!outcome.applied);
        assert_eq!(outcome.held, newer.version);
        assert_eq!(replica.read("k").expect("read"), Some(newer));
    }

    #[test]
    fn counts_follow_values_and_tombstones() {
        let (_, replica) = store();
        replica
            .write_if_newer("a", &Record::value(Version::new(1, 1), &b"x"[..]))
            .expect("write");
        replica
            .write_if_newer("b", &Record::value(Version::new(1, 1), &b"x"[..]))
            .expect("write");
        replica
            .write_if_newer("a", &Record::tombstone(Version::new(2, 1)))
            .expect("write");
        assert_eq!(
            (replica.stats().live_keys, replica.stats().tombstones),
            (1, 1)
        );
        replica
            .write_if_newer("a", &Record::value(Version::new(3, 1), &b"y"[..]))
            .expect("write");
        assert_eq!(
            (replica.stats().live_keys, replica.stats().tombstones),
            (2, 0)
        );
    }

    #[test]
    fn purging_removes_only_the_exact_tombstone() {
        let (_, replica) = store();
        let tombstone = Record::tombstone_at(Version::new(5, 1), 10);
        replica.write_if_newer("gone", &tombstone).expect("delete");
        replica
            .write_if_newer("kept", &Record::value(Version::new(5, 1), &b"v"[..]))
            .expect("write");
        assert_eq!(replica.old_tombstones(9, &[], 10).expect("scan").0, vec![]);
        assert_eq!(
            replica.old_tombstones(10, &[], 10).expect("scan").0,
            vec![("gone".to_string(), tombstone.version)]
        );
        assert!(
            !replica
                .purge_tombstone("gone", Version::new(4, 1))
                .expect("purge"),
            "other version"
        );
        assert!(
            !replica
                .purge_tombstone("kept", Version::new(5, 1))
                .expect("purge"),
            "not a tombstone"
        );
        let range = replica.digest_ring().range_of(key_hash(b"gone"));
        let before = replica.range_digest(range);
        assert!(
            replica
                .purge_tombstone("gone", tombstone.version)
                .expect("purge")
        );
        assert_eq!(replica.read("gone").expect("read"), None);
        assert_eq!(replica.stats().tombstones, 0);
        assert_ne!(replica.range_digest(range), before);
    }
}
