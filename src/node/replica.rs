//! `dkvs.v1.Replica`: this node's own store, for other nodes and the smart
//! client (bypasses quorums; not for applications): reads, writes, batches,
//! hints, anti-entropy listings, heartbeats.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::Node;
use crate::error::{Error, Result};
use crate::net::max_message_bytes;
use crate::pb;
use crate::record::Record;
use crate::replica::UNFENCED;

/// Bytes a record adds to a reply, roughly.
fn record_size(record: &Option<pb::Record>) -> usize {
    record.as_ref().map_or(16, |r| r.value.len() + 32)
}

/// `dkvs.v1.Replica`: this node's local store, for other nodes and the
/// smart client. Bypasses quorums; not for applications.
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

    async fn batch(
        &self,
        request: Request<pb::ReplicaBatchRequest>,
    ) -> Result<Response<pb::ReplicaBatchResponse>, Status> {
        let request = request.into_inner();
        let node = &self.0;
        // Validate every write, apply the valid ones with one flush, all
        // under the layout fence: a write placed with an older layout than
        // this node serves is refused unapplied.
        let fence = node.replica.fence();
        let serving = fence.serving();
        let checked: Vec<Result<(String, Record)>> = request
            .writes
            .into_iter()
            .map(|w| {
                fence.admit(w.layout_version)?;
                node.check_write(w)
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
        // Keep the reply well under the message limit: records that do not
        // fit are deferred, and the caller fetches them one by one.
        let budget = max_message_bytes(node.limits.max_value_bytes) / 2;
        let mut reply_bytes = 0usize;
        let reads = request
            .reads
            .into_iter()
            .map(|read| {
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
            .collect();
        Ok(Response::new(pb::ReplicaBatchResponse { writes, reads }))
    }

    async fn stats(
        &self,
        _request: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::NodeStats>, Status> {
        Ok(Response::new(self.0.local_stats()))
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
            target: target.node_id,
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
        let view = node.cluster.placement();
        view.check_range_count(request.range_count)?;
        same_layout(
            &view,
            request.layout_version,
            node.replica.digests_layout_version(),
        )?;
        let entries = node
            .replica
            .range_entries(request.range as usize)?
            .into_iter()
            .map(pb::RangeEntry::from)
            .collect();
        Ok(Response::new(pb::RangeEntriesResponse { entries }))
    }

    async fn get_layout(
        &self,
        _request: Request<pb::GetLayoutRequest>,
    ) -> Result<Response<pb::Layout>, Status> {
        Ok(Response::new(pb::Layout::from(&self.0.membership.layout())))
    }

    async fn layout_prepare(
        &self,
        request: Request<pb::LayoutPrepareRequest>,
    ) -> Result<Response<pb::LayoutPromise>, Status> {
        Ok(Response::new(
            self.0.membership.on_prepare(request.into_inner())?,
        ))
    }

    async fn layout_accept(
        &self,
        request: Request<pb::LayoutAcceptRequest>,
    ) -> Result<Response<pb::LayoutAccepted>, Status> {
        Ok(Response::new(
            self.0.membership.on_accept(request.into_inner())?,
        ))
    }

    async fn layout_commit(
        &self,
        request: Request<pb::Layout>,
    ) -> Result<Response<pb::GetLayoutRequest>, Status> {
        let layout = pb::layout_from(request.into_inner()).map_err(Error::InvalidArgument)?;
        self.0.membership.adopt(layout)?;
        Ok(Response::new(pb::GetLayoutRequest {}))
    }

    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::Layout>, Status> {
        let layout = self
            .0
            .membership
            .on_join(&request.into_inner().address)
            .await?;
        Ok(Response::new(pb::Layout::from(&layout)))
    }

    type StreamRecordsStream = crate::membership::RecordStream;

    async fn stream_records(
        &self,
        request: Request<pb::StreamRequest>,
    ) -> Result<Response<Self::StreamRecordsStream>, Status> {
        let node = &self.0;
        let stream = crate::membership::stream_source(
            node.replica.clone(),
            node.cluster.clone(),
            request.into_inner(),
        )?;
        Ok(Response::new(stream))
    }

    async fn ping(
        &self,
        request: Request<pb::PingRequest>,
    ) -> Result<Response<pb::PingResponse>, Status> {
        let node = &self.0;
        let answer = node
            .heartbeats
            .answer(request.into_inner(), node.local_stats())?;
        Ok(Response::new(answer))
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
