//! The network seam: how nodes and clients reach each other.
//!
//! Everything that dials goes through a [`Dialer`], and everything that calls
//! a replica goes through a [`ReplicaHandle`]. Production uses [`TcpDialer`];
//! a deterministic network simulator can supply its own dialer (a tonic
//! `Endpoint` with a custom connector) without touching the rest of the code.
//! Likewise the server side takes any stream of connections (see
//! [`crate::node::serve`]).
//!
//! Channels are made once per peer and cloned freely; a tonic channel
//! reconnects by itself after the peer comes back. HTTP/2 keepalive is on so a
//! half-dead connection (a peer that vanished without closing its sockets) is
//! noticed and replaced instead of swallowing requests.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tonic::transport::{Channel, Endpoint};

use crate::clock::SkewBound;
use crate::error::{Error, Result};
use crate::pb;
use crate::pb::replica_client::ReplicaClient;
use crate::record::Record;
use crate::replica::{ReplicaStore, WriteOutcome};
use crate::sync::Locked;

#[cfg(test)]
pub mod fake;

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
        Ok(endpoint
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true)
            .connect_lazy())
    }
}

/// One channel per peer address, made on first use.
pub struct PeerPool {
    /// Makes the channels.
    dialer: Arc<dyn Dialer>,
    /// Channels made so far (std mutex: held only for a map lookup).
    channels: Mutex<HashMap<String, Channel>>,
    /// Batching pipes to peers' replicas, made on first use.
    pipes: Mutex<HashMap<String, Arc<ReplicaPipe>>>,
    /// Message size limit for clients made from these channels.
    max_message_bytes: usize,
    /// Versions in replies further ahead than this are failed replies.
    bound: SkewBound,
    /// Scripted replicas by address (unit tests: [`PeerPool::with_fakes`]).
    #[cfg(test)]
    fakes: HashMap<String, Arc<fake::FakeReplica>>,
}

impl PeerPool {
    pub fn new(dialer: Arc<dyn Dialer>, max_message_bytes: usize) -> Self {
        Self {
            dialer,
            channels: Mutex::new(HashMap::new()),
            pipes: Mutex::new(HashMap::new()),
            max_message_bytes,
            // The smart client has no clock of its own to protect and may
            // run on a host whose clock lags: it refuses only versions no
            // node can have issued. Nodes set their --max-clock-skew-ms.
            bound: SkewBound::new(crate::clock::IMPOSSIBLE_AHEAD_MS),
            #[cfg(test)]
            fakes: HashMap::new(),
        }
    }

    /// Refuses versions in replies beyond `bound` (`--max-clock-skew-ms`).
    pub fn with_skew_bound(mut self, bound: SkewBound) -> Self {
        self.bound = bound;
        self
    }

    /// The bound versions in replies are checked against.
    pub fn skew_bound(&self) -> SkewBound {
        self.bound
    }

    pub fn channel(&self, address: &str) -> Result<Channel> {
        let mut channels = self.channels.locked();
        if let Some(channel) = channels.get(address) {
            return Ok(channel.clone());
        }
        let channel = self.dialer.dial(address)?;
        channels.insert(address.to_string(), channel.clone());
        Ok(channel)
    }

    pub fn replica_client(&self, address: &str) -> Result<ReplicaClient<Channel>> {
        Ok(ReplicaClient::new(self.channel(address)?)
            .max_decoding_message_size(self.max_message_bytes)
            .max_encoding_message_size(self.max_message_bytes))
    }

    pub fn key_value_client(
        &self,
        address: &str,
    ) -> Result<pb::key_value_client::KeyValueClient<Channel>> {
        Ok(
            pb::key_value_client::KeyValueClient::new(self.channel(address)?)
                .max_decoding_message_size(self.max_message_bytes)
                .max_encoding_message_size(self.max_message_bytes),
        )
    }

    pub fn cluster_client(
        &self,
        address: &str,
    ) -> Result<pb::cluster_client::ClusterClient<Channel>> {
        Ok(pb::cluster_client::ClusterClient::new(
            self.channel(address)?,
        ))
    }

    /// The batching pipe to the replica at `address`.
    fn pipe(&self, address: &str) -> Result<Arc<ReplicaPipe>> {
        let mut pipes = self.pipes.locked();
        if let Some(pipe) = pipes.get(address) {
            return Ok(pipe.clone());
        }
        let pipe = Arc::new(ReplicaPipe::start(
            self.replica_client(address)?,
            self.bound,
        ));
        pipes.insert(address.to_string(), pipe.clone());
        Ok(pipe)
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
            });
        }
        let target = match local {
            Some(store) => ReplicaTarget::Local(store.clone()),
            None => ReplicaTarget::Remote(self.pipe(address)?),
        };
        Ok(ReplicaHandle {
            address: address.to_string(),
            target,
            believed_down: None,
        })
    }
}

/// How to reach one replica of a key.
#[derive(Clone)]
pub struct ReplicaHandle {
    /// The replica's address, for messages.
    pub address: String,
    /// In-process or over gRPC.
    target: ReplicaTarget,
    /// Set when the failure detector believes the replica is down: quorum
    /// calls then neither send to it nor wait for it, and count it failed.
    pub believed_down: Option<String>,
}

#[derive(Clone)]
enum ReplicaTarget {
    /// This node's own store: no RPC.
    Local(Arc<ReplicaStore>),
    /// Another node, over the internal Replica service, batched.
    Remote(Arc<ReplicaPipe>),
    /// A scripted replica (unit tests).
    #[cfg(test)]
    Fake(Arc<fake::FakeReplica>),
}

/// Most items in one `Replica.Batch` call.
const MAX_BATCH_ITEMS: usize = 512;
/// A batch stops growing once its values reach this many bytes.
const MAX_BATCH_VALUE_BYTES: usize = 1 << 20;
/// Batches in flight to one peer at once.
const MAX_BATCHES_IN_FLIGHT: usize = 4;
/// Deadline of one batch call (each caller also has its own, shorter one).
const BATCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests queued for one peer before callers wait.
const PIPE_CAPACITY: usize = 8192;

/// One request waiting in a pipe, with where its answer goes.
enum PipeItem {
    Write(
        pb::ReplicaWriteRequest,
        oneshot::Sender<Result<WriteOutcome, ReplicaError>>,
    ),
    Read(
        pb::ReplicaReadRequest,
        oneshot::Sender<Result<Option<Record>, ReplicaError>>,
    ),
}

impl PipeItem {
    /// Bytes of value the request carries.
    fn value_bytes(&self) -> usize {
        match self {
            PipeItem::Write(w, _) => w.record.as_ref().map_or(0, |r| r.value.len()),
            PipeItem::Read(..) => 0,
        }
    }

    /// The caller gave up (timed out): do not send it.
    fn abandoned(&self) -> bool {
        match self {
            PipeItem::Write(_, answer) => answer.is_closed(),
            PipeItem::Read(_, answer) => answer.is_closed(),
        }
    }
}

/// Replica calls to one peer, batched: requests queue in a bounded channel;
/// a task sends whatever has queued as one `Replica.Batch` call (up to
/// [`MAX_BATCHES_IN_FLIGHT`] at once) and hands each answer back. Idle, a
/// request goes out alone at once; under load, batches form by themselves
/// while earlier ones are in flight — one RPC carries many writes, which is
/// what lets a node replicate near the machine's gRPC ceiling. The task ends
/// when the pipe is dropped.
pub struct ReplicaPipe {
    /// Where requests queue.
    queue: mpsc::Sender<PipeItem>,
}

impl ReplicaPipe {
    fn start(client: ReplicaClient<Channel>, bound: SkewBound) -> Self {
        let (queue, mut incoming) = mpsc::channel::<PipeItem>(PIPE_CAPACITY);
        tokio::spawn(async move {
            let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_BATCHES_IN_FLIGHT));
            // An item that did not fit in the previous batch starts the next.
            let mut carried: Option<PipeItem> = None;
            loop {
                let first = match carried.take() {
                    Some(item) => item,
                    None => match incoming.recv().await {
                        Some(item) => item,
                        None => break,
                    },
                };
                let Ok(permit) = in_flight.clone().acquire_owned().await else {
                    break;
                };
                let mut bytes = first.value_bytes();
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH_ITEMS {
                    let Ok(item) = incoming.try_recv() else { break };
                    if item.abandoned() {
                        continue;
                    }
                    if bytes + item.value_bytes() > MAX_BATCH_VALUE_BYTES {
                        carried = Some(item);
                        break;
                    }
                    bytes += item.value_bytes();
                    batch.push(item);
                }
                batch.retain(|item| !item.abandoned());
                if batch.is_empty() {
                    continue;
                }
                let mut client = client.clone();
                tokio::spawn(async move {
                    send_batch(&mut client, batch, bound).await;
                    drop(permit);
                });
            }
        });
        Self { queue }
    }

    async fn call<T>(&self, item: PipeItem, answer: oneshot::Receiver<T>) -> Option<T> {
        self.queue.send(item).await.ok()?;
        answer.await.ok()
    }
}

/// Sends one batch and distributes the answers (or the failure) to callers.
///
/// A record or version in the answer beyond `bound` is that replica's
/// failed reply: never merged, never repaired onward.
async fn send_batch(client: &mut ReplicaClient<Channel>, batch: Vec<PipeItem>, bound: SkewBound) {
    let mut request = pb::ReplicaBatchRequest::default();
    let mut write_answers = Vec::new();
    let mut read_answers = Vec::new();
    let mut read_requests = Vec::new();
    for item in batch {
        match item {
            PipeItem::Write(write, answer) => {
                request.writes.push(write);
                write_answers.push(answer);
            }
            PipeItem::Read(read, answer) => {
                read_requests.push(read.clone());
                request.reads.push(read);
                read_answers.push(answer);
            }
        }
    }
    let reply = match tokio::time::timeout(BATCH_TIMEOUT, client.batch(request)).await {
        Ok(Ok(reply)) => reply.into_inner(),
        Ok(Err(status)) => {
            let why = describe_status(&status);
            for answer in write_answers {
                let _ = answer.send(Err(ReplicaError::Failed(why.clone())));
            }
            for answer in read_answers {
                let _ = answer.send(Err(ReplicaError::Failed(why.clone())));
            }
            return;
        }
        Err(_) => return, // callers time out on their own
    };
    let mut writes = reply.writes.into_iter();
    for answer in write_answers {
        let result = match writes.next() {
            Some(w) if w.rejected => Err(ReplicaError::Rejected(w.error)),
            Some(w) if !w.error.is_empty() => Err(ReplicaError::Failed(w.error)),
            Some(w) => match pb::version_from(w.held, bound, "held version") {
                Ok(held) => Ok(WriteOutcome {
                    applied: w.applied,
                    held,
                }),
                Err(why) => Err(ReplicaError::Failed(format!("answered badly: {why}"))),
            },
            None => Err(ReplicaError::Failed(
                "the batch answer is missing this write".to_string(),
            )),
        };
        let _ = answer.send(result);
    }
    let mut reads = reply.reads.into_iter();
    for (answer, request) in read_answers.into_iter().zip(read_requests) {
        if reads.as_slice().first().is_some_and(|r| r.deferred) {
            // The reply had no room for this one: ask for it on its own.
            reads.next();
            let mut client = client.clone();
            tokio::spawn(async move {
                let result = match tokio::time::timeout(BATCH_TIMEOUT, client.read(request)).await {
                    Ok(Ok(reply)) => reply
                        .into_inner()
                        .record
                        .map(|r| pb::record_from(r, bound))
                        .transpose()
                        .map_err(|e| ReplicaError::Failed(format!("sent an invalid record: {e}"))),
                    Ok(Err(status)) if status.code() == tonic::Code::InvalidArgument => {
                        Err(ReplicaError::Rejected(status.message().to_string()))
                    }
                    Ok(Err(status)) => Err(ReplicaError::Failed(describe_status(&status))),
                    Err(_) => Err(ReplicaError::Failed(timed_out(BATCH_TIMEOUT))),
                };
                let _ = answer.send(result);
            });
            continue;
        }
        let result = match reads.next() {
            Some(r) if r.rejected => Err(ReplicaError::Rejected(r.error)),
            Some(r) if !r.error.is_empty() => Err(ReplicaError::Failed(r.error)),
            Some(r) => r
                .record
                .map(|r| pb::record_from(r, bound))
                .transpose()
                .map_err(|e| ReplicaError::Failed(format!("sent an invalid record: {e}"))),
            None => Err(ReplicaError::Failed(
                "the batch answer is missing this read".into(),
            )),
        };
        let _ = answer.send(result);
    }
}

/// Why a replica did not answer a read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplicaError {
    /// The replica refused the request itself (e.g. a key over its limit):
    /// asking other replicas will not help.
    Rejected(String),
    /// The replica could not be reached, timed out or failed.
    Failed(String),
}

impl std::fmt::Display for ReplicaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplicaError::Rejected(why) => write!(f, "rejected: {why}"),
            ReplicaError::Failed(why) => f.write_str(why),
        }
    }
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

impl ReplicaHandle {
    /// What this replica holds for `key`, or why it could not say in time:
    /// an answer that counts towards a read quorum.
    pub async fn read(&self, key: &str, timeout: Duration) -> Result<Option<Record>, ReplicaError> {
        self.read_with(key, timeout, false).await
    }

    /// What this replica holds for `key`, to copy by version (anti-entropy):
    /// answered even by a replica still catching up.
    pub async fn read_for_repair(
        &self,
        key: &str,
        timeout: Duration,
    ) -> Result<Option<Record>, ReplicaError> {
        self.read_with(key, timeout, true).await
    }

    async fn read_with(
        &self,
        key: &str,
        timeout: Duration,
        for_repair: bool,
    ) -> Result<Option<Record>, ReplicaError> {
        match &self.target {
            ReplicaTarget::Local(store) => {
                let read = if for_repair {
                    store.read(key)
                } else {
                    store.read_for_quorum(key)
                };
                read.map_err(|e| match e {
                    Error::InvalidArgument(why) => ReplicaError::Rejected(why),
                    other => ReplicaError::Failed(other.to_string()),
                })
            }
            ReplicaTarget::Remote(pipe) => {
                let (answer, answered) = oneshot::channel();
                let request = pb::ReplicaReadRequest {
                    key: key.to_string(),
                    for_repair,
                };
                match tokio::time::timeout(
                    timeout,
                    pipe.call(PipeItem::Read(request, answer), answered),
                )
                .await
                {
                    Ok(Some(result)) => result,
                    Ok(None) => Err(ReplicaError::Failed("replica pipe closed".into())),
                    Err(_) => Err(ReplicaError::Failed(timed_out(timeout))),
                }
            }
            #[cfg(test)]
            ReplicaTarget::Fake(fake) => fake.read(key, timeout, for_repair).await,
        }
    }

    /// Asks the replica to store `record` if newer; answers what it holds.
    pub async fn write(
        &self,
        key: &str,
        record: &Record,
        timeout: Duration,
    ) -> Result<WriteOutcome, ReplicaError> {
        match &self.target {
            ReplicaTarget::Local(store) => store.write_if_newer(key, record).map_err(|e| match e {
                Error::InvalidArgument(why) => ReplicaError::Rejected(why),
                other => ReplicaError::Failed(other.to_string()),
            }),
            ReplicaTarget::Remote(pipe) => {
                let (answer, answered) = oneshot::channel();
                let request = pb::ReplicaWriteRequest {
                    key: key.to_string(),
                    record: Some(record.into()),
                };
                match tokio::time::timeout(
                    timeout,
                    pipe.call(PipeItem::Write(request, answer), answered),
                )
                .await
                {
                    Ok(Some(result)) => result,
                    Ok(None) => Err(ReplicaError::Failed("replica pipe closed".into())),
                    Err(_) => Err(ReplicaError::Failed(timed_out(timeout))),
                }
            }
            #[cfg(test)]
            ReplicaTarget::Fake(fake) => fake.write(key, record, timeout).await,
        }
    }
}

/// Runs one gRPC call with a deadline; a failure becomes a one-line reason.
pub async fn call_within<T>(
    timeout: Duration,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, CallError> {
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(reply)) => Ok(reply.into_inner()),
        Ok(Err(status)) => Err(CallError::Failed(describe_status(&status))),
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
}

impl From<CallError> for Error {
    fn from(error: CallError) -> Error {
        match error {
            CallError::TimedOut(_) => Error::DeadlineExceeded(error.to_string()),
            CallError::Failed(why) => Error::Unavailable(why),
        }
    }
}

fn timed_out(timeout: Duration) -> String {
    format!("timed out after {} ms", timeout.as_millis())
}
