//! The write protocol of one PUT or DELETE, as a state machine: replica
//! replies in, [`Step`]s out. The coordinator's async loop only carries
//! out each step (send the round, learn a layout, pause and stamp, store
//! hints) and feeds back what happened; every decision is made here.
//!
//! The rules, in the order they apply:
//!
//! 1. **A round** sends one version to every replica of every replica set
//!    (all N; more while data moves) and is acknowledged once each set has
//!    its W replicas *holding that version* ([`WriteTally`]).
//! 2. **Stale layout.** A replica serving a newer layout refuses unapplied.
//!    If the round was not acknowledged, the coordinator learns that layout
//!    and sends the *same* version to the new replica sets: a round that may
//!    have left the version somewhere must never be re-stamped.
//! 3. **Re-stamp or superseded.** Replicas holding a newer version put the
//!    quorum out of reach. When no replica can hold this round's version,
//!    it is re-stamped above the newest one seen and sent again (after a
//!    random pause, so two writers of one key stop overtaking each other in
//!    lock step). When one may (it acknowledged, failed after sending, or an
//!    earlier round reached it), the write is *superseded*: it fails and may
//!    stay visible, ordered before the newer write.
//! 4. **ANY.** A write at ANY that no replica holds succeeds if a hint for a
//!    replica it missed is stored.
//! 5. **Give up** after [`MAX_WRITE_ROUNDS`] rounds of any kind.
//!
//! A replica that did not answer before the round was decided counts as one
//! that may hold the version; a replica whose call failed gets a hint once
//! the write is acknowledged.

use super::{
    Consistency, ReplicaError, Standing, Target, WriteDecision, WriteReply, WriteTally,
    asked_failures, roll_call,
};
use crate::clock::Version;
use crate::error::Error;
use crate::fanout::Tally;

/// Most write rounds (re-stamps and re-placements) before giving up on a
/// hotly contended key.
pub const MAX_WRITE_ROUNDS: usize = 10;

/// A write's outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteAck {
    /// The version the write was stored under.
    pub version: Version,
    /// Replicas that held it when the answer was sent.
    pub acks: usize,
}

/// Where a write is sent under one layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placed {
    /// The union of the key's replica sets.
    pub targets: Vec<Target>,
    /// Each replica set, as indices into `targets` (one set unless data
    /// moves).
    pub sets: Vec<Vec<usize>>,
    /// The layout version the placement comes from.
    pub layout_version: u64,
}

/// What the coordinator must do next.
#[derive(Debug)]
pub enum Step {
    /// Send `version` to the targets `to` (indices into the placement),
    /// feed each reply to [`WriteRound::record`] until the round has a
    /// verdict (or every reply is in), then call [`WriteRound::round_over`].
    Send { version: Version, to: Vec<usize> },
    /// Learn layout `layout` (or newer) from `from`, then call
    /// [`WriteRound::placed_again`] with the placement under the newest
    /// layout known, or `None` when none is newer.
    CatchUp { layout: u64, from: String },
    /// Pause (round `round`'s back-off), stamp a new version above `above`
    /// and call [`WriteRound::restamped`].
    Restamp { above: Version, round: usize },
    /// Store a hint for each of these targets, then call
    /// [`WriteRound::hints_stored`] with how many were stored.
    StoreHints { targets: Vec<usize> },
    /// Answer the client with `ack`; store hints for `hint` (targets that
    /// failed or were not asked).
    Acknowledged { ack: WriteAck, hint: Vec<usize> },
    /// Answer the client with this error.
    Fail(Error),
}

/// One PUT or DELETE, across all its rounds.
#[derive(Debug)]
pub struct WriteRound {
    /// PUT or DELETE, for messages.
    operation: &'static str,
    key: String,
    consistency: Consistency,
    /// The version the current round sends.
    version: Version,
    /// Rounds started.
    rounds: usize,
    /// Where the current round goes.
    placed: Placed,
    /// The current round's replies.
    tally: WriteTally,
    /// Where each target of the current round stands.
    standing: Vec<Standing>,
    /// Targets of the current round to hint if the write is acknowledged.
    failed: Vec<usize>,
    /// The newest layout a replica refused the current round for, and who.
    stale: Option<(u64, String)>,
    /// The newest version any replica reported (the clock observes it).
    newest_seen: Option<Version>,
    /// Whether an earlier round of `version` (placed with an older layout)
    /// may have left it on a replica: it must not be re-stamped then.
    sent_before: bool,
    /// Acknowledgements earlier rounds of `version` got (for the error).
    acks_before: usize,
    /// The current round's decision, kept while the layout is caught up,
    /// and whether calls of it were still in flight.
    decided: Option<WriteDecision>,
    unanswered: bool,
    /// Whether any round sent anything to any replica.
    sent_any: bool,
}

impl WriteRound {
    /// A write of `key` stamped `version`, placed as `placed`. Start with
    /// [`WriteRound::start`].
    pub fn new(
        operation: &'static str,
        key: &str,
        consistency: Consistency,
        version: Version,
        placed: Placed,
    ) -> Self {
        let mut write = Self {
            operation,
            key: key.to_string(),
            consistency,
            version,
            rounds: 0,
            tally: WriteTally::new(version, 0, 0),
            standing: Vec::new(),
            failed: Vec::new(),
            stale: None,
            newest_seen: None,
            sent_before: false,
            acks_before: 0,
            decided: None,
            unanswered: false,
            sent_any: false,
            placed,
        };
        write.reset_round();
        write
    }

    /// The first step: send the first round.
    pub fn start(&mut self) -> Step {
        self.begin_round()
    }

    /// The version the current round sends.
    pub fn version(&self) -> Version {
        self.version
    }

    /// The newest version any replica reported so far.
    pub fn newest_seen(&self) -> Option<Version> {
        self.newest_seen
    }

    /// Where the current round goes.
    pub fn placed(&self) -> &Placed {
        &self.placed
    }

    /// Whether any replica was sent this write (so a failure's outcome is
    /// unknown rather than not applied).
    pub fn sent_any(&self) -> bool {
        self.sent_any
    }

    fn reset_round(&mut self) {
        let sets: Vec<(Vec<usize>, usize)> = self
            .placed
            .sets
            .iter()
            .map(|set| (set.clone(), self.consistency.required(set.len())))
            .collect();
        self.tally = WriteTally::in_sets(self.version, sets, self.placed.targets.len());
        self.standing = Standing::initial(&self.placed.targets);
        self.failed = Vec::new();
        self.stale = None;
        self.decided = None;
        self.unanswered = false;
        for (index, target) in self.placed.targets.iter().enumerate() {
            if let Some(why) = &target.believed_down {
                self.tally
                    .record_at(index, &target.address, WriteReply::NotSent(why.clone()));
                self.failed.push(index);
            }
        }
    }

    fn begin_round(&mut self) -> Step {
        if self.rounds >= MAX_WRITE_ROUNDS {
            if self.sent_before {
                // The version may be on a replica from a round placed with
                // an older layout: the outcome is unknown, not a refusal.
                return Step::Fail(self.quorum_not_reached());
            }
            return Step::Fail(Error::Unavailable(format!(
                "{} of {:?} gave up after {MAX_WRITE_ROUNDS} rounds: replicas kept reporting newer versions (heavy concurrent writing to this key)",
                self.operation, self.key
            )));
        }
        self.rounds += 1;
        // Too few replicas believed up to reach W: nothing is sent (the
        // write is refused, certainly not applied).
        let reachable = matches!(self.tally.decision(), WriteDecision::Pending);
        let to: Vec<usize> = (0..self.placed.targets.len())
            .filter(|&i| reachable && self.placed.targets[i].believed_down.is_none())
            .collect();
        self.sent_any |= !to.is_empty();
        Step::Send {
            version: self.version,
            to,
        }
    }

    /// The round ended: decided, or with every reply in. `unanswered`: some
    /// calls were still in flight (they may store the version).
    pub fn round_over(&mut self, unanswered: bool) -> Step {
        let decision = match self.tally.decision() {
            WriteDecision::Pending => WriteDecision::Failed,
            decided => decided,
        };
        if let Some((current, from)) = self.stale.clone()
            && !matches!(decision, WriteDecision::Acknowledged { .. })
            && current > self.placed.layout_version
        {
            self.decided = Some(decision);
            self.unanswered = unanswered;
            return Step::CatchUp {
                layout: current,
                from,
            };
        }
        self.decide(decision)
    }

    /// After [`Step::CatchUp`]: the placement under the newest layout now
    /// known, or `None` when it is not newer (the round's decision stands).
    pub fn placed_again(&mut self, placed: Option<Placed>) -> Step {
        let decision = self.decided.take().unwrap_or(WriteDecision::Failed);
        match placed {
            Some(placed) if placed.layout_version > self.placed.layout_version => {
                // The same version goes to the new replica sets.
                self.sent_before |= self.tally.may_be_stored() || self.unanswered;
                self.acks_before = self.acks_before.max(self.tally.acks());
                self.placed = placed;
                self.reset_round();
                self.begin_round()
            }
            _ => self.decide(decision),
        }
    }

    /// After [`Step::Restamp`]: the new version, above every one seen.
    pub fn restamped(&mut self, version: Version) -> Step {
        if let Some(seen) = self.newest_seen
            && version <= seen
        {
            // This node's clock refused to follow a version beyond its
            // skew bound: every new round would be refused the same way.
            // Nothing holds this write (a re-stamp needs that).
            return Step::Fail(Error::Unavailable(format!(
                "{} of {:?} cannot be ordered after version {seen}, which a replica holds: it is further ahead of this node's clock than --max-clock-skew-ms allows; check the nodes' clocks",
                self.operation, self.key
            )));
        }
        self.version = version;
        self.reset_round();
        self.begin_round()
    }

    /// After [`Step::StoreHints`] (a write at ANY that no replica holds).
    pub fn hints_stored(&mut self, stored: usize) -> Step {
        if stored > 0 {
            return Step::Acknowledged {
                ack: WriteAck {
                    version: self.version,
                    acks: 0,
                },
                hint: Vec::new(),
            };
        }
        Step::Fail(self.quorum_not_reached())
    }

    fn decide(&mut self, decision: WriteDecision) -> Step {
        // Re-stamping would put a value an earlier round may have left on
        // a replica under a second version.
        let decision = match decision {
            WriteDecision::Restamp { above } if self.sent_before => {
                WriteDecision::Superseded { above }
            }
            other => other,
        };
        match decision {
            WriteDecision::Acknowledged { acks } => Step::Acknowledged {
                ack: WriteAck {
                    version: self.version,
                    acks,
                },
                hint: self.failed.clone(),
            },
            WriteDecision::Superseded { above } => Step::Fail(Error::Superseded {
                operation: self.operation,
                key: self.key.clone(),
                version: self.version,
                above,
                acks: self.tally.acks().max(self.acks_before),
            }),
            WriteDecision::Restamp { above } => Step::Restamp {
                above,
                round: self.rounds - 1,
            },
            WriteDecision::Failed | WriteDecision::Pending => {
                if self.consistency == Consistency::Any && !self.failed.is_empty() {
                    // A hint store that fails may still have stored it:
                    // from here the write's outcome is unknown if it fails.
                    self.sent_any = true;
                    return Step::StoreHints {
                        targets: self.failed.clone(),
                    };
                }
                Step::Fail(self.quorum_not_reached())
            }
        }
    }

    fn quorum_not_reached(&self) -> Error {
        let needed = self
            .placed
            .sets
            .first()
            .map_or(0, |set| self.consistency.required(set.len()));
        Error::QuorumNotReached {
            operation: self.operation,
            consistency: self.consistency.name(),
            acks: self.tally.acks(),
            needed,
            replicas: self.placed.targets.len(),
            roll_call: Box::new(roll_call(&self.placed.targets, &self.standing)),
            failures: asked_failures(&self.placed.targets, self.tally.failures()),
            sent: self.sent_any,
        }
    }
}

impl Tally<Result<Version, ReplicaError>> for WriteRound {
    type Verdict = WriteDecision;

    /// What target `index` holds after the call, or why it failed.
    fn record(&mut self, index: usize, reply: Result<Version, ReplicaError>) {
        let Some(target) = self.placed.targets.get(index) else {
            return;
        };
        if let Some(standing) = self.standing.get_mut(index) {
            *standing = match &reply {
                Ok(held) if *held == self.version => Standing::Answered,
                _ => Standing::Failed,
            };
        }
        let reply = match reply {
            Ok(held) => {
                self.newest_seen = self.newest_seen.max(Some(held));
                WriteReply::Holds(held)
            }
            // A replica that refused the write as invalid gets no hint:
            // delivering it would fail the same way.
            Err(ReplicaError::Rejected(why)) => WriteReply::Failed(format!("rejected: {why}")),
            Err(ReplicaError::Failed(why)) => {
                self.failed.push(index);
                WriteReply::Failed(why)
            }
            // Refused unapplied: it certainly does not hold it.
            Err(ReplicaError::StaleLayout(current)) => {
                if self.stale.as_ref().is_none_or(|(v, _)| current > *v) {
                    self.stale = Some((current, target.address.clone()));
                }
                WriteReply::NotSent(format!("refused: it serves newer layout v{current}"))
            }
        };
        let address = target.address.clone();
        self.tally.record_at(index, &address, reply);
    }

    fn verdict(&self) -> Option<WriteDecision> {
        match self.tally.decision() {
            WriteDecision::Pending => None,
            decided => Some(decided),
        }
    }
}

/// Steps compare equal when they ask for the same thing (errors: the same
/// message), so tests can state the expected step.
#[cfg(test)]
impl PartialEq for Step {
    fn eq(&self, other: &Self) -> bool {
        format!("{self:?}") == format!("{other:?}")
    }
}

#[cfg(test)]
#[path = "write_round_tests.rs"]
mod tests;
