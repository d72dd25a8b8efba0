//! The async shell over scripted replicas ([`crate::net::fake`]), in paused
//! time: each test asserts what a request answers and exactly when, in
//! tokio's virtual clock (which jumps to the next timer whenever every task
//! waits), so "answered at R without waiting for the frozen replica" is an
//! equality on elapsed time, not a race.
//!
//! The coordinator is a fourth address outside the three-member ring (N=3):
//! every key's replicas are the three fakes, and with no member beyond the
//! preference list a hint stays on the coordinator ([`HintStore`] here).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Coordinator;
use crate::background::Background;
use crate::clock::{SkewBound, Version, hlc_of_ms, wall_clock_ms};
use crate::error::{Error, RollCall};
use crate::hints::{HintBounds, HintStore};
use crate::layout::Layout;
use crate::layout::paxos::LayoutState;
use crate::liveness::{FailureDetector, Liveness};
use crate::net::PeerPool;
use crate::net::fake::{FakeReplica, Script};
use crate::placement::Placement;
use crate::quorum::Consistency;
use crate::record::Record;
use crate::replica::ReplicaStore;
use crate::ring::{Member, Ring, member_id_for};
use crate::serving::ClusterView;
use crate::serving::LayoutOwner;
use crate::serving::layout_file::LayoutStore;
use crate::storage::MemoryStorage;

/// The three replicas of every key.
const REPLICAS: [&str; 3] = ["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"];
/// The coordinator: not a member, so not a replica.
const ME: &str = "127.0.0.1:7000";
const KEY: &str = "k";
/// `--rpc-timeout-ms`.
const RPC_TIMEOUT: Duration = Duration::from_secs(1);
/// `--request-timeout-ms`, unless a test sets its own.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// A healthy replica's answer time.
const FAST: Duration = Duration::from_millis(10);
/// Long enough for any background work here to finish.
const GRACE: Duration = Duration::from_secs(60);

struct Harness {
    coordinator: Coordinator,
    /// The fakes, in the order of [`REPLICAS`].
    replicas: Vec<Arc<FakeReplica>>,
    hints: Arc<HintStore>,
}

impl Harness {
    /// Replicas answering as `scripts` say, none believed down.
    fn new(scripts: [Script; 3]) -> Self {
        Self::with(scripts, REQUEST_TIMEOUT, &[])
    }

    /// Also a request deadline, and replicas the failure detector convicts.
    fn with(scripts: [Script; 3], request_timeout: Duration, down: &[usize]) -> Self {
        let ring = Arc::new(Ring::new(REPLICAS.iter().map(|a| Member::new(*a)), 16));
        let replicas: Vec<Arc<FakeReplica>> = REPLICAS
            .iter()
            .zip(scripts)
            .map(|(address, script)| FakeReplica::new(address, ring.clone(), script))
            .collect();
        let local = Arc::new(
            ReplicaStore::open(
                crate::clock::InstanceId(member_id_for(ME).0),
                Arc::new(MemoryStorage::new()),
                ring.clone(),
                SkewBound::default(),
            )
            .expect("open the coordinator's store"),
        );
        let peers = Arc::new(PeerPool::with_fakes(replicas.iter().cloned()));
        let liveness = convicting(down.iter().map(|&i| REPLICAS[i]));
        // The members' layout, served with the test's ring (the fakes use it).
        let layout = Layout::bootstrap(&REPLICAS.map(String::from), 3, 16);
        let layouts = LayoutOwner::new(
            ME,
            LayoutStore::in_memory(),
            LayoutState {
                committed: Some(layout),
                ..LayoutState::default()
            },
            Placement::new(ring, 3, ME),
            local.clone(),
            liveness.clone(),
            peers.clone(),
            RPC_TIMEOUT,
        )
        .expect("a layout owner");
        let cluster = Arc::new(ClusterView::new(
            Arc::new(layouts),
            peers,
            liveness,
            RPC_TIMEOUT,
        ));
        let hints = Arc::new(
            HintStore::open(
                Arc::new(MemoryStorage::new()),
                HintBounds {
                    max_hints: 1000,
                    max_bytes: 1 << 20,
                    max_age: Duration::from_secs(3600),
                    skew: SkewBound::default(),
                },
            )
            .expect("open the hint store"),
        );
        let coordinator = Coordinator::new(
            local,
            cluster,
            request_timeout,
            Background::new(CancellationToken::new()),
            hints.clone(),
        );
        Self {
            coordinator,
            replicas,
            hints,
        }
    }

    fn replica(&self, i: usize) -> &FakeReplica {
        &self.replicas[i]
    }

    /// Stores `record` on replica `i` directly.
    fn seed(&self, i: usize, record: &Record) {
        self.replicas[i]
            .store()
            .write_if_newer(KEY, record)
            .expect("seed");
    }

    /// Lets every background task (read repairs, trailing writes, hints)
    /// finish.
    async fn finish_background(&self) {
        self.coordinator.background.close(GRACE).await;
    }
}

/// A failure detector that believes `down` down: this node's heartbeat
/// rounds ran every interval for the last minute, and those peers never
/// answered one. Everyone else is unknown to it, hence up.
fn convicting<'a>(down: impl IntoIterator<Item = &'a str>) -> Liveness {
    let interval = Duration::from_secs(1);
    let now = tokio::time::Instant::now();
    let start = now
        .checked_sub(Duration::from_secs(60))
        .expect("the monotonic clock is past one minute");
    let mut detector =
        FailureDetector::new(down.into_iter().map(String::from), start, interval, 8.0);
    let mut round = start;
    while round < now {
        round += interval;
        detector.round_started(round);
    }
    Liveness::new(detector)
}

/// A value stored `ms_ago` milliseconds ago by another coordinator.
fn record_at(ms_ago: u64, value: &'static str) -> Record {
    let version = Version::new(
        hlc_of_ms(wall_clock_ms() - ms_ago),
        member_id_for("elsewhere").0,
    );
    Record::value(version, Bytes::from_static(value.as_bytes()))
}

fn put(value: &'static str) -> Option<Bytes> {
    Some(Bytes::from_static(value.as_bytes()))
}

/// The parts of a `QuorumNotReached`, or a panic naming what came instead.
fn quorum_not_reached(error: Error) -> (usize, RollCall, Vec<String>) {
    match error {
        Error::QuorumNotReached {
            acks,
            roll_call,
            failures,
            ..
        } => (acks, *roll_call, failures),
        other => panic!("expected QuorumNotReached, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_quorum_read_answers_at_r_without_waiting_for_a_frozen_replica() {
    let h = Harness::new([Script::Answer(FAST), Script::Answer(FAST), Script::Frozen]);
    let (old, new) = (record_at(2000, "old"), record_at(1000, "new"));
    h.seed(0, &new);
    h.seed(1, &new);
    h.seed(2, &old);
    let started = Instant::now();
    let read = h.coordinator.get(KEY, Consistency::Quorum).await;
    assert_eq!(read.expect("read"), Some(new.clone()));
    assert_eq!(
        started.elapsed(),
        FAST,
        "answered at R, not at the rpc timeout"
    );
    assert_eq!(h.replica(2).reads(), 1, "the frozen replica was asked too");
    // Its reply never comes: nothing is repaired, nothing blocks shutdown
    // beyond its rpc timeout.
    h.finish_background().await;
    assert_eq!(started.elapsed(), RPC_TIMEOUT);
    assert_eq!(h.replica(2).holds(KEY), Some(old));
    assert_eq!(h.coordinator.background.repairs_sent(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_stale_replica_that_answers_late_is_repaired_in_the_background() {
    let slow = Duration::from_millis(300);
    let h = Harness::new([
        Script::Answer(FAST),
        Script::Answer(FAST),
        Script::Answer(slow),
    ]);
    let (old, new) = (record_at(2000, "old"), record_at(1000, "new"));
    h.seed(0, &new);
    h.seed(1, &new);
    h.seed(2, &old);
    let started = Instant::now();
    let read = h.coordinator.get(KEY, Consistency::Quorum).await;
    assert_eq!(read.expect("read"), Some(new.clone()));
    assert_eq!(started.elapsed(), FAST);
    assert_eq!(h.replica(2).holds(KEY), Some(old), "not repaired yet");
    h.finish_background().await;
    // Its read reply at 300 ms, then the repair write, 300 ms more.
    assert_eq!(started.elapsed(), slow * 2);
    assert_eq!(h.replica(2).holds(KEY), Some(new));
    assert_eq!(h.replica(2).writes(), 1);
    assert_eq!((h.replica(0).writes(), h.replica(1).writes()), (0, 0));
    assert_eq!(h.coordinator.background.repairs_sent(), 1);
    assert_eq!(h.coordinator.blocking_repairs(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_quorum_read_held_by_one_replica_is_repaired_to_w_before_it_answers() {
    let h = Harness::new([Script::Answer(FAST), Script::Answer(FAST), Script::Frozen]);
    let new = record_at(1000, "new");
    h.seed(0, &new);
    let started = Instant::now();
    let read = h.coordinator.get(KEY, Consistency::Quorum).await;
    assert_eq!(read.expect("read"), Some(new.clone()));
    // Two replies (one holding, one missing the key), then the write that
    // makes W=2 hold it.
    assert_eq!(started.elapsed(), FAST * 2);
    assert_eq!(
        h.replica(1).holds(KEY),
        Some(new),
        "repaired before the answer"
    );
    assert_eq!(h.coordinator.blocking_repairs(), 1);
    assert_eq!(h.coordinator.background.repairs_sent(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_read_fails_as_soon_as_two_of_three_replicas_fail() {
    let h = Harness::new([Script::Fail(FAST), Script::Fail(FAST * 2), Script::Frozen]);
    let started = Instant::now();
    let error = h
        .coordinator
        .get(KEY, Consistency::Quorum)
        .await
        .expect_err("two of three failed");
    assert_eq!(
        started.elapsed(),
        FAST * 2,
        "not at the frozen one's timeout"
    );
    let (acks, roll_call, failures) = quorum_not_reached(error);
    assert_eq!(acks, 0);
    assert_eq!(
        roll_call,
        RollCall {
            answered: vec![],
            not_asked: vec![],
            waiting: vec![REPLICAS[2].to_string()],
        }
    );
    assert_eq!(failures.len(), 2, "{failures:?}");
    assert!(
        failures.iter().all(|f| f.contains("scripted to fail")),
        "{failures:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_write_answers_at_w_and_hints_the_replica_that_times_out() {
    let h = Harness::new([Script::Answer(FAST), Script::Answer(FAST), Script::Frozen]);
    let started = Instant::now();
    let ack = h
        .coordinator
        .write(KEY, put("v"), Consistency::Quorum)
        .await
        .expect("write");
    assert_eq!(started.elapsed(), FAST, "answered at W");
    assert_eq!(ack.acks, 2);
    for i in [0, 1] {
        assert_eq!(
            h.replica(i).holds(KEY).map(|r| r.version),
            Some(ack.version)
        );
    }
    assert!(h.hints.is_empty(), "no hint before the replica fails");
    // The trailing write times out at the rpc timeout; then the hint.
    h.finish_background().await;
    assert_eq!(started.elapsed(), RPC_TIMEOUT);
    assert_eq!(h.hints.len(), 1);
    assert_eq!(h.hints.targets(), vec![member_id_for(REPLICAS[2])]);
    assert_eq!(h.replica(2).holds(KEY), None);
}

#[tokio::test(start_paused = true)]
async fn a_write_hints_a_replica_that_failed_before_the_answer() {
    let h = Harness::new([
        Script::Answer(FAST),
        Script::Answer(FAST * 2),
        Script::Fail(FAST),
    ]);
    let started = Instant::now();
    let ack = h
        .coordinator
        .write(KEY, put("v"), Consistency::Quorum)
        .await
        .expect("write");
    assert_eq!(started.elapsed(), FAST * 2);
    assert_eq!(ack.acks, 2);
    h.finish_background().await;
    assert_eq!(h.hints.len(), 1);
    assert_eq!(h.hints.targets(), vec![member_id_for(REPLICAS[2])]);
}

#[tokio::test(start_paused = true)]
async fn replicas_holding_a_newer_version_force_a_restamp_above_it() {
    let h = Harness::new([
        Script::Answer(FAST),
        Script::Answer(FAST),
        Script::Answer(FAST),
    ]);
    // Written by a coordinator whose clock runs 5 s ahead of this one's.
    let newer = Version::new(
        hlc_of_ms(wall_clock_ms() + 5000),
        member_id_for("a fast clock").0,
    );
    for i in 0..3 {
        h.seed(i, &Record::value(newer, Bytes::from_static(b"newer")));
    }
    let started = Instant::now();
    let ack = h
        .coordinator
        .write(KEY, put("mine"), Consistency::Quorum)
        .await
        .expect("write");
    assert!(ack.version > newer, "{} not above {newer}", ack.version);
    assert_eq!(ack.acks, 2);
    // Two rounds, and the re-stamp back-off of the first (at most 1 ms).
    let elapsed = started.elapsed();
    assert!(
        elapsed >= FAST * 2 && elapsed <= FAST * 2 + Duration::from_millis(1),
        "{elapsed:?}"
    );
    h.finish_background().await;
    for i in 0..3 {
        let held = h.replica(i).holds(KEY).expect("held");
        assert_eq!(held.version, ack.version);
        assert_eq!(held.value.as_deref(), Some(&b"mine"[..]));
        assert_eq!(h.replica(i).writes(), 2, "one write per round");
    }
    assert!(h.hints.is_empty(), "refusing a version is not a failure");
}

#[tokio::test(start_paused = true)]
async fn the_request_deadline_fires_before_the_rpc_timeout() {
    let deadline = Duration::from_millis(500);
    let h = Harness::with(
        [Script::Frozen, Script::Frozen, Script::Frozen],
        deadline,
        &[],
    );
    let started = Instant::now();
    let error = h
        .coordinator
        .get(KEY, Consistency::Quorum)
        .await
        .expect_err("every replica is frozen");
    assert_eq!(started.elapsed(), deadline);
    assert!(
        matches!(&error, Error::DeadlineExceeded(m) if m.contains("GET did not finish within 500 ms")),
        "{error:?}"
    );
    let started = Instant::now();
    let error = h
        .coordinator
        .write(KEY, put("v"), Consistency::Quorum)
        .await
        .expect_err("every replica is frozen");
    assert_eq!(started.elapsed(), deadline);
    assert!(
        matches!(&error, Error::DeadlineExceeded(m) if m.contains("PUT did not finish within 500 ms")),
        "{error:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn with_every_replica_frozen_the_rpc_timeout_fails_the_quorum() {
    let h = Harness::new([Script::Frozen, Script::Frozen, Script::Frozen]);
    let started = Instant::now();
    let error = h
        .coordinator
        .get(KEY, Consistency::Quorum)
        .await
        .expect_err("every replica is frozen");
    assert_eq!(started.elapsed(), RPC_TIMEOUT);
    let (acks, roll_call, failures) = quorum_not_reached(error);
    assert_eq!(acks, 0);
    assert!(roll_call.answered.is_empty() && roll_call.not_asked.is_empty());
    assert!(
        failures.len() >= 2
            && failures
                .iter()
                .all(|f| f.ends_with(": timed out after 1000 ms")),
        "{failures:?}"
    );
    let started = Instant::now();
    let error = h
        .coordinator
        .write(KEY, put("v"), Consistency::Quorum)
        .await
        .expect_err("every replica is frozen");
    assert_eq!(started.elapsed(), RPC_TIMEOUT);
    let (acks, _, _) = quorum_not_reached(error);
    assert_eq!(acks, 0);
    h.finish_background().await;
    assert!(h.hints.is_empty(), "a failed write leaves no hints");
}

#[tokio::test(start_paused = true)]
async fn a_replica_believed_down_is_not_asked_and_the_roll_call_says_so() {
    // The convicted replica would answer at once, and hold the key.
    let h = Harness::with(
        [
            Script::Answer(FAST),
            Script::Fail(FAST * 2),
            Script::Answer(Duration::ZERO),
        ],
        REQUEST_TIMEOUT,
        &[2],
    );
    let record = record_at(1000, "v");
    h.seed(0, &record);
    h.seed(2, &record);
    let started = Instant::now();
    let error = h
        .coordinator
        .get(KEY, Consistency::Quorum)
        .await
        .expect_err("one answer of two needed");
    assert_eq!(started.elapsed(), FAST * 2);
    assert_eq!(h.replica(2).reads(), 0, "not asked");
    let (acks, roll_call, failures) = quorum_not_reached(error);
    assert_eq!(acks, 1);
    assert_eq!(
        roll_call,
        RollCall {
            answered: vec![REPLICAS[0].to_string()],
            not_asked: vec![REPLICAS[2].to_string()],
            waiting: vec![],
        }
    );
    // Only the replica asked is in the failure lines; the roll call names
    // the other.
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert!(failures[0].starts_with(REPLICAS[1]), "{failures:?}");
}

#[tokio::test(start_paused = true)]
async fn a_write_skips_a_replica_believed_down_and_hints_it() {
    let h = Harness::with(
        [
            Script::Answer(FAST),
            Script::Answer(FAST),
            Script::Answer(Duration::ZERO),
        ],
        REQUEST_TIMEOUT,
        &[2],
    );
    let started = Instant::now();
    let ack = h
        .coordinator
        .write(KEY, put("v"), Consistency::Quorum)
        .await
        .expect("write");
    assert_eq!(started.elapsed(), FAST);
    assert_eq!(ack.acks, 2);
    h.finish_background().await;
    assert_eq!(h.replica(2).writes(), 0, "not sent");
    assert_eq!(h.hints.len(), 1);
    assert_eq!(h.hints.targets(), vec![member_id_for(REPLICAS[2])]);
}

#[tokio::test(start_paused = true)]
async fn a_write_with_too_few_replicas_believed_up_is_refused_unsent() {
    let h = Harness::with(
        [
            Script::Answer(FAST),
            Script::Answer(Duration::ZERO),
            Script::Answer(Duration::ZERO),
        ],
        REQUEST_TIMEOUT,
        &[1, 2],
    );
    let started = Instant::now();
    let error = h
        .coordinator
        .write(KEY, put("v"), Consistency::Quorum)
        .await
        .expect_err("one replica believed up of two needed");
    assert_eq!(started.elapsed(), Duration::ZERO, "nothing waited for");
    assert!(
        matches!(error, Error::QuorumNotReached { sent: false, .. }),
        "{error:?}"
    );
    assert_eq!(error.outcome(), crate::error::Outcome::NotApplied);
    h.finish_background().await;
    for i in 0..3 {
        assert_eq!(h.replica(i).writes(), 0, "replica {i} was sent the write");
    }
    assert!(h.hints.is_empty(), "a refused write leaves no hints");

    // With two believed up it is sent; one stores it, the other fails:
    // fewer than W acknowledgements, and a replica holds the write.
    let h = Harness::with(
        [
            Script::Answer(FAST),
            Script::Fail(FAST),
            Script::Answer(FAST),
        ],
        REQUEST_TIMEOUT,
        &[2],
    );
    let error = h
        .coordinator
        .write(KEY, put("v"), Consistency::Quorum)
        .await
        .expect_err("one of two replicas asked fails");
    assert!(
        matches!(error, Error::QuorumNotReached { sent: true, .. }),
        "{error:?}"
    );
    assert_eq!(error.outcome(), crate::error::Outcome::Unknown);
    h.finish_background().await;
    assert!(
        h.replica(0).holds(KEY).is_some(),
        "a failed write may be stored"
    );
}
