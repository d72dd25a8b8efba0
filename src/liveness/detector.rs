//! Failure detection: a phi-accrual detector per peer.
//!
//! Every node sends each peer a heartbeat (`Liveness.Ping`) every
//! `--heartbeat-interval-ms`. The detector keeps the recent intervals between
//! successful heartbeats and, at any moment, computes *phi*: how unlikely it
//! is, given those intervals, that the next heartbeat is merely late
//! (phi = -log10 of that probability; Hayashibara et al., as in Cassandra and
//! Akka). A peer whose phi exceeds `--phi-threshold` (default 8: about one
//! false suspicion in 10^8 intervals) is believed down. With the default
//! 500 ms interval a dead or paused peer is convicted about a second after its
//! last answer, and believed up again at its next answer.
//!
//! The detector is pure: time is passed in, so tests drive it without clocks.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// Recent heartbeat intervals kept per peer.
const MAX_SAMPLES: usize = 200;
/// Lower bound on the standard deviation, so a very regular peer is not
/// convicted for a few milliseconds of jitter.
const MIN_STD_DEV_MS: f64 = 100.0;

/// Heartbeat history of one peer.
#[derive(Clone, Debug)]
pub struct PhiAccrual {
    /// Recent intervals between heartbeats, in milliseconds.
    intervals: VecDeque<f64>,
    /// When the last heartbeat arrived (or when watching began).
    last: Instant,
    /// The configured heartbeat interval, in milliseconds.
    expected_ms: f64,
}

impl PhiAccrual {
    /// Starts watching at `now`, as if a heartbeat had just arrived and the
    /// usual interval were `expected`.
    pub fn new(now: Instant, expected: Duration) -> Self {
        let expected_ms = expected.as_secs_f64() * 1000.0;
        let mut intervals = VecDeque::with_capacity(MAX_SAMPLES);
        intervals.push_back(expected_ms);
        Self {
            intervals,
            last: now,
            expected_ms,
        }
    }

    /// Records a heartbeat. The gap after an outage is not a sample of the
    /// peer's normal rhythm, so intervals over four expected ones are not kept.
    pub fn heartbeat(&mut self, now: Instant) {
        let interval = now.saturating_duration_since(self.last).as_secs_f64() * 1000.0;
        self.last = now;
        if interval > 4.0 * self.expected_ms {
            return;
        }
        if self.intervals.len() == MAX_SAMPLES {
            self.intervals.pop_front();
        }
        self.intervals.push_back(interval);
    }

    /// Time since the last heartbeat.
    pub fn silence(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.last)
    }

    /// The suspicion level at `now`.
    pub fn phi(&self, now: Instant) -> f64 {
        let n = self.intervals.len() as f64;
        let mean = self.intervals.iter().sum::<f64>() / n;
        let variance = self
            .intervals
            .iter()
            .map(|x| (x - mean).powi(2))
            .sum::<f64>()
            / n;
        let std_dev = variance.sqrt().max(MIN_STD_DEV_MS);
        let elapsed = self.silence(now).as_secs_f64() * 1000.0;
        phi(elapsed, mean, std_dev)
    }
}

/// -log10 of the probability that a heartbeat with normally distributed
/// intervals (`mean`, `std_dev`) arrives later than `elapsed` (logistic
/// approximation of the normal CDF, as in Akka).
fn phi(elapsed: f64, mean: f64, std_dev: f64) -> f64 {
    let y = (elapsed - mean) / std_dev;
    let e = (-y * (1.5976 + 0.070566 * y * y)).exp();
    let p_later = if elapsed > mean {
        e / (1.0 + e)
    } else {
        1.0 - 1.0 / (1.0 + e)
    };
    // p_later underflows to 0 for very long silences: cap phi instead of infinity.
    (-p_later.max(1e-300).log10()).max(0.0)
}

/// A peer's state as the detector sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct PeerHealth {
    /// phi below the threshold.
    pub up: bool,
    /// The current suspicion level.
    pub phi: f64,
    /// Why the last heartbeat failed, if it did.
    pub last_error: Option<String>,
}

/// Detectors for every peer, plus the conviction threshold.
///
/// A node that was itself frozen (SIGSTOP, a long GC-like stall, an
/// overloaded machine) sees every peer silent when it wakes up. Like
/// Cassandra, the detector then blames itself, not the peers: while its own
/// heartbeat rounds are late it convicts nobody, and after such a pause it
/// forgives the silence it did not observe.
#[derive(Clone, Debug)]
pub struct FailureDetector {
    /// Peers by address, in a fixed order.
    peers: Vec<(String, PhiAccrual, Option<String>)>,
    /// phi at or above which a peer is believed down.
    threshold: f64,
    /// The heartbeat interval.
    interval: Duration,
    /// When this node last started a heartbeat round.
    last_round: Instant,
}

impl FailureDetector {
    pub fn new(
        peers: impl IntoIterator<Item = String>,
        now: Instant,
        interval: Duration,
        threshold: f64,
    ) -> Self {
        Self {
            peers: peers
                .into_iter()
                .map(|address| (address, PhiAccrual::new(now, interval), None))
                .collect(),
            threshold,
            interval,
            last_round: now,
        }
    }

    /// How late this node's own rounds may be before it suspects itself.
    fn pause_limit(&self) -> Duration {
        self.interval * 3
    }

    /// This node starts a heartbeat round. After a local pause, the silence
    /// of every peer is forgiven (their clocks restart now).
    pub fn round_started(&mut self, now: Instant) {
        if now.saturating_duration_since(self.last_round) > self.pause_limit() {
            tracing::warn!(
                paused_ms = now.saturating_duration_since(self.last_round).as_millis() as u64,
                "this node's heartbeat rounds were late (paused or overloaded): not blaming peers for the gap"
            );
            for (_, detector, _) in &mut self.peers {
                detector.last = now;
            }
        }
        self.last_round = now;
    }

    fn peer_mut(&mut self, address: &str) -> Option<&mut (String, PhiAccrual, Option<String>)> {
        self.peers.iter_mut().find(|(a, _, _)| a == address)
    }

    /// Starts watching `address` (a member that joined), as if it had
    /// just answered.
    pub fn learn(&mut self, address: &str, now: Instant) {
        if self.peer_mut(address).is_none() {
            self.peers.push((
                address.to_string(),
                PhiAccrual::new(now, self.interval),
                None,
            ));
        }
    }

    /// A heartbeat from `address` arrived.
    pub fn heartbeat(&mut self, address: &str, now: Instant) {
        if let Some((_, detector, error)) = self.peer_mut(address) {
            detector.heartbeat(now);
            *error = None;
        }
    }

    /// A heartbeat to `address` failed (the silence keeps growing).
    pub fn failed(&mut self, address: &str, why: String) {
        if let Some((_, _, error)) = self.peer_mut(address) {
            *error = Some(why);
        }
    }

    /// How `address` looks at `now`; unknown addresses (this node itself)
    /// are up.
    pub fn health(&self, address: &str, now: Instant) -> PeerHealth {
        match self.peers.iter().find(|(a, _, _)| a == address) {
            Some((_, detector, error)) => {
                let phi = detector.phi(now);
                let self_paused =
                    now.saturating_duration_since(self.last_round) > self.pause_limit();
                PeerHealth {
                    up: phi < self.threshold || self_paused,
                    phi,
                    last_error: error.clone(),
                }
            }
            None => PeerHealth {
                up: true,
                phi: 0.0,
                last_error: None,
            },
        }
    }

    #[cfg(test)]
    pub fn is_up(&self, address: &str, now: Instant) -> bool {
        self.health(address, now).up
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVAL: Duration = Duration::from_millis(500);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn regular_heartbeats_keep_phi_low() {
        let start = Instant::now();
        let mut detector = PhiAccrual::new(start, INTERVAL);
        let mut now = start;
        for _ in 0..50 {
            now += ms(500);
            detector.heartbeat(now);
        }
        assert!(detector.phi(now) < 0.5);
        assert!(
            detector.phi(now + ms(600)) < 8.0,
            "a slightly late heartbeat is not a failure"
        );
    }

    #[test]
    fn silence_raises_phi_past_the_threshold_in_about_a_second() {
        let start = Instant::now();
        let mut detector = PhiAccrual::new(start, INTERVAL);
        let mut now = start;
        for _ in 0..20 {
            now += ms(500);
            detector.heartbeat(now);
        }
        let convicted_after = (0..5000u64)
            .step_by(10)
            .find(|t| detector.phi(now + ms(*t)) >= 8.0)
            .expect("eventually convicted");
        assert!(
            (900..=1300).contains(&convicted_after),
            "convicted after {convicted_after} ms"
        );
        // phi only grows with silence, and never becomes infinite.
        assert!(detector.phi(now + ms(3000)) > detector.phi(now + ms(2000)));
        assert!(detector.phi(now + Duration::from_secs(3600)).is_finite());
    }

    #[test]
    fn a_node_that_was_paused_itself_does_not_blame_its_peers() {
        let start = Instant::now();
        let mut fd = FailureDetector::new(["b".to_string()], start, INTERVAL, 8.0);
        let mut now = start;
        for _ in 0..10 {
            now += ms(500);
            fd.round_started(now);
            fd.heartbeat("b", now);
        }
        // This node freezes for 5 s: no rounds, no heartbeats.
        let woke = now + ms(5000);
        assert!(
            fd.is_up("b", woke),
            "its own rounds are late: convict nobody"
        );
        fd.round_started(woke);
        assert!(fd.is_up("b", woke + ms(100)), "the gap is forgiven");
        // But a peer that stays silent after the pause is convicted as usual.
        let mut later = woke;
        for _ in 0..4 {
            later += ms(500);
            fd.round_started(later);
        }
        assert!(!fd.is_up("b", later));
    }

    #[test]
    fn a_peer_that_never_answers_is_convicted_after_startup() {
        let start = Instant::now();
        let mut fd = FailureDetector::new(["b".to_string()], start, INTERVAL, 8.0);
        // This node runs its rounds on time; "b" never answers.
        let rounds_until = |fd: &mut FailureDetector, from: u64, to: u64| {
            for t in (from..=to).step_by(500) {
                fd.round_started(start + ms(t));
            }
        };
        assert!(fd.is_up("b", start), "optimistic at start");
        fd.failed("b", "connection refused".into());
        rounds_until(&mut fd, 500, 1500);
        assert!(!fd.is_up("b", start + ms(1500)));
        assert_eq!(
            fd.health("b", start + ms(1500)).last_error.as_deref(),
            Some("connection refused")
        );
        // It answers again: up at once.
        rounds_until(&mut fd, 2000, 5000);
        fd.heartbeat("b", start + ms(5000));
        assert!(fd.is_up("b", start + ms(5000)));
        assert_eq!(fd.health("b", start + ms(5000)).last_error, None);
        // The outage did not teach it to wait longer next time.
        rounds_until(&mut fd, 5500, 6500);
        assert!(!fd.is_up("b", start + ms(6500)));
        // Unknown addresses (the node itself) are up.
        assert!(fd.is_up("self", start + ms(99_999)));
    }
}
