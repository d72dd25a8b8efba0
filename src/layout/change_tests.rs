use super::change::{LEFT, REMOVED};
use super::*;
use crate::clock::InstanceId;

fn members(count: usize) -> Layout {
    let addresses: Vec<String> = (1..=count).map(|i| format!("127.0.0.1:700{i}")).collect();
    let mut layout = Layout::bootstrap(&addresses, 3, 32);
    for (i, member) in layout.members.iter_mut().enumerate() {
        member.instance_id = InstanceId(100 + i as u64);
    }
    layout
}

const A: &str = "127.0.0.1:7001";
const B: &str = "127.0.0.1:7002";
const C: &str = "127.0.0.1:7003";
const D: &str = "127.0.0.1:7004";
const E: &str = "127.0.0.1:7005";

fn all_up(_: &str) -> bool {
    true
}

/// Records every gainer's stream, in order: the last moves the reads.
fn stream_all(mut layout: Layout) -> Layout {
    let key = layout.move_key();
    for gainer in layout.gainers() {
        assert!(
            !layout.reads_moved(),
            "reads moved before {gainer} streamed"
        );
        layout = layout.record_streamed(&gainer, key).expect("record");
        layout.validate().expect("valid");
    }
    layout
}

#[test]
fn a_leave_streams_to_every_gainer_then_moves_reads_then_settles() {
    let v1 = members(4);
    let v2 = v1.begin_leave(D, false).expect("leave");
    v2.validate().expect("valid");
    assert_eq!(v2.member(D).map(|m| m.role), Some(Role::Leaving));
    assert_eq!(v2.in_progress(), Some(&*format!("{D} leaves")));
    // Reads stay on the old ring (with the leaver); writes also go to the
    // target ring (without it).
    assert!(v2.read_ring().members().iter().any(|m| m.address == D));
    assert!(!v2.target_ring().members().iter().any(|m| m.address == D));
    assert_eq!(v2.extra_write_rings().len(), 1);
    // Every other member takes some of the leaver's ranges.
    assert_eq!(v2.gainers(), vec![A.to_string(), B.into(), C.into()]);
    // The leaver votes until it is gone.
    assert!(v2.acceptors().contains(&D.to_string()));
    // One change at a time.
    assert!(matches!(
        v2.begin_leave(C, false),
        Err(Refusal::InProgress { .. })
    ));
    assert!(v2.begin_join(E).is_err());

    let v3 = v2.record_streamed(A, v2.move_key()).expect("A streamed");
    assert_eq!(v3.version, 3);
    assert!(!v3.reads_moved());
    assert_eq!(v3.waiting_for_streams(), vec![B.to_string(), C.into()]);
    assert_eq!(v3.move_key(), v2.move_key(), "the same change");
    let moved = stream_all(v3);
    assert!(moved.reads_moved());
    assert!(moved.previous.contains(&D.to_string()));
    assert!(!moved.read_ring().members().iter().any(|m| m.address == D));
    assert!(moved.streamed.is_empty());
    // Aborting is too late once reads moved.
    assert!(moved.abort().is_err());

    let settled = moved.settle().expect("settle");
    settled.validate().expect("valid");
    assert!(settled.is_settled());
    assert!(settled.member(D).is_none());
    let gone = settled
        .removed_instance(D, InstanceId(103))
        .expect("on the removed list");
    assert_eq!(gone.why, LEFT);
    assert!(
        gone.notice().contains("left the cluster"),
        "{}",
        gone.notice()
    );
    assert_eq!(settled.read_ring().members().len(), 3);
}

#[test]
fn a_leave_below_n_is_refused_unless_forced() {
    let v1 = members(3);
    let refused = v1.begin_leave(C, false).expect_err("below N");
    assert!(
        refused.to_string().contains("fewer than N = 3"),
        "{refused}"
    );
    let forced = v1.begin_leave(C, true).expect("forced");
    // Every survivor already holds every key (N = members): nothing to
    // stream, the reads move at once.
    assert!(forced.gainers().is_empty());
    assert!(forced.waiting_for_streams().is_empty());
    let moved = forced.finish().expect("finish");
    let settled = moved.settle().expect("settle");
    assert_eq!(settled.members.len(), 2);
    assert!(members(1).begin_leave(A, true).is_err(), "the last member");
    assert!(
        v1.begin_leave("127.0.0.1:9", false).is_err(),
        "not a member"
    );
}

#[test]
fn a_remove_rebuilds_from_survivors_and_refuses_too_few_copies() {
    let v1 = members(5);
    let v2 = v1
        .begin_remove(E, false, |a| a != E)
        .expect("one dead member");
    assert_eq!(v2.member(E).map(|m| m.role), Some(Role::Removing));
    assert!(!v2.acceptors().contains(&E.to_string()), "dead: no vote");
    assert!(!v2.gainers().contains(&E.to_string()));
    assert!(v2.written_off.is_empty());
    let settled = stream_all(v2).settle().expect("settle");
    assert_eq!(
        settled
            .removed_instance(E, InstanceId(104))
            .map(|r| r.why.as_str()),
        Some(REMOVED)
    );

    // Two dead of five with N = 3: some ranges have one copy left.
    let two_dead = |a: &str| a != E && a != D;
    let refused = v1.begin_remove(E, false, two_dead).expect_err("too few");
    let why = refused.to_string();
    assert!(
        why.contains("--allow-data-loss") && why.contains("1 copy up"),
        "{why}"
    );
    let lossy = v1.begin_remove(E, true, two_dead).expect("allowed");
    // Only the other dead member's copies are written off: a range it
    // does not hold still needs two sources.
    assert_eq!(lossy.written_off, vec![D.to_string()]);
    let moved = stream_all(lossy);
    assert!(
        moved.written_off.is_empty(),
        "only for the change it was given to"
    );
}

#[test]
fn a_remove_during_a_leave_goes_on_without_the_dead_member() {
    let v1 = members(5);
    let leaving = v1.begin_leave(E, false).expect("leave");
    let key = leaving.move_key();
    let gainer = leaving.gainers()[0].clone();
    let recorded = leaving.record_streamed(&gainer, key).expect("streamed");
    // Another gainer dies: the leave would wait for it forever.
    let dead = recorded.waiting_for_streams()[0].clone();
    let removed = recorded
        .begin_remove(&dead, false, |a| a != dead)
        .expect("remove during a change");
    removed.validate().expect("valid");
    assert_eq!(removed.member(&dead).map(|m| m.role), Some(Role::Removing));
    assert_eq!(removed.member(E).map(|m| m.role), Some(Role::Leaving));
    assert!(removed.streamed.is_empty(), "every gainer streams again");
    assert_ne!(removed.move_key(), key);
    assert!(!removed.gainers().contains(&dead));
    // The old stream's record is refused: the target changed.
    assert!(removed.record_streamed(&gainer, key).is_err());
    let settled = stream_all(removed).settle().expect("settle");
    assert!(settled.member(E).is_none() && settled.member(&dead).is_none());
    assert_eq!(settled.members.len(), 3);
    let why = |a: &str| {
        settled
            .removed
            .iter()
            .find(|r| r.address == a)
            .map(|r| r.why.clone())
    };
    assert_eq!(why(E).as_deref(), Some(LEFT));
    assert_eq!(why(&dead).as_deref(), Some(REMOVED));
}

#[test]
fn removing_a_joiner_aborts_its_join_and_a_leave_can_be_aborted() {
    let v1 = members(3);
    let joining = v1.begin_join_as(D, InstanceId(7)).expect("join");
    let dropped = joining.begin_remove(D, false, |a| a != D).expect("remove");
    assert!(dropped.is_settled());
    assert!(dropped.removed_instance(D, InstanceId(7)).is_some());

    let v4 = members(4);
    let leaving = v4.begin_leave(B, false).expect("leave");
    let undone = leaving.abort().expect("abort a leave");
    assert!(undone.is_settled());
    assert_eq!(undone.members, v4.members);
    assert!(undone.removed.is_empty());
    // The same leave again is another change: a stream made for the first
    // one does not count for it.
    let again = undone.begin_leave(B, false).expect("leave again");
    assert_ne!(again.move_key(), leaving.move_key());
    let gainer = leaving.gainers()[0].clone();
    assert!(again.record_streamed(&gainer, leaving.move_key()).is_err());
    // Removes are refused once reads moved (the move settles by itself).
    let moved = stream_all(leaving);
    assert!(matches!(
        moved.begin_remove(A, false, all_up),
        Err(Refusal::InProgress { .. })
    ));
}

#[test]
fn written_off_copies_stay_written_off_only_while_their_members_are_down() {
    let v1 = members(5);
    let two_dead = |a: &str| a != E && a != D;
    let lossy = v1.begin_remove(E, true, two_dead).expect("allowed");
    assert_eq!(lossy.written_off, vec![D.to_string()]);
    // D is back; C dies and is removed in the same change.
    let c_dead = |a: &str| a != E && a != C;
    let again = lossy
        .begin_remove(C, true, c_dead)
        .expect("remove during the change");
    assert!(
        !again.written_off.contains(&D.to_string()),
        "{:?}",
        again.written_off
    );
}

#[test]
fn a_replaced_members_address_cannot_join_again_with_the_same_tokens() {
    let v1 = members(4);
    let dead = |a: &str| a != D;
    let replacing = v1
        .begin_replace(D, "127.0.0.1:7009", InstanceId(9), false, dead)
        .expect("replace");
    assert_eq!(
        replacing.change_name(),
        format!("127.0.0.1:7009 replaces {D}")
    );
    let settled = stream_all(replacing).settle().expect("settle");
    assert!(settled.member(D).is_none());
    let refused = settled
        .begin_join(D)
        .expect_err("D's tokens are the replacer's");
    assert!(refused.to_string().contains("127.0.0.1:7009"), "{refused}");
}

#[test]
fn a_forced_new_layout_keeps_only_the_survivor() {
    let v1 = members(5);
    let forced = v1.force_survivor(B, InstanceId(101)).expect("forced");
    forced.validate().expect("valid");
    assert_eq!(forced.version, v1.version + 1);
    assert_eq!(forced.members.len(), 1);
    assert_eq!(forced.members[0].address, B);
    assert_eq!(forced.members[0].tokens, v1.member(B).expect("B").tokens);
    assert_eq!(forced.removed.len(), 4);
    assert!(forced.removed_instance(A, InstanceId(100)).is_some());
    assert!(forced.is_settled());
    assert!(v1.force_survivor("127.0.0.1:9", InstanceId(1)).is_err());
    let joining = v1
        .begin_join_as("127.0.0.1:7009", InstanceId(9))
        .expect("join");
    assert!(
        joining
            .force_survivor("127.0.0.1:7009", InstanceId(9))
            .is_err()
    );
}

#[test]
fn the_stream_slices_cover_the_hash_space_once() {
    let leaving = members(5).begin_leave(C, false).expect("leave");
    let slices = leaving.slices();
    let mut intervals: Vec<(u64, u64)> = slices.iter().flat_map(|s| s.intervals.clone()).collect();
    intervals.sort();
    assert_eq!(intervals.first().map(|i| i.0), Some(0));
    assert_eq!(intervals.last().map(|i| i.1), Some(u64::MAX));
    for pair in intervals.windows(2) {
        assert_eq!(pair[0].1 + 1, pair[1].0, "no gap, no overlap");
    }
    let share: f64 = slices.iter().map(|s| s.share()).sum();
    assert!((share - 1.0).abs() < 1e-9);
    // Every slice: three old replicas, three new, the leaver only in old.
    for slice in &slices {
        assert_eq!((slice.old.len(), slice.new.len()), (3, 3));
        assert!(!slice.new.contains(&C.to_string()));
        let gained: Vec<&String> = slice.gainers().collect();
        assert_eq!(
            gained.len(),
            usize::from(slice.old.contains(&C.to_string()))
        );
    }
}
