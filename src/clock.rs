//! Versions and the hybrid logical clock (HLC) that issues them.
//!
//! Every write carries a [`Version`] `(lamport, node_id)`. Versions are totally
//! ordered (by `lamport`, then `node_id`), so any two replicas that hold
//! different versions of a key agree on which one is newer, and "newest
//! version wins" is a deterministic merge rule.
//!
//! `lamport` is a hybrid logical clock, as in CockroachDB and MongoDB: its
//! upper 48 bits are milliseconds since the Unix epoch, its lower 16 a
//! logical counter. A node issues `max(last + 1, now_ms << 16)`, where `last`
//! is the highest timestamp it issued or saw (every version a replica stores,
//! every reply, every heartbeat is merged in). So it is still a Lamport clock
//! — a coordinator that learns of a newer version re-stamps above it — and
//! it also follows wall time: a write that begins more than the clock skew
//! after another gets the higher version *whichever node coordinates it*,
//! even a node that saw neither. Plain Lamport counters do not grow with
//! time, and that is what made purging tombstones unsafe: a node with a low
//! counter could stamp a new write below a tombstone a replica still held.
//!
//! Skew has a bound, `--max-clock-skew-ms`. A version whose physical part is
//! further ahead of this machine's *wall clock* (never its HLC, which may
//! already have merged something bad) is refused at every door
//! ([`SkewBound::check`]), so one hostile message cannot drag every clock in
//! the cluster into the far future; and a node never issues a version its
//! peers would refuse ([`HybridClock::tick`] fails instead).
//!
//! A restarted node must never issue a version it issued before its crash,
//! or two different values could carry the same version. The clock works
//! under a persisted *ceiling*, in physical time: `(now_ms + lease) << 16`.
//! It asks its owner to renew the ceiling in the background when half the
//! lease is left, so a node issuing versions normally never waits for that
//! fsync; only a tick past the ceiling (the wall clock is not advancing, or a
//! peer's clock is ahead by more than half the lease) persists synchronously.
//! After a restart the clock resumes above the larger of the ceiling and the
//! highest stored version. Old data dirs, whose versions were plain small
//! counters, keep working: their versions are simply older.

use std::fmt;

/// A node's instance: random, made with its data dir and kept there (see
/// `crate::identity`). Versions carry it to break ties between equal
/// timestamps; a node whose data dir was lost comes back as a new instance,
/// so it never issues a version its predecessor issued. Not its place on
/// the ring: that is [`crate::ring::MemberId`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InstanceId(pub u64);

impl InstanceId {
    /// No instance: what a node knows at an address it never heard from,
    /// and what nodes of releases before instance ids send.
    pub const NONE: InstanceId = InstanceId(0);

    pub fn is_none(self) -> bool {
        self == Self::NONE
    }
}

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A write's version; ordered by `lamport`, then by `node_id`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    /// Hybrid logical timestamp (ms << 16 | counter); the primary sort key.
    /// The wire calls it `lamport` (versions began as Lamport pairs).
    pub hlc: u64,
    /// The instance that issued the version; breaks ties between equal
    /// timestamps. The wire calls it `node_id`.
    pub instance_id: InstanceId,
}

/// Bits of an HLC timestamp that count within one millisecond.
pub const LOGICAL_BITS: u32 = 16;

/// Versions whose physical part is below this (2001-09-09) were issued by a
/// plain Lamport counter (data dirs older than the HLC): they carry no time.
pub const FIRST_HLC_MS: u64 = 1_000_000_000_000;

impl Version {
    /// A version from its raw parts, as the wire and the disk carry them.
    pub const fn new(hlc: u64, instance_id: u64) -> Self {
        Self {
            hlc,
            instance_id: InstanceId(instance_id),
        }
    }

    /// The wall-clock part: milliseconds since the Unix epoch (0-ish for
    /// versions from a plain Lamport counter, see [`FIRST_HLC_MS`]).
    pub const fn physical_ms(&self) -> u64 {
        self.hlc >> LOGICAL_BITS
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.hlc, self.instance_id)
    }
}

/// `now_ms` as an HLC timestamp with a zero counter.
pub const fn hlc_of_ms(now_ms: u64) -> u64 {
    now_ms.saturating_mul(1 << LOGICAL_BITS)
}

/// Default `--max-clock-skew-ms`: a minute, like CockroachDB's default of
/// 500 ms times a margin for hosts without tight NTP.
pub const DEFAULT_MAX_CLOCK_SKEW_MS: u64 = 60_000;

/// How far ahead of the wall clock a stored version must be to count as
/// impossible (see [`SkewBound::check_stored`]): a day.
pub const IMPOSSIBLE_AHEAD_MS: u64 = 86_400_000;

/// The furthest ahead of this machine's wall clock a version may be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SkewBound {
    /// `--max-clock-skew-ms`.
    pub max_skew_ms: u64,
}

impl Default for SkewBound {
    fn default() -> Self {
        Self {
            max_skew_ms: DEFAULT_MAX_CLOCK_SKEW_MS,
        }
    }
}

/// Why [`SkewBound::refuse_now`] refused a version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No node can have issued it: further ahead than any clock can be.
    Impossible(String),
    /// Merely beyond the bound: a peer's clock, or this node's, may be off,
    /// so retrying later may succeed.
    BeyondBound(String),
}

impl SkewBound {
    pub const fn new(max_skew_ms: u64) -> Self {
        Self { max_skew_ms }
    }

    /// Whether `version` is acceptable when the wall clock reads `now_ms`;
    /// the error says by how much it is ahead and names the flag.
    pub fn check(&self, version: Version, now_ms: u64) -> Result<(), String> {
        let limit = now_ms.saturating_add(self.max_skew_ms);
        if version.physical_ms() > limit {
            return Err(format!(
                "version {version} is {} ms ahead of this node's wall clock, more than --max-clock-skew-ms ({} ms); \
                 check the clocks (NTP) of the cluster's hosts",
                version.physical_ms() - now_ms,
                self.max_skew_ms
            ));
        }
        Ok(())
    }

    /// Whether a *stored* version is impossible: further ahead of the wall
    /// clock than any version DKVS can have accepted (the skew bound, or a
    /// day, whichever is larger — lamport 2^62 is in the year 4200). A
    /// stored version beyond [`SkewBound::check`] but not impossible is
    /// genuine (the wall clock stepped back since it was accepted): it
    /// still wins over older versions and is merged into the clock.
    pub fn check_stored(&self, version: Version, now_ms: u64) -> Result<(), String> {
        let allowed = self.max_skew_ms.max(IMPOSSIBLE_AHEAD_MS);
        if version.physical_ms() > now_ms.saturating_add(allowed) {
            return Err(format!(
                "version {version} is {} ms ahead of this node's wall clock: no node can have issued it",
                version.physical_ms() - now_ms
            ));
        }
        Ok(())
    }

    /// [`SkewBound::check`] against the wall clock now, as a [`Refusal`]
    /// (which the error type turns into `InvalidArgument` or `ClockSkew`).
    pub fn refuse_now(&self, version: Version, what: &str) -> Result<(), Refusal> {
        let now_ms = wall_clock_ms();
        match self.check(version, now_ms) {
            Ok(()) => Ok(()),
            Err(why) if self.check_stored(version, now_ms).is_err() => {
                Err(Refusal::Impossible(format!("{what}{why}")))
            }
            Err(why) => Err(Refusal::BeyondBound(format!("{what}{why}"))),
        }
    }

    /// [`SkewBound::check`] against the wall clock now.
    pub fn check_now(&self, version: Version) -> Result<(), String> {
        self.check(version, wall_clock_ms())
    }

    /// The lease a clock under this bound persists its ceiling for: a
    /// quarter of the bound, at most 2 s and at least 1 ms. A restarted node
    /// resumes at its ceiling, up to a lease ahead of wall time, and
    /// heartbeats carry that to its peers: a short lease keeps the cluster's
    /// clocks close to wall time, for one small background fsync a second.
    pub fn ceiling_lease_ms(&self) -> u64 {
        (self.max_skew_ms / 4).clamp(1, 2_000)
    }
}

/// Milliseconds since the Unix epoch, by this machine's wall clock (or a
/// simulation's, see [`crate::seams`]).
pub fn wall_clock_ms() -> u64 {
    crate::seams::wall_clock_ms()
}

/// Why the clock cannot issue a version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClockError {
    /// The next version would be further ahead of the wall clock than peers
    /// accept (something ahead was merged, or the wall clock went back).
    AheadOfWallClock {
        next: u64,
        now_ms: u64,
        max_skew_ms: u64,
    },
    /// No room left below `u64::MAX`.
    Exhausted,
}

impl fmt::Display for ClockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClockError::AheadOfWallClock {
                next,
                now_ms,
                max_skew_ms,
            } => write!(
                f,
                "the next version ({next}) would be {} ms ahead of this node's wall clock, more than \
                 --max-clock-skew-ms ({max_skew_ms} ms) allows: peers would refuse it. Check this host's clock (NTP)",
                (next >> LOGICAL_BITS).saturating_sub(*now_ms)
            ),
            ClockError::Exhausted => f.write_str("the clock is exhausted (u64::MAX)"),
        }
    }
}

/// A hybrid logical clock with a persisted ceiling. Pure: the caller reads
/// the wall clock and persists.
#[derive(Debug, Clone)]
pub struct HybridClock {
    /// The instance this clock stamps versions for.
    instance_id: InstanceId,
    /// The last timestamp issued or observed.
    last: u64,
    /// No timestamp above this may be issued until a higher ceiling is persisted.
    ceiling: u64,
    /// A higher ceiling the owner is persisting in the background.
    renewing: Option<u64>,
    /// What the clock accepts and issues.
    bound: SkewBound,
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
    /// and report with [`HybridClock::renewed`] (or
    /// [`HybridClock::renewal_failed`]).
    pub renew_ceiling: Option<u64>,
}

impl HybridClock {
    /// A clock resuming after a restart: `persisted_ceiling` is the last
    /// ceiling saved (0 if none) and `max_seen` the highest timestamp found in
    /// stored data (within the bound). It will only issue timestamps above both.
    pub fn recover(
        instance_id: InstanceId,
        persisted_ceiling: u64,
        max_seen: u64,
        bound: SkewBound,
    ) -> Self {
        let start = persisted_ceiling.max(max_seen);
        Self {
            instance_id,
            last: start,
            ceiling: start,
            renewing: None,
            bound,
        }
    }

    /// The last timestamp issued or observed.
    pub fn now(&self) -> u64 {
        self.last
    }

    /// The bound this clock works under.
    pub fn bound(&self) -> SkewBound {
        self.bound
    }

    /// Merges a version seen elsewhere: the next tick will be above it. A
    /// version beyond the skew bound is not merged (answers false): callers
    /// check at the door, this is the last line.
    pub fn observe(&mut self, seen: Version, now_ms: u64) -> bool {
        if self.bound.check(seen, now_ms).is_err() {
            return false;
        }
        self.last = self.last.max(seen.hlc);
        true
    }

    /// The ceiling to persist for a clock at `timestamp` when the wall clock
    /// reads `now_ms`: a lease ahead of the wall clock (never below the
    /// timestamp itself). Not a lease ahead of the timestamp: after a restart
    /// the clock resumes *at* its old ceiling, and a ceiling counted from
    /// there would move a lease further ahead of wall time with every crash.
    fn ceiling_for(&self, timestamp: u64, now_ms: u64) -> Option<u64> {
        let ceiling = now_ms
            .checked_add(self.bound.ceiling_lease_ms())?
            .checked_mul(1 << LOGICAL_BITS)?;
        Some(ceiling.max(timestamp))
    }

    /// Issues the next version: `max(last + 1, now_ms << 16)`. Fails rather
    /// than issue a version peers would refuse, or one that could repeat.
    pub fn tick(&mut self, now_ms: u64) -> Result<Tick, ClockError> {
        let next = self
            .last
            .checked_add(1)
            .ok_or(ClockError::Exhausted)?
            .max(hlc_of_ms(now_ms));
        let version = Version {
            hlc: next,
            instance_id: self.instance_id,
        };
        if self.bound.check(version, now_ms).is_err() {
            return Err(ClockError::AheadOfWallClock {
                next,
                now_ms,
                max_skew_ms: self.bound.max_skew_ms,
            });
        }
        let mut tick = Tick {
            version,
            persist_ceiling: None,
            renew_ceiling: None,
        };
        let half_lease = hlc_of_ms(self.bound.ceiling_lease_ms() / 2);
        if next > self.ceiling {
            let ceiling = self
                .ceiling_for(next, now_ms)
                .ok_or(ClockError::Exhausted)?;
            self.ceiling = ceiling;
            tick.persist_ceiling = Some(ceiling);
        } else if self.renewing.is_none() && self.ceiling - next <= half_lease {
            let ceiling = self
                .ceiling_for(next, now_ms)
                .ok_or(ClockError::Exhausted)?;
            if ceiling > self.ceiling {
                self.renewing = Some(ceiling);
                tick.renew_ceiling = Some(ceiling);
            }
        }
        self.last = next;
        Ok(tick)
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

    /// A wall-clock reading in 2025.
    const T0: u64 = 1_750_000_000_000;

    fn fresh() -> HybridClock {
        HybridClock::recover(InstanceId(7), 0, 0, SkewBound::default())
    }

    #[test]
    fn versions_order_by_hlc_then_instance() {
        assert!(Version::new(2, 1) > Version::new(1, 9));
        assert!(Version::new(2, 2) > Version::new(2, 1));
        assert_eq!(Version::new(3, 3), Version::new(3, 3));
        assert_eq!(Version::new(hlc_of_ms(T0) + 5, 1).physical_ms(), T0);
    }

    #[test]
    fn ticks_follow_wall_time_and_merge_what_they_see() {
        let mut clock = fresh();
        let a = clock.tick(T0).expect("tick").version;
        assert_eq!(a.hlc, hlc_of_ms(T0));
        // Same millisecond: the counter moves.
        let b = clock.tick(T0).expect("tick").version;
        assert_eq!(b.hlc, hlc_of_ms(T0) + 1);
        // Time moves: the physical part follows it.
        let c = clock.tick(T0 + 10).expect("tick").version;
        assert_eq!(c.hlc, hlc_of_ms(T0 + 10));
        // A peer slightly ahead: the next tick is above what it saw.
        let seen = Version::new(hlc_of_ms(T0 + 500) + 3, 9);
        assert!(clock.observe(seen, T0 + 10));
        assert_eq!(clock.tick(T0 + 11).expect("tick").version.hlc, seen.hlc + 1);
        // Something older changes nothing.
        assert!(clock.observe(Version::new(5, 1), T0 + 11));
        assert_eq!(clock.tick(T0 + 11).expect("tick").version.hlc, seen.hlc + 2);
    }

    #[test]
    fn a_low_clock_node_still_stamps_above_an_old_version() {
        // The reason for the HLC: node D stamped a tombstone after 1,500
        // writes; node E, which saw none of them, writes a second later.
        let mut d = fresh();
        for _ in 0..1500 {
            d.tick(T0).expect("tick");
        }
        let tombstone = d.tick(T0).expect("tick").version;
        let mut e = HybridClock::recover(InstanceId(8), 0, 0, SkewBound::default());
        let later = e.tick(T0 + 1000).expect("tick").version;
        assert!(later > tombstone, "{later} must beat {tombstone}");
    }

    #[test]
    fn versions_beyond_the_skew_bound_are_refused_and_not_merged() {
        let bound = SkewBound::new(60_000);
        let ahead = Version::new(hlc_of_ms(T0 + 60_001), 1);
        let error = bound.check(ahead, T0).expect_err("too far ahead");
        assert!(error.contains("--max-clock-skew-ms"), "{error}");
        assert!(
            bound
                .check(Version::new(hlc_of_ms(T0 + 60_000), 1), T0)
                .is_ok()
        );
        // The hostile message of the issue: lamport 2^62, or u64::MAX.
        for lamport in [1u64 << 62, u64::MAX] {
            let mut clock = fresh();
            assert!(!clock.observe(Version::new(lamport, 2), T0));
            assert_eq!(
                clock.tick(T0).expect("still ticks").version.hlc,
                hlc_of_ms(T0)
            );
        }
    }

    #[test]
    fn the_clock_fails_rather_than_issue_what_peers_refuse() {
        // Recovered above the bound (the wall clock went back a long way).
        let mut clock = HybridClock::recover(
            InstanceId(1),
            0,
            hlc_of_ms(T0 + 120_000),
            SkewBound::default(),
        );
        let error = clock.tick(T0).expect_err("ahead of wall clock");
        assert!(matches!(error, ClockError::AheadOfWallClock { .. }));
        assert!(error.to_string().contains("--max-clock-skew-ms"), "{error}");
        // Once the wall clock catches up it works again.
        assert!(clock.tick(T0 + 60_001).is_ok());
        let mut clock = HybridClock::recover(InstanceId(1), 0, u64::MAX, SkewBound::new(u64::MAX));
        assert_eq!(clock.tick(T0), Err(ClockError::Exhausted));
    }

    #[test]
    fn the_ceiling_is_in_physical_time_and_renewed_in_the_background() {
        let bound = SkewBound::default();
        let lease = bound.ceiling_lease_ms();
        assert!(lease <= bound.max_skew_ms / 4);
        let mut clock = fresh();
        let first = clock.tick(T0).expect("tick");
        assert_eq!(first.persist_ceiling, Some(hlc_of_ms(T0 + lease)));
        // Ticking as time passes: never a synchronous persist while the
        // renewals (completed late, a few ms after they are asked) keep up.
        let mut pending: Option<(u64, u64)> = None;
        let mut renewals = 0;
        for ms in 0..lease * 5 {
            let now = T0 + ms;
            let tick = clock.tick(now).expect("tick");
            assert_eq!(tick.persist_ceiling, None, "at +{ms} ms a tick had to wait");
            if let Some(c) = tick.renew_ceiling {
                assert!(pending.is_none(), "one renewal at a time");
                assert!(c >= hlc_of_ms(now + lease));
                pending = Some((c, ms + 5));
                renewals += 1;
            }
            if let Some((c, due)) = pending
                && ms == due
            {
                clock.renewed(c);
                pending = None;
            }
        }
        assert!(renewals >= 9, "renewed {renewals} times");
        // A failed renewal is asked for again on the next tick.
        let mut clock = fresh();
        clock.tick(T0).expect("tick");
        let asked = (0..lease)
            .find_map(|ms| clock.tick(T0 + ms).expect("tick").renew_ceiling)
            .expect("renewal asked");
        assert_eq!(
            clock.tick(T0 + lease / 2 + 1).expect("tick").renew_ceiling,
            None
        );
        clock.renewal_failed(asked);
        assert!(
            clock
                .tick(T0 + lease / 2 + 2)
                .expect("tick")
                .renew_ceiling
                .is_some()
        );
    }

    #[test]
    fn never_passes_a_persisted_ceiling_and_never_reissues_after_a_crash() {
        let mut clock = fresh();
        let mut durable = 0;
        let mut last = Version::default();
        // The wall clock stands still: the counter runs through the lease.
        for _ in 0..200_000 {
            let tick = clock.tick(T0).expect("tick");
            if let Some(c) = tick.persist_ceiling {
                durable = c;
            }
            assert!(tick.version.hlc <= durable);
            last = tick.version;
        }
        // Crash: only the ceiling survived; the wall clock went back 1 s.
        let mut after = HybridClock::recover(InstanceId(7), durable, 0, SkewBound::default());
        assert!(after.tick(T0 - 1000).expect("tick").version > last);
        // Data newer than the ceiling (observed from peers) also counts.
        let mut after =
            HybridClock::recover(InstanceId(7), durable, durable + 50, SkewBound::default());
        assert_eq!(after.tick(T0).expect("tick").version.hlc, durable + 51);
    }

    #[test]
    fn repeated_crashes_do_not_push_the_clock_ahead_of_wall_time() {
        // Each restart resumes at the persisted ceiling; the next ceiling
        // must come from the wall clock, or every crash adds a lease.
        let bound = SkewBound::default();
        let mut ceiling = 0;
        for crash in 0..20u64 {
            let now = T0 + crash * 100;
            let mut clock = HybridClock::recover(InstanceId(1), ceiling, 0, bound);
            let tick = clock.tick(now).expect("a restarted clock still ticks");
            if let Some(c) = tick.persist_ceiling {
                ceiling = c;
            }
            assert!(
                tick.version.physical_ms() <= now + bound.ceiling_lease_ms(),
                "crash {crash}: {} ms ahead",
                tick.version.physical_ms() - now
            );
        }
    }

    #[test]
    fn old_counter_versions_are_simply_older() {
        // A data dir from before the HLC: its highest version is 150,000.
        let mut clock = HybridClock::recover(InstanceId(1), 250_000, 150_000, SkewBound::default());
        let v = clock.tick(T0).expect("tick").version;
        assert_eq!(v.hlc, hlc_of_ms(T0));
        assert!(Version::new(250_000, u64::MAX).physical_ms() < FIRST_HLC_MS);
    }
}
