use super::*;
use crate::clock::InstanceId;

fn three() -> Layout {
    Layout::bootstrap(
        &[
            "127.0.0.1:7001".into(),
            "127.0.0.1:7002".into(),
            "127.0.0.1:7003".into(),
        ],
        3,
        16,
    )
}

#[test]
fn the_bootstrap_ring_is_the_address_derived_one() {
    let addresses: Vec<String> = (1..=5).map(|i| format!("127.0.0.1:700{i}")).collect();
    let layout = Layout::bootstrap(&addresses, 3, 64);
    let old = Ring::new(addresses.iter().map(Member::new), 64);
    let new = layout.read_ring();
    for i in 0..2000 {
        let key = format!("key-{i}");
        assert_eq!(
            old.preference_list(key.as_bytes(), 3),
            new.preference_list(key.as_bytes(), 3)
        );
    }
    assert!(layout.is_settled() && layout.extra_write_rings().is_empty());
    layout.validate().expect("valid");
}

#[test]
fn a_join_reads_old_writes_both_then_settles() {
    let v1 = three();
    let v2 = v1.begin_join("127.0.0.1:7004").expect("join");
    assert_eq!(v2.version, 2);
    assert_eq!(v2.in_progress(), Some("127.0.0.1:7004 joins"));
    assert_eq!(
        v2.read_ring().members().len(),
        3,
        "the joiner answers no reads"
    );
    let extra = v2.extra_write_rings();
    assert_eq!(extra.len(), 1);
    assert_eq!(extra[0].members().len(), 4, "writes reach the joiner");
    // One change at a time.
    let refused = v2.begin_join("127.0.0.1:7005").expect_err("busy");
    assert!(
        refused.to_string().contains("127.0.0.1:7004 joins"),
        "{refused}"
    );
    assert!(matches!(v2.settle(), Err(Refusal::Invalid(_))));

    let v3 = v2.finish_join("127.0.0.1:7004").expect("finish");
    assert_eq!(v3.read_ring().members().len(), 4);
    let extra = v3.extra_write_rings();
    assert_eq!(extra.len(), 1);
    assert_eq!(extra[0].members().len(), 3, "old sets still get writes");
    assert!(v3.begin_join("127.0.0.1:7005").is_err());

    let v4 = v3.settle().expect("settle");
    assert!(v4.is_settled() && v4.extra_write_rings().is_empty());
    assert_eq!(v4.version, 4);
    v4.validate().expect("valid");
    assert!(v4.begin_join("127.0.0.1:7005").is_ok());
}

#[test]
fn nonsense_changes_are_refused() {
    let v1 = three();
    assert!(v1.begin_join("127.0.0.1:7001").is_err(), "already a member");
    assert!(v1.finish_join("127.0.0.1:7001").is_err(), "not joining");
    assert!(v1.settle().is_err(), "nothing to settle");
}

#[test]
fn invalid_layouts_are_refused() {
    let good = three();
    let mut bad = good.clone();
    bad.members[0].member_id.0 ^= 1;
    assert!(bad.validate().unwrap_err().contains("not its address's"));
    let mut bad = good.clone();
    bad.members[1].tokens.pop();
    assert!(bad.validate().unwrap_err().contains("tokens"));
    let mut bad = good.clone();
    bad.members.push(bad.members[0].clone());
    assert!(bad.validate().unwrap_err().contains("twice"));
    let mut bad = good.clone();
    bad.previous = vec!["10.0.0.1:1".into()];
    assert!(bad.validate().unwrap_err().contains("not a member"));
    let mut bad = good.clone();
    bad.version = 0;
    assert!(bad.validate().is_err());
    let mut bad = good;
    bad.members.clear();
    assert!(bad.validate().is_err());
}

#[test]
fn joiners_are_learners_not_acceptors() {
    let v1 = three();
    assert_eq!(v1.acceptors().len(), 3);
    let v2 = v1
        .begin_join_as("127.0.0.1:7004", InstanceId(44))
        .expect("join");
    assert_eq!(
        v2.acceptors(),
        ["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"],
        "the joiner does not vote on the next version"
    );
    assert!(!v2.votes("127.0.0.1:7004") && v2.votes("127.0.0.1:7001"));
    // Three members, one down, a dead joiner: 2 of the 3 acceptors are a
    // majority (of 4 voters they would not be).
    assert_eq!(crate::paxos::majority(v2.acceptors().len()), 2);
    let v3 = v2.finish_join("127.0.0.1:7004").expect("finish");
    assert_eq!(v3.acceptors().len(), 4, "once joined, it votes");
}

#[test]
fn a_member_votes_only_as_the_instance_the_layout_names() {
    let v2 = three()
        .begin_join_as("127.0.0.1:7004", InstanceId(44))
        .expect("join");
    let v3 = v2.finish_join("127.0.0.1:7004").expect("finish");
    assert!(v3.votes_as("127.0.0.1:7004", InstanceId(44)));
    assert!(
        !v3.votes_as("127.0.0.1:7004", InstanceId(45)),
        "a new instance (a lost data dir) does not vote with the old one's name"
    );
    // Members a layout names no instance for (bootstrapped, or from a
    // release before instance ids) vote as any instance.
    assert!(v3.votes_as("127.0.0.1:7001", InstanceId(7)));
    assert!(
        !v2.votes_as("127.0.0.1:7004", InstanceId(44)),
        "joiners never"
    );
}

#[test]
fn the_join_names_the_joiners_instance() {
    let v2 = three()
        .begin_join_as("127.0.0.1:7004", InstanceId(44))
        .expect("join");
    let joiner = v2.member("127.0.0.1:7004").expect("member");
    assert_eq!(
        (joiner.role, joiner.instance_id),
        (Role::Joining, InstanceId(44))
    );
    assert_eq!(v2.has_joiner("127.0.0.1:7004", InstanceId(44)), Ok(true));
    assert_eq!(v2.has_joiner("127.0.0.1:7004", InstanceId::NONE), Ok(true));
    assert_eq!(v2.has_joiner("127.0.0.1:7005", InstanceId(44)), Ok(false));
    let other = v2
        .has_joiner("127.0.0.1:7004", InstanceId(45))
        .expect_err("another instance at the joiner's address");
    assert!(other.to_string().contains("cluster abort"), "{other}");
    // Once active, a new instance at the address comes back behind its
    // read gate.
    let v3 = v2.finish_join("127.0.0.1:7004").expect("finish");
    assert_eq!(v3.has_joiner("127.0.0.1:7004", InstanceId(45)), Ok(true));
    // A joiner of an older release names none.
    let old = three()
        .begin_join_as("127.0.0.1:7004", InstanceId::NONE)
        .expect("join");
    assert!(
        old.member("127.0.0.1:7004")
            .expect("member")
            .instance_id
            .is_none()
    );
}

#[test]
fn an_abort_drops_the_joiner_and_remembers_its_instance() {
    let v1 = three();
    let v2 = v1
        .begin_join_as("127.0.0.1:7004", InstanceId(44))
        .expect("join");
    let v3 = v2.abort().expect("abort while joining");
    assert_eq!(v3.version, 3);
    assert!(v3.is_settled() && v3.extra_write_rings().is_empty());
    assert!(!v3.is_member("127.0.0.1:7004"));
    assert_eq!(v3.change, "127.0.0.1:7004 join aborted");
    assert_eq!(
        v3.removed,
        [Removed {
            address: "127.0.0.1:7004".into(),
            instance_id: InstanceId(44),
            version: 3,
            why: JOIN_ABORTED.into(),
        }]
    );
    v3.validate().expect("valid");
    // Reads and writes go where they went before the join.
    for i in 0..500 {
        let key = format!("key-{i}");
        assert_eq!(
            v1.read_ring().preference_list(key.as_bytes(), 3),
            v3.read_ring().preference_list(key.as_bytes(), 3)
        );
    }
    let removed = v3
        .removed_instance("127.0.0.1:7004", InstanceId(44))
        .expect("on the removed list");
    assert_eq!(removed.notice(), "this node's join was aborted (layout v3)");
    // That instance may not join again; a new one at the address may.
    let refused = v3
        .begin_join_as("127.0.0.1:7004", InstanceId(44))
        .expect_err("the aborted instance");
    assert!(
        refused.to_string().contains("wipe its data dir"),
        "{refused}"
    );
    assert!(
        v3.removed_instance("127.0.0.1:7004", InstanceId(45))
            .is_none()
    );
    let v4 = v3
        .begin_join_as("127.0.0.1:7004", InstanceId(45))
        .expect("a new instance joins");
    assert_eq!(v4.removed.len(), 1, "the removed list is kept");
}

#[test]
fn abort_refuses_once_reads_moved_and_when_nothing_is_in_progress() {
    let v1 = three();
    let refused = v1.abort().expect_err("nothing to abort");
    assert!(
        refused.to_string().contains("nothing to abort"),
        "{refused}"
    );
    let v3 = v1
        .begin_join("127.0.0.1:7004")
        .and_then(|v2| v2.finish_join("127.0.0.1:7004"))
        .expect("joined");
    let refused = v3.abort().expect_err("reads moved");
    assert!(
        refused.to_string().contains("cluster wait"),
        "says what to run instead: {refused}"
    );
    let v4 = v3.settle().expect("settle");
    assert!(
        v4.abort()
            .expect_err("settled")
            .to_string()
            .contains("nothing to abort")
    );
}

fn seen(pairs: &[(&str, u64)]) -> Vec<(String, InstanceId)> {
    pairs
        .iter()
        .map(|(a, i)| (a.to_string(), InstanceId(*i)))
        .collect()
}

#[test]
fn the_first_naming_waits_for_every_member_or_the_grace_period() {
    let v1 = three();
    let two = seen(&[("127.0.0.1:7001", 1), ("127.0.0.1:7002", 2)]);
    assert!(v1.instances_to_name(&two, false).is_empty(), "one unseen");
    assert_eq!(v1.instances_to_name(&two, true), two, "named once late");
    let all = seen(&[
        ("127.0.0.1:7001", 1),
        ("127.0.0.1:7002", 2),
        ("127.0.0.1:7003", 3),
    ]);
    let names = v1.instances_to_name(&all, false);
    assert_eq!(names, all);
    let v2 = v1.name_instances(&names).expect("name");
    assert_eq!(
        (v2.version, v2.change.as_str()),
        (2, naming::INSTANCES_NAMED)
    );
    assert!(v2.names_every_instance() && v2.removed.is_empty());
    assert!(v2.instances_to_name(&all, false).is_empty(), "nothing left");
    assert!(
        !v2.votes_as("127.0.0.1:7003", InstanceId(33)),
        "a wiped first member no longer votes with an empty acceptor"
    );
    assert_eq!(v2.read_ring().members(), v1.read_ring().members());
}

#[test]
fn a_replaced_instance_is_renamed_and_its_old_one_removed() {
    let all = seen(&[
        ("127.0.0.1:7001", 1),
        ("127.0.0.1:7002", 2),
        ("127.0.0.1:7003", 3),
    ]);
    let v1 = three();
    let v2 = v1.name_instances(&all).expect("name");
    let wiped = seen(&[
        ("127.0.0.1:7001", 1),
        ("127.0.0.1:7002", 2),
        ("127.0.0.1:7003", 33),
    ]);
    let names = v2.instances_to_name(&wiped, false);
    assert_eq!(names, seen(&[("127.0.0.1:7003", 33)]));
    let v3 = v2.name_instances(&names).expect("rename");
    assert!(v3.votes_as("127.0.0.1:7003", InstanceId(33)));
    assert!(!v3.votes_as("127.0.0.1:7003", InstanceId(3)));
    let removed = v3
        .removed_instance("127.0.0.1:7003", InstanceId(3))
        .expect("the old instance is on the removed list");
    assert_eq!(
        (removed.version, removed.why.as_str()),
        (3, naming::INSTANCE_REPLACED)
    );
    // A member not seen yet keeps its name; one never seen is not renamed.
    let unseen = seen(&[("127.0.0.1:7001", 1)]);
    assert!(v3.instances_to_name(&unseen, true).is_empty());
}

#[test]
fn naming_waits_for_a_settled_layout_and_names_only_active_members() {
    let v2 = three()
        .begin_join_as("127.0.0.1:7004", InstanceId(44))
        .expect("join");
    let names = seen(&[("127.0.0.1:7001", 1)]);
    assert!(matches!(
        v2.name_instances(&names),
        Err(Refusal::InProgress { .. })
    ));
    assert!(
        v2.instances_to_name(&seen(&[("127.0.0.1:7004", 45)]), true)
            .is_empty(),
        "a joiner is named by its join, never renamed"
    );
    assert!(matches!(
        three().name_instances(&seen(&[("127.0.0.1:7009", 9)])),
        Err(Refusal::Invalid(_))
    ));
}

#[test]
fn a_replaced_instance_is_never_named_again() {
    let v2 = three()
        .name_instances(&seen(&[
            ("127.0.0.1:7001", 1),
            ("127.0.0.1:7002", 2),
            ("127.0.0.1:7003", 3),
        ]))
        .expect("name");
    let v3 = v2
        .name_instances(&seen(&[("127.0.0.1:7003", 33)]))
        .expect("rename");
    // A node that was down through the rename still remembers instance 3.
    let stale = seen(&[("127.0.0.1:7003", 3)]);
    assert!(v3.instances_to_name(&stale, true).is_empty());
    assert!(matches!(
        v3.name_instances(&stale),
        Err(Refusal::Invalid(why)) if why.contains("removed in layout v3")
    ));
}
