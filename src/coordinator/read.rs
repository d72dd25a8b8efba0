//! Quorum reads: answer from the first R replies, repair in the background,
//! and block on repair only when fewer than W replicas hold the answer.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;

use super::{Coordinator, Standing, WriteReplyFuture, asked_failures, roll_call};
use crate::background::Background;
use crate::clock::Version;
use crate::error::{Error, Result};
use crate::net::{ReplicaError, ReplicaHandle};
use crate::quorum::{
    BlockingRepair, Consistency, ReadDecision, ReadTally, RepairPlan, WriteDecision, WriteReply,
    WriteTally,
};
use crate::record::Record;

/// Most reads of one GET whose blocking repair met a newer version.
const MAX_READ_ROUNDS: usize = 5;

type ReadReply =
    Pin<Box<dyn Future<Output = (usize, Result<Option<Record>, ReplicaError>)> + Send>>;

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
            let reply = reply.map_err(|e| match e {
                ReplicaError::Rejected(why) | ReplicaError::Failed(why) => why,
                stale @ ReplicaError::StaleLayout(_) => stale.to_string(),
            });
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
                biased;
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
                Err(ReplicaError::StaleLayout(v)) => {
                    WriteReply::NotSent(format!("refused: it serves newer layout v{v}"))
                }
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
    // The newest layout a replica refused the read for.
    let mut stale: Option<u64> = None;
    // Whether any replica was asked (not when too few were believed up).
    let mut sent = false;
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
                if let Some(current) = stale {
                    return Err(Error::StaleLayout {
                        caller: replicas.first().map_or(0, |r| r.layout_version),
                        current,
                    });
                }
                return Err(Error::QuorumNotReached {
                    operation: "GET",
                    consistency: consistency.name(),
                    acks: tally.replies(),
                    needed,
                    replicas: replicas.len(),
                    roll_call: Box::new(roll_call(&replicas, &standing)),
                    failures: asked_failures(&replicas, tally.failures()),
                    sent,
                });
            }
            ReadDecision::Pending => {}
        }
        sent = true;
        let Some((index, reply)) = in_flight.next().await else {
            return Err(Error::Internal("read ended with no decision".into()));
        };
        let reply = match reply {
            Err(ReplicaError::Rejected(why)) => return Err(Error::InvalidArgument(why)),
            Err(ReplicaError::Failed(why)) => Err(why),
            Err(ReplicaError::StaleLayout(current)) => {
                stale = stale.max(Some(current));
                Err(format!("refused: it serves newer layout v{current}"))
            }
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
            let replicas = self.replicas_for(&view, key)?;
            let read = read_quorum(replicas, key, consistency, self.cluster.rpc_timeout);
            let read = tokio::time::timeout_at(deadline, read)
                .await
                .unwrap_or_else(|_| Err(self.deadline_exceeded("GET")));
            let mut result = match read {
                Err(Error::StaleLayout { current, .. }) => {
                    // Placed with an old layout: learn the new one, read again.
                    self.cluster.catch_up(current, "").await;
                    view = self.cluster.placement();
                    continue;
                }
                other => other?,
            };
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
            // While data moves, a reader on the next or the previous layout
            // reads other replica sets: what this read answers must be held
            // by W replicas in each of them first.
            if let Some(record) = &result.record
                && view.is_moving()
                && matches!(consistency, Consistency::Quorum | Consistency::All)
            {
                let confirmed = tokio::time::timeout_at(
                    deadline,
                    self.confirm_in_write_sets(&view, key, record, consistency),
                )
                .await
                .unwrap_or_else(|_| Err(self.deadline_exceeded("GET")));
                match confirmed {
                    Ok(None) => {}
                    Ok(Some(newer)) => {
                        tracing::debug!(key, %newer, "a replica holds a newer version; reading again");
                        self.local.observe(newer);
                        continue;
                    }
                    Err(Error::StaleLayout { current, .. }) => {
                        self.cluster.catch_up(current, "").await;
                        view = self.cluster.placement();
                        continue;
                    }
                    Err(error) => return Err(error),
                }
            }
            return Ok(result.record);
        }
        Err(Error::Unavailable(format!(
            "GET of {key:?} gave up after {MAX_READ_ROUNDS} reads: each time, a newer version appeared while the newest one read was being repaired to a quorum (heavy concurrent writing to this key)"
        )))
    }

    /// Writes `record` (write-if-newer, its own version) to every replica
    /// set of `key` under `view` until W replicas of each hold it. Answers
    /// `Some(newer)` when a replica holds a newer version (read again).
    async fn confirm_in_write_sets(
        &self,
        view: &crate::placement::Placement,
        key: &str,
        record: &Record,
        consistency: Consistency,
    ) -> Result<Option<Version>> {
        let placed = self.cluster.write_replicas(view, key, &self.local)?;
        let sets: Vec<(Vec<usize>, usize)> = placed
            .sets
            .iter()
            .map(|set| (set.clone(), consistency.required(set.len())))
            .collect();
        let replicas = &placed.handles;
        let mut tally = WriteTally::in_sets(record.version, sets, replicas.len());
        let mut stale = None;
        let mut writes: FuturesUnordered<WriteReplyFuture> = FuturesUnordered::new();
        for (index, replica) in replicas.iter().enumerate() {
            if let Some(why) = &replica.believed_down {
                tally.record_at(index, &replica.address, WriteReply::NotSent(why.clone()));
                continue;
            }
            let (replica, key, record) = (replica.clone(), key.to_string(), record.clone());
            let timeout = self.cluster.rpc_timeout;
            writes.push(Box::pin(async move {
                (index, replica.write(&key, &record, timeout).await)
            }));
        }
        loop {
            match tally.decision() {
                WriteDecision::Pending => {}
                WriteDecision::Acknowledged { .. } => return Ok(None),
                WriteDecision::Restamp { above } | WriteDecision::Superseded { above } => {
                    return Ok(Some(above));
                }
                WriteDecision::Failed => {
                    if let Some(current) = stale {
                        return Err(Error::StaleLayout {
                            caller: view.version(),
                            current,
                        });
                    }
                    return Err(Error::Unavailable(format!(
                        "GET of {key:?}: while data moves, the newest version must be held by {} replicas of every replica set before it is answered, and it could not be written to enough of them: {}",
                        consistency.name(),
                        tally.failures().join("; ")
                    )));
                }
            }
            let Some((index, reply)) = writes.next().await else {
                return Err(Error::Internal(
                    "confirmation ended with no decision".into(),
                ));
            };
            let reply = match reply {
                Ok(outcome) => WriteReply::Holds(outcome.held),
                Err(ReplicaError::Rejected(why)) => WriteReply::Failed(format!("rejected: {why}")),
                Err(ReplicaError::Failed(why)) => WriteReply::Failed(why),
                Err(ReplicaError::StaleLayout(current)) => {
                    stale = stale.max(Some(current));
                    WriteReply::NotSent(format!("refused: it serves newer layout v{current}"))
                }
            };
            tally.record_at(index, &replicas[index].address, reply);
        }
    }
}
