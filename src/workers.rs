//! The node's periodic workers (heartbeats, hint delivery, anti-entropy,
//! membership, fsync) and what each reports.
//!
//! A worker is a round of work run again and again until shutdown. A round
//! answers `Ok(())` or a [`WorkerError`] saying, for a person, why it could
//! not do its job; what counts as a failed round is each worker's to say
//! (its round's doc comment). A peer being down is usually not a failure:
//! a worker fails when it cannot do its job at all.
//!
//! The runner ([`Workers::start`]) is the one place a failed round is
//! logged, with the worker's name, and it keeps a [`WorkerReport`] per
//! worker: rounds, failures, the current streak of failures, the last error
//! and the last success. After failures in a row it waits longer between
//! rounds (exponential, capped), so a worker that cannot work does not spin
//! on a broken disk or an empty cluster; a success brings the normal
//! period back. `Cluster.Status` publishes every report ([`Workers`] is the
//! registry the node owns), and `DKVSClient status` names a worker that
//! keeps failing.
//!
//! The report is pure (times come in as arguments) so its arithmetic is
//! unit-tested without a clock; the async loop only sleeps, runs a round
//! and records the result. Shutdown cancels the wait and the round in
//! progress of every worker at once.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::clock::wall_clock_ms;
use crate::locks::Locked;

/// The longest wait backoff reaches by default, whatever the period.
const BACKOFF_MAX_DEFAULT: Duration = Duration::from_secs(30);

/// How many periods the default backoff may grow to.
const BACKOFF_PERIODS_MAX: u32 = 10;

/// Why a round could not do its job, in words for the operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerError(String);

impl WorkerError {
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

impl std::fmt::Display for WorkerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for WorkerError {}

impl From<crate::error::Error> for WorkerError {
    fn from(error: crate::error::Error) -> Self {
        Self(error.to_string())
    }
}

/// What one round of a worker ends with.
pub type RoundResult = Result<(), WorkerError>;

/// " (and N more THINGs)" when `n` more failed like the one a message
/// names, else nothing.
pub fn more(n: usize, thing: &str) -> String {
    match n {
        0 => String::new(),
        1 => format!(" (and 1 more {thing})"),
        n => format!(" (and {n} more {thing}s)"),
    }
}

/// What a worker is doing now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerState {
    /// Waiting its normal period for the next round.
    Idle,
    /// In a round.
    Running,
    /// Waiting longer than its period: the last rounds failed.
    BackingOff,
}

impl WorkerState {
    /// The name `Cluster.Status` carries.
    pub fn name(self) -> &'static str {
        match self {
            WorkerState::Idle => "idle",
            WorkerState::Running => "running",
            WorkerState::BackingOff => "backing off",
        }
    }
}

/// One worker's record of its rounds, and the wait before its next one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerReport {
    /// The normal time from the start of a round to the start of the next.
    pub period: Duration,
    /// The longest that time grows to after failures in a row.
    pub backoff_max: Duration,
    /// Rounds ended, failed or not (a round cut short by shutdown is not
    /// counted).
    pub rounds: u64,
    /// Rounds that failed, in all.
    pub failures: u64,
    /// Rounds that failed since the last success.
    pub consecutive_failures: u32,
    /// The last failed round's error, if any round failed.
    pub last_error: Option<String>,
    /// When the last round failed (unix ms; 0: never).
    pub last_error_unix_ms: u64,
    /// When the last round succeeded (unix ms; 0: never).
    pub last_success_unix_ms: u64,
    /// What the worker is doing now.
    pub state: WorkerState,
}

impl WorkerReport {
    /// A worker that has not run yet, whose wait grows to `backoff_max` at
    /// most (`period` or less: it never backs off).
    pub fn new(period: Duration, backoff_max: Duration) -> Self {
        Self {
            period,
            backoff_max: backoff_max.max(period),
            rounds: 0,
            failures: 0,
            consecutive_failures: 0,
            last_error: None,
            last_error_unix_ms: 0,
            last_success_unix_ms: 0,
            state: WorkerState::Idle,
        }
    }

    /// The default cap of the wait: ten periods, at most 30 s, and never
    /// less than one period.
    pub fn backoff_max_for(period: Duration) -> Duration {
        period
            .saturating_mul(BACKOFF_PERIODS_MAX)
            .min(BACKOFF_MAX_DEFAULT)
            .max(period)
    }

    /// A round starts.
    pub fn started(&mut self) {
        self.state = WorkerState::Running;
    }

    /// A round succeeded at `now_unix_ms`. Answers how many failed rounds
    /// in a row this success ends (0: none).
    pub fn record_success(&mut self, now_unix_ms: u64) -> u32 {
        let ended = self.consecutive_failures;
        self.rounds += 1;
        self.consecutive_failures = 0;
        self.last_success_unix_ms = now_unix_ms;
        self.state = self.waiting_state();
        ended
    }

    /// A round failed at `now_unix_ms` with `error`. Answers whether the
    /// failure is worth a warning in the log: the first of a streak, then
    /// the 2nd, 4th, 8th... (a worker failing every round would otherwise
    /// fill the log).
    pub fn record_failure(&mut self, error: String, now_unix_ms: u64) -> bool {
        self.rounds += 1;
        self.failures += 1;
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        self.last_error = Some(error);
        self.last_error_unix_ms = now_unix_ms;
        self.state = self.waiting_state();
        self.consecutive_failures.is_power_of_two()
    }

    /// The time from the start of the round that just ended to the start
    /// of the next: the period, doubled for each failure in a row after
    /// the first (one failure may be a blip), up to `backoff_max`.
    pub fn next_delay(&self) -> Duration {
        let doublings = self.consecutive_failures.saturating_sub(1).min(20);
        self.period
            .saturating_mul(1 << doublings)
            .min(self.backoff_max)
            .max(self.period)
    }

    /// Idle, or backing off when the next wait is longer than the period.
    fn waiting_state(&self) -> WorkerState {
        if self.next_delay() > self.period {
            WorkerState::BackingOff
        } else {
            WorkerState::Idle
        }
    }
}

/// When a worker runs.
#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    /// From start to the first round.
    pub first: Duration,
    /// The normal time between the starts of two rounds.
    pub every: Duration,
    /// How long that time may grow after failures in a row.
    pub backoff_max: Duration,
}

impl Schedule {
    /// Every `every`, the first round after `first`, with the default
    /// backoff cap.
    pub fn every(first: Duration, every: Duration) -> Self {
        Self {
            first,
            every,
            backoff_max: WorkerReport::backoff_max_for(every),
        }
    }

    /// The same, never backing off.
    pub fn without_backoff(self) -> Self {
        Self {
            backoff_max: self.every,
            ..self
        }
    }
}

/// One registered worker: its name and its report, shared by its loop and
/// the readers of [`Workers::reports`].
struct Registered {
    name: &'static str,
    report: Arc<Mutex<WorkerReport>>,
}

/// The node's workers, in the order they were started, and their reports.
#[derive(Clone, Default)]
pub struct Workers {
    /// Std mutexes: each is held for a copy or one update, never across
    /// an `.await`.
    registered: Arc<Mutex<Vec<Registered>>>,
}

impl Workers {
    pub fn new() -> Self {
        Self::default()
    }

    /// Each worker's name and a copy of its report, in start order.
    pub fn reports(&self) -> Vec<(&'static str, WorkerReport)> {
        self.registered
            .locked()
            .iter()
            .map(|w| (w.name, w.report.locked().clone()))
            .collect()
    }

    /// Runs `round` on `schedule` until `shutdown` is cancelled, which
    /// also abandons a round in progress. A round that overruns its wait
    /// starts the next one at once rather than bunching rounds up.
    pub fn start<Round, F>(
        &self,
        name: &'static str,
        schedule: Schedule,
        shutdown: CancellationToken,
        mut round: Round,
    ) -> tokio::task::JoinHandle<()>
    where
        Round: FnMut() -> F + Send + 'static,
        F: Future<Output = RoundResult> + Send,
    {
        let report = Arc::new(Mutex::new(WorkerReport::new(
            schedule.every,
            schedule.backoff_max,
        )));
        self.registered.locked().push(Registered {
            name,
            report: report.clone(),
        });
        tokio::spawn(async move {
            let mut next = Instant::now() + schedule.first;
            loop {
                tokio::select! {
                    biased;
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep_until(next) => {}
                }
                let started = Instant::now();
                report.locked().started();
                let result = tokio::select! {
                    biased;
                    () = shutdown.cancelled() => break,
                    result = round() => result,
                };
                next = started + record(name, &mut report.locked(), result);
            }
            tracing::debug!(worker = name, "stopped");
        })
    }
}

/// Records a round's `result` in `report` and logs a failure (or the end
/// of a streak of them); answers the wait before the next round.
fn record(name: &'static str, report: &mut WorkerReport, result: RoundResult) -> Duration {
    let now_ms = wall_clock_ms();
    match result {
        Ok(()) => {
            let ended = report.record_success(now_ms);
            if ended > 0 {
                tracing::info!(
                    worker = name,
                    failed_rounds = ended,
                    "worker round succeeded again"
                );
            }
        }
        Err(error) => {
            let message = error.to_string();
            let warn = report.record_failure(message.clone(), now_ms);
            let (in_a_row, next_ms) = (
                report.consecutive_failures,
                report.next_delay().as_millis() as u64,
            );
            if warn {
                tracing::warn!(worker = name, in_a_row, next_ms, error = %message, "worker round failed");
            } else {
                tracing::debug!(worker = name, in_a_row, next_ms, error = %message, "worker round failed");
            }
        }
    }
    report.next_delay()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const MS: Duration = Duration::from_millis(1);

    /// A report with the default backoff cap.
    fn report(period: Duration) -> WorkerReport {
        WorkerReport::new(period, WorkerReport::backoff_max_for(period))
    }

    fn failed(report: &mut WorkerReport, times: u32) {
        for i in 0..times {
            report.record_failure(format!("failure {i}"), 1000 + u64::from(i));
        }
    }

    #[test]
    fn the_wait_doubles_after_the_first_failure_up_to_the_cap() {
        let mut report = report(100 * MS);
        assert_eq!(report.backoff_max, 1000 * MS, "ten periods");
        assert_eq!(report.next_delay(), 100 * MS);
        let mut delays = Vec::new();
        let mut states = Vec::new();
        for _ in 0..7 {
            failed(&mut report, 1);
            delays.push(report.next_delay().as_millis());
            states.push(report.state);
        }
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000, 1000]);
        // One failure may be a blip: the worker is idle, not backing off.
        assert_eq!(states[0], WorkerState::Idle);
        assert!(states[1..].iter().all(|s| *s == WorkerState::BackingOff));
        // A very long streak neither overflows nor passes the cap.
        failed(&mut report, 1000);
        assert_eq!(report.next_delay(), 1000 * MS);
    }

    #[test]
    fn the_cap_is_ten_periods_at_most_30_s_and_never_below_the_period() {
        assert_eq!(WorkerReport::backoff_max_for(500 * MS), 5000 * MS);
        assert_eq!(
            WorkerReport::backoff_max_for(Duration::from_secs(10)),
            Duration::from_secs(30)
        );
        let mut slow = report(Duration::from_secs(60));
        failed(&mut slow, 5);
        assert_eq!(slow.next_delay(), Duration::from_secs(60));
        assert_eq!(slow.state, WorkerState::Idle, "never waits past its period");
        let schedule = Schedule::every(MS, 250 * MS).without_backoff();
        let mut never = WorkerReport::new(schedule.every, schedule.backoff_max);
        failed(&mut never, 5);
        assert_eq!(never.next_delay(), 250 * MS);
        assert_eq!(never.state, WorkerState::Idle);
    }

    #[test]
    fn a_success_resets_the_streak_and_the_wait_but_not_the_totals() {
        let mut report = report(100 * MS);
        assert_eq!(report.record_success(500), 0);
        failed(&mut report, 4);
        assert_eq!(report.consecutive_failures, 4);
        assert_eq!(report.record_success(2000), 4, "ends a streak of four");
        assert_eq!(report.consecutive_failures, 0);
        assert_eq!(report.next_delay(), 100 * MS);
        assert_eq!(report.state, WorkerState::Idle);
        assert_eq!((report.rounds, report.failures), (6, 4));
        // The last error stays, for the record, with its time.
        assert_eq!(report.last_error.as_deref(), Some("failure 3"));
        assert_eq!(report.last_error_unix_ms, 1003);
        assert_eq!(report.last_success_unix_ms, 2000);
    }

    #[test]
    fn a_streak_is_worth_a_warning_at_its_first_second_fourth_eighth_failure() {
        let mut report = report(100 * MS);
        let warned: Vec<u32> = (1..=20)
            .filter(|i| report.record_failure(format!("failure {i}"), 0))
            .collect();
        assert_eq!(warned, [1, 2, 4, 8, 16]);
        report.started();
        assert_eq!(report.state, WorkerState::Running);
        assert_eq!(report.state.name(), "running");
    }

    #[tokio::test(start_paused = true)]
    async fn a_worker_runs_on_time_and_stops_on_shutdown() {
        let rounds = Arc::new(AtomicUsize::new(0));
        let shutdown = CancellationToken::new();
        let counted = rounds.clone();
        let workers = Workers::new();
        let worker = workers.start(
            "test",
            Schedule::every(50 * MS, 100 * MS),
            shutdown.clone(),
            move || {
                let counted = counted.clone();
                async move {
                    counted.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            },
        );
        tokio::time::sleep(40 * MS).await;
        assert_eq!(rounds.load(Ordering::SeqCst), 0, "not before `first`");
        tokio::time::sleep(320 * MS).await;
        // Rounds at 50, 150, 250, 350 ms.
        assert_eq!(rounds.load(Ordering::SeqCst), 4);
        let reports = workers.reports();
        assert_eq!(reports.len(), 1);
        let (name, report) = &reports[0];
        assert_eq!((*name, report.rounds, report.failures), ("test", 4, 0));
        assert_eq!(report.state, WorkerState::Idle);
        assert!(report.last_success_unix_ms > 0);
        shutdown.cancel();
        worker.await.expect("worker stops");
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_abandons_a_round_in_progress() {
        let shutdown = CancellationToken::new();
        let workers = Workers::new();
        let worker = workers.start(
            "stuck",
            Schedule::every(Duration::ZERO, 10 * MS),
            shutdown.clone(),
            std::future::pending::<RoundResult>,
        );
        tokio::time::sleep(50 * MS).await;
        assert_eq!(workers.reports()[0].1.state, WorkerState::Running);
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(1), worker)
            .await
            .expect("a stuck round does not hold shutdown")
            .expect("worker ends");
    }

    #[tokio::test(start_paused = true)]
    async fn failing_rounds_back_off_and_a_success_brings_the_period_back() {
        let rounds = Arc::new(AtomicUsize::new(0));
        let failing = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let shutdown = CancellationToken::new();
        let workers = Workers::new();
        let (counted, fails) = (rounds.clone(), failing.clone());
        let _worker = workers.start(
            "flaky",
            Schedule::every(Duration::ZERO, 100 * MS),
            shutdown.clone(),
            move || {
                let (counted, fails) = (counted.clone(), fails.clone());
                async move {
                    counted.fetch_add(1, Ordering::SeqCst);
                    if fails.load(Ordering::SeqCst) {
                        Err(WorkerError::new("the disk is gone"))
                    } else {
                        Ok(())
                    }
                }
            },
        );
        // Failing rounds at 0, 100, 300, 700, 1500 ms, then every 1000 ms.
        tokio::time::sleep(1550 * MS).await;
        assert_eq!(rounds.load(Ordering::SeqCst), 5);
        let report = workers.reports()[0].1.clone();
        assert_eq!((report.failures, report.consecutive_failures), (5, 5));
        assert_eq!(report.state, WorkerState::BackingOff);
        assert_eq!(report.last_error.as_deref(), Some("the disk is gone"));
        failing.store(false, Ordering::SeqCst);
        // The round at 2500 ms succeeds; the next ones come every 100 ms.
        tokio::time::sleep(1000 * MS).await;
        tokio::time::sleep(250 * MS).await;
        assert_eq!(rounds.load(Ordering::SeqCst), 8, "2500, 2600, 2700");
        let report = workers.reports()[0].1.clone();
        assert_eq!((report.failures, report.consecutive_failures), (5, 0));
        assert_eq!(report.state, WorkerState::Idle);
        shutdown.cancel();
    }
}
