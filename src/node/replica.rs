//! `dkvs.v1.Replica`: this node's own store, for other nodes only (it
//! bypasses quorums and writes any version it is sent): reads, writes,
//! batches, hints, anti-entropy listings, local statistics. The smart
//! client's reads come through `dkvs.v1.ReplicaRead` (`replica_read.rs`),
//! which answers them with [`answer_reads`].

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::Node;
use super::lateness::Verdict;
use super::writes::{ClientWrite, Entry};
use crate::error::{Error, Result};
use crate::net::max_message_bytes;
use crate::pb;
use crate::record::Record;
use crate::replica::UNFENCED;

/// Bytes a record adds to a reply, roughly.
fn record_size(record: &Option<pb::Record>) -> usize {
    record.as_ref().map_or(16, |r| r.value.len() + 32)
}

/// Judges a batch of forwarded writes once: they were sent together (one
/// send time), so one verdict, for the one with the least time, says how
/// late the batch is, and recording one sample per batch keeps a delayed
/// batch from making itself the baseline ([`Verdict::for_timeout`] then
/// says which of its writes still are in time). `None`: not judged (no
/// source address, an empty batch).
fn batch_lateness(
    node: &Node,
    source: Option<std::net::SocketAddr>,
    writes: &[pb::ForwardedWrite],
) -> Option<(std::net::SocketAddr, Verdict)> {
    let source = source?;
    let strictest = writes.iter().min_by_key(|w| w.timeout_ms)?;
    let timeout = Duration::from_millis(u64::from(strictest.timeout_ms));
    let verdict = node
        .arrivals
        .judge(source, strictest.deadline_unix_ms, timeout);
    Some((source, verdict))
}

/// Coordinates one write another node forwarded (naming itself `sender`):
/// refused unapplied when its batch arrived after its forwarder gave up on
/// it (`judged`: where from and the verdict for its timeout), else taken as
/// a write that entered here.
async fn forwarded_write(
    node: &Node,
    write: pb::ForwardedWrite,
    judged: Option<(std::net::SocketAddr, Verdict)>,
    sender: Option<&str>,
) -> pb::ForwardedWriteResult {
    let operation = if write.value.is_some() {
        "PUT"
    } else {
        "DELETE"
    };
    let timeout = Duration::from_millis(u64::from(write.timeout_ms));
    let taken = async {
        if let Some((source, verdict)) = judged {
            super::kv::answer_verdict(verdict, source, timeout, operation)?;
        }
        let client_write = ClientWrite {
            consistency: pb::consistency_from(write.consistency)?,
            key: write.key,
            value: write.value,
            timeout: Some(timeout),
        };
        let entry = Entry::Forwarded {
            layout_version: write.layout_version,
            sender,
        };
        node.write(client_write, entry).await
    };
    match taken.await {
        Ok(ack) => pb::ForwardedWriteResult {
            ack: Some(pb::ForwardedWriteAck {
                version: Some(ack.version.into()),
                acks: ack.acks as u32,
            }),
            ..Default::default()
        },
        Err(error) => pb::ForwardedWriteResult {
            ack: None,
            code: error.code() as i32,
            outcome: error.outcome().name().to_string(),
            message: error.to_string(),
        },
    }
}

/// `dkvs.v1.Replica`: this node's local store, for other nodes only.
/// Bypasses quorums; not for applications.
pub(super) struct ReplicaService(pub(super) Arc<Node>);

#[tonic::async_trait]
impl pb::replica_server::Replica for ReplicaService {
    async fn read(
        &self,
        request: Request<pb::ReplicaReadRequest>,
    ) -> Result<Response<pb::ReplicaReadResponse>, Status> {
        let request = request.into_inner();
        drop(self.0.replica.fenced(request.layout_version)?);
        Ok(Response::new(self.0.replica_read(request)?))
    }

    async fn write(
        &self,
        request: Request<pb::ReplicaWriteRequest>,
    ) -> Result<Response<pb::ReplicaWriteResponse>, Status> {
        Ok(Response::new(self.0.replica_write(request.into_inner())?))
    }

    async fn forward_writes(
        &self,
        request: Request<pb::ForwardWritesRequest>,
    ) -> Result<Response<pb::ForwardWritesResponse>, Status> {
        let node = &self.0;
        let source = request.remote_addr();
        let sender = crate::net::sender_in(request.metadata().as_ref()).map(str::to_string);
        let writes = request.into_inner().writes;
        node.limits.check_batch(writes.len(), "forwarded writes")?;
        let lateness = batch_lateness(node, source, &writes);
        let each = writes.into_iter().map(|write| {
            let judged =
                lateness.map(|(source, verdict)| (source, verdict.for_timeout(write.timeout_ms)));
            forwarded_write(node, write, judged, sender.as_deref())
        });
        // Ordered, and polled only when woken (join_all polls every write
        // of a small batch on every wake-up of any of them).
        let results: Vec<pb::ForwardedWriteResult> = futures::stream::StreamExt::collect(
            each.collect::<futures::stream::FuturesOrdered<_>>(),
        )
        .await;
        Ok(Response::new(pb::ForwardWritesResponse { results }))
    }

    async fn batch(
        &self,
        request: Request<pb::ReplicaBatchRequest>,
    ) -> Result<Response<pb::ReplicaBatchResponse>, Status> {
        let request = request.into_inner();
        let node = &self.0;
        let items = request.writes.len() + request.reads.len();
        node.limits.check_batch(items, "reads and writes")?;
        // Validate every write, apply the valid ones with one flush, all
        // under the layout fence: a write placed with an older layout than
        // this node serves is refused unapplied.
        let fence = node.replica.fence();
        let serving = fence.serving();
        // Copies are stored only where their key is replicated.
        let view = node.cluster.placement();
        let checked: Vec<Result<(String, Record)>> = request
            .writes
            .into_iter()
            .map(|w| {
                fence.admit(w.layout_version)?;
                let (tagged, copy) = (w.layout_version, w.copy);
                let (key, record) = node.check_write(w)?;
                if copy {
                    fence.admit_copy(tagged, &view, &key)?;
                }
                Ok((key, record))
            })
            .collect();
        let valid: Vec<(&str, &Record)> = checked
            .iter()
            .filter_map(|c| c.as_ref().ok())
            .map(|(k, r)| (k.as_str(), r))
            .collect();
        let mut applied = node.replica.write_many(valid).into_iter();
        drop(fence);
        let writes = checked
            .iter()
            .map(|c| {
                let outcome = match c {
                    Ok(_) => applied
                        .next()
                        .unwrap_or_else(|| Err(Error::Internal("write result missing".into()))),
                    Err(Error::ClockSkew(why)) => Err(Error::ClockSkew(why.clone())),
                    Err(Error::StaleLayout { caller, current }) => Err(Error::StaleLayout {
                        caller: *caller,
                        current: *current,
                    }),
                    // A copy this node does not take: not invalid input.
                    Err(Error::FailedPrecondition(why)) => {
                        Err(Error::FailedPrecondition(why.clone()))
                    }
                    Err(Error::QuotaReached(why)) => Err(Error::QuotaReached(why.clone())),
                    Err(error) => Err(Error::InvalidArgument(error.to_string())),
                };
                match outcome {
                    Err(Error::StaleLayout { current, .. }) => pb::WriteResult {
                        stale_layout: current,
                        error: format!("this node serves newer layout v{current}"),
                        ..Default::default()
                    },
                    Ok(o) => pb::WriteResult {
                        applied: o.applied,
                        held: Some(o.held.into()),
                        ..Default::default()
                    },
                    Err(error) => pb::WriteResult {
                        rejected: matches!(error, Error::InvalidArgument(_)),
                        error: error.to_string(),
                        ..Default::default()
                    },
                }
            })
            .collect();
        let reads = answer_reads(node, request.reads, serving, Reader::Node);
        Ok(Response::new(pb::ReplicaBatchResponse { writes, reads }))
    }

    async fn stats(
        &self,
        _request: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::NodeStats>, Status> {
        Ok(Response::new(self.0.local_stats().into()))
    }

    async fn store_hint(
        &self,
        request: Request<pb::StoreHintRequest>,
    ) -> Result<Response<pb::StoreHintResponse>, Status> {
        let request = request.into_inner();
        let node = &self.0;
        node.limits.check_key(&request.key)?;
        let view = node.cluster.placement();
        let target = view
            .members()
            .iter()
            .find(|m| m.address == request.target)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "hint target {:?} is not a cluster member",
                    request.target
                ))
            })?;
        let record = pb::record_from(
            request
                .record
                .ok_or_else(|| Error::InvalidArgument("record is required".into()))?,
            node.replica.bound(),
        )?;
        if let Some(value) = &record.value {
            node.limits.check_value(value)?;
        }
        node.replica.observe(record.version);
        node.hints.store(&crate::hints::Hint {
            target: target.member_id,
            key: request.key,
            record,
            created_ms: crate::clock::wall_clock_ms(),
        })?;
        Ok(Response::new(pb::StoreHintResponse {}))
    }

    async fn range_digests(
        &self,
        request: Request<pb::RangeDigestsRequest>,
    ) -> Result<Response<pb::RangeDigestsResponse>, Status> {
        let request = request.into_inner();
        let node = &self.0;
        let view = node.cluster.placement();
        view.check_range_count(request.range_count)?;
        same_layout(
            &view,
            request.layout_version,
            node.replica.digests_layout_version(),
        )?;
        if !view.is_member(&request.peer) {
            return Err(Error::InvalidArgument(format!(
                "{:?} is not a cluster member",
                request.peer
            ))
            .into());
        }
        let leaves = node.anti_entropy.leaves_with(&view, &request.peer);
        Ok(Response::new(pb::RangeDigestsResponse {
            root: crate::antientropy::root(&leaves),
            leaves: if request.leaves {
                leaves
                    .into_iter()
                    .map(|(range, digest)| pb::RangeDigest {
                        range: range as u32,
                        digest,
                    })
                    .collect()
            } else {
                Vec::new()
            },
        }))
    }

    async fn range_entries(
        &self,
        request: Request<pb::RangeEntriesRequest>,
    ) -> Result<Response<pb::RangeEntriesResponse>, Status> {
        let request = request.into_inner();
        let node = &self.0;
        // A listing reads this page as a replica's word on the range: not
        // while the read gate is closed (as a quorum read is refused).
        if request.for_listing
            && let Some(why) = node.replica.read_refusal()
        {
            return Err(Error::Unavailable(why).into());
        }
        let view = node.cluster.placement();
        view.check_range_count(request.range_count)?;
        same_layout(
            &view,
            request.layout_version,
            node.replica.digests_layout_version(),
        )?;
        // One page, from the index: a range of any size costs one page.
        let page_entries = node.limits.page_entries(request.page_size);
        // Half the smallest message limit any node has (callers decode
        // with their own, which may be lower than this node's).
        let page_bytes = max_message_bytes(0) / 2;
        let (entries, next) = node.replica.range_entries_page_of(
            request.layout_version,
            request.range as usize,
            &request.after,
            page_entries,
            page_bytes,
        )?;
        Ok(Response::new(pb::RangeEntriesResponse {
            entries: entries.into_iter().map(pb::RangeEntry::from).collect(),
            next_after: next.unwrap_or_default().into(),
        }))
    }
}

/// Anti-entropy compares ranges of one layout: both sides must serve the
/// same version (and this node's digests be counted over it).
fn same_layout(view: &crate::placement::Placement, asked: u64, digests: u64) -> Result<(), Status> {
    if asked != view.version() || digests != view.version() {
        return Err(Error::FailedPrecondition(format!(
            "anti-entropy between layouts: the caller serves v{asked}, this node v{} (digests v{digests}); retried once both serve the same",
            view.version()
        ))
        .into());
    }
    Ok(())
}

/// Who sent a batch of replica reads.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Reader {
    /// Another node (`Replica.Batch`).
    Node,
    /// The smart client (`ReplicaRead.Batch`): `for_repair` reads, which a
    /// replica still catching up answers too, are refused.
    Client,
}

/// Answers a batch of replica reads in order, for `Replica.Batch` and
/// `ReplicaRead.Batch`. `serving` is the layout version this node serves:
/// a read placed with an older one gets `stale_layout`. The reply is kept
/// well under the message limit: records that do not fit are deferred (the
/// first never is), and the caller fetches them one by one.
pub(super) fn answer_reads(
    node: &Node,
    reads: Vec<pb::ReplicaReadRequest>,
    serving: u64,
    reader: Reader,
) -> Vec<pb::ReadResult> {
    let budget = max_message_bytes(node.limits.max_value_bytes) / 2;
    let mut reply_bytes = 0usize;
    reads
        .into_iter()
        .map(|read| {
            if read.for_repair && reader == Reader::Client {
                return pb::ReadResult {
                    rejected: true,
                    error: "for_repair reads are for nodes only (dkvs.v1.Replica)".into(),
                    ..Default::default()
                };
            }
            if read.layout_version != UNFENCED && read.layout_version < serving {
                return pb::ReadResult {
                    stale_layout: serving,
                    error: format!("this node serves newer layout v{serving}"),
                    ..Default::default()
                };
            }
            match node.replica_read(read) {
                Ok(reply)
                    if reply_bytes > 0 && reply_bytes + record_size(&reply.record) > budget =>
                {
                    pb::ReadResult {
                        deferred: true,
                        ..Default::default()
                    }
                }
                Ok(reply) => {
                    reply_bytes += record_size(&reply.record);
                    pb::ReadResult {
                        record: reply.record,
                        ..Default::default()
                    }
                }
                Err(error) => pb::ReadResult {
                    rejected: matches!(error, Error::InvalidArgument(_)),
                    error: error.to_string(),
                    ..Default::default()
                },
            }
        })
        .collect()
}

impl Node {
    /// `Replica.Read` on this node's store (the caller checked the fence).
    pub(super) fn replica_read(
        &self,
        request: pb::ReplicaReadRequest,
    ) -> Result<pb::ReplicaReadResponse> {
        self.limits.check_key(&request.key)?;
        let record = if request.for_repair {
            self.replica.read(&request.key)?
        } else {
            self.replica.read_for_quorum(&request.key)?
        };
        Ok(pb::ReplicaReadResponse {
            record: record.as_ref().map(pb::Record::from),
        })
    }

    /// Validates a replica write: its key, record and value size.
    fn check_write(&self, request: pb::ReplicaWriteRequest) -> Result<(String, Record)> {
        self.limits.check_key(&request.key)?;
        let copy = request.copy;
        let record = pb::record_from(
            request
                .record
                .ok_or_else(|| Error::InvalidArgument("record is required".into()))?,
            self.replica.bound(),
        )?;
        if let Some(value) = &record.value {
            self.limits.check_value(value)?;
            // A new value past the quota is refused; copies of data the
            // cluster holds (anti-entropy, hints, moves) and deletes are
            // taken; a read repair counts as a new value.
            if !copy {
                self.quota.check_room()?;
            }
        }
        Ok((request.key, record))
    }

    /// `Replica.Write` on this node's store.
    fn replica_write(&self, request: pb::ReplicaWriteRequest) -> Result<pb::ReplicaWriteResponse> {
        let fence = self.replica.fenced(request.layout_version)?;
        let (tagged, copy) = (request.layout_version, request.copy);
        let (key, record) = self.check_write(request)?;
        if copy {
            fence.admit_copy(tagged, &self.cluster.placement(), &key)?;
        }
        let outcome = self.replica.write_if_newer(&key, &record)?;
        Ok(pb::ReplicaWriteResponse {
            applied: outcome.applied,
            held: Some(outcome.held.into()),
        })
    }
}
