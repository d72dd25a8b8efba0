//! An in-memory [`Storage`] for unit tests and the simulation: `BTreeMap`s
//! behind mutexes, and what was last synced, so that a simulated crash
//! ([`MemoryStorage::crash`]) loses exactly what a real disk could.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::Storage;
use crate::error::{Error, Result};
use crate::locks::Locked;
use crate::record::Record;

/// Data lives only as long as the value.
#[derive(Debug, Default)]
pub struct MemoryStorage {
    /// Encoded records, exactly as a disk engine would hold them.
    data: Mutex<BTreeMap<Vec<u8>, Vec<u8>>>,
    /// Metadata numbers.
    meta: Mutex<BTreeMap<String, u64>>,
    /// Hints by id.
    hints: Mutex<BTreeMap<Vec<u8>, Vec<u8>>>,
    /// Records and hints as of the last `sync` (metadata is durable as it
    /// is written): what survives [`MemoryStorage::crash`].
    synced: Mutex<Synced>,
}

#[derive(Debug, Default, Clone)]
struct Synced {
    data: BTreeMap<Vec<u8>, Vec<u8>>,
    meta: BTreeMap<String, u64>,
    hints: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl MemoryStorage {
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets everything written since the last `sync`, as a machine that
    /// lost power would (the simulation's crash).
    pub fn crash(&self) {
        let synced = self.synced.locked().clone();
        *self.data.locked() = synced.data;
        *self.meta.locked() = synced.meta;
        *self.hints.locked() = synced.hints;
    }

    /// Stores raw bytes under a key, to test how corrupt data is handled.
    pub fn put_raw(&self, key: &[u8], bytes: Vec<u8>) {
        self.data.locked().insert(key.to_vec(), bytes);
    }
}

// A poisoned lock only means another test thread panicked mid-operation; the
// map itself is still consistent, so carry on with it.
impl Storage for MemoryStorage {
    fn get(&self, key: &[u8]) -> Result<Option<Record>> {
        self.data
            .locked()
            .get(key)
            .map(|bytes| {
                Record::decode(bytes).map_err(|e| Error::CorruptRecord {
                    key: String::from_utf8_lossy(key).into_owned(),
                    why: e.0,
                })
            })
            .transpose()
    }

    fn put(&self, key: &[u8], record: &Record) -> Result<()> {
        self.data.locked().insert(key.to_vec(), record.encode());
        Ok(())
    }

    fn for_each(
        &self,
        visit: &mut dyn FnMut(&[u8], &Record),
        corrupt: &mut dyn FnMut(&[u8], String),
    ) -> Result<()> {
        for (key, bytes) in self.data.locked().iter() {
            match Record::decode(bytes) {
                Ok(record) => visit(key, &record),
                Err(error) => corrupt(key, error.to_string()),
            }
        }
        Ok(())
    }

    fn scan(
        &self,
        from: &[u8],
        to: Option<&[u8]>,
        visit: &mut dyn FnMut(&[u8], &Record),
    ) -> Result<()> {
        let data = self.data.locked();
        for (key, bytes) in data.range(from.to_vec()..) {
            if to.is_some_and(|to| key.as_slice() >= to) {
                break;
            }
            if let Ok(record) = Record::decode(bytes) {
                visit(key, &record);
            }
        }
        Ok(())
    }

    fn scan_while(
        &self,
        from: &[u8],
        to: Option<&[u8]>,
        visit: &mut dyn FnMut(&[u8], &Record) -> bool,
    ) -> Result<()> {
        let data = self.data.locked();
        for (key, bytes) in data.range(from.to_vec()..) {
            if to.is_some_and(|to| key.as_slice() >= to) {
                break;
            }
            if let Ok(record) = Record::decode(bytes)
                && !visit(key, &record)
            {
                break;
            }
        }
        Ok(())
    }

    fn delete(&self, key: &[u8]) -> Result<()> {
        self.data.locked().remove(key);
        Ok(())
    }

    fn get_meta(&self, name: &str) -> Result<Option<u64>> {
        Ok(self.meta.locked().get(name).copied())
    }

    fn put_meta_durable(&self, name: &str, value: u64) -> Result<()> {
        self.meta.locked().insert(name.to_string(), value);
        self.synced.locked().meta.insert(name.to_string(), value);
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        let data = self.data.locked().clone();
        let hints = self.hints.locked().clone();
        let mut synced = self.synced.locked();
        synced.data = data;
        synced.hints = hints;
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn put_hint(&self, id: &[u8], bytes: &[u8]) -> Result<()> {
        self.hints.locked().insert(id.to_vec(), bytes.to_vec());
        Ok(())
    }

    fn delete_hint(&self, id: &[u8]) -> Result<()> {
        self.hints.locked().remove(id);
        Ok(())
    }

    fn hints(&self, prefix: &[u8], limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        Ok(self
            .hints
            .locked()
            .range(prefix.to_vec()..)
            .take_while(|(id, _)| id.starts_with(prefix))
            .take(limit)
            .map(|(id, bytes)| (id.clone(), bytes.clone()))
            .collect())
    }

    fn hint_ids(&self, prefix: &[u8], limit: usize) -> Result<Vec<(Vec<u8>, u64)>> {
        Ok(self
            .hints
            .locked()
            .range(prefix.to_vec()..)
            .take_while(|(id, _)| id.starts_with(prefix))
            .take(limit)
            .map(|(id, bytes)| (id.clone(), bytes.len() as u64))
            .collect())
    }
}
