//! Bounded answers, with real processes: batches over --max-batch-items
//! are refused naming the flag, a range of more keys than a page is listed
//! and repaired whole page by page, and a request body trickled slower than
//! --request-body-timeout-ms is dropped while the node keeps serving.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{TestCluster, eventually, health_serving};
use dkvs::pb;

/// Asserts `result` is INVALID_ARGUMENT naming the batch limit.
fn assert_refused<T: std::fmt::Debug>(result: Result<T, tonic::Status>, what: &str) {
    let status = result.expect_err(what);
    assert_eq!(
        status.code(),
        tonic::Code::InvalidArgument,
        "{what}: {status}"
    );
    assert!(
        status
            .message()
            .contains("the limit is 1024 (--max-batch-items)"),
        "{what}: {status}"
    );
}

fn reads(count: usize) -> Vec<pb::ReplicaReadRequest> {
    (0..count)
        .map(|i| pb::ReplicaReadRequest {
            key: format!("k{i}"),
            ..Default::default()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_over_the_cap_are_refused_naming_the_flag() {
    let cluster = TestCluster::start_with(1, &["--max-batch-items", "1024"]).await;
    let mut replica_read = cluster.replica_read(0).await;
    // At the cap: answered, item by item.
    let answered = replica_read
        .batch(pb::ReplicaReadBatchRequest { reads: reads(1024) })
        .await
        .expect("a batch at the cap")
        .into_inner();
    assert_eq!(answered.reads.len(), 1024);
    assert_refused(
        replica_read
            .batch(pb::ReplicaReadBatchRequest { reads: reads(1025) })
            .await,
        "ReplicaRead.Batch of 1025",
    );
    // The node-to-node batch counts reads and writes together.
    let writes = (0..600)
        .map(|i| pb::ReplicaWriteRequest {
            key: format!("w{i}"),
            ..Default::default()
        })
        .collect();
    assert_refused(
        cluster
            .replica(0)
            .await
            .batch(pb::ReplicaBatchRequest {
                writes,
                reads: reads(425),
            })
            .await,
        "Replica.Batch of 600 writes and 425 reads",
    );
    let intervals = (0..1025u64)
        .map(|i| pb::HashInterval {
            first: i * 10,
            last: i * 10 + 5,
        })
        .collect();
    assert_refused(
        cluster
            .membership(0)
            .await
            .stream_records(pb::StreamRequest {
                intervals,
                cluster_id: cluster.status(0).await.layout.expect("layout").cluster_id,
                ..Default::default()
            })
            .await
            .map(|_| ()),
        "StreamRecords of 1025 intervals",
    );
    // Nothing was stored, and the node serves on.
    assert!(cluster.replica_record(0, "w0").await.is_none());
    assert!(health_serving(&cluster.nodes[0].address).await);
    let client = cluster.client().await;
    client.put("after", "refusals").await.expect("put");
    client.close().await;
}

/// The number of token ranges and the layout version node `i` serves.
async fn ring_of(cluster: &TestCluster, i: usize) -> (u32, u64) {
    let layout = cluster.status(i).await.layout.expect("a layout");
    let ranges = layout.members.iter().map(|m| m.tokens.len()).sum::<usize>();
    (ranges as u32, layout.version)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_larger_than_a_page_are_listed_and_repaired_whole() {
    // Four tokens per node: about 25 keys per range, pages of 2.
    let flags = [
        "--vnodes",
        "4",
        "--max-page-entries",
        "2",
        "--anti-entropy-interval",
        "1",
        "--max-hints",
        "0",
    ];
    let mut cluster = TestCluster::start_with(3, &flags).await;
    let client = cluster.client().await;
    let down = 2;
    cluster.kill(down);
    let keys = 300u64;
    for i in 0..keys {
        client.put(&format!("page-{i}"), "v").await.expect("put");
    }
    // A caller that names no cursor and no page size (as a node of an
    // earlier release) gets the first page and the cursor to go on from;
    // following the cursors lists every key once.
    let (range_count, layout_version) = ring_of(&cluster, 0).await;
    let mut replica = cluster.replica(0).await;
    let (mut listed, mut longest) = (0usize, 0usize);
    for range in 0..range_count {
        let mut after = Bytes::new();
        loop {
            let page = replica
                .range_entries(pb::RangeEntriesRequest {
                    range,
                    range_count,
                    layout_version,
                    after: after.clone(),
                    page_size: 0,
                    for_listing: false,
                })
                .await
                .expect("a page")
                .into_inner();
            assert!(page.entries.len() <= 2, "a page holds --max-page-entries");
            listed += page.entries.len();
            longest = longest.max(page.entries.len());
            if page.next_after.is_empty() {
                break;
            }
            assert!(page.next_after > after, "the cursor advances");
            after = page.next_after;
        }
    }
    assert_eq!(listed as u64, keys, "every key listed once over the pages");
    // A page size asked below the limit is honoured.
    let one = replica
        .range_entries(pb::RangeEntriesRequest {
            range: 0,
            range_count,
            layout_version,
            page_size: 1,
            for_listing: false,
            ..Default::default()
        })
        .await
        .expect("a page of one")
        .into_inner();
    assert!(one.entries.len() <= 1);

    // The node that missed every write is repaired by anti-entropy alone,
    // every range many pages long.
    cluster.restart(down).await;
    eventually(Duration::from_secs(60), async || {
        let mut stats = cluster.replica(down).await;
        let held = stats
            .stats(pb::StatsRequest {})
            .await
            .map_err(|e| e.to_string())?
            .into_inner()
            .live_keys;
        if held >= keys {
            Ok(())
        } else {
            Err(format!("the restarted replica holds {held} of {keys} keys"))
        }
    })
    .await;
    assert_eq!(cluster.sum_stats(|s| s.read_repairs).await, 0);
    client.close().await;
}

/// A gRPC `KeyValue.Put` whose body announces 100 bytes and then sends one
/// byte every 100 ms. Answers the call's grpc-status, grpc-message and
/// dkvs-outcome.
async fn trickle_a_put(address: &str) -> (String, String, String) {
    let tcp = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    let (h2, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut h2 = h2.ready().await.expect("h2 ready");
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{address}/dkvs.v1.KeyValue/Put"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request");
    let (response, mut body) = h2.send_request(request, false).expect("send");
    // The gRPC frame header: not compressed, 100 bytes follow.
    body.send_data(Bytes::from_static(&[0, 0, 0, 0, 100]), false)
        .expect("frame header");
    let trickle = tokio::spawn(async move {
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            body.reserve_capacity(1);
            if body.send_data(Bytes::from_static(b"x"), false).is_err() {
                return; // the node reset the stream
            }
        }
    });
    let response = tokio::time::timeout(Duration::from_secs(8), response)
        .await
        .expect("an answer before the trickle ends")
        .expect("a response");
    let (parts, mut answer) = response.into_parts();
    let mut fields = parts.headers;
    if !fields.contains_key("grpc-status") {
        while let Some(data) = answer.data().await {
            let _ = data;
        }
        fields = answer
            .trailers()
            .await
            .expect("trailers")
            .expect("some trailers");
    }
    trickle.abort();
    let field = |name: &str| {
        fields
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).to_string())
            .unwrap_or_default()
    };
    (
        field("grpc-status"),
        field("grpc-message"),
        field("dkvs-outcome"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_request_body_is_dropped_and_the_node_stays_healthy() {
    let cluster = TestCluster::start_with(1, &["--request-body-timeout-ms", "1000"]).await;
    let address = cluster.nodes[0].address.clone();
    let client = cluster.client().await;
    client.put("steady", "v").await.expect("put");
    let started = Instant::now();
    let trickled = tokio::spawn({
        let address = address.clone();
        async move { trickle_a_put(&address).await }
    });
    // Other callers are served while the trickle goes on.
    let mut served = 0;
    while !trickled.is_finished() && started.elapsed() < Duration::from_secs(8) {
        client.get("steady").await.expect("get during the trickle");
        served += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, message, outcome) = trickled.await.expect("trickle task");
    let took = started.elapsed();
    assert_eq!(status, "4", "DEADLINE_EXCEEDED: {message}");
    assert!(
        message.contains("--request-body-timeout-ms"),
        "names the flag: {message}"
    );
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "dropped after about 1 s, not {took:?}"
    );
    assert_eq!(outcome, "not-applied", "no handler ran");
    assert!(served > 0, "no other call was served meanwhile");
    assert!(health_serving(&address).await);
    client.put("after", "the trickle").await.expect("put after");
    client.close().await;
}
