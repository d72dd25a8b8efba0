//! `dkvs.v1.ReplicaRead`: the smart client's batched reads of this node's
//! replica. Client-facing and read-only: the request type carries reads
//! and nothing else, so no call here can write; `for_repair` (answered even
//! by a replica still catching up) stays for nodes.

use std::sync::Arc;

use crate::metrics::Operation;
use tonic::{Request, Response, Status};

use super::Node;
use super::replica::{Reader, answer_reads};
use crate::pb;

/// `dkvs.v1.ReplicaRead`: replica reads for the smart client, which
/// coordinates its reads itself.
pub(super) struct ReplicaReadService(pub(super) Arc<Node>);

#[tonic::async_trait]
impl pb::replica_read_server::ReplicaRead for ReplicaReadService {
    async fn batch(
        &self,
        request: Request<pb::ReplicaReadBatchRequest>,
    ) -> Result<Response<pb::ReplicaReadBatchResponse>, Status> {
        let node = &self.0;
        // The smart client says no consistency here (it tallies replies
        // itself): counted as ONE, one replica's answer.
        let one = 0;
        let recording = super::metrics::Recording::start(node, Operation::ReplicaRead, one);
        let reads = request.into_inner().reads;
        let answer = node
            .limits
            .check_batch(reads.len(), "reads")
            .map_err(Status::from)
            .map(|()| {
                let serving = node.replica.fence().serving();
                let reads = answer_reads(node, reads, serving, Reader::Client);
                Response::new(pb::ReplicaReadBatchResponse { reads })
            });
        recording.answered(&answer);
        answer
    }
}
