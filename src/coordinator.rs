//! Quorum calls: the async shell around [`crate::quorum`].
//!
//! A coordinator sends a request to all N replicas of a key at once and
//! feeds the replies into a tally as they arrive, answering as soon as the
//! tally says so:
//!
//! * **Writes** stamp a version, answer after W replicas hold it, re-stamp
//!   above any newer version a replica reports, and fail with UNAVAILABLE as
//!   soon as W can no longer be reached. Replies still in flight once the
//!   answer is known keep going in the background, so every live replica gets
//!   the write, not just the first W.
//! * **Reads** answer from the first R replies (newest version wins). The
//!   remaining replies are collected in the background and every replica
//!   found behind the newest version gets it (read repair), off the
//!   client's critical path. Both the node and the smart client read this way.
//! * **Monotonic reads.** At QUORUM and ALL, when fewer than W of the replies
//!   received hold the winning version, repair cannot wait: the node writes
//!   the winner until W replicas hold it and only then answers (or fails
//!   with UNAVAILABLE at the request deadline), so no later read can return
//!   an older value. Cassandra always blocks on read repair, Garage never
//!   does; DKVS blocks only then. The smart client never writes to replicas:
//!   it hands such a read to a node (`KeyValue.Get`).
//!
//! Background work is tracked by a [`Background`] so shutdown can stop it and
//! wait for it, and is bounded by a semaphore so a burst of stale reads
//! cannot spawn without limit.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::Version;
use crate::error::{Error, Result, RollCall};
use crate::failure::FailureDetector;
use crate::hints::{Hint, HintStore, now_ms};
use crate::net::{PeerPool, ReplicaError, ReplicaHandle, call_within};
use crate::pb;
use crate::quorum::{
    BlockingRepair, Consistency, ReadDecision, ReadTally, RepairPlan, WriteDecision, WriteReply,
    WriteTally,
};
use crate::record::Record;
use crate::replica::{ReplicaStore, WriteOutcome};
use crate::ring::{Ring, node_id_for};

/// Most write rounds (re-stamps) before giving up on a hotly contended key.
const MAX_WRITE_ROUNDS: usize = 10;
/// Most reads of one GET whose blocking repair met a newer version.
const MAX_READ_ROUNDS: usize = 5;
/// Most read repairs (and trailing write replies) in flight at once.
const MAX_BACKGROUND_TASKS: usize = 1024;

type ReadReply =
    Pin<Box<dyn Future<Output = (usize, Result<Option<Record>, ReplicaError>)> + Send>>;
type WriteReplyFuture =
    Pin<Box<dyn Future<Output = (usize, Result<WriteOutcome, ReplicaError>)> + Send>>;

/// Spawns bounded background work that stops on shutdown.
#[derive(Clone)]
pub struct Background {
    /// Lets shutdown wait for every task.
    tracker: TaskTracker,
    /// Cancelled on shutdown.
    shutdown: CancellationToken,
    /// Bounds how many tasks run at once.
    permits: Arc<Semaphore>,
    /// Read repairs sent (writes to stale replicas), blocking or not.
    repairs_sent: Arc<AtomicU64>,
    /// Tasks dropped because too many were running.
    dropped: Arc<AtomicU64>,
}

impl Background {
    pub fn new(shutdown: CancellationToken) -> Self {
        Self {
            tracker: TaskTracker::new(),
            shutdown,
            permits: Arc::new(Semaphore::new(MAX_BACKGROUND_TASKS)),
            repairs_sent: Arc::new(AtomicU64::new(0)),
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Runs `task` in the background unless the limit is reached (then it is
    /// dropped, and counted) or shutdown has begun.
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::warn!(
                dropped,
                "background task (read repair or trailing replica write) dropped: {MAX_BACKGROUND_TASKS} already in flight"
            );
            return;
        };
        let shutdown = self.shutdown.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                () = task => {}
                () = shutdown.cancelled() => {}
            }
            drop(permit);
        });
    }

    /// Read repairs sent so far, blocking or not.
    pub fn repairs_sent(&self) -> u64 {
        self.repairs_sent.load(Ordering::Relaxed)
    }

    /// Stops accepting work, and waits for running tasks up to `grace`
    /// before cancelling them.
    pub async fn close(&self, grace: Duration) {
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            self.shutdown.cancel();
            self.tracker.wait().await;
        }
    }
}

/// The outcome of a quorum read: the answer, plus the replies still coming.
pub struct ReadResult {
    /// The newest record among the first R replies (`None`: no replica
    /// asked knows the key).
    pub record: Option<Record>,
    /// Set when fewer than W replicas are known to hold `record`: it must
    /// not be answered before [`PendingRepair::repair_to_quorum`] succeeds.
    pub blocking: Option<BlockingRepair>,
    /// Late replies and repair, to be finished in the background.
    pub repair: PendingRepair,
}

/// How a blocking repair ended, when it did not fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Repaired {
    /// W replicas hold the winner: it may be answered.
    Quorum,
    /// A replica holds a newer version than the winner: read again.
    Superseded { newer: Version },
}

/// What is left of a read once it was answered: late replies to collect and
/// stale replicas to repair.
pub struct PendingRepair {
    key: String,
    replicas: Vec<ReplicaHandle>,
    tally: ReadTally,
    in_flight: FuturesUnordered<ReadReply>,
    rpc_timeout: Duration,
}

impl PendingRepair {
    /// Waits for the remaining replies, then writes the newest record to
    /// every replica that answered with an older one (or none). Answers how
    /// many repairs were sent.
    pub async fn run(mut self) -> usize {
        while let Some((index, reply)) = self.in_flight.next().await {
            let address = &self.replicas[index].address;
            let reply =
                reply.map_err(|(ReplicaError::Rejected(why) | ReplicaError::Failed(why))| why);
            self.tally.record(index, address, reply);
        }
        let Some(RepairPlan { record, stale }) = self.tally.repair_plan() else {
            return 0;
        };
        let writes = stale.iter().map(|&index| {
            let replica = &self.replicas[index];
            let (key, record, timeout) = (&self.key, &record, self.rpc_timeout);
            async move {
                let result = replica.write(key, record, timeout).await;
                if let Err(why) = &result {
                    tracing::debug!(replica = %replica.address, key, %why, "read repair failed");
                }
                result.is_ok()
            }
        });
        let sent = futures::future::join_all(writes).await;
        let repaired = sent.into_iter().filter(|ok| *ok).count();
        if repaired > 0 {
            tracing::debug!(key = %self.key, version = %record.version, repaired, "read repair");
        }
        repaired
    }

    /// Writes `plan.record` to `plan.targets` in parallel until W replicas
    /// hold it, before the read answers. Fails with UNAVAILABLE, saying how
    /// many hold it, when W is out of reach or `deadline` passes first.
    /// Writes still in flight then are left to [`PendingRepair::run`], which
    /// counts a replica they reach as repaired. Every write that stores the
    /// record on a replica counts in `background`'s read repairs.
    pub async fn repair_to_quorum(
        &mut self,
        plan: &BlockingRepair,
        deadline: tokio::time::Instant,
        background: &Background,
    ) -> Result<Repaired> {
        let record = &plan.record;
        let mut tally = plan.tally();
        let mut writes: FuturesUnordered<WriteReplyFuture> = plan
            .targets
            .iter()
            .map(|&index| {
                let (replica, key, record) = (
                    self.replicas[index].clone(),
                    self.key.clone(),
                    record.clone(),
                );
                let (timeout, repairs) = (self.rpc_timeout, background.repairs_sent.clone());
                Box::pin(async move {
                    let reply = replica.write(&key, &record, timeout).await;
                    if reply.as_ref().is_ok_and(|outcome| outcome.applied) {
                        repairs.fetch_add(1, Ordering::Relaxed);
                    }
                    (index, reply)
                }) as WriteReplyFuture
            })
            .collect();
        let decision = loop {
            match tally.decision() {
                WriteDecision::Pending => {}
                decided => break Some(decided),
            }
            let next = tokio::select! {
                next = writes.next() => next,
                () = tokio::time::sleep_until(deadline) => break None,
            };
            let Some((index, reply)) = next else {
                break Some(WriteDecision::Failed);
            };
            let address = &self.replicas[index].address;
            let reply = match reply {
                Ok(outcome) => {
                    if outcome.held == record.version {
                        self.tally.record(index, address, Ok(Some(record.clone())));
                    }
                    WriteReply::Holds(outcome.held)
                }
                Err(ReplicaError::Rejected(why)) => WriteReply::Failed(format!("rejected: {why}")),
                Err(ReplicaError::Failed(why)) => WriteReply::Failed(why),
            };
            tally.record(address, reply);
        };
        // What the remaining writes find out still matters to the
        // asynchronous repair: a replica they reach holds the winner.
        let version = record.version;
        let winner = record.clone();
        self.in_flight.extend(writes.into_iter().map(|write| {
            let winner = winner.clone();
            Box::pin(async move {
                let (index, reply) = write.await;
                let reply = match reply {
                    Ok(outcome) if outcome.held == version => Ok(Some(winner)),
                    Ok(outcome) => Err(ReplicaError::Failed(format!(
                        "holds version {} instead of {version}",
                        outcome.held
                    ))),
                    Err(why) => Err(why),
                };
                (index, reply)
            }) as ReadReply
        }));
        let holding = plan.holding + tally.acks();
        let why = match decision {
            Some(WriteDecision::Acknowledged { .. }) => return Ok(Repaired::Quorum),
            // A replica holds something newer than the winner: read again.
            Some(WriteDecision::Restamp { above } | WriteDecision::Superseded { above }) => {
                return Ok(Repaired::Superseded { newer: above });
            }
            Some(WriteDecision::Failed | WriteDecision::Pending) => {
                "too few replicas could take it".to_string()
            }
            None => "the request deadline passed first (--request-timeout-ms)".to_string(),
        };
        let mut failures = self.tally.failures().to_vec();
        failures.extend_from_slice(tally.failures());
        Err(Error::Unavailable(format!(
            "GET of {:?}: the newest version {version} is held by {holding} of the {} replicas needed ({} replicas for this key) and {why}; it is not answered, so that no later read can return an older value{}",
            self.key,
            plan.needed,
            self.replicas.len(),
            if failures.is_empty() {
                String::new()
            } else {
                format!("; {}", failures.join("; "))
            }
        )))
    }

    /// Schedules [`PendingRepair::run`] on `background`.
    pub fn schedule(self, background: &Background) {
        let counter = background.repairs_sent.clone();
        background.spawn(async move {
            let repaired = self.run().await;
            counter.fetch_add(repaired as u64, Ordering::Relaxed);
        });
    }
}

/// Reads `key` from `replicas` in parallel and answers from the first
/// `consistency.required(N)` replies.
pub async fn read_quorum(
    replicas: Vec<ReplicaHandle>,
    key: &str,
    consistency: Consistency,
    rpc_timeout: Duration,
) -> Result<ReadResult> {
    let needed = consistency.required(replicas.len());
    let mut tally = ReadTally::new(needed, replicas.len());
    let mut standing = Standing::initial(&replicas);
    for (index, replica) in replicas.iter().enumerate() {
        if let Some(why) = &replica.believed_down {
            tally.record(index, &replica.address, Err(why.clone()));
        }
    }
    let mut in_flight: FuturesUnordered<ReadReply> = replicas
        .iter()
        .enumerate()
        .filter(|(_, replica)| replica.believed_down.is_none())
        .map(|(index, replica)| {
            let (replica, key) = (replica.clone(), key.to_string());
            Box::pin(async move { (index, replica.read(&key, rpc_timeout).await) }) as ReadReply
        })
        .collect();
    loop {
        match tally.decision() {
            ReadDecision::Answer(record) => {
                let blocking = tally.blocking_repair(consistency);
                let repair = PendingRepair {
                    key: key.to_string(),
                    replicas,
                    tally,
                    in_flight,
                    rpc_timeout,
                };
                return Ok(ReadResult {
                    record,
                    blocking,
                    repair,
                });
            }
            ReadDecision::Failed => {
                return Err(Error::QuorumNotReached {
                    operation: "GET",
                    consistency: consistency.name(),
                    acks: tally.replies(),
                    needed,
                    replicas: replicas.len(),
                    roll_call: Box::new(roll_call(&replicas, &standing)),
                    failures: asked_failures(&replicas, tally.failures()),
                });
            }
            ReadDecision::Pending => {}
        }
        let Some((index, reply)) = in_flight.next().await else {
            return Err(Error::Internal("read ended with no decision".into()));
        };
        let reply = match reply {
            Err(ReplicaError::Rejected(why)) => return Err(Error::InvalidArgument(why)),
            Err(ReplicaError::Failed(why)) => Err(why),
            Ok(record) => Ok(record),
        };
        standing[index] = if reply.is_ok() {
            Standing::Answered
        } else {
            Standing::Failed
        };
        tally.record(index, &replicas[index].address, reply);
    }
}

/// A write's outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteAck {
    /// The version the write was stored under.
    pub version: Version,
    /// Replicas that held it when the answer was sent.
    pub acks: usize,
}

/// Coordinates client requests on a node.
pub struct Coordinator {
    /// This node's replica: the clock, and the in-process replica.
    local: Arc<ReplicaStore>,
    /// This node's advertised address (to recognise itself on the ring).
    self_address: String,
    /// The ring all nodes share.
    ring: Arc<Ring>,
    /// Replicas per key, N.
    replicas: usize,
    /// Channels to the other nodes.
    peers: Arc<PeerPool>,
    /// Deadline of each call to a replica.
    rpc_timeout: Duration,
    /// Deadline of a whole client request.
    request_timeout: Duration,
    /// Where read repairs and trailing write replies run.
    background: Background,
    /// Which peers are believed down (std mutex: held for a lookup).
    liveness: Arc<Mutex<FailureDetector>>,
    /// Stores hints for replicas that miss writes.
    hinter: Hinter,
    /// Reads that had to repair their answer to W replicas before answering.
    blocking_repairs: AtomicU64,
    /// Per-key (striped) order of writes this node coordinates: a write is
    /// stamped only after the previous write to its key here was decided,
    /// so this node's own writes to a hot key never overtake each other at
    /// a replica (which would supersede the older one). Async mutexes: held
    /// across the write round.
    write_order: Vec<tokio::sync::Mutex<()>>,
}

/// Stripes of [`Coordinator::write_order`].
const WRITE_ORDER_STRIPES: usize = 4096;

impl Coordinator {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        local: Arc<ReplicaStore>,
        self_address: String,
        ring: Arc<Ring>,
        replicas: usize,
        peers: Arc<PeerPool>,
        rpc_timeout: Duration,
        request_timeout: Duration,
        background: Background,
        liveness: Arc<Mutex<FailureDetector>>,
        hints: Arc<HintStore>,
    ) -> Self {
        let hinter = Hinter {
            ring: ring.clone(),
            replicas,
            self_address: self_address.clone(),
            local: hints,
            liveness: liveness.clone(),
            peers: peers.clone(),
            rpc_timeout,
        };
        Self {
            local,
            self_address,
            ring,
            replicas,
            peers,
            rpc_timeout,
            request_timeout,
            background,
            liveness,
            hinter,
            blocking_repairs: AtomicU64::new(0),
            write_order: (0..WRITE_ORDER_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
        }
    }

    pub fn background(&self) -> &Background {
        &self.background
    }

    /// Reads so far that repaired their answer to W replicas before
    /// answering (successfully or not).
    pub fn blocking_repairs(&self) -> u64 {
        self.blocking_repairs.load(Ordering::Relaxed)
    }

    /// Handles to the key's N replicas, this node's own store in-process.
    fn replicas_for(&self, key: &str) -> Result<Vec<ReplicaHandle>> {
        let members = self.ring.preference_list(key.as_bytes(), self.replicas);
        let healths: Vec<_> = {
            let liveness = self
                .liveness
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let now = Instant::now();
            members
                .iter()
                .map(|m| liveness.health(&m.address, now))
                .collect()
        };
        members
            .into_iter()
            .zip(healths)
            .map(|(member, health)| {
                let local = (member.address == self.self_address).then_some(&self.local);
                let mut handle = self.peers.replica_handle(&member.address, local)?;
                if !health.up {
                    handle.believed_down = Some(format!(
                        "believed down by the failure detector (phi {:.1}{})",
                        health.phi,
                        health
                            .last_error
                            .map(|e| format!("; last heartbeat: {e}"))
                            .unwrap_or_default()
                    ));
                }
                Ok(handle)
            })
            .collect()
    }

    async fn with_deadline<T>(
        &self,
        operation: &str,
        work: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        tokio::time::timeout(self.request_timeout, work)
            .await
            .unwrap_or_else(|_| Err(self.deadline_exceeded(operation)))
    }

    fn deadline_exceeded(&self, operation: &str) -> Error {
        Error::DeadlineExceeded(format!(
            "{operation} did not finish within {} ms (--request-timeout-ms); replicas may be overloaded",
            self.request_timeout.as_millis()
        ))
    }

    /// Reads `key`; `None` when it does not exist or was deleted (the
    /// tombstone is returned so its version can be reported).
    ///
    /// A winner held by fewer than W replicas is written to more of them
    /// first (see [`PendingRepair::repair_to_quorum`]). If a replica turns
    /// out to hold a newer version meanwhile, the winner is no longer the
    /// newest: the key is read again (at most [`MAX_READ_ROUNDS`] times,
    /// all within the request deadline) rather than answering a version
    /// that may already be superseded.
    pub async fn get(&self, key: &str, consistency: Consistency) -> Result<Option<Record>> {
        let deadline = tokio::time::Instant::now() + self.request_timeout;
        let mut blocked = false;
        for _ in 0..MAX_READ_ROUNDS {
            let replicas = self.replicas_for(key)?;
            let read = read_quorum(replicas, key, consistency, self.rpc_timeout);
            let mut result = tokio::time::timeout_at(deadline, read)
                .await
                .unwrap_or_else(|_| Err(self.deadline_exceeded("GET")))?;
            if let Some(plan) = result.blocking.take() {
                if !blocked {
                    blocked = true;
                    self.blocking_repairs.fetch_add(1, Ordering::Relaxed);
                }
                tracing::debug!(
                    key,
                    version = %plan.record.version,
                    holding = plan.holding,
                    needed = plan.needed,
                    "newest version held by fewer than W replicas; repairing before answering"
                );
                let repaired = result
                    .repair
                    .repair_to_quorum(&plan, deadline, &self.background)
                    .await;
                match repaired {
                    Ok(Repaired::Quorum) => {}
                    Ok(Repaired::Superseded { newer }) => {
                        tracing::debug!(key, %newer, "a replica holds a newer version; reading again");
                        self.local.observe(newer);
                        result.repair.schedule(&self.background);
                        continue;
                    }
                    Err(error) => {
                        result.repair.schedule(&self.background);
                        return Err(error);
                    }
                }
            }
            if let Some(record) = &result.record {
                self.local.observe(record.version);
            }
            result.repair.schedule(&self.background);
            return Ok(result.record);
        }
        Err(Error::Unavailable(format!(
            "GET of {key:?} gave up after {MAX_READ_ROUNDS} reads: each time, a newer version appeared while the newest one read was being repaired to a quorum (heavy concurrent writing to this key)"
        )))
    }

    /// Writes `value` (or a tombstone for `None`) under `key`.
    pub async fn put(
        &self,
        key: &str,
        value: Option<Bytes>,
        consistency: Consistency,
    ) -> Result<WriteAck> {
        let operation = if value.is_some() { "PUT" } else { "DELETE" };
        self.with_deadline(operation, self.write(operation, key, value, consistency))
            .await
    }

    async fn write(
        &self,
        operation: &'static str,
        key: &str,
        value: Option<Bytes>,
        consistency: Consistency,
    ) -> Result<WriteAck> {
        let stripe = xxhash_rust::xxh3::xxh3_64(key.as_bytes()) as usize % WRITE_ORDER_STRIPES;
        let _in_order = self.write_order[stripe].lock().await;
        let replicas = self.replicas_for(key)?;
        let needed = consistency.required(replicas.len());
        let mut version = self.local.next_version()?;
        for round in 0..MAX_WRITE_ROUNDS {
            let record = Record::new(version, value.clone(), now_ms());
            let mut tally = WriteTally::new(version, needed, replicas.len());
            // Replicas that failed this round: they get hints if the write succeeds.
            let mut failed: Vec<usize> = Vec::new();
            for (index, replica) in replicas.iter().enumerate() {
                if let Some(why) = &replica.believed_down {
                    tally.record(&replica.address, WriteReply::NotSent(why.clone()));
                    failed.push(index);
                }
            }
            let mut in_flight: FuturesUnordered<WriteReplyFuture> = replicas
                .iter()
                .enumerate()
                .filter(|(_, replica)| replica.believed_down.is_none())
                .map(|(index, replica)| {
                    let (replica, key, record) = (replica.clone(), key.to_string(), record.clone());
                    let timeout = self.rpc_timeout;
                    Box::pin(async move { (index, replica.write(&key, &record, timeout).await) })
                        as WriteReplyFuture
                })
                .collect();
            let mut standing = Standing::initial(&replicas);
            let decision = loop {
                match tally.decision() {
                    WriteDecision::Pending => {}
                    decided => break decided,
                }
                let Some((index, reply)) = in_flight.next().await else {
                    break WriteDecision::Failed;
                };
                standing[index] = match &reply {
                    Ok(outcome) if outcome.held == version => Standing::Answered,
                    _ => Standing::Failed,
                };
                let reply = match reply {
                    Ok(outcome) => {
                        self.local.observe(outcome.held);
                        WriteReply::Holds(outcome.held)
                    }
                    // A replica that refused the write as invalid gets no
                    // hint: delivering it would fail the same way.
                    Err(ReplicaError::Rejected(why)) => {
                        WriteReply::Failed(format!("rejected: {why}"))
                    }
                    Err(ReplicaError::Failed(why)) => {
                        failed.push(index);
                        WriteReply::Failed(why)
                    }
                };
                tally.record(&replicas[index].address, reply);
            };
            let succeeded = matches!(decision, WriteDecision::Acknowledged { .. });
            // Let the rest of this round reach its replicas; a replica that
            // fails now still gets a hint if the write succeeded.
            if !in_flight.is_empty() {
                let hinter = self.hinter.clone();
                let (addresses, key, record) =
                    (addresses_of(&replicas), key.to_string(), record.clone());
                self.background.spawn(async move {
                    while let Some((index, reply)) = in_flight.next().await {
                        if succeeded && matches!(reply, Err(ReplicaError::Failed(_))) {
                            hinter.send_logged(&addresses[index], &key, &record).await;
                        }
                    }
                });
            }
            match decision {
                WriteDecision::Acknowledged { acks } => {
                    self.hint_in_background(&replicas, &failed, key, &record);
                    return Ok(WriteAck { version, acks });
                }
                WriteDecision::Superseded { above } => {
                    self.local.observe(above);
                    return Err(Error::Superseded {
                        operation,
                        key: key.to_string(),
                        version,
                        above,
                        acks: tally.acks(),
                    });
                }
                WriteDecision::Restamp { above } => {
                    tracing::debug!(key, %version, %above, "a replica holds a newer version; re-stamping");
                    self.local.observe(above);
                    // Concurrent writers to one key would otherwise keep
                    // overtaking each other in lock step.
                    tokio::time::sleep(restamp_backoff(round, key)).await;
                    version = self.local.next_version()?;
                }
                WriteDecision::Failed | WriteDecision::Pending => {
                    if consistency == Consistency::Any {
                        // No replica holds it: a stored hint is enough for ANY.
                        let sends = failed
                            .iter()
                            .map(|&i| self.hinter.send(&replicas[i].address, key, &record));
                        let stored = futures::future::join_all(sends)
                            .await
                            .iter()
                            .filter(|r| r.is_ok())
                            .count();
                        if stored > 0 {
                            return Ok(WriteAck { version, acks: 0 });
                        }
                    }
                    return Err(Error::QuorumNotReached {
                        operation,
                        consistency: consistency.name(),
                        acks: tally.acks(),
                        needed,
                        replicas: replicas.len(),
                        roll_call: Box::new(roll_call(&replicas, &standing)),
                        failures: asked_failures(&replicas, tally.failures()),
                    });
                }
            }
        }
        Err(Error::Unavailable(format!(
            "{operation} of {key:?} gave up after {MAX_WRITE_ROUNDS} rounds: replicas kept reporting newer versions (heavy concurrent writing to this key)"
        )))
    }

    /// Stores hints for the replicas that missed an acknowledged write.
    fn hint_in_background(
        &self,
        replicas: &[ReplicaHandle],
        failed: &[usize],
        key: &str,
        record: &Record,
    ) {
        if failed.is_empty() {
            return;
        }
        let hinter = self.hinter.clone();
        let targets: Vec<String> = failed
            .iter()
            .map(|&i| replicas[i].address.clone())
            .collect();
        let (key, record) = (key.to_string(), record.clone());
        self.background.spawn(async move {
            for target in targets {
                hinter.send_logged(&target, &key, &record).await;
            }
        });
    }
}

/// Where one replica stands in a quorum call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Standing {
    /// Not asked: believed down.
    NotAsked,
    /// Asked, no answer yet.
    Waiting,
    /// Answered (for writes: holds this round's version).
    Answered,
    /// Asked, and failed (or, for writes, kept another version).
    Failed,
}

impl Standing {
    fn initial(replicas: &[ReplicaHandle]) -> Vec<Standing> {
        replicas
            .iter()
            .map(|r| {
                if r.believed_down.is_some() {
                    Standing::NotAsked
                } else {
                    Standing::Waiting
                }
            })
            .collect()
    }
}

/// The replicas of a failed quorum call, by what they did.
fn roll_call(replicas: &[ReplicaHandle], standing: &[Standing]) -> RollCall {
    let with = |wanted: Standing| -> Vec<String> {
        replicas
            .iter()
            .zip(standing)
            .filter(|(_, s)| **s == wanted)
            .map(|(r, _)| r.address.clone())
            .collect()
    };
    RollCall {
        answered: with(Standing::Answered),
        not_asked: with(Standing::NotAsked),
        waiting: with(Standing::Waiting),
    }
}

/// The tally's failure lines without those of replicas that were not asked
/// (the roll call names them).
fn asked_failures(replicas: &[ReplicaHandle], failures: &[String]) -> Vec<String> {
    failures
        .iter()
        .filter(|line| {
            !replicas.iter().any(|r| {
                r.believed_down.is_some()
                    && line
                        .strip_prefix(r.address.as_str())
                        .is_some_and(|rest| rest.starts_with(": "))
            })
        })
        .cloned()
        .collect()
}

fn addresses_of(replicas: &[ReplicaHandle]) -> Vec<String> {
    replicas.iter().map(|r| r.address.clone()).collect()
}

/// Stores hints on the right node: the first live node clockwise beyond the
/// key's preference list (the coordinator itself when none is).
#[derive(Clone)]
pub struct Hinter {
    /// The ring all nodes share.
    ring: Arc<Ring>,
    /// Replicas per key, N.
    replicas: usize,
    /// This node's address.
    self_address: String,
    /// This node's hint store.
    local: Arc<HintStore>,
    /// Which peers are believed down.
    liveness: Arc<Mutex<FailureDetector>>,
    /// Channels to peers.
    peers: Arc<PeerPool>,
    /// Deadline of the StoreHint call.
    rpc_timeout: Duration,
}

impl Hinter {
    /// Where a hint for `key` should be kept.
    fn holder(&self, key: &str) -> String {
        let everyone = self
            .ring
            .preference_list(key.as_bytes(), self.ring.members().len());
        let liveness = self.liveness.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        everyone
            .into_iter()
            .skip(self.replicas)
            .find(|m| liveness.is_up(&m.address, now))
            .map(|m| m.address.clone())
            .unwrap_or_else(|| self.self_address.clone())
    }

    /// Stores a hint for `target` (a replica of `key` that missed `record`).
    pub async fn send(&self, target: &str, key: &str, record: &Record) -> Result<(), String> {
        let holder = self.holder(key);
        if holder == self.self_address {
            let hint = Hint {
                target: node_id_for(target),
                key: key.to_string(),
                record: record.clone(),
                created_ms: now_ms(),
            };
            return self.local.store(&hint).map_err(|e| e.to_string());
        }
        let mut client = self
            .peers
            .replica_client(&holder)
            .map_err(|e| e.to_string())?;
        let request = pb::StoreHintRequest {
            target: target.to_string(),
            key: key.to_string(),
            record: Some(record.into()),
        };
        call_within(self.rpc_timeout, client.store_hint(request))
            .await
            .map(|_| ())
            .map_err(|why| format!("{holder}: {why}"))
    }

    async fn send_logged(&self, target: &str, key: &str, record: &Record) {
        if let Err(why) = self.send(target, key, record).await {
            tracing::warn!(target, key, %why, "could not store a hint; anti-entropy will repair the replica");
        }
    }
}

/// A random pause before write round `round + 1`: up to 2^round ms, capped at 64 ms.
fn restamp_backoff(round: usize, key: &str) -> Duration {
    let cap_ms = 1u64 << round.min(6);
    let noise = xxhash_rust::xxh3::xxh3_64_with_seed(
        key.as_bytes(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    );
    Duration::from_micros(noise % (cap_ms * 1000 + 1))
}
