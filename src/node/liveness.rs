//! `dkvs.v1.Liveness`: for nodes only. Answers peers' heartbeats (the
//! failure detector and the clock and layout gossip riding on them live in
//! [`crate::liveness`]).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::Node;
use crate::pb;

/// `dkvs.v1.Liveness`: heartbeats between nodes.
pub(super) struct LivenessService(pub(super) Arc<Node>);

#[tonic::async_trait]
impl pb::liveness_server::Liveness for LivenessService {
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
