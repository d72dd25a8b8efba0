//! The data quota (`--max-data-bytes`): like etcd's NOSPACE alarm, a node
//! whose data dir holds more than the quota refuses new values, still takes
//! deletes, copies of existing data (anti-entropy, hints, moves) and everything
//! else, says so in its status and log, and takes writes again by itself
//! once it is below the quota (deletes, then compaction, free the space).
//!
//! The size is what the data dir's files hold on disk (every engine,
//! hints and layouts included), measured every second. A coordinator
//! refuses a write before sending it (RESOURCE_EXHAUSTED, `not-applied`)
//! when fewer than W of the key's replicas have room as far as it knows
//! (its own measure, and its peers' from their heartbeats); a replica that
//! is full when the write arrives refuses it, and the coordinator reports
//! what it knows then (fewer than W stored it: outcome `unknown`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};

/// How often the data dir is measured.
const MEASURE_INTERVAL: Duration = Duration::from_secs(1);

/// The quota and this node's last measure.
pub struct DataQuota {
    /// `--max-data-bytes` (0: none).
    max_bytes: u64,
    bytes: AtomicU64,
    full: AtomicBool,
}

/// Whether `bytes` on disk are past a quota of `max_bytes` (0: none).
pub fn over_quota(bytes: u64, max_bytes: u64) -> bool {
    max_bytes > 0 && bytes >= max_bytes
}

/// The bytes the files under `dir` hold (symbolic links not followed;
/// files that vanish while walking are skipped).
pub fn bytes_under(dir: &Path) -> u64 {
    let mut total = 0;
    let mut pending: Vec<PathBuf> = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(metadata) = entry.metadata() else {
                continue;
            };
            if metadata.is_dir() {
                pending.push(entry.path());
            } else if metadata.is_file() {
                total += metadata.len();
            }
        }
    }
    total
}

impl DataQuota {
    pub fn new(max_bytes: u64) -> Self {
        Self {
            max_bytes,
            bytes: AtomicU64::new(0),
            full: AtomicBool::new(false),
        }
    }

    /// Bytes in the data dir at the last measure.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Whether this node refuses new values now.
    pub fn is_full(&self) -> bool {
        self.full.load(Ordering::Relaxed)
    }

    /// Refuses a new value while the node is over its quota.
    pub fn check_room(&self) -> Result<()> {
        if self.is_full() {
            return Err(Error::QuotaReached(format!(
                "this node's data dir holds {} bytes, at or over --max-data-bytes {}: new values \
                 are refused (deletes still work) until it is below again",
                self.bytes(),
                self.max_bytes
            )));
        }
        Ok(())
    }

    /// Takes a measure, logging when the node crosses its quota either way.
    pub fn record(&self, bytes: u64) {
        self.bytes.store(bytes, Ordering::Relaxed);
        let full = over_quota(bytes, self.max_bytes);
        if self.full.swap(full, Ordering::Relaxed) != full {
            if full {
                tracing::error!(
                    bytes,
                    max_data_bytes = self.max_bytes,
                    "data quota reached: the data dir holds {bytes} bytes, --max-data-bytes is {}; \
                     new values are refused (deletes still work) until it is below again",
                    self.max_bytes
                );
            } else {
                tracing::warn!(
                    bytes,
                    max_data_bytes = self.max_bytes,
                    "below the data quota again: writes are taken"
                );
            }
        }
    }

    /// Measures `dir` every second until `shutdown` (nothing to do without
    /// a quota).
    pub async fn watch(self: std::sync::Arc<Self>, dir: PathBuf, shutdown: CancellationToken) {
        if self.max_bytes == 0 {
            return;
        }
        loop {
            let measured = {
                let dir = dir.clone();
                crate::seams::blocking(move || bytes_under(&dir)).await
            };
            if let Ok(bytes) = measured {
                self.record(bytes);
            }
            tokio::select! {
                _ = tokio::time::sleep(MEASURE_INTERVAL) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_quota_is_never_full() {
        assert!(!over_quota(u64::MAX, 0));
        assert!(over_quota(100, 100));
        assert!(!over_quota(99, 100));
    }

    #[test]
    fn the_quota_refuses_then_resumes_by_itself() {
        let quota = DataQuota::new(1000);
        quota.record(10);
        assert!(quota.check_room().is_ok());
        quota.record(1000);
        let refused = quota.check_room().expect_err("full");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert_eq!(refused.outcome(), crate::error::Outcome::NotApplied);
        assert!(
            refused.to_string().contains("--max-data-bytes 1000"),
            "{refused}"
        );
        quota.record(999);
        assert!(quota.check_room().is_ok());
    }

    #[test]
    fn a_data_dir_is_measured_with_its_subdirectories() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("a"), vec![0u8; 1000]).expect("write");
        std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
        std::fs::write(dir.path().join("sub/b"), vec![0u8; 24]).expect("write");
        assert_eq!(bytes_under(dir.path()), 1024);
        assert_eq!(bytes_under(&dir.path().join("missing")), 0);
    }
}
