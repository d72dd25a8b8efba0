//! End-to-end behaviour of a real DKVS cluster (DKVSServer processes).

mod common;

use std::time::{Duration, Instant};

use common::{TestCluster, eventually, get_request, put_request};
use dkvs::client::ClientOptions;
use dkvs::clock::Version;
use dkvs::pb;
use dkvs::quorum::Consistency;

fn version_of(v: Option<pb::Version>) -> Version {
    let v = v.expect("response carries a version");
    Version::new(v.lamport, v.node_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_node_and_the_smart_client_serve_any_key() {
    let cluster = TestCluster::start(5).await;
    // A write through each node is readable through every node.
    for writer in 0..5 {
        let key = format!("written-via-{writer}");
        let put = cluster
            .kv(writer)
            .await
            .put(put_request(&key, &format!("value-{writer}")))
            .await
            .expect("put")
            .into_inner();
        assert!(
            put.acks >= 2,
            "quorum write acknowledged by {} replicas",
            put.acks
        );
        for reader in 0..5 {
            let got = cluster
                .kv(reader)
                .await
                .get(get_request(&key))
                .await
                .expect("get")
                .into_inner();
            assert!(got.found, "{key} via node {reader}");
            assert_eq!(&got.value[..], format!("value-{writer}").as_bytes());
        }
    }
    // Delete through one node; gone through all of them.
    let deleted = cluster
        .kv(2)
        .await
        .delete(pb::DeleteRequest {
            key: "written-via-0".into(),
            consistency: 0,
        })
        .await
        .expect("delete")
        .into_inner();
    for reader in 0..5 {
        let got = cluster
            .kv(reader)
            .await
            .get(get_request("written-via-0"))
            .await
            .expect("get")
            .into_inner();
        assert!(!got.found);
        assert_eq!(
            got.version, deleted.version,
            "a deleted key reports its tombstone's version"
        );
    }
    let never = cluster
        .kv(1)
        .await
        .get(get_request("never-written"))
        .await
        .expect("get")
        .into_inner();
    assert!(!never.found && never.version.is_none());

    // The smart client library: put, get, delete, per consistency level.
    let mut client = cluster.client().await;
    assert_eq!(client.ring().members().len(), 5);
    client
        .put("lib-key", "lib-value")
        .await
        .expect("client put");
    assert_eq!(
        client.get("lib-key").await.expect("client get").as_deref(),
        Some(&b"lib-value"[..])
    );
    assert_eq!(
        client.get("written-via-3").await.expect("get").as_deref(),
        Some(&b"value-3"[..])
    );
    // Writes at each level, read back at a level with W + R > N.
    for (write, read) in [
        (Consistency::One, Consistency::All),
        (Consistency::Quorum, Consistency::Quorum),
        (Consistency::All, Consistency::One),
    ] {
        client.set_consistency(write);
        let ack = client
            .put("levels", write.name())
            .await
            .expect("put at level");
        assert!(ack.acks >= write.required(3));
        client.set_consistency(read);
        assert_eq!(
            client.get("levels").await.expect("get").as_deref(),
            Some(write.name().as_bytes())
        );
    }
    client.set_consistency(Consistency::Quorum);
    client.delete("lib-key").await.expect("client delete");
    assert_eq!(client.get("lib-key").await.expect("get"), None);
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_down_every_key_stays_readable_and_writable() {
    let mut cluster = TestCluster::start(5).await;
    let client = cluster.client().await;
    for i in 0..100 {
        client
            .put(&format!("key-{i}"), format!("before-{i}"))
            .await
            .expect("put");
    }
    cluster.kill(1);
    // Every key, through the smart client and through every live node.
    for i in 0..100 {
        let key = format!("key-{i}");
        assert_eq!(
            client
                .get(&key)
                .await
                .expect("get with a node down")
                .as_deref(),
            Some(format!("before-{i}").as_bytes())
        );
    }
    for node in [0, 2, 3, 4] {
        let mut kv = cluster.kv(node).await;
        for i in (0..100).step_by(7) {
            let got = kv
                .get(get_request(&format!("key-{i}")))
                .await
                .expect("get via node")
                .into_inner();
            assert_eq!(&got.value[..], format!("before-{i}").as_bytes());
        }
    }
    // Every key is writable, old and new, through the client and the nodes.
    for i in 0..100 {
        client
            .put(&format!("key-{i}"), format!("after-{i}"))
            .await
            .expect("overwrite with a node down");
        client
            .put(&format!("new-{i}"), format!("new-{i}"))
            .await
            .expect("new write with a node down");
    }
    let mut kv = cluster.kv(4).await;
    kv.put(put_request("via-node", "ok"))
        .await
        .expect("put via a live node");
    for i in 0..100 {
        assert_eq!(
            client
                .get(&format!("key-{i}"))
                .await
                .expect("get")
                .as_deref(),
            Some(format!("after-{i}").as_bytes())
        );
        assert_eq!(
            client
                .get(&format!("new-{i}"))
                .await
                .expect("get")
                .as_deref(),
            Some(format!("new-{i}").as_bytes())
        );
    }
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_and_restarting_every_node_loses_no_acknowledged_write() {
    kill_every_node_and_check_nothing_acknowledged_is_lost(&[]).await;
}

/// The same on the LSM engine, with each node on one thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fjall_engine_on_one_thread_loses_nothing_either() {
    kill_every_node_and_check_nothing_acknowledged_is_lost(&[
        "--storage-engine",
        "fjall",
        "--worker-threads",
        "1",
    ])
    .await;
}

async fn kill_every_node_and_check_nothing_acknowledged_is_lost(flags: &[&str]) {
    let mut cluster = TestCluster::start_with(5, flags).await;
    let client = cluster.client().await;
    let mut last_versions = Vec::new();
    for i in 0..200 {
        let ack = client
            .put(&format!("durable-{i}"), format!("value-{i}"))
            .await
            .expect("put");
        last_versions.push(ack.version);
    }
    for i in (0..200).step_by(10) {
        client
            .delete(&format!("durable-{i}"))
            .await
            .expect("delete");
    }
    client.close().await;
    drop(client);
    // SIGKILL every node: no graceful shutdown, no final fsync.
    for i in 0..5 {
        cluster.kill(i);
    }
    for i in 0..5 {
        cluster.restart(i).await;
    }
    let client = cluster.client().await;
    for i in 0..200 {
        let got = client
            .get(&format!("durable-{i}"))
            .await
            .expect("get after restart");
        if i % 10 == 0 {
            assert_eq!(got, None, "deleted key durable-{i} came back");
        } else {
            assert_eq!(
                got.as_deref(),
                Some(format!("value-{i}").as_bytes()),
                "durable-{i} lost"
            );
        }
    }
    // Restarted nodes never reissue an old version: a new write to a key
    // gets a version above the one it had before the crash.
    for i in [1, 2, 3, 55, 199] {
        let ack = client
            .put(&format!("durable-{i}"), "rewritten")
            .await
            .expect("put after restart");
        assert!(
            ack.version > last_versions[i],
            "{} is not above {}",
            ack.version,
            last_versions[i]
        );
    }
    let live = cluster.sum_stats(|s| s.live_keys).await;
    assert_eq!(
        live,
        180 * 3,
        "every live key on its 3 replicas after restart"
    );
    client.close().await;
}

/// Reads what one replica holds for `key`, through the internal service.
async fn replica_holds(
    cluster: &TestCluster,
    node: usize,
    key: &str,
) -> Option<(Version, Vec<u8>)> {
    cluster
        .replica_record(node, key)
        .await
        .map(|r| (version_of(r.version), r.value.to_vec()))
}

async fn wait_until_replica_holds(cluster: &TestCluster, node: usize, key: &str, wanted: Version) {
    eventually(Duration::from_secs(10), async || {
        match replica_holds(cluster, node, key).await {
            Some((version, _)) if version == wanted => Ok(()),
            held => Err(format!(
                "replica {node} never got {key} at {wanted}: holds {:?}",
                held.map(|(version, _)| version)
            )),
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_repairs_a_replica_that_missed_writes() {
    let mut cluster = TestCluster::start(5).await;
    let client = cluster.client().await;
    for (round, key) in ["repair-by-client", "repair-by-node"]
        .into_iter()
        .enumerate()
    {
        let replicas = client.replicas_of(key);
        let lagging = cluster.index_of(&replicas[2]);
        let first = client.put(key, "v1").await.expect("put v1");
        wait_until_replica_holds(&cluster, lagging, key, first.version).await;
        cluster.kill(lagging);
        let second = client
            .put(key, "v2")
            .await
            .expect("put v2 with a replica down");
        cluster.restart(lagging).await;
        assert_eq!(
            replica_holds(&cluster, lagging, key).await,
            Some((first.version, b"v1".to_vec())),
            "the restarted replica missed v2"
        );
        if round == 0 {
            // Read through the smart client (it coordinates the read).
            assert_eq!(
                client.get(key).await.expect("get").as_deref(),
                Some(&b"v2"[..])
            );
        } else {
            // Read through a node that is not a replica of the key.
            let other = (0..5)
                .find(|i| !replicas.contains(&cluster.nodes[*i].address))
                .expect("a non-replica");
            let got = cluster
                .kv(other)
                .await
                .get(get_request(key))
                .await
                .expect("get")
                .into_inner();
            assert_eq!(&got.value[..], b"v2");
        }
        wait_until_replica_holds(&cluster, lagging, key, second.version).await;
    }
    let repairs = cluster.sum_stats(|s| s.read_repairs).await;
    assert!(repairs >= 1, "the node-coordinated repair is counted");
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_write_through_another_coordinator_always_wins() {
    let cluster = TestCluster::start(5).await;
    let client = cluster.client().await;
    // Sequential writes rotating over coordinators: each one is read back.
    let mut previous = Version::default();
    for i in 0..40usize {
        let put = cluster
            .kv(i % 5)
            .await
            .put(put_request("rotating", &format!("w{i}")))
            .await
            .expect("put")
            .into_inner();
        let version = version_of(put.version);
        assert!(
            version > previous,
            "write {i} got {version}, not above {previous}"
        );
        previous = version;
        let got = cluster
            .kv((i + 2) % 5)
            .await
            .get(get_request("rotating"))
            .await
            .expect("get")
            .into_inner();
        assert_eq!(&got.value[..], format!("w{i}").as_bytes());
    }
    // Skewed clocks: push one node's clock far ahead, then write the same key
    // through a node that never saw those versions. The replicas report the
    // newer version, and the second coordinator re-stamps above it.
    let key = "skewed";
    let replicas = client.replicas_of(key);
    let slow = (0..5)
        .find(|i| !replicas.contains(&cluster.nodes[*i].address))
        .expect("a non-replica");
    let fast = (0..5).find(|i| *i != slow).expect("another node");
    let mut fast_kv = cluster.kv(fast).await;
    // Only keys the slow node does not hold, so its clock stays behind.
    let mut written = 0;
    for i in 0.. {
        let k = format!("pump-{i}");
        if client
            .replicas_of(&k)
            .contains(&cluster.nodes[slow].address)
        {
            continue;
        }
        fast_kv.put(put_request(&k, "x")).await.expect("pump");
        written += 1;
        if written == 300 {
            break;
        }
    }
    let first = version_of(
        fast_kv
            .put(put_request(key, "from-fast"))
            .await
            .expect("put")
            .into_inner()
            .version,
    );
    let slow_stats = cluster
        .replica(slow)
        .await
        .stats(pb::StatsRequest {})
        .await
        .expect("stats")
        .into_inner();
    // With the hybrid clock an idle node keeps up through heartbeats and
    // its wall clock; it has not issued or seen `first` itself.
    assert!(
        slow_stats.lamport < first.hlc,
        "the slow node has not seen {first}"
    );
    let second = version_of(
        cluster
            .kv(slow)
            .await
            .put(put_request(key, "from-slow"))
            .await
            .expect("put")
            .into_inner()
            .version,
    );
    assert!(second > first, "later write {second} must beat {first}");
    assert_eq!(
        client.get(key).await.expect("get").as_deref(),
        Some(&b"from-slow"[..])
    );
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_keep_every_acknowledged_write() {
    let cluster = TestCluster::start(5).await;
    let client = std::sync::Arc::new(cluster.client().await);
    let mut writers = Vec::new();
    for w in 0..8 {
        let client = client.clone();
        writers.push(tokio::spawn(async move {
            let mut hot_values = Vec::new();
            for i in 0..40 {
                client
                    .put(&format!("w{w}-k{}", i % 10), format!("w{w}-{i}"))
                    .await
                    .expect("own put");
                let value = format!("hot-w{w}-{i}");
                // Overtaken by a concurrent write, a hot put is
                // indeterminate (never re-stamped under a second version);
                // anything else is a failure.
                match client.put("hot", value.clone()).await {
                    Ok(_) | Err(dkvs::error::Error::Indeterminate(_)) => {}
                    Err(other) => panic!("hot put: {other}"),
                }
                hot_values.push(value);
            }
            hot_values
        }));
    }
    let mut all_hot = Vec::new();
    for writer in writers {
        all_hot.extend(writer.await.expect("writer task"));
    }
    for w in 0..8 {
        for k in 0..10 {
            // Each writer's last write to its own key: i = 30 + k.
            let got = client.get(&format!("w{w}-k{k}")).await.expect("get");
            assert_eq!(got.as_deref(), Some(format!("w{w}-{}", 30 + k).as_bytes()));
        }
    }
    let hot = client
        .get("hot")
        .await
        .expect("get hot")
        .expect("hot exists");
    assert!(
        all_hot.iter().any(|v| v.as_bytes() == &hot[..]),
        "hot holds a value some writer wrote"
    );
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_invalid_argument_and_changes_nothing() {
    let cluster = TestCluster::start(3).await;
    let mut kv = cluster.kv(0).await;
    kv.put(put_request("keep", "original"))
        .await
        .expect("valid put");
    // The put is acknowledged by two replicas; wait (bounded) until the
    // third has it too, so the counts compared below are settled.
    let before = eventually(Duration::from_secs(10), async || {
        let keys = cluster.live_keys_per_node().await;
        if keys.iter().sum::<u64>() == 3 {
            Ok(keys)
        } else {
            Err(format!("the third replica never got the put: {keys:?}"))
        }
    })
    .await;

    let long_key = "k".repeat(1025);
    let big_value = vec![7u8; 1024 * 1024 + 1];
    let cases: Vec<(&str, tonic::Status)> = vec![
        (
            "empty key",
            kv.put(put_request("", "v")).await.expect_err("empty key"),
        ),
        (
            "long key",
            kv.put(put_request(&long_key, "v"))
                .await
                .expect_err("long key"),
        ),
        (
            "long key get",
            kv.get(get_request(&long_key))
                .await
                .expect_err("long key get"),
        ),
        (
            "big value",
            kv.put(pb::PutRequest {
                key: "keep".into(),
                value: big_value.into(),
                consistency: 0,
            })
            .await
            .expect_err("big value"),
        ),
        (
            "unknown consistency",
            kv.put(pb::PutRequest {
                key: "keep".into(),
                value: b"x".to_vec().into(),
                consistency: 9,
            })
            .await
            .expect_err("consistency 9"),
        ),
        (
            "unknown consistency on get",
            kv.get(pb::GetRequest {
                key: "keep".into(),
                consistency: 42,
            })
            .await
            .expect_err("consistency 42"),
        ),
        (
            "record without version",
            cluster
                .replica(1)
                .await
                .write(pb::ReplicaWriteRequest {
                    key: "keep".into(),
                    record: Some(pb::Record {
                        version: None,
                        tombstone: false,
                        value: b"x".to_vec().into(),
                        deleted_at_ms: 0,
                    }),
                    ..Default::default()
                })
                .await
                .expect_err("no version"),
        ),
    ];
    let bogus = cluster
        .replica(1)
        .await
        .write(pb::ReplicaWriteRequest {
            key: "keep".into(),
            record: Some(pb::Record {
                version: Some(pb::Version {
                    lamport: u64::MAX,
                    node_id: 1,
                }),
                tombstone: false,
                value: b"x".to_vec().into(),
                deleted_at_ms: 0,
            }),
            ..Default::default()
        })
        .await
        .expect_err("a version at u64::MAX would exhaust every clock");
    let mut cases = cases;
    cases.push(("implausible version", bogus));
    for (case, status) in &cases {
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{case}: {status:?}"
        );
        assert!(
            !status.message().is_empty(),
            "{case}: the message says what is wrong"
        );
    }
    assert!(cases[1].1.message().contains("1024"), "names the key limit");
    assert!(
        cases[3].1.message().contains("1048576"),
        "names the value limit"
    );

    // Nothing changed, and every node is still up.
    let got = kv.get(get_request("keep")).await.expect("get").into_inner();
    assert_eq!(&got.value[..], b"original");
    assert_eq!(before, cluster.live_keys_per_node().await);
    // The limits are inclusive.
    kv.put(put_request(&"k".repeat(1024), "v"))
        .await
        .expect("1024-byte key");
    kv.put(pb::PutRequest {
        key: "max".into(),
        value: vec![1u8; 1024 * 1024].into(),
        consistency: 0,
    })
    .await
    .expect("1 MiB value");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_quorum_requests_fail_fast_with_unavailable() {
    let mut cluster = TestCluster::start(3).await;
    cluster.kill(1);
    cluster.kill(2);
    let mut kv = cluster.kv(0).await;
    let started = Instant::now();
    let error = kv.put(put_request("k", "v")).await.expect_err("no quorum");
    let elapsed = started.elapsed();
    assert_eq!(error.code(), tonic::Code::Unavailable, "{error:?}");
    assert!(
        error.message().contains("1 of 2 required replicas"),
        "{}",
        error.message()
    );
    assert!(
        elapsed < Duration::from_millis(1500),
        "failed after {elapsed:?}"
    );
    let error = kv.get(get_request("k")).await.expect_err("no read quorum");
    assert_eq!(error.code(), tonic::Code::Unavailable);
    // ONE still works with a single live replica.
    kv.put(pb::PutRequest {
        key: "k".into(),
        value: b"one".to_vec().into(),
        consistency: 1,
    })
    .await
    .expect("put at ONE");
    let got = kv
        .get(pb::GetRequest {
            key: "k".into(),
            consistency: 1,
        })
        .await
        .expect("get at ONE")
        .into_inner();
    assert_eq!(&got.value[..], b"one");
    // The smart client reports the same.
    let client = cluster
        .client_with(ClientOptions {
            rpc_timeout: Duration::from_secs(1),
            ..ClientOptions::default()
        })
        .await;
    let error = client
        .get("k")
        .await
        .expect_err("client read without quorum");
    assert!(
        error.to_string().contains("of 2 required replicas"),
        "{error}"
    );
    // Once the two are believed down, messages say who answered, who was
    // not asked and who was not waited for (or, when too few were left to
    // reach the quorum, not sent to at all), naming the live replica too
    // (not only the dead ones).
    let (live, dead) = (
        cluster.nodes[0].address.clone(),
        [
            cluster.nodes[1].address.clone(),
            cluster.nodes[2].address.clone(),
        ],
    );
    cluster
        .wait_member_state(0, 1, pb::MemberState::Down, Duration::from_secs(10))
        .await;
    cluster
        .wait_member_state(0, 2, pb::MemberState::Down, Duration::from_secs(10))
        .await;
    for (what, error) in [
        (
            "PUT",
            kv.put(put_request("k", "v")).await.expect_err("no quorum"),
        ),
        (
            "GET",
            kv.get(get_request("k")).await.expect_err("no quorum"),
        ),
    ] {
        let message = error.message();
        assert!(
            message.contains(&format!("answered: {live}"))
                || message.contains(&format!("not waited for: {live}"))
                || message.contains(&format!("not sent: {live}")),
            "{what}: {message}"
        );
        assert!(
            message.contains("not asked (believed down): "),
            "{what}: {message}"
        );
        for address in &dead {
            assert!(message.contains(address.as_str()), "{what}: {message}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_cleanly_and_data_survives() {
    let mut cluster = TestCluster::start(3).await;
    let client = cluster.client().await;
    client.put("before-term", "kept").await.expect("put");
    let status = cluster.terminate(0);
    assert!(status.success(), "SIGTERM exit status: {status}");
    cluster.restart(0).await;
    assert_eq!(
        client.get("before-term").await.expect("get").as_deref(),
        Some(&b"kept"[..])
    );
    client.close().await;
}

/// A GetRequest whose `key` field (a protobuf `string`) carries arbitrary bytes.
#[derive(Clone, PartialEq, prost::Message)]
struct RawGetRequest {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_that_is_not_utf8_is_invalid_argument_not_internal() {
    let cluster = TestCluster::start(1).await;
    let mut grpc = tonic::client::Grpc::new(common::channel(&cluster.nodes[0].address).await);
    grpc.ready().await.expect("channel ready");
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/dkvs.v1.KeyValue/Get");
    let codec: tonic_prost::ProstCodec<RawGetRequest, pb::GetResponse> =
        tonic_prost::ProstCodec::default();
    let status = grpc
        .unary(
            tonic::Request::new(RawGetRequest {
                key: vec![0xff, 0xfe],
            }),
            path,
            codec,
        )
        .await
        .expect_err("invalid UTF-8 key");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("UTF-8"), "{}", status.message());
}
