//! Moving a join along, one step per round (every node runs it):
//!
//! * a **joining** node streams its ranges, then proposes `finished joining`;
//! * once every member serves a finished join, the first member (by
//!   address) this node believes up proposes `move settled`;
//! * once every member serves a settled layout and a full anti-entropy
//!   round has run since, each node drops the records of ranges it no
//!   longer replicates.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::time::Instant;

use super::Membership;
use crate::layout::{Layout, Role};
use crate::liveness::heartbeat::Heartbeats;
use crate::sync::Locked;
use crate::workers::{RoundResult, WorkerError};

/// A joining node's progress, shared by the streaming that updates it and
/// the heartbeats and status that report it.
#[derive(Clone, Default)]
pub struct JoinProgress(Arc<std::sync::Mutex<Option<MoveProgress>>>);

impl JoinProgress {
    /// The progress now (`None`: not joining).
    pub fn get(&self) -> Option<MoveProgress> {
        self.0.locked().clone()
    }

    /// The progress, to update in place.
    pub fn locked(&self) -> std::sync::MutexGuard<'_, Option<MoveProgress>> {
        self.0.locked()
    }
}

/// A joining node's progress.
#[derive(Clone, Debug)]
pub struct MoveProgress {
    pub layout_version: u64,
    /// Records newly stored here so far, and their bytes.
    pub keys_moved: u64,
    pub bytes_moved: u64,
    /// Records received from all sources (each key comes from several).
    pub records_received: u64,
    /// Of the hash space this node receives, the fraction streamed.
    pub done_share: f64,
    /// Hash intervals (about one per token range) streamed, and in all.
    pub ranges_done: u32,
    pub ranges_total: u32,
    pub started: Instant,
}

impl Default for MoveProgress {
    fn default() -> Self {
        Self {
            layout_version: 0,
            keys_moved: 0,
            bytes_moved: 0,
            records_received: 0,
            done_share: 0.0,
            ranges_done: 0,
            ranges_total: 0,
            started: Instant::now(),
        }
    }
}

impl MoveProgress {
    /// Estimated keys, bytes and milliseconds left, from the rate so far
    /// (`None` until something was streamed).
    pub fn remaining(&self) -> Option<(u64, u64, u64)> {
        if self.done_share >= 1.0 {
            return Some((0, 0, 0));
        }
        // Too early to extrapolate: nothing moved yet, or under 1% done.
        if self.keys_moved == 0 || self.done_share < 0.01 {
            return None;
        }
        let left = (1.0 - self.done_share) / self.done_share;
        let elapsed = self.started.elapsed().as_millis() as f64;
        Some((
            (self.keys_moved as f64 * left) as u64,
            (self.bytes_moved as f64 * left) as u64,
            (elapsed * left) as u64,
        ))
    }
}

impl Membership {
    /// One step of a layout change, if one is due (see the module doc).
    /// The round fails when its step was due and could not be taken:
    /// streaming or syncing a join, proposing `finished joining` or `move
    /// settled`, dropping moved records. Nothing due is a success.
    pub async fn round(self: &Arc<Self>, heartbeats: &Heartbeats) -> RoundResult {
        let layout = self.layout();
        let me = self.me.address.clone();
        if layout.member(&me).is_some_and(|m| m.role == Role::Joining) {
            return self.join_step(&layout).await;
        }
        let everyone_serves = |version: u64| {
            layout.members.iter().filter(|m| m.address != me).all(|m| {
                heartbeats
                    .report(&m.address)
                    .is_some_and(|r| r.layout_version >= version)
            })
        };
        if !layout.previous.is_empty() && layout.joining().next().is_none() {
            if everyone_serves(layout.version) && self.is_first_up(&layout) {
                let version = layout.version;
                match self
                    .propose(
                        |l| l.settle(),
                        |l| l.version > version && l.previous.is_empty(),
                    )
                    .await
                {
                    Ok(settled) => tracing::info!(version = settled.version, "move settled"),
                    Err(why) => {
                        return Err(WorkerError::new(format!(
                            "cannot settle the move yet: {why}"
                        )));
                    }
                }
            }
            return Ok(());
        }
        if layout.is_settled()
            && layout.version > 1
            && self.cleaned.load(Ordering::Relaxed) < layout.version
        {
            return self
                .clean_up(&layout, everyone_serves(layout.version))
                .await;
        }
        Ok(())
    }

    /// A joining node: stream (once per layout version), then finish.
    async fn join_step(self: &Arc<Self>, layout: &Layout) -> RoundResult {
        if self.streamed.load(Ordering::Relaxed) < layout.version {
            if let Err(why) = self.stream_all(layout).await {
                return Err(WorkerError::new(format!(
                    "joining: streaming incomplete, will retry: {why}"
                )));
            }
            // What was streamed must survive a crash before this node
            // claims the ranges (--fsync periodic would leave it in memory).
            let replica = self.replica.clone();
            let why = match crate::seams::blocking(move || replica.sync()).await {
                Ok(Ok(())) => None,
                Ok(Err(why)) => Some(why.to_string()),
                Err(why) => Some(format!("the sync task failed: {why}")),
            };
            if let Some(why) = why {
                return Err(WorkerError::new(format!(
                    "joining: cannot sync the streamed data, will retry: {why}"
                )));
            }
            self.streamed.store(layout.version, Ordering::Relaxed);
        }
        let me = self.me.address.clone();
        match self
            .propose(
                |l| l.finish_join(&me),
                |l| l.member(&me).is_some_and(|m| m.role == Role::Active),
            )
            .await
        {
            Ok(layout) => {
                tracing::info!(version = layout.version, "joined: serving reads");
                Ok(())
            }
            Err(why) => Err(WorkerError::new(format!(
                "joining: cannot finish yet: {why}"
            ))),
        }
    }

    /// Whether this node is the first member by address it believes up.
    fn is_first_up(&self, layout: &Layout) -> bool {
        layout
            .members
            .iter()
            .find(|m| m.address == self.me.address || self.cluster.liveness.is_up(&m.address))
            .is_some_and(|m| m.address == self.me.address)
    }

    /// Drops the records of ranges this node no longer replicates, once
    /// every member serves `layout` and a full anti-entropy round ran since.
    async fn clean_up(&self, layout: &Layout, everyone_serves: bool) -> RoundResult {
        let rounds = self.ae_rounds.load(Ordering::Relaxed);
        {
            let mut since = self.settled_at_round.locked();
            if !everyone_serves {
                *since = None;
                return Ok(());
            }
            match *since {
                Some((version, at)) if version == layout.version => {
                    // A round that started after everyone moved on, and ended.
                    if rounds < at + 2 {
                        return Ok(());
                    }
                }
                _ => {
                    *since = Some((layout.version, rounds));
                    return Ok(());
                }
            }
        }
        let ring = layout.read_ring();
        let n = layout.replicas.min(ring.members().len());
        let me = self.me.address.clone();
        let replica = self.replica.clone();
        let dropped = crate::seams::blocking(move || {
            replica.drop_unowned(&|hash| {
                ring.range_replicas(ring.range_of(hash), n)
                    .iter()
                    .any(|m| m.address == me)
            })
        })
        .await;
        match dropped {
            Ok(Ok(dropped)) => {
                self.cleaned.store(layout.version, Ordering::Relaxed);
                if dropped > 0 {
                    tracing::info!(
                        dropped,
                        version = layout.version,
                        "dropped the records of ranges moved away"
                    );
                }
                Ok(())
            }
            Ok(Err(why)) => Err(WorkerError::new(format!(
                "cannot drop moved records: {why}"
            ))),
            Err(why) => Err(WorkerError::new(format!(
                "dropping moved records failed: {why}"
            ))),
        }
    }
}
