//! The layout: the member list the cluster agreed on, version by version.
//!
//! Pure and synchronous. A [`Layout`] names every member with its ring
//! tokens and role, N and vnodes (fixed at bootstrap), and the change in
//! progress, if any. Versions only grow; a change commits as version v+1
//! only when a majority of v's *active* members accepted it ([`paxos`]);
//! joiners are learners ([`Layout::acceptors`]).
//!
//! A join takes three versions, each proposed only when the one before
//! allows it, so that no acknowledged write can be missed on the way:
//!
//! 1. **`J joins`** (v+1): J is a member with role joining. Reads use the
//!    ring of the active members (the old replica sets); writes go to the
//!    old replica set *and* the new one (with J), W acknowledgements in each.
//!    J streams its ranges from the old replicas.
//! 2. **`J finished joining`** (v+2), proposed by J once every range is
//!    streamed: J is active, reads use the new ring; writes still go to
//!    both sets (`previous` names the old members), because a node or
//!    client still on v+1 reads the old sets.
//! 3. **`move settled`** (v+3), proposed once every member serves v+2: writes
//!    go to the new sets only. Old owners drop moved data after every member
//!    serves v+3 and one full anti-entropy pass ran.
//!
//! One change at a time: a new join is refused while a layout has a
//! joining member or a `previous` set ([`Layout::in_progress`]).
//!
//! A join can be undone until step 2 ([`Layout::abort`], in `abort.rs`):
//! writes during step 1 were acknowledged by W replicas of the old set
//! *and* of the new one, so the old sets, which serve reads until then,
//! hold every acknowledged write, and dropping the joiner loses none. After
//! step 2 reads use the new sets, and the move can only go on to settle.
//!
//! What this protects is what QUORUM (or ALL) promises: a write acknowledged
//! by W replicas, read back at R with R + W > N. A write at ONE is on one old
//! replica; the joining node streams from every old replica it can reach, so
//! it usually gets it too, but only N−W+1 of them are required.

mod abort;
pub mod change;
pub mod cluster_id;
pub mod naming;
pub mod paxos;
pub mod plan;
pub mod progress;
pub mod verify;

pub use abort::JOIN_ABORTED;

use std::sync::Arc;

use crate::clock::InstanceId;
use crate::ring::MemberId;
use crate::ring::{Member, Ring, member_id_for, tokens_for};

/// A member's role in a layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Owns its ranges: reads and writes.
    Active,
    /// Gets writes and its ranges' data; answers no quorum read yet.
    Joining,
    /// Leaving (`cluster leave`): keeps its ranges for reads until they
    /// moved, gets writes until the move settles, then is removed.
    Leaving,
    /// Being removed while down (`cluster remove`): as leaving, but no
    /// vote, no stream from it, nobody waits for it.
    Removing,
}

impl Role {
    /// Whether the member is in the old replica sets of a change: the ones
    /// reads use until they move.
    pub fn holds_before(self) -> bool {
        self != Role::Joining
    }

    /// Whether the member is in the target replica sets of a change.
    pub fn holds_after(self) -> bool {
        matches!(self, Role::Active | Role::Joining)
    }

    /// Whether the member votes on the next version: active and leaving
    /// members (a leaver is alive and keeps a majority reachable while
    /// its data moves); joiners are learners, and a member being removed
    /// is dead.
    pub fn votes(self) -> bool {
        matches!(self, Role::Active | Role::Leaving)
    }

    /// The role as status and logs name it.
    pub fn name(self) -> &'static str {
        match self {
            Role::Active => "active",
            Role::Joining => "joining",
            Role::Leaving => "leaving",
            Role::Removing => "removing",
        }
    }
}

/// One member of a layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayoutMember {
    pub address: String,
    pub member_id: MemberId,
    pub role: Role,
    pub tokens: Vec<u64>,
    /// The instance (data dir) the member votes with; [`InstanceId::NONE`]
    /// until a layout names it.
    pub instance_id: InstanceId,
}

/// An instance that left, was removed, or whose join was aborted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Removed {
    pub address: String,
    pub instance_id: InstanceId,
    /// The layout version that removed it.
    pub version: u64,
    /// Why, in words ("join aborted").
    pub why: String,
}

impl LayoutMember {
    fn ring_entry(&self) -> (Member, Vec<u64>) {
        (
            Member {
                address: self.address.clone(),
                member_id: self.member_id,
            },
            self.tokens.clone(),
        )
    }
}

/// The member list at one version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub version: u64,
    /// N as requested at bootstrap (capped by the member count per ring).
    pub replicas: usize,
    pub vnodes: usize,
    /// Sorted by address.
    pub members: Vec<LayoutMember>,
    /// After a join finished: the members whose replica sets still get
    /// every write (empty when settled).
    pub previous: Vec<String>,
    /// What this version changed, in words.
    pub change: String,
    /// The cluster this layout belongs to (0: none yet, a layout from a
    /// release before cluster ids).
    pub cluster_id: u64,
    /// Instances that left, were removed or whose join was aborted.
    pub removed: Vec<Removed>,
    /// Before reads move: the gaining members that streamed their ranges
    /// (see `change.rs`).
    pub streamed: Vec<String>,
    /// `cluster remove --allow-data-loss`: the members believed down when
    /// it was approved, whose copies gainers do not wait for.
    pub written_off: Vec<String>,
    /// The version that set the change's target sets (0: none).
    pub target_since: u64,
}

/// Why a change cannot be made to a layout.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Another change is in progress (its description).
    #[error("a layout change is in progress: {change} (layout v{version}); one change at a time")]
    InProgress { change: String, version: u64 },
    /// The change makes no sense for this layout.
    #[error("{0}")]
    Invalid(String),
}

impl Layout {
    /// The first layout of a cluster started with `--peers`: every member
    /// active, with today's address-derived tokens, so an existing cluster
    /// moves no data when it first stores a layout.
    pub fn bootstrap(addresses: &[String], replicas: usize, vnodes: usize) -> Layout {
        let mut members: Vec<LayoutMember> = addresses
            .iter()
            .map(|address| new_member(address, vnodes, Role::Active))
            .collect();
        members.sort_by(|a, b| a.address.cmp(&b.address));
        members.dedup_by(|a, b| a.address == b.address);
        Layout {
            version: 1,
            replicas: replicas.max(1),
            vnodes: vnodes.max(1),
            members,
            previous: Vec::new(),
            change: "bootstrap from --peers".into(),
            cluster_id: 0,
            removed: Vec::new(),
            streamed: Vec::new(),
            written_off: Vec::new(),
            target_since: 0,
        }
    }

    pub fn member(&self, address: &str) -> Option<&LayoutMember> {
        self.members.iter().find(|m| m.address == address)
    }

    pub fn is_member(&self, address: &str) -> bool {
        self.member(address).is_some()
    }

    pub fn joining(&self) -> impl Iterator<Item = &LayoutMember> {
        self.members.iter().filter(|m| m.role == Role::Joining)
    }

    /// The change in progress, if one is: a member joining, leaving or
    /// being removed, or a finished move whose old replica sets still get
    /// writes.
    pub fn in_progress(&self) -> Option<&str> {
        (self.members.iter().any(|m| m.role != Role::Active) || !self.previous.is_empty())
            .then_some(self.change.as_str())
    }

    /// Whether reads use the target replica sets while the old ones still
    /// get writes (the second step of a change).
    pub fn reads_moved(&self) -> bool {
        !self.previous.is_empty()
    }

    /// Whether data is moving: tombstone GC and cleanup wait.
    pub fn is_settled(&self) -> bool {
        self.in_progress().is_none()
    }

    fn refuse_if_busy(&self) -> Result<(), Refusal> {
        match self.in_progress() {
            Some(change) => Err(Refusal::InProgress {
                change: change.to_string(),
                version: self.version,
            }),
            None => Ok(()),
        }
    }

    fn next(&self, change: String) -> Layout {
        let mut next = self.clone();
        next.version += 1;
        next.change = change;
        next
    }

    /// v+1 with `address` joining.
    pub fn begin_join(&self, address: &str) -> Result<Layout, Refusal> {
        if let Some(member) = self.member(address) {
            return Err(Refusal::Invalid(format!(
                "{address} is already a member (role {:?}, layout v{})",
                member.role, self.version
            )));
        }
        self.refuse_if_busy()?;
        let id = member_id_for(address);
        if self.members.iter().any(|m| m.member_id == id) {
            return Err(Refusal::Invalid(format!(
                "{address} hashes to the member id of an existing member; use another address"
            )));
        }
        let joiner = new_member(address, self.vnodes, Role::Joining);
        self.refuse_token_collision(address, &joiner.tokens)?;
        let mut next = self.next(format!("{address} joins"));
        next.target_since = next.version;
        next.members.push(joiner);
        next.members.sort_by(|a, b| a.address.cmp(&b.address));
        Ok(next)
    }

    /// v+1 with the joining `address` active; the old members' replica
    /// sets keep getting writes until [`Layout::settle`].
    pub fn finish_join(&self, address: &str) -> Result<Layout, Refusal> {
        match self.member(address) {
            Some(m) if m.role == Role::Joining => self.finish(),
            _ => Err(Refusal::Invalid(format!(
                "{address} is not joining in layout v{}",
                self.version
            ))),
        }
    }

    /// v+1 without the old replica sets: the move is over. Members that
    /// left or were removed go on the removed list.
    pub fn settle(&self) -> Result<Layout, Refusal> {
        if !self.reads_moved() || self.joining().next().is_some() {
            return Err(Refusal::Invalid(format!(
                "layout v{} has no finished move to settle",
                self.version
            )));
        }
        let mut next = self.next("move settled".into());
        next.previous.clear();
        let version = next.version;
        let gone: Vec<&LayoutMember> = self
            .members
            .iter()
            .filter(|m| !m.role.holds_after())
            .collect();
        if !gone.is_empty() {
            let names: Vec<String> = gone
                .iter()
                .map(|m| format!("{} {}", m.address, change::gone_why(m.role)))
                .collect();
            next.change = format!("move settled: {}", names.join(", "));
        }
        for member in gone {
            next.removed.push(Removed {
                address: member.address.clone(),
                instance_id: member.instance_id,
                version,
                why: change::gone_why(member.role).into(),
            });
        }
        next.members.retain(|m| m.role.holds_after());
        Ok(next)
    }

    /// The ring reads use: the old replica sets until reads move (active
    /// members and those leaving), then the target ones.
    pub fn read_ring(&self) -> Ring {
        let moved = self.reads_moved();
        Ring::with_tokens(
            self.members
                .iter()
                .filter(|m| {
                    if moved {
                        m.role.holds_after()
                    } else {
                        m.role.holds_before()
                    }
                })
                .map(LayoutMember::ring_entry),
            self.vnodes,
        )
    }

    /// Every ring writes go to besides the read ring: the target ring
    /// while a change streams, the previous members' ring once reads moved.
    pub fn extra_write_rings(&self) -> Vec<Ring> {
        let mut rings = Vec::new();
        if !self.reads_moved() && self.members.iter().any(|m| m.role != Role::Active) {
            rings.push(self.target_ring());
        }
        if self.reads_moved() {
            rings.push(Ring::with_tokens(
                self.members
                    .iter()
                    .filter(|m| self.previous.contains(&m.address))
                    .map(LayoutMember::ring_entry),
                self.vnodes,
            ));
        }
        rings
    }

    /// The ring of the members data will live on: active and joining ones.
    pub fn target_ring(&self) -> Ring {
        Ring::with_tokens(
            self.members
                .iter()
                .filter(|m| m.role.holds_after())
                .map(LayoutMember::ring_entry),
            self.vnodes,
        )
    }

    /// Checks a layout from the network or disk before it is stored.
    pub fn validate(&self) -> Result<(), String> {
        if self.version == 0 {
            return Err("layout version 0".into());
        }
        if self.members.is_empty() {
            return Err(format!("layout v{} has no members", self.version));
        }
        if self.replicas == 0 || self.replicas > 64 || self.vnodes == 0 || self.vnodes > 4096 {
            return Err(format!(
                "layout v{} has replicas {} and vnodes {} (1..=64, 1..=4096)",
                self.version, self.replicas, self.vnodes
            ));
        }
        if self.members.len() > 1024 {
            return Err(format!(
                "layout v{} has {} members",
                self.version,
                self.members.len()
            ));
        }
        for member in &self.members {
            if member.address.is_empty() || member.address.len() > 256 {
                return Err(format!(
                    "layout v{} has a member with a bad address",
                    self.version
                ));
            }
            if member.member_id != member_id_for(&member.address) {
                return Err(format!(
                    "layout v{}: member {} has id {}, not its address's",
                    self.version, member.address, member.member_id
                ));
            }
            if member.tokens.len() != self.vnodes {
                return Err(format!(
                    "layout v{}: member {} has {} tokens, not {}",
                    self.version,
                    member.address,
                    member.tokens.len(),
                    self.vnodes
                ));
            }
        }
        let mut addresses: Vec<&str> = self.members.iter().map(|m| m.address.as_str()).collect();
        addresses.sort();
        addresses.dedup();
        if addresses.len() != self.members.len() {
            return Err(format!("layout v{} names a member twice", self.version));
        }
        if !self.members.iter().any(|m| m.role == Role::Active) {
            return Err(format!("layout v{} has no active member", self.version));
        }
        if let Some(stranger) = self.streamed.iter().find(|p| !self.is_member(p)) {
            return Err(format!(
                "layout v{}: streamed member {stranger} is not a member",
                self.version
            ));
        }
        if let Some(stranger) = self.previous.iter().find(|p| !self.is_member(p)) {
            return Err(format!(
                "layout v{}: previous member {stranger} is not a member",
                self.version
            ));
        }
        Ok(())
    }
}

fn new_member(address: &str, vnodes: usize, role: Role) -> LayoutMember {
    let member_id = member_id_for(address);
    LayoutMember {
        address: address.to_string(),
        member_id,
        role,
        tokens: tokens_for(member_id, vnodes),
        instance_id: InstanceId::NONE,
    }
}

/// A layout shared between the parts that read it.
pub type SharedLayout = Arc<Layout>;

#[cfg(test)]
mod change_tests;
#[cfg(test)]
mod tests;
