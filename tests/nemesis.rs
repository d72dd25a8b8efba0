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

use std::sync::Arc;
use std::time::Duration;

use common::TestCluster;
use dkvs::checker;
use dkvs::client::ClientOptions;
use dkvs::workload::{History, Recorder, Rng, Workload};
use tokio::time::Instant;

const KEYS: u64 = 16;
const CLIENTS: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_stays_correct_while_a_nemesis_kills_and_pauses_nodes() {
    let seconds: u64 = std::env::var("DKVS_NEMESIS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let seed = common::seed_from_env("DKVS_NEMESIS_SEED");
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
    let recorder = Recorder::new();
    let workload = Workload::new(KEYS);
    let until = workload.t0 + Duration::from_secs(seconds);
    let workers: Vec<_> = (0..CLIENTS)
        .map(|id| {
            let (client, recorder) = (client.clone(), recorder.clone());
            let seed = seed.wrapping_add(id as u64 * 7919);
            tokio::spawn(async move {
                workload
                    .run_worker(id, &client, seed, until, &recorder)
                    .await
            })
        })
        .collect();

    // The nemesis: one node at a time is killed and restarted, or paused and resumed.
    let mut rng = Rng::new(seed ^ 0x9E37_79B9_7F4A_7C15);
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
    let workload_ops = recorder.len();

    // Every node is up again: read every key's final state at ALL, into the
    // same history. These reads begin after every write has ended, so a
    // stale one is a lost write.
    let final_reader = cluster
        .client_with(ClientOptions {
            consistency: dkvs::quorum::Consistency::All,
            ..ClientOptions::default()
        })
        .await;
    workload
        .final_reads(CLIENTS, &final_reader, &recorder)
        .await
        .expect("final reads at ALL");
    let History {
        ops: history,
        errors,
    } = recorder.take();

    let report = checker::check(&history);
    // Availability of the workload alone (the final reads all succeeded).
    let workload_ok = report.ok - (history.len() - workload_ops);
    let availability = workload_ok as f64 / workload_ops.max(1) as f64;
    let writes = history[..workload_ops]
        .iter()
        .filter(|op| !matches!(op.action, checker::Action::Get { .. }))
        .count();
    println!("faults: {}", faults.join("; "));
    println!(
        "operations: {workload_ops} ({writes} writes, {} reads), failed: {}, indeterminate writes: {}, availability: {:.2}%",
        workload_ops - writes,
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
        workload_ops > 100,
        "too few operations ({workload_ops}) to mean anything"
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
