//! Quorum reads: answer from the first R replies, repair in the background,
//! and block on repair only when fewer than W replicas hold the answer.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;

use super::{Coordinator, targets_of};
use crate::background::Background;
use crate::clock::Version;
use crate::error::{Error, Result};
use crate::fanout::{Call, Ended, FanOut, Stragglers, Tally};
use crate::net::{ReplicaError, ReplicaHandle};
use crate::placement::Placement;
use crate::quorum::{
    BlockingRepair, Consistency, Placed, ReadDecision, ReadTally, RepairPlan, Standing, Step,
    WriteDecision, WriteReply, WriteRound, WriteTally, asked_failures, roll_call,
};
use crate::record::Record;
use crate::replica::WriteOutcome;

/// Most reads of one GET whose blocking repair met a newer version.
const MAX_READ_ROUNDS: usize = 5;

/// What one read of a GET ended with.
enum ReadRound {
    /// The record to answer (`None`: not found).
    Answer(Option<Record>),
    /// Read again: a newer version appeared, or the layout moved on.
    Again,
}

/// A replica's answer to a quorum read.
type ReadReply = Result<Option<Record>, ReplicaError>;

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
    in_flight: FuturesUnordered<Call<ReadReply>>,
    rpc_timeout: Duration,
}

/// One quorum read's replies, as [`FanOut`] feeds them.
struct ReadCall<'a> {
    replicas: &'a [ReplicaHandle],
    tally: ReadTally,
    standing: Vec<Standing>,
    /// The newest layout a replica refused the read for.
    stale: Option<u64>,
    /// A replica refused the request itself: other replicas will too.
    rejected: Option<String>,
}

/// What a quorum read decided.
enum ReadVerdict {
    Answer(Option<Record>),
    Failed,
    Rejected(String),
}

impl Tally<ReadReply> for ReadCall<'_> {
    type Verdict = ReadVerdict;

    fn record(&mut self, index: usize, reply: ReadReply) {
        let reply = match reply {
            Err(ReplicaError::Rejected(why)) => {
                self.rejected.get_or_insert(why.clone());
                Err(format!("rejected: {why}"))
            }
            Err(ReplicaError::Failed(why)) => Err(why),
            Err(ReplicaError::StaleLayout(current)) => {
                self.stale = self.stale.max(Some(current));
                Err(format!("refused: it serves newer layout v{current}"))
            }
            Ok(record) => Ok(record),
        };
        if let Some(standing) = self.standing.get_mut(index) {
            *standing = if reply.is_ok() {
                Standing::Answered
            } else {
                Standing::Failed
            };
        }
        self.tally
            .record(index, &self.replicas[index].address, reply);
    }

    fn verdict(&self) -> Option<ReadVerdict> {
        if let Some(why) = &self.rejected {
            return Some(ReadVerdict::Rejected(why.clone()));
        }
        match self.tally.decision() {
            ReadDecision::Answer(record) => Some(ReadVerdict::Answer(record)),
            ReadDecision::Failed => Some(ReadVerdict::Failed),
            ReadDecision::Pending => None,
        }
    }
}

/// The writes of a blocking repair, counted towards W; a replica they
/// reach also counts as holding the winner in the read's own tally.
struct RepairWrites<'a> {
    writes: WriteTally,
    read: &'a mut ReadTally,
    replicas: &'a [ReplicaHandle],
    winner: &'a Record,
}

impl Tally<Result<WriteOutcome, ReplicaError>> for RepairWrites<'_> {
    type Verdict = WriteDecision;

    fn record(&mut self, index: usize, reply: Result<WriteOutcome, ReplicaError>) {
        let address = &self.replicas[index].address;
        let reply = match reply {
            Ok(outcome) => {
                if outcome.held == self.winner.version {
                    self.read
                        .record(index, address, Ok(Some(self.winner.clone())));
                }
                WriteReply::Holds(outcome.held)
            }
            Err(ReplicaError::Rejected(why)) => WriteReply::Failed(format!("rejected: {why}")),
            Err(ReplicaError::Failed(why)) => WriteReply::Failed(why),
            Err(ReplicaError::StaleLayout(v)) => {
                WriteReply::NotSent(format!("refused: it serves newer layout v{v}"))
            }
        };
        self.writes.record(address, reply);
    }

    fn verdict(&self) -> Option<WriteDecision> {
        match self.writes.decision() {
            WriteDecision::Pending => None,
            decided => Some(decided),
        }
    }
}

impl PendingRepair {
    /// Waits for the remaining replies; answers the newest record and the
    /// replicas that answered with an older one (or none), if any.
    async fn settle(&mut self) -> Option<RepairPlan> {
        while let Some((index, reply)) = self.in_flight.next().await {
            let address = &self.replicas[index].address;
            let reply = reply.map_err(|e| match e {
                ReplicaError::Rejected(why) | ReplicaError::Failed(why) => why,
                stale @ ReplicaError::StaleLayout(_) => stale.to_string(),
            });
            self.tally.record(index, address, reply);
        }
        self.tally.repair_plan()
    }

    /// Waits for the remaining replies and answers the addresses of the
    /// replicas found behind, writing to none: for the smart client, which
    /// cannot write to replicas and asks a node to repair them.
    pub async fn behind(mut self) -> Vec<String> {
        match self.settle().await {
            Some(plan) => plan
                .stale
                .iter()
                .map(|&index| self.replicas[index].address.clone())
                .collect(),
            None => Vec::new(),
        }
    }

    /// Waits for the remaining replies, then writes the newest record to
    /// every replica that answered with an older one (or none). Answers how
    /// many repairs were sent.
    pub async fn run(mut self) -> usize {
        let Some(RepairPlan { record, stale }) = self.settle().await else {
            return 0;
        };
        let writes = stale.iter().map(|&index| {
            let replica = &self.replicas[index];
            let (key, record, timeout) = (&self.key, &record, self.rpc_timeout);
            async move {
                let result = replica.write(key, record, timeout).await;
                if let Err(why) = &result {
                    tracing::debug!(replica = %replica.address, key_hash = %crate::metrics::key_hash(key), %why, "read repair failed");
                }
                result.is_ok()
            }
        });
        let sent = futures::future::join_all(writes).await;
        let repaired = sent.into_iter().filter(|ok| *ok).count();
        if repaired > 0 {
            tracing::debug!(key_hash = %crate::metrics::key_hash(&self.key), version = %record.version, repaired, "read repair");
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
        let mut writes = self.send_repair_writes(plan, background);
        let mut tally = RepairWrites {
            writes: plan.tally(),
            read: &mut self.tally,
            replicas: &self.replicas,
            winner: record,
        };
        let ended = writes.collect(&mut tally, Some(deadline)).await;
        let (acks, repair_failures) = (tally.writes.acks(), tally.writes.failures().to_vec());
        self.follow_late_repair_writes(writes, record);
        let version = record.version;
        let holding = plan.holding + acks;
        let why = match ended {
            Ended::Decided(WriteDecision::Acknowledged { .. }) => return Ok(Repaired::Quorum),
            // A replica holds something newer than the winner: read again.
            Ended::Decided(
                WriteDecision::Restamp { above } | WriteDecision::Superseded { above },
            ) => {
                return Ok(Repaired::Superseded { newer: above });
            }
            Ended::Decided(WriteDecision::Failed | WriteDecision::Pending) | Ended::Exhausted => {
                "too few replicas could take it".to_string()
            }
            Ended::DeadlinePassed => {
                "the request deadline passed first (--request-timeout-ms)".to_string()
            }
        };
        let mut failures = self.tally.failures().to_vec();
        failures.extend(repair_failures);
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

    /// Sends `plan.record` to each of `plan.targets`; a write that stores
    /// it counts in `background`'s read repairs.
    fn send_repair_writes(
        &self,
        plan: &BlockingRepair,
        background: &Background,
    ) -> FanOut<Result<WriteOutcome, ReplicaError>> {
        // Abandon: the writes still in flight are handed to `run` (see
        // `follow_late_repair_writes`).
        let mut writes = FanOut::new(Stragglers::Abandon);
        for &index in &plan.targets {
            let (replica, key, record) = (
                self.replicas[index].clone(),
                self.key.clone(),
                plan.record.clone(),
            );
            let (timeout, repairs) = (self.rpc_timeout, background.repairs_sent.clone());
            writes.send(index, async move {
                let reply = replica.write(&key, &record, timeout).await;
                if reply.as_ref().is_ok_and(|outcome| outcome.applied) {
                    repairs.fetch_add(1, Ordering::Relaxed);
                }
                reply
            });
        }
        writes
    }

    /// Hands the repair writes still in flight to [`PendingRepair::run`]:
    /// what they find out still matters to the asynchronous repair, as a
    /// replica they reach holds the `winner`.
    fn follow_late_repair_writes(
        &mut self,
        writes: FanOut<Result<WriteOutcome, ReplicaError>>,
        winner: &Record,
    ) {
        let version = winner.version;
        let winner = winner.clone();
        self.in_flight
            .extend(writes.into_calls().into_iter().map(|write| {
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
                }) as Call<ReadReply>
            }));
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
    let targets = targets_of(&replicas);
    let mut call = ReadCall {
        replicas: &replicas,
        tally: ReadTally::new(needed, replicas.len()),
        standing: Standing::initial(&targets),
        stale: None,
        rejected: None,
    };
    let mut reads = FanOut::new(Stragglers::Abandon);
    for (index, replica) in replicas.iter().enumerate() {
        if let Some(why) = &replica.believed_down {
            call.tally.record(index, &replica.address, Err(why.clone()));
            continue;
        }
        let (replica, key) = (replica.clone(), key.to_string());
        reads.send(index, async move { replica.read(&key, rpc_timeout).await });
    }
    // Nothing is asked when too few replicas are believed up to answer.
    let sent = call.verdict().is_none() && reads.pending() > 0;
    let verdict = match reads.collect(&mut call, None).await {
        Ended::Decided(verdict) => verdict,
        Ended::Exhausted | Ended::DeadlinePassed => {
            return Err(Error::Internal("read ended with no decision".into()));
        }
    };
    let ReadCall {
        tally,
        standing,
        stale,
        ..
    } = call;
    match verdict {
        ReadVerdict::Answer(record) => {
            let blocking = tally.blocking_repair(consistency);
            let repair = PendingRepair {
                key: key.to_string(),
                replicas,
                tally,
                in_flight: reads.into_calls(),
                rpc_timeout,
            };
            Ok(ReadResult {
                record,
                blocking,
                repair,
            })
        }
        ReadVerdict::Rejected(why) => Err(Error::InvalidArgument(why)),
        ReadVerdict::Failed => {
            if let Some(current) = stale {
                return Err(Error::StaleLayout {
                    caller: replicas.first().map_or(0, |r| r.layout_version),
                    current,
                });
            }
            Err(Error::QuorumNotReached {
                operation: "GET",
                consistency: consistency.name(),
                acks: tally.replies(),
                needed,
                replicas: replicas.len(),
                roll_call: Box::new(roll_call(&targets, &standing)),
                failures: asked_failures(&targets, tally.failures()),
                sent,
            })
        }
    }
}

impl Coordinator {
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
        let mut view = self.cluster.placement();
        let mut blocked = false;
        for _ in 0..MAX_READ_ROUNDS {
            let round = self.read_round(&mut view, key, consistency, deadline, &mut blocked);
            match round.await? {
                ReadRound::Answer(record) => return Ok(record),
                ReadRound::Again => continue,
            }
        }
        Err(Error::Unavailable(format!(
            "GET of {key:?} gave up after {MAX_READ_ROUNDS} reads: each time, a newer version appeared while the newest one read was being repaired to a quorum (heavy concurrent writing to this key)"
        )))
    }

    /// One read of a GET under `view`: a quorum read, the blocking repair
    /// if the winner is held by fewer than W replicas (counted once per GET
    /// through `blocked`), background repair, and while data moves the
    /// confirmation in every write set. A stale layout refreshes `view`.
    async fn read_round(
        &self,
        view: &mut Arc<Placement>,
        key: &str,
        consistency: Consistency,
        deadline: tokio::time::Instant,
        blocked: &mut bool,
    ) -> Result<ReadRound> {
        let replicas = self.replicas_for(view, key)?;
        let read = read_quorum(replicas, key, consistency, self.cluster.rpc_timeout);
        let read = tokio::time::timeout_at(deadline, read)
            .await
            .unwrap_or_else(|_| Err(self.deadline_exceeded("GET")));
        let mut result = match read {
            Err(Error::StaleLayout { current, .. }) => {
                // Placed with an old layout: learn the new one, read again.
                self.cluster.catch_up(current, "").await;
                *view = self.cluster.placement();
                return Ok(ReadRound::Again);
            }
            other => other?,
        };
        if let Some(plan) = result.blocking.take() {
            if !*blocked {
                *blocked = true;
                self.blocking_repairs.fetch_add(1, Ordering::Relaxed);
            }
            match self
                .repair_before_answering(key, &plan, result, deadline)
                .await?
            {
                Some(repaired) => result = repaired,
                None => return Ok(ReadRound::Again),
            }
        }
        if let Some(record) = &result.record {
            self.local.observe(record.version);
        }
        result.repair.schedule(&self.background);
        // While data moves, a reader on the next or the previous layout
        // reads other replica sets: what this read answers must be held
        // by W replicas in each of them first.
        if let Some(record) = &result.record
            && view.is_moving()
            && matches!(consistency, Consistency::Quorum | Consistency::All)
        {
            let confirmed = tokio::time::timeout_at(
                deadline,
                self.confirm_in_write_sets(view, key, record, consistency),
            )
            .await
            .unwrap_or_else(|_| Err(self.deadline_exceeded("GET")));
            match confirmed {
                Ok(None) => {}
                Ok(Some(newer)) => {
                    tracing::debug!(key_hash = %crate::metrics::key_hash(key), %newer, "a replica holds a newer version; reading again");
                    self.local.observe(newer);
                    return Ok(ReadRound::Again);
                }
                Err(Error::StaleLayout { current, .. }) => {
                    self.cluster.catch_up(current, "").await;
                    *view = self.cluster.placement();
                    return Ok(ReadRound::Again);
                }
                Err(error) => return Err(error),
            }
        }
        Ok(ReadRound::Answer(result.record))
    }

    /// Writes the winner of `result` to W replicas before it is answered
    /// (see [`PendingRepair::repair_to_quorum`]). Gives the result back to
    /// answer from, or `None` when a replica holds a newer version (read
    /// again); unless it is given back, its background repair is scheduled.
    async fn repair_before_answering(
        &self,
        key: &str,
        plan: &BlockingRepair,
        mut result: ReadResult,
        deadline: tokio::time::Instant,
    ) -> Result<Option<ReadResult>> {
        tracing::debug!(
            key,
            version = %plan.record.version,
            holding = plan.holding,
            needed = plan.needed,
            "newest version held by fewer than W replicas; repairing before answering"
        );
        let repaired = result
            .repair
            .repair_to_quorum(plan, deadline, &self.background)
            .await;
        match repaired {
            Ok(Repaired::Quorum) => Ok(Some(result)),
            Ok(Repaired::Superseded { newer }) => {
                tracing::debug!(key_hash = %crate::metrics::key_hash(key), %newer, "a replica holds a newer version; reading again");
                self.local.observe(newer);
                result.repair.schedule(&self.background);
                Ok(None)
            }
            Err(error) => {
                result.repair.schedule(&self.background);
                Err(error)
            }
        }
    }

    /// Writes `record` (write-if-newer, its own version) to every replica
    /// set of `key` under `view` until W replicas of each hold it: one round
    /// of the write protocol. Answers `Some(newer)` when a replica holds a
    /// newer version (read again).
    async fn confirm_in_write_sets(
        &self,
        view: &Placement,
        key: &str,
        record: &Record,
        consistency: Consistency,
    ) -> Result<Option<Version>> {
        let placed = self.cluster.write_replicas(view, key, &self.local)?;
        let replicas = placed.handles;
        let placement = Placed {
            targets: targets_of(&replicas),
            sets: placed.sets,
            layout_version: view.version(),
        };
        let mut write = WriteRound::new("GET", key, consistency, record.version, placement);
        let Step::Send { to, .. } = write.start() else {
            return Err(Error::Internal("a confirmation round sent nothing".into()));
        };
        let calls = self
            .write_round_calls(&mut write, &replicas, to, key, record)
            .await;
        let step = write.round_over(calls.pending() > 0);
        calls.finish(|_, _| async {}).await;
        match step {
            Step::Acknowledged { .. } => Ok(None),
            Step::Restamp { above, .. } | Step::Fail(Error::Superseded { above, .. }) => {
                Ok(Some(above))
            }
            Step::CatchUp { layout, .. } => Err(Error::StaleLayout {
                caller: view.version(),
                current: layout,
            }),
            Step::Fail(Error::QuorumNotReached { failures, .. }) => {
                Err(Error::Unavailable(format!(
                    "GET of {key:?}: while data moves, the newest version must be held by {} replicas of every replica set before it is answered, and it could not be written to enough of them: {}",
                    consistency.name(),
                    failures.join("; ")
                )))
            }
            Step::Fail(error) => Err(error),
            Step::Send { .. } | Step::StoreHints { .. } => Err(Error::Internal(
                "a confirmation round asked for another round".into(),
            )),
        }
    }
}
