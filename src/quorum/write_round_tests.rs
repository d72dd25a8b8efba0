//! The write protocol as a specification: each test feeds replies to a
//! [`WriteRound`] and checks the steps it asks for.

use super::*;

const V1: Version = Version::new(1, 1);
const V2: Version = Version::new(2, 1);
const V3: Version = Version::new(3, 2);
const V4: Version = Version::new(4, 1);

fn target(address: &str) -> Target {
    Target {
        address: address.to_string(),
        believed_down: None,
    }
}

fn down(address: &str) -> Target {
    Target {
        address: address.to_string(),
        believed_down: Some("believed down".into()),
    }
}

/// Three replicas a, b, c in one set, under layout `layout_version`.
fn three(layout_version: u64) -> Placed {
    Placed {
        targets: vec![target("a"), target("b"), target("c")],
        sets: vec![vec![0, 1, 2]],
        layout_version,
    }
}

fn put(consistency: Consistency, placed: Placed) -> (WriteRound, Step) {
    let mut write = WriteRound::new("PUT", "k", consistency, V2, placed);
    let first = write.start();
    (write, first)
}

fn holds(version: Version) -> Result<Version, ReplicaError> {
    Ok(version)
}

fn failed() -> Result<Version, ReplicaError> {
    Err(ReplicaError::Failed("connection refused".into()))
}

fn stale(layout: u64) -> Result<Version, ReplicaError> {
    Err(ReplicaError::StaleLayout(layout))
}

#[test]
fn a_round_goes_to_every_replica_believed_up_and_answers_at_w() {
    let (mut write, first) = put(Consistency::Quorum, three(1));
    assert_eq!(
        first,
        Step::Send {
            version: V2,
            to: vec![0, 1, 2]
        }
    );
    write.record(0, holds(V2));
    assert_eq!(write.verdict(), None);
    write.record(2, holds(V2));
    assert!(write.verdict().is_some());
    assert_eq!(
        write.round_over(true),
        Step::Acknowledged {
            ack: WriteAck {
                version: V2,
                acks: 2
            },
            hint: vec![]
        }
    );
}

#[test]
fn replicas_believed_down_are_not_sent_to_and_are_hinted_once_acknowledged() {
    let placed = Placed {
        targets: vec![target("a"), down("b"), target("c")],
        ..three(1)
    };
    let (mut write, first) = put(Consistency::Quorum, placed);
    assert_eq!(
        first,
        Step::Send {
            version: V2,
            to: vec![0, 2]
        }
    );
    write.record(0, holds(V2));
    write.record(2, failed());
    assert_eq!(write.verdict(), Some(WriteDecision::Failed));
    let Step::Fail(Error::QuorumNotReached {
        acks,
        needed,
        roll_call,
        failures,
        ..
    }) = write.round_over(false)
    else {
        panic!("a quorum failure");
    };
    assert_eq!((acks, needed), (1, 2));
    assert_eq!(roll_call.answered, vec!["a".to_string()]);
    assert_eq!(roll_call.not_asked, vec!["b".to_string()]);
    assert_eq!(failures, vec!["c: connection refused".to_string()]);
    assert!(write.sent_any());
}

#[test]
fn with_every_replica_believed_down_nothing_is_sent() {
    let placed = Placed {
        targets: vec![down("a"), down("b"), down("c")],
        ..three(1)
    };
    let (mut write, first) = put(Consistency::Quorum, placed);
    assert_eq!(
        first,
        Step::Send {
            version: V2,
            to: vec![]
        }
    );
    assert!(matches!(
        write.round_over(false),
        Step::Fail(Error::QuorumNotReached { .. })
    ));
    assert!(!write.sent_any(), "refused before anything was sent");
}

#[test]
fn newer_versions_everywhere_mean_a_restamp_above_the_newest() {
    let (mut write, _) = put(Consistency::Quorum, three(1));
    write.record(0, holds(V3));
    write.record(1, holds(V1.max(V3)));
    // c may still store V2: no decision until it answers.
    assert_eq!(write.verdict(), None);
    write.record(2, holds(V4));
    assert_eq!(write.newest_seen(), Some(V4));
    assert_eq!(
        write.round_over(false),
        Step::Restamp {
            above: V4,
            round: 0
        }
    );
    let v5 = Version::new(5, 1);
    assert_eq!(
        write.restamped(v5),
        Step::Send {
            version: v5,
            to: vec![0, 1, 2]
        }
    );
    for i in 0..3 {
        write.record(i, holds(v5));
    }
    assert!(matches!(
        write.round_over(false),
        Step::Acknowledged { ack, .. } if ack.version == v5 && ack.acks == 3
    ));
}

#[test]
fn a_round_that_may_be_stored_somewhere_is_superseded_not_restamped() {
    let (mut write, _) = put(Consistency::Quorum, three(1));
    write.record(0, holds(V2));
    write.record(1, holds(V3));
    write.record(2, holds(V3));
    let Step::Fail(Error::Superseded {
        version,
        above,
        acks,
        ..
    }) = write.round_over(false)
    else {
        panic!("superseded");
    };
    assert_eq!((version, above, acks), (V2, V3, 1));
}

#[test]
fn a_stale_layout_refusal_places_the_same_version_again() {
    let (mut write, _) = put(Consistency::Quorum, three(1));
    write.record(0, stale(2));
    write.record(1, stale(2));
    assert_eq!(write.verdict(), Some(WriteDecision::Failed));
    assert_eq!(
        write.round_over(true),
        Step::CatchUp {
            layout: 2,
            from: "a".into()
        }
    );
    // Under v2 the key lives on b, c, d.
    let placed = Placed {
        targets: vec![target("b"), target("c"), target("d")],
        sets: vec![vec![0, 1, 2]],
        layout_version: 2,
    };
    assert_eq!(
        write.placed_again(Some(placed)),
        Step::Send {
            version: V2,
            to: vec![0, 1, 2]
        }
    );
    // A newer version there cannot be re-stamped: c's call was still in
    // flight in the first round and may have stored V2.
    write.record(0, holds(V3));
    write.record(1, holds(V3));
    write.record(2, holds(V3));
    assert!(matches!(
        write.round_over(false),
        Step::Fail(Error::Superseded { .. })
    ));
}

#[test]
fn a_stale_refusal_with_no_newer_layout_to_learn_keeps_the_round_decision() {
    let (mut write, _) = put(Consistency::Quorum, three(1));
    write.record(0, stale(2));
    write.record(1, failed());
    write.record(2, holds(V2));
    assert!(matches!(write.round_over(false), Step::CatchUp { .. }));
    assert!(matches!(
        write.placed_again(None),
        Step::Fail(Error::QuorumNotReached { acks: 1, .. })
    ));
}

#[test]
fn while_data_moves_every_replica_set_needs_its_own_w() {
    // Old set {a, b, c}, new set {a, b, d}.
    let placed = Placed {
        targets: vec![target("a"), target("b"), target("c"), target("d")],
        sets: vec![vec![0, 1, 2], vec![0, 1, 3]],
        layout_version: 3,
    };
    let (mut write, _) = put(Consistency::Quorum, placed);
    write.record(2, holds(V2));
    write.record(3, holds(V2));
    // Two of four hold it, but each set has only one of them.
    assert_eq!(write.verdict(), None);
    write.record(0, holds(V2));
    assert!(matches!(
        write.verdict(),
        Some(WriteDecision::Acknowledged { acks: 3 })
    ));
}

#[test]
fn at_any_a_stored_hint_is_enough_when_no_replica_holds_the_write() {
    let (mut write, _) = put(Consistency::Any, three(1));
    write.record(0, failed());
    write.record(1, failed());
    write.record(2, failed());
    assert_eq!(
        write.round_over(false),
        Step::StoreHints {
            targets: vec![0, 1, 2]
        }
    );
    assert!(matches!(
        write.hints_stored(1),
        Step::Acknowledged { ack, .. } if ack.acks == 0
    ));
}

#[test]
fn a_replica_that_rejects_the_write_gets_no_hint() {
    let (mut write, _) = put(Consistency::Quorum, three(1));
    write.record(0, holds(V2));
    write.record(1, Err(ReplicaError::Rejected("key too long".into())));
    write.record(2, holds(V2));
    assert_eq!(
        write.round_over(false),
        Step::Acknowledged {
            ack: WriteAck {
                version: V2,
                acks: 2
            },
            hint: vec![]
        }
    );
}

#[test]
fn a_hot_key_gives_up_after_the_most_rounds() {
    let (mut write, _) = put(Consistency::Quorum, three(1));
    let mut version = V2;
    for round in 0..MAX_WRITE_ROUNDS {
        let newer = Version::new(version.hlc + 1, 9);
        for i in 0..3 {
            write.record(i, holds(newer));
        }
        assert_eq!(
            write.round_over(false),
            Step::Restamp {
                above: newer,
                round
            }
        );
        version = Version::new(newer.hlc + 1, 1);
        let step = write.restamped(version);
        if round + 1 == MAX_WRITE_ROUNDS {
            assert!(
                matches!(step, Step::Fail(Error::Unavailable(_))),
                "{step:?}"
            );
        } else {
            assert!(matches!(step, Step::Send { .. }));
        }
    }
}

#[test]
fn a_restamp_that_cannot_get_above_the_newest_version_fails_at_once() {
    let (mut write, _) = put(Consistency::Quorum, three(1));
    for i in 0..3 {
        write.record(i, holds(V4));
    }
    assert!(matches!(write.round_over(false), Step::Restamp { .. }));
    // The clock refused to follow V4 (beyond its skew bound).
    let Step::Fail(Error::Unavailable(why)) = write.restamped(V3) else {
        panic!("a clear failure, not ten refused rounds");
    };
    assert!(why.contains("--max-clock-skew-ms"), "{why}");
}

#[test]
fn with_too_few_replicas_believed_up_nothing_is_sent_and_the_write_is_not_applied() {
    let placed = Placed {
        targets: vec![target("a"), down("b"), down("c")],
        ..three(1)
    };
    let (mut write, first) = put(Consistency::Quorum, placed);
    assert_eq!(
        first,
        Step::Send {
            version: V2,
            to: vec![]
        },
        "a quorum is out of reach before anything is sent"
    );
    let Step::Fail(error @ Error::QuorumNotReached { sent: false, .. }) = write.round_over(false)
    else {
        panic!("refused unsent");
    };
    assert_eq!(error.outcome(), crate::error::Outcome::NotApplied);
    // At ONE, a, believed up, is enough: it is sent.
    let placed = Placed {
        targets: vec![target("a"), down("b"), down("c")],
        ..three(1)
    };
    let (_, first) = put(Consistency::One, placed);
    assert_eq!(
        first,
        Step::Send {
            version: V2,
            to: vec![0]
        }
    );
}

#[test]
fn at_any_a_failed_hint_store_leaves_the_outcome_unknown() {
    let placed = Placed {
        targets: vec![down("a"), down("b"), down("c")],
        ..three(1)
    };
    let (mut write, _) = put(Consistency::Any, placed);
    assert!(matches!(write.round_over(false), Step::StoreHints { .. }));
    // The hint stores failed, but one may have landed after all.
    let Step::Fail(error) = write.hints_stored(0) else {
        panic!("a failure");
    };
    assert_eq!(error.outcome(), crate::error::Outcome::Unknown);
}

#[test]
fn running_out_of_rounds_after_a_re_placement_leaves_the_outcome_unknown() {
    let (mut write, _) = put(Consistency::Quorum, three(1));
    let mut version = V2;
    // Eight re-stamps, the ninth round re-placed after one replica stored it.
    for _ in 0..MAX_WRITE_ROUNDS - 2 {
        let newer = Version::new(version.hlc + 1, 9);
        for i in 0..3 {
            write.record(i, holds(newer));
        }
        assert!(matches!(write.round_over(false), Step::Restamp { .. }));
        version = Version::new(newer.hlc + 1, 1);
        assert!(matches!(write.restamped(version), Step::Send { .. }));
    }
    write.record(0, holds(version));
    write.record(1, stale(2));
    write.record(2, stale(2));
    assert!(matches!(write.round_over(false), Step::CatchUp { .. }));
    let placed = Placed {
        layout_version: 2,
        ..three(2)
    };
    assert!(matches!(
        write.placed_again(Some(placed)),
        Step::Send { .. }
    ));
    for i in 0..3 {
        write.record(i, stale(3));
    }
    assert!(matches!(write.round_over(false), Step::CatchUp { .. }));
    let placed = Placed {
        layout_version: 3,
        ..three(3)
    };
    let Step::Fail(error) = write.placed_again(Some(placed)) else {
        panic!("out of rounds");
    };
    assert_eq!(
        error.outcome(),
        crate::error::Outcome::Unknown,
        "replica a holds it: {error}"
    );
}
