//! The fence for copies: a record copied in the background (an
//! anti-entropy push or pull, a hint delivered, moved data handed to its
//! new owner) is stored only by a node that replicates its key at the
//! layout it serves.
//!
//! A node that no longer owns a range drops its records once the new
//! owners confirmed holding them. A copy landing there afterwards would be
//! a zombie: nobody reads it, anti-entropy never compares it, and if the
//! node owned the range again one day, a value whose tombstone was purged
//! meanwhile would come back. So a copy carries the sender's layout version
//! like every placed write (an older one is refused, and the sender catches
//! up), is refused too when it is newer than the one served (this node is
//! behind: whether it replicates the key there is not known here yet), and
//! is refused unless the key's replica sets at this node's layout — read,
//! write, or where data moves to — include this node. Refusals are
//! FAILED_PRECONDITION: not invalid input (a hint is kept, not dropped),
//! and retried once both sides serve the same layout.

use super::{FenceGuard, ReplicaStore, WriteOutcome};
use crate::error::{Error, Result};
use crate::placement::Placement;
use crate::record::Record;

/// Whether the node `view` is taken from replicates `key` there: it is in
/// one of the key's write sets (the read set among them) or among the
/// replicas the key moves to.
pub fn replicates(view: &Placement, key: &str) -> bool {
    view.write_sets(key)
        .iter()
        .flatten()
        .chain(view.target_replicas_of(key).iter())
        .any(|m| view.is_me(&m.address))
}

impl FenceGuard<'_> {
    /// Admits a copy of `key` placed with layout `tagged`, given `view`,
    /// the placement this node serves: refused when `tagged` is older than
    /// the layout served (as writes are) or newer (this node catches up
    /// first), when `view` is not of the layout the fence holds (a layout
    /// being adopted: retry), and when this node does not replicate `key`
    /// in `view`.
    pub fn admit_copy(&self, tagged: u64, view: &Placement, key: &str) -> Result<()> {
        self.admit(tagged)?;
        if tagged > self.serving() {
            return Err(Error::FailedPrecondition(format!(
                "this node serves layout v{}, older than the copy's v{tagged}: it catches up first; the copy is retried",
                self.serving()
            )));
        }
        if view.version() != self.serving() {
            return Err(Error::FailedPrecondition(format!(
                "this node is adopting layout v{}; a copy is retried",
                self.serving()
            )));
        }
        if !replicates(view, key) {
            return Err(Error::FailedPrecondition(format!(
                "this node does not replicate {key:?} at layout v{}: a copy is refused (the key's replicas take it)",
                view.version()
            )));
        }
        Ok(())
    }
}

impl ReplicaStore {
    /// Stores a copy of `key` made here (an anti-entropy pull), placed with
    /// layout `tagged`, if this node replicates the key in `view` (the
    /// placement it serves now) and the record is newer than the one held.
    pub fn write_copy(
        &self,
        tagged: u64,
        view: &Placement,
        key: &str,
        record: &Record,
    ) -> Result<WriteOutcome> {
        let fence = self.fenced(tagged)?;
        fence.admit_copy(tagged, view, key)?;
        let outcome = self.write_if_newer(key, record);
        drop(fence);
        outcome
    }
}

impl ReplicaStore {
    /// Drops the records `handed` (key, version) that its new owners
    /// confirmed holding, each only if this replica still holds exactly
    /// that version, under the fence: `None`, and nothing dropped, when
    /// this node no longer serves layout `version` (a layout adopted since
    /// the owners confirmed them may make this node an owner again).
    /// Answers how many records were dropped.
    pub fn drop_handed_off(
        &self,
        version: u64,
        handed: &[(String, crate::clock::Version)],
    ) -> Result<Option<u64>> {
        let fence = self.fence();
        if fence.serving() != version {
            return Ok(None);
        }
        let mut dropped = 0;
        for (key, held_version) in handed {
            let _stripe = self.stripe(key);
            let stored = super::storage_key(key);
            let held = match self.storage.held(&stored) {
                Ok(Some(held)) if held.version == *held_version => held,
                // Rewritten since, gone, or unreadable: kept.
                Ok(_) | Err(Error::CorruptRecord { .. }) => continue,
                Err(other) => return Err(other),
            };
            self.storage.delete(&stored)?;
            let counter = if held.tombstone {
                &self.tombstones
            } else {
                &self.live_keys
            };
            counter.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            self.update_digest(key, Some(held), None);
            dropped += 1;
        }
        self.storage.flush()?;
        drop(fence);
        Ok(Some(dropped))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::clock::Version;
    use crate::layout::Layout;
    use crate::replica::tests::store;

    fn addresses(count: usize) -> Vec<String> {
        (1..=count)
            .map(|i| format!("127.0.0.1:{}", 7000 + i))
            .collect()
    }

    /// A key `me` does not replicate at `layout`.
    fn foreign_key(layout: &Layout, me: &str) -> String {
        let view = Placement::of_layout(Arc::new(layout.clone()), me);
        (0..)
            .map(|i| format!("k{i}"))
            .find(|k| !replicates(&view, k))
            .expect("some key is elsewhere")
    }

    #[test]
    fn a_node_replicates_its_read_write_and_target_sets_only() {
        let four = Layout::bootstrap(&addresses(4), 3, 8);
        let me = "127.0.0.1:7001";
        let view = Placement::of_layout(Arc::new(four.clone()), me);
        let mut owned = 0;
        for i in 0..200 {
            let key = format!("k{i}");
            let listed = view.replicas_of(&key).iter().any(|m| m.address == me);
            assert_eq!(replicates(&view, &key), listed, "{key}");
            owned += usize::from(listed);
        }
        assert!(owned > 0 && owned < 200, "N=3 of 4: some keys, not all");
        // While a fifth joins, the joiner replicates what moves to it
        // (writes reach it), and the old owners still replicate it too.
        let joining = four.begin_join("127.0.0.1:7005").expect("join");
        let joiner = Placement::of_layout(Arc::new(joining.clone()), "127.0.0.1:7005");
        let old = Placement::of_layout(Arc::new(joining.clone()), me);
        for i in 0..200 {
            let key = format!("k{i}");
            let moves_to_joiner = joiner
                .target_replicas_of(&key)
                .iter()
                .any(|m| m.address == "127.0.0.1:7005");
            assert_eq!(replicates(&joiner, &key), moves_to_joiner, "{key}");
            if view.replicas_of(&key).iter().any(|m| m.address == me) {
                assert!(replicates(&old, &key), "{key}: an old owner until settled");
            }
        }
        // Once settled, an old owner no longer replicates what moved.
        let settled = joining
            .finish_join("127.0.0.1:7005")
            .and_then(|l| l.settle())
            .expect("settle");
        let gone = foreign_key(&settled, me);
        assert!(!replicates(
            &Placement::of_layout(Arc::new(settled), me),
            &gone
        ));
    }

    #[test]
    fn only_records_still_held_at_the_confirmed_version_are_dropped_and_only_at_that_layout() {
        let (_, replica) = store();
        replica.advance_fence(3);
        let v1 = Record::value(Version::new(1, 1), &b"a"[..]);
        let v2 = Record::value(Version::new(2, 1), &b"b"[..]);
        for key in ["a", "b", "c"] {
            replica.write_if_newer(key, &v1).expect("write");
        }
        // "b" was rewritten after its owners confirmed v1.
        replica.write_if_newer("b", &v2).expect("write");
        let handed: Vec<(String, Version)> = ["a", "b", "gone"]
            .iter()
            .map(|k| (k.to_string(), v1.version))
            .collect();
        // A newer layout was adopted meanwhile: nothing is dropped.
        assert_eq!(replica.drop_handed_off(2, &handed).expect("drop"), None);
        assert_eq!(replica.stats().live_keys, 3);
        assert_eq!(replica.drop_handed_off(3, &handed).expect("drop"), Some(1));
        assert_eq!(replica.read("a").expect("read"), None);
        assert_eq!(replica.read("b").expect("read"), Some(v2));
        assert_eq!(replica.read("c").expect("read"), Some(v1));
        assert_eq!(replica.stats().live_keys, 2);
        // The digests follow: they equal a fresh count of what is held.
        let ranges = replica.digest_ring().range_count();
        let live: Vec<u64> = (0..ranges).map(|r| replica.range_digest(r)).collect();
        for range in 0..ranges {
            replica.recount_range(range).expect("recount");
        }
        let counted: Vec<u64> = (0..ranges).map(|r| replica.range_digest(r)).collect();
        assert_eq!(live, counted);
    }

    #[test]
    fn copies_are_refused_from_older_layouts_for_foreign_keys_and_while_adopting() {
        let (_, replica) = store();
        let mut layout = Layout::bootstrap(&addresses(4), 3, 8);
        layout.version = 5;
        let me = "127.0.0.1:7001";
        let view = Placement::of_layout(Arc::new(layout.clone()), me);
        replica.advance_fence(5);
        let mine = (0..)
            .map(|i| format!("k{i}"))
            .find(|k| replicates(&view, k))
            .expect("a key of mine");
        let foreign = foreign_key(&layout, me);
        let record = Record::value(Version::new(1, 1), &b"v"[..]);
        // A copy of a key this node replicates, at its layout.
        let stored = replica.write_copy(5, &view, &mine, &record);
        assert_eq!(stored.expect("stored").held, record.version);
        // From a newer layout: this node may not replicate it there.
        assert!(matches!(
            replica.write_copy(6, &view, &mine, &record),
            Err(Error::FailedPrecondition(why)) if why.contains("catches up")
        ));
        // Placed with an older layout: refused as writes are.
        assert!(matches!(
            replica.write_copy(4, &view, &mine, &record),
            Err(Error::StaleLayout {
                caller: 4,
                current: 5
            })
        ));
        // A key this node does not replicate: refused, nothing stored.
        let refused = replica.write_copy(5, &view, &foreign, &record);
        assert!(
            matches!(&refused, Err(Error::FailedPrecondition(why)) if why.contains("does not replicate")),
            "{refused:?}"
        );
        assert_eq!(replica.read(&foreign).expect("read"), None);
        // The fence moved on but the placement did not yet: retried later.
        replica.advance_fence(6);
        assert!(matches!(
            replica.write_copy(6, &view, &mine, &record),
            Err(Error::FailedPrecondition(why)) if why.contains("adopting")
        ));
    }
}
