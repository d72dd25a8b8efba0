//! The layout on disk: `<data-dir>/layout`, the layout this node serves and
//! its Paxos acceptor state, written whole (temporary file, fsync, rename,
//! fsync of the directory) before any answer depends on it.
//!
//! Format: the magic `DKVSLAYOUT1\n`, the length of the protobuf
//! `LayoutState` (u32, little-endian), the bytes, and their xxh3 (u64,
//! little-endian). A damaged file stops the node with a message saying
//! what to do; it is never half-read. The digits before the newline are
//! the format version: a file of another version (a newer release's) is
//! refused as such, not as damage.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use prost::Message;

use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::layout::paxos::LayoutState;
use crate::locks::Locked;
use crate::pb;

const MAGIC: &[u8] = b"DKVSLAYOUT1\n";
/// What every format version's magic starts with.
const MAGIC_NAME: &[u8] = b"DKVSLAYOUT";
/// A layout of 1024 members with 4096 tokens each is ~40 MB; refuse more.
const MAX_BYTES: usize = 64 << 20;

/// Where the layout state lives: a file in the data dir, or memory (nodes
/// built over an in-memory engine). Clones share the same state, so a
/// simulation can keep a node's layout across a simulated crash.
#[derive(Clone)]
pub struct LayoutStore {
    path: Option<PathBuf>,
    memory: Arc<Mutex<Option<Vec<u8>>>>,
}

impl LayoutStore {
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            path: Some(dir.join("layout")),
            memory: Arc::default(),
        }
    }

    pub fn in_memory() -> Self {
        Self {
            path: None,
            memory: Arc::default(),
        }
    }

    /// The stored state; `None` when nothing was ever stored.
    pub fn load(&self) -> Result<Option<LayoutState>> {
        let bytes = match &self.path {
            None => self.memory.locked().clone(),
            Some(path) => match std::fs::read(path) {
                Ok(bytes) => Some(bytes),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => {
                    return Err(Error::Storage(format!(
                        "cannot read {}: {e}",
                        path.display()
                    )));
                }
            },
        };
        let Some(bytes) = bytes else {
            return Ok(None);
        };
        let place = self
            .path
            .as_ref()
            .map_or("the in-memory layout".to_string(), |p| {
                p.display().to_string()
            });
        if let Some(version) = other_version(&bytes) {
            return Err(Error::Storage(format!(
                "{place} is a layout file of format version {version}, and this release reads \
                 version 1: a newer DKVS release wrote it (downgrades are not supported; run that \
                 release), or the file is damaged"
            )));
        }
        decode(&bytes).map(Some).map_err(|why| {
            Error::Storage(format!(
                "{place} is damaged ({why}); this node cannot know which layout it served. \
                 Once no layout change is in progress (DKVSClient cluster wait), move the file \
                 away and restart the node with --join SEED (any live member) to fetch the \
                 layout from the cluster"
            ))
        })
    }

    /// Stores `state` durably (replacing what was stored).
    pub fn save(&self, state: &LayoutState) -> Result<()> {
        let bytes = encode(state);
        let Some(path) = &self.path else {
            *self.memory.locked() = Some(bytes);
            return Ok(());
        };
        let failed = |what: &str, e: std::io::Error| {
            Error::Storage(format!("cannot {what} {}: {e}", path.display()))
        };
        let temporary = path.with_extension("tmp");
        {
            use std::io::Write;
            let mut file = std::fs::File::create(&temporary).map_err(|e| failed("create", e))?;
            file.write_all(&bytes).map_err(|e| failed("write", e))?;
            file.sync_all().map_err(|e| failed("fsync", e))?;
        }
        std::fs::rename(&temporary, path).map_err(|e| failed("rename into", e))?;
        if let Some(dir) = path.parent()
            && let Ok(dir) = std::fs::File::open(dir)
        {
            dir.sync_all()
                .map_err(|e| failed("fsync the directory of", e))?;
        }
        Ok(())
    }
}

fn encode(state: &LayoutState) -> Vec<u8> {
    let body = pb::LayoutState::from(state).encode_to_vec();
    let mut out = Vec::with_capacity(MAGIC.len() + 12 + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(&body).to_le_bytes());
    out
}

/// The format version a layout file names, when it names one other than
/// 1: `DKVSLAYOUT`, up to 8 digits, a newline.
fn other_version(bytes: &[u8]) -> Option<String> {
    let rest = bytes.strip_prefix(MAGIC_NAME)?;
    let end = rest.iter().take(9).position(|&b| b == b'\n')?;
    let digits = &rest[..end];
    let known = &MAGIC[MAGIC_NAME.len()..MAGIC.len() - 1];
    (!digits.is_empty() && digits.iter().all(u8::is_ascii_digit) && digits != known)
        .then(|| String::from_utf8_lossy(digits).into_owned())
}

fn decode(bytes: &[u8]) -> std::result::Result<LayoutState, String> {
    let rest = bytes
        .strip_prefix(MAGIC)
        .ok_or("it does not start with DKVSLAYOUT1")?;
    let (length, rest) = rest
        .split_at_checked(4)
        .ok_or("it ends inside its header")?;
    let length = u32::from_le_bytes(length.try_into().map_err(|_| "bad length")?) as usize;
    if length > MAX_BYTES {
        return Err(format!("it claims {length} bytes"));
    }
    if rest.len() != length + 8 {
        return Err(format!(
            "it holds {} bytes after its header, not {}",
            rest.len(),
            length + 8
        ));
    }
    let (body, checksum) = rest.split_at(length);
    let checksum = u64::from_le_bytes(checksum.try_into().map_err(|_| "bad checksum")?);
    if xxhash_rust::xxh3::xxh3_64(body) != checksum {
        return Err("checksum mismatch".into());
    }
    let state = pb::LayoutState::decode(body).map_err(|e| format!("undecodable: {e}"))?;
    pb::layout_state_from(state)
}

/// What a proposal names as the layout it changes: the xxh3 of the
/// layout's protobuf encoding (the same on every node and release, so
/// acceptors of mixed versions agree).
pub fn layout_hash(layout: &Layout) -> u64 {
    xxhash_rust::xxh3::xxh3_64(&pb::Layout::from(layout).encode_to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::Layout;
    use crate::layout::paxos::{Acceptor, Ballot};

    fn state() -> LayoutState {
        let layout = Layout::bootstrap(&["127.0.0.1:1".into(), "127.0.0.1:2".into()], 3, 8);
        let next = layout.begin_join("127.0.0.1:3").expect("join");
        LayoutState {
            adopted: crate::layout::verify::AdoptedHashes::from_pairs(vec![(1, 11), (2, 22)]),
            committed: Some(layout),
            acceptor: Acceptor {
                version: 2,
                promised: Ballot {
                    round: 4,
                    proposer: 9,
                },
                accepted: Some((
                    Ballot {
                        round: 3,
                        proposer: 9,
                    },
                    next,
                )),
            },
        }
    }

    #[test]
    fn a_saved_state_loads_back_from_disk_and_memory() {
        let dir = std::env::temp_dir().join(format!("dkvs-layout-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let store = LayoutStore::in_dir(&dir);
        assert_eq!(store.load().expect("empty"), None);
        store.save(&state()).expect("save");
        assert_eq!(store.load().expect("load"), Some(state()));
        let memory = LayoutStore::in_memory();
        memory.save(&state()).expect("save");
        assert_eq!(memory.load().expect("load"), Some(state()));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn every_flipped_byte_and_every_truncation_is_refused() {
        let bytes = encode(&state());
        for i in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[i] ^= 0x20;
            assert!(decode(&damaged).is_err(), "flipped byte {i} was accepted");
        }
        for cut in 0..bytes.len() {
            assert!(
                decode(&bytes[..cut]).is_err(),
                "truncation at {cut} was accepted"
            );
        }
        let store = LayoutStore::in_memory();
        *store.memory.locked() = Some(bytes[..bytes.len() - 1].to_vec());
        let refused = store.load().expect_err("damaged").to_string();
        assert!(refused.contains("--join"), "{refused}");
    }

    #[test]
    fn a_layout_of_another_format_version_is_refused_as_such() {
        let mut bytes = encode(&state());
        assert_eq!(other_version(&bytes), None);
        bytes[MAGIC.len() - 2] = b'2';
        assert_eq!(other_version(&bytes).as_deref(), Some("2"));
        let mut longer = b"DKVSLAYOUT12\n".to_vec();
        longer.extend_from_slice(&bytes[MAGIC.len()..]);
        assert_eq!(other_version(&longer).as_deref(), Some("12"));
        let store = LayoutStore::in_memory();
        *store.memory.locked() = Some(bytes);
        let refused = store.load().expect_err("another version").to_string();
        assert!(refused.contains("format version 2"), "{refused}");
    }
}
