//! Adopting only what was chosen: pure.
//!
//! A layout that reaches a node from anyone but its own Paxos round (a
//! `LayoutCommit`, a fetch after a heartbeat said a peer is ahead, a
//! refusal carrying a committed layout) is only a claim: one message from a
//! process that is not a member, or from a node of another or older
//! cluster, must change nothing. So the node asks the *active members of
//! the version it holds* what they know about the claimed version, and
//! adopts the layout only when a majority of them vouch for exactly its
//! hash: each either adopted it (and every member adopts only what was
//! chosen, so by induction it was chosen), or accepted it under one ballot
//! that a majority accepted (Paxos's definition of chosen, for a value
//! whose proposer died before announcing it).
//!
//! A node several versions behind asks the same members about the newest
//! version: they keep the hash of every version they adopted
//! ([`AdoptedHashes`]), so it needs no intermediate layouts.

use super::paxos::Ballot;

/// How many adopted versions a node remembers the hash of.
pub const ADOPTED_HASHES_KEPT: usize = 1024;

/// What one member knows about one layout version.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Vouch {
    /// The hash of the layout it adopted at that version, if it did.
    pub adopted: Option<u64>,
    /// The layout its acceptor accepted for that version, if it has not
    /// adopted one yet: the ballot and the hash.
    pub accepted: Option<(Ballot, u64)>,
}

/// The hashes of the layouts a node adopted, by version, newest last.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AdoptedHashes(Vec<(u64, u64)>);

impl AdoptedHashes {
    pub fn from_pairs(mut pairs: Vec<(u64, u64)>) -> Self {
        pairs.sort_unstable();
        pairs.dedup_by_key(|(version, _)| *version);
        let mut hashes = Self(pairs);
        hashes.trim();
        hashes
    }

    pub fn pairs(&self) -> &[(u64, u64)] {
        &self.0
    }

    /// Records that `version` with `hash` was adopted.
    pub fn record(&mut self, version: u64, hash: u64) {
        match self.0.binary_search_by_key(&version, |(v, _)| *v) {
            Ok(at) => self.0[at].1 = hash,
            Err(at) => self.0.insert(at, (version, hash)),
        }
        self.trim();
    }

    /// The hash adopted at `version`, if remembered.
    pub fn at(&self, version: u64) -> Option<u64> {
        self.0
            .binary_search_by_key(&version, |(v, _)| *v)
            .ok()
            .map(|at| self.0[at].1)
    }

    fn trim(&mut self) {
        let excess = self.0.len().saturating_sub(ADOPTED_HASHES_KEPT);
        self.0.drain(..excess);
    }
}

/// What counts of a member's answer about a layout `ahead` versions past
/// the one the asking node holds: the held layout's active members voted
/// on the next version only, so for one further ahead an acceptance proves
/// nothing (those members were not that version's acceptors) and only an
/// adoption counts.
pub fn counted(vouch: Vouch, ahead: u64) -> Vouch {
    if ahead == 1 {
        vouch
    } else {
        Vouch {
            adopted: vouch.adopted,
            accepted: None,
        }
    }
}

/// Whether `answers` (one per asked member, `None` for one that did not
/// answer) from `asked` active members show `hash` chosen: more than half
/// of `asked` adopted it, or adopted it or accepted it under one ballot.
pub fn is_chosen(hash: u64, asked: usize, answers: &[Option<Vouch>]) -> bool {
    confirmations(hash, answers) > asked / 2
}

/// Whether the offered layout is chosen although voters of the layout
/// held have left or been removed since (`departed` of them, as the
/// offered layout says): those can no longer vouch, and a node that was
/// down meanwhile (or that restarted from an empty data dir and holds only
/// the first layout) would otherwise never catch up. Only adoptions count
/// (members adopt only what was chosen): at least one voter of the layout
/// held adopted it (`held_adopted`), and of the offered layout's own
/// voters (`successors`) more than half, and at least two, adopted it
/// (`successors_adopted`). One member alone, even one claiming the others
/// left, never suffices.
pub fn is_chosen_by_successors(
    departed: usize,
    held_adopted: usize,
    successors: usize,
    successors_adopted: usize,
) -> bool {
    departed > 0
        && held_adopted >= 1
        && successors_adopted >= 2
        && successors_adopted * 2 > successors
}

/// How many answers vouch for `hash`: those that adopted it, plus the
/// largest group that accepted it under one ballot.
pub fn confirmations(hash: u64, answers: &[Option<Vouch>]) -> usize {
    let adopted = answers
        .iter()
        .flatten()
        .filter(|v| v.adopted == Some(hash))
        .count();
    let mut ballots: Vec<Ballot> = answers
        .iter()
        .flatten()
        .filter(|v| v.adopted.is_none())
        .filter_map(|v| v.accepted.filter(|(_, h)| *h == hash).map(|(b, _)| b))
        .collect();
    ballots.sort();
    let mut best = 0;
    let mut run = 0;
    for (i, ballot) in ballots.iter().enumerate() {
        run = if i > 0 && ballots[i - 1] == *ballot {
            run + 1
        } else {
            1
        };
        best = best.max(run);
    }
    adopted + best
}

/// Whether `answers` can no longer show `hash` chosen with `pending`
/// members still to answer.
pub fn cannot_be_chosen(
    hash: u64,
    asked: usize,
    answers: &[Option<Vouch>],
    pending: usize,
) -> bool {
    confirmations(hash, answers) + pending <= asked / 2
}

/// A member that adopted a *different* layout at the version: a fork, or
/// a forged claim. The hash it holds, if any answer shows one.
pub fn contradiction(hash: u64, answers: &[Option<Vouch>]) -> Option<u64> {
    answers
        .iter()
        .flatten()
        .filter_map(|v| v.adopted)
        .find(|adopted| *adopted != hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ballot(round: u64) -> Ballot {
        Ballot { round, proposer: 1 }
    }
    fn adopted(hash: u64) -> Option<Vouch> {
        Some(Vouch {
            adopted: Some(hash),
            accepted: None,
        })
    }
    fn accepted(round: u64, hash: u64) -> Option<Vouch> {
        Some(Vouch {
            adopted: None,
            accepted: Some((ballot(round), hash)),
        })
    }
    const NOTHING: Option<Vouch> = Some(Vouch {
        adopted: None,
        accepted: None,
    });

    #[test]
    fn a_majority_that_adopted_the_hash_shows_it_chosen() {
        assert!(is_chosen(7, 3, &[adopted(7), adopted(7), None]));
        assert!(!is_chosen(7, 3, &[adopted(7), None, None]));
        assert!(!is_chosen(7, 3, &[adopted(7), adopted(8), NOTHING]));
        assert!(is_chosen(7, 1, &[adopted(7)]));
        assert!(!is_chosen(7, 4, &[adopted(7), adopted(7), None, None]));
    }

    #[test]
    fn a_node_behind_a_departure_catches_up_but_one_member_never_suffices() {
        // Four voters held, one left since; the offered layout's three
        // voters: two adopted it (the asking node did not).
        assert!(is_chosen_by_successors(1, 2, 3, 2));
        assert!(
            !is_chosen_by_successors(0, 2, 3, 2),
            "nobody left: the majority rule"
        );
        // One member alone, whatever it claims.
        assert!(!is_chosen_by_successors(3, 1, 1, 1));
        assert!(!is_chosen_by_successors(3, 1, 2, 1));
        // No voter of the layout held vouches: a stranger's layout.
        assert!(!is_chosen_by_successors(1, 0, 3, 3));
        // Two of five successors: not a majority.
        assert!(!is_chosen_by_successors(1, 1, 5, 2));
    }

    #[test]
    fn acceptances_count_only_under_one_ballot() {
        assert!(is_chosen(7, 3, &[accepted(2, 7), accepted(2, 7), None]));
        assert!(!is_chosen(7, 3, &[accepted(2, 7), accepted(3, 7), None]));
        assert!(is_chosen(7, 3, &[adopted(7), accepted(3, 7), None]));
        assert!(!is_chosen(
            7,
            3,
            &[accepted(2, 8), accepted(2, 8), adopted(7)]
        ));
    }

    #[test]
    fn further_ahead_only_adoptions_count() {
        let answers: Vec<Option<Vouch>> = [accepted(2, 7), accepted(2, 7), adopted(7)]
            .into_iter()
            .map(|v| v.map(|v| counted(v, 3)))
            .collect();
        assert_eq!(confirmations(7, &answers), 1);
        assert!(!is_chosen(7, 3, &answers));
        let next: Vec<Option<Vouch>> = [accepted(2, 7), accepted(2, 7)]
            .into_iter()
            .map(|v| v.map(|v| counted(v, 1)))
            .collect();
        assert!(is_chosen(7, 3, &next));
    }

    #[test]
    fn nobody_vouches_for_a_forged_layout() {
        // What members of a healthy cluster answer about a version that
        // was never chosen: nothing, or another hash.
        let answers = [NOTHING, NOTHING, adopted(5)];
        assert!(!is_chosen(9, 3, &answers));
        assert!(cannot_be_chosen(9, 3, &answers, 0));
        assert_eq!(contradiction(9, &answers), Some(5));
        assert!(!cannot_be_chosen(9, 3, &[adopted(9)], 2));
        assert!(cannot_be_chosen(9, 3, &[NOTHING, NOTHING], 1));
    }

    #[test]
    fn adopted_hashes_are_kept_in_order_and_bounded() {
        let mut hashes = AdoptedHashes::default();
        hashes.record(2, 20);
        hashes.record(1, 10);
        hashes.record(2, 21);
        assert_eq!(hashes.pairs(), &[(1, 10), (2, 21)]);
        assert_eq!(hashes.at(2), Some(21));
        assert_eq!(hashes.at(3), None);
        for version in 3..(ADOPTED_HASHES_KEPT as u64 + 10) {
            hashes.record(version, version * 10);
        }
        assert_eq!(hashes.pairs().len(), ADOPTED_HASHES_KEPT);
        assert_eq!(hashes.at(1), None);
        let reloaded = AdoptedHashes::from_pairs(hashes.pairs().iter().rev().copied().collect());
        assert_eq!(reloaded, hashes);
    }
}
