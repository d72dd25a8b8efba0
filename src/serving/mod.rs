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
//! request, so every part of the node gets it at construction. The file
//! it is kept in is [`layout_file`].
//!
//! [`ClusterView`] is what the parts of a node that talk to other nodes
//! share: the layout owner, the channels to peers, the failure detector and
//! the deadline of each node-to-node call.

mod cluster_check;
pub mod layout_file;
pub mod removal;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::fanout::{FanOut, Stragglers, Tally};
use crate::layout::Layout;
use crate::layout::paxos::Acceptor;
use crate::layout::paxos::LayoutState;
use crate::layout::verify::{
    Vouch, cannot_be_chosen, confirmations, contradiction, counted, is_chosen,
};
use crate::liveness::Liveness;
use crate::locks::Locked;
use crate::net::{PeerPool, ReplicaHandle};
use crate::placement::{Placement, SharedPlacement};
use crate::replica::ReplicaStore;
use crate::serving::layout_file::{LayoutStore, layout_hash};
use crate::serving::removal::Removal;
use tokio::time::Instant;

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
    /// Senders from another cluster already logged, with the id they
    /// carried (std mutex: one set operation; bounded, see cluster_check).
    foreign_logged: Mutex<std::collections::HashSet<(String, u64)>>,
    /// Finds this node's instance on a layout's removed list.
    removal: Option<Arc<Removal>>,
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
        crate::logs::LAYOUT_VERSION
            .store(placement.version(), std::sync::atomic::Ordering::Relaxed);
        let mut state = state;
        if let Some(committed) = &state.committed
            && state.adopted.at(committed.version).is_none()
        {
            // A layout file from before adopted hashes were kept: the
            // layout it serves is the first it vouches for.
            state
                .adopted
                .record(committed.version, layout_hash(committed));
        }
        peers.set_cluster_id(state.committed.as_ref().map_or(0, |l| l.cluster_id));
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
            foreign_logged: Mutex::default(),
            removal: None,
        })
    }

    /// Watches every layout this owner holds or is given for this node's
    /// own removal (see [`removal`]), starting with the one it holds.
    pub fn with_removal(mut self, removal: Arc<Removal>) -> Self {
        if let Some(layout) = &self.state.locked().committed {
            removal.check(layout);
        }
        self.removal = Some(removal);
        self
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

    /// The version and hash of the layout served, read together (what
    /// heartbeats carry).
    pub fn version_and_hash(&self) -> (u64, u64) {
        let state = self.state.locked();
        let version = state.committed.as_ref().map_or(0, |l| l.version);
        (version, state.adopted.at(version).unwrap_or(0))
    }

    /// What this node knows about layout `version`, for a node verifying
    /// a layout (`Membership.LayoutVouch`).
    pub fn vouch(&self, version: u64) -> Vouch {
        let state = self.state.locked();
        let accepted = match &state.acceptor.accepted {
            Some((ballot, layout)) if state.acceptor.version == version => {
                Some((*ballot, layout_hash(layout)))
            }
            _ => None,
        };
        Vouch {
            adopted: state.adopted.at(version),
            accepted,
        }
    }

    /// Serves `layout` if a majority of the active members of the layout
    /// served vouch that it was chosen (see [`crate::layout::verify`]);
    /// anything else is refused, whoever sent it. Answers whether it was
    /// adopted (false: not newer).
    pub async fn adopt_verified(&self, layout: Layout) -> Result<bool> {
        layout.validate().map_err(Error::InvalidArgument)?;
        let held = self.layout();
        if layout.version <= held.version {
            return Ok(false);
        }
        let hash = layout_hash(&layout);
        // The members whose votes decided the next version.
        let voters: Vec<String> = held.acceptors();
        let mut tally = VouchTally {
            hash,
            answers: vec![None; voters.len()],
            pending: voters.len(),
            ahead: layout.version - held.version,
        };
        let mut asks = FanOut::new(Stragglers::Abandon);
        for (index, voter) in voters.iter().enumerate() {
            if *voter == self.me {
                let own = self.vouch(layout.version);
                tally.record(index, Ok(own));
            } else {
                asks.send(
                    index,
                    self.peers
                        .layout_vouch(voter, self.rpc_timeout, layout.version),
                );
            }
        }
        let deadline = Instant::now() + self.rpc_timeout;
        asks.collect(&mut tally, Some(deadline)).await;
        if let Some(other) = contradiction(hash, &tally.answers) {
            tracing::error!(
                version = layout.version,
                offered = format!("{hash:016x}"),
                adopted = format!("{other:016x}"),
                "two different layouts at one version: a member adopted another layout than the one offered; not adopting it"
            );
        }
        // Voters that left or were removed since the layout held.
        let departed = voters
            .iter()
            .filter(|v| {
                layout
                    .removed
                    .iter()
                    .any(|r| r.address == **v && r.version > held.version)
            })
            .count();
        if !is_chosen(hash, voters.len(), &tally.answers)
            && !(departed > 0
                && self
                    .chosen_by_successors(&layout, hash, &voters, &tally.answers, departed)
                    .await)
        {
            return Err(Error::FailedPrecondition(format!(
                "layout v{} ({hash:016x}, \"{}\") is not confirmed by a majority of the {} active members of layout v{}: {} vouch for it; not adopted",
                layout.version,
                layout.change,
                voters.len(),
                held.version,
                confirmations(hash, &tally.answers),
            )));
        }
        self.adopt(layout, Verified::ByMajority)
    }

    /// Whether `layout` (hashing to `hash`) is chosen by the rule for a
    /// node behind a departure ([`crate::layout::verify::is_chosen_by_successors`]):
    /// the held voters' adoptions are in `answers`; the offered layout's
    /// voters that are not among them are asked now.
    async fn chosen_by_successors(
        &self,
        layout: &Layout,
        hash: u64,
        voters: &[String],
        answers: &[Option<crate::layout::verify::Vouch>],
        departed: usize,
    ) -> bool {
        let adopted = |vouch: &Option<crate::layout::verify::Vouch>| {
            vouch.is_some_and(|v| v.adopted == Some(hash))
        };
        // The majority tally stops as soon as a majority is out of reach
        // (a departed voter fails fast), so held voters it did not hear
        // from yet are asked again here.
        let mut adopted_by: Vec<&str> = Vec::new();
        for (voter, vouch) in voters.iter().zip(answers) {
            let vouch = match vouch {
                None if *voter != self.me => self
                    .peers
                    .layout_vouch(voter, self.rpc_timeout, layout.version)
                    .await
                    .ok(),
                answered => *answered,
            };
            if adopted(&vouch) {
                adopted_by.push(voter);
            }
        }
        let held_adopted = adopted_by.len();
        let successors = layout.acceptors();
        for successor in successors
            .iter()
            .filter(|s| !voters.contains(s) && **s != self.me)
        {
            let vouch = self
                .peers
                .layout_vouch(successor, self.rpc_timeout, layout.version)
                .await
                .ok();
            if adopted(&vouch) {
                adopted_by.push(successor);
            }
        }
        let successors_adopted = successors
            .iter()
            .filter(|s| adopted_by.contains(&s.as_str()))
            .count();
        crate::layout::verify::is_chosen_by_successors(
            departed,
            held_adopted,
            successors.len(),
            successors_adopted,
        )
    }

    /// Serves `layout`, known to be chosen (this node's own Paxos round
    /// chose it, or it was verified), if it is newer than the one served:
    /// stores it, raises the fence, swaps the placement, teaches the
    /// failure detector its members and recounts the digests over its read
    /// ring. Answers whether it was adopted.
    pub fn adopt_chosen(&self, layout: Layout) -> Result<bool> {
        self.adopt(layout, Verified::OwnRound)
    }

    fn adopt(&self, layout: Layout, verified: Verified) -> Result<bool> {
        layout.validate().map_err(Error::InvalidArgument)?;
        // A layout that removed this instance is not served: the node stops.
        if let Some(notice) = self.removal.as_ref().and_then(|r| r.check(&layout)) {
            return Err(Error::FailedPrecondition(notice));
        }
        let mut state = self.state.locked();
        let current = state.committed.as_ref().map_or(0, |l| l.version);
        if layout.version <= current {
            return Ok(false);
        }
        if let Some(old) = &state.committed {
            match verified {
                Verified::OwnRound => crate::layout::cluster_id::may_adopt(old, &layout),
                Verified::ByMajority => crate::layout::cluster_id::may_adopt_verified(old, &layout),
            }
            .map_err(Error::FailedPrecondition)?;
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
        next.adopted.record(layout.version, layout_hash(&layout));
        next.committed = Some(layout.clone());
        if next.acceptor.version <= layout.version {
            next.acceptor = Acceptor::default();
        }
        self.store.save(&next)?;
        *state = next;
        self.peers.set_cluster_id(layout.cluster_id);
        self.replica.advance_fence(layout.version);
        let layout = Arc::new(layout);
        let placement = Placement::of_layout(layout.clone(), self.me.clone());
        let sharing = placement
            .sharing_peers()
            .map(|m| m.address.clone())
            .collect();
        crate::logs::LAYOUT_VERSION
            .store(placement.version(), std::sync::atomic::Ordering::Relaxed);
        self.placement.replace(placement);
        if let Err(why) = self.replica.follow_layout(sharing) {
            tracing::error!(%why, "cannot record the read gate's peers for the new layout");
        }
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

    /// Fetches the layout from `address` and adopts it if newer and
    /// confirmed by a majority.
    async fn fetch_from(&self, address: &str) -> Result<bool> {
        let layout = self.peers.fetch_layout(address, self.rpc_timeout).await?;
        if layout.version <= self.version() {
            return Ok(false);
        }
        self.adopt_verified(layout).await
    }

    /// Makes this node serve layout `version` or newer before a request
    /// placed with an older one is retried: fetched from `from` first, then
    /// from any member (once each). Returns once it does, or every attempt
    /// failed.
    pub async fn catch_up(&self, version: u64, from: &str) {
        if self.version() >= version {
            return;
        }
        let one = self.fetching.lock().await;
        self.catch_up_holding(version, from, one).await
    }

    /// [`LayoutOwner::catch_up`] unless one is running already (heartbeats
    /// ask on every answer from a peer ahead: they must not queue up passes
    /// over every member while verification keeps failing).
    pub async fn catch_up_unless_busy(&self, version: u64, from: &str) {
        if self.version() >= version {
            return;
        }
        let Ok(one) = self.fetching.try_lock() else {
            return;
        };
        self.catch_up_holding(version, from, one).await
    }

    async fn catch_up_holding(
        &self,
        version: u64,
        from: &str,
        _one: tokio::sync::MutexGuard<'_, ()>,
    ) {
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

/// What the parts of a node that talk to other nodes share: the placement
/// (one swappable view of the ring, N and this node), channels to peers,
/// the failure detector, and the deadline of each node-to-node call.
///
/// The coordinator, hinted handoff, anti-entropy and heartbeats each hold
/// one `Arc<Cluster>` instead of their own copies of these.
pub struct ClusterView {
    /// The layout served: where keys live (take one snapshot per request
    /// or round), and how a newer one is learned.
    pub layouts: Arc<LayoutOwner>,
    /// Channels to peers.
    pub peers: Arc<PeerPool>,
    /// Which peers are believed down.
    pub liveness: Liveness,
    /// Deadline of each call to a peer (`--rpc-timeout-ms`).
    pub rpc_timeout: Duration,
}

/// How a layout to adopt is known to be chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verified {
    /// This node's own Paxos round chose it.
    OwnRound,
    /// A majority of the held layout's active members vouched for it.
    ByMajority,
}

/// The answers of a layout's verification: decided once a majority vouch
/// for the hash, or once too few are left to.
struct VouchTally {
    hash: u64,
    answers: Vec<Option<Vouch>>,
    pending: usize,
    /// How many versions past the held layout the verified one is.
    ahead: u64,
}

impl Tally<std::result::Result<Vouch, String>> for VouchTally {
    type Verdict = bool;

    fn record(&mut self, index: usize, reply: std::result::Result<Vouch, String>) {
        self.pending = self.pending.saturating_sub(1);
        match reply {
            Ok(vouch) => self.answers[index] = Some(counted(vouch, self.ahead)),
            Err(why) => tracing::debug!(%why, "no vouch for a layout"),
        }
    }

    fn verdict(&self) -> Option<bool> {
        let asked = self.answers.len();
        if is_chosen(self.hash, asked, &self.answers) {
            Some(true)
        } else if cannot_be_chosen(self.hash, asked, &self.answers, self.pending) {
            Some(false)
        } else {
            None
        }
    }
}

/// A write's replicas: the union of its replica sets, and each set as
/// indices into it.
pub struct WriteReplicas {
    pub handles: Vec<ReplicaHandle>,
    pub sets: Vec<Vec<usize>>,
}

impl ClusterView {
    pub fn new(
        layouts: Arc<LayoutOwner>,
        peers: Arc<PeerPool>,
        liveness: Liveness,
        rpc_timeout: Duration,
    ) -> Self {
        Self {
            layouts,
            peers,
            liveness,
            rpc_timeout,
        }
    }

    /// The placement now (see [`LayoutOwner::placement`]).
    pub fn placement(&self) -> Arc<Placement> {
        self.layouts.placement()
    }

    /// Makes this node serve at least layout `version`, fetched from
    /// `from`, before a request placed with an older one is retried.
    pub async fn catch_up(&self, version: u64, from: &str) {
        // Boxed: rare, and its fetches would otherwise make every request's
        // future (which holds it inline) several kilobytes larger.
        Box::pin(self.layouts.catch_up(version, from)).await
    }

    /// Handles to every replica a write of `key` must reach under `view`.
    pub fn write_replicas(
        &self,
        view: &Placement,
        key: &str,
        local: &Arc<ReplicaStore>,
    ) -> Result<WriteReplicas> {
        let sets = view.write_sets(key);
        let mut union: Vec<&crate::ring::Member> = Vec::new();
        let mut indices = Vec::with_capacity(sets.len());
        for set in &sets {
            let mut own = Vec::with_capacity(set.len());
            for member in set {
                let index = match union.iter().position(|m| m.address == member.address) {
                    Some(index) => index,
                    None => {
                        union.push(member);
                        union.len() - 1
                    }
                };
                own.push(index);
            }
            indices.push(own);
        }
        Ok(WriteReplicas {
            handles: self.handles_for(view, union, local)?,
            sets: indices,
        })
    }

    /// Handles to `key`'s N replicas under `view`, this node's own store
    /// (`local`) in-process; a replica the detector believes down is marked
    /// so that quorum calls do not wait for it.
    pub fn replica_handles(
        &self,
        view: &Placement,
        key: &str,
        local: &Arc<ReplicaStore>,
    ) -> Result<Vec<ReplicaHandle>> {
        self.handles_for(view, view.replicas_of(key), local)
    }

    fn handles_for(
        &self,
        view: &Placement,
        members: Vec<&crate::ring::Member>,
        local: &Arc<ReplicaStore>,
    ) -> Result<Vec<ReplicaHandle>> {
        let healths = self
            .liveness
            .healths(members.iter().map(|m| m.address.as_str()));
        members
            .into_iter()
            .zip(healths)
            .map(|(member, health)| {
                let local = view.is_me(&member.address).then_some(local);
                let mut handle = self.peers.replica_handle(&member.address, local)?;
                handle.layout_version = view.version();
                if !health.up {
                    handle.believed_down = Some(format!(
                        "believed down by the failure detector (phi {:.1}{})",
                        health.phi,
                        health
                            .last_error
                            .map(|e| format!("; last heartbeat: {e}"))
                            .unwrap_or_default()
                    ));
                }
                Ok(handle)
            })
            .collect()
    }
}
