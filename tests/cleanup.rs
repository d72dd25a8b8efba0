//! Dropping moved data, with real processes: an old owner drops the records
//! of a range it no longer replicates only once every new owner of that
//! range confirmed holding them, and copies made in the background
//! (anti-entropy, hints) never land on a node that does not replicate the
//! key at its layout.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{TestCluster, eventually};
use dkvs::checker;
use dkvs::client::{Client, ClientOptions};
use dkvs::pb;
use dkvs::workload::{History, Recorder, Workload};

/// Quick anti-entropy, so that moved data would be dropped soon after a
/// move settles.
const FLAGS: &[&str] = &["--anti-entropy-interval", "1"];

/// The layout node `i` serves.
async fn layout_of(cluster: &TestCluster, i: usize) -> pb::Layout {
    cluster.status(i).await.layout.expect("a layout in Status")
}

fn is_settled(layout: &pb::Layout) -> bool {
    layout.previous.is_empty()
        && !layout
            .members
            .iter()
            .any(|m| m.role == pb::LayoutRole::Joining as i32)
}

/// Waits until every running node serves one settled layout newer than
/// `after` and sees every member serving it (their heartbeats said so):
/// from then on, old owners may drop what moved. Answers its version.
async fn everyone_serves_a_settled_layout(cluster: &TestCluster, after: u64) -> u64 {
    eventually(Duration::from_secs(120), async || {
        let mut version = None;
        for (i, node) in cluster.nodes.iter().enumerate() {
            if !node.is_running() {
                continue;
            }
            let status = cluster.status(i).await;
            let layout = status.layout.ok_or("no layout")?;
            if layout.version <= after || !is_settled(&layout) {
                return Err(format!(
                    "{} serves v{} ({})",
                    node.address, layout.version, layout.change
                ));
            }
            if version.is_some_and(|v| v != layout.version) {
                return Err(format!(
                    "versions differ: v{} and {version:?}",
                    layout.version
                ));
            }
            version = Some(layout.version);
            if let Some(behind) = status
                .members
                .iter()
                .find(|m| m.address != node.address && m.layout_version < layout.version)
            {
                return Err(format!(
                    "{} sees {} at v{}",
                    node.address, behind.address, behind.layout_version
                ));
            }
        }
        version.ok_or_else(|| "no node running".to_string())
    })
    .await
}

/// A recorded workload on its own keys, running until stopped.
struct Background {
    recorder: Recorder,
    workload: Workload,
    stop: Arc<AtomicBool>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Background {
    fn start(client: Arc<Client>, keys: u64) -> Self {
        let recorder = Recorder::new();
        let workload = Workload::new(keys);
        let stop = Arc::new(AtomicBool::new(false));
        let workers = (0..2)
            .map(|id| {
                let (client, recorder, stop) = (client.clone(), recorder.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut round = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        // A new client id per round keeps values unique.
                        let until = tokio::time::Instant::now() + Duration::from_millis(500);
                        let worker = 10 + 2 * round as usize + id;
                        workload
                            .run_worker(worker, &client, worker as u64, until, &recorder)
                            .await;
                        round += 1;
                    }
                })
            })
            .collect();
        Self {
            recorder,
            workload,
            stop,
            workers,
        }
    }

    /// Stops the workers, reads every key at ALL, and checks the history.
    async fn check(self, cluster: &TestCluster) {
        self.stop.store(true, Ordering::Relaxed);
        for worker in self.workers {
            worker.await.expect("worker");
        }
        let all = cluster
            .client_with(ClientOptions {
                consistency: dkvs::quorum::Consistency::All,
                ..ClientOptions::default()
            })
            .await;
        self.workload
            .final_reads(9, &all, &self.recorder)
            .await
            .expect("final reads at ALL");
        let History { ops, .. } = self.recorder.take();
        let report = checker::check(&ops);
        println!("operations: {}, {report}", ops.len());
        common::assert_no_violations(&report);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_owners_keep_moved_data_until_the_new_owner_confirms_holding_it() {
    const PRELOADED: usize = 1500;
    let mut cluster = TestCluster::start_with(3, FLAGS).await;
    let client = cluster.client().await;
    common::preload(&client, PRELOADED).await;
    let writer = Arc::new(
        cluster
            .client_with(ClientOptions {
                rpc_timeout: Duration::from_secs(2),
                ..ClientOptions::default()
            })
            .await,
    );
    let background = Background::start(writer, 100);
    let before = layout_of(&cluster, 0).await.version;
    // With three members and N=3 every old node holds every key; the
    // fourth takes about a quarter of the ranges from each.
    let joiner = cluster.join(0, FLAGS).await;
    let settled = everyone_serves_a_settled_layout(&cluster, before).await;
    // The only new owner of the moved ranges answers nothing from now on:
    // no exchange with it can complete. (A hand-off it confirmed just
    // before may still end in a drop: count after a moment.)
    let frozen = cluster.pause_until_dropped(joiner);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let held = async || {
        let mut held = Vec::new();
        for old in 0..3 {
            let stats = cluster.replica(old).await.stats(pb::StatsRequest {}).await;
            held.push(stats.expect("stats").into_inner().live_keys);
        }
        held
    };
    let frozen_at = held().await;
    // Each old owner ends with about three quarters of the keys; most of
    // what moved is still there.
    assert!(
        frozen_at
            .iter()
            .all(|&h| h as f64 > PRELOADED as f64 * 0.85),
        "old owners hold {frozen_at:?} of the {PRELOADED} preloaded keys when the new owner froze at v{settled}"
    );
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        let now = held().await;
        assert!(
            now.iter().zip(&frozen_at).all(|(now, then)| now >= then),
            "old owners dropped moved keys (held {frozen_at:?}, now {now:?}) at v{settled} while the new owner could not confirm them"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The worker says why it keeps them.
    let reported = cluster.status(0).await.workers;
    let membership = reported
        .iter()
        .find(|w| w.name == "membership")
        .expect("a membership worker");
    assert!(
        membership.last_error.contains("kept"),
        "the membership worker reports the kept ranges: {membership:?}"
    );
    drop(frozen);
    // Once the new owner answers again, the exchanges complete and each
    // old owner keeps about three quarters.
    eventually(Duration::from_secs(60), async || {
        let counts = cluster.live_keys_per_node().await;
        if counts[..3]
            .iter()
            .all(|&c| (c as f64) < PRELOADED as f64 * 0.9)
        {
            Ok(())
        } else {
            Err(format!("live keys per node: {counts:?}"))
        }
    })
    .await;
    background.check(&cluster).await;
    common::preloaded_at_all(&cluster, PRELOADED).await;
}
