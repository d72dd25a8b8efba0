//! Unit tests of `quorum` (kept apart so that the module reads as code).

use super::*;

const V1: Version = Version::new(1, 1);
const V2: Version = Version::new(2, 1);
const V3: Version = Version::new(3, 2);

#[test]
fn required_replies() {
    assert_eq!(Consistency::One.required(3), 1);
    assert_eq!(Consistency::Quorum.required(3), 2);
    assert_eq!(Consistency::Quorum.required(4), 3);
    assert_eq!(Consistency::Quorum.required(5), 3);
    assert_eq!(Consistency::Quorum.required(1), 1);
    assert_eq!(Consistency::All.required(3), 3);
    assert_eq!(Consistency::One.required(0), 0);
    assert_eq!(Consistency::Quorum.required(0), 0);
    // Quorums always intersect.
    for n in 1..10 {
        let q = Consistency::Quorum.required(n);
        assert!(q + q > n);
    }
}

#[test]
fn write_acknowledged_at_w() {
    let mut tally = WriteTally::new(V2, 2, 3);
    tally.record("a", WriteReply::Holds(V2));
    assert_eq!(tally.decision(), WriteDecision::Pending);
    tally.record("b", WriteReply::Failed("refused".into()));
    assert_eq!(tally.decision(), WriteDecision::Pending);
    tally.record("c", WriteReply::Holds(V2));
    assert_eq!(tally.decision(), WriteDecision::Acknowledged { acks: 2 });
}

#[test]
fn write_fails_as_soon_as_the_quorum_is_out_of_reach() {
    let mut tally = WriteTally::new(V2, 2, 3);
    tally.record("a", WriteReply::Failed("connection refused".into()));
    assert_eq!(tally.decision(), WriteDecision::Pending);
    tally.record("b", WriteReply::Failed("timed out".into()));
    assert_eq!(tally.decision(), WriteDecision::Failed);
    assert_eq!(tally.acks(), 0);
    assert_eq!(tally.failures().len(), 2);
    assert!(tally.failures()[0].starts_with("a: "));
}

#[test]
fn a_newer_version_everywhere_forces_a_restamp() {
    let mut tally = WriteTally::new(V2, 2, 3);
    tally.record("a", WriteReply::Holds(V3));
    tally.record("b", WriteReply::Holds(V3));
    // "c" might store V2: wait for it before choosing.
    assert_eq!(tally.decision(), WriteDecision::Pending);
    tally.record("c", WriteReply::NotSent("believed down".into()));
    assert_eq!(tally.decision(), WriteDecision::Restamp { above: V3 });
}

#[test]
fn a_round_some_replica_may_hold_is_superseded_not_restamped() {
    // One replica stored V2: re-stamping would put the value under two
    // versions.
    let mut tally = WriteTally::new(V2, 2, 3);
    tally.record("a", WriteReply::Holds(V2));
    tally.record("b", WriteReply::Holds(V3));
    assert_eq!(tally.decision(), WriteDecision::Pending);
    tally.record("c", WriteReply::Failed("timed out".into()));
    assert_eq!(tally.decision(), WriteDecision::Superseded { above: V3 });
    // A timed-out replica may have stored it, too.
    let mut tally = WriteTally::new(V2, 2, 3);
    tally.record("a", WriteReply::Holds(V3));
    tally.record("b", WriteReply::Holds(V3));
    tally.record("c", WriteReply::Failed("timed out".into()));
    assert_eq!(tally.decision(), WriteDecision::Superseded { above: V3 });
}

#[test]
fn a_refusal_does_not_count_as_an_ack() {
    let mut tally = WriteTally::new(V2, 2, 2);
    tally.record("a", WriteReply::Holds(V3));
    assert_eq!(tally.acks(), 0);
    assert_eq!(tally.decision(), WriteDecision::Pending);
    tally.record("b", WriteReply::Holds(V3));
    assert_eq!(tally.decision(), WriteDecision::Restamp { above: V3 });
    let mut tally = WriteTally::new(V2, 3, 3);
    tally.record("a", WriteReply::Holds(V2));
    tally.record("b", WriteReply::Holds(V2));
    tally.record("c", WriteReply::Holds(V3));
    assert_eq!(tally.acks(), 2);
    assert_eq!(tally.decision(), WriteDecision::Superseded { above: V3 });
}

#[test]
fn quorum_reached_despite_one_newer_replica_is_acknowledged() {
    let mut tally = WriteTally::new(V2, 2, 3);
    tally.record("a", WriteReply::Holds(V3));
    tally.record("b", WriteReply::Holds(V2));
    tally.record("c", WriteReply::Holds(V2));
    assert_eq!(tally.decision(), WriteDecision::Acknowledged { acks: 2 });
}

#[test]
fn read_answers_with_the_newest_of_the_first_r() {
    let old = Record::value(V1, &b"old"[..]);
    let new = Record::value(V2, &b"new"[..]);
    let mut tally = ReadTally::new(2, 3);
    tally.record(0, "a", Ok(Some(old.clone())));
    assert_eq!(tally.decision(), ReadDecision::Pending);
    tally.record(1, "b", Ok(Some(new.clone())));
    assert_eq!(tally.decision(), ReadDecision::Answer(Some(new.clone())));
    // The late reply is stale too; repair both.
    tally.record(2, "c", Ok(None));
    assert_eq!(
        tally.repair_plan(),
        Some(RepairPlan {
            record: new,
            stale: vec![0, 2]
        })
    );
}

#[test]
fn tombstones_win_over_older_values() {
    let value = Record::value(V1, &b"v"[..]);
    let tombstone = Record::tombstone(V2);
    let mut tally = ReadTally::new(2, 3);
    tally.record(0, "a", Ok(Some(tombstone.clone())));
    tally.record(1, "b", Ok(Some(value)));
    assert_eq!(tally.decision(), ReadDecision::Answer(Some(tombstone)));
}

#[test]
fn read_fails_when_too_many_replicas_fail() {
    let mut tally = ReadTally::new(2, 3);
    tally.record(0, "a", Err("refused".into()));
    assert_eq!(tally.decision(), ReadDecision::Pending);
    tally.record(1, "b", Err("timed out".into()));
    assert_eq!(tally.decision(), ReadDecision::Failed);
}

#[test]
fn nothing_to_repair_when_replicas_agree_or_know_nothing() {
    let value = Record::value(V1, &b"v"[..]);
    let mut tally = ReadTally::new(2, 3);
    tally.record(0, "a", Ok(Some(value.clone())));
    tally.record(1, "b", Ok(Some(value)));
    assert_eq!(tally.repair_plan(), None);
    let mut unknown = ReadTally::new(2, 3);
    unknown.record(0, "a", Ok(None));
    unknown.record(1, "b", Ok(None));
    assert_eq!(unknown.decision(), ReadDecision::Answer(None));
    assert_eq!(unknown.repair_plan(), None);
}

#[test]
fn a_winner_held_by_fewer_than_w_repliers_must_be_repaired_before_the_answer() {
    let old = Record::value(V1, &b"old"[..]);
    let new = Record::value(V2, &b"new"[..]);
    let mut tally = ReadTally::new(2, 3);
    tally.record(1, "b", Ok(Some(new.clone())));
    tally.record(0, "a", Ok(Some(old)));
    assert_eq!(tally.decision(), ReadDecision::Answer(Some(new.clone())));
    assert_eq!(tally.holding_newest(), 1);
    // The stale replier first, then the replica that has not answered.
    let plan = tally.blocking_repair(Consistency::Quorum);
    assert_eq!(
        plan,
        Some(BlockingRepair {
            record: new.clone(),
            holding: 1,
            needed: 2,
            targets: vec![0, 2],
        })
    );
    // ONE never blocks: it promises nothing about the next read.
    assert_eq!(tally.blocking_repair(Consistency::One), None);
    // A replica that knows nothing of the key is behind too.
    let mut unknown = ReadTally::new(2, 3);
    unknown.record(0, "a", Ok(None));
    unknown.record(2, "c", Ok(Some(new.clone())));
    let plan = unknown
        .blocking_repair(Consistency::Quorum)
        .expect("blocks");
    assert_eq!((plan.holding, plan.targets), (1, vec![0, 1]));
}

#[test]
fn no_blocking_repair_when_w_repliers_hold_the_winner_or_nobody_knows_the_key() {
    let old = Record::value(V1, &b"old"[..]);
    let new = Record::value(V2, &b"new"[..]);
    let mut tally = ReadTally::new(2, 3);
    tally.record(0, "a", Ok(Some(new.clone())));
    tally.record(2, "c", Ok(Some(new.clone())));
    assert_eq!(tally.holding_newest(), 2);
    assert_eq!(tally.blocking_repair(Consistency::Quorum), None);
    // ...even if a late stale reply arrives: that one is repaired
    // asynchronously.
    tally.record(1, "b", Ok(Some(old)));
    assert_eq!(tally.blocking_repair(Consistency::Quorum), None);
    assert_eq!(tally.repair_plan().map(|p| p.stale), Some(vec![1]));
    let mut nothing = ReadTally::new(2, 3);
    nothing.record(0, "a", Ok(None));
    nothing.record(1, "b", Ok(None));
    assert_eq!(nothing.blocking_repair(Consistency::Quorum), None);
}

#[test]
fn w_counts_every_reply_received_not_just_the_first_r() {
    // N = 5: R = W = 3. Two of three hold the winner: block.
    let old = Record::value(V1, &b"old"[..]);
    let new = Record::value(V2, &b"new"[..]);
    let mut tally = ReadTally::new(3, 5);
    tally.record(0, "a", Ok(Some(new.clone())));
    tally.record(1, "b", Ok(Some(new.clone())));
    tally.record(2, "c", Ok(Some(old.clone())));
    let plan = tally.blocking_repair(Consistency::Quorum).expect("blocks");
    assert_eq!((plan.holding, plan.needed), (2, 3));
    assert_eq!(plan.targets, vec![2, 3, 4]);
    // A fourth reply already received that holds it: no need to block.
    tally.record(3, "d", Ok(Some(new)));
    assert_eq!(tally.blocking_repair(Consistency::Quorum), None);
}

#[test]
fn all_blocks_too_and_failed_replicas_are_not_targets() {
    let new = Record::value(V2, &b"new"[..]);
    let mut tally = ReadTally::new(3, 3);
    tally.record(0, "a", Ok(Some(new.clone())));
    tally.record(1, "b", Ok(None));
    tally.record(2, "c", Ok(None));
    let plan = tally.blocking_repair(Consistency::All).expect("blocks");
    assert_eq!(plan.targets, vec![1, 2]);
    let mut partial = ReadTally::new(2, 3);
    partial.record(0, "a", Err("connection refused".into()));
    partial.record(1, "b", Ok(Some(new.clone())));
    partial.record(2, "c", Ok(None));
    let plan = partial
        .blocking_repair(Consistency::Quorum)
        .expect("blocks");
    assert_eq!(plan.targets, vec![2]);
}

#[test]
fn a_tombstone_held_by_too_few_is_repaired_before_not_found_is_answered() {
    // Otherwise the next read could find the deleted value again.
    let value = Record::value(V1, &b"v"[..]);
    let tombstone = Record::tombstone(V2);
    let mut tally = ReadTally::new(2, 3);
    tally.record(0, "a", Ok(Some(tombstone.clone())));
    tally.record(1, "b", Ok(Some(value)));
    let plan = tally.blocking_repair(Consistency::Quorum).expect("blocks");
    assert_eq!(plan.record, tombstone);
}

#[test]
fn repair_writes_finish_at_w_counting_the_holders_already_known() {
    let new = Record::value(V2, &b"new"[..]);
    let mut tally = ReadTally::new(2, 3);
    tally.record(0, "a", Ok(Some(new.clone())));
    tally.record(1, "b", Ok(None));
    let plan = tally.blocking_repair(Consistency::Quorum).expect("blocks");
    // One more holder is enough; "b" acknowledging makes it two of three.
    let mut writes = plan.tally();
    assert_eq!(writes.decision(), WriteDecision::Pending);
    writes.record("b", WriteReply::Holds(V2));
    assert_eq!(writes.decision(), WriteDecision::Acknowledged { acks: 1 });
    // Both targets fail: W is out of reach.
    let mut writes = plan.tally();
    writes.record("b", WriteReply::Failed("timed out".into()));
    assert_eq!(writes.decision(), WriteDecision::Pending);
    writes.record("c", WriteReply::Failed("connection refused".into()));
    assert_eq!(writes.decision(), WriteDecision::Failed);
    // A target holds a newer version: the winner is stale, read again.
    let mut writes = plan.tally();
    writes.record("b", WriteReply::Holds(V3));
    writes.record("c", WriteReply::Failed("connection refused".into()));
    assert_eq!(writes.decision(), WriteDecision::Superseded { above: V3 });
}

#[test]
fn a_replica_heard_from_twice_keeps_the_newer_state() {
    let old = Record::value(V1, &b"old"[..]);
    let new = Record::value(V2, &b"new"[..]);
    let mut tally = ReadTally::new(2, 3);
    tally.record(0, "a", Ok(Some(new.clone())));
    tally.record(1, "b", Ok(Some(old.clone())));
    // The repair reached "b"; its stale read reply does not count any more.
    tally.record(1, "b", Ok(Some(new.clone())));
    tally.record(1, "b", Ok(Some(old)));
    tally.record(1, "b", Err("timed out".into()));
    assert_eq!(tally.replies(), 2);
    assert!(tally.failures().is_empty());
    assert_eq!(tally.holding_newest(), 2);
    // "c" failed to read but took the repair write.
    tally.record(2, "c", Err("timed out".into()));
    tally.record(2, "c", Ok(Some(new)));
    assert_eq!(tally.replies(), 3);
    assert_eq!(tally.repair_plan(), None);
}

/// While data moves, a write goes to the old set {a, b, c} and the new set
/// {a, b, j} (indices 0, 1, 2 and 0, 1, 3): W in each.
fn moving_tally() -> WriteTally {
    WriteTally::in_sets(V2, vec![(vec![0, 1, 2], 2), (vec![0, 1, 3], 2)], 4)
}

#[test]
fn a_write_during_a_move_needs_w_in_every_set() {
    // a and c hold it: W in the old set, one in the new: not yet.
    let mut tally = moving_tally();
    tally.record_at(0, "a", WriteReply::Holds(V2));
    tally.record_at(2, "c", WriteReply::Holds(V2));
    assert_eq!(tally.decision(), WriteDecision::Pending);
    tally.record_at(3, "j", WriteReply::Holds(V2));
    assert_eq!(tally.decision(), WriteDecision::Acknowledged { acks: 3 });

    // a and b alone are W in both sets.
    let mut tally = moving_tally();
    tally.record_at(0, "a", WriteReply::Holds(V2));
    tally.record_at(1, "b", WriteReply::Holds(V2));
    assert_eq!(tally.decision(), WriteDecision::Acknowledged { acks: 2 });
}

#[test]
fn a_write_during_a_move_fails_when_one_set_cannot_reach_w() {
    // b and j fail: the new set {a, b, j} can reach at most 1.
    let mut tally = moving_tally();
    tally.record_at(1, "b", WriteReply::Failed("down".into()));
    assert_eq!(tally.decision(), WriteDecision::Pending);
    tally.record_at(3, "j", WriteReply::NotSent("believed down".into()));
    assert_eq!(tally.decision(), WriteDecision::Failed);
    // Even though the old set could still reach W (a and c).
}

#[test]
fn one_set_is_the_plain_rule() {
    let mut tally = WriteTally::in_sets(V2, vec![(vec![0, 1, 2], 2)], 3);
    tally.record_at(0, "a", WriteReply::Holds(V2));
    tally.record_at(1, "b", WriteReply::Holds(V1));
    assert_eq!(tally.decision(), WriteDecision::Pending);
    tally.record_at(2, "c", WriteReply::Holds(V2));
    assert_eq!(tally.decision(), WriteDecision::Acknowledged { acks: 2 });
    let _ = V3;
}
