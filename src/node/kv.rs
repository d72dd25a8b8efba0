//! `dkvs.v1.KeyValue`: the client API, coordinated by this node.
//!
//! Every Put and Delete answer carries a `dkvs-outcome`: `applied` on
//! success (in the response headers: tonic sends no custom trailers on a
//! successful unary call), and on failure the outcome [`Error::outcome`]
//! gives, in the status's trailers. Get failures carry none: a read has no
//! effect to report.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::Node;
use crate::error::{Error, Outcome, Result};
use crate::pb;

/// `dkvs.v1.KeyValue`: client requests, coordinated by this node.
pub(super) struct KeyValueService(pub(super) Arc<Node>);

#[tonic::async_trait]
impl pb::key_value_server::KeyValue for KeyValueService {
    #[tracing::instrument(level = "debug", skip_all, fields(key = %request.get_ref().key))]
    async fn put(
        &self,
        request: Request<pb::PutRequest>,
    ) -> Result<Response<pb::PutResponse>, Status> {
        refuse_if_abandoned(&request, "PUT")?;
        self.0.membership.refuse_until_agreed()?;
        let request = request.into_inner();
        let node = &self.0;
        node.limits.check_key(&request.key)?;
        node.limits.check_value(&request.value)?;
        let consistency = pb::consistency_from(request.consistency)?;
        let ack = node
            .coordinator
            .write(&request.key, Some(request.value), consistency)
            .await?;
        Ok(applied(pb::PutResponse {
            version: Some(ack.version.into()),
            acks: ack.acks as u32,
        }))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(key = %request.get_ref().key))]
    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        let request = request.into_inner();
        let node = &self.0;
        let read = async {
            node.membership.refuse_until_agreed()?;
            node.limits.check_key(&request.key)?;
            let consistency = pb::read_consistency_from(request.consistency)?;
            node.coordinator.get(&request.key, consistency).await
        };
        let record = read.await.map_err(Error::into_read_status)?;
        Ok(Response::new(pb::get_response(record)))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(key = %request.get_ref().key))]
    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        refuse_if_abandoned(&request, "DELETE")?;
        self.0.membership.refuse_until_agreed()?;
        let request = request.into_inner();
        let node = &self.0;
        node.limits.check_key(&request.key)?;
        let consistency = pb::consistency_from(request.consistency)?;
        let ack = node
            .coordinator
            .write(&request.key, None, consistency)
            .await?;
        Ok(applied(pb::DeleteResponse {
            version: Some(ack.version.into()),
            acks: ack.acks as u32,
        }))
    }
}

/// The answer to a write that took effect: `reply` with `dkvs-outcome:
/// applied`.
fn applied<T>(reply: T) -> Response<T> {
    let mut response = Response::new(reply);
    Outcome::Applied.set_on(response.metadata_mut());
    response
}

/// Refuses a client write taken up after the deadline its client set
/// ([`crate::client::DEADLINE_HEADER`]), before any work: the client has
/// given up and reported the write indeterminate, so applying it now (say,
/// after this node was frozen) could overwrite writes acknowledged since.
fn refuse_if_abandoned<T>(request: &Request<T>, operation: &str) -> Result<()> {
    let Some(deadline) = request.metadata().get(crate::client::DEADLINE_HEADER) else {
        return Ok(());
    };
    let deadline: u64 = deadline
        .to_str()
        .ok()
        .and_then(|d| d.parse().ok())
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{} must be milliseconds since the Unix epoch",
                crate::client::DEADLINE_HEADER
            ))
        })?;
    let now = crate::clock::wall_clock_ms();
    if now > deadline {
        return Err(Error::DeadlineExceeded(format!(
            "{operation} refused and not applied: it reached the node {} ms after its client's \
             deadline (by the node's clock; if this repeats, client and node clocks disagree)",
            now - deadline
        )));
    }
    Ok(())
}
