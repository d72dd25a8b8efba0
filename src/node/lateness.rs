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
//! apart cancel out. A node that has heard nothing yet from a request's
//! host has nothing to compare with and takes the request, unless the node
//! itself was just stalled (frozen, or starved of CPU), when its queue may
//! hold requests from before the stall: then it refuses (not applied; the
//! client may retry).
//!
//! The tables are bounded ([`MAX_SOURCES`]); baselines forget, generation by
//! generation, so a client whose clock was stepped back is judged by its new
//! clock after at most two generations.

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
    /// request from the same clock, which is at least its timeout.
    Late { late_ms: u64 },
    /// Nothing to compare with, just after this node stalled.
    Unknown,
}

/// Baselines by connection and by host: the pure core of [`Arrivals`].
#[derive(Debug, Default)]
pub struct Baselines {
    connections: HashMap<SocketAddr, Baseline>,
    hosts: HashMap<IpAddr, Baseline>,
}

impl Baselines {
    /// Judges a request from `source` whose offset (node monotonic ms minus
    /// the client's send time in its wall-clock ms) is `offset`, with a
    /// client timeout of `timeout_ms`, at node time `now_ms`; `stalled`
    /// says whether this node was just stalled. Records the sample.
    pub fn judge(
        &mut self,
        source: SocketAddr,
        offset: i64,
        timeout_ms: u64,
        now_ms: u64,
        stalled: bool,
    ) -> Verdict {
        let baseline = self
            .connections
            .get(&source)
            .or_else(|| self.hosts.get(&source.ip()))
            .map(Baseline::least);
        let verdict = match baseline {
            Some(least) => {
                let late_ms = offset.saturating_sub(least).max(0) as u64;
                if late_ms >= timeout_ms {
                    Verdict::Late { late_ms }
                } else {
                    Verdict::InTime
                }
            }
            None if stalled => Verdict::Unknown,
            None => Verdict::InTime,
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

    /// Judges a request from `source` sent at `sent_ms` (its client's wall
    /// clock) whose client waits `timeout`.
    pub fn judge(&self, source: SocketAddr, sent_ms: u64, timeout: Duration) -> Verdict {
        let now_ms = self.now_ms();
        let offset = (now_ms as i64).saturating_sub(sent_ms.min(i64::MAX as u64) as i64);
        let stalled = self.stalled(now_ms);
        self.baselines
            .locked()
            .judge(source, offset, timeout.as_millis() as u64, now_ms, stalled)
    }

    /// Ticks until `shutdown`, noting stalls (logged).
    pub async fn watch_stalls(self: Arc<Self>, shutdown: CancellationToken) {
        let mut ticks = tokio::time::interval(STALL_TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            let now_ms = self.now_ms().max(1);
            let last = self.last_tick_ms.swap(now_ms, Ordering::Relaxed);
            let gap = now_ms.saturating_sub(last);
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

    #[test]
    fn clocks_seconds_apart_cancel_out() {
        for skew in [-5_000i64, 0, 2_000, 3_600_000] {
            let mut baselines = Baselines::default();
            // Transit times of 1-40 ms, with the client's clock `skew` off.
            for (i, transit) in [5, 1, 40, 3, 12, 2].into_iter().enumerate() {
                let verdict = baselines.judge(at(1000), transit + skew, 3_000, i as u64, false);
                assert_eq!(verdict, Verdict::InTime, "skew {skew}");
            }
        }
    }

    #[test]
    fn a_request_that_waited_out_its_timeout_is_late() {
        let mut baselines = Baselines::default();
        baselines.judge(at(1000), 10_000 + 2, 3_000, 0, false);
        assert_eq!(
            baselines.judge(at(1000), 10_000 + 2_999, 3_000, 10, false),
            Verdict::InTime
        );
        assert_eq!(
            baselines.judge(at(1000), 10_000 + 5_002, 3_000, 20, false),
            Verdict::Late { late_ms: 5_000 }
        );
    }

    #[test]
    fn a_new_connection_is_judged_by_its_host() {
        let mut baselines = Baselines::default();
        baselines.judge(at(1000), 500, 3_000, 0, false);
        // Another process on the same host (same clock), after a freeze.
        assert_eq!(
            baselines.judge(at(1001), 500 + 4_000, 3_000, 10, false),
            Verdict::Late { late_ms: 4_000 }
        );
        // A host never heard from: nothing to compare with.
        let elsewhere = SocketAddr::from(([10, 0, 0, 9], 1000));
        assert_eq!(
            baselines.judge(elsewhere, 99_999, 3_000, 10, false),
            Verdict::InTime
        );
        let unknown = SocketAddr::from(([10, 0, 0, 8], 1000));
        assert_eq!(
            baselines.judge(unknown, 99_999, 3_000, 10, true),
            Verdict::Unknown
        );
    }

    #[test]
    fn a_connection_keeps_its_own_clock_beside_others_on_its_host() {
        let mut baselines = Baselines::default();
        // A process on this host whose clock runs 5 s behind the others.
        baselines.judge(at(1000), 10, 3_000, 0, false);
        baselines.judge(at(2000), 5_010, 3_000, 0, false);
        for now in 1..10 {
            assert_eq!(
                baselines.judge(at(2000), 5_010 + now as i64, 3_000, now, false),
                Verdict::InTime
            );
        }
    }

    #[test]
    fn a_client_clock_stepped_back_is_learned_after_two_generations() {
        let mut baselines = Baselines::default();
        baselines.judge(at(1000), 0, 3_000, 0, false);
        let stepped = 10_000;
        let mut late = 0;
        for i in 0..(2 * SAMPLES_PER_GENERATION as u64 + 2) {
            if baselines.judge(at(1000), stepped, 3_000, i, false) != Verdict::InTime {
                late += 1;
            }
        }
        assert!(late <= 2 * SAMPLES_PER_GENERATION, "{late}");
        assert_eq!(
            baselines.judge(at(1000), stepped, 3_000, 1_000, false),
            Verdict::InTime
        );
        // Or by time: two generations of GENERATION_MS.
        let mut baselines = Baselines::default();
        baselines.judge(at(1000), 0, 3_000, 0, false);
        baselines.judge(at(1000), stepped, 3_000, GENERATION_MS, false);
        baselines.judge(at(1000), stepped, 3_000, 2 * GENERATION_MS, false);
        assert_eq!(
            baselines.judge(at(1000), stepped, 3_000, 2 * GENERATION_MS + 1, false),
            Verdict::InTime
        );
    }

    #[test]
    fn a_baseline_survives_a_long_freeze() {
        let mut baselines = Baselines::default();
        for i in 0..10 {
            baselines.judge(at(1000), 100, 3_000, i, false);
        }
        // Frozen for five minutes: the first request after it was sent
        // before the freeze began.
        assert_eq!(
            baselines.judge(at(1000), 100 + 300_000, 3_000, 300_000, false),
            Verdict::Late { late_ms: 300_000 }
        );
    }

    #[test]
    fn the_tables_are_bounded() {
        let mut baselines = Baselines::default();
        for i in 0..(MAX_SOURCES as u32 + 100) {
            let source = SocketAddr::from((std::net::Ipv4Addr::from(i), 7));
            baselines.judge(source, 0, 3_000, i as u64, false);
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
