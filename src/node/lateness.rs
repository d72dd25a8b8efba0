//! Whether a client write reached this node after its client gave up,
//! judged without asking the client's wall clock to agree with this node's.
//!
//! A client that gives up on a write reports it indeterminate; if the write
//! were taken up later (it sat in a frozen node's socket buffer, or in a
//! network that held it), it would be coordinated with a fresh version and
//! could overwrite writes acknowledged since. So a write that arrives later
//! than its client waited is refused, not applied.
//!
//! "Later than its client waited" needs no agreement between clocks. Each
//! request says when it was sent by its client's wall clock
//! ([`crate::client::DEADLINE_HEADER`] minus `grpc-timeout`), and the node
//! notes, by its own monotonic clock, when it arrived. Their difference (the
//! *offset*) is the transit time plus a constant: the difference between
//! the two clocks, whatever it is. The quickest recent request from the same
//! clock (the same connection, else the same host) has the smallest offset;
//! a request whose offset exceeds that by its own timeout or more spent at
//! least its timeout on the way: its client had given up. Clocks seconds
//! apart cancel out. Only requests taken in time are recorded, so a
//! backlog of late ones (a thawed node's) is judged, to its end, against
//! the quickest request from before it.
//!
//! A host never heard from (this node just started, or forgot it) has
//! nothing to compare with: its request is judged by comparing clocks, with
//! a margin of [`WALL_MARGIN_MS`] for clocks that disagree; and just after
//! this node itself stalled (frozen, starved of CPU, or the machine
//! suspended: the wall clock jumped past the monotonic one), when its
//! queue may hold requests from before the stall, it is refused (not
//! applied; the client may retry). A host whose every request looks late
//! for [`RELEARN_MS`] while this node runs had its clock moved (stepped
//! back, or a second process with another clock): it is judged afresh from
//! then on.
//!
//! The tables are bounded ([`MAX_SOURCES`]); baselines forget generation
//! by generation, so they follow a client's clock as it drifts.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::locks::Locked;

/// Most connections and most hosts remembered, each.
pub const MAX_SOURCES: usize = 4096;
/// Samples per baseline generation...
const SAMPLES_PER_GENERATION: u32 = 64;
/// ...or this long (node time), whichever comes first.
const GENERATION_MS: u64 = 30_000;

/// The quickest recent offsets from one clock, in two generations: the one
/// being filled and the one before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Baseline {
    current_min: i64,
    current_samples: u32,
    current_since_ms: u64,
    previous_min: i64,
}

impl Baseline {
    fn new(offset: i64, now_ms: u64) -> Self {
        Self {
            current_min: offset,
            current_samples: 1,
            current_since_ms: now_ms,
            previous_min: offset,
        }
    }

    /// The smallest offset remembered.
    fn least(&self) -> i64 {
        self.current_min.min(self.previous_min)
    }

    fn observe(&mut self, offset: i64, now_ms: u64) {
        let full = self.current_samples >= SAMPLES_PER_GENERATION
            || now_ms.saturating_sub(self.current_since_ms) >= GENERATION_MS;
        if full {
            self.previous_min = self.current_min;
            self.current_min = offset;
            self.current_samples = 1;
            self.current_since_ms = now_ms;
        } else {
            self.current_min = self.current_min.min(offset);
            self.current_samples += 1;
        }
    }
}

/// What a request's arrival says about its client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Its client was still waiting (or there is no sign it was not).
    InTime,
    /// It arrived at least this many ms later than the quickest recent
    /// request from the same clock, which is at least its timeout (or, from
    /// a host never heard from, its deadline had passed by this node's
    /// clock by more than [`WALL_MARGIN_MS`]).
    Late { late_ms: u64 },
    /// Every request from its host has been late for [`RELEARN_MS`] while
    /// this node ran: the host's clock moved, not its requests. Its
    /// baselines start again from this request, which is taken.
    Relearned { late_ms: u64 },
    /// Nothing to compare with, just after this node stalled.
    Unknown,
}

impl Verdict {
    /// The verdict for a request sent with this one (the same send time,
    /// so as late) that waits `timeout_ms`: late only if it waited less
    /// than it is late.
    pub fn for_timeout(self, timeout_ms: u32) -> Verdict {
        match self {
            Verdict::Late { late_ms } if late_ms < u64::from(timeout_ms) => Verdict::InTime,
            other => other,
        }
    }
}

/// How far past its deadline, by this node's clock, a request from a host
/// never heard from may arrive: only clocks further apart than this (less
/// the client's timeout) are misjudged, and then for [`RELEARN_MS`].
pub const WALL_MARGIN_MS: i64 = 5_000;
/// How long every request from a host must be late, while this node runs,
/// before its clock is taken to have moved.
pub const RELEARN_MS: u64 = 60_000;

/// One request's arrival, as [`Baselines::judge`] weighs it.
#[derive(Clone, Copy, Debug)]
pub struct Arrival {
    pub source: SocketAddr,
    /// Node monotonic ms minus the client's send time in its wall-clock ms.
    pub offset: i64,
    /// How long its client waits.
    pub timeout_ms: u64,
    /// Node monotonic ms now.
    pub now_ms: u64,
    /// Whether this node was just stalled.
    pub stalled: bool,
    /// This node's wall clock minus the client's deadline (ms): the old,
    /// clock-comparing measure, used only for hosts never heard from.
    pub past_deadline_ms: i64,
}

/// Baselines by connection and by host: the pure core of [`Arrivals`].
#[derive(Debug, Default)]
pub struct Baselines {
    connections: HashMap<SocketAddr, Baseline>,
    hosts: HashMap<IpAddr, Baseline>,
    /// Hosts whose every request has been late since this node time.
    late_since: HashMap<IpAddr, u64>,
}

impl Baselines {
    /// Judges a request. Only requests taken in time are recorded: a late
    /// one (a thawed node's backlog, a held network) never moves a
    /// baseline, so the rest of a backlog is judged against the quickest
    /// request from before it.
    pub fn judge(&mut self, arrival: Arrival) -> Verdict {
        let Arrival {
            source,
            offset,
            timeout_ms,
            now_ms,
            stalled,
            past_deadline_ms,
        } = arrival;
        let baseline = self
            .connections
            .get(&source)
            .or_else(|| self.hosts.get(&source.ip()))
            .map(Baseline::least);
        let late_ms = match baseline {
            Some(least) => {
                let late_ms = offset.saturating_sub(least).max(0) as u64;
                (late_ms >= timeout_ms).then_some(late_ms)
            }
            None if stalled => return Verdict::Unknown,
            None => (past_deadline_ms > WALL_MARGIN_MS).then_some(past_deadline_ms as u64),
        };
        let verdict = match late_ms {
            None => {
                self.late_since.remove(&source.ip());
                Verdict::InTime
            }
            Some(late_ms) => {
                if self.late_since.len() >= MAX_SOURCES {
                    self.late_since.clear();
                }
                let since = *self.late_since.entry(source.ip()).or_insert(now_ms);
                if stalled || now_ms.saturating_sub(since) < RELEARN_MS {
                    return Verdict::Late { late_ms };
                }
                self.late_since.remove(&source.ip());
                self.connections.remove(&source);
                self.hosts.remove(&source.ip());
                Verdict::Relearned { late_ms }
            }
        };
        record(&mut self.connections, source, offset, now_ms);
        record(&mut self.hosts, source.ip(), offset, now_ms);
        verdict
    }
}

/// Adds a sample to `key`'s baseline, making room first if the table is full.
fn record<K: std::hash::Hash + Eq + Copy>(
    table: &mut HashMap<K, Baseline>,
    key: K,
    offset: i64,
    now_ms: u64,
) {
    if let Some(baseline) = table.get_mut(&key) {
        baseline.observe(offset, now_ms);
        return;
    }
    if table.len() >= MAX_SOURCES {
        // Forget the source heard from longest ago (a linear scan, only
        // when a new source arrives at a full table).
        let oldest = table
            .iter()
            .min_by_key(|(_, b)| b.current_since_ms)
            .map(|(k, _)| *k);
        if let Some(oldest) = oldest {
            table.remove(&oldest);
        }
    }
    table.insert(key, Baseline::new(offset, now_ms));
}

/// How often the stall watch ticks, and the gap between ticks that counts
/// as a stall.
const STALL_TICK: Duration = Duration::from_millis(100);
const STALL_GAP_MS: u64 = 1_000;
/// How long after a stall requests from unknown hosts are refused.
const AFTER_STALL_MS: u64 = 10_000;

/// The node's arrival judge: baselines, and a watch for stalls.
pub struct Arrivals {
    baselines: std::sync::Mutex<Baselines>,
    epoch: tokio::time::Instant,
    /// Node ms of the stall watch's last tick (0: not started).
    last_tick_ms: AtomicU64,
    /// Node ms when the last stall ended (0: none).
    last_stall_end_ms: AtomicU64,
}

impl Arrivals {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            baselines: std::sync::Mutex::new(Baselines::default()),
            epoch: tokio::time::Instant::now(),
            last_tick_ms: AtomicU64::new(0),
            last_stall_end_ms: AtomicU64::new(0),
        })
    }

    /// Node time in ms (monotonic).
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Whether the node was stalled just now (the watch has not ticked for
    /// a while, or noticed a stall that ended moments ago).
    fn stalled(&self, now_ms: u64) -> bool {
        let last_tick = self.last_tick_ms.load(Ordering::Relaxed);
        let last_stall_end = self.last_stall_end_ms.load(Ordering::Relaxed);
        (last_tick > 0 && now_ms.saturating_sub(last_tick) > STALL_GAP_MS)
            || (last_stall_end > 0 && now_ms.saturating_sub(last_stall_end) < AFTER_STALL_MS)
    }

    /// Judges a request from `source` whose client set `deadline_ms` (its
    /// wall clock) and waits `timeout`.
    pub fn judge(&self, source: SocketAddr, deadline_ms: u64, timeout: Duration) -> Verdict {
        let now_ms = self.now_ms();
        let timeout_ms = timeout.as_millis().min(u64::MAX as u128) as u64;
        let sent_ms = deadline_ms.saturating_sub(timeout_ms).min(i64::MAX as u64) as i64;
        let wall_ms = crate::clock::wall_clock_ms().min(i64::MAX as u64) as i64;
        self.baselines.locked().judge(Arrival {
            source,
            offset: (now_ms as i64).saturating_sub(sent_ms),
            timeout_ms,
            now_ms,
            stalled: self.stalled(now_ms),
            past_deadline_ms: wall_ms.saturating_sub(deadline_ms.min(i64::MAX as u64) as i64),
        })
    }

    /// Ticks until `shutdown`, noting stalls (logged).
    pub async fn watch_stalls(self: Arc<Self>, shutdown: CancellationToken) {
        let mut ticks = tokio::time::interval(STALL_TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_wall = crate::clock::wall_clock_ms();
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            let now_ms = self.now_ms().max(1);
            let last = self.last_tick_ms.swap(now_ms, Ordering::Relaxed);
            // The monotonic clock stands still while the machine is
            // suspended; the wall clock does not: a wall-clock jump past the
            // monotonic gap counts as a stall too.
            let wall = crate::clock::wall_clock_ms();
            let wall_gap = wall.saturating_sub(last_wall);
            last_wall = wall;
            let gap = now_ms.saturating_sub(last).max(wall_gap);
            if last > 0 && gap > STALL_GAP_MS {
                self.last_stall_end_ms.store(now_ms, Ordering::Relaxed);
                tracing::warn!(
                    stalled_ms = gap,
                    "this node did not run for {gap} ms (frozen, or starved of CPU); for {} s, \
                     writes from hosts it has not heard from before are refused (not applied), \
                     since they may have waited out their clients' deadlines",
                    AFTER_STALL_MS / 1000
                );
            }
        }
    }
}

/// Parses a `grpc-timeout` header value (`<up to 8 digits><H|M|S|m|u|n>`).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let unit = value.chars().last()?;
    let digits = &value[..value.len() - unit.len_utf8()];
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    match unit {
        'H' => Some(Duration::from_secs(amount.checked_mul(3600)?)),
        'M' => Some(Duration::from_secs(amount.checked_mul(60)?)),
        'S' => Some(Duration::from_secs(amount)),
        'm' => Some(Duration::from_millis(amount)),
        'u' => Some(Duration::from_micros(amount)),
        'n' => Some(Duration::from_nanos(amount)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// A request from `source` with `offset`, a 3 s timeout, at `now_ms`.
    fn arrival(source: SocketAddr, offset: i64, now_ms: u64) -> Arrival {
        Arrival {
            source,
            offset,
            timeout_ms: 3_000,
            now_ms,
            stalled: false,
            past_deadline_ms: -3_000,
        }
    }

    #[test]
    fn clocks_seconds_apart_cancel_out() {
        for skew in [-5_000i64, 0, 2_000, 3_600_000] {
            let mut baselines = Baselines::default();
            // Transit times of 1-40 ms, with the client's clock `skew` off.
            for (i, transit) in [5, 1, 40, 3, 12, 2].into_iter().enumerate() {
                let verdict = baselines.judge(arrival(at(1000), transit + skew, i as u64));
                assert_eq!(verdict, Verdict::InTime, "skew {skew}");
            }
        }
    }

    #[test]
    fn a_request_that_waited_out_its_timeout_is_late() {
        let mut baselines = Baselines::default();
        baselines.judge(arrival(at(1000), 10_000 + 2, 0));
        assert_eq!(
            baselines.judge(arrival(at(1000), 10_000 + 2_999, 10)),
            Verdict::InTime
        );
        assert_eq!(
            baselines.judge(arrival(at(1000), 10_000 + 5_002, 20)),
            Verdict::Late { late_ms: 5_000 }
        );
    }

    #[test]
    fn a_new_connection_is_judged_by_its_host() {
        let mut baselines = Baselines::default();
        baselines.judge(arrival(at(1000), 500, 0));
        // Another process on the same host (same clock), after a freeze.
        assert_eq!(
            baselines.judge(arrival(at(1001), 500 + 4_000, 10)),
            Verdict::Late { late_ms: 4_000 }
        );
        // A host never heard from: judged by the clocks, with a margin.
        let elsewhere = SocketAddr::from(([10, 0, 0, 9], 1000));
        assert_eq!(
            baselines.judge(arrival(elsewhere, 99_999, 10)),
            Verdict::InTime
        );
        let held = SocketAddr::from(([10, 0, 0, 7], 1000));
        let mut late = arrival(held, 99_999, 10);
        late.past_deadline_ms = WALL_MARGIN_MS + 1;
        assert_eq!(
            baselines.judge(late),
            Verdict::Late {
                late_ms: WALL_MARGIN_MS as u64 + 1
            }
        );
        // Just after this node stalled: nothing to go by.
        let unknown = SocketAddr::from(([10, 0, 0, 8], 1000));
        let mut stalled = arrival(unknown, 99_999, 10);
        stalled.stalled = true;
        assert_eq!(baselines.judge(stalled), Verdict::Unknown);
        assert_eq!(baselines.judge(stalled), Verdict::Unknown, "not recorded");
    }

    /// Two processes on one host whose clocks are further apart than their
    /// timeout (libfaketime, time namespaces): the second is judged by the
    /// host's quickest, refused, and relearned after a minute; from then on
    /// its connection has its own baseline.
    #[test]
    fn a_second_clock_on_one_host_is_learned_after_a_minute() {
        let mut baselines = Baselines::default();
        baselines.judge(arrival(at(1000), 10, 0));
        assert!(matches!(
            baselines.judge(arrival(at(2000), 5_010, 1)),
            Verdict::Late { .. }
        ));
        assert!(matches!(
            baselines.judge(arrival(at(2000), 5_010, RELEARN_MS + 1)),
            Verdict::Relearned { .. }
        ));
        for now in 2..10 {
            assert_eq!(
                baselines.judge(arrival(at(2000), 5_010 + now as i64, RELEARN_MS + now)),
                Verdict::InTime
            );
            assert_eq!(
                baselines.judge(arrival(at(1000), 10 + now as i64, RELEARN_MS + now)),
                Verdict::InTime
            );
        }
    }

    /// A thawed node's backlog: requests sent during a 40 s freeze, oldest
    /// first (each later one has a smaller offset). Every one that waited
    /// out its timeout is refused, however many there are: late requests
    /// never move a baseline.
    #[test]
    fn a_whole_backlog_is_judged_against_the_quickest_request_before_it() {
        let mut baselines = Baselines::default();
        for i in 0..100 {
            baselines.judge(arrival(at(1000), 0, i));
        }
        let thaw = 40_000;
        let mut late = 0;
        for sent in 0..400u64 {
            // Sent at 100 ms steps during the freeze; handled at the thaw.
            let sent_at = 100 + sent * 100;
            let offset = (thaw - sent_at) as i64;
            match baselines.judge(arrival(at(1000), offset, thaw + sent)) {
                Verdict::Late { .. } => late += 1,
                Verdict::InTime => assert!(offset < 3_000, "a request {offset} ms late taken"),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(late, 400 - 30, "all but the last 3 s of the freeze refused");
    }

    #[test]
    fn a_client_clock_stepped_back_is_relearned_after_a_minute_of_refusals() {
        let mut baselines = Baselines::default();
        baselines.judge(arrival(at(1000), 0, 0));
        let stepped = 10_000;
        assert_eq!(
            baselines.judge(arrival(at(1000), stepped, 1)),
            Verdict::Late { late_ms: 10_000 }
        );
        assert_eq!(
            baselines.judge(arrival(at(1000), stepped, RELEARN_MS - 1)),
            Verdict::Late { late_ms: 10_000 }
        );
        assert_eq!(
            baselines.judge(arrival(at(1000), stepped, RELEARN_MS + 1)),
            Verdict::Relearned { late_ms: 10_000 }
        );
        assert_eq!(
            baselines.judge(arrival(at(1000), stepped + 5, RELEARN_MS + 2)),
            Verdict::InTime
        );
        // A request in time in between starts the minute again.
        let mut baselines = Baselines::default();
        baselines.judge(arrival(at(1000), 0, 0));
        baselines.judge(arrival(at(1000), stepped, 1));
        baselines.judge(arrival(at(1000), 1, 2));
        assert_eq!(
            baselines.judge(arrival(at(1000), stepped, RELEARN_MS + 1)),
            Verdict::Late { late_ms: 10_000 }
        );
    }

    #[test]
    fn a_baseline_survives_a_long_freeze() {
        let mut baselines = Baselines::default();
        for i in 0..10 {
            baselines.judge(arrival(at(1000), 100, i));
        }
        // Frozen for five minutes: the first request after it was sent
        // before the freeze began.
        assert_eq!(
            baselines.judge(arrival(at(1000), 100 + 300_000, 300_000)),
            Verdict::Late { late_ms: 300_000 }
        );
    }

    #[test]
    fn the_tables_are_bounded() {
        let mut baselines = Baselines::default();
        for i in 0..(MAX_SOURCES as u32 + 100) {
            let source = SocketAddr::from((std::net::Ipv4Addr::from(i), 7));
            baselines.judge(arrival(source, 0, i as u64));
        }
        assert_eq!(baselines.connections.len(), MAX_SOURCES);
        assert_eq!(baselines.hosts.len(), MAX_SOURCES);
    }

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(parse_grpc_timeout("3000m"), Some(Duration::from_secs(3)));
        assert_eq!(
            parse_grpc_timeout("2999999u"),
            Some(Duration::from_micros(2_999_999))
        );
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        for bad in ["", "m", "123456789m", "12x", "-1m", "1.5S", "é"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
        }
    }
}
