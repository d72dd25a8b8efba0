//! Limits with real processes: a node past a request budget refuses at
//! once (UNAVAILABLE, not applied, a retry hint) instead of queueing, stays
//! healthy and unconvicted, and keeps serving the clients who behave; past
//! its connection limit it closes new connections and serves the old ones.

mod common;

use std::time::{Duration, Instant};

use common::{TestCluster, channel, health_serving, put_request};
use dkvs::error::Outcome;
use dkvs::pb;

/// `count` writes one at a time to `address` on a connection of their
/// own, each done or refused with a retry hint; the p99 of those done.
async fn polite_p99(address: &str, count: usize) -> (usize, Duration) {
    let mut polite = pb::key_value_client::KeyValueClient::new(channel(address).await);
    let mut latencies = Vec::new();
    for i in 0..count {
        let began = Instant::now();
        match polite.put(put_request(&format!("polite-{i}"), "v")).await {
            Ok(_) => latencies.push(began.elapsed()),
            Err(status) => assert!(
                dkvs::net::shed::shed_wait(&status).is_some(),
                "the polite client got {status:?}"
            ),
        }
    }
    assert!(!latencies.is_empty(), "the polite client was never served");
    (latencies.len(), p99(&mut latencies))
}

/// Asserts nodes 1 and 2 see `address` UP (they never convicted it).
async fn assert_up_for_peers(cluster: &TestCluster, address: &str) {
    for observer in [1, 2] {
        let status = cluster.status(observer).await;
        let member = status
            .members
            .iter()
            .find(|m| m.address == address)
            .expect("a member");
        assert_eq!(
            member.state,
            pb::MemberState::Up as i32,
            "node {observer} sees {address} as {:?}",
            member.state
        );
    }
}

/// Node `i`'s own counts, as it reports them.
async fn own_stats(cluster: &TestCluster, i: usize) -> pb::NodeStats {
    let address = &cluster.addresses()[i];
    cluster
        .status(i)
        .await
        .members
        .iter()
        .find(|m| &m.address == address)
        .and_then(|m| m.stats)
        .expect("its own stats")
}

/// The p99 of `latencies`.
fn p99(latencies: &mut [Duration]) -> Duration {
    latencies.sort();
    latencies[(latencies.len() * 99 / 100).min(latencies.len() - 1)]
}

/// 10,000 concurrent streams from one client connection against a node
/// whose budgets are small: every answer is either done or refused at once
/// with a retry hint and `not-applied` (none queued until it timed out),
/// while a second client, on its own connection, is served throughout and
/// the node stays SERVING and UP in its peers' eyes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_streams_is_shed_and_the_node_serves_the_others() {
    let cluster = TestCluster::start_with(
        3,
        &[
            "--max-requests-per-connection",
            "16",
            "--max-client-requests",
            "48",
        ],
    )
    .await;
    let address = cluster.addresses()[0].clone();
    let mut flooder = pb::key_value_client::KeyValueClient::new(channel(&address).await);
    // One call first, so the connection's SETTINGS (at most
    // --max-streams-per-connection streams) are known before the flood: a
    // client that opens more streams before it has them is refused by
    // HTTP/2 itself (REFUSED_STREAM), past a thousand of those the
    // connection is closed, and this test is about the node's budgets.
    flooder
        .put(put_request("flood-warm-up", "x"))
        .await
        .expect("the first call");

    let flood = tokio::spawn(async move {
        let calls = (0..10_000).map(|i| {
            let mut client = flooder.clone();
            async move {
                client
                    .put(put_request(&format!("flood-{}", i % 500), "x"))
                    .await
            }
        });
        futures::future::join_all(calls).await
    });

    // A client that behaves: one request at a time, on its own connection.
    let mut polite = pb::key_value_client::KeyValueClient::new(channel(&address).await);
    let mut latencies = Vec::new();
    let mut serving_checks = 0;
    let started = Instant::now();
    while !flood.is_finished() && started.elapsed() < Duration::from_secs(60) {
        let began = Instant::now();
        let answer = polite
            .put(put_request(&format!("polite-{}", latencies.len()), "v"))
            .await;
        // Refusals carry a hint; the smart client would wait and retry.
        match answer {
            Ok(_) => latencies.push(began.elapsed()),
            Err(status) => assert!(
                dkvs::net::shed::shed_wait(&status).is_some(),
                "the polite client got {status:?}"
            ),
        }
        if latencies.len() % 20 == 0 {
            assert!(
                health_serving(&address).await,
                "the flooded node stopped serving"
            );
            serving_checks += 1;
        }
    }
    let answers = flood.await.expect("the flood");
    let (mut done, mut shed, mut refused_streams) = (0, 0, 0);
    for answer in &answers {
        match answer {
            Ok(_) => done += 1,
            // HTTP/2's own refusal, before any work: a stream opened just
            // as the node's count of an answered one had not yet dropped
            // (the smart client retries these like a shed).
            Err(status) if dkvs::net::shed::refused_stream(status) => refused_streams += 1,
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                assert_eq!(
                    Outcome::of(status.metadata()),
                    Some(Outcome::NotApplied),
                    "{status:?}"
                );
                assert!(
                    status.message().contains("--max-"),
                    "the refusal names its flag: {}",
                    status.message()
                );
                assert!(dkvs::net::shed::shed_wait(status).is_some(), "{status:?}");
                shed += 1;
            }
        }
    }
    assert!(shed > 0, "a flood past the budgets was never shed");
    assert!(done > 0, "nothing of the flood was served");
    assert!(
        latencies.len() >= 10,
        "the polite client was served {} times",
        latencies.len()
    );
    println!(
        "flood of 10000 streams: {done} done, {shed} shed, {refused_streams} refused by HTTP/2 in \
         {:.1} s; polite client: {} writes, p99 {:?}; health checked {serving_checks} times",
        started.elapsed().as_secs_f64(),
        latencies.len(),
        p99(&mut latencies)
    );

    // Its peers never convicted it, and its status counts what it shed.
    assert_up_for_peers(&cluster, &address).await;
    let stats = own_stats(&cluster, 0).await;
    assert!(stats.requests_shed >= shed as u64, "{stats:?}");
    assert!(
        cluster.log_of(0).contains("shedding load"),
        "the node says in its log that it sheds"
    );
}

/// The smart client honours the hint: with a budget of 2 client requests
/// per node and 128 writes at once (each waits for a replica's answer),
/// every write is done (the refused ones waited and were sent again), none
/// indeterminate.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_smart_client_waits_out_a_shed_and_succeeds() {
    let cluster = TestCluster::start_with(3, &["--max-client-requests", "2"]).await;
    let client = cluster.client().await;
    let client = &client;
    let writes = (0..128).map(|i| async move { client.put(&format!("k{i}"), "v").await });
    let answers = futures::future::join_all(writes).await;
    let failed: Vec<_> = answers.iter().filter_map(|a| a.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        failed.first()
    );
    let shed = cluster.sum_stats(|s| s.requests_shed).await;
    assert!(
        shed > 0,
        "128 writes at once past budgets of 2 were never shed"
    );
    println!("128 writes at once, budgets of 2 per node: {shed} shed and sent again, all done");
}

/// Node-to-node requests have their own budget: a flood of them past
/// `--max-node-requests` is refused at once with a hint, while client
/// requests keep being served and the node stays SERVING.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_requests_past_their_budget_are_shed_and_clients_served() {
    let cluster = TestCluster::start_with(3, &["--max-node-requests", "8"]).await;
    let address = cluster.addresses()[0].clone();
    let replica = cluster.replica(0).await;
    let flood = tokio::spawn(async move {
        let calls = (0..5_000).map(|i| {
            let mut replica = replica.clone();
            async move {
                replica
                    .read(pb::ReplicaReadRequest {
                        key: format!("k{}", i % 100),
                        ..Default::default()
                    })
                    .await
            }
        });
        futures::future::join_all(calls).await
    });
    let (served, p99) = polite_p99(&address, 100).await;
    assert!(health_serving(&address).await, "the node stopped serving");
    let answers = flood.await.expect("the flood");
    let shed = answers
        .iter()
        .filter(|a| {
            a.as_ref().err().is_some_and(|status| {
                status.message().contains("--max-node-requests")
                    && dkvs::net::shed::shed_wait(status).is_some()
            })
        })
        .count();
    let other: Vec<_> = answers
        .iter()
        .filter_map(|a| a.as_ref().err())
        .filter(|s| dkvs::net::shed::shed_wait(s).is_none())
        .collect();
    assert!(other.is_empty(), "{:?}", other.first());
    assert!(
        shed > 0,
        "5000 node requests past a budget of 8 were never shed"
    );
    println!(
        "node-request flood of 5000: {shed} shed; a client beside it: {served} of 100 writes \
         done, p99 {p99:?}"
    );
}

/// Past `--max-connections` a new connection is closed at once; those
/// already open are served, the node stays SERVING and UP for its peers,
/// and once the extra connections close a new one is served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_are_closed_and_the_others_served() {
    use tokio::io::AsyncReadExt;
    // Peers hold connections to it and clients come and go: 16 leaves room
    // for them and for the test's own client.
    let cluster = TestCluster::start_with(3, &["--max-connections", "16"]).await;
    let address = cluster.addresses()[0].clone();
    let mut kv = pb::key_value_client::KeyValueClient::new(channel(&address).await);
    kv.put(put_request("before", "v")).await.expect("served");

    // Fill the node with idle connections until one is closed at once.
    let mut held = Vec::new();
    let mut closed_at_once = false;
    for _ in 0..40 {
        let mut stream = tokio::net::TcpStream::connect(&address)
            .await
            .expect("connect");
        let mut byte = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(300), stream.read(&mut byte)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed_at_once = true;
                break;
            }
            _ => held.push(stream),
        }
    }
    assert!(
        closed_at_once,
        "40 connections past a limit of 16 were all kept"
    );
    // The open connection is still served, and peers keep the node UP.
    let began = Instant::now();
    kv.put(put_request("during", "v"))
        .await
        .expect("still served");
    println!(
        "{} idle connections held, the next closed at once; a write on an open one took {:?}",
        held.len(),
        began.elapsed()
    );
    assert_up_for_peers(&cluster, &address).await;
    drop(held);
    common::eventually(Duration::from_secs(10), async || {
        let mut kv = pb::key_value_client::KeyValueClient::new(channel(&address).await);
        kv.put(put_request("after", "v"))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
    .await;
    let stats = own_stats(&cluster, 0).await;
    assert!(stats.connections_refused > 0, "{stats:?}");
}

/// `--max-data-bytes`: past the quota a new value is refused before
/// anything is sent (RESOURCE_EXHAUSTED naming the flag, not applied),
/// deletes still work, status and log say so, and once deletes and
/// compaction bring the data dir below the quota, writes resume by
/// themselves. A replica past its quota refuses a coordinator's new value
/// but takes copies of existing data (repair, hints, moves).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_quota_refuses_values_takes_deletes_and_resumes_by_itself() {
    // Over one 64 MiB log segment, so deleting the data lets compaction
    // drop a whole segment.
    let quota: u64 = 72 << 20;
    let cluster = TestCluster::start_with(1, &["--max-data-bytes", &quota.to_string()]).await;
    let client = cluster.client().await;
    let value = vec![7u8; 1_000_000];
    let mut written = Vec::new();
    let refusal = loop {
        assert!(written.len() < 200, "200 MB written past a quota of 72 MiB");
        let key = format!("big-{}", written.len());
        match client.put(&key, value.clone()).await {
            Ok(_) => written.push(key),
            Err(error) => break error,
        }
        // The node measures its data dir every second: give it a moment
        // once past the quota.
        if written.len() as u64 * 1_000_000 > quota {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    assert_eq!(refusal.code(), tonic::Code::ResourceExhausted, "{refusal}");
    assert_eq!(refusal.outcome(), Outcome::NotApplied, "{refusal}");
    assert!(
        refusal.to_string().contains("--max-data-bytes"),
        "{refusal}"
    );
    let stats = own_stats(&cluster, 0).await;
    assert!(
        stats.data_quota_reached && stats.data_bytes >= quota,
        "{stats:?}"
    );
    assert!(cluster.log_of(0).contains("data quota reached"));

    // A replica past its quota: a coordinator's new value is refused, a
    // copy of existing data is taken.
    let record = cluster.replica_record(0, &written[0]).await.expect("held");
    let mut replica = cluster.replica(0).await;
    let write = |key: &str, copy: bool| pb::ReplicaWriteRequest {
        key: key.into(),
        record: Some(record.clone()),
        copy,
        ..Default::default()
    };
    let refused = replica
        .write(write("fresh", false))
        .await
        .expect_err("a new value past the quota");
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    replica
        .write(write(&written[0], true))
        .await
        .expect("a copy of existing data is taken");

    // Deletes still work; then compaction frees the space and writes
    // resume without a restart.
    for key in &written {
        client.delete(key).await.expect("a delete past the quota");
    }
    let deleted = Instant::now();
    common::eventually(Duration::from_secs(30), async || {
        client
            .put("after", "v")
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
    .await;
    assert!(cluster.log_of(0).contains("below the data quota again"));
    println!(
        "quota {quota} bytes: {} values of 1 MB taken, the next refused; {} deletes taken; \
         writes taken again {:.1} s after the last delete",
        written.len(),
        written.len(),
        deleted.elapsed().as_secs_f64()
    );
}

/// A node bounds a write by the caller's `grpc-timeout` (relative, no
/// clock involved) and answers with an outcome: one that leaves no time is
/// refused unapplied; one that runs out while replicas are asked is
/// DEADLINE_EXCEEDED with outcome `unknown` (never tonic's bare CANCELLED).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_cut_by_its_grpc_timeout_answers_with_its_outcome() {
    let cluster = TestCluster::start(3).await;
    let address = cluster.addresses()[0].clone();
    let endpoint =
        tonic::transport::Endpoint::from_shared(format!("http://{address}")).expect("an address");
    let mut kv = pb::key_value_client::KeyValueClient::new(endpoint.connect_lazy());

    let mut too_short = tonic::Request::new(put_request("k", "v"));
    too_short.set_timeout(Duration::from_millis(3));
    let refused = kv.put(too_short).await.expect_err("no time to coordinate");
    assert_eq!(
        Outcome::of(refused.metadata()),
        Some(Outcome::NotApplied),
        "{refused:?}"
    );

    // With N=3 every node replicates every key: freeze the two others, so
    // no quorum comes within the caller's 300 ms (they are not convicted
    // that soon).
    let _one = cluster.pause_until_dropped(1);
    let _two = cluster.pause_until_dropped(2);
    let mut request = tonic::Request::new(put_request("k", "v"));
    request.set_timeout(Duration::from_millis(300));
    let began = Instant::now();
    let cut = kv.put(request).await.expect_err("no quorum in 300 ms");
    assert_eq!(cut.code(), tonic::Code::DeadlineExceeded, "{cut:?}");
    assert_eq!(
        Outcome::of(cut.metadata()),
        Some(Outcome::Unknown),
        "{cut:?}"
    );
    assert!(cut.message().contains("grpc-timeout"), "{}", cut.message());
    assert!(
        began.elapsed() < Duration::from_secs(1),
        "{:?}",
        began.elapsed()
    );
}
