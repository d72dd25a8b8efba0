//! `dkvs.v1.Membership`: for nodes only. The layout this node serves, the
//! Paxos rounds that change it, joins, and the bulk copy a joining node
//! pulls (the work is in [`crate::membership`]).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::Node;
use crate::error::Error;
use crate::pb;

/// Who sent `request`, as far as a log line can tell (the caller's IP; its
/// port is a connection's).
fn sender_of<T>(request: &Request<T>, what: &str) -> String {
    match request.remote_addr() {
        Some(address) => format!("{what} at {}", address.ip()),
        None => what.to_string(),
    }
}

/// `dkvs.v1.Membership`: layout agreement and data moving between nodes.
pub(super) struct MembershipService(pub(super) Arc<Node>);

#[tonic::async_trait]
impl pb::membership_server::Membership for MembershipService {
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
        let sender = sender_of(&request, "a layout proposer");
        let request = request.into_inner();
        (self.0.cluster.layouts).check_sender(request.cluster_id, &sender)?;
        let ballot = pb::ballot_from(request.ballot);
        let promise = (self.0.membership).on_prepare(request.version, ballot, request.base_hash)?;
        Ok(Response::new(pb::layout_promise(promise, ballot)))
    }

    async fn layout_accept(
        &self,
        request: Request<pb::LayoutAcceptRequest>,
    ) -> Result<Response<pb::LayoutAccepted>, Status> {
        let sender = sender_of(&request, "a layout proposer");
        let request = request.into_inner();
        (self.0.cluster.layouts).check_sender(request.cluster_id, &sender)?;
        let ballot = pb::ballot_from(request.ballot);
        let layout = request
            .layout
            .ok_or_else(|| Error::InvalidArgument("layout is required".into()))
            .and_then(|layout| pb::layout_from(layout).map_err(Error::InvalidArgument))?;
        let answer = (self.0.membership).on_accept(ballot, &layout, request.base_hash)?;
        Ok(Response::new(pb::layout_accepted(answer, ballot)))
    }

    async fn layout_commit(
        &self,
        request: Request<pb::Layout>,
    ) -> Result<Response<pb::GetLayoutRequest>, Status> {
        let sender = sender_of(&request, "a layout committer");
        let layout = pb::layout_from(request.into_inner()).map_err(Error::InvalidArgument)?;
        // The layout carries its cluster's id; adopting checks it as well.
        (self.0.cluster.layouts).check_sender(layout.cluster_id, &sender)?;
        self.0.membership.adopt_verified(layout).await?;
        Ok(Response::new(pb::GetLayoutRequest {}))
    }

    async fn layout_vouch(
        &self,
        request: Request<pb::LayoutVouchRequest>,
    ) -> Result<Response<pb::LayoutVouchResponse>, Status> {
        let vouch = self.0.cluster.layouts.vouch(request.into_inner().version);
        Ok(Response::new(vouch.into()))
    }

    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::Layout>, Status> {
        // Under mutual TLS a node joins only as the address its certificate
        // names (the access gate passed it on, verified).
        let certified = request
            .extensions()
            .get::<super::VerifiedNode>()
            .map(|node| node.0.clone());
        let request = request.into_inner();
        if certified.is_some() && request.instance_id == 0 {
            // NONE is for joiners of a release before instance ids, which
            // had no TLS: it would also escape the removed list.
            return Err(crate::error::Error::PermissionDenied(
                "a joiner under TLS must name its instance id".into(),
            )
            .into());
        }
        if let Some(certified) = &certified
            && *certified != request.address
        {
            return Err(crate::error::Error::PermissionDenied(format!(
                "a node may join only as the address its certificate names: the certificate \
                 names {certified}, the join asks for {}",
                request.address
            ))
            .into());
        }
        // A new node has no cluster id yet (0): only one naming another
        // cluster is refused.
        if request.cluster_id != 0 {
            let sender = format!("joiner {}", request.address);
            (self.0.cluster.layouts).check_sender(request.cluster_id, &sender)?;
        }
        // Replacing removes a member: in a cluster with TLS between nodes
        // that takes an administrator (any node certificate opens this
        // door), so it is not done here.
        if certified.is_some()
            && !request.replaces.is_empty()
            && request.replaces != request.address
        {
            return Err(crate::error::Error::PermissionDenied(format!(
                "--replace removes {}, which in a cluster with TLS between nodes takes an administrator: \
                 run `DKVSClient cluster remove {}` with an admin token, then start this node with --join alone",
                request.replaces, request.replaces
            ))
            .into());
        }
        let instance = crate::clock::InstanceId(request.instance_id);
        let layout = if request.replaces.is_empty() || request.replaces == request.address {
            (self.0.membership)
                .on_join_as(&request.address, instance)
                .await?
        } else {
            (self.0.membership)
                .on_replace(&request.address, instance, &request.replaces)
                .await?
        };
        Ok(Response::new(pb::Layout::from(&layout)))
    }

    type StreamRecordsStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::StreamChunk, Status>> + Send>>;

    async fn stream_records(
        &self,
        request: Request<pb::StreamRequest>,
    ) -> Result<Response<Self::StreamRecordsStream>, Status> {
        let node = &self.0;
        let sender = sender_of(&request, "a joiner streaming");
        (node.cluster.layouts).check_sender(request.get_ref().cluster_id, &sender)?;
        (node.limits).check_batch(request.get_ref().intervals.len(), "intervals")?;
        let stream = crate::membership::stream_source(
            node.replica.clone(),
            node.cluster.clone(),
            request.into_inner().into(),
        )?;
        let chunks = futures::StreamExt::map(stream, |chunk| {
            chunk
                .map(|chunk| pb::StreamChunk::from(&chunk))
                .map_err(Status::from)
        });
        Ok(Response::new(Box::pin(chunks)))
    }
}
