//! Fault injection: concurrent clients against a real 5-node cluster while a
//! nemesis kills (SIGKILL), pauses (SIGSTOP/SIGCONT) and restarts nodes, one
//! at a time. Every operation is recorded with its start and end time, and
//! the history is checked afterwards:
//!
//! 1. every value read was written by some PUT;
//! 2. no stale read: a GET returns a version at least as new as every write
//!    to its key acknowledged before the GET began;
//! 3. a version that an acknowledged PUT got always carries that PUT's value;
//! 4. at the end, no acknowledged write is missing: each key's final version
//!    is at least its newest acknowledged version.
//!
//! It prints availability (successful operations / all operations).
//! The default run lasts 8 seconds; set `DKVS_NEMESIS_SECS=300` for a long
//! run (`DKVS_NEMESIS_SECS=300 cargo test --release --test nemesis -- --nocapture`).

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::TestCluster;
use dkvs::client::{Client, ClientOptions};
use dkvs::clock::Version;

/// A read's result: `None` = key never seen; else the version and the value
/// (`None` for a tombstone).
type ReadResult = Option<(Version, Option<Vec<u8>>)>;

/// What one operation did.
#[derive(Clone, Debug)]
enum Outcome {
    /// PUT or DELETE acknowledged with this version.
    Written(Version),
    /// GET answered: `None` = key never seen; `Some((version, value))`, value
    /// `None` for a tombstone.
    Read(ReadResult),
    /// The operation failed; it may or may not have taken effect.
    Failed(String),
}

#[derive(Clone, Debug)]
struct Op {
    client: usize,
    key: String,
    /// The value a PUT wrote (`None` for GET and DELETE).
    wrote: Option<Vec<u8>>,
    is_write: bool,
    start: Instant,
    end: Instant,
    outcome: Outcome,
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
    until: Instant,
    history: Arc<Mutex<Vec<Op>>>,
) {
    let mut rng = Rng(seed | 1);
    let mut sequence = 0u64;
    while Instant::now() < until {
        let key = format!("key-{}", rng.below(KEYS));
        let roll = rng.below(100);
        let start = Instant::now();
        let (wrote, is_write, outcome) = if roll < 45 {
            sequence += 1;
            let value = format!("c{id}-{sequence}").into_bytes();
            let outcome = match client.put(&key, value.clone()).await {
                Ok(ack) => Outcome::Written(ack.version),
                Err(error) => Outcome::Failed(error.to_string()),
            };
            (Some(value), true, outcome)
        } else if roll < 50 {
            let outcome = match client.delete(&key).await {
                Ok(ack) => Outcome::Written(ack.version),
                Err(error) => Outcome::Failed(error.to_string()),
            };
            (None, true, outcome)
        } else {
            let outcome = match client.get_record(&key).await {
                Ok(record) => {
                    Outcome::Read(record.map(|r| (r.version, r.value.map(|v| v.to_vec()))))
                }
                Err(error) => Outcome::Failed(error.to_string()),
            };
            (None, false, outcome)
        };
        let op = Op {
            client: id,
            key,
            wrote,
            is_write,
            start,
            end: Instant::now(),
            outcome,
        };
        history.lock().unwrap_or_else(|p| p.into_inner()).push(op);
    }
}

/// Checks the history; returns the violations found.
fn check(history: &[Op], finals: &HashMap<String, ReadResult>) -> Vec<String> {
    let mut violations = Vec::new();
    // Values ever attempted per key, and the value of each acknowledged version.
    let mut attempted: HashMap<&str, Vec<&[u8]>> = HashMap::new();
    let mut value_of: HashMap<Version, Option<&[u8]>> = HashMap::new();
    for op in history.iter().filter(|op| op.is_write) {
        if let Some(value) = &op.wrote {
            attempted.entry(&op.key).or_default().push(value);
        }
        if let Outcome::Written(version) = op.outcome {
            value_of.insert(version, op.wrote.as_deref());
        }
    }
    // Per key: acknowledged writes by end time, with the newest version
    // acknowledged so far (a running maximum), for binary search.
    let mut acked_by_end: HashMap<&str, Vec<(Instant, Version)>> = HashMap::new();
    for op in history.iter().filter(|op| op.is_write) {
        if let Outcome::Written(version) = op.outcome {
            acked_by_end
                .entry(&op.key)
                .or_default()
                .push((op.end, version));
        }
    }
    for writes in acked_by_end.values_mut() {
        writes.sort_by_key(|(end, _)| *end);
        let mut newest = Version::default();
        for (_, version) in writes.iter_mut() {
            newest = newest.max(*version);
            *version = newest;
        }
    }
    for read in history.iter().filter(|op| !op.is_write) {
        let Outcome::Read(result) = &read.outcome else {
            continue;
        };
        let read_version = result.as_ref().map(|(v, _)| *v).unwrap_or_default();
        // 1. Every value read was written.
        if let Some((_, Some(value))) = result
            && !attempted
                .get(read.key.as_str())
                .is_some_and(|vs| vs.contains(&value.as_slice()))
        {
            violations.push(format!(
                "client {} read a value nobody wrote to {}: {:?}",
                read.client,
                read.key,
                String::from_utf8_lossy(value)
            ));
        }
        // 2. No stale read.
        let newest_acked_before = acked_by_end.get(read.key.as_str()).and_then(|writes| {
            let acked_before = writes.partition_point(|(end, _)| *end < read.start);
            acked_before.checked_sub(1).map(|last| writes[last].1)
        });
        if let Some(acked) = newest_acked_before
            && read_version < acked
        {
            violations.push(format!(
                "stale read of {} by client {}: got {read_version}, but {acked} was acknowledged before the read began",
                read.key, read.client
            ));
        }
        // 3. An acknowledged version always carries its own value.
        if let Some((version, value)) = result
            && let Some(expected) = value_of.get(version)
            && value.as_deref() != *expected
        {
            violations.push(format!(
                "{} at {version} read {:?}, but that version wrote {:?}",
                read.key, value, expected
            ));
        }
    }
    // 4. No acknowledged write is missing at the end.
    for (key, final_record) in finals {
        let final_version = final_record.as_ref().map(|(v, _)| *v).unwrap_or_default();
        let newest_acked = history
            .iter()
            .filter(|w| w.is_write && &w.key == key)
            .filter_map(|w| match w.outcome {
                Outcome::Written(v) => Some(v),
                _ => None,
            })
            .max();
        if let Some(acked) = newest_acked
            && final_version < acked
        {
            violations.push(format!(
                "{key}: acknowledged {acked} is lost; the cluster ends at {final_version}"
            ));
        }
    }
    violations
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
    let history = Arc::new(Mutex::new(Vec::new()));
    let until = Instant::now() + Duration::from_secs(seconds);
    let workers: Vec<_> = (0..CLIENTS)
        .map(|id| {
            tokio::spawn(run_client(
                id,
                client.clone(),
                seed.wrapping_add(id as u64 * 7919),
                until,
                history.clone(),
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
    // Every node is up again: read every key's final state at ALL.
    let final_reader = cluster
        .client_with(ClientOptions {
            consistency: dkvs::quorum::Consistency::All,
            ..ClientOptions::default()
        })
        .await;
    let mut finals = HashMap::new();
    for k in 0..KEYS {
        let key = format!("key-{k}");
        let record = final_reader
            .get_record(&key)
            .await
            .expect("final read at ALL");
        finals.insert(
            key,
            record.map(|r| (r.version, r.value.map(|v| v.to_vec()))),
        );
    }
    let history = history.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let total = history.len();
    let failed: Vec<&Op> = history
        .iter()
        .filter(|op| matches!(op.outcome, Outcome::Failed(_)))
        .collect();
    let availability = (total - failed.len()) as f64 / total.max(1) as f64;
    println!("faults: {}", faults.join("; "));
    println!(
        "operations: {total} ({} writes, {} reads), failed: {}, availability: {:.2}%",
        history.iter().filter(|op| op.is_write).count(),
        history.iter().filter(|op| !op.is_write).count(),
        failed.len(),
        availability * 100.0
    );
    for op in failed.iter().take(5) {
        if let Outcome::Failed(why) = &op.outcome {
            println!(
                "  failed {} of {}: {why}",
                if op.is_write { "write" } else { "read" },
                op.key
            );
        }
    }
    let violations = check(&history, &finals);
    assert!(
        violations.is_empty(),
        "{} violations (seed {seed}):\n{}",
        violations.len(),
        violations.join("\n")
    );
    assert!(total > 100, "too few operations ({total}) to mean anything");
    assert!(!faults.is_empty(), "the nemesis injected no fault");
    assert!(
        availability >= 0.99,
        "availability {:.2}% below 99%",
        availability * 100.0
    );
    client.close().await;
    final_reader.close().await;
}

/// The checker itself catches what it must (a checker that cannot fail
/// proves nothing).
#[test]
fn the_checker_flags_stale_reads_lost_writes_and_invented_values() {
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let v1 = Version::new(1, 1);
    let v2 = Version::new(2, 1);
    let write = |value: &str, version: Version, start: u64, end: u64| Op {
        client: 0,
        key: "k".into(),
        wrote: Some(value.as_bytes().to_vec()),
        is_write: true,
        start: at(start),
        end: at(end),
        outcome: Outcome::Written(version),
    };
    let read = |result: ReadResult, start: u64| Op {
        client: 1,
        key: "k".into(),
        wrote: None,
        is_write: false,
        start: at(start),
        end: at(start + 1),
        outcome: Outcome::Read(result),
    };
    let good = vec![
        write("a", v1, 0, 10),
        write("b", v2, 20, 30),
        read(Some((v2, Some(b"b".to_vec()))), 40),
    ];
    let finals = HashMap::from([("k".to_string(), Some((v2, Some(b"b".to_vec()))))]);
    assert!(check(&good, &finals).is_empty());
    // A read that began after v2 was acknowledged but returned v1.
    let mut stale = good.clone();
    stale.push(read(Some((v1, Some(b"a".to_vec()))), 50));
    assert_eq!(check(&stale, &finals).len(), 1);
    // A read of a value never written.
    let mut invented = good.clone();
    invented.push(read(Some((Version::new(9, 9), Some(b"zzz".to_vec()))), 50));
    assert_eq!(check(&invented, &finals).len(), 1);
    // The final state lost v2.
    let lost = HashMap::from([("k".to_string(), Some((v1, Some(b"a".to_vec()))))]);
    assert_eq!(check(&good, &lost).len(), 1);
    // v2 carrying a's value.
    let mut mixed = good.clone();
    mixed.push(read(Some((v2, Some(b"a".to_vec()))), 50));
    assert_eq!(check(&mixed, &finals).len(), 1);
}
