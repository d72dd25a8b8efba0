//! The server: every service on one port, health, reflection, statuses
//! tonic produces itself made actionable, and an orderly drain.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite};
use tonic::transport::Server;
use tonic::transport::server::Connected;

use super::Node;
use super::access_gate::{AccessRule, Guard};
use super::gate::GateLayer;
use crate::error::{Error, Outcome, Result};
use crate::net::max_message_bytes;
use crate::pb;

/// The DKVS services on a node's port, each with its health status:
/// client-facing first, then those for nodes only.
const SERVICES: [&str; 6] = [
    "dkvs.v1.KeyValue",
    "dkvs.v1.Cluster",
    "dkvs.v1.ReplicaRead",
    "dkvs.v1.Replica",
    "dkvs.v1.Membership",
    "dkvs.v1.Liveness",
];

/// The longest a TLS connection serves (see [`serve_guarded`]).
const MAX_TLS_CONNECTION_AGE: Duration = Duration::from_secs(3600);

/// Accepted connections from `listener`, with Nagle's algorithm off (tonic
/// does not touch sockets it did not accept itself; with Nagle on, a reply's
/// trailing frames wait ~40 ms for the peer's delayed ACK).
pub fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Accepted connections from `listener` with their peers, Nagle's
/// algorithm off; a failed accept (out of file descriptors, say) is
/// logged and retried after 100 ms rather than in a busy loop. The HTTP
/// and RESP doors take their connections from it.
pub(super) fn accepted(
    listener: tokio::net::TcpListener,
    door: &'static str,
) -> impl Stream<Item = (tokio::net::TcpStream, std::net::SocketAddr)> + Send {
    futures::stream::unfold(listener, move |listener| async move {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    return Some(((stream, peer), listener));
                }
                Err(error) => {
                    tracing::debug!(%error, "cannot accept a connection to the {door} door");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    })
}

/// Serves `node` over `incoming` until `shutdown` completes, then drains.
/// For TCP, pass [`incoming`]`(listener)`. Every caller is admitted (no TLS,
/// no tokens): see [`serve_guarded`].
pub async fn serve<I, IO, IE>(
    node: Arc<Node>,
    incoming: I,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()>
where
    I: Stream<Item = std::result::Result<IO, IE>> + Send,
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    IO::ConnectInfo: Clone + Send + Sync + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    serve_guarded(node, incoming, Guard::default(), shutdown).await
}

/// [`serve`], admitting callers by `guard` (TLS: pass
/// [`tls_incoming`]`(listener, tls)` as `incoming`).
pub async fn serve_guarded<I, IO, IE>(
    node: Arc<Node>,
    incoming: I,
    guard: Guard,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()>
where
    I: Stream<Item = std::result::Result<IO, IE>> + Send,
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    IO::ConnectInfo: Clone + Send + Sync + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let max_message = max_message_bytes(node.limits.max_value_bytes);
    let (health, health_service) = tonic_health::server::health_reporter();
    // tonic starts the overall status ("") as SERVING: not before peers
    // have heard from this node (see below).
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let (reflection_v1, reflection_v1alpha) = reflection()?;

    let services = Services::new(&node, max_message);
    let reloader = super::secure::spawn_reloader(&guard, node.shutdown.clone());
    let workers = node.start_workers();
    let serving = serve_once_heard(node.clone(), health.clone());
    let view = node.cluster.placement();
    tracing::info!(
        address = node.address(),
        members = view.members().len(),
        replicas = view.replicas(),
        "serving"
    );

    let signal = drain_signal(&node, &health, &serving, shutdown);
    let incoming = super::load::limit_connections(incoming, node.load.clone());
    let served = server_builder(&guard)
        .layer(EdgeStatusLayer {
            max_message: max_message_bytes(node.limits.max_value_bytes),
        })
        .layer(GateLayer(AccessRule {
            guard,
            layouts: node.cluster.layouts.clone(),
        }))
        .layer(GateLayer(super::cluster_gate::ClusterRule {
            layouts: node.cluster.layouts.clone(),
        }))
        .layer(super::load::LoadLayer(node.load.clone()))
        // Innermost: only an admitted request's body is timed.
        .layer(super::slow_body::SlowBodyLayer {
            timeout: Duration::from_millis(node.config.request_body_timeout_ms),
        })
        .max_concurrent_streams(node.config.max_streams_per_connection)
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(services.key_value)
        .add_service(services.cluster)
        .add_service(services.replica_read)
        .add_service(services.replica)
        .add_service(services.membership)
        .add_service(services.liveness)
        .serve_with_incoming_shutdown(incoming, signal)
        .await;

    stop(&node, workers, serving).await?;
    if let Some(reloader) = reloader {
        let _ = reloader.await;
    }
    served.map_err(|e| Error::Internal(format!("gRPC server: {e}")))
}

/// Completes when the node should stop serving (`shutdown`, or this
/// instance learned it was removed), after turning health NOT_SERVING.
fn drain_signal(
    node: &Node,
    health: &tonic_health::server::HealthReporter,
    serving: &tokio::task::JoinHandle<()>,
    shutdown: impl Future<Output = ()> + Send,
) -> impl Future<Output = ()> + Send {
    let drain_health = health.clone();
    let stop_serving = serving.abort_handle();
    let removal = node.removal.clone();
    let node_serving = node.serving.clone();
    let draining = node.draining.clone();
    async move {
        tokio::select! {
            _ = shutdown => {}
            _ = removal.stopped() => {}
        }
        stop_serving.abort();
        node_serving.store(false, std::sync::atomic::Ordering::Relaxed);
        draining.store(true, std::sync::atomic::Ordering::Relaxed);
        tracing::info!("shutting down: NOT_SERVING, draining requests");
        set_every_status(&drain_health, tonic_health::ServingStatus::NotServing).await;
    }
}

/// The server's settings. Under TLS, who a caller is was checked at its
/// handshake: connections are asked to end after an hour (gracefully: an
/// HTTP/2 GOAWAY, calls in progress finish, the peer reconnects at once),
/// so a CA or certificate dropped from the files stops opening doors. (No
/// grace period: tonic then cuts the connection at age plus grace without
/// a GOAWAY, which would break a join's hour-long record stream.)
fn server_builder(guard: &Guard) -> Server {
    let builder = Server::builder();
    if guard.tls.is_none() {
        return builder;
    }
    builder.max_connection_age(MAX_TLS_CONNECTION_AGE)
}

/// Server reflection, v1 and v1alpha (many clients still ask v1alpha).
fn reflection() -> Result<(
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
)> {
    let v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::Internal(format!("reflection: {e}")))?;
    let v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| Error::Internal(format!("reflection: {e}")))?;
    Ok((v1, v1alpha))
}

/// The DKVS gRPC services of a node, in [`SERVICES`]' order; those that
/// carry values take messages up to the limit.
struct Services {
    key_value: pb::key_value_server::KeyValueServer<super::kv::KeyValueService>,
    cluster: pb::cluster_server::ClusterServer<super::cluster::ClusterService>,
    replica_read:
        pb::replica_read_server::ReplicaReadServer<super::replica_read::ReplicaReadService>,
    replica: pb::replica_server::ReplicaServer<super::replica::ReplicaService>,
    membership: pb::membership_server::MembershipServer<super::membership::MembershipService>,
    liveness: pb::liveness_server::LivenessServer<super::liveness::LivenessService>,
}

impl Services {
    fn new(node: &Arc<Node>, max_message: usize) -> Self {
        let key_value =
            pb::key_value_server::KeyValueServer::new(super::kv::KeyValueService(node.clone()))
                .max_decoding_message_size(max_message)
                .max_encoding_message_size(max_message);
        let cluster =
            pb::cluster_server::ClusterServer::new(super::cluster::ClusterService(node.clone()));
        let replica_read = pb::replica_read_server::ReplicaReadServer::new(
            super::replica_read::ReplicaReadService(node.clone()),
        )
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
        let replica =
            pb::replica_server::ReplicaServer::new(super::replica::ReplicaService(node.clone()))
                .max_decoding_message_size(max_message)
                .max_encoding_message_size(max_message);
        let membership = pb::membership_server::MembershipServer::new(
            super::membership::MembershipService(node.clone()),
        )
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
        let liveness = pb::liveness_server::LivenessServer::new(super::liveness::LivenessService(
            node.clone(),
        ));
        Self {
            key_value,
            cluster,
            replica_read,
            replica,
            membership,
            liveness,
        }
    }
}

/// Sets the overall status ("") and every service's to `status`.
async fn set_every_status(
    health: &tonic_health::server::HealthReporter,
    status: tonic_health::ServingStatus,
) {
    for service in std::iter::once("").chain(SERVICES) {
        health.set_service_status(service, status).await;
    }
}

/// SERVING once the first heartbeats have told peers who this node is
/// (and this node what they knew at its address), bounded by twice the
/// heartbeat interval; the server answers meanwhile.
fn serve_once_heard(
    node: Arc<Node>,
    health: tonic_health::server::HealthReporter,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let wait = node.config.heartbeat_interval() * 2;
        let _ = tokio::time::timeout(wait, node.heartbeats.first_round_done()).await;
        catch_up_before_serving(&node).await;
        // Not before a majority of the first members agree on the cluster
        // id (crate::membership's cluster_id): no deadline.
        node.membership.agreed().await;
        if !node.shutdown.is_cancelled() {
            set_every_status(&health, tonic_health::ServingStatus::Serving).await;
            node.serving
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
    })
}

/// A node that was down while the layout changed serves the newest layout
/// (fetched and verified by a majority) before it says SERVING; bounded, so
/// a cluster that cannot confirm it does not keep this node out (requests
/// placed with the old layout are fenced meanwhile).
async fn catch_up_before_serving(node: &Node) {
    let held = node.cluster.placement().version();
    let Some((newest, from)) = node.heartbeats.newest_layout_reported(held) else {
        return;
    };
    tracing::info!(held, newest, peer = %from, "a peer serves a newer layout: catching up before serving");
    let catch_up = node.cluster.catch_up(newest, &from);
    if tokio::time::timeout(node.config.rpc_timeout() * 4, catch_up)
        .await
        .is_err()
    {
        tracing::warn!(
            held,
            newest,
            "could not catch up with the newest layout in time; serving, requests placed with the old one are fenced"
        );
    }
}

/// After the server stopped: stops background work, waits for every
/// worker, then makes sure everything is on disk.
async fn stop(
    node: &Node,
    workers: Vec<tokio::task::JoinHandle<()>>,
    serving: tokio::task::JoinHandle<()>,
) -> Result<()> {
    node.background.close(Duration::from_secs(2)).await;
    node.shutdown.cancel();
    for worker in workers {
        let _ = worker.await;
    }
    serving.abort();
    let storage = node.storage.clone();
    crate::seams::blocking(move || storage.sync())
        .await
        .map_err(|e| Error::Internal(format!("final sync task: {e}")))??;
    tracing::info!("stopped");
    Ok(())
}

/// Rewrites the statuses tonic itself produces before a handler runs, so
/// they carry the right code and a message a person can act on:
///
/// * a request it cannot decode (e.g. a key that is not UTF-8) is the
///   caller's mistake: INVALID_ARGUMENT instead of INTERNAL (tonic's message,
///   which names the field, is kept);
/// * a request over the message limit: RESOURCE_EXHAUSTED naming the limit
///   and the flag that sets it, instead of OUT_OF_RANGE;
/// * an unknown service or method: UNIMPLEMENTED naming it and what is
///   served, instead of an empty message;
/// * a Put or Delete refused before its handler ran (any of the above):
///   `dkvs-outcome: not-applied`, as every write answer carries an outcome.
#[derive(Clone, Copy)]
struct EdgeStatusLayer {
    /// The largest message this node accepts, in bytes.
    max_message: usize,
}

impl<S> tower::Layer<S> for EdgeStatusLayer {
    type Service = EdgeStatus<S>;

    fn layer(&self, inner: S) -> EdgeStatus<S> {
        EdgeStatus {
            inner,
            max_message: self.max_message,
        }
    }
}

/// The service [`EdgeStatusLayer`] wraps around the router.
#[derive(Clone)]
struct EdgeStatus<S> {
    /// The router.
    inner: S,
    /// See [`EdgeStatusLayer::max_message`].
    max_message: usize,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for EdgeStatus<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        std::pin::Pin<Box<dyn Future<Output = std::result::Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::result::Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let path = request.uri().path().to_string();
        let max_message = self.max_message;
        let response = self.inner.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            rewrite_edge_status(response.headers_mut(), &path, max_message);
            Ok(response)
        })
    }
}

/// See [`EdgeStatusLayer`].
fn rewrite_edge_status(headers: &mut http::HeaderMap, path: &str, max_message: usize) {
    let status = headers.get("grpc-status").map(|s| s.as_bytes().to_vec());
    let message = headers
        .get("grpc-message")
        .map(|m| percent_decode(m.as_bytes()))
        .unwrap_or_default();
    let rewritten = match status.as_deref() {
        Some(b"13") if message.starts_with("failed to decode Protobuf message") => {
            Some((tonic::Code::InvalidArgument, message))
        }
        Some(b"11") if message.starts_with("Error, decoded message length too large") => Some((
            tonic::Code::ResourceExhausted,
            format!(
                "{path}: the request is larger than this node's message limit of {max_message} bytes \
                 (twice --max-value-bytes plus 64 KiB, at least 4 MiB); send smaller values ({message})"
            ),
        )),
        Some(b"12") if message.is_empty() => Some((
            tonic::Code::Unimplemented,
            format!(
                "unknown method {path}: this node serves dkvs.v1.KeyValue, dkvs.v1.Cluster, \
                 dkvs.v1.ReplicaRead, dkvs.v1.Replica, dkvs.v1.Membership, dkvs.v1.Liveness \
                 (the last three for nodes only), grpc.health.v1.Health and server reflection; \
                 `grpcurl -plaintext HOST:PORT list` shows them"
            ),
        )),
        _ => None,
    };
    if let Some((code, message)) = rewritten {
        let status = tonic::Status::new(code, message);
        // Status::add_header writes grpc-status and a percent-encoded grpc-message.
        if status.add_header(headers).is_err() {
            headers.insert("grpc-status", http::HeaderValue::from(code as i32));
        }
    }
    // A handler's failure carries its outcome already; without one, a
    // write failed before its handler ran, so nothing was done.
    let failed = status.as_deref().is_some_and(|s| s != b"0");
    if failed && WRITE_PATHS.contains(&path) && !headers.contains_key(crate::error::OUTCOME_HEADER)
    {
        headers.insert(
            crate::error::OUTCOME_HEADER,
            http::HeaderValue::from_static(Outcome::NotApplied.name()),
        );
    }
}

/// The write-like methods of `dkvs.v1.KeyValue`, whose answers carry a
/// `dkvs-outcome`.
const WRITE_PATHS: [&str; 2] = ["/dkvs.v1.KeyValue/Put", "/dkvs.v1.KeyValue/Delete"];

/// Decodes a percent-encoded `grpc-message`.
fn percent_decode(bytes: &[u8]) -> String {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_of(code: &str, message: &str, path: &str) -> tonic::Status {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "grpc-status",
            http::HeaderValue::from_str(code).expect("code"),
        );
        if !message.is_empty() {
            let encoded: String = message
                .bytes()
                .map(|b| {
                    if b == b' ' {
                        "%20".to_string()
                    } else {
                        (b as char).to_string()
                    }
                })
                .collect();
            headers.insert(
                "grpc-message",
                http::HeaderValue::from_str(&encoded).expect("message"),
            );
        }
        rewrite_edge_status(&mut headers, path, 4 << 20);
        tonic::Status::from_header_map(&headers).expect("a status")
    }

    #[test]
    fn edge_statuses_get_the_right_code_and_a_message() {
        let big = status_of(
            "11",
            "Error, decoded message length too large: found 5000000 bytes, the limit is: 4194304 bytes",
            "/dkvs.v1.KeyValue/Put",
        );
        assert_eq!(big.code(), tonic::Code::ResourceExhausted);
        assert!(big.message().contains("4194304"), "{}", big.message());
        assert!(
            big.message().contains("--max-value-bytes"),
            "{}",
            big.message()
        );
        let unknown = status_of("12", "", "/dkvs.v1.KeyValue/Nope");
        assert_eq!(unknown.code(), tonic::Code::Unimplemented);
        assert!(unknown.message().contains("/dkvs.v1.KeyValue/Nope"));
        let undecodable = status_of("13", "failed to decode Protobuf message: key", "/x");
        assert_eq!(undecodable.code(), tonic::Code::InvalidArgument);
        assert!(undecodable.message().contains("key"));
        // Refused before the handler ran: a write says it was not applied.
        assert_eq!(Outcome::of(big.metadata()), Some(Outcome::NotApplied));
        let undecodable_put = status_of(
            "13",
            "failed to decode Protobuf message: key",
            "/dkvs.v1.KeyValue/Put",
        );
        assert_eq!(
            Outcome::of(undecodable_put.metadata()),
            Some(Outcome::NotApplied)
        );
        assert_eq!(Outcome::of(undecodable.metadata()), None);
        // Everything else is left alone.
        let other = status_of("14", "replica down", "/x");
        assert_eq!(
            (other.code(), other.message()),
            (tonic::Code::Unavailable, "replica down")
        );
    }
}
