//! Quorum arithmetic and the bookkeeping of one quorum call.
//!
//! Everything here is pure: the coordinator feeds replica replies in as they
//! arrive and asks what to do next. Keeping the rules out of the async code
//! makes them easy to read and to test exhaustively.
//!
//! * A write is acknowledged by a replica only when the replica *holds the
//!   coordinator's version* after the call. A replica that holds a newer
//!   version refuses and says which; the coordinator then re-stamps above it
//!   and tries again. With W + W > N, this is what guarantees that a write
//!   which begins after another was acknowledged gets the higher version.
//!   A write is re-stamped only when no replica can have stored the first
//!   version (every replica it was sent to refused): otherwise one value
//!   would exist under two versions, and a reader could see it, then the
//!   newer write, then it again. Such a write is *superseded*: it fails, may
//!   or may not stay visible, and is ordered before the newer one.
//! * A read answers from the first R replies, newest version wins; replies
//!   that arrive later still count for read repair.
//! * Reads never go backwards. A QUORUM or ALL read whose winning version is
//!   held by fewer than W of the replicas that answered may be the first to
//!   see a write that reached fewer than W replicas (a write at ONE, or a
//!   failed one). Answering it right away would let the next read, from
//!   other replicas, miss it and return an older value. So such a read first
//!   writes the winner until W replicas hold it ([`BlockingRepair`]); only
//!   when W already hold it does repair stay in the background. A
//!   replica that holds a version newer than the winner during that repair
//!   makes the coordinator read again (the winner is no longer the newest).

use crate::clock::Version;
use crate::error::RollCall;
use crate::record::{Record, newest};

/// How many of a key's replicas must answer a request (also
/// `DKVSClient --consistency`, hence clap's `ValueEnum`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Consistency {
    One,
    Quorum,
    All,
    /// Writes only: one replica or one stored hint is enough.
    Any,
}

impl Consistency {
    /// Replies needed out of `replicas`: 1, `replicas / 2 + 1`, or all.
    pub fn required(self, replicas: usize) -> usize {
        match self {
            Consistency::One | Consistency::Any => replicas.min(1),
            Consistency::Quorum => {
                if replicas == 0 {
                    0
                } else {
                    replicas / 2 + 1
                }
            }
            Consistency::All => replicas,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Consistency::One => "ONE",
            Consistency::Quorum => "QUORUM",
            Consistency::All => "ALL",
            Consistency::Any => "ANY",
        }
    }
}

/// Why a replica did not answer a call (a read or a write).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplicaError {
    /// The replica refused the request itself (e.g. a key over its limit):
    /// asking other replicas will not help.
    Rejected(String),
    /// The replica could not be reached, timed out or failed.
    Failed(String),
    /// The replica serves a newer layout (this version) and refused the
    /// call unapplied: place it again with that layout.
    StaleLayout(u64),
}

impl std::fmt::Display for ReplicaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplicaError::Rejected(why) => write!(f, "rejected: {why}"),
            ReplicaError::Failed(why) => f.write_str(why),
            ReplicaError::StaleLayout(v) => write!(f, "refused: it serves newer layout v{v}"),
        }
    }
}

/// A replica a quorum call was placed on, as the rules see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Its address, for messages.
    pub address: String,
    /// Set when the failure detector believes it is down: the call is not
    /// sent to it, and it counts as failed (certainly not stored).
    pub believed_down: Option<String>,
}

/// Where one replica stands in a quorum call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// Not asked: believed down.
    NotAsked,
    /// Asked, no answer yet.
    Waiting,
    /// Answered (for writes: holds the call's version).
    Answered,
    /// Asked, and failed (or, for writes, kept another version).
    Failed,
}

impl Standing {
    /// Every target waiting, except those not asked.
    pub fn initial(targets: &[Target]) -> Vec<Standing> {
        targets
            .iter()
            .map(|t| {
                if t.believed_down.is_some() {
                    Standing::NotAsked
                } else {
                    Standing::Waiting
                }
            })
            .collect()
    }
}

/// The replicas of a failed quorum call, by what they did.
pub fn roll_call(targets: &[Target], standing: &[Standing]) -> RollCall {
    let with = |wanted: Standing| -> Vec<String> {
        targets
            .iter()
            .zip(standing)
            .filter(|(_, s)| **s == wanted)
            .map(|(t, _)| t.address.clone())
            .collect()
    };
    RollCall {
        answered: with(Standing::Answered),
        not_asked: with(Standing::NotAsked),
        waiting: with(Standing::Waiting),
    }
}

/// A tally's failure lines without those of replicas that were not asked
/// (the roll call names them).
pub fn asked_failures(targets: &[Target], failures: &[String]) -> Vec<String> {
    failures
        .iter()
        .filter(|line| {
            !targets.iter().any(|t| {
                t.believed_down.is_some()
                    && line
                        .strip_prefix(t.address.as_str())
                        .is_some_and(|rest| rest.starts_with(": "))
            })
        })
        .cloned()
        .collect()
}

/// What one replica said to a write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteReply {
    /// The replica holds this version after the call.
    Holds(Version),
    /// The replica could not be reached or failed; the text says why. It
    /// may have stored the write.
    Failed(String),
    /// The write was not sent (the replica is believed down); the text says
    /// why. It certainly did not store it.
    NotSent(String),
}

/// What a coordinator should do next with a write round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteDecision {
    /// Enough replicas hold the version: answer the client.
    Acknowledged { acks: usize },
    /// Every replica refused, holding a newer version: re-stamp above it
    /// and retry.
    Restamp { above: Version },
    /// W is out of reach because replicas hold a newer version, and some
    /// replica may hold this round's version: fail (do not re-stamp).
    Superseded { above: Version },
    /// Too many replicas failed for the quorum to be reached.
    Failed,
    /// Wait for more replies.
    Pending,
}

/// The replies to one write round (one version sent to all replicas).
#[derive(Clone, Debug)]
pub struct WriteTally {
    /// The version this round writes.
    version: Version,
    /// Acknowledgements needed.
    needed: usize,
    /// Replicas the round was sent to.
    sent: usize,
    /// Replicas that hold `version`.
    acks: usize,
    /// Replicas that refused because they hold a newer version.
    refusals: usize,
    /// The newest version a refusing replica holds.
    newer: Option<Version>,
    /// Why replicas failed, one line each.
    failures: Vec<String>,
    /// Replicas that failed but may have stored the version.
    uncertain: usize,
    /// While data moves: the replica sets (indices into the replicas the
    /// round was sent to) that each need their own acknowledgements, and
    /// how many. Empty: one set of all replicas, `needed`.
    sets: Vec<(Vec<usize>, usize)>,
    /// Per replica index: holds the version / answered at all.
    acked: Vec<bool>,
    answered_at: Vec<bool>,
}

impl WriteTally {
    pub fn new(version: Version, needed: usize, sent: usize) -> Self {
        Self {
            version,
            needed,
            sent,
            acks: 0,
            refusals: 0,
            newer: None,
            failures: Vec::new(),
            uncertain: 0,
            sets: Vec::new(),
            acked: vec![false; sent],
            answered_at: vec![false; sent],
        }
    }

    /// A round over the union of several replica sets (a layout change in
    /// progress): acknowledged only when every set has its own `needed`
    /// acknowledgements. Feed replies with [`WriteTally::record_at`].
    pub fn in_sets(version: Version, sets: Vec<(Vec<usize>, usize)>, sent: usize) -> Self {
        let needed = sets.iter().map(|(_, n)| *n).max().unwrap_or(0);
        let mut tally = Self::new(version, needed, sent);
        if sets.len() > 1 {
            tally.sets = sets;
        }
        tally
    }

    /// [`WriteTally::record`] for the replica at `index` of the round.
    pub fn record_at(&mut self, index: usize, replica: &str, reply: WriteReply) {
        if let Some(answered) = self.answered_at.get_mut(index) {
            *answered = true;
        }
        if let (WriteReply::Holds(held), Some(acked)) = (&reply, self.acked.get_mut(index)) {
            *acked = *held == self.version;
        }
        self.record(replica, reply);
    }

    /// Whether every set has its acknowledgements (`Some(true)`), can
    /// still get them (`Some(false)`), or one cannot (`None`).
    fn sets_standing(&self) -> Option<bool> {
        let mut all_met = true;
        for (members, needed) in &self.sets {
            let acks = members
                .iter()
                .filter(|&&i| self.acked.get(i) == Some(&true))
                .count();
            let pending = members
                .iter()
                .filter(|&&i| self.answered_at.get(i) == Some(&false))
                .count();
            if acks < *needed {
                all_met = false;
                if acks + pending < *needed {
                    return None;
                }
            }
        }
        Some(all_met)
    }

    pub fn record(&mut self, replica: &str, reply: WriteReply) {
        match reply {
            WriteReply::Holds(held) if held == self.version => self.acks += 1,
            WriteReply::Holds(held) if held > self.version => {
                self.refusals += 1;
                self.newer = self.newer.max(Some(held));
            }
            WriteReply::Holds(held) => {
                self.uncertain += 1;
                self.failures.push(format!(
                    "{replica}: kept older version {held} instead of {}",
                    self.version
                ))
            }
            WriteReply::Failed(why) => {
                self.uncertain += 1;
                self.failures.push(format!("{replica}: {why}"))
            }
            WriteReply::NotSent(why) => self.failures.push(format!("{replica}: {why}")),
        }
    }

    fn answered(&self) -> usize {
        self.acks + self.failures.len() + self.refusals
    }

    pub fn decision(&self) -> WriteDecision {
        let pending = self.sent - self.answered().min(self.sent);
        let (met, reachable) = if self.sets.is_empty() {
            (self.acks >= self.needed, self.acks + pending >= self.needed)
        } else {
            match self.sets_standing() {
                Some(met) => (met, true),
                None => (false, false),
            }
        };
        if met {
            WriteDecision::Acknowledged { acks: self.acks }
        } else if reachable {
            // Replicas still to answer could complete the quorum: a refusal
            // so far is not yet a reason to start over.
            WriteDecision::Pending
        } else if let Some(above) = self.newer {
            if pending > 0 {
                // Whether a replica stores this version decides between
                // re-stamping and failing: wait for every answer.
                WriteDecision::Pending
            } else if self.acks == 0 && self.uncertain == 0 {
                WriteDecision::Restamp { above }
            } else {
                WriteDecision::Superseded { above }
            }
        } else {
            WriteDecision::Failed
        }
    }

    pub fn acks(&self) -> usize {
        self.acks
    }

    /// Whether a replica may hold this round's version: one acknowledged
    /// it, or failed after it may have stored it.
    pub fn may_be_stored(&self) -> bool {
        self.acks > 0 || self.uncertain > 0
    }

    pub fn failures(&self) -> &[String] {
        &self.failures
    }
}

/// What a reader should do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadDecision {
    /// Enough replicas answered; this is the newest record among them.
    Answer(Option<Record>),
    /// Too many replicas failed for the quorum to be reached.
    Failed,
    /// Wait for more replies.
    Pending,
}

/// A replica that should receive `record` because it answered with an older
/// version or none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepairPlan {
    /// The newest record any replica returned.
    pub record: Record,
    /// Indices (into the replica list) of replicas that are behind.
    pub stale: Vec<usize>,
}

/// A read whose winner must reach W replicas before it is answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockingRepair {
    /// The newest record any replica returned: the answer, once W hold it.
    pub record: Record,
    /// Replicas known to hold `record.version` already.
    pub holding: usize,
    /// Replicas that must hold it before the answer: W = N/2+1.
    pub needed: usize,
    /// Indices (into the replica list) to write it to: those that answered
    /// with an older version (or none) first, then those that have not
    /// answered yet (writing to a replica that holds it is a no-op).
    pub targets: Vec<usize>,
}

impl BlockingRepair {
    /// Counts the repair writes: acknowledged once `needed - holding` of the
    /// targets hold the winner; a target holding a newer version is a
    /// [`WriteDecision::Restamp`] or [`WriteDecision::Superseded`] (for a
    /// read, either means: read again).
    pub fn tally(&self) -> WriteTally {
        WriteTally::new(
            self.record.version,
            self.needed.saturating_sub(self.holding),
            self.targets.len(),
        )
    }
}

/// The replies to one read.
#[derive(Clone, Debug)]
pub struct ReadTally {
    /// Replies needed.
    needed: usize,
    /// Replicas asked (indices `0..sent`).
    sent: usize,
    /// Successful replies: replica index and what it holds, one per replica.
    replies: Vec<(usize, Option<Record>)>,
    /// Replicas that failed and gave no reply.
    failed: Vec<usize>,
    /// Why replicas failed, one line each.
    failures: Vec<String>,
}

impl ReadTally {
    pub fn new(needed: usize, sent: usize) -> Self {
        Self {
            needed,
            sent,
            replies: Vec::with_capacity(sent),
            failed: Vec::new(),
            failures: Vec::new(),
        }
    }

    /// Notes what replica `index` holds (or why it failed). A replica heard
    /// from twice (a read reply, then a repair write that reached it) keeps
    /// the newer of the two, and a failure after a reply changes nothing.
    pub fn record(&mut self, index: usize, replica: &str, reply: Result<Option<Record>, String>) {
        let known = self.replies.iter_mut().find(|(i, _)| *i == index);
        match (reply, known) {
            (Ok(record), Some((_, held))) => {
                if record.as_ref().map(|r| r.version) > held.as_ref().map(|h| h.version) {
                    *held = record;
                }
            }
            (Ok(record), None) => {
                if let Some(at) = self.failed.iter().position(|i| *i == index) {
                    self.failed.remove(at);
                }
                self.replies.push((index, record));
            }
            (Err(_), Some(_)) => {}
            (Err(why), None) => {
                self.failed.push(index);
                self.failures.push(format!("{replica}: {why}"));
            }
        }
    }

    pub fn replies(&self) -> usize {
        self.replies.len()
    }

    pub fn failures(&self) -> &[String] {
        &self.failures
    }

    fn newest(&self) -> Option<&Record> {
        self.replies
            .iter()
            .fold(None, |best, (_, record)| newest(best, record.as_ref()))
    }

    pub fn decision(&self) -> ReadDecision {
        let answered = self.replies.len() + self.failed.len();
        if self.replies.len() >= self.needed {
            ReadDecision::Answer(self.newest().cloned())
        } else if self.replies.len() + (self.sent - answered.min(self.sent)) < self.needed {
            ReadDecision::Failed
        } else {
            ReadDecision::Pending
        }
    }

    /// Which replicas that answered are behind the newest record seen.
    pub fn repair_plan(&self) -> Option<RepairPlan> {
        let record = self.newest()?.clone();
        let stale: Vec<usize> = self
            .replies
            .iter()
            .filter(|(_, held)| held.as_ref().is_none_or(|h| h.version < record.version))
            .map(|(index, _)| *index)
            .collect();
        (!stale.is_empty()).then_some(RepairPlan { record, stale })
    }

    /// Replies that hold the newest version seen.
    pub fn holding_newest(&self) -> usize {
        let Some(version) = self.newest().map(|r| r.version) else {
            return 0;
        };
        self.replies
            .iter()
            .filter(|(_, held)| held.as_ref().is_some_and(|h| h.version == version))
            .count()
    }

    /// Whether a read at `consistency`, answered now, must first write its
    /// winner to more replicas: at QUORUM and ALL, when fewer than W of the
    /// replies received hold the winning version (a value or a tombstone).
    /// `None` when W already hold it, at ONE, and when no replica knows the key.
    pub fn blocking_repair(&self, consistency: Consistency) -> Option<BlockingRepair> {
        if !matches!(consistency, Consistency::Quorum | Consistency::All) {
            return None;
        }
        let record = self.newest()?.clone();
        let needed = Consistency::Quorum.required(self.sent);
        let holding = self.holding_newest();
        if holding >= needed {
            return None;
        }
        let stale = self
            .replies
            .iter()
            .filter(|(_, held)| held.as_ref().is_none_or(|h| h.version < record.version))
            .map(|(index, _)| *index);
        let unanswered = (0..self.sent).filter(|index| {
            !self.failed.contains(index) && !self.replies.iter().any(|(i, _)| i == index)
        });
        let targets = stale.chain(unanswered).collect();
        Some(BlockingRepair {
            record,
            holding,
            needed,
            targets,
        })
    }
}

mod write_round;

pub use write_round::{MAX_WRITE_ROUNDS, Placed, Step, WriteAck, WriteRound};

#[cfg(test)]
mod tests;
