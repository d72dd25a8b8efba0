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
        Ok(Response::new(self.0.replica_read(request.into_inner())?))
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
        // Validate every write, apply the valid ones with one flush.
        let checked: Vec<Result<(String, Record)>> = request
            .writes
            .into_iter()
            .map(|w| node.check_write(w))
            .collect();
        let valid: Vec<(&str, &Record)> = checked
            .iter()
            .filter_map(|c| c.as_ref().ok())
            .map(|(k, r)| (k.as_str(), r))
            .collect();
        let mut applied = node.replica.write_many(valid).into_iter();
        let writes = checked
            .iter()
            .map(|c| {
                let outcome = match c {
                    Ok(_) => applied
                        .next()
                        .unwrap_or_else(|| Err(Error::Internal("write result missing".into()))),
                    Err(Error::ClockSkew(why)) => Err(Error::ClockSkew(why.clone())),
                    Err(error) => Err(Error::InvalidArgument(error.to_string())),
                };
                match outcome {
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
            .map(|read| match node.replica_read(read) {
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
        node.cluster
            .placement()
            .check_range_count(request.range_count)?;
        let entries = node
            .replica
            .range_entries(request.range as usize)?
            .into_iter()
            .map(pb::RangeEntry::from)
            .collect();
        Ok(Response::new(pb::RangeEntriesResponse { entries }))
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
