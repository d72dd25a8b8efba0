//! `DKVSClient check`: the Jepsen-style workload of [`dkvs::workload`]
//! against a running cluster, judged by [`dkvs::checker`].
//!
//! Workers PUT (each a value of its own), DELETE and GET a few keys of
//! their own through one smart client for `--duration` seconds, every
//! operation recorded with its start, end and outcome. Then a second client
//! reads every key at ALL, waiting up to `--final-wait` seconds for every
//! replica to answer, and the checker judges the whole history. Kill, pause
//! and restart nodes while it runs: that is what it is for.
//!
//! The verdict goes to stdout: operations, failures, indeterminate writes,
//! availability, and every violation with the operations involved. Exit 0
//! when the history holds, 1 when it does not; when the final reads never
//! succeed and nothing was found in the rest, the exit code of their error
//! (3 unavailable, 4 timeout).

use std::fmt::Write as _;
use std::time::Duration;

use dkvs::Error;
use dkvs::checker::{self, Action, Op, Report, ViolationKind};
use dkvs::client::{Client, ClientOptions};
use dkvs::quorum::Consistency;
use dkvs::workload::{History, Recorder, Rng, Workload, read_outcome};
use tokio::time::Instant;

use crate::Outcome;

/// How often the progress bar is redrawn.
const REDRAW: Duration = Duration::from_millis(200);
/// How often a progress line is printed when stderr is not a terminal.
const PROGRESS_LINE_EVERY: Duration = Duration::from_secs(5);
/// How long to wait between attempts of a final read.
const FINAL_RETRY: Duration = Duration::from_millis(500);

// The flags of `DKVSClient check` (a plain comment: a doc comment here would
// replace the subcommand's description in --help).
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Seconds the workers run.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    duration: u64,
    /// Keys the workers share (fewer keys, more contention). They are named
    /// after the run (check-RUN-key-K): no other key is touched.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    keys: u64,
    /// Concurrent workers, each with one operation in flight.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=1000))]
    workers: u64,
    /// Seed of the workers' choices of operation and key (default: random;
    /// printed, so that a run can be repeated).
    #[arg(long)]
    seed: Option<u64>,
    /// Seconds the final reads at ALL wait for every replica to answer (a
    /// node still down or paused) before giving up.
    #[arg(long, default_value_t = 30)]
    final_wait: u64,
}

/// How the final reads at ALL went.
#[derive(Debug)]
enum FinalReads {
    /// Every key was read.
    Done,
    /// Some key could not be read within `--final-wait`.
    GaveUp { error: Error },
}

/// Runs `DKVSClient check` through `client` (its consistency is the
/// workers'); the final reads connect a second client at ALL.
pub async fn run(
    client: &Client,
    args: CheckArgs,
    rpc_timeout: Duration,
) -> Result<Outcome, Error> {
    if client.consistency() == Consistency::Any {
        return Err(Error::InvalidArgument(
            "check reads as well as writes, and --consistency any is for writes only: use one, quorum or all"
                .into(),
        ));
    }
    let seed = args.seed.unwrap_or_else(|| Rng::new(entropy()).next_u64());
    // A run id apart from the seed: a repeated seed writes the same values,
    // so its keys must differ from the earlier run's.
    let run = Rng::new(entropy() ^ seed.rotate_left(17)).next_u64() as u32;
    let prefix: &'static str = Box::leak(format!("check-{run:08x}-").into_boxed_str());
    let members: Vec<String> = client
        .ring()
        .members()
        .iter()
        .map(|m| m.address.clone())
        .collect();
    println!(
        "checking {} members at {}: {} workers on {} keys ({prefix}key-0..{}) for {} s, seed {seed} (--seed {seed} repeats the workers' choices)",
        members.len(),
        client.consistency().name(),
        args.workers,
        args.keys,
        args.keys - 1,
        args.duration,
    );
    let workload = Workload {
        prefix,
        ..Workload::new(args.keys)
    };
    let recorder = Recorder::new();
    let duration = Duration::from_secs(args.duration);
    run_workers(client, &workload, &args, seed, duration, &recorder).await;
    let workload_ops = recorder.len();

    let reader_options = ClientOptions {
        consistency: Consistency::All,
        rpc_timeout,
        ..client.options().clone()
    };
    let wait = Duration::from_secs(args.final_wait);
    let final_reads = match final_reads(
        &workload,
        args.workers as usize,
        &members,
        reader_options,
        wait,
        &recorder,
    )
    .await
    {
        Ok(()) => FinalReads::Done,
        Err(error) => FinalReads::GaveUp { error },
    };

    let history = recorder.take();
    let report = checker::check(&history.ops);
    print!(
        "{}",
        verdict(&history, workload_ops, args.keys, &final_reads, &report)
    );
    conclude(client, &workload, &report, final_reads, args.final_wait).await
}

/// What a checked run ends with: a violation is the verdict, whether or not
/// the final reads were done; without them there is no verdict on lost
/// writes; after a clean run the check keys are deleted.
async fn conclude(
    client: &Client,
    workload: &Workload,
    report: &Report,
    final_reads: FinalReads,
    final_wait: u64,
) -> Result<Outcome, Error> {
    if !report.is_valid() {
        eprintln!(
            "note: the check keys ({}key-*) are kept for inspection",
            workload.prefix
        );
        return Ok(Outcome::Violated);
    }
    match final_reads {
        FinalReads::GaveUp { error } => {
            eprintln!(
                "note: gave up on the final reads at ALL after {final_wait} s (--final-wait): without them no verdict on lost writes",
            );
            Err(error)
        }
        FinalReads::Done => {
            clean_up(client, workload).await;
            Ok(Outcome::Done)
        }
    }
}

/// Runs the workers until `duration` has passed (and their last operations
/// have ended), showing progress on stderr.
async fn run_workers(
    client: &Client,
    workload: &Workload,
    args: &CheckArgs,
    seed: u64,
    duration: Duration,
    recorder: &Recorder,
) {
    let until = workload.t0 + duration;
    let workers = futures::future::join_all((0..args.workers as usize).map(|id| {
        let seed = seed.wrapping_add(id as u64 * 7919);
        workload.run_worker(id, client, seed, until, recorder)
    }));
    tokio::pin!(workers);
    let bar = crate::progress::Bar::on_terminal(
        "check {spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} s  {msg}",
        Some(args.duration),
    );
    let mut next_line = PROGRESS_LINE_EVERY;
    let mut redraw = tokio::time::interval(REDRAW);
    loop {
        tokio::select! {
            _ = &mut workers => break,
            _ = redraw.tick() => {
                let elapsed = workload.t0.elapsed();
                let (ops, failed) = (recorder.len(), recorder.failures());
                let finishing = if elapsed >= duration { ", finishing the operations in flight" } else { "" };
                if let Some(bar) = &bar {
                    bar.set_position(elapsed.as_secs().min(args.duration));
                    bar.set_message(format!("{ops} ops, {failed} failed{finishing}"));
                } else if elapsed >= next_line && (elapsed < duration || elapsed >= duration + Duration::from_secs(1)) {
                    // (Not in the moment the workers stop: their last
                    // operations end within milliseconds unless a node is
                    // stuck.)
                    eprintln!("check: {} s, {ops} ops, {failed} failed{finishing}", elapsed.as_secs());
                    next_line += PROGRESS_LINE_EVERY;
                }
            }
        }
    }
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
}

/// Reads every key once at ALL through a client of its own, into the
/// history (recorded as client `id`). A read that fails is tried again
/// every half second until `wait` has passed since the first failure; then
/// the last error is returned.
async fn final_reads(
    workload: &Workload,
    id: usize,
    members: &[String],
    options: ClientOptions,
    wait: Duration,
    recorder: &Recorder,
) -> Result<(), Error> {
    let mut waiting_since: Option<Instant> = None;
    // Notes the first failure and says what is waited for; `Err` once
    // `wait` has passed.
    let mut wait_after = |error: Error, what: &str| -> Result<(), Error> {
        let since = *waiting_since.get_or_insert_with(|| {
            eprintln!("note: {what} failed: {error}");
            eprintln!(
                "note: the final reads at ALL need every replica of each key: waiting up to {} s for them to answer",
                wait.as_secs()
            );
            Instant::now()
        });
        if since.elapsed() >= wait {
            Err(error)
        } else {
            Ok(())
        }
    };
    let reader = loop {
        match Client::connect(members, options.clone()).await {
            Ok(reader) => break reader,
            Err(error) => wait_after(error, "connecting for the final reads")?,
        }
        tokio::time::sleep(FINAL_RETRY).await;
    };
    let mut outcome = Ok(());
    'keys: for k in 0..workload.keys {
        let key = workload.key(k);
        loop {
            let start = workload.tick();
            match reader.get_record(&key).await {
                Ok(record) => {
                    let op =
                        checker::Op::get(id, key, start, workload.tick(), read_outcome(record));
                    recorder.record(op, None);
                    break;
                }
                Err(error) => {
                    if let Err(error) =
                        wait_after(error, &format!("the final read of {key} at ALL"))
                    {
                        outcome = Err(error);
                        break 'keys;
                    }
                }
            }
            tokio::time::sleep(FINAL_RETRY).await;
        }
    }
    if outcome.is_ok()
        && let Some(since) = waiting_since
    {
        eprintln!(
            "note: every replica answered after {:.1} s",
            since.elapsed().as_secs_f64()
        );
    }
    reader.close().await;
    outcome
}

/// Deletes the run's keys once the history holds (best effort: a key left
/// behind is harmless, since no later run uses it).
async fn clean_up(client: &Client, workload: &Workload) {
    let mut left = 0;
    for k in 0..workload.keys {
        if client.delete(&workload.key(k)).await.is_err() {
            left += 1;
        }
    }
    if left > 0 {
        eprintln!(
            "note: {left} of the {} check keys ({}key-*) could not be deleted",
            workload.keys, workload.prefix
        );
    }
}

/// The verdict on a run, for stdout: the figures of the workload (the
/// first `workload_ops` ops of the history), how the final reads of `keys`
/// keys went, and every violation with the operations involved.
fn verdict(
    history: &History,
    workload_ops: usize,
    keys: u64,
    final_reads: &FinalReads,
    report: &Report,
) -> String {
    let mut out = String::new();
    let ops = &history.ops;
    let workload = &ops[..workload_ops.min(ops.len())];
    // The final reads recorded are all answered: availability is the
    // workload's alone.
    let read_at_end = ops.len() - workload.len();
    write_figures(&mut out, workload, report, read_at_end);
    let _ = match final_reads {
        FinalReads::Done => writeln!(out, "final reads at ALL: {read_at_end} of {keys} keys"),
        FinalReads::GaveUp { error } => writeln!(
            out,
            "final reads at ALL: {read_at_end} of {keys} keys; gave up: {error}"
        ),
    };
    write_failures(&mut out, history);
    write_violations(&mut out, history, report);
    let verdict = match final_reads {
        _ if !report.is_valid() => format!(
            "the history does NOT hold: {} (operations are numbered in the order they ended; times in µs since the start)",
            plural(report.violations.len(), "violation")
        ),
        FinalReads::Done => "the history holds: no stale, lost, non-monotonic or invented read, no value under a version its write did not get".to_string(),
        FinalReads::GaveUp { .. } => "no violation in what was recorded, but without the final reads lost writes are not checked".to_string(),
    };
    let _ = writeln!(out, "verdict: {verdict}");
    out
}

/// The workload's figures: operations, writes and reads, failures,
/// indeterminate writes and availability (the `read_at_end` final reads,
/// all answered, left out).
fn write_figures(out: &mut String, workload: &[Op], report: &Report, read_at_end: usize) {
    let writes = workload
        .iter()
        .filter(|op| !matches!(op.action, Action::Get { .. }))
        .count();
    let workload_ok = report.ok.saturating_sub(read_at_end);
    // In hundredths of a percent, rounded down: 9 failures in 250,000
    // operations read 99.99%, not 100.00%.
    let availability = if workload.is_empty() {
        10_000
    } else {
        workload_ok * 10_000 / workload.len()
    };
    let _ = writeln!(
        out,
        "operations: {} ({writes} writes, {} reads), failed: {}, indeterminate writes: {}, availability: {}.{:02}%",
        workload.len(),
        workload.len() - writes,
        report.failed,
        report.indeterminate,
        availability / 100,
        availability % 100
    );
}

/// The first few failed operations, with why they failed.
fn write_failures(out: &mut String, history: &History) {
    const SHOWN_FAILURES: usize = 5;
    if !history.errors.is_empty() {
        let _ = writeln!(
            out,
            "failed operations ({} of {} shown; times in µs since the start):",
            history.errors.len().min(SHOWN_FAILURES),
            history.errors.len()
        );
        for (index, why) in history.errors.iter().take(SHOWN_FAILURES) {
            let _ = writeln!(out, "  {}: {why}", checker::describe(&history.ops, *index));
        }
    }
}

/// How many violations of each kind (`2 stale reads`), then every
/// violation with the operations involved.
fn write_violations(out: &mut String, history: &History, report: &Report) {
    let kinds = violation_counts(report);
    if kinds.is_empty() {
        let _ = writeln!(out, "violations: 0");
    } else {
        let _ = writeln!(
            out,
            "violations: {} ({})",
            report.violations.len(),
            kinds.join(", ")
        );
    }
    for (n, violation) in report.violations.iter().enumerate() {
        let _ = writeln!(out, "{}. {violation}", n + 1);
        for &index in &violation.ops {
            let _ = write!(out, "     {}", checker::describe(&history.ops, index));
            if let Some((_, why)) = history.errors.iter().find(|(i, _)| *i == index) {
                let _ = write!(out, ": {why}");
            }
            let _ = writeln!(out);
        }
    }
}

/// Each kind of violation the report has, counted: `1 stale read`,
/// `2 lost writes`, `3 anomalies`.
fn violation_counts(report: &Report) -> Vec<String> {
    [
        ViolationKind::Stale,
        ViolationKind::LostWrite,
        ViolationKind::NonMonotonic,
        ViolationKind::Invented,
        ViolationKind::VersionMismatch,
        ViolationKind::Malformed,
    ]
    .iter()
    .filter(|kind| report.count(**kind) > 0)
    .map(|kind| {
        let n = report.count(*kind);
        let name = kind.to_string();
        match (n, name.strip_suffix('y')) {
            (1, _) => format!("1 {name}"),
            (_, Some(stem)) => format!("{n} {stem}ies"),
            _ if name.ends_with("ch") => format!("{n} {name}es"),
            _ => format!("{n} {name}s"),
        }
    })
    .collect()
}

/// `1 violation`, `2 violations`.
fn plural(n: usize, what: &str) -> String {
    if n == 1 {
        format!("{n} {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// Some bits that differ from run to run (time and process id).
fn entropy() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(7);
    nanos ^ (u64::from(std::process::id()) << 32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dkvs::checker::{Op, ReadOutcome, WriteOutcome};
    use dkvs::clock::Version;

    fn history(ops: Vec<Op>, errors: Vec<(usize, String)>) -> History {
        History { ops, errors }
    }

    #[test]
    fn a_history_that_holds_says_so_with_its_figures() {
        let v = Version::new(5, 1);
        let ops = vec![
            Op::put(0, "k", "a", 0, 10, WriteOutcome::Acked(v)),
            Op::put(1, "k", "b", 5, 30, WriteOutcome::Indeterminate),
            Op::get(
                0,
                "k",
                20,
                25,
                ReadOutcome::Found {
                    value: b"a".to_vec(),
                    version: Some(v),
                },
            ),
            Op::get(2, "k", 40, 45, ReadOutcome::Failed),
            // The final read.
            Op::get(
                3,
                "k",
                50,
                55,
                ReadOutcome::Found {
                    value: b"a".to_vec(),
                    version: Some(v),
                },
            ),
        ];
        let history = history(
            ops,
            vec![(1, "no answer".into()), (3, "unreachable".into())],
        );
        let report = checker::check(&history.ops);
        assert!(report.is_valid(), "{report:?}");
        let text = verdict(&history, 4, 1, &FinalReads::Done, &report);
        assert!(
            text.contains(
                "operations: 4 (2 writes, 2 reads), failed: 1, indeterminate writes: 1, availability: 50.00%"
            ),
            "{text}"
        );
        assert!(text.contains("final reads at ALL: 1 of 1 keys"), "{text}");
        assert!(
            text.contains("failed operations (2 of 2 shown; times in µs since the start):"),
            "{text}"
        );
        assert!(
            text.contains("PUT k=\"b\" indeterminate): no answer"),
            "{text}"
        );
        assert!(text.contains("violations: 0\n"), "{text}");
        assert!(text.ends_with("verdict: the history holds: no stale, lost, non-monotonic or invented read, no value under a version its write did not get\n"), "{text}");
    }

    #[test]
    fn a_lost_write_is_shown_with_every_operation_involved() {
        let ops = vec![
            Op::put(0, "k", "a", 0, 10, WriteOutcome::Acked(Version::new(5, 1))),
            Op::put(1, "k", "b", 20, 30, WriteOutcome::Indeterminate),
            // The final read finds nothing: the acknowledged write is gone.
            Op::get(2, "k", 40, 45, ReadOutcome::NotFound { version: None }),
        ];
        let history = history(ops, vec![(1, "no answer".into())]);
        let report = checker::check(&history.ops);
        assert!(!report.is_valid());
        let text = verdict(&history, 2, 1, &FinalReads::Done, &report);
        // One of two operations failed; availability is rounded down.
        assert!(text.contains("availability: 50.00%"), "{text}");
        assert!(text.contains("violations: 1 (1 lost write)\n"), "{text}");
        let mut two = report.clone();
        two.violations.push(two.violations[0].clone());
        let text_of_two = verdict(&history, 2, 1, &FinalReads::Done, &two);
        assert!(
            text_of_two.contains("violations: 2 (2 lost writes)\n"),
            "{text_of_two}"
        );
        assert!(text.contains("1. lost write: "), "{text}");
        // Each op involved on a line of its own, with its error if it failed.
        let involved: Vec<&str> = text.lines().filter(|l| l.starts_with("     #")).collect();
        assert_eq!(involved.len(), report.violations[0].ops.len(), "{text}");
        assert!(involved[0].contains("#2 (client 2"), "{text}");
        assert!(
            text.contains("verdict: the history does NOT hold: 1 violation "),
            "{text}"
        );
    }

    #[test]
    fn availability_is_rounded_down() {
        let acked = |i: u64| {
            Op::put(
                0,
                "k",
                format!("v{i}"),
                i * 10,
                i * 10 + 5,
                WriteOutcome::Acked(Version::new(i + 1, 1)),
            )
        };
        let mut ops: Vec<Op> = (0..99_999).map(acked).collect();
        ops.push(Op::put(
            0,
            "k",
            "lost",
            99_990,
            99_995,
            WriteOutcome::Indeterminate,
        ));
        let history = history(ops, vec![(99_999, "no answer".into())]);
        let report = checker::check(&history.ops);
        // 99.999% available: not shown as 100.00%.
        let text = verdict(&history, 100_000, 1, &FinalReads::Done, &report);
        assert!(text.contains("availability: 99.99%"), "{text}");
    }

    #[test]
    fn final_reads_that_gave_up_leave_no_verdict_on_lost_writes() {
        let ops = vec![Op::put(
            0,
            "k",
            "a",
            0,
            10,
            WriteOutcome::Acked(Version::new(5, 1)),
        )];
        let history = history(ops, Vec::new());
        let report = checker::check(&history.ops);
        let gave_up = FinalReads::GaveUp {
            error: Error::Unavailable("every node down".into()),
        };
        let text = verdict(&history, 1, 4, &gave_up, &report);
        assert!(
            text.contains("final reads at ALL: 0 of 4 keys; gave up: every node down"),
            "{text}"
        );
        assert!(text.contains("lost writes are not checked"), "{text}");
    }
}
