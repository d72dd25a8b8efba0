//! One cluster, one id: the rules, pure.
//!
//! Every layout names the cluster it belongs to ([`Layout::cluster_id`]).
//! A cluster started with `--cluster-token T` has the id of its token
//! ([`id_of_token`]) from its first layout on. Without a token, the first
//! layout (the same on every `--peers` node) has none, and the first member
//! that is up proposes one change that sets a random id
//! ([`Layout::assign_cluster_id`]); Paxos chooses one such change, so every
//! node ends with the same id. A data dir from a release before cluster
//! ids gets its id through the same change.
//!
//! Once a node's layout has an id, it refuses messages carrying another id,
//! or none ([`check_sender`]), and it never adopts a layout of another
//! cluster ([`may_adopt`]). A node whose layout has no id yet adopts a
//! layout with one only when it is the id assignment of the very layout it
//! holds: so a node of an older cluster, which serves a layout with a
//! higher version and another id, cannot take over a new cluster while
//! its id is being agreed.

use super::{Layout, Refusal};

/// What the change that gives a layout its cluster id is called.
pub const ASSIGNED: &str = "cluster id assigned";

/// The cluster id of `--cluster-token` `token`: its xxh3, never 0 (0 means
/// "no id").
pub fn id_of_token(token: &str) -> u64 {
    match xxhash_rust::xxh3::xxh3_64(token.as_bytes()) {
        0 => 1,
        id => id,
    }
}

/// What every refusal of [`check_sender`] contains.
pub const REFUSED_MARK: &str = "cluster id";

/// A random cluster id, never 0.
pub fn random_id(random: u64) -> u64 {
    random.max(1)
}

impl Layout {
    /// v+1 with cluster id `id`, nothing else changed. Only for a layout
    /// without one.
    pub fn assign_cluster_id(&self, id: u64) -> Result<Layout, Refusal> {
        if self.cluster_id != 0 {
            return Err(Refusal::Invalid(format!(
                "layout v{} already belongs to cluster {:016x}",
                self.version, self.cluster_id
            )));
        }
        if id == 0 {
            return Err(Refusal::Invalid("a cluster id is never 0".into()));
        }
        let mut next = self.next(ASSIGNED.into());
        next.cluster_id = id;
        Ok(next)
    }

    /// Whether `self` is exactly `base` with a cluster id assigned.
    pub fn is_id_assignment_of(&self, base: &Layout) -> bool {
        if base.cluster_id != 0 || self.cluster_id == 0 || self.change != ASSIGNED {
            return false;
        }
        let mut unassigned = self.clone();
        unassigned.version = base.version;
        unassigned.change = base.change.clone();
        unassigned.cluster_id = 0;
        self.version == base.version + 1 && unassigned == *base
    }
}

/// Whether a node holding `current` may adopt `next` as far as cluster ids
/// go (the version and the rest are checked elsewhere): the same id; or,
/// while `current` has none, a layout without one (the upgrade window) or
/// the assignment of `current` itself.
pub fn may_adopt(current: &Layout, next: &Layout) -> Result<(), String> {
    if next.cluster_id == current.cluster_id {
        return Ok(());
    }
    if current.cluster_id != 0 {
        return Err(format!(
            "layout v{} belongs to another cluster (id {}, this cluster {}); not adopted",
            next.version,
            show(next.cluster_id),
            show(current.cluster_id)
        ));
    }
    if next.is_id_assignment_of(current) {
        return Ok(());
    }
    Err(format!(
        "layout v{} of cluster {} does not assign an id to this node's layout v{} (which has none); \
         not adopted: is it from another cluster?",
        next.version,
        show(next.cluster_id),
        current.version
    ))
}

/// [`may_adopt`] for a layout a majority of the held layout's active
/// members vouched for: while `current` has no id, any id (the vouchers
/// adopted it in this cluster's lineage, so it is this cluster's: a node
/// that was down through the id assignment and a change after it catches
/// up); once it has one, only the same.
pub fn may_adopt_verified(current: &Layout, next: &Layout) -> Result<(), String> {
    if current.cluster_id == 0 {
        return Ok(());
    }
    may_adopt(current, next)
}

/// Whether a message carrying cluster id `theirs` is accepted by a node
/// whose layout has cluster id `own`: always while `own` is 0 (the upgrade
/// window), then only the same id. The refusal says what happened.
pub fn check_sender(own: u64, theirs: u64) -> Result<(), String> {
    if own == 0 || theirs == own {
        return Ok(());
    }
    if theirs == 0 {
        return Err(format!(
            "message without a cluster id, and this cluster has id {}: the sender runs a release \
             before cluster ids or holds no layout of this cluster; upgrade it, or wipe its data dir \
             and start it with --join",
            show(own)
        ));
    }
    Err(format!(
        "message from another cluster (id {}, this cluster {}): the sender's data dir belongs to \
         another cluster (cluster id mismatch): was it started with another --cluster-token, or is \
         it an old cluster's node? Stop it, or wipe its data dir and start it with --join",
        show(theirs),
        show(own)
    ))
}

/// A cluster id as logs and messages show it.
pub fn show(id: u64) -> String {
    format!("{id:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three() -> Layout {
        let addresses: Vec<String> = (1..=3).map(|i| format!("127.0.0.1:700{i}")).collect();
        Layout::bootstrap(&addresses, 3, 16)
    }

    #[test]
    fn a_token_gives_one_nonzero_id() {
        assert_eq!(id_of_token("t"), id_of_token("t"));
        assert_ne!(id_of_token("a"), id_of_token("b"));
        assert_ne!(id_of_token(""), 0);
        assert_eq!(random_id(0), 1);
    }

    #[test]
    fn the_assignment_changes_only_the_id() {
        let v1 = three();
        let v2 = v1.assign_cluster_id(7).expect("assign");
        assert_eq!(
            (v2.version, v2.cluster_id, v2.change.as_str()),
            (2, 7, ASSIGNED)
        );
        assert_eq!(v2.members, v1.members);
        assert!(v2.is_id_assignment_of(&v1));
        assert!(v2.assign_cluster_id(8).is_err(), "only once");
        assert!(v1.assign_cluster_id(0).is_err());
        // Not the assignment of another layout, nor two versions on.
        let joined = v1.begin_join("127.0.0.1:7004").expect("join");
        assert!(!v2.is_id_assignment_of(&joined));
        let later = joined.assign_cluster_id(7).expect("assign");
        assert!(!later.is_id_assignment_of(&v1));
        v2.validate().expect("valid");
    }

    #[test]
    fn another_clusters_layout_is_never_adopted() {
        let mut ours = three();
        ours.cluster_id = 1;
        let mut theirs = three().begin_join("127.0.0.1:7004").expect("join");
        theirs.cluster_id = 2;
        assert!(may_adopt(&ours, &theirs).is_err());
        // Without an id at all, once this node has one.
        theirs.cluster_id = 0;
        assert!(may_adopt(&ours, &theirs).is_err());
        // The same cluster: yes.
        theirs.cluster_id = 1;
        assert!(may_adopt(&ours, &theirs).is_ok());
    }

    #[test]
    fn without_an_id_only_the_assignment_of_the_layout_held_is_adopted() {
        let v1 = three();
        // The old cluster's grown layout: a higher version, another id.
        let mut old = three()
            .assign_cluster_id(9)
            .and_then(|l| l.begin_join("127.0.0.1:7004"))
            .expect("old");
        old.version = 5;
        let err = may_adopt(&v1, &old).expect_err("refused");
        assert!(err.contains("another cluster"), "{err}");
        assert!(may_adopt(&v1, &v1.assign_cluster_id(3).expect("assign")).is_ok());
        // The upgrade window: layouts without ids, as before.
        let joined = v1.begin_join("127.0.0.1:7004").expect("join");
        assert!(may_adopt(&v1, &joined).is_ok());
        // A layout a majority vouched for is this cluster's, however far
        // past the assignment: a node down through it catches up.
        assert!(may_adopt_verified(&v1, &old).is_ok());
        let ours = v1.assign_cluster_id(3).expect("assign");
        assert!(
            may_adopt_verified(&ours, &old).is_err(),
            "another id, once we have one"
        );
    }

    #[test]
    fn messages_from_another_cluster_are_refused_once_there_is_an_id() {
        assert!(check_sender(0, 0).is_ok());
        assert!(check_sender(0, 5).is_ok(), "the upgrade window");
        assert!(check_sender(5, 5).is_ok());
        let other = check_sender(5, 6).expect_err("other");
        assert!(
            other.starts_with(
                "message from another cluster (id 0000000000000006, this cluster 0000000000000005)"
            ),
            "{other}"
        );
        let none = check_sender(5, 0).expect_err("none");
        assert!(none.contains("without a cluster id"), "{none}");
    }
}
