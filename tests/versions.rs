//! Acknowledged writes and versions: the two ways acknowledged writes were
//! once lost, against real DKVSServer processes.
//!
//! 1. A PUT acknowledged after a DELETE whose tombstone one replica still
//!    holds (grace periods differ) while the others purged it, coordinated by
//!    a node whose clock never saw the tombstone. With plain Lamport counters
//!    the PUT was stamped below the tombstone and anti-entropy deleted it.
//! 2. One `Replica.Write` with lamport 2^62 (or a heartbeat carrying it)
//!    must not stop the cluster from taking writes, and a data dir that
//!    already holds such a record must start and serve writes.

mod common;

use std::time::Duration;

use common::{TestCluster, eventually, get_request, put_request};
use dkvs::clock::Version;
use dkvs::pb;

/// Flags for a cluster whose tombstones are purged within seconds.
const FAST_GC: &[&str] = &[
    "--anti-entropy-interval",
    "1",
    "--max-hint-age-secs",
    "1",
    "--tombstone-grace",
    "3",
    "--max-clock-skew-ms",
    "500",
];

/// What node `node` holds for `key`: `None`, or the version and whether
/// it is a tombstone.
async fn held(cluster: &TestCluster, node: usize, key: &str) -> Option<(Version, bool)> {
    let record = cluster.replica_record(node, key).await?;
    let v = record.version?;
    Some((Version::new(v.lamport, v.node_id), record.tombstone))
}

/// Waits (bounded) until node `node` has run `rounds` more anti-entropy
/// exchanges than now: time for repair to have spread what it would.
async fn wait_anti_entropy_rounds(cluster: &TestCluster, node: usize, rounds: u64) {
    let exchanges = |status: pb::StatusResponse| {
        status
            .members
            .iter()
            .find(|m| m.address == cluster.nodes[node].address)
            .and_then(|m| m.stats.as_ref())
            .map_or(0, |s| s.anti_entropy_exchanges)
    };
    let start = exchanges(cluster.status(node).await);
    eventually(Duration::from_secs(30), async || {
        let now = exchanges(cluster.status(node).await);
        if now >= start + rounds {
            Ok(())
        } else {
            Err(format!(
                "anti-entropy stopped running: {now} exchanges, {start} before"
            ))
        }
    })
    .await
}

/// Indexes of the nodes that replicate `key`, in preference order.
fn replicas_of(cluster: &TestCluster, client: &dkvs::client::Client, key: &str) -> Vec<usize> {
    client
        .replicas_of(key)
        .iter()
        .map(|address| cluster.index_of(address))
        .collect()
}

/// Scenario 1 (a PUT after a DELETE), with the final PUT coordinated by `coordinate`:
/// `Some(node)` through that node's KeyValue service, `None` through the
/// smart client.
async fn put_after_purged_delete_survives(key: &str, via_smart_client: bool) {
    let mut cluster = TestCluster::start_with(5, FAST_GC).await;
    let client = cluster.client().await;
    let replicas = replicas_of(&cluster, &client, key);
    // The key's third replica keeps tombstones for an hour.
    let keeper = replicas[2];
    cluster.kill(keeper);
    cluster.add_flags(keeper, &["--tombstone-grace", "3600"]);
    cluster.restart(keeper).await;
    let others: Vec<usize> = (0..5).filter(|i| !replicas.contains(i)).collect();
    let (d, e) = (others[0], others[1]);
    // D's clock climbs: 1,500 writes to a key E does not replicate.
    let pump = (0..)
        .map(|i| format!("pump-{i}"))
        .find(|k| !replicas_of(&cluster, &client, k).contains(&e))
        .expect("a key off E");
    let mut d_kv = cluster.kv(d).await;
    for i in 0..1500 {
        d_kv.put(put_request(&pump, &format!("p{i}")))
            .await
            .expect("pump write");
    }
    d_kv.put(put_request(key, "before")).await.expect("put");
    let deleted = d_kv
        .delete(pb::DeleteRequest {
            key: key.into(),
            consistency: 0,
        })
        .await
        .expect("delete")
        .into_inner()
        .version
        .expect("delete version");
    let tombstone = Version::new(deleted.lamport, deleted.node_id);
    // The first two replicas purge the tombstone; the keeper holds it.
    eventually(Duration::from_secs(30), async || {
        let first = held(&cluster, replicas[0], key).await;
        let second = held(&cluster, replicas[1], key).await;
        if first.is_none() && second.is_none() {
            Ok(())
        } else {
            Err(format!(
                "the tombstone was never purged: {first:?} {second:?}"
            ))
        }
    })
    .await;
    assert_eq!(
        held(&cluster, keeper, key).await,
        Some((tombstone, true)),
        "the keeper still holds the tombstone"
    );
    // E, which replicates neither key, coordinates the new write.
    let version = if via_smart_client {
        client.put(key, "after").await.expect("put after").version
    } else {
        let v = cluster
            .kv(e)
            .await
            .put(put_request(key, "after"))
            .await
            .expect("put after")
            .into_inner()
            .version
            .expect("version");
        Version::new(v.lamport, v.node_id)
    };
    assert!(
        version > tombstone,
        "the acknowledged PUT ({version}) is stamped above the old tombstone ({tombstone})"
    );
    wait_anti_entropy_rounds(&cluster, keeper, 3).await;
    for node in 0..5 {
        let got = cluster
            .kv(node)
            .await
            .get(get_request(key))
            .await
            .expect("get")
            .into_inner();
        assert!(got.found, "node {node} reads {key} as not found");
        assert_eq!(&got.value[..], b"after", "node {node}");
    }
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_after_a_purged_delete_is_kept_when_a_node_coordinates() {
    put_after_purged_delete_survives("resurrected-node", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_after_a_purged_delete_is_kept_through_the_smart_client() {
    put_after_purged_delete_survives("resurrected-client", true).await;
}

/// A replica write carrying `lamport`.
fn write_with(key: &str, lamport: u64) -> pb::ReplicaWriteRequest {
    pb::ReplicaWriteRequest {
        key: key.into(),
        record: Some(pb::Record {
            version: Some(pb::Version {
                lamport,
                node_id: 7,
            }),
            tombstone: false,
            value: b"hostile".to_vec().into(),
            deleted_at_ms: 0,
        }),
        ..Default::default()
    }
}

/// PUTs spread over every node; answers how many succeeded.
async fn puts_over_all_nodes(cluster: &TestCluster, count: usize) -> usize {
    let mut ok = 0;
    for i in 0..count {
        let node = i % cluster.nodes.len();
        let reply = cluster
            .kv(node)
            .await
            .put(put_request(&format!("after-{i}"), "v"))
            .await;
        if reply.is_ok() {
            ok += 1;
        } else {
            eprintln!("PUT {i} via node {node}: {reply:?}");
        }
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_hostile_version_does_not_stop_the_cluster() {
    let cluster = TestCluster::start(3).await;
    let far_future = dkvs::clock::hlc_of_ms(dkvs::clock::wall_clock_ms() + 3_600_000);
    for lamport in [1u64 << 62, u64::MAX, far_future] {
        let status = cluster
            .replica(0)
            .await
            .write(write_with("poison", lamport))
            .await
            .expect_err("a version far ahead of the wall clock is refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains("--max-clock-skew-ms"),
            "the message names the flag: {}",
            status.message()
        );
    }
    // Inside a batch and a hint, the same.
    let batch = cluster
        .replica(1)
        .await
        .batch(pb::ReplicaBatchRequest {
            writes: vec![write_with("poison", 1 << 62)],
            reads: vec![],
        })
        .await
        .expect("batch")
        .into_inner();
    assert!(batch.writes[0].rejected, "{:?}", batch.writes[0]);
    let hint = cluster
        .replica(2)
        .await
        .store_hint(pb::StoreHintRequest {
            target: cluster.nodes[0].address.clone(),
            key: "poison".into(),
            record: write_with("poison", 1 << 62).record,
        })
        .await
        .expect_err("hint with a hostile version");
    assert_eq!(hint.code(), tonic::Code::InvalidArgument);
    // A heartbeat carrying it (and this cluster's id) is not merged.
    let cluster_id = cluster
        .membership(0)
        .await
        .get_layout(pb::GetLayoutRequest {})
        .await
        .expect("layout")
        .into_inner()
        .cluster_id;
    cluster
        .liveness(0)
        .await
        .ping(pb::PingRequest {
            from: cluster.nodes[1].address.clone(),
            hlc: 1 << 62,
            cluster_id,
            ..Default::default()
        })
        .await
        .expect("ping");
    assert_eq!(puts_over_all_nodes(&cluster, 90).await, 90);
    for node in 0..3 {
        assert_eq!(held(&cluster, node, "poison").await, None);
        let lamport = cluster
            .replica(node)
            .await
            .stats(pb::StatsRequest {})
            .await
            .expect("stats")
            .into_inner()
            .lamport;
        let ahead_ms =
            (lamport >> dkvs::clock::LOGICAL_BITS).saturating_sub(dkvs::clock::wall_clock_ms());
        assert!(
            ahead_ms < 5_000,
            "node {node}'s clock is {ahead_ms} ms ahead"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_holding_a_hostile_version_starts_and_serves_writes() {
    let mut cluster = TestCluster::start(3).await;
    cluster
        .kv(0)
        .await
        .put(put_request("poisoned", "old"))
        .await
        .expect("put");
    // Poison every replica's copy on disk, as a node built before the
    // bound existed would have stored it.
    for node in 0..3 {
        cluster.kill(node);
        let storage = dkvs::storage::LogStorage::open(
            &cluster.nodes[node].data_dir.join("log"),
            dkvs::storage::FsyncPolicy::Always,
        )
        .expect("open the stopped node's data");
        let record =
            dkvs::record::Record::value(Version::new(1 << 62, 7), bytes::Bytes::from("bad"));
        dkvs::storage::Storage::put(&storage, &dkvs::replica::storage_key("poisoned"), &record)
            .expect("write poison");
        dkvs::storage::Storage::sync(&storage).expect("sync");
    }
    for node in 0..3 {
        cluster.restart(node).await;
    }
    let stats = cluster.sum_stats(|s| s.future_records).await;
    assert_eq!(stats, 3, "each node counted its poisoned record");
    // Reading it fails rather than answering the poisoned value.
    let read = cluster.kv(1).await.get(get_request("poisoned")).await;
    assert!(read.is_err(), "{read:?}");
    // Writes work, the poisoned key's included.
    assert_eq!(puts_over_all_nodes(&cluster, 30).await, 30);
    cluster
        .kv(2)
        .await
        .put(put_request("poisoned", "new"))
        .await
        .expect("the poisoned key takes writes");
    let got = cluster
        .kv(0)
        .await
        .get(get_request("poisoned"))
        .await
        .expect("get")
        .into_inner();
    assert_eq!(&got.value[..], b"new");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_node_answers_no_reads_until_it_caught_up() {
    // No hints and hourly anti-entropy: only the catch-up moves data.
    let mut cluster =
        TestCluster::start_with(3, &["--max-hints", "0", "--anti-entropy-interval", "3600"]).await;
    let ids: Vec<(u64, u64)> = cluster
        .status(0)
        .await
        .members
        .iter()
        .map(|m| (m.node_id, m.instance_id))
        .collect();
    assert!(
        ids.iter()
            .all(|(member, instance)| *instance != 0 && member != instance),
        "status reports both identities: {ids:?}"
    );
    // Node 0 misses the writes: they are acknowledged by nodes 1 and 2.
    cluster.kill(0);
    let mut kv = cluster.kv(1).await;
    let keys: Vec<String> = (0..20).map(|i| format!("replaced-{i}")).collect();
    for key in &keys {
        kv.put(put_request(key, "kept")).await.expect("put");
    }
    cluster.restart(0).await;
    // Node 2 loses its disk and comes back as a new instance.
    let old_instance = ids[cluster.index_of(&cluster.nodes[2].address.clone())].1;
    cluster.kill(2);
    std::fs::remove_dir_all(&cluster.nodes[2].data_dir).expect("wipe node 2");
    cluster.add_flags(2, &["--anti-entropy-interval", "1"]);
    cluster.restart(2).await;
    let status = cluster.status(2).await;
    assert_ne!(status.instance_id, old_instance, "a new instance id");
    let refused = cluster
        .replica(2)
        .await
        .read(pb::ReplicaReadRequest {
            key: keys[0].clone(),
            ..Default::default()
        })
        .await
        .expect_err("a replacement answers no replica read yet");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("catching up"), "{refused:?}");
    // With node 1 down, node 0 (which missed the writes) and the empty
    // node 2 must not make a quorum that says "not found".
    cluster.kill(1);
    let mut kv0 = cluster.kv(0).await;
    for key in &keys {
        match kv0.get(get_request(key)).await {
            Ok(reply) => {
                let reply = reply.into_inner();
                assert!(
                    reply.found,
                    "{key}: an acknowledged write read as not found"
                );
                assert_eq!(&reply.value[..], b"kept");
            }
            Err(status) => assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}"),
        }
    }
    // Node 1 returns: node 2 syncs with both peers, then answers.
    cluster.restart(1).await;
    eventually(Duration::from_secs(30), async || {
        cluster
            .replica(2)
            .await
            .read(pb::ReplicaReadRequest {
                key: keys[0].clone(),
                ..Default::default()
            })
            .await
            .map_err(|status| format!("never caught up: {status:?}"))
    })
    .await;
    for key in &keys {
        let held = held(&cluster, 2, key).await;
        assert!(
            held.is_some(),
            "{key} reached the replacement before it answered"
        );
    }
}
