//! Monotonic reads against real DKVSServer processes: a write that reached
//! fewer than W replicas is repaired to W before a QUORUM read returns it.

mod common;

use std::time::Duration;

use common::{TestCluster, eventually, get_request};
use dkvs::clock::Version;
use dkvs::pb;

fn version_of(v: Option<pb::Version>) -> Version {
    let v = v.expect("response carries a version");
    Version::new(v.lamport, v.node_id)
}

fn request(key: &str, value: &str, consistency: pb::Consistency) -> pb::PutRequest {
    pb::PutRequest {
        key: key.into(),
        value: value.as_bytes().to_vec().into(),
        consistency: consistency as i32,
    }
}

/// The version node `i`'s own store holds for `key` (internal Replica.Read).
async fn held_by(cluster: &TestCluster, i: usize, key: &str) -> Option<Version> {
    cluster
        .replica_record(i, key)
        .await
        .map(|r| version_of(r.version))
}

/// Waits until every node has run its first anti-entropy round (a second
/// after start); with `--anti-entropy-interval 3600` none runs again during
/// the test, so only reads can repair replicas.
async fn wait_first_anti_entropy_rounds(cluster: &TestCluster) {
    eventually(Duration::from_secs(20), async || {
        let status = cluster.status(0).await;
        let done = status
            .members
            .iter()
            .filter(|m| {
                m.stats
                    .as_ref()
                    .is_some_and(|s| s.anti_entropy_exchanges > 0)
            })
            .count();
        if done == cluster.nodes.len() {
            Ok(())
        } else {
            Err(format!("only {done} nodes ran anti-entropy"))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_of_a_write_held_by_fewer_than_w_repairs_it_to_w_before_answering() {
    // Three nodes, N = 3, W = R = 2. No hint delivery or anti-entropy during
    // the test: nothing but the reads may repair.
    let mut cluster = TestCluster::start_with(
        3,
        &[
            "--anti-entropy-interval",
            "3600",
            "--hint-delivery-interval-ms",
            "3600000",
        ],
    )
    .await;
    wait_first_anti_entropy_rounds(&cluster).await;
    let keys = ["read-through-a-node", "read-through-the-client"];
    let mut old = Vec::new();
    for key in keys {
        let put = cluster
            .kv(0)
            .await
            .put(request(key, "old", pb::Consistency::All))
            .await
            .expect("put old at ALL")
            .into_inner();
        assert_eq!(put.acks, 3);
        old.push(version_of(put.version));
    }
    // Node 2 is gone; node 1 is frozen until node 0 believes it down, so
    // node 0 does not even send it the next writes (hints stay undelivered).
    cluster.kill(2);
    cluster.pause(1);
    cluster
        .wait_member_state(0, 1, pb::MemberState::Down, Duration::from_secs(15))
        .await;
    let mut new = Vec::new();
    for key in keys {
        let put = cluster
            .kv(0)
            .await
            .put(request(key, "new", pb::Consistency::One))
            .await
            .expect("put new at ONE")
            .into_inner();
        assert_eq!(put.acks, 1, "only node 0 holds the new value");
        new.push(version_of(put.version));
    }
    cluster.resume(1);
    cluster
        .wait_member_state(0, 1, pb::MemberState::Up, Duration::from_secs(15))
        .await;
    for (i, key) in keys.iter().enumerate() {
        assert_eq!(held_by(&cluster, 0, key).await, Some(new[i]));
        assert_eq!(
            held_by(&cluster, 1, key).await,
            Some(old[i]),
            "node 1 missed the write at ONE"
        );
    }
    assert_eq!(cluster.sum_stats(|s| s.blocking_read_repairs).await, 0);

    // A QUORUM read through node 0 hears node 0 (new) and node 1 (old): the
    // new value is held by one replica of the two needed. It is answered...
    let got = cluster
        .kv(0)
        .await
        .get(get_request(keys[0]))
        .await
        .expect("get through node 0")
        .into_inner();
    assert_eq!(
        (&got.value[..], version_of(got.version)),
        (&b"new"[..], new[0])
    );
    // ...and by then two replicas hold it: losing node 0 now could not make
    // a later read go back to "old".
    assert_eq!(
        held_by(&cluster, 1, keys[0]).await,
        Some(new[0]),
        "the read answered before W replicas held its value"
    );
    assert_eq!(cluster.sum_stats(|s| s.blocking_read_repairs).await, 1);

    // The smart client coordinates its own reads but writes to no replica:
    // it hands this read to a node, which repairs before answering.
    let client = cluster.client().await;
    let record = client
        .get_record(keys[1])
        .await
        .expect("get through the client")
        .expect("found");
    assert_eq!(
        (record.value.as_deref(), record.version),
        (Some(&b"new"[..]), new[1])
    );
    assert_eq!(
        held_by(&cluster, 1, keys[1]).await,
        Some(new[1]),
        "the client's read answered before W replicas held its value"
    );
    assert_eq!(cluster.sum_stats(|s| s.blocking_read_repairs).await, 2);
    let repairs = cluster.sum_stats(|s| s.read_repairs).await;
    assert!(
        repairs >= 2,
        "blocking repair writes are read repairs too: {repairs}"
    );

    // W replicas now agree: the next read does not block again.
    assert_eq!(
        client.get(keys[1]).await.expect("get again").as_deref(),
        Some(&b"new"[..])
    );
    assert_eq!(cluster.sum_stats(|s| s.blocking_read_repairs).await, 2);
    client.close().await;
}
