//! Behaviour under failures: failure detection, paused and dead nodes.

mod common;

use std::time::{Duration, Instant};

use common::TestCluster;
use dkvs::pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_node_is_detected_and_does_not_stall_clients() {
    let cluster = TestCluster::start(5).await;
    let client = cluster.client().await;
    for i in 0..20 {
        client.put(&format!("k{i}"), "v").await.expect("put");
    }
    cluster.pause(2);
    // Requests keep completing well inside their deadline while it is
    // frozen, before and after the detector convicts it.
    let started = Instant::now();
    for round in 0..3 {
        for i in 0..20 {
            let op = Instant::now();
            client
                .put(&format!("k{i}"), format!("r{round}"))
                .await
                .expect("put with a paused node");
            assert_eq!(
                client
                    .get(&format!("k{i}"))
                    .await
                    .expect("get with a paused node")
                    .as_deref(),
                Some(format!("r{round}").as_bytes())
            );
            assert!(
                op.elapsed() < Duration::from_secs(2),
                "op took {:?}",
                op.elapsed()
            );
        }
    }
    cluster
        .wait_member_state(0, 2, pb::MemberState::Down, Duration::from_secs(5))
        .await;
    assert!(started.elapsed() < Duration::from_secs(30));
    // Coordinators no longer wait for it: a node-coordinated write whose key
    // lives on the paused node answers fast.
    let key = (0..)
        .map(|i| format!("on-paused-{i}"))
        .find(|k| client.replicas_of(k).contains(&cluster.nodes[2].address))
        .expect("some key lives on node 2");
    let coordinator = (0..5).find(|i| *i != 2).expect("another node");
    let op = Instant::now();
    let put = cluster
        .kv(coordinator)
        .await
        .put(common::put_request(&key, "x"))
        .await
        .expect("put")
        .into_inner();
    assert_eq!(put.acks, 2);
    assert!(
        op.elapsed() < Duration::from_millis(500),
        "write waited {:?} for a node believed down",
        op.elapsed()
    );

    cluster.resume(2);
    cluster
        .wait_member_state(0, 2, pb::MemberState::Up, Duration::from_secs(5))
        .await;
    client.close().await;
}
