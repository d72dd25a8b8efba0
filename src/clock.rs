//! Versions and the Lamport clock that issues them.
//!
//! Every write carries a [`Version`] `(lamport, node_id)`. Versions are totally
//! ordered (by `lamport`, then `node_id`), so any two replicas that hold
//! different versions of a key agree on which one is newer, and "newest
//! version wins" is a deterministic merge rule.
//!
//! Each node keeps a [`LamportClock`]. Issuing a version ticks it; seeing a
//! version from elsewhere merges it (`max(local, seen) + 1` on the next tick).
//! A coordinator that learns from a replica that a newer version exists
//! observes it and re-stamps, which is how a write that starts after another
//! was acknowledged always gets the higher version.
//!
//! A restarted node must never issue a version it issued before its crash,
//! or two different values could carry the same version. The clock therefore
//! works under a persisted *ceiling*: before it issues a value above the
//! ceiling it asks its owner to persist a new ceiling (`lamport + LEASE`);
//! after a restart it resumes from the persisted ceiling. That costs one small
//! durable write per `LEASE` versions instead of one per write, and the
//! clock asks for the next ceiling when half the lease is left, so the owner
//! can persist it in the background: a node issuing versions normally never
//! waits for that fsync (it used to stall a node's writes for ~4 ms each
//! time).

use std::fmt;

/// The identity of a node: a 64-bit hash of its advertised address.
pub type NodeId = u64;

/// A write's version; ordered by `lamport`, then by `node_id`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    /// Lamport timestamp; the primary sort key.
    pub lamport: u64,
    /// The node that issued the version; breaks ties between equal timestamps.
    pub node_id: NodeId,
}

impl Version {
    pub const fn new(lamport: u64, node_id: NodeId) -> Self {
        Self { lamport, node_id }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{:016x}", self.lamport, self.node_id)
    }
}

/// The highest Lamport timestamp accepted from outside. Far beyond anything
/// a real cluster reaches (2^62 ticks), yet far enough from `u64::MAX` that a
/// clock merged with it can still tick; a version above it is refused as
/// invalid input, so one bogus message cannot exhaust every node's clock.
pub const MAX_LAMPORT: u64 = 1 << 62;

impl Version {
    /// Whether the version is within what DKVS accepts ([`MAX_LAMPORT`]).
    pub fn is_plausible(&self) -> bool {
        self.lamport <= MAX_LAMPORT
    }
}

/// How many versions a persisted ceiling covers (after a crash a node's
/// versions jump by up to this much).
pub const CEILING_LEASE: u64 = 100_000;

/// A Lamport clock with a persisted ceiling. Pure: the caller persists.
#[derive(Debug, Clone)]
pub struct LamportClock {
    /// The node this clock stamps versions for.
    node_id: NodeId,
    /// The last timestamp issued or observed.
    now: u64,
    /// No timestamp above this may be issued until a higher ceiling is persisted.
    ceiling: u64,
    /// A higher ceiling the owner is persisting in the background.
    renewing: Option<u64>,
}

/// A version ready to use, plus a ceiling the caller must persist *before*
/// using the version (when the clock ran past the old one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tick {
    /// The freshly issued version.
    pub version: Version,
    /// `Some(c)`: persist `c` durably, then use `version`.
    pub persist_ceiling: Option<u64>,
    /// `Some(c)`: the version may be used now; persist `c` in the background
    /// and report with [`LamportClock::renewed`] (or
    /// [`LamportClock::renewal_failed`]).
    pub renew_ceiling: Option<u64>,
}

impl LamportClock {
    /// A clock resuming after a restart: `persisted_ceiling` is the last
    /// ceiling saved (0 if none) and `max_seen` the highest timestamp found in
    /// stored data. It will only issue timestamps above both.
    pub fn recover(node_id: NodeId, persisted_ceiling: u64, max_seen: u64) -> Self {
        let start = persisted_ceiling.max(max_seen);
        Self {
            node_id,
            now: start,
            ceiling: start,
            renewing: None,
        }
    }

    /// The last timestamp issued or observed.
    pub fn now(&self) -> u64 {
        self.now
    }

    /// Merges a version seen elsewhere: the next tick will be above it.
    pub fn observe(&mut self, seen: Version) {
        self.now = self.now.max(seen.lamport);
    }

    /// Issues the next version; `None` once the clock is exhausted (it never
    /// repeats a version, and never wraps).
    pub fn tick(&mut self) -> Option<Tick> {
        let now = self.now.checked_add(1)?;
        let mut tick = Tick {
            version: Version::new(now, self.node_id),
            persist_ceiling: None,
            renew_ceiling: None,
        };
        if now > self.ceiling {
            self.ceiling = now.checked_add(CEILING_LEASE)?;
            tick.persist_ceiling = Some(self.ceiling);
        } else if self.renewing.is_none() && self.ceiling - now <= CEILING_LEASE / 2 {
            let next = now.checked_add(CEILING_LEASE)?;
            self.renewing = Some(next);
            tick.renew_ceiling = Some(next);
        }
        self.now = now;
        Some(tick)
    }

    /// A background renewal made `ceiling` durable.
    pub fn renewed(&mut self, ceiling: u64) {
        self.ceiling = self.ceiling.max(ceiling);
        if self.renewing == Some(ceiling) {
            self.renewing = None;
        }
    }

    /// A background renewal failed; a later tick asks again.
    pub fn renewal_failed(&mut self, ceiling: u64) {
        if self.renewing == Some(ceiling) {
            self.renewing = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_order_by_lamport_then_node() {
        assert!(Version::new(2, 1) > Version::new(1, 9));
        assert!(Version::new(2, 2) > Version::new(2, 1));
        assert_eq!(Version::new(3, 3), Version::new(3, 3));
    }

    #[test]
    fn ticks_increase_and_observe_jumps_ahead() {
        let mut clock = LamportClock::recover(7, 0, 0);
        let a = clock.tick().expect("tick").version;
        let b = clock.tick().expect("tick").version;
        assert!(b > a);
        clock.observe(Version::new(100, 9));
        let c = clock.tick().expect("tick").version;
        assert_eq!(c, Version::new(101, 7));
        // Observing something older changes nothing.
        clock.observe(Version::new(5, 1));
        assert_eq!(clock.tick().expect("tick").version.lamport, 102);
    }

    #[test]
    fn first_tick_and_every_lease_ask_for_a_ceiling() {
        let mut clock = LamportClock::recover(1, 0, 0);
        let first = clock.tick().expect("tick");
        assert_eq!(first.persist_ceiling, Some(1 + CEILING_LEASE));
        let mut asked = 0;
        for _ in 0..(CEILING_LEASE + 1) * 3 {
            if clock.tick().expect("tick").persist_ceiling.is_some() {
                asked += 1;
            }
        }
        assert_eq!(asked, 3);
    }

    #[test]
    fn recovered_clock_never_reissues() {
        let mut before = LamportClock::recover(1, 0, 0);
        let mut ceiling = 0;
        let mut last = Version::default();
        for _ in 0..25_000 {
            let tick = before.tick().expect("tick");
            if let Some(c) = tick.persist_ceiling {
                ceiling = c;
            }
            last = tick.version;
        }
        // Crash: only the ceiling survived (no data at all).
        let mut after = LamportClock::recover(1, ceiling, 0);
        assert!(after.tick().expect("tick").version > last);
        // Data newer than the ceiling (observed from peers) also counts.
        let mut after = LamportClock::recover(1, ceiling, ceiling + 50);
        assert_eq!(after.tick().expect("tick").version.lamport, ceiling + 51);
    }

    #[test]
    fn an_exhausted_clock_refuses_instead_of_repeating() {
        let mut clock = LamportClock::recover(1, 0, u64::MAX - 1);
        assert!(clock.tick().is_none(), "no room for a ceiling");
        let mut clock = LamportClock::recover(1, 0, 0);
        clock.observe(Version::new(u64::MAX, 2));
        assert!(clock.tick().is_none());
        assert!(Version::new(MAX_LAMPORT, 1).is_plausible());
        assert!(!Version::new(MAX_LAMPORT + 1, 1).is_plausible());
    }

    #[test]
    fn renews_in_the_background_before_the_ceiling_is_reached() {
        let mut clock = LamportClock::recover(1, 0, 0);
        let first = clock.tick().expect("tick");
        let ceiling = first.persist_ceiling.expect("first tick persists");
        let mut renewals = Vec::new();
        // Run well past the first ceiling, completing each renewal late
        // (after 1,000 more ticks): never a synchronous persist.
        let mut pending: Option<(u64, u64)> = None;
        for i in 0..CEILING_LEASE * 3 {
            let tick = clock.tick().expect("tick");
            assert_eq!(tick.persist_ceiling, None, "tick {i} had to wait");
            if let Some(c) = tick.renew_ceiling {
                assert!(pending.is_none(), "one renewal at a time");
                assert!(c > tick.version.lamport + CEILING_LEASE / 2);
                pending = Some((c, i + 1000));
                renewals.push(c);
            }
            if let Some((c, due)) = pending
                && i == due
            {
                clock.renewed(c);
                pending = None;
            }
        }
        assert!(renewals.len() >= 5, "renewed {} times", renewals.len());
        assert!(renewals[0] > ceiling);
        // A failed renewal is asked for again on the next tick.
        let mut clock = LamportClock::recover(1, 0, 0);
        clock.tick().expect("tick");
        let asked = (0..CEILING_LEASE)
            .find_map(|_| clock.tick().expect("tick").renew_ceiling)
            .expect("renewal asked");
        assert_eq!(clock.tick().expect("tick").renew_ceiling, None);
        clock.renewal_failed(asked);
        assert!(clock.tick().expect("tick").renew_ceiling.is_some());
        // Without renewals the clock still never passes a persisted ceiling.
        let mut clock = LamportClock::recover(1, 0, 0);
        let mut durable = 0;
        for _ in 0..CEILING_LEASE * 2 {
            let tick = clock.tick().expect("tick");
            if let Some(c) = tick.persist_ceiling {
                durable = c;
            }
            assert!(tick.version.lamport <= durable);
        }
    }

    #[test]
    fn observing_far_ahead_asks_to_persist_again() {
        let mut clock = LamportClock::recover(1, 0, 0);
        assert!(clock.tick().expect("tick").persist_ceiling.is_some());
        clock.observe(Version::new(1_000_000, 2));
        let tick = clock.tick().expect("tick");
        assert_eq!(tick.version.lamport, 1_000_001);
        assert_eq!(tick.persist_ceiling, Some(1_000_001 + CEILING_LEASE));
    }
}
