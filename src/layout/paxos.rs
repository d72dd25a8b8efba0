//! Single-decree Paxos per layout version: the acceptor's rules, pure (the
//! proposer, generic over the value, is [`crate::paxos::Proposer`]).
//!
//! Each member keeps one [`Acceptor`] for the version after the one it
//! serves. A proposer picks a ballot above any it has seen, asks a majority
//! of the current members to promise it (`prepare`), proposes the value
//! accepted under the highest ballot among the promises — its own change
//! only when none was accepted ([`choose`]) — and the value commits once a
//! majority accepted it under that ballot. Two changes proposed at once to
//! different members: exactly one commits; the other proposer learns the
//! winner from the promises or from the committed layout it is answered
//! with. The node persists the acceptor before it answers.

use super::Layout;
pub use crate::paxos::{Ballot, choose, majority};

/// What one member promised and accepted for one layout version.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Acceptor {
    /// The version these apply to.
    pub version: u64,
    /// No ballot below this one is accepted.
    pub promised: Ballot,
    /// The value accepted last, and under which ballot.
    pub accepted: Option<(Ballot, Layout)>,
}

/// An acceptor's answer to a prepare or an accept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Prepare: promised, with what was accepted before (if anything).
    /// Accept: accepted (`accepted` is then the value itself).
    Yes { accepted: Option<(Ballot, Layout)> },
    /// A higher ballot was promised.
    No { promised: Ballot },
    /// The version is already committed here: the caller is behind.
    Committed,
    /// This member does not serve the version before yet: send it the
    /// committed layout first.
    Behind,
}

impl Acceptor {
    fn enter(&mut self, committed: u64, version: u64) -> Option<Answer> {
        if version <= committed {
            return Some(Answer::Committed);
        }
        if version > committed + 1 {
            return Some(Answer::Behind);
        }
        if version != self.version {
            *self = Acceptor {
                version,
                ..Acceptor::default()
            };
        }
        None
    }

    /// Phase 1: promise `ballot` for `version`, this member serving
    /// `committed`. Changes `self` only when it answers yes (persist it).
    pub fn prepare(&mut self, committed: u64, version: u64, ballot: Ballot) -> Answer {
        if let Some(answer) = self.enter(committed, version) {
            return answer;
        }
        if ballot >= self.promised {
            self.promised = ballot;
            Answer::Yes {
                accepted: self.accepted.clone(),
            }
        } else {
            Answer::No {
                promised: self.promised,
            }
        }
    }

    /// Phase 2: accept `layout` (its version is the one decided) under
    /// `ballot` unless a higher ballot was promised.
    pub fn accept(&mut self, committed: u64, layout: &Layout, ballot: Ballot) -> Answer {
        if let Some(answer) = self.enter(committed, layout.version) {
            return answer;
        }
        if ballot >= self.promised {
            self.promised = ballot;
            self.accepted = Some((ballot, layout.clone()));
            Answer::Yes {
                accepted: self.accepted.clone(),
            }
        } else {
            Answer::No {
                promised: self.promised,
            }
        }
    }
}

/// What a node keeps about layouts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LayoutState {
    /// The layout it serves.
    pub committed: Option<Layout>,
    /// Its acceptor for the next version.
    pub acceptor: Acceptor,
    /// The hash of each version it adopted (what it vouches for).
    pub adopted: super::verify::AdoptedHashes,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(version: u64, change: &str) -> Layout {
        let mut l = Layout::bootstrap(&["a:1".into(), "b:1".into(), "c:1".into()], 3, 4);
        l.version = version;
        l.change = change.into();
        l
    }

    fn ballot(round: u64, proposer: u64) -> Ballot {
        Ballot { round, proposer }
    }

    #[test]
    fn a_promise_refuses_lower_ballots_and_reports_what_was_accepted() {
        let mut acceptor = Acceptor::default();
        assert_eq!(
            acceptor.prepare(1, 2, ballot(1, 7)),
            Answer::Yes { accepted: None }
        );
        assert_eq!(
            acceptor.prepare(1, 2, ballot(1, 3)),
            Answer::No {
                promised: ballot(1, 7)
            }
        );
        let value = layout(2, "x joins");
        assert!(matches!(
            acceptor.accept(1, &value, ballot(1, 7)),
            Answer::Yes { .. }
        ));
        // A later proposer learns the accepted value and must propose it.
        let Answer::Yes { accepted } = acceptor.prepare(1, 2, ballot(2, 3)) else {
            panic!("a higher ballot is promised");
        };
        assert_eq!(accepted, Some((ballot(1, 7), value.clone())));
        // The old proposer's accept under its old ballot is now refused.
        assert_eq!(
            acceptor.accept(1, &layout(2, "y joins"), ballot(1, 7)),
            Answer::No {
                promised: ballot(2, 3)
            }
        );
        assert_eq!(choose([accepted, None], layout(2, "y joins")), value);
    }

    #[test]
    fn committed_and_future_versions_are_answered_as_such() {
        let mut acceptor = Acceptor::default();
        assert_eq!(acceptor.prepare(3, 3, ballot(9, 1)), Answer::Committed);
        assert_eq!(acceptor.prepare(3, 5, ballot(9, 1)), Answer::Behind);
        assert_eq!(
            acceptor,
            Acceptor::default(),
            "no answer but yes changes it"
        );
        // A new version starts from nothing.
        assert!(matches!(
            acceptor.prepare(3, 4, ballot(9, 1)),
            Answer::Yes { .. }
        ));
        assert!(matches!(
            acceptor.prepare(4, 5, ballot(1, 1)),
            Answer::Yes { accepted: None }
        ));
    }

    /// Two proposers race over three acceptors in every interleaving of
    /// their phases: at most one value is ever chosen by a majority.
    #[test]
    fn two_racing_proposers_never_choose_two_values() {
        // Each proposer: prepare to all, then accept to all, as 6 steps
        // (one acceptor per step); interleave the 12 steps every way that
        // keeps each proposer's own order (924 ways).
        let steps: Vec<(usize, usize)> = (0..2).flat_map(|p| (0..6).map(move |s| (p, s))).collect();
        let mut count = 0;
        for mask in 0u32..(1 << 12) {
            if mask.count_ones() != 6 {
                continue;
            }
            count += 1;
            let mut acceptors = vec![Acceptor::default(); 3];
            let mut next = [0usize; 2];
            let mut promises: [Vec<Option<(Ballot, Layout)>>; 2] = [Vec::new(), Vec::new()];
            let mut values: [Option<Layout>; 2] = [None, None];
            let mut accepted_by: [usize; 2] = [0, 0];
            let own = [layout(2, "p0"), layout(2, "p1")];
            let ballots = [ballot(1, 10), ballot(1, 20)];
            for bit in 0..12 {
                let p = ((mask >> bit) & 1) as usize;
                let step = next[p];
                next[p] += 1;
                let a = step % 3;
                if step < 3 {
                    if let Answer::Yes { accepted } = acceptors[a].prepare(1, 2, ballots[p]) {
                        promises[p].push(accepted);
                    }
                } else {
                    if promises[p].len() < majority(3) {
                        continue;
                    }
                    let value = values[p]
                        .get_or_insert_with(|| choose(promises[p].clone(), own[p].clone()))
                        .clone();
                    if matches!(
                        acceptors[a].accept(1, &value, ballots[p]),
                        Answer::Yes { .. }
                    ) {
                        accepted_by[p] += 1;
                    }
                }
            }
            let chosen: Vec<&Layout> = (0..2)
                .filter(|&p| accepted_by[p] >= majority(3))
                .filter_map(|p| values[p].as_ref())
                .collect();
            if chosen.len() == 2 {
                assert_eq!(
                    chosen[0], chosen[1],
                    "two values chosen (interleaving {mask:012b})"
                );
            }
        }
        assert_eq!(count, 924);
        let _ = steps;
    }
}
