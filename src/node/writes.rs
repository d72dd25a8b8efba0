//! The one entry point of a client write, whichever door it came in by
//! (gRPC's `KeyValue.Put` and `Delete` today; the HTTP and RESP front ends
//! call it too): the checks every write passes, then forward or coordinate.
//!
//! **One coordinator per key.** Two writes to one key coordinated by two
//! nodes at once can overtake each other at a replica, and the overtaken
//! one is superseded (ABORTED, outcome unknown) although nothing failed.
//! Writes this node coordinates are ordered per key
//! ([`crate::coordinator::Coordinator`]'s write order), so a write that
//! enters at a node that is not the key's first live replica (in that
//! node's view: the first of its N replicas the failure detector believes
//! up) is forwarded to it, once: the receiver coordinates a forwarded write
//! whatever its own view (`Replica.ForwardWrites`, batched per peer, never
//! forwards again), within
//! the deadline left, after learning a newer layout the forwarder names.
//! Superseded writes so remain only for failover races (views that differ
//! for a moment while a node fails or the layout changes).
//!
//! **The outcome.** Once a forward may have left, its answer is this
//! node's answer, whatever it is: coordinating the write here as well
//! could leave one value under two versions. Only a forward that provably
//! was not taken (no connection could be made, the request was canceled
//! before it was sent, or the receiver refused it before any handler ran)
//! is coordinated here instead ([`crate::net::ForwardFailure`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;

use super::Node;
use crate::coordinator::WriteAck;
use crate::error::{Error, Result};
use crate::net::{ForwardFailure, ForwardedWrite};
use crate::placement::Placement;
use crate::quorum::Consistency;

/// One PUT (a value) or DELETE (none), as a front end hands it over.
#[derive(Clone, Debug)]
pub(crate) struct ClientWrite {
    pub key: String,
    pub value: Option<Bytes>,
    pub consistency: Consistency,
    /// How long the caller waits (`grpc-timeout`), if it said.
    pub timeout: Option<Duration>,
}

impl ClientWrite {
    fn operation(&self) -> &'static str {
        if self.value.is_some() {
            "PUT"
        } else {
            "DELETE"
        }
    }
}

/// Where a write came from.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Entry<'a> {
    /// A client, through any front end: with `forward`, forwarded when
    /// this node is not the key's first live replica (a client that found
    /// that replica down asks for the write to be coordinated here).
    Client { forward: bool },
    /// Another node, which placed it with `layout_version` and named
    /// itself `sender`: coordinated here.
    Forwarded {
        layout_version: u64,
        sender: Option<&'a str>,
    },
}

/// Counts of forwarded writes, for `Cluster.Status`.
#[derive(Debug, Default)]
pub(super) struct ForwardCounts {
    /// Client writes this node forwarded.
    forwarded: AtomicU64,
    /// Writes this node coordinated for a node that forwarded them.
    coordinated: AtomicU64,
}

impl ForwardCounts {
    pub(super) fn forwarded(&self) -> u64 {
        self.forwarded.load(Ordering::Relaxed)
    }

    pub(super) fn coordinated(&self) -> u64 {
        self.coordinated.load(Ordering::Relaxed)
    }
}

impl Node {
    /// Takes `write` from `entry`: refuses it unapplied when it cannot be
    /// taken (cluster id not agreed, bad input, no room on the key's
    /// replicas), then forwards it to the key's first live replica or
    /// coordinates it, within the caller's deadline.
    pub(crate) async fn write(&self, write: ClientWrite, entry: Entry<'_>) -> Result<WriteAck> {
        self.membership.refuse_until_agreed()?;
        self.limits.check_key(&write.key)?;
        if let Some(value) = &write.value {
            self.limits.check_value(value)?;
            refuse_without_room(self, &write.key, write.consistency)?;
        }
        let operation = write.operation();
        let timeout = write.timeout;
        // Everything from here, learning a forwarder's layout too, within
        // the caller's deadline. The inner futures are boxed: inline, they
        // made this one (which every front end and a forward's batch
        // handler move around) 7.6 KB, and copying it showed in profiles.
        let take = async {
            let forward = match entry {
                Entry::Client { forward } => forward,
                Entry::Forwarded {
                    layout_version,
                    sender,
                } => {
                    self.forward_counts
                        .coordinated
                        .fetch_add(1, Ordering::Relaxed);
                    Box::pin(self.learn_forwarders_layout(layout_version, sender)).await;
                    false
                }
            };
            if forward {
                Box::pin(self.forward_or_coordinate(write)).await
            } else {
                Box::pin(
                    self.coordinator
                        .write(&write.key, write.value, write.consistency),
                )
                .await
            }
        };
        within_callers_deadline(timeout, operation, take).await
    }

    /// Forwards `write` to the key's first live replica when that is
    /// another node, and answers with its answer; coordinates it here when
    /// this node is that replica, or the forward provably was not taken.
    async fn forward_or_coordinate(&self, write: ClientWrite) -> Result<WriteAck> {
        let view = self.cluster.placement();
        if let Some(first) = self.first_live_replica(&view, &write.key) {
            // Inside the caller's deadline (see `within_callers_deadline`),
            // or a little past the receiver's own request deadline, so the
            // receiver's answer arrives before this node stops waiting.
            let budget = write
                .timeout
                .map(|t| callers_budget(t, write.operation()))
                .unwrap_or_else(|| Ok(self.coordinator.request_timeout() + FORWARD_SLACK))?;
            let forwarded = ForwardedWrite {
                key: write.key.clone(),
                value: write.value.clone(),
                consistency: write.consistency,
                layout_version: view.version(),
            };
            self.forward_counts
                .forwarded
                .fetch_add(1, Ordering::Relaxed);
            match self
                .cluster
                .peers
                .forward_write(first, forwarded, budget)
                .await
            {
                Ok(ack) => return Ok(ack),
                Err(ForwardFailure::Answered(error)) => return Err(error),
                Err(ForwardFailure::NotTaken(why)) => {
                    tracing::debug!(
                        key_hash = %crate::metrics::key_hash(&write.key),
                        "forward to {first} not taken ({why}); coordinating the write here"
                    );
                }
            }
        }
        Box::pin(
            self.coordinator
                .write(&write.key, write.value, write.consistency),
        )
        .await
    }

    /// The first of `key`'s replicas the failure detector believes up,
    /// unless that is this node (or none is).
    fn first_live_replica<'a>(&self, view: &'a Placement, key: &str) -> Option<&'a str> {
        let first = view
            .replicas_of(key)
            .into_iter()
            .map(|m| m.address.as_str())
            .find(|a| view.is_me(a) || self.cluster.liveness.is_up(a))?;
        (!view.is_me(first)).then_some(first)
    }

    /// Learns the layout a forwarder placed a write with, when it is newer
    /// than the one served here and the forwarder is a member (one fetch
    /// at a time: a write that finds one running goes on, and a replica's
    /// stale-layout refusal makes the write round learn it anyway).
    async fn learn_forwarders_layout(&self, layout_version: u64, sender: Option<&str>) {
        let Some(sender) = sender else { return };
        let view = self.cluster.placement();
        if layout_version > view.version() && view.is_member(sender) {
            self.cluster
                .layouts
                .catch_up_unless_busy(layout_version, sender)
                .await;
        }
    }
}

/// How far past its own request deadline a forwarder waits for the node it
/// forwarded a write to, when the caller gave no deadline.
const FORWARD_SLACK: Duration = Duration::from_millis(50);

/// What a caller's `grpc-timeout` leaves for its write: a little less, so
/// this node answers (DEADLINE_EXCEEDED, outcome `unknown`) before tonic's
/// own timer would (CANCELLED, no outcome). A timeout too short to start
/// in refuses the write unapplied.
fn callers_budget(timeout: Duration, operation: &str) -> Result<Duration> {
    // A tenth of it (5 ms to 200 ms): the answer must reach the caller
    // before its own timer fires, on a loaded machine too (1% lost that
    // race in CI).
    let margin = (timeout / 10).clamp(Duration::from_millis(5), Duration::from_millis(200));
    timeout
        .checked_sub(margin)
        .filter(|b| !b.is_zero())
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{operation} refused and not applied: a grpc-timeout of {} ms leaves no time to \
                 coordinate it; allow at least 10 ms",
                timeout.as_millis()
            ))
        })
}

/// Bounds a write by its caller's `grpc-timeout` ([`callers_budget`]): this
/// answer, DEADLINE_EXCEEDED with outcome `unknown` (replicas may hold the
/// write), goes out before tonic's own timeout would answer.
async fn within_callers_deadline<T>(
    timeout: Option<Duration>,
    operation: &str,
    write: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    let Some(timeout) = timeout else {
        return write.await;
    };
    let budget = callers_budget(timeout, operation)?;
    tokio::time::timeout(budget, write).await.map_err(|_| {
        Error::DeadlineExceeded(format!(
            "{operation} did not finish within its caller's deadline (grpc-timeout {} ms): it may or \
             may not have been applied",
            timeout.as_millis()
        ))
    })?
}

/// Refuses a new value before anything is sent when fewer than W of the
/// key's replicas (in any of its replica sets, while data moves) have room
/// under their `--max-data-bytes`, as far as this node knows: its own
/// measure, and each peer's from its last heartbeat. Not applied.
fn refuse_without_room(node: &Node, key: &str, consistency: Consistency) -> Result<()> {
    if consistency == Consistency::Any {
        return Ok(());
    }
    // No replica could be at its quota: nothing to look up.
    if !node.quota.is_full() && !node.heartbeats.any_peer_at_data_quota() {
        return Ok(());
    }
    let view = node.cluster.placement();
    let has_room = |address: &str| {
        if view.is_me(address) {
            return !node.quota.is_full();
        }
        !node.heartbeats.is_at_data_quota(address)
    };
    for set in view.write_sets(key) {
        let needed = consistency.required(set.len());
        let full: Vec<&str> = set
            .iter()
            .map(|m| m.address.as_str())
            .filter(|a| !has_room(a))
            .collect();
        if set.len() - full.len() < needed {
            return Err(Error::QuotaReached(format!(
                "PUT of {key:?} refused before anything was sent, not applied: {} of the key's {} \
                 replicas ({}) are at their --max-data-bytes, and {needed} must store it; delete \
                 data or raise the quota (deletes still work)",
                full.len(),
                set.len(),
                full.join(", ")
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `call` returns (never called).
    fn future_size<F, Fut>(_: F) -> usize
    where
        F: FnOnce(&'static Node) -> Fut,
    {
        std::mem::size_of::<Fut>()
    }

    /// Every front end and every forwarded batch moves the write entry's
    /// future around: it stays small (its inner futures are boxed), where
    /// inline they made it 7.6 KB and its copies showed in profiles.
    #[test]
    fn the_write_entrys_future_stays_small() {
        let write = || ClientWrite {
            key: String::new(),
            value: None,
            consistency: Consistency::Quorum,
            timeout: None,
        };
        let client = future_size(move |node| node.write(write(), Entry::Client { forward: true }));
        assert!(client < 1024, "Node::write's future is {client} bytes");
    }
}
