//! Moving a change along, one step per round (every node runs it):
//!
//! * a node that **gains** ranges (a joiner, or a member taking a leaver's
//!   or a removed member's ranges) streams them, then records so; the last
//!   gainer's record moves the reads (`crate::layout::change`). A change
//!   with nothing to stream has its reads moved by the first member (by
//!   address) this node believes up;
//! * once every member serves a change whose reads moved, the first member
//!   this node believes up proposes `move settled`;
//! * once a layout is settled, each node hands the ranges it no longer
//!   replicates to their new owners and drops each once they all confirmed
//!   holding its records (`cleanup.rs`).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::Membership;
use crate::heartbeat::Heartbeats;
use crate::layout::{Layout, Role};
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
        if layout.in_progress().is_some() && !layout.reads_moved() {
            let waiting = layout.waiting_for_streams();
            if waiting.contains(&me) {
                return self.gain_step(&layout).await;
            }
            if waiting.is_empty() && self.is_first_up(&layout) {
                return self.move_reads(&layout).await;
            }
            return Ok(());
        }
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
        if layout.reads_moved() && layout.joining().next().is_none() {
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
            return self.clean_up(&layout, heartbeats).await;
        }
        Ok(())
    }

    /// A change with nothing to stream: move the reads.
    async fn move_reads(self: &Arc<Self>, layout: &Layout) -> RoundResult {
        let key = layout.move_key();
        match self
            .propose(
                |l| {
                    if l.move_key() != key {
                        return Err(crate::layout::Refusal::Invalid(format!(
                            "the change is now {} (layout v{})",
                            l.change, l.version
                        )));
                    }
                    l.finish()
                },
                |l| l.move_key() != key || l.reads_moved(),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(why) => Err(WorkerError::new(format!(
                "cannot move the reads of {} yet: {why}",
                layout.change_name()
            ))),
        }
    }

    /// A gaining node: stream (once per change), then record it.
    async fn gain_step(self: &Arc<Self>, layout: &Layout) -> RoundResult {
        let key = layout.move_key();
        let what = if layout
            .member(&self.me.address)
            .is_some_and(|m| m.role == Role::Joining)
        {
            "joining".to_string()
        } else {
            format!("taking ranges for {}", layout.change_name())
        };
        if self.streamed.load(Ordering::Relaxed) != key {
            if let Err(why) = self.stream_all(layout).await {
                if let Some(progress) = self.progress.locked().as_mut() {
                    progress.stall(&why.to_string());
                }
                return Err(WorkerError::new(format!(
                    "{what}: streaming incomplete, will retry: {why}"
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
                    "{what}: cannot sync the streamed data, will retry: {why}"
                )));
            }
            self.streamed.store(key, Ordering::Relaxed);
        }
        let me = self.me.address.clone();
        match self
            .propose(
                |l| l.record_streamed(&me, key),
                |l| l.move_key() != key || l.reads_moved() || l.streamed.contains(&me),
            )
            .await
        {
            Ok(layout) if layout.reads_moved() => {
                tracing::info!(version = layout.version, change = %layout.change, "{what}: streamed; reads moved");
                Ok(())
            }
            Ok(layout) => {
                tracing::info!(version = layout.version, waiting_for = ?layout.waiting_for_streams(), "{what}: streamed; waiting for the other gainers");
                Ok(())
            }
            Err(why) => Err(WorkerError::new(format!(
                "{what}: cannot record the stream yet: {why}"
            ))),
        }
    }

    /// Whether this node is the first member by address it believes up,
    /// among those that stay (a leaver that settled its own leave would
    /// stop before anyone else learned it).
    pub(super) fn is_first_up(&self, layout: &Layout) -> bool {
        layout
            .members
            .iter()
            .filter(|m| m.role.holds_after())
            .find(|m| m.address == self.me.address || self.cluster.liveness.is_up(&m.address))
            .is_some_and(|m| m.address == self.me.address)
    }
}
