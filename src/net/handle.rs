//! A handle to one replica of a key: this node's own store in-process, a
//! peer through its pipe, or (in unit tests) a scripted fake. Each call has
//! its own deadline.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use super::pipe::{PipeItem, ReplicaPipe};
use super::timed_out;
use crate::error::Error;
use crate::pb;
pub use crate::quorum::ReplicaError;
use crate::record::Record;
use crate::replica::{ReplicaStore, WriteOutcome};

/// How to reach one replica of a key.
#[derive(Clone)]
pub struct ReplicaHandle {
    /// The replica's address, for messages.
    pub address: String,
    /// In-process or over gRPC.
    pub(super) target: ReplicaTarget,
    /// Set when the failure detector believes the replica is down: quorum
    /// calls then neither send to it nor wait for it, and count it failed.
    pub believed_down: Option<String>,
    /// The layout version the call was placed with (0: unfenced).
    pub layout_version: u64,
}

#[derive(Clone)]
pub(super) enum ReplicaTarget {
    /// This node's own store: no RPC.
    Local(Arc<ReplicaStore>),
    /// Another node, batched: over `Replica` (nodes), or over `ReplicaRead`
    /// (the smart client: reads only).
    Remote(Arc<ReplicaPipe>),
    /// A scripted replica (unit tests).
    #[cfg(test)]
    Fake(Arc<super::fake::FakeReplica>),
}

impl ReplicaHandle {
    /// What this replica holds for `key`, or why it could not say in time:
    /// an answer that counts towards a read quorum.
    pub async fn read(&self, key: &str, timeout: Duration) -> Result<Option<Record>, ReplicaError> {
        self.read_with(key, timeout, false).await
    }

    /// What this replica holds for `key`, to copy by version (anti-entropy):
    /// answered even by a replica still catching up.
    pub async fn read_for_repair(
        &self,
        key: &str,
        timeout: Duration,
    ) -> Result<Option<Record>, ReplicaError> {
        self.read_with(key, timeout, true).await
    }

    async fn read_with(
        &self,
        key: &str,
        timeout: Duration,
        for_repair: bool,
    ) -> Result<Option<Record>, ReplicaError> {
        match &self.target {
            ReplicaTarget::Local(store) => {
                let read = store.fenced(self.layout_version).and_then(|_fence| {
                    if for_repair {
                        store.read(key)
                    } else {
                        store.read_for_quorum(key)
                    }
                });
                read.map_err(replica_error)
            }
            ReplicaTarget::Remote(pipe) => {
                let (answer, answered) = oneshot::channel();
                let request = pb::ReplicaReadRequest {
                    key: key.to_string(),
                    for_repair,
                    layout_version: self.layout_version,
                };
                match tokio::time::timeout(
                    timeout,
                    pipe.call(PipeItem::Read(request, answer), answered),
                )
                .await
                {
                    Ok(Some(result)) => result,
                    Ok(None) => Err(ReplicaError::Failed("replica pipe closed".into())),
                    Err(_) => Err(ReplicaError::Failed(timed_out(timeout))),
                }
            }
            #[cfg(test)]
            ReplicaTarget::Fake(fake) => fake.read(key, timeout, for_repair).await,
        }
    }

    /// Asks the replica to store `record` if newer; answers what it holds.
    pub async fn write(
        &self,
        key: &str,
        record: &Record,
        timeout: Duration,
    ) -> Result<WriteOutcome, ReplicaError> {
        self.write_with(key, record, timeout, false).await
    }

    /// [`ReplicaHandle::write`] for a copy made in the background (an
    /// anti-entropy push, a hint delivered, moved data handed off): the
    /// replica refuses it unless it replicates `key` at the layout it
    /// serves (see `replica/fence.rs`). Place it with a layout version.
    pub async fn write_copy(
        &self,
        key: &str,
        record: &Record,
        timeout: Duration,
    ) -> Result<WriteOutcome, ReplicaError> {
        self.write_with(key, record, timeout, true).await
    }

    async fn write_with(
        &self,
        key: &str,
        record: &Record,
        timeout: Duration,
        copy: bool,
    ) -> Result<WriteOutcome, ReplicaError> {
        match &self.target {
            // Copies go to peers; this node's own copies are checked by
            // their makers (`ReplicaStore::write_copy`).
            ReplicaTarget::Local(_) if copy => Err(ReplicaError::Failed(
                "a copy is made to a peer, not to this node".into(),
            )),
            ReplicaTarget::Local(store) => store
                .fenced(self.layout_version)
                .and_then(|_fence| store.write_if_newer(key, record))
                .map_err(replica_error),
            ReplicaTarget::Remote(pipe) => {
                let (answer, answered) = oneshot::channel();
                let request = pb::ReplicaWriteRequest {
                    key: key.to_string(),
                    record: Some(record.into()),
                    layout_version: self.layout_version,
                    copy,
                };
                match tokio::time::timeout(
                    timeout,
                    pipe.call(PipeItem::Write(request, answer), answered),
                )
                .await
                {
                    Ok(Some(result)) => result,
                    Ok(None) => Err(ReplicaError::Failed("replica pipe closed".into())),
                    Err(_) => Err(ReplicaError::Failed(timed_out(timeout))),
                }
            }
            #[cfg(test)]
            ReplicaTarget::Fake(fake) => fake.write(key, record, timeout).await,
        }
    }
}

/// A local replica's error as a reply.
fn replica_error(error: Error) -> ReplicaError {
    match error {
        Error::InvalidArgument(why) => ReplicaError::Rejected(why),
        Error::StaleLayout { current, .. } => ReplicaError::StaleLayout(current),
        other => ReplicaError::Failed(other.to_string()),
    }
}
