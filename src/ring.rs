//! The consistent-hash ring.
//!
//! Keys and nodes are hashed onto the same 64-bit circle with xxh3. Each
//! physical node owns `vnodes` tokens (virtual nodes) spread pseudo-randomly
//! around the circle, which evens out the share of keys each node gets and
//! spreads a departed node's keys over many others. A key's *preference
//! list* is the first N distinct physical nodes met walking clockwise from
//! the key's hash: its replicas, in the order a writer should try them.
//!
//! The ring is a pure function of the member addresses and `vnodes`, so every
//! node and every smart client that knows the same members computes the same
//! preference lists without talking to anyone.

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// A cluster member as the ring knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// The address peers and clients dial, e.g. `127.0.0.1:7001`.
    pub address: String,
    /// `member_id_for(address)`.
    pub member_id: MemberId,
}

impl Member {
    pub fn new(address: impl Into<String>) -> Self {
        let address = address.into();
        let member_id = member_id_for(&address);
        Self { address, member_id }
    }
}

/// A member's place on the ring: the xxh3 of the address it is reached
/// at. It stays the same when the machine behind the address is replaced
/// (that is a new [`crate::clock::InstanceId`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MemberId(pub u64);

impl std::fmt::Display for MemberId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// The member id of `address`.
pub fn member_id_for(address: &str) -> MemberId {
    MemberId(xxh3_64(address.as_bytes()))
}

/// The `vnodes` tokens a member with this id gets: xxh3 of each index,
/// seeded with the id (how every ring so far was built; a layout stores
/// them, so a later change of derivation moves nothing).
pub fn tokens_for(member_id: MemberId, vnodes: usize) -> Vec<u64> {
    (0..vnodes.max(1) as u64)
        .map(|v| xxh3_64_with_seed(&v.to_le_bytes(), member_id.0))
        .collect()
}

/// Where a key sits on the ring.
pub fn key_hash(key: &[u8]) -> u64 {
    xxh3_64(key)
}

/// The ring: sorted tokens, each pointing at the member that owns it.
#[derive(Clone, Debug)]
pub struct Ring {
    /// Members, sorted by address (the ring does not depend on input order).
    members: Vec<Member>,
    /// `(token, index into members)`, sorted by token.
    tokens: Vec<(u64, usize)>,
    /// Tokens per member.
    vnodes: usize,
}

impl Ring {
    /// Builds the ring for `members` (duplicates removed) with `vnodes`
    /// tokens each (at least one).
    pub fn new(members: impl IntoIterator<Item = Member>, vnodes: usize) -> Self {
        let vnodes = vnodes.max(1);
        Self::with_tokens(
            members.into_iter().map(|m| {
                let tokens = tokens_for(m.member_id, vnodes);
                (m, tokens)
            }),
            vnodes,
        )
    }

    /// Builds the ring from members with their stored tokens (a layout's).
    pub fn with_tokens(
        members: impl IntoIterator<Item = (Member, Vec<u64>)>,
        vnodes: usize,
    ) -> Self {
        let mut members: Vec<(Member, Vec<u64>)> = members.into_iter().collect();
        members.sort_by(|a, b| a.0.address.cmp(&b.0.address));
        members.dedup_by(|a, b| a.0.address == b.0.address);
        let vnodes = vnodes.max(1);
        let mut tokens = Vec::with_capacity(members.len() * vnodes);
        for (index, (_, own)) in members.iter().enumerate() {
            for &token in own {
                tokens.push((token, index));
            }
        }
        let members: Vec<Member> = members.into_iter().map(|(m, _)| m).collect();
        // Ties (vanishingly rare) are broken by member order, deterministically.
        tokens.sort_unstable();
        Self {
            members,
            tokens,
            vnodes,
        }
    }

    pub fn members(&self) -> &[Member] {
        &self.members
    }

    pub fn vnodes(&self) -> usize {
        self.vnodes
    }

    /// The member with this id, if any.
    pub fn member(&self, member_id: MemberId) -> Option<&Member> {
        self.members.iter().find(|m| m.member_id == member_id)
    }

    /// The first `n` distinct members clockwise from the key's hash (fewer if
    /// the ring has fewer members).
    pub fn preference_list(&self, key: &[u8], n: usize) -> Vec<&Member> {
        let wanted = n.min(self.members.len());
        let mut chosen: Vec<usize> = Vec::with_capacity(wanted);
        if wanted == 0 {
            return Vec::new();
        }
        let hash = key_hash(key);
        let start = self.tokens.partition_point(|&(token, _)| token < hash);
        for step in 0..self.tokens.len() {
            let (_, index) = self.tokens[(start + step) % self.tokens.len()];
            if !chosen.contains(&index) {
                chosen.push(index);
                if chosen.len() == wanted {
                    break;
                }
            }
        }
        chosen.into_iter().map(|i| &self.members[i]).collect()
    }

    /// Number of token ranges: one per token. Range `i` holds the hashes in
    /// `(token[i-1], token[i]]` (range 0 wraps around zero), and every key in
    /// a range has the same preference list.
    pub fn range_count(&self) -> usize {
        self.tokens.len()
    }

    /// The token range a key hash falls in.
    pub fn range_of(&self, hash: u64) -> usize {
        if self.tokens.is_empty() {
            return 0;
        }
        self.tokens.partition_point(|&(token, _)| token < hash) % self.tokens.len()
    }

    /// The hash intervals of range `i`, as inclusive `(first, last)` pairs
    /// (two for the range that wraps around zero).
    pub fn range_hashes(&self, i: usize) -> Vec<(u64, u64)> {
        let Some(&(end, _)) = self.tokens.get(i) else {
            return Vec::new();
        };
        if i == 0 {
            let (last, _) = self.tokens[self.tokens.len() - 1];
            let mut parts = vec![(0, end)];
            if last < u64::MAX {
                parts.push((last + 1, u64::MAX));
            }
            if self.tokens.len() == 1 {
                // One token owns the whole circle.
                return vec![(0, u64::MAX)];
            }
            parts
        } else {
            let (start, _) = self.tokens[i - 1];
            if start == end {
                Vec::new()
            } else {
                vec![(start + 1, end)]
            }
        }
    }

    /// The replicas of every key in range `i`.
    pub fn range_replicas(&self, i: usize, n: usize) -> Vec<&Member> {
        let wanted = n.min(self.members.len());
        let mut chosen: Vec<usize> = Vec::with_capacity(wanted);
        for step in 0..self.tokens.len() {
            if chosen.len() == wanted {
                break;
            }
            let (_, index) = self.tokens[(i + step) % self.tokens.len()];
            if !chosen.contains(&index) {
                chosen.push(index);
            }
        }
        chosen
            .into_iter()
            .map(|index| &self.members[index])
            .collect()
    }

    /// The share of the key space each member replicates with `n`
    /// replicas per key (each between 0 and 1; they add up to `n`, or to
    /// the member count when there are fewer), in member order.
    pub fn replica_shares(&self, n: usize) -> Vec<(&str, f64)> {
        let mut shares = vec![0.0; self.members.len()];
        for i in 0..self.range_count() {
            let span: f64 = self
                .range_hashes(i)
                .iter()
                .map(|&(first, last)| (last - first) as f64 + 1.0)
                .sum::<f64>()
                / 2f64.powi(64);
            for member in self.range_replicas(i, n) {
                if let Some(k) = self.members.iter().position(|m| m == member) {
                    shares[k] += span;
                }
            }
        }
        self.members
            .iter()
            .zip(shares)
            .map(|(m, share)| (m.address.as_str(), share))
            .collect()
    }

    /// The ranges whose replicas include both `a` and `b`, in order.
    pub fn shared_ranges(&self, a: &str, b: &str, n: usize) -> Vec<usize> {
        (0..self.range_count())
            .filter(|&i| {
                let replicas = self.range_replicas(i, n);
                replicas.iter().any(|m| m.address == a) && replicas.iter().any(|m| m.address == b)
            })
            .collect()
    }

    /// The key's first replica (its coordinator of choice).
    pub fn primary(&self, key: &[u8]) -> Option<&Member> {
        self.preference_list(key, 1).into_iter().next()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replica_shares_add_up_to_n_and_are_even_enough() {
        let ring = Ring::new(["a:1", "b:1", "c:1", "d:1", "e:1"].map(Member::new), 256);
        let shares = ring.replica_shares(3);
        let total: f64 = shares.iter().map(|(_, s)| s).sum();
        assert!((total - 3.0).abs() < 1e-6, "{total}");
        for (member, share) in &shares {
            assert!((share - 0.6).abs() < 0.1, "{member}: {share}");
        }
        let two = Ring::new(["a:1", "b:1"].map(Member::new), 8);
        for (_, share) in two.replica_shares(3) {
            assert!((share - 1.0).abs() < 1e-6, "every key on both: {share}");
        }
    }
    use std::collections::HashMap;

    /// The default `--vnodes`.
    const VNODES: usize = crate::config::DEFAULT_VNODES;

    fn members(count: usize) -> Vec<Member> {
        (1..=count)
            .map(|i| Member::new(format!("127.0.0.1:{}", 7000 + i)))
            .collect()
    }

    fn key(i: u32) -> Vec<u8> {
        format!("key-{i}").into_bytes()
    }

    #[test]
    fn preference_lists_are_distinct_and_stable() {
        let ring = Ring::new(members(5), VNODES);
        let mut reversed = members(5);
        reversed.reverse();
        let same_ring = Ring::new(reversed, VNODES);
        for i in 0..1000 {
            let list = ring.preference_list(&key(i), 3);
            assert_eq!(list.len(), 3);
            assert_ne!(list[0].address, list[1].address);
            assert_ne!(list[1].address, list[2].address);
            assert_ne!(list[0].address, list[2].address);
            assert_eq!(list, same_ring.preference_list(&key(i), 3));
        }
    }

    #[test]
    fn preference_list_is_capped_by_member_count() {
        let ring = Ring::new(members(2), VNODES);
        assert_eq!(ring.preference_list(b"k", 3).len(), 2);
        let empty = Ring::new(Vec::new(), VNODES);
        assert!(empty.preference_list(b"k", 3).is_empty());
    }

    #[test]
    fn five_nodes_share_a_million_keys_within_15_percent() {
        let ring = Ring::new(members(5), VNODES);
        let mut counts: HashMap<String, u64> = HashMap::new();
        let keys = 1_000_000u32;
        for i in 0..keys {
            let owner = ring.primary(&key(i)).expect("non-empty ring");
            *counts.entry(owner.address.clone()).or_default() += 1;
        }
        let mean = keys as f64 / 5.0;
        for (address, count) in &counts {
            let deviation = (*count as f64 - mean).abs() / mean;
            assert!(
                deviation <= 0.15,
                "{address} owns {count} keys, {:.1}% off the mean {mean}",
                deviation * 100.0
            );
        }
        assert_eq!(counts.len(), 5);
    }

    #[test]
    fn a_sixth_node_takes_about_a_sixth_and_only_moves_keys_to_itself() {
        let before = Ring::new(members(5), VNODES);
        let after = Ring::new(members(6), VNODES);
        let newcomer = "127.0.0.1:7006";
        let keys = 1_000_000u32;
        let mut moved = 0u32;
        for i in 0..keys {
            let k = key(i);
            let old = before.primary(&k).expect("non-empty ring");
            let new = after.primary(&k).expect("non-empty ring");
            if old != new {
                assert_eq!(new.address, newcomer, "key {i} moved between old nodes");
                moved += 1;
            }
        }
        let share = moved as f64 / keys as f64;
        let ideal = 1.0 / 6.0;
        assert!(
            (share - ideal).abs() / ideal <= 0.15,
            "moved {:.2}% of keys, ideal {:.2}%",
            share * 100.0,
            ideal * 100.0
        );
    }

    #[test]
    fn ranges_partition_the_circle_and_share_preference_lists() {
        let ring = Ring::new(members(5), 16);
        assert_eq!(ring.range_count(), 80);
        for i in 0..10_000 {
            let k = key(i);
            let range = ring.range_of(key_hash(&k));
            let inside = ring
                .range_hashes(range)
                .iter()
                .any(|&(first, last)| (first..=last).contains(&key_hash(&k)));
            assert!(inside, "key {i} outside its range");
            assert_eq!(ring.preference_list(&k, 3), ring.range_replicas(range, 3));
        }
        // The intervals cover every hash exactly once.
        let covered: u128 = (0..ring.range_count())
            .flat_map(|r| ring.range_hashes(r))
            .map(|(first, last)| (last - first) as u128 + 1)
            .sum();
        assert_eq!(covered, u64::MAX as u128 + 1);
        let shared = ring.shared_ranges("127.0.0.1:7001", "127.0.0.1:7002", 3);
        assert!(!shared.is_empty() && shared.len() < ring.range_count());
    }

    #[test]
    fn a_new_node_only_joins_preference_lists() {
        // With N = 3, a preference list either stays the same or gains the
        // newcomer and drops its last old member; old members keep their order.
        let before = Ring::new(members(5), VNODES);
        let after = Ring::new(members(6), VNODES);
        for i in 0..10_000 {
            let k = key(i);
            let old: Vec<_> = before.preference_list(&k, 3).into_iter().cloned().collect();
            let new: Vec<_> = after.preference_list(&k, 3).into_iter().cloned().collect();
            let kept: Vec<_> = new
                .iter()
                .filter(|m| m.address != "127.0.0.1:7006")
                .cloned()
                .collect();
            assert_eq!(kept[..], old[..kept.len()]);
        }
    }
}
