//! The layout this node serves, and its one owner.
//!
//! A layout version is more than a number kept somewhere: serving version
//! v means the layout is stored (`<data-dir>/layout`), the replica's fence
//! refuses requests placed with an older one, every new request is placed
//! with v's rings, the failure detector watches v's members, and the range
//! digests are counted over v's read ring. [`LayoutOwner`] is the only
//! thing that moves these together ([`LayoutOwner::adopt`]), the only one
//! that fetches a newer layout when a peer says it serves one
//! ([`LayoutOwner::catch_up`]), and it holds the Paxos acceptor state that
//! is stored in the same file. It is built before anything that places a
//! request, so every part of the node gets it at construction.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::layout::paxos::Acceptor;
use crate::layout::store::{LayoutState, LayoutStore};
use crate::liveness::Liveness;
use crate::net::{PeerPool, call_within};
use crate::pb;
use crate::placement::{Placement, SharedPlacement};
use crate::replica::ReplicaStore;
use crate::sync::Locked;

pub struct LayoutOwner {
    /// This node's address.
    me: String,
    /// Where the layout and the acceptor state are persisted.
    store: LayoutStore,
    /// The committed layout and the acceptor (std mutex: held for a check,
    /// an update and the file write that must precede the answer).
    state: Mutex<LayoutState>,
    /// Where keys live under the layout served; requests take snapshots.
    placement: SharedPlacement,
    /// Its fence and digests follow the layout.
    replica: Arc<ReplicaStore>,
    /// Learns the members of each layout adopted.
    liveness: Liveness,
    /// To fetch newer layouts.
    peers: Arc<PeerPool>,
    rpc_timeout: Duration,
    /// One catch-up at a time.
    fetching: tokio::sync::Mutex<()>,
}

impl LayoutOwner {
    /// The owner of `state`'s committed layout (there must be one),
    /// served with `placement`, its version fenced on `replica` from now on.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        me: &str,
        store: LayoutStore,
        state: LayoutState,
        placement: Placement,
        replica: Arc<ReplicaStore>,
        liveness: Liveness,
        peers: Arc<PeerPool>,
        rpc_timeout: Duration,
    ) -> Result<Self> {
        if state.committed.is_none() {
            return Err(Error::Internal(
                "a layout owner needs a committed layout".into(),
            ));
        }
        replica.advance_fence(placement.version());
        Ok(Self {
            me: me.to_string(),
            store,
            state: Mutex::new(state),
            placement: SharedPlacement::new(placement),
            replica,
            liveness,
            peers,
            rpc_timeout,
            fetching: tokio::sync::Mutex::new(()),
        })
    }

    /// The placement now; keep it for the whole request or round.
    pub fn placement(&self) -> Arc<Placement> {
        self.placement.snapshot()
    }

    /// The layout version served.
    pub fn version(&self) -> u64 {
        self.placement().version()
    }

    /// The layout served.
    pub fn layout(&self) -> Layout {
        self.state
            .locked()
            .committed
            .clone()
            .expect("a layout owner always has a committed layout (checked by new, never unset)")
    }

    /// Runs `change` on a copy of the stored state (the acceptor's rules:
    /// a prepare or an accept) and persists the copy before answering when
    /// it changed.
    pub fn update_acceptor<T>(
        &self,
        change: impl FnOnce(&mut LayoutState) -> T,
    ) -> Result<(T, LayoutState)> {
        let mut state = self.state.locked();
        let mut next = state.clone();
        let answer = change(&mut next);
        if next != *state {
            self.store.save(&next)?;
            *state = next;
        }
        Ok((answer, state.clone()))
    }

    /// Serves `layout` if it is newer than the one served: stores it,
    /// raises the fence, swaps the placement, teaches the failure detector
    /// its members and recounts the digests over its read ring. Answers
    /// whether it was adopted.
    pub fn adopt(&self, layout: Layout) -> Result<bool> {
        layout.validate().map_err(Error::InvalidArgument)?;
        let mut state = self.state.locked();
        let current = state.committed.as_ref().map_or(0, |l| l.version);
        if layout.version <= current {
            return Ok(false);
        }
        if let Some(old) = &state.committed
            && (old.replicas != layout.replicas || old.vnodes != layout.vnodes)
        {
            return Err(Error::InvalidArgument(format!(
                "layout v{} has replicas {} and vnodes {}, this cluster {} and {} (fixed at bootstrap)",
                layout.version, layout.replicas, layout.vnodes, old.replicas, old.vnodes
            )));
        }
        let mut next = state.clone();
        next.committed = Some(layout.clone());
        if next.acceptor.version <= layout.version {
            next.acceptor = Acceptor::default();
        }
        self.store.save(&next)?;
        *state = next;
        self.replica.advance_fence(layout.version);
        let layout = Arc::new(layout);
        self.placement
            .replace(Placement::of_layout(layout.clone(), self.me.clone()));
        let now = tokio::time::Instant::now();
        self.liveness.update(|detector| {
            for member in &layout.members {
                if member.address != self.me {
                    detector.learn(&member.address, now);
                }
            }
        });
        drop(state);
        tracing::info!(version = layout.version, change = %layout.change, "serving a new layout");
        let (replica, ring, version) = (
            self.replica.clone(),
            Arc::new(layout.read_ring()),
            layout.version,
        );
        crate::seams::detach_blocking(move || {
            if let Err(why) = replica.rebuild_digests(ring, version) {
                tracing::error!(%why, "cannot recount the range digests for the new layout");
            }
        });
        Ok(true)
    }

    /// Fetches the layout from `address` and adopts it if newer.
    async fn fetch_from(&self, address: &str) -> Result<bool> {
        let mut client = self.peers.membership_client(address)?;
        let layout =
            call_within(self.rpc_timeout, client.get_layout(pb::GetLayoutRequest {})).await?;
        let layout = pb::layout_from(layout)
            .map_err(|why| Error::Unavailable(format!("{address} sent a bad layout: {why}")))?;
        self.adopt(layout)
    }

    /// Makes this node serve layout `version` or newer before a request
    /// placed with an older one is retried: fetched from `from` first, then
    /// from any member (once each). Returns once it does, or every attempt
    /// failed.
    pub async fn catch_up(&self, version: u64, from: &str) {
        if self.version() >= version {
            return;
        }
        let _one = self.fetching.lock().await;
        if self.version() >= version {
            return;
        }
        if !from.is_empty() {
            match self.fetch_from(from).await {
                Ok(_) if self.version() >= version => return,
                Ok(_) => {}
                Err(why) => tracing::debug!(peer = from, %why, "cannot fetch the layout"),
            }
        }
        let members: Vec<String> = self
            .placement()
            .peers()
            .map(|m| m.address.clone())
            .collect();
        for member in members {
            if self.version() >= version {
                return;
            }
            if let Err(why) = self.fetch_from(&member).await {
                tracing::debug!(peer = member, %why, "cannot fetch the layout");
            }
        }
    }
}
