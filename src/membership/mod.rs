//! Membership: the async shell around [`crate::layout`].
//!
//! [`Membership`] keeps the layout this node serves and its Paxos acceptor
//! state on disk, answers the layout RPCs (prepare, accept, commit, get,
//! join), proposes changes, and adopts newer layouts it hears of. Adopting a
//! layout stores it, raises the replica's fence (requests placed with an
//! older layout are refused from then on), swaps the placement, and teaches
//! the failure detector the new members.
//!
//! `driver.rs` moves a join along (stream, finish, settle, clean up),
//! `stream.rs` copies a joining node's ranges, and `cleanup.rs` drops what
//! moved away once its new owners confirmed holding it. See `crate::layout` for why
//! each step is safe.

mod abort;
mod cleanup;
mod cluster_id;
mod driver;
mod naming;
mod shrink;
mod stream;

pub use crate::layout::progress::{JoinProgress, MoveProgress};
pub use stream::{RecordStream, stream_source};

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::antientropy::AntiEntropy;
use crate::error::{Error, Result};
use crate::fanout::{Ended, FanOut, Stragglers, Tally};
use crate::layout::paxos::LayoutState;
use crate::layout::paxos::{Answer, Ballot};
use crate::layout::{Layout, Refusal};
use crate::paxos::{Accepted, Promise, Proposer, Verdict};
use crate::placement::ThisNode;
use crate::replica::ReplicaStore;
use crate::serving::ClusterView;
use crate::serving::LayoutOwner;
use crate::serving::layout_file::{LayoutStore, layout_hash};

/// Most attempts of one proposal (each a prepare and an accept round).
const MAX_PROPOSAL_ATTEMPTS: usize = 30;

pub struct Membership {
    me: ThisNode,
    cluster: Arc<ClusterView>,
    replica: Arc<ReplicaStore>,
    /// The layout served and the acceptor state: adoption goes through it.
    layouts: Arc<LayoutOwner>,
    /// The highest ballot round seen, to propose above it.
    max_round: AtomicU64,
    /// `--stream-rate`: records per second a join copies (0: unlimited).
    stream_rate: u64,
    /// This node's join progress (while it joins); heartbeats carry it.
    progress: JoinProgress,
    /// The change ([`Layout::move_key`]) whose streaming finished here (0:
    /// none).
    streamed: AtomicU64,
    /// The layout version whose moved-away data this node dropped.
    cleaned: AtomicU64,
    /// The layout version at which this node holds no moved-away data but
    /// what waits for owners believed down.
    clean_enough: AtomicU64,
    /// Hands moved-away ranges to their new owners before they are dropped.
    anti_entropy: Arc<AntiEntropy>,
    /// Whether the cluster id is agreed (clients are served once it is).
    agreement: cluster_id::Agreement,
    /// When the first naming may stop waiting for unseen members.
    naming: naming::Naming,
}

impl Membership {
    /// Loads the stored layout; without one, `bootstrap` is stored as the
    /// first (a node started with `--peers`). `Err` when the store is
    /// damaged or a stored layout contradicts the flags.
    pub fn load_or_bootstrap(
        store: &LayoutStore,
        bootstrap: impl FnOnce() -> Layout,
    ) -> Result<LayoutState> {
        match store.load()? {
            Some(state) if state.committed.is_some() => Ok(state),
            _ => {
                let state = LayoutState {
                    committed: Some(bootstrap()),
                    ..LayoutState::default()
                };
                store.save(&state)?;
                Ok(state)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn new(
        me: ThisNode,
        cluster: Arc<ClusterView>,
        replica: Arc<ReplicaStore>,
        layouts: Arc<LayoutOwner>,
        progress: JoinProgress,
        stream_rate: u64,
        anti_entropy: Arc<AntiEntropy>,
    ) -> Arc<Self> {
        // Never reuse a ballot promised before a restart.
        let round = layouts
            .update_acceptor(|state| state.acceptor.promised.round)
            .map_or(0, |(round, _)| round);
        Arc::new(Self {
            me,
            cluster,
            replica,
            layouts,
            max_round: AtomicU64::new(round),
            stream_rate,
            progress,
            streamed: AtomicU64::new(0),
            cleaned: AtomicU64::new(0),
            clean_enough: AtomicU64::new(0),
            anti_entropy,
            agreement: cluster_id::Agreement::default(),
            naming: naming::Naming::default(),
        })
    }

    /// The layout this node serves.
    pub fn layout(&self) -> Layout {
        self.layouts.layout()
    }

    /// The layout version at which this node last found it holds only
    /// ranges it replicates, but those waiting for owners believed down
    /// (0: not yet).
    pub fn cleaned_up(&self) -> u64 {
        self.clean_enough.load(Ordering::Relaxed)
    }

    pub fn progress(&self) -> Option<MoveProgress> {
        self.progress.get()
    }

    /// Serves `layout`, chosen by this node's own round, if it is newer
    /// (see [`LayoutOwner::adopt_chosen`]).
    fn adopt_chosen(&self, layout: Layout) -> Result<bool> {
        self.layouts.adopt_chosen(layout)
    }

    /// Serves `layout`, sent by another node, once a majority of the
    /// active members confirm it was chosen (see
    /// [`LayoutOwner::adopt_verified`]).
    pub async fn adopt_verified(&self, layout: Layout) -> Result<bool> {
        self.layouts.adopt_verified(layout).await
    }

    /// Whether a proposal for `version` built on the layout hashing to
    /// `base_hash` changes the layout this node serves (it refuses one built
    /// on another: say a node bootstrapped with other `--peers`).
    fn same_base(&self, state: &LayoutState, version: u64, base_hash: u64) -> bool {
        let Some(committed) = &state.committed else {
            return true;
        };
        if base_hash == 0 || version != committed.version + 1 {
            return true;
        }
        let same = layout_hash(committed) == base_hash;
        if !same {
            tracing::warn!(
                version = committed.version,
                "refused a layout proposal built on another layout at the same version (were the nodes bootstrapped with different --peers?)"
            );
        }
        same
    }

    /// `Membership.LayoutPrepare`: this node's acceptor's promise.
    pub fn on_prepare(
        &self,
        version: u64,
        ballot: Ballot,
        base_hash: u64,
    ) -> Result<Promise<Layout>> {
        self.note_round(ballot.round);
        let (answer, state) = self.layouts.update_acceptor(|state| {
            if !self.same_base(state, version, base_hash) || self.is_learner(state, version) {
                return None;
            }
            let committed = state.committed.as_ref().map_or(0, |l| l.version);
            Some(state.acceptor.prepare(committed, version, ballot))
        })?;
        Ok(match answer {
            // Built on another layout, or this node is a learner: refused,
            // and nothing to learn.
            None => Promise::No {
                promised: None,
                committed: None,
            },
            Some(Answer::Yes { accepted }) => Promise::Yes { accepted },
            Some(Answer::No { promised }) => Promise::No {
                promised: Some(promised),
                committed: None,
            },
            Some(Answer::Committed | Answer::Behind) => Promise::No {
                promised: None,
                committed: state.committed,
            },
        })
    }

    /// `Membership.LayoutAccept`: this node's acceptor's answer.
    pub fn on_accept(
        &self,
        ballot: Ballot,
        layout: &Layout,
        base_hash: u64,
    ) -> Result<Accepted<Layout>> {
        self.note_round(ballot.round);
        let (answer, state) = self.layouts.update_acceptor(|state| {
            if !self.same_base(state, layout.version, base_hash)
                || self.is_learner(state, layout.version)
            {
                return None;
            }
            let committed = state.committed.as_ref().map_or(0, |l| l.version);
            Some(state.acceptor.accept(committed, layout, ballot))
        })?;
        Ok(match answer {
            None => Accepted::No {
                promised: None,
                committed: None,
            },
            Some(Answer::Yes { .. }) => Accepted::Yes,
            Some(Answer::No { promised }) => Accepted::No {
                promised: Some(promised),
                committed: None,
            },
            Some(Answer::Committed | Answer::Behind) => Accepted::No {
                promised: None,
                committed: state.committed,
            },
        })
    }

    fn note_round(&self, round: u64) {
        self.max_round.fetch_max(round, Ordering::Relaxed);
    }

    /// Commits the change `change` makes to the layout served, unless
    /// `done` says the layout already has it. Paxos over the active members
    /// of the layout it changes; retried with higher ballots while proposals
    /// collide. A change another one made impossible (one change at a time)
    /// is refused with FAILED_PRECONDITION naming the change that won.
    pub async fn propose(
        &self,
        change: impl Fn(&Layout) -> std::result::Result<Layout, Refusal>,
        done: impl Fn(&Layout) -> bool,
    ) -> Result<Layout> {
        let mut last_failure = String::from("no attempt");
        for attempt in 0..MAX_PROPOSAL_ATTEMPTS {
            let base = self.layout();
            if done(&base) {
                return Ok(base);
            }
            let own =
                change(&base).map_err(|refusal| Error::FailedPrecondition(refusal.to_string()))?;
            let version = own.version;
            // The active members vote; joiners are learners.
            let acceptors = base.acceptors();
            let round = self.max_round.fetch_add(1, Ordering::Relaxed) + 1;
            let ballot = Ballot {
                round,
                proposer: self.me.member_id.0,
            };
            match self
                .run_round(&acceptors, version, ballot, own, layout_hash(&base))
                .await
            {
                Ok(chosen) => {
                    // Told first: a node that this layout removes stops
                    // on adopting it, and the others must still learn it.
                    self.announce(&chosen);
                    self.adopt_chosen(chosen.clone())?;
                    if done(&chosen) {
                        return Ok(chosen);
                    }
                    // Another value won this version: look again.
                    continue;
                }
                Err(why) => last_failure = why,
            }
            // Collided or short of a majority: back off a random while.
            let pause = 20 + crate::seams::random_u64() % (40 * (attempt as u64 + 1)).min(500);
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
        Err(Error::Unavailable(format!(
            "could not commit the layout change after {MAX_PROPOSAL_ATTEMPTS} attempts: {last_failure}"
        )))
    }

    /// One prepare and accept round for `version`: the value chosen, or
    /// why not. The rules are [`Proposer`]'s; this sends its messages
    /// (this node's own acceptor answers in place) and learns the
    /// committed layouts refusals carry.
    async fn run_round(
        &self,
        acceptors: &[String],
        version: u64,
        ballot: Ballot,
        own: Layout,
        base_hash: u64,
    ) -> std::result::Result<Layout, String> {
        let mut proposer = Proposer::new(ballot, own, acceptors.to_vec());
        let (peers, timeout) = (&self.cluster.peers, self.cluster.rpc_timeout);
        let mut promises = FanOut::new(Stragglers::Abandon);
        for (index, address) in acceptors.iter().enumerate() {
            if *address == self.me.address {
                let promise = self
                    .on_prepare(version, ballot, base_hash)
                    .unwrap_or_else(|why| Promise::Failed(format!("{address}: {why}")));
                proposer.record(index, promise);
                continue;
            }
            promises.send(
                index,
                peers.layout_prepare(address, timeout, version, ballot, base_hash),
            );
        }
        let ended = promises.collect(&mut proposer, None).await;
        self.learn_from(acceptors, &mut proposer, version).await;
        if self.layout().version >= version {
            return Err(format!("layout v{version} was committed meanwhile"));
        }
        let value = match ended {
            Ended::Decided(Verdict::Accept(value)) => value,
            Ended::Decided(Verdict::Lost(why)) => return Err(why),
            _ => return Err("the prepare ended with no verdict".into()),
        };
        proposer.begin_accept(value.clone());
        let mut answers = FanOut::new(Stragglers::Abandon);
        for (index, address) in acceptors.iter().enumerate() {
            if *address == self.me.address {
                let answer = self
                    .on_accept(ballot, &value, base_hash)
                    .unwrap_or_else(|why| Accepted::Failed(format!("{address}: {why}")));
                proposer.record(index, answer);
                continue;
            }
            answers.send(
                index,
                peers.layout_accept(address, timeout, ballot, &value, base_hash),
            );
        }
        let ended = answers.collect(&mut proposer, None).await;
        self.learn_from(acceptors, &mut proposer, version).await;
        match ended {
            Ended::Decided(Verdict::Chosen(value)) => Ok(value),
            Ended::Decided(Verdict::Lost(why)) => Err(why),
            _ => Err("the accept ended with no verdict".into()),
        }
    }

    /// Raises the ballot above any refusal reported, and learns the
    /// committed layouts refusals carried.
    async fn learn_from(
        &self,
        acceptors: &[String],
        proposer: &mut Proposer<Layout>,
        version: u64,
    ) {
        if let Some(refused) = proposer.highest_refused() {
            self.note_round(refused.round);
        }
        for (index, committed) in proposer.take_learned() {
            self.learn_from_answer(&acceptors[index], committed, version)
                .await;
        }
    }

    /// An acceptor answered with its committed layout: adopt it when newer;
    /// when older (it is behind), send it ours.
    async fn learn_from_answer(&self, address: &str, committed: Layout, version: u64) {
        if committed.version >= version {
            if let Err(why) = self.adopt_verified(committed).await {
                tracing::warn!(peer = address, %why, "cannot adopt a committed layout");
            }
        } else {
            let layout = self.layout();
            let (peers, timeout) = (&self.cluster.peers, self.cluster.rpc_timeout);
            let _ = peers.layout_commit(address, timeout, &layout).await;
        }
    }

    /// Tells every member of `layout` it is committed (in the background;
    /// heartbeats spread it to any that miss this).
    fn announce(&self, layout: &Layout) {
        // The members, and those this version removed (they stop).
        let just_removed = layout
            .removed
            .iter()
            .filter(|r| r.version == layout.version)
            .map(|r| r.address.as_str());
        let addresses: Vec<&str> = layout
            .members
            .iter()
            .map(|m| m.address.as_str())
            .chain(just_removed)
            .collect();
        for address in addresses {
            if address == self.me.address {
                continue;
            }
            let (peers, timeout) = (self.cluster.peers.clone(), self.cluster.rpc_timeout);
            let (address, layout) = (address.to_string(), layout.clone());
            tokio::spawn(async move {
                let _ = peers.layout_commit(&address, timeout, &layout).await;
            });
        }
    }

    /// `Membership.Join` from a joiner that names no instance (see
    /// [`Membership::on_join_as`]).
    pub async fn on_join(&self, address: &str) -> Result<Layout> {
        self.on_join_as(address, crate::clock::InstanceId::NONE)
            .await
    }
}

/// How long `--join` keeps asking before it gives up.
pub const JOIN_RETRY_FOR: Duration = Duration::from_secs(60);

/// Asks `seeds` in turn to add `address` (instance `instance`) to their
/// cluster; answers the layout that has it joining. What `DKVSServer
/// --join` does first. A round in which no seed answered is retried (the
/// Join RPC is idempotent: a seed answers the layout that already has this
/// instance joining, so a join that committed after its caller gave up is
/// picked up, not left behind) until `retry_for` has passed; a refusal
/// ends it at once.
pub async fn request_join(
    peers: &crate::net::PeerPool,
    seeds: &[String],
    address: &str,
    instance: crate::clock::InstanceId,
    replaces: &str,
    timeout: Duration,
    retry_for: Duration,
) -> Result<Layout> {
    let began = tokio::time::Instant::now();
    let mut failures = Vec::new();
    for round in 0u32.. {
        failures.clear();
        for seed in seeds {
            match peers
                .join_as(seed, timeout, address, instance, replaces)
                .await
            {
                Ok(layout) => return Ok(layout),
                Err(refused @ Error::FailedPrecondition(_)) => return Err(refused),
                Err(why) => failures.push(why.to_string()),
            }
        }
        if began.elapsed() >= retry_for {
            break;
        }
        let pause = Duration::from_millis(500 * u64::from(round.min(3) + 1));
        tracing::warn!(
            %address,
            failures = %failures.join("; "),
            "no seed could add this node yet; retrying"
        );
        tokio::time::sleep(pause.min(retry_for.saturating_sub(began.elapsed()))).await;
    }
    Err(Error::Unavailable(format!(
        "no seed could add {address} to its cluster within {} s: {}. A join that timed out may still have committed: \
         if `DKVSClient status` shows {address} joining, start this node again with the same data dir and --join \
         (it resumes the join), or run `DKVSClient cluster abort` to drop it",
        retry_for.as_secs(),
        failures.join("; ")
    )))
}
