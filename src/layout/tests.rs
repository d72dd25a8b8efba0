use super::*;

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
