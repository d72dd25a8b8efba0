//! Local storage: a small trait over an embedded engine.
//!
//! The replica logic ([`crate::replica`]) needs only point reads, point
//! writes, one full scan at start-up (to count keys and recover the clock),
//! a little metadata, and a way to force data to disk. Keeping the trait that
//! small lets unit tests run on [`MemoryStorage`] and production on
//! [`LogStorage`] (an append-only log with an in-memory key index, the
//! default) or [`FjallStorage`] (an LSM tree with a write-ahead journal);
//! see `docs/STORAGE.md` for the choice.
//!
//! Compare-and-set ("write if newer") is *not* the engine's job: the replica
//! serialises writes per key itself, so any engine with durable point writes
//! will do.

#[cfg(test)]
pub mod conformance;
pub mod data_dir;
mod fjall_engine;
mod log;
mod memory;

pub use fjall_engine::FjallStorage;
pub use log::LogStorage;
pub use memory::MemoryStorage;

use std::sync::OnceLock;

use crate::clock::Version;
use crate::error::{Error, Result};
use crate::record::Record;

/// What happens after an fsync failed (see [`fatal`]).
static ON_FATAL: OnceLock<fn(&str)> = OnceLock::new();

/// Makes [`fatal`] call `handler` (once per process; later calls are
/// ignored). `DKVSServer` installs [`exit_on_fatal`].
pub fn set_fatal_handler(handler: fn(&str)) {
    let _ = ON_FATAL.set(handler);
}

/// The fatal handler of `DKVSServer`: the reason on stderr, exit status 1,
/// no destructors and no final sync.
pub fn exit_on_fatal(why: &str) {
    eprintln!("DKVSServer: stopping: {why}");
    std::process::exit(1);
}

/// Reports an error after which the engine's data on disk is unknown — a
/// failed fsync — and answers the error to return. The engine refuses every
/// later operation; [`set_fatal_handler`]'s handler (`DKVSServer`: exit
/// non-zero) runs.
///
/// Why not retry: on Linux a failed fsync may drop the dirty pages it could
/// not write and mark them clean, so a retry "succeeds" with the data gone
/// ("fsyncgate", 2018). etcd and PostgreSQL stop the process instead; so
/// does DKVS. After the restart, replay reads what is really on disk, and
/// read repair, hints and anti-entropy bring back the rest from the other
/// replicas.
pub(crate) fn fatal(why: String) -> Error {
    tracing::error!(%why, "storage can no longer be trusted: stopping the node");
    if let Some(handler) = ON_FATAL.get() {
        handler(&why);
    }
    Error::Storage(why)
}

/// The error every operation of an engine answers after [`fatal`].
pub(crate) fn refused_after_fatal(why: &str) -> Error {
    Error::Storage(format!(
        "refusing: an earlier fsync failed ({why}); the node must be restarted"
    ))
}

/// Which engine a node stores its data in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Engine {
    /// [`LogStorage`]: an append-only log with every key indexed in memory
    /// (Bitcask). Fastest; needs memory for every key (not every value).
    Log,
    /// [`FjallStorage`]: an LSM tree. Keys need not fit in memory; slower
    /// writes (about 40% more CPU per quorum write, and longer tails).
    Fjall,
}

/// What write-if-newer needs to know of the record held for a key: its
/// version, and whether it is a tombstone (for key counts and range digests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Held {
    pub version: Version,
    pub tombstone: bool,
}

impl Held {
    pub fn of(record: &Record) -> Self {
        Self {
            version: record.version,
            tombstone: record.is_tombstone(),
        }
    }
}

/// When a write is forced to stable storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FsyncPolicy {
    /// fsync every write before it is acknowledged (like etcd, or Cassandra's
    /// `commitlog_sync: batch`). Survives power loss; slowest.
    Always,
    /// Hand every write to the operating system before it is acknowledged
    /// (survives a crash or SIGKILL of the node) and fsync in the background
    /// every `--fsync-interval-ms` (like Cassandra's `periodic` and Redis'
    /// `appendfsync everysec`). A power loss can lose the last interval on
    /// this node; the other replicas still hold those writes.
    Periodic,
}

/// An embedded key → [`Record`] store.
/// Storage key of `key`: its ring hash (8 bytes, big-endian) then the key,
/// so that storage order is ring order and a token range is a key range.
pub fn storage_key(key: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + key.len());
    out.extend_from_slice(&crate::ring::key_hash(key.as_bytes()).to_be_bytes());
    out.extend_from_slice(key.as_bytes());
    out
}

pub trait Storage: Send + Sync + 'static {
    /// The record stored under `key`.
    fn get(&self, key: &[u8]) -> Result<Option<Record>>;

    /// The version held under `key` (an engine that indexes versions in
    /// memory answers without reading the value).
    fn held(&self, key: &[u8]) -> Result<Option<Held>> {
        Ok(self.get(key)?.as_ref().map(Held::of))
    }

    /// Stores `record` under `key`, replacing what was there. After the next
    /// [`Storage::flush`] the write survives a crash of the process (under
    /// [`FsyncPolicy::Always`], of the machine).
    fn put(&self, key: &[u8], record: &Record) -> Result<()>;

    /// Hands every buffered write to the operating system (and under
    /// [`FsyncPolicy::Always`] fsyncs it): from here on they survive a crash
    /// or SIGKILL of the process. One call covers any number of writes
    /// (group commit).
    fn flush(&self) -> Result<()>;

    /// Visits every stored record. Records that cannot be decoded are
    /// reported through `corrupt` and skipped.
    fn for_each(
        &self,
        visit: &mut dyn FnMut(&[u8], &Record),
        corrupt: &mut dyn FnMut(&[u8], String),
    ) -> Result<()>;

    /// Visits the records whose storage keys are in `from..to` (`to: None`
    /// = to the end), in key order; undecodable ones are skipped.
    fn scan(
        &self,
        from: &[u8],
        to: Option<&[u8]>,
        visit: &mut dyn FnMut(&[u8], &Record),
    ) -> Result<()>;

    /// Like [`Storage::scan`], but `visit` answers whether to go on: once it
    /// answers `false` the scan stops and reads no further records. What a
    /// bounded listing (one page of a range) uses, so its cost follows the
    /// page, not the range.
    fn scan_while(
        &self,
        from: &[u8],
        to: Option<&[u8]>,
        visit: &mut dyn FnMut(&[u8], &Record) -> bool,
    ) -> Result<()> {
        // Correct for any engine, but reads the whole range: every engine
        // here overrides it.
        let mut going = true;
        self.scan(from, to, &mut |key, record| {
            if going {
                going = visit(key, record);
            }
        })
    }

    /// Visits what each stored record holds — all that start-up needs for
    /// key counts, range digests and the clock. An engine that keeps
    /// versions in memory answers without reading any value.
    fn for_each_held(
        &self,
        visit: &mut dyn FnMut(&[u8], Held),
        corrupt: &mut dyn FnMut(&[u8], String),
    ) -> Result<()> {
        self.for_each(&mut |key, record| visit(key, Held::of(record)), corrupt)
    }

    /// Visits the stored tombstones (tombstone collection looks for old
    /// ones every round; an engine that knows which keys hold tombstones
    /// reads only those).
    fn for_each_tombstone(&self, visit: &mut dyn FnMut(&[u8], &Record)) -> Result<()> {
        self.for_each(
            &mut |key, record| {
                if record.is_tombstone() {
                    visit(key, record);
                }
            },
            &mut |_, _| {},
        )
    }

    /// Removes `key` (used to purge tombstones).
    fn delete(&self, key: &[u8]) -> Result<()>;

    /// A named number kept beside the data (e.g. the clock's ceiling).
    fn get_meta(&self, name: &str) -> Result<Option<u64>>;

    /// Stores a named number and fsyncs it before returning.
    fn put_meta_durable(&self, name: &str, value: u64) -> Result<()>;

    /// Forces every write so far to stable storage.
    fn sync(&self) -> Result<()>;

    /// Stores a hint (see [`crate::hints`]) under `id`.
    fn put_hint(&self, id: &[u8], bytes: &[u8]) -> Result<()>;

    /// Deletes the hint stored under `id`.
    fn delete_hint(&self, id: &[u8]) -> Result<()>;

    /// Up to `limit` hints whose id starts with `prefix`, in id order.
    fn hints(&self, prefix: &[u8], limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>>;

    /// Up to `limit` hint ids starting with `prefix`, in id order, each with
    /// the length of the bytes stored under it (exactly as passed to
    /// [`Storage::put_hint`]). Opening the hint store needs only these: an
    /// engine that indexes hints in memory answers without reading any hint.
    ///
    /// This default is correct for any engine but reads every listed hint,
    /// and holds them all at once: engines override it.
    fn hint_ids(&self, prefix: &[u8], limit: usize) -> Result<Vec<(Vec<u8>, u64)>> {
        Ok(self
            .hints(prefix, limit)?
            .into_iter()
            .map(|(id, bytes)| (id, bytes.len() as u64))
            .collect())
    }

    /// Damaged stretches of the data files skipped when the engine opened
    /// (each cost the entries in it; other replicas repair them). Engines
    /// that do not count them answer 0.
    fn damaged_entries_skipped(&self) -> u64 {
        0
    }

    /// How many times, since start, the engine could not write buffered
    /// writes (a full disk) and dropped them, putting its index back as it
    /// was. A caller that notes this before its writes and sees it change
    /// by the end of its flush asks [`Storage::lost_write`] which of them
    /// were dropped — possibly while its own flush succeeded. Engines that
    /// never drop writes answer 0.
    fn dropped_buffers(&self) -> u64 {
        0
    }

    /// Whether the write of `version` under `key` was dropped (see
    /// [`Storage::dropped_buffers`]), and the error that dropped it.
    fn lost_write(&self, _key: &[u8], _version: Version) -> Option<Error> {
        None
    }
}
