//! The proposer as a specification: promises and acceptances in, what to
//! do next out.

use super::*;

fn ballot(round: u64, proposer: u64) -> Ballot {
    Ballot { round, proposer }
}

fn three(own: &'static str) -> Proposer<&'static str> {
    Proposer::new(ballot(5, 1), own, vec!["a".into(), "b".into(), "c".into()])
}

fn yes() -> Promise<&'static str> {
    Promise::Yes { accepted: None }
}

fn refused(round: u64) -> Promise<&'static str> {
    Promise::No {
        promised: Some(ballot(round, 9)),
        committed: None,
    }
}

#[test]
fn with_nothing_accepted_before_the_proposer_proposes_its_own_value() {
    let mut p = three("mine");
    p.record(0, yes());
    assert_eq!(Tally::<Promise<_>>::verdict(&p), None);
    p.record(2, yes());
    assert_eq!(
        Tally::<Promise<_>>::verdict(&p),
        Some(Verdict::Accept("mine"))
    );
}

#[test]
fn a_value_accepted_before_must_be_proposed_the_highest_ballot_first() {
    let mut p = three("mine");
    p.record(
        0,
        Promise::Yes {
            accepted: Some((ballot(2, 7), "older")),
        },
    );
    p.record(
        1,
        Promise::Yes {
            accepted: Some((ballot(3, 4), "newer")),
        },
    );
    assert_eq!(
        Tally::<Promise<_>>::verdict(&p),
        Some(Verdict::Accept("newer"))
    );
}

#[test]
fn a_promise_whose_value_cannot_be_read_is_not_a_promise() {
    let mut p = three("mine");
    p.record(0, yes());
    p.record(1, Promise::Failed("b: bad accepted layout".into()));
    assert_eq!(
        Tally::<Promise<_>>::verdict(&p),
        None,
        "c may still promise"
    );
    p.record(2, refused(6));
    let Some(Verdict::Lost(why)) = Tally::<Promise<_>>::verdict(&p) else {
        panic!("lost");
    };
    assert_eq!(
        why,
        "1 of 3 members promised, 2 needed (b: bad accepted layout; c: did not promise)"
    );
    assert_eq!(p.highest_refused(), Some(ballot(6, 9)));
}

#[test]
fn an_acceptor_that_already_decided_teaches_the_proposer() {
    let mut p = three("mine");
    p.record(
        1,
        Promise::No {
            promised: None,
            committed: Some("theirs"),
        },
    );
    assert_eq!(p.take_learned(), vec![(1, "theirs")]);
    assert!(p.take_learned().is_empty());
}

#[test]
fn the_value_is_chosen_once_a_majority_accepted_it_under_this_ballot() {
    let mut p = three("mine");
    p.record(0, yes());
    p.record(1, yes());
    let Some(Verdict::Accept(value)) = Tally::<Promise<_>>::verdict(&p) else {
        panic!("accept");
    };
    p.begin_accept(value);
    // A late promise is not an acceptance.
    p.record(2, yes());
    assert_eq!(Tally::<Accepted<_>>::verdict(&p), None);
    p.record(0, Accepted::Yes);
    p.record(
        1,
        Accepted::No {
            promised: Some(ballot(8, 2)),
            committed: None,
        },
    );
    assert_eq!(Tally::<Accepted<_>>::verdict(&p), None);
    // An acceptor answering twice counts once.
    p.record(0, Accepted::Yes);
    assert_eq!(Tally::<Accepted<_>>::verdict(&p), None);
    p.record(2, Accepted::Yes);
    assert_eq!(
        Tally::<Accepted<_>>::verdict(&p),
        Some(Verdict::Chosen("mine"))
    );
}

#[test]
fn an_accept_phase_is_lost_as_soon_as_a_majority_is_out_of_reach() {
    let mut p = three("mine");
    for i in 0..3 {
        p.record(i, yes());
    }
    p.begin_accept("mine");
    p.record(0, Accepted::Failed("a: no answer within 1000 ms".into()));
    p.record(
        2,
        Accepted::No {
            promised: Some(ballot(9, 3)),
            committed: None,
        },
    );
    let Some(Verdict::Lost(why)) = Tally::<Accepted<_>>::verdict(&p) else {
        panic!("lost");
    };
    assert!(
        why.starts_with("0 of 3 members accepted, 2 needed"),
        "{why}"
    );
    assert_eq!(p.highest_refused(), Some(ballot(9, 3)));
}

/// Two proposers over three acceptors (the acceptor rule written out: a
/// promise and an accept need a ballot at least the one promised), in every
/// interleaving of their six messages each: never two values chosen.
#[test]
fn two_racing_proposers_never_choose_two_values() {
    #[derive(Clone, Default)]
    struct Acceptor {
        promised: Ballot,
        accepted: Option<(Ballot, &'static str)>,
    }
    let mut interleavings = 0;
    for mask in 0u32..(1 << 12) {
        if mask.count_ones() != 6 {
            continue;
        }
        interleavings += 1;
        let mut acceptors = vec![Acceptor::default(); 3];
        let names = || vec!["a".to_string(), "b".to_string(), "c".to_string()];
        let mut proposers = [
            Proposer::new(ballot(1, 10), "p0", names()),
            Proposer::new(ballot(1, 20), "p1", names()),
        ];
        let mut step = [0usize; 2];
        let mut value: [Option<&str>; 2] = [None, None];
        let mut chosen: [Option<&str>; 2] = [None, None];
        for bit in 0..12 {
            let p = ((mask >> bit) & 1) as usize;
            let s = step[p];
            step[p] += 1;
            let a = s % 3;
            let b = proposers[p].ballot();
            let acceptor = &mut acceptors[a];
            if s < 3 {
                let reply = if b >= acceptor.promised {
                    acceptor.promised = b;
                    Promise::Yes {
                        accepted: acceptor.accepted,
                    }
                } else {
                    Promise::No {
                        promised: Some(acceptor.promised),
                        committed: None,
                    }
                };
                proposers[p].record(a, reply);
                if s == 2 {
                    if let Some(Verdict::Accept(v)) = Tally::<Promise<_>>::verdict(&proposers[p]) {
                        value[p] = Some(v);
                        proposers[p].begin_accept(v);
                    }
                }
            } else if let Some(v) = value[p] {
                let reply = if b >= acceptor.promised {
                    acceptor.promised = b;
                    acceptor.accepted = Some((b, v));
                    Accepted::Yes
                } else {
                    Accepted::No {
                        promised: Some(acceptor.promised),
                        committed: None,
                    }
                };
                proposers[p].record(a, reply);
                if let Some(Verdict::Chosen(v)) = Tally::<Accepted<_>>::verdict(&proposers[p]) {
                    chosen[p] = Some(v);
                }
            }
        }
        if let [Some(x), Some(y)] = chosen {
            assert_eq!(x, y, "two values chosen (interleaving {mask:012b})");
        }
    }
    assert_eq!(interleavings, 924);
}
