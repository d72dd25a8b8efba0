//! Heartbeats: every `--heartbeat-interval-ms` each node pings every peer
//! (`Liveness.Ping`) and feeds the answers to the failure detector. A peer
//! believed down keeps being pinged: that is how it is found up again.
//!
//! A ping carries the sender's hybrid logical clock and identities both
//! ways; the answer also carries the peer's wall clock (for its clock skew)
//! and its counts, which `Cluster.Status` reports without asking anyone.
//! Identities learnt here drive the read gate of a replacement node (see
//! [`crate::identity`]).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::clock::{InstanceId, Version, wall_clock_ms};
use crate::error::Result;
use crate::identity::Identity;
use crate::layout::progress::JoinProgress;
use crate::layout::progress::ProgressReport;
use crate::locks::Locked;
use crate::net::messages::{NodeStats, Ping, Pong};
use crate::placement::ThisNode;
use crate::replica::ReplicaStore;
use crate::serving::ClusterView;
use crate::workers::{RoundResult, WorkerError};

/// What a peer's last answered heartbeat told this node.
#[derive(Clone, Debug)]
pub struct PeerReport {
    /// The layout version the peer serves.
    pub layout_version: u64,
    /// The peer's wall clock minus this node's, in ms.
    pub clock_skew_ms: i64,
    /// The peer's counts, and when they arrived (absent from older nodes).
    pub stats: Option<(NodeStats, Instant)>,
    /// The instance that answered (NONE: a node of an older release), and
    /// whether it served reads (its read gate was open).
    pub instance_id: InstanceId,
    pub serves_reads: bool,
    /// When the answer arrived.
    pub answered_at: Instant,
}

impl PeerReport {
    /// Whether the peer said it is at its data quota (`--max-data-bytes`).
    fn at_data_quota(&self) -> bool {
        self.stats
            .as_ref()
            .is_some_and(|(stats, _)| stats.data_quota_reached)
    }
}

/// One node's heartbeats: sending rounds, answering pings, and what the
/// answers told.
pub struct Heartbeats {
    me: ThisNode,
    cluster: Arc<ClusterView>,
    identity: Arc<Identity>,
    replica: Arc<ReplicaStore>,
    interval: Duration,
    /// The last answer of each peer (std mutex: one map operation).
    reports: Mutex<HashMap<String, PeerReport>>,
    /// Each peer's state as last logged, to log each change once (std
    /// mutex: one round at a time).
    logged_up: Mutex<HashMap<String, bool>>,
    /// Members being pinged back (see [`Heartbeats::answer`]).
    pinging_back: Mutex<HashSet<String>>,
    /// Cancelled once the first round has ended.
    first_round: CancellationToken,
    /// Joining peers' progress, from their pings, and when it arrived.
    moves: Mutex<HashMap<String, (ProgressReport, Instant)>>,
    /// This node's join progress: it goes out with every ping.
    progress: JoinProgress,
    /// Peers found serving another layout at this node's version.
    forks: Mutex<HashMap<String, LayoutFork>>,
    /// When a refused ping last sent this node to look for a newer layout.
    refused_catch_up: Mutex<Option<Instant>>,
    /// Whether any peer's last answer said it is at its data quota.
    a_peer_at_data_quota: AtomicBool,
}

/// How often a refused ping may send this node looking for a newer layout
/// (a peer that lags behind a join refuses every ping until it catches up:
/// one look per this period is enough).
const REFUSED_CATCH_UP_EVERY: Duration = Duration::from_secs(5);

/// A peer serving another layout than this node's at the same version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayoutFork {
    pub version: u64,
    /// The hashes of this node's layout and the peer's.
    pub mine: u64,
    pub theirs: u64,
}

impl Heartbeats {
    pub fn new(
        me: ThisNode,
        cluster: Arc<ClusterView>,
        identity: Arc<Identity>,
        replica: Arc<ReplicaStore>,
        progress: JoinProgress,
        interval: Duration,
    ) -> Self {
        Self {
            me,
            cluster,
            identity,
            replica,
            interval,
            reports: Mutex::default(),
            logged_up: Mutex::default(),
            pinging_back: Mutex::default(),
            first_round: CancellationToken::new(),
            moves: Mutex::default(),
            progress,
            forks: Mutex::default(),
            refused_catch_up: Mutex::default(),
            a_peer_at_data_quota: Default::default(),
        }
    }

    /// Joining peers' progress as their pings last told it, with its age.
    pub fn moves(&self) -> Vec<(String, ProgressReport, Duration)> {
        let now = Instant::now();
        self.moves
            .locked()
            .iter()
            .map(|(address, (progress, at))| {
                (
                    address.clone(),
                    progress.clone(),
                    now.saturating_duration_since(*at),
                )
            })
            .collect()
    }

    /// A peer serves a newer layout: learn it in the background.
    fn learn_layout(&self, version: u64, from: &str) {
        if version > self.cluster.placement().version() {
            let (cluster, from) = (self.cluster.clone(), from.to_string());
            tokio::spawn(async move { cluster.layouts.catch_up_unless_busy(version, &from).await });
        }
    }

    /// Whether a refused ping may send this node looking for a newer layout
    /// now (at most once per [`REFUSED_CATCH_UP_EVERY`]).
    fn may_look_again(&self) -> bool {
        let mut last = self.refused_catch_up.locked();
        if last.is_some_and(|at| at.elapsed() < REFUSED_CATCH_UP_EVERY) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }

    /// Completes once the first round has ended: peers have heard who this
    /// node is, and this node what they knew at its address.
    pub async fn first_round_done(&self) {
        self.first_round.cancelled().await
    }

    /// The newest layout version a peer's answered heartbeat reported, and
    /// that peer, when it is newer than `than`.
    pub fn newest_layout_reported(&self, than: u64) -> Option<(u64, String)> {
        self.newest_layout_reported_by(than, |_| true)
    }

    /// [`Heartbeats::newest_layout_reported`], among the peers `counted`
    /// says to count (say, those believed up).
    pub fn newest_layout_reported_by(
        &self,
        than: u64,
        counted: impl Fn(&str) -> bool,
    ) -> Option<(u64, String)> {
        self.reports
            .locked()
            .iter()
            .filter(|(address, report)| report.layout_version > than && counted(address))
            .max_by_key(|(_, report)| report.layout_version)
            .map(|(address, report)| (report.layout_version, address.clone()))
    }

    /// What `address`'s last answered heartbeat told, if any.
    pub fn report(&self, address: &str) -> Option<PeerReport> {
        self.reports.locked().get(address).cloned()
    }

    /// Keeps `report` as `address`'s last answer; answers the clock skew
    /// the previous one measured, if any.
    fn keep_report(&self, address: &str, report: PeerReport) -> Option<i64> {
        let mut reports = self.reports.locked();
        let was = reports
            .insert(address.to_string(), report)
            .map(|old| old.clock_skew_ms);
        let any_full = reports.values().any(PeerReport::at_data_quota);
        self.a_peer_at_data_quota.store(any_full, Ordering::Relaxed);
        was
    }

    /// Whether any peer's last answer said it is at its data quota.
    pub fn any_peer_at_data_quota(&self) -> bool {
        self.a_peer_at_data_quota.load(Ordering::Relaxed)
    }

    /// Whether `address`'s last answer said it is at its data quota (one
    /// atomic load when no peer is).
    pub fn is_at_data_quota(&self, address: &str) -> bool {
        self.a_peer_at_data_quota.load(Ordering::Relaxed)
            && self
                .reports
                .locked()
                .get(address)
                .is_some_and(PeerReport::at_data_quota)
    }

    /// The instance that answered this process's heartbeats from `address`
    /// within `max_age` (NONE: none did). Only a recent answer counts: not
    /// the instance recorded in the data dir, nor an answer from before the
    /// peer stopped answering, either of which may be an instance replaced
    /// since.
    pub fn answering_instance(&self, address: &str, max_age: Duration) -> InstanceId {
        self.reports
            .locked()
            .get(address)
            .filter(|report| report.answered_at.elapsed() <= max_age)
            .map_or(InstanceId::NONE, |report| report.instance_id)
    }

    /// The heartbeat interval.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// One round: pings every peer at once, then updates the detector and
    /// the read gate with the answers. The round fails when peers exist and
    /// none answered (this node is cut off, or alone alive); a peer down
    /// while another answers is the detector's news, not a failure here.
    pub async fn round(self: &Arc<Self>) -> RoundResult {
        let view = self.cluster.placement();
        let peers: Vec<String> = view.peers().map(|m| m.address.clone()).collect();
        let liveness = &self.cluster.liveness;
        liveness.update(|detector| detector.round_started(Instant::now()));
        let pings = peers
            .iter()
            .map(|address| self.ping(address, self.interval));
        let results = futures::future::join_all(pings).await;
        self.first_round.cancel();
        let down: BTreeSet<String> = peers
            .iter()
            .filter(|p| !liveness.is_up(p))
            .cloned()
            .collect();
        if let Err(why) = self.identity.settle(&down) {
            tracing::warn!(%why, "cannot record the read gate");
        }
        let mut logged_up = self.logged_up.locked();
        let (mut answered, mut first_failure) = (0, None);
        for (address, result) in peers.iter().zip(results) {
            match &result {
                Ok(()) => answered += 1,
                Err(why) if first_failure.is_none() => {
                    first_failure = Some(format!("{address}: {why}"));
                }
                Err(_) => {}
            }
            let now = Instant::now();
            let health = liveness.update(|detector| {
                match result {
                    Ok(()) => detector.heartbeat(address, now),
                    Err(why) => {
                        tracing::debug!(peer = %address, %why, "heartbeat failed");
                        detector.failed(address, why.to_string())
                    }
                }
                detector.health(address, now)
            });
            // Peers start as up: only a change is news.
            let was_up = logged_up.insert(address.clone(), health.up).unwrap_or(true);
            if was_up != health.up {
                tracing::info!(peer = %address, up = health.up, phi = health.phi, error = ?health.last_error, "peer state changed");
            }
        }
        match first_failure {
            Some(why) if answered == 0 => Err(WorkerError::new(format!(
                "no peer answered a heartbeat ({} asked); {why}",
                peers.len()
            ))),
            _ => Ok(()),
        }
    }

    /// One heartbeat to `address`: carries this node's HLC, merges the
    /// peer's, and measures the peer's clock skew from its wall clock (the
    /// midpoint of the call is taken as the moment it answered).
    async fn ping(&self, address: &str, timeout: Duration) -> Result<()> {
        let (layout_version, layout_hash) = self.cluster.layouts.version_and_hash();
        let ping = Ping {
            from: self.me.address.clone(),
            hlc: self.replica.stats().hlc,
            instance_id: self.me.instance_id,
            known_instance_id: self.identity.known_instance(address)?,
            serves_reads: self.identity.read_refusal().is_none(),
            layout_version,
            layout_hash,
            progress: self.progress.get().map(|p| p.report()),
            cluster_id: self.cluster.layouts.cluster_id(),
        };
        let sent_ms = wall_clock_ms();
        let answer = match self.cluster.peers.ping(address, timeout, ping).await {
            Ok(answer) => answer,
            Err(why) => {
                self.cluster.layouts.note_refusal(address, &why.to_string());
                // Under mutual TLS a peer refuses the pings of a node its
                // layout does not name: one that was removed, or whose
                // join was aborted. Its layout (the read-only fetch stays
                // open to any node certificate) tells this node so.
                if matches!(why, crate::error::Error::PermissionDenied(_)) && self.may_look_again()
                {
                    let next = self.cluster.placement().version().saturating_add(1);
                    self.learn_layout(next, address);
                }
                return Err(why);
            }
        };
        // Another cluster's answer marks nothing up and teaches nothing.
        self.cluster
            .layouts
            .check_sender(answer.cluster_id, address)?;
        let midpoint_ms = sent_ms + wall_clock_ms().saturating_sub(sent_ms) / 2;
        let skew_ms = answer.wall_ms as i64 - midpoint_ms as i64;
        let bound = self.replica.bound();
        self.learn_layout(answer.layout_version, address);
        self.compare_layouts(address, (layout_version, layout_hash), &answer);
        let report = PeerReport {
            layout_version: answer.layout_version,
            clock_skew_ms: skew_ms,
            stats: answer.stats.map(|stats| (stats, Instant::now())),
            instance_id: answer.instance_id,
            serves_reads: answer.serves_reads,
            answered_at: Instant::now(),
        };
        let was = self.keep_report(address, report);
        let half = (bound.max_skew_ms / 2) as i64;
        let far = |skew: i64| skew.abs() > half;
        if far(skew_ms) && !was.is_some_and(far) {
            tracing::warn!(
                peer = address,
                skew_ms,
                max_clock_skew_ms = bound.max_skew_ms,
                "a peer's clock is more than half --max-clock-skew-ms away from this node's; check NTP on both hosts"
            );
        }
        // An answer without an instance id (a node of an older version)
        // tells nothing about who was here.
        if !answer.instance_id.is_none() {
            self.identity
                .learn_peer(address, answer.instance_id, answer.serves_reads)
                .and_then(|_| self.identity.heard(address, answer.known_instance_id))?;
        }
        if !self.replica.observe(Version::new(answer.hlc, 0)) {
            tracing::warn!(
                peer = address,
                hlc = answer.hlc,
                "a peer's clock is beyond --max-clock-skew-ms; not merged"
            );
        }
        Ok(())
    }

    /// Answers a peer's ping with this node's clock, identities and `stats`.
    pub fn answer(self: &Arc<Self>, request: Ping, stats: NodeStats) -> Result<Pong> {
        // A sender's clock beyond the skew bound is simply not merged.
        self.replica.observe(Version::new(request.hlc, 0));
        // The sender could be anyone claiming a member's address: learn
        // nothing from it. A node not yet answering reads pings that member
        // back at once instead (one at a time per member), and learns from
        // the answer of the address it dialled.
        let is_member = self.cluster.placement().is_member(&request.from);
        self.learn_layout(request.layout_version, &request.from);
        if is_member {
            let mut moves = self.moves.locked();
            match request.progress {
                Some(progress) => {
                    moves.insert(request.from.clone(), (progress, Instant::now()));
                }
                None => {
                    moves.remove(&request.from);
                }
            }
        }
        if is_member && self.identity.read_refusal().is_some() {
            self.ping_back(&request.from);
        }
        let known = if is_member {
            self.identity.known_instance(&request.from)?
        } else {
            InstanceId::NONE
        };
        let (layout_version, layout_hash) = self.cluster.layouts.version_and_hash();
        Ok(Pong {
            member_id: self.me.member_id,
            hlc: self.replica.stats().hlc,
            wall_ms: wall_clock_ms(),
            instance_id: self.me.instance_id,
            known_instance_id: known,
            serves_reads: self.identity.read_refusal().is_none(),
            stats: Some(stats),
            layout_version,
            layout_hash,
            cluster_id: self.cluster.layouts.cluster_id(),
        })
    }

    /// Two members serving different layouts at one version is a fork:
    /// logged loudly once per peer and version, and shown by
    /// `Cluster.Status` until the peer answers with this node's layout.
    fn compare_layouts(&self, address: &str, (version, mine): (u64, u64), answer: &Pong) {
        let mut forks = self.forks.locked();
        if answer.layout_version != version || mine == 0 || answer.layout_hash == 0 {
            return;
        }
        if answer.layout_hash == mine {
            forks.remove(address);
            return;
        }
        let fork = LayoutFork {
            version,
            mine,
            theirs: answer.layout_hash,
        };
        if forks.insert(address.to_string(), fork) != Some(fork) {
            tracing::error!(
                peer = address,
                version,
                mine = format!("{mine:016x}"),
                theirs = format!("{:016x}", answer.layout_hash),
                "two different layouts at one version: this node and a peer serve different member lists; the cluster forked (check how the nodes were bootstrapped, and DKVSClient status on each)"
            );
        }
    }

    /// Peers serving another layout at this node's version.
    pub fn forks(&self) -> Vec<(String, LayoutFork)> {
        self.forks
            .locked()
            .iter()
            .map(|(address, fork)| (address.clone(), *fork))
            .collect()
    }

    /// Sends `address` a heartbeat now, in the background, unless one sent
    /// this way is still in flight.
    fn ping_back(self: &Arc<Self>, address: &str) {
        {
            let mut pinging = self.pinging_back.locked();
            if !pinging.insert(address.to_string()) {
                return;
            }
        }
        let (heartbeats, address) = (self.clone(), address.to_string());
        tokio::spawn(async move {
            if let Err(why) = heartbeats.ping(&address, heartbeats.interval).await {
                tracing::debug!(peer = %address, %why, "ping back failed");
            }
            heartbeats.pinging_back.locked().remove(&address);
        });
    }
}
