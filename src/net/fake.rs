//! A scripted replica for unit tests of the quorum shell (test builds only).
//!
//! A [`FakeReplica`] holds a real [`ReplicaStore`] over [`MemoryStorage`], so
//! write-if-newer and what a read answers are the real rules; only *when*
//! and *whether* it answers is scripted ([`Script`]). A [`PeerPool`] made with
//! [`PeerPool::with_fakes`] hands out handles to fakes for their addresses,
//! so [`crate::serving::ClusterView::replica_handles`], the coordinator and the
//! smart client run unchanged over them. Like a remote replica, a fake is
//! bounded by the caller's timeout: a frozen one fails with "timed out"
//! when it runs out.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{PeerPool, ReplicaError, TcpDialer, timed_out};
use crate::clock::SkewBound;
use crate::error::Error;
use crate::locks::Locked;
use crate::record::Record;
use crate::replica::{ReplicaStore, WriteOutcome};
use crate::ring::{Ring, member_id_for};
use crate::storage::MemoryStorage;

/// How a fake answers each call, reads and writes alike.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Script {
    /// Serves the call from its store after this long.
    Answer(Duration),
    /// Fails (unreachable) after this long, without touching its store.
    Fail(Duration),
    /// Refuses the request as invalid, at once.
    Reject,
    /// Never answers: the caller's timeout fires.
    Frozen,
}

/// One scripted replica.
pub struct FakeReplica {
    /// The address it is reached at.
    pub address: String,
    /// What it holds.
    store: ReplicaStore,
    /// How it answers now.
    script: Mutex<Script>,
    /// Reads it was asked (answered or not).
    reads: AtomicUsize,
    /// Writes it was asked (answered or not).
    writes: AtomicUsize,
    /// Times it was asked, as a node, to read a key and repair its replicas.
    repair_requests: AtomicUsize,
}

impl FakeReplica {
    /// An empty replica at `address` of `ring` that answers with `script`.
    pub fn new(address: &str, ring: Arc<Ring>, script: Script) -> Arc<Self> {
        let store = ReplicaStore::open(
            crate::clock::InstanceId(member_id_for(address).0),
            Arc::new(MemoryStorage::new()),
            ring,
            SkewBound::default(),
        )
        .expect("open an in-memory replica");
        Arc::new(Self {
            address: address.to_string(),
            store,
            script: Mutex::new(script),
            reads: AtomicUsize::new(0),
            writes: AtomicUsize::new(0),
            repair_requests: AtomicUsize::new(0),
        })
    }

    /// Its store, to seed or inspect directly (no script, no counting).
    pub fn store(&self) -> &ReplicaStore {
        &self.store
    }

    /// What it holds for `key`.
    pub fn holds(&self, key: &str) -> Option<Record> {
        self.store.read(key).expect("read the fake's store")
    }

    /// Changes how it answers from now on (calls in progress keep theirs).
    pub fn set_script(&self, script: Script) {
        *self.script.locked() = script;
    }

    fn script(&self) -> Script {
        self.script.locked().clone()
    }

    /// Reads it was asked.
    pub fn reads(&self) -> usize {
        self.reads.load(Ordering::SeqCst)
    }

    /// Writes it was asked.
    pub fn writes(&self) -> usize {
        self.writes.load(Ordering::SeqCst)
    }

    /// Times it was asked, as a node, to read a key and repair its replicas.
    pub fn repair_requests(&self) -> usize {
        self.repair_requests.load(Ordering::SeqCst)
    }

    /// Runs `serve` as the script says, within `timeout`.
    async fn call<T>(
        &self,
        timeout: Duration,
        serve: impl FnOnce(&ReplicaStore) -> crate::error::Result<T>,
    ) -> Result<T, ReplicaError> {
        let answer = async {
            match self.script() {
                Script::Answer(after) => {
                    tokio::time::sleep(after).await;
                    serve(&self.store).map_err(|e| match e {
                        Error::InvalidArgument(why) => ReplicaError::Rejected(why),
                        other => ReplicaError::Failed(other.to_string()),
                    })
                }
                Script::Fail(after) => {
                    tokio::time::sleep(after).await;
                    Err(ReplicaError::Failed(format!(
                        "unreachable ({} is scripted to fail)",
                        self.address
                    )))
                }
                Script::Reject => Err(ReplicaError::Rejected(format!(
                    "{} is scripted to reject",
                    self.address
                ))),
                Script::Frozen => std::future::pending().await,
            }
        };
        tokio::time::timeout(timeout, answer)
            .await
            .unwrap_or_else(|_| Err(ReplicaError::Failed(timed_out(timeout))))
    }

    pub(super) async fn read(
        &self,
        key: &str,
        timeout: Duration,
        for_repair: bool,
    ) -> Result<Option<Record>, ReplicaError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.call(timeout, |store| {
            if for_repair {
                store.read(key)
            } else {
                store.read_for_quorum(key)
            }
        })
        .await
    }

    pub(super) async fn write(
        &self,
        key: &str,
        record: &Record,
        timeout: Duration,
    ) -> Result<WriteOutcome, ReplicaError> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.call(timeout, |store| store.write_if_newer(key, record))
            .await
    }
}

impl PeerPool {
    /// What a node asked by [`PeerPool::repair_through_node`] does, over the
    /// fakes: once `fake` answers (as its script says), the newest record
    /// any fake holds for `key` is stored on every fake behind.
    pub(super) async fn fake_repair(
        &self,
        fake: &FakeReplica,
        key: &str,
        timeout: Duration,
    ) -> Result<(), ReplicaError> {
        fake.repair_requests.fetch_add(1, Ordering::SeqCst);
        let newest = fake
            .call(timeout, |_| {
                Ok(self
                    .fakes
                    .values()
                    .filter_map(|f| f.holds(key))
                    .max_by_key(|r| r.version))
            })
            .await?;
        for other in self.fakes.values() {
            if let Some(record) = &newest {
                other
                    .store
                    .write_if_newer(key, record)
                    .map_err(|e| ReplicaError::Failed(e.to_string()))?;
            }
        }
        Ok(())
    }

    /// A pool whose replica handles for the fakes' addresses reach the
    /// fakes (even for this node's own address); other addresses dial as
    /// usual.
    pub fn with_fakes(fakes: impl IntoIterator<Item = Arc<FakeReplica>>) -> Self {
        let mut pool = Self::new(Arc::new(TcpDialer::default()), 4 << 20);
        pool.fakes = fakes
            .into_iter()
            .map(|fake| (fake.address.clone(), fake))
            .collect();
        pool
    }
}
