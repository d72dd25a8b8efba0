//! `cluster plan`: what a change would move, and what it would leave
//! short, computed from the layout it would commit. Pure: it changes
//! nothing, and the same rules ([`super::change`]) decide the real change.

use std::collections::BTreeMap;

use super::Layout;
use super::change::Slice;
use crate::quorum::Consistency;

/// What one member would receive.
#[derive(Clone, Debug, PartialEq)]
pub struct Transfer {
    /// The member gaining the ranges.
    pub to: String,
    /// Where it streams them from: the replicas giving them up (one per
    /// range), or the old replicas (at least N−W+1 of each range's must
    /// answer), sorted.
    pub from: Vec<String>,
    /// Whether `from` are the replicas giving the ranges up.
    pub from_giver: bool,
    /// Hash intervals, and the fraction of the hash space they are.
    pub intervals: usize,
    pub share: f64,
}

/// A slice whose replica sets would have fewer than W members up during
/// the move (QUORUM requests to its keys fail until they are back).
#[derive(Clone, Debug, PartialEq)]
pub struct Thin {
    pub slice: Slice,
    /// Members up in its old set (reads, and writes) and in its new set
    /// (writes).
    pub old_up: usize,
    pub new_up: usize,
}

/// What a change would do.
#[derive(Clone, Debug, PartialEq)]
pub struct ChangePlan {
    pub transfers: Vec<Transfer>,
    pub thin: Vec<Thin>,
    /// Fraction of the hash space that changes hands.
    pub share_moved: f64,
}

/// The plan of the change `next` (the layout the change would commit),
/// with `up` saying which members are believed up.
pub fn plan(next: &Layout, up: impl Fn(&str) -> bool) -> ChangePlan {
    let (n_old, n_new) = next.n_old_new();
    let (w_old, w_new) = (
        Consistency::Quorum.required(n_old),
        Consistency::Quorum.required(n_new),
    );
    type Received = (Vec<String>, usize, f64);
    let mut transfers: BTreeMap<(String, bool), Received> = BTreeMap::new();
    let mut thin = Vec::new();
    let mut share_moved = 0.0;
    for slice in next.slices() {
        let gainers: Vec<String> = slice.gainers().cloned().collect();
        if !gainers.is_empty() {
            share_moved += slice.share();
        }
        let (from, from_giver) = match next.giver_of(&slice) {
            Some(giver) if up(&giver) => (vec![giver], true),
            _ => (next.sources_of(&slice), false),
        };
        for to in gainers {
            let entry = transfers.entry((to, from_giver)).or_default();
            entry.0.extend(from.iter().cloned());
            entry.0.sort();
            entry.0.dedup();
            entry.1 += slice.intervals.len();
            entry.2 += slice.share();
        }
        let old_up = slice.old.iter().filter(|a| up(a)).count();
        let new_up = slice.new.iter().filter(|a| up(a)).count();
        if old_up < w_old || new_up < w_new {
            thin.push(Thin {
                slice,
                old_up,
                new_up,
            });
        }
    }
    ChangePlan {
        transfers: transfers
            .into_iter()
            .map(|((to, from_giver), (from, intervals, share))| Transfer {
                to,
                from,
                from_giver,
                intervals,
                share,
            })
            .collect(),
        thin,
        share_moved,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(count: usize) -> Layout {
        let addresses: Vec<String> = (1..=count).map(|i| format!("127.0.0.1:700{i}")).collect();
        Layout::bootstrap(&addresses, 3, 32)
    }

    #[test]
    fn a_leave_moves_the_leavers_share_from_it_to_the_others() {
        let next = members(5)
            .begin_leave("127.0.0.1:7005", false)
            .expect("leave");
        let plan = plan(&next, |_| true);
        // The leaver held about 3/5 of the keys; they all move.
        assert!(
            (plan.share_moved - 0.6).abs() < 0.15,
            "{}",
            plan.share_moved
        );
        assert!(plan.transfers.iter().all(|t| t.from_giver
            && t.from == vec!["127.0.0.1:7005".to_string()]
            && t.to != "127.0.0.1:7005"));
        let received: f64 = plan.transfers.iter().map(|t| t.share).sum();
        assert!((received - plan.share_moved).abs() < 1e-9);
        assert!(plan.thin.is_empty());
    }

    #[test]
    fn a_remove_streams_from_the_survivors_and_names_thin_ranges() {
        let dead = |a: &str| a != "127.0.0.1:7005" && a != "127.0.0.1:7004";
        let next = members(5)
            .begin_remove("127.0.0.1:7005", true, dead)
            .expect("remove");
        let plan = plan(&next, dead);
        for transfer in &plan.transfers {
            assert!(!transfer.from_giver);
            assert!(!transfer.from.contains(&"127.0.0.1:7005".to_string()));
        }
        // Ranges held by both dead members have one replica up: below W.
        assert!(!plan.thin.is_empty());
        assert!(plan.thin.iter().all(|t| t.old_up < 2 || t.new_up < 2));
    }
}
