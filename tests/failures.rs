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

/// Reads what one replica holds for `key`, through the internal service.
async fn replica_version(
    cluster: &TestCluster,
    node: usize,
    key: &str,
) -> Option<dkvs::clock::Version> {
    let reply = cluster
        .replica(node)
        .await
        .read(pb::ReplicaReadRequest { key: key.into() })
        .await
        .expect("replica read")
        .into_inner();
    reply.record.and_then(|r| r.version).map(Into::into)
}

async fn hint_totals(cluster: &TestCluster, observer: usize) -> (u64, u64) {
    let status = cluster
        .cluster(observer)
        .await
        .status(pb::StatusRequest {})
        .await
        .expect("status")
        .into_inner();
    status
        .members
        .iter()
        .filter_map(|m| m.stats.as_ref())
        .fold((0, 0), |(pending, delivered), s| {
            (pending + s.hints_pending, delivered + s.hints_delivered)
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hints_bring_a_restarted_replica_up_to_date_without_reads() {
    let mut cluster = TestCluster::start(5).await;
    let client = cluster.client().await;
    let keys: Vec<String> = (0..200).map(|i| format!("hinted-{i}")).collect();
    let down = 3;
    let observer = 0;
    cluster.kill(down);
    cluster
        .wait_member_state(
            observer,
            down,
            pb::MemberState::Down,
            Duration::from_secs(5),
        )
        .await;
    let mut missed = Vec::new();
    for key in &keys {
        let ack = client
            .put(key, "while-down")
            .await
            .expect("put with a replica down");
        if client
            .replicas_of(key)
            .contains(&cluster.nodes[down].address)
        {
            missed.push((key.clone(), ack.version));
        }
    }
    assert!(!missed.is_empty());
    let deadline = Instant::now() + Duration::from_secs(10);
    while hint_totals(&cluster, observer).await.0 < missed.len() as u64 {
        assert!(
            Instant::now() < deadline,
            "hints were not stored: {:?}",
            hint_totals(&cluster, observer).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster.restart(down).await;
    // No client reads: the hints alone bring the replica up to date.
    let deadline = Instant::now() + Duration::from_secs(15);
    for (key, version) in &missed {
        while replica_version(&cluster, down, key).await != Some(*version) {
            assert!(
                Instant::now() < deadline,
                "{key} never reached the restarted replica"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let (pending, delivered) = hint_totals(&cluster, observer).await;
    assert_eq!(pending, 0);
    assert!(
        delivered >= missed.len() as u64,
        "delivered {delivered} of {}",
        missed.len()
    );
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistency_any_accepts_a_hint_when_every_replica_is_down() {
    let mut cluster = TestCluster::start(5).await;
    let client = cluster.client().await;
    let key = "any-key";
    let replicas: Vec<usize> = client
        .replicas_of(key)
        .iter()
        .map(|a| cluster.index_of(a))
        .collect();
    let coordinator = (0..5)
        .find(|i| !replicas.contains(i))
        .expect("a non-replica");
    for &r in &replicas {
        cluster.kill(r);
    }
    for &r in &replicas {
        cluster
            .wait_member_state(
                coordinator,
                r,
                pb::MemberState::Down,
                Duration::from_secs(5),
            )
            .await;
    }
    let mut kv = cluster.kv(coordinator).await;
    let quorum = kv
        .put(common::put_request(key, "v"))
        .await
        .expect_err("no replica is up");
    assert_eq!(quorum.code(), tonic::Code::Unavailable);
    let any = kv
        .put(pb::PutRequest {
            key: key.into(),
            value: b"kept-as-hint".to_vec().into(),
            consistency: 4,
        })
        .await
        .expect("ANY accepts a hint")
        .into_inner();
    assert_eq!(any.acks, 0, "no replica holds it yet");
    let read_any = kv
        .get(pb::GetRequest {
            key: key.into(),
            consistency: 4,
        })
        .await
        .expect_err("ANY is for writes");
    assert_eq!(read_any.code(), tonic::Code::InvalidArgument);
    for &r in &replicas {
        cluster.restart(r).await;
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        // Until the coordinator's detector hears from the restarted
        // replicas (within a heartbeat), the read may still be refused.
        if let Ok(got) = kv.get(common::get_request(key)).await
            && got.get_ref().found
        {
            assert_eq!(&got.get_ref().value[..], b"kept-as-hint");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the hinted write never reached its replicas"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    client.close().await;
}
