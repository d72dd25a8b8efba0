//! Quorum writes: the async shell that carries out the steps of
//! [`WriteRound`] (the protocol itself, pure, is in `quorum::write_round`).

use std::time::Duration;

use bytes::Bytes;

use super::{Coordinator, WRITE_ORDER_STRIPES, WriteAck, targets_of};
use crate::clock::wall_clock_ms;
use crate::error::Result;
use crate::fanout::{FanOut, Stragglers};
use crate::net::{ReplicaError, ReplicaHandle};
use crate::placement::Placement;
use crate::quorum::{Consistency, Placed, Step, WriteRound};
use crate::record::Record;

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

    /// The key's write replicas under `view`: handles, and the placement
    /// the protocol reasons about.
    fn place_write(&self, view: &Placement, key: &str) -> Result<(Vec<ReplicaHandle>, Placed)> {
        let placed = self.cluster.write_replicas(view, key, &self.local)?;
        let targets = targets_of(&placed.handles);
        Ok((
            placed.handles,
            Placed {
                targets,
                sets: placed.sets,
                layout_version: view.version(),
            },
        ))
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
        let (mut replicas, placed) = self.place_write(&self.cluster.placement(), key)?;
        let mut write = WriteRound::new(
            operation,
            key,
            consistency,
            self.local.next_version()?,
            placed,
        );
        let mut record = Record::new(write.version(), value.clone(), wall_clock_ms());
        let mut step = write.start();
        loop {
            step = match step {
                Step::Send { version, to } => {
                    record = Record::new(version, value.clone(), wall_clock_ms());
                    self.send_round(&mut write, &replicas, to, key, &record)
                        .await
                }
                Step::CatchUp { layout, from } => {
                    tracing::debug!(key_hash = %crate::metrics::key_hash(key), layout, "write placed with a stale layout; retrying");
                    self.cluster.catch_up(layout, &from).await;
                    let view = self.cluster.placement();
                    if view.version() > write.placed().layout_version {
                        let (handles, placed) = self.place_write(&view, key)?;
                        replicas = handles;
                        write.placed_again(Some(placed))
                    } else {
                        write.placed_again(None)
                    }
                }
                Step::Restamp { above, round } => {
                    tracing::debug!(key_hash = %crate::metrics::key_hash(key), version = %write.version(), %above, "a replica holds a newer version; re-stamping");
                    // Concurrent writers to one key would otherwise keep
                    // overtaking each other in lock step.
                    tokio::time::sleep(restamp_backoff(round, key)).await;
                    write.restamped(self.local.next_version()?)
                }
                Step::StoreHints { targets } => {
                    let sends = targets
                        .iter()
                        .map(|&i| self.hinter.send(&replicas[i].address, key, &record));
                    let stored = Box::pin(futures::future::join_all(sends))
                        .await
                        .iter()
                        .filter(|r| r.is_ok())
                        .count();
                    write.hints_stored(stored)
                }
                Step::Acknowledged { ack, hint } => {
                    self.hint_in_background(&replicas, &hint, key, &record);
                    return Ok(ack);
                }
                Step::Fail(error) => return Err(error),
            };
        }
    }

    /// Sends one round of `write` to the replicas `to` and feeds the
    /// replies in until the round is decided; the replies still in flight
    /// then finish in the background (a replica that fails after an
    /// acknowledged write gets a hint).
    async fn send_round(
        &self,
        write: &mut WriteRound,
        replicas: &[ReplicaHandle],
        to: Vec<usize>,
        key: &str,
        record: &Record,
    ) -> Step {
        let calls = self
            .write_round_calls(write, replicas, to, key, record)
            .await;
        if let Some(newest) = write.newest_seen() {
            self.local.observe(newest);
        }
        let step = write.round_over(calls.pending() > 0);
        if calls.pending() == 0 {
            return step;
        }
        let acknowledged = matches!(step, Step::Acknowledged { .. });
        let hinter = self.hinter.clone();
        let addresses: Vec<String> = replicas.iter().map(|r| r.address.clone()).collect();
        let (key, record) = (key.to_string(), record.clone());
        calls
            .finish(move |index, reply| {
                // A replica that failed after an acknowledged write gets a hint.
                let hint =
                    (acknowledged && matches!(reply, Err(ReplicaError::Failed(_)))).then(|| {
                        (
                            hinter.clone(),
                            addresses[index].clone(),
                            key.clone(),
                            record.clone(),
                        )
                    });
                async move {
                    if let Some((hinter, address, key, record)) = hint {
                        // Boxed: rare, and large (an RPC); inline it would
                        // be copied into every straggler task spawned.
                        Box::pin(hinter.send_logged(&address, &key, &record)).await;
                    }
                }
            })
            .await;
        step
    }

    /// Sends `record` to the replicas `to` and feeds what each then holds
    /// to `write` until it has a verdict; answers the calls still in flight.
    pub(super) async fn write_round_calls(
        &self,
        write: &mut WriteRound,
        replicas: &[ReplicaHandle],
        to: Vec<usize>,
        key: &str,
        record: &Record,
    ) -> FanOut<std::result::Result<crate::clock::Version, ReplicaError>> {
        let mut calls = FanOut::new(Stragglers::Complete(self.background.clone()));
        let timeout = self.cluster.rpc_timeout;
        for index in to {
            let (replica, key, record) = (replicas[index].clone(), key.to_string(), record.clone());
            calls.send(index, async move {
                replica
                    .write(&key, &record, timeout)
                    .await
                    .map(|outcome| outcome.held)
            });
        }
        calls.collect(write, None).await;
        calls
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
                Box::pin(hinter.send_logged(&target, &key, &record)).await;
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
