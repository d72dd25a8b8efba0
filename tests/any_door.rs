//! Writes entering at any node: a node that is not a key's first live
//! replica forwards its writes there, so writes to one key meet one
//! coordinator's order and none is superseded on a healthy cluster,
//! whichever node each enters at. Real processes on loopback.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{TestCluster, put_request};
use dkvs::error::Outcome;
use dkvs::pb;

/// A version as (lamport, node id).
type Version = (u64, u64);

/// Many writers hammer a few keys, each writer through its own node (as a
/// raw gRPC client or a load balancer would): every write is applied, no
/// two acknowledged writes of one key share a version, and the last one
/// acknowledged is what a read returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_to_hot_keys_entering_at_every_node_all_succeed() {
    const WRITERS: usize = 12;
    const WRITES: usize = 60;
    const KEYS: usize = 3;
    let cluster = TestCluster::start(3).await;
    let mut tasks = Vec::new();
    for writer in 0..WRITERS {
        let mut kv = cluster.kv(writer % 3).await;
        tasks.push(tokio::spawn(async move {
            let mut acks = Vec::new();
            for i in 0..WRITES {
                let key = format!("hot-{}", (writer + i) % KEYS);
                let value = format!("{writer}-{i}");
                let answer = kv.put(put_request(&key, &value)).await;
                match answer {
                    Ok(reply) => {
                        assert_eq!(
                            Outcome::of(reply.metadata()),
                            Some(Outcome::Applied),
                            "{key}"
                        );
                        let version = reply.into_inner().version.expect("a version");
                        acks.push((key, (version.lamport, version.node_id), value));
                    }
                    Err(status) => panic!(
                        "writer {writer} (node {}): PUT {key} failed on a healthy cluster: {status:?}",
                        writer % 3
                    ),
                }
            }
            acks
        }));
    }
    let mut by_key: HashMap<String, Vec<(Version, String)>> = HashMap::new();
    for task in tasks {
        for (key, version, value) in task.await.expect("writer") {
            by_key.entry(key).or_default().push((version, value));
        }
    }
    for (key, mut acks) in by_key {
        acks.sort();
        let versions: Vec<_> = acks.iter().map(|(v, _)| *v).collect();
        let mut distinct = versions.clone();
        distinct.dedup();
        assert_eq!(
            distinct.len(),
            versions.len(),
            "{key}: a version acknowledged twice"
        );
        let (_, newest) = acks.last().expect("writes");
        let got = cluster
            .kv(0)
            .await
            .get(common::get_request(&key))
            .await
            .expect("get")
            .into_inner();
        assert!(got.found, "{key}");
        assert_eq!(
            got.value,
            newest.as_bytes(),
            "{key}: the newest acknowledged write"
        );
    }
    let forwarded = cluster.sum_stats(|s| s.writes_forwarded).await;
    let coordinated = cluster.sum_stats(|s| s.forwarded_writes_coordinated).await;
    assert!(
        forwarded > 0,
        "writes entering at non-first replicas are forwarded"
    );
    assert_eq!(forwarded, coordinated, "every forward was coordinated once");
}

/// A key named `prefix-N` whose first replica is node `node`.
async fn key_first_on(cluster: &TestCluster, node: usize, prefix: &str) -> String {
    let client = cluster.client().await;
    let first = cluster.addresses()[node].clone();
    let key = (0..)
        .map(|i| format!("{prefix}-{i}"))
        .find(|k| client.replicas_of(k)[0] == first)
        .expect("a key");
    client.close().await;
    key
}

/// A key's first replica is killed: a write entering at another node,
/// before the failure detector convicts it, finds the forward refused (it
/// never left) and is coordinated where it entered, as it is once the
/// detector convicts the dead node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_first_replica_just_died_is_coordinated_where_it_entered() {
    let mut cluster = TestCluster::start(3).await;
    let key = key_first_on(&cluster, 0, "first-on-0").await;
    let mut kv = cluster.kv(1).await;
    // Node 1 has a connection to node 0 in use before the kill.
    kv.put(put_request(&key, "before")).await.expect("put");
    let forwarded_before = cluster.sum_stats(|s| s.writes_forwarded).await;
    assert!(forwarded_before > 0, "node 1 forwarded the write to node 0");
    cluster.kill(0);
    for round in 0..20 {
        let value = format!("after-{round}");
        match kv.put(put_request(&key, &value)).await {
            Ok(reply) => assert_eq!(Outcome::of(reply.metadata()), Some(Outcome::Applied)),
            // The forward may have left on the connection node 0 had open
            // when it died: then its outcome is unknown, never a silent
            // second coordination.
            Err(status) if round == 0 => {
                assert_eq!(
                    Outcome::of(status.metadata()),
                    Some(Outcome::Unknown),
                    "{status:?}"
                );
                continue;
            }
            Err(status) => panic!("round {round}: {status:?}"),
        }
        let got = kv
            .get(common::get_request(&key))
            .await
            .expect("get")
            .into_inner();
        assert_eq!(got.value, value.as_bytes());
    }
    cluster
        .wait_member_state(1, 0, pb::MemberState::Down, Duration::from_secs(10))
        .await;
    kv.put(put_request(&key, "convicted"))
        .await
        .expect("a write after conviction is coordinated by the next replica");
}

/// A forward that reaches its receiver only after the forwarder gave up on
/// it (the receiver was frozen with the request in its socket buffer) is
/// refused there, not coordinated above the writes acknowledged since.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_that_arrives_after_its_sender_gave_up_is_refused() {
    let cluster = TestCluster::start(3).await;
    let key = key_first_on(&cluster, 0, "late-forward").await;
    let mut kv = cluster.kv(1).await;
    kv.put(put_request(&key, "v0")).await.expect("put");
    let put_within = |value: &str, timeout: Duration| {
        let mut request = tonic::Request::new(put_request(&key, value));
        request.set_timeout(timeout);
        request
    };

    let frozen = cluster.pause_until_dropped(0);
    // Node 1 still believes node 0 up: the forward waits out the deadline.
    let late = kv
        .put(put_within("late", Duration::from_millis(500)))
        .await
        .expect_err("node 0 is frozen");
    assert_eq!(
        Outcome::of(late.metadata()),
        Some(Outcome::Unknown),
        "{late:?}"
    );
    cluster
        .wait_member_state(1, 0, pb::MemberState::Down, Duration::from_secs(15))
        .await;
    kv.put(put_within("acknowledged", Duration::from_secs(2)))
        .await
        .expect("coordinated by node 1 once node 0 is convicted");
    drop(frozen);

    // Node 0 takes the buffered forward up and refuses it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cluster
        .log_of(0)
        .contains("arrived after its client gave up on it")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "node 0 never refused the late forward: {}",
            cluster.log_tail_of(0)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut get = common::get_request(&key);
    get.consistency = pb::Consistency::All as i32;
    let got = common::eventually(Duration::from_secs(10), async || {
        kv.get(get.clone()).await.map(|r| r.into_inner())
    })
    .await;
    assert_eq!(
        got.value,
        &b"acknowledged"[..],
        "the acknowledged write stays"
    );
}
