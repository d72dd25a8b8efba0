//! Quorum writes: stamp, send to all N, answer at W, re-stamp above a newer
//! version, hint the replicas that missed an acknowledged write.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;

use super::{
    Coordinator, Standing, WRITE_ORDER_STRIPES, WriteAck, WriteReplyFuture, addresses_of,
    asked_failures, roll_call,
};
use crate::clock::wall_clock_ms;
use crate::error::{Error, Result};
use crate::net::{ReplicaError, ReplicaHandle};
use crate::quorum::{Consistency, WriteDecision, WriteReply, WriteTally};
use crate::record::Record;

/// Most write rounds (re-stamps) before giving up on a hotly contended key.
const MAX_WRITE_ROUNDS: usize = 10;

impl Coordinator {
    /// Writes `value` under `key`, or a tombstone for `None` (a delete).
    pub async fn write(
        &self,
        key: &str,
        value: Option<Bytes>,
        consistency: Consistency,
    ) -> Result<WriteAck> {
        let operation = if value.is_some() { "PUT" } else { "DELETE" };
        self.with_deadline(
            operation,
            self.write_rounds(operation, key, value, consistency),
        )
        .await
    }

    async fn write_rounds(
        &self,
        operation: &'static str,
        key: &str,
        value: Option<Bytes>,
        consistency: Consistency,
    ) -> Result<WriteAck> {
        let stripe = xxhash_rust::xxh3::xxh3_64(key.as_bytes()) as usize % WRITE_ORDER_STRIPES;
        let _in_order = self.write_order[stripe].lock().await;
        let mut view = self.cluster.placement();
        let mut placed = self.cluster.write_replicas(&view, key, &self.local)?;
        let mut version = self.local.next_version()?;
        // Whether an earlier round of `version` (sent with an older layout)
        // may have left it on a replica: it must not be re-stamped then.
        let mut sent_before = false;
        // Acknowledgements earlier rounds of `version` got (for the error).
        let mut acks_before = 0;
        for round in 0..MAX_WRITE_ROUNDS {
            let replicas = &placed.handles;
            let sets: Vec<(Vec<usize>, usize)> = placed
                .sets
                .iter()
                .map(|set| (set.clone(), consistency.required(set.len())))
                .collect();
            let needed = sets.first().map_or(0, |(_, needed)| *needed);
            let record = Record::new(version, value.clone(), wall_clock_ms());
            let mut tally = WriteTally::in_sets(version, sets, replicas.len());
            // The newest layout a replica refused this round for, and who.
            let mut stale: Option<(u64, String)> = None;
            // Replicas that failed this round: they get hints if the write succeeds.
            let mut failed: Vec<usize> = Vec::new();
            for (index, replica) in replicas.iter().enumerate() {
                if let Some(why) = &replica.believed_down {
                    tally.record_at(index, &replica.address, WriteReply::NotSent(why.clone()));
                    failed.push(index);
                }
            }
            let mut in_flight: FuturesUnordered<WriteReplyFuture> = replicas
                .iter()
                .enumerate()
                .filter(|(_, replica)| replica.believed_down.is_none())
                .map(|(index, replica)| {
                    let (replica, key, record) = (replica.clone(), key.to_string(), record.clone());
                    let timeout = self.cluster.rpc_timeout;
                    Box::pin(async move { (index, replica.write(&key, &record, timeout).await) })
                        as WriteReplyFuture
                })
                .collect();
            let mut standing = Standing::initial(replicas);
            // Whether this round left for any replica: not when too few
            // were believed up to reach the quorum (then nothing is sent).
            let mut sent = false;
            let decision = loop {
                match tally.decision() {
                    WriteDecision::Pending => {}
                    decided => break decided,
                }
                sent = true;
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
                    // Refused unapplied: it certainly does not hold it.
                    Err(ReplicaError::StaleLayout(current)) => {
                        if stale.as_ref().is_none_or(|(v, _)| current > *v) {
                            stale = Some((current, replicas[index].address.clone()));
                        }
                        WriteReply::NotSent(format!("refused: it serves newer layout v{current}"))
                    }
                };
                tally.record_at(index, &replicas[index].address, reply);
            };
            let succeeded = matches!(decision, WriteDecision::Acknowledged { .. });
            if !sent {
                in_flight.clear();
            }
            let unanswered = !in_flight.is_empty();
            // Let the rest of this round reach its replicas; a replica that
            // fails now still gets a hint if the write succeeded.
            if !in_flight.is_empty() {
                let hinter = self.hinter.clone();
                let (addresses, key, record) =
                    (addresses_of(replicas), key.to_string(), record.clone());
                self.background.spawn(async move {
                    while let Some((index, reply)) = in_flight.next().await {
                        if succeeded && matches!(reply, Err(ReplicaError::Failed(_))) {
                            hinter.send_logged(&addresses[index], &key, &record).await;
                        }
                    }
                });
            }
            if let Some((current, from)) = stale
                && !matches!(decision, WriteDecision::Acknowledged { .. })
                && current > view.version()
            {
                // Placed with an old layout: learn the new one and send the
                // same version to the new replica sets.
                tracing::debug!(
                    key,
                    layout = current,
                    "write placed with a stale layout; retrying"
                );
                self.cluster.catch_up(current, &from).await;
                let newer = self.cluster.placement();
                if newer.version() > view.version() {
                    sent_before |= tally.may_be_stored() || unanswered;
                    acks_before = acks_before.max(tally.acks());
                    view = newer;
                    placed = self.cluster.write_replicas(&view, key, &self.local)?;
                    continue;
                }
            }
            // Re-stamping would put a value an earlier round may have left
            // on a replica under a second version.
            let decision = match decision {
                WriteDecision::Restamp { above } if sent_before => {
                    WriteDecision::Superseded { above }
                }
                other => other,
            };
            match decision {
                WriteDecision::Acknowledged { acks } => {
                    self.hint_in_background(replicas, &failed, key, &record);
                    return Ok(WriteAck { version, acks });
                }
                WriteDecision::Superseded { above } => {
                    self.local.observe(above);
                    return Err(Error::Superseded {
                        operation,
                        key: key.to_string(),
                        version,
                        above,
                        acks: tally.acks().max(acks_before),
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
                        roll_call: Box::new(roll_call(replicas, &standing)),
                        failures: asked_failures(replicas, tally.failures()),
                        sent: sent || sent_before,
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

/// A random pause before write round `round + 1`: up to 2^round ms, capped at 64 ms.
fn restamp_backoff(round: usize, key: &str) -> Duration {
    let cap_ms = 1u64 << round.min(6);
    let noise = xxhash_rust::xxh3::xxh3_64_with_seed(key.as_bytes(), crate::seams::random_u64());
    Duration::from_micros(noise % (cap_ms * 1000 + 1))
}
