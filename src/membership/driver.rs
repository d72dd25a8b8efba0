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

use super::Membership;
use crate::heartbeat::Heartbeats;
use crate::layout::{Layout, Role};
use crate::locks::Locked;
use crate::workers::{RoundResult, WorkerError};

impl Membership {
    /// One step of a layout change, if one is due (see the module doc).
    /// The round fails when its step was due and could not be taken:
    /// streaming or syncing a join, proposing `finished joining` or `move
    /// settled`, dropping moved records. Nothing due is a success.
    pub async fn round(self: &Arc<Self>, heartbeats: &Heartbeats) -> RoundResult {
        self.cluster_id_step().await;
        self.naming_step(heartbeats).await;
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
        // Settling waits for the members believed up, not for one that is
        // down: a member that comes back serves the newest layout before it
        // says SERVING, and until it does every replica fences the requests
        // it places with an older one.
        let everyone_up_serves = |version: u64| {
            layout.members.iter().filter(|m| m.address != me).all(|m| {
                !self.cluster.liveness.is_up(&m.address)
                    || heartbeats
                        .report(&m.address)
                        .is_some_and(|r| r.layout_version >= version)
            })
        };
        if !layout.previous.is_empty() && layout.joining().next().is_none() {
            if everyone_up_serves(layout.version) && self.is_first_up(&layout) {
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
    pub(super) fn is_first_up(&self, layout: &Layout) -> bool {
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
