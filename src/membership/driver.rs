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

impl Membership {
    /// One step of a layout change, if one is due (see the module doc).
    pub async fn round(self: &Arc<Self>, heartbeats: &Heartbeats) {
        let layout = self.layout();
        let me = self.me.address.clone();
        if layout.member(&me).is_some_and(|m| m.role == Role::Joining) {
            self.join_step(&layout).await;
            return;
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
                    Err(why) => tracing::info!(%why, "cannot settle the move yet"),
                }
            }
            return;
        }
        if layout.is_settled()
            && layout.version > 1
            && self.cleaned.load(Ordering::Relaxed) < layout.version
        {
            self.clean_up(&layout, everyone_serves(layout.version))
                .await;
        }
    }

    /// A joining node: stream (once per layout version), then finish.
    async fn join_step(self: &Arc<Self>, layout: &Layout) {
        if self.streamed.load(Ordering::Relaxed) < layout.version {
            if let Err(why) = self.stream_all(layout).await {
                tracing::warn!(%why, "joining: streaming incomplete; retrying");
                return;
            }
            // What was streamed must survive a crash before this node
            // claims the ranges (--fsync periodic would leave it in memory).
            let replica = self.replica.clone();
            match crate::seams::blocking(move || replica.sync()).await {
                Ok(Ok(())) => {}
                Ok(Err(why)) => {
                    tracing::warn!(%why, "joining: cannot sync the streamed data; retrying");
                    return;
                }
                Err(why) => {
                    tracing::warn!(%why, "joining: sync task failed; retrying");
                    return;
                }
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
            Ok(layout) => tracing::info!(version = layout.version, "joined: serving reads"),
            Err(why) => tracing::warn!(%why, "joining: cannot finish yet"),
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
    async fn clean_up(&self, layout: &Layout, everyone_serves: bool) {
        let rounds = self.ae_rounds.load(Ordering::Relaxed);
        {
            let mut since = self.settled_at_round.locked();
            if !everyone_serves {
                *since = None;
                return;
            }
            match *since {
                Some((version, at)) if version == layout.version => {
                    // A round that started after everyone moved on, and ended.
                    if rounds < at + 2 {
                        return;
                    }
                }
                _ => {
                    *since = Some((layout.version, rounds));
                    return;
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
            }
            Ok(Err(why)) => tracing::warn!(%why, "cannot drop moved records"),
            Err(why) => tracing::warn!(%why, "dropping moved records failed"),
        }
    }
}
