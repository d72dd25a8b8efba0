//! The network seam: how nodes and clients reach each other.
//!
//! Everything that dials goes through a [`Dialer`], and everything that calls
//! a replica goes through a [`ReplicaHandle`]. [`PeerPool`] hands out one
//! client per gRPC service (`key_value_client`, `cluster_client`: client-
//! facing; `replica_client`, `membership_client`, `liveness_client`: for
//! nodes only) and the replica handles: [`PeerPool::replica_handle`] for
//! nodes, [`PeerPool::read_handle`] (reads only) for the smart client.
//! Production uses [`TcpDialer`];
//! a deterministic network simulator can supply its own dialer (a tonic
//! `Endpoint` with a custom connector) without touching the rest of the code.
//! Likewise the server side takes any stream of connections (see
//! [`crate::node::serve`]).
//!
//! Channels are made once per peer and cloned freely; a tonic channel
//! reconnects by itself after the peer comes back. HTTP/2 keepalive is on so a
//! half-dead connection (a peer that vanished without closing its sockets) is
//! noticed and replaced instead of swallowing requests.
//!
//! The node-only clients are made over a [`PeerChannel`], so every
//! node-to-node call carries this node's cluster id in its metadata
//! ([`CLUSTER_ID_METADATA`]); the client-facing ones carry none.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::clock::SkewBound;
use crate::error::{Error, Result};
use crate::locks::Locked;
use crate::pb;
use crate::pb::liveness_client::LivenessClient;
use crate::pb::membership_client::MembershipClient;
use crate::pb::replica_client::ReplicaClient;
use crate::pb::replica_read_client::ReplicaReadClient;
use crate::replica::ReplicaStore;

mod calls;
#[cfg(test)]
pub mod fake;
mod forward;
mod handle;
pub mod messages;
mod pipe;
pub(crate) use pipe::MAX_BATCH_ITEMS;
pub mod shed;
mod stamp;
mod timed;
mod tls;

pub use calls::{RangeEntriesPage, RangeQuery, RecordChunks, is_not_serving_yet};
pub use forward::{ForwardFailure, ForwardedWrite};
pub use tls::TlsDialer;

use handle::ReplicaTarget;
pub use handle::{ReplicaError, ReplicaHandle};
use pipe::{PipeService, ReplicaPipe};
pub use stamp::{
    BearerStamp, CLUSTER_ID_METADATA, ClientChannel, ClusterStamp, PeerChannel, SENDER_METADATA,
    cluster_id_in, sender_in,
};

/// Metadata key on a client's PUT/DELETE (and a node's forward of one):
/// when its sender gives up on the attempt, in milliseconds since the Unix
/// epoch. A node that takes the request up only after that (it was frozen,
/// or the request sat in a buffer) refuses it before doing any work, so a
/// write reported indeterminate cannot take effect long afterwards, above
/// writes acknowledged since. Judged without comparing clocks (see
/// `node::lateness`).
pub const DEADLINE_HEADER: &str = "dkvs-deadline-unix-ms";

/// Largest gRPC message a node or client accepts: room for the largest value
/// plus headroom, so an oversized value gets DKVS's own INVALID_ARGUMENT
/// (naming the limit) rather than a transport error.
pub fn max_message_bytes(max_value_bytes: usize) -> usize {
    max_value_bytes
        .saturating_mul(2)
        .saturating_add(64 * 1024)
        .max(4 * 1024 * 1024)
}

/// Makes channels to peers.
pub trait Dialer: Send + Sync + 'static {
    /// A channel to `address` that connects lazily and reconnects on failure.
    fn dial(&self, address: &str) -> Result<Channel>;
}

/// Dials plain TCP (HTTP/2 without TLS).
#[derive(Clone, Debug)]
pub struct TcpDialer {
    /// How long to wait for a TCP connection.
    pub connect_timeout: Duration,
}

impl Default for TcpDialer {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_millis(500),
        }
    }
}

impl Dialer for TcpDialer {
    fn dial(&self, address: &str) -> Result<Channel> {
        let endpoint = Endpoint::from_shared(format!("http://{address}")).map_err(|e| {
            Error::InvalidArgument(format!("{address:?} is not a valid HOST:PORT address: {e}"))
        })?;
        Ok(with_keepalive(endpoint)
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .connect_lazy())
    }
}

/// HTTP/2 keepalive, so a half-dead connection is noticed and replaced.
fn with_keepalive(endpoint: Endpoint) -> Endpoint {
    endpoint
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
}

/// A peer's channel, and the series its node-to-node calls are timed in.
#[derive(Clone)]
struct Dialed {
    channel: Channel,
    calls: Option<Arc<crate::metrics::PeerCalls>>,
}

/// One channel per peer address, made on first use.
pub struct PeerPool {
    /// Makes the channels.
    dialer: Arc<dyn Dialer>,
    /// Channels made so far, each with the series its node-to-node calls
    /// are timed in (std mutex: held only for a map lookup).
    channels: Mutex<HashMap<String, Dialed>>,
    /// Where node-to-node calls are timed (none: not timed).
    call_metrics: Option<Arc<crate::metrics::CallMetrics>>,
    /// Batching pipes to peers' replicas (`Replica.Batch`), made on first use.
    pipes: Mutex<HashMap<String, Arc<ReplicaPipe>>>,
    /// Read-only batching pipes (`ReplicaRead.Batch`), made on first use.
    read_pipes: Mutex<HashMap<String, Arc<ReplicaPipe>>>,
    /// Batching pipes of forwarded client writes (`Replica.ForwardWrites`),
    /// made on first use.
    forward_pipes: Mutex<HashMap<String, Arc<forward::ForwardPipe>>>,
    /// Message size limit for clients made from these channels.
    max_message_bytes: usize,
    /// Versions in replies further ahead than this are failed replies.
    bound: SkewBound,
    /// The cluster id node-to-node calls carry: the layout served's (its
    /// owner sets it), or --cluster-token's for a joiner (0: none). Shared
    /// with the [`ClusterStamp`] of every node-to-node client.
    cluster_id: Arc<std::sync::atomic::AtomicU64>,
    /// This node's address, which node-to-node calls name as their sender
    /// (for the receivers' logs; none: not named).
    sender: Option<tonic::metadata::AsciiMetadataValue>,
    /// The token client-facing calls carry (`--token-file`; none: none).
    bearer: BearerStamp,
    /// Scripted replicas by address (unit tests: [`PeerPool::with_fakes`]).
    #[cfg(test)]
    fakes: HashMap<String, Arc<fake::FakeReplica>>,
}

impl PeerPool {
    pub fn new(dialer: Arc<dyn Dialer>, max_message_bytes: usize) -> Self {
        Self {
            dialer,
            channels: Mutex::new(HashMap::new()),
            call_metrics: None,
            pipes: Mutex::new(HashMap::new()),
            read_pipes: Mutex::new(HashMap::new()),
            forward_pipes: Mutex::new(HashMap::new()),
            max_message_bytes,
            // The smart client has no clock of its own to protect and may
            // run on a host whose clock lags: it refuses only versions no
            // node can have issued. Nodes set their --max-clock-skew-ms.
            bound: SkewBound::new(crate::clock::IMPOSSIBLE_AHEAD_MS),
            cluster_id: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            sender: None,
            bearer: BearerStamp::default(),
            #[cfg(test)]
            fakes: HashMap::new(),
        }
    }

    /// Refuses versions in replies beyond `bound` (`--max-clock-skew-ms`).
    pub fn with_skew_bound(mut self, bound: SkewBound) -> Self {
        self.bound = bound;
        self
    }

    /// Names `address` (this node's) as the sender of node-to-node calls,
    /// so that a node refusing them can say which one to stop.
    pub fn with_sender(mut self, address: &str) -> Self {
        self.sender = stamp::sender_value(address);
        self
    }

    /// Times node-to-node calls in `metrics`, per peer and call.
    pub fn with_call_metrics(mut self, metrics: Arc<crate::metrics::CallMetrics>) -> Self {
        self.call_metrics = Some(metrics);
        self
    }

    /// Client-facing calls carry `bearer`'s token.
    pub fn with_bearer(mut self, bearer: BearerStamp) -> Self {
        self.bearer = bearer;
        self
    }

    /// The bound versions in replies are checked against.
    pub fn skew_bound(&self) -> SkewBound {
        self.bound
    }

    pub fn channel(&self, address: &str) -> Result<Channel> {
        Ok(self.dialed(address)?.channel)
    }

    /// The channel to `address` and its call series, made on first use.
    fn dialed(&self, address: &str) -> Result<Dialed> {
        let mut channels = self.channels.locked();
        if let Some(dialed) = channels.get(address) {
            return Ok(dialed.clone());
        }
        let dialed = Dialed {
            channel: self.dialer.dial(address)?,
            calls: self.call_metrics.as_ref().map(|m| m.for_peer(address)),
        };
        channels.insert(address.to_string(), dialed.clone());
        Ok(dialed)
    }

    /// The channel to `address` for node-to-node calls: each carries this
    /// node's cluster id (see [`stamp`]) and is timed per peer and call
    /// (see [`timed`]). The one way a node-only client is made.
    fn peer_channel(&self, address: &str) -> Result<PeerChannel> {
        let stamp = ClusterStamp {
            id: self.cluster_id.clone(),
            sender: self.sender.clone(),
        };
        let dialed = self.dialed(address)?;
        let timed = timed::TimedChannel {
            inner: dialed.channel,
            calls: dialed.calls,
        };
        Ok(InterceptedService::new(timed, stamp))
    }

    /// The channel to `address` for client-facing calls: each carries the
    /// client's token, if any.
    fn client_channel(&self, address: &str) -> Result<ClientChannel> {
        Ok(InterceptedService::new(
            self.channel(address)?,
            self.bearer.clone(),
        ))
    }

    /// `dkvs.v1.Replica` (nodes only): the data path between replicas.
    pub fn replica_client(&self, address: &str) -> Result<ReplicaClient<PeerChannel>> {
        Ok(ReplicaClient::new(self.peer_channel(address)?)
            .max_decoding_message_size(self.max_message_bytes)
            .max_encoding_message_size(self.max_message_bytes))
    }

    /// `dkvs.v1.ReplicaRead` (client-facing): the smart client's replica reads.
    pub fn replica_read_client(&self, address: &str) -> Result<ReplicaReadClient<ClientChannel>> {
        Ok(ReplicaReadClient::new(self.client_channel(address)?)
            .max_decoding_message_size(self.max_message_bytes)
            .max_encoding_message_size(self.max_message_bytes))
    }

    /// `dkvs.v1.Membership` (nodes only): layouts, joins, streaming.
    pub fn membership_client(&self, address: &str) -> Result<MembershipClient<PeerChannel>> {
        Ok(MembershipClient::new(self.peer_channel(address)?)
            .max_decoding_message_size(self.max_message_bytes)
            .max_encoding_message_size(self.max_message_bytes))
    }

    /// `dkvs.v1.Liveness` (nodes only): heartbeats.
    pub fn liveness_client(&self, address: &str) -> Result<LivenessClient<PeerChannel>> {
        Ok(LivenessClient::new(self.peer_channel(address)?))
    }

    pub fn key_value_client(
        &self,
        address: &str,
    ) -> Result<pb::key_value_client::KeyValueClient<ClientChannel>> {
        Ok(
            pb::key_value_client::KeyValueClient::new(self.client_channel(address)?)
                .max_decoding_message_size(self.max_message_bytes)
                .max_encoding_message_size(self.max_message_bytes),
        )
    }

    pub fn cluster_client(
        &self,
        address: &str,
    ) -> Result<pb::cluster_client::ClusterClient<ClientChannel>> {
        Ok(pb::cluster_client::ClusterClient::new(
            self.client_channel(address)?,
        ))
    }

    /// The batching pipe to the replica at `address`: `Replica.Batch`, or
    /// with `reads_only` `ReplicaRead.Batch`.
    fn pipe(&self, address: &str, reads_only: bool) -> Result<Arc<ReplicaPipe>> {
        let pipes = if reads_only {
            &self.read_pipes
        } else {
            &self.pipes
        };
        started_for(pipes, address, || {
            let service = if reads_only {
                PipeService::ReplicaRead(self.replica_read_client(address)?)
            } else {
                PipeService::Replica(self.replica_client(address)?)
            };
            Ok(ReplicaPipe::start(service, self.bound))
        })
    }

    /// Forwards a client write to `to`, its key's first live replica, which
    /// coordinates it, and waits at most `budget` for the answer (see
    /// [`forward`]).
    pub async fn forward_write(
        &self,
        to: &str,
        write: ForwardedWrite,
        budget: Duration,
    ) -> std::result::Result<crate::quorum::WriteAck, ForwardFailure> {
        let pipe = started_for(&self.forward_pipes, to, || {
            let client = self.replica_client(to)?;
            Ok(forward::ForwardPipe::start(client, to))
        })
        .map_err(|e| ForwardFailure::NotTaken(e.to_string()))?;
        pipe.forward(write, budget).await
    }

    /// A handle to the replica at `address` for the smart client: its reads
    /// travel through the client-facing `ReplicaRead` service, and a write
    /// through it is refused without being sent.
    pub fn read_handle(&self, address: &str) -> Result<ReplicaHandle> {
        #[cfg(test)]
        if let Some(fake) = self.fakes.get(address) {
            return Ok(ReplicaHandle {
                address: address.to_string(),
                target: ReplicaTarget::Fake(fake.clone()),
                believed_down: None,
                layout_version: 0,
            });
        }
        Ok(ReplicaHandle {
            address: address.to_string(),
            target: ReplicaTarget::Remote(self.pipe(address, true)?),
            believed_down: None,
            layout_version: 0,
        })
    }

    /// Asks the node at `address` to read `key` (`KeyValue.Get` at ONE): a
    /// node's read asks every replica of the key and repairs those behind.
    /// How the smart client, which writes to no replica, has them repaired.
    pub async fn repair_through_node(
        &self,
        address: &str,
        key: &str,
        timeout: Duration,
    ) -> Result<(), String> {
        #[cfg(test)]
        if let Some(fake) = self.fakes.get(address) {
            return self
                .fake_repair(fake, key, timeout)
                .await
                .map_err(|e| e.to_string());
        }
        let mut client = self.key_value_client(address).map_err(|e| e.to_string())?;
        let request = pb::GetRequest {
            key: key.to_string(),
            consistency: pb::Consistency::One as i32,
        };
        call_within(timeout, client.get(request))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// A handle to the replica at `address`, or to `local` when it is this node.
    pub fn replica_handle(
        &self,
        address: &str,
        local: Option<&Arc<ReplicaStore>>,
    ) -> Result<ReplicaHandle> {
        #[cfg(test)]
        if let Some(fake) = self.fakes.get(address) {
            return Ok(ReplicaHandle {
                address: address.to_string(),
                target: ReplicaTarget::Fake(fake.clone()),
                believed_down: None,
                layout_version: 0,
            });
        }
        let target = match local {
            Some(store) => ReplicaTarget::Local(store.clone()),
            None => ReplicaTarget::Remote(self.pipe(address, false)?),
        };
        Ok(ReplicaHandle {
            address: address.to_string(),
            target,
            believed_down: None,
            layout_version: 0,
        })
    }
}

/// The pipe to `address` in `pipes`, started by `start` on first use.
fn started_for<P>(
    pipes: &Mutex<HashMap<String, Arc<P>>>,
    address: &str,
    start: impl FnOnce() -> Result<P>,
) -> Result<Arc<P>> {
    let mut pipes = pipes.locked();
    if let Some(pipe) = pipes.get(address) {
        return Ok(pipe.clone());
    }
    let pipe = Arc::new(start()?);
    pipes.insert(address.to_string(), pipe.clone());
    Ok(pipe)
}

/// Describes a failed call in one short line.
pub fn describe_status(status: &tonic::Status) -> String {
    let message = status.message();
    let message = if message.is_empty() {
        "no message"
    } else {
        message
    };
    match status.code() {
        tonic::Code::Unavailable => format!("unreachable ({message})"),
        code => format!("{code:?}: {message}"),
    }
}

/// Whether a failed call provably never reached the node: the connection
/// could not be made (refused, no route, connect timeout; tonic marks those
/// with [`tonic::ConnectError`] in the status's source chain), or hyper
/// canceled the request before dispatching it because the connection had
/// closed (the first request on a connection to a node that was just
/// killed): no request left this process.
pub fn never_sent(status: &tonic::Status) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(status);
    while let Some(error) = source {
        if error.is::<tonic::ConnectError>()
            || error
                .downcast_ref::<hyper::Error>()
                .is_some_and(hyper::Error::is_canceled)
        {
            return true;
        }
        source = error.source();
    }
    false
}

/// Runs one gRPC call with a deadline; a failure becomes a one-line reason.
pub async fn call_within<T>(
    timeout: Duration,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, CallError> {
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(reply)) => Ok(reply.into_inner()),
        Ok(Err(status)) => match status.code() {
            tonic::Code::Unauthenticated => {
                Err(CallError::Unauthenticated(describe_status(&status)))
            }
            tonic::Code::PermissionDenied => {
                Err(CallError::PermissionDenied(describe_status(&status)))
            }
            _ => Err(CallError::Failed(describe_status(&status))),
        },
        Err(_) => Err(CallError::TimedOut(timeout)),
    }
}

/// Why one call of [`call_within`] gave no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// Nothing came back before the deadline (the peer may be frozen,
    /// overloaded or cut off).
    #[error("no answer within {} ms", .0.as_millis())]
    TimedOut(Duration),
    /// The peer answered with an error, or could not be reached.
    #[error("{0}")]
    Failed(String),
    /// The peer does not know who is calling (no token, an unknown one).
    #[error("{0}")]
    Unauthenticated(String),
    /// The peer knows the caller, who may not do this.
    #[error("{0}")]
    PermissionDenied(String),
}

impl From<CallError> for Error {
    fn from(error: CallError) -> Error {
        match error {
            CallError::TimedOut(_) => Error::DeadlineExceeded(error.to_string()),
            CallError::Failed(why) => Error::Unavailable(why),
            CallError::Unauthenticated(why) => Error::Unauthenticated(why),
            CallError::PermissionDenied(why) => Error::PermissionDenied(why),
        }
    }
}

/// Whether a call failed because tonic's own timer for its `grpc-timeout`
/// fired (CANCELLED, "Timeout expired"): no answer came in time.
pub fn is_tonic_timeout(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Cancelled && status.message() == "Timeout expired"
}

fn timed_out(timeout: Duration) -> String {
    format!("timed out after {} ms", timeout.as_millis())
}
