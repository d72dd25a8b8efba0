use super::*;
use crate::clock::InstanceId;
use crate::ring::{Member, key_hash};

fn version(hlc: u64) -> Version {
    Version {
        hlc,
        instance_id: InstanceId(1),
    }
}

fn entry(key: &str, hlc: u64) -> RangeEntry {
    RangeEntry {
        key: key.to_string(),
        version: version(hlc),
        tombstone: false,
        deleted_at_ms: 0,
    }
}

fn tombstone(key: &str, hlc: u64) -> RangeEntry {
    RangeEntry {
        tombstone: true,
        deleted_at_ms: 1,
        ..entry(key, hlc)
    }
}

fn keys(window: &Window) -> Vec<&str> {
    window.keys.iter().map(|l| l.key.as_str()).collect()
}

/// Keys sorted as a listing returns them (storage-key order).
fn in_order(keys: &[&str]) -> Vec<String> {
    let mut keys: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
    keys.sort_by_key(|k| storage_key(k));
    keys
}

const WHOLE_RING: Stretch = Stretch {
    range: 0,
    last: u64::MAX,
};

#[test]
fn a_cursor_round_trips_and_a_forged_one_is_refused() {
    let at = Position::after_key("users/ada");
    assert_eq!(Position::from_cursor(&at.to_cursor()).unwrap(), at);
    assert_eq!(Position::from_cursor("").unwrap(), Position::start());
    for bad in [
        "zz",
        "0",
        "00ff",
        "0011223344556677g0",
        "\u{e9}\u{e9}000000000000000000",
    ] {
        let refused = Position::from_cursor(bad).unwrap_err().to_string();
        assert!(
            refused.contains("is not one a listing gave"),
            "{bad}: {refused}"
        );
    }
}

#[test]
fn positions_order_as_storage_keys_do() {
    let key = "k";
    let hash = key_hash(key.as_bytes());
    assert!(Position::before_hash(hash) < Position::after_key(key));
    assert!(Position::after_key(key) < Position::before_hash(hash + 1));
    assert!(Position::start() < Position::before_hash(0));
}

#[test]
fn the_newest_version_wins_and_deleted_keys_are_left_out() {
    let pages = [
        ReplicaPage {
            entries: vec![entry("a", 5), tombstone("b", 9), entry("c", 1)],
            next: None,
        },
        ReplicaPage {
            entries: vec![
                entry("a", 7),
                entry("b", 3),
                tombstone("c", 0),
                entry("d", 2),
            ],
            next: None,
        },
    ];
    let window = merge(&pages, WHOLE_RING, &Position::start(), "");
    assert_eq!(keys(&window), in_order(&["a", "c", "d"]));
    let a = window.keys.iter().find(|l| l.key == "a").unwrap();
    assert_eq!(a.version, version(7), "the newest copy wins");
    assert_eq!(window.next, None, "the whole ring is listed");
}

#[test]
fn a_window_ends_where_the_nearest_page_stopped() {
    let mut all = vec!["a", "b", "c", "d", "e", "f"];
    all.sort_by_key(|k| storage_key(k));
    let entries = |keys: &[&str]| keys.iter().map(|k| entry(k, 1)).collect::<Vec<_>>();
    // One replica stopped after three keys, the other gave all six: the
    // second's last three are not known complete on the first.
    let pages = [
        ReplicaPage {
            entries: entries(&all[..3]),
            next: Some(storage_key(all[2])),
        },
        ReplicaPage {
            entries: entries(&all),
            next: None,
        },
    ];
    let window = merge(&pages, WHOLE_RING, &Position::start(), "");
    assert_eq!(keys(&window), all[..3].to_vec());
    assert_eq!(window.next, Some(Position::after_key(all[2])));
    // The next window starts after it.
    let pages = [
        ReplicaPage {
            entries: entries(&all[3..]),
            next: None,
        },
        ReplicaPage {
            entries: entries(&all[3..]),
            next: None,
        },
    ];
    let next = merge(&pages, WHOLE_RING, &window.next.unwrap(), "");
    assert_eq!(keys(&next), all[3..].to_vec());
}

#[test]
fn keys_past_the_stretch_or_at_the_position_are_not_listed_twice() {
    let mut all = vec!["a", "b", "c", "d"];
    all.sort_by_key(|k| storage_key(k));
    let stretch = Stretch {
        range: 3,
        last: key_hash(all[2].as_bytes()),
    };
    let page = ReplicaPage {
        entries: all.iter().map(|k| entry(k, 1)).collect(),
        next: None,
    };
    let window = merge(&[page], stretch, &Position::after_key(all[0]), "");
    assert_eq!(keys(&window), all[1..3].to_vec());
    assert_eq!(window.next, Some(Position::before_hash(stretch.last + 1)));
}

#[test]
fn a_prefix_filters_keys_but_not_the_position() {
    let pages = [ReplicaPage {
        entries: vec![
            entry("users/1", 1),
            entry("orders/1", 1),
            entry("users/2", 1),
        ],
        next: None,
    }];
    let window = merge(&pages, WHOLE_RING, &Position::start(), "users/");
    assert_eq!(keys(&window), in_order(&["users/1", "users/2"]));
}

#[test]
fn stretches_cover_the_ring_once_in_order() {
    let ring = Ring::new(["n1:1", "n2:1", "n3:1"].map(Member::new), 4);
    let (mut at, mut seen) = (Position::start(), Vec::new());
    for _ in 0..100 {
        let stretch = next_stretch(&ring, &at);
        seen.push(stretch);
        match stretch.last.checked_add(1) {
            Some(next) => at = Position::before_hash(next),
            None => break,
        }
    }
    // Every range once, range 0 twice (it wraps around zero), last at MAX.
    assert_eq!(seen.len(), ring.range_count() + 1);
    assert_eq!(seen.first().unwrap().range, 0);
    assert_eq!(seen.last().unwrap().range, 0);
    assert_eq!(seen.last().unwrap().last, u64::MAX);
    assert!(seen.windows(2).all(|w| w[0].last < w[1].last));
}
