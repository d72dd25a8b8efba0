//! `dkvs.v1.KeyValue`: the client API, coordinated by this node.
//!
//! Every Put and Delete answer carries a `dkvs-outcome`: `applied` on
//! success (in the response headers: tonic sends no custom trailers on a
//! successful unary call), and on failure the outcome [`Error::outcome`]
//! gives, in the status's trailers. Get failures carry none: a read has no
//! effect to report.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::Node;
use super::lateness::Verdict;
use super::metrics::Recording;
use super::writes::{ClientWrite, Entry};
use crate::error::{Error, Outcome, Result};
use crate::metrics::Operation;
use crate::pb;

/// `dkvs.v1.KeyValue`: client requests, coordinated by this node.
pub(super) struct KeyValueService(pub(super) Arc<Node>);

#[tonic::async_trait]
impl pb::key_value_server::KeyValue for KeyValueService {
    #[tracing::instrument(level = "debug", skip_all, fields(key_hash = %crate::metrics::key_hash(&request.get_ref().key)))]
    async fn put(
        &self,
        request: Request<pb::PutRequest>,
    ) -> Result<Response<pb::PutResponse>, Status> {
        let consistency = super::metrics::consistency_label(request.get_ref().consistency);
        let recording = Recording::start(&self.0, Operation::Put, consistency);
        let answer = put(&self.0, request).await;
        recording.answered(&answer);
        answer
    }

    #[tracing::instrument(level = "debug", skip_all, fields(key_hash = %crate::metrics::key_hash(&request.get_ref().key)))]
    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        let consistency = super::metrics::consistency_label(request.get_ref().consistency);
        let recording = Recording::start(&self.0, Operation::Get, consistency);
        let answer = get(&self.0, request).await;
        recording.answered(&answer);
        answer
    }

    #[tracing::instrument(level = "debug", skip_all, fields(key_hash = %crate::metrics::key_hash(&request.get_ref().key)))]
    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let consistency = super::metrics::consistency_label(request.get_ref().consistency);
        let recording = Recording::start(&self.0, Operation::Delete, consistency);
        let answer = delete(&self.0, request).await;
        recording.answered(&answer);
        answer
    }

    async fn list(
        &self,
        request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let request = request.into_inner();
        let page = async {
            let asked = crate::listing::ListRequest {
                prefix: request.prefix,
                limit: list_limit(request.limit)?,
                from: crate::listing::Position::from_cursor(&request.cursor)?,
                consistency: pb::read_consistency_from(request.consistency)?,
            };
            self.0.list(&asked).await
        };
        let page = page.await.map_err(Error::into_read_status)?;
        Ok(Response::new(pb::ListResponse {
            keys: page
                .keys
                .into_iter()
                .map(|listed| pb::ListedKey {
                    key: listed.key,
                    version: Some(listed.version.into()),
                })
                .collect(),
            cursor: page.next.map(|at| at.to_cursor()).unwrap_or_default(),
        }))
    }
}

/// Keys a listing page holds when the caller does not say.
pub(super) const DEFAULT_LIST_LIMIT: usize = 1000;

/// The page size a listing asks for: 0 means the default; above the most a
/// page may hold is refused, so the caller learns the bound.
pub(super) fn list_limit(asked: u32) -> Result<usize> {
    match asked as usize {
        0 => Ok(DEFAULT_LIST_LIMIT),
        asked if asked > crate::listing::MAX_LIMIT => Err(Error::InvalidArgument(format!(
            "limit {asked} is above the most a listing page holds ({}): ask for less and follow the cursor",
            crate::listing::MAX_LIMIT
        ))),
        asked => Ok(asked),
    }
}

async fn put(
    node: &Arc<Node>,
    request: Request<pb::PutRequest>,
) -> Result<Response<pb::PutResponse>, Status> {
    let ack = client_write(node, request, "PUT", |r| {
        (r.key, Some(r.value), r.consistency)
    })
    .await?;
    Ok(applied(pb::PutResponse {
        version: Some(ack.version.into()),
        acks: ack.acks as u32,
    }))
}

async fn get(
    node: &Arc<Node>,
    request: Request<pb::GetRequest>,
) -> Result<Response<pb::GetResponse>, Status> {
    let request = request.into_inner();
    let read = async {
        node.membership.refuse_until_agreed()?;
        node.limits.check_key(&request.key)?;
        let consistency = pb::read_consistency_from(request.consistency)?;
        node.coordinator.get(&request.key, consistency).await
    };
    let record = read.await.map_err(Error::into_read_status)?;
    Ok(Response::new(pb::get_response(record)))
}

async fn delete(
    node: &Arc<Node>,
    request: Request<pb::DeleteRequest>,
) -> Result<Response<pb::DeleteResponse>, Status> {
    let ack = client_write(node, request, "DELETE", |r| (r.key, None, r.consistency)).await?;
    Ok(applied(pb::DeleteResponse {
        version: Some(ack.version.into()),
        acks: ack.acks as u32,
    }))
}

/// A client's PUT or DELETE (`parts` gives its key, value — none for a
/// delete — and consistency): refused if it arrived after its client gave
/// up, else through the one write entry point.
async fn client_write<T>(
    node: &Arc<Node>,
    request: Request<T>,
    operation: &str,
    parts: impl FnOnce(T) -> (String, Option<bytes::Bytes>, i32),
) -> Result<crate::quorum::WriteAck, Status> {
    refuse_if_abandoned(node, &request, operation)?;
    let timeout = callers_timeout(&request);
    let entry = client_entry(&request);
    let (key, value, consistency) = parts(request.into_inner());
    let write = ClientWrite {
        consistency: pb::consistency_from(consistency)?,
        key,
        value,
        timeout,
    };
    Ok(node.write(write, entry).await?)
}

/// The answer to a write that took effect: `reply` with `dkvs-outcome:
/// applied`.
fn applied<T>(reply: T) -> Response<T> {
    let mut response = Response::new(reply);
    Outcome::Applied.set_on(response.metadata_mut());
    response
}

/// Refuses a client write that reached this node after its client gave
/// up, before any work: the client has reported the write indeterminate,
/// so applying it now (say, after this node was frozen, or a network held
/// it) could overwrite writes acknowledged since. Judged without trusting
/// the client's wall clock to agree with this node's ([`super::lateness`]):
/// from the send time the request carries
/// ([`crate::client::DEADLINE_HEADER`] minus `grpc-timeout`) against the
/// quickest recent request from the same client clock. A request without
/// both headers (grpcurl, say) is not judged.
fn refuse_if_abandoned<T>(node: &Node, request: &Request<T>, operation: &str) -> Result<()> {
    let metadata = request.metadata();
    let Some(deadline) = metadata.get(crate::client::DEADLINE_HEADER) else {
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
    let (Some(timeout), Some(source)) = (callers_timeout(request), request.remote_addr()) else {
        return Ok(());
    };
    let verdict = node.arrivals.judge(source, deadline, timeout);
    answer_verdict(verdict, source, timeout, operation)
}

/// Refuses (unapplied) a write from `source` that waited `timeout` and was
/// judged `verdict`.
pub(super) fn answer_verdict(
    verdict: Verdict,
    source: std::net::SocketAddr,
    timeout: Duration,
    operation: &str,
) -> Result<()> {
    match verdict {
        Verdict::InTime => Ok(()),
        Verdict::Relearned { late_ms } => {
            tracing::warn!(
                %source,
                late_ms,
                "every write from {} has looked {late_ms} ms late for a minute while this node ran: \
                 taking its clock to have moved, and judging it from now on",
                source.ip()
            );
            Ok(())
        }
        Verdict::Late { late_ms } => {
            tracing::warn!(
                %source,
                late_ms,
                "a {operation} arrived after its client gave up on it (a stall or a slow network \
                 held it): refused, not applied"
            );
            Err(Error::Unavailable(format!(
                "{operation} refused and not applied: it reached the node at least {late_ms} ms later \
                 than the quickest recent request from its client, and its client waited {} ms, so \
                 the client has given up on it (measured without comparing clocks)",
                timeout.as_millis()
            )))
        }
        Verdict::Unknown => Err(Error::Unavailable(format!(
            "{operation} refused and not applied: this node was stalled (frozen, or starved of \
             CPU) moments ago and has not heard from {} before, so it cannot tell whether the \
             request waited out its client's deadline; retry",
            source.ip()
        ))),
    }
}

/// How a client write entered: forwarded to its key's first live replica
/// unless the client asked this node to coordinate it
/// ([`crate::client::COORDINATE_HERE_HEADER`]).
fn client_entry<T>(request: &Request<T>) -> Entry<'static> {
    let here = request
        .metadata()
        .get(crate::client::COORDINATE_HERE_HEADER)
        .is_some();
    Entry::Client { forward: !here }
}

/// The caller's `grpc-timeout`, if it sent one (and it parses).
fn callers_timeout<T>(request: &Request<T>) -> Option<Duration> {
    request
        .metadata()
        .get("grpc-timeout")
        .and_then(|t| t.to_str().ok())
        .and_then(super::lateness::parse_grpc_timeout)
}
