//! Single-decree Paxos, generic over the value decided: ballots, the rule
//! for choosing the value to propose, and the proposer as a state machine.
//!
//! The proposer is pure, in the style of a Raft node driven by `step`: the
//! shell sends a phase's requests (through [`crate::fanout`]), feeds each
//! acceptor's reply in, and reads what to do next — send the accept with
//! this value, the value is chosen, or this ballot lost and why. Layout
//! changes use it with [`crate::layout::Layout`] values (the acceptor's
//! rules for layouts are in `layout::paxos`); any other single-decree
//! decision — a compare-and-set on one key — can use it unchanged.
//!
//! The rules:
//!
//! * **Prepare.** A majority of acceptors must promise the ballot. Among
//!   the values they report accepted, the one under the highest ballot must
//!   be proposed; only when none was accepted is the proposer's own value
//!   free to propose ([`choose`]). A promise whose accepted value could not
//!   be read is not a promise: counting it while ignoring its value could
//!   choose a second value.
//! * **Accept.** The value is chosen once a majority accepted it under this
//!   ballot. A refusal reports the ballot promised instead, so the next
//!   attempt goes above it.
//! * A phase is lost as soon as a majority is out of reach; stragglers may
//!   still promise or accept, which is harmless.

use crate::fanout::Tally;

/// A proposal number: ordered by round, then by proposer id.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ballot {
    pub round: u64,
    pub proposer: u64,
}

/// Members that make a majority of `members`.
pub fn majority(members: usize) -> usize {
    members / 2 + 1
}

/// The value a proposer must propose after a majority promised: the one
/// accepted under the highest ballot, or its own when none was.
pub fn choose<V>(promised: impl IntoIterator<Item = Option<(Ballot, V)>>, own: V) -> V {
    promised
        .into_iter()
        .flatten()
        .max_by_key(|(ballot, _)| *ballot)
        .map(|(_, value)| value)
        .unwrap_or(own)
}

/// An acceptor's reply to a prepare.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Promise<V> {
    /// Promised, with what it accepted before (if anything).
    Yes { accepted: Option<(Ballot, V)> },
    /// Refused: it promised a higher ballot (`promised`), or it is past or
    /// behind this decision and answers the value it holds as committed
    /// (`committed`: the shell learns it, or teaches the acceptor).
    No {
        promised: Option<Ballot>,
        committed: Option<V>,
    },
    /// No usable answer; the text says why.
    Failed(String),
}

/// An acceptor's reply to an accept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Accepted<V> {
    Yes,
    /// Refused, as [`Promise::No`].
    No {
        promised: Option<Ballot>,
        committed: Option<V>,
    },
    Failed(String),
}

/// What a proposer does after a phase.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict<V> {
    /// A majority promised: send the accept with this value.
    Accept(V),
    /// A majority accepted: this value is chosen.
    Chosen(V),
    /// This ballot cannot win; the text says why (for the error).
    Lost(String),
}

/// The phase a proposer is in.
#[derive(Clone, Debug)]
enum Phase<V> {
    Preparing,
    Accepting(V),
}

/// One ballot of one proposer, fed acceptors' replies.
#[derive(Clone, Debug)]
pub struct Proposer<V> {
    ballot: Ballot,
    /// The value proposed when no acceptor accepted one.
    own: V,
    /// Acceptors asked, and the replies needed.
    acceptors: Vec<String>,
    needed: usize,
    phase: Phase<V>,
    /// This phase: who answered yes, who answered at all.
    yes: Vec<bool>,
    answered: Vec<bool>,
    /// Values reported accepted in the promises.
    accepted: Vec<(Ballot, V)>,
    /// The highest ballot a refusal reported (propose above it next time).
    highest_refused: Option<Ballot>,
    /// Committed values refusing acceptors answered with, by acceptor index.
    learned: Vec<(usize, V)>,
    /// Why acceptors did not say yes, one line each.
    failures: Vec<String>,
}

impl<V: Clone> Proposer<V> {
    /// A proposal of `own` under `ballot` to `acceptors` (their names, for
    /// messages). Send the prepare to each, then feed the promises in.
    pub fn new(ballot: Ballot, own: V, acceptors: Vec<String>) -> Self {
        let count = acceptors.len();
        Self {
            ballot,
            own,
            needed: majority(count),
            acceptors,
            phase: Phase::Preparing,
            yes: vec![false; count],
            answered: vec![false; count],
            accepted: Vec::new(),
            highest_refused: None,
            learned: Vec::new(),
            failures: Vec::new(),
        }
    }

    pub fn ballot(&self) -> Ballot {
        self.ballot
    }

    /// The highest ballot a refusal reported so far.
    pub fn highest_refused(&self) -> Option<Ballot> {
        self.highest_refused
    }

    /// Committed values refusing acceptors answered with (by acceptor
    /// index), taken out: the shell learns them (or tells an acceptor that
    /// is behind).
    pub fn take_learned(&mut self) -> Vec<(usize, V)> {
        std::mem::take(&mut self.learned)
    }

    /// After the prepare's verdict was [`Verdict::Accept`]: the accept
    /// phase begins; send the accept with `value` to every acceptor.
    pub fn begin_accept(&mut self, value: V) {
        self.phase = Phase::Accepting(value);
        self.yes.fill(false);
        self.answered.fill(false);
        self.failures.clear();
    }

    fn answer(&mut self, index: usize, yes: bool) -> bool {
        match self.answered.get_mut(index) {
            Some(answered) if !*answered => *answered = true,
            // Out of range, or a second answer: ignored.
            _ => return false,
        }
        self.yes[index] = yes;
        true
    }

    fn refused(&mut self, index: usize, promised: Option<Ballot>, committed: Option<V>) {
        self.highest_refused = self.highest_refused.max(promised);
        if let Some(value) = committed {
            self.learned.push((index, value));
        }
        let name = &self.acceptors[index];
        let what = match self.phase {
            Phase::Preparing => "did not promise",
            Phase::Accepting(_) => "did not accept",
        };
        self.failures.push(format!("{name}: {what}"));
    }

    fn phase_verdict(&self, won: impl FnOnce() -> Verdict<V>) -> Option<Verdict<V>> {
        let yes = self.yes.iter().filter(|y| **y).count();
        let pending = self.answered.iter().filter(|a| !**a).count();
        if yes >= self.needed {
            return Some(won());
        }
        if yes + pending >= self.needed {
            return None;
        }
        let what = match self.phase {
            Phase::Preparing => "promised",
            Phase::Accepting(_) => "accepted",
        };
        Some(Verdict::Lost(format!(
            "{yes} of {} members {what}, {} needed ({})",
            self.acceptors.len(),
            self.needed,
            self.failures.join("; ")
        )))
    }
}

impl<V: Clone> Tally<Promise<V>> for Proposer<V> {
    type Verdict = Verdict<V>;

    fn record(&mut self, index: usize, reply: Promise<V>) {
        if !matches!(self.phase, Phase::Preparing) {
            return;
        }
        let yes = matches!(reply, Promise::Yes { .. });
        if !self.answer(index, yes) {
            return;
        }
        match reply {
            Promise::Yes { accepted } => self.accepted.extend(accepted),
            Promise::No {
                promised,
                committed,
            } => self.refused(index, promised, committed),
            Promise::Failed(why) => self.failures.push(why),
        }
    }

    fn verdict(&self) -> Option<Verdict<V>> {
        if !matches!(self.phase, Phase::Preparing) {
            return None;
        }
        self.phase_verdict(|| {
            Verdict::Accept(choose(
                self.accepted.iter().cloned().map(Some),
                self.own.clone(),
            ))
        })
    }
}

impl<V: Clone> Tally<Accepted<V>> for Proposer<V> {
    type Verdict = Verdict<V>;

    fn record(&mut self, index: usize, reply: Accepted<V>) {
        if !matches!(self.phase, Phase::Accepting(_)) {
            return;
        }
        let yes = matches!(reply, Accepted::Yes);
        if !self.answer(index, yes) {
            return;
        }
        match reply {
            Accepted::Yes => {}
            Accepted::No {
                promised,
                committed,
            } => self.refused(index, promised, committed),
            Accepted::Failed(why) => self.failures.push(why),
        }
    }

    fn verdict(&self) -> Option<Verdict<V>> {
        let Phase::Accepting(value) = &self.phase else {
            return None;
        };
        self.phase_verdict(|| Verdict::Chosen(value.clone()))
    }
}

#[cfg(test)]
#[path = "paxos_tests.rs"]
mod tests;
