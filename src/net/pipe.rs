//! The replica pipe: calls to one peer queue and travel as batch RPCs,
//! several in flight, so that under load one RPC carries many writes (or
//! reads). A node's pipe speaks `Replica.Batch` (reads and writes, for nodes
//! only); the smart client's speaks the client-facing `ReplicaRead.Batch`,
//! and refuses every write before anything is sent.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::handle::ReplicaError;
use super::{describe_status, timed_out};
use crate::clock::SkewBound;
use crate::pb;
use crate::pb::replica_client::ReplicaClient;
use crate::pb::replica_read_client::ReplicaReadClient;
use crate::record::Record;
use crate::replica::WriteOutcome;

/// Most items in one batch call (receivers refuse more than
/// --max-batch-items, which `config` keeps at or above this).
pub(crate) const MAX_BATCH_ITEMS: usize = 512;
/// A batch stops growing once its values reach this many bytes.
const MAX_BATCH_VALUE_BYTES: usize = 1 << 20;
/// Batches in flight to one peer at once.
const MAX_BATCHES_IN_FLIGHT: usize = 4;
/// Deadline of one batch call (each caller also has its own, shorter one).
const BATCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests queued for one peer before callers wait.
pub(super) const PIPE_CAPACITY: usize = 8192;

/// The service a pipe's batches go to, which decides what they may carry.
#[derive(Clone)]
pub(super) enum PipeService {
    /// Node to node: `Replica.Batch`, reads and writes.
    Replica(ReplicaClient<super::PeerChannel>),
    /// The smart client: `ReplicaRead.Batch`, reads only; a write is
    /// answered [`ReplicaError::Rejected`] and never sent.
    ReplicaRead(ReplicaReadClient<super::ClientChannel>),
}

/// One request waiting in a pipe, with where its answer goes.
pub(super) enum PipeItem {
    Write(
        pb::ReplicaWriteRequest,
        oneshot::Sender<Result<WriteOutcome, ReplicaError>>,
    ),
    Read(
        pb::ReplicaReadRequest,
        oneshot::Sender<Result<Option<Record>, ReplicaError>>,
    ),
}

/// What a batching pipe carries: requests that know their size, and
/// whether their caller still waits.
pub(super) trait Batched: Send + 'static {
    /// Bytes of value the request carries.
    fn value_bytes(&self) -> usize;
    /// The caller gave up (timed out): do not send it.
    fn abandoned(&self) -> bool;
}

impl Batched for PipeItem {
    fn value_bytes(&self) -> usize {
        match self {
            PipeItem::Write(w, _) => w.record.as_ref().map_or(0, |r| r.value.len()),
            PipeItem::Read(..) => 0,
        }
    }

    fn abandoned(&self) -> bool {
        match self {
            PipeItem::Write(_, answer) => answer.is_closed(),
            PipeItem::Read(_, answer) => answer.is_closed(),
        }
    }
}

/// The batching loop of a pipe: takes whatever has queued in `incoming`
/// (up to [`MAX_BATCH_ITEMS`] and [`MAX_BATCH_VALUE_BYTES`]) and hands it
/// to `send` as one batch, at most `max_in_flight` at once. Idle, a request
/// goes out alone at once; under load, batches form by themselves while
/// earlier ones are in flight. Ends when every sender is dropped.
pub(super) async fn run_batches<I, F, Fut>(
    mut incoming: mpsc::Receiver<I>,
    max_in_flight: usize,
    send: F,
) where
    I: Batched,
    F: Fn(Vec<I>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let in_flight = Arc::new(tokio::sync::Semaphore::new(max_in_flight));
    // An item that did not fit in the previous batch starts the next.
    let mut carried: Option<I> = None;
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
        let sent = send(batch);
        tokio::spawn(async move {
            sent.await;
            drop(permit);
        });
    }
}

/// Replica calls to one peer, batched: requests queue in a bounded channel;
/// a task sends whatever has queued as one batch call (up to
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
    pub(super) fn start(service: PipeService, bound: SkewBound) -> Self {
        let (queue, incoming) = mpsc::channel::<PipeItem>(PIPE_CAPACITY);
        tokio::spawn(run_batches(incoming, MAX_BATCHES_IN_FLIGHT, move |batch| {
            send_batch(service.clone(), batch, bound)
        }));
        Self { queue }
    }

    pub(super) async fn call<T>(&self, item: PipeItem, answer: oneshot::Receiver<T>) -> Option<T> {
        self.queue.send(item).await.ok()?;
        answer.await.ok()
    }
}

/// Where each answer of a batch goes.
type WriteAnswer = oneshot::Sender<Result<WriteOutcome, ReplicaError>>;
type ReadAnswer = oneshot::Sender<Result<Option<Record>, ReplicaError>>;

/// A batch as it is sent: the request, and where each answer goes (in the
/// request's order).
struct Outgoing {
    /// The writes and reads to send.
    request: pb::ReplicaBatchRequest,
    /// One per write of the request.
    write_answers: Vec<WriteAnswer>,
    /// One per read of the request.
    read_answers: Vec<ReadAnswer>,
    /// A copy of each read, to send again alone if the reply defers it.
    read_requests: Vec<pb::ReplicaReadRequest>,
}

impl Outgoing {
    /// Gathers `batch` into one request for `service`, refusing at once
    /// the writes it may not carry.
    fn gather(service: &PipeService, batch: Vec<PipeItem>) -> Self {
        let mut outgoing = Self {
            request: pb::ReplicaBatchRequest::default(),
            write_answers: Vec::new(),
            read_answers: Vec::new(),
            read_requests: Vec::new(),
        };
        for item in batch {
            match item {
                PipeItem::Write(_, answer) if matches!(service, PipeService::ReplicaRead(_)) => {
                    let _ = answer.send(Err(ReplicaError::Rejected(
                        "the smart client's replica pipe carries reads only (dkvs.v1.ReplicaRead); \
                         writes go through a node's KeyValue service"
                            .into(),
                    )));
                }
                PipeItem::Write(write, answer) => {
                    outgoing.request.writes.push(write);
                    outgoing.write_answers.push(answer);
                }
                PipeItem::Read(read, answer) => {
                    outgoing.read_requests.push(read.clone());
                    outgoing.request.reads.push(read);
                    outgoing.read_answers.push(answer);
                }
            }
        }
        outgoing
    }
}

/// Sends one batch and distributes the answers (or the failure) to callers.
///
/// A record or version in the answer beyond `bound` is that replica's
/// failed reply: never merged, never repaired onward.
async fn send_batch(service: PipeService, batch: Vec<PipeItem>, bound: SkewBound) {
    let Outgoing {
        request,
        write_answers,
        read_answers,
        read_requests,
    } = Outgoing::gather(&service, batch);
    if write_answers.is_empty() && read_answers.is_empty() {
        return;
    }
    // A read-only batch a node shed is sent again after its hint, while
    // anyone still waits (writes are not copied for this: node-to-node
    // writes have their own budget).
    let mut request = request;
    let mut started = None;
    let sent = loop {
        let retry_copy = write_answers.is_empty().then(|| request.clone());
        let sent = exchange(service.clone(), request).await;
        let wait = match &sent {
            Ok(Err(status)) => super::shed::shed_wait(status),
            _ => None,
        };
        let waiting = read_answers.iter().any(|answer| !answer.is_closed());
        let started = *started.get_or_insert_with(tokio::time::Instant::now);
        match (wait, retry_copy) {
            (Some(wait), Some(copy)) if waiting && started.elapsed() + wait < BATCH_TIMEOUT => {
                tokio::time::sleep(super::shed::jittered(wait)).await;
                request = copy;
            }
            _ => break sent,
        }
    };
    let reply = match sent {
        Ok(Ok(reply)) => reply,
        Ok(Err(status)) => {
            let failed = match crate::error::stale_layout_of(&status) {
                Some(current) => ReplicaError::StaleLayout(current),
                None => ReplicaError::Failed(describe_status(&status)),
            };
            for answer in write_answers {
                let _ = answer.send(Err(failed.clone()));
            }
            for answer in read_answers {
                let _ = answer.send(Err(failed.clone()));
            }
            return;
        }
        Err(_) => return, // callers time out on their own
    };
    let mut writes = reply.writes.into_iter();
    for answer in write_answers {
        let _ = answer.send(write_result(writes.next(), bound));
    }
    let mut reads = reply.reads.into_iter();
    for (answer, request) in read_answers.into_iter().zip(read_requests) {
        if reads.as_slice().first().is_some_and(|r| r.deferred) {
            // The reply had no room for this one: ask for it on its own.
            reads.next();
            let service = service.clone();
            tokio::spawn(async move {
                let _ = answer.send(read_alone(service, request, bound).await);
            });
            continue;
        }
        let result = match reads.next() {
            Some(r) => read_result(r, bound),
            None => Err(ReplicaError::Failed(
                "the batch answer is missing this read".into(),
            )),
        };
        let _ = answer.send(result);
    }
}

/// Sends `request` to `service` as one batch call within [`BATCH_TIMEOUT`];
/// the read-only service's reply comes back as a batch reply without writes.
async fn exchange(
    service: PipeService,
    request: pb::ReplicaBatchRequest,
) -> Result<Result<pb::ReplicaBatchResponse, tonic::Status>, tokio::time::error::Elapsed> {
    match service {
        PipeService::Replica(mut client) => {
            tokio::time::timeout(BATCH_TIMEOUT, client.batch(request))
                .await
                .map(|reply| reply.map(|r| r.into_inner()))
        }
        PipeService::ReplicaRead(mut client) => {
            let reads = pb::ReplicaReadBatchRequest {
                reads: request.reads,
            };
            tokio::time::timeout(BATCH_TIMEOUT, client.batch(reads))
                .await
                .map(|reply| {
                    reply.map(|r| pb::ReplicaBatchResponse {
                        writes: Vec::new(),
                        reads: r.into_inner().reads,
                    })
                })
        }
    }
}

/// One write's answer in a batch reply (`None`: the reply has none for it).
fn write_result(
    w: Option<pb::WriteResult>,
    bound: SkewBound,
) -> Result<WriteOutcome, ReplicaError> {
    match w {
        Some(w) if w.stale_layout != 0 => Err(ReplicaError::StaleLayout(w.stale_layout)),
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
    }
}

/// One read's answer in a batch reply.
fn read_result(r: pb::ReadResult, bound: SkewBound) -> Result<Option<Record>, ReplicaError> {
    if r.stale_layout != 0 {
        return Err(ReplicaError::StaleLayout(r.stale_layout));
    }
    if r.rejected {
        return Err(ReplicaError::Rejected(r.error));
    }
    if !r.error.is_empty() {
        return Err(ReplicaError::Failed(r.error));
    }
    if r.deferred {
        return Err(ReplicaError::Failed(
            "the replica deferred a read sent on its own".into(),
        ));
    }
    record_of(r.record, bound)
}

/// A record from a reply, its version within `bound`.
fn record_of(record: Option<pb::Record>, bound: SkewBound) -> Result<Option<Record>, ReplicaError> {
    record
        .map(|r| pb::record_from(r, bound))
        .transpose()
        .map_err(|e| ReplicaError::Failed(format!("sent an invalid record: {e}")))
}

/// A read a batch reply had no room for, asked on its own: `Replica.Read`
/// for a node, a batch of that one read for the smart client (the first
/// read of a batch is never deferred).
async fn read_alone(
    service: PipeService,
    request: pb::ReplicaReadRequest,
    bound: SkewBound,
) -> Result<Option<Record>, ReplicaError> {
    let answered = match service {
        PipeService::Replica(mut client) => {
            tokio::time::timeout(BATCH_TIMEOUT, client.read(request))
                .await
                .map(|reply| reply.map(|r| record_of(r.into_inner().record, bound)))
        }
        PipeService::ReplicaRead(mut client) => {
            let alone = pb::ReplicaReadBatchRequest {
                reads: vec![request],
            };
            tokio::time::timeout(BATCH_TIMEOUT, client.batch(alone))
                .await
                .map(|reply| {
                    reply.map(|r| match r.into_inner().reads.into_iter().next() {
                        Some(read) => read_result(read, bound),
                        None => Err(ReplicaError::Failed(
                            "the batch answer is missing this read".into(),
                        )),
                    })
                })
        }
    };
    match answered {
        Ok(Ok(result)) => result,
        Ok(Err(status)) => Err(match crate::error::stale_layout_of(&status) {
            Some(current) => ReplicaError::StaleLayout(current),
            None if status.code() == tonic::Code::InvalidArgument => {
                ReplicaError::Rejected(status.message().to_string())
            }
            None => ReplicaError::Failed(describe_status(&status)),
        }),
        Err(_) => Err(ReplicaError::Failed(timed_out(BATCH_TIMEOUT))),
    }
}

#[cfg(test)]
mod tests {
    use super::super::{PeerPool, TcpDialer};
    use super::*;
    use crate::clock::Version;

    /// The smart client's pipe (`ReplicaRead.Batch`) refuses a write without
    /// sending anything; a node's pipe to the same address sends it.
    #[tokio::test]
    async fn the_smart_clients_pipe_refuses_writes_without_sending_them() {
        // Nothing listens here: a write that were sent would fail as
        // unreachable, not be refused.
        let address = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.local_addr().expect("address").to_string()
        };
        let pool = PeerPool::new(Arc::new(TcpDialer::default()), 4 << 20);
        let record = Record::value(Version::new(1 << 16, 1), &b"v"[..]);
        let timeout = Duration::from_secs(2);
        let refused = pool
            .read_handle(&address)
            .expect("read handle")
            .write("k", &record, timeout)
            .await
            .expect_err("a write through the read-only pipe");
        assert!(
            matches!(&refused, ReplicaError::Rejected(why) if why.contains("reads only")),
            "{refused:?}"
        );
        let sent = pool
            .replica_handle(&address, None)
            .expect("node handle")
            .write("k", &record, timeout)
            .await
            .expect_err("nobody listens");
        assert!(matches!(sent, ReplicaError::Failed(_)), "{sent:?}");
    }
}
