//! Membership: the async shell around [`crate::layout`].
//!
//! [`Membership`] keeps the layout this node serves and its Paxos acceptor
//! state on disk, answers the layout RPCs (prepare, accept, commit, get,
//! join), proposes changes, and adopts newer layouts it hears of. Adopting a
//! layout stores it, raises the replica's fence (requests placed with an
//! older layout are refused from then on), swaps the placement, and teaches
//! the failure detector the new members.
//!
//! `driver.rs` moves a join along (stream, finish, settle, clean up) and
//! `stream.rs` copies a joining node's ranges. See `crate::layout` for why
//! each step is safe.

mod driver;
mod stream;

pub use crate::layout::progress::{JoinProgress, MoveProgress};
pub use stream::{RecordStream, stream_source};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::serving::ClusterView;
use crate::error::{Error, Result};
use crate::fanout::{Ended, FanOut, Stragglers, Tally};
use crate::layout::paxos::{Answer, Ballot};
use crate::layout::paxos::LayoutState;
use crate::serving::layout_file::LayoutStore;
use crate::layout::{Layout, Refusal};
use crate::net::call_within;
use crate::paxos::{Accepted, Promise, Proposer, Verdict};
use crate::pb;
use crate::placement::NodeIdentity;
use crate::replica::ReplicaStore;
use crate::serving::LayoutOwner;

/// Most attempts of one proposal (each a prepare and an accept round).
const MAX_PROPOSAL_ATTEMPTS: usize = 30;

pub struct Membership {
    me: NodeIdentity,
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
    /// The layout version whose streaming finished here.
    streamed: AtomicU64,
    /// The layout version whose moved-away data this node dropped.
    cleaned: AtomicU64,
    /// Anti-entropy rounds completed (the node's counter), and the value it
    /// had when this node first saw every member serve a settled layout.
    ae_rounds: Arc<AtomicU64>,
    settled_at_round: Mutex<Option<(u64, u64)>>,
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
        me: NodeIdentity,
        cluster: Arc<ClusterView>,
        replica: Arc<ReplicaStore>,
        layouts: Arc<LayoutOwner>,
        progress: JoinProgress,
        stream_rate: u64,
        ae_rounds: Arc<AtomicU64>,
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
            ae_rounds,
            settled_at_round: Mutex::new(None),
        })
    }

    /// The layout this node serves.
    pub fn layout(&self) -> Layout {
        self.layouts.layout()
    }

    pub fn progress(&self) -> Option<MoveProgress> {
        self.progress.get()
    }

    /// Serves `layout` if it is newer (see [`LayoutOwner::adopt`]).
    pub fn adopt(&self, layout: Layout) -> Result<bool> {
        self.layouts.adopt(layout)
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

    /// `Membership.LayoutPrepare`.
    pub fn on_prepare(&self, request: pb::LayoutPrepareRequest) -> Result<pb::LayoutPromise> {
        let ballot = pb::ballot_from(request.ballot);
        self.note_round(ballot.round);
        let (answer, state) = self.layouts.update_acceptor(|state| {
            if !self.same_base(state, request.version, request.base_hash) {
                return None;
            }
            let committed = state.committed.as_ref().map_or(0, |l| l.version);
            Some(state.acceptor.prepare(committed, request.version, ballot))
        })?;
        let Some(answer) = answer else {
            return Ok(pb::LayoutPromise::default());
        };
        Ok(match answer {
            Answer::Yes { accepted } => pb::LayoutPromise {
                promised: true,
                promised_ballot: Some(ballot.into()),
                accepted_ballot: accepted.as_ref().map(|(b, _)| (*b).into()),
                accepted: accepted.as_ref().map(|(_, l)| l.into()),
                committed: None,
            },
            Answer::No { promised } => pb::LayoutPromise {
                promised_ballot: Some(promised.into()),
                ..Default::default()
            },
            Answer::Committed | Answer::Behind => pb::LayoutPromise {
                committed: state.committed.as_ref().map(pb::Layout::from),
                ..Default::default()
            },
        })
    }

    /// `Membership.LayoutAccept`.
    pub fn on_accept(&self, request: pb::LayoutAcceptRequest) -> Result<pb::LayoutAccepted> {
        let ballot = pb::ballot_from(request.ballot);
        self.note_round(ballot.round);
        let layout = pb::layout_from(
            request
                .layout
                .ok_or_else(|| Error::InvalidArgument("layout is required".into()))?,
        )
        .map_err(Error::InvalidArgument)?;
        let (answer, state) = self.layouts.update_acceptor(|state| {
            if !self.same_base(state, layout.version, request.base_hash) {
                return None;
            }
            let committed = state.committed.as_ref().map_or(0, |l| l.version);
            Some(state.acceptor.accept(committed, &layout, ballot))
        })?;
        let Some(answer) = answer else {
            return Ok(pb::LayoutAccepted::default());
        };
        Ok(match answer {
            Answer::Yes { .. } => pb::LayoutAccepted {
                accepted: true,
                promised_ballot: Some(ballot.into()),
                committed: None,
            },
            Answer::No { promised } => pb::LayoutAccepted {
                promised_ballot: Some(promised.into()),
                ..Default::default()
            },
            Answer::Committed | Answer::Behind => pb::LayoutAccepted {
                committed: state.committed.as_ref().map(pb::Layout::from),
                ..Default::default()
            },
        })
    }

    fn note_round(&self, round: u64) {
        self.max_round.fetch_max(round, Ordering::Relaxed);
    }

    /// Commits the change `change` makes to the layout served, unless
    /// `done` says the layout already has it. Paxos over the members of the
    /// layout it changes; retried with higher ballots while proposals
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
            let acceptors: Vec<String> = base.members.iter().map(|m| m.address.clone()).collect();
            let round = self.max_round.fetch_add(1, Ordering::Relaxed) + 1;
            let ballot = Ballot {
                round,
                proposer: self.me.member_id,
            };
            match self
                .run_round(&acceptors, version, ballot, own, layout_hash(&base))
                .await
            {
                Ok(chosen) => {
                    self.adopt(chosen.clone())?;
                    self.announce(&chosen);
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
        let prepare = pb::LayoutPrepareRequest {
            version,
            ballot: Some(ballot.into()),
            base_hash,
        };
        let mut promises = FanOut::new(Stragglers::Abandon);
        for (index, address) in acceptors.iter().enumerate() {
            if *address == self.me.address {
                let promise = match self.on_prepare(prepare) {
                    Ok(promise) => pb::promise_from(promise),
                    Err(why) => Promise::Failed(format!("{address}: {why}")),
                };
                proposer.record(index, promise);
                continue;
            }
            let call = self.acceptor_call(address, move |mut client| async move {
                client.layout_prepare(prepare).await
            });
            promises.send(index, async move {
                call.await.map_or_else(Promise::Failed, pb::promise_from)
            });
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
        let accept = pb::LayoutAcceptRequest {
            ballot: Some(ballot.into()),
            layout: Some((&value).into()),
            base_hash,
        };
        let mut answers = FanOut::new(Stragglers::Abandon);
        for (index, address) in acceptors.iter().enumerate() {
            if *address == self.me.address {
                let answer = match self.on_accept(accept.clone()) {
                    Ok(answer) => pb::accepted_from(answer),
                    Err(why) => Accepted::Failed(format!("{address}: {why}")),
                };
                proposer.record(index, answer);
                continue;
            }
            let request = accept.clone();
            let call = self.acceptor_call(address, move |mut client| async move {
                client.layout_accept(request).await
            });
            answers.send(index, async move {
                call.await.map_or_else(Accepted::Failed, pb::accepted_from)
            });
        }
        let ended = answers.collect(&mut proposer, None).await;
        self.learn_from(acceptors, &mut proposer, version).await;
        match ended {
            Ended::Decided(Verdict::Chosen(value)) => Ok(value),
            Ended::Decided(Verdict::Lost(why)) => Err(why),
            _ => Err("the accept ended with no verdict".into()),
        }
    }

    /// One call to the acceptor at `address`, within the RPC deadline: its
    /// answer, or why there is none.
    fn acceptor_call<T, Call, Reply>(
        &self,
        address: &str,
        call: Call,
    ) -> impl std::future::Future<Output = std::result::Result<T, String>> + Send + 'static
    where
        Call: FnOnce(
                crate::pb::membership_client::MembershipClient<tonic::transport::Channel>,
            ) -> Reply
            + Send
            + 'static,
        Reply: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>
            + Send,
        T: Send + 'static,
    {
        let client = self.cluster.peers.membership_client(address);
        let (address, timeout) = (address.to_string(), self.cluster.rpc_timeout);
        async move {
            let client = client.map_err(|e| format!("{address}: {e}"))?;
            call_within(timeout, call(client))
                .await
                .map_err(|e| format!("{address}: {e}"))
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
            if let Err(why) = self.adopt(committed) {
                tracing::warn!(peer = address, %why, "cannot adopt a committed layout");
            }
        } else {
            let layout = self.layout();
            if let Ok(mut client) = self.cluster.peers.membership_client(address) {
                let _ = call_within(
                    self.cluster.rpc_timeout,
                    client.layout_commit(pb::Layout::from(&layout)),
                )
                .await;
            }
        }
    }

    /// Tells every member of `layout` it is committed (in the background;
    /// heartbeats spread it to any that miss this).
    fn announce(&self, layout: &Layout) {
        let message = pb::Layout::from(layout);
        for member in &layout.members {
            if member.address == self.me.address {
                continue;
            }
            let Ok(mut client) = self.cluster.peers.membership_client(&member.address) else {
                continue;
            };
            let (message, timeout) = (message.clone(), self.cluster.rpc_timeout);
            tokio::spawn(async move {
                let _ = call_within(timeout, client.layout_commit(message)).await;
            });
        }
    }

    /// `Membership.Join`: commits the layout with `address` joining (or
    /// answers the one that already has it: a joiner retrying).
    pub async fn on_join(&self, address: &str) -> Result<Layout> {
        if address.is_empty() || address.len() > 256 {
            return Err(Error::InvalidArgument(
                "join: the address must be HOST:PORT".into(),
            ));
        }
        let address = address.to_string();
        self.propose(|l| l.begin_join(&address), |l| l.is_member(&address))
            .await
    }
}

/// What a proposal names as the layout it changes.
pub fn layout_hash(layout: &Layout) -> u64 {
    use prost::Message;
    xxhash_rust::xxh3::xxh3_64(&pb::Layout::from(layout).encode_to_vec())
}

/// Asks `seeds` in turn to add `address` to their cluster; answers the
/// layout that has it joining. What `DKVSServer --join` does first.
pub async fn request_join(
    peers: &crate::net::PeerPool,
    seeds: &[String],
    address: &str,
    timeout: Duration,
) -> Result<Layout> {
    let mut failures = Vec::new();
    for seed in seeds {
        let mut client = match peers.membership_client(seed) {
            Ok(client) => client,
            Err(why) => {
                failures.push(format!("{seed}: {why}"));
                continue;
            }
        };
        let request = pb::JoinRequest {
            address: address.to_string(),
        };
        match tokio::time::timeout(timeout, client.join(request)).await {
            Ok(Ok(layout)) => {
                return pb::layout_from(layout.into_inner()).map_err(|why| {
                    Error::Unavailable(format!("{seed} answered a bad layout: {why}"))
                });
            }
            Ok(Err(status)) if status.code() == tonic::Code::FailedPrecondition => {
                return Err(Error::FailedPrecondition(format!(
                    "{seed} refused the join: {}",
                    status.message()
                )));
            }
            Ok(Err(status)) => {
                failures.push(format!("{seed}: {}", crate::net::describe_status(&status)))
            }
            Err(_) => failures.push(format!(
                "{seed}: no answer within {} ms",
                timeout.as_millis()
            )),
        }
    }
    Err(Error::Unavailable(format!(
        "no seed could add {address} to its cluster: {}",
        failures.join("; ")
    )))
}
