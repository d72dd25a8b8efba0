//! Dropping moved data: once a move settled, a node drops the records of
//! the ranges it no longer replicates — but only after a completed
//! exchange with every new owner of each range.
//!
//! Per range this node holds records of but does not replicate in the
//! settled layout (its digest is not 0), grouped by the range's owners:
//! hand the range to each owner (anti-entropy's listing and push, fenced
//! by the layout version: `antientropy/handoff.rs`); once every owner
//! confirmed holding every record at an equal or newer version, check
//! again that this node serves the newest layout any member reports, and
//! drop exactly the records confirmed, under the replica's fence (a layout
//! adopted meanwhile makes it drop nothing). A range whose exchange failed
//! is kept and retried next round; an owner that failed once is not asked
//! again in the same round, and one believed down is not asked at all.
//!
//! A node restarted with an older settled layout cleans nothing until it
//! serves the newest: a member reporting a newer layout stops the round,
//! and an owner serving another layout refuses the listing. Clean-up runs
//! only while the layout is settled, a bounded number of ranges per round,
//! so the next change is never held up by it.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use super::Membership;
use crate::antientropy::handoff::confirmed_by_all;
use crate::heartbeat::Heartbeats;
use crate::layout::Layout;
use crate::ring::Ring;
use crate::workers::{RoundResult, WorkerError, more};

/// Most ranges handed off per round (each takes a listing per owner).
const MAX_RANGES_PER_ROUND: usize = 64;

/// What one member says about clean-up at a layout version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub address: String,
    /// Whether the failure detector believes it up.
    pub up: bool,
    /// The layout version it last reported serving (none: no answer yet).
    pub serves: Option<u64>,
}

/// Why clean-up at layout `version` must wait, if it must: a member
/// reports a newer layout (this node is behind and catches up first), or
/// a member believed up does not serve `version` yet.
pub fn wait_reason(version: u64, peers: &[Peer]) -> Option<String> {
    if let Some(ahead) = peers.iter().find(|p| p.serves > Some(version)) {
        return Some(format!(
            "{} serves layout v{}, newer than v{version}",
            ahead.address,
            ahead.serves.unwrap_or_default()
        ));
    }
    peers
        .iter()
        .find(|p| p.up && p.serves != Some(version))
        .map(|p| format!("{} does not serve layout v{version} yet", p.address))
}

/// The ranges of `ring` (N = `n`) that `me` does not replicate but holds
/// records of (`digest` is not 0), grouped by their replicas.
pub fn moved_away(
    ring: &Ring,
    n: usize,
    me: &str,
    digest: impl Fn(usize) -> u64,
) -> BTreeMap<Vec<String>, Vec<usize>> {
    let mut groups: BTreeMap<Vec<String>, Vec<usize>> = BTreeMap::new();
    for range in 0..ring.range_count() {
        let owners: Vec<String> = ring
            .range_replicas(range, n)
            .into_iter()
            .map(|m| m.address.clone())
            .collect();
        if !owners.iter().any(|o| o == me) && digest(range) != 0 {
            groups.entry(owners).or_default().push(range);
        }
    }
    groups
}

/// One round's hand-offs: what was dropped, what was kept and why.
#[derive(Default)]
struct Pass {
    /// Ranges handed off and dropped.
    dropped_ranges: usize,
    /// Records dropped.
    dropped: u64,
    /// Ranges kept (an owner down, failing, or a layout changing).
    kept: usize,
    /// Each owner that failed this round, and why (asked no more).
    failed: BTreeMap<String, String>,
}

impl Pass {
    fn result(self, version: u64, left: usize) -> RoundResult {
        if self.dropped > 0 {
            tracing::info!(
                dropped = self.dropped,
                ranges = self.dropped_ranges,
                version,
                "dropped the records of ranges moved away, each confirmed by its new owners"
            );
        }
        let Some((owner, why)) = self.failed.iter().next() else {
            return Ok(());
        };
        Err(WorkerError::new(format!(
            "clean-up at layout v{version}: kept {} of the ranges moved away ({left} in all), retried next round: {owner}: {why}{}",
            self.kept,
            more(self.failed.len() - 1, "owner")
        )))
    }
}

impl Membership {
    /// Drops the records of ranges this node no longer replicates in the
    /// settled `layout`, each range once its new owners confirmed holding
    /// them (see the module doc). Fails when a hand-off failed; waiting
    /// for members to serve the layout is not a failure.
    pub(super) async fn clean_up(&self, layout: &Layout, heartbeats: &Heartbeats) -> RoundResult {
        let version = layout.version;
        if let Some(why) = self.cleanup_waits(layout, heartbeats) {
            tracing::debug!(version, %why, "clean-up of moved data waits");
            return Ok(());
        }
        let view = self.cluster.placement();
        if view.version() != version || self.replica.digests_layout_version() != version {
            return Ok(());
        }
        let moved = moved_away(view.ring(), view.replicas(), view.me(), |range| {
            self.replica.range_digest(range)
        });
        let left: usize = moved.values().map(Vec::len).sum();
        if left == 0 {
            return Ok(self.cleaned_all(version));
        }
        let mut pass = Pass::default();
        let work: Vec<(Vec<String>, usize)> = moved
            .into_iter()
            .flat_map(|(owners, ranges)| ranges.into_iter().map(move |r| (owners.clone(), r)))
            .take(MAX_RANGES_PER_ROUND)
            .collect();
        for (owners, range) in &work {
            let (owners, range) = (owners, *range);
            let skipped = owners
                .iter()
                .find(|o| pass.failed.contains_key(*o) || !self.cluster.liveness.is_up(o.as_str()));
            if let Some(owner) = skipped {
                pass.failed
                    .entry(String::clone(owner))
                    .or_insert_with(|| "believed down".into());
                pass.kept += 1;
                continue;
            }
            let mut confirmed = Vec::with_capacity(owners.len());
            for owner in owners {
                match self.anti_entropy.hand_off(&view, owner, range).await {
                    Ok(records) => confirmed.push(records),
                    Err(why) => {
                        pass.failed.insert(owner.clone(), why.to_string());
                        break;
                    }
                }
            }
            if confirmed.len() < owners.len() {
                pass.kept += 1;
                continue;
            }
            // Just before dropping: still the newest layout anyone reports.
            if let Some(why) = self.cleanup_waits(layout, heartbeats) {
                tracing::info!(version, %why, "clean-up of moved data stopped");
                pass.kept += 1;
                break;
            }
            match self
                .drop_confirmed(version, confirmed_by_all(confirmed))
                .await
            {
                Ok(Some(dropped)) => {
                    pass.dropped += dropped;
                    pass.dropped_ranges += 1;
                }
                // The layout moved on: the next round decides at it.
                Ok(None) => break,
                Err(why) => {
                    return Err(WorkerError::new(format!(
                        "cannot drop moved records: {why}"
                    )));
                }
            }
        }
        // What is left waits only for owners believed down: as clean as
        // it can be now (`cluster wait` does not wait for down members).
        if pass.failed.values().all(|why| why == "believed down") {
            self.clean_enough.store(version, Ordering::Relaxed);
        }
        pass.result(version, left)
    }

    /// Why clean-up at `layout` must wait (see [`wait_reason`]), if it must;
    /// also when this node no longer serves `layout`.
    fn cleanup_waits(&self, layout: &Layout, heartbeats: &Heartbeats) -> Option<String> {
        let serving = self.layout().version;
        if serving != layout.version {
            return Some(format!("this node serves layout v{serving} now"));
        }
        let peers: Vec<Peer> = layout
            .members
            .iter()
            .filter(|m| m.address != self.me.address)
            .map(|m| Peer {
                address: m.address.clone(),
                up: self.cluster.liveness.is_up(&m.address),
                serves: heartbeats.report(&m.address).map(|r| r.layout_version),
            })
            .collect();
        wait_reason(layout.version, &peers)
    }

    /// Notes that this node holds only ranges it replicates at `version`.
    fn cleaned_all(&self, version: u64) {
        self.cleaned.store(version, Ordering::Relaxed);
        self.clean_enough.store(version, Ordering::Relaxed);
        tracing::info!(
            version,
            "moved data cleaned up: this node holds only ranges it replicates"
        );
    }

    /// Drops the records `confirmed` (each only if still held at exactly
    /// that version) under the replica's fence; `None` when this node no
    /// longer serves `version`.
    async fn drop_confirmed(
        &self,
        version: u64,
        confirmed: crate::antientropy::handoff::Confirmed,
    ) -> crate::error::Result<Option<u64>> {
        let replica = self.replica.clone();
        crate::seams::blocking(move || replica.drop_handed_off(version, &confirmed))
            .await
            .map_err(|why| crate::error::Error::Internal(format!("the drop task failed: {why}")))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::Member;

    fn peer(address: &str, up: bool, serves: Option<u64>) -> Peer {
        Peer {
            address: address.into(),
            up,
            serves,
        }
    }

    #[test]
    fn clean_up_waits_for_members_up_and_stops_behind_a_newer_layout() {
        assert_eq!(wait_reason(4, &[]), None);
        let everyone = [peer("a", true, Some(4)), peer("b", true, Some(4))];
        assert_eq!(wait_reason(4, &everyone), None);
        // A member down, last seen on an older layout, does not hold it up.
        let down = [peer("a", true, Some(4)), peer("b", false, Some(2))];
        assert_eq!(wait_reason(4, &down), None);
        // A member up that has not answered yet, or serves an older one, does.
        let silent = [peer("a", true, None)];
        assert!(wait_reason(4, &silent).is_some_and(|w| w.contains("does not serve")));
        let behind = [peer("a", true, Some(3))];
        assert!(wait_reason(4, &behind).is_some());
        // A node restarted with an older settled layout: anyone ahead, up
        // or down, stops it.
        for up in [true, false] {
            let ahead = [peer("a", true, Some(4)), peer("b", up, Some(6))];
            let why = wait_reason(4, &ahead).expect("behind");
            assert!(why.contains("b serves layout v6"), "{why}");
        }
    }

    #[test]
    fn moved_ranges_are_the_nonempty_ones_this_node_left_grouped_by_owners() {
        let members: Vec<Member> = (1..=4)
            .map(|i| Member::new(format!("127.0.0.1:700{i}")))
            .collect();
        let ring = Ring::new(members, 8);
        let me = "127.0.0.1:7001";
        // Every range holds something.
        let groups = moved_away(&ring, 3, me, |_| 1);
        let foreign: Vec<usize> = (0..ring.range_count())
            .filter(|&r| !ring.range_replicas(r, 3).iter().any(|m| m.address == me))
            .collect();
        assert!(!foreign.is_empty());
        let mut listed: Vec<usize> = groups.values().flatten().copied().collect();
        listed.sort();
        assert_eq!(listed, foreign);
        for (owners, ranges) in &groups {
            assert!(!owners.iter().any(|o| o == me));
            for &range in ranges {
                let replicas: Vec<String> = ring
                    .range_replicas(range, 3)
                    .into_iter()
                    .map(|m| m.address.clone())
                    .collect();
                assert_eq!(&replicas, owners);
            }
        }
        // Empty ranges are not handed off.
        assert!(moved_away(&ring, 3, me, |_| 0).is_empty());
        // With N = members, nothing ever moves away.
        assert!(moved_away(&ring, 4, me, |_| 1).is_empty());
    }
}
