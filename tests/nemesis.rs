//! Fault injection: concurrent clients against a real 5-node cluster while a
//! nemesis kills (SIGKILL), pauses (SIGSTOP/SIGCONT) and restarts nodes, one
//! at a time. Every operation is recorded with its start and end time and
//! its outcome, each PUT writing a value of its own; once the cluster has
//! healed every key is read at ALL, and [`dkvs::checker`] judges the whole
//! history: no stale, lost, non-monotonic or invented read, no value at a
//! version its write did not get. Any failed write counts as indeterminate
//! (it may still take effect), whatever error the client gave.
//!
//! It prints availability (successful operations / all operations, failed
//! and indeterminate ones counting against it).
//! The default run lasts 8 seconds; set `DKVS_NEMESIS_SECS=300` for a long
//! run (`DKVS_NEMESIS_SECS=300 cargo test --release --test nemesis -- --nocapture`).

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::TestCluster;
use dkvs::checker::{self, Op, ReadOutcome, Tick, WriteOutcome};
use dkvs::client::{Client, ClientOptions};
use dkvs::record::Record;

/// What the clients record: the history, and why operations failed.
#[derive(Default)]
struct Recorder {
    /// Every operation, in the order it finished.
    history: Vec<Op>,
    /// The error of each failed operation: (op index, error).
    errors: Vec<(usize, String)>,
}

/// Ticks for the checker: microseconds since the run began.
fn tick(t0: Instant) -> Tick {
    t0.elapsed().as_micros() as Tick
}

/// A read's outcome from the client's answer.
fn read_outcome(record: Option<Record>) -> ReadOutcome {
    match record {
        None => ReadOutcome::NotFound { version: None },
        Some(Record {
            version,
            value: None,
            ..
        }) => ReadOutcome::NotFound {
            version: Some(version),
        },
        Some(Record {
            version,
            value: Some(value),
            ..
        }) => ReadOutcome::Found {
            value: value.to_vec(),
            version: Some(version),
        },
    }
}

/// xorshift64*: a small deterministic generator, seeded per run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const KEYS: u64 = 16;
const CLIENTS: usize = 4;

async fn run_client(
    id: usize,
    client: Arc<Client>,
    seed: u64,
    t0: Instant,
    until: Instant,
    recorder: Arc<Mutex<Recorder>>,
) {
    let mut rng = Rng(seed | 1);
    let mut sequence = 0u64;
    while Instant::now() < until {
        let key = format!("key-{}", rng.below(KEYS));
        let roll = rng.below(100);
        let start = tick(t0);
        // Every PUT writes a value of its own: the checker tells writes
        // apart by their values.
        let (op, error) = if roll < 45 {
            sequence += 1;
            let value = format!("c{id}-{sequence}").into_bytes();
            let (outcome, error) = match client.put(&key, value.clone()).await {
                Ok(ack) => (WriteOutcome::Acked(ack.version), None),
                Err(error) => (WriteOutcome::Indeterminate, Some(error.to_string())),
            };
            (Op::put(id, key, value, start, tick(t0), outcome), error)
        } else if roll < 50 {
            let (outcome, error) = match client.delete(&key).await {
                Ok(ack) => (WriteOutcome::Acked(ack.version), None),
                Err(error) => (WriteOutcome::Indeterminate, Some(error.to_string())),
            };
            (Op::delete(id, key, start, tick(t0), outcome), error)
        } else {
            let (outcome, error) = match client.get_record(&key).await {
                Ok(record) => (read_outcome(record), None),
                Err(error) => (ReadOutcome::Failed, Some(error.to_string())),
            };
            (Op::get(id, key, start, tick(t0), outcome), error)
        };
        let mut recorder = recorder.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(error) = error {
            let index = recorder.history.len();
            recorder.errors.push((index, error));
        }
        recorder.history.push(op);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_stays_correct_while_a_nemesis_kills_and_pauses_nodes() {
    let seconds: u64 = std::env::var("DKVS_NEMESIS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let seed = std::env::var("DKVS_NEMESIS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(7)
        });
    println!("nemesis: {seconds} s, seed {seed} (DKVS_NEMESIS_SEED={seed} to replay the schedule)");
    let mut cluster = TestCluster::start(5).await;
    let client = Arc::new(
        cluster
            .client_with(ClientOptions {
                rpc_timeout: Duration::from_secs(2),
                ..ClientOptions::default()
            })
            .await,
    );
    let recorder = Arc::new(Mutex::new(Recorder::default()));
    let t0 = Instant::now();
    let until = t0 + Duration::from_secs(seconds);
    let workers: Vec<_> = (0..CLIENTS)
        .map(|id| {
            tokio::spawn(run_client(
                id,
                client.clone(),
                seed.wrapping_add(id as u64 * 7919),
                t0,
                until,
                recorder.clone(),
            ))
        })
        .collect();

    // The nemesis: one node at a time is killed and restarted, or paused and resumed.
    let mut rng = Rng(seed ^ 0x9E37_79B9_7F4A_7C15);
    let mut faults = Vec::new();
    while Instant::now() + Duration::from_secs(2) < until {
        tokio::time::sleep(Duration::from_millis(300 + rng.below(700))).await;
        let victim = rng.below(5) as usize;
        let outage = Duration::from_millis(500 + rng.below(1500));
        if rng.below(2) == 0 {
            faults.push(format!("kill node {victim} for {outage:?}"));
            cluster.kill(victim);
            tokio::time::sleep(outage).await;
            cluster.restart(victim).await;
        } else {
            faults.push(format!("pause node {victim} for {outage:?}"));
            cluster.pause(victim);
            tokio::time::sleep(outage).await;
            cluster.resume(victim);
        }
    }
    for worker in workers {
        worker.await.expect("client task");
    }
    let Recorder {
        mut history,
        errors,
    } = std::mem::take(&mut *recorder.lock().unwrap_or_else(|p| p.into_inner()));
    let workload = history.len();

    // Every node is up again: read every key's final state at ALL, into the
    // same history. These reads begin after every write has ended, so a
    // stale one is a lost write.
    let final_reader = cluster
        .client_with(ClientOptions {
            consistency: dkvs::quorum::Consistency::All,
            ..ClientOptions::default()
        })
        .await;
    for k in 0..KEYS {
        let key = format!("key-{k}");
        let start = tick(t0);
        let record = final_reader
            .get_record(&key)
            .await
            .expect("final read at ALL");
        history.push(Op::get(CLIENTS, key, start, tick(t0), read_outcome(record)));
    }

    let report = checker::check(&history);
    // Availability of the workload alone (the final reads all succeeded).
    let workload_ok = report.ok - (history.len() - workload);
    let availability = workload_ok as f64 / workload.max(1) as f64;
    let writes = history[..workload]
        .iter()
        .filter(|op| !matches!(op.action, checker::Action::Get { .. }))
        .count();
    println!("faults: {}", faults.join("; "));
    println!(
        "operations: {workload} ({writes} writes, {} reads), failed: {}, indeterminate writes: {}, availability: {:.2}%",
        workload - writes,
        report.failed,
        report.indeterminate,
        availability * 100.0
    );
    println!("checked: {report}");
    for (index, why) in errors.iter().take(5) {
        println!("  {}: {why}", checker::describe(&history, *index));
    }
    assert!(
        report.is_valid(),
        "{} violations (seed {seed}):\n{}",
        report.violations.len(),
        report
            .violations
            .iter()
            .take(20)
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        workload > 100,
        "too few operations ({workload}) to mean anything"
    );
    assert!(!faults.is_empty(), "the nemesis injected no fault");
    assert!(
        availability >= 0.99,
        "availability {:.2}% below 99%",
        availability * 100.0
    );
    client.close().await;
    final_reader.close().await;
}
