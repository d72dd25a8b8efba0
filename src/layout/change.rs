//! Every change is the same machine: old replica sets → target replica sets.
//!
//! A join, a leave and a remove differ only in which members a change marks
//! (see [`Role`]): the *old* sets are those of the members that held data
//! before (active, leaving, removing), the *target* sets those of the
//! members that will (active, joining). The steps are the join's (see the
//! module above):
//!
//! 1. **begin** (v+1): reads use the old sets; writes go to the old and the
//!    target sets, W acknowledgements in each. Every *gaining* member (one
//!    in a range's target set but not its old set) streams that range from
//!    the old replicas, then records itself in [`Layout::streamed`]
//!    ([`Layout::record_streamed`]); the last one to record moves the reads
//!    in the same version ([`Layout::finish`]).
//! 2. **reads moved** (`previous` names the old members): reads use the
//!    target sets, writes still reach the old ones too.
//! 3. **settled** ([`Layout::settle`]): writes go to the target sets only;
//!    members that left or were removed go on the removed list.
//!
//! The removal of a dead member may start while another change is still
//! streaming (step 1): it only shrinks the target sets, the old sets (which
//! reads use and which hold every acknowledged write) stay, and every gainer
//! streams again for the new target ([`Layout::move_key`] names it). A
//! member still joining is dropped as `cluster abort` drops it.

use super::{JOIN_ABORTED, Layout, Refusal, Removed, Role};
use crate::quorum::Consistency;
use crate::ring::Ring;

/// What [`Removed::why`] says of a member that left.
pub const LEFT: &str = "left";
/// What [`Removed::why`] says of a member removed while down.
pub const REMOVED: &str = "removed";
/// What [`Removed::why`] says of the members a forced new layout dropped.
pub const FORCED_OUT: &str = "dropped by --force-new-layout";

/// Why a member with `role` goes on the removed list when a move settles.
pub fn gone_why(role: Role) -> &'static str {
    if role == Role::Removing {
        REMOVED
    } else {
        LEFT
    }
}

/// One slice of the hash space whose old and target replica sets are each
/// one set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slice {
    /// Inclusive hash intervals.
    pub intervals: Vec<(u64, u64)>,
    /// The replicas before the change, in preference order.
    pub old: Vec<String>,
    /// The replicas after it.
    pub new: Vec<String>,
}

impl Slice {
    /// Members that gain the slice.
    pub fn gainers(&self) -> impl Iterator<Item = &String> {
        self.new.iter().filter(|a| !self.old.contains(a))
    }

    /// Fraction of the 2^64 hash space the slice is.
    pub fn share(&self) -> f64 {
        self.intervals
            .iter()
            .map(|&(first, last)| ((last - first) as f64 + 1.0) / 18_446_744_073_709_551_616.0)
            .sum()
    }
}

/// Whether `address` is in `set`.
fn has(set: &[String], address: &str) -> bool {
    set.iter().any(|a| a == address)
}

impl Layout {
    /// The ring of the members that held data before the change.
    pub fn old_ring(&self) -> Ring {
        Ring::with_tokens(
            self.members
                .iter()
                .filter(|m| m.role.holds_before())
                .map(super::LayoutMember::ring_entry),
            self.vnodes,
        )
    }

    /// N for the old and the target ring.
    pub fn n_old_new(&self) -> (usize, usize) {
        let old = self
            .members
            .iter()
            .filter(|m| m.role.holds_before())
            .count();
        let new = self.members.iter().filter(|m| m.role.holds_after()).count();
        (self.replicas.min(old), self.replicas.min(new))
    }

    /// The hash space cut where either ring changes hands, with each
    /// slice's old and target replicas (empty when nothing changes).
    pub fn slices(&self) -> Vec<Slice> {
        if self.in_progress().is_none() || self.reads_moved() {
            return Vec::new();
        }
        let (old, new) = (self.old_ring(), self.target_ring());
        let (n_old, n_new) = self.n_old_new();
        // Every member's tokens: the finest cut of both rings.
        let all = Ring::with_tokens(
            self.members.iter().map(super::LayoutMember::ring_entry),
            self.vnodes,
        );
        let names = |ring: &Ring, range: usize, n: usize| -> Vec<String> {
            ring.range_replicas(range, n)
                .iter()
                .map(|m| m.address.clone())
                .collect()
        };
        let mut slices = Vec::with_capacity(all.range_count());
        for range in 0..all.range_count() {
            let intervals = all.range_hashes(range);
            let Some(&(_, last)) = intervals.first() else {
                continue;
            };
            slices.push(Slice {
                old: names(&old, old.range_of(last), n_old),
                new: names(&new, new.range_of(last), n_new),
                intervals,
            });
        }
        slices
    }

    /// The one old replica giving `slice` up, when exactly one does, both
    /// sets are full and it is not being removed (it is down): every
    /// acknowledged write is on W old replicas, so either on W that stay,
    /// or on the giver and W−1 that stay, and streaming from the giver
    /// alone leaves it on W new replicas.
    pub fn giver_of(&self, slice: &Slice) -> Option<String> {
        let (n_old, n_new) = self.n_old_new();
        let leaving: Vec<&String> = slice.old.iter().filter(|a| !has(&slice.new, a)).collect();
        match leaving.as_slice() {
            [one]
                if slice.old.len() == n_old
                    && slice.new.len() == n_new
                    && self.member(one).is_some_and(|m| m.role != Role::Removing) =>
            {
                Some((*one).clone())
            }
            _ => None,
        }
    }

    /// The old replicas a gainer may stream `slice` from: all but those
    /// being removed (they are down).
    pub fn sources_of(&self, slice: &Slice) -> Vec<String> {
        slice
            .old
            .iter()
            .filter(|a| self.member(a).is_none_or(|m| m.role != Role::Removing))
            .cloned()
            .collect()
    }

    /// The members that must stream ranges before reads move, sorted.
    pub fn gainers(&self) -> Vec<String> {
        let mut gainers: Vec<String> = self
            .slices()
            .iter()
            .flat_map(|s| s.gainers().cloned().collect::<Vec<_>>())
            .collect();
        gainers.sort();
        gainers.dedup();
        gainers
    }

    /// The gainers that have not streamed yet.
    pub fn waiting_for_streams(&self) -> Vec<String> {
        self.gainers()
            .into_iter()
            .filter(|g| !has(&self.streamed, g))
            .collect()
    }

    /// Names the change and its target sets: what a gainer's stream is
    /// for. It changes when a remove shrinks the target mid-change (every
    /// gainer then streams again), not when another gainer records its
    /// stream; two changes with the same members and roles (a leave, its
    /// abort, the same leave again) differ by the version that began them.
    pub fn move_key(&self) -> u64 {
        let mut text = format!("{};", self.target_since);
        for member in &self.members {
            text.push_str(&member.address);
            text.push(':');
            text.push_str(member.role.name());
            text.push(';');
        }
        xxhash_rust::xxh3::xxh3_64(text.as_bytes())
    }

    /// v+1 recording that gainer `address` streamed its ranges for the
    /// change named `move_key`; when it is the last, reads move in the same
    /// version. Refused when the change is another by now.
    pub fn record_streamed(&self, address: &str, move_key: u64) -> Result<Layout, Refusal> {
        if self.reads_moved() || self.in_progress().is_none() || self.move_key() != move_key {
            return Err(Refusal::Invalid(format!(
                "the change {address} streamed for is no longer in progress (layout v{}: {})",
                self.version, self.change
            )));
        }
        let mut recorded = self.clone();
        if !has(&recorded.streamed, address) {
            recorded.streamed.push(address.to_string());
            recorded.streamed.sort();
        }
        if recorded.waiting_for_streams().is_empty() {
            return recorded.finish();
        }
        let mut next = self.next(format!(
            "{}: {address} streamed its ranges",
            self.change_name()
        ));
        next.streamed = recorded.streamed;
        Ok(next)
    }

    /// v+1 with reads on the target sets; the old sets keep getting writes
    /// until [`Layout::settle`]. Joiners become active; leaving members
    /// stay, named in `previous`.
    pub fn finish(&self) -> Result<Layout, Refusal> {
        if self.in_progress().is_none() || self.reads_moved() {
            return Err(Refusal::Invalid(format!(
                "layout v{} has no change whose reads could move",
                self.version
            )));
        }
        let joined: Vec<String> = self.joining().map(|m| m.address.clone()).collect();
        let change = if joined.is_empty() {
            format!("{}: reads moved", self.change_name())
        } else {
            format!("{} finished joining", joined.join(", "))
        };
        let mut next = self.next(change);
        next.previous = self
            .members
            .iter()
            .filter(|m| m.role.holds_before())
            .map(|m| m.address.clone())
            .collect();
        for member in &mut next.members {
            if member.role == Role::Joining {
                member.role = Role::Active;
            }
        }
        next.streamed.clear();
        next.written_off.clear();
        Ok(next)
    }

    /// What the change in progress is, without its steps ("127.0.0.1:7003
    /// leaves").
    pub fn change_name(&self) -> String {
        // A joiner with a member's tokens replaces it (`--replace`).
        let replaced = |joiner: &super::LayoutMember| {
            self.members
                .iter()
                .find(|m| m.role == Role::Removing && m.tokens == joiner.tokens)
        };
        let mut parts = Vec::new();
        for member in &self.members {
            match member.role {
                Role::Active => {}
                Role::Joining => match replaced(member) {
                    Some(dead) => {
                        parts.push(format!("{} replaces {}", member.address, dead.address))
                    }
                    None => parts.push(format!("{} joins", member.address)),
                },
                Role::Removing
                    if self
                        .members
                        .iter()
                        .any(|j| j.role == Role::Joining && j.tokens == member.tokens) => {}
                Role::Leaving => parts.push(format!("{} leaves", member.address)),
                Role::Removing => parts.push(format!("{} is removed", member.address)),
            }
        }
        if parts.is_empty() {
            self.change.clone()
        } else {
            parts.join(", ")
        }
    }

    /// v+1 with the active member `address` leaving. Refused while
    /// another change is in progress, and when fewer than N members would
    /// be left unless `force`.
    pub fn begin_leave(&self, address: &str, force: bool) -> Result<Layout, Refusal> {
        let Some(member) = self.member(address) else {
            return Err(Refusal::Invalid(format!(
                "{address} is not a member (layout v{})",
                self.version
            )));
        };
        if member.role == Role::Leaving {
            return Err(Refusal::Invalid(format!(
                "{address} is already leaving (layout v{})",
                self.version
            )));
        }
        self.refuse_if_busy()?;
        let left = self.members.len() - 1;
        if left == 0 {
            return Err(Refusal::Invalid(format!(
                "{address} is the only member: a cluster cannot leave itself"
            )));
        }
        if left < self.replicas && !force {
            return Err(Refusal::Invalid(format!(
                "{address} cannot leave: {left} member(s) would be left, fewer than N = {} replicas \
                 (every key would lose a copy for good). Add a node first, or pass --force to run with fewer copies",
                self.replicas
            )));
        }
        let mut next = self.next(format!("{address} leaves"));
        next.target_since = next.version;
        for m in &mut next.members {
            if m.address == address {
                m.role = Role::Leaving;
            }
        }
        Ok(next)
    }

    /// v+1 with member `address` (believed down) being removed. Accepted
    /// while another change streams: that change goes on without it (a
    /// joiner is dropped, as `cluster abort` does). Refused once reads
    /// moved (the move settles by itself without waiting for a dead
    /// member), for the last active member, and when a range would be
    /// rebuilt from fewer than N−W+1 surviving old replicas unless
    /// `allow_data_loss`. `up` says which members are believed up.
    pub fn begin_remove(
        &self,
        address: &str,
        allow_data_loss: bool,
        up: impl Fn(&str) -> bool,
    ) -> Result<Layout, Refusal> {
        let Some(member) = self.member(address) else {
            return Err(Refusal::Invalid(format!(
                "{address} is not a member (layout v{})",
                self.version
            )));
        };
        if self.reads_moved() {
            return Err(Refusal::InProgress {
                change: self.change.clone(),
                version: self.version,
            });
        }
        if member.role == Role::Removing {
            return Err(Refusal::Invalid(format!(
                "{address} is already being removed (layout v{})",
                self.version
            )));
        }
        let version = self.version + 1;
        let mut next = self.next(format!("{address} is removed"));
        if member.role == Role::Joining {
            next.removed.push(Removed {
                address: address.to_string(),
                instance_id: member.instance_id,
                version,
                why: JOIN_ABORTED.into(),
            });
            next.members.retain(|m| m.address != address);
            next.change = format!("{address} {JOIN_ABORTED}");
        } else {
            for m in &mut next.members {
                if m.address == address {
                    m.role = Role::Removing;
                }
            }
        }
        if !next.members.iter().any(|m| m.role.holds_after()) {
            return Err(Refusal::Invalid(format!(
                "{address} is the last member that would hold data: add a node before removing it"
            )));
        }
        let short = next.short_copies(&up);
        if !short.is_empty() && !allow_data_loss {
            return Err(Refusal::Invalid(short_copies_refusal(
                address, &next, &short,
            )));
        }
        next.streamed.clear();
        next.target_since = next.version;
        next.write_off(&short, &up);
        next.change = if next.in_progress().is_some() {
            next.change_name()
        } else {
            next.change
        };
        Ok(next)
    }

    /// Refuses a member whose ring tokens another member holds (the node
    /// that replaced the member that used to be at `address`).
    pub(super) fn refuse_token_collision(
        &self,
        address: &str,
        tokens: &[u64],
    ) -> Result<(), Refusal> {
        match self
            .members
            .iter()
            .find(|m| m.address != address && m.tokens.iter().any(|t| tokens.contains(t)))
        {
            Some(holder) => Err(Refusal::Invalid(format!(
                "{address}'s ring tokens are held by {}, which replaced the member that was at {address}: \
                 join at another address",
                holder.address
            ))),
            None => Ok(()),
        }
    }

    /// v+1 in which the new node `address` (instance `instance`) takes
    /// the place of the dead member `dead`: `dead` is being removed and
    /// `address` joins with its ring tokens, in one change (so only
    /// `address` gains ranges, exactly `dead`'s). Refused while another
    /// change is in progress, for a member believed up unless `force`,
    /// and as [`Layout::begin_remove`] refuses for lack of copies.
    pub fn begin_replace(
        &self,
        dead: &str,
        address: &str,
        instance: crate::clock::InstanceId,
        force: bool,
        up: impl Fn(&str) -> bool,
    ) -> Result<Layout, Refusal> {
        let Some(member) = self.member(dead) else {
            return Err(Refusal::Invalid(format!(
                "{dead} is not a member (layout v{}): nothing to replace; join with --join alone",
                self.version
            )));
        };
        if member.role != Role::Active {
            return Err(Refusal::Invalid(format!(
                "{dead} is {} (layout v{}), not an active member: it cannot be replaced",
                member.role.name(),
                self.version
            )));
        }
        if up(dead) && !force {
            return Err(Refusal::Invalid(format!(
                "{dead} is up: replace only a dead member (use `cluster leave {dead}` for a live one)"
            )));
        }
        let tokens = member.tokens.clone();
        let mut next = self.begin_join_as(address, instance)?;
        next.change = format!("{address} replaces {dead}");
        for m in &mut next.members {
            if m.address == dead {
                m.role = Role::Removing;
            }
            if m.address == address {
                m.tokens = tokens.clone();
            }
        }
        let short = next.short_copies(&up);
        if !short.is_empty() {
            return Err(Refusal::Invalid(short_copies_refusal(dead, &next, &short)));
        }
        Ok(next)
    }

    /// `DKVSServer --force-new-layout --allow-data-loss` on the survivor
    /// `address` (instance `instance`) of a cluster whose majority is lost
    /// for good: v+1 with that node the only member (its tokens kept) and
    /// every other member on the removed list. Offline and unverified by
    /// anyone: the caller makes sure a majority of the voters is gone.
    pub fn force_survivor(
        &self,
        address: &str,
        instance: crate::clock::InstanceId,
    ) -> Result<Layout, Refusal> {
        let Some(me) = self.member(address) else {
            return Err(Refusal::Invalid(format!(
                "{address} is not a member of the layout it holds (v{}): it cannot start a new layout",
                self.version
            )));
        };
        if me.role == Role::Joining {
            return Err(Refusal::Invalid(format!(
                "{address} is still joining in layout v{}: it does not hold its ranges, start the new layout from another survivor",
                self.version
            )));
        }
        let version = self.version + 1;
        let mut next = self.next(format!(
            "new layout forced from {address} (--force-new-layout --allow-data-loss: the other members were lost)"
        ));
        for member in self.members.iter().filter(|m| m.address != address) {
            next.removed.push(Removed {
                address: member.address.clone(),
                instance_id: member.instance_id,
                version,
                why: FORCED_OUT.into(),
            });
        }
        next.members.retain(|m| m.address == address);
        for member in &mut next.members {
            member.role = Role::Active;
            if member.instance_id.is_none() {
                member.instance_id = instance;
            }
        }
        next.previous.clear();
        next.streamed.clear();
        next.written_off.clear();
        Ok(next)
    }

    /// Sets `written_off` for a remove with `--allow-data-loss`: copies
    /// written off earlier in this change stay so only while their members
    /// are down, and the members down now that hold a `short` slice join.
    fn write_off(&mut self, short: &[(Slice, usize)], up: &impl Fn(&str) -> bool) {
        let next = self;
        // Copies written off earlier in this change stay written off only
        // while their members are still down.
        let still_down: Vec<String> = next
            .written_off
            .iter()
            .filter(|m| !up(m) && next.is_member(m))
            .cloned()
            .collect();
        next.written_off = still_down;
        // Only the copies of the members down now are written off, and
        // only for the ranges they hold: every other range still needs
        // N−W+1 sources.
        for (slice, _) in short {
            for member in &slice.old {
                let role = next.member(member).map(|m| m.role);
                if role != Some(Role::Removing) && !up(member) && !has(&next.written_off, member) {
                    next.written_off.push(member.clone());
                }
            }
        }
        next.written_off.sort();
    }

    /// The slices a gainer would rebuild from fewer than N−W+1 old
    /// replicas that survive (believed up, not being removed), with the
    /// copies left.
    pub fn short_copies(&self, up: impl Fn(&str) -> bool) -> Vec<(Slice, usize)> {
        let (n_old, _) = self.n_old_new();
        let needed = n_old - Consistency::Quorum.required(n_old) + 1;
        let removing = |a: &str| self.member(a).is_some_and(|m| m.role == Role::Removing);
        self.slices()
            .into_iter()
            .filter(|s| s.gainers().next().is_some())
            .filter_map(|s| {
                let left = s.old.iter().filter(|a| !removing(a) && up(a)).count();
                (left < needed).then_some((s, left))
            })
            .collect()
    }
}

/// Why a remove is refused for lack of surviving copies, naming slices.
fn short_copies_refusal(address: &str, next: &Layout, short: &[(Slice, usize)]) -> String {
    let (n_old, _) = next.n_old_new();
    let needed = n_old - Consistency::Quorum.required(n_old) + 1;
    let share: f64 = short.iter().map(|(s, _)| s.share()).sum();
    let examples: Vec<String> = short
        .iter()
        .take(3)
        .map(|(s, left)| {
            let (first, last) = s.intervals[0];
            format!(
                "{first:016x}..={last:016x} held by {} ({left} cop{} up)",
                s.old.join(", "),
                if *left == 1 { "y" } else { "ies" }
            )
        })
        .collect();
    format!(
        "removing {address} would rebuild {} range(s) ({:.1}% of the keys) from fewer than the {needed} surviving copies \
         that guarantee no acknowledged write is lost: {}{}. Bring a replica back up, or pass --allow-data-loss",
        short.len(),
        share * 100.0,
        examples.join("; "),
        if short.len() > 3 { "; ..." } else { "" }
    )
}
