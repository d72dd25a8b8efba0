//! Elastic membership with real processes: layout changes agreed by Paxos,
//! joins that stream data while writers and readers run (every operation
//! checked by the value checker), and joins that survive kill -9 of the
//! joining node or of a source.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{TestCluster, eventually};
use dkvs::checker;
use dkvs::client::ClientOptions;
use dkvs::pb;
use dkvs::workload::{History, Recorder, Workload};

/// Flags for clusters whose layout changes: quick anti-entropy, so moved
/// data is dropped soon after a move settles.
const FLAGS: &[&str] = &["--anti-entropy-interval", "1"];

/// The layout every running node serves once it is the same everywhere
/// and no change is in progress.
async fn settled(cluster: &TestCluster, within: Duration) -> pb::Layout {
    eventually(within, async || {
        let mut seen: Option<pb::Layout> = None;
        for (i, node) in cluster.nodes.iter().enumerate() {
            if !node.is_running() {
                continue;
            }
            let mut client = cluster.cluster(i).await;
            let status = client
                .status(pb::StatusRequest {})
                .await
                .map_err(|e| format!("{}: {e}", node.address))?
                .into_inner();
            let layout = status.layout.ok_or("no layout in Status")?;
            if let Some(change) = in_progress(&layout) {
                return Err(format!(
                    "{} serves v{}: {change}",
                    node.address, layout.version
                ));
            }
            match &seen {
                Some(other) if other.version != layout.version => {
                    return Err(format!(
                        "{} serves v{}, another node v{}",
                        node.address, layout.version, other.version
                    ));
                }
                _ => seen = Some(layout),
            }
        }
        seen.ok_or_else(|| "no node running".to_string())
    })
    .await
}

fn in_progress(layout: &pb::Layout) -> Option<&str> {
    let joining = layout
        .members
        .iter()
        .any(|m| m.role == pb::LayoutRole::Joining as i32);
    (joining || !layout.previous.is_empty()).then_some(layout.change.as_str())
}

/// Live keys each running node holds (its own current count).
async fn live_keys(cluster: &TestCluster) -> Vec<u64> {
    let mut counts = Vec::new();
    for (i, node) in cluster.nodes.iter().enumerate() {
        if node.is_running() {
            let stats = cluster
                .replica(i)
                .await
                .stats(pb::StatsRequest {})
                .await
                .expect("stats")
                .into_inner();
            counts.push(stats.live_keys);
        }
    }
    counts
}

/// Waits until the joining node `joiner` reports keys moved.
async fn streaming(cluster: &TestCluster, joiner: usize) {
    eventually(Duration::from_secs(30), async || {
        let status = cluster.status(joiner).await;
        match status.moves.first() {
            Some(progress) if progress.keys_moved > 0 => Ok(()),
            _ => Err(format!("no progress yet: {:?}", status.moves)),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_changes_at_once_one_commits_and_the_other_is_refused_naming_it() {
    let cluster = TestCluster::start_with(3, FLAGS).await;
    // Addresses nobody listens on: the changes only have to be agreed.
    let (a, b) = ("127.0.0.1:1".to_string(), "127.0.0.1:2".to_string());
    let mut first = cluster.membership(0).await;
    let mut second = cluster.membership(1).await;
    let (one, two) = tokio::join!(
        first.join(pb::JoinRequest {
            address: a.clone(),
            ..Default::default()
        }),
        second.join(pb::JoinRequest {
            address: b.clone(),
            ..Default::default()
        }),
    );
    let (won, refused, winner, loser) = match (one, two) {
        (Ok(won), Err(refused)) => (won.into_inner(), refused, &a, &b),
        (Err(refused), Ok(won)) => (won.into_inner(), refused, &b, &a),
        (one, two) => panic!("exactly one change must commit: {one:?} / {two:?}"),
    };
    assert_eq!(won.version, 3, "v2 named the first members' instances");
    assert!(won.members.iter().any(|m| &m.address == winner));
    assert!(!won.members.iter().any(|m| &m.address == loser));
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(
        refused.message().contains(&format!("{winner} joins")),
        "the refusal names the change that won: {}",
        refused.message()
    );
    // Every node learns the winner; a third change is refused the same way.
    eventually(Duration::from_secs(10), async || {
        for i in 0..3 {
            let layout = cluster.status(i).await.layout.ok_or("no layout")?;
            if layout.version != 3 {
                return Err(format!("node {i} serves v{}", layout.version));
            }
        }
        Ok::<(), String>(())
    })
    .await;
    let refused = cluster
        .membership(2)
        .await
        .join(pb::JoinRequest {
            address: "127.0.0.1:3".into(),
            ..Default::default()
        })
        .await
        .expect_err("one change at a time");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains(&format!("{winner} joins")),
        "{}",
        refused.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_grows_from_three_to_five_under_load_and_loses_nothing() {
    const KEYS: u64 = 300;
    const PRELOADED: usize = 3000;
    let mut cluster = TestCluster::start_with(3, FLAGS).await;
    let client = cluster.client().await;
    // Data to move.
    for i in 0..PRELOADED {
        client
            .put(&format!("preloaded-{i}"), format!("v{i}"))
            .await
            .expect("preload");
    }
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
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..3)
        .map(|id| {
            let (client, recorder, stop) = (client.clone(), recorder.clone(), stop.clone());
            tokio::spawn(async move {
                let mut round = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    // Each round is a new client id, so values stay unique.
                    let until = tokio::time::Instant::now() + Duration::from_millis(500);
                    let worker = 10 + 3 * round as usize + id;
                    workload
                        .run_worker(worker, &client, worker as u64, until, &recorder)
                        .await;
                    round += 1;
                }
            })
        })
        .collect();

    let started = Instant::now();
    for seed in [0, 1] {
        let joined = cluster.join(seed, FLAGS).await;
        let layout = settled(&cluster, Duration::from_secs(120)).await;
        println!(
            "node {joined} joined: layout v{} after {:.1}s",
            layout.version,
            started.elapsed().as_secs_f64()
        );
        // Every preloaded key readable on the way.
        for i in (0..PRELOADED).step_by(7) {
            let value = client
                .get(&format!("preloaded-{i}"))
                .await
                .expect("read a preloaded key");
            assert_eq!(
                value.as_deref(),
                Some(format!("v{i}").as_bytes()),
                "preloaded-{i}"
            );
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for worker in workers {
        worker.await.expect("worker");
    }
    let workload_ops = recorder.len();
    let final_reader = cluster
        .client_with(ClientOptions {
            consistency: dkvs::quorum::Consistency::All,
            ..ClientOptions::default()
        })
        .await;
    workload
        .final_reads(9, &final_reader, &recorder)
        .await
        .expect("final reads at ALL");
    let History {
        ops: history,
        errors,
    } = recorder.take();
    let report = checker::check(&history);
    println!("operations: {workload_ops}, {report}");
    for (index, why) in errors.iter().take(5) {
        println!("  {}: {why}", checker::describe(&history, *index));
    }
    common::assert_no_violations(&report);
    // Every preloaded key, at ALL from the five.
    for i in 0..PRELOADED {
        let value = final_reader
            .get(&format!("preloaded-{i}"))
            .await
            .expect("read at ALL");
        assert_eq!(
            value.as_deref(),
            Some(format!("v{i}").as_bytes()),
            "preloaded-{i}"
        );
    }
    // Old owners drop what moved: each node ends with about 3/5 of the keys.
    let total = (PRELOADED as u64 + KEYS) as f64;
    let counts = eventually(Duration::from_secs(60), async || {
        let counts = live_keys(&cluster).await;
        let share: Vec<f64> = counts.iter().map(|&c| c as f64 / total).collect();
        if counts.len() == 5 && share.iter().all(|s| (s - 0.6).abs() <= 0.6 * 0.25) {
            Ok(counts)
        } else {
            Err(format!(
                "live keys per node {counts:?} (about {:.0} each expected)",
                total * 0.6
            ))
        }
    })
    .await;
    println!("live keys per node after growing to 5: {counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_node_killed_mid_join_resumes_when_restarted() {
    const PRELOADED: usize = 4000;
    let mut cluster = TestCluster::start_with(3, FLAGS).await;
    let client = cluster.client().await;
    common::preload(&client, PRELOADED).await;
    // Slow streaming so the kill lands mid-join.
    let joiner = cluster
        .join(
            0,
            &["--anti-entropy-interval", "1", "--stream-rate", "1000"],
        )
        .await;
    streaming(&cluster, joiner).await;
    cluster.kill(joiner);
    let layout = cluster.status(0).await.layout.expect("layout");
    assert!(
        in_progress(&layout).is_some(),
        "the join was still in progress when killed"
    );
    // Writes go on while it is down (they reach the old replicas, and
    // hints for it).
    for i in 0..200 {
        client
            .put(&format!("during-{i}"), "x")
            .await
            .expect("write while the joiner is down");
    }
    cluster.add_flags(joiner, &["--stream-rate", "0"]);
    cluster.restart(joiner).await;
    settled(&cluster, Duration::from_secs(120)).await;
    let all = common::preloaded_at_all(&cluster, PRELOADED).await;
    for i in 0..200 {
        assert!(
            all.get(&format!("during-{i}"))
                .await
                .expect("read")
                .is_some()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_killed_mid_stream_leaves_the_join_to_the_others() {
    const PRELOADED: usize = 4000;
    let mut cluster = TestCluster::start_with(3, FLAGS).await;
    let client = cluster.client().await;
    common::preload(&client, PRELOADED).await;
    let joiner = cluster
        .join(
            0,
            &["--anti-entropy-interval", "1", "--stream-rate", "2000"],
        )
        .await;
    streaming(&cluster, joiner).await;
    cluster.kill(2);
    // N - W + 1 = 2 of the 3 old replicas suffice: the join finishes while
    // the source is down.
    eventually(Duration::from_secs(120), async || {
        let layout = cluster.status(joiner).await.layout.ok_or("no layout")?;
        let member = layout
            .members
            .iter()
            .find(|m| m.address == cluster.nodes[joiner].address)
            .ok_or("joiner not a member")?;
        if member.role == pb::LayoutRole::Active as i32 {
            Ok(())
        } else {
            Err(format!("joiner still joining at v{}", layout.version))
        }
    })
    .await;
    // Settling waits for every member to serve the finished join.
    cluster.restart(2).await;
    settled(&cluster, Duration::from_secs(60)).await;
    let all = common::preloaded_at_all(&cluster, PRELOADED).await;
    // The joiner holds its share itself: read at ONE from it alone.
    let held = cluster.replica_record(joiner, "k1").await;
    let replicas = all.replicas_of("k1");
    assert_eq!(
        held.is_some(),
        replicas.contains(&cluster.nodes[joiner].address)
    );
}
