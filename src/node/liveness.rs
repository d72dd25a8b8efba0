//! `dkvs.v1.Liveness`: for nodes only. Answers peers' heartbeats (the
//! failure detector and the clock and layout gossip riding on them live in
//! [`crate::liveness`] and [`crate::heartbeat`]).

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
        let ping = crate::net::messages::Ping::from(request.into_inner());
        (node.cluster.layouts).check_sender(ping.cluster_id, &ping.from)?;
        let answer = node.heartbeats.answer(ping, node.local_stats())?;
        Ok(Response::new(pb::PingResponse::from(answer)))
    }
}
